//! The master CLI client (`ebb_agent::haproxy::master`) against a real `haproxy -W` (whichever
//! `EBB_TEST_HAPROXY` names): process listing, commands routed to one worker, reloads that work,
//! reloads that fail, and many reloads in a row on a master with 10 connection slots.

mod support;

use std::time::Duration;

use ebb_agent::haproxy::admin::{RowKind, StatRows};
use ebb_agent::haproxy::master::{judge, Judgement, MasterCli, MasterError};
use support::master::Master;
use support::*;

/// Default timeout of every wait. Generous: the tests share a small machine with other work.
const T: Duration = Duration::from_secs(30);
const CLI_TIMEOUT: Duration = Duration::from_secs(5);

struct Ctx {
    _backend: Backend,
    cfg: HaproxyConfig,
    master: Master,
    cli: MasterCli,
    // Last: kills whatever a failed test left behind, then removes the dir.
    _dir: TestDir,
}

fn start() -> Ctx {
    let dir = TestDir::new();
    let backend = Backend::start().expect("backend");
    let cfg = HaproxyConfig::new(dir.path(), backend.addr());
    let master = Master::start(&cfg).expect("haproxy -W");
    let cli = MasterCli::new(master.socket(), CLI_TIMEOUT);
    Ctx {
        _backend: backend,
        cfg,
        master,
        cli,
        _dir: dir,
    }
}

