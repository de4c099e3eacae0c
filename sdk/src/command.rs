//! Request bodies, one struct per verb, and [`Command::parse`].
//!
//! Every field is optional, so an empty body is a valid request. Unknown fields are rejected: a client that
//! misspells `deadline_ms` must hear about it rather than drain a node without a deadline.

use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::reply::ErrorCode;
use crate::subject::{UnknownVerb, Verb};
use crate::time::{format_rfc3339_millis, parse_rfc3339};

/// Why a command cannot be carried out before it is even looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The verb is not one of status, reload, drain, undrain, stop.
    #[error("unknown command `{0}`, expected one of status, reload, drain, undrain, stop, push")]
    UnknownVerb(String),
    /// The body does not fit the verb: not JSON, an unknown field, a wrong type or a bad value.
    /// The message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The command arrived after `sent_at + ttl_ms` plus the allowed clock skew.
    #[error("{0}")]
    Expired(String),
}

impl CommandError {
    /// The reply error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            CommandError::UnknownVerb(_) => ErrorCode::UnknownCommand,
            CommandError::Invalid(_) => ErrorCode::InvalidRequest,
            CommandError::Expired(_) => ErrorCode::Expired,
        }
    }
}

impl From<UnknownVerb> for CommandError {
    fn from(UnknownVerb(verb): UnknownVerb) -> Self {
        CommandError::UnknownVerb(verb)
    }
}

/// Longest `request_id` and `drain_id`, in bytes. Both are 1 to this many bytes of printable ASCII without
/// spaces ([`is_valid_id`]): they are echoed in replies and copied into events, logs and the state file.
pub const MAX_ID_BYTES: usize = 128;
/// Longest `requester`, in bytes of UTF-8.
pub const MAX_REQUESTER_BYTES: usize = 256;
/// Longest `reason`, in bytes of UTF-8.
pub const MAX_REASON_BYTES: usize = 1024;
/// The longest `signature` of a push: an ed25519 signature is 86 characters of base64url.
pub const MAX_SIGNATURE_BYTES: usize = 256;

/// True for a valid `request_id` or `drain_id`: 1 to [`MAX_ID_BYTES`] bytes of printable ASCII, no spaces.
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_BYTES).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The fields common to every request.
pub trait Request {
    /// The verb this request belongs to.
    fn verb(&self) -> Verb;
    /// A repeated id gets the first reply again and the command acts only once.
    fn request_id(&self) -> Option<&str>;
    /// RFC 3339 time the client sent the command; with `ttl_ms` it bounds how late it may act.
    fn sent_at(&self) -> Option<&str>;
    fn ttl_ms(&self) -> Option<u64>;
    /// Who asked; copied into the events the command causes.
    fn requester(&self) -> Option<&str>;
    /// Why; copied into the events the command causes.
    fn reason(&self) -> Option<&str>;

    /// Refuses the command as `expired` when it arrives after `sent_at + ttl_ms + skew`.
    /// `skew` is the clock difference between client and agent that is tolerated.
    fn check_ttl(&self, now: SystemTime, skew: Duration) -> Result<(), CommandError> {
        match (self.sent_at(), self.ttl_ms()) {
            (Some(sent_at), Some(ttl_ms)) => check_ttl(sent_at, ttl_ms, now, skew),
            (None, Some(_)) => Err(CommandError::Invalid("ttl_ms: needs sent_at".into())),
            _ => Ok(()),
        }
    }
}

/// Refuses a command sent at `sent_at` (RFC 3339) with a time to live of `ttl_ms` when `now` is past
/// `sent_at + ttl_ms + skew`. A `sent_at` in the future is accepted: that is clock skew, not age.
pub fn check_ttl(
    sent_at: &str,
    ttl_ms: u64,
    now: SystemTime,
    skew: Duration,
) -> Result<(), CommandError> {
    let sent =
        parse_rfc3339(sent_at).map_err(|e| CommandError::Invalid(format!("sent_at: {e}")))?;
    let age = now.duration_since(sent).unwrap_or_default();
    let allowed = Duration::from_millis(ttl_ms).saturating_add(skew);
    if age > allowed {
        return Err(CommandError::Expired(format!(
            "sent at {sent_at} with ttl_ms {ttl_ms}, received at {} ({} ms late, {} ms of clock skew allowed)",
            format_rfc3339_millis(now),
            (age - allowed).as_millis(),
            skew.as_millis(),
        )));
    }
    Ok(())
}

