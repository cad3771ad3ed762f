//! Where log lines go: a file opened for appending, or stderr. Each line is one `write(2)`
//! with no buffer in between, so the log is complete up to the last call even when the
//! program crashes or leaves through `_exit`; appends of whole lines from several threads do
//! not interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// The log's destination.
pub(crate) enum Sink {
    /// A log file (truncated when opened, then appended to).
    File(File),
    /// The process's stderr.
    Stderr,
}

impl Sink {
    /// Opens `path` for the log, or falls back to stderr (giving the reason) when it cannot.
    pub(crate) fn open(path: Option<&Path>) -> (Sink, Option<String>) {
        let Some(path) = path else { return (Sink::Stderr, None) };
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => {
                // A stale log of an earlier process with the same pid must not stay in front.
                let _ = file.set_len(0);
                (Sink::File(file), None)
            }
            Err(e) => (Sink::Stderr, Some(format!("cannot open {}: {e}; logging to stderr", path.display()))),
        }
    }

    /// Writes one whole line; failures are ignored (a trace must never fail the program).
    pub(crate) fn write_line(&self, line: &[u8]) {
        let _ = match self {
            Sink::File(file) => (&*file).write_all(line),
            Sink::Stderr => std::io::stderr().write_all(line),
        };
    }
}

/// The calling thread's kernel thread id.
pub(crate) fn thread_id() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid as u32
}
