//! Events: what an agent publishes on `P.event.<node>.<kind>`.
//!
//! Every event is one flat JSON object: the envelope fields (`v`, `kind`, `node`, `boot_id`, `seq`, `time`,
//! optionally `requester` and `reason`) followed by the fields of its kind. It is published with the header
//! `Nats-Msg-Id: <node>.<boot_id>.<seq>` ([`Event::msg_id`]), which JetStream uses to drop duplicates and
//! core subscribers can use the same way: delivery is at least once.
//!
//! Heartbeats are the exception: they go to `P.heartbeat.<node>` ([`Event::subject`] knows), never
//! to the events stream, carry no Msg-Id, and take no `seq` of their own: theirs is the `seq` of the
//! last event the node emitted, so a watcher can tell whether it missed one.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::status::{Blocker, NodeState};
use crate::subject::{event_subject, heartbeat_subject};
use crate::PROTOCOL_VERSION;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Event {
    /// Protocol version: 1.
    pub v: u32,
    /// Node id.
    pub node: String,
    /// UUID made at each agent start. An event sent late (outbox, after a restart) keeps its original one.
    pub boot_id: String,
    /// Starts at 1 for each `boot_id` and grows by 1 per event. A heartbeat takes none of its own: it
    /// carries the `seq` of the node's last event.
    pub seq: u64,
    /// RFC 3339 time the event happened (not when it was sent).
    pub time: String,
    /// `requester` of the command that caused the event.
    // Never sent as null, so the schema (of what the agent writes) does not allow null either.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<String>,
    /// `reason` of the command that caused the event.
    // Never sent as null, so the schema (of what the agent writes) does not allow null either.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `kind` and the kind's own fields, flattened into the same object.
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    /// An event of the current protocol version with no requester or reason.
    pub fn new(
        node: impl Into<String>,
        boot_id: impl Into<String>,
        seq: u64,
        time: impl Into<String>,
        body: EventBody,
    ) -> Event {
        Event {
            v: PROTOCOL_VERSION,
            node: node.into(),
            boot_id: boot_id.into(),
            seq,
            time: time.into(),
            requester: None,
            reason: None,
            body,
        }
    }

    /// The `kind` tag, e.g. `drained`.
    pub fn kind(&self) -> &'static str {
        self.body.kind()
    }

    /// The `Nats-Msg-Id` header value: `<node>.<boot_id>.<seq>`, unique per event and stable across resends.
    pub fn msg_id(&self) -> String {
        format!("{}.{}.{}", self.node, self.boot_id, self.seq)
    }

    /// The subject to publish on: `P.event.<node>.<kind>`, or `P.heartbeat.<node>` for a heartbeat.
    pub fn subject(&self, prefix: &str) -> String {
        match self.body {
            EventBody::Heartbeat { .. } => heartbeat_subject(prefix, &self.node),
            _ => event_subject(prefix, &self.node, self.kind()),
        }
    }
}

