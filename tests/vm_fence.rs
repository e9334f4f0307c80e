//! Fencing on real targets in the Debian 6.12 guest: `tandem-pr` against sg_persist, the
//! fence scenario on LIO tcm_loop (plain PREEMPT), LIO iSCSI (PREEMPT AND ABORT) and tgtd
//! (PREEMPT AND ABORT refused, PREEMPT fallback), multipath, NVMe, the stuck target, the
//! fence latency benchmark, and the differential test of the emulator against LIO.
//!
//! These need QEMU and the Debian 6.12 kernel (`./scripts/test` installs both); without
//! them they fail with the reason, they never skip. `TANDEM_LONG=1` runs thousands of
//! differential sequences instead of hundreds.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem_testbed::{GuestKernel, GuestOutcome, GuestSpec, scratch_dir, workspace_binary};

/// Shell helpers every guest script starts with.
const PRELUDE: &str = r#"
P="$TANDEM_PR"
T="$TANDEMCTL"
dev() { sed -n 's/.*"device": "\(.*\)".*/\1/p' "$1" | sed -n "${2}p"; }
initiator() { sed -n 's/.*"initiator": "naa\.\(.*\)".*/\1/p' "$1" | sed -n "${2}p"; }
# Read until no UNIT ATTENTION is pending for this nexus.
drain() { for i in 1 2 3 4 5 6; do "$P" -n -k "$1" >/dev/null 2>&1; [ $? -ne 6 ] && return 0; done; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
"#;

struct Run {
    outcome: GuestOutcome,
    out: PathBuf,
}

impl Run {
    fn text(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.join(name)).unwrap_or_else(|e| {
            panic!(
                "guest did not write {name}: {e}; console:\n{}",
                self.outcome.console
            )
        })
    }

    fn json(&self, name: &str) -> Value {
        let text = self.text(name);
        serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("{name} is not JSON ({e}): {text}"))
    }

    /// Exit status the guest recorded in `name` (a file holding a number).
    fn rc(&self, name: &str) -> i32 {
        let text = self.text(name);
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: `{text}` is not an exit status"))
    }
}

fn boot(name: &str, script: &str, timeout: Duration) -> Run {
    let kernel = GuestKernel::prepare().expect("the real-kernel test bed is required");
    let dir = scratch_dir(name).expect("a scratch directory for the guest");
    let out = dir.join("out");
    let spec = GuestSpec::new(name, &dir, &format!("{PRELUDE}\n{script}"))
        .env(
            "TANDEM_PR",
            workspace_binary("tandem-pr")
                .expect("tandem-pr is built")
                .display(),
        )
        .env(
            "TANDEMCTL",
            workspace_binary("tandemctl")
                .expect("tandemctl is built")
                .display(),
        )
        .env(
            "TANDEM_LONG",
            std::env::var("TANDEM_LONG").unwrap_or_default(),
        )
        .out_dir(&out)
        .timeout(timeout);
    let outcome = tandem_testbed::run(&kernel, &spec).expect("the guest boots");
    outcome.assert_success();
    Run { outcome, out }
}

