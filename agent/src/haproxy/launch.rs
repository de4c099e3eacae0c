//! Starting a worker: spawn `haproxy -db -f CFG [-x ADMIN_SOCK]` (never `-sf`) and wait until the
//! admin socket answers with the new worker's own pid.
//!
//! Nothing here signals the running worker. A bad config or a taken port makes the new process exit
//! on its own before it is ready, so a failed launch leaves the running worker exactly as it was.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tokio::process::{Child, Command};

use super::admin::AdminSocket;
use super::worker::{self, Exit, Worker};
use crate::digest::sha256_hex;

/// Everything needed to start a worker.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub admin_socket: PathBuf,
    /// Where each worker's stdout and stderr go: files never block HAProxy, and they outlive the
    /// agent, so an adopted old worker's `hard-stopped` line can still be read.
    pub log_dir: PathBuf,
    pub startup_timeout: Duration,
    /// `haproxy.env`: the agent's variables HAProxy gets besides `PATH` and `EBB_DRAINING`.
    pub env: Vec<String>,
    /// `push.check_timeout`: the longest `haproxy -c` of a pushed config may run.
    pub check_timeout: Duration,
}

#[derive(Debug)]
pub struct Launched {
    pub worker: Worker,
    pub child: Child,
    /// From spawn to the admin socket answering with the new pid.
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot read haproxy config {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("haproxy exited during startup ({exit}): {stderr}")]
    Exited { exit: Exit, stderr: String },
    #[error(
        "haproxy did not answer on its admin socket within {after:?}, so it was killed: {stderr}"
    )]
    Timeout { after: Duration, stderr: String },
}

/// How often readiness is polled. While nothing answers, fast at first and doubling to a few ms.
/// While the displaced worker answers, at once again: both workers accept on the shared admin
/// socket, and the kernel may hand poll after poll to the old one, so each answer from it must
/// cost little time.
const FIRST_POLL: Duration = Duration::from_micros(500);
const MAX_POLL: Duration = Duration::from_millis(4);
/// A start that takes longer than this is slow (typically a host busy starting many workers, such
/// as a fleet reloading at once on few cores): from then on, poll at most every `SLOW_POLL`, so
/// the polls (each a `show info`) do not take the CPU that the starts need.
const SLOW_START: Duration = Duration::from_millis(150);
const SLOW_POLL: Duration = Duration::from_millis(20);

/// Starts a worker. With `takeover`, it takes the listening sockets from the running worker via
/// `-x`. `draining` is exported as `EBB_DRAINING` so the config can answer 503 from the first
/// request.
pub async fn launch(
    spec: &LaunchSpec,
    takeover: bool,
    draining: bool,
) -> Result<Launched, LaunchError> {
    let started = Instant::now();
    let config_bytes =
        tokio::fs::read(&spec.config)
            .await
            .map_err(|source| LaunchError::Config {
                path: spec.config.clone(),
                source,
            })?;
    let config_sha256 = sha256_hex(&config_bytes);

    let spawn_err = |source| LaunchError::Spawn {
        binary: spec.binary.clone(),
        source,
    };
    std::fs::create_dir_all(&spec.log_dir).map_err(spawn_err)?;
    let staging = spec.log_dir.join(format!(
        "starting-{}-{}.log",
        std::process::id(),
        started.elapsed().as_nanos() ^ u128::from(rand_u64())
    ));
    // O_APPEND: every write of HAProxy lands at the end of the file as it is now, so capping the
    // log (worker::cap_log truncates it) never leaves a hole of zeros before the next line.
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&staging)
        .map_err(spawn_err)?;
    let log_err = match log.try_clone() {
        Ok(f) => f,
        Err(e) => {
            worker::remove_own_log(&staging, &spec.log_dir);
            return Err(spawn_err(e));
        }
    };

    let mut cmd = Command::new(&spec.binary);
    cmd.arg("-db").arg("-f").arg(&spec.config);
    if takeover && spec.admin_socket.exists() {
        cmd.arg("-x").arg(&spec.admin_socket);
    }
    cmd.env_clear()
        .envs(child_env(std::env::vars_os(), &spec.env))
        .env("EBB_DRAINING", if draining { "1" } else { "0" })
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C or a `systemctl kill` aimed at the agent must not reach
        // HAProxy, which the agent stops gracefully or leaves running for the next agent.
        .process_group(0)
        .kill_on_drop(false);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            worker::remove_own_log(&staging, &spec.log_dir);
            return Err(spawn_err(e));
        }
    };

    let worker = match Worker::from_child(&child, staging.clone(), config_sha256) {
        Ok(w) => w,
        Err(_) => {
            let exit = child
                .wait()
                .await
                .map(Exit::from_status)
                .unwrap_or(Exit::Unknown);
            let stderr = worker::startup_error(&worker::log_tail(&staging, 8192));
            worker::remove_own_log(&staging, &spec.log_dir);
            return Err(LaunchError::Exited { exit, stderr });
        }
    };
    let mut worker = worker;
    let named = spec.log_dir.join(format!(
        "worker-{}-{}.log",
        worker.id.pid, worker.id.start_time
    ));
    if std::fs::rename(&staging, &named).is_ok() {
        worker.log = named;
    }

    match wait_ready(spec, &worker, &mut child).await {
        Ok(()) => Ok(Launched {
            worker,
            child,
            duration: started.elapsed(),
        }),
        Err(ReadyError::Exited(exit)) => {
            let stderr = worker::startup_error(&worker::log_tail(&worker.log, 8192));
            worker::remove_own_log(&worker.log, &spec.log_dir);
            Err(LaunchError::Exited { exit, stderr })
        }
        Err(ReadyError::Timeout) => {
            let _ = worker.signal(Signal::KILL);
            let _ = child.wait().await;
            let stderr = worker::startup_error(&worker::log_tail(&worker.log, 8192));
            worker::remove_own_log(&worker.log, &spec.log_dir);
            Err(LaunchError::Timeout {
                after: spec.startup_timeout,
                stderr,
            })
        }
    }
}

