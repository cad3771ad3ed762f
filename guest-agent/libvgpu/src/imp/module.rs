//! Modules, libraries, parameter layouts and launches.
//!
//! An image given as a bare pointer (`cuModuleLoadData`) is sized here: ELF cubins from
//! their section and program header tables, fatbins from their header, fatbin wrappers by
//! following their data pointer, anything else as NUL-terminated PTX. The image travels
//! through a temporary block of the shared window.
//!
//! Launches pack the parameters by the function's layout, fetched from the host once per
//! function (`cuFuncGetParamInfo` there) and cached, and are posted without waiting.

use crate::rt::{handle_of, handle_ptr, session, CuError, CuResult, FuncInfo, Out};
use cudarc::driver::sys;
use std::ffi::{c_char, c_int, c_uint, c_void};
use vgpu_proto::generated as p;
use vgpu_proto::{AttrValue, Handle, LaunchAttr, LaunchConfig, ParamSlot};

/// Largest module image accepted (also bounded by the window).
const MAX_IMAGE: usize = 1 << 30;
const FATBIN_MAGIC: u32 = 0xba55_ed50;
const FATBIN_WRAPPER_MAGIC: u32 = 0x4662_43b1;

/// Reads a little-endian integer of `N` bytes at `base + off`.
///
/// # Safety
/// `base + off .. + N` must be readable.
unsafe fn read_le<const N: usize>(base: *const u8, off: usize) -> u64 {
    let mut b = [0u8; 8];
    let src = base.wrapping_add(off);
    // SAFETY: the caller guarantees the `N` bytes are readable; `b` holds 8 ≥ N bytes.
    unsafe { std::ptr::copy_nonoverlapping(src, b.as_mut_ptr(), N) };
    u64::from_le_bytes(b)
}

/// The length of the image at `p`.
///
/// # Safety
/// `p` must point to a module image (cubin, fatbin, fatbin wrapper or NUL-terminated PTX)
/// in the application's memory.
unsafe fn image_len(p: *const u8) -> CuResult<(*const u8, usize)> {
    // SAFETY: every image kind is at least 4 bytes long (PTX text too, or it is invalid).
    let magic = unsafe { read_le::<4>(p, 0) } as u32;
    let len = if magic == u32::from_le_bytes(*b"\x7fELF") {
        // ELF64: the image ends at the furthest of its header tables and sections.
        let header = |off: usize, wide: bool| {
            if wide {
                // SAFETY: an ELF64 header is 64 bytes; the 8-byte fields read lie inside it.
                unsafe { read_le::<8>(p, off) }
            } else {
                // SAFETY: as above, for its 2-byte fields.
                unsafe { read_le::<2>(p, off) }
            }
        };
        let (phoff, shoff) = (header(0x20, true), header(0x28, true));
        let (phentsize, phnum) = (header(0x36, false), header(0x38, false));
        let (shentsize, shnum) = (header(0x3a, false), header(0x3c, false));
        let mut end = 64u64.max(phoff + phentsize * phnum).max(shoff + shentsize * shnum);
        if shoff > MAX_IMAGE as u64 || shentsize < 0x40 {
            return Err(CuError::INVALID_IMAGE);
        }
        for i in 0..shnum {
            let sh = (shoff + i * shentsize) as usize;
            // SAFETY: the section header table lies inside the image (ELF's contract).
            let kind = unsafe { read_le::<4>(p, sh + 4) };
            // SAFETY: as above.
            let off = unsafe { read_le::<8>(p, sh + 0x18) };
            // SAFETY: as above.
            let size = unsafe { read_le::<8>(p, sh + 0x20) };
            if kind != 8 {
                // Not SHT_NOBITS: the section's bytes are in the file.
                end = end.max(off.saturating_add(size));
            }
        }
        end
    } else if magic == FATBIN_MAGIC {
        // SAFETY: a fatbin header is 16 bytes: magic, version, header size, body size.
        let hsize = unsafe { read_le::<2>(p, 6) };
        // SAFETY: as above.
        let body = unsafe { read_le::<8>(p, 8) };
        hsize.saturating_add(body)
    } else if magic == FATBIN_WRAPPER_MAGIC {
        // SAFETY: the wrapper is { magic, version, data pointer, filename pointer }.
        let data = unsafe { read_le::<8>(p, 8) } as usize;
        let inner = std::ptr::with_exposed_provenance::<u8>(data);
        if inner.is_null() {
            return Err(CuError::INVALID_IMAGE);
        }
        // SAFETY: the wrapper's data pointer points to a fatbin (the wrapper's contract).
        return unsafe { image_len(inner) };
    } else {
        // PTX: NUL-terminated text; the NUL travels with it.
        // SAFETY: PTX images are NUL-terminated strings (cuModuleLoadData's contract).
        unsafe { std::ffi::CStr::from_ptr(p.cast::<c_char>()) }.count_bytes() as u64 + 1
    };
    let len = usize::try_from(len).map_err(|_| CuError::INVALID_IMAGE)?;
    if len > MAX_IMAGE {
        return Err(CuError::INVALID_IMAGE);
    }
    Ok((p, len))
}

