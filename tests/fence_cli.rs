//! `tandem-pr` as a process on the build host, against an emulated LU
//! (`emulator:FILE@NEXUS`): the documented exit statuses, JSON output, the fencing tasks and
//! the self-check, without a SAN or a VM.

use serde_json::Value;
use std::process::{Command, Output};
use tandem_testbed::workspace_binary;

struct Lu {
    dir: std::path::PathBuf,
}

impl Lu {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fence-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self { dir }
    }

    fn nexus(&self, n: u16) -> String {
        format!("emulator:{}@{n}", self.dir.join("lu.json").display())
    }
}

impl Drop for Lu {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tandem_pr(args: &[&str]) -> Output {
    Command::new(workspace_binary("tandem-pr").expect("tandem-pr is built"))
        .args(args)
        .output()
        .expect("tandem-pr runs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("tandem-pr exits normally")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(stdout(out).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", stdout(out), stderr(out)))
}

#[test]
fn exit_statuses_are_the_documented_ones() {
    let lu = Lu::new("codes");
    let (a, b, c) = (lu.nexus(0), lu.nexus(1), lu.nexus(2));
    let help = tandem_pr(&["--help"]);
    assert_eq!(code(&help), 0);
    for line in [
        "24  RESERVATION CONFLICT",
        "33  timeout",
        "1  bad arguments",
    ] {
        assert!(stdout(&help).contains(line), "--help lacks `{line}`");
    }
    assert_eq!(code(&tandem_pr(&["-o", "-G", "-S", "a1", &a])), 0);
    assert_eq!(code(&tandem_pr(&["-o", "-G", "-S", "b2", &b])), 0);
    assert_eq!(
        code(&tandem_pr(&["-o", "-R", "-K", "a1", "-T", "5", &a])),
        0
    );
    let conflict = tandem_pr(&["-o", "-R", "-K", "b2", "-T", "5", &b]);
    assert_eq!(code(&conflict), 24, "{}", stderr(&conflict));
    let stranger = tandem_pr(&["-o", "-R", "-K", "c3", "-T", "5", &c]);
    assert_eq!(
        code(&stranger),
        24,
        "a stranger conflicts with the reservation"
    );
    let illegal = tandem_pr(&["-o", "-P", "-K", "b2", "-S", "0", "-T", "5", &b]);
    assert_eq!(code(&illegal), 5, "{}", stderr(&illegal));
    assert!(stderr(&illegal).contains("Invalid field in parameter list"));
    let bad_key = tandem_pr(&["-o", "-G", "-S", "0x112233445566778899", &a]);
    assert_eq!(code(&bad_key), 1);
    assert!(stderr(&bad_key).contains("longer than 8 bytes"));
    assert_eq!(code(&tandem_pr(&["-o", "-G", &a, &b])), 1, "two devices");
    assert_eq!(code(&tandem_pr(&["--in", "--out", "-k", &a])), 1);
    let missing = tandem_pr(&["-k", "/nonexistent/sdz"]);
    assert_eq!(code(&missing), 15);
    assert!(stderr(&missing).contains("/nonexistent/sdz"));
    // A PREEMPT leaves the victim a UNIT ATTENTION, reported once.
    assert_eq!(
        code(&tandem_pr(&[
            "-o", "-P", "-K", "b2", "-S", "a1", "-T", "5", &b
        ])),
        0
    );
    let ua = tandem_pr(&["-n", "-k", &a]);
    assert_eq!(code(&ua), 6, "{}", stderr(&ua));
    assert_eq!(code(&tandem_pr(&["-n", "-k", &a])), 0);
}

#[test]
fn fencing_tasks_and_the_self_check() {
    let lu = Lu::new("tasks");
    let (a, b) = (lu.nexus(0), lu.nexus(1));
    let key_a = stdout(&tandem_pr(&[
        "derive-key",
        "--cluster-id",
        "c1",
        "--node-id",
        "1",
        "--incarnation",
        "4",
    ]));
    let key_a = key_a.trim();
    let unfence = tandem_pr(&[
        "unfence",
        &a,
        "--cluster-id",
        "c1",
        "--node-id",
        "1",
        "--incarnation",
        "4",
        "--json",
    ]);
    assert_eq!(code(&unfence), 0, "{}", stderr(&unfence));
    let record = json(&unfence);
    assert_eq!(record["reserved"], true);
    assert_eq!(
        record["key"]
            .as_str()
            .unwrap()
            .trim_start_matches("0x")
            .trim_start_matches('0'),
        key_a.trim_start_matches("0x")
    );
    assert_eq!(code(&tandem_pr(&["unfence", &b, "--key", "b2"])), 0);
    let status = tandem_pr(&["status", &a, "--cluster-id", "c1"]);
    assert!(
        stdout(&status).contains("tandem node 1, incarnation 4"),
        "{}",
        stdout(&status)
    );

    // The self-check of node A runs while node B fences it. Fence only once it has seen
    // the key (the host may be busy).
    let mut watch = Command::new(workspace_binary("tandem-pr").unwrap())
        .args([
            "watch",
            a.as_str(),
            "--key",
            key_a,
            "--period-ms",
            "100",
            "--json",
        ])
        .args(["--exit-on-loss", "--duration-ms", "30000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "confirmed", "{first}");
    let fence = tandem_pr(&["fence", &b, "--key", "b2", "--victim", key_a, "--json"]);
    assert_eq!(code(&fence), 0, "{}", stderr(&fence));
    let record = json(&fence);
    assert_eq!(record["method"], "preempt-and-abort");
    assert_eq!(record["whom"]["node_id"], 1);
    assert_eq!(record["whom"]["incarnation"], 4);
    let events: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert_eq!(
        watch.wait().unwrap().code(),
        Some(37),
        "watch exits 37 when the key is lost"
    );
    let lost = events
        .iter()
        .find(|e| e["event"] == "key-lost")
        .unwrap_or_else(|| panic!("no key-lost event: {events:?}"));
    assert!(lost["time_ms"].as_u64().unwrap() >= record["time_ms"].as_u64().unwrap());
    let gap = lost["time_ms"].as_u64().unwrap() - lost["last_seen_ms"].as_u64().unwrap();
    // The checks run every 100 ms; allow for a busy host.
    assert!(gap <= 1000, "noticed {gap} ms after the last good check");

    let verify_a = tandem_pr(&["verify", &a, "--key", key_a]);
    assert_eq!(code(&verify_a), 36, "{}", stdout(&verify_a));
    assert!(stdout(&verify_a).contains("not registered"));
    assert_eq!(code(&tandem_pr(&["verify", &b, "--key", "b2"])), 0);
    let again = tandem_pr(&["fence", &b, "--key", "b2", "--victim", key_a, "--json"]);
    assert_eq!(json(&again)["method"], "already-gone");
    // The fenced node may not fence: exit 37, own key missing.
    let zombie = tandem_pr(&["fence", &a, "--key", key_a, "--victim", "b2"]);
    assert_eq!(code(&zombie), 37, "{}", stderr(&zombie));
    assert_eq!(code(&tandem_pr(&["leave", &b, "--key", "b2"])), 0);
    let keys = tandem_pr(&["-n", "-k", "--json", &a]);
    assert!(json(&keys)["keys"].as_array().unwrap().is_empty());
}
