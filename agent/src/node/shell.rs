//! The shell around the node core: it feeds the core what happened (commands, signals, worker
//! exits, launches, samples, verdicts, admin command results) and carries out what the core
//! decided (spawn, signal through pidfds, admin commands, persist, publish, hooks, replies).
//!
//! It decides nothing itself. Everything it learns goes to the core first; everything it does
//! comes out of [`NodeCore::poll_effect`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ebb_sdk::command::{Command, PushRequest};
use ebb_sdk::event::Event;
use ebb_sdk::plugin::{self as hooks, HookEvent};
use ebb_sdk::reply::{ErrorCode, Reply};
use rustix::process::Signal;
use tokio::sync::{mpsc, oneshot, watch};

use super::admin_queue::AdminQueues;
use super::adoption;
use super::checker::{Checker, Verdicts};
use super::core::{
    CommandJob, CoreConfig, Effect, Launched, NodeCore, Now, Origin, Outcome, ReplyTo, Request,
    Supervision, WorkerSignal,
};
use super::launcher::{self, ReloadError};
use super::master::{self, MasterSpec};
use super::sampler::{ConnectionCounter, Counting, Sample, Sampler};
use crate::bus::publisher::PublisherReport;
use crate::config::{Mode, PushPolicy, Settings};
use crate::digest::sha256_hex;
use crate::events::Cause;
use crate::haproxy::admin::AdminSocket;
use crate::haproxy::drain_map;
use crate::haproxy::launch::LaunchSpec;
use crate::haproxy::master::{MasterCli, ProcList};
use crate::haproxy::procfs;
use crate::haproxy::push_policy::{self, SafePolicy};
use crate::haproxy::worker::{self, Exit, Worker};
use crate::haproxy::worker_cli::WorkerCli;
use crate::inbox::{Input, Summary};
use crate::plugins::{PluginDisabled, PluginHost};
use crate::record::ProcessId;
use crate::reload::PushedConfig;
use crate::state_file;

/// What background tasks report to the node's task.
#[derive(Debug)]
enum Report {
    Exited(ProcessId, Exit),
    Launched {
        reload_id: String,
        result: Box<Result<crate::haproxy::launch::Launched, ReloadError>>,
    },
    /// master-worker mode: a reload through the master, carried out.
    MasterLaunched {
        reload_id: String,
        result: Box<Result<master::Ready, ReloadError>>,
    },
    /// master-worker mode: what `show proc` says now.
    MasterList(ProcList),
    /// master-worker mode: a worker exited, what `show proc` said just after, and the config's
    /// limits that force exits.
    MasterExited(ProcessId, Exit, Option<ProcList>, master::ForcedExits),
    Ports(u32, HashSet<u16>),
    Verdicts(Verdicts),
    CommandsDone(CommandJob, Result<(), String>),
    StoppingHookDone,
    AdminAnswers(Vec<u32>),
    ConnectionCounts(HashMap<u32, u64>),
}

/// How many samples may wait for the node task; older ones are worth nothing once a newer exists.
const SAMPLE_QUEUE: usize = 16;

pub struct Shell {
    settings: Arc<Settings>,
    core: NodeCore,
    spec: LaunchSpec,
    admin: AdminSocket,
    /// The OS handles of the workers the core records: pidfds to signal them by.
    workers: HashMap<ProcessId, Worker>,
    replies: HashMap<ReplyTo, oneshot::Sender<Reply>>,
    next_reply: u64,
    events: mpsc::Sender<Event>,
    /// Events made by the core, sent to the publisher before the node waits for its next input.
    unsent: Vec<Event>,
    publisher: watch::Receiver<PublisherReport>,
    summary: watch::Sender<Summary>,
    plugins: PluginHost,
    sampler: Sampler,
    counter: ConnectionCounter,
    /// The old workers of the counts the core holds, sorted.
    counted: Vec<u32>,
    checker: Checker,
    queues: AdminQueues,
    /// Ports HAProxy listens on, to tell client connections from server ones.
    client_ports: HashSet<u16>,
    confirming: bool,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports: mpsc::UnboundedReceiver<Report>,
    samples: mpsc::Receiver<Sample>,
    disabled: mpsc::UnboundedReceiver<PluginDisabled>,
    /// Keeps the workers' logs under `haproxy.worker_log_max_bytes` while the node runs.
    log_cap: worker::LogCap,
    /// master-worker mode: how to reach the master, and what is known of it.
    master: Option<MasterSpec>,
    watch: master::Watch,
    /// The old workers' connections as last counted: what a forced exit cut.
    last_counts: HashMap<u32, u64>,
    /// What `draining.map` says now.
    drain_map: Option<bool>,
    /// master-worker mode: since when each old worker has been old (told to stop by the master).
    old_since: HashMap<u32, Instant>,
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        wall: SystemTime::now(),
    }
}

