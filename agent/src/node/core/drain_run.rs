//! The drain cells of the node core: starting and ending a drain, what it observed, and when it
//! is drained. Part of [`NodeCore`]; no I/O.

use super::*;

/// A drain and what was observed for it.
#[derive(Debug)]
pub(super) struct DrainRun {
    pub(super) drain: Drain,
    pub(super) cause: Cause,
    pub(super) sample: Option<Sample>,
    pub(super) last_new_connection: Option<Instant>,
    /// Each plugin's last verdict for THIS drain: `None` idle, `Some(message)` busy.
    pub(super) verdicts: Vec<(String, Option<String>)>,
    /// The `drained` event, kept until the drain ends so a restarted agent sends it again.
    pub(super) drained_event: Option<Event>,
    /// `drain_started` reached the plugins (after `start_commands` ran), or must not (a resumed
    /// drain: the previous agent sent it).
    pub(super) started_hook_sent: bool,
}

impl DrainRun {
    pub(super) fn new(
        drain: Drain,
        cause: Cause,
        plugins: &[String],
        started_hook_sent: bool,
    ) -> Self {
        DrainRun {
            drain,
            cause,
            sample: None,
            last_new_connection: None,
            // Until a plugin has answered for this drain, it counts as busy: a resumed drain
            // included, or a restart would skip an ALB deregistration delay.
            verdicts: plugins
                .iter()
                .map(|p| (p.clone(), Some(NOT_YET_ANSWERED.to_string())))
                .collect(),
            drained_event: None,
            started_hook_sent,
        }
    }

    pub(super) fn id(&self) -> &str {
        self.drain.id()
    }

    pub(super) fn is_drained(&self) -> bool {
        self.drain.phase() == Phase::Drained
    }
}

