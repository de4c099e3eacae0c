//! The bounds of the command path (docs/PROTOCOL.md, "Request bounds") end to end: oversized
//! fields and bodies, invalid request ids, reply subjects the agent must never publish to, a
//! retry after the ttl, and the bound on requests waiting for the node.
//!
//! A real nats-server, the real `ebb agent` with its own haproxy, the demo backend and plain
//! async-nats clients. Where a test shows that something does NOT happen, it first waits for a
//! positive sign that the agent handled the request (a later request on the same subscription
//! answered: requests are handled in arrival order), then watches for a bounded window.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use support::*;

/// Default timeout of every wait. Generous: the tests share a 2-core machine.
const T: Duration = Duration::from_secs(30);
/// How long a test watches for something that must not happen, once the agent has shown that it
/// handled the request. A reply goes out within milliseconds of the request.
const QUIET: Duration = Duration::from_secs(1);

async fn start_node<'a>(
    build: impl FnOnce(NodeFixtureBuilder<'a>) -> NodeFixtureBuilder<'a>,
) -> NodeFixture {
    build(NodeFixture::builder().timeout(T)).start().await
}

/// Checks a failure reply: `code`, the echoed `request_id`; returns the message.
fn error_message(reply: &Value, code: &str, request_id: Value) -> String {
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], code, "{reply}");
    assert_eq!(reply["request_id"], request_id, "{reply}");
    reply["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {reply}"))
        .to_owned()
}

fn rfc3339(t: SystemTime) -> String {
    ebb_sdk::time::format_rfc3339_millis(t)
}

// ---------------------------------------------------------------------------------------------
// 1. Oversized fields: refused, and the node's events keep flowing
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reason_is_refused_and_the_nodes_events_keep_flowing() {
    let node = start_node(|b| b).await;
    let max_payload = node.nc.server_info().max_payload;
    assert!(max_payload >= 1 << 20, "the default 1 MiB max_payload");

    // Just under the server's max_payload: far over the agent's 64 KiB.
    let huge = "x".repeat(max_payload - 200);
    let reply = node
        .command(
            "drain",
            json!({"request_id": "huge", "drain_id": "huge", "reason": huge}),
        )
        .await;
    let message = error_message(&reply, "invalid_request", json!("huge"));
    assert!(message.contains("65536"), "{message}");

    // Under 64 KiB, but over the reason's own bound.
    let long = "y".repeat(2000);
    let reply = node
        .command(
            "drain",
            json!({"request_id": "long", "drain_id": "long", "reason": long}),
        )
        .await;
    let message = error_message(&reply, "invalid_request", json!("long"));
    assert!(
        message.contains("reason") && message.contains("1024"),
        "{message}"
    );

    // A normal drain still produces its events, and it is the only drain.
    node.ok(
        "drain",
        json!({"drain_id": "after", "min_period_ms": 0, "reason": "kernel update"}),
    )
    .await;
    let drained = node.events.drained("after").await;
    assert_eq!(drained.body["reason"], "kernel update", "{}", drained.body);
    let started: Vec<Value> = node
        .events
        .of_kind("drain_started")
        .into_iter()
        .map(|e| e.body)
        .collect();
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0]["drain_id"], "after", "{started:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. An invalid request id: refused, named, not echoed
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_byte_request_id_is_refused_and_not_echoed() {
    let node = start_node(|b| b).await;
    let long = "r".repeat(300);
    for (verb, body) in [
        ("status", json!({"request_id": long})),
        ("drain", json!({"request_id": long, "min_period_ms": 0})),
    ] {
        let reply = node.command(verb, body).await;
        let message = error_message(&reply, "invalid_request", Value::Null);
        assert!(
            message.contains("request_id") && message.contains("128"),
            "{verb}: {message}"
        );
    }
    // The longest valid id passes and is echoed.
    let longest = "r".repeat(128);
    let reply = node.command("status", json!({"request_id": longest})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["request_id"], json!(longest));
    let status = node.status().await;
    assert_eq!(status["state"], "serving", "the refused drain did nothing");
}

