//! The async client API of a node.
//!
//! ```no_run
//! # async fn demo(node: &tandem_dlm::shell::Node) -> Result<(), tandem_dlm::DlmError> {
//! use tandem_dlm::{Flags, Mode};
//! let mut client = node.client();
//! let mut callbacks = client.blocking_callbacks().expect("taken once");
//! let lock = client.lock("volumes", b"vol0", Mode::EX, Flags::NONE).await?;
//! // ... exclusive work; `callbacks.recv()` says when someone else waits ...
//! client.unlock(lock.lock, None)?;
//! # Ok(()) }
//! ```
//!
//! Dropping the client releases all its locks (orphan cleanup); dropping a pending
//! `lock()` future cancels the request (and releases the lock if it was granted anyway).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::core::{Completion, Event};
use crate::error::DlmError;
use crate::mode::Mode;
use crate::types::{ClientId, Flags, LockId, Lvb, LvbCopy, ResourceKey, Status};

use super::node::{Outcome, Shared};

/// A blocking callback: the lock blocks a request for `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockingNotice {
    /// The lock.
    pub lock: LockId,
    /// The mode another client waits for.
    pub mode: Mode,
}

/// A granted request.
#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    /// The lock.
    pub lock: LockId,
    /// Its mode.
    pub mode: Mode,
    /// The value block (VALBLK requests).
    pub lvb: Option<LvbCopy>,
    /// CONVDEADLK demoted the lock to NL while the conversion waited.
    pub demoted: bool,
}

/// A client of a [`super::Node`].
#[derive(Debug)]
pub struct LockClient {
    shared: Arc<Shared>,
    id: ClientId,
    basts: Option<mpsc::UnboundedReceiver<BlockingNotice>>,
}

/// Cancels a request whose future was dropped before it completed.
struct Waiting<'a> {
    client: &'a LockClient,
    lock: LockId,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut core = self.client.shared.lock_core();
        if let Some(sink) = core.clients.get_mut(&self.client.id) {
            sink.waiters.remove(&self.lock);
            sink.abandoned.insert(self.lock);
        }
        let event = Event::Cancel {
            client: self.client.id,
            lock: self.lock,
        };
        core.step(&self.client.shared, event);
    }
}

fn granted(op: &'static str, resource: &str, outcome: Outcome) -> Result<Granted, DlmError> {
    match outcome {
        Ok(Completion {
            status: Status::Granted,
            lock,
            mode: Some(mode),
            lvb,
            demoted,
            ..
        }) => Ok(Granted {
            lock,
            mode,
            lvb,
            demoted,
        }),
        Ok(c) => Err(DlmError::Request {
            op,
            resource: resource.to_owned(),
            status: c.status,
        }),
        Err(status) => Err(DlmError::Request {
            op,
            resource: resource.to_owned(),
            status,
        }),
    }
}

impl LockClient {
    pub(crate) fn new(shared: Arc<Shared>) -> LockClient {
        let (id, rx) = shared.lock_core().new_client();
        LockClient {
            shared,
            id,
            basts: Some(rx),
        }
    }

    /// This client's id on its node.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Whether this node has quorum (the cluster layer's verdict; true for a node that is
    /// not told otherwise). When it turns false every lock of this client is in doubt:
    /// stop the work it protects.
    pub fn quorum(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.quorate.subscribe()
    }

    /// The stream of blocking callbacks (can be taken once).
    pub fn blocking_callbacks(&mut self) -> Option<mpsc::UnboundedReceiver<BlockingNotice>> {
        self.basts.take()
    }

    /// Submits an event about `lock`; the outcome now, or a receiver for it later.
    fn submit(
        &self,
        event: Event,
        lock: LockId,
        wait: bool,
    ) -> Result<Outcome, oneshot::Receiver<Outcome>> {
        let mut core = self.shared.lock_core();
        if let Some(outcome) = core.step_for(&self.shared, event, self.id, lock) {
            return Ok(outcome);
        }
        let (tx, rx) = oneshot::channel();
        if wait && let Some(sink) = core.clients.get_mut(&self.id) {
            sink.waiters.insert(lock, tx);
        }
        Err(rx)
    }

