//! The emulator's tests: the rule table in `testdata/pr_rules.txt`, property tests over
//! random command sequences, and the NVMe face.

use super::*;
use crate::pr::nvme::{
    AcquireAction, ChangePtpl, NvmeReservation, NvmeStatus, RegisterAction, ReleaseAction,
    ReservationStatus,
};
use proptest::prelude::*;

const RULES: &str = include_str!("../../testdata/pr_rules.txt");

/// The three-nexus LU every table case starts from.
fn lu() -> Emulator {
    let mut lu = Emulator::new();
    for (i, rtpi) in [1u16, 2, 3].into_iter().enumerate() {
        lu.add_nexus(NexusInfo::sas(
            0x5001_4050_0000_00a0 + u64::try_from(i).unwrap(),
            rtpi,
        ));
    }
    lu
}

fn nexus_named(name: &str) -> NexusId {
    match name {
        "A" => NexusId(0),
        "B" => NexusId(1),
        "C" => NexusId(2),
        other => panic!("unknown nexus {other}"),
    }
}

fn key(text: &str) -> PrKey {
    PrKey::new(u64::from_str_radix(text, 16).unwrap_or_else(|_| panic!("bad key {text}")))
}

fn args(words: &[&str]) -> std::collections::HashMap<String, String> {
    words
        .iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => ((*w).to_owned(), String::new()),
        })
        .collect()
}

fn ua_text(ua: Option<&(u8, u8)>) -> String {
    ua.map_or_else(|| "-".to_owned(), |(a, q)| format!("{a:02x}/{q:02x}"))
}

