//! An idm channel over grant pages and an event channel, set up by Xen's PV split-driver
//! handshake in xenstore.
//!
//! ```text
//!  toolstack (host-proxy)         frontend (libvgpu, in the guest)   backend (host-proxy worker)
//!  creates device/vgpu/N,
//!  backend/vgpu/D/N: InitWait
//!                                 claims a slot whose backend is InitWait; grants the
//!                                 region + directory pages, binds an unbound event
//!                                 channel, writes the keys and state Initialised in ONE
//!                                 transaction
//!  sees Initialised, starts a ──────────────────────────────────────► maps the directory,
//!  worker for the slot                                                copies it out once,
//!                                                                     checks it, maps the
//!                                                                     region, binds the
//!                                 ◄─────────────────────────────────  channel: Connected
//!                                 Connected, hello over the rings
//!                                                                     session over (peer
//!                                                                     gone): Closing, zone
//!                                                                     torn down, Closed
//!  worker exited: the toolstack resets the slot (frontend Initialising, backend
//!  InitWait) for the next process
//! ```
//!
//! Frontend keys (`device/vgpu/N/`): `ring-ref<i>` (grant refs of the directory pages,
//! `nr-ring-refs` of them; each holds up to 1024 little-endian `u32` grant refs of the
//! region's pages, in order), `nr-pages`, `ring-size`, `window-size`, `event-channel`,
//! `protocol-version`, `state`. Backend keys (`backend/vgpu/D/N/`): `max-ring-size`,
//! `max-window-size`, `protocol-version`, `state`, `frontend`, `frontend-id`.
//!
//! The region uses the channel geometry of [`idm_core::geometry`] ([`ChannelLayout`]): a control page, the two rings,
//! the data window. In the control page, besides the (unused here) futex words, two
//! *alive* words: each side sets its own to 1 and registers an unmap notification that
//! clears it and signals the event channel when its mapping goes away — the guest process
//! exiting or dying, or the worker dying — so the other side sees [`NotifyError::PeerGone`]
//! instead of waiting forever. A whole domain dying is the toolstack's to notice
//! (`@releaseDomain`).
//!
//! Everything read from the peer (keys, the directory, indices) is validated; the
//! directory is copied out of shared memory once, then used.

use crate::doorbell::EvtchnDoorbell;
use crate::evtchn::EventChannel;
use crate::gntalloc::{GntAlloc, GrantedPages};
use crate::gntdev::GntDev;
use crate::grant_region::GrantRegion;
use crate::xenbus::{read_state, set_state, wait_for_state, XenbusState};
use crate::xenstore::{XenStore, XsError};
use crate::XEN_PAGE_SIZE;
use idm_core::geometry::ChannelLayout;
use idm_core::notify::{Notifier, NotifyError, WaitOutcome, WaitToken, Waiter};
use idm_core::{Channel, DataWindow, RingConsumer, RingProducer, SharedMemory, SubRegion, WaitPolicy};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The handshake's protocol version (the `protocol-version` keys); it also names the layout
/// of the granted rings (2: idm-core's stamped 64-byte slots).
pub const PROTOCOL_VERSION: u32 = 2;
/// Grant refs per directory page.
pub const REFS_PER_DIR_PAGE: usize = XEN_PAGE_SIZE / 4;
/// Most directory pages a frontend may use (64 × 1024 pages = a 256 MiB region).
pub const MAX_DIR_PAGES: usize = 64;
/// Control-page word the frontend keeps at 1 while alive.
pub const FRONTEND_ALIVE: usize = 256;
/// Control-page word the backend keeps at 1 while alive.
pub const BACKEND_ALIVE: usize = 320;
/// How often a blocked side re-checks the peer's alive word.
pub const LIVENESS_INTERVAL: Duration = Duration::from_millis(500);

