//! The policy against the emulator: SCSI and NVMe paths, multipath, refused PREEMPT AND
//! ABORT, stuck targets, unit attentions, and random sequences.

use super::*;
use crate::emulator::{Access, Emulator, NexusId, NexusInfo};
use crate::transport::{EmulatedNvmePath, EmulatedPath};
use proptest::prelude::*;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

const A: PrKey = PrKey::new(0xa1);
const B: PrKey = PrKey::new(0xb2);
const C: PrKey = PrKey::new(0xc3);

struct Lab {
    lu: Arc<Mutex<Emulator>>,
    paths: Vec<Arc<EmulatedPath>>,
}

impl Lab {
    /// An LU with `n` SAS nexuses, one path each.
    fn new(n: u16) -> Self {
        let mut lu = Emulator::new();
        for i in 0..n {
            lu.add_nexus(NexusInfo::sas(0x5001_4050_0000_0000 + u64::from(i), i + 1));
        }
        let lu = Arc::new(Mutex::new(lu));
        let paths = (0..n)
            .map(|i| Arc::new(EmulatedPath::connect(&lu, NexusId(i), &format!("nexus{i}"))))
            .collect();
        Self { lu, paths }
    }

    fn policy(&self, key: PrKey, nexuses: &[usize], preempt: PreemptFlavour) -> FencePolicy {
        let paths = nexuses
            .iter()
            .map(|&i| Arc::clone(&self.paths[i]) as Arc<dyn PrTransport>)
            .collect();
        FencePolicy::new(
            key,
            paths,
            FenceSettings {
                preempt,
                ..FenceSettings::default()
            },
        )
        .unwrap()
    }

    fn lu(&self) -> std::sync::MutexGuard<'_, Emulator> {
        self.lu.lock().unwrap()
    }

    fn may_write(&self, nexus: u16) -> bool {
        self.lu().may_access(NexusId(nexus), Access::Write)
    }
}

#[test]
fn unfence_registers_and_reserves_once() {
    let lab = Lab::new(2);
    let a = lab.policy(A, &[0], PreemptFlavour::Preempt);
    let b = lab.policy(B, &[1], PreemptFlavour::Preempt);
    let ra = a.unfence(1000).unwrap();
    assert!(ra.reserved && ra.is_complete());
    let r = ra.reservation.unwrap();
    assert_eq!((r.key, r.type_code), (A, 5));
    let rb = b.unfence(1001).unwrap();
    assert!(!rb.reserved, "the reservation exists already");
    assert_eq!(rb.reservation.unwrap().key, A);
    assert_eq!(lab.lu().registrations().len(), 2);
    assert!(lab.may_write(0) && lab.may_write(1));
    // Unfencing again is harmless.
    a.unfence(1002).unwrap();
    assert!(a.verify().unwrap().is_ok());
    assert!(b.verify().unwrap().is_ok());
    assert!(a.verify().unwrap().holder && !b.verify().unwrap().holder);
}

#[test]
fn fence_with_preempt_and_abort_removes_the_victim_and_is_idempotent() {
    let lab = Lab::new(2);
    let a = lab.policy(A, &[0], PreemptFlavour::PreemptAndAbort);
    let b = lab.policy(B, &[1], PreemptFlavour::PreemptAndAbort);
    a.unfence(1).unwrap();
    b.unfence(2).unwrap();
    let record = b.fence(A, 3).unwrap();
    assert_eq!(record.method, FenceMethod::PreemptAndAbort);
    assert_eq!((record.who, record.key, record.time_ms), (B, A, 3));
    assert_eq!(record.generation, lab.lu().generation());
    assert_eq!(
        record.reservation.unwrap().key,
        B,
        "B took the reservation over"
    );
    assert!(!lab.may_write(0), "the fenced node cannot write");
    assert!(lab.may_write(1));
    let again = b.fence(A, 4).unwrap();
    assert_eq!(again.method, FenceMethod::AlreadyGone);
    // The victim sees REGISTRATIONS PREEMPTED first; the policy re-sends and finds its key gone.
    let v = a.verify().unwrap();
    assert!(!v.registered && !v.is_ok(), "{v:?}");
    // A fenced node may not fence others.
    let e = a.fence(B, 5).unwrap_err();
    assert!(matches!(e, FenceError::NotRegistered { .. }), "{e}");
    let json = serde_json::to_value(&record).unwrap();
    assert_eq!(json["method"], "preempt-and-abort");
    assert_eq!(json["key"], "0x00000000000000a1");
}

