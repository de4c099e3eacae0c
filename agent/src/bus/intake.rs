//! What becomes of a well-formed command before the node sees it: a retry of an answered request
//! gets the first reply, a retry of one in flight joins it, an expired new request is refused, and
//! beyond [`MAX_IN_FLIGHT`](super::limits::MAX_IN_FLIGHT) waiting requests a new one is refused at
//! once. Decisions only; the command server does the I/O.
//!
//! The request-id memory is consulted before the expiry: a client that retries an answered
//! request after its `ttl_ms` gets the answer, not `expired`, so it learns what its first attempt
//! did.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ebb_sdk::command::Command;
use ebb_sdk::reply::{ErrorCode, Reply};

use super::dedupe::{Dedupe, Key};

/// Allowance for clock skew between the sender's `sent_at` and this node's clock.
pub const CLOCK_SKEW: Duration = Duration::from_secs(1);

/// What to do with a command.
#[derive(Debug)]
pub enum Admission<R> {
    /// Hand the command to the node, then give its reply to [`Intake::finish`] with the ticket,
    /// or, if the node cannot take it, call [`Intake::refuse`].
    Forward {
        // Boxed: a push carries a whole haproxy.cfg, the other variants a few words.
        command: Box<Command>,
        responder: R,
        ticket: Ticket,
    },
    /// Send `reply` to `responder` now; the node never sees the command.
    Answer { responder: R, reply: Bytes },
    /// A retry of a request in flight: its responder is among those [`Intake::finish`] returns.
    Joined,
}

/// A forwarded command's place in the intake, handed back with the node's reply.
#[derive(Debug)]
pub struct Ticket {
    key: Option<Key>,
    request_id: Option<String>,
}

impl Ticket {
    /// The command's `request_id`, for a reply made without the node.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

#[derive(Debug)]
pub struct Intake<R> {
    node: String,
    dedupe: Dedupe<R>,
    /// Responders waiting for the node: forwarded commands and the retries that joined them.
    in_flight: usize,
    max_in_flight: usize,
}

impl<R> Intake<R> {
    pub fn new(node: impl Into<String>, max_in_flight: usize, dedupe_bytes: usize) -> Self {
        Intake {
            node: node.into(),
            dedupe: Dedupe::new(dedupe_bytes),
            in_flight: 0,
            max_in_flight,
        }
    }

    /// Responders waiting for the node's answer.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn admit(&mut self, command: Command, responder: R, now: SystemTime) -> Admission<R> {
        let request_id = command.request_id().map(str::to_string);
        let key = request_id.clone().map(|id| (command.verb(), id));
        if let Some(reply) = key.as_ref().and_then(|k| self.dedupe.answered(k)) {
            return Admission::Answer { responder, reply };
        }
        let joining = key.as_ref().is_some_and(|k| self.dedupe.in_progress(k));
        if !joining {
            if let Err(e) = command.check_ttl(now, CLOCK_SKEW) {
                let reply = self.failure(request_id, e.code(), e.to_string());
                // Remembered like any answer, so that a retry hears the same.
                if let Some(key) = key {
                    self.dedupe.complete(key, reply.clone());
                }
                return Admission::Answer { responder, reply };
            }
        }
        if self.in_flight >= self.max_in_flight {
            let reply = self.failure(
                request_id,
                ErrorCode::Conflict,
                format!(
                    "{} requests are in flight on this node; retry later",
                    self.in_flight
                ),
            );
            return Admission::Answer { responder, reply };
        }
        self.in_flight += 1;
        let responder = match &key {
            Some(k) => match self.dedupe.begin(k.clone(), responder) {
                Some(r) => r,
                None => return Admission::Joined,
            },
            None => responder,
        };
        Admission::Forward {
            command: Box::new(command),
            responder,
            ticket: Ticket { key, request_id },
        }
    }

    /// Records the node's reply to a forwarded command; returns the responders that joined it,
    /// which get the same reply.
    pub fn finish(&mut self, ticket: Ticket, reply: Bytes) -> Vec<R> {
        let joined = match ticket.key {
            Some(key) => self.dedupe.complete(key, reply),
            None => Vec::new(),
        };
        self.release(1 + joined.len());
        joined
    }

    /// The node could not take a forwarded command: returns the reply to send (to the command's
    /// responder and to those returned, which joined it), and forgets the request so that a retry
    /// can act.
    pub fn refuse(&mut self, ticket: Ticket, code: ErrorCode, message: &str) -> (Bytes, Vec<R>) {
        let joined = match &ticket.key {
            Some(key) => self.dedupe.abandon(key),
            None => Vec::new(),
        };
        self.release(1 + joined.len());
        (self.failure(ticket.request_id, code, message), joined)
    }

    fn release(&mut self, n: usize) {
        self.in_flight = self.in_flight.saturating_sub(n);
    }

