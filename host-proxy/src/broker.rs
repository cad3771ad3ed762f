//! CUDA IPC between zone workers, brokered by the daemon.
//!
//! # Design
//! - **Guest handles.** The handle a guest gets from `cuIpcGetMemHandle` is 64 bytes:
//!   [`HANDLE_TAG`], a 128-bit token drawn from the operating system's random source by the
//!   daemon, then zeros ([`guest_handle`], [`parse_guest_handle`]). It names an entry of the
//!   daemon's [`Registry`]; the backend's own IPC payload (for CUDA the driver's
//!   `CUipcMemHandle`) never leaves the host. A handle that is malformed, forged (unknown
//!   token), replayed after its allocation was freed, or exported by a zone that is gone
//!   is `CUDA_ERROR_INVALID_VALUE`, as CUDA answers a bad handle.
//! - **Registry.** token → exporter (the daemon's connection id of the worker), the backend
//!   payload, the size, and the workers that opened it. It is plain data, tested without
//!   processes; [`Broker`] serves it to the workers.
//! - **Policy.** [`may_open`] is the one place that decides whether a worker may open
//!   another's export: a connection of the *same configured zone* (same zone name, same
//!   peer uid on the local transport — two processes of one tenant) or of a zone that
//!   shares a configured `[[sharing_group]]` with the exporter; anything else is
//!   `CUDA_ERROR_NOT_PERMITTED`. Opening a handle in the worker that exported it
//!   is `CUDA_ERROR_INVALID_CONTEXT`, as CUDA refuses an open in the exporting process.
//! - **Channel.** At spawn the daemon makes a socket pair and the worker inherits its end
//!   under the fd number named by `--broker-fd` ([`inherited_stream`]); nothing else
//!   holds it, so no guest can reach the broker. The daemon knows which worker (and so
//!   which zone and uid) is at the other end of each pair: requests carry no identity.
//!   Frames are a little-endian `u32` length (at most [`MAX_FRAME`]) and a postcard body:
//!   [`Request`]s from the worker (each answered by one [`FromBroker::Reply`] with its
//!   sequence number), and [`FromBroker::Revoked`] notices from the daemon at any time.
//! - **Revocation.** An export ends when its worker revokes it (the allocation is freed,
//!   its context destroyed, the zone torn down) or when the worker is gone (its channel
//!   closed or its process exited, whichever the daemon sees first). Every worker that
//!   opened it is sent [`FromBroker::Revoked`] before the revoking request is answered;
//!   the importing zone closes its mapping when it next handles a request
//!   ([`crate::zone::Zone::poll_ipc`]), and from then on its guest gets errors for that
//!   range, never memory that was given back.
//! - **Failure.** A worker whose channel fails (I/O error, timeout, garbled frame) shuts
//!   it down; the daemon then revokes all of that worker's exports, and the worker's IPC
//!   calls fail with `CUDA_ERROR_UNKNOWN`.

use crate::backend::{CuError, CuResult};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// The first bytes of every guest IPC handle.
pub const HANDLE_TAG: [u8; 8] = *b"VGPUIPC1";
/// Length of a guest IPC handle (`CU_IPC_HANDLE_SIZE`).
pub const HANDLE_LEN: usize = 64;
/// Longest frame on the broker channel (length prefix not included).
pub const MAX_FRAME: usize = 4096;
/// Longest backend payload the registry keeps.
pub const MAX_PAYLOAD: usize = 256;
/// Most live exports one worker may hold in the registry.
pub const MAX_EXPORTS_PER_PEER: usize = 1 << 16;
/// How long a worker waits for the daemon's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon waits for revocation notices to reach the importers' channels
/// before it answers the revoking worker anyway.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);

/// A registry entry's name: 128 random bits.
pub type Token = [u8; 16];

/// A fresh token from the operating system's random source.
pub fn random_token() -> CuResult<Token> {
    let mut token = [0u8; 16];
    getrandom::fill(&mut token).map_err(|e| {
        tracing::error!(error = %e, "no random bytes for an IPC token");
        CuError::UNKNOWN
    })?;
    Ok(token)
}

/// The 64-byte handle a guest gets for `token`.
pub fn guest_handle(token: &Token) -> Vec<u8> {
    let mut handle = vec![0u8; HANDLE_LEN];
    handle[..8].copy_from_slice(&HANDLE_TAG);
    handle[8..24].copy_from_slice(token);
    handle
}

