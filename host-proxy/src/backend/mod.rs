//! GPU backends behind one trait: [`cuda`] drives the real GPU through cudarc; [`sim`] is a
//! test double in host memory for machines without a GPU.
//!
//! A backend is owned by one zone worker process and used from one thread. It knows
//! nothing of zones, handles or quotas: the caller ([`crate::zone`]) has already checked
//! every address range against the zone's own allocations before a backend sees it.

pub mod cuda;
pub mod sim;

use std::ffi::CStr;
use vgpu_proto::DeviceInfo;

/// The CUDA error type and result, one vocabulary with the guest (generated into the protocol crate).
pub use vgpu_proto::{CuError, CuResult};

/// A launch configuration (`cuLaunchKernel` / `cuLaunchKernelEx`).
pub use vgpu_proto::LaunchConfig;
/// One kernel parameter as the driver lays it out (`cuFuncGetParamInfo`).
pub use vgpu_proto::ParamSlot;

/// The GPU operations a zone worker needs. Device pointers are addresses in the backend's
/// own contexts; ranges passed in are already validated against the zone's allocations,
/// and every object passed in (stream, event, module, function, context) was made by this
/// backend and is still live (the zone's handle tables guarantee it).
///
/// **Current context.** Operations run in the context last chosen with
/// [`set_context`](Self::set_context) (initially the device's primary context), exactly
/// as CUDA's per-thread current context: allocations, modules, streams and events belong
/// to the context current when they were made.
pub trait GpuBackend {
    /// A backend stream object.
    type Stream;
    /// A backend event object.
    type Event;
    /// An explicitly created context (the primary context is `None` where one is taken).
    type Context;
    /// A loaded module or library (`CUmodule` / `CUlibrary`).
    type Module;
    /// A function or kernel (`CUfunction` / `CUkernel`).
    type Function;
    /// A graph (`CUgraph`): context-independent, as in CUDA.
    type Graph;
    /// An executable graph (`CUgraphExec`), made in the current context.
    type GraphExec;
    /// A physical allocation of virtual memory management (`cuMemCreate`).
    type Phys;
    /// A CUDA array (`cuArray3DCreate`), for copies and texture and surface objects.
    type Array;
    /// A JIT link state (`cuLinkCreate`).
    type Link;
    /// A node of a graph: a plain value naming it inside its graph (the zone maps it to a
    /// handle; it is only ever passed back together with its graph).
    type GraphNode: Copy + Eq + std::hash::Hash + std::fmt::Debug;

    /// Device memory a context takes for the driver's own use with the default limits
    /// (charged to the zone per context unless its quotas say otherwise).
    const CONTEXT_MEM_BYTES: u64;

    /// Static facts about the device.
    fn device_info(&self) -> DeviceInfo;
    /// Every device attribute `1..=max_attribute` (index `i` holds attribute `i + 1`):
    /// its value, or the driver's error for that attribute. Called once per zone.
    fn device_attributes(&mut self) -> Vec<Result<i32, CuError>>;
    /// The device's PCI bus id, as `cuDeviceGetPCIBusId` writes it.
    fn pci_bus_id(&mut self) -> CuResult<String>;

    // ---- contexts ----
    /// Creates a context with `flags` and makes it current.
    fn ctx_create(&mut self, flags: u32) -> CuResult<Self::Context>;
    /// Destroys a context: first scrubs (zeroes) every allocation made in it, then
    /// destroys it (which frees them, its modules, streams and events). If it was current,
    /// the primary context becomes current.
    fn ctx_destroy(&mut self, ctx: Self::Context) -> CuResult<()>;
    /// Makes `ctx` current (`None`: the primary context).
    fn set_context(&mut self, ctx: Option<&Self::Context>) -> CuResult<()>;
    /// `cuCtxGetLimit` in the current context.
    fn ctx_get_limit(&mut self, limit: u32) -> CuResult<u64>;
    /// `cuCtxSetLimit` in the current context.
    fn ctx_set_limit(&mut self, limit: u32, value: u64) -> CuResult<()>;
    /// `cuCtxGetFlags`.
    fn ctx_get_flags(&mut self) -> CuResult<u32>;
    /// `cuCtxSetFlags`.
    fn ctx_set_flags(&mut self, flags: u32) -> CuResult<()>;
    /// `cuCtxGetApiVersion` of the current context.
    fn ctx_get_api_version(&mut self) -> CuResult<u32>;
    /// `cuCtxGetStreamPriorityRange`: (least, greatest).
    fn ctx_get_stream_priority_range(&mut self) -> CuResult<(i32, i32)>;
    /// `cuCtxGetCacheConfig`.
    fn ctx_get_cache_config(&mut self) -> CuResult<u32>;
    /// `cuCtxSetCacheConfig`.
    fn ctx_set_cache_config(&mut self, config: u32) -> CuResult<()>;
    /// `cuDevicePrimaryCtxSetFlags_v2`.
    fn primary_ctx_set_flags(&mut self, flags: u32) -> CuResult<()>;
    /// The primary context's flags (`cuDevicePrimaryCtxGetState`'s first output).
    fn primary_ctx_flags(&mut self) -> CuResult<u32>;
    /// Waits for all work in the current context.
    fn synchronize(&mut self) -> CuResult<()>;