/// The memory of one side's channel.
pub type XenMemory = SubRegion<GrantRegion>;
/// One side's channel.
pub type XenChannel = Channel<XenMemory, XenBell, XenBell>;
/// The data window.
pub type XenWindow = DataWindow<XenMemory>;

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelSetupError {
    /// xenstore failed.
    #[error("xenstore: {0}")]
    Xenstore(#[from] XsError),
    /// A Xen device failed.
    #[error(transparent)]
    Xen(#[from] crate::XenError),
    /// A key is missing or malformed, or a value is out of bounds.
    #[error("{path}: {detail}")]
    BadKey {
        /// The key.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The geometry is not one idm-shm's layout accepts.
    #[error("bad channel geometry: {0}")]
    Geometry(#[from] idm_core::geometry::GeometryError),
    /// No slot was free.
    #[error("no free vgpu device slot under {0} (is host-proxy running in dom0?)")]
    NoSlot(String),
    /// The peer did not reach the expected state in time.
    #[error("the peer at {0} did not connect in time")]
    Timeout(String),
    /// The ring memory did not hold a valid ring.
    #[error("ring: {0:?}")]
    Ring(idm_core::RingError),
}

fn bad(path: &str, detail: impl Into<String>) -> ChannelSetupError {
    ChannelSetupError::BadKey { path: path.to_string(), detail: detail.into() }
}

/// Reads a decimal number key, bounded by `max`.
pub fn read_number<S: Read + Write + AsFd>(
    xs: &mut XenStore<S>,
    path: &str,
    max: u64,
) -> Result<u64, ChannelSetupError> {
    let v = xs.read_string(path)?.ok_or_else(|| bad(path, "missing"))?;
    let n: u64 = v.trim().parse().map_err(|_| bad(path, format!("not a number: {v:?}")))?;
    if n > max {
        return Err(bad(path, format!("{n} is over the limit {max}")));
    }
    Ok(n)
}

/// The doorbell of one side: the event channel, plus the peer's alive word.
#[derive(Clone, Debug)]
pub struct XenBell {
    inner: Arc<BellInner>,
}

#[derive(Debug)]
struct BellInner {
    bell: EvtchnDoorbell,
    region: GrantRegion,
    own_alive: usize,
    peer_alive: usize,
}

impl Drop for BellInner {
    fn drop(&mut self) {
        // An orderly close: tell the peer at once (the unmap notification would too, later).
        self.region.store_u32(self.own_alive, 0, Ordering::SeqCst);
        let _ = self.bell.notify();
    }
}

impl XenBell {
    fn new(channel: EventChannel, region: GrantRegion, own_alive: usize, peer_alive: usize) -> Self {
        region.store_u32(own_alive, 1, Ordering::SeqCst);
        XenBell { inner: Arc::new(BellInner { bell: EvtchnDoorbell::new(channel), region, own_alive, peer_alive }) }
    }

    /// Whether the peer has gone (closed, exited, or died and its mapping was released).
    pub fn peer_gone(&self) -> bool {
        self.inner.region.load_u32(self.inner.peer_alive, Ordering::SeqCst) == 0
    }

    /// The local event-channel port.
    pub fn port(&self) -> u32 {
        self.inner.bell.port().port()
    }
}

impl Notifier for XenBell {
    fn notify(&self) -> Result<(), NotifyError> {
        if self.peer_gone() {
            return Err(NotifyError::PeerGone);
        }
        self.inner.bell.notify()
    }
}

impl Waiter for XenBell {
    fn arm(&self) -> WaitToken {
        self.inner.bell.arm()
    }

    fn wait(&self, token: WaitToken, timeout: Option<Duration>) -> Result<WaitOutcome, NotifyError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.peer_gone() {
                return Err(NotifyError::PeerGone);
            }
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(LIVENESS_INTERVAL),
                None => LIVENESS_INTERVAL,
            };
            match self.inner.bell.wait(token, Some(slice))? {
                WaitOutcome::Woken => return Ok(WaitOutcome::Woken),
                WaitOutcome::TimedOut if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Ok(WaitOutcome::TimedOut)
                }
                WaitOutcome::TimedOut => {}
            }
        }
    }
}

/// One side's channel, window and the region's raw mapping.
pub struct XenEndpoint {
    /// The channel (run the idm hello next).
    pub channel: XenChannel,
    /// The data window.
    pub window: XenWindow,
    /// The geometry.
    pub layout: ChannelLayout,
    /// The whole region (the window starts at `layout.window_offset()`).
    pub region: GrantRegion,
    /// The frontend's directory pages (kept granted while the channel lives).
    _directory: Option<GrantedPages>,
}

fn parts(
    layout: &ChannelLayout,
    region: &GrantRegion,
    frontend: bool,
) -> Result<(RingProducer<XenMemory>, RingConsumer<XenMemory>, XenWindow), ChannelSetupError> {
    let sub = |base: usize, len: usize| {
        SubRegion::new(region.clone(), base, len).map_err(|_| bad("region", "layout does not fit the region"))
    };
    let footprint = idm_core::ring::footprint(layout.ring_size());
    let c2s = sub(layout.client_to_server_offset(), footprint)?;
    let s2c = sub(layout.server_to_client_offset(), footprint)?;
    let (tx, rx) = if frontend { (c2s, s2c) } else { (s2c, c2s) };
    let size = layout.ring_size();
    let tx = RingProducer::attach(tx, size).map_err(ChannelSetupError::Ring)?;
    let rx = RingConsumer::attach(rx, size, 0).map_err(ChannelSetupError::Ring)?;
    let window = DataWindow::new(sub(layout.window_offset(), layout.window_size())?);
    Ok((tx, rx, window))
}

