//! Node state, the `status` result, drain blockers and the KV node record.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Lifecycle state of a node.
///
/// serving → draining → drained (→ stopping → stopped); `undrain` returns to serving. Within one drain id
/// the states only move forward. `failed` means HAProxy cannot be kept running (it is being restarted
/// with backoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Starting,
    Serving,
    Draining,
    Drained,
    Stopping,
    Stopped,
    Failed,
}

impl NodeState {
    /// Every state, in lifecycle order.
    pub const ALL: [NodeState; 7] = [
        NodeState::Starting,
        NodeState::Serving,
        NodeState::Draining,
        NodeState::Drained,
        NodeState::Stopping,
        NodeState::Stopped,
        NodeState::Failed,
    ];

    /// The state as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Serving => "serving",
            NodeState::Draining => "draining",
            NodeState::Drained => "drained",
            NodeState::Stopping => "stopping",
            NodeState::Stopped => "stopped",
            NodeState::Failed => "failed",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown node state `{s}`"))
    }
}

/// Result of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StatusResult {
    pub state: NodeState,
    /// Node id.
    pub node: String,
    pub groups: Vec<String>,
    /// UUID made at each agent start; the `boot_id` of this agent's events.
    pub boot_id: String,
    pub agent_version: String,
    pub haproxy: HaproxyStatus,
    /// Displaced workers still finishing their requests, oldest first.
    pub old_workers: Vec<OldWorker>,
    /// The ongoing (or finished, not yet undrained) drain; `null` when not draining.
    pub drain: Option<DrainStatus>,
    pub plugins: Vec<PluginStatus>,
    /// `null` until the first reload.
    pub last_reload: Option<LastReload>,
    /// Problems the agent keeps running into and cannot fix alone, such as a drain command that
    /// HAProxy keeps refusing; each says what failed, on what, and what to do. Absent when empty
    /// (added in protocol 1 without a version bump: older agents never send it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// How long this node lets work take, so that a client waits for a reply as long as the work
    /// may take. Absent from older agents (added in protocol 1 without a version bump).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Events waiting to be accepted by NATS (the outbox). Absent from older agents (added in
    /// protocol 1 without a version bump).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_depth: Option<u64>,
}

/// The node's own limits on work that a reply waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Timeouts {
    /// `haproxy.startup_timeout`: the longest a reload waits for its new worker.
    pub startup_ms: u64,
    /// `haproxy.stop_timeout`: the longest a `stop` without `timeout_ms` takes.
    pub stop_ms: u64,
    /// `push.check_timeout`: the longest `haproxy -c` of a pushed config runs before a push's
    /// reload. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_ms: Option<u64>,
}

/// The HAProxy process tree as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HaproxyStatus {
    /// Pid of the current worker; `null` while none runs.
    pub pid: Option<u32>,
    /// Path of the configuration file.
    pub config: String,
    /// Lowercase hex SHA-256 of the configuration the current worker runs.
    pub config_sha256: Option<String>,
    /// `direct` or `master-worker`.
    pub mode: String,
    /// master-worker mode: the pid of HAProxy's master; absent in direct mode and while no master
    /// answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_pid: Option<u32>,
    /// RFC 3339 start time of the current worker.
    pub started_at: Option<String>,
    /// Restarts after crashes since the agent started.
    pub restarts: u32,
}

/// A displaced worker that has not exited yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OldWorker {
    pub pid: u32,
    pub age_ms: u64,
    /// Open client connections (TCP sockets) it still holds.
    pub connections: u64,
}

/// Progress of a drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DrainStatus {
    pub drain_id: String,
    /// RFC 3339.
    pub started_at: String,
    pub elapsed_ms: u64,
    /// Why the node is not drained yet; empty once drained.
    pub blockers: Vec<Blocker>,
}