    // ---- memory ----
    /// Free and total device memory as the driver reports them.
    fn mem_get_info(&mut self) -> CuResult<(u64, u64)>;
    /// Allocates `size > 0` bytes in the current context.
    fn mem_alloc(&mut self, size: u64) -> CuResult<u64>;
    /// `cuMemAllocPitch`: returns (address, pitch); the allocation is `pitch * height` bytes.
    fn mem_alloc_pitch(&mut self, width: u64, height: u64, element_size: u32) -> CuResult<(u64, u64)>;
    /// Scrubs (zeroes) then frees an allocation made by `mem_alloc`/`mem_alloc_pitch`.
    fn mem_free(&mut self, dptr: u64) -> CuResult<()>;
    /// Copies host bytes to device memory. With a stream the copy may still be running
    /// when this returns, but `src` has been consumed.
    fn copy_htod(&mut self, dst: u64, src: &[u8], stream: Option<&Self::Stream>) -> CuResult<()>;
    /// Copies device memory to host bytes; returns when the bytes are in `dst`.
    fn copy_dtoh(&mut self, dst: &mut [u8], src: u64, stream: Option<&Self::Stream>) -> CuResult<()>;
    /// Copies device memory to device memory.
    fn copy_dtod(&mut self, dst: u64, src: u64, len: u64, stream: Option<&Self::Stream>) -> CuResult<()>;
    /// Sets `count` bytes at `dst` to `value`.
    fn memset_d8(&mut self, dst: u64, value: u8, count: u64, stream: Option<&Self::Stream>) -> CuResult<()>;
    /// Sets `count` 16-bit words at `dst` to `value`.
    fn memset_d16(&mut self, dst: u64, value: u16, count: u64, stream: Option<&Self::Stream>) -> CuResult<()>;
    /// Sets `count` 32-bit words at `dst` to `value`.
    fn memset_d32(&mut self, dst: u64, value: u32, count: u64, stream: Option<&Self::Stream>) -> CuResult<()>;
    /// A pitched copy between device ranges and the registered window (window sides only
    /// where [`attach_window`](Self::attach_window) took the window), both sides checked by
    /// the caller, as the driver entry point `shape` names; on `stream`, or synchronous
    /// without one. With `wait`, returns once the copy is done.
    fn copy_pitched(
        &mut self,
        copy: &GraphCopy,
        shape: CopyShape,
        stream: Option<&Self::Stream>,
        wait: bool,
    ) -> CuResult<()>;
    /// A 2-D memset (`cuMemsetD2D8/16/32`), its block checked by the caller.
    fn memset_pitched(&mut self, memset: &GraphMemset, stream: Option<&Self::Stream>) -> CuResult<()>;

    // ---- CUDA arrays, texture and surface objects ----
    /// The id copies name `array` by ([`CopyEnd::Array`]).
    fn array_id(array: &Self::Array) -> u64;
    /// Creates a CUDA array of shape `desc` (checked by [`ArrayDesc::bytes`]) in the
    /// current context.
    fn array_create(&mut self, desc: &ArrayDesc) -> CuResult<Self::Array>;
    /// Destroys an array (no texture or surface object of the zone reads it any more).
    fn array_destroy(&mut self, array: Self::Array) -> CuResult<()>;
    /// Creates a texture object reading `res` in the current context; `tex_desc` is the
    /// program's `CUDA_TEXTURE_DESC` and `view` its `CUDA_RESOURCE_VIEW_DESC`, as bytes
    /// (plain values the driver checks). Returns the object's value, which kernels take.
    fn tex_object_create(
        &mut self,
        res: TexResource<'_, Self::Array>,
        tex_desc: &[u8; TEX_DESC_LEN],
        view: Option<&[u8; VIEW_DESC_LEN]>,
    ) -> CuResult<u64>;
    /// Destroys a texture object this backend made.
    fn tex_object_destroy(&mut self, tex: u64) -> CuResult<()>;
    /// Creates a surface object writing `array` in the current context.
    fn surf_object_create(&mut self, array: &Self::Array) -> CuResult<u64>;
    /// Destroys a surface object this backend made.
    fn surf_object_destroy(&mut self, surf: u64) -> CuResult<()>;

