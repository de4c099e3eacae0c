//! The publisher end to end: what reaches NATS when the events stream goes away, when the outbox
//! on disk is torn, when KV is missing at start, when the server refuses an event for good; and
//! where heartbeats go. A real nats-server with JetStream, the real `ebb agent` with its haproxy,
//! plain async-nats clients that read the stream and KV the way an operator would.

mod support;

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions};
use serde_json::{json, Value};
use support::*;

/// Default timeout of every wait. Generous: the tests share a 2-core machine.
const T: Duration = Duration::from_secs(30);
/// How soon an event must reach core subscribers once the stream is gone: no long retry.
const AT_ONCE: Duration = Duration::from_secs(5);

/// A node with 1 s heartbeats, on the fixture's own nats-server unless `build` says otherwise.
fn node<'a>() -> NodeFixtureBuilder<'a> {
    NodeFixture::builder().timeout(T).agent(|c| {
        c.set_str("nats", "heartbeat", "1s");
    })
}

/// The Msg-Ids in `stream`, in stream order.
async fn stream_ids(nc: &Client, stream: &str) -> Vec<String> {
    stream_messages(nc, stream)
        .await
        .into_iter()
        .filter_map(|(_, id, _)| id)
        .collect()
}

/// Waits until the event with Msg-Id `id` is stored in EBB_EVENTS.
async fn wait_in_stream(nc: &Client, id: &str, what: &str) {
    wait_for_async(T, what, || async move {
        stream_ids(nc, "EBB_EVENTS")
            .await
            .iter()
            .any(|stored| stored == id)
            .then_some(())
    })
    .await;
}

/// The node's record in KV bucket `ebb_nodes`, if there is one.
async fn kv_record(nc: &Client, node: &str) -> Option<Value> {
    let js = jetstream::new(nc.clone());
    let kv = js.get_key_value("ebb_nodes").await.ok()?;
    let value = kv.get(node).await.ok()??;
    serde_json::from_slice(&value).ok()
}

async fn reload(node: &NodeFixture) -> Value {
    let r = node.ok("reload", json!({})).await;
    let id = r["reload_id"].clone();
    node.events
        .wait_kind("reloaded", |b| b["reload_id"] == id)
        .await
        .body
}

// ---------------------------------------------------------------------------------------------
// 1. The events stream deleted while the agent runs (recreated by ebb, or by the operator)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_on_after_the_stream_is_deleted_and_land_in_it_again() {
    let node = node().start().await;
    let nc = node.nc.clone();
    let started = node.events.wait_kind("agent_started", |_| true).await;
    let started_id = started.msg_id.clone().expect("Msg-Id");
    wait_in_stream(&nc, &started_id, "agent_started in EBB_EVENTS").await;

    let js = jetstream::new(nc.clone());
    js.delete_stream("EBB_EVENTS")
        .await
        .expect("delete the events stream");
    let before = node.events.len();

    // Later events reach core subscribers at once, one reload after another.
    let r1 = node.ok("reload", json!({})).await;
    let id1 = r1["reload_id"].clone();
    node.events
        .wait_for("the first reloaded after the deletion", AT_ONCE, |e| {
            e.kind() == "reloaded" && e.body["reload_id"] == id1
        })
        .await;
    let r2 = node.ok("reload", json!({})).await;
    let id2 = r2["reload_id"].clone();
    node.events
        .wait_for("the second reloaded after the deletion", AT_ONCE, |e| {
            e.kind() == "reloaded" && e.body["reload_id"] == id2
        })
        .await;

    // And they are in the stream again (ebb recreated it), in order, each once.
    // A core subscriber may see an event twice (the publish that found no stream, then the one
    // into the recreated stream): its Msg-Id tells.
    let mut after: Vec<String> = Vec::new();
    for id in node.events.all()[before..]
        .iter()
        .filter_map(|e| e.msg_id.clone())
    {
        if !after.contains(&id) {
            after.push(id);
        }
    }
    let last = after.last().cloned().expect("events after the deletion");
    let stored = wait_for_async(T, "the later events in the recreated stream", || {
        let nc = nc.clone();
        let last = last.clone();
        async move {
            let mut ids = stream_ids(&nc, "EBB_EVENTS").await;
            // Events that came after the tap was read (a worker's exit) are not compared.
            let end = ids.iter().position(|id| *id == last)?;
            ids.truncate(end + 1);
            Some(ids)
        }
    })
    .await;
    assert_eq!(
        stored, after,
        "the recreated stream holds every later event, in order, none twice"
    );
    let info = js
        .get_stream("EBB_EVENTS")
        .await
        .expect("the recreated stream")
        .cached_info()
        .config
        .clone();
    assert_eq!(info.max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(info.duplicate_window, Duration::from_secs(24 * 3600));
}

