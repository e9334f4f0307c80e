//! The async shell around one [`Replica`] core: runs its actions against the backing
//! store, the metadata and the peer connection, and feeds every result back as an event.
//! It decides nothing.
//!
//! ```text
//!  frontends ─┐                         ┌─► store (io_uring thread) ─┐
//!  admin     ─┼─► Input channel ─► step ┼─► metadata (blocking pool) │ LocalDone
//!  reader    ─┤        ▲                ├─► writer task ─► peer      │
//!  ticks     ─┘        └────────────────┴────────────────────────────┘
//! ```
//!
//! One task per volume owns the core and every buffer the core refers to (application
//! write data, received payloads, read results), keyed as the core names them.

use super::core::{Action, Admin, DataRef, Event, IoTag, Notice, Replica, ReplicaConfig, ReqId};
use super::metadata_io::{self, AfterMetadataFailure};
use super::transport::{
    InFrame, OutFrame, OutPayload, PeerConnector, PeerStream, frame, read_frame, write_frames,
};
use super::types::ConnState;
use super::volume::{
    AppOp, AppReply, Command, Fencer, MetadataLocation, Volume, VolumeConfig, VolumeEvent,
    VolumeStatus,
};
use crate::error::{Result, TandemError};
use crate::store::metadata::MetadataFile;
use crate::store::{AlignedBuf, BlockStore, BlockStoreExt, DataBuf, IoDone, IoOp, StoreConfig};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Inputs of the volume task.
pub(super) enum Input {
    Command(Command),
    LocalDone {
        tag: IoTag,
        result: std::result::Result<(), String>,
        digest: Option<u64>,
        buf: Option<AlignedBuf>,
    },
    Frame {
        conn: u64,
        frame: InFrame,
    },
    PeerClosed {
        conn: u64,
        reason: String,
    },
    Connected {
        stream: Box<dyn PeerStream>,
        label: String,
    },
    Fence {
        request: u64,
        ok: bool,
        detail: String,
    },
    Tick,
}

/// A 64-bit digest of a block range for checksum resync and verify (SHA-256, truncated).
pub fn digest(data: &[u8]) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    let mut a = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    u64::from_le_bytes(a)
}

fn now_epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Shell {
    name: String,
    config: VolumeConfig,
    core: Replica,
    store: Arc<dyn BlockStore>,
    md: Option<MetadataFile>,
    tx: mpsc::UnboundedSender<Input>,
    events: broadcast::Sender<VolumeEvent>,
    connector: Option<Arc<dyn PeerConnector>>,
    fencer: Arc<dyn Fencer>,
    next_req: u64,
    replies: HashMap<ReqId, oneshot::Sender<AppReply>>,
    app_bufs: HashMap<ReqId, DataBuf>,
    payloads: HashMap<u64, AlignedBuf>,
    next_payload: u64,
    reads: HashMap<IoTag, AlignedBuf>,
    conn: u64,
    writer: Option<mpsc::UnboundedSender<OutFrame>>,
    reader_task: Option<JoinHandle<()>>,
    connecting: Option<JoinHandle<()>>,
    peer_label: Option<String>,
    clock_base_ms: u64,
    clock_start: Instant,
}

