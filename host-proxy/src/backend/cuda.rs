//! `CudaGpu`: the real-GPU backend, driving one device through the CUDA driver API (libcuda).
//!
//! # Design
//! - **Loading.** libcuda is loaded at run time through cudarc's dynamic loading, so the
//!   daemon builds and runs on machines without a driver; there [`CudaGpu::open`] returns
//!   [`CudaOpenError::LibraryMissing`] instead of panicking (cudarc's loader panics when no
//!   library is found, so its presence is checked first).
//! - **Entry points.** Every driver function this backend calls is resolved once, in
//!   [`CudaGpu::open`], into a table of function pointers (`DriverApi`). A driver that
//!   lacks one is an error at open time, not a panic in the middle of a request (cudarc's
//!   own `sys::cu*` wrappers resolve lazily and panic on a missing symbol). Only the ABI
//!   names that CUDA 12.4 headers map to and that every later driver still exports for
//!   old binaries are used (the `_v2` memory functions, `cuDeviceGetUuid_v2`,
//!   `cuDevicePrimaryCtxRelease_v2`, `cuStreamDestroy_v2`).
//! - **Result codes.** The table's functions return `CUresult` as a plain `u32`, not as
//!   cudarc's Rust enum: a CUDA 13 driver returns codes that the 12.4 enum lacks (for
//!   example `CUDA_ERROR_CONTAINED`), and such a value in a Rust enum would be undefined
//!   behaviour. Every non-zero code becomes a [`CuError`] unchanged.
//! - **Context.** The device's primary context, retained in `open` and released in
//!   `Drop`. Each zone worker is its own process, so the primary context is the zone's
//!   alone. Every operation makes it current on the calling thread first, which is what
//!   makes [`CudaGpu`] `Send` and keeps two instances in one process (tests) apart.
//! - **Scrubbing.** Memory is zeroed before it is returned to the driver ([`mem_free`]
//!   and `Drop`), so an allocation that another zone receives next never holds this zone's
//!   data. An allocation whose scrub fails is kept (not freed) and the error returned.
//! - **Host buffers are pageable.** This module never page-locks host memory
//!   (`cuMemHostRegister`, `cuMemHostAlloc`) in its context. For pageable memory the
//!   driver has finished reading a host source (copied it to its staging memory) when an
//!   asynchronous host-to-device copy returns, so the caller may reuse the slice at once;
//!   device-to-host copies are synchronized before returning in any case.
//!
//! [`mem_free`]: GpuBackend::mem_free
#![allow(unsafe_code)]

use super::{CuError, CuResultOf, GpuBackend};
use cudarc::driver::sys;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uchar, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use vgpu_proto::DeviceInfo;

/// `CUresult` as the C ABI returns it (an `enum` of `unsigned int` size). Kept as an
/// integer so that codes newer than the bindings are representable.
type RawCuResult = u32;

/// `CUDA_SUCCESS`.
const CUDA_SUCCESS: RawCuResult = 0;
/// `CUDA_ERROR_NO_DEVICE`: `cuInit` found no usable device.
const CUDA_ERROR_NO_DEVICE: RawCuResult = 100;

/// Length of the buffer for `cuDeviceGetName` (the name is at most 256 bytes with its NUL).
const NAME_BUF_LEN: usize = 256;

/// Stream ids are unique in the process and never reused, so a stale or foreign
/// [`CudaStream`] is always recognised as such.
static NEXT_STREAM_ID: AtomicU64 = AtomicU64::new(1);

