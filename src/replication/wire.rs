//! The peer protocol's wire codec.
//!
//! Every frame is a 16-byte header, fixed fields for its kind, then a payload:
//!
//! ```text
//!  0      4   5    6      8            12          16
//!  │magic │ver│kind│flags │ body length│ crc32     │ fixed fields … │ payload …
//! ```
//!
//! `crc32` covers header bytes 0..12 and the whole body (fixed fields and payload), so a
//! flipped bit anywhere is refused. Decoding never panics: wrong magic, unknown version or
//! kind, oversized or truncated bodies, bad enum values and checksum mismatches come back
//! as [`WireError`] naming the problem. Semantic checks (offsets inside the volume, the
//! right volume id and size) belong to the core, which knows the volume.

use super::types::{DiskState, Epoch, GenerationIds, NodeId, Protocol, Role, VolumeId};

/// Frame magic ("TNDM").
pub const MAGIC: u32 = 0x544e_444d;
/// Wire protocol version (2: `Hello` says whether the sender's disk cache was lost; a
/// version-1 peer is refused with a clear error rather than misread).
pub const PROTO_VERSION: u8 = 2;
/// Header bytes.
pub const HEADER_BYTES: usize = 16;
/// Largest body accepted (a 4 MiB data payload plus fixed fields).
pub const MAX_BODY: u32 = (4 << 20) + 256;

/// A decode failure: what was wrong with the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:#010x} (not a tandem peer)")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this node speaks {PROTO_VERSION})")]
    BadVersion(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("body of {0} bytes exceeds the {MAX_BODY}-byte limit")]
    TooLarge(u32),
    #[error("{kind}: body of {got} bytes is shorter than its {need} fixed bytes")]
    Truncated {
        kind: &'static str,
        got: usize,
        need: usize,
    },
    #[error("checksum mismatch (frame corrupted)")]
    BadCrc,
    #[error("{0}")]
    BadField(String),
}

impl From<WireError> for crate::error::TandemError {
    fn from(e: WireError) -> Self {
        crate::error::TandemError::PeerProtocol(e.to_string())
    }
}

/// What a node tells its peer at connection time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub volume_id: VolumeId,
    pub node_id: NodeId,
    pub size_bytes: u64,
    pub generations: GenerationIds,
    pub role: Role,
    pub disk: DiskState,
    pub epoch: Epoch,
    pub protocol: Protocol,
    pub bitmap_granularity: u32,
    pub dirty_bits: u64,
    pub primary_since_ms: u64,
    pub primary_crashed: bool,
    /// The sender's disk cache may have been lost since it was last in sync.
    pub cache_lost: bool,
    pub discard_my_data: bool,
}

/// A peer protocol message. Messages with data carry it as the frame payload, outside
/// this enum (the shell reads it straight into an aligned buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    /// The sender refuses the connection; the reason is for logs and operators.
    Refuse {
        reason: String,
    },
    /// An application write (payload: `len` bytes).
    Data {
        seq: u64,
        offset: u64,
        len: u32,
        fua: bool,
        barrier: u32,
    },
    /// An application discard or write-zeroes.
    Trim {
        seq: u64,
        offset: u64,
        len: u64,
        zeroes: bool,
        barrier: u32,
    },
    /// Protocol B: the write was received.
    RecvAck {
        seq: u64,
    },
    /// Protocol C: the write completed on the peer's disk.
    WriteAck {
        seq: u64,
    },
    /// The peer could not write (its disk failed).
    NegAck {
        seq: u64,
    },
    /// Closes epoch `number`: flush after its writes, then ack.
    Barrier {
        number: u32,
    },
    BarrierAck {
        number: u32,
    },
    Ping,
    PingAck,
    /// A slice of the sender's dirty bitmap (payload: little-endian u64 words).
    Bitmap {
        first_word: u64,
        total_words: u64,
    },
    /// The source starts the resync under generation `sync_gen`.
    SyncStart {
        sync_gen: u64,
    },
    /// Resync data (payload: `len` bytes).
    ResyncData {
        offset: u64,
        len: u32,
    },
    ResyncAck {
        offset: u64,
        len: u32,
    },
    /// Checksum-based resync: the source's digest of a range.
    ResyncChecksum {
        offset: u64,
        len: u32,
        digest: u64,
    },
    /// The target's copy matches: nothing to send.
    ResyncInSync {
        offset: u64,
        len: u32,
    },
    /// The target's copy differs: send the data.
    ResyncNeedData {
        offset: u64,
        len: u32,
    },
    /// The source finished; the target adopts these generations.
    ResyncDone {
        generations: GenerationIds,
    },
    VerifyRequest {
        offset: u64,
        len: u32,
        digest: u64,
    },
    VerifyReply {
        offset: u64,
        len: u32,
        equal: bool,
    },
    /// Read on behalf of a diskless primary.
    ReadRequest {
        id: u64,
        offset: u64,
        len: u32,
    },
    /// Reply to a ReadRequest (payload: `len` bytes when `ok`).
    ReadReply {
        id: u64,
        ok: bool,
    },
    /// Role, disk or epoch changed.
    StateUpdate {
        role: Role,
        disk: DiskState,
        epoch: Epoch,
    },
}