    // ---- JIT linking ----
    /// Starts a link in the current context with scalar JIT `options` (checked by the
    /// caller: [`link_option_is_scalar`]); the backend keeps the logs itself.
    fn link_create(&mut self, options: &[(u32, u64)]) -> CuResult<Self::Link>;
    /// Adds one input of `CUjitInputType` `input_type` (PTX, cubin, fat binary or host
    /// object: checked as module images are) named `name`, with its own scalar options.
    fn link_add(
        &mut self,
        link: &mut Self::Link,
        input_type: u32,
        data: &[u8],
        name: &std::ffi::CStr,
        options: &[(u32, u64)],
    ) -> CuResult<()>;
    /// Links what was added; returns a copy of the linked image.
    fn link_complete(&mut self, link: &mut Self::Link) -> CuResult<Vec<u8>>;
    /// The link's info and error logs so far.
    fn link_logs(&self, link: &Self::Link) -> (String, String);
    /// Ends a link (its image with it).
    fn link_destroy(&mut self, link: Self::Link) -> CuResult<()>;

    // ---- IPC (brokered by the daemon: see `crate::broker`) ----
    /// Makes the allocation starting at `dptr` (made by `mem_alloc`/`mem_alloc_pitch`, in
    /// any context) mappable by another worker process of this host, and returns the
    /// backend's payload naming it (cuda: the driver's 64-byte `CUipcMemHandle`). The
    /// payload is host-internal: it never reaches a guest. Exporting again returns a payload
    /// for the same memory. When the allocation is freed, the payload stops working.
    fn ipc_export(&mut self, dptr: u64) -> CuResult<Vec<u8>>;
    /// Maps memory exported by another worker process (`payload` from its
    /// [`ipc_export`](Self::ipc_export), `size` bytes) into the current context and returns
    /// its address here. `flags` must be `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS` (1), the one
    /// value the driver takes; anything else is `CUDA_ERROR_INVALID_VALUE`, as is a payload
    /// that names nothing live.
    fn ipc_open(&mut self, payload: &[u8], size: u64, flags: u32) -> CuResult<u64>;
    /// Unmaps memory mapped by [`ipc_open`](Self::ipc_open) (its start), in the context it
    /// was mapped in. The memory itself belongs to the exporter and is not scrubbed here.
    fn ipc_close(&mut self, dptr: u64) -> CuResult<()>;
    /// Makes an event created with `CU_EVENT_INTERPROCESS` openable by another worker of this
    /// host; returns the backend's payload (cuda: the driver's 64-byte `CUipcEventHandle`),
    /// host-internal like [`ipc_export`](Self::ipc_export)'s.
    fn ipc_event_export(&mut self, event: &Self::Event) -> CuResult<Vec<u8>>;
    /// Opens an event exported by another worker, in the current context.
    fn ipc_event_open(&mut self, payload: &[u8]) -> CuResult<Self::Event>;

    // ---- the shared data window (fast path) ----
    /// Makes the zone's shared data window known to the backend so that copies from and to
    /// it need no staging copy (the cuda backend registers it with the driver: pinned,
    /// DMA-able). Returns whether the window copies below are available; the default is
    /// no, and the zone stages copies through host memory instead.
    ///
    /// # Safety
    /// `base .. base + len` must stay mapped, readable and writable, until the backend is
    /// dropped. Its contents may change at any time (the guest shares it): the backend
    /// must only hand the memory to the device, never read it through a Rust reference.
    #[allow(unsafe_code)] // The trait's declaration: the contract is the caller's.
    unsafe fn attach_window(&mut self, base: std::ptr::NonNull<u8>, len: usize) -> CuResult<bool> {
        let _ = (base, len);
        Ok(false)
    }
    /// Queues a host function on `stream` (NULL: the context's default stream): when the
    /// stream gets there, `slot.run()` is called and the stream's later work waits for it.
    fn launch_host_func(&mut self, stream: Option<&Self::Stream>, slot: HostFuncSlot) -> CuResult<()>;
    /// The device address of window byte `offset` (zero-copy host memory), when the backend
    /// took the window (`attach_window`) and maps it for kernels.
    fn window_device_pointer(&mut self, offset: u64) -> CuResult<u64> {
        let _ = offset;
        Err(CuError::NOT_SUPPORTED)
    }
    /// Copies `len` bytes at window offset `offset` (in bounds: checked by the caller) to
    /// `dst`. With `wait`, returns only once the window bytes have been read (the guest may
    /// reuse them); otherwise the copy may still be in flight on `stream`.
    fn copy_window_to_device(
        &mut self,
        dst: u64,
        offset: u64,
        len: u64,
        stream: Option<&Self::Stream>,
        wait: bool,
    ) -> CuResult<()> {
        let _ = (dst, offset, len, stream, wait);
        Err(CuError::NOT_SUPPORTED)
    }
    /// Copies `len` bytes at `src` into the window at `offset`. With `wait`, returns once
    /// the bytes are in the window; otherwise they land when `stream` gets there.
    fn copy_device_to_window(
        &mut self,
        offset: u64,
        src: u64,
        len: u64,
        stream: Option<&Self::Stream>,
        wait: bool,
    ) -> CuResult<()> {
        let _ = (offset, src, len, stream, wait);
        Err(CuError::NOT_SUPPORTED)
    }

