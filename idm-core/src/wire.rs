//! The wire format: a fixed 16-byte little-endian frame header and a postcard body.
//!
//! ```text
//!  0      4      6      8          12         16            16 + len
//!  +------+------+------+----------+----------+---------------+
//!  | len  |  id  |flags |   seq    |   aux    | postcard body |
//!  +------+------+------+----------+----------+---------------+
//! ```
//!
//! * `len`   — body length in bytes (not counting the header).
//! * `id`    — the stable numeric [`MessageId`]; never a position in an enum.
//! * `flags` — [`Flags`]: response, no-reply (asynchronous request), error, deferred error,
//!   notice (the server holds something for the client to fetch).
//! * `seq`   — request sequence number; a response carries the sequence of its request.
//! * `aux`   — on a response with [`Flags::DEFERRED_ERROR`], the application error code of
//!   an earlier asynchronous request (see [`crate::channel`]); zero otherwise.
//!
//! Two levels, after smoltcp: [`RawHeader`] is the byte layout (zerocopy, little-endian
//! fields, size asserted at compile time); [`FrameHeader`] is the checked value with
//! `parse`/`emit`. Ids `0x0000..=0x00ff` are reserved for the protocol itself ([`proto`]).

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Newest protocol version spoken by this crate. Version 2 adds [`Flags::NOTICE`] on
/// responses; a version-1 peer is never sent it (its parser refuses unknown flag bits).
pub const PROTOCOL_VERSION: u16 = 2;
/// Oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The first version whose responses may carry [`Flags::NOTICE`].
pub const NOTICE_VERSION: u16 = 2;
/// Largest body accepted before the hello exchange has negotiated a limit.
pub const BOOTSTRAP_MAX_FRAME: u32 = 256;

/// A stable numeric message identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MessageId(pub u16);

impl MessageId {
    /// First id available to applications; lower ids belong to the protocol.
    pub const FIRST_APP: u16 = 0x0100;
}

/// Header flag bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Flags(u16);

impl Flags {
    /// The frame answers a request (its `seq` names the request).
    pub const RESPONSE: Flags = Flags(1 << 0);
    /// An asynchronous request: the sender does not wait for, and gets no, reply.
    pub const NO_REPLY: Flags = Flags(1 << 1);
    /// A response whose body is a [`proto::ErrorReply`] instead of the expected reply.
    pub const ERROR: Flags = Flags(1 << 2);
    /// A response that also reports an earlier asynchronous request's error in `aux`.
    pub const DEFERRED_ERROR: Flags = Flags(1 << 3);
    /// A response from a server that holds something for the client to fetch (what, and
    /// the request that fetches it, are the application's: host-proxy's device output).
    pub const NOTICE: Flags = Flags(1 << 4);
    const ALL: u16 = 0b1_1111;

    /// No flag set.
    pub const fn empty() -> Flags {
        Flags(0)
    }
    /// The raw bits.
    pub const fn bits(self) -> u16 {
        self.0
    }
    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// The union of two flag sets.
    #[must_use]
    pub const fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
    /// Checks that only known bits are set.
    pub const fn from_bits(bits: u16) -> Option<Flags> {
        if bits & !Self::ALL == 0 {
            Some(Flags(bits))
        } else {
            None
        }
    }
}

/// The header's byte layout.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    len: U32,
    id: U16,
    flags: U16,
    seq: U32,
    aux: U32,
}

/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 16;
const _: () = assert!(core::mem::size_of::<RawHeader>() == HEADER_LEN);

/// A checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FrameHeader {
    /// Body length in bytes.
    pub len: u32,
    /// Message id.
    pub id: MessageId,
    /// Flags.
    pub flags: Flags,
    /// Sequence number.
    pub seq: u32,
    /// Auxiliary word (deferred error code).
    pub aux: u32,
}

/// Why bytes could not be turned into a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum WireError {
    /// Fewer than [`HEADER_LEN`] bytes.
    ShortHeader,
    /// Flag bits this version does not know.
    UnknownFlags(u16),
    /// The body is longer than the negotiated maximum frame size.
    FrameTooLarge {
        /// Length the header claims.
        len: u32,
        /// Negotiated maximum.
        max: u32,
    },
    /// The body did not decode as the message its id names.
    BadBody(MessageId),
    /// The body did not fit in the buffer given to encode it.
    BufferTooSmall,
}

