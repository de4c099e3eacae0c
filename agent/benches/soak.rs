//! Soak: one node (a real agent, its haproxy, the demo backend, a nats-server) under continuous
//! HTTP load from real TCP clients, some with `Connection: close` and some keep-alive, every
//! response checked (status 200 and body `ok\n`), while 1000 reloads go over NATS one after
//! another, each waiting for its reply. Prints markdown tables: requests served and failed,
//! reload latency, the agent's RSS along the way, and the old workers left at the end. Fails
//! (after printing) if any request or reload failed.
//!
//! `cargo bench -p ebb-agent --bench soak` (`EBB_BENCH_SOAK_RELOADS=N` changes the count).
//!
//! haproxy.cfg has `option idle-close-on-response`, as the example config does: without it, an old
//! worker closes its idle keep-alive connections at soft-stop, and a client sending its next
//! request at that moment loses it (the keep-alive close race of docs/BENCHMARKS.md, "Reloads
//! under load"), which no agent can prevent.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// Timeout of the node's commands and waits.
const T: Duration = Duration::from_secs(30);
const RELOADS: usize = 1000;
/// Load generator workers of each kind.
const CLOSE_CLIENTS: usize = 4;
const KEEP_ALIVE_CLIENTS: usize = 4;
/// The body the demo backend answers `GET /` with.
const BODY: &str = "ok\n";
/// The agent's RSS and the old workers are sampled every this many reloads.
const SAMPLE_EVERY: usize = 100;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "unreadable".to_owned(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
}

/// The agent's memory now: VmRSS, and its anonymous (heap, stacks) and file-backed (the binary's
/// and libraries' touched pages) parts, as `/proc/PID/status` gives them.
#[derive(Clone, Copy)]
struct Memory {
    rss: Option<u64>,
    anon: Option<u64>,
    file: Option<u64>,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        Memory {
            rss: rss_kib(pid),
            anon: proc_status_kib(pid, "RssAnon"),
            file: proc_status_kib(pid, "RssFile"),
        }
    }

    /// `VmRSS | RssAnon | RssFile`, as table cells.
    fn cells(&self) -> String {
        format!(
            "{} | {} | {}",
            mib(self.rss),
            mib(self.anon),
            mib(self.file)
        )
    }
}

fn old_workers(status: &Value) -> usize {
    status["old_workers"].as_array().map_or(0, Vec::len)
}

/// Requests the two generators answered so far.
fn served(loads: &[&LoadGen]) -> u64 {
    loads.iter().map(|l| l.ok_count()).sum()
}

