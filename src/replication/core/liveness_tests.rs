//! Liveness of the core around a reconnect: every application write completes and every
//! resync finishes once the link is stable, whatever the fencing hook answers meanwhile.
//!
//! A two-node harness delivers the cores' messages in order, completes local I/O at once
//! and lets each test decide when events happen, so the interleavings the multi-process
//! cluster test hit only under load are replayed exactly.

use super::*;

const SIZE: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn persisted(current: u64, size: u64, al_capacity: u32) -> Persisted {
    Persisted {
        md: MdState::consistent_at(current, Epoch(1)),
        bitmap: Bitmap::new(size, 4096),
        al_extents: vec![],
        al_extent_bytes: 1 << 20,
        al_capacity,
        diskless: false,
    }
}

/// Two replicas (0 and 1) with the fencing policy of the reference cluster.
struct Pair {
    r: [Replica; 2],
    link_up: bool,
    /// Messages on the way to node `i`, in order.
    net: [VecDeque<Event>; 2],
    /// Local I/O of node `i` that completes when delivered.
    disk: [VecDeque<Event>; 2],
    /// Completed application requests: (node, request, ok).
    completed: Vec<(usize, ReqId, bool)>,
    /// Unanswered `OutdatePeer` actions per node.
    fence_asked: [Vec<u64>; 2],
    notices: [Vec<Notice>; 2],
    next_payload: u64,
    now_ms: u64,
    /// The most extents any `PersistAl` of node `i` listed.
    largest_al: [usize; 2],
}

impl Pair {
    fn new() -> Self {
        Self::with(SIZE, 8)
    }

    /// A pair on a volume of `size` bytes with activity logs of `al_capacity` 1 MiB extents.
    fn with(size: u64, al_capacity: u32) -> Self {
        Self::build(size, al_capacity, Protocol::C)
    }

    /// A pair replicating with `protocol`.
    fn with_protocol(protocol: Protocol) -> Self {
        Self::build(SIZE, 8, protocol)
    }

    fn build(size: u64, al_capacity: u32, protocol: Protocol) -> Self {
        let replica = |node: u32| {
            let mut cfg = ReplicaConfig::new(VolumeId::from_name("t"), NodeId(node), size);
            cfg.block_bytes = BLOCK;
            cfg.protocol = protocol;
            cfg.fencing = FencingPolicy::ResourceAndStonith;
            Replica::new(cfg, persisted(7, size, al_capacity), u64::from(node)).0
        };
        let mut p = Self {
            r: [replica(1), replica(2)],
            link_up: false,
            net: Default::default(),
            disk: Default::default(),
            completed: Vec::new(),
            fence_asked: [Vec::new(), Vec::new()],
            notices: Default::default(),
            next_payload: 1,
            now_ms: 0,
            largest_al: [0; 2],
        };
        p.step(0, Event::Admin(Admin::Connect));
        p.step(1, Event::Admin(Admin::Connect));
        p.link_up();
        p.settle();
        p.step(0, Event::Admin(Admin::Promote { force: false }));
        p.settle();
        assert_eq!(p.r[0].role(), Role::Primary);
        assert_eq!(p.r[0].conn(), ConnState::Connected);
        assert_eq!(p.r[1].peer_role, Some(Role::Primary));
        p
    }

    fn step(&mut self, node: usize, event: Event) {
        let actions = self.r[node].step(event);
        self.run(node, actions);
        self.r[node].check_invariants().unwrap();
    }