/// The frontend: claims a free slot under `devices` (e.g. `device/vgpu`, relative to the
/// domain's home), grants a region laid out by `layout` to the backend domain and waits
/// (up to `timeout`) for the backend to connect.
pub fn frontend_connect<S: Read + Write + AsFd>(
    xs: &mut XenStore<S>,
    devices: &str,
    layout: ChannelLayout,
    policy: WaitPolicy,
    timeout: Duration,
) -> Result<XenEndpoint, ChannelSetupError> {
    let slots = xs.directory(devices).map_err(|e| match e {
        XsError::Daemon(crate::xenstore::XsErrno::NoEntry) => ChannelSetupError::NoSlot(devices.to_string()),
        e => e.into(),
    })?;
    for slot in slots {
        let dir = format!("{devices}/{slot}");
        let Some(backend) = xs.read_string(&format!("{dir}/backend"))? else { continue };
        let front_state = read_state(xs, &dir)?.unwrap_or(XenbusState::Unknown);
        let back_state = read_state(xs, &backend)?.unwrap_or(XenbusState::Unknown);
        let free = matches!(front_state, XenbusState::Initialising | XenbusState::Closed | XenbusState::Unknown);
        if !free || back_state != XenbusState::InitWait {
            continue;
        }
        let backend_id = read_number(xs, &format!("{dir}/backend-id"), u64::from(u16::MAX))? as u16;
        match offer(xs, &dir, &backend, backend_id, layout, policy, timeout) {
            Ok(Some(ep)) => return Ok(ep),
            Ok(None) => continue, // another process claimed it first
            Err(e) => return Err(e),
        }
    }
    Err(ChannelSetupError::NoSlot(devices.to_string()))
}

