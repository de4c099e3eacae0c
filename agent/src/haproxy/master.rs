//! HAProxy's master CLI: the `-S` socket of `haproxy -W`, used in master-worker mode.
//!
//! Unlike the admin socket, the master CLI reaches every process by pid (`@!<pid> <command>`),
//! including old workers that still finish their connections after a reload, so nothing here has
//! to guess which worker answered.
//!
//! The master has few connection slots (10) and re-execs itself on every reload, closing every
//! connection and refusing new ones for a moment. Every exchange is therefore one short connection
//! (`<line>; quit`, answer read to EOF), and refused connects are retried within a timeout.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::admin::{parse_pid, split_sample, StatRow, StatRows};

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("master CLI {path}: {source}; check that `haproxy -W -S {path}` runs and that ebb may use its socket", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("master CLI {path}: {what} (waited {timeout:?})", path = path.display())]
    Timeout {
        path: PathBuf,
        timeout: Duration,
        what: String,
    },
    #[error("master CLI {path}: the master knows no process {pid} (it exited, or is not one of its workers); read `show proc` again", path = path.display())]
    NoSuchWorker { path: PathBuf, pid: u32 },
    #[error("master CLI {path}: `show info` sent to worker {want} was answered by pid {got}; the master routed it elsewhere, read `show proc` again", path = path.display())]
    WrongWorker { path: PathBuf, want: u32, got: u32 },
    #[error("master CLI {path}: the `show info` of worker {pid} has no `{field}:` line; is the socket really HAProxy's master CLI?", path = path.display())]
    MissingField {
        path: PathBuf,
        pid: u32,
        field: &'static str,
    },
    #[error("master CLI {path}: HAProxy refused {command:?}: {answer}", path = path.display())]
    Refused {
        path: PathBuf,
        command: String,
        answer: String,
    },
    #[error("master CLI {path}: HAProxy did not reload and kept its old worker: {}", reload_failure(logs.as_deref()), path = path.display())]
    ReloadFailed { path: PathBuf, logs: Option<String> },
}

fn reload_failure(logs: Option<&str>) -> String {
    match logs {
        Some(logs) => format!("fix the config; HAProxy said:\n{logs}"),
        None => "run `haproxy -c -f <config>` to see why (this HAProxy does not say)".to_string(),
    }
}

/// Answers longer than this are cut: a stats dump of a large config fits well within it.
const MAX_ANSWER: u64 = 16 << 20;
/// Backoff between connects the master refuses while it re-execs. Short: a refused connect costs
/// microseconds, and a new worker already serves while its master cannot be asked about it yet;
/// every ms the agent waits here is a ms that worker serves without the drain's commands.
const FIRST_RETRY: Duration = Duration::from_millis(1);
const MAX_RETRY: Duration = Duration::from_millis(20);
/// Backoff between `show proc` polls while a reload is under way: a reload takes about 10 ms plus
/// the config's parse time, and the new worker is found as soon as the master lists it.
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(10);

const NO_SUCH_PID: &str = "Can't find the target PID";

#[derive(Debug, Clone)]
pub struct MasterCli {
    path: PathBuf,
    timeout: Duration,
}

impl MasterCli {
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        MasterCli {
            path: path.into(),
            timeout,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One short connection: `line; quit`, answer to EOF; connects refused during a reload retried
    /// with backoff within the timeout. A newline in `line` separates commands, as `;` does.
    pub async fn run(&self, line: &str) -> Result<String, MasterError> {
        self.exchange(&format!("{}; quit", line.trim_end()), self.deadline())
            .await
    }

    pub async fn show_proc(&self) -> Result<ProcList, MasterError> {
        let answer = self.run("show proc").await?;
        Ok(parse_show_proc(&answer))
    }

    /// Runs `line` in worker `pid` (see [`on_worker`]) and returns its answer, trimmed.
    pub async fn command_on(&self, pid: u32, line: &str) -> Result<String, MasterError> {
        let answer = self
            .exchange(&on_worker(pid, line), self.deadline())
            .await?;
        self.check_target(pid, &answer)?;
        if let Some(refusal) = refusal(&answer) {
            return Err(MasterError::Refused {
                path: self.path.clone(),
                command: line.to_string(),
                answer: refusal.to_string(),
            });
        }
        Ok(answer.trim().to_string())
    }

    /// `@!pid show info`; an error unless the answer's `Pid:` is `pid`.
    pub async fn show_info(&self, pid: u32) -> Result<String, MasterError> {
        self.show_info_until(pid, self.deadline()).await
    }

    /// `show info` of worker `pid` and, when `rows` asks for any, those `show stat` rows, taken in
    /// one exchange with that worker (see [`AdminSocket::sample`](super::admin::AdminSocket::sample)).
    pub async fn sample(
        &self,
        pid: u32,
        rows: StatRows,
    ) -> Result<(String, Option<Vec<StatRow>>), MasterError> {
        let line = match rows.command() {
            Some(stat) => format!("@!{pid} show info; @!{pid} {stat}; quit"),
            None => format!("@!{pid} show info; quit"),
        };
        let answer = self.exchange(&line, self.deadline()).await?;
        self.check_info(pid, &answer)?;
        Ok(split_sample(&answer, rows))
    }

    /// `CurrConns` of worker `pid`: the connections it still holds (old workers included).
    pub async fn connections(&self, pid: u32) -> Result<u64, MasterError> {
        let info = self.show_info(pid).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("CurrConns:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| MasterError::MissingField {
                path: self.path.clone(),
                pid,
                field: "CurrConns",
            })
    }

