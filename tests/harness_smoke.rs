//! Checks the end-to-end harness itself against the real binaries (nats-server, haproxy, the demo
//! backend). Only the node fixture's check runs the `ebb` binary.

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(10);

fn nats_greets(port: u16) -> bool {
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    stream.set_read_timeout(Some(T)).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
}

#[test]
fn nats_server_starts_restarts_and_stops() {
    let dir = TestDir::new();
    let mut nats = NatsServer::start(&dir.join("nats")).expect("start nats-server");
    let port = nats.port();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    assert!(nats_greets(port));
    let first_pid = nats.pid().unwrap();

    nats.restart().expect("restart");
    assert_eq!(nats.port(), port, "same port after restart");
    assert_ne!(nats.pid().unwrap(), first_pid);
    assert!(nats_greets(port));
    assert!(nats.store_dir().is_dir(), "JetStream store kept");

    nats.kill().expect("kill");
    assert!(!nats.is_running());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    nats.start_again().expect("start again");
    assert!(nats_greets(port));
    nats.stop().expect("stop");
    assert!(!is_alive(first_pid));
}

#[tokio::test]
async fn backend_answers_slow_and_keeps_alive() {
    let backend = Backend::start().unwrap();
    let port = backend.port();

    let started = std::time::Instant::now();
    let (status, body) = http_get(port, "/slow?ms=50", true).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slept 50 ms\n"));
    assert!(started.elapsed() >= Duration::from_millis(50));

    let mut client = KeepAliveClient::connect(port).await.unwrap();
    for _ in 0..3 {
        let response = client.get("/").await.unwrap();
        assert_eq!((response.status, response.body.as_str()), (200, "ok\n"));
        assert!(!response.connection_close());
    }
    assert_eq!(client.requests(), 3);
    assert!(!client.is_closed());

    // Stopping the backend closes the idle connection, and the client notices.
    backend.stop();
    assert!(
        client.wait_closed(T).await,
        "backend stop closes the connection"
    );
    assert!(matches!(client.get("/").await, Err(ClientError::Closed)));
    assert!(matches!(
        http_get(port, "/", true).await,
        Err(ClientError::ConnectRefused)
    ));
}

#[test]
fn haproxy_config_variants_check_as_intended() {
    let dir = TestDir::new();
    let backend = Backend::start().unwrap();
    let cfg = HaproxyConfig::new(dir.path(), backend.addr())
        .hard_stop_after("5s")
        .tag("v1");

    let good = cfg.write().unwrap();
    check_config(&good).expect("the default config is valid");
    let text = cfg.render();
    assert!(text.contains("expose-fd listeners"), "{text}");
    assert!(text.contains("hard-stop-after 5s"), "{text}");

    let broken = cfg.write_as("broken.cfg", &cfg.render_broken()).unwrap();
    let error = check_config(&broken).expect_err("the broken config is refused");
    assert!(
        format!("{error:#}").contains("this-is-not-a-keyword"),
        "{error:#}"
    );

    let (taken_text, _holder) = cfg.render_with_taken_port().unwrap();
    let taken = cfg.write_as("taken.cfg", &taken_text).unwrap();
    check_config(&taken).expect("a taken port passes -c");
    // ...but haproxy cannot start on it.
    let mut haproxy = Haproxy::spawn(&taken, &dir.join("taken.sock"), &[]).unwrap();
    let status = haproxy
        .child()
        .wait_timeout(T)
        .unwrap()
        .expect("haproxy exits on a taken port");
    assert!(!status.success(), "{status}");
    assert!(
        haproxy.log_text().contains("cannot bind"),
        "{}",
        haproxy.log_text()
    );
}

