//! CUDA arrays, texture and surface objects on the real driver.
//!
//! Arrays are ids in this backend's table, like streams, and are scrubbed (zeroed from a
//! zeroed device block) before they go back to the driver, as allocations are: when
//! destroyed, and before their context is. The driver's descriptors are built
//! here from checked values: an array's shape as `CUDA_ARRAY3D_DESCRIPTOR` (formats as plain
//! integers, see `cuda.rs`), a texture's resource as `CUDA_RESOURCE_DESC` (an array of this
//! backend, or linear memory the zone checked). The texture and view descriptors are the
//! program's bytes, plain values the driver validates, passed through an aligned copy.

use super::*;
use crate::backend::{ArrayDesc, CopyEnd, GraphCopy, TexResource, TEX_DESC_LEN, VIEW_DESC_LEN};

/// A CUDA array of a [`CudaGpu`] (an id, like [`CudaStream`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CudaArray {
    pub(super) id: u64,
}

/// A live array: the driver's, the context it was made in, its shape (for the scrub).
#[derive(Debug)]
pub(super) struct ArrayState {
    raw: sys::CUarray,
    ctx: CtxId,
    desc: ArrayDesc,
}

/// Bytes of the zeroed block an array is scrubbed from, a band of rows at a time.
const SCRUB_BAND: u64 = 16 << 20;

/// `CUDA_ARRAY3D_DESCRIPTOR` with its format as a plain integer.
#[repr(C)]
#[derive(Debug)]
pub(super) struct RawArray3dDesc {
    width: usize,
    height: usize,
    depth: usize,
    format: c_uint,
    channels: c_uint,
    flags: c_uint,
}

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<RawArray3dDesc>() == size_of::<sys::CUDA_ARRAY3D_DESCRIPTOR_st>());
    assert!(align_of::<RawArray3dDesc>() == align_of::<sys::CUDA_ARRAY3D_DESCRIPTOR_st>());
    assert!(offset_of!(RawArray3dDesc, format) == offset_of!(sys::CUDA_ARRAY3D_DESCRIPTOR_st, Format));
    assert!(offset_of!(RawArray3dDesc, flags) == offset_of!(sys::CUDA_ARRAY3D_DESCRIPTOR_st, Flags));
    // The resource descriptor is built as words (see `resource_desc`), the texture and view
    // descriptors are passed as the program's bytes: their sizes must be the driver's.
    assert!(size_of::<sys::CUDA_RESOURCE_DESC_st>() == RESOURCE_DESC_WORDS * 8);
    assert!(offset_of!(sys::CUDA_RESOURCE_DESC_st, res) == 8);
    assert!(offset_of!(sys::CUDA_RESOURCE_DESC_st, flags) == 136);
    assert!(size_of::<sys::CUDA_TEXTURE_DESC_st>() == TEX_DESC_LEN);
    assert!(size_of::<sys::CUDA_RESOURCE_VIEW_DESC_st>() == VIEW_DESC_LEN);
    assert!(offset_of!(sys::CUDA_RESOURCE_DESC_st__bindgen_ty_1__bindgen_ty_3, format) == 8);
    assert!(offset_of!(sys::CUDA_RESOURCE_DESC_st__bindgen_ty_1__bindgen_ty_3, sizeInBytes) == 16);
    assert!(offset_of!(sys::CUDA_RESOURCE_DESC_st__bindgen_ty_1__bindgen_ty_4, width) == 16);
    assert!(offset_of!(sys::CUDA_RESOURCE_DESC_st__bindgen_ty_1__bindgen_ty_4, pitchInBytes) == 32);
};

/// 8-byte words of a `CUDA_RESOURCE_DESC`.
pub(super) const RESOURCE_DESC_WORDS: usize = 18;

/// `CU_RESOURCE_TYPE_ARRAY`, `…_LINEAR`, `…_PITCH2D`.
const RESOURCE_ARRAY: u64 = 0;
const RESOURCE_LINEAR: u64 = 2;
const RESOURCE_PITCH2D: u64 = 3;

/// An 8-byte-aligned copy of a descriptor's bytes.
fn aligned<const N: usize>(bytes: &[u8; N]) -> Vec<u64> {
    let mut words = vec![0u64; N.div_ceil(8)];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
    words
}

