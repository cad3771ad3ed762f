//! The workload description on the kernel command line.
//!
//! Linux does not pass parameters with a dot in their name to init, so the agent reads
//! `/proc/cmdline` itself. Values may be double-quoted (`vgpu.run="/usr/bin/app -n 3"`),
//! as the kernel's own parser allows.
//!
//! * `vgpu.run="PROGRAM ARGS…"` — the workload (split on spaces).
//! * `vgpu.env=NAME=VALUE` — an environment variable for it (repeatable).

/// What the command line asks of the agent.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Program and arguments; empty when the command line names no workload.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// Splits a kernel command line into parameters, honouring double quotes like the kernel:
/// a quote toggles quoting and is dropped.
pub fn params(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// Why a command line could not be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// `vgpu.run` named a relative program.
    #[error("vgpu.run must start with an absolute program path, got {0:?}")]
    RelativeProgram(String),
    /// `vgpu.env` without `NAME=`.
    #[error("vgpu.env wants NAME=VALUE, got {0:?}")]
    BadEnv(String),
    /// `vgpu.run` given twice.
    #[error("vgpu.run is given more than once")]
    TwoWorkloads,
}

/// Reads the workload from a command line.
pub fn parse(cmdline: &str) -> Result<Workload, CmdlineError> {
    let mut w = Workload::default();
    for p in params(cmdline) {
        if let Some(run) = p.strip_prefix("vgpu.run=") {
            if !w.argv.is_empty() {
                return Err(CmdlineError::TwoWorkloads);
            }
            w.argv = split_run(run)?;
        } else if let Some(env) = p.strip_prefix("vgpu.env=") {
            match env.split_once('=') {
                Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => w.env.push((k.into(), v.into())),
                _ => return Err(CmdlineError::BadEnv(env.into())),
            }
        }
    }
    Ok(w)
}

/// Splits a workload string (from the command line or xenstore) into argv.
pub fn split_run(run: &str) -> Result<Vec<String>, CmdlineError> {
    let argv: Vec<String> = run.split_whitespace().map(str::to_string).collect();
    match argv.first() {
        Some(p) if p.starts_with('/') => Ok(argv),
        Some(p) => Err(CmdlineError::RelativeProgram(p.clone())),
        None => Ok(argv),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_workload_and_env_are_read() {
        let w = parse("console=hvc0 quiet vgpu.run=\"/usr/bin/app --n 3\" vgpu.env=VGPU_LOG=debug vgpu.env=A=b=c\n")
            .unwrap();
        assert_eq!(w.argv, ["/usr/bin/app", "--n", "3"]);
        assert_eq!(w.env, [("VGPU_LOG".into(), "debug".into()), ("A".into(), "b=c".into())]);
    }

    #[test]
    fn quotes_may_cover_the_whole_parameter_like_the_kernel_allows() {
        assert_eq!(params("\"vgpu.run=/bin/x y\" z"), ["vgpu.run=/bin/x y", "z"]);
        assert_eq!(params("  a   b\t"), ["a", "b"]);
        assert_eq!(params("x=\"\""), ["x="]);
    }

    #[test]
    fn no_workload_is_not_an_error_and_bad_ones_are() {
        assert_eq!(parse("console=hvc0").unwrap(), Workload::default());
        assert_eq!(parse("vgpu.run=app").unwrap_err(), CmdlineError::RelativeProgram("app".into()));
        assert_eq!(parse("vgpu.env=novalue").unwrap_err(), CmdlineError::BadEnv("novalue".into()));
        assert_eq!(parse("vgpu.run=/a vgpu.run=/b").unwrap_err(), CmdlineError::TwoWorkloads);
    }
}
