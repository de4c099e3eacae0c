//! Fan-out over a fleet of N agents on one machine (each a real agent with its own haproxy, all on
//! one nats-server): `status --all` and `reload --all`, each both as a whole `ebb ctl … --all
//! --json` process and in-process with the sdk's client. Prints two markdown tables.
//!
//! `cargo bench -p ebb-agent --bench fanout` runs 20, 50 and 100 agents; `EBB_BENCH_FANOUT=50`
//! (or `=20,100`) runs those sizes only. `EBB_BENCH_FANOUT_STARTING=N` changes how many agents
//! may be starting at once (default 8).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ebb_sdk::client::{Client, Target};
use ebb_sdk::command::{Command, ReloadRequest, StatusRequest};
use support::*;

/// How long one fan-out may wait for its replies (the CLI's `--timeout` too).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `ebb ctl` run may take before the bench fails.
const CTL_LIMIT: Duration = Duration::from_secs(60);
/// Agents starting at once: each starts haproxy and creates its NATS stream and bucket, which on
/// 2 cores is CPU-bound. More at once does not start the fleet sooner, and 100 at once pushes
/// single starts towards their timeouts.
const MAX_STARTING: usize = 8;
/// Rounds of each status measurement, per size.
const STATUS_ROUNDS: usize = 50;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// p50 and p99 of `samples`, as two table cells.
fn p50_p99(samples: &mut [Duration]) -> String {
    samples.sort();
    format!(
        "{} | {}",
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 0.99))
    )
}

/// The sizes to run: `EBB_BENCH_FANOUT` (comma-separated), else 20, 50 and 100.
fn sizes() -> Vec<usize> {
    match std::env::var("EBB_BENCH_FANOUT") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim().parse().unwrap_or_else(|e| {
                    panic!("EBB_BENCH_FANOUT={list:?}: {s:?} is not a number of agents ({e})")
                })
            })
            .collect(),
        Err(_) => vec![20, 50, 100],
    }
}

/// Reload rounds per size: every round reloads every haproxy of the machine at once.
fn reload_rounds(size: usize) -> usize {
    match size {
        0..=20 => 30,
        21..=50 => 20,
        _ => 10,
    }
}

/// What is wrong with a fan-out's replies: one line per node that did not answer, or answered
/// with an error.
fn bad_replies(all: &BTreeSet<String>, replies: &[ebb_sdk::reply::Reply]) -> Vec<String> {
    let replied: BTreeSet<String> = replies.iter().map(|r| r.node.clone()).collect();
    let missing = all
        .difference(&replied)
        .map(|n| format!("{n}: no reply within {REPLY_TIMEOUT:?}"));
    let failed = replies.iter().filter(|r| !r.ok).map(|r| {
        let error = r
            .error
            .as_ref()
            .map(|e| format!("{:?}: {}", e.code, e.message));
        format!("{}: {}", r.node, error.unwrap_or_default())
    });
    missing.chain(failed).collect()
}

/// `ebb ctl --nats URL VERB --all --json --timeout 30s`, timed (process start included), and
/// what went wrong: nothing unless it exits 0 with an ok reply from each of `size` nodes.
fn ctl_all(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    verb: &str,
    size: usize,
) -> (Duration, Vec<String>) {
    let timeout = format!("{}s", REPLY_TIMEOUT.as_secs());
    let args = [
        "--nats",
        url,
        verb,
        "--all",
        "--json",
        "--timeout",
        &timeout,
    ];
    let started = Instant::now();
    let run = runtime.block_on(run_ctl(&args, &[], CTL_LIMIT));
    let took = started.elapsed();
    let out: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("ebb ctl {verb} --all --json printed no JSON ({e}): {run:?}"));
    let replies = out["replies"].as_array().cloned().unwrap_or_default();
    let ok = replies.iter().filter(|r| r["ok"] == true).count();
    let mut bad: Vec<String> = replies
        .iter()
        .filter(|r| r["ok"] != true)
        .map(|r| format!("{}: {}", r["node"], r["error"]))
        .collect();
    if let Some(missing) = out["missing"].as_array().filter(|m| !m.is_empty()) {
        bad.push(format!("no reply from {missing:?}"));
    }
    if (run.code, ok) != (0, size) && bad.is_empty() {
        bad.push(format!(
            "exit {}, {ok} ok replies of {size}: {run:?}",
            run.code
        ));
    }
    (took, bad)
}

