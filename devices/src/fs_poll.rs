//! Request polling: when the file-sharing device's worker waits for the guest's next request
//! by watching the ring rather than sleeping until the guest's kick.
//!
//! Theory of operation: this is policy only; the device (vhu_fs.rs) tells it when a kick
//! woke the worker, when it answered and how large the requests were, and asks how long to
//! watch. A guest that runs a metadata storm (a build's stats, an untar, `git status`) or
//! small synchronous reads and writes sends its next request soon after each reply, one at a
//! time. A worker that sleeps between them pays a wake-up per request: the kick's eventfd,
//! the scheduler, and the way out of an idle CPU's sleep state (deep C-states on a laptop, an
//! interrupt between virtual CPUs through the hypervisor in a cloud VM: 20 to 30 µs a request
//! on the machines here, a fifth of a stat's round trip under TCG). A worker that watches the
//! ring a little after each reply takes the next request as the guest posts it.
//!
//! Watching costs a CPU while it lasts, so how long is adaptive, as KVM's halt polling
//! (`halt_poll_ns`) and QEMU's event loop (`poll-max-ns`) do: the window starts at zero; a
//! wake-up whose request came within the maximum after the last reply, but after the window,
//! doubles it (from [`POLL_START`]); one that came later than the maximum halves it. A guest
//! whose requests come further apart than the maximum is never watched for, and an idle one
//! costs nothing. The maximum is the share's `poll=`, by default [`POLL_MAX`], KVM's default
//! `halt_poll_ns` on x86: the cap of the window KVM spins for after a vCPU halts, before it
//! puts the vCPU to sleep. On KVM a guest's next request should follow a reply within tens
//! of microseconds, and the window stay that short; under TCG most come 25 to 100 µs later.
//!
//! After a reply to a request that brought or took more than [`BULK_BYTES`], headers included
//! (a read or write of 64 KiB or more), the worker does not watch: the wake-up is a few
//! percent of such a request's round trip, and the guest needs the CPU a watch would take to
//! fill or drain the next one (under TCG a 500 µs watch after every reply made 1 MiB writes
//! slower, docs/performance.md). The window itself still follows the gaps between such
//! requests, so the first small request after a stream of large ones may be watched for as
//! long as they came apart.

use std::time::{Duration, Instant};

/// The longest the worker watches after a reply, unless the share says otherwise.
pub(crate) const POLL_MAX: Duration = Duration::from_micros(200);

/// A request that moves more than this (its payload or its reply) is bulk: no watch after it.
pub(crate) const BULK_BYTES: usize = 64 * 1024;

/// Where a window that grows starts.
pub(crate) const POLL_START: Duration = Duration::from_micros(4);

/// How long the worker watches one request queue after each reply.
#[derive(Debug)]
pub(crate) struct FsPoll {
    max: Duration,
    /// The window now (zero: the worker sleeps until the kick).
    window: Duration,
    /// When the worker last answered a request from this queue.
    answered: Option<Instant>,
    /// The last replies included a bulk request: no watch after them.
    bulk: bool,
}

impl FsPoll {
    /// A queue whose window may grow up to `max` (zero: never watched).
    pub fn new(max: Duration) -> Self {
        FsPoll {
            max,
            window: Duration::ZERO,
            answered: None,
            bulk: false,
        }
    }

    /// A kick woke the worker at `now` and it found `found` requests: the time since the last
    /// reply is what a watch would have had to last. (A kick with nothing behind it is one
    /// the guest sent while the worker watched: it says nothing about the gap.)
    pub fn woke(&mut self, now: Instant, found: usize) {
        let Some(at) = self.answered.filter(|_| found > 0) else {
            return;
        };
        let gap = now.saturating_duration_since(at);
        if gap > self.max {
            // Too far apart to watch for: watch less.
            self.window /= 2;
            if self.window < POLL_START {
                self.window = Duration::ZERO;
            }
        } else if gap > self.window {
            // Within reach: watch longer.
            self.window = (self.window * 2).max(POLL_START).min(self.max);
        }
    }

    /// Requests were answered at `now`, the largest of them moving `largest` bytes.
    pub fn answered(&mut self, now: Instant, largest: usize) {
        self.answered = Some(now);
        self.bulk = largest > BULK_BYTES;
    }

    /// Whether to watch the ring after the last reply at all.
    pub fn watching(&self) -> bool {
        !self.window.is_zero() && !self.bulk
    }

    /// Whether the window after the last reply is still open at `now`.
    pub fn within_window(&self, now: Instant) -> bool {
        !self.bulk
            && self
                .answered
                .is_some_and(|at| now.saturating_duration_since(at) < self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(400);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn requests_within_reach_grow_the_window_up_to_the_maximum() {
        let t = Instant::now();
        let mut p = FsPoll::new(MAX);
        p.woke(t, 1);
        assert!(!p.watching(), "nothing answered yet");
        p.answered(t, 100);
        p.woke(t + us(100), 1);
        assert_eq!(p.window, POLL_START);
        for _ in 0..10 {
            p.answered(t, 100);
            p.woke(t + us(300), 1);
        }
        assert_eq!(p.window, MAX, "grown to the maximum, no further");
        assert!(p.within_window(t + us(399)));
        assert!(!p.within_window(t + us(400)));
    }

    /// A window grown by requests 100 µs after a reply at `t`.
    fn grown(t: Instant) -> FsPoll {
        let mut p = FsPoll::new(MAX);
        p.answered(t, 100);
        for _ in 0..8 {
            p.woke(t + us(100), 1);
        }
        assert!(p.watching());
        p
    }

    #[test]
    fn requests_further_apart_than_the_maximum_shrink_it_to_nothing() {
        let t = Instant::now();
        let mut p = grown(t);
        for _ in 0..12 {
            p.woke(t + us(5000), 1);
        }
        assert!(!p.watching(), "halved down to zero");
    }

    #[test]
    fn a_kick_with_no_request_or_a_zero_maximum_changes_nothing() {
        let t = Instant::now();
        let mut p = FsPoll::new(MAX);
        p.answered(t, 100);
        p.woke(t + us(10), 0);
        assert!(!p.watching());
        let mut off = FsPoll::new(Duration::ZERO);
        off.answered(t, 100);
        off.woke(t, 1);
        assert!(!off.watching());
    }

    #[test]
    fn no_watch_after_a_bulk_request_until_small_ones_come_again() {
        let t = Instant::now();
        let mut p = grown(t);
        p.answered(t, 1 << 20);
        assert!(!p.watching(), "a 1 MiB read or write is not watched after");
        assert!(!p.within_window(t + us(1)));
        p.answered(t, BULK_BYTES);
        assert!(
            p.watching(),
            "the window is kept for the small requests after it"
        );
        assert!(p.within_window(t + us(1)));
    }
}
