//! The JetStream side of the bus: the `EBB_EVENTS` stream and the `ebb_nodes` KV bucket, created
//! when absent and allowed. Everything works without JetStream: events then go out as core
//! messages, and the KV node state is skipped.

use std::time::Duration;

use async_nats::jetstream::{self, context::GetStreamErrorKind, kv, stream, ErrorCode};
use async_nats::Client;

use crate::config::NatsConfig;

#[derive(Debug)]
pub enum Resolved<T> {
    Ready(T),
    /// JetStream is off, disabled in config, or we may not use it: fall back, and say why once.
    Unavailable(String),
    /// NATS could not be asked (not connected yet): ask again later.
    Retry(String),
}

/// The events stream, found or created.
pub struct EventsStream {
    pub js: jetstream::Context,
    /// How the stream found differs from what ebb would create (an operator's choice, kept).
    pub differences: Vec<String>,
}

/// Finds or creates the events stream (subjects `P.event.>`), with `nats.events_max_age` and
/// `nats.events_duplicate_window`. A stream that exists is used as it is.
pub async fn events_stream(client: &Client, cfg: &NatsConfig) -> Resolved<EventsStream> {
    if cfg.events_stream.is_empty() {
        return Resolved::Unavailable("nats.events_stream is \"\"".into());
    }
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(2));
    let config = stream::Config {
        name: cfg.events_stream.clone(),
        subjects: vec![ebb_sdk::subject::event_wildcard(&cfg.prefix)],
        max_age: cfg.events_max_age.0,
        duplicate_window: cfg.events_duplicate_window.0,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let wanted = config.clone();
    // Any event subject will do: the stream must take them all.
    let sample = ebb_sdk::subject::event_subject(&cfg.prefix, "n", "drained");
    match ensure_stream(&js, config).await {
        Resolved::Ready(found) if !found.subjects.iter().any(|f| subject_matches(f, &sample)) => {
            Resolved::Unavailable(format!(
                "stream {} does not take the events (its subjects are {:?}, not {:?})",
                found.name, found.subjects, wanted.subjects
            ))
        }
        Resolved::Ready(found) => Resolved::Ready(EventsStream {
            js,
            differences: differences(&wanted, &found),
        }),
        Resolved::Unavailable(why) => Resolved::Unavailable(why),
        Resolved::Retry(why) => Resolved::Retry(why),
    }
}

/// What of `found` differs from `wanted`, in the config keys' terms.
fn differences(wanted: &stream::Config, found: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    let name = &found.name;
    if found.max_age != wanted.max_age {
        out.push(format!(
            "stream {name} has max_age {} where nats.events_max_age is {}",
            humantime::format_duration(found.max_age),
            humantime::format_duration(wanted.max_age)
        ));
    }
    if found.duplicate_window != wanted.duplicate_window {
        out.push(format!(
            "stream {name} has duplicate_window {} where nats.events_duplicate_window is {}",
            humantime::format_duration(found.duplicate_window),
            humantime::format_duration(wanted.duplicate_window)
        ));
    }
    if found.subjects != wanted.subjects {
        out.push(format!(
            "stream {name} has subjects {:?}, not {:?}",
            found.subjects, wanted.subjects
        ));
    }
    out
}

/// Whether NATS subject filter `filter` (with `*` and `>`) matches the literal `subject`.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for f in filter.split('.') {
        match (f, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
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
        Resolved::Ready(_) => match js.get_key_value(bucket.as_str()).await {
            Ok(store) => Resolved::Ready(store),
            Err(e) => Resolved::Unavailable(format!("KV bucket {bucket}: {e}")),
        },
        Resolved::Unavailable(why) => Resolved::Unavailable(why),
        Resolved::Retry(why) => Resolved::Retry(why),
    }
}

/// The stream's config as it is on the server, created from `config` when absent.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Resolved<stream::Config> {
    let name = config.name.clone();
    match js.get_stream(&name).await {
        Ok(stream) => Resolved::Ready(stream.cached_info().config.clone()),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(err)
                if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                match js.create_stream(config.clone()).await {
                    Ok(_) => {
                        tracing::info!("created JetStream stream {name}");
                        Resolved::Ready(config)
                    }
                    // Another agent may have created it meanwhile.
                    Err(e) => match js.get_stream(&name).await {
                        Ok(stream) => Resolved::Ready(stream.cached_info().config.clone()),
                        Err(_) => {
                            Resolved::Unavailable(format!("cannot create stream {name}: {e}"))
                        }
                    },
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

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn filters_match_as_nats_does() {
        let s = "ebb.event.web-1.drained";
        for yes in ["ebb.event.>", ">", "ebb.>", "ebb.*.*.drained", s] {
            assert!(subject_matches(yes, s), "{yes}");
        }
        for no in [
            "ebb.event",
            "ebb.event.*",
            "foo.>",
            "ebb.event.web-1.drained.x",
            "",
        ] {
            assert!(!subject_matches(no, s), "{no}");
        }
    }
}
