//! An unmodified-style CUDA application written with cudarc (dynamic loading of
//! `libcuda.so`): the test programs of libvgpu's integration tests. Run it with libvgpu
//! first on the library path and host-proxy listening at `VGPU_SOCKET`; it prints what it
//! checked and exits non-zero on the first failure.
//!
//! Usage: `cudarc_app SCENARIO [PTX_FILE]` with SCENARIO one of `device`, `copy`, `memset`,
//! `streams`, `host-fn`, `launch PTX_FILE`, `errors`, `threads`, `suite` (all that need no
//! file and work over Xen),
//! `bench [ITERS]` (round trip and copy throughput), `hold` (holds 64 MiB until killed), `ipc-export` (prints a handle, waits
//! for a line on stdin), `ipc-open HANDLE [denied|event=EVENT_HANDLE]`.

use cudarc::driver::result::DriverError;
use cudarc::driver::{sys, CudaContext, LaunchConfig, PushKernelArg};
use std::error::Error;
use std::sync::Arc;

type Res = Result<(), Box<dyn Error>>;

fn ensure(cond: bool, what: &str) -> Res {
    if cond {
        println!("ok: {what}");
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

fn device(ctx: &Arc<CudaContext>) -> Res {
    let name = ctx.name()?;
    println!("device: {name}");
    let (major, minor) = ctx.compute_capability()?;
    println!("compute capability: {major}.{minor}");
    ensure(ctx.total_mem()? > 0, "total memory is reported")?;
    let warp = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_WARP_SIZE)?;
    ensure(warp == 32, "warp size attribute is 32")?;
    let mut version = 0;
    // SAFETY: valid out-pointer.
    unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
    ensure(version >= 12000, "driver version is the host's")?;
    ensure(CudaContext::device_count()? == 1, "one device per zone")?;
    let (free, total) = cudarc::driver::result::mem_get_info()?;
    ensure(free <= total, "free <= total")
}

fn pattern(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(seed)).collect()
}

/// Up to 8 `(first word, count)` ranges where `a` and `b` differ (diagnostics).
fn differences(a: &[u32], b: &[u32]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for i in (0..a.len().min(b.len())).filter(|&i| a[i] != b[i]) {
        let len = out.len();
        match out.last_mut() {
            Some((start, n)) if *start + *n == i => *n += 1,
            _ if len == 8 => break,
            _ => out.push((i, 1)),
        }
    }
    out
}

fn copy(ctx: &Arc<CudaContext>) -> Res {
    let stream = ctx.default_stream();
    for &n in &[1usize, 1024, (40 << 20) / 4 + 3] {
        let host = pattern(n, n as u32);
        let dev = stream.clone_htod(&host)?;
        let mut dev2 = stream.alloc_zeros::<u32>(n)?;
        stream.memcpy_dtod(&dev, &mut dev2)?;
        let back = stream.clone_dtoh(&dev2)?;
        if back != host {
            println!("copied back: differing word ranges {:?}", differences(&back, &host));
            println!(
                "device source read again: differing word ranges {:?}",
                differences(&stream.clone_dtoh(&dev)?, &host)
            );
        }
        ensure(back == host, &format!("{n} words: host -> device -> device -> host"))?;
    }
    ctx.bind_to_thread()?;
    register_mapped()
}

/// `cuMemHostRegister` with DEVICEMAP of the program's own pages (as simpleStreams does
/// with `cudaHostRegisterMapped`): they keep their address and contents, copies use them,
/// and they are the program's private memory again after `cuMemHostUnregister`.
fn register_mapped() -> Res {
    const LEN: usize = 1 << 20;
    const DEVICEMAP: u32 = 2;
    // SAFETY: a fresh private anonymous mapping of LEN bytes.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    ensure(p != libc::MAP_FAILED, "mapped 1 MiB of private memory")?;
    // SAFETY: the mapping above, LEN bytes, written and read only through this slice.
    let words = unsafe { std::slice::from_raw_parts_mut(p.cast::<u32>(), LEN / 4) };
    words.iter_mut().enumerate().for_each(|(i, w)| *w = i as u32 ^ 0x5a5a_5a5a);
    // SAFETY: the range is the program's own memory, page-aligned.
    let r = unsafe { sys::cuMemHostRegister_v2(p, LEN, DEVICEMAP) };
    // Over Xen the window is granted pages, not a file the pages could be mapped from: the
    // registration is refused there (libvgpu picks Xen as this does).
    let xen = match std::env::var("VGPU_TRANSPORT").as_deref() {
        Ok(t) => t == "xen",
        Err(_) => std::env::var_os("VGPU_SOCKET").is_none() && std::path::Path::new("/dev/xen/gntalloc").exists(),
    };
    if xen {
        // SAFETY: the mapping made above, released once.
        unsafe { libc::munmap(p, LEN) };
        return ensure(
            r == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED,
            &format!("cuMemHostRegister(DEVICEMAP) over Xen: {r:?} (local transport only)"),
        );
    }
    ensure(r == sys::CUresult::CUDA_SUCCESS, &format!("cuMemHostRegister(DEVICEMAP) of private pages: {r:?}"))?;
    ensure(
        words.iter().enumerate().all(|(i, &w)| w == i as u32 ^ 0x5a5a_5a5a),
        "registered pages keep their contents",
    )?;
    // SAFETY: as above, overlapping the registered range.
    let again = unsafe { sys::cuMemHostRegister_v2(p, 4096, 0) };
    let unaligned = std::ptr::without_provenance_mut::<std::ffi::c_void>(p.addr() + LEN + 8);
    ensure(again == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, "registering them twice is refused")?;
    let mut dptr = 0;
    // SAFETY: valid out-pointer.
    unsafe { sys::cuMemAlloc_v2(&mut dptr, LEN) }.result()?;
    // SAFETY: LEN bytes from the registered pages to a LEN-byte allocation.
    unsafe { sys::cuMemcpyHtoD_v2(dptr, p, LEN) }.result()?;
    words.iter_mut().for_each(|w| *w = !*w);
    // SAFETY: back into the registered pages.
    unsafe { sys::cuMemcpyDtoH_v2(p, dptr, LEN) }.result()?;
    let round_trip = words.iter().enumerate().all(|(i, &w)| w == i as u32 ^ 0x5a5a_5a5a);
    ensure(round_trip, "copies to and from registered pages")?;
    // SAFETY: the registered range.
    unsafe { sys::cuMemHostUnregister(p) }.result()?;
    words[0] = 17;
    let kept = words[0] == 17 && words[1..].iter().enumerate().all(|(i, &w)| w == (i + 1) as u32 ^ 0x5a5a_5a5a);
    ensure(kept, "unregistered pages are private again, contents kept")?;
    // SAFETY: not page-aligned (and not the program's, but refused before it is touched).
    let r = unsafe { sys::cuMemHostRegister_v2(unaligned, 4096, DEVICEMAP) };
    ensure(r == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED, "DEVICEMAP of an unaligned start: CUDA_ERROR_NOT_SUPPORTED")?;
    // SAFETY: the allocation and the mapping made above, each released once.
    unsafe { sys::cuMemFree_v2(dptr) }.result()?;
    // SAFETY: as above.
    ensure(unsafe { libc::munmap(p, LEN) } == 0, "registered mapping released")
}