    fn run(&mut self, node: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { msg, data } => {
                    let payload_len = match &msg {
                        Msg::Data { len, .. } | Msg::ResyncData { len, .. } => u64::from(*len),
                        _ => 0,
                    };
                    let payload = data.map(|_| {
                        self.next_payload += 1;
                        self.next_payload
                    });
                    self.send(node, msg, payload, payload_len, vec![]);
                }
                Action::SendBytes { msg, bytes } => {
                    let len = u64::try_from(bytes.len()).unwrap();
                    self.send(node, msg, None, len, bytes);
                }
                Action::LocalWrite { tag, .. }
                | Action::LocalTrim { tag, .. }
                | Action::LocalFlush { tag } => self.disk[node].push_back(Event::LocalDone {
                    tag,
                    result: Ok(()),
                    digest: None,
                }),
                Action::LocalRead { tag, digest, .. } => {
                    self.disk[node].push_back(Event::LocalDone {
                        tag,
                        result: Ok(()),
                        digest: digest.then_some(0),
                    });
                }
                Action::Complete { req, result } => {
                    self.completed.push((node, req, result.is_ok()));
                }
                Action::OutdatePeer { request } => self.fence_asked[node].push(request),
                Action::PersistAl { extents } => {
                    self.largest_al[node] = self.largest_al[node].max(extents.len());
                }
                Action::Disconnect { .. } => self.link_down(Some(node)),
                Action::Notify(n) => self.notices[node].push(n),
                _ => {}
            }
        }
    }

    fn send(&mut self, from: usize, msg: Msg, payload: Option<u64>, len: u64, inline: Vec<u8>) {
        if self.link_up {
            self.net[1 - from].push_back(Event::PeerMsg {
                msg,
                payload,
                payload_len: len,
                inline,
            });
        }
    }

    fn link_up(&mut self) {
        self.link_up = true;
        self.step(0, Event::TransportUp);
        self.step(1, Event::TransportUp);
    }

    /// The link breaks; `initiator` already knows.
    fn link_down(&mut self, initiator: Option<usize>) {
        if !self.link_up {
            return;
        }
        self.link_up = false;
        self.net = Default::default();
        for node in 0..2 {
            if Some(node) != initiator {
                self.step(
                    node,
                    Event::TransportDown {
                        reason: "cut".into(),
                    },
                );
            }
        }
    }

    /// Delivers the next message for `node`; false if none is queued.
    fn deliver(&mut self, node: usize) -> bool {
        match self.net[node].pop_front() {
            Some(ev) => {
                self.step(node, ev);
                true
            }
            None => false,
        }
    }

    /// Completes all local I/O of `node` queued so far (and what that queues).
    fn complete_io(&mut self, node: usize) {
        while let Some(ev) = self.disk[node].pop_front() {
            self.step(node, ev);
        }
    }

    /// Runs until no message and no local I/O is left.
    fn settle(&mut self) {
        loop {
            let mut busy = false;
            for node in 0..2 {
                if let Some(ev) = self.disk[node].pop_front() {
                    self.step(node, ev);
                    busy = true;
                }
                busy |= self.deliver(node);
            }
            if !busy {
                return;
            }
        }
    }

    /// Answers every `OutdatePeer` node 0 asked for.
    fn answer_fence(&mut self, ok: bool) {
        for request in std::mem::take(&mut self.fence_asked[0]) {
            let detail = if ok {
                "peer outdated"
            } else {
                "proposal failed: has to forward request to: None, None"
            };
            self.step(
                0,
                Event::OutdatePeerDone {
                    request,
                    ok,
                    detail: detail.into(),
                },
            );
        }
    }

    /// Lets `ms` of time pass in 100 ms ticks, with the network and disks running and
    /// the fencing hook answering `fence_ok`.
    fn run_for(&mut self, ms: u64, fence_ok: bool) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            self.now_ms += 100;
            for node in 0..2 {
                self.step(
                    node,
                    Event::Tick {
                        now_ms: self.now_ms,
                    },
                );
            }
            self.settle();
            self.answer_fence(fence_ok);
            self.settle();
        }
    }

    fn write(&mut self, req: u64, block: u64) -> ReqId {
        let req = ReqId(req);
        self.step(
            0,
            Event::AppWrite {
                req,
                offset: block * BLOCK,
                len: BLOCK,
                fua: true,
            },
        );
        req
    }

    fn result_of(&self, req: ReqId) -> Option<bool> {
        self.completed
            .iter()
            .find(|(node, r, _)| *node == 0 && *r == req)
            .map(|(_, _, ok)| *ok)
    }

    /// Partition: node 0 fences its peer through the hook and writes `blocks` alone.
    fn write_alone(&mut self, blocks: &[u64]) {
        self.link_down(None);
        assert_eq!(
            self.fence_asked[0].len(),
            1,
            "the primary fences at disconnect"
        );
        self.answer_fence(true);
        // The cluster recorded the secondary as outdated.
        self.step(1, Event::Admin(Admin::Outdate));
        assert_eq!(self.r[1].disk(), DiskState::Outdated);
        for (i, block) in blocks.iter().enumerate() {
            let req = self.write(100 + u64::try_from(i).unwrap(), *block);
            self.complete_io(0);
            assert_eq!(self.result_of(req), Some(true), "a write alone completes");
        }
        assert!(self.r[0].bitmap().count() >= u64::try_from(blocks.len()).unwrap());
    }

    /// Both sides settled, in sync, nothing waiting.
    fn assert_in_sync(&self) {
        for node in 0..2 {
            assert_eq!(self.r[node].conn(), ConnState::Connected, "node {node}");
            assert_eq!(self.r[node].disk(), DiskState::UpToDate, "node {node}");
            assert_eq!(self.r[node].bitmap().count(), 0, "node {node}");
        }
        assert!(!self.r[0].is_suspended());
        assert_eq!(self.r[0].status().writes_in_flight, 0);
    }
}