pub(super) async fn start(
    config: VolumeConfig,
    connector: Option<Arc<dyn PeerConnector>>,
    fencer: Arc<dyn Fencer>,
) -> Result<Volume> {
    let md_path = match &config.metadata {
        MetadataLocation::Internal => config.backing.clone(),
        MetadataLocation::External(p) => p.clone(),
    };
    let failure_record = config.failure_record.clone();
    let (md, persisted) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut md = MetadataFile::open(&md_path)?;
        if let Some(record) = &failure_record
            && metadata_io::apply_failure_record(&mut md, record)?
        {
            tracing::warn!(path = %md_path.display(), record = %record.display(), "this disk failed earlier: it takes a full sync from its peer");
        }
        let (persisted, load) = metadata_io::load(&md)?;
        if !load.bad_blocks.is_empty() {
            tracing::warn!(path = %md_path.display(), blocks = ?load.bad_blocks, "bitmap blocks failed their checksum; treating them as all out of sync");
        }
        Ok((md, persisted))
    })
    .await
    .map_err(|e| TandemError::Io {
        what: "loading metadata".into(),
        source: std::io::Error::other(e),
    })??;
    let sb = md.superblock().clone();
    let mut store_config = StoreConfig::new(&config.backing);
    store_config.engine = config.engine;
    store_config.limit_bytes = Some(sb.data_size_bytes);
    let store: Arc<dyn BlockStore> = match config.engine {
        crate::store::Engine::Uring => Arc::new(crate::store::UringStore::open_with_threads(
            &store_config,
            config.io_threads,
        )?),
        crate::store::Engine::Sync => Arc::new(crate::store::SyncStore::open(&store_config)?),
    };
    let store = match &config.store_layer {
        Some(layer) => layer.wrap(store),
        None => store,
    };
    if store.size_bytes() < sb.data_size_bytes {
        return Err(TandemError::BadMetadata {
            path: config.backing.clone(),
            reason: format!(
                "backing store has {} bytes but the metadata describes {} bytes of data",
                store.size_bytes(),
                sb.data_size_bytes
            ),
        });
    }
    let mut rcfg = ReplicaConfig::new(sb.volume_id, sb.node_id, sb.data_size_bytes);
    rcfg.block_bytes = u64::from(store.block_bytes());
    rcfg.protocol = config.protocol;
    rcfg.fencing = config.fencing;
    rcfg.split_brain = config.split_brain;
    rcfg.ping_interval_ms = config.ping_interval_ms;
    rcfg.ping_timeout_ms = config.ping_timeout_ms;
    rcfg.resync = config.resync;
    let seed = now_epoch_ms() ^ u64::from(std::process::id()).rotate_left(32) ^ sb.seq;
    let (core, initial) = Replica::new(rcfg, persisted, seed);
    let (tx, rx) = mpsc::unbounded_channel();
    let (events, _) = broadcast::channel(1024);
    let volume = Volume {
        name: Arc::from(config.name.as_str()),
        tx: tx.clone(),
        events: events.clone(),
        size_bytes: sb.data_size_bytes,
        block_bytes: u64::from(store.block_bytes()),
        write_latency: Arc::default(),
        lease: Arc::default(),
    };
    let mut shell = Shell {
        name: config.name.clone(),
        config,
        core,
        store,
        md: Some(md),
        tx: tx.clone(),
        events,
        connector,
        fencer,
        next_req: 1,
        replies: HashMap::new(),
        app_bufs: HashMap::new(),
        payloads: HashMap::new(),
        next_payload: 1,
        reads: HashMap::new(),
        conn: 0,
        writer: None,
        reader_task: None,
        connecting: None,
        peer_label: None,
        clock_base_ms: now_epoch_ms(),
        clock_start: Instant::now(),
    };
    shell.run_actions(initial).await;
    let ticker = tx.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(10));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if ticker.send(Input::Tick).is_err() {
                break;
            }
        }
    });
    let span =
        tracing::info_span!("volume", volume = %shell.name, node_id = %shell.core.config().node_id);
    tokio::spawn(tracing::Instrument::instrument(shell.run(rx), span));
    if volume.tx.is_closed() {
        return Err(TandemError::VolumeGone(volume.name.to_string()));
    }
    Ok(volume)
}

impl Shell {
    fn now_ms(&self) -> u64 {
        self.clock_base_ms + u64::try_from(self.clock_start.elapsed().as_millis()).unwrap_or(0)
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        // The core's clock starts at the first tick: give it the time before the link can
        // come up, or a connection made in the first few milliseconds looks silent since
        // the epoch and is dropped as "peer timed out".
        let actions = self.core.step(Event::Tick {
            now_ms: self.now_ms(),
        });
        self.run_actions(actions).await;
        if self.connector.is_some() {
            let actions = self.core.step(Event::Admin(Admin::Connect));
            self.run_actions(actions).await;
        }
        while let Some(input) = rx.recv().await {
            self.handle(input).await;
            if self.core.is_stopped() {
                break;
            }
        }
        self.drop_connection();
        if let Some(c) = self.connecting.take() {
            c.abort();
        }
        tracing::info!("volume stopped");
    }

