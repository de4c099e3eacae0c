//! Making events: the envelope every event carries (`v`, `node`, `boot_id`, `seq`, `time`) around
//! its body. Plain data: the node core makes events, the shell hands them to the publisher.
//!
//! `boot_id` + `seq` are given once, here, and never again: the event's Msg-Id is derived from
//! them, so a retry or a resend after a restart is deduplicated by the stream.

use std::time::SystemTime;

use ebb_sdk::event::{Event, EventBody};

/// Who caused an event: copied from the command that led to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cause {
    pub requester: Option<String>,
    pub reason: Option<String>,
}

/// Numbers this agent's events: one sequence per `boot_id`, starting at 1.
#[derive(Debug, Clone)]
pub struct Envelope {
    node: String,
    boot_id: String,
    seq: u64,
}

impl Envelope {
    pub fn new(node: &str, boot_id: &str) -> Self {
        Envelope {
            node: node.to_string(),
            boot_id: boot_id.to_string(),
            seq: 0,
        }
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Wraps `body` as the next event of this agent.
    pub fn wrap(&mut self, body: EventBody, cause: &Cause, wall: SystemTime) -> Event {
        self.seq += 1;
        Event {
            v: ebb_sdk::PROTOCOL_VERSION,
            node: self.node.clone(),
            boot_id: self.boot_id.clone(),
            seq: self.seq,
            time: rfc3339(wall),
            requester: cause.requester.clone(),
            reason: cause.reason.clone(),
            body,
        }
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    ebb_sdk::time::format_rfc3339_millis(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_starts_at_one_and_counts_per_boot() {
        let mut env = Envelope::new("n1", "b1");
        let wall = SystemTime::UNIX_EPOCH;
        let body = || EventBody::Undrained {
            drain_id: "d".into(),
        };
        let a = env.wrap(body(), &Cause::default(), wall);
        let b = env.wrap(body(), &Cause::default(), wall);
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(a.msg_id(), "n1.b1.1");
    }
}
