//! An async fleet client over async-nats (feature `client`): discover nodes, send any verb to a
//! node, a group or every node, gather the replies, and wait for events.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ebb_sdk::client::ClientError> {
//! use std::time::Duration;
//! use ebb_sdk::client::{Client, Target};
//! use ebb_sdk::command::{Command, DrainRequest};
//!
//! let nats = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let client = Client::new(nats, "ebb");
//! let nodes = client.discover(&Target::Group("web".into())).await?;
//! // Subscribe before sending, so a node that drains at once is never missed.
//! let mut events = client.events(&Target::Group("web".into())).await?;
//! let replies = client
//!     .request(&Target::Group("web".into()), &Command::Drain(DrainRequest::default()), &nodes, Duration::from_secs(5))
//!     .await?;
//! while let Some(event) = events.next_within(Duration::from_secs(60)).await {
//!     println!("{} {}", event.node, event.kind());
//! }
//! # let _ = replies; Ok(()) }
//! ```

mod gathering;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use futures::StreamExt;

use crate::command::Command;
use crate::event::Event;
use crate::reply::Reply;
use crate::status::NodeRecord;
use crate::subject::{self, Verb};
use gathering::{Dest, Gathering};
pub use gathering::{MOVE_GRACE, RETRY_AFTER};

/// How often a fan-out looks at its own connection, to retry as soon as it is back after a loss.
const CONNECTION_CHECK: Duration = Duration::from_millis(100);
/// How long discovery reads the KV bucket at most.
const KV_READ: Duration = Duration::from_secs(5);
/// How long one JetStream API request waits for its answer. A stream between leaders never
/// answers a request sent before the election; the connection's own request timeout (10 s by
/// default) would hold a discovery that long, where the ping answers in half a second.
const JS_TIMEOUT: Duration = Duration::from_secs(2);

/// Who a command is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Node(String),
    Group(String),
    All,
}

impl Target {
    /// The subject of `verb` for this target.
    pub fn subject(&self, prefix: &str, verb: &str) -> String {
        match self {
            Target::Node(n) => subject::node_subject(prefix, n, verb),
            Target::Group(g) => subject::group_subject(prefix, g, verb),
            Target::All => subject::all_subject(prefix, verb),
        }
    }

    /// Whether a node with these groups is one of the target's.
    pub fn covers(&self, node: &str, groups: &[String]) -> bool {
        match self {
            Target::Node(n) => n == node,
            Target::Group(g) => groups.iter().any(|x| x == g),
            Target::All => true,
        }
    }
}

/// The nodes of `target` among `records`.
fn covered(target: &Target, records: Vec<NodeRecord>) -> BTreeSet<String> {
    records
        .into_iter()
        .filter(|r| target.covers(&r.node, &r.groups))
        .map(|r| r.node)
        .collect()
}

