//! Daemon configuration (TOML), validated with errors that say which key is wrong and why.
//!
//! ```toml
//! socket = "/run/xen-vgpu/host-proxy.sock"   # local transport listening socket
//! backend = "cuda"                           # "cuda" (real GPU) or "sim" (test double)
//! device = 0                                 # CUDA device ordinal
//! sim_memory_bytes = 17179869184             # size of the simulated GPU (sim only)
//! max_ring_bytes = 4194304                   # largest ring a guest may ask for
//! max_window_bytes = 268435456               # largest data window a guest may ask for
//! allow_unlisted = true                      # serve peers with no [[zone]] entry
//! profile_requests = false                   # log per-request timings at each session's end
//!
//! [quotas]                                   # defaults for every zone; each holds over
//! mem_bytes = 4294967296                     #   all the zone's sessions (processes) at once
//! max_handles = 4096
//! max_async_in_flight = 1024                 # (per session: the GPU queue it may fill)
//! max_sessions = 8                           # CUDA processes at once (≥ xen_slots, ≤ 64)
//! # context_mem_bytes = 536870912            # charged per context; default: the backend's
//!
//! [[zone]]                                   # a known tenant, by peer uid
//! name = "tenant-a"
//! uid = 1000
//! quotas = { mem_bytes = 1073741824, max_handles = 512, max_async_in_flight = 256 }
//! sharing = "isolated"                       # or "mps" (its one sharing group's MPS server)
//!                                            # or "mig" with mig_uuid = "MIG-…"
//! ```
//!
//! `mps_control` (default `nvidia-cuda-mps-control`) and `mps_dir` (default `<socket>.mps`)
//! say how host-proxy runs the MPS servers of `sharing = "mps"` groups ([`crate::mps`]).

use crate::zone::Quotas;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Which GPU backend zone workers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The real GPU through the CUDA driver.
    Cuda,
    /// The simulated test double (host memory).
    Sim,
}

/// One configured zone.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Name used in logs.
    pub name: String,
    /// Peer uid that identifies the zone on the local transport.
    pub uid: u32,
    /// Quotas overriding the defaults.
    pub quotas: Option<Quotas>,
    /// How the zone shares the GPU with other zones.
    #[serde(default)]
    pub sharing: SharingMode,
    /// The MIG instance the zone is pinned to (`MIG-…`, as `nvidia-smi -L` prints it), for
    /// `sharing = "mig"`.
    #[serde(default)]
    pub mig_uuid: Option<String>,
}

/// How a zone shares the GPU with other zones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SharingMode {
    /// Its own workers and contexts, time-sliced with the other zones by the GPU: a fault
    /// stays in the zone.
    #[default]
    Isolated,
    /// The zones of its one sharing group run their workers as clients of one CUDA MPS
    /// server, which host-proxy starts, watches and stops: their kernels run concurrently,
    /// and a fault in one of them ends the sessions of every zone of the group (never of a
    /// zone outside it).
    Mps,
    /// Pinned to one MIG instance (`mig_uuid`): the hardware partitions memory and compute.
    Mig,
}

/// How one zone's workers are started, from its sharing mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// `sharing = "isolated"`.
    Isolated,
    /// `sharing = "mps"`: a client of the named sharing group's MPS server.
    Mps {
        /// The sharing group.
        group: String,
    },
    /// `sharing = "mig"`: on this MIG instance.
    Mig {
        /// Its UUID.
        uuid: String,
    },
}

