//! The cluster's quorum lease as the data path sees it.
//!
//! A node serves its volumes' I/O — reads included — only while it holds the quorum
//! lease: a majority has answered a heartbeat this node sent less than one lease ago
//! (raft's leader-lease rule, see `cluster::detector`). A primary cut off, or stopped and
//! resumed (SIGSTOP, a VM freeze), may already have been replaced; a read it served from
//! its own copy could return data older than a write the new primary acknowledged.
//!
//! The cluster holds a [`LeaseHolder`] and moves the deadline. Each volume has a
//! [`VolumeLease`]: while its replica is primary, an application request waits at the
//! gate — like a suspended write — until the lease is renewed, and fails if the replica
//! stops being primary meanwhile (it was replaced: its copy may be old). A secondary's
//! requests pass (the replication core decides what a secondary serves). A volume run
//! without a cluster has no gate.

use std::time::Instant;
use tokio::sync::watch;

/// Until when I/O may be served: `None` is unbounded (a cluster of one).
type Deadline = Option<Instant>;

/// The cluster's end: sets the deadline.
#[derive(Debug)]
pub struct LeaseHolder {
    tx: watch::Sender<Deadline>,
}

impl LeaseHolder {
    /// A lease that has already expired (nothing is served before the first quorum).
    pub fn expired() -> Self {
        let (tx, _) = watch::channel(Some(Instant::now()));
        Self { tx }
    }

    /// The lease now runs until `until` (`None`: without end).
    pub fn set(&self, until: Option<Instant>) {
        self.tx.send_replace(until);
    }

    /// A volume's gate on this lease (the volume starts as a secondary).
    pub fn volume(&self) -> VolumeLease {
        VolumeLease {
            lease: self.tx.subscribe(),
            primary: watch::channel(false).0,
            held: watch::channel(false).0,
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotAdmitted {
    #[error("stopped being primary while waiting for the quorum lease")]
    NoLongerPrimary,
    #[error("the cluster node stopped: no quorum lease will come")]
    NodeStopped,
}

/// One volume's gate.
#[derive(Debug)]
pub struct VolumeLease {
    lease: watch::Receiver<Deadline>,
    primary: watch::Sender<bool>,
    /// New requests wait (a primary draining before it demotes).
    held: watch::Sender<bool>,
}

impl VolumeLease {
    /// The replica is (about to be) primary, or no longer is.
    pub fn set_primary(&self, primary: bool) {
        self.primary.send_replace(primary);
    }

    /// New requests wait at the gate (`true`) while the ones in flight finish, or pass
    /// again (`false`): a busy primary drains before a planned demotion, and the
    /// requests held meanwhile fail once it is secondary.
    pub fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Whether a request arriving now would be served at once.
    pub fn open(&self) -> bool {
        !*self.primary.borrow() || (!*self.held.borrow() && valid(*self.lease.borrow()))
    }

    /// Returns once a request may be served: at once on a secondary, with a valid lease
    /// on a primary.
    pub async fn admit(&self) -> Result<(), NotAdmitted> {
        let mut lease = self.lease.clone();
        let mut primary = self.primary.subscribe();
        let mut held = self.held.subscribe();
        if !*primary.borrow_and_update() {
            return Ok(());
        }
        loop {
            // Demoted while this request waited: its copy may be old, or it drained.
            if !*primary.borrow_and_update() {
                return Err(NotAdmitted::NoLongerPrimary);
            }
            if valid(*lease.borrow_and_update()) && !*held.borrow_and_update() {
                return Ok(());
            }
            tokio::select! {
                changed = lease.changed() => {
                    if changed.is_err() {
                        return Err(NotAdmitted::NodeStopped);
                    }
                }
                _ = held.changed() => {}
                changed = primary.changed() => {
                    if changed.is_err() {
                        return Err(NotAdmitted::NoLongerPrimary);
                    }
                }
            }
        }
    }
}

fn valid(deadline: Deadline) -> bool {
    deadline.is_none_or(|until| Instant::now() < until)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn later() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(60))
    }

    #[tokio::test]
    async fn a_primary_waits_for_the_lease_and_a_secondary_does_not() {
        let holder = LeaseHolder::expired();
        let gate = std::sync::Arc::new(holder.volume());
        assert!(gate.open(), "a secondary serves without a lease");
        gate.admit().await.unwrap();
        gate.set_primary(true);
        assert!(!gate.open());
        let waiting = tokio::spawn({
            let gate = std::sync::Arc::clone(&gate);
            async move { gate.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a primary served without a lease");
        holder.set(later());
        assert_eq!(waiting.await.unwrap(), Ok(()));
        holder.set(None);
        assert!(gate.open(), "a cluster of one needs nobody");
    }

    #[tokio::test]
    async fn a_request_held_by_a_replaced_primary_fails_and_a_stopped_node_ends_the_wait() {
        let holder = LeaseHolder::expired();
        let gate = std::sync::Arc::new(holder.volume());
        gate.set_primary(true);
        let waiting = tokio::spawn({
            let gate = std::sync::Arc::clone(&gate);
            async move { gate.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Demoted while the request waited: its copy may be old, the request fails.
        gate.set_primary(false);
        assert_eq!(waiting.await.unwrap(), Err(NotAdmitted::NoLongerPrimary));
        gate.set_primary(true);
        let waiting = tokio::spawn({
            let gate = std::sync::Arc::clone(&gate);
            async move { gate.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(holder);
        assert_eq!(waiting.await.unwrap(), Err(NotAdmitted::NodeStopped));
    }

    #[tokio::test]
    async fn a_draining_primary_holds_new_requests_until_it_demotes_or_goes_on() {
        let holder = LeaseHolder::expired();
        holder.set(later());
        let gate = std::sync::Arc::new(holder.volume());
        gate.set_primary(true);
        gate.hold(true);
        assert!(!gate.open());
        let admit = |gate: &std::sync::Arc<VolumeLease>| {
            let gate = std::sync::Arc::clone(gate);
            tokio::spawn(async move { gate.admit().await })
        };
        let waiting = admit(&gate);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "a draining primary took a new request"
        );
        // The demotion failed: it goes on as primary.
        gate.hold(false);
        assert_eq!(waiting.await.unwrap(), Ok(()));
        // It demoted: what waited fails.
        gate.hold(true);
        let waiting = admit(&gate);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        gate.set_primary(false);
        gate.hold(false);
        assert_eq!(waiting.await.unwrap(), Err(NotAdmitted::NoLongerPrimary));
    }
}
