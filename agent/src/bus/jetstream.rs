//! The JetStream side of the bus: the `EBB_EVENTS` stream and the `ebb_nodes` KV bucket, created
//! when absent and allowed, with `nats.stream_replicas` replicas. Everything works without
//! JetStream: events then go out as core messages, and the KV node state is skipped.
//!
//! What goes wrong is sorted by what it means for the events waiting in the outbox
//! ([`Resolved`]): a refusal for good (no permission, JetStream off for the account, a stream that
//! does not take the events) makes the publisher fall back to core NATS; a cluster that is
//! electing a leader or lost a server (`503`, "JetStream system temporarily unavailable", a stream
//! offline) makes it wait and retry with the same Msg-Id; a JetStream that does not answer at all
//! is either (it is not enabled on this server, or a cluster is between leaders), and the
//! publisher decides by whether it has had the stream before.

use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self, context::CreateStreamErrorKind, context::GetStreamErrorKind, kv, stream, ErrorCode,
};
use async_nats::Client;

use super::refusals::Refusals;
use crate::config::NatsConfig;

/// How long after its creation a stream's peers may still be catching up: a peer that is not
/// current then is no shortfall. (A peer's `active` cannot tell a dead peer from a slow one: a
/// leader elected after the loss reports it as 0.)
const FRESH_STREAM: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub enum Resolved<T> {
    Ready(T),
    /// JetStream is off, disabled in config, or we may not use it: fall back, and say why once.
    Unavailable(String),
    /// Connected, yet nobody answers the JetStream API (no responders): JetStream is not enabled
    /// on this server. The caller decides by whether it had the stream before (then it may be
    /// back soon: a server restarted without it, a reconnect to the wrong one).
    Unanswered(String),
    /// JetStream is there, but its cluster cannot serve now: the API timed out (a stream or meta
    /// leader being elected) or said so (`503`, a cluster error). Wait and ask again.
    Busy(String),
    /// NATS could not be asked (not connected yet): ask again later.
    Retry(String),
}

/// How a JetStream API request that got no answer is to be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// No responders: no JetStream on this server.
    Unanswered,
    /// Timed out: JetStream listens, its cluster is between leaders.
    Busy,
    /// Not connected, or something local: ask again.
    Retry,
}

/// Sorts a JetStream API request's failure by its kind and whether the client is connected.
/// Pure. (A request denied for permissions also times out: callers rule that out first, from the
/// server's `-ERR` in [`Refusals`].)
pub fn silence(kind: Option<jetstream::context::RequestErrorKind>, connected: bool) -> Silence {
    use jetstream::context::RequestErrorKind;
    match kind {
        _ if !connected => Silence::Retry,
        Some(RequestErrorKind::NoResponders) => Silence::Unanswered,
        Some(RequestErrorKind::TimedOut) => Silence::Busy,
        _ => Silence::Retry,
    }
}

/// The events stream, found or created.
pub struct EventsStream {
    pub js: jetstream::Context,
    /// How the stream found differs from what ebb would create (an operator's choice, kept).
    pub differences: Vec<String>,
    /// Why the stream has fewer (current) replicas than `nats.stream_replicas`, if it does.
    pub replicas: Option<String>,
}

/// The KV bucket, found or created.
pub struct NodeBucket {
    pub store: kv::Store,
    /// Why its stream has fewer (current) replicas than `nats.stream_replicas`, if it does.
    pub replicas: Option<String>,
}

