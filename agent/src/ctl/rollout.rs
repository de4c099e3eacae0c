//! Rolling commands: `ebb ctl reload --max-parallel N|P%` and `ebb ctl drain --max-parallel N|P%`.
//!
//! Nodes are taken in order and kept `N` in flight: as soon as one is done, the next starts. A
//! reloaded node is done when it replied and its `reloaded` event arrived; a draining node when
//! it is drained (its reply says so, or its `drained` event arrived). Each node's reply is awaited
//! as long as its own limits allow ([`reply_wait`]).
//!
//! Memory stays bounded whatever the fleet's size: one subscription carries the events, each is
//! handed to the node it concerns while that node is in flight and dropped otherwise, and of each
//! finished node only its one-line outcome is kept.
//!
//! A client that lost its NATS connection misses the events published meanwhile: a node still
//! waiting for its event looks it up in the events stream every [`LOOK_UP_EVERY`].

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use ebb_sdk::client::{Client, Target};
use ebb_sdk::command::{Command, DrainRequest, ReloadRequest};
use ebb_sdk::event::{Event, EventBody};
use ebb_sdk::reply::{DrainResult, ReloadResult, Reply};
use ebb_sdk::status::NodeState;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use super::args::{ConnArgs, Parallel};
use super::exit;
use super::reply_wait::{self, Work};

/// How often a node waiting for its event looks for it in the events stream, in case the client
/// missed it while reconnecting.
const LOOK_UP_EVERY: Duration = Duration::from_secs(2);
/// How long a reloaded node's `reloaded` event is waited for, at least: after a NATS server is
/// lost, events wait in the agents' outboxes until the events stream has a leader again, which
/// takes seconds. A node whose event comes at once never waits.
const EVENT_WAIT: Duration = Duration::from_secs(30);
/// How long a rolling drain waits for each node without --wait.
pub const DRAIN_WAIT: Duration = Duration::from_secs(3600);
/// Events queued for one node in flight; a node gets a handful per command.
const NODE_EVENTS: usize = 32;

/// What is rolled through the nodes.
#[derive(Debug, Clone)]
pub enum Rolling {
    Reload(ReloadRequest),
    /// A drain, each node waited for until drained, at most `wait`.
    Drain {
        req: DrainRequest,
        wait: Duration,
    },
}