/// A nats-server (JetStream on) where user `agent` may publish anything but `deny`, and user
/// `admin` anything at all.
fn nats_denying(dir: &Path, deny: &str) -> NatsServer {
    NatsServer::start_with_config(
        dir,
        &format!(
            r#"authorization {{
  users: [
    {{ user: "agent", password: "agent-pw",
      permissions: {{ publish: {{ allow: [">"], deny: ["{deny}"] }}, subscribe: ">" }} }}
    {{ user: "admin", password: "admin-pw" }}
  ]
}}
"#
        ),
    )
    .expect("start nats-server")
}

/// A serving node in `dir/node` whose agent connects to `nats` as the restricted user `agent`;
/// the fixture itself talks through `nc`.
async fn node_as_agent(nats: &NatsServer, nc: &Client, dir: &TestDir) -> NodeFixture {
    node()
        .nats_url(&nats.url())
        .client(nc.clone())
        .dir(dir.join("node"))
        .agent(|c| {
            c.set_str("nats", "user", "agent")
                .set_str("nats", "password", "agent-pw");
        })
        .start()
        .await
}

async fn admin_client(nats: &NatsServer) -> Client {
    ConnectOptions::with_user_and_password("admin".into(), "admin-pw".into())
        .request_timeout(Some(T))
        .connect(nats.url())
        .await
        .expect("connect as admin")
}

fn events_stream_config(max_age: Duration) -> stream::Config {
    stream::Config {
        name: "EBB_EVENTS".into(),
        subjects: vec!["ebb.event.>".into()],
        max_age,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_out_as_core_messages_while_the_stream_is_missing_then_to_it_again() {
    let dir = TestDir::new();
    let nats = nats_denying(&dir.join("nats"), "$JS.API.STREAM.CREATE.EBB_EVENTS");
    let nc = admin_client(&nats).await;
    let js = jetstream::new(nc.clone());
    // The operator's stream, with its own max_age: used as it is, and the difference logged.
    js.create_stream(events_stream_config(Duration::from_secs(3600)))
        .await
        .expect("create the events stream");
    let node = node_as_agent(&nats, &nc, &dir).await;
    let started = node.events.wait_kind("agent_started", |_| true).await;
    let started_id = started.msg_id.clone().expect("Msg-Id");
    wait_in_stream(&nc, &started_id, "agent_started in EBB_EVENTS").await;
    let info = js.get_stream("EBB_EVENTS").await.expect("the stream");
    assert_eq!(
        info.cached_info().config.max_age,
        Duration::from_secs(3600),
        "the operator's stream is not rewritten"
    );
    let log = node.agent.log_text();
    assert!(
        log.contains("has max_age 1h where nats.events_max_age is 7days"),
        "the agent logs what differs:\n{log}"
    );

    // The stream goes, and the agent may not recreate it: events flow as core messages.
    js.delete_stream("EBB_EVENTS")
        .await
        .expect("delete the stream");
    let first = reload(&node).await;
    node.wait_status("a warning that events bypass the stream", |s| {
        warnings(s).iter().any(|w| w.contains("core NATS messages"))
    })
    .await;
    let second = reload(&node).await;
    assert_eq!(
        second["seq"].as_u64(),
        node.events
            .all()
            .iter()
            .find(|e| e.body["reload_id"] == second["reload_id"])
            .map(|e| e.seq()),
    );
    assert!(first["seq"].as_u64() < second["seq"].as_u64());

    // The operator brings it back: the agent finds it again, and later events land in it.
    js.create_stream(events_stream_config(Duration::from_secs(7 * 24 * 3600)))
        .await
        .expect("recreate the events stream");
    node.wait_status("the stream in use again", |s| {
        !warnings(s).iter().any(|w| w.contains("core NATS messages"))
    })
    .await;
    let before = stream_ids(&nc, "EBB_EVENTS").await;
    let third = reload(&node).await;
    let id = format!(
        "{NODE_ID}.{}.{}",
        third["boot_id"].as_str().expect("boot_id"),
        third["seq"].as_u64().expect("seq")
    );
    let stored = wait_for_async(T, "the later reload in EBB_EVENTS", || {
        let nc = nc.clone();
        let id = id.clone();
        async move {
            let ids = stream_ids(&nc, "EBB_EVENTS").await;
            ids.contains(&id).then_some(ids)
        }
    })
    .await;
    let mut unique = stored.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), stored.len(), "none twice: {stored:?}");
    let seqs: Vec<u64> = stored
        .iter()
        .filter_map(|id| id.rsplit('.').next()?.parse().ok())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {stored:?}");
    assert!(stored.len() > before.len());
}

