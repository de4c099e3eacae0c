//! Request-id deduplication (docs/PROTOCOL.md, "Request fields"): a repeated `request_id` gets
//! the first reply again and acts only once, even when the repeat arrives while the first is
//! still being carried out.
//!
//! Ids are kept per verb: a `status` and a `drain` that happen to share an id are two requests.
//! The memory of answered requests is bounded in bytes, not entries, because the ids and replies a
//! client sends can be of any size up to the request limits; the oldest answers are forgotten first.

use std::collections::{HashMap, VecDeque};
use std::mem::size_of;

use bytes::Bytes;
use ebb_sdk::subject::Verb;

/// What identifies a request for deduplication.
pub type Key = (Verb, String);

/// What an answered entry costs besides its id and reply: the map slot and the order slot, each
/// with a copy of the key, and the allocator's rounding. An estimate that errs high.
const ENTRY_OVERHEAD: usize = 2 * size_of::<Key>() + size_of::<Bytes>() + 64;

#[derive(Debug)]
pub struct Dedupe<R> {
    done: HashMap<Key, Bytes>,
    order: VecDeque<Key>,
    pending: HashMap<Key, Vec<R>>,
    bytes: usize,
    max_bytes: usize,
}

impl<R> Dedupe<R> {
    /// Remembers the replies of the most recent requests that fit in `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Dedupe {
            done: HashMap::new(),
            order: VecDeque::new(),
            pending: HashMap::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// The reply of a request already answered.
    pub fn answered(&self, key: &Key) -> Option<Bytes> {
        self.done.get(key).cloned()
    }

    /// True while a request with this key is being carried out.
    pub fn in_progress(&self, key: &Key) -> bool {
        self.pending.contains_key(key)
    }

    /// Starts a request, or, when one with this key is in progress, queues `responder` to get its
    /// reply from [`complete`](Self::complete). Returns the responder when the request is new.
    pub fn begin(&mut self, key: Key, responder: R) -> Option<R> {
        if let Some(waiting) = self.pending.get_mut(&key) {
            waiting.push(responder);
            return None;
        }
        self.pending.insert(key, Vec::new());
        Some(responder)
    }

    /// Records the reply (of a request begun or answered without the node); returns the
    /// responders that joined meanwhile.
    pub fn complete(&mut self, key: Key, reply: Bytes) -> Vec<R> {
        let joined = self.pending.remove(&key).unwrap_or_default();
        let cost = entry_cost(&key, &reply);
        // A reply that alone exceeds the budget would only flush everything else out.
        if cost > self.max_bytes {
            return joined;
        }
        // A copy of exactly its length: the encoder's buffer may be twice as large, and the
        // budget counts only the length.
        let reply = Bytes::copy_from_slice(&reply);
        if let Some(old) = self.done.insert(key.clone(), reply) {
            self.bytes -= entry_cost(&key, &old);
        } else {
            self.order.push_back(key);
        }
        self.bytes += cost;
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(reply) = self.done.remove(&oldest) {
                self.bytes -= entry_cost(&oldest, &reply);
            }
        }
        joined
    }

    /// Forgets a request in progress without recording a reply (it never reached the node, so a
    /// retry must be able to act); returns the responders that joined meanwhile.
    pub fn abandon(&mut self, key: &Key) -> Vec<R> {
        self.pending.remove(key).unwrap_or_default()
    }

    /// Bytes the answered requests take, by [`entry_cost`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many answered requests are remembered.
    pub fn answered_len(&self) -> usize {
        self.done.len()
    }
}

