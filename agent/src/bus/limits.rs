//! The bounds of the command path (docs/PROTOCOL.md, "Request bounds"): how large a request may
//! be, how many may wait for the node at once, how much the request-id memory may hold, and which
//! reply subjects the agent never publishes to. Decisions only; the command server applies them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ebb_sdk::subject::Verb;

/// The largest request body, in bytes, of every verb but `push`.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How many requests may wait for the node's answer at once (retries joining one in flight
/// included). One more is refused at once, so a flood or a slow node cannot pile up work or memory.
pub const MAX_IN_FLIGHT: usize = 256;

/// How many bytes of answered request ids and their replies are remembered for retries.
pub const DEDUPE_BYTES: usize = 2 << 20;

/// How often, at most, a dropped reply subject is logged per root (the rest are counted).
pub const DROPPED_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Subject roots of the server and of JetStream: publishing there would act on streams, KV
/// buckets, services or the system account with the agent's rights.
const RESERVED_REPLY_ROOTS: [&str; 4] = ["$JS.", "$KV.", "$SRV.", "$SYS."];

/// The largest body a request on `verb` may have, or `None` for `push`: a whole haproxy.cfg, bounded
/// by the server's `max_payload` alone (NATS refuses anything larger before it reaches the agent).
pub fn max_body_bytes(verb: &str) -> Option<usize> {
    (verb != Verb::Push.as_str()).then_some(MAX_REQUEST_BYTES)
}

/// The root under which `reply` lies when the agent must not publish there, `None` when it may
/// answer there. The agent's own subjects (`prefix.`) are refused because a reply there would be a
/// forged event or command signed with the agent's publish rights.
pub fn forbidden_reply_root<'a>(reply: &str, prefix: &'a str) -> Option<&'a str> {
    if let Some(root) = RESERVED_REPLY_ROOTS.iter().find(|r| reply.starts_with(**r)) {
        return Some(root);
    }
    let under_prefix = reply
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('.'));
    under_prefix.then_some(prefix)
}

/// Counts requests dropped for their reply subject, and says when to log them: the first under
/// each root, then at most once per [`DROPPED_LOG_INTERVAL`] with the count since. Its memory is
/// bounded by the number of roots [`forbidden_reply_root`] can name.
#[derive(Debug, Default)]
pub struct DroppedReplies {
    roots: HashMap<String, Dropped>,
}

#[derive(Debug)]
struct Dropped {
    logged_at: Instant,
    since: u64,
}

impl DroppedReplies {
    /// Counts one drop under `root` at `now`; returns how many to report (this one included) when
    /// it is time to log.
    pub fn note(&mut self, root: &str, now: Instant) -> Option<u64> {
        match self.roots.get_mut(root) {
            None => {
                self.roots.insert(
                    root.to_string(),
                    Dropped {
                        logged_at: now,
                        since: 0,
                    },
                );
                Some(1)
            }
            Some(d) => {
                d.since += 1;
                if now.saturating_duration_since(d.logged_at) < DROPPED_LOG_INTERVAL {
                    return None;
                }
                d.logged_at = now;
                Some(std::mem::take(&mut d.since))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_push_may_be_large() {
        for verb in Verb::ALL.into_iter().filter(|v| *v != Verb::Push) {
            assert_eq!(max_body_bytes(verb.as_str()), Some(MAX_REQUEST_BYTES));
        }
        assert_eq!(max_body_bytes("push"), None);
        assert_eq!(max_body_bytes("explode"), Some(MAX_REQUEST_BYTES));
    }

    #[test]
    fn replies_never_go_to_the_agents_own_or_the_servers_subjects() {
        let refused = [
            ("ebb.event.node-1.drained", "ebb", "ebb"),
            ("ebb.node.node-1.status", "ebb", "ebb"),
            ("acme.ebb.event.n.heartbeat", "acme.ebb", "acme.ebb"),
            ("$KV.ebb_nodes.node-1", "ebb", "$KV."),
            ("$JS.API.STREAM.DELETE.EBB_EVENTS", "ebb", "$JS."),
            ("$JS.ACK.x", "ebb", "$JS."),
            ("$SRV.PING.ebb", "ebb", "$SRV."),
            ("$SYS.REQ.SERVER.PING", "ebb", "$SYS."),
        ];
        for (reply, prefix, root) in refused {
            assert_eq!(forbidden_reply_root(reply, prefix), Some(root), "{reply}");
        }
        let allowed = [
            ("_INBOX.abc.def", "ebb"),
            ("ebbx.event.n.drained", "ebb"),
            ("ebb", "ebb"),
            ("acme.ebbx.y", "acme.ebb"),
            ("ebb.event.n.x", "acme.ebb"),
            ("my.replies.1", "ebb"),
            ("$KVX.y", "ebb"),
            ("kv.$KV.y", "ebb"),
        ];
        for (reply, prefix) in allowed {
            assert_eq!(forbidden_reply_root(reply, prefix), None, "{reply}");
        }
    }

    #[test]
    fn dropped_replies_are_logged_once_per_root_per_interval_with_a_count() {
        let t0 = Instant::now();
        let mut d = DroppedReplies::default();
        assert_eq!(d.note("$KV.", t0), Some(1));
        assert_eq!(d.note("ebb", t0), Some(1), "each root is logged on its own");
        for i in 1..=1000 {
            assert_eq!(d.note("$KV.", t0 + Duration::from_millis(i)), None);
        }
        let later = t0 + DROPPED_LOG_INTERVAL;
        assert_eq!(d.note("$KV.", later), Some(1001));
        assert_eq!(d.note("$KV.", later), None);
        assert_eq!(d.note("$KV.", later + DROPPED_LOG_INTERVAL), Some(2));
    }
}
