//! `ebb ctl`: command one node, a group or the whole fleet over NATS, through the sdk's fleet
//! client.
//!
//! - A plain command is published once to the target subject; replies are gathered until the
//!   timeout, or until every known node answered (known: fresh KV `ebb_nodes` records, or else
//!   `$SRV.PING.ebb`).
//! - `drain --wait` follows events (subscribed before sending) with a live progress view.
//! - `reload --max-parallel` rolls through the target in batches ([`rollout`]).
//! - `watch` streams events, from JetStream when it is there ([`watch`]).

mod args;
mod output;
mod rollout;
mod wait;
mod watch;

use std::collections::BTreeSet;
use std::time::SystemTime;

use anyhow::Context;
use ebb_sdk::client::{Client, Target};
use ebb_sdk::command::{
    Command, DrainRequest, ReloadRequest, StatusRequest, StopRequest, UndrainRequest,
};
use ebb_sdk::reply::Reply;

pub use args::{CtlArgs, CtlVerb};

use crate::bus::connect;

/// `ebb ctl`'s exit codes: 0 every node ok, 1 some node failed, 2 usage error, 3 timeout or a node
/// unreachable (README.md, "Using it").
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const TIMEOUT: u8 = 3;
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
    if let Some(target) = args.verb.target() {
        if let Err(msg) = args::validate(target) {
            eprintln!("ebb ctl: {msg}");
            return Ok(exit::USAGE);
        }
    }
    let cfg = conn.nats_config();
    let nats = connect::options(&cfg, "ebb ctl")
        .await?
        .connect(connect::servers(&cfg.url))
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {}; check --nats and the credentials",
                cfg.url
            )
        })?;
    let client = Client::new(nats, &conn.prefix);

    let command = match &args.verb {
        CtlVerb::Watch(w) => return watch::run(&client, conn, w).await,
        CtlVerb::Status { .. } => Command::Status(StatusRequest {
            requester: Some(requester()),
            ..StatusRequest::default()
        }),
        CtlVerb::Reload {
            common,
            config,
            max_parallel,
            continue_on_error,
            target,
        } => {
            let mut req = ReloadRequest {
                request_id: common.request_id.clone(),
                requester: Some(requester()),
                reason: common.reason.clone(),
                sent_at: Some(now()),
                ..ReloadRequest::default()
            };
            if let Some(path) = config {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --config {}", path.display()))?;
                req.config_sha256 = Some(crate::digest::sha256_hex(text.as_bytes()));
                req.config = Some(text);
            }
            if let Some(parallel) = max_parallel {
                let target = target.to_target();
                return rollout::run(&client, conn, &target, req, *parallel, *continue_on_error)
                    .await;
            }
            Command::Reload(req)
        }
        CtlVerb::Drain {
            common,
            min_period,
            deadline,
            stop_when_drained,
            drain_id,
            wait,
            target,
        } => {
            let req = DrainRequest {
                request_id: common.request_id.clone(),
                requester: Some(requester()),
                reason: common.reason.clone(),
                sent_at: Some(now()),
                drain_id: drain_id.clone(),
                min_period_ms: min_period.map(|d| d.0.as_millis() as u64),
                deadline_ms: deadline.map(|d| d.0.as_millis() as u64),
                stop_when_drained: stop_when_drained.then_some(true),
                ..DrainRequest::default()
            };
            if let Some(wait_for) = wait {
                return wait::run(&client, conn, &target.to_target(), req, wait_for.0).await;
            }
            Command::Drain(req)
        }
        CtlVerb::Undrain {
            common, drain_id, ..
        } => Command::Undrain(UndrainRequest {
            request_id: common.request_id.clone(),
            requester: Some(requester()),
            reason: common.reason.clone(),
            sent_at: Some(now()),
            drain_id: drain_id.clone(),
            ..UndrainRequest::default()
        }),
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
            Command::Stop(StopRequest {
                request_id: common.request_id.clone(),
                requester: Some(requester()),
                reason: common.reason.clone(),
                sent_at: Some(now()),
                timeout_ms: stop_timeout.map(|d| d.0.as_millis() as u64),
                ..StopRequest::default()
            })
        }
    };
    let Some(target) = args.verb.target() else {
        return Ok(exit::USAGE);
    };
    let target = target.to_target();
    let expected = match &target {
        Target::Node(n) => BTreeSet::from([n.clone()]),
        other => client.discover(other).await?,
    };
    let replies = client
        .request(&target, &command, &expected, conn.timeout.0)
        .await?;
    let missing = missing(&expected, &replies);
    output::print_replies(
        conn.json,
        command.verb().as_str(),
        &replies,
        &missing,
        conn.timeout,
    );
    Ok(exit_code(&replies, &missing))
}

/// Nodes that were expected but did not answer.
fn missing(expected: &BTreeSet<String>, replies: &[Reply]) -> Vec<String> {
    expected
        .iter()
        .filter(|n| !replies.iter().any(|r| &r.node == *n))
        .cloned()
        .collect()
}

fn exit_code(replies: &[Reply], missing: &[String]) -> u8 {
    if replies.iter().any(|r| !r.ok) {
        exit::FAILED
    } else if !missing.is_empty() || replies.is_empty() {
        exit::TIMEOUT
    } else {
        exit::OK
    }
}

fn now() -> String {
    crate::events::rfc3339(SystemTime::now())
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
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("{question} [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).is_ok() && matches!(line.trim(), "y" | "Y" | "yes")
}