/// The daemon's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listening socket of the local transport.
    pub socket: PathBuf,
    /// GPU backend.
    pub backend: BackendKind,
    /// CUDA device ordinal.
    #[serde(default)]
    pub device: i32,
    /// Memory of the simulated GPU.
    #[serde(default = "default_sim_memory")]
    pub sim_memory_bytes: u64,
    /// Largest ring a guest may ask for.
    #[serde(default = "default_max_ring")]
    pub max_ring_bytes: u64,
    /// Largest data window a guest may ask for.
    #[serde(default = "default_max_window")]
    pub max_window_bytes: u64,
    /// Serve peers that match no `[[zone]]`, with the default quotas.
    #[serde(default = "default_true")]
    pub allow_unlisted: bool,
    /// Default quotas.
    #[serde(default)]
    pub quotas: Quotas,
    /// Known zones.
    #[serde(default, rename = "zone")]
    pub zones: Vec<ZoneConfig>,
    /// Groups of zones allowed to share GPU memory through CUDA IPC (think of the
    /// ResourceClaim two pods reference). Zones in no common group cannot.
    #[serde(default, rename = "sharing_group")]
    pub sharing_groups: Vec<SharingGroup>,
    /// Serve Xen guests (grant tables + event channels, handshake in xenstore): `auto`
    /// (when this is dom0 with xenstore), `on` (fail if not), `off`.
    #[serde(default)]
    pub xen: XenMode,
    /// Device slots (`device/vgpu/N`) offered to each Xen guest: how many of its
    /// processes may hold a session at once.
    #[serde(default = "default_xen_slots")]
    pub xen_slots: u32,
    /// Workers record each request's service time and the gap before it, and log a summary
    /// per request kind when the session ends (a diagnostic: two clock reads per request).
    #[serde(default)]
    pub profile_requests: bool,
    /// The MPS control program host-proxy runs for `sharing = "mps"` groups (found on
    /// `PATH` unless a path is given).
    #[serde(default = "default_mps_control")]
    pub mps_control: PathBuf,
    /// Serve Prometheus metrics on this address (`GET /metrics`); off when absent.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where each MPS group's pipe and log folders go (`<mps_dir>/<group>/{pipe,log}`);
    /// default: `<socket>.mps` beside the socket.
    #[serde(default)]
    pub mps_dir: Option<PathBuf>,
}

fn default_mps_control() -> PathBuf {
    PathBuf::from("nvidia-cuda-mps-control")
}

/// Whether host-proxy serves Xen guests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XenMode {
    /// When running in dom0 with xenstore reachable.
    #[default]
    Auto,
    /// Always; failing to reach xenstore is an error.
    On,
    /// Never.
    Off,
}

fn default_xen_slots() -> u32 {
    4
}

/// Zones allowed to open each other's CUDA IPC handles.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingGroup {
    /// Name used in logs.
    pub name: String,
    /// Names of `[[zone]]` entries.
    pub zones: Vec<String>,
}

fn default_sim_memory() -> u64 {
    16 << 30
}
fn default_max_ring() -> u64 {
    4 << 20
}
fn default_max_window() -> u64 {
    256 << 20
}
fn default_true() -> bool {
    true
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or had unknown/mistyped keys.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("config value `{key}` is invalid: {why}")]
    Invalid {
        /// The key.
        key: String,
        /// Why.
        why: String,
    },
}

