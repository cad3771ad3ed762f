//! CUDA arrays, texture and surface objects.
//!
//! Arrays live in the host's driver; the program gets the zone's handle for one. Their
//! descriptors are kept here, as created, for `cuArrayGetDescriptor`/`cuArray3DGetDescriptor`.
//! Copies to and from arrays go through the pitched-copy path (`pitched.rs`): the 1-D
//! `cuMemcpy*A*` calls are copies of one row there.
//!
//! Texture and surface objects are the driver's values (kernels take them as parameters):
//! the host makes them from the resource the program described, with the array's handle
//! or linear memory the host checks, and the program's texture and view descriptors as
//! bytes. The descriptors are kept here, as the program passed them, for the `Get*Desc`
//! calls.

use super::pitched::{pitched, Copy3d, Side, MEMORYTYPE_ARRAY, MEMORYTYPE_DEVICE, MEMORYTYPE_HOST, SHAPE_PLANE};
use crate::rt::{self, handle_of, handle_ptr, session, CuError, CuResult, Out};
use cudarc::driver::sys;
use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Mutex;
use vgpu_proto::generated as p;
use vgpu_proto::{Done, Handle};

/// Arrays made by this process: handle → their 3-D descriptor (height and depth 0 where the
/// program left them out).
static ARRAYS: Mutex<Option<HashMap<u64, sys::CUDA_ARRAY3D_DESCRIPTOR>>> = Mutex::new(None);

/// The descriptors a texture or surface object was made from, as the program passed them.
struct TexDescs {
    res: [u8; RES_DESC_LEN],
    tex: Option<[u8; TEX_DESC_LEN]>,
    view: Option<[u8; VIEW_DESC_LEN]>,
}

/// Texture (`false`) and surface (`true`) objects made by this process, by value.
static TEXTURES: Mutex<Option<HashMap<(bool, u64), TexDescs>>> = Mutex::new(None);

const RES_DESC_LEN: usize = size_of::<sys::CUDA_RESOURCE_DESC>();
const TEX_DESC_LEN: usize = size_of::<sys::CUDA_TEXTURE_DESC>();
const VIEW_DESC_LEN: usize = size_of::<sys::CUDA_RESOURCE_VIEW_DESC>();

/// `CU_RESOURCE_TYPE_ARRAY`, `…_LINEAR`, `…_PITCH2D` (mipmapped arrays are refused by the
/// host).
const RESOURCE_ARRAY: u32 = 0;
const RESOURCE_LINEAR: u32 = 2;
const RESOURCE_PITCH2D: u32 = 3;

/// The bytes of a C structure the program passed.
///
/// # Safety
/// `p` must point to `N` readable bytes.
unsafe fn bytes_at<const N: usize>(p: *const u8) -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: the caller's contract; `b` is a distinct buffer of `N` bytes.
    unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), N) };
    b
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

/// Makes an array of shape `d` and writes its handle.
fn create(out: Out<sys::CUarray>, d: sys::CUDA_ARRAY3D_DESCRIPTOR, raw_format: u32) -> CuResult<()> {
    let req = p::ArrayCreate {
        width: d.Width as u64,
        height: d.Height as u64,
        depth: d.Depth as u64,
        format: raw_format,
        channels: d.NumChannels,
        flags: d.Flags,
    };
    let r: p::ArrayCreateReply = rt::call(&req, true)?;
    ARRAYS.lock().map_err(|_| CuError::UNKNOWN)?.get_or_insert_with(HashMap::new).insert(r.array.0, d);
    out.set(handle_ptr(r.array));
    Ok(())
}

/// The descriptor of a live array of this process.
fn descriptor(h: sys::CUarray) -> CuResult<sys::CUDA_ARRAY3D_DESCRIPTOR> {
    let arrays = ARRAYS.lock().map_err(|_| CuError::UNKNOWN)?;
    arrays.as_ref().and_then(|m| m.get(&handle_of(h).0)).copied().ok_or(CuError::INVALID_HANDLE)
}

