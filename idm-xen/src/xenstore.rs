//! A client for the xenstore wire protocol (`xen/include/public/io/xs_wire.h`).
//!
//! Every message is a 16-byte header `{type, req_id, tx_id, len}` (native-endian `u32`s)
//! followed by `len <= 4096` payload bytes. Requests carry NUL-terminated strings; the
//! reply has the request's type and `req_id`, or type `ERROR` with an errno name such as
//! `"ENOENT"`. Watch events (`WATCH_EVENT`, payload `path\0token\0`) arrive whenever a
//! watched node changes, also between a request and its reply: they are queued (bounded,
//! see [`MAX_QUEUED_EVENTS`]) and handed out by [`XenStore::next_watch_event`].
//!
//! In dom0 the client talks to the daemon's unix socket; in a guest, to `/dev/xen/xenbus`,
//! where each `write` must carry one whole message, so a request is always written with a
//! single buffer. The client is generic over the byte stream, so the tests run it against
//! a fake daemon on a socket pair.
//!
//! The daemon is trusted-ish, but nothing it sends can make this code panic or allocate
//! without bound: every header is checked (length, `req_id`, type) before its payload is
//! read. A malformed reply, an I/O error or a timeout leaves the stream out of step, so
//! the client then refuses further requests with [`XsError::Broken`]; reopen it.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::sys::{poll_readable, PollResult};

/// Largest payload of one message.
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// Watch events kept while nobody collects them; beyond this the oldest are dropped.
pub const MAX_QUEUED_EVENTS: usize = 1024;
/// Where dom0's xenstored listens, in the order tried.
pub const SOCKET_PATHS: [&str; 2] = ["/run/xenstored/socket", "/var/run/xenstored/socket"];
/// The guest kernel's xenstore device.
pub const XENBUS_PATH: &str = "/dev/xen/xenbus";
/// How long a request waits for its reply by default.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Message types of `xs_wire.h` that this client uses.
mod ty {
    pub const DIRECTORY: u32 = 1;
    pub const READ: u32 = 2;
    pub const GET_PERMS: u32 = 3;
    pub const WATCH: u32 = 4;
    pub const UNWATCH: u32 = 5;
    pub const TRANSACTION_START: u32 = 6;
    pub const TRANSACTION_END: u32 = 7;
    pub const GET_DOMAIN_PATH: u32 = 10;
    pub const WRITE: u32 = 11;
    pub const MKDIR: u32 = 12;
    pub const RM: u32 = 13;
    pub const SET_PERMS: u32 = 14;
    pub const WATCH_EVENT: u32 = 15;
    pub const ERROR: u32 = 16;
}

/// `struct xsd_sockmsg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    ty: u32,
    req_id: u32,
    tx_id: u32,
    len: u32,
}

impl Header {
    const LEN: usize = 16;

    fn parse(b: &[u8; Self::LEN]) -> Header {
        let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header { ty: w(0), req_id: w(4), tx_id: w(8), len: w(12) }
    }

    fn emit(&self, out: &mut Vec<u8>) {
        for w in [self.ty, self.req_id, self.tx_id, self.len] {
            out.extend_from_slice(&w.to_ne_bytes());
        }
    }
}

/// An errno name from an `ERROR` reply, other than `EAGAIN` (see [`XsError::Again`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum XsErrno {
    /// `ENOENT`: no such node.
    NoEntry,
    /// `EACCES`: the node's permissions refuse us.
    Access,
    /// `EEXIST`.
    Exists,
    /// `EINVAL`: a malformed request or path.
    Invalid,
    /// `E2BIG`, `ENOSPC` or `EDQUOT`: a size or quota limit.
    Quota,
    /// `EBUSY`.
    Busy,
    /// Any other name the daemon sent (checked to be short and alphanumeric).
    Other(String),
}

impl XsErrno {
    fn from_name(name: &str) -> XsErrno {
        match name {
            "ENOENT" => XsErrno::NoEntry,
            "EACCES" => XsErrno::Access,
            "EEXIST" => XsErrno::Exists,
            "EINVAL" => XsErrno::Invalid,
            "E2BIG" | "ENOSPC" | "EDQUOT" => XsErrno::Quota,
            "EBUSY" => XsErrno::Busy,
            other => XsErrno::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for XsErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XsErrno::NoEntry => f.write_str("ENOENT (no such node)"),
            XsErrno::Access => f.write_str("EACCES (permission denied)"),
            XsErrno::Exists => f.write_str("EEXIST"),
            XsErrno::Invalid => f.write_str("EINVAL (invalid request)"),
            XsErrno::Quota => f.write_str("size or quota limit reached"),
            XsErrno::Busy => f.write_str("EBUSY"),
            XsErrno::Other(n) => f.write_str(n),
        }
    }
}