/// The kind of an event and its own fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// The agent started.
    AgentStarted {
        version: String,
        /// True when it adopted a HAProxy left running by a previous agent instead of starting one.
        adopted: bool,
        /// Pid of the current worker; `null` when none runs yet.
        pid: Option<u32>,
    },
    /// A reload succeeded: the new worker is ready and the displaced ones were told to finish.
    Reloaded {
        reload_id: String,
        pid: u32,
        old_pids: Vec<u32>,
        duration_ms: u64,
        config_sha256: String,
        /// True when the node is draining: the new worker serves 503 on health checks from the start.
        draining: bool,
        /// True when the reload installed a pushed config (`push`); absent otherwise.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pushed: bool,
    },
    /// A reload failed; the running worker was left untouched.
    ReloadFailed { reload_id: String, error: String },
    /// master-worker mode: the agent attached to HAProxy's master, at start or after the master
    /// was restarted (a new pid). The drain, if any, goes on with the new master's workers.
    MasterAttached {
        pid: u32,
        /// The master the agent knew before; absent at the agent's first attach.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_pid: Option<u32>,
        /// HAProxy's version, as the master reports it.
        version: String,
    },
    /// A worker exited.
    WorkerExited {
        pid: u32,
        role: WorkerRole,
        status: ExitStatus,
        /// True when `hard-stop-after` cut it short (it still exits 0).
        hard_stopped: bool,
        /// Connections it closed on its clients; 0 is the goal.
        connections_cut: u64,
    },
    /// The current worker died unexpectedly; it is restarted with backoff.
    ProxyCrashed { pid: u32, status: ExitStatus },
    /// A drain began.
    DrainStarted {
        drain_id: String,
        min_period_ms: u64,
        /// `null` when the drain has no deadline.
        deadline_ms: Option<u64>,
    },
    /// The node is drained: no old worker is left and no request can be cut. Sent once per drain id,
    /// at least once, always with the same Msg-Id.
    Drained {
        drain_id: String,
        started_at: String,
        drained_at: String,
        duration_ms: u64,
        /// True when declared drained at the deadline (`on_deadline = "force"`) despite blockers.
        forced: bool,
        /// Connections cut during the drain (hard-stopped old workers), never hidden.
        connections_cut: u64,
    },
    /// The drain's deadline passed; these blockers remained.
    DrainDeadlineExceeded {
        drain_id: String,
        blockers: Vec<Blocker>,
    },
    /// The drain was ended by `undrain`; the node serves again.
    Undrained { drain_id: String },
    /// HAProxy was stopped.
    Stopped { connections_cut: u64 },
    /// Periodic sign of life, on `P.heartbeat.<node>`; its `seq` is that of the node's last event.
    Heartbeat { state: NodeState },
    /// A plugin was disabled after hanging again and again; it is not called again until the agent
    /// restarts.
    PluginDisabled {
        /// The plugin's `name` in the configuration.
        name: String,
        /// Why, e.g. "no answer within 2s, 3 times in a row". (Not `reason`: that envelope field is
        /// the reason of the command that caused an event.)
        error: String,
        /// True when its idle check counts as busy from now on (`on_error = "busy"`), so drains wait
        /// until an operator fixes or removes it; false when it counts as idle.
        blocks_drains: bool,
    },
}

impl EventBody {
    /// The `kind` tag as written on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::AgentStarted { .. } => "agent_started",
            EventBody::Reloaded { .. } => "reloaded",
            EventBody::ReloadFailed { .. } => "reload_failed",
            EventBody::MasterAttached { .. } => "master_attached",
            EventBody::WorkerExited { .. } => "worker_exited",
            EventBody::ProxyCrashed { .. } => "proxy_crashed",
            EventBody::DrainStarted { .. } => "drain_started",
            EventBody::Drained { .. } => "drained",
            EventBody::DrainDeadlineExceeded { .. } => "drain_deadline_exceeded",
            EventBody::Undrained { .. } => "undrained",
            EventBody::Stopped { .. } => "stopped",
            EventBody::Heartbeat { .. } => "heartbeat",
            EventBody::PluginDisabled { .. } => "plugin_disabled",
        }
    }
}

/// Which worker exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum WorkerRole {
    /// A worker displaced by a reload.
    Old,
    /// The worker serving new connections.
    Current,
}

/// How a process ended, as written on the wire: its exit code as a JSON integer, or the string `"unknown"`.
///
/// Death by signal N is the integer 128 + N, as shells report it (SIGKILL → 137). `unknown` is for adopted
/// processes: only a parent can read a child's status, and a restarted agent is not HAProxy's parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    Code(i32),
    Unknown,
}

impl ExitStatus {
    /// The status of a process killed by signal `signal`.
    pub fn from_signal(signal: i32) -> ExitStatus {
        ExitStatus::Code(128 + signal)
    }

    /// Converts a status read from a child process.
    #[cfg(unix)]
    pub fn from_std(status: std::process::ExitStatus) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(signal)) => ExitStatus::from_signal(signal),
            // Stopped or continued, not ended: nothing to report as an exit code.
            (None, None) => ExitStatus::Unknown,
        }
    }

    /// The exit code, `None` when unknown.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(code) => Some(code),
            ExitStatus::Unknown => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "{code}"),
            ExitStatus::Unknown => f.write_str("unknown"),
        }
    }
}

impl Serialize for ExitStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ExitStatus::Code(code) => serializer.serialize_i32(*code),
            ExitStatus::Unknown => serializer.serialize_str("unknown"),
        }
    }
}