    /// Sends `reload` and waits until the new worker answers `@!pid show info`, or the reload is
    /// known to have failed, within `timeout`. `before` is `show_proc()` read just before.
    /// Returns the new worker's pid.
    pub async fn reload(&self, before: &ProcList, timeout: Duration) -> Result<u32, MasterError> {
        let deadline = Instant::now() + timeout;
        // 2.8 answers only once the new master loaded the config; 2.6 answers nothing. A
        // connection the re-exec cut leaves the outcome to `show proc`, like 2.6's silence.
        match self.exchange("reload; quit", deadline).await {
            Ok(answer) => {
                if let Some(Err(logs)) = reload_reply(&answer) {
                    return Err(MasterError::ReloadFailed {
                        path: self.path.clone(),
                        logs: Some(logs),
                    });
                }
            }
            Err(MasterError::Io { .. }) => {}
            Err(e @ MasterError::Timeout { .. }) => {
                return Err(self.reload_timeout(timeout, &e.to_string()))
            }
            Err(e) => return Err(e),
        }

        let mut pause = FIRST_POLL;
        let mut last = String::from("the master did not show a new worker");
        let new_pid = loop {
            match self
                .exchange("show proc; quit", self.deadline().min(deadline))
                .await
            {
                Ok(answer) => match judge(before, &parse_show_proc(&answer)) {
                    Judgement::Succeeded(pid) => break pid,
                    Judgement::Failed => {
                        return Err(MasterError::ReloadFailed {
                            path: self.path.clone(),
                            logs: None,
                        })
                    }
                    Judgement::Pending => {}
                },
                // Cut connections and stalls are normal while the master re-execs.
                Err(e @ (MasterError::Io { .. } | MasterError::Timeout { .. })) => {
                    last = e.to_string()
                }
                Err(e) => return Err(e),
            }
            if Instant::now() + pause >= deadline {
                return Err(self.reload_timeout(timeout, &last));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        };

        // A worker just forked may not have set up its CLI yet.
        let mut pause = FIRST_POLL;
        loop {
            match self
                .show_info_until(new_pid, self.deadline().min(deadline))
                .await
            {
                Ok(_) => return Ok(new_pid),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() + pause >= deadline {
                return Err(MasterError::Timeout {
                    path: self.path.clone(),
                    timeout,
                    what: format!(
                        "the new worker {new_pid} did not answer within the startup timeout \
                         (last: {last}); read HAProxy's log, or allow a longer startup timeout"
                    ),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}

impl MasterCli {
    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    fn reload_timeout(&self, timeout: Duration, last: &str) -> MasterError {
        MasterError::Timeout {
            path: self.path.clone(),
            timeout,
            what: format!(
                "the new worker did not answer within the startup timeout (last: {last}); \
                 read HAProxy's log, or allow a longer startup timeout"
            ),
        }
    }

    async fn show_info_until(&self, pid: u32, deadline: Instant) -> Result<String, MasterError> {
        let answer = self
            .exchange(&format!("@!{pid} show info; quit"), deadline)
            .await?;
        self.check_info(pid, &answer)?;
        Ok(answer)
    }

    fn check_target(&self, pid: u32, answer: &str) -> Result<(), MasterError> {
        if answer.contains(NO_SUCH_PID) {
            return Err(MasterError::NoSuchWorker {
                path: self.path.clone(),
                pid,
            });
        }
        Ok(())
    }

    fn check_info(&self, pid: u32, answer: &str) -> Result<(), MasterError> {
        self.check_target(pid, answer)?;
        let got = parse_pid(answer).ok_or_else(|| MasterError::MissingField {
            path: self.path.clone(),
            pid,
            field: "Pid",
        })?;
        if got != pid {
            return Err(MasterError::WrongWorker {
                path: self.path.clone(),
                want: pid,
                got,
            });
        }
        Ok(())
    }

    /// Sends `request` (which must end the session with `quit`) on a new connection and reads the
    /// answer to EOF, all before `deadline`.
    async fn exchange(&self, request: &str, deadline: Instant) -> Result<String, MasterError> {
        let io = |source| MasterError::Io {
            path: self.path.clone(),
            source,
        };
        let mut refused: Option<io::Error> = None;
        let attempt = async {
            let mut pause = FIRST_RETRY;
            let mut stream = loop {
                match UnixStream::connect(&self.path).await {
                    Ok(stream) => break stream,
                    Err(e) if connect_retryable(&e) => {
                        refused = Some(e);
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_RETRY);
                    }
                    Err(e) => return Err(io(e)),
                }
            };
            // A newline would end the request before its `quit`: it separates commands, as `;`.
            let mut line = request.replace(['\r', '\n'], ";");
            line.push('\n');
            stream.write_all(line.as_bytes()).await.map_err(io)?;
            let mut answer = Vec::with_capacity(4096);
            let mut chunk = [0u8; 8192];
            while (answer.len() as u64) < MAX_ANSWER {
                let n = stream.read(&mut chunk).await.map_err(io)?;
                answer.extend_from_slice(&chunk[..n]);
                if n == 0 || line_aborted(&answer) {
                    break;
                }
            }
            Ok(String::from_utf8_lossy(&answer).into_owned())
        };
        let started = Instant::now();
        let result = tokio::time::timeout_at(deadline, attempt).await;
        let waited = Instant::now().saturating_duration_since(started);
        match result {
            Ok(result) => result,
            Err(_) => Err(MasterError::Timeout {
                path: self.path.clone(),
                timeout: waited,
                what: match refused {
                    Some(e) => format!(
                        "could not connect ({e}); check that `haproxy -W -S {}` runs \
                         (a reloading master refuses connections only for a moment)",
                        self.path.display()
                    ),
                    None => "the master did not answer; it may be stuck or overloaded".into(),
                },
            }),
        }
    }
}

/// Whether the master gave up on the line: from 2.8 on, a master error (an unknown `@!pid`, a
/// level it refuses) drops the rest of the line, `quit` included, and leaves the connection open,
/// so waiting for EOF would hold one of its few slots until the timeout. Such an error is the
/// master's own one-line answer; a worker's answer ends with a blank line instead.
fn line_aborted(answer: &[u8]) -> bool {
    let Some(text) = answer.strip_suffix(b"\n") else {
        return false;
    };
    // The master's error lines are short: a longer last line is not one of them.
    let tail = &text[text.len().saturating_sub(256)..];
    let Some(start) = tail
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|i| i + 1)
        .or_else(|| (tail.len() == text.len()).then_some(0))
    else {
        return false;
    };
    let last = &tail[start..];
    MASTER_ABORTS.iter().any(|m| last.starts_with(m.as_bytes()))
}

const MASTER_ABORTS: [&str; 2] = [NO_SUCH_PID, "Permission denied"];

/// What a reloading master does to new connections: ECONNREFUSED while it re-execs, ENOENT
/// between the unlink and the bind of its socket, EAGAIN when its backlog is full.
fn connect_retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound | io::ErrorKind::WouldBlock
    )
}

/// HAProxy answers a failed CLI command with text instead of an error code. Each answer of a
/// worker ends with a blank line, so the blocks are the commands' answers; the first one with
/// the same markers as the admin socket's is the refusal.
fn refusal(answer: &str) -> Option<&str> {
    const MARKERS: [&str; 5] = [
        "Unknown command",
        "restricted to experimental mode",
        "Permission denied",
        "Missing",
        "failed",
    ];
    answer
        .split("\n\n")
        .map(str::trim)
        .find(|block| MARKERS.iter().any(|m| block.contains(m)))
}

/// One process in `show proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    /// The master's reloads (failed ones included); for a worker, the reloads it survived.
    pub reloads: u32,
    pub version: String,
}

/// `show proc`, by section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcList {
    pub master: Option<Proc>,
    /// The master's `[failed: M]`: failed reloads since the last successful one (None before it
    /// was shown).
    pub failed: Option<u32>,
    pub workers: Vec<Proc>,
    pub old_workers: Vec<Proc>,
    /// The answer was cut short (HAProxy before 3.4 cuts it near 16 KB): processes may be missing.
    pub truncated: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Master,
    Workers,
    OldWorkers,
    Other,
}

/// Parses `show proc` by its section names, never by position: versions differ in which sections
/// they print and in what order.
pub fn parse_show_proc(text: &str) -> ProcList {
    let mut list = ProcList {
        master: None,
        failed: None,
        workers: Vec::new(),
        old_workers: Vec::new(),
        // Every complete answer of the CLI ends with a blank line.
        truncated: !text.ends_with("\n\n"),
    };
    // A last line without its newline was cut in the middle: whatever it says may be wrong.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    let mut section = Section::Master;
    for line in complete.lines() {
        if line.starts_with("#<") {
            continue;
        }
        if let Some(name) = line.strip_prefix('#') {
            section = match name.trim() {
                "workers" => Section::Workers,
                "old workers" => Section::OldWorkers,
                _ => Section::Other,
            };
            continue;
        }
        let Some((kind, proc, failed)) = parse_proc_line(line) else {
            continue;
        };
        match (section, kind) {
            (Section::Master, "master") if list.master.is_none() => {
                list.master = Some(proc);
                list.failed = failed;
            }
            (Section::Workers, "worker") => list.workers.push(proc),
            (Section::OldWorkers, "worker") => list.old_workers.push(proc),
            _ => {}
        }
    }
    list
}

/// `<pid> <type> <reloads> [failed: M] <uptime> <version>`.
fn parse_proc_line(line: &str) -> Option<(&str, Proc, Option<u32>)> {
    let mut words = line.split_whitespace();
    let pid = words.next()?.parse().ok()?;
    let kind = words.next()?;
    let reloads = words.next()?.parse().ok()?;
    let mut rest: Vec<&str> = words.collect();
    let mut failed = None;
    if rest.first() == Some(&"[failed:") {
        failed = rest.get(1)?.strip_suffix(']')?.parse().ok();
        rest.drain(..2);
    }
    // The uptime, then the version.
    let version = rest.get(1..).unwrap_or_default().join(" ");
    Some((
        kind,
        Proc {
            pid,
            reloads,
            version,
        },
        failed,
    ))
}

/// Commands of the master's own session: their level is passed on to the workers the session
/// talks to, so they must not be sent to a worker.
const SESSION_COMMANDS: [&str; 6] = [
    "experimental-mode",
    "expert-mode",
    "mcli-debug-mode",
    "user",
    "operator",
    "quit",
];

/// Translates `line` to run in worker `pid`: `@!pid` applies to one command only, so every
/// command of the line gets it, except the master's session commands (`experimental-mode on`,
/// `expert-mode on`, `user`, `operator`), which must reach the master for their level to apply.
/// Commands already addressed (`@…`) are kept. Ends with `; quit`.
pub fn on_worker(pid: u32, line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 32);
    for command in split_commands(line) {
        let command = command.trim();
        if command.is_empty() {
            continue;
        }
        let first = command.split_whitespace().next().unwrap_or_default();
        if !SESSION_COMMANDS.contains(&first) && !first.starts_with('@') {
            out.push_str(&format!("@!{pid} "));
        }
        out.push_str(command);
        out.push_str("; ");
    }
    out.push_str("quit");
    out
}

