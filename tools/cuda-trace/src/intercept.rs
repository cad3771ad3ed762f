//! The wrappers of the driver functions whose results the tracer rewrites:
//! `cuGetProcAddress(_v2)` (a returned function pointer becomes a logging stub) and
//! `cuGetExportTable` (a returned table becomes a copy whose code slots are logging stubs).
//!
//! `enter` jumps here instead of to the real function, with the caller's registers and
//! stack unchanged, after leaving the real function's address in a thread-local slot
//! (`trampoline::take_pending`). The wrappers' returns are logged like any other.

use crate::driver;
use crate::line::{slot_name, Uuid};
use crate::maps::MemoryMap;
use crate::registry::{self, StubKey, Target, Via};
use crate::table_shape::{self, How};
use crate::tracer::tracer;
use crate::trampoline::take_pending;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int};
use std::sync::Mutex;

/// `CUDA_ERROR_NOT_FOUND`, for a wrapper reached without a pending real function (never
/// expected).
const CUDA_ERROR_NOT_FOUND: c_int = 500;

/// The longest symbol name read from the caller.
const MAX_NAME: usize = 256;

/// `cuGetProcAddress_v2`'s signature. `cuGetProcAddress` (v1) has the first four parameters
/// only; calling it with a fifth register set is harmless, and the wrapper never reads the
/// fifth argument itself, so one wrapper serves both.
type ProcAddressFn = unsafe extern "C" fn(*const c_char, *mut usize, c_int, u64, usize) -> c_int;

/// `cuGetExportTable`'s signature.
type ExportTableFn = unsafe extern "C" fn(*mut usize, *const [u8; 16]) -> c_int;

/// Shows an address or value in hex.
fn hex(v: impl Into<u64>) -> String {
    format!("{:#x}", v.into())
}

/// Stands in for `cuGetProcAddress` and `cuGetProcAddress_v2`: forwards, then replaces the
/// returned pointer with a stub that logs its calls under the symbol's name.
///
/// # Safety
///
/// The caller upholds `cuGetProcAddress(_v2)`'s contract; the wrapper is only reached from
/// `enter`, which sets the pending real function.
pub(crate) unsafe extern "C" fn get_proc_address(
    symbol: *const c_char,
    pfn: *mut usize,
    version: c_int,
    flags: u64,
    status: usize,
) -> c_int {
    let real = take_pending();
    if real == 0 {
        return CUDA_ERROR_NOT_FOUND;
    }
    // SAFETY: real is the driver's cuGetProcAddress or cuGetProcAddress_v2 (enter chose this
    // wrapper for that name), whose ABI ProcAddressFn matches (see its comment).
    let real = unsafe { std::mem::transmute::<usize, ProcAddressFn>(real) };
    // SAFETY: the caller's own arguments, passed on unchanged, under its contract.
    let rc = unsafe { real(symbol, pfn, version, flags, status) };
    let t = tracer();
    // SAFETY: symbol is null or the caller's NUL-terminated string (the API's contract).
    let requested = unsafe { read_c_string(symbol) };
    let mut line = t.line("proc", &requested).field("version", version).field("flags", hex(flags)).field("rc", rc);
    if rc == 0 && !pfn.is_null() {
        // SAFETY: the driver succeeded, so *pfn holds the pointer it wrote there.
        let real_fn = unsafe { pfn.read() };
        let resolved = driver::exact_symbol_name(real_fn);
        let traced_already = driver::is_in_tracer(real_fn) || registry::is_stub(real_fn);
        let stub = if real_fn == 0 || traced_already {
            None
        } else {
            let name = resolved.clone().unwrap_or_else(|| requested.clone());
            registry::stub_for(StubKey::Proc(real_fn), || Target::dynamic(name, Via::Proc, real_fn))
        };
        if let Some(stub) = stub {
            // SAFETY: pfn is the caller's pointer to a function-pointer slot, which the
            // driver has just written.
            unsafe { pfn.write(stub) };
        }
        line = line
            .field("real", hex(real_fn as u64))
            .field("resolved", resolved.as_deref().unwrap_or("-"))
            .field("stub", stub.map_or_else(|| "-".to_string(), |s| hex(s as u64)));
    }
    t.emit(line);
    rc
}

