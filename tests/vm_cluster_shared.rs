//! Reservation fencing by the cluster on a real shared LUN: tgtd on the host serves one
//! iSCSI LUN that two guests (alpha and beta) reach through QEMU's initiator, each its own
//! I_T nexus; a third guest is the witness. The volume is configured with
//! `shared_devices`, so tandemd unfences (registers its key, reserves WERO) before it
//! joins. Alpha becomes primary; its guest is then cut off the network (QMP set_link);
//! the majority fences alpha's key on the LUN and promotes beta. A writer on alpha that
//! ignores tandem keeps writing to the raw device: once beta is promoted, the LUN refuses
//! every one of those writes (RESERVATION CONFLICT), and the fencing is in the log.
//!
//! Needs QEMU with its iSCSI driver, the guest kernel and tgt; fails, never skips.

use std::process::Command;
use std::time::{Duration, Instant};
use tandem_testbed::{
    Guest, GuestKernel, GuestSpec, IscsiLun, Nic, failure_report, free_tcp_port, scratch_dir,
    workspace_binary,
};

const CONFIG: &str = r#"
[cluster]
name = "vmshared"
secret = "vm-shared-test-secret-0123456789"
heartbeat_ms = 200
failure_timeout_ms = 2000
quorum_lease_ms = 1200
state_dir = "/data/{node}"
control_socket = "/run/tandem/control.sock"
dlm_socket = "/run/tandem/dlm.sock"

[[node]]
id = 1
name = "alpha"
address = "10.98.0.1:7791"
[[node]]
id = 2
name = "beta"
address = "10.98.0.2:7791"
[[node]]
id = 3
name = "witness"
address = "10.98.0.3:7791"
role = "witness"

[[volume]]
name = "shared0"
size = "16M"
nodes = ["alpha", "beta"]
backing = "/dev/sda"
shared_devices = ["/dev/sda"]
preempt = "preempt-and-abort"
"#;

const PRELUDE: &str = r#"
set -e
mkdir -p /data /etc/tandem /run/tandem
printf '%s' "$CONFIG" > /etc/tandem/tandem.toml
for i in $(seq 50); do [ -b /dev/sda ] && break; sleep 0.2; done
# If the daemon ends, the console says how (an OOM kill or a signal leaves nothing in its
# own log; the guest's kernel messages are not on the console either).
( rc=0; $TANDEMD run --config /etc/tandem/tandem.toml --node $NODE > /out/tandemd.log 2>&1 || rc=$?
  echo "TANDEMD-EXITED rc=$rc"; dmesg | tail -15 | sed 's/^/DMESG /' ) &
C="$TANDEMCTL --config /etc/tandem/tandem.toml --node $NODE"
status_json() { $C status --json 2>/dev/null || true; }
is_primary() { status_json | tr -d ' \n' | grep -q "\"name\":\"shared0\",\"primary\":\"$NODE\""; }
"#;

/// Both data guests run this: whoever is primary first becomes the writer (which
/// ignores tandem and writes to the raw device until the LUN refuses); the other waits
/// to take over.
const DATA: &str = r#"
primary_name() { status_json | tr -d ' \n' | sed -n 's/.*"name":"shared0","primary":"\([a-z]*\)".*/\1/p'; }
for i in $(seq 900); do P=$(primary_name); [ -n "$P" ] && break; sleep 0.3; done
[ -n "$P" ] || { echo NO-PRIMARY; tail -30 /out/tandemd.log; exit 1; }
if [ "$P" = "$NODE" ]; then
  echo "WRITER $NODE"
  for i in $(seq 400); do
    if dd if=/dev/zero of=/dev/sda bs=4096 count=1 seek=100 oflag=direct 2>/dev/null; then echo "W-WRITE-OK $i"; else echo "W-WRITE-REFUSED $i"; fi
    sleep 0.3
  done
else
  echo "STANDBY $NODE"
  # As long as it takes: the host bounds the wait from the cut on.
  until is_primary; do sleep 0.2; done
  echo TOOK-OVER
  sg_persist --in --read-keys /dev/sda | sed 's/^/KEYS /'
  status_json > /out/status.json
  dd if=/dev/zero of=/dev/sda bs=4096 count=1 seek=200 oflag=direct 2>/dev/null && echo S-WRITE-OK
  sleep 8
  echo STANDBY-DONE
fi
"#;