/// The stall seen in the partition test: the primary (a promoted survivor that wrote
/// alone) reconnects to its outdated peer, and an application write arrives while the
/// bitmaps are being exchanged. The write must neither engage the fencing hook (the peer
/// is connected and about to become the sync target) nor wait for it; it must complete,
/// and the resync must finish — even when the hook would fail (the cluster log had no
/// leader at that moment).
#[test]
fn a_write_during_the_bitmap_exchange_completes_and_the_resync_finishes() {
    let mut p = Pair::new();
    // The region the resync will carry: the first 64 blocks (one resync request each
    // 256 KiB) and a few beyond.
    let alone: Vec<u64> = (0..64).chain([100, 200]).collect();
    p.write_alone(&alone);

    // The link comes back: Hellos cross, both sides decide (node 0 is the sync source)
    // and send their bitmaps.
    p.link_up();
    assert!(p.deliver(0) && p.deliver(1), "Hellos");
    assert_eq!(p.r[0].conn(), ConnState::WfBitmap);
    assert_eq!(p.r[1].conn(), ConnState::WfBitmap);

    // The write arrives now, to a block the resync must carry.
    let req = p.write(1, 3);
    p.complete_io(0);
    assert_eq!(
        p.fence_asked[0].len(),
        0,
        "a write during the bitmap exchange asked the cluster to outdate a connected peer"
    );
    // (Were it asked, the cluster log might have no leader right now.)
    p.answer_fence(false);

    p.settle();
    p.run_for(5_000, false);
    assert_eq!(p.result_of(req), Some(true), "the write never completed");
    assert!(
        p.notices[0]
            .iter()
            .any(|n| matches!(n, Notice::SyncFinished { source: true, .. }))
    );
    p.assert_in_sync();
}

/// A write the peer never acknowledged waits for the fencing hook at the disconnect; the
/// link comes back before the hook answered. The write goes to the peer over the new
/// connection and completes without the hook, the resync does not wait for the hook, and
/// the hook's late answer starts no new data generation (the peer receives the writes;
/// a generation it is not labelled with would make a crash of this primary sync its
/// possibly stale blocks over the peer's acknowledged ones).
#[test]
fn a_write_waiting_for_the_fencing_hook_goes_to_the_reconnected_peer() {
    let mut p = Pair::new();
    // A replicated write whose Data is lost with the link.
    let req = p.write(2, 5);
    p.complete_io(0);
    p.link_down(None);
    assert_eq!(
        p.fence_asked[0].len(),
        1,
        "the primary fences at disconnect"
    );
    assert!(p.r[0].is_suspended());
    assert_eq!(p.result_of(req), None);

    // The link is back before the hook answered (the cluster log is electing a leader).
    p.link_up();
    p.settle();
    assert_eq!(p.result_of(req), Some(true), "the write waits for the hook");
    assert!(!p.r[0].is_suspended());
    assert!(
        p.notices[0]
            .iter()
            .any(|n| matches!(n, Notice::SyncFinished { source: true, .. })),
        "the resync stalled"
    );

    // The late answer changes nothing, whatever it says.
    let generations = p.r[0].md().generations;
    p.answer_fence(true);
    assert_eq!(p.r[0].md().generations, generations);
    p.run_for(2_000, false);
    p.assert_in_sync();
    assert_eq!(
        p.fence_asked[0].len(),
        0,
        "the hook was asked again while connected"
    );
    assert_eq!(p.r[0].md().generations, p.r[1].md().generations);

    // The next disconnect fences again, and a write alone starts a new generation.
    p.link_down(None);
    assert_eq!(p.fence_asked[0].len(), 1);
    p.answer_fence(true);
    assert_ne!(p.r[0].md().generations.current, generations.current);
}

