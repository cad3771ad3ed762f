//! Primary and explicit contexts. Each thread's context stack lives in the guest (as the
//! driver keeps it per thread); the host follows lazily: before a request that needs a
//! context, the connection tells the host to switch when the calling thread's current
//! context differs from the one the host has current (`Conn::enter_current`).

use crate::rt::{
    current_ctx, handle_of, handle_ptr, session, with_ctx_stack, CuError, CuResult, Out, PrimaryState, Session,
};
use cudarc::driver::sys;
use std::ffi::{c_int, c_uint};
use vgpu_proto::generated as p;
use vgpu_proto::{Done, Handle};

fn check_device(dev: sys::CUdevice) -> CuResult<()> {
    if dev == 0 {
        Ok(())
    } else {
        Err(CuError::INVALID_DEVICE)
    }
}

/// A context argument that must name a live context.
fn live(ctx: sys::CUcontext) -> CuResult<Handle> {
    let h = handle_of(ctx);
    if ctx.is_null() || !session()?.is_context(h) {
        return Err(CuError::INVALID_CONTEXT);
    }
    Ok(h)
}

/// The primary context's state, locked.
fn primary(s: &Session) -> CuResult<std::sync::MutexGuard<'_, PrimaryState>> {
    s.primary.lock().map_err(|_| CuError::UNKNOWN)
}

/// The primary context goes inactive (last release, or reset): the host frees what was
/// made in it and its flags return to 0, as the driver's do.
fn deactivate(s: &Session, st: &mut PrimaryState) -> CuResult<()> {
    let mut c = s.lock();
    let _: Done = c.call(&p::PrimaryCtxReset {})?;
    if st.flags != 0 {
        let _: Done = c.call(&p::PrimaryCtxSetFlags { flags: 0 })?;
    }
    c.layouts.clear();
    st.active = false;
    st.flags = 0;
    Ok(())
}

/// `cuDevicePrimaryCtxRetain`.
pub unsafe fn cu_device_primary_ctx_retain(pctx: *mut sys::CUcontext, dev: sys::CUdevice) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(pctx) }?;
    let s = session()?;
    check_device(dev)?;
    let mut st = primary(s)?;
    st.retains = st.retains.checked_add(1).ok_or(CuError::INVALID_VALUE)?;
    st.active = true;
    out.set(handle_ptr(s.info.primary_ctx));
    Ok(())
}

/// `cuDevicePrimaryCtxRelease_v2`: the last release destroys the primary context.
pub unsafe fn cu_device_primary_ctx_release_v2(dev: sys::CUdevice) -> CuResult<()> {
    let s = session()?;
    check_device(dev)?;
    let last = {
        let st = primary(s)?;
        st.retains == 1 && st.active
    };
    if last {
        // Context-local storage destructors run first, with no lock held (they call back
        // into the driver).
        super::context_gone(s.info.primary_ctx);
    }
    let mut st = primary(s)?;
    st.retains = st.retains.checked_sub(1).ok_or(CuError::INVALID_CONTEXT)?;
    if st.retains == 0 && st.active {
        deactivate(s, &mut st)?;
    }
    Ok(())
}

/// `cuDevicePrimaryCtxReset_v2`: destroys the primary context's objects; outstanding
/// retains stay counted (as the driver's do).
pub unsafe fn cu_device_primary_ctx_reset_v2(dev: sys::CUdevice) -> CuResult<()> {
    let s = session()?;
    check_device(dev)?;
    super::context_gone(s.info.primary_ctx);
    let mut st = primary(s)?;
    deactivate(s, &mut st)
}

/// `cuDevicePrimaryCtxGetState`.
pub unsafe fn cu_device_primary_ctx_get_state(
    dev: sys::CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: non-null out-pointers are valid for one write.
    let flags = unsafe { Out::required(flags) }?;
    // SAFETY: as above.
    let active = unsafe { Out::required(active) }?;
    let s = session()?;
    check_device(dev)?;
    let st = primary(s)?;
    flags.set(st.flags);
    active.set(c_int::from(st.active));
    Ok(())
}

/// `cuDevicePrimaryCtxSetFlags_v2`.
pub unsafe fn cu_device_primary_ctx_set_flags_v2(dev: sys::CUdevice, flags: c_uint) -> CuResult<()> {
    let s = session()?;
    check_device(dev)?;
    let mut st = primary(s)?;
    let _: Done = s.lock().call(&p::PrimaryCtxSetFlags { flags })?;
    st.flags = flags;
    Ok(())
}

fn create(flags: c_uint, dev: sys::CUdevice) -> CuResult<Handle> {
    let s = session()?;
    check_device(dev)?;
    let mut c = s.lock();
    let r: p::CtxCreateReply = c.call(&p::CtxCreate { flags })?;
    // The host made the new context current, as the driver does.
    c.host_switched(r.ctx);
    drop(c);
    s.contexts.lock().map_err(|_| CuError::UNKNOWN)?.insert(r.ctx.0);
    with_ctx_stack(|st| st.push(r.ctx));
    Ok(r.ctx)
}

