//! Host functions and stream callbacks (`cuLaunchHostFunc`, `cuStreamAddCallback`), run in
//! the guest in stream order.
//!
//! The program's function must run here, in its own process, while the stream's later work
//! waits for it, as with the driver. Each queued function gets an 8-byte rendezvous word in
//! a block of the shared window:
//!
//! ```text
//!  guest (program thread)        host (driver callback thread)      guest (runner thread)
//!  word = gen|ARMED
//!  post HostFunc{stream, word} ─► stream reaches it: word = gen|REACHED
//!                                  waits while word == gen|REACHED ◄─ sees REACHED, runs fn,
//!                                                                     word = gen|DONE
//!                                  returns: the stream goes on
//! ```
//!
//! The runner thread polls only the words it armed (sleeping between rounds) and needs no
//! lock of the connection, so a program thread blocked in a synchronising call while the
//! stream waits for a function cannot deadlock with it. As with the driver, the function
//! must not call CUDA.
//!
//! A function that runs at every launch of a graph (`cuGraphAddHostNode`, or one queued on
//! a capturing stream) keeps its word for the rest of the process: after each run the runner
//! re-arms it with a new generation instead of marking it done. At most
//! [`MAX_PERSISTENT`] such words exist, so one-shot functions always find one.

use crate::rt::{session, CuError, CuResult};
use cudarc::driver::sys;
use idm_core::{RawRegion, SharedMemory};
use std::ffi::{c_uint, c_void};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;
use vgpu_proto::generated as p;

/// Rendezvous words per process (functions queued at once; more wait for a free word).
const SLOTS: usize = 512;
/// Words kept by graphs' host functions (the rest stay for one-shot functions).
pub const MAX_PERSISTENT: usize = 256;
const ARMED: u32 = 1;
const REACHED: u32 = 2;
const DONE: u32 = 3;

/// What to call when the stream gets there.
#[derive(Clone, Copy)]
enum Pending {
    /// `cuLaunchHostFunc`'s `fn(userData)`.
    Func(unsafe extern "C" fn(*mut c_void), usize),
    /// `cuStreamAddCallback`'s `fn(stream, status, userData)`.
    Callback(unsafe extern "C" fn(sys::CUstream, sys::CUresult, *mut c_void), usize, usize),
}

/// One armed word.
#[derive(Clone, Copy)]
struct Armed {
    slot: usize,
    /// The value written (generation and `ARMED`).
    value: u32,
    what: Pending,
    /// Re-armed after each run (a graph's host function) rather than freed.
    persistent: bool,
}

struct State {
    free: Vec<usize>,
    armed: Vec<Armed>,
    generation: u32,
    persistent: usize,
}

impl State {
    /// The next word value: a new generation, `ARMED`.
    fn next_value(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1) & (u32::MAX >> 2);
        (self.generation << 2) | ARMED
    }
}

struct Runner {
    /// The words' block (in the window; lives as long as the process's session).
    words: RawRegion,
    /// Its offset in the window.
    offset: u64,
    state: Mutex<State>,
    changed: Condvar,
}

// SAFETY: `words` is only accessed atomically (RawRegion), from any thread; the rest is
// behind the mutex.
unsafe impl Sync for Runner {}
// SAFETY: as above; nothing is tied to the creating thread.
unsafe impl Send for Runner {}

static RUNNER: OnceLock<CuResult<Runner>> = OnceLock::new();

fn runner() -> CuResult<&'static Runner> {
    let r = RUNNER.get_or_init(|| {
        let s = session()?;
        let mut c = s.lock();
        let block = c.window.alloc((SLOTS * 8) as u64, 0)?;
        let at = c.window.desc_of(block, (SLOTS * 8) as u64)?;
        let base = std::ptr::NonNull::new(block).ok_or(CuError::OUT_OF_MEMORY)?;
        // SAFETY: the block lies in the shared window, which the session (a process-wide
        // static) keeps mapped for the life of the process; its start is 64-byte aligned
        // (window arena blocks); it is only accessed atomically, here and by the host.
        let words = unsafe { RawRegion::new(base, SLOTS * 8) };
        for i in 0..SLOTS {
            words.store_u32(i * 8, DONE, Ordering::Relaxed);
        }
        let runner = Runner {
            words,
            offset: at.offset,
            state: Mutex::new(State {
                free: (0..SLOTS).rev().collect(),
                armed: Vec::new(),
                generation: 0,
                persistent: 0,
            }),
            changed: Condvar::new(),
        };
        Ok(runner)
    });
    let r = r.as_ref().map_err(|e| *e)?;
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let _ = std::thread::Builder::new().name("libvgpu-hostfn".into()).spawn(move || run_loop(r));
    });
    Ok(r)
}