/// A flush issued while disconnected waits for the fencing hook; the peer comes back with
/// nothing to resync. The flush completes through a barrier on the new connection.
#[test]
fn a_flush_waiting_for_the_fencing_hook_completes_through_the_reconnected_peer() {
    let mut p = Pair::new();
    p.link_down(None);
    assert_eq!(p.fence_asked[0].len(), 1);
    let req = ReqId(9);
    p.step(0, Event::AppFlush { req });
    p.complete_io(0);
    assert_eq!(
        p.result_of(req),
        None,
        "flushed without the peer or the hook"
    );

    p.link_up();
    p.settle();
    assert_eq!(p.r[0].conn(), ConnState::Connected);
    assert_eq!(p.result_of(req), Some(true), "the flush waits for the hook");
    p.answer_fence(false);
    p.run_for(2_000, false);
    p.assert_in_sync();
    assert_eq!(p.fence_asked[0].len(), 0);
}

/// A 64 MiB pair whose primary has an activity log of four 1 MiB extents, filled by
/// writes `ReqId(1..=4)`, one per extent (stepped, not settled: still in flight).
fn a_log_of_four_extents_filled_by_four_writes() -> Pair {
    const MIB: u64 = 1 << 20;
    let mut p = Pair::with(64 * MIB, 4);
    for extent in 0..4 {
        p.step(
            0,
            Event::AppWrite {
                req: ReqId(extent + 1),
                offset: extent * MIB,
                len: BLOCK,
                fua: false,
            },
        );
    }
    p
}

/// Hole: a full activity log grew instead of waiting. With every extent pinned (written,
/// not yet confirmed by a BarrierAck), a write to a new extent made the log list more
/// extents than its capacity; on a real disk the transaction was refused ("activity-log
/// extents exceed the maximum") and the disk detached as failed. Now the write waits, the
/// epoch is closed at once so that the peer's BarrierAck frees the extents, and the write
/// then runs.
#[test]
fn a_full_activity_log_makes_writes_wait_and_frees_itself_through_a_barrier() {
    const MIB: u64 = 1 << 20;
    // Four writes fill the log (one extent each); their peer acks arrive, but no barrier
    // was closed yet, so the extents stay pinned.
    let mut p = a_log_of_four_extents_filled_by_four_writes();
    p.settle();
    for req in 1..=4 {
        assert_eq!(p.result_of(ReqId(req)), Some(true));
    }
    let fifth = ReqId(5);
    let actions = p.r[0].step(Event::AppWrite {
        req: fifth,
        offset: 10 * MIB,
        len: BLOCK,
        fua: false,
    });
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::LocalWrite { tag: IoTag::App(r), .. } if *r == fifth)),
        "a write to a fifth extent started with four pinned: {actions:?}"
    );
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Send {
                msg: Msg::Barrier { .. },
                ..
            }
        )),
        "a full log closes the epoch at once (the BarrierAck frees the extents): {actions:?}"
    );
    p.run(0, actions);
    p.settle();
    assert_eq!(
        p.result_of(fifth),
        Some(true),
        "the write ran once room was made"
    );
    assert!(
        p.largest_al[0] <= 4,
        "a transaction listed {} extents",
        p.largest_al[0]
    );
    p.r[0].check_invariants().unwrap();
}

