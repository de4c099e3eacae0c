//! HAProxy supervision (docs/ARCHITECTURE.md, "The node's lifecycle" and "Invariants") end to end:
//! the real `ebb agent` binary with its own haproxy, a real nats-server, the demo backend, and real
//! TCP clients.
//!
//! What an operator relies on, one test each:
//! - a reload never cuts a request: a long request finishes on the old worker, which exits right
//!   after it; hundreds of reloads under load lose nothing;
//! - a reload that cannot work (bad config, taken port) leaves the running worker serving;
//! - the agent's own death, restart or upgrade never touches HAProxy: the next agent adopts it,
//!   old workers included, and never signals a process that merely reuses a recorded pid;
//! - a crashed worker is restarted; SIGTERM stops HAProxy gracefully and leaves nothing behind;
//! - `ebb config check` explains every mistake in one line.
//!
//! Tests synchronize on events (stamped on receipt) and polled conditions, never on bare sleeps.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const EBB: &str = env!("CARGO_BIN_EXE_ebb");
const NODE: &str = NODE_ID;
/// Default timeout of every wait. Generous: the tests share a 2-core machine.
const T: Duration = Duration::from_secs(30);
/// Reloads per load test, back to back: enough for a rare lost request to show, few enough to keep
/// the test short. docs/BENCHMARKS.md, "Reloads under load", reports what they measure.
const RELOADS: usize = 200;
/// Load generator workers.
const CONCURRENCY: usize = 8;

// ---------------------------------------------------------------------------------------------
// One node: nats-server, backend, haproxy.cfg, agent
// ---------------------------------------------------------------------------------------------

/// A serving node: nats-server, the demo backend, an agent (which starts haproxy), and a tap on
/// the node's events from before the agent started.
async fn start_node() -> NodeFixture {
    NodeFixture::builder().timeout(T).start().await
}

/// A reload that must succeed: checks its result and returns (new pid, result).
async fn reload(node: &NodeFixture) -> (u32, Value) {
    let result = node.ok("reload", json!({})).await;
    let pid = as_pid(&result["pid"]);
    assert!(
        result["duration_ms"].is_u64() && result["config_sha256"].is_string(),
        "{result}"
    );
    (pid, result)
}

fn old_worker_pids(status: &Value) -> Vec<u32> {
    status["old_workers"]
        .as_array()
        .map(|a| a.iter().map(|w| as_pid(&w["pid"])).collect())
        .unwrap_or_default()
}

