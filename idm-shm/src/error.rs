//! Errors of the local shared-memory transport.
//!
//! Each message says what happened and, where there is something to do, what to do. Errors
//! caused by the peer (a wrong-size region, a malformed handshake) refuse that connection
//! only; the listener stays usable.

use crate::layout::LayoutError;
use std::io;
use std::time::Duration;

/// Why a region could not be made or received, or a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// What was being done, e.g. "memfd_create for the shared region".
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A local caller passed an impossible argument.
    #[error("invalid argument: {0}; this is a bug in the caller")]
    InvalidArgument(&'static str),

    /// The channel geometry is invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),

    /// The received descriptor is not a memfd.
    #[error(
        "the received file descriptor is not a sealable memfd; the peer must send a region \
         made with memfd_create(MFD_ALLOW_SEALING) — connection refused"
    )]
    NotMemfd,

    /// The received memfd can still be resized by the peer.
    #[error(
        "the received memfd is not sealed against resizing (seals {seals:#x}); the peer must \
         add F_SEAL_SHRINK | F_SEAL_GROW before sending it, or it could shrink the region under \
         us later — connection refused"
    )]
    NotSealed {
        /// The seals the memfd carries.
        seals: i32,
    },

    /// The received memfd cannot be mapped writable.
    #[error(
        "the received memfd is sealed against writing (seals {seals:#x}); both sides must be \
         able to write the region — connection refused"
    )]
    WriteSealed {
        /// The seals the memfd carries.
        seals: i32,
    },

    /// The received memfd's size differs from what the handshake announced.
    #[error(
        "the received memfd holds {actual} bytes but the handshake announced a {expected}-byte \
         layout — connection refused"
    )]
    SizeMismatch {
        /// Bytes the layout needs.
        expected: u64,
        /// Bytes the memfd has.
        actual: u64,
    },

    /// The peer does not speak this handshake.
    #[error(
        "the peer does not speak the idm-shm handshake (magic {found:#010x}); check that the \
         socket path belongs to an idm-shm endpoint"
    )]
    BadMagic {
        /// The magic number received.
        found: u32,
    },

    /// The peer speaks another version of the handshake.
    #[error("the peer uses idm-shm handshake version {found}, this side speaks {supported}; upgrade the older side")]
    UnsupportedVersion {
        /// The version received.
        found: u16,
        /// The version this side speaks.
        supported: u16,
    },

    /// A handshake field is malformed.
    #[error("malformed idm-shm handshake: {0}; the peer is broken or hostile — connection refused")]
    BadHeader(&'static str),

    /// The peer asked for more than this side allows.
    #[error(
        "the peer asked for a {requested}-byte {what}, above this side's limit of {limit} bytes; \
         lower the request or raise the limit"
    )]
    OverLimit {
        /// Which size ("ring", "data window").
        what: &'static str,
        /// The size requested.
        requested: u64,
        /// The limit.
        limit: u64,
    },

    /// The handshake message carried no descriptor.
    #[error(
        "the peer's handshake carried no file descriptor; it must send the memfd with \
         SCM_RIGHTS together with the header — connection refused"
    )]
    MissingFd,

    /// The handshake message carried more than one descriptor.
    #[error(
        "the peer's handshake carried {count} file descriptors where exactly one was expected — connection refused"
    )]
    ExtraFds {
        /// How many descriptors arrived (at least).
        count: usize,
    },

    /// The socket closed before the handshake completed.
    #[error(
        "the peer closed the socket during the handshake (after {got} of {need} bytes); it \
         probably crashed or refused the connection — see its log"
    )]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        need: usize,
    },

    /// The peer did not complete the handshake in time.
    #[error(
        "the peer did not complete the idm-shm handshake within {0:?}; it may be stuck or not an idm-shm endpoint"
    )]
    HandshakeTimeout(Duration),

    /// The server refused the connection.
    #[error("the server refused the connection: {0}")]
    Refused(RefuseReason),
}

impl ShmError {
    /// Wraps the last OS error for `op`.
    pub(crate) fn last_os(op: &'static str) -> Self {
        ShmError::Os { op, source: io::Error::last_os_error() }
    }

    /// Wraps an I/O error for `op`.
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        ShmError::Os { op, source }
    }
}

/// Why a server refused a connection, as sent back to the client in the handshake answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The offer's magic or version was wrong.
    Protocol,
    /// The ring or window size is invalid or above the server's limits.
    Geometry,
    /// The memfd was missing, not sealed, or of the wrong size.
    Region,
    /// A code this version does not know.
    Other(u32),
}

impl RefuseReason {
    pub(crate) fn code(self) -> u32 {
        match self {
            RefuseReason::Protocol => 1,
            RefuseReason::Geometry => 2,
            RefuseReason::Region => 3,
            RefuseReason::Other(c) => c,
        }
    }

    pub(crate) fn from_code(code: u32) -> Self {
        match code {
            1 => RefuseReason::Protocol,
            2 => RefuseReason::Geometry,
            3 => RefuseReason::Region,
            c => RefuseReason::Other(c),
        }
    }

    /// The reason to send for a local handshake error.
    pub(crate) fn for_error(e: &ShmError) -> Self {
        match e {
            ShmError::BadMagic { .. } | ShmError::UnsupportedVersion { .. } | ShmError::BadHeader(_) => {
                RefuseReason::Protocol
            }
            ShmError::Layout(_) | ShmError::OverLimit { .. } => RefuseReason::Geometry,
            _ => RefuseReason::Region,
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefuseReason::Protocol => write!(
                f,
                "handshake magic or version not accepted; check that both sides run matching builds"
            ),
            RefuseReason::Geometry => write!(
                f,
                "ring or data-window size invalid or above its limits; request smaller sizes (see the server's log for its limits)"
            ),
            RefuseReason::Region => write!(
                f,
                "shared-memory region missing, unsealed or of the wrong size; this is a bug in the client"
            ),
            RefuseReason::Other(c) => write!(f, "unknown reason code {c}; see the server's log"),
        }
    }
}
