//! Graphs and stream capture: the zone's side of `cuGraph*`, `cuStreamBeginCapture` and
//! friends.
//!
//! Graphs live in the backend's driver, so a replay is one request and costs what a native
//! `cuGraphLaunch` costs plus one posted message. The zone keeps handles for graphs
//! (context-independent, as in CUDA: they go with the zone), executable graphs (made in the
//! current context and destroyed with it) and the nodes the guest has seen (made on first
//! sight, one per node, dropped with their graph), and checks every node's ranges as it
//! checks the same operation issued on a stream: device ranges inside one of the zone's own
//! ranges, window ranges inside the window. Work captured from a stream goes through the
//! ordinary request handlers, so it is checked there.
//!
//! What a capture must not record is refused while the zone has one open
//! ([`Zone::captures_active`]): a staged copy (its window bytes are reused as soon as it is
//! answered, so a replay would read whatever is there then) and a one-shot host function
//! (its callback frees itself after the first run); the guest asks for
//! `HostFuncPersistent` on a capturing stream instead. The worker's throttle never
//! synchronises while a capture is open (that would invalidate it).

use super::*;
use crate::backend::{CopyEnd, GraphCopy, GraphMemset, GraphNodeSpec, CAPTURE_ACTIVE};

/// Host functions a zone may keep for graphs (each is held by its backend for the zone's
/// life, since the driver copies a node's callback into clones and executable graphs);
/// more answer `CUDA_ERROR_OUT_OF_MEMORY`.
pub const MAX_PERSISTENT_HOST_FUNCS: u32 = 1024;
/// Dependencies one node may name.
const MAX_DEPS: usize = 4096;
/// Node handles one `GraphGetNodes` reply carries (the guest asks again for more).
const MAX_NODES_PER_REPLY: usize = 8192;
/// `CU_STREAM_CAPTURE_MODE_RELAXED`, the largest capture mode.
const MAX_CAPTURE_MODE: u32 = 2;
/// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED` and `…_UNJOINED`: the capture ended with an error.
const CAPTURE_ENDED_BADLY: [u32; 2] = [901, 904];

/// A node the guest holds a handle for.
pub(super) struct NodeEntry<N> {
    pub(super) graph: Handle,
    pub(super) node: N,
}

/// Bytes from the first to one past the last byte of a pitched 3-D block: `depth` slices of
/// `height` rows of `width` bytes, rows `pitch` apart, slices `pitch * slice_rows` apart.
/// Zero-sized or self-overlapping layouts are `CUDA_ERROR_INVALID_VALUE`.
pub(super) fn block_extent(width: u64, height: u64, depth: u64, pitch: u64, slice_rows: u64) -> CuResult<u64> {
    let bad = width == 0 || height == 0 || depth == 0;
    if bad || (height > 1 && pitch < width) || (depth > 1 && (pitch < width || slice_rows < height)) {
        return Err(CuError::INVALID_VALUE);
    }
    let slice = pitch.checked_mul(slice_rows).ok_or(CuError::INVALID_VALUE)?;
    let last_slice = (depth - 1).checked_mul(slice).ok_or(CuError::INVALID_VALUE)?;
    let last_row = (height - 1).checked_mul(pitch).ok_or(CuError::INVALID_VALUE)?;
    last_slice.checked_add(last_row).and_then(|o| o.checked_add(width)).ok_or(CuError::INVALID_VALUE)
}

impl<B: GpuBackend> Zone<B> {
    /// The backend nodes that `deps` (8-byte little-endian node handles) name, each a node
    /// of `graph`.
    fn graph_deps(&self, graph: Handle, deps: &[u8]) -> CuResult<Vec<B::GraphNode>> {
        if deps.len() % 8 != 0 || deps.len() / 8 > MAX_DEPS {
            return Err(CuError::INVALID_VALUE);
        }
        deps.chunks_exact(8)
            .map(|c| {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(c);
                let e = self.graph_nodes.get(Handle(u64::from_le_bytes(raw)))?;
                if e.graph != graph {
                    return Err(CuError::INVALID_VALUE);
                }
                Ok(e.node)
            })
            .collect()
    }

    /// The handle of `node` of `graph`: made on first sight, the same one afterwards.
    fn node_handle(&mut self, graph: Handle, node: B::GraphNode) -> CuResult<Handle> {
        if let Some(&h) = self.node_handles.get(&(graph, node)) {
            return Ok(h);
        }
        self.reserve()?;
        let h = self.graph_nodes.insert(NodeEntry { graph, node }).map_err(|_| CuError::OUT_OF_MEMORY)?;
        self.node_handles.insert((graph, node), h);
        Ok(h)
    }