/// Why a xenstore operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XsError {
    /// Neither the daemon's socket nor the xenbus device could be opened.
    #[error("cannot reach xenstore ({tried}); is this a Xen domain?")]
    Unavailable {
        /// Each path tried and what happened.
        tried: String,
    },
    /// Reading or writing the connection failed.
    #[error("xenstore connection: {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The daemon refused the request.
    #[error("xenstore refused the request: {0}")]
    Daemon(XsErrno),
    /// `EAGAIN`: the transaction conflicted with another writer; retry it (a bounded
    /// number of times, see [`XenStore::transaction`]).
    #[error("xenstore transaction conflicted (EAGAIN); retry it")]
    Again,
    /// The daemon sent something malformed; the connection is now unusable.
    #[error("malformed xenstore reply: {0}")]
    Protocol(String),
    /// An earlier failure left the connection out of step; reopen it.
    #[error("xenstore connection unusable after an earlier error; reopen it")]
    Broken,
    /// No reply (or no awaited state) within the timeout.
    #[error("xenstore timed out")]
    TimedOut,
    /// The caller passed something the protocol cannot carry.
    #[error("invalid xenstore request: {0}")]
    InvalidArgument(&'static str),
    /// A node holds a value that does not parse.
    #[error("xenstore node {path} holds an unexpected value: {detail}")]
    BadValue {
        /// The node.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

impl XsError {
    /// Whether the connection is out of step after this error.
    fn breaks_stream(&self) -> bool {
        matches!(self, XsError::Io { .. } | XsError::Protocol(_) | XsError::TimedOut)
    }
}

/// Access a domain has to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `n`: none.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

/// One entry of a node's permission list. The first entry names the owner, whose access
/// is the default for every domain not listed; the owner itself can always read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perm {
    /// The domain.
    pub domid: u16,
    /// Its access.
    pub access: Access,
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = match self.access {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        };
        write!(f, "{c}{}", self.domid)
    }
}

impl FromStr for Perm {
    type Err = XsError;
    fn from_str(s: &str) -> Result<Perm, XsError> {
        let bad = || XsError::Protocol(format!("bad permission entry {s:?}"));
        let access = match s.as_bytes().first() {
            Some(b'n') => Access::None,
            Some(b'r') => Access::Read,
            Some(b'w') => Access::Write,
            Some(b'b') => Access::Both,
            _ => return Err(bad()),
        };
        let digits = &s[1..];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Perm { domid: digits.parse().map_err(|_| bad())?, access })
    }
}

/// A change reported for a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// The node that changed (the watched path or one below it).
    pub path: String,
    /// The token given to [`XenStore::watch`].
    pub token: String,
}

/// A transaction id; [`TxId::NONE`] runs a request outside any transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxId(pub u32);

impl TxId {
    /// No transaction.
    pub const NONE: TxId = TxId(0);
}

/// The two ways to reach xenstore.
#[derive(Debug)]
pub enum XsTransport {
    /// dom0: the daemon's unix socket.
    Socket(UnixStream),
    /// A guest: `/dev/xen/xenbus`.
    Device(File),
}

impl Read for XsTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            XsTransport::Socket(s) => s.read(buf),
            XsTransport::Device(f) => f.read(buf),
        }
    }
}

impl Write for XsTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            XsTransport::Socket(s) => s.write(buf),
            XsTransport::Device(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for XsTransport {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            XsTransport::Socket(s) => s.as_fd(),
            XsTransport::Device(f) => f.as_fd(),
        }
    }
}

/// A xenstore connection. Not shareable between threads: give each its own.
#[derive(Debug)]
pub struct XenStore<S = XsTransport> {
    stream: S,
    next_req: u32,
    events: VecDeque<WatchEvent>,
    dropped_events: u64,
    broken: bool,
    reply_timeout: Duration,
}

impl XenStore<XsTransport> {
    /// Connects to the daemon's socket (dom0), else opens `/dev/xen/xenbus` (a guest).
    pub fn open() -> Result<Self, XsError> {
        let mut tried = Vec::new();
        for p in SOCKET_PATHS {
            match UnixStream::connect(p) {
                Ok(s) => return Ok(Self::from_stream(XsTransport::Socket(s))),
                Err(e) => tried.push(format!("{p}: {e}")),
            }
        }
        match OpenOptions::new().read(true).write(true).open(XENBUS_PATH) {
            Ok(f) => Ok(Self::from_stream(XsTransport::Device(f))),
            Err(e) => {
                tried.push(format!("{XENBUS_PATH}: {e}"));
                Err(XsError::Unavailable { tried: tried.join("; ") })
            }
        }
    }
}

impl<S: Read + Write + AsFd> XenStore<S> {
    /// Speaks the protocol over `stream`.
    pub fn from_stream(stream: S) -> Self {
        XenStore {
            stream,
            next_req: 1,
            events: VecDeque::new(),
            dropped_events: 0,
            broken: false,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
        }
    }

