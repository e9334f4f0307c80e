//! The peer wire format: length-prefixed, versioned, checksummed frames.
//!
//! ```text
//!  u32 BE  body length (2..=MAX_FRAME_BYTES)
//!  body:   u8 version (1) | u8 frame kind | payload | u32 BE crc32 of version..payload
//! ```
//!
//! Integers are big-endian. A resource is `u8 length` + [`ResourceKey::as_bytes`]. Every
//! field is checked on decode (modes, statuses, flags, names, lengths, trailing bytes);
//! a bad frame is an error naming the problem, never a panic. The shell drops the
//! connection on any decode error.

use crate::core::{Message, Reply};
use crate::error::DlmError;
use crate::mode::Mode;
use crate::types::{
    Epoch, Flags, Incarnation, LVB_LEN, LockId, Lvb, LvbCopy, NodeId, ResourceKey, Status,
};

/// Current wire version.
pub const VERSION: u8 = 1;
/// Largest frame body accepted.
pub const MAX_FRAME_BYTES: usize = 4096;

/// One frame between two nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// First frame on a connection, both ways.
    Hello {
        /// Sender.
        node: NodeId,
        /// Sender's incarnation.
        incarnation: Incarnation,
        /// The receiver incarnation the sender's session state is for (0: none).
        peer_incarnation: Incarnation,
        /// Sequence number of the next data frame the sender expects from the receiver.
        receive_next: u64,
    },
    /// A core message with its per-session sequence number.
    Data {
        /// Sequence number (from 1, no gaps).
        seq: u64,
        /// The message.
        message: Message,
    },
    /// Cumulative acknowledgement: every data frame before `next` arrived.
    Ack {
        /// Next expected sequence number.
        next: u64,
    },
    /// Liveness beacon for the standalone failure detector.
    Heartbeat {
        /// Sender's membership epoch.
        epoch: Epoch,
        /// Fingerprint of the sender's member set (see
        /// `shell::membership_fingerprint`).
        members: u64,
    },
}

fn bad(reason: impl Into<String>) -> DlmError {
    DlmError::DecodeFrame {
        reason: reason.into(),
    }
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn key(&mut self, k: &ResourceKey) {
        let bytes = k.as_bytes();
        // A key is at most 1 + 64 + 64 bytes.
        self.u8(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
        self.0.extend_from_slice(bytes);
    }
    fn lvb(&mut self, v: &Lvb) {
        self.0.extend_from_slice(&v.0);
    }
    fn opt_lvb(&mut self, v: &Option<Lvb>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.lvb(v);
            }
        }
    }
    fn opt_copy(&mut self, v: &Option<LvbCopy>) {
        match v {
            None => self.u8(0),
            Some(c) => {
                self.u8(1);
                self.lvb(&c.value);
                self.u64(c.seq);
                self.u8(u8::from(c.valid));
            }
        }
    }
    fn opt_mode(&mut self, m: Option<Mode>) {
        self.u8(m.map_or(0xff, Mode::as_u8));
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DlmError> {
        if self.buf.len() < n {
            return Err(bad(format!("truncated {what}")));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, DlmError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, DlmError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, DlmError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn key(&mut self) -> Result<ResourceKey, DlmError> {
        let n = usize::from(self.u8("resource length")?);
        let bytes = self.take(n, "resource")?;
        ResourceKey::from_bytes(bytes).map_err(|e| bad(format!("resource: {e}")))
    }
    fn mode(&mut self) -> Result<Mode, DlmError> {
        let v = self.u8("mode")?;
        Mode::from_u8(v).ok_or_else(|| bad(format!("mode {v}")))
    }
    fn opt_mode(&mut self) -> Result<Option<Mode>, DlmError> {
        let v = self.u8("mode")?;
        if v == 0xff {
            return Ok(None);
        }
        Mode::from_u8(v)
            .map(Some)
            .ok_or_else(|| bad(format!("mode {v}")))
    }
    fn flags(&mut self) -> Result<Flags, DlmError> {
        let v = self.u32("flags")?;
        let f = Flags(v);
        if !Flags::ALL.contains(f) {
            return Err(bad(format!("flags {v:#x}")));
        }
        Ok(f)
    }
    fn bool(&mut self, what: &str) -> Result<bool, DlmError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(bad(format!("{what} {v}"))),
        }
    }
    fn lvb(&mut self) -> Result<Lvb, DlmError> {
        let b = self.take(LVB_LEN, "value block")?;
        let mut v = [0u8; LVB_LEN];
        v.copy_from_slice(b);
        Ok(Lvb(v))
    }
    fn opt_lvb(&mut self) -> Result<Option<Lvb>, DlmError> {
        if self.bool("value block tag")? {
            Ok(Some(self.lvb()?))
        } else {
            Ok(None)
        }
    }
    fn opt_copy(&mut self) -> Result<Option<LvbCopy>, DlmError> {
        if !self.bool("value block tag")? {
            return Ok(None);
        }
        let value = self.lvb()?;
        let seq = self.u64("value block version")?;
        let valid = self.bool("value block validity")?;
        Ok(Some(LvbCopy { value, seq, valid }))
    }
    fn status(&mut self) -> Result<Status, DlmError> {
        let v = self.u8("status")?;
        STATUSES
            .get(usize::from(v))
            .copied()
            .ok_or_else(|| bad(format!("status {v}")))
    }
}

