//! The runtime under every exported entry point: error codes, the panic barrier, raw
//! argument conversion, logging, and the session with host-proxy (one connection per
//! process, shared by all threads under a lock; per-thread current contexts).

use crate::transport::{Bell, Connected, Mem};
use crate::window::Window;
use cudarc::driver::sys;
use idm_core::wire::Message;
use idm_core::{ChannelError, Client, WaitPolicy};
use idm_shm::ChannelLayout;
use rustc_hash::{FxHashMap, FxHashSet};
use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use vgpu_proto::generated as p;
use vgpu_proto::{AttachReply, Handle, ParamSlot};

/// `CUresult` as the C ABI returns it (kept an integer: any code the host sends is valid).
pub type CUresult = u32;

/// The CUDA error type and result, one vocabulary with the host (generated into the
/// protocol crate from the driver's bindings).
pub use vgpu_proto::{CuError, CuResult};

/// The error a failed exchange with host-proxy becomes: the host's own CUDA error, or
/// `CUDA_ERROR_UNKNOWN` (logged) when the connection itself failed.
pub fn host_error(e: ChannelError) -> CuError {
    match e {
        ChannelError::Remote { code, .. } => CuError::new(code),
        other => {
            log(Level::Error, format_args!("connection to host-proxy failed: {other}"));
            CuError::UNKNOWN
        }
    }
}

/// Runs an entry point's body: maps the result to a `CUresult` and stops a panic at the
/// C boundary (a bug in libvgpu becomes `CUDA_ERROR_UNKNOWN`, never a crash).
pub fn entry(name: &'static str, body: impl FnOnce() -> CuResult<()>) -> CUresult {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            log(Level::Trace, format_args!("{name} -> 0"));
            0
        }
        Ok(Err(e)) => {
            log(Level::Debug, format_args!("{name} -> {}", e.0));
            e.0.get()
        }
        Err(_) => {
            log(Level::Error, format_args!("{name}: internal error (panic); returning CUDA_ERROR_UNKNOWN"));
            CuError::UNKNOWN.0.get()
        }
    }
}

/// An entry point libvgpu does not provide: names itself once in the log.
pub fn unsupported(name: &'static str) -> CUresult {
    unsupported_err(name).0.get()
}

/// [`unsupported`] for a part of an entry point: names it once, `CUDA_ERROR_NOT_SUPPORTED`.
pub fn unsupported_err(what: &'static str) -> CuError {
    static SEEN: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let first = SEEN.lock().map(|mut s| s.get_or_insert_with(HashSet::new).insert(what)).unwrap_or(false);
    if first {
        log(Level::Warn, format_args!("{what} is not supported by libvgpu: returning CUDA_ERROR_NOT_SUPPORTED"));
    }
    CuError::NOT_SUPPORTED
}

// ---- logging ----------------------------------------------------------------------------

/// Log levels of `VGPU_LOG` (`error`, `warn` — the default —, `info`, `debug`, `trace`, `off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed.
    Error = 1,
    /// Something the application should know.
    Warn = 2,
    /// Session events.
    Info = 3,
    /// Every failing call.
    Debug = 4,
    /// Every call (`VGPU_LOG=trace`).
    Trace = 5,
}

fn max_level() -> u8 {
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("VGPU_LOG").as_deref().map(str::to_ascii_lowercase).as_deref() {
        Ok("off") => 0,
        Ok("error") => 1,
        Ok("info") => 3,
        Ok("debug") => 4,
        Ok("trace") => 5,
        _ => 2,
    })
}

/// What this process's session did, for the one-line summary `VGPU_LOG=info` (or more)
/// prints at exit; counted only when that level is on (no clock reads otherwise).
pub struct SessionStats {
    /// Requests that waited for a reply.
    pub calls: AtomicU64,
    /// Requests posted (no reply awaited).
    pub posts: AtomicU64,
    /// Nanoseconds spent waiting for the host's replies.
    pub wait_ns: AtomicU64,
    /// Bytes copied through the window's staging area, both ways.
    pub staged: AtomicU64,
}

