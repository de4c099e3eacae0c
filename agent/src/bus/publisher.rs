//! Publishing events: outbox first, then NATS, strictly in order, each confirmed before the next.
//!
//! With the events stream, a publish is a JetStream publish that waits for its ack; the stream
//! drops a redelivered Msg-Id, so retrying after a lost ack never duplicates an event in the
//! stream. Without it, events go out as core messages, confirmed by a flush.

use std::time::Duration;

use async_nats::{jetstream, Client, HeaderMap};
use ebb_sdk::event::Event;
use ebb_sdk::status::NodeRecord;
use tokio::sync::{mpsc, watch};

use super::jetstream::{events_stream, node_bucket, Resolved};
use super::outbox::Outbox;
use crate::config::NatsConfig;
use crate::events::rfc3339;
use crate::inbox::Summary;

enum Sink {
    Unresolved,
    Stream(Box<jetstream::Context>),
    /// Core NATS since this instant; JetStream is asked again after `RECHECK_JETSTREAM`.
    Core(std::time::Instant),
}

const RECHECK_JETSTREAM: Duration = Duration::from_secs(60);

enum Bucket {
    Unresolved,
    Ready(Box<jetstream::kv::Store>),
    Off,
}

pub struct Publisher {
    pub client: Client,
    pub cfg: NatsConfig,
    pub node: String,
    pub groups: Vec<String>,
    pub boot_id: String,
    pub outbox: Outbox,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub summary: watch::Receiver<Summary>,
}

const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl Publisher {
    pub async fn run(mut self) {
        let mut sink = Sink::Unresolved;
        let mut bucket = Bucket::Unresolved;
        let mut retry = RETRY_FIRST;
        let mut events_open = true;
        loop {
            // Take in everything already produced, so the outbox holds it durably.
            while let Ok(event) = self.events.try_recv() {
                self.store(event);
            }
            if self.outbox.is_empty() {
                if !events_open {
                    return;
                }
                tokio::select! {
                    event = self.events.recv() => match event {
                        Some(e) => self.store(e),
                        None => events_open = false,
                    },
                    changed = self.summary.changed() => {
                        if changed.is_ok() {
                            self.put_record(&mut bucket).await;
                        }
                    }
                }
                continue;
            }
            if matches!(sink, Sink::Core(since) if since.elapsed() > RECHECK_JETSTREAM) {
                sink = Sink::Unresolved;
            }
            if matches!(sink, Sink::Unresolved) {
                sink = match events_stream(&self.client, &self.cfg).await {
                    Resolved::Ready(js) => Sink::Stream(Box::new(js)),
                    Resolved::Unavailable(why) => {
                        tracing::warn!(
                            "events go out as core NATS messages, not to JetStream: {why}"
                        );
                        Sink::Core(std::time::Instant::now())
                    }
                    Resolved::Retry(why) => {
                        tracing::debug!("cannot reach JetStream yet: {why}");
                        Sink::Unresolved
                    }
                };
            }
            let Some(event) = self.outbox.front().cloned() else {
                continue;
            };
            let sent = match &sink {
                Sink::Unresolved => Err("NATS is not reachable".to_string()),
                Sink::Stream(js) => publish_stream(js, &self.cfg.prefix, &event).await,
                Sink::Core(_) => publish_core(&self.client, &self.cfg.prefix, &event).await,
            };
            match sent {
                Ok(()) => {
                    retry = RETRY_FIRST;
                    if let Err(e) = self.outbox.pop() {
                        tracing::error!("{e}");
                    }
                    if matches!(event.body, ebb_sdk::event::EventBody::Heartbeat { .. }) {
                        self.put_record(&mut bucket).await;
                    }
                }
                Err(why) => {
                    tracing::debug!(msg_id = %event.msg_id(), "event not published yet: {why}");
                    // Keep taking events in while waiting to retry.
                    let wait = tokio::time::sleep(retry);
                    tokio::pin!(wait);
                    loop {
                        tokio::select! {
                            _ = &mut wait => break,
                            event = self.events.recv(), if events_open => match event {
                                Some(e) => self.store(e),
                                None => events_open = false,
                            },
                        }
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }

    fn store(&mut self, event: Event) {
        if let Err(e) = self.outbox.push(vec![event]) {
            tracing::error!("{e}");
        }
    }

    async fn put_record(&mut self, bucket: &mut Bucket) {
        if matches!(bucket, Bucket::Unresolved) {
            *bucket = match node_bucket(&self.client, &self.cfg).await {
                Resolved::Ready(store) => Bucket::Ready(Box::new(store)),
                Resolved::Unavailable(why) => {
                    tracing::warn!("node state is not kept in KV: {why}");
                    Bucket::Off
                }
                Resolved::Retry(_) => Bucket::Unresolved,
            };
        }
        let Bucket::Ready(store) = bucket else { return };
        let summary = self.summary.borrow_and_update().clone();
        let record = NodeRecord {
            node: self.node.clone(),
            groups: self.groups.clone(),
            state: summary.state,
            boot_id: self.boot_id.clone(),
            heartbeat_at: rfc3339(std::time::SystemTime::now()),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            heartbeat_ms: self.cfg.heartbeat.0.as_millis() as u64,
            drain_id: summary.drain_id,
        };
        let Ok(value) = serde_json::to_vec(&record) else {
            return;
        };
        if let Err(e) = store.put(&self.node, value.into()).await {
            tracing::debug!("cannot update KV node state: {e}");
        }
    }
}

fn headers(event: &Event) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", event.msg_id().as_str());
    h
}

async fn publish_stream(
    js: &jetstream::Context,
    prefix: &str,
    event: &Event,
) -> Result<(), String> {
    let subject = ebb_sdk::subject::event_subject(prefix, &event.node, event.kind());
    let payload = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let ack = js
        .publish_with_headers(subject, headers(event), payload.into())
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(|_| ()).map_err(|e| e.to_string())
}

async fn publish_core(client: &Client, prefix: &str, event: &Event) -> Result<(), String> {
    let subject = ebb_sdk::subject::event_subject(prefix, &event.node, event.kind());
    let payload = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    client
        .publish_with_headers(subject, headers(event), payload.into())
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(2), client.flush())
        .await
        .map_err(|_| "flush timed out".to_string())?
        .map_err(|e| e.to_string())
}