fn offer<S: Read + Write + AsFd>(
    xs: &mut XenStore<S>,
    dir: &str,
    backend: &str,
    backend_id: u16,
    layout: ChannelLayout,
    policy: WaitPolicy,
    timeout: Duration,
) -> Result<Option<XenEndpoint>, ChannelSetupError> {
    let npages = layout.total_size() / XEN_PAGE_SIZE;
    let ndir = npages.div_ceil(REFS_PER_DIR_PAGE);
    if ndir > MAX_DIR_PAGES {
        return Err(bad(
            dir,
            format!("a {} byte region needs more than {MAX_DIR_PAGES} directory pages", layout.total_size()),
        ));
    }
    let gnt = GntAlloc::open()?;
    let pages = gnt.alloc(backend_id, npages, true)?;
    let directory = gnt.alloc(backend_id, ndir, true)?;
    let mut list = vec![0u8; ndir * XEN_PAGE_SIZE];
    for (i, r) in pages.refs().iter().enumerate() {
        list[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
    }
    directory.region().write_bytes(0, &list);
    let (evtchn, port) = EventChannel::bind_unbound(backend_id)?;
    pages.set_unmap_notify(FRONTEND_ALIVE, Some(port))?;
    let region = GrantRegion::from(pages);
    // The client initialises the region: control words and both rings.
    for off in (0..XEN_PAGE_SIZE).step_by(4) {
        region.store_u32(off, 0, Ordering::Relaxed);
    }
    let footprint = idm_core::ring::footprint(layout.ring_size());
    for base in [layout.client_to_server_offset(), layout.server_to_client_offset()] {
        let mem = SubRegion::new(region.clone(), base, footprint).map_err(|_| bad(dir, "layout"))?;
        RingProducer::init(mem, layout.ring_size()).map_err(ChannelSetupError::Ring)?;
    }
    let bell = XenBell::new(evtchn, region.clone(), FRONTEND_ALIVE, BACKEND_ALIVE);

    let claimed = xs.transaction(8, |xs, tx| {
        let state = xs.read_tx(tx, &format!("{dir}/state"))?;
        let state = state.and_then(|v| XenbusState::parse(&String::from_utf8_lossy(&v)));
        if !matches!(state, None | Some(XenbusState::Initialising | XenbusState::Closed | XenbusState::Unknown)) {
            return Ok(false);
        }
        for (i, r) in directory.refs().iter().enumerate() {
            xs.write_tx(tx, &format!("{dir}/ring-ref{i}"), r.to_string().as_bytes())?;
        }
        for (k, v) in [
            ("nr-ring-refs", ndir as u64),
            ("nr-pages", npages as u64),
            ("ring-size", layout.ring_size() as u64),
            ("window-size", layout.window_size() as u64),
            ("event-channel", u64::from(port)),
            ("protocol-version", u64::from(PROTOCOL_VERSION)),
        ] {
            xs.write_tx(tx, &format!("{dir}/{k}"), v.to_string().as_bytes())?;
        }
        xs.write_tx(tx, &format!("{dir}/state"), XenbusState::Initialised.to_string().as_bytes())?;
        Ok(true)
    })?;
    if !claimed {
        return Ok(None);
    }
    let connected = wait_for_state(
        xs,
        backend,
        |s| matches!(s, XenbusState::Connected | XenbusState::Closing | XenbusState::Closed),
        timeout,
    );
    match connected {
        Ok(XenbusState::Connected) => {}
        Ok(_) | Err(XsError::TimedOut) => {
            let _ = set_state(xs, dir, XenbusState::Closed);
            return Err(ChannelSetupError::Timeout(backend.to_string()));
        }
        Err(e) => return Err(e.into()),
    }
    set_state(xs, dir, XenbusState::Connected)?;
    let (tx, rx, window) = parts(&layout, &region, true)?;
    let channel = Channel::new(tx, rx, bell.clone(), bell, policy);
    Ok(Some(XenEndpoint { channel, window, layout, region, _directory: Some(directory) }))
}

/// Limits the backend applies to what a frontend asks for.
#[derive(Clone, Copy, Debug)]
pub struct BackendLimits {
    /// Largest ring.
    pub max_ring_size: usize,
    /// Largest data window.
    pub max_window_size: usize,
}

/// What a frontend offers, read from its keys and checked against the backend's limits
/// before anything is mapped.
#[derive(Debug, PartialEq, Eq)]
pub struct Offer {
    /// The channel geometry.
    pub layout: ChannelLayout,
    /// Pages of the region.
    pub npages: usize,
    /// Grant refs of the directory pages.
    pub dir_refs: Vec<u32>,
    /// The frontend's event-channel port.
    pub port: u32,
}

/// Reads and validates the frontend's keys under `front_dir` (every number bounded, the
/// geometry checked by idm-shm's layout rules and against `limits`, page and directory
/// counts consistent).
pub fn read_offer<S: Read + Write + AsFd>(
    xs: &mut XenStore<S>,
    front_dir: &str,
    limits: BackendLimits,
) -> Result<Offer, ChannelSetupError> {
    let key = |k: &str| format!("{front_dir}/{k}");
    let version = read_number(xs, &key("protocol-version"), u64::from(u32::MAX))?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(bad(&key("protocol-version"), format!("version {version}, we speak {PROTOCOL_VERSION}")));
    }
    let ring = read_number(xs, &key("ring-size"), limits.max_ring_size as u64)? as usize;
    let window = read_number(xs, &key("window-size"), limits.max_window_size as u64)? as usize;
    let layout = ChannelLayout::new(ring, window)?;
    let npages = read_number(xs, &key("nr-pages"), (MAX_DIR_PAGES * REFS_PER_DIR_PAGE) as u64)? as usize;
    if npages * XEN_PAGE_SIZE != layout.total_size() {
        return Err(bad(&key("nr-pages"), format!("{npages} pages do not hold a {} byte layout", layout.total_size())));
    }
    let ndir = read_number(xs, &key("nr-ring-refs"), MAX_DIR_PAGES as u64)? as usize;
    if ndir != npages.div_ceil(REFS_PER_DIR_PAGE) {
        return Err(bad(&key("nr-ring-refs"), format!("{ndir} directory pages for {npages} pages")));
    }
    let mut dir_refs = Vec::with_capacity(ndir);
    for i in 0..ndir {
        dir_refs.push(read_number(xs, &key(&format!("ring-ref{i}")), u64::from(u32::MAX))? as u32);
    }
    let port = read_number(xs, &key("event-channel"), u64::from(u32::MAX))? as u32;

    Ok(Offer { layout, npages, dir_refs, port })
}