/// Random writes over a volume far larger than the log, many in flight: every one
/// completes, no transaction outgrows the log, and waiting never deadlocks.
#[test]
fn random_writes_over_a_large_volume_never_outgrow_the_log() {
    const MIB: u64 = 1 << 20;
    let mut p = Pair::with(256 * MIB, 3);
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    for req in 1..=400u64 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let block = rng % (256 * MIB / BLOCK);
        p.write(req, block);
        if req % 16 == 0 {
            p.settle();
        }
    }
    p.run_for(1_000, true);
    for req in 1..=400 {
        assert_eq!(p.result_of(ReqId(req)), Some(true), "write {req}");
    }
    assert!(
        p.largest_al[0] <= 3,
        "a transaction listed {} extents",
        p.largest_al[0]
    );
    p.assert_in_sync();
}

/// A discard of the whole volume (mkfs.ext4 sends one; NBD allows up to 4 GiB in one
/// request) spans far more extents than the log holds: it runs in extent-sized pieces
/// and completes once, as one request.
#[test]
fn a_trim_wider_than_the_activity_log_runs_in_pieces_and_completes_once() {
    const MIB: u64 = 1 << 20;
    let mut p = Pair::with(64 * MIB, 4);
    let req = ReqId(1);
    p.step(
        0,
        Event::AppTrim {
            req,
            offset: 0,
            len: 64 * MIB - 4096,
            zeroes: false,
        },
    );
    p.run_for(1_000, true);
    let completions: Vec<_> = p.completed.iter().filter(|(n, _, _)| *n == 0).collect();
    assert_eq!(
        completions,
        vec![&(0, req, true)],
        "one completion, of the request itself"
    );
    assert!(
        p.largest_al[0] <= 4,
        "a transaction listed {} extents",
        p.largest_al[0]
    );
    assert_eq!(p.r[0].disk(), DiskState::UpToDate);
    p.assert_in_sync();
}

impl Pair {
    /// Runs everything until node 1's local operation `tag` is about to complete, and
    /// returns that completion without running it (the test decides when it happens).
    fn run_until_node1_completes(&mut self, tag: IoTag) -> Event {
        loop {
            let found = self.disk[1]
                .iter()
                .position(|e| matches!(e, Event::LocalDone { tag: t, .. } if *t == tag));
            if let Some(at) = found {
                return self.disk[1].remove(at).expect("found");
            }
            assert!(self.step_once(), "node 1 never ran {tag:?}");
        }
    }

    /// Runs one queued thing (a local completion or a delivery); false if none was left.
    fn step_once(&mut self) -> bool {
        for node in 0..2 {
            if let Some(ev) = self.disk[node].pop_front() {
                self.step(node, ev);
                return true;
            }
            if self.deliver(node) {
                return true;
            }
        }
        false
    }
}

/// Hole: the flush a sync target runs before adopting the source's generations
/// (`ResyncDone`) belonged to no connection. The link broke while it was in flight, the
/// next handshake started a new resync, and the old flush's completion then declared the
/// disk UpToDate with the old resync's generations — in the middle of the new resync.
#[test]
fn a_sync_done_flush_from_an_earlier_connection_does_not_end_a_later_resync() {
    let mut p = Pair::new();
    p.write_alone(&[0, 1, 2, 3]);
    p.link_up();
    let held = p.run_until_node1_completes(IoTag::SyncDone);
    // The connection is lost with the flush in flight; the primary writes on alone.
    p.link_down(None);
    p.answer_fence(true);
    for block in 40..45 {
        let req = p.write(200 + block, block);
        p.complete_io(0);
        assert_eq!(p.result_of(req), Some(true));
    }
    p.link_up();
    while p.r[1].conn() != ConnState::SyncTarget {
        assert!(p.step_once(), "no second resync started");
    }
    // Now the old flush completes.
    p.step(1, held);
    assert_eq!(p.r[1].conn(), ConnState::SyncTarget);
    assert_eq!(
        p.r[1].disk(),
        DiskState::Inconsistent,
        "a flush of the previous connection ended this resync"
    );
    p.run_for(2_000, true);
    p.assert_in_sync();
}

