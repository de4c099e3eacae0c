//! The bus protocol (docs/PROTOCOL.md) as a third party sees it, end to end: a real
//! nats-server, real `ebb agent`s each with its own haproxy, and plain async-nats clients that
//! send hand-written JSON and check the raw JSON that comes back. Nothing here uses ebb's types.
//!
//! Run against another nats-server with `EBB_TEST_NATS_SERVER=/path/to/nats-server`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{Client, ConnectOptions};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::*;

/// Default timeout of every wait.
const T: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Helpers: clients, requests, reply checks
// ---------------------------------------------------------------------------------------------

async fn connect(url: &str) -> Client {
    connect_with(ConnectOptions::new(), url).await
}

async fn connect_with(opts: ConnectOptions, url: &str) -> Client {
    opts.request_timeout(Some(T))
        .max_reconnects(None)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// One request, the raw reply bytes.
async fn request_raw(nc: &Client, subject: &str, body: impl Into<Bytes>) -> Bytes {
    let reply = tokio::time::timeout(T, nc.request(subject.to_string(), body.into()))
        .await
        .unwrap_or_else(|_| panic!("no reply on {subject} within {T:?}"))
        .unwrap_or_else(|e| panic!("request on {subject}: {e}"));
    reply.payload
}

async fn request_json(nc: &Client, subject: &str, body: impl Into<Bytes>) -> Value {
    let bytes = request_raw(nc, subject, body).await;
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "reply on {subject} is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// `verb` to one node with a JSON body.
async fn command(nc: &Client, node: &str, verb: &str, body: Value) -> Value {
    request_json(nc, &format!("ebb.node.{node}.{verb}"), body.to_string()).await
}

/// Checks the success envelope; returns `result`.
fn assert_ok<'a>(reply: &'a Value, node: &str, request_id: Value) -> &'a Value {
    assert_eq!(reply["ok"], true, "expected success: {reply}");
    assert_eq!(reply["node"], node, "{reply}");
    assert!(
        reply
            .as_object()
            .is_some_and(|o| o.contains_key("request_id")),
        "request_id always present: {reply}"
    );
    assert_eq!(reply["request_id"], request_id, "{reply}");
    assert!(reply.get("error").is_none(), "no error on success: {reply}");
    assert!(reply["result"].is_object(), "result object: {reply}");
    &reply["result"]
}

/// Checks the failure envelope (ok false, node, request_id echoed, error{code,message}, no
/// result); returns the message.
fn assert_error(reply: &Value, node: &str, request_id: Value, code: &str) -> String {
    assert_eq!(reply["ok"], false, "expected a {code} failure: {reply}");
    assert_eq!(reply["node"], node, "{reply}");
    assert!(
        reply
            .as_object()
            .is_some_and(|o| o.contains_key("request_id")),
        "request_id always present: {reply}"
    );
    assert_eq!(
        reply["request_id"], request_id,
        "request_id echoed: {reply}"
    );
    assert_eq!(reply["error"]["code"], code, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "error.message is set: {reply}");
    assert!(
        reply.get("result").is_none(),
        "no result on failure: {reply}"
    );
    message.to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, written by hand so the test does not use ebb's own formatter.
fn rfc3339(t: SystemTime) -> String {
    let ms = unix_ms(t);
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let s = ms_of_day / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms_of_day % 1000
    )
}

/// Parses the agent's time format (`YYYY-MM-DDTHH:MM:SS.mmmZ`) into Unix milliseconds.
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[10] != b'T' || b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let secs = num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?;
    Some(days * 86_400_000 + secs * 1000 + num(20..23)?)
}

// Howard Hinnant's civil calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Polls an async condition until it returns `Some`, with a timeout (the harness's
/// [`wait_for_async`] with a `what` built lazily).
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_async(timeout, what, f).await
}

// ---------------------------------------------------------------------------------------------
// Helpers: events and nodes
// ---------------------------------------------------------------------------------------------

/// Kinds that appear on their own schedule and say nothing about a command.
fn is_background(e: &Event) -> bool {
    matches!(e.kind(), "heartbeat" | "agent_started")
}

/// A node on the test's own nats-server (`url`, reached through `nc`), its files in `dir`, the
/// demo backend behind its haproxy, and its event tap on `nc`.
fn node_on<'a>(nc: &Client, url: &str, dir: &Path, id: &str) -> NodeFixtureBuilder<'a> {
    NodeFixture::builder()
        .timeout(T)
        .node_id(id)
        .nats_url(url)
        .client(nc.clone())
        .dir(dir.join(id))
}

/// What must not change when a command is refused.
fn snapshot(status_reply: &Value) -> Value {
    let r = &status_reply["result"];
    json!({
        "state": r["state"],
        "pid": r["haproxy"]["pid"],
        "config_sha256": r["haproxy"]["config_sha256"],
        "old_workers": r["old_workers"].as_array().map(|a| a.iter().map(|w| w["pid"].clone()).collect::<Vec<_>>()),
        "drain": r["drain"]["drain_id"],
        "last_reload": r["last_reload"],
    })
}

async fn status_snapshot(nc: &Client, node: &str) -> Value {
    snapshot(&command(nc, node, "status", json!({})).await)
}

async fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path, true)
        .await
        .ok()
        .map(|(status, _)| status)
}

/// Gathers replies on an inbox until `want` arrived or `timeout` passed.
async fn gather(
    nc: &Client,
    subject: &str,
    body: &str,
    want: usize,
    timeout: Duration,
) -> Vec<Value> {
    let inbox = nc.new_inbox();
    let mut sub = nc.subscribe(inbox.clone()).await.expect("subscribe inbox");
    nc.publish_with_reply(subject.to_string(), inbox, body.to_string().into())
        .await
        .expect("publish");
    nc.flush().await.expect("flush");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut replies = Vec::new();
    while replies.len() < want {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            // An empty message is the server's "no responders".
            Ok(Some(msg)) if msg.payload.is_empty() => break,
            Ok(Some(msg)) => replies.push(
                serde_json::from_slice(&msg.payload)
                    .unwrap_or_else(|e| panic!("reply on {subject} is not JSON: {e}")),
            ),
            _ => break,
        }
    }
    replies
}

/// Runs `ebb ctl ARGS…` (killed if it outlives 60 s); returns exit code, stdout and stderr.
async fn ctl(args: &[&str]) -> (i32, String, String) {
    let run = run_ctl(args, &[], Duration::from_secs(60)).await;
    (run.code, run.stdout, run.stderr)
}

/// A nats-server started with a config file (`-c`): auth, TLS or limits.
fn nats_with_config(dir: &Path, text: &str) -> NatsServer {
    NatsServer::start_with_config(dir, text).expect("start nats-server")
}

/// A nats-server **without** JetStream (the harness always passes `-js`), on a free port.
struct PlainNats {
    _child: ChildGuard,
    port: u16,
}

