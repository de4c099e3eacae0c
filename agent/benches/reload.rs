//! Reload latency (the target: reload command→reply within 1.2× HAProxy's own start time).
//!
//! - ebb: `reload` over NATS to a real `ebb agent` (release build) with its own haproxy; the reply's
//!   `duration_ms` (spawn → the new worker answers `show info` with its own pid → old worker
//!   signalled) and the client-side round trip (request → reply, as an orchestrator sees it).
//! - HAProxy alone: spawn `haproxy -db -f CFG`, poll the admin socket every 0.5 ms until `show info`
//!   answers with the new pid, kill it. Also the same with `-x ADMIN_SOCK` beside a running
//!   haproxy (a takeover start, which is what a reload spawns).
//!
//! Idle by default. `EBB_BENCH_LOAD=N` adds the same ebb and takeover measurements under load from N
//! Connection: close clients (the load of `tests/supervisor.rs`).
//!
//! `cargo bench -p ebb-agent --bench reload` (`EBB_BENCH_RELOADS=N` changes the sample count, 100
//! by default; `EBB_TEST_NATS_SERVER` / `EBB_TEST_HAPROXY` pick the binaries). Prints a Markdown
//! table.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::Client;
use bytes::Bytes;
use serde_json::Value;
use support::*;

const EBB: &str = env!("CARGO_BIN_EXE_ebb");
const NODE: &str = "bench";
const T: Duration = Duration::from_secs(30);
/// How often readiness is polled when timing HAProxy alone.
const POLL: Duration = Duration::from_micros(500);
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
    let load = count("EBB_BENCH_LOAD", 0);
    let mut rows = Vec::new();

    let (duration, rtt) = agent_reloads(n, None).await;
    rows.push(Row::new("ebb reload: reply `duration_ms`", duration));
    rows.push(Row::new("ebb reload: client round trip", rtt));
    rows.push(Row::new(
        "haproxy start (`-db -f`) until `show info` has its pid",
        tokio::task::spawn_blocking(move || haproxy_starts(n, false))
            .await
            .expect("haproxy starts"),
    ));
    rows.push(Row::new(
        "haproxy takeover start (`-x`) until `show info` has its pid",
        tokio::task::spawn_blocking(move || haproxy_starts(n, true))
            .await
            .expect("haproxy takeover starts"),
    ));
    if load > 0 {
        let (duration, rtt) = agent_reloads(n, Some(load)).await;
        rows.push(Row::new(
            &format!("ebb reload under load ({load} close clients): `duration_ms`"),
            duration,
        ));
        rows.push(Row::new(
            &format!("ebb reload under load ({load} close clients): round trip"),
            rtt,
        ));
        rows.push(Row::new(
            &format!("haproxy takeover start under load ({load} close clients)"),
            tokio::task::spawn_blocking(move || haproxy_takeovers_under_load(n, load))
                .await
                .expect("haproxy takeovers under load"),
        ));
    }

    println!();
    println!("| measurement ({n} samples each) | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: |");
    for row in &rows {
        println!("| {} | {:.1} | {:.1} |", row.name, row.p(50.0), row.p(99.0));
    }
    let start = &rows[2];
    println!();
    for (row, what) in [(&rows[1], "round trip"), (&rows[0], "duration_ms")] {
        println!(
            "ebb reload {what} / haproxy start: p50 {:.2}×, p99 {:.2}× (target ≤ 1.2×)",
            row.p(50.0) / start.p(50.0),
            row.p(99.0) / start.p(99.0)
        );
    }
}

/// `n` sequential reloads over NATS (after a warm-up), each once the previous old worker is gone:
/// (reply `duration_ms`, client round trip) in ms. With `load`, that many Connection: close
/// clients run throughout.
async fn agent_reloads(n: usize, load: Option<usize>) -> (Vec<f64>, Vec<f64>) {
    let dir = TestDir::new();
    let nats = NatsServer::start(&dir.join("nats")).expect("start nats-server");
    let backend = Backend::start().expect("backend");
    let haproxy = HaproxyConfig::new(dir.path(), backend.addr());
    haproxy.write().expect("write haproxy.cfg");
    let mut config = AgentConfig::new(dir.path(), &nats.url(), &haproxy);
    config.node_id(NODE);
    let path = config.write().expect("write agent.toml");
    let nc = support::nats_client(&nats.url(), T).await;
    let mut agent = Agent::start(EBB, &path).expect("start the agent");
    wait_until_async(T, "the agent to serve", || async {
        request(&nc, "status")
            .await
            .is_some_and(|v| v["ok"] == true && v["result"]["state"] == "serving")
    })
    .await;
    let load = load.map(|c| {
        let load = LoadGen::start(haproxy.frontend_port(), c, LoadMode::Close);
        tokio::task::block_in_place(|| load.wait_for_ok(100, T));
        load
    });

    let mut durations = Vec::with_capacity(n);
    let mut rtts = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        // One worker at a time: each reload starts from the same state.
        wait_until_async(T, "the old worker to exit", || async {
            haproxy_pids_for(dir.path()).len() == 1
        })
        .await;
        let sent = Instant::now();
        let reply = request(&nc, "reload").await.expect("a reload reply");
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
    }
    if let Some(load) = load {
        let report = tokio::task::block_in_place(|| load.stop());
        eprintln!("load during the reloads: {report}");
        report.assert_no_failures();
    }
    agent.signal(Signal::TERM).expect("SIGTERM the agent");
    agent.wait_exit(T);
    (durations, rtts)
}

