//! Real-kernel smoke tests: the guest boots, the modules tandem relies on load, and the
//! PR-capable fixtures work with the real clients (sg3-utils' sg_persist, open-iscsi).
//!
//! These need QEMU and the Debian 6.12 kernel (./scripts/test installs both). Without them
//! they fail with the reason; they never skip.

use std::time::Duration;
use tandem_testbed::{GuestKernel, GuestSpec, scratch_dir, workspace_binary};

fn kernel() -> GuestKernel {
    GuestKernel::prepare().expect("the real-kernel test bed is required")
}

#[test]
fn vm_guest_boots_and_cluster_modules_load() {
    let kernel = kernel();
    let dir = scratch_dir("vm-boot").unwrap();
    let script = r#"
uname -r
for m in ublk_drv target_core_mod tcm_loop iscsi_target_mod iscsi_tcp dlm gfs2 ocfs2 nbd nvmet nvme_loop dm_flakey nfsd; do
  modprobe $m && echo "MODULE-OK $m" || echo "MODULE-FAIL $m"
done
[ -c /dev/ublk-control ] && echo "NODE-OK ublk-control"
[ -c /dev/misc/dlm-control ] && echo "NODE-OK dlm-control"
[ -b /dev/nbd0 ] && echo "NODE-OK nbd0"
[ -d /sys/kernel/config/target ] && echo "NODE-OK configfs-target"
mountpoint -q /dev/shm && echo "NODE-OK dev-shm"
"#;
    let spec = GuestSpec::new("boot", &dir, script).timeout(Duration::from_secs(180));
    let outcome = tandem_testbed::run(&kernel, &spec).unwrap();
    outcome.assert_success();
    let loaded = outcome.lines_with("MODULE-OK ");
    for module in [
        "ublk_drv",
        "target_core_mod",
        "tcm_loop",
        "iscsi_target_mod",
        "dlm",
        "gfs2",
        "ocfs2",
        "nbd",
        "nvmet",
    ] {
        assert!(
            loaded.iter().any(|m| m == module),
            "module {module} did not load; console:\n{}",
            outcome.console
        );
    }
    let nodes = outcome.lines_with("NODE-OK ");
    for node in [
        "ublk-control",
        "dlm-control",
        "nbd0",
        "configfs-target",
        "dev-shm",
    ] {
        assert!(
            nodes.iter().any(|n| n == node),
            "{node} missing in the guest; console:\n{}",
            outcome.console
        );
    }
    assert!(
        outcome.console.contains(&kernel.release),
        "guest runs another kernel than {}",
        kernel.release
    );
    eprintln!(
        "guest boot time (QEMU start to script start): {:?}",
        outcome.boot_time.expect("boot time")
    );
}

