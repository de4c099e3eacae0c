//! The drain decision: a plain state machine, fed observations, that says when a node
//! is drained. No I/O: the node task samples HAProxy, watches worker exits and asks plugins, and
//! hands what it saw to [`Drain::step`].
//!
//! `drained` ⇔ draining, and
//! 1. `min_period` has elapsed since the drain started;
//! 2. no old worker is alive (an old worker serves requests the admin socket cannot see — the
//!    seed's bug);
//! 3. the current worker is idle by the `idle` rule, per a stats sample of THAT worker;
//! 4. no new connection for `quiet_period`;
//! 5. every plugin says idle.

use std::time::{Duration, Instant, SystemTime};

use ebb_sdk::status::Blocker;
use serde::{Deserialize, Serialize};

use crate::config::{IdleRule, OnDeadline};

/// The knobs of one drain: the `[drain]` config, overridden per command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub min_period_ms: u64,
    pub quiet_period_ms: u64,
    /// `None`: no deadline.
    pub deadline_ms: Option<u64>,
    pub on_deadline: OnDeadline,
    pub stop_when_drained: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Draining,
    Drained,
}

/// What the drain remembers across agent restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub drain_id: String,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    pub policy: Policy,
    pub phase: Phase,
    pub drained_at_ms: Option<u64>,
    pub forced: bool,
    pub deadline_reported: bool,
    /// Connections that hard-stopped old workers cut during this drain.
    pub connections_cut: u64,
}

/// What the node saw, at one instant.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Alive old workers: pid, age and (when counted) open client connections.
    pub old_workers: Vec<(u32, u64, u64)>,
    /// Busy count of the current worker by the idle rule, from a sample taken since the last
    /// change of current worker; `None` while no such sample exists.
    pub busy: Option<u64>,
    /// When the current worker last saw a new connection (for `quiet_period`).
    pub last_new_connection: Option<Instant>,
    /// Plugins that are not idle: name and message.
    pub plugins_busy: Vec<(String, String)>,
}

/// What the node must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish `drain_deadline_exceeded` with these blockers.
    DeadlineExceeded(Vec<Blocker>),
    /// Publish `drained` (once per drain id), and stop HAProxy if the policy says so.
    Drained { forced: bool, stop: bool },
}

#[derive(Debug, Clone)]
pub struct Drain {
    pub record: Record,
    /// `started_at` on the monotonic clock of this agent process.
    started: Instant,
    rule: IdleRule,
}

impl Drain {
    pub fn start(
        drain_id: String,
        policy: Policy,
        rule: IdleRule,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        let record = Record {
            drain_id,
            started_at_ms: unix_ms(wall),
            policy,
            phase: Phase::Draining,
            drained_at_ms: None,
            forced: false,
            deadline_reported: false,
            connections_cut: 0,
        };
        Drain {
            record,
            started: now,
            rule,
        }
    }

    /// Resumes a drain recorded by an earlier agent: its clock keeps running from the original
    /// start.
    pub fn resume(record: Record, rule: IdleRule, now: Instant, wall: SystemTime) -> Self {
        let elapsed = Duration::from_millis(unix_ms(wall).saturating_sub(record.started_at_ms));
        let started = now.checked_sub(elapsed).unwrap_or(now);
        Drain {
            record,
            started,
            rule,
        }
    }

    pub fn id(&self) -> &str {
        &self.record.drain_id
    }

    pub fn phase(&self) -> Phase {
        self.record.phase
    }

    pub fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Old workers cut short by `hard-stop-after` during the drain are never hidden.
    pub fn add_cut(&mut self, connections: u64) {
        self.record.connections_cut += connections;
    }

    /// Why the node is not drained yet; empty when every condition holds.
    pub fn blockers(&self, now: Instant, view: &View) -> Vec<Blocker> {
        let p = &self.record.policy;
        let mut out = Vec::new();
        let elapsed = self.elapsed(now);
        let min = Duration::from_millis(p.min_period_ms);
        if elapsed < min {
            out.push(Blocker::MinPeriod {
                remaining_ms: ms(min - elapsed),
            });
        }
        for &(pid, age_ms, connections) in &view.old_workers {
            out.push(Blocker::OldWorker {
                pid,
                age_ms,
                connections,
            });
        }
        match view.busy {
            Some(0) => {}
            // No sample of the current worker yet: it cannot be called idle. Reported as a count
            // of 0 would be a lie, so the blocker carries the last known count, or 1.
            busy => {
                let count = busy.unwrap_or(1);
                out.push(match self.rule {
                    IdleRule::Connections => Blocker::Connections { count },
                    IdleRule::Sessions => Blocker::Sessions { count },
                });
            }
        }
        if p.quiet_period_ms > 0 {
            let quiet = Duration::from_millis(p.quiet_period_ms);
            let since = view
                .last_new_connection
                .map_or(elapsed, |t| now.saturating_duration_since(t).min(elapsed));
            if since < quiet {
                out.push(Blocker::QuietPeriod {
                    remaining_ms: ms(quiet - since),
                });
            }
        }
        for (name, message) in &view.plugins_busy {
            out.push(Blocker::Plugin {
                name: name.clone(),
                message: message.clone(),
            });
        }
        out
    }