fn memset(ctx: &Arc<CudaContext>) -> Res {
    let stream = ctx.default_stream();
    let mut dev = stream.clone_htod(&vec![7u8; 4099])?;
    stream.memset_zeros(&mut dev)?;
    ensure(stream.clone_dtoh(&dev)?.iter().all(|&b| b == 0), "memset_zeros clears 4099 bytes")?;
    let words = stream.alloc_zeros::<u32>(1001)?;
    let (ptr, _g) = cudarc::driver::DevicePtr::device_ptr(&words, &stream);
    // SAFETY: `ptr` is a live allocation of 1001 words.
    unsafe { sys::cuMemsetD32Async(ptr, 0xdead_beef, 1001, stream.cu_stream()) }.result()?;
    drop(_g);
    ensure(stream.clone_dtoh(&words)?.iter().all(|&w| w == 0xdead_beef), "memset_d32 sets 1001 words")
}

fn streams(ctx: &Arc<CudaContext>) -> Res {
    let a = ctx.new_stream()?;
    let b = ctx.new_stream()?;
    let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = ctx.new_event(timed)?;
    let end = ctx.new_event(timed)?;
    start.record(&a)?;
    let data = a.clone_htod(&pattern(1 << 16, 5))?;
    end.record(&a)?;
    b.wait(&end)?;
    let back = b.clone_dtoh(&data)?;
    ensure(back == pattern(1 << 16, 5), "stream b sees stream a's copy after waiting on its event")?;
    end.synchronize()?;
    let ms = start.elapsed_ms(&end)?;
    ensure(ms >= 0.0, "elapsed time between events is >= 0")?;
    ensure(end.is_complete(), "event query reports completion")?;
    a.synchronize()?;
    b.synchronize()?;
    per_thread_streams(ctx)
}

/// `cuGetProcAddress` with the per-thread flag gives the `_ptsz` variant, whose NULL stream
/// is this thread's per-thread stream, as is `CU_STREAM_PER_THREAD` everywhere.
fn per_thread_streams(ctx: &Arc<CudaContext>) -> Res {
    type Htod = unsafe extern "C" fn(sys::CUdeviceptr, *const std::ffi::c_void, usize, sys::CUstream) -> sys::CUresult;
    ctx.bind_to_thread()?;
    let lookup = |flags: u64| -> Result<*mut std::ffi::c_void, DriverError> {
        let mut pfn = std::ptr::null_mut();
        let mut status = sys::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SUCCESS;
        // SAFETY: valid out-pointers and a NUL-terminated name.
        unsafe { sys::cuGetProcAddress_v2(c"cuMemcpyHtoDAsync".as_ptr(), &mut pfn, 12000, flags, &mut status) }
            .result()?;
        Ok(pfn)
    };
    let legacy = lookup(1)?;
    let per_thread = lookup(2)?;
    ensure(
        !per_thread.is_null() && per_thread != legacy,
        "cuGetProcAddress gives the _ptsz variant with the per-thread flag",
    )?;
    // SAFETY: the driver's signature of cuMemcpyHtoDAsync_v2(_ptsz).
    let htod: Htod = unsafe { std::mem::transmute::<*mut std::ffi::c_void, Htod>(per_thread) };
    let stream = ctx.default_stream();
    let data = pattern(1 << 12, 3);
    let bytes = std::mem::size_of_val(data.as_slice());
    let mut dev = stream.alloc_zeros::<u32>(data.len())?;
    let (ptr, guard) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut dev, &stream);
    // SAFETY: `ptr` holds `bytes` bytes; NULL is the per-thread stream in this variant.
    unsafe { htod(ptr, data.as_ptr().cast(), bytes, std::ptr::null_mut()) }.result()?;
    let per_thread_stream = std::ptr::without_provenance_mut::<sys::CUstream_st>(2);
    // SAFETY: CU_STREAM_PER_THREAD is a valid stream value.
    unsafe { sys::cuStreamSynchronize(per_thread_stream) }.result()?;
    drop(guard);
    ensure(stream.clone_dtoh(&dev)? == data, "a copy on the per-thread stream, synchronised as CU_STREAM_PER_THREAD")
}

/// What the host functions of [`host_functions`] saw, in the order they ran.
static HOST_FN_ORDER: std::sync::Mutex<Vec<(u32, bool)>> = std::sync::Mutex::new(Vec::new());

/// `cuLaunchHostFunc`'s function: records its tag and whether it ran off the main thread.
unsafe extern "C" fn record_host_fn(data: *mut std::ffi::c_void) {
    let off_main = std::thread::current().name() != Some("main");
    HOST_FN_ORDER.lock().unwrap().push((data.addr() as u32, off_main));
}

/// `cuStreamAddCallback`'s function: also checks the stream and status it was given.
unsafe extern "C" fn record_callback(stream: sys::CUstream, status: sys::CUresult, data: *mut std::ffi::c_void) {
    let tag = if status == sys::CUresult::CUDA_SUCCESS && !stream.is_null() { data.addr() as u32 } else { 0 };
    HOST_FN_ORDER.lock().unwrap().push((tag, true));
}

/// Host functions and stream callbacks run in the program, in stream order, between copies
/// (over either transport; the Xen lab runs them in its suite).
fn host_functions(ctx: &Arc<CudaContext>) -> Res {
    let stream = ctx.new_stream()?;
    let cu = stream.cu_stream();
    let data = stream.clone_htod(&pattern(1 << 16, 9))?;
    let tag = |t: usize| std::ptr::without_provenance_mut::<std::ffi::c_void>(t);
    // SAFETY: valid stream; the functions take their tag as data and make no CUDA calls.
    unsafe { sys::cuLaunchHostFunc(cu, Some(record_host_fn), tag(1)) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuStreamAddCallback(cu, Some(record_callback), tag(2), 0) }.result()?;
    let back = stream.clone_dtoh(&data)?;
    // SAFETY: as above.
    unsafe { sys::cuLaunchHostFunc(cu, Some(record_host_fn), tag(3)) }.result()?;
    stream.synchronize()?;
    let order = HOST_FN_ORDER.lock().unwrap().clone();
    ensure(back == pattern(1 << 16, 9), "copies around the host functions")?;
    ensure(
        order == [(1, true), (2, true), (3, true)],
        &format!("host functions and a stream callback ran in stream order off the main thread: {order:?}"),
    )
}

/// How often [`smem_per_block`] ran (it must run in this process, called by the driver
/// library).
static SMEM_CALLBACKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The occupancy search's block size → dynamic shared memory callback: 4 bytes a thread.
extern "C" fn smem_per_block(block_size: std::ffi::c_int) -> usize {
    SMEM_CALLBACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    block_size as usize * 4
}