// ---------------------------------------------------------------------------------------------
// 2. The outbox: torn on disk, and kept across a killed agent
// ---------------------------------------------------------------------------------------------

fn old_event(seq: u64, drain_id: &str) -> Value {
    json!({
        "v": 1, "kind": "undrained", "node": NODE_ID, "boot_id": "boot-before-the-crash",
        "seq": seq, "time": "2026-01-01T00:00:00.000Z", "drain_id": drain_id,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_outbox_is_read_past_its_bad_lines() {
    let node = node()
        .prepare(|_, config| {
            let state_dir = config.state_dir();
            std::fs::create_dir_all(&state_dir).expect("create state_dir");
            let text = format!(
                "{}\nthis is not an event \u{1}\n{}\n{{\"v\":1,\"kind\":\"undr",
                old_event(1, "first"),
                old_event(2, "second")
            );
            std::fs::write(state_dir.join("outbox.jsonl"), text).expect("write the outbox");
        })
        .start()
        .await;
    let first = node
        .events
        .wait_kind("undrained", |b| b["drain_id"] == "first")
        .await;
    let second = node
        .events
        .wait_kind("undrained", |b| b["drain_id"] == "second")
        .await;
    assert_eq!(
        first.msg_id.as_deref(),
        Some(format!("{NODE_ID}.boot-before-the-crash.1").as_str()),
        "sent late with its original Msg-Id"
    );
    assert_eq!(second.body["seq"], 2);
    let status = node
        .wait_status("the outbox emptied", |s| s["outbox_depth"] == 0)
        .await;
    assert!(
        warnings(&status)
            .iter()
            .any(|w| w.contains("2 unreadable line(s)")),
        "status says what was skipped: {status}"
    );
    let log = node.agent.log_text();
    assert!(
        log.contains("unreadable line") && log.contains("torn write"),
        "the agent logs what it skipped:\n{log}"
    );
    // The agent's own events come after, numbered from 1 for its boot.
    let started = node.events.wait_kind("agent_started", |_| true).await;
    assert_eq!(started.body["seq"], 1);
}

/// Every event line in the outbox logs of `state_dir`.
fn outbox_text(state_dir: &Path) -> String {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return String::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("outbox.") && name.ends_with(".jsonl")
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_made_while_nats_is_away_survives_a_killed_agent() {
    let mut node = node().start().await;
    let nc = node.nc.clone();
    let boot_id = node.status().await["boot_id"]
        .as_str()
        .expect("boot_id")
        .to_string();
    node.ok("drain", json!({"drain_id": "away", "min_period_ms": 1500}))
        .await;
    node.nats()
        .expect("the fixture's nats-server")
        .stop()
        .expect("stop nats-server");
    let state_dir = node.config.state_dir();
    wait_until(T, "the drained event in the outbox on disk", || {
        outbox_text(&state_dir)
            .lines()
            .any(|l| l.contains("\"kind\":\"drained\"") && l.contains("\"away\""))
    });
    node.agent.kill9().expect("kill -9 the agent");
    node.nats()
        .expect("the fixture's nats-server")
        .start_again()
        .expect("start nats-server again");
    node.restart_agent();

    // Sent by the next agent, with the identity the first one gave it.
    let js = jetstream::new(nc.clone());
    let drained = wait_for_async(T, "the drained event in EBB_EVENTS", || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("EBB_EVENTS").await.ok()?;
            let last = stream.info().await.ok()?.state.last_sequence;
            for seq in 1..=last {
                let Ok(msg) = stream.get_raw_message(seq).await else {
                    continue;
                };
                let body: Value = serde_json::from_slice(&msg.payload).ok()?;
                if body["kind"] == "drained" && body["drain_id"] == "away" {
                    let id = msg
                        .headers
                        .get("Nats-Msg-Id")
                        .map(|v| v.as_str().to_string());
                    return Some((body, id));
                }
            }
            None
        }
    })
    .await;
    let (body, msg_id) = drained;
    assert_eq!(
        body["boot_id"],
        boot_id.as_str(),
        "the first agent's boot: {body}"
    );
    let seq = body["seq"].as_u64().expect("seq");
    assert_eq!(msg_id, Some(format!("{NODE_ID}.{boot_id}.{seq}")));
    node.wait_status("the outbox emptied", |s| s["outbox_depth"] == 0)
        .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Heartbeats
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_go_to_their_own_subject_and_kv_never_to_the_stream() {
    let node = node().start().await;
    let nc = node.nc.clone();
    let beats = EventTap::subscribe(&nc, &format!("ebb.heartbeat.{NODE_ID}"))
        .await
        .with_timeout(T);
    let status = node.status().await;
    let boot_id = status["boot_id"].as_str().expect("boot_id").to_string();
    beats
        .wait_n("heartbeat", 2, |b| b["state"] == "serving")
        .await;

    // A heartbeat carries the seq of the node's last event: after a reload, that of the old
    // worker's exit.
    let old_pid = node.serving_pid().await.expect("serving");
    reload(&node).await;
    let exited = node
        .events
        .wait_kind("worker_exited", |b| b["pid"] == old_pid)
        .await;
    let beat = beats
        .wait("a heartbeat after the reload", |e| {
            e.kind() == "heartbeat" && e.seq() >= exited.seq()
        })
        .await;
    let b = &beat.body;
    assert_eq!(beat.subject, format!("ebb.heartbeat.{NODE_ID}"));
    assert_eq!(b["v"], 1);
    assert_eq!(b["node"], NODE_ID);
    assert_eq!(b["boot_id"], boot_id.as_str());
    assert_eq!(b["state"], "serving");
    assert!(b["time"].is_string(), "{b}");
    let mut keys: Vec<&str> = b
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["boot_id", "kind", "node", "seq", "state", "time", "v"],
        "the heartbeat's shape: {b}"
    );
    assert_eq!(beat.msg_id, None, "a heartbeat has no Msg-Id of its own");
    let max_seq = node.events.all().iter().map(|e| e.seq()).max();
    assert_eq!(Some(beat.seq()), max_seq, "the seq of the last event: {b}");

    // Events take every seq: none is left for heartbeats, none is missing.
    let seqs: Vec<u64> = node.events.all().iter().map(|e| e.seq()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(node.events.count(|e| e.kind() == "heartbeat"), 0);

    // The stream holds the events and no heartbeat.
    let stored = stream_messages(&nc, "EBB_EVENTS").await;
    assert!(
        stored
            .iter()
            .all(|(subject, _, body)| body["kind"] != "heartbeat"
                && !subject.contains("heartbeat")),
        "no heartbeat in EBB_EVENTS: {stored:?}"
    );
    assert!(stored.len() >= seqs.len(), "{stored:?}");

    // KV: the record is rewritten at each heartbeat.
    let first = wait_for_async(T, "the node record in KV", || kv_record(&nc, NODE_ID)).await;
    assert_eq!(first["state"], "serving");
    assert_eq!(first["heartbeat_ms"], 1000);
    let at = first["heartbeat_at"]
        .as_str()
        .expect("heartbeat_at")
        .to_string();
    wait_for_async(T, "a newer heartbeat_at in KV", || {
        let nc = nc.clone();
        let at = at.clone();
        async move {
            let r = kv_record(&nc, NODE_ID).await?;
            (r["heartbeat_at"].as_str()? != at).then_some(())
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. KV missing at start
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_record_appears_once_kv_can_be_had_without_a_restart() {
    let dir = TestDir::new();
    let nats = NatsServer::start(&dir.join("nats")).expect("start nats-server");
    let nc = nats_client(&nats.url(), T).await;
    let js = jetstream::new(nc.clone());
    // A stream that holds the bucket's subjects: ebb cannot create the bucket while it exists.
    js.create_stream(stream::Config {
        name: "SQUATTER".into(),
        subjects: vec!["$KV.ebb_nodes.>".into()],
        ..Default::default()
    })
    .await
    .expect("create the squatting stream");

    let node = node()
        .nats_url(&nats.url())
        .client(nc.clone())
        .dir(dir.join("node"))
        .start()
        .await;
    let status = node
        .wait_status("a warning about KV", |s| {
            warnings(s).iter().any(|w| w.contains("not kept in KV"))
        })
        .await;
    assert_eq!(status["state"], "serving", "the node serves all the same");
    assert!(kv_record(&nc, NODE_ID).await.is_none());

    js.delete_stream("SQUATTER")
        .await
        .expect("delete the squatter");
    let record = wait_for_async(T, "the node record in KV", || kv_record(&nc, NODE_ID)).await;
    assert_eq!(record["node"], NODE_ID);
    assert_eq!(record["state"], "serving");
    node.wait_status("the KV warning gone", |s| {
        !warnings(s).iter().any(|w| w.contains("KV"))
    })
    .await;
    assert!(node.agent.log_text().contains("kept in KV again"));
}

// ---------------------------------------------------------------------------------------------
// 5. An event the server refuses for good
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_server_refuses_is_set_aside_and_later_events_flow() {
    let dir = TestDir::new();
    let nats = nats_denying(&dir.join("nats"), "ebb.event.*.undrained");
    let nc = admin_client(&nats).await;
    let node = node_as_agent(&nats, &nc, &dir).await;
    node.ok("drain", json!({"drain_id": "d1", "min_period_ms": 0}))
        .await;
    node.events.drained("d1").await;
    node.ok("undrain", json!({})).await;

    // The next event still goes out, though the one before it never can.
    let reloaded = reload(&node).await;
    let status = node
        .wait_status("the refusal in status, and nothing stuck behind it", |s| {
            warnings(s).iter().any(|w| w.contains("refused by NATS")) && s["outbox_depth"] == 0
        })
        .await;
    let warning = warnings(&status)
        .into_iter()
        .find(|w| w.contains("refused by NATS"))
        .unwrap_or_default();
    assert!(
        warning.starts_with("1 event(s)")
            && warning.contains("undrained")
            && warning.contains(&format!("ebb.event.{NODE_ID}.undrained"))
            && warning.contains("permission"),
        "the warning names the event, its subject and why: {warning}"
    );
    assert!(node.events.of_kind("undrained").is_empty());
    assert!(reloaded["seq"].as_u64().is_some());

    // Logged once, at error level, with its subject and Msg-Id.
    let boot_id = status["boot_id"].as_str().expect("boot_id");
    let msg_id = warning
        .split_whitespace()
        .find(|w| w.starts_with(&format!("{NODE_ID}.{boot_id}.")))
        .unwrap_or_else(|| panic!("a Msg-Id in {warning}"))
        .to_string();
    let lines: Vec<Value> = node
        .agent
        .log_lines()
        .into_iter()
        .filter(|l| l["level"] == "ERROR" && log_message(l).is_some_and(|m| m.contains(&msg_id)))
        .collect();
    assert_eq!(lines.len(), 1, "one error line for {msg_id}: {lines:?}");
    let line = &lines[0];
    assert_eq!(line["subject"], format!("ebb.event.{NODE_ID}.undrained"));
    assert_eq!(line["msg_id"], msg_id.as_str());

    // And events keep flowing, into the stream too.
    let again = reload(&node).await;
    let id = format!(
        "{NODE_ID}.{boot_id}.{}",
        again["seq"].as_u64().expect("seq")
    );
    wait_in_stream(&nc, &id, "the later reload in EBB_EVENTS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_max_payload_is_set_aside_and_later_events_flow() {
    let dir = TestDir::new();
    let nats_dir = dir.join("nats");
    std::fs::create_dir_all(&nats_dir).expect("nats dir");
    let nats =
        NatsServer::start_with_config(&nats_dir, "max_payload: 1400\n").expect("start nats-server");
    let node = node()
        .nats_url(&nats.url())
        .dir(dir.join("node"))
        .start()
        .await;
    // The command (~1.3 KB, its fields at their limits) fits, the event that carries its reason
    // and requester besides its own fields does not.
    let big = node
        .ok(
            "reload",
            json!({"reason": "r".repeat(1024), "requester": "q".repeat(256)}),
        )
        .await;
    let status = node
        .wait_status("the oversized event in status, nothing stuck", |s| {
            warnings(s).iter().any(|w| w.contains("max_payload")) && s["outbox_depth"] == 0
        })
        .await;
    assert!(
        warnings(&status)
            .iter()
            .any(|w| w.contains(&format!("ebb.event.{NODE_ID}.reloaded"))),
        "{status}"
    );
    reload(&node).await;
    assert!(
        node.events
            .of_kind("reloaded")
            .iter()
            .all(|e| e.body["reload_id"] != big["reload_id"]),
        "the oversized event never went out"
    );
}