/// `cuArrayCreate_v2`.
pub unsafe fn cu_array_create_v2(p: *mut sys::CUarray, desc: *const sys::CUDA_ARRAY_DESCRIPTOR) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(p) }?;
    if desc.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    type D = sys::CUDA_ARRAY_DESCRIPTOR;
    // SAFETY: CUDA's contract: `desc` points to the structure; read as bytes (its format is
    // a C enum, which must never be read into a Rust enum).
    let b: [u8; size_of::<D>()] = unsafe { bytes_at(desc.cast()) };
    let format = u32_at(&b, std::mem::offset_of!(D, Format));
    let d = descriptor_3d(
        u64_at(&b, std::mem::offset_of!(D, Width)),
        u64_at(&b, std::mem::offset_of!(D, Height)),
        0,
        format,
        u32_at(&b, std::mem::offset_of!(D, NumChannels)),
        0,
    )?;
    create(out, d, format)
}

/// `cuArray3DCreate_v2`.
pub unsafe fn cu_array3_d_create_v2(p: *mut sys::CUarray, desc: *const sys::CUDA_ARRAY3D_DESCRIPTOR) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(p) }?;
    if desc.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    type D = sys::CUDA_ARRAY3D_DESCRIPTOR;
    // SAFETY: as in `cuArrayCreate_v2`.
    let b: [u8; size_of::<D>()] = unsafe { bytes_at(desc.cast()) };
    let format = u32_at(&b, std::mem::offset_of!(D, Format));
    let d = descriptor_3d(
        u64_at(&b, std::mem::offset_of!(D, Width)),
        u64_at(&b, std::mem::offset_of!(D, Height)),
        u64_at(&b, std::mem::offset_of!(D, Depth)),
        format,
        u32_at(&b, std::mem::offset_of!(D, NumChannels)),
        u32_at(&b, std::mem::offset_of!(D, Flags)),
    )?;
    create(out, d, format)
}

/// A 3-D descriptor, kept for the `Get` calls: only formats the bindings declare can be
/// held in one (the host refuses the others anyway).
fn descriptor_3d(
    width: u64,
    height: u64,
    depth: u64,
    format: u32,
    channels: u32,
    flags: u32,
) -> CuResult<sys::CUDA_ARRAY3D_DESCRIPTOR> {
    use sys::CUarray_format as F;
    let f = match format {
        0x01 => F::CU_AD_FORMAT_UNSIGNED_INT8,
        0x02 => F::CU_AD_FORMAT_UNSIGNED_INT16,
        0x03 => F::CU_AD_FORMAT_UNSIGNED_INT32,
        0x08 => F::CU_AD_FORMAT_SIGNED_INT8,
        0x09 => F::CU_AD_FORMAT_SIGNED_INT16,
        0x0a => F::CU_AD_FORMAT_SIGNED_INT32,
        0x10 => F::CU_AD_FORMAT_HALF,
        0x20 => F::CU_AD_FORMAT_FLOAT,
        _ => return Err(rt::unsupported_err("CUDA arrays of block-compressed or video formats")),
    };
    let size = |v: u64| usize::try_from(v).map_err(|_| CuError::INVALID_VALUE);
    Ok(sys::CUDA_ARRAY3D_DESCRIPTOR {
        Width: size(width)?,
        Height: size(height)?,
        Depth: size(depth)?,
        Format: f,
        NumChannels: channels,
        Flags: flags,
    })
}

/// `cuArrayDestroy`.
pub unsafe fn cu_array_destroy(h: sys::CUarray) -> CuResult<()> {
    let _: Done = rt::call(&p::ArrayDestroy { array: handle_of(h) }, true)?;
    if let Some(m) = ARRAYS.lock().map_err(|_| CuError::UNKNOWN)?.as_mut() {
        m.remove(&handle_of(h).0);
    }
    Ok(())
}

/// `cuArrayGetDescriptor_v2`.
pub unsafe fn cu_array_get_descriptor_v2(out: *mut sys::CUDA_ARRAY_DESCRIPTOR, h: sys::CUarray) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(out) }?;
    session()?;
    let d = descriptor(h)?;
    out.set(sys::CUDA_ARRAY_DESCRIPTOR {
        Width: d.Width,
        Height: d.Height,
        Format: d.Format,
        NumChannels: d.NumChannels,
    });
    Ok(())
}

