//! The tracer's process-wide state, set up on the first traced call: settings, log sink and
//! the real driver.

use crate::config::Config;
use crate::driver::Driver;
use crate::line::Line;
use crate::sink::{self, Sink};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The state of the process.
pub(crate) struct Tracer {
    /// The settings.
    pub config: Config,
    sink: Sink,
    /// The real driver, `None` when none could be loaded (then every call fails).
    pub driver: Option<Driver>,
}

static TRACER: OnceLock<Tracer> = OnceLock::new();

/// The sequence number of the next line.
static SEQ: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread is setting the tracer up (loading the real driver).
    static STARTING: Cell<bool> = const { Cell::new(false) };
}

/// The tracer, set up on first use.
pub(crate) fn tracer() -> &'static Tracer {
    if let Some(t) = TRACER.get() {
        return t;
    }
    if STARTING.get() {
        // The real driver's constructors called a traced function before dlopen returned:
        // there is no driver to forward to yet, and waiting for the set-up would deadlock.
        eprintln!("cuda-trace: the real driver called into the tracer while being loaded; cannot continue");
        std::process::abort();
    }
    STARTING.set(true);
    let t = TRACER.get_or_init(Tracer::start);
    STARTING.set(false);
    t
}

impl Tracer {
    fn start() -> Tracer {
        let config = Config::from_env();
        let (sink, sink_error) = Sink::open(config.out.as_deref());
        let mut tracer = Tracer { config, sink, driver: None };
        tracer.emit(
            tracer
                .line("info", "start")
                .field("pid", std::process::id())
                .field("version", env!("CARGO_PKG_VERSION"))
                .field("exe", std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default()),
        );
        if let Some(e) = sink_error {
            tracer.emit(tracer.line("error", "log").field("text", e));
        }
        match Driver::open(&tracer.config.real) {
            Ok(driver) => {
                tracer.emit(tracer.line("info", "driver").field("path", driver.path.display()));
                tracer.driver = Some(driver);
            }
            Err(e) => tracer.emit(
                tracer
                    .line("error", "driver")
                    .field("text", format_args!("no real driver loaded ({e}); set VGPU_TRACE_REAL; every call fails")),
            ),
        }
        tracer
    }

    /// Starts a line with the next sequence number and this thread's id.
    pub(crate) fn line(&self, kind: &str, name: &str) -> Line {
        Line::new(SEQ.fetch_add(1, Ordering::Relaxed), sink::thread_id(), kind, name)
    }

    /// Writes a finished line.
    pub(crate) fn emit(&self, mut line: Line) {
        self.sink.write_line(line.finish());
    }
}
