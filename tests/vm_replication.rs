//! Real kernel clients on a replicated volume, in one Debian 6.12 guest: two
//! `tandemd replica` processes on 127.0.0.1/127.0.0.2 inside the guest, exported once
//! through the kernel's NBD client (`nbd-client`) and once as a ublk device. Each gets
//! mkfs.ext4, a mount, files written, a clean `fsck -n`, and the secondary's backing file
//! must hold the same bytes as the primary's.
//!
//! Needs QEMU and the guest kernel (scripts/install-test-deps); fails, never skips.

use std::time::Duration;
use tandem_testbed::{GuestKernel, GuestSpec, scratch_dir, workspace_binary};

#[test]
fn vm_nbd_and_ublk_devices_carry_ext4_and_the_secondary_is_identical() {
    let kernel = GuestKernel::prepare().expect("the real-kernel test bed is required");
    let dir = scratch_dir("vm-replication").expect("scratch dir");
    let out = dir.join("out");
    let tandemd = workspace_binary("tandemd").expect("cargo build --workspace --bins first");
    let tandemctl = workspace_binary("tandemctl").expect("cargo build --workspace --bins first");
    let script = r#"
set -e
ip link set lo up
modprobe nbd nbds_max=2
modprobe ublk_drv
mkdir -p /data /mnt/fs
mount -t tmpfs -o size=600m tmpfs /data
cd /data
D="$TANDEMD"; C="$TANDEMCTL"

# start_pair NAME PORT EXTRA_A...: two replicas of volume NAME, a primary after the
# initial sync.
start_pair() {
  name=$1; port=$2; shift 2
  truncate -s 80M $name-a.img $name-b.img
  $C create-md --backing $name-a.img --volume $name --node-id 1 > /dev/null
  $C create-md --backing $name-b.img --volume $name --node-id 2 > /dev/null
  unshare -m $D replica --name $name --backing $name-a.img --listen 127.0.0.1:$port \
    --peer 127.0.0.2:$port --control /data/$name-a.sock "$@" > /out/$name-a.log 2>&1 &
  echo $! > /data/$name-a.pid
  $D replica --name $name --backing $name-b.img --listen 127.0.0.2:$port \
    --peer 127.0.0.1:$port --control /data/$name-b.sock > /out/$name-b.log 2>&1 &
  echo $! > /data/$name-b.pid
  for i in $(seq 200); do [ -S /data/$name-a.sock ] && [ -S /data/$name-b.sock ] && break; sleep 0.1; done
  for i in $(seq 200); do $C --socket /data/$name-a.sock replica status $name --json | grep -q '"connection": "connected"' && break; sleep 0.1; done
  $C --socket /data/$name-a.sock replica primary $name --force
  $C --socket /data/$name-b.sock replica sync $name --timeout 120 > /out/$name-initial-sync.txt
}

# exercise DEV NAME: ext4 with files, fsck -n clean.
exercise() {
  dev=$1; name=$2
  mkfs.ext4 -q -F $dev
  mount $dev /mnt/fs
  dd if=/dev/urandom of=/mnt/fs/big bs=1M count=6 2>/dev/null
  for i in $(seq 20); do echo "file $i of $name" > /mnt/fs/small-$i; done
  mkdir /mnt/fs/dir && cp /mnt/fs/big /mnt/fs/dir/copy
  (cd /mnt/fs && sha256sum big dir/copy small-1 small-20) > /out/$name-files.txt
  sync
  umount /mnt/fs
  fsck.ext4 -n -f $dev > /out/$name-fsck.txt 2>&1 && echo "FSCK-CLEAN $name"
  mount -o ro $dev /mnt/fs
  (cd /mnt/fs && sha256sum -c /out/$name-files.txt) > /out/$name-verify.txt && echo "FILES-OK $name"
  umount /mnt/fs
}

# compare NAME: stop both replicas cleanly, compare the data regions.
compare() {
  name=$1
  $C --socket /data/$name-b.sock replica sync $name --timeout 120 > /out/$name-final-sync.txt
  kill $(cat /data/$name-a.pid) $(cat /data/$name-b.pid)
  for i in $(seq 100); do kill -0 $(cat /data/$name-a.pid) 2>/dev/null || kill -0 $(cat /data/$name-b.pid) 2>/dev/null || break; sleep 0.1; done
  size=$($C dump-md $name-a.img --json | sed -n 's/.*"data_size_bytes": \([0-9]*\).*/\1/p')
  a=$(head -c $size $name-a.img | sha256sum | cut -d' ' -f1)
  b=$(head -c $size $name-b.img | sha256sum | cut -d' ' -f1)
  echo "$a $b" > /out/$name-checksums.txt
  [ "$a" = "$b" ] && echo "SECONDARY-IDENTICAL $name"
}

start_pair nv 7101 --nbd 127.0.0.1:10809
nbd-client 127.0.0.1 10809 /dev/nbd0 -N nv -b 4096
exercise /dev/nbd0 nv
nbd-client -d /dev/nbd0
compare nv

start_pair uv 7102 --ublk
for i in $(seq 100); do [ -b /dev/ublkb0 ] && break; sleep 0.1; done
exercise /dev/ublkb0 uv
compare uv
for i in $(seq 100); do [ -b /dev/ublkb0 ] || break; sleep 0.1; done
[ -b /dev/ublkb0 ] || echo "UBLK-REMOVED"
echo VM-REPLICATION-DONE
"#;
    let spec = GuestSpec::new("replication", &dir, script)
        .env("TANDEMD", tandemd.display())
        .env("TANDEMCTL", tandemctl.display())
        .out_dir(&out)
        .timeout(Duration::from_secs(170));
    let outcome = tandem_testbed::run(&kernel, &spec).expect("guest run");
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let logs = format!(
        "nv-a.log:\n{}\nuv-a.log:\n{}\nconsole:\n{}",
        read("nv-a.log"),
        read("uv-a.log"),
        outcome.console
    );
    outcome.assert_success();
    for marker in [
        "FSCK-CLEAN nv",
        "FILES-OK nv",
        "SECONDARY-IDENTICAL nv",
        "FSCK-CLEAN uv",
        "FILES-OK uv",
        "SECONDARY-IDENTICAL uv",
        "UBLK-REMOVED",
        "VM-REPLICATION-DONE",
    ] {
        assert!(outcome.console.contains(marker), "missing {marker}\n{logs}");
    }
    for name in ["nv", "uv"] {
        let fsck = read(&format!("{name}-fsck.txt"));
        assert!(
            !fsck.contains("ERROR") && !fsck.contains("corrupt"),
            "{name}: {fsck}"
        );
        let sums = read(&format!("{name}-checksums.txt"));
        let parts: Vec<&str> = sums.split_whitespace().collect();
        assert_eq!(parts.len(), 2, "{sums}");
        assert_eq!(parts[0], parts[1], "{name}: the secondary differs");
        assert!(read(&format!("{name}-initial-sync.txt")).contains("in sync"));
    }
    assert!(
        read("uv-a.log").contains("ublk device ready"),
        "{}",
        read("uv-a.log")
    );
}