/// Declares [`DriverApi`]: one field per libcuda entry point, and its resolver.
macro_rules! driver_api {
    ($( $(#[$doc:meta])* $field:ident = $symbol:literal: fn($($arg:ty),* $(,)?); )*) => {
        /// The libcuda entry points this backend uses, resolved once by [`CudaGpu::open`].
        #[derive(Clone, Copy, Debug)]
        struct DriverApi {
            $( $(#[$doc])* $field: unsafe extern "C" fn($($arg),*) -> RawCuResult, )*
        }

        impl DriverApi {
            /// Loads libcuda (once per process) and resolves every entry point.
            fn resolve() -> Result<DriverApi, CudaOpenError> {
                // SAFETY: `is_culib_present` only `dlopen`s and closes the library names
                // cudarc knows for libcuda; loading the NVIDIA driver library runs no
                // initialisers with preconditions on our side.
                let present = unsafe { sys::is_culib_present() };
                if !present {
                    return Err(CudaOpenError::LibraryMissing);
                }
                // cudarc's loader panics when no candidate loads; the library was just
                // found, but a panic here (it vanished, say) must still become an error.
                let lib = std::panic::catch_unwind(|| {
                    // SAFETY: as above; `culib` keeps the library loaded for the rest of
                    // the process, which is what makes the `'static` symbols below valid.
                    unsafe { sys::culib() }
                })
                .map_err(|_| CudaOpenError::LibraryMissing)?;
                Ok(DriverApi {
                    $( $field: {
                        // SAFETY: the declared type is the C prototype of this entry point
                        // in cuda.h (12.4 and 13.x alike), with `CUresult` as its
                        // `unsigned int` representation; the library outlives the pointer.
                        let symbol = unsafe {
                            lib.get::<unsafe extern "C" fn($($arg),*) -> RawCuResult>(
                                concat!($symbol, "\0").as_bytes(),
                            )
                        };
                        match symbol {
                            Ok(f) => *f,
                            Err(e) => {
                                return Err(CudaOpenError::MissingEntryPoint {
                                    symbol: $symbol,
                                    detail: e.to_string(),
                                })
                            }
                        }
                    }, )*
                })
            }
        }
    };
}

driver_api! {
    /// `cuInit`.
    init = "cuInit": fn(c_uint);
    /// `cuDriverGetVersion`.
    driver_get_version = "cuDriverGetVersion": fn(*mut c_int);
    /// `cuGetErrorName` (takes any code; unknown ones give `CUDA_ERROR_INVALID_VALUE`).
    get_error_name = "cuGetErrorName": fn(RawCuResult, *mut *const c_char);
    /// `cuDeviceGetCount`.
    device_get_count = "cuDeviceGetCount": fn(*mut c_int);
    /// `cuDeviceGet`.
    device_get = "cuDeviceGet": fn(*mut sys::CUdevice, c_int);
    /// `cuDeviceGetName`.
    device_get_name = "cuDeviceGetName": fn(*mut c_char, c_int, sys::CUdevice);
    /// `cuDeviceGetUuid_v2` (the MIG-aware UUID; since CUDA 11.4).
    device_get_uuid = "cuDeviceGetUuid_v2": fn(*mut sys::CUuuid, sys::CUdevice);
    /// `cuDeviceTotalMem_v2`.
    device_total_mem = "cuDeviceTotalMem_v2": fn(*mut usize, sys::CUdevice);
    /// `cuDeviceGetAttribute` (the attribute passed as its `int` value).
    device_get_attribute = "cuDeviceGetAttribute": fn(*mut c_int, c_int, sys::CUdevice);
    /// `cuDevicePrimaryCtxRetain`.
    primary_ctx_retain = "cuDevicePrimaryCtxRetain": fn(*mut sys::CUcontext, sys::CUdevice);
    /// `cuDevicePrimaryCtxRelease_v2`.
    primary_ctx_release = "cuDevicePrimaryCtxRelease_v2": fn(sys::CUdevice);
    /// `cuCtxSetCurrent`.
    ctx_set_current = "cuCtxSetCurrent": fn(sys::CUcontext);
    /// `cuCtxSynchronize`.
    ctx_synchronize = "cuCtxSynchronize": fn();
    /// `cuMemGetInfo_v2`.
    mem_get_info = "cuMemGetInfo_v2": fn(*mut usize, *mut usize);
    /// `cuMemAlloc_v2`.
    mem_alloc = "cuMemAlloc_v2": fn(*mut sys::CUdeviceptr, usize);
    /// `cuMemFree_v2`.
    mem_free = "cuMemFree_v2": fn(sys::CUdeviceptr);
    /// `cuMemcpyHtoD_v2`.
    memcpy_htod = "cuMemcpyHtoD_v2": fn(sys::CUdeviceptr, *const c_void, usize);
    /// `cuMemcpyHtoDAsync_v2`.
    memcpy_htod_async = "cuMemcpyHtoDAsync_v2": fn(sys::CUdeviceptr, *const c_void, usize, sys::CUstream);
    /// `cuMemcpyDtoH_v2`.
    memcpy_dtoh = "cuMemcpyDtoH_v2": fn(*mut c_void, sys::CUdeviceptr, usize);
    /// `cuMemcpyDtoHAsync_v2`.
    memcpy_dtoh_async = "cuMemcpyDtoHAsync_v2": fn(*mut c_void, sys::CUdeviceptr, usize, sys::CUstream);
    /// `cuMemcpyDtoD_v2`.
    memcpy_dtod = "cuMemcpyDtoD_v2": fn(sys::CUdeviceptr, sys::CUdeviceptr, usize);
    /// `cuMemcpyDtoDAsync_v2`.
    memcpy_dtod_async = "cuMemcpyDtoDAsync_v2": fn(sys::CUdeviceptr, sys::CUdeviceptr, usize, sys::CUstream);
    /// `cuMemsetD8_v2`.
    memset_d8 = "cuMemsetD8_v2": fn(sys::CUdeviceptr, c_uchar, usize);
    /// `cuMemsetD8Async`.
    memset_d8_async = "cuMemsetD8Async": fn(sys::CUdeviceptr, c_uchar, usize, sys::CUstream);
    /// `cuMemsetD32_v2`.
    memset_d32 = "cuMemsetD32_v2": fn(sys::CUdeviceptr, c_uint, usize);
    /// `cuMemsetD32Async`.
    memset_d32_async = "cuMemsetD32Async": fn(sys::CUdeviceptr, c_uint, usize, sys::CUstream);
    /// `cuStreamCreate`.
    stream_create = "cuStreamCreate": fn(*mut sys::CUstream, c_uint);
    /// `cuStreamSynchronize`.
    stream_synchronize = "cuStreamSynchronize": fn(sys::CUstream);
    /// `cuStreamDestroy_v2`.
    stream_destroy = "cuStreamDestroy_v2": fn(sys::CUstream);
}

impl DriverApi {
    /// The driver's name for `code` (`CUDA_ERROR_...`), or `"unknown"`.
    fn error_name(&self, code: RawCuResult) -> String {
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: `name` is a valid out-pointer; the driver accepts any code and writes a
        // pointer only on success.
        let rc = unsafe { (self.get_error_name)(code, &mut name) };
        if rc != CUDA_SUCCESS || name.is_null() {
            return "unknown".to_owned();
        }
        // SAFETY: on success the driver points `name` at a static NUL-terminated string
        // inside libcuda, which stays loaded for the life of the process.
        let cstr = unsafe { CStr::from_ptr(name) };
        cstr.to_string_lossy().into_owned()
    }
}

/// Turns a driver result into a backend result.
fn check(code: RawCuResult) -> CuResultOf<()> {
    if code == CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CuError::new(code))
    }
}

/// A byte count as the driver's `size_t`.
fn byte_count(len: u64) -> CuResultOf<usize> {
    usize::try_from(len).map_err(|_| CuError::INVALID_VALUE)
}

/// Why [`CudaGpu::open`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaOpenError {
    /// libcuda could not be loaded.
    #[error("could not load libcuda.so.1: is the NVIDIA driver installed? (use the simulated backend on machines without a GPU)")]
    LibraryMissing,
    /// libcuda lacks an entry point this backend needs.
    #[error(
        "libcuda has no entry point {symbol}: the NVIDIA driver is too old (CUDA 12.4 or later is needed): {detail}"
    )]
    MissingEntryPoint {
        /// The missing symbol.
        symbol: &'static str,
        /// The loader's message.
        detail: String,
    },
    /// `cuInit` failed.
    #[error("cuInit failed with {name} ({err}): the driver library loaded but could not start; check that the nvidia kernel module is loaded, /dev/nvidia* is accessible, and libcuda.so is not the toolkit's stub library")]
    Init {
        /// The driver's code.
        err: CuError,
        /// The driver's name for the code.
        name: String,
    },
    /// The ordinal names no device.
    #[error("no CUDA device with ordinal {ordinal} (found {count})")]
    NoSuchDevice {
        /// The ordinal asked for.
        ordinal: i32,
        /// How many devices the driver reports.
        count: i32,
    },
    /// A device query failed.
    #[error("{call} failed with {name} ({err}) for device {ordinal}")]
    Query {
        /// The driver function.
        call: &'static str,
        /// The device's ordinal.
        ordinal: i32,
        /// The driver's code.
        err: CuError,
        /// The driver's name for the code.
        name: String,
    },
    /// The device's primary context could not be retained or made current.
    #[error("could not use the primary context of device {ordinal}: {call} failed with {name} ({err}); the device may be in exclusive-process mode and in use, or out of memory")]
    Context {
        /// The driver function.
        call: &'static str,
        /// The device's ordinal.
        ordinal: i32,
        /// The driver's code.
        err: CuError,
        /// The driver's name for the code.
        name: String,
    },
}

