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
//!   own `sys::cu*` wrappers resolve lazily and panic on a missing symbol). The types come
//!   from cudarc's CUDA 13.0 bindings; the ABI names used are those the 13.0 headers map
//!   to, plus older versioned names that every later driver still exports for old binaries
//!   (`cuDeviceGetUuid_v2`, `cuDevicePrimaryCtxRelease_v2`, the `_v2` memory functions).
//!   The newest of them (`cuEventElapsedTime_v2`) needs a CUDA 12.8 driver or later.
//! - **Result codes and enums.** The table's functions return `CUresult` as a plain `u32`,
//!   and take C enum arguments (`CUlimit`, `CUfunction_attribute`, `CUfunc_cache`, …) as
//!   plain integers, never as cudarc's Rust enums: a driver returns codes that the
//!   bindings may lack (for example a newer `CUDA_ERROR_*`), a guest may send any value,
//!   and such a value in a Rust enum would be undefined behaviour. Every non-zero code
//!   becomes a [`CuError`] unchanged. For the same reason `cuLaunchKernelEx` takes this
//!   module's own mirror of `CUlaunchConfig`/`CUlaunchAttribute` (checked against the
//!   bindings' layout at compile time).
//! - **Contexts.** The device's primary context is retained in `open` and released in
//!   `Drop`; contexts made by [`ctx_create`](GpuBackend::ctx_create) live in a table. The
//!   backend remembers which one is *selected* (initially the primary), and every
//!   operation first makes the context it needs current on the calling thread: the
//!   selected one, or for a free/destroy/unload the object's own. That is a thread-local
//!   store in the driver (cheap), it is what makes [`CudaGpu`] `Send`, and it keeps two
//!   instances in one process (tests) apart. The thread's context stack is kept one deep:
//!   `cuCtxCreate` pushes, so its push is popped again.
//! - **Objects.** Streams, events, contexts, modules and functions are handed out as
//!   process-unique ids (never reused) that name entries in this backend's tables, so a
//!   stale or foreign object is refused with `CUDA_ERROR_INVALID_HANDLE` and never reaches
//!   the driver. Each entry records the context it belongs to: destroying a context drops
//!   its entries, unloading a module or library drops everything obtained from it.
//! - **Scrubbing.** Memory is zeroed before it is returned to the driver ([`mem_free`],
//!   [`ctx_destroy`](GpuBackend::ctx_destroy) and `Drop`), so an allocation that another
//!   zone receives next never holds this zone's data. An allocation whose scrub fails is
//!   kept (not freed) and the error returned. Memory the driver allocates for modules
//!   (their `.global` variables) is not tracked and not scrubbed.
//! - **Untrusted inputs.** Module images, kernel parameter buffers and launch attributes
//!   come from a guest. The driver reads a module image without a length, so
//!   [`module_load`](GpuBackend::module_load) first checks that everything it will read
//!   lies inside the bytes given (`check_image`). A launch passes the driver pointers to
//!   each parameter at the offsets and sizes the *driver* reports for the function
//!   (queried once and cached), each checked to lie in a private copy of the buffer.
//!   Only launch attributes whose value is plain integers are passed on
//!   ([`is_plain_launch_attribute`]).
//! - **Host buffers are pageable.** This module never page-locks host memory
//!   (`cuMemHostRegister`, `cuMemHostAlloc`) in its context. For pageable memory the
//!   driver has finished reading a host source (copied it to its staging memory) when an
//!   asynchronous host-to-device copy returns, so the caller may reuse the slice at once;
//!   device-to-host copies are synchronized before returning in any case.
//! - **IPC.** [`ipc_export`](GpuBackend::ipc_export) is `cuIpcGetMemHandle` on an
//!   allocation of this backend; its 64 bytes stay on the host (the daemon's broker keeps
//!   them and the guest gets a token). [`ipc_open`](GpuBackend::ipc_open) is
//!   `cuIpcOpenMemHandle_v2` in the selected context, only in another process (the driver
//!   refuses the exporting one); the mapped range is checked with `cuMemGetAddressRange`
//!   to hold the size the exporter registered, and recorded as an *import*: never freed
//!   or scrubbed here, closed by [`ipc_close`](GpuBackend::ipc_close)
//!   (`cuIpcCloseMemHandle`), before its context is destroyed, or at `Drop`.
//!
//! [`mem_free`]: GpuBackend::mem_free
#![allow(unsafe_code)]

