//! Fleet orchestration from a terminal: `ebb ctl` rolling reloads and group drains across 20 real
//! agents, each with its own haproxy, on one nats-server.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const FLEET: usize = 20;

/// `size` agents (`n00`, `n01`, …, all in group `g`, heartbeat 1 s), each with its own haproxy,
/// on one nats-server; returns once every one of them is known to `ebb ctl`.
async fn start_fleet(size: usize) -> Fleet {
    start_fleet_beating(size, "1s").await
}

/// [`start_fleet`] with another heartbeat: a node's KV record stays fresh for three of them.
async fn start_fleet_beating(size: usize, heartbeat: &str) -> Fleet {
    let ids: Vec<String> = (0..size).map(|i| format!("n{i:02}")).collect();
    let fleet = Fleet::start(&ids, |_, node| {
        node.agent(|cfg| {
            cfg.groups(&["g"]).set_str("nats", "heartbeat", heartbeat);
        })
    })
    .await;
    // Every node is known once its KV record is there: status --all gets all replies.
    wait_until_async(
        Duration::from_secs(60),
        "every agent answers status",
        || async {
            let (code, out) = ctl(&fleet, &["status", "--all", "--json", "--timeout", "3s"]).await;
            code == 0 && replies(&out).len() == size
        },
    )
    .await;
    // An agent answers `status` while its first HAProxy starts (`starting`): wait for every one
    // to serve.
    fleet.wait_serving().await;
    fleet
}

/// Runs `ebb ctl ARGS` against the fleet's nats-server: exit code and stdout.
async fn ctl(fleet: &Fleet, args: &[&str]) -> (i32, String) {
    let url = fleet.nats_url();
    let mut all = vec!["--nats", url.as_str()];
    all.extend_from_slice(args);
    let run = run_ctl(&all, &[], Duration::from_secs(300)).await;
    (run.code, run.stdout)
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("ebb ctl printed no JSON ({e}):\n{out}"))
}

/// The node in a subject `<before><node><after>`.
fn node_of(subject: &str, before: &str, after: &str) -> Option<String> {
    let node = subject.strip_prefix(before)?.strip_suffix(after)?;
    Some(node.to_string())
}

