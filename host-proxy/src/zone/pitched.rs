//! Copies and memsets with a shape on streams: the zone's side of `cuMemcpy2D*`,
//! `cuMemcpy3D*` (linear memory) and `cuMemsetD2D*`.
//!
//! Each side of a pitched copy is checked as a whole block, as a graph copy node's is: from
//! its first byte to one past its last (rows `pitch` apart, slices `pitch * height` apart,
//! overlapping layouts refused), a device block inside one of the zone's own ranges, a window
//! block inside the window. When the backend took the window, the copy is one backend call,
//! through the driver entry point the guest called. Where it did not (Xen's grant mappings),
//! window sides are staged row by row through the zone's buffer, each row a plain copy.

use super::graphs::block_extent;
use super::*;
use crate::backend::{CopyEnd, CopyShape, GraphCopy, GraphMemset};

/// One side of a pitched copy in the row-by-row path.
#[derive(Clone, Copy)]
struct RowSide {
    window: bool,
    first: u64,
    pitch: u64,
    slice_rows: u64,
}

impl RowSide {
    /// Where row `y` of slice `z` starts (in range: the block was checked).
    fn row(&self, z: u64, y: u64) -> u64 {
        self.first + (z * self.slice_rows + y) * self.pitch
    }
}

/// What one side of a `MemcpyPitched` names (`src_kind`/`dst_kind`).
const KIND_DEVICE: u8 = 0;
const KIND_WINDOW: u8 = 1;
const KIND_ARRAY: u8 = 2;

/// One side of a request, as the wire has it.
struct WireSide {
    kind: u8,
    at: u64,
    pos: (u64, u64, u64),
    pitch: u64,
    slice_rows: u64,
}

impl<B: GpuBackend> Zone<B> {
    /// One side of a copy checked, as the backend's end with its pitch and rows per slice.
    fn pitched_end(
        &self,
        s: &WireSide,
        r: &MemcpyPitched,
        depth: u64,
        window_size: usize,
    ) -> CuResult<(CopyEnd, u64, u64)> {
        if s.kind == KIND_ARRAY {
            let (x, y, z) = s.pos;
            return self.array_end(Handle(s.at), x, y, z, r.width, r.height, depth);
        }
        // Linear sides have their position folded into the address.
        if s.pos != (0, 0, 0) || !matches!(s.kind, KIND_DEVICE | KIND_WINDOW) {
            return Err(CuError::INVALID_VALUE);
        }
        let extent = block_extent(r.width, r.height, depth, s.pitch, s.slice_rows)?;
        Ok((self.copy_end(s.kind == KIND_WINDOW, s.at, extent, window_size)?, s.pitch, s.slice_rows))
    }

    /// A pitched copy (`MemcpyPitched`); with `wait`, the window bytes are free again on
    /// return.
    pub(super) fn memcpy_pitched<D: SharedMemory>(
        &mut self,
        window: &DataWindow<D>,
        r: &MemcpyPitched,
        wait: bool,
    ) -> CuResult<()> {
        let shape = CopyShape::from_wire(r.shape).ok_or(CuError::INVALID_VALUE)?;
        // A plane is its first slice, whatever the depth field says.
        let depth = if shape == CopyShape::Volume { r.depth } else { 1 };
        let src = WireSide {
            kind: r.src_kind,
            at: r.src,
            pos: (r.src_x, r.src_y, r.src_z),
            pitch: r.src_pitch,
            slice_rows: r.src_height,
        };
        let dst = WireSide {
            kind: r.dst_kind,
            at: r.dst,
            pos: (r.dst_x, r.dst_y, r.dst_z),
            pitch: r.dst_pitch,
            slice_rows: r.dst_height,
        };
        let touches_window = src.kind == KIND_WINDOW || dst.kind == KIND_WINDOW;
        if touches_window && wait {
            // The guest reuses these window bytes once this is answered: never captured.
            self.refuse_if_capturing(r.stream)?;
        }
        if touches_window && !self.window_direct {
            if src.kind == KIND_ARRAY || dst.kind == KIND_ARRAY {
                // Rows of an array are not addresses the staged path can copy to.
                tracing::debug!("copies between CUDA arrays and an unregistered window: CUDA_ERROR_NOT_SUPPORTED");
                return Err(CuError::NOT_SUPPORTED);
            }
            let linear = |s: &WireSide| s.pos == (0, 0, 0) && matches!(s.kind, KIND_DEVICE | KIND_WINDOW);
            if !linear(&src) || !linear(&dst) {
                return Err(CuError::INVALID_VALUE);
            }
            let src_extent = block_extent(r.width, r.height, depth, src.pitch, src.slice_rows)?;
            let dst_extent = block_extent(r.width, r.height, depth, dst.pitch, dst.slice_rows)?;
            let side = |s: &WireSide| RowSide {
                window: s.kind == KIND_WINDOW,
                first: s.at,
                pitch: s.pitch,
                slice_rows: s.slice_rows,
            };
            let (src, dst) = (side(&src), side(&dst));
            self.check_side(window, src, src_extent)?;
            self.check_side(window, dst, dst_extent)?;
            return self.copy_by_rows(window, src, dst, r.width, r.height, depth, r.stream);
        }
        let window_size = window.size();
        let (src_end, src_pitch, src_height) = self.pitched_end(&src, r, depth, window_size)?;
        let (dst_end, dst_pitch, dst_height) = self.pitched_end(&dst, r, depth, window_size)?;
        let c = GraphCopy {
            src: src_end,
            src_pitch,
            src_height,
            dst: dst_end,
            dst_pitch,
            dst_height,
            width: r.width,
            height: r.height,
            depth,
        };
        let s = stream_of(&self.streams, r.stream)?;
        self.backend.copy_pitched(&c, shape, s, wait)
    }

