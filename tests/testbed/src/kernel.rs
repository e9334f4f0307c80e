//! Preparing the guest kernel and initramfs, once, into a cache.

use crate::{Result, TestbedError};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `/init` of the guest initramfs (busybox sh). It mounts the host root over 9p
/// read-only, puts a tmpfs overlay on top, binds the unpacked kernel modules, then chroots
/// into the result and runs `/.tandem-stage2` there.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in netfs 9pnet 9pnet_virtio 9p overlay; do insmod /mods/$m.ko 2>/dev/null; done
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
MODDIR=$(arg tandem.moddir)
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 host /host || { echo "TANDEM-VM-INIT: 9p mount failed"; echo o > /proc/sysrq-trigger; }
mount -t tmpfs -o mode=0755 upper /upper; mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/host,upperdir=/upper/u,workdir=/upper/w overlay /newroot
mount --move /proc /newroot/proc; mount --move /sys /newroot/sys; mount --move /dev /newroot/dev
mkdir -p /newroot/usr/lib/modules; mount --bind "/host$MODDIR" /newroot/usr/lib/modules
cp /stage2 /newroot/.tandem-stage2
exec chroot /newroot /bin/sh /.tandem-stage2
"#;

/// Runs inside the chroot: what udev and systemd would have set up, then the test script.
const STAGE2: &str = r#"arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TANDEM_GUEST=1
mount -t tmpfs -o mode=0755 run /run
mkdir -p /dev/shm /dev/pts /run/lock; mount -t tmpfs -o mode=1777 shm /dev/shm; mount -t devpts devpts /dev/pts
modprobe configfs 2>/dev/null; mount -t configfs none /sys/kernel/config 2>/dev/null
mkdir -p /dev/misc; for d in dlm-control dlm-monitor dlm_plock; do ln -sf ../$d /dev/misc/$d; done
hostname "$(arg tandem.hostname)"
ip link set lo up
modprobe virtio_rng 2>/dev/null; modprobe virtio_blk 2>/dev/null
if [ "$(arg tandem.scsi)" = 1 ]; then modprobe virtio_scsi; modprobe sd_mod; modprobe sg; fi
IPS=$(arg tandem.ip)
if [ -n "$IPS" ]; then
  modprobe virtio_net; i=0
  for a in $(echo "$IPS" | tr , ' '); do
    for w in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/eth$i ] && break; sleep 0.2; done
    ip addr add "$a" dev eth$i; ip link set eth$i up; i=$((i+1))
  done
fi
if [ "$(arg tandem.out)" = 1 ]; then mkdir -p /out; mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /out; fi
echo TANDEM-VM-READY
cd /
sh "$(arg tandem.script)"
rc=$?
echo "TANDEM-VM-RC=$rc"
sync
echo o > /proc/sysrq-trigger
sleep 10
"#;

/// Modules the initramfs loads before the root exists (paths under `kernel/`).
const EARLY_MODULES: [&str; 5] = [
    "fs/netfs/netfs",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/9p/9p",
    "fs/overlayfs/overlay",
];

/// A prepared guest kernel: image, initramfs and the unpacked module tree.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// Kernel release, e.g. `6.12.117+deb12-amd64`.
    pub release: String,
    /// `vmlinuz` to boot.
    pub image: PathBuf,
    /// The busybox initramfs built for it.
    pub initrd: PathBuf,
    /// Directory holding `<release>/` module trees (bound onto `/usr/lib/modules`).
    pub modules_dir: PathBuf,
}

