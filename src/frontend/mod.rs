//! Frontends that put a replicated [`Volume`](crate::replication::Volume) in front of
//! applications: an NBD server (any NBD client, no root needed) and a ublk block device
//! (`/dev/ublkbN`, needs root and the `ublk_drv` module).
pub mod nbd;
pub mod ublk;
