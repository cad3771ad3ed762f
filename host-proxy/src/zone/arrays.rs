//! CUDA arrays, texture and surface objects: the zone's side of `cuArray3DCreate`,
//! `cuTexObjectCreate`, `cuSurfObjectCreate` and their destruction.
//!
//! An array is a handle of the zone, made in the current context and destroyed with it; its
//! bytes (elements × rows × slices, as [`ArrayDesc::bytes`] computes them — the driver's
//! own layout may pad) count against the memory quota, the array against the handle quota.
//! Copies name an array side by handle and position, checked against its shape.
//!
//! Texture and surface objects are the driver's values, which kernels take as parameters,
//! so the guest gets the value itself. The zone records every value it handed out (with its
//! context and the array it reads) and destroys only those; a texture's linear memory must
//! lie in one of the zone's ranges. Destroying an array first destroys the objects that read
//! it (their values are kept as *orphaned*: destroying them later succeeds, as natively, and
//! they count against the handle quota until then), so that no object of the zone ever
//! outlives the memory it reads.

use super::*;
use crate::backend::{ArrayDesc, CopyEnd, TexResource, TEX_DESC_LEN, VIEW_DESC_LEN};

/// A CUDA array the guest holds a handle for.
pub(super) struct ArrayEntry<A> {
    pub(super) array: A,
    pub(super) ctx: Handle,
    pub(super) desc: ArrayDesc,
    /// Bytes charged to the zone.
    pub(super) bytes: u64,
}

/// A texture or surface object the backend made for the zone.
pub(super) struct TexEntry {
    ctx: Handle,
    /// The array it reads, if any.
    pub(super) array: Option<Handle>,
    surface: bool,
}

/// `CU_RESOURCE_TYPE_*`.
const RESOURCE_ARRAY: u32 = 0;
const RESOURCE_MIPMAPPED_ARRAY: u32 = 1;
const RESOURCE_LINEAR: u32 = 2;
const RESOURCE_PITCH2D: u32 = 3;

/// `CUDA_ERROR_NOT_SUPPORTED` for `what`, named in the worker's log.
fn unsupported(what: &str) -> CuError {
    tracing::debug!(what, "not offered: CUDA_ERROR_NOT_SUPPORTED");
    CuError::NOT_SUPPORTED
}

impl<B: GpuBackend> Zone<B> {
    /// Bytes charged for the zone's arrays.
    pub(super) fn array_bytes(&self) -> u64 {
        self.arrays.iter().map(|(_, a)| a.bytes).sum()
    }

    /// Texture and surface objects held, live or orphaned (for the handle quota).
    pub(super) fn texture_objects(&self) -> u64 {
        (self.textures.len() + self.orphaned_textures.len()) as u64
    }

    pub(super) fn array_create(&mut self, desc: ArrayDesc) -> CuResult<Handle> {
        if ArrayDesc::format_bytes(desc.format).is_none() {
            return Err(unsupported("CUDA arrays of block-compressed or video formats"));
        }
        let bytes = desc.bytes().ok_or(CuError::INVALID_VALUE)?;
        self.admit(bytes, 1)?;
        let array = match self.backend.array_create(&desc) {
            Ok(a) => a,
            Err(e) => {
                self.publish_usage();
                return Err(e);
            }
        };
        let h = self.arrays.insert(ArrayEntry { array, ctx: self.current, desc, bytes })?;
        self.mem_used += bytes;
        Ok(h)
    }

    /// Destroys the objects that read array `array` (in their contexts), keeping their
    /// values as orphaned.
    fn orphan_readers_of(&mut self, array: Handle) -> CuResult<()> {
        let readers: Vec<u64> = self.textures.iter().filter(|(_, t)| t.array == Some(array)).map(|(&v, _)| v).collect();
        let mut first_err = Ok(());
        for value in readers {
            if let Some(t) = self.textures.remove(&value) {
                let surface = t.surface;
                let r = self.in_ctx(t.ctx, |b| {
                    if surface {
                        b.surf_object_destroy(value)
                    } else {
                        b.tex_object_destroy(value)
                    }
                });
                if first_err.is_ok() {
                    first_err = r;
                }
                self.orphaned_textures.insert(value);
            }
        }
        first_err
    }

    pub(super) fn array_destroy(&mut self, h: Handle) -> CuResult<()> {
        self.arrays.get(h)?;
        self.orphan_readers_of(h)?;
        let entry = self.arrays.remove(h)?;
        self.mem_used = self.mem_used.saturating_sub(entry.bytes);
        let ArrayEntry { array, ctx, .. } = entry;
        self.in_ctx(ctx, |b| b.array_destroy(array))
    }

