//! The driver's private export tables (`cuGetExportTable`), served in the guest.
//!
//! NVIDIA's libcudart (and the libraries built on it: cuBLAS, cuFFT, cuDNN, NVRTC) asks
//! the driver for tables of function pointers keyed by a 16-byte id before anything else;
//! without them `cudaGetDeviceCount` fails with `cudaErrorInvalidValue`. The tables are
//! undocumented. What each slot does was taken from the public record (ZLUDA's `dark_api`
//! notes and other replacement drivers' write-ups) and from traces of the real driver
//! (`tools/cuda-trace`, `device/cuda-trace.sh`); the code here is our own.
//!
//! Design:
//! - Every table is a `static` array of pointer-sized words. Slot 0 of most tables holds
//!   the table's size in bytes (the runtime checks it); the context-local-storage table
//!   has a function there.
//! - Every slot we do not implement holds a *trap*: a distinct function per (table, slot)
//!   that names itself once in the log (`VGPU_LOG=warn`, the default) and returns
//!   `CUDA_ERROR_NOT_SUPPORTED`, so an unknown slot becomes data instead of a jump through
//!   a null pointer.
//! - What has a local answer is answered here: the primary context's handle, context-local
//!   storage (kept per context; destructors run when the context is destroyed or the
//!   primary context is reset or released for the last time), the tools hooks' buffers,
//!   the context checks, and the integrity check (an HMAC-MD2 over the same driver
//!   version, device UUID and PCI ids that libvgpu reports, so it matches what the runtime
//!   computes from those answers). Module loading from fatbin wrappers goes to the host
//!   like `cuModuleLoadData`.
//! - An unknown table id gets `CUDA_ERROR_INVALID_VALUE`, the real driver's answer (driver
//!   580, measured by `tests/c/errors_misc.c`), and is named once in the log; the runtime
//!   then takes its ordinary path.
//!
//! Every slot function is `extern "C"` and catches panics (`rt::entry`): nothing unwinds
//! into the runtime.

use crate::rt::{self, handle_of, handle_ptr, session, CUresult, CuError, CuResult, Level, Out};
use cudarc::driver::sys;
use std::collections::HashMap;
use std::ffi::{c_uint, c_void};
use std::sync::Mutex;
use vgpu_proto::generated as p;
use vgpu_proto::{AttrValue, Handle};

/// One table: pointer-sized words (sizes or function addresses).
#[repr(transparent)]
pub struct Table<const N: usize>([*const c_void; N]);

// SAFETY: the tables are immutable after construction and hold only code addresses and
// integers; sharing them between threads cannot race.
unsafe impl<const N: usize> Sync for Table<N> {}

impl<const N: usize> Table<N> {
    fn as_ptr(&'static self) -> *const c_void {
        self.0.as_ptr().cast()
    }
}

/// A table's byte size as its slot 0 holds it.
const fn size_word<const N: usize>() -> *const c_void {
    std::ptr::without_provenance(N * size_of::<usize>())
}

/// A slot nobody has implemented: names (table, slot) once and returns
/// `CUDA_ERROR_NOT_SUPPORTED`. The arguments are not read (their number is unknown).
extern "C" fn trap<const T: usize, const S: usize>() -> CUresult {
    static SEEN: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
    let first = SEEN
        .lock()
        .map(|mut seen| {
            let new = !seen.contains(&(T, S));
            if new {
                seen.push((T, S));
            }
            new
        })
        .unwrap_or(false);
    if first {
        rt::log(
            Level::Warn,
            format_args!(
                "export table {} slot {S} called: not implemented by libvgpu, returning CUDA_ERROR_NOT_SUPPORTED",
                TABLES[T].name
            ),
        );
    }
    CuError::NOT_SUPPORTED.0.get()
}

macro_rules! traps {
    ($t:expr; $($s:literal)*) => { [$(trap::<{ $t }, $s> as *const c_void),*] };
}

/// Table indices into [`TABLES`] (used by the traps' names).
const T_CUDART: usize = 0;
const T_TOOLS_TLS: usize = 1;
const T_CALLBACK_HOOKS: usize = 2;
const T_CLS: usize = 3;
const T_CTX_BYPASS: usize = 4;
const T_HEAP: usize = 5;
const T_DEVICE_EXT: usize = 6;
const T_INTEGRITY: usize = 7;
const T_CTX_CHECKS: usize = 8;
const T_CTX_QUERY: usize = 9;
const T_LT_1734: usize = 10;
const T_FFT_6E16: usize = 11;

static CUDART_INTERFACE: Table<13> = Table({
    let mut t = traps!(T_CUDART; 0 1 2 3 4 5 6 7 8 9 10 11 12);
    t[0] = size_word::<13>();
    t[1] = cudart_get_module_from_cubin as *const c_void;
    t[2] = cudart_primary_context as *const c_void;
    t[6] = cudart_get_module_from_cubin_ext1 as *const c_void;
    t[7] = cudart_fn7 as *const c_void;
    t[8] = cudart_get_module_from_cubin_ext2 as *const c_void;
    t[12] = cudart_load_compilers as *const c_void;
    t
});

/// Three slots, as the real driver's (driver 580). The runtime calls none of them;
/// cuBLASLt calls slot 2 before each use of CONTEXT_QUERY and passes what it wrote there to
/// CONTEXT_QUERY's slots (traced on the H200). Measured against the real driver
/// (`device/probes/export_table_probe.c`): slot 1 `(out)` answers 0 and writes nothing;
/// slot 2 `(out)` answers 0 and writes the address of a per-thread block of the driver's.
/// libvgpu writes the address of a per-thread block of its own, which CONTEXT_QUERY reads
/// as "this thread's current context".
static TOOLS_TLS: Table<3> = Table({
    let mut t = traps!(T_TOOLS_TLS; 0 1 2);
    t[0] = size_word::<3>();
    t[1] = tools_tls_nothing as *const c_void;
    t[2] = tools_tls_thread_state as *const c_void;
    t
});

/// {21318C60-9714-3248-8CA6-41FF7324C8F2}: 93 slots in driver 580 (size word 744). The
/// runtime does not ask for it; cuBLASLt 13.1 does, before its first heuristics query, and
/// calls slots 4, 51 and 39 (tools/cuda-trace on the H200). What each does was measured
/// against the real driver by `device/probes/export_table_probe.c` (there is no public
/// record of their meaning):
/// - slot 4 `(ctx, *mut u64) -> 0`: writes 1 for a context, 0 for NULL;
/// - slot 51 `(ctx, NULL, *mut *const obj)`: an object of the context; NULL ctx -> 400;
/// - slot 39 `(ctx, obj, *mut u64)`: a value of the context (13 for the H200's primary
///   context); NULL obj -> 1.
///
/// Slot 51's object is libvgpu's own (the context it was made for); slot 39's value comes
/// from the host, which asks its driver the same two questions for the zone's context.
static CTX_QUERY: Table<93> = Table({
    let mut t = traps!(T_CTX_QUERY; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92);
    t[0] = size_word::<93>();
    t[4] = ctx_query_is_context as *const c_void;
    t[39] = ctx_query_value as *const c_void;
    t[51] = ctx_query_object as *const c_void;
    t
});

