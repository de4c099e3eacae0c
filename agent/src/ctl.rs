//! `ebb ctl`: send a command to one node, a group or the whole fleet, and gather the replies.
//!
//! A fleet command is published once with a private reply inbox; replies are gathered until the
//! timeout, or until every known node has answered. Known nodes are the entries of the KV bucket
//! `ebb_nodes` (which expire after three missed heartbeats), or else whoever answers
//! `$SRV.PING.ebb`.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use async_nats::Client;
use clap::{Args, Subcommand};
use ebb_sdk::reply::Reply;
use ebb_sdk::status::{NodeRecord, StatusResult};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::bus::connect;
use crate::config::{Dur, NatsConfig};

/// Exit codes of DESIGN §8.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const TIMEOUT: u8 = 3;
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub verb: CtlVerb,
}

#[derive(Debug, Args)]
pub struct ConnArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        global = true,
        env = "EBB_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: String,
    /// Subject prefix the agents use.
    #[arg(long, global = true, default_value = ebb_sdk::subject::DEFAULT_PREFIX)]
    pub prefix: String,
    /// NATS credentials file.
    #[arg(long, global = true)]
    pub creds: Option<PathBuf>,
    /// File holding an NKey seed.
    #[arg(long, global = true)]
    pub nkey: Option<PathBuf>,
    /// NATS token.
    #[arg(long, global = true, env = "EBB_NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long, global = true, requires = "password")]
    pub user: Option<String>,
    #[arg(
        long,
        global = true,
        env = "EBB_NATS_PASSWORD",
        hide_env_values = true,
        requires = "user"
    )]
    pub password: Option<String>,
    /// CA certificate to verify the server.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (with --tls-key).
    #[arg(long, global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How long to wait for replies.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_dur)]
    pub timeout: Dur,
    /// Print machine-readable JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// One node, by id.
    #[arg(long)]
    pub node: Option<String>,
    /// Every node of a group.
    #[arg(long)]
    pub group: Option<String>,
    /// Every node.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Copied into the events the command causes.
    #[arg(long)]
    pub reason: Option<String>,
    /// Idempotency key: a repeat gets the first reply and acts only once.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CtlVerb {
    /// Show each node's state, HAProxy worker, old workers and last reload.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Reload HAProxy seamlessly (from its config file, or a pushed one).
    Reload {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
        /// Push this haproxy.cfg (the node must allow config push).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Start draining: the node publishes `drained` once no request can be cut.
    Drain {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
        /// Floor before the node may be drained (default: the node's drain.min_period).
        #[arg(long, value_parser = parse_dur)]
        min_period: Option<Dur>,
        /// Report (or force, per the node's on_deadline) when not drained by then.
        #[arg(long, value_parser = parse_dur)]
        deadline: Option<Dur>,
        /// Stop HAProxy gracefully once drained.
        #[arg(long)]
        stop_when_drained: bool,
        /// Name the drain (default: a new UUID).
        #[arg(long)]
        drain_id: Option<String>,
    },
    /// End a drain: the node serves again.
    Undrain {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
        /// Only undrain this drain.
        #[arg(long)]
        drain_id: Option<String>,
    },
    /// Stop HAProxy gracefully on the target.
    Stop {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
        /// How long HAProxy may take before it is hard-stopped (default: the node's stop_timeout).
        #[arg(long, value_parser = parse_dur)]
        stop_timeout: Option<Dur>,
        /// Do not ask for confirmation (required to stop a fleet without a terminal).
        #[arg(long)]
        yes: bool,
    },
}

fn parse_dur(s: &str) -> Result<Dur, String> {
    humantime::parse_duration(s)
        .map(Dur)
        .map_err(|e| format!("{e}; write durations like \"500ms\" or \"10s\""))
}

impl ConnArgs {
    fn nats_config(&self) -> NatsConfig {
        NatsConfig {
            url: self.nats.clone(),
            prefix: self.prefix.clone(),
            creds: self.creds.clone(),
            nkey_seed: self.nkey.clone(),
            token: self.token.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            ..NatsConfig::default()
        }
    }
}

/// Runs `ebb ctl`; returns the process exit code.
pub async fn run(args: CtlArgs) -> u8 {
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ebb ctl: {e:#}");
            exit::TIMEOUT
        }
    }
}

