//! Core tests: feed events, assert the exact actions that matter.

use super::*;
use crate::replication::types::GenerationIds;

fn persisted(current: u64) -> Persisted {
    Persisted {
        md: MdState::consistent_at(current, Epoch(1)),
        bitmap: Bitmap::new(1 << 20, 4096),
        al_extents: vec![],
        al_extent_bytes: 1 << 20,
        al_capacity: 8,
        diskless: false,
    }
}

fn replica(node: u32) -> Replica {
    replica_fencing(node, FencingPolicy::DontCare)
}

fn replica_fencing(node: u32, fencing: FencingPolicy) -> Replica {
    let mut cfg = ReplicaConfig::new(VolumeId::from_name("t"), NodeId(node), 1 << 20);
    cfg.fencing = fencing;
    Replica::new(cfg, persisted(7), u64::from(node)).0
}

fn hello_of(r: &Replica) -> Msg {
    Msg::Hello(r.hello())
}

fn peer_msg(msg: Msg) -> Event {
    Event::PeerMsg {
        msg,
        payload: None,
        payload_len: 0,
        inline: vec![],
    }
}

/// Two connected replicas, `a` primary.
fn connected() -> (Replica, Replica) {
    connected_fencing(FencingPolicy::DontCare)
}

/// Two connected replicas, `a` primary, with this fencing policy.
fn connected_fencing(fencing: FencingPolicy) -> (Replica, Replica) {
    let mut a = replica_fencing(1, fencing);
    let mut b = replica_fencing(2, fencing);
    a.step(Event::Admin(Admin::Connect));
    b.step(Event::Admin(Admin::Connect));
    a.step(Event::TransportUp);
    b.step(Event::TransportUp);
    let ha = hello_of(&a);
    let hb = hello_of(&b);
    let from_a = a.step(peer_msg(hb));
    let from_b = b.step(peer_msg(ha));
    // Deliver the state updates each side sent (disk now UpToDate).
    for (acts, to) in [(from_a, &mut b), (from_b, &mut a)] {
        for act in acts {
            if let Action::Send {
                msg: msg @ Msg::StateUpdate { .. },
                ..
            } = act
            {
                to.step(peer_msg(msg));
            }
        }
    }
    assert_eq!(a.conn(), ConnState::Connected);
    assert_eq!(b.conn(), ConnState::Connected);
    let acts = a.step(Event::Admin(Admin::Promote { force: false }));
    assert!(acts.iter().any(|x| matches!(
        x,
        Action::Send {
            msg: Msg::StateUpdate {
                role: Role::Primary,
                ..
            },
            ..
        }
    )));
    b.step(peer_msg(Msg::StateUpdate {
        role: Role::Primary,
        disk: DiskState::UpToDate,
        epoch: Epoch(1),
    }));
    (a, b)
}

#[test]
fn protocol_c_completes_only_after_local_done_and_the_peer_ack() {
    let (mut a, _b) = connected();
    let req = ReqId(1);
    let acts = a.step(Event::AppWrite {
        req,
        offset: 8192,
        len: 4096,
        fua: false,
    });
    let seq = acts
        .iter()
        .find_map(|x| match x {
            Action::Send {
                msg:
                    Msg::Data {
                        seq,
                        offset: 8192,
                        len: 4096,
                        ..
                    },
                data: Some(DataRef::App(r)),
            } if *r == req => Some(*seq),
            _ => None,
        })
        .expect("the write is sent to the peer");
    assert!(
        acts.iter()
            .any(|x| matches!(x, Action::LocalWrite { tag: IoTag::App(r), .. } if *r == req))
    );
    assert!(!acts.iter().any(|x| matches!(x, Action::Complete { .. })));
    // Local completion alone does not acknowledge.
    let acts = a.step(Event::LocalDone {
        tag: IoTag::App(req),
        result: Ok(()),
        digest: None,
    });
    assert!(
        !acts.iter().any(|x| matches!(x, Action::Complete { .. })),
        "{acts:?}"
    );
    // The peer's WriteAck does.
    let acts = a.step(peer_msg(Msg::WriteAck { seq }));
    assert_eq!(
        acts,
        vec![Action::Complete {
            req,
            result: Ok(None)
        }]
    );
    a.check_invariants().unwrap();
}

