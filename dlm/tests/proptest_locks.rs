//! Property tests: random lock sequences never produce an incompatible grant.
//!
//! 1. One resource on its master (`Resource`): random requests, conversions (all
//!    flags), unlocks, cancels and purges from several owners; after every operation the
//!    granted modes are pairwise compatible and every lock is on exactly one queue.
//! 2. One node (`Dlm`) with several clients and resources: random client operations;
//!    after every step the modes the clients may rely on are pairwise compatible, and
//!    when everything is released every request has ended.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use tandem_dlm::core::Config;
use tandem_dlm::resource::{Outcome, Resource};
use tandem_dlm::{
    Action, ClientId, Dlm, Epoch, Event, Flags, Incarnation, LockId, Lvb, Mode, NodeId,
    ResourceKey, Status,
};

fn mode(i: u8) -> Mode {
    Mode::from_u8(i % 6).unwrap()
}

#[derive(Debug, Clone)]
enum ROp {
    Request(u8, u8, u8),
    Convert(u8, u8, u8),
    Unlock(u8),
    Cancel(u8),
    Purge(u8),
}

fn rop() -> impl Strategy<Value = ROp> {
    prop_oneof![
        (0u8..6, 0u8..6, 0u8..32).prop_map(|(o, m, f)| ROp::Request(o, m, f)),
        (0u8..6, 0u8..6, 0u8..32).prop_map(|(o, m, f)| ROp::Convert(o, m, f)),
        (0u8..6).prop_map(ROp::Unlock),
        (0u8..6).prop_map(ROp::Cancel),
        (0u8..6).prop_map(ROp::Purge),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn resource_never_grants_incompatible_modes(ops in proptest::collection::vec(rop(), 1..120)) {
        let mut res = Resource::new();
        let mut out: Vec<Outcome> = Vec::new();
        for op in ops {
            out.clear();
            match op {
                ROp::Request(o, m, f) => {
                    let flags = Flags(u32::from(f)).without(Flags::CONVERT).without(Flags::QUECVT);
                    res.request(NodeId(u32::from(o)), LockId(u64::from(o)), mode(m), flags, &mut out);
                }
                ROp::Convert(o, m, f) => {
                    res.convert(NodeId(u32::from(o)), LockId(u64::from(o)), mode(m), Flags(u32::from(f)), Some(Lvb([o; 32])), &mut out);
                }
                ROp::Unlock(o) => res.unlock(NodeId(u32::from(o)), LockId(u64::from(o)), Some(Lvb([o; 32])), &mut out),
                ROp::Cancel(o) => res.cancel(NodeId(u32::from(o)), LockId(u64::from(o)), &mut out),
                ROp::Purge(o) => {
                    res.purge(|n| n == NodeId(u32::from(o)));
                    res.grant_pending(&mut out);
                    res.send_basts(&mut out);
                }
            }
            prop_assert!(res.check().is_ok(), "{:?}", res.check());
            // Every grant names the mode the lock now has on the grant queue.
            for o in &out {
                if let Outcome::Granted { owner, id, mode, .. } = o {
                    let now = res.locks().find(|(_, l)| l.owner == *owner && l.id == *id).map(|(_, l)| l.grmode);
                    prop_assert_eq!(now, Some(Some(*mode)));
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum COp {
    Lock(u8, u8, u8, bool),
    Convert(u8, u8, u8),
    Unlock(u8),
    Cancel(u8),
    Gone(u8),
}

fn cop() -> impl Strategy<Value = COp> {
    prop_oneof![
        (0u8..4, 0u8..3, 0u8..6, any::<bool>()).prop_map(|(c, r, m, nq)| COp::Lock(c, r, m, nq)),
        (0u8..16, 0u8..6, 0u8..32).prop_map(|(l, m, f)| COp::Convert(l, m, f)),
        (0u8..16).prop_map(COp::Unlock),
        (0u8..16).prop_map(COp::Cancel),
        (0u8..4).prop_map(COp::Gone),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn node_never_lets_clients_rely_on_incompatible_modes(ops in proptest::collection::vec(cop(), 1..150)) {
        let mut d = Dlm::new(NodeId(1), Incarnation(1), Config::default());
        let members: BTreeMap<NodeId, Incarnation> = [(NodeId(1), Incarnation(1))].into();
        d.step(Event::Membership { epoch: Epoch(1), members });
        let keys: Vec<ResourceKey> = (0..3).map(|i| ResourceKey::new("p", format!("r{i}").as_bytes()).unwrap()).collect();
        let mut ids: Vec<(ClientId, LockId)> = Vec::new();
        let mut gone: Vec<ClientId> = Vec::new();
        let mut outstanding: HashMap<LockId, u32> = HashMap::new();
        for op in ops {
            let actions = match op {
                COp::Lock(c, r, m, nq) => {
                    let client = ClientId(u64::from(c));
                    if gone.contains(&client) { continue; }
                    let lock = d.allocate_lock_id();
                    ids.push((client, lock));
                    *outstanding.entry(lock).or_default() += 1;
                    let flags = if nq { Flags::NOQUEUE } else { Flags::NONE };
                    d.step(Event::Lock { client, lock, resource: keys[usize::from(r)].clone(), mode: mode(m), flags })
                }
                COp::Convert(l, m, f) => {
                    let Some(&(client, lock)) = ids.get(usize::from(l)) else { continue };
                    *outstanding.entry(lock).or_default() += 1;
                    d.step(Event::Convert { client, lock, mode: mode(m), flags: Flags(u32::from(f)), lvb: None })
                }
                COp::Unlock(l) => {
                    let Some(&(client, lock)) = ids.get(usize::from(l)) else { continue };
                    *outstanding.entry(lock).or_default() += 1;
                    d.step(Event::Unlock { client, lock, lvb: None })
                }
                COp::Cancel(l) => {
                    let Some(&(client, lock)) = ids.get(usize::from(l)) else { continue };
                    d.step(Event::Cancel { client, lock })
                }
                COp::Gone(c) => {
                    let client = ClientId(u64::from(c));
                    gone.push(client);
                    for (cl, lock) in &ids {
                        if *cl == client { outstanding.remove(lock); }
                    }
                    d.step(Event::ClientGone { client })
                }
            };
            for a in &actions {
                match a {
                    Action::Complete(c) => {
                        prop_assert!(!gone.contains(&c.client), "callback to a gone client: {c:?}");
                        let n = outstanding.get_mut(&c.lock);
                        prop_assert!(n.as_ref().is_some_and(|n| **n > 0), "unexpected completion {c:?}");
                        if let Some(n) = n { *n -= 1; }
                    }
                    Action::Refused { lock, status, .. } => {
                        prop_assert!(matches!(status, Status::Invalid | Status::Busy));
                        if let Some(n) = outstanding.get_mut(lock) { *n = n.saturating_sub(1); }
                    }
                    Action::Blocking { client, .. } => prop_assert!(!gone.contains(client)),
                    Action::Send { .. } => prop_assert!(false, "a single node sent a message"),
                }
            }
            prop_assert!(d.check_invariants().is_ok(), "{:?}", d.check_invariants());
            let mut relied: HashMap<ResourceKey, Vec<Mode>> = HashMap::new();
            for (_, l) in d.own_locks() {
                if let (false, Some(m)) = (l.orphan, l.effective_mode()) {
                    relied.entry(l.resource.clone()).or_default().push(m);
                }
            }
            for modes in relied.values() {
                for (i, a) in modes.iter().enumerate() {
                    for b in &modes[i + 1..] {
                        prop_assert!(a.is_compatible(*b), "{a} and {b} relied on together");
                    }
                }
            }
        }
        // Release everything: all requests end.
        for client in 0..4 {
            d.step(Event::ClientGone { client: ClientId(client) });
        }
        prop_assert!(d.is_quiet(), "locks left: {:?}", d.own_locks().collect::<Vec<_>>());
    }
}
