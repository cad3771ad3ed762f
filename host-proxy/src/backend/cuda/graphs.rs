//! Graphs and stream capture on the real driver (`cuGraph*`, `cuStreamBeginCapture_v2`, …).
//!
//! Graphs and executable graphs are ids in this backend's tables, like streams; nodes are
//! the driver's `CUgraphNode` values, only ever passed back together with a live graph (the
//! zone keeps one handle per node it has seen). Copy nodes take device addresses the zone
//! checked and window offsets this backend turns into addresses in the registered window,
//! which the driver reads or writes in place at every launch. A kernel node's parameters are
//! copied by the driver when the node is added, from a private buffer laid out by the
//! driver's own parameter layout (as a launch is). Host nodes call the zone's rendezvous word
//! through a slot this backend keeps for its whole life (the driver copies a node's callback
//! into clones and executable graphs, whose lifetimes are not tracked).

use super::*;
use crate::backend::{GraphNodeSpec, HostFuncSlot};
use std::sync::Arc;

/// A graph of a [`CudaGpu`] (an id, like [`CudaStream`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CudaGraph {
    id: u64,
}

/// An executable graph of a [`CudaGpu`] (an id, like [`CudaStream`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CudaGraphExec {
    id: u64,
}

/// Runs a graph's host node in the driver's callback thread, at every launch.
unsafe extern "C" fn run_persistent(data: *mut c_void) {
    // SAFETY: `data` is a slot kept in `CudaGpu::host_slots` (an `Arc` never dropped before
    // the backend, and so before every context whose work could call this).
    let slot = unsafe { &*data.cast::<HostFuncSlot>() };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slot.run(None)));
}

impl CudaGpu {
    /// The driver graph of `graph`.
    fn raw_graph(&self, graph: &CudaGraph) -> CuResult<sys::CUgraph> {
        self.graphs.get(&graph.id).copied().ok_or(CuError::INVALID_HANDLE)
    }

    /// Records a driver graph and returns its id.
    pub(super) fn add_graph(&mut self, raw: sys::CUgraph) -> CudaGraph {
        let id = next_id();
        self.graphs.insert(id, raw);
        CudaGraph { id }
    }

    pub(super) fn create_graph(&mut self) -> CuResult<CudaGraph> {
        let mut raw: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: valid out-pointer; flags must be 0.
        check(unsafe { (self.api.graph_create)(&mut raw, 0) })?;
        Ok(self.add_graph(raw))
    }

    pub(super) fn destroy_graph(&mut self, graph: CudaGraph) -> CuResult<()> {
        let raw = self.graphs.remove(&graph.id).ok_or(CuError::INVALID_HANDLE)?;
        // SAFETY: a live graph, now out of the table, so destroyed once.
        check(unsafe { (self.api.graph_destroy)(raw) })
    }

    pub(super) fn clone_graph(&mut self, graph: &CudaGraph) -> CuResult<CudaGraph> {
        let original = self.raw_graph(graph)?;
        let mut raw: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a live graph.
        check(unsafe { (self.api.graph_clone)(&mut raw, original) })?;
        Ok(self.add_graph(raw))
    }

    pub(super) fn find_in_clone(&mut self, clone: &CudaGraph, original: usize) -> CuResult<usize> {
        let g = self.raw_graph(clone)?;
        let mut out: sys::CUgraphNode = std::ptr::null_mut();
        // SAFETY: valid out-pointer; `original` is a node of the graph `g` was cloned from
        // (the zone keeps node values only with their live graph), `g` is live.
        check(unsafe { (self.api.graph_node_find_in_clone)(&mut out, original as sys::CUgraphNode, g) })?;
        Ok(out as usize)
    }