/// `cuCtxCreate_v2`.
pub unsafe fn cu_ctx_create_v2(pctx: *mut sys::CUcontext, flags: c_uint, dev: sys::CUdevice) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(pctx) }?;
    out.set(handle_ptr(create(flags, dev)?));
    Ok(())
}

/// `cuCtxCreate_v4`: execution-affinity and CIG parameters are not supported.
pub unsafe fn cu_ctx_create_v4(
    pctx: *mut sys::CUcontext,
    params: *mut sys::CUctxCreateParams,
    flags: c_uint,
    dev: sys::CUdevice,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(pctx) }?;
    if !params.is_null() {
        // SAFETY: CUDA's contract: non-null params point to a CUctxCreateParams.
        let prm = unsafe { params.read_unaligned() };
        if prm.numExecAffinityParams != 0 || !prm.cigParams.is_null() {
            return Err(CuError::NOT_SUPPORTED);
        }
    }
    out.set(handle_ptr(create(flags, dev)?));
    Ok(())
}

/// `cuCtxDestroy_v2`.
pub unsafe fn cu_ctx_destroy_v2(ctx: sys::CUcontext) -> CuResult<()> {
    if ctx.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let h = live(ctx)?;
    let s = session()?;
    super::context_gone(h);
    let mut c = s.lock();
    let _: Done = c.call(&p::CtxDestroy { ctx: h })?;
    if c.host_ctx() == h {
        c.host_switched(s.info.primary_ctx);
    }
    drop(c);
    s.contexts.lock().map_err(|_| CuError::UNKNOWN)?.remove(&h.0);
    s.destroyed.lock().map_err(|_| CuError::UNKNOWN)?.insert(h.0);
    with_ctx_stack(|st| st.retain(|x| *x != h));
    Ok(())
}

/// `cuCtxPushCurrent_v2`.
pub unsafe fn cu_ctx_push_current_v2(ctx: sys::CUcontext) -> CuResult<()> {
    let h = live(ctx)?;
    with_ctx_stack(|st| st.push(h));
    Ok(())
}

/// `cuCtxPopCurrent_v2`.
pub unsafe fn cu_ctx_pop_current_v2(pctx: *mut sys::CUcontext) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::optional(pctx) }?;
    session()?;
    let h = with_ctx_stack(|st| st.pop()).ok_or(CuError::INVALID_CONTEXT)?;
    out.set(handle_ptr(h));
    Ok(())
}

/// `cuCtxSetCurrent`: replaces the top of the stack (NULL pops it).
pub unsafe fn cu_ctx_set_current(ctx: sys::CUcontext) -> CuResult<()> {
    session()?;
    if ctx.is_null() {
        with_ctx_stack(|st| st.pop());
        return Ok(());
    }
    let h = live(ctx)?;
    with_ctx_stack(|st| match st.last_mut() {
        Some(top) => *top = h,
        None => st.push(h),
    });
    Ok(())
}

/// `cuCtxGetCurrent`.
pub unsafe fn cu_ctx_get_current(pctx: *mut sys::CUcontext) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(pctx) }?;
    session()?;
    out.set(current_ctx().map_or(std::ptr::null_mut(), handle_ptr));
    Ok(())
}

/// `cuCtxGetDevice`.
pub unsafe fn cu_ctx_get_device(device: *mut sys::CUdevice) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(device) }?;
    session()?;
    current_ctx().ok_or(CuError::INVALID_CONTEXT)?;
    out.set(0);
    Ok(())
}

/// `cuCtxGetDevice_v2`: of `ctx`, or of the current context when NULL.
pub unsafe fn cu_ctx_get_device_v2(device: *mut sys::CUdevice, ctx: sys::CUcontext) -> CuResult<()> {
    if ctx.is_null() {
        // SAFETY: forwarded contract.
        return unsafe { cu_ctx_get_device(device) };
    }
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(device) }?;
    live(ctx)?;
    out.set(0);
    Ok(())
}

/// `cuCtxSynchronize_v2`: waits for `ctx` (or the current context when NULL).
pub unsafe fn cu_ctx_synchronize_v2(ctx: sys::CUcontext) -> CuResult<()> {
    if session()?.destroyed.lock().map_err(|_| CuError::UNKNOWN)?.contains(&handle_of(ctx).0) {
        return Err(CuError::CONTEXT_IS_DESTROYED);
    }
    let target = if ctx.is_null() { current_ctx().ok_or(CuError::INVALID_CONTEXT)? } else { live(ctx)? };
    let s = session()?;
    let mut c = s.lock();
    c.switch_to(target)?;
    let _: Done = c.call(&p::CuCtxSynchronize {})?;
    Ok(())
}
