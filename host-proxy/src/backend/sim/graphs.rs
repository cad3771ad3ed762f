//! Graphs and stream capture in the simulated GPU (a test double: see the parent module).
//!
//! A graph is a list of operations in the order they were added, which is a topological
//! order (a node's dependencies exist before it), so a launch runs them in that order; the
//! double runs all work in place anyway. An executable graph is a snapshot of its graph's
//! operations. A capturing stream records launches, memsets, device copies and host
//! functions into its graph instead of running them; an event recorded on it carries the
//! capture, and a stream that waits for such an event joins it (the fork/join pattern of
//! CUDA's samples). What cannot be captured is refused as the driver refuses it: staged
//! copies, synchronisation and one-shot host functions on a capturing stream
//! (`CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`), and work on the legacy stream while any
//! capture is open (`CUDA_ERROR_STREAM_CAPTURE_IMPLICIT`). Copy nodes reach device memory
//! and the shared window (which the double takes, as the real backend registers it).
//! Modelled, not measured: the real driver's rules have more cases (capture modes are
//! stored, not enforced).

use super::*;
use crate::backend::{CopyEnd, GraphCopy, GraphMemset, GraphNodeSpec, HostFuncSlot, CAPTURE_ACTIVE};
use idm_core::SharedMemory;
use std::sync::Arc;

/// A simulated graph.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SimGraph(u64);

/// A simulated executable graph.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SimGraphExec(u64);

/// One operation of a graph.
#[derive(Clone, Debug)]
pub(super) enum SimOp {
    Empty,
    Kernel { func: u64, config: LaunchConfig, params: Vec<u8>, layout: Vec<ParamSlot> },
    Memset(GraphMemset),
    Copy(GraphCopy),
    Host(Arc<HostFuncSlot>),
}

/// A graph's nodes: (node id, operation), in the order added.
pub(super) type SimGraphNodes = Vec<(u64, SimOp)>;

impl SimGpu {
    /// The graph `stream` is capturing into, if any (the legacy stream may not be used
    /// while any capture is open).
    pub(super) fn capturing(&self, stream: Option<&SimStream>) -> CuResult<Option<u64>> {
        match self.check_stream(stream)? {
            Some(s) => Ok(s.capture.map(|(graph, _)| graph)),
            None if self.streams.values().any(|s| s.capture.is_some()) => Err(CuError::STREAM_CAPTURE_IMPLICIT),
            None => Ok(None),
        }
    }

    /// Refuses what must not run on a capturing stream.
    pub(super) fn not_capturing(&self, stream: Option<&SimStream>) -> CuResult<()> {
        match self.capturing(stream)? {
            Some(_) => Err(CuError::STREAM_CAPTURE_UNSUPPORTED),
            None => Ok(()),
        }
    }

    /// Whether any capture is open (synchronising the device is refused then).
    pub(super) fn any_capture(&self) -> bool {
        self.streams.values().any(|s| s.capture.is_some())
    }

    /// Appends `op` to `graph` and returns the node's id.
    pub(super) fn record(&mut self, graph: u64, op: SimOp) -> CuResult<u64> {
        let nodes = self.graphs.get_mut(&graph).ok_or(CuError::INVALID_HANDLE)?;
        let id = next_id();
        nodes.push((id, op));
        Ok(id)
    }

    /// Runs one operation now.
    fn run_op(&mut self, op: &SimOp) -> CuResult<()> {
        match op {
            SimOp::Empty => Ok(()),
            SimOp::Kernel { func, config, params, layout } => self.launch_now(*func, config, params, layout),
            SimOp::Memset(m) => self.memset_2d(m),
            SimOp::Copy(c) => self.copy_3d(c),
            SimOp::Host(slot) => {
                // In place, bounded, as `launch_host_func` runs a one-shot function.
                slot.run(Some(std::time::Duration::from_secs(30)));
                Ok(())
            }
        }
    }

