//! The node core, cell by cell (the lifecycle table in docs/ARCHITECTURE.md), then as a model:
//! random input sequences against a simulated world of processes must never break the
//! invariants.

use std::collections::{BTreeMap, HashMap, HashSet};

use ebb_sdk::event::EventBody;
use proptest::prelude::*;

use super::*;

const MIN_PERIOD: Duration = Duration::from_secs(10);

fn cfg(plugins: &[&str]) -> CoreConfig {
    let drain = DrainConfig {
        min_period: crate::config::Dur(MIN_PERIOD),
        ..DrainConfig::default()
    };
    CoreConfig {
        supervision: Supervision::Direct,
        node: "n1".into(),
        groups: vec![],
        boot_id: "b1".into(),
        kernel_boot_id: "k1".into(),
        config_path: "/etc/haproxy/haproxy.cfg".into(),
        drain,
        stop_timeout: Duration::from_secs(30),
        startup_timeout: Duration::from_secs(30),
        check_timeout: Duration::from_secs(10),
        coalesce: Duration::ZERO,
        max_old_workers: 32,
        plugins: plugins.iter().map(|p| p.to_string()).collect(),
        version: "test".into(),
    }
}

fn record(pid: u32, at_ms: u64) -> WorkerRecord {
    WorkerRecord {
        id: ProcessId {
            pid,
            start_time: u64::from(pid),
        },
        started_at_ms: at_ms,
        log: format!("/logs/worker-{pid}.log").into(),
        config_sha256: "c0ffee".into(),
    }
}

/// A core under test, its clock, and every effect it produced.
struct Node {
    core: NodeCore,
    t0: Instant,
    w0: SystemTime,
    ms: u64,
    effects: Vec<Effect>,
    next_pid: u32,
    next_reply: u64,
}

impl Node {
    fn boot(cfg: CoreConfig, boot: Boot) -> Node {
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Node::boot_at(cfg, boot, t0, w0, 0)
    }

    /// A core that starts `ms` into the test's time.
    fn boot_at(cfg: CoreConfig, boot: Boot, t0: Instant, w0: SystemTime, ms: u64) -> Node {
        let at = Duration::from_millis(ms);
        let core = NodeCore::new(
            cfg,
            boot,
            Now {
                mono: t0 + at,
                wall: w0 + at,
            },
        );
        let mut n = Node {
            core,
            t0,
            w0,
            ms,
            effects: Vec::new(),
            next_pid: 100,
            next_reply: 0,
        };
        n.collect();
        n
    }

    /// A node whose first worker (pid 100) serves.
    fn serving_with(plugins: &[&str]) -> Node {
        let mut n = Node::boot(cfg(plugins), Boot::default());
        n.launch_ok();
        assert_eq!(n.core.state(), NodeState::Serving);
        n.take();
        n
    }

    fn serving() -> Node {
        Node::serving_with(&[])
    }

    fn now(&self) -> Now {
        Now {
            mono: self.t0 + Duration::from_millis(self.ms),
            wall: self.w0 + Duration::from_millis(self.ms),
        }
    }

    fn collect(&mut self) {
        while let Some(e) = self.core.poll_effect() {
            self.effects.push(e);
        }
    }

    fn take(&mut self) -> Vec<Effect> {
        self.collect();
        std::mem::take(&mut self.effects)
    }

    /// Moves time on, firing every timeout on the way.
    fn advance(&mut self, ms: u64) {
        let end = self.ms + ms;
        let mut fired = 0;
        while let Some(at) = self.core.poll_timeout() {
            let at_ms = at.saturating_duration_since(self.t0).as_millis() as u64;
            if at_ms > end {
                break;
            }
            fired += 1;
            assert!(
                fired < 10_000,
                "the timeout does not move on: {at_ms} ms, state {:?}, {:?}",
                self.core.state(),
                self.core
            );
            self.ms = self.ms.max(at_ms);
            let now = self.now();
            self.core.handle_timeout(now);
            self.collect();
        }
        self.ms = end;
        let now = self.now();
        self.core.handle_timeout(now);
        self.collect();
    }

    fn pending_launch(&self) -> Option<(String, bool, bool)> {
        self.effects.iter().rev().find_map(|e| match e {
            Effect::Launch {
                reload_id,
                takeover,
                draining,
                ..
            } => Some((reload_id.clone(), *takeover, *draining)),
            _ => None,
        })
    }

    /// Completes the launch the core asked for; returns the new worker's pid.
    fn launch_ok(&mut self) -> u32 {
        self.collect();
        let (reload_id, ..) = self.pending_launch().expect("a launch was asked for");
        self.effects.retain(|e| !matches!(e, Effect::Launch { .. }));
        let pid = self.next_pid;
        self.next_pid += 1;
        let now = self.now();
        let worker = record(pid, drain::unix_ms(now.wall));
        self.core.handle_launched(
            now,
            &reload_id,
            Launched::Ready {
                worker,
                launch: Duration::from_millis(30),
            },
        );
        self.collect();
        pid
    }

    fn launch_fails(&mut self) {
        self.collect();
        let (reload_id, ..) = self.pending_launch().expect("a launch was asked for");
        self.effects.retain(|e| !matches!(e, Effect::Launch { .. }));
        let now = self.now();
        self.core.handle_launched(
            now,
            &reload_id,
            Launched::Failed {
                config_invalid: false,
                message: "boom".into(),
            },
        );
        self.collect();
    }

    fn request(&mut self, request: Request) -> ReplyTo {
        let to = ReplyTo(self.next_reply);
        self.next_reply += 1;
        let now = self.now();
        self.core.handle_request(
            now,
            Origin {
                to,
                request_id: None,
                cause: Cause::default(),
            },
            request,
        );
        self.collect();
        to
    }

    fn reply(&self, to: ReplyTo) -> Option<Reply> {
        self.effects.iter().find_map(|e| match e {
            Effect::Reply { to: t, reply } if *t == to => Some((**reply).clone()),
            _ => None,
        })
    }

    /// Sends `request` and returns its immediate reply.
    fn ask(&mut self, request: Request) -> Reply {
        let to = self.request(request);
        self.reply(to).expect("an immediate reply")
    }

    fn signal(&mut self, s: AgentSignal) {
        let now = self.now();
        self.core.handle_signal(now, s);
        self.collect();
    }

    fn exit(&mut self, pid: u32) {
        let now = self.now();
        let id = ProcessId {
            pid,
            start_time: u64::from(pid),
        };
        self.core
            .handle_worker_exit(now, id, ExitStatus::Code(0), None);
        self.collect();
    }