/// Splits on HAProxy's separators (`;`, and a newline, which ends a request): a `\` escapes the
/// character after it, which stays in the command for HAProxy to unescape.
fn split_commands(line: &str) -> Vec<&str> {
    let mut commands = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ';' || c == '\n' || c == '\r' {
            commands.push(&line[start..i]);
            start = i + c.len_utf8();
        }
    }
    commands.push(&line[start..]);
    commands
}

/// The answer to `reload` (HAProxy 2.7 and later): `Some(Ok)` for `Success=1`, `Some(Err(logs))`
/// for `Success=0` with the startup logs after `--`, `None` when it said nothing (2.6).
pub fn reload_reply(answer: &str) -> Option<Result<(), String>> {
    let answer = answer.trim_start();
    let (status, rest) = answer.split_once('\n').unwrap_or((answer, ""));
    let logs = rest
        .trim_start()
        .strip_prefix("--")
        .unwrap_or(rest)
        .trim()
        .to_string();
    match status.trim() {
        "Success=1" => Some(Ok(())),
        "Success=0" => Some(Err(logs)),
        _ => None,
    }
}

/// Whether a reload happened, from `show proc` before and after it (for HAProxy versions whose
/// `reload` answers nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    Pending,
    Succeeded(u32),
    Failed,
}

