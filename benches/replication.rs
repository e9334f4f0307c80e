//! Replication benchmark: one run, side by side, ratios printed.
//!
//! `cargo bench --bench replication` (needs fio with the io_uring and nbd engines).
//!
//! | row | what |
//! |-----|------|
//! | `fio 1 file` | fio, io_uring, O_DIRECT, on one backing file |
//! | `fio 2 files` | the same workload on both backing files at once (two jobs): the physical reference for two replicas sharing one disk and two cores |
//! | `qsd NBD` | qemu-storage-daemon exporting one file over NBD (io_uring, O_DIRECT): the cost of the NBD loopback path alone |
//! | `tandem local` | one `tandemd replica` with no peer, primary, NBD export; fio's nbd engine |
//! | `tandem C` | two `tandemd replica` processes on 127.0.0.x, protocol C over loopback; fio's nbd engine on the primary's export |
//!
//! Workloads: 4 KiB random write at QD1 and QD32 (IOPS, p50/p99 completion latency) and
//! 1 MiB sequential write at QD4 (MB/s). Then resync throughput: the secondary is
//! disconnected, 256 MiB are written, and the resync is timed against a configured limit
//! and unlimited. Figures go to stdout and `target/bench-replication.json`.
//!
//! Environment: `TANDEM_BENCH_SECS` (per workload, default 5), `TANDEM_BENCH_DIR`
//! (default `target/bench-replication`, must be on a real filesystem for O_DIRECT).

// A benchmark reports on stdout; that is its purpose.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem::replication::control::{Request, request};
use tandem::replication::types::{NodeId, VolumeId};
use tandem::store::metadata::{CreateParams, MetadataFile};

const SIZE: u64 = 2 << 30;

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "4k randwrite QD1",
        rw: "randwrite",
        bs: "4k",
        depth: 1,
    },
    Workload {
        name: "4k randwrite QD32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
    },
    Workload {
        name: "1M seq write QD4",
        rw: "write",
        bs: "1M",
        depth: 4,
    },
];

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Figures {
    iops: f64,
    mb_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(1)
}

