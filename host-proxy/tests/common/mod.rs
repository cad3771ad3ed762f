//! Helpers shared by the integration tests: the real daemon (`Daemon`, started from a TOML
//! configuration), a minimal guest over the local transport (`Guest`), and the pieces of the
//! wire the hostile tests write by hand.
//!
//! Every wait here is bounded; a broken daemon fails the test instead of hanging it.
// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use idm_core::ring::{field, SLOT, SLOT_PAYLOAD};
use idm_core::{BulkRef, ChannelError, Message, SharedMemory, WaitPolicy};
use idm_shm::{ChannelLayout, ShmClient, ShmEndpoint};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vgpu_proto::generated::*;
use vgpu_proto::*;

pub const RING: usize = 64 << 10;
pub const WINDOW: usize = 1 << 20;
pub const MEM_QUOTA: u64 = 1 << 20;

/// A running `host-proxy serve` (killed and reaped when dropped) and its scratch folder.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// `VGPU_LOG` for the daemon and its workers.
    log: String,
    _dir: TempDir,
}

pub struct TempDir(pub PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Daemon {
    /// A daemon whose zones have a 1 MiB memory quota, 16 handles, and contexts charged
    /// nothing (the tests here are about checks, not context memory).
    pub fn start(name: &str) -> Daemon {
        Daemon::start_with(
            name,
            &format!("mem_bytes = {MEM_QUOTA}\nmax_handles = 16\nmax_async_in_flight = 64\ncontext_mem_bytes = 0\n"),
        )
    }

    /// A daemon with `quotas` (TOML lines of its `[quotas]` table).
    pub fn start_with(name: &str, quotas: &str) -> Daemon {
        Daemon::start_config(name, |_| String::new(), quotas, "")
    }

    /// A daemon whose configuration has `top(dir)` before its `[quotas]` (the lines of
    /// `quotas`) and `tables` after them; `dir` is the test's scratch folder.
    pub fn start_config(name: &str, top: impl Fn(&Path) -> String, quotas: &str, tables: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vgpu-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("hp.sock");
        let config = dir.join("hp.toml");
        std::fs::write(
            &config,
            format!(
                "socket = {:?}\nbackend = \"{}\"\nsim_memory_bytes = {}\nxen = \"off\"\n{}[quotas]\n{quotas}{tables}",
                socket,
                backend(),
                1u64 << 30,
                top(&dir),
            ),
        )
        .unwrap();
        Daemon::serve(config, socket, TempDir(dir), "debug")
    }

    /// Starts `host-proxy serve --config config` (which listens on `socket`) and waits until
    /// it answers on its admin socket.
    pub fn serve(config: PathBuf, socket: PathBuf, dir: TempDir, log: &str) -> Daemon {
        let child = spawn_daemon(&config, log);
        let d = Daemon { child, socket, config, log: log.to_owned(), _dir: dir };
        d.wait_ready();
        d
    }

    /// A new daemon process on the same configuration (and socket), once this one has
    /// exited: a restart.
    pub fn restart(&mut self) {
        assert!(self.child.try_wait().unwrap().is_some(), "the old daemon still runs");
        self.child = spawn_daemon(&self.config, &self.log);
        self.wait_ready();
    }

    /// Waits until the admin socket answers with a whole report. Probe the admin socket
    /// (bound last), not the zone socket: a probe there would start a zone.
    fn wait_ready(&self) {
        wait_for("daemon sockets", || {
            UnixStream::connect(self.admin_socket())
                .is_ok_and(|s| BufReader::new(s).lines().map_while(Result::ok).any(|l| l == "end"))
        });
    }

    /// The admin socket's path.
    pub fn admin_socket(&self) -> PathBuf {
        let mut p = self.socket.as_os_str().to_owned();
        p.push(".admin");
        PathBuf::from(p)
    }

    /// The admin report's lines, up to its `end`.
    pub fn report(&self) -> Vec<String> {
        let s = UnixStream::connect(self.admin_socket()).expect("admin socket");
        BufReader::new(s).lines().map(|l| l.unwrap()).take_while(|l| l != "end").collect()
    }

    /// The event lines of the admin report (`event {json}`), oldest first.
    pub fn events(&self) -> Vec<String> {
        self.report().into_iter().filter(|l| l.starts_with("event ")).collect()
    }

    /// Lines of the admin report, one per live zone.
    pub fn zones(&self) -> Vec<String> {
        self.report().into_iter().filter(|l| l.starts_with("zone ")).collect()
    }
}

/// The host-proxy binary. On the GPU machine the binaries travel without cargo: the path can
/// be overridden.
pub fn host_proxy_exe() -> String {
    std::env::var("VGPU_HOST_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_host-proxy").into())
}

