//! The stop cells of the node core: a graceful stop, the `stopping` hook first, then SIGUSR1 to
//! every worker, escalating at the deadline. Part of [`NodeCore`]; no I/O.

use super::*;

#[derive(Debug)]
pub(super) struct Stopping {
    pub(super) started: Instant,
    pub(super) timeout: Duration,
    pub(super) phase: StopPhase,
    pub(super) connections_cut: u64,
    pub(super) waiters: Vec<Origin>,
    pub(super) cause: Cause,
    pub(super) by_drain: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopPhase {
    /// Waiting for the plugins' `stopping` hook; nothing is signalled yet.
    Hook,
    /// Every worker was told to stop; escalate at `deadline`.
    Soft {
        deadline: Instant,
    },
    Term {
        deadline: Instant,
    },
    Kill {
        deadline: Instant,
    },
}

impl NodeCore {
    pub(super) fn begin_stop(
        &mut self,
        now: Now,
        timeout: Option<Duration>,
        waiter: Option<Origin>,
        cause: Cause,
        by_drain: Option<String>,
    ) {
        match &mut self.lifecycle {
            Lifecycle::Stopping(s) => {
                s.waiters.extend(waiter);
                return;
            }
            Lifecycle::Stopped { .. } => {
                if let Some(origin) = waiter {
                    self.reply_ok(
                        origin,
                        StopResult {
                            connections_cut: 0,
                            duration_ms: 0,
                        },
                    );
                }
                return;
            }
            Lifecycle::Running => {}
        }
        let timeout = timeout.unwrap_or(self.cfg.stop_timeout);
        tracing::info!("stopping haproxy gracefully (up to {timeout:?})");
        for w in self.reloads.drain_queued() {
            let message = format!("node {} is stopping", self.cfg.node);
            self.answer_reload(w, Err((ErrorCode::Conflict, message)));
        }
        self.restart_at = None;
        if by_drain.is_none() {
            // A stop ends the drain; only `stop_when_drained` keeps it, drained, for `drain` to
            // find in `stopped`.
            self.drain = None;
        }
        let nothing_runs =
            self.current.is_none() && self.old.is_empty() && !self.reloads.is_running();
        self.lifecycle = Lifecycle::Stopping(Stopping {
            started: now.mono,
            timeout,
            phase: if nothing_runs {
                StopPhase::Soft {
                    deadline: now.mono + timeout,
                }
            } else {
                StopPhase::Hook
            },
            connections_cut: 0,
            waiters: waiter.into_iter().collect(),
            cause,
            by_drain,
        });
        if !nothing_runs {
            // The `stopping` hook is the last one before HAProxy is stopped: it is awaited first.
            self.push(Effect::StoppingHook);
        }
        self.dirty = true;
    }

    pub(super) fn drive_stop(&mut self, now: Now) {
        let all_gone = self.current.is_none() && self.old.is_empty() && !self.reloads.is_running();
        let Lifecycle::Stopping(s) = &mut self.lifecycle else {
            return;
        };
        if all_gone && s.phase != StopPhase::Hook {
            let connections_cut = s.connections_cut;
            let duration_ms = now.mono.duration_since(s.started).as_millis() as u64;
            let waiters = std::mem::take(&mut s.waiters);
            let cause = s.cause.clone();
            let by_drain = s.by_drain.take();
            tracing::info!(
                connections_cut,
                duration_ms,
                "haproxy stopped; {connections_cut} connections cut"
            );
            self.lifecycle = Lifecycle::Stopped {
                by_drain,
                connections_cut,
            };
            self.dirty = true;
            self.emit(EventBody::Stopped { connections_cut }, &cause);
            for origin in waiters {
                self.reply_ok(
                    origin,
                    StopResult {
                        connections_cut,
                        duration_ms,
                    },
                );
            }
            if self.exit_when_stopped {
                self.exit();
            }
            return;
        }
        let (signal, next) = match s.phase {
            StopPhase::Soft { deadline } if now.mono >= deadline => (
                WorkerSignal::HardStop,
                StopPhase::Term {
                    deadline: now.mono + KILL_GRACE,
                },
            ),
            StopPhase::Term { deadline } | StopPhase::Kill { deadline } if now.mono >= deadline => {
                (
                    WorkerSignal::Kill,
                    StopPhase::Kill {
                        deadline: now.mono + KILL_GRACE,
                    },
                )
            }
            _ => return,
        };
        s.phase = next;
        let ids: Vec<ProcessId> = self.workers().map(|w| w.id).collect();
        let pids: Vec<u32> = ids.iter().map(|w| w.pid).collect();
        tracing::warn!(?pids, "stop timeout: {signal:?} to workers {pids:?}");
        self.stop_signal(&ids, signal);
    }
}
