//! One HAProxy worker process: its identity, a pidfd to signal it safely, its log file, and the
//! task that reports its exit the moment it happens.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use tokio::io::unix::AsyncFd;
use tokio::process::Child;

use super::procfs::{self, Mismatch, ProcessId};

/// How a worker ended, as far as ebb can know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exit code, or 128 + signal number for a death by signal.
    Code(i32),
    /// The process was adopted from an earlier agent: only its parent could read the status.
    Unknown,
}

impl Exit {
    pub fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Code(128 + sig),
            (None, None) => Exit::Unknown,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) if *c > 128 => write!(f, "killed by signal {}", c - 128),
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Unknown => f.write_str("unknown status (adopted process)"),
        }
    }
}

pub use crate::record::WorkerRecord;

#[derive(Debug)]
pub struct Worker {
    pub id: ProcessId,
    pub started_at: SystemTime,
    pub log: PathBuf,
    pub config_sha256: String,
    pidfd: Arc<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("cannot open a pidfd for process {pid}: {source}")]
    Pidfd {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
}

impl Worker {
    /// Takes hold of a process first, then checks that it is the recorded one: a pidfd opened before
    /// the check can only ever signal the process that passed it, never a later user of the pid.
    pub fn adopt(record: &WorkerRecord) -> Result<Worker, AdoptError> {
        let pid = record.id.pid;
        let raw = Pid::from_raw(pid as i32).ok_or(Mismatch::Gone(pid))?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty()).map_err(|e| {
            if e == rustix::io::Errno::SRCH {
                AdoptError::Mismatch(Mismatch::Gone(pid))
            } else {
                AdoptError::Pidfd {
                    pid,
                    source: e.into(),
                }
            }
        })?;
        procfs::check(record.id, procfs::observe(pid).as_ref())?;
        Ok(Worker {
            id: record.id,
            started_at: SystemTime::UNIX_EPOCH + Duration::from_millis(record.started_at_ms),
            log: record.log.clone(),
            config_sha256: record.config_sha256.clone(),
            pidfd: Arc::new(pidfd),
        })
    }

    /// Wraps a child that ebb just spawned. The pidfd is opened while the child cannot have been
    /// reaped yet (only its `Child` handle reaps it), so the pid is still the child's.
    pub fn from_child(
        child: &Child,
        log: PathBuf,
        config_sha256: String,
    ) -> std::io::Result<Worker> {
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the new haproxy exited before it was tracked"))?;
        let raw = Pid::from_raw(pid as i32).ok_or_else(|| std::io::Error::other("pid 0"))?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
        let start_time = procfs::start_time(pid)?;
        Ok(Worker {
            id: ProcessId { pid, start_time },
            started_at: SystemTime::now(),
            log,
            config_sha256,
            pidfd: Arc::new(pidfd),
        })
    }

    pub fn pid(&self) -> u32 {
        self.id.pid
    }

    pub fn age(&self) -> Duration {
        self.started_at.elapsed().unwrap_or_default()
    }

    /// Signals through the pidfd: it fails with ESRCH once the process is gone, and never reaches
    /// another process that reused the pid.
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        match pidfd_send_signal(&*self.pidfd, signal) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn record(&self) -> WorkerRecord {
        WorkerRecord {
            id: self.id,
            started_at_ms: self
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            log: self.log.clone(),
            config_sha256: self.config_sha256.clone(),
        }
    }

    /// Starts the task that calls `exited` when this worker exits. For our own child, the exit
    /// status is read by waiting on it; an adopted process is watched through its pidfd, which turns
    /// readable the moment the process exits (a zombie counts as exited).
    pub fn watch_exit<F>(&self, child: Option<Child>, exited: F)
    where
        F: FnOnce(ProcessId, Exit) + Send + 'static,
    {
        let id = self.id;
        match child {
            Some(mut child) => {
                tokio::spawn(async move {
                    let exit = match child.wait().await {
                        Ok(status) => Exit::from_status(status),
                        Err(_) => Exit::Unknown,
                    };
                    exited(id, exit);
                });
            }
            None => {
                let fd = self.pidfd.try_clone();
                tokio::spawn(async move {
                    if let Ok(fd) = fd {
                        // SAFETY: the AsyncFd owns this OwnedFd, so the descriptor stays open and
                        // is not reused for as long as it is registered.
                        let registered = unsafe {
                            AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
                        };
                        if let Ok(async_fd) = registered {
                            let _ = async_fd.readable().await;
                        }
                    }
                    // Without a pollable pidfd, fall back to /proc; this path is not expected on
                    // Linux ≥ 5.3.
                    while procfs::is_alive(id) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    exited(id, Exit::Unknown);
                });
            }
        }
    }
}