/// Stands in for `cuGetExportTable`: forwards, logs the UUID, then returns a traced copy
/// of the table.
///
/// # Safety
///
/// As for [`get_proc_address`], with `cuGetExportTable`'s contract.
pub(crate) unsafe extern "C" fn get_export_table(table: *mut usize, id: *const [u8; 16]) -> c_int {
    let real = take_pending();
    if real == 0 {
        return CUDA_ERROR_NOT_FOUND;
    }
    // SAFETY: real is the driver's cuGetExportTable, whose ABI ExportTableFn matches.
    let real_fn = unsafe { std::mem::transmute::<usize, ExportTableFn>(real) };
    // SAFETY: the caller's own arguments, passed on unchanged, under its contract.
    let rc = unsafe { real_fn(table, id) };
    let uuid = if id.is_null() {
        None
    } else {
        // SAFETY: a non-null id points to the caller's 16-byte CUuuid.
        Some(Uuid(unsafe { id.read_unaligned() }))
    };
    let t = tracer();
    let name = uuid.map_or_else(|| "(null)".to_string(), |u| u.to_string());
    let mut line = t.line("table", &name).field("rc", rc);
    if let (0, false, Some(uuid)) = (rc, table.is_null(), uuid) {
        // SAFETY: the driver succeeded, so *table holds the table pointer it wrote there.
        let real_table = unsafe { table.read() };
        line = line.field("real", hex(real_table as u64));
        // The runtime's integrity check hashes the addresses of these two tables and of the
        // check function: a copy makes it fail ("integrity checks failed"), so they are
        // handed over as the driver gave them and their slots are not traced.
        let copy = if PASS_THROUGH.contains(&uuid.0) { None } else { traced_copy(uuid, real_table, real) };
        match copy {
            Some(copy) => {
                // SAFETY: table is the caller's pointer slot, which the driver just wrote.
                unsafe { table.write(copy.slots.as_ptr() as usize) };
                line = line
                    .field("copy", hex(copy.slots.as_ptr() as u64))
                    .field("slots", copy.slots.len())
                    .field("code", copy.code)
                    .field("how", copy.how);
            }
            None => line = line.field("copy", if PASS_THROUGH.contains(&uuid.0) { "pass-through" } else { "-" }),
        }
    }
    t.emit(line);
    rc
}

/// Tables returned untouched: CUDART_INTERFACE {6BD5FB6C-…} and INTEGRITY_CHECK
/// {D4082055-…}, whose addresses the runtime's integrity check covers.
const PASS_THROUGH: [[u8; 16]; 2] = [
    [0x6b, 0xd5, 0xfb, 0x6c, 0x5b, 0xf4, 0xe7, 0x4a, 0x89, 0x87, 0xd9, 0x39, 0x12, 0xfd, 0x9d, 0xf9],
    [0xd4, 0x08, 0x20, 0x55, 0xbd, 0xe6, 0x70, 0x4b, 0x8d, 0x34, 0xba, 0x12, 0x3c, 0x66, 0xe1, 0xf2],
];

/// A traced copy of an export table; lives for the rest of the process.
struct TableCopy {
    slots: Box<[usize]>,
    /// How many slots became stubs.
    code: usize,
    how: How,
}

/// Copies made so far, per table UUID (and the real table's address, should the driver
/// ever answer one UUID with two tables).
static TABLES: Mutex<BTreeMap<(Uuid, usize), &'static TableCopy>> = Mutex::new(BTreeMap::new());

/// The traced copy of `real_table`, made on first request. `known_code` is a function of
/// the real driver: the code of the file that holds it is what counts as code. `None` when
/// the table has no slots the tracer can read.
fn traced_copy(uuid: Uuid, real_table: usize, known_code: usize) -> Option<&'static TableCopy> {
    let mut tables = TABLES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&copy) = tables.get(&(uuid, real_table)) {
        return Some(copy);
    }
    let map = MemoryMap::current();
    let exec = map.exec_ranges_of_file_containing(known_code as u64);
    let is_code = |v: u64| exec.iter().any(|&(start, end)| start <= v && v < end);
    let read = |k: usize| -> Option<u64> {
        let addr = real_table.checked_add(k.checked_mul(8)?)?;
        if !map.readable(addr as u64, 8) {
            return None;
        }
        // SAFETY: the eight bytes at addr are mapped readable (just checked in the map,
        // and the driver's tables are not unmapped while the driver is loaded).
        Some(unsafe { (addr as *const u64).read_unaligned() })
    };
    let shape = table_shape::decide(read, is_code);
    if shape.slots.is_empty() {
        return None;
    }
    let mut code = 0;
    let slots = shape
        .slots
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            if v == 0 || !is_code(v) {
                return v as usize;
            }
            let stub = registry::stub_for(StubKey::Slot(uuid, k), || {
                Target::dynamic(slot_name(&uuid, k), Via::Slot, v as usize)
            });
            code += usize::from(stub.is_some());
            stub.unwrap_or(v as usize)
        })
        .collect();
    let copy: &'static TableCopy = Box::leak(Box::new(TableCopy { slots, code, how: shape.how }));
    tables.insert((uuid, real_table), copy);
    Some(copy)
}

/// Reads a C string of at most [`MAX_NAME`] bytes (lossily as UTF-8).
///
/// # Safety
///
/// `p` is null or points to a NUL-terminated string.
unsafe fn read_c_string(p: *const c_char) -> String {
    if p.is_null() {
        return "(null)".to_string();
    }
    let mut bytes = Vec::new();
    for i in 0..MAX_NAME {
        // SAFETY: the string's bytes up to its NUL are readable (contract), and the loop
        // stops at the NUL.
        let b = unsafe { p.wrapping_add(i).read() } as u8;
        if b == 0 {
            break;
        }
        bytes.push(b);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