/// A stream of a [`CudaGpu`]: a process-unique id, looked up in its owner's table, so a
/// stale or foreign stream is refused with `CUDA_ERROR_INVALID_HANDLE`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CudaStream {
    id: u64,
}

/// One real CUDA device, in its primary context.
pub struct CudaGpu {
    api: DriverApi,
    ordinal: i32,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    info: DeviceInfo,
    /// Live allocations: start address → size in bytes.
    allocs: HashMap<u64, u64>,
    /// Live streams by [`CudaStream`] id.
    streams: HashMap<u64, sys::CUstream>,
}

// SAFETY: the driver API is thread-safe and its handles (context, streams, device
// pointers) are valid on any thread of the process. `CudaGpu` has no thread-affine state:
// every method, `Drop` included, first makes its context current on the calling thread
// (`enter`), and `&mut self` gives it one user at a time. It is not `Sync`.
unsafe impl Send for CudaGpu {}

impl std::fmt::Debug for CudaGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGpu")
            .field("ordinal", &self.ordinal)
            .field("name", &self.info.name)
            .field("allocations", &self.allocs.len())
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl CudaGpu {
    /// Opens device `ordinal`: loads libcuda, initialises the driver, queries the device
    /// and retains its primary context (made current on this thread).
    pub fn open(ordinal: i32) -> Result<CudaGpu, CudaOpenError> {
        let api = DriverApi::resolve()?;
        let query = |call: &'static str, code: RawCuResult| -> Result<(), CudaOpenError> {
            check(code).map_err(|err| CudaOpenError::Query { call, ordinal, err, name: api.error_name(code) })
        };

        // SAFETY: `cuInit` takes flags only; 0 is the one valid value.
        let rc = unsafe { (api.init)(0) };
        if rc == CUDA_ERROR_NO_DEVICE {
            return Err(CudaOpenError::NoSuchDevice { ordinal, count: 0 });
        }
        check(rc).map_err(|err| CudaOpenError::Init { err, name: api.error_name(rc) })?;

        let mut driver_version: c_int = 0;
        // SAFETY: valid out-pointer to a local `int`.
        let rc = unsafe { (api.driver_get_version)(&mut driver_version) };
        query("cuDriverGetVersion", rc)?;

        let mut count: c_int = 0;
        // SAFETY: valid out-pointer to a local `int`; the driver is initialised.
        let rc = unsafe { (api.device_get_count)(&mut count) };
        query("cuDeviceGetCount", rc)?;
        if ordinal < 0 || ordinal >= count {
            return Err(CudaOpenError::NoSuchDevice { ordinal, count });
        }

        let mut device: sys::CUdevice = 0;
        // SAFETY: valid out-pointer; the ordinal is in range (checked above).
        let rc = unsafe { (api.device_get)(&mut device, ordinal) };
        query("cuDeviceGet", rc)?;

        let mut name_buf: [c_char; NAME_BUF_LEN] = [0; NAME_BUF_LEN];
        // SAFETY: the buffer is `NAME_BUF_LEN` bytes long and that length is passed; the
        // driver writes a NUL-terminated string within it.
        let rc = unsafe { (api.device_get_name)(name_buf.as_mut_ptr(), NAME_BUF_LEN as c_int, device) };
        query("cuDeviceGetName", rc)?;

        let mut uuid = sys::CUuuid { bytes: [0; 16] };
        // SAFETY: valid out-pointer to a local `CUuuid` (16 bytes, as the C struct).
        let rc = unsafe { (api.device_get_uuid)(&mut uuid, device) };
        query("cuDeviceGetUuid_v2", rc)?;

        let mut total_mem: usize = 0;
        // SAFETY: valid out-pointer to a local `size_t`.
        let rc = unsafe { (api.device_total_mem)(&mut total_mem, device) };
        query("cuDeviceTotalMem_v2", rc)?;

        let attribute = |attr: sys::CUdevice_attribute, call: &'static str| -> Result<c_int, CudaOpenError> {
            let mut value: c_int = 0;
            // SAFETY: valid out-pointer; `attr` is a `CUdevice_attribute` of the 12.4
            // bindings, passed as its C `int` value.
            let rc = unsafe { (api.device_get_attribute)(&mut value, attr as c_int, device) };
            query(call, rc).map(|()| value)
        };
        let cc_major = attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)",
        )?;
        let cc_minor = attribute(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)",
        )?;

        let info = DeviceInfo {
            name: device_name(&name_buf),
            uuid: uuid.bytes.map(|b| b as u8),
            total_mem: total_mem as u64,
            cc_major: u32::try_from(cc_major).unwrap_or(0),
            cc_minor: u32::try_from(cc_minor).unwrap_or(0),
            driver_version: u32::try_from(driver_version).unwrap_or(0),
            simulated: false,
        };

        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer; `device` came from `cuDeviceGet`.
        let rc = unsafe { (api.primary_ctx_retain)(&mut ctx, device) };
        check(rc).map_err(|err| CudaOpenError::Context {
            call: "cuDevicePrimaryCtxRetain",
            ordinal,
            err,
            name: api.error_name(rc),
        })?;

        // From here on `Drop` releases the context, whatever fails next.
        let gpu = CudaGpu { api, ordinal, device, ctx, info, allocs: HashMap::new(), streams: HashMap::new() };
        gpu.enter().map_err(|err| CudaOpenError::Context {
            call: "cuCtxSetCurrent",
            ordinal,
            err,
            name: gpu.api.error_name(err.code()),
        })?;
        Ok(gpu)
    }

    /// Makes this device's context current on the calling thread (a thread-local store
    /// in the driver: cheap). Another instance, or other code, may have changed it.
    fn enter(&self) -> CuResultOf<()> {
        // SAFETY: `self.ctx` is the primary context retained in `open` and not yet
        // released (that happens only in `Drop`).
        check(unsafe { (self.api.ctx_set_current)(self.ctx) })
    }

    /// The driver stream of `stream`, or the legacy default stream for `None`.
    fn raw_stream(&self, stream: Option<&CudaStream>) -> CuResultOf<Option<sys::CUstream>> {
        match stream {
            None => Ok(None),
            Some(s) => self.streams.get(&s.id).copied().map(Some).ok_or(CuError::INVALID_HANDLE),
        }
    }

    /// Waits for all work in the context.
    fn ctx_synchronize(&self) -> CuResultOf<()> {
        // SAFETY: no arguments; the context is current (callers `enter` first).
        check(unsafe { (self.api.ctx_synchronize)() })
    }

    /// Zeroes allocations and waits until the zeroes are in device memory. The first
    /// synchronize drains work still writing into them (on any stream, non-blocking ones
    /// included), so nothing lands after the scrub.
    fn scrub(&self, allocations: &[(u64, u64)]) -> CuResultOf<()> {
        self.ctx_synchronize()?;
        for &(dptr, size) in allocations {
            let n = byte_count(size)?;
            // SAFETY: `[dptr, dptr + size)` is a live allocation of this context, made by
            // `cuMemAlloc_v2` with exactly this size (recorded in `self.allocs`).
            check(unsafe { (self.api.memset_d8)(dptr, 0, n) })?;
        }
        self.ctx_synchronize()
    }
}

