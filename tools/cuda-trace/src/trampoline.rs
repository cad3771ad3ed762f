//! The trampolines: the shared body every entry stub jumps to, the return stub, and the Rust
//! functions they call (`enter`, `leave`) with the per-thread shadow stack of return
//! addresses. See the crate's design block for the whole picture.
//!
//! Register use (x86_64 SysV): arguments arrive in `rdi rsi rdx rcx r8 r9`, vector
//! arguments in `xmm0`–`xmm7`, and `al` holds the number of vector registers a variadic
//! call uses; the stubs put the entry id in `r11`, which the ABI leaves to the callee as
//! scratch and no argument uses. `r10` (scratch too) carries the return stub's address.
//!
//! Frame of the shared body (`rbp` = entry `rsp` - 8, so the return address is at `rbp+8`):
//!
//! ```text
//! rbp+8    caller's return address  (replaced by the return stub's address when hooked)
//! rbp      saved rbp
//! rsp+64   xmm0..xmm7 (16 bytes each)
//! rsp+48   rax
//! rsp+0    rdi rsi rdx rcx r8 r9    (passed to enter as the six argument registers)
//! ```
//!
//! Frame of the return stub (entered by the callee's `ret`, so `rsp` = slot + 8):
//!
//! ```text
//! rsp+56   the caller's return address, written by leave's answer (the old slot)
//! rsp+48   rax
//! rsp+40   rdx
//! rsp+0    xmm0, xmm1, 8 bytes of padding
//! ```

use crate::intercept;
use crate::registry::{self, Special};
use crate::tracer::tracer;
use std::cell::{Cell, RefCell};

core::arch::global_asm!(
    ".pushsection .text.cuda_trace_body,\"ax\",@progbits",
    ".globl cuda_trace_body",
    ".hidden cuda_trace_body",
    ".type cuda_trace_body,@function",
    ".p2align 4",
    "cuda_trace_body:",
    "push rbp",
    "mov rbp, rsp",
    "sub rsp, 192",
    "mov [rsp], rdi",
    "mov [rsp + 8], rsi",
    "mov [rsp + 16], rdx",
    "mov [rsp + 24], rcx",
    "mov [rsp + 32], r8",
    "mov [rsp + 40], r9",
    "mov [rsp + 48], rax",
    "movups [rsp + 64], xmm0",
    "movups [rsp + 80], xmm1",
    "movups [rsp + 96], xmm2",
    "movups [rsp + 112], xmm3",
    "movups [rsp + 128], xmm4",
    "movups [rsp + 144], xmm5",
    "movups [rsp + 160], xmm6",
    "movups [rsp + 176], xmm7",
    // enter(id, regs, slot) -> (target in rax, hook in rdx)
    "mov edi, r11d",
    "mov rsi, rsp",
    "lea rdx, [rbp + 8]",
    "call {enter}",
    "mov r11, rax",
    "test rdx, rdx",
    "jz 2f",
    "lea r10, [rip + cuda_trace_return]",
    "mov [rbp + 8], r10",
    "2:",
    "mov rdi, [rsp]",
    "mov rsi, [rsp + 8]",
    "mov rdx, [rsp + 16]",
    "mov rcx, [rsp + 24]",
    "mov r8, [rsp + 32]",
    "mov r9, [rsp + 40]",
    "mov rax, [rsp + 48]",
    "movups xmm0, [rsp + 64]",
    "movups xmm1, [rsp + 80]",
    "movups xmm2, [rsp + 96]",
    "movups xmm3, [rsp + 112]",
    "movups xmm4, [rsp + 128]",
    "movups xmm5, [rsp + 144]",
    "movups xmm6, [rsp + 160]",
    "movups xmm7, [rsp + 176]",
    "mov rsp, rbp",
    "pop rbp",
    // The stack is now exactly as the caller left it: the callee finds its stack
    // arguments where they were.
    "jmp r11",
    ".size cuda_trace_body, . - cuda_trace_body",
    "",
    ".globl cuda_trace_return",
    ".hidden cuda_trace_return",
    ".type cuda_trace_return,@function",
    ".p2align 4",
    "cuda_trace_return:",
    // A placeholder where the caller's return address goes back, then the return registers.
    "push rax",
    "push rax",
    "push rdx",
    "sub rsp, 40",
    "movups [rsp], xmm0",
    "movups [rsp + 16], xmm1",
    // leave(rax, slot) -> the caller's return address
    "mov rdi, rax",
    "lea rsi, [rsp + 56]",
    "call {leave}",
    "mov [rsp + 56], rax",
    "movups xmm0, [rsp]",
    "movups xmm1, [rsp + 16]",
    "add rsp, 40",
    "pop rdx",
    "pop rax",
    "ret",
    ".size cuda_trace_return, . - cuda_trace_return",
    ".popsection",
    enter = sym enter,
    leave = sym leave,
);

