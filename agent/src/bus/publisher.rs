//! Publishing events: outbox first, then NATS, strictly in order, each confirmed before the next.
//!
//! Three tasks share the outbox, none of them waits for the node:
//! - intake takes the node's events into the outbox as soon as they come (so the bounded channel
//!   from the node only pushes back while the disk is slow);
//! - the sender publishes the outbox's front event and removes it once confirmed. With the events
//!   stream, that is a JetStream publish that waits for its ack (the stream drops a redelivered
//!   Msg-Id, so a retry after a lost ack never duplicates an event); without it, a core publish
//!   confirmed by a flush. After an error the stream is looked up again (and recreated when
//!   missing); while it cannot be had, events go out as core messages and the stream is asked
//!   for again at every heartbeat interval;
//! - the heartbeat publishes `P.heartbeat.<node>` (core only, never through the outbox) and keeps
//!   the node record in KV, looking for the bucket again at every heartbeat while it is missing.
//!
//! An event the server refuses for good (no permission to publish its subject; larger than
//! `max_payload`; refused by the stream again and again) must not stall the events behind it: it
//! is tried once more as a core message, then set aside (removed from the outbox), logged once at
//! error level with its subject and Msg-Id, and counted in the status `warnings`.
//!
//! A JetStream cluster losing a server is none of that. Killing the server the agent is connected
//! to loses the ack in flight (a timeout; the client reconnects to another server of the list);
//! killing the stream leader's server leaves the stream without a leader for a few seconds, when
//! a publish gets no responders (or times out) and `STREAM.INFO` times out or answers `503`
//! ("JetStream system temporarily unavailable"). Once the stream has been had in this agent's
//! life, all of these keep the event at the front of the outbox and retry it with the same Msg-Id
//! (the stream's duplicate window drops a copy an unseen ack already stored): never a fall back to
//! core NATS, which would leave a gap in the stream, and never a refusal counted towards setting
//! it aside. A JetStream that never answered (a server without it) still means core NATS.
//!
//! The stream and bucket are checked for their replicas (`nats.stream_replicas`) when they are
//! looked up (start, after errors and reconnects) and on a slow, jittered schedule: a shortfall is
//! logged once per change and listed in the status `warnings`.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{Client, HeaderMap};
use ebb_sdk::event::{Event, EventBody};
use ebb_sdk::status::NodeRecord;
use tokio::sync::{mpsc, watch, Notify};

use super::jetstream::{
    api_error, bucket_stream, events_stream, node_bucket, replicas_now, ApiError, Resolved,
};
use super::outbox::Outbox;
use super::refusals::Refusals;
use crate::config::NatsConfig;
use crate::events::rfc3339;
use crate::inbox::Summary;

/// How many events the node may hand over before the publisher has taken them into the outbox.
pub const EVENTS_QUEUE: usize = 256;
/// Consecutive refusals by the stream (not timeouts) after which an event is set aside.
const STREAM_REFUSALS: u32 = 3;
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Events taken into the outbox with one fsync.
const INTAKE_BATCH: usize = 256;
/// How often the replicas of the stream and bucket are asked for while all is well, and while
/// one is short, each jittered by ±25%. Each check is a `STREAM.INFO` per stream, answered by its
/// leader (the meta leader while it has none): 10,000 agents asking at every heartbeat would be
/// 2,000 requests a second; every 5 minutes it is about 67, spread out by the jitter so that a
/// fleet started together does not ask together. A lost server is noticed sooner where it
/// matters, at once by the agents it served (they reconnect, and a reconnect is checked).
const REPLICAS_RECHECK: Duration = Duration::from_secs(300);
const REPLICAS_RECHECK_SHORT: Duration = Duration::from_secs(120);
/// How long after a reconnect the replicas are asked for (and again after a stream did not
/// answer): by then the cluster has mostly elected new leaders (a check at once would find
/// streams without one).
const REPLICAS_SETTLE: Duration = Duration::from_secs(15);

