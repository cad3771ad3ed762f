//! Copies with a shape: `cuMemcpy2D_v2`, `cuMemcpy2DUnaligned_v2`, `cuMemcpy2DAsync_v2`,
//! `cuMemcpy3D_v2`, `cuMemcpy3DAsync_v2`, and the copy descriptors they share with graph copy
//! nodes (`graph.rs`) and the array copies (`arrays.rs`).
//!
//! A copy between device memory, CUDA arrays and pinned memory of the window is one
//! request, posted for the asynchronous calls: the host runs the driver entry point
//! the program called on the whole block. Pageable program memory goes through the
//! window's two staging halves a band of whole rows at a time (a row wider than a half in
//! pieces), pipelined as the 1-D copies are; as natively, such a copy has finished with the
//! program's memory when the call returns. Host-to-host copies are done here, row
//! by row. A zero width, height or depth copies nothing.

use crate::rt::{self, session, Conn, CuError, CuResult};
use cudarc::driver::sys;
use idm_core::BulkRef;
use vgpu_proto::generated as p;
use vgpu_proto::{Done, Handle};

/// `CU_MEMORYTYPE_HOST`, `…_DEVICE`, `…_ARRAY`, `…_UNIFIED`.
pub(super) const MEMORYTYPE_HOST: u32 = 1;
pub(super) const MEMORYTYPE_DEVICE: u32 = 2;
pub(super) const MEMORYTYPE_ARRAY: u32 = 3;
const MEMORYTYPE_UNIFIED: u32 = 4;

/// The wire's `MemcpyPitched::shape`: which driver entry point the host calls.
pub(super) const SHAPE_PLANE: u8 = 0;
const SHAPE_PLANE_UNALIGNED: u8 = 1;
const SHAPE_VOLUME: u8 = 2;

/// What one side of a `MemcpyPitched` names: device memory, the window, a CUDA array.
const KIND_DEVICE: u8 = 0;
const KIND_WINDOW: u8 = 1;
const KIND_ARRAY: u8 = 2;

/// `CUDA_MEMCPY3D` read field by field: its memory types are C enums, which must never be
/// read into a Rust enum (a value the bindings lack would be undefined behaviour).
pub(super) struct Copy3d {
    pub(super) src: Side,
    pub(super) dst: Side,
    pub(super) width: u64,
    pub(super) height: u64,
    pub(super) depth: u64,
}

/// One side of a `CUDA_MEMCPY3D`.
#[derive(Default)]
pub(super) struct Side {
    pub(super) x: u64,
    pub(super) y: u64,
    pub(super) z: u64,
    pub(super) memory_type: u32,
    pub(super) host: usize,
    pub(super) device: u64,
    pub(super) array: usize,
    pub(super) pitch: u64,
    pub(super) height: u64,
}

/// Reads a `CUDA_MEMCPY3D`.
///
/// # Safety
/// `p` must point to a `CUDA_MEMCPY3D`.
pub(super) unsafe fn read_copy(p: *const sys::CUDA_MEMCPY3D) -> Copy3d {
    use std::mem::offset_of;
    type M = sys::CUDA_MEMCPY3D;
    let base = p.cast::<u8>();
    // SAFETY: the caller's contract; each read is of a field at its own offset and type
    // (memory types as the `unsigned int` C stores).
    let usize_at = |off: usize| unsafe { base.wrapping_add(off).cast::<usize>().read_unaligned() } as u64;
    // SAFETY: as above.
    let u32_at = |off: usize| unsafe { base.wrapping_add(off).cast::<u32>().read_unaligned() };
    Copy3d {
        src: Side {
            x: usize_at(offset_of!(M, srcXInBytes)),
            y: usize_at(offset_of!(M, srcY)),
            z: usize_at(offset_of!(M, srcZ)),
            memory_type: u32_at(offset_of!(M, srcMemoryType)),
            host: usize_at(offset_of!(M, srcHost)) as usize,
            device: usize_at(offset_of!(M, srcDevice)),
            array: usize_at(offset_of!(M, srcArray)) as usize,
            pitch: usize_at(offset_of!(M, srcPitch)),
            height: usize_at(offset_of!(M, srcHeight)),
        },
        dst: Side {
            x: usize_at(offset_of!(M, dstXInBytes)),
            y: usize_at(offset_of!(M, dstY)),
            z: usize_at(offset_of!(M, dstZ)),
            memory_type: u32_at(offset_of!(M, dstMemoryType)),
            host: usize_at(offset_of!(M, dstHost)) as usize,
            device: usize_at(offset_of!(M, dstDevice)),
            array: usize_at(offset_of!(M, dstArray)) as usize,
            pitch: usize_at(offset_of!(M, dstPitch)),
            height: usize_at(offset_of!(M, dstHeight)),
        },
        width: usize_at(offset_of!(M, WidthInBytes)),
        height: usize_at(offset_of!(M, Height)),
        depth: usize_at(offset_of!(M, Depth)),
    }
}

