//! End to end without a GPU: a C program (`tests/c/trace_app.c`) runs with the tracer as
//! `libcuda.so.1` in front of a fake driver (`tests/c/fake_driver.c`), both compiled here
//! with gcc, and the trace it leaves is checked line by line: every call direct, through
//! `cuGetProcAddress` pointers and through export tables, with arguments and results,
//! including stack arguments and callbacks into the driver from the same and other threads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// `target/<profile>` of this build (the test binary lives in its `deps/`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_owned()
}

/// The tracer and the programs, built once for all tests.
struct Lab {
    dir: PathBuf,
    lib: PathBuf,
    real: PathBuf,
    app: PathBuf,
}

fn gcc(args: &[&str]) {
    let out = Command::new("gcc").args(args).output().expect("running gcc (is it installed?)");
    assert!(out.status.success(), "gcc {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        // A test build of this package does not refresh the cdylib: build it.
        let target = target_dir();
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "-q", "-p", "cuda-trace", "--lib"]);
        if target.file_name().and_then(|n| n.to_str()) == Some("release") {
            cargo.arg("--release");
        }
        cargo.env("CARGO_TARGET_DIR", target.parent().unwrap());
        assert!(cargo.status().expect("running cargo build").success(), "building cuda-trace failed");
        let so = target.join("libcuda_trace.so");
        assert!(so.exists(), "{} was not built", so.display());

        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda-trace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lib = dir.join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(dir.join("real")).unwrap();
        for name in ["libcuda.so", "libcuda.so.1"] {
            std::os::unix::fs::symlink(&so, lib.join(name)).unwrap();
        }
        let c = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c");
        let real = dir.join("real/libfakecuda.so");
        let app = dir.join("trace_app");
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        gcc(&[
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,-Bsymbolic",
            "-pthread",
            &s(&c.join("fake_driver.c")),
            "-o",
            &s(&real),
        ]);
        let link_dir = format!("-L{}", s(&lib));
        gcc(&[
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pthread",
            &s(&c.join("trace_app.c")),
            "-o",
            &s(&app),
            &link_dir,
            "-lcuda",
        ]);
        Lab { dir, lib, real, app }
    })
}

/// Runs the app with the tracer; `extra` adds environment. Gives the output and the trace.
fn run(tag: &str, args: &[&str], extra: &[(&str, &str)]) -> (Output, Trace) {
    let lab = lab();
    let out_dir = lab.dir.join(tag);
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut cmd = Command::new(&lab.app);
    cmd.args(args)
        .env("LD_LIBRARY_PATH", &lab.lib)
        .env("VGPU_TRACE_REAL", &lab.real)
        .env("VGPU_TRACE_OUT", out_dir.join("trace-%p.tsv"))
        .env_remove("VGPU_TRACE_QUIET_NAMES");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starting trace_app");
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    let text = std::fs::read_to_string(out_dir.join(format!("trace-{pid}.tsv")))
        .unwrap_or_else(|e| panic!("no trace for pid {pid}: {e}; stderr: {}", String::from_utf8_lossy(&output.stderr)));
    (output, Trace::parse(&text))
}

/// One line of the trace.
#[derive(Debug, Clone)]
struct Rec {
    seq: u64,
    tid: u32,
    kind: String,
    name: String,
    fields: HashMap<String, String>,
}

impl Rec {
    fn get(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or_else(|| panic!("{self:?} has no {key}"))
    }
}

struct Trace {
    recs: Vec<Rec>,
}

