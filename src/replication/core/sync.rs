//! Bitmap exchange, resync (plain and checksum-based), rate control and online verify.
//!
//! ```text
//!  source                                   target
//!  Bitmap chunks ──────────────────────────► merge (OR)
//!  merge (OR) ◄──────────────────────────── Bitmap chunks
//!  SyncStart{sync_gen} ────────────────────► current := sync_gen, Inconsistent
//!  LocalRead ─► ResyncData ────────────────► LocalWrite ─► ResyncAck
//!  (checksum: ResyncChecksum ─► LocalRead+compare ─► ResyncInSync | ResyncNeedData)
//!  no bits left ─► ResyncDone{generations} ► adopt, UpToDate
//! ```

use super::{
    Action, ConnState, DataRef, Decision, DiskState, Handshake, IoTag, Msg, Notice, Replica,
    ResyncRequest, ResyncState, Role, VerifyState, overlaps,
};

/// Verify bookkeeping of the responder: id -> (offset, len, the requester's digest).
pub(super) type PeerVerify = (u64, u64, u64);

impl Replica {
    pub(super) fn on_sync_msg(
        &mut self,
        msg: Msg,
        payload: Option<u64>,
        payload_len: u64,
        inline: &[u8],
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        match msg {
            Msg::Bitmap {
                first_word,
                total_words,
            } => self.on_bitmap(first_word, total_words, inline, out),
            Msg::SyncStart { sync_gen } => {
                let Some(Handshake::AwaitSyncStart { full }) = self.handshake else {
                    return Err("SyncStart while not waiting for a resync".into());
                };
                if self.role == Role::Primary {
                    return Err("SyncStart sent to a primary".into());
                }
                self.handshake = None;
                self.md.generations.current = sync_gen;
                self.md.generations.bitmap = 0;
                self.md.flags.consistent = false;
                self.md.flags.outdated = false;
                self.persist_sb(out);
                self.set_disk(DiskState::Inconsistent, out);
                self.begin_resync(false, full, out);
                Ok(())
            }
            Msg::ResyncData { offset, len } => {
                let key = payload.ok_or("ResyncData without payload")?;
                if self.conn != ConnState::SyncTarget {
                    out.push(Action::Release(DataRef::Payload(key)));
                    return Err("ResyncData while not a sync target".into());
                }
                if payload_len != u64::from(len) {
                    out.push(Action::Release(DataRef::Payload(key)));
                    return Err(format!(
                        "ResyncData announces {len} bytes, carries {payload_len}"
                    ));
                }
                self.on_recv_write(
                    offset,
                    u64::from(len),
                    super::RecvKind::Resync { payload: key },
                    0,
                    out,
                )
            }
            Msg::ResyncAck { offset, len } => {
                let id = self.find_resync(offset, len)?;
                self.finish_request(id, false, out);
                Ok(())
            }
            Msg::ResyncInSync { offset, len } => {
                let id = self.find_resync(offset, len)?;
                out.push(Action::Release(DataRef::Read(IoTag::ResyncRead(id))));
                self.finish_request(id, true, out);
                Ok(())
            }
            Msg::ResyncNeedData { offset, len } => {
                let id = self.find_resync(offset, len)?;
                self.stats.resync_sent_bytes += u64::from(len);
                self.send(
                    Msg::ResyncData { offset, len },
                    Some(DataRef::Read(IoTag::ResyncRead(id))),
                    out,
                );
                Ok(())
            }
            Msg::ResyncChecksum {
                offset,
                len,
                digest,
            } => {
                if self.conn != ConnState::SyncTarget {
                    return Err("ResyncChecksum while not a sync target".into());
                }
                self.check_range(offset, u64::from(len))
                    .map_err(|e| format!("ResyncChecksum: {e}"))?;
                let id = self.next_id;
                self.next_id += 1;
                self.csum_reads.insert(id, (offset, u64::from(len), digest));
                // A write still landing here would make the digest compare stale data.
                self.read_after_writes_in_flight(
                    IoTag::CsumRead(id),
                    offset,
                    u64::from(len),
                    true,
                    out,
                );
                Ok(())
            }
            Msg::ResyncDone { generations } => {
                if self.conn != ConnState::SyncTarget {
                    return Err("ResyncDone while not a sync target".into());
                }
                let conn = self.conn_gen;
                if self
                    .recv
                    .values()
                    .any(|op| op.conn == conn && matches!(op.kind, super::RecvKind::Resync { .. }))
                {
                    return Err("ResyncDone before every resync write was acknowledged".into());
                }
                // The resynced blocks may still sit in the disk cache: flush first.
                self.sync_done_pending = Some(generations);
                out.push(Action::LocalFlush {
                    tag: IoTag::SyncDone,
                });
                Ok(())
            }

            Msg::VerifyRequest {
                offset,
                len,
                digest,
            } => {
                self.check_range(offset, u64::from(len))
                    .map_err(|e| format!("VerifyRequest: {e}"))?;
                let id = self.next_id;
                self.next_id += 1;
                self.verify_peer
                    .insert(id, (offset, u64::from(len), digest));
                // The primary's writes that arrived before this request and are still
                // landing (acknowledged on receipt with protocol A or B) are part of what
                // it compares: read after them, or the verify reports a false mismatch.
                self.read_after_writes_in_flight(
                    IoTag::VerifyPeerRead(id),
                    offset,
                    u64::from(len),
                    true,
                    out,
                );
                Ok(())
            }
            Msg::VerifyReply { offset, len, equal } => {
                let Some(v) = self.verify.as_mut() else {
                    return Err("VerifyReply without a verify running".into());
                };
                let id = v
                    .in_flight
                    .iter()
                    .find(|(_, (o, l))| *o == offset && *l == u64::from(len))
                    .map(|(id, _)| *id)
                    .ok_or_else(|| format!("VerifyReply for unknown range {offset}+{len}"))?;
                v.in_flight.remove(&id);
                v.checked_bytes += u64::from(len);
                if !equal {
                    v.mismatched_bytes += u64::from(len);
                    self.verify_mismatched_total += u64::from(len);
                    self.bitmap.set_range(offset, u64::from(len));
                    out.push(Action::Notify(Notice::VerifyMismatch {
                        offset,
                        len: u64::from(len),
                    }));
                }
                self.pump_verify(out);
                // An application write may have waited for this range.
                self.run_blocked(out);
                Ok(())
            }
            other => Err(format!("unexpected {}", other.name())),
        }
    }