    pub(super) fn add_graph_node(
        &mut self,
        graph: &CudaGraph,
        deps: &[usize],
        node: GraphNodeSpec<'_, CudaFunction>,
    ) -> CuResult<usize> {
        let g = self.raw_graph(graph)?;
        let deps: SmallVec<[sys::CUgraphNode; 8]> = deps.iter().map(|&d| d as sys::CUgraphNode).collect();
        let deps_ptr = if deps.is_empty() { std::ptr::null() } else { deps.as_ptr() };
        let mut out: sys::CUgraphNode = std::ptr::null_mut();
        self.enter()?;
        let ctx = self.raw_context(self.current)?;
        let rc = match node {
            GraphNodeSpec::Empty => {
                // SAFETY: valid out-pointer; a live graph; `deps` are nodes of it (the zone
                // checked each belongs to this graph), `deps.len()` of them.
                unsafe { (self.api.graph_add_empty_node)(&mut out, g, deps_ptr, deps.len()) }
            }
            GraphNodeSpec::Kernel { func, config, params, layout } => {
                if !config.attrs.is_empty() {
                    return Err(CuError::NOT_SUPPORTED);
                }
                let kind = self.function_kind(func)?;
                let driver_layout = self.param_layout(func)?;
                if driver_layout != layout {
                    return Err(CuError::INVALID_VALUE);
                }
                let mut buffer = ParamBuffer::new(params);
                let mut pointers = buffer.pointers(layout)?;
                let (f, kern) = match kind {
                    FunctionKind::Function(f) => (f, std::ptr::null_mut()),
                    FunctionKind::Kernel(k) => (std::ptr::null_mut(), k),
                };
                let p = sys::CUDA_KERNEL_NODE_PARAMS_v2_st {
                    func: f,
                    gridDimX: config.grid[0],
                    gridDimY: config.grid[1],
                    gridDimZ: config.grid[2],
                    blockDimX: config.block[0],
                    blockDimY: config.block[1],
                    blockDimZ: config.block[2],
                    sharedMemBytes: config.shared_mem_bytes,
                    kernelParams: if pointers.is_empty() { std::ptr::null_mut() } else { pointers.as_mut_ptr() },
                    extra: std::ptr::null_mut(),
                    kern,
                    ctx,
                };
                // SAFETY: as for the empty node; `p` names a live function or kernel and
                // holds one pointer per parameter the driver reports for it, each into
                // `buffer` (checked by `pointers`); the driver copies the values before it
                // returns.
                unsafe { (self.api.graph_add_kernel_node)(&mut out, g, deps_ptr, deps.len(), &p) }
            }
            GraphNodeSpec::Memset(m) => {
                let p = sys::CUDA_MEMSET_NODE_PARAMS_st {
                    dst: m.dst,
                    pitch: usize::try_from(m.pitch).map_err(|_| CuError::INVALID_VALUE)?,
                    value: m.value,
                    elementSize: m.element_size,
                    width: usize::try_from(m.width).map_err(|_| CuError::INVALID_VALUE)?,
                    height: usize::try_from(m.height).map_err(|_| CuError::INVALID_VALUE)?,
                };
                // SAFETY: as for the empty node; `p` is the zone's checked range of its own
                // allocation; `ctx` is the current, live context.
                unsafe { (self.api.graph_add_memset_node)(&mut out, g, deps_ptr, deps.len(), &p, ctx) }
            }
            GraphNodeSpec::Memcpy(c) => {
                let p = self.raw_copy(&c)?;
                // SAFETY: as for the empty node; `p` has `CUDA_MEMCPY3D`'s layout (asserted),
                // device sides are the zone's checked ranges, window sides lie in the window
                // registered with the driver (mapped until this backend is dropped).
                unsafe { (self.api.graph_add_memcpy_node)(&mut out, g, deps_ptr, deps.len(), &p, ctx) }
            }
            GraphNodeSpec::Host(slot) => {
                let p = sys::CUDA_HOST_NODE_PARAMS_st {
                    fn_: Some(run_persistent),
                    userData: Arc::as_ptr(&slot).cast_mut().cast(),
                };
                self.host_slots.push(slot);
                // SAFETY: as for the empty node; `userData` is kept alive in `host_slots`
                // for this backend's life.
                unsafe { (self.api.graph_add_host_node)(&mut out, g, deps_ptr, deps.len(), &p) }
            }
        };
        check(rc)?;
        Ok(out as usize)
    }

    pub(super) fn nodes_of(&mut self, graph: &CudaGraph) -> CuResult<Vec<usize>> {
        let g = self.raw_graph(graph)?;
        let mut count = 0usize;
        // SAFETY: a live graph; NULL nodes asks for the count only.
        check(unsafe { (self.api.graph_get_nodes)(g, std::ptr::null_mut(), &mut count) })?;
        if count == 0 {
            // The driver refuses a node array with room for none (CUDA_ERROR_INVALID_VALUE,
            // measured on driver 580): an empty graph, such as the one torch.compile's CUDA
            // graph trees capture first, has no nodes to fetch.
            return Ok(Vec::new());
        }
        let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
        // SAFETY: room for `count` nodes; the driver writes at most `count` and sets
        // `count` to how many there are.
        check(unsafe { (self.api.graph_get_nodes)(g, nodes.as_mut_ptr(), &mut count) })?;
        nodes.truncate(count);
        Ok(nodes.into_iter().map(|n| n as usize).collect())
    }

    pub(super) fn instantiate_graph(&mut self, graph: &CudaGraph, flags: u64) -> CuResult<CudaGraphExec> {
        let g = self.raw_graph(graph)?;
        self.enter()?;
        let mut raw: sys::CUgraphExec = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a live graph; the driver validates `flags`.
        check(unsafe { (self.api.graph_instantiate)(&mut raw, g, flags) })?;
        let id = next_id();
        self.graph_execs.insert(id, Owned { raw, ctx: self.current });
        Ok(CudaGraphExec { id })
    }

    pub(super) fn destroy_graph_exec(&mut self, exec: CudaGraphExec) -> CuResult<()> {
        let entry = self.graph_execs.get(&exec.id).copied().ok_or(CuError::INVALID_HANDLE)?;
        self.make_current(entry.ctx)?;
        self.graph_execs.remove(&exec.id);
        // SAFETY: a live executable graph, now out of the table, so destroyed once.
        check(unsafe { (self.api.graph_exec_destroy)(entry.raw) })
    }