    fn sample(&mut self, busy: u64) {
        let pid = self.core.current().expect("a current worker").id.pid;
        let now = self.now();
        self.core.handle_sample(
            now,
            Sample {
                pid,
                busy: Some(busy),
                accepted: 0,
            },
        );
        self.collect();
    }

    fn drain(&mut self, min_ms: u64) -> Reply {
        self.ask(Request::Drain(DrainRequest {
            drain_id: Some("d1".into()),
            min_period_ms: Some(min_ms),
            ..DrainRequest::default()
        }))
    }

    fn launches(&self) -> usize {
        self.effects
            .iter()
            .filter(|e| matches!(e, Effect::Launch { .. }))
            .count()
    }

    fn signals(&self) -> Vec<(u32, WorkerSignal)> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Signal { worker, signal } => Some((worker.pid, *signal)),
                _ => None,
            })
            .collect()
    }

    fn events(&self) -> Vec<&'static str> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Publish(ev) => Some(ev.kind()),
                _ => None,
            })
            .collect()
    }

    fn exited(&self) -> Option<Outcome> {
        self.effects.iter().find_map(|e| match e {
            Effect::Exit(o) => Some(*o),
            _ => None,
        })
    }

    // The states of the table.

    fn draining() -> Node {
        let mut n = Node::serving();
        assert!(n.drain(60_000).ok);
        assert_eq!(n.core.state(), NodeState::Draining);
        n.take();
        n
    }

    fn drained() -> Node {
        let mut n = Node::serving();
        assert!(n.drain(0).ok);
        n.sample(0);
        assert_eq!(n.core.state(), NodeState::Drained);
        n.take();
        n
    }

    /// Stopping, with the `stopping` hook done and the worker told to stop.
    fn stopping() -> Node {
        let mut n = Node::serving();
        n.request(Request::Stop { timeout: None });
        let now = n.now();
        n.core.handle_stopping_hook_done(now);
        n.collect();
        assert_eq!(n.core.state(), NodeState::Stopping);
        n.take();
        n
    }

    fn stopped() -> Node {
        let mut n = Node::stopping();
        n.exit(100);
        assert_eq!(n.core.state(), NodeState::Stopped);
        n.take();
        n
    }

    /// Its worker crashed and the restart waits for its backoff.
    fn failed() -> Node {
        let mut n = Node::serving();
        n.exit(100);
        assert_eq!(n.core.state(), NodeState::Failed);
        n.take();
        n
    }
}

fn code(r: &Reply) -> Option<ErrorCode> {
    r.error.as_ref().map(|e| e.code)
}

fn result(r: &Reply) -> serde_json::Value {
    r.result.clone().unwrap_or_default()
}

// -------------------------------------------------------------------------------------------
// The table, row by row.
// -------------------------------------------------------------------------------------------

#[test]
fn reload_by_state() {
    for (mut n, launches, draining) in [(Node::serving(), 1, false), (Node::draining(), 1, true)] {
        let to = n.request(Request::Reload { pushed: None });
        assert_eq!(n.launches(), launches);
        assert_eq!(n.pending_launch().map(|l| l.2), Some(draining));
        let pid = n.launch_ok();
        assert!(n.reply(to).expect("reply after the launch").ok);
        assert_eq!(n.signals(), vec![(100, WorkerSignal::SoftStop)]);
        assert_eq!(n.core.current().map(|w| w.id.pid), Some(pid));
    }
    for mut n in [Node::drained(), Node::stopping(), Node::stopped()] {
        let r = n.ask(Request::Reload { pushed: None });
        assert_eq!(code(&r), Some(ErrorCode::Conflict), "{r:?}");
        assert_eq!(n.launches(), 0);
        assert!(n.signals().is_empty());
    }
    let mut n = Node::failed();
    let to = n.request(Request::Reload { pushed: None });
    assert_eq!(
        n.pending_launch().map(|l| l.1),
        Some(false),
        "no -x: nothing to take over"
    );
    n.launch_ok();
    assert!(n.reply(to).expect("reply").ok);
    assert_eq!(n.core.state(), NodeState::Serving);
}

#[test]
fn sighup_by_state() {
    for mut n in [Node::serving(), Node::draining(), Node::failed()] {
        n.signal(AgentSignal::Reload);
        assert_eq!(n.launches(), 1);
    }
    // The bugs: a SIGHUP on a drained or stopped node started a new worker. Nothing is started
    // or signalled (a stopping node is watched only until its own stop timeout escalates).
    for (mut n, watch_ms) in [
        (Node::drained(), 600_000),
        (Node::stopping(), 29_000),
        (Node::stopped(), 600_000),
    ] {
        let before = n.core.state();
        n.signal(AgentSignal::Reload);
        n.advance(watch_ms);
        assert_eq!(n.launches(), 0, "{before:?}");
        assert_eq!(n.signals(), vec![], "{before:?}");
        assert_eq!(n.core.state(), before);
    }
}

#[test]
fn drain_by_state() {
    let mut n = Node::serving();
    let r = n.drain(60_000);
    assert!(r.ok);
    assert_eq!(result(&r)["already_draining"], false);
    assert_eq!(n.core.state(), NodeState::Draining);

    let mut n = Node::draining();
    let r = n.drain(0);
    assert_eq!(result(&r)["already_draining"], true);
    assert_eq!(result(&r)["drained_at"], serde_json::Value::Null);

    let mut n = Node::drained();
    let r = n.drain(0);
    assert_eq!(result(&r)["already_draining"], true);
    assert!(result(&r)["drained_at"].is_string());

    for mut n in [Node::stopping(), Node::stopped(), Node::failed()] {
        let r = n.drain(0);
        assert_eq!(code(&r), Some(ErrorCode::Conflict), "{r:?}");
    }

    // Stopped by the drain's own stop_when_drained: the drain is still the answer.
    let mut n = Node::serving();
    let r = n.ask(Request::Drain(DrainRequest {
        drain_id: Some("d1".into()),
        min_period_ms: Some(0),
        stop_when_drained: Some(true),
        ..DrainRequest::default()
    }));
    assert!(r.ok);
    n.sample(0);
    let now = n.now();
    n.core.handle_stopping_hook_done(now);
    n.exit(100);
    assert_eq!(n.core.state(), NodeState::Stopped);
    let r = n.drain(0);
    assert_eq!(result(&r)["already_draining"], true, "{r:?}");
    assert!(result(&r)["drained_at"].is_string());
}

