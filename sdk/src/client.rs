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

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::command::Command;
use crate::event::Event;
use crate::reply::Reply;
use crate::status::NodeRecord;
use crate::subject;

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
}

impl Client {
    pub fn new(nats: async_nats::Client, prefix: &str) -> Self {
        Client {
            nats,
            prefix: prefix.to_string(),
            bucket: subject::KV_BUCKET.to_string(),
        }
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

    /// The nodes a target covers: the fresh records of the KV bucket (they expire after three
    /// missed heartbeats), or else whoever answers `$SRV.PING.ebb` within half a second.
    pub async fn discover(&self, target: &Target) -> Result<BTreeSet<String>, ClientError> {
        let wanted = |node: &str, groups: &[String]| match target {
            Target::Node(n) => n == node,
            Target::Group(g) => groups.iter().any(|x| x == g),
            Target::All => true,
        };
        let mut nodes = BTreeSet::new();
        for record in self.node_records().await {
            if wanted(&record.node, &record.groups) {
                nodes.insert(record.node);
            }
        }
        if !nodes.is_empty() {
            return Ok(nodes);
        }
        let inbox = self.nats.new_inbox();
        let mut sub = self.nats.subscribe(inbox.clone()).await?;
        let ping = format!("$SRV.PING.{}", subject::SERVICE_NAME);
        self.nats.publish_with_reply(ping, inbox, "".into()).await?;
        let until = Instant::now() + Duration::from_millis(500);
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
                if wanted(node, &groups) {
                    nodes.insert(node.to_string());
                }
            }
        }
        Ok(nodes)
    }

    /// Every node record in the KV bucket; empty when there is no bucket.
    pub async fn node_records(&self) -> Vec<NodeRecord> {
        let js = async_nats::jetstream::new(self.nats.clone());
        let Ok(store) = js.get_key_value(self.bucket.as_str()).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let Ok(mut keys) = store.keys().await else {
            return out;
        };
        while let Some(Ok(key)) = keys.next().await {
            if let Ok(Some(value)) = store.get(&key).await {
                if let Ok(record) = serde_json::from_slice::<NodeRecord>(&value) {
                    out.push(record);
                }
            }
        }
        out
    }

    /// Sends `command` once to `target` and gathers replies until `timeout`, or until every node
    /// of `expected` answered (a single node target needs no `expected`). Replies are sorted by
    /// node; a node that answers twice counts once. [`gather`](Self::gather) also tells whether
    /// nobody listened at all.
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
    /// subscribes to the target's subject, so no reply can come (it returns at once then).
    pub async fn gather(
        &self,
        target: &Target,
        command: &Command,
        expected: &BTreeSet<String>,
        timeout: Duration,
    ) -> Result<Gathered, ClientError> {
        let deadline = Instant::now() + timeout;
        let subject = target.subject(&self.prefix, command.verb().as_str());
        let inbox = self.nats.new_inbox();
        let mut sub = self.nats.subscribe(inbox.clone()).await?;
        self.nats
            .publish_with_reply(subject.clone(), inbox, command.to_vec().into())
            .await?;
        self.nats.flush().await?;
        let mut replies: Vec<Reply> = Vec::new();
        let mut no_responders = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(msg)) = tokio::time::timeout(left, sub.next()).await else {
                break;
            };
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                no_responders = replies.is_empty();
                break;
            }
            match serde_json::from_slice::<Reply>(&msg.payload) {
                Ok(r) if !replies.iter().any(|x| x.node == r.node) => replies.push(r),
                Ok(_) => {}
                // Servers that send "no responders" without a status send an empty message.
                Err(_) if msg.payload.is_empty() => {
                    no_responders = replies.is_empty();
                    break;
                }
                Err(_) => {}
            }
            let done = match target {
                Target::Node(_) => !replies.is_empty(),
                _ => {
                    !expected.is_empty()
                        && expected
                            .iter()
                            .all(|n| replies.iter().any(|r| &r.node == n))
                }
            };
            if done {
                break;
            }
        }
        replies.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(Gathered {
            subject,
            replies,
            no_responders,
        })
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