/// This process's session counters.
pub static STATS: SessionStats = SessionStats {
    calls: AtomicU64::new(0),
    posts: AtomicU64::new(0),
    wait_ns: AtomicU64::new(0),
    staged: AtomicU64::new(0),
};

/// Whether the session is counted (`VGPU_LOG=info` or more).
pub fn counting() -> bool {
    max_level() >= Level::Info as u8
}

/// The exit summary's line.
pub fn summary_line(zone: u32) -> String {
    let calls = STATS.calls.load(Ordering::Relaxed);
    let posts = STATS.posts.load(Ordering::Relaxed);
    let wait = STATS.wait_ns.load(Ordering::Relaxed);
    let staged = STATS.staged.load(Ordering::Relaxed);
    let per = if calls > 0 { wait as f64 / calls as f64 / 1e3 } else { 0.0 };
    format!(
        "session summary: zone {zone}, {} requests ({calls} answered, {posts} posted), {:.1} MiB staged through the window, {:.3} ms waiting for the host ({per:.1} µs per answered request)",
        calls + posts,
        staged as f64 / (1u64 << 20) as f64,
        wait as f64 / 1e6,
    )
}

/// The zone number the summary names (set at attach).
static ZONE: AtomicU64 = AtomicU64::new(0);

extern "C" fn print_summary() {
    let zone = u32::try_from(ZONE.load(Ordering::Relaxed)).unwrap_or(0);
    let line = format!("libvgpu: {}\n", summary_line(zone));
    // SAFETY: a plain write(2) of a live buffer to standard error, at exit.
    let _ = unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

/// Writes one line to stderr if `level` is enabled.
pub fn log(level: Level, args: std::fmt::Arguments<'_>) {
    if level as u8 <= max_level() {
        eprintln!("libvgpu: {args}");
    }
}

// ---- raw arguments --------------------------------------------------------------------

/// An out-pointer argument, checked once.
pub struct Out<T>(Option<*mut T>);

impl<T> Out<T> {
    /// A pointer the call must write: null is `CUDA_ERROR_INVALID_VALUE`.
    ///
    /// # Safety
    /// A non-null `p` must be valid for one write of `T`.
    pub unsafe fn required(p: *mut T) -> CuResult<Out<T>> {
        if p.is_null() {
            Err(CuError::INVALID_VALUE)
        } else {
            Ok(Out(Some(p)))
        }
    }

    /// A pointer the call writes when it is not null.
    ///
    /// # Safety
    /// A non-null `p` must be valid for one write of `T`.
    pub unsafe fn optional(p: *mut T) -> CuResult<Out<T>> {
        Ok(Out((!p.is_null()).then_some(p)))
    }

    /// Stores the value (unaligned writes are allowed).
    pub fn set(self, value: T) {
        if let Some(p) = self.0 {
            // SAFETY: `p` is non-null and, by the constructor's contract, valid for a write.
            unsafe { p.write_unaligned(value) };
        }
    }
}

/// The handle value of an opaque CUDA object pointer (`CUstream`, `CUcontext`, …).
pub fn handle_of<T>(p: *mut T) -> Handle {
    Handle(p.addr() as u64)
}

/// The opaque object pointer that carries a handle value to the application.
pub fn handle_ptr<T>(h: Handle) -> *mut T {
    std::ptr::without_provenance_mut(h.0 as usize)
}

/// Longest name (kernel, global, file) accepted from the application.
pub const MAX_NAME: usize = 4096;

/// Copies a NUL-terminated string argument (null or longer than [`MAX_NAME`] is invalid).
///
/// # Safety
/// A non-null `p` must point to a NUL-terminated string.
pub unsafe fn c_string(p: *const c_char) -> CuResult<String> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    if s.count_bytes() > MAX_NAME {
        return Err(CuError::INVALID_VALUE);
    }
    s.to_str().map(str::to_owned).map_err(|_| CuError::INVALID_VALUE)
}