fn launch(ctx: &Arc<CudaContext>, ptx_path: &str) -> Res {
    let stream = ctx.default_stream();
    let ptx = std::fs::read_to_string(ptx_path)?;
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx.clone()))?;
    let fill = module.load_function("fill_u32")?;
    let n = 10_000usize;
    let mut out = stream.alloc_zeros::<u32>(n)?;
    let cfg = LaunchConfig::for_num_elems(n as u32);
    let (value, count) = (0x1234_5678u32, n as u64);
    // SAFETY: fill_u32(u32*, u32, u64) writes `count` words of `out`.
    unsafe { stream.launch_builder(&fill).arg(&mut out).arg(&value).arg(&count).launch(cfg) }?;
    ensure(stream.clone_dtoh(&out)?.iter().all(|&w| w == value), "fill_u32 filled 10000 words")?;
    let saxpy = module.load_function("scale_add")?;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let y: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 0.5).collect();
    let dx = stream.clone_htod(&x)?;
    let mut dy = stream.clone_htod(&y)?;
    let (a, nn) = (2.0f32, n as i32);
    // SAFETY: scale_add(f32, const f32*, f32*, i32) over `nn` elements of both slices.
    unsafe { stream.launch_builder(&saxpy).arg(&a).arg(&dx).arg(&mut dy).arg(&nn).launch(cfg) }?;
    let got = stream.clone_dtoh(&dy)?;
    let want: Vec<f32> = x.iter().zip(&y).map(|(x, y)| 2.0 * x + y).collect();
    ensure(got == want, "scale_add computed y = 2x + y")?;
    // Occupancy: the blocks per multiprocessor come from the host's driver; the potential
    // block size is searched in the guest with them; the other two are forwarded.
    let blocks = saxpy.occupancy_max_active_blocks_per_multiprocessor(256, 0, None)?;
    let (min_grid, block) = saxpy.occupancy_max_potential_block_size(smem_per_block, 0, 0, None)?;
    let calls = SMEM_CALLBACKS.load(std::sync::atomic::Ordering::Relaxed);
    ensure(
        block > 0 && block % 32 == 0 && min_grid > 0 && calls > 0,
        &format!(
            "occupancy: {blocks} blocks of 256 per SM; potential block size {block} (grid >= {min_grid}), callback ran"
        ),
    )?;
    // A library belongs to no context: a new thread with none current loads one (the CUDA
    // runtime loads its libraries lazily like that, from whichever thread launches first).
    let image = std::ffi::CString::new(ptx)?;
    let loaded = std::thread::spawn(move || -> Result<(), String> {
        use std::ptr::null_mut;
        let (mut lib, mut kernel) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: a NUL-terminated PTX image; no options; valid out-pointers.
        let rc = unsafe {
            sys::cuLibraryLoadData(
                &mut lib,
                image.as_ptr().cast(),
                null_mut(),
                null_mut(),
                0,
                null_mut(),
                null_mut(),
                0,
            )
        };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuLibraryLoadData without a current context: {rc:?}"));
        }
        // SAFETY: a loaded library and a NUL-terminated name.
        let rc = unsafe { sys::cuLibraryGetKernel(&mut kernel, lib, c"fill_u32".as_ptr()) };
        // SAFETY: the library loaded above, unloaded once.
        let unload = unsafe { sys::cuLibraryUnload(lib) };
        match (rc, unload) {
            (sys::CUresult::CUDA_SUCCESS, sys::CUresult::CUDA_SUCCESS) => Ok(()),
            other => Err(format!("cuLibraryGetKernel/cuLibraryUnload without a current context: {other:?}")),
        }
    })
    .join()
    .map_err(|_| "library thread panicked")?;
    ensure(loaded.is_ok(), &format!("a library loads in a thread without a current context ({loaded:?})"))?;
    // Device printf: the kernels print at the next synchronisation, into this program's
    // stdout (the worker captured it and handed it over with that reply).
    let print = module.load_function("print_u32")?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    for v in [7u32, 8] {
        // SAFETY: print_u32(u32) reads its one parameter.
        unsafe { stream.launch_builder(&print).arg(&v).launch(one) }?;
    }
    ctx.synchronize()?;
    ensure(true, "device printf launched and synchronised")?;
    let smem = saxpy.occupancy_available_dynamic_smem_per_block(blocks.max(1), 256)?;
    let clusters = saxpy.occupancy_max_active_clusters(LaunchConfig::for_num_elems(n as u32), &stream)?;
    ensure(clusters > 0, &format!("occupancy: {smem} bytes of dynamic shared memory per block, {clusters} clusters"))
}

fn expect_err<T>(r: Result<T, DriverError>, code: sys::CUresult, what: &str) -> Res {
    match r {
        Err(DriverError(c)) if c == code => ensure(true, &format!("{what}: {code:?}")),
        Err(DriverError(c)) => Err(format!("{what}: expected {code:?}, got {c:?}").into()),
        Ok(_) => Err(format!("{what}: expected {code:?}, got success").into()),
    }
}

fn errors(ctx: &Arc<CudaContext>) -> Res {
    use cudarc::driver::result;
    ctx.bind_to_thread()?;
    // A handle that was never issued.
    let bogus = 0xdead_0000_0001usize as sys::CUstream;
    // SAFETY: the driver validates the handle (a forged one must be refused, not used).
    let r = unsafe { result::stream::synchronize(bogus) };
    expect_err(r, sys::CUresult::CUDA_ERROR_INVALID_HANDLE, "forged stream handle")?;
    // Freeing memory that is not an allocation.
    // SAFETY: as above, for device pointers.
    let r = unsafe { result::free_sync(0x1000) };
    expect_err(r, sys::CUresult::CUDA_ERROR_INVALID_VALUE, "free of a bogus pointer")?;
    // Over the zone's memory quota (the test config gives this zone 256 MiB).
    // SAFETY: plain allocation.
    let r = unsafe { result::malloc_sync(1 << 30) };
    expect_err(r, sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY, "allocation over quota")?;
    // An entry point libvgpu does not provide.
    // SAFETY: no pointers are read (peer access is not offered).
    let rc = unsafe { sys::cuCtxEnablePeerAccess(std::ptr::null_mut(), 0) };
    ensure(rc == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED, "unsupported entry point answers CUDA_ERROR_NOT_SUPPORTED")?;
    let err = DriverError(sys::CUresult::CUDA_ERROR_INVALID_VALUE);
    let (name, text) = (err.error_name()?, err.error_string()?);
    println!("error text: {name:?} {text:?}");
    ensure(text.to_str()? == "invalid argument", "error strings are NVIDIA's")?;
    context_query_table()?;
    capture_queries(ctx)?;
    // The zone still works after all of that.
    let stream = ctx.default_stream();
    ensure(stream.clone_dtoh(&stream.clone_htod(&[1u8, 2, 3])?)? == [1, 2, 3], "zone still works after errors")
}

