//! master-worker mode end to end: the real `ebb agent` beside a real HAProxy master (`-W -S`),
//! started by the test the way systemd starts Debian's haproxy.service (attach), or by the agent
//! itself (spawn), with a real nats-server, the demo backend and real TCP clients.
//!
//! What an operator who keeps the distribution's haproxy.service relies on:
//! - the seed's bug cannot happen here either: `drained` waits for the old worker the master
//!   keeps, and the new worker answers 503 on /healthz during the drain;
//! - a broken config is refused with HAProxy's own words, on 2.6 (no `Success=`) and 2.8;
//! - the agent's death and restart, or the master's restart, never lose the drain;
//! - ebb never stops a master it does not own; one it owns stops gracefully;
//! - a worker killed by `mworker-max-reloads` is reported as forced.
//!
//! The HAProxy under test is `$EBB_TEST_HAPROXY` (the test command runs this file with Debian's
//! 2.6 and with 2.8).

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::master::Master;
use support::*;

const T: Duration = Duration::from_secs(30);
const RELOADS: usize = 100;
const CONCURRENCY: usize = 4;

/// The load tests saturate the 2 cores: they run alone (write); the tests whose assertions
/// involve a fixed request duration never run beside them (read).
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A node attached to a master the test runs (as a service manager would), with `tweak` applied
/// to haproxy.cfg. `[drain] min_period = "0s"` and `poll_interval = "10ms"` by default.
async fn attached(tweak: impl FnOnce(HaproxyConfig) -> HaproxyConfig) -> (NodeFixture, Master) {
    let mut master = None;
    let node = NodeFixture::builder()
        .timeout(T)
        .haproxy(tweak)
        .prepare_with_haproxy(|_, h, cfg| {
            let m = Master::start(h).expect("start the haproxy master");
            cfg.set_str("haproxy", "mode", "master-worker");
            cfg.set_path("haproxy", "master_socket", m.socket());
            cfg.set("haproxy", "manage_master", "false");
            master = Some(m);
        })
        .start()
        .await;
    (node, master.expect("the master started"))
}

/// A node whose agent starts and owns the master, with `tweak` applied to haproxy.cfg.
async fn spawned(tweak: impl FnOnce(HaproxyConfig) -> HaproxyConfig) -> NodeFixture {
    NodeFixture::builder()
        .timeout(T)
        .haproxy(tweak)
        .prepare(|dir, cfg| {
            cfg.set_str("haproxy", "mode", "master-worker");
            cfg.set_path("haproxy", "master_socket", &dir.join("master.sock"));
            cfg.set("haproxy", "manage_master", "true");
        })
        .start()
        .await
}

/// `CurrConns` of worker `pid`, through the master CLI.
fn curr_conns(master: &Master, pid: u32) -> Option<u64> {
    let info = master.command(&format!("@!{pid} show info")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("CurrConns:"))
        .and_then(|v| v.trim().parse().ok())
}