/// `cuArray3DGetDescriptor_v2`.
pub unsafe fn cu_array3_d_get_descriptor_v2(out: *mut sys::CUDA_ARRAY3D_DESCRIPTOR, h: sys::CUarray) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(out) }?;
    session()?;
    out.set(descriptor(h)?);
    Ok(())
}

// ---- 1-D copies with arrays: one row of the pitched path ----------------------------------

/// A side of a one-row copy.
fn side(memory_type: u32, host: usize, device: u64, array: usize, x: u64, n: u64) -> Side {
    Side { x, y: 0, z: 0, memory_type, host, device, array, pitch: n, height: 1 }
}

/// Copies `n` bytes between two one-row sides.
fn one_row(src: Side, dst: Side, n: u64, stream: Handle, asynchronous: bool) -> CuResult<()> {
    let c = Copy3d { src, dst, width: n, height: 1, depth: 1 };
    pitched(&c, SHAPE_PLANE, stream, asynchronous)
}

/// `cuMemcpyHtoA_v2`.
pub unsafe fn cu_memcpy_hto_a_v2(
    dst: sys::CUarray,
    offset: usize,
    src: *const std::ffi::c_void,
    n: usize,
) -> CuResult<()> {
    let (d, s) = (side(MEMORYTYPE_ARRAY, 0, 0, dst.addr(), offset as u64, n as u64), host_side(src.addr(), n));
    one_row(s, d, n as u64, rt::stream_arg(std::ptr::null_mut())?, false)
}

/// `cuMemcpyHtoAAsync_v2`.
pub unsafe fn cu_memcpy_hto_a_async_v2(
    dst: sys::CUarray,
    offset: usize,
    src: *const std::ffi::c_void,
    n: usize,
    stream: sys::CUstream,
) -> CuResult<()> {
    let (d, s) = (side(MEMORYTYPE_ARRAY, 0, 0, dst.addr(), offset as u64, n as u64), host_side(src.addr(), n));
    one_row(s, d, n as u64, rt::stream_arg(stream)?, true)
}

/// `cuMemcpyAtoH_v2`.
pub unsafe fn cu_memcpy_ato_h_v2(
    dst: *mut std::ffi::c_void,
    src: sys::CUarray,
    offset: usize,
    n: usize,
) -> CuResult<()> {
    let (s, d) = (side(MEMORYTYPE_ARRAY, 0, 0, src.addr(), offset as u64, n as u64), host_side(dst.addr(), n));
    one_row(s, d, n as u64, rt::stream_arg(std::ptr::null_mut())?, false)
}

/// `cuMemcpyAtoHAsync_v2`.
pub unsafe fn cu_memcpy_ato_h_async_v2(
    dst: *mut std::ffi::c_void,
    src: sys::CUarray,
    offset: usize,
    n: usize,
    stream: sys::CUstream,
) -> CuResult<()> {
    let (s, d) = (side(MEMORYTYPE_ARRAY, 0, 0, src.addr(), offset as u64, n as u64), host_side(dst.addr(), n));
    one_row(s, d, n as u64, rt::stream_arg(stream)?, true)
}

/// `cuMemcpyDtoA_v2`.
pub unsafe fn cu_memcpy_dto_a_v2(dst: sys::CUarray, offset: usize, src: sys::CUdeviceptr, n: usize) -> CuResult<()> {
    let d = side(MEMORYTYPE_ARRAY, 0, 0, dst.addr(), offset as u64, n as u64);
    let s = side(MEMORYTYPE_DEVICE, 0, src, 0, 0, n as u64);
    one_row(s, d, n as u64, rt::stream_arg(std::ptr::null_mut())?, false)
}

/// `cuMemcpyAtoD_v2`.
pub unsafe fn cu_memcpy_ato_d_v2(dst: sys::CUdeviceptr, src: sys::CUarray, offset: usize, n: usize) -> CuResult<()> {
    let s = side(MEMORYTYPE_ARRAY, 0, 0, src.addr(), offset as u64, n as u64);
    let d = side(MEMORYTYPE_DEVICE, 0, dst, 0, 0, n as u64);
    one_row(s, d, n as u64, rt::stream_arg(std::ptr::null_mut())?, false)
}

