//! Drain semantics (docs/PROTOCOL.md, "Drain blockers"; docs/ARCHITECTURE.md, "Invariants") end to
//! end: a real nats-server, a real `ebb agent` with its own haproxy, the demo backend, and real TCP
//! clients.
//!
//! The reason ebb exists is the seed's bug (Ray Serve's HAProxy drain race): the admin socket said
//! "idle" while an OLD worker still served a long request, the node was declared drained too early
//! and requests were cut. Every test here holds a drain with something the admin socket of the
//! current worker may or may not see, and checks that `drained` comes only once it is gone.
//!
//! Tests synchronize on events (with receive instants) and on polled conditions, never on bare
//! sleeps.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use support::*;

const NODE: &str = NODE_ID;
/// Default timeout of every wait. Generous: the tests share a small machine with other work.
const T: Duration = Duration::from_secs(30);
/// How long a `drained` may trail the event that cleared its last blocker.
const DRAINED_GAP: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// One node: nats-server, backend, haproxy config, agent
// ---------------------------------------------------------------------------------------------

/// A serving node with `tweak` applied to its agent config (`[drain] min_period = "0s"` and
/// `poll_interval = "10ms"` by default); its event tap was in place before the agent started.
async fn setup(tweak: impl FnOnce(&mut AgentConfig)) -> NodeFixture {
    NodeFixture::builder().timeout(T).agent(tweak).start().await
}

/// Starts a drain; returns its result (checked as a fresh drain).
async fn start_drain(ctx: &NodeFixture, body: Value) -> Value {
    let result = ctx.ok("drain", body.clone()).await;
    assert_eq!(result["already_draining"], false, "{body}: {result}");
    assert_eq!(result["state"], "draining", "{body}: {result}");
    assert_eq!(result["drained_at"], Value::Null, "{body}: {result}");
    result
}

