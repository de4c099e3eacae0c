//! The node task: the one owner of this node's state (its workers, reloads, lifecycle).
//!
//! Every other task talks to it through channels: the bus and the signal handler send `Input`s,
//! exit watchers report worker exits, launch tasks report their outcome. The node decides with the
//! plain state machines (`ReloadQueue`, `Backoff`) and carries the decisions out.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ebb_sdk::command::{Command, DrainRequest, UndrainRequest};
use ebb_sdk::event::{Event, EventBody, WorkerRole};
use ebb_sdk::reply::{DrainResult, ErrorCode, ReloadResult, Reply, StopResult, UndrainResult};
use ebb_sdk::status::{DrainStatus, HaproxyStatus, LastReload, NodeState, OldWorker, StatusResult};
use rustix::process::Signal;
use tokio::sync::{mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::drain::{self, Action, Drain, Phase, Policy, View};
use crate::events::{rfc3339, Cause, Emitter};
use crate::haproxy::admin::AdminSocket;
use crate::haproxy::adopt;
use crate::haproxy::config_file::sha256_hex;
use crate::haproxy::launch::{self, LaunchError, LaunchSpec, Launched};
use crate::haproxy::procfs::{self, ProcessId};
use crate::haproxy::worker::{self, Exit, Worker};
use crate::plugins::{PluginDisabled, PluginHost};
use crate::reload::{PushedConfig, ReloadQueue};
use crate::state_file::{self, State};
use ebb_sdk::plugin::{self as hooks, CheckContext, HookEvent, Verdict};

/// What other tasks ask of the node.
#[derive(Debug)]
pub enum Input {
    Command {
        command: Command,
        reply: oneshot::Sender<Reply>,
    },
    Signal(AgentSignal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentSignal {
    /// SIGHUP.
    Reload,
    /// SIGTERM or SIGINT: stop HAProxy gracefully, then exit.
    Stop,
    /// SIGUSR2: exit and leave HAProxy running for the next agent to adopt.
    Detach,
}

/// What the node tells the bus about itself, for the KV node record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub state: NodeState,
    pub drain_id: Option<String>,
}

/// Why the node task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stopped { connections_cut: u64 },
    Detached,
}

/// Who is waiting for a reload.
#[derive(Debug)]
enum Waiter {
    Command {
        request_id: Option<String>,
        reply: oneshot::Sender<Reply>,
        cause: Cause,
    },
    Signal,
    /// The restart of a crashed worker.
    Restart,
}

#[derive(Debug)]
enum Lifecycle {
    Serving,
    Stopping(Stopping),
    Stopped { connections_cut: u64 },
}

#[derive(Debug)]
struct Stopping {
    started: Instant,
    /// When still-running workers are hard-stopped (SIGTERM), then killed.
    deadline: Instant,
    escalated: u8,
    connections_cut: u64,
    waiters: Vec<(Option<String>, oneshot::Sender<Reply>)>,
    cause: Cause,
}

/// A launch in progress.
#[derive(Debug)]
struct Running {
    reload_id: String,
    started: Instant,
    waiters: Vec<Waiter>,
    /// Started with EBB_DRAINING=1: if an undrain lands meanwhile, the new worker must be told.
    draining: bool,
}

#[derive(Debug)]
struct LaunchOutcome {
    result: Result<Launched, ReloadError>,
}

/// One stats sample of a worker, by the idle rule.
#[derive(Debug, Clone, Copy)]
struct Sample {
    pid: u32,
    busy: Option<u64>,
    accepted: u64,
}

#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("pushed config rejected by haproxy -c: {0}")]
    ConfigInvalid(String),
    #[error("cannot install the pushed config: {0}")]
    Install(String),
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

/// Restart backoff after a crash: 100 ms doubling to 10 s; a worker that ran a minute resets it.
const RESTART_BASE: Duration = Duration::from_millis(100);
const RESTART_CAP: Duration = Duration::from_secs(10);
const RESTART_STABLE: Duration = Duration::from_secs(60);
/// After SIGTERM at the stop deadline, how long before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

pub struct Node {
    settings: Arc<Settings>,
    spec: LaunchSpec,
    admin: AdminSocket,
    events: Emitter,
    lifecycle: Lifecycle,
    current: Option<Worker>,
    old: Vec<Worker>,
    reloads: ReloadQueue<Waiter>,
    running: Option<Running>,
    restart_at: Option<Instant>,
    backoff: Backoff,
    restarts: u32,
    last_reload: Option<LastReload>,
    /// Ports HAProxy listens on, to tell client connections from server ones.
    client_ports: HashSet<u16>,
    exits_tx: mpsc::UnboundedSender<(ProcessId, Exit)>,
    exits: mpsc::UnboundedReceiver<(ProcessId, Exit)>,
    launches_tx: mpsc::UnboundedSender<LaunchOutcome>,
    launches: mpsc::UnboundedReceiver<LaunchOutcome>,
    /// The listening ports of a newly launched worker, read off the reload's critical path.
    ports_tx: mpsc::UnboundedSender<(u32, HashSet<u16>)>,
    ports: mpsc::UnboundedReceiver<(u32, HashSet<u16>)>,
    /// SIGTERM: exit once HAProxy is stopped.
    exit_when_stopped: bool,
    summary_tx: watch::Sender<Summary>,
    next_heartbeat: Instant,
    drain: Option<Drain>,
    drain_cause: Cause,
    /// The `drained` event of the current drain, kept until undrain so a restart can resend it.
    drained_event: Option<Event>,
    /// The latest stats sample of the current worker (taken only while draining).
    sample: Option<Sample>,
    last_new_connection: Option<Instant>,
    /// The worker the sampler polls: `Some` while draining.
    sampler_target: watch::Sender<Option<u32>>,
    samples: mpsc::UnboundedReceiver<Sample>,
    /// Plugin idle checks that say busy: name and message. Fed by the plugin checker task.
    plugins_busy: Vec<(String, String)>,
    plugins: PluginHost,
    /// The drain the plugin checker asks about: `Some` while draining.
    check_target: watch::Sender<Option<CheckContext>>,
    verdicts: mpsc::UnboundedReceiver<Vec<(String, Verdict)>>,
    /// Notices of plugins disabled for hanging, each published as a `plugin_disabled` event.
    plugins_disabled: mpsc::UnboundedReceiver<PluginDisabled>,
    dirty: bool,
}

impl Node {
    /// Adopts a running HAProxy or starts one. Fails only when no HAProxy can be had at all.
    pub async fn start(
        settings: Arc<Settings>,
        events: Emitter,
        summary_tx: watch::Sender<Summary>,
        plugins: PluginHost,
    ) -> anyhow::Result<Node> {
        let hp = &settings.config.haproxy;
        std::fs::create_dir_all(&hp.state_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create haproxy.state_dir {}: {e}; create it or point state_dir elsewhere",
                hp.state_dir.display()
            )
        })?;
        let spec = LaunchSpec {
            binary: settings.haproxy_binary.clone(),
            config: hp.config.clone(),
            admin_socket: settings.admin_socket.clone(),
            log_dir: hp.state_dir.join("logs"),
            startup_timeout: hp.startup_timeout.0,
        };
        let admin = AdminSocket::new(&settings.admin_socket, Duration::from_secs(2));
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let (launches_tx, launches) = mpsc::unbounded_channel();
        let (ports_tx, ports) = mpsc::unbounded_channel();
        let (sampler_target, target_rx) = watch::channel(None);
        let (samples_tx, samples) = mpsc::unbounded_channel();
        spawn_sampler(&settings, target_rx, samples_tx);
        let (check_target, check_rx) = watch::channel(None);
        let (verdicts_tx, verdicts) = mpsc::unbounded_channel();
        if !plugins.is_empty() {
            spawn_checker(
                plugins.clone(),
                settings.config.drain.poll_interval.0,
                check_rx,
                verdicts_tx,
            );
        }
        // Without a receiver (taken already), the closed channel just never yields a notice.
        let plugins_disabled = plugins
            .take_disabled()
            .unwrap_or_else(|| mpsc::unbounded_channel().1);
        let mut node = Node {
            reloads: ReloadQueue::new(settings.config.reload.coalesce.0),
            settings: settings.clone(),
            spec,
            admin,
            events,
            lifecycle: Lifecycle::Serving,
            current: None,
            old: Vec::new(),
            running: None,
            restart_at: None,
            backoff: Backoff::new(RESTART_BASE, RESTART_CAP, RESTART_STABLE),
            restarts: 0,
            last_reload: None,
            client_ports: HashSet::new(),
            exits_tx,
            exits,
            launches_tx,
            launches,
            ports_tx,
            ports,
            exit_when_stopped: false,
            summary_tx,
            next_heartbeat: Instant::now() + settings.config.nats.heartbeat.0,
            drain: None,
            drain_cause: Cause::default(),
            drained_event: None,
            sample: None,
            last_new_connection: None,
            sampler_target,
            samples,
            plugins_busy: Vec::new(),
            plugins,
            check_target,
            verdicts,
            plugins_disabled,
            dirty: true,
        };

        let state = match state_file::load(&hp.state_dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        };
        if let Some(s) = &state {
            node.restarts = s.restarts;
            node.last_reload = s.last_reload.clone();
            if let Some(record) = s.drain.clone() {
                tracing::info!(drain_id = %record.drain_id, "resuming drain {}", record.drain_id);
                node.drain = Some(Drain::resume(
                    record,
                    settings.config.drain.idle,
                    Instant::now(),
                    SystemTime::now(),
                ));
                node.drained_event = s.drained_event.clone();
            }
        }
        let records = state
            .as_ref()
            .map(State::worker_records)
            .unwrap_or_default();
        let boot_id = state.as_ref().map(|s| s.kernel_boot_id.as_str());
        let adopted = adopt::adopt(&records, boot_id, &node.spec, &node.admin).await;
        for why in &adopted.refused {
            tracing::info!("{why}");
        }
        let adopted_current = adopted.current.is_some();
        for w in adopted.old {
            tracing::info!(pid = w.pid(), "adopted old worker {}", w.pid());
            // An agent may have died between readiness and signalling the displaced worker; a
            // second SIGUSR1 to a worker that is already stopping changes nothing.
            if let Err(e) = w.signal(Signal::USR1) {
                tracing::warn!(pid = w.pid(), "cannot signal adopted old worker: {e}");
            }
            w.watch_exit(None, node.exits_tx.clone());
            node.old.push(w);
        }
        match adopted.current {
            Some(w) => {
                tracing::info!(pid = w.pid(), "adopted running haproxy worker {}", w.pid());
                w.watch_exit(None, node.exits_tx.clone());
                node.client_ports = procfs::listening_ports(w.pid());
                node.current = Some(w);
            }
            None => {
                // A node restarting in the middle of a drain starts its worker draining.
                let draining = node.drain.is_some();
                let launched = launch::launch(&node.spec, false, draining)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("cannot start haproxy with {}: {e}", hp.config.display())
                    })?;
                tracing::info!(
                    pid = launched.worker.pid(),
                    duration_ms = launched.duration.as_millis() as u64,
                    "haproxy worker {} started",
                    launched.worker.pid()
                );
                let pid = launched.worker.pid();
                node.install_current(launched);
                node.client_ports = procfs::listening_ports(pid);
            }
        }
        if node.drain.is_some() {
            if let Some(pid) = node.current.as_ref().map(Worker::pid) {
                node.send_drain_commands(pid, true);
            }
            if let Some(event) = node.drained_event.clone() {
                node.events.republish(event);
            }
        }
        node.persist();
        let pid = node.current.as_ref().map(Worker::pid);
        node.events.emit(
            EventBody::AgentStarted {
                version: env!("CARGO_PKG_VERSION").to_string(),
                adopted: adopted_current,
                pid,
            },
            &Cause::default(),
        );
        Ok(node)
    }

    /// Runs until HAProxy is stopped for good or the agent detaches.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>) -> Outcome {
        loop {
            self.drive();
            if self.dirty {
                self.persist();
            }
            let summary = Summary {
                state: self.state(),
                drain_id: self.drain.as_ref().map(|d| d.id().to_string()),
            };
            self.summary_tx
                .send_if_modified(|s| std::mem::replace(s, summary.clone()) != summary);
            if let Some(outcome) = self.finished() {
                return outcome;
            }
            let wake = self.next_wake();
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(Input::Command { command, reply }) => self.on_command(command, reply),
                    Some(Input::Signal(AgentSignal::Reload)) => self.request_reload(Waiter::Signal, None),
                    Some(Input::Signal(AgentSignal::Stop)) | None => self.begin_stop(None, None, true, Cause::default()),
                    Some(Input::Signal(AgentSignal::Detach)) => {
                        tracing::info!("detaching: haproxy keeps running for the next agent to adopt");
                        self.persist();
                        return Outcome::Detached;
                    }
                },
                Some((id, exit)) = self.exits.recv() => self.on_exit(id, exit),
                Some(outcome) = self.launches.recv() => self.on_launched(outcome),
                Some((pid, ports)) = self.ports.recv() => self.on_ports(pid, ports),
                Some(sample) = self.samples.recv() => self.on_sample(sample),
                Some(verdicts) = self.verdicts.recv() => self.on_verdicts(verdicts),
                Some(disabled) = self.plugins_disabled.recv() => self.on_plugin_disabled(disabled),
                _ = sleep_until(wake) => {}
            }
        }
    }

    fn finished(&self) -> Option<Outcome> {
        match self.lifecycle {
            Lifecycle::Stopped { connections_cut } if self.exit_when_stopped => {
                Some(Outcome::Stopped { connections_cut })
            }
            _ => None,
        }
    }

    fn all_gone(&self) -> bool {
        self.current.is_none() && self.old.is_empty() && self.running.is_none()
    }

    fn next_wake(&self) -> Option<Instant> {
        let stop = match &self.lifecycle {
            Lifecycle::Stopping(s) => Some(s.deadline),
            _ => None,
        };
        let restart = self.restart_at.filter(|_| self.running.is_none());
        // Time alone can end a drain's min period or quiet period, or reach its deadline.
        let drain = self
            .drain
            .as_ref()
            .and_then(|d| d.next_wake(Instant::now(), &self.view(None)));
        [
            self.reloads.next_start(),
            restart,
            stop,
            Some(self.next_heartbeat),
            drain,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Carries out whatever is due now: a queued reload, a crash restart, a stop escalation or end.
    fn drive(&mut self) {
        let now = Instant::now();
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.settings.config.nats.heartbeat.0;
            let state = self.state();
            self.events
                .emit(EventBody::Heartbeat { state }, &Cause::default());
        }
        if let Some(at) = self.restart_at {
            if at <= now && self.running.is_none() && matches!(self.lifecycle, Lifecycle::Serving) {
                self.restart_at = None;
                self.request_reload(Waiter::Restart, None);
            }
        }
        if self.running.is_none() {
            if let Some(batch) = self.reloads.start(now) {
                self.start_launch(batch.waiters, batch.config);
            }
        }
        self.evaluate_drain();
        self.drive_stop(now);
    }

    fn on_command(&mut self, command: Command, reply: oneshot::Sender<Reply>) {
        let node = self.settings.node_id().to_string();
        let request_id = command.request_id().map(str::to_string);
        let cause = Cause {
            requester: command.requester().map(str::to_string),
            reason: command.reason().map(str::to_string),
        };
        match command {
            Command::Status(_) => {
                let _ = reply.send(Reply::success(&node, request_id, self.status()));
            }
            Command::Reload(req) => {
                let pushed = match self.check_reload(req.config, req.config_sha256) {
                    Ok(p) => p,
                    Err((code, msg)) => {
                        let _ = reply.send(Reply::failure(&node, request_id, code, msg));
                        return;
                    }
                };
                let drained = self
                    .drain
                    .as_ref()
                    .is_some_and(|d| d.phase() == Phase::Drained);
                if !matches!(self.lifecycle, Lifecycle::Serving) || drained {
                    let _ = reply.send(Reply::failure(
                        &node,
                        request_id,
                        ErrorCode::Conflict,
                        format!("cannot reload while {}; undrain first", self.state()),
                    ));
                    return;
                }
                self.request_reload(
                    Waiter::Command {
                        request_id,
                        reply,
                        cause,
                    },
                    pushed,
                );
            }
            Command::Stop(req) => {
                let timeout = req.timeout_ms.map(Duration::from_millis);
                self.begin_stop(timeout, Some((request_id, reply)), false, cause);
            }
            Command::Drain(req) => {
                let r = self.on_drain(req, cause);
                let _ = reply.send(match r {
                    Ok(result) => Reply::success(&node, request_id, result),
                    Err((code, msg)) => Reply::failure(&node, request_id, code, msg),
                });
            }
            Command::Undrain(req) => {
                let r = self.on_undrain(req, cause);
                let _ = reply.send(match r {
                    Ok(result) => Reply::success(&node, request_id, result),
                    Err((code, msg)) => Reply::failure(&node, request_id, code, msg),
                });
            }
        }
    }

    /// Validates a reload's config fields; returns the pushed config, if any.
    fn check_reload(
        &self,
        config: Option<String>,
        sha: Option<String>,
    ) -> Result<Option<PushedConfig>, (ErrorCode, String)> {
        match config {
            Some(text) => {
                if !self.settings.config.reload.allow_config_push {
                    return Err((
                        ErrorCode::Forbidden,
                        "config push is disabled on this node; set reload.allow_config_push = true to allow it".into(),
                    ));
                }
                let actual = sha256_hex(text.as_bytes());
                if let Some(expected) = sha {
                    if expected != actual {
                        return Err((
                            ErrorCode::InvalidRequest,
                            format!("config_sha256 {expected} does not match the pushed config (sha256 {actual}); send the lowercase hex SHA-256 of the exact bytes"),
                        ));
                    }
                }
                Ok(Some(PushedConfig {
                    sha256: actual,
                    text,
                }))
            }
            None => {
                if let Some(expected) = sha {
                    let on_disk = std::fs::read(&self.spec.config)
                        .map(|b| sha256_hex(&b))
                        .map_err(|e| {
                            (
                                ErrorCode::Internal,
                                format!("cannot read {}: {e}", self.spec.config.display()),
                            )
                        })?;
                    if on_disk != expected {
                        return Err((
                            ErrorCode::Conflict,
                            format!("{} has sha256 {on_disk}, not the expected {expected}; the file changed since you looked", self.spec.config.display()),
                        ));
                    }
                }
                Ok(None)
            }
        }
    }

    fn request_reload(&mut self, waiter: Waiter, config: Option<PushedConfig>) {
        if let Err((waiter, conflict)) = self.reloads.request(waiter, config, Instant::now()) {
            self.answer_reload(waiter, Err((ErrorCode::Conflict, conflict.to_string())));
        }
    }

    fn start_launch(&mut self, waiters: Vec<Waiter>, config: Option<PushedConfig>) {
        let reload_id = uuid::Uuid::new_v4().to_string();
        let spec = self.spec.clone();
        let takeover = self.current.is_some();
        let backup = self.settings.config.haproxy.state_dir.join("last-good.cfg");
        let tx = self.launches_tx.clone();
        let ports_tx = self.ports_tx.clone();
        let draining = self.drain.is_some();
        tokio::spawn(async move {
            let result = launch_with(&spec, takeover, draining, config, &backup).await;
            let pid = result.as_ref().ok().map(|l| l.worker.pid());
            let _ = tx.send(LaunchOutcome { result });
            // The ports come from /proc/net/tcp, which takes milliseconds on a busy host: read
            // after the node has the new worker, so the reload is not held up by it.
            if let Some(pid) = pid {
                if let Ok(ports) =
                    tokio::task::spawn_blocking(move || procfs::listening_ports(pid)).await
                {
                    let _ = ports_tx.send((pid, ports));
                }
            }
        });
        self.running = Some(Running {
            reload_id,
            started: Instant::now(),
            waiters,
            draining,
        });
    }

    fn on_launched(&mut self, outcome: LaunchOutcome) {
        let Some(running) = self.running.take() else {
            return;
        };
        self.reloads.finish(Instant::now());
        let restart = running.waiters.iter().any(|w| matches!(w, Waiter::Restart));
        let cause = running
            .waiters
            .iter()
            .find_map(|w| match w {
                Waiter::Command { cause, .. } => Some(cause.clone()),
                _ => None,
            })
            .unwrap_or_default();
        match outcome.result {
            Ok(launched) => {
                let launch_ms = launched.duration.as_millis() as u64;
                let displaced = self.install_current(launched);
                // A worker of a draining node already answers 503 (EBB_DRAINING=1) and gets the
                // drain's commands as well; one launched draining whose drain an undrain ended
                // meanwhile gets the undrain's.
                let draining = self.drain.is_some();
                if let (true, Some(pid)) = (
                    draining || running.draining,
                    self.current.as_ref().map(Worker::pid),
                ) {
                    self.send_drain_commands(pid, draining);
                }
                let new = self
                    .current
                    .as_ref()
                    .map(|w| (w.pid(), w.config_sha256.clone()));
                let Some((pid, config_sha256)) = new else {
                    return;
                };
                let duration_ms = running.started.elapsed().as_millis() as u64;
                if restart {
                    self.restarts += 1;
                }
                self.restart_at = None;
                self.last_reload = Some(LastReload {
                    reload_id: running.reload_id.clone(),
                    at: rfc3339(SystemTime::now()),
                    ok: true,
                    duration_ms,
                    error: None,
                });
                tracing::info!(pid, old_pids = ?displaced, duration_ms, launch_ms, "reloaded: worker {pid} serves");
                self.events.emit(
                    EventBody::Reloaded {
                        reload_id: running.reload_id.clone(),
                        pid,
                        old_pids: displaced.clone(),
                        duration_ms,
                        config_sha256: config_sha256.clone(),
                        draining: self.drain.is_some(),
                    },
                    &cause,
                );
                self.plugins.hook(&HookEvent::Reloaded(hooks::Reloaded {
                    draining: self.drain.is_some(),
                    drain_id: self.drain.as_ref().map(|d| d.id().to_string()),
                    reload_id: Some(running.reload_id.clone()),
                    pid: Some(pid),
                }));
                let result = ReloadResult {
                    reload_id: running.reload_id,
                    pid,
                    old_pids: displaced,
                    duration_ms,
                    config_sha256,
                };
                for w in running.waiters {
                    self.answer_reload(w, Ok(result.clone()));
                }
                // A worker started while stopping joins the others on their way out.
                if matches!(self.lifecycle, Lifecycle::Stopping(_)) {
                    self.retire_current();
                }
            }
            Err(e) => {
                let message = format!("{e}; the running worker was not touched");
                tracing::warn!(reload_id = %running.reload_id, "reload failed: {message}");
                let code = match &e {
                    ReloadError::ConfigInvalid(_) => ErrorCode::ConfigInvalid,
                    _ => ErrorCode::ReloadFailed,
                };
                self.last_reload = Some(LastReload {
                    reload_id: running.reload_id.clone(),
                    at: rfc3339(SystemTime::now()),
                    ok: false,
                    duration_ms: running.started.elapsed().as_millis() as u64,
                    error: Some(message.clone()),
                });
                self.events.emit(
                    EventBody::ReloadFailed {
                        reload_id: running.reload_id.clone(),
                        error: message.clone(),
                    },
                    &cause,
                );
                if restart && self.current.is_none() {
                    let delay = self.backoff.next(Duration::ZERO);
                    tracing::warn!("haproxy restart failed; next try in {delay:?}");
                    self.restart_at = Some(Instant::now() + delay);
                }
                for w in running.waiters {
                    self.answer_reload(w, Err((code, message.clone())));
                }
            }
        }
        self.dirty = true;
    }

    /// Makes a launched worker current and soft-stops the one it displaced. Returns displaced pids.
    fn install_current(&mut self, launched: Launched) -> Vec<u32> {
        let Launched { worker, child, .. } = launched;
        worker.watch_exit(Some(child), self.exits_tx.clone());
        self.sample = None;
        let mut displaced = Vec::new();
        if let Some(previous) = self.current.replace(worker) {
            displaced.push(previous.pid());
            soft_stop(&previous);
            self.old.push(previous);
        }
        self.dirty = true;
        displaced
    }

    fn on_ports(&mut self, pid: u32, ports: HashSet<u16>) {
        // Until they arrive, the previous worker's ports stand in: a reload rarely changes them.
        if self.current.as_ref().map(Worker::pid) == Some(pid) && !ports.is_empty() {
            self.client_ports = ports;
        }
    }

    fn retire_current(&mut self) {
        if let Some(w) = self.current.take() {
            soft_stop(&w);
            self.old.push(w);
        }
    }

    fn answer_reload(&mut self, waiter: Waiter, result: Result<ReloadResult, (ErrorCode, String)>) {
        let node = self.settings.node_id();
        match waiter {
            Waiter::Command {
                request_id, reply, ..
            } => {
                let r = match result {
                    Ok(ok) => Reply::success(node, request_id, ok),
                    Err((code, msg)) => Reply::failure(node, request_id, code, msg),
                };
                let _ = reply.send(r);
            }
            Waiter::Signal => match result {
                Ok(r) => tracing::info!(pid = r.pid, "SIGHUP reload done"),
                Err((_, msg)) => tracing::warn!("SIGHUP reload failed: {msg}"),
            },
            Waiter::Restart => {}
        }
    }

    fn on_exit(&mut self, id: ProcessId, exit: Exit) {
        let (worker, role) = if self.current.as_ref().is_some_and(|w| w.id == id) {
            (self.current.take(), WorkerRole::Current)
        } else if let Some(i) = self.old.iter().position(|w| w.id == id) {
            (Some(self.old.remove(i)), WorkerRole::Old)
        } else {
            (None, WorkerRole::Old)
        };
        let Some(worker) = worker else { return };
        self.dirty = true;
        let log = worker::log_tail(&worker.log, 64 * 1024);
        let hard_stop = worker::hard_stopped_connections(&log);
        let connections_cut = hard_stop.unwrap_or(0);
        if let Lifecycle::Stopping(s) = &mut self.lifecycle {
            s.connections_cut += connections_cut;
        }
        if let Some(d) = &mut self.drain {
            if d.phase() == Phase::Draining {
                d.add_cut(connections_cut);
            }
        }
        if role == WorkerRole::Current {
            self.sample = None;
        }
        if hard_stop.is_some() {
            tracing::warn!(
                pid = id.pid,
                connections_cut,
                "worker {} was hard-stopped and cut {connections_cut} connections",
                id.pid
            );
        } else {
            tracing::info!(pid = id.pid, "worker {} exited ({exit})", id.pid);
        }
        let status = crate::events::exit_status(exit);
        self.events.emit(
            EventBody::WorkerExited {
                pid: id.pid,
                role,
                status,
                hard_stopped: hard_stop.is_some(),
                connections_cut,
            },
            &Cause::default(),
        );
        if role == WorkerRole::Current && matches!(self.lifecycle, Lifecycle::Serving) {
            tracing::error!(
                pid = id.pid,
                "haproxy worker {} crashed ({exit}): {}",
                id.pid,
                worker::startup_error(&log)
            );
            self.events.emit(
                EventBody::ProxyCrashed {
                    pid: id.pid,
                    status,
                },
                &Cause::default(),
            );
            let delay = self.backoff.next(worker.age());
            tracing::info!("restarting haproxy in {delay:?}");
            self.restart_at = Some(Instant::now() + delay);
        }
        if !worker.log.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&worker.log);
        }
    }

    fn on_drain(
        &mut self,
        req: DrainRequest,
        cause: Cause,
    ) -> Result<DrainResult, (ErrorCode, String)> {
        if !matches!(self.lifecycle, Lifecycle::Serving) {
            return Err((
                ErrorCode::Conflict,
                format!("cannot drain while {}", self.state()),
            ));
        }
        if let Some(d) = &self.drain {
            return Ok(DrainResult {
                drain_id: d.id().to_string(),
                already_draining: true,
                state: self.state(),
                drained_at: d.record.drained_at_ms.map(ms_to_rfc3339),
            });
        }
        let cfg = &self.settings.config.drain;
        let policy = Policy {
            min_period_ms: req
                .min_period_ms
                .unwrap_or(cfg.min_period.0.as_millis() as u64),
            quiet_period_ms: cfg.quiet_period.0.as_millis() as u64,
            deadline_ms: Some(req.deadline_ms.unwrap_or(cfg.deadline.0.as_millis() as u64))
                .filter(|d| *d > 0),
            on_deadline: cfg.on_deadline,
            stop_when_drained: req.stop_when_drained.unwrap_or(cfg.stop_when_drained),
        };
        let drain_id = req
            .drain_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        tracing::info!(%drain_id, "drain {drain_id} started");
        let drain = Drain::start(
            drain_id.clone(),
            policy.clone(),
            cfg.idle,
            Instant::now(),
            SystemTime::now(),
        );
        self.drain = Some(drain);
        self.drain_cause = cause.clone();
        self.sample = None;
        self.last_new_connection = None;
        // Until a plugin has answered for this drain, it counts as busy.
        self.plugins_busy = self
            .plugins
            .status()
            .into_iter()
            .map(|p| (p.name, "waiting for the first idle check".to_string()))
            .collect();
        if let Some(pid) = self.current.as_ref().map(Worker::pid) {
            self.send_drain_commands(pid, true);
        }
        self.plugins
            .hook(&HookEvent::DrainStarted(hooks::DrainStarted {
                drain_id: drain_id.clone(),
                started_at_ms: drain::unix_ms(SystemTime::now()),
                min_period_ms: policy.min_period_ms,
                deadline_ms: policy.deadline_ms,
            }));
        self.events.emit(
            EventBody::DrainStarted {
                drain_id: drain_id.clone(),
                min_period_ms: policy.min_period_ms,
                deadline_ms: policy.deadline_ms,
            },
            &cause,
        );
        self.dirty = true;
        Ok(DrainResult {
            drain_id,
            already_draining: false,
            state: self.state(),
            drained_at: None,
        })
    }

    fn on_undrain(
        &mut self,
        req: UndrainRequest,
        cause: Cause,
    ) -> Result<UndrainResult, (ErrorCode, String)> {
        let Some(current_id) = self.drain.as_ref().map(|d| d.id().to_string()) else {
            return Ok(UndrainResult {
                drain_id: None,
                state: self.state(),
            });
        };
        if let Some(wanted) = &req.drain_id {
            if *wanted != current_id {
                return Err((
                    ErrorCode::Conflict,
                    format!("drain {wanted} is not the current drain ({current_id})"),
                ));
            }
        }
        match self.lifecycle {
            Lifecycle::Stopping(_) => {
                return Err((
                    ErrorCode::Conflict,
                    "haproxy is stopping; undrain after it stopped".into(),
                ))
            }
            Lifecycle::Stopped { .. } => {
                // Back into service: start HAProxy again.
                self.lifecycle = Lifecycle::Serving;
                self.exit_when_stopped = false;
                self.request_reload(Waiter::Restart, None);
            }
            Lifecycle::Serving => {}
        }
        if let Some(pid) = self.current.as_ref().map(Worker::pid) {
            self.send_drain_commands(pid, false);
        }
        tracing::info!(drain_id = %current_id, "undrained");
        self.plugins.hook(&HookEvent::Undrained(hooks::Undrained {
            drain_id: current_id.clone(),
        }));
        self.plugins_busy.clear();
        self.drain = None;
        self.drained_event = None;
        self.sample = None;
        self.events.emit(
            EventBody::Undrained {
                drain_id: current_id.clone(),
            },
            &cause,
        );
        self.dirty = true;
        Ok(UndrainResult {
            drain_id: Some(current_id),
            state: self.state(),
        })
    }

    /// Runs `start_commands` (or `stop_commands`) in worker `pid`, off the node task.
    fn send_drain_commands(&self, pid: u32, start: bool) {
        let cfg = &self.settings.config.drain;
        let commands = if start {
            cfg.start_commands.clone()
        } else {
            cfg.stop_commands.clone()
        };
        let admin = self.admin.clone();
        tokio::spawn(async move {
            for command in commands {
                match admin.command_on_retrying(pid, &command).await {
                    Ok(_) => tracing::debug!(pid, "ran {command:?} on worker {pid}"),
                    Err(e) => tracing::error!(pid, "drain command {command:?} failed: {e}"),
                }
            }
        });
    }

    fn on_verdicts(&mut self, verdicts: Vec<(String, Verdict)>) {
        if self.drain.is_none() {
            return;
        }
        self.plugins_busy = verdicts
            .into_iter()
            .filter_map(|(name, v)| match v {
                Verdict::Idle => None,
                Verdict::Busy(message) => Some((name, message)),
            })
            .collect();
    }

    fn on_plugin_disabled(&mut self, disabled: PluginDisabled) {
        tracing::error!(plugin = %disabled.name, "{disabled}");
        self.events.emit(
            EventBody::PluginDisabled {
                name: disabled.name,
                error: disabled.reason,
                blocks_drains: disabled.blocks_drains,
            },
            &Cause::default(),
        );
    }

    fn on_sample(&mut self, sample: Sample) {
        let current = self.current.as_ref().map(Worker::pid);
        if Some(sample.pid) != current || self.drain.is_none() {
            return;
        }
        let grew = match self.sample {
            Some(prev) if prev.pid == sample.pid => sample.accepted != prev.accepted,
            // A worker's first sample: any connection it accepted is new to the drain.
            _ => sample.accepted > 0,
        };
        if grew {
            self.last_new_connection = Some(Instant::now());
        }
        self.sample = Some(sample);
    }

    /// Each old worker's open client connections, from /proc: for status and events only, not on
    /// every evaluation.
    fn old_connections(&self) -> HashMap<u32, u64> {
        let pids: Vec<u32> = self.old.iter().map(Worker::pid).collect();
        procfs::client_connections_of(&pids, &self.client_ports)
    }

    /// What the drain decision needs; `connections` adds each old worker's open connections
    /// ([`Self::old_connections`]), else they count as 0.
    fn view(&self, connections: Option<&HashMap<u32, u64>>) -> View {
        let current = self.current.as_ref().map(Worker::pid);
        View {
            old_workers: self
                .old
                .iter()
                .map(|w| {
                    let open = connections
                        .and_then(|c| c.get(&w.pid()).copied())
                        .unwrap_or(0);
                    (w.pid(), w.age().as_millis() as u64, open)
                })
                .collect(),
            busy: match current {
                // With no current worker (it crashed), nothing can be in flight on it.
                None => Some(0),
                Some(pid) => self.sample.filter(|s| s.pid == pid).and_then(|s| s.busy),
            },
            last_new_connection: self.last_new_connection,
            plugins_busy: self.plugins_busy.clone(),
        }
    }

    fn evaluate_drain(&mut self) {
        let target = self
            .drain
            .as_ref()
            .filter(|d| d.phase() == Phase::Draining)
            .and(self.current.as_ref().map(Worker::pid));
        self.sampler_target
            .send_if_modified(|t| std::mem::replace(t, target) != target);
        let check = self
            .drain
            .as_ref()
            .filter(|d| d.phase() == Phase::Draining)
            .map(|d| CheckContext {
                node: Some(self.settings.node_id().to_string()),
                drain_id: Some(d.id().to_string()),
                started_at_ms: Some(d.record.started_at_ms),
                ..CheckContext::default()
            });
        self.check_target.send_if_modified(|t| {
            let changed = t.as_ref().map(|c| &c.drain_id) != check.as_ref().map(|c| &c.drain_id);
            if changed {
                *t = check.clone();
            }
            changed
        });
        let view = self.view(None);
        let Some(drain) = &mut self.drain else { return };
        let actions = drain.step(Instant::now(), SystemTime::now(), &view);
        for action in actions {
            self.dirty = true;
            match action {
                Action::DeadlineExceeded(_) => {
                    let Some(drain) = &self.drain else { return };
                    let connections = self.old_connections();
                    let blockers = drain.blockers(Instant::now(), &self.view(Some(&connections)));
                    tracing::warn!(drain_id = %drain.id(), ?blockers, "drain deadline exceeded");
                    let body = EventBody::DrainDeadlineExceeded {
                        drain_id: drain.id().to_string(),
                        blockers,
                    };
                    let cause = self.drain_cause.clone();
                    self.events.emit(body, &cause);
                }
                Action::Drained { forced, stop } => {
                    let Some(drain) = &self.drain else { return };
                    let r = &drain.record;
                    let drained_at_ms = r
                        .drained_at_ms
                        .unwrap_or_else(|| drain::unix_ms(SystemTime::now()));
                    let body = EventBody::Drained {
                        drain_id: r.drain_id.clone(),
                        started_at: ms_to_rfc3339(r.started_at_ms),
                        drained_at: ms_to_rfc3339(drained_at_ms),
                        duration_ms: drained_at_ms.saturating_sub(r.started_at_ms),
                        forced,
                        connections_cut: r.connections_cut,
                    };
                    tracing::info!(drain_id = %r.drain_id, forced, "drained");
                    self.plugins.hook(&HookEvent::Drained(hooks::Drained {
                        drain_id: r.drain_id.clone(),
                        forced,
                    }));
                    let cause = self.drain_cause.clone();
                    let event = self.events.emit(body, &cause);
                    self.drained_event = Some(event);
                    // Persist at once: the drained event must survive a crash right now.
                    self.persist();
                    if stop {
                        self.begin_stop(None, None, false, cause);
                    }
                }
            }
        }
    }

    fn begin_stop(
        &mut self,
        timeout: Option<Duration>,
        waiter: Option<(Option<String>, oneshot::Sender<Reply>)>,
        exit_after: bool,
        cause: Cause,
    ) {
        self.exit_when_stopped |= exit_after;
        match &mut self.lifecycle {
            Lifecycle::Stopping(s) => {
                s.waiters.extend(waiter);
                return;
            }
            Lifecycle::Stopped { .. } => {
                if let Some((request_id, reply)) = waiter {
                    let r = StopResult {
                        connections_cut: 0,
                        duration_ms: 0,
                    };
                    let _ = reply.send(Reply::success(self.settings.node_id(), request_id, r));
                }
                return;
            }
            Lifecycle::Serving => {}
        }
        let timeout = timeout.unwrap_or(self.settings.config.haproxy.stop_timeout.0);
        tracing::info!("stopping haproxy gracefully (up to {timeout:?})");
        self.plugins.hook(&HookEvent::Stopping(hooks::Stopping {}));
        let node = self.settings.node_id().to_string();
        for w in self.reloads.drain_queued() {
            self.answer_reload(
                w,
                Err((ErrorCode::Conflict, format!("node {node} is stopping"))),
            );
        }
        self.restart_at = None;
        self.retire_current();
        for w in &self.old {
            soft_stop(w);
        }
        let now = Instant::now();
        self.lifecycle = Lifecycle::Stopping(Stopping {
            started: now,
            deadline: now + timeout,
            escalated: 0,
            connections_cut: 0,
            waiters: waiter.into_iter().collect(),
            cause,
        });
        self.dirty = true;
    }

    fn drive_stop(&mut self, now: Instant) {
        let all_gone = self.all_gone();
        let Lifecycle::Stopping(s) = &mut self.lifecycle else {
            return;
        };
        if all_gone {
            let connections_cut = s.connections_cut;
            let duration_ms = s.started.elapsed().as_millis() as u64;
            let waiters = std::mem::take(&mut s.waiters);
            let cause = s.cause.clone();
            tracing::info!(
                connections_cut,
                duration_ms,
                "haproxy stopped; {connections_cut} connections cut"
            );
            self.events
                .emit(EventBody::Stopped { connections_cut }, &cause);
            let node = self.settings.node_id();
            for (request_id, reply) in waiters {
                let r = StopResult {
                    connections_cut,
                    duration_ms,
                };
                let _ = reply.send(Reply::success(node, request_id, r));
            }
            self.lifecycle = Lifecycle::Stopped { connections_cut };
            self.dirty = true;
            return;
        }
        if now < s.deadline {
            return;
        }
        match s.escalated {
            0 => {
                for w in self.old.iter().chain(self.current.iter()) {
                    let open = procfs::client_connections(w.pid(), &self.client_ports);
                    s.connections_cut += open;
                    tracing::warn!(
                        pid = w.pid(),
                        open,
                        "stop timeout: hard-stopping worker {} with {open} open connections",
                        w.pid()
                    );
                    let _ = w.signal(Signal::TERM);
                }
                s.escalated = 1;
                s.deadline = now + KILL_GRACE;
            }
            _ => {
                for w in self.old.iter().chain(self.current.iter()) {
                    tracing::warn!(
                        pid = w.pid(),
                        "worker {} ignored SIGTERM; killing it",
                        w.pid()
                    );
                    let _ = w.signal(Signal::KILL);
                }
                s.escalated = 2;
                s.deadline = now + KILL_GRACE;
            }
        }
    }

    fn state(&self) -> NodeState {
        match &self.lifecycle {
            Lifecycle::Serving => match &self.drain {
                Some(d) if d.phase() == Phase::Drained => NodeState::Drained,
                Some(_) => NodeState::Draining,
                None if self.current.is_none() => NodeState::Failed,
                None => NodeState::Serving,
            },
            Lifecycle::Stopping(_) => NodeState::Stopping,
            Lifecycle::Stopped { .. } => NodeState::Stopped,
        }
    }

    fn status(&self) -> StatusResult {
        let cfg = &self.settings.config;
        let connections = self.old_connections();
        StatusResult {
            state: self.state(),
            node: cfg.node.id.clone(),
            groups: cfg.node.groups.clone(),
            boot_id: self.events.boot_id().to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            haproxy: HaproxyStatus {
                pid: self.current.as_ref().map(Worker::pid),
                config: cfg.haproxy.config.display().to_string(),
                config_sha256: self.current.as_ref().map(|w| w.config_sha256.clone()),
                mode: "direct".into(),
                started_at: self.current.as_ref().map(|w| rfc3339(w.started_at)),
                restarts: self.restarts,
            },
            old_workers: self
                .old
                .iter()
                .map(|w| OldWorker {
                    pid: w.pid(),
                    age_ms: w.age().as_millis() as u64,
                    connections: connections.get(&w.pid()).copied().unwrap_or(0),
                })
                .collect(),
            drain: self.drain.as_ref().map(|d| {
                let now = Instant::now();
                DrainStatus {
                    drain_id: d.id().to_string(),
                    started_at: rfc3339(
                        SystemTime::UNIX_EPOCH + Duration::from_millis(d.record.started_at_ms),
                    ),
                    elapsed_ms: d.elapsed(now).as_millis() as u64,
                    blockers: match d.phase() {
                        Phase::Draining => d.blockers(now, &self.view(Some(&connections))),
                        Phase::Drained => Vec::new(),
                    },
                }
            }),
            plugins: self.plugins.status(),
            last_reload: self.last_reload.clone(),
        }
    }

    fn persist(&mut self) {
        let mut state = State::new(self.settings.node_id(), procfs::kernel_boot_id());
        state.current = self.current.as_ref().map(Worker::record);
        state.old = self.old.iter().map(Worker::record).collect();
        state.restarts = self.restarts;
        state.last_reload = self.last_reload.clone();
        state.drain = self.drain.as_ref().map(|d| d.record.clone());
        state.drained_event = self.drained_event.clone();
        match state_file::save(&self.settings.config.haproxy.state_dir, &state) {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::error!("{e}"),
        }
    }
}

