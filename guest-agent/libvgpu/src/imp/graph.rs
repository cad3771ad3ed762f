//! Graphs built by hand (`cuGraphAdd*Node`, `cuGraphGetNodes`, `cuGraphInstantiateWithParams`).
//! The rest of the graph API is forwarded as generated (create, destroy, clone, instantiate,
//! launch, upload); the graphs themselves live in the host's driver.
//!
//! What a node needs translated is done here: a kernel node's parameters are packed by the
//! function's layout, as a launch's are; a copy node's host memory must be pinned memory of
//! the shared window (`cuMemAllocHost`/`cuMemHostAlloc`, or registered), which the host's
//! driver reads or writes in place at every launch — pageable memory cannot be reached from
//! there and arrays are not offered (`CUDA_ERROR_NOT_SUPPORTED`, named in the log); a host
//! node gets a rendezvous word that stays armed for every launch (`host_func.rs`).

use super::host_func;
use super::pitched::{extent, locate, read_copy, At, Copy3d, Side, MEMORYTYPE_HOST};
use crate::rt::{self, handle_of, handle_ptr, session, CuError, CuResult, Out};
use cudarc::driver::sys;
use vgpu_proto::generated as p;
use vgpu_proto::{Handle, LaunchConfig};

/// What the log names when a copy node asks for what libvgpu does not offer.
const WHAT: &str = "cuGraphAddMemcpyNode with CUDA arrays";
/// `CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD`.
const INSTANTIATE_FLAG_UPLOAD: u64 = 2;
/// `CUDA_GRAPH_INSTANTIATE_SUCCESS` and `…_ERROR`.
const INSTANTIATE_SUCCESS: u32 = 0;
const INSTANTIATE_ERROR: u32 = 1;

/// The dependencies' handles as the wire carries them (8 bytes each, little-endian).
///
/// # Safety
/// A non-null `deps` must hold `n` node handles.
unsafe fn deps_bytes(deps: *const sys::CUgraphNode, n: usize) -> CuResult<Vec<u8>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    // The host takes at most 4096 dependencies per node; more is refused before anything
    // is read or allocated.
    if deps.is_null() || n > 4096 {
        return Err(CuError::INVALID_VALUE);
    }
    let mut out = Vec::with_capacity(n * 8);
    for i in 0..n {
        // SAFETY: the caller's contract: `deps` holds `n` handles.
        let h = unsafe { deps.wrapping_add(i).read() };
        out.extend_from_slice(&handle_of(h).0.to_le_bytes());
    }
    Ok(out)
}

/// Writes the new node's handle.
fn set_node(out: Out<sys::CUgraphNode>, node: Handle) -> CuResult<()> {
    out.set(handle_ptr(node));
    Ok(())
}

/// `cuGraphAddEmptyNode`.
pub unsafe fn cu_graph_add_empty_node(
    node: *mut sys::CUgraphNode,
    graph: sys::CUgraph,
    deps: *const sys::CUgraphNode,
    n: usize,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(node) }?;
    // SAFETY: CUDA's contract for `deps`.
    let deps = unsafe { deps_bytes(deps, n) }?;
    let r: p::GraphAddEmptyNodeReply = rt::call(&p::GraphAddEmptyNode { graph: handle_of(graph), deps }, true)?;
    set_node(out, r.node)
}

/// `cuGraphAddKernelNode_v2`: the function (or, with `func` NULL, the library kernel) and
/// its parameters, packed by its layout.
pub unsafe fn cu_graph_add_kernel_node_v2(
    node: *mut sys::CUgraphNode,
    graph: sys::CUgraph,
    deps: *const sys::CUgraphNode,
    n: usize,
    params: *const sys::CUDA_KERNEL_NODE_PARAMS,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(node) }?;
    if params.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: `params` points to the structure (plain fields only).
    let k = unsafe { params.read_unaligned() };
    let func = if k.func.is_null() { handle_of(k.kern) } else { handle_of(k.func) };
    if func.0 == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract for `deps`.
    let deps = unsafe { deps_bytes(deps, n) }?;
    let config = LaunchConfig {
        grid: [k.gridDimX, k.gridDimY, k.gridDimZ],
        block: [k.blockDimX, k.blockDimY, k.blockDimZ],
        shared_mem_bytes: k.sharedMemBytes,
        attrs: Vec::new(),
    };
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    let info = c.func_info(func)?;
    // SAFETY: CUDA's contract: `kernelParams` or `extra` describes the parameters.
    let packed = unsafe { super::module::pack(&info.slots, k.kernelParams, k.extra) }?;
    let req = p::GraphAddKernelNode { graph: handle_of(graph), deps, func, config, params: packed };
    let r: p::GraphAddKernelNodeReply = c.call(&req)?;
    set_node(out, r.node)
}