    /// A side's whole block, `extent` bytes from its first byte, is the zone's.
    fn check_side<D: SharedMemory>(&self, window: &DataWindow<D>, side: RowSide, extent: u64) -> CuResult<()> {
        if side.window {
            window.check(BulkRef { offset: side.first, len: extent }).map_err(|_| CuError::INVALID_VALUE)?;
            Ok(())
        } else {
            self.check_range(side.first, extent)
        }
    }

    /// The row-by-row path: each row (in pieces of at most [`STAGING_CHUNK`]) goes through
    /// the staging buffer; both blocks were checked.
    #[allow(clippy::too_many_arguments)]
    fn copy_by_rows<D: SharedMemory>(
        &mut self,
        window: &DataWindow<D>,
        src: RowSide,
        dst: RowSide,
        width: u64,
        height: u64,
        depth: u64,
        stream: Handle,
    ) -> CuResult<()> {
        let bad = |_| CuError::INVALID_VALUE;
        let s = stream_of(&self.streams, stream)?;
        let mut buf = std::mem::take(&mut self.staging);
        buf.resize((width as usize).min(STAGING_CHUNK), 0);
        let mut result = Ok(());
        'rows: for z in 0..depth {
            for y in 0..height {
                let (from, to) = (src.row(z, y), dst.row(z, y));
                let mut done = 0u64;
                while done < width {
                    let n = (width - done).min(buf.len() as u64);
                    let chunk = &mut buf[..n as usize];
                    let (at, into) = (from + done, to + done);
                    let read = if src.window {
                        window.read(BulkRef { offset: at, len: n }, chunk).map_err(bad)
                    } else {
                        self.backend.copy_dtoh(chunk, at, s)
                    };
                    result = read.and_then(|()| {
                        if dst.window {
                            window.write(BulkRef { offset: into, len: n }, chunk).map_err(bad)
                        } else {
                            self.backend.copy_htod(into, chunk, s)
                        }
                    });
                    if result.is_err() {
                        break 'rows;
                    }
                    done += n;
                }
            }
        }
        self.staging = buf;
        result
    }

    /// A 2-D memset of `height` rows of `width` elements of `element_size` bytes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn memset_pitched(
        &mut self,
        dst: u64,
        pitch: u64,
        value: u32,
        element_size: u32,
        width: u64,
        height: u64,
        stream: Handle,
    ) -> CuResult<()> {
        let s = stream_of(&self.streams, stream)?;
        if width == 0 || height == 0 {
            return Ok(());
        }
        let row = bytes_of(width, u64::from(element_size))?;
        self.check_range(dst, block_extent(row, height, 1, pitch, height)?)?;
        let m = GraphMemset { dst, pitch, value, element_size, width, height };
        self.backend.memset_pitched(&m, s)
    }
}
