//! The request/response channel over two rings.
//!
//! # Design
//! ```text
//!   client                                   server
//!   ------                                   ------
//!   tx ring  ──── requests (seq n) ────────►  rx ring
//!   rx ring  ◄─── responses (seq n) ───────   tx ring
//!             ◄── one doorbell each way ──►
//! ```
//!
//! * **Hello first.** The client sends [`proto::Hello`](crate::wire::proto::Hello) (its version range and frame
//!   limit) under the bootstrap frame limit; the server answers [`proto::HelloAck`](crate::wire::proto::HelloAck) with
//!   the highest common version and the smaller frame limit, or a
//!   [`proto::ErrorKind::VersionMismatch`](crate::wire::proto::ErrorKind::VersionMismatch) error. From then on both receivers refuse
//!   larger frames.
//! * **Synchronous requests** carry a fresh sequence number; the client waits for the
//!   response with that number. There is one synchronous call in flight per channel, so
//!   any other frame is a protocol violation.
//! * **Asynchronous requests** ([`Flags::NO_REPLY`]) are sent without waiting. If one
//!   fails, the server records its error code ([`Server::reply_error`] does this by itself
//!   for no-reply requests) and returns it on the next response it sends, in `aux` with
//!   [`Flags::DEFERRED_ERROR`] — as CUDA reports an asynchronous failure at the next
//!   synchronising call.
//! * **Backpressure.** A full ring makes the sender wait (spin, then block on the
//!   doorbell); nothing is dropped. A policy timeout turns a peer that stopped consuming
//!   into an error instead of a hang.
//! * **Recovery.** There is none inside a channel: a ring or protocol error is sticky and
//!   the owner tears the connection down. Cancellation is dropping the channel.

use crate::notify::{wait_until, Notifier, NotifyError, WaitError, WaitPolicy, Waiter};
use crate::region::SharedMemory;
use crate::ring::{RingConsumer, RingError, RingProducer};
use crate::wire::proto::{ErrorKind, ErrorReply, Hello, HelloAck};
use crate::wire::{
    decode_body, encode_body, Flags, FrameHeader, Message, MessageId, WireError, BOOTSTRAP_MAX_FRAME, HEADER_LEN,
    MIN_PROTOCOL_VERSION, NOTICE_VERSION, PROTOCOL_VERSION,
};

/// Why a channel operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ChannelError {
    /// A ring failed (see [`RingError::is_fatal`]).
    Ring(RingError),
    /// The doorbell failed or the peer is gone.
    Notify(NotifyError),
    /// A message could not be encoded or decoded.
    Wire(WireError),
    /// The wait policy's timeout passed.
    TimedOut,
    /// A frame arrived that this side did not expect (wrong sequence, not a response).
    UnexpectedFrame {
        /// Its id.
        id: MessageId,
        /// Its sequence number.
        seq: u32,
    },
    /// The peer answered with an error.
    Remote {
        /// What kind of failure.
        kind: ErrorKind,
        /// The application's error code, for [`ErrorKind::Application`].
        code: u32,
    },
    /// The message does not fit the negotiated frame limit.
    TooLarge {
        /// Encoded length.
        len: usize,
        /// Negotiated limit.
        max: u32,
    },
}

impl core::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ChannelError::Ring(e) => write!(f, "{e}"),
            ChannelError::Notify(e) => write!(f, "{e}"),
            ChannelError::Wire(e) => write!(f, "{e}"),
            ChannelError::TimedOut => write!(f, "peer did not respond within the wait timeout"),
            ChannelError::UnexpectedFrame { id, seq } => {
                write!(f, "unexpected frame (id {:#06x}, seq {seq}); connection failed", id.0)
            }
            ChannelError::Remote { kind, code } => {
                write!(f, "peer reported {kind:?} (code {code})")
            }
            ChannelError::TooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the negotiated frame limit of {max}")
            }
        }
    }
}

impl core::error::Error for ChannelError {}