    /// Evaluates the drain; returns what must be done. `drained` happens at most once.
    pub fn step(&mut self, now: Instant, wall: SystemTime, view: &View) -> Vec<Action> {
        if self.record.phase != Phase::Draining {
            return Vec::new();
        }
        let blockers = self.blockers(now, view);
        let mut actions = Vec::new();
        let mut forced = false;
        if !blockers.is_empty() {
            let past_deadline = self
                .record
                .policy
                .deadline_ms
                .is_some_and(|d| self.elapsed(now) >= Duration::from_millis(d));
            if !past_deadline {
                return actions;
            }
            if !self.record.deadline_reported {
                self.record.deadline_reported = true;
                actions.push(Action::DeadlineExceeded(blockers));
            }
            if self.record.policy.on_deadline != OnDeadline::Force {
                return actions;
            }
            forced = true;
        }
        self.record.phase = Phase::Drained;
        self.record.forced = forced;
        self.record.drained_at_ms = Some(unix_ms(wall));
        actions.push(Action::Drained {
            forced,
            stop: self.record.policy.stop_when_drained,
        });
        actions
    }

    /// The next instant at which time alone may change the verdict (min period or quiet period
    /// ending, the deadline).
    pub fn next_wake(&self, now: Instant, view: &View) -> Option<Instant> {
        if self.record.phase != Phase::Draining {
            return None;
        }
        let p = &self.record.policy;
        let mut times = vec![self.started + Duration::from_millis(p.min_period_ms)];
        if let Some(d) = p.deadline_ms {
            times.push(self.started + Duration::from_millis(d));
        }
        if p.quiet_period_ms > 0 {
            let from = view
                .last_new_connection
                .unwrap_or(self.started)
                .max(self.started);
            times.push(from + Duration::from_millis(p.quiet_period_ms));
        }
        times.into_iter().filter(|t| *t > now).min()
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(min: u64, quiet: u64, deadline: Option<u64>, on: OnDeadline) -> Policy {
        Policy {
            min_period_ms: min,
            quiet_period_ms: quiet,
            deadline_ms: deadline,
            on_deadline: on,
            stop_when_drained: false,
        }
    }

    fn idle() -> View {
        View {
            busy: Some(0),
            ..View::default()
        }
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn an_old_worker_holds_the_drain_even_when_the_current_worker_is_idle() {
        // The seed's bug: "idle per the admin socket" while an old worker serves a long request.
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut d = Drain::start(
            "d1".into(),
            policy(100, 0, None, OnDeadline::Report),
            IdleRule::Connections,
            t0,
            wall,
        );
        let mut view = idle();
        view.old_workers = vec![(42, 5000, 1)];
        assert!(d.step(at(t0, 10_000), wall, &view).is_empty());
        assert_eq!(
            d.blockers(at(t0, 10_000), &view),
            vec![Blocker::OldWorker {
                pid: 42,
                age_ms: 5000,
                connections: 1
            }]
        );
        view.old_workers.clear();
        assert_eq!(
            d.step(at(t0, 10_001), wall, &view),
            vec![Action::Drained {
                forced: false,
                stop: false
            }]
        );
        assert!(
            d.step(at(t0, 10_002), wall, &view).is_empty(),
            "drained only once"
        );
    }

    #[test]
    fn each_condition_blocks_on_its_own() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let d = Drain::start(
            "d".into(),
            policy(1000, 500, None, OnDeadline::Report),
            IdleRule::Sessions,
            t0,
            wall,
        );
        let b = d.blockers(at(t0, 100), &View::default());
        assert_eq!(
            b,
            vec![
                Blocker::MinPeriod { remaining_ms: 900 },
                Blocker::Sessions { count: 1 },
                Blocker::QuietPeriod { remaining_ms: 400 },
            ]
        );
        let mut v = idle();
        v.plugins_busy = vec![("alb".into(), "212s of deregistration delay left".into())];
        v.last_new_connection = Some(at(t0, 1200));
        assert_eq!(
            d.blockers(at(t0, 1500), &v),
            vec![
                Blocker::QuietPeriod { remaining_ms: 200 },
                Blocker::Plugin {
                    name: "alb".into(),
                    message: "212s of deregistration delay left".into()
                },
            ]
        );
        assert!(d.blockers(at(t0, 1700), &idle()).is_empty());
    }

    #[test]
    fn deadline_reports_once_and_force_declares_drained() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let busy = View {
            busy: Some(3),
            ..View::default()
        };
        let mut report = Drain::start(
            "r".into(),
            policy(0, 0, Some(1000), OnDeadline::Report),
            IdleRule::Connections,
            t0,
            wall,
        );
        assert!(report.step(at(t0, 999), wall, &busy).is_empty());
        assert_eq!(
            report.step(at(t0, 1000), wall, &busy),
            vec![Action::DeadlineExceeded(vec![Blocker::Connections {
                count: 3
            }])]
        );
        assert!(report.step(at(t0, 2000), wall, &busy).is_empty());
        assert_eq!(report.phase(), Phase::Draining);

        let mut force = Drain::start(
            "f".into(),
            policy(0, 0, Some(1000), OnDeadline::Force),
            IdleRule::Connections,
            t0,
            wall,
        );
        assert_eq!(
            force.step(at(t0, 1000), wall, &busy),
            vec![
                Action::DeadlineExceeded(vec![Blocker::Connections { count: 3 }]),
                Action::Drained {
                    forced: true,
                    stop: false
                },
            ]
        );
        assert!(force.record.forced);
    }

