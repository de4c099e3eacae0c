//! Publishes the server refused: NATS answers a publish to a subject the agent may not publish on
//! with an asynchronous `-ERR 'Permissions Violation for Publish to "<subject>"'`, not with an
//! error on the publish itself. The connection's event callback records them here, and the
//! publisher asks whether the event it is waiting on was one of them.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// How many refusals are remembered: the publisher only asks about its current event.
const KEPT: usize = 64;

/// The subjects the server refused lately, shared by the connection and the publisher.
#[derive(Debug, Clone, Default)]
pub struct Refusals(Arc<Mutex<Kept>>);

#[derive(Debug, Default)]
struct Kept {
    recent: VecDeque<(Instant, String)>,
    /// Every subject ever refused, so each is reported once.
    seen: HashSet<String>,
}

/// A refused publish, as [`Refusals::note`] read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub subject: String,
    /// The first refusal of this subject.
    pub first: bool,
}

impl Refusals {
    /// Records a server error when it is a refused publish.
    pub fn note(&self, server_error: &str) -> Option<Refusal> {
        let subject = refused_subject(server_error)?;
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.recent.len() >= KEPT {
            kept.recent.pop_front();
        }
        kept.recent.push_back((Instant::now(), subject.clone()));
        // Bounded by the subjects the agent publishes on, which are few.
        let first = kept.seen.insert(subject.clone());
        Some(Refusal { subject, first })
    }

    /// Whether a publish to `subject` was refused at or after `since`.
    pub fn refused_since(&self, subject: &str, since: Instant) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recent
            .iter()
            .any(|(at, s)| *at >= since && s == subject)
    }
}

/// The subject of a `Permissions Violation for Publish to "<subject>"` server error.
pub fn refused_subject(server_error: &str) -> Option<String> {
    const PREFIX: &str = "permissions violation for publish to ";
    let text = server_error.trim().trim_matches('\'');
    let head = text.get(..PREFIX.len())?;
    if !head.eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    let rest = text[PREFIX.len()..].trim();
    let subject = rest.trim_matches('"');
    (!subject.is_empty() && !subject.contains(char::is_whitespace)).then(|| subject.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_subject_of_a_publish_violation() {
        assert_eq!(
            refused_subject("Permissions Violation for Publish to \"ebb.event.n.undrained\""),
            Some("ebb.event.n.undrained".into())
        );
        assert_eq!(
            refused_subject("'Permissions Violation for Publish to \"a.b\"'"),
            Some("a.b".into())
        );
        assert_eq!(
            refused_subject("Permissions Violation for Subscription to \"a.b\""),
            None
        );
        assert_eq!(refused_subject("authorization violation"), None);
        assert_eq!(
            refused_subject("Permissions Violation for Publish to "),
            None
        );
        assert_eq!(refused_subject("é"), None);
    }

    #[test]
    fn remembers_when() {
        let r = Refusals::default();
        let before = Instant::now();
        let noted = r.note("Permissions Violation for Publish to \"x.y\"");
        assert_eq!(noted.map(|n| n.first), Some(true));
        let again = r.note("Permissions Violation for Publish to \"x.y\"");
        assert_eq!(again.map(|n| n.first), Some(false));
        assert!(r.refused_since("x.y", before));
        assert!(!r.refused_since("x.z", before));
        assert!(!r.refused_since("x.y", Instant::now() + std::time::Duration::from_secs(1)));
    }
}
