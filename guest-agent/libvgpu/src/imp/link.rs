//! JIT linking (`cuLinkCreate_v2`, `cuLinkAddData_v2`, `cuLinkAddFile_v2`, `cuLinkComplete`,
//! `cuLinkDestroy`): the host's driver links; the program gets the zone's handle as its
//! `CUlinkState`.
//!
//! Inputs travel through a window block, as module images do; `cuLinkAddFile` reads the file
//! here (it is the zone's file). JIT options with plain values go to the host; the log
//! buffers and their sizes stay here and are filled from the host's logs after each call
//! (sizes written back as the driver 580 does: the log's length, without its NUL; measured
//! by tests/c/link.c), the wall time reads
//! 0; options whose values point into the program (symbol names and addresses, referenced
//! names) are `CUDA_ERROR_NOT_SUPPORTED`. The linked image is copied here at completion and
//! lives until `cuLinkDestroy`, as the driver's does.

use crate::rt::{self, handle_of, handle_ptr, session, CuError, CuResult, Out};
use cudarc::driver::sys;
use std::collections::HashMap;
use std::ffi::{c_char, c_uint, c_void, CStr};
use std::sync::Mutex;
use vgpu_proto::generated as p;
use vgpu_proto::{Done, Handle};

/// `CU_JIT_WALL_TIME`, the log buffers and their sizes.
const JIT_WALL_TIME: u32 = 2;
const JIT_INFO_LOG: u32 = 3;
const JIT_INFO_LOG_SIZE: u32 = 4;
const JIT_ERROR_LOG: u32 = 5;
const JIT_ERROR_LOG_SIZE: u32 = 6;

/// Where the program wants a log: its buffer, its capacity as given at creation, and the
/// option-value slot the filled size is written back to (addresses, as integers: the
/// program's memory, written only inside its own calls).
#[derive(Clone, Copy, Default)]
struct LogTarget {
    buffer: usize,
    cap: usize,
    size_slot: usize,
}

/// A link state of this process.
#[derive(Default)]
struct Link {
    info: LogTarget,
    error: LogTarget,
    image: Option<Vec<u8>>,
}

/// Link states by handle value.
static LINKS: Mutex<Option<HashMap<u64, Link>>> = Mutex::new(None);

/// The program's JIT options: the plain ones as the wire's pairs, and where the logs go.
struct Options {
    wire: Vec<u8>,
    info: LogTarget,
    error: LogTarget,
}

/// Reads `n` options.
///
/// # Safety
/// With `n > 0`, `keys` and `values` must hold `n` entries (CUDA's contract).
unsafe fn read_options(n: c_uint, keys: *mut c_uint, values: *mut *mut c_void) -> CuResult<Options> {
    let mut o = Options { wire: Vec::new(), info: LogTarget::default(), error: LogTarget::default() };
    if n == 0 {
        return Ok(o);
    }
    if keys.is_null() || values.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    for i in 0..n as usize {
        // SAFETY: the caller's contract.
        let key = unsafe { keys.wrapping_add(i).read_unaligned() };
        let slot = values.wrapping_add(i);
        // SAFETY: as above.
        let value = unsafe { slot.read_unaligned() }.expose_provenance();
        match key {
            JIT_INFO_LOG => o.info.buffer = value,
            JIT_INFO_LOG_SIZE => (o.info.size_slot, o.info.cap) = (slot.expose_provenance(), value),
            JIT_ERROR_LOG => o.error.buffer = value,
            JIT_ERROR_LOG_SIZE => (o.error.size_slot, o.error.cap) = (slot.expose_provenance(), value),
            JIT_WALL_TIME => {
                // An output: the time the host's linker took is not measured here.
                // SAFETY: CUDA's contract: the slot is the program's, written as a float.
                unsafe { slot.cast::<f32>().write_unaligned(0.0) };
            }
            17 | 18 | 25 | 27 => return Err(rt::unsupported_err("cuLink options whose values point into the program")),
            _ => {
                o.wire.extend_from_slice(&key.to_le_bytes());
                o.wire.extend_from_slice(&(value as u64).to_le_bytes());
            }
        }
    }
    Ok(o)
}

/// Copies the host's logs of `state` into the program's buffers, if it gave any.
fn fill_logs(state: Handle, info: LogTarget, error: LogTarget) {
    if info.buffer == 0 && error.buffer == 0 {
        return;
    }
    let Ok(logs) = rt::call::<_, p::LinkLogsReply>(&p::LinkLogs { state }, false) else { return };
    for (target, text) in [(info, logs.info), (error, logs.error)] {
        // The capacity is the one given at creation (the slot holds the filled size after a
        // call, as the driver leaves it); an empty log leaves buffer and slot alone.
        if target.buffer == 0 || target.size_slot == 0 || target.cap == 0 || text.is_empty() {
            continue;
        }
        let n = text.len().min(target.cap - 1);
        let buffer = std::ptr::with_exposed_provenance_mut::<u8>(target.buffer);
        // SAFETY: CUDA's contract: the buffer holds `cap` bytes for the link's life; `n + 1 <=
        // cap`.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buffer, n) };
        // SAFETY: as above.
        unsafe { buffer.wrapping_add(n).write(0) };
        let size_slot = std::ptr::with_exposed_provenance_mut::<usize>(target.size_slot);
        // SAFETY: the program's option-value slot for this log's size (CUDA's contract: the
        // option arrays stay valid for the link's life).
        unsafe { size_slot.write_unaligned(n) };
    }
}

