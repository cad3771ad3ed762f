//! The GPU's memory as the driver reports it, through NVML (`libnvidia-ml.so.1`), for the
//! daemon's metrics.
//!
//! The daemon never loads the CUDA driver (a context would cost it half a GiB of the GPU);
//! NVML needs none. The device is found by the PCI bus id that the start-up probe read
//! through CUDA, so CUDA's device order and NVML's cannot be confused. Where NVML is
//! missing (the simulated GPU, a machine without the driver's tools) the driver's figures
//! are left out of the metrics rather than guessed.

use std::ffi::{c_char, c_int, c_void, CString};

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Default)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

type Init = unsafe extern "C" fn() -> c_int;
type ByPci = unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> c_int;
type MemoryInfo = unsafe extern "C" fn(*mut c_void, *mut Memory) -> c_int;

/// One device opened through NVML.
#[derive(Debug)]
pub struct Nvml {
    device: *mut c_void,
    memory_info: MemoryInfo,
}

// SAFETY: NVML is thread-safe (its documentation: every call may be made from any thread);
// the device handle is an opaque token valid for the process's lifetime (NVML is never shut
// down and the library never unloaded).
#[allow(unsafe_code)]
unsafe impl Send for Nvml {}
// SAFETY: as above; `&Nvml` only calls `nvmlDeviceGetMemoryInfo`.
#[allow(unsafe_code)]
unsafe impl Sync for Nvml {}

#[allow(unsafe_code)]
fn symbol<T: Copy>(lib: *mut c_void, name: &std::ffi::CStr) -> Result<T, String> {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: `lib` is a handle from `dlopen`; `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        return Err(format!("NVML has no {}", name.to_string_lossy()));
    }
    // SAFETY: `T` is the function pointer type of the C declaration of `name` in nvml.h
    // (checked by hand for each use), the same size as a pointer (asserted above).
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

impl Nvml {
    /// Opens NVML and the device at PCI bus id `pci` (as `cuDeviceGetPCIBusId` writes it).
    #[allow(unsafe_code)]
    pub fn open(pci: &str) -> Result<Nvml, String> {
        let pci = CString::new(pci).map_err(|_| "a PCI bus id with a NUL byte".to_owned())?;
        // SAFETY: a constant NUL-terminated name; the library is kept loaded for the life of
        // the process (never closed), so pointers into it stay valid.
        let lib = unsafe { libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            return Err("libnvidia-ml.so.1 cannot be loaded".into());
        }
        let init: Init = symbol(lib, c"nvmlInit_v2")?;
        let by_pci: ByPci = symbol(lib, c"nvmlDeviceGetHandleByPciBusId_v2")?;
        let memory_info: MemoryInfo = symbol(lib, c"nvmlDeviceGetMemoryInfo")?;
        // SAFETY: `nvmlInit_v2` takes no arguments; calling it again is reference-counted.
        let rc = unsafe { init() };
        if rc != 0 {
            return Err(format!("nvmlInit_v2 failed with NVML error {rc}"));
        }
        let mut device = std::ptr::null_mut();
        // SAFETY: a NUL-terminated id and a valid out-pointer.
        let rc = unsafe { by_pci(pci.as_ptr(), &mut device) };
        if rc != 0 || device.is_null() {
            return Err(format!("NVML finds no device at {} (NVML error {rc})", pci.to_string_lossy()));
        }
        Ok(Nvml { device, memory_info })
    }

    /// Total and used device memory, in bytes (used: every process on the GPU, contexts
    /// and the driver's reservations included).
    #[allow(unsafe_code)]
    pub fn memory(&self) -> Option<(u64, u64)> {
        let mut m = Memory::default();
        // SAFETY: `device` came from NVML for this process; `m` is a valid `nvmlMemory_t`.
        let rc = unsafe { (self.memory_info)(self.device, &mut m) };
        (rc == 0).then_some((m.total, m.used))
    }
}
