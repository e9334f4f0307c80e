//! `tandemctl lock` and `tandemctl locks` against a one-node `tandem-dlmd`.
//!
//! Needs the workspace binaries (`cargo build --workspace --bins`, as the test command
//! does); fails with the reason if they are missing.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tandem_dlm::shell::SocketClient;
use tandem_dlm::shell::socket::Op;

fn tandemctl() -> std::path::PathBuf {
    tandem_testbed::workspace_binary("tandemctl")
        .expect("tandemctl must be built (cargo build --workspace --bins)")
}

fn ctl(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(tandemctl())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

/// The daemon, killed when the test ends (also when it fails: nothing is left behind).
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A one-node `tandem-dlmd` serving `dir/dlm.sock` (with the admin operations).
fn start_daemon(tag: &str) -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tandem-ctl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("dlm.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_tandem-dlmd"))
            .args([
                "--id",
                "1",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--socket",
            ])
            .arg(&socket)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&ctl(&socket, &["locks"]).stdout).contains("(running)") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "tandem-dlmd did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (daemon, dir, socket)
}

#[test]
fn a_lock_in_doubt_stops_the_command() {
    let (daemon, dir, socket) = start_daemon("doubt");
    let marker = dir.join("still-running");
    // A command that ignores SIGTERM: the grace period ends in SIGKILL.
    let script = format!(
        "trap '' TERM; while true; do touch {m}; sleep 0.05; done",
        m = marker.display()
    );
    let started = Instant::now();
    let mut holder = Command::new(tandemctl())
        .arg("--socket")
        .arg(&socket)
        .args([
            "lock", "ls", "guarded", "--grace", "0.5", "--", "sh", "-c", &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while !marker.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the command never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A client watching events hears it too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut watcher = rt.block_on(SocketClient::connect(&socket)).unwrap();
    let mut admin = rt.block_on(SocketClient::connect(&socket)).unwrap();
    let lost_at = Instant::now();
    rt.block_on(admin.call(Op::Quorum { quorate: false }))
        .unwrap();
    let status = loop {
        if let Some(status) = holder.try_wait().unwrap() {
            break status;
        }
        assert!(
            lost_at.elapsed() < Duration::from_secs(5),
            "tandemctl did not stop the command when its lock fell in doubt"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopped_after = lost_at.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(holder.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("lost quorum"), "{stderr}");
    // SIGKILL after the grace period: the loop really stopped.
    std::fs::remove_file(&marker).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !marker.exists(),
        "the command outlived tandemctl ({stopped_after:?})"
    );
    let event = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(5), watcher.next_event()).await
        })
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.event, "quorum-lost");
    // Locking while quorum is lost: the lock is in doubt from the start.
    let out = ctl(&socket, &["lock", "ls", "other", "--", "sleep", "5"]);
    assert_eq!(out.status.code(), Some(3));
    rt.block_on(admin.call(Op::Quorum { quorate: true }))
        .unwrap();
    let event = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(5), watcher.next_event()).await
        })
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.event, "quorum-regained");
    let out = ctl(&socket, &["lock", "ls", "guarded", "--", "true"]);
    assert!(out.status.success(), "{out:?}");
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tandemctl_lock_holds_a_lock_while_the_command_runs() {
    let (daemon, dir, socket) = start_daemon("lock");

    // The command's exit status comes back.
    let out = ctl(
        &socket,
        &[
            "lock", "ls", "vol0", "--mode", "ex", "--", "sh", "-c", "exit 7",
        ],
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");

    // While one holds EX, a NOQUEUE attempt fails with 1 and the lock is listed.
    let marker = dir.join("holding");
    let mut holder = Command::new(tandemctl())
        .arg("--socket")
        .arg(&socket)
        .args(["lock", "ls", "vol0", "--mode", "ex", "--", "sh", "-c"])
        .arg(format!("touch {}; sleep 2", marker.display()))
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "holder never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let busy = ctl(&socket, &["lock", "-n", "ls", "vol0", "--", "true"]);
    assert_eq!(busy.status.code(), Some(1), "{busy:?}");
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("busy"),
        "{busy:?}"
    );
    let json = ctl(&socket, &["locks", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let owned = status["owned"].as_array().unwrap();
    assert_eq!(owned.len(), 1, "{status}");
    assert_eq!(owned[0]["name"], "vol0");
    assert_eq!(owned[0]["granted"], "ex");
    let table = String::from_utf8(ctl(&socket, &["locks"]).stdout).unwrap();
    assert!(
        table.contains("vol0") && table.contains("granted"),
        "{table}"
    );
    // A waiting PR request gets it once the holder's command ends.
    let t0 = Instant::now();
    let waited = ctl(
        &socket,
        &["lock", "ls", "vol0", "--mode", "pr", "--", "true"],
    );
    assert_eq!(waited.status.code(), Some(0), "{waited:?}");
    assert!(
        t0.elapsed() > Duration::from_millis(500),
        "PR was granted while EX was held"
    );
    assert!(holder.wait().unwrap().success());
    // A timeout gives up with 1.
    let mut holder = Command::new(tandemctl())
        .arg("--socket")
        .arg(&socket)
        .args(["lock", "ls", "vol1", "--", "sleep", "2"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let timed_out = ctl(&socket, &["lock", "-w", "0.3", "ls", "vol1", "--", "true"]);
    assert_eq!(timed_out.status.code(), Some(1), "{timed_out:?}");
    holder.wait().unwrap();
    // Bad input is refused with a message, not a crash.
    let bad = ctl(
        &socket,
        &["lock", "ls", "vol0", "--mode", "zz", "--", "true"],
    );
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let long = "x".repeat(65);
    let bad = ctl(&socket, &["lock", "ls", &long, "--", "true"]);
    assert!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("1..=64"),
        "{bad:?}"
    );
    // Over the socket protocol directly: a waiting request gives the holder a blocking
    // callback event; closing the holder's connection releases its lock.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let lock_op = |mode: &str| Op::Lock {
            lockspace: "ls".into(),
            name: "sock".into(),
            mode: mode.into(),
            flags: vec![],
        };
        let mut holder = SocketClient::connect(&socket).await.unwrap();
        let r = holder.call(lock_op("ex")).await.unwrap();
        assert_eq!(r.status.as_deref(), Some("granted"));
        let waiter = tokio::spawn({
            let socket = socket.clone();
            async move {
                let mut c = SocketClient::connect(&socket).await.unwrap();
                c.call(Op::Lock {
                    lockspace: "ls".into(),
                    name: "sock".into(),
                    mode: "pr".into(),
                    flags: vec![],
                })
                .await
                .unwrap()
            }
        });
        let t0 = Instant::now();
        loop {
            holder.call(Op::Status).await.unwrap();
            let events = holder.take_events();
            if let Some(e) = events.first() {
                assert_eq!(
                    (e.event.as_str(), e.lock, e.mode.as_deref()),
                    ("blocking", r.lock, Some("pr"))
                );
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no blocking callback"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let bad = holder
            .call(Op::Convert {
                lock: r.lock.unwrap(),
                mode: "xx".into(),
                flags: vec![],
                lvb: None,
            })
            .await;
        assert!(bad.unwrap_err().to_string().contains("unknown lock mode"));
        drop(holder);
        let granted = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(granted.status.as_deref(), Some("granted"));
    });

    // Nothing is left once the daemon has noticed the last client hang up
    // (orphan cleanup runs when it reads EOF, a moment after the drop).
    let t0 = Instant::now();
    loop {
        let status: serde_json::Value =
            serde_json::from_slice(&ctl(&socket, &["locks", "--json"]).stdout).unwrap();
        if status["owned"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
