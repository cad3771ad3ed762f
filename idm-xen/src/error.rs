//! The error type of the device bindings (gntalloc, gntdev, evtchn).

use std::io;

/// Why an operation on a Xen device failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XenError {
    /// The device node is missing, so this kernel has no such Xen driver loaded.
    #[error(
        "cannot open {path}: {source}; is this a Xen domain? (the node appears when the kernel's Xen \
         driver for it is loaded and /dev/xen exists)"
    )]
    DeviceMissing {
        /// The device path tried.
        path: &'static str,
        /// What `open` said.
        source: io::Error,
    },
    /// A system call on a device failed; `op` names it.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation, e.g. "IOCTL_GNTDEV_MAP_GRANT_REF".
        op: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
    /// gntalloc refused to grant more pages.
    #[error(
        "gntalloc could not grant {count} page(s): {source}; either the xen_gntalloc module's \
         `limit` (pages in all, default 1024: raise it with the kernel parameter \
         xen_gntalloc.limit=N or /sys/module/xen_gntalloc/parameters/limit) or the domain's grant \
         table is full (512 grants per frame: raise `max_grant_frames` in the xl config — \
         `cargo xtask build-image --window-mib/--cuda-processes` sizes it — within Xen's \
         `gnttab_max_frames`, default 64)"
    )]
    GrantLimit {
        /// Pages asked for.
        count: usize,
        /// What the kernel said (ENOSPC or ENOMEM).
        source: io::Error,
    },
    /// gntdev could not map a guest's grants; `step` says which call failed.
    #[error("mapping {count} grant(s) of domain {domid} failed at {step}: {source}")]
    GrantMap {
        /// The failing step (the ioctl, or the mmap that actually maps the grants).
        step: &'static str,
        /// The granting domain.
        domid: u32,
        /// Grants asked for.
        count: usize,
        /// What the kernel said.
        source: io::Error,
    },
    /// The caller passed something the binding refuses before asking the kernel.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// The event channel's descriptor reported an error or hang-up.
    #[error("event channel (local port {port}) reported an error or hang-up")]
    ChannelClosed {
        /// Our local port.
        port: u32,
    },
    /// This machine's page size is not Xen's 4096 bytes, which this binding assumes.
    #[error("unsupported page size {0}: this binding maps 4096-byte Xen pages one to one")]
    PageSize(usize),
}

impl XenError {
    #[cfg(feature = "grants")]
    pub(crate) fn os(op: &'static str) -> Self {
        XenError::Os { op, source: io::Error::last_os_error() }
    }

    /// The OS error number behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            XenError::DeviceMissing { source, .. }
            | XenError::Os { source, .. }
            | XenError::GrantLimit { source, .. }
            | XenError::GrantMap { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
