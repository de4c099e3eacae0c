//! The node core: every rule of the node's lifecycle, as one state machine without I/O.
//!
//! It owns the facts: the lifecycle, the workers (keyed by pid + start time), the reload queue and
//! the restart backoff, the drain with what was observed for it, and the event sequence. Inputs
//! come in through `handle_*` with the time passed in; what must happen comes out of
//! [`NodeCore::poll_effect`], in order, and [`NodeCore::poll_timeout`] says when to call
//! [`NodeCore::handle_timeout`]. The shell (`node::shell`) feeds it and carries the effects out.
//!
//! The rules, state by state, are the table in docs/ARCHITECTURE.md ("The node's lifecycle"). In
//! short: no input starts, signals or forgets a HAProxy process unless its cell says so; a drained
//! node starts no worker; a worker is signalled only while it is recorded here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use ebb_sdk::command::{DrainRequest, UndrainRequest};
use ebb_sdk::event::{Event, EventBody, ExitStatus, WorkerRole};
use ebb_sdk::plugin::{self as hooks, CheckContext, HookEvent, Verdict};
use ebb_sdk::reply::{DrainResult, ErrorCode, ReloadResult, Reply, StopResult, UndrainResult};
use ebb_sdk::status::{
    Blocker, DrainStatus, HaproxyStatus, LastReload, NodeState, OldWorker, PluginStatus,
    StatusResult, Timeouts,
};

use crate::backoff::Backoff;
use crate::config::DrainConfig;
use crate::drain::{self, Action, Drain, Phase, Policy, View};
use crate::events::{rfc3339, Cause, Envelope};
pub use crate::inbox::AgentSignal;
use crate::record::{ProcessId, WorkerRecord};
use crate::reload::{PushedConfig, ReloadQueue};
use crate::state_file::State;

pub use super::effect::{
    CommandJob, CommandKind, Effect, Launched, MasterView, Outcome, ReplyTo, Sample, WorkerSignal,
};

/// Restart backoff after a crash: 100 ms doubling to 10 s; a worker that ran a minute resets it.
const RESTART_BASE: Duration = Duration::from_millis(100);
const RESTART_CAP: Duration = Duration::from_secs(10);
const RESTART_STABLE: Duration = Duration::from_secs(60);
/// After SIGTERM at the stop deadline, how long before SIGKILL (and between SIGKILLs).
const KILL_GRACE: Duration = Duration::from_secs(5);
/// What a plugin's blocker says until it answered for this drain.
pub const NOT_YET_ANSWERED: &str = "waiting for the first idle check";

/// The two clocks: `mono` for durations, `wall` for what is reported and persisted.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

/// Who forks HAProxy's workers, which decides who signals them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supervision {
    /// ebb starts every worker (`direct` mode) and signals each one itself.
    Direct,
    /// A master (`haproxy -W`, `master-worker` mode) forks the workers and soft-stops the
    /// displaced ones at each reload; ebb reloads it through its master CLI. `owned`: ebb started
    /// the master and may stop it; otherwise a service manager runs it, and ebb never stops it.
    Master { owned: bool },
}

impl Supervision {
    /// A master that a service manager runs: ebb never stops it, so nothing may ask ebb to.
    pub fn is_attached(self) -> bool {
        self == Supervision::Master { owned: false }
    }
}

/// What the core is told once, at construction.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub supervision: Supervision,
    pub node: String,
    pub groups: Vec<String>,
    pub boot_id: String,
    /// The kernel boot the recorded pids belong to, written into the state file.
    pub kernel_boot_id: String,
    pub config_path: String,
    pub drain: DrainConfig,
    pub stop_timeout: Duration,
    /// Only reported in status: the launcher enforces it.
    pub startup_timeout: Duration,
    /// Only reported in status: the launcher enforces it.
    pub check_timeout: Duration,
    pub coalesce: Duration,
    /// `reload.max_old_workers`: a reload that would displace the current worker into one more old
    /// worker than this is refused. Nothing is ever killed to make room.
    pub max_old_workers: usize,
    /// The configured plugins, in order: each counts as busy in a drain until it answered for it.
    pub plugins: Vec<String>,
    pub version: String,
}

/// What an agent finds when it starts: its state file's facts and the HAProxy processes that
/// passed verification (pid, start time, binary, user, config).
#[derive(Debug, Clone, Default)]
pub struct Boot {
    pub restarts: u32,
    pub last_reload: Option<LastReload>,
    pub drain: Option<drain::Record>,
    pub drained_event: Option<Event>,
    /// The previous agent was stopping HAProxy.
    pub stopping: bool,
    /// Verified live workers; `true` for the one the state file recorded as current.
    pub workers: Vec<(WorkerRecord, bool)>,
    /// Pids that answered the admin socket; `None` when it could not be reached.
    pub answering: Option<Vec<u32>>,
}

/// A request from the bus, checked for its own fields already.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Reload { pushed: Option<PushedConfig> },
    Drain(DrainRequest),
    Undrain(UndrainRequest),
    Stop { timeout: Option<Duration> },
}

/// Who sent a request, and where its reply goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub to: ReplyTo,
    pub request_id: Option<String>,
    pub cause: Cause,
}

/// Who waits for a reload.
#[derive(Debug)]
enum Waiter {
    Request(Origin),
    Signal,
    /// The start of a worker where none runs: the first start, a crash restart, an undrain.
    Restart,
}