/// Runs one step line; panics with the line on any mismatch.
fn run_step(lu: &mut Emulator, line: &str, case: &str) {
    let (command, expect) = line
        .split_once("->")
        .unwrap_or_else(|| panic!("[{case}] no `->` in `{line}`"));
    let words: Vec<&str> = command.split_whitespace().collect();
    let nexus = nexus_named(words[0]);
    let verb = words[1];
    let a = args(&words[2..]);
    let k = |name: &str| key(a.get(name).map_or("0", String::as_str));
    let ty = || a.get("type").map_or(0, |t| t.parse::<u8>().unwrap());
    let response = match verb {
        "read" | "write" => {
            let access = if verb == "read" {
                Access::Read
            } else {
                Access::Write
            };
            match lu.data_command(nexus, access) {
                Ok(()) => ScsiResponse::good(Vec::new()),
                Err(r) => r,
            }
        }
        "keys" | "reservation" | "status" | "caps" => {
            let action = match verb {
                "keys" => PrInAction::ReadKeys,
                "reservation" => PrInAction::ReadReservation,
                "status" => PrInAction::ReadFullStatus,
                _ => PrInAction::ReportCapabilities,
            };
            let cdb = crate::pr::cdb::PrInCdb {
                service_action: action.code(),
                allocation_length: 8192,
                control: 0,
            };
            let resp = lu.execute(nexus, &cdb.encode(), &[]);
            if resp.status == ScsiStatus::GOOD {
                PrInData::decode(action, &resp.data)
                    .unwrap_or_else(|e| panic!("[{case}] `{line}`: undecodable answer: {e}"));
            }
            resp
        }
        _ => {
            let mut cmd = match verb {
                "register" => PrOutCommand::register(k("rk"), k("sark")),
                "ignore" => PrOutCommand::register_and_ignore(k("sark")),
                "reserve" => PrOutCommand {
                    type_code: ty(),
                    ..PrOutCommand::new(PrOutAction::Reserve)
                },
                "release" => PrOutCommand {
                    type_code: ty(),
                    ..PrOutCommand::new(PrOutAction::Release)
                },
                "clear" => PrOutCommand::new(PrOutAction::Clear),
                "preempt" | "preempt-abort" => PrOutCommand {
                    type_code: ty(),
                    service_action_key: k("sark"),
                    ..PrOutCommand::new(if verb == "preempt" {
                        PrOutAction::Preempt
                    } else {
                        PrOutAction::PreemptAndAbort
                    })
                },
                "move" => {
                    let dest = nexus_named(&a["to"]);
                    let info = lu.nexus(dest).unwrap().clone();
                    PrOutCommand::register_and_move(
                        k("rk"),
                        k("sark"),
                        info.initiator,
                        info.relative_target_port,
                        a.contains_key("unreg"),
                    )
                }
                other => panic!("[{case}] unknown command {other}"),
            };
            cmd.reservation_key = k("rk");
            cmd.aptpl = a.contains_key("aptpl");
            cmd.all_tg_pt = a.contains_key("all_tg_pt");
            if let Some(spec) = a.get("spec") {
                cmd.spec_i_pt = true;
                cmd.transport_ids = spec
                    .split(',')
                    .map(|n| lu.nexus(nexus_named(n)).unwrap().initiator.clone())
                    .collect();
            }
            let (cdb, params) = cmd.to_scsi();
            lu.execute(nexus, &cdb, &params)
        }
    };
    lu.check_invariants();

    let mut expect_words = expect.split_whitespace();
    let outcome = match expect_words.next() {
        Some("good") => ScsiStatus::GOOD == response.status && response.sense.is_none(),
        Some("conflict") => response.status == ScsiStatus::RESERVATION_CONFLICT,
        Some("ua") => {
            let want = expect_words.next().unwrap();
            response.sense.as_ref().is_some_and(|s| {
                s.key == SenseKey::UnitAttention && format!("{:02x}/{:02x}", s.asc, s.ascq) == want
            })
        }
        Some("check") => {
            let sense_key = match expect_words.next() {
                Some("illegal") => SenseKey::IllegalRequest,
                Some("not-ready") => SenseKey::NotReady,
                other => panic!("[{case}] unknown sense key {other:?}"),
            };
            let want = expect_words.next().unwrap();
            response.sense.as_ref().is_some_and(|s| {
                s.key == sense_key && format!("{:02x}/{:02x}", s.asc, s.ascq) == want
            })
        }
        other => panic!("[{case}] unknown expectation {other:?}"),
    };
    assert!(
        outcome,
        "[{case}] `{}`: got {} {:?}; state {:?}",
        line.trim(),
        response.status,
        response.sense,
        lu
    );
    for assertion in expect_words {
        let (name, value) = assertion.split_once('=').unwrap_or((assertion, ""));
        let ok = match name {
            "gen" => lu.generation().to_string() == value,
            "keys" => {
                let keys: Vec<String> = lu
                    .registrations()
                    .iter()
                    .map(|r| format!("{:x}", r.key))
                    .collect();
                let want = if value == "-" {
                    String::new()
                } else {
                    value.to_owned()
                };
                keys.join(",") == want
            }
            "none" => lu.reservation().is_none(),
            "holder" => lu
                .reservation()
                .is_some_and(|r| r.holder == nexus_named(value)),
            "type" => lu
                .reservation()
                .is_some_and(|r| r.reservation_type.scsi_code().to_string() == value),
            "ptpl" => u8::from(lu.aptpl_active()).to_string() == value,
            ua if ua.starts_with("ua(") => {
                let who = nexus_named(&ua[3..4]);
                ua_text(lu.pending_unit_attentions(who).first()) == value
            }
            other => panic!("[{case}] unknown assertion {other}"),
        };
        assert!(
            ok,
            "[{case}] `{}`: assertion {assertion} failed; state {lu:?}",
            line.trim()
        );
    }
}

#[test]
fn rule_table() {
    let mut lu = lu();
    let mut case = String::new();
    let mut steps = 0;
    let mut cases = 0;
    for line in RULES.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix("case ") {
            case = name.to_owned();
            lu = self::lu();
            cases += 1;
            continue;
        }
        if let Some(ids) = line.strip_prefix("ports ") {
            // Re-create the LU with these relative target port identifiers (ports stay
            // distinct).
            let mut fresh = Emulator::new();
            for (i, rtpi) in ids.split_whitespace().enumerate() {
                let rtpi: u16 = rtpi.parse().unwrap();
                let port = u16::try_from(i).unwrap() + 1;
                fresh.add_nexus(
                    NexusInfo::sas(0x5001_4050_0000_00a0 + u64::try_from(i).unwrap(), rtpi)
                        .on_target_port(port),
                );
            }
            lu = fresh;
            continue;
        }
        run_step(&mut lu, line, &case);
        steps += 1;
    }
    assert!(
        cases >= 20 && steps >= 100,
        "{cases} cases, {steps} steps: table not read?"
    );
}