impl Shell {
    /// Finds what a previous agent left (state file, verified HAProxy processes) and builds the
    /// core from it. Fails only when `state_dir` is unusable or the state file must not be
    /// overwritten.
    pub async fn start(
        settings: Arc<Settings>,
        boot_id: String,
        events: mpsc::Sender<Event>,
        publisher: watch::Receiver<PublisherReport>,
        summary: watch::Sender<Summary>,
        plugins: PluginHost,
    ) -> anyhow::Result<Shell> {
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
            env: hp.env.clone(),
            check_timeout: settings.config.push.check_timeout.0,
        };
        let admin = AdminSocket::new(&settings.admin_socket, Duration::from_secs(2));
        let master_spec = (hp.mode == Mode::MasterWorker).then(|| MasterSpec {
            cli: MasterCli::new(&hp.master_socket, master::CLI_TIMEOUT),
            socket: hp.master_socket.clone(),
            owned: hp.manage_master,
            launch: spec.clone(),
            log: spec.log_dir.join("master.log"),
        });
        let supervision = match &master_spec {
            None => Supervision::Direct,
            Some(m) => Supervision::Master { owned: m.owned },
        };
        let cli = match &master_spec {
            None => WorkerCli::Admin(admin.clone()),
            Some(m) => WorkerCli::Master(m.cli.clone()),
        };
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let (samples_tx, samples) = mpsc::channel(SAMPLE_QUEUE);
        let sampler = Sampler::spawn(cli.clone(), settings.config.drain.clone(), samples_tx);
        let counter = {
            let tx = reports_tx.clone();
            ConnectionCounter::spawn(master_spec.as_ref().map(|m| m.cli.clone()), move |counts| {
                tx.send(Report::ConnectionCounts(counts)).is_ok()
            })
        };
        let checker = {
            let tx = reports_tx.clone();
            Checker::spawn(
                plugins.clone(),
                settings.config.drain.poll_interval.0,
                move |v| tx.send(Report::Verdicts(v)).is_ok(),
            )
        };
        let queues = {
            let tx = reports_tx.clone();
            AdminQueues::new(
                cli.clone(),
                Arc::new(move |job, result| {
                    let _ = tx.send(Report::CommandsDone(job, result));
                }),
            )
        };
        // Without a receiver (taken already), the closed channel just never yields a notice.
        let disabled = plugins
            .take_disabled()
            .unwrap_or_else(|| mpsc::unbounded_channel().1);

