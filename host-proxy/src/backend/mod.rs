//! GPU backends behind one trait: [`cuda`] drives the real GPU through cudarc; [`sim`] is a
//! test double in host memory for machines without a GPU.
//!
//! A backend is owned by one zone worker process and used from one thread. It knows
//! nothing of zones, handles or quotas: the caller ([`crate::zone`]) has already checked
//! every address range against the zone's own allocations before a backend sees it.

pub mod cuda;
pub mod sim;

use std::num::NonZeroU32;
use vgpu_proto::{CuResult, DeviceInfo};

/// A CUDA error code (`CUresult`, never `CUDA_SUCCESS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CuError(pub NonZeroU32);

impl CuError {
    /// Wraps a non-zero code; zero (success) maps to `CUDA_ERROR_UNKNOWN`, since a caller
    /// that builds an error from success has a bug.
    pub const fn new(code: u32) -> CuError {
        match NonZeroU32::new(code) {
            Some(c) => CuError(c),
            None => CuError(NonZeroU32::MIN.saturating_add(CuResult::UNKNOWN - 1)),
        }
    }
    /// The raw code.
    pub fn code(self) -> u32 {
        self.0.get()
    }
    /// `CUDA_ERROR_INVALID_VALUE`.
    pub const INVALID_VALUE: CuError = CuError::new(CuResult::INVALID_VALUE);
    /// `CUDA_ERROR_OUT_OF_MEMORY`.
    pub const OUT_OF_MEMORY: CuError = CuError::new(CuResult::OUT_OF_MEMORY);
    /// `CUDA_ERROR_INVALID_HANDLE`.
    pub const INVALID_HANDLE: CuError = CuError::new(CuResult::INVALID_HANDLE);
    /// `CUDA_ERROR_NOT_SUPPORTED`.
    pub const NOT_SUPPORTED: CuError = CuError::new(CuResult::NOT_SUPPORTED);
    /// `CUDA_ERROR_UNKNOWN`.
    pub const UNKNOWN: CuError = CuError::new(CuResult::UNKNOWN);
}

impl std::fmt::Display for CuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CUDA error {}", self.0)
    }
}

impl std::error::Error for CuError {}

/// Result of a backend operation.
pub type CuResultOf<T> = Result<T, CuError>;

/// The GPU operations a zone worker needs. Device pointers are addresses in the backend's
/// own context; ranges passed in are already validated against the zone's allocations.
pub trait GpuBackend {
    /// A backend stream object.
    type Stream;

    /// Static facts about the device.
    fn device_info(&self) -> DeviceInfo;
    /// Free and total device memory as the driver reports them.
    fn mem_get_info(&mut self) -> CuResultOf<(u64, u64)>;
    /// Allocates `size > 0` bytes.
    fn mem_alloc(&mut self, size: u64) -> CuResultOf<u64>;
    /// Frees an allocation made by [`mem_alloc`](Self::mem_alloc).
    fn mem_free(&mut self, dptr: u64) -> CuResultOf<()>;
    /// Copies host bytes to device memory.
    fn copy_htod(&mut self, dst: u64, src: &[u8], stream: Option<&Self::Stream>) -> CuResultOf<()>;
    /// Copies device memory to host bytes; returns when the bytes are in `dst`.
    fn copy_dtoh(&mut self, dst: &mut [u8], src: u64, stream: Option<&Self::Stream>) -> CuResultOf<()>;
    /// Copies device memory to device memory.
    fn copy_dtod(&mut self, dst: u64, src: u64, len: u64, stream: Option<&Self::Stream>) -> CuResultOf<()>;
    /// Sets `count` bytes at `dst` to `value`.
    fn memset_d8(&mut self, dst: u64, value: u8, count: u64, stream: Option<&Self::Stream>) -> CuResultOf<()>;
    /// Sets `count` 32-bit words at `dst` to `value`.
    fn memset_d32(&mut self, dst: u64, value: u32, count: u64, stream: Option<&Self::Stream>) -> CuResultOf<()>;
    /// Waits for all work in the context.
    fn synchronize(&mut self) -> CuResultOf<()>;
    /// Creates a stream.
    fn stream_create(&mut self, flags: u32) -> CuResultOf<Self::Stream>;
    /// Waits for a stream's work.
    fn stream_synchronize(&mut self, stream: &Self::Stream) -> CuResultOf<()>;
    /// Destroys a stream.
    fn stream_destroy(&mut self, stream: Self::Stream) -> CuResultOf<()>;
}
