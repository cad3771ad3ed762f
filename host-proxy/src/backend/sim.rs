//! `SimGpu`: a **test double** of a GPU in host memory, for machines without one.
//!
//! Nothing measured on it says anything about a real GPU, and it runs no machine code: it
//! reports itself as simulated in [`DeviceInfo`]. What it does:
//!
//! - **Memory** behaves exactly: allocation (256-byte aligned and more, fresh memory filled
//!   with `0xa5` so that tests which forget to initialise notice), bounds, contents, copies
//!   and memsets. An address outside every allocation is `CUDA_ERROR_INVALID_VALUE`.
//! - **Contexts** are ids with their own limits, flags and cache configuration (CUDA's
//!   defaults where they matter: stack 1 KiB, printf FIFO 1 MiB, malloc heap 8 MiB, API
//!   version 3020, stream priorities 0 to -5). Allocations, modules, streams, events and
//!   functions remember their context; destroying it frees them all. The double does not
//!   refuse an object used while another context is current, as a driver might.
//! - **Streams and events** complete work as it is issued. Events record an
//!   [`Instant`], so elapsed times are real, non-negative for events recorded in order,
//!   and `CUDA_ERROR_INVALID_HANDLE` for an event created with
//!   `CU_EVENT_DISABLE_TIMING` or never recorded, as in CUDA. Querying or waiting on an
//!   event never recorded succeeds, as in CUDA.
//! - **Modules and libraries** are accepted as NUL-terminated PTX text only (anything
//!   else, a cubin or a fat binary, is `CUDA_ERROR_NOT_SUPPORTED`: the double cannot run
//!   machine code). It reads each `.entry`'s parameter list, laying the parameters out as
//!   C does (the driver's `cuFuncGetParamInfo` layout), and each module-scope `.global`
//!   variable, which gets a zeroed allocation owned by the module (initialisers are
//!   ignored) and freed when it is unloaded. Unknown names are `CUDA_ERROR_NOT_FOUND`;
//!   text it cannot read is `CUDA_ERROR_INVALID_PTX`.
//! - **Launches** "run" only a fixed set of built-in test kernels, recognised by entry
//!   name *and* exact parameter layout, directly over simulated memory (grid geometry is
//!   validated, then ignored; every element is processed, as a covering grid would):
//!   - `fill_u32(u32* p, u32 v, u64 n)`: `p[0..n] = v`;
//!   - `scale_add(f32 a, const f32* x, f32* y, i32 n)`: `y[i] = a * x[i] + y[i]`;
//!   - `add_one_i32(i32* p, i32 n)`: `p[i] += 1` (wrapping);
//!   - `empty()`: nothing;
//!   - `vgpu_test_panic()`: panics in the worker — a stand-in for a host-side bug, so that
//!     tests can show that a panic ends the session (the real backend has no such thing).
//!
//!   A pointer parameter whose range is not inside one allocation is
//!   `CUDA_ERROR_ILLEGAL_ADDRESS` (a fault, though the double's context stays usable), a
//!   misaligned one `CUDA_ERROR_MISALIGNED_ADDRESS`; any other kernel is
//!   `CUDA_ERROR_NOT_SUPPORTED`. A grid or block dimension of 0, or more than 1024
//!   threads per block, is `CUDA_ERROR_INVALID_VALUE`; launch attributes are checked as
//!   the real backend checks them ([`is_plain_launch_attribute`]) and otherwise ignored.
//!   Function attributes: `MAX_THREADS_PER_BLOCK` 1024, `NUM_REGS` 16, others 0 unless
//!   set; occupancy is `2048 / block_size` blocks (at least 1).
//! - **IPC** between worker *processes* uses a mechanism of the double's own, not CUDA's:
//!   exporting an allocation moves its bytes into a sealed memfd (`memfd_create`, sealed
//!   against shrinking and growing) mapped `MAP_SHARED`, which the allocation uses from
//!   then on. The payload names the exporting process, the memfd's descriptor number,
//!   the size and a random nonce that is also the memfd's name. An importer of the same
//!   uid opens `/proc/<pid>/fd/<fd>`, checks that it is the memfd of that name, of that
//!   size and sealed, and maps it shared at a fresh simulated address: each process sees
//!   the other's writes. An exporter that died (or freed the allocation, closing the
//!   memfd) cannot be opened: `CUDA_ERROR_INVALID_VALUE`. Freeing an exported allocation
//!   zeroes it first (the double's scrub), so an importer that still maps it sees zeros.
//!   Imports do not count against the device's memory. The double reads and writes shared
//!   mappings through ordinary slices and does not guard against two processes touching
//!   the same bytes at once (a data race a real GPU would simply allow); it is a test
//!   double, for tests whose processes take turns.

use super::cuda::is_plain_launch_attribute;
use super::{CopyEnd, CuError, CuResult, GpuBackend, GraphCopy, GraphMemset, LaunchConfig, ParamSlot};
use cudarc::driver::sys;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use vgpu_proto::DeviceInfo;

mod arrays;
mod graphs;
mod link;
mod vmm;
pub use arrays::SimArray;
pub use graphs::{SimGraph, SimGraphExec};
use graphs::{SimGraphNodes, SimOp};
pub use link::SimLink;
pub use vmm::SimPhys;

/// Where simulated device addresses start (a recognisable, non-null, high value).
const SIM_BASE: u64 = 0x7e00_0000_0000;
/// Allocation granularity, as CUDA's (allocations are 256-byte aligned at least).
const SIM_ALIGN: u64 = 512;
/// Row alignment of pitched allocations.
const PITCH_ALIGN: u64 = 512;

/// `CU_EVENT_DISABLE_TIMING`.
const EVENT_DISABLE_TIMING: u32 = 0x2;
/// `CU_EVENT_INTERPROCESS` (only valid with `CU_EVENT_DISABLE_TIMING`).
const EVENT_INTERPROCESS: u32 = 0x4;
/// Every `cuEventCreate` flag.
const EVENT_FLAGS: u32 = 0x1 | EVENT_DISABLE_TIMING | EVENT_INTERPROCESS;
/// `CU_STREAM_NON_BLOCKING`, the only stream flag.
const STREAM_NON_BLOCKING: u32 = 0x1;
/// The least (lowest) stream priority, as `cuCtxGetStreamPriorityRange` reports it.
const LEAST_PRIORITY: i32 = 0;
/// The greatest (highest) stream priority.
const GREATEST_PRIORITY: i32 = -5;
/// The API version of every simulated context (`cuCtxGetApiVersion`).
const API_VERSION: u32 = 3020;
/// The largest `CUfunc_cache` value (`CU_FUNC_CACHE_PREFER_EQUAL`).
const MAX_CACHE_CONFIG: u32 = 3;
/// Threads per multiprocessor, for the occupancy answer.
const THREADS_PER_SM: i32 = 2048;
/// The most threads per block.
const MAX_THREADS_PER_BLOCK: u64 = 1024;

/// Object ids (streams, events, contexts, modules, functions) are unique in the process
/// and never reused, so a stale or foreign object is always recognised as such.
static NEXT_OBJECT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh process-unique object id.
fn next_id() -> u64 {
    NEXT_OBJECT_ID.fetch_add(1, Ordering::Relaxed)
}

/// A simulated context id; [`PRIMARY`] is the primary context.
type CtxId = u64;
/// The primary context's id (object ids start at 1).
const PRIMARY: CtxId = 0;

/// Number of `CUlimit` values of the bindings (`CU_LIMIT_MAX`).
const LIMIT_COUNT: usize = sys::CUlimit::CU_LIMIT_MAX as usize;

/// One simulated context's settings.
#[derive(Clone, Debug)]
struct CtxState {
    flags: u32,
    limits: [u64; LIMIT_COUNT],
    cache_config: u32,
}

impl CtxState {
    /// A fresh context with CUDA's defaults for the limits tests look at.
    fn new(flags: u32) -> CtxState {
        let mut limits = [0; LIMIT_COUNT];
        limits[sys::CUlimit::CU_LIMIT_STACK_SIZE as usize] = 1024;
        limits[sys::CUlimit::CU_LIMIT_PRINTF_FIFO_SIZE as usize] = 1 << 20;
        limits[sys::CUlimit::CU_LIMIT_MALLOC_HEAP_SIZE as usize] = 8 << 20;
        CtxState { flags, limits, cache_config: 0 }
    }
}

/// Who frees an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// `mem_free` (made by `mem_alloc`/`mem_alloc_pitch`).
    User,
    /// Unloading this module or library (a `.global` variable).
    Module(u64),
    /// `ipc_close` (another process's memory, mapped by `ipc_open`).
    Import,
    /// Unmapping (a mapping of this physical allocation, which counts its bytes).
    Mapped(u64),
    /// `array_destroy` (a CUDA array's elements, rows packed).
    Array(u64),
}

/// Where a simulated allocation's bytes live.
#[derive(Debug)]
enum Backing {
    /// Private memory (every allocation until it is exported).
    Heap(Vec<u8>),
    /// An exported allocation's memfd mapping, and the nonce that names the memfd.
    Exported(shared::Mapping, [u8; 16]),
    /// Another process's exported memfd, mapped by `ipc_open`.
    Imported(shared::Mapping),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Heap(v) => v,
            Backing::Exported(m, _) | Backing::Imported(m) => m.as_slice(),
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Backing::Heap(v) => v,
            Backing::Exported(m, _) | Backing::Imported(m) => m.as_mut_slice(),
        }
    }
}

/// A simulated allocation.
#[derive(Debug)]
struct SimAlloc {
    data: Backing,
    ctx: CtxId,
    owner: Owner,
}

impl SimAlloc {
    /// Bytes it takes from the device's memory (an import takes none: the memory is the
    /// exporter's).
    fn counted(&self) -> u64 {
        match self.owner {
            Owner::Import | Owner::Mapped(_) => 0,
            Owner::User | Owner::Module(_) | Owner::Array(_) => self.data.bytes().len() as u64,
        }
    }
}

/// A simulated stream's settings.
#[derive(Clone, Copy, Debug)]
struct StreamState {
    ctx: CtxId,
    flags: u32,
    priority: i32,
    /// The capture it records into: (graph, capture id).
    capture: Option<(u64, u64)>,
}

/// A simulated event.
#[derive(Clone, Copy, Debug)]
struct EventState {
    ctx: CtxId,
    flags: u32,
    recorded: Option<Instant>,
    /// The capture it was last recorded in (a stream waiting for it joins that capture).
    captured: Option<(u64, u64)>,
}

/// What a [`SimModule`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModuleKind {
    Module,
    Library,
    /// A library's module view (owned by the library).
    View,
}

/// A loaded module, library, or library view.
#[derive(Debug)]
struct ModuleState {
    kind: ModuleKind,
    /// Its context (`None` for a library: it lives in every context).
    ctx: Option<CtxId>,
    /// The module or library whose unloading ends it (itself for those two).
    root: u64,
    /// Its kernels (empty for views, which read their library's).
    entries: Vec<PtxEntry>,
    /// Its `.global` variables: name → (address, size) (empty for views).
    globals: BTreeMap<String, (u64, u64)>,
}

/// A function or kernel.
#[derive(Clone, Debug)]
struct FunctionState {
    /// A library kernel (`CUkernel`) rather than a function.
    kernel: bool,
    /// Its context (`None` for a kernel).
    ctx: Option<CtxId>,
    /// The module or library it came from.
    root: u64,
    name: String,
    layout: Vec<ParamSlot>,
    /// Attributes set with `func_set_attribute`.
    attributes: BTreeMap<u32, i32>,
    cache_config: u32,
}

/// The simulated GPU (a test double: see the module docs).
#[derive(Debug)]
pub struct SimGpu {
    total: u64,
    used: u64,
    next_addr: u64,
    allocs: BTreeMap<u64, SimAlloc>,
    current: CtxId,
    contexts: BTreeMap<CtxId, CtxState>,
    streams: HashMap<u64, StreamState>,
    events: HashMap<u64, EventState>,
    modules: HashMap<u64, ModuleState>,
    functions: HashMap<u64, FunctionState>,
    /// What `print_u32` kernels "printed", written to the process's stdout at the next
    /// synchronisation — as the driver flushes kernels' printf buffer (a model of that
    /// path, so that its capture and hand-over can be tested without a GPU).
    printf_buffer: Vec<u8>,
    /// Graphs by id (see `graphs.rs`).
    graphs: HashMap<u64, SimGraphNodes>,
    /// A cloned node's original (`cuGraphNodeFindInClone`).
    clone_origin: HashMap<u64, u64>,
    /// Executable graphs by id: their context and operations.
    execs: HashMap<u64, (CtxId, Vec<SimOp>)>,
    /// The worker thread's capture mode (stored, not enforced).
    capture_mode: u32,
    /// The zone's shared data window, once attached: copies from and to it go straight to
    /// simulated memory (as the real backend's DMA does), and graphs' copy nodes reach it.
    window: Option<idm_core::RawRegion>,
    /// Address reservations (start → size) and physical allocations (see `vmm.rs`).
    reservations: BTreeMap<u64, u64>,
    phys: HashMap<u64, vmm::PhysState>,
    /// CUDA arrays by id: their first byte (an allocation owned by the array) and shape.
    arrays: HashMap<u64, (u64, super::ArrayDesc)>,
    /// Texture and surface objects by value: the context and the array they read, if any.
    textures: HashMap<u64, arrays::TexState>,
}