#[test]
fn a_secondary_acks_after_its_write_and_flushes_at_barriers() {
    let (_a, mut b) = connected();
    let acts = b.step(Event::PeerMsg {
        msg: Msg::Data {
            seq: 1,
            offset: 0,
            len: 4096,
            fua: false,
            barrier: 1,
        },
        payload: Some(10),
        payload_len: 4096,
        inline: vec![],
    });
    let tag = match acts.as_slice() {
        [
            Action::LocalWrite {
                tag,
                data: DataRef::Payload(10),
                ..
            },
        ] => *tag,
        other => panic!("{other:?}"),
    };
    // The barrier waits for the write, then flushes, then acks.
    assert!(b.step(peer_msg(Msg::Barrier { number: 1 })).is_empty());
    let acts = b.step(Event::LocalDone {
        tag,
        result: Ok(()),
        digest: None,
    });
    assert_eq!(
        acts,
        vec![
            Action::Send {
                msg: Msg::WriteAck { seq: 1 },
                data: None
            },
            Action::LocalFlush {
                tag: IoTag::Barrier(1)
            }
        ]
    );
    let acts = b.step(Event::LocalDone {
        tag: IoTag::Barrier(1),
        result: Ok(()),
        digest: None,
    });
    assert_eq!(
        acts,
        vec![Action::Send {
            msg: Msg::BarrierAck { number: 1 },
            data: None
        }]
    );
}

#[test]
fn garbage_and_wrong_volumes_are_refused_with_a_reason() {
    let mut a = replica(1);
    a.step(Event::Admin(Admin::Connect));
    a.step(Event::TransportUp);
    let mut other = replica(2);
    other.cfg.volume_id = VolumeId::from_name("another");
    let acts = a.step(peer_msg(hello_of(&other)));
    let reason = acts
        .iter()
        .find_map(|x| match x {
            Action::Send {
                msg: Msg::Refuse { reason },
                ..
            } => Some(reason.clone()),
            _ => None,
        })
        .expect("refused");
    assert!(reason.contains("volume"), "{reason}");
    assert_eq!(a.conn(), ConnState::StandAlone);
    assert_eq!(
        a.md().generations.current,
        7,
        "nothing persisted from the peer"
    );

    // Out-of-range replicated writes are a protocol error, not a write.
    let (_p, mut b) = connected();
    let acts = b.step(Event::PeerMsg {
        msg: Msg::Data {
            seq: 9,
            offset: 1 << 20,
            len: 4096,
            fua: false,
            barrier: 1,
        },
        payload: Some(3),
        payload_len: 4096,
        inline: vec![],
    });
    assert!(
        !acts.iter().any(|x| matches!(x, Action::LocalWrite { .. })),
        "{acts:?}"
    );
    assert!(
        acts.iter()
            .any(|x| matches!(x, Action::Release(DataRef::Payload(3))))
    );
    assert!(acts.iter().any(|x| matches!(x, Action::Notify(Notice::PeerProtocolError { reason }) if reason.contains("beyond the volume size"))));
}

#[test]
fn a_write_without_the_peer_waits_for_the_fencing_hook() {
    let mut cfg = ReplicaConfig::new(VolumeId::from_name("t"), NodeId(1), 1 << 20);
    cfg.fencing = FencingPolicy::ResourceAndStonith;
    let (mut a, _) = Replica::new(cfg, persisted(7), 1);
    let acts = a.step(Event::Admin(Admin::Promote { force: false }));
    assert!(
        acts.contains(&Action::OutdatePeer { request: 1 }),
        "{acts:?}"
    );
    assert!(a.is_suspended());
    let req = ReqId(5);
    a.step(Event::AppWrite {
        req,
        offset: 0,
        len: 4096,
        fua: false,
    });
    let acts = a.step(Event::LocalDone {
        tag: IoTag::App(req),
        result: Ok(()),
        digest: None,
    });
    assert!(
        !acts.iter().any(|x| matches!(x, Action::Complete { .. })),
        "acked before fencing: {acts:?}"
    );
    // Fencing failed: still suspended.
    let acts = a.step(Event::OutdatePeerDone {
        request: 1,
        ok: false,
        detail: "no quorum".into(),
    });
    assert!(!acts.iter().any(|x| matches!(x, Action::Complete { .. })));
    assert!(a.is_suspended());
    // Retried after a second; this time it works: a new generation is durable first,
    // then the write completes.
    let acts = a.step(Event::Tick { now_ms: 5_000 });
    assert!(acts.contains(&Action::OutdatePeer { request: 2 }));
    // A late answer to the first request says nothing about now (the peer may have
    // resynced since): ignored.
    let acts = a.step(Event::OutdatePeerDone {
        request: 1,
        ok: true,
        detail: String::new(),
    });
    assert!(acts.is_empty(), "a stale answer was taken: {acts:?}");
    assert!(a.is_suspended());
    let acts = a.step(Event::OutdatePeerDone {
        request: 2,
        ok: true,
        detail: String::new(),
    });
    let persist = acts
        .iter()
        .position(|x| matches!(x, Action::PersistSuperblock(md) if md.generations.bitmap == 7 && md.generations.current != 7))
        .expect("a new generation is persisted");
    let complete = acts
        .iter()
        .position(|x| matches!(x, Action::Complete { req: r, result: Ok(None) } if *r == req))
        .expect("the write completes");
    assert!(persist < complete);
    assert_eq!(a.bitmap().count(), 1, "the block is marked for resync");
}