impl core::fmt::Display for WireError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            WireError::ShortHeader => write!(f, "frame shorter than its {HEADER_LEN}-byte header"),
            WireError::UnknownFlags(b) => write!(f, "frame header has unknown flag bits {b:#06x}"),
            WireError::FrameTooLarge { len, max } => {
                write!(f, "frame body of {len} bytes exceeds the negotiated maximum of {max}")
            }
            WireError::BadBody(id) => write!(f, "body of message {:#06x} does not decode", id.0),
            WireError::BufferTooSmall => write!(f, "encode buffer too small for the message"),
        }
    }
}

impl core::error::Error for WireError {}

impl FrameHeader {
    /// Parses a header from (a private copy of) its bytes, checking flags and length.
    pub fn parse(bytes: &[u8], max_frame: u32) -> Result<FrameHeader, WireError> {
        let (raw, _) = RawHeader::read_from_prefix(bytes).map_err(|_| WireError::ShortHeader)?;
        let flags = Flags::from_bits(raw.flags.get()).ok_or(WireError::UnknownFlags(raw.flags.get()))?;
        let len = raw.len.get();
        if len > max_frame {
            return Err(WireError::FrameTooLarge { len, max: max_frame });
        }
        Ok(FrameHeader { len, id: MessageId(raw.id.get()), flags, seq: raw.seq.get(), aux: raw.aux.get() })
    }

    /// Writes the header's 16 bytes.
    pub fn emit(&self) -> [u8; HEADER_LEN] {
        let raw = RawHeader {
            len: U32::new(self.len),
            id: U16::new(self.id.0),
            flags: U16::new(self.flags.bits()),
            seq: U32::new(self.seq),
            aux: U32::new(self.aux),
        };
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }
}

/// A message with a stable id and a postcard body.
pub trait Message: Serialize + DeserializeOwned {
    /// The message's stable id.
    const ID: MessageId;
}

/// Encodes `msg`'s body into `buf`, returning the used prefix.
pub fn encode_body<'b, M: Serialize>(msg: &M, buf: &'b mut [u8]) -> Result<&'b mut [u8], WireError> {
    postcard::to_slice(msg, buf).map_err(|_| WireError::BufferTooSmall)
}

/// Decodes a body that must be exactly one `M` (trailing bytes are an error).
pub fn decode_body<M: Message>(body: &[u8]) -> Result<M, WireError> {
    match postcard::take_from_bytes::<M>(body) {
        Ok((m, [])) => Ok(m),
        _ => Err(WireError::BadBody(M::ID)),
    }
}

/// Messages of the protocol itself (ids below [`MessageId::FIRST_APP`]).
pub mod proto {
    use super::{Message, MessageId};
    use serde::{Deserialize, Serialize};

    /// First message on a channel, client to server: the versions and frame size it can use.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Hello {
        /// Oldest protocol version the client speaks.
        pub min_version: u16,
        /// Newest protocol version the client speaks.
        pub max_version: u16,
        /// Largest body the client is willing to send or receive.
        pub max_frame: u32,
    }
    impl Message for Hello {
        const ID: MessageId = MessageId(0x0001);
    }

    /// The server's answer to [`Hello`]: the version and frame size both sides now use.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct HelloAck {
        /// Chosen protocol version.
        pub version: u16,
        /// Negotiated maximum body size: the smaller of both sides' limits.
        pub max_frame: u32,
    }
    impl Message for HelloAck {
        const ID: MessageId = MessageId(0x0002);
    }

    /// What went wrong with a request at the protocol level.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[cfg_attr(feature = "defmt", derive(defmt::Format))]
    #[non_exhaustive]
    pub enum ErrorKind {
        /// The receiver has no message with this id.
        UnknownMessage,
        /// The body did not decode as the message its id names.
        BadBody,
        /// No protocol version in common.
        VersionMismatch,
        /// The request was understood and failed; `code` is the application's error code.
        Application,
    }

    /// Body of a response with [`super::Flags::ERROR`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ErrorReply {
        /// The kind of failure.
        pub kind: ErrorKind,
        /// The id of the request that failed.
        pub request_id: MessageId,
        /// Application error code (for [`ErrorKind::Application`]), else 0.
        pub code: u32,
    }
    impl Message for ErrorReply {
        const ID: MessageId = MessageId(0x0003);
    }
}

