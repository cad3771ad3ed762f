//! End to end without a GPU: cudarc programs (`examples/cudarc_app.rs`, loading
//! `libcuda.so` dynamically, unmodified) run against libvgpu and a real host-proxy daemon
//! with the simulated backend (a test double) over the local shared-memory transport.
//!
//! Also: C programs on NVIDIA's own CUDA runtime (libcudart 12.9 and 13.0 from the PyPI
//! wheels, shared and static; `cargo xtask fetch-cudart` puts them in the cache) run
//! against the same daemon, and the library's exported symbols are exactly the API
//! table's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `target/<profile>` of this build (the test binary lives in its `deps/`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_owned()
}

/// Builds what the tests run with cargo (a test build of this package does not refresh
/// the cdylib): libvgpu's `libcuda.so`, the cudarc example and host-proxy.
fn build(args: &[&str]) {
    let dir = target_dir();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q"]).args(args);
    if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        cmd.arg("--release");
    }
    cmd.env("CARGO_TARGET_DIR", dir.parent().unwrap());
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// The host-proxy binary: `VGPU_HOST_PROXY_BIN`, or built here with cargo.
fn host_proxy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("VGPU_HOST_PROXY_BIN") {
        return p.into();
    }
    build(&["-p", "host-proxy", "--bin", "host-proxy"]);
    target_dir().join("host-proxy")
}