impl Msg {
    /// The kind's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        KINDS[usize::from(self.kind()) - 1].0
    }

    fn kind(&self) -> u8 {
        match self {
            Msg::Hello(_) => 1,
            Msg::Refuse { .. } => 2,
            Msg::Data { .. } => 3,
            Msg::Trim { .. } => 4,
            Msg::RecvAck { .. } => 5,
            Msg::WriteAck { .. } => 6,
            Msg::NegAck { .. } => 7,
            Msg::Barrier { .. } => 8,
            Msg::BarrierAck { .. } => 9,
            Msg::Ping => 10,
            Msg::PingAck => 11,
            Msg::Bitmap { .. } => 12,
            Msg::SyncStart { .. } => 13,
            Msg::ResyncData { .. } => 14,
            Msg::ResyncAck { .. } => 15,
            Msg::ResyncChecksum { .. } => 16,
            Msg::ResyncInSync { .. } => 17,
            Msg::ResyncNeedData { .. } => 18,
            Msg::ResyncDone { .. } => 19,
            Msg::VerifyRequest { .. } => 20,
            Msg::VerifyReply { .. } => 21,
            Msg::ReadRequest { .. } => 22,
            Msg::ReadReply { .. } => 23,
            Msg::StateUpdate { .. } => 24,
        }
    }

    /// Payload bytes this message must carry (data messages), if fixed by its fields.
    pub fn data_len(&self) -> Option<usize> {
        match self {
            Msg::Data { len, .. } | Msg::ResyncData { len, .. } => usize::try_from(*len).ok(),
            _ => None,
        }
    }
}

/// (name, fixed body bytes) per kind, indexed by kind - 1.
const KINDS: [(&str, usize); 24] = [
    (
        "Hello",
        16 + 4 + 8 + 32 + 1 + 1 + 8 + 1 + 4 + 8 + 8 + 1 + 1 + 1,
    ),
    ("Refuse", 0),
    ("Data", 8 + 8 + 4 + 1 + 4),
    ("Trim", 8 + 8 + 8 + 1 + 4),
    ("RecvAck", 8),
    ("WriteAck", 8),
    ("NegAck", 8),
    ("Barrier", 4),
    ("BarrierAck", 4),
    ("Ping", 0),
    ("PingAck", 0),
    ("Bitmap", 16),
    ("SyncStart", 8),
    ("ResyncData", 12),
    ("ResyncAck", 12),
    ("ResyncChecksum", 20),
    ("ResyncInSync", 12),
    ("ResyncNeedData", 12),
    ("ResyncDone", 32),
    ("VerifyRequest", 20),
    ("VerifyReply", 13),
    ("ReadRequest", 20),
    ("ReadReply", 9),
    ("StateUpdate", 10),
];

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u16,
    pub body_len: u32,
    pub crc: u32,
    raw: [u8; 12],
}