/// `cuMemcpyAtoA_v2`.
pub unsafe fn cu_memcpy_ato_a_v2(
    dst: sys::CUarray,
    dst_offset: usize,
    src: sys::CUarray,
    src_offset: usize,
    n: usize,
) -> CuResult<()> {
    let s = side(MEMORYTYPE_ARRAY, 0, 0, src.addr(), src_offset as u64, n as u64);
    let d = side(MEMORYTYPE_ARRAY, 0, 0, dst.addr(), dst_offset as u64, n as u64);
    one_row(s, d, n as u64, rt::stream_arg(std::ptr::null_mut())?, false)
}

/// A host buffer of `n` bytes as a one-row side (NULL: `CUDA_ERROR_INVALID_VALUE`).
fn host_side(addr: usize, n: usize) -> Side {
    side(MEMORYTYPE_HOST, addr, 0, 0, 0, n as u64)
}

// ---- texture and surface objects ----------------------------------------------------------

/// The request for a texture object of resource `res` (the program's bytes).
fn tex_request(res: &[u8; RES_DESC_LEN]) -> CuResult<p::TexObjectCreate> {
    let res_type = u32_at(res, 0);
    let mut req = p::TexObjectCreate {
        res_type,
        array: Handle(0),
        dptr: 0,
        format: 0,
        channels: 0,
        width: 0,
        height: 0,
        pitch: 0,
        size: 0,
        res_flags: u32_at(res, 136),
        tex_desc: Vec::new(),
        view_desc: Vec::new(),
    };
    match res_type {
        RESOURCE_ARRAY => req.array = Handle(u64_at(res, 8)),
        RESOURCE_LINEAR => {
            (req.dptr, req.format, req.channels, req.size) =
                (u64_at(res, 8), u32_at(res, 16), u32_at(res, 20), u64_at(res, 24));
        }
        RESOURCE_PITCH2D => {
            (req.dptr, req.format, req.channels) = (u64_at(res, 8), u32_at(res, 16), u32_at(res, 20));
            (req.width, req.height, req.pitch) = (u64_at(res, 24), u64_at(res, 32), u64_at(res, 40));
        }
        // Mipmapped arrays and unknown types: the host answers.
        _ => {}
    }
    Ok(req)
}

fn remember(surface: bool, value: u64, descs: TexDescs) -> CuResult<()> {
    TEXTURES.lock().map_err(|_| CuError::UNKNOWN)?.get_or_insert_with(HashMap::new).insert((surface, value), descs);
    Ok(())
}

fn forget(surface: bool, value: u64) -> CuResult<()> {
    if let Some(m) = TEXTURES.lock().map_err(|_| CuError::UNKNOWN)?.as_mut() {
        m.remove(&(surface, value));
    }
    Ok(())
}

/// Runs `f` on the descriptors of a live texture or surface object of this process.
fn with_descs<T>(surface: bool, value: u64, f: impl FnOnce(&TexDescs) -> T) -> CuResult<T> {
    session()?;
    let m = TEXTURES.lock().map_err(|_| CuError::UNKNOWN)?;
    m.as_ref().and_then(|m| m.get(&(surface, value))).map(f).ok_or(CuError::INVALID_VALUE)
}

/// `cuTexObjectCreate`.
pub unsafe fn cu_tex_object_create(
    out: *mut sys::CUtexObject,
    res: *const sys::CUDA_RESOURCE_DESC,
    tex: *const sys::CUDA_TEXTURE_DESC,
    view: *const sys::CUDA_RESOURCE_VIEW_DESC,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(out) }?;
    if res.is_null() || tex.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: each non-null descriptor points to its structure; read as
    // bytes (they hold C enums).
    let res = unsafe { bytes_at::<RES_DESC_LEN>(res.cast()) };
    // SAFETY: as above.
    let tex = unsafe { bytes_at::<TEX_DESC_LEN>(tex.cast()) };
    // SAFETY: as above.
    let view = (!view.is_null()).then(|| unsafe { bytes_at::<VIEW_DESC_LEN>(view.cast()) });
    let mut req = tex_request(&res)?;
    req.tex_desc = tex.to_vec();
    req.view_desc = view.map(|v| v.to_vec()).unwrap_or_default();
    let r: p::TexObjectCreateReply = rt::call(&req, true)?;
    remember(false, r.tex, TexDescs { res, tex: Some(tex), view })?;
    out.set(r.tex);
    Ok(())
}