/// `cuGraphAddMemsetNode` (`ctx` is the current context's: the zone's).
pub unsafe fn cu_graph_add_memset_node(
    node: *mut sys::CUgraphNode,
    graph: sys::CUgraph,
    deps: *const sys::CUgraphNode,
    n: usize,
    params: *const sys::CUDA_MEMSET_NODE_PARAMS,
    _ctx: sys::CUcontext,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(node) }?;
    if params.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: `params` points to the structure (plain fields only).
    let m = unsafe { params.read_unaligned() };
    // SAFETY: CUDA's contract for `deps`.
    let deps = unsafe { deps_bytes(deps, n) }?;
    let req = p::GraphAddMemsetNode {
        graph: handle_of(graph),
        deps,
        dst: m.dst,
        pitch: m.pitch as u64,
        value: m.value,
        element_size: m.elementSize,
        width: m.width as u64,
        height: m.height as u64,
    };
    let r: p::GraphAddMemsetNodeReply = rt::call(&req, true)?;
    set_node(out, r.node)
}

/// A copy between the program's pageable memory and a pinned shadow of it in the window,
/// run in this process by a host node: the shadow has the program side's layout, and only
/// the copied rows are touched (never the bytes between them).
struct ShadowCopy {
    program: usize,
    shadow: usize,
    width: usize,
    height: usize,
    depth: usize,
    pitch: usize,
    slice_rows: usize,
    /// Shadow to program (after a device-to-host copy) rather than program to shadow.
    to_program: bool,
}

/// A graph host node's function: runs one [`ShadowCopy`].
unsafe extern "C" fn run_shadow_copy(data: *mut std::ffi::c_void) {
    // SAFETY: `data` is a `ShadowCopy` leaked for the process's life by `shadow_of`.
    let j = unsafe { &*data.cast::<ShadowCopy>() };
    for z in 0..j.depth {
        for y in 0..j.height {
            let off = (z * j.slice_rows + y) * j.pitch;
            let program = std::ptr::with_exposed_provenance_mut::<u8>(j.program + off);
            let shadow = std::ptr::with_exposed_provenance_mut::<u8>(j.shadow + off);
            let (from, to) = if j.to_program { (shadow, program) } else { (program, shadow) };
            // SAFETY: the program promised (CUDA's contract) that its rows are valid at every
            // launch; the shadow block holds the whole extent and lives as long as the process.
            unsafe { std::ptr::copy_nonoverlapping(from, to, j.width) };
        }
    }
}

/// A pinned shadow of the program's memory at `program` for side `s` of `c`: the job that
/// moves bytes between them (leaked for the process's life, like the graph that runs it)
/// and the shadow's window offset.
fn shadow_of(program: usize, s: &Side, c: &Copy3d, to_program: bool) -> CuResult<(usize, u64)> {
    let len = extent(s, c)?;
    let size = |v: u64| usize::try_from(v).map_err(|_| CuError::INVALID_VALUE);
    let sess = session()?;
    let mut conn = sess.lock();
    let block = conn.window.alloc(len, 0)?;
    let at = conn.window.desc_of(block, len)?;
    let job = ShadowCopy {
        program,
        shadow: block.expose_provenance(),
        width: size(c.width)?,
        height: size(c.height)?,
        depth: size(c.depth)?,
        pitch: size(s.pitch)?,
        slice_rows: size(s.height)?,
        to_program,
    };
    Ok((Box::into_raw(Box::new(job)).expose_provenance(), at.offset))
}