/// One guest running `script` with `$TANDEMD` and `$TANDEMCTL` set and `/out` shared:
/// its outcome, a reader of its `/out` files, and a failure report made of the named
/// `/out` files and the console.
struct GuestRun {
    out: std::path::PathBuf,
    outcome: tandem_testbed::GuestOutcome,
    logs: String,
}

impl GuestRun {
    fn start(
        name: &str,
        script: &str,
        memory_mib: u32,
        timeout: Duration,
        report: &[&str],
    ) -> Self {
        let kernel = GuestKernel::prepare().expect("the real-kernel test bed is required");
        let dir = scratch_dir(&format!("vm-replication-{name}")).expect("scratch dir");
        let out = dir.join("out");
        let tandemd = workspace_binary("tandemd").expect("cargo build --workspace --bins first");
        let tandemctl =
            workspace_binary("tandemctl").expect("cargo build --workspace --bins first");
        let spec = GuestSpec::new(name, &dir, script)
            .env("TANDEMD", tandemd.display())
            .env("TANDEMCTL", tandemctl.display())
            .out_dir(&out)
            .memory_mib(memory_mib)
            .timeout(timeout);
        let outcome = tandem_testbed::run(&kernel, &spec).expect("guest run");
        let mut logs = String::new();
        for file in report {
            let text = std::fs::read_to_string(out.join(file)).unwrap_or_default();
            logs.push_str(&format!("{file}:\n{text}\n"));
        }
        logs.push_str(&format!("console:\n{}", outcome.console));
        Self { out, outcome, logs }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.out.join(file)).unwrap_or_default()
    }

    /// Panics with the report unless the script exited 0 and printed every marker.
    fn assert_printed(&self, markers: &[&str]) {
        assert_eq!(self.outcome.rc, Some(0), "guest failed\n{}", self.logs);
        for marker in markers {
            assert!(
                self.outcome.console.contains(marker),
                "missing {marker}\n{}",
                self.logs
            );
        }
    }
}

