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
