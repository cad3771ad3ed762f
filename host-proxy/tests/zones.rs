//! Integration test: the real daemon (sim backend) serving concurrent zones over the local
//! transport — isolation between zones, quotas, a killed client, and hostile input.
//!
//! Every wait in this file is bounded; a broken daemon fails the test instead of hanging it.

use idm_core::ring::field;
use idm_core::wire::proto::ErrorKind;
use idm_core::{BulkRef, ChannelError, Message, MessageId, SharedMemory, WaitPolicy};
use idm_shm::{ChannelLayout, ShmClient, ShmEndpoint};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vgpu_proto::*;

const RING: usize = 64 << 10;
const WINDOW: usize = 1 << 20;
const MEM_QUOTA: u64 = 1 << 20;

struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Daemon {
    fn start(name: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vgpu-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("hp.sock");
        let config = dir.join("hp.toml");
        std::fs::write(
            &config,
            format!(
                "socket = {:?}\nbackend = \"{}\"\nsim_memory_bytes = {}\n[quotas]\nmem_bytes = {MEM_QUOTA}\nmax_handles = 16\nmax_async_in_flight = 64\n",
                socket,
                backend(),
                1u64 << 30
            ),
        )
        .unwrap();
        // On the GPU machine the binaries travel without cargo: the path can be overridden.
        let exe = std::env::var("VGPU_HOST_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_host-proxy").into());
        let child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(&config)
            .env("VGPU_LOG", "debug")
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start host-proxy");
        let d = Daemon { child, socket, _dir: TempDir(dir) };
        // Probe the admin socket (bound last), not the zone socket: a probe there would
        // start a zone.
        wait_for("daemon sockets", || {
            let mut p = d.socket.as_os_str().to_owned();
            p.push(".admin");
            UnixStream::connect(PathBuf::from(p)).is_ok()
        });
        d
    }

    /// Lines of the admin report, one per live zone.
    fn zones(&self) -> Vec<String> {
        let mut p = self.socket.as_os_str().to_owned();
        p.push(".admin");
        let s = UnixStream::connect(PathBuf::from(p)).expect("admin socket");
        BufReader::new(s).lines().map(|l| l.unwrap()).take_while(|l| l != "end").collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The backend under test: `sim` (the test double, default) or `cuda` (the real GPU, set
/// `VGPU_TEST_BACKEND=cuda` on a GPU machine).
fn backend() -> String {
    std::env::var("VGPU_TEST_BACKEND").unwrap_or_else(|_| "sim".into())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal guest: the idm client plus the data window.
struct Guest {
    client: ShmClient,
    window: idm_shm::ShmWindow,
    region: idm_shm::MemfdRegion,
    layout: ChannelLayout,
    buf: Vec<u8>,
}

fn policy() -> WaitPolicy {
    WaitPolicy { spin_iters: 1000, timeout: Some(Duration::from_secs(10)) }
}

impl Guest {
    fn connect(socket: &Path) -> Guest {
        let layout = ChannelLayout::new(RING, WINDOW).unwrap();
        let ShmEndpoint { channel, window, region, layout, .. } = idm_shm::connect(socket, layout, policy()).unwrap();
        let mut buf = vec![0u8; RING];
        let client = idm_core::Client::connect(channel, (RING / 2) as u32, &mut buf).unwrap();
        let mut g = Guest { client, window, region, layout, buf };
        let reply: AttachReply = g.call(&Attach { revision: VGPU_PROTOCOL_REVISION }).unwrap();
        assert_eq!(reply.device.simulated, backend() == "sim", "a test double must say so, a GPU must not");
        eprintln!("zone {} attached to {:?} (driver {})", reply.zone, reply.device.name, reply.device.driver_version);
        assert_eq!(reply.device.total_mem, MEM_QUOTA, "a zone sees its quota as the device's memory");
        g
    }

    fn call_raw<T: Message, R: Message>(&mut self, req: &T) -> Result<R, ChannelError> {
        let reply = self.client.call(req, &mut self.buf)?;
        reply.decode::<R>()
    }

    fn call<T: Message, R: Message>(&mut self, req: &T) -> Result<R, u32> {
        match self.call_raw(req) {
            Ok(r) => Ok(r),
            Err(ChannelError::Remote { code, .. }) => Err(code),
            Err(e) => panic!("channel failed: {e}"),
        }
    }

    fn alloc(&mut self, size: u64) -> Result<u64, u32> {
        self.call::<_, MemAllocReply>(&MemAlloc { size }).map(|r| r.dptr)
    }

    fn write(&mut self, dptr: u64, data: &[u8]) -> Result<(), u32> {
        let desc = BulkRef { offset: 0, len: data.len() as u64 };
        self.window.write(desc, data).unwrap();
        self.call::<_, Done>(&MemcpyHtoD { dst: dptr, src: desc, stream: None }).map(|_| ())
    }

    fn read(&mut self, dptr: u64, len: usize) -> Result<Vec<u8>, u32> {
        let desc = BulkRef { offset: 4096, len: len as u64 };
        self.call::<_, Done>(&MemcpyDtoH { dst: desc, src: dptr, stream: None })?;
        let mut out = vec![0u8; len];
        self.window.read(desc, &mut out).unwrap();
        Ok(out)
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn two_zones_are_isolated_and_quotas_hold() {
    let d = Daemon::start("iso");
    let mut a = Guest::connect(&d.socket);
    let mut b = Guest::connect(&d.socket);
    wait_for("two zones", || d.zones().len() == 2);

    let a_buf = a.alloc(4096).unwrap();
    let a_data = pattern(1, 4096);
    a.write(a_buf, &a_data).unwrap();
    let Ok(HandleReply { handle: a_stream }) = a.call(&StreamCreate { flags: 0 }) else { panic!() };

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
        Err(code) => assert_eq!(code, CuResult::INVALID_VALUE),
        Ok(bytes) => assert_ne!(bytes, a_data, "zone B read zone A's data"),
    }
    let _ = b.write(a_buf, &[0xee; 4096]);
    let _ = b.call::<_, Done>(&MemsetD8 { dst: a_buf, value: 0xee, count: 4096, stream: None });
    let _ = b.call::<_, Done>(&MemcpyDtoD { dst: b_buf, src: a_buf + 4096 * 100, len: 16, stream: None });
    assert_eq!(b.call::<_, Done>(&StreamSynchronize { stream: a_stream }), Err(CuResult::INVALID_HANDLE));
    assert_eq!(b.call::<_, Done>(&StreamDestroy { stream: a_stream }), Err(CuResult::INVALID_HANDLE));
    assert_eq!(b.call::<_, Done>(&MemFree { dptr: a_buf + 8 }), Err(CuResult::INVALID_VALUE));
    // Nothing B did touched A.
    assert_eq!(a.read(a_buf, 4096).unwrap(), a_data);
    a.call::<_, Done>(&StreamSynchronize { stream: a_stream }).unwrap();

    // Ranges are checked against the zone's own allocations.
    assert_eq!(a.read(a_buf + 1, 4096), Err(CuResult::INVALID_VALUE));
    assert_eq!(a.write(a_buf.wrapping_sub(1), &[1]), Err(CuResult::INVALID_VALUE));
    let outside = MemcpyHtoD { dst: a_buf, src: BulkRef { offset: WINDOW as u64 - 8, len: 16 }, stream: None };
    assert_eq!(a.call::<_, Done>(&outside), Err(CuResult::INVALID_VALUE));

    // Memory quota: over it is CUDA_ERROR_OUT_OF_MEMORY for A only.
    assert_eq!(a.alloc(MEM_QUOTA), Err(CuResult::OUT_OF_MEMORY));
    let MemInfo { free, total } = a.call(&MemGetInfo {}).unwrap();
    assert_eq!((free, total), (MEM_QUOTA - 4096, MEM_QUOTA));
    b.alloc(64).unwrap();
    // Handle quota (16 live objects per zone).
    let mut n = 2; // a_buf and a_stream
    while a.alloc(16).is_ok() {
        n += 1;
        assert!(n <= 16, "handle quota not enforced");
    }
    assert_eq!(n, 16);

    // An unknown request id gets a clear error, and the zone keeps working.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Bogus;
    impl Message for Bogus {
        const ID: MessageId = MessageId(0x0fff);
    }
    let e = a.call_raw::<_, Done>(&Bogus).unwrap_err();
    assert_eq!(e, ChannelError::Remote { kind: ErrorKind::UnknownMessage, code: CuResult::NOT_SUPPORTED });
    // An asynchronous failure surfaces at the next synchronous call.
    a.client.post(&MemsetD8 { dst: 0x10, value: 0, count: 1, stream: None }, &mut a.buf).unwrap();
    let reply = a.client.call(&CtxSynchronize {}, &mut a.buf).unwrap();
    assert_eq!(reply.deferred_error(), Some(CuResult::INVALID_VALUE));
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

fn ring_base(g: &Guest) -> usize {
    g.layout.client_to_server_offset()
}

fn poke_frame(g: &Guest, header: [u8; 16], publish: u32) {
    let base = ring_base(g);
    let prod = g.region.load_u32(base + field::PROD, Ordering::Acquire);
    let size = g.layout.ring_size() as u32;
    let at = (prod & (size - 1)) as usize;
    g.region.write_bytes(base + field::DATA + at, &header);
    g.region.store_u32(base + field::PROD, prod.wrapping_add(publish), Ordering::Release);
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
        (
            "corrupt producer index",
            Box::new(|g| {
                let base = ring_base(g);
                g.region.store_u32(base + field::PROD, 0x8000_0000, Ordering::Release);
            }),
        ),
        ("truncated frame", Box::new(move |g| poke_frame(g, hdr(100, 0x0110), 20))),
        ("oversize length", Box::new(move |g| poke_frame(g, hdr(u32::MAX, 0x0110), 16))),
        (
            "unknown flag bits",
            Box::new(move |g| {
                let mut h = hdr(0, 0x0110);
                h[6] = 0xf0;
                poke_frame(g, h, 16)
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
        const ID: MessageId = MemFree::ID;
    }
    let e = g.call_raw::<_, Done>(&Garbage([0xff, 0xff, 0xff])).unwrap_err();
    assert_eq!(e, ChannelError::Remote { kind: ErrorKind::BadBody, code: CuResult::INVALID_VALUE });
    assert!(g.alloc(16).is_ok(), "zone still serves after a bad body");
}
