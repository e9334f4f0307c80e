//! Storage of the cluster log and its state machine.
//!
//! The log is small (membership changes, promotions, fencings), so it is kept in memory
//! and mirrored on disk as JSON lines: appends are fsync'd before openraft is told they are
//! durable; truncation and purging rewrite the file atomically (write, fsync, rename). A
//! torn last line from a crash mid-append is dropped on open; damage anywhere else is an
//! error, never silently skipped. The vote and the committed index live in their own
//! files. Snapshots of [`ClusterState`] are written to disk so purged entries are not lost.

use super::TypeConfig;
use crate::cluster::state::{ClusterState, Outcome};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{broadcast, watch};

type NodeIdT = u64;
type StorageResult<T> = Result<T, StorageError<NodeIdT>>;

fn io_error(
    subject: ErrorSubject<NodeIdT>,
    verb: ErrorVerb,
    e: std::io::Error,
) -> StorageError<NodeIdT> {
    StorageError::from_io_error(subject, verb, e)
}

/// Writes `bytes` to `path` atomically and durably.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LogMeta {
    last_purged: Option<LogId<NodeIdT>>,
}

#[derive(Debug, Default)]
struct LogInner {
    dir: Option<PathBuf>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeIdT>>,
    vote: Option<Vote<NodeIdT>>,
    committed: Option<LogId<NodeIdT>>,
    /// Open append handle of `log.jsonl`.
    file: Option<std::fs::File>,
}

impl LogInner {
    fn log_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("log.jsonl"))
    }

    /// Rewrites the log file from memory (after truncate or purge).
    fn rewrite(&mut self) -> std::io::Result<()> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let mut text = Vec::new();
        for entry in self.entries.values() {
            serde_json::to_writer(&mut text, entry).map_err(std::io::Error::other)?;
            text.push(b'\n');
        }
        self.file = None;
        write_atomic(&dir.join("log.jsonl"), &text)?;
        let meta = LogMeta {
            last_purged: self.last_purged,
        };
        write_atomic(
            &dir.join("log-meta.json"),
            &serde_json::to_vec(&meta).map_err(std::io::Error::other)?,
        )?;
        Ok(())
    }

    fn append_file(&mut self) -> std::io::Result<Option<&mut std::fs::File>> {
        if self.file.is_none() {
            let Some(path) = self.log_path() else {
                return Ok(None);
            };
            self.file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            );
        }
        Ok(self.file.as_mut())
    }
}