    /// Sets how long a request waits for its reply.
    pub fn set_reply_timeout(&mut self, t: Duration) {
        self.reply_timeout = t;
    }

    /// Watch events dropped because more than [`MAX_QUEUED_EVENTS`] were waiting.
    pub fn dropped_watch_events(&self) -> u64 {
        self.dropped_events
    }

    /// The value of `path`, or `None` if it does not exist.
    pub fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        self.read_tx(TxId::NONE, path)
    }

    /// [`read`](Self::read) inside transaction `tx`.
    pub fn read_tx(&mut self, tx: TxId, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        match self.request(ty::READ, tx, &[path], b"") {
            Ok(v) => Ok(Some(v)),
            Err(XsError::Daemon(XsErrno::NoEntry)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The value of `path` as UTF-8 text, or `None` if it does not exist.
    pub fn read_string(&mut self, path: &str) -> Result<Option<String>, XsError> {
        match self.read(path)? {
            None => Ok(None),
            Some(v) => String::from_utf8(v)
                .map(Some)
                .map_err(|_| XsError::BadValue { path: path.into(), detail: "not UTF-8".into() }),
        }
    }

    /// Writes `value` to `path`, creating it (and its parents) if needed.
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.write_tx(TxId::NONE, path, value)
    }

    /// [`write`](Self::write) inside transaction `tx`.
    pub fn write_tx(&mut self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.request(ty::WRITE, tx, &[path], value).map(drop)
    }

    /// Creates `path` with an empty value if it does not exist.
    pub fn mkdir(&mut self, path: &str) -> Result<(), XsError> {
        self.request(ty::MKDIR, TxId::NONE, &[path], b"").map(drop)
    }

    /// Removes `path` and everything below it.
    pub fn rm(&mut self, path: &str) -> Result<(), XsError> {
        self.rm_tx(TxId::NONE, path)
    }

    /// [`rm`](Self::rm) inside transaction `tx`.
    pub fn rm_tx(&mut self, tx: TxId, path: &str) -> Result<(), XsError> {
        self.request(ty::RM, tx, &[path], b"").map(drop)
    }

    /// The names of the children of `path`.
    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        let body = self.request(ty::DIRECTORY, TxId::NONE, &[path], b"")?;
        strings(&body)
    }

    /// The permission list of `path`.
    pub fn get_perms(&mut self, path: &str) -> Result<Vec<Perm>, XsError> {
        let body = self.request(ty::GET_PERMS, TxId::NONE, &[path], b"")?;
        strings(&body)?.iter().map(|s| s.parse()).collect()
    }

    /// Replaces the permission list of `path`; `perms[0]` is the owner and the default.
    pub fn set_perms(&mut self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.set_perms_tx(TxId::NONE, path, perms)
    }

    /// [`set_perms`](Self::set_perms) inside transaction `tx`.
    pub fn set_perms_tx(&mut self, tx: TxId, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        if perms.is_empty() {
            return Err(XsError::InvalidArgument("a permission list needs at least the owner"));
        }
        let list: String = perms.iter().map(|p| format!("{p}\0")).collect();
        self.request(ty::SET_PERMS, tx, &[path], list.as_bytes()).map(drop)
    }

    /// The home path of domain `domid`, e.g. `/local/domain/5`.
    pub fn get_domain_path(&mut self, domid: u16) -> Result<String, XsError> {
        let body = self.request(ty::GET_DOMAIN_PATH, TxId::NONE, &[&domid.to_string()], b"")?;
        strings(&body)?.into_iter().next().ok_or_else(|| XsError::Protocol("empty domain path".into()))
    }

    /// In a guest: our own domain id (the relative key `domid`).
    pub fn domid(&mut self) -> Result<u16, XsError> {
        let v = self.read_string("domid")?.ok_or(XsError::Daemon(XsErrno::NoEntry))?;
        v.trim().parse().map_err(|_| XsError::BadValue { path: "domid".into(), detail: format!("{v:?}") })
    }

    /// Watches `path` and everything below it; events carry `token`. The daemon reports
    /// one event at once, so a watcher can read the current value without a race.
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        self.request(ty::WATCH, TxId::NONE, &[path, token], b"").map(drop)
    }

    /// Removes a watch set with the same `path` and `token`.
    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        self.request(ty::UNWATCH, TxId::NONE, &[path, token], b"").map(drop)
    }

    /// The next watch event, waiting up to `timeout` (`None`: forever); `Ok(None)` on
    /// timeout.
    pub fn next_watch_event(&mut self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        self.next_event_where(|_| true, timeout)
    }

    /// The next watch event carrying `token`, waiting up to `timeout`; events for other
    /// tokens that arrive meanwhile stay queued.
    pub fn next_watch_event_for(
        &mut self,
        token: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<WatchEvent>, XsError> {
        self.next_event_where(|e| e.token == token, timeout)
    }

    /// Drops queued events carrying `token` (after an unwatch, say).
    pub fn discard_watch_events(&mut self, token: &str) {
        self.events.retain(|e| e.token != token);
    }

    /// Starts a transaction.
    pub fn transaction_start(&mut self) -> Result<TxId, XsError> {
        let body = self.request(ty::TRANSACTION_START, TxId::NONE, &[""], b"")?;
        let s = strings(&body)?.into_iter().next().unwrap_or_default();
        match s.parse::<u32>() {
            Ok(id) if id != 0 => Ok(TxId(id)),
            _ => Err(XsError::Protocol(format!("bad transaction id {s:?}"))),
        }
    }

    /// Commits (`commit`) or aborts transaction `tx`; [`XsError::Again`] means it
    /// conflicted and must be redone from the start.
    pub fn transaction_end(&mut self, tx: TxId, commit: bool) -> Result<(), XsError> {
        if tx == TxId::NONE {
            return Err(XsError::InvalidArgument("no transaction to end"));
        }
        self.request(ty::TRANSACTION_END, tx, &[if commit { "T" } else { "F" }], b"").map(drop)
    }

    /// Runs `body` in a transaction and commits it, redoing it up to `attempts` times in
    /// all while the commit conflicts. An error from `body` aborts the transaction.
    pub fn transaction<T>(
        &mut self,
        attempts: u32,
        mut body: impl FnMut(&mut Self, TxId) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        for _ in 0..attempts.max(1) {
            let tx = self.transaction_start()?;
            let value = match body(self, tx) {
                Ok(v) => v,
                Err(e) => {
                    if !self.broken {
                        let _ = self.transaction_end(tx, false);
                    }
                    return Err(e);
                }
            };
            match self.transaction_end(tx, true) {
                Ok(()) => return Ok(value),
                Err(XsError::Again) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(XsError::Again)
    }

    /// Sends one request (each of `strings` NUL-terminated, then `raw`) and returns its
    /// reply's payload.
    fn request(&mut self, ty: u32, tx: TxId, strings: &[&str], raw: &[u8]) -> Result<Vec<u8>, XsError> {
        if self.broken {
            return Err(XsError::Broken);
        }
        // A NUL inside a path or token would split it on the wire.
        if strings.iter().any(|s| s.contains('\0')) {
            return Err(XsError::InvalidArgument("path or token contains a NUL byte"));
        }
        let len = strings.iter().map(|s| s.len() + 1).sum::<usize>() + raw.len();
        if len > XENSTORE_PAYLOAD_MAX {
            return Err(XsError::InvalidArgument("request payload exceeds 4096 bytes"));
        }
        let req_id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        let mut msg = Vec::with_capacity(Header::LEN + len);
        Header { ty, req_id, tx_id: tx.0, len: len as u32 }.emit(&mut msg);
        for s in strings {
            msg.extend_from_slice(s.as_bytes());
            msg.push(0);
        }
        msg.extend_from_slice(raw);
        let r = self.exchange(&msg, ty, req_id);
        if matches!(&r, Err(e) if e.breaks_stream()) {
            self.broken = true;
        }
        r
    }

    fn exchange(&mut self, msg: &[u8], ty: u32, req_id: u32) -> Result<Vec<u8>, XsError> {
        // One buffer, so the xenbus device gets the whole message in one write.
        self.stream.write_all(msg).map_err(|source| XsError::Io { context: "sending a request", source })?;
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            let (h, body) = self.read_message(deadline)?;
            if h.ty == ty::WATCH_EVENT {
                let ev = parse_event(&body)?;
                self.queue(ev);
                continue;
            }
            if h.req_id != req_id {
                return Err(XsError::Protocol(format!("reply for request {} while awaiting {req_id}", h.req_id)));
            }
            if h.ty == ty::ERROR {
                return Err(parse_error(&body)?);
            }
            if h.ty != ty {
                return Err(XsError::Protocol(format!("reply of type {} to a request of type {ty}", h.ty)));
            }
            return Ok(body);
        }
    }

    fn queue(&mut self, ev: WatchEvent) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.dropped_events += 1;
        }
        self.events.push_back(ev);
    }

    fn next_event_where(
        &mut self,
        wanted: impl Fn(&WatchEvent) -> bool,
        timeout: Option<Duration>,
    ) -> Result<Option<WatchEvent>, XsError> {
        if let Some(i) = self.events.iter().position(&wanted) {
            return Ok(self.events.remove(i));
        }
        if self.broken {
            return Err(XsError::Broken);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let r = self.read_event(left);
            match r {
                Ok(Some(ev)) if wanted(&ev) => return Ok(Some(ev)),
                Ok(Some(ev)) => self.queue(ev),
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.broken |= e.breaks_stream();
                    return Err(e);
                }
            }
        }
    }

    /// Reads one unsolicited message, which must be a watch event; `None` if nothing
    /// arrives within `timeout`.
    fn read_event(&mut self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        let io = |source| XsError::Io { context: "waiting for a watch event", source };
        match poll_readable(self.stream.as_fd(), timeout).map_err(io)? {
            PollResult::TimedOut => return Ok(None),
            PollResult::Hangup => return Err(io(io::ErrorKind::UnexpectedEof.into())),
            PollResult::Readable => {}
        }
        let (h, body) = self.read_message(Instant::now() + self.reply_timeout)?;
        if h.ty != ty::WATCH_EVENT {
            return Err(XsError::Protocol(format!("unsolicited message of type {} (request {})", h.ty, h.req_id)));
        }
        parse_event(&body).map(Some)
    }

    /// Reads one message, checking its length before reading its payload.
    fn read_message(&mut self, deadline: Instant) -> Result<(Header, Vec<u8>), XsError> {
        let mut hb = [0u8; Header::LEN];
        self.read_full(&mut hb, deadline)?;
        let h = Header::parse(&hb);
        if h.len as usize > XENSTORE_PAYLOAD_MAX {
            return Err(XsError::Protocol(format!("message of {} bytes exceeds the 4096-byte limit", h.len)));
        }
        let mut body = vec![0u8; h.len as usize];
        self.read_full(&mut body, deadline)?;
        Ok((h, body))
    }

    fn read_full(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), XsError> {
        let io = |source| XsError::Io { context: "reading a reply", source };
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match poll_readable(self.stream.as_fd(), Some(left)).map_err(io)? {
                PollResult::TimedOut => return Err(XsError::TimedOut),
                PollResult::Hangup => return Err(io(io::ErrorKind::UnexpectedEof.into())),
                PollResult::Readable => {}
            }
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => return Err(io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(())
    }
}