/// Loads `bytes` as a module or library in the current context; returns its handle.
fn load(bytes: &[u8], library: bool) -> CuResult<Handle> {
    let s = session()?;
    let mut c = s.lock();
    // A library belongs to no context (the runtime loads one lazily, from a thread that
    // may have none current yet); a module loads into the current one.
    if !library {
        c.enter_current()?;
    }
    let r = c.with_block(bytes.len() as u64, |c, desc| {
        c.window.write_at(desc, bytes)?;
        c.call::<_, p::ModuleLoadReply>(&p::ModuleLoad { image: desc, library })
    });
    Ok(r?.handle)
}

/// Loads the image at `image` (sized by [`image_len`]).
unsafe fn load_ptr(image: *const c_void, library: bool) -> CuResult<Handle> {
    if image.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the caller's contract: `image` is a module image.
    let (start, len) = unsafe { image_len(image.cast()) }?;
    // SAFETY: `image_len` found the image to be `len` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(start, len) };
    load(bytes, library)
}

/// Reads a file named by a C string.
unsafe fn read_file(name: *const c_char) -> CuResult<Vec<u8>> {
    // SAFETY: CUDA's contract: a NUL-terminated file name.
    let name = unsafe { crate::rt::c_string(name) }?;
    let mut bytes = std::fs::read(&name).map_err(|_| CuError::FILE_NOT_FOUND)?;
    if !bytes.starts_with(b"\x7fELF") && !bytes.starts_with(&FATBIN_MAGIC.to_le_bytes()) {
        bytes.push(0); // PTX text files carry no NUL of their own.
    }
    Ok(bytes)
}

/// `cuModuleLoad`.
pub unsafe fn cu_module_load(module: *mut sys::CUmodule, fname: *const c_char) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(module) }?;
    // SAFETY: forwarded contract.
    let bytes = unsafe { read_file(fname) }?;
    out.set(handle_ptr(load(&bytes, false)?));
    Ok(())
}

/// `cuModuleLoadData`.
pub unsafe fn cu_module_load_data(module: *mut sys::CUmodule, image: *const c_void) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(module) }?;
    // SAFETY: forwarded contract.
    out.set(handle_ptr(unsafe { load_ptr(image, false) }?));
    Ok(())
}

/// `cuModuleLoadDataEx`: JIT options are not applied (the host JIT-compiles with its
/// defaults; log buffers are left as given).
pub unsafe fn cu_module_load_data_ex(
    module: *mut sys::CUmodule,
    image: *const c_void,
    _num_options: c_uint,
    _options: *mut c_uint,
    _values: *mut *mut c_void,
) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { cu_module_load_data(module, image) }
}