fn spawn_daemon(config: &Path, log: &str) -> Child {
    Command::new(host_proxy_exe())
        .args(["serve", "--config"])
        .arg(config)
        .env("VGPU_LOG", log)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start host-proxy")
}

/// The value of `key=` in an admin report line.
pub fn report_field<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    line.split_whitespace().find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

/// Whether process `pid` is gone: no `/proc` entry (reaped), or a zombie not yet reaped by
/// its new parent.
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
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
pub fn backend() -> String {
    std::env::var("VGPU_TEST_BACKEND").unwrap_or_else(|_| "sim".into())
}

pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal guest: the idm client plus the data window.
pub struct Guest {
    pub client: ShmClient,
    pub window: idm_shm::ShmWindow,
    pub region: idm_shm::MemfdRegion,
    pub layout: ChannelLayout,
    pub buf: Vec<u8>,
    /// The zone's primary context.
    pub primary: Handle,
    /// The daemon's number for the session (the admin report's `zone N`), once attached.
    pub zone: u32,
}

pub fn policy() -> WaitPolicy {
    WaitPolicy { spin_iters: 1000, timeout: Some(Duration::from_secs(10)) }
}

impl Guest {
    pub fn connect(socket: &Path) -> Guest {
        let mut g = Guest::session(socket);
        let wrong: Result<AttachReply, u32> = g.call(&Attach { revision: VGPU_PROTOCOL_REVISION + 1 });
        assert_eq!(wrong.unwrap_err(), code::NOT_SUPPORTED, "another protocol revision is refused");
        g.attach().unwrap();
        g
    }

    /// A connected session whose hello is done, not yet attached.
    pub fn session(socket: &Path) -> Guest {
        Guest::session_with(socket, policy()).unwrap()
    }

    /// A connected session whose waits follow `policy`, hello done, not yet attached; or
    /// why the handshake or the hello failed.
    pub fn session_with(socket: &Path, policy: WaitPolicy) -> Result<Guest, String> {
        let layout = ChannelLayout::new(RING, WINDOW).unwrap();
        let ShmEndpoint { channel, window, region, layout, .. } =
            idm_shm::connect(socket, layout, policy).map_err(|e| format!("handshake: {e}"))?;
        let mut buf = vec![0u8; RING];
        let client =
            idm_core::Client::connect(channel, (RING / 2) as u32, &mut buf).map_err(|e| format!("hello: {e}"))?;
        Ok(Guest { client, window, region, layout, buf, primary: Handle(0), zone: 0 })
    }

    /// Attaches (the host may refuse the session: its CUDA error).
    pub fn attach(&mut self) -> Result<(), u32> {
        let reply: AttachReply = self.call(&Attach { revision: VGPU_PROTOCOL_REVISION })?;
        let g = self;
        assert_eq!(reply.device.simulated, backend() == "sim", "a test double must say so, a GPU must not");
        eprintln!("zone {} attached to {:?} (driver {})", reply.zone, reply.device.name, reply.device.driver_version);
        assert!(reply.device.total_mem >= MEM_QUOTA, "cuDeviceTotalMem is the device's; the quota bounds allocations");
        assert!(!DEFAULT_STREAMS.contains(&reply.primary_ctx), "the primary context is a real handle");
        assert!(reply.attributes.len() > 100, "every device attribute travels with the attach reply");
        // CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK (1)
        assert_eq!(reply.attributes[0], AttrValue::Value(1024));
        assert!(!reply.pci_bus_id.is_empty());
        g.primary = reply.primary_ctx;
        g.zone = reply.zone;
        Ok(())
    }

    pub fn call_raw<T: Message, R: Message>(&mut self, req: &T) -> Result<R, ChannelError> {
        let reply = self.client.call(req, &mut self.buf)?;
        reply.decode::<R>()
    }

    pub fn call<T: Message, R: Message>(&mut self, req: &T) -> Result<R, u32> {
        match self.call_raw(req) {
            Ok(r) => Ok(r),
            Err(ChannelError::Remote { code, .. }) => Err(code),
            Err(e) => panic!("channel failed: {e}"),
        }
    }

    pub fn done<T: Message>(&mut self, req: &T) -> Result<(), u32> {
        self.call::<_, Done>(req).map(|_| ())
    }

    pub fn alloc(&mut self, size: u64) -> Result<u64, u32> {
        self.call::<_, CuMemAllocV2Reply>(&CuMemAllocV2 { bytesize: size }).map(|r| r.dptr)
    }