async fn wait_conns(master: &Master, pid: u32, n: u64) {
    wait_until_async(
        T,
        &format!("worker {pid} to hold {n} connections"),
        || async { curr_conns(master, pid).is_some_and(|c| c >= n) },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 1. The seed's scenario, under a master
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_long_request_holds_the_drain_on_a_masters_old_worker() {
    let _not_beside_the_load_tests = MACHINE.read().await;
    let (node, master) = attached(|h| h).await;
    let status = node.status().await;
    assert_eq!(status["haproxy"]["mode"], "master-worker", "{status}");
    assert_eq!(
        as_pid(&status["haproxy"]["master_pid"]),
        master.master_pid()
    );
    let w0 = as_pid(&status["haproxy"]["pid"]);
    assert_eq!(master.worker_pid().expect("show proc"), w0);

    // A 4 s request on W0, then a reload over the bus: the master keeps W0 as an old worker.
    let slow = spawn_get(node.port(), "/slow?ms=4000");
    wait_conns(&master, w0, 1).await;
    let reload = node.ok("reload", json!({})).await;
    assert_eq!(reload["old_pids"], json!([w0]), "{reload}");
    let w1 = as_pid(&reload["pid"]);
    assert_ne!(w1, w0);
    let procs = master.show_proc().expect("show proc");
    assert_eq!(
        procs.workers.iter().map(|p| p.pid).collect::<Vec<_>>(),
        vec![w1],
        "{procs:?}"
    );
    assert!(procs.old_workers.iter().any(|p| p.pid == w0), "{procs:?}");

    node.ok("drain", json!({"drain_id": "seed", "min_period_ms": 200}))
        .await;
    // The new worker answers 503 on /healthz from the drain on (a drain command, as a worker
    // forked by the master cannot inherit EBB_DRAINING).
    wait_until_async(T, "/healthz to answer 503 from the new worker", || async {
        matches!(node.try_healthz().await, Ok(503))
    })
    .await;
    let status = node
        .wait_status("the old worker to be the only blocker", |s| {
            let blockers = s["drain"]["blockers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            blockers.len() == 1 && blockers[0]["kind"] == "old_worker"
        })
        .await;
    let blocker = &status["drain"]["blockers"][0];
    assert_eq!(as_pid(&blocker["pid"]), w0, "{status}");
    assert_eq!(blocker["connections"], 1, "{status}");
    assert_eq!(node.healthz().await, 503, "still draining");

    let done = full_200(slow, "slept 4000 ms\n").await;
    let exited = node
        .events
        .wait_kind("worker_exited", |b| b["pid"] == w0)
        .await;
    assert_eq!(exited.body["role"], "old", "{}", exited.body);
    assert_eq!(exited.body["hard_stopped"], false, "{}", exited.body);
    let drained = node.events.drained("seed").await;
    assert!(
        drained.at >= done,
        "drained arrived {:?} before the long request completed",
        done - drained.at
    );
    assert!(
        drained.seq() > exited.seq(),
        "drained after the old worker's exit"
    );
    assert_eq!(drained.body["forced"], false, "{}", drained.body);
    assert_eq!(drained.body["connections_cut"], 0, "{}", drained.body);
    assert_eq!(
        node.healthz().await,
        503,
        "a drained node still answers 503"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A broken config is refused with HAProxy's own text
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_refused_with_haproxys_text_and_the_worker_keeps_serving() {
    let (node, master) = attached(|h| h).await;
    let w0 = as_pid(&node.status().await["haproxy"]["pid"]);
    node.haproxy
        .write_text(&node.haproxy.render_broken())
        .expect("write the broken config");
    let reply = node.command("reload", json!({})).await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "reload_failed", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    // HAProxy's own words (2.8 says them in `reload`'s answer; for 2.6, ebb asks `haproxy -c`).
    assert!(message.contains("this-is-not-a-keyword"), "{message}");
    assert_eq!(
        master.worker_pid().expect("show proc"),
        w0,
        "the worker is untouched"
    );
    node.assert_serves().await;
    let status = node.status().await;
    assert_eq!(as_pid(&status["haproxy"]["pid"]), w0, "{status}");
    assert_eq!(status["last_reload"]["ok"], false, "{status}");

    // Fixed, the next reload works.
    node.haproxy.write().expect("write the good config");
    let reload = node.ok("reload", json!({})).await;
    assert_eq!(reload["old_pids"], json!([w0]), "{reload}");
    node.assert_serves().await;
}

// ---------------------------------------------------------------------------------------------
// 3. The agent's death, the master's restart: the drain goes on
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_leaves_master_and_worker_and_the_drain_resumes() {
    let (mut node, master) = attached(|h| h).await;
    let w0 = as_pid(&node.status().await["haproxy"]["pid"]);
    let m0 = master.master_pid();
    let slow = spawn_get(node.port(), "/slow?ms=8000");
    wait_conns(&master, w0, 1).await;
    node.ok("drain", json!({"drain_id": "crash", "min_period_ms": 0}))
        .await;
    let first_boot = node.status().await["boot_id"].clone();

    node.agent.kill9().expect("kill -9 the agent");
    node.assert_serves().await;
    node.restart_agent();
    let started = node
        .events
        .wait_kind("agent_started", |b| b["boot_id"] != first_boot)
        .await;
    assert_eq!(started.body["adopted"], true, "{}", started.body);
    let status = node.status().await;
    assert_eq!(status["state"], "draining", "{status}");
    assert_eq!(status["drain"]["drain_id"], "crash", "{status}");
    assert_eq!(
        as_pid(&status["haproxy"]["pid"]),
        w0,
        "the same worker: {status}"
    );
    assert_eq!(as_pid(&status["haproxy"]["master_pid"]), m0, "{status}");
    assert_eq!(master.master_pid(), m0);

    full_200(slow, "slept 8000 ms\n").await;
    let drained = node.events.drained("crash").await;
    assert_eq!(drained.body["forced"], false, "{}", drained.body);
    assert_eq!(master.worker_pid().expect("show proc"), w0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_under_the_agent_is_reattached_and_the_drain_goes_on() {
    let (node, mut master) = attached(|h| h).await;
    let m0 = master.master_pid();
    node.ok("drain", json!({"drain_id": "m", "min_period_ms": 60000}))
        .await;
    wait_until_async(T, "/healthz 503", || async {
        matches!(node.try_healthz().await, Ok(503))
    })
    .await;

    master.restart().expect("restart the master");
    let m1 = master.master_pid();
    assert_ne!(m0, m1);
    let attached = node
        .events
        .wait_kind("master_attached", |b| b["pid"] == m1)
        .await;
    assert_eq!(attached.body["previous_pid"], m0, "{}", attached.body);
    let w1 = master.worker_pid().expect("show proc");
    let status = node
        .wait_status("the new master's worker to be current", |s| {
            s["haproxy"]["pid"] == w1
        })
        .await;
    assert_eq!(status["state"], "draining", "{status}");
    assert_eq!(status["drain"]["drain_id"], "m", "{status}");
    wait_until_async(T, "the new master's worker to answer 503", || async {
        matches!(node.try_healthz().await, Ok(503))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_the_master_does_on_its_own_during_a_drain_gets_the_drain_commands() {
    // `systemctl reload haproxy` is SIGUSR2 to the master, behind ebb's back.
    let (node, master) = attached(|h| h).await;
    let w0 = as_pid(&node.status().await["haproxy"]["pid"]);
    node.ok("drain", json!({"drain_id": "hup", "min_period_ms": 60000}))
        .await;
    wait_until_async(T, "/healthz 503", || async {
        matches!(node.try_healthz().await, Ok(503))
    })
    .await;
    master.reload_by_signal().expect("SIGUSR2 to the master");
    let reloaded = node
        .events
        .wait_kind("reloaded", |b| b["old_pids"] == json!([w0]))
        .await;
    assert_eq!(reloaded.body["draining"], true, "{}", reloaded.body);
    let w1 = as_pid(&reloaded.body["pid"]);
    assert_eq!(master.worker_pid().expect("show proc"), w1);
    // From the moment the new worker serves until the agent's commands reach it, it answers
    // 200: measured here, and documented.
    let exposed = Instant::now();
    wait_until_async(T, "the master's new worker to answer 503", || async {
        matches!(node.try_healthz().await, Ok(503))
    })
    .await;
    println!(
        "a worker forked by the master answered 503 {} ms after the agent saw it",
        exposed.elapsed().as_millis()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Stop: never a master ebb does not own; gracefully one it owns
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_is_a_conflict_when_attached_and_sigterm_leaves_haproxy_running() {
    let (mut node, master) = attached(|h| h).await;
    let w0 = as_pid(&node.status().await["haproxy"]["pid"]);
    let reply = node.command("stop", json!({})).await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "conflict", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("service manager"), "{message}");
    node.assert_serves().await;

    node.agent.signal(Signal::TERM).expect("SIGTERM the agent");
    let exit = node.agent.wait_exit(T);
    assert!(exit.success(), "the agent exits 0: {exit}");
    assert_eq!(master.worker_pid().expect("show proc"), w0);
    assert!(is_alive(master.master_pid()));
    node.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_master_stops_gracefully_and_cuts_nothing() {
    let _not_beside_the_load_tests = MACHINE.read().await;
    let node = spawned(|h| h).await;
    let status = node.status().await;
    let m0 = as_pid(&status["haproxy"]["master_pid"]);
    let w0 = as_pid(&status["haproxy"]["pid"]);
    let slow = spawn_get(node.port(), "/slow?ms=2000");
    node.wait_conns(1).await;
    let stop = node.ok("stop", json!({})).await;
    assert_eq!(stop["connections_cut"], 0, "{stop}");
    full_200(slow, "slept 2000 ms\n").await;
    wait_until_async(T, "the master and its worker to exit", || async {
        !is_alive(m0) && !is_alive(w0)
    })
    .await;
    let status = node.status().await;
    assert_eq!(status["state"], "stopped", "{status}");
}

// ---------------------------------------------------------------------------------------------
// 5. Hundreds of reloads under load, in each mode
// ---------------------------------------------------------------------------------------------

async fn reloads_under_load(node: &NodeFixture) -> LoadReport {
    let load = LoadGen::builder(node.port())
        .concurrency(CONCURRENCY)
        .mode(LoadMode::Close)
        .start();
    let load = blocking(move || {
        load.wait_for_ok(100, T);
        load
    })
    .await;
    let mut last = as_pid(&node.status().await["haproxy"]["pid"]);
    for i in 0..RELOADS {
        let reply = node.command("reload", json!({})).await;
        assert_eq!(reply["ok"], true, "reload {i} of {RELOADS} failed: {reply}");
        assert_eq!(
            reply["result"]["old_pids"],
            json!([last]),
            "reload {i}: {reply}"
        );
        last = as_pid(&reply["result"]["pid"]);
    }
    let target = load.ok_count() + 100;
    let load = blocking(move || {
        load.wait_for_ok(target, T);
        load
    })
    .await;
    node.events
        .wait_n("worker_exited", RELOADS, |b| b["role"] == "old")
        .await;
    load.stop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_through_an_attached_master_under_load_fail_no_request() {
    let _alone = MACHINE.write().await;
    let (node, _master) = attached(|h| h).await;
    reloads_under_load(&node).await.assert_no_failures();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_through_an_owned_master_under_load_fail_no_request() {
    let _alone = MACHINE.write().await;
    let node = spawned(|h| h).await;
    reloads_under_load(&node).await.assert_no_failures();
}

// ---------------------------------------------------------------------------------------------
// 6. mworker-max-reloads: a kill is forced, never clean
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_by_mworker_max_reloads_is_reported_as_forced() {
    let (node, master) = attached(|h| h.global_line("mworker-max-reloads 2")).await;
    let w0 = as_pid(&node.status().await["haproxy"]["pid"]);
    let slow = spawn_get(node.port(), "/slow?ms=20000");
    wait_conns(&master, w0, 1).await;
    for _ in 0..3 {
        node.ok("reload", json!({})).await;
    }
    let exited = node
        .events
        .wait_kind("worker_exited", |b| b["pid"] == w0)
        .await;
    assert_eq!(exited.body["role"], "old", "{}", exited.body);
    assert_eq!(exited.body["hard_stopped"], true, "{}", exited.body);
    assert_eq!(exited.body["connections_cut"], 1, "{}", exited.body);
    let (response, _) = tokio::time::timeout(T, slow)
        .await
        .expect("the request ends")
        .expect("request task");
    assert!(
        response.is_err(),
        "the pinned request was cut: {response:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_by_hard_stop_after_under_an_owned_master_is_reported_as_forced() {
    // ebb owns the master's output, so it reads the worker's own `hard-stopped` lines there.
    let node = spawned(|h| h.hard_stop_after("1s")).await;
    let w0 = as_pid(&node.status().await["haproxy"]["pid"]);
    let slow = spawn_get(node.port(), "/slow?ms=20000");
    node.wait_conns(1).await;
    node.ok("reload", json!({})).await;
    let exited = node
        .events
        .wait_kind("worker_exited", |b| b["pid"] == w0)
        .await;
    assert_eq!(exited.body["hard_stopped"], true, "{}", exited.body);
    assert_eq!(exited.body["connections_cut"], 1, "{}", exited.body);
    let (response, _) = tokio::time::timeout(T, slow)
        .await
        .expect("the request ends")
        .expect("request task");
    assert!(
        !matches!(&response, Ok(r) if r.status == 200),
        "the pinned request was cut: {response:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. What a worker the master forks cannot inherit: EBB_DRAINING
// ---------------------------------------------------------------------------------------------

/// 20 reloads through ebb during a drain while a health checker polls /healthz without pause:
/// how many checks answered 200, how many in all, and the longest wait after a reply for 503.
async fn health_checks_across_reloads_while_draining(node: &NodeFixture) -> (u64, u64, Duration) {
    node.ok("drain", json!({"drain_id": "x", "min_period_ms": 600000}))
        .await;
    wait_until_async(T, "/healthz 503", || async {
        matches!(node.try_healthz().await, Ok(503))
    })
    .await;
    let port = node.port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut all) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((status, _)) = http_get(port, "/healthz", true).await {
                    all += 1;
                    if status == 200 {
                        ok += 1;
                    }
                }
            }
            (ok, all)
        })
    };
    let mut after_reply = Vec::new();
    let started = Instant::now();
    for _ in 0..20 {
        let reload = node.ok("reload", json!({})).await;
        let replied = Instant::now();
        assert_eq!(reload["draining"], json!(null), "{reload}");
        wait_until_async(T, "the new worker to answer 503", || async {
            matches!(node.try_healthz().await, Ok(503))
        })
        .await;
        after_reply.push(replied.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, all) = checker.await.expect("checker task");
    let elapsed = started.elapsed();
    let worst = after_reply.iter().max().copied().unwrap_or_default();
    // Each check takes elapsed / all: the 200s, at that pace, are how long new workers answered
    // as not draining.
    let per_check = elapsed.as_secs_f64() * 1000.0 / all.max(1) as f64;
    println!(
        "health checks during 20 reloads while draining: {} of {all} answered 200 (about {:.1} ms \
         per reload at {per_check:.2} ms per check); 503 within {:.1} ms of each reply at worst",
        ok,
        ok as f64 * per_check / 20.0,
        worst.as_secs_f64() * 1000.0
    );
    let status = node.status().await;
    assert_eq!(status["state"], "draining", "{status}");
    assert!(status["warnings"].is_null(), "no command failed: {status}");
    (ok, all, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_drain_each_reloads_new_worker_answers_503_once_its_commands_ran() {
    // A worker the master forks starts with proc.ebb_draining unset (it cannot inherit
    // EBB_DRAINING): without draining.map in the config, it answers 200 on /healthz until the
    // drain's start commands reach it. Measured (printed; docs/BENCHMARKS.md); what must hold is
    // that every new worker answers 503 once ebb's reply came and its commands ran.
    let _alone = MACHINE.write().await;
    let (node, _master) = attached(|h| h).await;
    let (ok, all, _) = health_checks_across_reloads_while_draining(&node).await;
    assert!(all > 0, "the health checker ran");
    println!("without draining.map: {ok} of {all} health checks answered 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_draining_map_no_health_check_answers_200_during_a_drain() {
    // The config reads ebb's draining.map as it loads: every worker the master forks starts
    // draining, with no window at all, whoever reloads.
    let _alone = MACHINE.write().await;
    let (node, master) = attached(|h| {
        // As the operator does once: the file must exist before HAProxy loads the config.
        let state = h.dir().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        std::fs::write(state.join("draining.map"), "").expect("an empty draining.map");
        let line = format!(
            "set-var proc.ebb_draining str(draining),map_str_int({},0)",
            state.join("draining.map").display()
        );
        h.global_line(&line)
    })
    .await;
    let (ok, all, _) = health_checks_across_reloads_while_draining(&node).await;
    assert!(all > 0, "the health checker ran");
    assert_eq!(
        ok, 0,
        "{ok} of {all} health checks answered 200 during the drain"
    );
    // A reload the master does on its own starts draining too.
    master.reload_by_signal().expect("SIGUSR2 to the master");
    node.events
        .wait_kind("reloaded", |b| {
            b["draining"] == true && b["duration_ms"] == 0
        })
        .await;
    assert_eq!(node.healthz().await, 503);
    // Undrained, the next worker serves from its first request.
    node.ok("undrain", json!({})).await;
    wait_until_async(T, "/healthz 200", || async {
        matches!(node.try_healthz().await, Ok(200))
    })
    .await;
    node.ok("reload", json!({})).await;
    assert_eq!(
        node.healthz().await,
        200,
        "the new worker serves after an undrain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_by_hard_stop_after_under_an_attached_master_is_reported_as_forced() {
    // The service manager's master writes to the journal, which ebb does not read: the cut is
    // known from the worker still holding its request when hard-stop-after ran out.
    let (node, master) = attached(|h| h.hard_stop_after("1s")).await;
    let w0 = as_pid(&node.status().await["haproxy"]["pid"]);
    let slow = spawn_get(node.port(), "/slow?ms=20000");
    wait_conns(&master, w0, 1).await;
    node.ok("reload", json!({})).await;
    node.wait_status("the old worker's connection to be counted", |s| {
        s["old_workers"][0]["connections"] == 1
    })
    .await;
    let exited = node
        .events
        .wait_kind("worker_exited", |b| b["pid"] == w0)
        .await;
    assert_eq!(exited.body["hard_stopped"], true, "{}", exited.body);
    assert_eq!(exited.body["connections_cut"], 1, "{}", exited.body);
    let (response, _) = tokio::time::timeout(T, slow)
        .await
        .expect("the request ends")
        .expect("request task");
    assert!(
        !matches!(&response, Ok(r) if r.status == 200),
        "the pinned request was cut: {response:?}"
    );
}
