//! The reload queue: a plain state machine that serializes and coalesces reloads.
//!
//! - One reload runs at a time.
//! - A request that arrives while the queue is idle starts at once: coalescing never delays a lone
//!   reload.
//! - Requests that arrive while a reload runs join ONE queued batch, which starts when the running
//!   reload finishes (and, with `coalesce` set, no sooner than `coalesce` after it finished). Every
//!   requester of a batch gets that batch's result, which is the reload that applied to it.
//! - A pushed config that differs from the one already queued does not coalesce: it is a conflict.
//! - A batch holds at most `max_waiters` requests: past that, a request is a conflict at once, so
//!   a flood of reloads cannot grow the agent's memory without bound.

use std::time::{Duration, Instant};

/// A config pushed with a `reload` command, identified by its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedConfig {
    pub sha256: String,
    pub text: String,
}

/// Reload requests that are carried out by one launch.
#[derive(Debug)]
pub struct Batch<W> {
    pub waiters: Vec<W>,
    pub config: Option<PushedConfig>,
    /// When it may start: at once for a lone request; `coalesce` after the previous reload
    /// finished for a batch that gathered during it.
    ready_at: Instant,
}

/// How many requests may wait for the next reload by default. Each one is a reply owed to a
/// client: hundreds already mean something upstream retries in a loop.
pub const MAX_WAITERS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error(
        "another config (sha256 {queued}) is already queued for the next reload; retry after it"
    )]
    OtherConfig { queued: String },
    #[error("{waiters} reload requests already wait for the next reload; retry once it is done")]
    Full { waiters: usize },
}

/// The reload being carried out: the batch it answers and what it was started with. The queue is
/// the one owner of the fact "a reload is running".
#[derive(Debug)]
pub struct Running<W> {
    pub batch: Batch<W>,
    pub reload_id: String,
    pub started: Instant,
    /// Its worker was started into a drain (`EBB_DRAINING=1`): if the drain ends meanwhile, the
    /// new worker must be told.
    pub draining: bool,
}

#[derive(Debug)]
pub struct ReloadQueue<W> {
    running: Option<Running<W>>,
    queued: Option<Batch<W>>,
    coalesce: Duration,
    max_waiters: usize,
}

impl<W> ReloadQueue<W> {
    pub fn new(coalesce: Duration) -> Self {
        ReloadQueue {
            running: None,
            queued: None,
            coalesce,
            max_waiters: MAX_WAITERS,
        }
    }

    /// Caps the requests one batch may hold (at least one).
    pub fn with_max_waiters(mut self, max_waiters: usize) -> Self {
        self.max_waiters = max_waiters.max(1);
        self
    }