#[test]
fn a_failing_disk_is_detached_and_writes_are_served_by_the_peer() {
    let (mut a, _b) = connected();
    let req = ReqId(3);
    let seq = write_sent(&mut a, req, 0);
    let acts = a.step(Event::LocalDone {
        tag: IoTag::App(req),
        result: Err("writing 4096 bytes at offset 0: Input/output error".into()),
        digest: None,
    });
    assert!(
        acts.iter()
            .any(|x| matches!(x, Action::Notify(Notice::DiskFailed { .. })))
    );
    assert!(acts.iter().any(|x| matches!(
        x,
        Action::Send {
            msg: Msg::StateUpdate {
                disk: DiskState::Diskless,
                ..
            },
            ..
        }
    )));
    assert_eq!(a.disk(), DiskState::Diskless);
    // The peer has it: the write succeeds.
    let acts = a.step(peer_msg(Msg::WriteAck { seq }));
    assert!(acts.contains(&Action::Complete {
        req,
        result: Ok(None)
    }));
    // Reads now go to the peer.
    read_through_peer(&mut a, 4, 0);
    assert!(!acts.iter().any(|x| matches!(x, Action::LocalRead { .. })));
    a.check_invariants().unwrap();
}

/// Writes 4 KiB as `req` at `offset` on primary `a`; returns the sequence number it was
/// replicated under.
fn write_sent(a: &mut Replica, req: ReqId, offset: u64) -> u64 {
    let acts = a.step(Event::AppWrite {
        req,
        offset,
        len: 4096,
        fua: false,
    });
    acts.iter()
        .find_map(|x| match x {
            Action::Send {
                msg: Msg::Data { seq, .. },
                ..
            } => Some(*seq),
            _ => None,
        })
        .expect("the write is replicated")
}

/// Writes `req` at `offset` on primary `a` and completes it (local done, peer ack).
fn acked_write(a: &mut Replica, req: u64, offset: u64) {
    let req = ReqId(req);
    let seq = write_sent(a, req, offset);
    a.step(Event::LocalDone {
        tag: IoTag::App(req),
        result: Ok(()),
        digest: None,
    });
    let acts = a.step(peer_msg(Msg::WriteAck { seq }));
    assert!(acts.contains(&Action::Complete {
        req,
        result: Ok(None)
    }));
}

/// Sends flush `req` on primary `a` with its local part done; returns its barrier number.
fn flush_sent(a: &mut Replica, req: u64) -> u32 {
    let req = ReqId(req);
    let acts = a.step(Event::AppFlush { req });
    let number = acts
        .iter()
        .find_map(|x| match x {
            Action::Send {
                msg: Msg::Barrier { number },
                ..
            } => Some(*number),
            _ => None,
        })
        .expect("a flush closes the epoch");
    let acts = a.step(Event::LocalDone {
        tag: IoTag::App(req),
        result: Ok(()),
        digest: None,
    });
    assert!(
        !acts.iter().any(|x| matches!(x, Action::Complete { .. })),
        "a flush completed before the peer's barrier ack: {acts:?}"
    );
    number
}

/// Hole: a flush compared barrier numbers without wrap-around (`b <= number`). After the
/// numbers wrapped, the peer's ack of the last epoch before the wrap (u32::MAX)
/// acknowledged a flush whose barrier (1) the peer had not flushed yet.
#[test]
fn a_barrier_ack_from_before_the_wrap_does_not_complete_a_later_flush() {
    let (mut a, _b) = connected();
    // As if this connection's barrier numbers had started just below the wrap.
    a.barrier = u32::MAX;
    a.conn_first_barrier = u32::MAX;
    acked_write(&mut a, 1, 0);
    let first = flush_sent(&mut a, 2);
    acked_write(&mut a, 3, 4096);
    let second = flush_sent(&mut a, 4);
    assert_eq!((first, second), (u32::MAX, 1), "the numbers wrapped");
    let acts = a.step(peer_msg(Msg::BarrierAck { number: first }));
    assert!(
        acts.contains(&Action::Complete {
            req: ReqId(2),
            result: Ok(None)
        }),
        "{acts:?}"
    );
    assert!(
        !acts
            .iter()
            .any(|x| matches!(x, Action::Complete { req, .. } if *req == ReqId(4))),
        "the flush after the wrap completed on the ack of an older barrier: {acts:?}"
    );
    let acts = a.step(peer_msg(Msg::BarrierAck { number: second }));
    assert!(acts.contains(&Action::Complete {
        req: ReqId(4),
        result: Ok(None)
    }));
}

