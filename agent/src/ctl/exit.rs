//! `ebb ctl`'s exit codes: 0 every node ok, 1 some node failed, 2 usage error (found before
//! anything was sent), 3 timeout or unreachable (README.md, "Using it").

use std::fmt;

use ebb_sdk::reply::Reply;

pub const OK: u8 = 0;
pub const FAILED: u8 = 1;
pub const USAGE: u8 = 2;
pub const TIMEOUT: u8 = 3;

/// Why `ebb ctl` ended without an answer from every node; the message is for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A local problem found before anything was sent: a bad id, a file that cannot be read, a
    /// fleet-wide command not confirmed.
    Usage(String),
    /// NATS or the nodes could not be reached.
    Unreachable(String),
}

impl Failure {
    pub fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => USAGE,
            Failure::Unreachable(_) => TIMEOUT,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Unreachable(m) => f.write_str(m),
        }
    }
}

/// Anything that fails once the command may have gone out is about the network.
impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Unreachable(format!("{e:#}"))
    }
}

impl From<ebb_sdk::client::ClientError> for Failure {
    fn from(e: ebb_sdk::client::ClientError) -> Self {
        Failure::Unreachable(format!("{e}; check that the NATS server is up"))
    }
}

/// The code for a fan-out's outcome: a failed node outweighs a silent one, and no reply at all
/// is a timeout.
pub fn for_replies(replies: &[Reply], missing: &[String]) -> u8 {
    for_outcome(replies.iter().any(|r| !r.ok), replies.len(), missing.len())
}

/// [`for_replies`] from counts: whether any reply failed, how many came, how many are missing.
pub fn for_outcome(failed: bool, answered: usize, missing: usize) -> u8 {
    if failed {
        FAILED
    } else if missing > 0 || answered == 0 {
        TIMEOUT
    } else {
        OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_sdk::reply::ErrorCode;
    use serde_json::json;

    fn reply(node: &str, ok: bool) -> Reply {
        if ok {
            Reply::success(node, None, json!({}))
        } else {
            Reply::failure(node, None, ErrorCode::Internal, "boom")
        }
    }

    #[test]
    fn every_node_ok_is_zero() {
        assert_eq!(for_replies(&[reply("a", true), reply("b", true)], &[]), OK);
    }

    #[test]
    fn a_failed_node_is_one_even_when_another_is_silent() {
        assert_eq!(
            for_replies(&[reply("a", true), reply("b", false)], &[]),
            FAILED
        );
        assert_eq!(for_replies(&[reply("b", false)], &["c".into()]), FAILED);
    }

    #[test]
    fn a_silent_node_or_no_reply_at_all_is_three() {
        assert_eq!(for_replies(&[reply("a", true)], &["b".into()]), TIMEOUT);
        assert_eq!(for_replies(&[], &[]), TIMEOUT);
    }

    #[test]
    fn local_problems_are_usage_and_network_ones_timeouts() {
        assert_eq!(Failure::Usage("x".into()).code(), USAGE);
        assert_eq!(Failure::Unreachable("x".into()).code(), TIMEOUT);
        assert_eq!(Failure::from(anyhow::anyhow!("down")).code(), TIMEOUT);
    }
}