/// {1734DC26-800D-4745-8726-C0F1E7DD8BCA}: 17 slots in driver 580 (size word 136). cuBLASLt
/// 13.1 asks for it before its first bf16 matmul and calls slots 4 and 13 (tools/cuda-trace
/// on the H200; their meaning is not known). Refusing the table makes that cuBLASLt crash;
/// served, every slot answers `CUDA_ERROR_NOT_SUPPORTED` (named in the log) — an
/// experiment recorded in docs/CONFORMANCE.md, not an implementation.
static LT_1734: Table<17> = Table({
    let mut t = traps!(T_LT_1734; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
    t[0] = size_word::<17>();
    t
});

/// {6E163FBE-B958-444D-835C-E182AFF1991E}: 99 slots in driver 580 (size word 792). cuFFT
/// (through PyTorch 2.11's `torch.fft`) asks for it and fails with `CUFFT_INTERNAL_ERROR`
/// when it is refused; it calls slot 7 after each module it loads ([`fft_slot7`]; tools/
/// cuda-trace on the H200, `device/probes/torch_fft.py`). The other slots answer
/// `CUDA_ERROR_NOT_SUPPORTED` (named in the log).
static FFT_6E16: Table<99> = Table({
    let mut t = traps!(T_FFT_6E16; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98);
    t[0] = size_word::<99>();
    t[7] = fft_slot7 as *const c_void;
    t
});

static CALLBACK_HOOKS: Table<7> = Table({
    let mut t = traps!(T_CALLBACK_HOOKS; 0 1 2 3 4 5 6);
    t[0] = size_word::<7>();
    t[2] = hooks_buffer1 as *const c_void;
    t[6] = hooks_buffer2 as *const c_void;
    t
});

static CONTEXT_LOCAL_STORAGE: Table<4> = Table({
    let mut t = traps!(T_CLS; 0 1 2 3);
    t[0] = cls_put as *const c_void;
    t[1] = cls_delete as *const c_void;
    t[2] = cls_get as *const c_void;
    t
});

static CTX_CREATE_BYPASS: Table<2> = Table({
    let mut t = traps!(T_CTX_BYPASS; 0 1);
    t[0] = size_word::<2>();
    t
});

static HEAP_ACCESS: Table<3> = Table({
    let mut t = traps!(T_HEAP; 0 1 2);
    t[0] = size_word::<3>();
    t
});

static DEVICE_EXTENDED_RT: Table<26> = Table({
    let mut t = traps!(T_DEVICE_EXT; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25);
    t[0] = size_word::<26>();
    t
});

static INTEGRITY_CHECK: Table<3> = Table({
    let mut t = traps!(T_INTEGRITY; 0 1 2);
    t[0] = size_word::<3>();
    t[1] = integrity_check as *const c_void;
    t
});

/// Fifteen slots, as the real driver's (driver 580; the runtime calls [2] and [3]).
static CONTEXT_CHECKS: Table<15> = Table({
    let mut t = traps!(T_CTX_CHECKS; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14);
    t[0] = size_word::<15>();
    t[2] = context_check as *const c_void;
    t[3] = context_check_flags as *const c_void;
    t
});

/// A known table: its id, a name for the log, and where it is.
struct Known {
    id: [u8; 16],
    name: &'static str,
    table: fn() -> *const c_void,
}

/// Every table libvgpu serves, in the order of the `T_*` indices.
static TABLES: [Known; 12] = [
    Known {
        id: uuid(0x6bd5fb6c, 0x5bf4, 0xe74a, 0x8987_d93912fd9df9),
        name: "CUDART_INTERFACE",
        table: || CUDART_INTERFACE.as_ptr(),
    },
    Known {
        id: uuid(0x42d85a81, 0x23f6, 0xcb47, 0x8298_f6e78a3aecdc),
        name: "TOOLS_TLS",
        table: || TOOLS_TLS.as_ptr(),
    },
    Known {
        id: uuid(0xa094798c, 0x2e74, 0x2e74, 0x93f2_0800200c0a66),
        name: "TOOLS_RUNTIME_CALLBACK_HOOKS",
        table: || CALLBACK_HOOKS.as_ptr(),
    },
    Known {
        id: uuid(0xc693336e, 0x1121, 0xdf11, 0xa8c3_68f355d89593),
        name: "CONTEXT_LOCAL_STORAGE",
        table: || CONTEXT_LOCAL_STORAGE.as_ptr(),
    },
    Known {
        id: uuid(0x0ca50b8c, 0x1004, 0x929a, 0x89a7_d0df10e77286),
        name: "CTX_CREATE_BYPASS",
        table: || CTX_CREATE_BYPASS.as_ptr(),
    },
    Known {
        id: uuid(0x195bcbf4, 0xd67d, 0x024a, 0xacc5_1d29cea631ae),
        name: "HEAP_ACCESS",
        table: || HEAP_ACCESS.as_ptr(),
    },
    Known {
        id: uuid(0xb10541e1, 0xf7c7, 0xc74a, 0x9f64_f223be99f1e2),
        name: "DEVICE_EXTENDED_RT",
        table: || DEVICE_EXTENDED_RT.as_ptr(),
    },
    Known {
        id: uuid(0xd4082055, 0xbde6, 0x704b, 0x8d34_ba123c66e1f2),
        name: "INTEGRITY_CHECK",
        table: || INTEGRITY_CHECK.as_ptr(),
    },
    Known {
        id: uuid(0x263e8860, 0x7cd2, 0x6143, 0x92f6_bbd5006dfa7e),
        name: "CONTEXT_CHECKS",
        table: || CONTEXT_CHECKS.as_ptr(),
    },
    Known {
        id: uuid(0x21318c60, 0x9714, 0x3248, 0x8ca6_41ff7324c8f2),
        name: "CONTEXT_QUERY",
        table: || CTX_QUERY.as_ptr(),
    },
    Known {
        id: uuid(0x1734dc26, 0x800d, 0x4745, 0x8726_c0f1e7dd8bca),
        name: "LT_1734DC26",
        table: || LT_1734.as_ptr(),
    },
    Known {
        id: uuid(0x6e163fbe, 0xb958, 0x444d, 0x835c_e182aff1991e),
        name: "FFT_6E163FBE",
        table: || FFT_6E16.as_ptr(),
    },
];

/// Ids the runtime probes for and handles the absence of: refused like unknown ids, but
/// without a warning. f8cff951… is asked for first by libcudart 12.x/13.x (success would
/// make it skip its usual bootstrap through CUDART_INTERFACE); dd9e98a4… is the Windows
/// hybrid-runtime loader.
static PROBED: [([u8; 16], &str); 2] = [
    (uuid(0xf8cff951, 0x2146, 0x8b4e, 0xb9e2_fb469e7c0dd9), "RUNTIME_BOOTSTRAP_BYPASS"),
    (uuid(0xdd9e98a4, 0xf410, 0x4844, 0x99b0_e2aeb7b432b5), "HYBRID_CUDART"),
];

/// The id's bytes in memory order, written as the `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}`
/// groups read left to right.
const fn uuid(a: u32, b: u16, c: u16, d: u64) -> [u8; 16] {
    let a = a.to_be_bytes();
    let b = b.to_be_bytes();
    let c = c.to_be_bytes();
    let d = d.to_be_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]
}

