//! Running the real `ebb ctl` (or another `ebb` subcommand) as a script would: stdin never a terminal, none of the caller's
//! `EBB_*` or `NATS_*` variables (so only what a test passes reaches it), killed if it hangs.

use std::process::Stdio;
use std::time::Duration;

/// What an `ebb ctl` run left behind.
#[derive(Debug)]
pub struct CtlRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ebb ctl ARGS…` with `env` as its only `EBB_*`/`NATS_*` variables; the test fails if the
/// run outlives `limit`.
pub async fn run_ctl(args: &[&str], env: &[(&str, &str)], limit: Duration) -> CtlRun {
    let mut all = vec!["ctl"];
    all.extend_from_slice(args);
    run_ebb(&all, env, limit).await
}

/// Runs `ebb ARGS…` (any subcommand) the same way as [`run_ctl`].
pub async fn run_ebb(args: &[&str], env: &[(&str, &str)], limit: Duration) -> CtlRun {
    let mut cmd = tokio::process::Command::new(super::ebb_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("EBB_") || name.starts_with("NATS_") {
            cmd.env_remove(&key);
        }
    }
    cmd.envs(env.iter().copied());
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("ebb {args:?} still running after {limit:?}"))
        .expect("run ebb");
    CtlRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A raw connection to an agent's control socket: one JSON request per line, one reply line each.
pub struct ControlClient {
    lines: tokio::io::BufReader<tokio::net::UnixStream>,
}

impl ControlClient {
    pub async fn connect(path: &std::path::Path) -> ControlClient {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .unwrap_or_else(|e| panic!("connect to the control socket {}: {e}", path.display()));
        ControlClient {
            lines: tokio::io::BufReader::new(stream),
        }
    }

    /// Sends `line` (a newline is added) and returns the reply line, parsed.
    pub async fn send_line(&mut self, line: &str) -> serde_json::Value {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        self.lines
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the control socket");
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(30), self.lines.read_line(&mut reply))
            .await
            .unwrap_or_else(|_| panic!("no reply to {line:?} within 30 s"))
            .expect("read from the control socket");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
    }

    /// Sends `request` (a JSON object with `verb`).
    pub async fn send(&mut self, request: serde_json::Value) -> serde_json::Value {
        self.send_line(&request.to_string()).await
    }
}