// ---------------------------------------------------------------------------------------------
// 3. Reply subjects under the agent's prefix or the server's roots: dropped
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_is_published_to_the_agents_own_subjects_or_the_kv() {
    let node = start_node(|b| b).await;
    let nc = &node.nc;
    let forged_event = format!("ebb.event.{}.drained", node.id());
    let forged_kv = "$KV.ebb_nodes.forged".to_string();
    let mut watch = nc.subscribe(forged_kv.clone()).await.expect("subscribe");
    nc.flush().await.expect("flush");

    let subject = format!("ebb.node.{}.status", node.id());
    for i in 0..20 {
        for reply in [&forged_event, &forged_kv] {
            let body = json!({"request_id": format!("forge-{i}")}).to_string();
            nc.publish_with_reply(subject.clone(), reply.clone(), Bytes::from(body))
                .await
                .expect("publish");
        }
    }
    // Handled in order: once this one is answered, the forged ones were handled too.
    let reply = node.command("status", json!({"request_id": "after"})).await;
    assert_eq!(reply["ok"], true, "{reply}");

    let events = &node.events;
    let forged = tokio::time::timeout(QUIET, watch.next()).await;
    assert!(
        forged.is_err(),
        "a reply was published on {forged_kv}: {forged:?}"
    );
    let on_event = events.count(|e| e.subject == forged_event);
    assert_eq!(on_event, 0, "a reply was published on {forged_event}");

    // Nor did JetStream store one.
    let js = async_nats::jetstream::new(nc.clone());
    for (stream, subject) in [("KV_ebb_nodes", &forged_kv), ("EBB_EVENTS", &forged_event)] {
        let stream = js
            .get_stream(stream)
            .await
            .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
        let stored = stream.get_last_raw_message_by_subject(subject).await;
        assert!(stored.is_err(), "{subject} stored: {stored:?}");
    }

    // Logged, without flooding: one line per root for the 20 drops of each.
    let dropped: Vec<Value> = node
        .agent
        .log_lines()
        .into_iter()
        .filter(|l| log_message(l).is_some_and(|m| m.contains("reply subject is under")))
        .collect();
    assert_eq!(dropped.len(), 2, "{dropped:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. A retry after the ttl: the first reply, acted on once
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_ttl_gets_the_first_reply_and_acts_once() {
    let node = start_node(|b| b).await;
    let sent_at = rfc3339(SystemTime::now());
    let body = json!({
        "request_id": "r-ttl",
        "drain_id": "d-ttl",
        "min_period_ms": 600000,
        "sent_at": sent_at,
        "ttl_ms": 100,
    });
    let first = node.command("drain", body.clone()).await;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["result"]["already_draining"], false, "{first}");

    // Wait until a new request sent at the same time is expired.
    let mut probe = 0;
    wait_until_async(T, "a new request with that sent_at to expire", || {
        probe += 1;
        let body =
            json!({"request_id": format!("probe-{probe}"), "sent_at": sent_at, "ttl_ms": 100});
        let node = &node;
        async move { node.command("status", body).await["error"]["code"] == "expired" }
    })
    .await;

    let retry = node.command("drain", body).await;
    assert_eq!(retry, first, "the retry gets the first reply");

    // Acted once: one drain_started, up to the undrain's event.
    node.ok("undrain", json!({})).await;
    let (index, _) = node
        .events
        .wait_indexed("the undrained event", T, |e| e.kind() == "undrained")
        .await;
    let started = node.events.all()[..index]
        .iter()
        .filter(|e| e.kind() == "drain_started")
        .count();
    assert_eq!(started, 1);
}

// ---------------------------------------------------------------------------------------------
// 5. The bound on requests waiting for the node
// ---------------------------------------------------------------------------------------------

/// The agent's bound on requests waiting for the node (docs/PROTOCOL.md).
const MAX_IN_FLIGHT: usize = 256;

/// A haproxy that, once `DIR/hold` exists, waits for `DIR/gate` before it starts (after saying so
/// in `DIR/waiting`): a reload that takes as long as the test wants.
fn gated_haproxy(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("gated-haproxy");
    let d = dir.display();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e {d}/hold ]; then\n  touch {d}/waiting\n  \
             while [ ! -e {d}/gate ]; do sleep 0.01; done\nfi\nexec {} \"$@\"\n",
            haproxy_bin()
        ),
    )
    .expect("write the gated haproxy");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .expect("make it executable");
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_in_flight_bound_requests_are_refused_at_once() {
    let dir = TestDir::new();
    let node_dir = dir.join("node");
    std::fs::create_dir_all(&node_dir).expect("node dir");
    let node = start_node(|b| b.dir(&node_dir).haproxy_binary(gated_haproxy(&node_dir))).await;
    std::fs::write(node_dir.join("hold"), "").expect("hold");
    let subject = format!("ebb.node.{}.reload", node.id());

    // The first reload hangs in its launch; every later one waits for it.
    let first = tokio::spawn({
        let nc = node.nc.clone();
        let subject = subject.clone();
        async move { nc.request(subject, Bytes::new()).await }
    });
    let waiting_file = node_dir.join("waiting");
    wait_until_async(T, "the reload's haproxy to wait at the gate", || {
        let at_gate = waiting_file.exists();
        async move { at_gate }
    })
    .await;

    let extra = 44;
    let refused = Arc::new(AtomicUsize::new(0));
    let mut waiting = Vec::new();
    for _ in 0..MAX_IN_FLIGHT - 1 + extra {
        let (nc, subject, refused) = (node.nc.clone(), subject.clone(), refused.clone());
        waiting.push(tokio::spawn(async move {
            let msg = nc.request(subject, Bytes::new()).await.expect("a reply");
            let reply: Value = serde_json::from_slice(&msg.payload).expect("JSON");
            if reply["ok"] == false {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            reply
        }));
    }
    // The ones beyond the bound are answered while the node is still stuck.
    wait_until_async(T, "the requests beyond the bound to be refused", || {
        let all = refused.load(Ordering::SeqCst) >= extra;
        async move { all }
    })
    .await;
    // Even a status, which the node would answer at once, does not reach it now.
    let reply = node.command("status", json!({"request_id": "busy"})).await;
    let message = error_message(&reply, "conflict", json!("busy"));
    assert!(
        message.contains(&format!("{MAX_IN_FLIGHT} requests are in flight")),
        "{message}"
    );
    assert!(!node_dir.join("gate").exists());

    std::fs::write(node_dir.join("gate"), "").expect("gate");
    let first = first.await.expect("task").expect("first reload's reply");
    let first: Value = serde_json::from_slice(&first.payload).expect("JSON");
    assert_eq!(first["ok"], true, "{first}");
    let mut ok = 1;
    for task in waiting {
        let reply = task.await.expect("task");
        if reply["ok"] == true {
            ok += 1;
        } else {
            let message = error_message(&reply, "conflict", Value::Null);
            assert!(message.contains("in flight"), "{message}");
        }
    }
    assert_eq!(ok, MAX_IN_FLIGHT, "exactly the bound was carried out");
    assert_eq!(refused.load(Ordering::SeqCst), extra);
    // The node answers again.
    assert_eq!(node.status().await["state"], "serving");
}