/// `{6BD5FB6C-5BF4-E74A-8987-D93912FD9DF9}` form of an id, for the log.
fn id_text(id: &[u8; 16]) -> String {
    let h: Vec<String> = id.iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{{{}-{}-{}-{}-{}}}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

/// `cuGetExportTable`: callable before `cuInit` (the runtime asks first).
pub unsafe fn cu_get_export_table(table: *mut *const c_void, id: *const sys::CUuuid) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(table) }?;
    if id.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: a non-null id points to a CUuuid (16 bytes).
    let id = unsafe { id.read_unaligned() }.bytes.map(|b| b as u8);
    if let Some(k) = TABLES.iter().find(|k| k.id == id) {
        rt::log(Level::Debug, format_args!("cuGetExportTable: {} {}", k.name, id_text(&id)));
        out.set((k.table)());
        return Ok(());
    }
    out.set(std::ptr::null());
    if let Some((_, name)) = PROBED.iter().find(|(p, _)| *p == id) {
        rt::log(Level::Debug, format_args!("cuGetExportTable: {name} {} not provided", id_text(&id)));
    } else {
        unknown_table(&id);
    }
    Err(CuError::INVALID_VALUE)
}

/// Names an unknown table id once.
fn unknown_table(id: &[u8; 16]) {
    static SEEN: Mutex<Vec<[u8; 16]>> = Mutex::new(Vec::new());
    let first = SEEN
        .lock()
        .map(|mut s| {
            let new = !s.contains(id);
            if new {
                s.push(*id);
            }
            new
        })
        .unwrap_or(false);
    if first {
        rt::log(
            Level::Warn,
            format_args!(
                "cuGetExportTable: unknown table {}: not provided by libvgpu (CUDA_ERROR_INVALID_VALUE)",
                id_text(id)
            ),
        );
    }
}

/// Runs a slot's body as an entry point (panics stopped, result as a `CUresult`).
fn slot(name: &'static str, body: impl FnOnce() -> CuResult<()>) -> CUresult {
    rt::entry(name, body)
}

// ---- CUDART_INTERFACE ------------------------------------------------------------------

/// Slot 1: loads a module from a fatbin wrapper (`__fatBinC_Wrapper_t`).
unsafe extern "C" fn cudart_get_module_from_cubin(module: *mut sys::CUmodule, wrapper: *const c_void) -> CUresult {
    // SAFETY: the runtime's contract: the wrapper describes a fatbin in its memory.
    slot("CUDART_INTERFACE[1] (module from fatbin)", || unsafe { super::cu_module_load_data(module, wrapper) })
}

/// Slot 6: as slot 1, with three more arguments (seen null/zero in the traces; anything
/// else is refused so that a difference shows instead of being ignored).
unsafe extern "C" fn cudart_get_module_from_cubin_ext1(
    module: *mut sys::CUmodule,
    wrapper: *const c_void,
    arg3: *mut c_void,
    arg4: *mut c_void,
    arg5: c_uint,
) -> CUresult {
    slot("CUDART_INTERFACE[6] (module from fatbin)", || {
        extra_args_unused(6, arg3, arg4, arg5)?;
        // SAFETY: as slot 1.
        unsafe { super::cu_module_load_data(module, wrapper) }
    })
}

/// Slot 8: loads a module from a fatbin header (not its wrapper).
unsafe extern "C" fn cudart_get_module_from_cubin_ext2(
    fatbin: *const c_void,
    module: *mut sys::CUmodule,
    arg3: *mut c_void,
    arg4: *mut c_void,
    arg5: c_uint,
) -> CUresult {
    slot("CUDART_INTERFACE[8] (module from fatbin)", || {
        extra_args_unused(8, arg3, arg4, arg5)?;
        // SAFETY: the runtime's contract: a fatbin image in its memory.
        unsafe { super::cu_module_load_data(module, fatbin) }
    })
}

fn extra_args_unused(slot: usize, arg3: *mut c_void, arg4: *mut c_void, arg5: c_uint) -> CuResult<()> {
    if arg3.is_null() && arg4.is_null() && arg5 == 0 {
        return Ok(());
    }
    rt::log(
        Level::Warn,
        format_args!("CUDART_INTERFACE[{slot}]: extra arguments {arg3:p} {arg4:p} {arg5} are not supported"),
    );
    Err(CuError::NOT_SUPPORTED)
}

/// Slot 2: the device's primary context, without retaining it (the runtime retains it
/// with `cuDevicePrimaryCtxRetain` when it starts using it).
unsafe extern "C" fn cudart_primary_context(pctx: *mut sys::CUcontext, dev: sys::CUdevice) -> CUresult {
    slot("CUDART_INTERFACE[2] (primary context)", || {
        // SAFETY: the runtime's contract: a non-null out-pointer is valid for one write.
        let out = unsafe { Out::required(pctx) }?;
        let s = rt::init()?;
        if dev != 0 {
            return Err(CuError::INVALID_DEVICE);
        }
        out.set(handle_ptr(s.info.primary_ctx));
        Ok(())
    })
}

/// Slot 7: called with one word during start-up; it has no effect the program can see.
extern "C" fn cudart_fn7(_arg: usize) {}

/// Slot 12: loads the driver's PTX compiler and friends; the host does that by itself.
extern "C" fn cudart_load_compilers() -> CUresult {
    0
}

// ---- TOOLS_RUNTIME_CALLBACK_HOOKS ------------------------------------------------------

/// Scratch areas the runtime's tool-callback code writes into; no tool reads them here.
struct HookBuffer<const N: usize>(std::cell::UnsafeCell<[u64; N]>);
// SAFETY: the buffers are only ever handed out as raw pointers; libvgpu never reads or
// writes them itself, so there is nothing for it to race on.
unsafe impl<const N: usize> Sync for HookBuffer<N> {}

/// Sizes as reported (the runtime's unit is not known for certain, so each buffer is
/// eight times larger than its reported size in bytes would need).
const HOOK1_LEN: usize = 1024;
const HOOK2_LEN: usize = 14;
static HOOK1: HookBuffer<HOOK1_LEN> = HookBuffer(std::cell::UnsafeCell::new([0; HOOK1_LEN]));
static HOOK2: HookBuffer<HOOK2_LEN> = HookBuffer(std::cell::UnsafeCell::new([0; HOOK2_LEN]));

/// TOOLS_TLS slot 1: answers 0, writes nothing (as the driver).
extern "C" fn tools_tls_nothing(arg: *const c_void) -> usize {
    rt::log(Level::Trace, format_args!("TOOLS_TLS[1]({arg:p}) -> 0"));
    0
}

thread_local! {
    /// The block whose address TOOLS_TLS slot 2 hands out: real, readable memory (a caller
    /// may look into the driver's), never written, unique per thread for its lifetime.
    static THREAD_STATE: [u64; 8] = const { [0; 8] };
}