impl PlainNats {
    fn start(dir: &Path) -> PlainNats {
        std::fs::create_dir_all(dir).expect("nats dir");
        let log = dir.join("nats-server.log");
        for _ in 0..5 {
            let port = free_port();
            let out = std::fs::File::create(&log).expect("nats log");
            let err = out.try_clone().expect("nats log");
            let mut cmd = std::process::Command::new(NatsServer::bin());
            cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            let mut child = ChildGuard::spawn("nats-server (no JetStream)", &mut cmd)
                .expect("spawn nats-server");
            let greeted = try_wait_for(Duration::from_secs(15), || {
                if !child.is_running() {
                    return Some(false);
                }
                greets(port).then_some(true)
            });
            if greeted == Some(true) {
                return PlainNats {
                    _child: child,
                    port,
                };
            }
        }
        panic!(
            "nats-server without JetStream did not start; log:\n{}",
            tail(&log, 20)
        )
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

fn greets(port: u16) -> bool {
    use std::io::{BufRead, BufReader};
    let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
}

// ---------------------------------------------------------------------------------------------
// 1. Every verb, as a third party sees it
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_answers_with_the_documented_json() {
    let node = NodeFixture::builder()
        .timeout(T)
        .node_id("web-1")
        .agent(|c| {
            c.groups(&["web"]);
        })
        .start()
        .await;
    let (nc, events) = (node.nc.clone(), &node.events);
    let port = node.haproxy.frontend_port();

    // status
    let reply = command(&nc, "web-1", "status", json!({"request_id": "s-1"})).await;
    let r = assert_ok(&reply, "web-1", json!("s-1"));
    let pid0 = node.serving_pid().await.expect("haproxy answers show info");
    assert_eq!(r["state"], "serving", "{r}");
    assert_eq!(r["node"], "web-1");
    assert_eq!(r["groups"], json!(["web"]));
    assert_eq!(
        r["haproxy"]["pid"], pid0,
        "status pid is the serving worker"
    );
    assert_eq!(
        r["haproxy"]["config_sha256"],
        sha256_hex(&node.config_bytes())
    );
    assert_eq!(r["old_workers"], json!([]));
    assert!(r["drain"].is_null(), "{r}");
    assert!(r["last_reload"].is_null(), "no reload yet: {r}");
    assert_eq!(http_status(port, "/").await, Some(200));
    // An empty body is the default request; no request_id gives a null one.
    let reply = request_json(&nc, "ebb.node.web-1.status", "").await;
    assert_ok(&reply, "web-1", Value::Null);

    // reload, onto a changed config
    node.haproxy
        .clone()
        .tag("v2")
        .write()
        .expect("write the v2 config");
    let file_sha = sha256_hex(&node.config_bytes());
    let reply = command(
        &nc,
        "web-1",
        "reload",
        json!({"request_id": "r-1", "requester": "bus-test", "reason": "new tag"}),
    )
    .await;
    let r = assert_ok(&reply, "web-1", json!("r-1")).clone();
    let reload_id = r["reload_id"].as_str().expect("reload_id").to_string();
    assert!(!reload_id.is_empty());
    let pid1 = r["pid"].as_u64().expect("pid") as u32;
    assert_ne!(pid1, pid0);
    assert_eq!(
        node.serving_pid().await,
        Some(pid1),
        "the new worker serves"
    );
    assert_eq!(r["old_pids"], json!([pid0]));
    assert!(r["duration_ms"].is_u64(), "{r}");
    assert_eq!(r["config_sha256"], file_sha, "sha256 of the file's bytes");
    let response = http_request(port, "/", true, T).await.expect("GET /");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-ebb-config"), Some("v2"));
    let ev = events
        .wait_kind("reloaded", |b| b["reload_id"] == reload_id.as_str())
        .await;
    for field in ["pid", "old_pids", "duration_ms", "config_sha256"] {
        assert_eq!(ev.body[field], r[field], "reloaded.{field}");
    }
    assert_eq!(ev.body["draining"], false);
    assert_eq!(ev.body["requester"], "bus-test", "requester copied");
    assert_eq!(ev.body["reason"], "new tag", "reason copied");
    events
        .wait_kind("worker_exited", |b| b["pid"] == pid0 && b["role"] == "old")
        .await;
    let reply = command(&nc, "web-1", "status", json!({})).await;
    let s = assert_ok(&reply, "web-1", Value::Null);
    assert_eq!(s["haproxy"]["pid"], pid1);
    assert_eq!(s["haproxy"]["config_sha256"], file_sha);
    assert_eq!(s["old_workers"], json!([]), "the idle old worker exited");
    assert_eq!(s["last_reload"]["reload_id"], reload_id.as_str());
    assert_eq!(s["last_reload"]["ok"], true);
    assert!(s["last_reload"]["duration_ms"].is_u64());
    assert!(s["last_reload"].get("error").is_none(), "{s}");

    // drain (a long min period keeps it draining)
    let reply = command(
        &nc,
        "web-1",
        "drain",
        json!({"request_id": "d-1", "drain_id": "drain-A", "min_period_ms": 600000, "reason": "kernel"}),
    )
    .await;
    let r = assert_ok(&reply, "web-1", json!("d-1"));
    assert_eq!(r["drain_id"], "drain-A");
    assert_eq!(r["already_draining"], false);
    assert_eq!(r["state"], "draining");
    assert!(r["drained_at"].is_null(), "{r}");
    let ev = events
        .wait_kind("drain_started", |b| b["drain_id"] == "drain-A")
        .await;
    assert_eq!(ev.body["min_period_ms"], 600000);
    assert_eq!(ev.body["reason"], "kernel");
    eventually("healthz 503 while draining", T, || async {
        (http_status(port, "/healthz").await == Some(503)).then_some(())
    })
    .await;
    let reply = command(&nc, "web-1", "status", json!({})).await;
    let s = assert_ok(&reply, "web-1", Value::Null);
    assert_eq!(s["state"], "draining");
    assert_eq!(s["drain"]["drain_id"], "drain-A");
    assert!(
        s["drain"]["blockers"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["kind"] == "min_period")),
        "{s}"
    );
    // a second drain joins the first
    let reply = command(
        &nc,
        "web-1",
        "drain",
        json!({"request_id": "d-2", "drain_id": "drain-B"}),
    )
    .await;
    let r = assert_ok(&reply, "web-1", json!("d-2"));
    assert_eq!(r["already_draining"], true);
    assert_eq!(r["drain_id"], "drain-A", "the drain in progress");
    assert_eq!(r["state"], "draining");

    // undrain
    let reply = command(&nc, "web-1", "undrain", json!({"request_id": "u-1"})).await;
    let r = assert_ok(&reply, "web-1", json!("u-1"));
    assert_eq!(r["drain_id"], "drain-A");
    assert_eq!(r["state"], "serving");
    events
        .wait_kind("undrained", |b| b["drain_id"] == "drain-A")
        .await;
    eventually("healthz 200 after undrain", T, || async {
        (http_status(port, "/healthz").await == Some(200)).then_some(())
    })
    .await;
    let reply = command(&nc, "web-1", "status", json!({})).await;
    let s = assert_ok(&reply, "web-1", Value::Null);
    assert_eq!(s["state"], "serving");
    assert!(s["drain"].is_null(), "{s}");
    // undrain when not draining is a successful no-op
    let reply = command(&nc, "web-1", "undrain", json!({})).await;
    let r = assert_ok(&reply, "web-1", Value::Null);
    assert!(r["drain_id"].is_null(), "{r}");
    assert_eq!(r["state"], "serving");

    // stop
    let reply = command(
        &nc,
        "web-1",
        "stop",
        json!({"request_id": "x-1", "timeout_ms": 5000}),
    )
    .await;
    let r = assert_ok(&reply, "web-1", json!("x-1"));
    assert_eq!(r["connections_cut"], 0);
    assert!(r["duration_ms"].is_u64(), "{r}");
    events
        .wait_kind("stopped", |b| b["connections_cut"] == 0)
        .await;
    let reply = command(&nc, "web-1", "status", json!({})).await;
    let s = assert_ok(&reply, "web-1", Value::Null);
    assert_eq!(s["state"], "stopped");
    assert!(s["haproxy"]["pid"].is_null(), "{s}");
    assert!(haproxy_pids_for(node.dir()).is_empty(), "no haproxy left");
    assert_eq!(http_status(port, "/").await, None, "nothing listens");
}

// ---------------------------------------------------------------------------------------------
// 2. Every error code
// ---------------------------------------------------------------------------------------------

/// Request errors, checked before anything happens; with push disabled. The server allows 4 MiB
/// payloads so the agent's own limit is what refuses a large request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_get_their_error_code_and_change_nothing() {
    let dir = TestDir::new();
    let nats = nats_with_config(&dir.join("nats"), "max_payload: 4194304\n");
    let nc = connect(&nats.url()).await;
    assert!(
        nc.server_info().max_payload >= 4 << 20,
        "raised max_payload"
    );
    let node = node_on(&nc, &nats.url(), dir.path(), "err-1").start().await;
    let events = &node.events;
    let before = status_snapshot(&nc, "err-1").await;
    let disk = node.config_bytes();
    let hour_ago = rfc3339(SystemTime::now() - Duration::from_secs(3600));
    let other_sha = sha256_hex(b"not the config on disk");