impl NodeCore {
    pub(super) fn on_drain(&mut self, now: Now, origin: Origin, req: DrainRequest) {
        let already = |d: &DrainRun, state| DrainResult {
            drain_id: d.id().to_string(),
            already_draining: true,
            state,
            drained_at: d.drain.record.drained_at_ms.map(ms_to_rfc3339),
        };
        if req.stop_when_drained == Some(true) && self.cfg.supervision.is_attached() {
            return self.reply_err(
                origin,
                ErrorCode::Conflict,
                "cannot drain with stop_when_drained: HAProxy's master is run by a service \
                 manager, not by ebb; drain without it, then stop HAProxy there (systemctl stop \
                 haproxy)"
                    .into(),
            );
        }
        match &self.lifecycle {
            Lifecycle::Stopping(_) => {
                return self.reply_err(
                    origin,
                    ErrorCode::Conflict,
                    "cannot drain: haproxy is stopping".into(),
                );
            }
            Lifecycle::Stopped { by_drain, .. } => {
                let asked = req.drain_id.as_deref();
                let result = match (&self.drain, by_drain) {
                    (Some(d), Some(id)) if d.id() == id && asked.is_none_or(|a| a == id) => {
                        Some(already(d, self.state()))
                    }
                    _ => None,
                };
                return match result {
                    Some(r) => self.reply_ok(origin, r),
                    None => self.reply_err(
                        origin,
                        ErrorCode::Conflict,
                        "cannot drain: haproxy is stopped; undrain to start it again".into(),
                    ),
                };
            }
            Lifecycle::Running => {}
        }
        if let Some(d) = &self.drain {
            let r = already(d, self.state());
            return self.reply_ok(origin, r);
        }
        if self.current.is_none() {
            return self.reply_err(
                origin,
                ErrorCode::Conflict,
                format!(
                    "cannot drain: no haproxy worker runs (node {})",
                    self.state()
                ),
            );
        }
        let cfg = &self.cfg.drain;
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
            now.mono,
            now.wall,
        );
        let cause = origin.cause.clone();
        self.drain = Some(DrainRun::new(
            drain,
            cause.clone(),
            &self.cfg.plugins,
            false,
        ));
        self.dirty = true;
        if let Some(pid) = self.current_pid() {
            self.send_drain_commands_to_current(pid);
        }
        self.emit(
            EventBody::DrainStarted {
                drain_id: drain_id.clone(),
                min_period_ms: policy.min_period_ms,
                deadline_ms: policy.deadline_ms,
            },
            &cause,
        );
        let state = self.state();
        self.reply_ok(
            origin,
            DrainResult {
                drain_id,
                already_draining: false,
                state,
                drained_at: None,
            },
        );
    }

    pub(super) fn on_undrain(&mut self, origin: Origin, req: UndrainRequest) {
        let current_id = self.drain_id().map(str::to_string);
        if let (Some(wanted), Some(id)) = (&req.drain_id, &current_id) {
            if wanted != id {
                return self.reply_err(
                    origin,
                    ErrorCode::Conflict,
                    format!("drain {wanted} is not the current drain ({id})"),
                );
            }
        }
        match &self.lifecycle {
            Lifecycle::Stopping(_) => {
                return self.reply_err(
                    origin,
                    ErrorCode::Conflict,
                    "haproxy is stopping; undrain after it stopped".into(),
                );
            }
            Lifecycle::Stopped { .. } => {
                // Back into service: start HAProxy again.
                self.lifecycle = Lifecycle::Running;
                self.exit_when_stopped = false;
                self.request_reload(Waiter::Restart, None);
            }
            Lifecycle::Running if current_id.is_none() => {
                if self.current.is_none() && !self.starting {
                    return self.reply_err(
                        origin,
                        ErrorCode::Conflict,
                        "cannot undrain: no haproxy worker runs and the node is not draining; reload to start one".into(),
                    );
                }
                let state = self.state();
                return self.reply_ok(
                    origin,
                    UndrainResult {
                        drain_id: None,
                        state,
                    },
                );
            }
            Lifecycle::Running => {
                // A drained node whose worker died stays without one until now.
                if self.current.is_none() && !self.reloads.is_running() {
                    self.request_reload(Waiter::Restart, None);
                }
            }
        }
        if let Some(id) = current_id.clone() {
            if let Some(pid) = self.current_pid() {
                self.queue_commands(pid, CommandKind::Stop, id.clone());
            }
            tracing::info!(drain_id = %id, "undrained");
            self.push(Effect::Hook(Box::new(HookEvent::Undrained(
                hooks::Undrained {
                    drain_id: id.clone(),
                },
            ))));
            self.drain = None;
            self.emit(EventBody::Undrained { drain_id: id }, &origin.cause);
        }
        self.dirty = true;
        let state = self.state();
        self.reply_ok(
            origin,
            UndrainResult {
                drain_id: current_id,
                state,
            },
        );
    }

    pub(super) fn evaluate_drain(&mut self, now: Now) {
        let Some(d) = &self.drain else { return };
        let view = self.view(d);
        let Some(d) = &mut self.drain else { return };
        let actions = d.drain.step(now.mono, now.wall, &view);
        for action in actions {
            self.dirty = true;
            match action {
                Action::DeadlineExceeded(blockers) => {
                    let Some(d) = &self.drain else { return };
                    tracing::warn!(drain_id = %d.id(), ?blockers, "drain deadline exceeded");
                    let body = EventBody::DrainDeadlineExceeded {
                        drain_id: d.id().to_string(),
                        blockers,
                    };
                    let cause = d.cause.clone();
                    self.emit(body, &cause);
                }
                Action::Drained { forced, stop } => self.declare_drained(now, forced, stop),
            }
        }
    }

    pub(super) fn declare_drained(&mut self, now: Now, forced: bool, stop: bool) {
        let Some(d) = &self.drain else { return };
        let r = &d.drain.record;
        let drained_at_ms = r.drained_at_ms.unwrap_or_else(|| drain::unix_ms(now.wall));
        let body = EventBody::Drained {
            drain_id: r.drain_id.clone(),
            started_at: ms_to_rfc3339(r.started_at_ms),
            drained_at: ms_to_rfc3339(drained_at_ms),
            duration_ms: drained_at_ms.saturating_sub(r.started_at_ms),
            forced,
            connections_cut: r.connections_cut,
        };
        let drain_id = r.drain_id.clone();
        let cause = d.cause.clone();
        tracing::info!(%drain_id, forced, "drained");
        // A drained node starts no worker: a crash restart still waiting is dropped.
        self.restart_at = None;
        let event = self.envelope.wrap(body, &cause, now.wall);
        if let Some(d) = &mut self.drain {
            d.drained_event = Some(event.clone());
        }
        self.push(Effect::Publish(Box::new(event)));
        // Durable before it leaves: a crash at any point yields one `drained`, one Msg-Id.
        self.persist_before_outward();
        self.push(Effect::Hook(Box::new(HookEvent::Drained(hooks::Drained {
            drain_id: drain_id.clone(),
            forced,
        }))));
        if stop {
            self.begin_stop(now, None, None, cause, Some(drain_id));
        }
    }

    /// What the drain decision needs.
    pub(super) fn view(&self, d: &DrainRun) -> View {
        let current = self.current_pid();
        let busy = if self.reloads.is_running() || self.reloads.has_queued() {
            // A worker on its way in cannot be called idle yet.
            None
        } else {
            match current {
                // With no current worker (it crashed), nothing can be in flight on it.
                None => Some(0),
                Some(pid) => d.sample.filter(|s| s.pid == pid).and_then(|s| s.busy),
            }
        };
        View {
            old_workers: self
                .old
                .iter()
                .map(|w| {
                    (
                        w.id.pid,
                        drain::unix_ms(self.clock.wall).saturating_sub(w.started_at_ms),
                        self.connections.get(&w.id.pid).copied().unwrap_or(0),
                    )
                })
                .collect(),
            busy,
            last_new_connection: d.last_new_connection,
            plugins_busy: d
                .verdicts
                .iter()
                .filter_map(|(name, busy)| busy.as_ref().map(|m| (name.clone(), m.clone())))
                .collect(),
        }
    }

    pub(super) fn aim_services(&mut self) {
        let draining = self.drain.as_ref().filter(|d| !d.is_drained());
        let sample = draining.and(self.current_pid());
        let check = draining.map(|d| d.id().to_string());
        let ctx = draining.map(|d| {
            Box::new(CheckContext {
                node: Some(self.cfg.node.clone()),
                drain_id: Some(d.id().to_string()),
                started_at_ms: Some(d.drain.record.started_at_ms),
                ..CheckContext::default()
            })
        });
        if sample != self.sampling {
            self.sampling = sample;
            self.push(Effect::Sample(sample));
        }
        if check != self.checking {
            self.checking = check;
            self.push(Effect::Check(ctx));
        }
    }

    /// The drain's start commands to the current worker (a new drain, a resumed one, a worker
    /// started or found during one).
    pub(super) fn send_drain_commands_to_current(&mut self, pid: u32) {
        let Some(id) = self.drain_id().map(str::to_string) else {
            return;
        };
        self.queue_commands(pid, CommandKind::Start, id);
    }

    pub(super) fn queue_commands(&mut self, pid: u32, kind: CommandKind, drain_id: String) {
        let Some(worker) = self.workers().find(|w| w.id.pid == pid).map(|w| w.id) else {
            return;
        };
        let commands = match kind {
            CommandKind::Start => self.cfg.drain.start_commands.clone(),
            CommandKind::Stop => self.cfg.drain.stop_commands.clone(),
        };
        self.push(Effect::Commands(CommandJob {
            worker,
            drain_id,
            kind,
            commands,
        }));
    }

    pub(super) fn send_drain_started(&mut self, drain_id: &str) {
        let Some(d) = &mut self.drain else { return };
        if d.id() != drain_id || d.started_hook_sent {
            return;
        }
        d.started_hook_sent = true;
        let p = &d.drain.record.policy;
        let hook = HookEvent::DrainStarted(hooks::DrainStarted {
            drain_id: drain_id.to_string(),
            started_at_ms: d.drain.record.started_at_ms,
            min_period_ms: p.min_period_ms,
            deadline_ms: p.deadline_ms,
        });
        self.push(Effect::Hook(Box::new(hook)));
    }
}