/// The bytes one answered request is counted for: its id twice (map and order), its reply, and
/// the bookkeeping around them.
fn entry_cost(key: &Key, reply: &Bytes) -> usize {
    2 * key.1.len() + reply.len() + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(verb: Verb, id: &str) -> Key {
        (verb, id.to_string())
    }

    #[test]
    fn first_acts_repeats_replay_and_concurrent_repeats_join() {
        let mut d = Dedupe::new(1 << 20);
        let a = key(Verb::Reload, "a");
        assert_eq!(d.begin(a.clone(), 1), Some(1));
        assert!(d.in_progress(&a));
        assert_eq!(d.begin(a.clone(), 2), None);
        assert_eq!(d.begin(a.clone(), 3), None);
        assert_eq!(d.complete(a.clone(), Bytes::from_static(b"r")), vec![2, 3]);
        assert!(!d.in_progress(&a));
        assert_eq!(d.answered(&a), Some(Bytes::from_static(b"r")));
    }

    #[test]
    fn ids_are_kept_per_verb() {
        let mut d = Dedupe::new(1 << 20);
        assert_eq!(d.begin(key(Verb::Status, "x"), 1), Some(1));
        d.complete(key(Verb::Status, "x"), Bytes::from_static(b"status"));
        // The same id on another verb is another request.
        assert_eq!(d.answered(&key(Verb::Drain, "x")), None);
        assert_eq!(d.begin(key(Verb::Drain, "x"), 2), Some(2));
        d.complete(key(Verb::Drain, "x"), Bytes::from_static(b"drain"));
        assert_eq!(
            d.answered(&key(Verb::Status, "x")).as_deref(),
            Some(&b"status"[..])
        );
        assert_eq!(
            d.answered(&key(Verb::Drain, "x")).as_deref(),
            Some(&b"drain"[..])
        );
    }

    #[test]
    fn memory_is_bounded_in_bytes_forgetting_the_oldest_first() {
        let reply = Bytes::from(vec![b'r'; 1000]);
        let id = |i: usize| format!("{i:0>128}");
        let one = entry_cost(&key(Verb::Status, &id(0)), &reply);
        let budget = 10 * one;
        let mut d = Dedupe::new(budget);
        for i in 0..1000 {
            let k = key(Verb::Status, &id(i));
            assert_eq!(d.begin(k.clone(), ()), Some(()));
            d.complete(k, reply.clone());
            assert!(d.bytes() <= budget, "{} bytes after {i}", d.bytes());
        }
        assert_eq!(d.answered_len(), 10);
        assert_eq!(d.bytes(), budget);
        assert!(d.answered(&key(Verb::Status, &id(989))).is_none());
        assert!(d.answered(&key(Verb::Status, &id(990))).is_some());
        assert!(d.answered(&key(Verb::Status, &id(999))).is_some());
        // Bigger replies leave room for fewer of them.
        let big = Bytes::from(vec![b'r'; 4 * 1000]);
        let k = key(Verb::Status, "big");
        d.begin(k.clone(), ());
        d.complete(k.clone(), big);
        assert!(d.bytes() <= budget);
        assert!(d.answered(&k).is_some());
        assert!(d.answered(&key(Verb::Status, &id(990))).is_none());
        assert!(d.answered(&key(Verb::Status, &id(999))).is_some());
        let left = d.answered_len();
        assert!(left < 10, "{left}");
        // One reply larger than the whole budget is not kept, and evicts nothing.
        let huge = key(Verb::Status, "huge");
        d.begin(huge.clone(), ());
        d.complete(huge.clone(), Bytes::from(vec![b'r'; budget]));
        assert!(d.answered(&huge).is_none());
        assert_eq!(d.answered_len(), left);
    }

    #[test]
    fn an_abandoned_request_is_not_remembered() {
        let mut d = Dedupe::new(1 << 20);
        let k = key(Verb::Drain, "d");
        assert_eq!(d.begin(k.clone(), 1), Some(1));
        assert_eq!(d.begin(k.clone(), 2), None);
        assert_eq!(d.abandon(&k), vec![2]);
        assert!(d.answered(&k).is_none());
        assert_eq!(d.begin(k, 3), Some(3), "a retry acts");
    }
}