fn secs() -> u64 {
    std::env::var("TANDEM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

fn preallocate(path: &Path, size: u64) {
    let f =
        std::fs::File::create(path).unwrap_or_else(|e| fail(format!("{}: {e}", path.display())));
    let len = i64::try_from(size).unwrap_or(i64::MAX);
    if let Err(e) = nix::fcntl::posix_fallocate(&f, 0, len) {
        fail(format!("preallocating {}: {e}", path.display()));
    }
}

/// Runs fio; `targets` are `--filename=` files (io_uring) or an NBD URI.
fn fio(w: &Workload, target: &FioTarget) -> Figures {
    let mut cmd = Command::new("fio");
    // Global options first: they apply to every job that follows.
    cmd.args([
        "--output-format=json",
        "--time_based",
        "--group_reporting",
        &format!("--runtime={}", secs()),
        "--ramp_time=1",
        &format!("--rw={}", w.rw),
        &format!("--bs={}", w.bs),
        &format!("--iodepth={}", w.depth),
        "--randrepeat=0",
        "--norandommap",
        "--size=1G",
    ]);
    match target {
        FioTarget::Files(files) => {
            cmd.args(["--ioengine=io_uring", "--direct=1"]);
            // One job per file, running at the same time.
            for (i, f) in files.iter().enumerate() {
                cmd.arg(format!("--name=job{i}"));
                cmd.arg(format!("--filename={}", f.display()));
            }
        }
        FioTarget::Nbd(uri) => {
            cmd.args(["--ioengine=nbd", &format!("--uri={uri}"), "--name=job0"]);
        }
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| fail(format!("fio is required: {e}")));
    if !out.status.success() {
        fail(format!(
            "fio failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // fio may print notes before the JSON document.
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("\n{").map_or(0, |i| i + 1);
    let json: serde_json::Value = serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| fail(format!("fio output is not JSON ({e}): {text}")));
    let write = &json["jobs"][0]["write"];
    let pct = |p: &str| write["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Figures {
        iops: write["iops"].as_f64().unwrap_or(0.0),
        mb_s: write["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    }
}

enum FioTarget {
    Files(Vec<PathBuf>),
    Nbd(String),
}

struct Replica {
    child: Child,
    control: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn create_md(backing: &Path, node: u32) {
    let params = CreateParams::new(VolumeId::from_name("bench"), NodeId(node));
    MetadataFile::create(backing, &params)
        .unwrap_or_else(|e| fail(format!("create-md on {}: {e}", backing.display())));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(e))
}

fn ctl(control: &Path, req: &Request) -> serde_json::Value {
    let reply = runtime()
        .block_on(request(control, req))
        .unwrap_or_else(|e| fail(format!("control {}: {e}", control.display())));
    if reply["ok"] != true {
        fail(format!("control request {req:?} refused: {reply}"));
    }
    reply
}

fn status(control: &Path) -> serde_json::Value {
    ctl(control, &Request::Status)["status"].clone()
}

fn wait_for(
    control: &Path,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(control);
        if pred(&s) {
            return s;
        }
        if Instant::now() > deadline {
            fail(format!("timed out waiting for {what}: {s}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(dir: &Path, tag: &str, backing: &Path, extra: &[String]) -> (Replica, Option<String>) {
    let control = dir.join(format!("{tag}.sock"));
    let log_path = dir.join(format!("{tag}.log"));
    let _ = std::fs::remove_file(&control);
    let log = std::fs::File::create(&log_path).unwrap_or_else(|e| fail(e));
    let child = Command::new(env!("CARGO_BIN_EXE_tandemd"))
        .args(["replica", "--name", "bench", "--backing"])
        .arg(backing)
        .arg("--control")
        .arg(&control)
        .args(extra)
        .env("TANDEM_LOG", "warn,tandem::replica=info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| fail(e));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut nbd = None;
    loop {
        let text = strip_ansi(&std::fs::read_to_string(&log_path).unwrap_or_default());
        if nbd.is_none() {
            nbd = text.split("nbd=").nth(1).and_then(|r| {
                r.split(|c: char| c.is_whitespace() || c == '\x1b')
                    .next()
                    .map(str::to_owned)
            });
        }
        let wants_nbd = extra.iter().any(|a| a == "--nbd");
        if control.exists() && (!wants_nbd || nbd.is_some()) {
            break;
        }
        if Instant::now() > deadline {
            fail(format!("{tag} did not start: {text}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (Replica { child, control }, nbd)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

fn row(name: &str, f: &Figures) {
    println!(
        "  {name:<14} {:>10.0} IOPS {:>9.1} MB/s  p50 {:>8.1} µs  p99 {:>8.1} µs",
        f.iops, f.mb_s, f.p50_us, f.p99_us
    );
}

/// Round trips of one 64-byte message over TCP on 127.0.0.1 (the peer link's path):
/// (p50, p99) in µs — the "one loopback RTT" of the latency goal.
fn loopback_rtt_us() -> (f64, f64) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail(e));
    let addr = listener.local_addr().unwrap_or_else(|e| fail(e));
    let echo = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let _ = s.set_nodelay(true);
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                return;
            }
        }
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| fail(e));
    let _ = s.set_nodelay(true);
    let mut buf = [7u8; 64];
    let mut samples: Vec<f64> = (0..20_000)
        .map(|_| {
            let t = Instant::now();
            s.write_all(&buf).unwrap_or_else(|e| fail(e));
            s.read_exact(&mut buf).unwrap_or_else(|e| fail(e));
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    drop(s);
    let _ = echo.join();
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    (samples[n / 2], samples[n * 99 / 100])
}

fn main() {
    // `cargo bench` passes --bench; a plain `cargo test --benches` must not run this.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("replication bench: run with `cargo bench --bench replication`");
        return;
    }
    let dir = std::env::var_os("TANDEM_BENCH_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-replication"),
        PathBuf::from,
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(e));
    let f1 = dir.join("fio1.img");
    let f2 = dir.join("fio2.img");
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    let l = dir.join("local.img");
    for p in [&f1, &f2, &a, &b, &l] {
        preallocate(p, SIZE);
    }
    create_md(&a, 1);
    create_md(&b, 2);
    create_md(&l, 1);

    let mut results = serde_json::Map::new();
    println!(
        "replication benchmark ({} s per workload, files in {})",
        secs(),
        dir.display()
    );

    // Reference runs.
    let mut rows: Vec<(&str, Vec<Figures>)> = Vec::new();
    let one: Vec<Figures> = WORKLOADS
        .iter()
        .map(|w| fio(w, &FioTarget::Files(vec![f1.clone()])))
        .collect();
    rows.push(("fio 1 file", one));
    let two: Vec<Figures> = WORKLOADS
        .iter()
        .map(|w| fio(w, &FioTarget::Files(vec![f1.clone(), f2.clone()])))
        .collect();
    rows.push(("fio 2 files", two));

    // An NBD reference: qemu-storage-daemon exporting one file (io_uring, O_DIRECT) to the
    // same fio nbd engine — what the NBD loopback path itself costs.
    {
        let port = 16000 + (std::process::id() % 1000) as u16;
        let spawned = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f,cache.direct=on,aio=io_uring",
                f1.display()
            ))
            .args([
                "--nbd-server",
                &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
                "--export",
                "type=nbd,id=e,node-name=f,name=bench,writable=on",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(mut qsd) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let uri = format!("nbd://127.0.0.1:{port}/bench");
                let figs = WORKLOADS
                    .iter()
                    .map(|w| fio(w, &FioTarget::Nbd(uri.clone())))
                    .collect();
                rows.push(("qsd NBD", figs));
                let _ = qsd.kill();
                let _ = qsd.wait();
            }
            Err(e) => println!("(no qemu-storage-daemon reference: {e})"),
        }
    }

    // tandem local-only (no peer).
    {
        let (local, nbd) = start(
            &dir,
            "local",
            &l,
            &[
                "--nbd".into(),
                "127.0.0.1:0".into(),
                "--primary".into(),
                "--force".into(),
            ],
        );
        let uri = format!(
            "nbd://{}/bench",
            nbd.unwrap_or_else(|| fail("no NBD address"))
        );
        let figs = WORKLOADS
            .iter()
            .map(|w| fio(w, &FioTarget::Nbd(uri.clone())))
            .collect();
        rows.push(("tandem local", figs));
        drop(local);
    }

    // tandem protocol C over loopback.
    let port = 17000 + (std::process::id() % 1000) as u16;
    let (addr_a, addr_b) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));
    let (ra, nbd) = start(
        &dir,
        "a",
        &a,
        &[
            "--listen".into(),
            addr_a.clone(),
            "--peer".into(),
            addr_b.clone(),
            "--nbd".into(),
            "127.0.0.1:0".into(),
            "--resync-rate".into(),
            "0".into(),
        ],
    );
    let (rb, _) = start(
        &dir,
        "b",
        &b,
        &["--listen".into(), addr_b, "--peer".into(), addr_a],
    );
    wait_for(&ra.control, "connection", Duration::from_secs(20), |s| {
        s["connection"] == "connected"
    });
    // Both files are preallocated zeroes: identical. A forced primary would start a
    // full sync; a full sync here also measures the unlimited resync rate.
    ctl(&ra.control, &Request::Primary { force: true });
    let t0 = Instant::now();
    let st = wait_for(&rb.control, "initial sync", Duration::from_secs(600), |s| {
        s["connection"] == "connected" && s["disk"] == "up-to-date"
    });
    let full_secs = t0.elapsed().as_secs_f64();
    let data = st["size_bytes"].as_f64().unwrap_or(0.0);
    println!(
        "initial full sync: {:.0} MiB in {full_secs:.1} s = {:.0} MB/s (unlimited)",
        data / 1048576.0,
        data / full_secs / 1e6
    );
    results.insert(
        "full_sync_mb_s".into(),
        serde_json::json!(data / full_secs / 1e6),
    );
    let uri = format!(
        "nbd://{}/bench",
        nbd.unwrap_or_else(|| fail("no NBD address"))
    );
    let figs: Vec<Figures> = WORKLOADS
        .iter()
        .map(|w| fio(w, &FioTarget::Nbd(uri.clone())))
        .collect();
    rows.push(("tandem C", figs));

    // Resync throughput vs a configured limit: disconnect, dirty 256 MiB, reconnect.
    let mut resync = Vec::new();
    for limit in [100_000_000u64, 0] {
        ctl(&rb.control, &Request::Disconnect);
        wait_for(&ra.control, "disconnect", Duration::from_secs(20), |s| {
            s["connection"] != "connected"
        });
        let out = Command::new("fio")
            .args([
                "--name=dirty",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=write",
                "--bs=1M",
                "--iodepth=8",
                "--size=256M",
                &format!("--offset={}", if limit == 0 { "512M" } else { "0" }),
            ])
            .output()
            .unwrap_or_else(|e| fail(e));
        if !out.status.success() {
            fail(String::from_utf8_lossy(&out.stderr));
        }
        ctl(
            &ra.control,
            &Request::SetResyncRate {
                bytes_per_sec: limit,
            },
        );
        let dirty = status(&ra.control)["out_of_sync_bytes"]
            .as_f64()
            .unwrap_or(0.0);
        let connect = Instant::now();
        ctl(&rb.control, &Request::Connect);
        // The resync proper is timed (from the moment it runs); reconnecting and the
        // handshake are reported beside it.
        wait_for(&ra.control, "resync start", Duration::from_secs(60), |s| {
            s["connection"] == "sync-source" || s["out_of_sync_bytes"] == 0
        });
        let t0 = Instant::now();
        let reconnect_ms = connect.elapsed().as_secs_f64() * 1e3;
        wait_for(&ra.control, "resync", Duration::from_secs(600), |s| {
            s["connection"] == "connected"
                && s["out_of_sync_bytes"] == 0
                && s["peer_disk"] == "up-to-date"
        });
        let rate = dirty / t0.elapsed().as_secs_f64() / 1e6;
        let label = if limit == 0 {
            "unlimited".to_owned()
        } else {
            format!("limit {} MB/s", limit / 1_000_000)
        };
        println!(
            "resync of {:.0} MiB, {label}: {rate:.0} MB/s{} (reconnect and handshake before it: {reconnect_ms:.0} ms)",
            dirty / 1048576.0,
            if limit > 0 {
                format!(" = {:.2} x the limit", rate * 1e6 / limit as f64)
            } else {
                String::new()
            }
        );
        resync.push(
            serde_json::json!({"limit_bytes_per_sec": limit, "dirty_bytes": dirty, "mb_s": rate, "reconnect_ms": reconnect_ms}),
        );
    }
    results.insert("resync".into(), serde_json::Value::Array(resync));
    drop(ra);
    drop(rb);

    let rtt = loopback_rtt_us();
    results.insert(
        "loopback_rtt_us".into(),
        serde_json::json!({"p50": rtt.0, "p99": rtt.1}),
    );

    // The table and the ratios.
    for (i, w) in WORKLOADS.iter().enumerate() {
        println!("{}:", w.name);
        for (name, figs) in &rows {
            row(name, &figs[i]);
        }
        let get = |n: &str| {
            rows.iter()
                .find(|(r, _)| *r == n)
                .map(|(_, f)| f[i])
                .unwrap_or_default()
        };
        let (one, two, local, c) = (
            get("fio 1 file"),
            get("fio 2 files"),
            get("tandem local"),
            get("tandem C"),
        );
        let qsd = get("qsd NBD");
        let metric = |f: &Figures| if w.bs == "1M" { f.mb_s } else { f.iops };
        if w.depth == 1 {
            // What replication itself adds (both rows pay the same NBD path).
            println!(
                "  replication overhead (tandem C vs tandem local): p50 {:.1} µs, p99 {:.1} µs; loopback RTT p50 {:.1} µs, p99 {:.1} µs; goal p99 overhead <= RTT + 50 µs = {:.1} µs",
                c.p50_us - local.p50_us,
                c.p99_us - local.p99_us,
                rtt.0,
                rtt.1,
                rtt.1 + 50.0
            );
        }
        println!(
            "  ratios: tandem C / fio 2 files = {:.2}; tandem local / fio 1 file = {:.2}; tandem local / qsd NBD = {:.2}; p99 overhead C vs 2 files = {:.1} µs",
            metric(&c) / metric(&two).max(1e-9),
            metric(&local) / metric(&one).max(1e-9),
            metric(&local) / metric(&qsd).max(1e-9),
            c.p99_us - two.p99_us
        );
        results.insert(
            w.name.into(),
            serde_json::json!({
                "fio_1_file": one, "fio_2_files": two, "qsd_nbd": qsd, "tandem_local": local, "tandem_c": c,
            }),
        );
    }
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("..")
        .join("bench-replication.json");
    let _ = std::fs::write(
        &out,
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    );
    println!("figures written to {}", out.display());
}
