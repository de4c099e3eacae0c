//! The samplers: background services that read how busy the workers are and report the numbers
//! to the node, so the node's task never waits on HAProxy or /proc.
//!
//! - [`Sampler`] polls the current worker's stats while a drain needs them.
//! - [`ConnectionCounter`] counts the old workers' client connections from /proc, for `status`
//!   and the `max_old_workers` refusal.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub use super::effect::Sample;
use crate::config::{DrainConfig, IdleRule};
use crate::haproxy::admin::{RowKind, StatRow, StatRows};
use crate::haproxy::master::MasterCli;
use crate::haproxy::procfs;
use crate::haproxy::worker_cli::WorkerCli;

/// How often the old workers' connections are recounted while there are old workers.
pub const COUNT_INTERVAL: Duration = Duration::from_secs(1);

/// Which workers to count, and the ports that tell their client connections from server ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counting {
    pub pids: Vec<u32>,
    pub client_ports: HashSet<u16>,
}

/// Counts old workers' connections: at once when the set of old workers changes, then every
/// [`COUNT_INTERVAL`]. The scan reads /proc (each worker's fds and the TCP tables, milliseconds
/// on a busy host), so it runs on the blocking pool, never on the request path of `status`.
pub struct ConnectionCounter {
    target: watch::Sender<Counting>,
}

impl ConnectionCounter {
    /// Starts the service; `report` gets each count and returns false once nobody listens.
    /// In master-worker mode (`master`), each old worker counts its own (`@!<pid> show info`).
    pub fn spawn(
        master: Option<MasterCli>,
        report: impl Fn(HashMap<u32, u64>) -> bool + Send + 'static,
    ) -> ConnectionCounter {
        let (target, rx) = watch::channel(Counting::default());
        tokio::spawn(count(master, rx, report));
        ConnectionCounter { target }
    }

    pub fn target(&self, counting: Counting) {
        self.target
            .send_if_modified(|t| std::mem::replace(t, counting.clone()) != counting);
    }
}

/// The client connections of `counting.pids`: from /proc on the blocking pool, or, in
/// master-worker mode, each worker's `CurrConns` through the master CLI, one short connection at
/// a time (a session held open to an old worker would delay its exit).
pub async fn count_connections(
    master: Option<&MasterCli>,
    counting: Counting,
) -> HashMap<u32, u64> {
    let Some(cli) = master else {
        return tokio::task::spawn_blocking(move || {
            procfs::client_connections_of(&counting.pids, &counting.client_ports)
        })
        .await
        .unwrap_or_default();
    };
    let mut counts = HashMap::new();
    let mut unanswered = Vec::new();
    for &pid in &counting.pids {
        match cli.connections(pid).await {
            Ok(n) => {
                counts.insert(pid, n);
            }
            Err(_) => unanswered.push(pid),
        }
    }
    // The master refuses connections while it re-executes (a reload): those workers are counted
    // from /proc instead, so a count is never simply missing.
    if !unanswered.is_empty() {
        let ports = counting.client_ports;
        let found =
            tokio::task::spawn_blocking(move || procfs::client_connections_of(&unanswered, &ports))
                .await
                .unwrap_or_default();
        counts.extend(found);
    }
    counts
}

async fn count(
    master: Option<MasterCli>,
    mut target: watch::Receiver<Counting>,
    report: impl Fn(HashMap<u32, u64>) -> bool,
) {
    loop {
        let counting = target.borrow_and_update().clone();
        let idle = counting.pids.is_empty();
        let counts = if idle {
            HashMap::new()
        } else {
            count_connections(master.as_ref(), counting).await
        };
        if !report(counts) {
            return;
        }
        if idle {
            if target.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(COUNT_INTERVAL) => {}
            changed = target.changed() => if changed.is_err() { return },
        }
    }
}

/// The running sampler. Dropping it (or the node's end of `target`) stops it.
pub struct Sampler {
    target: watch::Sender<Option<u32>>,
}

impl Sampler {
    /// Starts the service; it samples nothing until [`Sampler::target`] names a worker.
    pub fn spawn(admin: WorkerCli, cfg: DrainConfig, samples: mpsc::Sender<Sample>) -> Sampler {
        let (target, rx) = watch::channel(None);
        tokio::spawn(run(admin, cfg, rx, samples));
        Sampler { target }
    }

    /// Samples worker `pid` from now on (`None`: stop sampling).
    pub fn target(&self, pid: Option<u32>) {
        self.target
            .send_if_modified(|t| std::mem::replace(t, pid) != pid);
    }
}