impl From<RingError> for ChannelError {
    fn from(e: RingError) -> Self {
        ChannelError::Ring(e)
    }
}
impl From<WireError> for ChannelError {
    fn from(e: WireError) -> Self {
        ChannelError::Wire(e)
    }
}
impl From<WaitError<RingError>> for ChannelError {
    fn from(e: WaitError<RingError>) -> Self {
        match e {
            WaitError::Check(e) => ChannelError::Ring(e),
            WaitError::Notify(e) => ChannelError::Notify(e),
            WaitError::TimedOut => ChannelError::TimedOut,
        }
    }
}

/// Both rings of one side plus its doorbell.
#[derive(Debug)]
pub struct Channel<M, N, W> {
    tx: RingProducer<M>,
    rx: RingConsumer<M>,
    notifier: N,
    waiter: W,
    policy: WaitPolicy,
}

impl<M: SharedMemory, N: Notifier, W: Waiter> Channel<M, N, W> {
    /// Assembles a channel from its rings and doorbell.
    pub fn new(tx: RingProducer<M>, rx: RingConsumer<M>, notifier: N, waiter: W, policy: WaitPolicy) -> Self {
        Channel { tx, rx, notifier, waiter, policy }
    }

    /// Takes the channel apart (to rewrap its memory or doorbell in another type, e.g. an
    /// enum over transports); [`Channel::new`] puts it back together with its state.
    pub fn into_parts(self) -> (RingProducer<M>, RingConsumer<M>, N, W, WaitPolicy) {
        (self.tx, self.rx, self.notifier, self.waiter, self.policy)
    }

    /// The wait policy.
    pub fn policy_mut(&mut self) -> &mut WaitPolicy {
        &mut self.policy
    }

    /// The largest body the receive side accepts.
    pub fn max_frame(&self) -> u32 {
        self.rx.max_frame()
    }

    /// The receive ring's index of the next frame (diagnostics; tests that play a hostile
    /// peer use it to forge a frame exactly where this side will look).
    pub fn rx_index(&self) -> u32 {
        self.rx.index()
    }

    /// The sticky ring failure, if any.
    pub fn failure(&self) -> Option<RingError> {
        self.tx.failure().or(self.rx.failure())
    }

    fn notify(&self) -> Result<(), ChannelError> {
        self.notifier.notify().map_err(ChannelError::Notify)
    }

    /// Rings the peer's doorbell unconditionally (e.g. after writing to shared memory
    /// outside the ring protocol; spurious notifications are harmless).
    pub fn notify_peer(&self) -> Result<(), ChannelError> {
        self.notify()
    }

    /// Sends one frame, waiting for space while the ring is full.
    pub fn send_frame(&mut self, header: &FrameHeader, body: &[u8]) -> Result<(), ChannelError> {
        loop {
            if let Some(sent) = self.tx.try_send(header, body)? {
                if sent.notify {
                    self.notify()?;
                }
                return Ok(());
            }
            let need = crate::ring::frame_slots(body.len());
            let tx = &mut self.tx;
            let cell = core::cell::RefCell::new(tx);
            wait_until(
                &self.waiter,
                &self.policy,
                || cell.borrow_mut().free_slots().map(|f| f >= need),
                || cell.borrow().request_space_notify(),
            )?;
        }
    }

    /// Receives one frame if one is ready; the body is `buf[..header.len]`.
    pub fn try_recv_frame(&mut self, buf: &mut [u8]) -> Result<Option<FrameHeader>, ChannelError> {
        match self.rx.try_recv(buf)? {
            Some(r) => {
                if r.notify {
                    self.notify()?;
                }
                Ok(Some(r.header))
            }
            None => Ok(None),
        }
    }

    /// Receives one frame, spinning then blocking until one arrives.
    pub fn recv_frame(&mut self, buf: &mut [u8]) -> Result<FrameHeader, ChannelError> {
        loop {
            if let Some(h) = self.try_recv_frame(buf)? {
                return Ok(h);
            }
            let cell = core::cell::RefCell::new(&mut self.rx);
            wait_until(&self.waiter, &self.policy, || cell.borrow().ready(), || cell.borrow().request_data_notify())?;
        }
    }