#[test]
fn refused_preempt_and_abort_falls_back_to_preempt_and_says_so() {
    let lab = Lab::new(2);
    lab.paths[1]
        .faults()
        .reject_preempt_and_abort
        .store(true, Ordering::SeqCst);
    let a = lab.policy(A, &[0], PreemptFlavour::PreemptAndAbort);
    let b = lab.policy(B, &[1], PreemptFlavour::PreemptAndAbort);
    a.unfence(1).unwrap();
    b.unfence(2).unwrap();
    let record = b.fence(A, 3).unwrap();
    let FenceMethod::PreemptAfterAbortRefused { refusal } = &record.method else {
        panic!("no fallback recorded: {record:?}");
    };
    assert!(refusal.contains("Illegal Request"), "{refusal}");
    assert!(!lab.may_write(0));
}

#[test]
fn a_stuck_target_is_a_fence_failure() {
    let lab = Lab::new(2);
    let a = lab.policy(A, &[0], PreemptFlavour::Preempt);
    let b = lab.policy(B, &[1], PreemptFlavour::Preempt);
    a.unfence(1).unwrap();
    b.unfence(2).unwrap();
    lab.paths[1].faults().stuck.store(true, Ordering::SeqCst);
    let e = b.fence(A, 3).unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(lab.lu().key_of(NexusId(0)).is_some(), "nothing was fenced");
}

#[test]
fn a_dead_path_is_skipped_and_a_fence_goes_through_the_next() {
    let mut lu = Emulator::new();
    // Node B has two paths (two nexuses of the same initiator port on two target ports).
    let a0 = lu.add_nexus(NexusInfo::sas(0xa0, 1));
    let b0 = lu.add_nexus(NexusInfo::sas(0xb0, 1));
    let b1 = lu.add_nexus(NexusInfo::sas(0xb0, 2));
    let lu = Arc::new(Mutex::new(lu));
    let pa = Arc::new(EmulatedPath::connect(&lu, a0, "a"));
    let pb0 = Arc::new(EmulatedPath::connect(&lu, b0, "b-path0"));
    let pb1 = Arc::new(EmulatedPath::connect(&lu, b1, "b-path1"));
    let a = FencePolicy::new(A, vec![pa], FenceSettings::default()).unwrap();
    let b = FencePolicy::new(
        B,
        vec![Arc::clone(&pb0) as Arc<dyn PrTransport>, pb1],
        FenceSettings::default(),
    )
    .unwrap();
    a.unfence(1).unwrap();
    let rb = b.unfence(2).unwrap();
    assert!(rb.is_complete());
    assert_eq!(
        lu.lock()
            .unwrap()
            .registrations()
            .iter()
            .filter(|r| r.key == B)
            .count(),
        2,
        "registered on both paths"
    );
    pb0.faults().down.store(true, Ordering::SeqCst);
    let record = b.fence(A, 3).unwrap();
    assert_eq!(record.path, "b-path1");
    assert!(!lu.lock().unwrap().may_access(a0, Access::Write));
    assert!(lu.lock().unwrap().may_access(b1, Access::Write));
}

#[test]
fn fencing_a_multipath_victim_removes_every_path() {
    let mut lu = Emulator::new();
    let a0 = lu.add_nexus(NexusInfo::sas(0xa0, 1));
    let a1 = lu.add_nexus(NexusInfo::sas(0xa0, 2));
    let b0 = lu.add_nexus(NexusInfo::sas(0xb0, 1));
    let lu = Arc::new(Mutex::new(lu));
    let a = FencePolicy::new(
        A,
        vec![
            Arc::new(EmulatedPath::connect(&lu, a0, "a0")),
            Arc::new(EmulatedPath::connect(&lu, a1, "a1")),
        ],
        FenceSettings::default(),
    )
    .unwrap();
    let b = FencePolicy::new(
        B,
        vec![Arc::new(EmulatedPath::connect(&lu, b0, "b0"))],
        FenceSettings::default(),
    )
    .unwrap();
    a.unfence(1).unwrap();
    b.unfence(2).unwrap();
    assert!(lu.lock().unwrap().may_access(a1, Access::Write));
    b.fence(A, 3).unwrap();
    let lu = lu.lock().unwrap();
    assert!(!lu.may_access(a0, Access::Write) && !lu.may_access(a1, Access::Write));
}

