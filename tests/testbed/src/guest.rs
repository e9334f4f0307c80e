//! Booting one guest, watching its console, and collecting its result.

use crate::kernel::{GuestKernel, require_program};
use crate::net::{Nic, NicBackend, wait_for_listener};
use crate::{Result, TestbedError};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A raw disk image attached as a virtio disk (`/dev/vda`, `/dev/vdb`, ... in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Host path of the image. Several guests may share one image.
    pub path: PathBuf,
}

/// An iSCSI LUN reached through QEMU's own initiator and passed to the guest as a SCSI
/// disk (`scsi-block`), so SCSI commands such as PERSISTENT RESERVE reach the target.
/// Each guest has its own initiator name and so is its own I_T nexus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiLun {
    pub initiator_name: String,
    /// e.g. `iscsi://127.0.0.1:3260/iqn.2026-11.test:tgt/1`
    pub url: String,
}

/// Everything needed to boot one guest.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Short name: the guest's hostname and the prefix of its log lines.
    pub name: String,
    /// Shell script run as root in the guest; its exit status is the guest's result.
    pub script: String,
    /// Variables exported before the script runs.
    pub env: Vec<(String, String)>,
    pub memory_mib: u32,
    pub timeout: Duration,
    pub disks: Vec<Disk>,
    pub iscsi: Vec<IscsiLun>,
    pub nics: Vec<Nic>,
    /// A host directory mounted read-write at `/out` in the guest.
    pub out_dir: Option<PathBuf>,
    /// Scratch directory for the script file, console log and QMP socket.
    pub run_dir: PathBuf,
}

impl GuestSpec {
    /// A guest named `name` that runs `script`, with 1.5 GiB and a 10 minute timeout.
    pub fn new(name: &str, run_dir: &Path, script: &str) -> Self {
        Self {
            name: name.into(),
            script: script.into(),
            // A test run with TANDEM_LOG set (tandemd's log filter) gets the same
            // logging from the daemons in its guests: a failure report is only as good
            // as their logs.
            env: std::env::var("TANDEM_LOG")
                .map(|filter| vec![("TANDEM_LOG".to_owned(), filter)])
                .unwrap_or_default(),
            memory_mib: 1536,
            timeout: Duration::from_secs(600),
            disks: Vec::new(),
            iscsi: Vec::new(),
            nics: Vec::new(),
            out_dir: None,
            run_dir: run_dir.into(),
        }
    }
    pub fn env(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.env.push((key.into(), value.to_string()));
        self
    }
    pub fn disk(mut self, path: &Path) -> Self {
        self.disks.push(Disk { path: path.into() });
        self
    }
    pub fn iscsi(mut self, lun: IscsiLun) -> Self {
        self.iscsi.push(lun);
        self
    }
    pub fn nic(mut self, nic: Nic) -> Self {
        self.nics.push(nic);
        self
    }
    pub fn out_dir(mut self, dir: &Path) -> Self {
        self.out_dir = Some(dir.into());
        self
    }
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    fn script_text(&self) -> String {
        let mut text = String::from("set -u\n");
        for (key, value) in &self.env {
            text.push_str(&format!(
                "export {key}='{}'\n",
                value.replace('\'', r"'\''")
            ));
        }
        text.push_str(&self.script);
        text.push('\n');
        text
    }
}

/// Console lines of a running guest, shared with the reader threads.
#[derive(Debug, Default)]
struct Console {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
    /// When the guest's init reported that the script is about to start.
    ready_at: Mutex<Option<Instant>>,
}

impl Console {
    fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }
}

/// A running guest.
#[derive(Debug)]
pub struct Guest {
    name: String,
    child: Child,
    console: Arc<Console>,
    readers: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    qmp_path: PathBuf,
    out_dir: Option<PathBuf>,
}

/// What a finished guest left behind.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    pub name: String,
    /// Exit status of the guest script; `None` if the guest died before it ended.
    pub rc: Option<i32>,
    /// Every console line.
    pub console: String,
    /// Time from starting QEMU to the guest script starting (the boot time).
    pub boot_time: Option<Duration>,
}

impl GuestOutcome {
    /// Panics with the console unless the guest script exited 0.
    #[track_caller]
    pub fn assert_success(&self) {
        assert_eq!(
            self.rc,
            Some(0),
            "guest `{}` failed (rc {:?}); console:\n{}",
            self.name,
            self.rc,
            self.console
        );
    }
    /// Lines that start with `prefix`, without it.
    pub fn lines_with(&self, prefix: &str) -> Vec<String> {
        self.console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
            .map(str::to_owned)
            .collect()
    }
}