/// The device name from `cuDeviceGetName`'s buffer, cut to fit [`DeviceInfo::name`] on a
/// character boundary.
fn device_name(buf: &[c_char; NAME_BUF_LEN]) -> heapless::String<96> {
    let bytes: Vec<u8> = buf.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    let full = String::from_utf8_lossy(&bytes);
    let mut name = heapless::String::new();
    for ch in full.chars() {
        if name.push(ch).is_err() {
            break;
        }
    }
    name
}

impl GpuBackend for CudaGpu {
    type Stream = CudaStream;

    fn device_info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn mem_get_info(&mut self) -> CuResultOf<(u64, u64)> {
        self.enter()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers to local `size_t`s; the context is current.
        check(unsafe { (self.api.mem_get_info)(&mut free, &mut total) })?;
        Ok((free as u64, total as u64))
    }

    fn mem_alloc(&mut self, size: u64) -> CuResultOf<u64> {
        if size == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let n = usize::try_from(size).map_err(|_| CuError::OUT_OF_MEMORY)?;
        self.enter()?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the context is current.
        check(unsafe { (self.api.mem_alloc)(&mut dptr, n) })?;
        self.allocs.insert(dptr, size);
        Ok(dptr)
    }

    fn mem_free(&mut self, dptr: u64) -> CuResultOf<()> {
        let size = *self.allocs.get(&dptr).ok_or(CuError::INVALID_VALUE)?;
        self.enter()?;
        // If the scrub fails the memory stays allocated (and recorded), so it cannot be
        // handed out again while this context lives; the error goes to the caller.
        self.scrub(&[(dptr, size)])?;
        // SAFETY: `dptr` is a live allocation of this context (it is in `self.allocs`),
        // and no work uses it any more (the scrub synchronized the context).
        check(unsafe { (self.api.mem_free)(dptr) })?;
        self.allocs.remove(&dptr);
        Ok(())
    }