/// Hole: a peer's ReadReply was handed to the application whatever its size; a reply
/// shorter or longer than the read (a hostile or broken peer) became the application's
/// data. Now the read fails, and the connection is dropped as a protocol error.
#[test]
fn a_read_reply_of_the_wrong_size_fails_the_read_and_drops_the_peer() {
    let (mut a, _b) = connected();
    a.step(Event::MetadataFailed {
        reason: "test: the disk is gone".into(),
    });
    assert_eq!(a.disk(), DiskState::Diskless);
    let req = ReqId(9);
    read_through_peer(&mut a, 9, 4096);
    let acts = a.step(Event::PeerMsg {
        msg: Msg::ReadReply { id: 9, ok: true },
        payload: Some(77),
        payload_len: 512,
        inline: vec![],
    });
    assert!(
        acts.iter().any(|x| matches!(
            x,
            Action::Complete { req: r, result: Err(IoFailure::Io(_)) } if *r == req
        )),
        "a short reply must fail the read: {acts:?}"
    );
    assert!(
        acts.contains(&Action::Release(DataRef::Payload(77))),
        "{acts:?}"
    );
    assert!(
        acts.iter().any(|x| matches!(x, Action::Disconnect { .. })),
        "{acts:?}"
    );
}

/// Reads 4 KiB at `offset` as request `req` on `a`, which has no usable disk: the read
/// must go to the peer.
fn read_through_peer(a: &mut Replica, req: u64, offset: u64) {
    let acts = a.step(Event::AppRead {
        req: ReqId(req),
        offset,
        len: 4096,
    });
    assert!(
        acts.iter().any(|x| matches!(
            x,
            Action::Send {
                msg: Msg::ReadRequest { id, .. },
                ..
            } if *id == req
        )),
        "a replica without a usable disk reads through its peer: {acts:?}"
    );
}

/// Hole: the primary took a BarrierAck for any number, also one it never sent on this
/// connection (a late ack of an earlier connection's barrier, or a broken peer), and it
/// confirmed writes and completed flushes the peer had not made durable.
#[test]
fn a_barrier_ack_for_a_barrier_never_sent_here_is_refused() {
    let (mut a, _b) = connected();
    acked_write(&mut a, 1, 0);
    let sent = flush_sent(&mut a, 2);
    let acts = a.step(peer_msg(Msg::BarrierAck {
        number: sent.wrapping_add(7),
    }));
    // The peer is dropped first; the flush may then complete only the way a flush
    // without the peer does (this test's fencing policy lets it).
    let disconnect = acts
        .iter()
        .position(|x| matches!(x, Action::Disconnect { .. }))
        .unwrap_or_else(|| panic!("the peer is not dropped: {acts:?}"));
    let completed = acts
        .iter()
        .position(|x| matches!(x, Action::Complete { .. }));
    assert!(
        completed.is_none_or(|c| c > disconnect),
        "a flush completed on the ack of a barrier never sent: {acts:?}"
    );
}

/// Hole: a clean shutdown, and a demote, cleared the crash flag and emptied the activity
/// log while writes the peer had not yet made durable (no BarrierAck) were only in the
/// transfer log, which is not on disk: had the peer then crashed, nothing would have
/// told the next handshake to resync them. The bitmap records them now.
#[test]
fn shutdown_and_demote_keep_unconfirmed_writes_in_the_bitmap() {
    for admin in [Admin::Shutdown, Admin::Demote] {
        let (mut a, _b) = connected();
        acked_write(&mut a, 1, 8 * 4096);
        assert_eq!(a.bitmap().count(), 0);
        a.step(Event::Admin(admin.clone()));
        assert!(
            a.bitmap().count() >= 1,
            "{admin:?} forgot a write the peer had not confirmed as durable"
        );
    }
}

/// Hole: a handshake with a diskless peer decides "no sync", and with equal generations
/// a node then dropped its bitmap as stale — here the extents a crashed primary's
/// activity log marked, which may differ from the peer's disk. When the peer's disk
/// came back nothing resynced them. The bits stay while either side is diskless.
#[test]
fn a_diskless_peer_does_not_clear_the_bitmap() {
    let mut crashed = persisted(7);
    crashed.md.flags.primary_crashed = true;
    crashed.al_extents = vec![0];
    let mut cfg = ReplicaConfig::new(VolumeId::from_name("t"), NodeId(1), 1 << 20);
    cfg.fencing = FencingPolicy::DontCare;
    let (mut a, _) = Replica::new(cfg, crashed, 1);
    let marked = a.bitmap().count();
    assert!(
        marked > 0,
        "crash recovery marks the activity log's extents"
    );
    let mut b = replica(2);
    b.step(Event::MetadataFailed {
        reason: "test: the disk is gone".into(),
    });
    assert_eq!(b.disk(), DiskState::Diskless);
    for r in [&mut a, &mut b] {
        r.step(Event::Admin(Admin::Connect));
        r.step(Event::TransportUp);
    }
    let (ha, hb) = (hello_of(&a), hello_of(&b));
    a.step(peer_msg(hb));
    b.step(peer_msg(ha));
    assert_eq!(a.conn(), ConnState::Connected);
    assert_eq!(
        a.bitmap().count(),
        marked,
        "a handshake with a diskless peer dropped the bits of a crashed primary"
    );
}

