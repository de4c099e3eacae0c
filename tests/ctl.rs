//! `ebb ctl` from a terminal's point of view: the real binary against a real nats-server and real
//! agents with their haproxy. Exit codes a script can trust, waits as long as the work, the
//! server from NATS_URL, confirmations, and tables that keep long node ids whole.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

/// No `ebb ctl` run of this suite may take longer; past it the test fails instead of hanging.
const CTL_LIMIT: Duration = Duration::from_secs(120);

/// Runs `ebb ctl ARGS…` with only `env` of the `EBB_*`/`NATS_*` variables.
async fn ctl_env(args: &[&str], env: &[(&str, &str)]) -> CtlRun {
    run_ctl(args, env, CTL_LIMIT).await
}

/// `ebb ctl --nats URL ARGS…`.
async fn ctl(url: &str, args: &[&str]) -> CtlRun {
    let mut all = vec!["--nats", url];
    all.extend_from_slice(args);
    ctl_env(&all, &[]).await
}

/// A URL where nothing listens: a run that still exits 2 there found its problem before
/// connecting, so it sent nothing.
fn dead_url() -> String {
    format!("nats://127.0.0.1:{}", free_port())
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_waits_for_a_long_request_to_finish_and_exits_0() {
    let node = NodeFixture::builder()
        .agent(|c| {
            c.set_str("haproxy", "stop_timeout", "60s");
        })
        .start()
        .await;
    let port = node.port();
    let slow = tokio::spawn(async move {
        http_request(port, "/slow?ms=8000", true, Duration::from_secs(30)).await
    });
    node.wait_conns(1).await;

    // ctl's --timeout stays at its 5 s default: the stop takes longer, and ctl waits for it.
    let run = ctl(node.nats_url(), &["stop", "--node", node.id()]).await;
    assert_eq!(run.code, 0, "stop with a long request in flight: {run:?}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.split_whitespace().take(2).eq([node.id(), "ok"])),
        "the node's row says ok: {run:?}"
    );
    let response = slow
        .await
        .expect("the slow request's task")
        .unwrap_or_else(|e| panic!("the request in flight was cut by the stop: {e}"));
    assert_eq!(response.status, 200, "{response:?}");
    let stopped = node.events.wait_kind("stopped", |_| true).await;
    assert_eq!(stopped.body["connections_cut"], 0, "{stopped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_problems_exit_2_before_anything_is_sent() {
    let dir = TestDir::new();
    let url = dead_url();
    let garbage = dir.join("garbage.creds");
    std::fs::write(&garbage, "not a credentials file\n").expect("write garbage.creds");
    let a_dir = path_arg(dir.path());
    let missing = path_arg(&dir.join("missing.cfg"));
    let garbage = path_arg(&garbage);
    let config = dir.join("haproxy.cfg");
    std::fs::write(&config, "global\n").expect("write haproxy.cfg");
    let a_config = path_arg(&config);

    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "a pushed config that does not exist",
            vec!["push", "--node", "n1", "--config", &missing],
            "--config",
        ),
        (
            "a creds file that cannot be read (a directory)",
            vec!["--creds", &a_dir, "status", "--node", "n1"],
            "--creds",
        ),
        (
            "a creds file that is not one",
            vec!["--creds", &garbage, "status", "--node", "n1"],
            "--creds",
        ),
        (
            "an nkey seed file that does not exist",
            vec!["--nkey", &missing, "status", "--node", "n1"],
            "--nkey",
        ),
        (
            "a CA file that does not exist",
            vec!["--tls-ca", &missing, "status", "--node", "n1"],
            "--tls-ca",
        ),
        (
            "a flag that does not exist",
            vec!["status", "--node", "n1", "--frobnicate"],
            "--frobnicate",
        ),
        (
            "a node id no subject can carry",
            vec!["status", "--node", "web.1"],
            "not a valid id",
        ),
        (
            "drain --all without --yes and without a terminal",
            vec!["drain", "--all"],
            "--yes",
        ),
        (
            "stop of a group without --yes and without a terminal",
            vec!["stop", "--group", "web"],
            "--yes",
        ),
        (
            "push to every node without --yes and without a terminal",
            vec!["push", "--all", "--config", &a_config],
            "--yes",
        ),
    ];
    for (what, args, says) in cases {
        let run = ctl(&url, &args).await;
        assert_eq!(run.code, 2, "{what}: usage error: {run:?}");
        assert!(run.stderr.contains(says), "{what}: names {says}: {run:?}");
    }
    for missing_file in ["--creds", "--nkey", "--tls-ca"] {
        let run = ctl(&url, &[missing_file, &missing, "status", "--node", "n1"]).await;
        assert!(
            run.stderr.contains(&missing) && run.stderr.contains("check the path"),
            "{missing_file}: the message names the file and what to do: {run:?}"
        );
    }

    // The same commands with nothing wrong locally get as far as the network: unreachable, 3.
    let run = ctl(&url, &["drain", "--all", "--yes"]).await;
    assert_eq!(run.code, 3, "drain --all --yes with no server: {run:?}");
    assert!(
        run.stderr.contains("cannot connect to NATS"),
        "says what failed: {run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_exist_is_reported_at_once_with_what_to_check() {
    let dir = TestDir::new();
    let nats = NatsServer::start(&dir.join("nats")).expect("start nats-server");
    // A generous --timeout: a run that waited for it would say "within 1m".
    for verb in ["status", "reload", "stop", "undrain"] {
        let run = ctl(
            &nats.url(),
            &["--timeout", "60s", verb, "--node", "no-such-node"],
        )
        .await;
        assert_eq!(run.code, 3, "{verb} of a node that does not exist: {run:?}");
        assert!(
            run.stderr.contains("no node answered") && !run.stderr.contains("within"),
            "{verb}: says no node answered, without claiming a wait: {run:?}"
        );
        assert!(
            run.stderr.contains("ebb.node.no-such-node.")
                && run.stderr.contains("node id")
                && run.stderr.contains("--prefix"),
            "{verb}: names the subject and what to check: {run:?}"
        );
    }
    let run = ctl(&nats.url(), &["--json", "status", "--node", "no-such-node"]).await;
    assert_eq!(run.code, 3, "{run:?}");
    let out: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("--json prints JSON ({e}): {run:?}"));
    assert_eq!(out["no_responders"], true, "{out}");
    assert_eq!(out["missing"], serde_json::json!(["no-such-node"]), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_url_names_the_server_and_the_agents_variables_do_not() {
    let node = NodeFixture::builder().start().await;
    let live = node.nats_url().to_owned();
    let args = ["status", "--node", node.id()];

    let run = ctl_env(&args, &[("NATS_URL", &live)]).await;
    assert_eq!(run.code, 0, "NATS_URL without --nats: {run:?}");
    assert!(run.stdout.contains("serving"), "{run:?}");

    // The agent's variables point at the live server, NATS_URL at a dead one: ctl must go to
    // the dead one and say it cannot connect.
    let dead = dead_url();
    let run = ctl_env(
        &args,
        &[
            ("NATS_URL", &dead),
            ("EBB_NATS__URL", &live),
            ("EBB_NATS_URL", &live),
        ],
    )
    .await;
    assert_eq!(run.code, 3, "EBB_NATS__URL is not ctl's: {run:?}");
    assert!(
        run.stderr.contains(&dead) && run.stderr.contains("NATS_URL"),
        "names the server it tried and where that came from: {run:?}"
    );

    // --nats wins over NATS_URL.
    let run = ctl_env(
        &["--nats", &live, "status", "--node", node.id()],
        &[("NATS_URL", &dead)],
    )
    .await;
    assert_eq!(run.code, 0, "--nats over NATS_URL: {run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_char_node_id_appears_whole_in_the_tables() {
    let id = format!("edge-{}", "0123456789abcdef".repeat(4));
    let id = &id[..64];
    let node = NodeFixture::builder().node_id(id).start().await;

    let run = ctl(node.nats_url(), &["status", "--node", id]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|h| h.starts_with("NODE") && h.contains("STATE")),
        "a header: {run:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().take(2).eq([id, "serving"])),
        "the whole id, then its state: {run:?}"
    );

    // reload answers after its work; its table keeps the id whole too.
    let run = ctl(node.nats_url(), &["reload", "--node", id]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.split_whitespace().take(2).eq([id, "ok"])),
        "the whole id, then ok: {run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_stop_with_yes_waits_for_every_node_and_its_long_request() {
    let fleet = Fleet::start(&["st-1", "st-2"], |_, node| {
        node.agent(|c| {
            c.groups(&["g"]).set_str("haproxy", "stop_timeout", "60s");
        })
    })
    .await;
    fleet.wait_serving().await;
    let slow_node = fleet.node("st-2");
    let port = slow_node.port();
    let slow = tokio::spawn(async move {
        http_request(port, "/slow?ms=8000", true, Duration::from_secs(30)).await
    });
    slow_node.wait_conns(1).await;

    let run = ctl(
        &fleet.nats_url(),
        &["--json", "stop", "--group", "g", "--yes"],
    )
    .await;
    assert_eq!(run.code, 0, "stop --group g --yes: {run:?}");
    let out: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("--json prints JSON ({e}): {run:?}"));
    let nodes: Vec<&str> = out["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .filter(|r| r["ok"] == true)
        .filter_map(|r| r["node"].as_str())
        .collect();
    assert_eq!(nodes, ["st-1", "st-2"], "both nodes stopped: {out}");
    assert_eq!(out["missing"], serde_json::json!([]), "{out}");
    let response = slow
        .await
        .expect("the slow request's task")
        .unwrap_or_else(|e| panic!("the request in flight was cut by the stop: {e}"));
    assert_eq!(response.status, 200, "{response:?}");
}

/// `ebb ctl push` end to end: the file is read, hashed and sent; the node checks, installs and
/// reloads; the reply says `pushed`, and the new config serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_sends_a_config_that_the_node_installs_and_serves() {
    let node = NodeFixture::builder()
        .agent(|c| {
            c.set("push", "enabled", "true");
        })
        .start()
        .await;
    let v2 = node.haproxy.clone().tag("v2").render();
    let file = node.dir().join("v2.cfg");
    std::fs::write(&file, &v2).expect("write v2.cfg");
    let run = ctl(
        node.nats_url(),
        &[
            "--json",
            "push",
            "--node",
            node.id(),
            "--config",
            &path_arg(&file),
        ],
    )
    .await;
    assert_eq!(run.code, 0, "push: {run:?}");
    let out: serde_json::Value = serde_json::from_str(&run.stdout).expect("--json output");
    assert_eq!(out["replies"][0]["result"]["pushed"], true, "{run:?}");
    assert_eq!(node.config_bytes(), v2.as_bytes(), "installed");
    let response = http_request(node.port(), "/", true, Duration::from_secs(10))
        .await
        .expect("GET /");
    assert_eq!(response.header("x-ebb-config"), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_context_names_the_server_and_flags_win_over_it() {
    let node = NodeFixture::builder().start().await;
    let live = node.nats_url().to_owned();
    let dead = dead_url();
    let config_home = TestDir::new();
    let contexts = config_home.join("nats/context");
    std::fs::create_dir_all(&contexts).expect("create nats/context");
    // As `nats context add fleet --server URL` writes it: every field, the unset ones empty.
    let context = serde_json::json!({
        "description": "the test fleet",
        "url": live,
        "token": "", "user": "", "password": "", "creds": "", "nkey": "",
        "cert": "", "key": "", "ca": "", "nsc": "", "jetstream_domain": "",
        "tls_first": false,
    });
    std::fs::write(contexts.join("fleet.json"), context.to_string()).expect("write fleet.json");
    std::fs::write(contexts.join("broken.json"), "{\"url\": ").expect("write broken.json");
    let xdg = path_arg(config_home.path());
    let env = [("XDG_CONFIG_HOME", xdg.as_str())];
    let status = ["status", "--node", node.id()];

    let mut args = vec!["--context", "fleet"];
    args.extend_from_slice(&status);
    let run = ctl_env(&args, &env).await;
    assert_eq!(run.code, 0, "--context fleet: {run:?}");
    assert!(run.stdout.contains("serving"), "{run:?}");

    // NATS_CONTEXT, like the nats CLI.
    let run = ctl_env(&status, &[env[0], ("NATS_CONTEXT", "fleet")]).await;
    assert_eq!(run.code, 0, "NATS_CONTEXT=fleet: {run:?}");

    // A flag wins over the context: --nats at a dead server goes there.
    let mut args = vec!["--context", "fleet", "--nats", &dead];
    args.extend_from_slice(&status);
    let run = ctl_env(&args, &env).await;
    assert_eq!(run.code, 3, "--nats over the context: {run:?}");
    assert!(run.stderr.contains(&dead), "{run:?}");

    // A missing or malformed context is a usage error naming its file, found before connecting.
    for (name, says) in [("nope", "nope.json"), ("broken", "broken.json")] {
        let mut args = vec!["--context", name, "--nats", &dead];
        args.extend_from_slice(&status);
        let run = ctl_env(&args, &env).await;
        assert_eq!(run.code, 2, "--context {name}: {run:?}");
        assert!(
            run.stderr.contains(says) && run.stderr.contains("nothing was sent"),
            "--context {name} names the file: {run:?}"
        );
    }
}
