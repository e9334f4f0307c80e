//! The replication core: one volume's replica as a pure state machine.
//!
//! ```text
//!   Event ──► Replica::step ──► Vec<Action>            (no I/O, no clock, no global RNG)
//!
//!   app:    AppWrite/AppTrim/AppFlush/AppRead ─► LocalWrite + Send(Data) ─► … ─► Complete
//!   disk:   LocalDone{tag} ◄── the shell ran a LocalWrite/LocalRead/LocalFlush/LocalTrim
//!   peer:   TransportUp ─► Send(Hello) ; PeerMsg{msg} ─► acks, barriers, resync, verify
//!   time:   Tick{now_ms} ─► keepalive, timeouts, resync rate control, bitmap write-back
//!   admin:  Promote/Demote/Connect/Disconnect/DiscardMyData/SetEpoch/Outdate/Verify
//!   fence:  OutdatePeer (action) ─► OutdatePeerDone{ok} (event)
//! ```
//!
//! Ordering contract with the shell: actions run in the order given. `Persist*` actions
//! are synchronous — the shell finishes them (durably) before running the next action —
//! so a `PersistAl` placed before a `LocalWrite` is on disk before the write is issued,
//! and a `PersistSuperblock` with a new generation is durable before any `Complete` that
//! follows it. `PersistAl` also flushes the data device first (completed writes of
//! extents leaving the log must be stable, like DRBD's FUA|PREFLUSH AL writes).
//!
//! Protocol C (the default): a write is completed to the application only after its
//! local write completed (`LocalDone`) and the peer acknowledged its own (`WriteAck`).
//! A write that cannot reach the peer completes only once the peer has been recorded as
//! outdated (the fencing gate, see [`FencingPolicy`]) and a new data generation is
//! durable; its blocks are marked in the dirty bitmap for the next resync. If the peer
//! comes back first, what waits for the gate is sent to it instead, and the gate closes.

use super::decide::{Decision, SideInfo, decide};
use super::types::{
    ClusterLogId, ConnState, DiskState, Epoch, FencingPolicy, GenerationIds, NodeId, Protocol,
    Role, SplitBrainPolicy, VolumeId,
};
use super::wire::{Hello, Msg};
use crate::store::activity_log::ActivityLog;
use crate::store::bitmap::Bitmap;
use crate::store::metadata::MdFlags;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// An application request, numbered by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReqId(pub u64);

impl ReqId {
    /// Ids with this bit are the core's own: the pieces of a split trim. The shell numbers
    /// application requests from 1 up and never gets there.
    const TRIM_PIECE: u64 = 1 << 63;

    fn is_trim_piece(self) -> bool {
        self.0 & Self::TRIM_PIECE != 0
    }
}

/// A trim wider than [`TRIM_SPLIT_EXTENTS`] activity-log extents, run in extent-aligned
/// pieces (at most [`TRIM_PIECE_WINDOW`] at once) and completed once, as one request: it
/// never needs more of the activity log than a write does. `mkfs.ext4` discards a whole
/// device, NBD allows 4 GiB in one request, and a trim pinning every extent it covers at
/// once could never fit in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SplitTrim {
    next: u64,
    end: u64,
    zeroes: bool,
    in_flight: u32,
    failure: Option<IoFailure>,
}

/// A trim touching more extents than this is split.
const TRIM_SPLIT_EXTENTS: usize = 2;
/// Pieces of one trim in flight at once.
const TRIM_PIECE_WINDOW: u32 = 4;

/// What a local disk operation belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IoTag {
    /// An application request.
    App(ReqId),
    /// A replicated write received from the peer (by arrival number).
    Recv(u64),
    /// The flush closing the peer's epoch `n`.
    Barrier(u32),
    /// Sync source: reading a resync request.
    ResyncRead(u64),
    /// Sync target: reading to compare a checksum.
    CsumRead(u64),
    /// Verify source: reading a range.
    VerifyRead(u64),
    /// Verify responder: reading a range the peer asked about.
    VerifyPeerRead(u64),
    /// Serving a read for a diskless peer (the peer's read id).
    PeerRead(u64),
    /// Sync target: making the resynced data durable before declaring it UpToDate.
    SyncDone,
    /// Sync target: a range matched the source's checksum; make it durable before saying so.
    CsumFlush(u64),
}

/// A data buffer the shell holds on the core's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataRef {
    /// The data of application write `ReqId` (held until its `Complete`).
    App(ReqId),
    /// The payload of a received message (key given in `Event::PeerMsg`).
    Payload(u64),
    /// The buffer filled by the `LocalRead` with this tag.
    Read(IoTag),
}

/// Why an application request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoFailure {
    /// Not allowed in this role or state (write to a secondary, out of range ...).
    Refused(String),
    /// No disk could serve it (local disk failed and the peer is not there).
    Io(String),
}

impl std::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoFailure::Refused(r) => write!(f, "refused: {r}"),
            IoFailure::Io(r) => write!(f, "I/O error: {r}"),
        }
    }
}

/// Operator and cluster commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admin {
    Promote {
        force: bool,
    },
    Demote,
    Connect,
    Disconnect,
    /// Next handshake: this node's data loses a split brain.
    DiscardMyData,
    /// The cluster's fencing epoch moved on.
    SetEpoch(Epoch),
    /// The cluster whose log this replica follows: its epochs are that log's. Adopted
    /// if the superblock names none; refused if it names another.
    JoinClusterLog(ClusterLogId),
    /// The cluster recorded this (secondary) disk as outdated.
    Outdate,
    /// The cluster says this primary must stop at once (deposed, or fenced): fail the
    /// writes in flight (none was acknowledged) and become an Outdated secondary, as when
    /// fenced by a newer epoch.
    StepDown,
    /// This primary lost quorum (DRBD's `on-no-quorum suspend-io`): acknowledge nothing
    /// from now on — finished writes and flushes are held, new ones queue, reads are
    /// still served — until
    /// [`Admin::ResumeIo`] (the cluster confirmed this node is still the primary) or a
    /// step-down / newer epoch (they fail, unacknowledged).
    SuspendIo,
    /// Quorum is back and the cluster confirmed this primary: release what was held.
    ResumeIo,
    StartVerify,
    SetResyncRate {
        max_bytes_per_sec: u64,
    },
    /// Clean shutdown: write metadata back and stop.
    Shutdown,
}

/// Inputs of the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Tick {
        now_ms: u64,
    },
    AppWrite {
        req: ReqId,
        offset: u64,
        len: u64,
        fua: bool,
    },
    AppTrim {
        req: ReqId,
        offset: u64,
        len: u64,
        zeroes: bool,
    },
    AppFlush {
        req: ReqId,
    },
    AppRead {
        req: ReqId,
        offset: u64,
        len: u64,
    },
    LocalDone {
        tag: IoTag,
        result: Result<(), String>,
        /// For reads asked with `digest: true`.
        digest: Option<u64>,
    },
    TransportUp,
    TransportDown {
        reason: String,
    },
    PeerMsg {
        msg: Msg,
        /// Key of the payload the shell holds for this message (data messages).
        payload: Option<u64>,
        payload_len: u64,
        /// The payload itself for small control messages (bitmap words).
        inline: Vec<u8>,
    },
    /// The transport received bytes it refused (bad magic, checksum, oversized ...).
    PeerGarbage {
        reason: String,
    },
    /// Writing the on-disk metadata failed: the disk is treated as failed.
    MetadataFailed {
        reason: String,
    },
    /// Result of `Action::OutdatePeer` number `request`.
    OutdatePeerDone {
        request: u64,
        ok: bool,
        detail: String,
    },
    Admin(Admin),
}

/// Something the events stream reports (like `drbdsetup events2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Notice {
    Role {
        role: Role,
    },
    PeerRole {
        role: Option<Role>,
    },
    Connection {
        state: ConnState,
    },
    Disk {
        state: DiskState,
    },
    PeerDisk {
        state: DiskState,
    },
    Generations {
        generations: GenerationIds,
    },
    SyncStarted {
        source: bool,
        full: bool,
        bytes: u64,
    },
    SyncFinished {
        source: bool,
        bytes: u64,
        ms: u64,
    },
    SplitBrain {
        detail: String,
    },
    Refused {
        reason: String,
    },
    PeerProtocolError {
        reason: String,
    },
    DiskFailed {
        reason: String,
    },
    Fenced {
        epoch: Epoch,
    },
    IoSuspended {
        reason: String,
    },
    IoResumed,
    VerifyMismatch {
        offset: u64,
        len: u64,
    },
    VerifyFinished {
        checked_bytes: u64,
        mismatched_bytes: u64,
    },
}

/// Persistent state the core owns in the superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdState {
    pub generations: GenerationIds,
    pub flags: MdFlags,
    pub epoch: Epoch,
    pub primary_since_ms: u64,
    /// The cluster log `epoch` belongs to.
    pub cluster_log: ClusterLogId,
}

impl MdState {
    /// A consistent disk holding generation `current` at `epoch`, nothing else recorded:
    /// where the simulator's replicas and the core tests start.
    pub fn consistent_at(current: u64, epoch: Epoch) -> Self {
        Self {
            generations: GenerationIds {
                current,
                ..Default::default()
            },
            flags: MdFlags {
                consistent: true,
                ..Default::default()
            },
            epoch,
            primary_since_ms: 0,
            cluster_log: ClusterLogId::NONE,
        }
    }
}

/// Outputs of the core, run by the shell in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    LocalWrite {
        tag: IoTag,
        offset: u64,
        len: u64,
        fua: bool,
        data: DataRef,
    },
    LocalTrim {
        tag: IoTag,
        offset: u64,
        len: u64,
        zeroes: bool,
    },
    LocalRead {
        tag: IoTag,
        offset: u64,
        len: u64,
        digest: bool,
    },
    LocalFlush {
        tag: IoTag,
    },
    /// Send a message; `data` is its payload.
    Send {
        msg: Msg,
        data: Option<DataRef>,
    },
    /// Send a message whose (small) payload the core supplies.
    SendBytes {
        msg: Msg,
        bytes: Vec<u8>,
    },
    /// The shell no longer needs to hold this buffer.
    Release(DataRef),
    /// Finish an application request (`Ok(Some(data))` for reads).
    Complete {
        req: ReqId,
        result: Result<Option<DataRef>, IoFailure>,
    },
    /// Start (or keep) connecting to the peer.
    Connect,
    /// Close the transport (the core already treats the connection as lost).
    Disconnect {
        reason: String,
    },
    /// Ask the fencing hook to record the peer as outdated; answer with OutdatePeerDone
    /// carrying the same `request` (only the latest request's answer counts: an old one
    /// may speak of a peer that has resynced since).
    OutdatePeer {
        request: u64,
    },
    /// Synchronous: make the superblock durable.
    PersistSuperblock(MdState),
    /// Synchronous: flush data, then write an activity-log transaction.
    PersistAl {
        extents: Vec<u32>,
    },
    /// Synchronous: write these bitmap blocks (index, words).
    PersistBitmap {
        blocks: Vec<(usize, Vec<u64>)>,
    },
    /// Synchronous: record, somewhere the failed disk cannot take with it (the node's
    /// state directory), that this disk failed. Its own metadata may not take the write
    /// of the forgotten generations, and the same disk may come back with its old,
    /// Consistent-looking metadata; the record makes it take a full sync then
    /// ([`super::metadata_io::forget_generations`]).
    RecordDiskFailure,
    Notify(Notice),
    /// The core stopped after a clean shutdown.
    Stopped,
}

/// Resync rate control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncConfig {
    /// Upper bound in bytes/s (0 = only the disk and network limit).
    pub max_bytes_per_sec: u64,
    /// Floor of the dynamic controller in bytes/s.
    pub min_bytes_per_sec: u64,
    /// Leave room for application writes (throttle to max − application rate).
    pub dynamic: bool,
    /// Bytes per resync request.
    pub request_bytes: u64,
    /// Resync requests in flight.
    pub max_in_flight: usize,
    /// Compare checksums first and send only differing blocks.
    pub checksum: bool,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self {
            max_bytes_per_sec: 0,
            min_bytes_per_sec: 4 << 20,
            dynamic: true,
            request_bytes: 256 << 10,
            max_in_flight: 8,
            checksum: false,
        }
    }
}

/// Static configuration of a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    pub volume_id: VolumeId,
    pub node_id: NodeId,
    pub size_bytes: u64,
    /// Smallest I/O unit (offset and length alignment) for application requests.
    pub block_bytes: u64,
    pub protocol: Protocol,
    pub fencing: FencingPolicy,
    pub split_brain: SplitBrainPolicy,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub bitmap_writeback_ms: u64,
    pub resync: ResyncConfig,
    /// Largest application request in bytes.
    pub max_request_bytes: u64,
}

impl ReplicaConfig {
    /// Defaults for a volume of `size_bytes`.
    pub fn new(volume_id: VolumeId, node_id: NodeId, size_bytes: u64) -> Self {
        Self {
            volume_id,
            node_id,
            size_bytes,
            block_bytes: 512,
            protocol: Protocol::C,
            fencing: FencingPolicy::ResourceAndStonith,
            split_brain: SplitBrainPolicy::Disconnect,
            ping_interval_ms: 1000,
            ping_timeout_ms: 5000,
            bitmap_writeback_ms: 5000,
            resync: ResyncConfig::default(),
            max_request_bytes: 4 << 20,
        }
    }
}

/// What the core starts from (loaded from the on-disk metadata).
#[derive(Debug, Clone)]
pub struct Persisted {
    pub md: MdState,
    pub bitmap: Bitmap,
    pub al_extents: Vec<u32>,
    pub al_extent_bytes: u64,
    pub al_capacity: u32,
    /// The disk could not be opened: start Diskless.
    pub diskless: bool,
}

/// Progress of a running resync, for the status snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub source: bool,
    pub full: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub skipped_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    pub limit_bytes_per_sec: u64,
}

/// The status snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub volume_id: VolumeId,
    pub node_id: NodeId,
    pub size_bytes: u64,
    pub role: Role,
    pub peer_role: Option<Role>,
    pub connection: ConnState,
    pub disk: DiskState,
    pub peer_disk: DiskState,
    pub protocol: Protocol,
    pub generations: GenerationIds,
    pub peer_generations: Option<GenerationIds>,
    pub epoch: Epoch,
    pub out_of_sync_bytes: u64,
    pub sync: Option<SyncProgress>,
    pub io_suspended: bool,
    pub writes_in_flight: usize,
    pub last_refusal: Option<String>,
    pub verify_mismatched_bytes: u64,
    pub stats: Stats,
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub app_writes: u64,
    pub app_write_bytes: u64,
    pub app_reads: u64,
    pub app_flushes: u64,
    pub sent_data_bytes: u64,
    pub received_data_bytes: u64,
    pub resync_sent_bytes: u64,
    pub resync_received_bytes: u64,
    pub resync_skipped_bytes: u64,
    pub peer_protocol_errors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    NotNeeded,
    Pending,
    Done,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerStage {
    /// Sent; waiting for the ack the protocol requires.
    Waiting,
    Done,
    /// Could not be replicated (no connection, or the peer failed it): bitmap marked.
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    Write { fua: bool },
    Trim { zeroes: bool },
}

