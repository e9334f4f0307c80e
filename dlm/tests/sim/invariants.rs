//! Invariants checked after every step, and at the end of a run.

use std::collections::BTreeMap as HashMap;

use tandem_dlm::core::NodeState;
use tandem_dlm::{Flags, Mode, ResourceKey};

use crate::world::World;

/// After every step:
/// 1. each live node's core passes `check_invariants`;
/// 2. across all live nodes (evicted ones too, until they are fenced), the modes clients
///    rely on are pairwise compatible on every resource;
/// 3. each client's view of a lock matches its node's copy;
/// 4. at most one running member masters a resource;
/// 5. a holder of CW/PR/PW/EX with a valid value block has the master's current value.
pub fn check(w: &mut World) -> Result<(), String> {
    let mut held: HashMap<ResourceKey, Vec<(u32, u64, Mode)>> = HashMap::new();
    for node in w.nodes.iter().filter(|n| n.alive) {
        node.dlm.check_invariants()?;
        for client in &node.clients {
            for (id, lock) in &client.locks {
                if let Some(m) = lock.effective() {
                    held.entry(lock.resource.clone())
                        .or_default()
                        .push((node.id.0, client.id, m));
                }
                if node.dlm.state() != NodeState::Evicted {
                    let own = node.dlm.own_lock(*id).ok_or_else(|| {
                        format!("node {} lost lock {id} of client {}", node.id, client.id)
                    })?;
                    if own.effective_mode() != lock.effective() {
                        return Err(format!(
                            "node {} lock {id}: core says {:?}, client relies on {:?}",
                            node.id,
                            own.effective_mode(),
                            lock.effective()
                        ));
                    }
                }
            }
        }
    }
    for (resource, holders) in &held {
        for (i, a) in holders.iter().enumerate() {
            for b in &holders[i + 1..] {
                if !a.2.is_compatible(b.2) {
                    return Err(format!(
                        "INCOMPATIBLE GRANTS on {resource}: node {} client {} holds {}, node {} client {} holds {}",
                        a.0, a.1, a.2, b.0, b.1, b.2
                    ));
                }
            }
        }
    }
    // Unique master among running members, and value block freshness.
    let mut masters: HashMap<ResourceKey, u32> = HashMap::new();
    for node in w
        .nodes
        .iter()
        .filter(|n| n.alive && n.dlm.state() == NodeState::Running)
    {
        if !w.is_member(node) && node.dlm.epoch() < w.latest_epoch() {
            // Removed, has not heard yet: its view is stale by design (it is fenced
            // before anybody else acts).
            continue;
        }
        for (key, _) in node.dlm.mastered() {
            if let Some(other) = masters.insert(key.clone(), node.id.0) {
                return Err(format!(
                    "{key} mastered by both node {other} and node {}",
                    node.id
                ));
            }
        }
    }
    let mut checks = 0;
    for (key, master) in &masters {
        let m = &w.nodes[usize::try_from(master - 1).unwrap()];
        let Some((_, res)) = m.dlm.mastered().find(|(k, _)| *k == key) else {
            continue;
        };
        let lvb = res.lvb();
        if !lvb.valid {
            continue;
        }
        for node in w
            .nodes
            .iter()
            .filter(|n| n.alive && n.dlm.state() == NodeState::Running)
        {
            for (id, own) in node.dlm.own_locks() {
                if own.resource != *key || own.pending.is_some() || own.orphan {
                    continue;
                }
                let (Some(g), Some(copy)) = (own.grmode, own.lvb) else {
                    continue;
                };
                if g >= Mode::CW && own.flags.contains(Flags::VALBLK) && copy.valid {
                    checks += 1;
                    if copy.value != lvb.value {
                        return Err(format!(
                            "value block of {key}: node {} lock {id} ({g}) holds {:?} seq {}, master {master} has {:?} seq {}",
                            node.id, copy.value, copy.seq, lvb.value, lvb.seq
                        ));
                    }
                }
            }
        }
    }
    w.totals.lvb_checks += checks;
    Ok(())
}

/// After the faults stopped and the clients drained: every node runs in the last epoch,
/// every request ended, nothing is left locked.
pub fn check_end(w: &World) -> Result<(), String> {
    if w.pending_faults() {
        return Err("a node is still down at the end".into());
    }
    for node in &w.nodes {
        if !node.alive {
            return Err(format!("node {} is not running at the end", node.id));
        }
        if node.dlm.state() != NodeState::Running || node.dlm.epoch() != w.latest_epoch() {
            return Err(format!(
                "node {} is {:?} in epoch {} at the end (latest {}); unfenced {:?}",
                node.id,
                node.dlm.state(),
                node.dlm.epoch(),
                w.latest_epoch(),
                node.dlm.unfenced()
            ));
        }
        for client in &node.clients {
            if let Some((id, lock)) = client.locks.iter().next() {
                return Err(format!(
                    "node {} client {} still has lock {id} at the end: {lock:?}",
                    node.id, client.id
                ));
            }
        }
        if !node.dlm.is_quiet() {
            let locks: Vec<_> = node.dlm.own_locks().collect();
            let mastered: Vec<_> = node
                .dlm
                .mastered()
                .filter(|(_, r)| !r.is_empty())
                .map(|(k, r)| {
                    (
                        k.clone(),
                        r.locks().map(|(q, l)| (q, l.clone())).collect::<Vec<_>>(),
                    )
                })
                .collect();
            return Err(format!(
                "node {} is not quiet at the end: own {locks:?}, mastered {mastered:?}",
                node.id
            ));
        }
    }
    Ok(())
}
