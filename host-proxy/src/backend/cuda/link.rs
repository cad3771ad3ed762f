//! JIT linking on the real driver (`cuLinkCreate_v2`, `cuLinkAddData_v2`, `cuLinkComplete`,
//! `cuLinkDestroy`).
//!
//! A link state keeps two log buffers of this backend's own ([`LOG_BYTES`] each), given to
//! the driver at creation; the driver writes them during the link's calls, and they are read
//! between calls. The option arrays given to `cuLinkCreate` must stay valid for the link
//! state's life (the driver writes the logs' filled sizes back into them at later calls):
//! the link keeps them. Every input is checked as a module image is before the driver parses it.
//! The linked image belongs to the driver's link state: it is copied out at completion.

use super::*;

/// Bytes of each log buffer (info and error) of a link.
pub(super) const LOG_BYTES: usize = 16 << 10;

/// `CU_JIT_INFO_LOG_BUFFER`, `…_INFO_LOG_BUFFER_SIZE_BYTES`, `…_ERROR_LOG_BUFFER`,
/// `…_ERROR_LOG_BUFFER_SIZE_BYTES`.
const JIT_INFO_LOG: c_uint = 3;
const JIT_INFO_LOG_SIZE: c_uint = 4;
const JIT_ERROR_LOG: c_uint = 5;
const JIT_ERROR_LOG_SIZE: c_uint = 6;

/// A link state of a [`CudaGpu`].
#[derive(Debug)]
pub struct CudaLink {
    raw: sys::CUlinkState,
    ctx: CtxId,
    /// The log buffers the driver was given: allocated here, freed when the link is dropped.
    info: *mut u8,
    error: *mut u8,
    /// The option arrays the driver was given (it writes into `values` at later calls); their
    /// heap buffers never move.
    keys: Vec<c_uint>,
    values: Vec<*mut c_void>,
    /// Each input's own option arrays, kept as long as the link for the same reason.
    input_options: Vec<(Vec<c_uint>, Vec<*mut c_void>)>,
}

impl Drop for CudaLink {
    fn drop(&mut self) {
        for p in [self.info, self.error] {
            // SAFETY: made by `Box::into_raw` of a `LOG_BYTES` boxed slice in `link_create`,
            // freed once here; the driver writes them only during this link's calls, and the
            // link is destroyed (or its state abandoned) before it is dropped.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, LOG_BYTES)) });
        }
    }
}

