//! Shared code of tandem's command-line tools (`tandemctl`, `tandem-pr`, `mount.tandem`).
//!
//! Each tool is a thin `main` over a module here, so the pieces can be tested as a library.
#![deny(unsafe_code)]

pub mod ctl;
pub mod demo;
pub mod mount;
pub mod nbd_client;
pub mod pr;
