//! The test bed's multi-guest features, on real kernels: two guests on a socket-netdev
//! link with addresses the test assigns, a partition through QMP `set_link`, one raw
//! image shared by both guests, and one PR-capable iSCSI LUN (tgtd on the host) that
//! both reach through QEMU's own initiator, each as its own I_T nexus.
//!
//! Needs QEMU (with the iSCSI block driver), the guest kernel and tgt; fails, never skips.

use std::process::Command;
use std::time::Duration;
use tandem_testbed::{
    Guest, GuestKernel, GuestSpec, IscsiLun, Nic, free_tcp_port, scratch_dir, workspace_binary,
};

const GUEST_A: &str = r#"
printf 'TANDEM-SHARED-MARKER' | dd of=/dev/vda bs=4096 conv=sync oflag=direct 2>/dev/null
echo A-WROTE
sg_persist --out --register --param-sark=0xaa /dev/sda > /dev/null && echo A-REGISTERED
# Stay up until the partition drill is over.
for i in $(seq 600); do [ -e /tmp/never ] && break; sleep 0.2; done
"#;

const GUEST_B: &str = r#"
for i in $(seq 300); do busybox ping -c1 -W1 10.77.0.1 > /dev/null 2>&1 && break; sleep 0.2; done
busybox ping -c1 -W1 10.77.0.1 > /dev/null && echo PING-OK
for i in $(seq 300); do busybox ping -c1 -W1 10.77.0.1 > /dev/null 2>&1 || break; sleep 0.2; done
echo PING-LOST
for i in $(seq 300); do busybox ping -c1 -W1 10.77.0.1 > /dev/null 2>&1 && break; sleep 0.2; done
busybox ping -c1 -W1 10.77.0.1 > /dev/null && echo PING-BACK
for i in $(seq 300); do dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | grep -q TANDEM-SHARED-MARKER && break; sleep 0.2; done
dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | grep -q TANDEM-SHARED-MARKER && echo SHARED-OK
sg_persist --out --register --param-sark=0xbb /dev/sda > /dev/null && echo B-REGISTERED
for i in $(seq 100); do sg_persist --in -k /dev/sda | grep -q 0xaa && break; sleep 0.2; done
sg_persist --in -k /dev/sda | sed 's/^/KEYS /'
"#;

#[test]
fn vm_two_guests_share_a_link_a_disk_and_a_pr_lun() {
    let kernel = GuestKernel::prepare().expect("the real-kernel test bed is required");
    let dir = scratch_dir("vm-testbed").expect("scratch dir");
    let shared = dir.join("shared.img");
    std::fs::File::create(&shared)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    // A PR-capable LUN both guests reach: tgtd on the host, through QEMU's initiator.
    let tandemctl = workspace_binary("tandemctl").expect("cargo build --workspace --bins first");
    let portal_port = free_tcp_port().unwrap();
    let name = format!("tb{}", std::process::id());
    let created = Command::new(&tandemctl)
        .args([
            "fixture", "create", "tgt", "--name", &name, "--size", "16M", "--json",
        ])
        .arg("--portal")
        .arg(format!("127.0.0.1:{portal_port}"))
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "tgt fixture: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let fixture: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let url = fixture["url"].as_str().unwrap().to_owned();

    let link = free_tcp_port().unwrap();
    let a = GuestSpec::new("a", &dir, GUEST_A)
        .nic(Nic::listen(link, "10.77.0.1/24"))
        .disk(&shared)
        .iscsi(IscsiLun {
            initiator_name: "iqn.2026-11.org.tandem:guest-a".into(),
            url: url.clone(),
        })
        .timeout(Duration::from_secs(240));
    let b = GuestSpec::new("b", &dir, GUEST_B)
        .nic(Nic::connect(link, "10.77.0.2/24"))
        .disk(&shared)
        .iscsi(IscsiLun {
            initiator_name: "iqn.2026-11.org.tandem:guest-b".into(),
            url,
        })
        .timeout(Duration::from_secs(240));
    let mut guest_a = Guest::start(&kernel, &a).unwrap();
    let guest_b = Guest::start(&kernel, &b).unwrap();
    let fail = |what: &str, e: tandem_testbed::TestbedError, ga: &Guest| -> ! {
        panic!("{what}: {e}\nguest a:\n{}", ga.console())
    };
    if let Err(e) = guest_b.wait_for("PING-OK", Duration::from_secs(120)) {
        fail("no link", e, &guest_a);
    }
    guest_a.set_link(0, false).unwrap();
    if let Err(e) = guest_b.wait_for("PING-LOST", Duration::from_secs(60)) {
        fail("set_link down did not cut the link", e, &guest_a);
    }
    guest_a.set_link(0, true).unwrap();
    if let Err(e) = guest_b.wait_for("PING-BACK", Duration::from_secs(60)) {
        fail("set_link up did not restore the link", e, &guest_a);
    }
    let outcome = guest_b.wait().unwrap();
    guest_a.kill().unwrap();
    let _ = Command::new(&tandemctl)
        .args(["fixture", "destroy", &name])
        .output();
    outcome.assert_success();
    assert!(
        outcome.console.contains("SHARED-OK"),
        "b never saw a's write on the shared image:\n{}",
        outcome.console
    );
    assert!(
        guest_a.console().contains("A-REGISTERED"),
        "a: {}",
        guest_a.console()
    );
    assert!(
        outcome.console.contains("B-REGISTERED"),
        "{}",
        outcome.console
    );
    let keys = outcome.lines_with("KEYS ").join("\n");
    assert!(
        keys.contains("0xaa") && keys.contains("0xbb"),
        "each guest is its own nexus on the LUN: {keys}"
    );
}
