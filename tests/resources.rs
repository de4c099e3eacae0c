//! Bounded resources and failure policy on the node, end to end: the real `ebb agent` binary with
//! its own haproxy, a real nats-server, the demo backend and real TCP clients.
//!
//! What an operator relies on, one test each:
//! - reloads cannot pile up old workers without bound: past `reload.max_old_workers` a reload is
//!   refused with `conflict`, and nothing is killed to make room;
//! - a worker's log stays under `haproxy.worker_log_max_bytes` while the worker keeps logging, and
//!   a start that fails leaves no log behind;
//! - HAProxy never sees the agent's secrets: only `PATH` and `haproxy.env` reach it;
//! - a panic in the agent ends the agent, not HAProxy: the next agent adopts it.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::task::JoinHandle;

/// Default timeout of every wait. Generous: the tests share a 2-core machine.
const T: Duration = Duration::from_secs(30);

/// `GET path` (Connection: close) in a task of its own.
fn spawn_get(port: u16, path: &str) -> JoinHandle<Result<Response, ClientError>> {
    let path = path.to_string();
    tokio::spawn(async move { http_request(port, &path, true, Duration::from_secs(120)).await })
}

/// Current sessions (`scur`) of frontend `name` on the serving worker, from `show stat`.
async fn frontend_sessions(node: &NodeFixture, name: &str) -> Option<u64> {
    let sock = node.haproxy.admin_socket();
    let stat = tokio::task::spawn_blocking(move || admin_command(&sock, "show stat"))
        .await
        .ok()?;

    let stat = stat.ok()?;
    let row = stat
        .lines()
        .find(|l| l.starts_with(&format!("{name},FRONTEND,")))?;
    // pxname,svname,qcur,qmax,scur,…
    row.split(',').nth(4)?.parse().ok()
}

fn log_dir(node: &NodeFixture) -> PathBuf {
    node.config.state_dir().join("logs")
}

/// The names in `dir` that start with `prefix`, sorted.
fn files_starting(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------------------
// reload.max_old_workers
// ---------------------------------------------------------------------------------------------

/// Low enough for a 2-core machine to run cap + 1 haproxy processes; the logic is the default's.
const CAP: usize = 5;
const RELOADS: usize = 40;
/// How long each pinning request takes: longer than the 40 reloads on a busy machine.
const PIN_MS: u64 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_past_max_old_workers_are_refused_and_no_haproxy_is_killed() {
    let node = NodeFixture::builder()
        .timeout(T)
        .agent(|c| {
            c.set("reload", "max_old_workers", &CAP.to_string());
        })
        .start()
        .await;
    let port = node.port();
    let mut pinned = Vec::new();
    let mut old = Vec::new();
    let mut current = node.serving_pid().await.expect("a serving worker");
    let mut conflicts = Vec::new();
    for i in 0..RELOADS {
        if pinned.len() <= old.len() {
            // The current worker holds a long request, so it cannot exit once displaced. Counted
            // on frontend `fe` alone: `CurrConns` also counts admin-socket sessions (the agent's
            // and this test's own), which come and go.
            pinned.push(spawn_get(port, &format!("/slow?ms={PIN_MS}")));
            wait_until_async(T, "the long request on the current worker", || async {
                frontend_sessions(&node, "fe").await.is_some_and(|n| n >= 1)
            })
            .await;
        }
        let reply = node.command("reload", json!({})).await;
        if reply["ok"] == true {
            assert!(
                conflicts.is_empty(),
                "reload {i} worked after a refusal: {reply}"
            );
            old.push(current);
            current = as_pid(&reply["result"]["pid"]);
        } else {
            assert_eq!(reply["error"]["code"], "conflict", "reload {i}: {reply}");
            conflicts.push(reply["error"]["message"].as_str().unwrap_or("").to_owned());
        }
    }
    assert_eq!(old.len(), CAP, "reloads work up to the cap");
    assert_eq!(
        conflicts.len(),
        RELOADS - CAP,
        "every reload past the cap is refused"
    );
    let message = &conflicts[conflicts.len() - 1];
    for needle in [
        format!("{CAP} old workers are still finishing connections"),
        format!("oldest: pid {}, ", old[0]),
        "1 connection".to_owned(),
        format!("a reload now would exceed reload.max_old_workers = {CAP}"),
        "wait for them, or raise the cap".to_owned(),
    ] {
        assert!(message.contains(&needle), "{needle:?} not in {message:?}");
    }

    // Nothing was killed to make room: every old worker is alive, and it is still tracked.
    let mut all: Vec<u32> = old.iter().copied().chain([current]).collect();
    all.sort_unstable();
    assert_eq!(node.haproxy_pids().await, all);
    let status = node.status().await;
    assert_eq!(status["haproxy"]["pid"], current, "{status}");
    assert_eq!(
        status["old_workers"].as_array().map(Vec::len),
        Some(CAP),
        "{status}"
    );
    assert!(node.events.of_kind("worker_exited").is_empty());
    node.assert_serves().await;

    // Every long request gets its whole answer.
    for request in pinned {
        let response = request
            .await
            .expect("request task")
            .unwrap_or_else(|e| panic!("a long request was cut: {e}"));
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, format!("slept {PIN_MS} ms\n").as_str()),
            "{response:?}"
        );
    }
    // Then the old workers leave on their own, and reloads work again.
    node.wait_status("the old workers to exit", |s| s["old_workers"] == json!([]))
        .await;
    for exited in node.events.of_kind("worker_exited") {
        assert_eq!(exited.body["connections_cut"], 0, "{:?}", exited.body);
        assert_eq!(exited.body["hard_stopped"], false, "{:?}", exited.body);
    }
    let result = node.ok("reload", json!({})).await;
    assert_eq!(result["old_pids"], json!([current]), "{result}");
}