    let text = node.haproxy.render();
    let forbidden =
        json!({"request_id": "p-1", "config": text, "config_sha256": sha256_hex(text.as_bytes())})
            .to_string();
    let config_on_reload = json!({"request_id": "rc-1", "config": text}).to_string();
    let expired = |id: &str| json!({"request_id": id, "sent_at": hour_ago, "ttl_ms": 1000});
    // (verb, body, code, a word the message must name). The reply echoes the body's request_id
    // whenever the body is an object that has one, even when something else in it is wrong.
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "status",
            r#"{"request_id":"j-1","#.into(),
            "invalid_request",
            "",
        ),
        ("status", "not json".into(), "invalid_request", ""),
        ("status", "[1,2]".into(), "invalid_request", "object"),
        (
            "drain",
            r#"{"request_id":"t-1","ttl_ms":"x"}"#.into(),
            "invalid_request",
            "ttl_ms",
        ),
        (
            "drain",
            r#"{"request_id":"t-2","min_period_ms":-5}"#.into(),
            "invalid_request",
            "min_period_ms",
        ),
        (
            "drain",
            r#"{"request_id":"f-1","deadline":5}"#.into(),
            "invalid_request",
            "deadline",
        ),
        (
            "drain",
            r#"{"request_id":"f-2","timeout_ms":5}"#.into(),
            "invalid_request",
            "timeout_ms",
        ),
        (
            "status",
            r#"{"request_id":"f-3","ttl_ms":1000}"#.into(),
            "invalid_request",
            "sent_at",
        ),
        (
            "status",
            r#"{"request_id":"f-4","sent_at":"yesterday","ttl_ms":1}"#.into(),
            "invalid_request",
            "sent_at",
        ),
        (
            "reload",
            r#"{"request_id":"f-5","config_sha256":"ABC"}"#.into(),
            "invalid_request",
            "config_sha256",
        ),
        (
            "status",
            r#"{"request_id":""}"#.into(),
            "invalid_request",
            "request_id",
        ),
        (
            "explode",
            r#"{"request_id":"u-1"}"#.into(),
            "unknown_command",
            "explode",
        ),
        ("explode", String::new(), "unknown_command", "explode"),
        ("reload", expired("e-1").to_string(), "expired", ""),
        ("drain", expired("e-2").to_string(), "expired", ""),
        ("stop", expired("e-3").to_string(), "expired", ""),
        ("push", forbidden, "forbidden", "push.enabled"),
        ("reload", config_on_reload, "invalid_request", "`push`"),
        (
            "reload",
            json!({"request_id": "c-1", "config_sha256": other_sha}).to_string(),
            "conflict",
            "",
        ),
    ];
    for (verb, body, code, word) in &cases {
        // An invalid id (here the empty one) is not echoed.
        let request_id = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.get("request_id").cloned())
            .filter(|id| id != "")
            .unwrap_or(Value::Null);
        let reply = request_json(&nc, &format!("ebb.node.err-1.{verb}"), body.clone()).await;
        let message = assert_error(&reply, "err-1", request_id, code);
        assert!(
            message.contains(word),
            "{verb} {body}: message {message:?} should name {word:?}"
        );
        assert_eq!(
            status_snapshot(&nc, "err-1").await,
            before,
            "{verb} {body} changed nothing"
        );
    }
    // An unknown verb on the fleet subject too.
    let replies = gather(&nc, "ebb.all.explode", "{}", 1, T).await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_error(&replies[0], "err-1", Value::Null, "unknown_command");
    assert_eq!(status_snapshot(&nc, "err-1").await, before);

    // The agent's own size limit: exactly 64 KiB passes, one byte more is refused (padded with
    // JSON whitespace, since every field has a bound of its own; tests/limits.rs has the rest).
    let sized = |id: &str, size: usize| {
        let head = format!("{{\"request_id\":\"{id}\"");
        let body = format!("{head}{}}}", " ".repeat(size - head.len() - 1));
        assert_eq!(body.len(), size);
        body
    };
    let reply = request_json(&nc, "ebb.node.err-1.status", sized("big-ok", 64 << 10)).await;
    assert_ok(&reply, "err-1", json!("big-ok"));
    let reply = request_json(&nc, "ebb.node.err-1.reload", sized("big", (64 << 10) + 1)).await;
    let message = assert_error(&reply, "err-1", json!("big"), "invalid_request");
    assert!(message.contains("65536"), "{message}");
    assert_eq!(status_snapshot(&nc, "err-1").await, before);

    // Fresh sent_at + ttl, and the matching config_sha256, are accepted: the controls.
    let now = rfc3339(SystemTime::now());
    let reply = command(
        &nc,
        "err-1",
        "status",
        json!({"request_id": "ok-1", "sent_at": now, "ttl_ms": 30000}),
    )
    .await;
    assert_ok(&reply, "err-1", json!("ok-1"));
    assert_eq!(node.config_bytes(), disk, "the config on disk is untouched");

    // Nothing above caused an event: a successful reload is the first one after startup.
    let sync = command(
        &nc,
        "err-1",
        "reload",
        json!({"request_id": "sync", "config_sha256": sha256_hex(&disk)}),
    )
    .await;
    let sync_id = assert_ok(&sync, "err-1", json!("sync"))["reload_id"].clone();
    let (index, _) = events
        .wait_indexed("the sync reload's event", T, |e| {
            e.kind() == "reloaded" && e.body["reload_id"] == sync_id
        })
        .await;
    let caused: Vec<String> = events.all()[..index]
        .iter()
        .filter(|e| !is_background(e))
        .map(|e| e.body.to_string())
        .collect();
    assert!(
        caused.is_empty(),
        "refused commands caused events: {caused:?}"
    );

    // conflict: reload while drained (drain with no min period on an idle node).
    let reply = command(
        &nc,
        "err-1",
        "drain",
        json!({"drain_id": "dd", "min_period_ms": 0}),
    )
    .await;
    assert_ok(&reply, "err-1", Value::Null);
    events.wait_kind("drained", |b| b["drain_id"] == "dd").await;
    let drained = status_snapshot(&nc, "err-1").await;
    assert_eq!(drained["state"], "drained");
    let reply = command(&nc, "err-1", "reload", json!({"request_id": "c-2"})).await;
    assert_error(&reply, "err-1", json!("c-2"), "conflict");
    assert_eq!(status_snapshot(&nc, "err-1").await, drained);
    // undrain with another drain's id: conflict as well
    let reply = command(
        &nc,
        "err-1",
        "undrain",
        json!({"request_id": "c-3", "drain_id": "other"}),
    )
    .await;
    assert_error(&reply, "err-1", json!("c-3"), "conflict");
    assert_eq!(status_snapshot(&nc, "err-1").await, drained);
    let reply = command(&nc, "err-1", "undrain", json!({"drain_id": "dd"})).await;
    assert_eq!(assert_ok(&reply, "err-1", Value::Null)["state"], "serving");
}