/// Splits a payload of NUL-terminated strings (the last NUL may be missing).
fn strings(body: &[u8]) -> Result<Vec<String>, XsError> {
    let body = body.strip_suffix(b"\0").unwrap_or(body);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|&b| b == 0)
        .map(|s| String::from_utf8(s.to_vec()).map_err(|_| XsError::Protocol("string in reply is not UTF-8".into())))
        .collect()
}

fn parse_event(body: &[u8]) -> Result<WatchEvent, XsError> {
    let mut parts = strings(body)?.into_iter();
    match (parts.next(), parts.next()) {
        (Some(path), Some(token)) => Ok(WatchEvent { path, token }),
        _ => Err(XsError::Protocol("watch event without path and token".into())),
    }
}

fn parse_error(body: &[u8]) -> Result<XsError, XsError> {
    let name = body.strip_suffix(b"\0").unwrap_or(body);
    if name.is_empty() || name.len() > 32 || !name.iter().all(|b| b.is_ascii_alphanumeric()) {
        return Err(XsError::Protocol("ERROR reply without a valid errno name".into()));
    }
    let name = std::str::from_utf8(name).unwrap_or_default();
    Ok(if name == "EAGAIN" { XsError::Again } else { XsError::Daemon(XsErrno::from_name(name)) })
}