/// The cluster log (entries and vote), shared by openraft's writer and readers.
#[derive(Debug, Clone, Default)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl LogStore {
    /// An in-memory log (tests).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let meta: LogMeta = read_json(&dir.join("log-meta.json"))?.unwrap_or_default();
        let mut entries = BTreeMap::new();
        let log_path = dir.join("log.jsonl");
        if let Ok(text) = std::fs::read(&log_path) {
            let lines: Vec<&[u8]> = text
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            let count = lines.len();
            let mut torn_tail = false;
            for (i, line) in lines.into_iter().enumerate() {
                match serde_json::from_slice::<Entry<TypeConfig>>(line) {
                    Ok(entry) => {
                        entries.insert(entry.log_id.index, entry);
                    }
                    // A crash mid-append leaves a partial last line: it was never reported
                    // durable, so dropping it loses nothing.
                    Err(_) if i + 1 == count && !text.ends_with(b"\n") => torn_tail = true,
                    Err(e) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{} line {}: {e}", log_path.display(), i + 1),
                        ));
                    }
                }
            }
            if torn_tail {
                tracing::warn!(path = %log_path.display(), "dropping a torn last log line");
            }
        }
        let inner = LogInner {
            dir: Some(dir.to_path_buf()),
            entries,
            last_purged: meta.last_purged,
            vote: read_json(&dir.join("vote.json"))?,
            committed: read_json(&dir.join("committed.json"))?,
            file: None,
        };
        let store = Self {
            inner: Arc::new(Mutex::new(inner)),
        };
        // Normalise the file (drops a torn tail) before appending to it.
        store.lock().rewrite()?;
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        Ok(self
            .lock()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let inner = self.lock();
        let last = inner.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last.or(inner.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeIdT>) -> StorageResult<()> {
        let mut inner = self.lock();
        if let Some(dir) = &inner.dir {
            let bytes = serde_json::to_vec(vote).map_err(|e| {
                io_error(
                    ErrorSubject::Vote,
                    ErrorVerb::Write,
                    std::io::Error::other(e),
                )
            })?;
            write_atomic(&dir.join("vote.json"), &bytes)
                .map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        }
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeIdT>>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeIdT>>) -> StorageResult<()> {
        let mut inner = self.lock();
        if let Some(dir) = &inner.dir {
            // Not fsync'd: a lost committed index is re-learned from the leader.
            let bytes = serde_json::to_vec(&committed).map_err(|e| {
                io_error(
                    ErrorSubject::Store,
                    ErrorVerb::Write,
                    std::io::Error::other(e),
                )
            })?;
            std::fs::write(dir.join("committed.json"), bytes)
                .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        }
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeIdT>>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut text = Vec::new();
        let mut appended = Vec::new();
        for entry in entries {
            if inner.dir.is_some() {
                serde_json::to_writer(&mut text, &entry).map_err(|e| {
                    io_error(
                        ErrorSubject::Logs,
                        ErrorVerb::Write,
                        std::io::Error::other(e),
                    )
                })?;
                text.push(b'\n');
            }
            appended.push(entry);
        }
        let result = (|| -> std::io::Result<()> {
            if let Some(file) = inner.append_file()? {
                file.write_all(&text)?;
                file.sync_data()?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                for entry in appended {
                    inner.entries.insert(entry.log_id.index, entry);
                }
                drop(inner);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let kind = e.kind();
                let message = e.to_string();
                drop(inner);
                callback.log_io_completed(Err(std::io::Error::new(kind, message)));
                Err(io_error(ErrorSubject::Logs, ErrorVerb::Write, e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeIdT>) -> StorageResult<()> {
        let mut inner = self.lock();
        let doomed: Vec<u64> = inner
            .entries
            .range(log_id.index..)
            .map(|(k, _)| *k)
            .collect();
        for index in doomed {
            inner.entries.remove(&index);
        }
        inner
            .rewrite()
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeIdT>) -> StorageResult<()> {
        let mut inner = self.lock();
        let doomed: Vec<u64> = inner
            .entries
            .range(..=log_id.index)
            .map(|(k, _)| *k)
            .collect();
        for index in doomed {
            inner.entries.remove(&index);
        }
        inner.last_purged = Some(log_id);
        inner
            .rewrite()
            .map_err(|e| io_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

/// A snapshot as stored on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeIdT, openraft::BasicNode>,
    data: Vec<u8>,
}

/// What a snapshot holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotContent {
    last_applied: Option<LogId<NodeIdT>>,
    membership: StoredMembership<NodeIdT, openraft::BasicNode>,
    state: ClusterState,
}

#[derive(Debug)]
struct MachineInner {
    dir: Option<PathBuf>,
    last_applied: Option<LogId<NodeIdT>>,
    membership: StoredMembership<NodeIdT, openraft::BasicNode>,
    state: ClusterState,
    snapshot: Option<StoredSnapshot>,
    snapshots_built: u64,
    publish: watch::Sender<Arc<ClusterState>>,
    applied: broadcast::Sender<AppliedEntry>,
}

/// A command as applied, with its outcome, for the event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedEntry {
    pub index: u64,
    pub proposal: super::Proposal,
    pub outcome: Outcome,
}

impl MachineInner {
    /// Makes `stored` the current snapshot, on disk first (atomically) when persistent.
    // openraft's traits dictate the (large) error type.
    #[allow(clippy::result_large_err)]
    fn keep_snapshot(&mut self, stored: StoredSnapshot) -> StorageResult<()> {
        if let Some(dir) = &self.dir {
            let bytes = serde_json::to_vec(&stored).map_err(|e| {
                io_error(
                    ErrorSubject::StateMachine,
                    ErrorVerb::Write,
                    std::io::Error::other(e),
                )
            })?;
            write_atomic(&dir.join("snapshot.json"), &bytes)
                .map_err(|e| io_error(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        }
        self.snapshot = Some(stored);
        Ok(())
    }
}

/// The state machine: applies committed proposals to [`ClusterState`] and publishes every
/// new state on a watch channel the node's shell follows.
#[derive(Debug, Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<MachineInner>>,
}

impl StateMachine {
    /// A state machine persisting snapshots in `dir` (None: memory only), restored from the
    /// last snapshot there.
    pub fn open(dir: Option<&Path>) -> std::io::Result<(Self, watch::Receiver<Arc<ClusterState>>)> {
        let snapshot: Option<StoredSnapshot> = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                read_json(&d.join("snapshot.json"))?
            }
            None => None,
        };
        let content: Option<SnapshotContent> = snapshot
            .as_ref()
            .map(|s| serde_json::from_slice(&s.data))
            .transpose()
            .map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("snapshot: {e}"))
            })?;
        let (last_applied, membership, state) = match content {
            Some(c) => (c.last_applied, c.membership, c.state),
            None => (None, StoredMembership::default(), ClusterState::default()),
        };
        let (publish, receiver) = watch::channel(Arc::new(state.clone()));
        let (applied, _) = broadcast::channel(1024);
        let machine = Self {
            inner: Arc::new(Mutex::new(MachineInner {
                dir: dir.map(Path::to_path_buf),
                last_applied,
                membership,
                state,
                snapshot,
                snapshots_built: 0,
                publish,
                applied,
            })),
        };
        Ok((machine, receiver))
    }

    fn lock(&self) -> MutexGuard<'_, MachineInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> ClusterState {
        self.lock().state.clone()
    }

    /// Every command applied from now on, with its outcome.
    pub fn subscribe(&self) -> broadcast::Receiver<AppliedEntry> {
        self.lock().applied.subscribe()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let mut inner = self.lock();
        let content = SnapshotContent {
            last_applied: inner.last_applied,
            membership: inner.membership.clone(),
            state: inner.state.clone(),
        };
        let data = serde_json::to_vec(&content).map_err(|e| {
            io_error(
                ErrorSubject::StateMachine,
                ErrorVerb::Read,
                std::io::Error::other(e),
            )
        })?;
        inner.snapshots_built += 1;
        let snapshot_id = format!(
            "{}-{}",
            inner.last_applied.map_or(0, |l| l.index),
            inner.snapshots_built
        );
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        inner.keep_snapshot(stored)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<NodeIdT>>,
        StoredMembership<NodeIdT, openraft::BasicNode>,
    )> {
        let inner = self.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut outcomes = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => Outcome::Applied,
                EntryPayload::Normal(proposal) => {
                    let outcome = inner.state.apply(&proposal.command);
                    let _ = inner.applied.send(AppliedEntry {
                        index: entry.log_id.index,
                        proposal,
                        outcome: outcome.clone(),
                    });
                    outcome
                }
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Outcome::Applied
                }
            };
            outcomes.push(outcome);
        }
        let state = Arc::new(inner.state.clone());
        inner.publish.send_replace(state);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeIdT, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let content: SnapshotContent = serde_json::from_slice(&data).map_err(|e| {
            io_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                std::io::Error::other(e),
            )
        })?;
        let mut inner = self.lock();
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.state = content.state;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        inner.keep_snapshot(stored)?;
        let state = Arc::new(inner.state.clone());
        inner.publish.send_replace(state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let inner = self.lock();
        Ok(inner.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct MemoryBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, ()> for MemoryBuilder {
        async fn build(&self) -> StorageResult<((), LogStore, StateMachine)> {
            let (sm, _) = StateMachine::open(None)
                .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Read, e))?;
            Ok(((), LogStore::in_memory(), sm))
        }
    }

    struct DiskBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempdir::Dir> for DiskBuilder {
        async fn build(&self) -> StorageResult<(tempdir::Dir, LogStore, StateMachine)> {
            let dir = tempdir::Dir::new();
            let log = LogStore::open(&dir.path().join("log"))
                .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Read, e))?;
            let (sm, _) = StateMachine::open(Some(&dir.path().join("sm")))
                .map_err(|e| io_error(ErrorSubject::Store, ErrorVerb::Read, e))?;
            Ok((dir, log, sm))
        }
    }

    /// A temporary directory removed on drop (no extra crate needed).
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU64, Ordering};

        static COUNTER: AtomicU64 = AtomicU64::new(0);

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                let path = std::env::temp_dir().join(format!(
                    "tandem-raft-test-{}-{}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                Self(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn memory_store_passes_openraft_suite() {
        Suite::test_all(MemoryBuilder).unwrap();
    }

    #[test]
    fn disk_store_passes_openraft_suite() {
        Suite::test_all(DiskBuilder).unwrap();
    }

    #[tokio::test]
    async fn disk_log_survives_reopen_and_drops_only_a_torn_tail() {
        let dir = tempdir::Dir::new();
        let path = dir.path().join("log");
        {
            let mut log = LogStore::open(&path).unwrap();
            log.save_vote(&Vote::new(3, 1)).await.unwrap();
            let mut inner = log.lock();
            for i in 1..=3 {
                inner.entries.insert(
                    i,
                    Entry {
                        log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), i),
                        payload: EntryPayload::Blank,
                    },
                );
            }
            inner.rewrite().unwrap();
        }
        // A crash mid-append leaves half a line.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(path.join("log.jsonl"))
            .unwrap();
        file.write_all(br#"{"log_id":{"leader_id":{"te"#).unwrap();
        drop(file);
        let mut log = LogStore::open(&path).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
        // Damage in the middle is an error, not a silent skip.
        let text = std::fs::read_to_string(path.join("log.jsonl")).unwrap();
        let damaged = text.replacen("log_id", "lXg_id", 1);
        std::fs::write(path.join("log.jsonl"), damaged).unwrap();
        let err = LogStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
