//! Reading what containerd hands the shim: the bundle's OCI `config.json` and an exec's
//! process spec, into the checked [`ContainerSpec`] and [`ProcessSpec`] the backends take.
//!
//! Only the fields a zone honours are read; a spec asking for what the shim cannot give (a
//! terminal) is refused here with a clear error rather than half-honoured later.

use crate::backend::{ContainerSpec, PodIdentity, ProcessSpec, RootfsMount, Stdio};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// CRI's annotations naming the pod a container belongs to.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";

/// Why a spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("reading {path}: {err}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        err: std::io::Error,
    },
    /// Not JSON, or a field of the wrong type.
    #[error("{0}")]
    Malformed(String),
    /// Asks for something the shim does not do.
    #[error("{0}")]
    Unsupported(String),
}

fn malformed(what: impl std::fmt::Display) -> SpecError {
    SpecError::Malformed(what.to_string())
}

fn strings(v: Option<&Value>, what: &str) -> Result<Vec<String>, SpecError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| malformed(format_args!("{what}: every entry must be a string")))
            })
            .collect(),
        Some(_) => Err(malformed(format_args!("{what} must be a list of strings"))),
    }
}

fn id_of(v: Option<&Value>, what: &str) -> Result<u32, SpecError> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| malformed(format_args!("{what} must be a 32-bit unsigned number"))),
    }
}

/// Parses an OCI `process` object (the bundle's, or an exec's).
pub fn process(v: &Value, stdio: Stdio, terminal_requested: bool) -> Result<ProcessSpec, SpecError> {
    let obj = v.as_object().ok_or_else(|| malformed("process must be an object"))?;
    if terminal_requested || obj.get("terminal").and_then(Value::as_bool) == Some(true) {
        return Err(SpecError::Unsupported(
            "terminals (tty: true, ctr -t) are not supported by the xenvgpu shim yet; run without a terminal".into(),
        ));
    }
    let args = strings(obj.get("args"), "process.args")?;
    if args.is_empty() || args[0].is_empty() {
        return Err(malformed("process.args is empty: nothing to run"));
    }
    let env = strings(obj.get("env"), "process.env")?;
    let cwd = match obj.get("cwd") {
        None | Some(Value::Null) => "/".to_owned(),
        Some(Value::String(c)) if c.starts_with('/') => c.clone(),
        Some(_) => return Err(malformed("process.cwd must be an absolute path")),
    };
    let user = obj.get("user").and_then(Value::as_object);
    let uid = id_of(user.and_then(|u| u.get("uid")), "process.user.uid")?;
    let gid = id_of(user.and_then(|u| u.get("gid")), "process.user.gid")?;
    let additional_gids = match user.and_then(|u| u.get("additionalGids")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(g)) => {
            g.iter().map(|g| id_of(Some(g), "process.user.additionalGids")).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(malformed("process.user.additionalGids must be a list of numbers")),
    };
    Ok(ProcessSpec { args, env, cwd, uid, gid, additional_gids, stdio })
}

/// Reads `<bundle>/config.json` into the container's spec.
pub fn container(
    id: &str,
    bundle: &Path,
    mounts: Vec<RootfsMount>,
    stdio: Stdio,
    terminal: bool,
) -> Result<ContainerSpec, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|err| SpecError::Read { path: path.clone(), err })?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| malformed(format_args!("{}: {e}", path.display())))?;
    let process = process(v.get("process").ok_or_else(|| malformed("config.json has no process"))?, stdio, terminal)?;
    let root = v.get("root").and_then(Value::as_object);
    let root_path = match root.and_then(|r| r.get("path")) {
        None | Some(Value::Null) => "rootfs".to_owned(),
        Some(Value::String(p)) if !p.is_empty() => p.clone(),
        Some(_) => return Err(malformed("root.path must be a non-empty string")),
    };
    let rootfs = if Path::new(&root_path).is_absolute() { PathBuf::from(root_path) } else { bundle.join(root_path) };
    let rootfs_readonly = root.and_then(|r| r.get("readonly")).and_then(Value::as_bool).unwrap_or(false);
    Ok(ContainerSpec {
        id: id.to_owned(),
        bundle: bundle.to_owned(),
        rootfs,
        rootfs_readonly,
        mounts,
        pod: pod_identity(&v, id),
        process,
    })
}