/// A fake xenstored for tests (here and in crates that drive xenstore): an in-memory tree,
/// watches, transactions that conflict a set number of times, and paths (`/hostile/...`)
/// that make it misbehave. Permissions are stored, not enforced.
#[cfg(any(test, feature = "test-utils"))]
#[allow(clippy::unwrap_used)]
pub mod fake {
    use super::*;
    use std::collections::BTreeMap;

    /// A fake xenstored: an in-memory tree, watches, transactions that conflict a set
    /// number of times, and paths that make it misbehave.
    #[derive(Default)]
    pub struct Fake {
        /// The tree: path → value.
        pub nodes: BTreeMap<String, Vec<u8>>,
        perms: BTreeMap<String, Vec<String>>,
        watches: Vec<(String, String)>,
        /// How many transaction ends answer EAGAIN before one commits.
        pub conflicts: u32,
        /// When a watch on `.0` is set, write `.1` there afterwards (a peer moving on).
        pub advance: Option<(String, Vec<u8>)>,
    }

    fn send(s: &mut UnixStream, ty: u32, req_id: u32, body: &[u8]) {
        let mut m = Vec::new();
        Header { ty, req_id, tx_id: 0, len: body.len() as u32 }.emit(&mut m);
        m.extend_from_slice(body);
        let _ = s.write_all(&m);
    }

    fn event(s: &mut UnixStream, path: &str, token: &str) {
        send(s, ty::WATCH_EVENT, 0, format!("{path}\0{token}\0").as_bytes());
    }