#[test]
fn vm_a_cut_off_primary_is_fenced_off_the_shared_lun_before_the_other_is_promoted() {
    let kernel = GuestKernel::prepare().expect("the real-kernel test bed is required");
    let dir = scratch_dir("vm-cluster-shared").expect("scratch dir");
    let tandemd = workspace_binary("tandemd").expect("cargo build --workspace --bins first");
    let tandemctl = workspace_binary("tandemctl").expect("cargo build --workspace --bins first");
    let name = format!("sh{}", std::process::id());
    let created = Command::new(&tandemctl)
        .args([
            "fixture", "create", "tgt", "--name", &name, "--size", "16M", "--json", "--portal",
        ])
        .arg(format!("127.0.0.1:{}", free_tcp_port().unwrap()))
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "tgt fixture: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let fixture: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let url = fixture["url"].as_str().unwrap().to_owned();
    let hub = free_tcp_port().unwrap();
    let guest = |node: &str, ip: &str, body: &str, lun: bool| {
        let mut spec = GuestSpec::new(node, &dir, &format!("{PRELUDE}{body}"))
            .env("CONFIG", CONFIG)
            .env("NODE", node)
            .env("TANDEMD", tandemd.display())
            .env("TANDEMCTL", tandemctl.display())
            .nic(Nic::hub(hub, ip))
            .out_dir(&dir.join(format!("out-{node}")))
            .memory_mib(1024)
            .timeout(Duration::from_secs(900));
        if lun {
            spec = spec.iscsi(IscsiLun {
                initiator_name: format!("iqn.2026-11.org.tandem:vmshared.{node}"),
                url: url.clone(),
            });
        }
        spec
    };
    let witness = Guest::start(
        &kernel,
        &guest("witness", "10.98.0.3/24", "sleep 600", false),
    )
    .unwrap();
    let alpha = Guest::start(&kernel, &guest("alpha", "10.98.0.1/24", DATA, true)).unwrap();
    let beta = Guest::start(&kernel, &guest("beta", "10.98.0.2/24", DATA, true)).unwrap();
    let cleanup = || {
        let _ = Command::new(&tandemctl)
            .args(["fixture", "destroy", &name])
            .output();
    };
    // Whoever is primary first writes; the other stands by.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut writer, standby) = loop {
        if alpha.console().contains("WRITER alpha") {
            break (alpha, beta);
        }
        if beta.console().contains("WRITER beta") {
            break (beta, alpha);
        }
        if Instant::now() > deadline {
            cleanup();
            panic!(
                "no primary\n{}",
                failure_report("tandemd.log", &[&alpha, &beta, &witness])
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    writer
        .wait_for("W-WRITE-OK", Duration::from_secs(60))
        .expect("the primary writes");
    writer.set_link(0, false).unwrap();
    let cut = Instant::now();
    let took_over = standby.wait_for("TOOK-OVER", Duration::from_secs(200));
    let takeover = cut.elapsed();
    let lines_at_takeover = writer.console().lines().count();
    if let Err(e) = took_over {
        cleanup();
        panic!(
            "{e}\n{}",
            failure_report("tandemd.log", &[&standby, &writer, &witness])
        );
    }
    let outcome = standby.wait().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let writer_console = writer.console();
    writer.kill().unwrap();
    drop(witness);
    cleanup();
    outcome.assert_success();
    eprintln!(
        "primary cut off → the other fenced it on the LUN and took over in {takeover:?} (TCG guests)"
    );
    // Every write the cut-off node tried after the takeover was refused by the LUN.
    let after: Vec<&str> = writer_console
        .lines()
        .skip(lines_at_takeover)
        .filter(|l| l.starts_with("W-WRITE"))
        .collect();
    assert!(
        !after.is_empty(),
        "the writer stopped trying: {writer_console}"
    );
    assert!(
        after.iter().all(|l| l.starts_with("W-WRITE-REFUSED")),
        "a fenced node's write landed on the shared LUN: {after:?}"
    );
    assert!(
        outcome.console.contains("S-WRITE-OK"),
        "{}",
        outcome.console
    );
    let keys = outcome.lines_with("KEYS ").join("\n");
    assert!(
        keys.contains("1 registered reservation key"),
        "only the new primary's key may remain: {keys}"
    );
    let standby_name = if outcome.console.contains("STANDBY alpha") {
        "alpha"
    } else {
        "beta"
    };
    let status: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("out-{standby_name}/status.json"))).unwrap(),
    )
    .unwrap();
    let victim = if standby_name == "alpha" { 2 } else { 1 };
    let fencing = status["fencing"].as_array().unwrap();
    let record = fencing
        .iter()
        .find(|f| f["victim"] == victim)
        .unwrap_or_else(|| panic!("no fencing recorded: {status}"));
    assert!(record["method"]["reservation"].is_object(), "{record}");
}