/// The configuration used when none is given: the simulated GPU on a socket in the
/// temporary directory, so the daemon runs anywhere.
pub const EMBEDDED_DEFAULT: &str = r#"
socket = "/tmp/xen-vgpu/host-proxy.sock"
backend = "sim"
sim_memory_bytes = 17179869184
"#;

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_owned(), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, why: &str| Err(ConfigError::Invalid { key: key.into(), why: why.into() });
        if !(1..=64).contains(&self.xen_slots) {
            return invalid("xen_slots", "must be 1..=64");
        }
        if self.device < 0 {
            return invalid("device", "must be a CUDA device ordinal (0 or more)");
        }
        if !self.max_ring_bytes.is_power_of_two() || !(4096..=(1 << 30)).contains(&self.max_ring_bytes) {
            return invalid("max_ring_bytes", "must be a power of two between 4096 and 1 GiB");
        }
        if self.max_window_bytes > (64 << 30) {
            return invalid("max_window_bytes", "must be at most 64 GiB");
        }
        let check_quotas = |key: &str, q: &Quotas| {
            if q.mem_bytes == 0 || q.max_handles == 0 || q.max_async_in_flight == 0 {
                return invalid(key, "every quota must be greater than zero");
            }
            if !(1..=crate::ledger::MAX_SLOTS).contains(&q.max_sessions) {
                return invalid(&format!("{key}.max_sessions"), "must be 1..=64");
            }
            // A Xen guest is offered `xen_slots` device slots, each a session: the zone's
            // limit must admit them all, or a guest would be offered slots it cannot use.
            if self.xen != XenMode::Off && q.max_sessions < self.xen_slots {
                return invalid(
                    &format!("{key}.max_sessions"),
                    &format!(
                        "is {} but every Xen guest is offered xen_slots = {} sessions; raise it or lower xen_slots",
                        q.max_sessions, self.xen_slots
                    ),
                );
            }
            if q.context_mem_bytes.is_some_and(|c| c >= q.mem_bytes) {
                return invalid(
                    &format!("{key}.context_mem_bytes"),
                    "must be less than mem_bytes (each session's context is charged to the zone)",
                );
            }
            Ok(())
        };
        check_quotas("quotas", &self.quotas)?;
        let mut seen = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for (i, z) in self.zones.iter().enumerate() {
            if !seen.insert(z.uid) {
                return invalid(&format!("zone[{i}].uid"), &format!("uid {} is listed twice", z.uid));
            }
            if !names.insert(z.name.as_str()) {
                return invalid(&format!("zone[{i}].name"), &format!("zone name {:?} is used twice", z.name));
            }
            if let Some(q) = &z.quotas {
                check_quotas(&format!("zone[{i}].quotas"), q)?;
            }
            match (z.sharing, &z.mig_uuid) {
                (SharingMode::Mig, None) => {
                    return invalid(&format!("zone[{i}].mig_uuid"), "sharing = \"mig\" needs the MIG instance's UUID");
                }
                (SharingMode::Mig, Some(u)) => {
                    let ok = u.starts_with("MIG-")
                        && u.len() <= 64
                        && u[4..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'/');
                    if !ok || u.len() == 4 {
                        return invalid(
                            &format!("zone[{i}].mig_uuid"),
                            &format!("{u:?} is not a MIG UUID (MIG-…, as nvidia-smi -L prints it)"),
                        );
                    }
                }
                (_, Some(_)) => {
                    return invalid(&format!("zone[{i}].mig_uuid"), "is only for sharing = \"mig\"");
                }
                _ => {}
            }
        }
        let mut groups = std::collections::HashSet::new();
        for (i, g) in self.sharing_groups.iter().enumerate() {
            if !groups.insert(g.name.as_str()) {
                return invalid(&format!("sharing_group[{i}].name"), &format!("group name {:?} is used twice", g.name));
            }
            if g.zones.len() < 2 {
                return invalid(&format!("sharing_group[{i}].zones"), "a sharing group needs at least two zones");
            }
            if let Some(z) = g.zones.iter().find(|z| !names.contains(z.as_str())) {
                return invalid(
                    &format!("sharing_group[{i}].zones"),
                    &format!("{z:?} is not the name of a [[zone]] (unlisted peers cannot share)"),
                );
            }
            // One MPS server per group: its zones are all MPS clients or none is.
            let mps =
                g.zones.iter().filter(|n| self.zones.iter().any(|z| &z.name == *n && z.sharing == SharingMode::Mps));
            let count = mps.count();
            if count > 0 && count < g.zones.len() {
                return invalid(
                    &format!("sharing_group[{i}]"),
                    &format!("group {:?} mixes sharing = \"mps\" zones with others: its zones share one MPS server, all or none", g.name),
                );
            }
        }
        for (i, z) in self.zones.iter().enumerate() {
            if z.sharing == SharingMode::Mps {
                let groups = self.groups_of(&z.name);
                if groups.len() != 1 {
                    return invalid(
                        &format!("zone[{i}].sharing"),
                        &format!(
                            "sharing = \"mps\" needs the zone in exactly one [[sharing_group]] (the zones that share its MPS server); {:?} is in {}",
                            z.name,
                            groups.len()
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// The sharing groups zone `name` belongs to.
    pub fn groups_of(&self, name: &str) -> Vec<String> {
        self.sharing_groups.iter().filter(|g| g.zones.iter().any(|z| z == name)).map(|g| g.name.clone()).collect()
    }

    /// Where zone `name`'s workers run: their own contexts, an MPS group's server, or a MIG
    /// instance (unlisted zones are isolated).
    pub fn placement_of(&self, name: &str) -> Placement {
        match self.zones.iter().find(|z| z.name == name) {
            Some(z) if z.sharing == SharingMode::Mps => {
                Placement::Mps { group: self.groups_of(name).into_iter().next().unwrap_or_default() }
            }
            Some(z) if z.sharing == SharingMode::Mig => Placement::Mig { uuid: z.mig_uuid.clone().unwrap_or_default() },
            _ => Placement::Isolated,
        }
    }

    /// The zone of a Xen guest: the `[[zone]]` named like the domain, or, with
    /// `allow_unlisted`, `dom-<name>` with the default quotas.
    pub fn zone_for_domain(&self, domain: &str) -> Option<(String, Quotas)> {
        match self.zones.iter().find(|z| z.name == domain) {
            Some(z) => Some((z.name.clone(), z.quotas.unwrap_or(self.quotas))),
            None if self.allow_unlisted => Some((format!("dom-{domain}"), self.quotas)),
            None => None,
        }
    }

    /// The zone name and quotas for a peer uid, or `None` if unlisted peers are refused.
    pub fn zone_for_uid(&self, uid: u32) -> Option<(String, Quotas)> {
        match self.zones.iter().find(|z| z.uid == uid) {
            Some(z) => Some((z.name.clone(), z.quotas.unwrap_or(self.quotas))),
            None if self.allow_unlisted => Some((format!("uid-{uid}"), self.quotas)),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharing_groups_name_known_zones() {
        let base = r#"
            socket = "/tmp/s"
            backend = "sim"
            [[zone]]
            name = "producer"
            uid = 1000
            [[zone]]
            name = "consumer"
            uid = 1001
            [[zone]]
            name = "other"
            uid = 1002
        "#;
        let ok = Config::parse(
            &format!("{base}[[sharing_group]]\nname = \"p\"\nzones = [\"producer\", \"consumer\"]\n"),
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(ok.groups_of("producer"), vec!["p".to_owned()]);
        assert!(ok.groups_of("other").is_empty());
        let unknown = Config::parse(
            &format!("{base}[[sharing_group]]\nname = \"p\"\nzones = [\"producer\", \"nobody\"]\n"),
            Path::new("t"),
        );
        assert!(unknown.unwrap_err().to_string().contains("\"nobody\" is not the name of a [[zone]]"));
        let single =
            Config::parse(&format!("{base}[[sharing_group]]\nname = \"p\"\nzones = [\"producer\"]\n"), Path::new("t"));
        assert!(single.unwrap_err().to_string().contains("at least two zones"));
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::parse(EMBEDDED_DEFAULT, Path::new("<embedded>")).unwrap();
        assert_eq!(c.backend, BackendKind::Sim);
        assert_eq!(c.zone_for_uid(1234).unwrap().1, Quotas::default());
        assert!(!c.profile_requests, "request profiling is opt-in");
        let on = format!("{EMBEDDED_DEFAULT}profile_requests = true\n");
        assert!(Config::parse(&on, Path::new("t")).unwrap().profile_requests);
        let typo = format!("{EMBEDDED_DEFAULT}profile_requests = \"yes\"\n");
        assert!(Config::parse(&typo, Path::new("t")).unwrap_err().to_string().contains("profile_requests"));
    }

    #[test]
    fn session_limits_are_checked_against_xen_slots_and_the_memory_quota() {
        let base = "socket = \"/s\"\nbackend = \"sim\"\n";
        let c = Config::parse(base, Path::new("t")).unwrap();
        assert_eq!((c.quotas.max_sessions, c.quotas.context_mem_bytes), (8, None), "the defaults");
        let q = |extra: &str| {
            format!("{base}{extra}[quotas]\nmem_bytes = 1000\nmax_handles = 1\nmax_async_in_flight = 1\n")
        };
        let e = Config::parse(&format!("{}max_sessions = 0\n", q("")), Path::new("t")).unwrap_err().to_string();
        assert!(e.contains("quotas.max_sessions") && e.contains("1..=64"), "{e}");
        let e = Config::parse(&format!("{}max_sessions = 65\n", q("")), Path::new("t")).unwrap_err().to_string();
        assert!(e.contains("quotas.max_sessions"), "{e}");
        // Xen guests get xen_slots sessions each; a zone must admit them all.
        let e = Config::parse(&format!("{}max_sessions = 2\n", q("xen_slots = 4\n")), Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("xen_slots = 4"), "{e}");
        let ok = Config::parse(&format!("{}max_sessions = 2\n", q("xen_slots = 4\nxen = \"off\"\n")), Path::new("t"));
        assert_eq!(ok.unwrap().quotas.max_sessions, 2, "without Xen, xen_slots does not matter");
        let e = Config::parse(&format!("{}context_mem_bytes = 1000\n", q("")), Path::new("t")).unwrap_err().to_string();
        assert!(e.contains("context_mem_bytes"), "{e}");
        let ok = Config::parse(&format!("{}context_mem_bytes = 0\n", q("")), Path::new("t")).unwrap();
        assert_eq!(ok.quotas.context_mem_bytes, Some(0));
    }

    #[test]
    fn sharing_modes_are_validated() {
        let base = "socket = \"/s\"\nbackend = \"cuda\"\n";
        let zone = |name: &str, uid: u32, extra: &str| format!("[[zone]]\nname = \"{name}\"\nuid = {uid}\n{extra}");
        let group = |zones: &str| format!("[[sharing_group]]\nname = \"g\"\nzones = [{zones}]\n");
        let parse = |t: String| Config::parse(&t, Path::new("t"));
        let ok = parse(format!(
            "{base}{}{}{}{}",
            zone("a", 1, "sharing = \"mps\"\n"),
            zone("b", 2, "sharing = \"mps\"\n"),
            zone("m", 3, "sharing = \"mig\"\nmig_uuid = \"MIG-4f6a2c1e-9d3b-5e7f-8a1b-2c3d4e5f6a7b\"\n"),
            group("\"a\", \"b\""),
        ))
        .unwrap();
        assert_eq!(ok.placement_of("a"), Placement::Mps { group: "g".into() });
        assert_eq!(ok.placement_of("m"), Placement::Mig { uuid: "MIG-4f6a2c1e-9d3b-5e7f-8a1b-2c3d4e5f6a7b".into() });
        assert_eq!(ok.placement_of("uid-9"), Placement::Isolated, "unlisted zones are isolated");
        let err = |t: String| parse(t).unwrap_err().to_string();
        let e = err(format!("{base}{}", zone("a", 1, "sharing = \"mps\"\n")));
        assert!(e.contains("zone[0].sharing") && e.contains("exactly one"), "an MPS zone needs its group: {e}");
        let e =
            err(format!("{base}{}{}{}", zone("a", 1, "sharing = \"mps\"\n"), zone("b", 2, ""), group("\"a\", \"b\"")));
        assert!(e.contains("mixes"), "{e}");
        let e = err(format!("{base}{}", zone("m", 3, "sharing = \"mig\"\n")));
        assert!(e.contains("zone[0].mig_uuid"), "{e}");
        let e = err(format!("{base}{}", zone("m", 3, "sharing = \"mig\"\nmig_uuid = \"GPU-1234\"\n")));
        assert!(e.contains("not a MIG UUID"), "{e}");
        let e = err(format!("{base}{}", zone("m", 3, "mig_uuid = \"MIG-1234\"\n")));
        assert!(e.contains("only for sharing"), "{e}");
        let e = err(format!("{base}{}", zone("m", 3, "sharing = \"shared\"\n")));
        assert!(e.contains("sharing") || e.contains("unknown variant"), "{e}");
    }

    #[test]
    fn zones_override_quotas_and_unlisted_can_be_refused() {
        let c = Config::parse(
            r#"
            socket = "/tmp/s"
            backend = "cuda"
            allow_unlisted = false
            [[zone]]
            name = "a"
            uid = 7
            quotas = { mem_bytes = 10, max_handles = 2, max_async_in_flight = 1 }
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.zone_for_uid(7).unwrap().1.mem_bytes, 10);
        assert_eq!(c.zone_for_uid(8), None);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("socket = \"/s\"\nbackend = \"gpu\"\n", Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("backend"), "{e}");
        let e = Config::parse("socket = \"/s\"\nbackend = \"sim\"\nmax_ring_bytes = 5000\n", Path::new("t.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("max_ring_bytes"), "{e}");
        let e = Config::parse("socket = \"/s\"\nbackend = \"sim\"\nbogus = 1\n", Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::parse(
            "socket = \"/s\"\nbackend = \"sim\"\n[quotas]\nmem_bytes = 0\nmax_handles = 1\nmax_async_in_flight = 1\n",
            Path::new("t.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("quotas"), "{e}");
    }
}
