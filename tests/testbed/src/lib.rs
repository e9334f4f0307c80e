//! tandem's real-kernel test bed.
//!
//! The build host has no SCSI layer, no DLM, no NBD and no ublk, so every test that needs a
//! real kernel boots a Debian 6.12 guest under QEMU (TCG, one vCPU). The guest mounts the
//! host's `/` read-only over virtio-9p with a tmpfs overlay on top, so it runs the freshly
//! built tandem binaries and every host tool (sg_persist, corosync, mkfs.gfs2, ...) unchanged.
//!
//! ```text
//!  GuestKernel::prepare()   apt-get download linux-image-6.12.*, dpkg -x, depmod, busybox initramfs
//!         │                 (cached: a second run downloads nothing)
//!  GuestSpec::new(script)   memory, disks, iSCSI LUNs, NICs on socket netdevs, env, timeout
//!         │
//!  Guest::start()  ──►  qemu-system-x86_64 -accel tcg ... ; console collected line by line
//!         │             wait_for("marker"), set_link(false) (partition), kill() (crash)
//!  Guest::wait()   ──►  GuestOutcome { rc (from the guest script), console }
//! ```
//!
//! A test that needs the VM and cannot get it (no qemu, no kernel package, no module) gets
//! an error naming what is missing; tests `expect()` it, so they fail loudly and never skip.

mod error;
mod guest;
mod kernel;
mod net;

pub use error::TestbedError;
pub use guest::{Disk, Guest, GuestOutcome, GuestSpec, IscsiLun, failure_report, run};
pub use kernel::{GuestKernel, cache_dir};
pub use net::{Nic, NicBackend, free_tcp_port, wait_for_listener};

use std::path::PathBuf;

/// Result alias of the test bed.
pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

/// Path of a binary built in this workspace (`target/<profile>/NAME`).
///
/// Integration tests of one package cannot name the binaries of another, so the test
/// command builds every binary first (`cargo build --workspace --bins`) and tests look
/// them up next to their own executable.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|source| TestbedError::Io {
        what: "locating the test executable".into(),
        source,
    })?;
    // target/<profile>/deps/<test>-<hash>  or  target/<profile>/<bin>
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let candidate = dir.join(name);
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(TestbedError::MissingBinary {
            name: name.to_owned(),
            path: candidate,
        })
    }
}

/// Directory for one test's scratch files, visible to guests at the same path.
pub fn scratch_dir(test: &str) -> Result<PathBuf> {
    let dir = cache_dir()?
        .join("runs")
        .join(format!("{test}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| TestbedError::Io {
            what: format!("clearing {}", dir.display()),
            source,
        })?;
    }
    std::fs::create_dir_all(&dir).map_err(|source| TestbedError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(dir)
}