    async fn wait(&self, event: Event, lock: LockId) -> Outcome {
        match self.submit(event, lock, true) {
            Ok(outcome) => outcome,
            Err(rx) => {
                let mut guard = Waiting {
                    client: self,
                    lock,
                    armed: true,
                };
                let outcome = rx.await.unwrap_or(Err(Status::Evicted));
                guard.armed = false;
                outcome
            }
        }
    }

    /// Requests a new lock and waits for it. NOQUEUE requests fail with would-block
    /// instead of waiting.
    pub async fn lock(
        &self,
        lockspace: &str,
        name: &[u8],
        mode: Mode,
        flags: Flags,
    ) -> Result<Granted, DlmError> {
        let resource = ResourceKey::new(lockspace, name)?;
        let lock = self.shared.lock_core().dlm.allocate_lock_id();
        let label = resource.to_string();
        let event = Event::Lock {
            client: self.id,
            lock,
            resource,
            mode,
            flags,
        };
        granted("lock", &label, self.wait(event, lock).await)
    }

    /// Converts a granted lock and waits for the conversion. `lvb` is written when the
    /// conversion goes down from PW or EX with VALBLK.
    pub async fn convert(
        &self,
        lock: LockId,
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
    ) -> Result<Granted, DlmError> {
        let event = Event::Convert {
            client: self.id,
            lock,
            mode,
            flags,
            lvb,
        };
        granted(
            "convert",
            &format!("lock {lock}"),
            self.wait(event, lock).await,
        )
    }

    /// Releases a granted lock: the release counts from now (requests made after it
    /// by this node are ordered after it at the master).
    pub fn unlock(&self, lock: LockId, lvb: Option<Lvb>) -> Result<(), DlmError> {
        let event = Event::Unlock {
            client: self.id,
            lock,
            lvb,
        };
        match self.submit(event, lock, false) {
            Ok(Err(status)) => Err(DlmError::Request {
                op: "unlock",
                resource: format!("lock {lock}"),
                status,
            }),
            _ => Ok(()),
        }
    }

    /// Releases a granted lock and returns its completion. The release needs no
    /// answer from a remote master (it is applied in order there), so this completes
    /// at once; it reports refusals (busy, unknown lock) like [`LockClient::unlock`].
    pub async fn unlock_wait(&self, lock: LockId, lvb: Option<Lvb>) -> Result<(), DlmError> {
        let event = Event::Unlock {
            client: self.id,
            lock,
            lvb,
        };
        match self.wait(event, lock).await {
            Ok(Completion {
                status: Status::Unlocked,
                ..
            }) => Ok(()),
            Ok(c) => Err(DlmError::Request {
                op: "unlock",
                resource: format!("lock {lock}"),
                status: c.status,
            }),
            Err(status) => Err(DlmError::Request {
                op: "unlock",
                resource: format!("lock {lock}"),
                status,
            }),
        }
    }

    /// Cancels a waiting request or conversion (its own call then ends with canceled,
    /// or with granted if the cancel came too late).
    pub fn cancel(&self, lock: LockId) {
        let event = Event::Cancel {
            client: self.id,
            lock,
        };
        self.shared.step(event);
    }

    /// Starts a request and returns a receiver for its outcome (for callers that
    /// multiplex many requests, like the socket server).
    pub(crate) fn start(&self, event: Event, lock: LockId) -> oneshot::Receiver<Outcome> {
        match self.submit(event, lock, true) {
            Ok(outcome) => {
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(outcome);
                rx
            }
            Err(rx) => rx,
        }
    }

    pub(crate) fn allocate(&self) -> LockId {
        self.shared.lock_core().dlm.allocate_lock_id()
    }
}

impl Drop for LockClient {
    fn drop(&mut self) {
        let mut core = self.shared.lock_core();
        core.clients.remove(&self.id);
        let event = Event::ClientGone { client: self.id };
        core.step(&self.shared, event);
    }
}