/// What the publisher tells `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherReport {
    pub outbox_depth: u64,
    pub warnings: Vec<String>,
}

pub struct Publisher {
    pub client: Client,
    pub cfg: NatsConfig,
    pub node: String,
    pub groups: Vec<String>,
    pub boot_id: String,
    pub outbox: Outbox,
    pub events: mpsc::Receiver<Event>,
    pub summary: watch::Receiver<Summary>,
    pub refusals: Refusals,
    pub report: watch::Sender<PublisherReport>,
}

/// What the tasks share.
struct Shared {
    outbox: Arc<Mutex<Outbox>>,
    new_events: Notify,
    intake_done: AtomicBool,
    /// `seq` of the last event the node emitted (0 before the first).
    last_seq: AtomicU64,
    notes: Mutex<Notes>,
    report: watch::Sender<PublisherReport>,
}

/// What went wrong, for the status `warnings`.
#[derive(Debug, Default)]
struct Notes {
    depth: u64,
    unreadable_at_open: usize,
    dropped: u64,
    limit: usize,
    refused: u64,
    last_refused: Option<String>,
    /// Why events go out as core messages, while they do.
    stream_off: Option<String>,
    /// How the stream found differs from the settings: logged when it changes, not a warning,
    /// since an operator may have meant it.
    stream_differs: Vec<String>,
    /// Why the node record is not in KV, while it is not.
    kv_off: Option<String>,
    /// Why events wait in the outbox although the stream was had before (its cluster does not
    /// answer), while they do.
    stream_waiting: Option<String>,
    /// Per stream (events, bucket), why it has fewer (current) replicas than configured.
    replicas: BTreeMap<String, String>,
}

impl Notes {
    fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.refused > 0 {
            out.push(format!(
                "{} event(s) refused by NATS for good and set aside (not in the stream); last: {}",
                self.refused,
                self.last_refused.as_deref().unwrap_or("?")
            ));
        }
        if self.unreadable_at_open > 0 {
            out.push(format!(
                "{} unreadable line(s) of the event outbox were skipped at start (torn write or \
                 corruption); see the log",
                self.unreadable_at_open
            ));
        }
        if self.dropped > 0 {
            out.push(format!(
                "{} event(s) dropped because the event outbox was full (nats.outbox_limit = {}); \
                 NATS was away too long or raise the limit",
                self.dropped, self.limit
            ));
        }
        if let Some(why) = &self.stream_off {
            out.push(format!(
                "events go out as core NATS messages, not to the events stream: {why}"
            ));
        }
        if let Some(why) = &self.stream_waiting {
            out.push(format!(
                "events wait in the outbox for the events stream, which does not answer now: \
                 {why}; they go to it with the same Msg-Ids once it does"
            ));
        }
        if let Some(why) = &self.kv_off {
            out.push(format!("the node record is not kept in KV: {why}"));
        }
        out.extend(self.replicas.values().cloned());
        out
    }
}

impl Shared {
    fn note(&self, f: impl FnOnce(&mut Notes)) {
        let warnings = {
            let mut notes = self.notes.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut notes);
            PublisherReport {
                outbox_depth: notes.depth,
                warnings: notes.warnings(),
            }
        };
        self.report.send_if_modified(|r| {
            let changed = *r != warnings;
            *r = warnings;
            changed
        });
    }

    /// Records the replica shortfall of `stream` (`None`: none), logging it once per change.
    fn note_replicas(&self, stream: &str, shortfall: Option<String>) {
        self.note(|n| match shortfall {
            Some(why) => {
                if n.replicas.get(stream) != Some(&why) {
                    tracing::warn!("{why}");
                    n.replicas.insert(stream.to_string(), why);
                }
            }
            None => {
                if n.replicas.remove(stream).is_some() {
                    tracing::info!("stream {stream} has all its replicas again");
                }
            }
        });
    }

    fn replicas_short(&self) -> bool {
        !self
            .notes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replicas
            .is_empty()
    }

    /// Runs `f` on the outbox off the async runtime: it syncs files. `None` only when the
    /// runtime is shutting down.
    async fn outbox<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Outbox) -> T + Send + 'static,
    ) -> Option<T> {
        let outbox = self.outbox.clone();
        let (result, depth) = tokio::task::spawn_blocking(move || {
            let mut outbox = outbox.lock().unwrap_or_else(PoisonError::into_inner);
            let result = f(&mut outbox);
            (result, outbox.len() as u64)
        })
        .await
        .ok()?;
        self.note(|n| n.depth = depth);
        Some(result)
    }
}

