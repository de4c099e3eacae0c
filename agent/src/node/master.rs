//! The master-worker half of the shell: what it does differently when HAProxy's master forks the
//! workers (`haproxy.mode = "master-worker"`). The node core is the same; only how a reload is
//! carried out, how the processes are found, and how an exit is judged change.
//!
//! - A reload is the master CLI's `reload`, answered once the new worker answers `@!<pid> show
//!   info` (HAProxy 2.7+ says `Success=0|1`; 2.6 says nothing, so `show proc` is compared).
//! - Where no worker runs: attached, wait for the service manager's master to have one; owned,
//!   start the master (`haproxy -W -db -S …`).
//! - The master is watched (`show proc`, at [`WATCH_INTERVAL`]): a worker it forked on its own
//!   (`systemctl reload haproxy`) or a new master goes to the core as a [`MasterView`].
//! - An old worker the master killed for `mworker-max-reloads` is judged forced, never clean.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tokio::process::Child;

use super::effect::MasterView;
use super::launcher::{self, ReloadError};
use crate::digest::sha256_hex;
use crate::haproxy::launch::{self, LaunchSpec};
use crate::haproxy::master::{MasterCli, MasterError, ProcList};
use crate::haproxy::procfs;
use crate::haproxy::worker::Worker;
use crate::record::{ProcessId, WorkerRecord};
use crate::reload::PushedConfig;

/// How often the master is asked what it runs, between the agent's own reloads.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// One exchange with the master CLI.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a start waits for the master CLI at first before building from nothing.
const FIRST_ASK: Duration = Duration::from_millis(500);

/// How the agent reaches the master, and what it may do to it.
#[derive(Debug, Clone)]
pub struct MasterSpec {
    pub cli: MasterCli,
    pub socket: PathBuf,
    /// ebb started the master and owns it (`manage_master = true`).
    pub owned: bool,
    pub launch: LaunchSpec,
    /// Where an owned master's output (and its workers') goes.
    pub log: PathBuf,
}

/// A worker the master runs, ready for the core.
#[derive(Debug)]
pub struct Ready {
    pub worker: Worker,
    /// The master, when this launch started it.
    pub started_master: Option<Child>,
    pub duration: Duration,
}

/// Makes the master run a new current worker: a reload through its CLI, or, where none runs, the
/// worker a master has (attached: waiting for the service manager's; owned: starting one).
pub async fn launch(
    spec: &MasterSpec,
    takeover: bool,
    pushed: Option<PushedConfig>,
) -> Result<Ready, ReloadError> {
    let started = Instant::now();
    let pushed_config = pushed.is_some();
    if let Some(pushed) = pushed {
        launcher::install_pushed(&spec.launch, pushed).await?;
    }
    let result = launch_installed(spec, takeover, started).await;
    if result.is_err() && pushed_config {
        launcher::restore(&spec.launch).await;
    }
    result
}

async fn launch_installed(
    spec: &MasterSpec,
    takeover: bool,
    started: Instant,
) -> Result<Ready, ReloadError> {
    let timeout = spec.launch.startup_timeout;
    let before = ask_first(spec).await;

    let (pid, started_master) = match before {
        Some(list) if takeover || list.workers.is_empty() => {
            (reload(spec, &list, timeout).await?, None)
        }
        Some(list) => (newest_answering(spec, &list).await?, None),
        None if spec.owned => {
            tracing::info!(
                "starting the haproxy master: {} -W -db -f {} -S {}",
                spec.launch.binary.display(),
                spec.launch.config.display(),
                spec.socket.display()
            );
            let child = launch::spawn_master(&spec.launch, &spec.socket, &spec.log)
                .map_err(|e| ReloadError::Master(e.to_string()))?;
            match wait_for_worker(spec, timeout).await {
                Ok(pid) => (pid, Some(child)),
                Err(e) => {
                    stop_child(child).await;
                    return Err(e);
                }
            }
        }
        None => (wait_for_worker(spec, timeout).await?, None),
    };
    let worker = track(spec, pid).map_err(ReloadError::Master)?;
    Ok(Ready {
        worker,
        started_master,
        duration: started.elapsed(),
    })
}