impl Guest {
    /// Boots a guest. It runs until its script ends, it is killed, or its timeout passes.
    pub fn start(kernel: &GuestKernel, spec: &GuestSpec) -> Result<Self> {
        require_program("qemu-system-x86_64", "booting guests")?;
        let io = |what: String| move |source| TestbedError::Io { what, source };
        std::fs::create_dir_all(&spec.run_dir)
            .map_err(io(format!("creating {}", spec.run_dir.display())))?;
        let script_path = spec.run_dir.join(format!("{}.sh", spec.name));
        std::fs::write(&script_path, spec.script_text())
            .map_err(io(format!("writing {}", script_path.display())))?;
        let qmp_path = spec.run_dir.join(format!("{}.qmp", spec.name));
        let _ = std::fs::remove_file(&qmp_path);

        let mut append = format!(
            "console=ttyS0 panic=-1 quiet loglevel=3 tandem.script={} tandem.moddir={} tandem.hostname={}",
            script_path.display(),
            kernel.modules_dir.display(),
            spec.name
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-smp", "1", "-m"])
            .arg(spec.memory_mib.to_string())
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .args(["-no-reboot", "-device", "virtio-rng-pci"])
            .arg("-kernel")
            .arg(&kernel.image)
            .arg("-initrd")
            .arg(&kernel.initrd)
            .arg("-virtfs")
            .arg("local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if let Some(out) = &spec.out_dir {
            std::fs::create_dir_all(out).map_err(io(format!("creating {}", out.display())))?;
            cmd.arg("-virtfs").arg(format!(
                "local,path={},mount_tag=out,security_model=none,multidevs=remap",
                out.display()
            ));
            append.push_str(" tandem.out=1");
        }
        for disk in &spec.disks {
            cmd.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,cache=directsync,file.locking=off",
                disk.path.display()
            ));
        }
        if !spec.iscsi.is_empty() {
            append.push_str(" tandem.scsi=1");
            cmd.args(["-device", "virtio-scsi-pci,id=scsi0"]);
            for (i, lun) in spec.iscsi.iter().enumerate() {
                cmd.arg("-iscsi")
                    .arg(format!("initiator-name={}", lun.initiator_name));
                cmd.arg("-drive")
                    .arg(format!("file={},if=none,id=iscsi{i},format=raw", lun.url));
                cmd.arg("-device")
                    .arg(format!("scsi-block,drive=iscsi{i},bus=scsi0.0"));
            }
        }
        for (i, nic) in spec.nics.iter().enumerate() {
            if let NicBackend::Connect(port) = nic.backend {
                wait_for_listener(port, Duration::from_secs(30))?;
            }
            let id = format!("n{i}");
            cmd.arg("-netdev").arg(nic.qemu_netdev(&id));
            cmd.arg("-device").arg(format!(
                "virtio-net-pci,netdev={id},mac=52:54:00:{:02x}:{:02x}:{:02x}",
                name_byte(&spec.name),
                i,
                std::process::id() % 251
            ));
        }
        if !spec.nics.is_empty() {
            let addrs: Vec<&str> = spec.nics.iter().map(|n| n.address.as_str()).collect();
            append.push_str(&format!(" tandem.ip={}", addrs.join(",")));
        }
        cmd.arg("-append").arg(append);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(io("starting qemu-system-x86_64".into()))?;