/// `resolve --discard-my-data` on a healthy, connected secondary once answered "local
/// changes discarded" and armed a hidden flag that a later split brain would have obeyed,
/// silently discarding this node's data. It is refused unless the volume is StandAlone.
#[test]
fn discard_my_data_is_refused_unless_in_split_brain() {
    let (_a, mut b) = connected();
    let acts = b.step(Event::Admin(Admin::DiscardMyData));
    assert!(
        acts.iter()
            .any(|x| matches!(x, Action::Notify(Notice::Refused { reason }) if reason.contains("not in split brain"))),
        "{acts:?}"
    );
    assert!(!b.hello().discard_my_data, "the flag was armed anyway");
}

/// Hole (found by the simulator once disks failed, seed 2479 of that model): the peer's
/// disk failed with a write it had completed but not flushed; its barrier flush failed,
/// yet a diskless node acknowledges barriers at once, and that ack confirmed the write
/// as durable: no bit recorded that the peer's copy lacked it. The peer's Diskless state
/// (sent before anything else) now marks every unconfirmed write out of sync first.
#[test]
fn a_diskless_peers_barrier_ack_does_not_confirm_what_its_failed_disk_held() {
    let (mut a, _b) = connected();
    acked_write(&mut a, 1, 8 * 4096);
    let number = flush_sent(&mut a, 2);
    assert_eq!(a.bitmap().count(), 0);
    a.step(peer_msg(Msg::StateUpdate {
        role: Role::Secondary,
        disk: DiskState::Diskless,
        epoch: a.md.epoch,
    }));
    a.step(peer_msg(Msg::BarrierAck { number }));
    assert!(
        a.bitmap().count() >= 1,
        "a write the failed disk never kept was confirmed by a diskless node's ack"
    );
}

/// Hole (found by the simulator once disks failed, seeds 15687 and 42787): a disk that
/// came back after a failure kept its generations, so the resync was the peer's bitmap
/// only; writes that failed on it, or were cached when it died, were in no bitmap. It
/// now forgets its generations: a full sync.
#[test]
fn a_failed_disk_comes_back_to_a_full_sync() {
    let mut a = replica(1);
    a.step(Event::MetadataFailed {
        reason: "test: the disk failed".into(),
    });
    assert_eq!(a.disk(), DiskState::Diskless);
    assert_eq!(
        a.md.generations,
        GenerationIds::default(),
        "a failed disk must not be matched against the peer's bitmap generation"
    );
    assert!(!a.md.flags.consistent);
}

/// Hole (found by reading, not yet by the simulator, whose metadata writes never fail):
/// a primary whose disk failed writes through its peer, and nothing recorded that its
/// disk lacked those writes. If that disk came back as it was (a path flap: the failure
/// could not be written to its metadata, which still says Consistent at the old
/// generation), a handshake compared the two as equals. The peer now starts a new
/// generation when the primary's disk goes, and marks every write from then on.
#[test]
fn a_secondary_tracks_what_a_diskless_primary_writes_through_it() {
    let (mut a, mut b) = connected();
    let before = b.md.generations;
    primary_went_diskless(&mut b);
    assert_eq!(
        b.md.generations.bitmap, before.current,
        "the peer's new generation tracks the primary's old one"
    );
    assert_ne!(b.md.generations.current, before.current);
    let (_, tag) = write_received(&mut a, &mut b, 5);
    b.step(Event::LocalDone {
        tag,
        result: Ok(()),
        digest: None,
    });
    assert!(
        b.bitmap().is_set(5),
        "a write the diskless primary made through its peer is in no bitmap"
    );
}

/// `b` learns that its primary's disk failed (the primary writes through it now).
fn primary_went_diskless(b: &mut Replica) {
    b.step(peer_msg(Msg::StateUpdate {
        role: Role::Primary,
        disk: DiskState::Diskless,
        epoch: b.md.epoch,
    }));
}

/// Primary `a` sends a 4 KiB write at `block` and `b` receives it: `b`'s actions, and
/// the tag of the local write it started.
fn write_received(a: &mut Replica, b: &mut Replica, block: u64) -> (Vec<Action>, IoTag) {
    let seq = write_sent(a, ReqId(1), block * 4096);
    let acts = b.step(Event::PeerMsg {
        msg: Msg::Data {
            seq,
            offset: block * 4096,
            len: 4096,
            fua: false,
            barrier: a.barrier,
        },
        payload: Some(10),
        payload_len: 4096,
        inline: vec![],
    });
    let tag = acts
        .iter()
        .find_map(|x| match x {
            Action::LocalWrite { tag, .. } => Some(*tag),
            _ => None,
        })
        .expect("the secondary writes it");
    (acts, tag)
}

