//! The NBD server: fixed newstyle handshake, then concurrent transmission.
//!
//! Each connection has a reader (requests, in order), one task per request (the volume
//! may complete them out of order; replies carry the client's cookie) and a writer.
//! Requests larger than the volume's request limit are split. A request with a bad magic
//! or an oversized payload closes the connection (the stream can no longer be trusted);
//! out-of-range or misaligned requests get `EINVAL` and the connection goes on.

use super::proto::*;
use crate::error::{Result, TandemError};
use crate::replication::Volume;
use crate::store::AlignedBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Receive buffer of a connection.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Largest single volume request the server issues (bigger client requests are split).
const CHUNK: u64 = 4 << 20;

/// The exports a server offers (by name; the empty name selects the first).
#[derive(Debug, Clone)]
pub struct Exports {
    volumes: Vec<Volume>,
}

impl Exports {
    /// One export per volume, named after it.
    pub fn new(volumes: Vec<Volume>) -> Self {
        Self { volumes }
    }

    fn find(&self, name: &str) -> Option<&Volume> {
        if name.is_empty() {
            self.volumes.first()
        } else {
            self.volumes.iter().find(|v| v.name() == name)
        }
    }
}

/// Serves NBD on a TCP address, which must be on 127.0.0.0/8 (or ::1).
pub async fn serve_tcp(
    addr: std::net::SocketAddr,
    exports: Exports,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    if !addr.ip().is_loopback() {
        return Err(TandemError::BadConfig(format!(
            "NBD listen address {addr} is not a loopback address (use 127.0.0.0/8 or a unix socket)"
        )));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(TandemError::io(format!("binding the NBD port {addr}")))?;
    let local = listener
        .local_addr()
        .map_err(TandemError::io("reading the NBD listen address"))?;
    Ok((
        local,
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let exports = exports.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_connection(stream, &exports).await {
                                tracing::info!(client = %peer, error = %crate::replication::error_chain(&e), "NBD connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "NBD accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }),
    ))
}

/// Serves NBD on a unix socket.
pub async fn serve_unix(
    path: &std::path::Path,
    exports: Exports,
) -> Result<tokio::task::JoinHandle<()>> {
    if path.exists() {
        std::fs::remove_file(path).map_err(TandemError::io(format!(
            "removing the stale socket {}",
            path.display()
        )))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(TandemError::io(format!(
        "binding the NBD socket {}",
        path.display()
    )))?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let exports = exports.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(stream, &exports).await {
                            tracing::info!(error = %crate::replication::error_chain(&e), "NBD connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

fn nbd_io(e: std::io::Error) -> TandemError {
    TandemError::NbdIo { source: e }
}

fn refuse(reason: impl Into<String>) -> TandemError {
    TandemError::NbdProtocol(reason.into())
}

async fn transmission_flags(volume: &Volume) -> u16 {
    let mut flags = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN;
    if let Ok(s) = volume.status().await
        && s.replica.role != crate::replication::types::Role::Primary
    {
        flags |= TF_READ_ONLY;
    }
    flags
}

/// Runs the handshake and transmission phases on one connection.
pub async fn serve_connection<S>(stream: S, exports: &Exports) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (r, mut w) = tokio::io::split(stream);
    // Buffered: under load one recv carries many request headers (and small payloads)
    // instead of two syscalls per request.
    let mut r = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, r);
    w.write_all(&NBDMAGIC.to_be_bytes()).await.map_err(nbd_io)?;
    w.write_all(&IHAVEOPT.to_be_bytes()).await.map_err(nbd_io)?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await
        .map_err(nbd_io)?;
    w.flush().await.map_err(nbd_io)?;
    let client_flags = r.read_u32().await.map_err(nbd_io)?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(refuse(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let volume = loop {
        let magic = r.read_u64().await.map_err(nbd_io)?;
        if magic != IHAVEOPT {
            return Err(refuse(format!("bad option magic {magic:#018x}")));
        }
        let option = r.read_u32().await.map_err(nbd_io)?;
        let len = r.read_u32().await.map_err(nbd_io)?;
        if len > 64 << 10 {
            return Err(refuse(format!("option {option} with {len} bytes of data")));
        }
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        r.read_exact(&mut data).await.map_err(nbd_io)?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(v) = exports.find(&name) else {
                    // No way to report an error for EXPORT_NAME: close.
                    return Err(refuse(format!("unknown export `{name}`")));
                };
                let v = v.clone();
                w.write_all(&v.size_bytes().to_be_bytes())
                    .await
                    .map_err(nbd_io)?;
                w.write_all(&transmission_flags(&v).await.to_be_bytes())
                    .await
                    .map_err(nbd_io)?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await.map_err(nbd_io)?;
                }
                w.flush().await.map_err(nbd_io)?;
                break v;
            }
            OPT_ABORT => {
                let _ = w.write_all(&option_reply(option, REP_ACK, &[])).await;
                let _ = w.flush().await;
                return Ok(());
            }
            OPT_LIST => {
                let mut out = Vec::new();
                for v in &exports.volumes {
                    let mut d = Vec::new();
                    d.extend_from_slice(&u32::try_from(v.name().len()).unwrap_or(0).to_be_bytes());
                    d.extend_from_slice(v.name().as_bytes());
                    out.extend(option_reply(option, REP_SERVER, &d));
                }
                out.extend(option_reply(option, REP_ACK, &[]));
                w.write_all(&out).await.map_err(nbd_io)?;
            }
            OPT_INFO | OPT_GO => {
                let (name, _requested) = match parse_info_request(&data) {
                    Ok(x) => x,
                    Err(e) => {
                        w.write_all(&option_reply(option, REP_ERR_INVALID, e.as_bytes()))
                            .await
                            .map_err(nbd_io)?;
                        w.flush().await.map_err(nbd_io)?;
                        continue;
                    }
                };
                let Some(v) = exports.find(&name).cloned() else {
                    let msg = format!("unknown export `{name}`");
                    w.write_all(&option_reply(option, REP_ERR_UNKNOWN, msg.as_bytes()))
                        .await
                        .map_err(nbd_io)?;
                    w.flush().await.map_err(nbd_io)?;
                    continue;
                };
                let mut out = Vec::new();
                let mut export = Vec::new();
                export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                export.extend_from_slice(&v.size_bytes().to_be_bytes());
                export.extend_from_slice(&transmission_flags(&v).await.to_be_bytes());
                out.extend(option_reply(option, REP_INFO, &export));
                let mut bs = Vec::new();
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                let min = u32::try_from(v.block_bytes()).unwrap_or(512);
                bs.extend_from_slice(&min.to_be_bytes());
                bs.extend_from_slice(&4096u32.max(min).to_be_bytes());
                bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                out.extend(option_reply(option, REP_INFO, &bs));
                let mut nm = Vec::new();
                nm.extend_from_slice(&INFO_NAME.to_be_bytes());
                nm.extend_from_slice(v.name().as_bytes());
                out.extend(option_reply(option, REP_INFO, &nm));
                let mut desc = Vec::new();
                desc.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                desc.extend_from_slice(b"tandem replicated volume");
                out.extend(option_reply(option, REP_INFO, &desc));
                out.extend(option_reply(option, REP_ACK, &[]));
                w.write_all(&out).await.map_err(nbd_io)?;
                w.flush().await.map_err(nbd_io)?;
                if option == OPT_GO {
                    break v;
                }
            }
            OPT_STARTTLS => {
                w.write_all(&option_reply(option, REP_ERR_POLICY, b"TLS is not offered"))
                    .await
                    .map_err(nbd_io)?;
            }
            other => {
                w.write_all(&option_reply(other, REP_ERR_UNSUP, &[]))
                    .await
                    .map_err(nbd_io)?;
            }
        }
        w.flush().await.map_err(nbd_io)?;
    };
    transmission(r, w, volume).await
}

enum Reply {
    Simple { error: u32, cookie: u64 },
    Data { cookie: u64, data: Vec<AlignedBuf> },
}

async fn transmission<R, W>(mut r: R, w: W, volume: Volume) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(w, rx));
    let volume = Arc::new(volume);
    let size = volume.size_bytes();
    let block = volume.block_bytes().max(1);
    let result = loop {
        let mut hb = [0u8; 28];
        if let Err(e) = r.read_exact(&mut hb).await {
            break Err(nbd_io(e));
        }
        let req = match Request::decode(&hb) {
            Ok(req) => req,
            Err(e) => break Err(refuse(e)),
        };
        if req.kind == CMD_DISC {
            break Ok(());
        }
        if req.kind == CMD_WRITE && req.length > MAX_PAYLOAD {
            break Err(refuse(format!(
                "write of {} bytes exceeds the {MAX_PAYLOAD}-byte limit",
                req.length
            )));
        }
        let mut payload = None;
        if req.kind == CMD_WRITE {
            let mut buf = AlignedBuf::for_overwrite(usize::try_from(req.length).unwrap_or(0));
            if let Err(e) = r.read_exact(&mut buf).await {
                break Err(nbd_io(e));
            }
            payload = Some(buf);
        }
        let len = u64::from(req.length);
        let in_range = req.offset.checked_add(len).is_some_and(|end| end <= size);
        let aligned = req.offset.is_multiple_of(block) && len.is_multiple_of(block);
        let needs_range = matches!(
            req.kind,
            CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE
        );
        if needs_range && (!in_range || !aligned) {
            tracing::debug!(
                offset = req.offset,
                len,
                "refused out-of-range or misaligned NBD request"
            );
            let _ = tx.send(Reply::Simple {
                error: EINVAL,
                cookie: req.cookie,
            });
            continue;
        }
        if req.kind == CMD_READ && req.length > MAX_PAYLOAD {
            let _ = tx.send(Reply::Simple {
                error: EINVAL,
                cookie: req.cookie,
            });
            continue;
        }
        let v = Arc::clone(&volume);
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = execute(&v, req, payload).await;
            let _ = tx.send(reply);
        });
    };
    drop(tx);
    // Replies for requests still running are sent before the connection closes.
    let _ = writer.await;
    result
}