/// A 2-nexus tcm_loop fixture made by `tandemctl fixture`; sg_persist registers a key
/// through each nexus and reads both back. The LIO iSCSI and nvmet fixtures are created
/// and destroyed in the same guest; bad requests are refused and leave nothing behind.
#[test]
fn vm_fixtures_serve_persistent_reservations_to_sg_persist() {
    let kernel = kernel();
    let dir = scratch_dir("vm-fixtures").unwrap();
    let out = dir.join("out");
    let tandemctl = workspace_binary("tandemctl").unwrap();
    let script = r#"
set -e
T="$TANDEMCTL"
$T fixture create lio-loop --name pr0 --nexuses 2 --json > /out/lio-loop.json
DA=$(sed -n 's/.*"device": "\(.*\)".*/\1/p' /out/lio-loop.json | sed -n 1p)
DB=$(sed -n 's/.*"device": "\(.*\)".*/\1/p' /out/lio-loop.json | sed -n 2p)
echo "DEVICES $DA $DB"
sg_persist --out --register --param-sark=0xa1 "$DA"
sg_persist --out --register --param-sark=0xb2 "$DB"
sg_persist --in --read-keys "$DA" > /out/keys-a.txt
sg_persist --in --read-keys "$DB" > /out/keys-b.txt
sg_persist --out --reserve --param-rk=0xa1 --prout-type=5 "$DA"
sg_persist --in --read-reservation "$DB" > /out/reservation.txt
# idempotent: the same request returns the same fixture
$T fixture create lio-loop --name pr0 --nexuses 2 --json > /out/lio-loop-again.json
# a different shape under the same name is refused
if $T fixture create lio-loop --name pr0 --nexuses 3 2> /out/name-in-use.err; then echo "UNEXPECTED name reuse accepted"; exit 1; fi
# a missing backing file is refused and nothing is created
if $T fixture create lio-loop --name bad --backing /nonexistent.img 2> /out/backing.err; then echo "UNEXPECTED missing backing accepted"; exit 1; fi
ls /sys/kernel/config/target/core/ > /out/core-after-bad.txt
$T fixture create lio-iscsi --name isc --nexuses 2 --json > /out/lio-iscsi.json
IA=$(sed -n 's/.*"device": "\(.*\)".*/\1/p' /out/lio-iscsi.json | sed -n 1p)
IB=$(sed -n 's/.*"device": "\(.*\)".*/\1/p' /out/lio-iscsi.json | sed -n 2p)
sg_persist --out --register --param-sark=0xc3 "$IA"
sg_persist --out --register --param-sark=0xd4 "$IB"
sg_persist --in --read-keys "$IA" > /out/iscsi-keys.txt
$T fixture create tgt --name tg --nexuses 2 --portal 127.0.0.1:3261 --json > /out/tgt.json
TA=$(sed -n 's/.*"device": "\(.*\)".*/\1/p' /out/tgt.json | sed -n 1p)
TB=$(sed -n 's/.*"device": "\(.*\)".*/\1/p' /out/tgt.json | sed -n 2p)
sg_persist --out --register --param-sark=0xe5 "$TA"
sg_persist --out --register --param-sark=0xf6 "$TB"
sg_persist --in --read-keys "$TA" > /out/tgt-keys.txt
$T fixture destroy tg
$T fixture create nvmet --name nv --nexuses 1 --json > /out/nvmet.json
$T fixture list --json > /out/list.json
$T fixture destroy nv
$T fixture destroy isc
$T fixture destroy pr0
$T fixture destroy pr0 > /out/destroy-again.txt
ls /sys/kernel/config/target/core/ > /out/core-after-destroy.txt
ls /sys/kernel/config/target/loopback/ > /out/loopback-after-destroy.txt 2>&1 || true
echo FIXTURES-DONE
"#;
    let spec = GuestSpec::new("fixtures", &dir, script)
        .env("TANDEMCTL", tandemctl.display())
        .out_dir(&out)
        .timeout(Duration::from_secs(300));
    let outcome = tandem_testbed::run(&kernel, &spec).unwrap();
    outcome.assert_success();
    let read = |name: &str| {
        std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| {
            panic!(
                "guest did not write {name}: {e}; console:\n{}",
                outcome.console
            )
        })
    };

    let fixture: serde_json::Value = serde_json::from_str(&read("lio-loop.json")).unwrap();
    let nexuses = fixture["nexuses"].as_array().unwrap();
    assert_eq!(nexuses.len(), 2, "{fixture}");
    assert_ne!(nexuses[0]["device"], nexuses[1]["device"]);
    assert_ne!(nexuses[0]["initiator"], nexuses[1]["initiator"]);
    assert_eq!(fixture["reservations"]["supported"], true);
    let again: serde_json::Value = serde_json::from_str(&read("lio-loop-again.json")).unwrap();
    assert_eq!(
        again, fixture,
        "a repeated create must return the same fixture"
    );

    for keys in [read("keys-a.txt"), read("keys-b.txt")] {
        assert!(keys.contains("2 registered reservation keys"), "{keys}");
        assert!(keys.contains("0xa1") && keys.contains("0xb2"), "{keys}");
    }
    let reservation = read("reservation.txt");
    assert!(reservation.contains("Key=0xa1"), "{reservation}");
    assert!(
        reservation.contains("Write Exclusive, registrants only"),
        "{reservation}"
    );

    assert!(
        read("name-in-use.err").contains("already used"),
        "{}",
        read("name-in-use.err")
    );
    assert!(
        read("backing.err").contains("/nonexistent.img"),
        "{}",
        read("backing.err")
    );
    assert_eq!(
        read("core-after-bad.txt").matches("fileio_").count(),
        1,
        "a refused fixture left a backstore beside pr0's: {}",
        read("core-after-bad.txt")
    );

    let iscsi: serde_json::Value = serde_json::from_str(&read("lio-iscsi.json")).unwrap();
    assert_eq!(iscsi["nexuses"].as_array().unwrap().len(), 2, "{iscsi}");
    let iscsi_keys = read("iscsi-keys.txt");
    assert!(
        iscsi_keys.contains("0xc3") && iscsi_keys.contains("0xd4"),
        "{iscsi_keys}"
    );

    let tgt: serde_json::Value = serde_json::from_str(&read("tgt.json")).unwrap();
    assert_eq!(tgt["nexuses"].as_array().unwrap().len(), 2, "{tgt}");
    let tgt_keys = read("tgt-keys.txt");
    assert!(
        tgt_keys.contains("0xe5") && tgt_keys.contains("0xf6"),
        "{tgt_keys}"
    );

    let nvmet: serde_json::Value = serde_json::from_str(&read("nvmet.json")).unwrap();
    assert_eq!(nvmet["nexuses"].as_array().unwrap().len(), 1, "{nvmet}");
    assert_eq!(
        nvmet["reservations"]["supported"], false,
        "6.12's nvmet has no reservations: {nvmet}"
    );
    assert!(
        nvmet["reservations"]["note"]
            .as_str()
            .unwrap()
            .contains("ONCS"),
        "{nvmet}"
    );

    let list: serde_json::Value = serde_json::from_str(&read("list.json")).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    assert!(read("destroy-again.txt").contains("does not exist"));
    assert!(
        !read("core-after-destroy.txt").contains("fileio_"),
        "destroy left a backstore: {}",
        read("core-after-destroy.txt")
    );
    assert!(!read("loopback-after-destroy.txt").contains("naa."));
}