/// The name of the stream behind KV bucket `bucket`.
pub fn bucket_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Finds or creates the events stream (subjects `P.event.>`), with `nats.events_max_age`,
/// `nats.events_duplicate_window` and `nats.stream_replicas`. A stream that exists is used as it
/// is. `refusals` tells a create the server refused for permissions from one that timed out.
pub async fn events_stream(
    client: &Client,
    cfg: &NatsConfig,
    refusals: &Refusals,
) -> Resolved<EventsStream> {
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
        num_replicas: cfg.stream_replicas,
        ..Default::default()
    };
    let wanted = config.clone();
    // Any event subject will do: the stream must take them all.
    let sample = ebb_sdk::subject::event_subject(&cfg.prefix, "n", "drained");
    match ensure_stream(&js, config, refusals).await {
        Resolved::Ready(found)
            if !found
                .config
                .subjects
                .iter()
                .any(|f| subject_matches(f, &sample)) =>
        {
            Resolved::Unavailable(format!(
                "stream {} does not take the events (its subjects are {:?}, not {:?})",
                found.config.name, found.config.subjects, wanted.subjects
            ))
        }
        Resolved::Ready(found) => Resolved::Ready(EventsStream {
            js,
            differences: differences(&wanted, &found.config),
            replicas: replica_shortfall(&found, cfg.stream_replicas, unix_now()),
        }),
        Resolved::Unavailable(why) => Resolved::Unavailable(why),
        Resolved::Unanswered(why) => Resolved::Unanswered(why),
        Resolved::Busy(why) => Resolved::Busy(why),
        Resolved::Retry(why) => Resolved::Retry(why),
    }
}

/// Seconds since the Unix epoch, for [`replica_shortfall`].
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The replica shortfall of stream `name` as the server reports it now; `None` when it cannot be
/// asked (the caller keeps what it knew). One `STREAM.INFO`, answered by the stream's leader.
pub async fn replicas_now(client: &Client, name: &str, wanted: usize) -> Option<Option<String>> {
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(2));
    match js.get_stream(name).await {
        Ok(stream) => Some(replica_shortfall(stream.cached_info(), wanted, unix_now())),
        Err(e) => {
            tracing::debug!("cannot ask stream {name} for its replicas: {e}");
            None
        }
    }
}

/// Why stream `info` has fewer replicas, or fewer current ones, than `wanted`
/// (`nats.stream_replicas`); `None` when it has them all. Pure, from the stream info's config
/// and cluster section, `now` in seconds since the Unix epoch.
pub fn replica_shortfall(info: &stream::Info, wanted: usize, now: i64) -> Option<String> {
    let name = &info.config.name;
    let configured = info.config.num_replicas.max(1);
    if configured < wanted {
        let fix = if info.cluster.as_ref().is_none_or(|c| c.name.is_none()) {
            format!(
                "the NATS server is not clustered; run a JetStream cluster of at least {wanted} \
                 servers, or set nats.stream_replicas = {configured}"
            )
        } else {
            format!(
                "ebb keeps a stream that exists as it is; raise it (nats stream edit {name} \
                 --replicas {wanted}) or set nats.stream_replicas = {configured}"
            )
        };
        return Some(format!(
            "stream {name} has {configured} replica(s) where nats.stream_replicas is {wanted}: \
             {fix}"
        ));
    }
    if configured == 1 {
        return None;
    }
    let cluster = info.cluster.as_ref()?;
    if cluster.leader.as_deref().is_none_or(str::is_empty) {
        return Some(format!(
            "stream {name} has no leader ({configured} replicas): its cluster is electing one or \
             lost its majority; events wait in the outbox meanwhile; check the NATS servers"
        ));
    }
    let fresh = now - info.created.unix_timestamp() < FRESH_STREAM.as_secs() as i64;
    let missing: Vec<&str> = cluster
        .replicas
        .iter()
        .filter(|p| p.offline || (!p.current && !fresh))
        .map(|p| p.name.as_str())
        .collect();
    // The leader is not in `replicas`; a peer the group dropped is in neither.
    let listed = 1 + cluster.replicas.len();
    let current = listed - missing.len();
    if current >= configured {
        return None;
    }
    let mut gone = missing.join(", ");
    if listed < configured {
        if !gone.is_empty() {
            gone.push_str(", ");
        }
        gone.push_str(&format!("{} unlisted", configured - listed));
    }
    Some(format!(
        "stream {name} has {current} of {configured} replicas current (not: {gone}); it holds \
         while a majority is up; bring the NATS server(s) back"
    ))
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

/// Finds or creates the KV bucket, with `nats.stream_replicas`. Its stream is created directly
/// rather than through `create_key_value`, which cannot parse nats-server 2.9's account info.
pub async fn node_bucket(
    client: &Client,
    cfg: &NatsConfig,
    refusals: &Refusals,
) -> Resolved<NodeBucket> {
    if cfg.state_bucket.is_empty() {
        return Resolved::Unavailable("nats.state_bucket is \"\"".into());
    }
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(2));
    let bucket = &cfg.state_bucket;
    let config = stream::Config {
        name: bucket_stream(bucket),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: cfg.heartbeat.0 * 3,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        storage: stream::StorageType::File,
        num_replicas: cfg.stream_replicas,
        ..Default::default()
    };
    match ensure_stream(&js, config, refusals).await {
        Resolved::Ready(found) => match js.get_key_value(bucket.as_str()).await {
            Ok(store) => Resolved::Ready(NodeBucket {
                store,
                replicas: replica_shortfall(&found, cfg.stream_replicas, unix_now()),
            }),
            Err(e) => Resolved::Unavailable(format!("KV bucket {bucket}: {e}")),
        },
        Resolved::Unavailable(why) => Resolved::Unavailable(why),
        Resolved::Unanswered(why) => Resolved::Unanswered(why),
        Resolved::Busy(why) => Resolved::Busy(why),
        Resolved::Retry(why) => Resolved::Retry(why),
    }
}