    impl Fake {
        /// The fake with `n` transaction conflicts to answer first.
        pub fn with_conflicts(mut self, n: u32) -> Self {
            self.conflicts = n;
            self
        }

        fn fire(&self, s: &mut UnixStream, path: &str) {
            for (w, tok) in &self.watches {
                if path == w || path.starts_with(&format!("{w}/")) {
                    event(s, path, tok);
                }
            }
        }

        fn serve(mut self, mut s: UnixStream) {
            loop {
                let mut hb = [0u8; Header::LEN];
                if s.read_exact(&mut hb).is_err() {
                    return;
                }
                let h = Header::parse(&hb);
                let mut body = vec![0u8; h.len as usize];
                if s.read_exact(&mut body).is_err() {
                    return;
                }
                let text = String::from_utf8_lossy(&body).into_owned();
                let args: Vec<&str> = text.split('\0').collect();
                let path = args[0].to_owned();
                let (ty, id) = (h.ty, h.req_id);
                let ok = |s: &mut UnixStream| send(s, ty, id, b"OK\0");
                let err = |s: &mut UnixStream, e: &str| send(s, ty::ERROR, id, format!("{e}\0").as_bytes());
                match (ty, path.as_str()) {
                    (ty::READ, "/hostile/long") => {
                        // A header that claims more than the protocol allows, and no payload.
                        let mut m = Vec::new();
                        Header { ty, req_id: id, tx_id: 0, len: 5000 }.emit(&mut m);
                        let _ = s.write_all(&m);
                    }
                    (ty::READ, "/hostile/reqid") => send(&mut s, ty, id + 1, b"x"),
                    (ty::READ, "/hostile/type") => send(&mut s, ty::DIRECTORY, id, b"x"),
                    (ty::READ, "/hostile/errno") => send(&mut s, ty::ERROR, id, b"E\xff\x01"),
                    (ty::READ, "/hostile/event") => send(&mut s, ty::WATCH_EVENT, 0, b"no-nul-no-token"),
                    (ty::READ, "/hostile/silent") => {}
                    (ty::READ, "/hostile/close") => return,
                    (ty::READ, "/secret") => err(&mut s, "EACCES"),
                    (ty::READ, "/odd") => err(&mut s, "EWEIRD"),
                    (ty::READ, p) => {
                        if p == "/interleave" {
                            event(&mut s, "/elsewhere", "early");
                        }
                        match self.nodes.get(p) {
                            Some(v) => send(&mut s, ty, id, v),
                            None => err(&mut s, "ENOENT"),
                        }
                    }
                    (ty::WRITE, _) => {
                        let value = &body[path.len() + 1..];
                        self.nodes.insert(path.clone(), value.to_vec());
                        ok(&mut s);
                        self.fire(&mut s, &path);
                    }
                    (ty::MKDIR, _) => {
                        self.nodes.entry(path.clone()).or_default();
                        ok(&mut s);
                    }
                    (ty::RM, _) => {
                        // As in xenstored, parents of written nodes exist implicitly.
                        let below = format!("{path}/");
                        let had_children = self.nodes.keys().any(|k| k.starts_with(&below));
                        if self.nodes.remove(&path).is_none() && !had_children {
                            err(&mut s, "ENOENT");
                            continue;
                        }
                        self.nodes.retain(|k, _| !k.starts_with(&below));
                        ok(&mut s);
                    }
                    (ty::DIRECTORY, _) => {
                        let below = format!("{path}/");
                        let mut names: Vec<&str> = self
                            .nodes
                            .keys()
                            .filter_map(|k| k.strip_prefix(&below))
                            .map(|rest| rest.split('/').next().unwrap_or(rest))
                            .collect();
                        names.dedup();
                        send(&mut s, ty, id, names.iter().map(|n| format!("{n}\0")).collect::<String>().as_bytes());
                    }
                    (ty::GET_PERMS, _) => match self.perms.get(&path) {
                        Some(p) => {
                            send(&mut s, ty, id, p.iter().map(|n| format!("{n}\0")).collect::<String>().as_bytes())
                        }
                        None => send(&mut s, ty, id, b"n0\0"),
                    },
                    (ty::SET_PERMS, _) => {
                        let list = args[1..].iter().filter(|a| !a.is_empty()).map(|a| a.to_string()).collect();
                        self.perms.insert(path, list);
                        ok(&mut s);
                    }
                    (ty::GET_DOMAIN_PATH, d) => send(&mut s, ty, id, format!("/local/domain/{d}\0").as_bytes()),
                    (ty::WATCH, _) => {
                        let token = args[1].to_owned();
                        ok(&mut s);
                        event(&mut s, &path, &token);
                        self.watches.push((path.clone(), token));
                        if self.advance.as_ref().is_some_and(|(p, _)| *p == path) {
                            let (p, v) = self.advance.take().unwrap_or_default();
                            self.nodes.insert(p.clone(), v);
                            self.fire(&mut s, &p);
                        }
                    }
                    (ty::UNWATCH, _) => {
                        self.watches.retain(|(p, t)| !(p == &path && t == args[1]));
                        ok(&mut s);
                    }
                    (ty::TRANSACTION_START, _) => send(&mut s, ty, id, b"42\0"),
                    (ty::TRANSACTION_END, _) if h.tx_id != 42 => err(&mut s, "ENOENT"),
                    (ty::TRANSACTION_END, _) if self.conflicts > 0 => {
                        self.conflicts -= 1;
                        err(&mut s, "EAGAIN");
                    }
                    (ty::TRANSACTION_END, _) => ok(&mut s),
                    _ => err(&mut s, "ENOSYS"),
                }
            }
        }
    }

