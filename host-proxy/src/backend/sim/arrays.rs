//! CUDA arrays, texture and surface objects on the test double.
//!
//! An array is an allocation of its own (owner [`Owner::Array`]) holding its elements with
//! rows packed (pitch = row bytes) and slices packed: a copy naming an array becomes a
//! linear copy there. Texture and surface objects are values that remember what they read;
//! the double runs no kernel that samples them.

use super::*;
use crate::backend::{ArrayDesc, TexResource};

/// A simulated CUDA array (an id).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SimArray(pub(super) u64);

/// A texture or surface object: its context, the array it reads (if any), and which of the
/// two it is.
#[derive(Debug)]
pub(super) struct TexState {
    ctx: CtxId,
    array: Option<u64>,
    surface: bool,
}

impl SimGpu {
    pub(super) fn create_array(&mut self, desc: &ArrayDesc) -> CuResult<SimArray> {
        let bytes = desc.bytes().ok_or(CuError::INVALID_VALUE)?;
        let id = next_id();
        let dptr = self.allocate(bytes, 0xa5, self.current, Owner::Array(id))?;
        self.arrays.insert(id, (dptr, *desc));
        Ok(SimArray(id))
    }

    pub(super) fn destroy_array(&mut self, array: SimArray) -> CuResult<()> {
        if self.textures.values().any(|t| t.array == Some(array.0)) {
            // The backend's contract: the zone destroys what reads an array first.
            return Err(CuError::INVALID_VALUE);
        }
        let (dptr, _) = self.arrays.remove(&array.0).ok_or(CuError::INVALID_HANDLE)?;
        if let Some(a) = self.allocs.remove(&dptr) {
            self.used -= a.counted();
        }
        Ok(())
    }

    /// Drops the arrays, textures and surfaces of a destroyed context (their memory went
    /// with the context's allocations).
    pub(super) fn drop_arrays_of(&mut self, ctx: CtxId) {
        let allocs = &self.allocs;
        self.arrays.retain(|_, (dptr, _)| allocs.contains_key(dptr));
        self.textures.retain(|_, t| t.ctx != ctx);
    }

    pub(super) fn create_texture(&mut self, res: TexResource<'_, SimArray>, surface: bool) -> CuResult<u64> {
        let array = match res {
            TexResource::Array(a) => {
                let (_, desc) = self.arrays.get(&a.0).ok_or(CuError::INVALID_HANDLE)?;
                if surface && desc.flags & 0x02 == 0 {
                    // A surface needs an array made with CUDA_ARRAY3D_SURFACE_LDST.
                    return Err(CuError::INVALID_VALUE);
                }
                Some(a.0)
            }
            TexResource::Linear { dptr, size, .. } => {
                self.locate(dptr, size)?;
                None
            }
            TexResource::Pitch2d { dptr, pitch, height, .. } => {
                self.locate(dptr, pitch.checked_mul(height).ok_or(CuError::INVALID_VALUE)?)?;
                None
            }
        };
        let value = next_id();
        self.textures.insert(value, TexState { ctx: self.current, array, surface });
        Ok(value)
    }

    pub(super) fn destroy_texture(&mut self, value: u64, surface: bool) -> CuResult<()> {
        match self.textures.get(&value) {
            Some(t) if t.surface == surface => {
                self.textures.remove(&value);
                Ok(())
            }
            _ => Err(CuError::INVALID_VALUE),
        }
    }

    /// `c` with its array sides as the linear device ranges that hold them.
    pub(super) fn linear_copy(&self, c: GraphCopy) -> CuResult<GraphCopy> {
        let side = |end: CopyEnd, pitch: u64, height: u64| -> CuResult<(CopyEnd, u64, u64)> {
            let CopyEnd::Array { id, x, y, z } = end else { return Ok((end, pitch, height)) };
            let (dptr, desc) = self.arrays.get(&id).ok_or(CuError::INVALID_HANDLE)?;
            let row = desc.row_bytes().ok_or(CuError::INVALID_VALUE)?;
            let (rows, _) = desc.rows_and_slices();
            let at = z
                .checked_mul(rows)
                .and_then(|r| r.checked_add(y))
                .and_then(|r| r.checked_mul(row))
                .and_then(|o| o.checked_add(x))
                .and_then(|o| o.checked_add(*dptr))
                .ok_or(CuError::INVALID_VALUE)?;
            Ok((CopyEnd::Device(at), row, rows))
        };
        let (src, src_pitch, src_height) = side(c.src, c.src_pitch, c.src_height)?;
        let (dst, dst_pitch, dst_height) = side(c.dst, c.dst_pitch, c.dst_height)?;
        Ok(GraphCopy { src, src_pitch, src_height, dst, dst_pitch, dst_height, ..c })
    }
}