#[tokio::test]
async fn plain_haproxy_serves_and_load_counts() {
    let dir = TestDir::new();
    let backend = Backend::start().unwrap();
    let cfg = HaproxyConfig::new(dir.path(), backend.addr()).tag("v1");
    let haproxy = Haproxy::start(&cfg).expect("haproxy starts");
    let port = cfg.frontend_port();

    assert_eq!(show_info_pid(&cfg.admin_socket()), Some(haproxy.pid()));
    assert_eq!(haproxy_pids_for(dir.path()), vec![haproxy.pid()]);
    let info = show_info(&cfg.admin_socket()).unwrap();
    assert_eq!(info.get("CurrConns").map(String::as_str), Some("0"));

    let response = http_request(port, "/slow?ms=20", true, T).await.unwrap();
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "slept 20 ms\n")
    );
    assert_eq!(response.header("x-ebb-config"), Some("v1"));
    assert_eq!(http_get(port, "/healthz", true).await.unwrap().0, 200);
    let (status, _) = http_get(cfg.stats_port(), "/stats;csv", true)
        .await
        .unwrap();
    assert_eq!(status, 200);

    // Keep-alive through haproxy, and a partial request that counts as a connection.
    let mut client = KeepAliveClient::connect(port).await.unwrap();
    for _ in 0..3 {
        let response = client.get("/").await.unwrap();
        assert_eq!(response.status, 200);
        assert!(!response.connection_close());
    }
    let partial = partial_request(port).await.unwrap();
    let sock = cfg.admin_socket();
    wait_until_async(T, "CurrConns = 2", || {
        let sock = sock.clone();
        async move {
            let info = tokio::task::spawn_blocking(move || show_info(&sock)).await;
            matches!(info, Ok(Ok(info)) if info.get("CurrConns").map(String::as_str) == Some("2"))
        }
    })
    .await;
    let response = partial.finish().await.unwrap();
    assert_eq!(response.status, 200);

    // Load in both modes: all successes, counted.
    for mode in [LoadMode::Close, LoadMode::KeepAlive] {
        let load = LoadGen::start(port, 4, mode);
        // wait_for_ok blocks: keep it off this runtime's only thread.
        let load = tokio::task::spawn_blocking(move || {
            load.wait_for_ok(200, T);
            load
        })
        .await
        .unwrap();
        let report = tokio::task::spawn_blocking(move || load.stop())
            .await
            .unwrap();
        report.assert_no_failures();
        assert!(report.ok >= 200, "{report}");
        match mode {
            LoadMode::Close => assert_eq!(report.connections, report.total(), "{report}"),
            LoadMode::KeepAlive => assert!(report.connections <= 4, "{report}"),
        }
    }

    // A dead backend shows up as bad statuses, not as successes. (HAProxy waits about 1 s before
    // each of its 3 connect retries, so every failure takes a few seconds.)
    drop(backend);
    let load = LoadGen::start(port, 4, LoadMode::Close);
    let report = tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "4 failures counted", || {
            load.snapshot().failed() >= 4
        });
        load.stop()
    })
    .await
    .unwrap();
    assert_eq!(report.ok, 0, "{report}");
    assert!(report.count(FailureKind::BadStatus(503)) >= 4, "{report}");
}

#[test]
fn draining_variable_turns_healthz_503_and_sheds_keep_alive() {
    let dir = TestDir::new();
    let backend = Backend::start().unwrap();
    let cfg = HaproxyConfig::new(dir.path(), backend.addr());
    let path = cfg.write().unwrap();
    let mut haproxy = Haproxy::spawn(&path, &cfg.admin_socket(), &[]).unwrap();
    haproxy.wait_ready(T).unwrap();
    let port = cfg.frontend_port();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        assert_eq!(http_get(port, "/healthz", false).await.unwrap().0, 200);
        let mut client = KeepAliveClient::connect(port).await.unwrap();
        assert!(!client.get("/").await.unwrap().connection_close());

        // What the agent's default start_commands do.
        let answer = admin_command(
            &cfg.admin_socket(),
            "experimental-mode on; set var proc.ebb_draining int(1)",
        )
        .unwrap();
        assert!(answer.trim().is_empty(), "set var answered {answer:?}");

        assert_eq!(http_get(port, "/healthz", false).await.unwrap().0, 503);
        let response = client.get("/").await.unwrap();
        assert_eq!(response.status, 200);
        assert!(response.connection_close(), "{response:?}");
        assert!(client.wait_closed(T).await);
    });
}

#[test]
fn worker_started_while_draining_answers_503_at_once() {
    let dir = TestDir::new();
    let backend = Backend::start().unwrap();
    let cfg = HaproxyConfig::new(dir.path(), backend.addr());
    let path = cfg.write().unwrap();
    let mut cmd = std::process::Command::new(haproxy_bin());
    cmd.arg("-db")
        .arg("-f")
        .arg(&path)
        .env("EBB_DRAINING", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let haproxy = ChildGuard::spawn("haproxy", &mut cmd).unwrap();
    let sock = cfg.admin_socket();
    wait_until(T, "haproxy ready", || show_info_pid(&sock).is_some());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = runtime
        .block_on(http_get(cfg.frontend_port(), "/healthz", true))
        .unwrap();
    assert_eq!((status, body.as_str()), (503, "draining\n"));

    // A crash, as a test would cause one: the zombie no longer counts as a haproxy.
    assert_eq!(kill_haproxy_for(dir.path()), vec![haproxy.pid()]);
    wait_until(T, "haproxy gone", || {
        haproxy_pids_for(dir.path()).is_empty()
    });
}

#[test]
fn test_dir_reaps_processes_in_other_process_groups() {
    let dir = TestDir::new();
    let backend = Backend::start().unwrap();
    let cfg = HaproxyConfig::new(dir.path(), backend.addr());
    let path = cfg.write().unwrap();
    // Spawned like the agent spawns haproxy: its own group, and no guard of ours.
    let mut child = std::process::Command::new(haproxy_bin());
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let sock = cfg.admin_socket();
    wait_until(T, "haproxy ready", || show_info_pid(&sock) == Some(pid));
    assert_eq!(pids_mentioning(dir.path()), vec![pid]);

    let dir_path = dir.path().to_owned();
    drop(dir);
    // The reaper SIGKILLed it; reap the zombie ourselves since we are its parent.
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!is_alive(pid));
    assert!(!dir_path.exists());
}