impl Trace {
    fn parse(text: &str) -> Trace {
        assert!(text.ends_with('\n'), "the trace's last line is incomplete");
        let recs = text
            .lines()
            .map(|line| {
                let cols: Vec<&str> = line.split('\t').collect();
                assert!(cols.len() >= 4, "short line {line:?}");
                let fields = cols[4..]
                    .iter()
                    .map(|f| {
                        let (k, v) = f.split_once('=').unwrap_or_else(|| panic!("field without '=' in {line:?}"));
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                Rec {
                    seq: cols[0].parse().unwrap(),
                    tid: cols[1].parse().unwrap(),
                    kind: cols[2].to_string(),
                    name: cols[3].to_string(),
                    fields,
                }
            })
            .collect();
        Trace { recs }
    }

    fn all(&self, kind: &str, name: &str) -> std::vec::IntoIter<&Rec> {
        self.recs.iter().filter(|r| r.kind == kind && r.name == name).collect::<Vec<_>>().into_iter()
    }

    /// The calls of `name` reached `via`, each with its return.
    fn calls(&self, name: &str, via: &str) -> Vec<(&Rec, &Rec)> {
        self.all("call", name).filter(|c| c.get("via") == via).map(|c| (c, self.ret_of(c))).collect()
    }

    fn ret_of(&self, call: &Rec) -> &Rec {
        let seq = call.seq.to_string();
        let rets: Vec<&Rec> =
            self.recs.iter().filter(|r| r.kind == "ret" && r.fields.get("call") == Some(&seq)).collect();
        assert_eq!(rets.len(), 1, "call {call:?} has {} returns", rets.len());
        assert_eq!(rets[0].name, call.name);
        assert_eq!(rets[0].tid, call.tid);
        assert_eq!(rets[0].get("depth"), call.get("depth"));
        rets[0]
    }

    fn one(&self, kind: &str, name: &str) -> &Rec {
        let found: Vec<&Rec> = self.all(kind, name).collect();
        assert_eq!(found.len(), 1, "expected one {kind} {name}, found {found:?}");
        found[0]
    }
}

const UUID_A: &str = "{0A010203-0405-0607-0809-0A0B0C0D0EFF}";
const UUID_B: &str = "{0B223344-5566-7788-99AA-BBCCDDEEF001}";

fn args(call: &Rec) -> Vec<u64> {
    call.get("args").split(',').map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap()).collect()
}

#[test]
fn every_call_is_logged_with_its_arguments_and_result_and_results_reach_the_caller() {
    let (out, trace) = run("full", &[], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "the app failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let main_tid = trace.one("info", "start").tid;
    assert!(trace.one("info", "driver").get("path").ends_with("real/libfakecuda.so"));

    // Direct calls, results unchanged (cuInit(1) answers 101).
    let inits = trace.calls("cuInit", "export");
    assert_eq!(args(inits[0].0)[0], 0);
    assert_eq!(inits[0].1.get("result"), "0");
    assert_eq!(args(inits[1].0)[0], 1);
    assert_eq!((inits[1].1.get("result"), inits[1].1.get("rax")), ("101", "0x65"));

    // Eleven arguments, five on the stack: the driver checked them (0), and one wrong
    // stack argument came back as its error 1007.
    let launches = trace.calls("cuLaunchKernel", "export");
    assert_eq!(launches.len(), 2);
    assert_eq!(args(launches[0].0), vec![0xf00d, 1, 2, 3, 4, 5]);
    assert_eq!(launches[0].1.get("result"), "0");
    assert_eq!(launches[1].1.get("result"), "1007");

    // cuGetProcAddress: the getter itself, then pointers obtained through it.
    let gpa = trace.one("proc", "cuGetProcAddress");
    assert_eq!((gpa.get("version"), gpa.get("flags"), gpa.get("rc")), ("12000", "0x0", "0"));
    assert_eq!(gpa.get("resolved"), "cuGetProcAddress_v2");
    assert_ne!(gpa.get("stub"), "-");
    assert!(!trace.calls("cuGetProcAddress_v2", "proc").is_empty());
    let procs: Vec<&Rec> = trace.all("proc", "cuLaunchKernel").collect();
    assert_eq!(procs.len(), 2);
    assert_eq!(procs[0].get("stub"), procs[1].get("stub"), "the same pointer gets the same stub");
    // Through the pointer, from main and from four callbacks (two on main's thread).
    let via_proc = trace.calls("cuLaunchKernel", "proc");
    assert_eq!(via_proc.len(), 5);
    assert!(via_proc.iter().all(|(c, r)| args(c) == vec![0xf00d, 1, 2, 3, 4, 5] && r.get("result") == "0"));

    // The per-thread-default-stream variant is named by the driver's own symbol.
    let memcpy: Vec<&Rec> = trace.all("proc", "cuMemcpyAsync").collect();
    assert_eq!(memcpy.len(), 2);
    assert_eq!((memcpy[0].get("flags"), memcpy[0].get("resolved")), ("0x2", "cuMemcpyAsync_ptsz"));
    assert_eq!((memcpy[1].get("flags"), memcpy[1].get("resolved")), ("0x0", "cuMemcpyAsync"));
    assert_eq!(trace.calls("cuMemcpyAsync_ptsz", "proc")[0].1.get("result"), "42");
    assert_eq!(trace.calls("cuMemcpyAsync", "proc")[0].1.get("result"), "0");

    // A function without a symbol keeps the requested name; eight arguments.
    assert_eq!(trace.one("proc", "cuFakeHidden").get("resolved"), "-");
    let hidden = trace.calls("cuFakeHidden", "proc");
    assert_eq!(args(hidden[0].0), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(hidden[0].1.get("rax"), "0x8a");
    let missing = trace.one("proc", "cuNoSuchFunction");
    assert_eq!(missing.get("rc"), "500");
    assert!(!missing.fields.contains_key("stub"));

    // Table {0A..}: size field; slots 1..3 are code, slot 4 data, copied unchanged.
    let tables_a: Vec<&Rec> = trace.all("table", UUID_A).collect();
    assert_eq!(tables_a.len(), 2);
    for t in &tables_a {
        assert_eq!((t.get("rc"), t.get("slots"), t.get("code"), t.get("how")), ("0", "5", "3", "size-field:40"));
    }
    assert_eq!(tables_a[0].get("copy"), tables_a[1].get("copy"), "one copy per table");
    let slot = |k: usize| format!("{UUID_A}[{k}]");
    let a1 = trace.calls(&slot(1), "slot");
    assert_eq!(args(a1[0].0), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(a1[0].1.get("rax"), "0x1a1");
    assert_eq!(a1[1].1.get("rax"), "0xffffffffffffffff");
    let a2 = trace.calls(&slot(2), "slot");
    assert_eq!((args(a2[0].0), a2[0].1.get("rax")), (vec![10, 11, 12, 13, 14, 15], "0x1a2"));
    assert_eq!(trace.calls(&slot(3), "slot")[0].1.get("rax"), "0x1a3");
    assert!(trace.all("call", &slot(4)).next().is_none());

    // Table {0B..}: no size field; the scan stops at the data word in slot 3.
    let b = trace.one("table", UUID_B);
    assert_eq!((b.get("slots"), b.get("code"), b.get("how")), ("3", "3", "scan:non-code-at:3"));
    assert_eq!(trace.one("table", "{0C000000-0000-0000-0000-000000000000}").get("rc"), "500");
    assert_eq!(trace.calls(&format!("{UUID_B}[1]"), "slot")[0].1.get("rax"), "0xb1");
    assert_eq!(trace.calls(&format!("{UUID_B}[2]"), "slot")[0].1.get("rax"), "0xb2");

    // Callbacks into the driver: from another thread at depth 0 (slot b1 and
    // cuStreamAddCallback), from the same thread nested at depth 1 (slot b2 and
    // cuLaunchHostFunc).
    let versions = trace.calls("cuDriverGetVersion", "export");
    assert_eq!(versions.len(), 5);
    let other_threads: Vec<_> = versions.iter().filter(|(c, _)| c.tid != main_tid).collect();
    assert_eq!(other_threads.len(), 2);
    assert!(other_threads.iter().all(|(c, r)| c.get("depth") == "0" && r.get("result") == "0"));
    assert_ne!(other_threads[0].0.tid, other_threads[1].0.tid);
    let nested: Vec<_> = versions.iter().filter(|(c, _)| c.tid == main_tid && c.get("depth") == "1").collect();
    assert_eq!(nested.len(), 2);
    let host = trace.calls("cuLaunchHostFunc", "export");
    assert!(host[0].0.seq < nested[1].0.seq && nested[1].1.seq < host[0].1.seq, "the callback ran inside the call");
    assert_eq!(trace.calls("cuStreamAddCallback", "export")[0].1.get("result"), "2");

    // Every call has exactly one return, though the program left through _exit.
    for call in trace.recs.iter().filter(|r| r.kind == "call") {
        trace.ret_of(call);
    }
    let mut seqs: Vec<u64> = trace.recs.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), trace.recs.len(), "sequence numbers are unique");
    assert!(trace.recs.iter().all(|r| r.kind != "error"), "errors in the trace");
}

#[test]
fn quiet_names_are_left_out() {
    let (out, trace) = run("quiet", &[], &[("VGPU_TRACE_QUIET_NAMES", "cuDriverGetVersion,cuInit")]);
    assert!(out.status.success());
    assert!(trace.all("call", "cuDriverGetVersion").next().is_none());
    assert!(trace.all("ret", "cuInit").next().is_none());
    assert_eq!(trace.calls("cuLaunchKernel", "export").len(), 2);
}

#[test]
fn the_tracer_refuses_to_load_itself_as_the_real_driver() {
    let itself = lab().lib.join("libcuda.so.1");
    let (out, trace) = run("itself", &["cuInit"], &[("VGPU_TRACE_REAL", itself.to_str().unwrap())]);
    assert!(out.status.success());
    // CUDA_ERROR_STUB_LIBRARY: no real driver.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cuInit=34");
    let error = trace.one("error", "driver");
    assert!(error.get("text").contains("is cuda-trace itself"), "{error:?}");
    assert_eq!(trace.calls("cuInit", "export")[0].1.get("result"), "34");
}