        let log_cap = worker::LogCap::spawn(spec.log_dir.clone(), hp.worker_log_max_bytes);
        let (found, master_found) = match &master_spec {
            None => (adoption::find(&settings, &spec, &admin).await?, None),
            Some(m) => {
                let state = state_file::load(&hp.state_dir)?;
                let mut boot = state.as_ref().map(adoption::recorded).unwrap_or_default();
                let found = master::find(m).await;
                let mut workers = Vec::new();
                if let Some(f) = &found {
                    boot.answering = Some(f.answering.clone());
                }
                if let Some(f) = found.as_ref() {
                    for (w, current) in &f.workers {
                        boot.workers.push((w.record(), *current));
                    }
                }
                let mut found = found;
                if let Some(f) = found.as_mut() {
                    workers = std::mem::take(&mut f.workers)
                        .into_iter()
                        .map(|(w, _)| w)
                        .collect();
                }
                (adoption::Found { boot, workers }, found)
            }
        };
        let cfg = CoreConfig {
            supervision,
            node: settings.node_id().to_string(),
            groups: settings.config.node.groups.clone(),
            boot_id,
            kernel_boot_id: procfs::kernel_boot_id(),
            config_path: hp.config.display().to_string(),
            drain: settings.config.drain.clone(),
            stop_timeout: hp.stop_timeout.0,
            startup_timeout: hp.startup_timeout.0,
            check_timeout: settings.config.push.check_timeout.0,
            coalesce: settings.config.reload.coalesce.0,
            max_old_workers: settings.config.reload.max_old_workers,
            plugins: plugins.idle_checkers(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let core = NodeCore::new(cfg, found.boot, now());
        let mut shell = Shell {
            settings,
            core,
            spec,
            admin,
            workers: HashMap::new(),
            replies: HashMap::new(),
            next_reply: 0,
            events,
            unsent: Vec::new(),
            publisher,
            summary,
            plugins,
            sampler,
            counter,
            counted: Vec::new(),
            checker,
            queues,
            client_ports: HashSet::new(),
            confirming: false,
            reports_tx,
            reports,
            samples,
            disabled,
            log_cap,
            master: master_spec,
            watch: master::Watch::default(),
            last_counts: HashMap::new(),
            drain_map: None,
            old_since: HashMap::new(),
        };
        // Before anything starts HAProxy: a config that reads it must find it.
        let draining = shell.core.drain_id().is_some();
        shell.write_drain_map(draining).await;
        if let (Some(m), Some(f)) = (&shell.master, master_found) {
            shell.watch.master = Some(f.master);
            if let Some(view) = shell.watch.learn(m, f.list) {
                shell.core.handle_master_view(now(), view);
            }
            shell.spawn_watch(m.cli.clone());
        } else if let Some(m) = &shell.master {
            shell.spawn_watch(m.cli.clone());
        }
        for w in found.workers {
            w.watch_exit(None, shell.exit_reporter());
            shell.workers.insert(w.id, w);
        }
        if let Some(pid) = shell.core.current().map(|w| w.id.pid) {
            shell.client_ports = procfs::listening_ports(pid);
        }
        Ok(shell)
    }

    /// Runs until HAProxy is stopped for good or the agent detaches.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>) -> Outcome {
        let mut inputs_open = true;
        loop {
            let outcome = self.carry_out().await;
            self.send_events().await;
            if let Some(outcome) = outcome {
                return outcome;
            }
            self.aim_counter();
            self.log_cap
                .watch(self.workers.values().map(Worker::log_target).collect());
            let summary = Summary {
                state: self.core.state(),
                drain_id: self.core.drain_id().map(str::to_string),
            };
            self.summary
                .send_if_modified(|s| std::mem::replace(s, summary.clone()) != summary);
            let wake = self.core.poll_timeout();
            tokio::select! {
                input = inputs.recv(), if inputs_open => match input {
                    Some(Input::Command { command, reply }) => self.on_command(command, reply).await,
                    Some(Input::Signal(signal)) => self.core.handle_signal(now(), signal),
                    // Every sender is gone: nothing can command the node anymore. Said once: a
                    // closed channel answers at once, every time.
                    None => {
                        inputs_open = false;
                        self.core.handle_signal(now(), crate::inbox::AgentSignal::Stop);
                    }
                },
                Some(report) = self.reports.recv() => self.on_report(report),
                Some(sample) = self.samples.recv() => {
                    self.core.handle_sample(now(), sample);
                }
                Some(d) = self.disabled.recv() => {
                    tracing::error!(plugin = %d.name, "{d}");
                    self.core.handle_plugin_disabled(now(), d.name, d.reason, d.blocks_drains);
                }
                _ = sleep_until(wake) => self.core.handle_timeout(now()),
            }
        }
    }

    /// Hands the core's events to the publisher, in order. It takes them into the outbox without
    /// waiting for NATS or for the node, so this waits at most for the disk.
    async fn send_events(&mut self) {
        for event in self.unsent.drain(..) {
            // The publisher only goes away when the agent shuts down; the log line stays.
            if self.events.send(event).await.is_err() {
                break;
            }
        }
    }