    // ---- modules, libraries, functions ----
    /// Loads a module image (`cuModuleLoadData`): NUL-terminated PTX, a cubin or a fatbin,
    /// exactly `image.len()` bytes (the caller has sized it).
    fn module_load(&mut self, image: &[u8]) -> CuResult<Self::Module>;
    /// Loads a library image (`cuLibraryLoadData`, no options).
    fn library_load(&mut self, image: &[u8]) -> CuResult<Self::Module>;
    /// Unloads a module or library (whichever it was loaded as). A module obtained from
    /// [`library_get_module`](Self::library_get_module) is only forgotten.
    fn module_unload(&mut self, module: Self::Module) -> CuResult<()>;
    /// `cuModuleGetFunction`.
    fn module_get_function(&mut self, module: &Self::Module, name: &CStr) -> CuResult<Self::Function>;
    /// Every function of a module or library view (`cuModuleEnumerateFunctions`), at most
    /// [`MAX_MODULE_FUNCTIONS`] (more is `CUDA_ERROR_NOT_SUPPORTED`).
    fn module_functions(&mut self, module: &Self::Module) -> CuResult<Vec<Self::Function>>;
    /// `cuModuleGetGlobal`: (address, size in bytes).
    fn module_get_global(&mut self, module: &Self::Module, name: &CStr) -> CuResult<(u64, u64)>;
    /// `cuLibraryGetModule`: a non-owning module view of a library.
    fn library_get_module(&mut self, library: &Self::Module) -> CuResult<Self::Module>;
    /// `cuLibraryGetKernel`.
    fn library_get_kernel(&mut self, library: &Self::Module, name: &CStr) -> CuResult<Self::Function>;
    /// `cuLibraryGetGlobal`: (address, size in bytes).
    fn library_get_global(&mut self, library: &Self::Module, name: &CStr) -> CuResult<(u64, u64)>;
    /// `cuKernelGetFunction`: the kernel's function in the current context.
    fn kernel_get_function(&mut self, kernel: &Self::Function) -> CuResult<Self::Function>;
    /// `cuFuncGetAttribute` (for a kernel: `cuKernelGetAttribute` on this device).
    fn func_get_attribute(&mut self, func: &Self::Function, attribute: u32) -> CuResult<i32>;
    /// `cuFuncSetAttribute` (for a kernel: `cuKernelSetAttribute` on this device).
    fn func_set_attribute(&mut self, func: &Self::Function, attribute: u32, value: i32) -> CuResult<()>;
    /// `cuFuncSetCacheConfig`.
    fn func_set_cache_config(&mut self, func: &Self::Function, config: u32) -> CuResult<()>;
    /// Every parameter's offset and size, in order (`cuFuncGetParamInfo` until it reports
    /// `CUDA_ERROR_INVALID_VALUE` past the last).
    fn func_param_layout(&mut self, func: &Self::Function) -> CuResult<Vec<ParamSlot>>;
    /// Launches `func`. `params` is the packed parameter buffer: parameter `i` occupies
    /// `params[layout[i].offset..][..layout[i].size]`; the caller checked the bounds.
    fn launch(
        &mut self,
        func: &Self::Function,
        config: &LaunchConfig,
        stream: Option<&Self::Stream>,
        params: &[u8],
        layout: &[ParamSlot],
    ) -> CuResult<()>;
    /// `cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags`.
    fn occupancy_max_active_blocks(
        &mut self,
        func: &Self::Function,
        block_size: i32,
        dynamic_smem: u64,
        flags: u32,
    ) -> CuResult<i32>;
    /// `cuOccupancyAvailableDynamicSMemPerBlock`.
    fn occupancy_available_dynamic_smem(
        &mut self,
        func: &Self::Function,
        blocks: i32,
        block_size: i32,
    ) -> CuResult<u64>;
    /// `cuOccupancyMaxActiveClusters` for a launch configuration (plain attributes only).
    fn occupancy_max_active_clusters(&mut self, func: &Self::Function, config: &LaunchConfig) -> CuResult<i32>;
    /// The value slot 39 of the driver's private table {21318C60…} gives for slot 51's
    /// object of the current context (undocumented; cuBLASLt asks for it before its first
    /// heuristics query — see libvgpu's export_tables.rs for what was measured).
    fn ctx_query_value(&mut self) -> CuResult<u64>;

