//! Fan-out: the time from `reload --all` to every node's reply, for 20 and 50 agents on one
//! machine (each with its own haproxy). Prints a table.
//!
//! `cargo bench -p ebb-agent --bench fanout` (`EBB_BENCH_FANOUT=50` runs one size only).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ebb_sdk::client::{Client, Target};
use ebb_sdk::command::{Command, ReloadRequest};
use support::*;

const EBB: &str = env!("CARGO_BIN_EXE_ebb");

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    println!("| agents | rounds | CLI p50 | CLI p99 | in-process p50 | in-process p99 |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let only: Option<usize> = std::env::var("EBB_BENCH_FANOUT")
        .ok()
        .and_then(|v| v.parse().ok());
    for (size, rounds) in [(20usize, 30usize), (50, 20)] {
        if only.is_some_and(|n| n != size) {
            continue;
        }
        let dir = TestDir::new();
        let nats = NatsServer::start(&dir.join("nats")).expect("nats-server");
        let backend = Backend::start().expect("backend");
        let mut agents = Vec::new();
        for i in 0..size {
            let node_dir = dir.join(format!("n{i:02}"));
            std::fs::create_dir_all(&node_dir).expect("dir");
            let haproxy = HaproxyConfig::new(&node_dir, backend.addr());
            haproxy.write().expect("haproxy.cfg");
            let mut cfg = AgentConfig::new(&node_dir, &nats.url(), &haproxy);
            cfg.node_id(&format!("n{i:02}"))
                .set_str("log", "level", "warn");
            agents.push(Agent::start(EBB, &cfg.write().expect("agent.toml")).expect("agent"));
        }
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let client = runtime.block_on(async {
            Client::new(
                async_nats::connect(nats.url()).await.expect("connect"),
                "ebb",
            )
        });
        let all: BTreeSet<String> = (0..size).map(|i| format!("n{i:02}")).collect();
        wait_until(Duration::from_secs(120), "every agent is known", || {
            runtime
                .block_on(client.discover(&Target::All))
                .is_ok_and(|n| n == all)
        });

        let mut inproc = Vec::new();
        let mut cli = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            let replies = runtime
                .block_on(client.request(
                    &Target::All,
                    &Command::Reload(ReloadRequest::default()),
                    &all,
                    Duration::from_secs(30),
                ))
                .expect("request");
            inproc.push(t.elapsed());
            let replied: BTreeSet<String> = replies.iter().map(|r| r.node.clone()).collect();
            let missing: Vec<&String> = all.difference(&replied).collect();
            assert!(missing.is_empty(), "no reply within 30s from {missing:?}");
            let failed: Vec<String> = replies
                .iter()
                .filter(|r| !r.ok)
                .map(|r| format!("{r:?}"))
                .collect();
            assert!(failed.is_empty(), "failed reloads: {failed:#?}");

            let t = Instant::now();
            let status = std::process::Command::new(EBB)
                .args([
                    "ctl",
                    "--nats",
                    &nats.url(),
                    "reload",
                    "--all",
                    "--json",
                    "--timeout",
                    "30s",
                ])
                .output()
                .expect("ebb ctl");
            cli.push(t.elapsed());
            assert!(status.status.success(), "ebb ctl reload --all failed");
        }
        inproc.sort();
        cli.sort();
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
        println!(
            "| {size} | {rounds} | {} | {} | {} | {} |",
            ms(percentile(&cli, 0.5)),
            ms(percentile(&cli, 0.99)),
            ms(percentile(&inproc, 0.5)),
            ms(percentile(&inproc, 0.99)),
        );
        drop(agents);
    }
}
