//! Integration test: the real daemon (sim backend) serving concurrent zones over the local
//! transport — isolation between zones, quotas, a killed client, hostile input, CUDA IPC
//! between two connections of one zone, and the daemon's own death and restart.
//! The helpers (`Daemon`, `Guest`) are in `common/mod.rs`, shared with `soak.rs`.
//!
//! Every wait in this file is bounded; a broken daemon fails the test instead of hanging it.

mod common;

use common::*;
use idm_core::wire::proto::ErrorKind;
use idm_core::{BulkRef, ChannelError, Message, MessageId, NotifyError, SharedMemory, WaitPolicy};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vgpu_proto::generated::*;
use vgpu_proto::*;

/// Two sessions of one zone (the test's uid) are as isolated from each other as two zones
/// — each has its own worker, context, handles and ranges — and share the zone's quotas.
#[test]
fn two_sessions_are_isolated_and_share_their_zones_quotas() {
    let d = Daemon::start("iso");
    let mut a = Guest::connect(&d.socket);
    let mut b = Guest::connect(&d.socket);
    wait_for("two zones", || d.zones().len() == 2);

    let a_buf = a.alloc(4096).unwrap();
    let a_data = pattern(1, 4096);
    a.write(a_buf, &a_data).unwrap();
    let a_stream = a.stream();

    // Zone B works concurrently on its own memory.
    let b_thread = std::thread::spawn(move || {
        let b_buf = b.alloc(8192).unwrap();
        for round in 0..50u8 {
            let data = pattern(round, 8192);
            b.write(b_buf, &data).unwrap();
            assert_eq!(b.read(b_buf, 8192).unwrap(), data);
        }
        (b, b_buf)
    });
    for _ in 0..50 {
        assert_eq!(a.read(a_buf, 4096).unwrap(), a_data);
    }
    let (mut b, b_buf) = b_thread.join().unwrap();

    // B, holding A's guessed or stolen device pointer and stream handle, can reach only its
    // own objects: the address is either not B's (refused) or names B's own memory.
    match b.read(a_buf, 4096) {
        Err(code) => assert_eq!(code, code::INVALID_VALUE),
        Ok(bytes) => assert_ne!(bytes, a_data, "zone B read zone A's data"),
    }
    let _ = b.write(a_buf, &[0xee; 4096]);
    let _ = b.done(&CuMemsetD8V2 { dst_device: a_buf, uc: 0xee, n: 4096 });
    let _ = b.done(&CuMemcpyDtoDV2 { dst_device: b_buf, src_device: a_buf + 4096 * 100, byte_count: 16 });
    assert_eq!(b.done(&CuStreamSynchronize { h_stream: a_stream }), Err(code::INVALID_HANDLE));
    assert_eq!(b.done(&CuStreamDestroyV2 { h_stream: a_stream }), Err(code::INVALID_HANDLE));
    assert_eq!(b.done(&CuMemFreeV2 { dptr: a_buf + 8 }), Err(code::INVALID_VALUE));
    // Freeing 0 is a no-op that succeeds, as the driver's (cuBLAS's start-up relies on it).
    assert_eq!(b.done(&CuMemFreeV2 { dptr: 0 }), Ok(()));
    // Nothing B did touched A.
    assert_eq!(a.read(a_buf, 4096).unwrap(), a_data);
    a.done(&CuStreamSynchronize { h_stream: a_stream }).unwrap();

    // Ranges are checked against the zone's own allocations.
    assert_eq!(a.read(a_buf + 1, 4096), Err(code::INVALID_VALUE));
    assert_eq!(a.write(a_buf.wrapping_sub(1), &[1]), Err(code::INVALID_VALUE));
    let outside = MemcpyHtoD { dst: a_buf, src: BulkRef { offset: WINDOW as u64 - 8, len: 16 }, stream: Handle(0) };
    assert_eq!(a.done(&outside), Err(code::INVALID_VALUE));

    // Memory quota: over it is CUDA_ERROR_OUT_OF_MEMORY; what B holds counts for A too.
    assert_eq!(a.alloc(MEM_QUOTA), Err(code::OUT_OF_MEMORY));
    let CuMemGetInfoV2Reply { free, total } = a.call(&CuMemGetInfoV2 {}).unwrap();
    assert_eq!((free, total), (MEM_QUOTA - 4096 - 8192, MEM_QUOTA));
    b.alloc(64).unwrap();
    // Handle quota (16 live objects per zone, B's two allocations among them).
    let mut n = 2; // a_buf and a_stream
    while a.alloc(16).is_ok() {
        n += 1;
        assert!(n <= 14, "handle quota not enforced across the zone's sessions");
    }
    assert_eq!(n, 14);

    // An unknown request id gets a clear error, and the zone keeps working.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Bogus;
    impl Message for Bogus {
        const ID: MessageId = MessageId(0x0fff);
    }
    let e = a.call_raw::<_, Done>(&Bogus).unwrap_err();
    assert_eq!(e, ChannelError::Remote { kind: ErrorKind::UnknownMessage, code: code::NOT_SUPPORTED });
    // An asynchronous failure surfaces at the next synchronous call.
    a.client.post(&CuMemsetD8Async { dst_device: 0x10, uc: 0, n: 1, h_stream: Handle(0) }, &mut a.buf).unwrap();
    let reply = a.client.call(&CuCtxSynchronize {}, &mut a.buf).unwrap();
    assert_eq!(reply.deferred_error(), Some(code::INVALID_VALUE));
    assert_eq!(a.read(a_buf, 4096).unwrap(), a_data);

    drop(a);
    wait_for("zone A released after disconnect", || d.zones().len() == 1);
    drop(b);
    wait_for("all zones released", || d.zones().is_empty());
}

/// Child-process role for the crash test: connect, allocate, signal readiness, then block.
#[test]
fn crash_client_role() {
    let Ok(socket) = std::env::var("VGPU_TEST_CRASH_CLIENT") else { return };
    let mut g = Guest::connect(Path::new(&socket));
    g.alloc(512 << 10).unwrap();
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn killed_client_releases_its_zone() {
    let d = Daemon::start("crash");
    let mut survivor = Guest::connect(&d.socket);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_client_role", "--nocapture", "--test-threads=1"])
        .env("VGPU_TEST_CRASH_CLIENT", &d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("READY") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "crash client died early");
    }
    wait_for("two zones", || d.zones().len() == 2);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("killed client's zone released", || d.zones().len() == 1);
    let p = survivor.alloc(1024).unwrap();
    survivor.write(p, &[7; 1024]).unwrap();
    assert_eq!(survivor.read(p, 1024).unwrap(), vec![7; 1024]);
}

/// A connected guest whose hello is done, for the hostile tests: it writes straight into
/// the client-to-server ring.
fn hostile(d: &Daemon) -> Guest {
    Guest::connect(&d.socket)
}