/// How a JetStream API error answered by the server is to be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiError {
    /// The cluster is busy (electing, a server gone, a stream offline): ask again later.
    Transient,
    /// Creating with this many replicas is refused (a server that is not clustered, too few
    /// servers for the placement): create with fewer.
    TooManyReplicas,
    /// Anything else: the server said no.
    Refused,
}

/// Sorts a JetStream API error by its HTTP-like `code` and its `err_code`. Pure.
pub fn api_error(code: usize, err_code: ErrorCode) -> ApiError {
    // "stream is offline" (10118) is newer than async-nats' list of codes.
    const STREAM_OFFLINE: ErrorCode = ErrorCode(10118);
    match err_code {
        ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED | ErrorCode::CLUSTER_NO_PEERS => {
            ApiError::TooManyReplicas
        }
        ErrorCode::CLUSTER_NOT_AVAILABLE
        | ErrorCode::CLUSTER_NOT_LEADER
        | ErrorCode::CLUSTER_NOT_ACTIVE
        | ErrorCode::CLUSTER_INCOMPLETE
        | ErrorCode::CLUSTER_NOT_ASSIGNED
        | ErrorCode::RAFT_GENERAL
        | STREAM_OFFLINE => ApiError::Transient,
        // 503: "JetStream system temporarily unavailable" and its kin, whatever the err_code.
        _ if code == 503 => ApiError::Transient,
        _ => ApiError::Refused,
    }
}

/// The stream as it is on the server, created from `config` when absent.
async fn ensure_stream(
    js: &jetstream::Context,
    config: stream::Config,
    refusals: &Refusals,
) -> Resolved<stream::Info> {
    let name = config.name.clone();
    let connected = || js.client().connection_state() == async_nats::connection::State::Connected;
    let started = Instant::now();
    match js.get_stream(&name).await {
        Ok(stream) => Resolved::Ready(stream.cached_info().clone()),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(err)
                if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                create_stream(js, config, refusals).await
            }
            GetStreamErrorKind::JetStream(err) => match api_error(err.code(), err.error_code()) {
                ApiError::Transient => Resolved::Busy(format!("stream {name}: {err}")),
                _ => Resolved::Unavailable(format!("stream {name}: {err}")),
            },
            GetStreamErrorKind::Request
                if refusals.refused_since(&api_subject("STREAM.INFO", &name), started) =>
            {
                Resolved::Unavailable(format!(
                    "cannot look up stream {name}: the agent's NATS user may not publish to {}; \
                     grant it",
                    api_subject("STREAM.INFO", &name)
                ))
            }
            GetStreamErrorKind::Request => {
                let kind = std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<jetstream::context::RequestError>())
                    .map(|r| r.kind());
                match silence(kind, connected()) {
                    Silence::Unanswered => {
                        Resolved::Unanswered(format!("JetStream does not answer ({e})"))
                    }
                    Silence::Busy => Resolved::Busy(format!(
                        "stream {name}: JetStream did not answer in time ({e})"
                    )),
                    Silence::Retry => Resolved::Retry(format!("stream {name}: {e}")),
                }
            }
            _ => Resolved::Retry(format!("stream {name}: {e}")),
        },
    }
}