#[test]
fn fencing_needs_our_own_registration_and_a_valid_victim() {
    let lab = Lab::new(2);
    let a = lab.policy(A, &[0], PreemptFlavour::Preempt);
    let b = lab.policy(B, &[1], PreemptFlavour::Preempt);
    a.unfence(1).unwrap();
    let e = b.fence(A, 2).unwrap_err();
    assert!(matches!(e, FenceError::NotRegistered { .. }), "{e}");
    assert!(matches!(
        b.fence(B, 2),
        Err(FenceError::InvalidArgument { .. })
    ));
    assert!(matches!(
        b.fence(PrKey::ZERO, 2),
        Err(FenceError::InvalidArgument { .. })
    ));
    assert!(
        FencePolicy::new(
            PrKey::ZERO,
            vec![Arc::clone(&lab.paths[0]) as Arc<dyn PrTransport>],
            FenceSettings::default()
        )
        .is_err()
    );
    assert!(FencePolicy::new(A, Vec::new(), FenceSettings::default()).is_err());
}

#[test]
fn unit_attentions_are_retried() {
    let lab = Lab::new(3);
    let a = lab.policy(A, &[0], PreemptFlavour::Preempt);
    let b = lab.policy(B, &[1], PreemptFlavour::Preempt);
    let c = lab.policy(C, &[2], PreemptFlavour::Preempt);
    a.unfence(1).unwrap();
    b.unfence(2).unwrap();
    c.unfence(3).unwrap();
    // A leaves: its WERO reservation goes, B and C get RESERVATIONS RELEASED.
    a.leave().unwrap();
    assert!(!lab.lu().pending_unit_attentions(NexusId(1)).is_empty());
    let record = b.fence(C, 4).unwrap();
    assert!(
        record.notes.iter().any(|n| n.contains("UNIT ATTENTION")),
        "{record:?}"
    );
    assert!(
        record.notes.iter().any(|n| n.contains("reserved")),
        "{record:?}"
    );
    assert_eq!(record.reservation.unwrap().key, B);
}

#[test]
fn self_check_sees_the_fence_at_its_next_check() {
    let lab = Lab::new(2);
    let a = lab.policy(A, &[0], PreemptFlavour::Preempt);
    let b = lab.policy(B, &[1], PreemptFlavour::Preempt);
    a.unfence(0).unwrap();
    b.unfence(0).unwrap();
    let mut check = SelfCheck::new(A, 1000, 0);
    let first = a.read_keys();
    assert!(matches!(
        check.observe(0, first.as_ref()),
        Some(SelfCheckEvent::Confirmed { .. })
    ));
    // Fenced at 700, between the checks at 0 and 1000.
    let fenced = b.fence(A, 700).unwrap();
    assert_eq!(check.next_due_ms(), 1000);
    let seen = a.read_keys();
    let event = check.observe(1000, seen.as_ref());
    let Some(SelfCheckEvent::KeyLost {
        time_ms,
        last_seen_ms,
        ..
    }) = event
    else {
        panic!("loss not reported: {event:?}");
    };
    assert!(time_ms - fenced.time_ms <= check.period_ms());
    assert_eq!(last_seen_ms, Some(0));
}

#[cfg(feature = "shell")]
#[test]
fn self_check_task_reports_loss_within_a_period() {
    use std::time::{Duration, Instant};
    let lab = Lab::new(2);
    let a = lab.policy(A, &[0], PreemptFlavour::Preempt);
    let b = lab.policy(B, &[1], PreemptFlavour::Preempt);
    a.unfence(0).unwrap();
    b.unfence(0).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let task = SelfCheckTask::spawn(
        a.paths().to_vec(),
        A,
        Duration::from_millis(100),
        5,
        move |e| {
            let _ = tx.send((Instant::now(), e));
        },
    )
    .unwrap();
    let (_, first) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        matches!(first, SelfCheckEvent::Confirmed { .. }),
        "{first:?}"
    );
    let fenced_at = Instant::now();
    b.fence(A, 1).unwrap();
    let (seen_at, event) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(matches!(event, SelfCheckEvent::KeyLost { .. }), "{event:?}");
    let latency = seen_at.duration_since(fenced_at);
    assert!(
        latency <= Duration::from_millis(100 + 200),
        "took {latency:?}"
    );
    task.stop();
}

// ---- NVMe ---------------------------------------------------------------------------

fn nvme_lab() -> (Arc<Mutex<Emulator>>, Vec<Arc<EmulatedNvmePath>>) {
    let mut lu = Emulator::new();
    let hosts: Vec<NexusId> = (0..2u8)
        .map(|i| lu.add_nexus(NexusInfo::nvme_host([i + 1; 16])))
        .collect();
    let lu = Arc::new(Mutex::new(lu));
    let paths = hosts
        .iter()
        .map(|&h| {
            Arc::new(EmulatedNvmePath::connect(
                &lu,
                h,
                &format!("nvme-host{}", h.0),
            ))
        })
        .collect();
    (lu, paths)
}

