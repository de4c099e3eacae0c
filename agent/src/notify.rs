//! systemd's notify protocol (`Type=notify`): `READY=1` once the node serves, `STATUS=` with the
//! node's state and what blocks its drain, `WATCHDOG=1` only while the node's loop answers, and
//! `STOPPING=1` when the agent begins to exit.
//!
//! Without `NOTIFY_SOCKET` in the environment nothing here runs: no task, no socket.
//!
//! What to send is decided by pure code ([`status_text`], [`Notices`]); the socket I/O is a
//! non-blocking datagram send. Not `sd_notify::notify`: its socket blocks once the receiver's
//! queue is full (`net.unix.max_dgram_qlen`, 10 on many systems), which would block a runtime
//! thread, and the runtime's shutdown with it, whenever the service manager falls behind. A
//! notification that cannot go out at once is dropped: a late watchdog ping is worth nothing.

use std::fmt::Write as _;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ebb_sdk::reply::Reply;
use ebb_sdk::status::{Blocker, NodeState, StatusResult};
use sd_notify::NotifyState;
use tokio::sync::{mpsc, watch};

use crate::inbox::{ask_status, Input, Summary};

/// How often `STATUS=` is refreshed from the node when systemd runs no watchdog: blockers change
/// during a drain without the state changing.
pub const STATUS_REFRESH: Duration = Duration::from_secs(15);

/// The longest `STATUS=` text sent; systemd shows it on one line of `systemctl status`.
const STATUS_MAX: usize = 200;

/// A connection to the service manager's notify socket (`NOTIFY_SOCKET`).
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    failed_once: AtomicBool,
}

impl Notifier {
    /// The notifier systemd asked for, or `None` when `NOTIFY_SOCKET` is unset (or unusable,
    /// logged at debug: a missing service manager is not the agent's failure).
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        match Notifier::connect(&path) {
            Ok(notifier) => Some(notifier),
            Err(e) => {
                tracing::debug!(
                    "NOTIFY_SOCKET={}: cannot use it ({e}); systemd gets no notifications",
                    path.to_string_lossy()
                );
                None
            }
        }
    }

    fn connect(path: &std::ffi::OsStr) -> io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_bytes();
        let address = match bytes.strip_prefix(b"@") {
            // systemd's user managers may use the abstract namespace.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(path)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            socket,
            address,
            failed_once: AtomicBool::new(false),
        })
    }

    /// Sends `states` in one datagram. A failure is logged once, at debug, and otherwise
    /// ignored: systemd gone, or behind, is not a reason to stop serving.
    pub fn send(&self, states: &[NotifyState<'_>]) {
        let mut message = String::new();
        for state in states {
            let _ = writeln!(message, "{state}");
        }
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.address) {
            if !self.failed_once.swap(true, Ordering::Relaxed) {
                tracing::debug!(
                    "cannot notify systemd ({e}); this and later notifications are dropped \
                     silently (message: {:?})",
                    message.trim_end()
                );
            }
        }
    }

    /// `STOPPING=1`: the agent begins to exit.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }
}

/// Starts telling systemd about the node, if it asked (`NOTIFY_SOCKET`): `READY=1` once the node
/// has left `starting` (adoption or first start done; call this once `Shell::start` returned),
/// `STATUS=` on every change of `summary` and every probe, and `WATCHDOG=1` after each probe the
/// node answered while systemd runs a watchdog for this process (`WATCHDOG_USEC`,
/// `WATCHDOG_PID`). The task ends with the node (its summary sender dropped).
pub fn spawn(inputs: mpsc::Sender<Input>, summary: watch::Receiver<Summary>) {
    let Some(notifier) = Notifier::from_env() else {
        return;
    };
    let watchdog = sd_notify::watchdog_enabled();
    tokio::spawn(run(notifier, watchdog, inputs, summary));
}

async fn run(
    notifier: Notifier,
    watchdog: Option<Duration>,
    inputs: mpsc::Sender<Input>,
    mut summary: watch::Receiver<Summary>,
) {
    let period = probe_period(watchdog);
    if let Some(timeout) = watchdog {
        tracing::info!(
            "systemd watchdog: {timeout:?}; the node is asked for its status every {period:?}"
        );
    }
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut notices = Notices::default();
    loop {
        let ping_due = tokio::select! {
            _ = ticks.tick() => watchdog.is_some(),
            changed = summary.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
        };
        // Bounded by the period, so that one probe never overlaps the next tick's.
        let answer = ask_status(&inputs, period).await;
        let current = summary.borrow_and_update().clone();
        for notice in notices.after_probe(answer.as_ref(), ping_due, &current) {
            match notice {
                Notice::Ready => notifier.send(&[NotifyState::Ready]),
                Notice::Status(text) => notifier.send(&[NotifyState::Status(&text)]),
                Notice::Ping => notifier.send(&[NotifyState::Watchdog]),
            }
        }
    }
}