    fn send_message<T: Message>(
        &mut self,
        msg: &T,
        flags: Flags,
        seq: u32,
        aux: u32,
        scratch: &mut [u8],
        max: u32,
    ) -> Result<(), ChannelError> {
        let body = encode_body(msg, scratch)?;
        if body.len() > max as usize {
            return Err(ChannelError::TooLarge { len: body.len(), max });
        }
        let header = FrameHeader { len: body.len() as u32, id: T::ID, flags, seq, aux };
        self.send_frame(&header, body)
    }
}

/// A response, borrowed from the caller's buffer.
#[derive(Debug)]
pub struct Reply<'b> {
    header: FrameHeader,
    body: &'b [u8],
}

impl<'b> Reply<'b> {
    /// The error code of an earlier asynchronous request that failed, reported now.
    pub fn deferred_error(&self) -> Option<u32> {
        self.header.flags.contains(Flags::DEFERRED_ERROR).then_some(self.header.aux)
    }

    /// Whether the server holds something for the client to fetch ([`Flags::NOTICE`]).
    pub fn notice(&self) -> bool {
        self.header.flags.contains(Flags::NOTICE)
    }

    /// The raw body.
    pub fn body(&self) -> &'b [u8] {
        self.body
    }

    /// The response header.
    pub fn header(&self) -> &FrameHeader {
        &self.header
    }

    /// Decodes the response as `T`, or returns the peer's error.
    pub fn decode<T: Message>(&self) -> Result<T, ChannelError> {
        if self.header.flags.contains(Flags::ERROR) {
            let e = decode_body::<ErrorReply>(self.body)?;
            return Err(ChannelError::Remote { kind: e.kind, code: e.code });
        }
        if self.header.id != T::ID {
            return Err(ChannelError::UnexpectedFrame { id: self.header.id, seq: self.header.seq });
        }
        Ok(decode_body::<T>(self.body)?)
    }
}

/// The requesting side.
#[derive(Debug)]
pub struct Client<M, N, W> {
    ch: Channel<M, N, W>,
    next_seq: u32,
    version: u16,
}

impl<M: SharedMemory, N: Notifier, W: Waiter> Client<M, N, W> {
    /// Runs the hello exchange and returns a connected client. `max_frame` is the largest
    /// body this side wants; the result is the smaller of both sides' limits. `buf` must
    /// hold at least [`BOOTSTRAP_MAX_FRAME`] bytes.
    pub fn connect(mut ch: Channel<M, N, W>, max_frame: u32, buf: &mut [u8]) -> Result<Self, ChannelError> {
        ch.rx.set_max_frame(BOOTSTRAP_MAX_FRAME);
        let hello = Hello { min_version: MIN_PROTOCOL_VERSION, max_version: PROTOCOL_VERSION, max_frame };
        ch.send_message(&hello, Flags::empty(), 0, 0, buf, BOOTSTRAP_MAX_FRAME)?;
        let header = ch.recv_frame(buf)?;
        if header.seq != 0 || !header.flags.contains(Flags::RESPONSE) {
            return Err(ChannelError::UnexpectedFrame { id: header.id, seq: header.seq });
        }
        let ack: HelloAck = Reply { header, body: &buf[..header.len as usize] }.decode()?;
        let known = (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&ack.version);
        if !known || ack.max_frame > max_frame || ack.max_frame == 0 {
            return Err(ChannelError::Remote { kind: ErrorKind::VersionMismatch, code: 0 });
        }
        ch.rx.set_max_frame(ack.max_frame);
        Ok(Client { ch, next_seq: 1, version: ack.version })
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The negotiated frame limit.
    pub fn max_frame(&self) -> u32 {
        self.ch.max_frame()
    }

    /// The underlying channel.
    pub fn channel_mut(&mut self) -> &mut Channel<M, N, W> {
        &mut self.ch
    }

    fn take_seq(&mut self) -> u32 {
        let s = self.next_seq;
        // Zero is the hello's sequence number; skip it on wrap-around.
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        s
    }

    /// Sends a synchronous request and waits for its response, which is received into
    /// `buf` (also used to encode the request).
    pub fn call<'b, T: Message>(&mut self, req: &T, buf: &'b mut [u8]) -> Result<Reply<'b>, ChannelError> {
        let seq = self.take_seq();
        let max = self.ch.max_frame();
        self.ch.send_message(req, Flags::empty(), seq, 0, buf, max)?;
        let header = self.ch.recv_frame(buf)?;
        if header.seq != seq || !header.flags.contains(Flags::RESPONSE) {
            return Err(ChannelError::UnexpectedFrame { id: header.id, seq: header.seq });
        }
        Ok(Reply { header, body: &buf[..header.len as usize] })
    }

    /// Sends an asynchronous request: no reply; a failure is reported by the next
    /// response as [`Reply::deferred_error`].
    pub fn post<T: Message>(&mut self, req: &T, scratch: &mut [u8]) -> Result<(), ChannelError> {
        let seq = self.take_seq();
        let max = self.ch.max_frame();
        self.ch.send_message(req, Flags::NO_REPLY, seq, 0, scratch, max)
    }
}

