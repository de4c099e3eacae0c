//! Drain sampling cost on a large config: HAProxy's worker CPU and the ebb agent's CPU while a drain
//! is held open, for several `drain.poll_interval`s, with the old sampling query and the new one.
//!
//! The config has 10,000 servers (100 backends of 100 servers, no health checks) besides the
//! harness's `fe` → `be`. Every measurement is utime + stime from /proc/<pid>/stat over a fixed
//! window, as a % of one core; samples/s is the worker's `CumConns` growth over the window (every
//! CLI connection counts there, and a sample is one connection).
//!
//! - **idle**: a serving node, no drain.
//! - **before**: the query every drain used to send, `show info;show stat` (every row, the 10,000
//!   server rows included), sent by this bench to the admin socket as the sampler did (one
//!   connection, answer read to EOF and parsed with the agent's own parser, then `poll_interval`
//!   of sleep), while the agent sits idle. "ebb CPU" is the bench thread that does the agent's
//!   share of it (connect, read, parse); the agent's own idle CPU is the idle row.
//! - **after**: a real `ebb agent` (release build) with that `poll_interval`, draining, the drain
//!   held by one slow request; its sampler sends the new query, which depends on the drain settings:
//!   `connections` (the default: `show info` alone), `connections` with `ignore_frontends`
//!   (frontend rows), `sessions` (backend rows).
//!
//! `cargo bench -p ebb-agent --bench drain_sampling` (`EBB_BENCH_SAMPLING_SECS=N` changes the 10 s
//! window, at most 25 s: the held request must outlast it within the config's 30 s server timeout;
//! `EBB_TEST_NATS_SERVER` / `EBB_TEST_HAPROXY` pick the binaries). Prints a Markdown table.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ebb_agent::haproxy::admin::{parse_pid, parse_stat};
use serde_json::json;
use support::*;

const EBB: &str = env!("CARGO_BIN_EXE_ebb");
const T: Duration = Duration::from_secs(60);
const BACKENDS: usize = 100;
const SERVERS_PER_BACKEND: usize = 100;
const INTERVALS_MS: [u64; 5] = [10, 25, 50, 100, 250];

/// /proc counts CPU time in USER_HZ ticks, which the kernel fixes at 100 for userspace.
const USER_HZ: f64 = 100.0;

/// utime + stime, in clock ticks, from a /proc `stat` file (fields 14 and 15).
fn cpu_ticks_at(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let rest = &stat[stat.rfind(')').expect("a comm field") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

fn cpu_ticks(pid: u32) -> u64 {
    cpu_ticks_at(&format!("/proc/{pid}/stat"))
}

fn percent(ticks: u64, elapsed: Duration) -> f64 {
    100.0 * (ticks as f64 / USER_HZ) / elapsed.as_secs_f64()
}

fn cum_conns(sock: &Path) -> u64 {
    show_info(sock)
        .expect("show info")
        .get("CumConns")
        .and_then(|v| v.parse().ok())
        .expect("CumConns in show info")
}

/// The 10,000 servers, all at the demo backend (never used: `fe` routes to `be`).
fn many_servers(addr: std::net::SocketAddr) -> String {
    let mut text = String::new();
    for b in 0..BACKENDS {
        text.push_str(&format!("backend pool{b}\n"));
        for s in 0..SERVERS_PER_BACKEND {
            text.push_str(&format!("    server s{s} {addr}\n"));
        }
        text.push('\n');
    }
    text
}

/// One measured window.
struct Window {
    haproxy: f64,
    ebb: f64,
    samples_per_sec: f64,
}

/// CPU of the worker and of `ebb` (a pid's or a thread's stat file) over `window`.
async fn measure(sock: &Path, worker: u32, ebb_stat: &str, window: Duration) -> Window {
    let (conns_before, worker_before, ebb_before) =
        (cum_conns(sock), cpu_ticks(worker), cpu_ticks_at(ebb_stat));
    let started = Instant::now();
    // The window is the measurement itself: the processes must be left alone for it.
    tokio::time::sleep(window).await;
    let (worker_ticks, ebb_ticks, elapsed) = (
        cpu_ticks(worker) - worker_before,
        cpu_ticks_at(ebb_stat) - ebb_before,
        started.elapsed(),
    );
    // Minus the `show info` that read the count before.
    let conns = cum_conns(sock).saturating_sub(conns_before + 1);
    Window {
        haproxy: percent(worker_ticks, elapsed),
        ebb: percent(ebb_ticks, elapsed),
        samples_per_sec: conns as f64 / elapsed.as_secs_f64(),
    }
}

fn node(tweak: impl FnOnce(&mut AgentConfig) + 'static) -> NodeFixtureBuilder<'static> {
    NodeFixture::builder()
        .bin(EBB)
        .timeout(T)
        .haproxy(|h| {
            let servers = many_servers(h.backend_addr());
            h.section(&servers)
        })
        .agent(tweak)
}

/// One exchange of the old query, read and parsed as the sampler did; the bytes read.
fn old_sample(sock: &Path) -> usize {
    let mut stream = UnixStream::connect(sock).expect("connect to the admin socket");
    stream
        .write_all(b"show info;show stat\n")
        .expect("send the old query");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    let (info, stat) = answer.split_once("\n\n").unwrap_or((&answer, ""));
    assert!(parse_pid(info).is_some(), "a `Pid:` line");
    let rows = parse_stat(stat).expect("a readable show stat");
    assert!(rows.len() > BACKENDS * SERVERS_PER_BACKEND, "every row");
    answer.len()
}

/// The old query at `interval` from a thread of this bench, for as long as `run` holds; the path
/// of that thread's stat file (its CPU is the agent's share of the old query).
fn old_sampler(sock: PathBuf, interval: Duration, run: Arc<AtomicBool>) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let _ = tx.send(format!("/proc/self/task/{tid}/stat"));
        while run.load(Ordering::Relaxed) {
            old_sample(&sock);
            std::thread::sleep(interval);
        }
    });
    rx.recv().expect("the sampler thread's id")
}