const STATUSES: [Status; 8] = [
    Status::Granted,
    Status::WouldBlock,
    Status::Deadlock,
    Status::Canceled,
    Status::Unlocked,
    Status::Invalid,
    Status::Busy,
    Status::Evicted,
];

fn status_code(s: Status) -> u8 {
    let idx = STATUSES.iter().position(|x| *x == s).unwrap_or(0);
    u8::try_from(idx).unwrap_or(0)
}

fn encode_message(w: &mut Writer<'_>, m: &Message) {
    match m {
        Message::Lookup { epoch, resource } => {
            w.u8(1);
            w.u64(epoch.0);
            w.key(resource);
        }
        Message::LookupReply {
            epoch,
            resource,
            master,
        } => {
            w.u8(2);
            w.u64(epoch.0);
            w.key(resource);
            w.u32(master.0);
        }
        Message::Remove { epoch, resource } => {
            w.u8(3);
            w.u64(epoch.0);
            w.key(resource);
        }
        Message::Request {
            resource,
            lock,
            mode,
            flags,
        } => {
            w.u8(4);
            w.key(resource);
            w.u64(lock.0);
            w.u8(mode.as_u8());
            w.u32(flags.0);
        }
        Message::Convert {
            resource,
            lock,
            mode,
            flags,
            lvb,
        } => {
            w.u8(5);
            w.key(resource);
            w.u64(lock.0);
            w.u8(mode.as_u8());
            w.u32(flags.0);
            w.opt_lvb(lvb);
        }
        Message::Unlock {
            resource,
            lock,
            lvb,
        } => {
            w.u8(6);
            w.key(resource);
            w.u64(lock.0);
            w.opt_lvb(lvb);
        }
        Message::Cancel { resource, lock } => {
            w.u8(7);
            w.key(resource);
            w.u64(lock.0);
        }
        Message::Reply { lock, reply } => {
            w.u8(8);
            w.u64(lock.0);
            match reply {
                Reply::Granted { mode, lvb, demoted } => {
                    w.u8(1);
                    w.u8(mode.as_u8());
                    w.opt_copy(lvb);
                    w.u8(u8::from(*demoted));
                }
                Reply::Failed { status, mode } => {
                    w.u8(2);
                    w.u8(status_code(*status));
                    w.opt_mode(*mode);
                }
                Reply::Unlocked => w.u8(3),
                Reply::NotMaster => w.u8(4),
            }
        }
        Message::Blocking { lock, mode } => {
            w.u8(9);
            w.u64(lock.0);
            w.u8(mode.as_u8());
        }
        Message::RecoverStop { epoch, completed } => {
            w.u8(10);
            w.u64(epoch.0);
            w.u64(completed.0);
        }
        Message::RecoverLock {
            epoch,
            resource,
            lock,
            mode,
            flags,
            lvb,
        } => {
            w.u8(11);
            w.u64(epoch.0);
            w.key(resource);
            w.u64(lock.0);
            w.u8(mode.as_u8());
            w.u32(flags.0);
            w.opt_copy(lvb);
        }
        Message::RecoverMaster { epoch, resource } => {
            w.u8(12);
            w.u64(epoch.0);
            w.key(resource);
        }
        Message::RecoverDone { epoch } => {
            w.u8(13);
            w.u64(epoch.0);
        }
    }
}