#[test]
fn hostile_input_fails_only_that_zone() {
    let d = Daemon::start("hostile");
    let mut healthy = Guest::connect(&d.socket);
    let p = healthy.alloc(256).unwrap();
    let hdr = |len: u32, id: u16| {
        idm_core::FrameHeader { len, id: MessageId(id), flags: idm_core::wire::Flags::empty(), seq: 99, aux: 0 }.emit()
    };
    type Attack = Box<dyn Fn(&Guest)>;
    let attacks: Vec<(&str, Attack)> = vec![
        // A frame of two slots whose second slot was never stamped.
        ("truncated frame", Box::new(move |g| poke_frame(g, hdr(100, 0x0200)))),
        ("oversize length", Box::new(move |g| poke_frame(g, hdr(u32::MAX, 0x0200)))),
        (
            "unknown flag bits",
            Box::new(move |g| {
                let mut h = hdr(0, 0x0200);
                h[6] = 0xf0;
                poke_frame(g, h)
            }),
        ),
    ];
    for (name, attack) in attacks {
        let g = hostile(&d);
        wait_for("hostile zone up", || d.zones().len() == 2);
        attack(&g);
        // Wake the worker if it is asleep, as a guest wanting service would.
        let mut g = g;
        g.client.channel_mut().notify_peer().unwrap();
        wait_for(&format!("zone failed after {name}"), || d.zones().len() == 1);
        drop(g);
        // The healthy zone is untouched.
        healthy.write(p, &[name.len() as u8; 256]).unwrap();
        assert_eq!(healthy.read(p, 256).unwrap(), vec![name.len() as u8; 256], "after {name}");
    }
    // A body that does not decode is a clear error for that request only.
    let mut g = hostile(&d);
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Garbage([u8; 3]);
    impl Message for Garbage {
        const ID: MessageId = CuMemFreeV2::ID;
    }
    let e = g.call_raw::<_, Done>(&Garbage([0xff, 0xff, 0xff])).unwrap_err();
    assert_eq!(e, ChannelError::Remote { kind: ErrorKind::BadBody, code: code::INVALID_VALUE });
    assert!(g.alloc(16).is_ok(), "zone still serves after a bad body");
}

#[test]
fn handles_are_typed_and_contexts_own_their_objects() {
    let d = Daemon::start("ctx");
    let mut a = Guest::connect(&d.socket);
    let primary = a.primary;
    assert_eq!(a.current_ctx(), primary);
    let s = a.stream();
    let e = a.event();

    // A handle of one kind never names an object of another kind.
    assert_eq!(a.done(&CuEventSynchronize { h_event: s }), Err(code::INVALID_HANDLE));
    assert_eq!(a.done(&CuEventDestroyV2 { h_event: s }), Err(code::INVALID_HANDLE));
    assert_eq!(a.done(&CuStreamSynchronize { h_stream: e }), Err(code::INVALID_HANDLE));
    assert_eq!(a.done(&CuStreamSynchronize { h_stream: primary }), Err(code::INVALID_HANDLE));
    assert_eq!(a.done(&CuStreamWaitEvent { h_stream: e, h_event: s, flags: 0 }), Err(code::INVALID_HANDLE));
    assert_eq!(a.done(&CuModuleUnload { hmod: s }), Err(code::INVALID_HANDLE));
    assert_eq!(a.done(&FuncParamLayout { func: e }).unwrap_err(), code::INVALID_HANDLE);
    assert_eq!(
        a.call::<_, CuCtxGetIdReply>(&CuCtxGetId { ctx: s }).unwrap_err(),
        code::INVALID_CONTEXT,
        "a stream is not a context"
    );
    // Both objects are unharmed, and the default streams (0, 1, 2) work.
    a.done(&CuEventRecord { h_event: e, h_stream: s }).unwrap();
    a.done(&CuStreamWaitEvent { h_stream: s, h_event: e, flags: 0 }).unwrap();
    for h in DEFAULT_STREAMS {
        a.done(&CuStreamSynchronize { h_stream: h }).unwrap();
        let CuStreamGetCtxReply { pctx } = a.call(&CuStreamGetCtx { h_stream: h }).unwrap();
        assert_eq!(pctx, primary);
    }
    let CuStreamGetCtxReply { pctx } = a.call(&CuStreamGetCtx { h_stream: s }).unwrap();
    assert_eq!(pctx, primary);

    // A created context owns what is made while it is current; destroying it frees it all.
    let free0 = a.mem_free_bytes();
    let CtxCreateReply { ctx } = a.call(&CtxCreate { flags: 0 }).unwrap();
    assert_ne!(ctx, primary);
    assert_eq!(a.current_ctx(), ctx, "a new context becomes current");
    let p = a.alloc(64 << 10).unwrap();
    a.write(p, &pattern(3, 4096)).unwrap();
    assert_eq!(a.read(p, 4096).unwrap(), pattern(3, 4096));
    assert_eq!(a.mem_free_bytes(), free0 - (64 << 10));
    assert_eq!(a.pointer_attr(1, p + 8), Ok(ctx.0), "CU_POINTER_ATTRIBUTE_CONTEXT");
    let s2 = a.stream();
    let CuStreamGetCtxReply { pctx } = a.call(&CuStreamGetCtx { h_stream: s2 }).unwrap();
    assert_eq!(pctx, ctx);

    assert_eq!(a.done(&CtxDestroy { ctx: primary }), Err(code::INVALID_CONTEXT), "the primary context stays");
    assert_eq!(a.done(&CtxDestroy { ctx: s }), Err(code::INVALID_CONTEXT));
    a.done(&CtxDestroy { ctx }).unwrap();
    assert_eq!(a.current_ctx(), primary, "the primary context is current again");
    assert_eq!(a.mem_free_bytes(), free0, "the context's memory is freed");
    assert_eq!(a.read(p, 16), Err(code::INVALID_VALUE), "and no longer reachable");
    assert_eq!(a.pointer_attr(1, p), Err(code::INVALID_VALUE));
    assert_eq!(a.done(&CuStreamSynchronize { h_stream: s2 }), Err(code::INVALID_HANDLE));
    assert_eq!(a.done(&CtxDestroy { ctx }), Err(code::INVALID_CONTEXT), "double destroy");
    // CtxSetCurrent is posted: a stale context surfaces as a deferred error.
    a.client.post(&CtxSetCurrent { ctx }, &mut a.buf).unwrap();
    let reply = a.client.call(&CuCtxSynchronize {}, &mut a.buf).unwrap();
    assert_eq!(reply.deferred_error(), Some(code::INVALID_CONTEXT));
    // The primary context's objects were not touched.
    a.done(&CuStreamSynchronize { h_stream: s }).unwrap();
    a.done(&CuEventSynchronize { h_event: e }).unwrap();

    // Switching back and forth keeps each context's objects apart.
    let CtxCreateReply { ctx: c2 } = a.call(&CtxCreate { flags: 0 }).unwrap();
    let in_c2 = a.alloc(4096).unwrap();
    a.client.post(&CtxSetCurrent { ctx: primary }, &mut a.buf).unwrap();
    assert_eq!(a.current_ctx(), primary);
    let in_primary = a.alloc(4096).unwrap();
    assert_eq!(a.pointer_attr(1, in_c2), Ok(c2.0));
    assert_eq!(a.pointer_attr(1, in_primary), Ok(primary.0));
    // Destroying a context that is not current leaves the current one alone.
    a.done(&CtxDestroy { ctx: c2 }).unwrap();
    assert_eq!(a.current_ctx(), primary);
    assert_eq!(a.read(in_c2, 16), Err(code::INVALID_VALUE));
    a.write(in_primary, &[1; 16]).unwrap();

    // Resetting the primary context frees and forgets everything made in it.
    a.done(&PrimaryCtxReset {}).unwrap();
    assert_eq!(a.mem_free_bytes(), free0);
    assert_eq!(a.read(in_primary, 16), Err(code::INVALID_VALUE));
    assert_eq!(a.done(&CuStreamSynchronize { h_stream: s }), Err(code::INVALID_HANDLE));
    assert_eq!(a.done(&CuEventQuery { h_event: e }), Err(code::INVALID_HANDLE));
    // The zone goes on, in its primary context.
    assert_eq!(a.current_ctx(), primary);
    let q = a.alloc(4096).unwrap();
    a.write(q, &[9; 64]).unwrap();
    assert_eq!(a.read(q, 64).unwrap(), vec![9; 64]);
}

