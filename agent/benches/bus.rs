//! Bus latency, end to end: a real nats-server, a real `ebb agent` (release build) with its own
//! haproxy, and a plain async-nats client on the same machine.
//!
//! - `status` round trip: request → reply, sequential.
//! - event latency: a `reload` (or `drain`) command, its reply, and the event it causes
//!   (`reloaded`, `drained`): reply → event, command → event, and the event's age on receipt
//!   (receive wall clock − the event's `time` field, which has millisecond resolution).
//!
//! - agent memory: its VmRSS before and after 100 000 `status` requests with distinct 128-byte
//!   request ids, which the agent remembers for retries within a bounded budget (target: under
//!   20 MB after).
//!
//! Both with JetStream events (a publish that waits for the stream's ack, the default) and with core
//! events (`events_stream = ""`). Prints a Markdown table.
//!
//! `cargo bench -p ebb-agent --bench bus` (`EBB_TEST_NATS_SERVER` picks the nats-server;
//! `EBB_BENCH_STATUS=N`, `EBB_BENCH_EVENTS=N`, `EBB_BENCH_RSS_REQUESTS=N` change the sample counts).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{Client, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use support::*;

const EBB: &str = env!("CARGO_BIN_EXE_ebb");
const T: Duration = Duration::from_secs(30);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Row {
    name: String,
    samples: Vec<f64>,
}

async fn run() {
    let status_n = count("EBB_BENCH_STATUS", 1000);
    let events_n = count("EBB_BENCH_EVENTS", 100);
    let rss_n = count("EBB_BENCH_RSS_REQUESTS", 100_000);
    let dir = TestDir::new();
    let nats = NatsServer::start(&dir.join("nats")).expect("start nats-server");
    let backend = Backend::start().expect("backend");
    let nc = support::nats_client(&nats.url(), T).await;
    let version = std::process::Command::new(NatsServer::bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let mut rows = Vec::new();
    for (id, jetstream) in [("bench-js", true), ("bench-core", false)] {
        let node_dir = dir.join(id);
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let haproxy = HaproxyConfig::new(&node_dir, backend.addr());
        haproxy.write().expect("haproxy.cfg");
        let mut cfg = AgentConfig::new(&node_dir, &nats.url(), &haproxy);
        cfg.node_id(id).log_level("warn");
        if !jetstream {
            cfg.set_str("nats", "events_stream", "");
        }
        let agent = Agent::start(EBB, &cfg.write().expect("agent.toml")).expect("start agent");
        wait_ready(&nc, id).await;
        let label = if jetstream { "JetStream" } else { "core" };

        if jetstream {
            rows.push(Row {
                name: "status round trip".into(),
                samples: status_rtt(&nc, id, status_n).await,
            });
            let (before, after) = rss_over_distinct_ids(&nc, id, agent.pid(), rss_n).await;
            rows.push(Row {
                name: "agent VmRSS before the distinct-id requests, **MB**".into(),
                samples: vec![before],
            });
            rows.push(Row {
                name: format!(
                    "agent VmRSS after {rss_n} status requests with distinct 128-byte ids, **MB** (target < 20)"
                ),
                samples: vec![after],
            });
        }
        let (reply_to_event, command_to_event, age) = reloads(&nc, id, events_n).await;
        rows.push(Row {
            name: format!("reload reply → `reloaded` ({label})"),
            samples: reply_to_event,
        });
        rows.push(Row {
            name: format!("reload command → `reloaded` ({label})"),
            samples: command_to_event,
        });
        rows.push(Row {
            name: format!("`reloaded` age on receipt, ms resolution ({label})"),
            samples: age,
        });
        let (reply_to_drained, age) = drains(&nc, id, events_n).await;
        rows.push(Row {
            name: format!("drain reply → `drained`, idle node ({label})"),
            samples: reply_to_drained,
        });
        rows.push(Row {
            name: format!("`drained` age on receipt, ms resolution ({label})"),
            samples: age,
        });
        drop(agent);
    }

    println!();
    println!(
        "nats-server {version}, haproxy {}, {} CPUs",
        haproxy_version(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| measurement | n | p50 ms | p90 ms | p99 ms | max ms |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for row in &rows {
        let mut s = row.samples.clone();
        s.sort_by(f64::total_cmp);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            row.name,
            s.len(),
            pct(&s, 50.0),
            pct(&s, 90.0),
            pct(&s, 99.0),
            s.last().copied().unwrap_or(f64::NAN)
        );
    }
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn haproxy_version() -> String {
    std::process::Command::new(haproxy_bin())
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(str::to_string)
        })
        .unwrap_or_default()
}

async fn request(nc: &Client, subject: String, body: Value) -> Value {
    let msg = nc
        .request(subject, body.to_string().into())
        .await
        .expect("request");
    serde_json::from_slice(&msg.payload).expect("JSON reply")
}

async fn wait_ready(nc: &Client, node: &str) {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(Ok(msg)) = tokio::time::timeout(
            Duration::from_secs(2),
            nc.request(format!("ebb.node.{node}.status"), Bytes::new()),
        )
        .await
        {
            let v: Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            if v["result"]["state"] == "serving" {
                return;
            }
        }
        assert!(Instant::now() < deadline, "agent {node} not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_rtt(nc: &Client, node: &str, n: usize) -> Vec<f64> {
    let subject = format!("ebb.node.{node}.status");
    for _ in 0..n / 10 {
        request(nc, subject.clone(), json!({})).await;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let reply = request(nc, subject.clone(), json!({})).await;
        out.push(ms(t0.elapsed()));
        assert_eq!(reply["ok"], true, "{reply}");
    }
    out
}

/// The agent's resident memory in MB (VmRSS of /proc/PID/status).
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kb / 1024.0
}

/// VmRSS before and after `n` status requests, each with its own 128-byte request id, sent a
/// few dozen at a time (well under the agent's bound on requests in flight).
async fn rss_over_distinct_ids(nc: &Client, node: &str, pid: u32, n: usize) -> (f64, f64) {
    let before = rss_mb(pid);
    let subject = format!("ebb.node.{node}.status");
    futures::stream::iter(0..n)
        .map(|i| {
            let body = json!({"request_id": format!("{i:0>128}")});
            request(nc, subject.clone(), body)
        })
        .buffer_unordered(32)
        .for_each(|reply| async move {
            assert_eq!(reply["ok"], true, "{reply}");
        })
        .await;
    (before, rss_mb(pid))
}

/// The first event on `sub` that satisfies `pred`, with its receive times.
async fn next_event(sub: &mut Subscriber, pred: impl Fn(&Value) -> bool) -> (Value, Instant, f64) {
    loop {
        let msg = tokio::time::timeout(T, sub.next())
            .await
            .expect("an event within 30 s")
            .expect("subscription open");
        let at = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let event: Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
        if pred(&event) {
            return (event, at, wall);
        }
    }
}

/// Milliseconds since the Unix epoch of the agent's `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn event_time_ms(event: &Value) -> f64 {
    let s = event["time"].as_str().unwrap_or_default();
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<i64>().ok());
    let (Some(y), Some(m), Some(d), Some(h), Some(mi), Some(sec), Some(milli)) = (
        num(0..4),
        num(5..7),
        num(8..10),
        num(11..13),
        num(14..16),
        num(17..19),
        num(20..23),
    ) else {
        return f64::NAN;
    };
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    ((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000 + milli) as f64
}