/// `(major, minor)` of the master's version, from `show proc`.
fn version(ctx: &Ctx) -> (u32, u32) {
    let procs = ctx.master.show_proc().expect("show proc");
    let version = procs.master.expect("a master line").version;
    let mut parts = version.split(['.', '-']).map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_proc_lists_the_master_and_its_worker() {
    let ctx = start();
    let procs = ctx.cli.show_proc().await.expect("show proc");
    assert_eq!(
        procs.master.as_ref().map(|m| m.pid),
        Some(ctx.master.master_pid())
    );
    assert_eq!(procs.failed, Some(0));
    assert_eq!(procs.workers.len(), 1, "{procs:?}");
    assert!(procs.old_workers.is_empty(), "{procs:?}");
    assert!(!procs.truncated, "{procs:?}");
    let worker = procs.workers[0].pid;
    let info = ctx.cli.show_info(worker).await.expect("show info");
    assert!(info.contains(&format!("Pid: {worker}")), "{info}");
    let (info, rows) = ctx
        .cli
        .sample(worker, StatRows::NONE)
        .await
        .expect("sample");
    assert!(info.contains("CurrConns:"), "{info}");
    assert_eq!(rows, None);
    let frontends = StatRows {
        frontends: true,
        backends: false,
    };
    let (info, rows) = ctx.cli.sample(worker, frontends).await.expect("sample");
    assert!(info.contains("CurrConns:"), "{info}");
    let rows = rows.expect("frontend rows");
    assert!(rows.iter().any(|r| r.proxy == "fe"), "{rows:?}");
    assert!(rows.iter().all(|r| r.kind == RowKind::Frontend), "{rows:?}");
    // From 2.8 on, the master leaves the connection open after this error: more of them than
    // its 10 slots must still not lock the socket.
    for _ in 0..12 {
        assert!(matches!(
            ctx.cli.show_info(u32::MAX - 1).await,
            Err(MasterError::NoSuchWorker { .. })
        ));
    }
    ctx.cli.show_proc().await.expect("show proc after errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_returns_a_new_worker_while_the_old_one_finishes_its_request() {
    let ctx = start();
    let before = ctx.cli.show_proc().await.expect("show proc");
    let old = before.workers[0].pid;
    let port = ctx.cfg.frontend_port();
    let slow = tokio::spawn(async move {
        http_request(port, "/slow?ms=3000", true, Duration::from_secs(20)).await
    });
    wait_until_async(T, "the old worker to hold the slow request", || async {
        ctx.cli.connections(old).await.ok() == Some(1)
    })
    .await;

    let new = ctx.cli.reload(&before, T).await.expect("reload");
    assert_ne!(new, old);
    ctx.cli
        .show_info(new)
        .await
        .expect("the new worker answers");
    let after = ctx.cli.show_proc().await.expect("show proc");
    assert_eq!(
        after.workers.iter().map(|p| p.pid).collect::<Vec<_>>(),
        vec![new]
    );
    assert!(
        after.old_workers.iter().any(|p| p.pid == old),
        "the old worker is listed as old: {after:?}"
    );
    assert_eq!(ctx.cli.connections(old).await.expect("connections"), 1);
    assert_eq!(ctx.cli.connections(new).await.expect("connections"), 0);

    let response = slow.await.expect("join").expect("the slow request");
    assert_eq!(response.status, 200);
    // With its last connection gone, the old worker leaves.
    wait_until_async(T, "the old worker to exit", || async {
        ctx.cli
            .show_proc()
            .await
            .is_ok_and(|p| p.old_workers.iter().all(|w| w.pid != old))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_on_sets_a_variable_in_the_worker() {
    let ctx = start();
    let worker = ctx.master.worker_pid().expect("worker");
    assert!(
        matches!(
            ctx.cli
                .command_on(worker, "set var proc.ebb_draining int(1)")
                .await,
            Err(MasterError::Refused { .. })
        ),
        "set var needs experimental mode"
    );
    ctx.cli
        .command_on(
            worker,
            "experimental-mode on; set var proc.ebb_draining int(1)",
        )
        .await
        .expect("set var");
    let answer = ctx
        .cli
        .command_on(worker, "get var proc.ebb_draining")
        .await
        .expect("get var");
    assert!(answer.contains("value=<1>"), "{answer}");
    let (status, _) = http_get(ctx.cfg.frontend_port(), "/healthz", true)
        .await
        .expect("healthz");
    assert_eq!(status, 503, "the worker now drains");

    assert!(matches!(
        ctx.cli.command_on(worker, "no such command").await,
        Err(MasterError::Refused { .. })
    ));
    assert!(matches!(
        ctx.cli.command_on(u32::MAX - 1, "show info").await,
        Err(MasterError::NoSuchWorker { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_fails_the_reload_and_the_old_worker_keeps_serving() {
    let ctx = start();
    let version = version(&ctx);
    let before = ctx.cli.show_proc().await.expect("show proc");
    let old = before.workers[0].pid;
    ctx.cfg
        .write_text(&ctx.cfg.render_broken())
        .expect("write the broken config");

    match ctx.cli.reload(&before, T).await {
        Err(MasterError::ReloadFailed { logs, .. }) => {
            if version < (2, 7) {
                assert_eq!(logs, None, "{version:?} says nothing");
            }
            if version >= (2, 8) {
                let logs = logs.expect("2.8 answers with its startup logs");
                assert!(logs.contains("this-is-not-a-keyword"), "{logs}");
            }
        }
        other => panic!(
            "expected ReloadFailed, got {other:?}; log:\n{}",
            ctx.master.log_text()
        ),
    }

    let after = ctx.cli.show_proc().await.expect("show proc");
    assert_eq!(
        after.workers.iter().map(|p| p.pid).collect::<Vec<_>>(),
        vec![old],
        "{after:?}"
    );
    let (status, _) = http_get(ctx.cfg.frontend_port(), "/", true)
        .await
        .expect("request");
    assert_eq!(status, 200);

    // The master recovers with a good config.
    ctx.cfg.write().expect("write the config");
    let new = ctx.cli.reload(&after, T).await.expect("reload");
    assert_ne!(new, old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_in_a_row_never_exhaust_the_connection_slots() {
    let ctx = start();
    let mut seen = Vec::new();
    for _ in 0..20 {
        let before = ctx.cli.show_proc().await.expect("show proc");
        let new = ctx.cli.reload(&before, T).await.expect("reload");
        assert!(!seen.contains(&new), "pid {new} came back");
        seen.push(new);
    }
    let procs = ctx.cli.show_proc().await.expect("show proc");
    assert_eq!(procs.workers.first().map(|p| p.pid), seen.last().copied());
    for _ in 0..30 {
        ctx.cli
            .show_info(*seen.last().expect("20 pids"))
            .await
            .expect("show info");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_by_signal_and_a_restart_are_seen_through_the_socket() {
    let mut ctx = start();
    let before = ctx.cli.show_proc().await.expect("show proc");
    ctx.master.reload_by_signal().expect("SIGUSR2");
    let new = wait_for_async(T, "a new worker after SIGUSR2", || async {
        let after = ctx.cli.show_proc().await.ok()?;
        match judge(&before, &after) {
            Judgement::Succeeded(pid) => Some(pid),
            Judgement::Failed => panic!("reload failed: {after:?}"),
            Judgement::Pending => None,
        }
    })
    .await;
    ctx.cli
        .show_info(new)
        .await
        .expect("the new worker answers");

    let old_master = ctx.master.master_pid();
    ctx.master.restart().expect("restart");
    let procs = ctx.cli.show_proc().await.expect("show proc");
    let master = procs.master.expect("a master line").pid;
    assert_ne!(master, old_master);
    assert_eq!(master, ctx.master.master_pid());
}