async fn request(nc: &Client, verb: &str) -> Option<Value> {
    let msg = tokio::time::timeout(
        T,
        nc.request(format!("ebb.node.{NODE}.{verb}"), Bytes::from_static(b"{}")),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice(&msg.payload).ok()
}

/// The `Pid:` of whoever answers `show info` on `sock`, if anyone does.
fn answering_pid(sock: &Path) -> Option<u32> {
    let mut stream = UnixStream::connect(sock).ok()?;
    stream.set_read_timeout(Some(T)).ok()?;
    stream.write_all(b"show info\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer
        .lines()
        .find_map(|l| l.strip_prefix("Pid: "))?
        .trim()
        .parse()
        .ok()
}

/// Spawns `haproxy -db -f CFG [EXTRA…]` and returns it with the time until `show info` answered
/// with its pid (polled every 0.5 ms).
fn start_and_time(cfg: &HaproxyConfig, extra: &[&str]) -> (ChildGuard, Duration) {
    let mut cmd = Command::new(haproxy_bin());
    cmd.arg("-db")
        .arg("-f")
        .arg(cfg.path())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let started = Instant::now();
    let mut child = ChildGuard::spawn("haproxy", &mut cmd).expect("spawn haproxy");
    let pid = child.pid();
    let sock = cfg.admin_socket();
    loop {
        if answering_pid(&sock) == Some(pid) {
            return (child, started.elapsed());
        }
        assert!(
            child.is_running() && started.elapsed() < T,
            "haproxy did not get ready"
        );
        std::thread::sleep(POLL);
    }
}

/// `n` cold starts (or, with `takeover`, `-x` starts beside a running haproxy, which is then told
/// to finish), each after a warm-up: times in ms.
fn haproxy_starts(n: usize, takeover: bool) -> Vec<f64> {
    let dir = TestDir::new();
    let backend = Backend::start().expect("backend");
    let cfg = HaproxyConfig::new(dir.path(), backend.addr());
    cfg.write().expect("write haproxy.cfg");
    let sock = cfg.admin_socket().to_string_lossy().into_owned();
    let mut samples = Vec::with_capacity(n);
    let mut running: Option<ChildGuard> = None;
    for i in 0..WARMUP + n {
        let (child, took) = match (&running, takeover) {
            (Some(_), true) => start_and_time(&cfg, &["-x", &sock]),
            _ => start_and_time(&cfg, &[]),
        };
        if takeover {
            if let Some(mut old) = running.take() {
                old.signal(Signal::USR1).expect("soft-stop the old haproxy");
                old.wait_timeout(T)
                    .expect("wait")
                    .expect("old haproxy exits");
            }
            running = Some(child);
        } else {
            drop(child); // SIGKILL, reaped
        }
        if i >= WARMUP {
            samples.push(ms(took));
        }
    }
    samples
}

/// Like [`haproxy_starts`] with `takeover`, while `clients` Connection: close clients hammer it.
fn haproxy_takeovers_under_load(n: usize, clients: usize) -> Vec<f64> {
    let dir = TestDir::new();
    let backend = Backend::start().expect("backend");
    let cfg = HaproxyConfig::new(dir.path(), backend.addr());
    cfg.write().expect("write haproxy.cfg");
    let sock = cfg.admin_socket().to_string_lossy().into_owned();
    let (mut running, _) = start_and_time(&cfg, &[]);
    let load = LoadGen::start(cfg.frontend_port(), clients, LoadMode::Close);
    load.wait_for_ok(100, T);
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let (child, took) = start_and_time(&cfg, &["-x", &sock]);
        running
            .signal(Signal::USR1)
            .expect("soft-stop the old haproxy");
        running
            .wait_timeout(T)
            .expect("wait")
            .expect("old haproxy exits");
        running = child;
        if i >= WARMUP {
            samples.push(ms(took));
        }
    }
    let report = load.stop();
    eprintln!("load during the haproxy takeovers: {report}");
    report.assert_no_failures();
    samples
}