/// The driver's private table {21318C60…} as cuBLASLt uses it (libvgpu's export_tables.rs
/// has what the real driver answers): slot 4 tells a context from NULL, slot 51 gives an
/// object of the context (NULL context: CUDA_ERROR_INVALID_HANDLE), slot 39 a value for it
/// from the host (the test double answers 0), and refuses objects slot 51 did not make.
fn context_query_table() -> Res {
    type IsContext = unsafe extern "C" fn(sys::CUcontext, *mut u64) -> sys::CUresult;
    type Object = unsafe extern "C" fn(sys::CUcontext, *const c_void, *mut *const c_void) -> sys::CUresult;
    type Value = unsafe extern "C" fn(sys::CUcontext, *const c_void, *mut u64) -> sys::CUresult;
    use std::ffi::c_void;
    let id = sys::CUuuid {
        bytes: [0x21u8, 0x31, 0x8c, 0x60, 0x97, 0x14, 0x32, 0x48, 0x8c, 0xa6, 0x41, 0xff, 0x73, 0x24, 0xc8, 0xf2]
            .map(|b| b as std::ffi::c_char),
    };
    let mut table: *const c_void = std::ptr::null();
    // SAFETY: valid out-pointer and id.
    let rc = unsafe { sys::cuGetExportTable(&mut table, &id) };
    ensure(rc == sys::CUresult::CUDA_SUCCESS && !table.is_null(), "private table {21318C60…} is served")?;
    // SAFETY: a table libvgpu served: its size word and then that many bytes of words.
    let words = unsafe { std::slice::from_raw_parts(table.cast::<usize>(), 93) };
    ensure(words[0] == 93 * 8, "it has the driver's 93 slots")?;
    // SAFETY: the slots' signatures as libvgpu implements them (this and the next two).
    let is_ctx = unsafe { std::mem::transmute::<usize, IsContext>(words[4]) };
    // SAFETY: as above.
    let object = unsafe { std::mem::transmute::<usize, Object>(words[51]) };
    // SAFETY: as above.
    let value = unsafe { std::mem::transmute::<usize, Value>(words[39]) };
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    unsafe { sys::cuCtxGetCurrent(&mut ctx) }.result()?;
    let ok = sys::CUresult::CUDA_SUCCESS;
    let null = std::ptr::null();
    // The slots' contract, for each call below: a context or NULL, valid out-pointers; a
    // forged object is refused, not read.
    let (mut yes, mut no) = (7u64, 7u64);
    // SAFETY: as just said.
    let r1 = unsafe { is_ctx(ctx, &mut yes) };
    // SAFETY: as above.
    let r2 = unsafe { is_ctx(std::ptr::null_mut(), &mut no) };
    ensure((r1, r2) == (ok, ok) && (yes, no) == (1, 0), "slot 4: 1 for a context, 0 for NULL")?;
    let (mut obj, mut none) = (std::ptr::null(), std::ptr::null());
    // SAFETY: as above.
    let r1 = unsafe { object(ctx, null, &mut obj) };
    // SAFETY: as above.
    let r2 = unsafe { object(std::ptr::null_mut(), null, &mut none) };
    ensure(
        (r1, r2) == (ok, sys::CUresult::CUDA_ERROR_INVALID_HANDLE) && !obj.is_null() && none.is_null(),
        "slot 51: an object for the context, CUDA_ERROR_INVALID_HANDLE for NULL",
    )?;
    // TOOLS_TLS slot 2 gives the thread's state block, which cuBLASLt passes on: it
    // stands for the thread's current context.
    let tls_id = sys::CUuuid {
        bytes: [0x42u8, 0xd8, 0x5a, 0x81, 0x23, 0xf6, 0xcb, 0x47, 0x82, 0x98, 0xf6, 0xe7, 0x8a, 0x3a, 0xec, 0xdc]
            .map(|b| b as std::ffi::c_char),
    };
    let mut tls: *const c_void = std::ptr::null();
    // SAFETY: valid out-pointer and id.
    let rc = unsafe { sys::cuGetExportTable(&mut tls, &tls_id) };
    ensure(rc == ok && !tls.is_null(), "TOOLS_TLS is served")?;
    // SAFETY: TOOLS_TLS has 3 words (size, slot 1, slot 2).
    let tls_words = unsafe { std::slice::from_raw_parts(tls.cast::<usize>(), 3) };
    type ThreadState = unsafe extern "C" fn(*mut *const c_void) -> usize;
    // SAFETY: slot 2's signature as libvgpu implements it.
    let thread_state = unsafe { std::mem::transmute::<usize, ThreadState>(tls_words[2]) };
    let mut state: *const c_void = std::ptr::null();
    // SAFETY: a valid out-pointer.
    let r1 = unsafe { thread_state(&mut state) };
    let mut via_state = std::ptr::null();
    // SAFETY: as for slot 51 above.
    let r2 = unsafe { object(state as sys::CUcontext, null, &mut via_state) };
    ensure(
        r1 == 0 && !state.is_null() && r2 == ok && via_state == obj,
        "TOOLS_TLS slot 2's thread state stands for the current context",
    )?;
    let (mut v, mut forged) = (7u64, 7u64);
    let bogus = 0x1000usize as *const c_void;
    // SAFETY: as above.
    let r1 = unsafe { value(ctx, obj, &mut v) };
    // SAFETY: as above.
    let r2 = unsafe { value(ctx, bogus, &mut forged) };
    ensure(
        (r1, r2) == (ok, sys::CUresult::CUDA_ERROR_INVALID_VALUE) && v == 0 && forged == 7,
        "slot 39: the host's value for the context (test double: 0), a forged object refused",
    )
}

/// No stream is ever capturing (capture is not offered): every query says so.
fn capture_queries(ctx: &Arc<CudaContext>) -> Res {
    use sys::CUstreamCaptureStatus::{
        CU_STREAM_CAPTURE_STATUS_ACTIVE as ACTIVE, CU_STREAM_CAPTURE_STATUS_NONE as NONE,
    };
    let stream = ctx.new_stream()?;
    let (mut a, mut b, mut id, mut n) = (ACTIVE, ACTIVE, 7u64, 7usize);
    // SAFETY: a live stream and a valid out-pointer.
    let r1 = unsafe { sys::cuStreamIsCapturing(stream.cu_stream(), &mut a) };
    let mut graph = 0x10usize as sys::CUgraph;
    let mut deps = 0x10usize as *const sys::CUgraphNode;
    let mut edges = 0x10usize as *const sys::CUgraphEdgeData;
    // SAFETY: as above; the other outputs are optional.
    let r2 = unsafe {
        sys::cuStreamGetCaptureInfo_v3(stream.cu_stream(), &mut b, &mut id, &mut graph, &mut deps, &mut edges, &mut n)
    };
    let ok = sys::CUresult::CUDA_SUCCESS;
    ensure(
        (r1, r2) == (ok, ok)
            && (a, b) == (NONE, NONE)
            && (id, n) == (0, 0)
            && graph.is_null()
            && deps.is_null()
            && edges.is_null(),
        "stream capture queries: not capturing",
    )
}