/// Hole (found by the simulator once metadata writes could fail, seed 9477 of the protocol
/// A and B runs): a diskless primary's write reached the peer, the link
/// broke while it landed there, and the peer no longer recorded it — the primary's disk
/// came back as it was, took a bitmap resync, and kept stale blocks. The peer records
/// it by where it came from, not by the state of the link when it lands.
#[test]
fn a_diskless_primarys_write_that_lands_after_the_link_broke_is_still_tracked() {
    let (mut a, mut b) = connected();
    primary_went_diskless(&mut b);
    let (_, tag) = write_received(&mut a, &mut b, 7);
    b.step(Event::TransportDown {
        reason: "test: the link broke".into(),
    });
    b.step(Event::LocalDone {
        tag,
        result: Ok(()),
        digest: None,
    });
    assert!(
        b.bitmap().is_set(7),
        "a diskless primary's write that landed after the link broke is in no bitmap"
    );
}

/// Hole (found by the simulator, seed 15741): a write landed on the primary's disk, the
/// disk died before a flush, and the link broke before the peer's ack; the fencing gate
/// then completed the write as if the dead disk held it. A write whose local part was
/// done on a disk that failed needs the peer now, and fails without it.
#[test]
fn a_write_whose_only_copy_was_on_a_failed_disk_is_not_acknowledged() {
    let (mut a, _b) = connected();
    let req = ReqId(1);
    write_sent(&mut a, req, 0);
    let mut acts = a.step(Event::LocalDone {
        tag: IoTag::App(req),
        result: Ok(()),
        digest: None,
    });
    acts.extend(a.step(Event::MetadataFailed {
        reason: "test: the disk died".into(),
    }));
    acts.extend(a.step(Event::TransportDown {
        reason: "test".into(),
    }));
    assert_failed_not_acknowledged(&acts, req, "a write whose only copy was on a dead disk");
}

/// `req` failed and was not acknowledged.
fn assert_failed_not_acknowledged(acts: &[Action], req: ReqId, what: &str) {
    assert!(
        !acts.contains(&Action::Complete {
            req,
            result: Ok(None)
        }),
        "{what} was acknowledged: {acts:?}"
    );
    assert!(
        acts.iter()
            .any(|x| matches!(x, Action::Complete { req: r, result: Err(_) } if *r == req)),
        "{acts:?}"
    );
}

/// The same, when the write lands only after the disk was detached: with external
/// metadata the metadata device can fail while the data device still completes writes
/// started before (or, before issue 12's hole 9 was fixed, after) the detach. What lands
/// on a detached disk is no copy: its next start takes a full sync from the peer.
#[test]
fn a_write_landing_on_a_detached_disk_is_no_copy_of_it() {
    let (mut a, _b) = connected();
    let req = ReqId(1);
    write_sent(&mut a, req, 0);
    let mut acts = a.step(Event::MetadataFailed {
        reason: "test: the metadata device died".into(),
    });
    acts.extend(a.step(Event::TransportDown {
        reason: "test".into(),
    }));
    acts.extend(a.step(Event::LocalDone {
        tag: IoTag::App(req),
        result: Ok(()),
        digest: None,
    }));
    assert_failed_not_acknowledged(
        &acts,
        req,
        "a write whose only copy landed on a detached disk",
    );
}

/// A replica whose process ended uncleanly may have lost acknowledged writes from its disk
/// cache that its peer still holds; promoted before it is in sync with the peer it would
/// be the source and overwrite them (seed 30410, once the simulated cluster re-promoted
/// its restarted primary-elect at once, as tandemd's does). Refused until in sync, unless
/// forced.
#[test]
fn a_replica_that_may_have_lost_its_cache_is_promoted_only_once_in_sync_or_forced() {
    let cfg = || {
        let mut cfg = ReplicaConfig::new(VolumeId::from_name("t"), NodeId(1), 1 << 20);
        cfg.fencing = FencingPolicy::DontCare;
        cfg
    };
    let mut after_crash = persisted(7);
    after_crash.md.flags.open = true;
    let (mut crashed, _) = Replica::new(cfg(), after_crash.clone(), 1);
    let acts = crashed.step(Event::Admin(Admin::Promote { force: false }));
    assert_eq!(crashed.role(), Role::Secondary, "{acts:?}");
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Notify(Notice::Refused { reason })
            if reason.contains("uncleanly") && reason.contains("--force"))),
        "{acts:?}"
    );
    // The operator may insist.
    let (mut forced, _) = Replica::new(cfg(), after_crash, 1);
    forced.step(Event::Admin(Admin::Promote { force: true }));
    assert_eq!(forced.role(), Role::Primary);
    // In sync with its peer again, the cluster may promote it.
    let mut peer = replica(2);
    for r in [&mut crashed, &mut peer] {
        r.step(Event::Admin(Admin::Connect));
        r.step(Event::TransportUp);
    }
    let (hc, hp) = (hello_of(&crashed), hello_of(&peer));
    crashed.step(peer_msg(hp));
    peer.step(peer_msg(hc));
    assert_eq!(crashed.conn(), ConnState::Connected);
    let acts = crashed.step(Event::Admin(Admin::Promote { force: false }));
    assert_eq!(crashed.role(), Role::Primary, "{acts:?}");
}

