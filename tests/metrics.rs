//! `/metrics` and `/healthz` (`metrics.listen`) against a real agent, haproxy and nats-server:
//! the text parses as OpenMetrics, and its figures move with reloads, drains, old workers and
//! the NATS connection.

mod support;

use std::net::{Ipv4Addr, TcpListener};

use serde_json::json;
use support::metrics::{get, Scrape};
use support::*;

const ALL_PREFIXED: &str = "ebb_";

/// Waits until a scrape satisfies `pred`; returns it.
async fn scrape_until(node: &NodeFixture, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let pred = &pred;
    let last = std::sync::Mutex::new(None);
    let last_ref = &last;
    let found = try_wait_for_async(node.timeout(), || async move {
        let scrape = node.scrape().await;
        if pred(&scrape) {
            return Some(scrape);
        }
        *last_ref.lock().expect("last scrape") = Some(scrape);
        None
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "timed out waiting for /metrics to show {what}; last scrape: {:#?}",
            last.lock().expect("last scrape")
        )
    })
}

#[test]
fn the_test_parser_refuses_what_openmetrics_refuses() {
    let good = "# HELP a x\n# TYPE a counter\na_total{k=\"v\\\"\"} 1\n# EOF\n";
    let s = Scrape::parse(good).expect("valid");
    assert_eq!(s.get("a_total", &[("k", "v\"")]), 1.0);
    for bad in [
        "# HELP a x\n# TYPE a counter\na_total 1\n",
        "# TYPE a counter\na_total 1\n# EOF\n",
        "# HELP a x\n# TYPE a counter\nb_total 1\n# EOF\n",
        "# HELP a x\n# TYPE a counter\na_total{k=v} 1\n# EOF\n",
        "# HELP a x\n# TYPE a counter\na_total one\n# EOF\n",
        "# HELP a x\n# TYPE a counter\n# HELP a y\n# TYPE a counter\n# EOF\n",
        "a 1\n# EOF\n",
    ] {
        assert!(Scrape::parse(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_reloads_and_drains() {
    let node = NodeFixture::builder().start().await;
    let first = node.scrape().await;
    for f in &first.families {
        assert!(f.name.starts_with(ALL_PREFIXED), "{f:?}");
        assert!(f.help.as_deref().is_some_and(|h| !h.is_empty()), "{f:?}");
    }
    assert_eq!(
        first.value("ebb_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        Some(1.0),
        "{first:#?}"
    );
    assert_eq!(first.value("ebb_node_up", &[]), Some(1.0));
    assert_eq!(
        first.value("ebb_node_state", &[("state", "serving")]),
        Some(1.0)
    );
    assert_eq!(first.value("ebb_draining", &[]), Some(0.0));
    let ok = |s: &Scrape| s.get("ebb_reloads_total", &[("result", "ok")]);
    let timed = |s: &Scrape| s.get("ebb_reload_duration_seconds_count", &[]);
    let (ok0, timed0) = (ok(&first), timed(&first));

    node.ok("reload", json!({})).await;
    let after = scrape_until(&node, "one more reload, ok and timed", |s| {
        ok(s) >= ok0 + 1.0 && timed(s) >= timed0 + 1.0
    })
    .await;
    assert_eq!(after.get("ebb_reloads_total", &[("result", "failed")]), 0.0);
    assert!(
        after.get("ebb_reload_duration_seconds_sum", &[]) > 0.0,
        "{after:#?}"
    );

    // The min period holds the drain long enough for a scrape to see it.
    node.ok("drain", json!({"drain_id": "m1", "min_period_ms": 1500}))
        .await;
    let draining = scrape_until(&node, "the draining state", |s| {
        s.get("ebb_node_state", &[("state", "draining")]) == 1.0
    })
    .await;
    assert_eq!(draining.get("ebb_draining", &[]), 1.0);
    assert_eq!(draining.get("ebb_node_state", &[("state", "serving")]), 0.0);
    assert_eq!(
        draining.get("ebb_drains_total", &[("forced", "false")]),
        0.0
    );
    node.events.drained("m1").await;
    let drained = scrape_until(&node, "the finished drain", |s| {
        s.get("ebb_drains_total", &[("forced", "false")]) == 1.0
    })
    .await;
    assert_eq!(drained.get("ebb_drain_duration_seconds_count", &[]), 1.0);
    assert!(
        drained.get("ebb_drain_duration_seconds_sum", &[]) >= 1.5,
        "{drained:#?}"
    );
    assert_eq!(drained.get("ebb_drains_total", &[("forced", "true")]), 0.0);
    assert_eq!(drained.get("ebb_node_state", &[("state", "drained")]), 1.0);
    assert_eq!(drained.get("ebb_draining", &[]), 1.0);
    node.undrain().await;
    scrape_until(&node, "serving again", |s| {
        s.get("ebb_node_state", &[("state", "serving")]) == 1.0 && s.get("ebb_draining", &[]) == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_worker_gauges_follow_a_held_connection() {
    let node = NodeFixture::builder().start().await;
    let before = node.scrape().await;
    assert_eq!(before.get("ebb_old_workers", &[]), 0.0);

    // A request whose head is not finished pins its connection, hence the old worker, after the
    // reload.
    let partial = partial_request(node.port()).await.expect("partial request");
    node.wait_conns(1).await;
    let reload = node.ok("reload", json!({})).await;
    let old = reload["old_pids"][0].clone();
    let held = scrape_until(&node, "one old worker holding a connection", |s| {
        s.get("ebb_old_workers", &[]) == 1.0 && s.get("ebb_old_worker_connections", &[]) >= 1.0
    })
    .await;
    assert_eq!(held.get("ebb_connections_cut_total", &[]), 0.0);

    let response = partial.finish().await.expect("the old worker answers");
    assert_eq!(response.status, 200, "{response:?}");
    node.events
        .wait_kind("worker_exited", |b| b["pid"] == old)
        .await;
    let gone = scrape_until(&node, "no old worker left", |s| {
        s.get("ebb_old_workers", &[]) == 0.0
    })
    .await;
    assert_eq!(gone.get("ebb_old_worker_connections", &[]), 0.0);
    assert_eq!(gone.get("ebb_connections_cut_total", &[]), 0.0);
    assert_eq!(
        gone.get("ebb_events_total", &[("kind", "worker_exited")]),
        1.0,
        "{gone:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_going_away_shows_in_metrics_and_healthz() {
    let mut node = NodeFixture::builder().start().await;
    let port = node.metrics_port();
    let t = node.timeout();
    scrape_until(&node, "NATS connected", |s| {
        s.get("ebb_nats_connected", &[]) == 1.0
    })
    .await;
    let health = get(port, "/healthz", t).await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, "ok\n"),
        "{health:?}"
    );
    let missing = get(port, "/nope", t).await;
    assert_eq!(missing.status, 404, "{missing:?}");

    node.nats()
        .expect("the fixture's nats-server")
        .kill()
        .expect("kill nats-server");
    let away = scrape_until(&node, "NATS disconnected", |s| {
        s.get("ebb_nats_connected", &[]) == 0.0
    })
    .await;
    // The node itself still answers: only the bus is gone.
    assert_eq!(away.get("ebb_node_up", &[]), 1.0);
    // The control socket still commands the node.
    let health = get(port, "/healthz", t).await;
    assert_eq!(health.status, 200, "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_or_a_control_socket_healthz_answers_503() {
    let mut node = NodeFixture::builder()
        .agent(|c| {
            c.set_str("control", "socket", "");
        })
        .start()
        .await;
    let port = node.metrics_port();
    let t = node.timeout();
    node.nats()
        .expect("the fixture's nats-server")
        .kill()
        .expect("kill nats-server");
    scrape_until(&node, "NATS disconnected", |s| {
        s.get("ebb_nats_connected", &[]) == 0.0
    })
    .await;
    // Nothing can command the node: NATS is away and there is no control socket.
    let health = get(port, "/healthz", t).await;
    assert_eq!(health.status, 503, "{health:?}");
    assert!(health.body.contains("NATS"), "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_port_in_use_is_logged_and_the_node_serves_on() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a port");
    let addr = taken.local_addr().expect("its address").to_string();
    let listen = addr.clone();
    let mut node = NodeFixture::builder()
        .agent(move |c| {
            c.set_str("metrics", "listen", &listen);
        })
        .start()
        .await;
    let line = node.agent.wait_for_log(node.timeout(), |l| {
        log_message(l).is_some_and(|m| m.contains("metrics.listen") && m.contains("cannot listen"))
    });
    let message = log_message(&line).unwrap_or_default().to_owned();
    assert!(message.contains(&addr), "{message}");
    assert!(message.contains("free the port"), "{message}");
    assert_eq!(line["level"], "ERROR", "{line}");
    node.ok("reload", json!({})).await;
    node.assert_serves().await;
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_checks_are_timed_and_their_errors_counted_per_plugin() {
    let node = NodeFixture::builder()
        .plugins_toml(|dir| {
            let idle = plugin_toml(
                "quick",
                &cdylib("ebb_plugin_exec"),
                "2s",
                "{ command = [\"sh\", \"-c\", \"exit 0\"], interval = \"0s\" }",
            );
            // Not loadable: every check fails; `on_error = "idle"` lets the drain finish anyway.
            let gone = plugin_toml("gone", &dir.join("missing.so"), "2s", "{}");
            format!("{idle}\n{gone}on_error = \"idle\"\n")
        })
        .start()
        .await;
    node.ok("drain", json!({"drain_id": "p1", "min_period_ms": 0}))
        .await;
    node.events.drained("p1").await;
    let s = scrape_until(&node, "both plugins checked", |s| {
        s.get(
            "ebb_plugin_check_duration_seconds_count",
            &[("plugin", "quick")],
        ) >= 1.0
            && s.get("ebb_plugin_check_errors_total", &[("plugin", "gone")]) >= 1.0
    })
    .await;
    assert_eq!(
        s.get("ebb_plugin_check_errors_total", &[("plugin", "quick")]),
        0.0,
        "{s:#?}"
    );
    assert!(
        s.get(
            "ebb_plugin_check_duration_seconds_count",
            &[("plugin", "gone")]
        ) >= 1.0
    );
    assert_eq!(
        s.value("ebb_plugin_healthy", &[("plugin", "quick")]),
        Some(1.0)
    );
    assert_eq!(
        s.value("ebb_plugin_healthy", &[("plugin", "gone")]),
        Some(0.0)
    );
}