/// Queues on the capturing `stream` a pageable copy of `len` bytes between the program's
/// `program` and device `dev`, as the driver captures one: through a pinned shadow, with a
/// host node moving the bytes between it and the program's memory at every launch.
pub fn capture_pageable_copy(program: usize, dev: u64, len: usize, stream: Handle, to_program: bool) -> CuResult<()> {
    let side = Side {
        x: 0,
        y: 0,
        z: 0,
        memory_type: MEMORYTYPE_HOST,
        host: program,
        device: 0,
        array: 0,
        pitch: 0,
        height: 0,
    };
    let c = Copy3d { width: len as u64, height: 1, depth: 1, src: side, dst: Side { ..Side::default() } };
    let (job, shadow) = shadow_of(program, &c.src, &c, to_program)?;
    let desc = idm_core::BulkRef { offset: shadow, len: len as u64 };
    if to_program {
        rt::post(&p::MemcpyDtoHAsync { dst: desc, src: dev, stream }, true)?;
        host_func::queue_captured(stream, run_shadow_copy, job)
    } else {
        host_func::queue_captured(stream, run_shadow_copy, job)?;
        rt::post(&p::MemcpyHtoDAsync { dst: dev, src: desc, stream }, true)
    }
}

/// `cuGraphAddMemcpyNode` (`ctx` is the current context's: the zone's).
pub unsafe fn cu_graph_add_memcpy_node(
    node: *mut sys::CUgraphNode,
    graph: sys::CUgraph,
    deps: *const sys::CUgraphNode,
    n: usize,
    params: *const sys::CUDA_MEMCPY3D,
    _ctx: sys::CUcontext,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(node) }?;
    if params.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: `params` points to the structure.
    let c = unsafe { read_copy(params) };
    // SAFETY: CUDA's contract for `deps`.
    let deps = unsafe { deps_bytes(deps, n) }?;
    let (src, dst) = {
        let s = session()?;
        let mut conn = s.lock();
        conn.enter_current()?;
        (locate(&c.src, &c, &mut conn)?, locate(&c.dst, &c, &mut conn)?)
    };
    if matches!(src, At::Array { .. }) || matches!(dst, At::Array { .. }) {
        return Err(rt::unsupported_err(WHAT));
    }
    let graph = handle_of(graph);
    let wire = |at: &At| match *at {
        At::Device(a) => (false, a),
        At::Window(o, _) => (true, o),
        At::Program(_) | At::Array { .. } => (true, 0),
    };
    let node = |deps: Vec<u8>, (src_window, src): (bool, u64), (dst_window, dst): (bool, u64), hidden: bool| {
        let req = p::GraphAddMemcpyNode {
            graph,
            deps,
            src_window,
            src,
            src_pitch: c.src.pitch,
            src_height: c.src.height,
            dst_window,
            dst,
            dst_pitch: c.dst.pitch,
            dst_height: c.dst.height,
            width: c.width,
            height: c.height,
            depth: c.depth,
            hidden,
        };
        rt::call::<_, p::GraphAddMemcpyNodeReply>(&req, true).map(|r| r.node)
    };
    // Pageable program memory is reached through a pinned shadow and a host node that moves
    // the bytes: before the copy (to the device) or after it (from the device), so that what
    // depends on the returned node sees the program's memory as natively. The node that is
    // not returned is hidden from node lists: the graph has the nodes the program made.
    let host_node = |deps: Vec<u8>, job: usize, hidden: bool| -> CuResult<Handle> {
        let slot = host_func::graph_node_slot(run_shadow_copy, job)?;
        let req = p::GraphAddHostNode { graph, deps, slot: slot.offset(), hidden };
        let r: p::GraphAddHostNodeReply = rt::call(&req, true)?;
        slot.keep();
        Ok(r.node)
    };
    let made = match (&src, &dst) {
        (At::Program(_), At::Program(_)) => {
            return Err(rt::unsupported_err("cuGraphAddMemcpyNode between two pageable host buffers"))
        }
        (At::Program(p), _) => {
            let (job, shadow) = shadow_of(*p, &c.src, &c, false)?;
            let fill = host_node(deps, job, true)?;
            node(fill.0.to_le_bytes().to_vec(), (true, shadow), wire(&dst), false)?
        }
        (_, At::Program(p)) => {
            let (job, shadow) = shadow_of(*p, &c.dst, &c, true)?;
            let copied = node(deps, wire(&src), (true, shadow), true)?;
            host_node(copied.0.to_le_bytes().to_vec(), job, false)?
        }
        _ => node(deps, wire(&src), wire(&dst), false)?,
    };
    set_node(out, made)
}

