//! Config push end to end: the `push` verb against a real agent and haproxy over a real
//! nats-server, from a plain NATS client speaking JSON and from `ebb ctl push`. Signatures bind a
//! push to one subject and one time window; anything else is `forbidden` and changes nothing.

mod support;

use std::time::{Duration, SystemTime};

use ebb_agent::digest::sha256_hex;
use serde_json::{json, Value};
use support::*;

const T: Duration = Duration::from_secs(30);

fn rfc3339(t: SystemTime) -> String {
    ebb_sdk::time::format_rfc3339_millis(t)
}

/// A push body for `config`, signed by `seed` for `subject` when given.
fn push_body(config: &str, sign: Option<(&str, &str)>, sent_at: SystemTime, ttl_ms: u64) -> Value {
    let sha = sha256_hex(config.as_bytes());
    let sent_at = rfc3339(sent_at);
    let mut body =
        json!({"config": config, "config_sha256": sha, "sent_at": sent_at, "ttl_ms": ttl_ms});
    if let Some((seed, subject)) = sign {
        body["signature"] =
            json!(ebb_sdk::push::sign(seed, subject, &sent_at, &sha).expect("sign"));
    }
    body
}

/// A serving node that accepts pushes; `f` adds to its agent config.
async fn push_node(f: impl FnOnce(&mut AgentConfig) + 'static) -> NodeFixture {
    NodeFixture::builder()
        .timeout(T)
        .agent(move |c| {
            c.set("push", "enabled", "true");
            f(c);
        })
        .start()
        .await
}