/// A backend whose `/hold` requests are answered only once the test calls [`Gate::release`], so
/// a request stays in flight exactly as long as the test needs, with no duration to race against.
/// Anything else is answered `ok` at once. HTTP/1.1 keep-alive, as haproxy talks to backends.
struct Gate {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Gate {
    async fn start() -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gated backend");
        let addr = listener.local_addr().expect("local addr");
        let (open, opened) = watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(Gate::serve(stream, opened.clone()));
            }
        });
        Gate { addr, open, task }
    }

    async fn serve(mut stream: tokio::net::TcpStream, mut opened: watch::Receiver<bool>) {
        let mut buf = Vec::new();
        loop {
            let head_end = loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            buf.drain(..head_end);
            let held = head.split_whitespace().nth(1) == Some("/hold");
            let body = if held {
                if opened.wait_for(|&open| open).await.is_err() {
                    return;
                }
                "released\n"
            } else {
                "ok\n"
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers every `/hold` request, held or to come.
    fn release(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The event a JSON log line carries (target `ebb::event`, field `event`), if any.
fn log_event(line: &Value) -> Option<Value> {
    let text = line
        .get("event")
        .or_else(|| line.pointer("/fields/event"))?
        .as_str()?;
    serde_json::from_str(text).ok()
}

fn send_signal(pid: u32, signal: Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, signal).expect("send a signal");
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The load tests saturate the 2 cores: they run alone (write), and the test whose assertions
/// involve a fixed request duration (test 1) never runs beside them (read). Everything else runs
/// in parallel.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---------------------------------------------------------------------------------------------
// 1. A reload never cuts a request in flight
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_survives_a_reload_and_its_old_worker_exits_right_after() {
    let _not_beside_the_load_tests = MACHINE.read().await;
    let node = start_node().await;
    let w0 = node.serving_pid().await.expect("a worker serves");

    // A 3 s request in flight on worker W0...
    let sent = Instant::now();
    let slow = spawn_get(node.port(), "/slow?ms=3000");
    wait_until_async(T, "W0 to hold the slow request", || async {
        node.curr_conns().await == Some(1)
    })
    .await;

    // ...then a reload: W1 takes over the listeners and serves new requests at once.
    let (w1, result) = reload(&node).await;
    assert_ne!(w1, w0);
    assert_eq!(result["old_pids"], json!([w0]), "{result}");
    assert_eq!(node.serving_pid().await, Some(w1));
    node.assert_serves().await;

    // W0 was told to finish, not killed: it is alive and tracked with its one connection.
    assert!(is_alive(w0), "the old worker must wait for its request");
    let status = node.status().await;
    assert_eq!(status["haproxy"]["pid"], w1, "{status}");
    assert_eq!(
        status["old_workers"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    assert_eq!(status["old_workers"][0]["pid"], w0, "{status}");
    assert_eq!(status["old_workers"][0]["connections"], 1, "{status}");

    // The request gets its full answer, and only then does W0 exit, at once.
    let done = full_200(slow, "slept 3000 ms\n").await;
    assert!(done - sent >= Duration::from_millis(3000));
    let exited = node
        .events
        .wait_kind("worker_exited", |b| b["pid"] == w0)
        .await;
    assert_eq!(exited.body["role"], "old", "{}", exited.body);
    assert_eq!(exited.body["status"], 0, "{}", exited.body);
    assert_eq!(exited.body["hard_stopped"], false, "{}", exited.body);
    assert_eq!(exited.body["connections_cut"], 0, "{}", exited.body);
    assert!(
        exited.at >= done,
        "worker_exited arrived {:?} before the response completed",
        done - exited.at
    );
    let lag = exited.at - done;
    println!("old worker exit reported {lag:?} after the response");
    assert!(
        lag <= Duration::from_secs(1),
        "worker_exited came {lag:?} after the response"
    );
    let status = node.status().await;
    assert_eq!(status["old_workers"], json!([]), "{status}");
    assert_eq!(node.haproxy_pids().await, vec![w1]);
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. Hundreds of reloads under load
// ---------------------------------------------------------------------------------------------

/// Runs `RELOADS` sequential reloads over NATS while `CONCURRENCY` clients in `mode` send
/// requests; returns the load report once every old worker has exited.
async fn reloads_under_load(mode: LoadMode, frontend_lines: &[&str]) -> LoadReport {
    let _alone = MACHINE.write().await;
    let node = NodeFixture::builder()
        .timeout(T)
        .haproxy(|h| {
            frontend_lines
                .iter()
                .fold(h, |h, line| h.frontend_line(line))
        })
        .start()
        .await;
    let load = LoadGen::builder(node.port())
        .concurrency(CONCURRENCY)
        .mode(mode)
        .start();
    let load = blocking(move || {
        load.wait_for_ok(100, T);
        load
    })
    .await;

    let started = Instant::now();
    let ok_before = load.ok_count();
    let mut durations = Vec::with_capacity(RELOADS);
    let mut last = node.serving_pid().await.expect("a worker serves");
    for i in 0..RELOADS {
        let reply = node.command("reload", json!({})).await;
        assert_eq!(reply["ok"], true, "reload {i} of {RELOADS} failed: {reply}");
        let result = &reply["result"];
        assert_eq!(result["old_pids"], json!([last]), "reload {i}: {result}");
        last = as_pid(&result["pid"]);
        durations.push(result["duration_ms"].as_u64().expect("duration_ms"));
    }
    let elapsed = started.elapsed();
    let during = load.ok_count() - ok_before;

    // The last worker serves the load...
    let target = load.ok_count() + 100;
    let load = blocking(move || {
        load.wait_for_ok(target, T);
        load
    })
    .await;
    // ...and every displaced worker exits, each reported once.
    node.events
        .wait_n("worker_exited", RELOADS, |b| b["role"] == "old")
        .await;
    let status = node
        .wait_status("every old worker to exit", |s| {
            s["old_workers"] == json!([])
        })
        .await;
    assert_eq!(status["haproxy"]["pid"], last, "{status}");
    assert_eq!(node.haproxy_pids().await, vec![last]);
    let report = blocking(move || load.stop()).await;

    durations.sort_unstable();
    println!(
        "{mode:?}: {RELOADS} reloads in {elapsed:?} (duration_ms p50 {} p99 {} max {}), \
         {during} requests answered during the reloads",
        percentile(&durations, 50.0),
        percentile(&durations, 99.0),
        durations.last().copied().unwrap_or(0),
    );
    println!("{mode:?} load: {report}");
    assert!(
        during >= RELOADS as u64,
        "the load must run during the reloads: {during} requests answered"
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_under_connection_close_load_fail_no_request() {
    let report = reloads_under_load(LoadMode::Close, &[]).await;
    report.assert_no_failures();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_under_keep_alive_load_fail_only_by_keep_alive_close_races() {
    // HAProxy's default: at soft-stop, an old worker closes its idle keep-alive connections, and a
    // client may be sending its next request on one at that moment. HAProxy cannot answer a
    // request it never read, so the client sees the connection closed; an HTTP client retries
    // such a request (RFC 9112 §9.3.1 allows it for idempotent requests). Measured and reported.
    let report = reloads_under_load(LoadMode::KeepAlive, &[]).await;
    println!(
        "keep-alive close races (a reused connection closed by an old worker as the request went \
         out): {} of {} requests",
        report.count(FailureKind::ReuseRace),
        report.total()
    );
    assert_eq!(
        report.failed_excluding_reuse_races(),
        0,
        "failures other than keep-alive close races: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_under_keep_alive_load_fail_no_request_with_idle_close_on_response() {
    // `option idle-close-on-response` (HAProxy ≥ 2.6, in the example config): an old worker keeps
    // its idle keep-alive connections, answers the next request on each, and closes it with that
    // response. No race is left: this is as low as HAProxy allows, zero.
    let report = reloads_under_load(LoadMode::KeepAlive, &["option idle-close-on-response"]).await;
    report.assert_no_failures();
}

// ---------------------------------------------------------------------------------------------
// 4. A reload that cannot work leaves the running worker serving
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_leaves_the_running_worker_serving() {
    let node = start_node().await;
    let w0 = node.serving_pid().await.expect("a worker serves");

    // A config HAProxy refuses: the reply carries HAProxy's own alert.
    node.haproxy
        .write_text(&node.haproxy.render_broken())
        .expect("write the broken config");
    let reply = node.command("reload", json!({})).await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "reload_failed", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("unknown keyword 'this-is-not-a-keyword'"),
        "the message must carry HAProxy's alert: {message}"
    );
    node.events
        .wait_kind("reload_failed", |b| {
            b["error"]
                .as_str()
                .is_some_and(|e| e.contains("this-is-not-a-keyword"))
        })
        .await;
    assert_eq!(
        node.serving_pid().await,
        Some(w0),
        "the same worker answers"
    );
    node.assert_serves().await;

    // A config that passes `haproxy -c` but cannot bind a port another process holds.
    let (text, _holder) = node
        .haproxy
        .render_with_taken_port()
        .expect("a port to hold");
    node.haproxy.write_text(&text).expect("write the config");
    let reply = node.command("reload", json!({})).await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "reload_failed", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cannot bind"), "{message}");
    assert_eq!(
        node.serving_pid().await,
        Some(w0),
        "the same worker answers"
    );
    node.assert_serves().await;

    // Nothing was left behind, and status says the last reload failed.
    assert_eq!(node.haproxy_pids().await, vec![w0]);
    let status = node.status().await;
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["haproxy"]["pid"], w0, "{status}");
    assert_eq!(status["last_reload"]["ok"], false, "{status}");

    // Once the config is fixed, reloads work again.
    node.haproxy.write().expect("write the good config");
    let (w1, result) = reload(&node).await;
    assert_eq!(result["old_pids"], json!([w0]), "{result}");
    assert_eq!(node.serving_pid().await, Some(w1));
    node.assert_serves().await;
}

// ---------------------------------------------------------------------------------------------
// 5. A killed agent loses nothing: the next one adopts HAProxy and its old workers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_haproxy_and_keeps_tracking_its_old_worker() {
    let gate = Gate::start().await;
    let mut node = NodeFixture::builder()
        .timeout(T)
        .backend(Some(gate.addr()))
        .start()
        .await;
    let w0 = node.serving_pid().await.expect("a worker serves");

    // W0 holds a slow request (answered when the test releases it) and is displaced by W1.
    let slow = spawn_get(node.port(), "/hold");
    wait_until_async(T, "W0 to hold the slow request", || async {
        node.curr_conns().await == Some(1)
    })
    .await;
    let (w1, _) = reload(&node).await;

    // The agent crashes; HAProxy does not notice.
    node.agent.kill9().expect("kill -9 the agent");
    assert_eq!(node.serving_pid().await, Some(w1));
    node.assert_serves().await;

    // The next agent adopts W1 as it is (no restart, no second haproxy)...
    node.restart_agent();
    let started = node
        .events
        .wait_kind("agent_started", |b| b["adopted"] == true)
        .await;
    assert_eq!(started.body["pid"], w1, "{}", started.body);
    node.wait_serving().await;
    assert_eq!(
        node.serving_pid().await,
        Some(w1),
        "the same haproxy serves"
    );
    let mut both = vec![w0, w1];
    both.sort_unstable();
    assert_eq!(node.haproxy_pids().await, both, "no second haproxy");

    // ...and still tracks W0, which holds the slow request.
    let status = node.status().await;
    assert_eq!(status["haproxy"]["pid"], w1, "{status}");
    assert_eq!(old_worker_pids(&status), vec![w0], "{status}");
    assert_eq!(status["old_workers"][0]["connections"], 1, "{status}");
    node.assert_serves().await;

    // The request completes, and W0's exit is noticed even though this agent is not its parent.
    gate.release();
    let done = full_200(slow, "released\n").await;
    let exited = node
        .events
        .wait_kind("worker_exited", |b| b["pid"] == w0)
        .await;
    assert_eq!(exited.body["status"], "unknown", "{}", exited.body);
    assert_eq!(exited.body["role"], "old", "{}", exited.body);
    println!(
        "adopted old worker's exit reported {:?} after the response",
        exited.at.saturating_duration_since(done)
    );
    let status = node.status().await;
    assert_eq!(status["old_workers"], json!([]), "{status}");
    assert_eq!(node.haproxy_pids().await, vec![w1]);
}

// ---------------------------------------------------------------------------------------------
// 6. A crashed worker is restarted; SIGTERM stops HAProxy gracefully
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_worker_is_restarted_and_sigterm_stops_everything() {
    let mut node = start_node().await;
    let w0 = node.serving_pid().await.expect("a worker serves");

    send_signal(w0, Signal::KILL);
    let crashed = node
        .events
        .wait_kind("proxy_crashed", |b| b["pid"] == w0)
        .await;
    assert_eq!(crashed.body["status"], 137, "{}", crashed.body);

    // A new worker takes over.
    let status = node
        .wait_status("a new worker after the crash", |s| {
            s["state"] == "serving" && s["haproxy"]["pid"].is_u64() && s["haproxy"]["pid"] != w0
        })
        .await;
    let w1 = as_pid(&status["haproxy"]["pid"]);
    assert_eq!(status["haproxy"]["restarts"], 1, "{status}");
    assert_eq!(node.serving_pid().await, Some(w1));
    node.assert_serves().await;
    assert_eq!(node.haproxy_pids().await, vec![w1]);

    // SIGTERM: HAProxy is stopped gracefully, then the agent exits 0 and leaves nothing running.
    node.sigterm_agent();
    assert_eq!(
        node.haproxy_pids().await,
        Vec::<u32>::new(),
        "no haproxy left"
    );
    let line = node
        .agent
        .wait_for_log(T, |l| log_event(l).is_some_and(|e| e["kind"] == "stopped"));
    let stopped = log_event(&line).expect("the stopped event");
    assert_eq!(stopped["connections_cut"], 0, "{stopped}");
}

// ---------------------------------------------------------------------------------------------
// 7. SIGUSR2 leaves HAProxy to the next agent; SIGHUP reloads
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_haproxy_to_the_next_agent_and_sighup_reloads() {
    let mut node = start_node().await;
    let w0 = node.serving_pid().await.expect("a worker serves");

    // SIGUSR2: the agent exits, HAProxy keeps serving.
    node.agent.signal(Signal::USR2).expect("SIGUSR2 the agent");
    let exit = node.agent.wait_exit(T);
    assert!(exit.success(), "the agent exits 0 after SIGUSR2: {exit}");
    assert_eq!(node.serving_pid().await, Some(w0));
    node.assert_serves().await;
    assert_eq!(node.haproxy_pids().await, vec![w0]);

    // The next agent adopts it.
    node.restart_agent();
    let started = node
        .events
        .wait_kind("agent_started", |b| b["adopted"] == true)
        .await;
    assert_eq!(started.body["pid"], w0, "{}", started.body);
    let boot_id = started.body["boot_id"].clone();
    node.wait_serving().await;
    assert_eq!(node.haproxy_pids().await, vec![w0]);

    // SIGHUP reloads: a new worker serves, and the adopted one is tracked until it exits.
    node.agent.signal(Signal::HUP).expect("SIGHUP the agent");
    let reloaded = node
        .events
        .wait_kind("reloaded", |b| b["boot_id"] == boot_id)
        .await;
    assert_eq!(reloaded.body["old_pids"], json!([w0]), "{}", reloaded.body);
    let w1 = as_pid(&reloaded.body["pid"]);
    assert_eq!(node.serving_pid().await, Some(w1));
    node.assert_serves().await;
    let exited = node
        .events
        .wait_kind("worker_exited", |b| b["pid"] == w0)
        .await;
    assert_eq!(exited.body["status"], "unknown", "{}", exited.body);
    assert_eq!(node.haproxy_pids().await, vec![w1]);
}

// ---------------------------------------------------------------------------------------------
// 8. A recorded pid that now belongs to another process is never signalled
// ---------------------------------------------------------------------------------------------

/// Field 22 of /proc/<pid>/stat: the start time in clock ticks since boot.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    rest.split_whitespace()
        .nth(22 - 3)
        .and_then(|f| f.parse().ok())
        .expect("start time")
}

fn worker_record(pid: u32, start_time: u64) -> Value {
    json!({
        "pid": pid,
        "start_time": start_time,
        "started_at_ms": 1,
        "log": "",
        "config_sha256": "",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_pid_in_the_state_file_is_never_signalled() {
    // Two live processes that are not haproxy: one recorded with its true start time (same pid,
    // same start, wrong program), one with a wrong start time (the pid was recycled).
    let spawn_sleep = || {
        let mut cmd = Command::new("sleep");
        cmd.arg("300").stdout(Stdio::null()).stderr(Stdio::null());
        ChildGuard::spawn("sleep", &mut cmd).expect("spawn sleep")
    };
    let not_haproxy = spawn_sleep();
    let recycled = spawn_sleep();
    let (a, b) = (not_haproxy.pid(), recycled.pid());
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("kernel boot id")
        .trim()
        .to_string();

    let mut node = NodeFixture::builder()
        .timeout(T)
        .prepare(|_, config| {
            let state_dir = config.state_dir();
            std::fs::create_dir_all(&state_dir).expect("create state_dir");
            let state = json!({
                "version": 1,
                "kernel_boot_id": boot_id,
                "node": NODE,
                "current": worker_record(a, start_time(a)),
                "old": [worker_record(b, start_time(b) + 1)],
            });
            std::fs::write(state_dir.join("state.json"), state.to_string()).expect("write state");
        })
        .start()
        .await;

    // The agent started its own haproxy instead of adopting either process.
    let started = node.events.wait_kind("agent_started", |_| true).await;
    assert_eq!(started.body["adopted"], false, "{}", started.body);
    let w0 = as_pid(&started.body["pid"]);
    assert_ne!(w0, a);
    assert_eq!(node.serving_pid().await, Some(w0));
    assert_eq!(node.haproxy_pids().await, vec![w0]);
    node.assert_serves().await;
    let status = node.status().await;
    assert_eq!(status["old_workers"], json!([]), "{status}");
    for pid in [a, b] {
        node.agent.wait_for_log(T, |l| {
            log_message(l).is_some_and(|m| m.contains(&format!("not adopting pid {pid}")))
        });
    }

    // Nothing the agent does signals them: neither a reload nor a full stop.
    reload(&node).await;
    node.sigterm_agent();
    assert_eq!(node.haproxy_pids().await, Vec::<u32>::new());
    assert!(is_alive(a), "the non-haproxy process {a} was signalled");
    assert!(
        is_alive(b),
        "the process {b} that reused a pid was signalled"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. `ebb config check`
// ---------------------------------------------------------------------------------------------

/// Runs `ebb config check --config PATH` in a clean environment: (exit code, stdout, stderr).
fn config_check(path: &Path) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(EBB);
    cmd.args(["config", "check", "--config"])
        .arg(path)
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if name.starts_with("EBB_") || name == "RUST_LOG" {
            cmd.env_remove(&key);
        }
    }
    let out = cmd.output().expect("run ebb config check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_prints_the_effective_config_or_one_line_per_mistake() {
    let dir = TestDir::new();
    let haproxy = HaproxyConfig::new(dir.path(), "127.0.0.1:1".parse().expect("addr"));
    haproxy.write().expect("write haproxy.cfg");
    let valid = AgentConfig::new(dir.path(), "nats://127.0.0.1:4222", &haproxy);

    // Valid: the effective configuration, defaults included, as TOML.
    let path = valid.write().expect("write agent.toml");
    let (code, stdout, stderr) = config_check(&path);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let effective: toml::Table = stdout
        .parse()
        .unwrap_or_else(|e| panic!("not TOML ({e}):\n{stdout}"));
    assert_eq!(effective["node"]["id"].as_str(), Some("node-1"), "{stdout}");
    assert_eq!(
        effective["haproxy"]["admin_socket"].as_str(),
        haproxy.admin_socket().to_str(),
        "{stdout}"
    );
    assert_eq!(
        effective["drain"]["min_period"].as_str(),
        Some("0s"),
        "{stdout}"
    );
    // A default the file does not set.
    assert_eq!(
        effective["drain"]["on_deadline"].as_str(),
        Some("report"),
        "{stdout}"
    );

    let no_expose = haproxy
        .write_as(
            "no-expose.cfg",
            &haproxy.render().replace(" expose-fd listeners", ""),
        )
        .expect("write the config without expose-fd");
    let no_expose_text = no_expose.display().to_string();
    // HAProxy's default level is operator, which refuses the drain commands.
    let no_level = haproxy
        .write_as(
            "no-level.cfg",
            &haproxy.render().replace(" level admin", ""),
        )
        .expect("write the config without a level");
    let no_level_text = no_level.display().to_string();

    // Each mistake: exit 1, one line on stderr that names what is wrong.
    type Tweak = Box<dyn Fn(&mut AgentConfig)>;
    let cases: Vec<(&str, Tweak, Vec<&str>)> = vec![
        (
            "unknown key",
            Box::new(|c| {
                c.set_str("drain", "min_perod", "1s");
            }),
            vec!["min_perod"],
        ),
        (
            "bad duration",
            Box::new(|c| {
                c.set_str("drain", "min_period", "3 parsecs");
            }),
            vec!["min_period", "3 parsecs"],
        ),
        (
            "bad node id",
            Box::new(|c| {
                c.node_id("web.1");
            }),
            vec!["node.id", "web.1"],
        ),
        (
            "missing haproxy binary",
            Box::new(|c| {
                c.set_str("haproxy", "binary", "/nonexistent/haproxy");
            }),
            vec!["haproxy.binary", "/nonexistent/haproxy"],
        ),
        (
            "admin socket without expose-fd listeners",
            Box::new(move |c| {
                c.set_path("haproxy", "config", &no_expose)
                    .unset("haproxy", "admin_socket");
            }),
            vec![no_expose_text.as_str(), "expose-fd listeners"],
        ),
        (
            "stats socket without level admin",
            Box::new(move |c| {
                c.set_path("haproxy", "config", &no_level)
                    .unset("haproxy", "admin_socket");
            }),
            vec![no_level_text.as_str(), "operator", "level admin"],
        ),
    ];
    for (i, (what, tweak, expected)) in cases.into_iter().enumerate() {
        let mut config = valid.clone();
        tweak(&mut config);
        let path = dir.join(format!("case-{i}.toml"));
        std::fs::write(&path, config.render()).expect("write the case");
        let (code, stdout, stderr) = config_check(&path);
        assert_eq!(
            code,
            Some(1),
            "{what}: stdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert!(stdout.is_empty(), "{what}: nothing on stdout: {stdout}");
        let message = stderr.trim();
        assert_eq!(message.lines().count(), 1, "{what}: one line: {message}");
        for needle in expected {
            assert!(
                message.contains(needle),
                "{what}: {needle:?} missing in {message:?}"
            );
        }
    }
}

#[test]
fn config_check_runs_haproxy_c_unless_told_not_to() {
    let dir = TestDir::new();
    let haproxy = HaproxyConfig::new(dir.path(), "127.0.0.1:1".parse().expect("addr"));
    // ebb's own checks pass (the admin socket is fine); HAProxy refuses the unknown keyword.
    let broken = haproxy
        .write_as(
            "haproxy.cfg",
            &format!(
                "{}
frontend broken
    no-such-keyword here
",
                haproxy.render()
            ),
        )
        .expect("write haproxy.cfg");
    let path = AgentConfig::new(dir.path(), "nats://127.0.0.1:4222", &haproxy)
        .set_path("haproxy", "config", &broken)
        .write()
        .expect("write agent.toml");
    let (code, stdout, stderr) = config_check(&path);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("-c` refuses it") && stderr.contains("no-such-keyword"),
        "{stderr}"
    );

    let mut cmd = Command::new(EBB);
    cmd.args(["config", "check", "--no-haproxy", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .env_remove("EBB_CONFIG");
    let out = cmd.output().expect("run ebb config check --no-haproxy");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `EBB_NODE__ID=007` must name node "007" (subject `ebb.node.007.*`), not node "7": environment
/// values are read as their key's type, and a node id is a string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_from_the_environment_keeps_its_leading_zeros() {
    let node = NodeFixture::builder()
        .timeout(T)
        .node_id("007")
        .agent(|c| {
            c.node_id("from-the-file");
        })
        .env("EBB_NODE__ID", "007")
        .start()
        .await;
    let status = node.status().await;
    assert_eq!(status["node"], "007", "{status}");
}
