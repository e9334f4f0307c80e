//! The tgtd fixture on the build host: `tandemctl fixture create tgt` starts tgtd on
//! 127.0.0.1 with a file-backed LUN that libiscsi's `iscsi-inq` (a real initiator) reads.

use std::process::Command;
use tandem_testbed::workspace_binary;

fn tandemctl(args: &[&str]) -> std::process::Output {
    Command::new(workspace_binary("tandemctl").expect("tandemctl is built"))
        .args(args)
        .output()
        .expect("run tandemctl")
}

#[test]
fn tgt_fixture_answers_iscsi_inq_and_is_idempotent() {
    // A portal of its own, so this test never meets another tgtd user on :3260.
    let portal = "127.0.0.1:3271";
    let _ = tandemctl(&["fixture", "destroy", "hostinq"]);
    let created = tandemctl(&[
        "fixture", "create", "tgt", "--name", "hostinq", "--size", "16M", "--portal", portal,
        "--json",
    ]);
    assert!(
        created.status.success(),
        "tgt fixture failed (tgt and libiscsi-bin are installed by ./scripts/test): {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let fixture: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let url = fixture["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&format!("iscsi://{portal}/")), "{url}");

    let inq = Command::new("iscsi-inq")
        .arg(&url)
        .output()
        .expect("iscsi-inq (package libiscsi-bin) must be installed");
    let text = String::from_utf8_lossy(&inq.stdout);
    assert!(
        inq.status.success(),
        "iscsi-inq failed: {text} {}",
        String::from_utf8_lossy(&inq.stderr)
    );
    assert!(text.contains("DIRECT_ACCESS"), "{text}");

    let again = tandemctl(&[
        "fixture", "create", "tgt", "--name", "hostinq", "--size", "16M", "--portal", portal,
        "--json",
    ]);
    assert!(again.status.success());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&again.stdout).unwrap(),
        fixture
    );

    let clash = tandemctl(&[
        "fixture", "create", "tgt", "--name", "hostinq", "--size", "32M", "--portal", portal,
    ]);
    assert!(!clash.status.success());
    assert!(String::from_utf8_lossy(&clash.stderr).contains("already used"));

    let bad_portal = tandemctl(&[
        "fixture",
        "create",
        "tgt",
        "--name",
        "far",
        "--portal",
        "192.0.2.1:3260",
    ]);
    assert!(!bad_portal.status.success());
    assert!(String::from_utf8_lossy(&bad_portal.stderr).contains("127.0.0.0/8"));

    let destroyed = tandemctl(&["fixture", "destroy", "hostinq"]);
    assert!(destroyed.status.success());
    let gone = Command::new("iscsi-inq").arg(&url).output().unwrap();
    assert!(
        !gone.status.success(),
        "the LUN is still served after destroy"
    );
}