/// Creates the stream, with fewer replicas when the server refuses as many as configured (a
/// server that is not clustered, a cluster with fewer servers): events then still flow, and the
/// shortfall is reported by [`replica_shortfall`].
async fn create_stream(
    js: &jetstream::Context,
    mut config: stream::Config,
    refusals: &Refusals,
) -> Resolved<stream::Info> {
    let name = config.name.clone();
    let wanted = config.num_replicas;
    loop {
        let started = Instant::now();
        let e = match js.create_stream(config.clone()).await {
            Ok(stream) => {
                tracing::info!(
                    "created JetStream stream {name} with {} replica(s)",
                    config.num_replicas
                );
                return Resolved::Ready(stream.cached_info().clone());
            }
            Err(e) => e,
        };
        if let CreateStreamErrorKind::JetStream(err) = e.kind() {
            if api_error(err.code(), err.error_code()) == ApiError::TooManyReplicas
                && config.num_replicas > 1
            {
                // A single server refuses any replicas; a cluster, more than it has servers.
                config.num_replicas =
                    if err.error_code() == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED {
                        1
                    } else {
                        config.num_replicas - 1
                    };
                tracing::debug!(
                    "stream {name} cannot have {wanted} replicas ({err}); trying {}",
                    config.num_replicas
                );
                continue;
            }
        }
        // Another agent may have created it meanwhile.
        if let Ok(stream) = js.get_stream(&name).await {
            return Resolved::Ready(stream.cached_info().clone());
        }
        let create = api_subject("STREAM.CREATE", &name);
        return match e.kind() {
            _ if refusals.refused_since(&create, started) => Resolved::Unavailable(format!(
                "cannot create stream {name}: the agent's NATS user may not publish to {create}; \
                 grant it, or create the stream yourself"
            )),
            CreateStreamErrorKind::JetStream(err) => {
                match api_error(err.code(), err.error_code()) {
                    ApiError::Transient => {
                        Resolved::Busy(format!("cannot create stream {name} yet: {err}"))
                    }
                    _ => Resolved::Unavailable(format!("cannot create stream {name}: {e}")),
                }
            }
            CreateStreamErrorKind::JetStreamUnavailable => {
                Resolved::Unanswered(format!("cannot create stream {name}: {e}"))
            }
            CreateStreamErrorKind::TimedOut => {
                Resolved::Busy(format!("cannot create stream {name} yet: {e}"))
            }
            _ => Resolved::Unavailable(format!("cannot create stream {name}: {e}")),
        };
    }
}

