//! When the worker of a share with a pool answers a small write itself.
//!
//! Theory of operation: this is policy only. The device (vhu_fs.rs) asks before each small
//! buffered WRITE to a local file system (`ferry_fs::Server::is_quick_write`: no network or
//! other process behind it, which could hold the worker and its ring for good) whether to
//! answer it where it took it, and says how long the ones it answered took. A write into
//! the host's page cache takes microseconds, less than handing it to a pool thread (that
//! thread's wake-up); but it can wait on the host: dirty-page throttling when the host's
//! disk falls behind, a journal commit, the read of a partly written page. While the worker
//! waits, every other request of the queue waits too, which is what the pool is for. So a
//! write that took longer than [`SLOW`] hands the writes to the pool for a while
//! ([`PAUSE_START`], doubling while the first write after each pause is slow again, up to
//! [`PAUSE_MAX`]), and one that is quick again ends the doubling: the queue waits behind
//! one slow write per pause (a local disk that hangs holds it, as it would hold every pool
//! thread). (Reads need no such rule: `preadv2(RWF_NOWAIT)` says whether one would read the
//! disk. Buffered writes with RWF_NOWAIT are refused by ext4, EOPNOTSUPP.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A write that took longer than this waited on something besides the copy.
pub(crate) const SLOW: Duration = Duration::from_micros(500);

/// How long writes go to the pool after the first slow one.
pub(crate) const PAUSE_START: Duration = Duration::from_millis(100);

/// The longest they do.
pub(crate) const PAUSE_MAX: Duration = Duration::from_secs(10);

/// Whether the worker answers small writes now; shared by a device's workers.
#[derive(Debug)]
pub(crate) struct InlineWrites {
    base: Instant,
    /// Nanoseconds after `base` before which writes go to the pool.
    until: AtomicU64,
    /// The last pause, in nanoseconds (zero: the last write was quick).
    pause: AtomicU64,
}

impl InlineWrites {
    pub fn new() -> Self {
        InlineWrites {
            base: Instant::now(),
            until: AtomicU64::new(0),
            pause: AtomicU64::new(0),
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Whether to answer a small write at `now` rather than hand it to the pool.
    pub fn allowed(&self, now: Instant) -> bool {
        self.ns(now) >= self.until.load(Ordering::Relaxed)
    }

    /// A write the worker answered ended at `now`, having taken `took`.
    pub fn took(&self, now: Instant, took: Duration) {
        if took <= SLOW {
            self.pause.store(0, Ordering::Relaxed);
            return;
        }
        let last = Duration::from_nanos(self.pause.load(Ordering::Relaxed));
        let pause = (last * 2).clamp(PAUSE_START, PAUSE_MAX);
        self.pause.store(pause.as_nanos() as u64, Ordering::Relaxed);
        self.until.store(self.ns(now + pause), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_micros(20);
    const SLOWER: Duration = Duration::from_millis(3);

    #[test]
    fn a_slow_write_hands_writes_to_the_pool_for_a_pause_that_doubles_while_they_stay_slow() {
        let w = InlineWrites::new();
        let t = Instant::now();
        assert!(w.allowed(t));
        w.took(t, QUICK);
        assert!(w.allowed(t), "quick writes stay with the worker");
        w.took(t, SLOWER);
        assert!(!w.allowed(t + PAUSE_START - Duration::from_millis(1)));
        let t = t + PAUSE_START;
        assert!(w.allowed(t), "tried again after the pause");
        w.took(t, SLOWER);
        assert!(
            !w.allowed(t + 2 * PAUSE_START - Duration::from_millis(1)),
            "doubled"
        );
        let t = t + 2 * PAUSE_START;
        assert!(w.allowed(t));
        w.took(t, QUICK);
        w.took(t, SLOWER);
        assert!(
            w.allowed(t + PAUSE_START),
            "a quick write ends the doubling"
        );
        for _ in 0..20 {
            w.took(t, SLOWER);
        }
        assert!(w.allowed(t + PAUSE_MAX), "no longer than the maximum");
    }
}