#[derive(Debug)]
enum Lifecycle {
    Running,
    Stopping(Stopping),
    Stopped {
        /// The drain whose `stop_when_drained` stopped HAProxy, if that is how it stopped.
        by_drain: Option<String>,
        connections_cut: u64,
    },
}

#[derive(Debug)]
pub struct NodeCore {
    cfg: CoreConfig,
    /// The time of the input being handled: everything the core does is stamped with it.
    clock: Now,
    envelope: Envelope,
    lifecycle: Lifecycle,
    /// Exit once HAProxy is stopped (SIGTERM, or SIGUSR2 during a stop).
    exit_when_stopped: bool,
    current: Option<WorkerRecord>,
    /// master-worker mode: the master last seen, and its version.
    master: Option<(ProcessId, String)>,
    /// master-worker mode: current workers that exited while a reload ran (the master stopped
    /// them): that reload displaced them.
    displaced: Vec<u32>,
    /// Displaced workers, oldest first, until their exit is reported.
    old: Vec<WorkerRecord>,
    /// The admin socket has not yet said which adopted worker is current: nothing adopted is
    /// signalled until it does.
    unconfirmed: bool,
    /// No worker has been started or adopted yet (`starting`).
    starting: bool,
    reloads: ReloadQueue<Waiter>,
    restart_at: Option<Instant>,
    backoff: Backoff,
    restarts: u32,
    last_reload: Option<LastReload>,
    drain: Option<DrainRun>,
    /// Open client connections of each old worker, as last counted by the shell.
    connections: HashMap<u32, u64>,
    /// Admin commands that keep failing, per worker: shown in status.
    failing_commands: BTreeMap<ProcessId, String>,
    /// What the sampler and the plugin checker were last told.
    sampling: Option<u32>,
    checking: Option<String>,
    dirty: bool,
    effects: VecDeque<Effect>,
    /// Where the effects of the input being handled begin.
    batch_start: usize,
}

impl NodeCore {
    /// A core for an agent that starts with what `boot` found: it adopts the verified workers,
    /// resumes the recorded drain, or starts a worker when none runs.
    pub fn new(cfg: CoreConfig, boot: Boot, now: Now) -> NodeCore {
        let mut core = NodeCore {
            clock: now,
            envelope: Envelope::new(&cfg.node, &cfg.boot_id),
            reloads: ReloadQueue::new(cfg.coalesce),
            cfg,
            lifecycle: Lifecycle::Running,
            exit_when_stopped: false,
            current: None,
            master: None,
            displaced: Vec::new(),
            old: Vec::new(),
            unconfirmed: false,
            starting: false,
            restart_at: None,
            backoff: Backoff::new(RESTART_BASE, RESTART_CAP, RESTART_STABLE),
            restarts: boot.restarts,
            last_reload: boot.last_reload,
            drain: None,
            connections: HashMap::new(),
            failing_commands: BTreeMap::new(),
            sampling: None,
            checking: None,
            dirty: true,
            effects: VecDeque::new(),
            batch_start: 0,
        };
        if let Some(record) = boot.drain {
            tracing::info!(drain_id = %record.drain_id, "resuming drain {}", record.drain_id);
            let drain = Drain::resume(record, core.cfg.drain.idle, now.mono, now.wall);
            let mut run = DrainRun::new(drain, Cause::default(), &core.cfg.plugins, true);
            run.drained_event = boot.drained_event;
            core.drain = Some(run);
        }
        // A stop in progress is finished, and a node that `stop_when_drained` stopped stays
        // stopped: an agent restart never puts back into service what was taken out of it.
        let by_drain = core
            .drain
            .as_ref()
            .filter(|d| d.is_drained() && d.drain.record.policy.stop_when_drained)
            .map(|d| d.id().to_string());
        let stop = boot.stopping || by_drain.is_some();
        let drained = core.drain.as_ref().is_some_and(DrainRun::is_drained);
        if boot.workers.is_empty() && stop {
            core.lifecycle = Lifecycle::Stopped {
                by_drain,
                connections_cut: 0,
            };
        } else if boot.workers.is_empty() && drained {
            // A drained node starts no worker.
        } else {
            core.adopt(boot.workers, boot.answering);
            if stop {
                core.begin_stop(now, None, None, Cause::default(), by_drain);
            }
        }
        if let Some(event) = core.drain.as_ref().and_then(|d| d.drained_event.clone()) {
            // It may never have left: the stream drops it if it did (same Msg-Id).
            core.push(Effect::Publish(Box::new(event)));
        }
        if !core.starting {
            core.agent_started(true);
        }
        core.after(now);
        core
    }

    fn adopt(&mut self, mut workers: Vec<(WorkerRecord, bool)>, answering: Option<Vec<u32>>) {
        if workers.is_empty() {
            self.starting = true;
            self.request_reload(Waiter::Restart, None);
            return;
        }
        workers.sort_by_key(|(w, _)| w.id.start_time);
        let answers = |w: &WorkerRecord| answering.as_ref().is_some_and(|a| a.contains(&w.id.pid));
        // The newest worker that answers is current; until the socket answers, the one recorded
        // as current (else the newest) stands in, and nothing is signalled.
        let pick = workers
            .iter()
            .rposition(|(w, _)| answers(w))
            .or_else(|| workers.iter().rposition(|(_, was_current)| *was_current))
            .unwrap_or(workers.len() - 1);
        self.unconfirmed = !workers.iter().any(|(w, _)| answers(w));
        let (w, _) = workers.remove(pick);
        tracing::info!(
            pid = w.id.pid,
            "adopted running haproxy worker {}",
            w.id.pid
        );
        self.current = Some(w);
        for (w, _) in workers {
            tracing::info!(pid = w.id.pid, "adopted old worker {}", w.id.pid);
            self.old.push(w);
        }
        if self.unconfirmed {
            tracing::warn!(
                "the admin socket does not answer: keeping the adopted workers as they are until it does"
            );
            self.push(Effect::ConfirmCurrent);
        } else {
            self.soft_stop_old();
        }
        if let Some(pid) = self.current_pid() {
            self.send_drain_commands_to_current(pid);
        }
    }