/// The calling thread's block (see [`THREAD_STATE`]).
fn thread_state() -> *const c_void {
    // Exit handlers run after the thread's locals are destroyed: they share one block.
    static LATE_THREAD_STATE: [u64; 8] = [0; 8];
    THREAD_STATE.try_with(|b| b.as_ptr().cast()).unwrap_or(LATE_THREAD_STATE.as_ptr().cast())
}

/// TOOLS_TLS slot 2: the calling thread's state block.
unsafe extern "C" fn tools_tls_thread_state(out: *mut *const c_void) -> usize {
    rt::log(Level::Trace, format_args!("TOOLS_TLS[2]({out:p})"));
    if !out.is_null() {
        // SAFETY: the caller's contract (traced, measured): a non-null out-pointer valid
        // for one pointer-sized write.
        unsafe { out.write_unaligned(thread_state()) };
    }
    0
}

/// Slot 2: a buffer and its size.
unsafe extern "C" fn hooks_buffer1(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: the runtime's contract: two out-pointers, each valid for one write or null.
    unsafe { hand_out(ptr, size, HOOK1.0.get().cast(), HOOK1_LEN) }
}

/// Slot 6: a second buffer and its size.
unsafe extern "C" fn hooks_buffer2(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: as slot 2.
    unsafe { hand_out(ptr, size, HOOK2.0.get().cast(), HOOK2_LEN) }
}

/// # Safety
/// Each non-null pointer must be valid for one write.
unsafe fn hand_out(ptr: *mut *mut c_void, size: *mut usize, buf: *mut c_void, len: usize) {
    if !ptr.is_null() {
        // SAFETY: the caller's contract.
        unsafe { ptr.write_unaligned(buf) };
    }
    if !size.is_null() {
        // SAFETY: the caller's contract.
        unsafe { size.write_unaligned(len) };
    }
}

// ---- CONTEXT_LOCAL_STORAGE -------------------------------------------------------------

/// A destructor the runtime registers with a value: `(context, key, value)`.
type ClsDtor = unsafe extern "C" fn(sys::CUcontext, *mut c_void, *mut c_void);

/// One stored value. Key and value are kept as the pointers the runtime gave (not as
/// integers), so that the ones handed back to it are the same pointers, provenance and all.
struct ClsEntry {
    key: *mut c_void,
    value: *mut c_void,
    dtor: Option<ClsDtor>,
}

// SAFETY: libvgpu never dereferences `key` or `value`; it only hands them back to the
// runtime (from whichever thread asks, as the driver does), which owns what they point to.
unsafe impl Send for ClsEntry {}

/// Values by (context handle, key).
static CLS: Mutex<Option<HashMap<(u64, usize), ClsEntry>>> = Mutex::new(None);

