//! Lifecycle edges end to end: signals against a stopped or drained node, agent restarts that
//! meet a missing admin socket, a drain resumed with a plugin that has not answered yet, drain and
//! undrain racing each other, and a process that only looks like this node's HAProxy.
//!
//! A real nats-server, the real `ebb agent` with its own haproxy, the demo backend and real TCP
//! clients. Waits are conditions with timeouts. Where a test shows that something does NOT happen,
//! it first waits for a positive sign that the agent handled the input (its log line for the
//! signal, then a status round trip through the same input queue), then watches for the unwanted
//! effect during a bounded window.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use support::*;

/// Default timeout of every wait. Generous: the tests share a 2-core machine.
const T: Duration = Duration::from_secs(30);
/// How long a test watches for something that must not happen, once the agent has shown that it
/// handled the input. A launch that should not have happened shows within milliseconds.
const QUIET: Duration = Duration::from_secs(2);

/// A serving node (nats-server, the demo backend, an agent with its haproxy), with a tap on its
/// events from before the agent started; `build` adds to the fixture's defaults.
async fn start_node<'a>(
    build: impl FnOnce(NodeFixtureBuilder<'a>) -> NodeFixtureBuilder<'a>,
) -> NodeFixture {
    build(NodeFixture::builder().timeout(T)).start().await
}

