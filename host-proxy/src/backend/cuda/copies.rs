//! Copies and memsets with a shape (`cuMemcpy2D*`, `cuMemcpy3D*`, `cuMemsetD2D*`) on the real
//! driver, and the driver's copy descriptors, which graph copy nodes use too.
//!
//! Both sides of a copy are device addresses the zone checked or window offsets this backend
//! turns into addresses in the registered window. A plane (2-D) copy goes to the driver's own
//! 2-D entry point, not to the 3-D one, so that what the driver refuses natively (a device
//! pitch `cuMemcpy2D` does not take, where `cuMemcpy2DUnaligned` would) it refuses here too.

use super::*;
use crate::backend::{CopyEnd, CopyShape, GraphCopy, GraphMemset};

/// `CUDA_MEMCPY3D` with its memory types as plain integers (see the module docs of
/// `cuda.rs`: a Rust enum must never hold a value the driver did not declare).
#[repr(C)]
#[derive(Debug)]
pub(super) struct RawMemcpy3d {
    src_x_in_bytes: usize,
    src_y: usize,
    src_z: usize,
    src_lod: usize,
    src_memory_type: c_uint,
    src_host: *const c_void,
    src_device: sys::CUdeviceptr,
    src_array: sys::CUarray,
    reserved0: *mut c_void,
    src_pitch: usize,
    src_height: usize,
    dst_x_in_bytes: usize,
    dst_y: usize,
    dst_z: usize,
    dst_lod: usize,
    dst_memory_type: c_uint,
    dst_host: *mut c_void,
    dst_device: sys::CUdeviceptr,
    dst_array: sys::CUarray,
    reserved1: *mut c_void,
    dst_pitch: usize,
    dst_height: usize,
    width_in_bytes: usize,
    height: usize,
    depth: usize,
}

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RawMemcpy3d>() == size_of::<sys::CUDA_MEMCPY3D_st>());
    assert!(align_of::<RawMemcpy3d>() == align_of::<sys::CUDA_MEMCPY3D_st>());
    assert!(offset_of!(RawMemcpy3d, src_memory_type) == offset_of!(sys::CUDA_MEMCPY3D_st, srcMemoryType));
    assert!(offset_of!(RawMemcpy3d, src_host) == offset_of!(sys::CUDA_MEMCPY3D_st, srcHost));
    assert!(offset_of!(RawMemcpy3d, src_height) == offset_of!(sys::CUDA_MEMCPY3D_st, srcHeight));
    assert!(offset_of!(RawMemcpy3d, dst_memory_type) == offset_of!(sys::CUDA_MEMCPY3D_st, dstMemoryType));
    assert!(offset_of!(RawMemcpy3d, dst_device) == offset_of!(sys::CUDA_MEMCPY3D_st, dstDevice));
    assert!(offset_of!(RawMemcpy3d, dst_height) == offset_of!(sys::CUDA_MEMCPY3D_st, dstHeight));
    assert!(offset_of!(RawMemcpy3d, depth) == offset_of!(sys::CUDA_MEMCPY3D_st, Depth));
};

/// `CU_MEMORYTYPE_HOST`, `CU_MEMORYTYPE_DEVICE` and `CU_MEMORYTYPE_ARRAY`.
const MEMORYTYPE_HOST: c_uint = 1;
const MEMORYTYPE_DEVICE: c_uint = 2;
const MEMORYTYPE_ARRAY: c_uint = 3;

/// One side of a copy in driver terms: its memory type, where it is (host pointer, device
/// address or array) and, for an array, the position (bytes, row, slice).
pub(super) struct Side {
    memory_type: c_uint,
    host: *mut c_void,
    device: sys::CUdeviceptr,
    array: sys::CUarray,
    at: (usize, usize, usize),
}