/// Reads up to the last `max` bytes of a worker's log.
pub fn log_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    // Drop a partial first line.
    match (len > max, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_string(),
        _ => text.into_owned(),
    }
}

/// The lines of a failed start worth showing to an operator: HAProxy's alerts, or else the tail.
pub fn startup_error(log: &str) -> String {
    let alerts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[ALERT]"))
        .map(str::trim)
        .collect();
    let lines: Vec<&str> = if alerts.is_empty() {
        log.lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    } else {
        alerts
    };
    let text = lines.join(" | ");
    if text.is_empty() {
        "HAProxy printed nothing".to_string()
    } else {
        text
    }
}

/// Connections a worker cut because `hard-stop-after` expired, from lines such as
/// `Proxy fe hard-stopped (2 remaining conns will be closed).` `None` if it was not hard-stopped.
pub fn hard_stopped_connections(log: &str) -> Option<u64> {
    let mut found = false;
    let mut total = 0;
    for line in log.lines() {
        if line.contains("performing a hard-stop") {
            found = true;
        }
        if let Some(rest) = line.split("hard-stopped (").nth(1) {
            found = true;
            total += rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    found.then_some(total)
}

/// Deletes a worker's log, but only if it is ebb's own: a regular file directly inside `log_dir`,
/// named as `launch` names its files (`worker-<pid>-<start>.log`, `starting-*.log`). Anything else
/// is left alone, however it got into a record: the stderr of a HAProxy found running (which ebb
/// only reads), a symlink, a file in a subdirectory or elsewhere.
pub fn remove_own_log(log: &Path, log_dir: &Path) {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let Some(name) = log.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let own_name = match name.strip_suffix(".log") {
        Some(stem) => {
            is_worker_log_name(name)
                || stem
                    .strip_prefix("starting-")
                    .is_some_and(|s| !s.is_empty())
        }
        None => false,
    };
    let in_log_dir = log.parent().is_some_and(|parent| {
        parent == log_dir
            || matches!(
                (std::fs::canonicalize(parent), std::fs::canonicalize(log_dir)),
                (Ok(a), Ok(b)) if a == b
            )
    });
    if !own_name || !in_log_dir {
        tracing::debug!("not deleting {}: not a log ebb created", log.display());
        return;
    }
    // By name inside the opened directory: what is checked is what is deleted, even if a path
    // component is swapped for a symlink meanwhile. unlinkat never follows the last component.
    let Ok(dir) = rustix::fs::open(
        log_dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let is_file = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile);
    if !is_file {
        return;
    }
    match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => tracing::warn!(
            "cannot delete worker log {}: {e}; delete it yourself, and check that {} is writable by the agent",
            log.display(),
            log_dir.display()
        ),
    }
    // The tail `cap_log` kept goes with it (never a symlink either: unlinkat does not follow).
    let kept = format!("{name}.1");
    let is_file = rustix::fs::statat(&dir, kept.as_str(), AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile);
    if is_file {
        let _ = rustix::fs::unlinkat(&dir, kept.as_str(), AtFlags::empty());
    }
}

/// A log `launch` created: named by it, directly in `log_dir`. Only those are ever cut: an adopted
/// HAProxy that someone else started may write to a file that is not ebb's.
fn is_own_log(path: &Path, log_dir: &Path) -> bool {
    let named = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        is_worker_log_name(n)
            || n.strip_prefix("starting-")
                .and_then(|s| s.strip_suffix(".log"))
                .is_some_and(|s| !s.is_empty())
    });
    named && path.parent() == Some(log_dir)
}