/// A simulated stream (work completes as it is issued).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SimStream(u64);

/// A simulated event.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SimEvent(u64);

/// A simulated context made by [`GpuBackend::ctx_create`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SimContext(u64);

/// A simulated module, library or library view.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SimModule(u64);

/// A simulated function or kernel.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SimFunction(u64);

/// What the simulated GPU holds ([`SimGpu::held`]): tests and fuzz targets check a zone's
/// accounting against it, and that a torn-down zone left nothing behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimHeld {
    /// Bytes of allocations made by `mem_alloc` (and their count).
    pub user_bytes: u64,
    /// Live `mem_alloc` allocations.
    pub allocations: usize,
    /// Bytes of modules' globals.
    pub module_bytes: u64,
    /// Bytes of physical (VMM) allocations.
    pub phys_bytes: u64,
    /// Bytes of CUDA arrays.
    pub array_bytes: u64,
    /// Live IPC imports and VMM mappings.
    pub mappings: usize,
    /// Contexts besides the primary one.
    pub contexts: usize,
    /// Streams, events, modules, functions, graphs, executable graphs, texture and surface
    /// objects.
    pub objects: usize,
    /// Address reservations.
    pub reservations: usize,
}

impl SimGpu {
    /// What the device holds now.
    pub fn held(&self) -> SimHeld {
        let mut h = SimHeld::default();
        for a in self.allocs.values() {
            match a.owner {
                Owner::User => {
                    h.user_bytes += a.counted();
                    h.allocations += 1;
                }
                Owner::Module(_) => h.module_bytes += a.counted(),
                Owner::Array(_) => h.array_bytes += a.counted(),
                Owner::Import | Owner::Mapped(_) => h.mappings += 1,
            }
        }
        h.phys_bytes = self.phys_bytes();
        h.contexts = self.contexts.len().saturating_sub(1);
        h.objects = self.streams.len()
            + self.events.len()
            + self.modules.len()
            + self.functions.len()
            + self.graphs.len()
            + self.execs.len()
            + self.textures.len();
        h.reservations = self.reservations.len();
        h
    }

    /// The bytes at `[addr, addr + len)` of one allocation (tests and fuzz targets look at
    /// memory the zone under test must not reach).
    pub fn peek(&mut self, addr: u64, len: u64) -> CuResult<Vec<u8>> {
        let (data, off) = self.locate(addr, len)?;
        Ok(data[off..off + len as usize].to_vec())
    }

    /// Writes `bytes` at `addr`, inside one allocation.
    pub fn poke(&mut self, addr: u64, bytes: &[u8]) -> CuResult<()> {
        let (data, off) = self.locate(addr, bytes.len() as u64)?;
        data[off..off + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    /// A simulated device with `total` bytes of memory.
    pub fn new(total: u64) -> SimGpu {
        SimGpu {
            total,
            used: 0,
            next_addr: SIM_BASE,
            allocs: BTreeMap::new(),
            current: PRIMARY,
            contexts: BTreeMap::from([(PRIMARY, CtxState::new(0))]),
            streams: HashMap::new(),
            events: HashMap::new(),
            modules: HashMap::new(),
            functions: HashMap::new(),
            printf_buffer: Vec::new(),
            graphs: HashMap::new(),
            clone_origin: HashMap::new(),
            execs: HashMap::new(),
            capture_mode: 0,
            window: None,
            reservations: BTreeMap::new(),
            phys: HashMap::new(),
            arrays: HashMap::new(),
            textures: HashMap::new(),
        }
    }

    /// The allocation holding `[addr, addr + len)`, and the offset of `addr` in it
    /// (`CUDA_ERROR_INVALID_VALUE` when no single allocation holds the range).
    fn locate(&mut self, addr: u64, len: u64) -> CuResult<(&mut [u8], usize)> {
        let (&start, alloc) = self.allocs.range_mut(..=addr).next_back().ok_or(CuError::INVALID_VALUE)?;
        let off = addr - start;
        let end = off.checked_add(len).ok_or(CuError::INVALID_VALUE)?;
        let data = alloc.data.bytes_mut();
        if end > data.len() as u64 {
            return Err(CuError::INVALID_VALUE);
        }
        Ok((data, off as usize))
    }

    /// `[addr, addr + len)` for a kernel: `CUDA_ERROR_ILLEGAL_ADDRESS` when no single
    /// allocation holds it, `CUDA_ERROR_MISALIGNED_ADDRESS` when `addr` is not aligned to
    /// `align`.
    fn kernel_range(&mut self, addr: u64, len: u64, align: u64) -> CuResult<&mut [u8]> {
        let (buf, off) = self.locate(addr, len).map_err(|_| CuError::ILLEGAL_ADDRESS)?;
        if addr % align != 0 {
            return Err(CuError::MISALIGNED_ADDRESS);
        }
        Ok(&mut buf[off..off + len as usize])
    }

    /// Makes an allocation of `size > 0` bytes filled with `fill`.
    fn allocate(&mut self, size: u64, fill: u8, ctx: CtxId, owner: Owner) -> CuResult<u64> {
        if size == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        if size > self.total - self.used {
            return Err(CuError::OUT_OF_MEMORY);
        }
        let len = usize::try_from(size).map_err(|_| CuError::OUT_OF_MEMORY)?;
        let addr = self.place(size)?;
        self.allocs.insert(addr, SimAlloc { data: Backing::Heap(vec![fill; len]), ctx, owner });
        self.used += size;
        Ok(addr)
    }

    /// A fresh, never reused address range of `size` bytes.
    fn place(&mut self, size: u64) -> CuResult<u64> {
        let addr = self.next_addr;
        self.next_addr = addr.checked_add(size.div_ceil(SIM_ALIGN) * SIM_ALIGN).ok_or(CuError::OUT_OF_MEMORY)?;
        Ok(addr)
    }

    /// Frees every allocation for which `free` holds.
    fn free_where(&mut self, mut free: impl FnMut(&SimAlloc) -> bool) {
        let mut freed = 0;
        self.allocs.retain(|_, a| {
            let gone = free(a);
            if gone {
                freed += a.counted();
            }
            !gone
        });
        self.used -= freed;
    }

    /// The current context's settings.
    fn ctx_state(&mut self) -> CuResult<&mut CtxState> {
        self.contexts.get_mut(&self.current).ok_or(CuError::INVALID_CONTEXT)
    }

    /// Checks that `stream` is live (`None`, the NULL stream, always is).
    fn check_stream(&self, stream: Option<&SimStream>) -> CuResult<Option<StreamState>> {
        match stream {
            None => Ok(None),
            Some(s) => self.streams.get(&s.0).copied().map(Some).ok_or(CuError::INVALID_HANDLE),
        }
    }

    /// A live event.
    fn event(&self, event: &SimEvent) -> CuResult<EventState> {
        self.events.get(&event.0).copied().ok_or(CuError::INVALID_HANDLE)
    }

    /// A live function.
    fn function(&self, func: &SimFunction) -> CuResult<&FunctionState> {
        self.functions.get(&func.0).ok_or(CuError::INVALID_HANDLE)
    }

    /// A live module or library view, and the module or library holding its entries and
    /// globals (itself, or the view's library). Libraries are refused.
    fn module_holder(&self, module: &SimModule) -> CuResult<(&ModuleState, &ModuleState)> {
        let m = self.modules.get(&module.0).ok_or(CuError::INVALID_HANDLE)?;
        match m.kind {
            ModuleKind::Module => Ok((m, m)),
            ModuleKind::View => Ok((m, self.modules.get(&m.root).ok_or(CuError::INVALID_HANDLE)?)),
            ModuleKind::Library => Err(CuError::INVALID_HANDLE),
        }
    }

    /// A live library (modules and views are refused).
    fn library(&self, library: &SimModule) -> CuResult<&ModuleState> {
        match self.modules.get(&library.0) {
            Some(m) if m.kind == ModuleKind::Library => Ok(m),
            _ => Err(CuError::INVALID_HANDLE),
        }
    }

    /// Loads PTX as a module (`ctx` = `Some(current)`) or a library (`None`).
    fn load(&mut self, image: &[u8], ctx: Option<CtxId>) -> CuResult<SimModule> {
        let ptx = parse_ptx(ptx_text(image)?)?;
        let id = next_id();
        let mut globals = BTreeMap::new();
        for g in &ptx.globals {
            // Library globals live in the primary context here (CUDA has one copy per
            // context; the double has one).
            match self.allocate(g.size, 0, ctx.unwrap_or(PRIMARY), Owner::Module(id)) {
                Ok(addr) => {
                    globals.insert(g.name.clone(), (addr, g.size));
                }
                Err(e) => {
                    self.free_where(|a| a.owner == Owner::Module(id));
                    return Err(e);
                }
            }
        }
        let kind = if ctx.is_some() { ModuleKind::Module } else { ModuleKind::Library };
        self.modules.insert(id, ModuleState { kind, ctx, root: id, entries: ptx.entries, globals });
        Ok(SimModule(id))
    }

    /// Records a function made from `entry` and returns its handle.
    fn add_function(&mut self, kernel: bool, ctx: Option<CtxId>, root: u64, entry: &PtxEntry) -> SimFunction {
        let id = next_id();
        let state = FunctionState {
            kernel,
            ctx,
            root,
            name: entry.name.clone(),
            layout: entry.layout.clone(),
            attributes: BTreeMap::new(),
            cache_config: 0,
        };
        self.functions.insert(id, state);
        SimFunction(id)
    }

    /// Runs a built-in kernel over simulated memory.
    /// Writes what `print_u32` kernels printed to stdout (descriptor 1), as the driver
    /// does at a synchronisation.
    fn flush_printf(&mut self) {
        if !self.printf_buffer.is_empty() {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&self.printf_buffer).and_then(|()| out.flush());
            self.printf_buffer.clear();
        }
    }

    /// Checks a launch of function `func` as the driver would, and names the built-in
    /// kernel it runs.
    fn check_launch(&self, func: u64, config: &LaunchConfig, params: &[u8], layout: &[ParamSlot]) -> CuResult<Builtin> {
        let f = self.functions.get(&func).ok_or(CuError::INVALID_HANDLE)?;
        if config.attrs.iter().any(|a| !is_plain_launch_attribute(a.id)) {
            return Err(CuError::NOT_SUPPORTED);
        }
        let threads: u64 = config.block.iter().map(|&d| u64::from(d)).product();
        if config.grid.contains(&0) || config.block.contains(&0) || threads > MAX_THREADS_PER_BLOCK {
            return Err(CuError::INVALID_VALUE);
        }
        if f.layout != layout {
            return Err(CuError::INVALID_VALUE);
        }
        let in_bounds = |s: &ParamSlot| {
            u64::from(s.offset).checked_add(u64::from(s.size)).is_some_and(|end| end <= params.len() as u64)
        };
        if !layout.iter().all(in_bounds) {
            return Err(CuError::INVALID_VALUE);
        }
        Builtin::recognise(&f.name, layout).ok_or(CuError::NOT_SUPPORTED)
    }

    /// Runs a launch now (streams run their work in place).
    fn launch_now(&mut self, func: u64, config: &LaunchConfig, params: &[u8], layout: &[ParamSlot]) -> CuResult<()> {
        let kernel = self.check_launch(func, config, params, layout)?;
        self.run_builtin(kernel, params)
    }

    fn run_builtin(&mut self, kernel: Builtin, params: &[u8]) -> CuResult<()> {
        match kernel {
            Builtin::Empty => Ok(()),
            Builtin::Panic => panic!("vgpu_test_panic: the test double's deliberate panic"),
            Builtin::PrintU32 => {
                // One line per launch (the double runs one thread's worth), bounded as the
                // driver's printf buffer is (its default is 1 MiB).
                let line = format!("print_u32: {}\n", param_u32(params, 0)?);
                if self.printf_buffer.len() + line.len() <= 1 << 20 {
                    self.printf_buffer.extend_from_slice(line.as_bytes());
                }
                Ok(())
            }
            Builtin::FillU32 => {
                let (p, v, n) = (param_u64(params, 0)?, param_u32(params, 8)?, param_u64(params, 16)?);
                if n == 0 {
                    return Ok(());
                }
                let bytes = n.checked_mul(4).ok_or(CuError::ILLEGAL_ADDRESS)?;
                for w in self.kernel_range(p, bytes, 4)?.chunks_exact_mut(4) {
                    w.copy_from_slice(&v.to_le_bytes());
                }
                Ok(())
            }
            Builtin::ScaleAdd => {
                let a = f32::from_bits(param_u32(params, 0)?);
                let (x, y) = (param_u64(params, 8)?, param_u64(params, 16)?);
                let n = u64::try_from(param_u32(params, 24)? as i32).unwrap_or(0);
                if n == 0 {
                    return Ok(());
                }
                let xs: Vec<f32> = self
                    .kernel_range(x, n * 4, 4)?
                    .chunks_exact(4)
                    .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                    .collect();
                for (w, xi) in self.kernel_range(y, n * 4, 4)?.chunks_exact_mut(4).zip(xs) {
                    let yi = f32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                    w.copy_from_slice(&(a * xi + yi).to_le_bytes());
                }
                Ok(())
            }
            Builtin::AddOneI32 => {
                let p = param_u64(params, 0)?;
                let n = u64::try_from(param_u32(params, 8)? as i32).unwrap_or(0);
                if n == 0 {
                    return Ok(());
                }
                for w in self.kernel_range(p, n * 4, 4)?.chunks_exact_mut(4) {
                    let v = i32::from_le_bytes([w[0], w[1], w[2], w[3]]).wrapping_add(1);
                    w.copy_from_slice(&v.to_le_bytes());
                }
                Ok(())
            }
        }
    }
}

/// The built-in kernels the double runs (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Builtin {
    FillU32,
    ScaleAdd,
    AddOneI32,
    Empty,
    PrintU32,
    Panic,
}