#[test]
fn read_keys_is_cut_to_the_allocation_length_but_reports_the_full_length() {
    let mut lu = lu();
    for (n, k) in [(0u16, 0xa1u64), (1, 0xb2), (2, 0xc3)] {
        lu.pr_out(
            NexusId(n),
            &PrOutCommand::register(PrKey::ZERO, PrKey::new(k)),
        )
        .unwrap();
    }
    let cdb = crate::pr::cdb::PrInCdb {
        service_action: 0,
        allocation_length: 20,
        control: 0,
    };
    let resp = lu.execute(NexusId(0), &cdb.encode(), &[]);
    assert_eq!(resp.data.len(), 20);
    let keys = KeyList::decode(&resp.data).unwrap();
    assert!(keys.truncated);
    assert_eq!(keys.keys, vec![PrKey::new(0xa1)]);
    let cdb = crate::pr::cdb::PrInCdb {
        service_action: 0,
        allocation_length: 4,
        control: 0,
    };
    let resp = lu.execute(NexusId(0), &cdb.encode(), &[]);
    assert_eq!(
        resp.sense,
        Some(Sense::new(SenseKey::IllegalRequest, 0x24, 0))
    );
}

#[test]
fn malformed_commands_get_sense_not_panics() {
    let mut lu = lu();
    assert_eq!(
        lu.execute(NexusId(0), &[], &[]).sense.unwrap().asc,
        0x20,
        "empty CDB"
    );
    assert_eq!(
        lu.execute(NexusId(0), &[0x1b; 6], &[]).sense.unwrap().asc,
        0x20
    );
    // READ(10)/WRITE(10) are checked against the reservation.
    let write10 = [0x2a, 0, 0, 0, 0, 8, 0, 0, 1, 0];
    assert_eq!(
        lu.execute(NexusId(0), &write10, &[0; 512]).status,
        ScsiStatus::GOOD
    );
    lu.pr_out(
        NexusId(1),
        &PrOutCommand::register(PrKey::ZERO, PrKey::new(0xb2)),
    )
    .unwrap();
    let wero = ReservationType::WriteExclusiveRegistrantsOnly;
    lu.pr_out(NexusId(1), &PrOutCommand::reserve(PrKey::new(0xb2), wero))
        .unwrap();
    assert_eq!(
        lu.execute(NexusId(0), &write10, &[0; 512]).status,
        ScsiStatus::RESERVATION_CONFLICT
    );
    let read10 = [0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0];
    assert_eq!(
        lu.execute(NexusId(0), &read10, &[]).status,
        ScsiStatus::GOOD
    );
    assert_eq!(
        lu.execute(NexusId(9), &[0x5e; 10], &[]).sense.unwrap().asc,
        0x25
    );
    // PR OUT with a 10-byte parameter list: PARAMETER LIST LENGTH ERROR.
    let cdb = PrOutCdb {
        service_action: 0,
        scope: 0,
        type_code: 0,
        parameter_list_length: 10,
        control: 0,
    };
    assert_eq!(
        lu.execute(NexusId(0), &cdb.encode(), &[0; 10])
            .sense
            .unwrap()
            .asc,
        0x1a
    );
    // 25 bytes without SPEC_I_PT: also a length error.
    let cdb = PrOutCdb {
        parameter_list_length: 25,
        ..cdb
    };
    assert_eq!(
        lu.execute(NexusId(0), &cdb.encode(), &[0; 25])
            .sense
            .unwrap()
            .asc,
        0x1a
    );
    // Unknown service action: a conflict for a non-holder, INVALID FIELD IN CDB for the
    // reservation holder.
    let cdb = PrOutCdb {
        service_action: 0x1f,
        parameter_list_length: 24,
        ..cdb
    };
    assert_eq!(
        lu.execute(NexusId(0), &cdb.encode(), &[0; 24]).status,
        ScsiStatus::RESERVATION_CONFLICT
    );
    assert_eq!(
        lu.execute(NexusId(1), &cdb.encode(), &[0; 24])
            .sense
            .unwrap()
            .asc,
        0x24
    );
    // INQUIRY works and never reports unit attentions.
    let inq = lu.execute(
        NexusId(0),
        &crate::pr::cdb::InquiryCdb::standard(96).encode(),
        &[],
    );
    assert_eq!(InquiryData::decode(&inq.data).unwrap().vendor, "TANDEM");
}

#[test]
fn power_cycle_keeps_state_only_with_aptpl() {
    let mut lu = lu();
    lu.pr_out(
        NexusId(0),
        &PrOutCommand::register(PrKey::ZERO, PrKey::new(1)),
    )
    .unwrap();
    lu.power_cycle();
    assert!(lu.registrations().is_empty());
    assert_eq!(lu.pending_unit_attentions(NexusId(1)), &[(0x29, 0x01)]);
    lu.pr_out(
        NexusId(0),
        &PrOutCommand::register(PrKey::ZERO, PrKey::new(1)),
    )
    .unwrap_err();
    let reg = PrOutCommand::register(PrKey::ZERO, PrKey::new(1)).with_aptpl(true);
    lu.pr_out(NexusId(0), &reg).unwrap();
    lu.pr_out(
        NexusId(0),
        &PrOutCommand::reserve(
            PrKey::new(1),
            ReservationType::WriteExclusiveRegistrantsOnly,
        ),
    )
    .unwrap();
    lu.power_cycle();
    assert_eq!(lu.registrations().len(), 1);
    assert!(lu.reservation().is_some());
}

