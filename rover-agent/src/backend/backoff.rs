//! Exponential backoff with jitter, so that agents of a whole cluster that lost the OAP at once
//! do not come back at once.

use std::time::Duration;

use rand::Rng as _;

#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// How long to wait after another failure: a random time in [d/2, d], d doubling up to max.
    pub fn failed(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=ceiling - half)
    }

    /// A call succeeded: the next failure waits the initial delay again.
    pub fn succeeded(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_up_to_max_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        for ceiling in [1, 2, 4, 5, 5] {
            let wait = backoff.failed();
            let ceiling = Duration::from_secs(ceiling);
            assert!(
                wait >= ceiling / 2 && wait <= ceiling,
                "{wait:?} vs {ceiling:?}"
            );
        }
        backoff.succeeded();
        assert!(backoff.failed() <= Duration::from_secs(1));
    }
}