#[test]
fn undrain_by_state() {
    let mut n = Node::serving();
    let r = n.ask(Request::Undrain(UndrainRequest::default()));
    assert!(r.ok);
    assert_eq!(result(&r)["drain_id"], serde_json::Value::Null);

    for mut n in [Node::draining(), Node::drained()] {
        let r = n.ask(Request::Undrain(UndrainRequest::default()));
        assert!(r.ok);
        assert_eq!(n.core.state(), NodeState::Serving);
        assert!(n.events().contains(&"undrained"));
        assert!(n
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Commands(j) if j.kind == CommandKind::Stop)));
    }

    let mut n = Node::stopping();
    let r = n.ask(Request::Undrain(UndrainRequest::default()));
    assert_eq!(code(&r), Some(ErrorCode::Conflict));

    let mut n = Node::stopped();
    let r = n.ask(Request::Undrain(UndrainRequest::default()));
    assert!(r.ok);
    assert_eq!(n.launches(), 1, "undrain starts HAProxy again");
    n.launch_ok();
    assert_eq!(n.core.state(), NodeState::Serving);

    let mut n = Node::failed();
    let r = n.ask(Request::Undrain(UndrainRequest::default()));
    assert_eq!(code(&r), Some(ErrorCode::Conflict));
}

#[test]
fn stop_by_state() {
    for (mut n, state) in [
        (Node::serving(), NodeState::Serving),
        (Node::draining(), NodeState::Draining),
        (Node::drained(), NodeState::Drained),
    ] {
        let to = n.request(Request::Stop { timeout: None });
        assert_eq!(n.core.state(), NodeState::Stopping, "from {state:?}");
        // The `stopping` hook comes first; nothing is signalled before it returned.
        assert!(n.effects.contains(&Effect::StoppingHook));
        assert!(n.signals().is_empty());
        let now = n.now();
        n.core.handle_stopping_hook_done(now);
        n.collect();
        assert_eq!(n.signals(), vec![(100, WorkerSignal::SoftStop)]);
        assert_eq!(n.core.drain_id(), None, "a stop ends the drain");
        n.exit(100);
        let r = n.reply(to).expect("reply once stopped");
        assert_eq!(result(&r)["connections_cut"], 0);
        assert_eq!(n.core.state(), NodeState::Stopped);
    }

    let mut n = Node::stopping();
    let to = n.request(Request::Stop { timeout: None });
    assert!(n.reply(to).is_none(), "joins the running stop");
    n.exit(100);
    assert!(n.reply(to).expect("answered with the stop").ok);

    let mut n = Node::stopped();
    let r = n.ask(Request::Stop { timeout: None });
    assert_eq!(result(&r)["connections_cut"], 0);

    let mut n = Node::failed();
    let r = n.ask(Request::Stop { timeout: None });
    assert!(r.ok);
    assert_eq!(n.core.state(), NodeState::Stopped);
    n.advance(60_000);
    assert_eq!(n.launches(), 0, "a stopped node does not restart");
}

#[test]
fn sigterm_by_state() {
    for mut n in [Node::serving(), Node::draining(), Node::drained()] {
        n.signal(AgentSignal::Stop);
        assert_eq!(n.exited(), None);
        let now = n.now();
        n.core.handle_stopping_hook_done(now);
        n.exit(100);
        assert_eq!(n.exited(), Some(Outcome::Stopped { connections_cut: 0 }));
    }
    let mut n = Node::stopping();
    n.signal(AgentSignal::Stop);
    assert_eq!(n.exited(), None, "finishes the stop first");
    n.exit(100);
    assert!(n.exited().is_some());
    for mut n in [Node::stopped(), Node::failed()] {
        n.signal(AgentSignal::Stop);
        assert!(n.exited().is_some());
        assert!(n.signals().is_empty());
    }
}

#[test]
fn sigusr2_by_state() {
    for mut n in [
        Node::serving(),
        Node::draining(),
        Node::drained(),
        Node::failed(),
    ] {
        n.signal(AgentSignal::Detach);
        assert_eq!(n.exited(), Some(Outcome::Detached));
        assert!(n.signals().is_empty(), "HAProxy is left for adoption");
        // The state is durable before the exit.
        let persisted = n
            .effects
            .iter()
            .rposition(|e| matches!(e, Effect::Persist(_)));
        let exit = n.effects.iter().position(|e| matches!(e, Effect::Exit(_)));
        assert!(persisted < exit);
    }
    let mut n = Node::stopping();
    n.signal(AgentSignal::Detach);
    assert_eq!(n.exited(), None);
    n.exit(100);
    assert!(matches!(n.exited(), Some(Outcome::Stopped { .. })));
    let mut n = Node::stopped();
    n.signal(AgentSignal::Detach);
    assert!(n.exited().is_some());
}

#[test]
fn current_worker_dies_by_state() {
    let mut n = Node::serving();
    n.exit(100);
    assert!(n.events().contains(&"proxy_crashed"));
    assert_eq!(n.launches(), 0, "not before the backoff");
    n.advance(1_000);
    assert_eq!(n.launches(), 1);

    let mut n = Node::draining();
    n.exit(100);
    n.advance(1_000);
    assert_eq!(
        n.pending_launch().map(|l| l.2),
        Some(true),
        "the restarted worker drains"
    );
    let pid = n.launch_ok();
    assert!(n.effects.iter().any(
        |e| matches!(e, Effect::Commands(j) if j.worker.pid == pid && j.kind == CommandKind::Start)
    ));

    let mut n = Node::drained();
    n.exit(100);
    n.advance(600_000);
    assert_eq!(n.launches(), 0, "stays drained; no restart");
    assert_eq!(n.core.state(), NodeState::Drained);

    let mut n = Node::stopping();
    n.exit(100);
    assert_eq!(n.core.state(), NodeState::Stopped);
    assert_eq!(n.launches(), 0);

    let mut n = Node::failed();
    n.advance(200);
    n.launch_fails();
    assert_eq!(n.core.state(), NodeState::Failed);
    n.advance(10_000);
    assert_eq!(n.launches(), 1, "backoff retry");
}

#[test]
fn old_worker_exits_by_state() {
    let mut n = Node::serving();
    n.request(Request::Reload { pushed: None });
    n.launch_ok();
    n.take();
    n.exit(100);
    assert_eq!(n.events(), vec!["worker_exited"]);

    // Draining: the old worker holds the drain until it exits.
    let mut n = Node::serving();
    n.request(Request::Reload { pushed: None });
    n.launch_ok();
    n.drain(0);
    n.sample(0);
    assert_eq!(n.core.state(), NodeState::Draining);
    n.exit(100);
    assert_eq!(n.core.state(), NodeState::Drained);

    let mut n = Node::stopping();
    n.request(Request::Reload { pushed: None });
    assert_eq!(n.launches(), 0);
}