/// One daemon (sim backend) shared by every test of this file, in a private directory.
struct Lab {
    dir: PathBuf,
    socket: PathBuf,
    libdir: PathBuf,
    /// The daemon's Prometheus endpoint (`metrics_listen`).
    metrics: std::net::SocketAddr,
    _daemon: Daemon,
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` so that it gets SIGTERM when this test process ends (statics are never
/// dropped, so `Daemon`'s `Drop` does not run at exit). The parent-death signal fires when
/// the spawning *thread* ends, so a thread that lives as long as the process spawns it.
fn spawn_tied_to_this_process(cmd: &mut Command) -> Child {
    use std::os::unix::process::CommandExt;
    let tie = || {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and changes only this
        // process's own attribute.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe.
    unsafe { cmd.pre_exec(tie) };
    let (tx, rx) = std::sync::mpsc::channel();
    let mut cmd = std::mem::replace(cmd, Command::new("true"));
    std::thread::spawn(move || {
        tx.send(cmd.spawn()).unwrap();
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap().expect("starting host-proxy")
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("libvgpu-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // libvgpu under the names applications look for.
        let libdir = dir.join("lib");
        std::fs::create_dir_all(&libdir).unwrap();
        build(&["-p", "libvgpu", "--lib", "--example", "cudarc_app"]);
        let so = target_dir().join("libcuda.so");
        assert!(so.exists(), "{} was not built", so.display());
        for name in ["libcuda.so", "libcuda.so.1"] {
            std::os::unix::fs::symlink(&so, libdir.join(name)).unwrap();
        }
        let socket = dir.join("host-proxy.sock");
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        // Zone "test" is this user; "partner" (CONSUMER_UID) shares a group with it,
        // "outsider" (OUTSIDER_UID) does not (the cross-zone IPC test runs them).
        let config = format!(
"socket = {socket:?}\nbackend = \"sim\"\nsim_memory_bytes = 4294967296\nmetrics_listen = \"{metrics}\"\n\n\
             [[zone]]\nname = \"test\"\nuid = {uid}\n[zone.quotas]\nmem_bytes = 268435456\nmax_handles = 4096\nmax_async_in_flight = 1024\n\n\
             [[zone]]\nname = \"partner\"\nuid = {CONSUMER_UID}\n\n[[zone]]\nname = \"outsider\"\nuid = {OUTSIDER_UID}\n\n\
             [[sharing_group]]\nname = \"pipeline\"\nzones = [\"test\", \"partner\"]\n",
        );
        std::fs::write(dir.join("host-proxy.toml"), config).unwrap();
        let daemon = Daemon(spawn_tied_to_this_process(
            Command::new(host_proxy_bin())
                .args(["serve", "--config"])
                .arg(dir.join("host-proxy.toml"))
                .env("VGPU_LOG", "warn")
                .stdin(Stdio::null()),
        ));
        let t = Instant::now();
        while !socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "host-proxy did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Other users (the cross-zone test's zones) may connect; the daemon tells them
        // apart by SO_PEERCRED.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        Lab { dir, socket, libdir, metrics, _daemon: daemon }
    })
}

/// The cudarc program, set up to load libvgpu as its libcuda.
fn app_command(args: &[&str]) -> Command {
    let lab = lab();
    let exe = target_dir().join("examples/cudarc_app");
    assert!(exe.exists(), "{} was not built", exe.display());
    let mut cmd = Command::new(&exe);
    cmd.args(args)
        .env("LD_LIBRARY_PATH", &lab.libdir)
        .env("VGPU_SOCKET", &lab.socket)
        .env("VGPU_LOG", "warn")
        .current_dir(&lab.dir);
    cmd
}

/// Runs a cudarc scenario with libvgpu as its libcuda; returns its stdout.
fn app(args: &[&str]) -> String {
    let out = app_command(args).output().expect("running cudarc_app");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cudarc_app {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    stdout
}

#[test]
fn device_query_is_served_from_the_host_s_facts() {
    let out = app(&["device"]);
    assert!(out.contains("simulated"), "the test double says what it is: {out}");
    assert!(out.contains("ok: warp size attribute is 32"));
    assert!(out.contains("ok: one device per zone"));
}

#[test]
fn copies_round_trip_through_the_window_including_chunked_ones() {
    let out = app(&["copy"]);
    assert!(out.contains("ok: 10485763 words"), "{out}");
    for line in [
        "ok: registered pages keep their contents",
        "ok: registering them twice is refused",
        "ok: copies to and from registered pages",
        "ok: unregistered pages are private again, contents kept",
        "ok: DEVICEMAP of an unaligned start: CUDA_ERROR_NOT_SUPPORTED",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

/// `VGPU_LOG=info`: at exit the process prints one line about its session — requests,
/// bytes staged through the window, time waiting for the host.
#[test]
fn the_session_is_summed_up_at_exit_with_vgpu_log_info() {
    let out = app_command(&["copy"]).env("VGPU_LOG", "info").output().expect("running cudarc_app");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line =
        stderr.lines().find(|l| l.contains("session summary:")).unwrap_or_else(|| panic!("no summary in:\n{stderr}"));
    let number = |before: &str| -> f64 {
        let at = line.find(before).unwrap_or_else(|| panic!("no {before:?} in {line}"));
        line[..at].split_whitespace().last().unwrap().trim_start_matches('(').parse().unwrap()
    };
    assert!(number(" requests") > 10.0, "{line}");
    // The scenario copies 10485763 words (40 MiB) each way through pageable memory.
    assert!(number(" MiB staged") >= 80.0, "{line}");
    assert!(number(" ms waiting") > 0.0, "{line}");
    // Without it, nothing is counted or printed.
    let quiet = app_command(&["memset"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("session summary"));
}

#[test]
fn memsets_set_every_byte() {
    app(&["memset"]);
}

#[test]
fn streams_and_events_order_work() {
    let out = app(&["streams"]);
    assert!(out.contains("ok: elapsed time between events is >= 0"));
    assert!(out.contains("ok: cuGetProcAddress gives the _ptsz variant with the per-thread flag"), "{out}");
    assert!(out.contains("ok: a copy on the per-thread stream, synchronised as CU_STREAM_PER_THREAD"), "{out}");
}

#[test]
fn host_functions_and_callbacks_run_in_the_program_in_stream_order() {
    let out = app(&["host-fn"]);
    assert!(out.contains("ok: host functions and a stream callback ran in stream order off the main thread"), "{out}");
}

#[test]
fn virtual_memory_is_mapped_piece_by_piece() {
    let out = app(&["vmm"]);
    for line in [
        "ok: allocation granularity 2097152 bytes",
        "ok: copies and memsets through two mappings",
        "ok: cuMemFree of mapped memory is refused",
        "ok: contents kept across unmap and map",
        "ok: mappings, physical allocations and the reservation given back",
    ] {
        assert!(out.contains(line), "missing {line:?} in {out}");
    }
}

#[test]
fn graphs_built_and_captured_run_at_every_launch() {
    let ptx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sim_kernels.ptx");
    let out = app(&["graphs", ptx.to_str().unwrap()]);
    for line in [
        "ok: a graph lists its 5 nodes, with the handles that adding them returned",
        "ok: a graph built by hand ran 3 times: memset, fill, add one, copy, and its host node 3 times",
        "ok: a clone of the graph runs the same after the original is destroyed",
        "ok: the stream is capturing",
        "ok: a capture records its work without running it, and ends",
        "ok: the captured graph ran twice: memset, the forked kernel and host function, the copy",
        "ok: copy nodes into pageable and pinned host memory (3 nodes), the pageable one done before the host node after it",
        "ok: its clone has the same 3 nodes",
        "ok: the captured graph has its 6 nodes (events make none)",
        "ok: a captured copy into pageable memory is there for the host function after it",
        "ok: graphs and executable graphs destroyed",
    ] {
        assert!(out.contains(line), "missing {line:?} in {out}");
    }
}

#[test]
fn kernels_launch_with_their_parameters_packed_by_the_host_layout() {
    let ptx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sim_kernels.ptx");
    let out = app(&["launch", ptx.to_str().unwrap()]);
    assert!(out.contains("ok: scale_add computed y = 2x + y"));
    assert!(
        out.contains("ok: occupancy: 8 blocks of 256 per SM; potential block size 1024 (grid >= 264), callback ran"),
        "{out}"
    );
    assert!(out.contains("ok: a library loads in a thread without a current context (Ok(()))"), "{out}");
    // What kernels printed reaches the program's stdout through the C library's stream.
    assert!(out.contains("ok: device printf launched and synchronised"), "{out}");
    assert!(out.contains("print_u32: 7\nprint_u32: 8\n"), "device printf is the program's output: {out}");
    assert!(out.contains("ok: occupancy: 29184 bytes of dynamic shared memory per block, 2 clusters"), "{out}");
}

#[test]
fn errors_are_cuda_errors_and_leave_the_zone_usable() {
    let out = app(&["errors"]);
    for line in [
        "forged stream handle: CUDA_ERROR_INVALID_HANDLE",
        "free of a bogus pointer: CUDA_ERROR_INVALID_VALUE",
        "allocation over quota: CUDA_ERROR_OUT_OF_MEMORY",
        "unsupported entry point answers CUDA_ERROR_NOT_SUPPORTED",
        "error strings are NVIDIA's",
        "stream capture queries: not capturing",
        "TOOLS_TLS slot 2's thread state stands for the current context",
        "slot 4: 1 for a context, 0 for NULL",
        "slot 51: an object for the context, CUDA_ERROR_INVALID_HANDLE for NULL",
        "slot 39: the host's value for the context (test double: 0), a forged object refused",
        "zone still works after errors",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

#[test]
fn many_threads_share_the_session_with_per_thread_contexts() {
    let out = app(&["threads"]);
    assert!(out.contains("ok: current context is per thread"));
}

/// The seeds' flow between two processes of one zone: the producer writes 42, 43, 44 …
/// and exports; the consumer opens the handle, verifies, writes back; the producer
/// verifies. The driver's IPC handle never reaches either process.
#[test]
fn ipc_between_two_processes_of_one_zone() {
    use std::io::{BufRead, BufReader, Write};
    let mut producer = app_command(&["ipc-export"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(producer.stdout.take().unwrap()).lines();
    let mut next = |prefix: &str| loop {
        let line = lines.next().expect("producer ended before printing its handles").unwrap();
        if let Some(h) = line.strip_prefix(prefix) {
            break h.to_owned();
        }
    };
    let handle = next("handle ");
    let event = next("event ");
    assert_eq!(handle.len(), 128);
    assert_eq!(event.len(), 128);
    let consumer = app(&["ipc-open", &handle, &format!("event={event}")]);
    assert!(consumer.contains("ok: consumer reads 42, 43, 44, ..."), "{consumer}");
    assert!(consumer.contains("ok: consumer opened and waited on the producer's interprocess event"), "{consumer}");
    assert!(consumer.contains("ok: a memory handle does not open as an event"), "{consumer}");
    assert!(consumer.contains("ok: a forged handle is refused"), "{consumer}");
    writeln!(producer.stdin.as_mut().unwrap(), "done").unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(producer.wait().unwrap().success(), "producer failed: {rest:?}");
    assert!(rest.iter().any(|l| l == "ok: producer sees the consumer's writes"), "{rest:?}");
    // The producer is gone: its export is revoked.
    let out = app_command(&["ipc-open", &handle]).output().unwrap();
    assert!(!out.status.success(), "a revoked handle must not open");
}

/// A zone's uid on the local transport for the cross-zone IPC test (nobody).
const CONSUMER_UID: u32 = 65534;
/// A third zone's uid, in no sharing group with the producer.
const OUTSIDER_UID: u32 = 65533;

/// The seeds' flow between two *zones* of one sharing group (the producer runs as this
/// user, the consumer as another uid, so the daemon puts it in another zone, with its own
/// worker and context), and a refusal for a zone outside the group. Needs root to run the
/// other zones as other users; elsewhere it says it is skipped.
#[test]
fn ipc_across_zones_follows_sharing_groups() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: running other zones as other uids needs root");
        return;
    }
    let mut producer = app_command(&["ipc-export"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(producer.stdout.take().unwrap()).lines();
    let handle = loop {
        let line = lines.next().expect("producer ended before printing its handle").unwrap();
        if let Some(h) = line.strip_prefix("handle ") {
            break h.to_owned();
        }
    };
    let outsider = app_command(&["ipc-open", &handle, "denied"]).uid(OUTSIDER_UID).gid(OUTSIDER_UID).output().unwrap();
    let outsider_out = String::from_utf8_lossy(&outsider.stdout);
    assert!(
        outsider.status.success() && outsider_out.contains("ok: a zone outside the sharing group is refused"),
        "outsider: {outsider_out}{}",
        String::from_utf8_lossy(&outsider.stderr)
    );
    let consumer = app_command(&["ipc-open", &handle]).uid(CONSUMER_UID).gid(CONSUMER_UID).output().unwrap();
    let consumer_out = String::from_utf8_lossy(&consumer.stdout);
    assert!(
        consumer.status.success() && consumer_out.contains("ok: consumer reads 42, 43, 44, ..."),
        "consumer: {consumer_out}{}",
        String::from_utf8_lossy(&consumer.stderr)
    );
    writeln!(producer.stdin.as_mut().unwrap(), "done").unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(producer.wait().unwrap().success(), "producer failed: {rest:?}");
    assert!(rest.iter().any(|l| l == "ok: producer sees the consumer's writes"), "{rest:?}");
    // The daemon counted both decisions under the opening zone (only this test opens
    // from these two zones).
    let text = scrape_metrics();
    let opens = |zone: &str, result: &str| {
        let series = format!("vgpu_zone_ipc_opens_total{{zone=\"{zone}\",result=\"{result}\"}}");
        text.lines().find_map(|l| l.strip_prefix(series.as_str()).and_then(|v| v.trim().parse::<u64>().ok()))
    };
    assert_eq!(opens("outsider", "refused"), Some(1), "{text}");
    assert_eq!(opens("outsider", "granted"), Some(0), "{text}");
    assert_eq!(opens("partner", "granted"), Some(1), "{text}");
    assert_eq!(opens("partner", "refused"), Some(0), "{text}");
    // And the refusal is an event of the outsider's zone, naming the exporter's
    // (the daemon takes the broker's refusals into its log each second).
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let out = Command::new(host_proxy_bin())
            .args(["events", "--zone", "outsider", "--socket"])
            .arg(&lab().socket)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("ipc-refused") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(events.contains("ipc-refused") && events.contains("export of zone \"test\""), "{events}");
}

/// The lab daemon's metrics page (`GET /metrics`), without the HTTP header.
fn scrape_metrics() -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(lab().metrics).expect("the metrics endpoint");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: lab\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// The shared library exports exactly the table's entry points (and nothing else named
/// `cu*`), under their real names.
#[test]
fn exported_symbols_match_the_table() {
    use object::{Object, ObjectSymbol};
    lab();
    let so = target_dir().join("libcuda.so");
    let bytes = std::fs::read(&so).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let mut exported: Vec<String> = file
        .dynamic_symbols()
        .filter(|s| s.is_definition() && s.is_global())
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .filter(|n| n.starts_with("cu"))
        .collect();
    exported.sort();
    let mut table: Vec<String> = cuda::generated::EXPORTS.iter().map(|s| s.to_string()).collect();
    table.sort();
    assert_eq!(exported, table);
    for must in
        ["cuInit", "cuMemAlloc_v2", "cuCtxCreate_v4", "cuMemcpyHtoD_v2", "cuLaunchKernel", "cuGetProcAddress_v2"]
    {
        assert!(table.iter().any(|n| n == must), "{must} is exported");
    }
}

/// The SONAME is the driver's, so programs linked against libvgpu record `libcuda.so.1`.
/// What the real driver exports and libvgpu does not, by kind (the names of the real
/// libcuda.so.1 580 are in `tests/fixtures/libcuda-580.159.04-exports.txt`). The older
/// variants with another signature are exported (api.toml's `old_abi`) and are not gaps.
fn missing_kind(name: &str) -> Option<&'static str> {
    if [
        "cuGL",
        "cuEGL",
        "cuVDPAU",
        "cuGraphicsGL",
        "cuGraphicsEGL",
        "cuGraphicsVDPAU",
        "cuGraphicsResourceGetMappedEgl",
    ]
    .iter()
    .any(|p| name.starts_with(p))
    {
        Some("graphics interop (no display in a zone)")
    } else if name.starts_with("cuCheckpoint") || name == "cuDeviceGetNvSciSyncAttributes" {
        Some("process checkpoint / NvSci (not offered to zones)")
    } else {
        None
    }
}

#[test]
fn every_export_of_the_real_driver_is_provided_or_a_named_gap() {
    let list = include_str!("fixtures/libcuda-580.159.04-exports.txt");
    let ours: std::collections::BTreeSet<&str> = cuda::generated::EXPORTS.iter().copied().collect();
    let mut unexplained = Vec::new();
    let mut gaps: std::collections::BTreeMap<&str, usize> = Default::default();
    for name in list.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        match (ours.contains(name), missing_kind(name)) {
            (true, None) => {}
            (true, Some(kind)) => panic!("{name} is exported now: take it off the {kind:?} gap list"),
            (false, Some(kind)) => *gaps.entry(kind).or_default() += 1,
            (false, None) => unexplained.push(name),
        }
    }
    assert!(unexplained.is_empty(), "the real driver exports these and libvgpu does not: {unexplained:?}");
    // Everything libvgpu exports, the real driver exports too (no invented names).
    let real: std::collections::BTreeSet<&str> = list.lines().collect();
    let invented: Vec<&&str> = ours.iter().filter(|n| !real.contains(**n)).collect();
    assert!(invented.is_empty(), "not exported by the real driver: {invented:?}");
    eprintln!("gaps against libcuda 580: {gaps:?}");
}

#[test]
fn soname_is_libcuda_so_1() {
    lab();
    let bytes = std::fs::read(target_dir().join("libcuda.so")).unwrap();
    assert!(bytes.windows(13).any(|w| w == b"libcuda.so.1\0"));
}

/// Where `cargo xtask fetch-cudart` unpacked NVIDIA's runtimes (`VGPU_CUDART_DIR`, else
/// the xtask cache).
fn cudart_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VGPU_CUDART_DIR") {
        return d.into();
    }
    let cache = match std::env::var_os("XEN_VGPU_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/xen-vgpu"),
    };
    cache.join("cudart")
}

/// Builds `tests/cudart/cudart_basic.c` against runtime `version`, linked shared or
/// static, with the system C compiler; returns the program.
fn cudart_program(version: &str, shared: bool) -> PathBuf {
    let rt = cudart_dir().join(version);
    assert!(
        rt.join("include/cuda_runtime_api.h").exists(),
        "NVIDIA's CUDA runtime {version} is not in {}: run `cargo xtask fetch-cudart` (cargo xtask ci does)",
        rt.display()
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cudart/cudart_basic.c");
    let exe = lab().dir.join(format!("cudart_basic-{version}-{}", if shared { "shared" } else { "static" }));
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-std=c11", "-O1", "-Wall", "-Werror", "-o"]).arg(&exe).arg("-I").arg(rt.join("include")).arg(&src);
    if shared {
        let so = std::fs::read_dir(rt.join("lib"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("libcudart.so."))
            .expect("libcudart.so.N in the wheel");
        cc.arg(&so).arg(format!("-Wl,-rpath,{}", rt.join("lib").display())).arg("-lpthread");
    } else {
        cc.arg(rt.join("lib/libcudart_static.a")).args(["-ldl", "-lpthread", "-lrt"]);
    }
    let out = cc.output().expect("running the C compiler");
    assert!(out.status.success(), "building {}: {}", exe.display(), String::from_utf8_lossy(&out.stderr));
    exe
}

/// Runs the runtime program with libvgpu as its libcuda; returns its stdout.
fn cudart_run(version: &str, shared: bool) -> String {
    let lab = lab();
    let exe = cudart_program(version, shared);
    let out = Command::new(&exe)
        .env("LD_LIBRARY_PATH", &lab.libdir)
        .env("VGPU_SOCKET", &lab.socket)
        .env("VGPU_LOG", "warn")
        .current_dir(&lab.dir)
        .output()
        .expect("running the runtime program");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{} failed ({}):\n{stdout}\n{stderr}", exe.display(), out.status);
    // Every export-table slot the runtime used is implemented (a trap names itself).
    assert!(!stderr.contains("export table"), "the runtime reached an unimplemented slot:\n{stderr}");
    for line in [
        "ok: 1 device",
        "ok: properties: xen-vgpu simulated GPU (test double), cc 9.0",
        "ok: 4194307 bytes host -> device -> device -> host",
        "ok: stream: pinned copies, memset, events",
        "ok: pitched: cudaMemset2D, cudaMemcpy2D host <-> device (pageable, 3001 x 6007)",
        "ok: pitched: rows of 9437189 bytes (wider than the staging halves) both ways",
        "ok: pitched: device -> device at an offset, asynchronously into pinned memory",
        "ok: pitched: cudaMemcpy3D host -> device -> host (64 x 16 x 4)",
        "ok: arrays: cudaMallocArray 64 x 32 float, 2-D copies to and from it, cudaArrayGetInfo",
        "ok: texture and surface objects of an array, a texture of linear memory",
        "ok: 1 PiB allocation -> cudaErrorMemoryAllocation",
        "ok: cudaSetDevice(7) -> cudaErrorInvalidDevice",
        "ok: a second thread: memset on its per-thread stream and on the legacy stream",
        "ok: reset and re-initialised",
        "PASSED",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    stdout
}

#[test]
fn nvidia_cudart_12_shared_runs_through_libvgpu() {
    let out = cudart_run("12.9.79", true);
    assert!(out.contains("ok: runtime 12090"), "{out}");
}

#[test]
fn nvidia_cudart_12_static_runs_through_libvgpu() {
    cudart_run("12.9.79", false);
}

#[test]
fn nvidia_cudart_13_shared_runs_through_libvgpu() {
    let out = cudart_run("13.0.96", true);
    assert!(out.contains("ok: runtime 13000"), "{out}");
}

#[test]
fn nvidia_cudart_13_static_runs_through_libvgpu() {
    cudart_run("13.0.96", false);
}

/// `tests/c/link.c`, a driver-API program built against NVIDIA's `cuda.h` (from the CUDA 13
/// runtime wheel) and libvgpu: JIT linking of two PTX inputs (one from a file), the linked
/// module loaded and launched. The simulated GPU's linker concatenates PTX and its
/// `fill_u32` writes the value it is given; on the GPU, device/libvgpu-gpu.sh runs the same
/// program natively and through libvgpu (the helper then doubles the value).
#[test]
fn jit_linking_through_libvgpu() {
    let lab = lab();
    let rt = cudart_dir().join("13.0.96");
    assert!(
        rt.join("include/cuda.h").exists(),
        "NVIDIA's CUDA 13 headers are not in {}: run `cargo xtask fetch-cudart` (cargo xtask ci does)",
        rt.display()
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/link.c");
    let exe = lab.dir.join("link");
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-std=c11", "-O1", "-Wall", "-Werror", "-o"]).arg(&exe).arg("-I").arg(rt.join("include")).arg(&src);
    cc.arg("-L").arg(&lab.libdir).args(["-l:libcuda.so.1", "-lpthread"]);
    let out = cc.output().expect("running the C compiler");
    assert!(out.status.success(), "building link.c: {}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(&exe)
        .env("LD_LIBRARY_PATH", &lab.libdir)
        .env("VGPU_SOCKET", &lab.socket)
        .env("VGPU_LOG", "warn")
        .output()
        .expect("running link");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "link failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    for line in [
        "linked: image non-empty, info log non-empty (size slot: length)",
        "the linked module lists 1 function(s)",
        "launched the linked kernel: out[0] = 21, all equal yes",
        "cuLinkAddData(NULL) -> CUDA_ERROR_INVALID_VALUE",
        "OK link",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing {line:?} in:\n{stdout}");
    }
}