/// The token of a guest handle: exactly [`HANDLE_LEN`] bytes, the tag, the token, zeros.
/// Anything else is `CUDA_ERROR_INVALID_VALUE`.
pub fn parse_guest_handle(handle: &[u8]) -> CuResult<Token> {
    if handle.len() != HANDLE_LEN || handle[..8] != HANDLE_TAG || handle[24..].iter().any(|&b| b != 0) {
        return Err(CuError::INVALID_VALUE);
    }
    let mut token = [0u8; 16];
    token.copy_from_slice(&handle[8..24]);
    Ok(token)
}

// ---- policy ----

/// A worker as the daemon knows it: its connection id and the zone it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The daemon's id of the connection (one worker process per connection).
    pub conn: u32,
    /// The configured zone name (`uid-N` for unlisted peers).
    pub zone: String,
    /// The guest's uid on the local transport (SO_PEERCRED).
    pub uid: u32,
    /// The configured sharing groups of its zone.
    pub groups: Vec<String>,
}

/// The IPC policy, in one place: may `opener` map memory that `exporter` exported?
///
/// Yes for another connection of the same configured zone (same zone name and same peer
/// uid: two processes of one tenant), and for a connection of another zone when both
/// zones belong to one configured `[[sharing_group]]`. Anything else is
/// `CUDA_ERROR_NOT_PERMITTED`.
pub fn may_open(exporter: &Peer, opener: &Peer) -> CuResult<()> {
    let same_zone = exporter.zone == opener.zone && exporter.uid == opener.uid;
    let shared_group = exporter.groups.iter().any(|g| opener.groups.contains(g));
    if same_zone || shared_group {
        Ok(())
    } else {
        Err(CuError::NOT_PERMITTED)
    }
}

// ---- registry ----

/// One exported allocation.
#[derive(Debug)]
struct Export {
    exporter: u32,
    payload: Vec<u8>,
    size: u64,
    /// Connections that opened it (told when it is revoked).
    importers: BTreeSet<u32>,
}

/// A revocation to tell an importer about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The importer's connection.
    pub importer: u32,
    /// The revoked token.
    pub token: Token,
}

/// The daemon's table of live workers and their exports (no I/O: see [`Broker`]).
#[derive(Debug, Default)]
pub struct Registry {
    peers: HashMap<u32, Peer>,
    exports: HashMap<Token, Export>,
    /// IPC opens decided, by the opening zone's name: (granted, refused by the policy).
    opens: std::collections::BTreeMap<String, (u64, u64)>,
    /// Refused opens not yet taken by the daemon's event log (bounded: the oldest fall off).
    refusals: std::collections::VecDeque<Refusal>,
}

/// A CUDA IPC open refused by the policy, for the daemon's event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The opening worker's connection.
    pub conn: u32,
    /// The opening zone.
    pub zone: String,
    /// The exporting zone.
    pub exporter: String,
}

/// Refusals kept until the daemon takes them.
const MAX_REFUSALS: usize = 64;

impl Registry {
    /// Records a live worker.
    pub fn add_peer(&mut self, peer: Peer) {
        self.peers.insert(peer.conn, peer);
    }

    /// Registers an export of worker `conn` under `token` (fresh from
    /// [`random_token`]). A worker that is not (or no longer) live is refused.
    pub fn export(&mut self, conn: u32, payload: Vec<u8>, size: u64, token: Token) -> CuResult<Token> {
        if !self.peers.contains_key(&conn) {
            return Err(CuError::NOT_PERMITTED);
        }
        // Size 0 is an export without memory behind it (an interprocess event).
        if payload.is_empty() || payload.len() > MAX_PAYLOAD {
            return Err(CuError::INVALID_VALUE);
        }
        if self.exports.values().filter(|e| e.exporter == conn).count() >= MAX_EXPORTS_PER_PEER {
            return Err(CuError::OUT_OF_MEMORY);
        }
        if token == [0; 16] || self.exports.contains_key(&token) {
            // 2^-128: a broken random source rather than bad luck.
            tracing::error!("IPC token collision; refusing the export");
            return Err(CuError::UNKNOWN);
        }
        self.exports.insert(token, Export { exporter: conn, payload, size, importers: BTreeSet::new() });
        Ok(token)
    }

    /// Worker `conn` opens `token`: the backend payload and size, after the checks —
    /// unknown or revoked ⇒ `INVALID_VALUE`, the exporter itself ⇒ `INVALID_CONTEXT`,
    /// refused by [`may_open`] ⇒ `NOT_PERMITTED`.
    pub fn open(&mut self, conn: u32, token: &Token) -> CuResult<(Vec<u8>, u64)> {
        let export = self.exports.get_mut(token).ok_or(CuError::INVALID_VALUE)?;
        if export.exporter == conn {
            return Err(CuError::INVALID_CONTEXT);
        }
        let opener = self.peers.get(&conn).ok_or(CuError::NOT_PERMITTED)?;
        let exporter = self.peers.get(&export.exporter).ok_or(CuError::INVALID_VALUE)?;
        let verdict = may_open(exporter, opener);
        let counts = self.opens.entry(opener.zone.clone()).or_default();
        if verdict.is_ok() {
            counts.0 += 1;
        } else {
            counts.1 += 1;
            if self.refusals.len() == MAX_REFUSALS {
                self.refusals.pop_front();
            }
            self.refusals.push_back(Refusal { conn, zone: opener.zone.clone(), exporter: exporter.zone.clone() });
        }
        verdict?;
        export.importers.insert(conn);
        Ok((export.payload.clone(), export.size))
    }