// -------------------------------------------------------------------------------------------
// Adoption
// -------------------------------------------------------------------------------------------

#[test]
fn an_unreachable_admin_socket_never_makes_a_live_worker_old() {
    // The bug: every verified worker was classed as old, the healthy one got SIGUSR1, and a
    // fresh HAProxy started without -x.
    let boot = Boot {
        workers: vec![(record(100, 0), true), (record(90, 0), false)],
        answering: None,
        ..Boot::default()
    };
    let mut n = Node::boot(cfg(&[]), boot);
    assert_eq!(n.launches(), 0);
    assert!(n.signals().is_empty());
    assert_eq!(n.core.current().map(|w| w.id.pid), Some(100));
    assert_eq!(n.core.state(), NodeState::Serving);
    assert!(n.effects.contains(&Effect::ConfirmCurrent));
    assert!(!n.core.status(n.now(), vec![]).warnings.is_empty());
    n.advance(60_000);
    assert_eq!(n.launches(), 0);
    assert!(n.signals().is_empty());
    // Once it answers, the old worker is told to stop, and only it.
    let now = n.now();
    n.core.handle_admin_answers(now, &[100]);
    n.collect();
    assert_eq!(n.signals(), vec![(90, WorkerSignal::SoftStop)]);
}

#[test]
fn the_newest_answering_worker_is_current() {
    // An agent died after a new worker was ready but before it recorded it.
    let boot = Boot {
        workers: vec![(record(100, 0), true), (record(120, 0), false)],
        answering: Some(vec![100, 120]),
        ..Boot::default()
    };
    let n = Node::boot(cfg(&[]), boot);
    assert_eq!(n.core.current().map(|w| w.id.pid), Some(120));
    assert_eq!(n.signals(), vec![(100, WorkerSignal::SoftStop)]);
}

#[test]
fn nothing_verified_starts_a_worker() {
    let mut n = Node::boot(cfg(&[]), Boot::default());
    assert_eq!(n.core.state(), NodeState::Starting);
    assert_eq!(n.pending_launch().map(|l| l.1), Some(false));
    n.launch_ok();
    assert!(n.events().contains(&"agent_started"));
}

#[test]
fn a_resumed_drain_waits_for_every_plugin_again() {
    // The bug: a drain resumed after kill -9 forgot its plugins had not answered, and declared
    // drained before the ALB deregistration delay.
    let mut first = Node::serving_with(&["alb"]);
    first.drain(0);
    let state = first
        .take()
        .into_iter()
        .rev()
        .find_map(|e| match e {
            Effect::Persist(s) => Some(*s),
            _ => None,
        })
        .expect("persisted");
    let boot = Boot {
        drain: state.drain.clone(),
        workers: vec![(state.current.clone().expect("current"), true)],
        answering: Some(vec![100]),
        ..Boot::default()
    };
    let mut n = Node::boot(cfg(&["alb"]), boot);
    n.sample(0);
    n.advance(1_000);
    assert_eq!(n.core.state(), NodeState::Draining);
    assert!(n
        .core
        .blockers(n.now())
        .iter()
        .any(|b| matches!(b, Blocker::Plugin { name, .. } if name == "alb")));
    let now = n.now();
    n.core
        .handle_verdicts(now, "d1", vec![("alb".into(), Verdict::Idle)]);
    assert_eq!(n.core.state(), NodeState::Drained);
}

#[test]
fn a_stale_verdict_cannot_end_a_newer_drain() {
    let mut n = Node::serving_with(&["alb"]);
    n.drain(0);
    n.ask(Request::Undrain(UndrainRequest::default()));
    n.ask(Request::Drain(DrainRequest {
        drain_id: Some("d2".into()),
        min_period_ms: Some(0),
        ..DrainRequest::default()
    }));
    n.sample(0);
    let now = n.now();
    n.core
        .handle_verdicts(now, "d1", vec![("alb".into(), Verdict::Idle)]);
    assert_eq!(n.core.state(), NodeState::Draining, "d1's verdict is stale");
    n.core
        .handle_verdicts(now, "d2", vec![("alb".into(), Verdict::Idle)]);
    assert_eq!(n.core.state(), NodeState::Drained);
}

#[test]
fn drained_is_persisted_before_it_is_published() {
    let mut n = Node::serving();
    n.drain(0);
    n.take();
    n.sample(0);
    let effects = n.take();
    let publish = effects
        .iter()
        .position(|e| matches!(e, Effect::Publish(ev) if ev.kind() == "drained"))
        .expect("drained");
    let persist = effects[..publish]
        .iter()
        .rposition(|e| matches!(e, Effect::Persist(s) if s.drained_event.is_some()))
        .expect("persisted with the event before it is published");
    assert!(persist < publish);
}

#[test]
fn drain_started_reaches_plugins_after_the_start_commands_ran() {
    let mut n = Node::serving_with(&["alb"]);
    n.drain(60_000);
    let hook = |n: &Node| {
        n.effects
            .iter()
            .any(|e| matches!(e, Effect::Hook(h) if matches!(**h, HookEvent::DrainStarted(_))))
    };
    assert!(!hook(&n));
    let job = n
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::Commands(j) => Some(j.clone()),
            _ => None,
        })
        .expect("start commands");
    let now = n.now();
    n.core.handle_commands_done(now, &job, Ok(()));
    n.collect();
    assert!(hook(&n));
}

#[test]
fn a_failing_admin_command_shows_in_status() {
    let mut n = Node::draining();
    let job = CommandJob {
        worker: record(100, 0).id,
        drain_id: "d1".into(),
        kind: CommandKind::Start,
        commands: vec![],
    };
    let now = n.now();
    n.core
        .handle_commands_done(now, &job, Err("Permission denied".into()));
    let warnings = n.core.status(n.now(), vec![]).warnings;
    assert!(
        warnings.iter().any(|w| w.contains("Permission denied")),
        "{warnings:?}"
    );
}

#[test]
fn a_reload_in_flight_holds_the_drain() {
    // A worker on its way in would become current after `drained`, with the previous one old.
    let mut n = Node::draining();
    n.request(Request::Reload { pushed: None });
    n.advance(120_000);
    n.sample(0);
    assert_eq!(n.core.state(), NodeState::Draining);
    n.launch_ok();
    n.exit(100);
    n.sample(0);
    assert_eq!(n.core.state(), NodeState::Drained);
}

// -------------------------------------------------------------------------------------------
// Bounded old workers
// -------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// master-worker mode: the same rules, with a master that forks the workers
// ---------------------------------------------------------------------------------------------

const MASTER: ProcessId = ProcessId {
    pid: 50,
    start_time: 50,
};