/// Declares an enum of messages, each with an explicit stable id, decoded by id with an
/// explicit `Unknown` variant for ids the receiver does not know.
///
/// ```
/// use idm_core::{idm_messages, wire::{Message, MessageId}};
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// pub struct Ping { pub n: u32 }
/// impl Message for Ping { const ID: MessageId = MessageId(0x0100); }
/// idm_messages! { pub enum Request { Ping(Ping) } }
/// let m = Request::decode(MessageId(0x0100), &[7]).unwrap();
/// assert!(matches!(m, Request::Ping(Ping { n: 7 })));
/// assert!(matches!(Request::decode(MessageId(0x0999), &[]).unwrap(), Request::Unknown(MessageId(0x0999))));
/// ```
#[macro_export]
macro_rules! idm_messages {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($variant:ident($ty:ty)),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug)]
        $vis enum $name {
            $(#[allow(missing_docs)] $variant($ty),)*
            /// A message id this receiver does not know; answer it with an
            /// `ErrorKind::UnknownMessage` error reply.
            Unknown($crate::wire::MessageId),
        }
        impl $name {
            /// Decodes a body by its message id.
            pub fn decode(id: $crate::wire::MessageId, body: &[u8]) -> ::core::result::Result<Self, $crate::wire::WireError> {
                $(if id == <$ty as $crate::wire::Message>::ID {
                    return $crate::wire::decode_body::<$ty>(body).map($name::$variant);
                })*
                Ok($name::Unknown(id))
            }
            /// The message's id.
            pub fn id(&self) -> $crate::wire::MessageId {
                match self {
                    $($name::$variant(_) => <$ty as $crate::wire::Message>::ID,)*
                    $name::Unknown(id) => *id,
                }
            }
        }
        const _: () = {
            // Ids must be unique: a duplicate makes two variants indistinguishable.
            let ids = [$(<$ty as $crate::wire::Message>::ID.0),*];
            let mut i = 0;
            while i < ids.len() {
                let mut j = i + 1;
                while j < ids.len() {
                    assert!(ids[i] != ids[j], "duplicate message id");
                    j += 1;
                }
                i += 1;
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fixture_round_trip() {
        let bytes: [u8; 16] = [
            0x05, 0x00, 0x00, 0x00, // len 5
            0x01, 0x01, // id 0x0101
            0x03, 0x00, // RESPONSE | NO_REPLY
            0x2a, 0x00, 0x00, 0x00, // seq 42
            0xef, 0xbe, 0xad, 0xde, // aux
        ];
        let h = FrameHeader::parse(&bytes, 64).unwrap();
        assert_eq!(h.len, 5);
        assert_eq!(h.id, MessageId(0x0101));
        assert!(h.flags.contains(Flags::RESPONSE) && h.flags.contains(Flags::NO_REPLY));
        assert_eq!(h.seq, 42);
        assert_eq!(h.aux, 0xdead_beef);
        assert_eq!(h.emit(), bytes);
    }

    #[test]
    fn header_rejects_oversize_unknown_flags_and_short() {
        let mut bytes = FrameHeader { len: 65, id: MessageId(1), flags: Flags::empty(), seq: 0, aux: 0 }.emit();
        assert_eq!(FrameHeader::parse(&bytes, 64), Err(WireError::FrameTooLarge { len: 65, max: 64 }));
        bytes[0] = 1;
        bytes[6] = 0x20;
        assert_eq!(FrameHeader::parse(&bytes, 64), Err(WireError::UnknownFlags(0x20)));
        assert_eq!(FrameHeader::parse(&bytes[..15], 64), Err(WireError::ShortHeader));
    }

    #[test]
    fn emit_writes_every_byte() {
        // Fill with a pattern first: a field the encoder forgot would keep it.
        let h = FrameHeader { len: 0, id: MessageId(0), flags: Flags::empty(), seq: 0, aux: 0 };
        let mut buf = [0xa5u8; 16];
        buf.copy_from_slice(&h.emit());
        assert_eq!(buf, [0u8; 16]);
    }

    #[test]
    fn hello_body_fixture() {
        let hello = proto::Hello { min_version: 1, max_version: 2, max_frame: 300 };
        let mut buf = [0xa5u8; 16];
        let body = encode_body(&hello, &mut buf).unwrap();
        // postcard: varint u16 1, varint u16 2, varint u32 300 = 0xac 0x02.
        assert_eq!(body, &[0x01, 0x02, 0xac, 0x02]);
        assert_eq!(decode_body::<proto::Hello>(body).unwrap(), hello);
    }

    #[test]
    fn decode_rejects_trailing_bytes_and_garbage() {
        assert_eq!(decode_body::<proto::HelloAck>(&[1, 5, 0]), Err(WireError::BadBody(proto::HelloAck::ID)));
        assert_eq!(decode_body::<proto::ErrorReply>(&[0xff; 3]), Err(WireError::BadBody(proto::ErrorReply::ID)));
    }
}