fn main() {
    let max_starting: usize = std::env::var("EBB_BENCH_FANOUT_STARTING")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_STARTING);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut status_rows = Vec::new();
    let mut reload_rows = Vec::new();
    for size in sizes() {
        let ids: Vec<String> = (0..size).map(|i| format!("n{i:03}")).collect();
        let all: BTreeSet<String> = ids.iter().cloned().collect();

        let started = Instant::now();
        let fleet = runtime.block_on(Fleet::start_serving(&ids, max_starting, |_, node| {
            node.agent(|c| {
                c.log_level("warn");
            })
        }));
        let client = Client::new(fleet.nc.clone(), "ebb");
        // Serving is not yet known: each agent writes its KV record once it serves.
        wait_until(Duration::from_secs(120), "every agent is known", || {
            runtime
                .block_on(client.discover(&Target::All))
                .is_ok_and(|n| n == all)
        });
        let start_time = started.elapsed();
        eprintln!("{size} agents serving and known after {start_time:.1?}");

        // status --all: nothing else runs, so this is the fan-out itself plus discovery.
        let url = fleet.nats_url();
        // A round that does not list every node is counted and shown, not fatal: discovery
        // reads the KV bucket while 100 agents rewrite their records, and can miss one.
        let (mut cli_short, mut inproc_short) = (0, 0);
        // Warm-up, not counted: the binary's pages, the server's and the agents' first replies.
        ctl_all(&runtime, &url, "status", size);
        let mut cli = Vec::with_capacity(STATUS_ROUNDS);
        for round in 0..STATUS_ROUNDS {
            let (took, bad) = ctl_all(&runtime, &url, "status", size);
            cli.push(took);
            if !bad.is_empty() {
                cli_short += 1;
                eprintln!("{size} agents, ebb ctl status --all, round {round}: {bad:?}");
            }
        }
        let (mut total, mut discover, mut gather) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..STATUS_ROUNDS {
            let (d, g, bad) = runtime.block_on(async {
                let started = Instant::now();
                let nodes = client
                    .discover(&Target::All)
                    .await
                    .expect("discover the fleet");
                let d = started.elapsed();
                let mut bad: Vec<String> = all
                    .difference(&nodes)
                    .map(|n| format!("{n}: not discovered"))
                    .collect();
                let gathered = client
                    .gather(
                        &Target::All,
                        &Command::Status(StatusRequest::default()),
                        &nodes,
                        REPLY_TIMEOUT,
                    )
                    .await
                    .expect("status --all");
                let g = started.elapsed() - d;
                bad.extend(bad_replies(&nodes, &gathered.replies));
                (d, g, bad)
            });
            if !bad.is_empty() {
                inproc_short += 1;
                eprintln!("{size} agents, in-process status --all, round {round}: {bad:?}");
            }
            discover.push(d);
            gather.push(g);
            total.push(d + g);
        }
        status_rows.push(format!(
            "| {size} | {:.1} s | {STATUS_ROUNDS} | {} | {} | {} | {} | {cli_short} / {inproc_short} |",
            start_time.as_secs_f64(),
            p50_p99(&mut cli),
            p50_p99(&mut total),
            p50_p99(&mut discover),
            p50_p99(&mut gather),
        ));
        eprintln!("{}", status_rows.last().expect("a row"));

        // reload --all: every haproxy of the machine reloads at once.
        // A failed reload is counted and shown, not fatal: on a starved machine haproxy itself
        // can give up (docs/BENCHMARKS.md, "Status fan-out at 20, 50 and 100 agents").
        let rounds = reload_rounds(size);
        let mut inproc = Vec::new();
        let mut cli = Vec::new();
        let mut failures = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            let replies = runtime
                .block_on(client.request(
                    &Target::All,
                    &Command::Reload(ReloadRequest::default()),
                    &all,
                    REPLY_TIMEOUT,
                ))
                .expect("reload --all");
            inproc.push(t.elapsed());
            failures.extend(bad_replies(&all, &replies));
            let (took, bad) = ctl_all(&runtime, &url, "reload", size);
            cli.push(took);
            failures.extend(bad);
        }
        for failure in &failures {
            eprintln!("{size} agents, reload --all: {failure}");
        }
        reload_rows.push(format!(
            "| {size} | {rounds} | {} | {} | {} of {} |",
            p50_p99(&mut cli),
            p50_p99(&mut inproc),
            failures.len(),
            2 * rounds * size,
        ));
        eprintln!("{}", reload_rows.last().expect("a row"));

        // Everything this size started must be gone before the next one starts.
        let agents: Vec<u32> = fleet.nodes.iter().map(|n| n.agent.pid()).collect();
        let dir = fleet.dir().to_owned();
        drop(client);
        drop(fleet);
        let alive: Vec<u32> = agents.into_iter().filter(|&p| is_alive(p)).collect();
        let left = pids_mentioning(&dir);
        assert!(
            alive.is_empty() && left.is_empty(),
            "processes left after the {size}-agent fleet: agents {alive:?}, others naming {}: {left:?}",
            dir.display()
        );
    }

    println!("status --all:\n");
    println!(
        "| agents | start (all serving and known) | rounds | CLI p50 | CLI p99 | in-process p50 | \
         in-process p99 | discover p50 | discover p99 | gather p50 | gather p99 | rounds short of \
         every node (CLI / in-process) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &status_rows {
        println!("{row}");
    }
    println!("\nreload --all:\n");
    println!(
        "| agents | rounds | CLI p50 | CLI p99 | in-process p50 | in-process p99 | failed reloads |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for row in &reload_rows {
        println!("{row}");
    }
}
