//! The unix-socket handshake that hands the shared region from client to server.
//!
//! ```text
//!   client                                          server
//!   ------                                          ------
//!   create + initialise region (sealed memfd)       ShmListener::bind(path)
//!   connect(path) ─────────────────────────────────► accept; SO_PEERCRED -> PeerCred
//!   Offer (24 bytes) + memfd via SCM_RIGHTS ───────► check magic, version, sizes vs limits,
//!                                                     memfd sealed and exactly the size
//!                    ◄────────────────────────────── Answer (8 bytes): accepted / reason
//!   both: channel + data window over the region; the socket stays open as the PeerWatch
//!   then the idm-core hello exchange runs over the rings (Client::connect / Server::accept)
//! ```
//!
//! Offer, little-endian: `magic u32 = "IDMS"`, `version u16`, `flags u16 = 0`,
//! `ring_size u32`, `reserved u32 = 0`, `window_size u64`. Answer: `magic u32`,
//! `status u32` (0 accepted, else a [`RefuseReason`] code).
//!
//! **Who owns what.** The client creates the region and initialises it before sending it;
//! the server trusts nothing it received until checked, and nothing in the region ever
//! (the rings check every index). The server answers a refusal with a reason code before
//! closing, so the client gets a clear error instead of a hang-up; the detailed error stays
//! in the server's log. Every read during the handshake has a timeout, so a silent client
//! cannot hold the server.
//!
//! **After the handshake** the socket carries nothing; it stays open for the life of the
//! connection so that its hang-up tells each side that the other process is gone
//! ([`PeerWatch`]). The socket's credentials identify the zone of a local client.

use crate::error::{RefuseReason, ShmError};
use crate::futex::Side;
use crate::layout::{ChannelLayout, LayoutError, ShmChannel, ShmLayout, ShmWindow};
use crate::memfd::MemfdRegion;
use crate::scm::{self, PeerCred};
use idm_core::WaitPolicy;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Magic number opening every offer and answer: "IDMS".
pub const MAGIC: u32 = u32::from_le_bytes(*b"IDMS");
/// Version of the handshake this crate speaks; it also names the layout of the shared
/// region's rings (2: idm-core's stamped 64-byte slots).
pub const HANDSHAKE_VERSION: u16 = 2;
/// How long the client waits for the server's answer.
pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Byte offsets of the offer and answer fields.
mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 6;
    pub const RING_SIZE: usize = 8;
    pub const RESERVED: usize = 12;
    pub const WINDOW_SIZE: usize = 16;
    pub const OFFER_LEN: usize = 24;

    pub const STATUS: usize = 4;
    pub const ANSWER_LEN: usize = 8;
}

