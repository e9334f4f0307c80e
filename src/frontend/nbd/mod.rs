//! The NBD server: exports replicated volumes to any NBD client (qemu-img, nbdcopy,
//! nbdinfo, fio's nbd engine, the kernel's nbd-client) over TCP on 127.0.0.0/8 or a unix
//! socket, without root.
//!
//! Fixed newstyle handshake with `OPT_GO`, `OPT_INFO` (export size, transmission flags,
//! block sizes, name), `OPT_LIST`, `OPT_ABORT` and `OPT_EXPORT_NAME`; transmission with
//! READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES and CACHE, simple replies only
//! (structured replies are refused with `ERR_UNSUP`, which every client handles).
pub mod proto;
mod server;

pub use server::{Exports, serve_connection, serve_tcp, serve_unix};