/// The subject of JetStream API request `verb` on stream `name` (the account's own JetStream,
/// default prefix `$JS.API`), as a permissions violation names it.
fn api_subject(verb: &str, name: &str) -> String {
    format!("$JS.API.{verb}.{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `created` of [`info`]'s streams (2026-01-01T00:00:00Z), and a minute later.
    const CREATED: i64 = 1_767_225_600;
    const LATER: i64 = CREATED + 60;

    /// A stream info as nats-server sends it: `replicas` configured, `cluster` as given.
    fn info(replicas: usize, cluster: serde_json::Value) -> stream::Info {
        let mut info = json!({
            "config": {"name": "EBB_EVENTS", "subjects": ["ebb.event.>"], "num_replicas": replicas,
                       "retention": "limits", "storage": "file", "discard": "old",
                       "max_consumers": -1, "max_msgs": -1, "max_bytes": -1, "max_age": 0,
                       "max_msg_size": -1},
            "created": "2026-01-01T00:00:00Z",
            "state": {"messages": 0, "bytes": 0, "first_seq": 0, "first_ts": "0001-01-01T00:00:00Z",
                      "last_seq": 0, "last_ts": "0001-01-01T00:00:00Z", "consumer_count": 0},
        });
        if !cluster.is_null() {
            info["cluster"] = cluster;
        }
        serde_json::from_value(info).expect("a stream info")
    }

    fn peer(name: &str, current: bool, active_ms: u64, offline: bool) -> serde_json::Value {
        json!({"name": name, "current": current, "active": active_ms * 1_000_000, "offline": offline})
    }

    #[test]
    fn api_errors_are_sorted_into_wait_fewer_replicas_and_refused() {
        // Seen from nats-server 2.9 and 2.15: a single server refuses replicas (500, 10074), a
        // 3-server cluster refuses 5 (400, 10005).
        assert_eq!(api_error(500, ErrorCode(10074)), ApiError::TooManyReplicas);
        assert_eq!(api_error(400, ErrorCode(10005)), ApiError::TooManyReplicas);
        for code in [10008, 10009, 10006, 10004, 10007, 10041, 10118] {
            assert_eq!(
                api_error(500, ErrorCode(code)),
                ApiError::Transient,
                "{code}"
            );
        }
        assert_eq!(api_error(503, ErrorCode(10999)), ApiError::Transient);
        // No permission for the account, a stream limit, a bad config: said for good.
        for code in [10039, 10076, 10053, 10052, 10054, 10058] {
            assert_eq!(api_error(400, ErrorCode(code)), ApiError::Refused, "{code}");
        }
    }

    #[test]
    fn an_api_that_does_not_answer_is_absent_or_busy() {
        use jetstream::context::RequestErrorKind as K;
        assert_eq!(silence(Some(K::NoResponders), true), Silence::Unanswered);
        assert_eq!(silence(Some(K::TimedOut), true), Silence::Busy);
        assert_eq!(silence(Some(K::Other), true), Silence::Retry);
        assert_eq!(silence(None, true), Silence::Retry);
        for kind in [K::NoResponders, K::TimedOut] {
            assert_eq!(silence(Some(kind), false), Silence::Retry, "{kind:?}");
        }
    }

    #[test]
    fn replicas_are_short_when_fewer_configured_or_fewer_current() {
        // A single server: no cluster section at all.
        let w = replica_shortfall(&info(1, serde_json::Value::Null), 3, LATER).expect("short");
        assert!(
            w.contains("stream EBB_EVENTS has 1 replica(s) where nats.stream_replicas is 3")
                && w.contains("not clustered"),
            "{w}"
        );
        assert_eq!(
            replica_shortfall(&info(1, serde_json::Value::Null), 1, LATER),
            None
        );
        // A cluster, the stream made with fewer: kept, and said so with the fix.
        let c = json!({"name": "c", "leader": "n0", "replicas": [peer("n1", true, 0, false)]});
        let w = replica_shortfall(&info(2, c.clone()), 3, LATER).expect("short");
        assert!(
            w.contains("has 2 replica(s)") && w.contains("--replicas 3"),
            "{w}"
        );
        assert_eq!(replica_shortfall(&info(2, c), 2, LATER), None);
        // All three current; one catching up right after creation: no shortfall yet.
        let c = json!({"name": "c", "leader": "n0",
                       "replicas": [peer("n1", true, 0, false), peer("n2", false, 2, false)]});
        assert_eq!(replica_shortfall(&info(3, c.clone()), 3, CREATED + 2), None);
        let w = replica_shortfall(&info(3, c), 3, LATER).expect("short later");
        assert!(w.contains("has 2 of 3 replicas current (not: n2)"), "{w}");
        // A peer not current (its `active` says nothing: 0 after a new leader), or offline.
        let c = json!({"name": "c", "leader": "n0",
                       "replicas": [peer("n1", false, 0, false), peer("n2", true, 0, false)]});
        let w = replica_shortfall(&info(3, c), 3, LATER).expect("short");
        assert!(w.contains("has 2 of 3 replicas current (not: n1)"), "{w}");
        let c = json!({"name": "c", "leader": "n0",
                       "replicas": [peer("n1", true, 0, true), peer("n2", false, 6_000, false)]});
        let w = replica_shortfall(&info(3, c), 3, LATER).expect("short");
        assert!(
            w.contains("has 1 of 3 replicas current (not: n1, n2)"),
            "{w}"
        );
        // A peer the group no longer lists.
        let c = json!({"name": "c", "leader": "n0", "replicas": [peer("n1", true, 0, false)]});
        let w = replica_shortfall(&info(3, c), 3, LATER).expect("short");
        assert!(w.contains("2 of 3") && w.contains("1 unlisted"), "{w}");
        // No leader.
        let c = json!({"name": "c", "replicas": [peer("n1", true, 0, false)]});
        let w = replica_shortfall(&info(3, c), 3, LATER).expect("short");
        assert!(w.contains("has no leader"), "{w}");
    }

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