    pub(super) fn launch_graph(
        &mut self,
        exec: &CudaGraphExec,
        stream: Option<&CudaStream>,
        upload_only: bool,
    ) -> CuResult<()> {
        let raw = self.graph_execs.get(&exec.id).map(|e| e.raw).ok_or(CuError::INVALID_HANDLE)?;
        let stream = self.stream_or_null(stream)?;
        self.enter()?;
        let rc = if upload_only {
            // SAFETY: a live executable graph; `stream` is NULL or live.
            unsafe { (self.api.graph_upload)(raw, stream) }
        } else {
            // SAFETY: as above.
            unsafe { (self.api.graph_launch)(raw, stream) }
        };
        check(rc)
    }

    pub(super) fn begin_capture(&mut self, stream: Option<&CudaStream>, mode: u32) -> CuResult<()> {
        let stream = self.stream_or_null(stream)?;
        self.enter()?;
        // SAFETY: `stream` is NULL (refused by the driver) or live; the driver validates
        // `mode`.
        check(unsafe { (self.api.stream_begin_capture)(stream, mode) })
    }

    pub(super) fn end_capture(&mut self, stream: Option<&CudaStream>) -> CuResult<CudaGraph> {
        let stream = self.stream_or_null(stream)?;
        self.enter()?;
        let mut raw: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: `stream` is NULL or live; valid out-pointer.
        check(unsafe { (self.api.stream_end_capture)(stream, &mut raw) })?;
        Ok(self.add_graph(raw))
    }

    pub(super) fn capture_info(&mut self, stream: Option<&CudaStream>) -> CuResult<(u32, u64)> {
        let stream = self.stream_or_null(stream)?;
        self.enter()?;
        let (mut status, mut id): (c_uint, u64) = (0, 0);
        let null = std::ptr::null_mut();
        // SAFETY: `stream` is NULL or live; valid out-pointers for status and id, NULL for
        // the optional graph, dependencies, edge data and count.
        check(unsafe { (self.api.stream_get_capture_info)(stream, &mut status, &mut id, null, null, null, null) })?;
        Ok((status, id))
    }

    pub(super) fn exchange_mode(&mut self, mode: u32) -> CuResult<u32> {
        let mut m: c_uint = mode;
        // SAFETY: a valid in/out pointer; the driver validates the mode.
        check(unsafe { (self.api.thread_exchange_capture_mode)(&mut m) })?;
        Ok(m)
    }

    pub(super) fn host_func_persistent(
        &mut self,
        stream: Option<&CudaStream>,
        slot: Arc<HostFuncSlot>,
    ) -> CuResult<Option<usize>> {
        let stream = self.stream_or_null(stream)?;
        self.enter()?;
        let data = Arc::as_ptr(&slot).cast_mut().cast();
        self.host_slots.push(slot);
        // SAFETY: `stream` is NULL or live; `data` is kept alive in `host_slots` for this
        // backend's life, and `run_persistent` only borrows it.
        check(unsafe { (self.api.launch_host_func)(stream, Some(run_persistent), data) })?;
        // On a capturing stream the function is now the capture's one current dependency.
        let (mut status, mut id): (c_uint, u64) = (0, 0);
        let (mut deps, mut count): (*const sys::CUgraphNode, usize) = (std::ptr::null(), 0);
        let null = std::ptr::null_mut();
        let deps_out = (&mut deps as *mut *const sys::CUgraphNode).cast();
        let count_out = (&mut count as *mut usize).cast();
        // SAFETY: `stream` is NULL or live; valid out-pointers for status, id, the
        // dependencies (an array the driver owns) and their count; NULL for the rest.
        let rc = unsafe {
            (self.api.stream_get_capture_info)(stream, &mut status, &mut id, null, deps_out, null, count_out)
        };
        if check(rc).is_err() || status != crate::backend::CAPTURE_ACTIVE || count != 1 || deps.is_null() {
            return Ok(None);
        }
        // SAFETY: the driver's array holds `count` (1) nodes, valid until the next call on
        // this stream.
        Ok(Some(unsafe { deps.read() } as usize))
    }

    /// Destroys every graph (teardown, before the primary context goes).
    pub(super) fn destroy_all_graphs(&mut self) {
        let execs: Vec<Owned<sys::CUgraphExec>> = self.graph_execs.drain().map(|(_, e)| e).collect();
        for e in execs {
            if self.make_current(e.ctx).is_ok() {
                // SAFETY: a live executable graph, out of the table now.
                let _ = unsafe { (self.api.graph_exec_destroy)(e.raw) };
            }
        }
        for (_, raw) in self.graphs.drain() {
            // SAFETY: a live graph, out of the table now.
            let _ = unsafe { (self.api.graph_destroy)(raw) };
        }
    }
}