/// A log buffer's text (up to its first NUL).
fn log_text(p: *const u8) -> String {
    // SAFETY: `p` is a live `LOG_BYTES` buffer of a link (see `CudaLink`), not being written:
    // the driver writes it only inside this link's calls, which are not running.
    let bytes = unsafe { std::slice::from_raw_parts(p, LOG_BYTES) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(LOG_BYTES);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The driver's option arrays for scalar `options` (values passed as the pointer-sized
/// integers the driver reads them as), with `extra` appended.
fn option_arrays(options: &[(u32, u64)], extra: &[(c_uint, *mut c_void)]) -> (Vec<c_uint>, Vec<*mut c_void>) {
    let mut keys: Vec<c_uint> = options.iter().map(|&(o, _)| o).collect();
    let mut values: Vec<*mut c_void> =
        options.iter().map(|&(_, v)| std::ptr::without_provenance_mut(v as usize)).collect();
    for &(o, v) in extra {
        keys.push(o);
        values.push(v);
    }
    (keys, values)
}

impl CudaGpu {
    pub(super) fn create_link(&mut self, options: &[(u32, u64)]) -> CuResult<CudaLink> {
        if !options.iter().all(|&(o, _)| crate::backend::link_option_is_scalar(o)) {
            return Err(CuError::INVALID_VALUE);
        }
        let info = Box::into_raw(vec![0u8; LOG_BYTES].into_boxed_slice()).cast::<u8>();
        let error = Box::into_raw(vec![0u8; LOG_BYTES].into_boxed_slice()).cast::<u8>();
        // From here on `link` owns the buffers (dropped with it on every path).
        let mut link = CudaLink {
            raw: std::ptr::null_mut(),
            ctx: self.current,
            info,
            error,
            keys: Vec::new(),
            values: Vec::new(),
            input_options: Vec::new(),
        };
        let size = std::ptr::without_provenance_mut::<c_void>(LOG_BYTES);
        let extra = [
            (JIT_INFO_LOG, info.cast::<c_void>()),
            (JIT_INFO_LOG_SIZE, size),
            (JIT_ERROR_LOG, error.cast::<c_void>()),
            (JIT_ERROR_LOG_SIZE, size),
        ];
        (link.keys, link.values) = option_arrays(options, &extra);
        self.enter()?;
        let n = link.keys.len() as c_uint;
        // SAFETY: `keys` and `values` hold the same number of entries and live (unmoved) as
        // long as `link`, as the driver needs; scalar values are integers the driver reads as
        // such, the log buffers are `LOG_BYTES` long and live as long as `link`; `link.raw` is
        // one valid out-pointer.
        let rc = unsafe { (self.api.link_create)(n, link.keys.as_mut_ptr(), link.values.as_mut_ptr(), &mut link.raw) };
        check(rc)?;
        Ok(link)
    }

    pub(super) fn add_to_link(
        &mut self,
        link: &mut CudaLink,
        input_type: u32,
        data: &[u8],
        name: &CStr,
        options: &[(u32, u64)],
    ) -> CuResult<()> {
        if !crate::backend::LINK_INPUT_TYPES.contains(&input_type)
            || !options.iter().all(|&(o, _)| crate::backend::link_option_is_scalar(o))
        {
            return Err(CuError::INVALID_VALUE);
        }
        // The driver parses what it is given: only inside `data`.
        check_image(data)?;
        link.input_options.push(option_arrays(options, &[]));
        let (keys, values) = link.input_options.last_mut().ok_or(CuError::UNKNOWN)?;
        self.make_current(link.ctx)?;
        // SAFETY: a live link state of this backend; `data` is a checked image borrowed for
        // the call (the driver copies what it keeps); `name` is a C string; the option arrays
        // hold `keys.len()` entries of scalars and live (unmoved) as long as the link.
        let rc = unsafe {
            (self.api.link_add_data)(
                link.raw,
                input_type,
                data.as_ptr().cast_mut().cast(),
                data.len(),
                name.as_ptr(),
                keys.len() as c_uint,
                keys.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        let back = self.make_current(self.current);
        check(rc).and(back)
    }

    pub(super) fn complete_link(&mut self, link: &mut CudaLink) -> CuResult<Vec<u8>> {
        self.make_current(link.ctx)?;
        let (mut image, mut size): (*mut c_void, usize) = (std::ptr::null_mut(), 0);
        // SAFETY: a live link state of this backend; two valid out-pointers.
        let rc = unsafe { (self.api.link_complete)(link.raw, &mut image, &mut size) };
        let back = self.make_current(self.current);
        check(rc).and(back)?;
        if image.is_null() || size == 0 {
            return Err(CuError::INVALID_IMAGE);
        }
        // SAFETY: the driver's image of `size` bytes, owned by the link state, which is live.
        Ok(unsafe { std::slice::from_raw_parts(image.cast::<u8>(), size) }.to_vec())
    }

    pub(super) fn link_log_texts(&self, link: &CudaLink) -> (String, String) {
        (log_text(link.info), log_text(link.error))
    }

    pub(super) fn destroy_link(&mut self, link: CudaLink) -> CuResult<()> {
        // SAFETY: a live link state of this backend, destroyed once (the link is consumed);
        // its log buffers are freed after, when `link` is dropped.
        check(unsafe { (self.api.link_destroy)(link.raw) })
    }
}