/// Issue-12's real-kernel check of the activity-log bound: on a replicated volume of more
/// than 8 GiB exported through ublk, `blkdiscard` of the whole device and `mkfs.ext4`
/// (which discards the whole device first, in pieces of up to the kernel's discard limit,
/// several at a time) once detached the primary's disk. Now the primary stays UpToDate
/// and connected, and `fsck -n` is clean on both copies. The replicas are created
/// `--zeroed` (sparse files): an initial full sync of 8 GiB would take many minutes
/// under TCG and proves nothing here.
#[test]
fn vm_whole_device_discards_and_mkfs_on_an_8_gib_ublk_volume_keep_both_copies_healthy() {
    let script = r#"
set -e
ip link set lo up
modprobe ublk_drv
mkdir -p /data /mnt/fs
# Sparse backing files: only what is written takes memory.
mount -t tmpfs -o size=1400m tmpfs /data
cd /data
D="$TANDEMD"; C="$TANDEMCTL"
truncate -s 8260M big-a.img big-b.img
$C create-md --backing big-a.img --volume big --node-id 1 --zeroed > /dev/null
$C create-md --backing big-b.img --volume big --node-id 2 --zeroed > /dev/null
$D replica --name big --backing big-a.img --listen 127.0.0.1:7103 --peer 127.0.0.2:7103 \
  --control /data/a.sock --ublk > /out/big-a.log 2>&1 &
echo $! > /data/a.pid
$D replica --name big --backing big-b.img --listen 127.0.0.2:7103 --peer 127.0.0.1:7103 \
  --control /data/b.sock > /out/big-b.log 2>&1 &
echo $! > /data/b.pid
for i in $(seq 200); do [ -S /data/a.sock ] && [ -S /data/b.sock ] && break; sleep 0.1; done
healthy() {
  $C --socket /data/a.sock replica status big --json > /out/status-$1.json
  s=$(tr -d ' \n' < /out/status-$1.json)
  for want in '"connection":"connected"' '"disk":"up-to-date"' '"peer_disk":"up-to-date"'; do
    case "$s" in *"$want"*) ;; *) return 1 ;; esac
  done
  echo "HEALTHY $1"
}
for i in $(seq 300); do healthy start > /dev/null && break; sleep 0.1; done
healthy start
$C --socket /data/a.sock replica primary big
for i in $(seq 100); do [ -b /dev/ublkb0 ] && break; sleep 0.1; done
echo "SIZE $(blockdev --getsize64 /dev/ublkb0)"
blkdiscard /dev/ublkb0 && echo BLKDISCARD-OK
healthy after-blkdiscard
mkfs.ext4 -q -F /dev/ublkb0 && echo MKFS-OK
healthy after-mkfs
mount /dev/ublkb0 /mnt/fs
dd if=/dev/urandom of=/mnt/fs/data bs=1M count=8 2>/dev/null
for i in $(seq 20); do echo "file $i" > /mnt/fs/small-$i; done
rm /mnt/fs/small-1*
fstrim -v /mnt/fs > /out/fstrim.txt 2>&1 && echo FSTRIM-OK
umount /mnt/fs
healthy after-fstrim
fsck.ext4 -n -f /dev/ublkb0 > /out/fsck-primary.txt 2>&1 && echo "FSCK-CLEAN primary"
$C --socket /data/b.sock replica sync big --timeout 120 > /out/final-sync.txt
kill $(cat /data/a.pid) $(cat /data/b.pid)
for i in $(seq 100); do kill -0 $(cat /data/a.pid) 2>/dev/null || kill -0 $(cat /data/b.pid) 2>/dev/null || break; sleep 0.1; done
# The secondary's copy, read straight from its backing file (the file system ends where
# the data area does; the metadata after it is not looked at).
fsck.ext4 -n -f /data/big-b.img > /out/fsck-secondary.txt 2>&1 && echo "FSCK-CLEAN secondary"
echo VM-DISCARD-DONE
"#;
    let run = GuestRun::start(
        "discard",
        script,
        2048,
        Duration::from_secs(480),
        &["big-a.log", "big-b.log"],
    );
    run.assert_printed(&[
        "HEALTHY start",
        "BLKDISCARD-OK",
        "HEALTHY after-blkdiscard",
        "MKFS-OK",
        "HEALTHY after-mkfs",
        "FSTRIM-OK",
        "HEALTHY after-fstrim",
        "FSCK-CLEAN primary",
        "FSCK-CLEAN secondary",
        "VM-DISCARD-DONE",
    ]);
    let size: u64 = run
        .outcome
        .lines_with("SIZE ")
        .first()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert!(size >= 8 << 30, "the volume holds {size} bytes, not 8 GiB");
    assert!(
        !run.read("big-a.log").contains("detached"),
        "the primary's disk was detached\n{}",
        run.logs
    );
    assert!(
        run.read("final-sync.txt").contains("in sync"),
        "{}",
        run.logs
    );
}

