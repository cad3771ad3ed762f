//! Property tests for the wire format: frame headers and postcard bodies round-trip, and
//! arbitrary (hostile) bytes never panic the parsers, only produce errors.

mod common;

use common::proptest_config;
use idm_core::bulk::BulkRef;
use idm_core::idm_messages;
use idm_core::stream::{read_frame, write_frame, StreamError};
use idm_core::wire::proto::{ErrorKind, ErrorReply, Hello, HelloAck};
use idm_core::wire::{decode_body, encode_body, Flags, FrameHeader, Message, MessageId, WireError, HEADER_LEN};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

/// An application message carrying a bulk descriptor, as memcpy requests do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CopyToDevice {
    dst: u64,
    src: BulkRef,
}
impl Message for CopyToDevice {
    const ID: MessageId = MessageId(0x0100);
}

idm_messages! {
    enum Any { Hello(Hello), HelloAck(HelloAck), ErrorReply(ErrorReply), CopyToDevice(CopyToDevice) }
}

/// Every bit pattern of the four known flags.
fn flags() -> impl Strategy<Value = Flags> {
    (0u16..16).prop_map(|b| Flags::from_bits(b).expect("known bits"))
}

fn header() -> impl Strategy<Value = FrameHeader> {
    (any::<u32>(), any::<u16>(), flags(), any::<u32>(), any::<u32>())
        .prop_map(|(len, id, flags, seq, aux)| FrameHeader { len, id: MessageId(id), flags, seq, aux })
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::UnknownMessage),
        Just(ErrorKind::BadBody),
        Just(ErrorKind::VersionMismatch),
        Just(ErrorKind::Application),
    ]
}

/// Encodes `msg` into a buffer pre-filled with a pattern, checks it decodes back, that a
/// too-short buffer is an error rather than a panic, and that trailing bytes are refused.
fn check_body_round_trip<M: Message + PartialEq + core::fmt::Debug>(msg: &M) {
    let mut buf = [0xa5u8; 64];
    let body = encode_body(msg, &mut buf).expect("protocol messages fit 64 bytes");
    let len = body.len();
    assert_eq!(&decode_body::<M>(body).unwrap(), msg);
    for short in 0..len {
        let mut small = vec![0xa5u8; short];
        assert_eq!(
            encode_body(msg, &mut small),
            Err(WireError::BufferTooSmall),
            "{short}-byte buffer for a {len}-byte body"
        );
    }
    let mut trailing = buf[..len].to_vec();
    trailing.push(0);
    assert_eq!(decode_body::<M>(&trailing), Err(WireError::BadBody(M::ID)));
}

