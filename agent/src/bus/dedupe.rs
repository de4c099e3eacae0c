//! Request-id deduplication (docs/PROTOCOL.md, "Request fields"): a repeated `request_id` gets
//! the first reply again and acts only once, even when the repeat arrives while the first is
//! still being carried out.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// First time: carry it out, then call `complete`.
    New,
    /// Already answered: send these bytes again.
    Replay(Bytes),
    /// Still in progress: the responder was queued and gets the reply from `complete`.
    Joined,
}

#[derive(Debug)]
pub struct Dedupe<R> {
    done: HashMap<String, Bytes>,
    order: VecDeque<String>,
    pending: HashMap<String, Vec<R>>,
    capacity: usize,
}

impl<R> Dedupe<R> {
    /// Remembers the replies of the last `capacity` request ids.
    pub fn new(capacity: usize) -> Self {
        Dedupe {
            done: HashMap::new(),
            order: VecDeque::new(),
            pending: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn begin(&mut self, request_id: &str, responder: R) -> (Seen, Option<R>) {
        if let Some(reply) = self.done.get(request_id) {
            return (Seen::Replay(reply.clone()), Some(responder));
        }
        if let Some(waiting) = self.pending.get_mut(request_id) {
            waiting.push(responder);
            return (Seen::Joined, None);
        }
        self.pending.insert(request_id.to_string(), Vec::new());
        (Seen::New, Some(responder))
    }

    /// Records the reply; returns the responders that joined meanwhile.
    pub fn complete(&mut self, request_id: &str, reply: Bytes) -> Vec<R> {
        let joined = self.pending.remove(request_id).unwrap_or_default();
        if self.done.insert(request_id.to_string(), reply).is_none() {
            self.order.push_back(request_id.to_string());
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.done.remove(&old);
            }
        }
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_acts_repeats_replay_and_concurrent_repeats_join() {
        let mut d = Dedupe::new(2);
        assert_eq!(d.begin("a", 1), (Seen::New, Some(1)));
        assert_eq!(d.begin("a", 2), (Seen::Joined, None));
        assert_eq!(d.begin("a", 3), (Seen::Joined, None));
        assert_eq!(d.complete("a", Bytes::from_static(b"r")), vec![2, 3]);
        assert_eq!(
            d.begin("a", 4),
            (Seen::Replay(Bytes::from_static(b"r")), Some(4))
        );
    }

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let mut d = Dedupe::new(2);
        for id in ["a", "b", "c"] {
            assert_eq!(d.begin(id, 0).0, Seen::New);
            d.complete(id, Bytes::from(id));
        }
        assert_eq!(d.begin("a", 0).0, Seen::New);
        assert_eq!(d.begin("c", 0).0, Seen::Replay(Bytes::from("c")));
    }
}