/// `cuModuleGetLoadingMode`: `CUDA_MODULE_LOADING` as the driver reads it — `EAGER`
/// (or `eager`) for eager loading, anything else lazy (the driver's default since 12.2).
/// The mode the guest sees decides only how the runtime registers its modules; the host
/// loads every module it is given.
pub unsafe fn cu_module_get_loading_mode(mode: *mut c_uint) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(mode) }?;
    session()?;
    let eager = std::env::var("CUDA_MODULE_LOADING").is_ok_and(|v| v.eq_ignore_ascii_case("eager"));
    out.set(if eager {
        sys::CUmoduleLoadingMode::CU_MODULE_EAGER_LOADING as c_uint
    } else {
        sys::CUmoduleLoadingMode::CU_MODULE_LAZY_LOADING as c_uint
    });
    Ok(())
}

/// `cuModuleLoadFatBinary`.
pub unsafe fn cu_module_load_fat_binary(module: *mut sys::CUmodule, fat: *const c_void) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { cu_module_load_data(module, fat) }
}

/// Names options a call received and libvgpu does not apply (`VGPU_LOG=debug`).
///
/// # Safety
/// `options` and `values` must be null or hold `n` entries.
unsafe fn log_options(what: &str, options: *const c_uint, values: *const *mut c_void, n: c_uint) {
    if n == 0 || options.is_null() {
        return;
    }
    let mut list = Vec::new();
    for i in 0..n.min(64) as usize {
        // SAFETY: the caller's contract: `options` holds `n` entries.
        let id = unsafe { options.wrapping_add(i).read_unaligned() };
        let v = if values.is_null() {
            std::ptr::null_mut()
        } else {
            // SAFETY: as above, for `values`.
            unsafe { values.wrapping_add(i).read_unaligned() }
        };
        list.push(format!("{id}={v:p}"));
    }
    crate::rt::log(crate::rt::Level::Debug, format_args!("{what} options not applied: {}", list.join(" ")));
}

/// `cuLibraryLoadData`: JIT and library options are not applied.
#[allow(clippy::too_many_arguments)]
pub unsafe fn cu_library_load_data(
    library: *mut sys::CUlibrary,
    code: *const c_void,
    jit_options: *mut c_uint,
    jit_values: *mut *mut c_void,
    num_jit: c_uint,
    lib_options: *mut c_uint,
    lib_values: *mut *mut c_void,
    num_lib: c_uint,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(library) }?;
    // SAFETY: CUDA's contract: each option array holds its count of entries.
    unsafe { log_options("cuLibraryLoadData: JIT", jit_options, jit_values, num_jit) };
    // SAFETY: as above.
    unsafe { log_options("cuLibraryLoadData: library", lib_options, lib_values, num_lib) };
    // SAFETY: forwarded contract.
    out.set(handle_ptr(unsafe { load_ptr(code, true) }?));
    Ok(())
}

/// `cuLibraryLoadFromFile`: options are not applied (named at `VGPU_LOG=debug`).
#[allow(clippy::too_many_arguments)]
pub unsafe fn cu_library_load_from_file(
    library: *mut sys::CUlibrary,
    file: *const c_char,
    jit_options: *mut c_uint,
    jit_values: *mut *mut c_void,
    num_jit: c_uint,
    lib_options: *mut c_uint,
    lib_values: *mut *mut c_void,
    num_lib: c_uint,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(library) }?;
    // SAFETY: CUDA's contract: each option array holds its count of entries.
    unsafe { log_options("cuLibraryLoadFromFile: JIT", jit_options, jit_values, num_jit) };
    // SAFETY: as above.
    unsafe { log_options("cuLibraryLoadFromFile: library", lib_options, lib_values, num_lib) };
    // SAFETY: forwarded contract.
    let bytes = unsafe { read_file(file) }?;
    out.set(handle_ptr(load(&bytes, true)?));
    Ok(())
}

