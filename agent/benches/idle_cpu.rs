//! Idle CPU of the agent with systemd's watchdog on (target: under 0.1% of one core).
//!
//! A real `ebb agent` (release build) with its own haproxy and a real nats-server, given a
//! stand-in notify socket (`NOTIFY_SOCKET`) and `WATCHDOG_USEC`, left idle once it serves; its
//! utime + stime from /proc/<pid>/stat over the window, as a share of one core. Two runs:
//! `WATCHDOG_USEC=200000` (a status probe every 100 ms, the worst case) and `30000000`
//! (`WatchdogSec=30s` of examples/systemd/ebb.service: a probe every 15 s).
//!
//! `cargo bench -p ebb-agent --bench idle_cpu` (`EBB_BENCH_IDLE_SECS=N` changes the 60 s window;
//! `EBB_TEST_NATS_SERVER` / `EBB_TEST_HAPROXY` pick the binaries). Prints a Markdown table.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

const EBB: &str = env!("CARGO_BIN_EXE_ebb");

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/<pid>/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let rest = &stat[stat.rfind(')').expect("a comm field") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

/// /proc counts CPU time in USER_HZ ticks, which the kernel fixes at 100 for userspace.
const USER_HZ: f64 = 100.0;

async fn measure(watchdog_usec: &str, window: Duration) -> (f64, usize) {
    let notify = NotifySocket::bind();
    let node = NodeFixture::builder()
        .bin(EBB)
        .env("NOTIFY_SOCKET", notify.path_str())
        .env("WATCHDOG_USEC", watchdog_usec)
        .start()
        .await;
    notify.wait_line(NODE_TIMEOUT, 0, "READY=1", |l| l == "READY=1");
    let pid = node.agent.pid();
    let pings_before = notify.count("WATCHDOG=1");
    let (ticks_before, started) = (cpu_ticks(pid), Instant::now());
    // The window is the measurement itself: the agent must be left alone for it.
    tokio::time::sleep(window).await;
    let (ticks, elapsed) = (cpu_ticks(pid) - ticks_before, started.elapsed());
    let cpu_seconds = ticks as f64 / USER_HZ;
    (
        100.0 * cpu_seconds / elapsed.as_secs_f64(),
        notify.count("WATCHDOG=1") - pings_before,
    )
}

fn main() {
    let secs = std::env::var("EBB_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let window = Duration::from_secs(secs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    println!("| watchdog | probe every | window | agent CPU (% of one core) | pings |");
    println!("|---|---|---|---|---|");
    for (usec, label, probe) in [("200000", "200 ms", "100 ms"), ("30000000", "30 s", "15 s")] {
        let (cpu, pings) = runtime.block_on(measure(usec, window));
        println!("| {label} | {probe} | {secs} s | {cpu:.3} | {pings} |");
    }
}