fn errno(e: &TandemError) -> u32 {
    match e {
        TandemError::VolumeState { .. } => EPERM,
        TandemError::InvalidRequest(_) => EINVAL,
        TandemError::VolumeGone(_) => ESHUTDOWN,
        _ => EIO,
    }
}

async fn execute(v: &Volume, req: Request, payload: Option<AlignedBuf>) -> Reply {
    let cookie = req.cookie;
    let len = u64::from(req.length);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let simple = |r: Result<()>| Reply::Simple {
        error: match &r {
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!(error = %crate::replication::error_chain(e), "NBD request failed");
                errno(e)
            }
        },
        cookie,
    };
    match req.kind {
        CMD_READ => {
            let chunks = split(req.offset, len);
            let futs = chunks.iter().map(|&(o, l)| v.read(o, l));
            match futures_join(futs).await {
                Ok(data) => Reply::Data { cookie, data },
                Err(e) => simple(Err(e)),
            }
        }
        CMD_WRITE => {
            let Some(buf) = payload else {
                return simple(Err(TandemError::InvalidRequest(
                    "write without data".into(),
                )));
            };
            let chunks = split(req.offset, len);
            let r = if chunks.len() == 1 {
                v.write(req.offset, Arc::new(buf), fua).await
            } else {
                let futs = chunks.iter().map(|&(o, l)| {
                    let start = usize::try_from(o - req.offset).unwrap_or(0);
                    let end = start + usize::try_from(l).unwrap_or(0);
                    let piece = Arc::new(AlignedBuf::copy_from(&buf[start..end]));
                    v.write(o, piece, fua)
                });
                futures_join(futs).await.map(drop)
            };
            simple(r)
        }
        CMD_FLUSH => simple(v.flush().await),
        CMD_TRIM => {
            let r = v.trim(req.offset, len, false).await;
            let r = if r.is_ok() && fua { v.flush().await } else { r };
            simple(r)
        }
        CMD_WRITE_ZEROES => {
            let r = v.trim(req.offset, len, true).await;
            let r = if r.is_ok() && fua { v.flush().await } else { r };
            simple(r)
        }
        CMD_CACHE => simple(Ok(())),
        _ => Reply::Simple {
            error: ENOTSUP,
            cookie,
        },
    }
}