impl<'de> Deserialize<'de> for ExitStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl de::Visitor<'_> for Visitor {
            type Value = ExitStatus;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"an exit code or "unknown""#)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ExitStatus, E> {
                i32::try_from(v)
                    .map(ExitStatus::Code)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ExitStatus, E> {
                i32::try_from(v)
                    .map(ExitStatus::Code)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ExitStatus, E> {
                match v {
                    "unknown" => Ok(ExitStatus::Unknown),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }

        // `deserialize_any`, because the value is either a number or a string; it also works inside the
        // buffered content that `#[serde(flatten)]` on `Event::body` hands over.
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for ExitStatus {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ExitStatus".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Exit code (death by signal N is 128 + N), or \"unknown\" for an adopted process.",
            "oneOf": [
                {"type": "integer", "format": "int32"},
                {"type": "string", "const": "unknown"}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn envelope(body: EventBody) -> Event {
        Event::new(
            "web-1",
            "6f1c2a8e-0000-4000-8000-000000000001",
            7,
            "2024-05-01T12:00:00.000Z",
            body,
        )
    }

    /// The event's JSON must equal the envelope plus `fields`, and read back to the same event.
    fn assert_wire(body: EventBody, fields: Value) {
        let event = envelope(body);
        let mut expected = json!({
            "v": 1,
            "node": "web-1",
            "boot_id": "6f1c2a8e-0000-4000-8000-000000000001",
            "seq": 7,
            "time": "2024-05-01T12:00:00.000Z",
        });
        if let (Some(map), Some(extra)) = (expected.as_object_mut(), fields.as_object()) {
            map.extend(extra.clone());
        }
        let text = serde_json::to_string(&event).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), event);
        assert_eq!(expected["kind"], event.kind());
    }

    #[test]
    fn every_kind_matches_the_contract() {
        assert_wire(
            EventBody::AgentStarted {
                version: "0.1.0".into(),
                adopted: true,
                pid: Some(42),
            },
            json!({"kind":"agent_started","version":"0.1.0","adopted":true,"pid":42}),
        );
        assert_wire(
            EventBody::AgentStarted {
                version: "0.1.0".into(),
                adopted: false,
                pid: None,
            },
            json!({"kind":"agent_started","version":"0.1.0","adopted":false,"pid":null}),
        );
        assert_wire(
            EventBody::Reloaded {
                reload_id: "r-1".into(),
                pid: 20,
                old_pids: vec![10, 11],
                duration_ms: 34,
                config_sha256: "ab".repeat(32),
                draining: true,
                pushed: false,
            },
            json!({"kind":"reloaded","reload_id":"r-1","pid":20,"old_pids":[10,11],"duration_ms":34,
                   "config_sha256":"ab".repeat(32),"draining":true}),
        );
        assert_wire(
            EventBody::ReloadFailed {
                reload_id: "r-2".into(),
                error: "bind failed".into(),
            },
            json!({"kind":"reload_failed","reload_id":"r-2","error":"bind failed"}),
        );
        assert_wire(
            EventBody::MasterAttached {
                pid: 7,
                previous_pid: Some(5),
                version: "2.8.25".into(),
            },
            json!({"kind":"master_attached","pid":7,"previous_pid":5,"version":"2.8.25"}),
        );
        assert_wire(
            EventBody::MasterAttached {
                pid: 7,
                previous_pid: None,
                version: "2.6.12".into(),
            },
            json!({"kind":"master_attached","pid":7,"version":"2.6.12"}),
        );
        assert_wire(
            EventBody::WorkerExited {
                pid: 10,
                role: WorkerRole::Old,
                status: ExitStatus::Code(0),
                hard_stopped: true,
                connections_cut: 3,
            },
            json!({"kind":"worker_exited","pid":10,"role":"old","status":0,"hard_stopped":true,
                   "connections_cut":3}),
        );
        assert_wire(
            EventBody::WorkerExited {
                pid: 11,
                role: WorkerRole::Current,
                status: ExitStatus::Unknown,
                hard_stopped: false,
                connections_cut: 0,
            },
            json!({"kind":"worker_exited","pid":11,"role":"current","status":"unknown",
                   "hard_stopped":false,"connections_cut":0}),
        );
        assert_wire(
            EventBody::ProxyCrashed {
                pid: 20,
                status: ExitStatus::from_signal(9),
            },
            json!({"kind":"proxy_crashed","pid":20,"status":137}),
        );
        assert_wire(
            EventBody::DrainStarted {
                drain_id: "d-1".into(),
                min_period_ms: 30_000,
                deadline_ms: None,
            },
            json!({"kind":"drain_started","drain_id":"d-1","min_period_ms":30000,"deadline_ms":null}),
        );
        assert_wire(
            EventBody::Drained {
                drain_id: "d-1".into(),
                started_at: "2024-05-01T12:00:00.000Z".into(),
                drained_at: "2024-05-01T12:00:30.012Z".into(),
                duration_ms: 30_012,
                forced: false,
                connections_cut: 0,
            },
            json!({"kind":"drained","drain_id":"d-1","started_at":"2024-05-01T12:00:00.000Z",
                   "drained_at":"2024-05-01T12:00:30.012Z","duration_ms":30012,"forced":false,
                   "connections_cut":0}),
        );
        assert_wire(
            EventBody::DrainDeadlineExceeded {
                drain_id: "d-1".into(),
                blockers: vec![
                    Blocker::OldWorker {
                        pid: 1,
                        age_ms: 2,
                        connections: 3,
                    },
                    Blocker::Plugin {
                        name: "alb".into(),
                        message: "target draining".into(),
                    },
                ],
            },
            json!({"kind":"drain_deadline_exceeded","drain_id":"d-1","blockers":[
                {"kind":"old_worker","pid":1,"age_ms":2,"connections":3},
                {"kind":"plugin","name":"alb","message":"target draining"}]}),
        );
        assert_wire(
            EventBody::Undrained {
                drain_id: "d-1".into(),
            },
            json!({"kind":"undrained","drain_id":"d-1"}),
        );
        assert_wire(
            EventBody::Stopped { connections_cut: 0 },
            json!({"kind":"stopped","connections_cut":0}),
        );
        assert_wire(
            EventBody::Heartbeat {
                state: NodeState::Serving,
            },
            json!({"kind":"heartbeat","state":"serving"}),
        );
        assert_wire(
            EventBody::PluginDisabled {
                name: "alb".into(),
                error: "no answer within 2s, 3 times in a row".into(),
                blocks_drains: true,
            },
            json!({"kind":"plugin_disabled","name":"alb",
                   "error":"no answer within 2s, 3 times in a row","blocks_drains":true}),
        );
    }

    #[test]
    fn requester_and_reason_only_when_set() {
        let mut event = envelope(EventBody::Undrained {
            drain_id: "d-1".into(),
        });
        event.requester = Some("ops".into());
        event.reason = Some("rollback".into());
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["requester"], "ops");
        assert_eq!(value["reason"], "rollback");
        assert_eq!(serde_json::from_value::<Event>(value).unwrap(), event);
    }

    #[test]
    fn ids_and_subject() {
        let event = envelope(EventBody::Heartbeat {
            state: NodeState::Draining,
        });
        assert_eq!(event.kind(), "heartbeat");
        assert_eq!(
            event.msg_id(),
            "web-1.6f1c2a8e-0000-4000-8000-000000000001.7"
        );
        assert_eq!(event.subject("ebb"), "ebb.heartbeat.web-1");
        let undrained = envelope(EventBody::Undrained {
            drain_id: "d".into(),
        });
        assert_eq!(undrained.subject("ebb"), "ebb.event.web-1.undrained");
    }

    #[test]
    fn readers_ignore_new_fields_but_not_bad_ones() {
        let text = r#"{"v":1,"kind":"stopped","node":"n","boot_id":"b","seq":1,
            "time":"2024-05-01T12:00:00.000Z","connections_cut":0,"added_later":[1]}"#;
        assert!(serde_json::from_str::<Event>(text).is_ok());
        let unknown_kind = text.replace("\"stopped\"", "\"exploded\"");
        assert!(serde_json::from_str::<Event>(&unknown_kind).is_err());
        let bad_status = r#"{"v":1,"kind":"proxy_crashed","node":"n","boot_id":"b","seq":1,
            "time":"t","pid":1,"status":"crashed"}"#;
        assert!(serde_json::from_str::<Event>(bad_status).is_err());
    }

    #[test]
    fn exit_status() {
        assert_eq!(ExitStatus::from_signal(15), ExitStatus::Code(143));
        assert_eq!(ExitStatus::Code(1).code(), Some(1));
        assert_eq!(ExitStatus::Unknown.code(), None);
        assert_eq!(ExitStatus::Unknown.to_string(), "unknown");
        assert!(serde_json::from_value::<ExitStatus>(json!(1u64 << 40)).is_err());
        assert_eq!(
            serde_json::from_value::<ExitStatus>(json!(-1)).unwrap(),
            ExitStatus::Code(-1)
        );
    }

    #[cfg(unix)]
    #[test]
    fn exit_status_from_std() {
        use std::os::unix::process::ExitStatusExt;
        // Raw wait statuses: exit code in the high byte, terminating signal in the low bits.
        assert_eq!(
            ExitStatus::from_std(std::process::ExitStatus::from_raw(3 << 8)),
            ExitStatus::Code(3)
        );
        assert_eq!(
            ExitStatus::from_std(std::process::ExitStatus::from_raw(9)),
            ExitStatus::Code(137)
        );
    }
}