    async fn handle(&mut self, input: Input) {
        let event = match input {
            Input::Tick => Event::Tick {
                now_ms: self.now_ms(),
            },
            Input::Command(Command::App(op, reply)) => {
                let req = ReqId(self.next_req);
                self.next_req += 1;
                self.replies.insert(req, reply);
                match op {
                    AppOp::Read { offset, len } => Event::AppRead { req, offset, len },
                    AppOp::Write { offset, data, fua } => {
                        let len = crate::store::len_u64(data.len());
                        self.app_bufs.insert(req, data);
                        Event::AppWrite {
                            req,
                            offset,
                            len,
                            fua,
                        }
                    }
                    AppOp::Flush => Event::AppFlush { req },
                    AppOp::Trim {
                        offset,
                        len,
                        zeroes,
                    } => Event::AppTrim {
                        req,
                        offset,
                        len,
                        zeroes,
                    },
                }
            }
            Input::Command(Command::Admin(cmd, reply)) => {
                let actions = self.core.step(Event::Admin(cmd));
                let refusal = actions.iter().find_map(|a| match a {
                    Action::Notify(Notice::Refused { reason }) => Some(reason.clone()),
                    _ => None,
                });
                self.run_actions(actions).await;
                let _ = reply.send(refusal.map_or(Ok(()), Err));
                return;
            }
            Input::Command(Command::Status(reply)) => {
                let _ = reply.send(VolumeStatus {
                    name: self.name.clone(),
                    backing: self.config.backing.clone(),
                    peer: self.peer_label.clone(),
                    replica: self.core.status(),
                });
                return;
            }
            Input::LocalDone {
                tag,
                result,
                digest,
                buf,
            } => {
                if let Some(buf) = buf {
                    self.reads.insert(tag, buf);
                }
                Event::LocalDone {
                    tag,
                    result,
                    digest,
                }
            }
            Input::Frame { conn, frame } => {
                if conn != self.conn {
                    return;
                }
                let (payload, payload_len) = match frame.data {
                    Some(buf) => {
                        let key = self.next_payload;
                        self.next_payload += 1;
                        let len = crate::store::len_u64(buf.len());
                        self.payloads.insert(key, buf);
                        (Some(key), len)
                    }
                    None => (None, crate::store::len_u64(frame.inline.len())),
                };
                Event::PeerMsg {
                    msg: frame.msg,
                    payload,
                    payload_len,
                    inline: frame.inline,
                }
            }
            Input::PeerClosed { conn, reason } => {
                if conn != self.conn {
                    return;
                }
                self.drop_connection();
                if reason.starts_with("refused frame") {
                    tracing::warn!(error = %reason, "refused bytes from the peer");
                    Event::PeerGarbage { reason }
                } else {
                    Event::TransportDown { reason }
                }
            }
            Input::Connected { stream, label } => {
                self.connecting = None;
                self.attach(stream, label);
                Event::TransportUp
            }
            Input::Fence {
                request,
                ok,
                detail,
            } => Event::OutdatePeerDone {
                request,
                ok,
                detail,
            },
        };
        let actions = self.core.step(event);
        self.run_actions(actions).await;
    }