/// Watches for `QUIET`: `violation` is polled (every few ms) and must keep returning `None`; the
/// first `Some(why)` fails the test with `why`.
async fn stays_quiet(mut violation: impl FnMut() -> Option<String>) {
    // Each check runs to completion before its (ready) future is returned, so none is cut short.
    let found = try_wait_for_async(QUIET, || {
        let why = violation();
        async move { why }
    })
    .await;
    if let Some(why) = found {
        panic!("{why}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. SIGHUP after `stop` must not bring HAProxy back behind the node's back
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_after_stop_starts_no_haproxy_and_sigterm_leaves_none_behind() {
    let mut node = start_node(|b| b).await;
    let stopped = node.ok("stop", json!({})).await;
    assert_eq!(stopped["connections_cut"], 0, "{stopped}");
    // The stop reply comes once every worker's exit was seen; a reaped exit may trail it briefly.
    wait_until_async(T, "no haproxy after stop", || async {
        node.haproxy_pids().await.is_empty()
    })
    .await;
    assert_eq!(node.status().await["state"], "stopped");

    let status = node.signal_handled(Signal::HUP).await;
    assert_eq!(
        status["state"], "stopped",
        "a SIGHUP does not change a stopped node's state: {status}"
    );
    let dir = node.dir().to_owned();
    stays_quiet(|| {
        let pids = haproxy_pids_for(&dir);
        (!pids.is_empty()).then(|| {
            format!(
                "SIGHUP on a stopped node started haproxy {pids:?}: the node says stopped, yet \
                 HAProxy serves again"
            )
        })
    })
    .await;
    let status = node.status().await;
    assert_eq!(status["state"], "stopped", "{status}");
    assert_eq!(status["haproxy"]["pid"], Value::Null, "{status}");

    // SIGTERM: the agent exits, and nothing of this node is left running.
    node.sigterm_agent();
    assert_eq!(
        node.haproxy_pids().await,
        Vec::<u32>::new(),
        "haproxy left running after the agent exited"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. SIGHUP on a drained node must not start a new worker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_while_drained_starts_no_new_worker() {
    let mut node = start_node(|b| b).await;
    let w0 = node.serving_pid().await.expect("a worker serves");
    node.ok("drain", json!({"drain_id": "d", "min_period_ms": 0}))
        .await;
    node.events.drained("d").await;
    assert_eq!(node.status().await["state"], "drained");

    let status = node.signal_handled(Signal::HUP).await;
    assert_eq!(status["state"], "drained", "{status}");
    let dir = node.dir().to_owned();
    let events = &node.events;
    stays_quiet(|| {
        let reloaded: Vec<Value> = events
            .of_kind("reloaded")
            .into_iter()
            .map(|e| e.body)
            .collect();
        if !reloaded.is_empty() {
            return Some(format!(
                "SIGHUP on a drained node reloaded it (a reload command gets `conflict` there): \
                 {reloaded:?}"
            ));
        }
        let pids = haproxy_pids_for(&dir);
        if pids != [w0] {
            return Some(format!(
                "SIGHUP on a drained node started a new worker: haproxy pids {pids:?}, drained \
                 worker {w0}"
            ));
        }
        None
    })
    .await;
    assert_eq!(
        node.serving_pid().await,
        Some(w0),
        "the drained worker still serves"
    );
    let status = node.status().await;
    assert_eq!(status["state"], "drained", "{status}");
    assert_eq!(status["haproxy"]["pid"], w0, "{status}");
    assert_eq!(status["drain"]["drain_id"], "d", "{status}");
}

// ---------------------------------------------------------------------------------------------
// 3. An agent restart that finds the admin socket missing for a while
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_the_admin_socket_is_missing_keeps_the_running_haproxy_serving() {
    let mut node = start_node(|b| b).await;
    let w0 = node.serving_pid().await.expect("a worker serves");
    let first_boot = node.status().await["boot_id"].clone();

    // A client connects again and again (a new connection and request each time) all along.
    let load = LoadGen::builder(node.port())
        .concurrency(2)
        .mode(LoadMode::Close)
        .request_timeout(Duration::from_secs(5))
        .max_duration(Duration::from_secs(120))
        .start();
    load.wait_for_ok(20, T);

    // SIGUSR2: the agent exits and leaves HAProxy for the next one.
    node.agent.signal(Signal::USR2).expect("SIGUSR2 the agent");
    let exit = node.agent.wait_exit(T);
    assert!(exit.success(), "the agent exits 0 after SIGUSR2: {exit}");
    assert_eq!(node.serving_pid().await, Some(w0));

    // The next agent starts while the admin socket is gone (moved away, as a slow tmpfiles
    // cleanup or an operator might), and it comes back 2 s later. The 2 s are the outage under
    // test, not a wait for something.
    let hidden = node.hide_admin_socket();
    node.restart_agent();
    tokio::time::sleep(Duration::from_secs(2)).await;
    hidden.restore();

    node.events
        .wait_kind("agent_started", |b| b["boot_id"] != first_boot)
        .await;
    let status = node.wait_state("serving").await;
    load.wait_for_ok(load.ok_count() + 20, T);
    let report = load.stop();
    let pids = node.haproxy_pids().await;
    assert_eq!(
        status["haproxy"]["pid"], w0,
        "the restarted agent must adopt the haproxy that kept serving (pid {w0}), not replace \
         it; haproxy pids now {pids:?}; status {status}; load: {report}"
    );
    assert_eq!(pids, vec![w0], "no second haproxy; load: {report}");
    assert_eq!(
        status["old_workers"],
        json!([]),
        "the running worker was not retired: {status}"
    );
    assert_eq!(
        node.serving_pid().await,
        Some(w0),
        "the same haproxy serves"
    );
    assert!(report.ok > 0, "{report}");
    assert_eq!(
        report.failed(),
        0,
        "no connection refused and no request failed across the restart: {report}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A drain resumed after kill -9 still waits for a plugin that has not answered yet
// ---------------------------------------------------------------------------------------------

/// The ALB plugin's deregistration delay (timer mode) in the next test.
const DEREGISTRATION_DELAY: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_resumed_after_kill_9_still_waits_for_the_alb_deregistration_delay() {
    let mut node = start_node(|b| {
        b.plugins_toml(|_| {
            plugin_toml(
                "alb",
                &cdylib("ebb_plugin_alb"),
                "2s",
                &format!(
                    "{{ deregistration_delay = \"{}s\" }}",
                    DEREGISTRATION_DELAY.as_secs()
                ),
            )
        })
        // A second plugin that says idle, but only after 500 ms, as a check that calls out (a
        // command, an HTTP API) may. The agent gathers every plugin's verdict before it hears
        // any, so the resumed drain goes 500 ms without a plugin answer, not a few
        // milliseconds that the stats sample may or may not win.
        .plugins_toml(|_| {
            plugin_toml(
                "slow",
                &cdylib("ebb_plugin_test"),
                "2s",
                "{ sleep_in = \"check_idle\", sleep_ms = 500 }",
            )
        })
    })
    .await;
    let first_boot = node.status().await["boot_id"].clone();

    node.ok("drain", json!({"drain_id": "resumed", "min_period_ms": 0}))
        .await;
    node.events
        .wait_kind("drain_started", |b| b["drain_id"] == "resumed")
        .await;
    // The drain's reply and event can go out before the agent has written the drain to its state
    // file; a status round trip through the node's input queue comes after that write, so the
    // crash below tests the resume, not a drain lost before it was recorded.
    let status = node.status().await;
    assert_eq!(status["state"], "draining", "{status}");
    // The agent dies a moment into the drain, long before the delay is over.
    node.agent.kill9().expect("kill -9 the agent");
    node.restart_agent();
    let started = node
        .events
        .wait_kind("agent_started", |b| b["boot_id"] != first_boot)
        .await
        .body;
    assert_eq!(started["adopted"], true, "{started}");

    let drained = node.events.drained("resumed").await.body;
    let at = |field: &str| {
        let text = drained[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} of {drained}"));
        ebb_sdk::time::parse_rfc3339(text).unwrap_or_else(|e| panic!("{field}: {e}"))
    };
    let took = at("drained_at")
        .duration_since(at("started_at"))
        .unwrap_or_default();
    assert!(
        took >= DEREGISTRATION_DELAY,
        "drained {took:?} after the drain started, before the ALB's {DEREGISTRATION_DELAY:?} \
         deregistration delay was over: the resumed drain did not wait for the plugin's first \
         answer; {drained}"
    );
    assert_eq!(drained["forced"], false, "{drained}");
}

// ---------------------------------------------------------------------------------------------
// 5. Drain and undrain in quick succession end with the node serving and healthy
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_then_undrain_in_quick_succession_ends_serving_with_healthz_200() {
    const ROUNDS: usize = 10;
    let node = start_node(|b| b).await;
    assert_eq!(node.healthz().await, 200);
    for round in 0..ROUNDS {
        let id = format!("flip-{round}");
        // Both published back to back on one connection, replies gathered afterwards.
        let inbox = node.nc.new_inbox();
        let mut replies = node
            .nc
            .subscribe(format!("{inbox}.*"))
            .await
            .expect("subscribe to the inbox");
        let drain = json!({"drain_id": id, "min_period_ms": 60_000});
        let undrain = json!({"drain_id": id});
        for (verb, body) in [("drain", drain), ("undrain", undrain)] {
            node.nc
                .publish_with_reply(
                    format!("ebb.node.{}.{verb}", node.id()),
                    format!("{inbox}.{verb}"),
                    Bytes::from(body.to_string()),
                )
                .await
                .expect("publish");
        }
        node.nc.flush().await.expect("flush");
        let mut answers = Vec::new();
        while answers.len() < 2 {
            let msg = tokio::time::timeout(T, replies.next())
                .await
                .expect("both replies in time")
                .expect("inbox open");
            let reply: Value = serde_json::from_slice(&msg.payload).expect("a JSON reply");
            assert_eq!(reply["ok"], true, "round {round}: {reply}");
            answers.push((msg.subject.to_string(), reply));
        }

        let undrain_ended = answers
            .iter()
            .find(|(subject, _)| subject.ends_with(".undrain"))
            .map(|(_, reply)| reply["result"]["drain_id"].clone())
            .expect("the undrain reply");
        let status = node.status().await;
        assert_eq!(
            status["state"], "serving",
            "round {round}: drain then undrain, published in that order, must leave the node \
             serving; the undrain ended drain {undrain_ended} (null: it was carried out before \
             the drain); replies {answers:?}; status {status}"
        );
        let port = node.port();
        let healthy = try_wait_for_async(T, || async {
            matches!(http_get(port, "/healthz", true).await, Ok((200, _))).then_some(())
        })
        .await;
        assert!(
            healthy.is_some(),
            "round {round}: /healthz still not 200 after {T:?} while the node says serving \
             (last answer {:?}); replies {answers:?}",
            node.try_healthz().await
        );
        // The agent's admin commands for this round may still be on their way to haproxy: make
        // one more round trip through the node, then watch /healthz stay 200.
        assert_eq!(node.status().await["state"], "serving");
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            let health = node.try_healthz().await;
            assert!(
                matches!(health, Ok(200)),
                "round {round}: /healthz went back to 503 on a serving node: the drain's \
                 admin command landed after the undrain's; got {health:?}; replies {answers:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let status = node.status().await;
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["drain"], Value::Null, "{status}");
}

// ---------------------------------------------------------------------------------------------
// 6. A process that merely looks like this node's HAProxy is neither adopted nor signalled
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_alike_process_beside_the_node_is_not_adopted_or_signalled() {
    // Declared before the node, so it is killed after the agent is gone.
    let mut look_alike: Option<(ChildGuard, PathBuf)> = None;
    let mut node = start_node(|b| {
        b.prepare_with_haproxy(|dir, haproxy, _| {
            // Not haproxy, but its executable file is named `haproxy` and its command line says
            // `-f <this node's haproxy.cfg>`: `tail -f` follows the config and never exits.
            let exe = dir.join("haproxy");
            std::fs::copy("/usr/bin/tail", &exe).expect("copy tail as `haproxy`");
            let stderr_path = dir.join("look-alike.stderr");
            let stderr = std::fs::File::create(&stderr_path).expect("create the stderr file");
            let mut cmd = Command::new(&exe);
            cmd.arg("-f")
                .arg(haproxy.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr);
            let guard = ChildGuard::spawn("look-alike", &mut cmd).expect("start the look-alike");
            let pid = guard.pid();
            wait_until(T, "the look-alike to run", || {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe)
            });
            look_alike = Some((guard, stderr_path));
        })
    })
    .await;
    let (pid, stderr_path) = look_alike
        .as_ref()
        .map(|(child, path)| (child.pid(), path.clone()))
        .expect("the look-alike started");

    let status = node.status().await;
    let w0 = as_pid(&status["haproxy"]["pid"]);
    assert_ne!(
        w0, pid,
        "the look-alike is not the current worker: {status}"
    );
    assert_eq!(node.serving_pid().await, Some(w0));
    let old: Vec<u32> = status["old_workers"]
        .as_array()
        .map(|a| a.iter().map(|w| as_pid(&w["pid"])).collect())
        .unwrap_or_default();
    assert!(
        !old.contains(&pid),
        "the look-alike {pid} was taken for an old worker: {status}"
    );
    assert!(
        is_alive(pid),
        "the look-alike {pid} was killed by the agent's start (taken for an old worker and \
         soft-stopped)"
    );
    assert!(
        stderr_path.exists(),
        "the look-alike's stderr file {} was deleted (as an exited worker's log)",
        stderr_path.display()
    );

    // SIGTERM stops this node's HAProxy only.
    node.sigterm_agent();
    let left: Vec<u32> = node
        .haproxy_pids()
        .await
        .into_iter()
        .filter(|&p| p != pid)
        .collect();
    assert_eq!(left, Vec::<u32>::new(), "no haproxy of this node is left");
    assert!(
        is_alive(pid),
        "the look-alike {pid} was killed when the agent stopped"
    );
    assert!(
        stderr_path.exists(),
        "the look-alike's stderr file {} was deleted when the agent stopped",
        stderr_path.display()
    );
}