impl Rolling {
    fn done_word(&self) -> &'static str {
        match self {
            Rolling::Reload(_) => "reloaded",
            Rolling::Drain { .. } => "drained",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum Outcome {
    Reloaded {
        pid: u32,
        old_pids: Vec<u32>,
        duration_ms: u64,
    },
    Drained {
        duration_ms: u64,
        forced: bool,
        connections_cut: u64,
    },
    Failed {
        code: String,
        message: String,
    },
    /// Replied, but its event did not arrive in time.
    NoEvent,
    NoReply,
    /// Still draining when the wait ended.
    TimedOut,
    /// Not attempted: the rollout stopped at an earlier failure.
    Skipped,
}

impl Outcome {
    fn is_done(&self) -> bool {
        matches!(self, Outcome::Reloaded { .. } | Outcome::Drained { .. })
    }
}

#[derive(Debug, Serialize)]
struct NodeResult {
    node: String,
    /// The group of `N` the node belongs to, in order: nodes start in order, `N` at a time.
    batch: usize,
    #[serde(flatten)]
    outcome: Outcome,
}

pub async fn run(
    client: &Client,
    conn: &ConnArgs,
    target: &Target,
    rolling: Rolling,
    parallel: Parallel,
    continue_on_error: bool,
) -> anyhow::Result<u8> {
    let nodes: Vec<String> = match target {
        Target::Node(n) => vec![n.clone()],
        other => client.roll_call(other).await?.into_iter().collect(),
    };
    if nodes.is_empty() {
        eprintln!(
            "ebb ctl: no node of the target is known (KV ebb_nodes and $SRV.PING.ebb found none); \
             check the group, that the agents run, and the --prefix"
        );
        return Ok(exit::TIMEOUT);
    }
    let size = parallel.batch(nodes.len());
    let total = nodes.len();
    if !conn.json {
        println!(
            "{} {total} nodes, at most {size} at a time",
            match rolling {
                Rolling::Reload(_) => "reloading",
                Rolling::Drain { .. } => "draining",
            }
        );
    }
    // Subscribed before the first command is sent, so no event can be missed.
    let mut events = client.events(target).await?;
    let mut routes: HashMap<String, mpsc::Sender<Event>> = HashMap::new();
    let mut in_flight = FuturesUnordered::new();
    let mut queue = nodes.into_iter().enumerate();
    let mut results: Vec<NodeResult> = Vec::with_capacity(total);
    let mut stopped = false;
    loop {
        while !stopped && in_flight.len() < size {
            let Some((i, node)) = queue.next() else { break };
            let (tx, rx) = mpsc::channel(NODE_EVENTS);
            routes.insert(node.clone(), tx);
            let rolling = &rolling;
            in_flight.push(async move {
                let outcome = one(client, conn, rolling, &node, rx).await;
                (i, node, outcome)
            });
        }
        if in_flight.is_empty() {
            break;
        }
        tokio::select! {
            Some((i, node, outcome)) = in_flight.next() => {
                routes.remove(&node);
                if !conn.json {
                    println!("{node}: {}  [{}/{total}]", describe(&outcome), results.len() + 1);
                }
                if !outcome.is_done() && !continue_on_error && !stopped {
                    stopped = true;
                    if !conn.json {
                        println!(
                            "stopping at the first failure: no further node starts \
                             (--continue-on-error to go on)"
                        );
                    }
                }
                results.push(NodeResult { node, batch: i / size + 1, outcome });
            }
            event = events.next_within(LOOK_UP_EVERY) => {
                if let Some(event) = event {
                    if let Some(tx) = routes.get(&event.node) {
                        // A node whose queue is full is behind; it looks its event up in the
                        // stream.
                        let _ = tx.try_send(event);
                    }
                }
            }
        }
    }
    for (i, node) in queue {
        results.push(NodeResult {
            node,
            batch: i / size + 1,
            outcome: Outcome::Skipped,
        });
    }
    results.sort_by(|a, b| a.node.cmp(&b.node));

    if conn.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let ok = results.iter().filter(|r| r.outcome.is_done()).count();
        println!(
            "{} {ok} of {total} nodes, at most {size} at a time",
            rolling.done_word()
        );
    }
    let any = |f: fn(&Outcome) -> bool| results.iter().any(|r| f(&r.outcome));
    Ok(
        if any(|o| matches!(o, Outcome::Failed { .. } | Outcome::Skipped)) {
            exit::FAILED
        } else if any(|o| matches!(o, Outcome::NoReply | Outcome::NoEvent | Outcome::TimedOut)) {
            exit::TIMEOUT
        } else {
            exit::OK
        },
    )
}

/// One node's turn.
async fn one(
    client: &Client,
    conn: &ConnArgs,
    rolling: &Rolling,
    node: &str,
    events: mpsc::Receiver<Event>,
) -> Outcome {
    match rolling {
        Rolling::Reload(req) => reload_one(client, conn, req, node, events).await,
        Rolling::Drain { req, wait } => drain_one(client, conn, req, *wait, node, events).await,
    }
}

/// One node's reload, waiting as long as its startup limit allows. The node is asked for its
/// status first, on its own subject: a node whose agent is gone gets "no responders" at once, and
/// is not waited for.
async fn reload_one(
    client: &Client,
    conn: &ConnArgs,
    req: &ReloadRequest,
    node: &str,
    events: mpsc::Receiver<Event>,
) -> Outcome {
    let margin = conn.timeout.0;
    let target = Target::Node(node.to_string());
    let known = BTreeSet::from([node.to_string()]);
    let learnt = match reply_wait::learn(client, &target, &known, margin).await {
        Ok(l) if !l.no_responders => l,
        _ => return Outcome::NoReply,
    };
    let wait = reply_wait::for_node(Work::Reload, learnt.limits(node), margin);
    let command = Command::Reload(req.clone());
    let Some(reply) = reply_of(client, &target, &command, &known, wait).await else {
        return Outcome::NoReply;
    };
    let r = match result::<ReloadResult>(reply) {
        Ok(r) => r,
        Err(failed) => return failed,
    };
    let id = r.reload_id.clone();
    let arrived = event_of(
        client,
        node,
        "reloaded",
        events,
        margin.max(EVENT_WAIT),
        |body| matches!(body, EventBody::Reloaded { reload_id, .. } if *reload_id == id),
    )
    .await;
    match arrived {
        Some(_) => Outcome::Reloaded {
            pid: r.pid,
            old_pids: r.old_pids,
            duration_ms: r.duration_ms,
        },
        None => Outcome::NoEvent,
    }
}

/// One node's drain, followed until it is drained or `wait` ends.
async fn drain_one(
    client: &Client,
    conn: &ConnArgs,
    req: &DrainRequest,
    wait: Duration,
    node: &str,
    events: mpsc::Receiver<Event>,
) -> Outcome {
    let target = Target::Node(node.to_string());
    let known = BTreeSet::from([node.to_string()]);
    let command = Command::Drain(req.clone());
    let Some(reply) = reply_of(client, &target, &command, &known, conn.timeout.0).await else {
        return Outcome::NoReply;
    };
    let d = match result::<DrainResult>(reply) {
        Ok(d) => d,
        Err(failed) => return failed,
    };
    if d.state == NodeState::Drained || d.drained_at.is_some() {
        return Outcome::Drained {
            duration_ms: 0,
            forced: false,
            connections_cut: 0,
        };
    }
    let id = d.drain_id.clone();
    let arrived = event_of(client, node, "drained", events, wait, |body| match body {
        EventBody::Drained { drain_id, .. } | EventBody::DrainDeadlineExceeded { drain_id, .. } => {
            *drain_id == id
        }
        _ => false,
    })
    .await;
    match arrived.map(|e| e.body) {
        Some(EventBody::Drained {
            duration_ms,
            forced,
            connections_cut,
            ..
        }) => Outcome::Drained {
            duration_ms,
            forced,
            connections_cut,
        },
        Some(EventBody::DrainDeadlineExceeded { blockers, .. }) => Outcome::Failed {
            code: "deadline_exceeded".into(),
            message: format!(
                "the drain's deadline passed with blockers: {}",
                super::output::blockers(&blockers)
            ),
        },
        _ => Outcome::TimedOut,
    }
}

/// The node's reply to `command`, sent with a `request_id` so that the fan-out's retry after a
/// lost NATS server acts once.
async fn reply_of(
    client: &Client,
    target: &Target,
    command: &Command,
    known: &BTreeSet<String>,
    wait: Duration,
) -> Option<Reply> {
    let replies = client.request(target, command, known, wait).await.ok()?;
    replies.into_iter().next()
}

/// A reply's result, or the outcome of a failed one.
fn result<T: serde::de::DeserializeOwned>(reply: Reply) -> Result<T, Outcome> {
    if !reply.ok {
        let (code, message) = reply
            .error
            .map(|e| (e.code.as_str().to_string(), e.message))
            .unwrap_or_default();
        return Err(Outcome::Failed { code, message });
    }
    match reply.result_as::<T>() {
        Some(Ok(r)) => Ok(r),
        _ => Err(Outcome::Failed {
            code: "internal".into(),
            message: format!("unreadable result from {}", reply.node),
        }),
    }
}

/// The node's first event that `wanted` accepts, within `wait`: from the subscription, or, when
/// the client missed it (its connection was lost meanwhile), from the events stream, where the
/// last event of `kind` is looked at every [`LOOK_UP_EVERY`].
async fn event_of(
    client: &Client,
    node: &str,
    kind: &str,
    mut events: mpsc::Receiver<Event>,
    wait: Duration,
    wanted: impl Fn(&EventBody) -> bool,
) -> Option<Event> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(LOOK_UP_EVERY), events.recv()).await {
            Ok(Some(event)) if wanted(&event.body) => return Some(event),
            Ok(Some(_)) => continue,
            // The rollout routes no more events to this node: only the stream is left.
            Ok(None) => tokio::time::sleep(left.min(LOOK_UP_EVERY)).await,
            Err(_) => {}
        }
        let looked_up = client.last_event(node, kind).await;
        if let Some(event) = looked_up.filter(|e| wanted(&e.body)) {
            return Some(event);
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
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
        Outcome::Drained {
            duration_ms,
            forced,
            connections_cut,
        } => format!(
            "drained after {duration_ms}ms (forced: {forced}, connections cut: {connections_cut})"
        ),
        Outcome::Failed { code, message } => format!("FAILED {code}: {message}"),
        Outcome::NoEvent => "replied, but no event arrived".into(),
        Outcome::NoReply => "no reply".into(),
        Outcome::TimedOut => "still draining when the wait ended".into(),
        Outcome::Skipped => "skipped".into(),
    }
}
