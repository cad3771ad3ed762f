//! The real driver: loading it with `dlopen` (never the tracer itself), looking its symbols
//! up, and naming addresses with `dladdr`.

use std::ffi::{c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A symbol only the tracer exports. A candidate "real driver" that has it is the tracer
/// itself (reached through a link or the loader's search path) and is refused.
#[no_mangle]
pub static CUDA_TRACE_MARKER: [u8; 10] = *b"cuda-trace";

/// The loaded real driver.
pub(crate) struct Driver {
    /// The `dlopen` handle, kept as an integer so that the driver can live in a static.
    handle: usize,
    /// The path it was loaded from.
    pub path: PathBuf,
}

impl Driver {
    /// Loads the first candidate that loads and is not the tracer. The error lists what went
    /// wrong with each candidate.
    pub(crate) fn open(candidates: &[PathBuf]) -> Result<Driver, String> {
        let mut why = Vec::new();
        for path in candidates {
            match Driver::open_one(path) {
                Ok(driver) => return Ok(driver),
                Err(e) => why.push(format!("{}: {e}", path.display())),
            }
        }
        Err(why.join("; "))
    }

    fn open_one(path: &Path) -> Result<Driver, String> {
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| "path contains NUL".to_string())?;
        // SAFETY: c_path is a NUL-terminated string. Loading runs the library's constructors,
        // which is what loading a driver means.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(last_dl_error());
        }
        let driver = Driver { handle: handle as usize, path: path.to_owned() };
        if driver.symbol("CUDA_TRACE_MARKER") != 0 {
            // SAFETY: handle came from the dlopen above and nothing of it is in use.
            unsafe { libc::dlclose(handle) };
            return Err("is cuda-trace itself, not the driver".to_string());
        }
        Ok(driver)
    }

    /// The address of `name` in the driver, or 0 when it has none.
    pub(crate) fn symbol(&self, name: &str) -> usize {
        let Ok(c_name) = CString::new(name) else { return 0 };
        // SAFETY: the handle is a live dlopen handle (drivers are never closed once
        // accepted) and c_name is a NUL-terminated string.
        let addr = unsafe { libc::dlsym(self.handle as *mut c_void, c_name.as_ptr()) };
        addr as usize
    }
}

/// What `dladdr` knows about an address.
struct AddrInfo {
    /// The base address of the object that holds it.
    object_base: usize,
    /// The exported symbol that starts exactly at the address, if any.
    exact_name: Option<String>,
}

fn addr_info(addr: usize) -> Option<AddrInfo> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only inspects the loader's tables for the address (it need not be
    // dereferenceable) and writes into `info`, which outlives the call.
    let found = unsafe { libc::dladdr(addr as *const c_void, &mut info) };
    if found == 0 {
        return None;
    }
    let exact_name = if !info.dli_sname.is_null() && info.dli_saddr as usize == addr {
        // SAFETY: dladdr set dli_sname to a NUL-terminated name in the loader's tables,
        // which live as long as the object stays loaded.
        let name = unsafe { CStr::from_ptr(info.dli_sname) };
        Some(name.to_string_lossy().into_owned())
    } else {
        None
    };
    Some(AddrInfo { object_base: info.dli_fbase as usize, exact_name })
}

/// The exported name of the function at `addr` (e.g. the `_ptsz` variant the driver chose),
/// when a symbol starts exactly there.
pub(crate) fn exact_symbol_name(addr: usize) -> Option<String> {
    addr_info(addr)?.exact_name
}

/// Whether `addr` lies in the tracer's own library (then it is traced already).
pub(crate) fn is_in_tracer(addr: usize) -> bool {
    let Some(own) = addr_info(CUDA_TRACE_MARKER.as_ptr() as usize) else { return false };
    addr_info(addr).is_some_and(|a| a.object_base == own.object_base)
}

fn last_dl_error() -> String {
    // SAFETY: dlerror has no preconditions; the message it returns stays valid until the
    // next dl* call on this thread, and is copied before that.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        return "dlopen failed".to_string();
    }
    // SAFETY: a non-null dlerror result is a NUL-terminated string (see above).
    let text = unsafe { CStr::from_ptr(msg) };
    text.to_string_lossy().into_owned()
}