async fn run(
    admin: WorkerCli,
    cfg: DrainConfig,
    mut target: watch::Receiver<Option<u32>>,
    samples: mpsc::Sender<Sample>,
) {
    // Fixed for the agent's life: the drain settings are read once, at start.
    let rows = sample_rows(&cfg);
    loop {
        let pid = *target.borrow_and_update();
        let Some(pid) = pid else {
            if target.changed().await.is_err() {
                return;
            }
            continue;
        };
        match admin.sample(pid, rows).await {
            Ok((info, read)) => {
                let sample = read_sample(&cfg, pid, &info, rows, read.as_deref());
                // A full channel means the node is behind: this sample would be stale anyway.
                match samples.try_send(sample) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            Err(e) => tracing::debug!(pid, "stats sample failed: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.poll_interval.0) => {}
            changed = target.changed() => if changed.is_err() { return },
        }
    }
}

/// The `show stat` rows a drain sample reads, from the drain settings alone. The sampler polls
/// every `poll_interval` for as long as a drain runs, so every row asked for here is built by
/// HAProxy and parsed by ebb up to 100 times a second; on a config with thousands of servers a full
/// `show stat` is a large CSV. So:
///
/// - `connections` with no ignored frontends reads `CurrConns` from `show info`: no rows.
/// - `connections` with ignored frontends sums the other frontends' `scur`: frontend rows.
/// - `sessions` sums `scur + qcur` over backends: backend rows.
/// - `quiet_period` needs the connections the frontends accepted: frontend rows. `show info`'s
///   `CumConns` cannot stand in for them: it counts the CLI's own connections, the sampler's
///   included (HAProxy 2.6 and 2.8), so it grows at every poll.
///
/// Server rows are never read: no rule needs them.
pub fn sample_rows(cfg: &DrainConfig) -> StatRows {
    let connections_by_frontend =
        cfg.idle == IdleRule::Connections && !cfg.ignore_frontends.is_empty();
    StatRows {
        frontends: connections_by_frontend || !cfg.quiet_period.is_zero(),
        backends: cfg.idle == IdleRule::Sessions,
    }
}

/// The sample of worker `pid` from its `show info` and the rows read for `asked` (`None`: none
/// asked for, or none readable). Rows that were asked for and could not be read make the busy
/// count unknown, which holds the drain: an unreadable answer is never an idle worker.
pub fn read_sample(
    cfg: &DrainConfig,
    pid: u32,
    info: &str,
    asked: StatRows,
    rows: Option<&[StatRow]>,
) -> Sample {
    let Some(rows) = rows.or(asked.is_empty().then_some(&[][..])) else {
        return Sample {
            pid,
            busy: None,
            accepted: 0,
        };
    };
    Sample {
        pid,
        busy: busy_count(cfg.idle, &cfg.ignore_frontends, info, rows),
        accepted: accepted_total(&cfg.ignore_frontends, rows),
    }
}

/// The current worker's busy count by the idle rule, from `show info` and the rows of
/// [`sample_rows`].
///
/// - `connections`: `CurrConns` (the CLI's own connections are not in it), or, when frontends are
///   ignored, the sum of `scur` over the other FRONTEND rows.
/// - `sessions`: the sum of `scur + qcur` over BACKEND rows (server rows miss the backend queue).
pub fn busy_count(
    rule: IdleRule,
    ignore_frontends: &[String],
    info: &str,
    rows: &[StatRow],
) -> Option<u64> {
    match rule {
        IdleRule::Connections if ignore_frontends.is_empty() => info
            .lines()
            .find_map(|l| l.strip_prefix("CurrConns:"))
            .and_then(|v| v.trim().parse().ok()),
        IdleRule::Connections => Some(
            rows.iter()
                .filter(|r| r.kind == RowKind::Frontend && !ignore_frontends.contains(&r.proxy))
                .map(|r| r.scur)
                .sum(),
        ),
        IdleRule::Sessions => Some(
            rows.iter()
                .filter(|r| r.kind == RowKind::Backend)
                .map(|r| r.scur + r.qcur)
                .sum(),
        ),
    }
}

/// Total connections accepted by the watched frontends, for `quiet_period` (0 when no frontend
/// rows were read: without `quiet_period` nobody looks at it).
pub fn accepted_total(ignore_frontends: &[String], rows: &[StatRow]) -> u64 {
    rows.iter()
        .filter(|r| r.kind == RowKind::Frontend && !ignore_frontends.contains(&r.proxy))
        .map(|r| r.stot)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_counts_by_rule() {
        let row = |proxy: &str, kind, scur, qcur, stot| StatRow {
            proxy: proxy.into(),
            kind,
            scur,
            qcur,
            stot,
        };
        let rows = vec![
            row("web", RowKind::Frontend, 2, 0, 10),
            row("stats", RowKind::Frontend, 1, 0, 5),
            row("app", RowKind::Backend, 1, 2, 9),
            row("app", RowKind::Server, 1, 0, 9),
        ];
        let info = "Name: HAProxy\nCurrConns: 3\n";
        assert_eq!(busy_count(IdleRule::Connections, &[], info, &rows), Some(3));
        assert_eq!(
            busy_count(IdleRule::Connections, &["stats".into()], info, &rows),
            Some(2)
        );
        assert_eq!(busy_count(IdleRule::Sessions, &[], info, &rows), Some(3));
        assert_eq!(
            busy_count(IdleRule::Connections, &[], "garbage", &rows),
            None
        );
        assert_eq!(accepted_total(&["stats".into()], &rows), 10);
    }

    fn drain(idle: IdleRule, ignore: &[&str], quiet_ms: u64) -> DrainConfig {
        DrainConfig {
            idle,
            ignore_frontends: ignore.iter().map(|f| f.to_string()).collect(),
            quiet_period: crate::config::Dur::ms(quiet_ms),
            ..DrainConfig::default()
        }
    }

    const FRONTENDS: StatRows = StatRows {
        frontends: true,
        backends: false,
    };
    const BACKENDS: StatRows = StatRows {
        frontends: false,
        backends: true,
    };

    #[test]
    fn the_connections_rule_never_reads_server_rows() {
        // The default drain: `CurrConns` from `show info` is all it needs, so no `show stat` at all.
        assert_eq!(sample_rows(&DrainConfig::default()), StatRows::NONE);
        assert_eq!(
            sample_rows(&drain(IdleRule::Connections, &[], 0)),
            StatRows::NONE
        );
    }

    #[test]
    fn no_drain_setting_ever_reads_server_rows() {
        for idle in [IdleRule::Connections, IdleRule::Sessions] {
            for ignore in [&[][..], &["stats"][..]] {
                for quiet in [0, 1000] {
                    let rows = sample_rows(&drain(idle, ignore, quiet));
                    assert_eq!(rows.types() & 4, 0, "{idle:?} {ignore:?} {quiet}");
                    if let Some(command) = rows.command() {
                        assert!(command.starts_with("show stat -1 "), "{command}");
                    }
                }
            }
        }
    }

    #[test]
    fn ignored_frontends_are_subtracted_from_frontend_rows_not_read_from_show_info() {
        // `CurrConns` counts the ignored frontends' connections too: with them ignored, the rule
        // must read the frontend rows, or a stats scraper would hold every drain.
        assert_eq!(
            sample_rows(&drain(IdleRule::Connections, &["stats"], 0)),
            FRONTENDS
        );
    }

    #[test]
    fn the_sessions_rule_reads_backend_rows_only() {
        assert_eq!(sample_rows(&drain(IdleRule::Sessions, &[], 0)), BACKENDS);
        // Ignored frontends change nothing for `sessions`: it never looks at frontends.
        assert_eq!(
            sample_rows(&drain(IdleRule::Sessions, &["stats"], 0)),
            BACKENDS
        );
    }

    #[test]
    fn quiet_period_reads_frontend_rows_because_cumconns_counts_the_cli() {
        assert_eq!(
            sample_rows(&drain(IdleRule::Connections, &[], 1000)),
            FRONTENDS
        );
        assert_eq!(
            sample_rows(&drain(IdleRule::Sessions, &[], 1000)),
            StatRows {
                frontends: true,
                backends: true
            }
        );
    }

    #[test]
    fn an_unreadable_stat_answer_never_reads_as_idle() {
        let info = "Pid: 7\nCurrConns: 0\n";
        for cfg in [
            drain(IdleRule::Connections, &["stats"], 0),
            drain(IdleRule::Sessions, &[], 0),
            drain(IdleRule::Connections, &[], 1000),
        ] {
            let asked = sample_rows(&cfg);
            let sample = read_sample(&cfg, 7, info, asked, None);
            assert_eq!(sample.busy, None, "{cfg:?}");
            // The same answer with rows is read.
            let sample = read_sample(&cfg, 7, info, asked, Some(&[]));
            assert_eq!(sample.busy, Some(0), "{cfg:?}");
        }
        // `show info` alone is read from `show info`.
        let cfg = DrainConfig::default();
        let sample = read_sample(&cfg, 7, info, StatRows::NONE, None);
        assert_eq!((sample.pid, sample.busy, sample.accepted), (7, Some(0), 0));
    }
}
