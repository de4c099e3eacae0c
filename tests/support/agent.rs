//! The `ebb agent` under test: its config file and its process.
//!
//! The binary path comes from the test file (`env!("CARGO_BIN_EXE_ebb")` exists only in the
//! agent's integration tests), so every starter takes it as a parameter.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::haproxy::{haproxy_bin, HaproxyConfig};
use super::process::ChildGuard;
use super::{tail, try_wait_for, Signal};

/// Builds agent.toml (every key is in README.md, "Configuration") in the test dir. Values are kept
/// as raw TOML, so anything the agent accepts can be set with [`AgentConfig::set`];
/// [`AgentConfig::raw`] appends whole tables (`[[plugins]]`).
///
/// Defaults, chosen for tests: node id `node-1`, prefix `ebb`, haproxy from [`haproxy_bin`] on the
/// given [`HaproxyConfig`] and its admin socket, `state_dir = DIR/state`, startup and stop
/// timeouts `10s`, `min_period = "0s"`, `poll_interval = "10ms"`, `ignore_frontends = ["stats"]`,
/// JSON logs at level `info`, `metrics.listen` on a free port of 127.0.0.1.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    dir: PathBuf,
    /// Sections in insertion order, each with its keys in insertion order, values as raw TOML.
    sections: Vec<(String, Vec<(String, String)>)>,
    raw: Vec<String>,
}

