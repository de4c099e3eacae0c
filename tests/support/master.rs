//! `haproxy -W` (master-worker mode) started by a test, the way a service manager would: its own
//! process group, output to a log file beside the config, killed with its workers on drop.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ebb_agent::haproxy::admin::parse_pid;
use ebb_agent::haproxy::master::{parse_show_proc, ProcList};

use super::haproxy::{Haproxy, HaproxyConfig, READY_TIMEOUT};
use super::Signal;

/// How long one master CLI exchange may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `haproxy -W -db -f CFG -S SOCK`.
pub struct Master {
    haproxy: Haproxy,
    config: PathBuf,
    socket: PathBuf,
}

impl Master {
    /// Writes `cfg`, starts the master with its socket at `DIR/master.sock`, and waits until
    /// `show proc` lists a worker that answers `show info`.
    pub fn start(cfg: &HaproxyConfig) -> Result<Master> {
        let config = cfg.write()?;
        let socket = cfg.dir().join("master.sock");
        let mut master = Master {
            haproxy: spawn(&config, &socket, cfg.admin_socket().as_path())?,
            config,
            socket,
        };
        master.wait_ready(READY_TIMEOUT)?;
        Ok(master)
    }

    pub fn master_pid(&self) -> u32 {
        self.haproxy.pid()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    /// One blocking exchange on the master CLI: `line; quit`, the answer read to EOF.
    pub fn command(&self, line: &str) -> Result<String> {
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("connect to master CLI {}", self.socket.display()))?;
        stream.set_read_timeout(Some(CLI_TIMEOUT))?;
        stream.set_write_timeout(Some(CLI_TIMEOUT))?;
        stream
            .write_all(format!("{}; quit\n", line.trim_end()).as_bytes())
            .with_context(|| format!("send {line:?} to {}", self.socket.display()))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).with_context(|| {
            format!("read the answer to {line:?} from {}", self.socket.display())
        })?;
        Ok(answer)
    }

    pub fn show_proc(&self) -> Result<ProcList> {
        Ok(parse_show_proc(&self.command("show proc")?))
    }

    /// The current worker's pid, if `show proc` lists exactly one.
    pub fn worker_pid(&self) -> Result<u32> {
        let procs = self.show_proc()?;
        match procs.workers.as_slice() {
            [one] => Ok(one.pid),
            other => bail!("expected one current worker, show proc lists {other:?}"),
        }
    }

    /// SIGUSR2 to the master: a reload as `systemctl reload` does it.
    pub fn reload_by_signal(&self) -> Result<()> {
        self.haproxy.signal(Signal::USR2)
    }

    /// Kills the master and its workers, starts a new master on the same config and socket, and
    /// waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.haproxy.child().kill()?;
        let admin = self.haproxy.admin_socket().to_owned();
        self.haproxy = spawn(&self.config, &self.socket, &admin)?;
        self.wait_ready(READY_TIMEOUT)
    }

    /// haproxy's stdout and stderr so far (of the current master).
    pub fn log_text(&self) -> String {
        self.haproxy.log_text()
    }

    /// Waits until `show proc` lists a worker that answers `@!pid show info` with its pid; fails
    /// early if the master exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let mut exited = None;
        let ready = super::try_wait_for(timeout, || {
            if let Ok(Some(status)) = self.haproxy.child().try_wait() {
                exited = Some(status);
                return Some(false);
            }
            let worker = self.show_proc().ok()?.workers.first()?.pid;
            let info = self.command(&format!("@!{worker} show info")).ok()?;
            (parse_pid(&info) == Some(worker)).then_some(true)
        });
        match (ready, exited) {
            (Some(true), _) => Ok(()),
            (_, Some(status)) => bail!(
                "haproxy -W exited with {status} before it was ready; log:\n{}",
                self.log_text()
            ),
            _ => bail!(
                "haproxy -W (master pid {}) not ready within {timeout:?}; log:\n{}",
                self.master_pid(),
                self.log_text()
            ),
        }
    }
}

fn spawn(config: &Path, socket: &Path, admin: &Path) -> Result<Haproxy> {
    let socket = socket
        .to_str()
        .context("the master socket path is not UTF-8")?;
    Haproxy::spawn(config, admin, &["-W", "-S", socket])
}