proptest! {
    #![proptest_config(proptest_config(512))]

    #[test]
    fn header_emit_then_parse_is_identity(h in header()) {
        let bytes = h.emit();
        prop_assert_eq!(FrameHeader::parse(&bytes, u32::MAX), Ok(h));
        prop_assert_eq!(FrameHeader::parse(&bytes, h.len), Ok(h));
        if h.len > 0 {
            prop_assert_eq!(
                FrameHeader::parse(&bytes, h.len - 1),
                Err(WireError::FrameTooLarge { len: h.len, max: h.len - 1 })
            );
        }
        // Bytes after the header are not the header's business.
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(&[0xa5; 7]);
        prop_assert_eq!(FrameHeader::parse(&longer, u32::MAX), Ok(h));
    }

    #[test]
    fn header_parse_of_arbitrary_bytes_is_checked(
        bytes in proptest::collection::vec(any::<u8>(), 0..40),
        max in prop_oneof![any::<u32>(), 0u32..512],
    ) {
        match FrameHeader::parse(&bytes, max) {
            Ok(h) => {
                // Accepted only when well-formed, and then nothing is lost or invented.
                prop_assert!(h.len <= max);
                prop_assert_eq!(&h.emit()[..], &bytes[..HEADER_LEN]);
            }
            Err(WireError::ShortHeader) => prop_assert!(bytes.len() < HEADER_LEN),
            Err(WireError::UnknownFlags(bits)) => {
                prop_assert_eq!(bits, u16::from_le_bytes([bytes[6], bytes[7]]));
                prop_assert!(Flags::from_bits(bits).is_none());
            }
            Err(WireError::FrameTooLarge { len, max: m }) => {
                prop_assert_eq!(len, u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
                prop_assert!(len > m && m == max);
            }
            Err(e) => prop_assert!(false, "unexpected error {:?}", e),
        }
    }

    #[test]
    fn protocol_bodies_round_trip(
        (min_version, max_version, max_frame) in (any::<u16>(), any::<u16>(), any::<u32>()),
        (version, ack_frame) in (any::<u16>(), any::<u32>()),
        (kind, request_id, code) in (error_kind(), any::<u16>(), any::<u32>()),
        (dst, offset, len) in (any::<u64>(), any::<u64>(), any::<u64>()),
    ) {
        check_body_round_trip(&Hello { min_version, max_version, max_frame });
        check_body_round_trip(&HelloAck { version, max_frame: ack_frame });
        check_body_round_trip(&ErrorReply { kind, request_id: MessageId(request_id), code });
        check_body_round_trip(&CopyToDevice { dst, src: BulkRef { offset, len } });
    }

    #[test]
    fn arbitrary_bodies_decode_or_fail_cleanly(
        body in proptest::collection::vec(any::<u8>(), 0..48),
        id in prop_oneof![0u16..4, Just(0x0100u16), any::<u16>()],
    ) {
        // Whatever decodes must re-encode to something that decodes to the same value
        // (postcard may accept non-canonical varints, so compare values, not bytes).
        fn stable<M: Message + PartialEq + core::fmt::Debug>(body: &[u8]) {
            if let Ok(m) = decode_body::<M>(body) {
                let mut buf = [0u8; 64];
                let again = encode_body(&m, &mut buf).unwrap();
                assert_eq!(decode_body::<M>(again).unwrap(), m);
            } else {
                assert_eq!(decode_body::<M>(body), Err(WireError::BadBody(M::ID)));
            }
        }
        stable::<Hello>(&body);
        stable::<HelloAck>(&body);
        stable::<ErrorReply>(&body);
        stable::<CopyToDevice>(&body);
        match Any::decode(MessageId(id), &body) {
            Ok(m) => prop_assert_eq!(m.id(), MessageId(id)),
            Err(WireError::BadBody(bad)) => prop_assert_eq!(bad, MessageId(id)),
            Err(e) => prop_assert!(false, "unexpected error {:?}", e),
        }
    }

    #[test]
    fn stream_frames_round_trip(h in header(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let h = FrameHeader { len: body.len() as u32, ..h };
        let mut wire = [0u8; HEADER_LEN + 64];
        let mut w: &mut [u8] = &mut wire;
        write_frame(&mut w, &h, &body).unwrap();
        let mut r: &[u8] = &wire[..HEADER_LEN + body.len()];
        let mut buf = [0u8; 64];
        prop_assert_eq!(read_frame(&mut r, &mut buf, 64).unwrap(), h);
        prop_assert_eq!(&buf[..body.len()], &body[..]);
        let end = read_frame(&mut r, &mut buf, 64);
        prop_assert!(matches!(end, Err(StreamError::Eof { clean: true })), "{:?}", end);
    }

    #[test]
    fn stream_read_of_arbitrary_bytes_never_overruns(
        bytes in proptest::collection::vec(any::<u8>(), 0..96),
        buf_len in 0usize..64,
        max in 0u32..128,
    ) {
        let mut r: &[u8] = &bytes;
        let mut buf = vec![0u8; buf_len];
        // Bounded: every successful read consumes at least a header.
        for _ in 0..bytes.len() / HEADER_LEN + 1 {
            match read_frame(&mut r, &mut buf, max) {
                Ok(h) => prop_assert!(h.len <= max && h.len as usize <= buf_len),
                Err(StreamError::BufferTooSmall { need }) => prop_assert!(need > buf_len),
                Err(_) => break,
            }
        }
    }
}