fn split(offset: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut o = offset;
    let end = offset + len;
    while o < end {
        let l = CHUNK.min(end - o);
        out.push((o, l));
        o += l;
    }
    if out.is_empty() {
        out.push((offset, 0));
    }
    out
}

/// Runs futures concurrently; the first error wins.
async fn futures_join<T, F>(futs: impl Iterator<Item = F>) -> Result<Vec<T>>
where
    F: std::future::Future<Output = Result<T>>,
{
    let mut set = Vec::new();
    for f in futs {
        set.push(f);
    }
    let results = futures_util_join_all(set).await;
    results.into_iter().collect()
}

async fn futures_util_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

async fn write_replies<W: AsyncWrite + Unpin>(w: W, mut rx: mpsc::UnboundedReceiver<Reply>) {
    let mut w = tokio::io::BufWriter::with_capacity(256 << 10, w);
    while let Some(reply) = rx.recv().await {
        let mut next = Some(reply);
        while let Some(r) = next.take() {
            let ok = match r {
                Reply::Simple { error, cookie } => w.write_all(&simple_reply(error, cookie)).await,
                Reply::Data { cookie, data } => {
                    let mut res = w.write_all(&simple_reply(0, cookie)).await;
                    for d in &data {
                        if res.is_ok() {
                            res = w.write_all(d).await;
                        }
                    }
                    res
                }
            };
            if ok.is_err() {
                return;
            }
            next = rx.try_recv().ok();
            if next.is_none() {
                // As for peer frames: let ready requests finish into this batch.
                tokio::task::yield_now().await;
                next = rx.try_recv().ok();
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.flush().await;
}