    /// The crash flag says this node's own writes as primary may be missing from its disk
    /// (its activity log marks where). Once they all landed it may go — after a flush:
    /// landed is not durable (seed 1954: a deposed primary's late write, landed in the
    /// disk cache and read for a resync it led, was lost in a power loss after the flag
    /// had gone, and nothing marked the block). The activity-log transaction flushes the
    /// data first, and the superblock written after it carries the cleared flag.
    fn flush_before_clearing_the_crash_flag(&mut self, out: &mut Vec<Action>) {
        out.push(Action::PersistAl {
            extents: self.al.extents(),
        });
        self.md.flags.primary_crashed = false;
    }

    /// Sync target: the resync is complete and durable; adopt the source's generations.
    pub(super) fn adopt_sync(&mut self, generations: super::GenerationIds, out: &mut Vec<Action>) {
        self.md.generations = generations;
        self.md.flags.consistent = true;
        self.md.flags.outdated = false;
        self.md.flags.cache_lost = false;
        // A write of this node's own still landing (a fenced request's) keeps the crash
        // guard: if power fails before it lands, its extent must be resynced.
        if self.md.flags.primary_crashed && self.disk_writes.is_empty() {
            self.flush_before_clearing_the_crash_flag(out);
        }
        self.bitmap.clear_all();
        let blocks = Self::bitmap_blocks(&mut self.bitmap);
        out.push(Action::PersistBitmap { blocks });
        self.persist_sb(out);
        self.finish_sync(false, out);
        self.set_disk(DiskState::UpToDate, out);
        out.push(Action::Notify(Notice::Generations { generations }));
    }