fn with_cls<R>(f: impl FnOnce(&mut HashMap<(u64, usize), ClsEntry>) -> R) -> R {
    let mut g = CLS.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

/// The context a CLS call names: the given one (must be live), else the calling
/// thread's current context. With neither, `CUDA_ERROR_INVALID_CONTEXT`: the runtime asks
/// with NULL on each new thread and binds its context there when the answer is an error
/// (falling back to the primary context here made it skip that, and every call of that
/// thread failed for want of a current context).
fn cls_context(ctx: sys::CUcontext) -> CuResult<Handle> {
    let s = session()?;
    if !ctx.is_null() {
        let h = handle_of(ctx);
        return if s.is_context(h) { Ok(h) } else { Err(CuError::INVALID_CONTEXT) };
    }
    rt::current_ctx().ok_or(CuError::INVALID_CONTEXT)
}

/// Slot 0: stores `value` under `key` in the context, with a destructor.
unsafe extern "C" fn cls_put(
    ctx: sys::CUcontext,
    key: *mut c_void,
    value: *mut c_void,
    dtor: Option<ClsDtor>,
) -> CUresult {
    slot("CONTEXT_LOCAL_STORAGE[0] (put)", || {
        let h = cls_context(ctx)?;
        with_cls(|m| m.insert((h.0, key.addr()), ClsEntry { key, value, dtor }));
        Ok(())
    })
}

/// Slot 1: deletes `key`'s value (without running its destructor).
unsafe extern "C" fn cls_delete(ctx: sys::CUcontext, key: *mut c_void) -> CUresult {
    slot("CONTEXT_LOCAL_STORAGE[1] (delete)", || {
        let h = cls_context(ctx)?;
        with_cls(|m| m.remove(&(h.0, key.addr())));
        Ok(())
    })
}

/// Slot 2: the value under `key`; `CUDA_ERROR_INVALID_HANDLE` when there is none.
unsafe extern "C" fn cls_get(value: *mut *mut c_void, ctx: sys::CUcontext, key: *mut c_void) -> CUresult {
    slot("CONTEXT_LOCAL_STORAGE[2] (get)", || {
        // SAFETY: the runtime's contract: a non-null out-pointer is valid for one write.
        let out = unsafe { Out::required(value) }?;
        let h = cls_context(ctx)?;
        match with_cls(|m| m.get(&(h.0, key.addr())).map(|e| e.value)) {
            Some(v) => {
                out.set(v);
                Ok(())
            }
            None => Err(CuError::INVALID_HANDLE),
        }
    })
}

/// The context `ctx` is going away (destroyed, or the primary context reset or released
/// for the last time): runs the destructors of its stored values, with no lock of
/// libvgpu's held (they call back into the driver), and forgets them.
pub fn context_gone(ctx: Handle) {
    rt::contexts_changed();
    let gone: Vec<ClsEntry> = with_cls(|m| {
        let keys: Vec<(u64, usize)> = m.keys().filter(|(c, _)| *c == ctx.0).copied().collect();
        keys.into_iter().filter_map(|k| m.remove(&k)).collect()
    });
    for e in gone {
        if let Some(dtor) = e.dtor {
            // SAFETY: the runtime registered this destructor for exactly this call: the
            // context it stored the value in, the key and the value.
            unsafe { dtor(handle_ptr(ctx), e.key, e.value) };
        }
    }
}

// ---- CONTEXT_CHECKS --------------------------------------------------------------------

/// Slot 2: reports no special condition on the context (flags 0). The third argument is
/// left alone: it is not an out-pointer of pointer size (in cuBLAS's start-up it is the
/// address 4 bytes above `flags`, traced on the H200, so an 8-byte write there overwrote
/// the caller's next local; LUPINE's cuBLAS fix found the same).
unsafe extern "C" fn context_check(_ctx: sys::CUcontext, flags: *mut u32, detail: *mut c_void) -> CUresult {
    rt::log(
        Level::Trace,
        format_args!("CONTEXT_CHECKS[2]({_ctx:p}, {flags:p}, {detail:p}) current {:?}", rt::current_ctx()),
    );
    if !flags.is_null() {
        // SAFETY: the runtime's contract: a non-null out-pointer is valid for one write.
        unsafe { flags.write_unaligned(0) };
    }
    0
}

/// Slot 3: global flags; none set.
extern "C" fn context_check_flags() -> u32 {
    rt::log(Level::Trace, format_args!("CONTEXT_CHECKS[3]() current {:?}", rt::current_ctx()));
    0
}

// ---- CONTEXT_QUERY ---------------------------------------------------------------------

/// Slot 51's object: which context it was made for (the driver's own is opaque to its
/// callers, who pass it back to slot 39).
#[repr(C)]
struct CtxQueryObject {
    ctx: u64,
}

/// The objects slot 51 handed out, one per context, never freed (a few bytes per context
/// ever asked about; the driver's live as long as their contexts).
static CTX_QUERY_OBJECTS: Mutex<Vec<&'static CtxQueryObject>> = Mutex::new(Vec::new());

/// The context CONTEXT_QUERY's first argument names: a context, or the calling thread's
/// state block (TOOLS_TLS slot 2), which stands for its current context. NULL, a thread
/// without a current context and anything else: CUDA_ERROR_INVALID_HANDLE (the driver's
/// answer for NULL).
fn query_context(arg: sys::CUcontext) -> CuResult<Handle> {
    if arg.is_null() {
        return Err(CuError::INVALID_HANDLE);
    }
    if std::ptr::eq(arg.cast_const().cast(), thread_state()) {
        return rt::current_ctx().ok_or(CuError::INVALID_HANDLE);
    }
    let h = handle_of(arg);
    if session()?.is_context(h) {
        Ok(h)
    } else {
        Err(CuError::INVALID_HANDLE)
    }
}

/// {6E163FBE…} slot 7, as traced natively (`VGPU_TRACE_SLOT_MEMORY=1 device/cuda-trace.sh`):
/// cuFFT calls it after each `cuModuleLoadData` with (context, module, a function of its own,
/// that function's argument, the module again, a table of its own); the driver calls the
/// function with the argument and the module's `CUfunction` — cuFFT's is a setter whose
/// value it later launches — and answers 1 for its one-kernel modules. Served the same way
/// from the host's list of the module's functions; the answer is taken to be their count
/// (only 1 was seen). The last argument is not read.
unsafe extern "C" fn fft_slot7(
    _ctx: sys::CUcontext,
    module: sys::CUmodule,
    each: Option<unsafe extern "C" fn(*mut c_void, sys::CUfunction)>,
    arg: *mut c_void,
) -> CUresult {
    rt::log(Level::Debug, format_args!("FFT_6E163FBE[7]({module:p}, {arg:p})"));
    let Some(each) = each else { return CuError::INVALID_VALUE.code() };
    match super::module::module_functions(handle_of(module)) {
        Ok(functions) => {
            for h in &functions {
                // SAFETY: the caller's contract (as traced): `each` takes `arg` and a function
                // of the module, which is what it gets.
                unsafe { each(arg, handle_ptr(*h)) };
            }
            u32::try_from(functions.len()).unwrap_or(u32::MAX)
        }
        Err(e) => e.code(),
    }
}

/// Slot 4: whether the argument is a context or a thread's state (1) or NULL (0).
unsafe extern "C" fn ctx_query_is_context(ctx: sys::CUcontext, out: *mut u64) -> CUresult {
    rt::log(Level::Trace, format_args!("CONTEXT_QUERY[4]({ctx:p}, {out:p})"));
    slot("CONTEXT_QUERY[4]", || {
        // SAFETY: the caller's contract (as traced): a non-null out-pointer valid for one write.
        let out = unsafe { Out::required(out) }?;
        out.set(u64::from(!ctx.is_null()));
        Ok(())
    })
}

/// Slot 51: the object of a context (NULL: CUDA_ERROR_INVALID_HANDLE, as the driver answers).
unsafe extern "C" fn ctx_query_object(ctx: sys::CUcontext, _arg: *const c_void, out: *mut *const c_void) -> CUresult {
    rt::log(Level::Trace, format_args!("CONTEXT_QUERY[51]({ctx:p}, {_arg:p}, {out:p})"));
    slot("CONTEXT_QUERY[51]", || {
        // SAFETY: as slot 4.
        let out = unsafe { Out::required(out) }?;
        let h = query_context(ctx)?;
        let mut objects = CTX_QUERY_OBJECTS.lock().map_err(|_| CuError::UNKNOWN)?;
        let obj = match objects.iter().find(|o| o.ctx == h.0) {
            Some(o) => *o,
            None => {
                let o: &'static CtxQueryObject = Box::leak(Box::new(CtxQueryObject { ctx: h.0 }));
                objects.push(o);
                o
            }
        };
        out.set((obj as *const CtxQueryObject).cast());
        Ok(())
    })
}

/// Slot 39: the host driver's value for the context of a slot-51 object.
unsafe extern "C" fn ctx_query_value(_ctx: sys::CUcontext, obj: *const c_void, out: *mut u64) -> CUresult {
    rt::log(Level::Trace, format_args!("CONTEXT_QUERY[39]({_ctx:p}, {obj:p}, {out:p})"));
    slot("CONTEXT_QUERY[39]", || {
        // SAFETY: as slot 4.
        let out = unsafe { Out::required(out) }?;
        let ctx = {
            let objects = CTX_QUERY_OBJECTS.lock().map_err(|_| CuError::UNKNOWN)?;
            // Only objects slot 51 made are read (anything else is not dereferenced).
            objects.iter().find(|o| std::ptr::eq(**o as *const CtxQueryObject, obj.cast())).map(|o| o.ctx)
        };
        let ctx = ctx.ok_or(CuError::INVALID_VALUE)?;
        let s = session()?;
        let mut c = s.lock();
        let r: p::CtxQueryValueReply = c.call(&p::CtxQueryValue { ctx: Handle(ctx) })?;
        out.set(r.value);
        Ok(())
    })
}

// ---- INTEGRITY_CHECK -------------------------------------------------------------------

/// Slot 1: the runtime's check that it talks to the driver it believes it does. The
/// answer is an HMAC-MD2 (a fixed key) over the driver version, the caller's `version`,
/// process and thread ids, three addresses of these tables, the caller's `unix_seconds`,
/// and per device its UUID and PCI domain, bus and device — the same facts libvgpu
/// reports through the public API.
unsafe extern "C" fn integrity_check(version: u32, unix_seconds: u64, result: *mut [u64; 2]) -> CUresult {
    slot("INTEGRITY_CHECK[1]", || {
        // SAFETY: the runtime's contract: a non-null out-pointer is valid for one write.
        let out = unsafe { Out::required(result) }?;
        let s = rt::init()?;
        let attr = |a: usize| match s.info.attributes.get(a - 1) {
            Some(AttrValue::Value(v)) => *v,
            _ => 0,
        };
        let device = integrity::Device {
            uuid: s.info.device.uuid,
            pci_domain: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID as usize),
            pci_bus: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID as usize),
            pci_device: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID as usize),
        };
        let input = integrity::Input {
            driver_version: s.info.device.driver_version,
            version,
            process: std::process::id(),
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() } as u32,
            cudart_table: CUDART_INTERFACE.as_ptr() as u64,
            integrity_table: INTEGRITY_CHECK.as_ptr() as u64,
            function: INTEGRITY_CHECK.0[1] as usize as u64,
            unix_seconds,
        };
        out.set(integrity::answer(&input, &[device]));
        Ok(())
    })
}