/// One row of the `cuGetProcAddress` table.
#[derive(Debug)]
pub struct ProcEntry {
    /// The name without its `_vN` suffix, as applications ask for it.
    pub base: &'static str,
    /// The CUDA version (e.g. 12050) that introduced this variant; 0 for always.
    pub since: u32,
    /// The exported symbol.
    pub symbol: &'static str,
    /// The entry point.
    pub ptr: *const (),
    /// A per-thread-default-stream variant (`…_ptsz`, `…_ptds`): what `cuGetProcAddress`
    /// returns when asked with `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
    pub per_thread: bool,
}

// SAFETY: `ptr` is the address of an exported function: immutable, valid in any thread.
unsafe impl Sync for ProcEntry {}

// ---- session ----------------------------------------------------------------------------

/// Where host-proxy listens when `VGPU_SOCKET` is not set (its embedded default).
pub const DEFAULT_SOCKET: &str = "/tmp/xen-vgpu/host-proxy.sock";
/// Size of each ring.
const RING_SIZE: usize = 1 << 20;
/// Largest frame negotiated.
const MAX_FRAME: u32 = 512 << 10;
/// Default size of the shared data window (`VGPU_WINDOW_MB`).
const DEFAULT_WINDOW_MB: usize = 256;
/// Default window over Xen: every page is a grant, and a domain has 32768 grant entries by
/// default (64 grant-table frames), so the window stays well under 128 MiB.
const DEFAULT_XEN_WINDOW_MB: usize = 64;

/// The connection and what is guarded with it.
pub struct Conn {
    client: Client<Mem, Bell, Bell>,
    buf: Vec<u8>,
    /// The context the host currently has current for this connection.
    host_ctx: Handle,
    /// The data window (staging area and pinned host memory).
    pub window: Window,
    /// Cached launch facts by function/kernel handle. (The maps of handles here hash with
    /// an unkeyed fast hash: the keys are the host's handles, on every launch's and context
    /// call's path.)
    pub layouts: FxHashMap<u64, std::sync::Arc<FuncInfo>>,
}

/// What a launch needs to know about a function, fetched once from the host.
#[derive(Debug)]
pub struct FuncInfo {
    /// Its parameters' offsets and sizes.
    pub slots: Vec<ParamSlot>,
    /// `CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK`.
    pub max_threads: i32,
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
    pub max_dynamic_smem: i32,
}

/// Primary context state as the driver reports it (`cuDevicePrimaryCtxGetState`).
#[derive(Debug, Default)]
pub struct PrimaryState {
    /// Outstanding `cuDevicePrimaryCtxRetain`s.
    pub retains: u32,
    /// Whether the primary context exists (retained since the last reset/last release).
    pub active: bool,
    /// Flags set with `cuDevicePrimaryCtxSetFlags` (reset when it goes inactive).
    pub flags: u32,
}

/// The process's session with host-proxy, made by `cuInit`.
pub struct Session {
    conn: Mutex<Conn>,
    /// What the host told us at attach (device facts, attributes, primary context).
    pub info: AttachReply,
    /// Live contexts (primary included), for checking handles given to context calls.
    pub contexts: Mutex<FxHashSet<u64>>,
    /// Contexts destroyed in this process (`CUDA_ERROR_CONTEXT_IS_DESTROYED` where the
    /// driver says so).
    pub destroyed: Mutex<FxHashSet<u64>>,
    /// The primary context's state.
    pub primary: Mutex<PrimaryState>,
}

static SESSION: OnceLock<Result<Session, CuError>> = OnceLock::new();

/// The session, or `CUDA_ERROR_NOT_INITIALIZED` before a successful `cuInit`.
pub fn session() -> CuResult<&'static Session> {
    match SESSION.get() {
        Some(Ok(s)) => Ok(s),
        Some(Err(e)) => Err(*e),
        None => Err(CuError::NOT_INITIALIZED),
    }
}