unsafe extern "C" {
    /// The shared body (above). Not callable from Rust: entered by a jump with `r11` set.
    pub(crate) fn cuda_trace_body();
}

/// The address stubs jump to.
pub(crate) fn body_address() -> usize {
    cuda_trace_body as *const () as usize
}

/// Declares the exported entry stubs and their names, from `exports.rs`: one stub per
/// `index name`, where the indices must count up from 0 (checked at compile time).
macro_rules! exports {
    ($($index:literal $name:ident,)*) => {
        /// Every exported driver function, by entry id.
        pub(crate) const NAMES: &[&str] = &[$(stringify!($name)),*];

        const _: () = {
            let ids: &[u32] = &[$($index),*];
            let mut i = 0;
            while i < ids.len() {
                assert!(ids[i] as usize == i, "exports.rs: indices must count up from 0");
                i += 1;
            }
        };

        $(
            #[doc = concat!("The traced `", stringify!($name), "`: enters the shared body with id ", stringify!($index), ".")]
            // SAFETY: the stub touches no register but r11, which carries no argument, and
            // jumps to the shared body, which forwards the call with every argument intact.
            #[unsafe(naked)]
            #[no_mangle]
            #[allow(non_snake_case)]
            pub unsafe extern "C" fn $name() {
                core::arch::naked_asm!(
                    "mov r11d, {index}",
                    "jmp {body}",
                    index = const $index,
                    body = sym $crate::trampoline::cuda_trace_body,
                )
            }
        )*
    };
}
pub(crate) use exports;

/// What `enter` tells the shared body (returned in `rax:rdx`).
#[repr(C)]
struct Redirect {
    /// Where to jump with the restored registers.
    target: usize,
    /// Nonzero when the return address is to be replaced by the return stub's.
    hook: usize,
}

/// One call in flight on this thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The caller's return address.
    pub ret: usize,
    /// Where it was on the stack.
    pub slot: usize,
    /// The sequence number of the call's line (0 when it was not logged).
    pub seq: u64,
    /// The entry id.
    pub id: u32,
    /// The call's six integer arguments (for the memory dump of export-table slots).
    pub args: [u64; 6],
}

/// How deep calls may nest on one thread and still have their returns logged.
pub(crate) const MAX_DEPTH: usize = 128;

/// The calls in flight on one thread, innermost last. Fixed size and no destructor, so it
/// can be used while the thread's other thread-locals are being torn down.
pub(crate) struct ShadowStack {
    frames: [Frame; MAX_DEPTH],
    len: usize,
}

impl ShadowStack {
    /// An empty stack.
    pub(crate) const fn new() -> ShadowStack {
        ShadowStack { frames: [Frame { ret: 0, slot: 0, seq: 0, id: 0, args: [0; 6] }; MAX_DEPTH], len: 0 }
    }

    /// How many calls are in flight.
    pub(crate) fn depth(&self) -> usize {
        self.len
    }

    /// Pushes a call; `false` when the stack is full (then its return is not hooked).
    pub(crate) fn push(&mut self, frame: Frame) -> bool {
        if self.len == MAX_DEPTH {
            return false;
        }
        self.frames[self.len] = frame;
        self.len += 1;
        true
    }

    /// Pops the call whose return address was at `slot`. Calls above it whose slots lie
    /// deeper in the stack (lower addresses) were left by a `longjmp` and are dropped.
    /// `None` when no call matches, which only a corrupted stack can cause.
    pub(crate) fn pop_to(&mut self, slot: usize) -> Option<Frame> {
        while self.len > 0 {
            let top = self.frames[self.len - 1];
            if top.slot > slot {
                return None;
            }
            self.len -= 1;
            if top.slot == slot {
                return Some(top);
            }
        }
        None
    }
}

thread_local! {
    static SHADOW: RefCell<ShadowStack> = const { RefCell::new(ShadowStack::new()) };

    /// The real function an interception wrapper is to call; set by `enter` right before
    /// the body jumps to the wrapper, taken by the wrapper first thing.
    static PENDING: Cell<usize> = const { Cell::new(0) };
}

/// Takes the real function the current interception wrapper stands in for.
pub(crate) fn take_pending() -> usize {
    PENDING.replace(0)
}