/// `CUDA_MEMCPY2D` with its memory types as plain integers, as [`RawMemcpy3d`].
#[repr(C)]
#[derive(Debug)]
pub(super) struct RawMemcpy2d {
    src_x_in_bytes: usize,
    src_y: usize,
    src_memory_type: c_uint,
    src_host: *const c_void,
    src_device: sys::CUdeviceptr,
    src_array: sys::CUarray,
    src_pitch: usize,
    dst_x_in_bytes: usize,
    dst_y: usize,
    dst_memory_type: c_uint,
    dst_host: *mut c_void,
    dst_device: sys::CUdeviceptr,
    dst_array: sys::CUarray,
    dst_pitch: usize,
    width_in_bytes: usize,
    height: usize,
}

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RawMemcpy2d>() == size_of::<sys::CUDA_MEMCPY2D_st>());
    assert!(align_of::<RawMemcpy2d>() == align_of::<sys::CUDA_MEMCPY2D_st>());
    assert!(offset_of!(RawMemcpy2d, src_memory_type) == offset_of!(sys::CUDA_MEMCPY2D_st, srcMemoryType));
    assert!(offset_of!(RawMemcpy2d, src_host) == offset_of!(sys::CUDA_MEMCPY2D_st, srcHost));
    assert!(offset_of!(RawMemcpy2d, src_pitch) == offset_of!(sys::CUDA_MEMCPY2D_st, srcPitch));
    assert!(offset_of!(RawMemcpy2d, dst_memory_type) == offset_of!(sys::CUDA_MEMCPY2D_st, dstMemoryType));
    assert!(offset_of!(RawMemcpy2d, dst_device) == offset_of!(sys::CUDA_MEMCPY2D_st, dstDevice));
    assert!(offset_of!(RawMemcpy2d, dst_pitch) == offset_of!(sys::CUDA_MEMCPY2D_st, dstPitch));
    assert!(offset_of!(RawMemcpy2d, height) == offset_of!(sys::CUDA_MEMCPY2D_st, Height));
};

impl RawMemcpy3d {
    /// The same copy as a plane (its first slice).
    fn plane(&self) -> RawMemcpy2d {
        RawMemcpy2d {
            src_x_in_bytes: self.src_x_in_bytes,
            src_y: self.src_y,
            src_memory_type: self.src_memory_type,
            src_host: self.src_host,
            src_device: self.src_device,
            src_array: self.src_array,
            src_pitch: self.src_pitch,
            dst_x_in_bytes: self.dst_x_in_bytes,
            dst_y: self.dst_y,
            dst_memory_type: self.dst_memory_type,
            dst_host: self.dst_host,
            dst_device: self.dst_device,
            dst_array: self.dst_array,
            dst_pitch: self.dst_pitch,
            width_in_bytes: self.width_in_bytes,
            height: self.height,
        }
    }
}

impl CudaGpu {
    /// Where one side of a copy is, in driver terms.
    pub(super) fn copy_side(&self, end: CopyEnd) -> CuResult<Side> {
        let none = Side {
            memory_type: MEMORYTYPE_DEVICE,
            host: std::ptr::null_mut(),
            device: 0,
            array: std::ptr::null_mut(),
            at: (0, 0, 0),
        };
        let size = |v: u64| usize::try_from(v).map_err(|_| CuError::INVALID_VALUE);
        match end {
            CopyEnd::Device(addr) => Ok(Side { device: addr, ..none }),
            CopyEnd::Window(offset) => {
                let (base, len) = self.window.ok_or(CuError::NOT_SUPPORTED)?;
                let offset = usize::try_from(offset).ok().filter(|&o| o < len).ok_or(CuError::INVALID_VALUE)?;
                Ok(Side { memory_type: MEMORYTYPE_HOST, host: base.as_ptr().wrapping_add(offset).cast(), ..none })
            }
            CopyEnd::Array { id, x, y, z } => Ok(Side {
                memory_type: MEMORYTYPE_ARRAY,
                array: self.raw_array(id)?,
                at: (size(x)?, size(y)?, size(z)?),
                ..none
            }),
        }
    }

    /// The driver's `CUDA_MEMCPY3D` for `c`.
    pub(super) fn raw_copy(&self, c: &GraphCopy) -> CuResult<RawMemcpy3d> {
        let size = |v: u64| usize::try_from(v).map_err(|_| CuError::INVALID_VALUE);
        let (src, dst) = (self.copy_side(c.src)?, self.copy_side(c.dst)?);
        Ok(RawMemcpy3d {
            src_x_in_bytes: src.at.0,
            src_y: src.at.1,
            src_z: src.at.2,
            src_lod: 0,
            src_memory_type: src.memory_type,
            src_host: src.host.cast_const(),
            src_device: src.device,
            src_array: src.array,
            reserved0: std::ptr::null_mut(),
            src_pitch: size(c.src_pitch)?,
            src_height: size(c.src_height)?,
            dst_x_in_bytes: dst.at.0,
            dst_y: dst.at.1,
            dst_z: dst.at.2,
            dst_lod: 0,
            dst_memory_type: dst.memory_type,
            dst_host: dst.host,
            dst_device: dst.device,
            dst_array: dst.array,
            reserved1: std::ptr::null_mut(),
            dst_pitch: size(c.dst_pitch)?,
            dst_height: size(c.dst_height)?,
            width_in_bytes: size(c.width)?,
            height: size(c.height)?,
            depth: size(c.depth)?,
        })
    }