    /// Forgets the node handles of `graph` (destroyed) and its hidden nodes.
    fn forget_nodes(&mut self, graph: Handle, nodes: &[B::GraphNode]) {
        for n in nodes {
            self.hidden_nodes.remove(n);
        }
        self.graph_nodes.remove_where(|_, n| n.graph == graph);
        self.node_handles.retain(|&(g, _), _| g != graph);
    }

    /// Registers a graph the backend just made (destroying it again if no handle is left).
    fn insert_graph(&mut self, graph: B::Graph) -> CuResult<Handle> {
        if self.reserve().is_err() {
            let _ = self.backend.graph_destroy(graph);
            return Err(CuError::OUT_OF_MEMORY);
        }
        Ok(self.graphs.insert(graph)?)
    }

    /// Adds `spec` to `graph` after `deps` and returns the new node's handle; a `hidden` one
    /// (a helper of libvgpu's) is left out of node lists.
    fn add_node(
        &mut self,
        graph: Handle,
        deps: &[u8],
        spec: GraphNodeSpec<'_, B::Function>,
        hidden: bool,
    ) -> CuResult<Handle> {
        let deps = self.graph_deps(graph, deps)?;
        let g = self.graphs.get(graph)?;
        let node = self.backend.graph_add_node(g, &deps, spec)?;
        if hidden {
            self.hidden_nodes.insert(node);
        }
        self.node_handle(graph, node)
    }

    /// Whether `stream` is capturing right now (only asked while the zone has a capture
    /// open; a query the driver refuses — the legacy stream during a global capture — counts
    /// as capturing, since what it guards must not run then either).
    pub(super) fn stream_is_capturing(&mut self, stream: Handle) -> CuResult<bool> {
        if self.captures_active == 0 {
            return Ok(false);
        }
        let s = stream_of(&self.streams, stream)?;
        Ok(self.backend.stream_capture_info(s).map_or(true, |(status, _)| status == CAPTURE_ACTIVE))
    }

    /// `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` when `stream` is capturing: for what a graph
    /// must not record (see the module docs).
    pub(super) fn refuse_if_capturing(&mut self, stream: Handle) -> CuResult<()> {
        if self.stream_is_capturing(stream)? {
            return Err(CuError::STREAM_CAPTURE_UNSUPPORTED);
        }
        Ok(())
    }

    /// The host-function slot for window offset `slot` (see `ZoneCtx::host_func`).
    pub(super) fn host_func_slot(&self, slot: u64) -> CuResult<crate::backend::HostFuncSlot> {
        // The window's mapping, kept until after the backend (`attach_window`, or
        // `attach_grant_window` over Xen); without one, host functions are not offered.
        let (base, len) = self.window_at.ok_or(CuError::NOT_SUPPORTED)?;
        let slot = usize::try_from(slot).map_err(|_| CuError::INVALID_VALUE)?;
        if slot % 8 != 0 || slot.checked_add(8).is_none_or(|end| end > len) {
            return Err(CuError::INVALID_VALUE);
        }
        let word = std::ptr::NonNull::new(base.as_ptr().wrapping_add(slot)).ok_or(CuError::INVALID_VALUE)?;
        #[allow(unsafe_code)]
        // SAFETY: `word` is an 8-byte aligned word inside the window (checked above; the
        // window starts page-aligned), which `window_region` or `window_keep` keeps mapped
        // until after the backend — and with it every context whose streams or graphs could
        // still run the function — is dropped; the guest and the slot only access it
        // atomically.
        Ok(unsafe { crate::backend::HostFuncSlot::new(word) })
    }

    /// A slot for a host function that may run many times, counted against
    /// [`MAX_PERSISTENT_HOST_FUNCS`].
    fn persistent_slot(&mut self, slot: u64) -> CuResult<std::sync::Arc<crate::backend::HostFuncSlot>> {
        let slot = self.host_func_slot(slot)?;
        if self.persistent_host_funcs >= MAX_PERSISTENT_HOST_FUNCS {
            return Err(CuError::OUT_OF_MEMORY);
        }
        self.persistent_host_funcs += 1;
        Ok(std::sync::Arc::new(slot))
    }

    /// Releases every graph and executable graph (teardown).
    pub(super) fn release_graphs(&mut self) {
        for e in self.graph_execs.drain() {
            if let Err(e) = self.backend.graph_exec_destroy(e.obj) {
                tracing::warn!(error = %e, "graph exec destroy failed during teardown");
            }
        }
        for g in self.graphs.drain() {
            if let Err(e) = self.backend.graph_destroy(g) {
                tracing::warn!(error = %e, "graph destroy failed during teardown");
            }
        }
        self.graph_nodes.drain().for_each(drop);
        self.node_handles.clear();
        self.hidden_nodes.clear();
    }

    // ---- the requests (called by `ZoneCtx`'s `Api` methods) ----

    pub(super) fn graph_create(&mut self) -> CuResult<Handle> {
        self.reserve()?;
        let g = self.backend.graph_create()?;
        self.insert_graph(g)
    }

