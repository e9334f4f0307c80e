//! tandem's distributed lock manager.
#![deny(unsafe_code)]
