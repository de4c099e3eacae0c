//! How long `ebb ctl` waits for a reply. `status`, `drain` and `undrain` answer at once: they get
//! `--timeout`. `reload` and `stop` answer after their work, which has the node's own limits: they
//! get that limit plus `--timeout`.
//!
//! The limits come from a `status` fan-out to the same target just before the command
//! ([`learn`]): its `timeouts` (startup, stop), or for agents too old to report them, the agent's
//! defaults. A node that did not answer that status is taken as unreachable and gets only
//! `--timeout`. Since a fan-out ends as soon as every known node answered, a long wait costs
//! nothing when the nodes are quick.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ebb_sdk::client::{Client, ClientError, Target};
use ebb_sdk::command::{Command, StatusRequest};
use ebb_sdk::status::{StatusResult, Timeouts};

/// `haproxy.startup_timeout`, `stop_timeout` and `push.check_timeout` of agents that do not
/// report them: the agent's defaults.
pub const DEFAULT_TIMEOUTS: Timeouts = Timeouts {
    startup_ms: 30_000,
    stop_ms: 120_000,
    check_ms: Some(10_000),
};

/// After the stop deadline the agent sends SIGTERM, then SIGKILL 5 s later, and again 5 s after
/// that before it gives up and replies.
const STOP_ESCALATION: Duration = Duration::from_secs(10);

/// The work a verb's reply waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// status, drain, undrain: the reply comes at once.
    None,
    /// The new worker must be ready; a reload that arrives during another one joins the next, so
    /// it may wait for two startups.
    Reload,
    /// A reload after `haproxy -c` of the pushed config, which the node bounds by its
    /// push.check_timeout.
    Push,
    /// HAProxy must have stopped: within the request's `timeout_ms`, or the node's stop timeout.
    Stop { timeout: Option<Duration> },
}

/// What the status fan-out learnt of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// Answered, with its `timeouts` when the agent reports them.
    Answered(Option<Timeouts>),
    /// Known (KV, service ping) but silent.
    Silent,
}

/// How long to wait for one node's reply.
pub fn for_node(work: Work, limits: Limits, margin: Duration) -> Duration {
    let timeouts = match limits {
        Limits::Silent => return margin,
        Limits::Answered(t) => t.unwrap_or(DEFAULT_TIMEOUTS),
    };
    let work_takes = match work {
        Work::None => Duration::ZERO,
        Work::Reload => Duration::from_millis(timeouts.startup_ms).saturating_mul(2),
        Work::Push => {
            let check = timeouts
                .check_ms
                .or(DEFAULT_TIMEOUTS.check_ms)
                .unwrap_or_default();
            Duration::from_millis(timeouts.startup_ms).saturating_mul(2)
                + Duration::from_millis(check)
        }
        Work::Stop { timeout } => {
            timeout.unwrap_or(Duration::from_millis(timeouts.stop_ms)) + STOP_ESCALATION
        }
    };
    work_takes.saturating_add(margin)
}

/// How long to wait for a fan-out: the longest any of the nodes may take; `margin` when none is
/// known.
pub fn for_fleet<'a>(
    work: Work,
    nodes: impl IntoIterator<Item = &'a Limits>,
    margin: Duration,
) -> Duration {
    nodes
        .into_iter()
        .map(|l| for_node(work, *l, margin))
        .max()
        .unwrap_or(margin)
}

/// The target's nodes as a `status` fan-out sees them, with what each reported.
#[derive(Debug, Clone, Default)]
pub struct Learnt {
    /// The expected nodes and those that answered.
    pub nodes: BTreeMap<String, Limits>,
    /// Nothing subscribes to the target's subjects: no agent of it is connected.
    pub no_responders: bool,
}

impl Learnt {
    pub fn names(&self) -> BTreeSet<String> {
        self.nodes.keys().cloned().collect()
    }

    pub fn limits(&self, node: &str) -> Limits {
        self.nodes.get(node).copied().unwrap_or(Limits::Silent)
    }
}

/// Asks `target` for its status (waiting `margin` at most, less once every expected node
/// answered) to learn each node's limits.
pub async fn learn(
    client: &Client,
    target: &Target,
    expected: &BTreeSet<String>,
    margin: Duration,
) -> Result<Learnt, ClientError> {
    let status = Command::Status(StatusRequest {
        requester: Some(super::requester()),
        ..StatusRequest::default()
    });
    let gathered = client.gather(target, &status, expected, margin).await?;
    let mut nodes: BTreeMap<String, Limits> = expected
        .iter()
        .map(|n| (n.clone(), Limits::Silent))
        .collect();
    for reply in &gathered.replies {
        let timeouts = reply
            .result_as::<StatusResult>()
            .and_then(Result::ok)
            .and_then(|s| s.timeouts);
        nodes.insert(reply.node.clone(), Limits::Answered(timeouts));
    }
    Ok(Learnt {
        nodes,
        no_responders: gathered.no_responders,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARGIN: Duration = Duration::from_secs(5);
    const NODE: Limits = Limits::Answered(Some(Timeouts {
        startup_ms: 10_000,
        stop_ms: 60_000,
        check_ms: Some(3_000),
    }));

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn verbs_that_answer_at_once_wait_only_the_timeout() {
        assert_eq!(for_node(Work::None, NODE, MARGIN), MARGIN);
    }

    #[test]
    fn a_stop_waits_for_the_nodes_stop_timeout_and_its_escalation() {
        let stop = Work::Stop { timeout: None };
        assert_eq!(for_node(stop, NODE, MARGIN), secs(60 + 10 + 5));
    }

    #[test]
    fn a_stop_with_its_own_timeout_waits_for_that_one() {
        let stop = Work::Stop {
            timeout: Some(secs(8)),
        };
        assert_eq!(for_node(stop, NODE, MARGIN), secs(8 + 10 + 5));
    }

    #[test]
    fn a_reload_may_wait_for_two_startups() {
        assert_eq!(for_node(Work::Reload, NODE, MARGIN), secs(20 + 5));
        // A push also waits for the node's own check timeout, or the default when unreported.
        assert_eq!(for_node(Work::Push, NODE, MARGIN), secs(20 + 3 + 5));
        let unreported = Limits::Answered(Some(Timeouts {
            check_ms: None,
            ..DEFAULT_TIMEOUTS
        }));
        assert_eq!(for_node(Work::Push, unreported, MARGIN), secs(60 + 10 + 5));
    }

    #[test]
    fn older_agents_get_the_agents_defaults() {
        let old = Limits::Answered(None);
        assert_eq!(
            for_node(Work::Stop { timeout: None }, old, MARGIN),
            secs(120 + 10 + 5)
        );
        assert_eq!(for_node(Work::Reload, old, MARGIN), secs(60 + 5));
    }

    #[test]
    fn a_silent_node_gets_only_the_timeout() {
        assert_eq!(
            for_node(Work::Stop { timeout: None }, Limits::Silent, MARGIN),
            MARGIN
        );
    }

    #[test]
    fn a_fleet_waits_for_its_slowest_node() {
        let quick = Limits::Answered(Some(Timeouts {
            startup_ms: 1_000,
            stop_ms: 1_000,
            check_ms: None,
        }));
        let nodes = [quick, NODE, Limits::Silent];
        assert_eq!(
            for_fleet(Work::Stop { timeout: None }, &nodes, MARGIN),
            secs(60 + 10 + 5)
        );
        assert_eq!(for_fleet(Work::Reload, &[], MARGIN), MARGIN);
    }
}