    fn copy_htod(&mut self, dst: u64, src: &[u8], stream: Option<&CudaStream>) -> CuResultOf<()> {
        let stream = self.raw_stream(stream)?;
        if src.is_empty() {
            return Ok(());
        }
        self.enter()?;
        let rc = match stream {
            // SAFETY: `src` is readable for `src.len()` bytes; the caller checked that
            // `[dst, dst + len)` lies in one of this zone's allocations. The synchronous
            // copy has read `src` when it returns.
            None => unsafe { (self.api.memcpy_htod)(dst, src.as_ptr().cast(), src.len()) },
            // SAFETY: as above, and `s` is a live stream of this context. `src` is pageable
            // (see the module docs), so the driver has staged it when the call returns
            // and does not read the slice after its borrow ends.
            Some(s) => unsafe { (self.api.memcpy_htod_async)(dst, src.as_ptr().cast(), src.len(), s) },
        };
        check(rc)
    }

    fn copy_dtoh(&mut self, dst: &mut [u8], src: u64, stream: Option<&CudaStream>) -> CuResultOf<()> {
        let stream = self.raw_stream(stream)?;
        if dst.is_empty() {
            return Ok(());
        }
        self.enter()?;
        match stream {
            // SAFETY: `dst` is writable for `dst.len()` bytes and exclusively borrowed; the
            // caller checked `[src, src + len)`. The synchronous copy has completed when
            // it returns.
            None => check(unsafe { (self.api.memcpy_dtoh)(dst.as_mut_ptr().cast(), src, dst.len()) }),
            Some(s) => {
                // SAFETY: as above, and `s` is a live stream of this context. The copy is
                // complete before `dst`'s borrow ends: the driver finishes copies into
                // pageable memory before returning, and the stream is synchronized next.
                let rc = unsafe { (self.api.memcpy_dtoh_async)(dst.as_mut_ptr().cast(), src, dst.len(), s) };
                check(rc)?;
                // SAFETY: `s` is a live stream of this context.
                check(unsafe { (self.api.stream_synchronize)(s) })
            }
        }
    }