/// The client's offer, as checked values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Offer {
    pub ring_size: u32,
    pub window_size: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl Offer {
    pub(crate) fn parse(b: &[u8; field::OFFER_LEN]) -> Result<Offer, ShmError> {
        let magic = u32_at(b, field::MAGIC);
        if magic != MAGIC {
            return Err(ShmError::BadMagic { found: magic });
        }
        let version = u16_at(b, field::VERSION);
        if version != HANDSHAKE_VERSION {
            return Err(ShmError::UnsupportedVersion { found: version, supported: HANDSHAKE_VERSION });
        }
        if u16_at(b, field::FLAGS) != 0 {
            return Err(ShmError::BadHeader("unknown flag bits in the offer"));
        }
        if u32_at(b, field::RESERVED) != 0 {
            return Err(ShmError::BadHeader("reserved offer field is not zero"));
        }
        Ok(Offer { ring_size: u32_at(b, field::RING_SIZE), window_size: u64_at(b, field::WINDOW_SIZE) })
    }

    pub(crate) fn emit(&self) -> [u8; field::OFFER_LEN] {
        let mut b = [0u8; field::OFFER_LEN];
        b[field::MAGIC..][..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[field::VERSION..][..2].copy_from_slice(&HANDSHAKE_VERSION.to_le_bytes());
        b[field::RING_SIZE..][..4].copy_from_slice(&self.ring_size.to_le_bytes());
        b[field::WINDOW_SIZE..][..8].copy_from_slice(&self.window_size.to_le_bytes());
        b
    }

    /// The layout the offer describes, within `limits`.
    fn layout(&self, limits: &ServerLimits) -> Result<ChannelLayout, ShmError> {
        let over = |what, requested: u64, limit: usize| {
            (requested > limit as u64).then_some(ShmError::OverLimit { what, requested, limit: limit as u64 })
        };
        if let Some(e) = over("ring", u64::from(self.ring_size), limits.max_ring_size) {
            return Err(e);
        }
        if let Some(e) = over("data window", self.window_size, limits.max_window_size) {
            return Err(e);
        }
        // Both now fit in usize (limits are usize).
        Ok(ChannelLayout::new(self.ring_size as usize, self.window_size as usize).map_err(LayoutError::from)?)
    }
}

fn answer(status: u32) -> [u8; field::ANSWER_LEN] {
    let mut b = [0u8; field::ANSWER_LEN];
    b[..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[field::STATUS..].copy_from_slice(&status.to_le_bytes());
    b
}

/// Watches the handshake socket for the peer's hang-up: the kernel closes the socket when
/// the peer process exits, however it dies. Clones share the socket.
#[derive(Clone, Debug)]
pub struct PeerWatch {
    socket: Arc<UnixStream>,
}

impl PeerWatch {
    /// Watches `socket`.
    pub fn new(socket: UnixStream) -> Self {
        PeerWatch { socket: Arc::new(socket) }
    }

    /// Whether the peer has hung up (one non-blocking `poll`, about a microsecond).
    pub fn is_gone(&self) -> bool {
        scm::hung_up(self.socket.as_fd())
    }

    /// The socket, to register with an event loop (epoll, tokio) for an immediate notice
    /// of the hang-up instead of the doorbell's periodic check.
    pub fn socket(&self) -> &UnixStream {
        &self.socket
    }
}

/// What a server accepts from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest ring data size.
    pub max_ring_size: usize,
    /// Largest data window.
    pub max_window_size: usize,
    /// How long a client may take to send its offer.
    pub handshake_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits { max_ring_size: 16 << 20, max_window_size: 1 << 30, handshake_timeout: Duration::from_secs(5) }
    }
}

/// One side of an established connection.
#[derive(Debug)]
pub struct ShmEndpoint {
    /// The channel; run the hello exchange on it next ([`idm_core::Client::connect`] or
    /// [`idm_core::Server::accept`]).
    pub channel: ShmChannel,
    /// The shared data window.
    pub window: ShmWindow,
    /// The region's geometry.
    pub layout: ChannelLayout,
    /// The whole region (for registering the data window with a driver:
    /// `region.raw().as_ptr() + layout.window_offset()`).
    pub region: MemfdRegion,
    /// The peer's credentials, recorded by the kernel at connect time.
    pub peer: PeerCred,
    /// The socket's hang-up watch (the doorbell consults it too).
    pub watch: PeerWatch,
}

fn finish(
    stream: UnixStream,
    region: MemfdRegion,
    layout: ChannelLayout,
    side: Side,
    policy: WaitPolicy,
) -> Result<ShmEndpoint, ShmError> {
    stream.set_read_timeout(None).map_err(|e| ShmError::io("clearing the handshake socket's timeout", e))?;
    let peer = scm::peer_cred(&stream).map_err(|e| ShmError::io("reading the peer's credentials (SO_PEERCRED)", e))?;
    let watch = PeerWatch::new(stream);
    let (channel, window) = match side {
        Side::Client => layout.client_side(&region, Some(watch.clone()), policy)?,
        Side::Server => layout.server_side(&region, Some(watch.clone()), policy)?,
    };
    Ok(ShmEndpoint { channel, window, layout, region, peer, watch })
}

fn map_read_error(e: io::Error, got: usize, need: usize, timeout: Duration) -> ShmError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ShmError::HandshakeTimeout(timeout),
        io::ErrorKind::UnexpectedEof => ShmError::Truncated { got, need },
        _ => ShmError::io("reading the handshake", e),
    }
}