fn decode_message(r: &mut Reader<'_>) -> Result<Message, DlmError> {
    let kind = r.u8("message kind")?;
    Ok(match kind {
        1 => Message::Lookup {
            epoch: Epoch(r.u64("epoch")?),
            resource: r.key()?,
        },
        2 => Message::LookupReply {
            epoch: Epoch(r.u64("epoch")?),
            resource: r.key()?,
            master: NodeId(r.u32("node")?),
        },
        3 => Message::Remove {
            epoch: Epoch(r.u64("epoch")?),
            resource: r.key()?,
        },
        4 => Message::Request {
            resource: r.key()?,
            lock: LockId(r.u64("lock")?),
            mode: r.mode()?,
            flags: r.flags()?,
        },
        5 => Message::Convert {
            resource: r.key()?,
            lock: LockId(r.u64("lock")?),
            mode: r.mode()?,
            flags: r.flags()?,
            lvb: r.opt_lvb()?,
        },
        6 => Message::Unlock {
            resource: r.key()?,
            lock: LockId(r.u64("lock")?),
            lvb: r.opt_lvb()?,
        },
        7 => Message::Cancel {
            resource: r.key()?,
            lock: LockId(r.u64("lock")?),
        },
        8 => {
            let lock = LockId(r.u64("lock")?);
            let reply = match r.u8("reply kind")? {
                1 => Reply::Granted {
                    mode: r.mode()?,
                    lvb: r.opt_copy()?,
                    demoted: r.bool("demoted")?,
                },
                2 => Reply::Failed {
                    status: r.status()?,
                    mode: r.opt_mode()?,
                },
                3 => Reply::Unlocked,
                4 => Reply::NotMaster,
                v => return Err(bad(format!("reply kind {v}"))),
            };
            Message::Reply { lock, reply }
        }
        9 => Message::Blocking {
            lock: LockId(r.u64("lock")?),
            mode: r.mode()?,
        },
        10 => Message::RecoverStop {
            epoch: Epoch(r.u64("epoch")?),
            completed: Epoch(r.u64("epoch")?),
        },
        11 => Message::RecoverLock {
            epoch: Epoch(r.u64("epoch")?),
            resource: r.key()?,
            lock: LockId(r.u64("lock")?),
            mode: r.mode()?,
            flags: r.flags()?,
            lvb: r.opt_copy()?,
        },
        12 => Message::RecoverMaster {
            epoch: Epoch(r.u64("epoch")?),
            resource: r.key()?,
        },
        13 => Message::RecoverDone {
            epoch: Epoch(r.u64("epoch")?),
        },
        v => return Err(bad(format!("message kind {v}"))),
    })
}

/// Appends the encoded frame to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    let body = out.len();
    let mut w = Writer(out);
    w.u8(VERSION);
    match frame {
        Frame::Hello {
            node,
            incarnation,
            peer_incarnation,
            receive_next,
        } => {
            w.u8(1);
            w.u32(node.0);
            w.u64(incarnation.0);
            w.u64(peer_incarnation.0);
            w.u64(*receive_next);
        }
        Frame::Data { seq, message } => {
            w.u8(2);
            w.u64(*seq);
            encode_message(&mut w, message);
        }
        Frame::Ack { next } => {
            w.u8(3);
            w.u64(*next);
        }
        Frame::Heartbeat { epoch, members } => {
            w.u8(4);
            w.u64(epoch.0);
            w.u64(*members);
        }
    }
    let crc = crc32fast::hash(&out[body..]);
    out.extend_from_slice(&crc.to_be_bytes());
    let len = u32::try_from(out.len() - body).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Decodes the frame at the start of `buf`. `Ok(None)`: more bytes are needed.
/// `Ok(Some((frame, used)))`: one frame and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DlmError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::try_from(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]))
        .map_err(|_| bad("frame length"))?;
    if !(6..=MAX_FRAME_BYTES).contains(&len) {
        return Err(bad(format!("frame length {len}")));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = &buf[4..4 + len];
    let (content, crc) = body.split_at(len - 4);
    let want = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let got = crc32fast::hash(content);
    if want != got {
        return Err(bad(format!(
            "checksum {got:#010x}, frame says {want:#010x}"
        )));
    }
    let mut r = Reader { buf: content };
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(bad(format!(
            "version {version} (this node speaks {VERSION})"
        )));
    }
    let frame = match r.u8("frame kind")? {
        1 => Frame::Hello {
            node: NodeId(r.u32("node")?),
            incarnation: Incarnation(r.u64("incarnation")?),
            peer_incarnation: Incarnation(r.u64("incarnation")?),
            receive_next: r.u64("sequence")?,
        },
        2 => Frame::Data {
            seq: r.u64("sequence")?,
            message: decode_message(&mut r)?,
        },
        3 => Frame::Ack {
            next: r.u64("sequence")?,
        },
        4 => Frame::Heartbeat {
            epoch: Epoch(r.u64("epoch")?),
            members: r.u64("fingerprint")?,
        },
        v => return Err(bad(format!("frame kind {v}"))),
    };
    if !r.buf.is_empty() {
        return Err(bad(format!("{} trailing bytes", r.buf.len())));
    }
    Ok(Some((frame, 4 + len)))
}

#[cfg(test)]
#[path = "wire_test.rs"]
mod tests;