    /// An agent may have died between a new worker's readiness and signalling the displaced one;
    /// a second SIGUSR1 to a worker that is already stopping changes nothing.
    fn soft_stop_old(&mut self) {
        if self.cfg.supervision != Supervision::Direct {
            // The master told them at the reload that displaced them.
            return;
        }
        let ids: Vec<ProcessId> = self.old.iter().map(|w| w.id).collect();
        for worker in ids {
            self.push(Effect::Signal {
                worker,
                signal: WorkerSignal::SoftStop,
            });
        }
    }

    fn agent_started(&mut self, adopted: bool) {
        let pid = self.current_pid();
        let version = self.cfg.version.clone();
        self.emit(
            EventBody::AgentStarted {
                version,
                adopted: adopted && pid.is_some(),
                pid,
            },
            &Cause::default(),
        );
    }

    // ---------------------------------------------------------------------------------------
    // Queries
    // ---------------------------------------------------------------------------------------

    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// When [`NodeCore::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stop = match &self.lifecycle {
            Lifecycle::Stopping(s) => match s.phase {
                StopPhase::Hook => None,
                StopPhase::Soft { deadline }
                | StopPhase::Term { deadline }
                | StopPhase::Kill { deadline } => Some(deadline),
            },
            _ => None,
        };
        let restart = self.restart_at.filter(|_| !self.reloads.is_running());
        let drain = self
            .drain
            .as_ref()
            .and_then(|d| d.drain.next_wake(self.clock.mono, &self.view(d)));
        [self.reloads.next_start(), restart, stop, drain]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn state(&self) -> NodeState {
        match &self.lifecycle {
            Lifecycle::Stopping(_) => NodeState::Stopping,
            Lifecycle::Stopped { .. } => NodeState::Stopped,
            Lifecycle::Running => match &self.drain {
                Some(d) if d.is_drained() => NodeState::Drained,
                Some(_) => NodeState::Draining,
                None if self.current.is_some() => NodeState::Serving,
                // No worker yet, and one is on its way.
                None if self.starting || self.reloads.is_running() => NodeState::Starting,
                None => NodeState::Failed,
            },
        }
    }

    pub fn drain_id(&self) -> Option<&str> {
        self.drain.as_ref().map(DrainRun::id)
    }

    pub fn current(&self) -> Option<&WorkerRecord> {
        self.current.as_ref()
    }

    /// Every worker the core answers for: current first, then the old ones.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.current.iter().chain(self.old.iter())
    }

    /// master-worker mode: the master last seen.
    pub fn master(&self) -> Option<ProcessId> {
        self.master.as_ref().map(|(m, _)| *m)
    }

    pub fn is_recorded(&self, id: ProcessId) -> bool {
        self.workers().any(|w| w.id == id)
    }

    /// The blockers of the drain (empty once drained or when not draining).
    pub fn blockers(&self, now: Now) -> Vec<Blocker> {
        match &self.drain {
            Some(d) if !d.is_drained() => d.drain.blockers(now.mono, &self.view(d)),
            _ => Vec::new(),
        }
    }

    /// The `status` result. `plugins` is the plugin host's view of their health.
    pub fn status(&self, now: Now, plugins: Vec<PluginStatus>) -> StatusResult {
        let age = |w: &WorkerRecord| drain::unix_ms(now.wall).saturating_sub(w.started_at_ms);
        StatusResult {
            state: self.state(),
            node: self.cfg.node.clone(),
            groups: self.cfg.groups.clone(),
            boot_id: self.envelope.boot_id().to_string(),
            agent_version: self.cfg.version.clone(),
            haproxy: HaproxyStatus {
                pid: self.current_pid(),
                config: self.cfg.config_path.clone(),
                config_sha256: self
                    .current
                    .as_ref()
                    .map(|w| w.config_sha256.clone())
                    .filter(|s| !s.is_empty()),
                mode: match self.cfg.supervision {
                    Supervision::Direct => "direct".into(),
                    Supervision::Master { .. } => "master-worker".into(),
                },
                master_pid: self.master.as_ref().map(|(m, _)| m.pid),
                started_at: self
                    .current
                    .as_ref()
                    .map(|w| ms_to_rfc3339(w.started_at_ms)),
                restarts: self.restarts,
            },
            old_workers: self
                .old
                .iter()
                .map(|w| OldWorker {
                    pid: w.id.pid,
                    age_ms: age(w),
                    connections: self.connections.get(&w.id.pid).copied().unwrap_or(0),
                })
                .collect(),
            drain: self.drain.as_ref().map(|d| DrainStatus {
                drain_id: d.id().to_string(),
                started_at: ms_to_rfc3339(d.drain.record.started_at_ms),
                elapsed_ms: d.drain.elapsed(now.mono).as_millis() as u64,
                blockers: self.blockers(now),
            }),
            plugins,
            last_reload: self.last_reload.clone(),
            warnings: self.warnings(),
            timeouts: Some(Timeouts {
                startup_ms: self.cfg.startup_timeout.as_millis() as u64,
                check_ms: Some(self.cfg.check_timeout.as_millis() as u64),
                stop_ms: self.cfg.stop_timeout.as_millis() as u64,
            }),
            // The outbox is the publisher's; the shell adds its depth.
            outbox_depth: None,
        }
    }

    fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self.failing_commands.values().cloned().collect();
        if self.unconfirmed {
            out.push(
                "the admin socket does not answer: the adopted workers are kept as they are and \
                 nothing is signalled until it does; check HAProxy's `stats socket` line"
                    .into(),
            );
        }
        out
    }

    // ---------------------------------------------------------------------------------------
    // Inputs
    // ---------------------------------------------------------------------------------------

    pub fn handle_request(&mut self, now: Now, origin: Origin, request: Request) {
        self.begin(now);
        match request {
            Request::Reload { pushed } => self.on_reload(Waiter::Request(origin), pushed),
            Request::Drain(req) => self.on_drain(now, origin, req),
            Request::Undrain(req) => self.on_undrain(origin, req),
            Request::Stop { .. } if self.cfg.supervision.is_attached() => {
                self.reply_err(
                    origin,
                    ErrorCode::Conflict,
                    "cannot stop: HAProxy's master is run by a service manager, not by ebb; stop \
                     it there (systemctl stop haproxy), or drain the node instead"
                        .into(),
                );
            }
            Request::Stop { timeout } => {
                let cause = origin.cause.clone();
                self.begin_stop(now, timeout, Some(origin), cause, None);
            }
        }
        self.after(now);
    }

    pub fn handle_signal(&mut self, now: Now, signal: AgentSignal) {
        self.begin(now);
        match signal {
            AgentSignal::Reload => self.on_reload(Waiter::Signal, None),
            // A master that a service manager runs outlives the agent: SIGTERM detaches.
            AgentSignal::Stop if self.cfg.supervision.is_attached() => {
                self.handle_signal_detach();
            }
            AgentSignal::Stop => {
                self.exit_when_stopped = true;
                match self.lifecycle {
                    Lifecycle::Stopped { .. } => self.exit(),
                    _ => self.begin_stop(now, None, None, Cause::default(), None),
                }
            }
            AgentSignal::Detach => self.handle_signal_detach(),
        }
        self.after(now);
    }

    fn handle_signal_detach(&mut self) {
        match self.lifecycle {
            // Finish the stop first: the next agent must not find a half-stopped HAProxy.
            Lifecycle::Stopping(_) => self.exit_when_stopped = true,
            Lifecycle::Stopped { .. } => self.exit(),
            Lifecycle::Running => {
                tracing::info!("detaching: haproxy keeps running for the next agent to adopt");
                self.persist();
                self.push(Effect::Exit(Outcome::Detached));
            }
        }
    }

    /// master-worker mode: what the master says now. A new master (restarted under the agent) is
    /// reported; a worker the master forked on its own (`systemctl reload haproxy`, or a new
    /// master's first worker) becomes current and, during a drain, gets the drain's commands.
    pub fn handle_master_view(&mut self, now: Now, view: MasterView) {
        self.begin(now);
        let previous = self.master.as_ref().map(|(m, _)| *m);
        if previous != Some(view.master) {
            tracing::info!(
                pid = view.master.pid,
                version = %view.version,
                "attached to haproxy master {}",
                view.master.pid
            );
            self.emit(
                EventBody::MasterAttached {
                    pid: view.master.pid,
                    previous_pid: previous.map(|m| m.pid),
                    version: view.version.clone(),
                },
                &Cause::default(),
            );
        }
        self.master = Some((view.master, view.version));
        let forked = view
            .current
            .filter(|w| !self.is_recorded(w.id) && matches!(self.lifecycle, Lifecycle::Running));
        // During a reload of ebb's own, the launch reports the new worker.
        if let (Some(worker), false) = (forked, self.reloads.is_running()) {
            self.adopt_forked(now, worker);
        }
        self.after(now);
    }

    fn adopt_forked(&mut self, now: Now, worker: WorkerRecord) {
        let pid = worker.id.pid;
        let config_sha256 = worker.config_sha256.clone();
        let displaced = self.install_current(worker);
        self.restart_at = None;
        tracing::info!(pid, old_pids = ?displaced, "the haproxy master forked worker {pid}: it is current");
        let draining = self.drain.is_some();
        if draining {
            self.send_drain_commands_to_current(pid);
        }
        let reload_id = uuid::Uuid::new_v4().to_string();
        self.last_reload = Some(LastReload {
            reload_id: reload_id.clone(),
            at: rfc3339(now.wall),
            ok: true,
            duration_ms: 0,
            error: None,
        });
        self.emit(
            EventBody::Reloaded {
                reload_id,
                pid,
                old_pids: displaced,
                duration_ms: 0,
                config_sha256,
                draining,
                pushed: false,
            },
            &Cause::default(),
        );
    }

    pub fn handle_launched(&mut self, now: Now, reload_id: &str, launched: Launched) {
        self.begin(now);
        if self.reloads.running().map(|r| r.reload_id.as_str()) != Some(reload_id) {
            return;
        }
        let Some(running) = self.reloads.finish(now.mono) else {
            return;
        };
        let was_starting = std::mem::replace(&mut self.starting, false);
        let restart = running
            .batch
            .waiters
            .iter()
            .any(|w| matches!(w, Waiter::Restart));
        let cause = running
            .batch
            .waiters
            .iter()
            .find_map(|w| match w {
                Waiter::Request(o) => Some(o.cause.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let duration_ms = now.mono.duration_since(running.started).as_millis() as u64;
        let pushed = running.batch.config.is_some();
        self.dirty = true;
        match launched {
            Launched::Ready { worker, launch } => {
                let pid = worker.id.pid;
                let config_sha256 = worker.config_sha256.clone();
                let mut displaced = std::mem::take(&mut self.displaced);
                displaced.extend(self.install_current(worker));
                if restart && !was_starting {
                    self.restarts += 1;
                }
                self.restart_at = None;
                // The agent's first worker is a start, not a reload: `agent_started` says it.
                if !was_starting {
                    self.last_reload = Some(LastReload {
                        reload_id: running.reload_id.clone(),
                        at: rfc3339(now.wall),
                        ok: true,
                        duration_ms,
                        error: None,
                    });
                }
                tracing::info!(pid, old_pids = ?displaced, duration_ms, launch_ms = launch.as_millis() as u64, "worker {pid} serves");
                // A worker of a draining node already answers 503 (EBB_DRAINING=1) and gets the
                // drain's commands as well; one started draining whose drain ended meanwhile
                // gets the undrain's.
                let draining = self.drain.is_some();
                if draining {
                    self.send_drain_commands_to_current(pid);
                } else if running.draining {
                    self.queue_commands(pid, CommandKind::Stop, String::new());
                }
                let drain_id = self.drain_id().map(str::to_string);
                if was_starting {
                    self.agent_started(false);
                } else {
                    self.emit(
                        EventBody::Reloaded {
                            reload_id: running.reload_id.clone(),
                            pid,
                            old_pids: displaced.clone(),
                            duration_ms,
                            config_sha256: config_sha256.clone(),
                            draining,
                            pushed,
                        },
                        &cause,
                    );
                    self.push(Effect::Hook(Box::new(HookEvent::Reloaded(
                        hooks::Reloaded {
                            draining,
                            drain_id,
                            reload_id: Some(running.reload_id.clone()),
                            pid: Some(pid),
                        },
                    ))));
                }
                let result = ReloadResult {
                    reload_id: running.reload_id,
                    pid,
                    old_pids: displaced,
                    duration_ms,
                    config_sha256,
                    pushed,
                };
                for w in running.batch.waiters {
                    self.answer_reload(w, Ok(result.clone()));
                }
                // A worker started while stopping joins the others on their way out.
                if let Lifecycle::Stopping(s) = &self.lifecycle {
                    if s.phase != StopPhase::Hook {
                        self.retire_current();
                    }
                }
            }
            Launched::Failed {
                config_invalid,
                message,
            } => {
                self.displaced.clear();
                let message = if self.current.is_some() {
                    format!("{message}; the running worker was not touched")
                } else {
                    message
                };
                tracing::warn!(reload_id = %running.reload_id, "reload failed: {message}");
                let code = if config_invalid {
                    ErrorCode::ConfigInvalid
                } else {
                    ErrorCode::ReloadFailed
                };
                self.last_reload = Some(LastReload {
                    reload_id: running.reload_id.clone(),
                    at: rfc3339(now.wall),
                    ok: false,
                    duration_ms,
                    error: Some(message.clone()),
                });
                if was_starting {
                    self.agent_started(false);
                }
                self.emit(
                    EventBody::ReloadFailed {
                        reload_id: running.reload_id.clone(),
                        error: message.clone(),
                    },
                    &cause,
                );
                for w in running.batch.waiters {
                    self.answer_reload(w, Err((code, message.clone())));
                }
                self.schedule_restart(now, Duration::ZERO);
            }
        }
        self.after(now);
    }

    /// A worker exited. `hard_stopped` is what its log says `hard-stop-after` cut, if it did.
    pub fn handle_worker_exit(
        &mut self,
        now: Now,
        id: ProcessId,
        status: ExitStatus,
        hard_stopped: Option<u64>,
    ) {
        self.begin(now);
        let master = self.cfg.supervision != Supervision::Direct;
        if master && self.reloads.is_running() && self.current.as_ref().is_some_and(|w| w.id == id)
        {
            // The master soft-stops the worker a reload displaces, and an idle one exits before
            // the new worker answers: it is the reload's old worker, not a crash.
            if let Some(w) = self.current.take() {
                self.displaced.push(w.id.pid);
                self.old.push(w);
            }
        }
        let role = if self.current.as_ref().is_some_and(|w| w.id == id) {
            WorkerRole::Current
        } else if self.old.iter().any(|w| w.id == id) {
            WorkerRole::Old
        } else {
            return;
        };
        let worker = match role {
            WorkerRole::Current => self.current.take(),
            WorkerRole::Old => self
                .old
                .iter()
                .position(|w| w.id == id)
                .map(|i| self.old.remove(i)),
        };
        let Some(worker) = worker else { return };
        self.dirty = true;
        self.connections.remove(&id.pid);
        self.failing_commands.remove(&id);
        let connections_cut = hard_stopped.unwrap_or(0);
        if let Lifecycle::Stopping(s) = &mut self.lifecycle {
            s.connections_cut += connections_cut;
        }
        if let Some(d) = &mut self.drain {
            if !d.is_drained() {
                d.drain.add_cut(connections_cut);
            }
            if role == WorkerRole::Current {
                d.sample = None;
            }
        }
        if hard_stopped.is_some() {
            tracing::warn!(
                pid = id.pid,
                connections_cut,
                "worker {} was hard-stopped and cut {connections_cut} connections",
                id.pid
            );
        }
        self.emit(
            EventBody::WorkerExited {
                pid: id.pid,
                role,
                status,
                hard_stopped: hard_stopped.is_some(),
                connections_cut,
            },
            &Cause::default(),
        );
        if role == WorkerRole::Current && matches!(self.lifecycle, Lifecycle::Running) {
            tracing::error!(pid = id.pid, "haproxy worker {} crashed", id.pid);
            self.emit(
                EventBody::ProxyCrashed {
                    pid: id.pid,
                    status,
                },
                &Cause::default(),
            );
            let uptime = Duration::from_millis(
                drain::unix_ms(now.wall).saturating_sub(worker.started_at_ms),
            );
            self.schedule_restart(now, uptime);
        }
        self.after(now);
    }

    /// The admin socket answered, from these pids: the newest recorded worker among them is
    /// current, and the adopted old workers may now be told to stop.
    pub fn handle_admin_answers(&mut self, now: Now, pids: &[u32]) {
        self.begin(now);
        if !self.unconfirmed {
            return;
        }
        let newest = self
            .workers()
            .filter(|w| pids.contains(&w.id.pid))
            .max_by_key(|w| w.id.start_time)
            .map(|w| w.id);
        let Some(newest) = newest else {
            // Only strangers answered: keep asking.
            self.push(Effect::ConfirmCurrent);
            return;
        };
        self.unconfirmed = false;
        if self.current.as_ref().map(|w| w.id) != Some(newest) {
            if let Some(i) = self.old.iter().position(|w| w.id == newest) {
                let promoted = self.old.remove(i);
                if let Some(previous) = self.current.replace(promoted) {
                    self.old.push(previous);
                    self.old.sort_by_key(|w| w.id.start_time);
                }
                if let Some(d) = &mut self.drain {
                    d.sample = None;
                }
                tracing::info!(
                    pid = newest.pid,
                    "worker {} answers the admin socket: it is current",
                    newest.pid
                );
                self.send_drain_commands_to_current(newest.pid);
            }
        }
        tracing::info!("the admin socket answers: adoption confirmed");
        self.soft_stop_old();
        self.dirty = true;
        self.after(now);
    }

    pub fn handle_sample(&mut self, now: Now, sample: Sample) {
        let Sample { pid, accepted, .. } = sample;
        self.begin(now);
        let current = self.current_pid();
        let Some(d) = &mut self.drain else { return };
        if Some(pid) != current || d.is_drained() || self.reloads.is_running() {
            return;
        }
        let grew = match d.sample {
            Some(prev) if prev.pid == pid => accepted != prev.accepted,
            // A worker's first sample: any connection it accepted is new to the drain.
            _ => accepted > 0,
        };
        if grew {
            d.last_new_connection = Some(now.mono);
        }
        d.sample = Some(sample);
        self.after(now);
    }

    /// The plugins' verdicts, asked for drain `drain_id`; a stale answer is dropped.
    pub fn handle_verdicts(&mut self, now: Now, drain_id: &str, verdicts: Vec<(String, Verdict)>) {
        self.begin(now);
        let Some(d) = &mut self.drain else { return };
        if d.id() != drain_id || d.is_drained() {
            return;
        }
        for (name, verdict) in verdicts {
            if let Some(slot) = d.verdicts.iter_mut().find(|(n, _)| *n == name) {
                slot.1 = match verdict {
                    Verdict::Idle => None,
                    Verdict::Busy(message) => Some(message),
                };
            }
        }
        self.after(now);
    }

    /// A job from the worker's admin queue finished (after its retries).
    pub fn handle_commands_done(&mut self, now: Now, job: &CommandJob, result: Result<(), String>) {
        self.begin(now);
        match result {
            Ok(()) => {
                self.failing_commands.remove(&job.worker);
            }
            Err(e) if self.is_recorded(job.worker) => {
                tracing::error!(
                    pid = job.worker.pid,
                    "drain commands failed on worker {}: {e}",
                    job.worker.pid
                );
                self.failing_commands.insert(
                    job.worker,
                    format!(
                        "worker {}: {} commands failed: {e}; check [drain] start_commands/stop_commands and the admin socket's level",
                        job.worker.pid,
                        match job.kind {
                            CommandKind::Start => "drain start",
                            CommandKind::Stop => "drain stop",
                        }
                    ),
                );
            }
            Err(_) => {}
        }
        // `drain_started` reaches the plugins once the drain's start commands ran on the worker
        // that was current then (either way: a plugin must not wait forever for a broken CLI).
        if job.kind == CommandKind::Start {
            self.send_drain_started(&job.drain_id);
        }
        self.after(now);
    }

    pub fn handle_stopping_hook_done(&mut self, now: Now) {
        self.begin(now);
        let Lifecycle::Stopping(s) = &mut self.lifecycle else {
            return;
        };
        if s.phase != StopPhase::Hook {
            return;
        }
        s.phase = StopPhase::Soft {
            deadline: now.mono + s.timeout,
        };
        if self.cfg.supervision == Supervision::Direct {
            self.soft_stop_old();
            self.retire_current();
        } else {
            // One SIGUSR1 to the master stops every worker it has, old ones included.
            let all: Vec<ProcessId> = self.workers().map(|w| w.id).collect();
            if let Some(w) = self.current.take() {
                self.old.push(w);
            }
            self.dirty = true;
            self.stop_signal(&all, WorkerSignal::SoftStop);
        }
        self.after(now);
    }

    /// Connections a hard stop is about to cut (counted by the shell just before SIGTERM).
    pub fn handle_connections_cut(&mut self, now: Now, n: u64) {
        self.begin(now);
        if let Lifecycle::Stopping(s) = &mut self.lifecycle {
            s.connections_cut += n;
        }
        self.after(now);
    }

    /// Open client connections per old worker, as the shell just counted them.
    pub fn handle_connection_counts(&mut self, counts: HashMap<u32, u64>) {
        self.connections = counts;
    }

    /// A plugin that kept hanging was disabled by the plugin host.
    pub fn handle_plugin_disabled(&mut self, now: Now, name: String, error: String, blocks: bool) {
        self.begin(now);
        self.emit(
            EventBody::PluginDisabled {
                name,
                error,
                blocks_drains: blocks,
            },
            &Cause::default(),
        );
        self.after(now);
    }

    pub fn handle_timeout(&mut self, now: Now) {
        self.begin(now);
        self.after(now);
    }

    // ---------------------------------------------------------------------------------------
    // The cells
    // ---------------------------------------------------------------------------------------

    fn on_reload(&mut self, waiter: Waiter, pushed: Option<PushedConfig>) {
        let refusal = match &self.lifecycle {
            Lifecycle::Running if self.drain.as_ref().is_some_and(DrainRun::is_drained) => {
                Some("the node is drained; undrain first".to_string())
            }
            Lifecycle::Running => None,
            Lifecycle::Stopping(_) => Some("haproxy is stopping".into()),
            Lifecycle::Stopped { .. } => {
                Some("haproxy is stopped; undrain to start it again".into())
            }
        };
        if let Some(why) = refusal {
            let message = format!("cannot reload: {why}");
            self.answer_reload(waiter, Err((ErrorCode::Conflict, message)));
            return;
        }
        // A node where no worker runs tries to start one now, not at the end of its backoff.
        self.restart_at = None;
        self.request_reload(waiter, pushed);
    }

    // ---------------------------------------------------------------------------------------
    // Helpers
    // ---------------------------------------------------------------------------------------

    fn begin(&mut self, now: Now) {
        self.clock = now;
        self.batch_start = self.effects.len();
    }

    /// What every input ends with: due reloads start, the drain is evaluated, a stop advances,
    /// the sampler and checker are aimed, and a changed state is persisted.
    fn after(&mut self, now: Now) {
        if let Some(at) = self.restart_at {
            if at <= now.mono && !self.reloads.is_running() {
                self.restart_at = None;
                self.request_reload(Waiter::Restart, None);
            }
        }
        if !self.reloads.is_running() && self.current.is_some() {
            self.refuse_past_the_old_worker_cap(now);
        }
        if !self.reloads.is_running() {
            let reload_id = uuid::Uuid::new_v4().to_string();
            let draining = self.drain.is_some();
            let takeover = self.current.is_some();
            if let Some(running) = self.reloads.start(now.mono, reload_id, draining) {
                let effect = Effect::Launch {
                    reload_id: running.reload_id.clone(),
                    takeover,
                    draining,
                    config: running.batch.config.clone(),
                };
                self.push(effect);
            }
        }
        self.evaluate_drain(now);
        self.drive_stop(now);
        self.aim_services();
        if self.dirty {
            self.persist_before_outward();
        }
    }

    /// A reload displaces the current worker into an old one, which lives until its last
    /// connection ends. Past `max_old_workers` the due batch is refused as a whole, at the moment
    /// it would start (a batch queued behind a reload meets the cap that reload left); making
    /// room by killing an old worker would cut connections that a client relies on.
    fn refuse_past_the_old_worker_cap(&mut self, now: Now) {
        let cap = self.cfg.max_old_workers;
        if self.old.len() < cap {
            return;
        }
        let Some(batch) = self.reloads.refuse_due(now.mono) else {
            return;
        };
        let oldest: Vec<String> = self
            .old
            .iter()
            .take(3)
            .map(|w| {
                let age = drain::unix_ms(now.wall).saturating_sub(w.started_at_ms) / 1000;
                let connections = self.connections.get(&w.id.pid).copied().unwrap_or(0);
                let plural = if connections == 1 { "" } else { "s" };
                format!(
                    "pid {}, {age} s, {connections} connection{plural}",
                    w.id.pid
                )
            })
            .collect();
        let message = format!(
            "cannot reload: {} old workers are still finishing connections (oldest: {}); a reload \
             now would exceed reload.max_old_workers = {cap}; wait for them, or raise the cap",
            self.old.len(),
            oldest.join("; ")
        );
        tracing::warn!("{message}");
        for waiter in batch.waiters {
            self.answer_reload(waiter, Err((ErrorCode::Conflict, message.clone())));
        }
    }

    /// Nothing leaves the node (event or reply) before the state it reflects is durable: a crash
    /// right after a `drain` reply must not lose the drain.
    fn persist_before_outward(&mut self) {
        self.persist();
        let Some(persist) = self.effects.pop_back() else {
            return;
        };
        let first_outward = self
            .effects
            .iter()
            .enumerate()
            .skip(self.batch_start)
            .find(|(_, e)| matches!(e, Effect::Publish(_) | Effect::Reply { .. }))
            .map(|(i, _)| i);
        match first_outward {
            Some(i) => self.effects.insert(i, persist),
            None => self.effects.push_back(persist),
        }
    }

    /// Makes a launched worker current and soft-stops the one it displaced. Returns displaced pids.
    fn install_current(&mut self, worker: WorkerRecord) -> Vec<u32> {
        if let Some(d) = &mut self.drain {
            d.sample = None;
        }
        let mut displaced = Vec::new();
        if let Some(previous) = self.current.replace(worker) {
            displaced.push(previous.id.pid);
            // In master-worker mode the master soft-stopped it at the reload.
            if self.cfg.supervision == Supervision::Direct {
                self.push(Effect::Signal {
                    worker: previous.id,
                    signal: WorkerSignal::SoftStop,
                });
            }
            self.old.push(previous);
        }
        self.dirty = true;
        displaced
    }

    /// The stop's soft phase for the current worker: it joins the old ones on their way out.
    fn retire_current(&mut self) {
        if let Some(w) = self.current.take() {
            self.stop_signal(&[w.id], WorkerSignal::SoftStop);
            self.old.push(w);
            self.dirty = true;
        }
    }

    /// A stop's signal to these workers: each one's own in direct mode; the master's, which
    /// passes it on to all of them, in master-worker mode. A kill goes to each as well: a worker
    /// whose master is gone is nobody's to stop.
    fn stop_signal(&mut self, workers: &[ProcessId], signal: WorkerSignal) {
        let master = match self.cfg.supervision {
            Supervision::Direct => None,
            Supervision::Master { .. } => self.master.as_ref().map(|(m, _)| *m),
        };
        if let Some(master) = master {
            self.push(Effect::SignalMaster { master, signal });
        }
        if master.is_none() || signal == WorkerSignal::Kill {
            for &worker in workers {
                self.push(Effect::Signal { worker, signal });
            }
        }
    }

    fn schedule_restart(&mut self, now: Now, uptime: Duration) {
        let drained = self.drain.as_ref().is_some_and(DrainRun::is_drained);
        if self.current.is_some() || drained || !matches!(self.lifecycle, Lifecycle::Running) {
            return;
        }
        let delay = self.backoff.next(uptime);
        tracing::info!("starting haproxy in {delay:?}");
        self.restart_at = Some(now.mono + delay);
    }

    fn request_reload(&mut self, waiter: Waiter, pushed: Option<PushedConfig>) {
        if let Err((waiter, conflict)) = self.reloads.request(waiter, pushed, self.clock.mono) {
            self.answer_reload(waiter, Err((ErrorCode::Conflict, conflict.to_string())));
        }
    }

    fn answer_reload(&mut self, waiter: Waiter, result: Result<ReloadResult, (ErrorCode, String)>) {
        match waiter {
            Waiter::Request(origin) => match result {
                Ok(r) => self.reply_ok(origin, r),
                Err((code, message)) => self.reply_err(origin, code, message),
            },
            Waiter::Signal => match result {
                Ok(r) => tracing::info!(pid = r.pid, "SIGHUP reload done"),
                Err((_, message)) => tracing::warn!("SIGHUP ignored: {message}"),
            },
            Waiter::Restart => {}
        }
    }

    fn current_pid(&self) -> Option<u32> {
        self.current.as_ref().map(|w| w.id.pid)
    }

    fn emit(&mut self, body: EventBody, cause: &Cause) {
        let event = self.envelope.wrap(body, cause, self.clock.wall);
        self.push(Effect::Publish(Box::new(event)));
    }

    fn persist(&mut self) {
        let mut state = State::new(&self.cfg.node, self.cfg.kernel_boot_id.clone());
        state.current = self.current.clone();
        state.old = self.old.clone();
        state.restarts = self.restarts;
        state.last_reload = self.last_reload.clone();
        state.drain = self.drain.as_ref().map(|d| d.drain.record.clone());
        state.drained_event = self.drain.as_ref().and_then(|d| d.drained_event.clone());
        state.stopping = matches!(self.lifecycle, Lifecycle::Stopping(_));
        self.dirty = false;
        self.push(Effect::Persist(Box::new(state)));
    }

    fn exit(&mut self) {
        if let Lifecycle::Stopped {
            connections_cut, ..
        } = self.lifecycle
        {
            self.persist();
            self.push(Effect::Exit(Outcome::Stopped { connections_cut }));
        }
    }

    fn reply_ok(&mut self, origin: Origin, result: impl serde::Serialize) {
        let reply = Reply::success(&self.cfg.node, origin.request_id, result);
        self.push(Effect::Reply {
            to: origin.to,
            reply: Box::new(reply),
        });
    }

    fn reply_err(&mut self, origin: Origin, code: ErrorCode, message: String) {
        let reply = Reply::failure(&self.cfg.node, origin.request_id, code, message);
        self.push(Effect::Reply {
            to: origin.to,
            reply: Box::new(reply),
        });
    }

    fn push(&mut self, effect: Effect) {
        self.effects.push_back(effect);
    }
}

fn ms_to_rfc3339(ms: u64) -> String {
    rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

mod drain_run;
mod stop;

use drain_run::DrainRun;
use stop::{StopPhase, Stopping};

#[cfg(test)]
mod tests;