/// Connects (once per process; the outcome is kept, as the driver keeps `cuInit`'s).
pub fn init() -> CuResult<&'static Session> {
    match SESSION.get_or_init(connect) {
        Ok(s) => Ok(s),
        Err(e) => Err(*e),
    }
}

/// Which transport to use: `VGPU_TRANSPORT`, else Xen when this is a Xen guest and no
/// `VGPU_SOCKET` names a local host-proxy.
fn use_xen() -> bool {
    match std::env::var("VGPU_TRANSPORT").as_deref() {
        Ok("xen") => true,
        Ok(_) => false,
        Err(_) => std::env::var_os("VGPU_SOCKET").is_none() && std::path::Path::new(idm_xen::GntAlloc::PATH).exists(),
    }
}

/// How long a Xen frontend waits for host-proxy's backend to connect.
const XEN_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn connect() -> CuResult<Session> {
    let xen = use_xen();
    let socket = std::env::var("VGPU_SOCKET").unwrap_or_else(|_| DEFAULT_SOCKET.to_owned());
    let default_mb = if xen { DEFAULT_XEN_WINDOW_MB } else { DEFAULT_WINDOW_MB };
    let window_mb = std::env::var("VGPU_WINDOW_MB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(default_mb);
    let peer =
        if xen { "host-proxy over Xen (xenstore device/vgpu)".to_string() } else { format!("host-proxy at {socket}") };
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        let hint = if xen { "is host-proxy running in dom0?" } else { "set VGPU_SOCKET?" };
        log(Level::Error, format_args!("cannot reach {peer}: {what}: {e} ({hint})"));
        CuError::NO_DEVICE
    };
    let layout = ChannelLayout::new(RING_SIZE, window_mb << 20).map_err(|e| fail("window size", &e))?;
    let policy = WaitPolicy { spin_iters: 20_000, timeout: None };
    let Connected { channel, window, layout, mapping } = if xen {
        let mut xs = idm_xen::XenStore::open().map_err(|e| fail("xenstore", &e))?;
        let ep = idm_xen::channel::frontend_connect(&mut xs, "device/vgpu", layout, policy, XEN_CONNECT_TIMEOUT)
            .map_err(|e| fail("connect", &e))?;
        crate::transport::from_xen(ep)
    } else {
        idm_shm::connect(&socket, layout, policy).map_err(|e| fail("connect", &e))?.into()
    };
    let mut buf = vec![0u8; MAX_FRAME as usize];
    let mut client = Client::connect(channel, MAX_FRAME, &mut buf).map_err(|e| fail("hello", &e))?;
    let attach = client
        .call(&vgpu_proto::Attach { revision: vgpu_proto::VGPU_PROTOCOL_REVISION }, &mut buf)
        .and_then(|r| r.decode::<AttachReply>())
        .map_err(|e| match e {
            // host-proxy refused the session: a limit of the zone (its sessions, or no room
            // for one more context in its memory quota) — that error, not "no device".
            ChannelError::Remote { kind: idm_core::wire::proto::ErrorKind::Application, code } if code != 0 => {
                let name = crate::generated::ERRORS.iter().find(|e| e.0 == code).map(|e| e.1.to_string_lossy());
                let name = name.unwrap_or_else(|| "an unknown error".into());
                let why = match code {
                    800 => " (the zone has as many CUDA processes as its max_sessions)",
                    2 => " (no room for one more context in the zone's memory quota)",
                    _ => "",
                };
                log(Level::Error, format_args!("{peer} refused this process's session: {name}{why}"));
                CuError::new(code)
            }
            e => fail("attach", &e),
        })?;
    log(
        Level::Info,
        format_args!(
            "attached as zone {} to {:?} (driver {})",
            attach.zone,
            attach.device.name.as_str(),
            attach.device.driver_version
        ),
    );
    let window = Window::new(window, mapping, layout);
    let primary = attach.primary_ctx;
    if counting() {
        ZONE.store(u64::from(attach.zone), Ordering::Relaxed);
        // SAFETY: registers a function with no arguments that only reads atomics and writes
        // to standard error; it stays valid for the process's life (libvgpu is not unloaded).
        unsafe { libc::atexit(print_summary) };
    }
    Ok(Session {
        conn: Mutex::new(Conn { client, buf, host_ctx: primary, window, layouts: FxHashMap::default() }),
        contexts: Mutex::new(FxHashSet::from_iter([primary.0])),
        info: attach,
        destroyed: Mutex::new(FxHashSet::default()),
        primary: Mutex::new(PrimaryState::default()),
    })
}

