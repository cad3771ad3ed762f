//! JIT linking: the zone's side of `cuLinkCreate`, `cuLinkAddData`, `cuLinkComplete` and
//! `cuLinkDestroy`.
//!
//! A link state is a handle of the zone, made in the current context and ended with it. Its
//! inputs come through window blocks and are bounded ([`MAX_LINK_BYTES`] per link, at most
//! [`MAX_LINKS`] links per session: they are the worker's host memory, not the GPU's); each is
//! checked by the backend as a module image before its driver parses it. JIT options pass
//! only as plain values (`link_option_is_scalar`): the logs are the backend's own buffers,
//! handed to the guest as text, and options whose values point into the program are
//! `CUDA_ERROR_NOT_SUPPORTED`. The linked image is kept until the guest has fetched it into
//! a window block of its size, and goes with the link.

use super::*;
use crate::backend::{link_option_is_scalar, LINK_INPUT_TYPES};

/// Input bytes one link may hold.
pub const MAX_LINK_BYTES: u64 = 64 << 20;
/// Link states one session may hold at once.
pub const MAX_LINKS: u32 = 8;
/// JIT options one call may carry.
const MAX_OPTIONS: usize = 64;

/// A link state the guest holds a handle for.
pub(super) struct LinkEntry<L> {
    link: L,
    ctx: Handle,
    bytes: u64,
    image: Option<Vec<u8>>,
}

/// JIT options as the wire carries them: 12-byte pairs (u32 option, u64 value).
fn options_of(bytes: &[u8]) -> CuResult<Vec<(u32, u64)>> {
    if bytes.len() % 12 != 0 || bytes.len() / 12 > MAX_OPTIONS {
        return Err(CuError::INVALID_VALUE);
    }
    let pairs: Vec<(u32, u64)> = bytes
        .chunks_exact(12)
        .map(|c| {
            let (o, v) = c.split_at(4);
            (u32::from_le_bytes(o.try_into().unwrap_or_default()), u64::from_le_bytes(v.try_into().unwrap_or_default()))
        })
        .collect();
    if pairs.iter().any(|&(o, _)| o > 33) {
        return Err(CuError::INVALID_VALUE);
    }
    if !pairs.iter().all(|&(o, _)| link_option_is_scalar(o)) {
        return Err(CuError::NOT_SUPPORTED);
    }
    Ok(pairs)
}

impl<B: GpuBackend> Zone<B> {
    pub(super) fn link_create(&mut self, options: &[u8]) -> CuResult<Handle> {
        let options = options_of(options)?;
        if self.links.len() >= MAX_LINKS {
            return Err(CuError::OUT_OF_MEMORY);
        }
        self.reserve()?;
        let link = self.backend.link_create(&options)?;
        Ok(self.links.insert(LinkEntry { link, ctx: self.current, bytes: 0, image: None })?)
    }

    pub(super) fn link_add<D: SharedMemory>(&mut self, window: &DataWindow<D>, r: LinkAdd) -> CuResult<()> {
        let options = options_of(&r.options)?;
        if !LINK_INPUT_TYPES.contains(&r.input_type) {
            return Err(CuError::NOT_SUPPORTED);
        }
        let (_, len) = window.check(r.data).map_err(|_| CuError::INVALID_VALUE)?;
        let name = c_name(r.name)?;
        let entry = self.links.get(r.state)?;
        let total = entry.bytes.checked_add(len as u64).filter(|&t| t <= MAX_LINK_BYTES);
        let (Some(total), true) = (total, len > 0) else { return Err(CuError::INVALID_VALUE) };
        let mut data = vec![0u8; len];
        window.read(r.data, &mut data).map_err(|_| CuError::INVALID_VALUE)?;
        // PTX comes with or without its NUL; the image checks want it.
        if r.input_type == 1 && data.last() != Some(&0) {
            data.push(0);
        }
        let entry = self.links.get_mut(r.state)?;
        self.backend.link_add(&mut entry.link, r.input_type, &data, &name, &options)?;
        entry.bytes = total;
        Ok(())
    }

    pub(super) fn link_complete(&mut self, state: Handle) -> CuResult<u64> {
        let entry = self.links.get_mut(state)?;
        let image = self.backend.link_complete(&mut entry.link)?;
        let size = image.len() as u64;
        entry.image = Some(image);
        Ok(size)
    }

    pub(super) fn link_image<D: SharedMemory>(
        &mut self,
        window: &DataWindow<D>,
        state: Handle,
        dst: BulkRef,
    ) -> CuResult<()> {
        let image = self.links.get(state)?.image.as_ref().ok_or(CuError::INVALID_VALUE)?;
        if dst.len != image.len() as u64 {
            return Err(CuError::INVALID_VALUE);
        }
        window.write(dst, image).map_err(|_| CuError::INVALID_VALUE)
    }

    pub(super) fn link_logs(&self, state: Handle) -> CuResult<(String, String)> {
        Ok(self.backend.link_logs(&self.links.get(state)?.link))
    }

    pub(super) fn link_destroy(&mut self, state: Handle) -> CuResult<()> {
        let entry = self.links.remove(state)?;
        self.backend.link_destroy(entry.link)
    }

    /// Ends the links made in `ctx` (always through the backend: the driver does not end a
    /// link state with its context).
    pub(super) fn purge_links(&mut self, ctx: Handle) -> CuResult<()> {
        let mut first_err = Ok(());
        for (_, entry) in self.links.remove_where(|_, l| l.ctx == ctx) {
            let r = self.backend.link_destroy(entry.link);
            if first_err.is_ok() {
                first_err = r;
            }
        }
        first_err
    }
}
