//! tandem-fence through its public API, the way the daemon and the cluster simulation use
//! it: keys per node incarnation, unfence/fence/verify on emulated paths, fencing records in
//! a log, the self-check on a virtual clock, and errors classified by predicates.

use std::sync::{Arc, Mutex};
use tandem_fence::emulator::{Access, Emulator, NexusId, NexusInfo};
use tandem_fence::pr::ReservationType;
use tandem_fence::transport::{EmulatedPath, OpenOptions, PrTransport, open};
use tandem_fence::{
    FenceError, FenceMethod, FencePolicy, FenceRecord, FenceSettings, PrKey, PreemptFlavour,
    SelfCheck, SelfCheckEvent,
};

const CLUSTER: &str = "prod-7f3a";

/// One shared LU, one nexus per node.
fn shared_lu(nodes: u16) -> (Arc<Mutex<Emulator>>, Vec<Arc<dyn PrTransport>>) {
    let mut lu = Emulator::new();
    let nexuses: Vec<NexusId> = (0..nodes)
        .map(|i| lu.add_nexus(NexusInfo::sas(0x5001_4050_0000_0100 + u64::from(i), i + 1)))
        .collect();
    let lu = Arc::new(Mutex::new(lu));
    let paths = nexuses
        .iter()
        .map(|&n| {
            Arc::new(EmulatedPath::connect(&lu, n, &format!("node{}", n.0))) as Arc<dyn PrTransport>
        })
        .collect();
    (lu, paths)
}

fn policy(key: PrKey, path: &Arc<dyn PrTransport>) -> FencePolicy {
    FencePolicy::new(key, vec![Arc::clone(path)], FenceSettings::default())
        .expect("a nonzero key and one path make a policy")
}

#[test]
fn a_failover_with_a_zombie_coming_back() {
    let (lu, paths) = shared_lu(2);
    let a1 = PrKey::derive(CLUSTER, 1, 1);
    let b1 = PrKey::derive(CLUSTER, 2, 1);
    let node_a = policy(a1, &paths[0]);
    let node_b = policy(b1, &paths[1]);

    let joined = node_a.unfence(1_000).unwrap();
    assert!(
        joined.reserved,
        "the first node creates the WERO reservation"
    );
    node_b.unfence(1_001).unwrap();
    assert!(lu.lock().unwrap().may_access(NexusId(0), Access::Write));

    // Node A stops answering; the cluster decides to fence it and logs the record.
    let record = node_b.fence(a1, 5_000).unwrap();
    assert_eq!(record.whom.node_id, 1);
    assert_eq!(record.whom.incarnation, 1);
    assert!(PrKey::new(record.key.get()).is_of_cluster(CLUSTER));
    let log_line = serde_json::to_string(&record).unwrap();
    let back: FenceRecord = serde_json::from_str(&log_line).unwrap();
    assert_eq!(back, record, "records survive the cluster log");
    assert!(!lu.lock().unwrap().may_access(NexusId(0), Access::Write));

    // The old incarnation is a zombie: it cannot fence its way back...
    let err = node_a.fence(b1, 6_000).unwrap_err();
    assert!(matches!(err, FenceError::NotRegistered { .. }), "{err}");
    // ...and its writes conflict, which is what tells it to stop.
    let write = lu.lock().unwrap().data_command(NexusId(0), Access::Write);
    assert!(write.is_err());

    // After a membership restart node A joins with a new incarnation: a new key.
    let a2 = PrKey::derive(CLUSTER, 1, 2);
    assert_ne!(a2, a1);
    let node_a2 = policy(a2, &paths[0]);
    let rejoined = node_a2.unfence(7_000).unwrap();
    assert!(!rejoined.reserved, "node B holds the reservation now");
    assert!(node_a2.verify().unwrap().is_ok());
    let keys = node_b.read_keys().unwrap();
    assert!(keys.contains(a2) && !keys.contains(a1), "{keys:?}");
}

