//! The cluster on real kernels: three guests (alpha and beta with ublk-backed replicated
//! volumes, a witness) on one virtual segment. ext4 is mounted on the primary by the
//! volume's mount resource; files are written; the primary guest is killed outright
//! (SIGKILL to QEMU); the survivor fences, promotes, mounts, and every file written
//! before the kill is there with the same checksum, on a filesystem `fsck -n` finds
//! clean.
//!
//! Needs QEMU and the guest kernel (scripts/install-test-deps); fails, never skips.

use std::time::{Duration, Instant};
use tandem_testbed::{
    Guest, GuestKernel, GuestSpec, Nic, failure_report, free_tcp_port, scratch_dir,
    workspace_binary,
};

const CONFIG: &str = r#"
[cluster]
name = "vmcluster"
secret = "vm-cluster-test-secret-0123456789"
heartbeat_ms = 200
failure_timeout_ms = 2000
quorum_lease_ms = 1200
state_dir = "/data/{node}"
control_socket = "/run/tandem/control.sock"
dlm_socket = "/run/tandem/dlm.sock"

[[node]]
id = 1
name = "alpha"
address = "10.99.0.1:7791"
[[node]]
id = 2
name = "beta"
address = "10.99.0.2:7791"
[[node]]
id = 3
name = "witness"
address = "10.99.0.3:7791"
role = "witness"

[[volume]]
name = "vol0"
size = "96M"
nodes = ["alpha", "beta"]
backing = "/data/{node}/vol0.img"
ublk = true
[[volume.resource]]
kind = "mount"
device = "/dev/ublkb0"
mountpoint = "/mnt/data"
fstype = "ext4"
"#;

/// Common start of every guest: the configuration, then tandemd in the background.
const PRELUDE: &str = r#"
set -e
modprobe ublk_drv
mkdir -p /data /etc/tandem /run/tandem
mount -t tmpfs -o size=400m tmpfs /data
printf '%s' "$CONFIG" > /etc/tandem/tandem.toml
$TANDEMD run --config /etc/tandem/tandem.toml --node $NODE > /out/tandemd.log 2>&1 &
echo $! > /run/tandemd.pid
C="$TANDEMCTL --config /etc/tandem/tandem.toml --node $NODE"
status_json() { $C status --json 2>/dev/null || true; }
is_primary() { status_json | tr -d ' \n' | grep -q "\"name\":\"vol0\",\"primary\":\"$NODE\""; }
"#;

const PRIMARY: &str = r#"
# Wait to be primary with the volume mounted by the mount resource.
for i in $(seq 600); do is_primary && mountpoint -q /mnt/data && break; sleep 0.5; done
mountpoint -q /mnt/data || { echo "NEVER-MOUNTED"; status_json; cat /out/tandemd.log | tail -30; exit 1; }
# mkfs happens before the first mount: the resource found no filesystem? Then make one.
dd if=/dev/urandom of=/mnt/data/big bs=1M count=8 2>/dev/null
for i in $(seq 30); do echo "file $i written by $NODE before the kill" > /mnt/data/small-$i; done
mkdir -p /mnt/data/dir && cp /mnt/data/big /mnt/data/dir/copy
sync
(cd /mnt/data && sha256sum big dir/copy small-1 small-30) > /out/files.txt
cat /out/files.txt | sed 's/^/SUM /'
echo WROTE
# Protocol C: everything synced is on the peer. Now wait to be killed.
sleep 600
"#;

// The survivor waits for as long as it takes: the kill comes whenever alpha has written,
// which on a loaded machine can be minutes after boot. The host bounds the wait from the
// kill on (and the guest's own timeout bounds everything).
const SURVIVOR: &str = r#"
until is_primary && mountpoint -q /mnt/data; do sleep 0.2; done
echo TAKEN-OVER
status_json > /out/status.json
(cd /mnt/data && sha256sum big dir/copy small-1 small-30) | sed 's/^/SUM /'
cat /mnt/data/small-7
umount /mnt/data
fsck.ext4 -n -f /dev/ublkb0 > /out/fsck.txt 2>&1 && echo FSCK-CLEAN
kill $(cat /run/tandemd.pid)
for i in $(seq 50); do kill -0 $(cat /run/tandemd.pid) 2>/dev/null || break; sleep 0.2; done
echo SURVIVOR-DONE
"#;