/// The answer sizes of the old query and the new ones, in bytes.
fn answer_sizes(sock: &Path) -> Vec<(&'static str, usize)> {
    [
        ("`show info;show stat` (before)", "show info;show stat"),
        ("`show info` (after, `connections`)", "show info"),
        (
            "`show info;show stat -1 1 -1` (after, `ignore_frontends` or `quiet_period`)",
            "show info;show stat -1 1 -1",
        ),
        (
            "`show info;show stat -1 2 -1` (after, `sessions`)",
            "show info;show stat -1 2 -1",
        ),
    ]
    .into_iter()
    .map(|(label, line)| (label, admin_command(sock, line).expect(line).len()))
    .collect()
}

async fn idle_and_before(window: Duration, rows: &mut Vec<String>) {
    let ctx = node(|_| {}).start().await;
    let sock = ctx.haproxy.admin_socket();
    let worker = ctx.serving_pid().await.expect("the serving worker");
    let agent = format!("/proc/{}/stat", ctx.agent.pid());
    println!("Answer sizes ({BACKENDS} backends x {SERVERS_PER_BACKEND} servers):\n");
    println!("| query | bytes |");
    println!("|---|---|");
    for (label, bytes) in answer_sizes(&sock) {
        println!("| {label} | {bytes} |");
    }
    println!();

    let w = measure(&sock, worker, &agent, window).await;
    rows.push(format!(
        "| idle (no drain) | — | {:.1} | {:.2} | {:.1} |",
        w.haproxy, w.ebb, w.samples_per_sec
    ));
    for ms in INTERVALS_MS {
        let run = Arc::new(AtomicBool::new(true));
        let thread = old_sampler(sock.clone(), Duration::from_millis(ms), run.clone());
        let w = measure(&sock, worker, &thread, window).await;
        run.store(false, Ordering::Relaxed);
        rows.push(format!(
            "| before: `show info;show stat` | {ms} ms | {:.1} | {:.2} (bench thread) | {:.1} |",
            w.haproxy, w.ebb, w.samples_per_sec
        ));
        // Let the last exchange end before the next window.
        tokio::time::sleep(Duration::from_millis(ms + 100)).await;
    }
}

/// A real agent with `poll_interval = ms`, draining, the drain held by one slow request.
async fn after(
    window: Duration,
    ms: u64,
    label: &str,
    tweak: impl FnOnce(&mut AgentConfig) + 'static,
) -> String {
    let poll = format!("{ms}ms");
    let ctx = node(move |c| {
        c.set_str("drain", "poll_interval", &poll);
        tweak(c);
    })
    .start()
    .await;
    let sock = ctx.haproxy.admin_socket();
    let worker = ctx.serving_pid().await.expect("the serving worker");
    let agent = format!("/proc/{}/stat", ctx.agent.pid());
    let held = window + Duration::from_secs(3);
    let _slow = spawn_get(ctx.port(), &format!("/slow?ms={}", held.as_millis()));
    ctx.wait_conns(1).await;
    ctx.ok("drain", json!({"drain_id": "bench", "min_period_ms": 0}))
        .await;
    let status = ctx
        .wait_status("the drain to be held by the slow request", |s| {
            s["drain"]["blockers"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["count"] == 1))
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");
    let w = measure(&sock, worker, &agent, window).await;
    assert_eq!(
        ctx.status().await["state"],
        "draining",
        "the drain held through the window"
    );
    format!(
        "| after: {label} | {ms} ms | {:.1} | {:.2} | {:.1} |",
        w.haproxy, w.ebb, w.samples_per_sec
    )
}

fn main() {
    let secs: u64 = std::env::var("EBB_BENCH_SAMPLING_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .clamp(1, 25);
    let window = Duration::from_secs(secs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut rows = Vec::new();
    runtime.block_on(idle_and_before(window, &mut rows));
    for ms in INTERVALS_MS {
        rows.push(
            runtime.block_on(after(window, ms, "`show info` (`connections`)", |c| {
                c.unset("drain", "ignore_frontends");
            })),
        );
        rows.push(runtime.block_on(after(
            window,
            ms,
            "`show stat -1 1 -1` (`ignore_frontends`)",
            |_| {},
        )));
        rows.push(
            runtime.block_on(after(window, ms, "`show stat -1 2 -1` (`sessions`)", |c| {
                c.unset("drain", "ignore_frontends")
                    .set_str("drain", "idle", "sessions");
            })),
        );
    }
    println!("Window {secs} s per row; CPU as % of one core.\n");
    println!("| sampling | poll_interval | HAProxy worker CPU % | ebb CPU % | samples/s |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