/// Hole: a secondary's barrier flush belonged to no connection. The link broke while it
/// was in flight; when it completed, its BarrierAck went out on the next connection, where
/// the primary numbers barriers afresh and could take it for one of its own.
#[test]
fn a_barrier_flush_of_a_lost_connection_is_not_acked_on_the_next() {
    let mut p = Pair::new();
    p.write(1, 3);
    // The number the flush's barrier gets.
    let number = p.r[0].barrier;
    p.step(0, Event::AppFlush { req: ReqId(2) });
    let held = p.run_until_node1_completes(IoTag::Barrier(number));
    p.link_down(None);
    p.answer_fence(true);
    p.link_up();
    p.settle();
    assert_eq!(p.r[1].conn(), ConnState::Connected);
    let acts = p.r[1].step(held);
    assert!(
        !sends(&acts, |m| matches!(m, Msg::BarrierAck { .. })),
        "a barrier of the lost connection was acked on the new one: {acts:?}"
    );
    p.run(1, acts);
    p.run_for(1_000, true);
    p.assert_in_sync();
}

/// Does `acts` send a message that `is` matches?
fn sends(acts: &[Action], is: impl Fn(&Msg) -> bool) -> bool {
    acts.iter()
        .any(|a| matches!(a, Action::Send { msg, .. } if is(msg)))
}

/// Node 1's queued completions of its received writes (`IoTag::Recv`), taken out of the
/// harness so that the test decides when they finish.
fn hold_recv_writes(p: &mut Pair) -> Vec<Event> {
    let mut held = Vec::new();
    p.disk[1].retain(|e| {
        let recv = matches!(
            e,
            Event::LocalDone {
                tag: IoTag::Recv(_),
                ..
            }
        );
        if recv {
            held.push(e.clone());
        }
        !recv
    });
    held
}

/// Does `acts` start a local write of a received write?
fn starts_recv_write(acts: &[Action]) -> bool {
    acts.iter().any(|a| {
        matches!(
            a,
            Action::LocalWrite {
                tag: IoTag::Recv(_),
                ..
            }
        )
    })
}

/// Hole: with protocol B the secondary acknowledges a write on receipt (RecvAck) and the
/// primary may complete it at once; a received write that had not started (it waited
/// behind an overlapping one) was dropped when the link broke, so a primary crash then
/// lost an acknowledged write. Now it is written like any other.
#[test]
fn protocol_b_writes_what_it_acknowledged_on_receipt_even_if_the_link_breaks() {
    let mut p = Pair::with_protocol(Protocol::B);
    // Two writes to the same block: the second waits on the secondary for the first.
    p.write(1, 5);
    p.write(2, 5);
    // Everything runs except the secondary's received writes.
    let mut held = Vec::new();
    loop {
        let mut busy = false;
        while p.deliver(1) {
            busy = true;
        }
        held.extend(hold_recv_writes(&mut p));
        while let Some(ev) = p.disk[1].pop_front() {
            p.step(1, ev);
            busy = true;
        }
        while p.deliver(0) {
            busy = true;
        }
        while let Some(ev) = p.disk[0].pop_front() {
            p.step(0, ev);
            busy = true;
        }
        if !busy {
            break;
        }
    }
    assert_eq!(
        held.len(),
        1,
        "only the first of two overlapping writes started"
    );
    assert_eq!(
        p.result_of(ReqId(2)),
        Some(true),
        "protocol B: acked on receipt"
    );
    p.link_down(None);
    let mut started_after = false;
    for ev in held {
        let acts = p.r[1].step(ev);
        started_after |= starts_recv_write(&acts);
        p.run(1, acts);
    }
    assert!(
        started_after,
        "the second write, acknowledged on receipt, was dropped at the disconnect"
    );
}