    fn copy_dtod(&mut self, dst: u64, src: u64, len: u64, stream: Option<&CudaStream>) -> CuResultOf<()> {
        let stream = self.raw_stream(stream)?;
        let n = byte_count(len)?;
        if n == 0 {
            return Ok(());
        }
        self.enter()?;
        let rc = match stream {
            // SAFETY: device addresses only; the caller checked both ranges against this
            // zone's allocations.
            None => unsafe { (self.api.memcpy_dtod)(dst, src, n) },
            // SAFETY: as above, and `s` is a live stream of this context.
            Some(s) => unsafe { (self.api.memcpy_dtod_async)(dst, src, n, s) },
        };
        check(rc)
    }

    fn memset_d8(&mut self, dst: u64, value: u8, count: u64, stream: Option<&CudaStream>) -> CuResultOf<()> {
        let stream = self.raw_stream(stream)?;
        let n = byte_count(count)?;
        if n == 0 {
            return Ok(());
        }
        self.enter()?;
        let rc = match stream {
            // SAFETY: a device range the caller checked against this zone's allocations.
            None => unsafe { (self.api.memset_d8)(dst, value, n) },
            // SAFETY: as above, and `s` is a live stream of this context.
            Some(s) => unsafe { (self.api.memset_d8_async)(dst, value, n, s) },
        };
        check(rc)
    }

    fn memset_d32(&mut self, dst: u64, value: u32, count: u64, stream: Option<&CudaStream>) -> CuResultOf<()> {
        let stream = self.raw_stream(stream)?;
        let n = byte_count(count)?;
        if n == 0 {
            return Ok(());
        }
        self.enter()?;
        // The driver itself refuses a `dst` that is not 4-byte aligned.
        let rc = match stream {
            // SAFETY: a device range (`count` words) the caller checked against this
            // zone's allocations.
            None => unsafe { (self.api.memset_d32)(dst, value, n) },
            // SAFETY: as above, and `s` is a live stream of this context.
            Some(s) => unsafe { (self.api.memset_d32_async)(dst, value, n, s) },
        };
        check(rc)
    }

    fn synchronize(&mut self) -> CuResultOf<()> {
        self.enter()?;
        self.ctx_synchronize()
    }

    fn stream_create(&mut self, flags: u32) -> CuResultOf<CudaStream> {
        self.enter()?;
        let mut raw: sys::CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the driver validates `flags`; the context is current.
        check(unsafe { (self.api.stream_create)(&mut raw, flags) })?;
        let id = NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed);
        self.streams.insert(id, raw);
        Ok(CudaStream { id })
    }

    fn stream_synchronize(&mut self, stream: &CudaStream) -> CuResultOf<()> {
        let raw = self.streams.get(&stream.id).copied().ok_or(CuError::INVALID_HANDLE)?;
        self.enter()?;
        // SAFETY: `raw` is a live stream of this context (it is in `self.streams`).
        check(unsafe { (self.api.stream_synchronize)(raw) })
    }

    fn stream_destroy(&mut self, stream: CudaStream) -> CuResultOf<()> {
        let raw = self.streams.remove(&stream.id).ok_or(CuError::INVALID_HANDLE)?;
        self.enter()?;
        // SAFETY: `raw` was a live stream of this context and is now removed from the
        // table, so it is destroyed once and never used again. Work still queued on it
        // completes first (the driver defers the release).
        check(unsafe { (self.api.stream_destroy)(raw) })
    }
}