impl Header {
    /// Validates magic, version, kind and length.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Self, WireError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if b[4] != PROTO_VERSION {
            return Err(WireError::BadVersion(b[4]));
        }
        let kind = b[5];
        if kind == 0 || usize::from(kind) > KINDS.len() {
            return Err(WireError::UnknownKind(kind));
        }
        let body_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if body_len > MAX_BODY {
            return Err(WireError::TooLarge(body_len));
        }
        let need = KINDS[usize::from(kind) - 1].1;
        let got = usize::try_from(body_len).unwrap_or(usize::MAX);
        if got < need {
            return Err(WireError::Truncated {
                kind: KINDS[usize::from(kind) - 1].0,
                got,
                need,
            });
        }
        let mut raw = [0u8; 12];
        raw.copy_from_slice(&b[..12]);
        Ok(Self {
            kind,
            flags: u16::from_le_bytes([b[6], b[7]]),
            body_len,
            crc: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            raw,
        })
    }

    /// Bytes of fixed fields in the body.
    pub fn fixed_len(&self) -> usize {
        KINDS[usize::from(self.kind) - 1].1
    }

    /// Bytes of payload after the fixed fields.
    pub fn payload_len(&self) -> usize {
        usize::try_from(self.body_len).unwrap_or(0) - self.fixed_len()
    }

    /// Checks the crc over the header, fixed fields and payload.
    pub fn verify(&self, fixed: &[u8], payload: &[u8]) -> Result<(), WireError> {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.raw);
        h.update(fixed);
        h.update(payload);
        if h.finalize() == self.crc {
            Ok(())
        } else {
            Err(WireError::BadCrc)
        }
    }
}

struct Writer<'a>(&'a mut Vec<u8>);
impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn gens(&mut self, g: &GenerationIds) {
        self.u64(g.current);
        self.u64(g.bitmap);
        self.u64(g.history[0]);
        self.u64(g.history[1]);
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}
impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        // Header::decode checked that the body holds the fixed fields.
        out.copy_from_slice(&self.b[self.at..self.at + N]);
        self.at += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8() {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::BadField(format!("boolean field holds {v}"))),
        }
    }
    fn gens(&mut self) -> GenerationIds {
        GenerationIds {
            current: self.u64(),
            bitmap: self.u64(),
            history: [self.u64(), self.u64()],
        }
    }
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Primary => 1,
        Role::Secondary => 2,
    }
}
fn role_of(v: u8) -> Result<Role, WireError> {
    match v {
        1 => Ok(Role::Primary),
        2 => Ok(Role::Secondary),
        v => Err(WireError::BadField(format!("role code {v}"))),
    }
}
fn disk_code(d: DiskState) -> u8 {
    match d {
        DiskState::Diskless => 1,
        DiskState::Inconsistent => 2,
        DiskState::Outdated => 3,
        DiskState::DUnknown => 4,
        DiskState::Consistent => 5,
        DiskState::UpToDate => 6,
    }
}
fn disk_of(v: u8) -> Result<DiskState, WireError> {
    Ok(match v {
        1 => DiskState::Diskless,
        2 => DiskState::Inconsistent,
        3 => DiskState::Outdated,
        4 => DiskState::DUnknown,
        5 => DiskState::Consistent,
        6 => DiskState::UpToDate,
        v => return Err(WireError::BadField(format!("disk state code {v}"))),
    })
}
fn proto_code(p: Protocol) -> u8 {
    match p {
        Protocol::A => 1,
        Protocol::B => 2,
        Protocol::C => 3,
    }
}
fn proto_of(v: u8) -> Result<Protocol, WireError> {
    match v {
        1 => Ok(Protocol::A),
        2 => Ok(Protocol::B),
        3 => Ok(Protocol::C),
        v => Err(WireError::BadField(format!("protocol code {v}"))),
    }
}

