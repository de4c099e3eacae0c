//! Rolling reload: `ebb ctl reload --max-parallel N|P%`. Batch after batch, each node gets its own
//! reload, and a batch is done when every node of it replied and its `reloaded` event arrived.
//! Each node's reply is awaited as long as its own startup limit allows ([`reply_wait`]).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ebb_sdk::client::{Client, ClientError, Target};
use ebb_sdk::command::{Command, ReloadRequest};
use ebb_sdk::event::EventBody;
use ebb_sdk::reply::{ReloadResult, Reply};
use serde::Serialize;

use super::args::{ConnArgs, Parallel};
use super::exit;
use super::reply_wait::{self, Work};
use super::table;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum Outcome {
    Reloaded {
        pid: u32,
        old_pids: Vec<u32>,
        duration_ms: u64,
    },
    Failed {
        code: String,
        message: String,
    },
    /// Replied, but its `reloaded` event did not arrive in time.
    NoEvent,
    NoReply,
    /// Not attempted: the rollout stopped at an earlier failure.
    Skipped,
}

#[derive(Debug, Serialize)]
struct NodeResult {
    node: String,
    batch: usize,
    #[serde(flatten)]
    outcome: Outcome,
}

pub async fn run(
    client: &Client,
    conn: &ConnArgs,
    target: &Target,
    req: ReloadRequest,
    parallel: Parallel,
    continue_on_error: bool,
) -> anyhow::Result<u8> {
    let nodes: Vec<String> = match target {
        Target::Node(n) => vec![n.clone()],
        other => client.discover(other).await?.into_iter().collect(),
    };
    if nodes.is_empty() {
        eprintln!(
            "ebb ctl: no node of the target is known (KV ebb_nodes and $SRV.PING.ebb found none); \
             check the group, that the agents run, and the --prefix"
        );
        return Ok(exit::TIMEOUT);
    }
    let size = parallel.batch(nodes.len());
    let batches = nodes.len().div_ceil(size);
    // Subscribed before the first reload is sent, so no `reloaded` event can be missed.
    let mut events = client
        .events(target)
        .await?
        .only(nodes.iter().cloned().collect());
    let mut results: Vec<NodeResult> = Vec::new();
    let mut stopped = false;
    for (i, chunk) in nodes.chunks(size).enumerate() {
        let batch = i + 1;
        if stopped {
            results.extend(chunk.iter().map(|n| NodeResult {
                node: n.clone(),
                batch,
                outcome: Outcome::Skipped,
            }));
            continue;
        }
        if !conn.json {
            println!("batch {batch}/{batches}: reloading {}", chunk.join(", "));
        }
        let started = Instant::now();
        let sends = chunk.iter().map(|node| {
            let command = Command::Reload(req.clone());
            let target = Target::Node(node.clone());
            async move {
                let replies = reload_one(client, conn, &target, node, &command).await;
                (node.clone(), replies)
            }
        });
        let mut waiting: Vec<(String, String)> = Vec::new();
        let mut batch_results = Vec::new();
        for (node, replies) in futures::future::join_all(sends).await {
            let outcome = match replies.ok().and_then(|r| r.into_iter().next()) {
                None => Outcome::NoReply,
                Some(reply) if !reply.ok => {
                    let (code, message) = reply
                        .error
                        .map(|e| (e.code.as_str().to_string(), e.message))
                        .unwrap_or_default();
                    Outcome::Failed { code, message }
                }
                Some(reply) => match reply.result_as::<ReloadResult>() {
                    Some(Ok(r)) => {
                        waiting.push((node.clone(), r.reload_id.clone()));
                        Outcome::Reloaded {
                            pid: r.pid,
                            old_pids: r.old_pids,
                            duration_ms: r.duration_ms,
                        }
                    }
                    _ => Outcome::Failed {
                        code: "internal".into(),
                        message: "unreadable reload result".into(),
                    },
                },
            };
            batch_results.push(NodeResult {
                node,
                batch,
                outcome,
            });
        }
        // Each reloaded node must also have published its `reloaded` event.
        let deadline = Instant::now() + conn.timeout.0;
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(event) = events.next_within(left).await else {
                break;
            };
            if let EventBody::Reloaded { reload_id, .. } = &event.body {
                waiting.retain(|(n, id)| !(n == &event.node && id == reload_id));
            }
        }
        for r in &mut batch_results {
            if waiting.iter().any(|(n, _)| n == &r.node) {
                r.outcome = Outcome::NoEvent;
            }
        }
        let failed = batch_results
            .iter()
            .any(|r| !matches!(r.outcome, Outcome::Reloaded { .. }));
        if !conn.json {
            let mut t = table::with_header(&["NODE", "RESULT"]);
            for r in &batch_results {
                t.add_row(vec![r.node.clone(), describe(&r.outcome)]);
            }
            table::print(&t);
            println!("  batch {batch} took {}", fmt_ms(started.elapsed()));
        }
        results.extend(batch_results);
        if failed && !continue_on_error {
            stopped = true;
            if !conn.json {
                println!(
                    "stopping the rollout at the first failure (--continue-on-error to go on)"
                );
            }
        }
    }

    if conn.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let ok = results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Reloaded { .. }))
            .count();
        println!(
            "reloaded {ok} of {} nodes in {batches} batches of up to {size}",
            results.len()
        );
    }
    let any = |f: fn(&Outcome) -> bool| results.iter().any(|r| f(&r.outcome));
    Ok(
        if any(|o| matches!(o, Outcome::Failed { .. } | Outcome::Skipped)) {
            exit::FAILED
        } else if any(|o| matches!(o, Outcome::NoReply | Outcome::NoEvent)) {
            exit::TIMEOUT
        } else {
            exit::OK
        },
    )
}

/// One node's reload, waiting as long as its startup limit allows. The node is asked for its
/// status first, on its own subject: a node whose agent is gone gets "no responders" at once, and
/// is not waited for.
async fn reload_one(
    client: &Client,
    conn: &ConnArgs,
    target: &Target,
    node: &str,
    command: &Command,
) -> Result<Vec<Reply>, ClientError> {
    let margin = conn.timeout.0;
    let learnt =
        reply_wait::learn(client, target, &BTreeSet::from([node.to_string()]), margin).await?;
    if learnt.no_responders {
        return Ok(Vec::new());
    }
    let wait = reply_wait::for_node(Work::Reload, learnt.limits(node), margin);
    client
        .request(target, command, &BTreeSet::new(), wait)
        .await
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Reloaded {
            pid,
            old_pids,
            duration_ms,
        } => {
            format!("ok: worker {pid} serves (old {old_pids:?}) in {duration_ms}ms")
        }
        Outcome::Failed { code, message } => format!("FAILED {code}: {message}"),
        Outcome::NoEvent => "replied, but no reloaded event arrived".into(),
        Outcome::NoReply => "no reply".into(),
        Outcome::Skipped => "skipped".into(),
    }
}

fn fmt_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}