/// The backend: maps the region the frontend in domain `front_domid` offered under
/// `front_dir`, binds its event channel, and marks `back_dir` Connected.
pub fn backend_accept<S: Read + Write + AsFd>(
    xs: &mut XenStore<S>,
    front_dir: &str,
    back_dir: &str,
    front_domid: u16,
    limits: BackendLimits,
    policy: WaitPolicy,
) -> Result<XenEndpoint, ChannelSetupError> {
    let Offer { layout, npages, dir_refs, port } = read_offer(xs, front_dir, limits)?;
    let gnt = GntDev::open()?;
    // The directory: mapped, copied out once, unmapped; only the copy is used.
    let list = {
        let dir_map = GrantRegion::try_from(gnt.map(u32::from(front_domid), &dir_refs, true)?)?;
        let mut list = vec![0u8; npages * 4];
        dir_map.read_bytes(0, &mut list);
        list
    };
    let refs: Vec<u32> = list.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let mapped = gnt.map(u32::from(front_domid), &refs, true)?;
    let evtchn = EventChannel::bind_interdomain(front_domid, port)?;
    mapped.set_unmap_notify(BACKEND_ALIVE, Some(evtchn.port()))?;
    let region = GrantRegion::try_from(mapped)?;
    let bell = XenBell::new(evtchn, region.clone(), BACKEND_ALIVE, FRONTEND_ALIVE);
    let (tx, rx, window) = parts(&layout, &region, false)?;
    let channel = Channel::new(tx, rx, bell.clone(), bell, policy);
    for (k, v) in [
        ("max-ring-size", limits.max_ring_size as u64),
        ("max-window-size", limits.max_window_size as u64),
        ("protocol-version", u64::from(PROTOCOL_VERSION)),
    ] {
        xs.write(&format!("{back_dir}/{k}"), v.to_string().as_bytes())?;
    }
    set_state(xs, back_dir, XenbusState::Connected)?;
    Ok(XenEndpoint { channel, window, layout, region, _directory: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstore::fake::{connect, Fake};

    const DIR: &str = "/local/domain/5/device/vgpu/0";
    const LIMITS: BackendLimits = BackendLimits { max_ring_size: 1 << 20, max_window_size: 64 << 20 };

    /// A well-formed offer: 64 KiB rings, a 1 MiB window.
    fn keys() -> Vec<(&'static str, String)> {
        let layout = ChannelLayout::new(64 << 10, 1 << 20).unwrap();
        let npages = layout.total_size() / XEN_PAGE_SIZE;
        vec![
            ("protocol-version", PROTOCOL_VERSION.to_string()),
            ("ring-size", (64 << 10).to_string()),
            ("window-size", (1 << 20).to_string()),
            ("nr-pages", npages.to_string()),
            ("nr-ring-refs", "1".into()),
            ("ring-ref0", "77".into()),
            ("event-channel", "9".into()),
        ]
    }

    fn offer(keys: &[(&str, String)]) -> Result<Offer, ChannelSetupError> {
        let mut fake = Fake::default();
        for (k, v) in keys {
            fake.nodes.insert(format!("{DIR}/{k}"), v.as_bytes().to_vec());
        }
        read_offer(&mut connect(fake), DIR, LIMITS)
    }

    fn with(key: &str, value: &str) -> Vec<(&'static str, String)> {
        keys().into_iter().map(|(k, v)| if k == key { (k, value.to_string()) } else { (k, v) }).collect()
    }

    #[test]
    fn a_well_formed_offer_is_read() {
        let o = offer(&keys()).unwrap();
        assert_eq!((o.layout.ring_size(), o.layout.window_size()), (64 << 10, 1 << 20));
        assert_eq!(o.dir_refs, [77]);
        assert_eq!(o.port, 9);
        assert_eq!(o.npages * XEN_PAGE_SIZE, o.layout.total_size());
    }

    #[test]
    fn hostile_offers_are_refused_naming_the_key() {
        let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
            (with("protocol-version", "1"), "protocol-version"),
            (with("ring-size", "65535"), "geometry"),
            (with("ring-size", (2 << 20).to_string().as_str()), "ring-size"),
            (with("window-size", (128 << 20).to_string().as_str()), "window-size"),
            (with("window-size", "-1"), "window-size"),
            (with("nr-pages", "1"), "nr-pages"),
            (with("nr-pages", "99999999999"), "nr-pages"),
            (with("nr-ring-refs", "2"), "nr-ring-refs"),
            (with("nr-ring-refs", "65"), "nr-ring-refs"),
            (with("ring-ref0", "0x4d"), "ring-ref0"),
            (with("event-channel", "4294967296"), "event-channel"),
            (keys().into_iter().filter(|(k, _)| *k != "ring-ref0").collect(), "ring-ref0"),
            (keys().into_iter().filter(|(k, _)| *k != "event-channel").collect(), "event-channel"),
        ];
        for (keys, names) in cases {
            let err = offer(&keys).expect_err(names).to_string();
            assert!(err.contains(names), "{names}: {err}");
        }
    }
}