/// Where downloads, kernels and guest scratch files live.
///
/// `TANDEM_VM_CACHE` if set, else `$XDG_CACHE_HOME/tandem/vm`, else `~/.cache/tandem/vm`.
pub fn cache_dir() -> Result<PathBuf> {
    let dir = if let Some(dir) = std::env::var_os("TANDEM_VM_CACHE") {
        PathBuf::from(dir)
    } else if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(xdg).join("tandem/vm")
    } else {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".cache/tandem/vm")
    };
    fs::create_dir_all(&dir).map_err(|source| TestbedError::Io {
        what: format!("creating cache directory {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

impl GuestKernel {
    /// Prepares (or finds in the cache) the newest Debian 6.12 kernel and its initramfs.
    ///
    /// Safe to call from many tests at once: a file lock makes one of them do the work.
    pub fn prepare() -> Result<Self> {
        let cache = cache_dir()?;
        let lock_file =
            File::create(cache.join(".prepare.lock")).map_err(|source| TestbedError::Io {
                what: "creating the prepare lock".into(),
                source,
            })?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| TestbedError::Io {
                what: "locking the kernel cache".into(),
                source: errno.into(),
            })?;
        require_program("qemu-system-x86_64", "booting guests")?;
        require_program("dpkg", "unpacking the kernel package")?;
        require_program("depmod", "indexing guest modules")?;
        require_program("cpio", "building the initramfs")?;
        require_program("xz", "unpacking early modules")?;
        require_static_busybox()?;

        let package = newest_kernel_package(&cache)?;
        let release = package
            .trim_start_matches("linux-image-")
            .trim_end_matches("-unsigned")
            .to_owned();
        let deb = cache.join(format!("{package}.deb"));
        if !deb.is_file() {
            download_package(&cache, &package, &deb)?;
        }
        let root = cache.join("kernels").join(&release);
        let modules_dir = root.join("lib/modules");
        if !modules_dir.join(&release).join("modules.dep").is_file() {
            unpack_kernel(&deb, &root, &release)?;
        }
        let image = root.join(format!("boot/vmlinuz-{release}"));
        if !image.is_file() {
            return Err(TestbedError::Io {
                what: format!("kernel image {} missing after unpack", image.display()),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let initrd = root.join(format!("initrd-{:016x}.gz", content_hash()));
        if !initrd.is_file() {
            build_initramfs(&root, &release, &initrd)?;
        }
        Ok(Self {
            release,
            image,
            initrd,
            modules_dir,
        })
    }
}

/// Fails with a clear message when `program` is not on `PATH`.
pub(crate) fn require_program(program: &str, purpose: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(TestbedError::MissingProgram {
            program: program.into(),
            purpose: purpose.into(),
        })
    }
}

fn require_static_busybox() -> Result<()> {
    let missing = || TestbedError::MissingProgram {
        program: "busybox (static, package busybox-static)".into(),
        purpose: "the guest initramfs".into(),
    };
    let bytes = fs::read("/bin/busybox").map_err(|_| missing())?;
    // A dynamically linked ELF names its interpreter near the start of the file.
    let head = &bytes[..bytes.len().min(4096)];
    if head.windows(7).any(|w| w == b"ld-linu") {
        return Err(missing());
    }
    Ok(())
}

fn run(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let output = command.output().map_err(|source| TestbedError::Io {
        what: format!("running {shown}"),
        source,
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(TestbedError::CommandFailed {
            command: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The newest `linux-image-6.12.N+deb12-amd64-unsigned` apt knows, or the newest cached.
/// Old point releases vanish from the mirror, so no version is ever pinned.
fn newest_kernel_package(cache: &Path) -> Result<String> {
    let from_apt = run(Command::new("apt-cache").args([
        "search",
        "--names-only",
        r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
    ]))
    .unwrap_or_default();
    let mut names: Vec<String> = from_apt
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        // Offline: fall back to whatever an earlier run downloaded.
        if let Ok(entries) = fs::read_dir(cache) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pkg) = name.strip_suffix(".deb")
                    && pkg.starts_with("linux-image-6.12.")
                {
                    names.push(pkg.to_owned());
                }
            }
        }
    }
    names.sort_by_key(|name| point_release(name));
    names.pop().ok_or_else(|| TestbedError::NoKernelPackage {
        cache: cache.to_path_buf(),
    })
}

/// `linux-image-6.12.117+deb12-...` → 117, for ordering.
fn point_release(package: &str) -> u32 {
    package
        .strip_prefix("linux-image-6.12.")
        .and_then(|rest| rest.split('+').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn download_package(cache: &Path, package: &str, deb: &Path) -> Result<()> {
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(cache))?;
    let entries = fs::read_dir(cache).map_err(|source| TestbedError::Io {
        what: format!("listing {}", cache.display()),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
            return fs::rename(entry.path(), deb).map_err(|source| TestbedError::Io {
                what: format!("renaming {name}"),
                source,
            });
        }
    }
    Err(TestbedError::NoKernelPackage {
        cache: cache.to_path_buf(),
    })
}

fn unpack_kernel(deb: &Path, root: &Path, release: &str) -> Result<()> {
    let staging = PathBuf::from(format!("{}.unpacking", root.display()));
    let _ = fs::remove_dir_all(&staging);
    if let Some(parent) = staging.parent() {
        fs::create_dir_all(parent).map_err(|source| TestbedError::Io {
            what: format!("creating {}", parent.display()),
            source,
        })?;
    }
    run(Command::new("dpkg").arg("-x").arg(deb).arg(&staging))?;
    run(Command::new("depmod").arg("-b").arg(&staging).arg(release))?;
    let _ = fs::remove_dir_all(root);
    fs::rename(&staging, root).map_err(|source| TestbedError::Io {
        what: format!("moving the unpacked kernel to {}", root.display()),
        source,
    })
}

fn content_hash() -> u64 {
    // FNV-1a over the init scripts: editing them rebuilds the initramfs.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in INIT.bytes().chain(STAGE2.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn build_initramfs(root: &Path, release: &str, initrd: &Path) -> Result<()> {
    let staging = root.join("initramfs.staging");
    let _ = fs::remove_dir_all(&staging);
    let io = |what: String| move |source| TestbedError::Io { what, source };
    for dir in [
        "bin", "mods", "proc", "sys", "dev", "host", "newroot", "upper",
    ] {
        fs::create_dir_all(staging.join(dir)).map_err(io(format!("creating initramfs/{dir}")))?;
    }
    fs::copy("/bin/busybox", staging.join("bin/busybox")).map_err(io("copying busybox".into()))?;
    for module in EARLY_MODULES {
        let source = root.join(format!("lib/modules/{release}/kernel/{module}.ko.xz"));
        let name = module.rsplit('/').next().unwrap_or(module);
        let output = Command::new("xz")
            .arg("-dc")
            .arg(&source)
            .output()
            .map_err(io(format!("decompressing {}", source.display())))?;
        if !output.status.success() {
            return Err(TestbedError::CommandFailed {
                command: format!("xz -dc {}", source.display()),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let plain = output.stdout;
        fs::write(staging.join(format!("mods/{name}.ko")), plain)
            .map_err(io(format!("writing module {name}")))?;
    }
    write_executable(&staging.join("init"), INIT)?;
    fs::write(staging.join("stage2"), STAGE2).map_err(io("writing stage2".into()))?;
    let partial = initrd.with_extension("partial");
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc 2>/dev/null | gzip -1 > '{}'",
        staging.display(),
        partial.display()
    );
    run(Command::new("sh").arg("-c").arg(script))?;
    fs::rename(&partial, initrd).map_err(io("installing the initramfs".into()))?;
    let _ = fs::remove_dir_all(&staging);
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).map_err(|source| TestbedError::Io {
        what: format!("writing {}", path.display()),
        source,
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|source| {
        TestbedError::Io {
            what: format!("chmod {}", path.display()),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_point_release_wins() {
        let mut names = [
            "linux-image-6.12.9+deb12-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-unsigned",
            "linux-image-6.12.41+deb12-amd64-unsigned",
        ];
        names.sort_by_key(|n| point_release(n));
        assert_eq!(
            names.last().copied(),
            Some("linux-image-6.12.117+deb12-amd64-unsigned")
        );
    }
}