async fn run_inner(args: CtlArgs) -> anyhow::Result<u8> {
    let conn = &args.conn;
    let (verb, target, body) = match &args.verb {
        CtlVerb::Status { target } => ("status", target, json!({})),
        CtlVerb::Reload {
            target,
            common,
            config,
        } => {
            let mut body = common_body(common);
            if let Some(path) = config {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --config {}", path.display()))?;
                body["config_sha256"] =
                    json!(crate::haproxy::config_file::sha256_hex(text.as_bytes()));
                body["config"] = json!(text);
            }
            ("reload", target, body)
        }
        CtlVerb::Drain {
            target,
            common,
            min_period,
            deadline,
            stop_when_drained,
            drain_id,
        } => {
            let mut body = common_body(common);
            if let Some(d) = min_period {
                body["min_period_ms"] = json!(d.0.as_millis() as u64);
            }
            if let Some(d) = deadline {
                body["deadline_ms"] = json!(d.0.as_millis() as u64);
            }
            if *stop_when_drained {
                body["stop_when_drained"] = json!(true);
            }
            if let Some(id) = drain_id {
                body["drain_id"] = json!(id);
            }
            ("drain", target, body)
        }
        CtlVerb::Undrain {
            target,
            common,
            drain_id,
        } => {
            let mut body = common_body(common);
            if let Some(id) = drain_id {
                body["drain_id"] = json!(id);
            }
            ("undrain", target, body)
        }
        CtlVerb::Stop {
            target,
            common,
            stop_timeout,
            yes,
        } => {
            if target.node.is_none() && !yes {
                let what = target
                    .group
                    .as_deref()
                    .map_or("every node".to_string(), |g| {
                        format!("every node of group {g}")
                    });
                if !confirm(&format!("Stop HAProxy on {what}?")) {
                    eprintln!("ebb ctl: not confirmed; pass --yes to stop without asking");
                    return Ok(exit::USAGE);
                }
            }
            let mut body = common_body(common);
            if let Some(t) = stop_timeout {
                body["timeout_ms"] = json!(t.0.as_millis() as u64);
            }
            ("stop", target, body)
        }
    };
    if let Some(node) = &target.node {
        if !ebb_sdk::subject::is_valid_token(node) {
            eprintln!("ebb ctl: --node {node:?} is not a valid node id (^[A-Za-z0-9_-]{{1,64}}$)");
            return Ok(exit::USAGE);
        }
    }
    if let Some(group) = &target.group {
        if !ebb_sdk::subject::is_valid_token(group) {
            eprintln!("ebb ctl: --group {group:?} is not a valid group (^[A-Za-z0-9_-]{{1,64}}$)");
            return Ok(exit::USAGE);
        }
    }

    let cfg = conn.nats_config();
    let client = connect::options(&cfg, "ebb ctl")
        .await?
        .connect(connect::servers(&cfg.url))
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {}; check --nats and the credentials",
                cfg.url
            )
        })?;
    let payload = serde_json::to_vec(&body)?;
    let deadline = Instant::now() + conn.timeout.0;

    let (replies, expected) = match target {
        Target {
            node: Some(node), ..
        } => {
            let subject = ebb_sdk::subject::node_subject(&conn.prefix, node, verb);
            let expected = BTreeSet::from([node.clone()]);
            (
                gather(&client, subject, payload, &expected, deadline).await?,
                expected,
            )
        }
        Target { group, .. } => {
            let subject = match group {
                Some(g) => ebb_sdk::subject::group_subject(&conn.prefix, g, verb),
                None => ebb_sdk::subject::all_subject(&conn.prefix, verb),
            };
            let expected = known_nodes(&client, &cfg, group.as_deref()).await;
            (
                gather(&client, subject, payload, &expected, deadline).await?,
                expected,
            )
        }
    };
    let answered: BTreeSet<String> = replies.iter().map(|r| r.node.clone()).collect();
    let missing: Vec<&String> = expected.difference(&answered).collect();

    if conn.json {
        let out = json!({ "replies": replies, "missing": missing });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(verb, &replies);
        for m in &missing {
            println!("{m:<20} no reply within {}", conn.timeout);
        }
        if replies.is_empty() && missing.is_empty() {
            println!("no node answered within {}", conn.timeout);
        }
    }
    Ok(if replies.iter().any(|r| !r.ok) {
        exit::FAILED
    } else if !missing.is_empty() || replies.is_empty() {
        exit::TIMEOUT
    } else {
        exit::OK
    })
}

fn common_body(c: &Common) -> Value {
    let mut body = json!({ "requester": requester() });
    if let Some(r) = &c.reason {
        body["reason"] = json!(r);
    }
    if let Some(id) = &c.request_id {
        body["request_id"] = json!(id);
    }
    body["sent_at"] = json!(crate::events::rfc3339(SystemTime::now()));
    body
}

fn requester() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{user}@{host} (ebb ctl)")
}