/// Declares a request struct with the common fields followed by the verb's own fields.
///
/// The common fields are repeated in each struct, not `#[serde(flatten)]`ed, because serde's flatten
/// disables `deny_unknown_fields`.
macro_rules! request {
    (
        $(#[$meta:meta])*
        $name:ident => $verb:expr;
        { $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Idempotency key: a repeated id gets the first reply again and the command acts only once.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub request_id: Option<String>,
            /// RFC 3339 time the client sent the command (any offset; UTC recommended).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub sent_at: Option<String>,
            /// With `sent_at`: a command arriving after `sent_at + ttl_ms` (plus clock skew) is `expired`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub ttl_ms: Option<u64>,
            /// Who asked; copied into the events the command causes.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub requester: Option<String>,
            /// Why; copied into the events the command causes.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub reason: Option<String>,
            $(
                $(#[$fmeta])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: $ty,
            )*
        }

        impl Request for $name {
            fn verb(&self) -> Verb {
                $verb
            }
            fn request_id(&self) -> Option<&str> {
                self.request_id.as_deref()
            }
            fn sent_at(&self) -> Option<&str> {
                self.sent_at.as_deref()
            }
            fn ttl_ms(&self) -> Option<u64> {
                self.ttl_ms
            }
            fn requester(&self) -> Option<&str> {
                self.requester.as_deref()
            }
            fn reason(&self) -> Option<&str> {
                self.reason.as_deref()
            }
        }
    };
}

request! {
    /// Body of `status`.
    StatusRequest => Verb::Status; {}
}

request! {
    /// Body of `reload`.
    ReloadRequest => Verb::Reload; {
        /// Refused: a pushed config travels on its own verb, `push`, so that permissions can grant
        /// reload to many and push to few. Kept in the schema only to say so in the error.
        config: Option<String>,
        /// Lowercase hex SHA-256 of the config file on disk as the client expects it; a mismatch
        /// gets `conflict`.
        config_sha256: Option<String>,
    }
}

request! {
    /// Body of `push`: a whole haproxy.cfg to check, install and reload with. `config` and
    /// `config_sha256` are required.
    PushRequest => Verb::Push; {
        /// The full haproxy.cfg text.
        config: Option<String>,
        /// Lowercase hex SHA-256 of the exact bytes of `config`.
        config_sha256: Option<String>,
        /// Unpadded base64url ed25519 signature over
        /// `ebb-push-v1\n<subject>\n<sent_at>\n<config_sha256>` by one of the node's `push.keys`;
        /// required (with `sent_at` and `ttl_ms`) when the node has keys.
        signature: Option<String>,
    }
}

request! {
    /// Body of `drain`.
    DrainRequest => Verb::Drain; {
        /// Id of the drain; generated when absent. A drain's events carry it.
        drain_id: Option<String>,
        /// Floor of the drain in ms, for upstream load balancers to notice; defaults to `[drain] min_period`.
        min_period_ms: Option<u64>,
        /// After this many ms, `drain_deadline_exceeded` is published; defaults to `[drain] deadline`.
        deadline_ms: Option<u64>,
        /// Stop HAProxy gracefully once drained; defaults to `[drain] stop_when_drained`.
        stop_when_drained: Option<bool>,
    }
}

request! {
    /// Body of `undrain`.
    UndrainRequest => Verb::Undrain; {
        /// When given, only this drain is ended; another ongoing drain gets `conflict`.
        drain_id: Option<String>,
    }
}

request! {
    /// Body of `stop`.
    StopRequest => Verb::Stop; {
        /// Grace period before escalation; defaults to `[haproxy] stop_timeout`.
        timeout_ms: Option<u64>,
    }
}

/// A parsed command: the verb with its request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status(StatusRequest),
    Reload(ReloadRequest),
    Drain(DrainRequest),
    Undrain(UndrainRequest),
    Stop(StopRequest),
    Push(PushRequest),
}

impl Command {
    /// Parses the body sent on a command subject whose last token is `verb`.
    ///
    /// An empty or all-whitespace body is the verb's default request. Besides the types, the values are
    /// checked that need no state: timestamps, hashes and non-empty ids.
    pub fn parse(verb: &str, body: &[u8]) -> Result<Command, CommandError> {
        let command = match verb.parse::<Verb>()? {
            Verb::Status => Command::Status(decode(body)?),
            Verb::Reload => Command::Reload(decode(body)?),
            Verb::Drain => Command::Drain(decode(body)?),
            Verb::Undrain => Command::Undrain(decode(body)?),
            Verb::Stop => Command::Stop(decode(body)?),
            Verb::Push => Command::Push(decode(body)?),
        };
        command.validate()?;
        Ok(command)
    }

    /// The default request of `verb` (what an empty body means).
    pub fn default_for(verb: Verb) -> Command {
        match verb {
            Verb::Status => Command::Status(StatusRequest::default()),
            Verb::Reload => Command::Reload(ReloadRequest::default()),
            Verb::Drain => Command::Drain(DrainRequest::default()),
            Verb::Undrain => Command::Undrain(UndrainRequest::default()),
            Verb::Stop => Command::Stop(StopRequest::default()),
            Verb::Push => Command::Push(PushRequest::default()),
        }
    }

    /// The request's common fields.
    pub fn request(&self) -> &dyn Request {
        match self {
            Command::Status(r) => r,
            Command::Reload(r) => r,
            Command::Drain(r) => r,
            Command::Undrain(r) => r,
            Command::Stop(r) => r,
            Command::Push(r) => r,
        }
    }

    pub fn verb(&self) -> Verb {
        self.request().verb()
    }

    pub fn request_id(&self) -> Option<&str> {
        self.request().request_id()
    }

    pub fn sent_at(&self) -> Option<&str> {
        self.request().sent_at()
    }

    /// Sets the idempotency key, e.g. before sending a command that may be retried.
    pub fn set_request_id(&mut self, id: String) {
        let slot = match self {
            Command::Status(r) => &mut r.request_id,
            Command::Reload(r) => &mut r.request_id,
            Command::Drain(r) => &mut r.request_id,
            Command::Undrain(r) => &mut r.request_id,
            Command::Stop(r) => &mut r.request_id,
            Command::Push(r) => &mut r.request_id,
        };
        *slot = Some(id);
    }

    pub fn ttl_ms(&self) -> Option<u64> {
        self.request().ttl_ms()
    }

    pub fn requester(&self) -> Option<&str> {
        self.request().requester()
    }

    pub fn reason(&self) -> Option<&str> {
        self.request().reason()
    }

    /// See [`Request::check_ttl`].
    pub fn check_ttl(&self, now: SystemTime, skew: Duration) -> Result<(), CommandError> {
        self.request().check_ttl(now, skew)
    }

    /// The JSON body to send, e.g. on `subject::node_subject(prefix, node, command.verb().as_str())`.
    pub fn to_vec(&self) -> Vec<u8> {
        // Requests hold only strings, integers and bools, whose encoding cannot fail.
        let encoded = match self {
            Command::Status(r) => serde_json::to_vec(r),
            Command::Reload(r) => serde_json::to_vec(r),
            Command::Drain(r) => serde_json::to_vec(r),
            Command::Undrain(r) => serde_json::to_vec(r),
            Command::Stop(r) => serde_json::to_vec(r),
            Command::Push(r) => serde_json::to_vec(r),
        };
        encoded.unwrap_or_else(|_| b"{}".to_vec())
    }

    fn validate(&self) -> Result<(), CommandError> {
        let invalid = |msg: &str| Err(CommandError::Invalid(msg.to_owned()));
        let request = self.request();
        check_id("request_id", request.request_id())?;
        check_length("requester", request.requester(), MAX_REQUESTER_BYTES)?;
        check_length("reason", request.reason(), MAX_REASON_BYTES)?;
        match (request.sent_at(), request.ttl_ms()) {
            (Some(sent_at), _) => {
                parse_rfc3339(sent_at)
                    .map_err(|e| CommandError::Invalid(format!("sent_at: {e}")))?;
            }
            (None, Some(_)) => return invalid("ttl_ms: needs sent_at"),
            (None, None) => {}
        }
        match self {
            Command::Reload(r) => {
                if r.config.is_some() {
                    return invalid(
                        "config: a reload no longer carries a config; send it with the `push` verb \
                         (same subject, last token `push`), which the node allows with push.enabled",
                    );
                }
                if let Some(hash) = &r.config_sha256 {
                    if !is_sha256_hex(hash) {
                        return invalid("config_sha256: expected 64 lowercase hex digits");
                    }
                }
            }
            Command::Push(r) => {
                match r.config.as_deref() {
                    None => return invalid("config: required (the haproxy.cfg text to install)"),
                    Some("") => return invalid("config: must not be empty"),
                    Some(_) => {}
                }
                match &r.config_sha256 {
                    None => {
                        return invalid(
                            "config_sha256: required (the lowercase hex SHA-256 of config's bytes)",
                        )
                    }
                    Some(hash) if !is_sha256_hex(hash) => {
                        return invalid("config_sha256: expected 64 lowercase hex digits")
                    }
                    Some(_) => {}
                }
                if let Some(sig) = &r.signature {
                    if sig.is_empty() || sig.len() > MAX_SIGNATURE_BYTES {
                        return invalid(&format!(
                            "signature: 1 to {MAX_SIGNATURE_BYTES} bytes of unpadded base64url expected"
                        ));
                    }
                }
            }
            Command::Drain(DrainRequest { drain_id, .. })
            | Command::Undrain(UndrainRequest { drain_id, .. }) => {
                check_id("drain_id", drain_id.as_deref())?;
            }
            Command::Status(_) | Command::Stop(_) => {}
        }
        Ok(())
    }
}

macro_rules! into_command {
    ($($variant:ident($request:ident)),*) => {
        $(impl From<$request> for Command {
            fn from(request: $request) -> Command {
                Command::$variant(request)
            }
        })*
    };
}

into_command!(
    Status(StatusRequest),
    Reload(ReloadRequest),
    Drain(DrainRequest),
    Undrain(UndrainRequest),
    Stop(StopRequest),
    Push(PushRequest)
);

/// Reads `request_id` from a body that may not parse as its verb's request, so that even a refusal can
/// echo the id back. Any other content is ignored, and so is an id that is not valid ([`is_valid_id`]):
/// a reply never carries one back.
pub fn peek_request_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        request_id: Option<String>,
    }
    serde_json::from_slice::<Peek>(body)
        .ok()?
        .request_id
        .filter(|id| is_valid_id(id))
}