enum Sink {
    Unresolved,
    Stream(Box<jetstream::Context>),
    /// Core NATS; the stream is asked for again at this instant.
    Core(Instant),
}

/// How one publish went.
enum Sent {
    Confirmed,
    /// Refused for good: set it aside.
    Refused(String),
    /// The stream answered with an error (not a timeout, not a busy cluster).
    StreamRefused(String),
    /// The stream is gone: look it up again at once.
    StreamMissing,
    /// Try again later.
    Failed(String),
}

impl Publisher {
    pub async fn run(self) {
        let shared = Arc::new(Shared {
            new_events: Notify::new(),
            intake_done: AtomicBool::new(false),
            last_seq: AtomicU64::new(0),
            notes: Mutex::new(Notes {
                depth: self.outbox.len() as u64,
                unreadable_at_open: self.outbox.unreadable_at_open(),
                limit: self.cfg.outbox_limit,
                ..Notes::default()
            }),
            outbox: Arc::new(Mutex::new(self.outbox)),
            report: self.report,
        });
        shared.note(|_| {});
        let intake = tokio::spawn(take_in(shared.clone(), self.events));
        let heartbeat = tokio::spawn(
            Heartbeat {
                client: self.client.clone(),
                cfg: self.cfg.clone(),
                node: self.node,
                groups: self.groups,
                boot_id: self.boot_id,
                summary: self.summary,
                shared: shared.clone(),
                refusals: self.refusals.clone(),
                kv_off: None,
                bucket_seen: false,
            }
            .run(),
        );
        Sender {
            client: self.client,
            cfg: self.cfg,
            refusals: self.refusals,
            shared,
            sink: Sink::Unresolved,
            stream_refusals: 0,
            stream_seen: false,
        }
        .run()
        .await;
        heartbeat.abort();
        let _ = intake.await;
    }
}