fn threads(ctx: &Arc<CudaContext>) -> Res {
    let handles: Vec<_> = (0..8u32)
        .map(|t| {
            let ctx = ctx.clone();
            std::thread::spawn(move || -> Result<bool, DriverError> {
                ctx.bind_to_thread()?;
                let stream = ctx.new_stream()?;
                let mut ok = true;
                for round in 0..20 {
                    let host = pattern(4096 + t as usize, t * 1000 + round);
                    let dev = stream.clone_htod(&host)?;
                    ok &= stream.clone_dtoh(&dev)? == host;
                }
                Ok(ok)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let ok = h.join().map_err(|_| "thread panicked")??;
        ensure(ok, &format!("thread {i}: 20 copies verified"))?;
    }
    // A context made current on another thread does not change this thread's.
    let mut here = std::ptr::null_mut();
    ctx.bind_to_thread()?;
    std::thread::spawn(|| {
        // SAFETY: clearing this (other) thread's current context.
        let _ = unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) };
    })
    .join()
    .map_err(|_| "thread panicked")?;
    // SAFETY: valid out-pointer.
    unsafe { sys::cuCtxGetCurrent(&mut here) }.result()?;
    ensure(here == ctx.cu_ctx(), "current context is per thread")
}

/// The seeds' producer: writes 42, 43, 44 …, exports the allocation, prints the handle,
/// waits for the consumer (a line on stdin), then checks the consumer's writes.
fn ipc_export(ctx: &Arc<CudaContext>) -> Res {
    use std::io::BufRead;
    let stream = ctx.default_stream();
    let n = 4096usize;
    let values: Vec<u32> = (0..n as u32).map(|i| 42 + i).collect();
    let dev = stream.clone_htod(&values)?;
    let (ptr, guard) = cudarc::driver::DevicePtr::device_ptr(&dev, &stream);
    let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
    // SAFETY: valid out-pointer; `ptr` is the start of a live allocation.
    unsafe { sys::cuIpcGetMemHandle(&mut handle, ptr) }.result()?;
    drop(guard);
    let hex: String = handle.reserved.iter().map(|&b| format!("{:02x}", b as u8)).collect();
    println!("handle {hex}");
    // An interprocess event, recorded after the data was written, for the consumer to wait on.
    let mut event: sys::CUevent = std::ptr::null_mut();
    let flags = sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
    // SAFETY: valid out-pointer; the flags the driver wants for an interprocess event.
    unsafe { sys::cuEventCreate(&mut event, flags) }.result()?;
    // SAFETY: a live event and stream.
    unsafe { sys::cuEventRecord(event, stream.cu_stream()) }.result()?;
    let mut ev_handle = sys::CUipcEventHandle { reserved: [0; 64] };
    // SAFETY: valid out-pointer; a live interprocess event.
    unsafe { sys::cuIpcGetEventHandle(&mut ev_handle, event) }.result()?;
    let ev_hex: String = ev_handle.reserved.iter().map(|&b| format!("{:02x}", b as u8)).collect();
    println!("event {ev_hex}");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    ensure(line.trim() == "done", "consumer finished")?;
    let back = stream.clone_dtoh(&dev)?;
    ensure(back.iter().enumerate().all(|(i, &v)| v == 1000 + i as u32), "producer sees the consumer's writes")
}

/// The seeds' consumer: opens the producer's handle, verifies 42, 43, 44 …, writes back.
/// With `denied`, the open must be refused with `CUDA_ERROR_NOT_PERMITTED` (a zone outside
/// the producer's sharing group).
fn ipc_open(ctx: &Arc<CudaContext>, hex: &str, denied: bool, event_hex: Option<&str>) -> Res {
    ctx.bind_to_thread()?;
    let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
    for (i, b) in handle.reserved.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or("short handle")?, 16)? as _;
    }
    let mut dptr = 0;
    if denied {
        // SAFETY: valid out-pointer; the handle is passed by value.
        let rc = unsafe { sys::cuIpcOpenMemHandle_v2(&mut dptr, handle, 1) };
        return ensure(rc == sys::CUresult::CUDA_ERROR_NOT_PERMITTED, "a zone outside the sharing group is refused");
    }
    // SAFETY: valid out-pointer; the handle is passed by value.
    unsafe { sys::cuIpcOpenMemHandle_v2(&mut dptr, handle, 1) }.result()?;
    let n = 4096usize;
    let mut got = vec![0u32; n];
    // SAFETY: `got` holds n words; the opened range is n words long.
    unsafe { sys::cuMemcpyDtoH_v2(got.as_mut_ptr().cast(), dptr, n * 4) }.result()?;
    ensure(got.iter().enumerate().all(|(i, &v)| v == 42 + i as u32), "consumer reads 42, 43, 44, ...")?;
    let new: Vec<u32> = (0..n as u32).map(|i| 1000 + i).collect();
    // SAFETY: as above, in the other direction.
    unsafe { sys::cuMemcpyHtoD_v2(dptr, new.as_ptr().cast(), n * 4) }.result()?;
    // SAFETY: `dptr` came from cuIpcOpenMemHandle.
    unsafe { sys::cuIpcCloseMemHandle(dptr) }.result()?;
    if let Some(ev_hex) = event_hex {
        let mut ev_handle = sys::CUipcEventHandle { reserved: [0; 64] };
        for (i, b) in ev_handle.reserved.iter_mut().enumerate() {
            *b = u8::from_str_radix(ev_hex.get(2 * i..2 * i + 2).ok_or("short event handle")?, 16)? as _;
        }
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the handle is passed by value.
        unsafe { sys::cuIpcOpenEventHandle(&mut event, ev_handle) }.result()?;
        // SAFETY: a live event.
        unsafe { sys::cuEventSynchronize(event) }.result()?;
        // SAFETY: as above.
        unsafe { sys::cuEventDestroy_v2(event) }.result()?;
        ensure(true, "consumer opened and waited on the producer's interprocess event")?;
        let mut as_event = sys::CUipcEventHandle { reserved: [0; 64] };
        as_event.reserved.copy_from_slice(&handle.reserved);
        // SAFETY: valid out-pointer; the handle is passed by value.
        let rc = unsafe { sys::cuIpcOpenEventHandle(&mut event, as_event) };
        ensure(rc == sys::CUresult::CUDA_ERROR_INVALID_VALUE, "a memory handle does not open as an event")?;
    }
    // A handle that was never issued is refused.
    let mut forged = handle;
    forged.reserved[20] ^= 0x5a;
    // SAFETY: as above.
    let rc = unsafe { sys::cuIpcOpenMemHandle_v2(&mut dptr, forged, 1) };
    ensure(rc == sys::CUresult::CUDA_ERROR_INVALID_VALUE, "a forged handle is refused")
}

/// Counts runs of a graph's host node.
static GRAPH_HOST_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A graph's host node: counts its runs.
unsafe extern "C" fn count_graph_run(_data: *mut std::ffi::c_void) {
    GRAPH_HOST_RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// The word a graph's host node last read (see [`read_first_word`]).
static FIRST_WORD_SEEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A graph's host node that depends on a copy into host memory: reads its first word.
unsafe extern "C" fn read_first_word(data: *mut std::ffi::c_void) {
    // SAFETY: `data` is the first word of a live buffer of the scenario.
    let w = unsafe { data.cast::<u32>().read_volatile() };
    FIRST_WORD_SEEN.store(w, std::sync::atomic::Ordering::SeqCst);
}

/// One side of a linear copy node.
enum Side3d {
    Device(sys::CUdeviceptr),
    Host(*mut std::ffi::c_void),
}

/// A `CUDA_MEMCPY3D` of `len` contiguous bytes.
fn linear_copy(src: Side3d, dst: Side3d, len: usize) -> sys::CUDA_MEMCPY3D {
    use std::ptr::null_mut;
    let side = |s: Side3d| match s {
        Side3d::Device(d) => (sys::CUmemorytype::CU_MEMORYTYPE_DEVICE, null_mut(), d),
        Side3d::Host(h) => (sys::CUmemorytype::CU_MEMORYTYPE_HOST, h, 0),
    };
    let ((src_type, src_host, src_dev), (dst_type, dst_host, dst_dev)) = (side(src), side(dst));
    sys::CUDA_MEMCPY3D {
        srcXInBytes: 0,
        srcY: 0,
        srcZ: 0,
        srcLOD: 0,
        srcMemoryType: src_type,
        srcHost: src_host.cast_const(),
        srcDevice: src_dev,
        srcArray: null_mut(),
        reserved0: null_mut(),
        srcPitch: 0,
        srcHeight: 0,
        dstXInBytes: 0,
        dstY: 0,
        dstZ: 0,
        dstLOD: 0,
        dstMemoryType: dst_type,
        dstHost: dst_host,
        dstDevice: dst_dev,
        dstArray: null_mut(),
        reserved1: null_mut(),
        dstPitch: 0,
        dstHeight: 0,
        WidthInBytes: len,
        Height: 1,
        Depth: 1,
    }
}

/// The number of nodes of `graph`.
fn node_count(graph: sys::CUgraph) -> Result<usize, Box<dyn Error>> {
    let mut n = 0usize;
    // SAFETY: a live graph; NULL nodes asks for the count.
    unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) }.result()?;
    Ok(n)
}

/// Reads `n` words at `dptr`.
fn read_words(dptr: sys::CUdeviceptr, n: usize) -> Result<Vec<u32>, Box<dyn Error>> {
    let mut got = vec![0u32; n];
    // SAFETY: `got` holds n words; the range is n words of a live allocation.
    unsafe { sys::cuMemcpyDtoH_v2(got.as_mut_ptr().cast(), dptr, n * 4) }.result()?;
    Ok(got)
}