/// The metadata device fails after the link did: a write done locally whose peer part
/// was lost with the link is decided at once (it fails: no copy counts), not left
/// pending for ever (seed 5073).
#[test]
fn a_write_confirmed_nowhere_fails_when_the_disk_is_detached() {
    // With fencing, the write waits for the hook once the link is gone.
    let (mut a, _b) = connected_fencing(FencingPolicy::ResourceAndStonith);
    let req = ReqId(1);
    write_sent(&mut a, req, 0);
    let mut acts = a.step(Event::LocalDone {
        tag: IoTag::App(req),
        result: Ok(()),
        digest: None,
    });
    acts.extend(a.step(Event::TransportDown {
        reason: "test".into(),
    }));
    acts.extend(a.step(Event::MetadataFailed {
        reason: "test: the metadata device died".into(),
    }));
    a.check_invariants()
        .expect("nothing left pending that can never complete");
    assert_failed_not_acknowledged(&acts, req, "a write confirmed nowhere");
}

/// A node cannot tell which writes its disk cache lost in a power loss; only its peer's
/// bitmap can. So a process marks the disk `open` at start and clears it on a clean
/// shutdown; found set at start, the disk's cache may be lost (`cache_lost`, told to the
/// peer in the Hello) until the node is in sync again.
#[test]
fn a_process_that_did_not_stop_cleanly_says_its_disk_cache_may_be_lost() {
    let cfg = || {
        let mut cfg = ReplicaConfig::new(VolumeId::from_name("t"), NodeId(1), 1 << 20);
        cfg.fencing = FencingPolicy::DontCare;
        cfg
    };
    let persisted_flags = |acts: &[Action]| {
        acts.iter()
            .rev()
            .find_map(|a| match a {
                Action::PersistSuperblock(md) => Some(md.flags),
                _ => None,
            })
            .expect("a superblock is written")
    };
    // A fresh start after a clean stop: the disk is marked open, nothing was lost.
    let (mut clean, acts) = Replica::new(cfg(), persisted(7), 1);
    let flags = persisted_flags(&acts);
    assert!(flags.open && !flags.cache_lost, "{flags:?}");
    assert!(!clean.hello().cache_lost);
    let acts = clean.step(Event::Admin(Admin::Shutdown));
    assert!(
        !persisted_flags(&acts).open,
        "a clean shutdown leaves the disk marked open: {acts:?}"
    );
    // The last process ended without a clean stop.
    let mut after_crash = persisted(7);
    after_crash.md.flags.open = true;
    let (mut crashed, acts) = Replica::new(cfg(), after_crash, 1);
    let flags = persisted_flags(&acts);
    assert!(flags.open && flags.cache_lost, "{flags:?}");
    assert!(crashed.hello().cache_lost, "the peer must be told");
    // In sync with a peer again (same generation, nothing differs): known complete.
    let mut peer = replica(2);
    for r in [&mut crashed, &mut peer] {
        r.step(Event::Admin(Admin::Connect));
        r.step(Event::TransportUp);
    }
    let (hc, hp) = (hello_of(&crashed), hello_of(&peer));
    let acts = crashed.step(peer_msg(hp));
    peer.step(peer_msg(hc));
    assert_eq!(crashed.conn(), ConnState::Connected);
    assert!(
        !persisted_flags(&acts).cache_lost,
        "in sync again, the flag stays: {acts:?}"
    );
}