fn confirm(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("{question} [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).is_ok() && matches!(line.trim(), "y" | "Y" | "yes")
}

/// Publishes once and collects replies until the deadline, or until every expected node answered.
async fn gather(
    client: &Client,
    subject: String,
    payload: Vec<u8>,
    expected: &BTreeSet<String>,
    deadline: Instant,
) -> anyhow::Result<Vec<Reply>> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subject, inbox, payload.into())
        .await?;
    client.flush().await?;
    let mut replies: Vec<Reply> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(left, sub.next()).await {
            Ok(Some(m)) => m,
            _ => break,
        };
        // "No responders" status messages carry no body.
        match serde_json::from_slice::<Reply>(&msg.payload) {
            Ok(r) if !replies.iter().any(|x| x.node == r.node) => replies.push(r),
            Ok(_) => {}
            Err(_) if msg.payload.is_empty() => break,
            Err(e) => eprintln!("ebb ctl: ignoring an unreadable reply: {e}"),
        }
        let answered: BTreeSet<&String> = replies.iter().map(|r| &r.node).collect();
        if !expected.is_empty() && expected.iter().all(|n| answered.contains(n)) {
            break;
        }
    }
    replies.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(replies)
}

/// The nodes that should answer: fresh KV entries, or else those that answer a service PING.
async fn known_nodes(client: &Client, cfg: &NatsConfig, group: Option<&str>) -> BTreeSet<String> {
    let in_group = |groups: &[String]| group.is_none_or(|g| groups.iter().any(|x| x == g));
    let js = async_nats::jetstream::new(client.clone());
    if let Ok(store) = js.get_key_value(cfg.state_bucket.as_str()).await {
        let mut nodes = BTreeSet::new();
        if let Ok(mut keys) = store.keys().await {
            while let Some(Ok(key)) = keys.next().await {
                if let Ok(Some(value)) = store.get(&key).await {
                    if let Ok(rec) = serde_json::from_slice::<NodeRecord>(&value) {
                        if in_group(&rec.groups) {
                            nodes.insert(rec.node);
                        }
                    }
                }
            }
        }
        if !nodes.is_empty() {
            return nodes;
        }
    }
    // No KV: ask the micro service who is there.
    let mut nodes = BTreeSet::new();
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else {
        return nodes;
    };
    let ping = format!("$SRV.PING.{}", ebb_sdk::subject::SERVICE_NAME);
    if client
        .publish_with_reply(ping, inbox, "".into())
        .await
        .is_err()
    {
        return nodes;
    }
    let until = Instant::now() + Duration::from_millis(500);
    while let Ok(Some(msg)) =
        tokio::time::timeout(until.saturating_duration_since(Instant::now()), sub.next()).await
    {
        let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) else {
            continue;
        };
        let meta = &v["metadata"];
        let groups: Vec<String> = meta["groups"]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(node) = meta["node"].as_str() {
            if in_group(&groups) {
                nodes.insert(node.to_string());
            }
        }
    }
    nodes
}

fn print_table(verb: &str, replies: &[Reply]) {
    match verb {
        "status" => {
            println!(
                "{:<20} {:<9} {:>8} {:>4}  {:<28} BLOCKERS",
                "NODE", "STATE", "PID", "OLD", "LAST RELOAD"
            );
            for r in replies {
                match r.result_as::<StatusResult>() {
                    Some(Ok(s)) => {
                        let last = s.last_reload.map_or("-".to_string(), |l| {
                            format!(
                                "{} in {}ms",
                                if l.ok { "ok" } else { "FAILED" },
                                l.duration_ms
                            )
                        });
                        let blockers = s.drain.map_or(String::new(), |d| {
                            d.blockers
                                .iter()
                                .map(|b| b.to_string())
                                .collect::<Vec<_>>()
                                .join("; ")
                        });
                        println!(
                            "{:<20} {:<9} {:>8} {:>4}  {:<28} {blockers}",
                            r.node,
                            s.state.to_string(),
                            s.haproxy.pid.map_or("-".into(), |p| p.to_string()),
                            s.old_workers.len(),
                            last
                        );
                    }
                    _ => print_plain(r),
                }
            }
        }
        _ => {
            println!("{:<20} {:<6} DETAIL", "NODE", "OK");
            for r in replies {
                print_plain(r);
            }
        }
    }
}

fn print_plain(r: &Reply) {
    let detail = match (&r.result, &r.error) {
        (_, Some(e)) => format!("{}: {}", e.code.as_str(), e.message),
        (Some(v), None) => summarize(v),
        (None, None) => String::new(),
    };
    println!(
        "{:<20} {:<6} {detail}",
        r.node,
        if r.ok { "ok" } else { "FAILED" }
    );
}

fn summarize(v: &Value) -> String {
    match v.as_object() {
        Some(map) => map
            .iter()
            .filter(|(_, v)| {
                !v.is_object() && !v.is_array() || v.as_array().is_some_and(|a| a.len() < 8)
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        None => v.to_string(),
    }
}