#[derive(Debug, Clone)]
struct AppWriteState {
    offset: u64,
    len: u64,
    kind: WriteKind,
    local: Stage,
    peer: PeerStage,
    seq: Option<u64>,
    /// The connection this write was replicated on is still up: completing it may mark
    /// its blocks in sync. After a disconnect the bitmap may hold newer news for them
    /// (a later write, an epoch the peer never flushed), so a write completing late — held
    /// for lack of quorum — leaves the bits alone.
    same_link: bool,
    /// When the write started, relative to the others: a resend must keep this order
    /// (overlapping writes started in it), and request ids need not follow it (the
    /// pieces of a split trim have ids of their own).
    started: u64,
}

/// A replicated write the peer has not made durable yet (its epoch is not acked).
#[derive(Debug, Clone, Copy)]
struct Unconfirmed {
    offset: u64,
    len: u64,
    barrier: u32,
    /// Holds an activity-log reference: the extent must stay hot until the peer has the
    /// write durably (or the bitmap records it), else a crash could forget the difference.
    al_pinned: bool,
    /// Marked out of sync in the bitmap as a crash guard (a demote): the peer's ack
    /// makes the blocks in sync again.
    marked: bool,
}

#[derive(Debug, Clone)]
struct FlushState {
    local: Stage,
    barrier: Option<u32>,
    peer_done: bool,
}

#[derive(Debug, Clone)]
enum BlockedOp {
    Write {
        req: ReqId,
        offset: u64,
        len: u64,
        kind: WriteKind,
    },
    /// A flush that arrived while application I/O was held (see `holds_app_io`).
    Flush { req: ReqId },
    /// A trim split into pieces ([`SplitTrim`]): it keeps its place in the queue until its
    /// last piece has started, so that a later request overlapping it waits for it.
    SplitTrim { req: ReqId },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvKind {
    Data { seq: u64, fua: bool, payload: u64 },
    Trim { seq: u64, zeroes: bool },
    Resync { payload: u64 },
}

#[derive(Debug, Clone)]
struct RecvOp {
    offset: u64,
    len: u64,
    kind: RecvKind,
    barrier: u32,
    started: bool,
    /// The connection it arrived on (`Replica::conn_gen`): only that connection may be
    /// answered about it, and its barrier number means something only there.
    conn: u64,
    /// Pinned in the activity log: this node became primary while it was still landing.
    al_pinned: bool,
    /// The primary that sent it had no disk: once written, only this copy holds it,
    /// whatever becomes of the link meanwhile.
    from_diskless: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AloneGate {
    /// Connected (or secondary): not needed.
    Closed,
    /// Waiting for OutdatePeerDone.
    Pending,
    /// The peer is outdated (or policy dont-care): writes may complete alone.
    Open,
    /// The hook failed; I/O stays suspended; retry at the given time.
    Failed { retry_at_ms: u64 },
}

#[derive(Debug, Clone)]
struct ResyncRequest {
    offset: u64,
    len: u64,
    bits: std::ops::Range<u64>,
}

#[derive(Debug, Clone)]
pub(super) struct ResyncState {
    source: bool,
    full: bool,
    cursor: u64,
    in_flight: BTreeMap<u64, ResyncRequest>,
    total_bytes: u64,
    done_bytes: u64,
    skipped_bytes: u64,
    started_ms: u64,
    rate_bytes_per_sec: u64,
    window_bytes: u64,
    window_start_ms: u64,
    tokens: f64,
    last_refill_ms: u64,
}

#[derive(Debug, Clone)]
struct VerifyState {
    cursor: u64,
    in_flight: BTreeMap<u64, (u64, u64)>,
    checked_bytes: u64,
    mismatched_bytes: u64,
}

#[derive(Debug, Clone)]
enum Handshake {
    /// Sent our Hello, waiting for theirs.
    WaitHello,
    /// Decided to sync; exchanging bitmaps.
    Bitmaps {
        decision: Decision,
        received: Vec<u64>,
        sync_gen: Option<u64>,
    },
    /// Target: bitmaps merged, waiting for the source's SyncStart.
    AwaitSyncStart { full: bool },
}

/// One volume's replica.
#[derive(Debug)]
pub struct Replica {
    cfg: ReplicaConfig,
    now_ms: u64,
    rng: u64,
    // states
    role: Role,
    disk: DiskState,
    conn: ConnState,
    peer_role: Option<Role>,
    peer_disk: DiskState,
    peer_generations: Option<GenerationIds>,
    peer_epoch: Epoch,
    want_connect: bool,
    handshake: Option<Handshake>,
    discard_my_data: bool,
    /// The epoch this node sent in its Hello (the split-brain tie-breaker uses it).
    hello_epoch: Epoch,
    last_refusal: Option<String>,
    md: MdState,
    bitmap: Bitmap,
    al: ActivityLog,
    alone: AloneGate,
    alone_generation_done: bool,
    /// No quorum: completions are held and new application I/O queues (see
    /// [`Admin::SuspendIo`]).
    quorum_hold: bool,
    /// Number of the latest `OutdatePeer` request.
    outdate_request: u64,
    // primary side
    writes: BTreeMap<ReqId, AppWriteState>,
    by_seq: BTreeMap<u64, ReqId>,
    /// Replicated writes whose epoch the peer has not flushed yet (seq -> range, barrier):
    /// on a disconnect they are marked out of sync, since the peer may lose them if it
    /// crashes (DRBD's transfer log).
    unconfirmed: BTreeMap<u64, Unconfirmed>,
    /// Writes since the last barrier (an epoch is closed automatically after a while).
    epoch_writes: u64,
    last_barrier_ms: u64,
    flushes: BTreeMap<ReqId, FlushState>,
    blocked: VecDeque<BlockedOp>,
    /// Trims wider than the activity log allows in one piece, by the application's id.
    split_trims: BTreeMap<ReqId, SplitTrim>,
    /// Numbers the writes as they start (`AppWriteState::started`).
    next_write_start: u64,
    /// The pieces of those trims in flight: piece id -> the trim's id.
    trim_pieces: BTreeMap<ReqId, ReqId>,
    next_trim_piece: u64,
    reads: BTreeMap<ReqId, (u64, u64)>,
    /// Application reads served by the peer: request -> bytes asked for.
    peer_reads: BTreeMap<ReqId, u64>,
    /// This node's own writes still on its disk (issued, not done), by request: they
    /// outlive their request — a fenced primary fails a write whose local I/O is still
    /// running — and a received write or resync block to the same place must land after
    /// them, never under them.
    disk_writes: BTreeMap<ReqId, (u64, u64)>,
    /// Local reads (the application's, the peer's, a resync checksum) waiting for a
    /// write to the same blocks that is still landing — received (the old primary may
    /// have acknowledged it on receipt, protocol B) or this node's own (a fenced
    /// request's): every later read must see it. (tag, offset, len, digest)
    reads_waiting: Vec<(IoTag, u64, u64, bool)>,
    next_seq: u64,
    barrier: u32,
    // receiving side
    recv: BTreeMap<u64, RecvOp>,
    next_recv: u64,
    /// Counts connections, for `RecvOp::conn`.
    conn_gen: u64,
    pending_barriers: VecDeque<u32>,
    barrier_flushing: Option<u32>,
    /// The barrier flush in flight belongs to a connection that is gone: its ack would
    /// reach a primary that numbers its barriers afresh, so none is sent.
    barrier_flush_stale: bool,
    /// The first barrier number this node sent on the current connection (primary):
    /// acks outside [first, current) were never asked for here.
    conn_first_barrier: u32,
    // resync and verify
    resync: Option<ResyncState>,
    verify: Option<VerifyState>,
    csum_reads: BTreeMap<u64, (u64, u64, u64)>,
    /// Sync target: the source's generations, adopted once the flush completed.
    sync_done_pending: Option<GenerationIds>,
    verify_peer: BTreeMap<u64, sync::PeerVerify>,
    next_id: u64,
    sync_finished: Option<(bool, u64, u64)>,
    // keepalive
    last_recv_ms: u64,
    last_send_ms: u64,
    last_bitmap_writeback_ms: u64,
    app_window_bytes: u64,
    app_rate_bytes_per_sec: u64,
    app_window_start_ms: u64,
    stats: Stats,
    /// A clean shutdown was asked for: requests are refused and, once every write still
    /// landing on the disk (own or received) has landed, the metadata is written back
    /// and the core stops.
    stopping: bool,
    stopped: bool,
    verify_mismatched_total: u64,
}

/// A range overlap test.
fn overlaps(a_off: u64, a_len: u64, b_off: u64, b_len: u64) -> bool {
    a_off < b_off.saturating_add(b_len) && b_off < a_off.saturating_add(a_len)
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Replica {
    /// A replica starting from its persisted state. `seed` feeds the generation-id RNG.
    /// The returned actions must run first (crash recovery may write metadata).
    pub fn new(cfg: ReplicaConfig, persisted: Persisted, seed: u64) -> (Self, Vec<Action>) {
        let Persisted {
            mut md,
            mut bitmap,
            al_extents,
            al_extent_bytes,
            al_capacity,
            diskless,
        } = persisted;
        let mut al = ActivityLog::new(al_extent_bytes, al_capacity);
        let mut actions = Vec::new();
        if md.flags.primary_crashed && !al_extents.is_empty() {
            // Crash recovery: every extent that was hot may differ from the peer.
            for e in &al_extents {
                let off = u64::from(*e) * al.extent_bytes();
                bitmap.set_range(
                    off,
                    al.extent_bytes().min(cfg.size_bytes.saturating_sub(off)),
                );
            }
            let blocks = Self::bitmap_blocks(&mut bitmap);
            actions.push(Action::PersistBitmap { blocks });
        }
        al.load(&[]);
        if !diskless {
            // The last process did not stop cleanly: this disk may have lost writes from
            // its cache. Known until the node is in sync with its peer again.
            md.flags.cache_lost |= md.flags.open;
            md.flags.open = true;
        }
        let disk = if diskless {
            DiskState::Diskless
        } else if !md.flags.consistent {
            DiskState::Inconsistent
        } else if md.flags.outdated {
            DiskState::Outdated
        } else {
            // Consistent, but whether it is the newest copy is only known once the peer
            // answered (a crash may have dropped writes from the disk cache): the cluster
            // promotes only UpToDate disks.
            DiskState::Consistent
        };
        let mut me = Self {
            cfg,
            now_ms: 0,
            rng: seed ^ 0x5eed_0f7a_9de3,
            role: Role::Secondary,
            disk,
            conn: ConnState::StandAlone,
            peer_role: None,
            peer_disk: DiskState::DUnknown,
            peer_generations: None,
            peer_epoch: Epoch(0),
            want_connect: false,
            handshake: None,
            discard_my_data: false,
            hello_epoch: Epoch(0),
            last_refusal: None,
            md,
            bitmap,
            al,
            alone: AloneGate::Closed,
            alone_generation_done: false,
            quorum_hold: false,
            outdate_request: 0,
            writes: BTreeMap::new(),
            by_seq: BTreeMap::new(),
            unconfirmed: BTreeMap::new(),
            flushes: BTreeMap::new(),
            blocked: VecDeque::new(),
            split_trims: BTreeMap::new(),
            next_write_start: 0,
            trim_pieces: BTreeMap::new(),
            next_trim_piece: 0,
            reads: BTreeMap::new(),
            peer_reads: BTreeMap::new(),
            disk_writes: BTreeMap::new(),
            reads_waiting: Vec::new(),
            next_seq: 1,
            barrier: 1,
            epoch_writes: 0,
            last_barrier_ms: 0,
            recv: BTreeMap::new(),
            next_recv: 1,
            conn_gen: 0,
            pending_barriers: VecDeque::new(),
            barrier_flushing: None,
            barrier_flush_stale: false,
            conn_first_barrier: 1,
            resync: None,
            verify: None,
            csum_reads: BTreeMap::new(),
            sync_done_pending: None,
            verify_peer: BTreeMap::new(),
            next_id: 1,
            sync_finished: None,
            last_recv_ms: 0,
            last_send_ms: 0,
            last_bitmap_writeback_ms: 0,
            app_window_bytes: 0,
            app_rate_bytes_per_sec: 0,
            app_window_start_ms: 0,
            stats: Stats::default(),
            stopping: false,
            stopped: false,
            verify_mismatched_total: 0,
        };
        if !diskless {
            // `open` on disk before anything else is written (the record of the last
            // role stays as it was, for `dump-md`).
            me.persist_sb(&mut actions);
        }
        me.md.flags.was_primary = false;
        (me, actions)
    }

    fn bitmap_blocks(bitmap: &mut Bitmap) -> Vec<(usize, Vec<u64>)> {
        bitmap
            .take_changed_blocks()
            .into_iter()
            .map(|b| (b, bitmap.block_words(b).to_vec()))
            .collect()
    }

    fn new_generation(&mut self) -> u64 {
        loop {
            let g = splitmix(&mut self.rng);
            if g != 0 {
                return g;
            }
        }
    }

    // ----- accessors -----

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The local disk state.
    pub fn disk(&self) -> DiskState {
        self.disk
    }
    /// The connection state.
    pub fn conn(&self) -> ConnState {
        self.conn
    }
    /// The persistent state.
    pub fn md(&self) -> &MdState {
        &self.md
    }
    /// The dirty bitmap.
    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }
    /// Has the core stopped (clean shutdown)?
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
    /// Is a clean shutdown under way or done (nothing but the disk's completions is
    /// taken any more)?
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }
    /// Is a resync running?
    pub fn is_syncing(&self) -> bool {
        matches!(self.conn, ConnState::SyncSource | ConnState::SyncTarget)
    }
    /// Is application I/O suspended: waiting for the fencing hook, or held for lack of
    /// quorum?
    pub fn is_suspended(&self) -> bool {
        (matches!(self.alone, AloneGate::Pending | AloneGate::Failed { .. }) || self.quorum_hold)
            && self.role == Role::Primary
    }
    /// The configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    /// The status snapshot.
    pub fn status(&self) -> Status {
        Status {
            volume_id: self.cfg.volume_id,
            node_id: self.cfg.node_id,
            size_bytes: self.cfg.size_bytes,
            role: self.role,
            peer_role: self.peer_role,
            connection: self.conn,
            disk: self.disk,
            peer_disk: self.peer_disk,
            protocol: self.cfg.protocol,
            generations: self.md.generations,
            peer_generations: self.peer_generations,
            epoch: self.md.epoch,
            out_of_sync_bytes: self.bitmap.dirty_bytes().min(self.cfg.size_bytes),
            sync: self.resync.as_ref().map(|r| self.progress(r)),
            io_suspended: self.is_suspended(),
            writes_in_flight: self.writes.len(),
            last_refusal: self.last_refusal.clone(),
            verify_mismatched_bytes: self.verify_mismatched_total,
            stats: self.stats.clone(),
        }
    }

    fn progress(&self, r: &ResyncState) -> SyncProgress {
        let remaining = self.bitmap.dirty_bytes().min(self.cfg.size_bytes);
        let total = r.total_bytes.max(1);
        let done = total.saturating_sub(remaining);
        let rate = r.rate_bytes_per_sec;
        SyncProgress {
            source: r.source,
            full: r.full,
            total_bytes: r.total_bytes,
            done_bytes: done.min(r.total_bytes),
            skipped_bytes: r.skipped_bytes,
            percent: if r.total_bytes == 0 {
                100.0
            } else {
                // Precision loss is fine for a percentage.
                #[allow(clippy::cast_precision_loss)]
                let p = done as f64 * 100.0 / total as f64;
                p.min(100.0)
            },
            rate_bytes_per_sec: rate,
            eta_secs: (rate > 0).then(|| remaining.div_ceil(rate)),
            limit_bytes_per_sec: self.effective_rate(),
        }
    }