    pub fn running(&self) -> Option<&Running<W>> {
        self.running.as_ref()
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    pub fn has_queued(&self) -> bool {
        self.queued.is_some()
    }

    /// Adds a request. On conflict the waiter is handed back, to be answered with `conflict`.
    pub fn request(
        &mut self,
        waiter: W,
        config: Option<PushedConfig>,
        now: Instant,
    ) -> Result<(), (W, Conflict)> {
        match &mut self.queued {
            None => {
                self.queued = Some(Batch {
                    waiters: vec![waiter],
                    config,
                    // Re-set by `finish` when a reload is running.
                    ready_at: now,
                });
            }
            Some(batch) if batch.waiters.len() >= self.max_waiters => {
                let waiters = batch.waiters.len();
                return Err((waiter, Conflict::Full { waiters }));
            }
            Some(batch) => match (&batch.config, config) {
                (Some(queued), Some(new)) if queued.sha256 != new.sha256 => {
                    let queued = queued.sha256.clone();
                    return Err((waiter, Conflict::OtherConfig { queued }));
                }
                (None, Some(new)) => {
                    batch.config = Some(new);
                    batch.waiters.push(waiter);
                }
                _ => batch.waiters.push(waiter),
            },
        }
        Ok(())
    }

    /// When the queued batch may start, if there is one and nothing runs.
    pub fn next_start(&self) -> Option<Instant> {
        let batch = self.queued.as_ref()?;
        self.running.is_none().then_some(batch.ready_at)
    }

    /// Starts the queued batch, if one is due: from now until `finish`, it is the running reload.
    pub fn start(
        &mut self,
        now: Instant,
        reload_id: String,
        draining: bool,
    ) -> Option<&Running<W>> {
        if self.next_start()? > now {
            return None;
        }
        let batch = self.queued.take()?;
        self.running = Some(Running {
            batch,
            reload_id,
            started: now,
            draining,
        });
        self.running.as_ref()
    }

    /// Takes the queued batch without starting it, if one is due: it is refused as a whole.
    pub fn refuse_due(&mut self, now: Instant) -> Option<Batch<W>> {
        if self.next_start()? > now {
            return None;
        }
        self.queued.take()
    }

    /// The running reload is over (either way): hands it back, to answer its waiters.
    pub fn finish(&mut self, now: Instant) -> Option<Running<W>> {
        if let Some(batch) = &mut self.queued {
            batch.ready_at = now + self.coalesce;
        }
        self.running.take()
    }

    /// Hands back every queued waiter, for answering when the node stops.
    pub fn drain_queued(&mut self) -> Vec<W> {
        self.queued.take().map(|b| b.waiters).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(q: &mut ReloadQueue<i32>, now: Instant) -> Option<&Running<i32>> {
        q.start(now, "r".into(), false)
    }

    fn cfg(text: &str) -> Option<PushedConfig> {
        Some(PushedConfig {
            sha256: format!("sha-{text}"),
            text: text.into(),
        })
    }

    #[test]
    fn a_lone_reload_starts_at_once_even_with_a_debounce() {
        let now = Instant::now();
        let mut q = ReloadQueue::new(Duration::from_secs(5));
        q.request(1, None, now).expect("queued");
        let b = start(&mut q, now).expect("starts");
        assert_eq!(b.batch.waiters, vec![1]);
        q.finish(now);
        // Idle again: the next lone request is not delayed by the debounce either.
        q.request(2, None, now).expect("queued");
        assert_eq!(start(&mut q, now).expect("starts").batch.waiters, vec![2]);
    }

    #[test]
    fn requests_during_a_reload_coalesce_into_the_next_one() {
        let now = Instant::now();
        let mut q = ReloadQueue::new(Duration::ZERO);
        q.request(1, None, now).expect("queued");
        let _running = start(&mut q, now).expect("starts");
        for w in 2..=5 {
            q.request(w, None, now).expect("joins");
        }
        assert!(
            start(&mut q, now).is_none(),
            "serialized: nothing starts while one runs"
        );
        q.finish(now);
        let next = start(&mut q, now).expect("the coalesced batch starts");
        assert_eq!(next.batch.waiters, vec![2, 3, 4, 5]);
        assert!(start(&mut q, now).is_none());
    }

    #[test]
    fn debounce_applies_only_to_coalesced_batches() {
        let now = Instant::now();
        let mut q = ReloadQueue::new(Duration::from_millis(100));
        q.request(1, None, now).expect("queued");
        let _ = start(&mut q, now).expect("starts");
        q.request(2, None, now).expect("joins");
        q.finish(now);
        assert_eq!(q.next_start(), Some(now + Duration::from_millis(100)));
        assert!(start(&mut q, now + Duration::from_millis(99)).is_none());
        assert!(start(&mut q, now + Duration::from_millis(100)).is_some());
    }

    #[test]
    fn differing_pushed_configs_conflict_and_equal_ones_join() {
        let now = Instant::now();
        let mut q = ReloadQueue::new(Duration::ZERO);
        q.request(1, None, now).expect("queued");
        let _ = start(&mut q, now);
        q.request(2, cfg("a"), now)
            .expect("first pushed config queues");
        q.request(3, cfg("a"), now).expect("the same config joins");
        q.request(4, None, now).expect("a plain reload joins");
        let (w, c) = q
            .request(5, cfg("b"), now)
            .expect_err("another config conflicts");
        assert_eq!(w, 5);
        assert_eq!(
            c,
            Conflict::OtherConfig {
                queued: cfg("a").expect("cfg").sha256
            }
        );
        q.finish(now);
        let b = start(&mut q, now).expect("starts");
        assert_eq!(b.batch.waiters, vec![2, 3, 4]);
        assert_eq!(b.batch.config, cfg("a"));
    }

    #[test]
    fn a_pushed_config_adopts_a_queued_plain_batch() {
        let now = Instant::now();
        let mut q = ReloadQueue::new(Duration::ZERO);
        q.request(1, None, now).expect("queued");
        let _ = start(&mut q, now);
        q.request(2, None, now).expect("queued");
        q.request(3, cfg("a"), now)
            .expect("joins and brings its config");
        q.finish(now);
        let b = start(&mut q, now).expect("starts");
        assert_eq!(b.batch.config, cfg("a"));
        assert_eq!(b.batch.waiters, vec![2, 3]);
    }

    #[test]
    fn queued_waiters_are_handed_back() {
        let now = Instant::now();
        let mut q = ReloadQueue::new(Duration::ZERO);
        q.request(1, None, now).expect("queued");
        let _ = start(&mut q, now);
        q.request(2, None, now).expect("queued");
        assert_eq!(q.drain_queued(), vec![2]);
        assert!(!q.has_queued());
    }

    #[test]
    fn a_flood_of_reloads_cannot_grow_the_queue_without_bound() {
        let now = Instant::now();
        let mut q = ReloadQueue::new(Duration::ZERO).with_max_waiters(3);
        q.request(0, None, now).expect("queued");
        let _ = start(&mut q, now);
        for w in 1..=3 {
            q.request(w, None, now).expect("joins");
        }
        let (w, c) = q.request(4, None, now).expect_err("the batch is full");
        assert_eq!(w, 4);
        assert_eq!(c, Conflict::Full { waiters: 3 });
        assert!(
            c.to_string().contains("3 reload requests already wait"),
            "{c}"
        );
        q.finish(now);
        assert_eq!(
            start(&mut q, now).expect("starts").batch.waiters,
            vec![1, 2, 3]
        );
        // Once the batch started, requests queue again.
        q.request(5, None, now).expect("a new batch");
    }

    #[test]
    fn the_default_cap_is_256_waiters() {
        let now = Instant::now();
        let mut q = ReloadQueue::new(Duration::ZERO);
        q.request(0, None, now).expect("queued");
        let _ = start(&mut q, now);
        for w in 1..=MAX_WAITERS as i32 {
            q.request(w, None, now).expect("joins");
        }
        assert!(q.request(-1, None, now).is_err());
    }

    #[test]
    fn a_refused_batch_is_taken_whole_and_only_when_due() {
        let now = Instant::now();
        let mut q = ReloadQueue::new(Duration::from_millis(100));
        q.request(1, None, now).expect("queued");
        let _ = start(&mut q, now);
        q.request(2, None, now).expect("joins");
        assert!(q.refuse_due(now).is_none(), "not while a reload runs");
        q.finish(now);
        assert!(
            q.refuse_due(now).is_none(),
            "not before its coalesce window"
        );
        let refused = q.refuse_due(now + Duration::from_millis(100)).expect("due");
        assert_eq!(refused.waiters, vec![2]);
        assert!(!q.has_queued());
    }
}
