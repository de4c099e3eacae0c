//! The command path, whatever the transport: each request is checked here (size, JSON, field
//! bounds, verb), then by the [`Intake`] (repeated request id, expiry, requests in flight), then,
//! for a push, by its signature, before it reaches the node task; nothing malformed or beyond the
//! bounds gets further than an error reply (docs/PROTOCOL.md, "Request bounds").
//!
//! Requests come from the NATS micro service (`bus::service`) and from the local control socket
//! (`control`) into one [`CommandServer`], so both get the same rules and share one memory of
//! request ids: a retry on the socket of a request first sent over NATS acts once.

use std::time::SystemTime;

use async_nats::service;
use bytes::Bytes;
use ebb_sdk::command::{peek_request_id, Command};
use ebb_sdk::reply::{ErrorCode, Reply};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::intake::{Admission, Intake, Ticket};
use super::limits;
use super::push_auth;
use crate::inbox::Input;

/// Longest error message sent back: serde's messages quote the offending text, which a client
/// controls.
const MAX_MESSAGE_BYTES: usize = 1024;

/// How many requests may wait for the command server: transports wait (they stop reading) when
/// it is full, so a flood slows its sender and nothing else.
pub const REQUEST_QUEUE: usize = 256;

pub struct CommandServer {
    pub node: String,
    pub inputs: mpsc::Sender<Input>,
    /// `push.keys`: with any, a push must be signed by one of them for the subject it came on.
    pub push_keys: Vec<String>,
}

/// One request, from any transport.
#[derive(Debug)]
pub struct Request {
    /// The subject it came on; a local request takes the node's own subject for its verb.
    pub subject: String,
    pub body: Bytes,
    pub responder: Responder,
}

/// Where a request's reply goes.
#[derive(Debug)]
pub enum Responder {
    Nats(Box<service::Request>),
    /// The control socket's connection, which writes the reply as one line.
    Local(mpsc::Sender<Bytes>),
}

impl Responder {
    async fn respond(&self, bytes: Bytes) {
        match self {
            Responder::Nats(request) => {
                if let Err(e) = request.respond(Ok(bytes)).await {
                    tracing::debug!("cannot send a reply: {e}");
                }
            }
            // The client may have gone: its reply has nowhere to go.
            Responder::Local(connection) => {
                let _ = connection.try_send(bytes);
            }
        }
    }
}

/// Why a request was refused before it became a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    /// The request's id when it could be read and is valid, so the reply can be matched to it.
    pub request_id: Option<String>,
}

impl CommandServer {
    /// Serves requests until every transport is gone.
    pub async fn run(self, mut requests: mpsc::Receiver<Request>) {
        let mut intake: Intake<Responder> =
            Intake::new(&self.node, limits::MAX_IN_FLIGHT, limits::DEDUPE_BYTES);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Ticket, Bytes)>();
        loop {
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { return };
                    self.on_request(request, &mut intake, &done_tx).await;
                }
                Some((ticket, reply)) = done_rx.recv() => {
                    for joined in intake.finish(ticket, reply.clone()) {
                        joined.respond(reply.clone()).await;
                    }
                }
            }
        }
    }

    async fn on_request(
        &self,
        request: Request,
        intake: &mut Intake<Responder>,
        done: &mpsc::UnboundedSender<(Ticket, Bytes)>,
    ) {
        let Request {
            subject,
            body,
            responder,
        } = request;
        let verb = ebb_sdk::subject::verb_of(&subject);
        let command = match parse(verb, &body) {
            Ok(c) => c,
            Err(refusal) => {
                let reply = Reply::failure(
                    &self.node,
                    refusal.request_id,
                    refusal.code,
                    refusal.message,
                );
                responder.respond(Bytes::from(reply.to_vec())).await;
                return;
            }
        };
        drop(body);
        let (command, responder, ticket) = match intake.admit(command, responder, SystemTime::now())
        {
            Admission::Forward {
                command,
                responder,
                ticket,
            } => (command, responder, ticket),
            Admission::Answer { responder, reply } => {
                responder.respond(reply).await;
                return;
            }
            Admission::Joined => return,
        };
        // Here, where the subject is known: a signature holds for one subject. After the intake,
        // so that a retry of an answered push gets its first reply even once its window closed.
        if let Command::Push(push) = command.as_ref() {
            if let Err(refusal) = push_auth::authorize(
                &self.push_keys,
                &subject,
                push.sent_at.as_deref(),
                push.ttl_ms,
                push.config_sha256.as_deref().unwrap_or_default(),
                push.signature.as_deref(),
                SystemTime::now(),
            ) {
                tracing::warn!(%subject, "push refused: {}", refusal.message);
                let (reply, joined) = intake.refuse(ticket, refusal.code, &refusal.message);
                for r in std::iter::once(&responder).chain(&joined) {
                    r.respond(reply.clone()).await;
                }
                return;
            }
        }
        let (tx, rx) = oneshot::channel();
        // Handed to the node here, in arrival order: a drain and the undrain right behind it must
        // reach the node in that order. Never awaited: a node that is busy must not stop this
        // loop from answering (the in-flight bound keeps commands from filling the queue).
        // Only the wait for the reply runs apart, since a reload takes tens of milliseconds and
        // must not hold up the next request.
        if let Err(e) = self.inputs.try_send(Input::Command {
            command: *command,
            reply: tx,
        }) {
            let (code, message) = match e {
                TrySendError::Full(_) => (
                    ErrorCode::Conflict,
                    "the node's input queue is full; retry later",
                ),
                TrySendError::Closed(_) => (
                    ErrorCode::Internal,
                    "the agent is shutting down; retry on its successor",
                ),
            };
            let (reply, joined) = intake.refuse(ticket, code, message);
            for r in std::iter::once(&responder).chain(&joined) {
                r.respond(reply.clone()).await;
            }
            return;
        }
        let node = self.node.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let reply = rx.await.unwrap_or_else(|_| {
                Reply::failure(
                    &node,
                    ticket.request_id().map(str::to_string),
                    ErrorCode::Internal,
                    "the agent is shutting down; retry on its successor",
                )
            });
            let bytes = Bytes::from(reply.to_vec());
            responder.respond(bytes.clone()).await;
            let _ = done.send((ticket, bytes));
        });
    }
}