/// Called by the shared body on every traced call: logs it, records the return and picks
/// the function to jump to.
///
/// # Safety
///
/// `regs` points to the six saved integer argument registers and `slot` to the caller's
/// return address on this thread's stack (the shared body passes both).
unsafe extern "C" fn enter(id: u32, regs: *const [u64; 6], slot: *const usize) -> Redirect {
    let t = tracer();
    let Some(target) = registry::target(id) else {
        t.emit(t.line("error", "trampoline").field("text", format_args!("unknown entry id {id}")));
        return Redirect { target: unknown_entry as *const () as usize, hook: 0 };
    };
    let depth = SHADOW.with_borrow(ShadowStack::depth);
    // SAFETY: the shared body saved the six registers there (see the function's contract).
    let args = unsafe { regs.read() };
    let seq = if target.quiet {
        0
    } else {
        let line = t.line("call", &target.name).field("via", target.via.as_str()).field("depth", depth).args(&args);
        let seq = line.seq();
        t.emit(line);
        seq
    };
    // SAFETY: slot is the caller's return-address slot on this thread's stack (contract).
    let ret = unsafe { slot.read() };
    let hooked = SHADOW.with_borrow_mut(|s| s.push(Frame { ret, slot: slot as usize, seq, id, args }));
    let jump_to = match target.special {
        Special::None => target.real,
        Special::ProcAddress => {
            PENDING.set(target.real);
            intercept::get_proc_address as *const () as usize
        }
        Special::ExportTable => {
            PENDING.set(target.real);
            intercept::get_export_table as *const () as usize
        }
    };
    Redirect { target: jump_to, hook: usize::from(hooked) }
}

/// Called by the return stub when a hooked call returns: logs the return value and gives
/// back the caller's return address.
extern "C" fn leave(rax: u64, slot: usize) -> usize {
    let Some(frame) = SHADOW.with_borrow_mut(|s| s.pop_to(slot)) else {
        eprintln!("cuda-trace: a traced call returned with no matching shadow-stack frame (stack switched?)");
        std::process::abort();
    };
    if let Some(target) = registry::target(frame.id).filter(|t| !t.quiet) {
        let t = tracer();
        let depth = SHADOW.with_borrow(ShadowStack::depth);
        let mut line = t
            .line("ret", &target.name)
            .field("call", frame.seq)
            .field("depth", depth)
            .field("rax", format_args!("{rax:#x}"));
        if target.via != registry::Via::Slot {
            line = line.field("result", rax as u32);
        } else if slot_memory_dump() {
            // What an export-table slot left behind its pointer arguments: the first 32 bytes
            // of each argument that points into readable memory (`VGPU_TRACE_SLOT_MEMORY=1`).
            let maps = crate::maps::MemoryMap::current();
            for (i, &a) in frame.args.iter().enumerate() {
                if a != 0 && maps.readable(a, 32) {
                    // SAFETY: `[a, a + 32)` is mapped readable in this process (just checked).
                    let bytes = unsafe { std::slice::from_raw_parts(a as usize as *const u8, 32) };
                    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    line = line.field(["mem0", "mem1", "mem2", "mem3", "mem4", "mem5"][i], hex);
                }
            }
        }
        t.emit(line);
    }
    frame.ret
}

/// Whether slot returns dump the memory their pointer arguments reach.
fn slot_memory_dump() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VGPU_TRACE_SLOT_MEMORY").is_some_and(|v| v == "1"))
}

/// Stands in for an entry id no target has (never expected).
extern "C" fn unknown_entry() -> u32 {
    999
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(slot: usize, id: u32) -> Frame {
        Frame { ret: slot + 1, slot, seq: u64::from(id), id, args: [0; 6] }
    }

    #[test]
    fn returns_pop_in_order_and_skip_frames_left_by_longjmp() {
        let mut s = ShadowStack::new();
        assert!(s.push(frame(0x1000, 1)));
        assert!(s.push(frame(0x0f00, 2)));
        assert!(s.push(frame(0x0e00, 3)));
        assert_eq!(s.pop_to(0x0e00), Some(frame(0x0e00, 3)));
        // The call at 0x0f00 was abandoned by a longjmp to the frame of the first.
        assert_eq!(s.pop_to(0x1000), Some(frame(0x1000, 1)));
        assert_eq!(s.depth(), 0);
        assert_eq!(s.pop_to(0x1000), None);
    }

    #[test]
    fn a_return_deeper_than_the_innermost_frame_matches_nothing() {
        let mut s = ShadowStack::new();
        assert!(s.push(frame(0x1000, 1)));
        assert_eq!(s.pop_to(0x0800), None);
        assert_eq!(s.depth(), 1);
    }

    #[test]
    fn a_full_stack_refuses_more_frames() {
        let mut s = ShadowStack::new();
        for i in 0..MAX_DEPTH {
            assert!(s.push(frame(0x10_0000 - 16 * i, i as u32)));
        }
        assert!(!s.push(frame(0x100, 0)));
        assert_eq!(s.depth(), MAX_DEPTH);
    }
}
