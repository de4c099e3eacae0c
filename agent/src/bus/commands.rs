//! Serving commands: the agent registers as the NATS micro service `ebb` (queue group = node id, so
//! every node answers group and fleet requests) with one endpoint per target: `P.node.<id>.*`,
//! `P.group.<g>.*` for each group, and `P.all.*`.
//!
//! Each request is checked here (size, JSON, verb, expiry, repeated request id) before it reaches
//! the node task; nothing malformed gets further than an error reply.

use std::time::{Duration, SystemTime};

use async_nats::service::{self, ServiceExt};
use async_nats::Client;
use bytes::Bytes;
use ebb_sdk::command::{peek_request_id, Command};
use ebb_sdk::reply::{ErrorCode, Reply};
use futures::stream::{SelectAll, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::dedupe::{Dedupe, Seen};
use crate::inbox::Input;

/// Commands larger than this are refused (a pushed haproxy.cfg is the only large one).
pub const MAX_COMMAND_BYTES: usize = 1 << 20;
/// Allowance for clock skew between the sender's `sent_at` and this node's clock.
pub const CLOCK_SKEW: Duration = Duration::from_secs(1);
/// How many request ids (and their replies) are remembered for deduplication.
const DEDUPE_CAPACITY: usize = 4096;

pub struct CommandServer {
    pub client: Client,
    pub prefix: String,
    pub node: String,
    pub groups: Vec<String>,
    pub inputs: mpsc::Sender<Input>,
}

type Responder = service::Request;

impl CommandServer {
    /// Registers the service and serves requests. `ready` fires once the subscriptions are made
    /// (and flushed to the server, when it is reachable).
    pub async fn run(self, ready: tokio::sync::oneshot::Sender<()>) -> anyhow::Result<()> {
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("node".to_string(), self.node.clone());
        metadata.insert("groups".to_string(), self.groups.join(","));
        let svc = self
            .client
            .service_builder()
            .description("ebb node agent: status, reload, drain, undrain, stop")
            .metadata(metadata)
            .queue_group(&self.node)
            .start(ebb_sdk::subject::SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| anyhow::anyhow!("cannot register the NATS micro service: {e}"))?;
        let mut endpoints = SelectAll::new();
        let mut targets = vec![(
            "node".to_string(),
            ebb_sdk::subject::node_wildcard(&self.prefix, &self.node),
        )];
        for g in &self.groups {
            targets.push((
                format!("group-{g}"),
                ebb_sdk::subject::group_wildcard(&self.prefix, g),
            ));
        }
        targets.push((
            "all".to_string(),
            ebb_sdk::subject::all_wildcard(&self.prefix),
        ));
        for (name, subject) in targets {
            let ep = svc
                .endpoint_builder()
                .name(name)
                .queue_group(&self.node)
                .add(subject.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot subscribe to {subject}: {e}"))?;
            endpoints.push(ep);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
        let _ = ready.send(());

        let mut dedupe: Dedupe<Responder> = Dedupe::new(DEDUPE_CAPACITY);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Bytes)>();
        loop {
            tokio::select! {
                request = endpoints.next() => {
                    let Some(request) = request else { return Ok(()) };
                    self.on_request(request, &mut dedupe, &done_tx).await;
                }
                Some((id, reply)) = done_rx.recv() => {
                    for joined in dedupe.complete(&id, reply.clone()) {
                        respond(&joined, reply.clone()).await;
                    }
                }
            }
        }
    }

    async fn on_request(
        &self,
        request: Responder,
        dedupe: &mut Dedupe<Responder>,
        done: &mpsc::UnboundedSender<(String, Bytes)>,
    ) {
        let subject = request.message.subject.to_string();
        let verb = ebb_sdk::subject::verb_of(&subject).to_string();
        let body = request.message.payload.clone();
        let command = match parse(&verb, &body, SystemTime::now()) {
            Ok(c) => c,
            Err((code, message, request_id)) => {
                let reply = Reply::failure(&self.node, request_id, code, message);
                respond(&request, encode(&reply)).await;
                return;
            }
        };
        let request_id = command.request_id().map(str::to_string);
        let request = match &request_id {
            Some(id) => match dedupe.begin(id, request) {
                (Seen::New, Some(r)) => r,
                (Seen::Replay(reply), Some(r)) => {
                    respond(&r, reply).await;
                    return;
                }
                _ => return,
            },
            None => request,
        };
        let (tx, rx) = oneshot::channel();
        let node = self.node.clone();
        let done = done.clone();
        // Handed to the node here, in arrival order: a drain and the undrain right behind it must
        // reach the node in that order. Only the wait for the reply runs apart, since a reload
        // takes tens of milliseconds and must not hold up the next request.
        let sent = self
            .inputs
            .send(Input::Command { command, reply: tx })
            .await
            .is_ok();
        tokio::spawn(async move {
            let reply = if sent { rx.await.ok() } else { None };
            let reply = reply.unwrap_or_else(|| {
                Reply::failure(
                    &node,
                    request_id.clone(),
                    ErrorCode::Internal,
                    "the agent is shutting down; retry on its successor",
                )
            });
            let bytes = encode(&reply);
            respond(&request, bytes.clone()).await;
            if let Some(id) = request_id {
                let _ = done.send((id, bytes));
            }
        });
    }
}

/// Turns a request into a command, or the error reply's code and message (with the request id,
/// when one could be read, so even a malformed request's reply can be matched to it).
pub fn parse(
    verb: &str,
    body: &[u8],
    now: SystemTime,
) -> Result<Command, (ErrorCode, String, Option<String>)> {
    let fail = |code, message: String| (code, message, peek_request_id(body));
    if body.len() > MAX_COMMAND_BYTES {
        return Err(fail(
            ErrorCode::InvalidRequest,
            format!(
                "request of {} bytes is over the {MAX_COMMAND_BYTES}-byte limit",
                body.len()
            ),
        ));
    }
    let command = Command::parse(verb, body).map_err(|e| fail(e.code(), e.to_string()))?;
    command
        .check_ttl(now, CLOCK_SKEW)
        .map_err(|e| fail(e.code(), e.to_string()))?;
    Ok(command)
}

fn encode(reply: &Reply) -> Bytes {
    serde_json::to_vec(reply)
        .map(Bytes::from)
        .unwrap_or_default()
}

async fn respond(request: &Responder, bytes: Bytes) {
    if let Err(e) = request.respond(Ok(bytes)).await {
        tracing::debug!("cannot send a reply: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_and_fresh_commands() {
        let now = SystemTime::now();
        let old = ebb_sdk::time::format_rfc3339_millis(now - Duration::from_secs(60));
        let body = format!(r#"{{"request_id":"r1","sent_at":"{old}","ttl_ms":1000}}"#);
        let err = parse("status", body.as_bytes(), now).expect_err("expired");
        assert_eq!(err.0, ErrorCode::Expired);
        assert_eq!(err.2.as_deref(), Some("r1"));
        let fresh = ebb_sdk::time::format_rfc3339_millis(now);
        let body = format!(r#"{{"sent_at":"{fresh}","ttl_ms":1000}}"#);
        assert!(parse("status", body.as_bytes(), now).is_ok());
        let err =
            parse("status", br#"{"sent_at":"yesterday","ttl_ms":1}"#, now).expect_err("bad time");
        assert_eq!(err.0, ErrorCode::InvalidRequest);
    }

    #[test]
    fn oversized_malformed_and_unknown_requests() {
        let now = SystemTime::now();
        let big = vec![b' '; MAX_COMMAND_BYTES + 1];
        assert_eq!(
            parse("status", &big, now).expect_err("too big").0,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            parse("status", b"{nope", now).expect_err("json").0,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            parse("status", br#"{"request_id":"x","bogus":1}"#, now)
                .expect_err("unknown field")
                .2
                .as_deref(),
            Some("x")
        );
        assert_eq!(
            parse("explode", b"", now).expect_err("verb").0,
            ErrorCode::UnknownCommand
        );
    }
}