/// The subject a local request of `verb` counts as coming on: the node's own, so a push signed
/// for this node holds on the control socket too.
pub fn local_subject(prefix: &str, node: &str, verb: &str) -> String {
    ebb_sdk::subject::node_subject(prefix, node, verb)
}

/// Turns a request into a command, or says why it is refused. Checks what needs no state: the
/// body's size for its verb, its JSON, the fields and their bounds, the verb.
pub fn parse(verb: &str, body: &[u8]) -> Result<Command, Refusal> {
    let refuse = |code, message: String| Refusal {
        code,
        message: clip(message),
        request_id: peek_request_id(body),
    };
    let too_big = |limit: usize| {
        refuse(
            ErrorCode::InvalidRequest,
            format!(
                "request of {} bytes is over the {limit}-byte limit; send less",
                body.len()
            ),
        )
    };
    if let Some(limit) = limits::max_body_bytes(verb) {
        if body.len() > limit {
            return Err(too_big(limit));
        }
    }
    Command::parse(verb, body).map_err(|e| refuse(e.code(), e.to_string()))
}

/// A message cut to [`MAX_MESSAGE_BYTES`] (at a character boundary).
fn clip(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use limits::MAX_REQUEST_BYTES;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    /// A body of exactly `size` bytes: `head`, then spaces, then `}`.
    fn padded(head: &str, size: usize) -> Vec<u8> {
        let mut body = head.as_bytes().to_vec();
        body.resize(size - 1, b' ');
        body.push(b'}');
        body
    }

    #[test]
    fn a_request_may_be_64_kib_and_a_push_what_the_server_allows() {
        let ok = padded(r#"{"request_id":"ok""#, MAX_REQUEST_BYTES);
        assert!(parse("status", &ok).is_ok());
        for verb in ["status", "drain", "undrain", "stop", "reload"] {
            let over = padded(r#"{"request_id":"big""#, MAX_REQUEST_BYTES + 1);
            let err = parse(verb, &over).expect_err("over 64 KiB");
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{verb}");
            assert!(err.message.contains("65536"), "{verb}: {}", err.message);
            assert_eq!(err.request_id.as_deref(), Some("big"));
        }
        let sha = "0".repeat(64);
        let push = padded(
            &format!(r#"{{"config_sha256":"{sha}","config":"global\n""#),
            4 * MAX_REQUEST_BYTES,
        );
        assert!(parse("push", &push).is_ok());
    }

    #[test]
    fn malformed_and_unknown_requests() {
        assert_eq!(
            parse("status", b"{nope").expect_err("json").code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            parse("status", br#"{"request_id":"x","bogus":1}"#)
                .expect_err("unknown field")
                .request_id
                .as_deref(),
            Some("x")
        );
        assert_eq!(
            parse("explode", b"").expect_err("verb").code,
            ErrorCode::UnknownCommand
        );
        // An expired request parses: whether it is a retry decides what it gets.
        let body = br#"{"request_id":"r1","sent_at":"2000-01-01T00:00:00Z","ttl_ms":1}"#;
        assert!(parse("status", body).is_ok());
    }

    #[test]
    fn an_invalid_request_id_is_not_echoed_and_a_valid_one_is() {
        let long = json!({"request_id": "x".repeat(300)}).to_string();
        let err = parse("status", long.as_bytes()).expect_err("300 bytes");
        assert!(err.message.starts_with("request_id: "), "{}", err.message);
        assert!(err.message.contains("128"), "{}", err.message);
        assert_eq!(err.request_id, None);
        let reason = json!({"request_id": "r", "reason": "x".repeat(2000)}).to_string();
        let err = parse("drain", reason.as_bytes()).expect_err("reason");
        assert!(err.message.starts_with("reason: "), "{}", err.message);
        assert!(err.message.contains("1024"), "{}", err.message);
        assert_eq!(err.request_id.as_deref(), Some("r"));
    }

    #[test]
    fn error_messages_are_bounded() {
        let body = format!(r#"{{"{}":1}}"#, "k".repeat(60_000));
        let err = parse("status", body.as_bytes()).expect_err("unknown field");
        assert!(err.message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert_eq!(clip("é".repeat(600)).len(), 1024 + '…'.len_utf8());
    }

    const FIELDS: &[&str] = &[
        "request_id",
        "sent_at",
        "ttl_ms",
        "requester",
        "reason",
        "config",
        "config_sha256",
        "drain_id",
        "min_period_ms",
        "deadline_ms",
        "stop_when_drained",
        "timeout_ms",
    ];

    fn verb() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => prop::sample::select(vec!["status", "reload", "drain", "undrain", "stop"])
                .prop_map(str::to_string),
            1 => ".{0,12}",
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            12 => ".{0,40}",
            2 => "[!-~]{120,136}",
            1 => (60_000usize..70_000, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
            1 => Just("2024-05-01T12:00:00Z".to_string()),
            1 => Just("0123456789abcdef".repeat(4)),
        ]
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            text().prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(FIELDS).prop_map(str::to_string),
            1 => ".{0,16}",
        ]
    }

    /// A request object: known and unknown keys with values of any type.
    fn object() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec((key(), value()), 0..8).prop_map(|kv| {
            let map: Map<String, Value> = kv.into_iter().collect();
            Value::Object(map).to_string().into_bytes()
        })
    }

    /// Nesting far deeper than serde_json's recursion limit, closed or not.
    fn deep() -> impl Strategy<Value = Vec<u8>> {
        (
            1usize..5000,
            prop::sample::select(vec!["[", "{\"a\":"]),
            any::<bool>(),
        )
            .prop_map(|(depth, open, close)| {
                let mut body = br#"{"reason":"#.to_vec();
                body.extend(open.repeat(depth).into_bytes());
                body.extend(b"1");
                if close {
                    let end = if open == "[" { "]" } else { "}" };
                    body.extend(end.repeat(depth).into_bytes());
                    body.push(b'}');
                }
                body
            })
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => prop::collection::vec(any::<u8>(), 0..512),
            6 => object(),
            1 => deep(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Whatever arrives, parse answers without panicking, and what it lets through is within
        /// the bounds, and what it echoes is a valid id.
        #[test]
        fn parse_never_panics_and_keeps_the_bounds(verb in verb(), body in body()) {
            match parse(&verb, &body) {
                Ok(command) => {
                    prop_assert!(verb == "push" || body.len() <= MAX_REQUEST_BYTES);
                    if let Some(id) = command.request_id() {
                        prop_assert!(ebb_sdk::command::is_valid_id(id));
                    }
                    prop_assert!(command.reason().map_or(0, str::len) <= 1024);
                    prop_assert!(command.requester().map_or(0, str::len) <= 256);
                }
                Err(refusal) => {
                    if let Some(id) = &refusal.request_id {
                        prop_assert!(ebb_sdk::command::is_valid_id(id));
                    }
                    prop_assert!(refusal.message.len() <= MAX_MESSAGE_BYTES + 3);
                }
            }
        }
    }
}
