//! Subject names of the bus and validation of the ids that go into them.
//!
//! With prefix `P` (default `ebb`):
//! - commands: `P.node.<node_id>.<verb>`, `P.group.<group>.<verb>`, `P.all.<verb>`;
//! - events: `P.event.<node_id>.<kind>`;
//! - heartbeats: `P.heartbeat.<node_id>` (outside `P.event.>`, so outside the events stream).
//!
//! Node ids and groups are single subject tokens, so they can never smuggle a `.`, `*` or `>` into a
//! subject, and they are also valid KV keys.

use std::fmt;
use std::str::FromStr;

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "ebb";
/// Name under which every agent registers as a NATS micro service (`$SRV.PING.ebb` finds the fleet).
pub const SERVICE_NAME: &str = "ebb";
/// Default JetStream stream that keeps the events (subjects `P.event.>`).
pub const STREAM_NAME: &str = "EBB_EVENTS";
/// Default JetStream KV bucket holding one node record per node id.
pub const KV_BUCKET: &str = "ebb_nodes";
/// Longest node id or group.
pub const MAX_TOKEN_LEN: usize = 64;

/// True when `s` matches `^[A-Za-z0-9_-]{1,64}$`, the rule for node ids and groups.
pub fn is_valid_token(s: &str) -> bool {
    (1..=MAX_TOKEN_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// True when `s` is a usable subject prefix: one or more valid tokens joined by dots (`ebb`, `acme.ebb`).
/// Wildcards and empty tokens are refused, since every subject is built by appending to the prefix.
pub fn is_valid_prefix(s: &str) -> bool {
    s.split('.').all(is_valid_token)
}

/// The command verbs. Any other last subject token gets `unknown_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Status,
    Reload,
    Drain,
    Undrain,
    Stop,
    Push,
}

impl Verb {
    /// Every verb, in documentation order.
    pub const ALL: [Verb; 6] = [
        Verb::Status,
        Verb::Reload,
        Verb::Drain,
        Verb::Undrain,
        Verb::Stop,
        Verb::Push,
    ];

    /// The verb as it appears in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Status => "status",
            Verb::Reload => "reload",
            Verb::Drain => "drain",
            Verb::Undrain => "undrain",
            Verb::Stop => "stop",
            Verb::Push => "push",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verb that ebb does not know; carries the offending string for the error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown command `{0}`, expected one of status, reload, drain, undrain, stop")]
pub struct UnknownVerb(pub String);

impl FromStr for Verb {
    type Err = UnknownVerb;

    /// Exact, case-sensitive match: subjects are case-sensitive, so `Drain` is not `drain`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Verb::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownVerb(s.to_owned()))
    }
}

/// `P.node.<node>.<verb>`: a command to one node.
pub fn node_subject(prefix: &str, node: &str, verb: &str) -> String {
    format!("{prefix}.node.{node}.{verb}")
}

/// `P.group.<group>.<verb>`: a command to every node of a group (each one replies).
pub fn group_subject(prefix: &str, group: &str, verb: &str) -> String {
    format!("{prefix}.group.{group}.{verb}")
}

/// `P.all.<verb>`: a command to every node (each one replies).
pub fn all_subject(prefix: &str, verb: &str) -> String {
    format!("{prefix}.all.{verb}")
}

/// `P.node.<node>.*`: what an agent subscribes to for its own commands.
pub fn node_wildcard(prefix: &str, node: &str) -> String {
    node_subject(prefix, node, "*")
}

/// `P.group.<group>.*`: what an agent subscribes to for each of its groups.
pub fn group_wildcard(prefix: &str, group: &str) -> String {
    group_subject(prefix, group, "*")
}

/// `P.all.*`: what every agent subscribes to for fleet-wide commands.
pub fn all_wildcard(prefix: &str) -> String {
    all_subject(prefix, "*")
}

/// `P.event.<node>.<kind>`: where a node publishes an event.
pub fn event_subject(prefix: &str, node: &str, kind: &str) -> String {
    format!("{prefix}.event.{node}.{kind}")
}

/// `P.event.>`: every event of the fleet; also the subject filter of the events stream.
pub fn event_wildcard(prefix: &str) -> String {
    format!("{prefix}.event.>")
}

/// `P.event.<node>.*`: every event of one node.
pub fn node_event_wildcard(prefix: &str, node: &str) -> String {
    event_subject(prefix, node, "*")
}

/// `P.heartbeat.<node>`: where a node publishes its heartbeats, as core messages only.
pub fn heartbeat_subject(prefix: &str, node: &str) -> String {
    format!("{prefix}.heartbeat.{node}")
}

/// `P.heartbeat.*`: the heartbeats of the whole fleet.
pub fn heartbeat_wildcard(prefix: &str) -> String {
    heartbeat_subject(prefix, "*")
}

/// The last token of a subject, which is the verb for command subjects and the kind for event subjects.
pub fn verb_of(subject: &str) -> &str {
    subject.rsplit_once('.').map_or(subject, |(_, last)| last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(is_valid_token("web-1"));
        assert!(is_valid_token("eu_west-1a"));
        assert!(is_valid_token(&"a".repeat(64)));
        assert!(!is_valid_token(&"a".repeat(65)));
        assert!(!is_valid_token(""));
        for bad in ["web.1", "web*", ">", "web 1", "wéb", "a/b", "a\n"] {
            assert!(!is_valid_token(bad), "{bad:?} must be refused");
        }
    }

    #[test]
    fn prefixes() {
        assert!(is_valid_prefix("ebb"));
        assert!(is_valid_prefix("acme.ebb"));
        for bad in ["", ".ebb", "ebb.", "ebb..x", "ebb.*", "ebb.>"] {
            assert!(!is_valid_prefix(bad), "{bad:?} must be refused");
        }
    }

    #[test]
    fn verbs_round_trip() {
        for v in Verb::ALL {
            assert_eq!(v.as_str().parse::<Verb>(), Ok(v));
            assert_eq!(v.to_string(), v.as_str());
        }
        assert_eq!("Drain".parse::<Verb>(), Err(UnknownVerb("Drain".into())));
        assert_eq!("kill".parse::<Verb>(), Err(UnknownVerb("kill".into())));
    }

    #[test]
    fn subjects() {
        assert_eq!(
            node_subject("ebb", "web-1", "drain"),
            "ebb.node.web-1.drain"
        );
        assert_eq!(
            group_subject("ebb", "web", "status"),
            "ebb.group.web.status"
        );
        assert_eq!(all_subject("acme.ebb", "stop"), "acme.ebb.all.stop");
        assert_eq!(node_wildcard("ebb", "web-1"), "ebb.node.web-1.*");
        assert_eq!(group_wildcard("ebb", "web"), "ebb.group.web.*");
        assert_eq!(all_wildcard("ebb"), "ebb.all.*");
        assert_eq!(
            event_subject("ebb", "web-1", "drained"),
            "ebb.event.web-1.drained"
        );
        assert_eq!(event_wildcard("ebb"), "ebb.event.>");
        assert_eq!(node_event_wildcard("ebb", "web-1"), "ebb.event.web-1.*");
        assert_eq!(heartbeat_subject("ebb", "web-1"), "ebb.heartbeat.web-1");
        assert_eq!(heartbeat_wildcard("acme.ebb"), "acme.ebb.heartbeat.*");
    }

    #[test]
    fn verb_is_last_token() {
        assert_eq!(verb_of("ebb.node.web-1.drain"), "drain");
        assert_eq!(verb_of("acme.ebb.all.status"), "status");
        assert_eq!(verb_of("drain"), "drain");
        assert_eq!(verb_of("ebb.node.web-1."), "");
    }
}