    /// A 2-D memset of device memory.
    pub(super) fn memset_2d(&mut self, m: &GraphMemset) -> CuResult<()> {
        let elem = u64::from(m.element_size);
        let row = m.width.checked_mul(elem).ok_or(CuError::INVALID_VALUE)?;
        let bytes = m.value.to_le_bytes();
        for r in 0..m.height {
            let at = m.pitch.checked_mul(r).and_then(|o| o.checked_add(m.dst)).ok_or(CuError::INVALID_VALUE)?;
            let (buf, off) = self.locate(at, row)?;
            for w in buf[off..off + row as usize].chunks_exact_mut(elem as usize) {
                w.copy_from_slice(&bytes[..elem as usize]);
            }
        }
        Ok(())
    }

    /// A copy on `stream`: recorded when it is capturing, done now otherwise.
    pub(super) fn copy_on(&mut self, c: GraphCopy, stream: Option<&SimStream>) -> CuResult<()> {
        match self.capturing(stream)? {
            Some(graph) => self.record(graph, SimOp::Copy(c)).map(drop),
            None => self.copy_3d(&c),
        }
    }

    /// A 3-D copy between device ranges and the window, row by row.
    pub(super) fn copy_3d(&mut self, c: &GraphCopy) -> CuResult<()> {
        let row_len = usize::try_from(c.width).map_err(|_| CuError::INVALID_VALUE)?;
        let end = |e: CopyEnd| match e {
            CopyEnd::Device(a) | CopyEnd::Window(a) => Ok(a),
            // Arrays are resolved to their linear memory before a copy gets here.
            CopyEnd::Array { .. } => Err(CuError::INVALID_VALUE),
        };
        let (src, dst) = (end(c.src)?, end(c.dst)?);
        let mut row = vec![0u8; row_len];
        for z in 0..c.depth {
            for y in 0..c.height {
                let at = |base: u64, pitch: u64, height: u64| {
                    z.checked_mul(height)
                        .and_then(|r| r.checked_add(y))
                        .and_then(|r| r.checked_mul(pitch))
                        .and_then(|o| o.checked_add(base))
                        .ok_or(CuError::INVALID_VALUE)
                };
                let (s, d) = (at(src, c.src_pitch, c.src_height)?, at(dst, c.dst_pitch, c.dst_height)?);
                match c.src {
                    CopyEnd::Device(_) => {
                        let (buf, off) = self.locate(s, c.width)?;
                        row.copy_from_slice(&buf[off..off + row_len]);
                    }
                    CopyEnd::Window(_) => self.window_range(s, c.width)?.read_bytes(s as usize, &mut row),
                    CopyEnd::Array { .. } => return Err(CuError::INVALID_VALUE),
                }
                match c.dst {
                    CopyEnd::Device(_) => {
                        let (buf, off) = self.locate(d, c.width)?;
                        buf[off..off + row_len].copy_from_slice(&row);
                    }
                    CopyEnd::Window(_) => self.window_range(d, c.width)?.write_bytes(d as usize, &row),
                    CopyEnd::Array { .. } => return Err(CuError::INVALID_VALUE),
                }
            }
        }
        Ok(())
    }

    /// The window, when `[offset, offset + len)` lies inside it.
    fn window_range(&self, offset: u64, len: u64) -> CuResult<&idm_core::RawRegion> {
        let w = self.window.as_ref().ok_or(CuError::NOT_SUPPORTED)?;
        let inside = offset.checked_add(len).is_some_and(|end| end <= w.size() as u64);
        inside.then_some(w).ok_or(CuError::INVALID_VALUE)
    }

    pub(super) fn create_graph(&mut self) -> SimGraph {
        let id = next_id();
        self.graphs.insert(id, Vec::new());
        SimGraph(id)
    }

    /// Drops the graphs of captures in `graphs` that no live stream records into any more
    /// (their streams were destroyed mid-capture, alone or with their context): the driver
    /// invalidates such a capture and frees its graph, which no handle names yet.
    pub(super) fn drop_abandoned_captures(&mut self, graphs: impl IntoIterator<Item = u64>) {
        for g in graphs {
            if self.streams.values().any(|s| s.capture.is_some_and(|(c, _)| c == g)) {
                continue;
            }
            for (id, _) in self.graphs.remove(&g).into_iter().flatten() {
                self.clone_origin.remove(&id);
            }
            for e in self.events.values_mut() {
                if e.captured.is_some_and(|(c, _)| c == g) {
                    e.captured = None;
                }
            }
        }
    }