#[test]
fn the_self_check_on_a_virtual_clock() {
    let (_lu, paths) = shared_lu(2);
    let a = PrKey::derive(CLUSTER, 1, 1);
    let b = PrKey::derive(CLUSTER, 2, 1);
    let node_a = policy(a, &paths[0]);
    let node_b = policy(b, &paths[1]);
    node_a.unfence(0).unwrap();
    node_b.unfence(0).unwrap();

    let period = 250;
    let mut check = SelfCheck::new(a, period, 0);
    let mut now = 0u64;
    let mut fenced_at = None;
    let mut lost = None;
    while now < 5_000 && lost.is_none() {
        if now == 1_337 {
            node_b.fence(a, now).unwrap();
            fenced_at = Some(now);
        }
        if now >= check.next_due_ms() {
            let keys = node_a.read_keys();
            if let Some(SelfCheckEvent::KeyLost { time_ms, .. }) = check.observe(now, keys.as_ref())
            {
                lost = Some(time_ms);
            }
        }
        now += 1;
    }
    let (fenced, lost) = (fenced_at.unwrap(), lost.expect("the loss was never seen"));
    assert!(
        lost >= fenced && lost - fenced <= period,
        "fenced {fenced}, seen {lost}"
    );
}

#[test]
fn preempt_flavours_and_settings_are_honoured() {
    let (lu, paths) = shared_lu(3);
    let keys = [PrKey::new(0xa), PrKey::new(0xb), PrKey::new(0xc)];
    let settings = FenceSettings {
        reservation_type: ReservationType::ExclusiveAccessRegistrantsOnly,
        preempt: PreemptFlavour::Preempt,
        aptpl: true,
        retries: 3,
    };
    let nodes: Vec<FencePolicy> = (0..3)
        .map(|i| FencePolicy::new(keys[i], vec![Arc::clone(&paths[i])], settings.clone()).unwrap())
        .collect();
    for n in &nodes {
        n.unfence(0).unwrap();
    }
    {
        let lu = lu.lock().unwrap();
        assert_eq!(
            lu.reservation().unwrap().reservation_type,
            ReservationType::ExclusiveAccessRegistrantsOnly
        );
        assert!(lu.aptpl_active());
    }
    let record = nodes[2].fence(keys[0], 1).unwrap();
    assert_eq!(record.method, FenceMethod::Preempt);
    assert_eq!(record.reservation.unwrap().type_code, 6);
    // EARO: the fenced node may not even read; the others may.
    let lu = lu.lock().unwrap();
    assert!(!lu.may_access(NexusId(0), Access::Read));
    assert!(lu.may_access(NexusId(1), Access::Read));
}

#[test]
fn device_errors_are_classified() {
    let e = open("/dev/null", &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, FenceError::WrongDeviceType { .. }), "{e}");
    assert!(!e.is_retryable() && !e.is_reservation_conflict());

    let (_lu, paths) = shared_lu(2);
    let a = policy(PrKey::new(1), &paths[0]);
    let b = policy(PrKey::new(2), &paths[1]);
    let not_registered = paths[1]
        .pr_out(&tandem_fence::pr::PrOutCommand::reserve(
            PrKey::new(2),
            ReservationType::WriteExclusive,
        ))
        .unwrap_err();
    assert_eq!(
        not_registered.kind(),
        tandem_fence::ErrorKind::NotReady,
        "LIO answers NOT READY to an unregistered nexus: {not_registered}"
    );
    a.unfence(0).unwrap();
    b.unfence(0).unwrap();
    let conflict = paths[1]
        .pr_out(&tandem_fence::pr::PrOutCommand::reserve(
            PrKey::new(2),
            ReservationType::WriteExclusiveRegistrantsOnly,
        ))
        .unwrap_err();
    assert!(conflict.is_reservation_conflict(), "{conflict}");
}