/// `worker-<pid>-<start>.log`: the name `launch` gives a worker's log once it runs.
fn is_worker_log_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_suffix(".log")
        .and_then(|stem| stem.strip_prefix("worker-"))
        .and_then(|ids| ids.split_once('-'))
        .is_some_and(|(pid, start)| digits(pid) && digits(start))
}

/// How often the worker logs are measured: a `stat` per worker, cheap enough to do often, and
/// often enough that a worker logging fast overshoots its cap by little.
pub const LOG_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A worker's log, and the worker (by pidfd) whose stdout and stderr write to it.
#[derive(Debug, Clone)]
pub struct LogTarget {
    pub path: PathBuf,
    pidfd: Arc<OwnedFd>,
}

impl Worker {
    pub fn log_target(&self) -> LogTarget {
        LogTarget {
            path: self.log.clone(),
            pidfd: self.pidfd.clone(),
        }
    }
}

/// Caps one worker's log at `max` bytes: past it, its last `max` bytes (from a line start) are
/// copied to `<log>.1`, replacing the previous tail, and the log is truncated. HAProxy keeps
/// writing to the same file, at its new end: the file was opened `O_APPEND`, and since HAProxy
/// clears that flag when it first logs to stdout (it sets `O_NONBLOCK` with a plain `F_SETFL`),
/// it is set again here, on the worker's own stdout, reached through its pidfd, just before the
/// cut. What the worker writes between the copy and the cut is lost (a few lines at most).
/// Returns whether the log was cut.
pub fn cap_log(target: &LogTarget, max: u64) -> std::io::Result<bool> {
    use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let nofollow = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
    let mut log = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow)
        .open(&target.path)?;
    let meta = log.metadata()?;
    let len = meta.len();
    if len <= max {
        return Ok(false);
    }
    let stdout =
        rustix::process::pidfd_getfd(&*target.pidfd, 1, rustix::process::PidfdGetfdFlags::empty())?;
    let st = rustix::fs::fstat(&stdout)?;
    if st.st_dev != meta.dev() || st.st_ino != meta.ino() {
        // Its stdout is not this file (an adopted HAProxy started by someone else): not ours to cut.
        return Err(std::io::Error::other(
            "the worker's stdout is another file than its recorded log",
        ));
    }
    let flags = rustix::fs::fcntl_getfl(&stdout)?;
    rustix::fs::fcntl_setfl(&stdout, flags | rustix::fs::OFlags::APPEND)?;

    log.seek(SeekFrom::Start(len - max))?;
    let mut reader = BufReader::new(&log).take(max);
    let mut partial = Vec::new();
    reader.read_until(b'\n', &mut partial)?;
    let kept = target.path.with_extension("log.1");
    let staged = target.path.with_extension("log.1.tmp");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(nofollow)
        .open(&staged)?;
    std::io::copy(&mut reader, &mut out)?;
    drop(out);
    std::fs::rename(&staged, &kept)?;
    rustix::fs::ftruncate(&stdout, 0)?;
    Ok(true)
}

/// [`cap_log`] on each worker's log. A log that cannot be capped is reported once (in `warned`),
/// not every second.
pub fn cap_logs(log_dir: &Path, targets: &[LogTarget], max: u64, warned: &mut HashSet<PathBuf>) {
    warned.retain(|p| targets.iter().any(|t| &t.path == p));
    for target in targets.iter().filter(|t| is_own_log(&t.path, log_dir)) {
        let path = target.path.display();
        match cap_log(target, max) {
            Ok(true) => tracing::debug!(
                "worker log {path} passed haproxy.worker_log_max_bytes = {max}: its tail is in {path}.1"
            ),
            Ok(false) => {}
            // The worker exited and its log went meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) => {}
            Err(e) => {
                if warned.insert(target.path.clone()) {
                    tracing::warn!(
                        "cannot cap worker log {path} at haproxy.worker_log_max_bytes = {max}: \
                         {e}; it grows until the worker exits (an adopted worker may need the \
                         agent to run as root, or as HAProxy's user with ptrace allowed)"
                    );
                }
            }
        }
    }
}

