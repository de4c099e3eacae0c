//! ebb on a 3-server NATS cluster: replicated stream and bucket (`nats.stream_replicas`), the
//! shortfall said when a single server cannot replicate, and every event of a boot in the stream
//! exactly once while the stream leader's server, then the agent's own server, is killed; the
//! node records kept and written while the bucket's leader is gone; a rollout through a server
//! loss.
//!
//! Run it against both servers ebb supports: `EBB_TEST_NATS_SERVER=/usr/sbin/nats-server` (2.9)
//! and a current one (2.10+).

mod support;

use std::time::Duration;

use async_nats::jetstream;
use async_nats::Client;
use ebb_sdk::status::NodeState;
use serde_json::{json, Value};
use support::*;

/// Default timeout of every wait. Generous: the tests share a 2-core machine, and a cluster that
/// lost a server takes a few seconds to elect new leaders.
const T: Duration = Duration::from_secs(60);
/// One command's wait for its reply before it is sent again (same `request_id`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A 3-server cluster, one demo backend, and nodes whose agents are given the cluster's whole URL
/// list, in one test dir (each node in `DIR/<id>`, the servers in `DIR/cluster/nI`); stopped on
/// drop, agents first.
struct ClusterFleet {
    // Field order is drop order.
    nodes: Vec<NodeFixture>,
    /// A client of the cluster (any server), which every node's fixture shares.
    nc: Client,
    /// Held for its drop, like `dir`; the nodes' haproxy send to it.
    #[allow(dead_code)]
    backend: Backend,
    cluster: NatsCluster,
    #[allow(dead_code)]
    dir: TestDir,
}

impl ClusterFleet {
    /// Starts the cluster and one agent per id with `nats.stream_replicas = replicas` and 1 s
    /// heartbeats, each further built by `configure` (a builder with its id, dir, the cluster's
    /// URLs, the shared client and backend); waits until every node serves.
    async fn start<'a, S: AsRef<str>>(
        ids: &[S],
        replicas: usize,
        mut configure: impl FnMut(&str, NodeFixtureBuilder<'a>) -> NodeFixtureBuilder<'a>,
    ) -> ClusterFleet {
        let dir = TestDir::new();
        let cluster = blocking({
            let at = dir.join("cluster");
            move || NatsCluster::start(&at)
        })
        .await
        .expect("start the 3-server nats cluster");
        let backend = Backend::start().expect("start the demo backend");
        let nc = nats_client(&cluster.url_list(), T).await;
        let mut nodes = Vec::with_capacity(ids.len());
        for id in ids {
            let id = id.as_ref();
            let builder = NodeFixture::builder()
                .node_id(id)
                .timeout(T)
                .dir(dir.join(id))
                .nats_url(&cluster.url_list())
                .client(nc.clone())
                .backend(Some(backend.addr()))
                .agent(move |c| {
                    c.set("nats", "stream_replicas", &replicas.to_string());
                    c.set_str("nats", "heartbeat", "1s");
                });
            nodes.push(configure(id, builder).spawn().await);
        }
        let fleet = ClusterFleet {
            nodes,
            nc,
            backend,
            cluster,
            dir,
        };
        futures::future::join_all(fleet.nodes.iter().map(NodeFixture::wait_serving)).await;
        fleet
    }

    fn node(&self, id: &str) -> &NodeFixture {
        self.nodes
            .iter()
            .find(|n| n.id() == id)
            .unwrap_or_else(|| panic!("no node {id} in the fleet"))
    }

    /// Kills server `i` of the cluster (SIGKILL).
    fn kill(&mut self, i: usize) {
        self.cluster
            .kill(i)
            .unwrap_or_else(|e| panic!("kill nats-server n{i}: {e:#}"));
    }

    /// Starts server `i` again and waits until the cluster agrees on a meta leader.
    async fn start_again(&mut self, i: usize) {
        // The cluster's waits are blocking; the agents' clients keep running meanwhile.
        tokio::task::block_in_place(|| self.cluster.start_again(i))
            .unwrap_or_else(|e| panic!("start nats-server n{i} again: {e:#}"));
    }

