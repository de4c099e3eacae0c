use ebb_sdk::event::{ExitStatus, WorkerRole};
use ebb_sdk::status::{HaproxyStatus, OldWorker, PluginStatus};

use super::*;

fn event(body: EventBody) -> Event {
    Event {
        v: ebb_sdk::PROTOCOL_VERSION,
        node: "n1".into(),
        boot_id: "b1".into(),
        seq: 1,
        time: "2024-05-01T12:00:00.000Z".into(),
        requester: None,
        reason: None,
        body,
    }
}

fn status(state: NodeState, old: &[u64], restarts: u32) -> StatusResult {
    StatusResult {
        state,
        node: "n1".into(),
        groups: Vec::new(),
        boot_id: "b1".into(),
        agent_version: "0.1.0".into(),
        haproxy: HaproxyStatus {
            pid: Some(10),
            config: "/etc/haproxy/haproxy.cfg".into(),
            config_sha256: None,
            mode: "direct".into(),
            master_pid: None,
            started_at: None,
            restarts,
        },
        old_workers: old
            .iter()
            .enumerate()
            .map(|(i, &connections)| OldWorker {
                pid: 100 + i as u32,
                age_ms: 5,
                connections,
            })
            .collect(),
        drain: None,
        plugins: vec![PluginStatus {
            name: "alb".into(),
            version: "1".into(),
            healthy: false,
        }],
        last_reload: None,
        warnings: Vec::new(),
        timeouts: None,
        outbox_depth: Some(7),
    }
}

/// The value of the sample `name` (labels included, as written) in `text`.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn exited(cut: u64) -> Event {
    event(EventBody::WorkerExited {
        pid: 1,
        role: WorkerRole::Old,
        status: ExitStatus::Code(0),
        hard_stopped: cut > 0,
        connections_cut: cut,
    })
}

#[test]
fn reloads_count_by_result_and_time_the_successful_ones() {
    let m = Metrics::new();
    m.record(&event(EventBody::Reloaded {
        reload_id: "r1".into(),
        pid: 2,
        old_pids: vec![1],
        duration_ms: 300,
        config_sha256: "x".into(),
        draining: false,
        pushed: false,
    }));
    m.record(&event(EventBody::ReloadFailed {
        reload_id: "r2".into(),
        error: "bad".into(),
    }));
    let text = m.encode();
    assert_eq!(value(&text, "ebb_reloads_total{result=\"ok\"}"), Some(1.0));
    assert_eq!(
        value(&text, "ebb_reloads_total{result=\"failed\"}"),
        Some(1.0)
    );
    assert_eq!(value(&text, "ebb_reload_duration_seconds_count"), Some(1.0));
    assert_eq!(value(&text, "ebb_reload_duration_seconds_sum"), Some(0.3));
    assert_eq!(
        value(&text, "ebb_reload_duration_seconds_bucket{le=\"0.25\"}"),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "ebb_reload_duration_seconds_bucket{le=\"0.5\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "ebb_events_total{kind=\"reloaded\"}"),
        Some(1.0)
    );
}

#[test]
fn a_drain_counts_once_per_id_until_undrained() {
    let m = Metrics::new();
    let drained = |forced| {
        event(EventBody::Drained {
            drain_id: "d1".into(),
            started_at: "a".into(),
            drained_at: "b".into(),
            duration_ms: 12_000,
            forced,
            connections_cut: 0,
        })
    };
    m.record(&drained(false));
    m.record(&drained(false));
    let text = m.encode();
    assert_eq!(
        value(&text, "ebb_drains_total{forced=\"false\"}"),
        Some(1.0)
    );
    assert_eq!(value(&text, "ebb_drains_total{forced=\"true\"}"), Some(0.0));
    assert_eq!(value(&text, "ebb_drain_duration_seconds_count"), Some(1.0));
    assert_eq!(value(&text, "ebb_drain_duration_seconds_sum"), Some(12.0));
    m.record(&event(EventBody::Undrained {
        drain_id: "d1".into(),
    }));
    m.record(&drained(true));
    let text = m.encode();
    assert_eq!(value(&text, "ebb_drains_total{forced=\"true\"}"), Some(1.0));
    assert_eq!(value(&text, "ebb_drain_duration_seconds_count"), Some(2.0));
}

#[test]
fn connections_cut_by_a_stop_are_not_counted_twice() {
    let m = Metrics::new();
    m.record(&exited(3));
    m.record(&exited(0));
    assert_eq!(value(&m.encode(), "ebb_connections_cut_total"), Some(3.0));
    // The stop's count includes the 3 its workers' exits reported, plus 2 it killed.
    m.record(&event(EventBody::Stopped { connections_cut: 5 }));
    assert_eq!(value(&m.encode(), "ebb_connections_cut_total"), Some(5.0));
    m.record(&event(EventBody::Stopped { connections_cut: 1 }));
    assert_eq!(value(&m.encode(), "ebb_connections_cut_total"), Some(6.0));
}