/// Bytes from a side's first byte to one past its last (the host checks the same again).
pub(super) fn extent(s: &Side, c: &Copy3d) -> CuResult<u64> {
    let rows = c.depth.saturating_sub(1).checked_mul(s.height).and_then(|r| r.checked_add(c.height.saturating_sub(1)));
    rows.and_then(|r| r.checked_mul(s.pitch)).and_then(|o| o.checked_add(c.width)).ok_or(CuError::INVALID_VALUE)
}

/// Where a side's first byte is.
pub(super) enum At {
    /// Device memory.
    Device(u64),
    /// Pinned memory of the window: (window offset, the program's address of it).
    Window(u64, usize),
    /// The program's own (pageable) memory, at this address: the host cannot reach it.
    Program(usize),
    /// A CUDA array, from byte `x` of row `y` of slice `z`.
    Array {
        /// The array's handle.
        array: Handle,
        /// Position: bytes into the row, row, slice.
        at: (u64, u64, u64),
    },
}

/// Where a side's first byte is.
pub(super) fn locate(s: &Side, c: &Copy3d, conn: &mut crate::rt::Conn) -> CuResult<At> {
    if s.memory_type == MEMORYTYPE_ARRAY {
        let array = Handle(s.array as u64);
        return Ok(At::Array { array, at: (s.x, s.y, s.z) });
    }
    let rows = s.z.checked_mul(s.height).and_then(|r| r.checked_add(s.y));
    let offset =
        rows.and_then(|r| r.checked_mul(s.pitch)).and_then(|o| o.checked_add(s.x)).ok_or(CuError::INVALID_VALUE)?;
    let host = match s.memory_type {
        MEMORYTYPE_DEVICE => None,
        MEMORYTYPE_HOST if s.host == 0 => return Err(CuError::INVALID_VALUE),
        MEMORYTYPE_HOST => Some(s.host),
        // Unified addressing: the window's pinned memory and anything the host does not
        // know as the zone's device memory is host memory; the rest is device memory.
        MEMORYTYPE_UNIFIED if super::memory::is_device_in(conn, s.device)? => None,
        MEMORYTYPE_UNIFIED => Some(s.device as usize),
        _ => return Err(CuError::INVALID_VALUE),
    };
    match host {
        None => Ok(At::Device(s.device.checked_add(offset).ok_or(CuError::INVALID_VALUE)?)),
        Some(h) => {
            let start = h.checked_add(offset as usize).ok_or(CuError::INVALID_VALUE)?;
            match conn.window.pinned(std::ptr::without_provenance(start), extent(s, c)?) {
                Some(at) => Ok(At::Window(at.offset, start)),
                None => Ok(At::Program(start)),
            }
        }
    }
}

/// Reads a `CUDA_MEMCPY2D` as the first slice of a 3-D copy.
///
/// # Safety
/// `p` must point to a `CUDA_MEMCPY2D`.
unsafe fn read_copy_2d(p: *const sys::CUDA_MEMCPY2D) -> Copy3d {
    use std::mem::offset_of;
    type M = sys::CUDA_MEMCPY2D;
    let base = p.cast::<u8>();
    // SAFETY: the caller's contract; each read is of a field at its own offset and type
    // (memory types as the `unsigned int` C stores).
    let usize_at = |off: usize| unsafe { base.wrapping_add(off).cast::<usize>().read_unaligned() } as u64;
    // SAFETY: as above.
    let u32_at = |off: usize| unsafe { base.wrapping_add(off).cast::<u32>().read_unaligned() };
    let height = usize_at(offset_of!(M, Height));
    Copy3d {
        src: Side {
            x: usize_at(offset_of!(M, srcXInBytes)),
            y: usize_at(offset_of!(M, srcY)),
            z: 0,
            memory_type: u32_at(offset_of!(M, srcMemoryType)),
            host: usize_at(offset_of!(M, srcHost)) as usize,
            device: usize_at(offset_of!(M, srcDevice)),
            array: usize_at(offset_of!(M, srcArray)) as usize,
            pitch: usize_at(offset_of!(M, srcPitch)),
            height,
        },
        dst: Side {
            x: usize_at(offset_of!(M, dstXInBytes)),
            y: usize_at(offset_of!(M, dstY)),
            z: 0,
            memory_type: u32_at(offset_of!(M, dstMemoryType)),
            host: usize_at(offset_of!(M, dstHost)) as usize,
            device: usize_at(offset_of!(M, dstDevice)),
            array: usize_at(offset_of!(M, dstArray)) as usize,
            pitch: usize_at(offset_of!(M, dstPitch)),
            height,
        },
        width: usize_at(offset_of!(M, WidthInBytes)),
        height,
        depth: 1,
    }
}

