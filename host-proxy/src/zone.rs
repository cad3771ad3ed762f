//! `Zone`: one guest's GPU state inside its worker process — contexts, allocations,
//! handles, quotas — and [`ZoneCtx`], the implementation of the generated request API.
//!
//! Every request is checked here before a backend sees it: device ranges must lie inside
//! one of *this zone's* live allocations or module globals (overflow-checked), handles
//! must be live in this zone's table *of the right kind*, bulk descriptors must lie inside
//! the data window, names must be bounded C strings. Nothing in this module trusts the
//! guest, and nothing panics on its input.
//!
//! **Objects and their context.** Each zone starts with its primary context (a real handle
//! whose backend context is `None`). Every object — allocation, stream, event, module,
//! library view, function, module global — records the context current when it was made;
//! destroying a context (or resetting the primary one) drops every object recorded in it,
//! and everything that hangs off a module dropped with it. Libraries and their kernels
//! belong to no context, as in CUDA: only their unload or the zone's end releases them.
//!
//! **Handles** carry their kind in the top byte ([`crate::handles`]), so a stream handle
//! passed as an event is `CUDA_ERROR_INVALID_HANDLE`, and no handle is ever 0, 1 or 2: those
//! name the default stream ([`DEFAULT_STREAMS`]). Contexts, allocations and all other
//! handles share one quota (`max_handles`; the primary context is not counted).
//!
//! **IPC** ([`crate::broker`]). `cuIpcGetMemHandle` takes the start of one of the zone's
//! allocations; the backend's payload goes to the daemon's broker and the guest gets a
//! token-bearing handle (the same one when the allocation is exported again).
//! `cuIpcOpenMemHandle` asks the broker (which applies the policy), maps the memory
//! through the backend in the current context and registers it as an *imported* range:
//! copies, memsets and pointer queries reach it like an allocation, it counts against
//! `max_handles` but not the memory quota, `cuMemFree` refuses it, and opening the same
//! handle again in the same context returns the same address with one more reference
//! (as CUDA). `cuIpcCloseMemHandle` drops a reference and unmaps at the last. Freeing an
//! exported allocation (directly, with its context, or at teardown) revokes its token
//! first; revocations of tokens this zone imported are applied before each request
//! ([`Zone::poll_ipc`]): the range is unmapped and from then on refused, and only
//! `cuIpcCloseMemHandle` still accepts its address.

use crate::backend::{CuError, CuResult, GpuBackend};
use crate::broker::{guest_handle, parse_guest_handle, IpcBroker, Token};
use crate::device_output::DeviceOutput;
use crate::handles::{kind_of, HandleError, HandleTable};
use crate::image::{fatbin_payloads, ELF_MAGIC, FATBIN_MAGIC};
use crate::ledger::{Exceeded, Ledger, Usage};
use idm_core::{DataWindow, SharedMemory};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use vgpu_proto::generated::*;
use vgpu_proto::*;

mod arrays;
use arrays::{ArrayEntry, TexEntry};
mod graphs;
use graphs::NodeEntry;
mod link;
use link::LinkEntry;
pub use link::{MAX_LINKS, MAX_LINK_BYTES};
mod pitched;
pub use graphs::MAX_PERSISTENT_HOST_FUNCS;
mod vmm;
use vmm::PhysEntry;
pub use vmm::MAX_RESERVATIONS;

/// Per-zone limits, from configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Device memory the zone may hold, in bytes.
    pub mem_bytes: u64,
    /// Live objects (allocations + contexts + streams + events + modules + functions …)
    /// the zone may hold.
    pub max_handles: u32,
    /// Asynchronous requests accepted before the worker waits for the GPU to catch up.
    pub max_async_in_flight: u32,
    /// Sessions (CUDA processes) the zone may have at once, at most
    /// [`crate::ledger::MAX_SLOTS`]; one more is refused at attach with
    /// `CUDA_ERROR_NOT_PERMITTED`.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: u32,
    /// Device memory each of the zone's contexts is charged against `mem_bytes` (the
    /// primary context of each session and every context it creates): what the driver
    /// takes per context for its own use (local memory for the default stack of every
    /// resident thread, the printf buffer, the device heap). Absent: the backend's measured
    /// value ([`crate::backend::GpuBackend::CONTEXT_MEM_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_mem_bytes: Option<u64>,
}

fn default_max_sessions() -> u32 {
    8
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            mem_bytes: 4 << 30,
            max_handles: 4096,
            max_async_in_flight: 1024,
            max_sessions: default_max_sessions(),
            context_mem_bytes: None,
        }
    }
}

/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
const ATTRIBUTE_MULTIPROCESSOR_COUNT: usize = 16;
/// `CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR`.
const ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: usize = 39;
/// `CU_LIMIT_STACK_SIZE` (the limits below 3 size device memory of the context).
const LIMIT_STACK_SIZE: usize = 0;

/// `CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK`.
const FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: u32 = 0;
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
const FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: u32 = 8;

/// Most device memory a zone's free cache holds.
const FREE_CACHE_MAX: u64 = 256 << 20;
/// Largest allocation kept in the free cache.
const FREE_CACHE_ENTRY_MAX: u64 = 64 << 20;

/// Synchronous host-to-device copies up to this size are staged rather than DMAed from the
/// window (see `window_copy`).
const SMALL_COPY: usize = 64 << 10;

/// Largest chunk staged through host memory per copy step.
const STAGING_CHUNK: usize = 4 << 20;
/// Largest module or library image accepted (the data window may bound it further).
const MAX_IMAGE_BYTES: u64 = 256 << 20;
/// Host functions a zone may have queued and not yet run (each holds a callback in its
/// worker's driver queue); more answer `CUDA_ERROR_OUT_OF_MEMORY`.
pub const MAX_QUEUED_HOST_FUNCS: u32 = 4096;
/// Device output handed over per `TakeDeviceOutput` reply (well inside any ring's frame
/// limit; the guest asks again while the reply carries the notice).
const DEVICE_OUTPUT_CHUNK: usize = 8 << 10;
/// Longest symbol name accepted, in bytes (without the terminating NUL).
const MAX_NAME_BYTES: usize = 4096;
/// What an event's broker payload starts with (a memory handle's payload never does), so
/// that a token of one kind cannot be opened as the other.
const EVENT_PAYLOAD: &[u8] = b"VGPUEVT1";

/// Handle kinds (the top byte of a handle value).
mod kind {
    pub const CONTEXT: u8 = 0xc7;
    pub const STREAM: u8 = 0x57;
    pub const EVENT: u8 = 0xe7;
    pub const MODULE: u8 = 0x4d;
    pub const LIBRARY: u8 = 0x4c;
    pub const FUNCTION: u8 = 0x46;
    pub const KERNEL: u8 = 0x4b;
    pub const GRAPH: u8 = 0x47;
    pub const GRAPH_EXEC: u8 = 0x58;
    pub const GRAPH_NODE: u8 = 0x4e;
    pub const PHYS: u8 = 0x50;
    pub const ARRAY: u8 = 0x41;
    pub const LINK: u8 = 0x4a;
}

/// `CUpointer_attribute` values answered from the zone's tables.
mod ptr_attr {
    pub const CONTEXT: u32 = 1;
    pub const MEMORY_TYPE: u32 = 2;
    pub const DEVICE_POINTER: u32 = 3;
    pub const HOST_POINTER: u32 = 4;
    pub const BUFFER_ID: u32 = 7;
    pub const IS_MANAGED: u32 = 8;
    pub const DEVICE_ORDINAL: u32 = 9;
    pub const RANGE_START_ADDR: u32 = 11;
    pub const RANGE_SIZE: u32 = 12;
    pub const MAPPED: u32 = 13;
}