    /// A pitched copy on `stream` (NULL: synchronous). `PlaneUnaligned` has no stream
    /// variant in the driver: it is synchronous whatever the stream. With `wait`, returns once
    /// the copy is done (the guest reuses window bytes then).
    pub(super) fn driver_copy_pitched(
        &mut self,
        c: &GraphCopy,
        shape: CopyShape,
        stream: Option<&CudaStream>,
        wait: bool,
    ) -> CuResult<()> {
        let p = self.raw_copy(c)?;
        let stream = self.raw_stream(stream)?;
        self.enter()?;
        // For every arm: `p` has the driver's descriptor layout (asserted above); device
        // sides are ranges of this zone's own memory the zone checked, window sides lie in the
        // window registered with the driver (checked by `copy_side`, mapped until this
        // backend is dropped); `s` is a live stream of this backend or the NULL stream.
        // Posted work on the NULL stream is queued on it, as natively; a copy the caller
        // waits for without a stream is the driver's synchronous call.
        let queued = match stream {
            Some(s) => Some(s),
            None if !wait => Some(std::ptr::null_mut()),
            None => None,
        };
        let rc = match (shape, queued) {
            // SAFETY: as above.
            (CopyShape::Volume, None) => unsafe { (self.api.memcpy_3d)(&p) },
            // SAFETY: as above.
            (CopyShape::Volume, Some(s)) => unsafe { (self.api.memcpy_3d_async)(&p, s) },
            // SAFETY: as above.
            (CopyShape::Plane, None) => unsafe { (self.api.memcpy_2d)(&p.plane()) },
            // SAFETY: as above.
            (CopyShape::Plane, Some(s)) => unsafe { (self.api.memcpy_2d_async)(&p.plane(), s) },
            // SAFETY: as above.
            (CopyShape::PlaneUnaligned, _) => unsafe { (self.api.memcpy_2d_unaligned)(&p.plane()) },
        };
        check(rc)?;
        if let (true, Some(s)) = (wait, stream) {
            // SAFETY: a live stream of this backend.
            check(unsafe { (self.api.stream_synchronize)(s) })?;
        }
        Ok(())
    }

    /// A 2-D memset on `stream` (NULL: the legacy stream).
    pub(super) fn driver_memset_pitched(&mut self, m: &GraphMemset, stream: Option<&CudaStream>) -> CuResult<()> {
        let size = |v: u64| usize::try_from(v).map_err(|_| CuError::INVALID_VALUE);
        let (pitch, width, height) = (size(m.pitch)?, size(m.width)?, size(m.height)?);
        let stream = self.raw_stream(stream)?;
        self.enter()?;
        let d = m.dst;
        // The value's low bytes, as the driver takes it for each element size.
        let (v8, v16) = (m.value as c_uchar, m.value as c_ushort);
        // For every arm: device addresses only — the zone checked the whole pitched block
        // against this zone's own memory; `s` is a live stream of this backend. The driver
        // refuses misaligned addresses and pitches itself.
        let rc = match (m.element_size, stream) {
            // SAFETY: as above.
            (1, None) => unsafe { (self.api.memset_2d8)(d, pitch, v8, width, height) },
            // SAFETY: as above.
            (1, Some(s)) => unsafe { (self.api.memset_2d8_async)(d, pitch, v8, width, height, s) },
            // SAFETY: as above.
            (2, None) => unsafe { (self.api.memset_2d16)(d, pitch, v16, width, height) },
            // SAFETY: as above.
            (2, Some(s)) => unsafe { (self.api.memset_2d16_async)(d, pitch, v16, width, height, s) },
            // SAFETY: as above.
            (4, None) => unsafe { (self.api.memset_2d32)(d, pitch, m.value, width, height) },
            // SAFETY: as above.
            (4, Some(s)) => unsafe { (self.api.memset_2d32_async)(d, pitch, m.value, width, height, s) },
            _ => return Err(CuError::INVALID_VALUE),
        };
        check(rc)
    }
}