/// Errors of the reload itself, with config push allowed: config_invalid, reload_failed, and a
/// pushed config whose hash does not match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reloads_leave_the_running_worker_serving() {
    let node = NodeFixture::builder()
        .timeout(T)
        .node_id("cfg-1")
        .agent(|c| {
            c.set("push", "enabled", "true");
        })
        .start()
        .await;
    let (nc, events) = (node.nc.clone(), &node.events);
    let port = node.haproxy.frontend_port();
    let good = node.config_bytes();
    let pid0 = node.serving_pid().await.expect("serving");
    let still_serving = |what: &'static str| {
        let node = &node;
        let good = &good;
        async move {
            assert_eq!(
                node.serving_pid().await,
                Some(pid0),
                "{what}: old worker serves"
            );
            assert_eq!(http_status(port, "/").await, Some(200), "{what}: GET / ok");
            assert_eq!(
                &node.config_bytes(),
                good,
                "{what}: config on disk unchanged"
            );
        }
    };

    // config_invalid: haproxy -c refuses it.
    let broken = node.haproxy.render_broken();
    let reply = command(
        &nc,
        "cfg-1",
        "push",
        json!({"request_id": "ci", "config": broken, "config_sha256": sha256_hex(broken.as_bytes())}),
    )
    .await;
    let message = assert_error(&reply, "cfg-1", json!("ci"), "config_invalid");
    still_serving("config_invalid").await;
    let failed = events.wait_kind("reload_failed", |_| true).await;
    // The message carries HAProxy's error output (PROTOCOL.md, config_invalid).
    assert!(
        message.contains("this-is-not-a-keyword"),
        "config_invalid message without HAProxy's error: {message}"
    );
    assert!(
        failed.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("this-is-not-a-keyword")),
        "{}",
        failed.body
    );

    // A pushed config with the wrong hash: invalid_request, nothing tried.
    let v2 = node.haproxy.clone().tag("v2").render();
    let reply = command(
        &nc,
        "cfg-1",
        "push",
        json!({"request_id": "bad-sha", "config": v2, "config_sha256": sha256_hex(&good)}),
    )
    .await;
    let message = assert_error(&reply, "cfg-1", json!("bad-sha"), "invalid_request");
    assert!(message.contains("config_sha256"), "{message}");
    still_serving("pushed sha mismatch").await;
    // An empty pushed config is invalid too.
    let reply = command(
        &nc,
        "cfg-1",
        "push",
        json!({"request_id": "empty", "config": "", "config_sha256": sha256_hex(b"")}),
    )
    .await;
    assert_error(&reply, "cfg-1", json!("empty"), "invalid_request");

    // reload_failed: the config on disk passes -c but cannot bind.
    let (taken, _holder) = node.haproxy.render_with_taken_port().expect("taken port");
    node.haproxy.write_text(&taken).expect("write");
    let reply = command(&nc, "cfg-1", "reload", json!({"request_id": "rf"})).await;
    let message = assert_error(&reply, "cfg-1", json!("rf"), "reload_failed");
    assert!(
        message.contains("bind"),
        "stderr tail in the message: {message}"
    );
    node.haproxy
        .write_text(std::str::from_utf8(&good).expect("utf-8"))
        .expect("restore");
    still_serving("reload_failed (disk)").await;
    let reply = command(&nc, "cfg-1", "status", json!({})).await;
    let s = assert_ok(&reply, "cfg-1", Value::Null);
    assert_eq!(s["last_reload"]["ok"], false, "{s}");
    assert!(s["last_reload"]["error"].is_string(), "{s}");
    assert_eq!(s["state"], "serving");
    assert_eq!(s["haproxy"]["pid"], pid0);

    // reload_failed with a pushed config: the file on disk is rolled back.
    let reply = command(
        &nc,
        "cfg-1",
        "push",
        json!({"request_id": "rf-push", "config": taken, "config_sha256": sha256_hex(taken.as_bytes())}),
    )
    .await;
    assert_error(&reply, "cfg-1", json!("rf-push"), "reload_failed");
    still_serving("reload_failed (pushed)").await;

    // And a good push works: on disk, hashed, serving.
    let reply = command(
        &nc,
        "cfg-1",
        "push",
        json!({"request_id": "push", "config": v2, "config_sha256": sha256_hex(v2.as_bytes())}),
    )
    .await;
    let r = assert_ok(&reply, "cfg-1", json!("push"));
    assert_eq!(r["config_sha256"], sha256_hex(v2.as_bytes()));
    assert_eq!(r["pushed"], true, "{r}");
    let reloaded = events
        .wait_kind("reloaded", |b| b["reload_id"] == r["reload_id"])
        .await;
    assert_eq!(reloaded.body["pushed"], true, "{:?}", reloaded.body);
    assert_eq!(node.config_bytes(), v2.as_bytes(), "pushed config on disk");
    assert_eq!(
        node.serving_pid().await,
        r["pid"].as_u64().map(|p| p as u32)
    );
    let response = http_request(port, "/", true, T).await.expect("GET /");
    assert_eq!(response.header("x-ebb-config"), Some("v2"));

    // conflict while drained, pushed or not.
    let reply = command(
        &nc,
        "cfg-1",
        "drain",
        json!({"drain_id": "d", "min_period_ms": 0}),
    )
    .await;
    assert_ok(&reply, "cfg-1", Value::Null);
    events.wait_kind("drained", |b| b["drain_id"] == "d").await;
    let drained = status_snapshot(&nc, "cfg-1").await;
    assert_eq!(drained["state"], "drained");
    let text = node.haproxy.render();
    let reply = command(
        &nc,
        "cfg-1",
        "push",
        json!({"request_id": "c-push", "config": text, "config_sha256": sha256_hex(text.as_bytes())}),
    )
    .await;
    assert_error(&reply, "cfg-1", json!("c-push"), "conflict");
    assert_eq!(node.config_bytes(), v2.as_bytes(), "nothing installed");
    assert_eq!(status_snapshot(&nc, "cfg-1").await, drained);
}

// ---------------------------------------------------------------------------------------------
// 3. A repeated request_id
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_replays_the_first_reply_and_acts_once() {
    let node = NodeFixture::builder()
        .timeout(T)
        .node_id("dup-1")
        .start()
        .await;
    let (nc, events) = (node.nc.clone(), &node.events);

    // One after the other.
    let body = json!({"request_id": "same"}).to_string();
    let first = request_raw(&nc, "ebb.node.dup-1.reload", body.clone()).await;
    let second = request_raw(&nc, "ebb.node.dup-1.reload", body).await;
    assert_eq!(first, second, "identical reply bytes");
    let first: Value = serde_json::from_slice(&first).expect("JSON");
    let same_id = assert_ok(&first, "dup-1", json!("same"))["reload_id"].clone();

    // At the same time: the second joins the first.
    let body = json!({"request_id": "twin"}).to_string();
    let (a, b) = tokio::join!(
        request_raw(&nc, "ebb.node.dup-1.reload", body.clone()),
        request_raw(&nc, "ebb.node.dup-1.reload", body.clone()),
    );
    assert_eq!(a, b, "concurrent repeats get the same reply");
    let twin: Value = serde_json::from_slice(&a).expect("JSON");
    let twin_id = assert_ok(&twin, "dup-1", json!("twin"))["reload_id"].clone();
    assert_ne!(twin_id, same_id);

    // A replayed drain reply still says "not already draining": it is the first reply.
    let body = json!({"request_id": "dr", "drain_id": "d1", "min_period_ms": 600000}).to_string();
    let d1 = request_raw(&nc, "ebb.node.dup-1.drain", body.clone()).await;
    let d2 = request_raw(&nc, "ebb.node.dup-1.drain", body).await;
    assert_eq!(d1, d2);
    let d1: Value = serde_json::from_slice(&d1).expect("JSON");
    assert_eq!(
        assert_ok(&d1, "dup-1", json!("dr"))["already_draining"],
        false
    );
    let reply = command(&nc, "dup-1", "undrain", json!({"request_id": "un"})).await;
    assert_ok(&reply, "dup-1", json!("un"));

    // Exactly one reloaded event for each, one drain_started: up to a later sync reload.
    let sync = command(&nc, "dup-1", "reload", json!({})).await;
    let sync_id = assert_ok(&sync, "dup-1", Value::Null)["reload_id"].clone();
    let (index, _) = events
        .wait_indexed("the sync reload's event", T, |e| {
            e.kind() == "reloaded" && e.body["reload_id"] == sync_id
        })
        .await;
    let before = &events.all()[..index];
    let reloads: Vec<&Value> = before
        .iter()
        .filter(|e| e.kind() == "reloaded")
        .map(|e| &e.body["reload_id"])
        .collect();
    assert_eq!(
        reloads,
        vec![&same_id, &twin_id],
        "one reload per request_id"
    );
    let drains = before
        .iter()
        .filter(|e| e.kind() == "drain_started")
        .count();
    assert_eq!(drains, 1, "one drain for the repeated drain request");
}

