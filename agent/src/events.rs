//! Making events: the envelope of DESIGN §5 (`boot_id`, `seq`, `time`) around each event body.
//! Events are handed to the publisher (the bus and its outbox) and logged.

use std::time::SystemTime;

use ebb_sdk::event::{Event, EventBody};
use tokio::sync::mpsc;

/// Who caused an event: copied from the command that led to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cause {
    pub requester: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug)]
pub struct Emitter {
    node: String,
    boot_id: String,
    seq: u64,
    tx: mpsc::UnboundedSender<Event>,
}

impl Emitter {
    pub fn new(node: &str, boot_id: &str, tx: mpsc::UnboundedSender<Event>) -> Self {
        Emitter {
            node: node.to_string(),
            boot_id: boot_id.to_string(),
            seq: 0,
            tx,
        }
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn emit(&mut self, body: EventBody, cause: &Cause) -> Event {
        self.seq += 1;
        let event = Event {
            v: ebb_sdk::PROTOCOL_VERSION,
            node: self.node.clone(),
            boot_id: self.boot_id.clone(),
            seq: self.seq,
            time: rfc3339(SystemTime::now()),
            requester: cause.requester.clone(),
            reason: cause.reason.clone(),
            body,
        };
        let json = serde_json::to_string(&event).unwrap_or_default();
        tracing::info!(target: "ebb::event", kind = event.kind(), seq = event.seq, event = %json, "event {}", event.kind());
        // The publisher only goes away when the agent shuts down; the log line above remains.
        let _ = self.tx.send(event.clone());
        event
    }
}

impl Emitter {
    /// Sends an event made earlier (by this agent or a previous one) again, with its original
    /// ids: the stream drops it if it already has it.
    pub fn republish(&self, event: Event) {
        tracing::info!(target: "ebb::event", kind = event.kind(), msg_id = %event.msg_id(), "re-sending event {}", event.kind());
        let _ = self.tx.send(event);
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    ebb_sdk::time::format_rfc3339_millis(t)
}

/// The protocol's view of how a worker ended.
pub fn exit_status(exit: crate::haproxy::worker::Exit) -> ebb_sdk::event::ExitStatus {
    match exit {
        crate::haproxy::worker::Exit::Code(c) => ebb_sdk::event::ExitStatus::Code(c),
        crate::haproxy::worker::Exit::Unknown => ebb_sdk::event::ExitStatus::Unknown,
    }
}