/// Encodes the header and fixed fields of `msg` for a frame whose payload is `payload`
/// (`payload` is only hashed here; the caller writes it after the returned bytes).
pub fn encode(msg: &Msg, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + 128);
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    let mut w = Writer(&mut out);
    match msg {
        Msg::Hello(h) => {
            w.0.extend_from_slice(&h.volume_id.0);
            w.u32(h.node_id.0);
            w.u64(h.size_bytes);
            w.gens(&h.generations);
            w.u8(role_code(h.role));
            w.u8(disk_code(h.disk));
            w.u64(h.epoch.0);
            w.u8(proto_code(h.protocol));
            w.u32(h.bitmap_granularity);
            w.u64(h.dirty_bits);
            w.u64(h.primary_since_ms);
            w.u8(u8::from(h.primary_crashed));
            w.u8(u8::from(h.discard_my_data));
            w.u8(u8::from(h.cache_lost));
        }
        Msg::Refuse { .. } | Msg::Ping | Msg::PingAck => {}
        Msg::Data {
            seq,
            offset,
            len,
            fua,
            barrier,
        } => {
            w.u64(*seq);
            w.u64(*offset);
            w.u32(*len);
            w.u8(u8::from(*fua));
            w.u32(*barrier);
        }
        Msg::Trim {
            seq,
            offset,
            len,
            zeroes,
            barrier,
        } => {
            w.u64(*seq);
            w.u64(*offset);
            w.u64(*len);
            w.u8(u8::from(*zeroes));
            w.u32(*barrier);
        }
        Msg::RecvAck { seq } | Msg::WriteAck { seq } | Msg::NegAck { seq } => w.u64(*seq),
        Msg::Barrier { number } | Msg::BarrierAck { number } => w.u32(*number),
        Msg::Bitmap {
            first_word,
            total_words,
        } => {
            w.u64(*first_word);
            w.u64(*total_words);
        }
        Msg::SyncStart { sync_gen } => w.u64(*sync_gen),
        Msg::ResyncData { offset, len }
        | Msg::ResyncAck { offset, len }
        | Msg::ResyncInSync { offset, len }
        | Msg::ResyncNeedData { offset, len } => {
            w.u64(*offset);
            w.u32(*len);
        }
        Msg::ResyncChecksum {
            offset,
            len,
            digest,
        }
        | Msg::VerifyRequest {
            offset,
            len,
            digest,
        } => {
            w.u64(*offset);
            w.u32(*len);
            w.u64(*digest);
        }
        Msg::ResyncDone { generations } => w.gens(generations),
        Msg::VerifyReply { offset, len, equal } => {
            w.u64(*offset);
            w.u32(*len);
            w.u8(u8::from(*equal));
        }
        Msg::ReadRequest { id, offset, len } => {
            w.u64(*id);
            w.u64(*offset);
            w.u32(*len);
        }
        Msg::ReadReply { id, ok } => {
            w.u64(*id);
            w.u8(u8::from(*ok));
        }
        Msg::StateUpdate { role, disk, epoch } => {
            w.u8(role_code(*role));
            w.u8(disk_code(*disk));
            w.u64(epoch.0);
        }
    }
    let reason_bytes: &[u8] = match msg {
        Msg::Refuse { reason } => reason.as_bytes(),
        _ => &[],
    };
    out.extend_from_slice(reason_bytes);
    let fixed_and_reason = out.len() - HEADER_BYTES;
    let body_len = u32::try_from(fixed_and_reason + payload.len()).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    out[4] = PROTO_VERSION;
    out[5] = msg.kind();
    out[6..8].copy_from_slice(&0u16.to_le_bytes());
    out[8..12].copy_from_slice(&body_len.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..12]);
    h.update(&out[HEADER_BYTES..]);
    h.update(payload);
    let crc = h.finalize();
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes the fixed fields (and, for `Refuse`, the reason payload) of a verified frame.
pub fn decode(header: &Header, fixed: &[u8], payload: &[u8]) -> Result<Msg, WireError> {
    let mut r = Reader { b: fixed, at: 0 };
    Ok(match header.kind {
        1 => {
            let mut volume_id = [0u8; 16];
            volume_id.copy_from_slice(&r.take::<16>());
            Msg::Hello(Hello {
                volume_id: VolumeId(volume_id),
                node_id: NodeId(r.u32()),
                size_bytes: r.u64(),
                generations: r.gens(),
                role: role_of(r.u8())?,
                disk: disk_of(r.u8())?,
                epoch: Epoch(r.u64()),
                protocol: proto_of(r.u8())?,
                bitmap_granularity: r.u32(),
                dirty_bits: r.u64(),
                primary_since_ms: r.u64(),
                primary_crashed: r.bool()?,
                discard_my_data: r.bool()?,
                cache_lost: r.bool()?,
            })
        }
        2 => Msg::Refuse {
            reason: String::from_utf8_lossy(payload).chars().take(512).collect(),
        },
        3 => Msg::Data {
            seq: r.u64(),
            offset: r.u64(),
            len: r.u32(),
            fua: r.bool()?,
            barrier: r.u32(),
        },
        4 => Msg::Trim {
            seq: r.u64(),
            offset: r.u64(),
            len: r.u64(),
            zeroes: r.bool()?,
            barrier: r.u32(),
        },
        5 => Msg::RecvAck { seq: r.u64() },
        6 => Msg::WriteAck { seq: r.u64() },
        7 => Msg::NegAck { seq: r.u64() },
        8 => Msg::Barrier { number: r.u32() },
        9 => Msg::BarrierAck { number: r.u32() },
        10 => Msg::Ping,
        11 => Msg::PingAck,
        12 => Msg::Bitmap {
            first_word: r.u64(),
            total_words: r.u64(),
        },
        13 => Msg::SyncStart { sync_gen: r.u64() },
        14 => Msg::ResyncData {
            offset: r.u64(),
            len: r.u32(),
        },
        15 => Msg::ResyncAck {
            offset: r.u64(),
            len: r.u32(),
        },
        16 => Msg::ResyncChecksum {
            offset: r.u64(),
            len: r.u32(),
            digest: r.u64(),
        },
        17 => Msg::ResyncInSync {
            offset: r.u64(),
            len: r.u32(),
        },
        18 => Msg::ResyncNeedData {
            offset: r.u64(),
            len: r.u32(),
        },
        19 => Msg::ResyncDone {
            generations: r.gens(),
        },
        20 => Msg::VerifyRequest {
            offset: r.u64(),
            len: r.u32(),
            digest: r.u64(),
        },
        21 => Msg::VerifyReply {
            offset: r.u64(),
            len: r.u32(),
            equal: r.bool()?,
        },
        22 => Msg::ReadRequest {
            id: r.u64(),
            offset: r.u64(),
            len: r.u32(),
        },
        23 => Msg::ReadReply {
            id: r.u64(),
            ok: r.bool()?,
        },
        24 => Msg::StateUpdate {
            role: role_of(r.u8())?,
            disk: disk_of(r.u8())?,
            epoch: Epoch(r.u64()),
        },
        k => return Err(WireError::UnknownKind(k)),
    })
}