/// One side of a request as the wire names it.
#[derive(Clone, Copy)]
struct Wire {
    kind: u8,
    at: u64,
    pos: (u64, u64, u64),
    pitch: u64,
    rows: u64,
}

/// A request for `height` rows of `width` bytes (and `depth` slices) between two sides.
fn request(shape: u8, src: Wire, dst: Wire, width: u64, height: u64, depth: u64, stream: Handle) -> p::MemcpyPitched {
    p::MemcpyPitched {
        shape,
        src_kind: src.kind,
        src: src.at,
        src_x: src.pos.0,
        src_y: src.pos.1,
        src_z: src.pos.2,
        src_pitch: src.pitch,
        src_height: src.rows,
        dst_kind: dst.kind,
        dst: dst.at,
        dst_x: dst.pos.0,
        dst_y: dst.pos.1,
        dst_z: dst.pos.2,
        dst_pitch: dst.pitch,
        dst_height: dst.rows,
        width,
        height,
        depth,
        stream,
    }
}

/// Byte offset of row `y` of slice `z` from a side's first byte.
fn row_offset(s: &Side, z: u64, y: u64) -> CuResult<u64> {
    z.checked_mul(s.height)
        .and_then(|r| r.checked_add(y))
        .and_then(|r| r.checked_mul(s.pitch))
        .ok_or(CuError::INVALID_VALUE)
}

/// A side the host reaches (device memory, the window, an array) as the wire names it, from
/// byte `col` of row `y` of slice `z` of the copy.
fn wire_of(at: &At, s: &Side, (z, y, col): (u64, u64, u64)) -> CuResult<Wire> {
    let linear = |kind: u8, first: u64| -> CuResult<Wire> {
        let by = row_offset(s, z, y)?.checked_add(col).ok_or(CuError::INVALID_VALUE)?;
        let at = first.checked_add(by).ok_or(CuError::INVALID_VALUE)?;
        Ok(Wire { kind, at, pos: (0, 0, 0), pitch: s.pitch, rows: s.height })
    };
    match *at {
        At::Device(a) => linear(KIND_DEVICE, a),
        At::Window(o, _) => linear(KIND_WINDOW, o),
        At::Array { array, at: (x, ay, az) } => {
            let add = |a: u64, b: u64| a.checked_add(b).ok_or(CuError::INVALID_VALUE);
            let pos = (add(x, col)?, add(ay, y)?, add(az, z)?);
            Ok(Wire { kind: KIND_ARRAY, at: array.0, pos, pitch: 0, rows: 0 })
        }
        At::Program(_) => Err(CuError::INVALID_VALUE),
    }
}

/// The program's address of a host side's first byte.
fn host_start(at: &At) -> Option<usize> {
    match *at {
        At::Window(_, a) | At::Program(a) => Some(a),
        At::Device(_) | At::Array { .. } => None,
    }
}

/// Which of the two sides is the program's pageable memory, staged through the window.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Staged {
    Source,
    Destination,
}

/// One band of a staged copy: slice `z`, rows `y .. y + rows`, bytes `col .. col + n` of each.
#[derive(Clone, Copy)]
struct Band {
    z: u64,
    y: u64,
    rows: u64,
    col: u64,
    n: u64,
}