#[test]
fn cmdline_matching_respects_dir_boundaries() {
    let dir = Path::new("/tmp/ebb-test-abc");
    assert!(cmdline_mentions(
        b"haproxy\0-f\0/tmp/ebb-test-abc/h.cfg\0",
        dir
    ));
    assert!(cmdline_mentions(b"x\0-sd\0/tmp/ebb-test-abc\0", dir));
    assert!(cmdline_mentions(b"x\0--dir=/tmp/ebb-test-abc/js\0", dir));
    assert!(!cmdline_mentions(
        b"haproxy\0-f\0/tmp/ebb-test-abcd/h.cfg\0",
        dir
    ));
    assert!(!cmdline_mentions(b"", dir));
}

#[test]
fn agent_config_renders_every_section() {
    let dir = TestDir::new();
    let cfg = HaproxyConfig::new(dir.path(), "127.0.0.1:1".parse().unwrap());
    let mut agent = AgentConfig::new(dir.path(), "nats://127.0.0.1:4222", &cfg);
    agent
        .node_id("web-1")
        .groups(&["web", "eu"])
        .min_period("250ms")
        .set("push", "enabled", "true")
        .raw("[[plugins]]\nname = \"x\"\npath = \"/nonexistent.so\"");
    let text = agent.render();
    for expected in [
        "[node]\nid = \"web-1\"\ngroups = [\"web\", \"eu\"]\n",
        "url = \"nats://127.0.0.1:4222\"",
        &format!("admin_socket = \"{}\"", cfg.admin_socket().display()),
        "min_period = \"250ms\"",
        "ignore_frontends = [\"stats\"]",
        "[log]\nformat = \"json\"",
        "[push]\nenabled = true",
        "[[plugins]]\nname = \"x\"",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
    }
    assert_eq!(agent.get("drain", "min_period"), Some("\"250ms\""));
    let path = agent.write().unwrap();
    assert_eq!(std::fs::read_to_string(path).unwrap(), text);
}

#[test]
fn agent_guard_with_a_stand_in_binary() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;

    let dir = TestDir::new();
    // Stands in for `ebb agent --config PATH`: logs JSON lines, exits 3 on SIGHUP.
    // The non-JSON line comes first, so it is in the log once "started" is seen.
    let script = dir.join("fake-ebb");
    std::fs::write(
        &script,
        r#"#!/bin/sh
[ "$1 $2" = "agent --config" ] || exit 9
echo "not json"
echo "{\"level\":\"INFO\",\"fields\":{\"message\":\"started\",\"config\":\"$3\",\"x\":\"$EBB_X\"}}"
trap 'echo "{\"fields\":{\"message\":\"hup\"}}"; exit 3' HUP
while :; do sleep 0.01; done
"#,
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(&config, "").unwrap();

    let mut agent = Agent::start_with_env(&script, &config, &[("EBB_X", "given")]).unwrap();
    let line = agent.wait_for_log(T, |l| log_message(l) == Some("started"));
    assert_eq!(line["fields"]["config"], config.to_str().unwrap());
    assert_eq!(line["fields"]["x"], "given");
    assert!(agent.log_text().contains("not json"));
    assert_eq!(agent.log_lines().len(), 1);

    agent.signal(Signal::HUP).unwrap();
    assert_eq!(agent.wait_exit(T).code(), Some(3));
    agent.wait_for_log(T, |l| log_message(l) == Some("hup"));

    let first_log = agent.log_path().to_owned();
    let mut agent = Agent::start(&script, &config).unwrap();
    agent.wait_for_log(T, |l| log_message(l) == Some("started"));
    assert_ne!(agent.log_path(), first_log, "a fresh log per start");
    assert_eq!(agent.kill9().unwrap().signal(), Some(9));
    assert!(!agent.is_running());
}