    /// The refused opens since the last call (at most the last 64).
    pub fn take_refusals(&mut self) -> Vec<Refusal> {
        self.refusals.drain(..).collect()
    }

    /// IPC opens decided so far, by the opening zone: (granted, refused by the policy).
    pub fn open_counts(&self) -> Vec<(String, u64, u64)> {
        self.opens.iter().map(|(z, (g, r))| (z.clone(), *g, *r)).collect()
    }

    /// Worker `conn` no longer maps `token` (it closed it).
    pub fn close(&mut self, conn: u32, token: &Token) {
        if let Some(export) = self.exports.get_mut(token) {
            export.importers.remove(&conn);
        }
    }

    /// Worker `conn` revokes its export `token`: the importers to tell. Only the exporter
    /// may revoke (`INVALID_VALUE` otherwise, and for an unknown token).
    pub fn revoke(&mut self, conn: u32, token: &Token) -> CuResult<Vec<Notice>> {
        match self.exports.get(token) {
            Some(e) if e.exporter == conn => {}
            _ => return Err(CuError::INVALID_VALUE),
        }
        let export = self.exports.remove(token).ok_or(CuError::INVALID_VALUE)?;
        Ok(export.importers.into_iter().map(|importer| Notice { importer, token: *token }).collect())
    }

    /// Worker `conn` is gone: every export it held is revoked (the importers to tell are
    /// returned), and it is no importer any more. Idempotent.
    pub fn remove_peer(&mut self, conn: u32) -> Vec<Notice> {
        self.peers.remove(&conn);
        let mut notices = Vec::new();
        self.exports.retain(|token, e| {
            if e.exporter == conn {
                notices.extend(e.importers.iter().map(|&importer| Notice { importer, token: *token }));
                false
            } else {
                e.importers.remove(&conn);
                true
            }
        });
        notices.retain(|n| n.importer != conn);
        notices
    }

    /// Live exports of worker `conn`.
    pub fn exports_of(&self, conn: u32) -> usize {
        self.exports.values().filter(|e| e.exporter == conn).count()
    }
}

// ---- wire ----

/// A worker's request to the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Echoed by the reply.
    pub seq: u64,
    /// What is asked.
    pub op: Op,
}

/// What a worker asks of the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Register an export: [`Outcome::Exported`].
    Export {
        /// The backend's IPC payload.
        payload: Vec<u8>,
        /// The allocation's size in bytes (0: an event).
        size: u64,
    },
    /// Open a token: [`Outcome::Opened`].
    Open {
        /// The token from the guest's handle.
        token: Token,
    },
    /// Revoke one of the worker's exports: [`Outcome::Done`] once importers are told.
    Revoke {
        /// The token.
        token: Token,
    },
    /// The worker closed its mapping of a token: [`Outcome::Done`].
    Close {
        /// The token.
        token: Token,
    },
}

/// What the broker sends a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromBroker {
    /// The answer to request `seq`.
    Reply {
        /// The request's sequence number.
        seq: u64,
        /// The result.
        outcome: Outcome,
    },
    /// A token this worker opened was revoked (sent at any time).
    Revoked {
        /// The token.
        token: Token,
    },
}

/// The result of a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The export's token.
    Exported {
        /// The token.
        token: Token,
    },
    /// The opened export's payload and size.
    Opened {
        /// The backend's IPC payload.
        payload: Vec<u8>,
        /// The allocation's size in bytes.
        size: u64,
    },
    /// Done.
    Done,
    /// Refused with this CUDA error code.
    Refused {
        /// The `CUresult`.
        code: u32,
    },
}

/// `msg` as one frame (length prefix and postcard body).
pub fn encode_frame<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 4 + MAX_FRAME];
    let len = postcard::to_slice(msg, &mut frame[4..])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("broker frame: {e}")))?
        .len();
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    frame.truncate(4 + len);
    Ok(frame)
}

/// Decodes one frame's body (no trailing bytes).
pub fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> io::Result<T> {
    match postcard::take_from_bytes(body) {
        Ok((msg, [])) => Ok(msg),
        Ok(_) => Err(io::Error::new(io::ErrorKind::InvalidData, "trailing bytes in broker frame")),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("broker frame: {e}"))),
    }
}

