//! The local control socket and `ebb ctl --local`: the node can be seen and drained on the box
//! while NATS is down, with the bus's rules (same checks, same request-id memory, same lifecycle
//! table), against a real agent, haproxy and nats-server.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const CTL_LIMIT: Duration = Duration::from_secs(60);

/// `ebb ctl --local --socket SOCKET ARGS… --json`: its exit code and its JSON output.
async fn ctl_local(node: &NodeFixture, args: &[&str]) -> (i32, Value) {
    let socket = node.config.control_socket();
    let socket = socket.to_string_lossy();
    let mut all = vec!["--local", "--socket", &socket, "--json"];
    all.extend_from_slice(args);
    let run = run_ctl(&all, &[], CTL_LIMIT).await;
    let out = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "ebb ctl {all:?}: stdout is not JSON ({e}): {}\nstderr: {}",
            run.stdout, run.stderr
        )
    });
    (run.code, out)
}

fn first_reply(out: &Value) -> &Value {
    &out["replies"][0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_local_sees_drains_and_undrains_the_node_while_nats_is_down() {
    let mut node = NodeFixture::builder().start().await;
    let pid = node.serving_pid().await.expect("a worker serves");
    node.nats()
        .expect("the node's own nats-server")
        .stop()
        .expect("stop nats-server");

    let (code, out) = ctl_local(&node, &["status"]).await;
    assert_eq!(code, 0, "{out}");
    let status = &first_reply(&out)["result"];
    assert_eq!(status["state"], "serving", "{out}");
    assert_eq!(as_pid(&status["haproxy"]["pid"]), pid, "{out}");

    let (code, out) = ctl_local(&node, &["drain", "--drain-id", "d-local", "--wait", "30s"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["state"], "drained", "{out}");
    assert_eq!(out["drain"]["result"]["drain_id"], "d-local", "{out}");
    assert_eq!(
        node.healthz().await,
        503,
        "a drained node fails its health check"
    );

    let (code, out) = ctl_local(&node, &["undrain"]).await;
    assert_eq!(code, 0, "{out}");
    wait_until_async(node.timeout(), "/healthz 200 after undrain", || async {
        matches!(node.try_healthz().await, Ok(200))
    })
    .await;
    let (_, out) = ctl_local(&node, &["status"]).await;
    assert_eq!(first_reply(&out)["result"]["state"], "serving", "{out}");
    assert_eq!(
        node.serving_pid().await,
        Some(pid),
        "the same worker serves"
    );

    // What happened while NATS was down waits in the outbox, and goes out once it is back.
    let (_, out) = ctl_local(&node, &["status"]).await;
    let waiting = first_reply(&out)["result"]["outbox_depth"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        waiting >= 3,
        "drain_started, drained, undrained wait: {out}"
    );
    node.nats()
        .expect("nats")
        .start_again()
        .expect("start nats-server again");
    wait_until_async(node.timeout(), "the outbox to empty", || async {
        let (_, out) = ctl_local(&node, &["status"]).await;
        first_reply(&out)["result"]["outbox_depth"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_answers_with_the_bus_rules_and_its_request_id_memory() {
    let node = NodeFixture::builder().start().await;
    let path = node.config.control_socket();
    let mode = std::fs::metadata(&path)
        .expect("the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only the agent's user may connect");
    let mut socket = ControlClient::connect(&path).await;

    // Bad lines get a reply that says what is wrong, and the connection goes on.
    let reply = socket.send_line("status").await;
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["error"]["code"], "invalid_request", "{reply}");
    let reply = socket
        .send(json!({"verb": "explode", "request_id": "r-x"}))
        .await;
    assert_eq!(reply["error"]["code"], "unknown_command", "{reply}");
    assert_eq!(reply["request_id"], "r-x", "{reply}");
    let reply = socket.send(json!({"verb": "drain", "timeout_ms": 1})).await;
    assert_eq!(reply["error"]["code"], "invalid_request", "{reply}");
    assert_eq!(node.status().await["state"], "serving", "nothing changed");

    let drain = json!({"verb": "drain", "request_id": "r-1", "drain_id": "d-1"});
    let first = socket.send(drain.clone()).await;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["node"], node.id());
    assert_eq!(first["request_id"], "r-1");
    node.wait_state("drained").await;

    // The same request again, over the socket and over NATS: the first reply, acted on once.
    let again = socket.send(drain).await;
    assert_eq!(again, first);
    let over_nats = node
        .command("drain", json!({"request_id": "r-1", "drain_id": "d-1"}))
        .await;
    assert_eq!(over_nats, first);
    assert_eq!(
        node.events.count(|e| e.kind() == "drain_started"),
        1,
        "one drain started"
    );

    // The lifecycle table holds: a drained node refuses a reload, from here as from the bus.
    let reply = socket.send(json!({"verb": "reload"})).await;
    assert_eq!(reply["error"]["code"], "conflict", "{reply}");
    let reply = socket
        .send(json!({"verb": "undrain", "drain_id": "d-2"}))
        .await;
    assert_eq!(
        reply["error"]["code"], "conflict",
        "another drain's id: {reply}"
    );
    let reply = socket
        .send(json!({"verb": "undrain", "drain_id": "d-1"}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    node.wait_state("serving").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_local_refuses_what_it_cannot_do_and_names_the_socket_it_cannot_reach() {
    let dir = TestDir::new();
    let socket = dir.join("nobody.sock");
    let socket = socket.to_string_lossy();
    let run = run_ctl(&["--local", "--socket", &socket, "status"], &[], CTL_LIMIT).await;
    assert_eq!(run.code, 3, "unreachable: {run:?}");
    assert!(run.stderr.contains(&*socket), "{}", run.stderr);
    assert!(
        run.stderr.contains("is the agent running"),
        "{}",
        run.stderr
    );

    for args in [
        vec!["status", "--node", "web-1"],
        vec!["drain", "--all"],
        vec!["watch"],
        vec!["reload", "--max-parallel", "2"],
    ] {
        let mut all = vec!["--local", "--socket", &socket];
        all.extend_from_slice(&args);
        let run = run_ctl(&all, &[], CTL_LIMIT).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("nothing was sent"),
            "{args:?}: {}",
            run.stderr
        );
    }
    // Over NATS a target is still required, and nothing is sent without one.
    let run = run_ctl(&["--nats", "nats://127.0.0.1:1", "status"], &[], CTL_LIMIT).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("--node, --group or --all"),
        "{}",
        run.stderr
    );
}

/// Runs examples/systemd/ebb-stop as systemd's ExecStop would, for `node`'s agent, in `mode`.
async fn ebb_stop(node: &NodeFixture, mode: &str) -> std::process::Output {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/systemd/ebb-stop");
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg(script)
        .env("MAINPID", node.agent.pid().to_string())
        .env("EBB_BIN", ebb_bin())
        .env("EBB_CTL_SOCKET", node.config.control_socket())
        .env("EBB_SHUTDOWN_DRAIN", "30s")
        .env("EBB_STOP_MODE", mode)
        .kill_on_drop(true);
    tokio::time::timeout(CTL_LIMIT, cmd.output())
        .await
        .expect("ebb-stop ends")
        .expect("run ebb-stop")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_ebb_stop_drains_then_stops_haproxy_without_cutting_a_request() {
    let mut node = NodeFixture::builder().start().await;
    let slow = spawn_get(node.port(), "/slow?ms=3000");
    node.wait_conns(1).await;

    let out = ebb_stop(&node, "shutdown").await;
    assert!(out.status.success(), "ebb-stop: {out:?}");
    full_200(slow, "slept 3000 ms\n").await;
    node.events
        .wait_kind("drained", |b| b["forced"] == false)
        .await;
    let exit = node.agent.wait_exit(node.timeout());
    assert!(
        exit.success(),
        "the agent stopped HAProxy and exited 0: {exit}"
    );
    assert_eq!(
        node.haproxy_pids().await,
        Vec::<u32>::new(),
        "HAProxy stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_restart_ebb_stop_leaves_haproxy_serving_for_the_next_agent() {
    let mut node = NodeFixture::builder().start().await;
    let pid = node.serving_pid().await.expect("a worker serves");
    let out = ebb_stop(&node, "restart").await;
    assert!(out.status.success(), "ebb-stop: {out:?}");
    let exit = node.agent.wait_exit(node.timeout());
    assert!(exit.success(), "{exit}");
    node.assert_serves().await;
    node.restart_agent();
    node.wait_serving().await;
    assert_eq!(
        node.serving_pid().await,
        Some(pid),
        "adopted, not restarted"
    );
}