/// A copy with pageable program memory on one side: bands of whole rows (a row wider than a
/// staging half in pieces) through the two staging halves, pipelined as the 1-D copies are —
/// the guest fills or drains one half while the host copies the other, and the fence after
/// each posted band says that the band before it is done (and surfaces its error).
#[allow(clippy::too_many_arguments)]
fn staged(
    conn: &mut Conn,
    c: &Copy3d,
    src: &At,
    dst: &At,
    which: Staged,
    shape: u8,
    depth: u64,
    stream: Handle,
) -> CuResult<()> {
    let (program, prog_side, other, other_side) = match (which, src, dst) {
        (Staged::Source, At::Program(a), o) => (*a, &c.src, o, &c.dst),
        (Staged::Destination, o, At::Program(a)) => (*a, &c.dst, o, &c.src),
        _ => return Err(CuError::INVALID_VALUE),
    };
    let halves = conn.window.staging_halves();
    let half = halves[0].len;
    let piece = c.width.min(half);
    let band_rows = if c.width <= half { (half / c.width).min(c.height) } else { 1 };
    let mut bands = Vec::new();
    for z in 0..depth {
        let mut y = 0;
        while y < c.height {
            let rows = band_rows.min(c.height - y);
            let mut col = 0;
            while col < c.width {
                let n = piece.min(c.width - col);
                bands.push(Band { z, y, rows, col, n });
                col += n;
            }
            y += rows;
        }
    }
    // Row `i` of a band in the program's memory.
    let program_row = |b: &Band, i: u64| -> CuResult<*mut u8> {
        let off = row_offset(prog_side, b.z, b.y + i)?.checked_add(b.col).ok_or(CuError::INVALID_VALUE)?;
        let at = program.checked_add(off as usize).ok_or(CuError::INVALID_VALUE)?;
        Ok(std::ptr::with_exposed_provenance_mut::<u8>(at))
    };
    // The request for band `b` through staging half `k`.
    let request_for = |b: &Band, k: usize| -> CuResult<p::MemcpyPitched> {
        let staged_side = Wire { kind: KIND_WINDOW, at: halves[k].offset, pos: (0, 0, 0), pitch: b.n, rows: b.rows };
        let other_wire = wire_of(other, other_side, (b.z, b.y, b.col))?;
        Ok(match which {
            Staged::Source => request(shape, staged_side, other_wire, b.n, b.rows, 1, stream),
            Staged::Destination => request(shape, other_wire, staged_side, b.n, b.rows, 1, stream),
        })
    };
    let fill = |conn: &mut Conn, b: &Band, k: usize| -> CuResult<()> {
        for i in 0..b.rows {
            // SAFETY: CUDA's contract: the program's block is readable (each row of the copy
            // lies in it).
            let row = unsafe { std::slice::from_raw_parts(program_row(b, i)?, b.n as usize) };
            conn.window.fill(BulkRef { offset: halves[k].offset + i * b.n, len: b.n }, row)?;
        }
        Ok(())
    };
    let drain = |conn: &mut Conn, b: &Band, k: usize| -> CuResult<()> {
        for i in 0..b.rows {
            // SAFETY: CUDA's contract: the program's block is writable.
            let row = unsafe { std::slice::from_raw_parts_mut(program_row(b, i)?, b.n as usize) };
            conn.window.drain(BulkRef { offset: halves[k].offset + i * b.n, len: b.n }, row)?;
        }
        Ok(())
    };
    match which {
        Staged::Source => {
            if let Some(first) = bands.first() {
                fill(conn, first, 0)?;
            }
            for (i, b) in bands.iter().enumerate() {
                conn.post(&request_for(b, i % 2)?)?;
                if let Some(next) = bands.get(i + 1) {
                    // The other half's band (i - 1) is done: the fence after it was answered.
                    fill(conn, next, (i + 1) % 2)?;
                }
                let _: Done = conn.call(&p::Fence {})?;
            }
        }
        Staged::Destination => {
            if let Some(first) = bands.first() {
                conn.post(&request_for(first, 0)?)?;
                let _: Done = conn.call(&p::Fence {})?;
            }
            for (i, b) in bands.iter().enumerate() {
                if let Some(next) = bands.get(i + 1) {
                    // Into the half drained last round, while this band is drained.
                    conn.post(&request_for(next, (i + 1) % 2)?)?;
                }
                drain(conn, b, i % 2)?;
                if i + 1 < bands.len() {
                    let _: Done = conn.call(&p::Fence {})?;
                }
            }
        }
    }
    Ok(())
}

/// A copy between two host buffers, done here row by row (rows may overlap, as `memmove`).
fn host_to_host(c: &Copy3d, from: usize, to: usize, depth: u64) -> CuResult<()> {
    for z in 0..depth {
        for y in 0..c.height {
            let s = from.checked_add(row_offset(&c.src, z, y)? as usize).ok_or(CuError::INVALID_VALUE)?;
            let d = to.checked_add(row_offset(&c.dst, z, y)? as usize).ok_or(CuError::INVALID_VALUE)?;
            let (s, d) = (std::ptr::with_exposed_provenance::<u8>(s), std::ptr::with_exposed_provenance_mut::<u8>(d));
            // SAFETY: CUDA's contract: both blocks are valid host memory for every row copied.
            unsafe { std::ptr::copy(s, d, c.width as usize) };
        }
    }
    Ok(())
}