/// Takes the first complete frame's body out of `buf`, if there is one.
pub fn take_frame(buf: &mut Vec<u8>) -> io::Result<Option<Vec<u8>>> {
    let Some(prefix) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "broker frame too long"));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = buf[4..4 + len].to_vec();
    buf.drain(..4 + len);
    Ok(Some(body))
}

// ---- the worker's side ----

/// What a zone needs of the broker (a trait, so zones are tested without processes).
pub trait IpcBroker {
    /// Registers an export; returns its token.
    fn export(&mut self, payload: &[u8], size: u64) -> CuResult<Token>;
    /// Opens a token: the backend payload and the size.
    fn open(&mut self, token: &Token) -> CuResult<(Vec<u8>, u64)>;
    /// Revokes one of this worker's exports; returns when its importers have been told.
    /// Failures are logged (the broker revokes everything of a worker it loses).
    fn revoke(&mut self, token: &Token);
    /// This worker no longer maps `token`.
    fn close(&mut self, token: &Token);
    /// Tokens this worker opened that were revoked since the last call; `None` when the
    /// broker can no longer tell (its channel failed): every import must then be taken as
    /// revoked.
    fn revoked(&mut self) -> Option<Vec<Token>>;
}

/// The worker's end of the broker channel (synchronous, with timeouts).
#[derive(Debug)]
pub struct BrokerClient {
    /// `None` once the channel failed.
    stream: Option<UnixStream>,
    /// Bytes received and not yet taken as frames.
    rx: Vec<u8>,
    seq: u64,
    revoked: Vec<Token>,
}

impl BrokerClient {
    /// A client over the worker's end of the broker socket pair.
    pub fn new(stream: UnixStream) -> io::Result<BrokerClient> {
        stream.set_read_timeout(Some(CALL_TIMEOUT))?;
        stream.set_write_timeout(Some(CALL_TIMEOUT))?;
        Ok(BrokerClient { stream: Some(stream), rx: Vec::new(), seq: 0, revoked: Vec::new() })
    }

    /// Gives up the channel: the daemon sees it close and revokes this worker's exports.
    fn fail(&mut self, error: &io::Error) {
        tracing::error!(%error, "IPC broker channel failed; IPC is off for this zone");
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Files a received message: a notice is kept, a reply returned.
    fn file(&mut self, body: &[u8]) -> io::Result<Option<(u64, Outcome)>> {
        match decode_body::<FromBroker>(body)? {
            FromBroker::Revoked { token } => {
                self.revoked.push(token);
                Ok(None)
            }
            FromBroker::Reply { seq, outcome } => Ok(Some((seq, outcome))),
        }
    }

    /// Sends `op` and waits for its reply, filing notices that arrive first.
    fn exchange(&mut self, op: Op) -> io::Result<Outcome> {
        self.seq += 1;
        let seq = self.seq;
        let frame = encode_frame(&Request { seq, op })?;
        self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?.write_all(&frame)?;
        loop {
            while let Some(body) = take_frame(&mut self.rx)? {
                match self.file(&body)? {
                    None => {}
                    Some((s, outcome)) if s == seq => return Ok(outcome),
                    Some(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, "broker reply out of order")),
                }
            }
            let stream = self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?;
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.rx.extend_from_slice(&chunk[..n]);
        }
    }

    /// [`exchange`](Self::exchange), with a failed channel given up and a refusal as
    /// its error.
    fn call(&mut self, op: Op) -> CuResult<Outcome> {
        if self.stream.is_none() {
            return Err(CuError::UNKNOWN);
        }
        match self.exchange(op) {
            Ok(Outcome::Refused { code }) => Err(CuError::new(code)),
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                self.fail(&e);
                Err(CuError::UNKNOWN)
            }
        }
    }

    /// Reads whatever has arrived without waiting, filing notices.
    fn drain(&mut self) -> io::Result<()> {
        let Some(stream) = self.stream.as_mut() else { return Ok(()) };
        stream.set_nonblocking(true)?;
        let mut chunk = [0u8; 1024];
        let read = loop {
            match stream.read(&mut chunk) {
                Ok(0) => break Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.rx.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        read?;
        while let Some(body) = take_frame(&mut self.rx)? {
            if self.file(&body)?.is_some() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected broker reply"));
            }
        }
        Ok(())
    }
}

impl IpcBroker for BrokerClient {
    fn export(&mut self, payload: &[u8], size: u64) -> CuResult<Token> {
        match self.call(Op::Export { payload: payload.to_vec(), size })? {
            Outcome::Exported { token } => Ok(token),
            other => {
                tracing::error!(?other, "broker answered an export with something else");
                Err(CuError::UNKNOWN)
            }
        }
    }

