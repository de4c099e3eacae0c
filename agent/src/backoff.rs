//! Capped exponential backoff for restarting a crashed worker.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// A worker that ran at least this long before crashing starts the sequence over.
    stable_after: Duration,
    attempts: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, stable_after: Duration) -> Self {
        Backoff {
            base,
            cap,
            stable_after,
            attempts: 0,
        }
    }

    /// The wait before the next restart, given how long the crashed worker ran.
    pub fn next(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.stable_after {
            self.attempts = 0;
        }
        let delay = self
            .base
            .saturating_mul(2u32.saturating_pow(self.attempts))
            .min(self.cap);
        self.attempts = self.attempts.saturating_add(1);
        delay
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets_after_a_stable_run() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000), Duration::from_secs(30));
        let short = ms(10);
        let delays: Vec<_> = (0..6).map(|_| b.next(short)).collect();
        assert_eq!(
            delays,
            vec![ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        assert_eq!(b.next(Duration::from_secs(31)), ms(100));
        assert_eq!(b.next(short), ms(200));
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::MAX,
        );
        for _ in 0..200 {
            assert!(b.next(Duration::ZERO) <= Duration::from_secs(60));
        }
    }
}