/// Runs each armed function once the host marks its word reached.
fn run_loop(r: &'static Runner) {
    let mut pause = Duration::from_micros(1);
    loop {
        let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.armed.is_empty() {
            st = r.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            pause = Duration::from_micros(1);
        }
        let reached =
            st.armed.iter().position(|a| r.words.load_u32(a.slot * 8, Ordering::Acquire) == (a.value & !3) | REACHED);
        let Some(i) = reached else {
            // Only graphs' functions armed: they may wait long for their next launch.
            let idle = if st.armed.iter().all(|a| a.persistent) { 1000 } else { 200 };
            drop(st);
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_micros(idle));
            continue;
        };
        let Armed { slot, value, what, persistent } = st.armed.swap_remove(i);
        drop(st);
        pause = Duration::from_micros(1);
        let _ = std::panic::catch_unwind(|| match what {
            // SAFETY: the program gave this function and argument to be called once, now.
            Pending::Func(f, data) => unsafe { f(data as *mut c_void) },
            // SAFETY: as above, with the stream it was queued on and success (errors of
            // earlier work surface at the next synchronising call instead).
            Pending::Callback(f, stream, data) => unsafe {
                f(stream as sys::CUstream, sys::CUresult::CUDA_SUCCESS, data as *mut c_void)
            },
        });
        let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
        if persistent {
            // Ready for the next launch: the host waits for any value but "reached".
            let value = st.next_value();
            st.armed.push(Armed { slot, value, what, persistent });
            r.words.store_u32(slot * 8, value, Ordering::Release);
        } else {
            r.words.store_u32(slot * 8, (value & !3) | DONE, Ordering::Release);
            st.free.push(slot);
        }
        r.changed.notify_all();
    }
}

/// Arms a word for `what` and returns its slot and value.
fn arm(r: &Runner, what: Pending, persistent: bool) -> CuResult<(usize, u32)> {
    let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
    if persistent && st.persistent >= MAX_PERSISTENT {
        return Err(CuError::OUT_OF_MEMORY);
    }
    loop {
        if let Some(slot) = st.free.pop() {
            let value = st.next_value();
            r.words.store_u32(slot * 8, value, Ordering::Release);
            st.armed.push(Armed { slot, value, what, persistent });
            st.persistent += usize::from(persistent);
            r.changed.notify_all();
            return Ok((slot, value));
        }
        // Every word is in use: wait for a function to finish.
        st = r.changed.wait(st).unwrap_or_else(|p| p.into_inner());
    }
}

/// Gives back a word whose request the host refused.
fn disarm(r: &Runner, slot: usize, value: u32) {
    let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
    let before = st.armed.len();
    let persistent = st.armed.iter().any(|a| a.slot == slot && a.value == value && a.persistent);
    st.armed.retain(|a| !(a.slot == slot && a.value == value));
    if st.armed.len() < before {
        st.persistent -= usize::from(persistent);
        r.words.store_u32(slot * 8, (value & !3) | DONE, Ordering::Release);
        st.free.push(slot);
    }
}

/// A word for a graph's host node running `f(data)` at every launch: its window offset,
/// for `GraphAddHostNode`, and a guard that gives it back unless kept.
pub fn graph_node_slot(f: unsafe extern "C" fn(*mut c_void), data: usize) -> CuResult<PersistentSlot> {
    let r = runner()?;
    let (slot, value) = arm(r, Pending::Func(f, data), true)?;
    Ok(PersistentSlot { r, slot, value, kept: false })
}

/// Queues libvgpu's own `f(data)` on `stream`, which is capturing: it becomes a host node of
/// the capture's graph (its word kept and re-armed at every launch), left out of the graph's
/// node list.
pub fn queue_captured(stream: vgpu_proto::Handle, f: unsafe extern "C" fn(*mut c_void), data: usize) -> CuResult<()> {
    let slot = graph_node_slot(f, data)?;
    let req = p::HostFuncPersistent { stream, slot: slot.offset(), hidden: true };
    crate::rt::call::<_, vgpu_proto::Done>(&req, true)?;
    slot.keep();
    Ok(())
}

/// A word armed for a graph's host function (see [`graph_node_slot`]).
pub struct PersistentSlot {
    r: &'static Runner,
    slot: usize,
    value: u32,
    kept: bool,
}

impl PersistentSlot {
    /// Its offset in the window.
    pub fn offset(&self) -> u64 {
        self.r.offset + (self.slot * 8) as u64
    }

    /// The host took it: it stays armed for the process's life.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for PersistentSlot {
    fn drop(&mut self) {
        if !self.kept {
            disarm(self.r, self.slot, self.value);
        }
    }
}

/// Arms a word for `what` and queues the host's side on `stream`. On a capturing stream
/// the function becomes a node of the capture's graph: its word is kept and re-armed.
fn queue(stream: sys::CUstream, what: Pending) -> CuResult<()> {
    let r = runner()?;
    let persistent = crate::rt::captures_open() && super::capture::is_capturing(stream)?;
    let (slot, value) = arm(r, what, persistent)?;
    let handle = crate::rt::stream_arg(stream);
    let at = r.offset + (slot * 8) as u64;
    let sent = handle.and_then(|stream| {
        if persistent {
            let req = p::HostFuncPersistent { stream, slot: at, hidden: false };
            crate::rt::call::<_, vgpu_proto::Done>(&req, true).map(drop)
        } else {
            crate::rt::post(&p::HostFunc { stream, slot: at }, true)
        }
    });
    if sent.is_err() {
        disarm(r, slot, value);
    }
    sent
}

/// `cuLaunchHostFunc`.
pub unsafe fn cu_launch_host_func(stream: sys::CUstream, f: sys::CUhostFn, data: *mut c_void) -> CuResult<()> {
    let f = f.ok_or(CuError::INVALID_VALUE)?;
    queue(stream, Pending::Func(f, data as usize))
}

/// `cuStreamAddCallback` (flags must be 0).
pub unsafe fn cu_stream_add_callback(
    stream: sys::CUstream,
    callback: sys::CUstreamCallback,
    data: *mut c_void,
    flags: c_uint,
) -> CuResult<()> {
    let cb = callback.ok_or(CuError::INVALID_VALUE)?;
    if flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    queue(stream, Pending::Callback(cb, stream as usize, data as usize))
}