async fn reloads(nc: &Client, node: &str, n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut sub = nc
        .subscribe(format!("ebb.event.{node}.>"))
        .await
        .expect("subscribe");
    nc.flush().await.expect("flush");
    let (mut reply_to_event, mut command_to_event, mut age) = (vec![], vec![], vec![]);
    for i in 0..n + 5 {
        let t0 = Instant::now();
        let reply = request(nc, format!("ebb.node.{node}.reload"), json!({})).await;
        let replied = Instant::now();
        assert_eq!(reply["ok"], true, "{reply}");
        let reload_id = reply["result"]["reload_id"].clone();
        let (event, at, wall) = next_event(&mut sub, |e| {
            e["kind"] == "reloaded" && e["reload_id"] == reload_id
        })
        .await;
        // The displaced worker exits before the next round, so rounds do not overlap.
        let old = reply["result"]["old_pids"][0].clone();
        next_event(&mut sub, |e| {
            e["kind"] == "worker_exited" && e["pid"] == old
        })
        .await;
        if i < 5 {
            continue; // warm-up
        }
        reply_to_event.push(signed_ms(replied, at));
        command_to_event.push(ms(at - t0));
        age.push(wall - event_time_ms(&event));
    }
    (reply_to_event, command_to_event, age)
}

async fn drains(nc: &Client, node: &str, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut sub = nc
        .subscribe(format!("ebb.event.{node}.>"))
        .await
        .expect("subscribe");
    nc.flush().await.expect("flush");
    let (mut reply_to_event, mut age) = (vec![], vec![]);
    for i in 0..n + 5 {
        let drain_id = format!("bench-{i}");
        let reply = request(
            nc,
            format!("ebb.node.{node}.drain"),
            json!({"drain_id": drain_id, "min_period_ms": 0}),
        )
        .await;
        let replied = Instant::now();
        assert_eq!(reply["ok"], true, "{reply}");
        let (event, at, wall) = next_event(&mut sub, |e| {
            e["kind"] == "drained" && e["drain_id"] == drain_id
        })
        .await;
        let reply = request(nc, format!("ebb.node.{node}.undrain"), json!({})).await;
        assert_eq!(reply["ok"], true, "{reply}");
        next_event(&mut sub, |e| {
            e["kind"] == "undrained" && e["drain_id"] == drain_id
        })
        .await;
        if i < 5 {
            continue;
        }
        reply_to_event.push(signed_ms(replied, at));
        age.push(wall - event_time_ms(&event));
    }
    (reply_to_event, age)
}

/// `b - a` in ms, negative when the event arrived before the reply.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if b >= a {
        ms(b - a)
    } else {
        -ms(a - b)
    }
}
