//! Traced targets by entry id, and the executable pages of runtime stubs.
//!
//! Ids below [`DYNAMIC_BASE`] are the exported names (index into `exports::NAMES`); their
//! real addresses are looked up in the driver on first call. Ids from [`DYNAMIC_BASE`] on
//! belong to runtime stubs, created for `cuGetProcAddress` answers and export-table slots.
//! A stub page is written completely (all its stubs, for ids not yet in use) and made
//! read+execute before its first stub is handed out, so code is never changed while it may
//! run; a stub's target is set before its address leaves the allocator, and never changes.

use crate::exports::NAMES;
use crate::line::Uuid;
use crate::stub_code::{self, PAGE_SIZE, STUBS_PER_PAGE};
use crate::tracer::tracer;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

/// The first id of runtime stubs.
pub(crate) const DYNAMIC_BASE: u32 = 1 << 16;

/// How many stub pages there can be (16 320 stubs).
const MAX_PAGES: usize = 64;

/// `CUDA_ERROR_NOT_FOUND`: what a name the real driver lacks returns.
const CUDA_ERROR_NOT_FOUND: u32 = 500;

/// `CUDA_ERROR_STUB_LIBRARY`: what every call returns when no real driver could be loaded.
const CUDA_ERROR_STUB_LIBRARY: u32 = 34;

/// How a traced call was reached (logged as `via=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// Through an exported name.
    Export,
    /// Through a pointer from `cuGetProcAddress`.
    Proc,
    /// Through a slot of an export table.
    Slot,
}

impl Via {
    /// The name in the log.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Via::Export => "export",
            Via::Proc => "proc",
            Via::Slot => "slot",
        }
    }
}

/// Entry points whose results the tracer rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Special {
    /// Forwarded as is.
    None,
    /// `cuGetProcAddress` or `cuGetProcAddress_v2`: the returned pointer becomes a stub.
    ProcAddress,
    /// `cuGetExportTable`: the returned table becomes a traced copy.
    ExportTable,
}

impl Special {
    /// The special role of a driver function by its name.
    pub(crate) fn for_name(name: &str) -> Special {
        match name {
            "cuGetProcAddress" | "cuGetProcAddress_v2" => Special::ProcAddress,
            "cuGetExportTable" => Special::ExportTable,
            _ => Special::None,
        }
    }
}

/// One traced entry point.
#[derive(Debug)]
pub(crate) struct Target {
    /// The name in the log: a driver function, or `{UUID}[slot]`.
    pub name: Box<str>,
    /// How it is reached.
    pub via: Via,
    /// The real function.
    pub real: usize,
    /// Whether its result is rewritten.
    pub special: Special,
    /// Whether its calls are left out of the log.
    pub quiet: bool,
}

impl Target {
    /// A target reached through a runtime stub.
    pub(crate) fn dynamic(name: String, via: Via, real: usize) -> Target {
        let special = if via == Via::Slot { Special::None } else { Special::for_name(&name) };
        let quiet = tracer().config.is_quiet(&name);
        Target { name: name.into_boxed_str(), via, real, special, quiet }
    }
}

const N_EXPORTS: usize = NAMES.len();

static EXPORTS: [OnceLock<Target>; N_EXPORTS] = [const { OnceLock::new() }; N_EXPORTS];

/// A page of runtime stubs and their targets.
struct StubPage {
    /// The page's address.
    base: usize,
    targets: [OnceLock<Target>; STUBS_PER_PAGE],
}

static PAGES: [OnceLock<Box<StubPage>>; MAX_PAGES] = [const { OnceLock::new() }; MAX_PAGES];

/// What a runtime stub stands for; the same key always gets the same stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum StubKey {
    /// A function pointer from `cuGetProcAddress`, by its real address.
    Proc(usize),
    /// Slot `.1` of the export table `.0`.
    Slot(Uuid, usize),
}