/// A disk that starts failing: the primary's backing device is a device-mapper target
/// over a loop device, switched to `error` (every I/O fails with EIO) while the volume is
/// in use through ublk. The primary detaches its disk (Diskless), the application's
/// writes and reads go on through the peer without an error. Then the replica dies
/// (SIGKILL) while its disk still fails, so its metadata is left as it was before the
/// failure — Consistent, a generation its peer has moved on from — and the disk comes
/// back (the table restored, a path that flapped): the peer's bitmap of what was written
/// meanwhile, not a comparison of equals, must bring it up to date, and both copies end
/// identical.
#[test]
fn vm_a_primary_whose_disk_fails_goes_diskless_and_the_application_never_sees_an_error() {
    let script = r#"
set -e
ip link set lo up
modprobe ublk_drv
modprobe loop
modprobe dm_mod
mkdir -p /data
mount -t tmpfs -o size=400m tmpfs /data
cd /data
D="$TANDEMD"; C="$TANDEMCTL"
truncate -s 96M a.img b.img
LOOP=$(losetup --find --show a.img)
SECTORS=$(blockdev --getsz $LOOP)
dmsetup create adisk --table "0 $SECTORS linear $LOOP 0"
dmsetup mknodes adisk  # no udev in the guest
$C create-md --backing /dev/mapper/adisk --volume ev --node-id 1 --zeroed > /dev/null
$C create-md --backing b.img --volume ev --node-id 2 --zeroed > /dev/null
start_a() {
  $D replica --name ev --backing /dev/mapper/adisk --listen 127.0.0.1:7104 \
    --peer 127.0.0.2:7104 --control /data/a.sock "$@" >> /out/ev-a.log 2>&1 &
  echo $! > /data/a.pid
  for i in $(seq 200); do [ -S /data/a.sock ] && break; sleep 0.1; done
}
start_a --ublk
$D replica --name ev --backing b.img --listen 127.0.0.2:7104 --peer 127.0.0.1:7104 \
  --control /data/b.sock > /out/ev-b.log 2>&1 &
echo $! > /data/b.pid
for i in $(seq 200); do [ -S /data/b.sock ] && break; sleep 0.1; done
field() { $C --socket /data/$1.sock replica status ev --json | tr -d ' \n' | sed -n "s/.*\"$2\":\"\([a-z-]*\)\".*/\1/p"; }
for i in $(seq 300); do [ "$(field a disk)" = up-to-date ] && [ "$(field a connection)" = connected ] && break; sleep 0.1; done
$C --socket /data/a.sock replica primary ev
for i in $(seq 100); do [ -b /dev/ublkb0 ] && break; sleep 0.1; done
head -c 8M /dev/urandom > first.bin
head -c 8M /dev/urandom > second.bin
dd if=first.bin of=/dev/ublkb0 bs=1M oflag=direct conv=fsync 2>/dev/null && echo WRITE-BEFORE-OK
# The disk under the primary fails: every I/O returns EIO from now on.
dmsetup suspend adisk
dmsetup load adisk --table "0 $SECTORS error"
dmsetup resume adisk
dd if=second.bin of=/dev/ublkb0 bs=1M seek=16 oflag=direct conv=fsync 2>/out/dd-during.txt && echo WRITE-DURING-OK
echo "DISK-AFTER-FAILURE $(field a disk)"
dd if=/dev/ublkb0 of=read1.bin bs=1M count=8 iflag=direct 2>/dev/null
cmp read1.bin first.bin && echo READ-FIRST-OK
dd if=/dev/ublkb0 of=read2.bin bs=1M skip=16 count=8 iflag=direct 2>/dev/null
cmp read2.bin second.bin && echo READ-SECOND-OK
# The replica dies while its disk still fails: nothing more reaches its metadata.
kill -9 $(cat /data/a.pid)
for i in $(seq 100); do kill -0 $(cat /data/a.pid) 2>/dev/null || break; sleep 0.1; done
rm -f /data/a.sock
# The disk is back as it was (a path that flapped), stale metadata and all.
dmsetup suspend adisk
dmsetup load adisk --table "0 $SECTORS linear $LOOP 0"
dmsetup resume adisk
$C dump-md /dev/mapper/adisk --json > /out/md-a-stale.json
grep -q '"consistent": true' /out/md-a-stale.json && echo METADATA-STALE-CONSISTENT
start_a
for i in $(seq 600); do [ "$(field a disk)" = up-to-date ] && [ "$(field a connection)" = connected ] && break; sleep 0.1; done
echo "DISK-AFTER-RETURN $(field a disk)"
$C --socket /data/a.sock replica status ev --json > /out/status-a-end.json
kill $(cat /data/a.pid) $(cat /data/b.pid)
for i in $(seq 100); do kill -0 $(cat /data/a.pid) 2>/dev/null || kill -0 $(cat /data/b.pid) 2>/dev/null || break; sleep 0.1; done
size=$($C dump-md b.img --json | sed -n 's/.*"data_size_bytes": \([0-9]*\).*/\1/p')
a=$(head -c $size /dev/mapper/adisk | sha256sum | cut -d' ' -f1)
b=$(head -c $size b.img | sha256sum | cut -d' ' -f1)
[ "$a" = "$b" ] && echo COPIES-IDENTICAL
dd if=b.img of=peer2.bin bs=1M skip=16 count=8 2>/dev/null
cmp peer2.bin second.bin && echo PEER-HOLDS-SECOND
echo VM-EIO-DONE
"#;
    let run = GuestRun::start(
        "eio",
        script,
        1536,
        Duration::from_secs(300),
        &["ev-a.log", "ev-b.log", "dd-during.txt", "md-a-stale.json"],
    );
    run.assert_printed(&[
        "WRITE-BEFORE-OK",
        "WRITE-DURING-OK",
        "DISK-AFTER-FAILURE diskless",
        "READ-FIRST-OK",
        "READ-SECOND-OK",
        "METADATA-STALE-CONSISTENT",
        "DISK-AFTER-RETURN up-to-date",
        "COPIES-IDENTICAL",
        "PEER-HOLDS-SECOND",
        "VM-EIO-DONE",
    ]);
    assert!(
        run.read("ev-a.log").contains("disk failed; detached"),
        "the primary never reported its disk failure\n{}",
        run.logs
    );
    // The stale disk came back to a bitmap resync, not a full one: the peer's record of
    // what was written meanwhile (and the crashed primary's activity log) did the work.
    assert!(
        run.read("ev-a.log")
            .contains("SyncStarted { source: false, full: false"),
        "the returning disk did not take a bitmap resync\n{}",
        run.logs
    );
}
