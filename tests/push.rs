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
    let node = NodeFixture::builder()
        .timeout(T)
        .agent(move |c| {
            c.set("push", "enabled", "true")
                .set("push", "keys", &format!("[\"{public}\"]"));
        })
        .start()
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