/// A request, borrowed from the server's receive buffer.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'b> {
    /// Message id (possibly unknown to the server: answer with
    /// [`ErrorKind::UnknownMessage`]).
    pub id: MessageId,
    /// Sequence number.
    pub seq: u32,
    /// Whether the client waits for a reply.
    pub no_reply: bool,
    /// The body, a private copy.
    pub body: &'b [u8],
}

/// The serving side.
#[derive(Debug)]
pub struct Server<M, N, W> {
    ch: Channel<M, N, W>,
    deferred: Option<u32>,
    notice: bool,
    version: u16,
}

impl<M: SharedMemory, N: Notifier, W: Waiter> Server<M, N, W> {
    /// Waits for the client's hello and answers it. `max_frame` is this side's limit.
    pub fn accept(mut ch: Channel<M, N, W>, max_frame: u32, buf: &mut [u8]) -> Result<Self, ChannelError> {
        ch.rx.set_max_frame(BOOTSTRAP_MAX_FRAME);
        let header = ch.recv_frame(buf)?;
        if header.id != Hello::ID || header.flags != Flags::empty() || header.seq != 0 {
            return Err(ChannelError::UnexpectedFrame { id: header.id, seq: header.seq });
        }
        let hello = decode_body::<Hello>(&buf[..header.len as usize])?;
        let resp = Flags::RESPONSE;
        // The newest version both speak.
        let version = hello.max_version.min(PROTOCOL_VERSION);
        if version < hello.min_version.max(MIN_PROTOCOL_VERSION) {
            let e = ErrorReply { kind: ErrorKind::VersionMismatch, request_id: Hello::ID, code: 0 };
            ch.send_message(&e, resp.with(Flags::ERROR), 0, 0, buf, BOOTSTRAP_MAX_FRAME)?;
            return Err(ChannelError::Remote { kind: ErrorKind::VersionMismatch, code: 0 });
        }
        // The frame limit is the smaller of both sides' and what the rings can carry.
        let ring_limit = (ch.tx.capacity().min(ch.rx_capacity()) - HEADER_LEN) as u32;
        let negotiated = hello.max_frame.min(max_frame).min(ring_limit);
        let ack = HelloAck { version, max_frame: negotiated };
        ch.send_message(&ack, resp, 0, 0, buf, BOOTSTRAP_MAX_FRAME)?;
        ch.rx.set_max_frame(negotiated);
        Ok(Server { ch, deferred: None, notice: false, version })
    }

    /// The negotiated frame limit.
    pub fn max_frame(&self) -> u32 {
        self.ch.max_frame()
    }

    /// The underlying channel.
    pub fn channel_mut(&mut self) -> &mut Channel<M, N, W> {
        &mut self.ch
    }