/// The pod a spec's annotations name (a container without them is its own pod).
pub fn pod_identity(spec: &Value, container_id: &str) -> PodIdentity {
    let ann =
        |k: &str| spec.get("annotations").and_then(|a| a.get(k)).and_then(Value::as_str).filter(|s| !s.is_empty());
    let name = match (ann(SANDBOX_NAMESPACE), ann(SANDBOX_NAME)) {
        (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
        (None, Some(n)) => Some(n.to_owned()),
        _ => None,
    };
    PodIdentity {
        sandbox_id: ann(SANDBOX_ID).unwrap_or(container_id).to_owned(),
        name,
        uid: ann(SANDBOX_UID).map(str::to_owned),
    }
}

/// The sandbox id that groups containers into one shim: read from `<bundle>/config.json`,
/// else the container's own id.
pub fn grouping(bundle: &Path, container_id: &str) -> String {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        .map(|v| pod_identity(&v, container_id).sandbox_id)
        .unwrap_or_else(|| container_id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_process_is_read_with_defaults() {
        let p =
            process(&json!({"args": ["/bin/echo", "hi"], "user": {"uid": 1000, "gid": 100}}), Stdio::default(), false)
                .unwrap();
        assert_eq!(p.args, ["/bin/echo", "hi"]);
        assert_eq!((p.uid, p.gid, p.cwd.as_str()), (1000, 100, "/"));
        assert!(p.env.is_empty() && p.additional_gids.is_empty());
    }

    #[test]
    fn bad_processes_are_refused_with_the_field_named() {
        let cases = [
            (json!({"args": []}), "empty"),
            (json!({"args": ["sh"], "cwd": "relative"}), "absolute"),
            (json!({"args": ["sh"], "user": {"uid": -1}}), "uid"),
            (json!({"args": ["sh"], "env": [1]}), "process.env"),
            (json!({"args": ["sh"], "user": {"uid": 4294967296u64}}), "uid"),
        ];
        for (spec, word) in cases {
            let e = process(&spec, Stdio::default(), false).unwrap_err().to_string();
            assert!(e.contains(word), "{spec}: {e}");
        }
        let e = process(&json!({"args": ["sh"], "terminal": true}), Stdio::default(), false).unwrap_err();
        assert!(matches!(e, SpecError::Unsupported(_)), "{e}");
        assert!(matches!(process(&json!({"args": ["sh"]}), Stdio::default(), true), Err(SpecError::Unsupported(_))));
    }

    #[test]
    fn the_pod_comes_from_cri_annotations_or_the_container() {
        let spec = json!({"annotations": {
            SANDBOX_ID: "sb1", SANDBOX_NAME: "producer", SANDBOX_NAMESPACE: "ml", SANDBOX_UID: "u-1"}});
        let pod = pod_identity(&spec, "c1");
        assert_eq!(
            pod,
            PodIdentity { sandbox_id: "sb1".into(), name: Some("ml/producer".into()), uid: Some("u-1".into()) }
        );
        assert_eq!(pod_identity(&json!({}), "c1"), PodIdentity { sandbox_id: "c1".into(), name: None, uid: None });
    }

    #[test]
    fn a_bundle_is_read_with_its_rootfs() {
        let dir = std::env::temp_dir().join(format!("xenvgpu-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"process":{"args":["/hello"],"cwd":"/w"},"root":{"path":"rootfs","readonly":true}}"#,
        )
        .unwrap();
        let c = container("c1", &dir, Vec::new(), Stdio::default(), false).unwrap();
        assert_eq!(c.rootfs, dir.join("rootfs"));
        assert!(c.rootfs_readonly);
        assert_eq!(c.process.cwd, "/w");
        assert_eq!(grouping(&dir, "c1"), "c1");
        std::fs::write(dir.join("config.json"), "{not json").unwrap();
        assert!(matches!(container("c1", &dir, Vec::new(), Stdio::default(), false), Err(SpecError::Malformed(_))));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(container("c1", &dir, Vec::new(), Stdio::default(), false), Err(SpecError::Read { .. })));
    }
}