    /// A client connected to `fake`, served on its own thread.
    pub fn connect(fake: Fake) -> XenStore<UnixStream> {
        let (a, b) = UnixStream::pair().expect("socketpair");
        std::thread::spawn(move || fake.serve(b));
        let mut xs = XenStore::from_stream(a);
        xs.set_reply_timeout(Duration::from_secs(10));
        xs
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::fake::{connect, Fake};
    use super::*;

    #[test]
    fn read_write_mkdir_directory_rm() {
        let mut xs = connect(Fake::default());
        assert_eq!(xs.read("/a/b").unwrap(), None);
        xs.write("/a/b", b"v\0with nul").unwrap();
        assert_eq!(xs.read("/a/b").unwrap().as_deref(), Some(&b"v\0with nul"[..]));
        xs.write("/a", b"").unwrap();
        xs.write("/a/c", "ünï".as_bytes()).unwrap();
        xs.mkdir("/a/d").unwrap();
        assert_eq!(xs.read_string("/a/c").unwrap().as_deref(), Some("ünï"));
        assert_eq!(xs.directory("/a").unwrap(), ["b", "c", "d"]);
        xs.rm("/a").unwrap();
        assert_eq!(xs.directory("/a").unwrap(), Vec::<String>::new());
        assert!(matches!(xs.rm("/a"), Err(XsError::Daemon(XsErrno::NoEntry))));
        assert_eq!(xs.get_domain_path(5).unwrap(), "/local/domain/5");
    }

    #[test]
    fn error_replies_are_typed() {
        let mut xs = connect(Fake::default());
        assert!(matches!(xs.read("/secret"), Err(XsError::Daemon(XsErrno::Access))));
        assert!(matches!(xs.read("/odd"), Err(XsError::Daemon(XsErrno::Other(n))) if n == "EWEIRD"));
        // An error reply leaves the connection usable.
        xs.write("/k", b"1").unwrap();
        assert!(matches!(xs.write("bad\0path", b""), Err(XsError::InvalidArgument(_))));
        assert!(matches!(xs.write("/big", &[0u8; 4096]), Err(XsError::InvalidArgument(_))));
        assert_eq!(xs.read_string("/k").unwrap().as_deref(), Some("1"));
    }

    #[test]
    fn perms_format_parse_and_round_trip() {
        let p = |access, domid| Perm { domid, access };
        let list = [p(Access::None, 0), p(Access::Read, 5), p(Access::Both, 0), p(Access::Write, 3)];
        let text: Vec<String> = list.iter().map(|p| p.to_string()).collect();
        assert_eq!(text, ["n0", "r5", "b0", "w3"]);
        for (s, p) in text.iter().zip(list) {
            assert_eq!(s.parse::<Perm>().unwrap(), p);
        }
        for bad in ["", "x1", "r", "r-1", "r70000", "r 1", "rr"] {
            assert!(bad.parse::<Perm>().is_err(), "{bad:?}");
        }
        let mut xs = connect(Fake::default());
        xs.write("/p", b"").unwrap();
        assert_eq!(xs.get_perms("/p").unwrap(), [p(Access::None, 0)]);
        xs.set_perms("/p", &list[..2]).unwrap();
        assert_eq!(xs.get_perms("/p").unwrap(), &list[..2]);
        assert!(matches!(xs.set_perms("/p", &[]), Err(XsError::InvalidArgument(_))));
    }

    #[test]
    fn watch_events_are_queued_not_lost() {
        let mut xs = connect(Fake::default());
        xs.watch("/w", "tok").unwrap();
        // The daemon's initial event, then one per write below /w.
        let first = xs.next_watch_event(Some(Duration::from_secs(10))).unwrap().unwrap();
        assert_eq!(first, WatchEvent { path: "/w".into(), token: "tok".into() });
        xs.write("/w/x", b"1").unwrap();
        xs.write("/other", b"1").unwrap();
        // An event that arrives between a request and its reply.
        xs.write("/interleave", b"v").unwrap();
        assert_eq!(xs.read("/interleave").unwrap().as_deref(), Some(&b"v"[..]));
        let ev = xs.next_watch_event(Some(Duration::ZERO)).unwrap().unwrap();
        assert_eq!(ev, WatchEvent { path: "/w/x".into(), token: "tok".into() });
        let ev = xs.next_watch_event(Some(Duration::ZERO)).unwrap().unwrap();
        assert_eq!(ev, WatchEvent { path: "/elsewhere".into(), token: "early".into() });
        assert_eq!(xs.next_watch_event(Some(Duration::from_millis(10))).unwrap(), None);
        xs.unwatch("/w", "tok").unwrap();
        xs.write("/w/y", b"1").unwrap();
        assert_eq!(xs.next_watch_event(Some(Duration::from_millis(10))).unwrap(), None);
    }

    #[test]
    fn events_for_other_tokens_wait_their_turn() {
        let mut xs = connect(Fake::default());
        xs.watch("/a", "A").unwrap();
        xs.watch("/b", "B").unwrap();
        assert_eq!(xs.next_watch_event_for("B", None).unwrap().unwrap().token, "B");
        assert_eq!(xs.next_watch_event(None).unwrap().unwrap().token, "A");
    }

    #[test]
    fn transactions_surface_eagain_and_retry_bounded() {
        let mut xs = connect(Fake::default().with_conflicts(1));
        let tx = xs.transaction_start().unwrap();
        assert_eq!(tx, TxId(42));
        xs.write_tx(tx, "/t", b"1").unwrap();
        assert!(matches!(xs.transaction_end(tx, true), Err(XsError::Again)));
        xs.transaction_end(tx, true).unwrap();

        let mut xs = connect(Fake::default().with_conflicts(2));
        let mut runs = 0;
        let v = xs.transaction(3, |xs, tx| {
            runs += 1;
            xs.write_tx(tx, "/t", b"2").map(|_| 7)
        });
        assert_eq!((v.unwrap(), runs), (7, 3));

        let mut xs = connect(Fake::default().with_conflicts(5));
        assert!(matches!(xs.transaction(2, |_, _| Ok(())), Err(XsError::Again)));
    }

    #[test]
    fn domid_reads_the_relative_key() {
        let mut fake = Fake::default();
        fake.nodes.insert("domid".into(), b"7".to_vec());
        assert_eq!(connect(fake).domid().unwrap(), 7);
        let mut fake = Fake::default();
        fake.nodes.insert("domid".into(), b"seven".to_vec());
        assert!(matches!(connect(fake).domid(), Err(XsError::BadValue { .. })));
    }

    #[test]
    fn hostile_replies_fail_cleanly_and_break_the_connection() {
        for path in ["/hostile/long", "/hostile/reqid", "/hostile/type", "/hostile/errno", "/hostile/event"] {
            let mut xs = connect(Fake::default());
            let e = xs.read(path).unwrap_err();
            assert!(matches!(e, XsError::Protocol(_)), "{path}: {e}");
            assert!(matches!(xs.read("/x"), Err(XsError::Broken)), "{path}");
            assert!(matches!(xs.next_watch_event(None), Err(XsError::Broken)), "{path}");
        }
        let mut xs = connect(Fake::default());
        assert!(matches!(xs.read("/hostile/close"), Err(XsError::Io { .. })));
        let mut xs = connect(Fake::default());
        xs.set_reply_timeout(Duration::from_millis(20));
        assert!(matches!(xs.read("/hostile/silent"), Err(XsError::TimedOut)));
        assert!(matches!(xs.read("/x"), Err(XsError::Broken)));
    }

    #[test]
    fn garbage_stream_never_panics() {
        // Random bytes as the daemon's whole answer: any error is fine, a panic is not.
        let mut seed = 0x2545_f491_u32;
        for _ in 0..200 {
            let (a, mut b) = UnixStream::pair().unwrap();
            let n = (seed % 64) as usize;
            let junk: Vec<u8> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed % 7) as u8 * 3 // small values make plausible types and lengths
                })
                .collect();
            b.write_all(&junk).unwrap();
            drop(b);
            let mut xs = XenStore::from_stream(a);
            let _ = xs.read("/x");
            let _ = xs.next_watch_event(Some(Duration::ZERO));
        }
    }

    #[test]
    fn open_without_xen_says_so() {
        if SOCKET_PATHS.iter().chain([&XENBUS_PATH]).any(|p| std::path::Path::new(p).exists()) {
            return;
        }
        let msg = XenStore::open().unwrap_err().to_string();
        assert!(msg.contains(XENBUS_PATH) && msg.contains("is this a Xen domain?"), "{msg}");
    }
}