    pub(super) fn tex_object_create(&mut self, r: TexObjectCreate) -> CuResult<u64> {
        let tex_desc: &[u8; TEX_DESC_LEN] = r.tex_desc.as_slice().try_into().map_err(|_| CuError::INVALID_VALUE)?;
        let view: Option<&[u8; VIEW_DESC_LEN]> = match r.view_desc.len() {
            0 => None,
            _ => Some(r.view_desc.as_slice().try_into().map_err(|_| CuError::INVALID_VALUE)?),
        };
        // The driver takes no resource flags (they must be 0).
        if r.res_flags != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let (res, array) = match r.res_type {
            RESOURCE_ARRAY => (None, Some(r.array)),
            RESOURCE_MIPMAPPED_ARRAY => return Err(unsupported("texture objects of mipmapped arrays")),
            RESOURCE_LINEAR => {
                self.check_range(r.dptr, r.size)?;
                let res = TexResource::Linear { dptr: r.dptr, format: r.format, channels: r.channels, size: r.size };
                (Some(res), None)
            }
            RESOURCE_PITCH2D => {
                let element = ArrayDesc::format_bytes(r.format).ok_or(CuError::INVALID_VALUE)?;
                let row = bytes_of(r.width, element.saturating_mul(u64::from(r.channels)))?;
                self.check_range(r.dptr, graphs::block_extent(row, r.height, 1, r.pitch, r.height)?)?;
                let res = TexResource::Pitch2d {
                    dptr: r.dptr,
                    format: r.format,
                    channels: r.channels,
                    width: r.width,
                    height: r.height,
                    pitch: r.pitch,
                };
                (Some(res), None)
            }
            _ => return Err(CuError::INVALID_VALUE),
        };
        if view.is_some() && array.is_none() {
            // A view applies to arrays only.
            return Err(CuError::INVALID_VALUE);
        }
        self.reserve()?;
        let value = match (res, array) {
            (Some(res), _) => self.backend.tex_object_create(res, tex_desc, view)?,
            (None, Some(h)) => {
                let a = &self.arrays.get(h)?.array;
                self.backend.tex_object_create(TexResource::Array(a), tex_desc, view)?
            }
            (None, None) => return Err(CuError::INVALID_VALUE),
        };
        self.record_texture(value, array, false);
        Ok(value)
    }

    pub(super) fn surf_object_create(&mut self, array: Handle) -> CuResult<u64> {
        self.arrays.get(array)?;
        self.reserve()?;
        let a = &self.arrays.get(array)?.array;
        let value = self.backend.surf_object_create(a)?;
        self.record_texture(value, Some(array), true);
        Ok(value)
    }

    /// Records a value the backend just made (the driver may hand out a value again once it
    /// was destroyed, orphaned ones included).
    fn record_texture(&mut self, value: u64, array: Option<Handle>, surface: bool) {
        self.orphaned_textures.remove(&value);
        self.textures.insert(value, TexEntry { ctx: self.current, array, surface });
    }

    /// Destroys texture (`surface` false) or surface object `value`.
    pub(super) fn texture_destroy(&mut self, value: u64, surface: bool) -> CuResult<()> {
        match self.textures.get(&value) {
            Some(t) if t.surface == surface => {
                let ctx = t.ctx;
                self.textures.remove(&value);
                self.in_ctx(ctx, |b| if surface { b.surf_object_destroy(value) } else { b.tex_object_destroy(value) })
            }
            Some(_) => Err(CuError::INVALID_VALUE),
            None if self.orphaned_textures.remove(&value) => Ok(()),
            None => Err(CuError::INVALID_VALUE),
        }
    }

    /// Releases the texture and surface objects made in `ctx` and the arrays made in it
    /// (through the backend when `destroy`; otherwise the backend drops them with the
    /// context), with the objects that read those arrays.
    pub(super) fn purge_arrays(&mut self, ctx: Handle, destroy: bool) -> CuResult<()> {
        let mut first_err = Ok(());
        let mut note = |r: CuResult<()>| {
            if first_err.is_ok() {
                first_err = r;
            }
        };
        let doomed: Vec<Handle> = self.arrays.iter().filter(|(_, a)| a.ctx == ctx).map(|(h, _)| h).collect();
        let made_here: Vec<(u64, bool)> =
            self.textures.iter().filter(|(_, t)| t.ctx == ctx).map(|(&v, t)| (v, t.surface)).collect();
        for (value, surface) in made_here {
            self.textures.remove(&value);
            if destroy {
                note(if surface {
                    self.backend.surf_object_destroy(value)
                } else {
                    self.backend.tex_object_destroy(value)
                });
            }
        }
        for h in doomed {
            note(self.orphan_readers_of(h));
            if let Ok(entry) = self.arrays.remove(h) {
                self.mem_used = self.mem_used.saturating_sub(entry.bytes);
                if destroy {
                    note(self.backend.array_destroy(entry.array));
                }
            }
        }
        first_err
    }

    /// An array side of a copy: the backend's end, after checking that the block of
    /// `width` bytes × `height` rows × `depth` slices from (`x`, `y`, `z`) lies in the array.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn array_end(
        &self,
        h: Handle,
        x: u64,
        y: u64,
        z: u64,
        width: u64,
        height: u64,
        depth: u64,
    ) -> CuResult<(CopyEnd, u64, u64)> {
        let a = self.arrays.get(h)?;
        let row = a.desc.row_bytes().ok_or(CuError::INVALID_VALUE)?;
        let (rows, slices) = a.desc.rows_and_slices();
        let fits = |at: u64, n: u64, limit: u64| at.checked_add(n).is_some_and(|end| end <= limit);
        if !(fits(x, width, row) && fits(y, height, rows) && fits(z, depth, slices)) {
            return Err(CuError::INVALID_VALUE);
        }
        Ok((CopyEnd::Array { id: B::array_id(&a.array), x, y, z }, row, rows))
    }
}