/// Checks the fence scenario files written by `SCENARIO` under prefix `p`: the fence
/// record, the victim's failed and the survivor's successful O_DIRECT writes, and the
/// victim's self-check noticing within one period.
fn check_fence_scenario(run: &Run, p: &str, method: &str, period_ms: u64) -> Value {
    let record = run.json(&format!("{p}-fence.json"));
    assert_eq!(record["method"], method, "{record}");
    assert_eq!(record["key"], "0x00000000000000a1", "{record}");
    assert_eq!(record["who"], "0x00000000000000b2", "{record}");
    assert_eq!(
        record["reservation"]["key"], "0x00000000000000b2",
        "{record}"
    );
    assert_eq!(record["reservation"]["type_code"], 5, "{record}");

    let before = run.json(&format!("{p}-write-a-before.json"));
    assert_eq!(
        before["ok"], true,
        "A could write before the fence: {before}"
    );
    let after = run.json(&format!("{p}-write-a-after.json"));
    assert_eq!(after["ok"], false, "{after}");
    assert_eq!(after["reservation_conflict"], true, "{after}");
    assert_eq!(
        after["errno"], 52,
        "EBADE is the block layer's reservation conflict: {after}"
    );
    assert_eq!(run.rc(&format!("{p}-write-a-after.rc")), 24);
    let dd = run.text(&format!("{p}-dd-a.err"));
    assert!(
        dd.contains("Invalid exchange"),
        "dd O_DIRECT as the victim: {dd}"
    );
    let b = run.json(&format!("{p}-write-b.json"));
    assert_eq!(b["ok"], true, "the survivor must write: {b}");

    // The victim's self-check, reading every `period_ms`.
    let events: Vec<Value> = run
        .text(&format!("{p}-watch.jsonl"))
        .lines()
        .map(|l| serde_json::from_str(l).expect("watch prints JSON lines"))
        .collect();
    assert_eq!(
        run.rc(&format!("{p}-watch.rc")),
        37,
        "watch exits 37 on loss"
    );
    let lost = events
        .iter()
        .find(|e| e["event"] == "key-lost")
        .unwrap_or_else(|| panic!("the victim's self-check never noticed: {events:?}"));
    let lost_at = lost["time_ms"].as_u64().expect("key-lost has time_ms");
    let last_seen = lost["last_seen_ms"]
        .as_u64()
        .expect("the key was seen before it was lost");
    let fenced_at = record["time_ms"].as_u64().expect("the record has time_ms");
    assert!(
        lost_at >= fenced_at,
        "loss seen before the fence: {lost} {record}"
    );
    assert!(
        lost_at - last_seen <= period_ms + 300,
        "not noticed within one period ({period_ms} ms): last seen {last_seen}, lost {lost_at}"
    );
    eprintln!(
        "{p}: fence -> self-check noticed after {} ms (period {period_ms} ms)",
        lost_at - fenced_at
    );

    assert_eq!(
        run.rc(&format!("{p}-verify-a.rc")),
        36,
        "the victim's verify fails"
    );
    assert_eq!(
        run.rc(&format!("{p}-verify-b.rc")),
        0,
        "the survivor's verify passes"
    );
    let again = run.json(&format!("{p}-fence-again.json"));
    assert_eq!(
        again["method"], "already-gone",
        "fencing is idempotent: {again}"
    );
    record
}

/// The fence scenario: A unfences and holds WERO, B unfences, A's self-check runs, B
/// fences A. `$A`/`$B` are the two nexuses, `$PFX` the file prefix, `$FLAVOUR` the preempt
/// flavour.
const SCENARIO: &str = r#"
"$P" unfence "$A" --key a1 --json > /out/$PFX-unfence-a.json
"$P" unfence "$B" --key b2 --json > /out/$PFX-unfence-b.json
("$P" watch "$A" --key a1 --period-ms 1000 --json --exit-on-loss --duration-ms 60000 \
    > /out/$PFX-watch.jsonl 2>/out/$PFX-watch.err; echo $? > /out/$PFX-watch.rc) &
WATCH=$!
for i in $(seq 1 100); do grep -q confirmed /out/$PFX-watch.jsonl 2>/dev/null && break; sleep 0.2; done
"$P" probe-write "$A" --json > /out/$PFX-write-a-before.json
"$P" fence "$B" --key b2 --victim a1 --flavour $FLAVOUR --timeout-ms 8000 --json > /out/$PFX-fence.json 2>/out/$PFX-fence.err
echo $? > /out/$PFX-fence.rc
"$P" probe-write "$A" --json > /out/$PFX-write-a-after.json; echo $? > /out/$PFX-write-a-after.rc
dd if=/dev/zero of="$A" bs=4096 count=1 oflag=direct 2> /out/$PFX-dd-a.err
"$P" probe-write "$B" --json > /out/$PFX-write-b.json
wait $WATCH
drain "$A"
"$P" verify "$A" --key a1 > /out/$PFX-verify-a.txt; echo $? > /out/$PFX-verify-a.rc
"$P" verify "$B" --key b2 > /out/$PFX-verify-b.txt; echo $? > /out/$PFX-verify-b.rc
"$P" fence "$B" --key b2 --victim a1 --flavour $FLAVOUR --json > /out/$PFX-fence-again.json
"#;