    async fn on_command(&mut self, command: Command, reply: oneshot::Sender<Reply>) {
        let node = self.settings.node_id().to_string();
        let request_id = command.request_id().map(str::to_string);
        let to = ReplyTo(self.next_reply);
        self.next_reply += 1;
        let origin = Origin {
            to,
            request_id: request_id.clone(),
            cause: Cause {
                requester: command.requester().map(str::to_string),
                reason: command.reason().map(str::to_string),
            },
        };
        let request = match command {
            Command::Status(_) => {
                self.count_if_stale().await;
                let mut status = self.core.status(now(), self.plugins.status());
                let publisher = self.publisher.borrow().clone();
                status.outbox_depth = Some(publisher.outbox_depth);
                status.warnings.extend(publisher.warnings);
                let _ = reply.send(Reply::success(&node, request_id, status));
                return;
            }
            Command::Reload(req) => match self.check_reload(req.config_sha256) {
                Ok(()) => Request::Reload { pushed: None },
                Err((code, message)) => {
                    let _ = reply.send(Reply::failure(&node, request_id, code, message));
                    return;
                }
            },
            Command::Push(req) => match self.check_push(req) {
                Ok(pushed) => Request::Reload {
                    pushed: Some(pushed),
                },
                Err((code, message)) => {
                    let _ = reply.send(Reply::failure(&node, request_id, code, message));
                    return;
                }
            },
            Command::Drain(req) => Request::Drain(req),
            Command::Undrain(req) => Request::Undrain(req),
            Command::Stop(req) => Request::Stop {
                timeout: req.timeout_ms.map(Duration::from_millis),
            },
        };
        self.replies.insert(to, reply);
        self.core.handle_request(now(), origin, request);
    }

    /// Validates a reload's own field: the hash the client expects of the file on disk.
    fn check_reload(&self, sha: Option<String>) -> Result<(), (ErrorCode, String)> {
        let Some(expected) = sha else { return Ok(()) };
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
        Ok(())
    }

