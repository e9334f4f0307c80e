//! Shared helpers of the replication tests: two `tandemd replica` processes on
//! 127.0.0.1/127.0.0.2, `tandemctl` calls, and a minimal NBD client.
// Test support code: panics are the failure report, and not every test uses every helper.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_arguments
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_testbed::{free_tcp_port, workspace_binary};

pub fn bin(name: &str) -> PathBuf {
    workspace_binary(name)
        .unwrap_or_else(|e| panic!("{e} (the tests need `cargo build --workspace --bins` first)"))
}

/// A scratch directory on a real filesystem (O_DIRECT works; /tmp may be tmpfs).
pub fn scratch(test: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Creates a backing file with fresh metadata.
pub fn create_backing(dir: &Path, name: &str, size: u64, volume: &str, node: u32) -> PathBuf {
    create_backing_with(dir, name, size, volume, node, &[])
}

/// [`create_backing`] with more `create-md` arguments.
pub fn create_backing_with(
    dir: &Path,
    name: &str,
    size: u64,
    volume: &str,
    node: u32,
    extra: &[&str],
) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let out = Command::new(bin("tandemctl"))
        .args(["create-md", "--backing"])
        .arg(&path)
        .args(["--volume", volume, "--node-id", &node.to_string(), "--json"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "create-md failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// One running replica process.
pub struct Replica {
    pub name: String,
    pub child: Option<Child>,
    pub control: PathBuf,
    pub backing: PathBuf,
    pub nbd: Option<SocketAddr>,
    pub log: PathBuf,
    pub args: Vec<String>,
}

/// Addresses for a pair: (listen, peer) for node 1 and node 2.
pub struct PairAddrs {
    pub a: SocketAddr,
    pub b: SocketAddr,
}

impl PairAddrs {
    /// A port on two loopback addresses of their own (127.X.Y.1 and 127.X.Y.2), so tests
    /// running at the same time never reach each other's replicas.
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = std::process::id()
            .wrapping_mul(31)
            .wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        let (x, y) = (1 + (n / 250) % 250, 1 + n % 250);
        let port = free_tcp_port().unwrap();
        Self {
            a: format!("127.{x}.{y}.1:{port}").parse().unwrap(),
            b: format!("127.{x}.{y}.2:{port}").parse().unwrap(),
        }
    }
}

impl Replica {
    /// Starts `tandemd replica` and waits for its control socket.
    pub fn start(
        dir: &Path,
        tag: &str,
        volume: &str,
        backing: &Path,
        listen: SocketAddr,
        peer: SocketAddr,
        nbd: bool,
        extra: &[&str],
    ) -> Self {
        let control = dir.join(format!("{tag}.sock"));
        let log = dir.join(format!("{tag}.log"));
        // Port 0: tandemd binds a free port and logs it (no race with other tests).
        let nbd_addr: Option<SocketAddr> = nbd.then(|| SocketAddr::new(listen.ip(), 0));
        let mut args: Vec<String> = vec![
            "replica".into(),
            "--name".into(),
            volume.into(),
            "--backing".into(),
            backing.display().to_string(),
            "--listen".into(),
            listen.to_string(),
            "--peer".into(),
            peer.to_string(),
            "--control".into(),
            control.display().to_string(),
            "--ping-interval-ms".into(),
            "200".into(),
            "--ping-timeout-ms".into(),
            "1500".into(),
        ];
        if let Some(a) = nbd_addr {
            args.push("--nbd".into());
            args.push(a.to_string());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut r = Self {
            name: volume.into(),
            child: None,
            control,
            backing: backing.to_owned(),
            nbd: nbd_addr,
            log,
            args,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.control);
        let log_start = self.log_text().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("tandemd"))
            .args(&self.args)
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.control.exists() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tandemd exited with {status}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no control socket: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.nbd.is_some() {
            // The actual port, from "NBD export ready nbd=ADDR" in this run's log.
            let addr = loop {
                let log = self.log_text();
                let found = log.get(log_start..).unwrap_or("").lines().find_map(|l| {
                    strip_ansi(l)
                        .split("nbd=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                });
                if let Some(a) = found {
                    break a;
                }
                assert!(Instant::now() < deadline, "no NBD listener: {log}");
                std::thread::sleep(Duration::from_millis(20));
            };
            self.nbd = Some(addr);
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `tandemctl --socket S replica ARGS...`; returns (success, stdout+stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(bin("tandemctl"))
            .arg("--socket")
            .arg(&self.control)
            .arg("replica")
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.ctl(args);
        assert!(
            ok,
            "tandemctl replica {args:?} failed: {text}\nlog:\n{}",
            self.log_text()
        );
        text
    }

    pub fn status(&self) -> serde_json::Value {
        let text = self.ok(&["status", &self.name, "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status is not JSON ({e}): {text}"))
    }

    /// Waits until `pred(status)` holds.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; status: {s:#}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait (a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("tandemd did not stop on SIGTERM: {}", self.log_text());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again with the same arguments.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two replicas of `vol` with `size`-byte backing files in `dir`, connected, `a`
/// primary (forced, `a` exporting NBD; `b` too when `nbd_b`), the initial full sync done.
pub fn synced_pair(
    dir: &Path,
    size: u64,
    nbd_b: bool,
    sync_timeout: Duration,
) -> (Replica, Replica) {
    let a_img = create_backing(dir, "a.img", size, "vol", 1);
    let b_img = create_backing(dir, "b.img", size, "vol", 2);
    let addrs = PairAddrs::new();
    let a = Replica::start(dir, "a", "vol", &a_img, addrs.a, addrs.b, true, &[]);
    let b = Replica::start(dir, "b", "vol", &b_img, addrs.b, addrs.a, nbd_b, &[]);
    a.wait_for("connected", Duration::from_secs(10), |s| {
        is_conn(s, "connected")
    });
    a.ok(&["primary", "vol", "--force"]);
    b.wait_for("initial sync", sync_timeout, |s| {
        is_conn(s, "connected") && s["disk"] == "up-to-date"
    });
    (a, b)
}

/// Panics with the status and log unless `r` is connected and UpToDate.
pub fn assert_connected_up_to_date(r: &Replica, when: &str) {
    let s = r.status();
    assert!(
        is_conn(&s, "connected") && s["disk"] == "up-to-date",
        "{when}, {}: {s:#}\n{}",
        r.name,
        r.log_text()
    );
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

pub fn is_conn(s: &serde_json::Value, state: &str) -> bool {
    s["connection"] == state
}

/// SHA-256 of the first `len` bytes of a file.
pub fn sha256_prefix(path: &Path, len: u64) -> String {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = usize::try_from(left.min(1 << 20)).unwrap();
        f.read_exact(&mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n as u64;
    }
    format!("{:x}", h.finalize())
}

/// A minimal synchronous NBD client (fixed newstyle, OPT_GO, simple replies).
pub struct NbdClient {
    s: TcpStream,
    pub size: u64,
    cookie: u64,
}

impl NbdClient {
    pub fn connect(addr: SocketAddr, export: &str) -> std::io::Result<Self> {
        use tandem::frontend::nbd::proto::*;
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        assert_eq!(
            u64::from_be_bytes(hello[0..8].try_into().unwrap()),
            NBDMAGIC
        );
        s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())?;
        let mut data = Vec::new();
        data.extend_from_slice(&u32::try_from(export.len()).unwrap().to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&IHAVEOPT.to_be_bytes())?;
        s.write_all(&OPT_GO.to_be_bytes())?;
        s.write_all(&u32::try_from(data.len()).unwrap().to_be_bytes())?;
        s.write_all(&data)?;
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d)?;
            if kind == REP_INFO && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
                size = u64::from_be_bytes(d[2..10].try_into().unwrap());
            }
            if kind == REP_ACK {
                break;
            }
            if kind & (1 << 31) != 0 {
                return Err(std::io::Error::other(format!(
                    "option refused ({kind:#x}): {}",
                    String::from_utf8_lossy(&d)
                )));
            }
        }
        Ok(Self { s, size, cookie: 1 })
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<(u32, Vec<u8>)> {
        use tandem::frontend::nbd::proto::*;
        self.cookie += 1;
        let req = Request {
            flags,
            kind,
            cookie: self.cookie,
            offset,
            length: len,
        };
        self.s.write_all(&req.encode())?;
        self.s.write_all(data)?;
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            self.cookie
        );
        let mut out = Vec::new();
        if kind == CMD_READ && err == 0 {
            out = vec![0u8; len as usize];
            self.s.read_exact(&mut out)?;
        }
        Ok((err, out))
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(1, 0, offset, u32::try_from(data.len()).unwrap(), data)
            .unwrap()
            .0
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let (err, d) = self.request(0, 0, offset, len, &[]).unwrap();
        assert_eq!(err, 0, "read failed");
        d
    }

    pub fn flush(&mut self) -> u32 {
        self.request(3, 0, 0, 0, &[]).unwrap().0
    }

    /// Raw access for garbage tests.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.s
    }
}

/// A deterministic pseudo-random generator for test data.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}
