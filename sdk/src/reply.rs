//! The reply envelope, error codes and the results of `reload`, `drain`, `undrain` and `stop`
//! (the `status` result lives in [`crate::status`]).

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::status::NodeState;

/// Why a command failed. Clients switch on these, so their spelling is part of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not a JSON object of the verb's fields: unknown field, wrong type, bad value.
    InvalidRequest,
    /// The verb (last subject token) is not one of status, reload, drain, undrain, stop.
    UnknownCommand,
    /// Arrived after `sent_at + ttl_ms` (plus the allowed clock skew).
    Expired,
    /// Not allowed by the agent's configuration (e.g. a pushed config without `allow_config_push`).
    Forbidden,
    /// Not possible in the current state (e.g. reload while drained, a `config_sha256` that does not match).
    Conflict,
    /// HAProxy rejected the configuration.
    ConfigInvalid,
    /// The new worker did not become ready; the running worker keeps serving.
    ReloadFailed,
    /// A fault inside the agent.
    Internal,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::Expired => "expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Conflict => "conflict",
            ErrorCode::ConfigInvalid => "config_invalid",
            ErrorCode::ReloadFailed => "reload_failed",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `error` object of a failed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[error("{code}: {message}")]
pub struct ReplyError {
    pub code: ErrorCode,
    /// For humans; may change between versions, so never parse it.
    pub message: String,
}

/// Every reply: `{"ok":true,"node":…,"request_id":…,"result":{…}}` or
/// `{"ok":false,"node":…,"request_id":…,"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Reply {
    pub ok: bool,
    /// Id of the node that answers; fleet requests get one reply per node.
    pub node: String,
    /// The request's `request_id`, `null` when it had none. Always present so clients can rely on it.
    pub request_id: Option<String>,
    /// The verb's result; present exactly when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Present exactly when not `ok`.
    // Never sent as null, so the schema (of what the agent writes) does not allow null either.
    #[cfg_attr(feature = "schema", schemars(with = "ReplyError"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyError>,
}

impl Reply {
    /// A successful reply carrying `result`.
    ///
    /// A result that cannot be represented as JSON (only possible with hand-written `Serialize` impls)
    /// turns into an `internal` failure instead of a panic: the reply must go out either way.
    pub fn success(
        node: impl Into<String>,
        request_id: Option<String>,
        result: impl Serialize,
    ) -> Reply {
        let node = node.into();
        match serde_json::to_value(result) {
            Ok(value) => Reply {
                ok: true,
                node,
                request_id,
                result: Some(value),
                error: None,
            },
            Err(e) => Reply::failure(
                node,
                request_id,
                ErrorCode::Internal,
                format!("cannot encode the result: {e}"),
            ),
        }
    }

    /// A failed reply.
    pub fn failure(
        node: impl Into<String>,
        request_id: Option<String>,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Reply {
        Reply {
            ok: false,
            node: node.into(),
            request_id,
            result: None,
            error: Some(ReplyError {
                code,
                message: message.into(),
            }),
        }
    }

    /// Decodes the result as the verb's result type, e.g. `reply.result_as::<DrainResult>()`.
    /// `None` when the reply has no result (a failure).
    pub fn result_as<T: DeserializeOwned>(&self) -> Option<Result<T, serde_json::Error>> {
        self.result.as_ref().map(T::deserialize)
    }

    /// The reply as JSON bytes, ready to send.
    pub fn to_vec(&self) -> Vec<u8> {
        // A `Reply` holds only strings, bools and `serde_json::Value`s, whose encoding cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Result of `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReloadResult {
    pub reload_id: String,
    /// Pid of the new current worker.
    pub pid: u32,
    /// Workers displaced by this reload; they finish their requests and are tracked until they exit.
    pub old_pids: Vec<u32>,
    pub duration_ms: u64,
    /// Lowercase hex SHA-256 of the configuration now running.
    pub config_sha256: String,
    /// True when the reload installed a pushed config (`push`); absent otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pushed: bool,
}

/// Result of `drain`. It comes at once; progress arrives as events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DrainResult {
    /// The drain's id: the requested one, a generated one, or that of the drain already in progress.
    pub drain_id: String,
    /// True when the node was already draining (or drained): no new drain was started.
    pub already_draining: bool,
    pub state: NodeState,
    /// RFC 3339 time the node became drained; when set, no `drained` event needs to be awaited.
    pub drained_at: Option<String>,
}

/// Result of `undrain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UndrainResult {
    /// The drain that was ended; `null` when the node was not draining.
    pub drain_id: Option<String>,
    pub state: NodeState,
}