/// Hole (found by the simulator once metadata writes took time, seed 1954): a node's
/// crash flag went once its own writes had landed — landed in the disk cache, not
/// durable — and a power loss then lost one with nothing marking its block. The flag
/// goes only after a flush (an activity-log transaction flushes the data first).
#[test]
fn the_crash_flag_is_cleared_only_after_a_flush() {
    let mut crashed = persisted(7);
    crashed.md.flags.primary_crashed = true;
    crashed.al_extents = vec![0];
    let mut cfg = ReplicaConfig::new(VolumeId::from_name("t"), NodeId(1), 1 << 20);
    cfg.fencing = FencingPolicy::DontCare;
    let (mut r, _) = Replica::new(cfg, crashed, 1);
    let mut out = Vec::new();
    let gens = r.md.generations;
    r.adopt_sync(gens, &mut out);
    let cleared = out
        .iter()
        .position(|a| matches!(a, Action::PersistSuperblock(md) if !md.flags.primary_crashed))
        .expect("the resync's end clears the crash flag");
    assert!(
        out[..cleared]
            .iter()
            .any(|a| matches!(a, Action::PersistAl { .. })),
        "the crash flag is cleared without a flush first: {out:?}"
    );
}

/// Hole (found by the simulator, seed 10161 of the long run): the peer acknowledged a
/// write and its disk died before flushing it; the Diskless state marked the write out
/// of sync, but the write was still landing here, and when it completed — "on both
/// disks" — it cleared those bits. The failed disk then came back stale and its bitmap
/// resync skipped the block. A write whose peer copy went with the peer's disk leaves
/// the bits alone when it completes.
#[test]
fn a_write_landing_late_does_not_clear_the_mark_of_what_the_peers_failed_disk_lost() {
    let (mut a, _b) = connected();
    let req = ReqId(1);
    let seq = write_sent(&mut a, req, 9 * 4096);
    a.step(peer_msg(Msg::WriteAck { seq }));
    a.step(peer_msg(Msg::StateUpdate {
        role: Role::Secondary,
        disk: DiskState::Diskless,
        epoch: a.md.epoch,
    }));
    assert!(a.bitmap().is_set(9), "the Diskless state marks the write");
    let acts = a.step(Event::LocalDone {
        tag: IoTag::App(req),
        result: Ok(()),
        digest: None,
    });
    assert!(acts.contains(&Action::Complete {
        req,
        result: Ok(None)
    }));
    assert!(
        a.bitmap().is_set(9),
        "the late completion cleared the mark of a write the peer's failed disk lost"
    );
}

/// Hole (found by the simulator's long run, seed 35151): a secondary marked a diskless
/// primary's writes in its bitmap in memory only, until the next writeback; it lost
/// power, kept some of the data and forgot the marks, and the primary's disk came back
/// to a resync that skipped those blocks. The mark is on disk before the write starts.
#[test]
fn a_diskless_primarys_write_is_marked_on_disk_before_it_is_written() {
    let (mut a, mut b) = connected();
    primary_went_diskless(&mut b);
    let (acts, _) = write_received(&mut a, &mut b, 11);
    let write = acts
        .iter()
        .position(|x| matches!(x, Action::LocalWrite { .. }))
        .expect("the secondary writes it");
    let marked = acts[..write].iter().any(|x| {
        matches!(x, Action::PersistBitmap { blocks }
            if blocks.iter().any(|(_, words)| words.first().is_some_and(|w| w & (1 << 11) != 0)))
    });
    assert!(
        marked,
        "the write starts before its mark is on disk: {acts:?}"
    );
}

/// Hole 10: a cluster log created afresh (a lost state directory) restarts its epochs,
/// and replicas that compared them with their own higher ones refused it for good. The
/// superblock names the log whose epochs it counts: a replica adopts the first log it
/// is told (its epochs start over in it), follows the same one, and refuses another with
/// the recovery command.
#[test]
fn a_replica_follows_one_cluster_log_and_refuses_another_with_the_recovery_command() {
    let mut r = replica(1);
    r.step(Event::Admin(Admin::SetEpoch(Epoch(40))));
    let ours = ClusterLogId(0xfeed);
    let acts = r.step(Event::Admin(Admin::JoinClusterLog(ours)));
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::PersistSuperblock(md)
            if md.cluster_log == ours && md.epoch == Epoch(0))),
        "the log is adopted, its epochs start over: {acts:?}"
    );
    // The new log's epochs take effect even though they are lower than the old count.
    r.step(Event::Admin(Admin::SetEpoch(Epoch(2))));
    assert_eq!(r.md.epoch, Epoch(2));
    assert!(r.step(Event::Admin(Admin::JoinClusterLog(ours))).is_empty());
    let acts = r.step(Event::Admin(Admin::JoinClusterLog(ClusterLogId(0xbad))));
    let refusal = acts
        .iter()
        .find_map(|a| match a {
            Action::Notify(Notice::Refused { reason }) => Some(reason.clone()),
            _ => None,
        })
        .expect("a foreign log is refused");
    assert!(
        refusal.contains("000000000000feed")
            && refusal.contains("0000000000000bad")
            && refusal.contains("tandemctl forget-cluster-log"),
        "{refusal}"
    );
    assert_eq!(r.md.cluster_log, ours, "the refusal changed nothing");
}