// ---------------------------------------------------------------------------------------------
// 4. Events: subject, envelope, Msg-Id, JetStream stream, KV record
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_the_envelope_and_land_in_the_stream_and_kv() {
    let dir = TestDir::new();
    let nats = NatsServer::start(&dir.join("nats")).expect("start nats-server");
    let nc = connect(&nats.url()).await;
    let info = request_json(&nc, "$JS.API.STREAM.INFO.EBB_EVENTS", "").await;
    assert_eq!(
        info["error"]["err_code"], 10059,
        "no stream before the agent: {info}"
    );
    let start = SystemTime::now();
    let beats = EventTap::subscribe(&nc, "ebb.heartbeat.ev-1").await;
    let mut node = node_on(&nc, &nats.url(), dir.path(), "ev-1")
        .events_subject("ebb.event.>")
        .agent(|c| {
            c.set_str("nats", "heartbeat", "1s");
        })
        .spawn()
        .await;
    let ready = node.wait_serving().await;
    let boot_id = ready["boot_id"].as_str().expect("boot_id").to_string();
    let pid0 = node.serving_pid().await.expect("serving");

    let started = node.events.wait_kind("agent_started", |_| true).await;
    let b = &started.body;
    assert_eq!(started.subject, "ebb.event.ev-1.agent_started");
    assert_eq!(b["v"], 1);
    assert_eq!(b["node"], "ev-1");
    assert_eq!(b["boot_id"], boot_id.as_str());
    assert_eq!(boot_id.len(), 36, "a UUID: {boot_id}");
    assert_eq!(b["seq"], 1, "seq starts at 1");
    assert_eq!(b["adopted"], false);
    assert_eq!(b["pid"], pid0);
    assert!(b["version"].is_string());
    assert_eq!(
        started.msg_id.as_deref(),
        Some(format!("ev-1.{boot_id}.1").as_str())
    );

    let reply = command(&nc, "ev-1", "reload", json!({"reason": "ev"})).await;
    let reload_id = assert_ok(&reply, "ev-1", Value::Null)["reload_id"].clone();
    node.events
        .wait_kind("reloaded", |b| b["reload_id"] == reload_id)
        .await;
    node.events
        .wait_kind("worker_exited", |b| b["pid"] == pid0)
        .await;
    beats
        .wait_kind("heartbeat", |b| b["state"] == "serving")
        .await;
    let end = SystemTime::now();

    // Envelope of every event so far; seq grows by one in arrival order.
    let all = node.events.all();
    for (i, e) in all.iter().enumerate() {
        let b = &e.body;
        let seq = b["seq"].as_u64().expect("seq");
        assert_eq!(seq, i as u64 + 1, "seq {i}: {b}");
        assert_eq!(e.subject, format!("ebb.event.ev-1.{}", e.kind()), "{b}");
        assert_eq!(b["v"], 1);
        assert_eq!(b["node"], "ev-1");
        assert_eq!(b["boot_id"], boot_id.as_str());
        assert_eq!(
            e.msg_id.as_deref(),
            Some(format!("ev-1.{boot_id}.{seq}").as_str()),
            "Nats-Msg-Id of {b}"
        );
        let time = b["time"].as_str().expect("time");
        let ms = parse_rfc3339_ms(time).unwrap_or_else(|| panic!("time {time:?} format"));
        assert!(
            ms >= unix_ms(start) - 1000 && ms <= unix_ms(end) + 1000,
            "time {time} within the test"
        );
    }

    // The stream was created by the agent, holds these events with their Msg-Ids.
    let info = request_json(&nc, "$JS.API.STREAM.INFO.EBB_EVENTS", "").await;
    assert_eq!(info["config"]["subjects"], json!(["ebb.event.>"]), "{info}");
    assert!(
        info["config"]["duplicate_window"].as_u64().unwrap_or(0) > 0,
        "{info}"
    );
    let stored = stream_messages(&nc, "EBB_EVENTS").await;
    for e in &all {
        assert!(
            stored
                .iter()
                .any(|(subject, id, body)| subject == &e.subject
                    && id == &e.msg_id
                    && body == &e.body),
            "event {} is in EBB_EVENTS",
            e.body
        );
    }

    // KV: the node's record, refreshed at every heartbeat.
    let info = request_json(&nc, "$JS.API.STREAM.INFO.KV_ebb_nodes", "").await;
    assert_eq!(
        info["config"]["max_age"].as_u64(),
        Some(3_000_000_000),
        "max_age is 3 x the 1 s heartbeat: {info}"
    );
    let js = async_nats::jetstream::new(nc.clone());
    let kv = js.get_key_value("ebb_nodes").await.expect("KV bucket");
    let record = |kv: async_nats::jetstream::kv::Store| async move {
        let value = kv.get("ev-1").await.ok()??;
        serde_json::from_slice::<Value>(&value).ok()
    };
    let first = eventually("a KV record", T, || record(kv.clone())).await;
    assert_eq!(first["node"], "ev-1");
    assert_eq!(first["state"], "serving");
    assert_eq!(first["boot_id"], boot_id.as_str());
    assert_eq!(first["heartbeat_ms"], 1000);
    let at = first["heartbeat_at"]
        .as_str()
        .expect("heartbeat_at")
        .to_string();
    assert!(parse_rfc3339_ms(&at).is_some(), "{at}");
    eventually(
        "a newer heartbeat_at in KV",
        Duration::from_secs(10),
        || {
            let kv = kv.clone();
            let at = at.clone();
            async move {
                let r = record(kv).await?;
                (r["heartbeat_at"].as_str()? != at).then_some(())
            }
        },
    )
    .await;
    // State changes reach KV too.
    let reply = command(
        &nc,
        "ev-1",
        "drain",
        json!({"drain_id": "kv-d", "min_period_ms": 600000}),
    )
    .await;
    assert_ok(&reply, "ev-1", Value::Null);
    eventually("KV says draining", T, || {
        let kv = kv.clone();
        async move {
            let r = record(kv).await?;
            (r["state"] == "draining" && r["drain_id"] == "kv-d").then_some(())
        }
    })
    .await;

    // A new agent process (adopting the running haproxy) has a new boot_id; seq starts again at 1.
    let worker = node.serving_pid().await.expect("serving");
    node.agent.signal(Signal::USR2).expect("SIGUSR2");
    assert!(node.agent.wait_exit(T).success());
    assert_eq!(
        node.serving_pid().await,
        Some(worker),
        "haproxy kept running"
    );
    node.restart_agent();
    let again = node
        .events
        .wait("agent_started of the second agent", |e| {
            e.kind() == "agent_started" && e.body["boot_id"] != boot_id.as_str()
        })
        .await;
    let boot2 = again.body["boot_id"].as_str().expect("boot_id").to_string();
    assert_eq!(again.body["seq"], 1);
    assert_eq!(again.body["adopted"], true);
    assert_eq!(again.body["pid"], worker);
    assert_eq!(
        again.msg_id.as_deref(),
        Some(format!("ev-1.{boot2}.1").as_str())
    );
    let reply = command(&nc, "ev-1", "status", json!({})).await;
    let s = assert_ok(&reply, "ev-1", Value::Null);
    assert_eq!(s["boot_id"], boot2.as_str());
    assert_eq!(s["state"], "draining", "the drain was resumed");
    assert_eq!(s["drain"]["drain_id"], "kv-d");
}

// ---------------------------------------------------------------------------------------------
// 5. A nats-server restart while events are produced
// ---------------------------------------------------------------------------------------------

/// Sends SIGHUP to an agent at a steady pace while the test waits for something.
struct Hup<'a> {
    agent: &'a Agent,
    tick: tokio::time::Interval,
    sent: u32,
}