/// tandem-pr and sg_persist on a 3-nexus tcm_loop LU: every read identical after every
/// operation (whichever tool made it), the same exit codes for refused commands; then the
/// fence scenario with plain PREEMPT, the block-layer ioctls, bad input, the fence latency
/// benchmark, and PREEMPT AND ABORT on tcm_loop reported as a stuck target.
#[test]
fn vm_fence_tcm_loop_matches_sg_persist_and_fences() {
    let script = r#"
set -u
mkdir -p /out/agree
"$T" fixture create lio-loop --name pr0 --nexuses 3 --json > /out/fixture.json
A=$(dev /out/fixture.json 1); B=$(dev /out/fixture.json 2); C=$(dev /out/fixture.json 3)
AID=$(initiator /out/fixture.json 1); BID=$(initiator /out/fixture.json 2)
N=0
# Both tools read every view through nexus $1; the host compares the files.
compare() {
  N=$((N + 1)); tag=$(printf '%02d-%s' $N "$2"); drain "$1"
  for f in -k -r -s -c "-H -k" "-H -s"; do
    name=$(echo "$f" | tr -d ' -')
    "$P" -n $f "$1" > /out/agree/$tag.$name.tandem 2>&1
    sg_persist -n $f "$1" > /out/agree/$tag.$name.sg 2>&1
  done
}
# A PR OUT through one tool (after draining the issuing nexus); its status goes to the log.
op() { tool=$1; shift; for last in "$@"; do :; done; drain "$last"; if [ "$tool" = sg ]; then sg_persist -n "$@" >/dev/null 2>&1; else "$P" -n "$@" >/dev/null 2>&1; fi; echo "$tool $* -> $?" >> /out/ops.log; }
# A refused command through both tools; both statuses go to the log.
both() { name=$1; shift; for last in "$@"; do :; done; drain "$last"; "$P" -n "$@" >/dev/null 2>&1; t=$?; sg_persist -n "$@" >/dev/null 2>&1; s=$?; echo "$name $t $s" >> /out/refused.log; }
compare "$A" empty
"$P" "$A" > /out/agree/inquiry.tandem; sg_persist "$A" > /out/agree/inquiry.sg
op sg --out --register --param-sark=a1 "$A"; compare "$A" register-sg
op tandem --out --register --param-sark=b2 "$B"; compare "$B" register-tandem
op tandem --out --register-ignore --param-sark=c3 "$C"; compare "$C" register-ignore
op sg --out --reserve --param-rk=a1 --prout-type=5 "$A"; compare "$B" reserve-wero
op tandem --out --register --param-rk=b2 --param-sark=b9 --param-aptpl "$B"; compare "$B" change-key-aptpl
both reserve-conflict --out --reserve --param-rk=b9 --prout-type=6 "$B"
both wrong-key --out --register --param-rk=ff --param-sark=1 "$A"
both preempt-zero-key --out --preempt --param-rk=b9 --param-sark=0 --prout-type=5 "$B"
both short-allocation --in -l 4 -k "$A"
op sg --out --release --param-rk=a1 --prout-type=5 "$A"; compare "$B" release
op tandem --out --reserve --param-rk=a1 --prout-type=7 "$A"; compare "$C" all-registrants
op tandem --out --release --param-rk=a1 --prout-type=7 "$A"; compare "$A" release-all
op sg --out --reserve --param-rk=b9 --prout-type=6 "$B"; compare "$A" reserve-earo
op tandem --out --preempt --param-rk=c3 --param-sark=b9 --prout-type=5 "$C"; compare "$C" preempt
op sg --out --register-move --param-rk=c3 --param-sark=a5 --prout-type=5 --relative-target-port=0 --transport-id=sas,$AID "$C"; compare "$A" register-move
op tandem --out --clear --param-rk=a5 "$A"; compare "$A" clear
both not-registered --out --reserve --param-rk=0 --prout-type=5 "$B"
op sg --out --register --param-sark=d4 --transport-id=sas,$BID "$A"; compare "$B" spec-i-pt-sg
op tandem --out --register --param-sark=e5 --param-alltgpt "$C"; compare "$C" all-tg-pt
op tandem --out --register --param-sark=d6 --param-rk=d4 "$B"; compare "$A" change-after-spec
op sg --out --clear --param-rk=d4 "$A"; compare "$A" cleared

# The block-layer ioctls: register (the kernel adds APTPL), reserve, preempt, clear.
drain "$A"; drain "$B"
"$P" --transport ioctl -n -o -G -S a1 "$A"; echo "register $?" > /out/ioctl.log
"$P" --transport ioctl -n -o -G -S b2 "$B"; echo "register $?" >> /out/ioctl.log
"$P" -n -c --json "$A" > /out/ioctl-caps.json
"$P" --transport ioctl -n -o -R -K a1 -T 5 "$A"; echo "reserve $?" >> /out/ioctl.log
"$P" --transport ioctl -n -o -R -K b2 -T 5 "$B"; echo "reserve-other $?" >> /out/ioctl.log
"$P" --transport ioctl -n -o -P -K b2 -S a1 -T 5 "$B"; echo "preempt $?" >> /out/ioctl.log
"$P" -n -r --json "$B" > /out/ioctl-reservation.json
"$P" --transport ioctl -n -o -C -K b2 "$B"; echo "clear $?" >> /out/ioctl.log
drain "$A"; drain "$B"; drain "$C"

# Bad input: never a panic, always a reason and the documented status.
"$P" -k /dev/null > /out/bad-null.out 2>&1; echo $? > /out/bad-null.rc
"$P" -o -G -S 0x12345678901234567 "$A" > /out/bad-key.out 2>&1; echo $? > /out/bad-key.rc
"$P" -o -R -K a1 "$A" > /out/bad-type.out 2>&1; echo $? > /out/bad-type.rc
"$P" -n -o -G -S 1 "$A"; "$P" -n -o -G -S 2 "$B"
"$P" -n -m 12 -k --json "$A" > /out/truncated.json 2>&1; echo $? > /out/truncated.rc
"$P" -n -o -C -K 1 "$A"; drain "$B"

# The fence scenario, plain PREEMPT (PREEMPT AND ABORT deadlocks tcm_loop).
A="$A" B="$B" PFX=loop FLAVOUR=preempt
{SCENARIO}

# Fence latency: in-process vs sg_persist subprocesses (fence_scsi's way).
"$P" leave "$B" --key b2 > /dev/null; drain "$A"; drain "$B"
"$P" bench-fence --fencer "$B" --victim-device "$A" --rounds 8 --flavour preempt --json > /out/bench.json 2>/out/bench.err
"$T" fixture destroy pr0 > /dev/null

# PREEMPT AND ABORT on tcm_loop, even with direct submission asked for: the fence call
# must come back as a timeout (a stuck target is a fence failure). The stuck command keeps
# its thread, so the process is not waited for.
"$T" fixture create lio-loop --name pa --nexuses 2 --direct-submit --json > /out/pa-fixture.json
PA=$(dev /out/pa-fixture.json 1); PB=$(dev /out/pa-fixture.json 2)
cat /sys/kernel/config/target/core/*/pa/attrib/submit_type > /out/pa-submit-type 2>&1
"$P" unfence "$PA" --key a1 > /dev/null; "$P" unfence "$PB" --key b2 > /dev/null
start=$(now_ms)
"$P" fence "$PB" --key b2 --victim a1 --flavour abort --timeout-ms 3000 > /out/pa.out 2> /out/pa.err &
for i in $(seq 1 40); do grep -q stuck /out/pa.err 2>/dev/null && break; sleep 0.5; done
echo $(( $(now_ms) - start )) > /out/pa-elapsed-ms
for p in /proc/[0-9]*; do grep -q "core_tmr_lun_reset" $p/stack 2>/dev/null && { cat $p/comm; cat $p/stack; } >> /out/pa-stacks.txt; done
echo DONE
"#
    .replace("{SCENARIO}", SCENARIO);
    let run = boot("fence-loop", &script, Duration::from_secs(240));

    // Every read, after every operation, is byte for byte what sg_persist prints.
    let dir = run.out.join("agree");
    let mut pairs = 0;
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sg"))
        .collect();
    names.sort();
    for sg in names {
        let tandem = sg.with_extension("tandem");
        let a = std::fs::read_to_string(&tandem).unwrap();
        let b = std::fs::read_to_string(&sg).unwrap();
        assert_eq!(
            a,
            b,
            "{} differs from sg_persist's output",
            tandem.file_name().unwrap().to_string_lossy()
        );
        pairs += 1;
    }
    assert!(pairs >= 6 * 17, "only {pairs} comparisons");
    let agree = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    assert!(agree("04-register-ignore.k.sg").contains("3 registered reservation keys follow"));
    assert!(agree("05-reserve-wero.r.sg").contains("Write Exclusive, registrants only"));
    assert!(agree("06-change-key-aptpl.c.sg").contains("(PTPL_A): 1"));
    assert!(agree("08-all-registrants.r.sg").contains("Key=0x0"));
    assert!(agree("12-register-move.r.sg").contains("Key=0xa5"));
    assert!(agree("13-clear.k.sg").contains("there are NO registered reservation keys"));
    assert!(agree("14-spec-i-pt-sg.k.sg").contains("2 registered reservation keys"));
    assert!(agree("15-all-tg-pt.s.sg").contains("All target ports bit set"));
    let ops = run.text("ops.log");
    for line in ops.lines() {
        assert!(line.ends_with("-> 0"), "an operation failed: {line}\n{ops}");
    }
    let refused = run.text("refused.log");
    for (name, status) in [
        ("reserve-conflict", 24),
        ("wrong-key", 24),
        ("preempt-zero-key", 5),
        ("short-allocation", 5),
        ("not-registered", 2),
    ] {
        let line = refused
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not run: {refused}"));
        assert_eq!(
            line,
            format!("{name} {status} {status}"),
            "tandem-pr and sg_persist must refuse alike"
        );
    }

    // Block-layer ioctls: the sd driver sets APTPL itself; status 24 comes back as a
    // reservation conflict.
    let ioctl = run.text("ioctl.log");
    assert_eq!(
        ioctl, "register 0\nregister 0\nreserve 0\nreserve-other 24\npreempt 0\nclear 0\n",
        "{ioctl}"
    );
    assert_eq!(
        run.json("ioctl-caps.json")["capabilities"]["persist_through_power_loss_active"],
        true
    );
    assert_eq!(
        run.json("ioctl-reservation.json")["reservation"]["key"],
        "0x00000000000000b2"
    );

    assert_eq!(run.rc("bad-null.rc"), 15);
    assert!(run.text("bad-null.out").contains("character device"));
    assert_eq!(run.rc("bad-key.rc"), 1);
    assert!(run.text("bad-key.out").contains("longer than 8 bytes"));
    assert_eq!(run.rc("bad-type.rc"), 1);
    assert!(run.text("bad-type.out").contains("--prout-type"));
    assert_eq!(run.rc("truncated.rc"), 0);
    assert_eq!(
        run.json("truncated.json")["truncated"],
        true,
        "12 bytes of READ KEYS cannot hold every key"
    );

    check_fence_scenario(&run, "loop", "preempt", 1000);

    let bench = run.json("bench.json");
    let inproc = bench["median_in_process_ms"].as_f64().unwrap();
    let sub = bench["median_sg_persist_ms"].as_f64().unwrap();
    assert_eq!(bench["in_process_ms"].as_array().unwrap().len(), 8);
    assert!(inproc > 0.0 && sub > 0.0, "{bench}");
    eprintln!(
        "fence latency on tcm_loop (TCG guest): in-process {inproc:.2} ms, sg_persist subprocesses {sub:.2} ms, ratio {:.1}x",
        bench["ratio"].as_f64().unwrap()
    );

    // PREEMPT AND ABORT on tcm_loop: reported as a stuck target, not a hang.
    let pa = run.text("pa.err");
    assert!(
        pa.contains("PREEMPT AND ABORT") && pa.contains("no answer within 3000 ms"),
        "{pa}"
    );
    let elapsed: u64 = run.text("pa-elapsed-ms").trim().parse().unwrap();
    assert!(
        elapsed < 15_000,
        "the fence call took {elapsed} ms to give up"
    );
    eprintln!(
        "PREEMPT AND ABORT on tcm_loop (submit_type {}): fence failed as stuck after {elapsed} ms; stuck in:\n{}",
        run.text("pa-submit-type").trim(),
        run.text("pa-stacks.txt")
    );
}

/// LIO's iSCSI target takes PREEMPT AND ABORT: the fence scenario with it.
#[test]
fn vm_fence_lio_iscsi_preempt_and_abort() {
    let script = format!(
        r#"
"$T" fixture create lio-iscsi --name isc --nexuses 2 --json > /out/fixture.json
A=$(dev /out/fixture.json 1) B=$(dev /out/fixture.json 2) PFX=iscsi FLAVOUR=abort
"$P" -n -s "$A" > /out/status.tandem; sg_persist -n -s "$A" > /out/status.sg
{SCENARIO}
"$P" -n -s "$A" > /out/after.tandem; sg_persist -n -s "$A" > /out/after.sg
"$T" fixture destroy isc > /dev/null
echo DONE
"#
    );
    let run = boot("fence-iscsi", &script, Duration::from_secs(180));
    check_fence_scenario(&run, "iscsi", "preempt-and-abort", 1000);
    assert_eq!(run.text("after.tandem"), run.text("after.sg"));
    assert!(
        run.text("after.sg")
            .contains("iSCSI world wide unique port id"),
        "{}",
        run.text("after.sg")
    );
}

/// tgtd (the userspace iSCSI target) refuses PREEMPT AND ABORT with ILLEGAL REQUEST: the
/// policy falls back to PREEMPT and says so. tgtd runs in the guest with two open-iscsi
/// logins (two initiator names).
#[test]
fn vm_fence_tgtd_falls_back_to_preempt() {
    let script = format!(
        r#"
for m in iscsi_tcp sd_mod sg; do modprobe $m; done
ip link set lo up
mkdir -p /run/tgtd /tmp/tgt /run/lock/iscsi /etc/iscsi
truncate -s 64M /tmp/tgt/lun.img
tgtd --iscsi portal=127.0.0.1:3260 > /tmp/tgtd.log 2>&1
for i in $(seq 1 50); do tgtadm --lld iscsi --op show --mode sys > /dev/null 2>&1 && break; sleep 0.1; done
tgtadm --lld iscsi --op new --mode target --tid 1 -T iqn.2026-11.org.tandem:tgtvm
tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b /tmp/tgt/lun.img
tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL
echo "InitiatorName=iqn.2026-11.org.tandem:default" > /etc/iscsi/initiatorname.iscsi
iscsid; sleep 1
for n in a b; do
  iscsiadm -m iface -I if$n -o new > /dev/null
  iscsiadm -m iface -I if$n -o update -n iface.initiatorname -v iqn.2026-11.org.tandem:node$n > /dev/null
done
iscsiadm -m discovery -t st -p 127.0.0.1 -I ifa -I ifb > /dev/null
iscsiadm -m node -T iqn.2026-11.org.tandem:tgtvm -p 127.0.0.1 --login > /dev/null
for i in $(seq 1 50); do [ $(iscsiadm -m session -P3 | grep -c "Attached scsi disk") -ge 2 ] && break; sleep 0.2; done
disk() {{ echo /dev/$(iscsiadm -m session -P3 | awk -v want=$1 '/Iface Name:/{{i=$3}} /Attached scsi disk/{{if(i==want)print $4}}'); }}
A=$(disk ifa) B=$(disk ifb) PFX=tgt FLAVOUR=abort
echo "A=$A B=$B"
"$P" -c "$A" > /out/caps.tandem; sg_persist -c "$A" > /out/caps.sg
{SCENARIO}
"$P" -n -k "$B" > /out/keys.tandem; sg_persist -n -k "$B" > /out/keys.sg
"$P" -n -r "$B" > /out/res.tandem; sg_persist -n -r "$B" > /out/res.sg
"$P" -n -s "$B" > /out/full.tandem 2>&1; echo $? > /out/full.rc
iscsiadm -m node --logoutall=all > /dev/null 2>&1
echo DONE
"#
    );
    let run = boot("fence-tgt", &script, Duration::from_secs(180));
    let record = check_fence_scenario(&run, "tgt", "preempt-after-abort-refused", 1000);
    assert!(
        record["refusal"]
            .as_str()
            .unwrap()
            .contains("Illegal Request"),
        "{record}"
    );
    for (t, s) in [
        ("caps.tandem", "caps.sg"),
        ("keys.tandem", "keys.sg"),
        ("res.tandem", "res.sg"),
    ] {
        assert_eq!(run.text(t), run.text(s), "{t}");
    }
    assert!(
        run.text("caps.sg").contains("IET"),
        "{}",
        run.text("caps.sg")
    );
    // tgt has no READ FULL STATUS: a clear ILLEGAL REQUEST, exit status 5.
    assert_eq!(run.rc("full.rc"), 5);
    assert!(run.text("full.tandem").contains("Illegal Request"));
}

/// Multipath (dm-multipath over two tcm_loop nexuses = node A's two paths) and NVMe
/// (nvmet: no reservations in 6.12).
#[test]
fn vm_fence_multipath_and_nvme() {
    let script = r#"
"$T" fixture create lio-loop --name mp --nexuses 3 --json > /out/fixture.json
A0=$(dev /out/fixture.json 1); A1=$(dev /out/fixture.json 2); B=$(dev /out/fixture.json 3)
modprobe dm_multipath
SECTORS=$(blockdev --getsz "$A0")
dmsetup create mpa --uuid mpath-tandem-test --table "0 $SECTORS multipath 0 0 1 1 round-robin 0 2 1 $A0 1000 $A1 1000"
dmsetup mknodes mpa  # no udev in the guest
MP=/dev/mapper/mpa
"$P" unfence "$MP" --key a1 --json > /out/mp-unfence.json; echo $? > /out/mp-unfence.rc
"$P" unfence "$B" --key b2 > /dev/null
"$P" -n -s --json "$B" > /out/mp-full.json
"$P" -n -k "$MP" > /out/mp-keys.txt; echo $? > /out/mp-keys.rc
"$P" probe-write "$MP" --json > /out/mp-write-before.json
"$P" fence "$B" --key b2 --victim a1 --flavour preempt --json > /out/mp-fence.json
"$P" probe-write "$A0" --json > /out/mp-write-a0.json
"$P" probe-write "$A1" --json > /out/mp-write-a1.json
"$P" -n -s --json "$B" > /out/mp-full-after.json
# The same through the block layer: dm forwards IOC_PR_REGISTER to every path.
drain "$A0"; drain "$A1"
"$P" --transport ioctl unfence "$MP" --key a2 --json > /out/mp-ioctl-unfence.json 2>&1; echo $? > /out/mp-ioctl.rc
"$P" -n -s --json "$B" > /out/mp-ioctl-full.json
dmsetup remove mpa
"$T" fixture destroy mp > /dev/null

"$T" fixture create nvmet --name nv --nexuses 1 --json > /out/nvmet.json
NV=$(dev /out/nvmet.json 1)
"$P" -k "$NV" > /out/nv-keys.out 2>&1; echo $? > /out/nv-keys.rc
"$P" -c "$NV" > /out/nv-caps.out 2>&1; echo $? > /out/nv-caps.rc
"$P" unfence "$NV" --key a1 > /out/nv-unfence.out 2>&1; echo $? > /out/nv-unfence.rc
"$P" --transport ioctl -o -G -S a1 "$NV" > /out/nv-ioctl.out 2>&1; echo $? > /out/nv-ioctl.rc
"$P" -k "${NV%n1}" > /out/nv-ctrl.out 2>&1; echo $? > /out/nv-ctrl.rc
"$T" fixture destroy nv > /dev/null
echo DONE
"#;
    let run = boot("fence-mp-nvme", script, Duration::from_secs(180));
    let unfence = run.json("mp-unfence.json");
    assert_eq!(run.rc("mp-unfence.rc"), 0, "{unfence}");
    assert_eq!(unfence["paths"].as_array().unwrap().len(), 2, "{unfence}");
    let full = run.json("mp-full.json");
    let regs = full["registrations"].as_array().unwrap();
    assert_eq!(
        regs.iter()
            .filter(|r| r["key"] == "0x00000000000000a1")
            .count(),
        2,
        "node A's key is registered through both paths: {full}"
    );
    assert_eq!(run.rc("mp-keys.rc"), 0);
    assert_eq!(run.json("mp-write-before.json")["ok"], true);
    assert_eq!(run.json("mp-fence.json")["method"], "preempt");
    for path in ["mp-write-a0.json", "mp-write-a1.json"] {
        let w = run.json(path);
        assert_eq!(w["reservation_conflict"], true, "every path is fenced: {w}");
    }
    let after = run.json("mp-full-after.json");
    assert!(!after.to_string().contains("0x00000000000000a1"), "{after}");
    assert_eq!(
        run.rc("mp-ioctl.rc"),
        0,
        "{}",
        run.text("mp-ioctl-unfence.json")
    );
    assert_eq!(
        run.json("mp-ioctl-unfence.json")["paths"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "through the block layer the map is one device"
    );
    let ioctl_full = run.json("mp-ioctl-full.json");
    assert_eq!(
        ioctl_full["registrations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["key"] == "0x00000000000000a2")
            .count(),
        2,
        "{ioctl_full}"
    );

    // nvmet in 6.12 implements no reservations: a clear "not supported", exit status 9.
    assert_eq!(run.json("nvmet.json")["reservations"]["supported"], false);
    for name in ["nv-keys", "nv-caps"] {
        assert_eq!(
            run.rc(&format!("{name}.rc")),
            9,
            "{}",
            run.text(&format!("{name}.out"))
        );
        let text = run.text(&format!("{name}.out"));
        assert!(
            text.contains("does not implement NVMe reservations") && text.contains("ONCS"),
            "{text}"
        );
    }
    assert!(run.text("nv-keys.out").contains("Invalid Command Opcode"));
    let unfence = run.text("nv-unfence.out");
    assert_ne!(run.rc("nv-unfence.rc"), 0);
    assert!(
        unfence.contains("does not implement NVMe reservations"),
        "{unfence}"
    );
    assert_eq!(run.rc("nv-ioctl.rc"), 9, "{}", run.text("nv-ioctl.out"));
    assert!(run.text("nv-ioctl.out").contains("EINVAL"));
    assert_eq!(run.rc("nv-ctrl.rc"), 15);
    assert!(
        run.text("nv-ctrl.out").contains("namespace"),
        "{}",
        run.text("nv-ctrl.out")
    );
}

fn differential_counts(summary: &Value) -> (u64, u64, u64) {
    (
        summary["sequences"].as_u64().expect("sequences"),
        summary["steps"].as_u64().expect("steps"),
        summary["commands_compared"]
            .as_u64()
            .expect("commands_compared"),
    )
}

fn good(summary: &Value, op: &str) -> u64 {
    summary["coverage"][op]["good"].as_u64().unwrap_or(0)
}

/// The emulator against LIO: the same random PR command sequences from three nexuses,
/// compared after every step (status, sense, keys, generation, holder, type, full status),
/// on tcm_loop and on the iSCSI target (which also takes PREEMPT AND ABORT).
#[test]
fn vm_fence_differential_emulator_vs_lio() {
    let long = std::env::var("TANDEM_LONG").is_ok_and(|v| v == "1");
    let script = r#"
LOOP_SEQ=300; ISCSI_SEQ=60
[ "$TANDEM_LONG" = 1 ] && { LOOP_SEQ=3000; ISCSI_SEQ=600; }
"$T" fixture create lio-loop --name dl --nexuses 3 --json > /out/loop.json
"$P" differential --devices $(dev /out/loop.json 1),$(dev /out/loop.json 2),$(dev /out/loop.json 3) \
  --sequences $LOOP_SEQ --steps 12 --seed 1 --summary /out/diff-loop.json > /dev/null 2> /out/diff-loop.err
echo $? > /out/diff-loop.rc
"$T" fixture destroy dl > /dev/null
"$T" fixture create lio-iscsi --name di --nexuses 3 --json > /out/iscsi.json
"$P" differential --devices $(dev /out/iscsi.json 1),$(dev /out/iscsi.json 2),$(dev /out/iscsi.json 3) \
  --sequences $ISCSI_SEQ --steps 12 --seed 100000 --preempt-and-abort --summary /out/diff-iscsi.json > /dev/null 2> /out/diff-iscsi.err
echo $? > /out/diff-iscsi.rc
"$T" fixture destroy di > /dev/null
echo DONE
"#;
    let timeout = if long { 1800 } else { 240 };
    let run = boot("fence-diff", script, Duration::from_secs(timeout));
    let mut total = (0, 0, 0);
    for name in ["loop", "iscsi"] {
        let summary = run.json(&format!("diff-{name}.json"));
        let mismatches = summary["mismatches"].as_array().unwrap();
        assert!(
            mismatches.is_empty(),
            "the emulator and LIO ({name}) disagree; replay with --seed <seed> --sequences 1:\n{}",
            serde_json::to_string_pretty(mismatches).unwrap()
        );
        assert_eq!(
            run.rc(&format!("diff-{name}.rc")),
            0,
            "{}",
            run.text(&format!("diff-{name}.err"))
        );
        let (seq, steps, cmds) = differential_counts(&summary);
        eprintln!(
            "differential {name}: {seq} sequences, {steps} steps, {cmds} commands compared in {} ms, no mismatch; overruns past ALLOCATION LENGTH: {}",
            summary["elapsed_ms"], summary["target_overruns"]
        );
        total = (total.0 + seq, total.1 + steps, total.2 + cmds);
    }
    let min_sequences = if long { 3000 } else { 300 };
    assert!(total.0 >= min_sequences, "{total:?}");

    // The sequences reached every kind of outcome, so the agreement means something.
    let lo = run.json("diff-loop.json");
    let is = run.json("diff-iscsi.json");
    for op in [
        "register",
        "register-and-ignore-existing-key",
        "reserve",
        "release",
        "clear",
        "preempt",
        "write-10",
        "read-10",
    ] {
        assert!(
            good(&lo, op) > 0,
            "no successful {op} on tcm_loop: {}",
            lo["coverage"]
        );
    }
    assert!(good(&is, "preempt-and-abort") > 0, "{}", is["coverage"]);
    assert!(
        good(&lo, "register-and-move") + good(&is, "register-and-move") > 0,
        "no successful REGISTER AND MOVE"
    );
    let outcomes = lo["coverage"].to_string();
    for outcome in [
        "conflict",
        "ua-2a/",
        "check-5-24/00",
        "check-5-26/00",
        "check-2-08/00",
    ] {
        assert!(outcomes.contains(outcome), "no {outcome} seen: {outcomes}");
    }
    assert!(Path::new(&run.out.join("diff-loop.json")).exists());
}