/// A node whose master (pid 50) runs its first worker (pid 100).
fn with_master(owned: bool) -> Node {
    let mut c = cfg(&[]);
    c.supervision = Supervision::Master { owned };
    let mut n = Node::boot(c, Boot::default());
    n.launch_ok();
    n.view(MASTER, Some(100));
    assert_eq!(n.core.state(), NodeState::Serving);
    n.take();
    n
}

impl Node {
    fn view(&mut self, master: ProcessId, current: Option<u32>) {
        let now = self.now();
        let current = current.map(|pid| record(pid, drain::unix_ms(now.wall)));
        self.core.handle_master_view(
            now,
            MasterView {
                master,
                version: "2.8.25".into(),
                current,
            },
        );
        self.collect();
    }

    fn master_signals(&self) -> Vec<WorkerSignal> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::SignalMaster { master, signal } if *master == MASTER => Some(*signal),
                Effect::SignalMaster { master, .. } => panic!("signalled master {master:?}"),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_reload_through_the_master_signals_no_worker_the_master_already_told() {
    let mut n = with_master(false);
    let pid = reload_ok(&mut n);
    assert_eq!(n.core.current().map(|w| w.id.pid), Some(pid));
    assert_eq!(
        n.core.workers().count(),
        2,
        "the displaced worker is tracked as old"
    );
    // reload_ok took the effects: run one more and look at them.
    n.request(Request::Reload { pushed: None });
    n.launch_ok();
    assert!(n.signals().is_empty(), "{:?}", n.effects);
    assert!(n.master_signals().is_empty(), "{:?}", n.effects);
    let status = n.core.status(n.now(), vec![]);
    assert_eq!(status.haproxy.mode, "master-worker");
    assert_eq!(status.haproxy.master_pid, Some(50));
    assert_eq!(status.old_workers.len(), 2);
}

#[test]
fn an_attached_master_is_never_stopped_stop_is_a_conflict_and_sigterm_detaches() {
    let mut n = with_master(false);
    let reply = n.ask(Request::Stop { timeout: None });
    assert_eq!(code(&reply), Some(ErrorCode::Conflict), "{reply:?}");
    assert!(
        reply
            .error
            .as_ref()
            .is_some_and(|e| e.message.contains("service manager")),
        "{reply:?}"
    );
    assert_eq!(n.core.state(), NodeState::Serving);
    n.signal(AgentSignal::Stop);
    assert_eq!(n.exited(), Some(Outcome::Detached));
    assert!(
        n.signals().is_empty() && n.master_signals().is_empty(),
        "{:?}",
        n.effects
    );
}

#[test]
fn a_drain_asking_to_stop_an_attached_master_is_a_conflict_and_drains_nothing() {
    // Found by the model: a drain carrying stop_when_drained would have signalled a master
    // that the service manager runs, once drained.
    let mut n = with_master(false);
    let reply = n.ask(Request::Drain(DrainRequest {
        stop_when_drained: Some(true),
        ..DrainRequest::default()
    }));
    assert_eq!(code(&reply), Some(ErrorCode::Conflict), "{reply:?}");
    assert!(
        reply
            .error
            .as_ref()
            .is_some_and(|e| e.message.contains("service manager")),
        "{reply:?}"
    );
    assert_eq!(n.core.state(), NodeState::Serving);
    assert!(n.drain(0).ok, "a drain without it still runs");
}

#[test]
fn an_owned_master_is_stopped_through_the_master_and_escalates_at_the_deadline() {
    let mut n = with_master(true);
    reload_ok(&mut n);
    let to = n.request(Request::Stop {
        timeout: Some(Duration::from_secs(5)),
    });
    assert!(
        n.master_signals().is_empty(),
        "the stopping hook comes first"
    );
    let now = n.now();
    n.core.handle_stopping_hook_done(now);
    n.collect();
    assert_eq!(n.master_signals(), vec![WorkerSignal::SoftStop]);
    assert!(
        n.signals().is_empty(),
        "one signal, to the master: {:?}",
        n.effects
    );
    n.take();
    n.advance(5_000);
    assert_eq!(n.master_signals(), vec![WorkerSignal::HardStop]);
    n.take();
    n.advance(5_000);
    assert!(n.master_signals().contains(&WorkerSignal::Kill));
    let mut killed: Vec<u32> = n.signals().into_iter().map(|(pid, _)| pid).collect();
    killed.sort_unstable();
    assert_eq!(
        killed,
        vec![100, 101],
        "a kill reaches every worker as well"
    );
    n.exit(100);
    n.exit(101);
    assert_eq!(n.core.state(), NodeState::Stopped);
    assert!(n.reply(to).is_some_and(|r| r.ok));
}

#[test]
fn a_worker_the_master_forks_during_a_drain_gets_the_drain_commands() {
    // `systemctl reload haproxy` behind ebb's back, mid-drain: the new worker cannot inherit
    // EBB_DRAINING, so unless it gets the start commands it answers 200 on /healthz.
    let mut n = with_master(false);
    assert!(n.drain(60_000).ok);
    n.take();
    n.view(MASTER, Some(300));
    assert_eq!(n.core.current().map(|w| w.id.pid), Some(300));
    let jobs: Vec<&CommandJob> = n
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Commands(job) => Some(job),
            _ => None,
        })
        .collect();
    assert!(
        jobs.iter()
            .any(|j| j.worker.pid == 300 && j.kind == CommandKind::Start),
        "{jobs:?}"
    );
    assert_eq!(n.events(), vec!["reloaded"]);
    let blockers = n.core.blockers(n.now());
    assert!(
        blockers
            .iter()
            .any(|b| matches!(b, Blocker::OldWorker { pid: 100, .. })),
        "the displaced worker blocks the drain: {blockers:?}"
    );
}

#[test]
fn a_restarted_master_is_reported_and_the_drain_goes_on() {
    let mut n = with_master(false);
    assert!(n.drain(60_000).ok);
    n.take();
    // The service manager restarts the master: its workers go, a new master forks one.
    n.exit(100);
    let new_master = ProcessId {
        pid: 60,
        start_time: 60,
    };
    n.view(new_master, Some(400));
    let attached: Vec<&Event> = n
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish(ev) if ev.kind() == "master_attached" => Some(&**ev),
            _ => None,
        })
        .collect();
    assert_eq!(attached.len(), 1, "{:?}", n.effects);
    match &attached[0].body {
        EventBody::MasterAttached {
            pid, previous_pid, ..
        } => assert_eq!((*pid, *previous_pid), (60, Some(50))),
        other => panic!("{other:?}"),
    }
    assert_eq!(n.core.current().map(|w| w.id.pid), Some(400));
    assert_eq!(n.core.state(), NodeState::Draining);
    assert_eq!(n.core.drain_id(), Some("d1"));
    assert!(n.effects.iter().any(
        |e| matches!(e, Effect::Commands(j) if j.worker.pid == 400 && j.kind == CommandKind::Start)
    ));
    assert_eq!(n.core.master(), Some(new_master));
}

