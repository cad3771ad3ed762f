//! xtask (placeholder)
fn main() {}