#[test]
fn load_gen_counts_refusals_and_stops_by_itself() {
    let port = free_port(); // nothing listens there
    let load = LoadGen::builder(port)
        .concurrency(2)
        .max_duration(Duration::from_millis(200))
        .start();
    wait_until(T, "refusals counted", || load.snapshot().failed() >= 10);
    // It stops by itself after max_duration: the elapsed time gets set.
    wait_until(T, "self-stop", || load.snapshot().elapsed > Duration::ZERO);
    let report = load.stop();
    assert_eq!(report.ok, 0);
    assert_eq!(
        report.count(FailureKind::ConnectRefused),
        report.failed(),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_tap_records_every_message_and_wakes_its_waiters() {
    use futures::FutureExt;
    use serde_json::json;

    let dir = TestDir::new();
    let nats = NatsServer::start(&dir.join("nats")).expect("start nats-server");
    let nc = nats_client(&nats.url(), T).await;
    let tap = EventTap::subscribe(&nc, "ebb.event.tap-1.>")
        .await
        .with_timeout(T);
    assert!(tap.is_empty());

    // The waiter starts before its event is published: only the notification can wake it.
    let publisher = nc.clone();
    let publish = async move {
        let events = [
            ("agent_started", json!({"kind": "agent_started", "seq": 1})),
            ("heartbeat", json!({"kind": "heartbeat", "seq": 2})),
            (
                "drained",
                json!({"kind": "drained", "seq": 3, "drain_id": "d"}),
            ),
            ("heartbeat", json!({"kind": "heartbeat", "seq": 4})),
        ];
        for (kind, body) in events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("tap-1.boot.{}", body["seq"]).as_str(),
            );
            publisher
                .publish_with_headers(
                    format!("ebb.event.tap-1.{kind}"),
                    headers,
                    body.to_string().into(),
                )
                .await
                .expect("publish");
        }
        publisher
            .publish("ebb.event.tap-1.junk", "not json".into())
            .await
            .expect("publish");
        publisher.flush().await.expect("flush");
    };
    let (drained, ()) = tokio::join!(tap.drained("d"), publish);
    assert_eq!(drained.subject, "ebb.event.tap-1.drained");
    assert_eq!(drained.msg_id.as_deref(), Some("tap-1.boot.3"));
    assert_eq!((drained.kind(), drained.seq()), ("drained", 3));

    let junk = tap.wait("the junk message", |e| e.kind().is_empty()).await;
    assert_eq!(junk.body, json!("not json"), "kept as a string");
    assert_eq!(junk.msg_id, None);
    let (index, _) = tap
        .wait_indexed("the second heartbeat", T, |e| e.seq() == 4)
        .await;
    assert_eq!(index, 3, "arrival order");
    let all = tap.all();
    assert_eq!(all.len(), 5);
    assert!(
        all.windows(2).all(|w| w[0].at <= w[1].at),
        "stamped on receipt"
    );
    assert_eq!(tap.count(|e| e.kind() == "heartbeat"), 2);
    assert_eq!(tap.of_kind("heartbeat").len(), 2);
    assert_eq!(tap.wait_n("heartbeat", 2, |_| true).await.len(), 2);
    let started = tap.wait_kind("agent_started", |b| b["seq"] == 1).await;
    assert_eq!(started.msg_id.as_deref(), Some("tap-1.boot.1"));

    // A wait that nothing satisfies ends at its timeout, and says what it waited for.
    let short = Duration::from_millis(200);
    assert!(tap
        .try_wait(short, |e| e.kind() == "stopped")
        .await
        .is_none());
    let timed_out = std::panic::AssertUnwindSafe(
        tap.wait_for("a stopped event", short, |e| e.kind() == "stopped"),
    )
    .catch_unwind()
    .await
    .expect_err("no stopped event was published");
    let message = timed_out
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("waiting for a stopped event") && message.contains("drained#3"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_fixture_serves_and_leaves_nothing_running_after_a_panic() {
    use futures::FutureExt;

    let mut node = NodeFixture::builder()
        .node_id("fx-1")
        .timeout(T)
        .haproxy(|h| h.tag("fixture"))
        .agent(|c| {
            c.groups(&["fx"]);
        })
        .start()
        .await;
    let status = node.status().await;
    assert_eq!(status["node"], "fx-1", "{status}");
    assert_eq!(status["groups"], serde_json::json!(["fx"]), "{status}");
    let worker = node.serving_pid().await.expect("a worker serves");
    assert_eq!(node.haproxy_pids().await, vec![worker]);
    node.assert_serves().await;
    let started = node.events.wait_kind("agent_started", |_| true).await;
    assert_eq!(started.body["pid"], worker, "{}", started.body);

    let dir = node.dir().to_owned();
    let pids = [
        node.agent.pid(),
        worker,
        node.nats()
            .expect("the fixture's own nats-server")
            .pid()
            .expect("running"),
    ];
    let failed = std::panic::AssertUnwindSafe(async move {
        let _node = node;
        panic!("a test fails while its node runs");
    })
    .catch_unwind()
    .await;
    assert!(failed.is_err());
    for pid in pids {
        assert!(!is_alive(pid), "process {pid} outlived its fixture");
    }
    assert!(!dir.exists(), "{} outlived its fixture", dir.display());
}
