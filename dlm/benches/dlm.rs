//! `cargo bench -p tandem-dlm`: the lock manager's numbers side by side.
//!
//! 1. On the host: local lock+unlock (core, async API, unix socket), remote
//!    lock+unlock latency against a raw TCP ping-pong over the same loopback, and
//!    throughput with 64 clients on two nodes (`tandem-dlm-bench all`).
//! 2. In a test-bed guest (Debian 6.12 under QEMU TCG): corosync + dlm_controld for one
//!    node, the same local workload on the kernel DLM through libdlm and on tandem's
//!    DLM, and their ratio. TCG slows both alike; only the ratio means something.
//!
//! `TANDEM_BENCH_SKIP_VM=1` runs the host part only (it says so in the output).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::process::Command;
use std::time::Duration;

fn rate(text: &str, label: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(label)).and_then(|l| {
        l.split_whitespace()
            .rev()
            .find_map(|w| w.parse::<f64>().ok())
    })
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    let bench = env!("CARGO_BIN_EXE_tandem-dlm-bench");
    println!("== host ==");
    let host = Command::new(bench)
        .arg("all")
        .output()
        .expect("running tandem-dlm-bench");
    print!("{}", String::from_utf8_lossy(&host.stdout));
    assert!(
        host.status.success(),
        "host benchmark failed: {}",
        String::from_utf8_lossy(&host.stderr)
    );

    if std::env::var("TANDEM_BENCH_SKIP_VM").is_ok_and(|v| v == "1") {
        println!("== guest: skipped (TANDEM_BENCH_SKIP_VM=1) ==");
        return;
    }
    println!("== guest (QEMU TCG, one vCPU): kernel DLM vs tandem, same workload ==");
    let kernel =
        tandem_testbed::GuestKernel::prepare().expect("the real-kernel test bed is required");
    let dir = tandem_testbed::scratch_dir("dlm-bench").unwrap();
    let out = dir.join("out");
    let script = include_str!("guest_bench.sh");
    let spec = tandem_testbed::GuestSpec::new("dlm-bench", &dir, script)
        .env("BENCH", bench)
        .env("KERNEL_OPS", 20_000)
        .env("TANDEM_OPS", 200_000)
        .out_dir(&out)
        .timeout(Duration::from_secs(600));
    let outcome = tandem_testbed::run(&kernel, &spec).unwrap();
    outcome.assert_success();
    let k = std::fs::read_to_string(out.join("kernel.txt")).unwrap();
    let t = std::fs::read_to_string(out.join("tandem.txt")).unwrap();
    print!("{k}{t}");
    let kr = rate(&k, "kernel DLM").expect("kernel rate");
    for label in [
        "local lock+unlock, async client API",
        "local lock+unlock, unix socket",
        "local lock+unlock, core only",
    ] {
        if let Some(tr) = rate(&t, label) {
            println!(
                "{:<58} {:>21.1}x",
                format!(
                    "tandem / kernel DLM ({})",
                    label.trim_start_matches("local lock+unlock, ")
                ),
                tr / kr
            );
        }
    }
}
