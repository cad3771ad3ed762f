//! The CUDA remoting protocol between `libvgpu` (guest) and `host-proxy` (driver domain).
//!
//! Every request is an [`idm_core::Message`] with an explicit, stable id in
//! `0x0100..`; ids are never reused. Replies are [`Done`], a typed reply, or an idm-core
//! error reply whose code is a [`CuResult`] value. Bulk data travels through the shared
//! data window as [`BulkRef`] descriptors, never inside a message.
//!
//! Device pointers (`dptr`) are addresses in the zone's *own* CUDA context: each zone runs
//! in its own worker process and context, so such an address names nothing outside the
//! zone, and kernels need real addresses for pointer arithmetic. Every other object
//! (streams, events, modules, …) is an opaque per-zone [`Handle`].
#![no_std]
#![forbid(unsafe_code)]

pub use idm_core::bulk::BulkRef;
use idm_core::wire::{Message, MessageId};
use serde::{Deserialize, Serialize};

/// Protocol revision of this message set (independent of idm-core's framing version).
pub const VGPU_PROTOCOL_REVISION: u32 = 1;

/// CUDA driver API result codes used on the wire (values match `cuda.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CuResult;

impl CuResult {
    /// `CUDA_ERROR_INVALID_VALUE`.
    pub const INVALID_VALUE: u32 = 1;
    /// `CUDA_ERROR_OUT_OF_MEMORY`.
    pub const OUT_OF_MEMORY: u32 = 2;
    /// `CUDA_ERROR_NOT_INITIALIZED`.
    pub const NOT_INITIALIZED: u32 = 3;
    /// `CUDA_ERROR_INVALID_CONTEXT`.
    pub const INVALID_CONTEXT: u32 = 201;
    /// `CUDA_ERROR_INVALID_HANDLE`.
    pub const INVALID_HANDLE: u32 = 400;
    /// `CUDA_ERROR_NOT_FOUND`.
    pub const NOT_FOUND: u32 = 500;
    /// `CUDA_ERROR_ILLEGAL_ADDRESS`.
    pub const ILLEGAL_ADDRESS: u32 = 700;
    /// `CUDA_ERROR_LAUNCH_FAILED`.
    pub const LAUNCH_FAILED: u32 = 719;
    /// `CUDA_ERROR_NOT_PERMITTED`.
    pub const NOT_PERMITTED: u32 = 800;
    /// `CUDA_ERROR_NOT_SUPPORTED`.
    pub const NOT_SUPPORTED: u32 = 801;
    /// `CUDA_ERROR_UNKNOWN`.
    pub const UNKNOWN: u32 = 999;
}

/// An opaque per-zone object handle (generation in the high half, slot in the low half).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Handle(pub u64);

/// What the guest learns about the device once, at attach time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device name, as `cuDeviceGetName` reports it.
    pub name: heapless::String<96>,
    /// Device UUID.
    pub uuid: [u8; 16],
    /// Total memory visible to this zone (its quota, or the device's memory if smaller).
    pub total_mem: u64,
    /// Compute capability major.
    pub cc_major: u32,
    /// Compute capability minor.
    pub cc_minor: u32,
    /// Driver version reported by the host (`cuDriverGetVersion`).
    pub driver_version: u32,
    /// Whether the backend is the simulated test double (never a real GPU).
    pub simulated: bool,
}

macro_rules! messages {
    ($($(#[$m:meta])* $name:ident = $id:literal $body:tt)*) => {
        $(
            $(#[$m])*
            #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
            // Field meanings are in the message's doc line; names follow the CUDA API.
            #[allow(missing_docs)]
            pub struct $name $body
            impl Message for $name {
                const ID: MessageId = MessageId($id);
            }
        )*
    };
}

messages! {
    /// First request after the hello: attach to the zone's GPU context.
    Attach = 0x0100 { pub revision: u32 }
    /// Reply to [`Attach`].
    AttachReply = 0x0101 { pub zone: u32, pub device: DeviceInfo, pub window_size: u64 }
    /// Empty success reply.
    Done = 0x0102 {}
    /// Allocate device memory (`cuMemAlloc`).
    MemAlloc = 0x0110 { pub size: u64 }
    /// Reply to [`MemAlloc`].
    MemAllocReply = 0x0111 { pub dptr: u64 }
    /// Free device memory (`cuMemFree`); `dptr` must be an allocation's start.
    MemFree = 0x0112 { pub dptr: u64 }
    /// Free and total memory for this zone (`cuMemGetInfo`).
    MemGetInfo = 0x0113 {}
    /// Reply to [`MemGetInfo`].
    MemInfo = 0x0114 { pub free: u64, pub total: u64 }
    /// Host-to-device copy from the data window.
    MemcpyHtoD = 0x0120 { pub dst: u64, pub src: BulkRef, pub stream: Option<Handle> }
    /// Device-to-host copy into the data window (synchronous).
    MemcpyDtoH = 0x0121 { pub dst: BulkRef, pub src: u64, pub stream: Option<Handle> }
    /// Device-to-device copy.
    MemcpyDtoD = 0x0122 { pub dst: u64, pub src: u64, pub len: u64, pub stream: Option<Handle> }
    /// Set `count` bytes to `value`.
    MemsetD8 = 0x0123 { pub dst: u64, pub value: u8, pub count: u64, pub stream: Option<Handle> }
    /// Set `count` 32-bit words to `value`.
    MemsetD32 = 0x0124 { pub dst: u64, pub value: u32, pub count: u64, pub stream: Option<Handle> }
    /// Wait for all work of the zone's context (`cuCtxSynchronize`).
    CtxSynchronize = 0x0130 {}
    /// Create a stream.
    StreamCreate = 0x0140 { pub flags: u32 }
    /// Reply carrying a new handle.
    HandleReply = 0x0141 { pub handle: Handle }
    /// Destroy a stream.
    StreamDestroy = 0x0142 { pub stream: Handle }
    /// Wait for a stream's work.
    StreamSynchronize = 0x0143 { pub stream: Handle }
}

idm_core::idm_messages! {
    /// Every request host-proxy understands, decoded by id.
    pub enum Request {
        Attach(Attach),
        MemAlloc(MemAlloc),
        MemFree(MemFree),
        MemGetInfo(MemGetInfo),
        MemcpyHtoD(MemcpyHtoD),
        MemcpyDtoH(MemcpyDtoH),
        MemcpyDtoD(MemcpyDtoD),
        MemsetD8(MemsetD8),
        MemsetD32(MemsetD32),
        CtxSynchronize(CtxSynchronize),
        StreamCreate(StreamCreate),
        StreamDestroy(StreamDestroy),
        StreamSynchronize(StreamSynchronize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable() {
        // Changing an id breaks every deployed guest: this list only ever grows.
        assert_eq!(MemAlloc::ID, MessageId(0x0110));
        assert_eq!(MemcpyHtoD::ID, MessageId(0x0120));
        assert_eq!(StreamCreate::ID, MessageId(0x0140));
    }

    #[test]
    fn decodes_by_id_and_refuses_garbage() {
        let mut buf = [0u8; 64];
        let body = idm_core::wire::encode_body(&MemAlloc { size: 1 << 20 }, &mut buf).unwrap();
        assert!(matches!(Request::decode(MemAlloc::ID, body), Ok(Request::MemAlloc(MemAlloc { size: 1048576 }))));
        assert!(Request::decode(MemFree::ID, &[0xff, 0xff]).is_err());
        assert!(matches!(Request::decode(MessageId(0x0fff), &[]), Ok(Request::Unknown(MessageId(0x0fff)))));
    }
}
