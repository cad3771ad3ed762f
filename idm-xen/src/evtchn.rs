//! `/dev/xen/evtchn`: event channels, Xen's inter-domain doorbells.
//!
//! One [`EventChannel`] owns one open descriptor with exactly one bound port, so the
//! descriptor's readiness means "our port fired". When an event arrives the kernel masks
//! the port and queues its number for `read`; writing the number back unmasks it. Layouts
//! follow `linux/include/uapi/xen/evtchn.h` (every field is an `unsigned int`).

use crate::error::XenError;
use crate::sys::{self, ioc_none, PollResult};
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

#[repr(C)]
struct BindInterdomain {
    remote_domain: u32,
    remote_port: u32,
}
#[repr(C)]
struct BindUnboundPort {
    remote_domain: u32,
}
/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify`: both `{ port }`.
#[repr(C)]
struct PortArg {
    port: u32,
}
const _: () = assert!(size_of::<BindInterdomain>() == 8);
const _: () = assert!(size_of::<BindUnboundPort>() == 4 && size_of::<PortArg>() == 4);

const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 = ioc_none(b'E', 1, size_of::<BindInterdomain>());
const IOCTL_EVTCHN_BIND_UNBOUND_PORT: u32 = ioc_none(b'E', 2, size_of::<BindUnboundPort>());
const IOCTL_EVTCHN_UNBIND: u32 = ioc_none(b'E', 3, size_of::<PortArg>());
const IOCTL_EVTCHN_NOTIFY: u32 = ioc_none(b'E', 4, size_of::<PortArg>());
const IOCTL_EVTCHN_RESET: u32 = ioc_none(b'E', 5, 0);

/// One bound event-channel port on its own descriptor; unbound and closed on drop.
#[derive(Debug)]
pub struct EventChannel {
    file: File,
    port: u32,
}

impl EventChannel {
    /// Path of the device.
    pub const PATH: &'static str = "/dev/xen/evtchn";

    /// Allocates a fresh port that `remote_domid` may bind to; returns it with its number,
    /// to publish to the peer.
    pub fn bind_unbound(remote_domid: u16) -> Result<(Self, u32), XenError> {
        let file = sys::open_device(Self::PATH, true)?;
        let mut op = BindUnboundPort { remote_domain: remote_domid.into() };
        // SAFETY: `op` is the struct the request number encodes, alive for the call.
        let port = unsafe {
            sys::ioctl(&file, IOCTL_EVTCHN_BIND_UNBOUND_PORT, (&raw mut op).cast(), "IOCTL_EVTCHN_BIND_UNBOUND_PORT")
        }?;
        Ok((EventChannel { file, port: port as u32 }, port as u32))
    }

    /// Connects to port `remote_port` that `remote_domid` allocated for us.
    pub fn bind_interdomain(remote_domid: u16, remote_port: u32) -> Result<Self, XenError> {
        let file = sys::open_device(Self::PATH, true)?;
        let mut op = BindInterdomain { remote_domain: remote_domid.into(), remote_port };
        // SAFETY: `op` is the struct the request number encodes, alive for the call.
        let port = unsafe {
            sys::ioctl(&file, IOCTL_EVTCHN_BIND_INTERDOMAIN, (&raw mut op).cast(), "IOCTL_EVTCHN_BIND_INTERDOMAIN")
        }?;
        Ok(EventChannel { file, port: port as u32 })
    }

    /// Our local port number.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Signals the peer.
    pub fn notify(&self) -> Result<(), XenError> {
        let mut op = PortArg { port: self.port };
        // SAFETY: `op` is the struct the request number encodes, alive for the call.
        unsafe { sys::ioctl(&self.file, IOCTL_EVTCHN_NOTIFY, (&raw mut op).cast(), "IOCTL_EVTCHN_NOTIFY") }?;
        Ok(())
    }

    /// Unmasks our port, so the next event is delivered.
    pub fn unmask(&self) -> Result<(), XenError> {
        let n = (&self.file)
            .write(&self.port.to_ne_bytes())
            .map_err(|source| XenError::Os { op: "unmask (write to /dev/xen/evtchn)", source })?;
        if n != 4 {
            return Err(XenError::Os {
                op: "unmask (write to /dev/xen/evtchn)",
                source: io::ErrorKind::WriteZero.into(),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` (`None`: forever) for an event; true if one arrived (or
    /// another thread consumed it just before us: a spurious wake-up), false on timeout.
    /// Consumes the pending events and unmasks the port again.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool, XenError> {
        let closed = XenError::ChannelClosed { port: self.port };
        match sys::poll_readable(self.file.as_fd(), timeout) {
            Ok(PollResult::TimedOut) => return Ok(false),
            Ok(PollResult::Hangup) => return Err(closed),
            Ok(PollResult::Readable) => {}
            Err(source) => return Err(XenError::Os { op: "poll on /dev/xen/evtchn", source }),
        }
        // Port numbers come as native u32s; with one port per descriptor there is at most
        // one pending, but drain a few in case.
        let mut buf = [0u8; 64];
        match (&self.file).read(&mut buf) {
            Ok(0) => return Err(closed),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                // The kernel's pending ring overflowed: reset it, then unmask below.
                // SAFETY: IOCTL_EVTCHN_RESET takes no argument.
                unsafe { sys::ioctl(&self.file, IOCTL_EVTCHN_RESET, std::ptr::null_mut(), "IOCTL_EVTCHN_RESET") }?;
            }
            Err(source) => return Err(XenError::Os { op: "read of /dev/xen/evtchn", source }),
        }
        self.unmask()?;
        Ok(true)
    }
}

impl AsFd for EventChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for EventChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        let mut op = PortArg { port: self.port };
        // Best effort: closing the descriptor unbinds every port on it anyway.
        // SAFETY: `op` is the struct the request number encodes, alive for the call.
        let _ = unsafe { sys::ioctl(&self.file, IOCTL_EVTCHN_UNBIND, (&raw mut op).cast(), "IOCTL_EVTCHN_UNBIND") };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT, 0x0004_4502);
        assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
        assert_eq!(IOCTL_EVTCHN_RESET, 0x0000_4505);
    }

    #[test]
    fn open_without_xen_names_the_device() {
        if std::path::Path::new(EventChannel::PATH).exists() {
            return;
        }
        let msg = EventChannel::bind_unbound(0).unwrap_err().to_string();
        assert!(msg.contains(EventChannel::PATH) && msg.contains("is this a Xen domain?"), "{msg}");
    }
}