fn param_info(func: Handle, index: usize, offset: *mut usize, size: *mut usize) -> CuResult<()> {
    // SAFETY: CUDA's contract: non-null out-pointers are valid for one write.
    let offset = unsafe { Out::optional(offset) }?;
    // SAFETY: as above.
    let size = unsafe { Out::optional(size) }?;
    let s = session()?;
    let info = {
        let mut c = s.lock();
        c.enter_current()?;
        c.func_info(func)?
    };
    let slot = info.slots.get(index).ok_or(CuError::INVALID_VALUE)?;
    offset.set(slot.offset as usize);
    size.set(slot.size as usize);
    Ok(())
}

/// `cuFuncGetParamInfo`, from the cached layout.
pub unsafe fn cu_func_get_param_info(
    f: sys::CUfunction,
    index: usize,
    offset: *mut usize,
    size: *mut usize,
) -> CuResult<()> {
    param_info(handle_of(f), index, offset, size)
}

/// `cuKernelGetParamInfo`, from the cached layout.
pub unsafe fn cu_kernel_get_param_info(
    k: sys::CUkernel,
    index: usize,
    offset: *mut usize,
    size: *mut usize,
) -> CuResult<()> {
    param_info(handle_of(k), index, offset, size)
}

/// `CU_LAUNCH_PARAM_*` markers of the `extra` array.
const LAUNCH_PARAM_END: usize = 0x00;
const LAUNCH_PARAM_BUFFER_POINTER: usize = 0x01;
const LAUNCH_PARAM_BUFFER_SIZE: usize = 0x02;
/// Entries read from `extra` before giving up on a missing terminator.
const MAX_EXTRA: usize = 64;

/// Packs the parameters of a launch into one buffer by `layout`.
///
/// # Safety
/// `params` (when non-null) holds one valid pointer per parameter, each to a value of the
/// parameter's size; `extra` (when non-null) is a `CU_LAUNCH_PARAM_END`-terminated array.
pub(super) unsafe fn pack(
    layout: &[ParamSlot],
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult<Vec<u8>> {
    let total = layout.iter().map(|s| s.offset as usize + s.size as usize).max().unwrap_or(0);
    let mut buf = vec![0u8; total];
    if !params.is_null() {
        for (i, slot) in layout.iter().enumerate() {
            // SAFETY: the caller's contract: one pointer per parameter.
            let arg = unsafe { params.wrapping_add(i).read() };
            if arg.is_null() {
                return Err(CuError::INVALID_VALUE);
            }
            let dst = &mut buf[slot.offset as usize..][..slot.size as usize];
            // SAFETY: the caller's contract: `arg` points to `slot.size` readable bytes.
            unsafe { std::ptr::copy_nonoverlapping(arg.cast::<u8>(), dst.as_mut_ptr(), dst.len()) };
        }
        return Ok(buf);
    }
    if extra.is_null() {
        return if layout.is_empty() { Ok(buf) } else { Err(CuError::INVALID_VALUE) };
    }
    let (mut src, mut len) = (std::ptr::null::<u8>(), None::<usize>);
    for i in (0..MAX_EXTRA).step_by(2) {
        // SAFETY: the caller's contract: the array runs to its terminator.
        let key = unsafe { extra.wrapping_add(i).read() }.addr();
        if key == LAUNCH_PARAM_END {
            break;
        }
        // SAFETY: every key but the terminator is followed by its value.
        let value = unsafe { extra.wrapping_add(i + 1).read() };
        match key {
            LAUNCH_PARAM_BUFFER_POINTER => src = value.cast_const().cast(),
            LAUNCH_PARAM_BUFFER_SIZE if !value.is_null() => {
                // SAFETY: the value of BUFFER_SIZE points to a size_t.
                len = Some(unsafe { value.cast::<usize>().read_unaligned() });
            }
            _ => return Err(CuError::INVALID_VALUE),
        }
    }
    let len = len.ok_or(CuError::INVALID_VALUE)?;
    if src.is_null() || len < total {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the buffer holds `len ≥ total` bytes (the caller's contract).
    unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), total) };
    Ok(buf)
}