/// What one read of the KV bucket found, and whether it got to the end of the bucket.
struct KvRead {
    records: Vec<NodeRecord>,
    complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("NATS subscribe failed: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("NATS publish failed: {0}")]
    Publish(#[from] async_nats::PublishError),
    #[error("NATS flush failed: {0}")]
    Flush(#[from] async_nats::client::FlushError),
}

/// A fleet client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    prefix: String,
    bucket: String,
    stream: String,
}

impl Client {
    pub fn new(nats: async_nats::Client, prefix: &str) -> Self {
        Client {
            nats,
            prefix: prefix.to_string(),
            bucket: subject::KV_BUCKET.to_string(),
            stream: subject::STREAM_NAME.to_string(),
        }
    }

    /// Looks for missed events in another stream than `EBB_EVENTS` ([`last_event`](Self::last_event)).
    pub fn with_stream(mut self, stream: &str) -> Self {
        self.stream = stream.to_string();
        self
    }

    /// Uses another KV bucket for discovery than `ebb_nodes`.
    pub fn with_bucket(mut self, bucket: &str) -> Self {
        self.bucket = bucket.to_string();
        self
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A JetStream context on this client's connection whose API requests wait 2 s at most (a
    /// stream electing a leader answers again within a few seconds; ask again then).
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        let mut js = async_nats::jetstream::new(self.nats.clone());
        js.set_timeout(JS_TIMEOUT);
        js
    }

    /// The nodes a target covers: the fresh records of the KV bucket (they expire after three
    /// missed heartbeats), or else whoever answers `$SRV.PING.ebb` within half a second. A node
    /// target is looked up by its own key; a group or the fleet reads the bucket in one pass. A
    /// read of the bucket that ends early (a dropped watch, a slow server) is completed by the
    /// ping rather than taken for the whole fleet.
    pub async fn discover(&self, target: &Target) -> Result<BTreeSet<String>, ClientError> {
        let (mut nodes, complete) = match target {
            Target::Node(n) => {
                let found = self.node_record(n).await.is_some();
                (found.then(|| n.clone()).into_iter().collect(), true)
            }
            _ => {
                let read = self.read_node_records().await;
                (covered(target, read.records), read.complete)
            }
        };
        if nodes.is_empty() || !complete {
            nodes.extend(self.pinged(target).await?);
        }
        Ok(nodes)
    }

    /// Every node of a group or the fleet that either has a record in the KV bucket or answers
    /// `$SRV.PING.ebb` within half a second: for work that must reach each node (a rollout),
    /// where leaving out a live node whose record expired during a stall costs more than the
    /// half second. A node target is looked up as [`discover`](Self::discover) does.
    pub async fn roll_call(&self, target: &Target) -> Result<BTreeSet<String>, ClientError> {
        if matches!(target, Target::Node(_)) {
            return self.discover(target).await;
        }
        let mut nodes = covered(target, self.read_node_records().await.records);
        nodes.extend(self.pinged(target).await?);
        Ok(nodes)
    }

    /// The nodes of `target` that answer `$SRV.PING.ebb` within half a second.
    async fn pinged(&self, target: &Target) -> Result<BTreeSet<String>, ClientError> {
        let inbox = self.nats.new_inbox();
        let mut sub = self.nats.subscribe(inbox.clone()).await?;
        let ping = format!("$SRV.PING.{}", subject::SERVICE_NAME);
        self.nats.publish_with_reply(ping, inbox, "".into()).await?;
        let until = Instant::now() + Duration::from_millis(500);
        let mut nodes = BTreeSet::new();
        while let Ok(Some(msg)) =
            tokio::time::timeout(until.saturating_duration_since(Instant::now()), sub.next()).await
        {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else {
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
                if target.covers(node, &groups) {
                    nodes.insert(node.to_string());
                }
            }
        }
        Ok(nodes)
    }

    /// One node's record in the KV bucket; `None` when it has none (or there is no bucket).
    pub async fn node_record(&self, node: &str) -> Option<NodeRecord> {
        let js = self.jetstream();
        let store = js.get_key_value(self.bucket.as_str()).await.ok()?;
        let value = store.get(node).await.ok()??;
        serde_json::from_slice(&value).ok()
    }

    /// Every node record in the KV bucket; empty when there is no bucket. One watch over the
    /// bucket delivers the latest record of each node, so a fleet of thousands is read in one
    /// pass rather than one request per node. Each node once, in node order; a read that ends
    /// early returns what it got.
    pub async fn node_records(&self) -> Vec<NodeRecord> {
        self.read_node_records().await.records
    }

    async fn read_node_records(&self) -> KvRead {
        let unread = KvRead {
            records: Vec::new(),
            complete: false,
        };
        let js = self.jetstream();
        let Ok(store) = js.get_key_value(self.bucket.as_str()).await else {
            return unread;
        };
        // An empty bucket delivers nothing to a watch: know that before waiting on it, from the
        // stream info the lookup of the bucket already fetched. One message per key (the bucket
        // keeps one per subject and denies deletes): the keys the read must find.
        let held = store.stream.cached_info().state.messages;
        if held == 0 {
            return KvRead {
                complete: true,
                ..unread
            };
        }
        let Ok(mut watch) = store.watch_with_history(">").await else {
            return unread;
        };
        // Each key's latest entry: one rewritten while the watch runs comes again, newer.
        let mut latest: BTreeMap<String, Option<NodeRecord>> = BTreeMap::new();
        let mut complete = false;
        let until = Instant::now() + KV_READ;
        while let Ok(Some(Ok(entry))) = tokio::time::timeout(
            until.saturating_duration_since(Instant::now()),
            watch.next(),
        )
        .await
        {
            let record = (entry.operation == async_nats::jetstream::kv::Operation::Put)
                .then(|| serde_json::from_slice::<NodeRecord>(&entry.value).ok())
                .flatten();
            latest.insert(entry.key, record);
            // `delta` counts the entries still to come of what the bucket held at the start. A
            // key rewritten while the watch runs can be counted out of it: a read that found fewer
            // keys than the bucket held is not the whole fleet.
            if entry.delta == 0 {
                complete = latest.len() as u64 >= held;
                break;
            }
        }
        KvRead {
            records: latest.into_values().flatten().collect(),
            complete,
        }
    }

    /// Sends `command` to `target` and gathers replies until `timeout`, or until every node of
    /// `expected` answered (a single node target ends at its reply). Replies are sorted by node; a
    /// node that answers twice counts once. [`gather`](Self::gather) also tells whether nobody
    /// listened at all.
    pub async fn request(
        &self,
        target: &Target,
        command: &Command,
        expected: &BTreeSet<String>,
        timeout: Duration,
    ) -> Result<Vec<Reply>, ClientError> {
        Ok(self
            .gather(target, command, expected, timeout)
            .await?
            .replies)
    }

    /// [`request`](Self::request), and whether the server answered "no responders": no agent
    /// subscribes to the target's subject, so no reply can come (it returns at once then, unless a
    /// node of `expected` may be between servers).
    pub async fn gather(
        &self,
        target: &Target,
        command: &Command,
        expected: &BTreeSet<String>,
        timeout: Duration,
    ) -> Result<Gathered, ClientError> {
        let mut replies: Vec<Reply> = Vec::new();
        let report = self
            .gather_each(target, command, expected, timeout, |r| replies.push(r))
            .await?;
        replies.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(Gathered {
            subject: report.subject,
            replies,
            no_responders: report.no_responders,
        })
    }

    /// Sends `command` to `target` and hands each node's first reply to `on_reply` as it comes,
    /// keeping only the names of the nodes that answered: memory stays bounded by what `on_reply`
    /// keeps, however large the fleet.
    ///
    /// `expected` are the nodes known to exist (see [`discover`](Self::discover)): the fan-out
    /// ends once they all answered, and a known node that is momentarily between NATS servers is
    /// asked again. The command survives the loss of a NATS server with at most one retry, to the
    /// nodes that have not answered; a command other than `status` gets a fresh `request_id` when
    /// it has none, so that the agent acts once and answers the retry with its first reply.
    pub async fn gather_each(
        &self,
        target: &Target,
        command: &Command,
        expected: &BTreeSet<String>,
        timeout: Duration,
        mut on_reply: impl FnMut(Reply),
    ) -> Result<GatherReport, ClientError> {
        let command = self.with_request_id(command);
        let body = command.to_vec();
        let verb = command.verb();
        let subject = target.subject(&self.prefix, verb.as_str());
        let single = match target {
            Target::Node(n) => Some(n.clone()),
            _ => None,
        };
        let inbox = self.nats.new_inbox();
        let mut sub = self.nats.subscribe(format!("{inbox}.>")).await?;
        let mut gathering = Gathering::new(single, expected.clone(), Instant::now(), timeout);
        let mut answered: BTreeSet<String> = BTreeSet::new();
        let mut connected = self.nats.connection_state() == State::Connected;
        loop {
            let now = Instant::now();
            while let Some(dest) = gathering.poll_transmit(now) {
                let (to, reply_to) = match &dest {
                    Dest::Target => (subject.clone(), format!("{inbox}.t")),
                    Dest::Node(n) => (
                        subject::node_subject(&self.prefix, n, verb.as_str()),
                        format!("{inbox}.n.{n}"),
                    ),
                };
                self.nats
                    .publish_with_reply(to, reply_to, body.clone().into())
                    .await?;
            }
            if gathering.is_done(now) {
                break;
            }
            let wake = gathering.poll_timeout().min(now + CONNECTION_CHECK);
            let msg = tokio::select! {
                msg = sub.next() => msg,
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now_connected = self.nats.connection_state() == State::Connected;
                    match (connected, now_connected) {
                        (true, false) => gathering.handle_connection_lost(),
                        (false, true) => gathering.handle_connection_back(Instant::now()),
                        _ => {}
                    }
                    connected = now_connected;
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            let dest = match msg.subject.strip_prefix(inbox.as_str()) {
                Some(".t") => Dest::Target,
                Some(rest) => match rest.strip_prefix(".n.") {
                    Some(node) => Dest::Node(node.to_string()),
                    None => continue,
                },
                None => continue,
            };
            // Servers that send "no responders" without a status send an empty message.
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) || msg.payload.is_empty() {
                gathering.handle_no_responders(dest, Instant::now());
                continue;
            }
            let Ok(reply) = serde_json::from_slice::<Reply>(&msg.payload) else {
                continue;
            };
            gathering.handle_reply(&reply.node);
            if answered.insert(reply.node.clone()) {
                on_reply(reply);
            }
        }
        Ok(GatherReport {
            subject,
            answered,
            no_responders: gathering.no_responders(),
            retried: gathering.retried(),
        })
    }

    /// `command` with a `request_id`, so that a retry acts once. `status` acts on nothing and
    /// needs none: giving it one would only crowd the agents' memory of answered requests.
    fn with_request_id(&self, command: &Command) -> Command {
        let mut command = command.clone();
        if command.verb() != Verb::Status && command.request_id().is_none() {
            let inbox = self.nats.new_inbox();
            let unique = inbox.rsplit('.').next().unwrap_or(inbox.as_str());
            command.set_request_id(format!("req-{unique}"));
        }
        command
    }

    /// The last event of `kind` that `node` published, from the events stream; `None` when there
    /// is none or no stream. For a client that may have missed it while reconnecting.
    pub async fn last_event(&self, node: &str, kind: &str) -> Option<Event> {
        let js = self.jetstream();
        let stream = js.get_stream_no_info(self.stream.as_str()).await.ok()?;
        let subject = subject::event_subject(&self.prefix, node, kind);
        let message = stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .ok()?;
        serde_json::from_slice(&message.payload).ok()
    }

    /// Subscribes to the events of a target's nodes. Subscribe before sending a command whose
    /// outcome arrives as an event. Group membership is not in the event subject, so a group
    /// target receives every node's events; filter with [`Events::only`].
    pub async fn events(&self, target: &Target) -> Result<Events, ClientError> {
        let subject = match target {
            Target::Node(n) => subject::node_event_wildcard(&self.prefix, n),
            _ => subject::event_wildcard(&self.prefix),
        };
        let sub = self.nats.subscribe(subject).await?;
        Ok(Events {
            sub,
            only: None,
            seen: BTreeSet::new(),
        })
    }
}

/// What [`Client::gather`] collected.
#[derive(Debug, Clone, Default)]
pub struct Gathered {
    /// The subject the command went to.
    pub subject: String,
    /// Sorted by node, one per node.
    pub replies: Vec<Reply>,
    /// The server said nobody subscribes to `subject`: no agent of the target is connected.
    pub no_responders: bool,
}

/// What [`Client::gather_each`] saw, besides the replies it handed over.
#[derive(Debug, Clone, Default)]
pub struct GatherReport {
    /// The subject the command went to.
    pub subject: String,
    /// The nodes that answered.
    pub answered: BTreeSet<String>,
    /// The server said nobody subscribes to `subject`, and no known node could be between
    /// servers: no agent of the target is connected.
    pub no_responders: bool,
    /// The command was sent a second time to the nodes that had not answered (a server may have
    /// been lost on the way).
    pub retried: bool,
}

/// A stream of events, deduplicated by Msg-Id (delivery is at least once).
#[derive(Debug)]
pub struct Events {
    sub: async_nats::Subscriber,
    only: Option<BTreeSet<String>>,
    seen: BTreeSet<(String, String, u64)>,
}

impl Events {
    /// Keeps only these nodes' events.
    pub fn only(mut self, nodes: BTreeSet<String>) -> Self {
        self.only = Some(nodes);
        self
    }

    /// The next event within `timeout`; `None` on timeout. Unreadable messages are skipped.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.sub.next()).await.ok()??;
            let Ok(event) = serde_json::from_slice::<Event>(&msg.payload) else {
                continue;
            };
            if self.only.as_ref().is_some_and(|o| !o.contains(&event.node)) {
                continue;
            }
            let key = (event.node.clone(), event.boot_id.clone(), event.seq);
            if self.seen.insert(key) {
                return Some(event);
            }
        }
    }

    /// Waits for the first event that `pred` accepts, within `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.next_within(left).await?;
            if pred(&event) {
                return Some(event);
            }
        }
    }
}