    fn attach(&mut self, stream: Box<dyn PeerStream>, label: String) {
        self.drop_connection();
        self.conn += 1;
        let conn = self.conn;
        tracing::info!(peer = %label, "replication link up");
        self.peer_label = Some(label);
        let (read_half, write_half) = tokio::io::split(stream);
        let (wtx, wrx) = mpsc::unbounded_channel();
        self.writer = Some(wtx);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            if let Err(e) = write_frames(write_half, wrx).await {
                let _ = tx.send(Input::PeerClosed {
                    conn,
                    reason: format!("connection lost: {e}"),
                });
            }
        });
        let tx = self.tx.clone();
        self.reader_task = Some(tokio::spawn(async move {
            // Buffered: acks and small frames arrive many to a recv.
            let mut r = tokio::io::BufReader::with_capacity(256 << 10, read_half);
            loop {
                match read_frame(&mut r).await {
                    Ok(frame) => {
                        if tx.send(Input::Frame { conn, frame }).is_err() {
                            return;
                        }
                    }
                    Err(reason) => {
                        let _ = tx.send(Input::PeerClosed { conn, reason });
                        return;
                    }
                }
            }
        }));
    }

    fn drop_connection(&mut self) {
        // Dropping the sender lets the writer send what is queued (a Refuse, say), then
        // shut the stream down.
        self.writer = None;
        if let Some(t) = self.reader_task.take() {
            t.abort();
        }
        self.conn += 1;
        self.payloads.clear();
    }

    fn take_data(&mut self, data: DataRef) -> Option<DataBuf> {
        match data {
            DataRef::App(req) => self.app_bufs.get(&req).cloned(),
            DataRef::Payload(k) => self.payloads.remove(&k).map(Arc::new),
            DataRef::Read(tag) => self.reads.remove(&tag).map(Arc::new),
        }
    }

    fn submit(&self, tag: IoTag, op: IoOp, want_digest: bool) {
        let tx = self.tx.clone();
        self.store.submit(
            op,
            Box::new(move |done: IoDone| {
                let digest = match (&done.buf, want_digest) {
                    (Some(b), true) => Some(digest(b)),
                    _ => None,
                };
                let _ = tx.send(Input::LocalDone {
                    tag,
                    result: done.result.map_err(|e| error_chain(&e)),
                    digest,
                    buf: done.buf,
                });
            }),
        );
    }

    fn send(&mut self, msg: &super::wire::Msg, payload: Option<OutPayload>) {
        if let Some(w) = &self.writer {
            let _ = w.send(frame(msg, payload));
        }
    }

    async fn with_md<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut MetadataFile) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let Some(mut md) = self.md.take() else {
            return Err(TandemError::VolumeGone(self.name.clone()));
        };
        let (md, result) = tokio::task::spawn_blocking(move || {
            let r = f(&mut md);
            (md, r)
        })
        .await
        .map_err(|e| TandemError::Io {
            what: "metadata I/O".into(),
            source: std::io::Error::other(e),
        })?;
        self.md = Some(md);
        result
    }

    async fn metadata_failed(&mut self, e: &TandemError) {
        tracing::error!(error = %error_chain(e), "metadata write failed");
        let actions = self.core.step(Event::MetadataFailed {
            reason: error_chain(e),
        });
        // Box the recursion: a failure here cannot trigger metadata writes forever because
        // the core marks the disk failed once.
        Box::pin(self.run_actions(actions)).await;
    }

    /// Runs a batch in order. Once a metadata write of the batch failed (the core then
    /// detached the disk), its later local I/O does not run: the core placed the metadata
    /// write first because that I/O needs it (a write needs its activity-log extent on
    /// disk). Such I/O is answered as failed instead, so the core accounts for it.
    async fn run_actions(&mut self, actions: Vec<Action>) {
        let mut detached = false;
        for action in actions {
            if detached {
                match metadata_io::after_metadata_failure(&action) {
                    AfterMetadataFailure::Run => {}
                    AfterMetadataFailure::Skip => continue,
                    AfterMetadataFailure::Fail(tag) => {
                        let actions = self.core.step(Event::LocalDone {
                            tag,
                            result: Err(metadata_io::NOT_RUN_AFTER_METADATA_FAILURE.into()),
                            digest: None,
                        });
                        Box::pin(self.run_actions(actions)).await;
                        continue;
                    }
                }
            }
            if self.run_action(action).await == Ran::MetadataFailed {
                detached = true;
            }
        }
    }

    async fn run_action(&mut self, action: Action) -> Ran {
        match action {
            Action::RecordDiskFailure => match self.config.failure_record.clone() {
                Some(path) => {
                    let r = tokio::task::spawn_blocking(move || {
                        metadata_io::write_failure_record(&path, "the disk failed; detached")
                    })
                    .await;
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "cannot record the disk failure: should this disk come back with its old metadata, recreate its metadata (tandemctl create-md) so that it takes a full sync")
                        }
                        Err(e) => tracing::error!(error = %e, "cannot record the disk failure"),
                    }
                }
                None => tracing::warn!(
                    "no state directory to record the disk failure in: if this disk comes back with its old metadata, only a peer that saw the failure knows"
                ),
            },
            Action::LocalWrite {
                tag,
                offset,
                len,
                fua,
                data,
            } => match self.take_data(data) {
                Some(buf) if crate::store::len_u64(buf.len()) == len => {
                    self.submit(tag, IoOp::Write { offset, buf, fua }, false);
                }
                other => {
                    tracing::error!(?tag, ?data, found = other.is_some(), "write data missing");
                    let _ = self.tx.send(Input::LocalDone {
                        tag,
                        result: Err("internal: write data missing".into()),
                        digest: None,
                        buf: None,
                    });
                }
            },
            Action::LocalTrim {
                tag,
                offset,
                len,
                zeroes,
            } => {
                let op = if zeroes {
                    IoOp::WriteZeroes {
                        offset,
                        len_bytes: len,
                    }
                } else {
                    IoOp::Discard {
                        offset,
                        len_bytes: len,
                    }
                };
                self.submit(tag, op, false);
            }
            Action::LocalRead {
                tag,
                offset,
                len,
                digest,
            } => {
                let Ok(n) = usize::try_from(len) else {
                    return Ran::Done;
                };
                self.submit(
                    tag,
                    IoOp::Read {
                        offset,
                        buf: AlignedBuf::for_overwrite(n),
                    },
                    digest,
                );
            }
            Action::LocalFlush { tag } => self.submit(tag, IoOp::Flush, false),
            Action::Send { msg, data } => {
                let payload = data.and_then(|d| self.take_data(d)).map(OutPayload::Shared);
                self.send(&msg, payload);
            }
            Action::SendBytes { msg, bytes } => self.send(&msg, Some(OutPayload::Owned(bytes))),
            Action::Release(d) => {
                let _ = self.take_data(d);
            }
            Action::Complete { req, result } => {
                self.app_bufs.remove(&req);
                let reply = match result {
                    Ok(Some(d)) => Ok(match d {
                        DataRef::Payload(k) => self.payloads.remove(&k),
                        DataRef::Read(t) => self.reads.remove(&t),
                        DataRef::App(_) => None,
                    }),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
                if let Some(tx) = self.replies.remove(&req) {
                    let _ = tx.send(reply);
                }
            }
            Action::Connect => {
                if self.connecting.is_none()
                    && self.writer.is_none()
                    && let Some(connector) = self.connector.clone()
                {
                    let tx = self.tx.clone();
                    self.connecting = Some(tokio::spawn(async move {
                        let (stream, label) = connector.connect().await;
                        let _ = tx.send(Input::Connected { stream, label });
                    }));
                }
            }
            Action::Disconnect { reason } => {
                tracing::info!(reason = %reason, "replication link closed");
                self.drop_connection();
            }
            Action::OutdatePeer { request } => {
                let fencer = Arc::clone(&self.fencer);
                let tx = self.tx.clone();
                let name = self.name.clone();
                tokio::spawn(async move {
                    let result = fencer.outdate_peer(&name).await;
                    let _ = tx.send(Input::Fence {
                        request,
                        ok: result.is_ok(),
                        detail: result.err().unwrap_or_else(|| "peer outdated".into()),
                    });
                });
            }
            Action::PersistAl { .. }
            | Action::PersistBitmap { .. }
            | Action::PersistSuperblock(_) => {
                // The activity log covers writes about to start: what it drops must be
                // on stable storage first.
                let flushed = if matches!(action, Action::PersistAl { .. }) {
                    self.store.run(IoOp::Flush).await.result
                } else {
                    Ok(())
                };
                let r = match flushed {
                    Ok(()) => {
                        self.with_md(move |md| metadata_io::write(md, &action))
                            .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    self.metadata_failed(&e).await;
                    return Ran::MetadataFailed;
                }
            }
            Action::Notify(notice) => {
                match &notice {
                    Notice::PeerProtocolError { reason } | Notice::Refused { reason } => {
                        tracing::warn!(reason = %reason, "{}", notice_name(&notice));
                    }
                    Notice::SplitBrain { detail } => {
                        tracing::error!(detail = %detail, "split brain")
                    }
                    Notice::DiskFailed { reason } => {
                        tracing::error!(reason = %reason, "disk failed; detached")
                    }
                    other => tracing::info!(event = ?other, "state change"),
                }
                if let Notice::Connection { state } = &notice
                    && matches!(state, ConnState::StandAlone | ConnState::Connecting)
                {
                    self.peer_label = None;
                }
                let _ = self.events.send(VolumeEvent {
                    volume: self.name.clone(),
                    node_id: self.core.config().node_id,
                    time_ms: now_epoch_ms(),
                    notice,
                });
            }
            Action::Stopped => {
                // Replies to anything still queued: the loop ends after this step.
                for (_, tx) in self.replies.drain() {
                    let _ = tx.send(Err(super::core::IoFailure::Refused(
                        "volume shut down".into(),
                    )));
                }
            }
        }
        Ran::Done
    }
}

/// How running one action went, as far as the rest of its batch is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    Done,
    /// A metadata write failed: the core detached the disk.
    MetadataFailed,
}

fn notice_name(n: &Notice) -> &'static str {
    match n {
        Notice::PeerProtocolError { .. } => "peer protocol error",
        Notice::Refused { .. } => "refused",
        _ => "event",
    }
}

/// The error and its sources as one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
