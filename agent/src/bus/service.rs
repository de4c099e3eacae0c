//! The NATS side of the command path: the agent registers as the NATS micro service `ebb` (queue
//! group = node id, so every node answers group and fleet requests) with one endpoint per target:
//! `P.node.<id>.*`, `P.group.<g>.*` for each group, and `P.all.*`. Each request whose reply
//! subject the agent may publish to goes on to the [`CommandServer`](super::commands::CommandServer).

use std::time::Instant;

use async_nats::service::ServiceExt;
use async_nats::Client;
use futures::stream::{SelectAll, StreamExt};
use tokio::sync::mpsc;

use super::commands::{Request, Responder};
use super::limits::{self, DroppedReplies};

pub struct CommandService {
    pub client: Client,
    pub prefix: String,
    pub node: String,
    pub groups: Vec<String>,
}

impl CommandService {
    /// Registers the service and passes its requests on, in arrival order. `ready` fires once
    /// the subscriptions are made (and flushed to the server, when it is reachable).
    pub async fn run(
        self,
        requests: mpsc::Sender<Request>,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> anyhow::Result<()> {
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
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.client.flush()).await;
        let _ = ready.send(());

        let mut dropped = DroppedReplies::default();
        while let Some(mut request) = endpoints.next().await {
            if let Some(reply_to) = &request.message.reply {
                if let Some(root) = limits::forbidden_reply_root(reply_to, &self.prefix) {
                    if let Some(count) = dropped.note(root, Instant::now()) {
                        tracing::warn!(
                            dropped = count,
                            "dropped {count} request(s) whose reply subject is under `{root}` \
                             (last: {reply_to} on {}): the agent never publishes there; reply to \
                             an inbox such as _INBOX.>",
                            request.message.subject
                        );
                    }
                    continue;
                }
            }
            let subject = request.message.subject.to_string();
            // Taken out of the request: a responder that waits for the node keeps only where to
            // reply.
            let body = std::mem::take(&mut request.message.payload);
            let request = Request {
                subject,
                body,
                responder: Responder::Nats(Box::new(request)),
            };
            if requests.send(request).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}