    fn incoming<'b>(header: FrameHeader, buf: &'b [u8]) -> Result<Incoming<'b>, ChannelError> {
        if header.flags.contains(Flags::RESPONSE) || header.flags.contains(Flags::ERROR) {
            return Err(ChannelError::UnexpectedFrame { id: header.id, seq: header.seq });
        }
        Ok(Incoming {
            id: header.id,
            seq: header.seq,
            no_reply: header.flags.contains(Flags::NO_REPLY),
            body: &buf[..header.len as usize],
        })
    }

    /// Waits for the next request.
    pub fn recv<'b>(&mut self, buf: &'b mut [u8]) -> Result<Incoming<'b>, ChannelError> {
        let header = self.ch.recv_frame(buf)?;
        Self::incoming(header, buf)
    }

    /// Takes the next request if one is ready.
    pub fn try_recv<'b>(&mut self, buf: &'b mut [u8]) -> Result<Option<Incoming<'b>>, ChannelError> {
        match self.ch.try_recv_frame(buf)? {
            Some(header) => Self::incoming(header, buf).map(Some),
            None => Ok(None),
        }
    }

    /// Records an asynchronous request's failure; the first one is kept until reported.
    pub fn defer_error(&mut self, code: u32) {
        self.deferred.get_or_insert(code);
    }

    /// Marks the next response (a reply or an error) with [`Flags::NOTICE`]: the server
    /// holds something for the client to fetch. Raised once, carried once. A client of a
    /// version before [`NOTICE_VERSION`] is never told (it could not parse the flag).
    pub fn raise_notice(&mut self) {
        self.notice = self.version >= NOTICE_VERSION;
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    fn response_flags(&mut self, base: Flags) -> (Flags, u32) {
        let base = if core::mem::take(&mut self.notice) { base.with(Flags::NOTICE) } else { base };
        match self.deferred.take() {
            Some(code) => (base.with(Flags::DEFERRED_ERROR), code),
            None => (base, 0),
        }
    }

    /// Answers `req` with `msg` (nothing is sent for a no-reply request).
    pub fn reply<T: Message>(&mut self, req: &Incoming<'_>, msg: &T, scratch: &mut [u8]) -> Result<(), ChannelError> {
        if req.no_reply {
            return Ok(());
        }
        let (flags, aux) = self.response_flags(Flags::RESPONSE);
        let max = self.ch.max_frame();
        self.ch.send_message(msg, flags, req.seq, aux, scratch, max)
    }

    /// Answers `req` with an error; for a no-reply request the code is deferred to the
    /// next response instead.
    pub fn reply_error(
        &mut self,
        req: &Incoming<'_>,
        kind: ErrorKind,
        code: u32,
        scratch: &mut [u8],
    ) -> Result<(), ChannelError> {
        if req.no_reply {
            self.defer_error(code);
            return Ok(());
        }
        let (flags, aux) = self.response_flags(Flags::RESPONSE.with(Flags::ERROR));
        let e = ErrorReply { kind, request_id: req.id, code };
        let max = self.ch.max_frame();
        self.ch.send_message(&e, flags, req.seq, aux, scratch, max)
    }
}

