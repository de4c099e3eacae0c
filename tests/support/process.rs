//! Process guards: nothing a test starts may outlive it.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result};
use rustix::process::{kill_process, kill_process_group, Pid, Signal};

/// A child process in a process group of its own. On drop, SIGKILLs the whole group and reaps the
/// child, so helpers it forked die with it (unless they moved to a group of their own: see
/// [`HaproxyReaper`]).
pub struct ChildGuard {
    child: Child,
    name: String,
    reaped: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` with `process_group(0)`. `name` is used in messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<ChildGuard> {
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(ChildGuard {
            child,
            name: name.to_owned(),
            reaped: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `signal` to the child only (not to its group).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.reaped.is_some() {
            anyhow::bail!("{} (pid {}) already exited", self.name, self.pid());
        }
        kill_process(pid(self.pid()), signal)
            .with_context(|| format!("send {signal:?} to {} (pid {})", self.name, self.pid()))
    }

    /// SIGKILLs the whole process group, then reaps the child.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        // ESRCH: the group is already gone, which is what we want.
        let _ = kill_process_group(pid(self.pid()), Signal::KILL);
        self.wait()
    }

    /// Blocks until the child exits.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.reaped {
            return Ok(status);
        }
        let status = self
            .child
            .wait()
            .with_context(|| format!("wait for {}", self.name))?;
        self.reaped = Some(status);
        Ok(status)
    }

    /// The exit status if the child has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.reaped {
            return Ok(Some(status));
        }
        let status = self
            .child
            .try_wait()
            .with_context(|| format!("wait for {}", self.name))?;
        self.reaped = status;
        Ok(status)
    }

    /// Waits up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let mut error = None;
        let status = super::try_wait_for(timeout, || match self.try_wait() {
            Ok(status) => status,
            Err(e) => {
                error = Some(e);
                // Stop polling: the error is reported below.
                Some(ExitStatus::default())
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(status),
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = kill_process_group(pid(self.pid()), Signal::KILL);
        let _ = self.wait();
    }
}

pub(crate) fn pid(raw: u32) -> Pid {
    i32::try_from(raw)
        .ok()
        .and_then(Pid::from_raw)
        .expect("a valid pid")
}

/// Whether a command line (NUL-separated arguments) mentions `dir` itself or a path inside it.
///
/// Matching `dir/` rather than a bare prefix keeps `/tmp/ebb-test-abc` from matching
/// `/tmp/ebb-test-abcd`.
pub fn cmdline_mentions(cmdline: &[u8], dir: &Path) -> bool {
    let dir = dir.as_os_str().as_encoded_bytes();
    let inside: Vec<u8> = [dir, b"/"].concat();
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == dir || arg.windows(inside.len()).any(|w| w == inside.as_slice()))
}

/// Every live process (other than this one) whose command line mentions `dir` or a path in it.
pub fn pids_mentioning(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != me)
        .filter(|&p| {
            fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| cmdline_mentions(&c, dir))
        })
        .collect()
}

/// SIGKILLs every process whose command line mentions `dir`; returns the pids signalled.
pub fn kill_processes_mentioning(dir: &Path) -> Vec<u32> {
    let pids = pids_mentioning(dir);
    for &p in &pids {
        // It may have exited since the scan; nothing else to do then.
        let _ = kill_process(pid(p), Signal::KILL);
    }
    pids
}

/// Kills, on drop, every process whose command line mentions the test's temp dir.
///
/// The agent starts haproxy in process groups of its own, so killing the agent's group does not
/// reach them, and an agent killed with SIGKILL cannot clean up. Every haproxy of a test names
/// its config inside the test's dir, which is what this matches. [`super::TestDir`] holds one.
pub struct HaproxyReaper {
    dir: PathBuf,
}

impl HaproxyReaper {
    pub fn new(dir: &Path) -> HaproxyReaper {
        HaproxyReaper {
            dir: dir.to_owned(),
        }
    }

    /// Kills now (repeatedly, briefly, in case something was forking meanwhile).
    pub fn reap(&self) {
        let _ = super::try_wait_for(Duration::from_secs(5), || {
            kill_processes_mentioning(&self.dir)
                .is_empty()
                .then_some(())
        });
        // Processes killed above are reaped by their parents; a zombie's cmdline is empty, so the
        // loop above ends once they all died.
    }
}

impl Drop for HaproxyReaper {
    fn drop(&mut self) {
        self.reap();
    }
}

/// Whether the process `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// The resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`), or `None` when
/// the process is gone or the line is missing (a kernel thread has none).
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// A `kB` line of `/proc/PID/status` (`VmRSS`, `RssAnon`, `RssFile`, `VmHWM`, …) in KiB, or `None`
/// when the process is gone or has no such line. `RssAnon` is the heap and stacks; `RssFile`
/// counts the pages of the binary and libraries that were touched, which grows as more code runs.
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