/// Graphs, built by hand and captured from streams, launched more than once: memset, kernel,
/// copy and host nodes; cloning; node lists; a capture that forks to a second stream and
/// joins back; capture queries while capturing and after.
fn graphs(ctx: &Arc<CudaContext>, ptx_path: &str) -> Res {
    use std::ptr::{null, null_mut};
    use std::sync::atomic::Ordering::SeqCst;
    ctx.bind_to_thread()?;
    let image = std::ffi::CString::new(std::fs::read_to_string(ptx_path)?)?;
    let mut module: sys::CUmodule = null_mut();
    // SAFETY: a NUL-terminated PTX image; valid out-pointer.
    unsafe { sys::cuModuleLoadData(&mut module, image.as_ptr().cast()) }.result()?;
    let (mut fill, mut add_one): (sys::CUfunction, sys::CUfunction) = (null_mut(), null_mut());
    // SAFETY: a loaded module, NUL-terminated names, valid out-pointers.
    unsafe { sys::cuModuleGetFunction(&mut fill, module, c"fill_u32".as_ptr()) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuModuleGetFunction(&mut add_one, module, c"add_one_i32".as_ptr()) }.result()?;
    let n = 4096usize;
    let (mut a, mut b) = (0, 0);
    // SAFETY: valid out-pointers.
    unsafe { sys::cuMemAlloc_v2(&mut a, n * 4) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuMemAlloc_v2(&mut b, n * 4) }.result()?;

    // ---- by hand: memset a, fill a with 7, add one, copy to b, count ----
    let mut graph: sys::CUgraph = null_mut();
    // SAFETY: valid out-pointer, flags 0.
    unsafe { sys::cuGraphCreate(&mut graph, 0) }.result()?;
    let mut memset: sys::CUgraphNode = null_mut();
    let ms = sys::CUDA_MEMSET_NODE_PARAMS { dst: a, pitch: 0, value: 0xdead, elementSize: 4, width: n, height: 1 };
    // SAFETY: a live graph, no dependencies, valid parameters of a live allocation.
    unsafe { sys::cuGraphAddMemsetNode(&mut memset, graph, null(), 0, &ms, ctx.cu_ctx()) }.result()?;
    let (seven, count, nn) = (7u32, n as u64, n as i32);
    let mut fill_args: [*mut std::ffi::c_void; 3] = [
        (&a as *const u64).cast_mut().cast(),
        (&seven as *const u32).cast_mut().cast(),
        (&count as *const u64).cast_mut().cast(),
    ];
    let kernel = |f: sys::CUfunction, args: *mut *mut std::ffi::c_void| sys::CUDA_KERNEL_NODE_PARAMS {
        func: f,
        gridDimX: (n as u32).div_ceil(256),
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: 256,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        kernelParams: args,
        extra: null_mut(),
        kern: null_mut(),
        ctx: null_mut(),
    };
    let mut k1: sys::CUgraphNode = null_mut();
    let p1 = kernel(fill, fill_args.as_mut_ptr());
    // SAFETY: a live graph, one dependency of it, a live function and its three arguments
    // (copied by the call).
    unsafe { sys::cuGraphAddKernelNode_v2(&mut k1, graph, &memset, 1, &p1) }.result()?;
    let mut add_args: [*mut std::ffi::c_void; 2] =
        [(&a as *const u64).cast_mut().cast(), (&nn as *const i32).cast_mut().cast()];
    let mut k2: sys::CUgraphNode = null_mut();
    let p2 = kernel(add_one, add_args.as_mut_ptr());
    // SAFETY: as above.
    unsafe { sys::cuGraphAddKernelNode_v2(&mut k2, graph, &k1, 1, &p2) }.result()?;
    let cp = linear_copy(Side3d::Device(a), Side3d::Device(b), n * 4);
    let mut copy: sys::CUgraphNode = null_mut();
    // SAFETY: a live graph, one dependency, a device-to-device copy inside both allocations.
    unsafe { sys::cuGraphAddMemcpyNode(&mut copy, graph, &k2, 1, &cp, ctx.cu_ctx()) }.result()?;
    let host = sys::CUDA_HOST_NODE_PARAMS { fn_: Some(count_graph_run), userData: null_mut() };
    let mut host_node: sys::CUgraphNode = null_mut();
    // SAFETY: a live graph, one dependency, a function that makes no CUDA calls.
    unsafe { sys::cuGraphAddHostNode(&mut host_node, graph, &copy, 1, &host) }.result()?;
    let mut count_nodes = 0usize;
    // SAFETY: a live graph; NULL nodes asks for the count.
    unsafe { sys::cuGraphGetNodes(graph, null_mut(), &mut count_nodes) }.result()?;
    let mut listed = [null_mut(); 8];
    let mut room = listed.len();
    // SAFETY: room for 8 nodes.
    unsafe { sys::cuGraphGetNodes(graph, listed.as_mut_ptr(), &mut room) }.result()?;
    let mut want = vec![memset, k1, k2, copy, host_node];
    let mut got: Vec<_> = listed[..5].to_vec();
    want.sort();
    got.sort();
    ensure(
        count_nodes == 5 && room == 5 && got == want && listed[5].is_null(),
        "a graph lists its 5 nodes, with the handles that adding them returned",
    )?;
    let mut exec: sys::CUgraphExec = null_mut();
    // SAFETY: a live graph; valid out-pointer.
    unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result()?;
    let stream = ctx.new_stream()?;
    let before = GRAPH_HOST_RUNS.load(SeqCst);
    for _ in 0..3 {
        // SAFETY: a live executable graph and stream.
        unsafe { sys::cuGraphLaunch(exec, stream.cu_stream()) }.result()?;
    }
    stream.synchronize()?;
    ensure(
        read_words(b, n)?.iter().all(|&w| w == 8) && GRAPH_HOST_RUNS.load(SeqCst) - before == 3,
        "a graph built by hand ran 3 times: memset, fill, add one, copy, and its host node 3 times",
    )?;
    let mut clone: sys::CUgraph = null_mut();
    // SAFETY: a live graph; valid out-pointer.
    unsafe { sys::cuGraphClone(&mut clone, graph) }.result()?;
    // SAFETY: the original is no longer needed; its clone and exec stand alone.
    unsafe { sys::cuGraphDestroy(graph) }.result()?;
    let mut clone_exec: sys::CUgraphExec = null_mut();
    // SAFETY: a live graph; valid out-pointer.
    unsafe { sys::cuGraphInstantiateWithFlags(&mut clone_exec, clone, 0) }.result()?;
    // SAFETY: a live allocation.
    unsafe { sys::cuMemsetD32_v2(b, 0, n) }.result()?;
    // SAFETY: a live executable graph and stream.
    unsafe { sys::cuGraphLaunch(clone_exec, stream.cu_stream()) }.result()?;
    stream.synchronize()?;
    ensure(
        read_words(b, n)?.iter().all(|&w| w == 8) && GRAPH_HOST_RUNS.load(SeqCst) - before == 4,
        "a clone of the graph runs the same after the original is destroyed",
    )?;

    // ---- copies into host memory: the program's own (pageable) and pinned ----
    let mut pageable = vec![0u32; n];
    let mut pinned: *mut std::ffi::c_void = null_mut();
    // SAFETY: valid out-pointer.
    unsafe { sys::cuMemAllocHost_v2(&mut pinned, n * 4) }.result()?;
    let mut g2: sys::CUgraph = null_mut();
    // SAFETY: valid out-pointer, flags 0.
    unsafe { sys::cuGraphCreate(&mut g2, 0) }.result()?;
    let (mut to_pageable, mut to_pinned, mut reader): (sys::CUgraphNode, sys::CUgraphNode, sys::CUgraphNode) =
        (null_mut(), null_mut(), null_mut());
    let cp = linear_copy(Side3d::Device(b), Side3d::Host(pageable.as_mut_ptr().cast()), n * 4);
    // SAFETY: a live graph; a copy from a live allocation into `pageable` (alive until the
    // graph has run).
    unsafe { sys::cuGraphAddMemcpyNode(&mut to_pageable, g2, null(), 0, &cp, ctx.cu_ctx()) }.result()?;
    let cp = linear_copy(Side3d::Device(b), Side3d::Host(pinned), n * 4);
    // SAFETY: as above, into pinned memory of n words.
    unsafe { sys::cuGraphAddMemcpyNode(&mut to_pinned, g2, null(), 0, &cp, ctx.cu_ctx()) }.result()?;
    let reads = sys::CUDA_HOST_NODE_PARAMS { fn_: Some(read_first_word), userData: pageable.as_mut_ptr().cast() };
    // SAFETY: a live graph, one dependency of it, a function that makes no CUDA calls.
    unsafe { sys::cuGraphAddHostNode(&mut reader, g2, &to_pageable, 1, &reads) }.result()?;
    let mut exec2: sys::CUgraphExec = null_mut();
    // SAFETY: a live graph; valid out-pointer.
    unsafe { sys::cuGraphInstantiateWithFlags(&mut exec2, g2, 0) }.result()?;
    FIRST_WORD_SEEN.store(0, SeqCst);
    // SAFETY: a live executable graph and stream.
    unsafe { sys::cuGraphLaunch(exec2, stream.cu_stream()) }.result()?;
    stream.synchronize()?;
    // SAFETY: `pinned` holds n words, written by the graph (synchronised).
    let pinned_words = unsafe { std::slice::from_raw_parts(pinned.cast::<u32>(), n) };
    ensure(
        node_count(g2)? == 3
            && pageable.iter().all(|&w| w == 8)
            && pinned_words.iter().all(|&w| w == 8)
            && FIRST_WORD_SEEN.load(SeqCst) == 8,
        "copy nodes into pageable and pinned host memory (3 nodes), the pageable one done before the host node after it",
    )?;
    let mut g2_clone: sys::CUgraph = null_mut();
    // SAFETY: a live graph; valid out-pointer.
    unsafe { sys::cuGraphClone(&mut g2_clone, g2) }.result()?;
    ensure(node_count(g2_clone)? == 3, "its clone has the same 3 nodes")?;
    // SAFETY: the clone, destroyed once.
    unsafe { sys::cuGraphDestroy(g2_clone) }.result()?;

    // ---- captured: a fork to a second stream and a join back ----
    let side = ctx.new_stream()?;
    let (s1, s2) = (stream.cu_stream(), side.cu_stream());
    let (mut fork, mut join): (sys::CUevent, sys::CUevent) = (null_mut(), null_mut());
    // SAFETY: valid out-pointers.
    unsafe { sys::cuEventCreate(&mut fork, 2) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuEventCreate(&mut join, 2) }.result()?;
    // SAFETY: a live stream; global mode.
    unsafe { sys::cuStreamBeginCapture_v2(s1, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL) }.result()?;
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: a live stream; valid out-pointer.
    unsafe { sys::cuStreamIsCapturing(s1, &mut status) }.result()?;
    ensure(status == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE, "the stream is capturing")?;
    // SAFETY: a live allocation on a live stream (captured, not run).
    unsafe { sys::cuMemsetD32Async(a, 40, n, s1) }.result()?;
    // SAFETY: live events and streams.
    unsafe { sys::cuEventRecord(fork, s1) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuStreamWaitEvent(s2, fork, 0) }.result()?;
    // SAFETY: a live function and its two arguments, on the side stream (joined).
    unsafe { sys::cuLaunchKernel(add_one, 16, 1, 1, 256, 1, 1, 0, s2, add_args.as_mut_ptr(), null_mut()) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuLaunchHostFunc(s2, Some(count_graph_run), null_mut()) }.result()?;
    // SAFETY: live events and streams.
    unsafe { sys::cuEventRecord(join, s2) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuStreamWaitEvent(s1, join, 0) }.result()?;
    // SAFETY: a device-to-device copy inside both allocations.
    unsafe { sys::cuMemcpyDtoDAsync_v2(b, a, n * 4, s1) }.result()?;
    let mut captured_host = vec![0u32; n];
    // SAFETY: a copy into the program's own memory (alive until the graph has run).
    unsafe { sys::cuMemcpyDtoHAsync_v2(captured_host.as_mut_ptr().cast(), b, n * 4, s1) }.result()?;
    // SAFETY: a function that makes no CUDA calls and reads `captured_host`.
    unsafe { sys::cuLaunchHostFunc(s1, Some(read_first_word), captured_host.as_mut_ptr().cast()) }.result()?;
    let mut captured: sys::CUgraph = null_mut();
    // SAFETY: the capturing stream; valid out-pointer.
    unsafe { sys::cuStreamEndCapture(s1, &mut captured) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuStreamIsCapturing(s1, &mut status) }.result()?;
    let runs = GRAPH_HOST_RUNS.load(SeqCst);
    ensure(
        status == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
            && read_words(b, n)?.iter().all(|&w| w == 8)
            && runs - before == 4,
        "a capture records its work without running it, and ends",
    )?;
    ensure(node_count(captured)? == 6, "the captured graph has its 6 nodes (events make none)")?;
    let mut captured_exec: sys::CUgraphExec = null_mut();
    // SAFETY: a live graph; valid out-pointer.
    unsafe { sys::cuGraphInstantiateWithFlags(&mut captured_exec, captured, 0) }.result()?;
    for _ in 0..2 {
        // SAFETY: a live executable graph and stream.
        unsafe { sys::cuGraphLaunch(captured_exec, s1) }.result()?;
    }
    stream.synchronize()?;
    ensure(
        read_words(b, n)?.iter().all(|&w| w == 41) && GRAPH_HOST_RUNS.load(SeqCst) - runs == 2,
        "the captured graph ran twice: memset, the forked kernel and host function, the copy",
    )?;
    ensure(
        captured_host.iter().all(|&w| w == 41) && FIRST_WORD_SEEN.load(SeqCst) == 41,
        "a captured copy into pageable memory is there for the host function after it",
    )?;
    // SAFETY: each object is live and destroyed once.
    unsafe { sys::cuGraphExecDestroy(exec) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuGraphExecDestroy(exec2) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuGraphDestroy(g2) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuMemFreeHost(pinned) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuGraphExecDestroy(clone_exec) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuGraphExecDestroy(captured_exec) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuGraphDestroy(clone) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuGraphDestroy(captured) }.result()?;
    ensure(true, "graphs and executable graphs destroyed")?;
    // SAFETY: as above.
    unsafe { sys::cuEventDestroy_v2(fork) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuEventDestroy_v2(join) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuMemFree_v2(a) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuMemFree_v2(b) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuModuleUnload(module) }.result()?;
    Ok(())
}

