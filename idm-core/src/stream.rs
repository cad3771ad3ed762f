//! Framing over byte streams ([`embedded_io`]), for transports that are not shared memory:
//! a serial console, or a socket during a handshake. The same header and the same checks
//! as the ring: the length is bounded by `max_frame` before a byte of body is read.

use crate::wire::{FrameHeader, WireError, HEADER_LEN};
use embedded_io::{Read, ReadExactError, Write};

/// Why a stream frame could not be read or written.
#[derive(Debug)]
#[non_exhaustive]
pub enum StreamError<E> {
    /// The stream failed.
    Io(E),
    /// The stream ended, cleanly between frames (`clean == true`) or inside one.
    Eof {
        /// Whether the end fell between frames.
        clean: bool,
    },
    /// The header was malformed or over the limit.
    Wire(WireError),
    /// The body does not fit the caller's buffer.
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
    },
}

impl<E: core::fmt::Debug> core::fmt::Display for StreamError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StreamError::Io(e) => write!(f, "stream error: {e:?}"),
            StreamError::Eof { clean: true } => write!(f, "stream closed"),
            StreamError::Eof { clean: false } => {
                write!(f, "stream closed in the middle of a frame")
            }
            StreamError::Wire(e) => write!(f, "{e}"),
            StreamError::BufferTooSmall { need } => write!(f, "frame needs a {need}-byte buffer"),
        }
    }
}

/// Writes one frame: header, then body.
pub fn write_frame<W: Write>(w: &mut W, header: &FrameHeader, body: &[u8]) -> Result<(), StreamError<W::Error>> {
    debug_assert_eq!(header.len as usize, body.len());
    w.write_all(&header.emit()).map_err(StreamError::Io)?;
    w.write_all(body).map_err(StreamError::Io)?;
    w.flush().map_err(StreamError::Io)
}

/// Reads one frame into `buf`, returning its header; the body is `buf[..header.len]`.
pub fn read_frame<R: Read>(r: &mut R, buf: &mut [u8], max_frame: u32) -> Result<FrameHeader, StreamError<R::Error>> {
    let mut raw = [0u8; HEADER_LEN];
    // A clean end of stream is a zero-length first read.
    let first = r.read(&mut raw).map_err(StreamError::Io)?;
    if first == 0 {
        return Err(StreamError::Eof { clean: true });
    }
    read_exact(r, &mut raw[first..])?;
    let header = FrameHeader::parse(&raw, max_frame).map_err(StreamError::Wire)?;
    let len = header.len as usize;
    let body = buf.get_mut(..len).ok_or(StreamError::BufferTooSmall { need: len })?;
    read_exact(r, body)?;
    Ok(header)
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), StreamError<R::Error>> {
    r.read_exact(buf).map_err(|e| match e {
        ReadExactError::UnexpectedEof => StreamError::Eof { clean: false },
        ReadExactError::Other(e) => StreamError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Flags, MessageId};

    #[test]
    fn frames_round_trip_over_a_byte_stream() {
        let mut wire = [0u8; 64];
        let h = FrameHeader { len: 3, id: MessageId(0x0100), flags: Flags::NO_REPLY, seq: 9, aux: 0 };
        let mut w: &mut [u8] = &mut wire;
        write_frame(&mut w, &h, &[1, 2, 3]).unwrap();
        let mut r: &[u8] = &wire[..19];
        let mut buf = [0u8; 8];
        assert_eq!(read_frame(&mut r, &mut buf, 8).unwrap(), h);
        assert_eq!(&buf[..3], &[1, 2, 3]);
        assert!(matches!(read_frame(&mut r, &mut buf, 8), Err(StreamError::Eof { clean: true })));
    }

    #[test]
    fn truncated_and_oversize_frames_are_errors() {
        let h = FrameHeader { len: 30, id: MessageId(0x0100), flags: Flags::empty(), seq: 0, aux: 0 }.emit();
        let mut buf = [0u8; 64];
        let mut r: &[u8] = &h;
        assert!(matches!(read_frame(&mut r, &mut buf, 16), Err(StreamError::Wire(WireError::FrameTooLarge { .. }))));
        let mut r: &[u8] = &h;
        assert!(matches!(read_frame(&mut r, &mut buf, 64), Err(StreamError::Eof { clean: false })));
        let mut r: &[u8] = &h[..5];
        assert!(matches!(read_frame(&mut r, &mut buf, 64), Err(StreamError::Eof { clean: false })));
    }
}