/// Takes the node's events into the outbox as they come.
async fn take_in(shared: Arc<Shared>, mut events: mpsc::Receiver<Event>) {
    while let Some(first) = events.recv().await {
        let mut batch = vec![first];
        while batch.len() < INTAKE_BATCH {
            match events.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if let Some(seq) = batch.iter().map(|e| e.seq).max() {
            shared.last_seq.fetch_max(seq, Ordering::Relaxed);
        }
        match shared.outbox(move |o| (o.push(batch), o.dropped())).await {
            Some((Ok(dropped), total)) => {
                for d in &dropped {
                    tracing::warn!(
                        msg_id = %d.msg_id(),
                        "event outbox full: dropping {} event {}",
                        d.kind(),
                        d.msg_id()
                    );
                }
                if !dropped.is_empty() {
                    shared.note(|n| n.dropped = total);
                }
            }
            Some((Err(e), _)) => {
                tracing::error!("{e}; the events are kept in memory and sent all the same")
            }
            None => return,
        }
        shared.new_events.notify_one();
    }
    shared.intake_done.store(true, Ordering::SeqCst);
    shared.new_events.notify_one();
}

struct Sender {
    client: Client,
    cfg: NatsConfig,
    refusals: Refusals,
    shared: Arc<Shared>,
    sink: Sink,
    /// Consecutive times the stream refused the front event.
    stream_refusals: u32,
    /// The events stream was had in this agent's life: a JetStream that does not answer is then
    /// a cluster between leaders, and events wait for it rather than go out as core messages.
    stream_seen: bool,
}

impl Sender {
    /// Sends until the node is gone and the outbox is empty.
    async fn run(mut self) {
        let mut retry = RETRY_FIRST;
        let mut missed_stream = false;
        loop {
            // Read before the outbox: once intake is done, what the outbox holds is all there is.
            let done = self.shared.intake_done.load(Ordering::SeqCst);
            let Some(front) = self.shared.outbox(|o| o.front().cloned()).await else {
                return;
            };
            let Some(event) = front else {
                if done {
                    return;
                }
                match self.sink {
                    // Idle on core NATS: look for the stream on schedule all the same, so that
                    // status tells the truth before the next event.
                    Sink::Core(at) => tokio::select! {
                        _ = self.shared.new_events.notified() => {}
                        _ = tokio::time::sleep_until(at.into()) => self.resolve().await,
                    },
                    _ => self.shared.new_events.notified().await,
                }
                continue;
            };
            let failed = match self.send(&event).await {
                Sent::Confirmed => {
                    self.done_with(&event).await;
                    None
                }
                Sent::Refused(why) => {
                    self.set_aside(&event, &why).await;
                    None
                }
                Sent::StreamRefused(why) => {
                    self.stream_refusals += 1;
                    if self.stream_refusals >= STREAM_REFUSALS {
                        self.set_aside(&event, &format!("the events stream refuses it: {why}"))
                            .await;
                        None
                    } else {
                        Some(why)
                    }
                }
                Sent::StreamMissing if !missed_stream => {
                    missed_stream = true;
                    continue;
                }
                Sent::StreamMissing => Some("the events stream is missing".to_string()),
                Sent::Failed(why) => Some(why),
            };
            missed_stream = false;
            match failed {
                None => retry = RETRY_FIRST,
                Some(why) => {
                    tracing::debug!(msg_id = %event.msg_id(), "event not published yet: {why}");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn done_with(&mut self, event: &Event) {
        self.stream_refusals = 0;
        let msg_id = event.msg_id();
        if let Some(Err(e)) = self.shared.outbox(Outbox::pop).await {
            tracing::error!(msg_id = %msg_id, "{e}");
        }
    }

    async fn send(&mut self, event: &Event) -> Sent {
        if matches!(self.sink, Sink::Core(at) if Instant::now() >= at) {
            self.sink = Sink::Unresolved;
        }
        if matches!(self.sink, Sink::Unresolved) {
            self.resolve().await;
        }
        let subject = event.subject(&self.cfg.prefix);
        let started = Instant::now();
        match &self.sink {
            Sink::Unresolved => Sent::Failed("NATS is not reachable".into()),
            Sink::Stream(js) => {
                let sent = judge_ack(publish_stream(js, &subject, event).await, &subject);
                // Looked up again after no answer too, not only after no responders: a core
                // subscriber of the events (`ebb ctl watch`) makes a missing stream look like a
                // lost ack. During a failover that is one STREAM.INFO per retry, and the retries
                // back off to one every RETRY_MAX.
                if matches!(sent, Sent::Failed(_) | Sent::StreamMissing) {
                    self.sink = Sink::Unresolved;
                }
                match sent {
                    Sent::Failed(_) if self.refusals.refused_since(&subject, started) => {
                        Sent::Refused(permission_denied(&subject))
                    }
                    other => other,
                }
            }
            Sink::Core(_) => match publish_core(&self.client, &subject, event).await {
                Sent::Confirmed if self.refusals.refused_since(&subject, started) => {
                    Sent::Refused(permission_denied(&subject))
                }
                other => other,
            },
        }
    }

    async fn resolve(&mut self) {
        let found = events_stream(&self.client, &self.cfg, &self.refusals).await;
        let found = match found {
            // JetStream is there and its cluster busy; or it was had before and may well be back
            // soon (a server restarted, a reconnect): the events wait for it, with their Msg-Ids.
            Resolved::Busy(why) => return self.wait_for_stream(why),
            Resolved::Unanswered(why) if self.stream_seen => return self.wait_for_stream(why),
            // Never had, and no JetStream to answer: core NATS, as without a stream at all.
            Resolved::Unanswered(why) => Resolved::Unavailable(why),
            other => other,
        };
        self.sink = match found {
            Resolved::Ready(stream) => {
                self.stream_seen = true;
                let differs = stream.differences;
                self.shared
                    .note_replicas(&self.cfg.events_stream, stream.replicas);
                self.shared.note(|n| {
                    if n.stream_off.is_some() {
                        tracing::info!("events go to the events stream again");
                    }
                    if n.stream_waiting.take().is_some() {
                        tracing::info!("the events stream answers again");
                    }
                    if n.stream_differs != differs {
                        for d in &differs {
                            tracing::warn!(
                                "{d}; ebb uses the stream as it is (change it, or the setting)"
                            );
                        }
                    }
                    n.stream_differs = differs;
                    n.stream_off = None;
                });
                Sink::Stream(Box::new(stream.js))
            }
            Resolved::Unavailable(why) => {
                let recheck = self.cfg.heartbeat.0.max(Duration::from_secs(1));
                self.shared.note(|n| {
                    if n.stream_off.as_ref() != Some(&why) {
                        tracing::warn!(
                            "events go out as core NATS messages, not to the events stream: \
                             {why}; asking again every {}",
                            humantime::format_duration(recheck)
                        );
                    }
                    n.stream_off = Some(why);
                });
                Sink::Core(Instant::now() + recheck)
            }
            Resolved::Retry(why) => {
                tracing::debug!("cannot reach JetStream yet: {why}");
                Sink::Unresolved
            }
            Resolved::Unanswered(why) | Resolved::Busy(why) => {
                tracing::debug!("JetStream does not answer: {why}");
                Sink::Unresolved
            }
        };
    }

    /// Keeps the events in the outbox until the stream answers, and says so (logged once).
    fn wait_for_stream(&mut self, why: String) {
        self.shared.note(|n| {
            if n.stream_waiting.is_none() {
                tracing::warn!(
                    "the events stream does not answer ({why}); events wait in the outbox and \
                     are retried with the same Msg-Ids"
                );
            }
            n.stream_waiting = Some(why);
        });
        self.sink = Sink::Unresolved;
    }

    /// Removes an event NATS will never take, after one last try as a core message, so that
    /// core subscribers may still see it (a `drained` above all).
    async fn set_aside(&mut self, event: &Event, why: &str) {
        let subject = event.subject(&self.cfg.prefix);
        if matches!(self.sink, Sink::Stream(_)) {
            let _ = publish_core(&self.client, &subject, event).await;
        }
        let msg_id = event.msg_id();
        tracing::error!(
            subject = %subject,
            msg_id = %msg_id,
            "NATS refuses event {} ({msg_id}) on {subject} for good: {why}; it is set aside so \
             later events flow (it was tried once as a core message)",
            event.kind()
        );
        let last = format!("{} {msg_id} on {subject}: {why}", event.kind());
        self.shared.note(|n| {
            n.refused += 1;
            n.last_refused = Some(last);
        });
        self.done_with(event).await;
    }
}

fn permission_denied(subject: &str) -> String {
    format!(
        "permissions violation: the agent's NATS user may not publish to {subject}; grant it \
         publish permission on the events subjects"
    )
}

fn headers(event: &Event) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", event.msg_id().as_str());
    h
}

fn too_large(subject: &str, e: impl std::fmt::Display) -> Sent {
    Sent::Refused(format!(
        "larger than the server's max_payload ({e}); raise max_payload or shorten what goes into \
         the event ({subject})"
    ))
}

/// What a JetStream publish came back with, before it is judged ([`judge_ack`]).
#[derive(Debug)]
enum Ack {
    Stored,
    /// Nobody listens on the subject: the stream is gone, or has no leader right now.
    NoResponders,
    TooLarge(String),
    /// The stream answered with an error.
    Api {
        code: usize,
        err_code: jetstream::ErrorCode,
        text: String,
    },
    /// An answer that is not one (it does not parse).
    Unreadable(String),
    /// No answer: a timeout, a lost connection.
    Lost(String),
    /// The event cannot be encoded.
    Unencodable,
}

/// How a publish of an event on `subject` went, from what came back. Pure.
fn judge_ack(ack: Ack, subject: &str) -> Sent {
    match ack {
        Ack::Stored => Sent::Confirmed,
        Ack::NoResponders => Sent::StreamMissing,
        Ack::TooLarge(e) => too_large(subject, e),
        Ack::Unencodable => Sent::Refused("it cannot be encoded as JSON".into()),
        // A cluster electing a leader or short of a server says so with a 503 or a cluster
        // error: the event waits, and such answers never count towards setting it aside.
        Ack::Api {
            code,
            err_code,
            text,
        } => match api_error(code, err_code) {
            ApiError::Transient => Sent::Failed(text),
            ApiError::TooManyReplicas | ApiError::Refused => Sent::StreamRefused(text),
        },
        Ack::Unreadable(e) => Sent::StreamRefused(e),
        Ack::Lost(e) => Sent::Failed(e),
    }
}

async fn publish_stream(js: &jetstream::Context, subject: &str, event: &Event) -> Ack {
    let Ok(payload) = serde_json::to_vec(event) else {
        return Ack::Unencodable;
    };
    let ack = match js
        .publish_with_headers(subject.to_string(), headers(event), payload.into())
        .await
    {
        Ok(ack) => ack,
        Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
            return Ack::TooLarge(e.to_string())
        }
        Err(e) => return Ack::Lost(e.to_string()),
    };
    match ack.await {
        Ok(_) => Ack::Stored,
        Err(e) => match e.kind() {
            PublishErrorKind::StreamNotFound => Ack::NoResponders,
            PublishErrorKind::MaxPayloadExceeded => Ack::TooLarge(e.to_string()),
            // The server answered, and said no (a stream limit, a busy cluster, ...).
            PublishErrorKind::Other => {
                match std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<jetstream::Error>())
                {
                    Some(api) => Ack::Api {
                        code: api.code(),
                        err_code: api.error_code(),
                        text: e.to_string(),
                    },
                    None if std::error::Error::source(&e).is_some() => {
                        Ack::Unreadable(e.to_string())
                    }
                    None => Ack::Lost(e.to_string()),
                }
            }
            _ => Ack::Lost(e.to_string()),
        },
    }
}

async fn publish_core(client: &Client, subject: &str, event: &Event) -> Sent {
    let Ok(payload) = serde_json::to_vec(event) else {
        return Sent::Refused("it cannot be encoded as JSON".into());
    };
    if client.connection_state() != State::Connected {
        return Sent::Failed("not connected to NATS".into());
    }
    match client
        .publish_with_headers(subject.to_string(), headers(event), payload.into())
        .await
    {
        Ok(()) => {}
        Err(e) if e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
            return too_large(subject, e)
        }
        Err(e) => return Sent::Failed(e.to_string()),
    }
    match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
        Ok(Ok(())) => Sent::Confirmed,
        Ok(Err(e)) => Sent::Failed(e.to_string()),
        Err(_) => Sent::Failed("flush timed out".into()),
    }
}