#[test]
fn pointer_attributes_answer_only_for_own_memory() {
    let d = Daemon::start("ptr");
    let mut a = Guest::connect(&d.socket);
    let mut b = Guest::connect(&d.socket);
    let p = a.alloc(4096).unwrap();
    let q = a.alloc(8192).unwrap();

    assert_eq!(a.pointer_attr(11, p + 100), Ok(p), "RANGE_START_ADDR");
    assert_eq!(a.pointer_attr(12, p + 100), Ok(4096), "RANGE_SIZE");
    assert_eq!(a.pointer_attr(1, p), Ok(a.primary.0), "CONTEXT");
    assert_eq!(a.pointer_attr(2, p), Ok(2), "MEMORY_TYPE = CU_MEMORYTYPE_DEVICE");
    assert_eq!(a.pointer_attr(3, p + 100), Ok(p + 100), "DEVICE_POINTER");
    assert_eq!(a.pointer_attr(4, p), Err(code::INVALID_VALUE), "HOST_POINTER: device memory has none");
    assert_eq!(a.pointer_attr(8, p), Ok(0), "IS_MANAGED");
    assert_eq!(a.pointer_attr(9, p), Ok(0), "DEVICE_ORDINAL");
    assert_eq!(a.pointer_attr(13, p), Ok(1), "MAPPED");
    assert_ne!(a.pointer_attr(7, p), a.pointer_attr(7, q), "BUFFER_ID differs per allocation");
    assert_eq!(a.pointer_attr(7, p), a.pointer_attr(7, p + 4095));
    assert_eq!(a.pointer_attr(999, p), Err(code::INVALID_VALUE), "unknown attribute");
    assert_eq!(a.pointer_attr(11, p + 4096 * 1000), Err(code::INVALID_VALUE), "in no allocation");
    let r: CuMemGetAddressRangeV2Reply = a.call(&CuMemGetAddressRangeV2 { dptr: q + 5000 }).unwrap();
    assert_eq!((r.pbase, r.psize), (q, 8192));
    let e = a.call::<_, CuMemGetAddressRangeV2Reply>(&CuMemGetAddressRangeV2 { dptr: 0x1000 }).unwrap_err();
    assert_eq!(e, code::NOT_FOUND);

    // Zone B holds nothing: A's pointers mean nothing to it.
    for attribute in [1, 2, 3, 7, 11, 12] {
        assert_eq!(b.pointer_attr(attribute, p + 100), Err(code::INVALID_VALUE), "attribute {attribute}");
    }
    let e = b.call::<_, CuMemGetAddressRangeV2Reply>(&CuMemGetAddressRangeV2 { dptr: p }).unwrap_err();
    assert_eq!(e, code::NOT_FOUND);

    // A pitched allocation is registered with its whole padded size.
    let r: CuMemAllocPitchV2Reply =
        a.call(&CuMemAllocPitchV2 { width_in_bytes: 100, height: 10, element_size_bytes: 4 }).unwrap();
    assert!(r.p_pitch >= 100);
    assert_eq!(a.pointer_attr(12, r.dptr), Ok(r.p_pitch * 10));
    a.write(r.dptr + r.p_pitch * 9, &[5; 100]).unwrap();
    assert_eq!(a.write(r.dptr + r.p_pitch * 10 - 50, &[5; 100]), Err(code::INVALID_VALUE));

    a.done(&CuMemFreeV2 { dptr: p }).unwrap();
    assert_eq!(a.pointer_attr(11, p), Err(code::INVALID_VALUE), "freed memory has no attributes");
}

#[test]
fn modules_globals_and_launch_checks() {
    let d = Daemon::start("launch");
    let mut a = Guest::connect(&d.socket);
    let hmod = a.load_module(FILL_PTX).unwrap();
    let f =
        a.call::<_, CuModuleGetFunctionReply>(&CuModuleGetFunction { hmod, name: "fill_u32".into() }).unwrap().hfunc;
    let again = a.call::<_, CuModuleGetFunctionReply>(&CuModuleGetFunction { hmod, name: "fill_u32".into() }).unwrap();
    assert_eq!(again.hfunc, f, "looking a function up again gives the same handle");
    let FuncParamLayoutReply { slots, max_threads, .. } = a.call(&FuncParamLayout { func: f }).unwrap();
    assert_eq!(max_threads, 1024);
    let slots: Vec<(u32, u32)> = slots.iter().map(|s| (s.offset, s.size)).collect();
    assert_eq!(slots, vec![(0, 8), (8, 4), (16, 8)]);

    // Names are bounded C strings; unknown ones are the driver's NOT_FOUND.
    for bad in ["fill\0u32".to_owned(), "x".repeat(5000)] {
        let e = a.call::<_, CuModuleGetFunctionReply>(&CuModuleGetFunction { hmod, name: bad }).unwrap_err();
        assert_eq!(e, code::INVALID_VALUE);
    }
    let e = a.call::<_, CuModuleGetFunctionReply>(&CuModuleGetFunction { hmod, name: "nope".into() }).unwrap_err();
    assert_eq!(e, code::NOT_FOUND);
    let e = a.call::<_, CuModuleGetFunctionReply>(&CuModuleGetFunction { hmod: f, name: "fill_u32".into() });
    assert_eq!(e.unwrap_err(), code::INVALID_HANDLE, "a function is not a module");
    // Images must lie in the window and be non-empty.
    for image in [BulkRef { offset: WINDOW as u64 - 4, len: 8 }, BulkRef { offset: 0, len: 0 }] {
        let e = a.call::<_, ModuleLoadReply>(&ModuleLoad { image, library: false }).unwrap_err();
        assert_eq!(e, code::INVALID_VALUE);
    }

    // A __device__ global is reachable by copies, like an allocation.
    let g: CuModuleGetGlobalV2Reply = a.call(&CuModuleGetGlobalV2 { hmod, name: "counter".into() }).unwrap();
    assert_eq!(g.bytes, 4);
    a.write(g.dptr, &7u32.to_le_bytes()).unwrap();
    assert_eq!(a.read(g.dptr, 4).unwrap(), 7u32.to_le_bytes());
    assert_eq!(a.write(g.dptr, &[0; 8]), Err(code::INVALID_VALUE), "but only within its size");

    // Launches: the parameter buffer must cover every parameter, the geometry be non-zero.
    let n = 256u64;
    let p = a.alloc(n * 4).unwrap();
    let mut params = Vec::new();
    params.extend_from_slice(&p.to_le_bytes());
    params.extend_from_slice(&0x1234_5678u32.to_le_bytes());
    params.extend_from_slice(&[0; 4]);
    params.extend_from_slice(&n.to_le_bytes());
    let config = LaunchConfig { grid: [1, 1, 1], block: [n as u32, 1, 1], shared_mem_bytes: 0, attrs: Vec::new() };
    let launch = |params: Vec<u8>, config: LaunchConfig| Launch { func: f, config, stream: Handle(0), params };
    let short = launch(params[..16].to_vec(), config.clone());
    assert_eq!(a.done(&short), Err(code::INVALID_VALUE), "too-short parameter buffer");
    assert_eq!(a.done(&launch(Vec::new(), config.clone())), Err(code::INVALID_VALUE));
    let flat = LaunchConfig { grid: [1, 0, 1], ..config.clone() };
    assert_eq!(a.done(&launch(params.clone(), flat)), Err(code::INVALID_VALUE), "zero grid dimension");
    let e = a.done(&Launch { func: hmod, config: config.clone(), stream: Handle(0), params: params.clone() });
    assert_eq!(e, Err(code::INVALID_HANDLE), "a module is not a function");
    // Launch is posted in libvgpu; posted, a failure surfaces at the next synchronising call.
    a.client.post(&launch(params[..8].to_vec(), config.clone()), &mut a.buf).unwrap();
    let reply = a.client.call(&CuCtxSynchronize {}, &mut a.buf).unwrap();
    assert_eq!(reply.deferred_error(), Some(code::INVALID_VALUE));
    a.client.post(&launch(params.clone(), config.clone()), &mut a.buf).unwrap();
    let reply = a.client.call(&CuCtxSynchronize {}, &mut a.buf).unwrap();
    assert_eq!(reply.deferred_error(), None);
    let words = a.read(p, (n * 4) as usize).unwrap();
    assert!(words.chunks(4).all(|w| w == 0x1234_5678u32.to_le_bytes()), "the kernel ran");

    // Unloading the module ends its functions and globals.
    a.done(&CuModuleUnload { hmod }).unwrap();
    assert_eq!(a.done(&FuncParamLayout { func: f }).unwrap_err(), code::INVALID_HANDLE);
    assert_eq!(a.write(g.dptr, &[0; 4]), Err(code::INVALID_VALUE));
    assert_eq!(a.done(&CuModuleUnload { hmod }), Err(code::INVALID_HANDLE), "double unload");
}