/// Launches `f` with the parameters packed by its layout; posted without waiting.
unsafe fn launch(
    f: Handle,
    config: LaunchConfig,
    stream: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult<()> {
    if f.0 == 0 {
        return Err(CuError::INVALID_HANDLE);
    }
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    let info = c.func_info(f)?;
    check_geometry(&s.info.attributes, &info, &config)?;
    // SAFETY: forwarded contract.
    let params = unsafe { pack(&info.slots, params, extra) }?;
    c.post(&p::Launch { func: f, config, stream, params })
}

/// `CUDA_ERROR_INVALID_CLUSTER_SIZE`.
const INVALID_CLUSTER_SIZE: CuError = CuError(match std::num::NonZeroU32::new(912) {
    Some(c) => c,
    None => unreachable!(),
});

/// Refuses, at once and as the driver would, a launch that cannot run: empty or oversized
/// grid or block, more threads or dynamic shared memory than the function allows, a grid
/// that is not a multiple of its cluster. (A posted launch's errors would otherwise only
/// surface at the next call.)
fn check_geometry(attributes: &[AttrValue], info: &FuncInfo, config: &LaunchConfig) -> CuResult<()> {
    let attr = |a: usize| match attributes.get(a - 1) {
        Some(AttrValue::Value(v)) => u32::try_from(*v).unwrap_or(0),
        _ => u32::MAX,
    };
    // MAX_BLOCK_DIM_X..Z are attributes 2..4, MAX_GRID_DIM_X..Z 5..7.
    for i in 0..3 {
        let (g, b) = (config.grid[i], config.block[i]);
        if g == 0 || b == 0 || b > attr(2 + i) || g > attr(5 + i) {
            return Err(CuError::INVALID_VALUE);
        }
    }
    let threads = config.block.iter().map(|&b| u64::from(b)).product::<u64>();
    if threads > u64::try_from(info.max_threads).unwrap_or(0) {
        return Err(CuError::INVALID_VALUE);
    }
    if u64::from(config.shared_mem_bytes) > u64::try_from(info.max_dynamic_smem).unwrap_or(0) {
        return Err(CuError::INVALID_VALUE);
    }
    for a in config.attrs.iter().filter(|a| a.id == LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION) {
        for i in 0..3 {
            let c = a.value[i];
            if c == 0 || config.grid[i] % c != 0 {
                return Err(INVALID_CLUSTER_SIZE);
            }
        }
    }
    Ok(())
}

/// `cuLaunchKernel`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn cu_launch_kernel(
    f: sys::CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: sys::CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult<()> {
    let config = LaunchConfig { grid: [gx, gy, gz], block: [bx, by, bz], shared_mem_bytes: shared, attrs: Vec::new() };
    // SAFETY: forwarded contract.
    unsafe { launch(handle_of(f), config, crate::rt::stream_arg(stream)?, params, extra) }
}

/// `CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION`.
const LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION: u32 = 4;

/// Launch attributes whose values are plain integers (forwarded as such).
const PLAIN_ATTRIBUTES: &[u32] = &[
    2, // COOPERATIVE
    4, // CLUSTER_DIMENSION
    5, // CLUSTER_SCHEDULING_POLICY_PREFERENCE
    6, // PROGRAMMATIC_STREAM_SERIALIZATION
    8, // PRIORITY
];

/// A `CUlaunchConfig` as the wire's [`LaunchConfig`]: attributes that carry pointers or
/// handles are not supported.
///
/// # Safety
/// `config` must be null or point to a `CUlaunchConfig` whose `attrs` holds `numAttrs`
/// attributes.
unsafe fn launch_config(config: *const sys::CUlaunchConfig) -> CuResult<(LaunchConfig, sys::CUstream)> {
    if config.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the caller's contract: a non-null config points to a CUlaunchConfig.
    let cfg = unsafe { config.read_unaligned() };
    let mut attrs = Vec::new();
    if cfg.numAttrs > 0 {
        if cfg.attrs.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        for i in 0..cfg.numAttrs as usize {
            // The id is read as an integer: a value outside the bindings' enum is not UB.
            // SAFETY: the caller's contract: `attrs` holds `numAttrs` CUlaunchAttribute values.
            let base = cfg.attrs.wrapping_add(i).cast::<u8>();
            // SAFETY: as above; the id is the struct's first field.
            let id = unsafe { base.cast::<u32>().read_unaligned() };
            let value_off = std::mem::offset_of!(sys::CUlaunchAttribute, value);
            let mut value = [0u32; 4];
            // The value union is 64 bytes at `value_off`; its first 16 are read.
            let src = base.wrapping_add(value_off);
            // SAFETY: inside the caller's CUlaunchAttribute (see above).
            unsafe { std::ptr::copy_nonoverlapping(src, value.as_mut_ptr().cast::<u8>(), 16) };
            match id {
                0 => {} // IGNORE
                id if PLAIN_ATTRIBUTES.contains(&id) => attrs.push(LaunchAttr { id, value }),
                _ => return Err(CuError::NOT_SUPPORTED),
            }
        }
    }
    let lc = LaunchConfig {
        grid: [cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ],
        block: [cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ],
        shared_mem_bytes: cfg.sharedMemBytes,
        attrs,
    };
    Ok((lc, cfg.hStream))
}

/// `cuLaunchKernelEx`: attributes that carry pointers or handles are not supported.
pub unsafe fn cu_launch_kernel_ex(
    config: *const sys::CUlaunchConfig,
    f: sys::CUfunction,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult<()> {
    // SAFETY: CUDA's contract for the config.
    let (lc, stream) = unsafe { launch_config(config) }?;
    // SAFETY: forwarded contract.
    unsafe { launch(handle_of(f), lc, crate::rt::stream_arg(stream)?, params, extra) }
}

/// `cuOccupancyMaxActiveClusters`: the host's driver answers for the configuration (its
/// stream is not needed for the answer).
pub unsafe fn cu_occupancy_max_active_clusters(
    num_clusters: *mut c_int,
    func: sys::CUfunction,
    config: *const sys::CUlaunchConfig,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(num_clusters) }?;
    if func.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract for the config.
    let (config, _stream) = unsafe { launch_config(config) }?;
    let r: p::OccupancyMaxActiveClustersReply =
        crate::rt::call(&p::OccupancyMaxActiveClusters { func: handle_of(func), config }, true)?;
    out.set(r.clusters);
    Ok(())
}

/// A block size → dynamic shared memory callback (`CUoccupancyB2DSize`).
type BlockToSmem = Option<unsafe extern "C" fn(c_int) -> usize>;

/// `cuOccupancyMaxPotentialBlockSize`: the block size with the highest occupancy, searched
/// in the guest as NVIDIA's published occupancy calculator does (`cuda_runtime.h`'s
/// `cudaOccupancyMaxPotentialBlockSizeVariableSMemWithFlags`): every multiple of the warp
/// size from the largest allowed down, the callback (run here, in the program) giving each
/// size's dynamic shared memory, the host's driver the blocks per multiprocessor.
pub unsafe fn cu_occupancy_max_potential_block_size(
    min_grid: *mut c_int,
    block: *mut c_int,
    func: sys::CUfunction,
    to_smem: BlockToSmem,
    smem: usize,
    limit: c_int,
) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { cu_occupancy_max_potential_block_size_with_flags(min_grid, block, func, to_smem, smem, limit, 0) }
}