    fn failure(
        &self,
        request_id: Option<String>,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Bytes {
        Bytes::from(Reply::failure(&self.node, request_id, code, message).to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_sdk::command::{DrainRequest, StatusRequest};
    use ebb_sdk::time::format_rfc3339_millis;
    use serde_json::Value;

    fn status(id: Option<&str>) -> Command {
        Command::Status(StatusRequest {
            request_id: id.map(str::to_string),
            ..Default::default()
        })
    }

    fn with_ttl(id: &str, sent: SystemTime, ttl_ms: u64) -> Command {
        Command::Drain(DrainRequest {
            request_id: Some(id.into()),
            sent_at: Some(format_rfc3339_millis(sent)),
            ttl_ms: Some(ttl_ms),
            ..Default::default()
        })
    }

    fn forwarded<R: std::fmt::Debug>(a: Admission<R>) -> (R, Ticket) {
        match a {
            Admission::Forward {
                responder, ticket, ..
            } => (responder, ticket),
            other => panic!("expected Forward, got {other:?}"),
        }
    }

    fn answered<R: std::fmt::Debug>(a: Admission<R>) -> (R, Value) {
        match a {
            Admission::Answer { responder, reply } => (
                responder,
                serde_json::from_slice(&reply).expect("a JSON reply"),
            ),
            other => panic!("expected Answer, got {other:?}"),
        }
    }

    #[test]
    fn a_retry_after_the_ttl_gets_the_first_reply_and_a_new_request_expires() {
        let mut intake = Intake::new("n", 8, 1 << 20);
        let t0 = SystemTime::now();
        let (_, ticket) = forwarded(intake.admit(with_ttl("d1", t0, 1000), 1, t0));
        assert!(intake
            .finish(ticket, Bytes::from_static(b"first"))
            .is_empty());
        // An hour later: the retry is answered, not expired.
        let late = t0 + Duration::from_secs(3600);
        match intake.admit(with_ttl("d1", t0, 1000), 2, late) {
            Admission::Answer { responder, reply } => {
                assert_eq!((responder, &reply[..]), (2, &b"first"[..]));
            }
            other => panic!("{other:?}"),
        }
        // A new request as late is expired, acts not, and a retry of it hears the same.
        let (_, reply) = answered(intake.admit(with_ttl("d2", t0, 1000), 3, late));
        assert_eq!(reply["error"]["code"], "expired", "{reply}");
        assert_eq!(reply["request_id"], "d2");
        let (_, again) = answered(intake.admit(with_ttl("d2", t0, 1000), 4, late));
        assert_eq!(again, reply);
        assert_eq!(intake.in_flight(), 0);
    }

    #[test]
    fn a_retry_of_a_request_in_flight_joins_it_even_after_its_ttl() {
        let mut intake = Intake::new("n", 8, 1 << 20);
        let t0 = SystemTime::now();
        let (first, ticket) = forwarded(intake.admit(with_ttl("d", t0, 10), 1, t0));
        let late = t0 + Duration::from_secs(60);
        assert!(matches!(
            intake.admit(with_ttl("d", t0, 10), 2, late),
            Admission::Joined
        ));
        assert_eq!(intake.in_flight(), 2);
        assert_eq!(first, 1);
        assert_eq!(intake.finish(ticket, Bytes::from_static(b"r")), vec![2]);
        assert_eq!(intake.in_flight(), 0);
    }

    #[test]
    fn ids_are_kept_per_verb() {
        let mut intake = Intake::new("n", 8, 1 << 20);
        let now = SystemTime::now();
        let (_, ticket) = forwarded(intake.admit(status(Some("x")), 1, now));
        intake.finish(ticket, Bytes::from_static(b"status reply"));
        // The same id on drain is a new request.
        forwarded(intake.admit(with_ttl("x", now, 60_000), 2, now));
    }

    #[test]
    fn beyond_the_in_flight_bound_a_request_is_refused_at_once_and_a_retry_can_act() {
        let mut intake = Intake::new("n", 2, 1 << 20);
        let now = SystemTime::now();
        let (_, a) = forwarded(intake.admit(status(Some("a")), 1, now));
        let (_, b) = forwarded(intake.admit(status(None), 2, now));
        for (id, responder) in [(Some("c"), 3), (None, 4), (Some("a"), 5)] {
            let (r, reply) = answered(intake.admit(status(id), responder, now));
            assert_eq!(r, responder);
            assert_eq!(reply["error"]["code"], "conflict", "{reply}");
            let message = reply["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("2 requests are in flight"), "{message}");
            assert_eq!(reply["request_id"], id.map_or(Value::Null, Value::from));
        }
        intake.finish(a, Bytes::from_static(b"a"));
        // The refused `c` was not remembered: its retry acts.
        let (_, c) = forwarded(intake.admit(status(Some("c")), 6, now));
        assert_eq!(intake.in_flight(), 2);
        intake.finish(b, Bytes::new());
        intake.finish(c, Bytes::new());
        assert_eq!(intake.in_flight(), 0);
    }

    #[test]
    fn a_command_the_node_cannot_take_is_forgotten() {
        let mut intake = Intake::new("n", 8, 1 << 20);
        let now = SystemTime::now();
        let (_, ticket) = forwarded(intake.admit(status(Some("s")), 1, now));
        assert!(matches!(
            intake.admit(status(Some("s")), 2, now),
            Admission::Joined
        ));
        let (reply, joined) = intake.refuse(ticket, ErrorCode::Internal, "shutting down");
        assert_eq!(joined, vec![2]);
        let reply: Value = serde_json::from_slice(&reply).expect("JSON");
        assert_eq!(reply["request_id"], "s");
        assert_eq!(reply["error"]["code"], "internal");
        assert_eq!(intake.in_flight(), 0);
        forwarded(intake.admit(status(Some("s")), 3, now));
    }
}