/// A random PR command from a random nexus, drawn from a small key pool so keys collide.
fn arb_step() -> impl Strategy<Value = (u16, PrOutCommand)> {
    let key = prop_oneof![Just(0u64), Just(0xa1), Just(0xb2), Just(0xc3)].prop_map(PrKey::new);
    let ty = prop_oneof![
        Just(1u8),
        Just(3),
        Just(5),
        Just(6),
        Just(7),
        Just(8),
        Just(0),
        Just(2)
    ];
    (
        0u16..3,
        0usize..8,
        key.clone(),
        key,
        ty,
        any::<[bool; 3]>(),
        0u16..3,
    )
        .prop_map(|(n, a, rk, sark, ty, flags, dest)| {
            let action = PrOutAction::ALL[a];
            let mut cmd = PrOutCommand::new(action);
            cmd.reservation_key = rk;
            cmd.service_action_key = sark;
            cmd.type_code = ty;
            cmd.aptpl = flags[0];
            cmd.all_tg_pt = flags[1] && action != PrOutAction::RegisterAndMove;
            if action == PrOutAction::RegisterAndMove {
                cmd.transport_ids = vec![TransportId::Sas {
                    address: (0x5001_4050_0000_00a0u64 + u64::from(dest)).to_be_bytes(),
                }];
                cmd.relative_target_port = dest + 1;
                cmd.unreg = flags[2];
            } else if flags[2] && action == PrOutAction::Register {
                cmd.spec_i_pt = true;
                cmd.transport_ids = vec![TransportId::Sas {
                    address: (0x5001_4050_0000_00a0u64 + u64::from(dest)).to_be_bytes(),
                }];
            }
            (n, cmd)
        })
}

proptest! {
    #[test]
    fn random_sequences_keep_the_invariants(steps in proptest::collection::vec(arb_step(), 1..40)) {
        let mut lu = lu();
        let mut generation = lu.generation();
        for (n, cmd) in steps {
            let _ = lu.pr_out(NexusId(n), &cmd);
            lu.check_invariants();
            prop_assert!(lu.generation() >= generation, "PRgeneration went backwards");
            generation = lu.generation();
            for action in PrInAction::ALL {
                let cdb = crate::pr::cdb::PrInCdb {
                    service_action: action.code(), allocation_length: 8192, control: 0,
                };
                let resp = lu.execute(NexusId(n), &cdb.encode(), &[]);
                if resp.status == ScsiStatus::GOOD {
                    let data = PrInData::decode(action, &resp.data);
                    prop_assert!(data.is_ok(), "{action}: {data:?}");
                }
            }
            // Whoever holds the reservation may always write.
            if let Some(res) = lu.reservation() {
                prop_assert!(lu.may_access(res.holder, Access::Write));
            }
        }
    }

    #[test]
    fn arbitrary_cdbs_and_data_never_panic(cdb in proptest::collection::vec(any::<u8>(), 0..16),
                                           data in proptest::collection::vec(any::<u8>(), 0..96),
                                           n in 0u16..4) {
        let mut lu = lu();
        lu.pr_out(NexusId(0), &PrOutCommand::register(PrKey::ZERO, PrKey::new(0xa1))).unwrap();
        let mut cdb = cdb;
        if let Some(first) = cdb.first_mut() {
            *first = [0x5e, 0x5f, 0x12, *first][usize::from(*first % 4)];
        }
        let _ = lu.execute(NexusId(n), &cdb, &data);
        lu.check_invariants();
    }
}

// ---- NVMe ---------------------------------------------------------------------------

fn nvme_lu() -> (Emulator, NexusId, NexusId) {
    let mut lu = Emulator::new();
    let a = lu.add_nexus(NexusInfo::nvme_host([0xa; 16]));
    let b = lu.add_nexus(NexusInfo::nvme_host([0xb; 16]));
    (lu, a, b)
}

fn nvme(lu: &mut Emulator, host: NexusId, cmd: NvmeReservation) -> NvmeCompletion {
    let c = lu.nvme_execute(host, &cmd.encode());
    lu.check_invariants();
    c
}

