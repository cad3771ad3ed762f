//! Progress of long steps: a line rewritten in place on a terminal, a line every 20 s in
//! a log (CI), so neither shows a silent minute nor floods.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A count of done items against an expected total (0: unknown).
pub struct Progress {
    what: &'static str,
    total: u64,
    start: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    /// Starts reporting `what`.
    pub fn new(what: &'static str, total: u64) -> Self {
        let now = Instant::now();
        Self { what, total, start: now, last: now, tty: std::io::stderr().is_terminal() }
    }

    fn line(&self, done: u64) -> String {
        let secs = self.start.elapsed().as_secs();
        if let Some(pct) = (done * 100).checked_div(self.total) {
            let pct = pct.min(99);
            format!("{}: {done}/{} ({pct}%) {}:{:02}", self.what, self.total, secs / 60, secs % 60)
        } else {
            format!("{}: {done} done {}:{:02}", self.what, secs / 60, secs % 60)
        }
    }

    /// Records progress; `detail` names the current item.
    pub fn set(&mut self, done: u64, detail: &str) {
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(20) };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let mut l = format!("{} {detail}", self.line(done));
            l.truncate(100);
            let _ = write!(err, "\r\x1b[K{l}");
        } else {
            let _ = writeln!(err, "{}", self.line(done));
        }
    }

    /// Ends the line with the total time.
    pub fn finish(&self, done: u64) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K");
        }
        let _ = writeln!(err, "{}: {done} done in {:.1} s", self.what, self.start.elapsed().as_secs_f64());
    }
}
