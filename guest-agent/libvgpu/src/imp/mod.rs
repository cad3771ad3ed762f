//! Hand-written implementations of the entry points the table marks `guest`. Each takes
//! the exported function's raw arguments and returns `CuResult<()>`; the generated export
//! calls it inside `rt::entry`. Every function here is `unsafe` with the contract of the
//! CUDA entry point it implements (valid pointers where the API requires them).
#![allow(clippy::missing_safety_doc)]

mod arrays;
mod capture;
mod context;
mod device;
mod export_tables;
mod graph;
mod host_func;
mod ipc;
mod link;
mod memory;
mod module;
mod pitched;
mod vmm;

pub use arrays::*;
pub use capture::*;
pub use context::*;
pub use device::*;
pub use export_tables::{context_gone, cu_get_export_table};
pub use graph::*;
pub use host_func::*;
pub use ipc::*;
pub use link::*;
pub use memory::*;
pub use module::*;
pub use pitched::*;
pub use vmm::*;