impl Hup<'_> {
    async fn once(&mut self) {
        self.tick.tick().await;
        self.agent.signal(Signal::HUP).expect("SIGHUP");
        self.sent += 1;
    }

    /// Keeps signalling until `done`; panics after 60 s.
    async fn until(&mut self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.once().await;
        }
    }

    /// Keeps signalling while `task` (a blocking step such as a nats-server restart) runs.
    async fn during<T>(&mut self, task: tokio::task::JoinHandle<T>) -> T {
        tokio::pin!(task);
        loop {
            tokio::select! {
                done = &mut task => return done.expect("join the blocking task"),
                _ = self.once() => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_and_duplicates_no_event() {
    let dir = TestDir::new();
    let mut nats = NatsServer::start(&dir.join("nats")).expect("start nats-server");
    let nc = connect(&nats.url()).await;
    let node = node_on(&nc, &nats.url(), dir.path(), "rs-1")
        .agent(|c| {
            c.set_str("nats", "heartbeat", "1s");
        })
        .spawn()
        .await;
    let events = &node.events;
    let ready = node.wait_serving().await;
    let boot_id = ready["boot_id"].as_str().expect("boot_id").to_string();
    let reloaded = |e: &Event| e.kind() == "reloaded";

    // SIGHUP reloads every 40 ms (a load generator's pace, not a wait) around two outages.
    let mut hup = Hup {
        agent: &node.agent,
        tick: tokio::time::interval(Duration::from_millis(40)),
        sent: 0,
    };
    let made = |agent: &Agent| {
        agent
            .log_lines()
            .iter()
            .filter(|l| l["target"] == "ebb::event" && l["kind"] == "reloaded")
            .count()
    };
    hup.until("reloads before the restart", || events.count(reloaded) >= 3)
        .await;

    // 1: NatsServer::restart (graceful stop, start on the same port and store) during reloads.
    let before_restart = events.count(reloaded);
    let restart_started = Instant::now();
    let nats = hup
        .during(tokio::task::spawn_blocking(move || {
            nats.restart().map(|()| nats)
        }))
        .await
        .expect("restart nats-server");
    let restart_took = restart_started.elapsed();
    let seen = events.count(reloaded);
    hup.until("reloads after the restart", || {
        events.count(reloaded) >= seen + 3
    })
    .await;

    // 2: a longer outage, with reloads made while NATS is away (they wait in the outbox).
    let mut nats = hup
        .during(tokio::task::spawn_blocking(move || {
            let mut nats = nats;
            nats.stop().map(|()| nats)
        }))
        .await
        .expect("stop nats-server");
    let made_at_stop = made(&node.agent);
    hup.until("3 reloads while NATS is down", || {
        made(&node.agent) >= made_at_stop + 3
    })
    .await;
    let made_offline = made(&node.agent) - made_at_stop;
    let nats = hup
        .during(tokio::task::spawn_blocking(move || {
            nats.start_again().map(|()| nats)
        }))
        .await
        .expect("start nats-server again");
    let seen = events.count(reloaded);
    hup.until("reloads after the outage", || {
        events.count(reloaded) >= seen + 3
    })
    .await;
    let hups = hup.sent;

    // A last reload, over NATS, marks the end.
    let reply = command(&nc, "rs-1", "reload", json!({"request_id": "marker"})).await;
    let marker = assert_ok(&reply, "rs-1", json!("marker"))["reload_id"].clone();
    let mark = events
        .wait_kind("reloaded", |b| b["reload_id"] == marker)
        .await;
    let marker_seq = mark.body["seq"].as_u64().expect("seq");

    let stored = stream_messages(&nc, "EBB_EVENTS").await;
    let mut seqs = Vec::new();
    let mut ids = BTreeSet::new();
    for (subject, msg_id, body) in &stored {
        assert!(subject.starts_with("ebb.event.rs-1."), "{subject}");
        assert_eq!(body["boot_id"], boot_id.as_str(), "one agent, one boot");
        let seq = body["seq"].as_u64().expect("seq");
        assert_eq!(
            msg_id.as_deref(),
            Some(format!("rs-1.{boot_id}.{seq}").as_str())
        );
        assert!(ids.insert(msg_id.clone()), "duplicate Msg-Id {msg_id:?}");
        seqs.push(seq);
    }
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "the stream holds seq 1..N exactly once, in order"
    );
    assert!(
        seqs.len() as u64 >= marker_seq,
        "the stream has every event up to the marker (seq {marker_seq}); it has {}",
        seqs.len()
    );
    // Every event the agent made (its log lists each) up to the marker is in the stream.
    let logged: BTreeSet<u64> = node
        .agent
        .log_lines()
        .iter()
        .filter(|l| l["target"] == "ebb::event" && l["seq"].is_u64())
        .filter_map(|l| l["seq"].as_u64())
        .filter(|s| *s <= marker_seq)
        .collect();
    assert_eq!(
        logged,
        (1..=marker_seq).collect::<BTreeSet<u64>>(),
        "the agent logged seq 1..marker"
    );
    eprintln!(
        "nats restart: {hups} SIGHUPs, {} reloaded events seen ({before_restart} before the \
         restart, which took {restart_took:?}; {made_offline} made while NATS was down), \
         {} events in the stream, marker seq {marker_seq}",
        events.count(reloaded),
        seqs.len()
    );
    drop(nats);
}

// ---------------------------------------------------------------------------------------------
// 6. A fleet of 20 agents
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agents_answer_fleet_requests_and_ctl() {
    const N: usize = 20;
    let ids: Vec<String> = (0..N).map(|i| format!("n{i:02}")).collect();
    let started = Instant::now();
    let fleet = Fleet::start(&ids, |_, node| {
        node.timeout(T).agent(|c| {
            c.groups(&["g"])
                .set_str("nats", "heartbeat", "2s")
                .log_level("warn");
        })
    })
    .await;
    fleet.wait_serving().await;
    let nc = fleet.nc.clone();
    eprintln!("{N} agents ready in {:?}", started.elapsed());
    let want: BTreeSet<String> = ids.iter().cloned().collect();

    for subject in ["ebb.all.status", "ebb.group.g.status"] {
        let asked = Instant::now();
        let replies = gather(
            &nc,
            subject,
            "{\"request_id\":\"fleet\"}",
            N,
            Duration::from_secs(30),
        )
        .await;
        let got: BTreeSet<String> = replies
            .iter()
            .map(|r| r["node"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(got, want, "{subject}: every node answers once");
        assert_eq!(replies.len(), N, "{subject}: one reply per node");
        for r in &replies {
            let node = r["node"].as_str().unwrap_or_default();
            let s = assert_ok(r, node, json!("fleet"));
            assert_eq!(s["state"], "serving");
            assert_eq!(s["node"], node);
            assert_eq!(s["groups"], json!(["g"]));
        }
        eprintln!("{subject}: {N} replies in {:?}", asked.elapsed());
    }

    // ebb ctl learns the fleet from KV: let every agent's record be there first.
    let js = async_nats::jetstream::new(nc.clone());
    eventually("20 KV records", T, || {
        let js = js.clone();
        async move {
            let kv = js.get_key_value("ebb_nodes").await.ok()?;
            let keys: BTreeSet<String> = kv
                .keys()
                .await
                .ok()?
                .filter_map(|k| async { k.ok() })
                .collect()
                .await;
            (keys.len() >= N).then_some(())
        }
    })
    .await;

    let url = fleet.nats_url();
    let (code, out, err) = ctl(&["--nats", &url, "status", "--all", "--json"]).await;
    assert_eq!(code, 0, "ebb ctl status --all --json: {out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl JSON ({e}): {out}"));
    let listed: BTreeSet<String> = v["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .map(|r| r["node"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(listed, want, "ctl --all lists every node: {out}");
    assert_eq!(v["missing"], json!([]));
    assert!(v["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .all(|r| r["ok"] == true && r["result"]["state"] == "serving"));

    let (code, out, err) = ctl(&["--nats", &url, "status", "--group", "g"]).await;
    assert_eq!(code, 0, "ebb ctl status --group g: {out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|h| h.contains("NODE") && h.contains("STATE")),
        "a table header: {out}"
    );
    for id in &ids {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().next() == Some(id) && l.contains("serving")),
            "{id} in the table:\n{out}"
        );
    }

    let (code, out, err) = ctl(&[
        "--nats",
        &url,
        "--timeout",
        "1s",
        "status",
        "--node",
        "nope",
    ])
    .await;
    assert_eq!(code, 3, "unknown node: timeout exit code\n{out}\n{err}");
    drop(fleet);
}

// ---------------------------------------------------------------------------------------------
// 7. Auth
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_auth() {
    let dir = TestDir::new();
    let nats = nats_with_config(
        &dir.join("nats"),
        "authorization {\n  user: \"ebb\"\n  password: \"s3cret pw\"\n}\n",
    );
    let nc = connect_with(
        ConnectOptions::with_user_and_password("ebb".into(), "s3cret pw".into()),
        &nats.url(),
    )
    .await;
    let node = node_on(&nc, &nats.url(), dir.path(), "up-1")
        .agent(|c| {
            c.set_str("nats", "user", "ebb")
                .set_str("nats", "password", "s3cret pw");
        })
        .start()
        .await;
    let events = &node.events;
    let reply = command(&nc, "up-1", "reload", json!({})).await;
    let id = assert_ok(&reply, "up-1", Value::Null)["reload_id"].clone();
    events.wait_kind("reloaded", |b| b["reload_id"] == id).await;

    for opts in [
        ConnectOptions::new(),
        ConnectOptions::with_user_and_password("ebb".into(), "wrong".into()),
    ] {
        let refused = tokio::time::timeout(T, opts.connect(nats.url())).await;
        assert!(
            matches!(refused, Ok(Err(_))),
            "a client without the right credentials is refused at connect"
        );
    }
    let url = nats.url();
    let (code, out, err) = ctl(&[
        "--nats",
        &url,
        "--user",
        "ebb",
        "--password",
        "s3cret pw",
        "status",
        "--node",
        "up-1",
    ])
    .await;
    assert_eq!(code, 0, "ctl with credentials: {out}\n{err}");
    let (code, _, _) = ctl(&["--nats", &url, "status", "--node", "up-1"]).await;
    assert_eq!(code, 3, "ctl without credentials cannot connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth() {
    let dir = TestDir::new();
    let nats = nats_with_config(
        &dir.join("nats"),
        "authorization {\n  token: \"tok-8e1f\"\n}\n",
    );
    let nc = connect_with(ConnectOptions::with_token("tok-8e1f".into()), &nats.url()).await;
    let _node = node_on(&nc, &nats.url(), dir.path(), "tk-1")
        .agent(|c| {
            c.set_str("nats", "token", "tok-8e1f");
        })
        .start()
        .await;
    let status = request_json(&nc, "ebb.node.tk-1.status", "").await;
    assert_ok(&status, "tk-1", Value::Null);
    let refused = tokio::time::timeout(T, ConnectOptions::new().connect(nats.url())).await;
    assert!(matches!(refused, Ok(Err(_))), "no token, no connection");
}

/// Runs `openssl ARGS…` in `dir`; `None` when openssl is missing.
fn openssl(dir: &Path, args: &[&str]) -> Option<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made on the fly.
fn make_certs(dir: &Path) -> Option<()> {
    std::fs::create_dir_all(dir).expect("certs dir");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ebb test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca)?;
    for (name, usage, san) in [
        (
            "server",
            "serverAuth",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        ),
        ("client", "clientAuth", ""),
    ] {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n{san}"),
        )
        .expect("ext file");
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN=ebb test {name}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        )?;
    }
    Some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let dir = TestDir::new();
    let certs = dir.join("certs");
    if make_certs(&certs).is_none() {
        eprintln!("skipped: openssl is not installed");
        return;
    }
    let p = |name: &str| certs.join(name).display().to_string();
    let nats = nats_with_config(
        &dir.join("nats"),
        &format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}\n",
            p("server.pem"),
            p("server.key"),
            p("ca.pem")
        ),
    );
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let tls = || {
        ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(certs.join("ca.pem"))
            .add_client_certificate(certs.join("client.pem"), certs.join("client.key"))
    };
    let nc = connect_with(tls(), &url).await;
    let _node = node_on(&nc, &url, dir.path(), "tls-1")
        .agent(|c| {
            c.set_path("nats", "tls_ca", &certs.join("ca.pem"))
                .set_path("nats", "tls_cert", &certs.join("client.pem"))
                .set_path("nats", "tls_key", &certs.join("client.key"));
        })
        .start()
        .await;
    let reply = command(&nc, "tls-1", "reload", json!({"request_id": "tls"})).await;
    assert_ok(&reply, "tls-1", json!("tls"));

    let plain = tokio::time::timeout(T, ConnectOptions::new().connect(nats.url())).await;
    assert!(
        matches!(plain, Ok(Err(_))),
        "a client without TLS is refused"
    );
    let no_cert = tokio::time::timeout(
        T,
        ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(certs.join("ca.pem"))
            .connect(url.clone()),
    )
    .await;
    assert!(
        matches!(no_cert, Ok(Err(_))),
        "a client without a certificate is refused"
    );
    let (code, out, err) = ctl(&[
        "--nats",
        &url,
        "--tls-ca",
        &p("ca.pem"),
        "--tls-cert",
        &p("client.pem"),
        "--tls-key",
        &p("client.key"),
        "status",
        "--node",
        "tls-1",
    ])
    .await;
    assert_eq!(code, 0, "ctl over TLS: {out}\n{err}");
}