/// Sends `body` on `subject` and returns the reply.
async fn request(nc: &async_nats::Client, subject: &str, body: &Value) -> Value {
    let msg = tokio::time::timeout(
        T,
        nc.request(
            subject.to_string(),
            serde_json::to_vec(body).expect("json").into(),
        ),
    )
    .await
    .expect("a reply in time")
    .expect("a reply");
    serde_json::from_slice(&msg.payload).expect("JSON reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_push_signed_for_its_subject_and_window_is_installed() {
    let key = nkeys::KeyPair::new_user();
    let seed = key.seed().expect("seed");
    let other = nkeys::KeyPair::new_user().seed().expect("seed");
    let public = key.public_key();
    let node = NodeFixture::builder()
        .timeout(T)
        .node_id("signed-1")
        .agent(move |c| {
            c.groups(&["web"]).set("push", "enabled", "true").set(
                "push",
                "keys",
                &format!("[\"{public}\"]"),
            );
        })
        .start()
        .await;
    let nc = node.nc.clone();
    let good = node.config_bytes();
    let own = "ebb.node.signed-1.push";
    let v2 = node.haproxy.clone().tag("v2").render();
    let now = SystemTime::now();

    let refused = [
        ("unsigned", push_body(&v2, None, now, 30_000), own),
        (
            "a foreign key",
            push_body(&v2, Some((&other, own)), now, 30_000),
            own,
        ),
        (
            "signed for another node",
            push_body(&v2, Some((&seed, "ebb.node.signed-2.push")), now, 30_000),
            own,
        ),
        (
            "signed for the node, sent to its group",
            push_body(&v2, Some((&seed, own)), now, 30_000),
            "ebb.group.web.push",
        ),
        (
            "signed an hour ago with a long ttl",
            push_body(
                &v2,
                Some((&seed, own)),
                now - Duration::from_secs(3600),
                7_200_000,
            ),
            own,
        ),
    ];
    for (what, body, subject) in &refused {
        let reply = request(&nc, subject, body).await;
        assert_eq!(reply["ok"], false, "{what}: {reply}");
        assert_eq!(reply["error"]["code"], "forbidden", "{what}: {reply}");
        assert_eq!(node.config_bytes(), good, "{what}: nothing installed");
    }
    // Expired by its own ttl: refused before anything else (a new request).
    let stale = push_body(
        &v2,
        Some((&seed, own)),
        now - Duration::from_secs(120),
        1_000,
    );
    let reply = request(&nc, own, &stale).await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(node.config_bytes(), good);

    // Signed for the group and sent to the group: installed.
    let group = "ebb.group.web.push";
    let reply = request(
        &nc,
        group,
        &push_body(&v2, Some((&seed, group)), now, 30_000),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["pushed"], true, "{reply}");
    assert_eq!(node.config_bytes(), v2.as_bytes());

    // A valid signature replayed once its window closed (a new request id) is refused, and
    // nothing reloads.
    let v3 = node.haproxy.clone().tag("v3").render();
    let sent = SystemTime::now();
    let short = push_body(&v3, Some((&seed, own)), sent, 1_000);
    let reply = request(&nc, own, &short).await;
    assert_eq!(reply["ok"], true, "within its window: {reply}");
    let last = node.status().await["last_reload"]["reload_id"].clone();
    // The window plus the clock-skew allowance.
    let closed = sent + Duration::from_millis(1_000) + Duration::from_secs(2);
    wait_until(T, "the window to close", || SystemTime::now() > closed);
    let mut replay = short.clone();
    replay["request_id"] = json!("replayed-later");
    let reply = request(&nc, own, &replay).await;
    assert_eq!(reply["ok"], false, "a replay after its window: {reply}");
    assert_eq!(node.status().await["last_reload"]["reload_id"], last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebb_ctl_push_signs_for_the_subject_it_sends_to() {
    let key = nkeys::KeyPair::new_user();
    let public = key.public_key();
    let node = push_node(move |c| {
        c.set("push", "keys", &format!("[\"{public}\"]"));
    })
    .await;
    let seed_file = node.dir().join("push.nk");
    std::fs::write(&seed_file, key.seed().expect("seed")).expect("write the seed");
    let v2 = node.haproxy.clone().tag("v2").render();
    let cfg = node.dir().join("v2.cfg");
    std::fs::write(&cfg, &v2).expect("write v2.cfg");
    let (cfg, seed_file) = (cfg.display().to_string(), seed_file.display().to_string());

    let args = [
        "--nats",
        node.nats_url(),
        "push",
        "--node",
        node.id(),
        "--config",
        &cfg,
    ];
    let unsigned = run_ctl(&args, &[], T).await;
    assert_eq!(unsigned.code, 1, "unsigned push: {unsigned:?}");
    assert!(unsigned.stdout.contains("forbidden"), "{unsigned:?}");

    let mut signed = args.to_vec();
    signed.extend(["--sign-key", &seed_file]);
    let run = run_ctl(&signed, &[], T).await;
    assert_eq!(run.code, 0, "signed push: {run:?}");
    assert_eq!(node.config_bytes(), v2.as_bytes());
}

/// The safe policy runs before `haproxy -c`: a refused config never reaches HAProxy, so a Lua
/// file that would write a marker never runs, a `stats socket` on an existing file never replaces
/// it, and a file outside `allowed_paths` is never read. Each refusal is `config_invalid` naming
/// the line and the rule; nothing changes on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_safe_policy_refuses_before_haproxy_sees_the_config() {
    let node = push_node(|_| {}).await;
    let dir = node.dir().to_path_buf();
    let good = node.config_bytes();
    let pid = node.serving_pid().await.expect("serving");
    let marker = dir.join("marker");
    let lua = dir.join("marker.lua");
    std::fs::write(
        &lua,
        format!("io.open(\"{}\", \"w\"):write(\"ran\")\n", marker.display()),
    )
    .expect("write marker.lua");
    // A regular file a second stats socket would replace.
    let precious = std::env::temp_dir().join(format!("ebb-precious-{}", std::process::id()));
    std::fs::write(&precious, "keep me\n").expect("write the precious file");
    let outside = "/etc/hostname";

    let h = node.haproxy.clone();
    let cases = [
        (
            "lua",
            h.clone()
                .global_line(&format!("lua-load {}", lua.display())),
        ),
        (
            "lua",
            h.clone()
                .global_line(&format!("lua-prepend-path {}/?.lua", dir.display())),
        ),
        ("exec", h.clone().global_line("insecure-fork-wanted")),
        ("exec", h.clone().global_line("external-check")),
        (
            "env",
            h.clone().global_line("setenv LD_PRELOAD /tmp/evil.so"),
        ),
        ("env", h.clone().global_line("presetenv X 1")),
        ("env", h.clone().global_line("resetenv")),
        ("env", h.clone().global_line("unsetenv PATH")),
        (
            "program",
            h.clone().section("program evil\n    command /bin/true"),
        ),
        (
            "socket",
            h.clone()
                .global_line(&format!("stats socket {} level admin", precious.display())),
        ),
        (
            "path",
            h.clone().frontend_line(&format!(
                "http-request return status 200 file {outside} if {{ path /leak }}"
            )),
        ),
        ("path", h.clone().global_line("pidfile /etc/ebb-evil.pid")),
        (
            "socket",
            h.clone()
                .section("frontend door\n    bind unix@/tmp/ebb-door.sock\n    default_backend be"),
        ),
    ];
    for (rule, cfg) in cases {
        let text = cfg.render();
        let body = json!({"config": text, "config_sha256": sha256_hex(text.as_bytes())});
        let reply = node.command("push", body).await;
        assert_eq!(reply["error"]["code"], "config_invalid", "{rule}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("line "),
            "{rule}: names the line: {message}"
        );
        assert!(
            message.contains(rule) || message.contains("refused"),
            "{rule}: {message}"
        );
        assert_eq!(node.config_bytes(), good, "{rule}: nothing installed");
    }
    assert!(!marker.exists(), "the pushed Lua never ran");
    assert_eq!(
        std::fs::read_to_string(&precious).expect("the precious file"),
        "keep me\n",
        "a refused stats socket never replaced the file"
    );
    let _ = std::fs::remove_file(&precious);
    assert_eq!(
        node.serving_pid().await,
        Some(pid),
        "the same worker serves"
    );

    // A clean config passes the policy and serves.
    let v2 = h.tag("v2").render();
    let reply = node
        .command(
            "push",
            json!({"config": v2, "config_sha256": sha256_hex(v2.as_bytes())}),
        )
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let response = http_request(node.port(), "/", true, T)
        .await
        .expect("GET /");
    assert_eq!(response.header("x-ebb-config"), Some("v2"));
}

/// `ebb ctl push --group` reaches every node of the group, and each one installs and serves the
/// same file. On one machine the five HAProxy instances share the file's ports (HAProxy binds
/// with SO_REUSEPORT) and each finds its own admin socket through `NODE_ID`, an environment
/// variable passed on by `haproxy.env` — which only `push.policy = "trusted"` accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_push_reaches_five_agents() {
    let ids: Vec<String> = (1..=5).map(|i| format!("gp-{i}")).collect();
    let fleet = Fleet::start(&ids, |id, node| {
        node.timeout(T).env("NODE_ID", id).agent(|c| {
            c.groups(&["edge"])
                .set("push", "enabled", "true")
                .set_str("push", "policy", "trusted")
                .set("haproxy", "env", "[\"NODE_ID\"]");
        })
    })
    .await;
    fleet.wait_serving().await;
    let first = fleet.node(&ids[0]);
    let pushed = first.haproxy.clone().tag("fleet-v2").render().replace(
        &first.haproxy.admin_socket().display().to_string(),
        &format!("{}/${{NODE_ID}}/admin.sock", fleet.dir().display()),
    );
    let file = fleet.dir().join("fleet-v2.cfg");
    std::fs::write(&file, &pushed).expect("write the pushed config");
    let url = fleet.nats_url();
    let file = file.display().to_string();
    let run = run_ctl(
        &[
            "--nats", &url, "--json", "push", "--group", "edge", "--config", &file, "--yes",
        ],
        &[],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(run.code, 0, "group push: {run:?}");
    let out: Value = serde_json::from_str(&run.stdout).expect("--json output");
    let replies = out["replies"].as_array().expect("replies");
    assert_eq!(replies.len(), 5, "{out}");
    for reply in replies {
        assert_eq!(reply["result"]["pushed"], true, "{reply}");
    }
    for id in &ids {
        assert_eq!(fleet.node(id).config_bytes(), pushed.as_bytes(), "{id}");
    }
    let response = http_request(first.port(), "/", true, T)
        .await
        .expect("GET /");
    assert_eq!(response.header("x-ebb-config"), Some("fleet-v2"));
}

/// A pushed config whose loading never ends (a Lua busy loop at load time) must not hold the node:
/// `haproxy -c` is killed after `push.check_timeout`, the push is `config_invalid` ("check timed
/// out"), the running worker keeps serving from the untouched file, and the next reload works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_config_whose_check_never_ends_is_killed_and_refused() {
    let node = push_node(|c| {
        c.set_str("push", "policy", "trusted")
            .set_str("push", "check_timeout", "1s");
    })
    .await;
    let pid0 = node.serving_pid().await.expect("serving");
    let good = node.config_bytes();
    let lua = node.dir().join("busy.lua");
    std::fs::write(&lua, "while true do end\n").expect("write busy.lua");
    let pushed = node
        .haproxy
        .clone()
        .global_line(&format!("lua-load {}", lua.display()))
        .render();
    let reply = node
        .command(
            "push",
            json!({"config": pushed, "config_sha256": sha256_hex(pushed.as_bytes())}),
        )
        .await;
    assert_eq!(reply["error"]["code"], "config_invalid", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("check timed out"), "{message}");

    // Nothing of the check is left: no haproxy -c still spinning, no staged file, the live file
    // as it was, and the same worker serving.
    let staged = node
        .haproxy
        .path()
        .parent()
        .expect("dir")
        .join(".haproxy.cfg.ebb-new");
    assert!(!staged.exists(), "{} left behind", staged.display());
    assert_eq!(node.config_bytes(), good);
    assert_eq!(node.haproxy_pids().await, vec![pid0]);
    assert_eq!(node.serving_pid().await, Some(pid0));
    node.assert_serves().await;

    let result = node.ok("reload", json!({})).await;
    assert_ne!(result["pid"], pid0, "the next reload works: {result}");
}

/// A pushed config is installed by rename: the live file keeps its mode, and the previous one is
/// kept beside it as the last good config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_config_keeps_the_files_mode_and_the_previous_one_beside_it() {
    use std::os::unix::fs::PermissionsExt;
    let node = push_node(|_| {}).await;
    let path = node.haproxy.path();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let old = node.config_bytes();
    let pushed = node.haproxy.clone().tag("v2").render();
    node.ok(
        "push",
        json!({"config": pushed, "config_sha256": sha256_hex(pushed.as_bytes())}),
    )
    .await;
    assert_eq!(node.config_bytes(), pushed.as_bytes());
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    let last_good = path
        .parent()
        .expect("dir")
        .join(".haproxy.cfg.ebb-last-good");
    assert_eq!(std::fs::read(&last_good).expect("last good"), old);
}