/// How often the node is probed: half the watchdog timeout (as sd_watchdog_enabled(3)
/// recommends), so one late answer still leaves time for the next; [`STATUS_REFRESH`] without a
/// watchdog. Never zero (`WATCHDOG_USEC=0` or 1 would make a busy loop).
pub fn probe_period(watchdog: Option<Duration>) -> Duration {
    match watchdog {
        Some(timeout) => (timeout / 2).max(Duration::from_millis(1)),
        None => STATUS_REFRESH,
    }
}

/// One notification to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `READY=1`.
    Ready,
    /// `STATUS=<text>`.
    Status(String),
    /// `WATCHDOG=1`.
    Ping,
}

/// What has been said already: `READY=1` goes out once, `STATUS=` only when it changed.
#[derive(Debug, Default)]
pub struct Notices {
    ready: bool,
    last_status: Option<String>,
}

impl Notices {
    /// What to send after a status probe. `answer` is the node's reply, `None` when it did not
    /// answer in time; `ping_due` says whether this probe was the watchdog's. Any reply (even an
    /// error) proves the node's loop turns, so it earns the ping; no reply earns none, and the
    /// status then falls back to the last `summary` the node published. `READY=1` comes first,
    /// once the node is past `starting`: its first worker serves (or its start failed and is
    /// retried, which `STATUS=` says), or adoption found the workers.
    pub fn after_probe(
        &mut self,
        answer: Option<&Reply>,
        ping_due: bool,
        summary: &Summary,
    ) -> Vec<Notice> {
        let status = answer.and_then(status_of);
        let state = status.as_ref().map_or(summary.state, |s| s.state);
        let text = match (&status, answer) {
            (Some(status), _) => status_text(status),
            (None, answered) => summary_text(summary, answered.is_some()),
        };
        let mut out = Vec::new();
        if !self.ready && state != NodeState::Starting {
            self.ready = true;
            out.push(Notice::Ready);
        }
        if self.last_status.as_deref() != Some(text.as_str()) {
            self.last_status = Some(text.clone());
            out.push(Notice::Status(text));
        }
        if ping_due && answer.is_some() {
            out.push(Notice::Ping);
        }
        out
    }
}

/// The status result in a reply, if it is one.
fn status_of(reply: &Reply) -> Option<StatusResult> {
    if !reply.ok {
        return None;
    }
    serde_json::from_value(reply.result.clone()?).ok()
}

/// `STATUS=` from a status result: the state, the drain's id, and what blocks it (or the old
/// workers still finishing, outside a drain). Short and on one line, e.g.
/// `draining (drain d-42): blocked by old_workers=1, plugin alb`.
pub fn status_text(status: &StatusResult) -> String {
    let mut text = String::from(status.state.as_str());
    if let Some(drain) = &status.drain {
        let _ = write!(text, " (drain {})", drain.drain_id);
        let blockers = blockers_text(&drain.blockers);
        if status.state == NodeState::Draining && !blockers.is_empty() {
            let _ = write!(text, ": blocked by {blockers}");
        }
    } else if !status.old_workers.is_empty() {
        let _ = write!(text, ": old_workers={}", status.old_workers.len());
    }
    one_line(text)
}

/// `STATUS=` from what the node last published, when its answer had no status in it (or, with
/// `answered` false, when it did not answer at all).
pub fn summary_text(summary: &Summary, answered: bool) -> String {
    let mut text = String::from(summary.state.as_str());
    if let Some(id) = &summary.drain_id {
        let _ = write!(text, " (drain {id})");
    }
    if !answered {
        text.push_str(", not answering");
    }
    one_line(text)
}

/// Blockers grouped by kind, counts for those that come in numbers.
fn blockers_text(blockers: &[Blocker]) -> String {
    let mut parts = Vec::new();
    let old_workers = blockers
        .iter()
        .filter(|b| matches!(b, Blocker::OldWorker { .. }))
        .count();
    for blocker in blockers {
        match blocker {
            Blocker::MinPeriod { .. } => parts.push("min_period".to_string()),
            Blocker::QuietPeriod { .. } => parts.push("quiet_period".to_string()),
            Blocker::Connections { count } => parts.push(format!("connections={count}")),
            Blocker::Sessions { count } => parts.push(format!("sessions={count}")),
            Blocker::Plugin { name, .. } => parts.push(format!("plugin {name}")),
            Blocker::OldWorker { .. } => {}
        }
    }
    if old_workers > 0 {
        // After min_period, where it stands in the protocol's order of blockers.
        let at = usize::from(parts.first().is_some_and(|p| p == "min_period"));
        parts.insert(at, format!("old_workers={old_workers}"));
    }
    parts.join(", ")
}