#[test]
fn the_default_cap_is_32_old_workers_and_worker_logs_are_capped_at_16_mib() {
    let dir = TestDir::new();
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n    stats socket {} mode 600 level admin expose-fd listeners\n",
            dir.join("admin.sock").display()
        ),
    )
    .expect("write haproxy.cfg");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[haproxy]\nconfig = {}\nstate_dir = {}\n",
            toml_string(dir.join("haproxy.cfg").to_string_lossy()),
            toml_string(dir.join("state").to_string_lossy()),
        ),
    )
    .expect("write agent.toml");
    let out = Command::new(ebb_bin())
        .args(["config", "check", "--no-haproxy", "--config"])
        .arg(&config)
        .env("EBB_HAPROXY__BINARY", haproxy_bin())
        .stdin(Stdio::null())
        .output()
        .expect("run ebb config check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("max_old_workers = 32"), "{text}");
    assert!(text.contains("worker_log_max_bytes = 16777216"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Worker logs
// ---------------------------------------------------------------------------------------------

const LOG_CAP: u64 = 8192;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_log_past_its_cap_keeps_its_tail_and_the_worker_keeps_logging() {
    let node = NodeFixture::builder()
        .timeout(T)
        .haproxy(|h| {
            h.global_line("log stdout format raw local0")
                .frontend_line("log global")
                .frontend_line("option httplog")
        })
        .agent(|c| {
            c.set("haproxy", "worker_log_max_bytes", &LOG_CAP.to_string());
        })
        .start()
        .await;
    let pid = node.serving_pid().await.expect("a serving worker");
    let logs = log_dir(&node);
    let name = files_starting(&logs, &format!("worker-{pid}-"))
        .into_iter()
        .find(|n| n.ends_with(".log"))
        .unwrap_or_else(|| panic!("no log of worker {pid} in {}", logs.display()));
    let log = logs.join(&name);
    let kept = logs.join(format!("{name}.1"));

    // One access log line per request, until the log was cut once.
    let deadline = Instant::now() + T;
    let mut sent = 0;
    while !kept.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            kept.display()
        );
        let (status, _) = http_get(node.port(), &format!("/before-cut-{sent}"), true)
            .await
            .unwrap_or_else(|e| panic!("GET through haproxy failed: {e}"));
        assert_eq!(status, 200);
        sent += 1;
    }
    let tail = std::fs::read_to_string(&kept).expect("read the kept tail");
    assert!(tail.len() as u64 <= LOG_CAP, "{} bytes kept", tail.len());
    assert!(
        tail.ends_with('\n') && tail.contains("GET /before-cut-"),
        "{tail}"
    );

    // The worker keeps logging into the same file, from its new start: no hole of zeros where
    // the old content was, and the file stays under its cap.
    for i in 0..5 {
        http_get(node.port(), &format!("/after-cut-{i}"), true)
            .await
            .unwrap_or_else(|e| panic!("GET through haproxy failed: {e}"));
    }
    wait_until(T, "the worker's log line for /after-cut-4", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("GET /after-cut-4"))
    });
    let text = std::fs::read(&log).expect("read the log");
    assert!(
        !text.contains(&0),
        "a hole of NULs: the log was not opened O_APPEND"
    );
    assert!(
        (text.len() as u64) < LOG_CAP,
        "{} bytes after the cut",
        text.len()
    );
    assert_eq!(
        node.serving_pid().await,
        Some(pid),
        "the same worker serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_no_log_behind() {
    // A binary that cannot even be executed: the spawn itself fails.
    let mut node = NodeFixture::builder()
        .timeout(T)
        .prepare(|dir, c| {
            let bin = dir.join("haproxy-broken");
            std::fs::write(&bin, "#!/nonexistent/interpreter\n").expect("write the binary");
            let mut perms = std::fs::metadata(&bin).expect("stat").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
            std::fs::set_permissions(&bin, perms).expect("chmod");
            c.set_path("haproxy", "binary", &bin);
        })
        .spawn()
        .await;
    node.events
        .wait_kind("reload_failed", |b| {
            b["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot start"))
        })
        .await;
    node.sigterm_agent();
    let logs = log_dir(&node);
    assert_eq!(files_starting(&logs, "starting-"), Vec::<String>::new());
    assert_eq!(files_starting(&logs, "worker-"), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_during_its_start_leaves_no_log_behind() {
    let node = NodeFixture::builder().timeout(T).start().await;
    let pid = node.serving_pid().await.expect("a serving worker");
    // A config that passes `haproxy -c` but cannot start: its port is taken.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let broken = node
        .haproxy
        .clone()
        .section(&format!("frontend taken\n    bind 127.0.0.1:{port}\n"));
    broken.write().expect("write haproxy.cfg");
    let reply = node.command("reload", json!({})).await;
    assert_eq!(reply["error"]["code"], "reload_failed", "{reply}");
    let logs = log_dir(&node);
    assert_eq!(files_starting(&logs, "starting-"), Vec::<String>::new());
    let names = files_starting(&logs, "worker-");
    assert!(
        names
            .iter()
            .all(|n| n.starts_with(&format!("worker-{pid}-"))),
        "only the serving worker's log: {names:?}"
    );
    assert_eq!(node.serving_pid().await, Some(pid));
}

// ---------------------------------------------------------------------------------------------
// HAProxy's environment
// ---------------------------------------------------------------------------------------------

fn environ(pid: u32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/environ: {e}"));
    raw.split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| {
            let v = String::from_utf8_lossy(v);
            let (k, v) = v.split_once('=').unwrap_or((&v, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_gets_path_and_haproxy_env_never_the_agents_secrets() {
    let node = NodeFixture::builder()
        .timeout(T)
        .agent(|c| {
            c.set("haproxy", "env", r#"["TZ"]"#);
        })
        .env("EBB_NATS__TOKEN", "s3cret-token")
        .env("NATS_CREDS_SECRET", "s3cret-creds")
        .env("SECRET_X", "1")
        .env("TZ", "UTC")
        .start()
        .await;
    let pid = node.serving_pid().await.expect("a serving worker");
    let env = environ(pid);
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&"PATH"), "{names:?}");
    assert!(env.contains(&("TZ".into(), "UTC".into())), "{env:?}");
    assert!(
        env.contains(&("EBB_DRAINING".into(), "0".into())),
        "{env:?}"
    );
    for (k, v) in &env {
        assert!(
            !v.contains("s3cret") && k != "SECRET_X" && !k.starts_with("NATS_"),
            "HAProxy sees the agent's {k}"
        );
    }
    assert_eq!(names.len(), 3, "nothing else: {names:?}");
}

// ---------------------------------------------------------------------------------------------
// Failure policy
// ---------------------------------------------------------------------------------------------

/// The agent's exit status after a panic.
const PANIC_EXIT: i32 = 70;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_ends_the_agent_and_the_next_agent_adopts_haproxy() {
    let mut node = NodeFixture::builder()
        .timeout(T)
        .env("EBB_TEST_PANIC_ON_SIGUSR1", "1")
        // A plugin whose idle check panics: the SDK catches that inside the plugin, and the
        // agent's panic policy must not turn it into an exit.
        .plugins_toml(|_| {
            plugin_toml(
                "panicky",
                &cdylib("ebb_plugin_test"),
                "2s",
                "{ panic_in = \"check_idle\" }",
            )
        })
        .start()
        .await;
    node.ok("drain", json!({"drain_id": "d", "min_period_ms": 0}))
        .await;
    node.wait_status("the plugin's panic as a blocker", |s| {
        s["drain"]["blockers"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b.to_string().contains("panicked")))
    })
    .await;
    assert!(node.agent.is_running(), "a plugin's panic is contained");
    node.undrain().await;

    let pid = node.serving_pid().await.expect("a serving worker");
    node.agent.signal(Signal::USR1).expect("SIGUSR1 the agent");
    let exit = node.agent.wait_exit(T);
    assert_eq!(exit.code(), Some(PANIC_EXIT), "{exit}");
    assert!(
        node.agent.log_text().contains("the agent panicked"),
        "{}",
        node.agent.log_text()
    );
    // HAProxy did not notice.
    node.assert_serves().await;
    assert_eq!(node.serving_pid().await, Some(pid));

    node.restart_agent();
    node.events
        .wait_kind("agent_started", |b| b["adopted"] == true && b["pid"] == pid)
        .await;
    let status = node.wait_serving().await;
    assert_eq!(status["haproxy"]["pid"], pid, "{status}");
    assert_eq!(node.haproxy_pids().await, vec![pid], "no second haproxy");
    node.assert_serves().await;
}