/// The background task that keeps the workers' logs under `max` bytes (plus what a worker
/// writes in [`LOG_CHECK_INTERVAL`]); it ends when this is dropped.
pub struct LogCap {
    targets: tokio::sync::watch::Sender<Vec<LogTarget>>,
    task: tokio::task::JoinHandle<()>,
}

impl LogCap {
    pub fn spawn(log_dir: PathBuf, max: u64) -> LogCap {
        let (targets, rx) = tokio::sync::watch::channel(Vec::<LogTarget>::new());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOG_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut warned = HashSet::new();
            loop {
                tick.tick().await;
                let now: Vec<LogTarget> = rx.borrow().clone();
                if now.is_empty() {
                    continue;
                }
                // Copying a 16 MiB tail is disk work: off the runtime's threads.
                let dir = log_dir.clone();
                let capped = tokio::task::spawn_blocking(move || {
                    cap_logs(&dir, &now, max, &mut warned);
                    warned
                })
                .await;
                warned = capped.unwrap_or_default();
            }
        });
        LogCap { targets, task }
    }

    /// The workers whose logs to keep capped, from now on.
    pub fn watch(&self, targets: Vec<LogTarget>) {
        self.targets.send_if_modified(|t| {
            let same =
                t.len() == targets.len() && t.iter().zip(&targets).all(|(a, b)| a.path == b.path);
            *t = targets;
            !same
        });
    }
}

