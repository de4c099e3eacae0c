//! When a fan-out sends its command again: the decisions of [`Client::gather`](super::Client::gather),
//! apart from NATS. Time is passed in; sends come out of [`Gathering::poll_transmit`].
//!
//! A command goes once to its target, then again:
//! - **once, as the retry**, to the nodes that have not answered: [`RETRY_AFTER`] after the first
//!   send, or as soon as the client's own connection is back after a loss. A NATS server that died
//!   may have taken the request or its reply with it. The command carries a `request_id`, so an
//!   agent that already acted answers the retry with its first reply, and one still at work
//!   answers both when done: the command acts once.
//! - **to a known node nobody listens for** ("no responders"), after a short pause, for at most
//!   [`MOVE_GRACE`] since the first send: its agent is reconnecting to another server. Nothing was
//!   delivered, so this is not a retry. A node that is not known (not in `expected`) gets no grace:
//!   "no responders" ends the fan-out at once, since nothing can answer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// When the retry goes out, at the latest (half the wait when that is shorter).
pub const RETRY_AFTER: Duration = Duration::from_secs(2);
/// How long a known node may be unreachable (between NATS servers) before it counts as gone:
/// longer than an agent takes to notice a server that went silent (three of its 2 s pings) and
/// to subscribe on another.
pub const MOVE_GRACE: Duration = Duration::from_secs(8);
const RESEND_FIRST: Duration = Duration::from_millis(100);
const RESEND_MAX: Duration = Duration::from_secs(1);

/// Where a send goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dest {
    /// The target's own subject (the node, the group, or every node).
    Target,
    /// One node of a group or fleet target, on its node subject.
    Node(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    At(Instant),
    Sent,
}

/// One fan-out's state.
#[derive(Debug)]
pub struct Gathering {
    /// The node of a single-node target.
    single: Option<String>,
    expected: BTreeSet<String>,
    answered: BTreeSet<String>,
    started: Instant,
    deadline: Instant,
    retry: Retry,
    connection_lost: bool,
    /// Sends waiting for their instant: resends after "no responders".
    scheduled: BTreeMap<Dest, (Instant, Duration)>,
    queue: VecDeque<Dest>,
    finished: bool,
    no_responders: bool,
}

impl Gathering {
    /// A fan-out to `single` (a node target) or a group or fleet, expecting replies from
    /// `expected` (the nodes known to exist), waiting `wait` at most.
    pub fn new(
        single: Option<String>,
        expected: BTreeSet<String>,
        now: Instant,
        wait: Duration,
    ) -> Gathering {
        Gathering {
            single,
            expected,
            answered: BTreeSet::new(),
            started: now,
            deadline: now + wait,
            retry: Retry::At(now + RETRY_AFTER.min(wait / 2)),
            connection_lost: false,
            scheduled: BTreeMap::new(),
            queue: VecDeque::from([Dest::Target]),
            finished: false,
            no_responders: false,
        }
    }

    /// A reply from `node`.
    pub fn handle_reply(&mut self, node: &str) {
        self.answered.insert(node.to_string());
        self.scheduled.remove(&Dest::Node(node.to_string()));
        let done = match &self.single {
            Some(_) => true,
            None => {
                !self.expected.is_empty() && self.expected.iter().all(|n| self.answered.contains(n))
            }
        };
        if done {
            self.finished = true;
        }
    }

    /// The server says nothing listens on `dest`'s subject.
    pub fn handle_no_responders(&mut self, dest: Dest, now: Instant) {
        let known = match &dest {
            Dest::Target => match &self.single {
                Some(n) => self.expected.contains(n),
                None => !self.expected.is_empty(),
            },
            Dest::Node(n) => self.expected.contains(n),
        };
        let answered = match &dest {
            Dest::Target => !self.answered.is_empty(),
            Dest::Node(n) => self.answered.contains(n),
        };
        if answered {
            return;
        }
        if known && now < self.started + MOVE_GRACE {
            let pause = self
                .scheduled
                .get(&dest)
                .map_or(RESEND_FIRST, |(_, p)| (*p * 2).min(RESEND_MAX));
            self.scheduled.insert(dest, (now + pause, pause));
        } else if dest == Dest::Target {
            self.no_responders = true;
            self.finished = true;
        }
    }

    /// The client's connection to NATS dropped.
    pub fn handle_connection_lost(&mut self) {
        self.connection_lost = true;
    }

    /// The client is connected again: replies sent meanwhile are lost, so the retry goes now.
    pub fn handle_connection_back(&mut self, now: Instant) {
        if std::mem::take(&mut self.connection_lost) && self.retry != Retry::Sent {
            self.retry = Retry::At(now);
        }
    }

    /// The next send due at `now`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Dest> {
        if self.finished {
            return None;
        }
        if let Some(dest) = self.queue.pop_front() {
            return Some(dest);
        }
        if let Some(dest) = self
            .scheduled
            .iter()
            .find(|(_, (at, _))| *at <= now)
            .map(|(d, _)| d.clone())
        {
            // Kept (with its pause) until the node answers or the grace ends: its next "no
            // responders" doubles the pause.
            if let Some((at, _)) = self.scheduled.get_mut(&dest) {
                *at = self.deadline;
            }
            return Some(dest);
        }
        match self.retry {
            Retry::At(at) if at <= now && !self.connection_lost => {
                self.retry = Retry::Sent;
                self.queue.extend(self.retry_dests());
                self.queue.pop_front()
            }
            _ => None,
        }
    }

    /// The retry goes to each node that has not answered, on its own subject, so that the nodes
    /// that did answer are not asked again; to the target when no node is known.
    fn retry_dests(&self) -> Vec<Dest> {
        if self.single.is_some() || self.expected.is_empty() {
            return vec![Dest::Target];
        }
        self.expected
            .iter()
            .filter(|n| !self.answered.contains(*n))
            .map(|n| Dest::Node(n.clone()))
            .collect()
    }

    /// When to call [`poll_transmit`](Self::poll_transmit) again, or give up.
    pub fn poll_timeout(&self) -> Instant {
        let mut at = self.deadline;
        if let Retry::At(r) = self.retry {
            at = at.min(r);
        }
        for (s, _) in self.scheduled.values() {
            at = at.min(*s);
        }
        at
    }

    /// Whether the fan-out is over: every expected node answered, nothing listens, or the wait
    /// ended.
    pub fn is_done(&self, now: Instant) -> bool {
        self.finished || now >= self.deadline
    }

    /// Nothing listened on the target's subject, and no known node could be waiting to.
    pub fn no_responders(&self) -> bool {
        self.no_responders
    }

    /// Whether the retry went out.
    pub fn retried(&self) -> bool {
        self.retry == Retry::Sent
    }
}

#[cfg(test)]
mod tests;
