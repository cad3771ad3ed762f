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

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

pub use idm_core::bulk::BulkRef;
use idm_core::wire::{Message, MessageId};
use serde::{Deserialize, Serialize};

/// Protocol revision of this message set (independent of idm-core's framing version).
///
/// Revision 2 replaced revision 1's hand-written memory messages (ids `0x0110..0x0144`,
/// retired, never reused) with the messages generated from libvgpu's API table (`0x0200..`).
pub const VGPU_PROTOCOL_REVISION: u32 = 2;

pub use generated::{code, CuError};

/// The result of a CUDA operation on either side: a value or a [`CuError`].
pub type CuResult<T> = core::result::Result<T, CuError>;

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

/// One kernel parameter as the driver lays it out (`cuFuncGetParamInfo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSlot {
    /// Byte offset in the packed parameter buffer.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// One launch attribute of `cuLaunchKernelEx` whose value is plain integers (attributes
/// that carry pointers or handles are refused in the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchAttr {
    /// `CUlaunchAttributeID`.
    pub id: u32,
    /// The first 16 bytes of `CUlaunchAttributeValue`, as little-endian words.
    pub value: [u32; 4],
}

/// A kernel launch's geometry and attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchConfig {
    /// Grid size in blocks (x, y, z).
    pub grid: [u32; 3],
    /// Block size in threads (x, y, z).
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes.
    pub shared_mem_bytes: u32,
    /// `cuLaunchKernelEx` attributes (empty for `cuLaunchKernel`).
    pub attrs: Vec<LaunchAttr>,
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
    /// Reply to [`Attach`]: everything the guest serves locally from then on.
    AttachReply = 0x0101 {
        pub zone: u32,
        pub device: DeviceInfo,
        pub window_size: u64,
        /// The primary context's handle.
        pub primary_ctx: Handle,
        /// Device attributes `1..=attributes.len()`: value, or the driver's error code.
        pub attributes: Vec<AttrValue>,
        /// `cuDeviceGetPCIBusId`'s text.
        pub pci_bus_id: String,
    }
    /// Empty success reply.
    Done = 0x0102 {}
}

/// One device attribute as the host's driver reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttrValue {
    /// The attribute's value.
    Value(i32),
    /// The driver's error code for this attribute.
    Error(u32),
}

#[rustfmt::skip]
#[allow(missing_docs, clippy::all)]
pub mod generated;

/// The same pitched copy, waited for or posted (the two requests carry the same fields).
impl From<generated::MemcpyPitched> for generated::MemcpyPitchedAsync {
    fn from(r: generated::MemcpyPitched) -> Self {
        generated::MemcpyPitchedAsync {
            shape: r.shape,
            src_kind: r.src_kind,
            src: r.src,
            src_x: r.src_x,
            src_y: r.src_y,
            src_z: r.src_z,
            src_pitch: r.src_pitch,
            src_height: r.src_height,
            dst_kind: r.dst_kind,
            dst: r.dst,
            dst_x: r.dst_x,
            dst_y: r.dst_y,
            dst_z: r.dst_z,
            dst_pitch: r.dst_pitch,
            dst_height: r.dst_height,
            width: r.width,
            height: r.height,
            depth: r.depth,
            stream: r.stream,
        }
    }
}

/// The same pitched copy, posted or waited for.
impl From<generated::MemcpyPitchedAsync> for generated::MemcpyPitched {
    fn from(r: generated::MemcpyPitchedAsync) -> Self {
        generated::MemcpyPitched {
            shape: r.shape,
            src_kind: r.src_kind,
            src: r.src,
            src_x: r.src_x,
            src_y: r.src_y,
            src_z: r.src_z,
            src_pitch: r.src_pitch,
            src_height: r.src_height,
            dst_kind: r.dst_kind,
            dst: r.dst,
            dst_x: r.dst_x,
            dst_y: r.dst_y,
            dst_z: r.dst_z,
            dst_pitch: r.dst_pitch,
            dst_height: r.dst_height,
            width: r.width,
            height: r.height,
            depth: r.depth,
            stream: r.stream,
        }
    }
}

/// Handles of the NULL stream and CUDA's two special stream values (`CU_STREAM_LEGACY`,
/// `CU_STREAM_PER_THREAD`): all three name the context's default stream here.
pub const DEFAULT_STREAMS: [Handle; 3] = [Handle(0), Handle(1), Handle(2)];

#[cfg(test)]
mod tests {
    use super::generated::*;
    use super::*;
    use idm_core::wire::{decode_body, encode_body};

    #[test]
    fn ids_are_stable() {
        // Changing an id breaks every deployed guest: these only ever grow.
        assert_eq!(Attach::ID, MessageId(0x0100));
        assert_eq!(CuMemAllocV2::ID, MessageId(0x0200));
        assert_eq!(Launch::ID, MessageId(0x0241));
        assert!(REQUEST_IDS.windows(2).all(|w| w[0].0 < w[1].0), "ids are unique and sorted");
        assert!(REQUEST_IDS.iter().all(|id| id.0 >= 0x0200 && id.0 < 0x8000));
    }

    #[test]
    fn bodies_round_trip_and_garbage_is_refused() {
        let mut buf = [0u8; 128];
        let body = encode_body(&CuMemAllocV2 { bytesize: 1 << 20 }, &mut buf).unwrap();
        assert_eq!(decode_body::<CuMemAllocV2>(body).unwrap(), CuMemAllocV2 { bytesize: 1 << 20 });
        assert!(decode_body::<CuMemAllocV2>(&[0xff, 0xff]).is_err());
        let l = Launch {
            func: Handle(7),
            config: LaunchConfig { grid: [1, 2, 3], block: [32, 1, 1], shared_mem_bytes: 0, attrs: Vec::new() },
            stream: Handle(0),
            params: alloc::vec![1, 2, 3],
        };
        let body = encode_body(&l, &mut buf).unwrap();
        assert_eq!(decode_body::<Launch>(body).unwrap(), l);
        assert!(is_posted(Launch::ID) && !is_posted(CuMemAllocV2::ID));
    }
}
