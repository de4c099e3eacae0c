//! Drain latency: the time from the last blocker clearing to the `drained` event received by a
//! NATS subscriber (the target: p99 ≤ 50 ms with `poll_interval = "10ms"`). Prints a table.
//!
//! `cargo bench -p ebb-agent --bench drain` (`EBB_BENCH_DRAINS=N` sets the drains per variant,
//! default 60).
//!
//! Each round holds a drain with one slow request (`/slow?ms=…`, `Connection: close`) and nothing
//! else, with `min_period_ms = 0`:
//! - **current worker**: the request runs on the current worker; the last blocker clears when its
//!   response is complete (HAProxy closes the connection with it). Measured: response complete →
//!   `drained` received.
//! - **old worker**: the request runs on a worker that a reload displaced before the drain; the
//!   last blocker clears when that worker exits, after its response. Measured: response complete →
//!   `drained` received, and `worker_exited` received → `drained` received (the agent's share).
//!
//! Then the node is undrained and the next round starts.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use support::*;
use tokio::sync::mpsc;

const EBB: &str = env!("CARGO_BIN_EXE_ebb");
const NODE: &str = "bench-1";
const T: Duration = Duration::from_secs(30);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Events as received, stamped on receipt.
struct Events {
    rx: mpsc::UnboundedReceiver<(Instant, Value)>,
}

impl Events {
    async fn subscribe(nc: &Client) -> Events {
        let mut sub = nc
            .subscribe(format!("ebb.event.{NODE}.>"))
            .await
            .expect("subscribe");
        nc.flush().await.expect("flush");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let at = Instant::now();
                if let Ok(body) = serde_json::from_slice::<Value>(&msg.payload) {
                    if tx.send((at, body)).is_err() {
                        return;
                    }
                }
            }
        });
        Events { rx }
    }

    /// The next event of `kind` that satisfies `pred` (earlier ones are dropped).
    async fn next(&mut self, kind: &str, pred: impl Fn(&Value) -> bool) -> (Instant, Value) {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((at, body))) if body["kind"] == kind && pred(&body) => return (at, body),
                Ok(Some(_)) => {}
                _ => panic!("no {kind} event within {T:?}"),
            }
        }
    }
}

async fn command(nc: &Client, verb: &str, body: Value) -> Value {
    let msg = tokio::time::timeout(
        T,
        nc.request(
            format!("ebb.node.{NODE}.{verb}"),
            Bytes::from(body.to_string()),
        ),
    )
    .await
    .expect("reply in time")
    .expect("request");
    let reply: Value = serde_json::from_slice(&msg.payload).expect("JSON reply");
    assert_eq!(reply["ok"], true, "{verb} failed: {reply}");
    reply["result"].clone()
}

async fn curr_conns(sock: std::path::PathBuf) -> Option<u64> {
    tokio::task::spawn_blocking(move || show_info(&sock))
        .await
        .ok()?
        .ok()?
        .get("CurrConns")?
        .parse()
        .ok()
}

struct Round {
    /// Response complete → drained received.
    latency: Duration,
    /// worker_exited received → drained received (old-worker rounds only).
    after_exit: Option<Duration>,
    /// drained received this long before the response was complete: the bug ebb exists to
    /// prevent (or, by a few ms on a loaded machine, the client task being scheduled late).
    early: Option<Duration>,
}

