//! The JetStream side of the bus: the `EBB_EVENTS` stream and the `ebb_nodes` KV bucket, created
//! when absent and allowed. Everything works without JetStream: events then go out as core
//! messages, and the KV node state is skipped.

use std::time::Duration;

use async_nats::jetstream::{self, context::GetStreamErrorKind, kv, stream, ErrorCode};
use async_nats::Client;

use crate::config::NatsConfig;

/// How long the events stream keeps events, and how long it remembers Msg-Ids. The outbox may
/// hold an event as long as NATS is away; an event older than `max_age` would be expired by the
/// stream anyway, so deduplicating over the whole of `max_age` covers every redelivery.
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug)]
pub enum Resolved<T> {
    Ready(T),
    /// JetStream is off, disabled in config, or we may not use it: fall back, and say why once.
    Unavailable(String),
    /// NATS could not be asked (not connected yet): ask again later.
    Retry(String),
}

/// Finds or creates the events stream (subjects `P.event.>`).
pub async fn events_stream(client: &Client, cfg: &NatsConfig) -> Resolved<jetstream::Context> {
    if cfg.events_stream.is_empty() {
        return Resolved::Unavailable("nats.events_stream is \"\"".into());
    }
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(2));
    let config = stream::Config {
        name: cfg.events_stream.clone(),
        subjects: vec![ebb_sdk::subject::event_wildcard(&cfg.prefix)],
        max_age: EVENTS_MAX_AGE,
        duplicate_window: EVENTS_MAX_AGE,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    match ensure_stream(&js, config).await {
        Resolved::Ready(()) => Resolved::Ready(js),
        Resolved::Unavailable(why) => Resolved::Unavailable(why),
        Resolved::Retry(why) => Resolved::Retry(why),
    }
}

/// Finds or creates the KV bucket. Its stream is created directly rather than through
/// `create_key_value`, which cannot parse nats-server 2.9's account info.
pub async fn node_bucket(client: &Client, cfg: &NatsConfig) -> Resolved<kv::Store> {
    if cfg.state_bucket.is_empty() {
        return Resolved::Unavailable("nats.state_bucket is \"\"".into());
    }
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(2));
    let bucket = &cfg.state_bucket;
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: cfg.heartbeat.0 * 3,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    match ensure_stream(&js, config).await {
        Resolved::Ready(()) => match js.get_key_value(bucket.as_str()).await {
            Ok(store) => Resolved::Ready(store),
            Err(e) => Resolved::Unavailable(format!("KV bucket {bucket}: {e}")),
        },
        Resolved::Unavailable(why) => Resolved::Unavailable(why),
        Resolved::Retry(why) => Resolved::Retry(why),
    }
}

async fn ensure_stream(js: &jetstream::Context, config: stream::Config) -> Resolved<()> {
    let name = config.name.clone();
    match js.get_stream(&name).await {
        Ok(_) => Resolved::Ready(()),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(err)
                if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                match js.create_stream(config).await {
                    Ok(_) => {
                        tracing::info!("created JetStream stream {name}");
                        Resolved::Ready(())
                    }
                    Err(e) => Resolved::Unavailable(format!("cannot create stream {name}: {e}")),
                }
            }
            GetStreamErrorKind::JetStream(err) => {
                Resolved::Unavailable(format!("stream {name}: {err}"))
            }
            // Connected, yet the JetStream API does not answer: it is not enabled on this
            // server or account. The publisher asks again later.
            GetStreamErrorKind::Request
                if js.client().connection_state() == async_nats::connection::State::Connected =>
            {
                Resolved::Unavailable(format!("JetStream does not answer ({e})"))
            }
            _ => Resolved::Retry(format!("stream {name}: {e}")),
        },
    }
}