fn register(key: u64) -> NvmeReservation {
    NvmeReservation::Register {
        action: RegisterAction::Register,
        ignore_existing_key: false,
        change_ptpl: ChangePtpl::NoChange,
        current_key: PrKey::ZERO,
        new_key: PrKey::new(key),
    }
}

fn acquire(action: AcquireAction, own: u64, victim: u64, ty: ReservationType) -> NvmeReservation {
    NvmeReservation::Acquire {
        action,
        ignore_existing_key: false,
        rtype: ty.nvme_code(),
        current_key: PrKey::new(own),
        preempt_key: PrKey::new(victim),
    }
}

fn report(lu: &mut Emulator, host: NexusId) -> ReservationStatus {
    let c = nvme(
        lu,
        host,
        NvmeReservation::Report {
            extended: true,
            buffer_len: 4096,
        },
    );
    assert_eq!(c.status, NvmeStatus::SUCCESS);
    ReservationStatus::decode(&c.data, true).unwrap()
}

#[test]
fn nvme_fencing_sequence() {
    let wero = ReservationType::WriteExclusiveRegistrantsOnly;
    let (mut lu, a, b) = nvme_lu();
    assert_eq!(nvme(&mut lu, a, register(0xa1)).status, NvmeStatus::SUCCESS);
    assert_eq!(nvme(&mut lu, b, register(0xb2)).status, NvmeStatus::SUCCESS);
    // Registering again with the same key is fine, with another key a conflict.
    assert_eq!(nvme(&mut lu, a, register(0xa1)).status, NvmeStatus::SUCCESS);
    assert!(
        nvme(&mut lu, a, register(0xa9))
            .status
            .is_reservation_conflict()
    );
    assert_eq!(
        nvme(&mut lu, a, acquire(AcquireAction::Acquire, 0xa1, 0, wero)).status,
        NvmeStatus::SUCCESS
    );
    let status = report(&mut lu, b);
    assert_eq!(status.rtype, 3, "NVMe numbers WERO 3");
    assert_eq!(status.holder().unwrap().key, PrKey::new(0xa1));
    assert_eq!(status.registrants[0].host_id, vec![0xa; 16]);
    // B preempts A: A loses its registration and B holds the reservation.
    assert_eq!(
        nvme(
            &mut lu,
            b,
            acquire(AcquireAction::PreemptAndAbort, 0xb2, 0xa1, wero)
        )
        .status,
        NvmeStatus::SUCCESS
    );
    let status = report(&mut lu, a);
    assert_eq!(status.registrants.len(), 1);
    assert_eq!(status.holder().unwrap().key, PrKey::new(0xb2));
    assert!(!lu.may_access(a, Access::Write));
    assert!(
        lu.pending_unit_attentions(a).is_empty(),
        "NVMe hosts get no UAs"
    );
    // A cannot come back in through Acquire.
    assert!(
        nvme(&mut lu, a, acquire(AcquireAction::Acquire, 0xa1, 0, wero))
            .status
            .is_reservation_conflict()
    );
}

#[test]
fn nvme_release_with_the_wrong_type_is_invalid_field() {
    let wero = ReservationType::WriteExclusiveRegistrantsOnly;
    let (mut lu, a, _) = nvme_lu();
    nvme(&mut lu, a, register(0xa1));
    nvme(&mut lu, a, acquire(AcquireAction::Acquire, 0xa1, 0, wero));
    let wrong = NvmeReservation::Release {
        action: ReleaseAction::Release,
        ignore_existing_key: false,
        rtype: 1,
        current_key: PrKey::new(0xa1),
    };
    assert_eq!(nvme(&mut lu, a, wrong).status, NvmeStatus::INVALID_FIELD);
    let clear = NvmeReservation::Release {
        action: ReleaseAction::Clear,
        ignore_existing_key: false,
        rtype: 0,
        current_key: PrKey::new(0xa1),
    };
    assert_eq!(nvme(&mut lu, a, clear).status, NvmeStatus::SUCCESS);
    assert!(lu.registrations().is_empty() && lu.reservation().is_none());
    let unknown = crate::pr::nvme::NvmeCommandWords {
        opcode: 0x02,
        cdw10: 0,
        cdw11: 0,
        data_out: Vec::new(),
        data_in_len: 0,
    };
    assert_eq!(
        lu.nvme_execute(a, &unknown).status,
        NvmeStatus::INVALID_OPCODE
    );
}