    /// Checks the core's invariants; returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.role == Role::Primary
            && !matches!(self.disk, DiskState::UpToDate | DiskState::Diskless)
        {
            return Err(format!("primary with a {:?} disk", self.disk));
        }
        if self.conn == ConnState::SyncTarget && self.role == Role::Primary {
            return Err("a primary is a sync target".into());
        }
        if self.conn == ConnState::SyncTarget && self.disk != DiskState::Inconsistent {
            return Err(format!("sync target with a {:?} disk", self.disk));
        }
        if self.role == Role::Primary && self.peer_role == Some(Role::Primary) {
            return Err("both nodes primary while connected".into());
        }
        if self.bitmap.count() > self.bitmap.len_bits() {
            return Err("bitmap count exceeds its length".into());
        }
        if self.disk == DiskState::Diskless && self.recv.values().any(|op| !op.started) {
            return Err("diskless node holds received writes it has not started".into());
        }
        for (req, w) in &self.writes {
            if w.local == Stage::Failed && w.peer == PeerStage::Lost {
                return Err(format!(
                    "write {req:?} lost on both sides but still pending"
                ));
            }
        }
        if self.role == Role::Secondary && !self.writes.is_empty() {
            return Err("a secondary has application writes in flight".into());
        }
        let hot = self.al.extents().len();
        if hot > usize::try_from(self.al.capacity()).unwrap_or(usize::MAX) {
            return Err(format!(
                "activity log holds {hot} extents, more than its {}",
                self.al.capacity()
            ));
        }
        if let Some((piece, trim)) = self
            .trim_pieces
            .iter()
            .find(|(_, trim)| !self.split_trims.contains_key(trim))
        {
            return Err(format!(
                "trim piece {piece:?} of {trim:?}, which is not in flight"
            ));
        }
        Ok(())
    }

    fn is_connected(&self) -> bool {
        matches!(
            self.conn,
            ConnState::Connected
                | ConnState::SyncSource
                | ConnState::SyncTarget
                | ConnState::Verifying
                | ConnState::WfBitmap
        )
    }

    /// Can writes be replicated now?
    fn replicating(&self) -> bool {
        matches!(
            self.conn,
            ConnState::Connected
                | ConnState::SyncSource
                | ConnState::SyncTarget
                | ConnState::Verifying
        ) && self.peer_disk != DiskState::Diskless
    }

    // ----- the step function -----

