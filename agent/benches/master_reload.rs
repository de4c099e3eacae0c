//! Master-worker reload latency (the target: ebb's reload within 1.2× the master's own reload).
//!
//! - The master alone: `haproxy -W -db -f CFG -S SOCK` (the tests' `Master` fixture, no agent).
//!   Per sample: `show proc` (the pids seen so far), `reload; quit` on the master CLI (its answer
//!   read to EOF: 2.8 answers `Success=1` once the new master loaded the config, 2.6 nothing), then
//!   `show proc` polled every 0.5 ms (a new connection each time; connects refused while the master
//!   re-execs are retried at the same pace) until a pid never seen before is under `# workers`,
//!   then `@!<pid> show info; quit` polled every 0.5 ms until it answers `Pid: <pid>`. Timed from
//!   just before the `reload` connection to that answer.
//! - ebb: a real `ebb agent` (release build) in `haproxy.mode = "master-worker"` attached
//!   (`manage_master = false`) to a second such master; `reload` over NATS: the reply's
//!   `duration_ms` (whole milliseconds, as the agent reports it) and the client round trip.
//!
//! The two measurements alternate sample by sample (each iteration does one of each, and which goes
//! first flips every iteration), so drift on a noisy 2-core machine (other builds, thermal, page
//! cache) lands on both alike. Every sample starts from the same state: each master's `show proc`
//! lists no old worker (an idle old worker exits at once on the soft stop).
//!
//! `cargo bench -p ebb-agent --bench master_reload` (`EBB_BENCH_RELOADS=N` changes the sample
//! count, 100 by default, after 5 warm-up reloads of each; `EBB_TEST_NATS_SERVER` /
//! `EBB_TEST_HAPROXY` pick the binaries; `EBB_BENCH_AGENT_LOG=1` prints the agent's log to stderr at
//! the end). Prints a Markdown table.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ebb_agent::haproxy::admin::parse_pid;
use ebb_agent::haproxy::master::{parse_show_proc, reload_reply, ProcList};
use serde_json::json;
use support::master::Master;
use support::*;

const T: Duration = Duration::from_secs(30);
/// How often the master alone is polled.
const POLL: Duration = Duration::from_micros(500);
/// One master CLI exchange of the direct measurement.
const CLI_TIMEOUT: Duration = Duration::from_secs(5);
const WARMUP: usize = 5;

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

impl Row {
    fn new(name: &str, mut samples: Vec<f64>) -> Row {
        samples.sort_by(f64::total_cmp);
        Row {
            name: name.to_owned(),
            samples,
        }
    }

    /// Nearest-rank percentile, in ms.
    fn p(&self, pct: f64) -> f64 {
        if self.samples.is_empty() {
            return f64::NAN;
        }
        let rank = ((pct / 100.0) * self.samples.len() as f64).ceil() as usize;
        self.samples[rank.clamp(1, self.samples.len()) - 1]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    let n = count("EBB_BENCH_RELOADS", 100);
    let version = haproxy_version();

    // The master alone, in a dir of its own.
    let dir = TestDir::new();
    let backend = Backend::start().expect("backend");
    let cfg = HaproxyConfig::new(dir.path(), backend.addr());
    let alone = Master::start(&cfg).expect("start the haproxy master");
    let mut seen = HashSet::new();

    // ebb attached to a second master.
    let mut attached = None;
    let node = NodeFixture::builder()
        .timeout(T)
        .prepare_with_haproxy(|_, h, cfg| {
            let m = Master::start(h).expect("start the attached haproxy master");
            cfg.set_str("haproxy", "mode", "master-worker");
            cfg.set_path("haproxy", "master_socket", m.socket());
            cfg.set("haproxy", "manage_master", "false");
            attached = Some(m);
        })
        .start()
        .await;
    let attached = attached.expect("the attached master started");

    let mut direct = Vec::with_capacity(n);
    let mut durations = Vec::with_capacity(n);
    let mut rtts = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        for ebb_first in [i % 2 == 1, i % 2 == 0] {
            if ebb_first {
                tokio::task::block_in_place(|| wait_no_old_workers(&attached));
                let sent = Instant::now();
                let reply = node.command("reload", json!({})).await;
                let rtt = sent.elapsed();
                assert_eq!(reply["ok"], true, "reload failed: {reply}");
                if i >= WARMUP {
                    rtts.push(ms(rtt));
                    durations.push(
                        reply["result"]["duration_ms"]
                            .as_f64()
                            .expect("duration_ms"),
                    );
                }
            } else {
                let took = tokio::task::block_in_place(|| {
                    wait_no_old_workers(&alone);
                    master_reload(alone.socket(), &mut seen)
                });
                if i >= WARMUP {
                    direct.push(ms(took));
                }
            }
        }
    }