/// One line of at most [`STATUS_MAX`] bytes: a newline would end the `STATUS=` assignment early
/// and start another, so control characters (from a plugin's name, say) become spaces.
fn one_line(text: String) -> String {
    let mut text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.len() > STATUS_MAX {
        let mut cut = STATUS_MAX - '…'.len_utf8();
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_sdk::status::{DrainStatus, HaproxyStatus, OldWorker};

    fn status(state: NodeState) -> StatusResult {
        StatusResult {
            state,
            node: "web-1".into(),
            groups: vec![],
            boot_id: "b".into(),
            agent_version: "0.1.0".into(),
            haproxy: HaproxyStatus {
                pid: Some(4242),
                config: "/etc/haproxy/haproxy.cfg".into(),
                config_sha256: None,
                mode: "direct".into(),
                master_pid: None,
                started_at: None,
                restarts: 0,
            },
            old_workers: vec![],
            drain: None,
            plugins: vec![],
            last_reload: None,
            warnings: vec![],
            timeouts: None,
            outbox_depth: None,
        }
    }

    fn draining(blockers: Vec<Blocker>) -> StatusResult {
        let mut s = status(NodeState::Draining);
        s.drain = Some(DrainStatus {
            drain_id: "d-42".into(),
            started_at: "2024-05-01T12:00:00.000Z".into(),
            elapsed_ms: 1500,
            blockers,
        });
        s
    }

    fn old_worker(pid: u32) -> Blocker {
        Blocker::OldWorker {
            pid,
            age_ms: 100,
            connections: 2,
        }
    }

    fn reply(status: &StatusResult) -> Reply {
        Reply::success("web-1", None, status)
    }

    fn summary(state: NodeState, drain_id: Option<&str>) -> Summary {
        Summary {
            state,
            drain_id: drain_id.map(str::to_string),
        }
    }

    #[test]
    fn serving_is_one_word() {
        assert_eq!(status_text(&status(NodeState::Serving)), "serving");
    }

    #[test]
    fn old_workers_outside_a_drain_are_counted() {
        let mut s = status(NodeState::Serving);
        s.old_workers = vec![
            OldWorker {
                pid: 1,
                age_ms: 5,
                connections: 3,
            },
            OldWorker {
                pid: 2,
                age_ms: 5,
                connections: 0,
            },
        ];
        assert_eq!(status_text(&s), "serving: old_workers=2");
    }

    #[test]
    fn a_drain_names_its_id_and_its_blockers_by_kind() {
        let s = draining(vec![
            Blocker::MinPeriod {
                remaining_ms: 28500,
            },
            old_worker(4100),
            old_worker(4101),
            Blocker::Connections { count: 17 },
            Blocker::Plugin {
                name: "alb".into(),
                message: "target still registered".into(),
            },
        ]);
        assert_eq!(
            status_text(&s),
            "draining (drain d-42): blocked by min_period, old_workers=2, connections=17, plugin alb"
        );
    }

    #[test]
    fn remaining_times_are_left_out_so_the_text_changes_only_with_the_blockers() {
        let a = draining(vec![Blocker::QuietPeriod { remaining_ms: 900 }]);
        let b = draining(vec![Blocker::QuietPeriod { remaining_ms: 100 }]);
        assert_eq!(status_text(&a), status_text(&b));
        assert_eq!(
            status_text(&a),
            "draining (drain d-42): blocked by quiet_period"
        );
    }

    #[test]
    fn old_workers_lead_when_there_is_no_min_period() {
        let s = draining(vec![old_worker(1), Blocker::Sessions { count: 3 }]);
        assert_eq!(
            status_text(&s),
            "draining (drain d-42): blocked by old_workers=1, sessions=3"
        );
    }

    #[test]
    fn drained_names_the_drain_without_blockers() {
        let mut s = draining(vec![]);
        s.state = NodeState::Drained;
        assert_eq!(status_text(&s), "drained (drain d-42)");
    }

    #[test]
    fn a_plugin_name_cannot_break_the_line_and_the_text_stays_short() {
        let s = draining(vec![Blocker::Plugin {
            name: "evil\nREADY=1".into(),
            message: String::new(),
        }]);
        let text = status_text(&s);
        assert!(!text.contains('\n'), "{text}");
        assert!(text.ends_with("plugin evil READY=1"), "{text}");

        let many = draining(
            (0..50)
                .map(|i| Blocker::Plugin {
                    name: format!("plügin-{i}"),
                    message: String::new(),
                })
                .collect(),
        );
        let text = status_text(&many);
        assert!(text.len() <= STATUS_MAX, "{} bytes", text.len());
        assert!(text.ends_with('…'), "{text}");
    }

    #[test]
    fn an_answer_earns_the_ping_when_one_is_due() {
        let mut notices = Notices::default();
        let serving = summary(NodeState::Serving, None);
        assert_eq!(
            notices.after_probe(Some(&reply(&status(NodeState::Serving))), true, &serving),
            vec![
                Notice::Ready,
                Notice::Status("serving".into()),
                Notice::Ping
            ]
        );
        // Unchanged: only the ping.
        assert_eq!(
            notices.after_probe(Some(&reply(&status(NodeState::Serving))), true, &serving),
            vec![Notice::Ping]
        );
        // Not the watchdog's probe (a summary change): no ping.
        assert_eq!(
            notices.after_probe(Some(&reply(&status(NodeState::Serving))), false, &serving),
            vec![]
        );
    }

    #[test]
    fn ready_waits_until_the_node_is_past_starting_and_is_said_once() {
        let mut notices = Notices::default();
        let starting = summary(NodeState::Starting, None);
        // Starting: the loop turns (so the watchdog is fed), but the node does not serve yet.
        assert_eq!(
            notices.after_probe(Some(&reply(&status(NodeState::Starting))), true, &starting),
            vec![Notice::Status("starting".into()), Notice::Ping]
        );
        assert_eq!(
            notices.after_probe(None, false, &starting),
            vec![Notice::Status("starting, not answering".into())]
        );
        // A first start that failed is past starting too: it is retried, and STATUS says so.
        let failed = summary(NodeState::Failed, None);
        assert_eq!(
            notices.after_probe(Some(&reply(&status(NodeState::Failed))), false, &failed),
            vec![Notice::Ready, Notice::Status("failed".into())]
        );
        assert_eq!(
            notices.after_probe(Some(&reply(&status(NodeState::Serving))), false, &failed),
            vec![Notice::Status("serving".into())]
        );
    }

    #[test]
    fn a_node_that_does_not_answer_gets_no_ping() {
        let mut notices = Notices::default();
        let serving = summary(NodeState::Serving, None);
        notices.after_probe(Some(&reply(&status(NodeState::Serving))), true, &serving);
        assert_eq!(
            notices.after_probe(None, true, &serving),
            vec![Notice::Status("serving, not answering".into())]
        );
        assert_eq!(notices.after_probe(None, true, &serving), vec![]);
        // It answers again: the status says so, and the pings resume.
        assert_eq!(
            notices.after_probe(Some(&reply(&status(NodeState::Serving))), true, &serving),
            vec![Notice::Status("serving".into()), Notice::Ping]
        );
    }

    #[test]
    fn an_error_reply_still_proves_the_loop_turns() {
        let mut notices = Notices::default();
        let error = Reply::failure(
            "web-1",
            None,
            ebb_sdk::reply::ErrorCode::Internal,
            "boom".to_string(),
        );
        let draining = summary(NodeState::Draining, Some("d-1"));
        assert_eq!(
            notices.after_probe(Some(&error), true, &draining),
            vec![
                Notice::Ready,
                Notice::Status("draining (drain d-1)".into()),
                Notice::Ping
            ]
        );
    }

    #[test]
    fn the_probe_runs_at_half_the_watchdog_and_never_spins() {
        assert_eq!(
            probe_period(Some(Duration::from_secs(30))),
            Duration::from_secs(15)
        );
        assert_eq!(
            probe_period(Some(Duration::from_millis(200))),
            Duration::from_millis(100)
        );
        assert_eq!(
            probe_period(Some(Duration::from_micros(1))),
            Duration::from_millis(1)
        );
        assert_eq!(probe_period(None), STATUS_REFRESH);
    }

    #[test]
    fn sends_reach_a_datagram_socket_and_a_full_queue_does_not_block() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::connect(path.as_os_str()).expect("notifier");
        notifier.send(&[NotifyState::Ready, NotifyState::Status("serving")]);
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).expect("a datagram");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving\n");
        // Nobody reads: the queue fills, and sending goes on returning at once.
        for _ in 0..10_000 {
            notifier.send(&[NotifyState::Watchdog]);
        }
        assert!(notifier.failed_once.load(Ordering::Relaxed));
    }
}