    /// Feeds one event; returns the actions to run, in order.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.stopping && !self.stopped {
            // Only the disk's completions still matter.
            if let Event::LocalDone {
                tag,
                result,
                digest,
            } = event
            {
                self.on_local_done(tag, result, digest, &mut out);
                self.finish_shutdown(&mut out);
                return out;
            }
        }
        if self.stopping {
            if let Event::AppWrite { req, .. }
            | Event::AppTrim { req, .. }
            | Event::AppFlush { req }
            | Event::AppRead { req, .. } = event
            {
                out.push(Action::Complete {
                    req,
                    result: Err(IoFailure::Refused("volume is shut down".into())),
                });
            } else if let Event::Admin(cmd) = event
                && !matches!(cmd, Admin::Shutdown)
            {
                // Said, not swallowed: the cluster must not count on a promotion (or any
                // other change) of a volume that is going away.
                out.push(Action::Notify(Notice::Refused {
                    reason: format!("{cmd:?} refused: the volume is shutting down"),
                }));
            }
            return out;
        }
        match event {
            Event::Tick { now_ms } => self.on_tick(now_ms, &mut out),
            Event::AppWrite {
                req,
                offset,
                len,
                fua,
            } => self.on_app_write(req, offset, len, WriteKind::Write { fua }, &mut out),
            Event::AppTrim {
                req,
                offset,
                len,
                zeroes,
            } => self.on_app_write(req, offset, len, WriteKind::Trim { zeroes }, &mut out),
            Event::AppFlush { req } => self.on_app_flush(req, &mut out),
            Event::AppRead { req, offset, len } => self.on_app_read(req, offset, len, &mut out),
            Event::LocalDone {
                tag,
                result,
                digest,
            } => self.on_local_done(tag, result, digest, &mut out),
            Event::TransportUp => self.on_transport_up(&mut out),
            Event::TransportDown { reason } => {
                if self.conn != ConnState::StandAlone && self.conn != ConnState::Connecting {
                    self.connection_lost(&reason, &mut out);
                }
            }
            Event::PeerMsg {
                msg,
                payload,
                payload_len,
                inline,
            } => {
                self.last_recv_ms = self.now_ms;
                if let Err(reason) = self.on_peer_msg(msg, payload, payload_len, &inline, &mut out)
                {
                    if let Some(key) = payload {
                        out.push(Action::Release(DataRef::Payload(key)));
                    }
                    self.protocol_error(&reason, &mut out);
                }
            }
            Event::PeerGarbage { reason } => {
                if self.conn != ConnState::StandAlone && self.conn != ConnState::Connecting {
                    self.protocol_error(&reason, &mut out);
                }
            }
            Event::MetadataFailed { reason } => {
                self.disk_failed(&format!("metadata write failed: {reason}"), &mut out);
            }
            Event::OutdatePeerDone {
                request,
                ok,
                detail,
            } => {
                if request == self.outdate_request {
                    self.on_outdate_done(ok, &detail, &mut out);
                } else {
                    tracing::debug!(
                        request,
                        latest = self.outdate_request,
                        "ignoring a stale fencing-hook answer"
                    );
                }
            }
            Event::Admin(cmd) => self.on_admin(cmd, &mut out),
        }
        if !self.trim_pieces.is_empty() {
            self.settle_trim_pieces(&mut out);
        }
        out
    }

    /// Turns the completions of trim pieces into progress of their trims: the next pieces
    /// start, and the trim completes when its last piece has (the pieces' own completions
    /// never reach the shell).
    fn settle_trim_pieces(&mut self, out: &mut Vec<Action>) {
        let mut i = 0;
        while i < out.len() {
            let parent = match &out[i] {
                Action::Complete { req, .. } => self.trim_pieces.remove(req),
                _ => None,
            };
            let Some(parent) = parent else {
                i += 1;
                continue;
            };
            let Action::Complete { result, .. } = out.remove(i) else {
                unreachable!("matched above");
            };
            if let Some(trim) = self.split_trims.get_mut(&parent) {
                trim.in_flight = trim.in_flight.saturating_sub(1);
                if let Err(failure) = result {
                    self.fail_split_trim(parent, failure, out);
                }
            }
            self.finish_split_trim(parent, out);
            // More pieces may start now; new actions go to the end, the loop reaches them.
            self.run_blocked(out);
        }
    }

    /// A piece of trim `req` failed (or it cannot go on): no further piece starts.
    fn fail_split_trim(&mut self, req: ReqId, failure: IoFailure, out: &mut Vec<Action>) {
        if let Some(trim) = self.split_trims.get_mut(&req) {
            trim.failure.get_or_insert(failure);
        }
        self.blocked
            .retain(|op| !matches!(op, BlockedOp::SplitTrim { req: r } if *r == req));
        self.finish_split_trim(req, out);
    }

    /// Completes trim `req` once no piece is left to start or in flight.
    fn finish_split_trim(&mut self, req: ReqId, out: &mut Vec<Action>) {
        let Some(trim) = self.split_trims.get_mut(&req) else {
            return;
        };
        if trim.in_flight > 0 || (trim.failure.is_none() && trim.next < trim.end) {
            return;
        }
        let failure = trim.failure.take();
        self.split_trims.remove(&req);
        out.push(Action::Complete {
            req,
            result: failure.map_or(Ok(None), Err),
        });
    }

    /// Starts the next piece of trim `req` if it can start now; false if it must wait.
    /// Called for the trim at the front of the blocked queue.
    fn start_trim_piece(&mut self, req: ReqId, out: &mut Vec<Action>) -> bool {
        let extent = self.al.extent_bytes();
        let Some(trim) = self.split_trims.get(&req) else {
            self.blocked
                .retain(|op| !matches!(op, BlockedOp::SplitTrim { req: r } if *r == req));
            return true;
        };
        if trim.in_flight >= TRIM_PIECE_WINDOW {
            return false;
        }
        let offset = trim.next;
        let end = (offset / extent + 1).saturating_mul(extent).min(trim.end);
        let kind = WriteKind::Trim {
            zeroes: trim.zeroes,
        };
        if self.role != Role::Primary {
            self.fail_split_trim(
                req,
                IoFailure::Refused("the volume was demoted".into()),
                out,
            );
            return true;
        }
        if self.disk == DiskState::Diskless && !self.replicating() {
            let failure = IoFailure::Io("no local disk and no connected peer disk".into());
            self.fail_split_trim(req, failure, out);
            return true;
        }
        if self.write_conflicts(offset, end - offset) || !self.al_admits(offset, end - offset, out)
        {
            return false;
        }
        let piece = ReqId(ReqId::TRIM_PIECE | self.next_trim_piece);
        self.next_trim_piece = (self.next_trim_piece + 1) & !ReqId::TRIM_PIECE;
        self.trim_pieces.insert(piece, req);
        if let Some(trim) = self.split_trims.get_mut(&req) {
            trim.next = end;
            trim.in_flight += 1;
            if trim.next >= trim.end {
                // The last piece: the trim leaves the queue; later requests that overlap
                // it now wait for its pieces like for any write in flight.
                self.blocked
                    .retain(|op| !matches!(op, BlockedOp::SplitTrim { req: r } if *r == req));
            }
        }
        self.start_write(piece, offset, end - offset, kind, out);
        true
    }

    // ----- time -----

    fn on_tick(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        // Application throughput, for the dynamic resync controller.
        if now.saturating_sub(self.app_window_start_ms) >= 200 {
            let dt = now - self.app_window_start_ms;
            self.app_rate_bytes_per_sec = self.app_window_bytes * 1000 / dt.max(1);
            self.app_window_bytes = 0;
            self.app_window_start_ms = now;
        }
        if self.conn != ConnState::StandAlone && self.conn != ConnState::Connecting {
            if now.saturating_sub(self.last_recv_ms) >= self.cfg.ping_timeout_ms {
                out.push(Action::Disconnect {
                    reason: "peer timed out".into(),
                });
                self.connection_lost("peer timed out", out);
            } else if now.saturating_sub(self.last_send_ms) >= self.cfg.ping_interval_ms {
                self.send(Msg::Ping, None, out);
            }
        }
        // Close the epoch now and then, so the peer flushes and the transfer log stays short.
        if self.replicating()
            && self.epoch_writes > 0
            && (self.epoch_writes >= 1024 || now.saturating_sub(self.last_barrier_ms) >= 100)
        {
            self.send_barrier(out);
        }
        if let AloneGate::Failed { retry_at_ms } = self.alone
            && now >= retry_at_ms
            && self.role == Role::Primary
            && !self.is_connected()
        {
            self.alone = AloneGate::Pending;
            self.ask_outdate(out);
        }
        if now.saturating_sub(self.last_bitmap_writeback_ms) >= self.cfg.bitmap_writeback_ms {
            self.last_bitmap_writeback_ms = now;
            let blocks = Self::bitmap_blocks(&mut self.bitmap);
            if !blocks.is_empty() {
                out.push(Action::PersistBitmap { blocks });
            }
        }
        self.pump_resync(out);
        self.pump_verify(out);
    }

    fn send(&mut self, msg: Msg, data: Option<DataRef>, out: &mut Vec<Action>) {
        self.last_send_ms = self.now_ms;
        out.push(Action::Send { msg, data });
    }

    fn persist_sb(&self, out: &mut Vec<Action>) {
        out.push(Action::PersistSuperblock(self.md.clone()));
    }

    fn set_disk(&mut self, disk: DiskState, out: &mut Vec<Action>) {
        if self.disk != disk {
            self.disk = disk;
            out.push(Action::Notify(Notice::Disk { state: disk }));
            if self.is_connected() {
                self.send_state(out);
            }
        }
    }

    fn set_conn(&mut self, conn: ConnState, out: &mut Vec<Action>) {
        if self.conn != conn {
            self.conn = conn;
            out.push(Action::Notify(Notice::Connection { state: conn }));
        }
    }

    fn set_role(&mut self, role: Role, out: &mut Vec<Action>) {
        if self.role != role {
            self.role = role;
            // A hold is a primary's: whoever demoted it failed what was held.
            self.quorum_hold = false;
            out.push(Action::Notify(Notice::Role { role }));
            if self.is_connected() {
                self.send_state(out);
            }
        }
    }

    fn send_state(&mut self, out: &mut Vec<Action>) {
        let msg = Msg::StateUpdate {
            role: self.role,
            disk: self.disk,
            epoch: self.md.epoch,
        };
        self.send(msg, None, out);
    }

    // ----- application I/O (primary side) -----

    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoFailure> {
        let b = self.cfg.block_bytes.max(1);
        if len == 0 || !offset.is_multiple_of(b) || !len.is_multiple_of(b) {
            return Err(IoFailure::Refused(format!(
                "offset {offset} and length {len} must be non-empty multiples of {b}"
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.cfg.size_bytes => Ok(()),
            _ => Err(IoFailure::Refused(format!(
                "range {offset}+{len} is beyond the volume size {}",
                self.cfg.size_bytes
            ))),
        }
    }

    fn on_app_write(
        &mut self,
        req: ReqId,
        offset: u64,
        len: u64,
        kind: WriteKind,
        out: &mut Vec<Action>,
    ) {
        let refuse = |reason: String, out: &mut Vec<Action>| {
            out.push(Action::Complete {
                req,
                result: Err(IoFailure::Refused(reason)),
            });
        };
        if self.role != Role::Primary {
            return refuse("the volume is secondary here (read-only)".into(), out);
        }
        if let Err(e) = self.check_range(offset, len) {
            out.push(Action::Complete {
                req,
                result: Err(e),
            });
            return;
        }
        if matches!(kind, WriteKind::Write { .. }) && len > self.cfg.max_request_bytes {
            return refuse(
                format!(
                    "write of {len} bytes exceeds the {}-byte limit",
                    self.cfg.max_request_bytes
                ),
                out,
            );
        }
        if req.is_trim_piece() {
            return refuse(format!("request id {} is out of range", req.0), out);
        }
        if let WriteKind::Trim { zeroes } = kind
            && self.al.extents_of(offset, len).len() > TRIM_SPLIT_EXTENTS
        {
            self.stats.app_writes += 1;
            self.stats.app_write_bytes += len;
            self.split_trims.insert(
                req,
                SplitTrim {
                    next: offset,
                    end: offset + len,
                    zeroes,
                    in_flight: 0,
                    failure: None,
                },
            );
            self.blocked.push_back(BlockedOp::SplitTrim { req });
            self.run_blocked(out);
            return;
        }
        if self.disk != DiskState::Diskless && !self.al.could_ever_hold(offset, len) {
            return refuse(
                format!(
                    "a write of {len} bytes at {offset} spans more extents than the activity \
                     log's {} (raise al_extents)",
                    self.al.capacity()
                ),
                out,
            );
        }
        if self.disk == DiskState::Diskless && !self.replicating() {
            out.push(Action::Complete {
                req,
                result: Err(IoFailure::Io(
                    "no local disk and no connected peer disk".into(),
                )),
            });
            return;
        }
        self.stats.app_writes += 1;
        self.stats.app_write_bytes += len;
        self.app_window_bytes += len;
        if self.holds_app_io()
            || !self.blocked.is_empty()
            || self.write_conflicts(offset, len)
            || !self.al_admits(offset, len, out)
        {
            self.blocked.push_back(BlockedOp::Write {
                req,
                offset,
                len,
                kind,
            });
            return;
        }
        self.start_write(req, offset, len, kind, out);
    }

    /// Is application I/O held back? A primary exchanging bitmaps with its peer (the
    /// handshake decided that it is the sync source) can neither replicate a write yet nor
    /// complete it alone: its peer is connected, so asking the cluster to outdate it is
    /// wrong — and when the cluster could not answer (no leader), the write waited for a
    /// fencing hook that is retried only while disconnected, the resync waited for the
    /// write, and both hung for good. The exchange takes one round trip; the held requests
    /// start once the resync runs (replicated, like every write during a resync) or once
    /// the connection is lost (alone, behind the fencing gate).
    /// Without quorum nothing new starts either (it could not be acknowledged).
    fn holds_app_io(&self) -> bool {
        self.role == Role::Primary && (self.conn == ConnState::WfBitmap || self.quorum_hold)
    }

    /// Has the activity log room for a write to this range now? If not, the write waits
    /// until pinned extents go idle, and the current epoch is closed at once: the peer's
    /// BarrierAck is what releases the extents of writes it has not confirmed as durable.
    /// (Writes pinned only by their own local I/O release theirs when they complete.)
    fn al_admits(&mut self, offset: u64, len: u64, out: &mut Vec<Action>) -> bool {
        if self.disk == DiskState::Diskless || self.al.has_room_for(offset, len) {
            return true;
        }
        if self.replicating() && self.epoch_writes > 0 {
            self.send_barrier(out);
        }
        false
    }

    /// Must this write wait: it overlaps a write whose local part is not done, a write
    /// received from the peer that is still being applied (a node just promoted may have
    /// some from the old primary), or a resync/verify request in flight.
    fn write_conflicts(&self, offset: u64, len: u64) -> bool {
        self.write_landing_on(offset, len)
            || self.resync.as_ref().is_some_and(|r| {
                r.in_flight
                    .values()
                    .any(|q| overlaps(offset, len, q.offset, q.len))
            })
            || self.verify.as_ref().is_some_and(|v| {
                v.in_flight
                    .values()
                    .any(|&(o, l)| overlaps(offset, len, o, l))
            })
    }

    fn start_write(
        &mut self,
        req: ReqId,
        offset: u64,
        len: u64,
        kind: WriteKind,
        out: &mut Vec<Action>,
    ) {
        let has_disk = self.disk != DiskState::Diskless;
        let al_change = if has_disk {
            // Admitted by `al_admits` (or the range is hot already): there is room.
            match self.al.begin(offset, len) {
                Ok(change) => change,
                Err(_) => {
                    self.blocked.push_front(BlockedOp::Write {
                        req,
                        offset,
                        len,
                        kind,
                    });
                    return;
                }
            }
        } else {
            None
        };
        if let Some(change) = al_change {
            if !change.evicted.is_empty() {
                let blocks = Self::bitmap_blocks(&mut self.bitmap);
                if !blocks.is_empty() {
                    out.push(Action::PersistBitmap { blocks });
                }
            }
            out.push(Action::PersistAl {
                extents: self.al.extents(),
            });
        }
        let mut state = AppWriteState {
            offset,
            len,
            kind,
            local: if has_disk {
                Stage::Pending
            } else {
                Stage::NotNeeded
            },
            peer: PeerStage::Lost,
            seq: None,
            same_link: true,
            started: self.next_write_start,
        };
        self.next_write_start += 1;
        if self.replicating() {
            let (seq, peer) = self.replicate(req, offset, len, kind, has_disk, out);
            state.seq = Some(seq);
            state.peer = peer;
        } else {
            self.bitmap.set_range(offset, len);
            self.need_alone(out);
        }
        if has_disk {
            self.disk_writes.insert(req, (offset, len));
            match kind {
                WriteKind::Write { fua } => out.push(Action::LocalWrite {
                    tag: IoTag::App(req),
                    offset,
                    len,
                    fua,
                    data: DataRef::App(req),
                }),
                WriteKind::Trim { zeroes } => out.push(Action::LocalTrim {
                    tag: IoTag::App(req),
                    offset,
                    len,
                    zeroes,
                }),
            }
        }
        self.writes.insert(req, state);
        self.try_complete_write(req, out);
    }

    /// Sends write `req` to the peer under a new sequence number, kept in the transfer log
    /// until the peer acknowledges its epoch; returns the number and what the write now
    /// waits for.
    fn replicate(
        &mut self,
        req: ReqId,
        offset: u64,
        len: u64,
        kind: WriteKind,
        pin_al: bool,
        out: &mut Vec<Action>,
    ) -> (u64, PeerStage) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_seq.insert(seq, req);
        self.unconfirmed.insert(
            seq,
            Unconfirmed {
                offset,
                len,
                barrier: self.barrier,
                al_pinned: pin_al,
                marked: false,
            },
        );
        if pin_al {
            // A second reference, dropped when the peer confirms durability. The range is
            // pinned by the write itself, so this never needs room.
            let _already_hot = self.al.begin(offset, len);
        }
        self.epoch_writes += 1;
        let msg = match kind {
            WriteKind::Write { fua } => Msg::Data {
                seq,
                offset,
                len: u32::try_from(len).unwrap_or(u32::MAX),
                fua,
                barrier: self.barrier,
            },
            WriteKind::Trim { zeroes } => Msg::Trim {
                seq,
                offset,
                len,
                zeroes,
                barrier: self.barrier,
            },
        };
        let data = matches!(kind, WriteKind::Write { .. }).then_some(DataRef::App(req));
        self.stats.sent_data_bytes += len;
        self.send(msg, data, out);
        let peer = if self.cfg.protocol == Protocol::A {
            PeerStage::Done
        } else {
            PeerStage::Waiting
        };
        (seq, peer)
    }

    /// The peer is connected again and takes writes (the handshake ended in `Connected` or
    /// `SyncSource`): what still waits for the fencing gate goes to the peer instead, as
    /// DRBD resends its transfer log when the connection returns while I/O is suspended
    /// for fencing. Writes the peer never acknowledged are sent again (their blocks stay
    /// marked for the resync until the peer acks them), flushes get a barrier after them,
    /// and the gate closes. Waiting for the hook instead would be wrong twice over: while
    /// connected a failed hook was never retried (the writes hung, and a resync with
    /// them), and a late success would start a new data generation while the peer keeps
    /// receiving writes — a peer labelled with the old generation yet holding newer
    /// acknowledged writes, which a crash of this primary would then sync away.
    fn resend_gate_waiters(&mut self, out: &mut Vec<Action>) {
        if self.role != Role::Primary || !self.replicating() {
            return;
        }
        // In the order they started: the peer must apply overlapping writes in it.
        let mut lost: Vec<(u64, ReqId)> = self
            .writes
            .iter()
            .filter(|(_, w)| w.peer == PeerStage::Lost)
            .map(|(req, w)| (w.started, *req))
            .collect();
        lost.sort_unstable();
        let lost: Vec<ReqId> = lost.into_iter().map(|(_, req)| req).collect();
        let pin_al = self.disk != DiskState::Diskless;
        for req in &lost {
            let Some(&AppWriteState {
                offset,
                len,
                kind,
                local,
                ..
            }) = self.writes.get(req)
            else {
                continue;
            };
            let (seq, peer) = self.replicate(
                *req,
                offset,
                len,
                kind,
                pin_al && local != Stage::NotNeeded,
                out,
            );
            if let Some(w) = self.writes.get_mut(req) {
                w.seq = Some(seq);
                w.peer = peer;
            }
        }
        let flushes: Vec<ReqId> = self
            .flushes
            .iter()
            .filter(|(_, f)| f.barrier.is_none() && !f.peer_done)
            .map(|(req, _)| *req)
            .collect();
        if !flushes.is_empty() {
            let number = self.send_barrier(out);
            for req in &flushes {
                if let Some(f) = self.flushes.get_mut(req) {
                    f.barrier = Some(number);
                }
            }
        }
        self.close_gate(out);
        for req in lost {
            self.try_complete_write(req, out);
        }
    }

    /// Once connected and no write or flush waits for the fencing gate, close it: the
    /// next disconnect must fence again.
    fn gate_waiters(&self) -> bool {
        self.writes.values().any(|w| w.peer == PeerStage::Lost)
            || self
                .flushes
                .values()
                .any(|f| f.barrier.is_none() && !f.peer_done)
    }

    fn maybe_close_gate(&mut self, out: &mut Vec<Action>) {
        if self.is_connected() && !self.gate_waiters() {
            self.close_gate(out);
        }
    }

    /// The peer is back and nothing waits for the fencing gate: the next disconnect must
    /// fence (and start a generation) again.
    fn close_gate(&mut self, out: &mut Vec<Action>) {
        if self.is_suspended() {
            out.push(Action::Notify(Notice::IoResumed));
        }
        self.alone = AloneGate::Closed;
        self.alone_generation_done = false;
    }

    /// The write needs to complete without the peer: engage the fencing gate.
    fn need_alone(&mut self, out: &mut Vec<Action>) {
        if self.role != Role::Primary {
            return;
        }
        match self.alone {
            AloneGate::Open | AloneGate::Pending | AloneGate::Failed { .. } => {}
            AloneGate::Closed => match self.cfg.fencing {
                FencingPolicy::DontCare => self.open_alone(out),
                _ => {
                    self.alone = AloneGate::Pending;
                    out.push(Action::Notify(Notice::IoSuspended {
                        reason: "waiting for the fencing hook to outdate the peer".into(),
                    }));
                    self.ask_outdate(out);
                }
            },
        }
    }

    fn ask_outdate(&mut self, out: &mut Vec<Action>) {
        self.outdate_request += 1;
        out.push(Action::OutdatePeer {
            request: self.outdate_request,
        });
    }

    fn open_alone(&mut self, out: &mut Vec<Action>) {
        let was_suspended = matches!(self.alone, AloneGate::Pending | AloneGate::Failed { .. });
        self.alone = AloneGate::Open;
        let gens = self.md.generations;
        // A bitmap generation other than the current one means the peer is already
        // behind (at it or older) and every change since is in the bitmap: a new
        // generation adds nothing, and each one pushes the peer's further out of the
        // two-deep history until the pair refuses each other as unrelated (seed 15751,
        // a primary cut off again and again). DRBD starts a new current UUID only when
        // its bitmap UUID is empty, for the same reason.
        let peer_already_behind = gens.bitmap != 0 && gens.bitmap != gens.current;
        if !self.alone_generation_done && self.disk != DiskState::Diskless && !peer_already_behind {
            self.alone_generation_done = true;
            let g = self.new_generation();
            self.md.generations.start_new(g);
            self.persist_sb(out);
            out.push(Action::Notify(Notice::Generations {
                generations: self.md.generations,
            }));
        }
        if was_suspended {
            out.push(Action::Notify(Notice::IoResumed));
        }
        self.retry_completions(out);
    }

    /// A gate opened (fencing done, quorum back): complete what waited for it.
    fn retry_completions(&mut self, out: &mut Vec<Action>) {
        let reqs: Vec<ReqId> = self.writes.keys().copied().collect();
        for req in reqs {
            self.try_complete_write(req, out);
        }
        let flushes: Vec<ReqId> = self.flushes.keys().copied().collect();
        for req in flushes {
            self.try_complete_flush(req, out);
        }
    }

    fn on_outdate_done(&mut self, ok: bool, detail: &str, out: &mut Vec<Action>) {
        if self.alone != AloneGate::Pending {
            return;
        }
        if ok || self.cfg.fencing == FencingPolicy::ResourceOnly || self.role != Role::Primary {
            self.peer_disk = DiskState::Outdated;
            out.push(Action::Notify(Notice::PeerDisk {
                state: DiskState::Outdated,
            }));
            self.open_alone(out);
        } else {
            self.alone = AloneGate::Failed {
                retry_at_ms: self.now_ms + 1000,
            };
            out.push(Action::Notify(Notice::IoSuspended {
                reason: format!("fencing the peer failed: {detail}"),
            }));
        }
    }

    fn try_complete_write(&mut self, req: ReqId, out: &mut Vec<Action>) {
        let Some(w) = self.writes.get(&req) else {
            return;
        };
        let alone_ok = self.alone == AloneGate::Open;
        let peer_ok = match w.peer {
            PeerStage::Done => true,
            PeerStage::Waiting => false,
            PeerStage::Lost => alone_ok,
        };
        let result = match (w.local, w.peer) {
            (Stage::Pending, _) => return,
            (Stage::Failed | Stage::NotNeeded, PeerStage::Lost) => Err(IoFailure::Io(
                "the write reached neither the local disk nor the peer".into(),
            )),
            (Stage::Failed | Stage::NotNeeded, PeerStage::Waiting) => return,
            (Stage::Failed | Stage::NotNeeded, PeerStage::Done) => Ok(None),
            (Stage::Done, _) if peer_ok => Ok(None),
            (Stage::Done, _) => return,
        };
        if result.is_ok() && self.quorum_hold {
            // Done, but not acknowledged while this primary may have been replaced.
            return;
        }
        let w = self.writes.remove(&req).expect("present: checked above");
        if w.local != Stage::NotNeeded {
            self.al.end(w.offset, w.len);
        }
        if let Some(seq) = w.seq {
            self.by_seq.remove(&seq);
        }
        if result.is_ok()
            && w.local == Stage::Done
            && w.peer == PeerStage::Done
            && w.same_link
            && self.cfg.protocol == Protocol::C
        {
            // Now on both disks: covered blocks are in sync (helps a running resync).
            self.bitmap.clear_covered(w.offset, w.len);
        }
        out.push(Action::Complete { req, result });
        self.maybe_close_gate(out);
        self.run_blocked(out);
    }

    fn run_blocked(&mut self, out: &mut Vec<Action>) {
        while !self.holds_app_io()
            && let Some(op) = self.blocked.front()
        {
            match *op {
                BlockedOp::Write {
                    req,
                    offset,
                    len,
                    kind,
                } => {
                    if self.write_conflicts(offset, len) || !self.al_admits(offset, len, out) {
                        break;
                    }
                    self.blocked.pop_front();
                    if self.role != Role::Primary {
                        out.push(Action::Complete {
                            req,
                            result: Err(IoFailure::Refused("the volume was demoted".into())),
                        });
                        continue;
                    }
                    self.start_write(req, offset, len, kind, out);
                }
                BlockedOp::Flush { req } => {
                    self.blocked.pop_front();
                    self.start_flush(req, out);
                }
                BlockedOp::SplitTrim { req } => {
                    if !self.start_trim_piece(req, out) {
                        break;
                    }
                }
            }
        }
        self.pump_resync(out);
    }

    fn on_app_flush(&mut self, req: ReqId, out: &mut Vec<Action>) {
        self.stats.app_flushes += 1;
        if self.holds_app_io() {
            self.blocked.push_back(BlockedOp::Flush { req });
            return;
        }
        self.start_flush(req, out);
    }

    fn start_flush(&mut self, req: ReqId, out: &mut Vec<Action>) {
        let has_disk = self.disk != DiskState::Diskless;
        let mut state = FlushState {
            local: if has_disk {
                Stage::Pending
            } else {
                Stage::NotNeeded
            },
            barrier: None,
            peer_done: false,
        };
        if self.role == Role::Primary && self.replicating() {
            state.barrier = Some(self.send_barrier(out));
        } else if self.role == Role::Primary {
            self.need_alone(out);
        } else {
            // A secondary has no writes of its own to make durable beyond its disk.
            state.peer_done = true;
        }
        if has_disk {
            out.push(Action::LocalFlush {
                tag: IoTag::App(req),
            });
        }
        self.flushes.insert(req, state);
        self.try_complete_flush(req, out);
    }

    /// Closes the current epoch; returns its number.
    fn send_barrier(&mut self, out: &mut Vec<Action>) -> u32 {
        let number = self.barrier;
        self.barrier = self.barrier.wrapping_add(1).max(1);
        self.epoch_writes = 0;
        self.last_barrier_ms = self.now_ms;
        self.send(Msg::Barrier { number }, None, out);
        number
    }

    fn try_complete_flush(&mut self, req: ReqId, out: &mut Vec<Action>) {
        let Some(f) = self.flushes.get(&req) else {
            return;
        };
        let peer_ok = f.peer_done || (f.barrier.is_none() && self.alone == AloneGate::Open);
        let result = match f.local {
            Stage::Pending => return,
            Stage::Done | Stage::NotNeeded if peer_ok => Ok(None),
            Stage::Failed if f.peer_done && f.barrier.is_some() => Ok(None),
            Stage::Failed if !self.replicating() => {
                Err(IoFailure::Io("flush failed on the local disk".into()))
            }
            _ => return,
        };
        if result.is_ok() && self.quorum_hold {
            return;
        }
        self.flushes.remove(&req);
        out.push(Action::Complete { req, result });
        self.maybe_close_gate(out);
    }

    fn on_app_read(&mut self, req: ReqId, offset: u64, len: u64, out: &mut Vec<Action>) {
        if let Err(e) = self.check_range(offset, len) {
            out.push(Action::Complete {
                req,
                result: Err(e),
            });
            return;
        }
        if len > self.cfg.max_request_bytes {
            out.push(Action::Complete {
                req,
                result: Err(IoFailure::Refused(format!(
                    "read of {len} bytes exceeds the {}-byte limit",
                    self.cfg.max_request_bytes
                ))),
            });
            return;
        }
        self.stats.app_reads += 1;
        let local_ok = matches!(self.disk, DiskState::UpToDate)
            || (self.disk == DiskState::Outdated && self.role == Role::Secondary);
        if local_ok {
            self.reads.insert(req, (offset, len));
            self.read_after_writes_in_flight(IoTag::App(req), offset, len, false, out);
        } else if self.is_connected() && self.peer_disk == DiskState::UpToDate {
            self.peer_reads.insert(req, len);
            let msg = Msg::ReadRequest {
                id: req.0,
                offset,
                len: u32::try_from(len).unwrap_or(u32::MAX),
            };
            self.send(msg, None, out);
        } else {
            out.push(Action::Complete {
                req,
                result: Err(IoFailure::Io(format!(
                    "no up-to-date disk to read from (local disk {:?})",
                    self.disk
                ))),
            });
        }
    }

    /// Reads now, or once no write to these blocks is still landing.
    pub(super) fn read_after_writes_in_flight(
        &mut self,
        tag: IoTag,
        offset: u64,
        len: u64,
        digest: bool,
        out: &mut Vec<Action>,
    ) {
        if self.write_landing_on(offset, len) {
            self.reads_waiting.push((tag, offset, len, digest));
        } else {
            out.push(Action::LocalRead {
                tag,
                offset,
                len,
                digest,
            });
        }
    }

    /// Is a write still landing on this range — received from the peer, or this node's
    /// own (possibly of a request that already failed)?
    pub(super) fn write_landing_on(&self, offset: u64, len: u64) -> bool {
        self.recv
            .values()
            .map(|op| (op.offset, op.len))
            .chain(self.disk_writes.values().copied())
            .any(|(o, l)| overlaps(offset, len, o, l))
    }

    /// A write landed: the reads that waited for it may run.
    fn retry_waiting_reads(&mut self, out: &mut Vec<Action>) {
        for (tag, offset, len, digest) in std::mem::take(&mut self.reads_waiting) {
            self.read_after_writes_in_flight(tag, offset, len, digest, out);
        }
    }

    // ----- local completions -----

    fn on_local_done(
        &mut self,
        tag: IoTag,
        result: Result<(), String>,
        digest: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        let mut failed = result.as_ref().err().cloned();
        if failed.is_none() && self.disk == DiskState::Diskless {
            // It landed on a disk detached since it started (the metadata device failed
            // while the data device still works): no copy counts there, the disk's next
            // start takes a full sync from the peer. Acknowledged on it, a write would
            // have no copy anywhere once the peer is gone.
            failed = Some("completed on a disk that was detached meanwhile".to_owned());
        }
        if let Some(reason) = &failed {
            self.disk_failed(reason, out);
        }
        match tag {
            IoTag::App(req) => {
                if let Some((offset, len)) = self.disk_writes.remove(&req) {
                    if !self.writes.contains_key(&req) {
                        // Its request failed (fenced) while it ran: the extent it kept
                        // may go now, and writes to the same blocks may start.
                        self.al.end(offset, len);
                        self.run_blocked(out);
                    }
                    if !self.recv.is_empty() {
                        // A received write may have waited for this one.
                        self.pump_recv(out);
                    }
                    self.retry_waiting_reads(out);
                }
                if let Some((offset, len)) = self.reads.remove(&req) {
                    if failed.is_none() {
                        out.push(Action::Complete {
                            req,
                            result: Ok(Some(DataRef::Read(tag))),
                        });
                    } else if self.is_connected() && self.peer_disk == DiskState::UpToDate {
                        // Retry the read on the peer.
                        self.peer_reads.insert(req, len);
                        let msg = Msg::ReadRequest {
                            id: req.0,
                            offset,
                            len: u32::try_from(len).unwrap_or(u32::MAX),
                        };
                        self.send(msg, None, out);
                    } else {
                        out.push(Action::Complete {
                            req,
                            result: Err(IoFailure::Io(format!(
                                "read failed: {}",
                                failed.unwrap_or_default()
                            ))),
                        });
                    }
                } else if let Some(w) = self.writes.get_mut(&req) {
                    w.local = if failed.is_none() {
                        Stage::Done
                    } else {
                        Stage::Failed
                    };
                    self.try_complete_write(req, out);
                    self.run_blocked(out);
                } else if let Some(f) = self.flushes.get_mut(&req) {
                    f.local = if failed.is_none() {
                        Stage::Done
                    } else {
                        Stage::Failed
                    };
                    self.try_complete_flush(req, out);
                }
            }
            IoTag::Recv(n) => self.on_recv_done(n, failed.is_none(), out),
            IoTag::Barrier(number) => {
                self.barrier_flushing = None;
                let stale = std::mem::take(&mut self.barrier_flush_stale);
                if self.is_connected() && !stale {
                    self.send(Msg::BarrierAck { number }, None, out);
                }
                self.pump_barriers(out);
            }
            IoTag::ResyncRead(id) => self.on_resync_read(id, failed.is_none(), digest, out),
            IoTag::CsumRead(id) => self.on_csum_read(id, failed.is_none(), digest, out),
            IoTag::VerifyRead(id) => self.on_verify_read(id, failed.is_none(), digest, out),
            IoTag::VerifyPeerRead(id) => {
                self.on_verify_peer_read(id, failed.is_none(), digest, out);
            }
            IoTag::CsumFlush(id) => {
                if let Some((offset, len, _)) = self.csum_reads.remove(&id)
                    && failed.is_none()
                    && self.is_connected()
                {
                    self.bitmap.clear_covered(offset, len);
                    let len = u32::try_from(len).unwrap_or(u32::MAX);
                    self.send(Msg::ResyncInSync { offset, len }, None, out);
                }
            }
            IoTag::SyncDone => {
                if let Some(generations) = self.sync_done_pending.take()
                    && failed.is_none()
                    && self.conn == ConnState::SyncTarget
                {
                    self.adopt_sync(generations, out);
                }
            }
            IoTag::PeerRead(id) => {
                if self.is_connected() {
                    let ok = failed.is_none();
                    let data = ok.then_some(DataRef::Read(tag));
                    self.send(Msg::ReadReply { id, ok }, data, out);
                } else if failed.is_none() {
                    out.push(Action::Release(DataRef::Read(tag)));
                }
            }
        }
    }

    /// The local disk failed: detach it and serve through the peer where possible.
    fn disk_failed(&mut self, reason: &str, out: &mut Vec<Action>) {
        if self.disk == DiskState::Diskless {
            return;
        }
        out.push(Action::Notify(Notice::DiskFailed {
            reason: reason.to_owned(),
        }));
        self.md.flags.consistent = false;
        // Whatever comes back on this device (repaired or replaced) takes a full sync:
        // writes that failed on it, or were cached when it died, are in no bitmap, and
        // the peer does not track what this node writes through it meanwhile. A bitmap
        // resync after a failure left blocks differing (seeds 15687, 42787).
        self.md.generations = GenerationIds::default();
        // That superblock write goes to the failed disk and may well fail: the record
        // does not (seed 10821: the primary's disk failed under a trim that landed on the
        // peer alone, the link broke before the peer learned, and the same disk came back
        // later with its old metadata, in sync by every generation and bit).
        out.push(Action::RecordDiskFailure);
        self.persist_sb(out);
        self.set_disk(DiskState::Diskless, out);
        // What landed on the failed disk is as good as lost: a write or flush whose local
        // part was done needs the peer now (seed 15741: a diskless primary completed,
        // through the fencing gate, a write whose only copy was on its dead disk).
        for w in self.writes.values_mut() {
            if w.local == Stage::Done {
                w.local = Stage::Failed;
            }
        }
        for f in self.flushes.values_mut() {
            if f.local == Stage::Done {
                f.local = Stage::Failed;
            }
        }
        // Received writes not started yet will never reach a disk: the primary learns at
        // once (it marks them out of sync), as for those arriving from now on. Those
        // started finish on the failing disk and are answered by their result.
        let unstarted: Vec<u64> = self
            .recv
            .iter()
            .filter(|(_, op)| !op.started)
            .map(|(n, _)| *n)
            .collect();
        for n in unstarted {
            let Some(op) = self.drop_received(n, out) else {
                continue;
            };
            if let RecvKind::Data { seq, .. } | RecvKind::Trim { seq, .. } = op.kind
                && self.is_connected()
                && op.conn == self.conn_gen
            {
                self.send(Msg::NegAck { seq }, None, out);
            }
        }
        self.pump_barriers(out);
        if self.conn == ConnState::SyncTarget || self.conn == ConnState::SyncSource {
            self.resync = None;
            self.set_conn(ConnState::Connected, out);
        }
        // Writes and flushes whose local part no longer counts may be decided now: with
        // their peer part lost too, they fail (seed 5073: the metadata device failed
        // after the link did, and a write done on both sides but confirmed on neither
        // waited for ever).
        self.retry_completions(out);
    }

    // ----- connection -----

    fn on_transport_up(&mut self, out: &mut Vec<Action>) {
        if !self.want_connect {
            out.push(Action::Disconnect {
                reason: "not connecting (standalone)".into(),
            });
            return;
        }
        self.last_recv_ms = self.now_ms;
        self.handshake = Some(Handshake::WaitHello);
        self.set_conn(ConnState::Handshaking, out);
        self.hello_epoch = self.md.epoch;
        let hello = Msg::Hello(self.hello());
        self.send(hello, None, out);
    }

    fn hello(&self) -> Hello {
        Hello {
            volume_id: self.cfg.volume_id,
            node_id: self.cfg.node_id,
            size_bytes: self.cfg.size_bytes,
            generations: self.md.generations,
            role: self.role,
            disk: self.disk,
            epoch: self.md.epoch,
            protocol: self.cfg.protocol,
            bitmap_granularity: self.bitmap.granularity(),
            dirty_bits: self.bitmap.count(),
            primary_since_ms: self.md.primary_since_ms,
            // A live primary has not crashed; the flag speaks for a restarted node.
            primary_crashed: self.md.flags.primary_crashed && self.role != Role::Primary,
            cache_lost: self.md.flags.cache_lost,
            discard_my_data: self.discard_my_data,
        }
    }

    fn refuse(&mut self, reason: &str, retry: bool, out: &mut Vec<Action>) {
        self.last_refusal = Some(reason.to_owned());
        out.push(Action::Notify(Notice::Refused {
            reason: reason.to_owned(),
        }));
        self.send(
            Msg::Refuse {
                reason: reason.to_owned(),
            },
            None,
            out,
        );
        out.push(Action::Disconnect {
            reason: reason.to_owned(),
        });
        if !retry {
            self.want_connect = false;
        }
        self.connection_lost(reason, out);
    }

    fn protocol_error(&mut self, reason: &str, out: &mut Vec<Action>) {
        self.stats.peer_protocol_errors += 1;
        out.push(Action::Notify(Notice::PeerProtocolError {
            reason: reason.to_owned(),
        }));
        self.refuse(reason, true, out);
    }

    /// The connection is gone (timeout, transport error, refusal).
    fn connection_lost(&mut self, reason: &str, out: &mut Vec<Action>) {
        let _ = reason;
        self.handshake = None;
        // The peer's reads went with its connection.
        self.reads_waiting.retain(|(tag, ..)| {
            !matches!(
                tag,
                IoTag::PeerRead(_) | IoTag::CsumRead(_) | IoTag::VerifyPeerRead(_)
            )
        });
        // A ResyncDone flush still in flight belongs to this connection's resync: its
        // generations must not be adopted by a later one. Likewise a barrier flush: its
        // ack would confirm a barrier of the next connection that happens to share its
        // number.
        self.sync_done_pending = None;
        // So does a checksum compare still being read or flushed: its "in sync" answer
        // would clear the bits of a later resync's request for the same range.
        self.csum_reads.clear();
        self.verify_peer.clear();
        if self.barrier_flushing.is_some() {
            self.barrier_flush_stale = true;
        }
        self.peer_role = None;
        if self.peer_disk != DiskState::Outdated {
            self.peer_disk = DiskState::DUnknown;
        }
        out.push(Action::Notify(Notice::PeerRole { role: None }));
        // Writes the peer may not have: mark them out of sync.
        self.mark_unconfirmed_out_of_sync();
        let lost: Vec<Unconfirmed> = std::mem::take(&mut self.unconfirmed)
            .into_values()
            .collect();
        if !lost.is_empty() {
            // Durable bits before the activity-log references go.
            let blocks = Self::bitmap_blocks(&mut self.bitmap);
            if !blocks.is_empty() {
                out.push(Action::PersistBitmap { blocks });
            }
        }
        for u in lost {
            if u.al_pinned {
                self.al.end(u.offset, u.len);
            }
        }
        let waiting: Vec<ReqId> = self
            .writes
            .iter()
            .filter(|(_, w)| w.peer == PeerStage::Waiting)
            .map(|(r, _)| *r)
            .collect();
        for req in &waiting {
            if let Some(w) = self.writes.get_mut(req) {
                w.peer = PeerStage::Lost;
            }
        }
        // Sequence numbers start again on the next connection: a write that outlives this
        // one (held for lack of quorum, say) must not later unmap a new write's number.
        for w in self.writes.values_mut() {
            w.seq = None;
            w.same_link = false;
        }
        self.by_seq.clear();
        for f in self.flushes.values_mut() {
            if f.barrier.is_some() && !f.peer_done {
                f.barrier = None;
            }
        }
        // Reads waiting on the peer fail.
        for req in std::mem::take(&mut self.peer_reads).into_keys() {
            out.push(Action::Complete {
                req,
                result: Err(IoFailure::Io(
                    "the peer serving the read disconnected".into(),
                )),
            });
        }
        // Resync writes not yet started are dropped (their blocks stay marked on both
        // sides). Application writes are all written, in order: with protocol B the peer
        // may already have completed them on this node's RecvAck.
        let dropped: Vec<u64> = self
            .recv
            .iter()
            .filter(|(_, r)| !r.started && matches!(r.kind, RecvKind::Resync { .. }))
            .map(|(n, _)| *n)
            .collect();
        for n in dropped {
            self.drop_received(n, out);
        }
        self.pending_barriers.clear();
        if let Some(r) = self.resync.take() {
            // Requests in flight stay dirty in the bitmap; the next connect resumes.
            let _ = r;
        }
        self.verify = None;
        let blocks = Self::bitmap_blocks(&mut self.bitmap);
        if !blocks.is_empty() {
            out.push(Action::PersistBitmap { blocks });
        }
        if self.want_connect {
            self.set_conn(ConnState::Connecting, out);
            out.push(Action::Connect);
        } else {
            self.set_conn(ConnState::StandAlone, out);
        }
        if self.role == Role::Primary {
            let needs = !waiting.is_empty() || !self.flushes.is_empty();
            if needs || self.cfg.fencing == FencingPolicy::DontCare {
                self.need_alone(out);
            } else {
                // Fence at disconnect, as DRBD does, so the next write does not wait.
                self.need_alone(out);
            }
        }
        let reqs: Vec<ReqId> = self.writes.keys().copied().collect();
        for req in reqs {
            self.try_complete_write(req, out);
        }
        let flushes: Vec<ReqId> = self.flushes.keys().copied().collect();
        for req in flushes {
            self.try_complete_flush(req, out);
        }
        self.run_blocked(out);
    }

    fn on_peer_msg(
        &mut self,
        msg: Msg,
        payload: Option<u64>,
        payload_len: u64,
        inline: &[u8],
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        if matches!(self.conn, ConnState::StandAlone | ConnState::Connecting) {
            if let Some(key) = payload {
                out.push(Action::Release(DataRef::Payload(key)));
            }
            return Ok(());
        }
        if self.conn == ConnState::Handshaking && !matches!(msg, Msg::Hello(_) | Msg::Refuse { .. })
        {
            return Err(format!("{} before the handshake", msg.name()));
        }
        match msg {
            Msg::Hello(h) => self.on_hello(&h, out),
            Msg::Refuse { reason } => {
                let reason = format!("peer refused: {reason}");
                self.last_refusal = Some(reason.clone());
                out.push(Action::Notify(Notice::Refused {
                    reason: reason.clone(),
                }));
                out.push(Action::Disconnect {
                    reason: reason.clone(),
                });
                self.connection_lost(&reason, out);
                Ok(())
            }
            Msg::Ping => {
                self.send(Msg::PingAck, None, out);
                Ok(())
            }
            Msg::PingAck => Ok(()),
            Msg::Data {
                seq,
                offset,
                len,
                fua,
                barrier,
            } => {
                let payload = payload.ok_or("Data without payload")?;
                if payload_len != u64::from(len) {
                    return Err(format!("Data announces {len} bytes, carries {payload_len}"));
                }
                self.on_recv_write(
                    offset,
                    u64::from(len),
                    RecvKind::Data { seq, fua, payload },
                    barrier,
                    out,
                )
            }
            Msg::Trim {
                seq,
                offset,
                len,
                zeroes,
                barrier,
            } => self.on_recv_write(offset, len, RecvKind::Trim { seq, zeroes }, barrier, out),
            Msg::RecvAck { seq } => {
                self.on_peer_ack(seq, true, out);
                Ok(())
            }
            Msg::WriteAck { seq } => {
                self.on_peer_ack(seq, self.cfg.protocol == Protocol::C, out);
                Ok(())
            }
            Msg::NegAck { seq } => {
                if let Some(u) = self.unconfirmed.remove(&seq) {
                    self.bitmap.set_range(u.offset, u.len);
                    let blocks = Self::bitmap_blocks(&mut self.bitmap);
                    out.push(Action::PersistBitmap { blocks });
                    if u.al_pinned {
                        self.al.end(u.offset, u.len);
                    }
                    self.run_blocked(out);
                }
                if let Some(req) = self.by_seq.remove(&seq)
                    && let Some(w) = self.writes.get_mut(&req)
                {
                    w.peer = PeerStage::Lost;
                    self.need_alone(out);
                    self.try_complete_write(req, out);
                }
                Ok(())
            }
            Msg::Barrier { number } => {
                if self.disk == DiskState::Diskless {
                    self.send(Msg::BarrierAck { number }, None, out);
                } else {
                    self.pending_barriers.push_back(number);
                    self.pump_barriers(out);
                }
                Ok(())
            }
            Msg::BarrierAck { number } => {
                let sent_here = barrier_le(self.conn_first_barrier, number)
                    && number != self.barrier
                    && barrier_le(number, self.barrier);
                if !sent_here {
                    return Err(format!(
                        "BarrierAck for barrier {number}, which was not sent on this \
                         connection"
                    ));
                }
                let confirmed: Vec<u64> = self
                    .unconfirmed
                    .iter()
                    .filter(|(_, u)| barrier_le(u.barrier, number))
                    .map(|(seq, _)| *seq)
                    .collect();
                let mut unmarked = false;
                for seq in confirmed {
                    let Some(u) = self.unconfirmed.remove(&seq) else {
                        continue;
                    };
                    if u.al_pinned {
                        self.al.end(u.offset, u.len);
                    }
                    if u.marked && self.conn == ConnState::Connected {
                        // Durable on the peer now: the crash guard can go.
                        self.bitmap.clear_covered(u.offset, u.len);
                        unmarked = true;
                    }
                }
                if unmarked {
                    let blocks = Self::bitmap_blocks(&mut self.bitmap);
                    if !blocks.is_empty() {
                        out.push(Action::PersistBitmap { blocks });
                    }
                }
                // Writes waiting for room in the activity log may start now.
                self.run_blocked(out);
                for f in self.flushes.values_mut() {
                    if let Some(b) = f.barrier
                        && barrier_le(b, number)
                    {
                        f.peer_done = true;
                    }
                }
                let reqs: Vec<ReqId> = self.flushes.keys().copied().collect();
                for req in reqs {
                    self.try_complete_flush(req, out);
                }
                Ok(())
            }
            Msg::StateUpdate { role, disk, epoch } => {
                self.on_state_update(role, disk, epoch, out);
                Ok(())
            }
            Msg::ReadRequest { id, offset, len } => {
                self.check_range(offset, u64::from(len))
                    .map_err(|e| format!("ReadRequest: {e}"))?;
                if len == 0 || u64::from(len) > self.cfg.max_request_bytes {
                    return Err(format!("ReadRequest of {len} bytes"));
                }
                if self.disk == DiskState::UpToDate {
                    self.read_after_writes_in_flight(
                        IoTag::PeerRead(id),
                        offset,
                        u64::from(len),
                        false,
                        out,
                    );
                } else {
                    self.send(Msg::ReadReply { id, ok: false }, None, out);
                }
                Ok(())
            }
            Msg::ReadReply { id, ok } => {
                let req = ReqId(id);
                let Some(asked) = self.peer_reads.remove(&req) else {
                    return Err(format!("ReadReply for unknown read {id}"));
                };
                if ok && payload_len != asked {
                    // Never hand the application a buffer of another size than it read.
                    out.push(Action::Complete {
                        req,
                        result: Err(IoFailure::Io("the peer's read reply was malformed".into())),
                    });
                    return Err(format!(
                        "ReadReply {id} carries {payload_len} bytes for a read of {asked}"
                    ));
                }
                match (ok, payload) {
                    (true, Some(key)) => out.push(Action::Complete {
                        req,
                        result: Ok(Some(DataRef::Payload(key))),
                    }),
                    _ => out.push(Action::Complete {
                        req,
                        result: Err(IoFailure::Io("the peer could not read".into())),
                    }),
                }
                Ok(())
            }
            other => self.on_sync_msg(other, payload, payload_len, inline, out),
        }
    }

    fn on_peer_ack(&mut self, seq: u64, completes: bool, out: &mut Vec<Action>) {
        if !completes {
            return;
        }
        let Some(req) = self.by_seq.get(&seq).copied() else {
            return;
        };
        if let Some(w) = self.writes.get_mut(&req)
            && w.peer == PeerStage::Waiting
        {
            w.peer = PeerStage::Done;
            self.try_complete_write(req, out);
        }
    }

    fn on_state_update(
        &mut self,
        role: Role,
        disk: DiskState,
        epoch: Epoch,
        out: &mut Vec<Action>,
    ) {
        if epoch > self.md.epoch {
            self.md.epoch = epoch;
            if self.role == Role::Primary {
                self.fenced(out);
                return;
            }
            self.persist_sb(out);
        } else if epoch < self.md.epoch && role == Role::Primary {
            self.refuse(
                &format!(
                    "peer is primary at epoch {} but the cluster is at epoch {}",
                    epoch.0, self.md.epoch.0
                ),
                true,
                out,
            );
            return;
        }
        if role == Role::Primary && self.role == Role::Primary {
            self.refuse("both nodes are primary", false, out);
            return;
        }
        if self.peer_role != Some(role) {
            self.peer_role = Some(role);
            out.push(Action::Notify(Notice::PeerRole { role: Some(role) }));
        }
        if self.peer_disk != disk {
            if disk == DiskState::Diskless {
                self.peer_disk_failed(out);
                if role == Role::Primary {
                    self.primary_disk_failed(out);
                }
            }
            self.peer_disk = disk;
            out.push(Action::Notify(Notice::PeerDisk { state: disk }));
        }
        self.peer_epoch = epoch;
    }

    /// The peer's disk failed (it said so before answering anything else): writes it
    /// completed but has not flushed may be gone with it, so every write it has not
    /// confirmed as durable is out of sync here, and no later BarrierAck — a diskless
    /// node acknowledges barriers at once — may confirm them (seed 2479: the failed
    /// barrier flush's ack dropped the only record of a write the disk never kept).
    fn peer_disk_failed(&mut self, out: &mut Vec<Action>) {
        // A write still in flight here whose peer copy is done completes later; its
        // completion must not clear the bits marked below as "in sync on both disks" —
        // the peer's copy went with its disk (seed 10161: a write that landed late here
        // cleared the mark of what the failed disk lost, and the disk came back stale).
        for w in self.writes.values_mut() {
            w.same_link = false;
        }
        if self.unconfirmed.is_empty() {
            return;
        }
        for u in std::mem::take(&mut self.unconfirmed).into_values() {
            self.bitmap.set_range(u.offset, u.len);
            if u.al_pinned {
                self.al.end(u.offset, u.len);
            }
        }
        let blocks = Self::bitmap_blocks(&mut self.bitmap);
        if !blocks.is_empty() {
            out.push(Action::PersistBitmap { blocks });
        }
        self.run_blocked(out);
    }

    /// The primary's disk failed and it writes through this node now: this copy moves on
    /// without it. As DRBD's peer does, start a new generation (unless one already
    /// tracks the primary's) and mark every write from now on out of sync, so that the
    /// primary's disk, should it come back as it was (a path that flapped, its metadata
    /// still Consistent), is resynced from the bitmap rather than compared as an equal.
    fn primary_disk_failed(&mut self, out: &mut Vec<Action>) {
        if self.role != Role::Secondary || self.disk != DiskState::UpToDate {
            return;
        }
        let gens = self.md.generations;
        if gens.bitmap == 0 || gens.bitmap == gens.current {
            let g = self.new_generation();
            self.md.generations.start_new(g);
            self.persist_sb(out);
            out.push(Action::Notify(Notice::Generations {
                generations: self.md.generations,
            }));
        }
    }

    /// A newer cluster epoch exists: this primary was fenced. Its pending writes fail,
    /// it demotes and its data is outdated.
    fn fenced(&mut self, out: &mut Vec<Action>) {
        out.push(Action::Notify(Notice::Fenced {
            epoch: self.md.epoch,
        }));
        let reqs: Vec<ReqId> = self.writes.keys().copied().collect();
        for req in reqs {
            if let Some(w) = self.writes.remove(&req) {
                // A write still on the disk keeps its activity-log extent until it lands
                // (`on_local_done`): a crash before then must resync those blocks. Landed
                // or not, the peer may hold something else there: the bitmap says so.
                if w.local == Stage::Pending {
                    self.bitmap.set_range(w.offset, w.len);
                } else if w.local != Stage::NotNeeded {
                    self.al.end(w.offset, w.len);
                }
                out.push(Action::Complete {
                    req,
                    result: Err(IoFailure::Refused(format!(
                        "fenced: the cluster moved to epoch {}",
                        self.md.epoch.0
                    ))),
                });
            }
        }
        for req in std::mem::take(&mut self.flushes).into_keys() {
            out.push(Action::Complete {
                req,
                result: Err(IoFailure::Refused("fenced".into())),
            });
        }
        for op in std::mem::take(&mut self.blocked) {
            match op {
                BlockedOp::Write { req, .. } | BlockedOp::Flush { req } => {
                    out.push(Action::Complete {
                        req,
                        result: Err(IoFailure::Refused("fenced".into())),
                    });
                }
                BlockedOp::SplitTrim { req } => {
                    self.fail_split_trim(req, IoFailure::Refused("fenced".into()), out);
                }
            }
        }
        self.by_seq.clear();
        self.md.flags.outdated = true;
        // primary_crashed stays set: unflushed writes of this node are not trustworthy.
        self.alone = AloneGate::Closed;
        self.set_role(Role::Secondary, out);
        if self.disk != DiskState::Diskless {
            self.set_disk(DiskState::Outdated, out);
        }
        self.persist_sb(out);
    }

    fn on_hello(&mut self, h: &Hello, out: &mut Vec<Action>) -> Result<(), String> {
        if !matches!(self.handshake, Some(Handshake::WaitHello)) {
            return Err("unexpected Hello".into());
        }
        let mismatch = if h.volume_id != self.cfg.volume_id {
            Some(format!(
                "peer serves volume {} but this is volume {}",
                h.volume_id, self.cfg.volume_id
            ))
        } else if h.size_bytes != self.cfg.size_bytes {
            Some(format!(
                "peer volume size {} differs from the local size {}",
                h.size_bytes, self.cfg.size_bytes
            ))
        } else if h.node_id == self.cfg.node_id {
            Some(format!("peer has the same node id {}", h.node_id))
        } else if h.protocol != self.cfg.protocol {
            Some(format!(
                "peer uses protocol {:?}, this node {:?}",
                h.protocol, self.cfg.protocol
            ))
        } else if h.bitmap_granularity != self.bitmap.granularity() {
            Some(format!(
                "peer bitmap granularity {} differs from {}",
                h.bitmap_granularity,
                self.bitmap.granularity()
            ))
        } else {
            None
        };
        if let Some(reason) = mismatch {
            self.refuse(&reason, false, out);
            return Ok(());
        }
        // Epochs: the older side learns the newer epoch; a primary with the older epoch
        // is fenced.
        if h.epoch > self.md.epoch {
            self.md.epoch = h.epoch;
            if self.role == Role::Primary {
                self.fenced(out);
            } else {
                self.persist_sb(out);
            }
        }
        if h.role == Role::Primary && self.role == Role::Primary {
            self.refuse("both nodes are primary", false, out);
            return Ok(());
        }
        self.peer_role = Some(h.role);
        self.peer_disk = h.disk;
        self.peer_epoch = h.epoch;
        self.peer_generations = Some(h.generations);
        out.push(Action::Notify(Notice::PeerRole { role: Some(h.role) }));
        out.push(Action::Notify(Notice::PeerDisk { state: h.disk }));
        let me = SideInfo {
            node_id: self.cfg.node_id,
            generations: self.md.generations,
            role: self.role,
            epoch: self.md.epoch,
            dirty_bits: self.bitmap.count(),
            primary_since_ms: self.md.primary_since_ms,
            primary_crashed: self.md.flags.primary_crashed && self.role != Role::Primary,
            cache_lost: self.md.flags.cache_lost,
            discard_my_data: self.discard_my_data,
            diskless: self.disk == DiskState::Diskless,
            inconsistent: self.disk == DiskState::Inconsistent,
            outdated: self.disk == DiskState::Outdated,
        };
        let peer = SideInfo {
            node_id: h.node_id,
            generations: h.generations,
            role: h.role,
            epoch: h.epoch,
            dirty_bits: h.dirty_bits,
            primary_since_ms: h.primary_since_ms,
            primary_crashed: h.primary_crashed,
            cache_lost: h.cache_lost,
            discard_my_data: h.discard_my_data,
            diskless: h.disk == DiskState::Diskless,
            inconsistent: h.disk == DiskState::Inconsistent,
            outdated: h.disk == DiskState::Outdated,
        };
        // Both sides must compare the same facts: the epochs as sent in the two Hellos
        // (this node may just have adopted the peer's newer one).
        let me_for_decision = SideInfo {
            epoch: self.hello_epoch,
            ..me
        };
        let decision = decide(
            &me_for_decision,
            &peer,
            self.cfg.split_brain,
            self.cfg.protocol == Protocol::C,
        );
        // The operator's discard-my-data answers this handshake only: never left armed
        // for a later one.
        self.discard_my_data = false;
        match decision {
            Decision::SplitBrain => {
                let detail = format!(
                    "split brain: both nodes changed the data since generation {:016X} \
                     (local current {:016X}, peer current {:016X}); resolve with \
                     `tandemctl resolve VOLUME --discard-my-data` on the node whose changes \
                     should be discarded",
                    self.md.generations.bitmap, self.md.generations.current, h.generations.current
                );
                out.push(Action::Notify(Notice::SplitBrain {
                    detail: detail.clone(),
                }));
                self.refuse(&detail, false, out);
            }
            Decision::Unrelated => {
                let reason = format!(
                    "unrelated data: local generation {:016X}, peer {:016X} share no history",
                    self.md.generations.current, h.generations.current
                );
                self.refuse(&reason, false, out);
            }
            Decision::Target { .. } if self.role == Role::Primary => {
                self.refuse(
                    "this primary would have to become a sync target (its data is older)",
                    false,
                    out,
                );
            }
            Decision::NoSync => {
                self.handshake = None;
                self.discard_my_data = false;
                self.connected(out);
                // Connected first, so a disk state change below reaches the peer.
                self.set_conn(ConnState::Connected, out);
                let same = self.md.generations.current == h.generations.current;
                if same && matches!(self.disk, DiskState::Outdated | DiskState::Consistent) {
                    // Same data as the peer: this copy is as new as any.
                    if self.md.flags.outdated || self.md.flags.cache_lost {
                        self.md.flags.outdated = false;
                        self.md.flags.cache_lost = false;
                        self.persist_sb(out);
                    }
                    self.set_disk(DiskState::UpToDate, out);
                }
                let both_disks = self.disk != DiskState::Diskless && h.disk != DiskState::Diskless;
                if self.bitmap.count() > 0
                    && both_disks
                    && self.md.generations.current == h.generations.current
                {
                    // Nothing differs (equal generations, no crash): drop stale bits. Not
                    // with a diskless side: "no sync" then only means nothing can be
                    // compared, and the bits are what the returning disk will need.
                    self.bitmap.clear_all();
                    let blocks = Self::bitmap_blocks(&mut self.bitmap);
                    out.push(Action::PersistBitmap { blocks });
                }
                self.resend_gate_waiters(out);
            }
            Decision::Source { full } | Decision::Target { full } => {
                let source = matches!(decision, Decision::Source { .. });
                if full {
                    self.bitmap.set_all();
                }
                let mut sync_gen = None;
                if source && self.md.generations.bitmap == 0 {
                    // The bitmap now tracks the differences from this node's current
                    // generation, which the target takes on at SyncStart. (Not a fresh
                    // one: if SyncStart never arrives, the target is still at a generation
                    // this node tracks or remembers, and writing alone later must not push
                    // it out of the history — the pair would refuse each other as
                    // unrelated.)
                    let g = match self.md.generations.current {
                        0 => self.new_generation(),
                        current => current,
                    };
                    self.md.generations.bitmap = g;
                    self.persist_sb(out);
                }
                if source {
                    sync_gen = Some(self.md.generations.bitmap);
                }
                self.handshake = Some(Handshake::Bitmaps {
                    decision,
                    received: Vec::new(),
                    sync_gen,
                });
                self.discard_my_data = false;
                self.connected(out);
                self.set_conn(ConnState::WfBitmap, out);
                self.send_bitmap(out);
            }
        }
        Ok(())
    }

    /// Common bookkeeping once the handshake accepted the peer.
    fn connected(&mut self, out: &mut Vec<Action>) {
        // Writes issued while disconnected still need the gate they were waiting for until
        // the peer takes them (`resend_gate_waiters`); otherwise the next disconnect must
        // fence (and start a generation) again.
        if !self.gate_waiters() {
            self.close_gate(out);
        }
        self.next_seq = 1;
        self.barrier = self.first_barrier();
        self.conn_first_barrier = self.barrier;
        // Received writes of the last connection still being written stay: a newer write
        // to the same blocks waits for them (`pump_recv`), and they answer nobody.
        self.conn_gen += 1;
        self.pending_barriers.clear();
        if self.peer_disk == DiskState::Outdated || self.peer_disk == DiskState::DUnknown {
            // The peer told us its real state in its Hello.
        }
    }

    /// Marks every write the peer has not confirmed as durable out of sync in the bitmap.
    fn mark_unconfirmed_out_of_sync(&mut self) {
        for u in self.unconfirmed.values_mut() {
            self.bitmap.set_range(u.offset, u.len);
            u.marked = true;
        }
    }

    /// Where a connection's barrier numbers start: anywhere, and a quarter of the time
    /// within four of the wrap, so that nothing may assume they start at 1 or grow
    /// without wrapping (every comparison is `barrier_le`), and the simulator reaches the
    /// wrap while the connection's first barriers are still in flight (64 below it, the
    /// wrap came too late for a flush to wait on a barrier across it: hole 6 was not
    /// found in the CI budget; with four, seed 9666).
    fn first_barrier(&mut self) -> u32 {
        let r = splitmix(&mut self.rng);
        let high = u32::try_from(r >> 32).expect("32 bits");
        let n = if r.is_multiple_of(4) {
            u32::MAX - high % 4
        } else {
            high
        };
        n.max(1)
    }

    fn send_bitmap(&mut self, out: &mut Vec<Action>) {
        let words = self.bitmap.words().to_vec();
        let total = u64::try_from(words.len()).unwrap_or(0);
        const CHUNK: usize = 8192;
        if words.is_empty() {
            self.send(
                Msg::Bitmap {
                    first_word: 0,
                    total_words: 0,
                },
                None,
                out,
            );
            return;
        }
        for (i, chunk) in words.chunks(CHUNK).enumerate() {
            let first = u64::try_from(i * CHUNK).unwrap_or(0);
            let bytes: Vec<u8> = chunk.iter().flat_map(|w| w.to_le_bytes()).collect();
            out.push(Action::SendBytes {
                msg: Msg::Bitmap {
                    first_word: first,
                    total_words: total,
                },
                bytes,
            });
        }
        self.last_send_ms = self.now_ms;
    }

    // ----- receiving replicated writes (secondary side) -----

    fn on_recv_write(
        &mut self,
        offset: u64,
        len: u64,
        kind: RecvKind,
        barrier: u32,
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        if self.role == Role::Primary {
            return Err("replicated write sent to a primary".into());
        }
        if self.peer_epoch < self.md.epoch {
            return Err(format!(
                "write from a peer at the outdated epoch {}",
                self.peer_epoch.0
            ));
        }
        if let Err(e) = self.check_range(offset, len) {
            return Err(format!("replicated write: {e}"));
        }
        let seq = match kind {
            RecvKind::Data { seq, .. } | RecvKind::Trim { seq, .. } => Some(seq),
            RecvKind::Resync { .. } => None,
        };
        self.stats.received_data_bytes += len;
        if self.disk == DiskState::Diskless {
            if let RecvKind::Data { payload, .. } = kind {
                out.push(Action::Release(DataRef::Payload(payload)));
            }
            if let Some(seq) = seq {
                self.send(Msg::NegAck { seq }, None, out);
            }
            return Ok(());
        }
        if let (Some(seq), Protocol::B) = (seq, self.cfg.protocol) {
            self.send(Msg::RecvAck { seq }, None, out);
        }
        let from_diskless = self.peer_disk == DiskState::Diskless;
        if from_diskless && seq.is_some() {
            // Only this copy will hold it: its bit is on disk before the write starts,
            // so no power loss here can keep the data yet forget the difference (seed
            // 35151: bits kept in memory until the next writeback were lost, and the
            // primary's disk came back to a resync that skipped the blocks).
            self.bitmap.set_range(offset, len);
            let blocks = Self::bitmap_blocks(&mut self.bitmap);
            if !blocks.is_empty() {
                out.push(Action::PersistBitmap { blocks });
            }
        }
        let n = self.next_recv;
        self.next_recv += 1;
        self.recv.insert(
            n,
            RecvOp {
                offset,
                len,
                kind,
                barrier,
                started: false,
                conn: self.conn_gen,
                al_pinned: false,
                from_diskless,
            },
        );
        self.pump_recv(out);
        Ok(())
    }

    /// Forgets received write `n`, which will never be written: unpins its extents and
    /// frees its payload.
    fn drop_received(&mut self, n: u64, out: &mut Vec<Action>) -> Option<RecvOp> {
        let op = self.recv.remove(&n)?;
        if op.al_pinned {
            self.al.end(op.offset, op.len);
        }
        if let RecvKind::Data { payload, .. } | RecvKind::Resync { payload } = op.kind {
            out.push(Action::Release(DataRef::Payload(payload)));
        }
        Some(op)
    }

    /// Starts received writes in arrival order; an overlapping one waits for the earlier.
    fn pump_recv(&mut self, out: &mut Vec<Action>) {
        // This node's own writes still on the disk came first.
        let mut earlier: Vec<(u64, u64)> = self.disk_writes.values().copied().collect();
        let mut to_start = Vec::new();
        for (n, op) in &self.recv {
            if !op.started
                && !earlier
                    .iter()
                    .any(|&(o, l)| overlaps(o, l, op.offset, op.len))
            {
                to_start.push(*n);
            }
            earlier.push((op.offset, op.len));
        }
        for n in to_start {
            let Some(op) = self.recv.get_mut(&n) else {
                continue;
            };
            op.started = true;
            let (offset, len) = (op.offset, op.len);
            match op.kind {
                RecvKind::Data { fua, payload, .. } => out.push(Action::LocalWrite {
                    tag: IoTag::Recv(n),
                    offset,
                    len,
                    fua,
                    data: DataRef::Payload(payload),
                }),
                // FUA: the source clears its bits on our ack, so the ack must mean durable
                // (a crash of this target must not lose acknowledged resync data).
                RecvKind::Resync { payload } => out.push(Action::LocalWrite {
                    tag: IoTag::Recv(n),
                    offset,
                    len,
                    fua: true,
                    data: DataRef::Payload(payload),
                }),
                RecvKind::Trim { zeroes, .. } => out.push(Action::LocalTrim {
                    tag: IoTag::Recv(n),
                    offset,
                    len,
                    zeroes,
                }),
            }
        }
    }

    fn on_recv_done(&mut self, n: u64, ok: bool, out: &mut Vec<Action>) {
        let Some(op) = self.recv.remove(&n) else {
            return;
        };
        if op.al_pinned {
            self.al.end(op.offset, op.len);
        }
        self.retry_waiting_reads(out);
        let replicated = matches!(op.kind, RecvKind::Data { .. } | RecvKind::Trim { .. });
        let still_linked = self.is_connected() && op.conn == self.conn_gen;
        if ok
            && replicated
            && (op.from_diskless || still_linked && self.peer_disk == DiskState::Diskless)
        {
            // The primary has no disk: only this copy holds the write — recorded even if
            // the link broke while it landed (with protocol A or B the primary may have
            // acknowledged it already, and a diskless primary's own record dies with its
            // process): a disk of the primary's that comes back as it was must get it.
            self.bitmap.set_range(op.offset, op.len);
        }
        if still_linked {
            match op.kind {
                RecvKind::Data { seq, .. } | RecvKind::Trim { seq, .. } => {
                    let msg = if ok {
                        Msg::WriteAck { seq }
                    } else {
                        Msg::NegAck { seq }
                    };
                    self.send(msg, None, out);
                    if ok && !op.from_diskless && self.peer_disk != DiskState::Diskless {
                        self.bitmap.clear_covered(op.offset, op.len);
                    }
                }
                RecvKind::Resync { .. } => {
                    if ok {
                        self.bitmap.clear_covered(op.offset, op.len);
                        self.stats.resync_received_bytes += op.len;
                        let msg = Msg::ResyncAck {
                            offset: op.offset,
                            len: u32::try_from(op.len).unwrap_or(u32::MAX),
                        };
                        self.send(msg, None, out);
                    }
                }
            }
        } else if !ok {
            // Nothing to ack: the bitmap on the other side covers it.
        }
        self.pump_recv(out);
        self.pump_barriers(out);
        self.run_blocked(out);
    }

    fn pump_barriers(&mut self, out: &mut Vec<Action>) {
        if self.barrier_flushing.is_some() {
            return;
        }
        let Some(&number) = self.pending_barriers.front() else {
            return;
        };
        let busy = self.recv.values().any(|op| {
            matches!(op.kind, RecvKind::Data { .. } | RecvKind::Trim { .. })
                && op.conn == self.conn_gen
                && barrier_le(op.barrier, number)
        });
        if busy {
            return;
        }
        self.pending_barriers.pop_front();
        self.barrier_flushing = Some(number);
        out.push(Action::LocalFlush {
            tag: IoTag::Barrier(number),
        });
    }

    // ----- admin -----

    fn on_admin(&mut self, cmd: Admin, out: &mut Vec<Action>) {
        match cmd {
            Admin::Promote { force } => self.promote(force, out),
            Admin::Demote => self.demote(out),
            Admin::StepDown => {
                if self.role == Role::Primary {
                    self.fenced(out);
                }
            }
            Admin::SuspendIo => {
                if self.role == Role::Primary && !self.quorum_hold {
                    self.quorum_hold = true;
                    out.push(Action::Notify(Notice::IoSuspended {
                        reason:
                            "no quorum: writes are held until the cluster confirms this primary"
                                .into(),
                    }));
                }
            }
            Admin::ResumeIo => {
                if self.quorum_hold {
                    self.quorum_hold = false;
                    if !self.is_suspended() {
                        out.push(Action::Notify(Notice::IoResumed));
                    }
                    self.retry_completions(out);
                    self.run_blocked(out);
                }
            }
            Admin::Connect => {
                self.want_connect = true;
                if self.conn == ConnState::StandAlone {
                    self.last_refusal = None;
                    self.set_conn(ConnState::Connecting, out);
                    out.push(Action::Connect);
                }
            }
            Admin::Disconnect => {
                self.want_connect = false;
                if self.conn != ConnState::StandAlone {
                    out.push(Action::Disconnect {
                        reason: "disconnect requested".into(),
                    });
                    self.connection_lost("disconnect requested", out);
                    self.set_conn(ConnState::StandAlone, out);
                }
            }
            Admin::DiscardMyData => {
                if self.role == Role::Primary {
                    out.push(Action::Notify(Notice::Refused {
                        reason: "discard-my-data refused: this node is primary".into(),
                    }));
                    return;
                }
                if self.conn != ConnState::StandAlone {
                    // DRBD's rule: only a disconnected (split-brain) resource has data to
                    // discard; armed on a healthy one, the flag would silently throw away
                    // this node's data at some later split brain.
                    out.push(Action::Notify(Notice::Refused {
                        reason: format!(
                            "discard-my-data refused: the volume is {:?}, not in split \
                             brain (StandAlone); there is nothing to resolve",
                            self.conn
                        ),
                    }));
                    return;
                }
                self.discard_my_data = true;
                self.want_connect = true;
                if self.conn == ConnState::StandAlone {
                    self.last_refusal = None;
                    self.set_conn(ConnState::Connecting, out);
                    out.push(Action::Connect);
                }
            }
            Admin::JoinClusterLog(log) => {
                let mine = self.md.cluster_log;
                if mine == log {
                    return;
                }
                if mine != ClusterLogId::NONE {
                    out.push(Action::Notify(Notice::Refused {
                        reason: format!(
                            "the replica's metadata follows cluster log {mine}, not this \
                             cluster's log {log}: the cluster's state directory was created \
                             afresh (its epochs started again), or the disk comes from \
                             another cluster. If it belongs here, stop the replica and run \
                             `tandemctl forget-cluster-log BACKING` on its backing device \
                             (or external metadata); it joins this cluster's log at its next start"
                        ),
                    }));
                    return;
                }
                // Epochs count in the log joined now: whatever this disk counted before
                // (standalone, or a log from before logs had an identity) says nothing.
                self.md.cluster_log = log;
                self.md.epoch = Epoch(0);
                self.persist_sb(out);
            }
            Admin::SetEpoch(epoch) => {
                if epoch <= self.md.epoch {
                    return;
                }
                self.md.epoch = epoch;
                if self.role == Role::Primary {
                    // The cluster moved on without us: this primary is fenced.
                    self.fenced(out);
                    if self.is_connected() {
                        self.send_state(out);
                    }
                    return;
                }
                self.persist_sb(out);
                if self.is_connected() {
                    if self.peer_role == Some(Role::Primary) && self.peer_epoch < epoch {
                        self.refuse(
                            &format!(
                                "peer is primary at epoch {} but the cluster moved to {}",
                                self.peer_epoch.0, epoch.0
                            ),
                            true,
                            out,
                        );
                    } else {
                        self.send_state(out);
                    }
                }
            }
            Admin::Outdate => {
                if self.role == Role::Primary || self.is_connected() {
                    out.push(Action::Notify(Notice::Refused {
                        reason: "outdate refused: this node is primary or connected".into(),
                    }));
                    return;
                }
                if matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) {
                    self.md.flags.outdated = true;
                    self.persist_sb(out);
                    self.set_disk(DiskState::Outdated, out);
                }
            }
            Admin::StartVerify => self.start_verify(out),
            Admin::SetResyncRate { max_bytes_per_sec } => {
                self.cfg.resync.max_bytes_per_sec = max_bytes_per_sec;
            }
            Admin::Shutdown => {
                self.fail_everything_waiting(out);
                self.want_connect = false;
                if self.conn != ConnState::StandAlone {
                    out.push(Action::Disconnect {
                        reason: "shutting down".into(),
                    });
                    // The connection's state goes with it (a resync's end still being
                    // flushed must not be adopted while the volume stops).
                    self.connection_lost("shutting down", out);
                    self.set_conn(ConnState::StandAlone, out);
                }
                self.stopping = true;
                // Received writes not started yet were acknowledged on receipt (protocol
                // B): they are written before the volume stops.
                self.pump_recv(out);
                self.finish_shutdown(out);
            }
        }
    }

    /// The end of a clean shutdown, once no write is landing on the disk any more (a
    /// process that exits with writes in flight leaves their blocks undefined while its
    /// metadata would call them clean).
    fn finish_shutdown(&mut self, out: &mut Vec<Action>) {
        if self.stopped || !self.disk_writes.is_empty() || !self.recv.is_empty() {
            return;
        }
        // Writes the peer has not confirmed as durable: it may lose them if it crashes,
        // so the next handshake must resync them (as a disconnect does).
        self.mark_unconfirmed_out_of_sync();
        self.unconfirmed.clear();
        let blocks = {
            self.bitmap.mark_all_blocks_changed();
            Self::bitmap_blocks(&mut self.bitmap)
        };
        out.push(Action::PersistBitmap { blocks });
        // Flushes the data, then records an empty log: a clean shutdown. Every write
        // this node acknowledged completed here and the flush makes it durable; what the
        // peer may lack is in the bitmap. So a primary stopping cleanly is no crashed
        // primary: its data is the reference for those bits (a peer that loses power
        // meanwhile must not become the source of its hot extents). A secondary keeps
        // the flag: set, it comes from a crash (or a fencing) of an earlier life whose
        // extents were not resynced yet, and only that resync may clear it.
        if self.disk != DiskState::Diskless {
            self.al.clear();
            out.push(Action::PersistAl { extents: vec![] });
        }
        if self.role == Role::Primary {
            self.md.flags.primary_crashed = false;
        }
        self.md.flags.was_primary = self.role == Role::Primary;
        // The data was flushed above (the activity-log transaction): a clean stop.
        self.md.flags.open = false;
        self.persist_sb(out);
        self.stopped = true;
        out.push(Action::Stopped);
    }

    /// Answers every application request still in the core with an error — in flight,
    /// waiting for room or a gate, a trim's pieces, flushes, reads — and starts nothing:
    /// the volume is going away (nothing may run after `Stopped`).
    fn fail_everything_waiting(&mut self, out: &mut Vec<Action>) {
        let mut failed = BTreeSet::new();
        for (req, _) in std::mem::take(&mut self.writes) {
            // A trim piece answers through its trim.
            failed.insert(self.trim_pieces.remove(&req).unwrap_or(req));
        }
        self.trim_pieces.clear();
        for op in std::mem::take(&mut self.blocked) {
            let (BlockedOp::Write { req, .. }
            | BlockedOp::Flush { req }
            | BlockedOp::SplitTrim { req }) = op;
            failed.insert(req);
        }
        failed.extend(std::mem::take(&mut self.split_trims).into_keys());
        failed.extend(std::mem::take(&mut self.flushes).into_keys());
        failed.extend(std::mem::take(&mut self.reads).into_keys());
        failed.extend(std::mem::take(&mut self.peer_reads).into_keys());
        self.reads_waiting.clear();
        for req in failed {
            out.push(Action::Complete {
                req,
                result: Err(IoFailure::Io("volume shut down".into())),
            });
        }
    }

    fn promote(&mut self, force: bool, out: &mut Vec<Action>) {
        if self.role == Role::Primary {
            return;
        }
        let refuse = |reason: String, out: &mut Vec<Action>| {
            out.push(Action::Notify(Notice::Refused { reason }));
        };
        if self.is_connected() && self.peer_role == Some(Role::Primary) {
            return refuse("promote refused: the peer is primary".into(), out);
        }
        if matches!(self.conn, ConnState::SyncTarget | ConnState::WfBitmap) {
            return refuse(
                "promote refused: a resync into this node is running".into(),
                out,
            );
        }
        if self.md.flags.cache_lost && !force {
            // Its process ended uncleanly: the disk cache may have lost writes that were
            // acknowledged, and its peer may still hold them. Promoted before the
            // handshake, it would be the source and overwrite them (seed 30410 once the
            // cluster re-promoted a restarted primary-elect at once).
            return refuse(
                "promote refused: this replica's process ended uncleanly, so its disk cache \
                 may have lost acknowledged writes its peer holds; it can be promoted once it \
                 is in sync with its peer (or with --force)"
                    .into(),
                out,
            );
        }
        if self.disk != DiskState::Diskless {
            // The writes received as a secondary are this primary's data now: a crash
            // must not lose any of them from the disk cache with no activity-log extent
            // to say where (seed 46266). Those still landing are pinned in the log until
            // they land; the AL transaction flushes those already done.
            if !self.pin_received_writes(out) {
                return refuse(
                    format!(
                        "promote refused: the activity log ({} extents) has no room for the \
                         {} writes of the old primary still landing here",
                        self.al.capacity(),
                        self.recv.len()
                    ),
                    out,
                );
            }
        }
        match self.disk {
            DiskState::UpToDate => {}
            DiskState::Consistent => {
                // As DRBD: a consistent disk may be promoted by an operator; the cluster
                // only promotes UpToDate disks.
                self.disk = DiskState::UpToDate;
                out.push(Action::Notify(Notice::Disk {
                    state: DiskState::UpToDate,
                }));
            }
            DiskState::Diskless if self.is_connected() && self.peer_disk == DiskState::UpToDate => {
            }
            DiskState::Inconsistent | DiskState::Outdated if force => {
                self.md.flags.consistent = true;
                self.md.flags.outdated = false;
                if self.md.generations.current == 0 {
                    let g = self.new_generation();
                    self.md.generations.current = g;
                }
                self.disk = DiskState::UpToDate;
                out.push(Action::Notify(Notice::Disk {
                    state: DiskState::UpToDate,
                }));
                if self.is_connected() {
                    // A forced primary is the source of a full sync on the next connect.
                    self.md.generations.bitmap = 0;
                }
            }
            other => {
                return refuse(
                    format!(
                        "promote refused: the local disk is {other:?} (use --force to override)"
                    ),
                    out,
                );
            }
        }
        if self.disk != DiskState::Diskless {
            out.push(Action::PersistAl {
                extents: self.al.extents(),
            });
        }
        self.md.flags.was_primary = true;
        self.md.flags.primary_crashed = true;
        self.md.primary_since_ms = self.now_ms.max(1);
        if !self.is_connected() {
            // Alone from the start: a new generation before any write.
            self.alone = AloneGate::Closed;
            self.alone_generation_done = false;
            self.set_role_quiet(Role::Primary, out);
            self.persist_sb(out);
            self.need_alone(out);
        } else {
            self.persist_sb(out);
            self.set_role(Role::Primary, out);
            if self.disk == DiskState::UpToDate
                && self.peer_disk == DiskState::Inconsistent
                && self.resync.is_none()
            {
                // A forced primary with a connected, never-synced peer: reconnect to sync.
                out.push(Action::Disconnect {
                    reason: "reconnecting to start the initial full sync".into(),
                });
                self.connection_lost("initial sync", out);
            }
        }
    }

    /// Pins the extents of the received writes still landing in the activity log (a
    /// node becoming primary). False, with nothing pinned, if the log has no room.
    fn pin_received_writes(&mut self, out: &mut Vec<Action>) -> bool {
        let unpinned: Vec<u64> = self
            .recv
            .iter()
            .filter(|(_, op)| !op.al_pinned)
            .map(|(n, _)| *n)
            .collect();
        let mut pinned = Vec::new();
        let mut evicted = false;
        for n in unpinned {
            let Some(op) = self.recv.get_mut(&n) else {
                continue;
            };
            match self.al.begin(op.offset, op.len) {
                Ok(change) => {
                    evicted |= change.is_some_and(|c| !c.evicted.is_empty());
                    op.al_pinned = true;
                    pinned.push(n);
                }
                Err(_) => {
                    for n in pinned {
                        if let Some(op) = self.recv.get_mut(&n) {
                            op.al_pinned = false;
                            self.al.end(op.offset, op.len);
                        }
                    }
                    return false;
                }
            }
        }
        if evicted {
            // Evicted extents' bits must be on disk before the log forgets them.
            let blocks = Self::bitmap_blocks(&mut self.bitmap);
            if !blocks.is_empty() {
                out.push(Action::PersistBitmap { blocks });
            }
        }
        true
    }

    fn set_role_quiet(&mut self, role: Role, out: &mut Vec<Action>) {
        self.role = role;
        self.quorum_hold = false;
        out.push(Action::Notify(Notice::Role { role }));
    }

    fn demote(&mut self, out: &mut Vec<Action>) {
        if self.role == Role::Secondary {
            return;
        }
        if !self.writes.is_empty()
            || !self.flushes.is_empty()
            || !self.blocked.is_empty()
            || !self.split_trims.is_empty()
        {
            out.push(Action::Notify(Notice::Refused {
                reason: format!(
                    "demote refused: {} writes in flight (close the frontend first)",
                    self.writes.len() + self.blocked.len() + self.split_trims.len()
                ),
            }));
            return;
        }
        if self.replicating() && self.epoch_writes > 0 {
            // Close the epoch so the peer flushes what this primary wrote.
            self.send_barrier(out);
        }
        // Until the peer acks that barrier its copy may lack these writes, and the
        // crash flag is about to go: the bitmap records them instead (a few blocks resync
        // needlessly if the ack arrives).
        self.mark_unconfirmed_out_of_sync();
        let blocks = Self::bitmap_blocks(&mut self.bitmap);
        if !blocks.is_empty() {
            out.push(Action::PersistBitmap { blocks });
        }
        // An empty activity-log transaction flushes the data first: after it, nothing this
        // primary wrote can be lost from its disk cache, so the crash flag may go.
        self.al.clear();
        out.push(Action::PersistAl { extents: vec![] });
        self.md.flags.primary_crashed = false;
        self.persist_sb(out);
        self.alone = AloneGate::Closed;
        self.set_role(Role::Secondary, out);
    }
}

#[cfg(test)]
mod liveness_tests;
mod sync;
#[cfg(test)]
mod tests;

/// Is barrier number `a` at or before `b` (numbers wrap)?
fn barrier_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) < u32::MAX / 2
}
