use super::*;
use proptest::prelude::*;

fn arb_key() -> impl Strategy<Value = ResourceKey> {
    (
        "[a-z]{1,64}",
        proptest::collection::vec(any::<u8>(), 1..=64),
    )
        .prop_map(|(ls, name)| ResourceKey::new(&ls, &name).unwrap())
}

fn arb_mode() -> impl Strategy<Value = Mode> {
    (0u8..6).prop_map(|m| Mode::from_u8(m).unwrap())
}

fn arb_flags() -> impl Strategy<Value = Flags> {
    (0u32..32).prop_map(Flags)
}

fn arb_lvb() -> impl Strategy<Value = Lvb> {
    proptest::array::uniform32(any::<u8>()).prop_map(Lvb)
}

fn arb_copy() -> impl Strategy<Value = Option<LvbCopy>> {
    proptest::option::of(
        (arb_lvb(), any::<u64>(), any::<bool>()).prop_map(|(value, seq, valid)| LvbCopy {
            value,
            seq,
            valid,
        }),
    )
}

fn arb_status() -> impl Strategy<Value = Status> {
    (0usize..8).prop_map(|i| STATUSES[i])
}

fn arb_reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (arb_mode(), arb_copy(), any::<bool>()).prop_map(|(mode, lvb, demoted)| Reply::Granted {
            mode,
            lvb,
            demoted
        }),
        (arb_status(), proptest::option::of(arb_mode()))
            .prop_map(|(status, mode)| Reply::Failed { status, mode }),
        Just(Reply::Unlocked),
        Just(Reply::NotMaster),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), arb_key()).prop_map(|(e, resource)| Message::Lookup {
            epoch: Epoch(e),
            resource
        }),
        (any::<u64>(), arb_key(), any::<u32>()).prop_map(|(e, resource, m)| {
            Message::LookupReply {
                epoch: Epoch(e),
                resource,
                master: NodeId(m),
            }
        }),
        (any::<u64>(), arb_key()).prop_map(|(e, resource)| Message::Remove {
            epoch: Epoch(e),
            resource
        }),
        (arb_key(), any::<u64>(), arb_mode(), arb_flags()).prop_map(
            |(resource, l, mode, flags)| Message::Request {
                resource,
                lock: LockId(l),
                mode,
                flags
            }
        ),
        (
            arb_key(),
            any::<u64>(),
            arb_mode(),
            arb_flags(),
            proptest::option::of(arb_lvb())
        )
            .prop_map(|(resource, l, mode, flags, lvb)| Message::Convert {
                resource,
                lock: LockId(l),
                mode,
                flags,
                lvb
            }),
        (arb_key(), any::<u64>(), proptest::option::of(arb_lvb())).prop_map(
            |(resource, l, lvb)| Message::Unlock {
                resource,
                lock: LockId(l),
                lvb
            }
        ),
        (arb_key(), any::<u64>()).prop_map(|(resource, l)| Message::Cancel {
            resource,
            lock: LockId(l)
        }),
        (any::<u64>(), arb_reply()).prop_map(|(l, reply)| Message::Reply {
            lock: LockId(l),
            reply
        }),
        (any::<u64>(), arb_mode()).prop_map(|(l, mode)| Message::Blocking {
            lock: LockId(l),
            mode
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(e, c)| Message::RecoverStop {
            epoch: Epoch(e),
            completed: Epoch(c)
        }),
        (
            any::<u64>(),
            arb_key(),
            any::<u64>(),
            arb_mode(),
            arb_flags(),
            arb_copy()
        )
            .prop_map(|(e, resource, l, mode, flags, lvb)| Message::RecoverLock {
                epoch: Epoch(e),
                resource,
                lock: LockId(l),
                mode,
                flags,
                lvb
            }),
        (any::<u64>(), arb_key()).prop_map(|(e, resource)| Message::RecoverMaster {
            epoch: Epoch(e),
            resource
        }),
        any::<u64>().prop_map(|e| Message::RecoverDone { epoch: Epoch(e) }),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(n, i, p, r)| {
            Frame::Hello {
                node: NodeId(n),
                incarnation: Incarnation(i),
                peer_incarnation: Incarnation(p),
                receive_next: r,
            }
        }),
        (any::<u64>(), arb_message()).prop_map(|(seq, message)| Frame::Data { seq, message }),
        any::<u64>().prop_map(|next| Frame::Ack { next }),
        (any::<u64>(), any::<u64>()).prop_map(|(e, members)| Frame::Heartbeat {
            epoch: Epoch(e),
            members
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn frames_round_trip(frames in proptest::collection::vec(arb_frame(), 1..8)) {
        let mut buf = Vec::new();
        for f in &frames {
            encode(f, &mut buf);
        }
        let mut at = 0;
        for f in &frames {
            // Every prefix of a frame asks for more bytes.
            let (_, used) = decode(&buf[at..]).unwrap().unwrap();
            for cut in [0, 1, 3, used / 2, used - 1] {
                prop_assert!(decode(&buf[at..at + cut]).unwrap().is_none());
            }
            let (got, used) = decode(&buf[at..]).unwrap().unwrap();
            prop_assert_eq!(&got, f);
            at += used;
        }
        prop_assert_eq!(at, buf.len());
    }

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode(&bytes);
    }

    /// A frame with a byte changed is rejected (checksum), or in rare cases still a valid
    /// frame only if the length prefix changed; it never panics.
    #[test]
    fn corrupted_frames_are_rejected(frame in arb_frame(), pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut buf = Vec::new();
        encode(&frame, &mut buf);
        let i = pos.index(buf.len());
        buf[i] ^= flip;
        match decode(&buf) {
            Err(_) | Ok(None) => {}
            Ok(Some(_)) => prop_assert!(i < 4, "corruption at byte {} accepted", i),
        }
    }

    /// Well-checksummed but malformed bodies are rejected with an error, never a panic.
    #[test]
    fn checksummed_garbage_is_rejected_cleanly(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut content = vec![VERSION];
        content.extend_from_slice(&body);
        let crc = crc32fast::hash(&content);
        content.extend_from_slice(&crc.to_be_bytes());
        let mut buf = u32::try_from(content.len()).unwrap().to_be_bytes().to_vec();
        buf.extend_from_slice(&content);
        let _ = decode(&buf);
    }
}

#[test]
fn hostile_lengths_and_versions_are_named() {
    let err = decode(&[0xff, 0xff, 0xff, 0xff, 0]).unwrap_err();
    assert!(err.to_string().contains("frame length"), "{err}");
    let mut buf = Vec::new();
    encode(&Frame::Ack { next: 7 }, &mut buf);
    buf[4] = 9; // version
    let crc = crc32fast::hash(&buf[4..buf.len() - 4]);
    let n = buf.len();
    buf[n - 4..].copy_from_slice(&crc.to_be_bytes());
    let err = decode(&buf).unwrap_err();
    assert!(err.to_string().contains("version 9"), "{err}");
    let mut buf = Vec::new();
    encode(&Frame::Ack { next: 7 }, &mut buf);
    let n = buf.len();
    buf[n - 1] ^= 1;
    assert!(decode(&buf).unwrap_err().to_string().contains("checksum"));
}