/// Where `state`'s logs go.
fn targets(state: Handle) -> (LogTarget, LogTarget) {
    let links = LINKS.lock();
    links.ok().and_then(|l| l.as_ref().and_then(|m| m.get(&state.0)).map(|l| (l.info, l.error))).unwrap_or_default()
}

/// `cuLinkCreate_v2`.
pub unsafe fn cu_link_create_v2(
    n: c_uint,
    keys: *mut c_uint,
    values: *mut *mut c_void,
    out: *mut sys::CUlinkState,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(out) }?;
    // SAFETY: forwarded contract.
    let o = unsafe { read_options(n, keys, values) }?;
    let r: p::LinkCreateReply = rt::call(&p::LinkCreate { options: o.wire }, true)?;
    let link = Link { info: o.info, error: o.error, image: None };
    LINKS.lock().map_err(|_| CuError::UNKNOWN)?.get_or_insert_with(HashMap::new).insert(r.state.0, link);
    fill_logs(r.state, o.info, o.error);
    out.set(handle_ptr(r.state));
    Ok(())
}

/// Adds `bytes` as one input.
fn add(state: Handle, input_type: c_uint, bytes: &[u8], name: String, options: Vec<u8>) -> CuResult<()> {
    let r = {
        let s = session()?;
        let mut c = s.lock();
        c.enter_current()?;
        c.with_block(bytes.len() as u64, |c, desc| {
            c.window.write_at(desc, bytes)?;
            c.call::<_, Done>(&p::LinkAdd { state, input_type, data: desc, name, options })
        })
    };
    let (info, error) = targets(state);
    fill_logs(state, info, error);
    r.map(drop)
}

/// A C string argument (NULL: empty).
unsafe fn name_of(name: *const c_char) -> CuResult<String> {
    if name.is_null() {
        return Ok(String::new());
    }
    // SAFETY: CUDA's contract: a non-null name is a C string.
    let s = unsafe { CStr::from_ptr(name) };
    if s.to_bytes().len() > rt::MAX_NAME {
        return Err(CuError::INVALID_VALUE);
    }
    Ok(s.to_string_lossy().into_owned())
}

/// `cuLinkAddData_v2`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn cu_link_add_data_v2(
    state: sys::CUlinkState,
    input_type: c_uint,
    data: *mut c_void,
    size: usize,
    name: *const c_char,
    n: c_uint,
    keys: *mut c_uint,
    values: *mut *mut c_void,
) -> CuResult<()> {
    if data.is_null() || size == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: forwarded contract.
    let o = unsafe { read_options(n, keys, values) }?;
    // SAFETY: CUDA's contract: `data` holds `size` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size) };
    // SAFETY: forwarded contract.
    let name = unsafe { name_of(name) }?;
    add(handle_of(state), input_type, bytes, name, o.wire)
}

/// `cuLinkAddFile_v2`: the file is the zone's, read here.
pub unsafe fn cu_link_add_file_v2(
    state: sys::CUlinkState,
    input_type: c_uint,
    path: *const c_char,
    n: c_uint,
    keys: *mut c_uint,
    values: *mut *mut c_void,
) -> CuResult<()> {
    if path.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: forwarded contract.
    let o = unsafe { read_options(n, keys, values) }?;
    // SAFETY: forwarded contract.
    let name = unsafe { name_of(path) }?;
    let bytes = std::fs::read(&name).map_err(|_| CuError::FILE_NOT_FOUND)?;
    if bytes.is_empty() {
        return Err(CuError::INVALID_IMAGE);
    }
    add(handle_of(state), input_type, &bytes, name, o.wire)
}

/// `cuLinkComplete`: the image is this process's until `cuLinkDestroy`.
pub unsafe fn cu_link_complete(state: sys::CUlinkState, out: *mut *mut c_void, size_out: *mut usize) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(out) }?;
    // SAFETY: as above.
    let size_out = unsafe { Out::required(size_out) }?;
    let state = handle_of(state);
    let (info, error) = targets(state);
    let done = rt::call::<_, p::LinkCompleteReply>(&p::LinkComplete { state }, true);
    fill_logs(state, info, error);
    let size = done?.size;
    let image = {
        let s = session()?;
        let mut c = s.lock();
        let mut image = vec![0u8; usize::try_from(size).map_err(|_| CuError::INVALID_VALUE)?];
        c.with_block(size, |c, desc| {
            let _: Done = c.call(&p::LinkImage { state, dst: desc })?;
            c.window.read_at(desc, &mut image)
        })?;
        image
    };
    let mut links = LINKS.lock().map_err(|_| CuError::UNKNOWN)?;
    let link = links.as_mut().and_then(|m| m.get_mut(&state.0)).ok_or(CuError::INVALID_HANDLE)?;
    let image = link.image.insert(image);
    out.set(image.as_mut_ptr().cast());
    size_out.set(image.len());
    Ok(())
}

/// `cuLinkDestroy`.
pub unsafe fn cu_link_destroy(state: sys::CUlinkState) -> CuResult<()> {
    let state = handle_of(state);
    let _: Done = rt::call(&p::LinkDestroy { state }, false)?;
    if let Some(m) = LINKS.lock().map_err(|_| CuError::UNKNOWN)?.as_mut() {
        m.remove(&state.0);
    }
    Ok(())
}