#[test]
fn a_view_during_a_reload_of_ebbs_own_leaves_the_new_worker_to_the_launch() {
    let mut n = with_master(false);
    n.request(Request::Reload { pushed: None });
    n.view(MASTER, Some(777));
    assert_eq!(n.core.current().map(|w| w.id.pid), Some(100));
    let pid = n.launch_ok();
    assert_eq!(n.core.current().map(|w| w.id.pid), Some(pid));
}

#[test]
fn an_idle_worker_the_master_stops_before_the_reload_answers_is_its_old_worker_not_a_crash() {
    // The master soft-stops the displaced worker during the reload; an idle one exits before the
    // new worker answers. The bug: a crash, a restart, and a reload reply with no old worker.
    let mut n = with_master(false);
    let to = n.request(Request::Reload { pushed: None });
    n.exit(100);
    assert!(!n.events().contains(&"proxy_crashed"), "{:?}", n.effects);
    let pid = n.launch_ok();
    let reply = n.reply(to).expect("a reply");
    assert_eq!(
        result(&reply)["old_pids"],
        serde_json::json!([100]),
        "{reply:?}"
    );
    assert_eq!(n.core.current().map(|w| w.id.pid), Some(pid));
    assert_eq!(n.core.workers().count(), 1);
    assert_eq!(n.launches(), 0, "no restart was scheduled");
    n.advance(1_000);
    assert_eq!(n.launches(), 0, "no restart was scheduled");
}

fn capped(max_old_workers: usize) -> Node {
    let mut c = cfg(&[]);
    c.max_old_workers = max_old_workers;
    let mut n = Node::boot(c, Boot::default());
    n.launch_ok();
    n.take();
    n
}

/// Reloads once, the launch succeeding; returns the new worker's pid.
fn reload_ok(n: &mut Node) -> u32 {
    let to = n.request(Request::Reload { pushed: None });
    let pid = n.launch_ok();
    assert!(n.reply(to).expect("a reply").ok);
    n.take();
    pid
}

#[test]
fn reloads_past_max_old_workers_are_refused_and_nothing_is_killed() {
    // The bug: every reload left one more old worker pinned by a long connection, without bound,
    // until the host ran out of memory or file descriptors.
    let mut n = capped(2);
    reload_ok(&mut n);
    reload_ok(&mut n);
    n.core
        .handle_connection_counts(HashMap::from([(100, 2), (101, 1)]));
    n.ms += 40_000;
    let r = n.ask(Request::Reload { pushed: None });
    assert_eq!(code(&r), Some(ErrorCode::Conflict), "{r:?}");
    let message = r.error.expect("an error").message;
    assert!(
        message.contains("2 old workers are still finishing connections")
            && message
                .contains("oldest: pid 100, 40 s, 2 connections; pid 101, 40 s, 1 connection)")
            && message.contains("would exceed reload.max_old_workers = 2")
            && message.contains("raise the cap"),
        "{message}"
    );
    assert_eq!(n.launches(), 0);
    assert!(n.signals().is_empty(), "nothing is killed to make room");
    n.signal(AgentSignal::Reload);
    assert_eq!(n.launches(), 0, "SIGHUP meets the same cap");
    assert_eq!(n.core.workers().count(), 3);
    // Once an old worker is gone, reloads work again.
    n.exit(100);
    n.take();
    reload_ok(&mut n);
}

#[test]
fn a_queued_reload_meets_the_cap_when_it_would_start() {
    let mut n = capped(1);
    let first = n.request(Request::Reload { pushed: None });
    let queued = n.request(Request::Reload { pushed: None });
    assert_eq!(n.launches(), 1, "the second waits for the first");
    n.launch_ok();
    assert!(n.reply(first).expect("a reply").ok);
    let r = n
        .reply(queued)
        .expect("the queued reload is answered at once");
    assert_eq!(code(&r), Some(ErrorCode::Conflict), "{r:?}");
    assert!(r
        .error
        .expect("an error")
        .message
        .contains("max_old_workers = 1"));
    assert_eq!(n.launches(), 0, "no second launch");
}

#[test]
fn a_crash_restart_is_never_held_back_by_the_cap() {
    // A restart displaces nothing: refusing it would leave the node without a worker.
    let mut n = capped(1);
    reload_ok(&mut n);
    n.exit(101);
    assert_eq!(n.core.state(), NodeState::Failed);
    n.advance(10_000);
    assert_eq!(n.pending_launch().map(|l| l.1), Some(false));
    n.launch_ok();
    assert_eq!(n.core.state(), NodeState::Serving);
}

// -------------------------------------------------------------------------------------------
// The model: random inputs against a simulated world.
// -------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Reload,
    Hup,
    Drain {
        min_ms: u64,
        stop: bool,
    },
    Undrain,
    Stop,
    Term,
    Usr2,
    LaunchOk,
    LaunchFails,
    /// The n-th live process exits (0 = the newest).
    Exits(usize),
    Sample(u64),
    Verdict {
        idle: bool,
        stale: bool,
    },
    CommandsDone,
    HookDone,
    AdminAnswers,
    Advance(u64),
    /// The agent is killed (-9) and a new one starts from the state file.
    Crash {
        socket_answers: bool,
    },
    /// master-worker mode: the master forks a worker on its own (`systemctl reload haproxy`).
    Fork,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Reload),
        1 => Just(Step::Hup),
        3 => (prop_oneof![Just(0u64), Just(500), Just(5_000)], any::<bool>())
            .prop_map(|(min_ms, stop)| Step::Drain { min_ms, stop }),
        2 => Just(Step::Undrain),
        1 => Just(Step::Stop),
        1 => Just(Step::Term),
        1 => Just(Step::Usr2),
        4 => Just(Step::LaunchOk),
        1 => Just(Step::LaunchFails),
        4 => (0usize..3).prop_map(Step::Exits),
        4 => (0u64..2).prop_map(Step::Sample),
        3 => (any::<bool>(), any::<bool>()).prop_map(|(idle, stale)| Step::Verdict { idle, stale }),
        3 => Just(Step::CommandsDone),
        2 => Just(Step::HookDone),
        1 => Just(Step::AdminAnswers),
        4 => (0u64..20_000).prop_map(Step::Advance),
        1 => any::<bool>().prop_map(|socket_answers| Step::Crash { socket_answers }),
        1 => Just(Step::Fork),
    ]
}