/// Pending while the master's reload count (same master pid) has not moved; Succeeded(new pid)
/// once a worker pid absent from `before` is under `# workers`; Failed once the count moved and
/// there is no new worker, or the failed count grew.
///
/// The re-exec'd master forks its worker before it accepts connections again, so a moved count
/// without a new worker is a failure, not a worker still to come. A cut answer may hide the new
/// worker, so it is never judged a failure by the count alone.
pub fn judge(before: &ProcList, after: &ProcList) -> Judgement {
    let known = |pid: u32| {
        before
            .workers
            .iter()
            .chain(&before.old_workers)
            .chain(&before.master)
            .any(|p| p.pid == pid)
    };
    if let Some(new) = after.workers.iter().find(|p| !known(p.pid)) {
        return Judgement::Succeeded(new.pid);
    }
    let (Some(was), Some(is)) = (&before.master, &after.master) else {
        return Judgement::Pending;
    };
    if was.pid != is.pid {
        return Judgement::Pending;
    }
    if let (Some(was), Some(is)) = (before.failed, after.failed) {
        if is > was {
            return Judgement::Failed;
        }
    }
    if is.reloads != was.reloads && !after.truncated {
        return Judgement::Failed;
    }
    Judgement::Pending
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW_PROC_26: &str =
        "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
5655            master          4 [failed: 0]   0d00h10m24s     2.6.12-1+deb12u4\n\
# workers\n\
17234           worker          0               0d00h00m01s     2.6.12-1+deb12u4\n\
# old workers\n\
17183           worker          1               0d00h00m02s     2.6.12-1+deb12u4\n\
# programs\n\
\n";

    fn p(pid: u32, reloads: u32, version: &str) -> Proc {
        Proc {
            pid,
            reloads,
            version: version.into(),
        }
    }

    fn list(master: (u32, u32), failed: Option<u32>, workers: &[u32], old: &[u32]) -> ProcList {
        ProcList {
            master: Some(p(master.0, master.1, "2.6")),
            failed,
            workers: workers.iter().map(|&w| p(w, 0, "2.6")).collect(),
            old_workers: old.iter().map(|&w| p(w, 1, "2.6")).collect(),
            truncated: false,
        }
    }

    #[test]
    fn parses_show_proc_by_section() {
        let v = "2.6.12-1+deb12u4";
        assert_eq!(
            parse_show_proc(SHOW_PROC_26),
            ProcList {
                master: Some(p(5655, 4, v)),
                failed: Some(0),
                workers: vec![p(17234, 0, v)],
                old_workers: vec![p(17183, 1, v)],
                truncated: false,
            }
        );
        let v28 = SHOW_PROC_26.replace("2.6.12-1+deb12u4", "2.8.25-ray");
        let parsed = parse_show_proc(&v28);
        assert_eq!(parsed.workers, vec![p(17234, 0, "2.8.25-ray")]);
        assert!(!parsed.truncated);
    }

    #[test]
    fn missing_sections_and_old_reload_column() {
        let text = "#<PID> <type> <reloads> <uptime> <version>\n1 master 2 0d00h00m01s 2.0.1\n# workers\n2 worker 0 0d00h00m01s 2.0.1\n\n";
        let parsed = parse_show_proc(text);
        assert_eq!(parsed.master, Some(p(1, 2, "2.0.1")));
        assert_eq!(parsed.failed, None);
        assert_eq!(parsed.workers, vec![p(2, 0, "2.0.1")]);
        assert!(parsed.old_workers.is_empty());
        assert!(!parsed.truncated);
    }

    #[test]
    fn old_workers_before_workers_and_unknown_sections() {
        let text = "#<PID> x\n1 master 3 [failed: 1] 0d 3.1\n# old workers\n7 worker 2 0d 3.1\n8 worker 1 0d 3.1\n# gizmos\n9 worker 0 0d 3.1\n# workers\n10 worker 0 0d 3.1\n# programs\n11 program 0 0d 3.1\n\n";
        let parsed = parse_show_proc(text);
        assert_eq!(parsed.failed, Some(1));
        assert_eq!(parsed.workers, vec![p(10, 0, "3.1")]);
        assert_eq!(parsed.old_workers, vec![p(7, 2, "3.1"), p(8, 1, "3.1")]);
    }

    #[test]
    fn a_cut_answer_drops_its_last_line_and_says_so() {
        let cut = &SHOW_PROC_26[..SHOW_PROC_26.find("17183").map_or(0, |i| i + 18)];
        let parsed = parse_show_proc(cut);
        assert!(parsed.truncated);
        assert!(parsed.old_workers.is_empty());
        assert_eq!(parsed.workers.len(), 1);
        // Cut right after a line: the missing blank line still gives it away.
        let at_line = &SHOW_PROC_26[..SHOW_PROC_26.find("# old").unwrap_or(0)];
        assert!(parse_show_proc(at_line).truncated);
        // A cut worker pid must not pass for a whole one.
        let parsed = parse_show_proc("1 master 0 0d 2.6\n# workers\n172");
        assert!(parsed.workers.is_empty());
    }

    #[test]
    fn garbage_parses_to_nothing() {
        for text in [
            "",
            "\n\n",
            "Unknown command\n\n",
            "# workers\nfoo worker\n\n",
            "x\0y",
        ] {
            let parsed = parse_show_proc(text);
            assert_eq!(parsed.master, None);
            assert!(parsed.workers.is_empty(), "{text:?}");
        }
        assert!(parse_show_proc("").truncated);
        assert_eq!(
            parse_show_proc("# workers\n1 worker x 0d 2.6\n2 worker 4294967296 0d\n\n").workers,
            vec![]
        );
    }

    #[test]
    fn on_worker_prefixes_worker_commands_only() {
        assert_eq!(
            on_worker(42, "experimental-mode on; set var proc.ebb_draining int(1)"),
            "experimental-mode on; @!42 set var proc.ebb_draining int(1); quit"
        );
        assert_eq!(on_worker(42, "show info"), "@!42 show info; quit");
        assert_eq!(
            on_worker(
                7,
                "  expert-mode   on ;;  show  stat ;  ; operator;get var a  "
            ),
            "expert-mode   on; @!7 show  stat; operator; @!7 get var a; quit"
        );
        assert_eq!(
            on_worker(7, r"set map m k v\;w; show map m"),
            r"@!7 set map m k v\;w; @!7 show map m; quit"
        );
        assert_eq!(
            on_worker(7, r"x \\; y"),
            r"@!7 x \\; @!7 y; quit",
            "an escaped backslash does not escape the separator"
        );
        assert_eq!(on_worker(7, ""), "quit");
        assert_eq!(on_worker(7, " ; ;"), "quit");
        assert_eq!(
            on_worker(7, "user; show info; quit"),
            "user; @!7 show info; quit; quit"
        );
        assert_eq!(
            on_worker(7, "show info\nshow stat"),
            "@!7 show info; @!7 show stat; quit"
        );
        assert_eq!(on_worker(7, "@!8 show info"), "@!8 show info; quit");
    }

    #[test]
    fn reload_replies() {
        assert_eq!(
            reload_reply("Success=1\n--\n[NOTICE] loaded\n"),
            Some(Ok(()))
        );
        assert_eq!(
            reload_reply(
                "Success=0\n--\n[ALERT]    (1) : parsing [/x/h.cfg:16] : unknown keyword\n[WARNING]  (1) : Loading failure!\n\n"
            ),
            Some(Err(
                "[ALERT]    (1) : parsing [/x/h.cfg:16] : unknown keyword\n[WARNING]  (1) : Loading failure!".into()
            ))
        );
        assert_eq!(reload_reply("Success=0\n"), Some(Err(String::new())));
        assert_eq!(reload_reply(""), None);
        assert_eq!(reload_reply("\n"), None);
        assert_eq!(reload_reply("Unknown command\n\n"), None);
    }

    #[test]
    fn judges_reloads() {
        let before = list((1, 4), Some(0), &[10], &[9]);
        // The master has not re-exec'd yet, or its answer was cut off.
        assert_eq!(judge(&before, &before), Judgement::Pending);
        assert_eq!(judge(&before, &parse_show_proc("")), Judgement::Pending);
        // A new worker.
        assert_eq!(
            judge(&before, &list((1, 5), Some(0), &[11], &[10, 9])),
            Judgement::Succeeded(11)
        );
        // A worker listed before (old or current) is not new.
        assert_eq!(
            judge(&before, &list((1, 5), Some(0), &[9], &[10])),
            Judgement::Failed
        );
        // The count moved, no new worker.
        assert_eq!(
            judge(&before, &list((1, 5), Some(1), &[10], &[9])),
            Judgement::Failed
        );
        assert_eq!(
            judge(&before, &list((1, 5), None, &[10], &[9])),
            Judgement::Failed
        );
        // The failed count grew, whatever the reload count says.
        assert_eq!(
            judge(&before, &list((1, 4), Some(1), &[10], &[9])),
            Judgement::Failed
        );
        // A cut answer may hide the new worker.
        let mut cut = list((1, 5), Some(0), &[], &[]);
        cut.truncated = true;
        assert_eq!(judge(&before, &cut), Judgement::Pending);
        // Another master: its counts say nothing about this reload.
        assert_eq!(
            judge(&before, &list((2, 0), Some(0), &[10], &[])),
            Judgement::Pending
        );
        assert_eq!(
            judge(&before, &list((2, 0), Some(0), &[12], &[])),
            Judgement::Succeeded(12)
        );
    }

    #[test]
    fn master_errors_end_the_answer() {
        assert!(line_aborted(
            b"Can't find the target PID matching the prefix '@!99999'\n"
        ));
        assert!(line_aborted(b"Pid: 1\n\nPermission denied!\n"));
        assert!(
            !line_aborted(b"Can't find the target PID"),
            "not yet a whole line"
        );
        assert!(
            !line_aborted(b"Permission denied!\n\n"),
            "a worker's answer"
        );
        assert!(!line_aborted(b"Pid: 1\n"));
        assert!(!line_aborted(b""));
        let long = format!("{}\n", "x".repeat(1000));
        assert!(!line_aborted(long.as_bytes()));
    }

    #[test]
    fn refusals_are_found_per_answer() {
        assert_eq!(
            refusal("\nproc.x: type=sint value=<1>\n"),
            None,
            "set var answers nothing, get var its value"
        );
        assert_eq!(
            refusal("\nThis command is restricted to experimental mode only.\n\nok\n\n"),
            Some("This command is restricted to experimental mode only.")
        );
    }

    mod garbage {
        //! Whatever the master CLI answers (another program on the socket, a newer HAProxy, a cut
        //! answer) and whatever line a caller passes, these answer, and never panic.

        use proptest::prelude::*;

        use super::super::*;

        fn word() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("# workers".to_string()),
                Just("# old workers".to_string()),
                Just("# programs".to_string()),
                Just("#<PID>".to_string()),
                Just("master".to_string()),
                Just("worker".to_string()),
                Just("[failed:".to_string()),
                Just("1]".to_string()),
                Just("]".to_string()),
                Just("4294967296".to_string()),
                Just("12".to_string()),
                Just(";".to_string()),
                Just("\\".to_string()),
                Just("\\;".to_string()),
                Just("@!".to_string()),
                Just("experimental-mode".to_string()),
                Just("Success=0".to_string()),
                Just("--".to_string()),
                Just("\n".to_string()),
                Just(" ".to_string()),
                any::<char>().prop_map(String::from),
            ]
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::collection::vec(word(), 0..40).prop_map(|w| w.concat()),
                prop::collection::vec(any::<u8>(), 0..256)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            #[test]
            fn parsers_and_translation_never_panic(text in text(), pid in any::<u32>()) {
                let parsed = parse_show_proc(&text);
                prop_assert!(parsed.workers.len() + parsed.old_workers.len() <= text.lines().count());
                let _ = judge(&parsed, &parse_show_proc(&text));
                let _ = reload_reply(&text);
                let _ = refusal(&text);
                let _ = line_aborted(text.as_bytes());
                let line = on_worker(pid, &text);
                prop_assert!(line.ends_with("quit"));
            }
        }
    }
}