/// One reason why a draining node is not drained yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Blocker {
    /// The minimum drain period has not elapsed.
    MinPeriod { remaining_ms: u64 },
    /// A displaced worker is still alive.
    OldWorker {
        pid: u32,
        age_ms: u64,
        connections: u64,
    },
    /// Client connections on the watched frontends (`idle = "connections"`).
    Connections { count: u64 },
    /// Backend sessions plus queued requests (`idle = "sessions"`).
    Sessions { count: u64 },
    /// A new connection arrived less than `quiet_period` ago.
    QuietPeriod { remaining_ms: u64 },
    /// A plugin's idle check says busy (or failed, or timed out).
    Plugin { name: String, message: String },
}

impl Blocker {
    /// The `kind` tag as written on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Blocker::MinPeriod { .. } => "min_period",
            Blocker::OldWorker { .. } => "old_worker",
            Blocker::Connections { .. } => "connections",
            Blocker::Sessions { .. } => "sessions",
            Blocker::QuietPeriod { .. } => "quiet_period",
            Blocker::Plugin { .. } => "plugin",
        }
    }
}

/// A one-line explanation for humans (`ebb ctl status`, logs).
impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::MinPeriod { remaining_ms } => {
                write!(f, "min period: {remaining_ms} ms left")
            }
            Blocker::OldWorker {
                pid,
                age_ms,
                connections,
            } => write!(
                f,
                "old worker {pid}: {connections} connections, {age_ms} ms old"
            ),
            Blocker::Connections { count } => write!(f, "{count} client connections"),
            Blocker::Sessions { count } => write!(f, "{count} backend sessions"),
            Blocker::QuietPeriod { remaining_ms } => {
                write!(f, "quiet period: {remaining_ms} ms left")
            }
            Blocker::Plugin { name, message } => write!(f, "plugin {name}: {message}"),
        }
    }
}

/// A loaded plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PluginStatus {
    pub name: String,
    pub version: String,
    /// False after errors or timeouts of its last call.
    pub healthy: bool,
}