impl AgentConfig {
    pub fn new(dir: &Path, nats_url: &str, haproxy: &HaproxyConfig) -> AgentConfig {
        let mut cfg = AgentConfig {
            dir: dir.to_owned(),
            sections: Vec::new(),
            raw: Vec::new(),
        };
        let state_dir = dir.join("state");
        cfg.set_str("node", "id", "node-1")
            .set_str("nats", "url", nats_url)
            .set_str("nats", "prefix", "ebb")
            .set_str("haproxy", "binary", &haproxy_bin())
            .set_path("haproxy", "config", &haproxy.path())
            .set_path("haproxy", "admin_socket", &haproxy.admin_socket())
            .set_path("haproxy", "state_dir", &state_dir)
            .set_str("haproxy", "startup_timeout", "10s")
            .set_str("haproxy", "stop_timeout", "10s")
            .set_str("drain", "min_period", "0s")
            .set_str("drain", "poll_interval", "10ms")
            .set("drain", "ignore_frontends", r#"["stats"]"#)
            .set_str("log", "format", "json")
            .set_str("log", "level", "info")
            .set_path("control", "socket", &dir.join("ctl.sock"))
            // Its own port: the default one would collide between tests running in parallel.
            .set_str(
                "metrics",
                "listen",
                &format!("127.0.0.1:{}", super::free_port()),
            );
        cfg
    }

    /// The agent's control socket (`control.socket`).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    /// The port of `metrics.listen`, when it is set to an address with one.
    pub fn metrics_port(&self) -> Option<u16> {
        let listen: String = serde_json::from_str(self.get("metrics", "listen")?).ok()?;
        listen.rsplit_once(':')?.1.parse().ok()
    }

    /// Sets `[section] key = VALUE` where `value` is raw TOML (`"30s"` with quotes, `true`, `[…]`).
    pub fn set(&mut self, section: &str, key: &str, value: &str) -> &mut Self {
        let index = match self.sections.iter().position(|(name, _)| name == section) {
            Some(index) => index,
            None => {
                self.sections.push((section.to_owned(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let keys = &mut self.sections[index].1;
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_owned(),
            None => keys.push((key.to_owned(), value.to_owned())),
        }
        self
    }

    /// Sets a string value, quoted for TOML.
    pub fn set_str(&mut self, section: &str, key: &str, value: &str) -> &mut Self {
        self.set(section, key, &toml_string(value))
    }

    /// Sets a path value, quoted for TOML.
    pub fn set_path(&mut self, section: &str, key: &str, value: &Path) -> &mut Self {
        self.set_str(section, key, &value.to_string_lossy())
    }

    /// Removes `[section] key`, so the agent's default applies.
    pub fn unset(&mut self, section: &str, key: &str) -> &mut Self {
        if let Some((_, keys)) = self.sections.iter_mut().find(|(name, _)| name == section) {
            keys.retain(|(k, _)| k != key);
        }
        self
    }

    pub fn node_id(&mut self, id: &str) -> &mut Self {
        self.set_str("node", "id", id)
    }

    pub fn groups(&mut self, groups: &[&str]) -> &mut Self {
        let list: Vec<String> = groups.iter().map(toml_string).collect();
        self.set("node", "groups", &format!("[{}]", list.join(", ")))
    }

    pub fn min_period(&mut self, duration: &str) -> &mut Self {
        self.set_str("drain", "min_period", duration)
    }

    pub fn log_level(&mut self, level: &str) -> &mut Self {
        self.set_str("log", "level", level)
    }

    /// Appends raw TOML after the sections, such as a `[[plugins]]` table.
    pub fn raw(&mut self, toml: &str) -> &mut Self {
        self.raw.push(toml.to_owned());
        self
    }

    /// The raw TOML value of `[section] key`, if set.
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.sections
            .iter()
            .find(|(name, _)| name == section)?
            .1
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Where [`AgentConfig::write`] puts the file: `DIR/agent.toml`.
    pub fn path(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (section, keys) in &self.sections {
            let _ = writeln!(out, "[{section}]");
            for (key, value) in keys {
                let _ = writeln!(out, "{key} = {value}");
            }
            out.push('\n');
        }
        for raw in &self.raw {
            let _ = writeln!(out, "{}\n", raw.trim_end());
        }
        out
    }

    pub fn write(&self) -> Result<PathBuf> {
        let path = self.path();
        fs::write(&path, self.render()).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }
}

/// A TOML basic string. JSON's escaping is valid TOML for everything serde_json emits.
pub fn toml_string(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).expect("a string serializes")
}

/// The message of a tracing JSON log line (`fields.message`, or a top-level `message`/`msg`).
pub fn log_message(line: &Value) -> Option<&str> {
    line.pointer("/fields/message")
        .or_else(|| line.get("message"))
        .or_else(|| line.get("msg"))
        .and_then(Value::as_str)
}

/// Numbers agent log files, so a restarted agent in the same dir gets a fresh log.
static LOG_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A running `ebb agent --config PATH`, in a process group of its own, with stdout and stderr in
/// `agent-N.log` beside the config. Killed (with its group) on drop; the haproxy it started are in
/// groups of their own, which [`super::TestDir`] reaps.
pub struct Agent {
    child: ChildGuard,
    log: PathBuf,
}

impl Agent {
    /// Starts `BIN agent --config CONFIG` in a clean environment (no inherited `EBB_*` variables
    /// other than `EBB_TEST_*`, no `RUST_LOG`).
    pub fn start(bin: impl AsRef<Path>, config: &Path) -> Result<Agent> {
        Self::start_with_env(bin, config, &[])
    }

    /// Like [`Agent::start`], with extra environment variables (such as `EBB_NATS__URL`).
    pub fn start_with_env(
        bin: impl AsRef<Path>,
        config: &Path,
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        let bin = bin.as_ref();
        let dir = config.parent().unwrap_or(Path::new("."));
        let log = dir.join(format!(
            "agent-{}.log",
            LOG_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.arg("agent")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if (name.starts_with("EBB_") && !name.starts_with("EBB_TEST_")) || name == "RUST_LOG" {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(env.iter().copied());
        let child = ChildGuard::spawn("ebb agent", &mut cmd)?;
        Ok(Agent { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the agent wrote so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON lines of the log so far (other lines, such as a panic message, are skipped: see
    /// [`Agent::log_text`]).
    pub fn log_lines(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The first JSON log line that satisfies `pred`, if any yet.
    pub fn find_log(&self, mut pred: impl FnMut(&Value) -> bool) -> Option<Value> {
        self.log_lines().into_iter().find(|line| pred(line))
    }

    /// Waits for a JSON log line that satisfies `pred` and returns it; panics with the log's tail
    /// (and the exit status, if the agent died) on timeout.
    pub fn wait_for_log(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        if let Some(line) = try_wait_for(timeout, || self.find_log(&mut pred)) {
            return line;
        }
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited with {status}"),
            _ => "still running".to_owned(),
        };
        panic!(
            "no matching agent log line within {timeout:?} (agent {status}); log tail:\n{}",
            tail(&self.log, 40)
        )
    }

    /// Sends `signal` (HUP, TERM, INT, USR2, …) to the agent process only.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.child.signal(signal)
    }

    /// SIGKILLs the agent process only (a crash: the haproxy it started keep running), and reaps it.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.child.signal(Signal::KILL)?;
        self.child.wait()
    }

    /// Waits for the agent to exit; panics with the log tail if it does not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.try_wait_exit(timeout) {
            Ok(Some(status)) => status,
            Ok(None) => panic!(
                "agent still running after {timeout:?}; log tail:\n{}",
                tail(&self.log, 40)
            ),
            Err(e) => panic!("waiting for the agent: {e:#}"),
        }
    }

    /// The exit status once the agent exited within `timeout`, or `None`.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.child.wait_timeout(timeout)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A failing test's most useful clue is what the agent said.
        if std::thread::panicking() {
            eprintln!(
                "--- agent log {} (tail) ---\n{}\n--- end of agent log ---",
                self.log.display(),
                tail(&self.log, 60)
            );
        }
    }
}