    fn open(&mut self, token: &Token) -> CuResult<(Vec<u8>, u64)> {
        match self.call(Op::Open { token: *token })? {
            Outcome::Opened { payload, size } => Ok((payload, size)),
            other => {
                tracing::error!(?other, "broker answered an open with something else");
                Err(CuError::UNKNOWN)
            }
        }
    }

    fn revoke(&mut self, token: &Token) {
        if let Err(e) = self.call(Op::Revoke { token: *token }) {
            tracing::warn!(error = %e, "IPC revoke failed");
        }
    }

    fn close(&mut self, token: &Token) {
        if let Err(e) = self.call(Op::Close { token: *token }) {
            tracing::warn!(error = %e, "IPC close notice failed");
        }
    }

    fn revoked(&mut self) -> Option<Vec<Token>> {
        if let Err(e) = self.drain() {
            self.fail(&e);
        }
        self.stream.as_ref()?;
        Some(std::mem::take(&mut self.revoked))
    }
}

/// The worker's end of the broker channel, inherited from the daemon as fd `fd`
/// (the spec's `broker_fd`). The fd must be an open socket and not standard input, output or
/// error; the stream returned holds a close-on-exec duplicate and the inherited number is
/// closed.
pub fn inherited_stream(fd: RawFd) -> io::Result<UnixStream> {
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}"))?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is not a socket")));
    }
    Ok(UnixStream::from(inherited_fd(fd)?))
}

/// Takes ownership of descriptor `fd`, inherited from the daemon (named in the worker's
/// spec), as a close-on-exec duplicate; the inherited number is closed.
#[allow(unsafe_code)]
pub fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "an inherited fd cannot be a standard stream"));
    }
    std::fs::metadata(format!("/proc/self/fd/{fd}"))?;
    // SAFETY: `fd` is open (its /proc entry exists) and is the descriptor the daemon passed:
    // the daemon names it in our spec and nothing else in this process knows the number,
    // so this is its only owner.
    let inherited = unsafe { OwnedFd::from_raw_fd(fd) };
    // The duplicate is close-on-exec; the inherited number (which is not) is closed here.
    inherited.try_clone()
}

// ---- the daemon's side ----

/// A frame for a worker, and who wants to know when it has been written.
#[derive(Debug)]
struct Outgoing {
    frame: Vec<u8>,
    written: Option<oneshot::Sender<()>>,
}

/// The daemon's broker: the [`Registry`] and a channel to each live worker.
#[derive(Debug, Default)]
pub struct Broker {
    registry: Mutex<Registry>,
    links: Mutex<HashMap<u32, mpsc::UnboundedSender<Outgoing>>>,
}

impl Broker {
    /// An empty broker.
    pub fn new() -> Arc<Broker> {
        Arc::default()
    }