    /// The server that leads `stream` now.
    async fn stream_leader(&mut self, stream: &str) -> usize {
        tokio::task::block_in_place(|| self.cluster.wait_stream_leader(stream, T))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// Waits until one more of `node`'s reloads is done than when called: the server is killed with
/// that batch's first reload behind it and the rest still to come.
async fn first_of_the_batch_reloaded(node: &NodeFixture) {
    let before = node.events.count(|e| e.kind() == "reloaded");
    node.events.wait_n("reloaded", before + 1, |_| true).await;
}

/// Waits until `node`'s `agent_started` event is in EBB_EVENTS.
async fn agent_started_in_stream(node: &NodeFixture, nc: &Client) {
    let started = node.events.wait_kind("agent_started", |_| true).await;
    let id = started.msg_id.clone().expect("Msg-Id");
    wait_until_async(T, "agent_started in EBB_EVENTS", || async {
        stream_messages(nc, "EBB_EVENTS")
            .await
            .iter()
            .any(|(_, m, _)| m.as_deref() == Some(id.as_str()))
    })
    .await;
}

/// The replicas `stream` was made with, once it exists.
async fn stream_replicas(nc: &Client, stream: &str) -> usize {
    // A stream being created answers no STREAM.INFO until it has a leader: ask again soon.
    let mut js = jetstream::new(nc.clone());
    js.set_timeout(Duration::from_secs(2));
    wait_for_async(T, &format!("stream {stream}"), || {
        let js = js.clone();
        async move {
            let s = js.get_stream(stream).await.ok()?;
            Some(s.cached_info().config.num_replicas)
        }
    })
    .await
}

/// Sends `reload` with `request_id` to `node`; sent once more, with the same id, when no reply
/// came in time (the server that carried it was killed): the node acts once and replays its
/// reply. Returns the reply's result.
async fn reload(nc: &Client, node: &str, request_id: &str) -> Value {
    let subject = format!("ebb.node.{node}.reload");
    let body = json!({"request_id": request_id}).to_string();
    for attempt in 1..=2 {
        match tokio::time::timeout(
            COMMAND_TIMEOUT,
            nc.request(subject.clone(), body.clone().into()),
        )
        .await
        {
            Ok(Ok(msg)) => {
                let reply: Value = serde_json::from_slice(&msg.payload)
                    .unwrap_or_else(|e| panic!("reply to {request_id} is not JSON: {e}"));
                assert_eq!(reply["ok"], true, "reload {request_id} failed: {reply}");
                return reply["result"].clone();
            }
            Ok(Err(e)) if attempt == 1 => eprintln!("reload {request_id}: {e}; sending again"),
            Err(_) if attempt == 1 => eprintln!("reload {request_id}: no reply; sending again"),
            Ok(Err(e)) => panic!("reload {request_id}, sent twice: {e}"),
            Err(_) => panic!("reload {request_id}, sent twice: no reply in {COMMAND_TIMEOUT:?}"),
        }
    }
    unreachable!("the second attempt returns or panics")
}

/// The `(seq, Msg-Id)` of every message in the events stream from boot `boot_id`, in stream
/// order.
async fn boot_in_stream(nc: &Client, boot_id: &str) -> Vec<(u64, String)> {
    stream_messages(nc, "EBB_EVENTS")
        .await
        .into_iter()
        .filter(|(_, _, body)| body["boot_id"] == boot_id)
        .map(|(_, id, body)| (body["seq"].as_u64().unwrap_or(0), id.unwrap_or_default()))
        .collect()
}

/// [`boot_in_stream`] once it satisfies `enough`, asking again while the stream is between
/// leaders (it answers nothing then).
async fn boot_stored_once(
    nc: &Client,
    boot_id: &str,
    what: &str,
    enough: impl Fn(&[(u64, String)]) -> bool,
) -> Vec<(u64, String)> {
    wait_for_async(T, what, || async {
        let stored = tokio::time::timeout(Duration::from_secs(5), boot_in_stream(nc, boot_id))
            .await
            .ok()?;
        enough(&stored).then_some(stored)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// (a) A cluster: the stream and bucket get their 3 replicas, and nothing is said
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_the_stream_and_bucket_have_three_replicas_and_no_warning() {
    let fleet = ClusterFleet::start(&["node-1"], 3, |_, b| {
        // The array form of nats.url, which the agent joins into the same list.
        b.agent(|c| {
            let urls: Vec<String> = c
                .get("nats", "url")
                .and_then(|v| serde_json::from_str::<String>(v).ok())
                .expect("nats.url")
                .split(',')
                .map(toml_string)
                .collect();
            c.set("nats", "url", &format!("[{}]", urls.join(", ")));
        })
    })
    .await;
    let node = fleet.node("node-1");
    assert_eq!(stream_replicas(&fleet.nc, "EBB_EVENTS").await, 3);
    assert_eq!(stream_replicas(&fleet.nc, "KV_ebb_nodes").await, 3);
    agent_started_in_stream(node, &fleet.nc).await;
    let status = node.status().await;
    let w = warnings(&status);
    assert!(
        !w.iter().any(|w| w.contains("replica")),
        "no replica warning: {w:?}"
    );
    let log = node.agent.log_text();
    assert!(
        log.contains("created JetStream stream EBB_EVENTS with 3 replica(s)"),
        "{log}"
    );
    assert!(!log.contains("nats.stream_replicas is 3"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// (b) One plain server: events flow through a 1-replica stream, and the shortfall is said
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_server_gets_one_replica_and_the_shortfall_is_said() {
    let node = NodeFixture::builder()
        .timeout(T)
        .agent(|c| {
            c.set("nats", "stream_replicas", "3");
            c.set_str("nats", "heartbeat", "1s");
        })
        .start()
        .await;
    agent_started_in_stream(&node, &node.nc).await;
    assert_eq!(stream_replicas(&node.nc, "EBB_EVENTS").await, 1);
    assert_eq!(stream_replicas(&node.nc, "KV_ebb_nodes").await, 1);
    let short = "has 1 replica(s) where nats.stream_replicas is 3";
    let status = node
        .wait_status("both shortfalls in the warnings", |s| {
            warnings(s).iter().filter(|w| w.contains(short)).count() == 2
        })
        .await;
    let w = warnings(&status);
    for stream in ["EBB_EVENTS", "KV_ebb_nodes"] {
        assert!(
            w.iter()
                .any(|w| w.contains(&format!("stream {stream} {short}"))
                    && w.contains("not clustered")
                    && w.contains("nats.stream_replicas = 1")),
            "{stream}: {w:?}"
        );
    }
    // Said once each in the log, at warn level.
    let said: Vec<Value> = node
        .agent
        .log_lines()
        .into_iter()
        .filter(|l| log_message(l).is_some_and(|m| m.contains(short)))
        .collect();
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(said.iter().all(|l| l["level"] == "WARN"), "{said:?}");
}

// ---------------------------------------------------------------------------------------------
// (c) Servers killed while the node emits events: every event of the boot in the stream, once
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_stream_exactly_once_while_servers_are_killed() {
    let mut fleet = ClusterFleet::start(&["node-1"], 3, |_, b| b).await;
    let nc = fleet.nc.clone();
    let boot_id = fleet.node("node-1").status().await["boot_id"]
        .as_str()
        .expect("boot_id")
        .to_owned();
    assert_eq!(stream_replicas(&nc, "EBB_EVENTS").await, 3);
    let mut n = 0;
    let mut reloads = |count: usize| {
        let nc = nc.clone();
        let first = n;
        n += count;
        tokio::spawn(async move {
            for i in first..first + count {
                reload(&nc, "node-1", &format!("r-{i}")).await;
            }
        })
    };
    reloads(3).await.expect("reloads before");

    // The stream leader's server goes while reloads run.
    let leader = fleet.stream_leader("EBB_EVENTS").await;
    let running = reloads(6);
    first_of_the_batch_reloaded(fleet.node("node-1")).await;
    fleet.kill(leader);
    running.await.expect("reloads while the leader is gone");
    fleet.start_again(leader).await;

    // Then the server the agent is connected to.
    let (agent_server, _) = wait_for_async(T, "the agent's server", || {
        let found = tokio::task::block_in_place(|| fleet.cluster.agent_server());
        async move { found }
    })
    .await;
    let running = reloads(6);
    first_of_the_batch_reloaded(fleet.node("node-1")).await;
    fleet.kill(agent_server);
    running
        .await
        .expect("reloads while the agent's server is gone");
    fleet.start_again(agent_server).await;
    let last = reload(&nc, "node-1", "r-last").await;
    let last_id = last["reload_id"].clone();

    // The node's events reach the stream: every seq of the boot once, from 1, in order, at
    // least up to the last reload's.
    let node = fleet.node("node-1");
    let last_seq = node
        .events
        .wait_kind("reloaded", |b| b["reload_id"] == last_id)
        .await
        .seq();
    let stored = boot_stored_once(&nc, &boot_id, "the boot's events in EBB_EVENTS", |stored| {
        stored.iter().any(|(seq, _)| *seq >= last_seq)
    })
    .await;
    let seqs: Vec<u64> = stored.iter().map(|(seq, _)| *seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "seq 1..N, no gap, no duplicate");
    let mut ids: Vec<&String> = stored.iter().map(|(_, id)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), stored.len(), "each Msg-Id once");
    assert!(
        node.agent.log_text().contains("nats: connected"),
        "the agent reconnected"
    );
    let status = node
        .wait_status("an empty outbox", |s| s["outbox_depth"] == 0)
        .await;
    assert!(
        !warnings(&status).iter().any(|w| w.contains("core NATS")),
        "never fell back to core NATS: {status}"
    );
}

// ---------------------------------------------------------------------------------------------
// (d) The agent's server killed: the replicas it held are said to be missing, by name
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_gone_is_named_in_the_replica_warning() {
    let mut fleet = ClusterFleet::start(&["node-1"], 3, |_, b| b).await;
    assert_eq!(stream_replicas(&fleet.nc, "EBB_EVENTS").await, 3);
    assert_eq!(stream_replicas(&fleet.nc, "KV_ebb_nodes").await, 3);
    let (gone, _) = wait_for_async(T, "the agent's server", || {
        let found = tokio::task::block_in_place(|| fleet.cluster.agent_server());
        async move { found }
    })
    .await;
    fleet.kill(gone);
    let name = fleet.cluster.name(gone).to_owned();
    // The agent reconnects, and asks for the replicas once the cluster has settled.
    let missing = format!("has 2 of 3 replicas current (not: {name})");
    let status = fleet
        .node("node-1")
        .wait_status(&format!("warnings that {name} is missing"), |s| {
            warnings(s).iter().filter(|w| w.contains(&missing)).count() == 2
        })
        .await;
    let w = warnings(&status);
    for stream in ["EBB_EVENTS", "KV_ebb_nodes"] {
        assert!(
            w.iter()
                .any(|w| w.starts_with(&format!("stream {stream} ")) && w.contains(&missing)),
            "{stream}: {w:?}"
        );
    }
    assert!(
        fleet.node("node-1").agent.log_text().contains(&missing),
        "said in the log too"
    );
    fleet.start_again(gone).await;
}

// ---------------------------------------------------------------------------------------------
// (e) A rolling reload through `ebb ctl` loses the server most agents use: it completes, and each
//     node's events are in the stream once
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_losing_the_server_most_agents_use_and_every_event_is_stored_once() {
    let ids: Vec<String> = (1..=6).map(|i| format!("node-{i}")).collect();
    let mut fleet = ClusterFleet::start(&ids, 3, |_, b| b).await;
    let nc = fleet.nc.clone();
    let mut boots = Vec::new();
    for node in &fleet.nodes {
        let status = node.status().await;
        boots.push((
            node.id().to_string(),
            status["boot_id"].as_str().unwrap_or("").to_string(),
        ));
    }
    // ctl knows the fleet from KV: wait until every record is there (each agent writes its own
    // once the replicated bucket answers it).
    let client = ebb_sdk::client::Client::new(nc.clone(), "ebb");
    wait_until_async(T, "every node's record in KV", || {
        let client = client.clone();
        async move { client.node_records().await.len() == 6 }
    })
    .await;
    let url = fleet.cluster.url_list();
    let (victim, agents) = wait_for_async(T, "the server most agents use", || {
        let found = tokio::task::block_in_place(|| fleet.cluster.agent_server());
        async move { found }
    })
    .await;

    let reloaded = EventTap::subscribe(&nc, "ebb.event.*.reloaded").await;
    let rollout = tokio::spawn({
        let url = url.clone();
        async move {
            let args = [
                "--nats",
                url.as_str(),
                "reload",
                "--all",
                "--max-parallel",
                "2",
                "--json",
                "--timeout",
                "10s",
            ];
            run_ctl(&args, &[], Duration::from_secs(300)).await
        }
    });
    // Mid-rollout: once the first node reloaded, the others are still to come.
    reloaded.wait("the first node reloaded", |_| true).await;
    fleet.kill(victim);
    let run = rollout.await.expect("the rollout's task");
    assert_eq!(
        run.code, 0,
        "the rollout completes although server n{victim} ({agents} agents on it) died: {run:?}"
    );
    let results: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("ebb ctl printed no JSON ({e}): {run:?}"));
    let results = results.as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 6, "{run:?}");
    for r in &results {
        assert_eq!(r["outcome"], "reloaded", "{r}");
    }

    fleet.start_again(victim).await;
    for (node, boot_id) in &boots {
        let fixture = fleet.node(node);
        fixture
            .wait_status("an empty outbox", |s| s["outbox_depth"] == 0)
            .await;
        // Every event of the boot, once, seq 1..N; the rollout's reload among them.
        let what = format!("{node}'s reloaded event in the stream");
        let stored = boot_stored_once(&nc, boot_id, &what, |stored| stored.len() >= 2).await;
        let seqs: Vec<u64> = stored.iter().map(|(seq, _)| *seq).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{node}: seq 1..N, no gap, no duplicate");
        let reloads = stream_messages(&nc, "EBB_EVENTS")
            .await
            .into_iter()
            .filter(|(_, _, b)| b["boot_id"] == boot_id.as_str() && b["kind"] == "reloaded")
            .count();
        assert!(reloads >= 1, "{node}: its reloaded event is in the stream");
    }
}

// ---------------------------------------------------------------------------------------------
// (f) The bucket's leader is lost: no record goes, a node's new state is written, ctl lists all
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_records_outlive_the_bucket_leader_and_a_drain_is_recorded_without_it() {
    let ids = ["node-1", "node-2", "node-3"];
    let mut fleet = ClusterFleet::start(&ids, 3, |_, b| b).await;
    let client = ebb_sdk::client::Client::new(fleet.nc.clone(), "ebb");
    let states = || {
        let client = client.clone();
        async move {
            let mut records: Vec<(String, NodeState)> = client
                .node_records()
                .await
                .into_iter()
                .map(|r| (r.node, r.state))
                .collect();
            records.sort_by(|a, b| a.0.cmp(&b.0));
            records
        }
    };
    let serving = |ids: &[&str]| -> Vec<(String, NodeState)> {
        ids.iter()
            .map(|n| (n.to_string(), NodeState::Serving))
            .collect()
    };
    wait_until_async(T, "every node's record in KV", || async {
        states().await == serving(&ids)
    })
    .await;
    assert_eq!(stream_replicas(&fleet.nc, "KV_ebb_nodes").await, 3);

    let leader = fleet.stream_leader("KV_ebb_nodes").await;
    fleet.kill(leader);
    let url = fleet.cluster.url_list();
    let run = run_ctl(
        &[
            "--nats",
            url.as_str(),
            "drain",
            "--node",
            "node-2",
            "--wait",
            "1m",
            "--json",
        ],
        &[],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(run.code, 0, "drain node-2 while n{leader} is gone: {run:?}");
    // A new leader takes node-2's new state; no record of the others is lost. Records of nodes
    // whose server died expire after three heartbeats unless their agents write them again.
    wait_until_async(T, "node-2 drained in KV, the others serving", || async {
        let want = [
            ("node-1".to_string(), NodeState::Serving),
            ("node-2".to_string(), NodeState::Drained),
            ("node-3".to_string(), NodeState::Serving),
        ];
        states().await == want
    })
    .await;
    let run = run_ctl(
        &["--nats", url.as_str(), "status", "--all", "--json"],
        &[],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(run.code, 0, "status --all while n{leader} is gone: {run:?}");
    let out: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("ebb ctl printed no JSON ({e}): {run:?}"));
    let listed: Vec<&str> = out["replies"]
        .as_array()
        .map(|r| r.iter().filter_map(|r| r["node"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(listed, ids, "{out}");
    fleet.start_again(leader).await;
}