/// `cuOccupancyMaxPotentialBlockSizeWithFlags`.
pub unsafe fn cu_occupancy_max_potential_block_size_with_flags(
    min_grid: *mut c_int,
    block: *mut c_int,
    func: sys::CUfunction,
    to_smem: BlockToSmem,
    smem: usize,
    limit: c_int,
    flags: c_uint,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: non-null out-pointers are valid for one write.
    let min_grid = unsafe { Out::required(min_grid) }?;
    // SAFETY: as above.
    let block = unsafe { Out::required(block) }?;
    if func.is_null() || limit < 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let s = session()?;
    let attr = |a: sys::CUdevice_attribute| match s.info.attributes.get(a as usize - 1) {
        Some(AttrValue::Value(v)) => Ok(*v),
        _ => Err(CuError::INVALID_VALUE),
    };
    let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let warp = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_WARP_SIZE)?.max(1);
    let dev_max = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?;
    let sm_threads = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)?;
    let mut func_max: c_int = 0;
    // SAFETY: one valid out-pointer; `func` is the caller's function handle.
    let r = unsafe {
        crate::generated::cuFuncGetAttribute(
            &mut func_max,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK as c_uint,
            func,
        )
    };
    if r != 0 {
        return Err(CuError::new(r));
    }
    let mut limit = if limit == 0 { dev_max } else { limit.min(dev_max) };
    limit = limit.min(func_max);
    let (mut best_block, mut best_blocks, mut best) = (0, 0, 0);
    let mut aligned = (limit + warp - 1) / warp * warp;
    while aligned > 0 {
        let try_block = limit.min(aligned);
        let dyn_smem = match to_smem {
            // SAFETY: the caller's callback, called with a block size as CUDA does.
            Some(f) => unsafe { f(try_block) },
            None => smem,
        };
        let mut blocks: c_int = 0;
        // SAFETY: one valid out-pointer; the other arguments are plain values.
        let r = unsafe {
            crate::generated::cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
                &mut blocks,
                func,
                try_block,
                dyn_smem,
                flags,
            )
        };
        if r != 0 {
            return Err(CuError::new(r));
        }
        if try_block * blocks > best {
            (best_block, best_blocks, best) = (try_block, blocks, try_block * blocks);
        }
        if best == sm_threads {
            break;
        }
        aligned -= warp;
    }
    min_grid.set(best_blocks * sms);
    block.set(best_block);
    Ok(())
}