    pub(super) fn destroy_graph(&mut self, graph: SimGraph) -> CuResult<()> {
        if self.streams.values().any(|s| s.capture.is_some_and(|(g, _)| g == graph.0)) {
            // The capture's graph is the stream's until the capture ends.
            return Err(CuError::ILLEGAL_STATE);
        }
        let nodes = self.graphs.remove(&graph.0).ok_or(CuError::INVALID_HANDLE)?;
        for (id, _) in nodes {
            self.clone_origin.remove(&id);
        }
        Ok(())
    }

    pub(super) fn clone_graph(&mut self, graph: &SimGraph) -> CuResult<SimGraph> {
        let nodes = self.graphs.get(&graph.0).ok_or(CuError::INVALID_HANDLE)?;
        let copy: SimGraphNodes = nodes.iter().map(|(_, op)| (next_id(), op.clone())).collect();
        for ((new, _), (old, _)) in copy.iter().zip(nodes) {
            self.clone_origin.insert(*new, *old);
        }
        let id = next_id();
        self.graphs.insert(id, copy);
        Ok(SimGraph(id))
    }

    pub(super) fn find_in_clone(&self, clone: &SimGraph, original: u64) -> CuResult<u64> {
        let nodes = self.graphs.get(&clone.0).ok_or(CuError::INVALID_HANDLE)?;
        nodes
            .iter()
            .map(|(id, _)| *id)
            .find(|id| self.clone_origin.get(id) == Some(&original))
            .ok_or(CuError::INVALID_VALUE)
    }

    pub(super) fn add_graph_node(
        &mut self,
        graph: &SimGraph,
        deps: &[u64],
        node: GraphNodeSpec<'_, SimFunction>,
    ) -> CuResult<u64> {
        let nodes = self.graphs.get(&graph.0).ok_or(CuError::INVALID_HANDLE)?;
        if !deps.iter().all(|d| nodes.iter().any(|(id, _)| id == d)) {
            return Err(CuError::INVALID_VALUE);
        }
        let op = match node {
            GraphNodeSpec::Empty => SimOp::Empty,
            GraphNodeSpec::Kernel { func, config, params, layout } => {
                self.check_launch(func.0, config, params, layout)?;
                SimOp::Kernel { func: func.0, config: config.clone(), params: params.to_vec(), layout: layout.to_vec() }
            }
            GraphNodeSpec::Memset(m) => SimOp::Memset(m),
            GraphNodeSpec::Memcpy(c) => SimOp::Copy(c),
            GraphNodeSpec::Host(slot) => SimOp::Host(slot),
        };
        self.record(graph.0, op)
    }

    pub(super) fn nodes_of(&self, graph: &SimGraph) -> CuResult<Vec<u64>> {
        let nodes = self.graphs.get(&graph.0).ok_or(CuError::INVALID_HANDLE)?;
        Ok(nodes.iter().map(|(id, _)| *id).collect())
    }

    pub(super) fn instantiate_graph(&mut self, graph: &SimGraph, flags: u64) -> CuResult<SimGraphExec> {
        // CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH | UPLOAD | DEVICE_LAUNCH | USE_NODE_PRIORITY.
        if flags & !0xf != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let nodes = self.graphs.get(&graph.0).ok_or(CuError::INVALID_HANDLE)?;
        let ops = nodes.iter().map(|(_, op)| op.clone()).collect();
        let id = next_id();
        self.execs.insert(id, (self.current, ops));
        Ok(SimGraphExec(id))
    }

    pub(super) fn destroy_graph_exec(&mut self, exec: SimGraphExec) -> CuResult<()> {
        self.execs.remove(&exec.0).map(drop).ok_or(CuError::INVALID_HANDLE)
    }