/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`, the one flag `cuIpcOpenMemHandle` takes.
const LAZY: u32 = 1;

/// CUDA IPC between two connections (worker processes) of one zone: the exporter's data is
/// visible to the importer and back, handles are checked, and revocation (a free, the
/// exporter's disconnect) ends further opens and the importer's access.
#[test]
fn ipc_between_two_processes_of_one_zone() {
    let d = Daemon::start("ipc");
    let mut a = Guest::connect(&d.socket);
    let mut b = Guest::connect(&d.socket);
    wait_for("two zones", || d.zones().len() == 2);
    const N: usize = 64 << 10;
    let p = a.alloc(N as u64).unwrap();
    let data: Vec<u8> = (0..N).map(|i| 42u8.wrapping_add(i as u8)).collect();
    a.write(p, &data).unwrap();
    a.done(&CuCtxSynchronize {}).unwrap();

    let h = a.ipc_export(p).unwrap();
    assert_eq!(h.len(), 64, "a CUipcMemHandle is 64 bytes");
    assert_eq!(&h[..8], b"VGPUIPC1", "the guest gets the host's token, never the driver's handle");
    assert_eq!(a.ipc_export(p).unwrap(), h, "exporting again gives the same handle");
    assert_eq!(a.ipc_export(p + 256), Err(code::INVALID_VALUE), "only an allocation's start");
    assert_eq!(a.ipc_export(0x1000), Err(code::INVALID_VALUE));
    assert_eq!(a.ipc_open(&h, LAZY), Err(code::INVALID_CONTEXT), "not in the exporting process");

    // Forged handles: a random token, a bad tag, a wrong length, bad flags.
    let mut forged = h.clone();
    forged[8..24].copy_from_slice(&[0x5a; 16]);
    let mut bad_tag = h.clone();
    bad_tag[0] = b'X';
    for bad in [&forged[..], &bad_tag[..], &h[..63], &[0u8; 64][..]] {
        assert_eq!(b.ipc_open(bad, LAZY), Err(code::INVALID_VALUE));
    }
    for flags in [0, 2, 3] {
        // The driver takes exactly CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS.
        assert_eq!(b.ipc_open(&h, flags), Err(code::INVALID_VALUE), "flags {flags}");
    }

    // B maps A's allocation and reads A's data.
    let q = b.ipc_open(&h, LAZY).unwrap();
    assert_eq!(b.read(q, N).unwrap(), data);
    // B writes; A reads B's values. As with CUDA IPC natively, the writer synchronizes
    // before the other process may rely on its writes (a GPU may still hold them queued).
    let fresh: Vec<u8> = (0..N).map(|i| (i as u8).wrapping_mul(13).wrapping_add(1)).collect();
    b.write(q, &fresh).unwrap();
    b.done(&CuCtxSynchronize {}).unwrap();
    assert_eq!(a.read(p, N).unwrap(), fresh);
    // A writes again; B sees it.
    a.write(p, &data[..4096]).unwrap();
    a.done(&CuCtxSynchronize {}).unwrap();
    assert_eq!(b.read(q, 4096).unwrap(), data[..4096]);
    // B's view is exactly the exported range.
    assert_eq!(b.read(q + N as u64 - 8, 16), Err(code::INVALID_VALUE), "beyond the imported range");
    assert_eq!(b.write(q + N as u64, &[1]), Err(code::INVALID_VALUE));
    assert_eq!(b.pointer_attr(12, q + 100), Ok(N as u64), "RANGE_SIZE of the import");
    assert_eq!(b.done(&CuMemFreeV2 { dptr: q }), Err(code::INVALID_VALUE), "an import is closed, not freed");
    assert_eq!(b.ipc_close(q + 8), Err(code::INVALID_VALUE));
    // A second open in the same context gives the same address and needs a second close.
    assert_eq!(b.ipc_open(&h, LAZY), Ok(q));
    b.ipc_close(q).unwrap();
    assert_eq!(b.read(q, 16).unwrap(), data[..16]);
    b.ipc_close(q).unwrap();
    assert_eq!(b.read(q, 16), Err(code::INVALID_VALUE), "closed");
    assert_eq!(b.ipc_close(q), Err(code::INVALID_VALUE), "closed twice");

    // A frees the allocation: the token is revoked, B's mapping ends.
    let q = b.ipc_open(&h, LAZY).unwrap();
    a.done(&CuMemFreeV2 { dptr: p }).unwrap();
    assert_eq!(b.read(q, 16), Err(code::INVALID_VALUE), "revoked: an error, not stale memory");
    assert_eq!(b.ipc_open(&h, LAZY), Err(code::INVALID_VALUE), "a replayed handle");
    b.ipc_close(q).unwrap();

    // A's disconnect revokes everything it exported.
    let p2 = a.alloc(4096).unwrap();
    a.write(p2, &[0x42; 4096]).unwrap();
    a.done(&CuCtxSynchronize {}).unwrap();
    let h2 = a.ipc_export(p2).unwrap();
    assert_ne!(h2, h);
    let q2 = b.ipc_open(&h2, LAZY).unwrap();
    assert_eq!(b.read(q2, 4096).unwrap(), vec![0x42; 4096]);
    drop(a);
    wait_for("zone A released", || d.zones().len() == 1);
    assert_eq!(b.ipc_open(&h2, LAZY), Err(code::INVALID_VALUE), "the exporter is gone");
    assert_eq!(b.read(q2, 16), Err(code::INVALID_VALUE), "and so is the importer's view");
    b.ipc_close(q2).unwrap();
    // B goes on.
    let r = b.alloc(4096).unwrap();
    b.write(r, &[3; 4096]).unwrap();
    assert_eq!(b.read(r, 4096).unwrap(), vec![3; 4096]);
}

/// `backend = "cuda"` where the driver cannot be used: the daemon refuses to start, naming
/// the reason, instead of listening and failing each zone later. (Where the driver works —
/// the GPU machine — the probe succeeds and the daemon's start is covered by the tests above.)
#[test]
fn a_cuda_backend_that_cannot_work_is_refused_at_start() {
    let exe = std::env::var("VGPU_HOST_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_host-proxy").into());
    let probe = Command::new(&exe).args(["probe", "--backend", "cuda"]).output().expect("run the probe");
    if probe.status.success() {
        eprintln!("a usable CUDA driver is here: nothing to refuse");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vgpu-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("hp.toml");
    let socket = dir.join("hp.sock");
    std::fs::write(&config, format!("socket = {socket:?}\nbackend = \"cuda\"\n")).unwrap();
    let out = Command::new(&exe).args(["serve", "--config"]).arg(&config).env("RUST_BACKTRACE", "0").output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve must not start: {stderr}");
    assert!(stderr.contains("backend = \"cuda\" does not work on this machine"), "{stderr}");
    let reason = String::from_utf8_lossy(&probe.stdout);
    assert!(stderr.contains(reason.trim()), "the probe's reason is quoted: {stderr}");
    assert!(!socket.exists(), "nothing was listening");
}

/// Child-process role for the quota race: one CUDA process of a zone. It attaches, waits for
/// the word (a line on stdin) so that all processes start together, allocates
/// `VGPU_TEST_CHUNK` bytes at a time until refused, prints what it holds, and keeps it
/// until killed.
#[test]
fn quota_racer_role() {
    let Ok(socket) = std::env::var("VGPU_TEST_RACER") else { return };
    let chunk: u64 = std::env::var("VGPU_TEST_CHUNK").unwrap().parse().unwrap();
    let mut g = Guest::connect(Path::new(&socket));
    println!("READY");
    std::io::stdout().flush().unwrap();
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    let mut held = 0u64;
    loop {
        match g.alloc(chunk) {
            Ok(_) => held += chunk,
            Err(code) => {
                assert_eq!(code, code::OUT_OF_MEMORY);
                break;
            }
        }
    }
    println!("HELD {held}");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

/// A racer process of the zone served by `d`.
struct Racer {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Racer {
    fn start(d: &Daemon, chunk: u64) -> Racer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "quota_racer_role", "--nocapture", "--test-threads=1"])
            .env("VGPU_TEST_RACER", &d.socket)
            .env("VGPU_TEST_CHUNK", chunk.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut r = Racer { child, out };
        r.expect("READY");
        r
    }

    /// The rest of the first line that starts with `word`.
    fn expect(&mut self, word: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(self.out.read_line(&mut line).unwrap() > 0, "racer ended before {word}");
            // libtest's "test … " may precede the word on its line.
            if let Some(at) = line.find(word) {
                return line[at + word.len()..].trim().to_owned();
            }
        }
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The quota bypass of one worker per process: a zone's processes racing for memory hold
/// no more than the zone's quota together, and a killed process's share comes back.
#[test]
fn a_zones_quota_holds_across_its_racing_processes() {
    const QUOTA: u64 = 16 << 20;
    const CHUNK: u64 = 1 << 20;
    let d = Daemon::start_with(
        "race",
        &format!("mem_bytes = {QUOTA}\nmax_handles = 64\nmax_async_in_flight = 64\ncontext_mem_bytes = 0\n"),
    );
    let mut racers: Vec<Racer> = (0..4).map(|_| Racer::start(&d, CHUNK)).collect();
    wait_for("four sessions", || d.zones().len() == 4);
    for r in &mut racers {
        writeln!(r.child.stdin.as_mut().unwrap(), "go").unwrap();
    }
    let held: Vec<u64> = racers.iter_mut().map(|r| r.expect("HELD").parse().unwrap()).collect();
    let sum: u64 = held.iter().sum();
    eprintln!("racers held {held:?} = {sum} bytes under a {QUOTA}-byte quota");
    assert!(sum <= QUOTA, "the zone's processes took {sum} bytes under a {QUOTA}-byte quota");
    // Racers that grow at the same moment at the quota's edge may all be refused (each sees
    // the others' growth): at most one chunk per other racer is left unused.
    let others = held.len() as u64 - 1;
    assert!(sum + others * CHUNK >= QUOTA, "only {sum} bytes admitted: refusals that were not needed");

    // A new session sees what the others hold: nothing left.
    let mut late = Guest::connect(&d.socket);
    assert_eq!(late.alloc(CHUNK), Err(code::OUT_OF_MEMORY));
    // Killing the racers gives their memory back to the zone.
    let victim = held.iter().position(|h| *h > 0).unwrap();
    let given_back = held[victim];
    drop(racers.remove(victim));
    wait_for("the killed racer's session gone", || d.zones().len() == 4);
    let mut got = 0;
    while late.alloc(CHUNK).is_ok() {
        got += CHUNK;
    }
    assert_eq!(got, given_back, "exactly the killed process's share came back");
    drop(racers);
    wait_for("the racers' sessions gone", || d.zones().len() == 1);
    while late.alloc(CHUNK).is_ok() {
        got += CHUNK;
    }
    assert_eq!(got, QUOTA, "with every other process gone, the whole quota");
}

/// `max_sessions`: a session beyond it is refused at attach with CUDA_ERROR_NOT_PERMITTED
/// (the GPU untouched), and a session that ends makes room for a new one.
#[test]
fn sessions_beyond_max_sessions_are_refused_at_attach() {
    let d = Daemon::start_with(
        "sessions",
        "mem_bytes = 1048576\nmax_handles = 16\nmax_async_in_flight = 64\nmax_sessions = 2\ncontext_mem_bytes = 0\n",
    );
    let a = Guest::connect(&d.socket);
    let mut b = Guest::connect(&d.socket);
    for _ in 0..3 {
        let mut c = Guest::session(&d.socket);
        assert_eq!(c.attach(), Err(code::NOT_PERMITTED), "a third session is refused");
    }
    wait_for("refused sessions' workers gone", || d.zones().len() == 2);
    b.alloc(4096).unwrap();
    drop(a);
    wait_for("a's session gone", || d.zones().len() == 1);
    let mut c = Guest::connect(&d.socket);
    c.alloc(4096).unwrap();
    assert_eq!(Guest::session(&d.socket).attach(), Err(code::NOT_PERMITTED));
}

/// Each context's memory is charged to the zone: a session's primary context at attach
/// (refused with CUDA_ERROR_OUT_OF_MEMORY when it does not fit), and every context it
/// creates.
#[test]
fn each_context_is_charged_to_the_zone() {
    const MIB: u64 = 1 << 20;
    let d = Daemon::start_with(
        "ctxmem",
        &format!(
            "mem_bytes = {}\nmax_handles = 16\nmax_async_in_flight = 64\ncontext_mem_bytes = {}\n",
            8 * MIB,
            2 * MIB
        ),
    );
    let mut a = Guest::connect(&d.socket);
    assert_eq!(a.mem_free_bytes(), 6 * MIB, "the primary context takes 2 MiB of 8");
    let b = Guest::connect(&d.socket);
    assert_eq!(a.mem_free_bytes(), 4 * MIB, "so does the second session's");
    let ctx = a.call::<_, CtxCreateReply>(&CtxCreate { flags: 0 }).unwrap().ctx;
    assert_eq!(a.mem_free_bytes(), 2 * MIB, "and a created context");
    a.alloc(2 * MIB).unwrap();
    assert_eq!(a.alloc(1), Err(code::OUT_OF_MEMORY));
    assert_eq!(Guest::session(&d.socket).attach(), Err(code::OUT_OF_MEMORY), "no room for a third context");
    // Destroying the context (and its allocation) gives both back.
    a.done(&CtxDestroy { ctx }).unwrap();
    assert_eq!(a.mem_free_bytes(), 4 * MIB);
    drop(b);
    wait_for("b's session gone", || d.zones().len() == 1);
    let mut c = Guest::connect(&d.socket);
    c.alloc(4 * MIB).unwrap();
    assert_eq!(c.alloc(1), Err(code::OUT_OF_MEMORY));
}

/// A panic while handling a request (a host-side bug; the test double has a kernel that
/// panics, `vgpu_test_panic`) answers that request with CUDA_ERROR_UNKNOWN and ends that
/// session — its state may be half-updated — while other sessions go on.
#[test]
fn a_panic_in_a_request_ends_only_that_session() {
    if backend() != "sim" {
        return; // the real GPU has no kernel that panics the host
    }
    let d = Daemon::start("panic");
    let mut other = Guest::connect(&d.socket);
    let p = other.alloc(4096).unwrap();
    other.write(p, &[5; 4096]).unwrap();
    let mut a = Guest::connect(&d.socket);
    let hmod = a
        .load_module(
            ".version 8.0\n.target sm_90\n.address_size 64\n.visible .entry vgpu_test_panic()\n{\n    ret;\n}\n",
        )
        .unwrap();
    let f: CuModuleGetFunctionReply = a.call(&CuModuleGetFunction { hmod, name: "vgpu_test_panic".into() }).unwrap();
    let config = LaunchConfig { grid: [1, 1, 1], block: [1, 1, 1], shared_mem_bytes: 0, attrs: Vec::new() };
    let launch = Launch { func: f.hfunc, config, stream: Handle(0), params: Vec::new() };
    assert_eq!(a.done(&launch), Err(code::UNKNOWN), "the request that panicked fails");
    // The session is over: the next request finds the host gone, at once (no hang).
    let started = Instant::now();
    match a.call_raw::<_, Done>(&CuCtxSynchronize {}) {
        Err(ChannelError::Remote { .. }) | Ok(_) => panic!("the session served on after a panic"),
        Err(e) => eprintln!("after the panic: {e}"),
    }
    assert!(started.elapsed() < Duration::from_secs(9), "bounded by the peer's hang-up, not the wait timeout");
    wait_for("the panicked session gone", || d.zones().len() == 1);
    assert_eq!(other.read(p, 4096).unwrap(), vec![5; 4096], "the other session goes on");
}

/// Workers die with their daemon: a daemon killed without stopping them leaves no worker
/// holding GPU memory, and its guests see the host gone instead of hanging.
#[test]
fn workers_die_with_a_killed_daemon() {
    let mut d = Daemon::start("killed");
    let mut g = Guest::connect(&d.socket);
    g.alloc(4096).unwrap();
    let line = d.zones().pop().expect("one session");
    let pid: u32 = report_field(&line, "worker_pid").unwrap().parse().unwrap();
    d.child.kill().unwrap(); // SIGKILL: the daemon cannot stop its workers itself
    d.child.wait().unwrap();
    wait_for("the worker to die with its daemon", || process_gone(pid));
    assert!(g.call_raw::<_, Done>(&CuCtxSynchronize {}).is_err(), "the guest sees its host gone");
}

/// How a test stops its daemon.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGKILL: nothing of the daemon runs after it, and its socket files stay behind.
    Kill,
    /// SIGTERM: the daemon stops its workers and removes its sockets itself.
    Term,
}

/// Only a hang guard (a wait that should end at once): never a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// Window offset of the rendezvous word of `block_a_guest`'s host function (clear of the
/// words `Guest::write`, `read` and `load_module` use).
const HOST_FUNC_WORD: u64 = WINDOW as u64 - 64;

/// A guest of `d` blocked in a request, and its session's worker pid. The guest queues a
/// host function (`cuLaunchHostFunc`) it never runs — the host waits in the stream for the
/// guest to answer in the function's rendezvous word — and then synchronises, so its call
/// waits for a reply the host cannot send. The guest waits without a timeout: only the
/// transport's notice that its peer is gone can end that wait. The receiver gets the call's
/// result when it returns.
fn block_a_guest(d: &Daemon) -> (std::sync::mpsc::Receiver<Result<Done, ChannelError>>, u32) {
    let mut g = Guest::session_with(&d.socket, WaitPolicy { spin_iters: 1000, timeout: None }).unwrap();
    g.attach().unwrap();
    let p = g.alloc(64 << 10).unwrap();
    g.write(p, &pattern(3, 64 << 10)).unwrap();
    let worker = report_field(&d.zones()[0], "worker_pid").unwrap().parse().unwrap();
    // Armed (the low bits 01), as libvgpu arms a word before it posts the function.
    g.window.write(BulkRef { offset: HOST_FUNC_WORD, len: 8 }, &1u64.to_le_bytes()).unwrap();
    g.client.post(&HostFunc { stream: Handle(0), slot: HOST_FUNC_WORD }, &mut g.buf).unwrap();
    let (region, word) = (g.region.clone(), g.layout.window_offset() + HOST_FUNC_WORD as usize);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(g.call_raw::<_, Done>(&CuCtxSynchronize {}));
    });
    // Reached (10): the host holds the stream in the function.
    wait_for("the host to reach the guest's host function", || region.load_u32(word, Ordering::Acquire) & 3 == 2);
    assert!(rx.try_recv().is_err(), "the synchronize waits behind the host function");
    (rx, worker)
}

/// Daemon restart: when the daemon is killed (SIGKILL) or stopped (SIGTERM), a guest
/// blocked in a request gets a clear error (its peer is gone) instead of hanging, and the
/// old daemon's worker is gone, so none holds GPU memory; a new daemon on the same socket —
/// the socket files a killed daemon left included — serves new guests; and a daemon started
/// beside a running one refuses to start without starting a session there.
#[test]
fn a_restarted_daemon_fails_blocked_guests_and_serves_new_ones() {
    for stop in [Stop::Kill, Stop::Term] {
        let mut d = Daemon::start(&format!("restart-{stop:?}"));
        let (blocked, worker) = block_a_guest(&d);
        match stop {
            Stop::Kill => d.child.kill().unwrap(),
            Stop::Term => {
                let status = Command::new("kill").args(["-TERM", &d.child.id().to_string()]).status().unwrap();
                assert!(status.success());
            }
        }
        let exit = d.child.wait().unwrap();
        eprintln!("{stop:?}: the daemon ended ({exit})");
        let r = blocked.recv_timeout(HANG_GUARD).unwrap_or_else(|_| panic!("{stop:?}: the blocked guest hangs"));
        match r {
            Err(ChannelError::Notify(NotifyError::PeerGone)) => eprintln!("{stop:?}: the blocked guest got: peer gone"),
            other => panic!("{stop:?}: the blocked guest got {other:?}, not a clear 'peer gone'"),
        }
        wait_for("the old daemon's worker gone", || process_gone(worker));
        match stop {
            Stop::Kill => assert!(d.socket.exists() && d.admin_socket().exists(), "a killed daemon leaves its sockets"),
            Stop::Term => assert!(!d.socket.exists() && !d.admin_socket().exists(), "a stopped one removes them"),
        }
        // While no daemon runs, a new guest is told so at once.
        let e = Guest::session_with(&d.socket, policy()).err().expect("no daemon to connect to");
        eprintln!("{stop:?}: a guest without a daemon: {e}");

        d.restart();
        let mut g = Guest::connect(&d.socket);
        let p = g.alloc(256 << 10).unwrap();
        let data = pattern(11, 256 << 10);
        g.write(p, &data).unwrap();
        assert_eq!(g.read(p, data.len()).unwrap(), data, "{stop:?}: the new daemon serves copies");
        assert_eq!(d.zones().len(), 1, "only the new guest's session");

        // A second daemon on the same socket refuses to start, and leaves the running one
        // untouched: its check started no session here (sessions are accepted in order, so
        // once the next guest is served every earlier connection has been seen).
        let out = Command::new(host_proxy_exe()).args(["serve", "--config"]).arg(&d.config).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a second daemon started: {err}");
        assert!(err.contains("another host-proxy is already listening on"), "{err}");
        let mut h = Guest::connect(&d.socket);
        h.alloc(4096).unwrap();
        let started = d.events().iter().filter(|e| e.contains("\"session-started\"")).count();
        assert_eq!(started, 2, "{stop:?}: sessions started: the two guests', none of the check's");
        assert_eq!(g.read(p, data.len()).unwrap(), data, "the running daemon still serves");
    }
}

/// A stand-in for `nvidia-cuda-mps-control` (the test double has no MPS): `-f` records its
/// start, opens the "control pipe" and runs until it is removed; a command on standard
/// input is recorded, and `quit` removes the pipe.
const FAKE_MPS_CONTROL: &str = r#"#!/bin/sh
log="$CUDA_MPS_LOG_DIRECTORY/fake.log"
if [ "$1" = "-f" ]; then
    trap 'echo term >>"$log"; exit 0' TERM
    echo "start $CUDA_MPS_PIPE_DIRECTORY" >>"$log"
    : >"$CUDA_MPS_PIPE_DIRECTORY/control"
    while [ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ]; do sleep 0.05; done
    echo "exit" >>"$log"
    exit 0
fi
read -r cmd
echo "$cmd" >>"$log"
[ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"#;

/// A daemon whose two zones (this uid and the next) are one MPS group served by the
/// stand-in control program; the group's pipe folder and the stand-in's log.
fn mps_daemon(name: &str) -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = std::fs::metadata("/proc/self").unwrap().uid();
    let top = |dir: &Path| {
        let control = dir.join("fake-mps-control");
        std::fs::write(&control, FAKE_MPS_CONTROL).unwrap();
        std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o755)).unwrap();
        format!("mps_control = {:?}\nmps_dir = {:?}\n", control, dir.join("mps"))
    };
    let tables = format!(
        "[[zone]]\nname = \"me\"\nuid = {me}\nsharing = \"mps\"\n[[zone]]\nname = \"peer\"\nuid = {}\nsharing = \"mps\"\n\
         [[sharing_group]]\nname = \"grp\"\nzones = [\"me\", \"peer\"]\n",
        me.wrapping_add(1)
    );
    let quotas = "mem_bytes = 1048576\nmax_handles = 16\nmax_async_in_flight = 64\ncontext_mem_bytes = 0\n";
    let d = Daemon::start_config(name, top, quotas, &tables);
    let dir = d.socket.parent().unwrap().to_owned();
    (d, dir.join("mps/grp/pipe"), dir.join("mps/grp/log/fake.log"))
}

/// A daemon killed without stopping anything (SIGKILL) takes its MPS control daemons with
/// it (SIGTERM, so that each can stop its server): none is left holding the GPU for the
/// next daemon's server of the group to clash with.
#[test]
fn mps_control_daemons_end_with_a_killed_daemon() {
    if backend() != "sim" {
        return;
    }
    let (mut d, _pipe, log) = mps_daemon("mps-killed");
    let mut a = Guest::connect(&d.socket);
    a.alloc(4096).unwrap();
    assert!(std::fs::read_to_string(&log).unwrap().contains("start "));
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    wait_for("the control daemon to be told its daemon died", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("term\n")
    });
}

/// `sharing = "mps"`: the zones of a group run their workers as clients of the group's own
/// MPS server, which the daemon starts with the first session, ends every session of when
/// it ends on its own, starts again for the next, and asks to quit at shutdown.
#[test]
fn mps_zones_are_clients_of_their_groups_server_and_end_with_it() {
    if backend() != "sim" {
        // A real driver would try the stand-in's "pipe"; the real MPS runs are
        // device/tenants-bench.sh's.
        return;
    }
    let (mut d, pipe, log) = mps_daemon("mps");
    let starts = || std::fs::read_to_string(&log).unwrap_or_default().matches("start ").count();
    let mut a = Guest::connect(&d.socket);
    let mut b = Guest::connect(&d.socket);
    a.alloc(4096).unwrap();
    assert_eq!(starts(), 1, "one server for the group, started with its first session");
    // Each worker's driver is a client of the group's server.
    for line in d.zones() {
        let pid = line.split("worker_pid=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let want = format!("CUDA_MPS_PIPE_DIRECTORY={}", pipe.display());
        assert!(environ.split(|b| *b == 0).any(|v| v == want.as_bytes()), "worker {pid} is no client of {want}");
    }
    // The server ends on its own (a fault of one client, as MPS does): every session of the
    // group ends, at once.
    std::fs::remove_file(pipe.join("control")).unwrap();
    wait_for("the group's sessions ended with its server", || d.zones().is_empty());
    assert!(a.call_raw::<_, Done>(&CuCtxSynchronize {}).is_err());
    assert!(b.call_raw::<_, Done>(&CuCtxSynchronize {}).is_err());
    // The next session gets a fresh server.
    let mut c = Guest::connect(&d.socket);
    c.alloc(4096).unwrap();
    assert_eq!(starts(), 2);
    // At shutdown the daemon stops its workers, then asks the server to quit.
    let status = Command::new("kill").args(["-TERM", &d.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    wait_for("the daemon to stop", || d.child.try_wait().unwrap().is_some());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("quit\n"), "the server was asked to quit:\n{text}");
    drop(c);
}

/// `host-proxy status`: the running daemon's zones as a table and as JSON, the numbers
/// moving as the zone acts; a clear message when no daemon runs.
#[test]
fn status_shows_each_zone_and_says_when_no_daemon_runs() {
    let exe = std::env::var("VGPU_HOST_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_host-proxy").into());
    let status = |socket: &Path, json: bool| {
        let mut c = Command::new(&exe);
        c.args(["status", "--socket"]).arg(socket);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let d = Daemon::start("status");
    let out = status(&d.socket, false);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no zones: host-proxy runs and serves no session\n");
    let mut a = Guest::connect(&d.socket);
    let _b = Guest::connect(&d.socket);
    a.alloc(512 << 10).unwrap();
    assert_eq!(a.alloc(MEM_QUOTA), Err(code::OUT_OF_MEMORY));
    // The request rate is sampled each second: wait, while sending requests, for a sample
    // that saw some.
    wait_for("a rate sample", || {
        a.mem_free_bytes();
        let out = status(&d.socket, true);
        !String::from_utf8_lossy(&out.stdout).contains("\"requests_per_s\": 0.0")
    });
    let out = status(&d.socket, false);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    let row = text.lines().find(|l| l.starts_with("uid-")).expect("the zone's row");
    assert!(row.contains("isolated") && row.contains("0.5 MiB / 1.0 MiB"), "{row}");
    assert!(row.contains("CUDA_ERROR_OUT_OF_MEMORY (CuMemAllocV2, 0:00:0"), "the last error: {row}");
    assert_eq!(text.matches("  session ").count(), 2, "both sessions listed");
    let out = status(&d.socket, true);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        let at = text.find(&format!("\"{name}\": ")).unwrap_or_else(|| panic!("no {name} in {text}"));
        text[at + name.len() + 4..].split([',', '\n']).next().unwrap().trim().to_owned()
    };
    assert_eq!(
        (field("sessions"), field("mem_used"), field("mem_quota")),
        ("2".into(), "524288".into(), MEM_QUOTA.to_string())
    );
    drop(d);
    let out = status(&std::env::temp_dir().join("vgpu-test-none/hp.sock"), false);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no host-proxy is running on"), "{err}");
}

/// `metrics_listen`: a scrape while the zone acts shows its memory, sessions and requests
/// move, and a session refused by `max_sessions` in the refusal counter; anything but
/// `GET /metrics` is 404.
#[test]
fn metrics_move_as_the_zone_acts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let d = Daemon::start_config(
        "metrics",
        |_| format!("metrics_listen = \"127.0.0.1:{port}\"\n"),
        &format!("mem_bytes = {MEM_QUOTA}\nmax_handles = 16\nmax_async_in_flight = 64\nmax_sessions = 2\ncontext_mem_bytes = 0\n"),
        "",
    );
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        out
    };
    let value = |text: &str, series: &str| -> Option<u64> {
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    };
    let zone = {
        let mut g = Guest::connect(&d.socket);
        let name = d.zones()[0].split("name=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
        let text = get("/metrics");
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert_eq!(value(&text, &format!("vgpu_zone_memory_used_bytes{{zone=\"{name}\"}}")), Some(0));
        assert_eq!(value(&text, &format!("vgpu_zone_sessions{{zone=\"{name}\"}}")), Some(1));
        let before = value(&text, &format!("vgpu_zone_requests_total{{zone=\"{name}\"}}")).unwrap();
        g.alloc(512 << 10).unwrap();
        assert_eq!(g.alloc(MEM_QUOTA), Err(code::OUT_OF_MEMORY), "over the quota");
        let _b = Guest::connect(&d.socket);
        assert_eq!(Guest::session(&d.socket).attach(), Err(code::NOT_PERMITTED));
        let text = get("/metrics");
        let oom = format!("vgpu_zone_errors_total{{zone=\"{name}\",error=\"CUDA_ERROR_OUT_OF_MEMORY\"}}");
        assert_eq!(value(&text, &oom), Some(1), "{text}");
        let allocs = format!("vgpu_zone_request_seconds_count{{zone=\"{name}\",request=\"CuMemAllocV2\"}}");
        assert_eq!(value(&text, &allocs), Some(2), "both allocations timed");
        let inf = format!("vgpu_zone_request_seconds_bucket{{le=\"+Inf\",zone=\"{name}\",request=\"CuMemAllocV2\"}}");
        assert_eq!(value(&text, &inf), Some(2));
        assert_eq!(value(&text, "vgpu_gpu_memory_zones_bytes{gpu=\"0\"}"), Some(512 << 10));
        if backend() == "sim" {
            assert!(!text.contains("vgpu_gpu_memory_total_bytes"), "no driver figures for the test double");
        } else {
            // The real GPU: the driver's figures (NVML) bound what the zones hold.
            let total = value(&text, "vgpu_gpu_memory_total_bytes{gpu=\"0\"}").expect("NVML's total");
            let used = value(&text, "vgpu_gpu_memory_used_bytes{gpu=\"0\"}").expect("NVML's used");
            eprintln!("NVML: {used} of {total} bytes in use");
            assert!(used >= 512 << 10 && used <= total, "{text}");
        }
        assert_eq!(value(&text, &format!("vgpu_zone_memory_used_bytes{{zone=\"{name}\"}}")), Some(512 << 10));
        assert_eq!(value(&text, &format!("vgpu_zone_memory_quota_bytes{{zone=\"{name}\"}}")), Some(MEM_QUOTA));
        assert_eq!(value(&text, &format!("vgpu_zone_sessions{{zone=\"{name}\"}}")), Some(2));
        assert!(value(&text, &format!("vgpu_zone_requests_total{{zone=\"{name}\"}}")).unwrap() > before);
        let refused = format!("vgpu_zone_sessions_refused_total{{zone=\"{name}\",limit=\"max_sessions\"}}");
        assert_eq!(value(&text, &refused), Some(1), "{text}");
        name
    };
    wait_for("the sessions gone", || d.zones().is_empty());
    let text = get("/metrics");
    assert!(
        value(&text, &format!("vgpu_zone_requests_total{{zone=\"{zone}\"}}")).unwrap() > 0,
        "kept after the sessions end"
    );
    assert_eq!(value(&text, "vgpu_sessions_started_total"), Some(3));
    assert_eq!(value(&text, "vgpu_sessions_ended_total"), Some(3));
    assert!(get("/other").starts_with("HTTP/1.1 404"));
}

/// `host-proxy events`: the daemon's log of what happened to each zone — sessions started
/// and ended (with what they did), a session refused by `max_sessions`, a fault — oldest
/// first, as a table and as JSON, filtered by zone; a clear message when no daemon runs.
#[test]
fn events_tell_what_happened_to_each_zone() {
    let exe = std::env::var("VGPU_HOST_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_host-proxy").into());
    let events = |socket: &Path, args: &[&str]| {
        let out = Command::new(&exe).args(["events", "--socket"]).arg(socket).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let d = Daemon::start_with(
        "events",
        &format!("mem_bytes = {MEM_QUOTA}\nmax_handles = 16\nmax_async_in_flight = 64\nmax_sessions = 1\ncontext_mem_bytes = 0\n"),
    );
    let (ok, text, _) = events(&d.socket, &[]);
    assert!(ok);
    assert_eq!(text, "no events: no session has started since host-proxy started\n");
    let zone = {
        let mut a = Guest::connect(&d.socket);
        let zone = d.zones()[0].split("name=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
        assert_eq!(Guest::session(&d.socket).attach(), Err(code::NOT_PERMITTED), "over max_sessions");
        // A kernel writing outside the zone's memory faults (ILLEGAL_ADDRESS).
        let hmod = a.load_module(FILL_PTX).unwrap();
        let f = a
            .call::<_, CuModuleGetFunctionReply>(&CuModuleGetFunction { hmod, name: "fill_u32".into() })
            .unwrap()
            .hfunc;
        let mut params = 0x10u64.to_le_bytes().to_vec();
        params.extend_from_slice(&[0; 8]);
        params.extend_from_slice(&64u64.to_le_bytes());
        let config = LaunchConfig { grid: [1, 1, 1], block: [64, 1, 1], shared_mem_bytes: 0, attrs: Vec::new() };
        let r = a.done(&Launch { func: f, config, stream: Handle(0), params });
        let r = r.and_then(|()| a.done(&CuCtxSynchronize {}));
        assert_eq!(r, Err(code::ILLEGAL_ADDRESS));
        zone
    };
    wait_for("the session's end and the fault in the log", || {
        let (_, text, _) = events(&d.socket, &[]);
        text.contains("session-ended") && text.contains(" fault ")
    });
    let (_, table, _) = events(&d.socket, &[]);
    eprintln!("{table}");
    let kinds: Vec<&str> = table.lines().skip(1).filter_map(|l| l.split_whitespace().nth(4)).collect();
    assert_eq!(kinds.first(), Some(&"session-started"), "{table}");
    assert!(kinds.contains(&"session-refused") && kinds.contains(&"fault"), "{table}");
    assert_eq!(kinds.last(), Some(&"session-ended"), "{table}");
    assert!(table.contains("max_sessions: the zone has its 1 sessions already"), "{table}");
    assert!(table.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "the fault names its error: {table}");
    let (_, json, _) = events(&d.socket, &["--json", "--zone", &zone]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let list = v["events"].as_array().unwrap();
    assert_eq!(list.len(), kinds.len(), "every event is the zone's: {json}");
    assert!(list.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()), "oldest first");
    let (_, json, _) = events(&d.socket, &["--json", "--zone", "nobody"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&json).unwrap()["events"].as_array().unwrap().len(), 0);
    drop(d);
    let (ok, _, err) = events(&std::env::temp_dir().join("vgpu-test-none/hp.sock"), &[]);
    assert!(!ok);
    assert!(err.contains("no host-proxy is running on"), "{err}");
}