/// The processes that exist, whatever any agent thinks.
#[derive(Default)]
struct World {
    alive: BTreeMap<u32, WorkerRecord>,
    persisted: Option<State>,
    /// Every `drained` ever published: drain id → Msg-Ids.
    drained: HashMap<String, HashSet<String>>,
    /// Per drain id, the furthest state seen (draining < drained < stopping < stopped).
    progress: HashMap<String, u8>,
    next_drain: u32,
    pending: Option<String>,
    jobs: Vec<CommandJob>,
    stopping_hook: bool,
    confirm: bool,
    /// What this agent's core was told, for the drain decision: the last verdict per drain id,
    /// the last sample (pid, busy) of the current worker, and each drain's start and min period.
    verdict: HashMap<String, bool>,
    sample: Option<(u32, u64)>,
    drains: HashMap<String, (u64, u64)>,
}

impl World {
    /// A new agent knows nothing of what the previous one was told.
    fn forget(&mut self) {
        self.pending = None;
        self.jobs.clear();
        self.stopping_hook = false;
        self.confirm = false;
        self.verdict.clear();
        self.sample = None;
    }

    /// Every condition of a drain holds, by what this agent was told.
    fn conditions_hold(&self, n: &Node, drain_id: &str) -> bool {
        let Some((start, min)) = self.drains.get(drain_id) else {
            return false;
        };
        let current = n.core.current().map(|c| c.id.pid);
        n.ms >= start + min
            && n.core.workers().count() == usize::from(current.is_some())
            && self.pending.is_none()
            && self.verdict.get(drain_id) == Some(&true)
            && current.is_none_or(|pid| self.sample == Some((pid, 0)))
    }
}

fn rank(s: NodeState) -> Option<u8> {
    match s {
        NodeState::Draining => Some(0),
        NodeState::Drained => Some(1),
        NodeState::Stopping => Some(2),
        NodeState::Stopped => Some(3),
        _ => None,
    }
}

/// Carries out the core's effects in the world, checking what each may do.
fn apply(n: &mut Node, w: &mut World) -> Result<bool, TestCaseError> {
    let mut exited = false;
    for e in n.take() {
        match e {
            Effect::Launch {
                reload_id,
                takeover,
                ..
            } => {
                prop_assert!(w.pending.is_none(), "one launch at a time");
                let old = n.core.workers().count() - usize::from(n.core.current().is_some());
                prop_assert!(
                    !takeover || old < MODEL_MAX_OLD,
                    "a reload started with {old} old workers, past the cap"
                );
                w.pending = Some(reload_id);
            }
            Effect::Signal { worker, signal } => {
                prop_assert!(
                    n.core.is_recorded(worker),
                    "signalled {worker:?}, which is not recorded"
                );
                // Under a master, the master signals its workers; ebb only kills what is left at
                // the end of a stop, and never touches a master it does not own.
                match n.core.cfg.supervision {
                    Supervision::Direct => {}
                    Supervision::Master { owned } => prop_assert!(
                        owned && signal == WorkerSignal::Kill,
                        "{signal:?} to worker {worker:?} under a master (owned: {owned})"
                    ),
                }
            }
            Effect::SignalMaster { master, .. } => {
                prop_assert_eq!(
                    n.core.cfg.supervision,
                    Supervision::Master { owned: true },
                    "only an owned master is signalled"
                );
                prop_assert_eq!(
                    n.core.master(),
                    Some(master),
                    "signalled a master it does not know"
                );
            }
            Effect::Commands(job) => w.jobs.push(job),
            Effect::Persist(s) => w.persisted = Some(*s),
            Effect::Publish(ev) => {
                if let EventBody::Drained {
                    drain_id, forced, ..
                } = &ev.body
                {
                    // A `drained` sent again after a restart (same Msg-Id) decides nothing anew.
                    let new = w
                        .drained
                        .entry(drain_id.clone())
                        .or_default()
                        .insert(ev.msg_id());
                    if new && !forced {
                        // drained ⇒ every condition held, by what this agent was told.
                        prop_assert!(
                            w.conditions_hold(n, drain_id),
                            "drain {drain_id} declared drained too early"
                        );
                    }
                    // Persisted before published.
                    let kept = w.persisted.as_ref().and_then(|s| s.drained_event.as_ref());
                    prop_assert_eq!(kept.map(|e| e.msg_id()), Some(ev.msg_id()));
                }
            }
            Effect::StoppingHook => w.stopping_hook = true,
            Effect::ConfirmCurrent => w.confirm = true,
            Effect::Exit(_) => exited = true,
            Effect::Reply { .. } | Effect::Hook(_) | Effect::Sample(_) | Effect::Check(_) => {}
        }
    }
    // Every live process is one the core records (or the launch it is waiting for).
    if !exited {
        for (pid, r) in &w.alive {
            prop_assert!(
                n.core.is_recorded(r.id),
                "live process {pid} is not recorded"
            );
        }
        let ids: HashSet<ProcessId> = n.core.workers().map(|w| w.id).collect();
        prop_assert_eq!(
            ids.len(),
            n.core.workers().count(),
            "one record per process"
        );
        for (id, ids) in &w.drained {
            prop_assert!(ids.len() <= 1, "drain {id} declared drained twice: {ids:?}");
        }
        if let Some(id) = n.core.drain_id() {
            // ... and every condition ⇒ drained.
            if n.core.state() == NodeState::Draining && w.conditions_hold(n, id) {
                prop_assert!(false, "drain {id}: every condition holds, yet not drained");
            }
            if let Some(r) = rank(n.core.state()) {
                let seen = w.progress.entry(id.to_string()).or_insert(r);
                prop_assert!(r >= *seen, "drain {id} went back from {seen} to {r}");
                *seen = r;
            }
        }
    }
    Ok(exited)
}

/// Low, so that random inputs meet the old-worker cap often.
const MODEL_MAX_OLD: usize = 2;

fn model_cfg(supervision: Supervision) -> CoreConfig {
    let mut c = cfg(&["alb"]);
    c.max_old_workers = MODEL_MAX_OLD;
    c.supervision = supervision;
    c
}

/// master-worker mode: the shell tells a new core about the master first, with what it runs.
fn attach_master(n: &mut Node, w: &World) {
    if n.core.cfg.supervision == Supervision::Direct {
        return;
    }
    let now = n.now();
    let current = w.alive.values().max_by_key(|r| r.id.pid).cloned();
    n.core.handle_master_view(
        now,
        MasterView {
            master: MASTER,
            version: "2.8.25".into(),
            current: current.filter(|r| n.core.is_recorded(r.id)),
        },
    );
}