/// The integrity check's arithmetic: MD2 (RFC 1319) in HMAC form.
pub mod integrity {
    /// MD2's substitution table (RFC 1319, from the digits of pi).
    const S: [u8; 256] = [
        41, 46, 67, 201, 162, 216, 124, 1, 61, 54, 84, 161, 236, 240, 6, 19, 98, 167, 5, 243, 192, 199, 115, 140, 152,
        147, 43, 217, 188, 76, 130, 202, 30, 155, 87, 60, 253, 212, 224, 22, 103, 66, 111, 24, 138, 23, 229, 18, 190,
        78, 196, 214, 218, 158, 222, 73, 160, 251, 245, 142, 187, 47, 238, 122, 169, 104, 121, 145, 21, 178, 7, 63,
        148, 194, 16, 137, 11, 34, 95, 33, 128, 127, 93, 154, 90, 144, 50, 39, 53, 62, 204, 231, 191, 247, 151, 3, 255,
        25, 48, 179, 72, 165, 181, 209, 215, 94, 146, 42, 172, 86, 170, 198, 79, 184, 56, 210, 150, 164, 125, 182, 118,
        252, 107, 226, 156, 116, 4, 241, 69, 157, 112, 89, 100, 113, 135, 32, 134, 91, 207, 101, 230, 45, 168, 2, 27,
        96, 37, 173, 174, 176, 185, 246, 28, 70, 97, 105, 52, 64, 126, 15, 85, 71, 163, 35, 221, 81, 175, 58, 195, 92,
        249, 206, 186, 197, 234, 38, 44, 83, 13, 110, 133, 40, 132, 9, 211, 223, 205, 244, 65, 129, 77, 82, 106, 220,
        55, 200, 108, 193, 171, 250, 36, 225, 123, 8, 12, 189, 177, 74, 120, 136, 149, 139, 227, 99, 232, 109, 233,
        203, 213, 254, 59, 0, 29, 57, 242, 239, 183, 14, 102, 88, 208, 228, 166, 119, 114, 248, 235, 117, 75, 10, 49,
        68, 80, 180, 143, 237, 31, 26, 219, 153, 141, 51, 159, 17, 131, 20,
    ];

    /// An incremental MD2.
    #[derive(Clone)]
    pub struct Md2 {
        x: [u8; 48],
        checksum: [u8; 16],
        block: [u8; 16],
        fill: usize,
    }

    impl Default for Md2 {
        fn default() -> Self {
            Md2 { x: [0; 48], checksum: [0; 16], block: [0; 16], fill: 0 }
        }
    }

    impl Md2 {
        /// Adds bytes.
        pub fn update(&mut self, data: &[u8]) {
            for &b in data {
                self.block[self.fill] = b;
                self.fill += 1;
                if self.fill == 16 {
                    self.compress();
                    self.fill = 0;
                }
            }
        }

        fn compress(&mut self) {
            // The checksum runs over the message blocks only (not over itself when it is
            // appended at the end, since `finish` compresses it through `mix` directly).
            let mut l = self.checksum[15];
            for i in 0..16 {
                self.checksum[i] ^= S[(self.block[i] ^ l) as usize];
                l = self.checksum[i];
            }
            self.mix();
        }

        fn mix(&mut self) {
            for i in 0..16 {
                self.x[16 + i] = self.block[i];
                self.x[32 + i] = self.x[16 + i] ^ self.x[i];
            }
            let mut t = 0u8;
            for round in 0..18u8 {
                for k in 0..48 {
                    self.x[k] ^= S[t as usize];
                    t = self.x[k];
                }
                t = t.wrapping_add(round);
            }
        }

        /// Pads, appends the checksum and returns the 16-byte digest.
        pub fn finish(mut self) -> [u8; 16] {
            let pad = (16 - self.fill) as u8;
            self.update(&vec![pad; pad as usize]);
            self.block = self.checksum;
            self.mix();
            let mut d = [0u8; 16];
            d.copy_from_slice(&self.x[..16]);
            d
        }
    }

    /// HMAC with MD2 (block size 16) and a 16-byte key.
    pub fn hmac_md2(key: &[u8; 16], message: &[u8]) -> [u8; 16] {
        let mut inner = Md2::default();
        inner.update(&key.map(|b| b ^ 0x36));
        inner.update(message);
        let inner = inner.finish();
        let mut outer = Md2::default();
        outer.update(&key.map(|b| b ^ 0x5c));
        outer.update(&inner);
        outer.finish()
    }

    /// The runtime's fixed key.
    const KEY: [u8; 16] =
        [0x14, 0x6a, 0xdd, 0xae, 0x53, 0xa9, 0xa7, 0x52, 0xaa, 0x08, 0x41, 0x36, 0x0b, 0xf5, 0x5a, 0x9f];

    /// What the hash covers besides the devices (laid out as the runtime lays it out: four
    /// 32-bit words, three addresses, the time).
    pub struct Input {
        /// The driver's version (`cuDriverGetVersion`).
        pub driver_version: u32,
        /// The caller's version argument.
        pub version: u32,
        /// `getpid()`.
        pub process: u32,
        /// `pthread_self()`, truncated.
        pub thread: u32,
        /// CUDART_INTERFACE's address.
        pub cudart_table: u64,
        /// INTEGRITY_CHECK's address.
        pub integrity_table: u64,
        /// The check function's address.
        pub function: u64,
        /// The caller's time argument.
        pub unix_seconds: u64,
    }

    /// One device's identity in the hash.
    pub struct Device {
        /// `cuDeviceGetUuid`.
        pub uuid: [u8; 16],
        /// `CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID`.
        pub pci_domain: i32,
        /// `CU_DEVICE_ATTRIBUTE_PCI_BUS_ID`.
        pub pci_bus: i32,
        /// `CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID`.
        pub pci_device: i32,
    }

    /// The two words the check returns.
    pub fn answer(input: &Input, devices: &[Device]) -> [u64; 2] {
        // Versions ending in 0 or 1 get fixed answers (older runtimes' protocol).
        match input.version % 10 {
            0 => return [0x3341_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8],
            1 => return [0x1841_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8],
            _ => {}
        }
        let mut m = Vec::with_capacity(48 + 28 * devices.len());
        for w in [input.driver_version, input.version, input.process, input.thread] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        for w in [input.cudart_table, input.integrity_table, input.function, input.unix_seconds] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        for d in devices {
            m.extend_from_slice(&d.uuid);
            for w in [d.pci_domain, d.pci_bus, d.pci_device] {
                m.extend_from_slice(&w.to_le_bytes());
            }
        }
        let d = hmac_md2(&KEY, &m);
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&d[..8]);
        hi.copy_from_slice(&d[8..]);
        [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
    }
}