impl Session {
    /// Locks the connection (a poisoned lock is still usable: the state is a ring).
    pub fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `ctx` names a live context.
    pub fn is_context(&self, ctx: Handle) -> bool {
        self.contexts.lock().map(|s| s.contains(&ctx.0)).unwrap_or(false)
    }
}

thread_local! {
    /// This thread's context stack (top = current), as the driver keeps per thread.
    static CTX_STACK: RefCell<Vec<Handle>> = const { RefCell::new(Vec::new()) };
}

/// The context stack of calls made after their thread's locals were destroyed: exit handlers
/// (C++ static destructors, `atexit`) run after the main thread's, and libraries call the
/// driver from them (cuFFT's `cufftDestroy` from PyTorch's plan cache). Such late calls share
/// this one stack instead of failing.
static LATE_CTX_STACK: Mutex<Vec<Handle>> = Mutex::new(Vec::new());

/// Runs `f` on this thread's context stack (or, once the thread's locals are gone, on
/// the late stack, `LATE_CTX_STACK`).
pub fn with_ctx_stack<R>(f: impl FnOnce(&mut Vec<Handle>) -> R) -> R {
    let mut f = Some(f);
    let done = CTX_STACK.try_with(|s| f.take().map(|f| f(&mut s.borrow_mut()))).ok().flatten();
    match (done, f.take()) {
        (Some(r), _) => r,
        (None, Some(f)) => f(&mut LATE_CTX_STACK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
        (None, None) => unreachable!("the closure ran but gave nothing back"),
    }
}

/// This thread's current context.
pub fn current_ctx() -> Option<Handle> {
    with_ctx_stack(|s| s.last().copied())
}

// ---- per-thread default streams ----------------------------------------------------------

thread_local! {
    /// Inside a `…_ptsz`/`…_ptds` entry point: the NULL stream is the per-thread stream.
    static PER_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This thread's per-thread stream in each context: (context, epoch) → host stream.
    static PTDS: RefCell<FxHashMap<u64, (u64, Handle)>> = RefCell::new(FxHashMap::default());
}

/// Bumped whenever a context goes away (destroy, primary reset or last release): every
/// thread's per-thread streams made before it are stale (the host destroyed them).
static CTX_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Marks that contexts (and their streams) went away.
pub fn contexts_changed() {
    CTX_EPOCH.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
}

/// Runs a per-thread-default-stream variant's body: its NULL stream is this thread's
/// per-thread stream.
pub fn per_thread<R>(f: impl FnOnce() -> R) -> R {
    // After the thread's locals are gone (exit handlers) the variant is the plain call.
    let before = PER_THREAD.try_with(|p| p.replace(true)).unwrap_or(false);
    let r = f();
    let _ = PER_THREAD.try_with(|p| p.set(before));
    r
}

/// `CU_STREAM_PER_THREAD`.
const STREAM_PER_THREAD: usize = 0x2;

/// A stream argument as the host knows it: `CU_STREAM_PER_THREAD`, and NULL inside a
/// per-thread variant, are the calling thread's own per-thread stream — a stream of its
/// own on the host, created on first use with the default flags (it synchronises with the
/// legacy stream and not with other threads' per-thread streams, as the driver's does).
/// Must be called without the connection's lock held (it may create the stream).
pub fn stream_arg(s: sys::CUstream) -> CuResult<Handle> {
    let raw = s.addr();
    if raw == STREAM_PER_THREAD || (raw == 0 && PER_THREAD.try_with(std::cell::Cell::get).unwrap_or(false)) {
        return per_thread_stream();
    }
    Ok(handle_of(s))
}

fn per_thread_stream() -> CuResult<Handle> {
    let ctx = current_ctx().ok_or(CuError::INVALID_CONTEXT)?;
    let epoch = CTX_EPOCH.load(std::sync::atomic::Ordering::Acquire);
    if let Some((e, h)) = PTDS.try_with(|m| m.borrow().get(&ctx.0).copied()).ok().flatten() {
        if e == epoch {
            return Ok(h);
        }
    }
    let r: p::CuStreamCreateReply = call(&p::CuStreamCreate { flags: 0 }, true)?;
    // Not kept once the thread's locals are gone (exit handlers): made again if asked again.
    let _ = PTDS.try_with(|m| m.borrow_mut().insert(ctx.0, (epoch, r.ph_stream)));
    Ok(r.ph_stream)
}

impl Conn {
    /// Runs `f` with a temporary window block of `len` bytes (its descriptor), freed after
    /// (module images, link inputs and linked images travel in one).
    pub fn with_block<R>(
        &mut self,
        len: u64,
        f: impl FnOnce(&mut Conn, idm_core::BulkRef) -> CuResult<R>,
    ) -> CuResult<R> {
        let block = self.window.alloc(len, 0)?;
        let r = self.window.desc_of(block, len).and_then(|desc| f(self, desc));
        let _ = self.window.free(block);
        r
    }

    /// Makes `ctx` the host's current context for what follows on this connection.
    pub fn switch_to(&mut self, ctx: Handle) -> CuResult<()> {
        if self.host_ctx != ctx {
            self.client.post(&p::CtxSetCurrent { ctx }, &mut self.buf).map_err(host_error)?;
            self.host_ctx = ctx;
        }
        Ok(())
    }

    /// Makes the calling thread's current context the host's (no context: error).
    pub fn enter_current(&mut self) -> CuResult<()> {
        let ctx = current_ctx().ok_or(CuError::INVALID_CONTEXT)?;
        self.switch_to(ctx)
    }

    /// Records that the host's current context changed by itself (create, destroy).
    pub fn host_switched(&mut self, ctx: Handle) {
        self.host_ctx = ctx;
    }

    /// The context the host has current.
    pub fn host_ctx(&self) -> Handle {
        self.host_ctx
    }

    /// A synchronous request. An earlier asynchronous request's error, reported with
    /// this reply, is returned instead (as the driver reports it at the next call).
    pub fn call<Q: Message, R: Message>(&mut self, req: &Q) -> CuResult<R> {
        let started = counting().then(std::time::Instant::now);
        let reply = self.client.call(req, &mut self.buf);
        if let Some(t) = started {
            STATS.calls.fetch_add(1, Ordering::Relaxed);
            STATS.wait_ns.fetch_add(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        let reply = reply.map_err(host_error)?;
        let notice = reply.notice();
        let result = match reply.deferred_error() {
            Some(code) => Err(CuError::new(code)),
            None => reply.decode::<R>().map_err(host_error),
        };
        if notice {
            self.fetch_device_output();
        }
        result
    }

    /// The host holds device output (kernels' `printf`, failed asserts): fetch it and write
    /// it to this process's stdout and stderr streams, where the driver writes it natively
    /// (so it interleaves with the program's own stdio output as it would there).
    fn fetch_device_output(&mut self) {
        loop {
            let r = self.client.call(&p::TakeDeviceOutput {}, &mut self.buf);
            let (more, taken) = match r {
                Ok(reply) => (reply.notice(), reply.decode::<p::TakeDeviceOutputReply>()),
                Err(e) => {
                    log(Level::Warn, format_args!("could not fetch device output: {e}"));
                    return;
                }
            };
            let Ok(t) = taken else { return };
            write_stdio(&t.stdout, &t.stderr);
            if t.dropped > 0 {
                log(Level::Warn, format_args!("{} bytes of device output were dropped by the host", t.dropped));
            }
            if !more {
                return;
            }
        }
    }

    /// An asynchronous request (no reply; its error surfaces at a later call). While a
    /// stream capture of this process is open it waits for the reply instead, so that what
    /// cannot be captured is refused at the call that asked for it, as the driver does
    /// (capture is a one-off cost; replays are one posted request each).
    pub fn post<Q: Message>(&mut self, req: &Q) -> CuResult<()> {
        if captures_open() {
            return self.call::<Q, vgpu_proto::Done>(req).map(drop);
        }
        self.client.post(req, &mut self.buf).map_err(host_error)?;
        if counting() {
            STATS.posts.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The launch facts of a function or kernel (fetched once, then cached).
    pub fn func_info(&mut self, func: Handle) -> CuResult<std::sync::Arc<FuncInfo>> {
        if let Some(l) = self.layouts.get(&func.0) {
            return Ok(l.clone());
        }
        let r: p::FuncParamLayoutReply = self.call(&p::FuncParamLayout { func })?;
        let info = std::sync::Arc::new(FuncInfo {
            slots: r.slots,
            max_threads: r.max_threads,
            max_dynamic_smem: r.max_dynamic_smem,
        });
        self.layouts.insert(func.0, info.clone());
        Ok(info)
    }
}

extern "C" {
    /// The C library's stdout and stderr streams (the program's).
    #[link_name = "stdout"]
    static mut C_STDOUT: *mut libc::FILE;
    #[link_name = "stderr"]
    static mut C_STDERR: *mut libc::FILE;
}

/// Writes device output through the C library's streams, as the driver does natively.
fn write_stdio(out: &[u8], err: &[u8]) {
    // SAFETY: the C library initialises its standard streams before any code of this
    // library runs; they are only read here.
    let c_stdout = unsafe { C_STDOUT };
    // SAFETY: as above.
    let c_stderr = unsafe { C_STDERR };
    for (bytes, file) in [(out, c_stdout), (err, c_stderr)] {
        if bytes.is_empty() {
            continue;
        }
        // SAFETY: a live stream and `bytes.len()` readable bytes.
        unsafe { libc::fwrite(bytes.as_ptr().cast(), 1, bytes.len(), file) };
    }
}

/// A forwarded call: in the calling thread's current context when `needs_ctx`.
pub fn call<Q: Message, R: Message>(req: &Q, needs_ctx: bool) -> CuResult<R> {
    let s = session()?;
    let mut c = s.lock();
    if needs_ctx {
        c.enter_current()?;
    }
    c.call(req)
}

/// Drops the cached launch facts of every function (the table marks the calls that need
/// it: a module unloaded, a function attribute set); they are fetched again on next use.
pub fn forget_launch_facts() {
    if let Ok(s) = session() {
        s.lock().layouts.clear();
    }
}

/// Stream captures this process began and has not ended (`cuStreamBeginCapture` …
/// `cuStreamEndCapture`). While none is open no stream of the process can be capturing (a
/// stream joins a capture only through an event recorded in one), so capture queries are
/// answered in the guest.
static CAPTURES_OPEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Whether a capture of this process may be open.
pub fn captures_open() -> bool {
    CAPTURES_OPEN.load(std::sync::atomic::Ordering::Acquire) > 0
}

/// Counts a capture begun (`true`) or ended (`false`).
pub fn note_capture(begun: bool) {
    use std::sync::atomic::Ordering;
    if begun {
        CAPTURES_OPEN.fetch_add(1, Ordering::AcqRel);
    } else {
        let _ = CAPTURES_OPEN.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// A forwarded asynchronous request.
pub fn post<Q: Message>(req: &Q, needs_ctx: bool) -> CuResult<()> {
    let s = session()?;
    let mut c = s.lock();
    if needs_ctx {
        c.enter_current()?;
    }
    c.post(req)
}
