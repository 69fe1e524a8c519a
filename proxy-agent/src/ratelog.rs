//! A gate for repeated log lines: a failure that repeats (accepts failing with EMFILE, a
//! directory that cannot be read) is logged at most once per period, with the count of what
//! was held back, so a stuck condition never floods the log.

use std::time::{Duration, Instant};

/// `ready()` is true at most once per period; it counts what it held back.
#[derive(Debug)]
pub struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::every(Duration::from_secs(1))
    }
}

impl RateLimitedLog {
    /// A gate that opens at most once per `every`.
    pub fn every(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether to log now; `Some(n)`: yes, and `n` earlier events were not logged.
    pub fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_it_held_back() {
        let mut g = RateLimitedLog::default();
        assert_eq!(g.ready(), Some(0));
        assert_eq!(g.ready(), None);
        assert_eq!(g.ready(), None);
        g.last = Some(Instant::now() - Duration::from_secs(1));
        assert_eq!(g.ready(), Some(2));
    }
}