    // ---- streams ----
    /// Creates a stream (`cuStreamCreateWithPriority`; priority 0 is the default).
    fn stream_create(&mut self, flags: u32, priority: i32) -> CuResult<Self::Stream>;
    /// Waits for a stream's work.
    fn stream_synchronize(&mut self, stream: &Self::Stream) -> CuResult<()>;
    /// `Ok` when the stream's work is done, [`CuError::NOT_READY`] when not.
    fn stream_query(&mut self, stream: Option<&Self::Stream>) -> CuResult<()>;
    /// Makes future work on `stream` wait for `event`.
    fn stream_wait_event(&mut self, stream: Option<&Self::Stream>, event: &Self::Event, flags: u32) -> CuResult<()>;
    /// `cuStreamGetFlags`.
    fn stream_get_flags(&mut self, stream: Option<&Self::Stream>) -> CuResult<u32>;
    /// `cuStreamGetPriority`.
    fn stream_get_priority(&mut self, stream: Option<&Self::Stream>) -> CuResult<i32>;
    /// Destroys a stream.
    fn stream_destroy(&mut self, stream: Self::Stream) -> CuResult<()>;

    // ---- virtual memory management (the zone checks every range first) ----
    /// `cuMemGetAllocationGranularity` for pinned device memory of this device (minimum, or
    /// with `recommended` the recommended one).
    fn mem_granularity(&mut self, recommended: bool) -> CuResult<u64>;
    /// `cuMemAddressReserve`: a range of `size` bytes of virtual addresses.
    fn mem_address_reserve(&mut self, size: u64, alignment: u64, addr: u64) -> CuResult<u64>;
    /// `cuMemAddressFree` of a whole reservation with nothing mapped in it.
    fn mem_address_free(&mut self, ptr: u64, size: u64) -> CuResult<()>;
    /// `cuMemCreate` of `size` bytes of pinned memory on this device, with the export
    /// `handle_types` allowed (POSIX file descriptor, fabric: never used by this side) and
    /// `rdma` its gpuDirectRDMACapable flag.
    fn mem_create(&mut self, size: u64, handle_types: u32, rdma: bool) -> CuResult<Self::Phys>;
    /// Scrubs (zeroes) a physical allocation with no mapping left, then `cuMemRelease`.
    fn mem_release(&mut self, phys: Self::Phys) -> CuResult<()>;
    /// `cuMemMap` of `size` bytes of `phys` from `offset` at `ptr` (inside a reservation,
    /// over nothing mapped).
    fn mem_map(&mut self, ptr: u64, size: u64, offset: u64, phys: &Self::Phys) -> CuResult<()>;
    /// `cuMemUnmap` of whole mappings covering exactly `[ptr, ptr + size)`.
    fn mem_unmap(&mut self, ptr: u64, size: u64) -> CuResult<()>;
    /// `cuMemSetAccess` for this device: `flags` 1 (read) or 3 (read and write).
    fn mem_set_access(&mut self, ptr: u64, size: u64, flags: u32) -> CuResult<()>;

    // ---- graphs and stream capture ----
    /// `cuGraphCreate` (flags 0).
    fn graph_create(&mut self) -> CuResult<Self::Graph>;
    /// `cuGraphDestroy`: the graph and its nodes (executable graphs made from it live on).
    fn graph_destroy(&mut self, graph: Self::Graph) -> CuResult<()>;
    /// `cuGraphClone`.
    fn graph_clone(&mut self, graph: &Self::Graph) -> CuResult<Self::Graph>;
    /// `cuGraphNodeFindInClone`: the node of `clone` that `original` (a node of the graph it
    /// was cloned from) became.
    fn graph_find_in_clone(&mut self, clone: &Self::Graph, original: Self::GraphNode) -> CuResult<Self::GraphNode>;
    /// Adds a node after `deps` (nodes of `graph`). Ranges in `node` were checked by the
    /// caller against the zone's allocations and the window's size.
    fn graph_add_node(
        &mut self,
        graph: &Self::Graph,
        deps: &[Self::GraphNode],
        node: GraphNodeSpec<'_, Self::Function>,
    ) -> CuResult<Self::GraphNode>;
    /// `cuGraphGetNodes`: every node of `graph`.
    fn graph_nodes(&mut self, graph: &Self::Graph) -> CuResult<Vec<Self::GraphNode>>;
    /// `cuGraphInstantiateWithFlags` in the current context.
    fn graph_instantiate(&mut self, graph: &Self::Graph, flags: u64) -> CuResult<Self::GraphExec>;
    /// `cuGraphExecDestroy`.
    fn graph_exec_destroy(&mut self, exec: Self::GraphExec) -> CuResult<()>;
    /// `cuGraphLaunch` (with `upload_only`, `cuGraphUpload`) on `stream`.
    fn graph_launch(
        &mut self,
        exec: &Self::GraphExec,
        stream: Option<&Self::Stream>,
        upload_only: bool,
    ) -> CuResult<()>;
    /// `cuStreamBeginCapture_v2`.
    fn stream_begin_capture(&mut self, stream: Option<&Self::Stream>, mode: u32) -> CuResult<()>;
    /// `cuStreamEndCapture`: the captured graph.
    fn stream_end_capture(&mut self, stream: Option<&Self::Stream>) -> CuResult<Self::Graph>;
    /// `cuStreamGetCaptureInfo`: (`CUstreamCaptureStatus`, capture id; 0 when none).
    fn stream_capture_info(&mut self, stream: Option<&Self::Stream>) -> CuResult<(u32, u64)>;
    /// `cuThreadExchangeStreamCaptureMode` on the worker's thread: the previous mode.
    fn exchange_capture_mode(&mut self, mode: u32) -> CuResult<u32>;
    /// Queues a host function that may run more than once (`stream` is capturing: it
    /// becomes a node of the capture's graph, which is returned). The backend keeps `slot`
    /// for its own life.
    fn launch_host_func_persistent(
        &mut self,
        stream: Option<&Self::Stream>,
        slot: std::sync::Arc<HostFuncSlot>,
    ) -> CuResult<Option<Self::GraphNode>>;