    fn on_bitmap(
        &mut self,
        first_word: u64,
        total_words: u64,
        inline: &[u8],
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        let mine = u64::try_from(self.bitmap.words().len()).unwrap_or(0);
        let Some(Handshake::Bitmaps { received, .. }) = self.handshake.as_mut() else {
            return Err("Bitmap outside the bitmap exchange".into());
        };
        if total_words != mine {
            return Err(format!(
                "peer bitmap has {total_words} words, this node {mine}"
            ));
        }
        if first_word != u64::try_from(received.len()).unwrap_or(u64::MAX) {
            return Err(format!("bitmap chunk at word {first_word} out of order"));
        }
        if !inline.len().is_multiple_of(8) {
            return Err("bitmap chunk is not whole words".into());
        }
        received.extend(inline.chunks_exact(8).map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        }));
        if u64::try_from(received.len()).unwrap_or(u64::MAX) > mine {
            return Err("bitmap longer than announced".into());
        }
        if u64::try_from(received.len()).unwrap_or(0) < mine {
            return Ok(());
        }
        let Some(Handshake::Bitmaps {
            decision,
            received,
            sync_gen,
        }) = self.handshake.take()
        else {
            return Ok(());
        };
        self.bitmap.merge_words(&received);
        let blocks = Self::bitmap_blocks(&mut self.bitmap);
        if !blocks.is_empty() {
            out.push(Action::PersistBitmap { blocks });
        }
        match decision {
            Decision::Source { full } => {
                let sync_gen = sync_gen.unwrap_or(self.md.generations.bitmap);
                self.send(Msg::SyncStart { sync_gen }, None, out);
                self.peer_disk = DiskState::Inconsistent;
                out.push(Action::Notify(Notice::PeerDisk {
                    state: DiskState::Inconsistent,
                }));
                self.begin_resync(true, full, out);
                // What waited for the fencing gate, then the application I/O held during
                // the exchange, go to the peer now.
                self.resend_gate_waiters(out);
                self.run_blocked(out);
            }
            Decision::Target { full } => {
                self.handshake = Some(Handshake::AwaitSyncStart { full });
            }
            _ => {}
        }
        Ok(())
    }

    fn begin_resync(&mut self, source: bool, full: bool, out: &mut Vec<Action>) {
        if source && self.disk != DiskState::Diskless {
            // What we are about to send must not live only in our disk cache: a crash of
            // this source after the target stored it would leave the copies different.
            // (PersistAl flushes the data device first; the log itself is unchanged.)
            out.push(Action::PersistAl {
                extents: self.al.extents(),
            });
        }
        let total = self.bitmap.dirty_bytes().min(self.cfg.size_bytes);
        self.resync = Some(ResyncState {
            source,
            full,
            cursor: 0,
            in_flight: Default::default(),
            total_bytes: total,
            done_bytes: 0,
            skipped_bytes: 0,
            started_ms: self.now_ms,
            rate_bytes_per_sec: 0,
            window_bytes: 0,
            window_start_ms: self.now_ms,
            tokens: 0.0,
            last_refill_ms: self.now_ms,
        });
        self.set_conn(
            if source {
                ConnState::SyncSource
            } else {
                ConnState::SyncTarget
            },
            out,
        );
        out.push(Action::Notify(Notice::SyncStarted {
            source,
            full,
            bytes: total,
        }));
        self.pump_resync(out);
    }

    fn finish_sync(&mut self, source: bool, out: &mut Vec<Action>) {
        let (bytes, ms) = self.resync.take().map_or((0, 0), |r| {
            (r.total_bytes, self.now_ms.saturating_sub(r.started_ms))
        });
        self.set_conn(ConnState::Connected, out);
        self.sync_finished = Some((source, bytes, ms));
        out.push(Action::Notify(Notice::SyncFinished { source, bytes, ms }));
    }

    /// The resync rate in force (bytes/s, 0 = unlimited).
    pub(super) fn effective_rate(&self) -> u64 {
        let r = &self.cfg.resync;
        if !r.dynamic || self.app_rate_bytes_per_sec == 0 || r.max_bytes_per_sec == 0 {
            return r.max_bytes_per_sec;
        }
        r.max_bytes_per_sec
            .saturating_sub(self.app_rate_bytes_per_sec)
            .max(r.min_bytes_per_sec)
    }

    fn max_in_flight(&self) -> usize {
        let r = &self.cfg.resync;
        if r.dynamic && r.max_bytes_per_sec == 0 && self.app_rate_bytes_per_sec > 0 {
            // Unlimited but the application is busy: keep the resync to a trickle.
            2.min(r.max_in_flight.max(1))
        } else {
            r.max_in_flight.max(1)
        }
    }

    fn find_resync(&self, offset: u64, len: u32) -> Result<u64, String> {
        self.resync
            .as_ref()
            .and_then(|r| {
                r.in_flight
                    .iter()
                    .find(|(_, q)| q.offset == offset && q.len == u64::from(len))
                    .map(|(id, _)| *id)
            })
            .ok_or_else(|| format!("resync reply for unknown range {offset}+{len}"))
    }

    fn finish_request(&mut self, id: u64, skipped: bool, out: &mut Vec<Action>) {
        let Some(r) = self.resync.as_mut() else {
            return;
        };
        let Some(q) = r.in_flight.remove(&id) else {
            return;
        };
        if skipped {
            r.skipped_bytes += q.len;
            self.stats.resync_skipped_bytes += q.len;
        }
        r.done_bytes += q.len;
        r.window_bytes += q.len;
        self.bitmap.clear_bits(q.bits);
        self.run_blocked(out);
        self.pump_resync(out);
    }

    /// Issues resync requests within the rate limit; finishes the resync when done.
    pub(super) fn pump_resync(&mut self, out: &mut Vec<Action>) {
        if self.conn != ConnState::SyncSource {
            return;
        }
        let rate = self.effective_rate();
        let max_in_flight = self.max_in_flight();
        let request_bits =
            (self.cfg.resync.request_bytes / u64::from(self.bitmap.granularity())).max(1);
        let now = self.now_ms;
        let Some(r) = self.resync.as_mut() else {
            return;
        };
        // Measure the achieved rate.
        let dt = now.saturating_sub(r.window_start_ms);
        if dt >= 500 {
            let measured = r.window_bytes * 1000 / dt;
            r.rate_bytes_per_sec = if r.rate_bytes_per_sec == 0 {
                measured
            } else {
                (r.rate_bytes_per_sec + measured) / 2
            };
            r.window_bytes = 0;
            r.window_start_ms = now;
        }
        // Refill the token bucket.
        if rate > 0 {
            let dt = now.saturating_sub(r.last_refill_ms);
            #[allow(clippy::cast_precision_loss)]
            let add = rate as f64 * dt as f64 / 1000.0;
            #[allow(clippy::cast_precision_loss)]
            let cap = (rate / 5).max(self.cfg.resync.request_bytes) as f64;
            r.tokens = (r.tokens + add).min(cap);
        }
        r.last_refill_ms = now;
        let mut wrapped = false;
        let mut guard = 0;
        loop {
            let Some(r) = self.resync.as_ref() else {
                return;
            };
            if r.in_flight.len() >= max_in_flight || (rate > 0 && r.tokens < 0.0) {
                break;
            }
            guard += 1;
            if guard > 4096 {
                break;
            }
            let cursor = r.cursor;
            let Some(run) = self.bitmap.next_run(cursor, request_bits) else {
                if !wrapped && cursor > 0 {
                    wrapped = true;
                    if let Some(r) = self.resync.as_mut() {
                        r.cursor = 0;
                    }
                    continue;
                }
                break;
            };
            let (offset, len) = self.bitmap.byte_range(&run, self.cfg.size_bytes);
            let busy_resync = r
                .in_flight
                .values()
                .any(|q| overlaps(offset, len, q.offset, q.len));
            // A write still in flight locally could be missed by the resync read while the
            // peer already has it: wait for it (the peer applies in arrival order). That
            // includes a received write of an earlier connection still on the disk and a
            // write whose request already failed (fenced) but whose local I/O still runs:
            // landing after the read, either would leave this copy newer than the peer's.
            let busy_write = self
                .writes
                .values()
                .any(|w| overlaps(offset, len, w.offset, w.len))
                || self.write_landing_on(offset, len);
            if let Some(r) = self.resync.as_mut() {
                r.cursor = run.end;
            }
            if busy_resync || busy_write || len == 0 {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let checksum = self.cfg.resync.checksum;
            if let Some(r) = self.resync.as_mut() {
                r.in_flight.insert(
                    id,
                    ResyncRequest {
                        offset,
                        len,
                        bits: run,
                    },
                );
                #[allow(clippy::cast_precision_loss)]
                {
                    r.tokens -= len as f64;
                }
            }
            out.push(Action::LocalRead {
                tag: IoTag::ResyncRead(id),
                offset,
                len,
                digest: checksum,
            });
        }
        let done = self.resync.as_ref().is_some_and(|r| r.in_flight.is_empty())
            && self.bitmap.count() == 0;
        if done {
            self.md.generations.rotate_bitmap_into_history();
            if self.role == Role::Secondary
                && self.disk_writes.is_empty()
                && self.md.flags.primary_crashed
            {
                self.flush_before_clearing_the_crash_flag(out);
            }
            // The peer holds this copy now: whatever its cache lost is the pair's.
            self.md.flags.cache_lost = false;
            let generations = self.md.generations;
            let blocks = Self::bitmap_blocks(&mut self.bitmap);
            if !blocks.is_empty() {
                out.push(Action::PersistBitmap { blocks });
            }
            self.persist_sb(out);
            self.send(Msg::ResyncDone { generations }, None, out);
            self.peer_disk = DiskState::UpToDate;
            self.peer_generations = Some(generations);
            out.push(Action::Notify(Notice::PeerDisk {
                state: DiskState::UpToDate,
            }));
            out.push(Action::Notify(Notice::Generations { generations }));
            self.finish_sync(true, out);
        }
    }

    pub(super) fn on_resync_read(
        &mut self,
        id: u64,
        ok: bool,
        digest: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        let Some(q) = self
            .resync
            .as_ref()
            .and_then(|r| r.in_flight.get(&id))
            .cloned()
        else {
            if ok {
                out.push(Action::Release(DataRef::Read(IoTag::ResyncRead(id))));
            }
            return;
        };
        if !ok {
            // The source's disk failed (already detached): the resync stops.
            return;
        }
        let len = u32::try_from(q.len).unwrap_or(u32::MAX);
        match (self.cfg.resync.checksum, digest) {
            (true, Some(digest)) => self.send(
                Msg::ResyncChecksum {
                    offset: q.offset,
                    len,
                    digest,
                },
                None,
                out,
            ),
            _ => {
                self.stats.resync_sent_bytes += q.len;
                self.send(
                    Msg::ResyncData {
                        offset: q.offset,
                        len,
                    },
                    Some(DataRef::Read(IoTag::ResyncRead(id))),
                    out,
                );
            }
        }
    }

    pub(super) fn on_csum_read(
        &mut self,
        id: u64,
        ok: bool,
        digest: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        let Some((offset, len, theirs)) = self.csum_reads.remove(&id) else {
            return;
        };
        if ok {
            out.push(Action::Release(DataRef::Read(IoTag::CsumRead(id))));
        }
        if !self.is_connected() {
            return;
        }
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        if ok && digest == Some(theirs) {
            // Equal, but perhaps only in our disk cache: flush before the source clears
            // its bits (see IoTag::CsumFlush).
            self.csum_reads.insert(id, (offset, len, theirs));
            out.push(Action::LocalFlush {
                tag: IoTag::CsumFlush(id),
            });
        } else {
            self.send(Msg::ResyncNeedData { offset, len: len32 }, None, out);
        }
    }

    pub(super) fn start_verify(&mut self, out: &mut Vec<Action>) {
        if self.conn != ConnState::Connected {
            out.push(Action::Notify(Notice::Refused {
                reason: format!("verify refused: connection is {:?}", self.conn),
            }));
            return;
        }
        self.verify = Some(VerifyState {
            cursor: 0,
            in_flight: Default::default(),
            checked_bytes: 0,
            mismatched_bytes: 0,
        });
        self.set_conn(ConnState::Verifying, out);
        self.pump_verify(out);
    }

    pub(super) fn pump_verify(&mut self, out: &mut Vec<Action>) {
        let max_in_flight = self.cfg.resync.max_in_flight.max(1);
        let request = self.cfg.resync.request_bytes.max(4096);
        loop {
            let Some(v) = self.verify.as_mut() else {
                return;
            };
            if v.in_flight.len() >= max_in_flight || v.cursor >= self.cfg.size_bytes {
                break;
            }
            let offset = v.cursor;
            let len = request.min(self.cfg.size_bytes - offset);
            let busy = self
                .writes
                .values()
                .any(|w| overlaps(offset, len, w.offset, w.len));
            if busy {
                break;
            }
            let id = self.next_id;
            self.next_id += 1;
            let v = self.verify.as_mut().expect("checked above");
            v.cursor += len;
            v.in_flight.insert(id, (offset, len));
            out.push(Action::LocalRead {
                tag: IoTag::VerifyRead(id),
                offset,
                len,
                digest: true,
            });
        }
        let finished = self
            .verify
            .as_ref()
            .is_some_and(|v| v.in_flight.is_empty() && v.cursor >= self.cfg.size_bytes);
        if finished && let Some(v) = self.verify.take() {
            let blocks = Self::bitmap_blocks(&mut self.bitmap);
            if !blocks.is_empty() {
                out.push(Action::PersistBitmap { blocks });
            }
            out.push(Action::Notify(Notice::VerifyFinished {
                checked_bytes: v.checked_bytes,
                mismatched_bytes: v.mismatched_bytes,
            }));
            if self.conn == ConnState::Verifying {
                self.set_conn(ConnState::Connected, out);
            }
        }
    }

    pub(super) fn on_verify_read(
        &mut self,
        id: u64,
        ok: bool,
        digest: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        if ok {
            out.push(Action::Release(DataRef::Read(IoTag::VerifyRead(id))));
        }
        let Some(&(offset, len)) = self.verify.as_ref().and_then(|v| v.in_flight.get(&id)) else {
            return;
        };
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        self.send(
            Msg::VerifyRequest {
                offset,
                len: len32,
                // A failed read can never match.
                digest: if ok { digest.unwrap_or(0) } else { u64::MAX },
            },
            None,
            out,
        );
    }

    pub(super) fn on_verify_peer_read(
        &mut self,
        id: u64,
        ok: bool,
        digest: Option<u64>,
        out: &mut Vec<Action>,
    ) {
        if ok {
            out.push(Action::Release(DataRef::Read(IoTag::VerifyPeerRead(id))));
        }
        let Some((offset, len, theirs)) = self.verify_peer.remove(&id) else {
            return;
        };
        let equal = ok && digest == Some(theirs);
        if !equal {
            self.bitmap.set_range(offset, len);
        }
        if self.is_connected() {
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            self.send(Msg::VerifyReply { offset, len, equal }, None, out);
        }
    }
}