impl Drop for CudaGpu {
    fn drop(&mut self) {
        // If the context cannot be made current, nothing below may run (it would act on
        // whatever context is current instead); releasing the primary context still
        // frees everything in it.
        if self.enter().is_ok() {
            let _ = self.ctx_synchronize();
            for (_, raw) in self.streams.drain() {
                // SAFETY: a live stream of this context, removed from the table here.
                let _ = unsafe { (self.api.stream_destroy)(raw) };
            }
            let allocations: Vec<(u64, u64)> = self.allocs.drain().collect();
            if let Err(err) = self.scrub(&allocations) {
                tracing::warn!(
                    device = self.ordinal,
                    %err,
                    allocations = allocations.len(),
                    "could not scrub device memory at teardown; it is freed unscrubbed"
                );
            }
            for (dptr, _) in allocations {
                // SAFETY: a live allocation of this context, taken out of the table, so
                // freed once; all work was synchronized above.
                let _ = unsafe { (self.api.mem_free)(dptr) };
            }
            // SAFETY: a null context is valid and unbinds this thread from the context
            // about to be released.
            let _ = unsafe { (self.api.ctx_set_current)(std::ptr::null_mut()) };
        }
        // SAFETY: balances the `cuDevicePrimaryCtxRetain` of `open`, exactly once.
        let _ = unsafe { (self.api.primary_ctx_release)(self.device) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the real-GPU tests should run.
    fn gpu_tests_enabled() -> bool {
        if std::env::var("VGPU_TEST_CUDA").as_deref() == Ok("1") {
            true
        } else {
            println!("skipped: set VGPU_TEST_CUDA=1 on a GPU machine");
            false
        }
    }

    fn open_gpu() -> CudaGpu {
        match CudaGpu::open(0) {
            Ok(g) => g,
            Err(e) => panic!("VGPU_TEST_CUDA=1 but device 0 did not open: {e}"),
        }
    }

    #[test]
    fn open_without_a_driver_is_an_error_not_a_panic() {
        // SAFETY: only tries to load libcuda and closes it again.
        let present = unsafe { sys::is_culib_present() };
        if present {
            println!("skipped: libcuda is present on this machine");
            return;
        }
        let outcome = std::panic::catch_unwind(|| CudaGpu::open(0));
        let result = outcome.expect("CudaGpu::open panicked without a driver");
        let err = result.expect_err("CudaGpu::open succeeded without libcuda");
        assert!(matches!(err, CudaOpenError::LibraryMissing), "{err:?}");
        assert!(err.to_string().starts_with("could not load libcuda.so.1: is the NVIDIA driver installed?"));
    }

    #[test]
    fn error_messages_say_what_happened() {
        let e = CudaOpenError::NoSuchDevice { ordinal: 3, count: 1 };
        assert_eq!(e.to_string(), "no CUDA device with ordinal 3 (found 1)");
        let e = CudaOpenError::Init { err: CuError::new(34), name: "CUDA_ERROR_STUB_LIBRARY".into() };
        assert!(e.to_string().starts_with("cuInit failed with CUDA_ERROR_STUB_LIBRARY (CUDA error 34)"));
    }

    #[test]
    fn device_names_are_cut_on_a_character_boundary() {
        let mut buf = [0 as c_char; NAME_BUF_LEN];
        let long = "é".repeat(60); // 120 bytes, more than the 96 that fit
        for (d, s) in buf.iter_mut().zip(long.bytes()) {
            *d = s as c_char;
        }
        let name = device_name(&buf);
        assert_eq!(name.len(), 96);
        assert!(name.chars().all(|c| c == 'é'));
        let mut buf = [0 as c_char; NAME_BUF_LEN];
        for (d, s) in buf.iter_mut().zip(b"NVIDIA H100 80GB HBM3") {
            *d = *s as c_char;
        }
        assert_eq!(device_name(&buf).as_str(), "NVIDIA H100 80GB HBM3");
    }

    #[test]
    fn gpu_reports_a_real_device() {
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        let info = g.device_info();
        println!("{info:?}");
        assert!(!info.simulated);
        assert!(!info.name.is_empty());
        assert_ne!(info.uuid, [0; 16]);
        assert!(info.total_mem > 0);
        assert!(info.cc_major >= 5, "compute capability {}.{}", info.cc_major, info.cc_minor);
        assert!(info.driver_version >= 12040, "driver version {}", info.driver_version);
        let (free, total) = g.mem_get_info().unwrap();
        assert!(free > 0 && free <= total);
        match CudaGpu::open(4096) {
            Err(CudaOpenError::NoSuchDevice { ordinal: 4096, count }) => assert!(count >= 1),
            other => panic!("expected NoSuchDevice, got {other:?}"),
        }
    }

    #[test]
    fn gpu_memory_copies_memsets_and_streams() {
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        const N: usize = 1 << 20;
        let a = g.mem_alloc(N as u64).unwrap();
        let b = g.mem_alloc(N as u64).unwrap();
        assert_ne!(a, b);
        let pattern: Vec<u8> = (0..N).map(|i| (i * 7 + 3) as u8).collect();

        // Synchronous (default stream) round trip.
        g.copy_htod(a, &pattern, None).unwrap();
        let mut out = vec![0u8; N];
        g.copy_dtoh(&mut out, a, None).unwrap();
        assert!(out == pattern);
        g.copy_dtod(b, a, N as u64, None).unwrap();
        g.memset_d8(b + 16, 0xab, 8, None).unwrap();
        g.memset_d32(b + 32, 0xdead_beef, 2, None).unwrap();
        let mut head = [0u8; 48];
        g.copy_dtoh(&mut head, b, None).unwrap();
        assert_eq!(&head[..16], &pattern[..16]);
        assert_eq!(&head[16..24], &[0xab; 8]);
        assert_eq!(&head[24..32], &pattern[24..32]);
        assert_eq!(&head[32..40], &[0xef, 0xbe, 0xad, 0xde, 0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(&head[40..48], &pattern[40..48]);

        // The same on a stream (a non-blocking one, so nothing is implicitly ordered by
        // the default stream).
        let s = g.stream_create(1).unwrap();
        g.memset_d32(a, 0x0102_0304, (N / 4) as u64, Some(&s)).unwrap();
        g.memset_d8(a + 4, 0xee, 4, Some(&s)).unwrap();
        g.copy_htod(b + 100, &pattern[..1000], Some(&s)).unwrap();
        g.copy_dtod(a + 2000, b + 100, 1000, Some(&s)).unwrap();
        let mut out = vec![0u8; 4000];
        g.copy_dtoh(&mut out, a, Some(&s)).unwrap();
        assert_eq!(&out[..8], &[4, 3, 2, 1, 0xee, 0xee, 0xee, 0xee]);
        assert_eq!(&out[8..12], &[4, 3, 2, 1]);
        assert_eq!(&out[2000..3000], &pattern[..1000]);
        assert_eq!(&out[3000..3004], &[4, 3, 2, 1]);
        g.stream_synchronize(&s).unwrap();
        g.synchronize().unwrap();

        // Zero-length operations are no-ops, unknown streams and frees are refused.
        g.copy_htod(a, &[], None).unwrap();
        g.copy_dtoh(&mut [], a, Some(&s)).unwrap();
        let foreign = CudaStream { id: u64::MAX };
        assert_eq!(g.copy_htod(a, &[1], Some(&foreign)), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.stream_synchronize(&foreign), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.mem_alloc(0), Err(CuError::INVALID_VALUE));
        assert_eq!(g.memset_d32(a + 1, 0, 1, None), Err(CuError::INVALID_VALUE));

        g.stream_destroy(s).unwrap();
        g.mem_free(a).unwrap();
        assert_eq!(g.mem_free(a), Err(CuError::INVALID_VALUE));
        // `b` and a live stream are left for `Drop` to scrub, free and destroy.
        let _left = g.stream_create(0).unwrap();
        drop(g);
    }

    #[test]
    fn gpu_freed_memory_is_scrubbed() {
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        const N: u64 = 4 << 20;
        let secret = vec![0x5au8; N as usize];
        // Several rounds, since the driver need not hand the same range back at once.
        let mut reused = 0;
        for _ in 0..8 {
            let a = g.mem_alloc(N).unwrap();
            g.copy_htod(a, &secret, None).unwrap();
            g.mem_free(a).unwrap();
            let b = g.mem_alloc(N).unwrap();
            let mut out = vec![0xffu8; N as usize];
            g.copy_dtoh(&mut out, b, None).unwrap();
            if a == b {
                reused += 1;
                assert!(out.iter().all(|&x| x == 0), "reused allocation still holds freed data");
            }
            g.mem_free(b).unwrap();
        }
        println!("address reused in {reused} of 8 rounds");
    }

    #[test]
    fn gpu_is_usable_from_another_thread() {
        if !gpu_tests_enabled() {
            return;
        }
        let g = open_gpu();
        let handle = std::thread::spawn(move || {
            let mut g = g;
            let a = g.mem_alloc(4096).unwrap();
            g.memset_d8(a, 7, 4096, None).unwrap();
            let mut out = [0u8; 16];
            g.copy_dtoh(&mut out, a + 100, None).unwrap();
            assert_eq!(out, [7; 16]);
            g.mem_free(a).unwrap();
        });
        handle.join().unwrap();
    }
}