/// Every function of module `hmod` (new handles, in the module's context).
pub(crate) fn module_functions(hmod: Handle) -> CuResult<Vec<Handle>> {
    let r: p::ModuleFunctionsReply = crate::rt::call(&p::ModuleFunctions { hmod }, true)?;
    if r.functions.len() % 8 != 0 {
        return Err(CuError::UNKNOWN);
    }
    Ok(r.functions.chunks_exact(8).map(|c| Handle(u64::from_le_bytes(c.try_into().unwrap_or_default()))).collect())
}

/// `cuModuleGetFunctionCount`.
pub unsafe fn cu_module_get_function_count(count: *mut std::ffi::c_uint, hmod: sys::CUmodule) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(count) }?;
    let n = module_functions(crate::rt::handle_of(hmod))?.len();
    out.set(u32::try_from(n).map_err(|_| CuError::NOT_SUPPORTED)?);
    Ok(())
}

/// `cuModuleEnumerateFunctions`: the first `n` functions (`CUDA_ERROR_INVALID_VALUE` when
/// the module has more, as the driver answers).
pub unsafe fn cu_module_enumerate_functions(
    functions: *mut sys::CUfunction,
    n: std::ffi::c_uint,
    hmod: sys::CUmodule,
) -> CuResult<()> {
    if functions.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let all = module_functions(crate::rt::handle_of(hmod))?;
    if all.len() > n as usize {
        return Err(CuError::INVALID_VALUE);
    }
    for (i, h) in all.into_iter().enumerate() {
        // SAFETY: CUDA's contract: `functions` holds `n` entries; `i < all.len() <= n`.
        unsafe { functions.wrapping_add(i).write(crate::rt::handle_ptr(h)) };
    }
    Ok(())
}