    // ---- events ----
    /// `cuEventCreate`.
    fn event_create(&mut self, flags: u32) -> CuResult<Self::Event>;
    /// `cuEventDestroy`.
    fn event_destroy(&mut self, event: Self::Event) -> CuResult<()>;
    /// `cuEventRecordWithFlags` (flags 0 = `cuEventRecord`).
    fn event_record(&mut self, event: &Self::Event, stream: Option<&Self::Stream>, flags: u32) -> CuResult<()>;
    /// `Ok` when the event has completed, [`CuError::NOT_READY`] when not.
    fn event_query(&mut self, event: &Self::Event) -> CuResult<()>;
    /// Waits for an event.
    fn event_synchronize(&mut self, event: &Self::Event) -> CuResult<()>;
    /// Milliseconds between two recorded events.
    fn event_elapsed_time(&mut self, start: &Self::Event, end: &Self::Event) -> CuResult<f32>;
}

/// `CU_STREAM_CAPTURE_STATUS_ACTIVE`.
pub const CAPTURE_ACTIVE: u32 = 1;

/// One side of a graph copy node: a device address, or a byte offset in the zone's shared
/// data window (pinned host memory of the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyEnd {
    /// Device memory.
    Device(u64),
    /// The data window, at this offset.
    Window(u64),
    /// A CUDA array ([`GpuBackend::array_id`]), from byte `x` of row `y` of slice `z`.
    Array {
        /// The array's id.
        id: u64,
        /// Bytes into the row.
        x: u64,
        /// The row.
        y: u64,
        /// The slice.
        z: u64,
    },
}

/// A linear 3-D copy (`CUDA_MEMCPY3D` without arrays; positions folded into the addresses):
/// `depth` slices of `height` rows of `width` bytes; rows `pitch` bytes apart, slices
/// `pitch * height` apart on each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphCopy {
    /// Where the first source byte is.
    pub src: CopyEnd,
    /// Bytes between source rows.
    pub src_pitch: u64,
    /// Rows between source slices.
    pub src_height: u64,
    /// Where the first destination byte is.
    pub dst: CopyEnd,
    /// Bytes between destination rows.
    pub dst_pitch: u64,
    /// Rows between destination slices.
    pub dst_height: u64,
    /// Bytes per row.
    pub width: u64,
    /// Rows per slice.
    pub height: u64,
    /// Slices.
    pub depth: u64,
}

impl GraphCopy {
    /// A copy of `len` contiguous bytes.
    pub fn linear(src: CopyEnd, dst: CopyEnd, len: u64) -> GraphCopy {
        GraphCopy {
            src,
            src_pitch: len,
            src_height: 1,
            dst,
            dst_pitch: len,
            dst_height: 1,
            width: len,
            height: 1,
            depth: 1,
        }
    }
}

/// Whether JIT option `option` (`CUjit_option`) takes a plain value the host may pass to its
/// driver: not the log buffers and their sizes and the wall time (the host keeps its own),
/// and not the options whose values are pointers into the program (symbol and referenced
/// names, symbol addresses).
pub fn link_option_is_scalar(option: u32) -> bool {
    option <= 33 && !matches!(option, 2..=6 | 17 | 18 | 25 | 27)
}

/// `CUjitInputType`s a link takes here: cubin, PTX, fat binary, host object.
pub const LINK_INPUT_TYPES: [u32; 4] = [0, 1, 2, 3];