/// Virtual memory management as PyTorch's expandable segments use it: a reservation mapped
/// piece by piece with physical allocations, access set, copies through the mappings,
/// contents kept across unmap and map, everything given back.
fn vmm(ctx: &Arc<CudaContext>) -> Res {
    ctx.bind_to_thread()?;
    let mut prop = sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: 0 },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    };
    let mut g = 0usize;
    // SAFETY: valid out-pointer and property.
    unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut g,
            &prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    }
    .result()?;
    ensure(g > 0 && g.is_power_of_two(), &format!("allocation granularity {g} bytes"))?;
    let mut r = 0;
    // SAFETY: valid out-pointer; no alignment or address wish.
    unsafe { sys::cuMemAddressReserve(&mut r, 4 * g, 0, 0, 0) }.result()?;
    let (mut p1, mut p2) = (0, 0);
    // SAFETY: valid out-pointers and property.
    unsafe { sys::cuMemCreate(&mut p1, g, &prop, 0) }.result()?;
    prop.requestedHandleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    // SAFETY: as above (the second exportable as a file descriptor, as PyTorch asks).
    unsafe { sys::cuMemCreate(&mut p2, g, &prop, 0) }.result()?;
    // SAFETY: inside the reservation, whole physical allocations.
    unsafe { sys::cuMemMap(r, g, 0, p1, 0) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuMemMap(r + g as u64, g, 0, p2, 0) }.result()?;
    let access = sys::CUmemAccessDesc {
        location: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: 0 },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: the two mappings; one descriptor.
    unsafe { sys::cuMemSetAccess(r, 2 * g, &access, 1) }.result()?;
    let n = g / 4;
    let data = pattern(n, 5);
    // SAFETY: `data` holds n words; the first mapping holds g bytes.
    unsafe { sys::cuMemcpyHtoD_v2(r, data.as_ptr().cast(), g) }.result()?;
    // SAFETY: the second mapping, g bytes.
    unsafe { sys::cuMemsetD32_v2(r + g as u64, 7, n) }.result()?;
    ensure(
        read_words(r, n)? == data && read_words(r + g as u64, n)?.iter().all(|&w| w == 7),
        "copies and memsets through two mappings",
    )?;
    // SAFETY: a mapping is not an allocation.
    let rc = unsafe { sys::cuMemFree_v2(r) };
    ensure(rc == sys::CUresult::CUDA_ERROR_INVALID_VALUE, "cuMemFree of mapped memory is refused")?;
    // SAFETY: the first mapping, whole.
    unsafe { sys::cuMemUnmap(r, g) }.result()?;
    // SAFETY: the third granule of the reservation, nothing mapped there.
    unsafe { sys::cuMemMap(r + 2 * g as u64, g, 0, p1, 0) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuMemSetAccess(r + 2 * g as u64, g, &access, 1) }.result()?;
    ensure(read_words(r + 2 * g as u64, n)? == data, "contents kept across unmap and map")?;
    // SAFETY: each object once, mappings first.
    unsafe { sys::cuMemUnmap(r + g as u64, 2 * g) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuMemRelease(p1) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuMemRelease(p2) }.result()?;
    // SAFETY: as above.
    unsafe { sys::cuMemAddressFree(r, 4 * g) }.result()?;
    ensure(true, "mappings, physical allocations and the reservation given back")
}

