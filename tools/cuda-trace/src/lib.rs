//! cuda-trace: a pass-through `libcuda.so.1` that logs every CUDA driver call, every call
//! made through a `cuGetProcAddress` pointer and every call into an export-table slot, then
//! forwards it to NVIDIA's real driver.
//!
//! # Design
//!
//! Requirements: the tracer must not know any signature (it exports hundreds of entry
//! points and unknown export-table slots), so it may not touch the arguments; calls with
//! more than six arguments (stack arguments) and variadic calls must arrive unchanged; the
//! return value must be logged; everything must be re-entrant across threads and recursion,
//! since the driver calls user callbacks that call the driver again.
//!
//! ```text
//!  caller ──call──> entry stub ──> shared body ──jmp──> real function
//!    ^              mov r11d, id    save arg regs          │ returns to the return stub
//!    │                              enter(id, regs, slot)  v
//!    └──────ret──── return stub <───────────────────────── ret
//!                   leave(rax, slot) logs, gives back the caller's return address
//! ```
//!
//! - **Entry stubs.** Each exported name (the list is libvgpu's, see `exports.rs`) is a
//!   two-instruction stub that loads its entry id into `r11` (a scratch register that carries
//!   no argument in the SysV ABI) and jumps to the shared body. Runtime stubs for
//!   `cuGetProcAddress` pointers and export-table slots load their id the same way and jump
//!   indirectly through their page's first word; a page is written whole and made
//!   executable once, before any of its stubs is handed out (`registry.rs`,
//!   `stub_code.rs`). The same real pointer, or the same (UUID, slot), keeps its stub.
//! - **Shared body** (`trampoline.rs`). It saves `rdi rsi rdx rcx r8 r9 rax` and `xmm0`–`xmm7`,
//!   calls `enter` with the id, the six integer registers and the address of the caller's
//!   return-address slot, restores every register and the stack pointer exactly, and jumps
//!   to the target that `enter` chose. The callee therefore sees the caller's stack
//!   unchanged, stack arguments included, except for one word: the return address.
//! - **Return logging.** `enter` logs the call, pushes `(return address, slot address,
//!   sequence number, id)` on a per-thread shadow stack and tells the body to overwrite the
//!   slot with the address of the return stub. The callee returns into the stub, which saves
//!   `rax rdx xmm0 xmm1`, calls `leave` (which pops the frame, logs `rax` and gives back the
//!   original return address) and returns there. Nested and recursive calls push and pop in
//!   order on their own thread; a frame whose slot lies below the returning one was skipped
//!   by a `longjmp` and is dropped. The shadow stack has a fixed depth and no destructor, so
//!   it works during thread teardown; when it is full, the call is forwarded without return
//!   logging.
//! - **Interception.** For `cuGetProcAddress(_v2)` and `cuGetExportTable`, `enter` leaves
//!   the real function pointer in a thread-local slot and jumps to a Rust wrapper
//!   (`intercept.rs`) instead, which calls the driver and replaces the returned function
//!   pointer with a stub, or the returned table with a copy (one per UUID) whose slots that
//!   point into the real driver's executable mappings are stubs; other slots are copied
//!   unchanged, and the length is decided as `table_shape.rs` describes.
//!
//! The exported entry stubs are naked functions rather than `global_asm!` symbols: rustc
//! links a cdylib with a version script that hides every symbol it did not define itself,
//! and a naked `#[no_mangle]` function is a Rust item, so it is exported with any linker.
//! The shared body and the return stub, which are never exported, are `global_asm!`.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod config;
#[allow(unsafe_code)]
mod driver;
#[allow(unsafe_code)]
mod exports;
#[cfg(test)]
mod exports_freshness;
#[allow(unsafe_code)]
mod intercept;
mod line;
mod maps;
#[allow(unsafe_code)]
mod registry;
#[allow(unsafe_code)]
mod sink;
mod stub_code;
mod table_shape;
mod tracer;
#[allow(unsafe_code)]
mod trampoline;
