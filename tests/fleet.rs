//! Fleet orchestration from a terminal: `ebb ctl` rolling reloads and group drains across 20 real
//! agents, each with its own haproxy, on one nats-server.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const EBB: &str = env!("CARGO_BIN_EXE_ebb");
const FLEET: usize = 20;

/// One node of the test fleet: its dir, haproxy config and running agent.
struct Node {
    id: String,
    haproxy: HaproxyConfig,
    agent: Agent,
}

struct Fleet {
    // Field order matters: agents go before the nats-server and the dir they live in.
    nodes: Vec<Node>,
    nats: NatsServer,
    _backend: Backend,
    dir: TestDir,
}

impl Fleet {
    fn start(size: usize) -> Fleet {
        let dir = TestDir::new();
        let nats = NatsServer::start(&dir.join("nats")).expect("nats-server");
        let backend = Backend::start().expect("backend");
        let mut nodes = Vec::new();
        for i in 0..size {
            let id = format!("n{i:02}");
            let node_dir = dir.join(&id);
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let haproxy = HaproxyConfig::new(&node_dir, backend.addr());
            haproxy.write().expect("haproxy.cfg");
            let mut cfg = AgentConfig::new(&node_dir, &nats.url(), &haproxy);
            cfg.node_id(&id).groups(&["g"]);
            cfg.set_str("nats", "heartbeat", "1s");
            let path = cfg.write().expect("agent.toml");
            let agent = Agent::start(EBB, &path).expect("agent");
            nodes.push(Node { id, haproxy, agent });
        }
        let fleet = Fleet {
            nodes,
            nats,
            _backend: backend,
            dir,
        };
        // Every node is known once its KV record is there: status --all gets all replies.
        wait_until(
            Duration::from_secs(60),
            "every agent answers status",
            || {
                let (code, out) = fleet.ctl(&["status", "--all", "--json", "--timeout", "3s"]);
                code == 0 && replies(&out).len() == size
            },
        );
        fleet
    }

    /// Runs `ebb ctl ARGS` against the fleet's nats-server: exit code and stdout.
    fn ctl(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(EBB)
            .arg("ctl")
            .arg("--nats")
            .arg(self.nats.url())
            .args(args)
            .env_remove("EBB_NATS_URL")
            .output()
            .expect("run ebb ctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn node(&self, id: &str) -> &Node {
        self.nodes.iter().find(|n| n.id == id).expect("node")
    }

    #[allow(dead_code)]
    fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("ebb ctl printed no JSON ({e}):\n{out}"))
}

fn replies(out: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(out)
        .ok()
        .and_then(|v| v["replies"].as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn rolling_reload_goes_batch_by_batch_and_every_node_ends_on_a_new_worker() {
    let fleet = Fleet::start(FLEET);
    let before: Vec<u32> = fleet
        .nodes
        .iter()
        .map(|n| show_info_pid(&n.haproxy.admin_socket()).expect("pid"))
        .collect();

    let (code, out) = fleet.ctl(&[
        "reload",
        "--group",
        "g",
        "--max-parallel",
        "25%",
        "--json",
        "--timeout",
        "10s",
    ]);
    assert_eq!(code, 0, "rolling reload failed:\n{out}");
    let results = json(&out);
    let results = results.as_array().expect("array of node results");
    assert_eq!(results.len(), FLEET);
    for r in results {
        assert_eq!(r["outcome"], "reloaded", "{r}");
    }
    // 25% of 20 = 5 per batch: four batches of five, in node order.
    for batch in 1..=4u64 {
        let in_batch = results.iter().filter(|r| r["batch"] == batch).count();
        assert_eq!(in_batch, 5, "batch {batch}: {out}");
    }
    for (node, old) in fleet.nodes.iter().zip(before) {
        let now = show_info_pid(&node.haproxy.admin_socket()).expect("pid");
        assert_ne!(now, old, "{} still runs its old worker", node.id);
    }
}

#[test]
fn a_group_drain_waits_for_the_node_with_a_long_request_and_cuts_nothing() {
    let fleet = Fleet::start(FLEET);
    let slow_node = fleet.node("n07");
    let port = slow_node.haproxy.frontend_port();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let slow = runtime.spawn(async move { http_get(port, "/slow?ms=4000", true).await });
    // The request is in flight once the node counts a connection.
    let sock = slow_node.haproxy.admin_socket();
    wait_until(
        Duration::from_secs(10),
        "the slow request reached n07",
        || {
            show_info(&sock)
                .ok()
                .and_then(|i| i.get("CurrConns").and_then(|c| c.parse::<u64>().ok()))
                .is_some_and(|c| c > 0)
        },
    );

    let started = Instant::now();
    let (code, out) = fleet.ctl(&[
        "drain",
        "--group",
        "g",
        "--min-period",
        "0s",
        "--wait",
        "60s",
        "--json",
    ]);
    let waited = started.elapsed();
    assert_eq!(code, 0, "drain --wait failed:\n{out}");
    let (status, body) = runtime
        .block_on(slow)
        .expect("join")
        .expect("the slow request was cut");
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

#[test]
fn a_node_that_dies_during_a_rollout_is_reported_and_the_flag_decides_what_follows() {
    let mut fleet = Fleet::start(FLEET);
    // n02 dies: its KV record stays fresh for three heartbeats, so the rollout still expects it.
    let dead = fleet.nodes.iter_mut().find(|n| n.id == "n02").expect("n02");
    dead.agent.kill9().expect("kill -9");

    let (code, out) = fleet.ctl(&[
        "reload",
        "--group",
        "g",
        "--max-parallel",
        "5",
        "--json",
        "--timeout",
        DEAD_NODE_TIMEOUT,
    ]);
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
    assert_eq!(
        outcome("n00"),
        "reloaded",
        "the rest of the first batch went on: {out}"
    );
    assert_eq!(
        outcome("n05"),
        "skipped",
        "the rollout stopped after the failed batch: {out}"
    );
    assert_eq!(outcome("n19"), "skipped", "{out}");

    let (code, out) = fleet.ctl(&[
        "reload",
        "--group",
        "g",
        "--max-parallel",
        "5",
        "--continue-on-error",
        "--json",
        "--timeout",
        DEAD_NODE_TIMEOUT,
    ]);
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

#[test]
fn watch_replays_recent_history_from_the_stream() {
    let fleet = Fleet::start(2);
    let (code, out) = fleet.ctl(&["reload", "--node", "n01", "--json"]);
    assert_eq!(code, 0, "{out}");
    // A watcher that starts after the fact still sees the reload.
    let (code, out) = fleet.ctl(&[
        "watch", "--node", "n01", "--kind", "reloaded", "--count", "1", "--json", "--for", "20s",
    ]);
    assert_eq!(code, 0, "{out}");
    let event: Value = serde_json::from_str(out.lines().next().unwrap_or_default())
        .expect("one JSON event per line");
    assert_eq!(event["kind"], "reloaded");
    assert_eq!(event["node"], "n01");
}
