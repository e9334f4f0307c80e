//! A small NBD client (newstyle fixed handshake, NBD_OPT_GO, simple replies), enough for
//! the demo's workload and verification: reads, writes with FUA, flush.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

/// A byte stream to the server: TCP or a unix socket.
trait Stream: Read + Write + Send + std::fmt::Debug {}
impl<T: Read + Write + Send + std::fmt::Debug> Stream for T {}

/// A connected NBD export.
#[derive(Debug)]
pub struct NbdClient {
    stream: Box<dyn Stream>,
    size: u64,
    next_handle: u64,
}

fn read_u16(s: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
fn protocol(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

impl NbdClient {
    /// Connects to `address` (ip:port, or the path of a unix socket) and opens the
    /// default export.
    pub fn connect(address: &str, timeout: Duration) -> std::io::Result<Self> {
        let mut stream: Box<dyn Stream> = if address.starts_with('/') {
            let stream = std::os::unix::net::UnixStream::connect(address)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            Box::new(stream)
        } else {
            let addr: std::net::SocketAddr = address.parse().map_err(|_| {
                protocol(format!("`{address}` is neither ip:port nor a socket path"))
            })?;
            let stream = TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            stream.set_nodelay(true)?;
            Box::new(stream)
        };
        if read_u64(&mut stream)? != NBDMAGIC || read_u64(&mut stream)? != IHAVEOPT {
            return Err(protocol("not a newstyle NBD server"));
        }
        let server_flags = read_u16(&mut stream)?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("server lacks the fixed newstyle handshake"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
        stream.write_all(&client_flags.to_be_bytes())?;
        // NBD_OPT_GO with the default export ("") and no information requests.
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        option.extend_from_slice(&6u32.to_be_bytes());
        option.extend_from_slice(&0u32.to_be_bytes());
        option.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&option)?;
        let mut size = None;
        loop {
            if read_u64(&mut stream)? != REPLY_MAGIC {
                return Err(protocol("bad option reply magic"));
            }
            let _opt = read_u32(&mut stream)?;
            let reply = read_u32(&mut stream)?;
            let len =
                usize::try_from(read_u32(&mut stream)?).map_err(|_| protocol("reply too long"))?;
            if len > 1 << 20 {
                return Err(protocol("option reply too long"));
            }
            let mut data = vec![0u8; len];
            stream.read_exact(&mut data)?;
            match reply {
                REP_ACK => break,
                REP_INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
                {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(b));
                }
                REP_INFO => {}
                error if error & 0x8000_0000 != 0 => {
                    return Err(protocol(format!(
                        "server refused the export (error {error:#x}): {}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                other => return Err(protocol(format!("unexpected option reply {other}"))),
            }
        }
        let size = size.ok_or_else(|| protocol("server sent no export size"))?;
        Ok(Self {
            stream,
            size,
            next_handle: 1,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        data: &[u8],
        read_len: u32,
    ) -> std::io::Result<Vec<u8>> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let len = if kind == CMD_WRITE {
            u32::try_from(data.len()).map_err(|_| protocol("write too large"))?
        } else {
            read_len
        };
        let mut header = Vec::with_capacity(28 + data.len());
        header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&kind.to_be_bytes());
        header.extend_from_slice(&handle.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(data);
        self.stream.write_all(&header)?;
        if read_u32(&mut self.stream)? != SIMPLE_REPLY_MAGIC {
            return Err(protocol("bad reply magic"));
        }
        let error = read_u32(&mut self.stream)?;
        if read_u64(&mut self.stream)? != handle {
            return Err(protocol("reply to another request"));
        }
        // A simple reply carries a read's data only when it succeeded.
        if error != 0 {
            return Err(std::io::Error::other(format!("NBD error {error}")));
        }
        let mut out = Vec::new();
        if kind == CMD_READ {
            out = vec![0u8; usize::try_from(read_len).map_err(|_| protocol("read too large"))?];
            self.stream.read_exact(&mut out)?;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data, 0).map(|_| ())
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.request(CMD_READ, 0, offset, &[], len)
    }

    /// Flushes the export.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[], 0).map(|_| ())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let mut disc = Vec::with_capacity(28);
        disc.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        disc.extend_from_slice(&0u16.to_be_bytes());
        disc.extend_from_slice(&CMD_DISC.to_be_bytes());
        disc.extend_from_slice(&0u64.to_be_bytes());
        disc.extend_from_slice(&0u64.to_be_bytes());
        disc.extend_from_slice(&0u32.to_be_bytes());
        let _ = self.stream.write_all(&disc);
    }
}