/// A decoded frame: the message, its payload and the bytes consumed.
pub type Frame<'a> = (Msg, &'a [u8], usize);

/// Decodes one whole frame from `bytes`, or `Ok(None)` when more bytes are needed.
pub fn decode_frame(bytes: &[u8]) -> Result<Option<Frame<'_>>, WireError> {
    if bytes.len() < HEADER_BYTES {
        return Ok(None);
    }
    let mut hb = [0u8; HEADER_BYTES];
    hb.copy_from_slice(&bytes[..HEADER_BYTES]);
    let header = Header::decode(&hb)?;
    let total = HEADER_BYTES + usize::try_from(header.body_len).unwrap_or(usize::MAX);
    if bytes.len() < total {
        return Ok(None);
    }
    let fixed_end = HEADER_BYTES + header.fixed_len();
    let fixed = &bytes[HEADER_BYTES..fixed_end];
    let payload = &bytes[fixed_end..total];
    header.verify(fixed, payload)?;
    let msg = decode(&header, fixed, payload)?;
    if let Some(need) = msg.data_len()
        && need != payload.len()
    {
        return Err(WireError::BadField(format!(
            "{} announces {need} data bytes but carries {}",
            msg.name(),
            payload.len()
        )));
    }
    Ok(Some((msg, payload, total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            volume_id: VolumeId::from_name("v"),
            node_id: NodeId(3),
            size_bytes: 1 << 30,
            generations: GenerationIds {
                current: 1,
                bitmap: 2,
                history: [3, 4],
            },
            role: Role::Primary,
            disk: DiskState::UpToDate,
            epoch: Epoch(9),
            protocol: Protocol::C,
            bitmap_granularity: 4096,
            dirty_bits: 17,
            primary_since_ms: 1234,
            primary_crashed: true,
            cache_lost: true,
            discard_my_data: false,
        }
    }

    fn frame(msg: &Msg, payload: &[u8]) -> Vec<u8> {
        let mut f = encode(msg, payload);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let f = frame(&Msg::Ping, &[]);
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(matches!(decode_frame(&bad), Err(WireError::BadMagic(_))));
        let mut bad = f.clone();
        bad[4] = 7;
        assert_eq!(decode_frame(&bad).unwrap_err(), WireError::BadVersion(7));
        let mut bad = f.clone();
        bad[5] = 200;
        assert_eq!(decode_frame(&bad).unwrap_err(), WireError::UnknownKind(200));
        let mut bad = frame(&Msg::WriteAck { seq: 5 }, &[]);
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert_eq!(decode_frame(&bad).unwrap_err(), WireError::BadCrc);
        let mut bad = f.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_frame(&bad), Err(WireError::TooLarge(_))));
        let data = frame(
            &Msg::Data {
                seq: 1,
                offset: 0,
                len: 8192,
                fua: false,
                barrier: 0,
            },
            &[1u8; 4096],
        );
        let err = decode_frame(&data).unwrap_err().to_string();
        assert!(err.contains("announces 8192"), "{err}");
        let mut h = frame(&Msg::Hello(hello()), &[]);
        h[HEADER_BYTES + 16 + 4 + 8 + 32] = 9; // role byte
        // Fix the crc so that only the field check can catch it.
        let crc = {
            let mut c = crc32fast::Hasher::new();
            c.update(&h[..12]);
            c.update(&h[HEADER_BYTES..]);
            c.finalize()
        };
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_frame(&h).unwrap_err(),
            WireError::BadField("role code 9".into())
        );
        assert_eq!(decode_frame(&f[..10]).unwrap(), None, "short input waits");
    }

    fn any_msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            Just(Msg::Hello(hello())),
            "[a-z ]{0,40}".prop_map(|reason| Msg::Refuse { reason }),
            (any::<u64>(), any::<u64>(), any::<bool>(), any::<u32>()).prop_map(
                |(seq, offset, fua, barrier)| Msg::Data {
                    seq,
                    offset,
                    len: 16,
                    fua,
                    barrier
                }
            ),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
                |(seq, offset, len, zeroes)| Msg::Trim {
                    seq,
                    offset,
                    len,
                    zeroes,
                    barrier: 3
                }
            ),
            any::<u64>().prop_map(|seq| Msg::WriteAck { seq }),
            any::<u32>().prop_map(|number| Msg::Barrier { number }),
            (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(offset, len, digest)| {
                Msg::VerifyRequest {
                    offset,
                    len,
                    digest,
                }
            }),
            (any::<u64>(), any::<bool>()).prop_map(|(id, ok)| Msg::ReadReply { id, ok }),
            Just(Msg::StateUpdate {
                role: Role::Secondary,
                disk: DiskState::Outdated,
                epoch: Epoch(4)
            }),
            any::<u64>().prop_map(|sync_gen| Msg::SyncStart { sync_gen }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_and_any_bit_flip_is_refused(msg in any_msg(), flip in any::<prop::sample::Index>()) {
            let payload: Vec<u8> = if msg.data_len().is_some() { vec![0xab; 16] } else { vec![] };
            let f = frame(&msg, &payload);
            let (back, pl, used) = decode_frame(&f).unwrap().unwrap();
            prop_assert_eq!(&back, &msg);
            if msg.data_len().is_some() {
                prop_assert_eq!(pl, &payload[..]);
            }
            prop_assert_eq!(used, f.len());
            let mut bad = f.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 0x10;
            // Any flip is refused or (for a flip in the length) waits for more bytes.
            prop_assert!(!matches!(decode_frame(&bad), Ok(Some(_))));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame(&bytes);
        }
    }
}