    #[test]
    fn a_resumed_drain_keeps_its_start() {
        let wall = SystemTime::now();
        let t0 = Instant::now();
        let d = Drain::start(
            "d".into(),
            policy(10_000, 0, None, OnDeadline::Report),
            IdleRule::Connections,
            t0,
            wall - Duration::from_secs(4),
        );
        let resumed = Drain::resume(d.record.clone(), IdleRule::Connections, t0, wall);
        let left = resumed.blockers(t0, &idle());
        assert!(
            matches!(left.as_slice(), [Blocker::MinPeriod { remaining_ms }] if (5_900..=6_000).contains(remaining_ms)),
            "{left:?}"
        );
    }

    #[derive(Debug, Clone)]
    struct Obs {
        dt: u64,
        old: bool,
        busy: Option<u64>,
        plugin_busy: bool,
        new_conn: bool,
    }

    fn obs() -> impl Strategy<Value = Obs> {
        (
            0u64..400,
            any::<bool>(),
            prop::option::of(0u64..3),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(dt, old, busy, plugin_busy, new_conn)| Obs {
                dt,
                old,
                busy,
                plugin_busy,
                new_conn,
            })
    }

    proptest! {
        /// drained happens exactly when every condition holds (or the deadline forces it), at most
        /// once per drain id, and the phase only moves forward.
        #[test]
        fn drained_iff_all_conditions_hold(
            min in 0u64..1000,
            quiet in 0u64..300,
            deadline in prop::option::of(0u64..3000),
            force in any::<bool>(),
            steps in prop::collection::vec(obs(), 1..60),
        ) {
            let t0 = Instant::now();
            let wall = SystemTime::now();
            let on = if force { OnDeadline::Force } else { OnDeadline::Report };
            let mut d = Drain::start("p".into(), policy(min, quiet, deadline, on), IdleRule::Connections, t0, wall);
            let mut now = t0;
            let mut last_new: Option<Instant> = None;
            let mut drained_count = 0;
            let mut deadline_count = 0;
            let mut phase = d.phase();
            for o in steps {
                now += Duration::from_millis(o.dt);
                if o.new_conn { last_new = Some(now); }
                let view = View {
                    old_workers: if o.old { vec![(7, 1, 0)] } else { vec![] },
                    busy: o.busy,
                    last_new_connection: last_new,
                    plugins_busy: if o.plugin_busy { vec![("x".into(), "busy".into())] } else { vec![] },
                };
                let elapsed = now - t0;
                let quiet_ok = quiet == 0 || last_new.map_or(elapsed, |t| now - t).min(elapsed) >= Duration::from_millis(quiet);
                let all_hold = elapsed >= Duration::from_millis(min) && !o.old && o.busy == Some(0) && quiet_ok && !o.plugin_busy;
                let past_deadline = deadline.is_some_and(|dl| elapsed >= Duration::from_millis(dl));
                let was_draining = d.phase() == Phase::Draining;
                let actions = d.step(now, wall, &view);
                let drained_now = actions.iter().any(|a| matches!(a, Action::Drained { .. }));
                deadline_count += actions.iter().filter(|a| matches!(a, Action::DeadlineExceeded(_))).count();
                if drained_now { drained_count += 1; }
                if was_draining {
                    let expect = all_hold || (past_deadline && force);
                    prop_assert_eq!(drained_now, expect, "all_hold={} past_deadline={}", all_hold, past_deadline);
                    if drained_now && !all_hold {
                        prop_assert!(d.record.forced);
                    }
                }
                prop_assert!(d.phase() >= phase, "phases only move forward");
                phase = d.phase();
            }
            prop_assert!(drained_count <= 1);
            prop_assert!(deadline_count <= 1);
        }
    }
}