        let console = Arc::new(Console::default());
        let log_path = spec.run_dir.join(format!("{}.console.log", spec.name));
        let log = Arc::new(Mutex::new(
            std::fs::File::create(&log_path)
                .map_err(io(format!("creating {}", log_path.display())))?,
        ));
        let mut readers = Vec::new();
        let streams: Vec<Box<dyn std::io::Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        let echo = std::env::var_os("TANDEM_VM_ECHO").is_some();
        for stream in streams {
            let console = Arc::clone(&console);
            let log = Arc::clone(&log);
            let name = spec.name.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n').map_while(|l| l.ok()) {
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_owned();
                    if echo {
                        eprintln!("[{name}] {line}");
                    }
                    if let Ok(mut file) = log.lock() {
                        let _ = writeln!(file, "{line}");
                    }
                    if line.contains("TANDEM-VM-READY")
                        && let Ok(mut ready) = console.ready_at.lock()
                    {
                        *ready = Some(Instant::now());
                    }
                    let mut lines = console.lines.lock().unwrap_or_else(|e| e.into_inner());
                    lines.push(line);
                    console.grew.notify_all();
                }
            }));
        }
        Ok(Self {
            name: spec.name.clone(),
            child,
            console,
            readers,
            started: Instant::now(),
            deadline: Instant::now() + spec.timeout,
            timeout: spec.timeout,
            qmp_path,
            out_dir: spec.out_dir.clone(),
        })
    }

    /// The last `lines` lines of a file the guest wrote into its `/out` share (read on the
    /// host, so it works while the guest runs and after it died), for failure messages.
    pub fn out_file_tail(&self, file: &str, lines: usize) -> String {
        let Some(dir) = &self.out_dir else {
            return format!("(guest `{}` has no /out share)", self.name);
        };
        let path = dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                let start = all.len().saturating_sub(lines);
                format!(
                    "{} (last {} lines):\n{}",
                    path.display(),
                    all.len() - start,
                    all[start..].join("\n")
                )
            }
            Err(e) => format!("{}: {e}", path.display()),
        }
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Blocks until a console line contains `pattern`; returns that line.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.console.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut checked = 0;
        loop {
            if let Some(line) = lines[checked..].iter().find(|l| l.contains(pattern)) {
                return Ok(line.clone());
            }
            checked = lines.len();
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                return Err(TestbedError::PatternNotSeen {
                    guest: self.name.clone(),
                    pattern: pattern.into(),
                    secs: timeout.as_secs(),
                    tail: self.console.tail(40),
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            lines = self
                .console
                .grew
                .wait_timeout(lines, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Every console line so far.
    pub fn console(&self) -> String {
        self.console.tail(usize::MAX)
    }

    /// Takes the guest's network link `n<index>` down or up (a partition), through QMP.
    pub fn set_link(&self, index: usize, up: bool) -> Result<()> {
        let command =
            format!(r#"{{"execute":"set_link","arguments":{{"name":"n{index}","up":{up}}}}}"#);
        self.qmp(&command)
    }

    fn qmp(&self, command: &str) -> Result<()> {
        let io = |what: &str| {
            let what = format!("QMP on guest `{}`: {what}", self.name);
            move |source| TestbedError::Io { what, source }
        };
        let stream = UnixStream::connect(&self.qmp_path).map_err(io("connect"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io("set timeout"))?;
        let mut writer = stream.try_clone().map_err(io("clone"))?;
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).map_err(io("greeting"))?;
        for request in [r#"{"execute":"qmp_capabilities"}"#, command] {
            writer
                .write_all(format!("{request}\n").as_bytes())
                .map_err(io("send"))?;
            loop {
                let mut reply = String::new();
                reader.read_line(&mut reply).map_err(io("reply"))?;
                if reply.is_empty() {
                    return Err(TestbedError::Qmp {
                        guest: self.name.clone(),
                        command: request.into(),
                        reply: "connection closed".into(),
                    });
                }
                if reply.contains("\"event\"") {
                    continue;
                }
                if reply.contains("\"error\"") {
                    return Err(TestbedError::Qmp {
                        guest: self.name.clone(),
                        command: request.into(),
                        reply,
                    });
                }
                break;
            }
        }
        Ok(())
    }

    /// Kills the guest at once, as a power cut would (SIGKILL to QEMU).
    pub fn kill(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(())
    }

    /// Waits for the guest to power off; kills it at its deadline.
    pub fn wait(mut self) -> Result<GuestOutcome> {
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() >= self.deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    self.join_readers();
                    return Err(TestbedError::Timeout {
                        guest: self.name.clone(),
                        secs: self.timeout.as_secs(),
                        tail: self.console.tail(60),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(source) => {
                    return Err(TestbedError::Io {
                        what: format!("waiting for guest `{}`", self.name),
                        source,
                    });
                }
            }
        }
        self.join_readers();
        Ok(self.outcome())
    }

    /// The outcome of a guest that was killed or has ended (does not wait).
    pub fn outcome(&self) -> GuestOutcome {
        let console = self.console.tail(usize::MAX);
        let rc = console
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("TANDEM-VM-RC="))
            .and_then(|n| n.trim().parse().ok());
        let boot_time = self
            .console
            .ready_at
            .lock()
            .ok()
            .and_then(|ready| ready.map(|at| at.duration_since(self.started)));
        GuestOutcome {
            name: self.name.clone(),
            rc,
            console,
            boot_time,
        }
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn name_byte(name: &str) -> u8 {
    name.bytes()
        .fold(0u8, |acc, b| acc.wrapping_mul(31).wrapping_add(b))
}

/// What a failed multi-guest test prints: each guest's console and the tail of the log it
/// writes to `/out/<log_file>`, in the order given (the guest that failed first).
pub fn failure_report(log_file: &str, guests: &[&Guest]) -> String {
    guests
        .iter()
        .map(|g| {
            format!(
                "--- {} console:\n{}\n--- {} {}\n",
                g.name(),
                g.console(),
                g.name(),
                g.out_file_tail(log_file, 80)
            )
        })
        .collect()
}

/// Boots one guest that runs `spec`, waits for it, and returns its outcome.
pub fn run(kernel: &GuestKernel, spec: &GuestSpec) -> Result<GuestOutcome> {
    Guest::start(kernel, spec)?.wait()
}