fn replies(out: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(out)
        .ok()
        .and_then(|v| v["replies"].as_array().cloned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_reload_keeps_n_nodes_in_flight_and_every_node_ends_on_a_new_worker() {
    let fleet = start_fleet(FLEET).await;
    let tap = EventTap::subscribe(&fleet.nc, "ebb.>").await;
    let before: Vec<u32> = fleet
        .nodes
        .iter()
        .map(|n| show_info_pid(&n.haproxy.admin_socket()).expect("pid"))
        .collect();

    let (code, out) = ctl(
        &fleet,
        &[
            "reload",
            "--group",
            "g",
            "--max-parallel",
            "25%",
            "--json",
            "--timeout",
            "10s",
        ],
    )
    .await;
    assert_eq!(code, 0, "rolling reload failed:\n{out}");
    let results = json(&out);
    let results = results.as_array().expect("array of node results");
    assert_eq!(results.len(), FLEET);
    for r in results {
        assert_eq!(r["outcome"], "reloaded", "{r}");
    }
    // 25% of 20 = 5 at a time, started in node order: four groups of five.
    for batch in 1..=4u64 {
        let in_batch = results.iter().filter(|r| r["batch"] == batch).count();
        assert_eq!(in_batch, 5, "batch {batch}: {out}");
    }
    // A node is in flight from its reload command to its `reloaded` event.
    let in_flight = tap.max_in_flight(
        |e| node_of(&e.subject, "ebb.node.", ".reload"),
        |e| node_of(&e.subject, "ebb.event.", ".reloaded"),
    );
    assert!(
        (2..=5).contains(&in_flight),
        "{in_flight} nodes were reloading at once; --max-parallel 25% allows 5:\n{out}"
    );
    for (node, old) in fleet.nodes.iter().zip(before) {
        let now = show_info_pid(&node.haproxy.admin_socket()).expect("pid");
        assert_ne!(now, old, "{} still runs its old worker", node.id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_drain_waits_for_the_node_with_a_long_request_and_cuts_nothing() {
    let fleet = start_fleet(FLEET).await;
    let slow_node = fleet.node("n07");
    let port = slow_node.haproxy.frontend_port();
    let slow = tokio::spawn(async move { http_get(port, "/slow?ms=4000", true).await });
    // The request is in flight once the node counts a connection.
    wait_until_async(
        Duration::from_secs(10),
        "the slow request reached n07",
        || async { slow_node.curr_conns().await.is_some_and(|c| c > 0) },
    )
    .await;

    let started = Instant::now();
    let (code, out) = ctl(
        &fleet,
        &[
            "drain",
            "--group",
            "g",
            "--min-period",
            "0s",
            "--wait",
            "60s",
            "--json",
        ],
    )
    .await;
    let waited = started.elapsed();
    assert_eq!(code, 0, "drain --wait failed:\n{out}");
    let (status, body) = slow.await.expect("join").expect("the slow request was cut");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("slept 4000 ms"), "{body}");

    let nodes = json(&out);
    let nodes = nodes.as_object().expect("object by node");
    assert_eq!(nodes.len(), FLEET);
    let mut longest = ("", 0u64);
    for (id, p) in nodes {
        assert_eq!(p["outcome"], "drained", "{id}: {p}");
        assert_eq!(p["connections_cut"], 0, "{id}: {p}");
        let d = p["duration_ms"].as_u64().unwrap_or(0);
        if d > longest.1 {
            longest = (id, d);
        }
    }
    assert_eq!(
        longest.0, "n07",
        "the node with the long request finishes last: {out}"
    );
    assert!(
        waited >= Duration::from_secs(3),
        "drain --wait returned before the long request ended"
    );
}

/// How long a rollout waits for a batch. The dead node costs this much per run; the live ones must
/// reload within it while other fleets of this suite run beside them on the same cores.
const DEAD_NODE_TIMEOUT: &str = "10s";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_during_a_rollout_is_reported_and_the_flag_decides_what_follows() {
    // Heartbeats of 10 s: the dead node's KV record stays fresh (30 s) through both rollouts.
    let mut fleet = start_fleet_beating(FLEET, "10s").await;
    // n02 dies: its KV record stays fresh for three heartbeats, so the rollouts still expect it.
    fleet.node_mut("n02").agent.kill9().expect("kill -9");

    // One at a time: the dead node's failure is known before any later node starts.
    let (code, out) = ctl(
        &fleet,
        &[
            "reload",
            "--group",
            "g",
            "--max-parallel",
            "1",
            "--json",
            "--timeout",
            DEAD_NODE_TIMEOUT,
        ],
    )
    .await;
    assert_eq!(code, 1, "a stopped rollout is a failure:\n{out}");
    let results = json(&out);
    let results = results.as_array().expect("array");
    let outcome = |id: &str| {
        results
            .iter()
            .find(|r| r["node"] == id)
            .map(|r| r["outcome"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(outcome("n02"), "no_reply", "{out}");
    assert_eq!(outcome("n01"), "reloaded", "{out}");
    assert_eq!(
        outcome("n03"),
        "skipped",
        "the rollout stopped at the failed node: {out}"
    );
    assert_eq!(outcome("n19"), "skipped", "{out}");

    let (code, out) = ctl(
        &fleet,
        &[
            "reload",
            "--group",
            "g",
            "--max-parallel",
            "5",
            "--continue-on-error",
            "--json",
            "--timeout",
            DEAD_NODE_TIMEOUT,
        ],
    )
    .await;
    assert_eq!(
        code, 3,
        "only an unreachable node is left: timeout exit code:\n{out}"
    );
    let results = json(&out);
    let results = results.as_array().expect("array");
    for r in results {
        let expect = if r["node"] == "n02" {
            "no_reply"
        } else {
            "reloaded"
        };
        assert_eq!(r["outcome"], expect, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_recent_history_from_the_stream() {
    let fleet = start_fleet(2).await;
    let (code, out) = ctl(&fleet, &["reload", "--node", "n01", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    // A watcher that starts after the fact still sees the reload.
    let (code, out) = ctl(
        &fleet,
        &[
            "watch", "--node", "n01", "--kind", "reloaded", "--count", "1", "--json", "--for",
            "20s",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let event: Value = serde_json::from_str(out.lines().next().unwrap_or_default())
        .expect("one JSON event per line");
    assert_eq!(event["kind"], "reloaded");
    assert_eq!(event["node"], "n01");
}

/// The fleet size the scale test runs on this machine: every agent with its own small haproxy.
const BIG_FLEET: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_agents_are_listed_and_drained_ten_at_a_time() {
    let fleet = start_fleet_beating(BIG_FLEET, "5s").await;
    let (code, out) = ctl(&fleet, &["status", "--all", "--json", "--timeout", "20s"]).await;
    assert_eq!(code, 0, "status --all of {BIG_FLEET} agents:\n{out}");
    let listed: Vec<String> = replies(&out)
        .iter()
        .filter_map(|r| r["node"].as_str().map(str::to_string))
        .collect();
    let ids: Vec<String> = fleet.nodes.iter().map(|n| n.id().to_string()).collect();
    assert_eq!(listed, ids, "every agent, once, in node order");

    let tap = EventTap::subscribe(&fleet.nc, "ebb.>").await;
    let (code, out) = ctl(
        &fleet,
        &[
            "drain",
            "--all",
            "--yes",
            "--max-parallel",
            "10",
            "--wait",
            "2m",
            "--json",
            "--timeout",
            "20s",
        ],
    )
    .await;
    assert_eq!(code, 0, "rolling drain of {BIG_FLEET} agents:\n{out}");
    let results = json(&out);
    let results = results.as_array().expect("array of node results");
    assert_eq!(results.len(), BIG_FLEET, "{out}");
    for r in results {
        assert_eq!(r["outcome"], "drained", "{r}");
    }
    // A node is in flight from its drain command to its `drained` event.
    let in_flight = tap.max_in_flight(
        |e| node_of(&e.subject, "ebb.node.", ".drain"),
        |e| node_of(&e.subject, "ebb.event.", ".drained"),
    );
    assert!(
        (2..=10).contains(&in_flight),
        "{in_flight} nodes were draining at once; --max-parallel 10 allows 10"
    );
    for node in &fleet.nodes {
        assert_eq!(node.status().await["state"], "drained", "{}", node.id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_drain_reaches_the_node_whose_kv_record_is_missing() {
    // n01 keeps no record (as a node whose record expired in a stall): only the ping finds it.
    let ids = ["n00", "n01", "n02"];
    let fleet = Fleet::start(&ids, |id, node| {
        let keeps_no_record = id == "n01";
        node.agent(move |cfg| {
            cfg.groups(&["g"]);
            if keeps_no_record {
                cfg.set_str("nats", "state_bucket", "");
            }
        })
    })
    .await;
    fleet.wait_serving().await;
    let client = ebb_sdk::client::Client::new(fleet.nc.clone(), "ebb");
    wait_until_async(
        Duration::from_secs(30),
        "the others' records in KV",
        || async {
            let mut kept: Vec<String> = client
                .node_records()
                .await
                .into_iter()
                .map(|r| r.node)
                .collect();
            kept.sort();
            kept == ["n00", "n02"]
        },
    )
    .await;

    let (code, out) = ctl(
        &fleet,
        &[
            "drain",
            "--group",
            "g",
            "--yes",
            "--max-parallel",
            "1",
            "--wait",
            "1m",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0, "rolling drain:\n{out}");
    let results = json(&out);
    let drained: Vec<&str> = results
        .as_array()
        .expect("array of node results")
        .iter()
        .filter(|r| r["outcome"] == "drained")
        .filter_map(|r| r["node"].as_str())
        .collect();
    assert_eq!(drained, ids, "{out}");
    assert_eq!(fleet.node("n01").status().await["state"], "drained");
}