fn check_id(field: &str, id: Option<&str>) -> Result<(), CommandError> {
    match id {
        Some(id) if !is_valid_id(id) => Err(CommandError::Invalid(format!(
            "{field}: must be 1 to {MAX_ID_BYTES} bytes of printable ASCII without spaces (got {} bytes{})",
            id.len(),
            if id.bytes().all(|b| b.is_ascii_graphic()) { "" } else { ", not all printable ASCII" },
        ))),
        _ => Ok(()),
    }
}

fn check_length(field: &str, value: Option<&str>, max: usize) -> Result<(), CommandError> {
    match value {
        Some(value) if value.len() > max => Err(CommandError::Invalid(format!(
            "{field}: at most {max} bytes of UTF-8 allowed, got {}; shorten it",
            value.len()
        ))),
        _ => Ok(()),
    }
}

/// True for the lowercase hex form of a SHA-256 digest.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn decode<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, CommandError> {
    match body.trim_ascii_start().first() {
        None => return Ok(T::default()),
        // serde would also fill a struct from an array, by position; the protocol only has objects.
        Some(b'{') => {}
        Some(_) => {
            return Err(CommandError::Invalid(
                "expected a JSON object (or an empty body)".into(),
            ))
        }
    }
    let mut json = serde_json::Deserializer::from_slice(body);
    // The path tells which field was wrong; serde_json's own message only says where in the text.
    let value = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // "." is the root and "?" a place that is not a field (e.g. a syntax error): nothing to name.
        CommandError::Invalid(if matches!(path.as_str(), "." | "?") {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        })
    })?;
    // Trailing garbage after the object (`{}x`) is as invalid as a bad field.
    json.end()
        .map_err(|e| CommandError::Invalid(e.to_string()))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_rfc3339;

    fn invalid(verb: &str, body: &str) -> String {
        match Command::parse(verb, body.as_bytes()) {
            Err(e @ CommandError::Invalid(_)) => {
                assert_eq!(e.code(), ErrorCode::InvalidRequest);
                e.to_string()
            }
            other => panic!("{verb} {body}: expected invalid_request, got {other:?}"),
        }
    }

    #[test]
    fn empty_body_is_the_default_request() {
        // A push without its config is refused (below); every other verb has a default request.
        for verb in Verb::ALL.into_iter().filter(|v| *v != Verb::Push) {
            for body in ["", "  \n\t", "{}", " { } "] {
                assert_eq!(
                    Command::parse(verb.as_str(), body.as_bytes()),
                    Ok(Command::default_for(verb)),
                    "{verb} {body:?}"
                );
            }
        }
    }

    #[test]
    fn unknown_verb() {
        let err = Command::parse("kill", b"{}").unwrap_err();
        assert_eq!(err, CommandError::UnknownVerb("kill".into()));
        assert_eq!(err.code(), ErrorCode::UnknownCommand);
        // The verb is checked before the body, so garbage does not hide the real problem.
        assert_eq!(
            Command::parse("Drain", b"not json"),
            Err(CommandError::UnknownVerb("Drain".into()))
        );
    }

    #[test]
    fn every_request_rejects_unknown_fields() {
        for verb in Verb::ALL {
            let msg = invalid(verb.as_str(), r#"{"reason":"x","frobnicate":1}"#);
            assert!(msg.contains("unknown field `frobnicate`"), "{verb}: {msg}");
            // A field of another verb is unknown too.
            let other = if verb == Verb::Stop {
                "drain_id"
            } else {
                "timeout_ms"
            };
            let msg = invalid(verb.as_str(), &format!(r#"{{"{other}":1}}"#));
            assert!(
                msg.contains(&format!("unknown field `{other}`")),
                "{verb}: {msg}"
            );
        }
    }

    #[test]
    fn every_request_rejects_wrong_types_naming_the_field() {
        let cases = [
            (
                "status",
                r#"{"ttl_ms":"x","sent_at":"2024-05-01T12:00:00Z"}"#,
                "ttl_ms",
            ),
            ("status", r#"{"request_id":7}"#, "request_id"),
            ("reload", r#"{"config":["a"]}"#, "config"),
            ("reload", r#"{"config_sha256":false}"#, "config_sha256"),
            ("drain", r#"{"min_period_ms":-1}"#, "min_period_ms"),
            ("drain", r#"{"deadline_ms":1.5}"#, "deadline_ms"),
            (
                "drain",
                r#"{"stop_when_drained":"yes"}"#,
                "stop_when_drained",
            ),
            ("drain", r#"{"drain_id":{}}"#, "drain_id"),
            ("undrain", r#"{"drain_id":1}"#, "drain_id"),
            ("stop", r#"{"timeout_ms":"30s"}"#, "timeout_ms"),
            ("stop", r#"{"requester":true}"#, "requester"),
            ("stop", r#"{"reason":1}"#, "reason"),
        ];
        for (verb, body, field) in cases {
            let msg = invalid(verb, body);
            assert!(
                msg.starts_with(&format!("{field}: invalid ")),
                "{verb} {body}: {msg}"
            );
        }
    }

    #[test]
    fn rejects_non_objects_and_bad_json() {
        for body in [
            "null",
            "[]",
            "[\"r1\"]",
            "1",
            "\"drain\"",
            "{",
            "{}x",
            "{\"a\" 1}",
        ] {
            let msg = invalid("drain", body);
            assert!(!msg.starts_with('?'), "{body}: {msg}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        let cases = [
            (r#"{"sent_at":"yesterday","ttl_ms":5}"#, "sent_at: "),
            (r#"{"ttl_ms":5}"#, "ttl_ms: needs sent_at"),
            (r#"{"request_id":""}"#, "request_id: "),
            (r#"{"config":""}"#, "config: "),
            (r#"{"config_sha256":"ABC"}"#, "config_sha256: "),
        ];
        for (body, prefix) in cases {
            let msg = invalid("reload", body);
            assert!(msg.starts_with(prefix), "{body}: {msg}");
        }
        assert!(invalid("undrain", r#"{"drain_id":""}"#).starts_with("drain_id: "));
        let upper = format!(r#"{{"config_sha256":"{}"}}"#, "A".repeat(64));
        assert!(invalid("reload", &upper).starts_with("config_sha256: "));
    }

    #[test]
    fn parses_fields() {
        let body = br#"{"request_id":"r1","sent_at":"2024-05-01T12:00:00Z","ttl_ms":5000,
            "requester":"ops","reason":"kernel update","drain_id":"d1","min_period_ms":0,
            "deadline_ms":600000,"stop_when_drained":true}"#;
        let command = Command::parse("drain", body).unwrap();
        assert_eq!(
            command,
            Command::Drain(DrainRequest {
                request_id: Some("r1".into()),
                sent_at: Some("2024-05-01T12:00:00Z".into()),
                ttl_ms: Some(5000),
                requester: Some("ops".into()),
                reason: Some("kernel update".into()),
                drain_id: Some("d1".into()),
                min_period_ms: Some(0),
                deadline_ms: Some(600_000),
                stop_when_drained: Some(true),
            })
        );
        assert_eq!(command.verb(), Verb::Drain);
        assert_eq!(command.request_id(), Some("r1"));
        assert_eq!(command.requester(), Some("ops"));
        assert_eq!(command.reason(), Some("kernel update"));
        assert_eq!(command.ttl_ms(), Some(5000));
        // Explicit nulls mean absent.
        assert_eq!(
            Command::parse("stop", br#"{"timeout_ms":null}"#),
            Ok(Command::default_for(Verb::Stop))
        );
        let hash = "0123456789abcdef".repeat(4);
        let push = Command::parse(
            "push",
            format!(r#"{{"config":"global\n","config_sha256":"{hash}","signature":"c2ln"}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            push,
            Command::Push(PushRequest {
                config: Some("global\n".into()),
                config_sha256: Some(hash.clone()),
                signature: Some("c2ln".into()),
                ..Default::default()
            })
        );
        // A reload no longer carries a config: the error points to `push`.
        let err = Command::parse(
            "reload",
            format!(r#"{{"config":"global\n","config_sha256":"{hash}"}}"#).as_bytes(),
        )
        .expect_err("config on reload");
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
        assert!(err.to_string().contains("`push`"), "{err}");
        // A push needs both its config and its hash.
        for (body, field) in [
            (format!(r#"{{"config_sha256":"{hash}"}}"#), "config:"),
            (r#"{"config":"global\n"}"#.to_string(), "config_sha256:"),
            ("{}".to_string(), "config:"),
        ] {
            let err = Command::parse("push", body.as_bytes()).expect_err("incomplete push");
            assert!(err.to_string().starts_with(field), "{body}: {err}");
        }
    }

    #[test]
    fn body_round_trips_and_omits_absent_fields() {
        let command = Command::from(StopRequest {
            timeout_ms: Some(1000),
            ..Default::default()
        });
        assert_eq!(command.to_vec(), br#"{"timeout_ms":1000}"#);
        assert_eq!(Command::parse("stop", &command.to_vec()), Ok(command));
        assert_eq!(Command::default_for(Verb::Status).to_vec(), b"{}");
    }

    #[test]
    fn ttl() {
        let sent = "2024-05-01T12:00:00Z";
        let t0 = parse_rfc3339(sent).unwrap();
        let skew = Duration::from_millis(500);
        let request = StatusRequest {
            sent_at: Some(sent.into()),
            ttl_ms: Some(1000),
            ..Default::default()
        };
        assert_eq!(request.check_ttl(t0, skew), Ok(()));
        assert_eq!(
            request.check_ttl(t0 + Duration::from_millis(1500), skew),
            Ok(())
        );
        // Sent "in the future" by a fast client clock: not expired.
        assert_eq!(
            request.check_ttl(t0 - Duration::from_secs(60), skew),
            Ok(())
        );
        let err = request
            .check_ttl(t0 + Duration::from_millis(1501), skew)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Expired);
        assert!(err.to_string().contains("1 ms late"), "{err}");
        // Without ttl_ms there is nothing to expire.
        let no_ttl = StatusRequest {
            sent_at: Some(sent.into()),
            ..Default::default()
        };
        assert_eq!(
            no_ttl.check_ttl(t0 + Duration::from_secs(3600), skew),
            Ok(())
        );
        // Offsets other than Z are honoured.
        assert_eq!(
            check_ttl("2024-05-01T14:00:00+02:00", 0, t0, Duration::ZERO),
            Ok(())
        );
    }

    #[test]
    fn bounds_ids_and_free_text() {
        let id = "a".repeat(MAX_ID_BYTES);
        for verb in ["status", "drain", "undrain"] {
            let body = format!(r#"{{"request_id":"{id}"}}"#);
            assert!(Command::parse(verb, body.as_bytes()).is_ok(), "{verb}");
        }
        let body =
            format!(r#"{{"drain_id":"{id}","request_id":"~!#$%&'()*+,-./:;<=>?@[]^_`{{|}}"}}"#);
        assert!(Command::parse("drain", body.as_bytes()).is_ok());
        for field in ["request_id", "drain_id"] {
            let verb = if field == "drain_id" {
                "undrain"
            } else {
                "stop"
            };
            let long = format!(r#"{{"{field}":"{id}a"}}"#);
            let msg = invalid(verb, &long);
            assert!(msg.starts_with(&format!("{field}: ")), "{msg}");
            assert!(msg.contains("128") && msg.contains("129 bytes"), "{msg}");
            for bad in [
                r"with space",
                r"tab\there",
                r"caf\u00e9",
                r"nul\u0000",
                r"\u007f",
            ] {
                let msg = invalid(verb, &format!(r#"{{"{field}":"{bad}"}}"#));
                assert!(msg.starts_with(&format!("{field}: ")), "{bad}: {msg}");
            }
        }
        for (field, max) in [
            ("requester", MAX_REQUESTER_BYTES),
            ("reason", MAX_REASON_BYTES),
        ] {
            // The limit counts bytes, not characters: é is two.
            let at = "é".repeat(max / 2);
            let body = format!(r#"{{"{field}":"{at}"}}"#);
            assert!(Command::parse("drain", body.as_bytes()).is_ok(), "{field}");
            let over = format!(r#"{{"{field}":"{at}x"}}"#);
            let msg = invalid("drain", &over);
            assert!(msg.starts_with(&format!("{field}: ")), "{msg}");
            assert!(msg.contains(&max.to_string()), "{msg}");
        }
    }

    #[test]
    fn peeks_request_id() {
        assert_eq!(
            peek_request_id(br#"{"request_id":"r1","bogus":1}"#),
            Some("r1".into())
        );
        assert_eq!(peek_request_id(br#"{"request_id":1}"#), None);
        assert_eq!(peek_request_id(b"garbage"), None);
        assert_eq!(peek_request_id(b""), None);
        // An id that is itself invalid is never echoed.
        let long = format!(r#"{{"request_id":"{}"}}"#, "x".repeat(MAX_ID_BYTES + 1));
        assert_eq!(peek_request_id(long.as_bytes()), None);
        assert_eq!(peek_request_id(br#"{"request_id":"a b"}"#), None);
        assert_eq!(peek_request_id(br#"{"request_id":""}"#), None);
    }
}