async fn reload(
    spec: &MasterSpec,
    before: &ProcList,
    timeout: Duration,
) -> Result<u32, ReloadError> {
    match spec.cli.reload(before, timeout).await {
        Ok(pid) => Ok(pid),
        Err(MasterError::ReloadFailed { logs, .. }) => {
            // HAProxy 2.6 does not say why: its own `-c` on the same file does.
            let why = match logs.filter(|l| !l.trim().is_empty()) {
                Some(logs) => logs,
                None => launch::check_config(
                    &spec.launch.binary,
                    &spec.launch.config,
                    &spec.launch.env,
                    spec.launch.check_timeout,
                )
                .await
                .err()
                .unwrap_or_else(|| "the master reported a failed reload".into()),
            };
            Err(ReloadError::Master(format!(
                "haproxy master refused the reload of {}: {why}",
                spec.launch.config.display()
            )))
        }
        Err(e) => Err(ReloadError::Master(e.to_string())),
    }
}

/// `show proc`, when a master may be there: not at all when its socket does not exist (an owned
/// master not started yet), and for at most [`FIRST_ASK`] otherwise.
async fn ask_first(spec: &MasterSpec) -> Option<ProcList> {
    if !spec.socket.exists() {
        return None;
    }
    match tokio::time::timeout(FIRST_ASK, spec.cli.show_proc()).await {
        Ok(Ok(list)) if list.master.is_some() => Some(list),
        _ => None,
    }
}

/// The newest current worker that answers.
async fn newest_answering(spec: &MasterSpec, list: &ProcList) -> Result<u32, ReloadError> {
    let mut pids: Vec<u32> = list.workers.iter().map(|p| p.pid).collect();
    pids.sort_by_key(|&pid| std::cmp::Reverse(procfs::start_time(pid).unwrap_or(0)));
    for pid in pids {
        if spec.cli.show_info(pid).await.is_ok() {
            return Ok(pid);
        }
    }
    Err(ReloadError::Master(format!(
        "haproxy master on {}: no worker answers `show info`",
        spec.socket.display()
    )))
}