/// Connects to the server listening at `path`, creates a region of `layout` and hands it
/// over. The caller runs the hello exchange next ([`idm_core::Client::connect`]).
pub fn connect(path: impl AsRef<Path>, layout: ChannelLayout, policy: WaitPolicy) -> Result<ShmEndpoint, ShmError> {
    let stream = UnixStream::connect(path).map_err(|e| ShmError::io("connecting to the idm-shm server socket", e))?;
    connect_stream(stream, layout, policy)
}

/// As [`connect`], over an already connected socket (e.g. one end of a `socketpair`).
pub fn connect_stream(stream: UnixStream, layout: ChannelLayout, policy: WaitPolicy) -> Result<ShmEndpoint, ShmError> {
    let timeout = CLIENT_HANDSHAKE_TIMEOUT;
    stream.set_read_timeout(Some(timeout)).map_err(|e| ShmError::io("setting the handshake socket's timeout", e))?;
    let region = layout.create_region("idm-shm")?;
    let offer = Offer { ring_size: layout.ring_size() as u32, window_size: layout.window_size() as u64 }.emit();
    let sent = scm::send_with_fd(&stream, &offer, region.fd())
        .map_err(|e| ShmError::io("sending the region to the server", e))?;
    (&stream).write_all(&offer[sent..]).map_err(|e| ShmError::io("sending the handshake offer", e))?;
    let mut ans = [0u8; field::ANSWER_LEN];
    let mut got = 0;
    while got < ans.len() {
        match (&stream).read(&mut ans[got..]) {
            Ok(0) => return Err(ShmError::Truncated { got, need: ans.len() }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(map_read_error(e, got, ans.len(), timeout)),
        }
    }
    let magic = u32_at(&ans, field::MAGIC);
    if magic != MAGIC {
        return Err(ShmError::BadMagic { found: magic });
    }
    match u32_at(&ans, field::STATUS) {
        0 => finish(stream, region, layout, Side::Client, policy),
        code => Err(ShmError::Refused(RefuseReason::from_code(code))),
    }
}

/// Listens for local clients on a unix socket.
#[derive(Debug)]
pub struct ShmListener {
    listener: UnixListener,
    limits: ServerLimits,
}

impl ShmListener {
    /// Binds `path` (which must not exist: remove a stale socket first).
    pub fn bind(path: impl AsRef<Path>, limits: ServerLimits) -> Result<Self, ShmError> {
        let listener = UnixListener::bind(path).map_err(|e| ShmError::io("binding the idm-shm server socket", e))?;
        Ok(ShmListener { listener, limits })
    }

    /// Serves on an existing listener.
    pub fn from_listener(listener: UnixListener, limits: ServerLimits) -> Self {
        ShmListener { listener, limits }
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Waits for a client and runs the handshake. A failed handshake refuses that client
    /// only; call `accept` again for the next one. The caller runs the hello exchange next
    /// ([`idm_core::Server::accept`]).
    pub fn accept(&self, policy: WaitPolicy) -> Result<ShmEndpoint, ShmError> {
        let (stream, _) =
            self.listener.accept().map_err(|e| ShmError::io("accepting on the idm-shm server socket", e))?;
        accept_stream(stream, &self.limits, policy)
    }
}

/// Runs the server's side of the handshake on a connected socket.
pub fn accept_stream(stream: UnixStream, limits: &ServerLimits, policy: WaitPolicy) -> Result<ShmEndpoint, ShmError> {
    stream
        .set_read_timeout(Some(limits.handshake_timeout))
        .map_err(|e| ShmError::io("setting the handshake socket's timeout", e))?;
    match receive_offer(&stream, limits) {
        Ok((layout, region)) => {
            (&stream).write_all(&answer(0)).map_err(|e| ShmError::io("answering the client's offer", e))?;
            finish(stream, region, layout, Side::Server, policy)
        }
        Err(e) => {
            // Best effort: the client may already be gone.
            let _ = (&stream).write_all(&answer(RefuseReason::for_error(&e).code()));
            Err(e)
        }
    }
}

/// Reads and checks the offer and its descriptor.
fn receive_offer(stream: &UnixStream, limits: &ServerLimits) -> Result<(ChannelLayout, MemfdRegion), ShmError> {
    let mut buf = [0u8; field::OFFER_LEN];
    let mut got = 0;
    let mut fd: Option<OwnedFd> = None;
    while got < buf.len() {
        let r = match scm::recv_with_fds(stream, &mut buf[got..]) {
            Ok(r) => r,
            Err(e) => return Err(map_read_error(e, got, buf.len(), limits.handshake_timeout)),
        };
        let count = r.fds.len() + usize::from(fd.is_some());
        if r.truncated || count > 1 {
            // The received descriptors are closed as `r` and `fd` drop.
            return Err(ShmError::ExtraFds { count: count.max(2) });
        }
        if let Some(f) = r.fds.into_iter().next() {
            fd = Some(f);
        }
        if r.len == 0 {
            return Err(ShmError::Truncated { got, need: buf.len() });
        }
        got += r.len;
    }
    let offer = Offer::parse(&buf)?;
    let layout = offer.layout(limits)?;
    let fd = fd.ok_or(ShmError::MissingFd)?;
    let region = MemfdRegion::from_fd(fd, layout.total_size())?;
    Ok((layout, region))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd::MemfdRegion;
    use std::os::fd::BorrowedFd;

    #[test]
    fn offer_fixture_round_trip() {
        let bytes: [u8; 24] = [
            b'I', b'D', b'M', b'S', // magic
            0x02, 0x00, // version 2
            0x00, 0x00, // flags
            0x00, 0x10, 0x00, 0x00, // ring 4096
            0x00, 0x00, 0x00, 0x00, // reserved
            0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // window 1 MiB
        ];
        let o = Offer::parse(&bytes).unwrap();
        assert_eq!(o, Offer { ring_size: 4096, window_size: 1 << 20 });
        assert_eq!(o.emit(), bytes);
        let mut bad = bytes;
        bad[6] = 1;
        assert!(matches!(Offer::parse(&bad), Err(ShmError::BadHeader(_))));
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(matches!(Offer::parse(&bad), Err(ShmError::BadMagic { .. })));
        let mut bad = bytes;
        bad[4] = 1;
        assert!(
            matches!(Offer::parse(&bad), Err(ShmError::UnsupportedVersion { found: 1, .. })),
            "the byte-ring layout"
        );
    }

    #[test]
    fn limits_and_geometry_are_enforced() {
        let limits = ServerLimits::default();
        let o = |ring_size, window_size| Offer { ring_size, window_size };
        assert!(o(4096, 0).layout(&limits).is_ok());
        assert!(matches!(o(32 << 20, 0).layout(&limits), Err(ShmError::OverLimit { what: "ring", .. })));
        assert!(matches!(o(4096, u64::MAX).layout(&limits), Err(ShmError::OverLimit { what: "data window", .. })));
        assert!(matches!(o(5000, 0).layout(&limits), Err(ShmError::Layout(_))));
    }

    /// Sends a hand-made offer and descriptor to a server thread; returns both results.
    fn hostile(
        offer: [u8; 24],
        fd: Option<&MemfdRegion>,
    ) -> (Result<ShmEndpoint, ShmError>, Result<ShmEndpoint, ShmError>) {
        let (c, s) = UnixStream::pair().unwrap();
        std::thread::scope(|scope| {
            let server = scope.spawn(move || accept_stream(s, &ServerLimits::default(), WaitPolicy::default()));
            match fd {
                Some(r) => {
                    let n = scm::send_with_fd(&c, &offer, r.fd()).unwrap();
                    (&c).write_all(&offer[n..]).unwrap();
                }
                None => (&c).write_all(&offer).unwrap(),
            }
            let mut ans = [0u8; 8];
            (&c).read_exact(&mut ans).unwrap();
            let client = match u32_at(&ans, 4) {
                0 => panic!("server accepted a hostile offer"),
                code => Err(ShmError::Refused(RefuseReason::from_code(code))),
            };
            (server.join().unwrap(), client)
        })
    }

    #[test]
    fn server_refuses_wrong_size_unsealed_and_missing_regions() {
        let layout = ChannelLayout::new(4096, 0).unwrap();
        let offer = Offer { ring_size: 4096, window_size: 0 }.emit();

        // A sealed memfd one page too small.
        let small = MemfdRegion::create("small", layout.total_size() - 4096).unwrap();
        let (server, client) = hostile(offer, Some(&small));
        assert!(matches!(server, Err(ShmError::SizeMismatch { .. })), "{server:?}");
        assert!(matches!(client, Err(ShmError::Refused(RefuseReason::Region))));

        // No descriptor at all.
        let (server, _) = hostile(offer, None);
        assert!(matches!(server, Err(ShmError::MissingFd)), "{server:?}");

        // An absurd ring size is refused before the descriptor is even looked at.
        let big = Offer { ring_size: 1 << 30, window_size: 0 }.emit();
        let (server, client) = hostile(big, Some(&small));
        assert!(matches!(server, Err(ShmError::OverLimit { .. })), "{server:?}");
        assert!(matches!(client, Err(ShmError::Refused(RefuseReason::Geometry))));
    }

    /// Sends `offer` with an arbitrary descriptor to a server thread; returns its result.
    fn offer_fd(offer: [u8; 24], fd: BorrowedFd<'_>) -> Result<ShmEndpoint, ShmError> {
        let (c, s) = UnixStream::pair().unwrap();
        std::thread::scope(|scope| {
            let server = scope.spawn(move || accept_stream(s, &ServerLimits::default(), WaitPolicy::default()));
            let n = scm::send_with_fd(&c, &offer, fd).unwrap();
            (&c).write_all(&offer[n..]).unwrap();
            server.join().unwrap()
        })
    }

    #[test]
    fn server_refuses_unsealed_memfds_and_other_descriptors() {
        let layout = ChannelLayout::new(4096, 0).unwrap();
        let offer = Offer { ring_size: 4096, window_size: 0 }.emit();
        // Right size, but the client could shrink it later.
        let unsealed = crate::memfd::unsealed_memfd(layout.total_size());
        let r = offer_fd(offer, unsealed.as_fd());
        assert!(matches!(r, Err(ShmError::NotSealed { .. })), "{r:?}");
        // Not a memfd at all.
        let (other, _keep) = UnixStream::pair().unwrap();
        let r = offer_fd(offer, other.as_fd());
        assert!(matches!(r, Err(ShmError::NotMemfd)), "{r:?}");
    }

    #[test]
    fn silent_client_times_out() {
        let (_c, s) = UnixStream::pair().unwrap();
        let limits = ServerLimits { handshake_timeout: Duration::from_millis(100), ..ServerLimits::default() };
        assert!(matches!(accept_stream(s, &limits, WaitPolicy::default()), Err(ShmError::HandshakeTimeout(_))));
    }

    #[test]
    fn handshake_over_a_socket_pair() {
        let (c, s) = UnixStream::pair().unwrap();
        let layout = ChannelLayout::new(8192, 1 << 16).unwrap();
        std::thread::scope(|scope| {
            let server =
                scope.spawn(move || accept_stream(s, &ServerLimits::default(), WaitPolicy::default()).unwrap());
            let client = connect_stream(c, layout, WaitPolicy::default()).unwrap();
            let server = server.join().unwrap();
            assert_eq!(server.layout, layout);
            assert_eq!(server.peer.pid, std::process::id() as i32);
            assert_eq!(client.peer.uid, server.peer.uid);
            let d = idm_core::BulkRef { offset: 100, len: 5 };
            client.window.write(d, b"abcde").unwrap();
            let mut out = [0u8; 5];
            server.window.read(d, &mut out).unwrap();
            assert_eq!(&out, b"abcde");
            assert!(!server.watch.is_gone());
            drop(client);
            assert!(server.watch.is_gone());
        });
    }
}