enum Bucket {
    Unresolved,
    Ready(Box<jetstream::kv::Store>),
    /// Looked for again at the next heartbeat.
    Off,
}

/// Heartbeats on `P.heartbeat.<node>` and the node record in KV.
struct Heartbeat {
    client: Client,
    cfg: NatsConfig,
    node: String,
    groups: Vec<String>,
    boot_id: String,
    summary: watch::Receiver<Summary>,
    shared: Arc<Shared>,
    refusals: Refusals,
    kv_off: Option<String>,
    /// The bucket was had in this agent's life: a JetStream that does not answer is then a
    /// cluster between leaders, not a reason to say the record is not kept.
    bucket_seen: bool,
}

impl Heartbeat {
    async fn run(mut self) {
        let every = self.cfg.heartbeat.0;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bucket = Bucket::Unresolved;
        let mut summary_open = true;
        // Looking the streams up (start, errors) checks their replicas already; then this slow
        // schedule, and a while after every reconnect (the server the agent was on may be the
        // one gone).
        let mut next_check = Instant::now() + jittered(REPLICAS_RECHECK);
        let mut connects = self.client.statistics().connects.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.beat().await;
                    if matches!(bucket, Bucket::Off) {
                        bucket = Bucket::Unresolved;
                    }
                    self.put_record(&mut bucket).await;
                    let now_connects = self.client.statistics().connects.load(Ordering::Relaxed);
                    if now_connects != connects {
                        connects = now_connects;
                        next_check = next_check.min(Instant::now() + jittered(REPLICAS_SETTLE));
                    }
                    if self.client.connection_state() == State::Connected
                        && Instant::now() >= next_check
                    {
                        let answered = self.check_replicas().await;
                        let every = if !answered {
                            REPLICAS_SETTLE
                        } else if self.shared.replicas_short() {
                            REPLICAS_RECHECK_SHORT
                        } else {
                            REPLICAS_RECHECK
                        };
                        next_check = Instant::now() + jittered(every);
                    }
                }
                changed = self.summary.changed(), if summary_open => match changed {
                    Ok(()) => self.put_record(&mut bucket).await,
                    Err(_) => summary_open = false,
                },
            }
        }
    }

    /// Asks both streams for their replicas (one `STREAM.INFO` each); a stream that cannot be
    /// asked (still electing a leader) keeps what was known of it. Whether both answered.
    async fn check_replicas(&self) -> bool {
        let mut answered = true;
        let wanted = self.cfg.stream_replicas;
        let mut names = Vec::new();
        if !self.cfg.events_stream.is_empty() {
            names.push(self.cfg.events_stream.clone());
        }
        if !self.cfg.state_bucket.is_empty() {
            names.push(bucket_stream(&self.cfg.state_bucket));
        }
        for name in names {
            match replicas_now(&self.client, &name, wanted).await {
                Some(shortfall) => self.shared.note_replicas(&name, shortfall),
                None => answered = false,
            }
        }
        answered
    }

    async fn beat(&self) {
        if self.client.connection_state() != State::Connected {
            return;
        }
        let state = self.summary.borrow().state;
        let heartbeat = Event {
            v: ebb_sdk::PROTOCOL_VERSION,
            node: self.node.clone(),
            boot_id: self.boot_id.clone(),
            seq: self.shared.last_seq.load(Ordering::Relaxed),
            time: rfc3339(std::time::SystemTime::now()),
            requester: None,
            reason: None,
            body: EventBody::Heartbeat { state },
        };
        let Ok(payload) = serde_json::to_vec(&heartbeat) else {
            return;
        };
        let subject = heartbeat.subject(&self.cfg.prefix);
        if let Err(e) = self.client.publish(subject.clone(), payload.into()).await {
            tracing::debug!("heartbeat on {subject} not published: {e}");
        }
    }

    async fn put_record(&mut self, bucket: &mut Bucket) {
        if self.client.connection_state() != State::Connected {
            return;
        }
        if matches!(bucket, Bucket::Unresolved) {
            *bucket = match node_bucket(&self.client, &self.cfg, &self.refusals).await {
                Resolved::Ready(found) => {
                    self.bucket_seen = true;
                    if self.kv_off.take().is_some() {
                        tracing::info!("the node record is kept in KV again");
                        self.shared.note(|n| n.kv_off = None);
                    }
                    self.shared
                        .note_replicas(&bucket_stream(&self.cfg.state_bucket), found.replicas);
                    Bucket::Ready(Box::new(found.store))
                }
                // Its cluster is between leaders, or it was had before: the next heartbeat asks
                // again.
                Resolved::Busy(why) => {
                    tracing::debug!("the KV bucket does not answer now: {why}");
                    Bucket::Off
                }
                Resolved::Unanswered(why) if self.bucket_seen => {
                    tracing::debug!("the KV bucket does not answer now: {why}");
                    Bucket::Off
                }
                Resolved::Unavailable(why) | Resolved::Unanswered(why) => {
                    if self.kv_off.as_ref() != Some(&why) {
                        tracing::warn!(
                            "the node record is not kept in KV: {why}; asking again at every \
                             heartbeat"
                        );
                        let note = why.clone();
                        self.shared.note(|n| n.kv_off = Some(note));
                        self.kv_off = Some(why);
                    }
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
            tracing::debug!("cannot update the node record in KV: {e}; looking for it again");
            *bucket = Bucket::Unresolved;
        }
    }
}

/// `base` give or take 25%, different in every agent (and at every call), so that agents started
/// together do not ask together.
fn jittered(base: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    base * (75 + (random % 51) as u32) / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_cluster_or_a_lost_ack_waits_and_only_a_refusal_counts() {
        let subject = "ebb.event.n.reloaded";
        let api = |code, err_code| Ack::Api {
            code,
            err_code: jetstream::ErrorCode(err_code),
            text: "x".into(),
        };
        assert!(matches!(judge_ack(Ack::Stored, subject), Sent::Confirmed));
        // Leader election: nobody listens on the subject for a moment, or the cluster says so.
        assert!(matches!(
            judge_ack(Ack::NoResponders, subject),
            Sent::StreamMissing
        ));
        for (code, err_code) in [(503, 10008), (500, 10118), (500, 10009), (503, 1)] {
            assert!(
                matches!(judge_ack(api(code, err_code), subject), Sent::Failed(_)),
                "{code} {err_code}"
            );
        }
        assert!(matches!(
            judge_ack(Ack::Lost("timed out".into()), subject),
            Sent::Failed(_)
        ));
        // The stream said no (a limit, a message too large for it): counted, then set aside.
        assert!(matches!(
            judge_ack(api(400, 10054), subject),
            Sent::StreamRefused(_)
        ));
        assert!(matches!(
            judge_ack(Ack::Unreadable("garbage".into()), subject),
            Sent::StreamRefused(_)
        ));
        assert!(matches!(
            judge_ack(Ack::TooLarge("big".into()), subject),
            Sent::Refused(w) if w.contains("max_payload") && w.contains(subject)
        ));
    }

    #[test]
    fn the_replica_recheck_is_jittered_within_a_quarter() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(100));
            assert!(
                d >= Duration::from_secs(75) && d <= Duration::from_secs(125),
                "{d:?}"
            );
        }
    }

    #[test]
    fn warnings_say_what_went_wrong_and_nothing_when_all_is_well() {
        assert!(Notes::default().warnings().is_empty());
        let notes = Notes {
            depth: 3,
            unreadable_at_open: 2,
            dropped: 5,
            limit: 10,
            refused: 1,
            last_refused: Some("undrained n.b.4 on ebb.event.n.undrained: denied".into()),
            stream_off: Some("JetStream does not answer".into()),
            stream_differs: vec!["stream EBB_EVENTS has max_age 1h".into()],
            kv_off: Some("no bucket".into()),
            stream_waiting: Some("JetStream does not answer (timed out)".into()),
            replicas: [(
                "KV_ebb_nodes".to_string(),
                "stream KV_ebb_nodes has 1 replica(s) where nats.stream_replicas is 3".to_string(),
            )]
            .into(),
        };
        let w = notes.warnings();
        assert_eq!(w.len(), 7, "{w:?}");
        assert!(w[4].starts_with("events wait in the outbox") && w[4].contains("timed out"));
        assert!(w[6].contains("where nats.stream_replicas is 3"));
        assert!(w[0].starts_with("1 event(s) refused") && w[0].contains("n.b.4"));
        assert!(w[1].starts_with("2 unreadable line(s)"));
        assert!(w[2].contains("nats.outbox_limit = 10"));
        assert!(w[3].contains("JetStream does not answer"));
        assert!(w[5].contains("no bucket"));
    }
}
