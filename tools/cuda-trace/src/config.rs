//! The tracer's settings, read once from the environment: where the real driver is, where
//! the log goes and which names are too frequent to log.

use std::path::PathBuf;

/// Where NVIDIA's driver library is looked for when `VGPU_TRACE_REAL` is not set, in order.
pub(crate) const DEFAULT_REAL_PATHS: &[&str] = &["/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib64/libcuda.so.1"];

/// The settings of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Config {
    /// Candidate paths of the real driver, tried in order.
    pub real: Vec<PathBuf>,
    /// The log file (with `%p` already replaced by the pid), or `None` for stderr.
    pub out: Option<PathBuf>,
    /// Names whose calls and returns are not logged.
    pub quiet: Vec<String>,
}

impl Config {
    /// Reads the settings through `var` (the environment in production, a map in tests).
    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>, pid: u32) -> Config {
        let real = match var("VGPU_TRACE_REAL").filter(|v| !v.is_empty()) {
            Some(path) => vec![PathBuf::from(path)],
            None => DEFAULT_REAL_PATHS.iter().map(PathBuf::from).collect(),
        };
        let out = var("VGPU_TRACE_OUT").filter(|v| !v.is_empty()).map(|v| PathBuf::from(expand_pid(&v, pid)));
        let quiet = var("VGPU_TRACE_QUIET_NAMES")
            .map(|v| v.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        Config { real, out, quiet }
    }

    /// Reads the settings from the process environment.
    pub(crate) fn from_env() -> Config {
        Config::from_vars(|name| std::env::var(name).ok(), std::process::id())
    }

    /// Whether calls of `name` are to be left out of the log.
    pub(crate) fn is_quiet(&self, name: &str) -> bool {
        self.quiet.iter().any(|q| q == name)
    }
}

/// Replaces every `%p` in `path` with the process id, so that each process of a program
/// that forks or runs others gets its own log.
pub(crate) fn expand_pid(path: &str, pid: u32) -> String {
    path.replace("%p", &pid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Config {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_vars(|k| map.get(k).cloned(), 4242)
    }

    #[test]
    fn defaults_try_both_driver_paths_and_log_to_stderr() {
        let c = config(&[]);
        assert_eq!(c.real, DEFAULT_REAL_PATHS.iter().map(PathBuf::from).collect::<Vec<_>>());
        assert_eq!(c.out, None);
        assert!(c.quiet.is_empty());
    }

    #[test]
    fn pid_is_substituted_in_the_log_path() {
        let c = config(&[("VGPU_TRACE_OUT", "/tmp/t-%p.tsv"), ("VGPU_TRACE_REAL", "/opt/libcuda.so.1")]);
        assert_eq!(c.out, Some(PathBuf::from("/tmp/t-4242.tsv")));
        assert_eq!(c.real, vec![PathBuf::from("/opt/libcuda.so.1")]);
        assert_eq!(expand_pid("a%pb%p", 7), "a7b7");
    }

    #[test]
    fn quiet_names_are_a_trimmed_comma_list() {
        let c = config(&[("VGPU_TRACE_QUIET_NAMES", " cuCtxGetCurrent, ,cuStreamQuery ")]);
        assert_eq!(c.quiet, vec!["cuCtxGetCurrent".to_string(), "cuStreamQuery".to_string()]);
        assert!(c.is_quiet("cuStreamQuery"));
        assert!(!c.is_quiet("cuInit"));
    }
}