/// Waits until a master answers with a worker that answers.
async fn wait_for_worker(spec: &MasterSpec, timeout: Duration) -> Result<u32, ReloadError> {
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(5);
    loop {
        let last;
        match spec.cli.show_proc().await {
            Ok(list) if !list.workers.is_empty() => match newest_answering(spec, &list).await {
                Ok(pid) => return Ok(pid),
                Err(e) => last = e.to_string(),
            },
            Ok(_) => last = "the master runs no worker".into(),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() + wait > deadline {
            let fix = if spec.owned {
                "see the master's output in ".to_string() + &spec.log.display().to_string()
            } else {
                "is the service that runs it up? (systemctl status haproxy); its `-S` must name \
                 this socket with level admin"
                    .to_string()
            };
            return Err(ReloadError::Master(format!(
                "no haproxy master with a worker answered on {} within {}: {last}; {fix}",
                spec.socket.display(),
                humantime::format_duration(timeout)
            )));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(200));
    }
}

/// How long the exit of the current worker waits for the master to show its successor.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(1);

/// What the master says after the current worker `pid` exited: once it lists another worker (it
/// reloaded on its own, and stopped `pid` for it), or it lists none while its reload count stands
/// still (`pid` died), or after [`SUCCESSOR_WAIT`]. The master is re-executing at such a moment:
/// its CLI refuses connections, then shows the new worker a few ms after it forked it.
pub async fn successor(cli: &MasterCli, pid: u32) -> Option<ProcList> {
    let deadline = Instant::now() + SUCCESSOR_WAIT;
    let mut first_reloads = None;
    let mut last = None;
    loop {
        if let Ok(list) = cli.show_proc().await {
            let reloads = list.master.as_ref().map(|m| m.reloads);
            let first = *first_reloads.get_or_insert(reloads);
            let other = list.workers.iter().any(|p| p.pid != pid);
            let died = list.workers.is_empty() && reloads == first && last.is_some();
            if other || died {
                return Some(list);
            }
            last = Some(list);
        }
        if Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the master says after an old worker exited. The master may be re-executing then (it
/// kills workers past `mworker-max-reloads` as a reload ends): asked again until it answers, for
/// up to [`SUCCESSOR_WAIT`], as its reload count is what judges the exit.
pub async fn after_exit(cli: &MasterCli) -> Option<ProcList> {
    let deadline = Instant::now() + SUCCESSOR_WAIT;
    loop {
        match cli.show_proc().await {
            Ok(list) if list.master.is_some() => return Some(list),
            _ if Instant::now() >= deadline => return None,
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn stop_child(mut child: Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Takes hold of a worker (or the master) the master CLI named: its pidfd, checked against its
/// start time, so a later signal or exit can only be this process's.
pub fn track(spec: &MasterSpec, pid: u32) -> Result<Worker, String> {
    let config_sha256 = std::fs::read(&spec.launch.config)
        .map(|b| sha256_hex(&b))
        .unwrap_or_default();
    hold(pid, spec.log.clone(), config_sha256)
}

fn hold(pid: u32, log: PathBuf, config_sha256: String) -> Result<Worker, String> {
    let start_time = procfs::start_time(pid)
        .map_err(|e| format!("haproxy process {pid} named by the master is gone: {e}"))?;
    let record = WorkerRecord {
        id: ProcessId { pid, start_time },
        started_at_ms: crate::drain::unix_ms(SystemTime::now()),
        log,
        config_sha256,
    };
    Worker::adopt(&record).map_err(|e| e.to_string())
}

/// What a start finds: the master's processes, each held by its pidfd. `None` when no master
/// answers (the first launch then waits for one, or starts it).
pub async fn find(spec: &MasterSpec) -> Option<Found> {
    let list = ask_first(spec).await?;
    let master = list.master.as_ref()?;
    let master_handle = hold(master.pid, spec.log.clone(), String::new()).ok()?;
    let config_sha256 = std::fs::read(&spec.launch.config)
        .map(|b| sha256_hex(&b))
        .unwrap_or_default();
    let mut workers = Vec::new();
    let newest_current = list
        .workers
        .iter()
        .map(|p| p.pid)
        .max_by_key(|&pid| procfs::start_time(pid).unwrap_or(0));
    for p in list.workers.iter().chain(list.old_workers.iter()) {
        match hold(p.pid, spec.log.clone(), config_sha256.clone()) {
            Ok(w) => workers.push((w, Some(p.pid) == newest_current)),
            Err(e) => tracing::info!("not adopted: {e}"),
        }
    }
    Some(Found {
        version: master.version.clone(),
        master: master_handle,
        workers,
        answering: list.workers.iter().map(|p| p.pid).collect(),
        list,
    })
}

pub struct Found {
    pub master: Worker,
    pub version: String,
    /// Each worker's handle, and whether it is the master's newest current worker.
    pub workers: Vec<(Worker, bool)>,
    /// The pids under `# workers`.
    pub answering: Vec<u32>,
    pub list: ProcList,
}

/// The shell's memory of the master: its handle, and what it needs to judge an old worker's
/// exit. Facts about the node stay in the core; these are facts about HAProxy's processes.
#[derive(Debug, Default)]
pub struct Watch {
    pub master: Option<Worker>,
    /// An owned master's process, reaped by the task that waits on it.
    pub owned_exit: Option<tokio::task::JoinHandle<()>>,
    /// The master's reload count when each worker was born (its count minus the reloads the
    /// worker survived): how many reloads it has survived since is how `mworker-max-reloads`
    /// judges it.
    born: HashMap<u32, u32>,
    master_reloads: u32,
    last: Option<ProcList>,
}

impl Watch {
    /// Learns from a `show proc`. Returns the view for the core when the master or its newest
    /// worker changed since the last one.
    pub fn learn(&mut self, spec: &MasterSpec, list: ProcList) -> Option<MasterView> {
        let master = list.master.clone()?;
        self.note_births(&list);
        let changed = self.last.as_ref().is_none_or(|l| {
            l.master.as_ref().map(|m| m.pid) != Some(master.pid) || l.workers != list.workers
        });
        self.last = Some(list.clone());
        if !changed {
            return None;
        }
        if self.master.as_ref().map(Worker::pid) != Some(master.pid) {
            match hold(master.pid, spec.log.clone(), String::new()) {
                Ok(handle) => self.master = Some(handle),
                Err(e) => {
                    tracing::warn!("{e}");
                    return None;
                }
            }
        }
        let master_id = self.master.as_ref()?.id;
        let newest = list
            .workers
            .iter()
            .map(|p| p.pid)
            .max_by_key(|&pid| procfs::start_time(pid).unwrap_or(0));
        let current = newest
            .and_then(|pid| track(spec, pid).ok())
            .map(|w| w.record());
        Some(MasterView {
            master: master_id,
            version: master.version,
            current,
        })
    }

    /// Remembers when each worker was born, in the master's reloads.
    fn note_births(&mut self, list: &ProcList) {
        let Some(master) = &list.master else { return };
        self.master_reloads = master.reloads;
        for p in list.workers.iter().chain(list.old_workers.iter()) {
            self.born
                .entry(p.pid)
                .or_insert(master.reloads.saturating_sub(p.reloads));
        }
    }

    /// Whether the master killed this old worker for surviving more than `mworker-max-reloads`
    /// reloads. `reloads_now` is the master's reload count read after the exit.
    pub fn killed_by_max_reloads(
        &mut self,
        pid: u32,
        max_reloads: Option<u32>,
        reloads_now: Option<u32>,
    ) -> bool {
        let born = self.born.remove(&pid);
        let now = reloads_now
            .unwrap_or(self.master_reloads)
            .max(self.master_reloads);
        match (max_reloads, born) {
            (Some(max), Some(born)) => now.saturating_sub(born) > max,
            _ => false,
        }
    }

    pub fn forget_last(&mut self) {
        self.last = None;
    }
}

/// What the config's global section says about forced exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForcedExits {
    /// `mworker-max-reloads`: the master kills a worker that outlived this many reloads.
    pub max_reloads: Option<u32>,
    /// `hard-stop-after`: a stopping worker is cut this long after it was told to stop.
    pub hard_stop_after: Option<Duration>,
}

impl ForcedExits {
    /// Read from the config as it is now (it may have changed since the agent started).
    pub async fn read(config: &Path) -> ForcedExits {
        let text = tokio::fs::read_to_string(config).await.unwrap_or_default();
        ForcedExits::parse(&text)
    }

    pub fn parse(text: &str) -> ForcedExits {
        ForcedExits {
            max_reloads: global_value(text, "mworker-max-reloads").and_then(|n| n.parse().ok()),
            hard_stop_after: global_value(text, "hard-stop-after").and_then(|t| haproxy_time(&t)),
        }
    }
}

/// The last value of `keyword` in the global section.
fn global_value(text: &str, keyword: &str) -> Option<String> {
    let mut in_global = false;
    let mut found = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let indented = line.starts_with(char::is_whitespace);
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if !indented {
            in_global = first == "global";
            continue;
        }
        if in_global && first == keyword {
            found = words.next().map(str::to_string);
        }
    }
    found
}

/// HAProxy's time format: a number, then `us`, `ms`, `s`, `m`, `h` or `d` (milliseconds without).
fn haproxy_time(text: &str) -> Option<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let per = match unit {
        "us" => return Some(Duration::from_micros(n)),
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(per).map(Duration::from_millis)
}

/// Whether an old worker's exit was a `hard-stop-after` cut, when its log cannot be read (a
/// master a service manager runs writes to the journal): it held connections at the last count
/// that found any, and it lived about `hard-stop-after` past its displacement. A worker whose
/// last connection ended exits by itself then, so only one whose connection ended within the
/// slack below of the limit could be taken for a cut one.
pub fn cut_by_hard_stop(limits: ForcedExits, held: u64, stopping_for: Option<Duration>) -> bool {
    // The agent sees a worker become old once the reload that displaced it answered, a little
    // after the master told it to stop: a tenth of the limit (at least 100 ms) covers that.
    match (limits.hard_stop_after, stopping_for) {
        (Some(after), Some(stopping)) => {
            let slack = (after / 10).max(Duration::from_millis(100));
            held > 0 && stopping + slack >= after
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::haproxy::master::Proc;

    fn list(master_reloads: u32, workers: &[(u32, u32)], old: &[(u32, u32)]) -> ProcList {
        let proc = |&(pid, reloads): &(u32, u32)| Proc {
            pid,
            reloads,
            version: "2.6.12".into(),
        };
        ProcList {
            master: Some(Proc {
                pid: 1,
                reloads: master_reloads,
                version: "2.6.12".into(),
            }),
            failed: Some(0),
            workers: workers.iter().map(proc).collect(),
            old_workers: old.iter().map(proc).collect(),
            truncated: false,
        }
    }

    #[test]
    fn a_worker_killed_past_mworker_max_reloads_is_forced_never_clean() {
        let mut w = Watch::default();
        // Born at master reload 3; survives reloads 4 and 5; killed at 6 with max 2.
        w.born.insert(10, 3);
        w.master_reloads = 5;
        assert!(w.killed_by_max_reloads(10, Some(2), Some(6)));
        w.born.insert(11, 3);
        assert!(!w.killed_by_max_reloads(11, Some(2), Some(5)));
        w.born.insert(12, 0);
        assert!(!w.killed_by_max_reloads(12, None, Some(50)));
    }

    #[test]
    fn birth_comes_from_the_master_count_minus_the_reloads_survived() {
        let mut w = Watch::default();
        // Worker 10 was current at master reload 3 and survived reloads 4 and 5.
        w.note_births(&list(5, &[(20, 0)], &[(10, 2)]));
        assert_eq!(w.born.get(&10), Some(&3));
        assert_eq!(w.born.get(&20), Some(&5));
        // Its birth does not move when later lists count more reloads.
        w.note_births(&list(6, &[(30, 0)], &[(20, 1), (10, 3)]));
        assert_eq!(w.born.get(&10), Some(&3));
        // The master killed it at reload 6 with mworker-max-reloads 2: forced.
        assert!(w.killed_by_max_reloads(10, Some(2), None));
        assert!(!w.killed_by_max_reloads(20, Some(2), None));
    }

    #[test]
    fn reads_the_forced_exit_limits_from_global_only() {
        let limits = ForcedExits::parse(
            "global\n    mworker-max-reloads 2 # comment\n    hard-stop-after 30s\ndefaults\n    mode http\n",
        );
        assert_eq!(limits.max_reloads, Some(2));
        assert_eq!(limits.hard_stop_after, Some(Duration::from_secs(30)));
        let limits =
            ForcedExits::parse("defaults\n    mworker-max-reloads 2\n    hard-stop-after 1s\n");
        assert_eq!(limits, ForcedExits::default());
        for (text, want) in [
            ("500", Some(Duration::from_millis(500))),
            ("250ms", Some(Duration::from_millis(250))),
            ("2m", Some(Duration::from_secs(120))),
            ("1d", Some(Duration::from_secs(86_400))),
            ("10us", Some(Duration::from_micros(10))),
            ("5x", None),
            ("", None),
            ("s", None),
        ] {
            assert_eq!(haproxy_time(text), want, "{text:?}");
        }
    }

    #[test]
    fn a_worker_still_holding_connections_past_hard_stop_after_was_cut() {
        let limits = ForcedExits {
            max_reloads: None,
            hard_stop_after: Some(Duration::from_secs(1)),
        };
        assert!(cut_by_hard_stop(
            limits,
            1,
            Some(Duration::from_millis(1_050))
        ));
        assert!(
            !cut_by_hard_stop(limits, 0, Some(Duration::from_secs(5))),
            "idle: it left"
        );
        assert!(
            cut_by_hard_stop(limits, 1, Some(Duration::from_millis(950))),
            "seen late"
        );
        assert!(
            !cut_by_hard_stop(limits, 2, Some(Duration::from_millis(400))),
            "too early"
        );
        assert!(!cut_by_hard_stop(
            ForcedExits::default(),
            2,
            Some(Duration::from_secs(9))
        ));
    }
}
