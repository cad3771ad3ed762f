//! Reporting to the host through xenstore (`data/vgpu/*` in the domain's directory).
//!
//! Outside Xen (or before devtmpfs gives us `/dev/xen/xenbus`) there is no xenstore: the
//! reporter then only prints, and says so once. A failed write is printed, never fatal —
//! the console still carries the same facts.

use idm_xen::XenStore;
use std::time::{Duration, Instant};

/// Where the agent's keys live, relative to the domain's xenstore home.
const PREFIX: &str = "data/vgpu";
/// The workload key the toolstack may write (relative to the domain's home).
const WORKLOAD_KEY: &str = "vgpu/run";

/// The agent's channel for status to the host.
pub struct Reporter {
    xs: Option<XenStore>,
    warned: bool,
}

impl Reporter {
    /// Opens xenstore if there is one.
    pub fn open() -> Self {
        Self { xs: XenStore::open().ok(), warned: false }
    }

    /// Retries opening (after devtmpfs is mounted, the xenbus device exists).
    pub fn reopen(&mut self) {
        if self.xs.is_none() {
            match XenStore::open() {
                Ok(xs) => self.xs = Some(xs),
                Err(e) => {
                    super::say(format_args!("no xenstore ({e}); status goes to the console only"));
                    self.warned = true;
                }
            }
        }
    }

    /// Writes `data/vgpu/<key>`.
    pub fn set(&mut self, key: &str, value: &str) {
        let Some(xs) = self.xs.as_mut() else {
            if !self.warned {
                super::say("no xenstore; status goes to the console only");
                self.warned = true;
            }
            return;
        };
        if let Err(e) = xs.write(&format!("{PREFIX}/{key}"), value.as_bytes()) {
            super::say(format_args!("warning: xenstore write {PREFIX}/{key}: {e}"));
        }
    }

    /// Reports the workload's exit code.
    pub fn exited(&mut self, code: i32) {
        self.set("exit-status", &code.to_string());
        self.set("state", "exited");
    }

    /// Reports a fatal error of the agent.
    pub fn failed(&mut self, error: &str) {
        self.set("error", error);
        self.set("state", "failed");
    }

    /// Whether xenstore is reachable (this is a Xen guest).
    pub fn has_xenstore(&self) -> bool {
        self.xs.is_some()
    }

    /// Waits (bounded) until host-proxy in dom0 offers this domain its vgpu device slots
    /// (`device/vgpu/N` with a backend in InitWait); returns how many are free.
    pub fn wait_for_host_proxy(&mut self, within: Duration) -> Result<usize, String> {
        let found = self.watch_until("device", within, |xs| {
            let mut free = 0;
            for slot in xs.directory("device/vgpu").unwrap_or_default() {
                let backend = xs.read_string(&format!("device/vgpu/{slot}/backend")).ok().flatten();
                let state = backend.and_then(|b| xs.read_string(&format!("{b}/state")).ok().flatten());
                if state.as_deref().map(str::trim) == Some("2") {
                    free += 1;
                }
            }
            (free > 0).then_some(free)
        });
        match found {
            Some(n) => Ok(n),
            None if self.xs.is_none() => Err("no xenstore".into()),
            None => Err(format!("host-proxy offered no vgpu device within {} s", within.as_secs())),
        }
    }

    /// Waits (bounded) for the toolstack to name the workload in xenstore.
    pub fn wait_for_workload(&mut self, within: Duration) -> Option<String> {
        self.watch_until(WORKLOAD_KEY, within, |xs| {
            xs.read_string(WORKLOAD_KEY).ok().flatten().filter(|v| !v.trim().is_empty())
        })
    }

    /// Re-evaluates `check` whenever something below `path` changes (a watch fires once at
    /// registration too), and at least every 500 ms (what it reads may lie outside `path`),
    /// until it gives a value or `within` has passed.
    fn watch_until<T>(
        &mut self,
        path: &str,
        within: Duration,
        mut check: impl FnMut(&mut XenStore) -> Option<T>,
    ) -> Option<T> {
        let xs = self.xs.as_mut()?;
        let deadline = Instant::now() + within;
        let token = format!("vgpu-agent:{path}");
        let watching = xs.watch(path, &token).is_ok();
        let found = loop {
            if let Some(v) = check(xs) {
                break Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            let slice = left.min(Duration::from_millis(500));
            if !watching || xs.next_watch_event(Some(slice)).is_err() {
                std::thread::sleep(slice);
            }
        };
        if watching {
            let _ = xs.unwatch(path, &token);
        }
        found
    }
}