async fn round(
    nc: &Client,
    events: &mut Events,
    haproxy: &HaproxyConfig,
    id: &str,
    old_worker: bool,
) -> Round {
    let port = haproxy.frontend_port();
    let slow_ms = if old_worker { 300 } else { 150 };
    let slow = tokio::spawn(async move {
        let r = http_request(port, &format!("/slow?ms={slow_ms}"), true, T).await;
        (r, Instant::now())
    });
    let sock = haproxy.admin_socket();
    wait_for_async(T, "the slow request in flight", || {
        let sock = sock.clone();
        async move { curr_conns(sock).await.filter(|&c| c >= 1) }
    })
    .await;
    let mut old_pid = None;
    if old_worker {
        let r = command(nc, "reload", json!({})).await;
        old_pid = r["old_pids"][0].as_u64();
    }
    command(nc, "drain", json!({"drain_id": id, "min_period_ms": 0})).await;
    let (response, cleared) = slow.await.expect("join");
    let response = response.expect("the slow request completes");
    assert_eq!(response.status, 200, "{response:?}");
    let exited = match old_pid {
        Some(pid) => Some(events.next("worker_exited", |b| b["pid"] == pid).await.0),
        None => None,
    };
    let (drained, _) = events.next("drained", |b| b["drain_id"] == id).await;
    command(nc, "undrain", json!({"drain_id": id})).await;
    events.next("undrained", |b| b["drain_id"] == id).await;
    Round {
        latency: drained.saturating_duration_since(cleared),
        after_exit: exited.map(|e| drained.saturating_duration_since(e)),
        early: (drained < cleared).then(|| cleared - drained),
    }
}

fn main() {
    let drains: usize = std::env::var("EBB_BENCH_DRAINS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = TestDir::new();
    let nats = NatsServer::start(&dir.join("nats")).expect("nats-server");
    let backend = Backend::start().expect("backend");
    let haproxy = HaproxyConfig::new(dir.path(), backend.addr());
    haproxy.write().expect("haproxy.cfg");
    let mut cfg = AgentConfig::new(dir.path(), &nats.url(), &haproxy);
    cfg.node_id(NODE)
        .set_str("drain", "poll_interval", "10ms")
        .set_str("drain", "min_period", "0s")
        .set_str("log", "level", "warn");
    let _agent = Agent::start(EBB, &cfg.write().expect("agent.toml")).expect("agent");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let nc = async_nats::connect(nats.url()).await.expect("connect");
        let mut events = Events::subscribe(&nc).await;
        wait_until_async(T, "the agent serves", || {
            let nc = nc.clone();
            async move {
                let msg = tokio::time::timeout(
                    Duration::from_secs(2),
                    nc.request(format!("ebb.node.{NODE}.status"), Bytes::from_static(b"{}")),
                )
                .await;
                matches!(msg, Ok(Ok(m)) if serde_json::from_slice::<Value>(&m.payload)
                    .is_ok_and(|v| v["result"]["state"] == "serving"))
            }
        })
        .await;

        println!("| variant | drains | p50 | p90 | p99 | max | drained before the response |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (name, old_worker) in [("current worker", false), ("old worker", true)] {
            let mut latencies = Vec::new();
            let mut after_exit = Vec::new();
            let mut early = Vec::new();
            for i in 0..drains {
                let id = format!("{}-{i}", if old_worker { "old" } else { "cur" });
                let r = round(&nc, &mut events, &haproxy, &id, old_worker).await;
                latencies.push(r.latency);
                after_exit.extend(r.after_exit);
                early.extend(r.early);
            }
            latencies.sort();
            println!(
                "| {name}: response complete → drained | {} | {} | {} | {} | {} | {} |",
                latencies.len(),
                ms(percentile(&latencies, 0.5)),
                ms(percentile(&latencies, 0.9)),
                ms(percentile(&latencies, 0.99)),
                ms(*latencies.last().expect("rounds")),
                early.len(),
            );
            if !early.is_empty() {
                let by: Vec<String> = early.iter().map(|d| ms(*d)).collect();
                eprintln!("{name}: drained received before the response by {by:?}");
            }
            if !after_exit.is_empty() {
                after_exit.sort();
                println!(
                    "| {name}: worker_exited → drained | {} | {} | {} | {} | {} | |",
                    after_exit.len(),
                    ms(percentile(&after_exit, 0.5)),
                    ms(percentile(&after_exit, 0.9)),
                    ms(percentile(&after_exit, 0.99)),
                    ms(*after_exit.last().expect("rounds")),
                );
            }
        }
    });
}