fn main() {
    let reloads: usize = std::env::var("EBB_BENCH_SOAK_RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RELOADS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(soak(reloads));
}

async fn soak(reloads: usize) {
    let node = NodeFixture::builder()
        .timeout(T)
        .haproxy(|h| h.frontend_line("option idle-close-on-response"))
        .start()
        .await;
    let agent = node.agent.pid();
    let start_load = |mode, clients| {
        LoadGen::builder(node.port())
            .concurrency(clients)
            .mode(mode)
            .expect_body(BODY)
            // Long enough for the slowest run; stop() ends it.
            .max_duration(Duration::from_secs(3600))
            .start()
    };
    let close = start_load(LoadMode::Close, CLOSE_CLIENTS);
    let keep_alive = start_load(LoadMode::KeepAlive, KEEP_ALIVE_CLIENTS);
    let (close, keep_alive) = blocking(move || {
        close.wait_for_ok(100, T);
        keep_alive.wait_for_ok(100, T);
        (close, keep_alive)
    })
    .await;
    let memory_before = Memory::of(agent);
    let mut samples = vec![(0, memory_before, old_workers(&node.status().await))];

    let started = Instant::now();
    let served_before = served(&[&close, &keep_alive]);
    let mut latency = Vec::with_capacity(reloads);
    let mut duration_ms = Vec::with_capacity(reloads);
    let mut failed_reloads = Vec::new();
    let mut last = node.serving_pid().await.expect("a worker serves");
    for i in 1..=reloads {
        let sent = Instant::now();
        let reply = node.command("reload", json!({})).await;
        latency.push(sent.elapsed());
        let result = &reply["result"];
        if reply["ok"] != true || result["old_pids"] != json!([last]) {
            failed_reloads.push(format!("reload {i}: {reply}"));
        }
        if let Some(pid) = result["pid"].as_u64().and_then(|p| u32::try_from(p).ok()) {
            last = pid;
        }
        if let Some(d) = result["duration_ms"].as_u64() {
            duration_ms.push(Duration::from_millis(d));
        }
        if i % SAMPLE_EVERY == 0 {
            let old = old_workers(&node.status().await);
            let memory = Memory::of(agent);
            samples.push((i, memory, old));
            eprintln!(
                "{i} reloads in {:.1?}: agent VmRSS | RssAnon | RssFile {}, {old} old workers",
                started.elapsed(),
                memory.cells()
            );
        }
    }
    let elapsed = started.elapsed();
    let served_during = served(&[&close, &keep_alive]) - served_before;
    let old_at_last_reply = old_workers(&node.status().await);

    // The last worker serves the load, and the old ones exit (each has no request left once its
    // clients got their answers); what is still there after T is what the soak leaves behind.
    let target = served(&[&close, &keep_alive]) + 100;
    let (close, keep_alive) = blocking(move || {
        let loads = [&close, &keep_alive];
        let _ = try_wait_for(T, || (served(&loads) >= target).then_some(()));
        (close, keep_alive)
    })
    .await;
    let settled = Instant::now();
    let gone = try_wait_for_async(T, || async {
        (old_workers(&node.status().await) == 0).then_some(())
    })
    .await;
    let old_left = match gone {
        Some(()) => 0,
        None => old_workers(&node.status().await),
    };
    let settle_time = settled.elapsed();
    let haproxy_left = node.haproxy_pids().await;
    let memory_after = Memory::of(agent);
    let peak = proc_status_kib(agent, "VmHWM");
    let (close, keep_alive) = blocking(move || (close.stop(), keep_alive.stop())).await;

    latency.sort();
    duration_ms.sort();
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| reloads (sequential, over NATS, each waiting for its reply) | {reloads} in {:.1} s |",
        elapsed.as_secs_f64()
    );
    println!("| failed reloads | {} |", failed_reloads.len());
    println!(
        "| reload latency, send → reply: p50 / p99 / max | {} / {} / {} |",
        ms(percentile(&latency, 0.5)),
        ms(percentile(&latency, 0.99)),
        ms(*latency.last().expect("a reload")),
    );
    if !duration_ms.is_empty() {
        println!(
            "| reload `duration_ms` (the agent's own): p50 / p99 / max | {} / {} / {} |",
            ms(percentile(&duration_ms, 0.5)),
            ms(percentile(&duration_ms, 0.99)),
            ms(*duration_ms.last().expect("a duration")),
        );
    }
    for (what, clients, report) in [
        ("`Connection: close`", CLOSE_CLIENTS, &close),
        ("keep-alive", KEEP_ALIVE_CLIENTS, &keep_alive),
    ] {
        println!(
            "| {what} clients ({clients}): requests ok / failed / connections | {} / {} / {} |",
            report.ok,
            report.failed(),
            report.connections
        );
    }
    println!("| requests answered during the reloads | {served_during} |");
    println!(
        "| agent VmRSS before the first reload / after the last (old workers gone) / peak (VmHWM) \
         | {} / {} / {} |",
        mib(memory_before.rss),
        mib(memory_after.rss),
        mib(peak)
    );
    println!("| old workers at the last reply | {old_at_last_reply} |");
    println!(
        "| old workers left {:.1} s later | {old_left} (haproxy processes of the node: {}) |",
        settle_time.as_secs_f64(),
        haproxy_left.len()
    );
    println!("\n| after reload | agent VmRSS | RssAnon | RssFile | old workers |");
    println!("|---:|---:|---:|---:|---:|");
    for (i, memory, old) in &samples {
        println!("| {i} | {} | {old} |", memory.cells());
    }
    println!(
        "| end, old workers gone | {} | {old_left} |",
        memory_after.cells()
    );

    assert!(
        failed_reloads.is_empty(),
        "{} reloads failed:\n{}",
        failed_reloads.len(),
        failed_reloads.join("\n")
    );
    close.assert_no_failures();
    keep_alive.assert_no_failures();
    assert_eq!(
        old_left, 0,
        "old workers still running {T:?} after the soak"
    );
    assert_eq!(
        haproxy_left,
        vec![last],
        "haproxy processes left: {haproxy_left:?}"
    );
}