use super::{CuError, CuResult, GpuBackend, LaunchConfig, ParamSlot};
use cudarc::driver::sys;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::ffi::{c_char, c_int, c_uchar, c_uint, c_ushort, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use vgpu_proto::{DeviceInfo, LaunchAttr};

mod arrays;
mod copies;
mod graphs;
mod link;
mod vmm;
pub use arrays::CudaArray;
pub use graphs::{CudaGraph, CudaGraphExec};
pub use link::CudaLink;
pub use vmm::CudaPhys;

/// `CUresult` as the C ABI returns it (an `enum` of `unsigned int` size). Kept as an
/// integer so that codes newer than the bindings are representable.
type RawCuResult = u32;

/// `CUDA_SUCCESS`.
const CUDA_SUCCESS: RawCuResult = 0;
/// `CUDA_ERROR_INVALID_VALUE`: also how `cuFuncGetParamInfo` says "past the last".
const CUDA_ERROR_INVALID_VALUE: RawCuResult = 1;
/// `CUDA_ERROR_NO_DEVICE`: `cuInit` found no usable device.
const CUDA_ERROR_NO_DEVICE: RawCuResult = 100;
/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`: `cuIpcOpenMemHandle` takes exactly this flag
/// (the driver refuses 0 with `CUDA_ERROR_INVALID_VALUE`; checked here first).
const IPC_MEM_LAZY_ENABLE_PEER_ACCESS: u32 = 1;

/// The direction of a DMA between the device and the registered data window.
#[derive(Clone, Copy, Debug)]
enum WindowDma {
    /// Window to device.
    ToDevice,
    /// Device to window.
    FromDevice,
}

/// Length of the buffer for `cuDeviceGetName` (the name is at most 256 bytes with its NUL).
const NAME_BUF_LEN: usize = 256;
/// Length of the buffer for `cuDeviceGetPCIBusId` (`dddd:bb:dd.f` needs 13 bytes).
const PCI_BUS_ID_LEN: usize = 64;
/// The most kernel parameters [`GpuBackend::func_param_layout`] reports; a function with
/// more is refused (`CUDA_ERROR_NOT_SUPPORTED`) rather than described in part.
const MAX_KERNEL_PARAMS: usize = 1024;

/// Object ids (streams, events, contexts, modules, functions) are unique in the process
/// and never reused, so a stale or foreign object is always recognised as such.
static NEXT_OBJECT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh process-unique object id.
fn next_id() -> u64 {
    NEXT_OBJECT_ID.fetch_add(1, Ordering::Relaxed)
}

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
                        // in cuda.h (13.0, and every release since the symbol appeared),
                        // with `CUresult` and enum arguments as their `unsigned int`/`int`
                        // representations; the library outlives the pointer.
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
    /// `cuDeviceGetPCIBusId`.
    device_get_pci_bus_id = "cuDeviceGetPCIBusId": fn(*mut c_char, c_int, sys::CUdevice);
    /// `cuDevicePrimaryCtxRetain`.
    primary_ctx_retain = "cuDevicePrimaryCtxRetain": fn(*mut sys::CUcontext, sys::CUdevice);
    /// `cuDevicePrimaryCtxRelease_v2`.
    primary_ctx_release = "cuDevicePrimaryCtxRelease_v2": fn(sys::CUdevice);
    /// `cuDevicePrimaryCtxSetFlags_v2`.
    primary_ctx_set_flags = "cuDevicePrimaryCtxSetFlags_v2": fn(sys::CUdevice, c_uint);
    /// `cuDevicePrimaryCtxGetState`.
    primary_ctx_get_state = "cuDevicePrimaryCtxGetState": fn(sys::CUdevice, *mut c_uint, *mut c_int);
    /// `cuCtxCreate_v4` (the 13.0 `cuCtxCreate`; the parameters may be NULL).
    ctx_create = "cuCtxCreate_v4": fn(*mut sys::CUcontext, *mut sys::CUctxCreateParams, c_uint, sys::CUdevice);
    /// `cuCtxDestroy_v2`.
    ctx_destroy = "cuCtxDestroy_v2": fn(sys::CUcontext);
    /// `cuCtxPopCurrent_v2`.
    ctx_pop_current = "cuCtxPopCurrent_v2": fn(*mut sys::CUcontext);
    /// `cuCtxSetCurrent`.
    ctx_set_current = "cuCtxSetCurrent": fn(sys::CUcontext);
    /// `cuCtxSynchronize`.
    ctx_synchronize = "cuCtxSynchronize": fn();
    /// `cuCtxGetLimit` (the `CUlimit` as its `int` value).
    ctx_get_limit = "cuCtxGetLimit": fn(*mut usize, c_int);
    /// `cuCtxSetLimit`.
    ctx_set_limit = "cuCtxSetLimit": fn(c_int, usize);
    /// `cuCtxGetFlags`.
    ctx_get_flags = "cuCtxGetFlags": fn(*mut c_uint);
    /// `cuCtxSetFlags`.
    ctx_set_flags = "cuCtxSetFlags": fn(c_uint);
    /// `cuCtxGetApiVersion`.
    ctx_get_api_version = "cuCtxGetApiVersion": fn(sys::CUcontext, *mut c_uint);
    /// `cuCtxGetStreamPriorityRange`.
    ctx_get_stream_priority_range = "cuCtxGetStreamPriorityRange": fn(*mut c_int, *mut c_int);
    /// `cuCtxGetCacheConfig` (the `CUfunc_cache` written as an `int`).
    ctx_get_cache_config = "cuCtxGetCacheConfig": fn(*mut c_int);
    /// `cuCtxSetCacheConfig`.
    ctx_set_cache_config = "cuCtxSetCacheConfig": fn(c_int);
    /// `cuMemGetInfo_v2`.
    mem_get_info = "cuMemGetInfo_v2": fn(*mut usize, *mut usize);
    /// `cuMemAlloc_v2`.
    mem_alloc = "cuMemAlloc_v2": fn(*mut sys::CUdeviceptr, usize);
    /// `cuMemAllocPitch_v2`.
    mem_alloc_pitch = "cuMemAllocPitch_v2": fn(*mut sys::CUdeviceptr, *mut usize, usize, usize, c_uint);
    /// `cuMemFree_v2`.
    mem_free = "cuMemFree_v2": fn(sys::CUdeviceptr);
    /// `cuMemGetAddressRange_v2`.
    mem_get_address_range = "cuMemGetAddressRange_v2": fn(*mut sys::CUdeviceptr, *mut usize, sys::CUdeviceptr);
    /// `cuIpcGetMemHandle`.
    ipc_get_mem_handle = "cuIpcGetMemHandle": fn(*mut sys::CUipcMemHandle, sys::CUdeviceptr);
    /// `cuIpcOpenMemHandle_v2` (the 13.0 `cuIpcOpenMemHandle`; the handle by value).
    ipc_open_mem_handle = "cuIpcOpenMemHandle_v2": fn(*mut sys::CUdeviceptr, sys::CUipcMemHandle, c_uint);
    /// `cuIpcCloseMemHandle`.
    ipc_close_mem_handle = "cuIpcCloseMemHandle": fn(sys::CUdeviceptr);
    /// `cuIpcGetEventHandle`.
    ipc_get_event_handle = "cuIpcGetEventHandle": fn(*mut sys::CUipcEventHandle, sys::CUevent);
    /// `cuIpcOpenEventHandle`.
    ipc_open_event_handle = "cuIpcOpenEventHandle": fn(*mut sys::CUevent, sys::CUipcEventHandle);
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
    /// `cuMemsetD16_v2`.
    memset_d16 = "cuMemsetD16_v2": fn(sys::CUdeviceptr, c_ushort, usize);
    /// `cuMemsetD16Async`.
    memset_d16_async = "cuMemsetD16Async": fn(sys::CUdeviceptr, c_ushort, usize, sys::CUstream);
    /// `cuMemsetD32_v2`.
    memset_d32 = "cuMemsetD32_v2": fn(sys::CUdeviceptr, c_uint, usize);
    /// `cuMemsetD32Async`.
    memset_d32_async = "cuMemsetD32Async": fn(sys::CUdeviceptr, c_uint, usize, sys::CUstream);
    /// `cuMemsetD2D8_v2`.
    memset_2d8 = "cuMemsetD2D8_v2": fn(sys::CUdeviceptr, usize, c_uchar, usize, usize);
    /// `cuMemsetD2D8Async`.
    memset_2d8_async = "cuMemsetD2D8Async": fn(sys::CUdeviceptr, usize, c_uchar, usize, usize, sys::CUstream);
    /// `cuMemsetD2D16_v2`.
    memset_2d16 = "cuMemsetD2D16_v2": fn(sys::CUdeviceptr, usize, c_ushort, usize, usize);
    /// `cuMemsetD2D16Async`.
    memset_2d16_async = "cuMemsetD2D16Async": fn(sys::CUdeviceptr, usize, c_ushort, usize, usize, sys::CUstream);
    /// `cuMemsetD2D32_v2`.
    memset_2d32 = "cuMemsetD2D32_v2": fn(sys::CUdeviceptr, usize, c_uint, usize, usize);
    /// `cuMemsetD2D32Async`.
    memset_2d32_async = "cuMemsetD2D32Async": fn(sys::CUdeviceptr, usize, c_uint, usize, usize, sys::CUstream);
    /// `cuLinkCreate_v2`.
    link_create = "cuLinkCreate_v2": fn(c_uint, *mut c_uint, *mut *mut c_void, *mut sys::CUlinkState);
    /// `cuLinkAddData_v2`.
    link_add_data = "cuLinkAddData_v2": fn(
        sys::CUlinkState,
        c_uint,
        *mut c_void,
        usize,
        *const c_char,
        c_uint,
        *mut c_uint,
        *mut *mut c_void,
    );
    /// `cuLinkComplete`.
    link_complete = "cuLinkComplete": fn(sys::CUlinkState, *mut *mut c_void, *mut usize);
    /// `cuLinkDestroy`.
    link_destroy = "cuLinkDestroy": fn(sys::CUlinkState);
    /// `cuModuleGetFunctionCount`.
    module_get_function_count = "cuModuleGetFunctionCount": fn(*mut c_uint, sys::CUmodule);
    /// `cuModuleEnumerateFunctions`.
    module_enumerate_functions = "cuModuleEnumerateFunctions": fn(*mut sys::CUfunction, c_uint, sys::CUmodule);
    /// `cuArray3DCreate_v2`.
    array_3d_create = "cuArray3DCreate_v2": fn(*mut sys::CUarray, *const arrays::RawArray3dDesc);
    /// `cuArrayDestroy`.
    array_destroy = "cuArrayDestroy": fn(sys::CUarray);
    /// `cuTexObjectCreate` (descriptors as bytes of their C layout).
    tex_object_create = "cuTexObjectCreate": fn(*mut sys::CUtexObject, *const c_void, *const c_void, *const c_void);
    /// `cuTexObjectDestroy`.
    tex_object_destroy = "cuTexObjectDestroy": fn(sys::CUtexObject);
    /// `cuSurfObjectCreate`.
    surf_object_create = "cuSurfObjectCreate": fn(*mut sys::CUsurfObject, *const c_void);
    /// `cuSurfObjectDestroy`.
    surf_object_destroy = "cuSurfObjectDestroy": fn(sys::CUsurfObject);
    /// `cuMemcpy2D_v2`.
    memcpy_2d = "cuMemcpy2D_v2": fn(*const copies::RawMemcpy2d);
    /// `cuMemcpy2DAsync_v2`.
    memcpy_2d_async = "cuMemcpy2DAsync_v2": fn(*const copies::RawMemcpy2d, sys::CUstream);
    /// `cuMemcpy2DUnaligned_v2`.
    memcpy_2d_unaligned = "cuMemcpy2DUnaligned_v2": fn(*const copies::RawMemcpy2d);
    /// `cuMemcpy3D_v2`.
    memcpy_3d = "cuMemcpy3D_v2": fn(*const copies::RawMemcpy3d);
    /// `cuMemcpy3DAsync_v2`.
    memcpy_3d_async = "cuMemcpy3DAsync_v2": fn(*const copies::RawMemcpy3d, sys::CUstream);
    /// `cuModuleLoadData`.
    module_load_data = "cuModuleLoadData": fn(*mut sys::CUmodule, *const c_void);
    /// `cuModuleUnload`.
    module_unload = "cuModuleUnload": fn(sys::CUmodule);
    /// `cuModuleGetFunction`.
    module_get_function = "cuModuleGetFunction": fn(*mut sys::CUfunction, sys::CUmodule, *const c_char);
    /// `cuModuleGetGlobal_v2`.
    module_get_global = "cuModuleGetGlobal_v2": fn(*mut sys::CUdeviceptr, *mut usize, sys::CUmodule, *const c_char);
    /// `cuLibraryLoadData` (the option kinds as `int`s; always passed empty).
    library_load_data = "cuLibraryLoadData": fn(
        *mut sys::CUlibrary,
        *const c_void,
        *mut c_int,
        *mut *mut c_void,
        c_uint,
        *mut c_int,
        *mut *mut c_void,
        c_uint,
    );
    /// `cuLibraryUnload`.
    library_unload = "cuLibraryUnload": fn(sys::CUlibrary);
    /// `cuLibraryGetModule`.
    library_get_module = "cuLibraryGetModule": fn(*mut sys::CUmodule, sys::CUlibrary);
    /// `cuLibraryGetKernel`.
    library_get_kernel = "cuLibraryGetKernel": fn(*mut sys::CUkernel, sys::CUlibrary, *const c_char);
    /// `cuLibraryGetGlobal`.
    library_get_global = "cuLibraryGetGlobal": fn(*mut sys::CUdeviceptr, *mut usize, sys::CUlibrary, *const c_char);
    /// `cuKernelGetFunction`.
    kernel_get_function = "cuKernelGetFunction": fn(*mut sys::CUfunction, sys::CUkernel);
    /// `cuFuncGetAttribute` (the `CUfunction_attribute` as its `int` value).
    func_get_attribute = "cuFuncGetAttribute": fn(*mut c_int, c_int, sys::CUfunction);
    /// `cuKernelGetAttribute`.
    kernel_get_attribute = "cuKernelGetAttribute": fn(*mut c_int, c_int, sys::CUkernel, sys::CUdevice);
    /// `cuFuncSetAttribute`.
    func_set_attribute = "cuFuncSetAttribute": fn(sys::CUfunction, c_int, c_int);
    /// `cuKernelSetAttribute`.
    kernel_set_attribute = "cuKernelSetAttribute": fn(c_int, c_int, sys::CUkernel, sys::CUdevice);
    /// `cuFuncSetCacheConfig` (the `CUfunc_cache` as its `int` value).
    func_set_cache_config = "cuFuncSetCacheConfig": fn(sys::CUfunction, c_int);
    /// `cuKernelSetCacheConfig`.
    kernel_set_cache_config = "cuKernelSetCacheConfig": fn(sys::CUkernel, c_int, sys::CUdevice);
    /// `cuFuncGetParamInfo` (since CUDA 12.4).
    func_get_param_info = "cuFuncGetParamInfo": fn(sys::CUfunction, usize, *mut usize, *mut usize);
    /// `cuKernelGetParamInfo` (since CUDA 12.4).
    kernel_get_param_info = "cuKernelGetParamInfo": fn(sys::CUkernel, usize, *mut usize, *mut usize);
    /// `cuLaunchKernel`.
    launch_kernel = "cuLaunchKernel": fn(
        sys::CUfunction,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        sys::CUstream,
        *mut *mut c_void,
        *mut *mut c_void,
    );
    /// `cuLaunchKernelEx`, with this module's mirror of `CUlaunchConfig`.
    launch_kernel_ex = "cuLaunchKernelEx": fn(*const RawLaunchConfig, sys::CUfunction, *mut *mut c_void, *mut *mut c_void);
    /// `cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags`.
    occupancy_max_active_blocks = "cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags": fn(
        *mut c_int,
        sys::CUfunction,
        c_int,
        usize,
        c_uint,
    );
    /// `cuOccupancyAvailableDynamicSMemPerBlock`.
    occupancy_available_smem = "cuOccupancyAvailableDynamicSMemPerBlock": fn(*mut usize, sys::CUfunction, c_int, c_int);
    /// `cuOccupancyMaxActiveClusters`.
    occupancy_max_active_clusters = "cuOccupancyMaxActiveClusters": fn(*mut c_int, sys::CUfunction, *const RawLaunchConfig);
    /// `cuGetExportTable` (the private table behind `ctx_query_value`).
    get_export_table = "cuGetExportTable": fn(*mut *const c_void, *const sys::CUuuid);
    /// `cuStreamCreateWithPriority`.
    stream_create = "cuStreamCreateWithPriority": fn(*mut sys::CUstream, c_uint, c_int);
    /// `cuStreamSynchronize`.
    stream_synchronize = "cuStreamSynchronize": fn(sys::CUstream);
    /// `cuMemHostRegister_v2` (the shared data window, once per zone).
    mem_host_register = "cuMemHostRegister_v2": fn(*mut c_void, usize, c_uint);
    /// `cuLaunchHostFunc`.
    launch_host_func = "cuLaunchHostFunc": fn(sys::CUstream, Option<unsafe extern "C" fn(*mut c_void)>, *mut c_void);
    /// `cuMemGetAllocationGranularity`.
    mem_get_granularity = "cuMemGetAllocationGranularity": fn(*mut usize, *const vmm::RawAllocProp, c_uint);
    /// `cuMemAddressReserve`.
    mem_address_reserve = "cuMemAddressReserve": fn(*mut sys::CUdeviceptr, usize, usize, sys::CUdeviceptr, u64);
    /// `cuMemAddressFree`.
    mem_address_free = "cuMemAddressFree": fn(sys::CUdeviceptr, usize);
    /// `cuMemCreate`.
    mem_create = "cuMemCreate": fn(*mut sys::CUmemGenericAllocationHandle, usize, *const vmm::RawAllocProp, u64);
    /// `cuMemRelease`.
    mem_release = "cuMemRelease": fn(sys::CUmemGenericAllocationHandle);
    /// `cuMemMap`.
    mem_map = "cuMemMap": fn(sys::CUdeviceptr, usize, usize, sys::CUmemGenericAllocationHandle, u64);
    /// `cuMemUnmap`.
    mem_unmap = "cuMemUnmap": fn(sys::CUdeviceptr, usize);
    /// `cuMemSetAccess`.
    mem_set_access = "cuMemSetAccess": fn(sys::CUdeviceptr, usize, *const vmm::RawAccessDesc, usize);
    /// `cuGraphCreate`.
    graph_create = "cuGraphCreate": fn(*mut sys::CUgraph, c_uint);
    /// `cuGraphDestroy`.
    graph_destroy = "cuGraphDestroy": fn(sys::CUgraph);
    /// `cuGraphClone`.
    graph_clone = "cuGraphClone": fn(*mut sys::CUgraph, sys::CUgraph);
    /// `cuGraphAddEmptyNode`.
    graph_add_empty_node = "cuGraphAddEmptyNode": fn(*mut sys::CUgraphNode, sys::CUgraph, *const sys::CUgraphNode, usize);
    /// `cuGraphAddKernelNode_v2`.
    graph_add_kernel_node = "cuGraphAddKernelNode_v2": fn(
        *mut sys::CUgraphNode,
        sys::CUgraph,
        *const sys::CUgraphNode,
        usize,
        *const sys::CUDA_KERNEL_NODE_PARAMS_v2_st,
    );
    /// `cuGraphAddMemsetNode`.
    graph_add_memset_node = "cuGraphAddMemsetNode": fn(
        *mut sys::CUgraphNode,
        sys::CUgraph,
        *const sys::CUgraphNode,
        usize,
        *const sys::CUDA_MEMSET_NODE_PARAMS_st,
        sys::CUcontext,
    );
    /// `cuGraphAddMemcpyNode`.
    graph_add_memcpy_node = "cuGraphAddMemcpyNode": fn(
        *mut sys::CUgraphNode,
        sys::CUgraph,
        *const sys::CUgraphNode,
        usize,
        *const copies::RawMemcpy3d,
        sys::CUcontext,
    );
    /// `cuGraphAddHostNode`.
    graph_add_host_node = "cuGraphAddHostNode": fn(
        *mut sys::CUgraphNode,
        sys::CUgraph,
        *const sys::CUgraphNode,
        usize,
        *const sys::CUDA_HOST_NODE_PARAMS_st,
    );
    /// `cuGraphNodeFindInClone`.
    graph_node_find_in_clone = "cuGraphNodeFindInClone": fn(*mut sys::CUgraphNode, sys::CUgraphNode, sys::CUgraph);
    /// `cuGraphGetNodes`.
    graph_get_nodes = "cuGraphGetNodes": fn(sys::CUgraph, *mut sys::CUgraphNode, *mut usize);
    /// `cuGraphInstantiateWithFlags`.
    graph_instantiate = "cuGraphInstantiateWithFlags": fn(*mut sys::CUgraphExec, sys::CUgraph, u64);
    /// `cuGraphExecDestroy`.
    graph_exec_destroy = "cuGraphExecDestroy": fn(sys::CUgraphExec);
    /// `cuGraphLaunch`.
    graph_launch = "cuGraphLaunch": fn(sys::CUgraphExec, sys::CUstream);
    /// `cuGraphUpload`.
    graph_upload = "cuGraphUpload": fn(sys::CUgraphExec, sys::CUstream);
    /// `cuStreamBeginCapture_v2`.
    stream_begin_capture = "cuStreamBeginCapture_v2": fn(sys::CUstream, c_uint);
    /// `cuStreamEndCapture`.
    stream_end_capture = "cuStreamEndCapture": fn(sys::CUstream, *mut sys::CUgraph);
    /// `cuStreamGetCaptureInfo_v3` (status and id; the other outputs NULL).
    stream_get_capture_info = "cuStreamGetCaptureInfo_v3": fn(
        sys::CUstream,
        *mut c_uint,
        *mut u64,
        *mut c_void,
        *mut c_void,
        *mut c_void,
        *mut c_void,
    );
    /// `cuThreadExchangeStreamCaptureMode`.
    thread_exchange_capture_mode = "cuThreadExchangeStreamCaptureMode": fn(*mut c_uint);
    /// `cuMemHostGetDevicePointer_v2`.
    mem_host_get_device_pointer = "cuMemHostGetDevicePointer_v2": fn(*mut sys::CUdeviceptr, *mut c_void, c_uint);
    /// `cuMemHostUnregister`.
    mem_host_unregister = "cuMemHostUnregister": fn(*mut c_void);
    /// `cuStreamQuery`.
    stream_query = "cuStreamQuery": fn(sys::CUstream);
    /// `cuStreamWaitEvent`.
    stream_wait_event = "cuStreamWaitEvent": fn(sys::CUstream, sys::CUevent, c_uint);
    /// `cuStreamGetFlags`.
    stream_get_flags = "cuStreamGetFlags": fn(sys::CUstream, *mut c_uint);
    /// `cuStreamGetPriority`.
    stream_get_priority = "cuStreamGetPriority": fn(sys::CUstream, *mut c_int);
    /// `cuStreamDestroy_v2`.
    stream_destroy = "cuStreamDestroy_v2": fn(sys::CUstream);
    /// `cuEventCreate`.
    event_create = "cuEventCreate": fn(*mut sys::CUevent, c_uint);
    /// `cuEventDestroy_v2`.
    event_destroy = "cuEventDestroy_v2": fn(sys::CUevent);
    /// `cuEventRecordWithFlags`.
    event_record = "cuEventRecordWithFlags": fn(sys::CUevent, sys::CUstream, c_uint);
    /// `cuEventQuery`.
    event_query = "cuEventQuery": fn(sys::CUevent);
    /// `cuEventSynchronize`.
    event_synchronize = "cuEventSynchronize": fn(sys::CUevent);
    /// `cuEventElapsedTime_v2` (the 13.0 name; since CUDA 12.8).
    event_elapsed_time = "cuEventElapsedTime_v2": fn(*mut f32, sys::CUevent, sys::CUevent);
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
fn check(code: RawCuResult) -> CuResult<()> {
    if code == CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CuError::new(code))
    }
}

/// A byte count as the driver's `size_t`.
fn byte_count(len: u64) -> CuResult<usize> {
    usize::try_from(len).map_err(|_| CuError::INVALID_VALUE)
}

/// A guest-supplied enum value (`CUlimit`, `CUfunction_attribute`, …) as the C `int` the
/// driver takes; values that do not fit are no valid enumerator anyway.
fn enum_arg(value: u32) -> CuResult<c_int> {
    c_int::try_from(value).map_err(|_| CuError::INVALID_VALUE)
}

/// The text of a NUL-terminated C string in `buf` (all of `buf` if it has no NUL).
fn c_buf_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---- module images ----

use crate::image::{fatbin_payloads, in_bounds, read_u16, read_u32, read_u64, ELF_MAGIC, FATBIN_MAGIC};

/// The magic of `__fatBinC_Wrapper_t`: a host structure that holds a *pointer* to a fat
/// binary, so it must never reach the driver from a guest.
const FATBIN_WRAPPER_MAGIC: u32 = 0x4662_43B1;
/// `SHT_NOBITS`: an ELF section that occupies no bytes of the file (`.bss`).
const SHT_NOBITS: u32 = 8;

/// Checks that the driver, reading a module image that comes without a length, reads
/// only inside `image`:
/// - an ELF cubin (64-bit, little-endian): its program and section header tables and
///   every section with file contents lie inside the image ([`elf_extent_ok`]);
/// - a fat binary: its container, every entry's header and payload, and the ELF extents
///   of uncompressed cubin payloads lie inside the image ([`fatbin_extent_ok`]);
/// - anything else is taken as PTX text, which the driver reads up to its NUL: there must
///   be one, and the text before it must be UTF-8. That keeps out binary formats this
///   check does not know, such as the fat binary *wrapper* (which holds a host pointer).
///
/// What lies inside sections and payloads is the driver's to validate.
fn check_image(image: &[u8]) -> CuResult<()> {
    let ok = if image.starts_with(&ELF_MAGIC) {
        elf_extent_ok(image)
    } else {
        match read_u32(image, 0) {
            Some(FATBIN_MAGIC) => fatbin_extent_ok(image),
            Some(FATBIN_WRAPPER_MAGIC) => false,
            _ => image.iter().position(|&b| b == 0).is_some_and(|nul| std::str::from_utf8(&image[..nul]).is_ok()),
        }
    };
    if ok {
        Ok(())
    } else {
        Err(CuError::INVALID_VALUE)
    }
}

/// Whether an ELF64 little-endian image's header tables and sections lie inside `elf`.
fn elf_extent_ok(elf: &[u8]) -> bool {
    const EI_CLASS_64: u8 = 2;
    const EI_DATA_LE: u8 = 1;
    if elf.len() < 64 || elf[4] != EI_CLASS_64 || elf[5] != EI_DATA_LE {
        return false;
    }
    let header = (
        read_u64(elf, 0x20),
        read_u64(elf, 0x28),
        read_u16(elf, 0x36),
        read_u16(elf, 0x38),
        read_u16(elf, 0x3a),
        read_u16(elf, 0x3c),
        read_u16(elf, 0x3e),
    );
    let (Some(phoff), Some(shoff), Some(phentsize), Some(phnum), Some(shentsize), Some(shnum), Some(shstrndx)) = header
    else {
        return false;
    };
    // Extended numbering (`e_shnum == 0` with a table, `SHN_XINDEX`) is never produced for
    // cubins; refusing it keeps the count below exact.
    if (shnum == 0 && shoff != 0) || (shstrndx != 0 && shstrndx >= shnum) {
        return false;
    }
    let table_ok = |offset: u64, entsize: u16, num: u16, min_entsize: u16| {
        num == 0 || (entsize >= min_entsize && in_bounds(elf, offset, u64::from(entsize) * u64::from(num)))
    };
    if !table_ok(phoff, phentsize, phnum, 56) || !table_ok(shoff, shentsize, shnum, 64) {
        return false;
    }
    let segments_ok = (0..u64::from(phnum)).all(|i| {
        let at = phoff + i * u64::from(phentsize);
        match (read_u64(elf, at + 0x08), read_u64(elf, at + 0x20)) {
            (Some(offset), Some(filesz)) => in_bounds(elf, offset, filesz),
            _ => false,
        }
    });
    let sections_ok = (0..u64::from(shnum)).all(|i| {
        let at = shoff + i * u64::from(shentsize);
        match (read_u32(elf, at + 0x04), read_u64(elf, at + 0x18), read_u64(elf, at + 0x20)) {
            (Some(SHT_NOBITS), Some(_), Some(_)) => true,
            (Some(_), Some(offset), Some(size)) => in_bounds(elf, offset, size),
            _ => false,
        }
    });
    segments_ok && sections_ok
}

/// Whether a fat binary's container, entries and uncompressed cubins lie inside `image`
/// (the container and entries: [`fatbin_payloads`]).
fn fatbin_extent_ok(image: &[u8]) -> bool {
    fatbin_payloads(image).is_some_and(|bodies| bodies.iter().all(|b| !b.starts_with(&ELF_MAGIC) || elf_extent_ok(b)))
}

// ---- launches ----

/// Launch attributes whose value is plain integers, the only ones passed to the driver.
/// Left out: the access-policy window (a pointer, and wider than the 16 bytes a
/// [`LaunchAttr`] carries), the programmatic and launch-completion events (event
/// handles), the device-updatable kernel node (for graphs; the driver writes a handle)
/// and every id newer than the bindings (its value could be anything).
const PLAIN_LAUNCH_ATTRIBUTES: [sys::CUlaunchAttributeID; 12] = [
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_IGNORE,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_SYNCHRONIZATION_POLICY,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PRIORITY,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_MEM_SYNC_DOMAIN_MAP,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_MEM_SYNC_DOMAIN,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PREFERRED_CLUSTER_DIMENSION,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
    sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_NVLINK_UTIL_CENTRIC_SCHEDULING,
];

/// Whether a `cuLaunchKernelEx` attribute (`CUlaunchAttributeID`) carries only plain
/// integers, so that its value can be passed to the driver from untrusted bytes. Others
/// are refused with `CUDA_ERROR_NOT_SUPPORTED` (by both backends).
pub fn is_plain_launch_attribute(id: u32) -> bool {
    PLAIN_LAUNCH_ATTRIBUTES.iter().any(|&a| a as u32 == id)
}

/// `CUlaunchAttribute` with its id as a plain integer (see the module docs). The value
/// union is 64 bytes, 8-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RawLaunchAttribute {
    id: u32,
    pad: [u8; 4],
    value: [u64; 8],
}

/// `CUlaunchConfig` pointing at [`RawLaunchAttribute`]s.
#[repr(C)]
#[derive(Debug)]
struct RawLaunchConfig {
    grid_dim: [c_uint; 3],
    block_dim: [c_uint; 3],
    shared_mem_bytes: c_uint,
    stream: sys::CUstream,
    attrs: *mut RawLaunchAttribute,
    num_attrs: c_uint,
}

// The mirrors must match the bindings' C layout exactly.
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RawLaunchAttribute>() == size_of::<sys::CUlaunchAttribute>());
    assert!(align_of::<RawLaunchAttribute>() == align_of::<sys::CUlaunchAttribute>());
    assert!(offset_of!(RawLaunchAttribute, value) == offset_of!(sys::CUlaunchAttribute, value));
    assert!(size_of::<RawLaunchConfig>() == size_of::<sys::CUlaunchConfig>());
    assert!(align_of::<RawLaunchConfig>() == align_of::<sys::CUlaunchConfig>());
    assert!(offset_of!(RawLaunchConfig, block_dim) == offset_of!(sys::CUlaunchConfig, blockDimX));
    assert!(offset_of!(RawLaunchConfig, shared_mem_bytes) == offset_of!(sys::CUlaunchConfig, sharedMemBytes));
    assert!(offset_of!(RawLaunchConfig, stream) == offset_of!(sys::CUlaunchConfig, hStream));
    assert!(offset_of!(RawLaunchConfig, attrs) == offset_of!(sys::CUlaunchConfig, attrs));
    assert!(offset_of!(RawLaunchConfig, num_attrs) == offset_of!(sys::CUlaunchConfig, numAttrs));
};

/// A [`LaunchAttr`] as the driver's struct: the id, and the value union's first 16 bytes
/// rebuilt from the four little-endian words (the rest zero).
fn raw_launch_attribute(attr: &LaunchAttr) -> CuResult<RawLaunchAttribute> {
    if !is_plain_launch_attribute(attr.id) {
        return Err(CuError::NOT_SUPPORTED);
    }
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(attr.value) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let (mut lo, mut hi) = ([0u8; 8], [0u8; 8]);
    lo.copy_from_slice(&bytes[..8]);
    hi.copy_from_slice(&bytes[8..]);
    let mut value = [0u64; 8];
    // Native order: the words' bytes land in memory exactly as `bytes` holds them.
    value[0] = u64::from_ne_bytes(lo);
    value[1] = u64::from_ne_bytes(hi);
    Ok(RawLaunchAttribute { id: attr.id, pad: [0; 4], value })
}

/// A private, 8-byte aligned copy of a launch's parameter buffer, from which the
/// driver reads each parameter.
#[derive(Debug)]
struct ParamBuffer {
    /// Inline up to 256 bytes of parameters: no allocation on a typical launch.
    words: SmallVec<[u64; 32]>,
    len: usize,
}

impl ParamBuffer {
    /// Copies `params`.
    fn new(params: &[u8]) -> ParamBuffer {
        let words = params
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(word)
            })
            .collect();
        ParamBuffer { words, len: params.len() }
    }

    /// A pointer to each parameter of `layout`, each `[offset, offset + size)` checked to
    /// lie in the buffer (`CUDA_ERROR_INVALID_VALUE` otherwise). The pointers are valid
    /// while `self` is neither dropped nor changed.
    fn pointers(&mut self, layout: &[ParamSlot]) -> CuResult<SmallVec<[*mut c_void; 32]>> {
        let base = self.words.as_mut_ptr().cast::<u8>();
        layout
            .iter()
            .map(|slot| {
                let offset = usize::try_from(slot.offset).map_err(|_| CuError::INVALID_VALUE)?;
                let size = usize::try_from(slot.size).map_err(|_| CuError::INVALID_VALUE)?;
                match offset.checked_add(size) {
                    Some(end) if end <= self.len => Ok(base.wrapping_add(offset).cast::<c_void>()),
                    _ => Err(CuError::INVALID_VALUE),
                }
            })
            .collect()
    }
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
        "libcuda has no entry point {symbol}: the NVIDIA driver is too old (CUDA 12.8 or later is needed): {detail}"
    )]
    MissingEntryPoint {
        /// The missing symbol.
        symbol: &'static str,
        /// The loader's message.
        detail: String,
    },
    /// `cuInit` failed.
    #[error("cuInit failed with {name} (CUDA error {}): the driver library loaded but could not start; check that the nvidia kernel module is loaded, /dev/nvidia* is accessible, and libcuda.so is not the toolkit's stub library", .err.code())]
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
    #[error("{call} failed with {name} (CUDA error {}) for device {ordinal}", .err.code())]
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
    #[error("could not use the primary context of device {ordinal}: {call} failed with {name} (CUDA error {}); the device may be in exclusive-process mode and in use, or out of memory", .err.code())]
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

/// An event of a [`CudaGpu`] (an id, like [`CudaStream`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CudaEvent {
    id: u64,
}

/// A context made by [`GpuBackend::ctx_create`] (an id, like [`CudaStream`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CudaContext {
    id: u64,
}

/// A loaded module, a loaded library, or a library's module view (an id, like
/// [`CudaStream`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CudaModule {
    id: u64,
}

/// A function (`CUfunction`) or a library kernel (`CUkernel`) (an id, like
/// [`CudaStream`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CudaFunction {
    id: u64,
}

/// Which context something belongs to: `None` is the primary context, `Some(id)` a
/// context in [`CudaGpu::contexts`].
type CtxId = Option<u64>;

/// Where an object lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// In one context: it goes when the context is destroyed.
    Context(CtxId),
    /// In every context (libraries and their kernels).
    Device,
}

/// A live allocation.
#[derive(Clone, Copy, Debug)]
struct Allocation {
    /// Size in bytes (`pitch * height` for pitched allocations).
    size: u64,
    /// The context it was made in.
    ctx: CtxId,
}

/// A live stream or event.
#[derive(Clone, Copy, Debug)]
struct Owned<T> {
    raw: T,
    ctx: CtxId,
}

/// What a [`CudaModule`] names.
#[derive(Clone, Copy, Debug)]
enum ModuleKind {
    /// A module loaded by `cuModuleLoadData`.
    Module(sys::CUmodule),
    /// A library loaded by `cuLibraryLoadData`.
    Library(sys::CUlibrary),
    /// A library's module in one context (`cuLibraryGetModule`); not owned.
    LibraryView(sys::CUmodule),
}

/// A live module, library or library view.
#[derive(Clone, Copy, Debug)]
struct ModuleEntry {
    kind: ModuleKind,
    scope: Scope,
    /// The module or library whose unloading ends this entry (itself, for those two).
    root: u64,
}

/// What a [`CudaFunction`] names.
#[derive(Clone, Copy, Debug)]
enum FunctionKind {
    /// A `CUfunction`.
    Function(sys::CUfunction),
    /// A library's `CUkernel`.
    Kernel(sys::CUkernel),
}

impl FunctionKind {
    /// The handle to launch or query occupancy with: a `CUkernel` cast to `CUfunction` is
    /// accepted by `cuLaunchKernel(Ex)` and the occupancy functions since CUDA 12.0, and
    /// runs in the current context.
    fn as_function(self) -> sys::CUfunction {
        match self {
            FunctionKind::Function(f) => f,
            FunctionKind::Kernel(k) => k.cast(),
        }
    }
}

/// A live function or kernel.
#[derive(Clone, Debug)]
struct FunctionEntry {
    kind: FunctionKind,
    scope: Scope,
    /// The module or library it came from: unloading that ends this entry.
    root: u64,
    /// Its parameters as the driver reports them, once asked for.
    layout: Option<Vec<ParamSlot>>,
}

/// One real CUDA device: its primary context and the contexts made in it.
pub struct CudaGpu {
    api: DriverApi,
    ordinal: i32,
    device: sys::CUdevice,
    /// The primary context, retained in `open`, released in `Drop`.
    primary: sys::CUcontext,
    /// The selected context, made current by every operation.
    current: CtxId,
    info: DeviceInfo,
    // The maps are keyed by ids this backend hands out and by driver addresses, never by
    // values a guest chooses, so an unkeyed fast hash is safe (and several lookups sit on
    // every launch's path).
    /// Contexts made by `ctx_create`, by [`CudaContext`] id.
    contexts: FxHashMap<u64, sys::CUcontext>,
    /// Live allocations by start address.
    allocs: FxHashMap<u64, Allocation>,
    /// Memory of other processes mapped by `ipc_open`, by address: its context.
    imports: FxHashMap<u64, CtxId>,
    /// Live streams by [`CudaStream`] id.
    streams: FxHashMap<u64, Owned<sys::CUstream>>,
    /// Live events by [`CudaEvent`] id.
    events: FxHashMap<u64, Owned<sys::CUevent>>,
    /// Live modules, libraries and library views by [`CudaModule`] id.
    modules: FxHashMap<u64, ModuleEntry>,
    /// Live functions and kernels by [`CudaFunction`] id.
    functions: FxHashMap<u64, FunctionEntry>,
    /// The zone's shared data window, registered with the driver (see `attach_window`).
    window: Option<(std::ptr::NonNull<u8>, usize)>,
    /// Physical allocations by [`CudaPhys`] id: the driver's handle and the size.
    phys: FxHashMap<u64, (sys::CUmemGenericAllocationHandle, u64)>,
    /// Live graphs by [`CudaGraph`] id (context-independent).
    graphs: FxHashMap<u64, sys::CUgraph>,
    /// Live CUDA arrays by [`CudaArray`] id.
    arrays: FxHashMap<u64, arrays::ArrayState>,
    /// Live executable graphs by [`CudaGraphExec`] id.
    graph_execs: FxHashMap<u64, Owned<sys::CUgraphExec>>,
    /// Host functions that may run more than once (graphs' host nodes), kept for the
    /// backend's life: the driver holds pointers to them in graphs it copies freely.
    host_slots: Vec<std::sync::Arc<super::HostFuncSlot>>,
}

// SAFETY: the driver API is thread-safe and its handles (contexts, streams, events,
// modules, libraries, functions, kernels, device pointers) are valid on any thread of the
// process. `CudaGpu` has no thread-affine state: every method, `Drop` included, first makes
// the context it needs current on the calling thread, and `&mut self` gives it one user at
// a time. It is not `Sync`.
unsafe impl Send for CudaGpu {}

impl std::fmt::Debug for CudaGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGpu")
            .field("ordinal", &self.ordinal)
            .field("name", &self.info.name)
            .field("current", &self.current)
            .field("contexts", &self.contexts.len())
            .field("allocations", &self.allocs.len())
            .field("imports", &self.imports.len())
            .field("streams", &self.streams.len())
            .field("events", &self.events.len())
            .field("modules", &self.modules.len())
            .field("functions", &self.functions.len())
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
            // SAFETY: valid out-pointer; `attr` is a `CUdevice_attribute` of the bindings,
            // passed as its C `int` value.
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
        let gpu = CudaGpu {
            api,
            ordinal,
            device,
            primary: ctx,
            current: None,
            info,
            contexts: FxHashMap::default(),
            allocs: FxHashMap::default(),
            imports: FxHashMap::default(),
            streams: FxHashMap::default(),
            window: None,
            phys: FxHashMap::default(),
            graphs: FxHashMap::default(),
            arrays: FxHashMap::default(),
            graph_execs: FxHashMap::default(),
            host_slots: Vec::new(),
            events: FxHashMap::default(),
            modules: FxHashMap::default(),
            functions: FxHashMap::default(),
        };
        gpu.enter().map_err(|err| CudaOpenError::Context {
            call: "cuCtxSetCurrent",
            ordinal,
            err,
            name: gpu.api.error_name(err.code()),
        })?;
        Ok(gpu)
    }

    /// Makes the selected context current on the calling thread (a thread-local store in
    /// the driver: cheap). Another instance, or other code, may have changed it.
    fn enter(&self) -> CuResult<()> {
        self.make_current(self.current)
    }

    /// Makes `ctx` current on the calling thread.
    fn make_current(&self, ctx: CtxId) -> CuResult<()> {
        let raw = self.raw_context(ctx)?;
        // SAFETY: `raw` is the primary context retained in `open` (released only in
        // `Drop`) or a context made by `ctx_create` that is still in `self.contexts`
        // (removed when it is destroyed).
        check(unsafe { (self.api.ctx_set_current)(raw) })
    }

    /// One DMA between device memory at `dev` and `len` bytes at `offset` in the registered
    /// window, on `stream` (NULL stream for `None`); with `wait`, the stream is synchronised
    /// before returning (the window bytes may then be reused or read).
    fn window_dma(
        &mut self,
        dir: WindowDma,
        dev: u64,
        offset: u64,
        len: u64,
        stream: Option<&CudaStream>,
        wait: bool,
    ) -> CuResult<()> {
        let host = self.window_ptr(offset, len)?;
        let stream = self.raw_stream(stream)?.unwrap_or(std::ptr::null_mut());
        let n = byte_count(len)?;
        self.enter()?;
        let rc = match dir {
            // SAFETY: `host .. host + n` lies in the registered window (checked by
            // `window_ptr`), which stays mapped while `self` lives; `[dev, dev + n)` was
            // checked by the zone. The driver DMAs from pinned memory, so it may read the
            // window after this returns: `wait` covers callers that reuse it at once.
            WindowDma::ToDevice => unsafe { (self.api.memcpy_htod_async)(dev, host.cast_const().cast(), n, stream) },
            // SAFETY: as above, in the other direction: the driver writes the window (shared
            // memory the guest reads once it has synchronised).
            WindowDma::FromDevice => unsafe { (self.api.memcpy_dtoh_async)(host.cast(), dev, n, stream) },
        };
        check(rc)?;
        if wait {
            // SAFETY: a live stream of this backend or the NULL stream.
            check(unsafe { (self.api.stream_synchronize)(stream) })?;
        }
        Ok(())
    }

    /// One device operation of `n` units (nothing when `n == 0`): in the selected context,
    /// through `sync` without a stream (the legacy NULL stream) or `on_stream` on a live one.
    fn stream_op(
        &self,
        stream: Option<&CudaStream>,
        n: usize,
        sync: impl FnOnce(&DriverApi) -> RawCuResult,
        on_stream: impl FnOnce(&DriverApi, sys::CUstream) -> RawCuResult,
    ) -> CuResult<()> {
        let stream = self.raw_stream(stream)?;
        if n == 0 {
            return Ok(());
        }
        self.enter()?;
        check(match stream {
            None => sync(&self.api),
            Some(s) => on_stream(&self.api, s),
        })
    }

    /// The address of `len` bytes at `offset` in the registered window.
    fn window_ptr(&self, offset: u64, len: u64) -> CuResult<*mut u8> {
        let (base, size) = self.window.ok_or(CuError::NOT_SUPPORTED)?;
        let end = offset.checked_add(len).ok_or(CuError::INVALID_VALUE)?;
        if end > size as u64 {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(base.as_ptr().wrapping_add(offset as usize))
    }

    /// The driver context of `ctx`.
    fn raw_context(&self, ctx: CtxId) -> CuResult<sys::CUcontext> {
        match ctx {
            None => Ok(self.primary),
            Some(id) => self.contexts.get(&id).copied().ok_or(CuError::INVALID_CONTEXT),
        }
    }

    /// The driver stream of `stream`, or `None` for `None`.
    fn raw_stream(&self, stream: Option<&CudaStream>) -> CuResult<Option<sys::CUstream>> {
        match stream {
            None => Ok(None),
            Some(s) => self.streams.get(&s.id).map(|s| Some(s.raw)).ok_or(CuError::INVALID_HANDLE),
        }
    }

    /// The driver stream of `stream`, or the NULL (legacy default) stream for `None`.
    fn stream_or_null(&self, stream: Option<&CudaStream>) -> CuResult<sys::CUstream> {
        Ok(self.raw_stream(stream)?.unwrap_or(std::ptr::null_mut()))
    }

    /// The driver event of `event`.
    fn raw_event(&self, event: &CudaEvent) -> CuResult<sys::CUevent> {
        self.events.get(&event.id).map(|e| e.raw).ok_or(CuError::INVALID_HANDLE)
    }

    /// The entry of `module`.
    fn module_entry(&self, module: &CudaModule) -> CuResult<ModuleEntry> {
        self.modules.get(&module.id).copied().ok_or(CuError::INVALID_HANDLE)
    }

    /// The driver library of `library` (`CUDA_ERROR_INVALID_HANDLE` for a module).
    fn raw_library(&self, library: &CudaModule) -> CuResult<(sys::CUlibrary, ModuleEntry)> {
        let entry = self.module_entry(library)?;
        match entry.kind {
            ModuleKind::Library(raw) => Ok((raw, entry)),
            ModuleKind::Module(_) | ModuleKind::LibraryView(_) => Err(CuError::INVALID_HANDLE),
        }
    }

    /// The driver handle of `func`.
    fn function_kind(&self, func: &CudaFunction) -> CuResult<FunctionKind> {
        self.functions.get(&func.id).map(|f| f.kind).ok_or(CuError::INVALID_HANDLE)
    }

    /// Records a new function entry and returns its handle.
    fn add_function(
        &mut self,
        kind: FunctionKind,
        scope: Scope,
        root: u64,
        layout: Option<Vec<ParamSlot>>,
    ) -> CudaFunction {
        let id = next_id();
        self.functions.insert(id, FunctionEntry { kind, scope, root, layout });
        CudaFunction { id }
    }

    /// Waits for all work in the current context.
    fn ctx_synchronize(&self) -> CuResult<()> {
        // SAFETY: no arguments; a context is current (callers make one current first).
        check(unsafe { (self.api.ctx_synchronize)() })
    }

    /// Zeroes allocations of the current context and waits until the zeroes are in device
    /// memory. The first synchronize drains work still writing into them (on any stream,
    /// non-blocking ones included), so nothing lands after the scrub.
    fn scrub(&self, allocations: &[(u64, u64)]) -> CuResult<()> {
        self.ctx_synchronize()?;
        for &(dptr, size) in allocations {
            let n = byte_count(size)?;
            // SAFETY: `[dptr, dptr + size)` is a live allocation of the current context,
            // made by `cuMemAlloc_v2` (or `cuMemAllocPitch_v2`, `pitch * height` bytes)
            // with exactly this size (recorded in `self.allocs`).
            check(unsafe { (self.api.memset_d8)(dptr, 0, n) })?;
        }
        self.ctx_synchronize()
    }

    /// The allocations of context `ctx`, as (address, size).
    fn allocations_of(&self, ctx: CtxId) -> Vec<(u64, u64)> {
        self.allocs.iter().filter(|(_, a)| a.ctx == ctx).map(|(&dptr, a)| (dptr, a.size)).collect()
    }

    /// Closes every import mapped in context `ctx` (which must be current). Errors are
    /// logged; the imports are forgotten either way.
    fn close_imports_of(&mut self, ctx: CtxId) {
        let doomed: Vec<u64> = self.imports.iter().filter(|(_, c)| **c == ctx).map(|(&dptr, _)| dptr).collect();
        for dptr in doomed {
            // SAFETY: `dptr` was mapped by `cuIpcOpenMemHandle_v2` in `ctx`, which is
            // current, and is still open (it is in `self.imports`); it is removed next, so
            // it is closed once.
            let rc = unsafe { (self.api.ipc_close_mem_handle)(dptr) };
            if rc != CUDA_SUCCESS {
                tracing::warn!(device = self.ordinal, code = rc, "cuIpcCloseMemHandle failed at teardown");
            }
            self.imports.remove(&dptr);
        }
    }

    /// Forgets every table entry of context `ctx` (it was destroyed, which freed them all).
    fn forget_context(&mut self, ctx: CtxId) {
        self.allocs.retain(|_, a| a.ctx != ctx);
        self.imports.retain(|_, c| *c != ctx);
        self.streams.retain(|_, s| s.ctx != ctx);
        self.events.retain(|_, e| e.ctx != ctx);
        self.modules.retain(|_, m| m.scope != Scope::Context(ctx));
        self.functions.retain(|_, f| f.scope != Scope::Context(ctx));
        self.graph_execs.retain(|_, e| e.ctx != ctx);
    }

    /// The parameter layout of a function as the driver reports it, from the cache or
    /// asked once (then cached). The context must be current.
    fn param_layout(&mut self, func: &CudaFunction) -> CuResult<&[ParamSlot]> {
        let entry = self.functions.get(&func.id).ok_or(CuError::INVALID_HANDLE)?;
        if entry.layout.is_none() {
            let layout = self.query_param_layout(entry.kind)?;
            if let Some(entry) = self.functions.get_mut(&func.id) {
                entry.layout = Some(layout);
            }
        }
        let entry = self.functions.get(&func.id).ok_or(CuError::INVALID_HANDLE)?;
        Ok(entry.layout.as_deref().unwrap_or_default())
    }

    /// Asks the driver for every parameter's offset and size, from index 0 until it
    /// reports `CUDA_ERROR_INVALID_VALUE` (past the last).
    fn query_param_layout(&self, kind: FunctionKind) -> CuResult<Vec<ParamSlot>> {
        let mut layout = Vec::new();
        for index in 0..=MAX_KERNEL_PARAMS {
            let (mut offset, mut size) = (0usize, 0usize);
            let rc = match kind {
                // SAFETY: a live function (its entry is in `self.functions`, so its module
                // is loaded); valid out-pointers to local `size_t`s.
                FunctionKind::Function(f) => unsafe {
                    (self.api.func_get_param_info)(f, index, &mut offset, &mut size)
                },
                // SAFETY: as above, for a live kernel of a loaded library.
                FunctionKind::Kernel(k) => unsafe {
                    (self.api.kernel_get_param_info)(k, index, &mut offset, &mut size)
                },
            };
            if rc == CUDA_ERROR_INVALID_VALUE {
                return Ok(layout);
            }
            check(rc)?;
            if index == MAX_KERNEL_PARAMS {
                break;
            }
            let slot = ParamSlot {
                offset: u32::try_from(offset).map_err(|_| CuError::NOT_SUPPORTED)?,
                size: u32::try_from(size).map_err(|_| CuError::NOT_SUPPORTED)?,
            };
            layout.push(slot);
        }
        Err(CuError::NOT_SUPPORTED)
    }

    /// Loads a module or library image, after [`check_image`].
    fn load(&mut self, image: &[u8], as_library: bool) -> CuResult<CudaModule> {
        check_image(image)?;
        self.enter()?;
        let id = next_id();
        let entry = if as_library {
            let mut raw: sys::CUlibrary = std::ptr::null_mut();
            // SAFETY: valid out-pointer; `check_image` showed that the driver reads only
            // inside `image`, which stays borrowed for the call; without options the driver
            // keeps its own copy of the code. The option arrays are NULL with counts 0.
            let rc = unsafe {
                (self.api.library_load_data)(
                    &mut raw,
                    image.as_ptr().cast(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    0,
                )
            };
            check(rc)?;
            ModuleEntry { kind: ModuleKind::Library(raw), scope: Scope::Device, root: id }
        } else {
            let mut raw: sys::CUmodule = std::ptr::null_mut();
            // SAFETY: valid out-pointer; `check_image` showed that the driver reads only
            // inside `image`, which stays borrowed for the call (the driver copies what it
            // keeps); the context is current.
            check(unsafe { (self.api.module_load_data)(&mut raw, image.as_ptr().cast()) })?;
            ModuleEntry { kind: ModuleKind::Module(raw), scope: Scope::Context(self.current), root: id }
        };
        self.modules.insert(id, entry);
        Ok(CudaModule { id })
    }

    /// Reads a global through `get` (`cuModuleGetGlobal_v2` or `cuLibraryGetGlobal`).
    fn global(&self, get: impl FnOnce(&mut sys::CUdeviceptr, &mut usize) -> RawCuResult) -> CuResult<(u64, u64)> {
        let (mut dptr, mut bytes): (sys::CUdeviceptr, usize) = (0, 0);
        check(get(&mut dptr, &mut bytes))?;
        Ok((dptr, bytes as u64))
    }

    /// At teardown (`Drop`), with the primary context current and every other context
    /// already destroyed: destroys the primary context's streams and events, unloads its
    /// modules and every library, then scrubs and frees its allocations. Errors are
    /// logged or ignored, not returned.
    fn release_primary_objects(&mut self) {
        let ctx = None;
        let _ = self.ctx_synchronize();
        self.close_imports_of(ctx);
        let streams: Vec<_> = self.streams.values().filter(|s| s.ctx == ctx).map(|s| s.raw).collect();
        for raw in streams {
            // SAFETY: a live stream of this context; its entry is dropped below, so it is
            // destroyed once.
            let _ = unsafe { (self.api.stream_destroy)(raw) };
        }
        let events: Vec<_> = self.events.values().filter(|e| e.ctx == ctx).map(|e| e.raw).collect();
        for raw in events {
            // SAFETY: a live event of this context; its entry is dropped below.
            let _ = unsafe { (self.api.event_destroy)(raw) };
        }
        let modules: Vec<_> = self.modules.values().map(|m| m.kind).collect();
        for kind in modules {
            let _ = match kind {
                // SAFETY: a loaded module of this context (the others went with their
                // contexts); its entry is dropped below, so it is unloaded once.
                ModuleKind::Module(raw) => unsafe { (self.api.module_unload)(raw) },
                // SAFETY: a loaded library; its entry is dropped below.
                ModuleKind::Library(raw) => unsafe { (self.api.library_unload)(raw) },
                ModuleKind::LibraryView(_) => CUDA_SUCCESS,
            };
        }
        let allocations = self.allocations_of(ctx);
        if let Err(err) = self.scrub(&allocations) {
            tracing::warn!(
                device = self.ordinal,
                %err,
                allocations = allocations.len(),
                "could not scrub device memory at teardown; it is freed unscrubbed"
            );
        }
        for (dptr, _) in allocations {
            // SAFETY: a live allocation of this context; its entry is dropped below, so it
            // is freed once; all work was synchronized by the scrub.
            let _ = unsafe { (self.api.mem_free)(dptr) };
        }
        self.forget_context(ctx);
        self.modules.clear();
        self.functions.clear();
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
    /// Measured on an H200 (132 multiprocessors, driver 580.159.04, `device/tenancy-gpu.sh`):
    /// 8 idle sessions took 4196 MiB of device memory (nvidia-smi), 524 MiB each; charged
    /// as 528 MiB, rounded up.
    const CONTEXT_MEM_BYTES: u64 = 528 << 20;
    type Phys = CudaPhys;

    fn mem_granularity(&mut self, recommended: bool) -> CuResult<u64> {
        self.granularity(recommended)
    }

    fn mem_address_reserve(&mut self, size: u64, alignment: u64, addr: u64) -> CuResult<u64> {
        self.address_reserve(size, alignment, addr)
    }

    fn mem_address_free(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        self.address_free(ptr, size)
    }

    fn mem_create(&mut self, size: u64, handle_types: u32, rdma: bool) -> CuResult<CudaPhys> {
        self.create_phys(size, handle_types, rdma)
    }

    fn mem_release(&mut self, phys: CudaPhys) -> CuResult<()> {
        self.release_phys(phys)
    }

    fn mem_map(&mut self, ptr: u64, size: u64, offset: u64, phys: &CudaPhys) -> CuResult<()> {
        self.map(ptr, size, offset, phys)
    }

    fn mem_unmap(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        self.unmap(ptr, size)
    }

    fn mem_set_access(&mut self, ptr: u64, size: u64, flags: u32) -> CuResult<()> {
        self.set_access(ptr, size, flags)
    }

    type Graph = CudaGraph;
    type GraphExec = CudaGraphExec;
    /// The driver's `CUgraphNode`, as an address.
    type GraphNode = usize;

    fn graph_create(&mut self) -> CuResult<CudaGraph> {
        self.create_graph()
    }

    fn graph_destroy(&mut self, graph: CudaGraph) -> CuResult<()> {
        self.destroy_graph(graph)
    }

    fn graph_clone(&mut self, graph: &CudaGraph) -> CuResult<CudaGraph> {
        self.clone_graph(graph)
    }

    fn graph_find_in_clone(&mut self, clone: &CudaGraph, original: usize) -> CuResult<usize> {
        self.find_in_clone(clone, original)
    }

    fn graph_add_node(
        &mut self,
        graph: &CudaGraph,
        deps: &[usize],
        node: super::GraphNodeSpec<'_, CudaFunction>,
    ) -> CuResult<usize> {
        self.add_graph_node(graph, deps, node)
    }

    fn graph_nodes(&mut self, graph: &CudaGraph) -> CuResult<Vec<usize>> {
        self.nodes_of(graph)
    }

    fn graph_instantiate(&mut self, graph: &CudaGraph, flags: u64) -> CuResult<CudaGraphExec> {
        self.instantiate_graph(graph, flags)
    }

    fn graph_exec_destroy(&mut self, exec: CudaGraphExec) -> CuResult<()> {
        self.destroy_graph_exec(exec)
    }

    fn graph_launch(&mut self, exec: &CudaGraphExec, stream: Option<&CudaStream>, upload_only: bool) -> CuResult<()> {
        self.launch_graph(exec, stream, upload_only)
    }

    fn stream_begin_capture(&mut self, stream: Option<&CudaStream>, mode: u32) -> CuResult<()> {
        self.begin_capture(stream, mode)
    }

    fn stream_end_capture(&mut self, stream: Option<&CudaStream>) -> CuResult<CudaGraph> {
        self.end_capture(stream)
    }

    fn stream_capture_info(&mut self, stream: Option<&CudaStream>) -> CuResult<(u32, u64)> {
        self.capture_info(stream)
    }

    fn exchange_capture_mode(&mut self, mode: u32) -> CuResult<u32> {
        self.exchange_mode(mode)
    }

    fn launch_host_func_persistent(
        &mut self,
        stream: Option<&CudaStream>,
        slot: std::sync::Arc<super::HostFuncSlot>,
    ) -> CuResult<Option<usize>> {
        self.host_func_persistent(stream, slot)
    }

    unsafe fn attach_window(&mut self, base: std::ptr::NonNull<u8>, len: usize) -> CuResult<bool> {
        if self.window.is_some() || len == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        self.enter()?;
        /// `CU_MEMHOSTREGISTER_PORTABLE`: pinned for every context of the process.
        const PORTABLE: c_uint = 0x01;
        /// `CU_MEMHOSTREGISTER_DEVICEMAP`: kernels may read and write it (zero-copy host
        /// memory the guest allocates with `cuMemHostAlloc(DEVICEMAP)`).
        const DEVICEMAP: c_uint = 0x02;
        // SAFETY: the caller guarantees the range stays mapped until `self` is dropped,
        // where it is unregistered first. Registering pins the pages; no Rust reference to
        // them is ever made here.
        check(unsafe { (self.api.mem_host_register)(base.as_ptr().cast(), len, PORTABLE | DEVICEMAP) })?;
        self.window = Some((base, len));
        Ok(true)
    }

    fn launch_host_func(&mut self, stream: Option<&CudaStream>, slot: super::HostFuncSlot) -> CuResult<()> {
        /// Runs in the driver's callback thread when the stream reaches the function.
        unsafe extern "C" fn run(data: *mut c_void) {
            // SAFETY: `data` is the box `launch_host_func` leaked for exactly this call.
            let slot = unsafe { Box::from_raw(data.cast::<super::HostFuncSlot>()) };
            // No limit: the function may legitimately run long, and only this zone's streams
            // wait for it (the driver's callback thread of this zone's own worker).
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slot.run(None)));
        }
        let stream = self.stream_or_null(stream)?;
        self.enter()?;
        let data = Box::into_raw(Box::new(slot));
        // SAFETY: `stream` is NULL or live; `run` takes ownership of `data` when the driver
        // calls it (once); on failure the driver never calls it and the box is freed here.
        let rc = unsafe { (self.api.launch_host_func)(stream, Some(run), data.cast()) };
        if let Err(e) = check(rc) {
            // SAFETY: the driver refused the function, so `data` is still ours.
            drop(unsafe { Box::from_raw(data) });
            return Err(e);
        }
        Ok(())
    }

    fn window_device_pointer(&mut self, offset: u64) -> CuResult<u64> {
        let (base, len) = self.window.ok_or(CuError::NOT_SUPPORTED)?;
        let offset = usize::try_from(offset).ok().filter(|&o| o < len).ok_or(CuError::INVALID_VALUE)?;
        self.enter()?;
        let mut dptr: sys::CUdeviceptr = 0;
        // `base + offset` lies in the window, registered with DEVICEMAP by `attach_window`
        // and mapped until `self` is dropped; `dptr` is one valid out-pointer.
        let host = base.as_ptr().wrapping_add(offset);
        // SAFETY: as above.
        check(unsafe { (self.api.mem_host_get_device_pointer)(&mut dptr, host.cast(), 0) })?;
        Ok(dptr)
    }

    fn copy_window_to_device(
        &mut self,
        dst: u64,
        offset: u64,
        len: u64,
        stream: Option<&CudaStream>,
        wait: bool,
    ) -> CuResult<()> {
        self.window_dma(WindowDma::ToDevice, dst, offset, len, stream, wait)
    }

    fn copy_device_to_window(
        &mut self,
        offset: u64,
        src: u64,
        len: u64,
        stream: Option<&CudaStream>,
        wait: bool,
    ) -> CuResult<()> {
        self.window_dma(WindowDma::FromDevice, src, offset, len, stream, wait)
    }

    type Stream = CudaStream;
    type Event = CudaEvent;
    type Context = CudaContext;
    type Module = CudaModule;
    type Function = CudaFunction;

    fn device_info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn device_attributes(&mut self) -> Vec<Result<i32, CuError>> {
        let max = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX as c_int;
        (1..max)
            .map(|attribute| {
                let mut value: c_int = 0;
                // SAFETY: valid out-pointer to a local `int`; `self.device` came from
                // `cuDeviceGet`; the driver refuses attribute numbers it does not know.
                let rc = unsafe { (self.api.device_get_attribute)(&mut value, attribute, self.device) };
                check(rc).map(|()| value)
            })
            .collect()
    }

    fn pci_bus_id(&mut self) -> CuResult<String> {
        let mut buf: [c_char; PCI_BUS_ID_LEN] = [0; PCI_BUS_ID_LEN];
        // SAFETY: the buffer is `PCI_BUS_ID_LEN` bytes long and that length is passed; the
        // driver writes a NUL-terminated string within it.
        let rc = unsafe { (self.api.device_get_pci_bus_id)(buf.as_mut_ptr(), PCI_BUS_ID_LEN as c_int, self.device) };
        check(rc)?;
        Ok(c_buf_to_string(&buf))
    }

    // ---- contexts ----

    fn ctx_create(&mut self, flags: u32) -> CuResult<CudaContext> {
        self.enter()?;
        let mut raw: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer; NULL creation parameters are documented as "none"
        // (no execution affinity, no CIG); `self.device` came from `cuDeviceGet`; the
        // driver validates `flags`.
        let rc = unsafe { (self.api.ctx_create)(&mut raw, std::ptr::null_mut(), flags, self.device) };
        check(rc)?;
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer. `cuCtxCreate` pushed the new context on this thread's
        // stack; this pops exactly that push (the context itself lives on).
        let _ = unsafe { (self.api.ctx_pop_current)(&mut popped) };
        let id = next_id();
        self.contexts.insert(id, raw);
        let previous = self.current;
        self.current = Some(id);
        if let Err(err) = self.enter() {
            self.current = previous;
            self.contexts.remove(&id);
            // SAFETY: the context made above, never handed out and now out of the table,
            // so destroyed once; nothing was made in it.
            let _ = unsafe { (self.api.ctx_destroy)(raw) };
            return Err(err);
        }
        Ok(CudaContext { id })
    }

    fn ctx_destroy(&mut self, ctx: CudaContext) -> CuResult<()> {
        let raw = self.contexts.get(&ctx.id).copied().ok_or(CuError::INVALID_HANDLE)?;
        let scope = Some(ctx.id);
        self.make_current(scope)?;
        // If the scrub fails the context (and its memory) stays, as in `mem_free`.
        self.scrub(&self.allocations_of(scope))?;
        self.release_arrays_of(scope);
        self.make_current(scope)?;
        self.close_imports_of(scope);
        // SAFETY: a context made by `ctx_create` and still in the table, so not destroyed
        // yet; its entry and every entry of an object in it (allocations, streams, events,
        // modules, functions) are dropped below, so neither it nor they are used again.
        check(unsafe { (self.api.ctx_destroy)(raw) })?;
        self.contexts.remove(&ctx.id);
        self.forget_context(scope);
        if self.current == scope {
            self.current = None;
        }
        self.enter()
    }

    fn set_context(&mut self, ctx: Option<&CudaContext>) -> CuResult<()> {
        let target = match ctx {
            None => None,
            Some(c) if self.contexts.contains_key(&c.id) => Some(c.id),
            Some(_) => return Err(CuError::INVALID_HANDLE),
        };
        self.make_current(target)?;
        self.current = target;
        Ok(())
    }

    fn ctx_get_limit(&mut self, limit: u32) -> CuResult<u64> {
        let limit = enum_arg(limit)?;
        self.enter()?;
        let mut value: usize = 0;
        // SAFETY: valid out-pointer to a local `size_t`; the driver validates `limit`.
        check(unsafe { (self.api.ctx_get_limit)(&mut value, limit) })?;
        Ok(value as u64)
    }

    fn ctx_set_limit(&mut self, limit: u32, value: u64) -> CuResult<()> {
        let limit = enum_arg(limit)?;
        let value = byte_count(value)?;
        self.enter()?;
        // SAFETY: plain values; the driver validates both.
        check(unsafe { (self.api.ctx_set_limit)(limit, value) })
    }

    fn ctx_get_flags(&mut self) -> CuResult<u32> {
        self.enter()?;
        let mut flags: c_uint = 0;
        // SAFETY: valid out-pointer to a local `unsigned int`; a context is current.
        check(unsafe { (self.api.ctx_get_flags)(&mut flags) })?;
        Ok(flags)
    }

    fn ctx_set_flags(&mut self, flags: u32) -> CuResult<()> {
        self.enter()?;
        // SAFETY: a plain value the driver validates; a context is current.
        check(unsafe { (self.api.ctx_set_flags)(flags) })
    }

    fn ctx_get_api_version(&mut self) -> CuResult<u32> {
        let raw = self.raw_context(self.current)?;
        self.enter()?;
        let mut version: c_uint = 0;
        // SAFETY: `raw` is a live context (see `make_current`); valid out-pointer.
        check(unsafe { (self.api.ctx_get_api_version)(raw, &mut version) })?;
        Ok(version)
    }

    fn ctx_get_stream_priority_range(&mut self) -> CuResult<(i32, i32)> {
        self.enter()?;
        let (mut least, mut greatest): (c_int, c_int) = (0, 0);
        // SAFETY: valid out-pointers to local `int`s; a context is current.
        check(unsafe { (self.api.ctx_get_stream_priority_range)(&mut least, &mut greatest) })?;
        Ok((least, greatest))
    }

    fn ctx_get_cache_config(&mut self) -> CuResult<u32> {
        self.enter()?;
        let mut config: c_int = 0;
        // SAFETY: valid out-pointer to a local `int`, the size of the C enum written.
        check(unsafe { (self.api.ctx_get_cache_config)(&mut config) })?;
        u32::try_from(config).map_err(|_| CuError::UNKNOWN)
    }

    fn ctx_set_cache_config(&mut self, config: u32) -> CuResult<()> {
        let config = enum_arg(config)?;
        self.enter()?;
        // SAFETY: a plain value the driver validates; a context is current.
        check(unsafe { (self.api.ctx_set_cache_config)(config) })
    }

    fn primary_ctx_set_flags(&mut self, flags: u32) -> CuResult<()> {
        // SAFETY: `self.device` came from `cuDeviceGet`; the driver validates `flags`.
        check(unsafe { (self.api.primary_ctx_set_flags)(self.device, flags) })
    }

    fn primary_ctx_flags(&mut self) -> CuResult<u32> {
        let (mut flags, mut active): (c_uint, c_int) = (0, 0);
        // SAFETY: `self.device` came from `cuDeviceGet`; valid out-pointers to locals.
        check(unsafe { (self.api.primary_ctx_get_state)(self.device, &mut flags, &mut active) })?;
        Ok(flags)
    }

    fn synchronize(&mut self) -> CuResult<()> {
        self.enter()?;
        self.ctx_synchronize()
    }

    // ---- memory ----

    fn mem_get_info(&mut self) -> CuResult<(u64, u64)> {
        self.enter()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers to local `size_t`s; the context is current.
        check(unsafe { (self.api.mem_get_info)(&mut free, &mut total) })?;
        Ok((free as u64, total as u64))
    }

    fn mem_alloc(&mut self, size: u64) -> CuResult<u64> {
        if size == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let n = usize::try_from(size).map_err(|_| CuError::OUT_OF_MEMORY)?;
        self.enter()?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the context is current.
        check(unsafe { (self.api.mem_alloc)(&mut dptr, n) })?;
        self.allocs.insert(dptr, Allocation { size, ctx: self.current });
        Ok(dptr)
    }

    fn mem_alloc_pitch(&mut self, width: u64, height: u64, element_size: u32) -> CuResult<(u64, u64)> {
        if width == 0 || height == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let (w, h) = (byte_count(width)?, byte_count(height)?);
        self.enter()?;
        let (mut dptr, mut pitch): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: valid out-pointers to locals; the context is current; the driver
        // validates the sizes and `element_size`.
        check(unsafe { (self.api.mem_alloc_pitch)(&mut dptr, &mut pitch, w, h, element_size) })?;
        let pitch = pitch as u64;
        // The driver made `pitch * height` bytes, so the product fits its address space.
        self.allocs.insert(dptr, Allocation { size: pitch.saturating_mul(height), ctx: self.current });
        Ok((dptr, pitch))
    }

    fn mem_free(&mut self, dptr: u64) -> CuResult<()> {
        let alloc = self.allocs.get(&dptr).copied().ok_or(CuError::INVALID_VALUE)?;
        self.make_current(alloc.ctx)?;
        // If the scrub fails the memory stays allocated (and recorded), so it cannot be
        // handed out again while its context lives; the error goes to the caller.
        self.scrub(&[(dptr, alloc.size)])?;
        // SAFETY: `dptr` is a live allocation of the current context (it is in
        // `self.allocs`), and no work uses it any more (the scrub synchronized the context).
        check(unsafe { (self.api.mem_free)(dptr) })?;
        self.allocs.remove(&dptr);
        Ok(())
    }

    fn copy_htod(&mut self, dst: u64, src: &[u8], stream: Option<&CudaStream>) -> CuResult<()> {
        let (p, n) = (src.as_ptr().cast::<c_void>(), src.len());
        self.stream_op(
            stream,
            n,
            // SAFETY: `src` is readable for `n` bytes; the caller checked that `[dst, dst + n)`
            // lies in one of this zone's allocations. The synchronous copy has read `src`
            // when it returns.
            |api| unsafe { (api.memcpy_htod)(dst, p, n) },
            // SAFETY: as above, and `s` is a live stream of this backend. `src` is pageable
            // (see the module docs), so the driver has staged it when the call returns and
            // does not read the slice after its borrow ends.
            |api, s| unsafe { (api.memcpy_htod_async)(dst, p, n, s) },
        )
    }

    fn copy_dtoh(&mut self, dst: &mut [u8], src: u64, stream: Option<&CudaStream>) -> CuResult<()> {
        let (p, n) = (dst.as_mut_ptr().cast::<c_void>(), dst.len());
        self.stream_op(
            stream,
            n,
            // SAFETY: `dst` is writable for `n` bytes and exclusively borrowed; the caller
            // checked `[src, src + n)`. The synchronous copy has completed when it returns.
            |api| unsafe { (api.memcpy_dtoh)(p, src, n) },
            |api, s| {
                // SAFETY: as above, and `s` is a live stream of this backend. The copy is
                // complete before `dst`'s borrow ends: the stream is synchronized next.
                let rc = unsafe { (api.memcpy_dtoh_async)(p, src, n, s) };
                if rc != CUDA_SUCCESS {
                    return rc;
                }
                // SAFETY: `s` is a live stream of this backend.
                unsafe { (api.stream_synchronize)(s) }
            },
        )
    }

    fn copy_dtod(&mut self, dst: u64, src: u64, len: u64, stream: Option<&CudaStream>) -> CuResult<()> {
        let n = byte_count(len)?;
        self.stream_op(
            stream,
            n,
            // SAFETY: device addresses only; the caller checked both ranges against this
            // zone's allocations.
            |api| unsafe { (api.memcpy_dtod)(dst, src, n) },
            // SAFETY: as above, and `s` is a live stream of this backend.
            |api, s| unsafe { (api.memcpy_dtod_async)(dst, src, n, s) },
        )
    }

    fn memset_d8(&mut self, dst: u64, value: u8, count: u64, stream: Option<&CudaStream>) -> CuResult<()> {
        let n = byte_count(count)?;
        self.stream_op(
            stream,
            n,
            // SAFETY: a device range the caller checked against this zone's allocations.
            |api| unsafe { (api.memset_d8)(dst, value, n) },
            // SAFETY: as above, and `s` is a live stream of this backend.
            |api, s| unsafe { (api.memset_d8_async)(dst, value, n, s) },
        )
    }

    fn memset_d16(&mut self, dst: u64, value: u16, count: u64, stream: Option<&CudaStream>) -> CuResult<()> {
        let n = byte_count(count)?;
        // The driver itself refuses a `dst` that is not 2-byte aligned.
        self.stream_op(
            stream,
            n,
            // SAFETY: a device range (`count` words) the caller checked against this zone's
            // allocations.
            |api| unsafe { (api.memset_d16)(dst, value, n) },
            // SAFETY: as above, and `s` is a live stream of this backend.
            |api, s| unsafe { (api.memset_d16_async)(dst, value, n, s) },
        )
    }

    fn memset_d32(&mut self, dst: u64, value: u32, count: u64, stream: Option<&CudaStream>) -> CuResult<()> {
        let n = byte_count(count)?;
        // The driver itself refuses a `dst` that is not 4-byte aligned.
        self.stream_op(
            stream,
            n,
            // SAFETY: a device range (`count` words) the caller checked against this zone's
            // allocations.
            |api| unsafe { (api.memset_d32)(dst, value, n) },
            // SAFETY: as above, and `s` is a live stream of this backend.
            |api, s| unsafe { (api.memset_d32_async)(dst, value, n, s) },
        )
    }

    type Link = CudaLink;

    fn link_create(&mut self, options: &[(u32, u64)]) -> CuResult<CudaLink> {
        self.create_link(options)
    }

    fn link_add(
        &mut self,
        link: &mut CudaLink,
        input_type: u32,
        data: &[u8],
        name: &CStr,
        options: &[(u32, u64)],
    ) -> CuResult<()> {
        self.add_to_link(link, input_type, data, name, options)
    }

    fn link_complete(&mut self, link: &mut CudaLink) -> CuResult<Vec<u8>> {
        self.complete_link(link)
    }

    fn link_logs(&self, link: &CudaLink) -> (String, String) {
        self.link_log_texts(link)
    }

    fn link_destroy(&mut self, link: CudaLink) -> CuResult<()> {
        self.destroy_link(link)
    }

    type Array = CudaArray;

    fn array_id(array: &CudaArray) -> u64 {
        array.id
    }

    fn array_create(&mut self, desc: &super::ArrayDesc) -> CuResult<CudaArray> {
        self.create_array(desc)
    }

    fn array_destroy(&mut self, array: CudaArray) -> CuResult<()> {
        self.destroy_array(array)
    }

    fn tex_object_create(
        &mut self,
        res: super::TexResource<'_, CudaArray>,
        tex_desc: &[u8; super::TEX_DESC_LEN],
        view: Option<&[u8; super::VIEW_DESC_LEN]>,
    ) -> CuResult<u64> {
        self.create_texture(res, tex_desc, view)
    }

    fn tex_object_destroy(&mut self, tex: u64) -> CuResult<()> {
        self.destroy_texture(tex)
    }

    fn surf_object_create(&mut self, array: &CudaArray) -> CuResult<u64> {
        self.create_surface(array)
    }

    fn surf_object_destroy(&mut self, surf: u64) -> CuResult<()> {
        self.destroy_surface(surf)
    }

    fn copy_pitched(
        &mut self,
        copy: &super::GraphCopy,
        shape: super::CopyShape,
        stream: Option<&CudaStream>,
        wait: bool,
    ) -> CuResult<()> {
        self.driver_copy_pitched(copy, shape, stream, wait)
    }

    fn memset_pitched(&mut self, memset: &super::GraphMemset, stream: Option<&CudaStream>) -> CuResult<()> {
        self.driver_memset_pitched(memset, stream)
    }

    // ---- IPC ----

    fn ipc_export(&mut self, dptr: u64) -> CuResult<Vec<u8>> {
        let alloc = self.allocs.get(&dptr).copied().ok_or(CuError::INVALID_VALUE)?;
        self.make_current(alloc.ctx)?;
        let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: valid out-pointer to a local `CUipcMemHandle` (64 bytes, as the C
        // struct); `dptr` is the start of a live allocation of the current context.
        check(unsafe { (self.api.ipc_get_mem_handle)(&mut handle, dptr) })?;
        Ok(handle.reserved.iter().map(|&c| c as u8).collect())
    }

    fn ipc_event_export(&mut self, event: &CudaEvent) -> CuResult<Vec<u8>> {
        let entry = self.events.get(&event.id).copied().ok_or(CuError::INVALID_HANDLE)?;
        self.make_current(entry.ctx)?;
        let mut handle = sys::CUipcEventHandle { reserved: [0; 64] };
        // SAFETY: valid out-pointer to a local 64-byte handle; a live event of the current
        // context (the driver refuses one made without CU_EVENT_INTERPROCESS).
        check(unsafe { (self.api.ipc_get_event_handle)(&mut handle, entry.raw) })?;
        Ok(handle.reserved.iter().map(|&c| c as u8).collect())
    }

    fn ipc_event_open(&mut self, payload: &[u8]) -> CuResult<CudaEvent> {
        let bytes: [u8; 64] = payload.try_into().map_err(|_| CuError::INVALID_VALUE)?;
        let handle = sys::CUipcEventHandle { reserved: bytes.map(|b| b as c_char) };
        self.enter()?;
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the handle by value (a plain 64-byte struct) is
        // validated by the driver; the selected context is current.
        check(unsafe { (self.api.ipc_open_event_handle)(&mut raw, handle) })?;
        let id = next_id();
        self.events.insert(id, Owned { raw, ctx: self.current });
        Ok(CudaEvent { id })
    }

    fn ipc_open(&mut self, payload: &[u8], size: u64, flags: u32) -> CuResult<u64> {
        if flags != IPC_MEM_LAZY_ENABLE_PEER_ACCESS || size == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let bytes: [u8; 64] = payload.try_into().map_err(|_| CuError::INVALID_VALUE)?;
        let handle = sys::CUipcMemHandle { reserved: bytes.map(|b| b as c_char) };
        self.enter()?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the handle is passed by value (a plain 64-byte struct,
        // as the C prototype takes it) and the driver validates its contents; `flags` is
        // `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`; the selected context is current.
        check(unsafe { (self.api.ipc_open_mem_handle)(&mut dptr, handle, flags) })?;
        let (mut base, mut len): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: valid out-pointers to locals; `dptr` was just mapped in this context.
        let rc = unsafe { (self.api.mem_get_address_range)(&mut base, &mut len, dptr) };
        if rc != CUDA_SUCCESS || base != dptr || (len as u64) < size {
            tracing::error!(
                device = self.ordinal,
                code = rc,
                size,
                mapped = len,
                "IPC mapping smaller than its export"
            );
            // SAFETY: `dptr` was mapped by the call above and is closed once, here.
            let _ = unsafe { (self.api.ipc_close_mem_handle)(dptr) };
            return Err(CuError::UNKNOWN);
        }
        self.imports.insert(dptr, self.current);
        Ok(dptr)
    }

    fn ipc_close(&mut self, dptr: u64) -> CuResult<()> {
        let ctx = self.imports.get(&dptr).copied().ok_or(CuError::INVALID_VALUE)?;
        self.make_current(ctx)?;
        // SAFETY: `dptr` was mapped by `cuIpcOpenMemHandle_v2` in `ctx` (now current) and
        // is still open (it is in `self.imports`); it is removed below once closed.
        check(unsafe { (self.api.ipc_close_mem_handle)(dptr) })?;
        self.imports.remove(&dptr);
        Ok(())
    }

    // ---- modules, libraries, functions ----

    fn module_load(&mut self, image: &[u8]) -> CuResult<CudaModule> {
        self.load(image, false)
    }

    fn library_load(&mut self, image: &[u8]) -> CuResult<CudaModule> {
        self.load(image, true)
    }

    fn module_unload(&mut self, module: CudaModule) -> CuResult<()> {
        let entry = self.module_entry(&module)?;
        match entry.kind {
            ModuleKind::Module(raw) => {
                if let Scope::Context(ctx) = entry.scope {
                    self.make_current(ctx)?;
                }
                // SAFETY: a loaded module (its entry is live) with its context current; its
                // entry and every function from it are dropped below, so neither it nor they
                // are used again.
                check(unsafe { (self.api.module_unload)(raw) })?;
            }
            ModuleKind::Library(raw) => {
                self.enter()?;
                // SAFETY: a loaded library; its entry and everything obtained from it
                // (module views, kernels, functions) are dropped below.
                check(unsafe { (self.api.library_unload)(raw) })?;
            }
            ModuleKind::LibraryView(_) => {
                // Owned by its library: only forgotten. Functions from it stay valid while
                // the library is loaded.
                self.modules.remove(&module.id);
                return Ok(());
            }
        }
        self.modules.retain(|_, m| m.root != module.id);
        self.functions.retain(|_, f| f.root != module.id);
        Ok(())
    }

    fn module_get_function(&mut self, module: &CudaModule, name: &CStr) -> CuResult<CudaFunction> {
        let entry = self.module_entry(module)?;
        let (ModuleKind::Module(raw) | ModuleKind::LibraryView(raw)) = entry.kind else {
            return Err(CuError::INVALID_HANDLE);
        };
        self.enter()?;
        let mut func: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a loaded module (or a loaded library's view); `name`
        // is NUL-terminated and borrowed for the call.
        check(unsafe { (self.api.module_get_function)(&mut func, raw, name.as_ptr()) })?;
        Ok(self.add_function(FunctionKind::Function(func), entry.scope, entry.root, None))
    }

    fn module_functions(&mut self, module: &CudaModule) -> CuResult<Vec<CudaFunction>> {
        let entry = self.module_entry(module)?;
        let (ModuleKind::Module(raw) | ModuleKind::LibraryView(raw)) = entry.kind else {
            return Err(CuError::INVALID_HANDLE);
        };
        self.enter()?;
        let mut count: c_uint = 0;
        // SAFETY: valid out-pointer; a loaded module (or a loaded library's view).
        check(unsafe { (self.api.module_get_function_count)(&mut count, raw) })?;
        if count as usize > super::MAX_MODULE_FUNCTIONS {
            return Err(CuError::NOT_SUPPORTED);
        }
        let mut raw_funcs: Vec<sys::CUfunction> = vec![std::ptr::null_mut(); count as usize];
        if count > 0 {
            // SAFETY: `raw_funcs` has room for `count` functions; the module is loaded.
            check(unsafe { (self.api.module_enumerate_functions)(raw_funcs.as_mut_ptr(), count, raw) })?;
        }
        let (scope, root) = (entry.scope, entry.root);
        Ok(raw_funcs.into_iter().map(|f| self.add_function(FunctionKind::Function(f), scope, root, None)).collect())
    }

    fn module_get_global(&mut self, module: &CudaModule, name: &CStr) -> CuResult<(u64, u64)> {
        let entry = self.module_entry(module)?;
        let (ModuleKind::Module(raw) | ModuleKind::LibraryView(raw)) = entry.kind else {
            return Err(CuError::INVALID_HANDLE);
        };
        self.enter()?;
        self.global(|dptr, bytes| {
            // SAFETY: valid out-pointers; a loaded module (or view); `name` is
            // NUL-terminated and borrowed for the call.
            unsafe { (self.api.module_get_global)(dptr, bytes, raw, name.as_ptr()) }
        })
    }

    fn library_get_module(&mut self, library: &CudaModule) -> CuResult<CudaModule> {
        let (raw, entry) = self.raw_library(library)?;
        self.enter()?;
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a loaded library; the context is current.
        check(unsafe { (self.api.library_get_module)(&mut module, raw) })?;
        let id = next_id();
        let view = ModuleEntry {
            kind: ModuleKind::LibraryView(module),
            scope: Scope::Context(self.current),
            root: entry.root,
        };
        self.modules.insert(id, view);
        Ok(CudaModule { id })
    }

    fn library_get_kernel(&mut self, library: &CudaModule, name: &CStr) -> CuResult<CudaFunction> {
        let (raw, entry) = self.raw_library(library)?;
        self.enter()?;
        let mut kernel: sys::CUkernel = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a loaded library; `name` is NUL-terminated and
        // borrowed for the call.
        check(unsafe { (self.api.library_get_kernel)(&mut kernel, raw, name.as_ptr()) })?;
        Ok(self.add_function(FunctionKind::Kernel(kernel), Scope::Device, entry.root, None))
    }

    fn library_get_global(&mut self, library: &CudaModule, name: &CStr) -> CuResult<(u64, u64)> {
        let (raw, _) = self.raw_library(library)?;
        self.enter()?;
        self.global(|dptr, bytes| {
            // SAFETY: valid out-pointers; a loaded library; `name` is NUL-terminated and
            // borrowed for the call; the address is the current context's.
            unsafe { (self.api.library_get_global)(dptr, bytes, raw, name.as_ptr()) }
        })
    }

    fn kernel_get_function(&mut self, kernel: &CudaFunction) -> CuResult<CudaFunction> {
        let entry = self.functions.get(&kernel.id).cloned().ok_or(CuError::INVALID_HANDLE)?;
        let FunctionKind::Kernel(raw) = entry.kind else {
            return Err(CuError::INVALID_HANDLE);
        };
        self.enter()?;
        let mut func: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a kernel of a loaded library; the context is current.
        check(unsafe { (self.api.kernel_get_function)(&mut func, raw) })?;
        Ok(self.add_function(FunctionKind::Function(func), Scope::Context(self.current), entry.root, entry.layout))
    }

    fn func_get_attribute(&mut self, func: &CudaFunction, attribute: u32) -> CuResult<i32> {
        let kind = self.function_kind(func)?;
        let attribute = enum_arg(attribute)?;
        self.enter()?;
        let mut value: c_int = 0;
        let rc = match kind {
            // SAFETY: valid out-pointer; a live function; the driver validates `attribute`.
            FunctionKind::Function(f) => unsafe { (self.api.func_get_attribute)(&mut value, attribute, f) },
            // SAFETY: as above, for a live kernel, on this device.
            FunctionKind::Kernel(k) => unsafe {
                (self.api.kernel_get_attribute)(&mut value, attribute, k, self.device)
            },
        };
        check(rc).map(|()| value)
    }

    fn func_set_attribute(&mut self, func: &CudaFunction, attribute: u32, value: i32) -> CuResult<()> {
        let kind = self.function_kind(func)?;
        let attribute = enum_arg(attribute)?;
        self.enter()?;
        let rc = match kind {
            // SAFETY: a live function; the driver validates `attribute` and `value`.
            FunctionKind::Function(f) => unsafe { (self.api.func_set_attribute)(f, attribute, value) },
            // SAFETY: as above, for a live kernel, on this device.
            FunctionKind::Kernel(k) => unsafe { (self.api.kernel_set_attribute)(attribute, value, k, self.device) },
        };
        check(rc)
    }

    fn func_set_cache_config(&mut self, func: &CudaFunction, config: u32) -> CuResult<()> {
        let kind = self.function_kind(func)?;
        let config = enum_arg(config)?;
        self.enter()?;
        let rc = match kind {
            // SAFETY: a live function; the driver validates `config`.
            FunctionKind::Function(f) => unsafe { (self.api.func_set_cache_config)(f, config) },
            // SAFETY: as above, for a live kernel, on this device.
            FunctionKind::Kernel(k) => unsafe { (self.api.kernel_set_cache_config)(k, config, self.device) },
        };
        check(rc)
    }

    fn func_param_layout(&mut self, func: &CudaFunction) -> CuResult<Vec<ParamSlot>> {
        self.function_kind(func)?;
        self.enter()?;
        self.param_layout(func).map(<[ParamSlot]>::to_vec)
    }

    fn launch(
        &mut self,
        func: &CudaFunction,
        config: &LaunchConfig,
        stream: Option<&CudaStream>,
        params: &[u8],
        layout: &[ParamSlot],
    ) -> CuResult<()> {
        let f = self.function_kind(func)?.as_function();
        let stream = self.stream_or_null(stream)?;
        let mut attrs = config.attrs.iter().map(raw_launch_attribute).collect::<CuResult<SmallVec<[_; 4]>>>()?;
        let num_attrs = c_uint::try_from(attrs.len()).map_err(|_| CuError::INVALID_VALUE)?;
        self.enter()?;
        // The driver reads each parameter at the offset and size *it* knows; the caller's
        // layout must say the same, and every slot must lie in `params`.
        let driver_layout = self.param_layout(func)?;
        if driver_layout != layout {
            return Err(CuError::INVALID_VALUE);
        }
        let mut buffer = ParamBuffer::new(params);
        let mut pointers = buffer.pointers(driver_layout)?;
        let kernel_params = if pointers.is_empty() { std::ptr::null_mut() } else { pointers.as_mut_ptr() };
        let [gx, gy, gz] = config.grid;
        let [bx, by, bz] = config.block;
        let rc = if attrs.is_empty() {
            // SAFETY: `f` is a live function, or a live kernel cast as the driver accepts
            // (`FunctionKind::as_function`); `stream` is NULL or a live stream;
            // `kernel_params` holds one pointer per parameter the driver reports for `f`,
            // each to that parameter's bytes inside `buffer` (checked by `pointers`), and
            // both outlive the call (the driver copies the values before it returns);
            // `extra` is NULL. The driver validates the geometry and shared memory size.
            unsafe {
                (self.api.launch_kernel)(
                    f,
                    gx,
                    gy,
                    gz,
                    bx,
                    by,
                    bz,
                    config.shared_mem_bytes,
                    stream,
                    kernel_params,
                    std::ptr::null_mut(),
                )
            }
        } else {
            let launch_config = RawLaunchConfig {
                grid_dim: config.grid,
                block_dim: config.block,
                shared_mem_bytes: config.shared_mem_bytes,
                stream,
                attrs: attrs.as_mut_ptr(),
                num_attrs,
            };
            // SAFETY: as for `cuLaunchKernel` above; `launch_config` has `CUlaunchConfig`'s
            // layout (asserted at compile time) and points at `num_attrs` attributes whose
            // values are plain integers (`raw_launch_attribute`), all alive for the call.
            unsafe { (self.api.launch_kernel_ex)(&launch_config, f, kernel_params, std::ptr::null_mut()) }
        };
        check(rc)
    }

    fn occupancy_max_active_blocks(
        &mut self,
        func: &CudaFunction,
        block_size: i32,
        dynamic_smem: u64,
        flags: u32,
    ) -> CuResult<i32> {
        let f = self.function_kind(func)?.as_function();
        let smem = byte_count(dynamic_smem)?;
        self.enter()?;
        let mut blocks: c_int = 0;
        // SAFETY: valid out-pointer; a live function or kernel (cast as the driver
        // accepts); the driver validates the rest.
        check(unsafe { (self.api.occupancy_max_active_blocks)(&mut blocks, f, block_size, smem, flags) })?;
        Ok(blocks)
    }

    fn occupancy_available_dynamic_smem(&mut self, func: &CudaFunction, blocks: i32, block_size: i32) -> CuResult<u64> {
        let f = self.function_kind(func)?.as_function();
        self.enter()?;
        let mut bytes: usize = 0;
        // SAFETY: valid out-pointer; a live function or kernel (cast as the driver accepts);
        // the driver validates the counts.
        check(unsafe { (self.api.occupancy_available_smem)(&mut bytes, f, blocks, block_size) })?;
        Ok(bytes as u64)
    }

    fn ctx_query_value(&mut self) -> CuResult<u64> {
        /// {21318C60-9714-3248-8CA6-41FF7324C8F2}, as bytes in memory.
        const ID: [u8; 16] =
            [0x21, 0x31, 0x8c, 0x60, 0x97, 0x14, 0x32, 0x48, 0x8c, 0xa6, 0x41, 0xff, 0x73, 0x24, 0xc8, 0xf2];
        /// The table's size word in driver 580: 93 slots.
        const SIZE: usize = 93 * size_of::<usize>();
        type Object = unsafe extern "C" fn(sys::CUcontext, *const c_void, *mut *const c_void) -> RawCuResult;
        type Value = unsafe extern "C" fn(sys::CUcontext, *const c_void, *mut u64) -> RawCuResult;
        let raw = self.raw_context(self.current)?;
        self.enter()?;
        let id = sys::CUuuid { bytes: ID.map(|b| b as c_char) };
        let mut table: *const c_void = std::ptr::null();
        // SAFETY: valid out-pointer and id.
        check(unsafe { (self.api.get_export_table)(&mut table, &id) })?;
        let slots = table.cast::<usize>();
        // SAFETY: a table the driver returned starts with its size word.
        if table.is_null() || unsafe { slots.read() } != SIZE {
            tracing::warn!("the driver's private table {{21318C60…}} is not the 93-slot one of driver 580");
            return Err(CuError::NOT_SUPPORTED);
        }
        // SAFETY: the driver's table holds the 93 words its size word says (checked above);
        // it is static for the process's life and never written.
        let words = unsafe { std::slice::from_raw_parts(slots, 93) };
        let (object, value) = (words[51], words[39]);
        // SAFETY: the driver's code addresses of the two slots, with the signatures cuBLASLt
        // calls them by (traced; their writes measured by device/probes/export_table_probe.c).
        let object = unsafe { std::mem::transmute::<usize, Object>(object) };
        // SAFETY: as above.
        let value = unsafe { std::mem::transmute::<usize, Value>(value) };
        let mut obj: *const c_void = std::ptr::null();
        // SAFETY: a live context (`raw_context`), made current; a NULL second argument (as
        // traced) and a valid out-pointer.
        check(unsafe { object(raw, std::ptr::null(), &mut obj) })?;
        let mut v: u64 = 0;
        // SAFETY: the same context, the object the driver just returned for it, a valid
        // 8-byte out-pointer (the driver writes 8 bytes: measured).
        check(unsafe { value(raw, obj, &mut v) })?;
        Ok(v)
    }

    fn occupancy_max_active_clusters(&mut self, func: &CudaFunction, config: &LaunchConfig) -> CuResult<i32> {
        let f = self.function_kind(func)?.as_function();
        let mut attrs = config.attrs.iter().map(raw_launch_attribute).collect::<CuResult<SmallVec<[_; 4]>>>()?;
        let num_attrs = c_uint::try_from(attrs.len()).map_err(|_| CuError::INVALID_VALUE)?;
        self.enter()?;
        let launch_config = RawLaunchConfig {
            grid_dim: config.grid,
            block_dim: config.block,
            shared_mem_bytes: config.shared_mem_bytes,
            stream: std::ptr::null_mut(),
            attrs: attrs.as_mut_ptr(),
            num_attrs,
        };
        let mut clusters: c_int = 0;
        // SAFETY: valid out-pointer; a live function or kernel; `launch_config` has
        // `CUlaunchConfig`'s layout (asserted at compile time) and points at `num_attrs`
        // plain-valued attributes alive for the call; the stream is NULL.
        check(unsafe { (self.api.occupancy_max_active_clusters)(&mut clusters, f, &launch_config) })?;
        Ok(clusters)
    }

    // ---- streams ----

    fn stream_create(&mut self, flags: u32, priority: i32) -> CuResult<CudaStream> {
        self.enter()?;
        let mut raw: sys::CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the driver validates `flags` and clamps `priority`;
        // the context is current.
        check(unsafe { (self.api.stream_create)(&mut raw, flags, priority) })?;
        let id = next_id();
        self.streams.insert(id, Owned { raw, ctx: self.current });
        Ok(CudaStream { id })
    }

    fn stream_synchronize(&mut self, stream: &CudaStream) -> CuResult<()> {
        let raw = self.stream_or_null(Some(stream))?;
        self.enter()?;
        // SAFETY: `raw` is a live stream (it is in `self.streams`).
        check(unsafe { (self.api.stream_synchronize)(raw) })
    }

    fn stream_query(&mut self, stream: Option<&CudaStream>) -> CuResult<()> {
        let raw = self.stream_or_null(stream)?;
        self.enter()?;
        // SAFETY: `raw` is NULL (the current context's default stream) or a live stream.
        check(unsafe { (self.api.stream_query)(raw) })
    }

    fn stream_wait_event(&mut self, stream: Option<&CudaStream>, event: &CudaEvent, flags: u32) -> CuResult<()> {
        let raw = self.stream_or_null(stream)?;
        let event = self.raw_event(event)?;
        self.enter()?;
        // SAFETY: `raw` is NULL or a live stream, `event` a live event; the driver
        // validates `flags`.
        check(unsafe { (self.api.stream_wait_event)(raw, event, flags) })
    }

    fn stream_get_flags(&mut self, stream: Option<&CudaStream>) -> CuResult<u32> {
        let raw = self.stream_or_null(stream)?;
        self.enter()?;
        let mut flags: c_uint = 0;
        // SAFETY: `raw` is NULL or a live stream; valid out-pointer to a local.
        check(unsafe { (self.api.stream_get_flags)(raw, &mut flags) })?;
        Ok(flags)
    }

    fn stream_get_priority(&mut self, stream: Option<&CudaStream>) -> CuResult<i32> {
        let raw = self.stream_or_null(stream)?;
        self.enter()?;
        let mut priority: c_int = 0;
        // SAFETY: `raw` is NULL or a live stream; valid out-pointer to a local.
        check(unsafe { (self.api.stream_get_priority)(raw, &mut priority) })?;
        Ok(priority)
    }

    fn stream_destroy(&mut self, stream: CudaStream) -> CuResult<()> {
        let entry = self.streams.get(&stream.id).copied().ok_or(CuError::INVALID_HANDLE)?;
        self.make_current(entry.ctx)?;
        self.streams.remove(&stream.id);
        // SAFETY: `entry.raw` was a live stream, its context current, and is now removed
        // from the table, so it is destroyed once and never used again. Work still queued
        // on it completes first (the driver defers the release).
        check(unsafe { (self.api.stream_destroy)(entry.raw) })
    }

    // ---- events ----

    fn event_create(&mut self, flags: u32) -> CuResult<CudaEvent> {
        self.enter()?;
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the driver validates `flags`; the context is current.
        check(unsafe { (self.api.event_create)(&mut raw, flags) })?;
        let id = next_id();
        self.events.insert(id, Owned { raw, ctx: self.current });
        Ok(CudaEvent { id })
    }

    fn event_destroy(&mut self, event: CudaEvent) -> CuResult<()> {
        let entry = self.events.get(&event.id).copied().ok_or(CuError::INVALID_HANDLE)?;
        self.make_current(entry.ctx)?;
        self.events.remove(&event.id);
        // SAFETY: `entry.raw` was a live event, its context current, and is now removed
        // from the table, so it is destroyed once and never used again.
        check(unsafe { (self.api.event_destroy)(entry.raw) })
    }

    fn event_record(&mut self, event: &CudaEvent, stream: Option<&CudaStream>, flags: u32) -> CuResult<()> {
        let event = self.raw_event(event)?;
        let stream = self.stream_or_null(stream)?;
        self.enter()?;
        // SAFETY: a live event; `stream` is NULL or a live stream; the driver validates
        // `flags`.
        check(unsafe { (self.api.event_record)(event, stream, flags) })
    }

    fn event_query(&mut self, event: &CudaEvent) -> CuResult<()> {
        let event = self.raw_event(event)?;
        self.enter()?;
        // SAFETY: a live event.
        check(unsafe { (self.api.event_query)(event) })
    }

    fn event_synchronize(&mut self, event: &CudaEvent) -> CuResult<()> {
        let event = self.raw_event(event)?;
        self.enter()?;
        // SAFETY: a live event.
        check(unsafe { (self.api.event_synchronize)(event) })
    }

    fn event_elapsed_time(&mut self, start: &CudaEvent, end: &CudaEvent) -> CuResult<f32> {
        let (start, end) = (self.raw_event(start)?, self.raw_event(end)?);
        self.enter()?;
        let mut ms: f32 = 0.0;
        // SAFETY: valid out-pointer to a local `float`; two live events.
        check(unsafe { (self.api.event_elapsed_time)(&mut ms, start, end) })?;
        Ok(ms)
    }
}

impl Drop for CudaGpu {
    fn drop(&mut self) {
        if let Some((base, _)) = self.window.take() {
            // SAFETY: registered by `attach_window` and still mapped (its contract).
            let _ = unsafe { (self.api.mem_host_unregister)(base.as_ptr().cast()) };
        }
        // Contexts made by `ctx_create` first: scrub each one's memory in it, then destroy
        // it (which frees its memory, streams, events and modules).
        let contexts: Vec<(u64, sys::CUcontext)> = self.contexts.iter().map(|(&id, &raw)| (id, raw)).collect();
        for (id, raw) in contexts {
            let scope = Some(id);
            let allocations = self.allocations_of(scope);
            let scrubbed = self.make_current(scope).and_then(|()| self.scrub(&allocations));
            if self.make_current(scope).is_ok() {
                self.close_imports_of(scope);
            }
            if let Err(err) = scrubbed {
                tracing::warn!(
                    device = self.ordinal,
                    %err,
                    allocations = allocations.len(),
                    "could not scrub a context's device memory at teardown; it is freed unscrubbed"
                );
            }
            // SAFETY: a context made by `ctx_create`, still in the table; removed below
            // with every entry of its objects, so it is destroyed once.
            let _ = unsafe { (self.api.ctx_destroy)(raw) };
            self.contexts.remove(&id);
            self.forget_context(scope);
        }
        // Then the primary context. If it cannot be made current, nothing below may run
        // (it would act on whatever context is current instead); releasing the primary
        // context still frees everything in it.
        self.current = None;
        if self.enter().is_ok() {
            self.destroy_all_graphs();
            self.release_primary_objects();
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
        assert!(info.driver_version >= 12080, "driver version {}", info.driver_version);
        let (free, total) = g.mem_get_info().unwrap();
        assert!(free > 0 && free <= total);
        let attrs = g.device_attributes();
        assert_eq!(attrs.len(), sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX as usize - 1);
        let attr = |a: sys::CUdevice_attribute| attrs[a as usize - 1];
        assert_eq!(attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_WARP_SIZE), Ok(32));
        assert_eq!(
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            Ok(info.cc_major as i32)
        );
        let bus_id = g.pci_bus_id().unwrap();
        println!("PCI bus id {bus_id}");
        assert!(bus_id.contains('.'), "{bus_id}");
        assert_eq!(bus_id.matches(':').count(), 2, "{bus_id}");
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
        let s = g.stream_create(1, 0).unwrap();
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
        let _left = g.stream_create(0, 0).unwrap();
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
    fn gpu_ipc_export_and_checks() {
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        let a = g.mem_alloc(1 << 20).unwrap();
        let payload = g.ipc_export(a).unwrap();
        assert_eq!(payload.len(), 64, "the driver's CUipcMemHandle");
        assert_eq!(g.ipc_export(a + 4096), Err(CuError::INVALID_VALUE), "not an allocation's start here");
        assert_eq!(g.ipc_open(&payload[..63], 1 << 20, 1), Err(CuError::INVALID_VALUE));
        assert_eq!(g.ipc_open(&payload, 1 << 20, 0), Err(CuError::INVALID_VALUE));
        assert_eq!(g.ipc_open(&payload, 1 << 20, 2), Err(CuError::INVALID_VALUE));
        assert_eq!(g.ipc_open(&payload, 0, 1), Err(CuError::INVALID_VALUE));
        // The driver refuses an open in the exporting process (the broker refuses it first).
        let same_process = g.ipc_open(&payload, 1 << 20, 1);
        println!("open in the exporting process: {same_process:?}");
        assert!(same_process.is_err());
        assert_eq!(g.ipc_close(a), Err(CuError::INVALID_VALUE), "an allocation is not an import");
        g.mem_free(a).unwrap();
        assert_eq!(g.ipc_export(a), Err(CuError::INVALID_VALUE), "freed");
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

    /// A hand-written PTX module: `fill_u32(u32* p, u32 v, u64 n)` stores `v` into `p[i]`
    /// for every global thread index `i < n`; `counter` is a 4-byte global.
    const FILL_PTX: &str = "\
.version 8.0
.target sm_90
.address_size 64

.visible .global .align 4 .u32 counter;

.visible .entry fill_u32(
\t.param .u64 fill_u32_param_0,
\t.param .u32 fill_u32_param_1,
\t.param .u64 fill_u32_param_2
)
{
\t.reg .pred %p<2>;
\t.reg .b32 %r<5>;
\t.reg .b64 %rd<8>;

\tld.param.u64 %rd1, [fill_u32_param_0];
\tld.param.u32 %r1, [fill_u32_param_1];
\tld.param.u64 %rd2, [fill_u32_param_2];
\tmov.u32 %r2, %ctaid.x;
\tmov.u32 %r3, %ntid.x;
\tmov.u32 %r4, %tid.x;
\tmul.wide.u32 %rd3, %r2, %r3;
\tcvt.u64.u32 %rd4, %r4;
\tadd.s64 %rd5, %rd3, %rd4;
\tsetp.ge.u64 %p1, %rd5, %rd2;
\t@%p1 bra $L__done;
\tcvta.to.global.u64 %rd6, %rd1;
\tshl.b64 %rd7, %rd5, 2;
\tadd.s64 %rd6, %rd6, %rd7;
\tst.global.u32 [%rd6], %r1;
$L__done:
\tret;
}
\0";

    const FILL_LAYOUT: [ParamSlot; 3] =
        [ParamSlot { offset: 0, size: 8 }, ParamSlot { offset: 8, size: 4 }, ParamSlot { offset: 16, size: 8 }];

    /// `fill_u32`'s packed parameters.
    fn fill_params(p: u64, v: u32, n: u64) -> Vec<u8> {
        let mut b = vec![0u8; 24];
        b[..8].copy_from_slice(&p.to_le_bytes());
        b[8..12].copy_from_slice(&v.to_le_bytes());
        b[16..].copy_from_slice(&n.to_le_bytes());
        b
    }

    /// A one-dimensional launch.
    fn grid(blocks: u32, threads: u32) -> LaunchConfig {
        LaunchConfig { grid: [blocks, 1, 1], block: [threads, 1, 1], shared_mem_bytes: 0, attrs: Vec::new() }
    }

    /// `n` 32-bit words read back from `dptr`.
    fn read_words(g: &mut CudaGpu, dptr: u64, n: usize) -> Vec<u32> {
        let mut out = vec![0u8; n * 4];
        g.copy_dtoh(&mut out, dptr, None).unwrap();
        out.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect()
    }

    /// A minimal ELF64 image of `len` bytes whose section headers (type, offset, size)
    /// start at byte 64.
    fn elf(sections: &[(u32, u64, u64)], len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[..4].copy_from_slice(&ELF_MAGIC);
        b[4] = 2;
        b[5] = 1;
        b[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        for (i, &(ty, offset, size)) in sections.iter().enumerate() {
            let h = 64 + 64 * i;
            b[h + 4..h + 8].copy_from_slice(&ty.to_le_bytes());
            b[h + 0x18..h + 0x20].copy_from_slice(&offset.to_le_bytes());
            b[h + 0x20..h + 0x28].copy_from_slice(&size.to_le_bytes());
        }
        b
    }

    /// A fat binary holding `payloads`, each behind a 64-byte entry header.
    fn fatbin(payloads: &[&[u8]]) -> Vec<u8> {
        let mut entries = Vec::new();
        for p in payloads {
            let mut h = vec![0u8; 64];
            h[..2].copy_from_slice(&2u16.to_le_bytes());
            h[4..8].copy_from_slice(&64u32.to_le_bytes());
            h[8..16].copy_from_slice(&(p.len() as u64).to_le_bytes());
            entries.extend(h);
            entries.extend_from_slice(p);
        }
        let mut b = FATBIN_MAGIC.to_le_bytes().to_vec();
        b.extend(1u16.to_le_bytes());
        b.extend(16u16.to_le_bytes());
        b.extend((entries.len() as u64).to_le_bytes());
        b.extend(entries);
        b
    }

    #[test]
    fn module_images_are_checked_before_the_driver_reads_them() {
        let refused = Err(CuError::INVALID_VALUE);
        assert_eq!(check_image(FILL_PTX.as_bytes()), Ok(()));
        assert_eq!(check_image(b".version 8.0\n.target sm_90"), refused, "PTX without its NUL");
        assert_eq!(check_image(b"\xff\xfe.version\0"), refused, "not text");
        assert_eq!(check_image(b""), refused);
        let mut wrapper = FATBIN_WRAPPER_MAGIC.to_le_bytes().to_vec();
        wrapper.extend([1, 0, 0, 0, 0x10, 0x20, 0x30, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(check_image(&wrapper), refused, "a fat binary wrapper holds a host pointer");

        let good = elf(&[(0, 0, 0), (1, 192, 8), (SHT_NOBITS, 0, u64::MAX)], 256);
        assert_eq!(check_image(&good), Ok(()));
        assert_eq!(check_image(&elf(&[(1, 250, 7)], 256)), refused, "section past the end");
        assert_eq!(check_image(&elf(&[(1, u64::MAX, 2)], 256)), refused, "section offset overflows");
        assert_eq!(check_image(&elf(&[(1, 0, 0), (1, 0, 0)], 192)[..150]), refused, "header table past the end");
        assert_eq!(check_image(&good[..63]), refused, "truncated header");
        let mut elf32 = good.clone();
        elf32[4] = 1;
        assert_eq!(check_image(&elf32), refused, "32-bit ELF");

        let container = fatbin(&[b"ptx text\0\0\0\0\0\0\0", &good]);
        assert_eq!(check_image(&container), Ok(()));
        let mut trailing = container.clone();
        trailing.extend([0xee; 9]);
        assert_eq!(check_image(&trailing), Ok(()), "bytes after the container are not read");
        assert_eq!(check_image(&fatbin(&[&elf(&[(1, 250, 7)], 256)])), refused, "bad cubin inside");
        assert_eq!(check_image(&container[..container.len() - 1]), refused, "container past the end");
        let mut long_entry = container.clone();
        long_entry[16 + 8] += 1; // the first payload's size
        assert_eq!(check_image(&long_entry), refused, "entry past the container");
        let mut stuck = container.clone();
        stuck[16 + 4..16 + 8].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(check_image(&stuck), refused, "entry header size 0");
    }

    #[test]
    fn launch_attributes_carry_only_plain_values() {
        let a = raw_launch_attribute(&LaunchAttr { id: 4, value: [2, 1, 1, 0xdead] }).unwrap();
        assert_eq!(a.id, 4);
        let bytes: Vec<u8> = a.value[..2].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0xad, 0xde, 0, 0]);
        assert!(a.value[2..].iter().all(|&w| w == 0));
        for id in [1, 7, 12, 13, 15, 17, 1000] {
            let refused = raw_launch_attribute(&LaunchAttr { id, value: [0; 4] }).map(|_| ());
            assert_eq!(refused, Err(CuError::NOT_SUPPORTED), "attribute {id}");
        }
        assert!(is_plain_launch_attribute(8) && is_plain_launch_attribute(0));
    }

    #[test]
    fn parameter_pointers_stay_inside_the_buffer() {
        let params: Vec<u8> = (0..24).collect();
        let mut buf = ParamBuffer::new(&params);
        let base = buf.words.as_ptr() as usize;
        let pointers = buf.pointers(&FILL_LAYOUT).unwrap();
        let offsets: Vec<usize> = pointers.iter().map(|&p| p as usize - base).collect();
        assert_eq!(offsets, [0, 8, 16]);
        assert_eq!(buf.words[1].to_ne_bytes()[..4], [8, 9, 10, 11]);
        assert_eq!(buf.pointers(&[ParamSlot { offset: 20, size: 8 }]), Err(CuError::INVALID_VALUE));
        assert_eq!(buf.pointers(&[ParamSlot { offset: u32::MAX, size: u32::MAX }]), Err(CuError::INVALID_VALUE));
        assert_eq!(ParamBuffer::new(&[]).pointers(&[]).map(|p| p.is_empty()), Ok(true));
        let mut odd = ParamBuffer::new(&[1, 2, 3]);
        assert_eq!(odd.pointers(&[ParamSlot { offset: 1, size: 2 }]).map(|p| p.len()), Ok(1));
        assert_eq!(odd.pointers(&[ParamSlot { offset: 2, size: 2 }]), Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn gpu_modules_functions_and_launches() {
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        let not_found = Err(CuError::NOT_FOUND);
        let m = g.module_load(FILL_PTX.as_bytes()).unwrap();
        let f = g.module_get_function(&m, c"fill_u32").unwrap();
        assert_eq!(g.func_param_layout(&f).unwrap(), FILL_LAYOUT);
        assert_eq!(g.module_get_function(&m, c"nope").map(|_| ()), not_found);
        let (counter, size) = g.module_get_global(&m, c"counter").unwrap();
        assert!(counter != 0 && size == 4);
        assert!(g.func_get_attribute(&f, 0).unwrap() >= 256, "MAX_THREADS_PER_BLOCK");
        g.func_set_cache_config(&f, 1).unwrap();
        g.func_set_attribute(&f, 8, 1024).unwrap(); // MAX_DYNAMIC_SHARED_SIZE_BYTES
        assert!(g.occupancy_max_active_blocks(&f, 256, 0, 0).unwrap() >= 1);

        const N: u64 = 10_000;
        let buf = g.mem_alloc(N * 4 + 64).unwrap();
        g.memset_d8(buf, 0, N * 4 + 64, None).unwrap();
        g.launch(&f, &grid((N as u32).div_ceil(256), 256), None, &fill_params(buf, 0xc0ffee, N), &FILL_LAYOUT).unwrap();
        let words = read_words(&mut g, buf, N as usize + 2);
        assert!(words[..N as usize].iter().all(|&w| w == 0xc0ffee));
        assert_eq!(words[N as usize..], [0, 0]);
        // Short buffers and foreign layouts are refused before the driver sees them.
        let params = fill_params(buf, 1, 1);
        assert_eq!(g.launch(&f, &grid(1, 1), None, &params[..20], &FILL_LAYOUT), Err(CuError::INVALID_VALUE));
        assert_eq!(g.launch(&f, &grid(1, 1), None, &params, &FILL_LAYOUT[..2]), Err(CuError::INVALID_VALUE));

        // `cuLaunchKernelEx` with a plain attribute, on a stream; others are refused.
        let s = g.stream_create(1, 0).unwrap();
        let mut ex = grid(1, 32);
        ex.attrs = vec![LaunchAttr { id: 8, value: [0; 4] }]; // PRIORITY
        g.launch(&f, &ex, Some(&s), &fill_params(buf, 7, 16), &FILL_LAYOUT).unwrap();
        g.stream_synchronize(&s).unwrap();
        assert_eq!(read_words(&mut g, buf, 17), [[7; 16].as_slice(), &[0xc0ffee]].concat());
        ex.attrs = vec![LaunchAttr { id: 7, value: [0; 4] }]; // PROGRAMMATIC_EVENT
        assert_eq!(g.launch(&f, &ex, Some(&s), &fill_params(buf, 7, 16), &FILL_LAYOUT), Err(CuError::NOT_SUPPORTED));

        // A library: its kernel (launched directly and as a function), a module view and
        // a global.
        let lib = g.library_load(FILL_PTX.as_bytes()).unwrap();
        assert_eq!(g.module_get_function(&lib, c"fill_u32").map(|_| ()), Err(CuError::INVALID_HANDLE));
        let k = g.library_get_kernel(&lib, c"fill_u32").unwrap();
        assert_eq!(g.func_param_layout(&k).unwrap(), FILL_LAYOUT);
        assert!(g.func_get_attribute(&k, 0).unwrap() >= 256);
        g.func_set_cache_config(&k, 0).unwrap();
        g.launch(&k, &grid(1, 32), None, &fill_params(buf, 9, 4), &FILL_LAYOUT).unwrap();
        let kf = g.kernel_get_function(&k).unwrap();
        g.launch(&kf, &grid(1, 32), None, &fill_params(buf + 16, 10, 4), &FILL_LAYOUT).unwrap();
        let view = g.library_get_module(&lib).unwrap();
        let vf = g.module_get_function(&view, c"fill_u32").unwrap();
        let (_, lsize) = g.library_get_global(&lib, c"counter").unwrap();
        assert_eq!(lsize, 4);
        assert_eq!(g.library_get_global(&lib, c"nope").map(|_| ()), not_found);
        g.module_unload(view).unwrap();
        g.launch(&vf, &grid(1, 32), None, &fill_params(buf + 32, 11, 4), &FILL_LAYOUT).unwrap();
        assert_eq!(read_words(&mut g, buf, 13), [9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11, 7]);
        g.module_unload(lib).unwrap();
        assert_eq!(g.launch(&k, &grid(1, 1), None, &params, &FILL_LAYOUT), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.func_param_layout(&vf), Err(CuError::INVALID_HANDLE));
        g.module_unload(m).unwrap();
        assert_eq!(g.func_param_layout(&f), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.module_load(b".version 8.0").map(|_| ()), Err(CuError::INVALID_VALUE));
        // A module left loaded is unloaded by `Drop`.
        let _left = g.module_load(FILL_PTX.as_bytes()).unwrap();
    }

    #[test]
    fn gpu_contexts_create_switch_destroy() {
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        let p = g.mem_alloc(1 << 20).unwrap();
        let primary_flags = g.primary_ctx_flags().unwrap();
        let c = g.ctx_create(0).unwrap();
        assert!(g.ctx_get_api_version().unwrap() >= 3020);
        let (free_before, _) = g.mem_get_info().unwrap();
        let a = g.mem_alloc(256 << 20).unwrap();
        let s = g.stream_create(0, 0).unwrap();
        let e = g.event_create(0).unwrap();
        let m = g.module_load(FILL_PTX.as_bytes()).unwrap();
        let f = g.module_get_function(&m, c"fill_u32").unwrap();
        g.launch(&f, &grid(1, 64), Some(&s), &fill_params(a, 5, 64), &FILL_LAYOUT).unwrap();
        g.event_record(&e, Some(&s), 0).unwrap();
        g.ctx_set_limit(0, 4096).unwrap(); // STACK_SIZE
        assert!(g.ctx_get_limit(0).unwrap() >= 4096);
        let (least, greatest) = g.ctx_get_stream_priority_range().unwrap();
        assert!(greatest <= least);
        g.ctx_set_cache_config(1).unwrap();
        g.ctx_get_cache_config().unwrap();
        let flags = g.ctx_get_flags().unwrap();
        g.ctx_set_flags(flags & 0x7).unwrap();

        // Back to the primary context, and again into the new one.
        g.set_context(None).unwrap();
        g.memset_d8(p, 1, 16, None).unwrap();
        g.set_context(Some(&c)).unwrap();
        g.stream_synchronize(&s).unwrap();
        assert_eq!(read_words(&mut g, a, 65)[..64], [5; 64]);

        // Destroying it (while current) frees everything in it and falls back to the
        // primary context.
        g.ctx_destroy(c).unwrap();
        let (free_after, _) = g.mem_get_info().unwrap();
        assert!(free_after >= free_before, "{free_after} < {free_before}");
        assert_eq!(g.stream_synchronize(&s), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.event_query(&e), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.mem_free(a), Err(CuError::INVALID_VALUE));
        assert_eq!(g.module_get_function(&m, c"fill_u32").map(|_| ()), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.func_param_layout(&f), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.set_context(Some(&CudaContext { id: u64::MAX })), Err(CuError::INVALID_HANDLE));
        let mut head = [0u8; 16];
        g.copy_dtoh(&mut head, p, None).unwrap();
        assert_eq!(head, [1; 16]);
        g.mem_free(p).unwrap();
        g.primary_ctx_set_flags(primary_flags).unwrap();

        // A context left alive, holding memory, is scrubbed and destroyed by `Drop`.
        let _c2 = g.ctx_create(0).unwrap();
        let _left = g.mem_alloc(1 << 20).unwrap();
        let _ls = g.stream_create(0, 0).unwrap();
        drop(g);
    }

    #[test]
    fn gpu_links_ptx_and_reports_its_logs() {
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        let kernel = b".version 8.0\n.target sm_90\n.address_size 64\n.extern .func (.param .b32 out) twice(.param .b32 x);\n.visible .entry k(.param .u32 v)\n{\n.reg .b32 %r<3>;\nld.param.u32 %r1, [v];\n{\n.param .b32 a;\n.param .b32 r;\nst.param.b32 [a], %r1;\ncall.uni (r), twice, (a);\nld.param.b32 %r2, [r];\n}\nret;\n}\n\0";
        let helper = b".version 8.0\n.target sm_90\n.address_size 64\n.visible .func (.param .b32 out) twice(.param .b32 x)\n{\n.reg .b32 %r<3>;\nld.param.b32 %r1, [x];\nadd.u32 %r2, %r1, %r1;\nst.param.b32 [out], %r2;\nret;\n}\n\0";
        let verbose = [(12u32, 1u64)];
        let mut link = g.link_create(&verbose).unwrap();
        g.link_add(&mut link, 1, kernel, c"kernel.ptx", &[]).unwrap();
        g.link_add(&mut link, 1, helper, c"helper.ptx", &[]).unwrap();
        let image = g.link_complete(&mut link).unwrap();
        let (info, error) = g.link_logs(&link);
        println!("info log: {info:?}\nerror log: {error:?}");
        assert!(!image.is_empty());
        assert!(!info.is_empty(), "a verbose link reports what it did");
        g.module_load(&image).unwrap();
        g.link_destroy(link).unwrap();
        let mut alone = g.link_create(&[]).unwrap();
        g.link_add(&mut alone, 1, kernel, c"kernel.ptx", &[]).unwrap();
        assert!(g.link_complete(&mut alone).is_err(), "twice is defined nowhere");
        let (_, error) = g.link_logs(&alone);
        println!("unresolved: {error:?}");
        assert!(!error.is_empty());
        g.link_destroy(alone).unwrap();
    }

    #[test]
    fn gpu_arrays_are_copied_read_by_textures_and_scrubbed() {
        use crate::backend::{ArrayDesc, CopyEnd, CopyShape, GraphCopy, TexResource};
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        let desc = ArrayDesc { width: 64, height: 16, depth: 0, format: 0x20, channels: 1, flags: 0x02 };
        let arr = g.array_create(&desc).unwrap();
        let id = <CudaGpu as GpuBackend>::array_id(&arr);
        let d = g.mem_alloc(8192).unwrap();
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 3 + 1) as u8).collect();
        g.copy_htod(d, &pattern, None).unwrap();
        let copy = |src, dst| GraphCopy {
            src,
            src_pitch: 256,
            src_height: 16,
            dst,
            dst_pitch: 256,
            dst_height: 16,
            width: 256,
            height: 16,
            depth: 1,
        };
        let to_array = copy(CopyEnd::Device(d), CopyEnd::Array { id, x: 0, y: 0, z: 0 });
        g.copy_pitched(&to_array, CopyShape::Plane, None, true).unwrap();
        let back = copy(CopyEnd::Array { id, x: 0, y: 0, z: 0 }, CopyEnd::Device(d + 4096));
        g.copy_pitched(&back, CopyShape::Volume, None, true).unwrap();
        let mut got = vec![0u8; 4096];
        g.copy_dtoh(&mut got, d + 4096, None).unwrap();
        assert_eq!(got, pattern, "device -> array -> device");
        // A texture and a surface of the array, and a texture of linear memory.
        let tex_desc = [0u8; crate::backend::TEX_DESC_LEN];
        let t = g.tex_object_create(TexResource::Array(&arr), &tex_desc, None).unwrap();
        let lin = TexResource::Linear { dptr: d, format: 0x20, channels: 1, size: 4096 };
        let lt = g.tex_object_create(lin, &tex_desc, None).unwrap();
        let sf = g.surf_object_create(&arr).unwrap();
        assert!(t != 0 && lt != 0 && sf != 0);
        g.tex_object_destroy(t).unwrap();
        g.tex_object_destroy(lt).unwrap();
        g.surf_object_destroy(sf).unwrap();
        // A 3-channel array is refused before the driver sees it.
        assert!(g.array_create(&ArrayDesc { channels: 3, ..desc }).is_err());
        g.array_destroy(arr).unwrap();
        assert!(g.arrays.is_empty());
        g.mem_free(d).unwrap();
    }

    #[test]
    fn gpu_pitched_copies_and_memsets_move_exactly_their_rows() {
        use crate::backend::{CopyEnd, CopyShape, GraphCopy, GraphMemset};
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        let (a, pitch) = g.mem_alloc_pitch(300, 40, 4).unwrap();
        let b = g.mem_alloc(pitch * 40).unwrap();
        let s = g.stream_create(1, 0).unwrap();
        let fill = |value, element_size, width| GraphMemset { dst: a, pitch, value, element_size, width, height: 40 };
        g.memset_pitched(&fill(0x42, 1, 300), None).unwrap();
        g.memset_d8(b, 0, pitch * 40, None).unwrap();
        // 32-bit words in rows 1-2, bytes 8-19 of `b`, on a stream.
        let words = GraphMemset { dst: b + pitch + 8, pitch, value: 0x0102_0304, element_size: 4, width: 3, height: 2 };
        g.memset_pitched(&words, Some(&s)).unwrap();
        g.stream_synchronize(&s).unwrap();
        let mut got = vec![0u8; (pitch * 40) as usize];
        g.copy_dtoh(&mut got, b, None).unwrap();
        for (i, &v) in got.iter().enumerate() {
            let (y, x) = (i as u64 / pitch, i as u64 % pitch);
            let want = if (1..3).contains(&y) && (8..20).contains(&x) { [4, 3, 2, 1][(x % 4) as usize] } else { 0 };
            assert_eq!(v, want, "memset byte ({x}, {y})");
        }
        // `a`'s rows 2-5 and 10-13 (bytes 0-127) to `b` as two slices, then a plane back.
        let vol = GraphCopy {
            src: CopyEnd::Device(a + 2 * pitch),
            src_pitch: pitch,
            src_height: 8,
            dst: CopyEnd::Device(b),
            dst_pitch: pitch,
            dst_height: 8,
            width: 128,
            height: 4,
            depth: 2,
        };
        g.copy_pitched(&vol, CopyShape::Volume, Some(&s), false).unwrap();
        g.stream_synchronize(&s).unwrap();
        g.copy_dtoh(&mut got, b, None).unwrap();
        for y in [0u64, 3, 8, 11] {
            assert!(got[(y * pitch) as usize..][..128].iter().all(|&v| v == 0x42), "copied row {y}");
        }
        assert_eq!(got[(4 * pitch) as usize], 0, "row 4 is between the slices");
        let plane =
            GraphCopy { depth: 1, height: 40, width: 300, src: CopyEnd::Device(b), dst: CopyEnd::Device(a), ..vol };
        let plane = GraphCopy { src_height: 40, dst_height: 40, ..plane };
        for shape in [CopyShape::Plane, CopyShape::PlaneUnaligned] {
            g.copy_pitched(&plane, shape, None, true).unwrap();
        }
        let mut back = vec![0u8; (pitch * 40) as usize];
        g.copy_dtoh(&mut back, a, None).unwrap();
        for y in 0..40u64 {
            let row = (y * pitch) as usize;
            assert_eq!(back[row..row + 300], got[row..row + 300], "plane row {y}");
        }
        // What the driver refuses natively it refuses here: a misaligned 32-bit memset.
        let odd = GraphMemset { dst: a + 2, pitch, value: 1, element_size: 4, width: 1, height: 1 };
        assert!(g.memset_pitched(&odd, None).is_err());
        g.stream_destroy(s).unwrap();
        g.mem_free(b).unwrap();
        g.mem_free(a).unwrap();
    }

    #[test]
    fn gpu_events_streams_and_pitched_memory() {
        if !gpu_tests_enabled() {
            return;
        }
        let mut g = open_gpu();
        let (_, greatest) = g.ctx_get_stream_priority_range().unwrap();
        let s1 = g.stream_create(1, 0).unwrap();
        let s2 = g.stream_create(1, greatest).unwrap();
        assert_eq!(g.stream_get_priority(Some(&s2)).unwrap(), greatest);
        assert_eq!(g.stream_get_flags(Some(&s1)).unwrap() & 1, 1);
        g.stream_get_flags(None).unwrap();
        g.stream_get_priority(None).unwrap();

        const N: u64 = 64 << 20;
        let buf = g.mem_alloc(N).unwrap();
        let start = g.event_create(0).unwrap();
        let end = g.event_create(0).unwrap();
        g.event_record(&start, Some(&s1), 0).unwrap();
        g.memset_d32(buf, 3, N / 4, Some(&s1)).unwrap();
        g.event_record(&end, Some(&s1), 0).unwrap();
        // `s2` waits for `end`, so its copy sees the memset's last words.
        g.stream_wait_event(Some(&s2), &end, 0).unwrap();
        let mut tail = [0u8; 16];
        g.copy_dtoh(&mut tail, buf + N - 16, Some(&s2)).unwrap();
        assert_eq!(tail, [3, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0]);
        g.event_synchronize(&end).unwrap();
        g.event_query(&end).unwrap();
        g.stream_query(Some(&s1)).unwrap();
        g.stream_query(None).unwrap();
        let ms = g.event_elapsed_time(&start, &end).unwrap();
        println!("memset of {N} bytes: {ms} ms");
        assert!(ms >= 0.0);
        let untimed = g.event_create(2).unwrap(); // DISABLE_TIMING
        g.event_record(&untimed, None, 0).unwrap();
        g.event_synchronize(&untimed).unwrap();
        assert!(g.event_elapsed_time(&start, &untimed).is_err());

        let (p, pitch) = g.mem_alloc_pitch(1000, 10, 4).unwrap();
        assert!(pitch >= 1000);
        g.memset_d16(p, 0xabcd, pitch * 10 / 2, None).unwrap();
        let mut last = [0u8; 4];
        g.copy_dtoh(&mut last, p + pitch * 10 - 4, None).unwrap();
        assert_eq!(last, [0xcd, 0xab, 0xcd, 0xab]);
        g.memset_d16(p + 2, 0, 1, Some(&s1)).unwrap();
        assert_eq!(g.memset_d16(p + 1, 0, 1, None), Err(CuError::INVALID_VALUE));
        g.mem_free(p).unwrap();

        for e in [start, end, untimed] {
            g.event_destroy(e).unwrap();
        }
        g.stream_destroy(s1).unwrap();
        g.stream_destroy(s2).unwrap();
        assert_eq!(g.event_create(0x100).map(|_| ()), Err(CuError::INVALID_VALUE));
        // An event left alive is destroyed by `Drop`.
        let _left = g.event_create(0).unwrap();
    }
}