/// Every scenario that needs no file, second process or quota configuration, in one run (the Xen lab's guest
/// workload: one domain boot checks them all).
fn suite(ctx: &Arc<CudaContext>) -> Res {
    for (name, f) in [
        ("device", device as fn(&Arc<CudaContext>) -> Res),
        ("copy", copy),
        ("memset", memset),
        ("streams", streams),
        ("threads", threads),
        ("host-fn", host_functions),
    ] {
        println!("== {name}");
        f(ctx)?;
    }
    println!("suite: all scenarios passed");
    Ok(())
}

/// Remoting cost as a program sees it: the round trip of a host-served synchronous call
/// (cuStreamQuery on an idle stream; median of `iters`) and pageable copy throughput
/// (16 MiB each way, best of 5). For comparing transports on one machine, not for
/// absolute figures.
fn bench(ctx: &Arc<CudaContext>, iters: usize) -> Res {
    let stream = ctx.new_stream()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = std::time::Instant::now();
        // SAFETY: a live stream handle.
        unsafe { sys::cuStreamQuery(stream.cu_stream()) }.result()?;
        times.push(t.elapsed());
    }
    times.sort();
    let p50 = times[times.len() / 2];
    let p99 = times[times.len() * 99 / 100];
    println!(
        "bench: sync call round trip p50 {:.1} us p99 {:.1} us ({iters} calls)",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    let n = (16 << 20) / 4;
    let host = pattern(n, 9);
    let mut dev = stream.alloc_zeros::<u32>(n)?;
    let mut back = vec![0u32; n];
    let (mut best_h2d, mut best_d2h) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t = std::time::Instant::now();
        stream.memcpy_htod(&host, &mut dev)?;
        stream.synchronize()?;
        best_h2d = best_h2d.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        stream.memcpy_dtoh(&dev, &mut back)?;
        stream.synchronize()?;
        best_d2h = best_d2h.min(t.elapsed().as_secs_f64());
    }
    ensure(back == host, "16 MiB came back intact")?;
    let mb = (n * 4) as f64 / 1e6;
    println!(
        "bench: copy 16 MiB pageable host->device {:.0} MB/s device->host {:.0} MB/s",
        mb / best_h2d,
        mb / best_d2h
    );
    Ok(())
}

fn main() -> Res {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ctx = CudaContext::new(0)?;
    match args.first().map(String::as_str) {
        Some("device") => device(&ctx),
        Some("copy") => copy(&ctx),
        Some("memset") => memset(&ctx),
        Some("streams") => streams(&ctx),
        Some("host-fn") => host_functions(&ctx),
        Some("launch") => launch(&ctx, args.get(1).ok_or("launch needs a PTX file")?),
        Some("graphs") => graphs(&ctx, args.get(1).ok_or("graphs needs a PTX file")?),
        Some("vmm") => vmm(&ctx),
        Some("errors") => errors(&ctx),
        Some("threads") => threads(&ctx),
        Some("suite") => suite(&ctx),
        Some("hold") => {
            // Holds a session and device memory until killed (the Xen lab destroys the guest).
            let _mem = ctx.default_stream().alloc_zeros::<u8>(64 << 20)?;
            println!("holding-gpu-memory");
            use std::io::Write;
            std::io::stdout().flush()?;
            std::thread::sleep(std::time::Duration::from_secs(3600));
            Ok(())
        }
        Some("calls-until-gone") => {
            // Holds device memory and calls the host back to back (a round trip each) until a
            // call fails: the Xen lab kills host-proxy meanwhile. Exit status 3 when the
            // failure came, bounded; 1 if the host never went away.
            let _mem = ctx.default_stream().alloc_zeros::<u8>(16 << 20)?;
            println!("calling-the-host");
            use std::io::Write;
            std::io::stdout().flush()?;
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_secs(120) {
                if let Err(e) = ctx.synchronize() {
                    println!("host-gone");
                    println!("the call failed {:.1} s after the start: {e}", start.elapsed().as_secs_f64());
                    std::io::stdout().flush()?;
                    std::process::exit(3);
                }
            }
            Err("the host never went away in 120 s".into())
        }
        Some("bench") => bench(&ctx, args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2000)),
        Some("ipc-export") => ipc_export(&ctx),
        Some("ipc-open") => ipc_open(
            &ctx,
            args.get(1).ok_or("ipc-open needs a handle")?,
            args.get(2).map(String::as_str) == Some("denied"),
            args.get(2).and_then(|a| a.strip_prefix("event=")),
        ),
        _ => Err("usage: cudarc_app device|copy|memset|streams|launch PTX|errors|threads|suite|hold|calls-until-gone|bench [ITERS]".into()),
    }
}