impl CudaGpu {
    /// The driver array of array `id`.
    pub(super) fn raw_array(&self, id: u64) -> CuResult<sys::CUarray> {
        self.arrays.get(&id).map(|a| a.raw).ok_or(CuError::INVALID_HANDLE)
    }

    /// Zeroes array `id` (in the current context, its own) from a zeroed device block, a
    /// band of rows at a time, and waits for it: as every allocation is scrubbed before it
    /// goes back to the driver.
    fn scrub_array(&self, id: u64) -> CuResult<()> {
        let desc = self.arrays.get(&id).map(|a| a.desc).ok_or(CuError::INVALID_HANDLE)?;
        let row = desc.row_bytes().ok_or(CuError::INVALID_VALUE)?;
        let (rows, slices) = desc.rows_and_slices();
        let band = (SCRUB_BAND / row.max(1)).clamp(1, rows);
        let n = byte_count(band * row)?;
        let mut zero: sys::CUdeviceptr = 0;
        // SAFETY: one valid out-pointer.
        check(unsafe { (self.api.mem_alloc)(&mut zero, n) })?;
        let result = (|| {
            // SAFETY: `zero` is the `n`-byte allocation just made.
            check(unsafe { (self.api.memset_d8)(zero, 0, n) })?;
            for z in 0..slices {
                let mut y = 0;
                while y < rows {
                    let height = band.min(rows - y);
                    let c = GraphCopy {
                        src: CopyEnd::Device(zero),
                        src_pitch: row,
                        src_height: band,
                        dst: CopyEnd::Array { id, x: 0, y, z },
                        dst_pitch: row,
                        dst_height: rows,
                        width: row,
                        height,
                        depth: 1,
                    };
                    let p = self.raw_copy(&c)?;
                    // SAFETY: `p` names the zeroed block (`height` rows of `row` bytes) and
                    // rows inside the live array.
                    check(unsafe { (self.api.memcpy_3d)(&p) })?;
                    y += height;
                }
            }
            self.ctx_synchronize()
        })();
        // SAFETY: the block made above, no longer used (the copies were synchronous).
        let freed = check(unsafe { (self.api.mem_free)(zero) });
        result.and(freed)
    }

    /// Scrubs and destroys array `id` in its own context.
    fn release_array(&mut self, id: u64) -> CuResult<()> {
        let ctx = self.arrays.get(&id).map(|a| a.ctx).ok_or(CuError::INVALID_HANDLE)?;
        self.make_current(ctx)?;
        let scrubbed = self.scrub_array(id);
        if let Err(e) = &scrubbed {
            tracing::warn!(error = %e, "a CUDA array could not be scrubbed: destroyed unscrubbed");
        }
        let raw = self.arrays.remove(&id).map(|a| a.raw).ok_or(CuError::INVALID_HANDLE)?;
        // SAFETY: a live array of this backend, now out of the table, so destroyed once.
        let destroyed = check(unsafe { (self.api.array_destroy)(raw) });
        let back = self.make_current(self.current);
        destroyed.and(back)
    }

    /// Scrubs and destroys the arrays of context `ctx` (before the context goes).
    pub(super) fn release_arrays_of(&mut self, ctx: CtxId) {
        let doomed: Vec<u64> = self.arrays.iter().filter(|(_, a)| a.ctx == ctx).map(|(&id, _)| id).collect();
        for id in doomed {
            if let Err(e) = self.release_array(id) {
                tracing::warn!(error = %e, "a CUDA array of a destroyed context could not be released");
            }
        }
    }

    pub(super) fn create_array(&mut self, desc: &ArrayDesc) -> CuResult<CudaArray> {
        desc.bytes().ok_or(CuError::INVALID_VALUE)?;
        let size = |v: u64| usize::try_from(v).map_err(|_| CuError::INVALID_VALUE);
        let raw = RawArray3dDesc {
            width: size(desc.width)?,
            height: size(desc.height)?,
            depth: size(desc.depth)?,
            format: desc.format,
            channels: desc.channels,
            flags: desc.flags,
        };
        self.enter()?;
        let mut array: sys::CUarray = std::ptr::null_mut();
        // SAFETY: `raw` has the descriptor's layout (asserted above); `array` is one valid
        // out-pointer.
        check(unsafe { (self.api.array_3d_create)(&mut array, &raw) })?;
        let id = next_id();
        self.arrays.insert(id, ArrayState { raw: array, ctx: self.current, desc: *desc });
        Ok(CudaArray { id })
    }