enum ReadyError {
    Exited(Exit),
    Timeout,
}

/// Ready means: the admin socket answers `show info` with the NEW pid. Until the displaced worker
/// is told to stop, both share the listening admin socket, so an answer from the old pid proves
/// nothing and polling goes on.
async fn wait_ready(
    spec: &LaunchSpec,
    worker: &Worker,
    child: &mut Child,
) -> Result<(), ReadyError> {
    let start = Instant::now();
    let deadline = start + spec.startup_timeout;
    let admin = AdminSocket::new(&spec.admin_socket, Duration::from_secs(1));
    let mut wait = FIRST_POLL;
    loop {
        // An answer from another pid (the displaced worker, which shares the listening admin
        // socket until it is told to stop) proves nothing: poll on.
        let this = match admin.pid().await {
            Ok(pid) if pid == worker.pid() => return Ok(()),
            _ if start.elapsed() >= SLOW_START => SLOW_POLL,
            Ok(_) => FIRST_POLL,
            Err(_) => {
                let this = wait;
                wait = (wait * 2).min(MAX_POLL);
                this
            }
        };
        if Instant::now() >= deadline {
            return Err(ReadyError::Timeout);
        }
        tokio::select! {
            status = child.wait() => {
                return Err(ReadyError::Exited(status.map(Exit::from_status).unwrap_or(Exit::Unknown)));
            }
            _ = tokio::time::sleep(this) => {}
        }
    }
}

/// Starts a master that ebb owns (master-worker mode, `manage_master = true`):
/// `haproxy -W -db -f CFG -S SOCK,mode,600,level,admin`, in its own process group, its output
/// (and its workers') appended to `log`. It gets no `EBB_DRAINING`: every worker it ever forks
/// would inherit the value of this moment, so drains reach its workers as admin commands only.
pub fn spawn_master(
    spec: &LaunchSpec,
    master_socket: &Path,
    log: &Path,
) -> Result<Child, LaunchError> {
    let spawn_err = |source| LaunchError::Spawn {
        binary: spec.binary.clone(),
        source,
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(spawn_err)?;
    }
    let out = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .map_err(spawn_err)?;
    let err = out.try_clone().map_err(spawn_err)?;
    let mut socket = master_socket.as_os_str().to_owned();
    socket.push(",mode,600,level,admin");
    Command::new(&spec.binary)
        .arg("-W")
        .arg("-db")
        .arg("-f")
        .arg(&spec.config)
        .arg("-S")
        .arg(socket)
        .env_clear()
        .envs(child_env(std::env::vars_os(), &spec.env))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(spawn_err)
}

/// HAProxy's environment, from the agent's: `PATH` and the variables `allow` names, nothing else.
/// The agent's own environment carries its secrets (`EBB_NATS__TOKEN`, credentials paths, cloud
/// keys for plugins), which HAProxy, its configs and its Lua scripts have no business seeing.
pub fn child_env(
    agent: impl IntoIterator<Item = (OsString, OsString)>,
    allow: &[String],
) -> Vec<(OsString, OsString)> {
    agent
        .into_iter()
        .filter(|(name, _)| {
            name == "PATH" || allow.iter().any(|a| name.to_str() == Some(a.as_str()))
        })
        // ebb sets it for each worker: an inherited one would say nothing true.
        .filter(|(name, _)| name != "EBB_DRAINING")
        .collect()
}

fn rand_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// Checks a config with `haproxy -c`, for pushed configs that are not on disk yet. It runs in the
/// environment a worker gets (`env` is `haproxy.env`), so `"${VAR}"` in the config means the same.
///
/// A check that outlives `timeout` is killed and counts as a refusal: a config can make the check
/// itself run forever (Lua at load time), and every later reload and `stop` waits behind it.
pub async fn check_config(
    binary: &Path,
    config: &Path,
    env: &[String],
    timeout: Duration,
) -> Result<(), String> {
    let output = Command::new(binary)
        .arg("-c")
        .arg("-f")
        .arg(config)
        .env_clear()
        .envs(child_env(std::env::vars_os(), env))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, output)
        .await
        .map_err(|_| {
            format!(
                "check timed out after {} (haproxy -c was killed); a config must load quickly, \
                 or raise push.check_timeout",
                humantime::format_duration(timeout)
            )
        })?
        .map_err(|e| format!("cannot run {} -c: {e}", binary.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        Err(worker::startup_error(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_gets_path_and_the_allowlist_never_the_agents_secrets() {
        let agent = [
            ("PATH", "/usr/sbin:/usr/bin"),
            ("TZ", "UTC"),
            ("EBB_NATS__TOKEN", "s3cret"),
            ("NATS_CREDS", "/etc/ebb/nats.creds"),
            ("AWS_SECRET_ACCESS_KEY", "k"),
            ("EBB_DRAINING", "1"),
            ("LANG", "C.UTF-8"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_env(agent, &["TZ".into(), "EBB_DRAINING".into(), "HOME".into()]);
        let names: Vec<_> = env
            .iter()
            .map(|(k, _)| k.to_str().expect("utf-8"))
            .collect();
        assert_eq!(names, vec!["PATH", "TZ"]);
    }
}