/// `cuGraphAddHostNode`: the function runs in this process at every launch.
pub unsafe fn cu_graph_add_host_node(
    node: *mut sys::CUgraphNode,
    graph: sys::CUgraph,
    deps: *const sys::CUgraphNode,
    n: usize,
    params: *const sys::CUDA_HOST_NODE_PARAMS,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(node) }?;
    if params.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: `params` points to the structure.
    let h = unsafe { params.read_unaligned() };
    let f = h.fn_.ok_or(CuError::INVALID_VALUE)?;
    // SAFETY: CUDA's contract for `deps`.
    let deps = unsafe { deps_bytes(deps, n) }?;
    let slot = host_func::graph_node_slot(f, h.userData as usize)?;
    let req = p::GraphAddHostNode { graph: handle_of(graph), deps, slot: slot.offset(), hidden: false };
    let r: p::GraphAddHostNodeReply = rt::call(&req, true)?;
    slot.keep();
    set_node(out, r.node)
}

/// `cuGraphGetNodes`: with `nodes` NULL, the count; otherwise up to `*count` handles (the
/// rest of the array NULL) and the count.
pub unsafe fn cu_graph_get_nodes(graph: sys::CUgraph, nodes: *mut sys::CUgraphNode, count: *mut usize) -> CuResult<()> {
    if count.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: `count` is valid for a read and a write.
    let room = if nodes.is_null() { 0 } else { unsafe { count.read() } };
    let mut filled = 0usize;
    let total = loop {
        let first = u32::try_from(filled).map_err(|_| CuError::INVALID_VALUE)?;
        let want = u32::try_from(room - filled).unwrap_or(u32::MAX);
        let r: p::GraphGetNodesReply = rt::call(&p::GraphGetNodes { graph: handle_of(graph), first, want }, false)?;
        let total = usize::try_from(r.count).map_err(|_| CuError::INVALID_VALUE)?;
        for c in r.nodes.chunks_exact(8).take(room - filled) {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(c);
            // SAFETY: CUDA's contract: `nodes` holds `room` entries; `filled < room`.
            unsafe { nodes.wrapping_add(filled).write(handle_ptr(Handle(u64::from_le_bytes(raw)))) };
            filled += 1;
        }
        if filled >= room.min(total) || r.nodes.is_empty() {
            break total;
        }
    };
    for i in filled..room {
        // SAFETY: as above.
        unsafe { nodes.wrapping_add(i).write(std::ptr::null_mut()) };
    }
    // SAFETY: as above.
    unsafe { count.write(total) };
    Ok(())
}

/// `cuGraphInstantiateWithParams`: instantiated with the flags, uploaded on the given stream
/// when asked; the result code written back.
pub unsafe fn cu_graph_instantiate_with_params(
    exec: *mut sys::CUgraphExec,
    graph: sys::CUgraph,
    params: *mut sys::CUDA_GRAPH_INSTANTIATE_PARAMS,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(exec) }?;
    if params.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    use std::mem::offset_of;
    type P = sys::CUDA_GRAPH_INSTANTIATE_PARAMS;
    let base = params.cast::<u8>();
    // SAFETY: CUDA's contract: `params` points to the structure; fields read and written at
    // their own offsets (the result as the `unsigned int` C stores).
    let flags = unsafe { base.wrapping_add(offset_of!(P, flags)).cast::<u64>().read_unaligned() };
    // SAFETY: as above.
    let upload = unsafe { base.wrapping_add(offset_of!(P, hUploadStream)).cast::<sys::CUstream>().read_unaligned() };
    let write_result = |code: u32| {
        // SAFETY: as above.
        unsafe { base.wrapping_add(offset_of!(P, result_out)).cast::<u32>().write_unaligned(code) };
        // SAFETY: as above.
        unsafe {
            base.wrapping_add(offset_of!(P, hErrNode_out))
                .cast::<sys::CUgraphNode>()
                .write_unaligned(std::ptr::null_mut())
        };
    };
    let req = p::CuGraphInstantiateWithFlags { h_graph: handle_of(graph), flags: flags & !INSTANTIATE_FLAG_UPLOAD };
    let r: p::CuGraphInstantiateWithFlagsReply = match rt::call(&req, true) {
        Ok(r) => r,
        Err(e) => {
            write_result(INSTANTIATE_ERROR);
            return Err(e);
        }
    };
    if flags & INSTANTIATE_FLAG_UPLOAD != 0 {
        let stream = rt::stream_arg(upload)?;
        rt::post(&p::CuGraphUpload { h_graph_exec: r.ph_graph_exec, h_stream: stream }, true)?;
    }
    write_result(INSTANTIATE_SUCCESS);
    out.set(handle_ptr(r.ph_graph_exec));
    Ok(())
}