/// `CU_MEMORYTYPE_DEVICE`.
const MEMORYTYPE_DEVICE: u64 = 2;
/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`: `cuIpcOpenMemHandle` takes exactly this flag.
const IPC_MEM_LAZY_ENABLE_PEER_ACCESS: u32 = 1;

impl From<HandleError> for CuError {
    fn from(e: HandleError) -> Self {
        match e {
            HandleError::Invalid => CuError::INVALID_HANDLE,
            HandleError::QuotaExceeded(_) => CuError::OUT_OF_MEMORY,
        }
    }
}

/// A context handle that names nothing is `CUDA_ERROR_INVALID_CONTEXT`, as in CUDA.
fn ctx_err(e: HandleError) -> CuError {
    match e {
        HandleError::Invalid => CuError::INVALID_CONTEXT,
        HandleError::QuotaExceeded(_) => CuError::OUT_OF_MEMORY,
    }
}

/// The "context" of objects that belong to none: libraries and their kernels are
/// context-independent in CUDA (`cuLibraryLoadData` loads into every context), so no
/// context's destruction ends them; only their unload (or the zone's teardown) does.
const NO_CTX: Handle = Handle(0);

/// A stream or event, and the context it was made in.
struct Obj<T> {
    obj: T,
    ctx: Handle,
}

/// A module (`library: None`), a library's module view in one context (`library: Some`),
/// or — in the library table — a library (context [`NO_CTX`]).
struct ModEntry<M> {
    module: M,
    ctx: Handle,
    library: Option<Handle>,
    /// Whether the image may call `vprintf` or `__assertfail` (see [`image_may_print`]):
    /// only launches of its kernels make the worker look for device output.
    may_print: bool,
}

impl<M> ModEntry<M> {
    /// The handle whose unload ends this module's functions and globals: the module
    /// itself, or for a view, its library.
    fn root(&self, own: Handle) -> Handle {
        self.library.unwrap_or(own)
    }
}

/// A function or kernel: its context ([`NO_CTX`] for a kernel), the module or library it
/// hangs off, and its parameter layout once asked for.
struct FuncEntry<F> {
    func: F,
    ctx: Handle,
    root: Handle,
    layout: Option<Vec<ParamSlot>>,
}

/// What a device range is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// An allocation (counts against the memory quota; freed through the backend).
    Alloc,
    /// A `__device__` global of a module or library (freed with it).
    Global(Handle),
    /// Another worker's allocation mapped by `cuIpcOpenMemHandle` (see `Zone::imports`).
    Import,
    /// A mapping of this physical allocation (`cuMemMap`; see `vmm.rs`).
    Mapped(Handle),
}

/// Another worker's allocation this zone opened.
#[derive(Clone, Copy, Debug)]
struct Import {
    token: Token,
    ctx: Handle,
    /// Opens not yet closed (an open of a handle already open in the context adds one).
    refs: u32,
    /// Mapped (and in `Zone::ranges`); `false` once its export was revoked and it was
    /// unmapped, until the guest closes it.
    live: bool,
}

/// One device range of the zone.
#[derive(Clone, Copy, Debug)]
struct Range {
    size: u64,
    ctx: Handle,
    owner: Owner,
    buffer_id: u64,
}

/// What a deduplicating lookup found (so repeated lookups return one handle, as CUDA does,
/// instead of draining the handle quota).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lookup {
    Function,
    Kernel,
    KernelFunction,
    LibraryModule,
}

/// `(what, parent handle, context, name)`.
type LookupKey = (Lookup, Handle, Handle, Vec<u8>);

/// What [`Zone::audit`] recomputed from the zone's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Audit {
    /// Device memory the backend should hold for the zone: live allocations, the free
    /// cache and physical memory (module globals are the module's, not counted).
    pub device_bytes: u64,
    /// Live objects counted against `max_handles`.
    pub objects: u64,
}

/// One zone's state.
pub struct Zone<B: GpuBackend> {
    id: u32,
    backend: B,
    quotas: Quotas,
    /// Device ranges (allocations and module globals): start address → range. Ranges
    /// never overlap.
    ranges: BTreeMap<u64, Range>,
    allocations: u32,
    mem_used: u64,
    next_buffer_id: u64,
    contexts: HandleTable<Option<B::Context>>,
    primary: Handle,
    current: Handle,
    streams: HandleTable<Obj<B::Stream>>,
    events: HandleTable<Obj<B::Event>>,
    modules: HandleTable<ModEntry<B::Module>>,
    libraries: HandleTable<ModEntry<B::Module>>,
    functions: HandleTable<FuncEntry<B::Function>>,
    kernels: HandleTable<FuncEntry<B::Function>>,
    lookups: HashMap<LookupKey, Handle>,
    attributes: Option<Vec<AttrValue>>,
    async_since_sync: u32,
    staging: Vec<u8>,
    /// The daemon's IPC broker (`None`: IPC is `CUDA_ERROR_NOT_SUPPORTED`).
    broker: Option<Box<dyn IpcBroker>>,
    /// Exported allocations: start → token.
    exports: HashMap<u64, Token>,
    /// Exported events (`cuIpcGetEventHandle`): event handle → token.
    event_exports: HashMap<Handle, Token>,
    /// Imports by start (the live ones are in `ranges` too).
    imports: BTreeMap<u64, Import>,
    /// Freed allocations kept for this zone's next allocations of the same size, by
    /// (context, size). Memory never leaves the zone through this cache: it is scrubbed
    /// when it goes back to the driver (`flush_free_cache`), as every free does.
    free_cache: HashMap<(Handle, u64), Vec<u64>>,
    /// Bytes held in `free_cache`.
    cached_bytes: u64,
    /// Whether the backend copies straight from and to the data window (no staging).
    window_direct: bool,
    /// Keeps the window's mapping alive while the backend may use it: declared after
    /// `backend`, so dropped after it.
    window_region: Option<idm_shm::MemfdRegion>,
    /// Keeps the window's mapping alive when the driver does not take it (Xen's grant
    /// mapping, for host functions' words): declared after `backend`, so dropped after it.
    window_keep: Option<idm_xen::GrantRegion>,
    /// The window's first byte and length in `window_region`'s mapping (host functions'
    /// rendezvous words live there).
    window_at: Option<(std::ptr::NonNull<u8>, usize)>,
    /// The worker's captured device output (`None`: not captured; nothing to hand over).
    device_output: Option<std::sync::Arc<DeviceOutput>>,
    /// What the zone's sessions hold together ([`crate::ledger`]); this session's slot.
    ledger: Ledger,
    /// Requests handled and requests answered with an error (for the daemon's metrics).
    requests: (u64, u64),
    /// Device memory charged per context (`Quotas::context_mem_bytes` or the backend's).
    context_mem: u64,
    /// Per context, the memory charged beyond `context_mem` for limits raised with
    /// `cuCtxSetLimit` (stack size, printf buffer, device heap), by limit.
    limit_charges: HashMap<Handle, [u64; 3]>,
    /// Host functions queued and not yet run (see [`MAX_QUEUED_HOST_FUNCS`]).
    host_funcs_queued: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Graphs (context-independent), executable graphs, and the nodes the guest has seen
    /// with the reverse map that keeps one handle per node (see `graphs.rs`).
    graphs: HandleTable<B::Graph>,
    graph_execs: HandleTable<Obj<B::GraphExec>>,
    graph_nodes: HandleTable<NodeEntry<B::GraphNode>>,
    node_handles: HashMap<(Handle, B::GraphNode), Handle>,
    /// Helper nodes libvgpu added (for copies of pageable memory): left out of node lists.
    hidden_nodes: HashSet<B::GraphNode>,
    /// Stream captures begun and not yet ended.
    captures_active: u32,
    /// Host functions kept for graphs (see [`MAX_PERSISTENT_HOST_FUNCS`]).
    persistent_host_funcs: u32,
    /// Virtual address reservations (start → size) and physical allocations (see `vmm.rs`).
    reservations: BTreeMap<u64, u64>,
    phys: HandleTable<PhysEntry<B::Phys>>,
    /// CUDA arrays, and the texture and surface objects the backend made (by value; see
    /// `arrays.rs`), with those whose array was destroyed before them.
    arrays: HandleTable<ArrayEntry<B::Array>>,
    textures: HashMap<u64, TexEntry>,
    orphaned_textures: HashSet<u64>,
    /// JIT link states (see `link.rs`).
    links: HandleTable<LinkEntry<B::Link>>,
}

impl<B: GpuBackend> std::fmt::Debug for Zone<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone")
            .field("id", &self.id)
            .field("allocations", &self.allocations)
            .field("mem_used", &self.mem_used)
            .field("contexts", &self.contexts.len())
            .field("streams", &self.streams.len())
            .field("events", &self.events.len())
            .field("modules", &(self.modules.len() + self.libraries.len()))
            .field("functions", &(self.functions.len() + self.kernels.len()))
            .field("exports", &self.exports.len())
            .field("imports", &self.imports.len())
            .finish()
    }
}

/// The backend stream a stream handle names (`None`: the default stream).
fn stream_of<S>(streams: &HandleTable<Obj<S>>, h: Handle) -> CuResult<Option<&S>> {
    if DEFAULT_STREAMS.contains(&h) {
        return Ok(None);
    }
    Ok(Some(&streams.get(h)?.obj))
}

/// The backend context a context handle names (`None`: the primary context).
fn context_of<C>(contexts: &HandleTable<Option<C>>, h: Handle) -> CuResult<Option<&C>> {
    contexts.get(h).map(Option::as_ref).map_err(ctx_err)
}

/// The function or kernel `h` names (both are accepted where CUDA takes a `CUfunction`).
fn func_of<'t, F>(
    functions: &'t HandleTable<FuncEntry<F>>,
    kernels: &'t HandleTable<FuncEntry<F>>,
    h: Handle,
) -> CuResult<&'t FuncEntry<F>> {
    let table = if kind_of(h) == kernels.kind() { kernels } else { functions };
    Ok(table.get(h)?)
}

/// [`func_of`], mutably.
fn func_of_mut<'t, F>(
    functions: &'t mut HandleTable<FuncEntry<F>>,
    kernels: &'t mut HandleTable<FuncEntry<F>>,
    h: Handle,
) -> CuResult<&'t mut FuncEntry<F>> {
    let table = if kind_of(h) == kernels.kind() { kernels } else { functions };
    Ok(table.get_mut(h)?)
}

/// A guest symbol name as a C string: at most [`MAX_NAME_BYTES`], no NUL inside.
fn c_name(name: String) -> CuResult<CString> {
    if name.len() > MAX_NAME_BYTES {
        return Err(CuError::INVALID_VALUE);
    }
    CString::new(name).map_err(|_| CuError::INVALID_VALUE)
}

/// Every parameter of `layout` must lie inside the buffer the guest sent.
fn params_cover(layout: &[ParamSlot], params: &[u8]) -> CuResult<()> {
    let inside = |p: &ParamSlot| {
        u64::from(p.offset).checked_add(u64::from(p.size)).is_some_and(|end| end <= params.len() as u64)
    };
    if layout.iter().all(inside) {
        Ok(())
    } else {
        Err(CuError::INVALID_VALUE)
    }
}

/// Bytes covered by `count` elements of `width` bytes.
fn bytes_of(count: u64, width: u64) -> CuResult<u64> {
    count.checked_mul(width).ok_or(CuError::INVALID_VALUE)
}

/// Which way a staged copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// From the data window to the device.
    HtoD,
    /// From the device to the data window.
    DtoH,
}

impl<B: GpuBackend> Zone<B> {
    /// A zone with its primary context and no other objects yet.
    pub fn new(id: u32, backend: B, quotas: Quotas) -> Self {
        // Each table admits the whole quota; the zone-wide count is checked in `reserve`.
        // The context table has one more place, for the (uncounted) primary context.
        let max = quotas.max_handles;
        let mut contexts = HandleTable::new(kind::CONTEXT, max.saturating_add(1));
        let primary = contexts.insert(None).expect("an empty table with room for one admits the primary context");
        Zone {
            id,
            backend,
            quotas,
            ranges: BTreeMap::new(),
            allocations: 0,
            mem_used: 0,
            next_buffer_id: 1,
            contexts,
            primary,
            current: primary,
            streams: HandleTable::new(kind::STREAM, max),
            events: HandleTable::new(kind::EVENT, max),
            modules: HandleTable::new(kind::MODULE, max),
            libraries: HandleTable::new(kind::LIBRARY, max),
            functions: HandleTable::new(kind::FUNCTION, max),
            kernels: HandleTable::new(kind::KERNEL, max),
            lookups: HashMap::new(),
            attributes: None,
            async_since_sync: 0,
            staging: Vec::new(),
            broker: None,
            exports: HashMap::new(),
            event_exports: HashMap::new(),
            imports: BTreeMap::new(),
            free_cache: HashMap::new(),
            cached_bytes: 0,
            window_direct: false,
            window_region: None,
            window_keep: None,
            window_at: None,
            device_output: None,
            ledger: Ledger::private(),
            requests: (0, 0),
            context_mem: quotas.context_mem_bytes.unwrap_or(B::CONTEXT_MEM_BYTES),
            limit_charges: HashMap::new(),
            host_funcs_queued: Default::default(),
            graphs: HandleTable::new(kind::GRAPH, max),
            graph_execs: HandleTable::new(kind::GRAPH_EXEC, max),
            graph_nodes: HandleTable::new(kind::GRAPH_NODE, max),
            node_handles: HashMap::new(),
            hidden_nodes: HashSet::new(),
            captures_active: 0,
            persistent_host_funcs: 0,
            reservations: BTreeMap::new(),
            phys: HandleTable::new(kind::PHYS, max),
            arrays: HandleTable::new(kind::ARRAY, max),
            textures: HashMap::new(),
            orphaned_textures: HashSet::new(),
            links: HandleTable::new(kind::LINK, max),
        }
    }

    /// Lets the backend copy straight from and to the shared data window: `region` is the
    /// shared mapping, the window is its `len` bytes at `offset`. The zone keeps `region`
    /// (so the mapping outlives the backend). Returns whether the backend took it; if not,
    /// copies keep going through the staging buffer.
    pub fn attach_window(&mut self, region: idm_shm::MemfdRegion, offset: usize, len: usize) -> CuResult<bool> {
        let in_bounds = offset.checked_add(len).is_some_and(|end| end <= SharedMemory::size(region.raw()));
        let base = std::ptr::NonNull::new(region.raw().as_ptr().wrapping_add(offset));
        let (true, Some(base)) = (in_bounds, base) else { return Err(CuError::INVALID_VALUE) };
        #[allow(unsafe_code)]
        // SAFETY: `base .. base + len` lies in `region`'s mapping (checked above), which
        // `self.window_region` keeps mapped until after `self.backend` is dropped (field
        // order). The backend only hands the memory to the driver.
        let direct = unsafe { self.backend.attach_window(base, len) }?;
        self.window_region = Some(region);
        self.window_at = Some((base, len));
        self.window_direct = direct;
        Ok(direct)
    }

    /// Lets host functions use the window over Xen, where the driver does not take it: the
    /// zone keeps `region` (the grant mapping) until after its backend; the window is its
    /// `len` bytes at `offset`.
    pub fn attach_grant_window(&mut self, region: idm_xen::GrantRegion, offset: usize, len: usize) -> CuResult<()> {
        let in_bounds = offset.checked_add(len).is_some_and(|end| end <= SharedMemory::size(region.raw()));
        let base = std::ptr::NonNull::new(region.raw().as_ptr().wrapping_add(offset));
        let (true, Some(base)) = (in_bounds, base) else { return Err(CuError::INVALID_VALUE) };
        self.window_keep = Some(region);
        self.window_at = Some((base, len));
        Ok(())
    }

    /// Offers CUDA IPC through the daemon's broker.
    pub fn set_broker(&mut self, broker: Box<dyn IpcBroker>) {
        self.broker = Some(broker);
    }

    /// Hands the worker's captured device output to the guest (`TakeDeviceOutput`).
    pub fn set_device_output(&mut self, output: std::sync::Arc<DeviceOutput>) {
        self.device_output = Some(output);
    }

    /// The captured device output, if the worker captures it (shared: the worker holds it
    /// while the zone is borrowed mutably by each request).
    pub fn device_output_arc(&self) -> Option<std::sync::Arc<DeviceOutput>> {
        self.device_output.clone()
    }

    /// The request API over this zone, with the zone's data window, for one dispatch.
    pub fn api<'a, D: SharedMemory>(&'a mut self, window: &'a DataWindow<D>) -> ZoneCtx<'a, B, D> {
        ZoneCtx { zone: self, window }
    }

    /// The backend (tests and fuzz targets compare what it holds with [`Zone::audit`]).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, to change behind the zone's back (tests and fuzz targets plant memory
    /// the zone does not know).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Device memory the zone holds (allocations; module globals are not counted).
    pub fn mem_used(&self) -> u64 {
        self.mem_used
    }

    /// The device's attributes `1..=len` (asked of the backend once).
    fn device_attributes(&mut self) -> &[AttrValue] {
        let backend = &mut self.backend;
        self.attributes.get_or_insert_with(|| {
            backend
                .device_attributes()
                .into_iter()
                .map(|a| match a {
                    Ok(v) => AttrValue::Value(v),
                    Err(e) => AttrValue::Error(e.code()),
                })
                .collect()
        })
    }

    /// Threads the device holds at once (multiprocessors × threads per multiprocessor): what
    /// a context's stack size is reserved for.
    fn resident_threads(&mut self) -> CuResult<u64> {
        let attrs = self.device_attributes();
        let get = |a: usize| match attrs.get(a - 1) {
            Some(AttrValue::Value(v)) => u64::try_from(*v).ok().filter(|v| *v > 0),
            _ => None,
        };
        match (get(ATTRIBUTE_MULTIPROCESSOR_COUNT), get(ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)) {
            (Some(sms), Some(threads)) => Ok(sms * threads),
            _ => Err(CuError::UNKNOWN),
        }
    }

    /// Shares the zone's quotas with its other sessions through the daemon's ledger
    /// (before the first request).
    pub fn set_ledger(&mut self, ledger: Ledger) {
        self.ledger = ledger;
    }

    /// What this session holds against the zone's quotas: device memory charged (live
    /// allocations and physical memory, the free cache, every context and the limits raised
    /// in it) and live objects.
    pub fn usage(&self) -> Usage {
        let contexts = u64::from(self.contexts.len()).saturating_mul(self.context_mem);
        let limits: u64 = self.limit_charges.values().flatten().fold(0, |a, b| a.saturating_add(*b));
        Usage {
            mem_bytes: self.mem_used.saturating_add(self.cached_bytes).saturating_add(contexts).saturating_add(limits),
            objects: self.live_objects(),
        }
    }

    /// Counts one handled request in the zone's ledger, where the daemon reads it for its
    /// metrics: its id, its service time, and the CUDA error it was answered with.
    pub fn record_request(&mut self, id: u16, service_ns: u64, error: Option<u32>) {
        self.requests.0 += 1;
        self.requests.1 += u64::from(error.is_some());
        self.ledger.count(self.requests.0, self.requests.1);
        self.ledger.record(id, service_ns, error);
    }

    /// Publishes what this session holds now in the zone's ledger (after each request: what
    /// shrank is given back to the zone's other sessions).
    pub fn publish_usage(&mut self) {
        let u = self.usage();
        self.ledger.publish(u);
        self.ledger.publish_contexts(u64::from(self.contexts.len()).saturating_mul(self.context_mem));
    }

    /// Admits `mem` more bytes of device memory and `objects` more live objects for this
    /// session if the zone's quotas, summed over all its sessions, allow them: the growth is
    /// published before the backend is asked. When memory is short, this session's free
    /// cache goes back to the driver first.
    fn admit(&mut self, mem: u64, objects: u64) -> CuResult<()> {
        let (quota, max) = (self.quotas.mem_bytes, u64::from(self.quotas.max_handles));
        let want =
            |u: Usage| Usage { mem_bytes: u.mem_bytes.saturating_add(mem), objects: u.objects.saturating_add(objects) };
        match self.ledger.admit(want(self.usage()), quota, max) {
            Ok(()) => Ok(()),
            Err(Exceeded::Memory) if self.cached_bytes > 0 => {
                if let Err(e) = self.flush_free_cache(None) {
                    tracing::warn!(error = %e, "returning cached freed memory failed");
                }
                let u = self.usage();
                self.ledger.publish(u);
                self.ledger.admit(want(u), quota, max).map_err(|_| CuError::OUT_OF_MEMORY)
            }
            Err(_) => Err(CuError::OUT_OF_MEMORY),
        }
    }

    /// Device memory left to this session under the zone's quota.
    fn quota_left(&self) -> u64 {
        let held = self.ledger.others().mem_bytes.saturating_add(self.usage().mem_bytes);
        // This session's cache is the zone's to reuse.
        self.quotas.mem_bytes.saturating_sub(held.saturating_sub(self.cached_bytes))
    }

    /// Live objects counted against `max_handles`: allocations, imports (until closed) and
    /// every handle except the primary context.
    pub fn live_objects(&self) -> u64 {
        u64::from(self.allocations)
            + self.imports.len() as u64
            + u64::from(self.contexts.len().saturating_sub(1))
            + u64::from(self.streams.len())
            + u64::from(self.events.len())
            + u64::from(self.modules.len())
            + u64::from(self.libraries.len())
            + u64::from(self.functions.len())
            + u64::from(self.kernels.len())
            + u64::from(self.graphs.len())
            + u64::from(self.graph_execs.len())
            + u64::from(self.graph_nodes.len())
            + u64::from(self.phys.len())
            + u64::from(self.arrays.len())
            + self.texture_objects()
            + u64::from(self.links.len())
    }

    /// Recomputes the zone's accounting from its tables and checks it against the running
    /// totals and the invariants the range checks rely on: ranges never overlap, memory
    /// charged is the sum of live allocations and physical memory, the free cache's total is
    /// what it holds, every export names a live allocation, every live import is a range
    /// and every import range a live import, and the zone holds no more than its quotas.
    /// The fuzz targets and tests call it after each request; it costs a walk over every
    /// table, so the worker does not.
    pub fn audit(&self) -> Result<Audit, String> {
        let mut end_of_last: Option<(u64, u64)> = None;
        let (mut alloc_bytes, mut allocations, mut import_ranges) = (0u64, 0u32, 0usize);
        for (&start, r) in &self.ranges {
            let end = start.checked_add(r.size).ok_or(format!("range {start:#x}+{:#x} wraps", r.size))?;
            if r.size == 0 {
                return Err(format!("empty range at {start:#x}"));
            }
            if let Some((s, e)) = end_of_last.filter(|(_, e)| *e > start) {
                return Err(format!("range {start:#x}..{end:#x} overlaps {s:#x}..{e:#x}"));
            }
            end_of_last = Some((start, end));
            match r.owner {
                Owner::Alloc => {
                    alloc_bytes += r.size;
                    allocations += 1;
                }
                Owner::Import => {
                    import_ranges += 1;
                    if !self.imports.get(&start).is_some_and(|i| i.live) {
                        return Err(format!("import range {start:#x} without a live import"));
                    }
                }
                Owner::Global(_) | Owner::Mapped(_) => {}
            }
        }
        let live_imports = self.imports.values().filter(|i| i.live).count();
        if live_imports != import_ranges {
            return Err(format!("{live_imports} live imports but {import_ranges} import ranges"));
        }
        if allocations != self.allocations {
            return Err(format!("{allocations} allocation ranges, {} counted", self.allocations));
        }
        let (phys_bytes, array_bytes) = (self.phys_bytes(), self.array_bytes());
        if alloc_bytes + phys_bytes + array_bytes != self.mem_used {
            return Err(format!(
                "allocations {alloc_bytes} + physical {phys_bytes} + arrays {array_bytes} bytes, but {} counted",
                self.mem_used
            ));
        }
        if let Some((v, _)) = self.textures.iter().find(|(_, t)| t.array.is_some_and(|a| self.arrays.get(a).is_err())) {
            return Err(format!("texture or surface object {v:#x} reads a destroyed array"));
        }
        let cached: u64 = self.free_cache.iter().map(|((_, size), ptrs)| size * ptrs.len() as u64).sum();
        if cached != self.cached_bytes {
            return Err(format!("free cache holds {cached} bytes, {} counted", self.cached_bytes));
        }
        if let Some(start) = self.exports.keys().find(|s| !self.ranges.get(s).is_some_and(|r| r.owner == Owner::Alloc))
        {
            return Err(format!("export of {start:#x}, which is no live allocation"));
        }
        let u = self.usage();
        if u.mem_bytes > self.quotas.mem_bytes {
            return Err(format!("{} bytes charged over the {} byte quota", u.mem_bytes, self.quotas.mem_bytes));
        }
        if u.objects > u64::from(self.quotas.max_handles) {
            return Err(format!("{} objects over the quota of {}", u.objects, self.quotas.max_handles));
        }
        Ok(Audit { device_bytes: alloc_bytes + cached + phys_bytes + array_bytes, objects: u.objects })
    }

    /// The primary context's handle.
    pub fn primary_context(&self) -> Handle {
        self.primary
    }

    /// The current context's handle.
    pub fn current_context(&self) -> Handle {
        self.current
    }

    /// Answers [`Attach`]: device facts (the memory quota as total memory), the window
    /// size, the primary context, every device attribute and the PCI bus id.
    pub fn attach(&mut self, req: &Attach, window_size: u64) -> CuResult<AttachReply> {
        if req.revision != VGPU_PROTOCOL_REVISION {
            return Err(CuError::NOT_SUPPORTED);
        }
        // The device's facts as they are (cuDeviceTotalMem included); the zone's quota
        // bounds what it can allocate, and `cuMemGetInfo` reports the zone's view.
        let device = self.backend.device_info();
        let attributes = self.device_attributes().to_vec();
        let pci_bus_id = self.backend.pci_bus_id().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no PCI bus id for the guest");
            String::new()
        });
        Ok(AttachReply { zone: self.id, device, window_size, primary_ctx: self.primary, attributes, pci_bus_id })
    }

    /// Counts one asynchronous (posted) request against `max_async_in_flight`; after that
    /// many without a synchronisation, waits for the GPU before accepting more.
    pub fn note_posted(&mut self) -> CuResult<()> {
        self.async_since_sync = self.async_since_sync.saturating_add(1);
        // Synchronising while a capture is open would invalidate it: the bound waits.
        if self.async_since_sync >= self.quotas.max_async_in_flight && self.captures_active == 0 {
            // Bound the GPU's queue for this zone: wait for it before accepting more.
            self.async_since_sync = 0;
            self.backend.synchronize()?;
        }
        Ok(())
    }

    /// `Ok` when one more object fits the zone's handle quota (over all its sessions).
    fn reserve(&mut self) -> CuResult<()> {
        self.admit(0, 1)
    }

    /// The range containing `addr` (`start <= addr < start + size`).
    fn range_at(&self, addr: u64) -> Option<(u64, Range)> {
        let (&start, r) = self.ranges.range(..=addr).next_back()?;
        (addr - start < r.size).then_some((start, *r))
    }

    /// Checks that `[addr, addr + len)` lies inside one of this zone's ranges.
    fn check_range(&self, addr: u64, len: u64) -> CuResult<()> {
        let (&start, r) = self.ranges.range(..=addr).next_back().ok_or(CuError::INVALID_VALUE)?;
        let end = addr.checked_add(len).ok_or(CuError::INVALID_VALUE)?;
        // start <= addr and start + size did not overflow when the range was registered.
        let mut reach = start + r.size;
        if end > reach && matches!(r.owner, Owner::Mapped(_)) && addr < reach {
            // Adjoining mappings (a reservation mapped piece by piece, as PyTorch's expandable
            // segments are) are one stretch of memory, as on the driver.
            for (&s, next) in self.ranges.range(reach..) {
                if s != reach || !matches!(next.owner, Owner::Mapped(_)) || reach >= end {
                    break;
                }
                reach = s + next.size;
            }
        }
        if end > reach {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(())
    }

    /// Whether `[start, start + size)` overlaps no registered range.
    fn range_is_free(&self, start: u64, size: u64) -> bool {
        let Some(end) = start.checked_add(size) else { return false };
        let before_ok = match self.ranges.range(..=start).next_back() {
            Some((&s, r)) => s + r.size <= start,
            None => true,
        };
        let after_ok = self.ranges.range(start..end).next().is_none();
        size > 0 && before_ok && after_ok
    }

    fn insert_range(&mut self, start: u64, size: u64, ctx: Handle, owner: Owner) {
        let buffer_id = self.next_buffer_id;
        self.next_buffer_id = self.next_buffer_id.wrapping_add(1).max(1);
        self.ranges.insert(start, Range { size, ctx, owner, buffer_id });
    }

    /// Registers a fresh allocation from the backend; an address overlapping a known range
    /// (a backend bug) is released again rather than weakening the range checks.
    fn register_alloc(&mut self, dptr: u64, size: u64) -> CuResult<u64> {
        if !self.range_is_free(dptr, size) {
            tracing::error!(dptr, size, "backend returned an allocation overlapping a known range");
            let _ = self.backend.mem_free(dptr);
            return Err(CuError::UNKNOWN);
        }
        self.insert_range(dptr, size, self.current, Owner::Alloc);
        self.allocations += 1;
        self.mem_used = self.mem_used.saturating_add(size);
        Ok(dptr)
    }

    /// Registers a module global so copies into it pass the range checks. Repeated lookups
    /// of one global are idempotent; a zero-sized or overlapping one is not registered.
    fn register_global(&mut self, dptr: u64, size: u64, ctx: Handle, root: Handle) {
        if let Some(r) = self.ranges.get(&dptr) {
            if r.size == size {
                return;
            }
        }
        if self.range_is_free(dptr, size) {
            self.insert_range(dptr, size, ctx, Owner::Global(root));
        } else if size > 0 {
            tracing::warn!(dptr, size, "module global overlaps a known range; not registered");
        }
    }

    /// Runs `f` with `ctx` current, then makes the previous context current again.
    fn in_ctx<T>(&mut self, ctx: Handle, f: impl FnOnce(&mut B) -> CuResult<T>) -> CuResult<T> {
        if ctx == self.current {
            return f(&mut self.backend);
        }
        self.backend.set_context(context_of(&self.contexts, ctx)?)?;
        let result = f(&mut self.backend);
        let back = context_of(&self.contexts, self.current).unwrap_or(None);
        if let Err(e) = self.backend.set_context(back) {
            tracing::warn!(error = %e, "could not restore the current context");
            self.current = ctx;
        }
        result
    }

    /// Whether `h` names a live object of any kind.
    fn is_live(&self, h: Handle) -> bool {
        match kind_of(h) {
            kind::CONTEXT => self.contexts.contains(h),
            kind::STREAM => self.streams.contains(h),
            kind::EVENT => self.events.contains(h),
            kind::MODULE => self.modules.contains(h),
            kind::LIBRARY => self.libraries.contains(h),
            kind::FUNCTION => self.functions.contains(h),
            kind::KERNEL => self.kernels.contains(h),
            _ => false,
        }
    }

    /// Forgets lookups whose parent or result is gone.
    fn prune_lookups(&mut self) {
        let mut lookups = std::mem::take(&mut self.lookups);
        lookups.retain(|(_, parent, _, _), h| self.is_live(*parent) && self.is_live(*h));
        self.lookups = lookups;
    }

    /// Drops every function, kernel, module view and global hanging off `root`.
    fn drop_dependents(&mut self, root: Handle) {
        let roots = HashSet::from([root]);
        self.functions.remove_where(|_, f| roots.contains(&f.root));
        self.kernels.remove_where(|_, f| roots.contains(&f.root));
        for (_, view) in self.modules.remove_where(|_, m| m.library.is_some_and(|l| roots.contains(&l))) {
            // A view is only forgotten by the backend.
            let _ = self.backend.module_unload(view.module);
        }
        self.ranges.retain(|_, r| !matches!(r.owner, Owner::Global(g) if roots.contains(&g)));
        self.prune_lookups();
    }

    /// Drops every object recorded in context `ctx` (and whatever hangs off its modules):
    /// allocations, streams, events, modules, library views, functions, and the globals
    /// looked up in it. Libraries and kernels belong to no context and stay. With `destroy`
    /// each is released through the backend — allocations scrubbed and freed — which needs
    /// `ctx` current; without, the objects are only forgotten (the caller destroys the
    /// context, which releases them). Returns the first backend error; everything is
    /// dropped from the zone either way.
    /// Returns the cached freed allocations of `ctx` (all contexts for `None`) to the
    /// backend, which scrubs them. The caller has made that context current (or passes
    /// `None` at teardown, where each entry's context is entered).
    fn flush_free_cache(&mut self, ctx: Option<Handle>) -> CuResult<()> {
        let keys: Vec<(Handle, u64)> =
            self.free_cache.keys().filter(|k| ctx.is_none_or(|c| k.0 == c)).copied().collect();
        let mut first_err = Ok(());
        for key in keys {
            for dptr in self.free_cache.remove(&key).unwrap_or_default() {
                self.cached_bytes = self.cached_bytes.saturating_sub(key.1);
                let r =
                    if ctx.is_some() { self.backend.mem_free(dptr) } else { self.in_ctx(key.0, |b| b.mem_free(dptr)) };
                if first_err.is_ok() {
                    first_err = r;
                }
            }
        }
        first_err
    }

    fn purge(&mut self, ctx: Handle, destroy: bool) -> CuResult<()> {
        let mut first_err = Ok(());
        let mut note = |r: CuResult<()>| {
            if first_err.is_ok() {
                first_err = r;
            }
        };
        if destroy {
            note(self.flush_free_cache(Some(ctx)));
        } else {
            // The backend frees these with their context: forget them.
            let keys: Vec<(Handle, u64)> = self.free_cache.keys().filter(|k| k.0 == ctx).copied().collect();
            for key in keys {
                let n = self.free_cache.remove(&key).map_or(0, |v| v.len() as u64);
                self.cached_bytes = self.cached_bytes.saturating_sub(key.1.saturating_mul(n));
            }
        }
        // Texture and surface objects go before the arrays and memory they read.
        note(self.purge_arrays(ctx, destroy));
        note(self.purge_links(ctx));
        let roots: HashSet<Handle> =
            self.modules.iter().filter(|(_, m)| m.ctx == ctx && m.library.is_none()).map(|(h, _)| h).collect();
        self.functions.remove_where(|_, f| f.ctx == ctx || roots.contains(&f.root));
        self.kernels.remove_where(|_, f| f.ctx == ctx || roots.contains(&f.root));
        for (_, view) in self.modules.remove_where(|_, m| m.library.is_some() && m.ctx == ctx) {
            // A view is only forgotten by the backend.
            note(self.backend.module_unload(view.module));
        }
        let mods = self.modules.remove_where(|_, m| m.ctx == ctx);
        // Captures on the context's streams end with them.
        let doomed_streams: Vec<Handle> = self.streams.iter().filter(|(_, s)| s.ctx == ctx).map(|(h, _)| h).collect();
        for h in doomed_streams {
            if self.stream_is_capturing(h).unwrap_or(false) {
                self.captures_active = self.captures_active.saturating_sub(1);
            }
        }
        let streams = self.streams.remove_where(|_, s| s.ctx == ctx);
        let events = self.events.remove_where(|_, e| e.ctx == ctx);
        let execs = self.graph_execs.remove_where(|_, e| e.ctx == ctx);
        if destroy {
            for (_, e) in execs {
                note(self.backend.graph_exec_destroy(e.obj));
            }
            for (_, m) in mods {
                note(self.backend.module_unload(m.module));
            }
            for (_, s) in streams {
                note(self.backend.stream_destroy(s.obj));
            }
            for (_, e) in events {
                note(self.backend.event_destroy(e.obj));
            }
        }
        // Tokens this context maps: the broker is told once none is mapped any more.
        let released: HashSet<Token> =
            self.imports.values().filter(|i| i.ctx == ctx && i.live).map(|i| i.token).collect();
        let doomed: Vec<(u64, Range)> = self
            .ranges
            .iter()
            .filter(|(_, r)| r.ctx == ctx || matches!(r.owner, Owner::Global(g) if roots.contains(&g)))
            .map(|(&s, r)| (s, *r))
            .collect();
        for (start, r) in doomed {
            match r.owner {
                Owner::Alloc => {
                    self.unexport(start);
                    self.ranges.remove(&start);
                    if destroy {
                        note(self.backend.mem_free(start));
                    }
                    self.allocations = self.allocations.saturating_sub(1);
                    self.mem_used = self.mem_used.saturating_sub(r.size);
                }
                Owner::Import => {
                    if let Err(e) = self.unmap_import(start, destroy) {
                        note(Err(e));
                        self.ranges.remove(&start);
                    }
                }
                Owner::Global(_) => {
                    self.ranges.remove(&start);
                }
                // Mappings belong to no context: never among these.
                Owner::Mapped(_) => {}
            }
        }
        // Imports of the context (live ones were just unmapped) are gone for good.
        self.imports.retain(|_, i| i.ctx != ctx);
        for token in released {
            self.release_token(&token);
        }
        self.prune_lookups();
        first_err
    }

    /// Releases everything the zone holds: destroys every created context (the backend
    /// scrubs its memory), then releases the primary context's objects and the libraries
    /// through the backend (allocations scrubbed and freed). The zone is left with only its
    /// primary context.
    pub fn teardown(&mut self) {
        if let Err(e) = self.flush_free_cache(None) {
            tracing::warn!(error = %e, "returning cached freed memory failed during teardown");
        }
        let others: Vec<Handle> = self.contexts.iter().map(|(h, _)| h).filter(|h| *h != self.primary).collect();
        for h in others {
            let _ = self.purge(h, false);
            if let Ok(Some(c)) = self.contexts.remove(h) {
                if let Err(e) = self.backend.ctx_destroy(c) {
                    tracing::warn!(error = %e, "context destroy failed during teardown");
                }
            }
        }
        if let Err(e) = self.backend.set_context(None) {
            tracing::warn!(error = %e, "could not make the primary context current for teardown");
        }
        self.current = self.primary;
        if let Err(e) = self.purge(self.primary, true) {
            tracing::warn!(error = %e, "releasing the primary context's objects failed");
        }
        self.release_graphs();
        self.kernels.drain().for_each(drop);
        let libraries: Vec<_> = self.libraries.drain().collect();
        for l in libraries {
            if let Err(e) = self.backend.module_unload(l.module) {
                tracing::warn!(error = %e, "library unload failed during teardown");
            }
        }
        // Every range belonged to a context or a library; none is left. Should one be, it
        // is released rather than leaked.
        for (start, r) in std::mem::take(&mut self.ranges) {
            match r.owner {
                Owner::Alloc => {
                    self.unexport(start);
                    let _ = self.backend.mem_free(start);
                }
                Owner::Import => {
                    let _ = self.backend.ipc_close(start);
                }
                Owner::Mapped(_) => {
                    let _ = self.backend.mem_unmap(start, r.size);
                }
                Owner::Global(_) => {}
            }
        }
        self.release_vmm();
        let tokens: HashSet<Token> = self.imports.values().filter(|i| i.live).map(|i| i.token).collect();
        self.imports.clear();
        for token in tokens {
            self.release_token(&token);
        }
        let exports: Vec<u64> = self.exports.keys().copied().collect();
        for start in exports {
            self.unexport(start);
        }
        self.functions.drain().for_each(drop);
        self.modules.drain().for_each(drop);
        (self.allocations, self.mem_used) = (0, 0);
        self.lookups.clear();
        self.staging = Vec::new();
    }

    /// Revokes the export of the allocation at `start`, if it has one (before it is freed).
    fn unexport(&mut self, start: u64) {
        if let Some(token) = self.exports.remove(&start) {
            if let Some(broker) = self.broker.as_mut() {
                broker.revoke(&token);
            }
        }
    }

    /// Tells the broker that this zone no longer maps `token`, unless another live import
    /// of it is left (in another context).
    fn release_token(&mut self, token: &Token) {
        if self.imports.values().any(|i| i.live && i.token == *token) {
            return;
        }
        if let Some(broker) = self.broker.as_mut() {
            broker.close(token);
        }
    }

    /// Unmaps the live import at `start` (with `unmap`, through the backend; without, its
    /// context's destruction does it) and takes it out of the ranges. Its record stays.
    fn unmap_import(&mut self, start: u64, unmap: bool) -> CuResult<()> {
        let Some(import) = self.imports.get_mut(&start).filter(|i| i.live) else { return Ok(()) };
        if unmap {
            self.backend.ipc_close(start)?;
        }
        import.live = false;
        self.ranges.remove(&start);
        Ok(())
    }

    /// Applies the revocations the broker sent for tokens this zone imported: each such
    /// import is unmapped now, so the guest gets `CUDA_ERROR_INVALID_VALUE` for its range
    /// from here on (and its `cuIpcCloseMemHandle` still succeeds). If the broker can no
    /// longer tell, every import is taken as revoked. The worker calls this before each
    /// request; without live imports it costs nothing.
    pub fn poll_ipc(&mut self) {
        if self.imports.is_empty() || !self.imports.values().any(|i| i.live) {
            return;
        }
        let Some(broker) = self.broker.as_mut() else { return };
        let revoked = broker.revoked();
        if revoked.as_ref().is_some_and(Vec::is_empty) {
            return;
        }
        let doomed: Vec<u64> = self
            .imports
            .iter()
            .filter(|(_, i)| i.live && revoked.as_ref().is_none_or(|r| r.contains(&i.token)))
            .map(|(&s, _)| s)
            .collect();
        for start in doomed {
            tracing::debug!(dptr = start, "an IPC import was revoked by its exporter; unmapping it");
            if let Err(e) = self.unmap_import(start, true) {
                tracing::warn!(error = %e, dptr = start, "could not unmap a revoked IPC import");
                // Refused all the same: the range is no longer the zone's.
                if let Some(i) = self.imports.get_mut(&start) {
                    i.live = false;
                }
                self.ranges.remove(&start);
            }
        }
    }

    /// Copies `bulk.len` bytes between the data window and device address `dev`: straight
    /// from/to the window when the backend registered it, otherwise (and for small
    /// synchronous host-to-device copies) staged through the zone's buffer in chunks of at
    /// most [`STAGING_CHUNK`]. With `wait`, the window bytes are free again on return.
    fn window_copy<D: SharedMemory>(
        &mut self,
        window: &DataWindow<D>,
        dir: Direction,
        dev: u64,
        bulk: BulkRef,
        stream: Handle,
        wait: bool,
    ) -> CuResult<()> {
        let (offset, len) = window.check(bulk).map_err(|_| CuError::INVALID_VALUE)?;
        self.check_range(dev, len as u64)?;
        if wait {
            // The guest reuses these window bytes once this is answered: never captured.
            self.refuse_if_capturing(stream)?;
        }
        let s = stream_of(&self.streams, stream)?;
        // Small synchronous host-to-device copies are staged (a pageable copy returns once
        // the driver has the bytes, without waiting for the DMA, as a native pageable copy
        // does); everything else goes straight from/to the registered window.
        let small_sync_htod = wait && matches!(dir, Direction::HtoD) && len <= SMALL_COPY;
        if self.window_direct && !small_sync_htod {
            // The backend DMAs straight from/to the registered window: no staging copy.
            return match dir {
                Direction::HtoD => self.backend.copy_window_to_device(dev, offset as u64, len as u64, s, wait),
                Direction::DtoH => self.backend.copy_device_to_window(offset as u64, dev, len as u64, s, wait),
            };
        }
        let mut buf = std::mem::take(&mut self.staging);
        buf.resize(len.min(STAGING_CHUNK), 0);
        let mut done = 0usize;
        let mut result = Ok(());
        while done < len && result.is_ok() {
            let n = (len - done).min(buf.len());
            // In range: the whole descriptor and device range were checked above.
            let part = BulkRef { offset: bulk.offset + done as u64, len: n as u64 };
            let addr = dev + done as u64;
            let chunk = &mut buf[..n];
            result = match dir {
                Direction::HtoD => window
                    .read(part, chunk)
                    .map_err(|_| CuError::INVALID_VALUE)
                    .and_then(|()| self.backend.copy_htod(addr, chunk, s)),
                Direction::DtoH => self
                    .backend
                    .copy_dtoh(chunk, addr, s)
                    .and_then(|()| window.write(part, chunk).map_err(|_| CuError::INVALID_VALUE)),
            };
            done += n;
        }
        self.staging = buf;
        result
    }

    /// A kernel of module or library `root` was launched (or put in a graph): the worker looks
    /// for device output after the next synchronising request when that module may print.
    fn note_launch_of(&self, root: Handle) {
        if let Some(o) = &self.device_output {
            let may_print = self.modules.get(root).or_else(|_| self.libraries.get(root)).map_or(true, |m| m.may_print);
            if may_print {
                o.note_launch();
            }
        }
    }

    /// Allocates the handle of a function or kernel the backend just returned.
    fn insert_func(&mut self, is_kernel: bool, entry: FuncEntry<B::Function>) -> CuResult<Handle> {
        let table = if is_kernel { &mut self.kernels } else { &mut self.functions };
        Ok(table.insert(entry)?)
    }

    /// The parameter layout of a function or kernel, fetched once and cached.
    fn layout(&mut self, func: Handle) -> CuResult<&[ParamSlot]> {
        let entry = func_of_mut(&mut self.functions, &mut self.kernels, func)?;
        if entry.layout.is_none() {
            entry.layout = Some(self.backend.func_param_layout(&entry.func)?);
        }
        Ok(entry.layout.as_deref().unwrap_or_default())
    }
}

impl<B: GpuBackend> Drop for Zone<B> {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A [`Zone`] together with its data window: the implementation of the generated request
/// [`Api`] for one dispatch.
pub struct ZoneCtx<'a, B: GpuBackend, D> {
    zone: &'a mut Zone<B>,
    window: &'a DataWindow<D>,
}

impl<B: GpuBackend, D> std::fmt::Debug for ZoneCtx<'_, B, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneCtx").field("zone", &self.zone).finish_non_exhaustive()
    }
}

impl<B: GpuBackend, D: SharedMemory> ZoneCtx<'_, B, D> {
    fn memset(&mut self, dst: u64, bytes: u64, stream: Handle, op: MemsetOp) -> CuResult<Done> {
        let z = &mut *self.zone;
        z.check_range(dst, bytes)?;
        let s = stream_of(&z.streams, stream)?;
        match op {
            MemsetOp::D8(v, n) => z.backend.memset_d8(dst, v, n, s)?,
            MemsetOp::D16(v, n) => z.backend.memset_d16(dst, v, n, s)?,
            MemsetOp::D32(v, n) => z.backend.memset_d32(dst, v, n, s)?,
        }
        Ok(Done {})
    }

    fn copy_dtod(&mut self, dst: u64, src: u64, len: u64, stream: Handle) -> CuResult<Done> {
        let z = &mut *self.zone;
        z.check_range(dst, len)?;
        z.check_range(src, len)?;
        let s = stream_of(&z.streams, stream)?;
        z.backend.copy_dtod(dst, src, len, s)?;
        Ok(Done {})
    }

    fn stream_create(&mut self, flags: u32, priority: i32) -> CuResult<Handle> {
        let z = &mut *self.zone;
        z.reserve()?;
        let s = z.backend.stream_create(flags, priority)?;
        match z.streams.insert(Obj { obj: s, ctx: z.current }) {
            Ok(h) => Ok(h),
            Err(e) => Err(e.into()),
        }
    }

    fn event_record(&mut self, event: Handle, stream: Handle, flags: u32) -> CuResult<Done> {
        let z = &mut *self.zone;
        let e = &z.events.get(event)?.obj;
        let s = stream_of(&z.streams, stream)?;
        z.backend.event_record(e, s, flags)?;
        Ok(Done {})
    }

    fn elapsed(&mut self, start: Handle, end: Handle) -> CuResult<f32> {
        let z = &mut *self.zone;
        let a = &z.events.get(start)?.obj;
        let b = &z.events.get(end)?.obj;
        z.backend.event_elapsed_time(a, b)
    }

    fn occupancy(&mut self, func: Handle, block_size: i32, smem: u64, flags: u32) -> CuResult<i32> {
        let z = &mut *self.zone;
        let f = func_of(&z.functions, &z.kernels, func)?;
        z.backend.occupancy_max_active_blocks(&f.func, block_size, smem, flags)
    }

    /// A context handle of a request: 0 means the current context.
    fn ctx_or_current(&self, ctx: Handle) -> CuResult<Handle> {
        if ctx == Handle(0) {
            return Ok(self.zone.current);
        }
        self.zone.contexts.get(ctx).map_err(ctx_err)?;
        Ok(ctx)
    }

    /// Runs a deduplicated lookup: the handle found before for `key`, if still live, or a
    /// new one from `make`.
    fn lookup(&mut self, key: LookupKey, make: impl FnOnce(&mut Zone<B>) -> CuResult<Handle>) -> CuResult<Handle> {
        if let Some(&h) = self.zone.lookups.get(&key) {
            if self.zone.is_live(h) {
                return Ok(h);
            }
        }
        let h = make(&mut *self.zone)?;
        self.zone.lookups.insert(key, h);
        Ok(h)
    }

    /// Looks up a global of `module` (a module, view or library) and registers its range.
    fn get_global(&mut self, handle: Handle, name: String, library: bool) -> CuResult<(u64, u64)> {
        let name = c_name(name)?;
        let z = &mut *self.zone;
        let (entry, root) = if library {
            (z.libraries.get(handle)?, handle)
        } else {
            let m = z.modules.get(handle)?;
            (m, m.root(handle))
        };
        let (dptr, bytes) = if library {
            z.backend.library_get_global(&entry.module, &name)?
        } else {
            z.backend.module_get_global(&entry.module, &name)?
        };
        let ctx = if library { z.current } else { entry.ctx };
        z.register_global(dptr, bytes, ctx, root);
        Ok((dptr, bytes))
    }
}

/// Whether a module image may print (device `printf` calls `vprintf`, a failed `assert`
/// calls `__assertfail`): the names appear in PTX text and in a cubin's symbol table. A fat
/// binary entry whose payload is compressed cannot be searched, so an image with one may
/// print. Errs on the side of "may": the cost of a wrong "may" is one `poll` after the
/// next synchronisation; a wrong "may not" would delay the output to a later reply.
fn image_may_print(image: &[u8]) -> bool {
    let names =
        |b: &[u8]| memchr::memmem::find(b, b"vprintf").is_some() || memchr::memmem::find(b, b"__assertfail").is_some();
    if names(image) {
        return true;
    }
    if !image.starts_with(&FATBIN_MAGIC.to_le_bytes()) {
        return false;
    }
    // A cubin or PTX text payload was searched with the image; anything else is compressed.
    let plain = |body: &[u8]| {
        body.starts_with(&ELF_MAGIC)
            || std::str::from_utf8(body.split(|&b| b == 0).next().unwrap_or(&[])).is_ok_and(|t| t.contains(".version"))
    };
    fatbin_payloads(image).is_none_or(|bodies| !bodies.iter().all(|b| plain(b)))
}

/// A memset's width, value and element count.
#[derive(Clone, Copy, Debug)]
enum MemsetOp {
    D8(u8, u64),
    D16(u16, u64),
    D32(u32, u64),
}

impl<B: GpuBackend, D: SharedMemory> Api for ZoneCtx<'_, B, D> {
    type Error = CuError;

    // ---- memory ----

    fn cu_mem_alloc_v2(&mut self, req: CuMemAllocV2) -> CuResult<CuMemAllocV2Reply> {
        let z = &mut *self.zone;
        let size = req.bytesize;
        if size == 0 || size > z.quotas.mem_bytes {
            return Err(if size == 0 { CuError::INVALID_VALUE } else { CuError::OUT_OF_MEMORY });
        }
        if z.free_cache.get(&(z.current, size)).is_some_and(|v| !v.is_empty()) {
            // Cached memory is charged to the zone already: only the handle is new.
            z.reserve()?;
            if let Some(dptr) = z.free_cache.get_mut(&(z.current, size)).and_then(Vec::pop) {
                z.cached_bytes = z.cached_bytes.saturating_sub(size);
                return Ok(CuMemAllocV2Reply { dptr: z.register_alloc(dptr, size)? });
            }
        }
        z.admit(size, 1)?;
        let dptr = match z.backend.mem_alloc(size) {
            Err(e) if e == CuError::OUT_OF_MEMORY && z.cached_bytes > 0 => {
                // Give the cached memory back (scrubbed) and try once more.
                let current = z.current;
                z.flush_free_cache(Some(current))?;
                z.backend.mem_alloc(size)
            }
            other => other,
        };
        match dptr {
            Ok(dptr) => Ok(CuMemAllocV2Reply { dptr: z.register_alloc(dptr, size)? }),
            Err(e) => {
                z.publish_usage();
                Err(e)
            }
        }
    }

    fn cu_mem_alloc_pitch_v2(&mut self, req: CuMemAllocPitchV2) -> CuResult<CuMemAllocPitchV2Reply> {
        let z = &mut *self.zone;
        let CuMemAllocPitchV2 { width_in_bytes, height, element_size_bytes } = req;
        if width_in_bytes == 0 || height == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        // At least width * height bytes; the pitch can only add to that.
        let least = width_in_bytes.checked_mul(height).ok_or(CuError::OUT_OF_MEMORY)?;
        z.admit(least, 1)?;
        let (dptr, pitch) = match z.backend.mem_alloc_pitch(width_in_bytes, height, element_size_bytes) {
            Ok(got) => got,
            Err(e) => {
                z.publish_usage();
                return Err(e);
            }
        };
        let size = pitch.checked_mul(height).filter(|s| *s >= least);
        match size.map(|size| (size, z.admit(size, 1))) {
            Some((size, Ok(()))) => Ok(CuMemAllocPitchV2Reply { dptr: z.register_alloc(dptr, size)?, p_pitch: pitch }),
            _ => {
                // Padding took it over the quota (or the backend answered nonsense).
                let _ = z.backend.mem_free(dptr);
                z.publish_usage();
                Err(CuError::OUT_OF_MEMORY)
            }
        }
    }

    fn cu_mem_free_v2(&mut self, req: CuMemFreeV2) -> CuResult<Done> {
        let z = &mut *self.zone;
        // Freeing 0 succeeds and does nothing, as the driver's does (measured on an H200 with
        // tools/cuda-trace: cuBLAS's start-up calls cuMemFree_v2(0) and fails otherwise).
        if req.dptr == 0 {
            return Ok(Done {});
        }
        // Only the exact start of one of this zone's allocations may be freed.
        let r = *z.ranges.get(&req.dptr).filter(|r| r.owner == Owner::Alloc).ok_or(CuError::INVALID_VALUE)?;
        // An exported allocation's token dies first: no open can reach freed memory.
        z.unexport(req.dptr);
        let cacheable = r.size <= FREE_CACHE_ENTRY_MAX && z.cached_bytes.saturating_add(r.size) <= FREE_CACHE_MAX;
        if cacheable {
            // Kept for this zone's next allocation of the same size. As the driver's free,
            // it waits for the context's work first, so no earlier kernel writes into the
            // memory once it is handed out again.
            z.in_ctx(r.ctx, |b| b.synchronize())?;
            z.free_cache.entry((r.ctx, r.size)).or_default().push(req.dptr);
            z.cached_bytes += r.size;
        } else {
            z.in_ctx(r.ctx, |b| b.mem_free(req.dptr))?;
        }
        z.ranges.remove(&req.dptr);
        z.allocations = z.allocations.saturating_sub(1);
        z.mem_used = z.mem_used.saturating_sub(r.size);
        Ok(Done {})
    }

    fn cu_mem_alloc_async(&mut self, req: CuMemAllocAsync) -> CuResult<CuMemAllocAsyncReply> {
        // Stream-ordered allocation: allocating now makes the memory usable no later than
        // the stream's next work, which is all cuMemAllocAsync promises.
        stream_of(&self.zone.streams, req.h_stream)?;
        let CuMemAllocV2Reply { dptr } = self.cu_mem_alloc_v2(CuMemAllocV2 { bytesize: req.bytesize })?;
        Ok(CuMemAllocAsyncReply { dptr })
    }

    fn cu_mem_free_async(&mut self, req: CuMemFreeAsync) -> CuResult<Done> {
        // Stream-ordered free: the memory may still be in use by work queued on the
        // stream, so wait for that work, then free (and scrub) it.
        let z = &mut *self.zone;
        z.ranges.get(&req.dptr).filter(|r| r.owner == Owner::Alloc).ok_or(CuError::INVALID_VALUE)?;
        match stream_of(&z.streams, req.h_stream)? {
            Some(s) => z.backend.stream_synchronize(s)?,
            None => z.backend.synchronize()?,
        }
        self.cu_mem_free_v2(CuMemFreeV2 { dptr: req.dptr })
    }

    fn cu_mem_get_info_v2(&mut self, _req: CuMemGetInfoV2) -> CuResult<CuMemGetInfoV2Reply> {
        let z = &mut *self.zone;
        let (free, total) = z.backend.mem_get_info()?;
        let quota_left = z.quotas.mem_bytes.min(z.quota_left());
        Ok(CuMemGetInfoV2Reply { free: free.min(quota_left), total: total.min(z.quotas.mem_bytes) })
    }

    fn cu_mem_get_address_range_v2(&mut self, req: CuMemGetAddressRangeV2) -> CuResult<CuMemGetAddressRangeV2Reply> {
        let (pbase, r) = self.zone.range_at(req.dptr).ok_or(CuError::NOT_FOUND)?;
        Ok(CuMemGetAddressRangeV2Reply { pbase, psize: r.size })
    }

    fn pointer_get_attribute(&mut self, req: PointerGetAttribute) -> CuResult<PointerGetAttributeReply> {
        let (start, r) = self.zone.range_at(req.ptr).ok_or(CuError::INVALID_VALUE)?;
        let value = match req.attribute {
            ptr_attr::CONTEXT => r.ctx.0,
            ptr_attr::MEMORY_TYPE => MEMORYTYPE_DEVICE,
            ptr_attr::DEVICE_POINTER => req.ptr,
            ptr_attr::BUFFER_ID => r.buffer_id,
            ptr_attr::IS_MANAGED => 0,
            ptr_attr::DEVICE_ORDINAL => 0,
            ptr_attr::RANGE_START_ADDR => start,
            ptr_attr::RANGE_SIZE => r.size,
            ptr_attr::MAPPED => 1,
            // Device memory has no host pointer; other attributes are not offered.
            ptr_attr::HOST_POINTER => return Err(CuError::INVALID_VALUE),
            _ => return Err(CuError::INVALID_VALUE),
        };
        Ok(PointerGetAttributeReply { value })
    }

    // ---- copies and memsets ----

    fn memcpy_hto_d(&mut self, req: MemcpyHtoD) -> CuResult<Done> {
        // The guest reuses the window bytes (staging) once this is answered: wait.
        self.zone.window_copy(self.window, Direction::HtoD, req.dst, req.src, req.stream, true)?;
        Ok(Done {})
    }

    fn memcpy_hto_d_async(&mut self, req: MemcpyHtoDAsync) -> CuResult<Done> {
        // From pinned (window arena) memory, which the application leaves alone until it
        // synchronises, as CUDA requires: the copy may run on.
        self.zone.window_copy(self.window, Direction::HtoD, req.dst, req.src, req.stream, false)?;
        Ok(Done {})
    }

    fn memcpy_dto_h(&mut self, req: MemcpyDtoH) -> CuResult<Done> {
        self.zone.window_copy(self.window, Direction::DtoH, req.src, req.dst, req.stream, true)?;
        Ok(Done {})
    }

    fn fence(&mut self, _req: Fence) -> CuResult<Done> {
        // Answered once every earlier request has been handled (requests are served in
        // order; staged copies complete before their handler returns): the guest's signal
        // that a staging buffer may be reused.
        Ok(Done {})
    }

    fn memcpy_dto_h_async(&mut self, req: MemcpyDtoHAsync) -> CuResult<Done> {
        // Into pinned memory, read by the application only after it synchronises.
        self.zone.window_copy(self.window, Direction::DtoH, req.src, req.dst, req.stream, false)?;
        Ok(Done {})
    }

    fn cu_memcpy_dto_d_v2(&mut self, req: CuMemcpyDtoDV2) -> CuResult<Done> {
        self.copy_dtod(req.dst_device, req.src_device, req.byte_count, Handle(0))
    }

    fn cu_memcpy_dto_d_async_v2(&mut self, req: CuMemcpyDtoDAsyncV2) -> CuResult<Done> {
        self.copy_dtod(req.dst_device, req.src_device, req.byte_count, req.h_stream)
    }

    fn cu_memset_d8_v2(&mut self, req: CuMemsetD8V2) -> CuResult<Done> {
        self.memset(req.dst_device, req.n, Handle(0), MemsetOp::D8(req.uc, req.n))
    }

    fn cu_memset_d16_v2(&mut self, req: CuMemsetD16V2) -> CuResult<Done> {
        self.memset(req.dst_device, bytes_of(req.n, 2)?, Handle(0), MemsetOp::D16(req.us, req.n))
    }

    fn cu_memset_d32_v2(&mut self, req: CuMemsetD32V2) -> CuResult<Done> {
        self.memset(req.dst_device, bytes_of(req.n, 4)?, Handle(0), MemsetOp::D32(req.ui, req.n))
    }

    fn cu_memset_d8_async(&mut self, req: CuMemsetD8Async) -> CuResult<Done> {
        self.memset(req.dst_device, req.n, req.h_stream, MemsetOp::D8(req.uc, req.n))
    }

    fn cu_memset_d16_async(&mut self, req: CuMemsetD16Async) -> CuResult<Done> {
        self.memset(req.dst_device, bytes_of(req.n, 2)?, req.h_stream, MemsetOp::D16(req.us, req.n))
    }

    fn cu_memset_d32_async(&mut self, req: CuMemsetD32Async) -> CuResult<Done> {
        self.memset(req.dst_device, bytes_of(req.n, 4)?, req.h_stream, MemsetOp::D32(req.ui, req.n))
    }

    fn cu_memset_d2_d8_v2(&mut self, r: CuMemsetD2D8V2) -> CuResult<Done> {
        let (v, h) = (r.uc.into(), Handle(0));
        self.zone.memset_pitched(r.dst_device, r.dst_pitch, v, 1, r.width, r.height, h).map(|()| Done {})
    }

    fn cu_memset_d2_d16_v2(&mut self, r: CuMemsetD2D16V2) -> CuResult<Done> {
        let (v, h) = (r.us.into(), Handle(0));
        self.zone.memset_pitched(r.dst_device, r.dst_pitch, v, 2, r.width, r.height, h).map(|()| Done {})
    }

    fn cu_memset_d2_d32_v2(&mut self, r: CuMemsetD2D32V2) -> CuResult<Done> {
        let h = Handle(0);
        self.zone.memset_pitched(r.dst_device, r.dst_pitch, r.ui, 4, r.width, r.height, h).map(|()| Done {})
    }

    fn cu_memset_d2_d8_async(&mut self, r: CuMemsetD2D8Async) -> CuResult<Done> {
        let (v, h) = (r.uc.into(), r.h_stream);
        self.zone.memset_pitched(r.dst_device, r.dst_pitch, v, 1, r.width, r.height, h).map(|()| Done {})
    }

    fn cu_memset_d2_d16_async(&mut self, r: CuMemsetD2D16Async) -> CuResult<Done> {
        let (v, h) = (r.us.into(), r.h_stream);
        self.zone.memset_pitched(r.dst_device, r.dst_pitch, v, 2, r.width, r.height, h).map(|()| Done {})
    }

    fn cu_memset_d2_d32_async(&mut self, r: CuMemsetD2D32Async) -> CuResult<Done> {
        let h = r.h_stream;
        self.zone.memset_pitched(r.dst_device, r.dst_pitch, r.ui, 4, r.width, r.height, h).map(|()| Done {})
    }

    fn array_create(&mut self, r: ArrayCreate) -> CuResult<ArrayCreateReply> {
        let desc = crate::backend::ArrayDesc {
            width: r.width,
            height: r.height,
            depth: r.depth,
            format: r.format,
            channels: r.channels,
            flags: r.flags,
        };
        Ok(ArrayCreateReply { array: self.zone.array_create(desc)? })
    }

    fn array_destroy(&mut self, r: ArrayDestroy) -> CuResult<Done> {
        self.zone.array_destroy(r.array).map(|()| Done {})
    }

    fn tex_object_create(&mut self, r: TexObjectCreate) -> CuResult<TexObjectCreateReply> {
        Ok(TexObjectCreateReply { tex: self.zone.tex_object_create(r)? })
    }

    fn tex_object_destroy(&mut self, r: TexObjectDestroy) -> CuResult<Done> {
        self.zone.texture_destroy(r.tex, false).map(|()| Done {})
    }

    fn surf_object_create(&mut self, r: SurfObjectCreate) -> CuResult<SurfObjectCreateReply> {
        Ok(SurfObjectCreateReply { surf: self.zone.surf_object_create(r.array)? })
    }

    fn surf_object_destroy(&mut self, r: SurfObjectDestroy) -> CuResult<Done> {
        self.zone.texture_destroy(r.surf, true).map(|()| Done {})
    }

    fn link_create(&mut self, r: LinkCreate) -> CuResult<LinkCreateReply> {
        Ok(LinkCreateReply { state: self.zone.link_create(&r.options)? })
    }

    fn link_add(&mut self, r: LinkAdd) -> CuResult<Done> {
        self.zone.link_add(self.window, r).map(|()| Done {})
    }

    fn link_complete(&mut self, r: LinkComplete) -> CuResult<LinkCompleteReply> {
        Ok(LinkCompleteReply { size: self.zone.link_complete(r.state)? })
    }

    fn link_image(&mut self, r: LinkImage) -> CuResult<Done> {
        self.zone.link_image(self.window, r.state, r.dst).map(|()| Done {})
    }

    fn link_logs(&mut self, r: LinkLogs) -> CuResult<LinkLogsReply> {
        let (info, error) = self.zone.link_logs(r.state)?;
        Ok(LinkLogsReply { info, error })
    }

    fn link_destroy(&mut self, r: LinkDestroy) -> CuResult<Done> {
        self.zone.link_destroy(r.state).map(|()| Done {})
    }

    fn memcpy_pitched(&mut self, req: MemcpyPitched) -> CuResult<Done> {
        self.zone.memcpy_pitched(self.window, &req, true).map(|()| Done {})
    }

    fn memcpy_pitched_async(&mut self, req: MemcpyPitchedAsync) -> CuResult<Done> {
        self.zone.memcpy_pitched(self.window, &req.into(), false).map(|()| Done {})
    }

    // ---- contexts ----

    fn ctx_create(&mut self, req: CtxCreate) -> CuResult<CtxCreateReply> {
        let z = &mut *self.zone;
        // A context takes device memory of its own: it is charged to the zone.
        z.admit(z.context_mem, 1)?;
        let c = match z.backend.ctx_create(req.flags) {
            Ok(c) => c,
            Err(e) => {
                z.publish_usage();
                return Err(e);
            }
        };
        // The new context is current in the backend now.
        match z.contexts.insert(Some(c)) {
            Ok(ctx) => {
                z.current = ctx;
                Ok(CtxCreateReply { ctx })
            }
            Err(HandleError::QuotaExceeded(_) | HandleError::Invalid) => {
                // Cannot happen after `reserve`; undo rather than leak the context.
                let back = context_of(&z.contexts, z.current).unwrap_or(None);
                let _ = z.backend.set_context(back);
                Err(CuError::OUT_OF_MEMORY)
            }
        }
    }

    fn ctx_destroy(&mut self, req: CtxDestroy) -> CuResult<Done> {
        let z = &mut *self.zone;
        if req.ctx == z.primary {
            return Err(CuError::INVALID_CONTEXT);
        }
        z.contexts.get(req.ctx).map_err(ctx_err)?;
        // Forget its objects while the context still lives, then destroy it: the backend
        // scrubs its memory and releases everything made in it.
        let _ = z.purge(req.ctx, false);
        let c = z.contexts.remove(req.ctx).map_err(ctx_err)?;
        z.limit_charges.remove(&req.ctx);
        if req.ctx == z.current {
            // The backend makes the primary context current when the current one goes.
            z.current = z.primary;
        }
        if let Some(c) = c {
            z.backend.ctx_destroy(c)?;
        }
        Ok(Done {})
    }

    fn ctx_set_current(&mut self, req: CtxSetCurrent) -> CuResult<Done> {
        let z = &mut *self.zone;
        z.backend.set_context(context_of(&z.contexts, req.ctx)?)?;
        z.current = req.ctx;
        Ok(Done {})
    }

    fn cu_ctx_synchronize(&mut self, _req: CuCtxSynchronize) -> CuResult<Done> {
        self.zone.async_since_sync = 0;
        self.zone.backend.synchronize()?;
        Ok(Done {})
    }

    fn cu_ctx_get_limit(&mut self, req: CuCtxGetLimit) -> CuResult<CuCtxGetLimitReply> {
        Ok(CuCtxGetLimitReply { pvalue: self.zone.backend.ctx_get_limit(req.limit)? })
    }

    fn cu_ctx_set_limit(&mut self, req: CuCtxSetLimit) -> CuResult<Done> {
        let z = &mut *self.zone;
        // The limits that size memory the driver takes for the context are charged to the
        // zone beyond the context's own charge (which covers the defaults): the stack size
        // for every thread the device can hold at once, the printf buffer, the device heap.
        let Some(which) = usize::try_from(req.limit).ok().filter(|l| *l < 3) else {
            z.backend.ctx_set_limit(req.limit, req.value)?;
            return Ok(Done {});
        };
        let per_unit = if which == LIMIT_STACK_SIZE { z.resident_threads()? } else { 1 };
        let old = z.backend.ctx_get_limit(req.limit)?;
        let charged = z.limit_charges.get(&z.current).map_or(0, |c| c[which]);
        // What the context takes beyond the default, in bytes, once the limit is `value`.
        let beyond = |value: u64, default: u64| value.saturating_sub(default).saturating_mul(per_unit);
        // The default is the value before the first raise (`old` minus what is charged).
        let default = old.saturating_sub(charged / per_unit.max(1));
        let want = beyond(req.value, default);
        if want > charged {
            z.admit(want - charged, 0)?;
        }
        if let Err(e) = z.backend.ctx_set_limit(req.limit, req.value) {
            z.publish_usage();
            return Err(e);
        }
        let current = z.current;
        z.limit_charges.entry(current).or_default()[which] = want;
        Ok(Done {})
    }

    fn cu_ctx_get_flags(&mut self, _req: CuCtxGetFlags) -> CuResult<CuCtxGetFlagsReply> {
        Ok(CuCtxGetFlagsReply { flags: self.zone.backend.ctx_get_flags()? })
    }

    fn cu_ctx_set_flags(&mut self, req: CuCtxSetFlags) -> CuResult<Done> {
        self.zone.backend.ctx_set_flags(req.flags)?;
        Ok(Done {})
    }

    fn cu_ctx_get_api_version(&mut self, req: CuCtxGetApiVersion) -> CuResult<CuCtxGetApiVersionReply> {
        // Every context of the zone is made by the same driver through the same call, so
        // the current context's version is every context's.
        self.ctx_or_current(req.ctx)?;
        Ok(CuCtxGetApiVersionReply { version: self.zone.backend.ctx_get_api_version()? })
    }

    fn cu_ctx_get_stream_priority_range(
        &mut self,
        _req: CuCtxGetStreamPriorityRange,
    ) -> CuResult<CuCtxGetStreamPriorityRangeReply> {
        let (least_priority, greatest_priority) = self.zone.backend.ctx_get_stream_priority_range()?;
        Ok(CuCtxGetStreamPriorityRangeReply { least_priority, greatest_priority })
    }

    fn cu_ctx_get_cache_config(&mut self, _req: CuCtxGetCacheConfig) -> CuResult<CuCtxGetCacheConfigReply> {
        Ok(CuCtxGetCacheConfigReply { pconfig: self.zone.backend.ctx_get_cache_config()? })
    }

    fn cu_ctx_set_cache_config(&mut self, req: CuCtxSetCacheConfig) -> CuResult<Done> {
        self.zone.backend.ctx_set_cache_config(req.config)?;
        Ok(Done {})
    }

    fn cu_ctx_get_id(&mut self, req: CuCtxGetId) -> CuResult<CuCtxGetIdReply> {
        Ok(CuCtxGetIdReply { ctx_id: self.ctx_or_current(req.ctx)?.0 })
    }

    fn primary_ctx_set_flags(&mut self, req: PrimaryCtxSetFlags) -> CuResult<Done> {
        self.zone.backend.primary_ctx_set_flags(req.flags)?;
        Ok(Done {})
    }

    fn primary_ctx_get_flags(&mut self, _req: PrimaryCtxGetFlags) -> CuResult<PrimaryCtxGetFlagsReply> {
        Ok(PrimaryCtxGetFlagsReply { flags: self.zone.backend.primary_ctx_flags()? })
    }

    fn primary_ctx_reset(&mut self, _req: PrimaryCtxReset) -> CuResult<Done> {
        let z = &mut *self.zone;
        let (primary, previous) = (z.primary, z.current);
        // The primary context's objects are released in it.
        if previous != primary {
            z.backend.set_context(None)?;
            z.current = primary;
        }
        let result = z.purge(primary, true);
        if previous != primary {
            let back = context_of(&z.contexts, previous).unwrap_or(None);
            z.backend.set_context(back)?;
            z.current = previous;
        }
        result.map(|()| Done {})
    }

    // ---- modules, libraries, functions ----

    fn module_load(&mut self, req: ModuleLoad) -> CuResult<ModuleLoadReply> {
        let (_, len) = self.window.check(req.image).map_err(|_| CuError::INVALID_VALUE)?;
        if len == 0 || len as u64 > MAX_IMAGE_BYTES {
            return Err(CuError::INVALID_VALUE);
        }
        let z = &mut *self.zone;
        z.reserve()?;
        let mut image = vec![0u8; len];
        self.window.read(req.image, &mut image).map_err(|_| CuError::INVALID_VALUE)?;
        let (module, table, ctx) = if req.library {
            (z.backend.library_load(&image)?, &mut z.libraries, NO_CTX)
        } else {
            (z.backend.module_load(&image)?, &mut z.modules, z.current)
        };
        let may_print = image_may_print(&image);
        match table.insert(ModEntry { module, ctx, library: None, may_print }) {
            Ok(handle) => Ok(ModuleLoadReply { handle }),
            Err(_) => Err(CuError::OUT_OF_MEMORY),
        }
    }

    fn cu_module_unload(&mut self, req: CuModuleUnload) -> CuResult<Done> {
        let z = &mut *self.zone;
        let m = z.modules.remove(req.hmod)?;
        if m.library.is_some() {
            // A library's module view: only forgotten; its functions belong to the library.
            z.backend.module_unload(m.module)?;
        } else {
            z.drop_dependents(req.hmod);
            z.in_ctx(m.ctx, |b| b.module_unload(m.module))?;
        }
        z.prune_lookups();
        Ok(Done {})
    }

    fn cu_library_unload(&mut self, req: CuLibraryUnload) -> CuResult<Done> {
        let z = &mut *self.zone;
        let l = z.libraries.remove(req.library)?;
        z.drop_dependents(req.library);
        z.backend.module_unload(l.module)?;
        Ok(Done {})
    }

    fn cu_module_get_function(&mut self, req: CuModuleGetFunction) -> CuResult<CuModuleGetFunctionReply> {
        let name = c_name(req.name)?;
        let key = (Lookup::Function, req.hmod, Handle(0), name.as_bytes().to_vec());
        let hmod = req.hmod;
        let hfunc = self.lookup(key, |z| {
            z.modules.get(hmod)?;
            z.reserve()?;
            let m = z.modules.get(hmod)?;
            let (ctx, root) = (m.ctx, m.root(hmod));
            let func = z.backend.module_get_function(&m.module, &name)?;
            z.insert_func(false, FuncEntry { func, ctx, root, layout: None })
        })?;
        Ok(CuModuleGetFunctionReply { hfunc })
    }

    fn module_functions(&mut self, req: ModuleFunctions) -> CuResult<ModuleFunctionsReply> {
        // Each call makes new handles (dropped with the module, counted against the handle
        // quota): enumerating is rare (cuFFT does it once per module it loads).
        let z = &mut *self.zone;
        let m = z.modules.get(req.hmod)?;
        let (ctx, root) = (m.ctx, m.root(req.hmod));
        let funcs = z.backend.module_functions(&m.module)?;
        let mut functions = Vec::with_capacity(funcs.len() * 8);
        for func in funcs {
            z.reserve()?;
            let h = z.insert_func(false, FuncEntry { func, ctx, root, layout: None })?;
            functions.extend_from_slice(&h.0.to_le_bytes());
        }
        Ok(ModuleFunctionsReply { functions })
    }

    fn cu_module_get_global_v2(&mut self, req: CuModuleGetGlobalV2) -> CuResult<CuModuleGetGlobalV2Reply> {
        let (dptr, bytes) = self.get_global(req.hmod, req.name, false)?;
        Ok(CuModuleGetGlobalV2Reply { dptr, bytes })
    }

    fn cu_library_get_kernel(&mut self, req: CuLibraryGetKernel) -> CuResult<CuLibraryGetKernelReply> {
        let name = c_name(req.name)?;
        let key = (Lookup::Kernel, req.library, Handle(0), name.as_bytes().to_vec());
        let library = req.library;
        let p_kernel = self.lookup(key, |z| {
            z.libraries.get(library)?;
            z.reserve()?;
            let l = z.libraries.get(library)?;
            let func = z.backend.library_get_kernel(&l.module, &name)?;
            z.insert_func(true, FuncEntry { func, ctx: NO_CTX, root: library, layout: None })
        })?;
        Ok(CuLibraryGetKernelReply { p_kernel })
    }

    fn cu_library_get_module(&mut self, req: CuLibraryGetModule) -> CuResult<CuLibraryGetModuleReply> {
        let key = (Lookup::LibraryModule, req.library, self.zone.current, Vec::new());
        let library = req.library;
        let p_mod = self.lookup(key, |z| {
            z.libraries.get(library)?;
            z.reserve()?;
            let l = z.libraries.get(library)?;
            let may_print = l.may_print;
            let module = z.backend.library_get_module(&l.module)?;
            let entry = ModEntry { module, ctx: z.current, library: Some(library), may_print };
            match z.modules.insert(entry) {
                Ok(h) => Ok(h),
                Err(e) => Err(e.into()),
            }
        })?;
        Ok(CuLibraryGetModuleReply { p_mod })
    }

    fn cu_library_get_global(&mut self, req: CuLibraryGetGlobal) -> CuResult<CuLibraryGetGlobalReply> {
        let (dptr, bytes) = self.get_global(req.library, req.name, true)?;
        Ok(CuLibraryGetGlobalReply { dptr, bytes })
    }

    fn cu_kernel_get_function(&mut self, req: CuKernelGetFunction) -> CuResult<CuKernelGetFunctionReply> {
        let key = (Lookup::KernelFunction, req.kernel, self.zone.current, Vec::new());
        let kernel = req.kernel;
        let p_func = self.lookup(key, |z| {
            z.kernels.get(kernel)?;
            z.reserve()?;
            let k = z.kernels.get(kernel)?;
            let root = k.root;
            let func = z.backend.kernel_get_function(&k.func)?;
            z.insert_func(false, FuncEntry { func, ctx: z.current, root, layout: None })
        })?;
        Ok(CuKernelGetFunctionReply { p_func })
    }

    fn cu_func_get_attribute(&mut self, req: CuFuncGetAttribute) -> CuResult<CuFuncGetAttributeReply> {
        let z = &mut *self.zone;
        let f = func_of(&z.functions, &z.kernels, req.hfunc)?;
        Ok(CuFuncGetAttributeReply { pi: z.backend.func_get_attribute(&f.func, req.attrib)? })
    }

    fn cu_func_set_attribute(&mut self, req: CuFuncSetAttribute) -> CuResult<Done> {
        let z = &mut *self.zone;
        let f = func_of(&z.functions, &z.kernels, req.hfunc)?;
        z.backend.func_set_attribute(&f.func, req.attrib, req.value)?;
        Ok(Done {})
    }

    fn cu_func_set_cache_config(&mut self, req: CuFuncSetCacheConfig) -> CuResult<Done> {
        let z = &mut *self.zone;
        let f = func_of(&z.functions, &z.kernels, req.hfunc)?;
        z.backend.func_set_cache_config(&f.func, req.config)?;
        Ok(Done {})
    }

    fn cu_kernel_get_attribute(&mut self, req: CuKernelGetAttribute) -> CuResult<CuKernelGetAttributeReply> {
        let z = &mut *self.zone;
        let k = z.kernels.get(req.kernel)?;
        if req.dev != 0 {
            return Err(CuError::INVALID_DEVICE);
        }
        Ok(CuKernelGetAttributeReply { pi: z.backend.func_get_attribute(&k.func, req.attrib)? })
    }

    fn cu_kernel_set_attribute(&mut self, req: CuKernelSetAttribute) -> CuResult<Done> {
        let z = &mut *self.zone;
        let k = z.kernels.get(req.kernel)?;
        if req.dev != 0 {
            return Err(CuError::INVALID_DEVICE);
        }
        z.backend.func_set_attribute(&k.func, req.attrib, req.val)?;
        Ok(Done {})
    }

    fn func_param_layout(&mut self, req: FuncParamLayout) -> CuResult<FuncParamLayoutReply> {
        let slots = self.zone.layout(req.func)?.to_vec();
        let z = &mut *self.zone;
        let f = func_of(&z.functions, &z.kernels, req.func)?;
        // What the guest needs to refuse an impossible launch at once, as the driver does.
        let max_threads = z.backend.func_get_attribute(&f.func, FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?;
        let max_dynamic_smem = z.backend.func_get_attribute(&f.func, FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)?;
        Ok(FuncParamLayoutReply { slots, max_threads, max_dynamic_smem })
    }

    fn cu_occupancy_max_active_blocks_per_multiprocessor(
        &mut self,
        req: CuOccupancyMaxActiveBlocksPerMultiprocessor,
    ) -> CuResult<CuOccupancyMaxActiveBlocksPerMultiprocessorReply> {
        let num_blocks = self.occupancy(req.func, req.block_size, req.dynamic_s_mem_size, 0)?;
        Ok(CuOccupancyMaxActiveBlocksPerMultiprocessorReply { num_blocks })
    }

    fn cu_occupancy_max_active_blocks_per_multiprocessor_with_flags(
        &mut self,
        req: CuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags,
    ) -> CuResult<CuOccupancyMaxActiveBlocksPerMultiprocessorWithFlagsReply> {
        let num_blocks = self.occupancy(req.func, req.block_size, req.dynamic_s_mem_size, req.flags)?;
        Ok(CuOccupancyMaxActiveBlocksPerMultiprocessorWithFlagsReply { num_blocks })
    }

    fn cu_occupancy_available_dynamic_s_mem_per_block(
        &mut self,
        req: CuOccupancyAvailableDynamicSMemPerBlock,
    ) -> CuResult<CuOccupancyAvailableDynamicSMemPerBlockReply> {
        let z = &mut *self.zone;
        let f = func_of(&z.functions, &z.kernels, req.func)?;
        let bytes = z.backend.occupancy_available_dynamic_smem(&f.func, req.num_blocks, req.block_size)?;
        Ok(CuOccupancyAvailableDynamicSMemPerBlockReply { dynamic_smem_size: bytes })
    }

    fn host_func(&mut self, req: HostFunc) -> CuResult<Done> {
        let z = &mut *self.zone;
        let slot = z.host_func_slot(req.slot)?;
        // Its callback frees itself after one run: it must not become a graph's node.
        z.refuse_if_capturing(req.stream)?;
        let s = stream_of(&z.streams, req.stream)?;
        // Each queued function holds a callback in the driver until the stream reaches it:
        // a zone queues at most MAX_QUEUED_HOST_FUNCS.
        let slot = slot.counted_in(&z.host_funcs_queued, MAX_QUEUED_HOST_FUNCS).ok_or(CuError::OUT_OF_MEMORY)?;
        z.backend.launch_host_func(s, slot)?;
        Ok(Done {})
    }

    fn window_device_pointer(&mut self, req: WindowDevicePointer) -> CuResult<WindowDevicePointerReply> {
        // The window is this zone's own memory (shared only with its guest); its device
        // mapping gives kernels nothing they could not already reach through copies.
        let in_window = usize::try_from(req.offset).is_ok_and(|o| o < self.window.size());
        if !in_window {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(WindowDevicePointerReply { dptr: self.zone.backend.window_device_pointer(req.offset)? })
    }

    fn occupancy_max_active_clusters(
        &mut self,
        req: OccupancyMaxActiveClusters,
    ) -> CuResult<OccupancyMaxActiveClustersReply> {
        let z = &mut *self.zone;
        let f = func_of(&z.functions, &z.kernels, req.func)?;
        let clusters = z.backend.occupancy_max_active_clusters(&f.func, &req.config)?;
        Ok(OccupancyMaxActiveClustersReply { clusters })
    }

    fn take_device_output(&mut self, _req: TakeDeviceOutput) -> CuResult<TakeDeviceOutputReply> {
        let taken = match &self.zone.device_output {
            Some(o) => o.take(DEVICE_OUTPUT_CHUNK),
            None => Default::default(),
        };
        Ok(TakeDeviceOutputReply { stdout: taken.stdout, stderr: taken.stderr, dropped: taken.dropped })
    }

    fn ctx_query_value(&mut self, req: CtxQueryValue) -> CuResult<CtxQueryValueReply> {
        let value = self.zone.in_ctx(req.ctx, |b| b.ctx_query_value())?;
        Ok(CtxQueryValueReply { value })
    }

    fn launch(&mut self, req: Launch) -> CuResult<Done> {
        let Launch { func, config, stream, params } = req;
        if config.grid.contains(&0) || config.block.contains(&0) {
            return Err(CuError::INVALID_VALUE);
        }
        let z = &mut *self.zone;
        stream_of(&z.streams, stream)?;
        z.layout(func)?;
        let entry = func_of(&z.functions, &z.kernels, func)?;
        let layout = entry.layout.as_deref().unwrap_or_default();
        params_cover(layout, &params)?;
        let s = stream_of(&z.streams, stream)?;
        z.backend.launch(&entry.func, &config, s, &params, layout)?;
        let root = entry.root;
        z.note_launch_of(root);
        Ok(Done {})
    }

    // ---- streams ----

    fn cu_stream_create(&mut self, req: CuStreamCreate) -> CuResult<CuStreamCreateReply> {
        Ok(CuStreamCreateReply { ph_stream: self.stream_create(req.flags, 0)? })
    }

    fn cu_stream_create_with_priority(
        &mut self,
        req: CuStreamCreateWithPriority,
    ) -> CuResult<CuStreamCreateWithPriorityReply> {
        Ok(CuStreamCreateWithPriorityReply { ph_stream: self.stream_create(req.flags, req.priority)? })
    }

    fn cu_stream_destroy_v2(&mut self, req: CuStreamDestroyV2) -> CuResult<Done> {
        let z = &mut *self.zone;
        // A stream destroyed mid-capture ends its capture (the driver invalidates it).
        let capturing = z.stream_is_capturing(req.h_stream)?;
        let s = z.streams.remove(req.h_stream)?;
        z.backend.stream_destroy(s.obj)?;
        if capturing {
            z.captures_active = z.captures_active.saturating_sub(1);
        }
        Ok(Done {})
    }

    fn cu_stream_synchronize(&mut self, req: CuStreamSynchronize) -> CuResult<Done> {
        let z = &mut *self.zone;
        match stream_of(&z.streams, req.h_stream)? {
            Some(s) => z.backend.stream_synchronize(s)?,
            // The default stream: waiting for the whole context waits at least as long.
            None => z.backend.synchronize()?,
        }
        Ok(Done {})
    }

    fn cu_stream_query(&mut self, req: CuStreamQuery) -> CuResult<Done> {
        let z = &mut *self.zone;
        let s = stream_of(&z.streams, req.h_stream)?;
        z.backend.stream_query(s)?;
        Ok(Done {})
    }

    fn cu_stream_wait_event(&mut self, req: CuStreamWaitEvent) -> CuResult<Done> {
        let z = &mut *self.zone;
        let s = stream_of(&z.streams, req.h_stream)?;
        let e = &z.events.get(req.h_event)?.obj;
        z.backend.stream_wait_event(s, e, req.flags)?;
        Ok(Done {})
    }

    fn cu_stream_get_flags(&mut self, req: CuStreamGetFlags) -> CuResult<CuStreamGetFlagsReply> {
        let z = &mut *self.zone;
        let s = stream_of(&z.streams, req.h_stream)?;
        Ok(CuStreamGetFlagsReply { flags: z.backend.stream_get_flags(s)? })
    }

    fn cu_stream_get_priority(&mut self, req: CuStreamGetPriority) -> CuResult<CuStreamGetPriorityReply> {
        let z = &mut *self.zone;
        let s = stream_of(&z.streams, req.h_stream)?;
        Ok(CuStreamGetPriorityReply { priority: z.backend.stream_get_priority(s)? })
    }

    fn cu_stream_get_ctx(&mut self, req: CuStreamGetCtx) -> CuResult<CuStreamGetCtxReply> {
        let z = &*self.zone;
        let pctx = if DEFAULT_STREAMS.contains(&req.h_stream) { z.current } else { z.streams.get(req.h_stream)?.ctx };
        Ok(CuStreamGetCtxReply { pctx })
    }

    // ---- events ----

    fn cu_event_create(&mut self, req: CuEventCreate) -> CuResult<CuEventCreateReply> {
        let z = &mut *self.zone;
        z.reserve()?;
        let e = z.backend.event_create(req.flags)?;
        match z.events.insert(Obj { obj: e, ctx: z.current }) {
            Ok(ph_event) => Ok(CuEventCreateReply { ph_event }),
            Err(e) => Err(e.into()),
        }
    }

    fn cu_event_destroy_v2(&mut self, req: CuEventDestroyV2) -> CuResult<Done> {
        let z = &mut *self.zone;
        let e = z.events.remove(req.h_event)?;
        // Its IPC handle dies with it: no other zone can open it any more.
        if let Some(token) = z.event_exports.remove(&req.h_event) {
            if let Some(b) = z.broker.as_mut() {
                b.revoke(&token);
            }
        }
        z.backend.event_destroy(e.obj)?;
        Ok(Done {})
    }

    fn cu_event_record(&mut self, req: CuEventRecord) -> CuResult<Done> {
        self.event_record(req.h_event, req.h_stream, 0)
    }

    fn cu_event_record_with_flags(&mut self, req: CuEventRecordWithFlags) -> CuResult<Done> {
        self.event_record(req.h_event, req.h_stream, req.flags)
    }

    fn cu_event_query(&mut self, req: CuEventQuery) -> CuResult<Done> {
        let z = &mut *self.zone;
        let e = &z.events.get(req.h_event)?.obj;
        z.backend.event_query(e)?;
        Ok(Done {})
    }

    fn cu_event_synchronize(&mut self, req: CuEventSynchronize) -> CuResult<Done> {
        let z = &mut *self.zone;
        let e = &z.events.get(req.h_event)?.obj;
        z.backend.event_synchronize(e)?;
        Ok(Done {})
    }

    fn cu_event_elapsed_time(&mut self, req: CuEventElapsedTime) -> CuResult<CuEventElapsedTimeReply> {
        Ok(CuEventElapsedTimeReply { p_milliseconds: self.elapsed(req.h_start, req.h_end)? })
    }

    fn cu_event_elapsed_time_v2(&mut self, req: CuEventElapsedTimeV2) -> CuResult<CuEventElapsedTimeV2Reply> {
        Ok(CuEventElapsedTimeV2Reply { p_milliseconds: self.elapsed(req.h_start, req.h_end)? })
    }

    // ---- virtual memory management (zone/vmm.rs) ----

    fn mem_get_granularity(&mut self, req: MemGetGranularity) -> CuResult<MemGetGranularityReply> {
        Ok(MemGetGranularityReply { granularity: self.zone.mem_granularity(req.recommended)? })
    }

    fn mem_address_reserve(&mut self, req: MemAddressReserve) -> CuResult<MemAddressReserveReply> {
        Ok(MemAddressReserveReply { ptr: self.zone.mem_address_reserve(req.size, req.alignment, req.addr)? })
    }

    fn mem_address_free(&mut self, req: MemAddressFree) -> CuResult<Done> {
        self.zone.mem_address_free(req.ptr, req.size)?;
        Ok(Done {})
    }

    fn mem_create(&mut self, req: MemCreate) -> CuResult<MemCreateReply> {
        Ok(MemCreateReply { handle: self.zone.mem_create(req.size, req.handle_types, req.rdma)? })
    }

    fn mem_release(&mut self, req: MemRelease) -> CuResult<Done> {
        self.zone.mem_release(req.handle)?;
        Ok(Done {})
    }

    fn mem_map(&mut self, req: MemMap) -> CuResult<Done> {
        self.zone.mem_map(req.ptr, req.size, req.offset, req.handle)?;
        Ok(Done {})
    }

    fn mem_unmap(&mut self, req: MemUnmap) -> CuResult<Done> {
        self.zone.mem_unmap(req.ptr, req.size)?;
        Ok(Done {})
    }

    fn mem_set_access(&mut self, req: MemSetAccess) -> CuResult<Done> {
        self.zone.mem_set_access(req.ptr, req.size, req.flags)?;
        Ok(Done {})
    }

    // ---- graphs and stream capture (zone/graphs.rs) ----

    fn cu_graph_create(&mut self, req: CuGraphCreate) -> CuResult<CuGraphCreateReply> {
        if req.flags != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(CuGraphCreateReply { ph_graph: self.zone.graph_create()? })
    }

    fn cu_graph_destroy(&mut self, req: CuGraphDestroy) -> CuResult<Done> {
        self.zone.graph_destroy(req.h_graph)?;
        Ok(Done {})
    }

    fn cu_graph_clone(&mut self, req: CuGraphClone) -> CuResult<CuGraphCloneReply> {
        Ok(CuGraphCloneReply { ph_graph_clone: self.zone.graph_clone(req.original_graph)? })
    }

    fn cu_graph_instantiate_with_flags(
        &mut self,
        req: CuGraphInstantiateWithFlags,
    ) -> CuResult<CuGraphInstantiateWithFlagsReply> {
        Ok(CuGraphInstantiateWithFlagsReply { ph_graph_exec: self.zone.graph_instantiate(req.h_graph, req.flags)? })
    }

    fn cu_graph_exec_destroy(&mut self, req: CuGraphExecDestroy) -> CuResult<Done> {
        self.zone.graph_exec_destroy(req.h_graph_exec)?;
        Ok(Done {})
    }

    fn cu_graph_launch(&mut self, req: CuGraphLaunch) -> CuResult<Done> {
        self.zone.graph_launch(req.h_graph_exec, req.h_stream, false)?;
        Ok(Done {})
    }

    fn cu_graph_upload(&mut self, req: CuGraphUpload) -> CuResult<Done> {
        self.zone.graph_launch(req.h_graph_exec, req.h_stream, true)?;
        Ok(Done {})
    }

    fn graph_get_nodes(&mut self, req: GraphGetNodes) -> CuResult<GraphGetNodesReply> {
        let (count, nodes) = self.zone.graph_get_nodes(req.graph, req.first, req.want)?;
        Ok(GraphGetNodesReply { count, nodes })
    }

    fn graph_add_kernel_node(&mut self, req: GraphAddKernelNode) -> CuResult<GraphAddKernelNodeReply> {
        Ok(GraphAddKernelNodeReply { node: self.zone.graph_add_kernel_node(req)? })
    }

    fn graph_add_memset_node(&mut self, req: GraphAddMemsetNode) -> CuResult<GraphAddMemsetNodeReply> {
        Ok(GraphAddMemsetNodeReply { node: self.zone.graph_add_memset_node(req)? })
    }

    fn graph_add_memcpy_node(&mut self, req: GraphAddMemcpyNode) -> CuResult<GraphAddMemcpyNodeReply> {
        let window_size = self.window.size();
        Ok(GraphAddMemcpyNodeReply { node: self.zone.graph_add_memcpy_node(req, window_size)? })
    }

    fn graph_add_host_node(&mut self, req: GraphAddHostNode) -> CuResult<GraphAddHostNodeReply> {
        Ok(GraphAddHostNodeReply { node: self.zone.graph_add_host_node(req)? })
    }

    fn graph_add_empty_node(&mut self, req: GraphAddEmptyNode) -> CuResult<GraphAddEmptyNodeReply> {
        Ok(GraphAddEmptyNodeReply { node: self.zone.graph_add_empty_node(req)? })
    }

    fn host_func_persistent(&mut self, req: HostFuncPersistent) -> CuResult<Done> {
        self.zone.host_func_persistent(req.stream, req.slot, req.hidden)?;
        Ok(Done {})
    }

    fn stream_begin_capture(&mut self, req: StreamBeginCapture) -> CuResult<Done> {
        self.zone.stream_begin_capture(req.stream, req.mode)?;
        Ok(Done {})
    }

    fn stream_end_capture(&mut self, req: StreamEndCapture) -> CuResult<StreamEndCaptureReply> {
        Ok(StreamEndCaptureReply { graph: self.zone.stream_end_capture(req.stream)? })
    }

    fn stream_capture_info(&mut self, req: StreamCaptureInfo) -> CuResult<StreamCaptureInfoReply> {
        let (status, id) = self.zone.stream_capture_info(req.stream)?;
        Ok(StreamCaptureInfoReply { status, id })
    }

    fn thread_exchange_capture_mode(
        &mut self,
        req: ThreadExchangeCaptureMode,
    ) -> CuResult<ThreadExchangeCaptureModeReply> {
        Ok(ThreadExchangeCaptureModeReply { previous: self.zone.exchange_capture_mode(req.mode)? })
    }

    // ---- IPC ----

    fn ipc_get_mem_handle(&mut self, req: IpcGetMemHandle) -> CuResult<IpcGetMemHandleReply> {
        let z = &mut *self.zone;
        if z.broker.is_none() {
            return Err(CuError::NOT_SUPPORTED);
        }
        // Only the start of one of this zone's own allocations.
        let r = *z.ranges.get(&req.dptr).filter(|r| r.owner == Owner::Alloc).ok_or(CuError::INVALID_VALUE)?;
        if let Some(token) = z.exports.get(&req.dptr) {
            return Ok(IpcGetMemHandleReply { handle: guest_handle(token) });
        }
        let payload = z.backend.ipc_export(req.dptr)?;
        let broker = z.broker.as_mut().ok_or(CuError::NOT_SUPPORTED)?;
        let token = broker.export(&payload, r.size)?;
        z.exports.insert(req.dptr, token);
        Ok(IpcGetMemHandleReply { handle: guest_handle(&token) })
    }

    fn ipc_open_mem_handle(&mut self, req: IpcOpenMemHandle) -> CuResult<IpcOpenMemHandleReply> {
        let z = &mut *self.zone;
        let broker = z.broker.as_mut().ok_or(CuError::NOT_SUPPORTED)?;
        // The driver takes exactly this flag: 0 is refused too.
        if req.flags != IPC_MEM_LAZY_ENABLE_PEER_ACCESS {
            return Err(CuError::INVALID_VALUE);
        }
        let token = parse_guest_handle(&req.handle)?;
        // Unknown, revoked, our own, or refused by the policy: the broker says which.
        let (payload, size) = broker.open(&token)?;
        let current = z.current;
        if let Some((&dptr, import)) =
            z.imports.iter_mut().find(|(_, i)| i.live && i.token == token && i.ctx == current)
        {
            // Open in this context already: the same mapping, one more reference.
            import.refs = import.refs.saturating_add(1);
            return Ok(IpcOpenMemHandleReply { dptr });
        }
        let opened = z.reserve().and_then(|()| z.backend.ipc_open(&payload, size, req.flags));
        let dptr = match opened {
            Ok(dptr) => dptr,
            Err(e) => {
                z.release_token(&token);
                return Err(e);
            }
        };
        if !z.range_is_free(dptr, size) {
            tracing::error!(dptr, size, "backend mapped an IPC import over a known range");
            let _ = z.backend.ipc_close(dptr);
            z.release_token(&token);
            return Err(CuError::UNKNOWN);
        }
        // (A revoked import left at this address is replaced: its mapping is long gone.)
        z.imports.insert(dptr, Import { token, ctx: current, refs: 1, live: true });
        z.insert_range(dptr, size, current, Owner::Import);
        Ok(IpcOpenMemHandleReply { dptr })
    }

    fn ipc_get_event_handle(&mut self, req: IpcGetEventHandle) -> CuResult<IpcGetEventHandleReply> {
        let z = &mut *self.zone;
        if z.broker.is_none() {
            return Err(CuError::NOT_SUPPORTED);
        }
        if let Some(token) = z.event_exports.get(&req.event) {
            return Ok(IpcGetEventHandleReply { handle: guest_handle(token) });
        }
        let e = &z.events.get(req.event)?.obj;
        let mut payload = EVENT_PAYLOAD.to_vec();
        payload.extend_from_slice(&z.backend.ipc_event_export(e)?);
        let broker = z.broker.as_mut().ok_or(CuError::NOT_SUPPORTED)?;
        let token = broker.export(&payload, 0)?;
        z.event_exports.insert(req.event, token);
        Ok(IpcGetEventHandleReply { handle: guest_handle(&token) })
    }

    fn ipc_open_event_handle(&mut self, req: IpcOpenEventHandle) -> CuResult<IpcOpenEventHandleReply> {
        let z = &mut *self.zone;
        let broker = z.broker.as_mut().ok_or(CuError::NOT_SUPPORTED)?;
        let token = parse_guest_handle(&req.handle)?;
        // Unknown, revoked, our own, or refused by the policy: the broker says which.
        let (payload, _) = broker.open(&token)?;
        // Opening an event does not keep the exporter's token busy (an event has no
        // mapping to unmap): the reference is given back at once.
        z.release_token(&token);
        // A memory handle's token names no event.
        let driver = payload.strip_prefix(EVENT_PAYLOAD).ok_or(CuError::INVALID_VALUE)?;
        z.reserve()?;
        let e = z.backend.ipc_event_open(driver)?;
        match z.events.insert(Obj { obj: e, ctx: z.current }) {
            Ok(event) => Ok(IpcOpenEventHandleReply { event }),
            Err(e) => Err(e.into()),
        }
    }

    fn ipc_close_mem_handle(&mut self, req: IpcCloseMemHandle) -> CuResult<Done> {
        let z = &mut *self.zone;
        let import = z.imports.get_mut(&req.dptr).ok_or(CuError::INVALID_VALUE)?;
        if import.refs > 1 {
            import.refs -= 1;
            return Ok(Done {});
        }
        let (token, live) = (import.token, import.live);
        z.unmap_import(req.dptr, true)?;
        z.imports.remove(&req.dptr);
        if live {
            z.release_token(&token);
        }
        Ok(Done {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fat binary with one entry: a 16-byte header, a 16-byte entry header, `payload`.
    fn fatbin(payload: &[u8]) -> Vec<u8> {
        let mut b = 0xBA55_ED50u32.to_le_bytes().to_vec();
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(&(16 + payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn mapped_memory_is_checked_and_counted_like_allocations() {
        let g = 2u64 << 20;
        let mut f = fixture(Quotas { mem_bytes: 3 * g, ..Quotas::default() }, 4096);
        let gran = f.api().mem_get_granularity(MemGetGranularity { recommended: false }).unwrap().granularity;
        assert_eq!(gran, g);
        let r = f.api().mem_address_reserve(MemAddressReserve { size: 4 * g, alignment: 0, addr: 0 }).unwrap().ptr;
        let p1 = f.api().mem_create(MemCreate { size: g, handle_types: 1, rdma: true }).unwrap().handle;
        let p2 = f.api().mem_create(MemCreate { size: g, handle_types: 0, rdma: false }).unwrap().handle;
        assert_eq!(f.z.mem_used, 2 * g, "physical memory counts from its creation");
        let e = f.api().mem_create(MemCreate { size: 2 * g, handle_types: 0, rdma: false }).map(|_| ());
        assert_eq!(e, Err(CuError::OUT_OF_MEMORY), "past the zone's memory quota");
        let map = |ptr, size, offset, handle| MemMap { ptr, size, offset, handle };
        f.api().mem_map(map(r, g, 0, p1)).unwrap();
        f.api().mem_map(map(r + g, g, 0, p2)).unwrap();
        let e = f.api().mem_map(map(r, g, 0, p2)).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "over a mapping");
        let e = f.api().mem_map(map(r + 4 * g, g, 0, p2)).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "outside every reservation");
        let e = f.api().mem_map(map(r + 2 * g, 2 * g, 0, p2)).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "past the physical allocation");
        f.api().mem_set_access(MemSetAccess { ptr: r, size: 2 * g, flags: 3 }).unwrap();
        let e = f.api().mem_set_access(MemSetAccess { ptr: r, size: 3 * g, flags: 3 }).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "access only to mapped memory");
        assert_eq!(f.z.check_range(r + g - 8, 16), Ok(()), "adjoining mappings are one stretch");
        assert!(f.z.check_range(r + 2 * g - 8, 16).is_err(), "but not past the last");
        let e = f.api().cu_mem_free_v2(CuMemFreeV2 { dptr: r }).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "a mapping is no allocation");
        // Contents persist across unmap and map, as on the driver.
        f.w.write(BulkRef { offset: 0, len: 4 }, &[1, 2, 3, 4]).unwrap();
        f.htod(r + 64, 0, 4).unwrap();
        let e = f.api().mem_address_free(MemAddressFree { ptr: r, size: 4 * g }).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "a reservation with mappings is not freed");
        let e = f.api().mem_unmap(MemUnmap { ptr: r, size: g / 2 }).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "an unmap covers whole mappings");
        f.api().mem_unmap(MemUnmap { ptr: r, size: g }).unwrap();
        assert!(f.z.check_range(r + 64, 4).is_err(), "unmapped memory is out of reach");
        f.api().mem_map(map(r + 2 * g, g, 0, p1)).unwrap();
        f.dtoh(r + 2 * g + 64, 8, 4).unwrap();
        let mut back = [0u8; 4];
        f.w.read(BulkRef { offset: 8, len: 4 }, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 4]);
        // Released while mapped: counted until its last mapping goes.
        f.api().mem_release(MemRelease { handle: p1 }).unwrap();
        assert_eq!(f.z.mem_used, 2 * g);
        let e = f.api().mem_map(map(r, g, 0, p1)).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_HANDLE), "a released handle names nothing");
        f.api().mem_unmap(MemUnmap { ptr: r + g, size: 2 * g }).unwrap();
        assert_eq!(f.z.mem_used, g, "p1's memory went with its last mapping");
        f.api().mem_release(MemRelease { handle: p2 }).unwrap();
        assert_eq!(f.z.mem_used, 0);
        f.api().mem_address_free(MemAddressFree { ptr: r, size: 4 * g }).unwrap();
        assert_eq!(f.z.live_objects(), 0, "nothing left");
    }

    #[test]
    fn graph_nodes_are_checked_like_the_work_they_replay() {
        let stage = CuError::STREAM_CAPTURE_UNSUPPORTED;
        let mut f = fixture(Quotas::default(), 4096);
        let region = idm_shm::MemfdRegion::create("graph-checks", 4096).unwrap();
        f.z.attach_window(region, 0, 4096).unwrap();
        let a = f.alloc(1024).unwrap();
        let s = f.stream().unwrap();
        let objects = f.z.live_objects();
        let g = f.api().cu_graph_create(CuGraphCreate { flags: 0 }).unwrap().ph_graph;
        let other = f.api().cu_graph_create(CuGraphCreate { flags: 0 }).unwrap().ph_graph;
        let memset = |graph, deps: Vec<u8>, dst, width| GraphAddMemsetNode {
            graph,
            deps,
            dst,
            pitch: 0,
            value: 1,
            element_size: 4,
            width,
            height: 1,
        };
        let n1 = f.api().graph_add_memset_node(memset(g, vec![], a, 256)).unwrap().node;
        let e = f.api().graph_add_memset_node(memset(g, vec![], a, 257)).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "a memset node past its allocation is refused");
        let on = f.api().graph_add_empty_node(GraphAddEmptyNode { graph: other, deps: vec![] }).unwrap().node;
        let e = f.api().graph_add_empty_node(GraphAddEmptyNode { graph: g, deps: on.0.to_le_bytes().to_vec() });
        assert_eq!(e.map(|_| ()), Err(CuError::INVALID_VALUE), "a dependency must be a node of the same graph");
        let forged = Handle(n1.0 ^ (1 << 40));
        let e = f.api().graph_add_empty_node(GraphAddEmptyNode { graph: g, deps: forged.0.to_le_bytes().to_vec() });
        assert_eq!(e.map(|_| ()), Err(CuError::INVALID_HANDLE), "a forged node handle names nothing");
        let copy = GraphAddMemcpyNode {
            graph: g,
            deps: n1.0.to_le_bytes().to_vec(),
            src_window: true,
            src: 0,
            src_pitch: 0,
            src_height: 0,
            dst_window: false,
            dst: a,
            dst_pitch: 0,
            dst_height: 0,
            width: 1024,
            height: 1,
            depth: 1,
            hidden: false,
        };
        f.api().graph_add_memcpy_node(copy.clone()).expect("from the window (which the double took) into `a`");
        let e = f.api().graph_add_memcpy_node(GraphAddMemcpyNode { src: 3584, ..copy.clone() }).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "a window side past the window is refused");
        let e = f.api().graph_add_memcpy_node(GraphAddMemcpyNode { src_window: false, src: a + 8, ..copy }).map(|_| ());
        assert_eq!(e, Err(CuError::INVALID_VALUE), "a copy node's source past its allocation is refused");
        let nodes = f.api().graph_get_nodes(GraphGetNodes { graph: g, first: 0, want: 8 }).unwrap();
        assert_eq!(nodes.count, 2, "the memset and the copy");
        assert_eq!(&nodes.nodes[..8], &n1.0.to_le_bytes(), "the memset's handle is the one adding it returned");

        // While a capture is open, what a graph must not record is refused.
        f.api().stream_begin_capture(StreamBeginCapture { stream: s, mode: 0 }).unwrap();
        let e = f.api().memcpy_hto_d(MemcpyHtoD { dst: a, src: BulkRef { offset: 0, len: 64 }, stream: s });
        assert_eq!(e.map(|_| ()), Err(stage), "a staged copy is not captured");
        let e = f.api().host_func(HostFunc { stream: s, slot: 0 });
        assert_eq!(e.map(|_| ()), Err(stage), "a one-shot host function is not captured");
        f.z.async_since_sync = f.z.quotas.max_async_in_flight;
        f.z.note_posted().expect("the throttle does not synchronise (and so invalidate) an open capture");
        f.api().cu_memset_d32_async(CuMemsetD32Async { dst_device: a, ui: 5, n: 256, h_stream: s }).unwrap();
        let info = f.api().stream_capture_info(StreamCaptureInfo { stream: s }).unwrap();
        assert_eq!(info.status, crate::backend::CAPTURE_ACTIVE);
        let captured = f.api().stream_end_capture(StreamEndCapture { stream: s }).unwrap().graph;
        assert_eq!(f.z.captures_active, 0);
        let exec = f.api().cu_graph_instantiate_with_flags(CuGraphInstantiateWithFlags { h_graph: captured, flags: 0 });
        let exec = exec.unwrap().ph_graph_exec;
        f.api().cu_graph_launch(CuGraphLaunch { h_graph_exec: exec, h_stream: s }).unwrap();

        // Destroying a graph ends its node handles; everything counted is given back.
        f.api().cu_graph_destroy(CuGraphDestroy { h_graph: g }).unwrap();
        let e = f.api().graph_add_empty_node(GraphAddEmptyNode { graph: other, deps: n1.0.to_le_bytes().to_vec() });
        assert_eq!(e.map(|_| ()), Err(CuError::INVALID_HANDLE), "a destroyed graph's nodes are gone");
        f.api().cu_graph_exec_destroy(CuGraphExecDestroy { h_graph_exec: exec }).unwrap();
        f.api().cu_graph_destroy(CuGraphDestroy { h_graph: captured }).unwrap();
        f.api().cu_graph_destroy(CuGraphDestroy { h_graph: other }).unwrap();
        assert_eq!(f.z.live_objects(), objects, "graphs, execs and nodes count against the handle quota");
    }

    /// Found by the `zone_requests` fuzzer (run 2): a stream destroyed, alone or with its
    /// context, while it captures ends the capture; the zone stops counting it (its throttle
    /// works again) and the test double keeps no graph of it.
    #[test]
    fn a_stream_destroyed_mid_capture_ends_the_capture() {
        let mut f = fixture(Quotas::default(), 4096);
        let held0 = f.z.backend().held();
        let s = f.stream().unwrap();
        f.api().stream_begin_capture(StreamBeginCapture { stream: s, mode: 0 }).unwrap();
        assert_eq!(f.z.captures_active, 1);
        f.api().cu_stream_destroy_v2(CuStreamDestroyV2 { h_stream: s }).unwrap();
        assert_eq!(f.z.captures_active, 0);
        assert_eq!(f.z.backend().held(), held0, "no graph is left of the capture");

        let ctx = f.api().ctx_create(CtxCreate { flags: 0 }).unwrap().ctx;
        let s = f.stream().unwrap();
        f.api().stream_begin_capture(StreamBeginCapture { stream: s, mode: 0 }).unwrap();
        f.api().ctx_destroy(CtxDestroy { ctx }).unwrap();
        assert_eq!(f.z.captures_active, 0);
        assert_eq!(f.z.backend().held(), held0, "nor of one whose context went");

        let s = f.stream().unwrap();
        f.api().stream_begin_capture(StreamBeginCapture { stream: s, mode: 0 }).unwrap();
        f.z.teardown();
        assert_eq!(f.z.captures_active, 0);
        assert_eq!(f.z.backend().held(), held0, "nor of one open at teardown");
    }

    #[test]
    fn queued_host_functions_are_bounded_per_zone() {
        use std::sync::atomic::Ordering::SeqCst;
        let mut f = fixture(Quotas::default(), 4096);
        let region = idm_shm::MemfdRegion::create("host-func-bound", 4096).unwrap();
        f.z.attach_window(region, 0, 4096).unwrap();
        // As if that many were queued and not yet reached (the test double runs them in place).
        f.z.host_funcs_queued.store(MAX_QUEUED_HOST_FUNCS, SeqCst);
        let r = f.api().host_func(HostFunc { stream: Handle(0), slot: 0 });
        assert_eq!(r.map(|_| ()), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(f.z.host_funcs_queued.load(SeqCst), MAX_QUEUED_HOST_FUNCS, "a refused one is not counted");
        f.z.host_funcs_queued.store(MAX_QUEUED_HOST_FUNCS - 1, SeqCst);
        f.api().host_func(HostFunc { stream: Handle(0), slot: 8 }).unwrap();
        assert_eq!(f.z.host_funcs_queued.load(SeqCst), MAX_QUEUED_HOST_FUNCS - 1, "one that ran is uncounted again");
    }

    #[test]
    fn images_that_may_print_are_told_apart() {
        assert!(image_may_print(b".version 8.0\n.extern .func vprintf\0"));
        assert!(image_may_print(b"\x7fELF....__assertfail...."));
        assert!(!image_may_print(b".version 8.0\n.visible .entry k()\n{ ret; }\0"));
        assert!(!image_may_print(&fatbin(b"\x7fELF no such names here")));
        assert!(image_may_print(&fatbin(b"\x7fELF calls vprintf")));
        // A compressed payload cannot be searched: it may print.
        assert!(image_may_print(&fatbin(&[0x9c, 0xff, 0x01, 0x80, 0x00, 0x13])));
        assert!(image_may_print(&fatbin(b"")[..20]), "a truncated fat binary may print");
    }
    use crate::backend::sim::SimGpu;
    use idm_core::region::test_utils::heap_region;
    use idm_core::RawRegion;

    type Window = DataWindow<RawRegion>;

    /// A zone over the simulated GPU (1 GiB) with a heap-backed data window.
    struct Fixture {
        z: Zone<SimGpu>,
        w: Window,
        _mem: Vec<u64>,
    }

    fn fixture(q: Quotas, window: usize) -> Fixture {
        let (mem, r) = heap_region(window);
        Fixture { z: Zone::new(1, SimGpu::new(1 << 30), q), w: DataWindow::new(r), _mem: mem }
    }

    impl Fixture {
        fn api(&mut self) -> ZoneCtx<'_, SimGpu, RawRegion> {
            self.z.api(&self.w)
        }
        fn alloc(&mut self, bytesize: u64) -> CuResult<u64> {
            self.api().cu_mem_alloc_v2(CuMemAllocV2 { bytesize }).map(|r| r.dptr)
        }
        fn htod(&mut self, dst: u64, offset: u64, len: u64) -> CuResult<Done> {
            self.api().memcpy_hto_d(MemcpyHtoD { dst, src: BulkRef { offset, len }, stream: Handle(0) })
        }
        fn dtoh(&mut self, src: u64, offset: u64, len: u64) -> CuResult<Done> {
            self.api().memcpy_dto_h(MemcpyDtoH { dst: BulkRef { offset, len }, src, stream: Handle(0) })
        }
        fn stream(&mut self) -> CuResult<Handle> {
            self.api().cu_stream_create(CuStreamCreate { flags: 0 }).map(|r| r.ph_stream)
        }
        fn free_bytes(&mut self) -> u64 {
            self.api().cu_mem_get_info_v2(CuMemGetInfoV2 {}).unwrap().free
        }
        /// Loads [`PTX`] at the end of the window.
        fn load(&mut self, library: bool) -> CuResult<Handle> {
            let mut image = PTX.as_bytes().to_vec();
            image.push(0);
            let image_ref = BulkRef { offset: (self.w.size() - image.len()) as u64, len: image.len() as u64 };
            self.w.write(image_ref, &image).unwrap();
            self.api().module_load(ModuleLoad { image: image_ref, library }).map(|r| r.handle)
        }
        /// Gives the test double the fixture's own window memory, as `attach_window` gives
        /// it the shared mapping: window sides of copies are then direct.
        fn take_window(&mut self) {
            let base = std::ptr::NonNull::new(self._mem.as_mut_ptr().cast::<u8>()).unwrap();
            let len = self.w.size();
            #[allow(unsafe_code)]
            // SAFETY: `_mem` is the window's memory and outlives the zone (field order); the
            // test double only reads and writes it through the region.
            let took = unsafe { self.z.backend_mut().attach_window(base, len) }.unwrap();
            assert!(took);
            self.z.window_direct = true;
        }
        fn function(&mut self, hmod: Handle) -> CuResult<Handle> {
            self.api().cu_module_get_function(CuModuleGetFunction { hmod, name: "fill_u32".into() }).map(|r| r.hfunc)
        }
    }

    /// A module the simulated GPU runs: `fill_u32(u32* p, u32 v, u64 n)` and a global.
    const PTX: &str = "
        .version 8.0
        .target sm_90
        .address_size 64
        .visible .global .align 4 .u32 counter[4];
        .visible .entry fill_u32(.param .u64 p, .param .u32 v, .param .u64 n) { ret; }
    ";

    /// `fill_u32`'s packed parameters.
    fn fill_params(p: u64, v: u32, n: u64) -> Vec<u8> {
        let mut b = p.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&n.to_le_bytes());
        b
    }

    fn config(threads: u32) -> LaunchConfig {
        LaunchConfig { grid: [1, 1, 1], block: [threads, 1, 1], shared_mem_bytes: 0, attrs: Vec::new() }
    }

    #[test]
    fn memory_quota_gives_out_of_memory_and_frees_count_again() {
        let mut f = fixture(Quotas { mem_bytes: 1000, ..Quotas::default() }, 4096);
        let a = f.alloc(600).unwrap();
        assert_eq!(f.alloc(401), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(f.alloc(u64::MAX), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(f.alloc(0), Err(CuError::INVALID_VALUE));
        f.alloc(400).unwrap();
        f.api().cu_mem_free_v2(CuMemFreeV2 { dptr: a }).unwrap();
        f.alloc(600).unwrap();
        assert_eq!(f.z.mem_used(), 1000);
        assert_eq!(f.free_bytes(), 0);
        // Pitched allocations count their padded size: 10 rows of 100 bytes pad to 512.
        let mut f = fixture(Quotas { mem_bytes: 4000, ..Quotas::default() }, 4096);
        let req = CuMemAllocPitchV2 { width_in_bytes: 100, height: 10, element_size_bytes: 4 };
        assert_eq!(f.api().cu_mem_alloc_pitch_v2(req.clone()), Err(CuError::OUT_OF_MEMORY));
        assert_eq!((f.z.mem_used(), f.free_bytes()), (0, 4000), "the padded allocation was given back");
        let mut f = fixture(Quotas::default(), 4096);
        let r = f.api().cu_mem_alloc_pitch_v2(req).unwrap();
        assert_eq!(f.z.mem_used(), r.p_pitch * 10);
    }

    #[test]
    fn one_handle_quota_spans_every_kind_but_the_primary_context() {
        let mut f = fixture(Quotas { max_handles: 5, ..Quotas::default() }, 4096);
        f.alloc(8).unwrap();
        f.stream().unwrap();
        f.api().cu_event_create(CuEventCreate { flags: 0 }).unwrap();
        let hmod = f.load(false).unwrap();
        let func = f.function(hmod).unwrap();
        assert_eq!(f.z.live_objects(), 5);
        assert_eq!(f.alloc(8), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(f.stream(), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(f.api().ctx_create(CtxCreate { flags: 0 }).map(|_| ()), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(f.load(true), Err(CuError::OUT_OF_MEMORY));
        // Repeated lookups return the same handle and cost nothing.
        assert_eq!(f.function(hmod), Ok(func));
        // A global is no object: globals do not count either.
        f.api().cu_module_get_global_v2(CuModuleGetGlobalV2 { hmod, name: "counter".into() }).unwrap();
        f.api().cu_module_unload(CuModuleUnload { hmod }).unwrap();
        assert_eq!(f.z.live_objects(), 3, "the module took its function with it");
        f.api().ctx_create(CtxCreate { flags: 0 }).unwrap();
    }

    #[test]
    fn ranges_must_stay_inside_one_allocation() {
        let mut f = fixture(Quotas::default(), 4096);
        let a = f.alloc(100).unwrap();
        f.htod(a + 36, 0, 64).unwrap();
        for dst in [a + 37, a - 1, u64::MAX - 10, 0] {
            assert_eq!(f.htod(dst, 0, 64), Err(CuError::INVALID_VALUE), "dst {dst:#x}");
        }
        assert_eq!(f.dtoh(a, 4090, 10), Err(CuError::INVALID_VALUE), "outside the window");
        assert_eq!(f.dtoh(a, u64::MAX, 2), Err(CuError::INVALID_VALUE), "window offset overflows");
        let bad = CuMemsetD32V2 { dst_device: a, ui: 0, n: u64::MAX / 2 };
        assert_eq!(f.api().cu_memset_d32_v2(bad), Err(CuError::INVALID_VALUE));
        let bad = CuMemsetD16V2 { dst_device: a, us: 0, n: 51 };
        assert_eq!(f.api().cu_memset_d16_v2(bad), Err(CuError::INVALID_VALUE));
        let bad = CuMemcpyDtoDV2 { dst_device: a, src_device: a + 50, byte_count: 51 };
        assert_eq!(f.api().cu_memcpy_dto_d_v2(bad), Err(CuError::INVALID_VALUE));
        assert_eq!(f.api().cu_mem_free_v2(CuMemFreeV2 { dptr: a + 4 }), Err(CuError::INVALID_VALUE), "interior");
        // Two adjacent allocations are still two: no range may span both.
        let b = f.alloc(512).unwrap();
        let c = f.alloc(512).unwrap();
        let (lo, hi) = (b.min(c), b.max(c));
        let span = CuMemsetD8V2 { dst_device: lo, uc: 0, n: hi + 1 - lo };
        assert_eq!(f.api().cu_memset_d8_v2(span), Err(CuError::INVALID_VALUE));
    }

    /// A pitched copy request between `src` and `dst` (window offsets where `*_window`).
    #[allow(clippy::too_many_arguments)]
    fn pitched(
        shape: u8,
        (src_window, src, src_pitch): (bool, u64, u64),
        (dst_window, dst, dst_pitch): (bool, u64, u64),
        width: u64,
        height: u64,
        depth: u64,
        rows_per_slice: u64,
    ) -> MemcpyPitched {
        MemcpyPitched {
            shape,
            src_kind: src_window.into(),
            src,
            src_x: 0,
            src_y: 0,
            src_z: 0,
            src_pitch,
            src_height: rows_per_slice,
            dst_kind: dst_window.into(),
            dst,
            dst_x: 0,
            dst_y: 0,
            dst_z: 0,
            dst_pitch,
            dst_height: rows_per_slice,
            width,
            height,
            depth,
            stream: Handle(0),
        }
    }

    /// Pitched copies and 2-D memsets move exactly their rows, through the window in place
    /// (`direct`: the backend took the window, as over the local transport) or staged row by
    /// row (as over Xen), and refuse blocks that leave the zone's memory or the window.
    fn pitched_copies_and_memsets(direct: bool) {
        let mut f = fixture(Quotas::default(), 64 << 10);
        if direct {
            f.take_window();
        }
        let (pitch, rows) = (256u64, 32u64);
        let a = f.alloc(pitch * rows).unwrap();
        let b = f.alloc(pitch * rows).unwrap();
        let whole = |f: &mut Fixture, dev: u64| {
            f.dtoh(dev, 32 << 10, pitch * rows).unwrap();
            let mut got = vec![0u8; (pitch * rows) as usize];
            f.w.read(BulkRef { offset: 32 << 10, len: pitch * rows }, &mut got).unwrap();
            got
        };
        // 2-D memset of the whole of `a`, then 32-bit words in part of `b`.
        let m8 = CuMemsetD2D8V2 { dst_device: a, dst_pitch: pitch, uc: 0x42, width: pitch, height: rows };
        f.api().cu_memset_d2_d8_v2(m8).unwrap();
        f.api().cu_memset_d8_v2(CuMemsetD8V2 { dst_device: b, uc: 0, n: pitch * rows }).unwrap();
        let m32 = CuMemsetD2D32V2 { dst_device: b + pitch + 8, dst_pitch: pitch, ui: 0x0102_0304, width: 3, height: 2 };
        f.api().cu_memset_d2_d32_v2(m32).unwrap();
        let got = whole(&mut f, b);
        for (i, &v) in got.iter().enumerate() {
            let (y, x) = (i as u64 / pitch, i as u64 % pitch);
            let want = if (1..3).contains(&y) && (8..20).contains(&x) { [4, 3, 2, 1][(x % 4) as usize] } else { 0 };
            assert_eq!(v, want, "memset byte ({x}, {y})");
        }
        // Window (pitch 100) to device at (x 8, y 2) of `a`: 10 rows of 90 bytes.
        let pattern: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 1) as u8).collect();
        f.w.write(BulkRef { offset: 0, len: 1000 }, &pattern).unwrap();
        let up = pitched(0, (true, 0, 100), (false, a + 2 * pitch + 8, pitch), 90, 10, 1, 10);
        f.api().memcpy_pitched(up).unwrap();
        let got = whole(&mut f, a);
        for (i, &v) in got.iter().enumerate() {
            let (y, x) = (i as u64 / pitch, i as u64 % pitch);
            let inside = (2..12).contains(&y) && (8..98).contains(&x);
            let want = if inside { pattern[((y - 2) * 100 + x - 8) as usize] } else { 0x42 };
            assert_eq!(v, want, "2-D copy byte ({x}, {y})");
        }
        // Device to device as a volume (2 slices of 4 rows), then back into the window.
        let vol = pitched(2, (false, a + 2 * pitch, pitch), (false, b, pitch), 128, 4, 2, 8);
        f.api().memcpy_pitched_async(vol.into()).unwrap();
        let down = pitched(1, (false, b, pitch), (true, 8 << 10, 128), 128, 16, 1, 16);
        f.api().memcpy_pitched(down).unwrap();
        let mut got = vec![0u8; 128 * 16];
        f.w.read(BulkRef { offset: 8 << 10, len: 128 * 16 }, &mut got).unwrap();
        for y in 0..16u64 {
            let row = &got[(y * 128) as usize..][..128];
            // Rows 0-3 are slice 0 (a's rows 2-5), rows 8-11 slice 1 (a's rows 10-13).
            let from = match y {
                0..=3 => Some(y + 2),
                8..=11 => Some(y + 2),
                _ => None,
            };
            match from {
                Some(r) => {
                    let mut want = [0x42u8; 128];
                    for (x, w) in want.iter_mut().enumerate().skip(8) {
                        if (2..12).contains(&r) && x < 98 {
                            *w = pattern[((r - 2) * 100 + x as u64 - 8) as usize];
                        }
                    }
                    assert_eq!(row, &want[..], "volume row {y}");
                }
                // Rows b kept from before: its memset words in rows 1 and 2, zeros elsewhere.
                None => assert!(
                    row.iter().enumerate().all(|(x, &v)| v
                        == if (1..3).contains(&y) && (8..20).contains(&x) { [4, 3, 2, 1][x % 4] } else { 0 }),
                    "row {y} untouched"
                ),
            }
        }
        // What leaves the zone's memory or the window, or overlaps itself, is refused.
        let bad = CuError::INVALID_VALUE;
        let past = pitched(0, (true, 0, 100), (false, a + pitch * (rows - 1), pitch), 90, 2, 1, 2);
        assert_eq!(f.api().memcpy_pitched(past).map(drop), Err(bad), "a block past its allocation");
        let outside = pitched(0, (true, (64 << 10) - 50, 100), (false, a, pitch), 90, 1, 1, 1);
        assert_eq!(f.api().memcpy_pitched(outside).map(drop), Err(bad), "a block past the window");
        let overlap = pitched(0, (false, a, 64), (false, b, pitch), 90, 2, 1, 2);
        assert_eq!(f.api().memcpy_pitched(overlap).map(drop), Err(bad), "rows that overlap");
        let shape = MemcpyPitched { shape: 3, ..pitched(0, (false, a, pitch), (false, b, pitch), 8, 1, 1, 1) };
        assert_eq!(f.api().memcpy_pitched(shape).map(drop), Err(bad), "an unknown shape");
        let m = CuMemsetD2D8V2 { dst_device: a, dst_pitch: pitch, uc: 1, width: pitch + 1, height: 2 };
        assert_eq!(f.api().cu_memset_d2_d8_v2(m).map(drop), Err(bad), "a memset row wider than its pitch");
        let m = CuMemsetD2D32V2 { dst_device: a + 2, dst_pitch: pitch, ui: 1, width: 1, height: 1 };
        assert_eq!(f.api().cu_memset_d2_d32_v2(m).map(drop), Err(bad), "a misaligned 32-bit memset");
        let m = CuMemsetD2D8V2 { dst_device: a, dst_pitch: pitch, uc: 1, width: 0, height: 5 };
        assert!(f.api().cu_memset_d2_d8_v2(m).is_ok(), "an empty memset does nothing");
        assert_eq!(whole(&mut f, a)[0], 0x42);
    }

    /// A 64 x 32 array of 1-channel floats (surface load/store allowed), and its handle.
    fn float_array(f: &mut Fixture) -> CuResult<Handle> {
        let req = ArrayCreate { width: 64, height: 32, depth: 0, format: 0x20, channels: 1, flags: 0x02 };
        f.api().array_create(req).map(|r| r.array)
    }

    /// A copy request with an array side: `(kind, at, (x, y, z), pitch)` per side.
    fn array_copy(
        src: (u8, u64, (u64, u64, u64), u64),
        dst: (u8, u64, (u64, u64, u64), u64),
        w: u64,
        h: u64,
    ) -> MemcpyPitched {
        MemcpyPitched {
            src_kind: src.0,
            src: src.1,
            src_x: src.2 .0,
            src_y: src.2 .1,
            src_z: src.2 .2,
            src_pitch: src.3,
            dst_kind: dst.0,
            dst: dst.1,
            dst_x: dst.2 .0,
            dst_y: dst.2 .1,
            dst_z: dst.2 .2,
            dst_pitch: dst.3,
            ..pitched(0, (false, 0, 0), (false, 0, 0), w, h, 1, h)
        }
    }

    #[test]
    fn arrays_textures_and_surfaces_are_checked_counted_and_released() {
        let mut f = fixture(Quotas::default(), 64 << 10);
        f.take_window();
        let (used0, objects0) = (f.z.mem_used(), f.z.live_objects());
        let arr = float_array(&mut f).unwrap();
        assert_eq!(f.z.mem_used() - used0, 64 * 32 * 4, "an array is charged its elements' bytes");
        assert_eq!(f.z.live_objects(), objects0 + 1);
        // Window rows (pitch 256) into the array's rows 4-11 from float 8, then the whole
        // array back into the window.
        let pattern: Vec<u8> = (0..8 * 256u32).map(|i| (i * 5 + 3) as u8).collect();
        f.w.write(BulkRef { offset: 0, len: pattern.len() as u64 }, &pattern).unwrap();
        let h = arr.0;
        f.api().memcpy_pitched(array_copy((1, 0, (0, 0, 0), 256), (2, h, (32, 4, 0), 0), 64, 8)).unwrap();
        let whole_back = array_copy((2, h, (0, 0, 0), 0), (1, 16 << 10, (0, 0, 0), 256), 256, 32);
        f.api().memcpy_pitched(whole_back).unwrap();
        let mut got = vec![0u8; 256 * 32];
        f.w.read(BulkRef { offset: 16 << 10, len: 256 * 32 }, &mut got).unwrap();
        for y in 4..12usize {
            assert_eq!(&got[y * 256 + 32..][..64], &pattern[(y - 4) * 256..][..64], "array row {y}");
        }
        // Positions outside the array are refused, as are linear positions and kinds unknown.
        let bad = CuError::INVALID_VALUE;
        let cases = [
            array_copy((1, 0, (0, 0, 0), 256), (2, h, (200, 0, 0), 0), 64, 1),
            array_copy((1, 0, (0, 0, 0), 256), (2, h, (0, 30, 0), 0), 64, 4),
            array_copy((1, 0, (0, 0, 0), 256), (2, h, (0, 0, 1), 0), 64, 1),
            array_copy((1, 0, (4, 0, 0), 256), (2, h, (0, 0, 0), 0), 64, 1),
            array_copy((7, 0, (0, 0, 0), 256), (2, h, (0, 0, 0), 0), 64, 1),
        ];
        for (i, c) in cases.into_iter().enumerate() {
            assert_eq!(f.api().memcpy_pitched(c).map(drop), Err(bad), "case {i}");
        }
        let forged = array_copy((1, 0, (0, 0, 0), 256), (2, h ^ 1, (0, 0, 0), 0), 64, 1);
        assert_eq!(f.api().memcpy_pitched(forged).map(drop), Err(CuError::INVALID_HANDLE));
        // Device memory to and from the array.
        let d = f.alloc(4096).unwrap();
        f.api().cu_memset_d8_v2(CuMemsetD8V2 { dst_device: d, uc: 0x11, n: 4096 }).unwrap();
        f.api().memcpy_pitched(array_copy((0, d, (0, 0, 0), 64), (2, h, (0, 0, 0), 0), 64, 2)).unwrap();
        f.api().memcpy_pitched(array_copy((2, h, (0, 0, 0), 0), (0, d + 1024, (0, 0, 0), 256), 256, 2)).unwrap();
        f.dtoh(d + 1024, 32 << 10, 512).unwrap();
        let mut row = vec![0u8; 512];
        f.w.read(BulkRef { offset: 32 << 10, len: 512 }, &mut row).unwrap();
        assert!(row[..64].iter().all(|&b| b == 0x11) && row[256..320].iter().all(|&b| b == 0x11));
        // Texture objects: of the array, of linear memory inside an allocation; descriptors
        // must have the driver's sizes; linear memory outside the zone's is refused.
        let tex_req = |res_type, array, dptr, size, tex_len| TexObjectCreate {
            res_type,
            array,
            dptr,
            format: 0x20,
            channels: 1,
            width: 0,
            height: 0,
            pitch: 0,
            size,
            res_flags: 0,
            tex_desc: vec![0; tex_len],
            view_desc: Vec::new(),
        };
        let t1 = f.api().tex_object_create(tex_req(0, arr, 0, 0, 104)).unwrap().tex;
        let t2 = f.api().tex_object_create(tex_req(2, Handle(0), d, 4096, 104)).unwrap().tex;
        assert_eq!(f.api().tex_object_create(tex_req(2, Handle(0), d, 4097, 104)).map(drop), Err(bad));
        assert_eq!(f.api().tex_object_create(tex_req(0, arr, 0, 0, 100)).map(drop), Err(bad));
        assert_eq!(f.api().tex_object_create(tex_req(1, arr, 0, 0, 104)).map(drop), Err(CuError::NOT_SUPPORTED));
        let s1 = f.api().surf_object_create(SurfObjectCreate { array: arr }).unwrap().surf;
        assert_eq!(f.z.live_objects(), objects0 + 5, "array, allocation, two textures, a surface");
        f.z.audit().unwrap();
        // A texture is not a surface.
        assert_eq!(f.api().surf_object_destroy(SurfObjectDestroy { surf: t2 }).map(drop), Err(bad));
        f.api().tex_object_destroy(TexObjectDestroy { tex: t2 }).unwrap();
        assert_eq!(f.api().tex_object_destroy(TexObjectDestroy { tex: t2 }).map(drop), Err(bad), "destroyed once");
        // Destroying the array first ends what reads it; their later destruction succeeds.
        f.api().array_destroy(ArrayDestroy { array: arr }).unwrap();
        assert_eq!(f.z.backend().held().array_bytes, 0);
        f.z.audit().unwrap();
        f.api().tex_object_destroy(TexObjectDestroy { tex: t1 }).unwrap();
        f.api().surf_object_destroy(SurfObjectDestroy { surf: s1 }).unwrap();
        assert_eq!(f.z.live_objects(), objects0 + 1, "only the allocation is left");
        assert_eq!(f.api().array_destroy(ArrayDestroy { array: arr }).map(drop), Err(CuError::INVALID_HANDLE));
        // An array made in a context goes with it, with its texture.
        let ctx = f.api().ctx_create(CtxCreate { flags: 0 }).unwrap().ctx;
        let arr = float_array(&mut f).unwrap();
        f.api().tex_object_create(tex_req(0, arr, 0, 0, 104)).unwrap();
        f.api().ctx_destroy(CtxDestroy { ctx }).unwrap();
        assert_eq!(f.z.live_objects(), objects0 + 1);
        assert_eq!(f.z.backend().held().array_bytes, 0);
        assert_eq!(f.z.mem_used() - used0, 4096);
        f.z.audit().unwrap();
        // Without the window taken (Xen), arrays and the window do not mix.
        f.z.window_direct = false;
        let arr = float_array(&mut f).unwrap();
        let up = array_copy((1, 0, (0, 0, 0), 256), (2, arr.0, (0, 0, 0), 0), 64, 1);
        assert_eq!(f.api().memcpy_pitched(up).map(drop), Err(CuError::NOT_SUPPORTED));
        // Shapes the driver would refuse, formats not offered, the memory quota.
        let shape = |width, height, depth, format, channels, flags| ArrayCreate {
            width,
            height,
            depth,
            format,
            channels,
            flags,
        };
        assert_eq!(f.api().array_create(shape(0, 1, 0, 0x20, 1, 0)).map(drop), Err(bad));
        assert_eq!(f.api().array_create(shape(4, 0, 4, 0x20, 1, 0)).map(drop), Err(bad), "depth without height");
        assert_eq!(f.api().array_create(shape(4, 4, 0, 0x20, 3, 0)).map(drop), Err(bad), "3 channels");
        assert_eq!(f.api().array_create(shape(4, 4, 0, 0x91, 1, 0)).map(drop), Err(CuError::NOT_SUPPORTED));
        let huge = shape(1 << 16, 1 << 16, 1 << 10, 0x20, 4, 0);
        assert_eq!(f.api().array_create(huge).map(drop), Err(CuError::OUT_OF_MEMORY));
        f.z.teardown();
        assert_eq!(f.z.backend().held().array_bytes, 0);
        assert_eq!(f.z.backend().held().objects, 0);
    }

    #[test]
    fn links_are_bounded_checked_and_end_with_their_context() {
        let mut f = fixture(Quotas::default(), 64 << 10);
        let objects0 = f.z.live_objects();
        let pair = |o: u32, v: u64| [o.to_le_bytes().as_slice(), v.to_le_bytes().as_slice()].concat();
        // Plain options pass; pointer-valued ones are not offered; malformed ones are refused.
        let state = f.api().link_create(LinkCreate { options: pair(12, 1) }).unwrap().state;
        assert_eq!(f.api().link_create(LinkCreate { options: pair(17, 8) }).map(drop), Err(CuError::NOT_SUPPORTED));
        assert_eq!(f.api().link_create(LinkCreate { options: pair(3, 8) }).map(drop), Err(CuError::NOT_SUPPORTED));
        assert_eq!(f.api().link_create(LinkCreate { options: vec![0; 11] }).map(drop), Err(CuError::INVALID_VALUE));
        assert_eq!(f.api().link_create(LinkCreate { options: pair(99, 0) }).map(drop), Err(CuError::INVALID_VALUE));
        let mut ptx = PTX.as_bytes().to_vec();
        f.w.write(BulkRef { offset: 0, len: ptx.len() as u64 }, &ptx).unwrap();
        let add = |state, input_type, len: u64| LinkAdd {
            state,
            input_type,
            data: BulkRef { offset: 0, len },
            name: "a.ptx".into(),
            options: Vec::new(),
        };
        // PTX without its NUL is taken; a library archive is not offered; an empty or
        // out-of-window input is refused.
        f.api().link_add(add(state, 1, ptx.len() as u64)).unwrap();
        assert_eq!(f.api().link_add(add(state, 4, 16)).map(drop), Err(CuError::NOT_SUPPORTED));
        assert_eq!(f.api().link_add(add(state, 1, 0)).map(drop), Err(CuError::INVALID_VALUE));
        let outside = LinkAdd { data: BulkRef { offset: (64 << 10) - 4, len: 8 }, ..add(state, 1, 8) };
        assert_eq!(f.api().link_add(outside).map(drop), Err(CuError::INVALID_VALUE));
        let early = BulkRef { offset: 8192, len: 1 };
        assert_eq!(f.api().link_image(LinkImage { state, dst: early }).map(drop), Err(CuError::INVALID_VALUE));
        let size = f.api().link_complete(LinkComplete { state }).unwrap().size;
        ptx.push(b'\n');
        ptx.push(0);
        assert_eq!(size, ptx.len() as u64, "the double's image is its inputs' PTX");
        let wrong = BulkRef { offset: 8192, len: size - 1 };
        assert_eq!(f.api().link_image(LinkImage { state, dst: wrong }).map(drop), Err(CuError::INVALID_VALUE));
        let dst = BulkRef { offset: 8192, len: size };
        f.api().link_image(LinkImage { state, dst }).unwrap();
        let mut image = vec![0u8; size as usize];
        f.w.read(dst, &mut image).unwrap();
        assert_eq!(image, ptx);
        let logs = f.api().link_logs(LinkLogs { state }).unwrap();
        assert!(logs.info.contains("1 PTX input"), "{logs:?}");
        assert_eq!(f.z.live_objects(), objects0 + 1);
        f.api().link_destroy(LinkDestroy { state }).unwrap();
        assert_eq!(f.api().link_logs(LinkLogs { state }).map(drop), Err(CuError::INVALID_HANDLE));
        // At most MAX_LINKS at once; a context's links end with it.
        let ctx = f.api().ctx_create(CtxCreate { flags: 0 }).unwrap().ctx;
        for _ in 0..MAX_LINKS {
            f.api().link_create(LinkCreate { options: Vec::new() }).unwrap();
        }
        let more = f.api().link_create(LinkCreate { options: Vec::new() }).map(drop);
        assert_eq!(more, Err(CuError::OUT_OF_MEMORY));
        f.api().ctx_destroy(CtxDestroy { ctx }).unwrap();
        assert_eq!(f.z.live_objects(), objects0);
        f.z.audit().unwrap();
    }

    #[test]
    fn pitched_copies_through_the_window_in_place() {
        pitched_copies_and_memsets(true);
    }

    #[test]
    fn pitched_copies_staged_row_by_row() {
        pitched_copies_and_memsets(false);
    }

    #[test]
    fn copies_round_trip_through_the_window_in_chunks() {
        // Larger than one staging chunk, so the chunked loop runs more than once each way.
        let len = STAGING_CHUNK + 1000;
        let mut f = fixture(Quotas::default(), 2 * len + 4096);
        let a = f.alloc(len as u64).unwrap();
        let b = f.alloc(len as u64).unwrap();
        let data: Vec<u8> = (0..len as u32).map(|i| (i.wrapping_mul(7) ^ (i >> 13)) as u8).collect();
        f.w.write(BulkRef { offset: 0, len: len as u64 }, &data).unwrap();
        f.htod(a, 0, len as u64).unwrap();
        let copy = CuMemcpyDtoDAsyncV2 { dst_device: b, src_device: a, byte_count: len as u64, h_stream: Handle(1) };
        f.api().cu_memcpy_dto_d_async_v2(copy).unwrap();
        let s = f.stream().unwrap();
        f.api().cu_memset_d8_async(CuMemsetD8Async { dst_device: b, uc: 9, n: 10, h_stream: s }).unwrap();
        let out = BulkRef { offset: len as u64 + 4096, len: len as u64 };
        f.dtoh(b, out.offset, out.len).unwrap();
        let mut got = vec![0u8; len];
        f.w.read(out, &mut got).unwrap();
        assert_eq!(&got[..10], &[9; 10]);
        assert!(got[10..] == data[10..]);
    }

    #[test]
    fn stale_forged_and_foreign_kind_handles_are_refused() {
        let mut f = fixture(Quotas::default(), 4096);
        let s = f.stream().unwrap();
        let e = f.api().cu_event_create(CuEventCreate { flags: 0 }).unwrap().ph_event;
        assert!(s.0 > 2 && e.0 > 2 && f.z.primary_context().0 > 2, "no handle is a default-stream value");
        assert_eq!(f.api().cu_event_query(CuEventQuery { h_event: s }), Err(CuError::INVALID_HANDLE));
        assert_eq!(f.api().cu_stream_query(CuStreamQuery { h_stream: e }), Err(CuError::INVALID_HANDLE));
        let wait = CuStreamWaitEvent { h_stream: s, h_event: e, flags: 0 };
        f.api().cu_stream_wait_event(wait).unwrap();
        f.api().cu_stream_destroy_v2(CuStreamDestroyV2 { h_stream: s }).unwrap();
        let forged = Handle(s.0 ^ (1 << 40));
        for h in [s, forged, Handle(0xdead_beef_0000_0001), e] {
            let r = f.api().cu_stream_synchronize(CuStreamSynchronize { h_stream: h });
            assert_eq!(r, Err(CuError::INVALID_HANDLE), "{h:?}");
        }
        assert_eq!(
            f.api().cu_stream_destroy_v2(CuStreamDestroyV2 { h_stream: Handle(0) }),
            Err(CuError::INVALID_HANDLE)
        );
        // Contexts answer CUDA's INVALID_CONTEXT instead.
        let r = f.api().ctx_set_current(CtxSetCurrent { ctx: e });
        assert_eq!(r, Err(CuError::INVALID_CONTEXT));
        let r = f.api().cu_ctx_get_api_version(CuCtxGetApiVersion { ctx: s });
        assert_eq!(r.map(|_| ()), Err(CuError::INVALID_CONTEXT));
    }

    #[test]
    fn destroying_a_context_drops_everything_made_in_it() {
        let mut f = fixture(Quotas::default(), 4096);
        let primary = f.z.primary_context();
        let keep = f.alloc(1000).unwrap();
        let keep_stream = f.stream().unwrap();
        let free0 = f.free_bytes();
        let ctx = f.api().ctx_create(CtxCreate { flags: 0 }).unwrap().ctx;
        assert_eq!(f.z.current_context(), ctx);
        assert_eq!(f.api().cu_ctx_get_id(CuCtxGetId { ctx: Handle(0) }).unwrap().ctx_id, ctx.0);
        let a = f.alloc(4096).unwrap();
        let s = f.stream().unwrap();
        let e = f.api().cu_event_create(CuEventCreate { flags: 0 }).unwrap().ph_event;
        let hmod = f.load(false).unwrap();
        let func = f.function(hmod).unwrap();
        let lib = f.load(true).unwrap();
        let name = "fill_u32".to_owned();
        let kernel = f.api().cu_library_get_kernel(CuLibraryGetKernel { library: lib, name }).unwrap().p_kernel;
        let g = f.api().cu_module_get_global_v2(CuModuleGetGlobalV2 { hmod, name: "counter".into() }).unwrap();
        assert_eq!(f.api().cu_stream_get_ctx(CuStreamGetCtx { h_stream: s }).unwrap().pctx, ctx);
        assert_eq!(
            f.api().pointer_get_attribute(PointerGetAttribute { attribute: 1, ptr: g.dptr }).unwrap().value,
            ctx.0
        );
        // (Module globals take backend memory too, but not the zone's quota.)
        assert!(f.free_bytes() <= free0 - 4096);
        assert_eq!(f.z.mem_used(), 1000 + 4096);

        assert_eq!(f.api().ctx_destroy(CtxDestroy { ctx: primary }), Err(CuError::INVALID_CONTEXT));
        f.api().ctx_destroy(CtxDestroy { ctx }).unwrap();
        assert_eq!(f.z.current_context(), primary);
        assert_eq!(f.z.mem_used(), 1000);
        // The primary context's allocation and stream are left, and the library and its
        // kernel, which belong to no context.
        assert_eq!(f.z.live_objects(), 4);
        assert_eq!(f.dtoh(a, 0, 16), Err(CuError::INVALID_VALUE));
        assert_eq!(f.htod(g.dptr, 0, 4), Err(CuError::INVALID_VALUE), "the module's global went with it");
        assert_eq!(f.api().cu_stream_query(CuStreamQuery { h_stream: s }), Err(CuError::INVALID_HANDLE));
        assert_eq!(f.api().cu_event_query(CuEventQuery { h_event: e }), Err(CuError::INVALID_HANDLE));
        assert_eq!(f.api().func_param_layout(FuncParamLayout { func }).map(|_| ()), Err(CuError::INVALID_HANDLE));
        f.api().cu_kernel_get_attribute(CuKernelGetAttribute { attrib: 0, kernel, dev: 0 }).unwrap();
        f.api().cu_library_unload(CuLibraryUnload { library: lib }).unwrap();
        assert_eq!(f.free_bytes(), free0, "the backend got the context's memory back");
        assert_eq!(f.api().ctx_destroy(CtxDestroy { ctx }), Err(CuError::INVALID_CONTEXT));
        // The primary context's objects live on.
        f.dtoh(keep, 0, 1000).unwrap();
        f.api().cu_stream_synchronize(CuStreamSynchronize { h_stream: keep_stream }).unwrap();
    }

    #[test]
    fn resetting_the_primary_context_keeps_the_current_one() {
        let mut f = fixture(Quotas::default(), 4096);
        let primary = f.z.primary_context();
        let free0 = f.free_bytes();
        let in_primary = f.alloc(4096).unwrap();
        let primary_stream = f.stream().unwrap();
        let hmod = f.load(false).unwrap();
        let ctx = f.api().ctx_create(CtxCreate { flags: 0 }).unwrap().ctx;
        let in_ctx = f.alloc(512).unwrap();
        f.api().primary_ctx_reset(PrimaryCtxReset {}).unwrap();
        assert_eq!(f.z.current_context(), ctx);
        assert_eq!(f.free_bytes(), free0 - 512);
        assert_eq!(f.dtoh(in_primary, 0, 8), Err(CuError::INVALID_VALUE));
        f.dtoh(in_ctx, 0, 8).unwrap();
        let q = CuStreamQuery { h_stream: primary_stream };
        assert_eq!(f.api().cu_stream_query(q), Err(CuError::INVALID_HANDLE));
        assert_eq!(f.function(hmod), Err(CuError::INVALID_HANDLE));
        // The primary context itself is still there.
        f.api().ctx_set_current(CtxSetCurrent { ctx: primary }).unwrap();
        f.alloc(8).unwrap();
    }

    #[test]
    fn libraries_kernels_and_views() {
        let mut f = fixture(Quotas::default(), 4096);
        let lib = f.load(true).unwrap();
        let name = || "fill_u32".to_owned();
        let kernel = f.api().cu_library_get_kernel(CuLibraryGetKernel { library: lib, name: name() }).unwrap().p_kernel;
        let view = f.api().cu_library_get_module(CuLibraryGetModule { library: lib }).unwrap().p_mod;
        assert_eq!(f.api().cu_library_get_module(CuLibraryGetModule { library: lib }).unwrap().p_mod, view);
        let from_view = f.function(view).unwrap();
        let from_kernel = f.api().cu_kernel_get_function(CuKernelGetFunction { kernel }).unwrap().p_func;
        // Kinds: a library is not a module, a function is not a kernel.
        assert_eq!(f.function(lib), Err(CuError::INVALID_HANDLE));
        assert_eq!(f.api().cu_module_unload(CuModuleUnload { hmod: lib }), Err(CuError::INVALID_HANDLE));
        assert_eq!(f.api().cu_library_unload(CuLibraryUnload { library: view }), Err(CuError::INVALID_HANDLE));
        let attr = |kernel, dev| CuKernelGetAttribute { attrib: 0, kernel, dev };
        assert_eq!(f.api().cu_kernel_get_attribute(attr(from_kernel, 0)).map(|_| ()), Err(CuError::INVALID_HANDLE));
        assert_eq!(f.api().cu_kernel_get_attribute(attr(kernel, 1)).map(|_| ()), Err(CuError::INVALID_DEVICE));
        let set = CuKernelSetAttribute { attrib: 0, val: 0, kernel, dev: -1 };
        assert_eq!(f.api().cu_kernel_set_attribute(set), Err(CuError::INVALID_DEVICE));
        f.api().cu_kernel_get_attribute(attr(kernel, 0)).unwrap();
        // A kernel launches like a function.
        let p = f.alloc(64).unwrap();
        let launch = Launch { func: kernel, config: config(16), stream: Handle(0), params: fill_params(p, 3, 16) };
        f.api().launch(launch).unwrap();
        f.dtoh(p, 0, 64).unwrap();
        let mut out = [0u8; 64];
        f.w.read(BulkRef { offset: 0, len: 64 }, &mut out).unwrap();
        assert!(out.chunks(4).all(|w| w == 3u32.to_le_bytes()));
        // A library global is reachable; forgetting the view keeps the library's objects.
        let g = f.api().cu_library_get_global(CuLibraryGetGlobal { library: lib, name: "counter".into() }).unwrap();
        assert_eq!(g.bytes, 16);
        f.htod(g.dptr, 0, 16).unwrap();
        f.api().cu_module_unload(CuModuleUnload { hmod: view }).unwrap();
        f.api().func_param_layout(FuncParamLayout { func: from_view }).unwrap();
        f.htod(g.dptr, 0, 16).unwrap();
        // Unloading the library ends kernels, their functions and its globals.
        f.api().cu_library_unload(CuLibraryUnload { library: lib }).unwrap();
        for func in [kernel, from_view, from_kernel] {
            let r = f.api().func_param_layout(FuncParamLayout { func });
            assert_eq!(r.map(|_| ()), Err(CuError::INVALID_HANDLE), "{func:?}");
        }
        assert_eq!(f.htod(g.dptr, 0, 4), Err(CuError::INVALID_VALUE));
        assert_eq!(f.z.live_objects(), 1, "only the allocation is left");
    }

    #[test]
    fn launches_are_checked_against_the_parameter_layout() {
        let mut f = fixture(Quotas::default(), 4096);
        let hmod = f.load(false).unwrap();
        let func = f.function(hmod).unwrap();
        let slots = f.api().func_param_layout(FuncParamLayout { func }).unwrap().slots;
        assert_eq!(
            slots,
            vec![ParamSlot { offset: 0, size: 8 }, ParamSlot { offset: 8, size: 4 }, ParamSlot { offset: 16, size: 8 }]
        );
        let p = f.alloc(64).unwrap();
        let params = fill_params(p, 7, 16);
        let launch = |params: Vec<u8>, config: LaunchConfig| Launch { func, config, stream: Handle(0), params };
        for short in [0, 8, 23] {
            let r = f.api().launch(launch(params[..short].to_vec(), config(16)));
            assert_eq!(r, Err(CuError::INVALID_VALUE), "{short} bytes");
        }
        for bad in [[0, 1, 1], [1, 0, 1], [1, 1, 0]] {
            let r = f.api().launch(launch(params.clone(), LaunchConfig { grid: bad, ..config(16) }));
            assert_eq!(r, Err(CuError::INVALID_VALUE), "grid {bad:?}");
            let r = f.api().launch(launch(params.clone(), LaunchConfig { block: bad, ..config(16) }));
            assert_eq!(r, Err(CuError::INVALID_VALUE), "block {bad:?}");
        }
        let on_module = Launch { func: hmod, config: config(16), stream: Handle(0), params: params.clone() };
        assert_eq!(f.api().launch(on_module), Err(CuError::INVALID_HANDLE));
        let on_forged_stream =
            Launch { func, config: config(16), stream: Handle(3 << 56 | 1 << 32 | 1), params: params.clone() };
        assert_eq!(f.api().launch(on_forged_stream), Err(CuError::INVALID_HANDLE));
        // Longer buffers are fine (the guest may pad); the kernel runs.
        let mut padded = params.clone();
        padded.extend_from_slice(&[0xff; 8]);
        f.api().launch(launch(padded, config(16))).unwrap();
        f.dtoh(p, 0, 64).unwrap();
        let mut out = [0u8; 64];
        f.w.read(BulkRef { offset: 0, len: 64 }, &mut out).unwrap();
        assert!(out.chunks(4).all(|w| w == 7u32.to_le_bytes()));
    }

    #[test]
    fn names_and_images_are_bounded() {
        let mut f = fixture(Quotas::default(), 4096);
        let hmod = f.load(false).unwrap();
        for name in ["fill\0u32".to_owned(), "f".repeat(MAX_NAME_BYTES + 1)] {
            let r = f.api().cu_module_get_function(CuModuleGetFunction { hmod, name });
            assert_eq!(r.map(|_| ()), Err(CuError::INVALID_VALUE));
        }
        let r = f.api().cu_module_get_function(CuModuleGetFunction { hmod, name: "f".repeat(MAX_NAME_BYTES) });
        assert_eq!(r.map(|_| ()), Err(CuError::NOT_FOUND), "a long but legal name reaches the driver");
        for image in
            [BulkRef { offset: 0, len: 0 }, BulkRef { offset: 4000, len: 100 }, BulkRef { offset: u64::MAX, len: 2 }]
        {
            let r = f.api().module_load(ModuleLoad { image, library: false });
            assert_eq!(r.map(|_| ()), Err(CuError::INVALID_VALUE), "{image:?}");
        }
    }

    #[test]
    fn pointer_attributes_and_address_ranges_come_from_the_tables() {
        let mut f = fixture(Quotas::default(), 4096);
        let a = f.alloc(1000).unwrap();
        let b = f.alloc(1000).unwrap();
        let attr = |f: &mut Fixture, attribute, ptr| {
            f.api().pointer_get_attribute(PointerGetAttribute { attribute, ptr }).map(|r| r.value)
        };
        assert_eq!(attr(&mut f, ptr_attr::RANGE_START_ADDR, a + 999), Ok(a));
        assert_eq!(attr(&mut f, ptr_attr::RANGE_SIZE, a + 1), Ok(1000));
        assert_eq!(attr(&mut f, ptr_attr::CONTEXT, a), Ok(f.z.primary_context().0));
        assert_eq!(attr(&mut f, ptr_attr::DEVICE_POINTER, a + 5), Ok(a + 5));
        assert_eq!(attr(&mut f, ptr_attr::MEMORY_TYPE, a), Ok(MEMORYTYPE_DEVICE));
        assert_eq!(attr(&mut f, ptr_attr::HOST_POINTER, a), Err(CuError::INVALID_VALUE));
        assert_eq!(attr(&mut f, 5, a), Err(CuError::INVALID_VALUE));
        assert_ne!(attr(&mut f, ptr_attr::BUFFER_ID, a), attr(&mut f, ptr_attr::BUFFER_ID, b));
        // The simulated GPU aligns allocations to 512 bytes: a + 1000 lies between the two.
        assert_eq!(attr(&mut f, ptr_attr::RANGE_START_ADDR, a + 1000), Err(CuError::INVALID_VALUE));
        assert_eq!(attr(&mut f, ptr_attr::CONTEXT, 0), Err(CuError::INVALID_VALUE));
        let r = f.api().cu_mem_get_address_range_v2(CuMemGetAddressRangeV2 { dptr: b + 10 }).unwrap();
        assert_eq!((r.pbase, r.psize), (b, 1000));
        let r = f.api().cu_mem_get_address_range_v2(CuMemGetAddressRangeV2 { dptr: 0x10 });
        assert_eq!(r.map(|_| ()), Err(CuError::NOT_FOUND));
    }

    #[test]
    fn teardown_releases_everything_through_the_backend() {
        let mut f = fixture(Quotas::default(), 4096);
        let free0 = f.free_bytes();
        f.alloc(4096).unwrap();
        f.stream().unwrap();
        f.load(false).unwrap();
        f.api().ctx_create(CtxCreate { flags: 0 }).unwrap();
        f.alloc(8192).unwrap();
        f.load(true).unwrap();
        f.z.teardown();
        assert_eq!((f.z.mem_used(), f.z.live_objects()), (0, 0));
        assert_eq!(f.z.current_context(), f.z.primary_context());
        assert_eq!(f.free_bytes(), free0, "the backend got every byte back");
        // The zone is still usable (a session may go on after a reset).
        f.alloc(16).unwrap();
    }

    /// A small xorshift generator (deterministic: a failing seed can be replayed).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        /// One of `pool`, or (one time in four) a forged neighbour of one, or a wild value.
        fn pick(&mut self, pool: &[u64]) -> u64 {
            match (self.below(8), pool.is_empty()) {
                (0, _) | (_, true) => self.next(),
                (1, false) => pool[self.below(pool.len() as u64) as usize] ^ (1 << self.below(64)),
                (2, false) => pool[self.below(pool.len() as u64) as usize].wrapping_add(self.below(1 << 22)),
                _ => pool[self.below(pool.len() as u64) as usize],
            }
        }
    }

    /// The zone's accounting after any sequence: memory used is the live allocations' and
    /// physical allocations' bytes; no two ranges overlap; mappings lie in reservations.
    fn check_invariants(z: &Zone<SimGpu>) {
        let allocs: u64 = z.ranges.values().filter(|r| r.owner == Owner::Alloc).map(|r| r.size).sum();
        let phys: u64 = z.phys.iter().map(|(_, e)| e.size_for_test()).sum();
        assert_eq!(z.mem_used, allocs + phys, "memory accounting");
        assert!(z.mem_used <= z.quotas.mem_bytes, "within the quota");
        assert!(z.usage().mem_bytes <= z.quotas.mem_bytes, "what is charged (the free cache too) within the quota");
        let mut end = 0;
        for (&s, r) in &z.ranges {
            assert!(s >= end, "ranges overlap at {s:#x}");
            end = s + r.size;
            if matches!(r.owner, Owner::Mapped(_)) {
                let (&rs, &rl) = z.reservations.range(..=s).next_back().expect("a mapping's reservation");
                assert!(s + r.size <= rs + rl, "a mapping inside its reservation");
            }
        }
        assert!(z.live_objects() <= u64::from(z.quotas.max_handles), "within the handle quota");
        assert!(z.reservations.len() <= MAX_RESERVATIONS);
    }

    /// Hostile sequences of well-formed requests over memory, virtual memory, graphs and
    /// capture — handles and addresses drawn from what earlier requests returned (by kind),
    /// their neighbours and wild values — never panic, keep the zone's accounting exact, and
    /// give the backend every byte back at teardown.
    #[test]
    fn hostile_request_sequences_keep_the_zone_consistent() {
        const KINDS: usize = 8;
        let (alloc, resv, phys, graph, exec, stream, node, func) = (0, 1, 2, 3, 4, 5, 6, 7);
        let g = 2u64 << 20;
        let mut ok = [0u32; 19];
        for seed in 1..=64u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut f = fixture(Quotas { mem_bytes: 16 * g, max_handles: 64, ..Quotas::default() }, 1 << 16);
            let free0 = f.free_bytes();
            let mut pool: [Vec<u64>; KINDS] = Default::default();
            let mut mapped: Vec<(u64, u64)> = Vec::new();
            let module = f.load(false).unwrap();
            let fill = f.api().cu_module_get_function(CuModuleGetFunction { hmod: module, name: "fill_u32".into() });
            pool[func].push(fill.unwrap().hfunc.0);
            for _ in 0..400 {
                let pick = |k: usize, rng: &mut Rng| rng.pick(&pool[k]);
                let (a, r0) = (pick(alloc, &mut rng), pick(resv, &mut rng));
                let (ph, gr, ex, st, nd, fu) = (
                    Handle(pick(phys, &mut rng)),
                    Handle(pick(graph, &mut rng)),
                    Handle(pick(exec, &mut rng)),
                    Handle(pick(stream, &mut rng)),
                    pick(node, &mut rng),
                    Handle(pick(func, &mut rng)),
                );
                let size = [16, 4096, g, 2 * g, rng.below(1 << 24)][rng.below(5) as usize];
                let at = r0.wrapping_add(g * rng.below(4));
                let (mp, ms) = match mapped.len() {
                    0 => (at, g),
                    n => mapped[rng.below(n as u64) as usize],
                };
                let op = rng.below(19);
                let mut api = f.api();
                let r: Result<Option<(usize, u64)>, CuError> = match op {
                    0 => api.cu_mem_alloc_v2(CuMemAllocV2 { bytesize: size.min(g) }).map(|r| Some((alloc, r.dptr))),
                    1 => api.cu_mem_free_v2(CuMemFreeV2 { dptr: a }).map(|_| None),
                    2 => {
                        api.cu_memset_d32_v2(CuMemsetD32V2 { dst_device: mp, ui: 7, n: size.min(ms) / 4 }).map(|_| None)
                    }
                    3 => api
                        .mem_address_reserve(MemAddressReserve { size: 4 * g, alignment: 0, addr: 0 })
                        .map(|r| Some((resv, r.ptr))),
                    4 => api
                        .mem_create(MemCreate {
                            size: [g, 2 * g, size][rng.below(3) as usize],
                            handle_types: 0,
                            rdma: false,
                        })
                        .map(|r| Some((phys, r.handle.0))),
                    5 => {
                        let len = [g, 2 * g][rng.below(2) as usize];
                        api.mem_map(MemMap { ptr: at, size: len, offset: 0, handle: ph }).map(|_| {
                            mapped.push((at, len));
                            None
                        })
                    }
                    6 => {
                        let (ptr, len) = if rng.below(4) == 0 { (at, g) } else { (mp, ms) };
                        api.mem_unmap(MemUnmap { ptr, size: len }).map(|_| {
                            mapped.retain(|&(p, _)| p != ptr);
                            None
                        })
                    }
                    7 => api.mem_release(MemRelease { handle: ph }).map(|_| None),
                    8 => api.mem_address_free(MemAddressFree { ptr: r0, size: 4 * g }).map(|_| None),
                    9 => api.mem_set_access(MemSetAccess { ptr: mp, size: ms, flags: 3 }).map(|_| None),
                    10 => api.cu_graph_create(CuGraphCreate { flags: 0 }).map(|r| Some((graph, r.ph_graph.0))),
                    11 => {
                        let deps = if rng.below(2) == 0 { Vec::new() } else { nd.to_le_bytes().to_vec() };
                        let width = [4, 1024, size][rng.below(3) as usize];
                        let m = GraphAddMemsetNode {
                            graph: gr,
                            deps,
                            dst: a,
                            pitch: 0,
                            value: 1,
                            element_size: 4,
                            width,
                            height: 1,
                        };
                        api.graph_add_memset_node(m).map(|r| Some((node, r.node.0)))
                    }
                    12 => {
                        let params = fill_params(a, 3, 4);
                        let k =
                            GraphAddKernelNode { graph: gr, deps: Vec::new(), func: fu, config: config(32), params };
                        api.graph_add_kernel_node(k).map(|r| Some((node, r.node.0)))
                    }
                    13 => api
                        .cu_graph_instantiate_with_flags(CuGraphInstantiateWithFlags { h_graph: gr, flags: 0 })
                        .map(|r| Some((exec, r.ph_graph_exec.0))),
                    14 => api.cu_graph_launch(CuGraphLaunch { h_graph_exec: ex, h_stream: st }).map(|_| None),
                    15 => api.cu_graph_destroy(CuGraphDestroy { h_graph: gr }).map(|_| None),
                    16 => api.cu_stream_create(CuStreamCreate { flags: 0 }).map(|r| Some((stream, r.ph_stream.0))),
                    17 => api.stream_begin_capture(StreamBeginCapture { stream: st, mode: 0 }).map(|_| None),
                    _ => api.stream_end_capture(StreamEndCapture { stream: st }).map(|r| Some((graph, r.graph.0))),
                };
                if let Ok(made) = r {
                    ok[op as usize] += 1;
                    if let Some((k, v)) = made {
                        pool[k].push(v);
                    }
                }
                check_invariants(&f.z);
            }
            f.z.teardown();
            assert_eq!((f.z.mem_used(), f.z.live_objects()), (0, 0), "seed {seed}: everything released");
            assert_eq!(f.free_bytes(), free0, "seed {seed}: the backend got every byte back");
        }
        // Each kind of request succeeded at times (the sequences reach past the checks).
        assert!(ok.iter().all(|&n| n > 0), "successes by kind: {ok:?}");
        eprintln!("successes by kind: {ok:?}");
    }

    #[test]
    fn freed_memory_is_reused_by_the_same_zone_and_returned_on_teardown() {
        let mut f = fixture(Quotas::default(), 4096);
        let free0 = f.free_bytes();
        let a = f.alloc(1 << 20).unwrap();
        f.api().cu_mem_free_v2(CuMemFreeV2 { dptr: a }).unwrap();
        assert_eq!(f.z.mem_used(), 0, "cached memory is no allocation of the guest's");
        assert_eq!(f.z.usage().mem_bytes, 1 << 20, "but it is charged to the zone: the driver holds it");
        assert_eq!(f.htod(a, 0, 16), Err(CuError::INVALID_VALUE), "freed memory is out of reach");
        assert_eq!(f.api().cu_mem_free_v2(CuMemFreeV2 { dptr: a }), Err(CuError::INVALID_VALUE), "double free");
        assert_eq!(f.alloc(1 << 20).unwrap(), a, "the same zone gets its own freed block back");
        let b = f.alloc(1 << 20).unwrap();
        assert_ne!(a, b);
        f.api().cu_mem_free_v2(CuMemFreeV2 { dptr: a }).unwrap();
        f.api().cu_mem_free_v2(CuMemFreeV2 { dptr: b }).unwrap();
        // Blocks above the per-entry bound go straight back to the backend.
        let big = f.alloc(FREE_CACHE_ENTRY_MAX + 1).unwrap();
        f.api().cu_mem_free_v2(CuMemFreeV2 { dptr: big }).unwrap();
        f.z.teardown();
        assert_eq!(f.free_bytes(), free0, "the cache went back to the backend (scrubbed there)");
    }

    #[test]
    fn the_free_cache_gives_way_when_the_zone_is_short() {
        let mut f = fixture(Quotas { mem_bytes: 3 << 20, ..Quotas::default() }, 4096);
        let free0 = f.free_bytes();
        let a = f.alloc(1 << 20).unwrap();
        let b = f.alloc(1 << 20).unwrap();
        for p in [a, b] {
            f.api().cu_mem_free_v2(CuMemFreeV2 { dptr: p }).unwrap();
        }
        assert_eq!(f.z.usage().mem_bytes, 2 << 20, "both cached, both charged");
        // 3 MiB fits the quota only once the cache has gone back to the backend.
        f.alloc(3 << 20).unwrap();
        assert_eq!((f.z.usage().mem_bytes, f.z.cached_bytes), (3 << 20, 0));
        assert_eq!(f.alloc(1), Err(CuError::OUT_OF_MEMORY));
        f.z.teardown();
        assert_eq!(f.free_bytes(), free0);
    }

    #[test]
    fn contexts_and_the_limits_that_size_their_memory_are_charged() {
        let mib = 1u64 << 20;
        let q = Quotas { mem_bytes: 1024 * mib, context_mem_bytes: Some(100 * mib), ..Quotas::default() };
        let mut f = fixture(q, 4096);
        assert_eq!(f.z.usage().mem_bytes, 100 * mib, "the primary context");
        let ctx = f.api().ctx_create(CtxCreate { flags: 0 }).unwrap().ctx;
        assert_eq!(f.z.usage().mem_bytes, 200 * mib, "and a created one");
        // The stack size is reserved for every thread the device holds (132 × 2048 on the
        // double, as on an H200): 1 KiB more per thread is 264 MiB more.
        let stack = f.api().cu_ctx_get_limit(CuCtxGetLimit { limit: 0 }).unwrap().pvalue;
        f.api().cu_ctx_set_limit(CuCtxSetLimit { limit: 0, value: stack + 1024 }).unwrap();
        assert_eq!(f.z.usage().mem_bytes, 200 * mib + 132 * 2048 * 1024);
        // The device heap, byte for byte; more than the quota is refused and nothing changes.
        let heap = f.api().cu_ctx_get_limit(CuCtxGetLimit { limit: 2 }).unwrap().pvalue;
        let r = f.api().cu_ctx_set_limit(CuCtxSetLimit { limit: 2, value: heap + 1024 * mib });
        assert_eq!(r, Err(CuError::OUT_OF_MEMORY));
        assert_eq!(f.api().cu_ctx_get_limit(CuCtxGetLimit { limit: 2 }).unwrap().pvalue, heap);
        f.api().cu_ctx_set_limit(CuCtxSetLimit { limit: 2, value: heap + 10 * mib }).unwrap();
        // Lowering it again gives the charge back.
        f.api().cu_ctx_set_limit(CuCtxSetLimit { limit: 2, value: heap }).unwrap();
        f.api().cu_ctx_set_limit(CuCtxSetLimit { limit: 0, value: stack }).unwrap();
        assert_eq!(f.z.usage().mem_bytes, 200 * mib);
        f.api().cu_ctx_set_limit(CuCtxSetLimit { limit: 1, value: 64 * mib }).unwrap();
        f.api().ctx_destroy(CtxDestroy { ctx }).unwrap();
        assert_eq!(f.z.usage().mem_bytes, 100 * mib, "a destroyed context's charges go with it");
    }

    #[test]
    fn posted_requests_are_throttled() {
        let mut f = fixture(Quotas { max_async_in_flight: 3, ..Quotas::default() }, 4096);
        for _ in 0..10 {
            f.z.note_posted().unwrap();
            assert!(f.z.async_since_sync < 3);
        }
    }

    // ---- IPC ----

    use crate::broker::test_utils::{depart, Hub, LocalBroker};
    use crate::broker::{guest_handle, Peer, HANDLE_LEN};
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A zone of connection `conn` (zone name `zone`, uid 1000) on the hub's broker.
    fn ipc_fixture(hub: &Rc<RefCell<Hub>>, conn: u32, zone: &str) -> Fixture {
        let mut f = fixture(Quotas { max_handles: 8, ..Quotas::default() }, 8192);
        f.z.set_broker(Box::new(LocalBroker::join(
            hub,
            Peer { conn, zone: zone.into(), uid: 1000, groups: Vec::new() },
        )));
        f
    }

    impl Fixture {
        fn export(&mut self, dptr: u64) -> CuResult<Vec<u8>> {
            self.api().ipc_get_mem_handle(IpcGetMemHandle { dptr }).map(|r| r.handle)
        }
        fn open(&mut self, handle: &[u8], flags: u32) -> CuResult<u64> {
            // As the worker does before each request.
            self.z.poll_ipc();
            self.api().ipc_open_mem_handle(IpcOpenMemHandle { handle: handle.to_vec(), flags }).map(|r| r.dptr)
        }
        fn close(&mut self, dptr: u64) -> CuResult<Done> {
            self.z.poll_ipc();
            self.api().ipc_close_mem_handle(IpcCloseMemHandle { dptr })
        }
        fn put(&mut self, dptr: u64, data: &[u8]) -> CuResult<Done> {
            self.z.poll_ipc();
            self.w.write(BulkRef { offset: 0, len: data.len() as u64 }, data).unwrap();
            self.htod(dptr, 0, data.len() as u64)
        }
        fn get(&mut self, dptr: u64, len: usize) -> CuResult<Vec<u8>> {
            self.z.poll_ipc();
            self.dtoh(dptr, 0, len as u64)?;
            let mut out = vec![0u8; len];
            self.w.read(BulkRef { offset: 0, len: len as u64 }, &mut out).unwrap();
            Ok(out)
        }
    }

    #[test]
    fn ipc_shares_an_allocation_between_workers_of_one_zone() {
        let hub = Rc::new(RefCell::new(Hub::default()));
        let mut a = ipc_fixture(&hub, 1, "tenant");
        let mut b = ipc_fixture(&hub, 2, "tenant");
        let mut other = ipc_fixture(&hub, 3, "other-tenant");
        let p = a.alloc(1000).unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| (42 + i) as u8).collect();
        a.put(p, &data).unwrap();
        let h = a.export(p).unwrap();
        assert_eq!(h.len(), HANDLE_LEN);
        assert_eq!(a.export(p).unwrap(), h, "exporting again gives the same handle");
        // Only the start of one of the zone's own allocations can be exported.
        let hmod = a.load(false).unwrap();
        let g = a.api().cu_module_get_global_v2(CuModuleGetGlobalV2 { hmod, name: "counter".into() }).unwrap();
        for bad in [p + 8, 0x10, g.dptr] {
            assert_eq!(a.export(bad), Err(CuError::INVALID_VALUE), "{bad:#x}");
        }
        assert_eq!(a.open(&h, 1), Err(CuError::INVALID_CONTEXT), "not in the exporting worker");
        assert_eq!(other.open(&h, 1), Err(CuError::NOT_PERMITTED), "not from another zone");
        for flags in [0, 2] {
            assert_eq!(b.open(&h, flags), Err(CuError::INVALID_VALUE), "the driver takes exactly flag 1");
        }
        let mut forged = h.clone();
        forged[10] ^= 0x40;
        for bad in [&forged[..], &h[..32], &[0u8; 64], &guest_handle(&[0x77; 16])] {
            assert_eq!(b.open(bad, 1), Err(CuError::INVALID_VALUE));
        }

        let q = b.open(&h, 1).unwrap();
        assert_eq!(b.get(q, 1000).unwrap(), data);
        let fresh: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        b.put(q, &fresh).unwrap();
        assert_eq!(a.get(p, 1000).unwrap(), fresh, "the exporter sees the importer's writes");
        // The imported range is checked like an allocation, counts as a handle, not memory.
        assert_eq!(b.get(q + 1, 1000), Err(CuError::INVALID_VALUE));
        assert_eq!(b.get(q.wrapping_sub(1), 2), Err(CuError::INVALID_VALUE));
        b.api().cu_memset_d8_v2(CuMemsetD8V2 { dst_device: q + 990, uc: 9, n: 10 }).unwrap();
        assert_eq!(a.get(p + 990, 10).unwrap(), vec![9; 10]);
        let attr = PointerGetAttribute { attribute: ptr_attr::RANGE_SIZE, ptr: q + 5 };
        assert_eq!(b.api().pointer_get_attribute(attr).unwrap().value, 1000);
        assert_eq!((b.z.mem_used(), b.z.live_objects()), (0, 1));
        assert_eq!(b.api().cu_mem_free_v2(CuMemFreeV2 { dptr: q }), Err(CuError::INVALID_VALUE), "not freeable");
        assert_eq!(a.close(p), Err(CuError::INVALID_VALUE), "an allocation is not an import");
        // Opening again in the same context: the same address, one more reference.
        assert_eq!(b.open(&h, 1), Ok(q));
        b.close(q).unwrap();
        assert_eq!(b.get(q, 4).unwrap(), fresh[..4]);
        b.close(q).unwrap();
        assert_eq!(b.get(q, 4), Err(CuError::INVALID_VALUE), "closed");
        assert_eq!(b.close(q), Err(CuError::INVALID_VALUE), "closed twice");
        assert_eq!(b.z.live_objects(), 0);
        // Opened again after closing: a fresh mapping of the same memory.
        let q = b.open(&h, 1).unwrap();
        assert_eq!(b.get(q, 1000).unwrap(), a.get(p, 1000).unwrap());
    }

    #[test]
    fn freeing_an_export_revokes_it_and_importers_lose_the_range() {
        let hub = Rc::new(RefCell::new(Hub::default()));
        let mut a = ipc_fixture(&hub, 1, "t");
        let mut b = ipc_fixture(&hub, 2, "t");
        let p = a.alloc(512).unwrap();
        a.put(p, &[5; 512]).unwrap();
        let h = a.export(p).unwrap();
        let q = b.open(&h, 1).unwrap();
        assert_eq!(b.get(q, 512).unwrap(), vec![5; 512]);
        a.api().cu_mem_free_v2(CuMemFreeV2 { dptr: p }).unwrap();
        assert_eq!(b.get(q, 512), Err(CuError::INVALID_VALUE), "revoked: errors, not memory");
        assert_eq!(b.put(q, &[1]), Err(CuError::INVALID_VALUE));
        assert_eq!(b.open(&h, 1), Err(CuError::INVALID_VALUE), "a replayed handle");
        assert_eq!(b.z.live_objects(), 1, "the revoked import is held until closed");
        b.close(q).unwrap();
        assert_eq!((b.z.live_objects(), b.close(q)), (0, Err(CuError::INVALID_VALUE)));
        // A new allocation at the freed address gets a new handle.
        let p2 = a.alloc(512).unwrap();
        assert_ne!(a.export(p2).unwrap(), h);
    }

    #[test]
    fn destroying_the_exporters_context_or_the_exporter_revokes() {
        let hub = Rc::new(RefCell::new(Hub::default()));
        let mut a = ipc_fixture(&hub, 1, "t");
        let mut b = ipc_fixture(&hub, 2, "t");
        let ctx = a.api().ctx_create(CtxCreate { flags: 0 }).unwrap().ctx;
        let p = a.alloc(256).unwrap();
        let h = a.export(p).unwrap();
        let q = b.open(&h, 1).unwrap();
        a.api().ctx_destroy(CtxDestroy { ctx }).unwrap();
        assert_eq!(b.get(q, 8), Err(CuError::INVALID_VALUE));
        assert_eq!(b.open(&h, 1), Err(CuError::INVALID_VALUE));
        b.close(q).unwrap();

        let p = a.alloc(256).unwrap();
        let h = a.export(p).unwrap();
        let q = b.open(&h, 1).unwrap();
        depart(&hub, 1);
        assert_eq!(b.get(q, 8), Err(CuError::INVALID_VALUE), "the exporter's worker is gone");
        assert_eq!(b.open(&h, 1), Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn importers_close_with_their_context_and_at_teardown() {
        let hub = Rc::new(RefCell::new(Hub::default()));
        let mut a = ipc_fixture(&hub, 1, "t");
        let mut b = ipc_fixture(&hub, 2, "t");
        let p = a.alloc(256).unwrap();
        let h = a.export(p).unwrap();
        let ctx = b.api().ctx_create(CtxCreate { flags: 0 }).unwrap().ctx;
        let in_ctx = b.open(&h, 1).unwrap();
        let primary = b.z.primary_context();
        b.api().ctx_set_current(CtxSetCurrent { ctx: primary }).unwrap();
        let in_primary = b.open(&h, 1).unwrap();
        assert_ne!(in_ctx, in_primary, "one mapping per context");
        b.api().ctx_destroy(CtxDestroy { ctx }).unwrap();
        assert_eq!(b.close(in_ctx), Err(CuError::INVALID_VALUE), "went with its context");
        b.get(in_primary, 8).unwrap();
        assert!(hub.borrow().registry.exports_of(1) == 1);
        b.z.teardown();
        assert_eq!(b.z.live_objects(), 0);
        // B no longer imports it: revoking it tells nobody.
        a.api().cu_mem_free_v2(CuMemFreeV2 { dptr: p }).unwrap();
        assert!(hub.borrow().notices.values().all(Vec::is_empty));
        assert_eq!(hub.borrow().registry.exports_of(1), 0);
        // The exporter's teardown revokes what it still exports.
        let p = a.alloc(256).unwrap();
        a.export(p).unwrap();
        a.z.teardown();
        assert_eq!(hub.borrow().registry.exports_of(1), 0);
    }

    #[test]
    fn a_lost_broker_channel_ends_every_import() {
        let hub = Rc::new(RefCell::new(Hub::default()));
        let mut a = ipc_fixture(&hub, 1, "t");
        let mut b = ipc_fixture(&hub, 2, "t");
        let p = a.alloc(64).unwrap();
        let h = a.export(p).unwrap();
        let q = b.open(&h, 1).unwrap();
        b.get(q, 8).unwrap();
        hub.borrow_mut().lost.insert(2);
        assert_eq!(b.get(q, 8), Err(CuError::INVALID_VALUE), "no longer told of revocations: unmapped");
        b.close(q).unwrap();
    }

    #[test]
    fn ipc_without_a_broker_is_not_supported() {
        let mut f = fixture(Quotas::default(), 4096);
        let p = f.alloc(64).unwrap();
        assert_eq!(f.export(p), Err(CuError::NOT_SUPPORTED));
        assert_eq!(f.open(&guest_handle(&[1; 16]), 1), Err(CuError::NOT_SUPPORTED));
        assert_eq!(f.close(p), Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn imports_count_against_the_handle_quota() {
        let hub = Rc::new(RefCell::new(Hub::default()));
        let mut a = ipc_fixture(&hub, 1, "t");
        let mut b = ipc_fixture(&hub, 2, "t");
        let mut handles = Vec::new();
        for _ in 0..5 {
            let p = a.alloc(64).unwrap();
            handles.push(a.export(p).unwrap());
        }
        for _ in 0..4 {
            b.alloc(64).unwrap();
        }
        let opened: Vec<u64> = handles[..4].iter().map(|h| b.open(h, 1).unwrap()).collect();
        assert_eq!(b.z.live_objects(), 8);
        assert_eq!(b.open(&handles[4], 1), Err(CuError::OUT_OF_MEMORY), "a quota of 8 handles is full");
        assert_eq!(b.open(&handles[0], 1), Ok(opened[0]), "a second open of one handle takes no new handle");
        b.close(opened[1]).unwrap();
        b.open(&handles[4], 1).unwrap();
    }

    #[test]
    fn attach_reports_the_primary_context_and_refuses_other_revisions() {
        let mut f = fixture(Quotas { mem_bytes: 1 << 20, ..Quotas::default() }, 4096);
        assert_eq!(f.z.attach(&Attach { revision: 1 }, 4096).map(|_| ()), Err(CuError::NOT_SUPPORTED));
        let r = f.z.attach(&Attach { revision: VGPU_PROTOCOL_REVISION }, 4096).unwrap();
        assert_eq!((r.zone, r.window_size, r.primary_ctx), (1, 4096, f.z.primary_context()));
        assert_eq!(r.device.total_mem, f.z.backend.device_info().total_mem);
        assert_eq!(r.attributes.first(), Some(&AttrValue::Value(1024)));
        assert!(!r.pci_bus_id.is_empty());
    }
}