/// Outcome of the latest reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LastReload {
    pub reload_id: String,
    /// RFC 3339.
    pub at: String,
    pub ok: bool,
    pub duration_ms: u64,
    /// Why it failed; absent when `ok`.
    // Never sent as null, so the schema (of what the agent writes) does not allow null either.
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Value stored under the node id in KV bucket `ebb_nodes`, rewritten at every heartbeat and state change.
///
/// The bucket's `max_age` is three heartbeats, so an entry that is gone (or whose `heartbeat_at` is older
/// than that) belongs to a node that is no longer there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NodeRecord {
    pub node: String,
    pub state: NodeState,
    pub groups: Vec<String>,
    pub boot_id: String,
    pub agent_version: String,
    /// RFC 3339 time of the write.
    pub heartbeat_at: String,
    /// Heartbeat interval, so readers can tell a stale record without knowing the agent's config.
    pub heartbeat_ms: u64,
    /// Id of the current drain, `null` when not draining.
    pub drain_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn states_as_strings() {
        for state in NodeState::ALL {
            assert_eq!(
                serde_json::to_value(state).ok(),
                Some(json!(state.as_str()))
            );
            assert_eq!(state.as_str().parse(), Ok(state));
            assert_eq!(state.to_string(), state.as_str());
        }
        assert!("Serving".parse::<NodeState>().is_err());
    }

    #[test]
    fn blockers_match_the_contract() {
        let cases = [
            (
                Blocker::MinPeriod { remaining_ms: 5 },
                json!({"kind":"min_period","remaining_ms":5}),
            ),
            (
                Blocker::OldWorker {
                    pid: 1,
                    age_ms: 2,
                    connections: 3,
                },
                json!({"kind":"old_worker","pid":1,"age_ms":2,"connections":3}),
            ),
            (
                Blocker::Connections { count: 4 },
                json!({"kind":"connections","count":4}),
            ),
            (
                Blocker::Sessions { count: 6 },
                json!({"kind":"sessions","count":6}),
            ),
            (
                Blocker::QuietPeriod { remaining_ms: 7 },
                json!({"kind":"quiet_period","remaining_ms":7}),
            ),
            (
                Blocker::Plugin {
                    name: "alb".into(),
                    message: "deregistering".into(),
                },
                json!({"kind":"plugin","name":"alb","message":"deregistering"}),
            ),
        ];
        for (blocker, expected) in cases {
            assert_eq!(serde_json::to_value(&blocker).ok(), Some(expected.clone()));
            assert_eq!(
                serde_json::from_value::<Blocker>(expected).ok(),
                Some(blocker.clone())
            );
            assert_eq!(
                blocker.kind(),
                serde_json::to_value(&blocker).unwrap()["kind"]
            );
        }
    }

    fn sample_status() -> StatusResult {
        StatusResult {
            state: NodeState::Draining,
            node: "web-1".into(),
            groups: vec!["web".into()],
            boot_id: "6f1c2a8e-0000-4000-8000-000000000001".into(),
            agent_version: "0.1.0".into(),
            haproxy: HaproxyStatus {
                pid: Some(4242),
                config: "/etc/haproxy/haproxy.cfg".into(),
                config_sha256: Some("ab".repeat(32)),
                mode: "direct".into(),
                master_pid: None,
                started_at: Some("2024-05-01T12:00:00.000Z".into()),
                restarts: 0,
            },
            old_workers: vec![OldWorker {
                pid: 4100,
                age_ms: 1500,
                connections: 2,
            }],
            drain: Some(DrainStatus {
                drain_id: "d-1".into(),
                started_at: "2024-05-01T12:00:01.000Z".into(),
                elapsed_ms: 1000,
                blockers: vec![Blocker::MinPeriod {
                    remaining_ms: 29_000,
                }],
            }),
            plugins: vec![PluginStatus {
                name: "alb".into(),
                version: "0.1.0".into(),
                healthy: true,
            }],
            last_reload: Some(LastReload {
                reload_id: "r-1".into(),
                at: "2024-05-01T11:59:00.000Z".into(),
                ok: true,
                duration_ms: 31,
                error: None,
            }),
            warnings: Vec::new(),
            timeouts: Some(Timeouts {
                startup_ms: 30_000,
                stop_ms: 120_000,
                check_ms: Some(10_000),
            }),
            outbox_depth: Some(0),
        }
    }

    #[test]
    fn status_result_shape() {
        let status = sample_status();
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(
            value,
            json!({
                "state": "draining",
                "node": "web-1",
                "groups": ["web"],
                "boot_id": "6f1c2a8e-0000-4000-8000-000000000001",
                "agent_version": "0.1.0",
                "haproxy": {
                    "pid": 4242,
                    "config": "/etc/haproxy/haproxy.cfg",
                    "config_sha256": "ab".repeat(32),
                    "mode": "direct",
                    "started_at": "2024-05-01T12:00:00.000Z",
                    "restarts": 0
                },
                "old_workers": [{"pid": 4100, "age_ms": 1500, "connections": 2}],
                "drain": {
                    "drain_id": "d-1",
                    "started_at": "2024-05-01T12:00:01.000Z",
                    "elapsed_ms": 1000,
                    "blockers": [{"kind": "min_period", "remaining_ms": 29000}]
                },
                "plugins": [{"name": "alb", "version": "0.1.0", "healthy": true}],
                "timeouts": {"startup_ms": 30000, "stop_ms": 120000, "check_ms": 10000},
                "outbox_depth": 0,
                "last_reload": {
                    "reload_id": "r-1",
                    "at": "2024-05-01T11:59:00.000Z",
                    "ok": true,
                    "duration_ms": 31
                }
            })
        );
        assert_eq!(
            serde_json::from_value::<StatusResult>(value).ok(),
            Some(status)
        );
    }

    #[test]
    fn no_drain_is_null() {
        let status = StatusResult {
            drain: None,
            last_reload: None,
            ..sample_status()
        };
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(value["drain"], serde_json::Value::Null);
        assert_eq!(value["last_reload"], serde_json::Value::Null);
    }

    #[test]
    fn readers_ignore_new_fields() {
        let mut value = serde_json::to_value(sample_status()).unwrap();
        value["added_in_a_later_version"] = json!(true);
        assert!(serde_json::from_value::<StatusResult>(value).is_ok());
    }
}