    pub(super) fn launch_graph(
        &mut self,
        exec: &SimGraphExec,
        stream: Option<&SimStream>,
        upload_only: bool,
    ) -> CuResult<()> {
        let ops = self.execs.get(&exec.0).map(|(_, ops)| ops.clone()).ok_or(CuError::INVALID_HANDLE)?;
        if self.capturing(stream)?.is_some() {
            // A child graph node: not modelled.
            return Err(CuError::NOT_SUPPORTED);
        }
        if upload_only {
            return Ok(());
        }
        ops.iter().try_for_each(|op| self.run_op(op))
    }

    pub(super) fn begin_capture(&mut self, stream: Option<&SimStream>, mode: u32) -> CuResult<()> {
        let Some(s) = stream else { return Err(CuError::STREAM_CAPTURE_UNSUPPORTED) };
        if mode > 2 {
            return Err(CuError::INVALID_VALUE);
        }
        let state = self.streams.get(&s.0).ok_or(CuError::INVALID_HANDLE)?;
        if state.capture.is_some() {
            return Err(CuError::ILLEGAL_STATE);
        }
        let graph = self.create_graph().0;
        let capture = next_id();
        if let Some(state) = self.streams.get_mut(&s.0) {
            state.capture = Some((graph, capture));
        }
        Ok(())
    }

    pub(super) fn end_capture(&mut self, stream: Option<&SimStream>) -> CuResult<SimGraph> {
        let Some(s) = stream else { return Err(CuError::ILLEGAL_STATE) };
        let state = self.streams.get(&s.0).ok_or(CuError::INVALID_HANDLE)?;
        let (graph, _) = state.capture.ok_or(CuError::ILLEGAL_STATE)?;
        // Every stream that joined the capture leaves it (the double does not check that
        // each one joined back, as the driver does).
        for st in self.streams.values_mut() {
            if st.capture.is_some_and(|(g, _)| g == graph) {
                st.capture = None;
            }
        }
        for e in self.events.values_mut() {
            if e.captured.is_some_and(|(g, _)| g == graph) {
                e.captured = None;
            }
        }
        Ok(SimGraph(graph))
    }

    pub(super) fn capture_info(&self, stream: Option<&SimStream>) -> CuResult<(u32, u64)> {
        let capture = match self.check_stream(stream)? {
            Some(s) => s.capture,
            None if self.any_capture() => return Err(CuError::STREAM_CAPTURE_IMPLICIT),
            None => None,
        };
        Ok(capture.map_or((0, 0), |(_, id)| (CAPTURE_ACTIVE, id)))
    }

    pub(super) fn exchange_mode(&mut self, mode: u32) -> CuResult<u32> {
        if mode > 2 {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(std::mem::replace(&mut self.capture_mode, mode))
    }

    pub(super) fn host_func_persistent(
        &mut self,
        stream: Option<&SimStream>,
        slot: Arc<HostFuncSlot>,
    ) -> CuResult<Option<u64>> {
        match self.capturing(stream)? {
            Some(graph) => self.record(graph, SimOp::Host(slot)).map(Some),
            None => self.run_op(&SimOp::Host(slot)).map(|()| None),
        }
    }

    /// An event recorded on a capturing stream carries the capture; one recorded elsewhere
    /// does not.
    pub(super) fn note_event_record(&mut self, event: u64, stream: Option<&SimStream>) -> CuResult<()> {
        let capture = match stream {
            Some(s) => self.check_stream(Some(s))?.and_then(|st| st.capture),
            None => None,
        };
        if let Some(e) = self.events.get_mut(&event) {
            e.captured = capture;
        }
        Ok(())
    }

    /// A stream that waits for an event carrying a capture joins that capture.
    pub(super) fn note_event_wait(&mut self, event: u64, stream: Option<&SimStream>) -> CuResult<()> {
        let captured = self.events.get(&event).and_then(|e| e.captured);
        match (captured, stream) {
            (Some(c), Some(s)) => {
                if let Some(st) = self.streams.get_mut(&s.0) {
                    if st.capture.is_none() {
                        st.capture = Some(c);
                    }
                }
                Ok(())
            }
            (Some(_), None) => Err(CuError::STREAM_CAPTURE_IMPLICIT),
            (None, _) => Ok(()),
        }
    }
}
