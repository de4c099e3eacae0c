//! What `/metrics` costs (docs/BENCHMARKS.md, "Metrics").
//!
//! - encode: [`Metrics::encode`] of a registry with realistic content (1000 reloads, 50 drains, 5
//!   plugins with 100 checks each, a status with 4 old workers), timed over many encodes;
//! - end to end: a real `ebb agent` (release build) with its haproxy and nats-server: `GET /metrics`
//!   latency as a scraper sees it (status probe included), and the agent's RSS (VmRSS) idle with
//!   metrics on, idle with `metrics.listen = ""`, and after 1000 reloads over NATS with scrapes.
//!
//! `cargo bench -p ebb-agent --bench metrics_scrape` (`EBB_BENCH_RELOADS=N` changes the reload
//! count, 1000 by default; `EBB_BENCH_SCRAPES=N` the GET count, 1000; `EBB_TEST_NATS_SERVER` /
//! `EBB_TEST_HAPROXY` pick the binaries). Prints a Markdown table.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use ebb_agent::metrics::Metrics;
use ebb_agent::plugins::{CheckObserver, CheckOutcome};
use ebb_sdk::event::{Event, EventBody, ExitStatus, WorkerRole};
use serde_json::json;
use support::*;

const SETTLE: Duration = Duration::from_secs(3);

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nearest-rank percentile of sorted `samples`.
fn p(samples: &[f64], pct: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let rank = ((pct / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn event(body: EventBody) -> Event {
    Event {
        v: ebb_sdk::PROTOCOL_VERSION,
        node: "bench".into(),
        boot_id: "b".into(),
        seq: 1,
        time: "2024-05-01T12:00:00.000Z".into(),
        requester: None,
        reason: None,
        body,
    }
}

fn realistic() -> Metrics {
    let m = Metrics::new();
    for i in 0..1000u64 {
        m.record(&event(EventBody::Reloaded {
            reload_id: format!("r{i}"),
            pid: 2,
            old_pids: vec![1],
            duration_ms: 40 + i % 300,
            config_sha256: "x".into(),
            draining: false,
            pushed: false,
        }));
        m.record(&event(EventBody::WorkerExited {
            pid: 1,
            role: WorkerRole::Old,
            status: ExitStatus::Code(0),
            hard_stopped: i % 100 == 0,
            connections_cut: u64::from(i % 100 == 0),
        }));
    }
    for i in 0..50u64 {
        m.record(&event(EventBody::Drained {
            drain_id: format!("d{i}"),
            started_at: "a".into(),
            drained_at: "b".into(),
            duration_ms: 30_000 + i * 1000,
            forced: i % 10 == 0,
            connections_cut: 0,
        }));
    }
    for plugin in ["alb", "exec", "consul", "lb2", "custom"] {
        for i in 0..100u64 {
            let outcome = if i % 20 == 0 {
                CheckOutcome::Failed
            } else {
                CheckOutcome::Idle
            };
            m.check_done(plugin, Duration::from_micros(200 + i * 37), outcome);
        }
    }
    m.observe_nats(true);
    m.observe_outbox(3);
    m
}

fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn main() {
    let m = realistic();
    let text = m.encode();
    let rounds = 10_000;
    for _ in 0..100 {
        std::hint::black_box(m.encode());
    }
    let mut encode_us = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        std::hint::black_box(m.encode());
        encode_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    encode_us.sort_by(f64::total_cmp);
    println!("| measure | p50 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| encode ({} bytes, {} lines), µs | {:.1} | {:.1} | {:.1} |",
        text.len(),
        text.lines().count(),
        p(&encode_us, 50.0),
        p(&encode_us, 99.0),
        p(&encode_us, 100.0)
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(end_to_end());
}

async fn end_to_end() {
    let on = NodeFixture::builder().node_id("bench-on").start().await;
    let off = NodeFixture::builder()
        .node_id("bench-off")
        .agent(|c| {
            c.set_str("metrics", "listen", "");
        })
        .start()
        .await;
    tokio::time::sleep(SETTLE).await;
    let idle_on = rss_kib(on.agent.pid());
    let idle_off = rss_kib(off.agent.pid());

    let port = on.metrics_port();
    let scrapes = count("EBB_BENCH_SCRAPES", 1000);
    let mut get_ms = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let started = Instant::now();
        let response = http_request(port, "/metrics", true, on.timeout())
            .await
            .expect("GET /metrics");
        get_ms.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(response.status, 200);
    }
    get_ms.sort_by(f64::total_cmp);
    println!(
        "| GET /metrics end to end (new connection each), ms | {:.2} | {:.2} | {:.2} |",
        p(&get_ms, 50.0),
        p(&get_ms, 99.0),
        p(&get_ms, 100.0)
    );
    let after_scrapes = rss_kib(on.agent.pid());

    // The same reloads on both agents, side by side: what the agent grows by on its own is
    // not charged to metrics.
    let reloads = count("EBB_BENCH_RELOADS", 1000);
    let with_metrics = async {
        for i in 0..reloads {
            on.ok("reload", json!({})).await;
            if i % 10 == 0 {
                http_request(port, "/metrics", true, on.timeout())
                    .await
                    .expect("GET /metrics");
            }
        }
    };
    let without = async {
        for _ in 0..reloads {
            off.ok("reload", json!({})).await;
        }
    };
    tokio::join!(with_metrics, without);
    let scrape = on.scrape().await;
    let counted = scrape.get("ebb_reloads_total", &[("result", "ok")]);
    tokio::time::sleep(SETTLE).await;
    let after_reloads = rss_kib(on.agent.pid());
    let after_reloads_off = rss_kib(off.agent.pid());
    println!();
    println!("| agent RSS (VmRSS) | value |");
    println!("|---|---|");
    println!("| idle, `metrics.listen = \"\"` | {} |", mib(idle_off));
    println!("| idle, metrics on (no scrape yet) | {} |", mib(idle_on));
    println!("| after {scrapes} scrapes | {} |", mib(after_scrapes));
    println!(
        "| after {reloads} reloads, `metrics.listen = \"\"` | {} |",
        mib(after_reloads_off)
    );
    println!(
        "| after {reloads} reloads ({counted} counted) and {} more scrapes, metrics on | {} |",
        reloads.div_ceil(10),
        mib(after_reloads)
    );
}
