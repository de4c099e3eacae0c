//! A tap on the agent's events: a core NATS subscription that records every message it receives,
//! in arrival order, stamped with the instant it arrived.
//!
//! Tests wait on it (woken by each new event, bounded by a timeout) instead of sleeping, and
//! compare receipt instants and `seq` numbers to check what came before what.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::Client;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How long a wait without an explicit timeout lasts, unless [`EventTap::with_timeout`] says
/// otherwise. Generous: the tests share a small machine with other work.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One message as the tap received it.
#[derive(Clone, Debug)]
pub struct Event {
    pub subject: String,
    /// When the tap received it.
    pub at: Instant,
    /// The `Nats-Msg-Id` header, which JetStream dedupes on.
    pub msg_id: Option<String>,
    /// The JSON body; a body that is not JSON is kept as a JSON string, so nothing is lost.
    pub body: Value,
}

impl Event {
    /// The envelope's `kind` ("" when absent).
    pub fn kind(&self) -> &str {
        self.body["kind"].as_str().unwrap_or("")
    }

    /// The envelope's `seq` (0 when absent).
    pub fn seq(&self) -> u64 {
        self.body["seq"].as_u64().unwrap_or(0)
    }
}

/// Every message on a subject pattern, recorded by a background task from the moment
/// [`EventTap::subscribe`] returns until the tap is dropped.
pub struct EventTap {
    seen: Arc<Mutex<Vec<Event>>>,
    notify: Arc<Notify>,
    task: JoinHandle<()>,
    timeout: Duration,
}

impl EventTap {
    /// Subscribes to `subject` (such as `ebb.event.node-1.>`). The subscription is flushed, so
    /// every event published after this returns is recorded.
    pub async fn subscribe(nc: &Client, subject: &str) -> EventTap {
        let mut sub = nc
            .subscribe(subject.to_string())
            .await
            .unwrap_or_else(|e| panic!("subscribe to {subject}: {e}"));
        nc.flush()
            .await
            .unwrap_or_else(|e| panic!("flush the subscription to {subject}: {e}"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let task = tokio::spawn({
            let (seen, notify) = (seen.clone(), notify.clone());
            async move {
                while let Some(msg) = sub.next().await {
                    let at = Instant::now();
                    let body = serde_json::from_slice(&msg.payload).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&msg.payload).into_owned())
                    });
                    let msg_id = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.as_str().to_string());
                    lock(&seen).push(Event {
                        subject: msg.subject.to_string(),
                        at,
                        msg_id,
                        body,
                    });
                    notify.notify_waiters();
                }
            }
        });
        EventTap {
            seen,
            notify,
            task,
            timeout: EVENT_TIMEOUT,
        }
    }

    /// The most nodes that were at work at once, in the order the tap saw the messages: a node
    /// starts at the first message `started` names it in, and ends at the first later message
    /// `ended` names it in. For a tap on commands and events, such as `ebb.>`.
    pub fn max_in_flight(
        &self,
        started: impl Fn(&Event) -> Option<String>,
        ended: impl Fn(&Event) -> Option<String>,
    ) -> usize {
        let mut busy = std::collections::BTreeSet::new();
        let mut done = std::collections::BTreeSet::new();
        let mut most = 0;
        for e in self.all() {
            if let Some(node) = ended(&e) {
                if busy.remove(&node) {
                    done.insert(node);
                }
            } else if let Some(node) = started(&e) {
                if !done.contains(&node) {
                    busy.insert(node);
                    most = most.max(busy.len());
                }
            }
        }
        most
    }

    /// Sets the timeout of the waits that take none.
    pub fn with_timeout(mut self, timeout: Duration) -> EventTap {
        self.timeout = timeout;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Every event so far, in arrival order.
    pub fn all(&self) -> Vec<Event> {
        lock(&self.seen).clone()
    }

    pub fn len(&self) -> usize {
        lock(&self.seen).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many events so far satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        lock(&self.seen).iter().filter(|e| pred(e)).count()
    }

    /// Every event of `kind` so far, in arrival order.
    pub fn of_kind(&self, kind: &str) -> Vec<Event> {
        lock(&self.seen)
            .iter()
            .filter(|e| e.kind() == kind)
            .cloned()
            .collect()
    }

    /// Waits for the first event (already seen or to come) that satisfies `pred`; returns its
    /// index in [`EventTap::all`] and the event. Panics after `timeout`, naming `what` and listing
    /// the events seen.
    pub async fn wait_indexed(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> (usize, Event) {
        let found = self
            .try_wait_with(timeout, |seen| {
                seen.iter()
                    .enumerate()
                    .find(|(_, e)| pred(e))
                    .map(|(i, e)| (i, e.clone()))
            })
            .await;
        found.unwrap_or_else(|| self.timed_out(what, timeout))
    }

    /// [`EventTap::wait_indexed`] without the index.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        self.wait_indexed(what, timeout, pred).await.1
    }

    /// [`EventTap::wait_for`] with the tap's timeout.
    pub async fn wait(&self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        self.wait_for(what, self.timeout, pred).await
    }

    /// Waits for the first event of `kind` whose body satisfies `pred`.
    pub async fn wait_kind(&self, kind: &str, pred: impl Fn(&Value) -> bool) -> Event {
        self.wait(&format!("a {kind} event"), |e| {
            e.kind() == kind && pred(&e.body)
        })
        .await
    }

    /// Waits until `n` events of `kind` satisfy `pred`; returns all of them (at least `n`).
    pub async fn wait_n(&self, kind: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Event> {
        let matching = |seen: &[Event]| -> Vec<Event> {
            seen.iter()
                .filter(|e| e.kind() == kind && pred(&e.body))
                .cloned()
                .collect()
        };
        let found = self
            .try_wait_with(self.timeout, |seen| {
                let found = matching(seen);
                (found.len() >= n).then_some(found)
            })
            .await;
        found.unwrap_or_else(|| {
            let got = matching(&lock(&self.seen)).len();
            self.timed_out(&format!("{n} {kind} events (got {got})"), self.timeout)
        })
    }

    /// Waits for the `drained` event of drain `drain_id`.
    pub async fn drained(&self, drain_id: &str) -> Event {
        self.wait_kind("drained", |b| b["drain_id"] == drain_id)
            .await
    }

    /// Like [`EventTap::wait_for`], but `None` on timeout (for "no such event" checks).
    pub async fn try_wait(
        &self,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Option<Event> {
        self.try_wait_with(timeout, |seen| seen.iter().find(|e| pred(e)).cloned())
            .await
    }

    /// Runs `f` on the events seen, again after each new one, until it returns `Some` or
    /// `timeout` passes.
    async fn try_wait_with<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&[Event]) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so an event that lands in between still wakes us.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = f(&lock(&self.seen)) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    fn timed_out(&self, what: &str, timeout: Duration) -> ! {
        let seen = self.all();
        let heartbeats = seen.iter().filter(|e| e.kind() == "heartbeat").count();
        let lines: Vec<String> = seen
            .iter()
            .filter(|e| e.kind() != "heartbeat")
            .map(|e| format!("{}#{} {}", e.kind(), e.seq(), e.body))
            .collect();
        panic!(
            "timed out after {timeout:?} waiting for {what}; events seen ({heartbeats} heartbeats \
             left out):\n{}",
            lines.join("\n")
        )
    }
}

impl Drop for EventTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The events, even if a panicking predicate poisoned the lock: they are only ever appended to.
fn lock(seen: &Mutex<Vec<Event>>) -> MutexGuard<'_, Vec<Event>> {
    seen.lock().unwrap_or_else(PoisonError::into_inner)
}