/// Result of `stop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StopResult {
    /// Client connections cut by escalation after `timeout_ms`; 0 is the goal.
    pub connections_cut: u64,
    pub duration_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_codes_on_the_wire() {
        let all = [
            (ErrorCode::InvalidRequest, "invalid_request"),
            (ErrorCode::UnknownCommand, "unknown_command"),
            (ErrorCode::Expired, "expired"),
            (ErrorCode::Forbidden, "forbidden"),
            (ErrorCode::Conflict, "conflict"),
            (ErrorCode::ConfigInvalid, "config_invalid"),
            (ErrorCode::ReloadFailed, "reload_failed"),
            (ErrorCode::Internal, "internal"),
        ];
        for (code, text) in all {
            assert_eq!(code.as_str(), text);
            assert_eq!(serde_json::to_value(code).unwrap(), json!(text));
        }
    }

    #[test]
    fn success_shape() {
        let result = DrainResult {
            drain_id: "d-1".into(),
            already_draining: false,
            state: NodeState::Draining,
            drained_at: None,
        };
        let reply = Reply::success("web-1", Some("req-1".into()), &result);
        let value: serde_json::Value = serde_json::from_slice(&reply.to_vec()).unwrap();
        assert_eq!(
            value,
            json!({
                "ok": true,
                "node": "web-1",
                "request_id": "req-1",
                "result": {
                    "drain_id": "d-1",
                    "already_draining": false,
                    "state": "draining",
                    "drained_at": null
                }
            })
        );
        let back: Reply = serde_json::from_value(value).unwrap();
        assert_eq!(back, reply);
        assert_eq!(back.result_as::<DrainResult>().unwrap().unwrap(), result);
    }

    #[test]
    fn failure_shape_keeps_null_request_id() {
        let reply = Reply::failure("web-1", None, ErrorCode::Conflict, "undrain first");
        assert_eq!(
            serde_json::to_value(&reply).unwrap(),
            json!({
                "ok": false,
                "node": "web-1",
                "request_id": null,
                "error": {"code": "conflict", "message": "undrain first"}
            })
        );
        assert!(reply.result_as::<StopResult>().is_none());
        // Readers tolerate a missing request_id.
        let minimal: Reply = serde_json::from_value(json!({"ok": true, "node": "n"})).unwrap();
        assert_eq!(minimal.request_id, None);
        assert_eq!(
            reply.error.as_ref().unwrap().to_string(),
            "conflict: undrain first"
        );
    }

    #[test]
    fn results_shapes() {
        assert_eq!(
            serde_json::to_value(ReloadResult {
                reload_id: "r-1".into(),
                pid: 20,
                old_pids: vec![10],
                duration_ms: 33,
                config_sha256: "00".repeat(32),
                pushed: false,
            })
            .unwrap(),
            json!({"reload_id":"r-1","pid":20,"old_pids":[10],"duration_ms":33,"config_sha256":"00".repeat(32)})
        );
        assert_eq!(
            serde_json::to_value(ReloadResult {
                reload_id: "r-2".into(),
                pid: 21,
                old_pids: vec![20],
                duration_ms: 40,
                config_sha256: "00".repeat(32),
                pushed: true,
            })
            .unwrap()["pushed"],
            json!(true)
        );
        assert_eq!(
            serde_json::to_value(UndrainResult {
                drain_id: None,
                state: NodeState::Serving
            })
            .unwrap(),
            json!({"drain_id":null,"state":"serving"})
        );
        assert_eq!(
            serde_json::to_value(StopResult {
                connections_cut: 0,
                duration_ms: 120
            })
            .unwrap(),
            json!({"connections_cut":0,"duration_ms":120})
        );
    }

    #[test]
    fn unserializable_result_becomes_internal() {
        use std::collections::HashMap;
        // JSON object keys must be strings; a map keyed by tuples cannot be encoded.
        let bad: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
        let reply = Reply::success("web-1", None, bad);
        assert!(!reply.ok);
        assert_eq!(reply.error.unwrap().code, ErrorCode::Internal);
    }
}