fn restart(n: &Node, w: &World, socket_answers: bool) -> Node {
    let state = w.persisted.clone().unwrap_or_default();
    // Every live process passes verification (it is ours); which one was recorded current.
    let current = state.current.as_ref().map(|r| r.id);
    let workers: Vec<(WorkerRecord, bool)> = w
        .alive
        .values()
        .map(|r| (r.clone(), Some(r.id) == current))
        .collect();
    let newest = w.alive.values().map(|r| r.id.pid).max();
    let boot = Boot {
        restarts: state.restarts,
        last_reload: state.last_reload.clone(),
        drain: state.drain.clone(),
        drained_event: state.drained_event.clone(),
        stopping: state.stopping,
        workers,
        answering: socket_answers.then(|| newest.into_iter().collect()),
    };
    let mut c = model_cfg(n.core.cfg.supervision);
    c.boot_id = format!("b{}", n.ms);
    let mut next = Node::boot_at(c, boot, n.t0, n.w0, n.ms);
    next.next_pid = n.next_pid;
    attach_master(&mut next, w);
    next
}

fn run(steps: Vec<Step>, supervision: Supervision) -> Result<(), TestCaseError> {
    let mut n = Node::boot(model_cfg(supervision), Boot::default());
    let mut w = World::default();
    attach_master(&mut n, &w);
    apply(&mut n, &mut w)?;
    for s in steps {
        let now = n.now();
        match s {
            Step::Reload => {
                n.request(Request::Reload { pushed: None });
            }
            Step::Hup => n.signal(AgentSignal::Reload),
            Step::Drain { min_ms, stop } => {
                w.next_drain += 1;
                let id = format!("d{}", w.next_drain);
                n.request(Request::Drain(DrainRequest {
                    drain_id: Some(id.clone()),
                    min_period_ms: Some(min_ms),
                    stop_when_drained: Some(stop),
                    ..DrainRequest::default()
                }));
                if n.core.drain_id() == Some(id.as_str()) {
                    w.drains.insert(id, (n.ms, min_ms));
                    // A new drain starts with no sample of its own.
                    w.sample = None;
                }
            }
            Step::Undrain => {
                n.request(Request::Undrain(UndrainRequest::default()));
            }
            Step::Stop => {
                n.request(Request::Stop { timeout: None });
            }
            Step::Term => n.signal(AgentSignal::Stop),
            Step::Usr2 => n.signal(AgentSignal::Detach),
            Step::LaunchOk | Step::LaunchFails => {
                if let Some(reload_id) = w.pending.take() {
                    if matches!(s, Step::LaunchOk) {
                        let pid = n.next_pid;
                        n.next_pid += 1;
                        let r = record(pid, drain::unix_ms(now.wall));
                        w.alive.insert(pid, r.clone());
                        n.core.handle_launched(
                            now,
                            &reload_id,
                            Launched::Ready {
                                worker: r,
                                launch: Duration::from_millis(30),
                            },
                        );
                    } else {
                        n.core.handle_launched(
                            now,
                            &reload_id,
                            Launched::Failed {
                                config_invalid: false,
                                message: "boom".into(),
                            },
                        );
                    }
                }
            }
            Step::Exits(i) => {
                if let Some(pid) = w.alive.keys().rev().nth(i).copied() {
                    let r = w.alive.remove(&pid).expect("alive");
                    n.core
                        .handle_worker_exit(now, r.id, ExitStatus::Code(0), None);
                }
            }
            Step::Sample(busy) => {
                if let Some(pid) = n.core.current().map(|c| c.id.pid) {
                    // The core keeps samples only for a drain in progress, and not while a
                    // worker is on its way in.
                    let kept = n.core.state() == NodeState::Draining && w.pending.is_none();
                    n.core.handle_sample(
                        now,
                        Sample {
                            pid,
                            busy: Some(busy),
                            accepted: 0,
                        },
                    );
                    if kept {
                        w.sample = Some((pid, busy));
                    }
                }
            }
            Step::Verdict { idle, stale } => {
                let id = if stale {
                    "stale".to_string()
                } else {
                    n.core.drain_id().unwrap_or("none").to_string()
                };
                let v = if idle {
                    Verdict::Idle
                } else {
                    Verdict::Busy("deregistering".into())
                };
                n.core.handle_verdicts(now, &id, vec![("alb".into(), v)]);
                w.verdict.insert(id, idle);
            }
            Step::CommandsDone => {
                if !w.jobs.is_empty() {
                    let job = w.jobs.remove(0);
                    n.core.handle_commands_done(now, &job, Ok(()));
                }
            }
            Step::HookDone => {
                if std::mem::take(&mut w.stopping_hook) {
                    n.core.handle_stopping_hook_done(now);
                }
            }
            Step::AdminAnswers => {
                if std::mem::take(&mut w.confirm) {
                    let pids: Vec<u32> = w.alive.keys().copied().collect();
                    n.core.handle_admin_answers(now, &pids);
                }
            }
            Step::Advance(ms) => n.advance(ms),
            Step::Crash { socket_answers } => {
                w.forget();
                n = restart(&n, &w, socket_answers);
                // A worker whose launch was in flight may be alive but unrecorded: the scan
                // of /proc finds it, which `restart` models by passing every live process.
            }
            Step::Fork => {
                // A master forks on its own only while it runs, and a fork during ebb's own
                // reload is that reload's worker.
                let running = !matches!(n.core.state(), NodeState::Stopping | NodeState::Stopped);
                if n.core.cfg.supervision != Supervision::Direct && running && w.pending.is_none() {
                    let pid = n.next_pid;
                    n.next_pid += 1;
                    let r = record(pid, drain::unix_ms(now.wall));
                    w.alive.insert(pid, r.clone());
                    n.core.handle_master_view(
                        now,
                        MasterView {
                            master: MASTER,
                            version: "2.8.25".into(),
                            current: Some(r),
                        },
                    );
                }
            }
        }
        if apply(&mut n, &mut w)? {
            // The agent exited: the next one starts from what it left.
            w.forget();
            n = restart(&n, &w, true);
            apply(&mut n, &mut w)?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_inputs_never_break_the_invariants(steps in prop::collection::vec(step(), 1..60)) {
        run(steps, Supervision::Direct)?;
    }

    #[test]
    fn random_inputs_never_break_the_invariants_under_a_master(
        steps in prop::collection::vec(step(), 1..60),
        owned in any::<bool>(),
    ) {
        run(steps, Supervision::Master { owned })?;
    }
}