/// Functions one module may list (`module_functions`).
pub const MAX_MODULE_FUNCTIONS: usize = 4096;

/// Bytes of a `CUDA_TEXTURE_DESC`.
pub const TEX_DESC_LEN: usize = 104;
/// Bytes of a `CUDA_RESOURCE_VIEW_DESC`.
pub const VIEW_DESC_LEN: usize = 112;

/// A CUDA array's shape (`CUDA_ARRAY3D_DESCRIPTOR`): `height` 0 for a 1-D array, `depth` 0
/// for 1-D and 2-D ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArrayDesc {
    /// Elements per row.
    pub width: u64,
    /// Rows (0: 1-D).
    pub height: u64,
    /// Slices (0: 1-D or 2-D).
    pub depth: u64,
    /// `CUarray_format`.
    pub format: u32,
    /// Channels per element: 1, 2 or 4.
    pub channels: u32,
    /// `CUDA_ARRAY3D_*` flags.
    pub flags: u32,
}

/// The `CUDA_ARRAY3D_*` flags an array may have here: LAYERED, SURFACE_LDST, CUBEMAP,
/// TEXTURE_GATHER (sparse, deferred-mapping, video and depth arrays are not offered).
pub const ARRAY_FLAGS: u32 = 0x01 | 0x02 | 0x04 | 0x08;

impl ArrayDesc {
    /// Bytes of one channel of `format`, for the formats offered (integers, half and float;
    /// block-compressed and video formats are not).
    pub fn format_bytes(format: u32) -> Option<u64> {
        match format {
            0x01 | 0x08 => Some(1),
            0x02 | 0x09 | 0x10 => Some(2),
            0x03 | 0x0a | 0x20 => Some(4),
            _ => None,
        }
    }

    /// Bytes of one element.
    pub fn element_bytes(&self) -> Option<u64> {
        let channels = matches!(self.channels, 1 | 2 | 4).then_some(u64::from(self.channels))?;
        Self::format_bytes(self.format).map(|b| b * channels)
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> Option<u64> {
        self.width.checked_mul(self.element_bytes()?)
    }

    /// Rows per slice and slices (a missing dimension counts one).
    pub fn rows_and_slices(&self) -> (u64, u64) {
        (self.height.max(1), self.depth.max(1))
    }

    /// The array's bytes — what the zone charges it (the driver's own layout may pad) —,
    /// or `None` for a shape the driver would refuse: no width, a height missing below a
    /// depth, a format, channel count or flag not offered, or a size that overflows.
    pub fn bytes(&self) -> Option<u64> {
        let shape_ok = self.width > 0 && (self.depth == 0 || self.height > 0) && self.flags & !ARRAY_FLAGS == 0;
        if !shape_ok {
            return None;
        }
        let (rows, slices) = self.rows_and_slices();
        self.row_bytes()?.checked_mul(rows)?.checked_mul(slices)
    }
}

/// What a texture object reads (`CUDA_RESOURCE_DESC`): an array, or linear device memory
/// the caller checked.
#[derive(Debug)]
pub enum TexResource<'a, A> {
    /// A CUDA array.
    Array(&'a A),
    /// `size` bytes of linear memory at `dptr`, of `format` × `channels` elements.
    Linear {
        /// The first byte.
        dptr: u64,
        /// `CUarray_format`.
        format: u32,
        /// Channels per element.
        channels: u32,
        /// Bytes.
        size: u64,
    },
    /// A pitched 2-D block of linear memory.
    Pitch2d {
        /// The first byte.
        dptr: u64,
        /// `CUarray_format`.
        format: u32,
        /// Channels per element.
        channels: u32,
        /// Elements per row.
        width: u64,
        /// Rows.
        height: u64,
        /// Bytes between rows.
        pitch: u64,
    },
}

/// Which driver entry point a pitched copy on a stream stands for: their rules differ
/// (`cuMemcpy2D` may refuse device pitches that `cuMemcpy2DUnaligned` and `cuMemcpy3D`
/// take), so a backend on the real driver calls the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyShape {
    /// `cuMemcpy2D_v2` / `cuMemcpy2DAsync_v2` (the copy's first slice).
    Plane,
    /// `cuMemcpy2DUnaligned_v2` (synchronous: the driver has no stream variant).
    PlaneUnaligned,
    /// `cuMemcpy3D_v2` / `cuMemcpy3DAsync_v2`.
    Volume,
}

impl CopyShape {
    /// The wire's value (`MemcpyPitched::shape`): 0, 1 or 2.
    pub fn from_wire(v: u8) -> Option<CopyShape> {
        match v {
            0 => Some(CopyShape::Plane),
            1 => Some(CopyShape::PlaneUnaligned),
            2 => Some(CopyShape::Volume),
            _ => None,
        }
    }
}