fn blockers(status: &Value) -> Vec<Value> {
    status["drain"]["blockers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn blocker_kinds(status: &Value) -> BTreeSet<String> {
    blockers(status)
        .iter()
        .filter_map(|b| b["kind"].as_str().map(str::to_string))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `later` came after `earlier`, by how long (for messages).
fn after(later: Instant, earlier: Instant) -> Result<Duration, Duration> {
    if later >= earlier {
        Ok(later - earlier)
    } else {
        Err(earlier - later)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The seed's bug: a long request on an OLD worker holds the drain
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_on_an_old_worker_holds_the_drain_until_it_completes() {
    let ctx = setup(|_| {}).await;
    let w0 = ctx.status().await["haproxy"]["pid"]
        .as_u64()
        .expect("current pid");

    // A long request in flight on worker W0...
    let slow = spawn_get(ctx.port(), "/slow?ms=5000");
    ctx.wait_conns(1).await;

    // ...which a reload turns into an old worker: the admin socket now belongs to W1, which is
    // idle. This is exactly where "idle per the admin socket" was a lie.
    let reload = ctx.ok("reload", json!({})).await;
    assert_eq!(reload["old_pids"], json!([w0]), "{reload}");
    println!("reload took {} ms", reload["duration_ms"]);
    let w1 = reload["pid"].as_u64().expect("new pid");
    assert_ne!(w1, w0);
    ctx.events
        .wait_kind("reloaded", |b| b["pid"] == w1 && b["draining"] == false)
        .await;

    let drain = start_drain(&ctx, json!({"drain_id": "seed", "min_period_ms": 200})).await;
    let drain_replied = Instant::now();
    assert_eq!(drain["drain_id"], "seed");
    ctx.events
        .wait_kind("drain_started", |b| {
            b["drain_id"] == "seed" && b["min_period_ms"] == 200
        })
        .await;

    // Once the min period is over (and the idle current worker was sampled), the old worker is
    // the one and only blocker, and status says so with its connection.
    let status = ctx
        .wait_status("the old worker to be the only blocker", |s| {
            s["state"] != "draining" || blocker_kinds(s) == BTreeSet::from(["old_worker".into()])
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");
    let held = blockers(&status);
    assert_eq!(held.len(), 1, "only the old worker blocks: {status}");
    assert_eq!(held[0]["kind"], "old_worker", "{status}");
    assert_eq!(held[0]["pid"], w0, "{status}");
    assert_eq!(
        held[0]["connections"], 1,
        "the old worker holds the slow request: {status}"
    );
    assert_eq!(status["old_workers"][0]["pid"], w0, "{status}");
    assert_eq!(
        ctx.curr_conns().await,
        Some(0),
        "the current worker W1 is idle"
    );

    let done = full_200(slow, "slept 5000 ms\n").await;
    let exited = ctx
        .events
        .wait_kind("worker_exited", |b| b["pid"] == w0)
        .await;
    assert_eq!(exited.body["role"], "old", "{}", exited.body);
    assert_eq!(exited.body["hard_stopped"], false, "{}", exited.body);
    assert_eq!(exited.body["connections_cut"], 0, "{}", exited.body);
    let drained = ctx.events.drained("seed").await;

    // No drained before the response was complete.
    let margin = after(drained.at, done).unwrap_or_else(|early| {
        panic!(
            "drained arrived {:.1} ms BEFORE the long request completed: {}",
            ms(early),
            drained.body
        )
    });
    assert!(
        drained.seq() > exited.seq(),
        "drained (seq {}) after the old worker's exit (seq {})",
        drained.seq(),
        exited.seq()
    );
    let gap = after(drained.at, exited.at).expect("drained is received after worker_exited");
    println!(
        "old worker {w0} exited; drained received {:.1} ms later ({:.1} ms after the response completed)",
        ms(gap),
        ms(margin)
    );
    assert!(
        gap < DRAINED_GAP,
        "drained trailed worker_exited by {gap:?}"
    );
    assert_eq!(drained.body["forced"], false, "{}", drained.body);
    assert_eq!(drained.body["connections_cut"], 0, "{}", drained.body);
    // The drain lasted at least from its reply to the end of the request.
    let held = (done - drain_replied).as_millis() as u64;
    assert!(
        drained.body["duration_ms"].as_u64().unwrap_or(0) + 2 >= held,
        "the drain lasted as long as the request ({held} ms): {}",
        drained.body
    );
    assert_eq!(
        ctx.events
            .of_kind("drained")
            .iter()
            .filter(|e| e.body["drain_id"] == "seed")
            .count(),
        1,
        "one drained per drain id"
    );
    let status = ctx.status().await;
    assert_eq!(status["state"], "drained", "{status}");
    assert_eq!(status["drain"]["blockers"], json!([]), "{status}");
}

// ---------------------------------------------------------------------------------------------
// 2. A long request on the CURRENT worker holds the drain
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_request_on_the_current_worker_holds_the_drain_until_it_completes() {
    let ctx = setup(|_| {}).await;
    let slow = spawn_get(ctx.port(), "/slow?ms=3000");
    ctx.wait_conns(1).await;

    start_drain(&ctx, json!({"drain_id": "current", "min_period_ms": 200})).await;
    let status = ctx
        .wait_status("the min period to end", |s| {
            !blocker_kinds(s).contains("min_period")
                && s["drain"]["elapsed_ms"].as_u64() > Some(200)
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");
    assert_eq!(
        blockers(&status),
        vec![json!({"kind": "connections", "count": 1})],
        "{status}"
    );
    assert_eq!(status["old_workers"], json!([]), "{status}");

    let done = full_200(slow, "slept 3000 ms\n").await;
    let drained = ctx.events.drained("current").await;
    let margin = after(drained.at, done).unwrap_or_else(|early| {
        panic!(
            "drained arrived {:.1} ms BEFORE the long request completed",
            ms(early)
        )
    });
    println!(
        "drained received {:.1} ms after the response completed",
        ms(margin)
    );
    assert!(
        margin < DRAINED_GAP,
        "drained trailed the response by {margin:?}"
    );
    assert_eq!(drained.body["forced"], false);
    assert_eq!(drained.body["connections_cut"], 0);
}

// ---------------------------------------------------------------------------------------------
// 3. An idle keep-alive connection: "connections" waits for it, "sessions" does not
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_holds_a_connections_drain_until_it_closes() {
    let ctx = setup(|c| {
        c.set_str("drain", "idle", "connections");
    })
    .await;
    let mut client = KeepAliveClient::connect(ctx.port()).await.expect("connect");
    let first = client.get("/").await.expect("first request");
    assert_eq!(first.status, 200);
    assert!(!first.connection_close(), "kept alive before the drain");
    ctx.wait_conns(1).await;

    start_drain(&ctx, json!({"drain_id": "ka", "min_period_ms": 0})).await;
    // The idle connection is open, and status says it blocks, for as long as it stays open:
    // HAProxy does not close an idle keep-alive connection when the drain starts (only the next
    // response carries `Connection: close`, or the keep-alive timeout closes it: 30 s here).
    let status = ctx
        .wait_status("the drain to run for 1 s", |s| {
            s["drain"]["elapsed_ms"].as_u64() >= Some(1000)
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");
    assert_eq!(
        blockers(&status),
        vec![json!({"kind": "connections", "count": 1})],
        "{status}"
    );
    assert!(!client.is_closed(), "HAProxy left the idle connection open");
    assert!(
        ctx.events.of_kind("drained").is_empty(),
        "not drained while it is open"
    );

    // The next response on it sheds keep-alive; HAProxy closes it, and the drain ends.
    let second = client.get("/").await.expect("second request");
    let done = Instant::now();
    assert_eq!(second.status, 200);
    assert!(
        second.connection_close(),
        "keep-alive shed while draining: {second:?}"
    );
    assert!(client.wait_closed(T).await, "HAProxy closed the connection");
    let drained = ctx.events.drained("ka").await;
    let margin = after(drained.at, done).expect("drained after the connection's last response");
    println!(
        "keep-alive: drained {:.1} ms after the shedding response",
        ms(margin)
    );
    assert!(margin < DRAINED_GAP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keep_alive_timeout_closes_an_idle_connection_and_ends_the_drain() {
    // An operator who wants drains to end without the client's help sets a short keep-alive
    // timeout: HAProxy then closes the idle connection itself.
    let ctx = NodeFixture::builder()
        .timeout(T)
        .haproxy(|h| h.frontend_line("timeout http-keep-alive 3s"))
        .agent(|c| {
            c.set_str("drain", "idle", "connections");
        })
        .start()
        .await;
    let mut client = KeepAliveClient::connect(ctx.port()).await.expect("connect");
    let first = client.get("/").await.expect("first request");
    assert!(!first.connection_close());
    let idle_since = Instant::now();
    start_drain(&ctx, json!({"drain_id": "ka-timeout", "min_period_ms": 0})).await;
    let status = ctx.status().await;
    if idle_since.elapsed() < Duration::from_millis(2500) {
        assert_eq!(
            blockers(&status),
            vec![json!({"kind": "connections", "count": 1})],
            "{status}"
        );
    }
    assert!(
        client.wait_closed(T).await,
        "HAProxy closes the idle connection"
    );
    let closed = Instant::now();
    let drained = ctx.events.drained("ka-timeout").await;
    let margin = after(drained.at, closed).unwrap_or_default();
    println!(
        "keep-alive timeout: connection closed {:.0} ms after its last response; drained {:.1} ms later",
        ms(closed - idle_since),
        ms(margin)
    );
    assert!(
        closed - idle_since >= Duration::from_millis(2900),
        "closed by the timeout"
    );
    assert!(margin < DRAINED_GAP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_drain_does_not_wait_for_an_idle_keep_alive_connection() {
    let ctx = setup(|c| {
        c.set_str("drain", "idle", "sessions");
    })
    .await;
    let mut client = KeepAliveClient::connect(ctx.port()).await.expect("connect");
    assert!(!client
        .get("/")
        .await
        .expect("first request")
        .connection_close());
    ctx.wait_conns(1).await;

    start_drain(&ctx, json!({"drain_id": "sessions", "min_period_ms": 0})).await;
    let drained = ctx.events.drained("sessions").await;
    assert_eq!(drained.body["forced"], false);
    // Drained while the idle connection is still open: Ray's rule does not see it.
    assert!(!client.is_closed(), "the connection is still open");
    assert_eq!(ctx.curr_conns().await, Some(1));
    // And the worker still serves it (with keep-alive shed).
    let response = client.get("/").await.expect("request after drained");
    assert_eq!(response.status, 200);
    assert!(response.connection_close());
}

// ---------------------------------------------------------------------------------------------
// 4. A request with partial headers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_request_holds_a_connections_drain_until_it_is_finished() {
    let ctx = setup(|c| {
        c.set_str("drain", "idle", "connections");
    })
    .await;
    let partial = partial_request(ctx.port()).await.expect("partial request");
    ctx.wait_conns(1).await;

    start_drain(&ctx, json!({"drain_id": "partial", "min_period_ms": 0})).await;
    let status = ctx
        .wait_status("the drain to run for 500 ms", |s| {
            s["drain"]["elapsed_ms"].as_u64() >= Some(500)
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");
    assert_eq!(
        blockers(&status),
        vec![json!({"kind": "connections", "count": 1})],
        "{status}"
    );
    assert!(ctx.events.of_kind("drained").is_empty());

    let response = partial
        .finish()
        .await
        .expect("the partial request completes");
    let done = Instant::now();
    assert_eq!((response.status, response.body.as_str()), (200, "ok\n"));
    let drained = ctx.events.drained("partial").await;
    let margin = after(drained.at, done).expect("drained after the request was finished");
    println!(
        "partial request: drained {:.1} ms after it was answered",
        ms(margin)
    );
    assert!(margin < DRAINED_GAP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_request_closed_by_the_client_ends_a_connections_drain() {
    let ctx = setup(|_| {}).await;
    let partial = partial_request(ctx.port()).await.expect("partial request");
    ctx.wait_conns(1).await;
    start_drain(
        &ctx,
        json!({"drain_id": "partial-gone", "min_period_ms": 0}),
    )
    .await;
    ctx.wait_status("a connections blocker", |s| {
        blockers(s) == vec![json!({"kind": "connections", "count": 1})]
    })
    .await;
    drop(partial);
    let closed = Instant::now();
    let drained = ctx.events.drained("partial-gone").await;
    assert!(drained.at > closed);
    assert_eq!(drained.body["forced"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_drain_cannot_see_a_partial_request() {
    // What docs/PROTOCOL.md says "sessions" cannot see, shown: the node is declared drained while
    // a client is still sending its request.
    let ctx = setup(|c| {
        c.set_str("drain", "idle", "sessions");
    })
    .await;
    let partial = partial_request(ctx.port()).await.expect("partial request");
    ctx.wait_conns(1).await;
    start_drain(&ctx, json!({"drain_id": "blind", "min_period_ms": 0})).await;
    ctx.events.drained("blind").await;
    assert_eq!(
        ctx.curr_conns().await,
        Some(1),
        "the partial request is still open"
    );
    let response = partial.finish().await.expect("still served");
    assert_eq!(response.status, 200);
}

// ---------------------------------------------------------------------------------------------
// 5. A reload in the middle of a drain
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_drain_turns_the_busy_worker_into_an_old_worker_blocker() {
    let ctx = setup(|_| {}).await;
    let w0 = ctx.status().await["haproxy"]["pid"]
        .as_u64()
        .expect("current pid");
    // Long enough to outlast a slow reload on a busy machine.
    let slow = spawn_get(ctx.port(), "/slow?ms=8000");
    ctx.wait_conns(1).await;

    start_drain(&ctx, json!({"drain_id": "mid", "min_period_ms": 0})).await;
    let status = ctx
        .wait_status("a connections blocker", |s| !blockers(s).is_empty())
        .await;
    assert_eq!(
        blockers(&status),
        vec![json!({"kind": "connections", "count": 1})],
        "{status}"
    );

    let reload = ctx.ok("reload", json!({})).await;
    let w1 = reload["pid"].as_u64().expect("new pid");
    assert_eq!(reload["old_pids"], json!([w0]), "{reload}");
    println!("reload mid-drain took {} ms", reload["duration_ms"]);
    let reloaded = ctx.events.wait_kind("reloaded", |b| b["pid"] == w1).await;
    assert_eq!(reloaded.body["draining"], true, "{}", reloaded.body);
    assert_eq!(reloaded.body["old_pids"], json!([w0]));

    // The displaced worker still serves the slow request: it is now an old_worker blocker, and
    // the new, idle worker does not make the node drained.
    let status = ctx
        .wait_status("the blockers to follow the reload", |s| {
            s["state"] != "draining"
                || (s["haproxy"]["pid"] == w1
                    && blockers(s).iter().all(|b| b["kind"] == "old_worker"))
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");
    let held = blockers(&status);
    assert_eq!(held.len(), 1, "{status}");
    assert_eq!(held[0]["pid"], w0, "{status}");
    assert_eq!(held[0]["connections"], 1, "{status}");
    // The new worker answers 503 on health checks from its first request.
    let (code, _) = http_get(ctx.port(), "/healthz", true)
        .await
        .expect("healthz");
    assert_eq!(code, 503);

    let done = full_200(slow, "slept 8000 ms\n").await;
    let exited = ctx
        .events
        .wait_kind("worker_exited", |b| b["pid"] == w0)
        .await;
    let drained = ctx.events.drained("mid").await;
    assert!(
        drained.at > done,
        "drained before the slow request completed"
    );
    assert!(drained.seq() > exited.seq(), "drained only after W0 exited");
    let gap = after(drained.at, exited.at).expect("drained after worker_exited");
    println!(
        "reload mid-drain: drained {:.1} ms after W0 exited",
        ms(gap)
    );
    assert!(gap < DRAINED_GAP);
    assert_eq!(
        ctx.events.of_kind("drain_started").len(),
        1,
        "the reload did not start a second drain"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. /healthz while draining, across reloads
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_while_draining_even_across_reloads() {
    let ctx = setup(|_| {}).await;
    let port = ctx.port();
    assert_eq!(
        http_get(port, "/healthz", true).await.expect("healthz").0,
        200
    );

    // A long min period keeps the node draining (a drained node refuses reloads).
    let started = Instant::now();
    start_drain(&ctx, json!({"drain_id": "hc", "min_period_ms": 600_000})).await;
    wait_until_async(T, "/healthz to answer 503", || async {
        matches!(http_get(port, "/healthz", true).await, Ok((503, _)))
    })
    .await;
    println!(
        "/healthz answered 503 {:.1} ms after the drain command was sent",
        ms(started.elapsed())
    );

    // A client hammers /healthz while the node reloads again and again: not a single 200.
    let load = LoadGen::builder(port)
        .concurrency(2)
        .mode(LoadMode::Close)
        .path("/healthz")
        .start();
    let load = tokio::task::spawn_blocking(move || {
        wait_until(T, "health checks under way", || {
            load.snapshot().count(FailureKind::BadStatus(503)) >= 20
        });
        load
    })
    .await
    .expect("join");
    let mut pids = BTreeSet::new();
    for _ in 0..8 {
        let reload = ctx.ok("reload", json!({})).await;
        let pid = reload["pid"].as_u64().expect("pid");
        pids.insert(pid);
        let reloaded = ctx.events.wait_kind("reloaded", |b| b["pid"] == pid).await;
        assert_eq!(reloaded.body["draining"], true, "{}", reloaded.body);
        // Some checks reach each new worker before the next reload.
        let seen = load.snapshot().total();
        wait_until_async(T, "health checks on the new worker", || async {
            load.snapshot().total() >= seen + 10
        })
        .await;
    }
    let report = tokio::task::spawn_blocking(move || load.stop())
        .await
        .expect("join");
    println!("health checks across 8 reloads while draining: {report}");
    assert_eq!(report.ok, 0, "a 200 got through while draining: {report}");
    assert!(report.count(FailureKind::BadStatus(503)) > 100, "{report}");
    assert_eq!(pids.len(), 8);

    // Undrain: back to 200.
    let undrained = ctx.ok("undrain", json!({"drain_id": "hc"})).await;
    assert_eq!(undrained, json!({"drain_id": "hc", "state": "serving"}));
    ctx.events
        .wait_kind("undrained", |b| b["drain_id"] == "hc")
        .await;
    wait_until_async(T, "/healthz to answer 200", || async {
        matches!(http_get(port, "/healthz", true).await, Ok((200, _)))
    })
    .await;
    // And a worker started after the undrain serves 200 too.
    let reload = ctx.ok("reload", json!({})).await;
    let reloaded = ctx
        .events
        .wait_kind("reloaded", |b| b["pid"] == reload["pid"])
        .await;
    assert_eq!(reloaded.body["draining"], false);
    assert_eq!(
        http_get(port, "/healthz", true).await.expect("healthz").0,
        200
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Deadline and stop_when_drained
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_with_report_publishes_the_blockers_and_does_not_declare_drained() {
    let ctx = setup(|c| {
        c.set_str("drain", "on_deadline", "report");
    })
    .await;
    let partial = partial_request(ctx.port()).await.expect("partial request");
    ctx.wait_conns(1).await;
    start_drain(
        &ctx,
        json!({"drain_id": "late", "min_period_ms": 0, "deadline_ms": 500}),
    )
    .await;
    let exceeded = ctx
        .events
        .wait_kind("drain_deadline_exceeded", |b| b["drain_id"] == "late")
        .await;
    assert_eq!(
        exceeded.body["blockers"],
        json!([{"kind": "connections", "count": 1}]),
        "{}",
        exceeded.body
    );
    // Still draining, well past the deadline.
    let status = ctx
        .wait_status("the drain to run 500 ms past its deadline", |s| {
            s["drain"]["elapsed_ms"].as_u64() >= Some(1000)
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");
    assert!(
        ctx.events.of_kind("drained").is_empty(),
        "report does not declare drained"
    );

    // When the blocker goes, the drain ends normally (not forced), with one deadline event.
    let response = partial.finish().await.expect("finish");
    assert_eq!(response.status, 200);
    let drained = ctx.events.drained("late").await;
    assert_eq!(drained.body["forced"], false, "{}", drained.body);
    assert_eq!(ctx.events.of_kind("drain_deadline_exceeded").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_with_force_declares_drained_forced() {
    let ctx = setup(|c| {
        c.set_str("drain", "on_deadline", "force");
    })
    .await;
    let partial = partial_request(ctx.port()).await.expect("partial request");
    ctx.wait_conns(1).await;
    let started = Instant::now();
    start_drain(
        &ctx,
        json!({"drain_id": "forced", "min_period_ms": 0, "deadline_ms": 500}),
    )
    .await;
    let exceeded = ctx
        .events
        .wait_kind("drain_deadline_exceeded", |b| b["drain_id"] == "forced")
        .await;
    assert_eq!(
        exceeded.body["blockers"],
        json!([{"kind": "connections", "count": 1}])
    );
    let drained = ctx.events.drained("forced").await;
    assert!(drained.at - started >= Duration::from_millis(500));
    assert!(drained.seq() > exceeded.seq());
    assert_eq!(drained.body["forced"], true, "{}", drained.body);
    assert_eq!(drained.body["connections_cut"], 0, "{}", drained.body);
    let status = ctx.status().await;
    assert_eq!(status["state"], "drained", "{status}");
    // Forcing declares; it cuts nothing: the request is still served.
    let response = partial.finish().await.expect("finish");
    assert_eq!(response.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_when_drained_stops_haproxy_gracefully_after_drained() {
    let ctx = setup(|_| {}).await;
    assert!(!haproxy_pids_for(ctx.dir()).is_empty());
    let slow = spawn_get(ctx.port(), "/slow?ms=1000");
    ctx.wait_conns(1).await;
    start_drain(
        &ctx,
        json!({"drain_id": "bye", "min_period_ms": 0, "stop_when_drained": true}),
    )
    .await;
    let done = full_200(slow, "slept 1000 ms\n").await;
    let drained = ctx.events.drained("bye").await;
    assert!(drained.at > done);
    let stopped = ctx.events.wait_kind("stopped", |_| true).await;
    assert!(stopped.seq() > drained.seq(), "stopped after drained");
    assert_eq!(stopped.body["connections_cut"], 0, "{}", stopped.body);
    let pids = haproxy_pids_for(ctx.dir());
    assert!(
        pids.is_empty(),
        "haproxy still running after stopped: {pids:?}"
    );
    let status = ctx.status().await;
    assert_eq!(status["state"], "stopped", "{status}");
    assert_eq!(status["haproxy"]["pid"], Value::Null, "{status}");
}

// ---------------------------------------------------------------------------------------------
// 8. The agent crashes in the middle of a drain
// ---------------------------------------------------------------------------------------------

/// Every `drained` event in stream EBB_EVENTS, read through an ephemeral JetStream consumer
/// filtered on `ebb.event.*.drained`: Msg-Id and body.
async fn drained_in_stream(nc: &Client) -> Vec<(Option<String>, Value)> {
    let js = async_nats::jetstream::new(nc.clone());
    let stream = js
        .get_stream("EBB_EVENTS")
        .await
        .expect("stream EBB_EVENTS");
    let mut consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = stream
        .create_consumer(pull::Config {
            filter_subject: "ebb.event.*.drained".into(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("create a consumer");
    let pending = consumer.info().await.expect("consumer info").num_pending as usize;
    let mut out = Vec::new();
    if pending == 0 {
        return out;
    }
    let mut messages = consumer
        .fetch()
        .max_messages(pending)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("fetch");
    while let Some(msg) = messages.next().await {
        let msg = msg.expect("stream message");
        let msg_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string());
        out.push((msg_id, serde_json::from_slice(&msg.payload).expect("JSON")));
    }
    assert_eq!(out.len(), pending, "fetched every pending message");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_survives_a_kill_9_of_the_agent_and_is_drained_once() {
    let mut ctx = setup(|_| {}).await;
    let slow = spawn_get(ctx.port(), "/slow?ms=6000");
    ctx.wait_conns(1).await;
    start_drain(&ctx, json!({"drain_id": "crash", "min_period_ms": 0})).await;
    ctx.events
        .wait_kind("drain_started", |b| b["drain_id"] == "crash")
        .await;
    let before = ctx.status().await;
    let started_at = before["drain"]["started_at"].clone();
    assert!(started_at.is_string(), "{before}");
    let first_boot = before["boot_id"].clone();

    ctx.agent.kill9().expect("kill -9 the agent");
    ctx.restart_agent();
    let started = ctx
        .events
        .wait_kind("agent_started", |b| b["boot_id"] != first_boot)
        .await;
    assert_eq!(started.body["adopted"], true, "{}", started.body);

    let status = ctx.status().await;
    assert_ne!(status["boot_id"], first_boot);
    assert_eq!(status["state"], "draining", "{status}");
    assert_eq!(status["drain"]["drain_id"], "crash", "{status}");
    assert_eq!(status["drain"]["started_at"], started_at, "{status}");
    let status = ctx
        .wait_status("the resumed drain to sample the worker", |s| {
            !blockers(s).is_empty() && blockers(s).iter().all(|b| b["kind"] == "connections")
        })
        .await;
    assert_eq!(
        blockers(&status),
        vec![json!({"kind": "connections", "count": 1})]
    );

    let done = full_200(slow, "slept 6000 ms\n").await;
    let drained = ctx.events.drained("crash").await;
    assert!(
        drained.at > done,
        "drained before the slow request completed"
    );
    assert_eq!(drained.body["boot_id"], status["boot_id"]);
    assert_eq!(drained.body["started_at"], started_at, "{}", drained.body);
    assert_eq!(drained.body["forced"], false);
    assert!(
        drained.body["duration_ms"].as_u64().unwrap_or(0) >= 5000,
        "{}",
        drained.body
    );

    let stored = drained_in_stream(&ctx.nc).await;
    let ours: Vec<_> = stored
        .iter()
        .filter(|(_, b)| b["drain_id"] == "crash")
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "exactly one drained in the stream: {stored:?}"
    );
    assert_eq!(ours[0].0, drained.msg_id);

    // A second crash after drained: the new agent resends the drained event with its original
    // Msg-Id, and the stream still holds it once.
    let second_boot = status["boot_id"].clone();
    ctx.agent.kill9().expect("kill -9 the agent again");
    ctx.restart_agent();
    ctx.events
        .wait_kind("agent_started", |b| {
            b["boot_id"] != first_boot && b["boot_id"] != second_boot
        })
        .await;
    let status = ctx.status().await;
    assert_eq!(status["state"], "drained", "{status}");
    assert_eq!(status["drain"]["drain_id"], "crash", "{status}");
    for resent in ctx
        .events
        .of_kind("drained")
        .iter()
        .filter(|e| e.body["drain_id"] == "crash")
    {
        assert_eq!(
            resent.msg_id, drained.msg_id,
            "a resent drained keeps its Msg-Id"
        );
        assert_eq!(resent.body, drained.body);
    }
    let stored = drained_in_stream(&ctx.nc).await;
    let ours = stored
        .iter()
        .filter(|(_, b)| b["drain_id"] == "crash")
        .count();
    assert_eq!(
        ours, 1,
        "still exactly one drained in the stream: {stored:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Commands against a draining or drained node
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_replies_and_conflicts_follow_the_state() {
    let ctx = setup(|_| {}).await;
    let partial = partial_request(ctx.port()).await.expect("partial request");
    ctx.wait_conns(1).await;

    start_drain(&ctx, json!({"drain_id": "first", "min_period_ms": 0})).await;
    let again = ctx
        .ok("drain", json!({"drain_id": "second", "min_period_ms": 0}))
        .await;
    assert_eq!(
        again,
        json!({"drain_id": "first", "already_draining": true, "state": "draining", "drained_at": null})
    );
    let undrain_other = ctx.command("undrain", json!({"drain_id": "second"})).await;
    assert_eq!(
        undrain_other["error"]["code"], "conflict",
        "{undrain_other}"
    );

    partial.finish().await.expect("finish");
    let drained = ctx.events.drained("first").await;
    assert_eq!(ctx.events.of_kind("drain_started").len(), 1);

    let after_drained = ctx.ok("drain", json!({"min_period_ms": 0})).await;
    assert_eq!(after_drained["drain_id"], "first", "{after_drained}");
    assert_eq!(after_drained["already_draining"], true, "{after_drained}");
    assert_eq!(after_drained["state"], "drained", "{after_drained}");
    assert_eq!(
        after_drained["drained_at"], drained.body["drained_at"],
        "the reply's drained_at is the event's"
    );

    let reload = ctx.command("reload", json!({})).await;
    assert_eq!(reload["ok"], false, "{reload}");
    assert_eq!(reload["error"]["code"], "conflict", "{reload}");
    let status = ctx.status().await;
    assert_eq!(status["state"], "drained", "{status}");

    assert_eq!(
        ctx.ok("undrain", json!({"drain_id": "first"})).await,
        json!({"drain_id": "first", "state": "serving"})
    );
    ctx.ok("reload", json!({})).await;
    assert_eq!(ctx.status().await["state"], "serving");
}

// ---------------------------------------------------------------------------------------------
// 10. An undrain that lands while a reload is starting its new worker
// ---------------------------------------------------------------------------------------------

/// `EBB_DRAINING` in the environment haproxy worker `pid` was started with.
fn started_draining(pid: u64) -> Option<bool> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
    Some(vars.contains(&b"EBB_DRAINING=1".as_slice()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undrain_during_a_reload_leaves_the_new_worker_serving() {
    // A reload started while draining launches its worker with EBB_DRAINING=1. If the undrain
    // lands before that worker is installed, the node is serving, so the new worker must answer
    // 200 on /healthz (it must get the stop_commands), and its `reloaded` event must not claim
    // otherwise.
    let ctx = setup(|_| {}).await;
    let port = ctx.port();
    for attempt in 0..10 {
        let id = format!("race-{attempt}");
        start_drain(&ctx, json!({"drain_id": id, "min_period_ms": 600_000})).await;
        wait_until_async(T, "/healthz to answer 503", || async {
            matches!(http_get(port, "/healthz", true).await, Ok((503, _)))
        })
        .await;

        // reload, then undrain while the new worker starts: replies come back in the order the node
        // answered them.
        let inbox = ctx.nc.new_inbox();
        let mut replies = ctx
            .nc
            .subscribe(format!("{inbox}.*"))
            .await
            .expect("subscribe to the inbox");
        // The processes before the reload is sent: the new one may exist by the time we look.
        let before: BTreeSet<u32> = haproxy_pids_for(ctx.dir()).into_iter().collect();
        ctx.nc
            .publish_with_reply(
                format!("ebb.node.{NODE}.reload"),
                format!("{inbox}.reload"),
                Bytes::from_static(b"{}"),
            )
            .await
            .expect("publish reload");
        ctx.nc.flush().await.expect("flush");
        // Undrain once the new haproxy process exists, before it is ready and installed.
        let dir = ctx.dir().to_path_buf();
        tokio::task::spawn_blocking(move || {
            wait_until(T, "the reload's new haproxy process", || {
                haproxy_pids_for(&dir).iter().any(|p| !before.contains(p))
            })
        })
        .await
        .expect("join");
        ctx.nc
            .publish_with_reply(
                format!("ebb.node.{NODE}.undrain"),
                format!("{inbox}.undrain"),
                Bytes::from(json!({"drain_id": id}).to_string()),
            )
            .await
            .expect("publish undrain");
        ctx.nc.flush().await.expect("flush");
        let mut order = Vec::new();
        let mut reload = Value::Null;
        while order.len() < 2 {
            let msg = tokio::time::timeout(T, replies.next())
                .await
                .expect("replies in time")
                .expect("inbox open");
            let reply: Value = serde_json::from_slice(&msg.payload).expect("JSON reply");
            assert_eq!(reply["ok"], true, "{reply}");
            let verb = msg
                .subject
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_string();
            if verb == "reload" {
                reload = reply["result"].clone();
            }
            order.push(verb);
        }
        let pid = reload["pid"].as_u64().expect("new pid");
        let reloaded = ctx.events.wait_kind("reloaded", |b| b["pid"] == pid).await;
        ctx.events
            .wait_kind("undrained", |b| b["drain_id"] == id.as_str())
            .await;
        let launched_draining = started_draining(pid).expect("read the worker's environ");
        if order != ["undrain", "reload"] || !launched_draining {
            // The undrain did not land during the launch this time: the node is serving anyway.
            wait_until_async(T, "/healthz to answer 200", || async {
                matches!(http_get(port, "/healthz", true).await, Ok((200, _)))
            })
            .await;
            continue;
        }
        println!(
            "attempt {attempt}: worker {pid} was launched draining and installed after the undrain; reloaded: {}",
            reloaded.body
        );
        assert_eq!(ctx.status().await["state"], "serving");
        let healthy = try_wait_for_async(Duration::from_secs(5), || async {
            matches!(http_get(port, "/healthz", true).await, Ok((200, _))).then_some(())
        })
        .await
        .is_some();
        assert!(
            healthy,
            "worker {pid}, started with EBB_DRAINING=1 by a reload that the undrain overtook, \
             still answers 503 on /healthz 5 s after the node was undrained (state serving)"
        );
        return;
    }
    panic!("could not make an undrain land during a reload in 10 attempts");
}

// ---------------------------------------------------------------------------------------------
// 11. What the sampler reads: `show info` alone, or only the frontend or backend rows a setting
//     needs (never the server rows), and a drain still ends exactly when it should
// ---------------------------------------------------------------------------------------------

/// Backends, each of this many servers, added to a config so that its server rows dwarf the rest.
const LARGE_BACKENDS: usize = 30;
const SERVERS_PER_BACKEND: usize = 100;

/// `LARGE_BACKENDS` backends of `SERVERS_PER_BACKEND` servers each (no health checks), all at
/// `addr`: a config whose full `show stat` is thousands of rows.
fn many_servers(addr: std::net::SocketAddr) -> String {
    let mut text = String::new();
    for b in 0..LARGE_BACKENDS {
        text.push_str(&format!("backend pool{b}\n"));
        for s in 0..SERVERS_PER_BACKEND {
            text.push_str(&format!("    server s{s} {addr}\n"));
        }
        text.push('\n');
    }
    text
}

/// Holds a 2 s request on the current worker, drains, and checks that the drain is blocked by
/// `kind` (count 1) while the request runs and ends once it completed, not before.
async fn a_held_request_holds_the_drain(ctx: &NodeFixture, drain_id: &str, kind: &str) {
    let slow = spawn_get(ctx.port(), "/slow?ms=2000");
    ctx.wait_conns(1).await;
    start_drain(ctx, json!({"drain_id": drain_id, "min_period_ms": 0})).await;
    let status = ctx
        .wait_status("the drain to run for 300 ms", |s| {
            s["drain"]["elapsed_ms"].as_u64() >= Some(300)
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");
    assert_eq!(
        blockers(&status),
        vec![json!({"kind": kind, "count": 1})],
        "{status}"
    );
    let done = full_200(slow, "slept 2000 ms\n").await;
    let drained = ctx.events.drained(drain_id).await;
    let margin = after(drained.at, done).unwrap_or_else(|early| {
        panic!(
            "{drain_id}: drained arrived {:.1} ms BEFORE the held request completed",
            ms(early)
        )
    });
    println!(
        "{drain_id}: drained {:.1} ms after the response",
        ms(margin)
    );
    assert!(
        margin < DRAINED_GAP,
        "drained trailed the response by {margin:?}"
    );
    assert_eq!(drained.body["forced"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_drain_that_reads_only_show_info_waits_for_a_held_request() {
    // No ignored frontends: the sampler asks `show info` alone (`CurrConns`), no `show stat`.
    let ctx = setup(|c| {
        c.unset("drain", "ignore_frontends");
    })
    .await;
    a_held_request_holds_the_drain(&ctx, "info-only", "connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_servers_an_ignored_frontend_drain_waits_for_a_held_request() {
    // `ignore_frontends = ["stats"]` (the harness's default): frontend rows only.
    let ctx = NodeFixture::builder()
        .timeout(T)
        .haproxy(|h| {
            let servers = many_servers(h.backend_addr());
            h.section(&servers)
        })
        .start()
        .await;
    a_held_request_holds_the_drain(&ctx, "large-frontends", "connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_servers_a_sessions_drain_waits_for_a_held_request() {
    // `sessions`: backend rows only; the held request is a session of backend `be`.
    let ctx = NodeFixture::builder()
        .timeout(T)
        .haproxy(|h| {
            let servers = many_servers(h.backend_addr());
            h.section(&servers)
        })
        .agent(|c| {
            c.set_str("drain", "idle", "sessions");
        })
        .start()
        .await;
    a_held_request_holds_the_drain(&ctx, "large-sessions", "sessions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_period_counts_client_connections_not_the_samplers_own() {
    // `show info`'s CumConns counts every CLI connection, the sampler's included; quiet_period
    // reads the frontends' `stot` instead. Were it to count the sampler's connections, the drain
    // would never be quiet; were it blind, the request below would not restart the period.
    const QUIET: Duration = Duration::from_millis(1500);
    let ctx = setup(|c| {
        c.unset("drain", "ignore_frontends")
            .set_str("drain", "quiet_period", "1500ms");
    })
    .await;
    start_drain(&ctx, json!({"drain_id": "quiet", "min_period_ms": 0})).await;
    let status = ctx
        .wait_status("the drain to run for 500 ms", |s| {
            s["drain"]["elapsed_ms"].as_u64() >= Some(500)
        })
        .await;
    assert_eq!(
        blocker_kinds(&status),
        BTreeSet::from(["quiet_period".to_string()]),
        "{status}"
    );
    let sent = Instant::now();
    let (code, _) = http_get(ctx.port(), "/", true).await.expect("a request");
    assert_eq!(code, 200);
    let drained = ctx.events.drained("quiet").await;
    let quiet_for = after(drained.at, sent)
        .unwrap_or_else(|early| panic!("drained {:.1} ms BEFORE the request was sent", ms(early)));
    println!(
        "quiet_period: drained {:.1} ms after the last new connection",
        ms(quiet_for)
    );
    assert!(
        quiet_for >= QUIET,
        "drained {quiet_for:?} after a new connection: the quiet period did not restart"
    );
    assert!(
        quiet_for < QUIET + DRAINED_GAP,
        "drained {quiet_for:?} after the last new connection: something else held it"
    );
    assert_eq!(drained.body["forced"], false);
}