impl Drop for LogCap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_stop_lines_are_summed() {
        let log = "[WARNING]  (11049) : Proxy fe stopped (cumulated conns: FE: 2, BE: 0).\n[WARNING]  (11049) : soft-stop running for too long, performing a hard-stop.\n[WARNING]  (11049) : Proxy fe hard-stopped (2 remaining conns will be closed).\n[WARNING]  (11049) : Proxy be2 hard-stopped (3 remaining conns will be closed).\n";
        assert_eq!(hard_stopped_connections(log), Some(5));
        assert_eq!(
            hard_stopped_connections(
                "[WARNING] (1) : Proxy fe stopped (cumulated conns: FE: 2, BE: 0).\n"
            ),
            None
        );
    }

    #[test]
    fn startup_error_prefers_alerts() {
        let log = "[NOTICE] x\n[ALERT]    (1) : Starting frontend fe: cannot bind socket (Address already in use) [127.0.0.1:80]\n[ALERT]    (1) : [haproxy.main()] Some protocols failed to start their listeners! Exiting.\n";
        let e = startup_error(log);
        assert!(
            e.contains("cannot bind socket") && e.contains("Exiting"),
            "{e}"
        );
        assert_eq!(startup_error(""), "HAProxy printed nothing");
        assert_eq!(startup_error("a\nb\n"), "a | b");
    }

    #[test]
    fn exit_codes_and_signals() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            Exit::from_status(std::process::ExitStatus::from_raw(0)),
            Exit::Code(0)
        );
        assert_eq!(
            Exit::from_status(std::process::ExitStatus::from_raw(9)),
            Exit::Code(137)
        );
        assert_eq!(Exit::Code(137).to_string(), "killed by signal 9");
    }

    #[test]
    fn only_ebbs_own_logs_are_ever_deleted() {
        let root = tempfile::tempdir().expect("tempdir");
        let logs = root.path().join("logs");
        std::fs::create_dir_all(logs.join("sub")).expect("mkdir");
        let write = |p: &Path| std::fs::write(p, b"log").expect("write");
        let outside = root.path().join("worker-7-8.log");
        write(&outside);
        let own = [logs.join("worker-1-2.log"), logs.join("starting-9-123.log")];
        let foreign = [
            logs.join("other.log"),
            logs.join("worker-x-2.log"),
            logs.join("worker-1-2.log.bak"),
            logs.join("starting-.log"),
            logs.join("sub/worker-5-6.log"),
        ];
        for p in own.iter().chain(&foreign) {
            write(p);
        }
        std::os::unix::fs::symlink(&outside, logs.join("worker-3-4.log")).expect("symlink");
        std::fs::create_dir(logs.join("worker-8-9.log")).expect("dir");

        for p in &own {
            remove_own_log(p, &logs);
            assert!(!p.exists(), "{} is ebb's and goes", p.display());
        }
        for p in &foreign {
            remove_own_log(p, &logs);
            assert!(p.exists(), "{} is not ebb's", p.display());
        }
        // Out of the log dir by name or by symlink: nothing is touched.
        remove_own_log(&logs.join("../worker-7-8.log"), &logs);
        remove_own_log(&outside, &logs);
        remove_own_log(&logs.join("worker-3-4.log"), &logs);
        assert!(outside.exists());
        assert!(logs.join("worker-3-4.log").symlink_metadata().is_ok());
        remove_own_log(&logs.join("worker-8-9.log"), &logs);
        assert!(logs.join("worker-8-9.log").is_dir());
        remove_own_log(Path::new(""), &logs);
        // Already gone: nothing to do, nothing to report.
        remove_own_log(&own[0], &logs);
    }

    /// A process whose stdout is `log`, opened without `O_APPEND` (as HAProxy leaves it).
    struct Holder(std::process::Child);

    impl Holder {
        fn start(log: &std::fs::File, path: &Path) -> (Holder, LogTarget) {
            let child = std::process::Command::new("sleep")
                .arg("600")
                .stdout(log.try_clone().expect("dup"))
                .spawn()
                .expect("spawn sleep");
            let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
            let pidfd = pidfd_open(pid, PidfdFlags::empty()).expect("pidfd");
            let target = LogTarget {
                path: path.to_owned(),
                pidfd: Arc::new(pidfd),
            };
            (Holder(child), target)
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_log_past_its_cap_keeps_its_tail_and_the_worker_writes_on_at_its_start() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("worker-1-2.log");
        let mut writer = std::fs::File::create(&path).expect("create");
        let (_holder, target) = Holder::start(&writer, &path);
        for i in 0..100 {
            writeln!(writer, "line {i:04}").expect("write");
        }
        assert!(
            !cap_log(&target, 10_000).expect("cap"),
            "under the cap: untouched"
        );
        assert!(cap_log(&target, 100).expect("cap"));
        let kept = std::fs::read_to_string(dir.path().join("worker-1-2.log.1")).expect("tail");
        assert!(
            kept.starts_with("line ") && kept.ends_with("line 0099\n"),
            "{kept}"
        );
        assert!(kept.len() <= 100, "{}", kept.len());
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
        // The writer shares the worker's stdout: its next line lands at the start of the cut
        // file, not after a hole of zeros.
        writeln!(writer, "after").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "after\n");
        remove_own_log(&path, dir.path());
        assert!(
            !dir.path().join("worker-1-2.log.1").exists(),
            "the tail goes with the log"
        );
    }

    #[test]
    fn only_logs_ebb_created_are_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).expect("mkdir");
        let mut cut = Vec::new();
        for path in [
            dir.path().join("haproxy.log"),
            dir.path().join("worker-1-2.log"),
            logs.join("haproxy.log"),
            logs.join("worker-1-2.log"),
        ] {
            let writer = std::fs::File::create(&path).expect("create");
            let (_holder, target) = Holder::start(&writer, &path);
            std::fs::write(&path, vec![b'x'; 1000]).expect("write");
            cap_logs(&logs, &[target], 100, &mut HashSet::new());
            if std::fs::metadata(&path).expect("stat").len() == 0 {
                cut.push(path);
            }
        }
        assert_eq!(cut, vec![logs.join("worker-1-2.log")]);
    }

    #[test]
    fn a_log_that_is_not_the_workers_stdout_is_never_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stdout = std::fs::File::create(dir.path().join("elsewhere.log")).expect("create");
        let (_holder, target) = Holder::start(&stdout, &dir.path().join("worker-1-2.log"));
        std::fs::write(&target.path, vec![b'x'; 10_000]).expect("write");
        assert!(cap_log(&target, 100).is_err());
        assert_eq!(std::fs::metadata(&target.path).expect("stat").len(), 10_000);
        assert!(!dir.path().join("worker-1-2.log.1").exists());
    }
}