    let rows = [
        Row::new(
            "master alone: `reload` until the new worker answers `@!pid show info`",
            direct,
        ),
        Row::new("ebb reload: reply `duration_ms`", durations),
        Row::new("ebb reload: client round trip", rtts),
    ];
    println!();
    println!("{version}");
    println!();
    println!("| measurement ({n} samples each) | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: |");
    for row in &rows {
        println!("| {} | {:.1} | {:.1} |", row.name, row.p(50.0), row.p(99.0));
    }
    let own = &rows[0];
    println!();
    for (row, what) in [(&rows[2], "round trip"), (&rows[1], "duration_ms")] {
        println!(
            "ebb reload {what} / master's own reload: p50 {:.2}×, p99 {:.2}× (target ≤ 1.2×)",
            row.p(50.0) / own.p(50.0),
            row.p(99.0) / own.p(99.0)
        );
    }
    if std::env::var_os("EBB_BENCH_AGENT_LOG").is_some() {
        // Where the agent's time goes: `worker N serves` (duration_ms taken), the state file
        // saved, then `event reloaded` logged and the reply sent.
        eprintln!("{}", node.agent.log_text());
    }
    drop(node);
    drop(attached);
    drop(alone);
}

/// The first line of `haproxy -v`.
fn haproxy_version() -> String {
    let out = Command::new(haproxy_bin())
        .arg("-v")
        .output()
        .expect("haproxy -v");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// One exchange on the master CLI: `line; quit`, the answer read to EOF.
fn cli(sock: &Path, line: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(CLI_TIMEOUT))?;
    stream.set_write_timeout(Some(CLI_TIMEOUT))?;
    stream.write_all(format!("{line}; quit\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// `show proc`, asked every 0.5 ms until it answers.
fn show_proc(sock: &Path) -> ProcList {
    let started = Instant::now();
    loop {
        if let Ok(answer) = cli(sock, "show proc") {
            return parse_show_proc(&answer);
        }
        assert!(started.elapsed() < T, "the master CLI does not answer");
        std::thread::sleep(POLL);
    }
}

fn wait_no_old_workers(master: &Master) {
    wait_until(T, "the old workers to exit", || {
        master
            .show_proc()
            .is_ok_and(|p| p.old_workers.is_empty() && p.workers.len() == 1)
    });
}

/// One reload of the master on `sock`, timed from sending `reload` until its new worker answers
/// `@!pid show info` with its pid. `seen` holds every pid seen so far.
fn master_reload(sock: &Path, seen: &mut HashSet<u32>) -> Duration {
    let before = show_proc(sock);
    seen.extend(
        before
            .master
            .iter()
            .chain(&before.workers)
            .chain(&before.old_workers)
            .map(|p| p.pid),
    );
    let sent = Instant::now();
    // A connection the re-exec cuts says nothing either way: `show proc` tells.
    if let Ok(answer) = cli(sock, "reload") {
        if let Some(Err(logs)) = reload_reply(&answer) {
            panic!("the master refused the reload: {logs}");
        }
    }
    let pid = loop {
        let procs = show_proc(sock);
        if let Some(new) = procs.workers.iter().find(|p| !seen.contains(&p.pid)) {
            break new.pid;
        }
        assert!(sent.elapsed() < T, "no new worker: {procs:?}");
        std::thread::sleep(POLL);
    };
    loop {
        let answer = cli(sock, &format!("@!{pid} show info"));
        if answer.is_ok_and(|a| parse_pid(&a) == Some(pid)) {
            let took = sent.elapsed();
            seen.insert(pid);
            return took;
        }
        assert!(sent.elapsed() < T, "the new worker {pid} does not answer");
        std::thread::sleep(POLL);
    }
}