    pub(super) fn graph_destroy(&mut self, graph: Handle) -> CuResult<()> {
        let nodes = self.backend.graph_nodes(self.graphs.get(graph)?).unwrap_or_default();
        let g = self.graphs.remove(graph)?;
        self.forget_nodes(graph, &nodes);
        self.backend.graph_destroy(g)
    }

    pub(super) fn graph_clone(&mut self, graph: Handle) -> CuResult<Handle> {
        self.reserve()?;
        let original = self.graphs.get(graph)?;
        let hidden: Vec<B::GraphNode> =
            self.backend.graph_nodes(original)?.into_iter().filter(|n| self.hidden_nodes.contains(n)).collect();
        let g = self.backend.graph_clone(self.graphs.get(graph)?)?;
        // Helper nodes stay hidden in the clone.
        for n in hidden {
            if let Ok(c) = self.backend.graph_find_in_clone(&g, n) {
                self.hidden_nodes.insert(c);
            }
        }
        self.insert_graph(g)
    }

    pub(super) fn graph_instantiate(&mut self, graph: Handle, flags: u64) -> CuResult<Handle> {
        self.reserve()?;
        let e = self.backend.graph_instantiate(self.graphs.get(graph)?, flags)?;
        Ok(self.graph_execs.insert(Obj { obj: e, ctx: self.current })?)
    }

    pub(super) fn graph_exec_destroy(&mut self, exec: Handle) -> CuResult<()> {
        let e = self.graph_execs.remove(exec)?;
        self.backend.graph_exec_destroy(e.obj)
    }

    pub(super) fn graph_launch(&mut self, exec: Handle, stream: Handle, upload_only: bool) -> CuResult<()> {
        let e = &self.graph_execs.get(exec)?.obj;
        let s = stream_of(&self.streams, stream)?;
        self.backend.graph_launch(e, s, upload_only)?;
        // The graph's kernels are not tracked: if any module of the zone may print, look for
        // device output after the next synchronisation.
        if let Some(o) = &self.device_output {
            let may_print = |m: &ModEntry<B::Module>| m.may_print;
            if !upload_only
                && (self.modules.iter().any(|(_, m)| may_print(m)) || self.libraries.iter().any(|(_, m)| may_print(m)))
            {
                o.note_launch();
            }
        }
        Ok(())
    }

    /// (node count, handles of up to `want` nodes from `first` on, as 8-byte little-endian
    /// values).
    pub(super) fn graph_get_nodes(&mut self, graph: Handle, first: u32, want: u32) -> CuResult<(u64, Vec<u8>)> {
        let mut nodes = self.backend.graph_nodes(self.graphs.get(graph)?)?;
        nodes.retain(|n| !self.hidden_nodes.contains(n));
        let rest = nodes.get(first as usize..).unwrap_or_default();
        let take = rest.len().min(want as usize).min(MAX_NODES_PER_REPLY);
        let mut out = Vec::with_capacity(take * 8);
        for &n in &rest[..take] {
            out.extend_from_slice(&self.node_handle(graph, n)?.0.to_le_bytes());
        }
        Ok((nodes.len() as u64, out))
    }

    pub(super) fn graph_add_kernel_node(&mut self, req: GraphAddKernelNode) -> CuResult<Handle> {
        let GraphAddKernelNode { graph, deps, func, config, params } = req;
        if config.grid.contains(&0) || config.block.contains(&0) {
            return Err(CuError::INVALID_VALUE);
        }
        self.layout(func)?;
        let deps = self.graph_deps(graph, &deps)?;
        let entry = func_of(&self.functions, &self.kernels, func)?;
        let layout = entry.layout.as_deref().unwrap_or_default();
        params_cover(layout, &params)?;
        let g = self.graphs.get(graph)?;
        let spec = GraphNodeSpec::Kernel { func: &entry.func, config: &config, params: &params, layout };
        let node = self.backend.graph_add_node(g, &deps, spec)?;
        self.node_handle(graph, node)
    }

    pub(super) fn graph_add_memset_node(&mut self, req: GraphAddMemsetNode) -> CuResult<Handle> {
        if !matches!(req.element_size, 1 | 2 | 4) || req.dst % u64::from(req.element_size) != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let row = bytes_of(req.width, u64::from(req.element_size))?;
        self.check_range(req.dst, block_extent(row, req.height, 1, req.pitch, req.height)?)?;
        let m = GraphMemset {
            dst: req.dst,
            pitch: req.pitch,
            value: req.value,
            element_size: req.element_size,
            width: req.width,
            height: req.height,
        };
        self.add_node(req.graph, &req.deps, GraphNodeSpec::Memset(m), false)
    }