    pub fn write(&mut self, dptr: u64, data: &[u8]) -> Result<(), u32> {
        let desc = BulkRef { offset: 0, len: data.len() as u64 };
        self.window.write(desc, data).unwrap();
        self.done(&MemcpyHtoD { dst: dptr, src: desc, stream: Handle(0) })
    }

    pub fn read(&mut self, dptr: u64, len: usize) -> Result<Vec<u8>, u32> {
        let desc = BulkRef { offset: 4096, len: len as u64 };
        self.done(&MemcpyDtoH { dst: desc, src: dptr, stream: Handle(0) })?;
        let mut out = vec![0u8; len];
        self.window.read(desc, &mut out).unwrap();
        Ok(out)
    }

    pub fn ipc_export(&mut self, dptr: u64) -> Result<Vec<u8>, u32> {
        self.call::<_, IpcGetMemHandleReply>(&IpcGetMemHandle { dptr }).map(|r| r.handle)
    }

    pub fn ipc_open(&mut self, handle: &[u8], flags: u32) -> Result<u64, u32> {
        self.call::<_, IpcOpenMemHandleReply>(&IpcOpenMemHandle { handle: handle.to_vec(), flags }).map(|r| r.dptr)
    }

    pub fn ipc_close(&mut self, dptr: u64) -> Result<(), u32> {
        self.done(&IpcCloseMemHandle { dptr })
    }

    pub fn mem_free_bytes(&mut self) -> u64 {
        self.call::<_, CuMemGetInfoV2Reply>(&CuMemGetInfoV2 {}).unwrap().free
    }

    pub fn stream(&mut self) -> Handle {
        self.call::<_, CuStreamCreateReply>(&CuStreamCreate { flags: 0 }).unwrap().ph_stream
    }

    pub fn event(&mut self) -> Handle {
        self.call::<_, CuEventCreateReply>(&CuEventCreate { flags: 0 }).unwrap().ph_event
    }

    pub fn current_ctx(&mut self) -> Handle {
        Handle(self.call::<_, CuCtxGetIdReply>(&CuCtxGetId { ctx: Handle(0) }).unwrap().ctx_id)
    }

    pub fn pointer_attr(&mut self, attribute: u32, ptr: u64) -> Result<u64, u32> {
        self.call::<_, PointerGetAttributeReply>(&PointerGetAttribute { attribute, ptr }).map(|r| r.value)
    }

    /// Loads NUL-terminated PTX (placed high in the window, clear of `write`/`read`).
    pub fn load_module(&mut self, ptx: &str) -> Result<Handle, u32> {
        let mut image = ptx.as_bytes().to_vec();
        image.push(0);
        let desc = BulkRef { offset: WINDOW as u64 / 2, len: image.len() as u64 };
        self.window.write(desc, &image).unwrap();
        self.call::<_, ModuleLoadReply>(&ModuleLoad { image: desc, library: false }).map(|r| r.handle)
    }
}

/// A kernel the simulated backend runs (`fill_u32(u32* p, u32 v, u64 n)`: `p[0..n] = v`) and a
/// `__device__` global, as valid PTX for the GPU too.
pub const FILL_PTX: &str = r#"
.version 8.0
.target sm_90
.address_size 64

.visible .global .align 4 .u32 counter;

.visible .entry fill_u32(
    .param .u64 fill_u32_param_0,
    .param .u32 fill_u32_param_1,
    .param .u64 fill_u32_param_2
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<6>;
    ld.param.u64 %rd1, [fill_u32_param_0];
    ld.param.u32 %r1, [fill_u32_param_1];
    ld.param.u64 %rd2, [fill_u32_param_2];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    cvt.u64.u32 %rd3, %r5;
    setp.ge.u64 %p1, %rd3, %rd2;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd4, %rd1;
    shl.b64 %rd5, %rd3, 2;
    add.s64 %rd4, %rd4, %rd5;
    st.global.u32 [%rd4], %r1;
DONE:
    ret;
}
"#;

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}
pub fn ring_base(g: &Guest) -> usize {
    g.layout.client_to_server_offset()
}

/// Writes `header` into the next slot of the request ring and stamps that slot as
/// published (the frame's later slots, if its length claims any, stay unpublished).
pub fn poke_frame(g: &Guest, header: [u8; 16]) {
    let base = ring_base(g);
    let prod = g.region.load_u32(base + field::PROD, Ordering::Acquire);
    let slots = (g.layout.ring_size() / SLOT) as u32;
    let slot = base + field::DATA + (prod % slots) as usize * SLOT;
    g.region.write_bytes(slot, &header);
    g.region.store_u32(slot + SLOT_PAYLOAD, prod, Ordering::Release);
}