impl Builtin {
    /// The built-in kernel with this entry name and exactly this parameter layout.
    fn recognise(name: &str, layout: &[ParamSlot]) -> Option<Builtin> {
        let slots: Vec<(u32, u32)> = layout.iter().map(|s| (s.offset, s.size)).collect();
        match (name, slots.as_slice()) {
            ("fill_u32", [(0, 8), (8, 4), (16, 8)]) => Some(Builtin::FillU32),
            ("scale_add", [(0, 4), (8, 8), (16, 8), (24, 4)]) => Some(Builtin::ScaleAdd),
            ("add_one_i32", [(0, 8), (8, 4)]) => Some(Builtin::AddOneI32),
            ("empty", []) => Some(Builtin::Empty),
            ("print_u32", [(0, 4)]) => Some(Builtin::PrintU32),
            ("vgpu_test_panic", []) => Some(Builtin::Panic),
            _ => None,
        }
    }
}

/// A 32-bit parameter at `offset` (the layout was checked against `params`).
fn param_u32(params: &[u8], offset: usize) -> CuResult<u32> {
    let bytes = params.get(offset..offset + 4).ok_or(CuError::INVALID_VALUE)?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// A 64-bit parameter at `offset` (the layout was checked against `params`).
fn param_u64(params: &[u8], offset: usize) -> CuResult<u64> {
    let lo = u64::from(param_u32(params, offset)?);
    let hi = u64::from(param_u32(params, offset + 4)?);
    Ok(lo | hi << 32)
}

// ---- IPC ----

/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`: `cuIpcOpenMemHandle` takes exactly this flag.
const IPC_MEM_LAZY_ENABLE_PEER_ACCESS: u32 = 1;
/// The first bytes of the double's IPC payload.
const SIM_IPC_MAGIC: [u8; 8] = *b"VSIMIPC1";
/// Length of the double's IPC payload.
const SIM_IPC_PAYLOAD_LEN: usize = 40;

/// What the double's IPC payload names: an exporting process's memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SimPayload {
    pid: u32,
    fd: i32,
    size: u64,
    nonce: [u8; 16],
}

impl SimPayload {
    /// `magic, pid, fd, size, nonce`, little-endian.
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SIM_IPC_PAYLOAD_LEN);
        b.extend_from_slice(&SIM_IPC_MAGIC);
        b.extend_from_slice(&self.pid.to_le_bytes());
        b.extend_from_slice(&self.fd.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b
    }

    fn decode(b: &[u8]) -> Option<SimPayload> {
        if b.len() != SIM_IPC_PAYLOAD_LEN || b[..8] != SIM_IPC_MAGIC {
            return None;
        }
        Some(SimPayload {
            pid: u32::from_le_bytes(b[8..12].try_into().ok()?),
            fd: i32::from_le_bytes(b[12..16].try_into().ok()?),
            size: u64::from_le_bytes(b[16..24].try_into().ok()?),
            nonce: b[24..40].try_into().ok()?,
        })
    }
}

/// The name of the memfd of an export with this nonce.
fn memfd_name(nonce: &[u8; 16]) -> String {
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    format!("vgpu-sim-ipc-{hex}")
}

/// Shared mappings of memfds for exported allocations: the double's only unsafe code.
#[allow(unsafe_code)]
mod shared {
    use std::ffi::CString;
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::ptr::NonNull;

    /// A `MAP_SHARED` mapping of a memfd: an exporter's (which keeps the memfd open, so
    /// that importers reach it through /proc) or an importer's.
    #[derive(Debug)]
    pub struct Mapping {
        ptr: NonNull<u8>,
        len: usize,
        /// The exporter's memfd; `None` in an importer.
        memfd: Option<OwnedFd>,
    }

    // SAFETY: the mapping belongs to this value alone (no other value of this process
    // points into it), so moving it to another thread moves that ownership.
    unsafe impl Send for Mapping {}

    impl Mapping {
        /// A new memfd named `name` holding a copy of `bytes`, sealed against shrinking
        /// and growing, mapped shared.
        pub fn export(name: &str, bytes: &[u8]) -> io::Result<Mapping> {
            let cname = CString::new(name)?;
            // SAFETY: `cname` is NUL-terminated and outlives the call; the flags are valid.
            let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just made by memfd_create; nothing else owns it.
            let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            file.set_len(bytes.len() as u64)?;
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            // SAFETY: fcntl on a descriptor this function owns; F_ADD_SEALS takes an int.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut mapping = Mapping::map(&file, bytes.len())?;
            mapping.as_mut_slice().copy_from_slice(bytes);
            mapping.memfd = Some(OwnedFd::from(file));
            Ok(mapping)
        }

        /// Maps another process's export: `/proc/<pid>/fd/<fd>` must be the memfd named
        /// `name`, exactly `len` bytes long and sealed against shrinking (so that no access
        /// can fault).
        pub fn import(pid: u32, fd: i32, name: &str, len: usize) -> io::Result<Mapping> {
            let path = format!("/proc/{pid}/fd/{fd}");
            let target = std::fs::read_link(&path)?;
            if target.as_os_str() != format!("/memfd:{name} (deleted)").as_str() {
                return Err(io::Error::new(io::ErrorKind::NotFound, "not the exported memfd"));
            }
            let file = File::options().read(true).write(true).open(&path)?;
            if file.metadata()?.len() != len as u64 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "exported memfd has another size"));
            }
            // SAFETY: fcntl on a descriptor this function owns; F_GET_SEALS takes no argument.
            let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
            if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "exported memfd is not sealed"));
            }
            Mapping::map(&file, len)
        }

        /// Maps `len > 0` bytes of `file` shared, read-write.
        fn map(file: &File, len: usize) -> io::Result<Mapping> {
            // SAFETY: a new mapping placed by the kernel (NULL hint) of a file we hold
            // open; it overlaps no memory of this process.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
            Ok(Mapping { ptr, len, memfd: None })
        }

        /// The exporter's memfd number (`None` in an importer).
        pub fn memfd(&self) -> Option<RawFd> {
            self.memfd.as_ref().map(AsRawFd::as_raw_fd)
        }

        /// The mapped bytes.
        pub fn as_slice(&self) -> &[u8] {
            // SAFETY: `ptr` is a live mapping of `len` bytes (unmapped only by `drop`),
            // borrowed for no longer than `self`. Another process may write the same pages
            // (see the module docs: the double's tests take turns).
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }

        /// The mapped bytes, writable.
        pub fn as_mut_slice(&mut self) -> &mut [u8] {
            // SAFETY: as in `as_slice`; `&mut self` makes this the only slice of it here.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            if self.memfd.is_some() {
                // The exporter's scrub: an importer still mapping it sees zeros.
                self.as_mut_slice().fill(0);
            }
            // SAFETY: the mapping made by `map`, unmapped once, here; no slice of it
            // outlives `self`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

// ---- PTX ----

/// A kernel entry of a PTX module.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PtxEntry {
    name: String,
    layout: Vec<ParamSlot>,
}

/// A module-scope `.global` variable of a PTX module.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PtxGlobal {
    name: String,
    size: u64,
}

/// What the double reads of a PTX module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ptx {
    entries: Vec<PtxEntry>,
    globals: Vec<PtxGlobal>,
}

/// The PTX text of a module image: the UTF-8 text before its first NUL, which must carry
/// a `.version` directive. Anything else is `CUDA_ERROR_NOT_SUPPORTED`.
fn ptx_text(image: &[u8]) -> CuResult<&str> {
    let nul = image.iter().position(|&b| b == 0).ok_or(CuError::NOT_SUPPORTED)?;
    let text = std::str::from_utf8(&image[..nul]).map_err(|_| CuError::NOT_SUPPORTED)?;
    if !tokens(&strip_comments(text)).iter().any(|t| t == ".version") {
        return Err(CuError::NOT_SUPPORTED);
    }
    Ok(text)
}

/// `text` without `//` and `/* */` comments (string literals are kept whole).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            in_string = c != '"';
            out.push(c);
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if c == '/' && chars.peek() == Some(&'/') {
            for c in chars.by_ref() {
                if c == '\n' {
                    out.push('\n');
                    break;
                }
            }
        } else if c == '/' && chars.peek() == Some(&'*') {
            chars.next();
            let mut last = ' ';
            for c in chars.by_ref() {
                if last == '*' && c == '/' {
                    break;
                }
                last = c;
            }
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits a statement into tokens: whitespace separates, and `( ) [ ] { } , = ;` are
/// tokens of their own.
fn tokens(statement: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in statement.chars() {
        if c.is_whitespace() || "()[]{},=;".contains(c) {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
        } else {
            word.push(c);
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// How a module-scope statement ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Terminator {
    /// `;`: a declaration.
    Semicolon,
    /// `{`: a function header, whose body follows.
    Body,
}

/// `text` without the module directives that end at the end of their line rather than
/// with `;` (`.version`, `.target`, `.address_size`, `.file`).
fn strip_line_directives(text: &str) -> String {
    text.lines()
        .filter(|line| {
            let first = line.split_whitespace().next().unwrap_or("");
            !matches!(first, ".version" | ".target" | ".address_size" | ".file")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module-scope statements of comment-free PTX, with how each ended. Function bodies
/// are skipped; braces of an initialiser (`= { … }`) belong to their statement.
fn module_statements(text: &str) -> CuResult<Vec<(String, Terminator)>> {
    let text = strip_line_directives(text);
    let mut out = Vec::new();
    let mut statement = String::new();
    let (mut body_depth, mut init_depth) = (0usize, 0usize);
    let mut in_string = false;
    for c in text.chars() {
        if body_depth > 0 {
            match c {
                '{' => body_depth += 1,
                '}' => body_depth -= 1,
                _ => {}
            }
            continue;
        }
        if in_string {
            in_string = c != '"';
            statement.push(c);
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                statement.push(c);
            }
            '{' if statement.contains('=') => {
                init_depth += 1;
                statement.push(c);
            }
            '{' => {
                out.push((std::mem::take(&mut statement), Terminator::Body));
                body_depth = 1;
            }
            '}' if init_depth > 0 => {
                init_depth -= 1;
                statement.push(c);
            }
            '}' => return Err(CuError::INVALID_PTX),
            ';' if init_depth == 0 => out.push((std::mem::take(&mut statement), Terminator::Semicolon)),
            _ => statement.push(c),
        }
    }
    if body_depth > 0 || init_depth > 0 || in_string {
        return Err(CuError::INVALID_PTX);
    }
    Ok(out)
}

/// Size in bytes of a PTX fundamental type (`.u32`, `.f64`, …).
fn type_size(ty: &str) -> Option<u64> {
    Some(match ty {
        ".u8" | ".s8" | ".b8" => 1,
        ".u16" | ".s16" | ".b16" | ".f16" | ".bf16" => 2,
        ".u32" | ".s32" | ".b32" | ".f32" | ".f16x2" | ".bf16x2" => 4,
        ".u64" | ".s64" | ".b64" | ".f64" => 8,
        ".b128" => 16,
        _ => return None,
    })
}

/// Whether `token` can be a PTX identifier.
fn is_identifier(token: &str) -> bool {
    let mut chars = token.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || "_$%".contains(c))
        && chars.all(|c| c.is_ascii_alphanumeric() || "_$".contains(c))
}

/// A number token (decimal, or `0x` hexadecimal).
fn number(token: &str) -> Option<u64> {
    match token.strip_prefix("0x").or_else(|| token.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => token.parse().ok(),
    }
}

/// A declared variable (a parameter, or one declarator of a `.global` statement).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Declared {
    name: String,
    size: u64,
    align: u64,
}

/// Reads `[.align A] [.v2|.v4] .type name[N]…` from `tokens` (state-space and pointer
/// attributes such as `.ptr .global .align 4` are skipped). An unsized array (`[]`) takes
/// `unsized_count` elements. `None` when the tokens are not such a declaration.
fn declaration(tokens: &[String], unsized_count: Option<u64>) -> Option<Declared> {
    let (mut align, mut vector, mut elem, mut name, mut count) = (None, 1u64, None, None, 1u64);
    // After `.ptr`, `.align` is the pointee's alignment, not the parameter's.
    let mut pointee = false;
    let mut it = tokens.iter();
    while let Some(t) = it.next() {
        match t.as_str() {
            ".ptr" => pointee = true,
            ".align" => {
                let a = number(it.next()?)?;
                if !pointee {
                    align = Some(a);
                }
            }
            ".v2" => vector = 2,
            ".v4" => vector = 4,
            ".v8" => vector = 8,
            "[" => {
                let n = match it.next()?.as_str() {
                    "]" => unsized_count?,
                    dim => {
                        let n = number(dim)?;
                        (it.next()? == "]").then_some(n)?
                    }
                };
                count = count.checked_mul(n)?;
            }
            t if t.starts_with('.') => {
                if let Some(size) = type_size(t) {
                    elem = Some(size);
                }
            }
            t if is_identifier(t) && name.is_none() => name = Some(t.to_owned()),
            _ => return None,
        }
    }
    let elem = elem? * vector;
    let align = align.unwrap_or(elem);
    if !align.is_power_of_two() {
        return None;
    }
    Some(Declared { name: name?, size: elem.checked_mul(count)?, align })
}

/// The parameter layout of an entry's `.param` list, laid out as C lays out a struct.
fn param_layout(params: &[String]) -> CuResult<Vec<ParamSlot>> {
    let mut layout = Vec::new();
    let mut offset = 0u64;
    for param in params.split(|t| t == ",") {
        if param.is_empty() && params.is_empty() {
            break;
        }
        let (first, rest) = param.split_first().ok_or(CuError::INVALID_PTX)?;
        if first != ".param" {
            return Err(CuError::INVALID_PTX);
        }
        let d = declaration(rest, None).ok_or(CuError::INVALID_PTX)?;
        offset = offset.checked_next_multiple_of(d.align).ok_or(CuError::INVALID_PTX)?;
        let slot = ParamSlot {
            offset: u32::try_from(offset).map_err(|_| CuError::INVALID_PTX)?,
            size: u32::try_from(d.size).map_err(|_| CuError::INVALID_PTX)?,
        };
        layout.push(slot);
        offset = offset.checked_add(d.size).ok_or(CuError::INVALID_PTX)?;
    }
    Ok(layout)
}

/// Reads the kernel entries and module-scope `.global` variables of PTX text.
fn parse_ptx(text: &str) -> CuResult<Ptx> {
    let mut ptx = Ptx::default();
    for (statement, end) in module_statements(&strip_comments(text))? {
        let toks = tokens(&statement);
        match end {
            Terminator::Body => {
                let Some(at) = toks.iter().position(|t| t == ".entry") else {
                    continue; // a `.func`, or another block
                };
                let name = toks.get(at + 1).filter(|n| is_identifier(n)).ok_or(CuError::INVALID_PTX)?.clone();
                let rest = &toks[at + 2..];
                let layout = match rest.first().map(String::as_str) {
                    Some("(") => {
                        let close = rest.iter().position(|t| t == ")").ok_or(CuError::INVALID_PTX)?;
                        param_layout(&rest[1..close])?
                    }
                    _ => Vec::new(),
                };
                if !ptx.entries.iter().any(|e| e.name == name) {
                    ptx.entries.push(PtxEntry { name, layout });
                }
            }
            Terminator::Semicolon => {
                if !toks.iter().any(|t| t == ".global") || toks.iter().any(|t| t == ".extern") {
                    continue;
                }
                ptx.globals.extend(globals(&toks));
            }
        }
    }
    Ok(ptx)
}

/// The variables a module-scope `.global` statement declares (those of types the double
/// does not know, such as `.texref`, are left out).
fn globals(toks: &[String]) -> Vec<PtxGlobal> {
    let (decl, init) = match toks.iter().position(|t| t == "=") {
        Some(eq) => (&toks[..eq], Some(&toks[eq + 1..])),
        None => (toks, None),
    };
    // Elements of an initialiser `{a, b, c}` (for an unsized array `name[]`).
    let init_count = init.map(|init| {
        let mut depth = 0;
        let mut commas = 0;
        for t in init {
            match t.as_str() {
                "{" => depth += 1,
                "}" => depth -= 1,
                "," if depth == 1 => commas += 1,
                _ => {}
            }
        }
        commas + 1
    });
    // Directives and the type come first; then declarators, separated by commas.
    let first_name = decl.iter().position(|t| is_identifier(t)).unwrap_or(decl.len());
    let (directives, declarators) = decl.split_at(first_name);
    let directives: Vec<String> = directives.iter().filter(|t| *t != ".global").cloned().collect();
    declarators
        .split(|t| t == ",")
        .filter_map(|declarator| {
            let mut all = directives.clone();
            all.extend_from_slice(declarator);
            declaration(&all, init_count)
        })
        .filter(|d| d.size > 0)
        .map(|d| PtxGlobal { name: d.name, size: d.size })
        .collect()
}

/// A plausible H100-like table of device attributes (a test double's answer), for every
/// attribute `1..CU_DEVICE_ATTRIBUTE_MAX` of the bindings; those not listed are 0.
fn device_attribute_table() -> Vec<Result<i32, CuError>> {
    use sys::CUdevice_attribute as A;
    let known = [
        (A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, 1024),
        (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X, 1024),
        (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y, 1024),
        (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z, 64),
        (A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X, i32::MAX),
        (A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y, 65535),
        (A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z, 65535),
        (A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK, 49152),
        (A::CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY, 65536),
        (A::CU_DEVICE_ATTRIBUTE_WARP_SIZE, 32),
        (A::CU_DEVICE_ATTRIBUTE_MAX_PITCH, i32::MAX),
        (A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK, 65536),
        (A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE, 1_980_000),
        (A::CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT, 512),
        (A::CU_DEVICE_ATTRIBUTE_GPU_OVERLAP, 1),
        (A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 132),
        (A::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY, 1),
        (A::CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS, 1),
        (A::CU_DEVICE_ATTRIBUTE_ECC_ENABLED, 1),
        (A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, 0),
        (A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID, 0),
        (A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID, 0),
        (A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, 2_619_000),
        (A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, 5120),
        (A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, 50 << 20),
        (A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, 2048),
        (A::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT, 3),
        (A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, 1),
        (A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 9),
        (A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0),
        (A::CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED, 1),
        (A::CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED, 1),
        (A::CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED, 1),
        (A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, 233_472),
        (A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR, 65536),
        (A::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY, 1),
        (A::CU_DEVICE_ATTRIBUTE_COMPUTE_PREEMPTION_SUPPORTED, 1),
        (A::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH, 1),
        (A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, 232_448),
        (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR, 32),
    ];
    let mut table = vec![Ok(0); A::CU_DEVICE_ATTRIBUTE_MAX as usize - 1];
    for (attribute, value) in known {
        if let Some(slot) = table.get_mut(attribute as usize - 1) {
            *slot = Ok(value);
        }
    }
    table
}

impl GpuBackend for SimGpu {
    /// The double's contexts take no device memory.
    const CONTEXT_MEM_BYTES: u64 = 0;
    type Phys = SimPhys;
    type Array = SimArray;
    type Link = SimLink;

    fn link_create(&mut self, options: &[(u32, u64)]) -> CuResult<SimLink> {
        if !options.iter().all(|&(o, _)| super::link_option_is_scalar(o)) {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(SimLink::default())
    }

    fn link_add(
        &mut self,
        link: &mut SimLink,
        input_type: u32,
        data: &[u8],
        name: &CStr,
        _options: &[(u32, u64)],
    ) -> CuResult<()> {
        SimGpu::add_to_link(link, input_type, data, name)
    }

    fn link_complete(&mut self, link: &mut SimLink) -> CuResult<Vec<u8>> {
        SimGpu::complete_link(link)
    }

    fn link_logs(&self, link: &SimLink) -> (String, String) {
        SimGpu::link_log_texts(link)
    }

    fn link_destroy(&mut self, _link: SimLink) -> CuResult<()> {
        Ok(())
    }

    fn array_id(array: &SimArray) -> u64 {
        array.0
    }

    fn array_create(&mut self, desc: &super::ArrayDesc) -> CuResult<SimArray> {
        self.create_array(desc)
    }

    fn array_destroy(&mut self, array: SimArray) -> CuResult<()> {
        self.destroy_array(array)
    }

    fn tex_object_create(
        &mut self,
        res: super::TexResource<'_, SimArray>,
        _tex_desc: &[u8; super::TEX_DESC_LEN],
        _view: Option<&[u8; super::VIEW_DESC_LEN]>,
    ) -> CuResult<u64> {
        self.create_texture(res, false)
    }

    fn tex_object_destroy(&mut self, tex: u64) -> CuResult<()> {
        self.destroy_texture(tex, false)
    }

    fn surf_object_create(&mut self, array: &SimArray) -> CuResult<u64> {
        self.create_texture(super::TexResource::Array(array), true)
    }

    fn surf_object_destroy(&mut self, surf: u64) -> CuResult<()> {
        self.destroy_texture(surf, true)
    }

    fn mem_granularity(&mut self, _recommended: bool) -> CuResult<u64> {
        Ok(SimGpu::granularity())
    }

    fn mem_address_reserve(&mut self, size: u64, alignment: u64, _addr: u64) -> CuResult<u64> {
        self.address_reserve(size, alignment)
    }

    fn mem_address_free(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        self.address_free(ptr, size)
    }

    fn mem_create(&mut self, size: u64, _handle_types: u32, _rdma: bool) -> CuResult<SimPhys> {
        self.create_phys(size)
    }

    fn mem_release(&mut self, phys: SimPhys) -> CuResult<()> {
        self.release_phys(phys)
    }

    fn mem_map(&mut self, ptr: u64, size: u64, offset: u64, phys: &SimPhys) -> CuResult<()> {
        self.map(ptr, size, offset, phys)
    }

    fn mem_unmap(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        self.unmap(ptr, size)
    }

    fn mem_set_access(&mut self, ptr: u64, size: u64, flags: u32) -> CuResult<()> {
        self.set_access(ptr, size, flags)
    }

    type Graph = SimGraph;
    type GraphExec = SimGraphExec;
    /// A node's process-unique id.
    type GraphNode = u64;

    fn graph_create(&mut self) -> CuResult<SimGraph> {
        Ok(self.create_graph())
    }

    fn graph_destroy(&mut self, graph: SimGraph) -> CuResult<()> {
        self.destroy_graph(graph)
    }

    fn graph_clone(&mut self, graph: &SimGraph) -> CuResult<SimGraph> {
        self.clone_graph(graph)
    }

    fn graph_find_in_clone(&mut self, clone: &SimGraph, original: u64) -> CuResult<u64> {
        self.find_in_clone(clone, original)
    }

    fn graph_add_node(
        &mut self,
        graph: &SimGraph,
        deps: &[u64],
        node: super::GraphNodeSpec<'_, SimFunction>,
    ) -> CuResult<u64> {
        self.add_graph_node(graph, deps, node)
    }

    fn graph_nodes(&mut self, graph: &SimGraph) -> CuResult<Vec<u64>> {
        self.nodes_of(graph)
    }

    fn graph_instantiate(&mut self, graph: &SimGraph, flags: u64) -> CuResult<SimGraphExec> {
        self.instantiate_graph(graph, flags)
    }

    fn graph_exec_destroy(&mut self, exec: SimGraphExec) -> CuResult<()> {
        self.destroy_graph_exec(exec)
    }

    fn graph_launch(&mut self, exec: &SimGraphExec, stream: Option<&SimStream>, upload_only: bool) -> CuResult<()> {
        self.launch_graph(exec, stream, upload_only)
    }

    fn stream_begin_capture(&mut self, stream: Option<&SimStream>, mode: u32) -> CuResult<()> {
        self.begin_capture(stream, mode)
    }

    fn stream_end_capture(&mut self, stream: Option<&SimStream>) -> CuResult<SimGraph> {
        self.end_capture(stream)
    }

    fn stream_capture_info(&mut self, stream: Option<&SimStream>) -> CuResult<(u32, u64)> {
        self.capture_info(stream)
    }

    fn exchange_capture_mode(&mut self, mode: u32) -> CuResult<u32> {
        self.exchange_mode(mode)
    }

    fn launch_host_func_persistent(
        &mut self,
        stream: Option<&SimStream>,
        slot: std::sync::Arc<super::HostFuncSlot>,
    ) -> CuResult<Option<u64>> {
        self.host_func_persistent(stream, slot)
    }

    type Stream = SimStream;
    type Event = SimEvent;
    type Context = SimContext;
    type Module = SimModule;
    type Function = SimFunction;

    fn device_info(&self) -> DeviceInfo {
        let mut name = heapless::String::new();
        let _ = name.push_str("xen-vgpu simulated GPU (test double)");
        DeviceInfo {
            name,
            uuid: *b"vgpu-sim-device!",
            total_mem: self.total,
            cc_major: 9,
            cc_minor: 0,
            driver_version: 13000,
            simulated: true,
        }
    }

    fn device_attributes(&mut self) -> Vec<Result<i32, CuError>> {
        device_attribute_table()
    }

    fn pci_bus_id(&mut self) -> CuResult<String> {
        Ok("0000:00:00.0".to_owned())
    }

    // ---- contexts ----

    fn ctx_create(&mut self, flags: u32) -> CuResult<SimContext> {
        let id = next_id();
        self.contexts.insert(id, CtxState::new(flags));
        self.current = id;
        Ok(SimContext(id))
    }

    fn ctx_destroy(&mut self, ctx: SimContext) -> CuResult<()> {
        let id = ctx.0;
        if id == PRIMARY || self.contexts.remove(&id).is_none() {
            return Err(CuError::INVALID_HANDLE);
        }
        // Memory is dropped, which is the double's scrub.
        self.free_where(|a| a.ctx == id);
        self.drop_arrays_of(id);
        self.modules.retain(|_, m| m.ctx != Some(id));
        self.functions.retain(|_, f| f.ctx != Some(id));
        let captures: Vec<u64> =
            self.streams.values().filter(|s| s.ctx == id).filter_map(|s| s.capture.map(|c| c.0)).collect();
        self.streams.retain(|_, s| s.ctx != id);
        self.drop_abandoned_captures(captures);
        self.events.retain(|_, e| e.ctx != id);
        self.execs.retain(|_, (ctx, _)| *ctx != id);
        if self.current == id {
            self.current = PRIMARY;
        }
        Ok(())
    }

    fn set_context(&mut self, ctx: Option<&SimContext>) -> CuResult<()> {
        let id = ctx.map_or(PRIMARY, |c| c.0);
        if !self.contexts.contains_key(&id) {
            return Err(CuError::INVALID_HANDLE);
        }
        self.current = id;
        Ok(())
    }

    fn ctx_get_limit(&mut self, limit: u32) -> CuResult<u64> {
        let index = usize::try_from(limit).map_err(|_| CuError::INVALID_VALUE)?;
        self.ctx_state()?.limits.get(index).copied().ok_or(CuError::INVALID_VALUE)
    }

    fn ctx_set_limit(&mut self, limit: u32, value: u64) -> CuResult<()> {
        let index = usize::try_from(limit).map_err(|_| CuError::INVALID_VALUE)?;
        *self.ctx_state()?.limits.get_mut(index).ok_or(CuError::INVALID_VALUE)? = value;
        Ok(())
    }

    fn ctx_get_flags(&mut self) -> CuResult<u32> {
        Ok(self.ctx_state()?.flags)
    }

    fn ctx_set_flags(&mut self, flags: u32) -> CuResult<()> {
        self.ctx_state()?.flags = flags;
        Ok(())
    }

    fn ctx_get_api_version(&mut self) -> CuResult<u32> {
        self.ctx_state()?;
        Ok(API_VERSION)
    }

    fn ctx_get_stream_priority_range(&mut self) -> CuResult<(i32, i32)> {
        Ok((LEAST_PRIORITY, GREATEST_PRIORITY))
    }

    fn ctx_get_cache_config(&mut self) -> CuResult<u32> {
        Ok(self.ctx_state()?.cache_config)
    }

    fn ctx_set_cache_config(&mut self, config: u32) -> CuResult<()> {
        if config > MAX_CACHE_CONFIG {
            return Err(CuError::INVALID_VALUE);
        }
        self.ctx_state()?.cache_config = config;
        Ok(())
    }

    fn primary_ctx_set_flags(&mut self, flags: u32) -> CuResult<()> {
        self.contexts.entry(PRIMARY).or_insert_with(|| CtxState::new(0)).flags = flags;
        Ok(())
    }

    fn primary_ctx_flags(&mut self) -> CuResult<u32> {
        Ok(self.contexts.get(&PRIMARY).map_or(0, |c| c.flags))
    }

    fn synchronize(&mut self) -> CuResult<()> {
        if self.any_capture() {
            return Err(CuError::STREAM_CAPTURE_UNSUPPORTED);
        }
        self.flush_printf();
        Ok(())
    }

    // ---- memory ----

    fn mem_get_info(&mut self) -> CuResult<(u64, u64)> {
        Ok((self.total - self.used, self.total))
    }

    fn mem_alloc(&mut self, size: u64) -> CuResult<u64> {
        // Fresh device memory is not zeroed on a real GPU; fill it with a pattern so tests
        // that forget to initialise memory notice.
        self.allocate(size, 0xa5, self.current, Owner::User)
    }

    fn mem_alloc_pitch(&mut self, width: u64, height: u64, element_size: u32) -> CuResult<(u64, u64)> {
        if width == 0 || height == 0 || !matches!(element_size, 4 | 8 | 16) {
            return Err(CuError::INVALID_VALUE);
        }
        let pitch = width.checked_next_multiple_of(PITCH_ALIGN).ok_or(CuError::INVALID_VALUE)?;
        let size = pitch.checked_mul(height).ok_or(CuError::OUT_OF_MEMORY)?;
        let dptr = self.allocate(size, 0xa5, self.current, Owner::User)?;
        Ok((dptr, pitch))
    }

    fn mem_free(&mut self, dptr: u64) -> CuResult<()> {
        match self.allocs.get(&dptr) {
            Some(a) if a.owner == Owner::User => {}
            _ => return Err(CuError::INVALID_VALUE),
        }
        if let Some(alloc) = self.allocs.remove(&dptr) {
            // Dropping an exported allocation's mapping zeroes it and closes its memfd.
            self.used -= alloc.counted();
        }
        Ok(())
    }

    fn copy_htod(&mut self, dst: u64, src: &[u8], stream: Option<&SimStream>) -> CuResult<()> {
        self.not_capturing(stream)?;
        let (buf, off) = self.locate(dst, src.len() as u64)?;
        buf[off..off + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn copy_dtoh(&mut self, dst: &mut [u8], src: u64, stream: Option<&SimStream>) -> CuResult<()> {
        self.not_capturing(stream)?;
        let (buf, off) = self.locate(src, dst.len() as u64)?;
        dst.copy_from_slice(&buf[off..off + dst.len()]);
        Ok(())
    }

    fn copy_dtod(&mut self, dst: u64, src: u64, len: u64, stream: Option<&SimStream>) -> CuResult<()> {
        self.copy_on(GraphCopy::linear(CopyEnd::Device(src), CopyEnd::Device(dst), len), stream)
    }

    fn copy_pitched(
        &mut self,
        copy: &GraphCopy,
        shape: super::CopyShape,
        stream: Option<&SimStream>,
        _wait: bool,
    ) -> CuResult<()> {
        // The double's work is done in place (or recorded while capturing), so every copy is
        // complete on return; only its layout matters, and a plane is the first slice.
        let c = match shape {
            super::CopyShape::Volume => *copy,
            super::CopyShape::Plane | super::CopyShape::PlaneUnaligned => GraphCopy { depth: 1, ..*copy },
        };
        let c = self.linear_copy(c)?;
        self.copy_on(c, stream)
    }

    fn memset_pitched(&mut self, memset: &GraphMemset, stream: Option<&SimStream>) -> CuResult<()> {
        if let Some(graph) = self.capturing(stream)? {
            return self.record(graph, SimOp::Memset(*memset)).map(drop);
        }
        let elem = u64::from(memset.element_size);
        if !matches!(elem, 1 | 2 | 4) || memset.dst % elem != 0 || (memset.height > 1 && memset.pitch % elem != 0) {
            return Err(CuError::INVALID_VALUE);
        }
        self.memset_2d(memset)
    }

    fn memset_d8(&mut self, dst: u64, value: u8, count: u64, stream: Option<&SimStream>) -> CuResult<()> {
        if let Some(graph) = self.capturing(stream)? {
            let m = GraphMemset { dst, pitch: 0, value: value.into(), element_size: 1, width: count, height: 1 };
            return self.record(graph, SimOp::Memset(m)).map(drop);
        }
        let (buf, off) = self.locate(dst, count)?;
        buf[off..off + count as usize].fill(value);
        Ok(())
    }

    fn memset_d16(&mut self, dst: u64, value: u16, count: u64, stream: Option<&SimStream>) -> CuResult<()> {
        if let Some(graph) = self.capturing(stream)? {
            let m = GraphMemset { dst, pitch: 0, value: value.into(), element_size: 2, width: count, height: 1 };
            return self.record(graph, SimOp::Memset(m)).map(drop);
        }
        if dst % 2 != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let bytes = count.checked_mul(2).ok_or(CuError::INVALID_VALUE)?;
        let (buf, off) = self.locate(dst, bytes)?;
        for w in buf[off..off + bytes as usize].chunks_exact_mut(2) {
            w.copy_from_slice(&value.to_le_bytes());
        }
        Ok(())
    }

    fn memset_d32(&mut self, dst: u64, value: u32, count: u64, stream: Option<&SimStream>) -> CuResult<()> {
        if let Some(graph) = self.capturing(stream)? {
            let m = GraphMemset { dst, pitch: 0, value, element_size: 4, width: count, height: 1 };
            return self.record(graph, SimOp::Memset(m)).map(drop);
        }
        if dst % 4 != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let bytes = count.checked_mul(4).ok_or(CuError::INVALID_VALUE)?;
        let (buf, off) = self.locate(dst, bytes)?;
        for w in buf[off..off + bytes as usize].chunks_exact_mut(4) {
            w.copy_from_slice(&value.to_le_bytes());
        }
        Ok(())
    }

    // ---- IPC ----

    fn ipc_export(&mut self, dptr: u64) -> CuResult<Vec<u8>> {
        let alloc = self.allocs.get_mut(&dptr).filter(|a| a.owner == Owner::User).ok_or(CuError::INVALID_VALUE)?;
        if let Backing::Heap(bytes) = &alloc.data {
            let mut nonce = [0u8; 16];
            getrandom::fill(&mut nonce).map_err(|_| CuError::UNKNOWN)?;
            let mapping = shared::Mapping::export(&memfd_name(&nonce), bytes).map_err(|e| {
                tracing::warn!(error = %e, "simulated IPC export failed");
                CuError::OUT_OF_MEMORY
            })?;
            alloc.data = Backing::Exported(mapping, nonce);
        }
        match &alloc.data {
            Backing::Exported(m, nonce) => {
                let fd = m.memfd().ok_or(CuError::UNKNOWN)?;
                let size = m.as_slice().len() as u64;
                Ok(SimPayload { pid: std::process::id(), fd, size, nonce: *nonce }.encode())
            }
            Backing::Heap(_) | Backing::Imported(_) => Err(CuError::UNKNOWN),
        }
    }

    fn ipc_event_export(&mut self, event: &SimEvent) -> CuResult<Vec<u8>> {
        let e = self.events.get(&event.0).ok_or(CuError::INVALID_HANDLE)?;
        if e.flags & EVENT_INTERPROCESS == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        // The test double's work completes as it is queued, so every event is complete
        // wherever it is opened: the payload only has to name it (64 bytes, as the driver's).
        let mut payload = vec![0u8; 64];
        payload[..8].copy_from_slice(b"SIMEVENT");
        getrandom::fill(&mut payload[8..]).map_err(|_| CuError::UNKNOWN)?;
        Ok(payload)
    }

    fn ipc_event_open(&mut self, payload: &[u8]) -> CuResult<SimEvent> {
        if payload.len() != 64 || &payload[..8] != b"SIMEVENT" {
            return Err(CuError::INVALID_VALUE);
        }
        let id = next_id();
        let flags = EVENT_INTERPROCESS | EVENT_DISABLE_TIMING;
        self.events.insert(id, EventState { ctx: self.current, flags, recorded: None, captured: None });
        Ok(SimEvent(id))
    }

    fn ipc_open(&mut self, payload: &[u8], size: u64, flags: u32) -> CuResult<u64> {
        if flags != IPC_MEM_LAZY_ENABLE_PEER_ACCESS {
            return Err(CuError::INVALID_VALUE);
        }
        let p = SimPayload::decode(payload).filter(|p| p.size == size && size > 0).ok_or(CuError::INVALID_VALUE)?;
        let len = usize::try_from(size).map_err(|_| CuError::INVALID_VALUE)?;
        let mapping = shared::Mapping::import(p.pid, p.fd, &memfd_name(&p.nonce), len).map_err(|e| {
            tracing::debug!(error = %e, pid = p.pid, fd = p.fd, "simulated IPC open failed");
            CuError::INVALID_VALUE
        })?;
        let addr = self.place(size)?;
        self.allocs
            .insert(addr, SimAlloc { data: Backing::Imported(mapping), ctx: self.current, owner: Owner::Import });
        Ok(addr)
    }

    fn ipc_close(&mut self, dptr: u64) -> CuResult<()> {
        match self.allocs.get(&dptr) {
            Some(a) if a.owner == Owner::Import => {}
            _ => return Err(CuError::INVALID_VALUE),
        }
        self.allocs.remove(&dptr);
        Ok(())
    }

    // ---- modules, libraries, functions ----

    fn module_load(&mut self, image: &[u8]) -> CuResult<SimModule> {
        self.load(image, Some(self.current))
    }

    fn library_load(&mut self, image: &[u8]) -> CuResult<SimModule> {
        self.load(image, None)
    }

    fn module_unload(&mut self, module: SimModule) -> CuResult<()> {
        let id = module.0;
        let kind = self.modules.get(&id).map(|m| m.kind).ok_or(CuError::INVALID_HANDLE)?;
        if kind == ModuleKind::View {
            self.modules.remove(&id);
            return Ok(());
        }
        self.modules.retain(|_, m| m.root != id);
        self.functions.retain(|_, f| f.root != id);
        self.free_where(|a| a.owner == Owner::Module(id));
        Ok(())
    }

    fn module_get_function(&mut self, module: &SimModule, name: &CStr) -> CuResult<SimFunction> {
        let (m, holder) = self.module_holder(module)?;
        let entry =
            holder.entries.iter().find(|e| name.to_bytes() == e.name.as_bytes()).ok_or(CuError::NOT_FOUND)?.clone();
        let (ctx, root) = (m.ctx, m.root);
        Ok(self.add_function(false, ctx, root, &entry))
    }

    fn module_functions(&mut self, module: &SimModule) -> CuResult<Vec<SimFunction>> {
        let (m, holder) = self.module_holder(module)?;
        let (ctx, root, entries) = (m.ctx, m.root, holder.entries.clone());
        if entries.len() > super::MAX_MODULE_FUNCTIONS {
            return Err(CuError::NOT_SUPPORTED);
        }
        Ok(entries.iter().map(|e| self.add_function(false, ctx, root, e)).collect())
    }

    fn module_get_global(&mut self, module: &SimModule, name: &CStr) -> CuResult<(u64, u64)> {
        let (_, holder) = self.module_holder(module)?;
        let name = name.to_str().map_err(|_| CuError::NOT_FOUND)?;
        holder.globals.get(name).copied().ok_or(CuError::NOT_FOUND)
    }

    fn library_get_module(&mut self, library: &SimModule) -> CuResult<SimModule> {
        self.library(library)?;
        let id = next_id();
        let view = ModuleState {
            kind: ModuleKind::View,
            ctx: Some(self.current),
            root: library.0,
            entries: Vec::new(),
            globals: BTreeMap::new(),
        };
        self.modules.insert(id, view);
        Ok(SimModule(id))
    }

    fn library_get_kernel(&mut self, library: &SimModule, name: &CStr) -> CuResult<SimFunction> {
        let lib = self.library(library)?;
        let entry =
            lib.entries.iter().find(|e| name.to_bytes() == e.name.as_bytes()).ok_or(CuError::NOT_FOUND)?.clone();
        Ok(self.add_function(true, None, library.0, &entry))
    }

    fn library_get_global(&mut self, library: &SimModule, name: &CStr) -> CuResult<(u64, u64)> {
        let lib = self.library(library)?;
        let name = name.to_str().map_err(|_| CuError::NOT_FOUND)?;
        lib.globals.get(name).copied().ok_or(CuError::NOT_FOUND)
    }

    fn kernel_get_function(&mut self, kernel: &SimFunction) -> CuResult<SimFunction> {
        let k = self.function(kernel)?;
        if !k.kernel {
            return Err(CuError::INVALID_HANDLE);
        }
        let entry = PtxEntry { name: k.name.clone(), layout: k.layout.clone() };
        let root = k.root;
        Ok(self.add_function(false, Some(self.current), root, &entry))
    }

    fn func_get_attribute(&mut self, func: &SimFunction, attribute: u32) -> CuResult<i32> {
        use sys::CUfunction_attribute as F;
        let f = self.function(func)?;
        if attribute >= F::CU_FUNC_ATTRIBUTE_MAX as u32 {
            return Err(CuError::INVALID_VALUE);
        }
        if let Some(&value) = f.attributes.get(&attribute) {
            return Ok(value);
        }
        Ok(if attribute == F::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK as u32 {
            1024
        } else if attribute == F::CU_FUNC_ATTRIBUTE_NUM_REGS as u32 {
            16
        } else if attribute == F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as u32 {
            48 << 10 // CUDA's default opt-in limit.
        } else {
            0
        })
    }

    fn func_set_attribute(&mut self, func: &SimFunction, attribute: u32, value: i32) -> CuResult<()> {
        if attribute >= sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX as u32 {
            return Err(CuError::INVALID_VALUE);
        }
        let f = self.functions.get_mut(&func.0).ok_or(CuError::INVALID_HANDLE)?;
        f.attributes.insert(attribute, value);
        Ok(())
    }

    fn func_set_cache_config(&mut self, func: &SimFunction, config: u32) -> CuResult<()> {
        let f = self.functions.get_mut(&func.0).ok_or(CuError::INVALID_HANDLE)?;
        if config > MAX_CACHE_CONFIG {
            return Err(CuError::INVALID_VALUE);
        }
        f.cache_config = config;
        Ok(())
    }

    fn func_param_layout(&mut self, func: &SimFunction) -> CuResult<Vec<ParamSlot>> {
        Ok(self.function(func)?.layout.clone())
    }

    fn launch(
        &mut self,
        func: &SimFunction,
        config: &LaunchConfig,
        stream: Option<&SimStream>,
        params: &[u8],
        layout: &[ParamSlot],
    ) -> CuResult<()> {
        if let Some(graph) = self.capturing(stream)? {
            self.check_launch(func.0, config, params, layout)?;
            let (config, params, layout) = (config.clone(), params.to_vec(), layout.to_vec());
            return self.record(graph, SimOp::Kernel { func: func.0, config, params, layout }).map(drop);
        }
        self.launch_now(func.0, config, params, layout)
    }

    fn occupancy_max_active_blocks(
        &mut self,
        func: &SimFunction,
        block_size: i32,
        _dynamic_smem: u64,
        _flags: u32,
    ) -> CuResult<i32> {
        self.function(func)?;
        if block_size <= 0 {
            return Err(CuError::INVALID_VALUE);
        }
        Ok((THREADS_PER_SM / block_size).max(1))
    }

    #[allow(unsafe_code)] // The trait's contract, forwarded.
    unsafe fn attach_window(&mut self, base: std::ptr::NonNull<u8>, len: usize) -> CuResult<bool> {
        // SAFETY: the caller keeps `base .. base + len` mapped until the backend is dropped
        // (the trait's contract); the region only accesses it through atomics and copies.
        self.window = Some(unsafe { idm_core::RawRegion::new(base, len) });
        Ok(true)
    }

    fn copy_window_to_device(
        &mut self,
        dst: u64,
        offset: u64,
        len: u64,
        stream: Option<&SimStream>,
        _wait: bool,
    ) -> CuResult<()> {
        self.copy_on(GraphCopy::linear(CopyEnd::Window(offset), CopyEnd::Device(dst), len), stream)
    }

    fn copy_device_to_window(
        &mut self,
        offset: u64,
        src: u64,
        len: u64,
        stream: Option<&SimStream>,
        _wait: bool,
    ) -> CuResult<()> {
        self.copy_on(GraphCopy::linear(CopyEnd::Device(src), CopyEnd::Window(offset), len), stream)
    }

    fn launch_host_func(&mut self, stream: Option<&SimStream>, slot: super::HostFuncSlot) -> CuResult<()> {
        self.not_capturing(stream)?;
        // The test double runs each stream's work in place, in order: so does the function.
        // It waits in the worker's own thread, so a guest that never answers would stop the
        // whole zone: the wait is bounded.
        slot.run(Some(std::time::Duration::from_secs(30)));
        Ok(())
    }

    fn occupancy_available_dynamic_smem(&mut self, func: &SimFunction, blocks: i32, block_size: i32) -> CuResult<u64> {
        self.function(func)?;
        if blocks <= 0 || block_size <= 0 {
            return Err(CuError::INVALID_VALUE);
        }
        // The test double's multiprocessor has 228 KiB of shared memory, split evenly.
        Ok((228 * 1024 / blocks as u64).min(227 * 1024))
    }

    fn ctx_query_value(&mut self) -> CuResult<u64> {
        // The test double models nothing behind the driver's private table; it answers 0
        // (the real driver's answer on an H200 is 13). It only carries the request.
        Ok(0)
    }

    fn occupancy_max_active_clusters(&mut self, func: &SimFunction, config: &LaunchConfig) -> CuResult<i32> {
        self.function(func)?;
        if config.block.contains(&0) || config.grid.contains(&0) {
            return Err(CuError::INVALID_VALUE);
        }
        // One cluster per multiprocessor's worth of threads, at least one.
        let threads: u64 = config.block.iter().map(|&b| u64::from(b)).product();
        Ok(i32::try_from((THREADS_PER_SM as u64 / threads.max(1)).max(1)).unwrap_or(i32::MAX))
    }

    // ---- streams ----

    fn stream_create(&mut self, flags: u32, priority: i32) -> CuResult<SimStream> {
        if flags & !STREAM_NON_BLOCKING != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let id = next_id();
        // CUDA clamps priorities into the device's range.
        let priority = priority.clamp(GREATEST_PRIORITY, LEAST_PRIORITY);
        self.streams.insert(id, StreamState { ctx: self.current, flags, priority, capture: None });
        Ok(SimStream(id))
    }

    fn stream_synchronize(&mut self, stream: &SimStream) -> CuResult<()> {
        self.not_capturing(Some(stream))?;
        self.flush_printf();
        Ok(())
    }

    fn stream_query(&mut self, stream: Option<&SimStream>) -> CuResult<()> {
        self.not_capturing(stream)
    }

    fn stream_wait_event(&mut self, stream: Option<&SimStream>, event: &SimEvent, flags: u32) -> CuResult<()> {
        self.check_stream(stream)?;
        self.event(event)?;
        // `CU_EVENT_WAIT_EXTERNAL` is the only flag.
        if flags & !0x1 != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        self.note_event_wait(event.0, stream)
    }

    fn stream_get_flags(&mut self, stream: Option<&SimStream>) -> CuResult<u32> {
        Ok(self.check_stream(stream)?.map_or(0, |s| s.flags))
    }

    fn stream_get_priority(&mut self, stream: Option<&SimStream>) -> CuResult<i32> {
        Ok(self.check_stream(stream)?.map_or(0, |s| s.priority))
    }

    fn stream_destroy(&mut self, stream: SimStream) -> CuResult<()> {
        let state = self.streams.remove(&stream.0).ok_or(CuError::INVALID_HANDLE)?;
        self.drop_abandoned_captures(state.capture.map(|c| c.0));
        Ok(())
    }

    // ---- events ----

    fn event_create(&mut self, flags: u32) -> CuResult<SimEvent> {
        let interprocess_needs_no_timing = flags & EVENT_INTERPROCESS == 0 || flags & EVENT_DISABLE_TIMING != 0;
        if flags & !EVENT_FLAGS != 0 || !interprocess_needs_no_timing {
            return Err(CuError::INVALID_VALUE);
        }
        let id = next_id();
        self.events.insert(id, EventState { ctx: self.current, flags, recorded: None, captured: None });
        Ok(SimEvent(id))
    }

    fn event_destroy(&mut self, event: SimEvent) -> CuResult<()> {
        self.events.remove(&event.0).map(|_| ()).ok_or(CuError::INVALID_HANDLE)
    }

    fn event_record(&mut self, event: &SimEvent, stream: Option<&SimStream>, flags: u32) -> CuResult<()> {
        self.check_stream(stream)?;
        // `CU_EVENT_RECORD_EXTERNAL` is the only flag.
        if flags & !0x1 != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let e = self.events.get_mut(&event.0).ok_or(CuError::INVALID_HANDLE)?;
        e.recorded = Some(Instant::now());
        self.note_event_record(event.0, stream)
    }

    fn event_query(&mut self, event: &SimEvent) -> CuResult<()> {
        self.event(event).map(|_| ())
    }

    fn event_synchronize(&mut self, event: &SimEvent) -> CuResult<()> {
        self.event(event).map(|_| ())
    }

    fn event_elapsed_time(&mut self, start: &SimEvent, end: &SimEvent) -> CuResult<f32> {
        let (start, end) = (self.event(start)?, self.event(end)?);
        if (start.flags | end.flags) & EVENT_DISABLE_TIMING != 0 {
            return Err(CuError::INVALID_HANDLE);
        }
        let (Some(t0), Some(t1)) = (start.recorded, end.recorded) else {
            return Err(CuError::INVALID_HANDLE);
        };
        let ms = |d: std::time::Duration| d.as_secs_f32() * 1000.0;
        Ok(if t1 >= t0 { ms(t1 - t0) } else { -ms(t0 - t1) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_proto::LaunchAttr;

    /// The built-in kernels' PTX (bodies elided: the double never reads them), a kernel
    /// it does not know, a device function, and globals.
    const TEST_PTX: &str = "\
// .entry commented_out(.param .u64 x)
.version 8.0
.target sm_90
.address_size 64

.visible .global .align 4 .u32 counter;
.global .align 8 .b8 buf[64] = {1, 2, 3};
.global .f32 table[] = {1.0, 2.0, 3.0};
.global .u16 pair_a, pair_b[3];
.extern .global .u32 elsewhere;
.const .align 4 .u32 constant;
.file 1 \"odd; {name}.cu\"
.pragma \"odd; {string}\";

.func (.param .b32 ret) helper(.param .b32 x)
{
\tret;
}

.visible .entry fill_u32(
\t.param .u64 fill_u32_param_0,
\t.param .u32 fill_u32_param_1,
\t.param .u64 fill_u32_param_2
)
.maxntid 256, 1, 1
{
\t.reg .b64 %rd<3>;
\tst.global.u32 [%rd1], 0;
\t{ /* nested } */ }
\tret;
}

.visible .entry scale_add(.param .f32 a, .param .u64 .ptr .global .align 4 x, .param .u64 y, .param .s32 n)
{ ret; }

.entry add_one_i32(.param .u64 p, .param .s32 n) { ret; }
.entry empty { ret; }
.entry mixed(.param .u8 a, .param .align 16 .b8 s[24], .param .f64 d, .param .u16 h, .param .v2 .u32 v, .param .u64 p)
{ ret; }
\0";

    fn slots(s: &[(u32, u32)]) -> Vec<ParamSlot> {
        s.iter().map(|&(offset, size)| ParamSlot { offset, size }).collect()
    }

    fn grid(blocks: u32, threads: u32) -> LaunchConfig {
        LaunchConfig { grid: [blocks, 1, 1], block: [threads, 1, 1], shared_mem_bytes: 0, attrs: Vec::new() }
    }

    /// Packs parameters at their offsets.
    fn pack(params: &[(usize, &[u8])]) -> Vec<u8> {
        let len = params.iter().map(|(o, b)| o + b.len()).max().unwrap_or(0);
        let mut out = vec![0u8; len];
        for (o, b) in params {
            out[*o..*o + b.len()].copy_from_slice(b);
        }
        out
    }

    fn read_u32s(g: &mut SimGpu, dptr: u64, n: usize) -> Vec<u32> {
        let mut out = vec![0u8; n * 4];
        g.copy_dtoh(&mut out, dptr, None).unwrap();
        out.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect()
    }

    #[test]
    fn exported_memory_is_shared_through_a_memfd() {
        let (mut a, mut b) = (SimGpu::new(1 << 20), SimGpu::new(1 << 20));
        let p = a.mem_alloc(1000).unwrap();
        a.copy_htod(p, &[7; 1000], None).unwrap();
        let payload = a.ipc_export(p).unwrap();
        assert_eq!(a.ipc_export(p).unwrap(), payload, "the same memfd when exported again");
        assert_eq!(a.mem_get_info().unwrap().0, (1 << 20) - 1000, "exporting keeps the memory counted");
        // The payload must name a live export of exactly that size.
        assert_eq!(b.ipc_open(&payload, 999, 1), Err(CuError::INVALID_VALUE));
        assert_eq!(b.ipc_open(&payload[..39], 1000, 1), Err(CuError::INVALID_VALUE));
        assert_eq!(b.ipc_open(&payload, 1000, 0), Err(CuError::INVALID_VALUE), "exactly flag 1, as the driver");
        assert_eq!(b.ipc_open(&payload, 1000, 2), Err(CuError::INVALID_VALUE));
        let mut wrong_nonce = payload.clone();
        wrong_nonce[30] ^= 1;
        wrong_nonce[16..24].copy_from_slice(&1000u64.to_le_bytes());
        assert_eq!(b.ipc_open(&wrong_nonce, 1000, 1), Err(CuError::INVALID_VALUE), "another memfd's name");
        let q = b.ipc_open(&payload, 1000, 1).unwrap();
        assert_eq!(b.mem_get_info().unwrap().0, 1 << 20, "an import takes no memory");
        let mut got = vec![0u8; 1000];
        b.copy_dtoh(&mut got, q, None).unwrap();
        assert_eq!(got, vec![7; 1000]);
        b.memset_d8(q + 10, 3, 5, None).unwrap();
        let mut seen = [0u8; 16];
        a.copy_dtoh(&mut seen, p, None).unwrap();
        assert_eq!(seen[9..16], [7, 3, 3, 3, 3, 3, 7]);
        assert_eq!(b.copy_dtoh(&mut got, q + 1, None), Err(CuError::INVALID_VALUE));
        // Kernels reach imports like allocations.
        let f = {
            let m = b.module_load(TEST_PTX.as_bytes()).unwrap();
            b.module_get_function(&m, c"fill_u32").unwrap()
        };
        let params = pack(&[(0, &q.to_le_bytes()), (8, &9u32.to_le_bytes()), (16, &250u64.to_le_bytes())]);
        b.launch(&f, &grid(1, 250), None, &params, &slots(&[(0, 8), (8, 4), (16, 8)])).unwrap();
        assert_eq!(read_u32s(&mut a, p, 250), vec![9; 250]);
        // Imports are not freed by mem_free; allocations are not closed by ipc_close.
        assert_eq!(b.mem_free(q), Err(CuError::INVALID_VALUE));
        assert_eq!(a.ipc_close(p), Err(CuError::INVALID_VALUE));
        assert_eq!(b.ipc_export(q), Err(CuError::INVALID_VALUE), "an import is not exported again");
        // The exporter's free scrubs: a mapping still open sees zeros, a new open fails.
        a.mem_free(p).unwrap();
        b.copy_dtoh(&mut got, q, None).unwrap();
        assert_eq!(got, vec![0; 1000]);
        assert_eq!(b.ipc_open(&payload, 1000, 1), Err(CuError::INVALID_VALUE));
        b.ipc_close(q).unwrap();
        assert_eq!(b.ipc_close(q), Err(CuError::INVALID_VALUE));
        assert_eq!(b.copy_dtoh(&mut got, q, None), Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn memory_behaves_exactly() {
        let mut g = SimGpu::new(1 << 20);
        let a = g.mem_alloc(1000).unwrap();
        let b = g.mem_alloc(1000).unwrap();
        assert_ne!(a, b);
        g.copy_htod(a + 10, &[1, 2, 3], None).unwrap();
        g.memset_d32(b, 0xdead_beef, 4, None).unwrap();
        g.copy_dtod(a + 20, b, 16, None).unwrap();
        g.memset_d16(a + 30, 0x1234, 2, None).unwrap();
        let mut out = [0u8; 26];
        g.copy_dtoh(&mut out, a + 10, None).unwrap();
        assert_eq!(&out[..3], &[1, 2, 3]);
        assert_eq!(&out[10..14], &0xdead_beefu32.to_le_bytes());
        assert_eq!(&out[20..24], &[0x34, 0x12, 0x34, 0x12]);
        assert_eq!(g.copy_htod(a + 999, &[0, 0], None), Err(CuError::INVALID_VALUE));
        assert_eq!(g.memset_d16(a + 1, 0, 1, None), Err(CuError::INVALID_VALUE));
        assert_eq!(g.mem_alloc(2 << 20), Err(CuError::OUT_OF_MEMORY));
        let (p, pitch) = g.mem_alloc_pitch(1000, 3, 4).unwrap();
        assert_eq!(pitch, 1024);
        g.memset_d8(p + 3 * 1024 - 1, 7, 1, None).unwrap();
        assert_eq!(g.mem_alloc_pitch(1000, 3, 3), Err(CuError::INVALID_VALUE));
        g.mem_free(p).unwrap();
        g.mem_free(a).unwrap();
        assert_eq!(g.mem_free(a), Err(CuError::INVALID_VALUE));
        assert_eq!(g.mem_get_info().unwrap(), ((1 << 20) - 1000, 1 << 20));
        let foreign = SimStream(u64::MAX);
        assert_eq!(g.copy_htod(b, &[1], Some(&foreign)), Err(CuError::INVALID_HANDLE));
    }

    #[test]
    fn ptx_entries_are_laid_out_as_c_lays_out_parameters() {
        let ptx = parse_ptx(ptx_text(TEST_PTX.as_bytes()).unwrap()).unwrap();
        let layout = |name: &str| ptx.entries.iter().find(|e| e.name == name).map(|e| e.layout.clone());
        assert_eq!(layout("fill_u32"), Some(slots(&[(0, 8), (8, 4), (16, 8)])));
        assert_eq!(layout("scale_add"), Some(slots(&[(0, 4), (8, 8), (16, 8), (24, 4)])));
        assert_eq!(layout("add_one_i32"), Some(slots(&[(0, 8), (8, 4)])));
        assert_eq!(layout("empty"), Some(Vec::new()));
        // u8 at 0; 24 bytes aligned to 16; f64; u16; a .v2 .u32 (8 bytes, align 8); u64.
        assert_eq!(layout("mixed"), Some(slots(&[(0, 1), (16, 24), (40, 8), (48, 2), (56, 8), (64, 8)])));
        assert_eq!(layout("helper"), None, "a .func is no kernel");
        assert_eq!(layout("commented_out"), None);
        assert_eq!(ptx.entries.len(), 5);

        let bad = |text: &str| parse_ptx(text).map(|_| ());
        assert_eq!(bad(".version 8.0\n.entry k(.param .q32 x) { ret; }"), Err(CuError::INVALID_PTX), "unknown type");
        assert_eq!(bad(".version 8.0\n.entry k(.param .u32) { ret; }"), Err(CuError::INVALID_PTX), "no name");
        assert_eq!(bad(".version 8.0\n.entry k(.param .align 3 .b8 x[4]) { ret; }"), Err(CuError::INVALID_PTX));
        assert_eq!(bad(".version 8.0\n.entry k(.param .u32 x) { ret; "), Err(CuError::INVALID_PTX), "unterminated");
        assert_eq!(bad(".version 8.0\n.entry k(.param .u32 x { ret; }"), Err(CuError::INVALID_PTX), "unclosed list");
        assert_eq!(bad(".version 8.0\n}"), Err(CuError::INVALID_PTX));
    }

    #[test]
    fn ptx_globals_get_zeroed_memory_owned_by_the_module() {
        let ptx = parse_ptx(ptx_text(TEST_PTX.as_bytes()).unwrap()).unwrap();
        let sizes: Vec<(&str, u64)> = ptx.globals.iter().map(|g| (g.name.as_str(), g.size)).collect();
        assert_eq!(sizes, [("counter", 4), ("buf", 64), ("table", 12), ("pair_a", 2), ("pair_b", 6)]);

        let mut g = SimGpu::new(1 << 20);
        let m = g.module_load(TEST_PTX.as_bytes()).unwrap();
        let (free, _) = g.mem_get_info().unwrap();
        assert_eq!(free, (1 << 20) - (4 + 64 + 12 + 2 + 6));
        let (counter, size) = g.module_get_global(&m, c"counter").unwrap();
        assert_eq!(size, 4);
        let (buf, size) = g.module_get_global(&m, c"buf").unwrap();
        assert_eq!(size, 64);
        let mut out = [0xffu8; 64];
        g.copy_dtoh(&mut out, buf, None).unwrap();
        assert_eq!(out, [0; 64], "initialisers are ignored: zero");
        g.copy_htod(counter, &[9, 0, 0, 0], None).unwrap();
        assert_eq!(g.module_get_global(&m, c"elsewhere"), Err(CuError::NOT_FOUND));
        assert_eq!(g.module_get_global(&m, c"constant"), Err(CuError::NOT_FOUND));
        assert_eq!(g.module_get_function(&m, c"nope").map(|_| ()), Err(CuError::NOT_FOUND));
        assert_eq!(g.mem_free(counter), Err(CuError::INVALID_VALUE), "the module owns it");
        g.module_unload(m).unwrap();
        assert_eq!(g.mem_get_info().unwrap().0, 1 << 20);
        assert_eq!(g.copy_htod(counter, &[1], None), Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn only_ptx_text_is_accepted() {
        let mut g = SimGpu::new(1 << 20);
        let not_supported = Err(CuError::NOT_SUPPORTED);
        assert_eq!(g.module_load(b"\x7fELF\x02\x01\x01\0\0\0").map(|_| ()), not_supported, "a cubin");
        assert_eq!(g.module_load(&0xBA55_ED50u32.to_le_bytes()).map(|_| ()), not_supported, "a fat binary");
        assert_eq!(g.module_load(b".version 8.0\n.target sm_90").map(|_| ()), not_supported, "no NUL");
        assert_eq!(g.library_load(b"just text\0").map(|_| ()), not_supported, "no .version");
        assert_eq!(
            g.module_load(b".version 8.0\n.entry k(.param .q32 x) { ret; }\0").map(|_| ()),
            Err(CuError::INVALID_PTX)
        );
    }

    #[test]
    fn built_in_kernels_run_over_sim_memory() {
        let mut g = SimGpu::new(1 << 20);
        let m = g.module_load(TEST_PTX.as_bytes()).unwrap();
        let fill = g.module_get_function(&m, c"fill_u32").unwrap();
        let fill_layout = g.func_param_layout(&fill).unwrap();
        let p = g.mem_alloc(4096).unwrap();
        let params = pack(&[(0, &p.to_le_bytes()), (8, &7u32.to_le_bytes()), (16, &1000u64.to_le_bytes())]);
        g.launch(&fill, &grid(4, 256), None, &params, &fill_layout).unwrap();
        let words = read_u32s(&mut g, p, 1001);
        assert!(words[..1000].iter().all(|&w| w == 7));
        assert_eq!(words[1000], 0xa5a5_a5a5, "nothing past n");

        // y = a * x + y
        let scale_add = g.module_get_function(&m, c"scale_add").unwrap();
        let sa_layout = g.func_param_layout(&scale_add).unwrap();
        let (x, y) = (g.mem_alloc(16).unwrap(), g.mem_alloc(16).unwrap());
        let f32s = |v: [f32; 4]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        g.copy_htod(x, &f32s([1.0, 2.0, 3.0, 4.0]), None).unwrap();
        g.copy_htod(y, &f32s([10.0, 20.0, 30.0, 40.0]), None).unwrap();
        let params = pack(&[
            (0, &2.5f32.to_le_bytes()),
            (8, &x.to_le_bytes()),
            (16, &y.to_le_bytes()),
            (24, &3i32.to_le_bytes()),
        ]);
        let s = g.stream_create(1, 0).unwrap();
        g.launch(&scale_add, &grid(1, 32), Some(&s), &params, &sa_layout).unwrap();
        let ys: Vec<f32> = read_u32s(&mut g, y, 4).into_iter().map(f32::from_bits).collect();
        assert_eq!(ys, [12.5, 25.0, 37.5, 40.0]);

        // p[i] += 1, and the kernel that does nothing.
        let add_one = g.module_get_function(&m, c"add_one_i32").unwrap();
        let ao_layout = g.func_param_layout(&add_one).unwrap();
        g.launch(&add_one, &grid(1, 2), None, &pack(&[(0, &p.to_le_bytes()), (8, &2i32.to_le_bytes())]), &ao_layout)
            .unwrap();
        assert_eq!(read_u32s(&mut g, p, 3), [8, 8, 7]);
        let empty = g.module_get_function(&m, c"empty").unwrap();
        g.launch(&empty, &grid(1, 1), None, &[], &[]).unwrap();

        // Faults, refusals and bad launches.
        let beyond = pack(&[(0, &p.to_le_bytes()), (8, &7u32.to_le_bytes()), (16, &1025u64.to_le_bytes())]);
        assert_eq!(g.launch(&fill, &grid(1, 1), None, &beyond, &fill_layout), Err(CuError::ILLEGAL_ADDRESS));
        let wild = pack(&[(0, &0x10u64.to_le_bytes()), (8, &7u32.to_le_bytes()), (16, &1u64.to_le_bytes())]);
        assert_eq!(g.launch(&fill, &grid(1, 1), None, &wild, &fill_layout), Err(CuError::ILLEGAL_ADDRESS));
        let odd = pack(&[(0, &(p + 2).to_le_bytes()), (8, &7u32.to_le_bytes()), (16, &1u64.to_le_bytes())]);
        assert_eq!(g.launch(&fill, &grid(1, 1), None, &odd, &fill_layout), Err(CuError::MISALIGNED_ADDRESS));
        let mixed = g.module_get_function(&m, c"mixed").unwrap();
        let mixed_layout = g.func_param_layout(&mixed).unwrap();
        assert_eq!(g.launch(&mixed, &grid(1, 1), None, &[0; 72], &mixed_layout), Err(CuError::NOT_SUPPORTED));
        let params = pack(&[(0, &p.to_le_bytes()), (8, &7u32.to_le_bytes()), (16, &1u64.to_le_bytes())]);
        for bad in [grid(0, 1), grid(1, 0), grid(1, 1025)] {
            assert_eq!(g.launch(&fill, &bad, None, &params, &fill_layout), Err(CuError::INVALID_VALUE));
        }
        let mut cube = grid(1, 16);
        cube.block = [16, 16, 8];
        assert_eq!(g.launch(&fill, &cube, None, &params, &fill_layout), Err(CuError::INVALID_VALUE));
        assert_eq!(g.launch(&fill, &grid(1, 1), None, &params[..20], &fill_layout), Err(CuError::INVALID_VALUE));
        assert_eq!(g.launch(&fill, &grid(1, 1), None, &params, &ao_layout), Err(CuError::INVALID_VALUE));
        let mut with_attrs = grid(1, 1);
        with_attrs.attrs = vec![LaunchAttr { id: 8, value: [0; 4] }];
        g.launch(&fill, &with_attrs, None, &params, &fill_layout).unwrap();
        with_attrs.attrs = vec![LaunchAttr { id: 7, value: [0; 4] }];
        assert_eq!(g.launch(&fill, &with_attrs, None, &params, &fill_layout), Err(CuError::NOT_SUPPORTED));

        // Attributes and occupancy.
        assert_eq!(g.func_get_attribute(&fill, 0), Ok(1024));
        assert_eq!(g.func_get_attribute(&fill, 4), Ok(16));
        assert_eq!(g.func_get_attribute(&fill, 1), Ok(0));
        g.func_set_attribute(&fill, 8, 4096).unwrap();
        assert_eq!(g.func_get_attribute(&fill, 8), Ok(4096));
        assert_eq!(g.func_get_attribute(&fill, 1000), Err(CuError::INVALID_VALUE));
        g.func_set_cache_config(&fill, 2).unwrap();
        assert_eq!(g.func_set_cache_config(&fill, 4), Err(CuError::INVALID_VALUE));
        assert_eq!(g.occupancy_max_active_blocks(&fill, 256, 0, 0), Ok(8));
        assert_eq!(g.occupancy_max_active_blocks(&fill, 4096, 0, 0), Ok(1));
        assert_eq!(g.occupancy_max_active_blocks(&fill, 0, 0, 0), Err(CuError::INVALID_VALUE));

        g.module_unload(m).unwrap();
        assert_eq!(g.launch(&fill, &grid(1, 1), None, &params, &fill_layout), Err(CuError::INVALID_HANDLE));
    }

    #[test]
    fn libraries_kernels_and_views() {
        let mut g = SimGpu::new(1 << 20);
        let lib = g.library_load(TEST_PTX.as_bytes()).unwrap();
        assert_eq!(g.module_get_function(&lib, c"fill_u32").map(|_| ()), Err(CuError::INVALID_HANDLE));
        let k = g.library_get_kernel(&lib, c"fill_u32").unwrap();
        assert_eq!(g.library_get_kernel(&lib, c"nope").map(|_| ()), Err(CuError::NOT_FOUND));
        let layout = g.func_param_layout(&k).unwrap();
        let (counter, size) = g.library_get_global(&lib, c"counter").unwrap();
        assert_eq!(size, 4);
        let params = pack(&[(0, &counter.to_le_bytes()), (8, &5u32.to_le_bytes()), (16, &1u64.to_le_bytes())]);
        g.launch(&k, &grid(1, 1), None, &params, &layout).unwrap();
        assert_eq!(read_u32s(&mut g, counter, 1), [5]);
        let f = g.kernel_get_function(&k).unwrap();
        assert_eq!(g.kernel_get_function(&f).map(|_| ()), Err(CuError::INVALID_HANDLE), "not a kernel");
        assert_eq!(g.func_param_layout(&f).unwrap(), layout);
        let view = g.library_get_module(&lib).unwrap();
        assert_eq!(g.library_get_module(&view).map(|_| ()), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.module_get_global(&view, c"counter"), Ok((counter, 4)));
        let vf = g.module_get_function(&view, c"fill_u32").unwrap();
        g.module_unload(view).unwrap();
        g.launch(&vf, &grid(1, 1), None, &params, &layout).unwrap();
        g.module_unload(lib).unwrap();
        for func in [&k, &f, &vf] {
            assert_eq!(g.launch(func, &grid(1, 1), None, &params, &layout), Err(CuError::INVALID_HANDLE));
        }
        assert_eq!(g.mem_get_info().unwrap().0, 1 << 20);
    }

    #[test]
    fn contexts_own_what_was_made_in_them() {
        let mut g = SimGpu::new(1 << 20);
        let p = g.mem_alloc(1000).unwrap();
        assert_eq!(g.ctx_get_limit(0), Ok(1024));
        assert_eq!(g.ctx_get_limit(1), Ok(1 << 20));
        assert_eq!(g.ctx_get_limit(2), Ok(8 << 20));
        assert_eq!(g.ctx_get_limit(3), Ok(0));
        assert_eq!(g.ctx_get_limit(LIMIT_COUNT as u32), Err(CuError::INVALID_VALUE));
        assert_eq!(g.ctx_set_limit(99, 1), Err(CuError::INVALID_VALUE));
        assert_eq!(g.ctx_get_api_version(), Ok(3020));
        assert_eq!(g.ctx_get_stream_priority_range(), Ok((0, -5)));
        g.primary_ctx_set_flags(4).unwrap();
        assert_eq!(g.primary_ctx_flags(), Ok(4));

        let c = g.ctx_create(1).unwrap();
        assert_eq!(g.ctx_get_flags(), Ok(1));
        g.ctx_set_limit(0, 4096).unwrap();
        g.ctx_set_cache_config(2).unwrap();
        assert_eq!(g.ctx_set_cache_config(9), Err(CuError::INVALID_VALUE));
        let a = g.mem_alloc(5000).unwrap();
        let (pitched, _) = g.mem_alloc_pitch(100, 2, 4).unwrap();
        let m = g.module_load(TEST_PTX.as_bytes()).unwrap();
        let f = g.module_get_function(&m, c"fill_u32").unwrap();
        let s = g.stream_create(0, -3).unwrap();
        let e = g.event_create(0).unwrap();
        let (free_in_ctx, _) = g.mem_get_info().unwrap();
        assert!(free_in_ctx < (1 << 20) - 1000 - 5000 - 1024);

        // Switching keeps each context's settings apart.
        g.set_context(None).unwrap();
        assert_eq!(g.ctx_get_limit(0), Ok(1024));
        assert_eq!(g.ctx_get_cache_config(), Ok(0));
        assert_eq!(g.ctx_get_flags(), Ok(4));
        g.set_context(Some(&c)).unwrap();
        assert_eq!(g.ctx_get_limit(0), Ok(4096));
        assert_eq!(g.ctx_get_cache_config(), Ok(2));

        g.ctx_destroy(c).unwrap();
        assert_eq!(g.mem_get_info().unwrap().0, (1 << 20) - 1000, "everything made in it is freed");
        assert_eq!(g.mem_free(a), Err(CuError::INVALID_VALUE));
        assert_eq!(g.mem_free(pitched), Err(CuError::INVALID_VALUE));
        assert_eq!(g.module_get_function(&m, c"fill_u32").map(|_| ()), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.func_param_layout(&f), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.stream_synchronize(&s), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.event_query(&e), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.ctx_get_limit(0), Ok(1024), "the primary context is current again");
        assert_eq!(g.set_context(Some(&SimContext(u64::MAX))), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.ctx_destroy(SimContext(PRIMARY)), Err(CuError::INVALID_HANDLE));
        g.mem_free(p).unwrap();
    }

    #[test]
    fn streams_and_events_complete_at_once_and_time_in_order() {
        let mut g = SimGpu::new(1 << 20);
        let s = g.stream_create(1, -9).unwrap();
        assert_eq!(g.stream_get_flags(Some(&s)), Ok(1));
        assert_eq!(g.stream_get_priority(Some(&s)), Ok(-5), "clamped to the range");
        assert_eq!(g.stream_get_flags(None), Ok(0));
        assert_eq!(g.stream_get_priority(None), Ok(0));
        assert_eq!(g.stream_create(2, 0).map(|_| ()), Err(CuError::INVALID_VALUE));
        let start = g.event_create(0).unwrap();
        let end = g.event_create(1).unwrap();
        assert_eq!(g.event_query(&start), Ok(()), "never recorded: complete");
        assert_eq!(g.event_elapsed_time(&start, &end), Err(CuError::INVALID_HANDLE), "never recorded");
        g.event_record(&start, Some(&s), 0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        g.event_record(&end, None, 0).unwrap();
        g.stream_wait_event(Some(&s), &end, 0).unwrap();
        g.stream_query(Some(&s)).unwrap();
        g.stream_query(None).unwrap();
        g.event_synchronize(&end).unwrap();
        let ms = g.event_elapsed_time(&start, &end).unwrap();
        assert!(ms >= 1.0, "{ms}");
        assert!(g.event_elapsed_time(&end, &start).unwrap() <= 0.0);
        let untimed = g.event_create(EVENT_DISABLE_TIMING).unwrap();
        g.event_record(&untimed, None, 0).unwrap();
        assert_eq!(g.event_elapsed_time(&start, &untimed), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.event_create(EVENT_INTERPROCESS).map(|_| ()), Err(CuError::INVALID_VALUE));
        assert_eq!(g.event_create(0x80).map(|_| ()), Err(CuError::INVALID_VALUE));
        g.event_destroy(start).unwrap();
        g.stream_destroy(s).unwrap();
        assert_eq!(g.stream_destroy(SimStream(u64::MAX)), Err(CuError::INVALID_HANDLE));
        assert_eq!(g.event_query(&untimed), Ok(()));
        assert_eq!(g.event_destroy(SimEvent(u64::MAX)), Err(CuError::INVALID_HANDLE));
    }

    #[test]
    fn device_attributes_look_like_an_h100() {
        let mut g = SimGpu::new(1 << 20);
        let attrs = g.device_attributes();
        assert_eq!(attrs.len(), sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX as usize - 1);
        let attr = |i: usize| attrs[i - 1];
        assert_eq!([attr(1), attr(2), attr(3), attr(4)], [Ok(1024), Ok(1024), Ok(1024), Ok(64)]);
        assert_eq!([attr(5), attr(6), attr(7)], [Ok(i32::MAX), Ok(65535), Ok(65535)]);
        assert_eq!([attr(8), attr(10), attr(16), attr(31), attr(41)], [Ok(49152), Ok(32), Ok(132), Ok(1), Ok(1)]);
        assert_eq!([attr(75), attr(76)], [Ok(9), Ok(0)]);
        assert_eq!(g.pci_bus_id().unwrap(), "0000:00:00.0");
        assert!(g.device_info().simulated);
    }
}