    /// Checks one side of a copy node and says where it is.
    pub(super) fn copy_end(&self, window: bool, addr: u64, extent: u64, window_size: usize) -> CuResult<CopyEnd> {
        if !window {
            self.check_range(addr, extent)?;
            return Ok(CopyEnd::Device(addr));
        }
        // The backend reads the window in place at every launch: only where it took it.
        if !self.window_direct {
            return Err(CuError::NOT_SUPPORTED);
        }
        let end = addr.checked_add(extent).ok_or(CuError::INVALID_VALUE)?;
        if end > window_size as u64 {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(CopyEnd::Window(addr))
    }

    pub(super) fn graph_add_memcpy_node(&mut self, req: GraphAddMemcpyNode, window_size: usize) -> CuResult<Handle> {
        let src_extent = block_extent(req.width, req.height, req.depth, req.src_pitch, req.src_height)?;
        let dst_extent = block_extent(req.width, req.height, req.depth, req.dst_pitch, req.dst_height)?;
        let c = GraphCopy {
            src: self.copy_end(req.src_window, req.src, src_extent, window_size)?,
            src_pitch: req.src_pitch,
            src_height: req.src_height,
            dst: self.copy_end(req.dst_window, req.dst, dst_extent, window_size)?,
            dst_pitch: req.dst_pitch,
            dst_height: req.dst_height,
            width: req.width,
            height: req.height,
            depth: req.depth,
        };
        self.add_node(req.graph, &req.deps, GraphNodeSpec::Memcpy(c), req.hidden)
    }

    pub(super) fn graph_add_host_node(&mut self, req: GraphAddHostNode) -> CuResult<Handle> {
        // Checked before a slot is counted: a refused node keeps none.
        self.graph_deps(req.graph, &req.deps)?;
        self.graphs.get(req.graph)?;
        let slot = self.persistent_slot(req.slot)?;
        self.add_node(req.graph, &req.deps, GraphNodeSpec::Host(slot), req.hidden)
    }

    pub(super) fn graph_add_empty_node(&mut self, req: GraphAddEmptyNode) -> CuResult<Handle> {
        self.add_node(req.graph, &req.deps, GraphNodeSpec::Empty, false)
    }

    pub(super) fn host_func_persistent(&mut self, stream: Handle, slot: u64, hidden: bool) -> CuResult<()> {
        stream_of(&self.streams, stream)?;
        let slot = self.persistent_slot(slot)?;
        let s = stream_of(&self.streams, stream)?;
        let node = self.backend.launch_host_func_persistent(s, slot)?;
        if let (true, Some(node)) = (hidden, node) {
            self.hidden_nodes.insert(node);
        }
        Ok(())
    }

    pub(super) fn stream_begin_capture(&mut self, stream: Handle, mode: u32) -> CuResult<()> {
        if mode > MAX_CAPTURE_MODE {
            return Err(CuError::INVALID_VALUE);
        }
        let s = stream_of(&self.streams, stream)?;
        self.backend.stream_begin_capture(s, mode)?;
        self.captures_active += 1;
        Ok(())
    }

    pub(super) fn stream_end_capture(&mut self, stream: Handle) -> CuResult<Handle> {
        let s = stream_of(&self.streams, stream)?;
        let ended = self.backend.stream_end_capture(s);
        if ended.as_ref().map_or_else(|e| CAPTURE_ENDED_BADLY.contains(&e.code()), |_| true) {
            self.captures_active = self.captures_active.saturating_sub(1);
        }
        self.insert_graph(ended?)
    }

    pub(super) fn stream_capture_info(&mut self, stream: Handle) -> CuResult<(u32, u64)> {
        let s = stream_of(&self.streams, stream)?;
        self.backend.stream_capture_info(s)
    }

    pub(super) fn exchange_capture_mode(&mut self, mode: u32) -> CuResult<u32> {
        if mode > MAX_CAPTURE_MODE {
            return Err(CuError::INVALID_VALUE);
        }
        self.backend.exchange_capture_mode(mode)
    }
}

#[cfg(test)]
mod tests {
    use super::block_extent;

    #[test]
    fn block_extents_cover_exactly_the_last_byte() {
        assert_eq!(block_extent(16, 1, 1, 0, 0), Ok(16), "one row needs no pitch");
        assert_eq!(block_extent(16, 4, 1, 32, 4), Ok(3 * 32 + 16));
        assert_eq!(block_extent(16, 4, 2, 32, 8), Ok(8 * 32 + 3 * 32 + 16));
        assert!(block_extent(0, 1, 1, 0, 0).is_err(), "empty");
        assert!(block_extent(16, 2, 1, 8, 2).is_err(), "rows overlap");
        assert!(block_extent(16, 4, 2, 32, 2).is_err(), "slices overlap");
        assert!(block_extent(1, u64::MAX, 1, u64::MAX, 1).is_err(), "overflow");
    }
}
