//! SCSI-3 and NVMe persistent reservations and the fencing policy built on them.
#![deny(unsafe_code)]