#[test]
fn gauges_follow_the_status_and_keep_their_values_when_the_node_is_silent() {
    let m = Metrics::new();
    m.observe(Some(&status(NodeState::Draining, &[2, 3], 1)));
    m.observe_nats(true);
    let text = m.encode();
    assert_eq!(value(&text, "ebb_node_up"), Some(1.0));
    assert_eq!(
        value(&text, "ebb_node_state{state=\"draining\"}"),
        Some(1.0)
    );
    assert_eq!(value(&text, "ebb_node_state{state=\"serving\"}"), Some(0.0));
    assert_eq!(value(&text, "ebb_draining"), Some(1.0));
    assert_eq!(value(&text, "ebb_old_workers"), Some(2.0));
    assert_eq!(value(&text, "ebb_old_worker_connections"), Some(5.0));
    assert_eq!(value(&text, "ebb_haproxy_restarts_total"), Some(1.0));
    assert_eq!(value(&text, "ebb_outbox_depth"), Some(7.0));
    assert_eq!(value(&text, "ebb_nats_connected"), Some(1.0));
    assert_eq!(
        value(&text, "ebb_plugin_healthy{plugin=\"alb\"}"),
        Some(0.0)
    );

    m.observe(Some(&status(NodeState::Serving, &[], 3)));
    m.observe(None);
    m.observe_outbox(9);
    let text = m.encode();
    assert_eq!(value(&text, "ebb_node_up"), Some(0.0));
    assert_eq!(value(&text, "ebb_node_state{state=\"serving\"}"), Some(1.0));
    assert_eq!(value(&text, "ebb_old_workers"), Some(0.0));
    assert_eq!(value(&text, "ebb_haproxy_restarts_total"), Some(3.0));
    assert_eq!(value(&text, "ebb_outbox_depth"), Some(9.0));
}

#[test]
fn plugin_checks_are_timed_and_failures_counted_per_plugin() {
    let m = Metrics::new();
    m.check_done("alb", Duration::from_millis(20), CheckOutcome::Busy);
    m.check_done("alb", Duration::from_secs(2), CheckOutcome::Failed);
    m.check_done("exec", Duration::from_millis(1), CheckOutcome::Idle);
    let text = m.encode();
    assert_eq!(
        value(
            &text,
            "ebb_plugin_check_duration_seconds_count{plugin=\"alb\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&text, "ebb_plugin_check_errors_total{plugin=\"alb\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "ebb_plugin_check_errors_total{plugin=\"exec\"}"),
        None
    );
}

/// A registry with a sample in every family.
fn populated() -> Metrics {
    let m = Metrics::new();
    m.record(&exited(1));
    m.observe(Some(&status(NodeState::Serving, &[1], 0)));
    m.check_done("alb", Duration::from_millis(3), CheckOutcome::Failed);
    m
}

/// `(family, type)` of every `# TYPE` line.
fn families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

#[test]
fn every_family_is_prefixed_described_listed_and_the_text_ends_with_eof() {
    let text = populated().encode();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains(&format!(
        "ebb_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    let found: Vec<String> = families(&text).into_iter().map(|(n, _)| n).collect();
    for name in &found {
        assert!(name.starts_with("ebb_"), "{name}");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
    assert_eq!(found, FAMILIES, "FAMILIES lists what a scrape shows");
    let names = sample_names(&text);
    assert!(names.contains(&"ebb_reload_duration_seconds_bucket".to_string()));
    assert!(names.contains(&"ebb_build_info".to_string()));
}

/// Every `expr` of the Grafana dashboard in examples/ queries only series the agent exports.
#[test]
fn the_grafana_dashboard_is_json_and_queries_only_exported_series() {
    let text = include_str!("../../../examples/grafana/ebb.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(text).expect("examples/grafana/ebb.json is valid JSON");
    let exported = sample_names(&populated().encode());
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        let names = series_in(expr);
        assert!(!names.is_empty(), "no ebb_ series in {expr}");
        for name in names {
            assert!(
                exported.contains(&name),
                "{expr} queries {name}, which the agent does not export"
            );
        }
    }
    assert!(text.contains("${DS_PROMETHEUS}"));
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `ebb_…` identifiers of a PromQL expression.
fn series_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("ebb_") {
        let start = i + at;
        let fresh =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if fresh {
            out.push(expr[start..end].to_string());
        }
        i = end;
    }
    out
}