#[cfg(test)]
mod tests {
    use super::integrity::*;
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn md2_matches_rfc_1319_test_suite() {
        let cases = [
            ("", "8350e5a3e24c153df2275c9f80692773"),
            ("a", "32ec01ec4a6dac72c0ab96fb34c0b5d1"),
            ("abc", "da853b0d3f88d99b30283a69e6ded6bb"),
            ("message digest", "ab4f496bfb2a530b219ff33031fe06b0"),
            ("abcdefghijklmnopqrstuvwxyz", "4e8ddff3650292ab5a4108c3aa47940b"),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "d5976f79d83d3a0dc9806c3c66f3efd8",
            ),
        ];
        for (input, want) in cases {
            let mut h = Md2::default();
            h.update(input.as_bytes());
            assert_eq!(hex(&h.finish()), want, "MD2({input:?})");
        }
    }

    #[test]
    fn md2_is_incremental() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut one = Md2::default();
        one.update(&data);
        let mut parts = Md2::default();
        for c in data.chunks(7) {
            parts.update(c);
        }
        assert_eq!(one.finish(), parts.finish());
    }

    /// A vector observed from the real driver and published with ZLUDA's dark-API notes
    /// (driver 12.8, runtime version 12082): the intermediate states there pin the
    /// message layout; here the whole answer must be reproducible and depend on every
    /// field.
    #[test]
    fn integrity_answer_depends_on_every_field() {
        let input = || Input {
            driver_version: 12080,
            version: 12082,
            process: 0x002f_a423,
            thread: 0xf79c_1000,
            cudart_table: 0x7fff_f695_8240,
            integrity_table: 0x7fff_f695_8220,
            function: 0x7fff_f2aa_f4a0,
            unix_seconds: 0x682b_9cee,
        };
        let dev = || Device { uuid: [7; 16], pci_domain: 0, pci_bus: 2, pci_device: 0 };
        let base = answer(&input(), &[dev()]);
        assert_eq!(base, answer(&input(), &[dev()]));
        let mut i = input();
        i.process += 1;
        assert_ne!(answer(&i, &[dev()]), base);
        let mut i = input();
        i.unix_seconds += 1;
        assert_ne!(answer(&i, &[dev()]), base);
        let mut d = dev();
        d.pci_bus = 3;
        assert_ne!(answer(&input(), &[d]), base);
        let mut d = dev();
        d.uuid[15] = 8;
        assert_ne!(answer(&input(), &[d]), base);
        assert_ne!(answer(&input(), &[]), base);
        let mut i = input();
        i.version = 12080;
        assert_eq!(answer(&i, &[dev()]), [0x3341_181c_03cb_675c, 0x8ed3_83aa_1f4c_d1e8]);
    }

    #[test]
    fn ids_are_in_memory_order() {
        assert_eq!(
            TABLES[T_CUDART].id,
            [0x6b, 0xd5, 0xfb, 0x6c, 0x5b, 0xf4, 0xe7, 0x4a, 0x89, 0x87, 0xd9, 0x39, 0x12, 0xfd, 0x9d, 0xf9]
        );
        assert_eq!(id_text(&TABLES[T_CUDART].id), "{6BD5FB6C-5BF4-E74A-8987-D93912FD9DF9}");
        for (i, k) in TABLES.iter().enumerate() {
            assert!(TABLES.iter().skip(i + 1).all(|o| o.id != k.id), "{} twice", k.name);
        }
    }

    /// `cuGetExportTable` with an id from `bytes` and an out-pointer one byte into a
    /// buffer (neither needs alignment): the result and what was written.
    fn export_table(bytes: [u8; 16]) -> (CUresult, *const c_void) {
        let id = sys::CUuuid { bytes: bytes.map(|b| b as std::ffi::c_char) };
        let mut out = [0xa5u8; 1 + size_of::<*const c_void>()];
        let p = out[1..].as_mut_ptr().cast::<*const c_void>();
        // SAFETY: `p` is valid for one (unaligned) pointer write, `id` for a read.
        let r = rt::entry("test", || unsafe { cu_get_export_table(p, &id) });
        // SAFETY: `out[1..]` holds a pointer: the call wrote one, or the bytes are 0xa5.
        (r, unsafe { p.read_unaligned() })
    }

    /// Slot `i` of table `t` (a `T_*` index) as a function of type `F`.
    ///
    /// # Safety
    /// The slot must exist and `F` must be its function type.
    unsafe fn slot_fn<F: Copy>(t: usize, i: usize) -> F {
        assert_eq!(size_of::<F>(), size_of::<*const c_void>());
        let table = (TABLES[t].table)().cast::<*const c_void>();
        // SAFETY: every table is an array of words, and the slot is in it (the contract).
        let word = unsafe { table.wrapping_add(i).read() };
        // SAFETY: the word is a function of type `F` (the contract).
        unsafe { std::mem::transmute_copy(&word) }
    }

    #[test]
    fn known_ids_get_their_table_and_others_a_null_one() {
        for k in &TABLES {
            assert_eq!(export_table(k.id), (0, (k.table)()), "{}", k.name);
        }
        let invalid = CuError::INVALID_VALUE.0.get();
        for (id, name) in &PROBED {
            assert_eq!(export_table(*id), (invalid, std::ptr::null()), "{name}");
        }
        assert_eq!(export_table([0x42; 16]), (invalid, std::ptr::null()));
        let id = sys::CUuuid { bytes: [0; 16] };
        // SAFETY: a null out-pointer is refused before any access.
        let r = unsafe { cu_get_export_table(std::ptr::null_mut(), &id) };
        assert_eq!(r, Err(CuError::INVALID_VALUE));
        let mut out = std::ptr::null();
        // SAFETY: a null id is refused before any access.
        let r = unsafe { cu_get_export_table(&mut out, std::ptr::null()) };
        assert_eq!(r, Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn hook_buffers_come_with_their_lengths() {
        type Hooks = unsafe extern "C" fn(*mut *mut c_void, *mut usize);
        for (i, len) in [(2, HOOK1_LEN), (6, HOOK2_LEN)] {
            // SAFETY: slots 2 and 6 of CALLBACK_HOOKS are `Hooks`.
            let hooks: Hooks = unsafe { slot_fn(T_CALLBACK_HOOKS, i) };
            let (mut buf, mut size) = (std::ptr::null_mut(), 0usize);
            // SAFETY: two valid out-pointers.
            unsafe { hooks(&mut buf, &mut size) };
            assert_eq!(size, len);
            // SAFETY: the runtime may write the whole buffer; its last word is in it.
            unsafe { buf.cast::<u64>().wrapping_add(len - 1).write(1) };
            // SAFETY: null out-pointers are not written.
            unsafe { hooks(std::ptr::null_mut(), std::ptr::null_mut()) };
        }
    }

    #[test]
    fn thread_state_blocks_are_readable_and_per_thread() {
        type ThreadState = unsafe extern "C" fn(*mut *const c_void) -> usize;
        // SAFETY: TOOLS_TLS slot 2 is a `ThreadState`.
        let thread_state_slot: ThreadState = unsafe { slot_fn(T_TOOLS_TLS, 2) };
        let mut mine = std::ptr::null();
        // SAFETY: a valid out-pointer.
        assert_eq!(unsafe { thread_state_slot(&mut mine) }, 0);
        // SAFETY: the slot hands out this thread's block of eight words.
        assert_eq!(unsafe { std::slice::from_raw_parts(mine.cast::<u64>(), 8) }, [0; 8]);
        let theirs = std::thread::spawn(|| thread_state().addr()).join().unwrap();
        assert_ne!(mine.addr(), theirs, "one block per thread");
        // SAFETY: a null out-pointer is not written.
        assert_eq!(unsafe { thread_state_slot(std::ptr::null_mut()) }, 0);
    }

    /// The check writes a `u32`: the word after it is the caller's (cuBLAS keeps a local
    /// there).
    #[test]
    fn the_context_check_writes_four_bytes() {
        type Check = unsafe extern "C" fn(sys::CUcontext, *mut u32, *mut c_void) -> CUresult;
        // SAFETY: CONTEXT_CHECKS slot 2 is a `Check`.
        let check: Check = unsafe { slot_fn(T_CTX_CHECKS, 2) };
        // SAFETY: slot 3 takes nothing and answers a u32.
        let global: extern "C" fn() -> u32 = unsafe { slot_fn(T_CTX_CHECKS, 3) };
        let mut flags = [7u32, 0xa5a5_a5a5];
        // SAFETY: `flags` is valid for a u32 write; the third argument is not read.
        let r = unsafe { check(std::ptr::null_mut(), flags.as_mut_ptr(), std::ptr::null_mut()) };
        assert_eq!((r, flags), (0, [0, 0xa5a5_a5a5]));
        assert_eq!(global(), 0);
    }

    /// The CONTEXT_QUERY slots' answers that need no session.
    #[test]
    fn context_queries_refuse_what_is_not_a_context() {
        type IsContext = unsafe extern "C" fn(sys::CUcontext, *mut u64) -> CUresult;
        type Object = unsafe extern "C" fn(sys::CUcontext, *const c_void, *mut *const c_void) -> CUresult;
        type Value = unsafe extern "C" fn(sys::CUcontext, *const c_void, *mut u64) -> CUresult;
        // SAFETY: CONTEXT_QUERY's slots 4, 51 and 39 have these types.
        let is_context: IsContext = unsafe { slot_fn(T_CTX_QUERY, 4) };
        // SAFETY: as above.
        let object: Object = unsafe { slot_fn(T_CTX_QUERY, 51) };
        // SAFETY: as above.
        let value: Value = unsafe { slot_fn(T_CTX_QUERY, 39) };
        let ctx = handle_ptr(Handle(0x5000_0001));
        let mut answer = [9u64; 2];
        // SAFETY: `answer` is valid for a u64 write.
        assert_eq!(unsafe { is_context(std::ptr::null_mut(), answer.as_mut_ptr()) }, 0);
        assert_eq!(answer, [0, 9]);
        // SAFETY: as above.
        assert_eq!(unsafe { is_context(ctx, answer.as_mut_ptr()) }, 0);
        assert_eq!(answer, [1, 9]);
        let invalid = CuError::INVALID_VALUE.0.get();
        // SAFETY: a null out-pointer is refused.
        assert_eq!(unsafe { is_context(ctx, std::ptr::null_mut()) }, invalid);
        let mut obj = std::ptr::null();
        // SAFETY: a valid out-pointer; a null context is refused before any session.
        let r = unsafe { object(std::ptr::null_mut(), std::ptr::null(), &mut obj) };
        assert_eq!((r, obj), (CuError::INVALID_HANDLE.0.get(), std::ptr::null()));
        // An object slot 51 never made is not read: a dangling one is refused.
        // SAFETY: a valid out-pointer.
        let r = unsafe { value(ctx, std::ptr::without_provenance(0x1000), answer.as_mut_ptr()) };
        assert_eq!((r, answer), (invalid, [1, 9]));
    }

    #[test]
    fn stub_slots_answer_every_time() {
        type Answer = extern "C" fn() -> CUresult;
        // SAFETY: CUDART_INTERFACE slot 7 takes a word.
        let fn7: extern "C" fn(usize) = unsafe { slot_fn(T_CUDART, 7) };
        // SAFETY: slot 12 takes nothing.
        let load_compilers: Answer = unsafe { slot_fn(T_CUDART, 12) };
        // SAFETY: a trap is called with nothing.
        let trap: Answer = unsafe { slot_fn(T_HEAP, 1) };
        fn7(0);
        assert_eq!(load_compilers(), 0);
        assert_eq!((trap(), trap()), (CuError::NOT_SUPPORTED.0.get(), CuError::NOT_SUPPORTED.0.get()));
    }

    static DTOR_CALLS: Mutex<Vec<(usize, usize, usize)>> = Mutex::new(Vec::new());

    /// Records its call and adds 1 to the `u64` the value points to.
    unsafe extern "C" fn record_dtor(ctx: sys::CUcontext, key: *mut c_void, value: *mut c_void) {
        DTOR_CALLS.lock().unwrap().push((ctx.addr(), key.addr(), value.addr()));
        // SAFETY: the test stored pointers to live `u64`s as values.
        unsafe { *value.cast::<u64>() += 1 };
    }

    #[test]
    fn a_gone_context_runs_its_destructors_once_and_forgets_its_values() {
        let (gone, kept) = (0x7000_0001_u64, 0x7000_0002_u64);
        let mut values = [10u64, 20, 30];
        let [a, b, c] = values.each_mut().map(|v| std::ptr::from_mut(v).cast::<c_void>());
        let key = |k: usize| std::ptr::without_provenance_mut::<c_void>(k);
        with_cls(|m| {
            m.insert((gone, 1), ClsEntry { key: key(1), value: a, dtor: Some(record_dtor) });
            m.insert((gone, 2), ClsEntry { key: key(2), value: b, dtor: None });
            m.insert((kept, 1), ClsEntry { key: key(1), value: c, dtor: Some(record_dtor) });
        });
        context_gone(Handle(gone));
        context_gone(Handle(gone));
        assert_eq!(*DTOR_CALLS.lock().unwrap(), [(gone as usize, 1, a.addr())]);
        assert_eq!(values[0], 11, "the destructor got the runtime's own pointer");
        with_cls(|m| {
            assert!(!m.keys().any(|(c, _)| *c == gone));
            assert_eq!(m.remove(&(kept, 1)).map(|e| e.value.addr()), Some(c.addr()));
        });
    }

    #[test]
    fn sized_tables_say_their_size_and_every_slot_is_code() {
        assert_eq!(CUDART_INTERFACE.0[0] as usize, 13 * 8);
        assert_eq!(DEVICE_EXTENDED_RT.0[0] as usize, 26 * 8);
        // The sizes the real driver 580 reports (tools/cuda-trace on an H200).
        assert_eq!(CONTEXT_CHECKS.0[0] as usize, 120);
        assert_eq!(TOOLS_TLS.0[0] as usize, 24);
        assert_eq!(CALLBACK_HOOKS.0[0] as usize, 56);
        assert_eq!(INTEGRITY_CHECK.0[0] as usize, 24);
        assert!(CUDART_INTERFACE.0[1..].iter().all(|p| !p.is_null() && *p as usize > 4096));
        assert!(CONTEXT_LOCAL_STORAGE.0.iter().all(|p| !p.is_null() && *p as usize > 4096));
    }
}