/// `cuTexObjectDestroy`.
pub unsafe fn cu_tex_object_destroy(tex: sys::CUtexObject) -> CuResult<()> {
    let _: Done = rt::call(&p::TexObjectDestroy { tex }, true)?;
    forget(false, tex)
}

/// `cuTexObjectGetResourceDesc`.
pub unsafe fn cu_tex_object_get_resource_desc(
    out: *mut sys::CUDA_RESOURCE_DESC,
    tex: sys::CUtexObject,
) -> CuResult<()> {
    let res = with_descs(false, tex, |d| d.res)?;
    // SAFETY: CUDA's contract: a non-null `out` is valid for the structure's bytes.
    unsafe { write_bytes(out.cast(), &res) }
}

/// `cuTexObjectGetTextureDesc`.
pub unsafe fn cu_tex_object_get_texture_desc(out: *mut sys::CUDA_TEXTURE_DESC, tex: sys::CUtexObject) -> CuResult<()> {
    let t = with_descs(false, tex, |d| d.tex)?.ok_or(CuError::INVALID_VALUE)?;
    // SAFETY: as above.
    unsafe { write_bytes(out.cast(), &t) }
}

/// `cuTexObjectGetResourceViewDesc` (an object made without a view has none:
/// `CUDA_ERROR_INVALID_VALUE`).
pub unsafe fn cu_tex_object_get_resource_view_desc(
    out: *mut sys::CUDA_RESOURCE_VIEW_DESC,
    tex: sys::CUtexObject,
) -> CuResult<()> {
    let v = with_descs(false, tex, |d| d.view)?.ok_or(CuError::INVALID_VALUE)?;
    // SAFETY: as above.
    unsafe { write_bytes(out.cast(), &v) }
}

/// `cuSurfObjectCreate`: surfaces are made from arrays.
pub unsafe fn cu_surf_object_create(out: *mut sys::CUsurfObject, res: *const sys::CUDA_RESOURCE_DESC) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(out) }?;
    if res.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: as in `cuTexObjectCreate`.
    let res = unsafe { bytes_at::<RES_DESC_LEN>(res.cast()) };
    if u32_at(&res, 0) != RESOURCE_ARRAY || u32_at(&res, 136) != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let r: p::SurfObjectCreateReply = rt::call(&p::SurfObjectCreate { array: Handle(u64_at(&res, 8)) }, true)?;
    remember(true, r.surf, TexDescs { res, tex: None, view: None })?;
    out.set(r.surf);
    Ok(())
}

/// `cuSurfObjectDestroy`.
pub unsafe fn cu_surf_object_destroy(surf: sys::CUsurfObject) -> CuResult<()> {
    let _: Done = rt::call(&p::SurfObjectDestroy { surf }, true)?;
    forget(true, surf)
}

/// `cuSurfObjectGetResourceDesc`.
pub unsafe fn cu_surf_object_get_resource_desc(
    out: *mut sys::CUDA_RESOURCE_DESC,
    surf: sys::CUsurfObject,
) -> CuResult<()> {
    let res = with_descs(true, surf, |d| d.res)?;
    // SAFETY: as in `cuTexObjectGetResourceDesc`.
    unsafe { write_bytes(out.cast(), &res) }
}

/// Writes a descriptor's bytes to the program's structure.
///
/// # Safety
/// A non-null `out` must be valid for `bytes.len()` bytes.
unsafe fn write_bytes(out: *mut u8, bytes: &[u8]) -> CuResult<()> {
    if out.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the caller's contract; `bytes` is a distinct buffer.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out, bytes.len()) };
    Ok(())
}