/// A 2-D memset (`CUDA_MEMSET_NODE_PARAMS`): `height` rows of `width` elements of
/// `element_size` (1, 2 or 4) bytes, rows `pitch` bytes apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphMemset {
    /// The first byte.
    pub dst: u64,
    /// Bytes between rows.
    pub pitch: u64,
    /// The value (its low `element_size` bytes).
    pub value: u32,
    /// Bytes per element: 1, 2 or 4.
    pub element_size: u32,
    /// Elements per row.
    pub width: u64,
    /// Rows.
    pub height: u64,
}

/// What a graph node does.
pub enum GraphNodeSpec<'a, F> {
    /// Nothing (a join point).
    Empty,
    /// A kernel launch, its parameters packed as for [`GpuBackend::launch`].
    Kernel {
        /// The function or kernel.
        func: &'a F,
        /// Its geometry (plain attributes only).
        config: &'a LaunchConfig,
        /// The packed parameters.
        params: &'a [u8],
        /// The parameters' layout, as the driver reports it.
        layout: &'a [ParamSlot],
    },
    /// A memset.
    Memset(GraphMemset),
    /// A copy.
    Memcpy(GraphCopy),
    /// A host function run at every launch (the backend keeps the slot for its own life).
    Host(std::sync::Arc<HostFuncSlot>),
}

/// A host function's rendezvous word in the zone's shared window (`HostFunc` requests):
/// the guest arms it (`…01`), the stream reaches the function and the host marks it reached
/// (`…10`), the guest runs the program's function and marks it done (any other value, in
/// practice `…11`). The upper 30 bits are the guest's generation, so a word re-armed for the
/// next function never reads as this one's "reached". The work queued after the function
/// waits for it, as with the driver: the host's side blocks in the driver's callback thread
/// (or, for the test double, in place) until the guest answers or the worker ends.
///
/// A function that runs more than once (a graph's host node, or one captured into a graph)
/// keeps its word: after each run the guest re-arms it with a new generation instead of
/// marking it done, and the host's side fires it again at the next launch.
pub struct HostFuncSlot {
    word: idm_core::RawRegion,
    /// The zone's count of queued host functions, decremented when this slot is done with
    /// (run, or dropped by a driver that refused it).
    queued: Option<std::sync::Arc<std::sync::atomic::AtomicU32>>,
}

impl std::fmt::Debug for HostFuncSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFuncSlot").finish_non_exhaustive()
    }
}

impl Drop for HostFuncSlot {
    fn drop(&mut self) {
        if let Some(q) = &self.queued {
            q.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// Set when the worker's session is over: blocked host functions stop waiting for the guest.
pub static WORKER_ENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl HostFuncSlot {
    /// `ARMED` in the low two bits: written by the guest before it posts the request.
    pub const ARMED: u32 = 1;
    /// `REACHED`: written here when the stream gets to the function.
    pub const REACHED: u32 = 2;

    /// Wraps the 8-byte word at `word` (see [`idm_core::RawRegion::new`] for the contract).
    ///
    /// # Safety
    /// `word` must be 8-byte aligned and stay mapped, and only accessed atomically, for as
    /// long as the slot lives.
    #[allow(unsafe_code)]
    pub unsafe fn new(word: std::ptr::NonNull<u8>) -> HostFuncSlot {
        // SAFETY: forwarded contract.
        HostFuncSlot { word: unsafe { idm_core::RawRegion::new(word, 8) }, queued: None }
    }

    /// Counts this slot in `queued` until it is dropped, if fewer than `max` are queued
    /// there; `None` (the slot dropped, nothing counted) when `max` are.
    pub fn counted_in(mut self, queued: &std::sync::Arc<std::sync::atomic::AtomicU32>, max: u32) -> Option<Self> {
        use std::sync::atomic::Ordering;
        queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        self.queued = Some(queued.clone());
        Some(self)
    }

    /// The stream reached the function: tells the guest and waits until it has run it (or
    /// `limit` has passed, where the wait would otherwise hold more than the zone's own
    /// stream). A word that was not armed (a confused or hostile guest) is left alone.
    pub fn run(&self, limit: Option<std::time::Duration>) {
        use idm_core::SharedMemory;
        use std::sync::atomic::Ordering;
        let armed = self.word.load_u32(0, Ordering::Acquire);
        if armed & 3 != Self::ARMED {
            return;
        }
        let reached = (armed & !3) | Self::REACHED;
        self.word.store_u32(0, reached, Ordering::Release);
        let start = std::time::Instant::now();
        let mut pause = std::time::Duration::from_micros(2);
        while self.word.load_u32(0, Ordering::Acquire) == reached {
            if WORKER_ENDING.load(Ordering::Acquire) || limit.is_some_and(|l| start.elapsed() > l) {
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(1));
        }
    }
}