/// Runs copy `c` as the driver entry point `shape` names, on `stream`.
pub(super) fn pitched(c: &Copy3d, shape: u8, stream: Handle, asynchronous: bool) -> CuResult<()> {
    let s = session()?;
    let mut conn = s.lock();
    conn.enter_current()?;
    let depth = if shape == SHAPE_VOLUME { c.depth } else { 1 };
    if c.width == 0 || c.height == 0 || depth == 0 {
        return Ok(());
    }
    let src = locate(&c.src, c, &mut conn)?;
    let dst = locate(&c.dst, c, &mut conn)?;
    if let (Some(from), Some(to)) = (host_start(&src), host_start(&dst)) {
        return host_to_host(c, from, to, depth);
    }
    let pageable = matches!(src, At::Program(_)) || matches!(dst, At::Program(_));
    if pageable && asynchronous && rt::captures_open() {
        drop(conn);
        if super::capture::handle_is_capturing(stream)? {
            return Err(rt::unsupported_err(
                "cuMemcpy2DAsync/cuMemcpy3DAsync of pageable memory on a capturing stream",
            ));
        }
        conn = s.lock();
        conn.enter_current()?;
    }
    match (&src, &dst) {
        (At::Program(_), _) => staged(&mut conn, c, &src, &dst, Staged::Source, shape, depth, stream),
        (_, At::Program(_)) => staged(&mut conn, c, &src, &dst, Staged::Destination, shape, depth, stream),
        _ => {
            let req = request(
                shape,
                wire_of(&src, &c.src, (0, 0, 0))?,
                wire_of(&dst, &c.dst, (0, 0, 0))?,
                c.width,
                c.height,
                depth,
                stream,
            );
            if asynchronous {
                conn.post(&p::MemcpyPitchedAsync::from(req))
            } else {
                conn.call::<_, Done>(&req).map(drop)
            }
        }
    }
}

/// A 2-D copy's descriptor, or `CUDA_ERROR_INVALID_VALUE` for NULL.
unsafe fn plane(p: *const sys::CUDA_MEMCPY2D) -> CuResult<Copy3d> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: a non-null `p` points to the structure.
    Ok(unsafe { read_copy_2d(p) })
}

/// A 3-D copy's descriptor, or `CUDA_ERROR_INVALID_VALUE` for NULL.
unsafe fn volume(p: *const sys::CUDA_MEMCPY3D) -> CuResult<Copy3d> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: a non-null `p` points to the structure.
    Ok(unsafe { read_copy(p) })
}

/// `cuMemcpy2D_v2`.
pub unsafe fn cu_memcpy2_d_v2(p: *const sys::CUDA_MEMCPY2D) -> CuResult<()> {
    // SAFETY: forwarded contract.
    let c = unsafe { plane(p) }?;
    pitched(&c, SHAPE_PLANE, rt::stream_arg(std::ptr::null_mut())?, false)
}

/// `cuMemcpy2DUnaligned_v2`.
pub unsafe fn cu_memcpy2_d_unaligned_v2(p: *const sys::CUDA_MEMCPY2D) -> CuResult<()> {
    // SAFETY: forwarded contract.
    let c = unsafe { plane(p) }?;
    pitched(&c, SHAPE_PLANE_UNALIGNED, rt::stream_arg(std::ptr::null_mut())?, false)
}

/// `cuMemcpy2DAsync_v2`.
pub unsafe fn cu_memcpy2_d_async_v2(p: *const sys::CUDA_MEMCPY2D, stream: sys::CUstream) -> CuResult<()> {
    // SAFETY: forwarded contract.
    let c = unsafe { plane(p) }?;
    pitched(&c, SHAPE_PLANE, rt::stream_arg(stream)?, true)
}

/// `cuMemcpy3D_v2`.
pub unsafe fn cu_memcpy3_d_v2(p: *const sys::CUDA_MEMCPY3D) -> CuResult<()> {
    // SAFETY: forwarded contract.
    let c = unsafe { volume(p) }?;
    pitched(&c, SHAPE_VOLUME, rt::stream_arg(std::ptr::null_mut())?, false)
}

/// `cuMemcpy3DAsync_v2`.
pub unsafe fn cu_memcpy3_d_async_v2(p: *const sys::CUDA_MEMCPY3D, stream: sys::CUstream) -> CuResult<()> {
    // SAFETY: forwarded contract.
    let c = unsafe { volume(p) }?;
    pitched(&c, SHAPE_VOLUME, rt::stream_arg(stream)?, true)
}
