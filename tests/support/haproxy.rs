//! haproxy.cfg for tests, `haproxy -c`, and plain haproxy processes started by a test.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::process::ChildGuard;
use super::{free_port, show_info_pid, tail, Signal};

/// How long a test haproxy may take to answer `show info` with its own pid.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The haproxy binary: `$EBB_TEST_HAPROXY`, else `/usr/sbin/haproxy` if present, else `haproxy`.
pub fn haproxy_bin() -> String {
    if let Ok(bin) = std::env::var("EBB_TEST_HAPROXY") {
        return bin;
    }
    if Path::new("/usr/sbin/haproxy").exists() {
        "/usr/sbin/haproxy".to_owned()
    } else {
        "haproxy".to_owned()
    }
}

/// Runs `haproxy -c -f PATH`. The error carries haproxy's output.
pub fn check_config(path: &Path) -> Result<()> {
    let output = Command::new(haproxy_bin())
        .arg("-c")
        .arg("-f")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("run haproxy -c")?;
    if output.status.success() {
        return Ok(());
    }
    bail!(
        "haproxy -c -f {} failed ({}):\n{}{}",
        path.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Builds the test haproxy.cfg, modelled on the quickstart's:
///
/// - `global`: `stats socket DIR/admin.sock mode 600 level admin expose-fd listeners`,
///   `set-var proc.ebb_draining env(EBB_DRAINING),add(0)` (so a worker started during a drain
///   answers 503 from its first request), optional `hard-stop-after`;
/// - `defaults`: `mode http`, connect 5 s, client/server 30 s;
/// - frontend `fe` on a free port: `/healthz` answers 503 while `proc.ebb_draining` is 1, else 200;
///   `Connection: close` on every response while draining; everything else goes to backend `be`,
///   which is the given backend address;
/// - frontend `stats` on another free port (`stats enable`, `stats uri /stats`).
///
/// Ports are chosen when the builder is made and stay fixed, so re-rendered variants (for reloads)
/// keep listening where the first one did.
#[derive(Clone, Debug)]
pub struct HaproxyConfig {
    dir: PathBuf,
    backend: SocketAddr,
    frontend_port: u16,
    stats_port: u16,
    hard_stop_after: Option<String>,
    tag: Option<String>,
    global_lines: Vec<String>,
    frontend_lines: Vec<String>,
    sections: Vec<String>,
}

impl HaproxyConfig {
    pub fn new(dir: &Path, backend: SocketAddr) -> HaproxyConfig {
        HaproxyConfig {
            dir: dir.to_owned(),
            backend,
            frontend_port: free_port(),
            stats_port: free_port(),
            hard_stop_after: None,
            tag: None,
            global_lines: Vec::new(),
            frontend_lines: Vec::new(),
            sections: Vec::new(),
        }
    }

    /// Adds `hard-stop-after DURATION` (HAProxy syntax, such as `"2s"`) to `global`.
    pub fn hard_stop_after(mut self, duration: &str) -> Self {
        self.hard_stop_after = Some(duration.to_owned());
        self
    }

    /// Marks every response with `X-Ebb-Config: TAG`, to tell which config served a request.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = Some(tag.to_owned());
        self
    }

    /// Adds a raw line to `global`.
    pub fn global_line(mut self, line: &str) -> Self {
        self.global_lines.push(line.to_owned());
        self
    }

    /// Adds a raw line to frontend `fe` (before its `default_backend`).
    pub fn frontend_line(mut self, line: &str) -> Self {
        self.frontend_lines.push(line.to_owned());
        self
    }

    /// Appends a raw section (such as another frontend) to the config.
    pub fn section(mut self, text: &str) -> Self {
        self.sections.push(text.to_owned());
        self
    }

    /// Uses `port` for frontend `fe` instead of the free port picked at creation.
    pub fn with_frontend_port(mut self, port: u16) -> Self {
        self.frontend_port = port;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where [`HaproxyConfig::write`] puts the config: `DIR/haproxy.cfg`.
    pub fn path(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    pub fn frontend_port(&self) -> u16 {
        self.frontend_port
    }

    pub fn stats_port(&self) -> u16 {
        self.stats_port
    }

    pub fn backend_addr(&self) -> SocketAddr {
        self.backend
    }

    /// The config text.
    pub fn render(&self) -> String {
        let mut cfg = String::new();
        let _ = writeln!(cfg, "global");
        let _ = writeln!(
            cfg,
            "    stats socket {} mode 600 level admin expose-fd listeners",
            self.admin_socket().display()
        );
        // Unset EBB_DRAINING yields no sample, which leaves the variable unset: not draining.
        let _ = writeln!(
            cfg,
            "    set-var proc.ebb_draining env(EBB_DRAINING),add(0)"
        );
        if let Some(duration) = &self.hard_stop_after {
            let _ = writeln!(cfg, "    hard-stop-after {duration}");
        }
        for line in &self.global_lines {
            let _ = writeln!(cfg, "    {line}");
        }
        let _ = write!(
            cfg,
            "
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend fe
    bind 127.0.0.1:{fe}
    http-request return status 503 content-type text/plain string \"draining\\n\" if {{ path /healthz }} {{ var(proc.ebb_draining) -m int 1 }}
    http-request return status 200 content-type text/plain string \"ok\\n\" if {{ path /healthz }}
    http-after-response set-header Connection close if {{ var(proc.ebb_draining) -m int 1 }}
",
            fe = self.frontend_port
        );
        if let Some(tag) = &self.tag {
            let _ = writeln!(cfg, "    http-after-response set-header X-Ebb-Config {tag}");
        }
        for line in &self.frontend_lines {
            let _ = writeln!(cfg, "    {line}");
        }
        let _ = write!(
            cfg,
            "    default_backend be

backend be
    server app {backend}

frontend stats
    bind 127.0.0.1:{stats}
    stats enable
    stats uri /stats
",
            backend = self.backend,
            stats = self.stats_port
        );
        for section in &self.sections {
            let _ = write!(cfg, "\n{}\n", section.trim_end());
        }
        cfg
    }

    /// A config that `haproxy -c` refuses (an unknown keyword in frontend `fe`).
    pub fn render_broken(&self) -> String {
        self.clone()
            .frontend_line("this-is-not-a-keyword at all")
            .render()
    }

    /// A config that passes `haproxy -c` but cannot start: an extra frontend binds a port that the
    /// returned listener holds. Keep the listener alive for as long as the port must stay taken.
    ///
    /// HAProxy binds with SO_REUSEPORT; the std listener does not, so the kernel refuses the bind.
    pub fn render_with_taken_port(&self) -> Result<(String, TcpListener)> {
        let holder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind a port to hold")?;
        let port = holder.local_addr()?.port();
        let text = self
            .clone()
            .section(&format!(
                "frontend taken\n    bind 127.0.0.1:{port}\n    default_backend be"
            ))
            .render();
        Ok((text, holder))
    }

    /// Writes [`HaproxyConfig::render`] to [`HaproxyConfig::path`] and returns the path.
    pub fn write(&self) -> Result<PathBuf> {
        self.write_text(&self.render())
    }

    /// Writes `text` to [`HaproxyConfig::path`] (atomically, so a running reader never sees half).
    pub fn write_text(&self, text: &str) -> Result<PathBuf> {
        let path = self.path();
        write_atomically(&path, text)?;
        Ok(path)
    }

    /// Writes `text` to `DIR/NAME` and returns the path.
    pub fn write_as(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        write_atomically(&path, text)?;
        Ok(path)
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// Numbers the log files of haproxy processes started by tests.
static LOG_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A plain `haproxy -db -f CFG` started by the test (no agent), killed on drop.
pub struct Haproxy {
    child: ChildGuard,
    admin_socket: PathBuf,
    log: PathBuf,
}

impl Haproxy {
    /// Writes `cfg`, starts haproxy on it and waits until `show info` answers with its pid.
    pub fn start(cfg: &HaproxyConfig) -> Result<Haproxy> {
        let path = cfg.write()?;
        let mut haproxy = Haproxy::spawn(&path, &cfg.admin_socket(), &[])?;
        haproxy.wait_ready(READY_TIMEOUT)?;
        Ok(haproxy)
    }

    /// Starts `haproxy -db -f CONFIG EXTRA_ARGS…` without waiting. Its output goes to
    /// `haproxy-N.log` beside the config.
    pub fn spawn(config: &Path, admin_socket: &Path, extra_args: &[&str]) -> Result<Haproxy> {
        let dir = config.parent().unwrap_or(Path::new("."));
        let log = dir.join(format!(
            "haproxy-{}.log",
            LOG_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(haproxy_bin());
        cmd.arg("-db")
            .arg("-f")
            .arg(config)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = ChildGuard::spawn("haproxy", &mut cmd)?;
        Ok(Haproxy {
            child,
            admin_socket: admin_socket.to_owned(),
            log,
        })
    }

    /// Waits until the admin socket answers with this process's pid; fails early if it exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let pid = self.pid();
        let mut exited = None;
        let ready = super::try_wait_for(timeout, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                exited = Some(status);
                return Some(false);
            }
            (show_info_pid(&self.admin_socket) == Some(pid)).then_some(true)
        });
        match (ready, exited) {
            (Some(true), _) => Ok(()),
            (_, Some(status)) => bail!(
                "haproxy exited with {status} before it was ready; log:\n{}",
                self.log_text()
            ),
            _ => bail!(
                "haproxy (pid {pid}) not ready within {timeout:?}; log:\n{}",
                self.log_text()
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// haproxy's stdout and stderr so far.
    pub fn log_text(&self) -> String {
        tail(&self.log, 200)
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.child.signal(signal)
    }

    /// The guard, for waiting on or killing the process.
    pub fn child(&mut self) -> &mut ChildGuard {
        &mut self.child
    }
}
