//! systemd's `Type=notify`, end to end: the real `ebb agent` with its own haproxy and a real
//! nats-server, and a datagram socket standing in for systemd's notify socket (`NOTIFY_SOCKET`).
//!
//! - `READY=1` comes once the node serves (HAProxy answers by then), `STATUS=` follows the node's
//!   state and its drain's blockers, `WATCHDOG=1` arrives every half `WATCHDOG_USEC` while the
//!   node answers its status probe, and `STOPPING=1` when the agent begins to exit (SIGUSR2).
//! - A watchdog meant for another process (`WATCHDOG_PID` not the agent's) gets no ping, and
//!   SIGTERM says `STOPPING=1` too.
//!
//! That a node which does not answer its probe gets no ping is the pure decision in
//! agent/src/notify.rs (`Notices`), unit-tested there: stalling the node's loop from outside
//! would need a test hook inside the node.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// Default timeout of every wait. Generous: the tests share a 2-core machine.
const T: Duration = Duration::from_secs(30);

/// 200 ms: a probe (and a ping) every 100 ms.
const WATCHDOG_USEC: &str = "200000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_serving_then_status_watchdog_and_stopping() {
    let notify = NotifySocket::bind();
    let mut node = NodeFixture::builder()
        .env("NOTIFY_SOCKET", notify.path_str())
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .spawn()
        .await;

    let (ready_at, _) = notify.wait_line(T, 0, "READY=1", |l| l == "READY=1");
    // READY=1 comes only after the first start: HAProxy answers by the time it is read.
    node.assert_serves().await;
    assert_eq!(node.status().await["state"], "serving");

    let (serving_at, _) = notify.wait_line(T, 0, "STATUS=serving", |l| l == "STATUS=serving");
    assert!(serving_at > ready_at, "{:?}", notify.lines());
    // Before READY=1 the node was starting: its loop turns (the watchdog is fed), it did not serve.
    let before: Vec<String> = notify.lines()[..ready_at]
        .iter()
        .map(|n| n.line.clone())
        .collect();
    assert!(
        before
            .iter()
            .all(|l| l == "STATUS=starting" || l == "WATCHDOG=1"),
        "{before:?}"
    );

    // A ping every 100 ms while the node answers: five come well within the timeout.
    let pings = notify.count("WATCHDOG=1");
    notify.wait_count(T, "WATCHDOG=1", pings + 5);

    // A drain held by its minimum period: the status says so, with the drain's id.
    let seen = notify.lines().len();
    node.ok(
        "drain",
        json!({"drain_id": "d-sd", "min_period_ms": 600_000}),
    )
    .await;
    let (_, status) = notify.wait_line(T, seen, "STATUS=draining", |l| {
        l.starts_with("STATUS=draining")
    });
    // The connection blocker comes and goes with the test's own requests: only its prefix is fixed.
    assert!(
        status
            .line
            .starts_with("STATUS=draining (drain d-sd): blocked by min_period"),
        "{}",
        status.line
    );
    // The pings go on; an unchanged status is not repeated.
    let pings = notify.count("WATCHDOG=1");
    notify.wait_count(T, "WATCHDOG=1", pings + 3);
    let statuses: Vec<String> = notify
        .lines()
        .into_iter()
        .map(|n| n.line)
        .filter(|l| l.starts_with("STATUS="))
        .collect();
    assert!(statuses.windows(2).all(|w| w[0] != w[1]), "{statuses:?}");

    // SIGUSR2: the agent leaves HAProxy for the next agent and exits, saying STOPPING=1 first.
    let seen = notify.lines().len();
    node.agent.signal(Signal::USR2).expect("SIGUSR2 the agent");
    notify.wait_line(T, seen, "STOPPING=1", |l| l == "STOPPING=1");
    let exit = node.agent.wait_exit(T);
    assert!(exit.success(), "the agent exits 0 after SIGUSR2: {exit}");
    node.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watchdog_for_another_pid_gets_no_ping_and_sigterm_says_stopping() {
    let notify = NotifySocket::bind();
    // systemd names the process it watches; a variable inherited from elsewhere is not ours.
    let mut node = NodeFixture::builder()
        .env("NOTIFY_SOCKET", notify.path_str())
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env("WATCHDOG_PID", "1")
        .spawn()
        .await;
    notify.wait_line(T, 0, "READY=1", |l| l == "READY=1");
    notify.wait_line(T, 0, "STATUS=serving", |l| l == "STATUS=serving");
    node.wait_serving().await;
    // Ten probe periods of a watchdog that would be ours: not one ping.
    let ping = try_wait_for(Duration::from_secs(1), || {
        notify.find(0, |l| l == "WATCHDOG=1")
    });
    assert!(ping.is_none(), "{:?}", notify.lines());

    let seen = notify.lines().len();
    node.agent.signal(Signal::TERM).expect("SIGTERM the agent");
    notify.wait_line(T, seen, "STOPPING=1", |l| l == "STOPPING=1");
    let exit = node.agent.wait_exit(T);
    assert!(exit.success(), "the agent exits 0 after SIGTERM: {exit}");
}