const WITNESS: &str = r#"
sleep 900
"#;

#[test]
fn vm_killing_the_primary_guest_moves_ext4_to_the_survivor_intact() {
    let kernel = GuestKernel::prepare().expect("the real-kernel test bed is required");
    let dir = scratch_dir("vm-cluster").expect("scratch dir");
    let tandemd = workspace_binary("tandemd").expect("cargo build --workspace --bins first");
    let tandemctl = workspace_binary("tandemctl").expect("cargo build --workspace --bins first");
    let hub = free_tcp_port().expect("a port");
    let guest = |name: &str, ip: &str, body: &str| {
        // The first mount needs a filesystem: alpha (the initial primary) makes one as
        // soon as its ublk device exists, before tandemd mounts it.
        let mkfs = if name == "alpha" {
            "for i in $(seq 600); do is_primary && [ -b /dev/ublkb0 ] && break; sleep 0.5; done\n\
             # tandemd's mount resource keeps trying (and briefly opens the device):\n\
             # retry until the filesystem is made or mounted.\n\
             for i in $(seq 40); do mountpoint -q /mnt/data && break; mkfs.ext4 -q -F /dev/ublkb0 && break; sleep 0.5; done\n"
        } else {
            ""
        };
        GuestSpec::new(name, &dir, &format!("{PRELUDE}{mkfs}{body}"))
            .env("CONFIG", CONFIG)
            .env("NODE", name)
            .env("TANDEMD", tandemd.display())
            .env("TANDEMCTL", tandemctl.display())
            .nic(Nic::hub(hub, ip))
            .out_dir(&dir.join(format!("out-{name}")))
            .memory_mib(1024)
            .timeout(Duration::from_secs(1200))
    };
    let witness = Guest::start(&kernel, &guest("witness", "10.99.0.3/24", WITNESS)).unwrap();
    let mut alpha = Guest::start(&kernel, &guest("alpha", "10.99.0.1/24", PRIMARY)).unwrap();
    let beta = Guest::start(&kernel, &guest("beta", "10.99.0.2/24", SURVIVOR)).unwrap();

    alpha
        .wait_for("WROTE", Duration::from_secs(600))
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{}",
                failure_report("tandemd.log", &[&alpha, &beta, &witness])
            )
        });
    // Let the last writes' replication settle (protocol C acknowledges only when both
    // replicas have them; sync returned, so they are there already).
    std::thread::sleep(Duration::from_secs(1));
    let sums: Vec<String> = alpha
        .console()
        .lines()
        .filter_map(|l| l.strip_prefix("SUM "))
        .map(str::to_owned)
        .collect();
    assert_eq!(sums.len(), 4, "alpha's checksums: {}", alpha.console());
    alpha.kill().unwrap();
    let killed = Instant::now();
    let line = beta.wait_for("TAKEN-OVER", Duration::from_secs(300));
    let takeover = killed.elapsed();
    line.unwrap_or_else(|e| {
        panic!(
            "{e}\n{}",
            failure_report("tandemd.log", &[&beta, &witness, &alpha])
        )
    });
    let outcome = beta.wait().unwrap();
    drop(witness);
    outcome.assert_success();
    eprintln!(
        "primary guest killed → survivor promoted and mounted ext4 in {takeover:?} (TCG guests)"
    );
    let survivor_sums = outcome.lines_with("SUM ");
    assert_eq!(survivor_sums, sums, "files differ on the survivor");
    assert!(
        outcome
            .console
            .contains("file 7 written by alpha before the kill"),
        "{}",
        outcome.console
    );
    assert!(
        outcome.console.contains("FSCK-CLEAN"),
        "fsck -n found problems: {}",
        outcome.console
    );
    let status = std::fs::read_to_string(dir.join("out-beta/status.json")).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["volumes"][0]["primary"], "beta");
    let fencing = status["fencing"].as_array().unwrap();
    assert!(
        fencing.iter().any(|f| f["victim"] == 1),
        "no fencing of alpha recorded: {status}"
    );
}