/// Hands out stub ids in order; rare (one per distinct pointer or slot), so one lock.
struct Allocator {
    used: usize,
    stubs: BTreeMap<StubKey, usize>,
}

static ALLOCATOR: Mutex<Allocator> = Mutex::new(Allocator { used: 0, stubs: BTreeMap::new() });

/// The target of entry id `id`.
pub(crate) fn target(id: u32) -> Option<&'static Target> {
    let index = id as usize;
    if index < N_EXPORTS {
        return Some(EXPORTS[index].get_or_init(|| export_target(index)));
    }
    let n = id.checked_sub(DYNAMIC_BASE)? as usize;
    PAGES.get(n / STUBS_PER_PAGE)?.get()?.targets[n % STUBS_PER_PAGE].get()
}

/// Looks up exported name `index` in the real driver.
fn export_target(index: usize) -> Target {
    let t = tracer();
    let name = NAMES[index];
    let real = match &t.driver {
        None => no_driver as *const () as usize,
        Some(driver) => match driver.symbol(name) {
            0 => {
                t.emit(t.line("error", name).field("text", "the real driver has no such symbol; the call fails"));
                missing_symbol as *const () as usize
            }
            addr => addr,
        },
    };
    Target {
        name: name.into(),
        via: Via::Export,
        real,
        special: Special::for_name(name),
        quiet: t.config.is_quiet(name),
    }
}

/// Stands in for a name the real driver lacks.
extern "C" fn missing_symbol() -> u32 {
    CUDA_ERROR_NOT_FOUND
}

/// Stands in for every function when no real driver is loaded.
extern "C" fn no_driver() -> u32 {
    CUDA_ERROR_STUB_LIBRARY
}

/// The stub for `key`, created with the target `make` gives when there is none yet. `None`
/// when stubs are used up or no page could be mapped (the caller then leaves the real
/// pointer in place, untraced).
pub(crate) fn stub_for(key: StubKey, make: impl FnOnce() -> Target) -> Option<usize> {
    let mut alloc = ALLOCATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&stub) = alloc.stubs.get(&key) {
        return Some(stub);
    }
    let (page_index, k) = (alloc.used / STUBS_PER_PAGE, alloc.used % STUBS_PER_PAGE);
    let slot = PAGES.get(page_index)?;
    if slot.get().is_none() {
        let base = map_stub_page(DYNAMIC_BASE + alloc.used as u32)?;
        // Only the allocator sets pages, under its lock, so this cannot find the slot taken.
        let _ = slot.set(Box::new(StubPage { base, targets: [const { OnceLock::new() }; STUBS_PER_PAGE] }));
    }
    let page = slot.get()?;
    page.targets[k].set(make()).ok()?;
    alloc.used += 1;
    let stub = page.base + stub_code::stub_offset(k);
    alloc.stubs.insert(key, stub);
    Some(stub)
}

/// Maps a page of stubs for the ids from `first_id` on, and makes it read+execute.
fn map_stub_page(first_id: u32) -> Option<usize> {
    let image = stub_code::page_image(first_id, crate::trampoline::body_address() as u64);
    // SAFETY: a fresh anonymous private mapping aliases nothing; the arguments are valid.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: mem is a writable mapping of PAGE_SIZE bytes that nothing else knows of, and
    // image holds PAGE_SIZE bytes.
    unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), mem.cast::<u8>(), PAGE_SIZE) };
    // SAFETY: mem is the mapping made above, PAGE_SIZE long.
    if unsafe { libc::mprotect(mem, PAGE_SIZE, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
        // SAFETY: as above; no stub of it was handed out.
        unsafe { libc::munmap(mem, PAGE_SIZE) };
        return None;
    }
    Some(mem as usize)
}

/// Whether `addr` is one of the runtime stubs.
pub(crate) fn is_stub(addr: usize) -> bool {
    PAGES.iter().map_while(|p| p.get()).any(|p| p.base <= addr && addr < p.base + PAGE_SIZE)
}