    /// The registry (for inspection; requests go through the workers' channels).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn links(&self) -> MutexGuard<'_, HashMap<u32, mpsc::UnboundedSender<Outgoing>>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves a freshly spawned worker on the daemon's end of its socket pair (needs a
    /// tokio runtime). When the channel ends, the worker's exports are revoked.
    pub fn attach(self: &Arc<Self>, peer: Peer, stream: tokio::net::UnixStream) {
        let conn = peer.conn;
        self.registry().add_peer(peer);
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        self.links().insert(conn, tx.clone());
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                if wr.write_all(&out.frame).await.is_err() {
                    break;
                }
                if let Some(done) = out.written {
                    let _ = done.send(());
                }
            }
        });
        let broker = self.clone();
        tokio::spawn(async move {
            if let Err(e) = broker.serve(conn, &mut rd, &tx).await {
                tracing::warn!(zone = conn, error = %e, "IPC broker channel failed");
            }
            broker.detach(conn).await;
        });
    }

    /// Answers one worker's requests until its channel ends.
    async fn serve(
        &self,
        conn: u32,
        rd: &mut tokio::net::unix::OwnedReadHalf,
        tx: &mpsc::UnboundedSender<Outgoing>,
    ) -> io::Result<()> {
        loop {
            let mut prefix = [0u8; 4];
            match rd.read_exact(&mut prefix).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let len = u32::from_le_bytes(prefix) as usize;
            if len > MAX_FRAME {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "broker frame too long"));
            }
            let mut body = vec![0u8; len];
            rd.read_exact(&mut body).await?;
            let req: Request = decode_body(&body)?;
            let outcome = self.handle(conn, req.op).await;
            let frame = encode_frame(&FromBroker::Reply { seq: req.seq, outcome })?;
            if tx.send(Outgoing { frame, written: None }).is_err() {
                return Ok(());
            }
        }
    }

    /// Handles one request of worker `conn`.
    pub async fn handle(&self, conn: u32, op: Op) -> Outcome {
        let refused = |e: CuError| Outcome::Refused { code: e.code() };
        match op {
            Op::Export { payload, size } => {
                let exported = random_token().and_then(|token| self.registry().export(conn, payload, size, token));
                match exported {
                    Ok(token) => {
                        tracing::debug!(zone = conn, size, "IPC export registered");
                        Outcome::Exported { token }
                    }
                    Err(e) => refused(e),
                }
            }
            Op::Open { token } => {
                let opened = self.registry().open(conn, &token);
                match opened {
                    Ok((payload, size)) => Outcome::Opened { payload, size },
                    Err(e) => {
                        tracing::debug!(zone = conn, code = e.code(), "IPC open refused");
                        refused(e)
                    }
                }
            }
            Op::Revoke { token } => {
                let revoked = self.registry().revoke(conn, &token);
                match revoked {
                    Ok(notices) => {
                        self.notify(notices).await;
                        Outcome::Done
                    }
                    Err(e) => refused(e),
                }
            }
            Op::Close { token } => {
                self.registry().close(conn, &token);
                Outcome::Done
            }
        }
    }

    /// Worker `conn` is gone (its channel ended or its process exited): revokes all its
    /// exports and tells their importers. Idempotent.
    pub async fn detach(&self, conn: u32) {
        self.links().remove(&conn);
        let notices = self.registry().remove_peer(conn);
        if !notices.is_empty() {
            tracing::info!(zone = conn, importers = notices.len(), "revoked a departed zone's IPC exports");
        }
        self.notify(notices).await;
    }

    /// Sends each importer its revocation notice and waits (at most [`NOTIFY_TIMEOUT`])
    /// until each is in that worker's channel.
    async fn notify(&self, notices: Vec<Notice>) {
        let mut pending = Vec::new();
        for n in notices {
            let Some(link) = self.links().get(&n.importer).cloned() else { continue };
            let Ok(frame) = encode_frame(&FromBroker::Revoked { token: n.token }) else { continue };
            let (written, done) = oneshot::channel();
            if link.send(Outgoing { frame, written: Some(written) }).is_ok() {
                pending.push((n.importer, done));
            }
        }
        let deadline = tokio::time::Instant::now() + NOTIFY_TIMEOUT;
        for (importer, done) in pending {
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                tracing::warn!(zone = importer, "IPC revocation notice not delivered in time");
            }
        }
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils {
    //! An in-process broker over a shared [`Registry`], for zone tests.
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// The shared state of several [`LocalBroker`]s.
    #[derive(Default)]
    pub struct Hub {
        /// The registry the brokers share.
        pub registry: Registry,
        /// Notices not yet collected, by importer.
        pub notices: HashMap<u32, Vec<Token>>,
        /// Connections whose channel "failed".
        pub lost: BTreeSet<u32>,
        next_token: u8,
    }

    /// One zone's broker connection, in-process.
    pub struct LocalBroker {
        /// The shared state.
        pub hub: Rc<RefCell<Hub>>,
        /// This zone's connection id.
        pub conn: u32,
    }

    impl LocalBroker {
        /// Registers `peer` with the hub and returns its broker.
        pub fn join(hub: &Rc<RefCell<Hub>>, peer: Peer) -> LocalBroker {
            let conn = peer.conn;
            hub.borrow_mut().registry.add_peer(peer);
            LocalBroker { hub: hub.clone(), conn }
        }
    }

    fn post(hub: &mut Hub, notices: Vec<Notice>) {
        for n in notices {
            hub.notices.entry(n.importer).or_default().push(n.token);
        }
    }

    impl IpcBroker for LocalBroker {
        fn export(&mut self, payload: &[u8], size: u64) -> CuResult<Token> {
            let mut hub = self.hub.borrow_mut();
            hub.next_token += 1;
            let token = [hub.next_token; 16];
            hub.registry.export(self.conn, payload.to_vec(), size, token)
        }
        fn open(&mut self, token: &Token) -> CuResult<(Vec<u8>, u64)> {
            self.hub.borrow_mut().registry.open(self.conn, token)
        }
        fn revoke(&mut self, token: &Token) {
            let mut hub = self.hub.borrow_mut();
            if let Ok(notices) = hub.registry.revoke(self.conn, token) {
                post(&mut hub, notices);
            }
        }
        fn close(&mut self, token: &Token) {
            self.hub.borrow_mut().registry.close(self.conn, token);
        }
        fn revoked(&mut self) -> Option<Vec<Token>> {
            let mut hub = self.hub.borrow_mut();
            if hub.lost.contains(&self.conn) {
                return None;
            }
            Some(hub.notices.remove(&self.conn).unwrap_or_default())
        }
    }

    /// Worker `conn` of the hub is gone.
    pub fn depart(hub: &Rc<RefCell<Hub>>, conn: u32) {
        let mut hub = hub.borrow_mut();
        let notices = hub.registry.remove_peer(conn);
        post(&mut hub, notices);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(conn: u32, zone: &str, uid: u32) -> Peer {
        Peer { conn, zone: zone.into(), uid, groups: Vec::new() }
    }

    fn registry(peers: &[Peer]) -> Registry {
        let mut r = Registry::default();
        for p in peers {
            r.add_peer(p.clone());
        }
        r
    }

    const T1: Token = [1; 16];
    const T2: Token = [2; 16];

    #[test]
    fn guest_handles_round_trip_and_reject_anything_else() {
        let token = random_token().unwrap();
        assert_ne!(token, random_token().unwrap());
        let h = guest_handle(&token);
        assert_eq!(h.len(), 64);
        assert_eq!(&h[..8], b"VGPUIPC1");
        assert_eq!(parse_guest_handle(&h), Ok(token));
        let mut bad_tag = h.clone();
        bad_tag[0] ^= 1;
        let mut dirty_tail = h.clone();
        dirty_tail[63] = 1;
        for bad in [&h[..63], &[h.clone(), vec![0]].concat()[..], &bad_tag, &dirty_tail, &[0u8; 64], &[]] {
            assert_eq!(parse_guest_handle(bad), Err(CuError::INVALID_VALUE));
        }
    }

    #[test]
    fn the_policy_allows_only_the_same_zone() {
        let a1 = peer(1, "tenant-a", 1000);
        assert_eq!(may_open(&a1, &peer(2, "tenant-a", 1000)), Ok(()));
        assert_eq!(may_open(&a1, &peer(3, "tenant-b", 1001)), Err(CuError::NOT_PERMITTED));
        assert_eq!(may_open(&a1, &peer(4, "tenant-b", 1000)), Err(CuError::NOT_PERMITTED));
        assert_eq!(may_open(&a1, &peer(5, "tenant-a", 1001)), Err(CuError::NOT_PERMITTED));
        // Zones of one sharing group may open each other's exports; a third zone may not.
        let in_group = |conn, zone: &str, uid, groups: &[&str]| Peer {
            conn,
            zone: zone.into(),
            uid,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        let producer = in_group(6, "producer", 2000, &["pipeline", "other-group"]);
        let consumer = in_group(7, "consumer", 2001, &["pipeline"]);
        let outsider = in_group(8, "outsider", 2002, &["unrelated"]);
        assert_eq!(may_open(&producer, &consumer), Ok(()));
        assert_eq!(may_open(&consumer, &producer), Ok(()));
        assert_eq!(may_open(&producer, &outsider), Err(CuError::NOT_PERMITTED));
        assert_eq!(may_open(&outsider, &consumer), Err(CuError::NOT_PERMITTED));
    }

    #[test]
    fn opens_are_checked_unknown_self_and_foreign() {
        let mut r = registry(&[peer(1, "a", 1000), peer(2, "a", 1000), peer(3, "b", 2000)]);
        assert_eq!(r.export(1, vec![7; 40], 4096, T1), Ok(T1));
        assert_eq!(r.open(2, &T1), Ok((vec![7; 40], 4096)));
        assert_eq!(r.open(2, &T2), Err(CuError::INVALID_VALUE), "unknown token");
        assert_eq!(r.open(1, &T1), Err(CuError::INVALID_CONTEXT), "the exporting worker itself");
        assert_eq!(r.open(3, &T1), Err(CuError::NOT_PERMITTED), "another zone");
        assert_eq!(r.open(9, &T1), Err(CuError::NOT_PERMITTED), "not a live worker");
        // The policy's decisions are counted by the opening zone (for the metrics).
        assert_eq!(r.open_counts(), vec![("a".to_owned(), 1, 0), ("b".to_owned(), 0, 1)]);
        // Exports are bounded and sane.
        assert_eq!(r.export(9, vec![1], 1, T2), Err(CuError::NOT_PERMITTED));
        assert_eq!(r.export(1, vec![], 1, T2), Err(CuError::INVALID_VALUE));
        assert_eq!(r.export(1, vec![1; MAX_PAYLOAD + 1], 1, T2), Err(CuError::INVALID_VALUE));
        assert_eq!(r.export(1, vec![1], 1, T1), Err(CuError::UNKNOWN), "a token is never reused while live");
    }

    #[test]
    fn revoking_tells_the_importers_and_ends_the_token() {
        let mut r = registry(&[peer(1, "a", 1000), peer(2, "a", 1000), peer(3, "a", 1000)]);
        r.export(1, vec![1], 64, T1).unwrap();
        r.open(2, &T1).unwrap();
        r.open(3, &T1).unwrap();
        r.close(3, &T1);
        assert_eq!(r.revoke(2, &T1), Err(CuError::INVALID_VALUE), "only the exporter revokes");
        assert_eq!(r.revoke(1, &T1), Ok(vec![Notice { importer: 2, token: T1 }]));
        assert_eq!(r.open(2, &T1), Err(CuError::INVALID_VALUE), "replayed after revocation");
        assert_eq!(r.revoke(1, &T1), Err(CuError::INVALID_VALUE));
        assert_eq!(r.exports_of(1), 0);
    }

    #[test]
    fn a_departed_worker_loses_its_exports_and_imports() {
        let mut r = registry(&[peer(1, "a", 1000), peer(2, "a", 1000)]);
        r.export(1, vec![1], 64, T1).unwrap();
        r.export(2, vec![2], 64, T2).unwrap();
        r.open(2, &T1).unwrap();
        r.open(1, &T2).unwrap();
        assert_eq!(r.remove_peer(1), vec![Notice { importer: 2, token: T1 }]);
        assert_eq!(r.open(2, &T1), Err(CuError::INVALID_VALUE), "the dead worker's export is gone");
        assert_eq!(r.revoke(2, &T2), Ok(vec![]), "the dead worker is no importer any more");
        assert!(r.remove_peer(1).is_empty(), "idempotent");
        assert_eq!(r.export(1, vec![1], 64, T1), Err(CuError::NOT_PERMITTED), "a departed worker cannot export");
    }

    #[test]
    fn frames_round_trip_and_are_bounded() {
        let req = Request { seq: 7, op: Op::Export { payload: vec![1, 2, 3], size: 4096 } };
        let mut buf = encode_frame(&req).unwrap();
        let whole = buf.clone();
        buf.truncate(whole.len() - 1);
        assert_eq!(take_frame(&mut buf).unwrap(), None, "incomplete");
        buf.push(*whole.last().unwrap());
        buf.extend_from_slice(&whole);
        let body = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!(decode_body::<Request>(&body).unwrap(), req);
        assert_eq!(buf, whole, "the second frame is left");
        let mut huge = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        assert!(take_frame(&mut huge).is_err());
        assert!(encode_frame(&Op::Export { payload: vec![0; MAX_FRAME], size: 1 }).is_err());
        let mut trailing = body.clone();
        trailing.push(0);
        assert!(decode_body::<Request>(&trailing).is_err());
    }

    /// The daemon's broker over real socket pairs: replies, notices before the revoking
    /// request is answered, and revocation when a worker's channel closes.
    #[test]
    fn broker_serves_workers_over_socket_pairs() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let broker = Broker::new();
        let client = |conn: u32| {
            let (ours, theirs) = UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let _g = rt.enter();
            broker.attach(peer(conn, "z", 1), tokio::net::UnixStream::from_std(ours).unwrap());
            theirs
        };
        let (a, b) = (client(1), client(2));
        let rt_thread = {
            let broker = broker.clone();
            std::thread::spawn(move || {
                rt.block_on(async {
                    // Run until both workers are detached.
                    while !broker.links().is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
        };
        let mut a = BrokerClient::new(a).unwrap();
        let mut b = BrokerClient::new(b).unwrap();
        let token = a.export(&[9; 40], 8192).unwrap();
        assert_eq!(b.open(&token), Ok((vec![9; 40], 8192)));
        assert_eq!(a.open(&token), Err(CuError::INVALID_CONTEXT));
        assert_eq!(b.open(&[0xee; 16]), Err(CuError::INVALID_VALUE));
        assert_eq!(b.revoked(), Some(vec![]));
        a.revoke(&token);
        // The notice is in B's channel before A's revoke returned.
        assert_eq!(b.revoked(), Some(vec![token]));
        assert_eq!(b.open(&token), Err(CuError::INVALID_VALUE));
        // A worker that goes away loses its exports; its importer is told.
        let token = a.export(&[8; 40], 64).unwrap();
        b.open(&token).unwrap();
        drop(a);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut told = Vec::new();
        while told.is_empty() && std::time::Instant::now() < deadline {
            told = b.revoked().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(told, vec![token]);
        assert_eq!(b.open(&token), Err(CuError::INVALID_VALUE));
        drop(b);
        rt_thread.join().unwrap();
        assert!(broker.registry().peers.is_empty());
    }
}