    /// Validates a push (its signature was checked by the bus, which knows its subject): allowed
    /// here, the hash matches the text, and the text passes the push policy.
    fn check_push(&self, req: PushRequest) -> Result<PushedConfig, (ErrorCode, String)> {
        let push = &self.settings.config.push;
        if !push.enabled {
            return Err((
                ErrorCode::Forbidden,
                "config push is disabled on this node; set push.enabled = true to allow it".into(),
            ));
        }
        let text = req.config.unwrap_or_default();
        let actual = sha256_hex(text.as_bytes());
        if let Some(expected) = req.config_sha256 {
            if expected != actual {
                return Err((
                    ErrorCode::InvalidRequest,
                    format!("config_sha256 {expected} does not match the pushed config (sha256 {actual}); send the lowercase hex SHA-256 of the exact bytes"),
                ));
            }
        }
        if push.policy == PushPolicy::Safe {
            let policy = SafePolicy {
                admin_socket: self.settings.admin_socket.clone(),
                allowed_paths: self.settings.push_allowed_paths.clone(),
            };
            if let Err(violations) = push_policy::check(&text, &policy) {
                let all: Vec<String> = violations
                    .iter()
                    .map(|v| format!("line {} [{}]: {}", v.line, v.rule, v.message))
                    .collect();
                return Err((
                    ErrorCode::ConfigInvalid,
                    format!(
                        "push.policy = \"safe\" refuses this config: {}",
                        all.join("; ")
                    ),
                ));
            }
        }
        Ok(PushedConfig {
            sha256: actual,
            text,
        })
    }

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Exited(id, exit) if self.master.is_some() => self.judge_exit(id, exit),
            Report::Exited(id, exit) => self.on_exit(id, exit, None),
            Report::MasterExited(id, exit, list, limits) => {
                let reloads_now = list
                    .as_ref()
                    .and_then(|l| l.master.as_ref())
                    .map(|m| m.reloads);
                // A current worker that exited because the master reloaded on its own (its
                // successor is listed) was displaced, not crashed: the core hears of the
                // successor first.
                if let Some(list) = list {
                    self.watch.forget_last();
                    self.on_master_list(list);
                }
                let held = self.last_counts.get(&id.pid).copied().unwrap_or(0);
                let stopping_for = self.old_since.remove(&id.pid).map(|t| t.elapsed());
                let forced = if self.watch.killed_by_max_reloads(
                    id.pid,
                    limits.max_reloads,
                    reloads_now,
                ) {
                    tracing::warn!(
                        pid = id.pid,
                        "old worker {} was killed by the master: it outlived mworker-max-reloads",
                        id.pid
                    );
                    Some(held)
                } else if self.core.current().is_some_and(|w| w.id != id)
                    && master::cut_by_hard_stop(limits, held, stopping_for)
                {
                    tracing::warn!(
                        pid = id.pid,
                        "old worker {} exited with {held} connections, hard-stop-after past its displacement: it was cut",
                        id.pid
                    );
                    Some(held)
                } else {
                    None
                };
                self.on_exit(id, exit, forced);
            }
            Report::MasterLaunched { reload_id, result } => {
                let launched = match *result {
                    Ok(ready) => {
                        let master::Ready {
                            worker,
                            started_master,
                            duration,
                        } = ready;
                        if let Some(child) = started_master {
                            self.own_master(child);
                        }
                        worker.watch_exit(None, self.exit_reporter());
                        let record = worker.record();
                        if self.client_ports.is_empty() {
                            self.client_ports = procfs::listening_ports(worker.pid());
                        } else {
                            self.spawn_ports(worker.pid());
                        }
                        self.workers.insert(worker.id, worker);
                        // The next `show proc` tells the core about this master, if it is new.
                        self.watch.forget_last();
                        self.poll_master_now();
                        Launched::Ready {
                            worker: record,
                            launch: duration,
                        }
                    }
                    Err(e) => Launched::Failed {
                        config_invalid: matches!(e, ReloadError::ConfigInvalid(_)),
                        message: e.to_string(),
                    },
                };
                self.core.handle_launched(now(), &reload_id, launched);
            }
            Report::MasterList(list) => self.on_master_list(list),
            Report::Launched { reload_id, result } => {
                let launched = match *result {
                    Ok(l) => {
                        let crate::haproxy::launch::Launched {
                            worker,
                            child,
                            duration,
                        } = l;
                        worker.watch_exit(Some(child), self.exit_reporter());
                        let record = worker.record();
                        if self.client_ports.is_empty() {
                            // The first worker: without its ports every TCP socket of a worker
                            // would count as a client connection.
                            self.client_ports = procfs::listening_ports(worker.pid());
                        } else {
                            self.spawn_ports(worker.pid());
                        }
                        self.workers.insert(worker.id, worker);
                        Launched::Ready {
                            worker: record,
                            launch: duration,
                        }
                    }
                    Err(e) => Launched::Failed {
                        config_invalid: matches!(e, ReloadError::ConfigInvalid(_)),
                        message: e.to_string(),
                    },
                };
                self.core.handle_launched(now(), &reload_id, launched);
            }
            Report::Ports(pid, ports) => {
                // Until they arrive, the previous worker's ports stand in: a reload rarely
                // changes them.
                if self.core.current().map(|w| w.id.pid) == Some(pid) && !ports.is_empty() {
                    self.client_ports = ports;
                }
            }
            Report::Verdicts(v) => self.core.handle_verdicts(now(), &v.drain_id, v.verdicts),
            Report::CommandsDone(job, result) => {
                self.core.handle_commands_done(now(), &job, result)
            }
            Report::StoppingHookDone => self.core.handle_stopping_hook_done(now()),
            Report::AdminAnswers(pids) => {
                self.confirming = false;
                self.core.handle_admin_answers(now(), &pids);
            }
            Report::ConnectionCounts(counts) => self.take_counts(counts),
        }
    }

    fn on_exit(&mut self, id: ProcessId, exit: Exit, forced: Option<u64>) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        self.queues.forget(id);
        self.last_counts.remove(&id.pid);
        // In master-worker mode the log is the master's (when ebb owns it), shared by every
        // worker: this worker's lines carry its pid.
        let log = worker::log_tail(&w.log, 64 * 1024);
        let log = if self.master.is_some() {
            let tag = format!("({})", id.pid);
            log.lines()
                .filter(|l| l.contains(&tag))
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            log
        };
        let hard_stopped = forced.or_else(|| worker::hard_stopped_connections(&log));
        match exit {
            Exit::Code(c) if c != 0 && self.core.current().is_some_and(|c| c.id == id) => {
                tracing::error!(
                    pid = id.pid,
                    "worker {} exited ({exit}): {}",
                    id.pid,
                    worker::startup_error(&log)
                );
            }
            _ => tracing::info!(pid = id.pid, "worker {} exited ({exit})", id.pid),
        }
        if self.master.is_none() {
            worker::remove_own_log(&w.log, &self.spec.log_dir);
        }
        let status = match exit {
            Exit::Code(c) => ebb_sdk::event::ExitStatus::Code(c),
            Exit::Unknown => ebb_sdk::event::ExitStatus::Unknown,
        };
        self.core
            .handle_worker_exit(now(), id, status, hard_stopped);
    }

    /// Carries out every effect the core has ready; returns the outcome once the node is done.
    async fn carry_out(&mut self) -> Option<Outcome> {
        while let Some(effect) = self.core.poll_effect() {
            match effect {
                Effect::Launch {
                    reload_id,
                    takeover,
                    draining,
                    config,
                } => {
                    // The new worker reads the drain from the map as it loads: it must say what
                    // the core launched it as.
                    self.write_drain_map(draining).await;
                    self.launch(reload_id, takeover, draining, config)
                }
                Effect::Signal { worker, signal } => self.signal(worker, signal),
                Effect::SignalMaster { master, signal } => self.signal_master(master, signal),
                Effect::Commands(job) => self.queues.push(job),
                Effect::Persist(state) => {
                    // The fsyncs run on the blocking pool; the node's task waits for them, as the
                    // effects after a persist (a reply, an event) must not leave before it is done.
                    let dir = self.settings.config.haproxy.state_dir.clone();
                    self.write_drain_map(state.drain.is_some()).await;
                    let saved =
                        tokio::task::spawn_blocking(move || state_file::save(&dir, &state)).await;
                    match saved {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!("{e}"),
                        Err(e) => tracing::error!("the state file was not written: {e}"),
                    }
                }
                Effect::Publish(event) => {
                    let json = serde_json::to_string(&event).unwrap_or_default();
                    tracing::info!(target: "ebb::event", kind = event.kind(), seq = event.seq, event = %json, "event {}", event.kind());
                    self.unsent.push(*event);
                }
                Effect::Reply { to, reply } => {
                    if let Some(tx) = self.replies.remove(&to) {
                        let _ = tx.send(*reply);
                    }
                }
                Effect::Hook(event) => self.plugins.hook(&event),
                Effect::StoppingHook => {
                    let plugins = self.plugins.clone();
                    let tx = self.reports_tx.clone();
                    tokio::spawn(async move {
                        let hook = HookEvent::Stopping(hooks::Stopping {});
                        for (name, result) in plugins.hook_wait(&hook).await {
                            if let Err(e) = result {
                                tracing::warn!(plugin = %name, "plugin {name}: {e}");
                            }
                        }
                        let _ = tx.send(Report::StoppingHookDone);
                    });
                }
                Effect::Sample(pid) => self.sampler.target(pid),
                Effect::Check(ctx) => self.checker.target(ctx.map(|c| *c)),
                Effect::ConfirmCurrent => self.confirm_current(),
                Effect::Exit(outcome) => {
                    if matches!(outcome, Outcome::Stopped { .. }) {
                        self.await_owned_master().await;
                    }
                    return Some(outcome);
                }
            }
        }
        None
    }

    fn launch(
        &mut self,
        reload_id: String,
        takeover: bool,
        draining: bool,
        config: Option<PushedConfig>,
    ) {
        let tx = self.reports_tx.clone();
        if let Some(m) = &self.master {
            let m = m.clone();
            tokio::spawn(async move {
                let result = master::launch(&m, takeover, config).await;
                let _ = tx.send(Report::MasterLaunched {
                    reload_id,
                    result: Box::new(result),
                });
            });
            return;
        }
        let spec = self.spec.clone();
        tokio::spawn(async move {
            let result = launcher::launch_with(&spec, takeover, draining, config).await;
            let _ = tx.send(Report::Launched {
                reload_id,
                result: Box::new(result),
            });
        });
    }

    fn spawn_ports(&self, pid: u32) {
        // The ports come from /proc/net/tcp, which takes milliseconds on a busy host: read after
        // the node has the new worker, so the reload is not held up by it.
        let tx = self.reports_tx.clone();
        tokio::spawn(async move {
            if let Ok(ports) =
                tokio::task::spawn_blocking(move || procfs::listening_ports(pid)).await
            {
                let _ = tx.send(Report::Ports(pid, ports));
            }
        });
    }

    fn signal(&mut self, id: ProcessId, signal: WorkerSignal) {
        let Some(w) = self.workers.get(&id) else {
            // The core signals only what it records, and every record has a handle: a missing
            // one is a bug, never a reason to signal a bare pid.
            tracing::error!(
                pid = id.pid,
                "no handle for worker {}: not signalled",
                id.pid
            );
            return;
        };
        let sig = match signal {
            WorkerSignal::SoftStop => Signal::USR1,
            WorkerSignal::HardStop => {
                let open = procfs::client_connections(id.pid, &self.client_ports);
                tracing::warn!(
                    pid = id.pid,
                    open,
                    "hard-stopping worker {} with {open} open connections",
                    id.pid
                );
                self.core.handle_connections_cut(now(), open);
                Signal::TERM
            }
            WorkerSignal::Kill => Signal::KILL,
        };
        if let Err(e) = w.signal(sig) {
            tracing::error!(pid = id.pid, "cannot signal worker {}: {e}", id.pid);
        }
    }

    /// Keeps `draining.map` in step with the drain, on the blocking pool.
    async fn write_drain_map(&mut self, draining: bool) {
        if self.drain_map == Some(draining) {
            return;
        }
        let dir = self.settings.config.haproxy.state_dir.clone();
        match tokio::task::spawn_blocking(move || drain_map::write(&dir, draining)).await {
            Ok(Ok(())) => self.drain_map = Some(draining),
            Ok(Err(e)) => tracing::error!(
                "cannot write {}: {e}; a config that reads it will not see the drain",
                drain_map::path(&self.settings.config.haproxy.state_dir).display()
            ),
            Err(e) => tracing::error!("draining.map was not written: {e}"),
        }
    }

    /// A stop's signal to a master ebb owns; it passes it on to every worker.
    fn signal_master(&mut self, id: ProcessId, signal: WorkerSignal) {
        let Some(m) = self.watch.master.as_ref().filter(|m| m.id == id) else {
            tracing::error!(
                pid = id.pid,
                "no handle for master {}: not signalled",
                id.pid
            );
            return;
        };
        let sig = match signal {
            WorkerSignal::SoftStop => Signal::USR1,
            WorkerSignal::HardStop => {
                let open: u64 = self
                    .core
                    .workers()
                    .map(|w| procfs::client_connections(w.id.pid, &self.client_ports))
                    .sum();
                tracing::warn!(
                    pid = id.pid,
                    open,
                    "hard-stopping haproxy (master {}) with {open} open connections",
                    id.pid
                );
                self.core.handle_connections_cut(now(), open);
                Signal::TERM
            }
            WorkerSignal::Kill => Signal::KILL,
        };
        if let Err(e) = m.signal(sig) {
            tracing::error!(pid = id.pid, "cannot signal master {}: {e}", id.pid);
        }
    }

    /// Asks the master what it runs every [`master::WATCH_INTERVAL`], for as long as the node runs.
    fn spawn_watch(&self, cli: MasterCli) {
        let tx = self.reports_tx.clone();
        tokio::spawn(async move {
            while !tx.is_closed() {
                tokio::time::sleep(master::WATCH_INTERVAL).await;
                if let Ok(list) = cli.show_proc().await {
                    if tx.send(Report::MasterList(list)).is_err() {
                        return;
                    }
                }
            }
        });
    }

    fn poll_master_now(&self) {
        let Some(m) = &self.master else { return };
        let cli = m.cli.clone();
        let tx = self.reports_tx.clone();
        tokio::spawn(async move {
            if let Ok(list) = cli.show_proc().await {
                let _ = tx.send(Report::MasterList(list));
            }
        });
    }

    fn on_master_list(&mut self, list: ProcList) {
        let Some(m) = self.master.clone() else { return };
        let Some(view) = self.watch.learn(&m, list) else {
            return;
        };
        if let Some(record) = &view.current {
            if !self.workers.contains_key(&record.id) {
                match master::track(&m, record.id.pid) {
                    Ok(w) if w.id == record.id => {
                        w.watch_exit(None, self.exit_reporter());
                        self.workers.insert(w.id, w);
                    }
                    // Gone already, or another process by now: the core hears nothing of it.
                    _ => return,
                }
            }
        }
        self.core.handle_master_view(now(), view);
    }

    /// An exit in master-worker mode: what the master says right after it tells whether it was
    /// displaced by a reload the master did on its own, and whether the master killed it for
    /// `mworker-max-reloads`.
    fn judge_exit(&self, id: ProcessId, exit: Exit) {
        let Some(m) = &self.master else { return };
        let cli = m.cli.clone();
        let tx = self.reports_tx.clone();
        let current = self.core.current().is_some_and(|w| w.id == id);
        let config = self.spec.config.clone();
        tokio::spawn(async move {
            let list = if current {
                master::successor(&cli, id.pid).await
            } else {
                master::after_exit(&cli).await
            };
            let limits = master::ForcedExits::read(&config).await;
            let _ = tx.send(Report::MasterExited(id, exit, list, limits));
        });
    }

    /// Reaps a master ebb started; its exit makes the watch look again at once.
    fn own_master(&mut self, mut child: tokio::process::Child) {
        let tx = self.reports_tx.clone();
        let cli = self.master.as_ref().map(|m| m.cli.clone());
        self.watch.owned_exit = Some(tokio::spawn(async move {
            let status = child.wait().await;
            tracing::info!("the haproxy master exited ({status:?})");
            if let Some(cli) = cli {
                if let Ok(list) = cli.show_proc().await {
                    let _ = tx.send(Report::MasterList(list));
                }
            }
        }));
    }

    /// After a stop, a master ebb owns exits once its last worker did: wait for it (bounded), so
    /// the next start does not find it still on its socket.
    async fn await_owned_master(&mut self) {
        let Some(task) = self.watch.owned_exit.take() else {
            return;
        };
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            if let Some(m) = &self.watch.master {
                tracing::warn!(
                    pid = m.pid(),
                    "the haproxy master outlived its workers: killing it"
                );
                let _ = m.signal(Signal::KILL);
            }
        }
    }

    /// Asks the admin socket who answers, with backoff, until someone does.
    fn confirm_current(&mut self) {
        if self.confirming {
            return;
        }
        self.confirming = true;
        let admin = self.admin.clone();
        let tx = self.reports_tx.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(20);
            // Ends once someone answers, or once the node's task is gone.
            while !tx.is_closed() {
                tokio::time::sleep(wait).await;
                let pids = adoption::answering(&admin).await;
                if !pids.is_empty() {
                    let _ = tx.send(Report::AdminAnswers(pids));
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        });
    }

    /// The old workers the core records now, sorted.
    fn old_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .core
            .workers()
            .skip(usize::from(self.core.current().is_some()))
            .map(|w| w.id.pid)
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Points the connection counter at the old workers the core records now.
    fn aim_counter(&mut self) {
        if self.master.is_some() {
            let old = self.old_pids();
            self.old_since.retain(|pid, _| old.contains(pid));
            for pid in old {
                self.old_since.entry(pid).or_insert_with(Instant::now);
            }
        }
        self.counter.target(Counting {
            pids: self.old_pids(),
            client_ports: self.client_ports.clone(),
        });
    }

    fn take_counts(&mut self, counts: HashMap<u32, u64>) {
        let mut counted: Vec<u32> = counts.keys().copied().collect();
        counted.sort_unstable();
        self.counted = counted;
        // What a forced exit cut: the last count that found connections. A kill closes them before
        // the worker exits, so a count taken in between finds none; and an old worker with none
        // left exits by itself, so one still there to be killed still held them.
        let old = self.old_pids();
        self.last_counts.retain(|pid, _| old.contains(pid));
        for (&pid, &n) in &counts {
            if n > 0 || !self.last_counts.contains_key(&pid) {
                self.last_counts.insert(pid, n);
            }
        }
        self.core.handle_connection_counts(counts);
    }

    /// `status` serves the counter's numbers. Only when the old workers changed since its last
    /// count (a reload a moment ago) does it count them itself, on the blocking pool, so that a
    /// worker displaced with a request in flight never shows 0 connections.
    async fn count_if_stale(&mut self) {
        let pids = self.old_pids();
        if pids == self.counted {
            return;
        }
        let counting = Counting {
            pids,
            client_ports: self.client_ports.clone(),
        };
        let master = self.master.as_ref().map(|m| &m.cli);
        let counts = super::sampler::count_connections(master, counting).await;
        self.take_counts(counts);
    }

    fn exit_reporter(&self) -> impl FnOnce(ProcessId, Exit) + Send + 'static {
        let reports = self.reports_tx.clone();
        move |id, exit| {
            let _ = reports.send(Report::Exited(id, exit));
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