// NKeys: an ed25519 key made by openssl, encoded by hand (base32 + CRC-16/XMODEM, as in the
// nkeys crate), so no extra dependency is needed.

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in data {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn nkey_encode(prefix: &[u8], raw: &[u8]) -> String {
    let mut data = prefix.to_vec();
    data.extend_from_slice(raw);
    let crc = crc16_xmodem(&data);
    data.extend_from_slice(&crc.to_le_bytes());
    base32(&data)
}

/// (public user key `U…`, seed `SU…`), or `None` without openssl.
fn make_user_nkey(dir: &Path) -> Option<(String, String)> {
    std::fs::create_dir_all(dir).expect("nkey dir");
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "ed25519",
            "-outform",
            "DER",
            "-out",
            "user.der",
        ],
    )?;
    openssl(
        dir,
        &[
            "pkey",
            "-inform",
            "DER",
            "-in",
            "user.der",
            "-pubout",
            "-outform",
            "DER",
            "-out",
            "user.pub.der",
        ],
    )?;
    let private = std::fs::read(dir.join("user.der")).expect("key");
    let public = std::fs::read(dir.join("user.pub.der")).expect("pub");
    let (seed, key) = (&private[private.len() - 32..], &public[public.len() - 32..]);
    const SEED: u8 = 18 << 3;
    const USER: u8 = 20 << 3;
    Some((
        nkey_encode(&[USER], key),
        nkey_encode(&[SEED | (USER >> 5), (USER & 31) << 3], seed),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_auth() {
    let dir = TestDir::new();
    let Some((public, seed)) = make_user_nkey(&dir.join("nkey")) else {
        eprintln!("skipped: openssl is not installed");
        return;
    };
    assert!(
        public.starts_with('U') && seed.starts_with("SU"),
        "{public} {seed}"
    );
    let seed_file = dir.join("nkey/user.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("seed file");
    let nats = nats_with_config(
        &dir.join("nats"),
        &format!("authorization {{\n  users: [ {{ nkey: \"{public}\" }} ]\n}}\n"),
    );
    let nc = connect_with(ConnectOptions::with_nkey(seed.clone()), &nats.url()).await;
    let _node = node_on(&nc, &nats.url(), dir.path(), "nk-1")
        .agent(|c| {
            c.set_path("nats", "nkey_seed", &seed_file);
        })
        .start()
        .await;
    let refused = tokio::time::timeout(T, ConnectOptions::new().connect(nats.url())).await;
    assert!(matches!(refused, Ok(Err(_))), "no nkey, no connection");
}

// Creds file: the server runs in operator mode (decentralized JWT auth); the operator signs the
// account, the account signs the user, and the user's JWT and seed form the creds file.

fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = json!({
        "jti": "", "iat": iat, "iss": issuer.public_key(), "name": name, "sub": subject, "nats": nats,
    });
    // The JWT id is a hash of the claims; any unique value passes the server's checks.
    claims["jti"] = Value::String(format!(
        "{:X}",
        Sha256::digest(claims.to_string().as_bytes())
    ));
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = issuer.sign(signing_input.as_bytes()).expect("sign a JWT");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_auth() {
    let dir = TestDir::new();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "op",
        json!({"type": "operator", "version": 2}),
    );
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "fleet",
        json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "ebb",
        json!({"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1}),
    );
    let creds = dir.join("ebb.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("user seed")
        ),
    )
    .expect("write the creds file");
    std::fs::create_dir_all(dir.join("nats")).expect("nats dir");
    let operator_file = dir.join("nats/operator.jwt");
    std::fs::write(&operator_file, &operator_jwt).expect("operator jwt");
    let nats = nats_with_config(
        &dir.join("nats"),
        &format!(
            "operator: \"{}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: \"{account_jwt}\"\n  {sys}: \"{system_jwt}\"\n}}\n",
            operator_file.display(),
            account.public_key(),
            sys = system.public_key(),
        ),
    );
    let nc = connect_with(
        ConnectOptions::with_credentials_file(&creds)
            .await
            .expect("read the creds file"),
        &nats.url(),
    )
    .await;
    let _node = node_on(&nc, &nats.url(), dir.path(), "cr-1")
        .agent(|c| {
            c.set_path("nats", "creds", &creds);
        })
        .start()
        .await;
    let reply = command(&nc, "cr-1", "status", json!({})).await;
    assert_ok(&reply, "cr-1", Value::Null);

    let refused = tokio::time::timeout(T, ConnectOptions::new().connect(nats.url())).await;
    assert!(matches!(refused, Ok(Err(_))), "no creds, no connection");
    let url = nats.url();
    let creds_arg = creds.to_string_lossy().to_string();
    let (code, out, err) = ctl(&[
        "--nats", &url, "--creds", &creds_arg, "status", "--node", "cr-1",
    ])
    .await;
    assert_eq!(code, 0, "ctl with the creds file: {out}\n{err}");
}

// ---------------------------------------------------------------------------------------------
// 8. Service discovery
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_discoverable_as_micro_service_ebb() {
    let fleet = Fleet::start(&["sd-1", "sd-2"], |id, node| {
        let node = node.timeout(T);
        if id == "sd-1" {
            node.agent(|c| {
                c.groups(&["g1", "g2"]);
            })
        } else {
            node
        }
    })
    .await;
    fleet.wait_serving().await;
    let nc = fleet.nc.clone();
    for _ in 0..3 {
        assert_ok(
            &command(&nc, "sd-1", "status", json!({})).await,
            "sd-1",
            Value::Null,
        );
    }

    let nodes_of = |replies: &[Value]| -> BTreeMap<String, Value> {
        replies
            .iter()
            .map(|r| {
                (
                    r["metadata"]["node"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    r.clone(),
                )
            })
            .collect()
    };
    let ping = nodes_of(&gather(&nc, "$SRV.PING.ebb", "", 2, T).await);
    assert_eq!(
        ping.keys().map(String::as_str).collect::<Vec<_>>(),
        ["sd-1", "sd-2"],
        "{ping:?}"
    );
    for r in ping.values() {
        assert_eq!(r["name"], "ebb");
        assert_eq!(r["type"], "io.nats.micro.v1.ping_response");
        assert!(r["id"].is_string() && r["version"].is_string(), "{r}");
    }
    assert_eq!(ping["sd-1"]["metadata"]["groups"], "g1,g2");

    let info = nodes_of(&gather(&nc, "$SRV.INFO.ebb", "", 2, T).await);
    assert_eq!(info.len(), 2, "{info:?}");
    let sd1 = &info["sd-1"];
    assert_eq!(sd1["name"], "ebb");
    assert_eq!(sd1["type"], "io.nats.micro.v1.info_response");
    let endpoints: BTreeMap<String, String> = sd1["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| {
            assert_eq!(e["queue_group"], "sd-1", "queue group = node id: {e}");
            (
                e["subject"].as_str().unwrap_or_default().to_string(),
                e["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let subjects: Vec<&str> = endpoints.keys().map(String::as_str).collect();
    assert_eq!(
        subjects,
        [
            "ebb.all.*",
            "ebb.group.g1.*",
            "ebb.group.g2.*",
            "ebb.node.sd-1.*"
        ],
        "{sd1}"
    );

    // async-nats 0.51 leaves `metadata` out of the stats response (ADR-32 has it): match the
    // replies to nodes by service id, and check that the queue group is the node id.
    let stats: BTreeMap<String, Value> = gather(&nc, "$SRV.STATS.ebb", "", 2, T)
        .await
        .into_iter()
        .map(|r| {
            let node = ping
                .iter()
                .find(|(_, p)| p["id"] == r["id"])
                .map(|(node, _)| node.clone())
                .unwrap_or_else(|| panic!("a stats reply from an instance that PING found: {r}"));
            if let Some(meta) = r.get("metadata") {
                assert_eq!(meta["node"], node.as_str(), "{r}");
            }
            for e in r["endpoints"].as_array().expect("endpoints") {
                assert_eq!(e["queue_group"], node.as_str(), "{e}");
            }
            (node, r)
        })
        .collect();
    assert_eq!(stats.len(), 2, "{stats:?}");
    let sd1 = &stats["sd-1"];
    assert_eq!(sd1["name"], "ebb");
    assert_eq!(sd1["type"], "io.nats.micro.v1.stats_response");
    let node_endpoint = sd1["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["subject"] == "ebb.node.sd-1.*")
        .unwrap_or_else(|| panic!("node endpoint in {sd1}"))
        .clone();
    assert!(
        node_endpoint["num_requests"].as_u64().unwrap_or(0) >= 4,
        "requests counted: {node_endpoint}"
    );
    // The id of one instance answers alone.
    let id = ping["sd-2"]["id"].as_str().expect("id");
    let one = gather(
        &nc,
        &format!("$SRV.PING.ebb.{id}"),
        "",
        2,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["metadata"]["node"], "sd-2");
}

// ---------------------------------------------------------------------------------------------
// 9. Without JetStream
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_jetstream_events_are_core_messages() {
    let dir = TestDir::new();
    let nats = PlainNats::start(&dir.join("nats"));
    let nc = connect(&nats.url()).await;
    assert!(
        tokio::time::timeout(T, nc.request("$JS.API.INFO", Bytes::new()))
            .await
            .expect("an answer")
            .is_err(),
        "no JetStream on this server"
    );
    let beats = EventTap::subscribe(&nc, "ebb.heartbeat.nojs-1").await;
    let node = node_on(&nc, &nats.url(), dir.path(), "nojs-1")
        .agent(|c| {
            c.set_str("nats", "heartbeat", "1s");
        })
        .spawn()
        .await;
    let events = &node.events;
    let ready = node.wait_serving().await;
    let boot_id = ready["boot_id"].as_str().expect("boot_id").to_string();
    let started = events.wait_kind("agent_started", |_| true).await;
    assert_eq!(started.body["seq"], 1);
    assert_eq!(
        started.msg_id.as_deref(),
        Some(format!("nojs-1.{boot_id}.1").as_str())
    );

    let reply = command(&nc, "nojs-1", "reload", json!({"request_id": "nojs"})).await;
    let r = assert_ok(&reply, "nojs-1", json!("nojs"));
    assert_eq!(r["config_sha256"], sha256_hex(&node.config_bytes()));
    let id = r["reload_id"].clone();
    let ev = events.wait_kind("reloaded", |b| b["reload_id"] == id).await;
    assert!(ev.msg_id.is_some(), "Msg-Id header on core events too");
    beats.wait_kind("heartbeat", |_| true).await;
    let reply = command(
        &nc,
        "nojs-1",
        "drain",
        json!({"drain_id": "nd", "min_period_ms": 0}),
    )
    .await;
    assert_ok(&reply, "nojs-1", Value::Null);
    events.wait_kind("drained", |b| b["drain_id"] == "nd").await;
    let reply = command(&nc, "nojs-1", "status", json!({})).await;
    assert_eq!(assert_ok(&reply, "nojs-1", Value::Null)["state"], "drained");
    let seqs: Vec<u64> = events
        .all()
        .iter()
        .filter_map(|e| e.body["seq"].as_u64())
        .collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "core events in order, none missing");
}

/// Not a test of the agent: the date helpers above, which other checks rely on.
#[test]
fn date_helpers_round_trip() {
    let t = UNIX_EPOCH + Duration::from_millis(1_714_564_830_012);
    assert_eq!(rfc3339(t), "2024-05-01T12:00:30.012Z");
    assert_eq!(
        parse_rfc3339_ms("2024-05-01T12:00:30.012Z"),
        Some(1_714_564_830_012)
    );
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        parse_rfc3339_ms("2000-02-29T23:59:59.999Z"),
        Some(951_868_799_999)
    );
    let now = SystemTime::now();
    assert_eq!(parse_rfc3339_ms(&rfc3339(now)), Some(unix_ms(now)));
    assert_eq!(parse_rfc3339_ms("2024-05-01 12:00:30Z"), None);
    assert_eq!(
        nkey_encode(&[20 << 3], &[0; 32]).len(),
        56,
        "a public nkey has 56 characters"
    );
}