impl<M: SharedMemory, N: Notifier, W: Waiter> Channel<M, N, W> {
    fn rx_capacity(&self) -> usize {
        self.rx.capacity()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::notify::Polling;
    use crate::region::test_utils::heap_region;
    use crate::region::{RawRegion, SubRegion};
    use crate::ring::footprint;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Add {
        a: u32,
        b: u32,
    }
    impl Message for Add {
        const ID: MessageId = MessageId(0x0100);
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sum(u32);
    impl Message for Sum {
        const ID: MessageId = MessageId(0x0101);
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Fail(u32);
    impl Message for Fail {
        const ID: MessageId = MessageId(0x0102);
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Mystery;
    impl Message for Mystery {
        const ID: MessageId = MessageId(0x0777);
    }
    crate::idm_messages! { enum Req { Add(Add), Fail(Fail) } }

    type Ch<'a> = Channel<SubRegion<&'a RawRegion>, Polling, Polling>;

    fn pair(region: &RawRegion, size: usize) -> (Ch<'_>, Ch<'_>) {
        let a = SubRegion::new(region, 0, footprint(size)).unwrap();
        let b = SubRegion::new(region, footprint(size), footprint(size)).unwrap();
        let p = WaitPolicy { spin_iters: 10, timeout: None };
        let client = Channel::new(
            RingProducer::init(a, size).unwrap(),
            RingConsumer::attach(b, size, 0).unwrap(),
            Polling,
            Polling,
            p,
        );
        let server = Channel::new(
            RingProducer::init(b, size).unwrap(),
            RingConsumer::attach(a, size, 0).unwrap(),
            Polling,
            Polling,
            p,
        );
        (client, server)
    }

    fn serve(mut server: Server<SubRegion<&RawRegion>, Polling, Polling>, requests: usize) {
        let mut buf = [0u8; 4096];
        let mut scratch = [0u8; 4096];
        for _ in 0..requests {
            let req = server.recv(&mut buf).unwrap();
            match Req::decode(req.id, req.body) {
                Ok(Req::Add(Add { a, b })) => server.reply(&req, &Sum(a + b), &mut scratch).unwrap(),
                Ok(Req::Fail(Fail(code))) => {
                    server.reply_error(&req, ErrorKind::Application, code, &mut scratch).unwrap()
                }
                Ok(Req::Unknown(id)) => {
                    assert_eq!(Req::Unknown(id).id(), Mystery::ID);
                    server.reply_error(&req, ErrorKind::UnknownMessage, 99, &mut scratch).unwrap()
                }
                Err(_) => server.reply_error(&req, ErrorKind::BadBody, 98, &mut scratch).unwrap(),
            }
        }
    }

    #[test]
    fn hello_calls_async_errors_and_unknown_ids() {
        let (_mem, region) = heap_region(2 * footprint(1024));
        let (c, s) = pair(&region, 1024);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = [0u8; 4096];
                let server = Server::accept(s, 4096, &mut buf).unwrap();
                assert_eq!(server.max_frame(), 16 * 60 - 16, "limited by the ring: 16 slots of 60 bytes");
                serve(server, 5);
            });
            let mut buf = [0u8; 4096];
            let mut client = Client::connect(c, 4096, &mut buf).unwrap();
            assert_eq!(client.max_frame(), 944);
            let r = client.call(&Add { a: 2, b: 40 }, &mut buf).unwrap();
            assert_eq!((r.decode::<Sum>().unwrap(), r.deferred_error()), (Sum(42), None));
            // An asynchronous failure surfaces at the next synchronous call, once.
            client.post(&Fail(7), &mut buf).unwrap();
            client.post(&Fail(8), &mut buf).unwrap();
            let r = client.call(&Add { a: 1, b: 1 }, &mut buf).unwrap();
            assert_eq!((r.decode::<Sum>().unwrap(), r.deferred_error()), (Sum(2), Some(7)));
            let r = client.call(&Mystery, &mut buf).unwrap();
            assert_eq!(r.decode::<Sum>(), Err(ChannelError::Remote { kind: ErrorKind::UnknownMessage, code: 99 }));
            assert_eq!(r.deferred_error(), None);
        });
    }