/// Hole: `connected()` forgot the received writes still being applied, so after a quick
/// reconnect a newer write to the same block (the resync's, or the application's)
/// started beside an older one still in flight, and the older could land last. And an
/// old write's completion acked a sequence number of the new connection.
#[test]
fn received_writes_stay_ordered_across_a_reconnect_and_old_ones_ack_nothing() {
    let mut p = Pair::new();
    p.write(1, 5);
    while p.deliver(1) {}
    let held = hold_recv_writes(&mut p);
    assert_eq!(held.len(), 1);
    p.link_down(None);
    p.answer_fence(true);
    p.link_up();
    p.write(2, 5);
    // Everything runs except node 1's writes; none may start while the old one runs.
    let mut started = Vec::new();
    loop {
        let busy = p.step_once();
        started.extend(hold_recv_writes(&mut p));
        p.answer_fence(true);
        if !busy {
            break;
        }
    }
    assert!(
        started.is_empty(),
        "a newer write to the block started while an older one was still being written"
    );
    let acts = p.r[1].step(held.into_iter().next().expect("held"));
    assert!(
        !sends(&acts, |m| matches!(m, Msg::WriteAck { .. })),
        "a write of the lost connection acked on the new one: {acts:?}"
    );
    p.run(1, acts);
    p.run_for(1_000, true);
    p.assert_in_sync();
    assert_eq!(p.result_of(ReqId(2)), Some(true));
}

/// The crash guard a demote puts in the bitmap for writes the peer has not confirmed
/// goes once the peer's barrier ack arrives: a switchover leaves both sides in sync.
#[test]
fn a_demote_with_unconfirmed_writes_ends_in_sync_once_the_peer_acks() {
    let mut p = Pair::new();
    p.write(1, 7);
    p.complete_io(0);
    while p.deliver(1) {}
    p.complete_io(1);
    while p.deliver(0) {}
    assert_eq!(p.result_of(ReqId(1)), Some(true));
    p.step(0, Event::Admin(Admin::Demote));
    assert_eq!(p.r[0].role(), Role::Secondary);
    p.settle();
    for node in 0..2 {
        assert_eq!(p.r[node].bitmap().count(), 0, "node {node}");
    }
}

/// A clean shutdown with requests still waiting (writes for room in a full activity log,
/// a trim in pieces, a flush): every request is answered with an error at once and no new
/// I/O starts; the core stops — metadata written back as clean — only once the writes
/// already on the disk have landed, and nothing runs after `Stopped`.
#[test]
fn a_shutdown_answers_every_waiting_request_and_stops_once_the_disk_is_idle() {
    const MIB: u64 = 1 << 20;
    let mut p = a_log_of_four_extents_filled_by_four_writes();
    // Leave the four writes in flight (no settle): the log is full.
    let waiting = [ReqId(5), ReqId(6), ReqId(7)];
    for event in [
        Event::AppTrim {
            req: waiting[0],
            offset: 8 * MIB,
            len: 16 * MIB,
            zeroes: false,
        },
        Event::AppWrite {
            req: waiting[1],
            offset: 9 * MIB,
            len: BLOCK,
            fua: false,
        },
        Event::AppFlush { req: waiting[2] },
    ] {
        // Their actions are never run: the requests stay waiting or in flight.
        let _ = p.r[0].step(event);
    }
    let actions = p.r[0].step(Event::Admin(Admin::Shutdown));
    for req in (1..=4).map(ReqId).chain(waiting) {
        assert!(
            actions.iter().any(|a| matches!(a,
                Action::Complete { req: r, result: Err(_) } if *r == req)),
            "{req:?} was not answered by the shutdown: {actions:?}"
        );
    }
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::LocalWrite { .. }
                | Action::LocalTrim { .. }
                | Action::Send { .. }
                | Action::Stopped
        )),
        "the shutdown started I/O, or stopped with writes still landing: {actions:?}"
    );
    let mut stopped_with = None;
    for req in 1..=4 {
        let actions = p.r[0].step(Event::LocalDone {
            tag: IoTag::App(ReqId(req)),
            result: Ok(()),
            digest: None,
        });
        if let Some(at) = actions.iter().position(|a| matches!(a, Action::Stopped)) {
            assert!(
                actions[at + 1..].is_empty(),
                "actions after Stopped: {actions:?}"
            );
            stopped_with = Some((req, actions));
        }
    }
    let (last, actions) = stopped_with.expect("the core stops once its writes landed");
    assert_eq!(last, 4, "stopped before the last write landed");
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::PersistAl { extents } if extents.is_empty())),
        "a clean stop records an empty activity log: {actions:?}"
    );
    assert!(p.r[0].is_stopped());
}