    pub(super) fn destroy_array(&mut self, array: CudaArray) -> CuResult<()> {
        self.release_array(array.id)
    }

    /// The driver's `CUDA_RESOURCE_DESC` for `res`, as words.
    fn resource_desc(&self, res: &TexResource<'_, CudaArray>) -> CuResult<[u64; RESOURCE_DESC_WORDS]> {
        let mut w = [0u64; RESOURCE_DESC_WORDS];
        let format_channels = |format: u32, channels: u32| u64::from(format) | (u64::from(channels) << 32);
        match *res {
            TexResource::Array(a) => {
                // The array's pointer goes in by `texture_call`, as the pointer it is.
                w[0] = RESOURCE_ARRAY;
                self.raw_array(a.id)?;
            }
            TexResource::Linear { dptr, format, channels, size } => {
                w[0] = RESOURCE_LINEAR;
                (w[1], w[2], w[3]) = (dptr, format_channels(format, channels), size);
            }
            TexResource::Pitch2d { dptr, format, channels, width, height, pitch } => {
                w[0] = RESOURCE_PITCH2D;
                (w[1], w[2], w[3], w[4], w[5]) = (dptr, format_channels(format, channels), width, height, pitch);
            }
        }
        Ok(w)
    }

    pub(super) fn create_texture(
        &mut self,
        res: TexResource<'_, CudaArray>,
        tex_desc: &[u8; TEX_DESC_LEN],
        view: Option<&[u8; VIEW_DESC_LEN]>,
    ) -> CuResult<u64> {
        let desc = self.resource_desc(&res)?;
        let array = match res {
            TexResource::Array(a) => Some(self.raw_array(a.id)?),
            _ => None,
        };
        let tex = aligned(tex_desc);
        let view = view.map(aligned);
        self.texture_call(&desc, array, &tex, view.as_deref())
    }

    /// `cuTexObjectCreate` with `desc` (and, for an array resource, its driver array).
    fn texture_call(
        &mut self,
        desc: &[u64; RESOURCE_DESC_WORDS],
        array: Option<sys::CUarray>,
        tex: &[u64],
        view: Option<&[u64]>,
    ) -> CuResult<u64> {
        self.enter()?;
        let mut words = *desc;
        let res = words.as_mut_ptr().cast::<u8>();
        if let Some(a) = array {
            // SAFETY: word 1 is the union's first field (`hArray`), inside `words`.
            unsafe { res.wrapping_add(8).cast::<sys::CUarray>().write(a) };
        }
        let mut out: sys::CUtexObject = 0;
        let view_ptr = view.map_or(std::ptr::null(), |v| v.as_ptr().cast::<c_void>());
        // SAFETY: `words` has `CUDA_RESOURCE_DESC`'s size and layout (asserted above) and
        // names a live array of this backend or linear memory the zone checked; `tex` and
        // `view` hold the texture and view descriptors' bytes (their sizes asserted), 8-byte
        // aligned; `out` is one valid out-pointer.
        check(unsafe { (self.api.tex_object_create)(&mut out, res.cast(), tex.as_ptr().cast(), view_ptr) })?;
        Ok(out)
    }

    pub(super) fn destroy_texture(&mut self, tex: u64) -> CuResult<()> {
        // SAFETY: a value the zone recorded when this backend made it, destroyed once.
        check(unsafe { (self.api.tex_object_destroy)(tex) })
    }

    pub(super) fn create_surface(&mut self, array: &CudaArray) -> CuResult<u64> {
        let raw = self.raw_array(array.id)?;
        let mut words = [0u64; RESOURCE_DESC_WORDS];
        words[0] = RESOURCE_ARRAY;
        let res = words.as_mut_ptr().cast::<u8>();
        // SAFETY: word 1 is the union's first field (`hArray`), inside `words`.
        unsafe { res.wrapping_add(8).cast::<sys::CUarray>().write(raw) };
        self.enter()?;
        let mut out: sys::CUsurfObject = 0;
        // SAFETY: as for a texture's resource descriptor; `out` is one valid out-pointer.
        check(unsafe { (self.api.surf_object_create)(&mut out, res.cast()) })?;
        Ok(out)
    }

    pub(super) fn destroy_surface(&mut self, surf: u64) -> CuResult<()> {
        // SAFETY: a value the zone recorded when this backend made it, destroyed once.
        check(unsafe { (self.api.surf_object_destroy)(surf) })
    }
}