fn soft_stop(w: &Worker) {
    if let Err(e) = w.signal(Signal::USR1) {
        tracing::error!(pid = w.pid(), "cannot soft-stop worker {}: {e}", w.pid());
    }
}

fn ms_to_rfc3339(ms: u64) -> String {
    rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// Polls the target worker's stats every `poll_interval` while there is a target (only while
/// draining), and sends each sample to the node.
fn spawn_sampler(
    settings: &Settings,
    mut target: watch::Receiver<Option<u32>>,
    samples: mpsc::UnboundedSender<Sample>,
) {
    let admin = AdminSocket::new(&settings.admin_socket, Duration::from_secs(2));
    let cfg = settings.config.drain.clone();
    tokio::spawn(async move {
        loop {
            let pid = *target.borrow_and_update();
            let Some(pid) = pid else {
                if target.changed().await.is_err() {
                    return;
                }
                continue;
            };
            match admin.sample(pid).await {
                Ok((info, rows)) => {
                    let sample = Sample {
                        pid,
                        busy: drain::busy_count(cfg.idle, &cfg.ignore_frontends, &info, &rows),
                        accepted: drain::accepted_total(&cfg.ignore_frontends, &rows),
                    };
                    if samples.send(sample).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::debug!(pid, "stats sample failed: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.poll_interval.0) => {}
                changed = target.changed() => if changed.is_err() { return },
            }
        }
    });
}

/// Asks the plugins' idle checks about the current drain, again and again while there is one.
/// The host runs each call off the runtime with its timeout, so a hung plugin delays only itself.
fn spawn_checker(
    plugins: PluginHost,
    interval: Duration,
    mut target: watch::Receiver<Option<CheckContext>>,
    verdicts: mpsc::UnboundedSender<Vec<(String, Verdict)>>,
) {
    // Plugin calls cross threads and may do real work: no need to ask 100 times a second.
    let interval = interval.max(Duration::from_millis(100));
    tokio::spawn(async move {
        loop {
            let ctx = target.borrow_and_update().clone();
            let Some(mut ctx) = ctx else {
                if target.changed().await.is_err() {
                    return;
                }
                continue;
            };
            if let Some(started) = ctx.started_at_ms {
                ctx.elapsed_ms = Some(drain::unix_ms(SystemTime::now()).saturating_sub(started));
            }
            let results = plugins.check_idle(&ctx).await;
            if verdicts.send(results).is_err() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                changed = target.changed() => if changed.is_err() { return },
            }
        }
    });
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Installs a pushed config (checked with `haproxy -c` first, the previous file kept as last good),
/// then launches. A pushed config whose worker fails to start is rolled back on disk.
async fn launch_with(
    spec: &LaunchSpec,
    takeover: bool,
    draining: bool,
    pushed: Option<PushedConfig>,
    backup: &std::path::Path,
) -> Result<Launched, ReloadError> {
    let Some(pushed) = pushed else {
        return Ok(launch::launch(spec, takeover, draining).await?);
    };
    let install = |e: std::io::Error| ReloadError::Install(e.to_string());
    let dir = spec.config.parent().unwrap_or(std::path::Path::new("."));
    let candidate = dir.join(format!(
        ".ebb-pushed-{}.cfg",
        &pushed.sha256[..12.min(pushed.sha256.len())]
    ));
    tokio::fs::write(&candidate, pushed.text.as_bytes())
        .await
        .map_err(install)?;
    if let Err(e) = launch::check_config(&spec.binary, &candidate).await {
        let _ = tokio::fs::remove_file(&candidate).await;
        return Err(ReloadError::ConfigInvalid(e));
    }
    tokio::fs::copy(&spec.config, backup)
        .await
        .map_err(install)?;
    tokio::fs::rename(&candidate, &spec.config)
        .await
        .map_err(install)?;
    match launch::launch(spec, takeover, draining).await {
        Ok(l) => Ok(l),
        Err(e) => {
            // Leave the config that the running worker was started from, so a crash restart
            // does not pick up a config that cannot start.
            if let Err(re) = tokio::fs::copy(backup, &spec.config).await {
                tracing::error!(
                    "cannot restore {} from {}: {re}",
                    spec.config.display(),
                    backup.display()
                );
            }
            Err(e.into())
        }
    }
}