    #[test]
    fn a_raised_notice_rides_on_the_next_response_once() {
        let (_mem, region) = heap_region(2 * footprint(1024));
        let (c, s) = pair(&region, 1024);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = [0u8; 4096];
                let mut scratch = [0u8; 4096];
                let mut server = Server::accept(s, 4096, &mut buf).unwrap();
                for i in 0..4 {
                    let req = server.recv(&mut buf).unwrap();
                    let Ok(Req::Add(Add { a, b })) = Req::decode(req.id, req.body) else { panic!("unexpected") };
                    if i == 1 || i == 2 {
                        server.raise_notice();
                    }
                    if i == 2 {
                        server.reply_error(&req, ErrorKind::Application, 5, &mut scratch).unwrap();
                    } else {
                        server.reply(&req, &Sum(a + b), &mut scratch).unwrap();
                    }
                }
            });
            let mut buf = [0u8; 4096];
            let mut client = Client::connect(c, 4096, &mut buf).unwrap();
            let notices = [(); 4].map(|()| client.call(&Add { a: 1, b: 2 }, &mut buf).unwrap().notice());
            assert_eq!(notices, [false, true, true, false], "on replies and errors alike, once each");
        });
    }

    #[test]
    fn a_version_1_client_is_served_and_never_sent_a_notice() {
        let (_mem, region) = heap_region(2 * footprint(1024));
        let (mut c, s) = pair(&region, 1024);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = [0u8; 4096];
                let mut scratch = [0u8; 4096];
                let mut server = Server::accept(s, 4096, &mut buf).unwrap();
                assert_eq!(server.version(), 1);
                let req = server.recv(&mut buf).unwrap();
                server.raise_notice();
                server.reply(&req, &Sum(3), &mut scratch).unwrap();
            });
            // What a client built before version 2 sends, and what it expects back.
            let mut buf = [0u8; 4096];
            c.rx.set_max_frame(BOOTSTRAP_MAX_FRAME);
            let hello = Hello { min_version: 1, max_version: 1, max_frame: 512 };
            c.send_message(&hello, Flags::empty(), 0, 0, &mut buf, BOOTSTRAP_MAX_FRAME).unwrap();
            let h = c.recv_frame(&mut buf).unwrap();
            let ack: HelloAck = Reply { header: h, body: &buf[..h.len as usize] }.decode().unwrap();
            assert_eq!(ack.version, 1);
            c.rx.set_max_frame(ack.max_frame);
            c.send_message(&Add { a: 1, b: 2 }, Flags::empty(), 1, 0, &mut buf, ack.max_frame).unwrap();
            let h = c.recv_frame(&mut buf).unwrap();
            assert_eq!(h.flags, Flags::RESPONSE, "no NOTICE bit for a version-1 client");
        });
    }

    #[test]
    fn backpressure_never_drops_async_requests() {
        // A 128-byte ring holds only a few frames: the client must wait for the server.
        let (_mem, region) = heap_region(2 * footprint(128));
        let (c, s) = pair(&region, 128);
        const N: u32 = 500;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = [0u8; 256];
                let mut server = Server::accept(s, 112, &mut buf).unwrap();
                let mut scratch = [0u8; 256];
                let mut total = 0u64;
                for _ in 0..N {
                    let req = server.recv(&mut buf).unwrap();
                    let Ok(Req::Add(add)) = Req::decode(req.id, req.body) else { panic!("bad request") };
                    total += u64::from(add.a);
                    server.reply(&req, &Sum(0), &mut scratch).unwrap();
                }
                let req = server.recv(&mut buf).unwrap();
                server.reply(&req, &Sum(total as u32), &mut scratch).unwrap();
            });
            let mut buf = [0u8; 256];
            let mut client = Client::connect(c, 112, &mut buf).unwrap();
            for i in 0..N {
                client.post(&Add { a: i, b: 0 }, &mut buf).unwrap();
            }
            let r = client.call(&Add { a: 0, b: 0 }, &mut buf).unwrap();
            assert_eq!(r.decode::<Sum>().unwrap(), Sum(N * (N - 1) / 2));
        });
    }

    #[test]
    fn version_mismatch_is_refused_clearly() {
        let (_mem, region) = heap_region(2 * footprint(512));
        let (mut c, s) = pair(&region, 512);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = [0u8; 512];
                let e = Server::accept(s, 512, &mut buf).unwrap_err();
                assert_eq!(e, ChannelError::Remote { kind: ErrorKind::VersionMismatch, code: 0 });
            });
            let mut buf = [0u8; 512];
            let hello = Hello { min_version: 9, max_version: 12, max_frame: 256 };
            c.rx.set_max_frame(BOOTSTRAP_MAX_FRAME);
            c.send_message(&hello, Flags::empty(), 0, 0, &mut buf, 256).unwrap();
            let h = c.recv_frame(&mut buf).unwrap();
            let r = Reply { header: h, body: &buf[..h.len as usize] };
            assert_eq!(r.decode::<HelloAck>(), Err(ChannelError::Remote { kind: ErrorKind::VersionMismatch, code: 0 }));
        });
    }

    #[test]
    fn oversize_request_is_refused_before_sending() {
        let (_mem, region) = heap_region(2 * footprint(512));
        let (c, s) = pair(&region, 512);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = [0u8; 512];
                let _server = Server::accept(s, 256, &mut buf).unwrap();
            });
            let mut buf = [0u8; 512];
            let mut client = Client::connect(c, 300, &mut buf).unwrap();
            assert_eq!(client.max_frame(), 256);
            #[derive(Serialize, Deserialize)]
            struct Big(heapless::Vec<u8, 400>);
            impl Message for Big {
                const ID: MessageId = MessageId(0x0200);
            }
            let big = Big(core::iter::repeat_n(7u8, 300).collect());
            let mut scratch = [0u8; 512];
            assert_eq!(client.post(&big, &mut scratch), Err(ChannelError::TooLarge { len: 302, max: 256 }));
        });
    }
}