#[test]
fn nvme_paths_unfence_and_fence_with_nvme_numbering() {
    let (lu, paths) = nvme_lab();
    let a = FencePolicy::new(
        A,
        vec![Arc::clone(&paths[0]) as Arc<dyn PrTransport>],
        FenceSettings::default(),
    )
    .unwrap();
    let b = FencePolicy::new(
        B,
        vec![Arc::clone(&paths[1]) as Arc<dyn PrTransport>],
        FenceSettings::default(),
    )
    .unwrap();
    let ra = a.unfence(1).unwrap();
    assert_eq!(
        ra.reservation.unwrap().type_code,
        5,
        "reported in SCSI numbering"
    );
    assert_eq!(
        lu.lock()
            .unwrap()
            .reservation()
            .unwrap()
            .reservation_type
            .nvme_code(),
        3,
        "stored as NVMe type 3"
    );
    b.unfence(2).unwrap();
    let record = b.fence(A, 3).unwrap();
    assert_eq!(record.method, FenceMethod::PreemptAndAbort);
    assert!(!lu.lock().unwrap().may_access(NexusId(0), Access::Write));
    let status = paths[1].read_full_status().unwrap();
    assert_eq!(status.entries.len(), 1);
    assert!(matches!(
        &status.entries[0].initiator,
        crate::pr::data::Initiator::Nvme { host_id, .. } if host_id == &vec![2u8; 16]
    ));
    let caps = paths[1].report_capabilities().unwrap();
    assert!(caps.supports(ReservationType::WriteExclusiveRegistrantsOnly));
}

#[test]
fn nvme_without_reservations_is_a_clear_not_supported_error() {
    let mut lu = Emulator::new();
    let h = lu.add_nexus(NexusInfo::nvme_host([1; 16]));
    let lu = Arc::new(Mutex::new(lu));
    let path = Arc::new(EmulatedNvmePath::connect(&lu, h, "/dev/nvme0n1").without_reservations());
    let e = path.read_keys().unwrap_err();
    assert!(e.is_not_supported(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("Invalid Command Opcode") && text.contains("ONCS"),
        "{text}"
    );
    let a = FencePolicy::new(
        A,
        vec![path.clone() as Arc<dyn PrTransport>],
        FenceSettings::default(),
    )
    .unwrap();
    let e = a.unfence(1).unwrap_err();
    assert!(
        e.to_string()
            .contains("does not implement NVMe reservations"),
        "{e}"
    );
    assert!(path.report_capabilities().unwrap_err().is_not_supported());
}

// ---- random sequences -----------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Unfence(usize),
    Fence(usize, usize),
    Leave(usize),
    RejectAbort(usize, bool),
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0usize..3).prop_map(Step::Unfence),
        (0usize..3, 0usize..3).prop_map(|(a, b)| Step::Fence(a, b)),
        (0usize..3).prop_map(Step::Leave),
        (0usize..3, any::<bool>()).prop_map(|(a, on)| Step::RejectAbort(a, on)),
    ]
}

proptest! {
    /// Whatever happened before, a successful fence leaves the victim unable to write until
    /// it unfences again, and the fencer able to.
    #[test]
    fn a_successful_fence_always_cuts_the_victim_off(steps in proptest::collection::vec(arb_step(), 1..30)) {
        let lab = Lab::new(3);
        let keys = [A, B, C];
        let nodes: Vec<FencePolicy> = (0..3)
            .map(|i| lab.policy(keys[i], &[i], PreemptFlavour::PreemptAndAbort))
            .collect();
        for step in steps {
            match step {
                Step::Unfence(i) => { let _ = nodes[i].unfence(0); }
                Step::Leave(i) => { let _ = nodes[i].leave(); }
                Step::RejectAbort(i, on) => lab.paths[i].faults().reject_preempt_and_abort.store(on, Ordering::SeqCst),
                Step::Fence(i, v) => {
                    if let Ok(record) = nodes[i].fence(keys[v], 0) {
                        let nexus = u16::try_from(v).unwrap();
                        let me = u16::try_from(i).unwrap();
                        prop_assert!(!lab.lu().registrations().iter().any(|r| r.key == keys[v]));
                        prop_assert!(!lab.may_write(nexus), "victim can still write after {record:?}");
                        prop_assert!(lab.may_write(me), "fencer cannot write after {record:?}");
                        prop_assert!(lab.lu().reservation().is_some());
                    }
                }
            }
            lab.lu().check_invariants();
        }
    }
}
