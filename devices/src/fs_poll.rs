//! Request polling: when the file-sharing device's worker waits for the guest's next request
//! by watching the ring rather than sleeping until the guest's kick.
//!
//! Theory of operation: this is policy only; the device (vhu_fs.rs) tells it when a kick
//! woke the worker and when it answered, and asks whether to keep watching. A guest that
//! runs a metadata storm (a build's stats, an untar, `git status`, an unlink loop) sends
//! its next request some tens of microseconds after each reply, one at a time. A worker that
//! sleeps between them pays a wake-up per request: the kick's eventfd, the scheduler, and on
//! an idle CPU the way out of its idle state (in a VM, an interrupt between virtual CPUs
//! through the hypervisor), 20 to 30 µs a request on the machines here, a quarter of a
//! stat's round trip under TCG. A worker that watches the ring for [`POLL_WINDOW`] after
//! each reply takes the next request as the guest posts it (measured: stat 9.1k → 12.0k
//! files/s, unlink 3.5k → 4.5k). It costs a CPU while it watches, so it watches only while
//! the guest's requests come that close: a kick that arrives within the window after the
//! last reply turns watching on, a window that passes with nothing turns it off. A guest
//! with one request a millisecond costs at most one window per gap that was short, and an
//! idle guest nothing (the idea of Linux's NAPI busy polling and vhost-net's
//! `busyloop_timeout`, made adaptive as NICs' interrupt moderation is).

use std::time::{Duration, Instant};

/// How long the worker watches the ring after a reply, and how close after a reply a kick
/// must come to turn watching on. Under TCG a stat's round trip is about 100 µs, an
/// unlink's 300 (300 µs caught fewer unlinks: 3.5–3.9k/s against 3.9–4.4k at 500 and 1000);
/// a guest on KVM sends its next request within microseconds.
pub(crate) const POLL_WINDOW: Duration = Duration::from_micros(500);

/// Whether one request queue is watched, and since when.
#[derive(Debug)]
pub(crate) struct FsPoll {
    window: Duration,
    /// Watching is on: the guest's last kick came within the window after a reply.
    on: bool,
    /// When the worker last answered a request from this queue.
    answered: Option<Instant>,
}

impl FsPoll {
    /// A queue watched for up to `window` after each reply (zero: never watched).
    pub fn new(window: Duration) -> Self {
        FsPoll {
            window,
            on: false,
            answered: None,
        }
    }

    /// A kick woke the worker at `now` and it found `found` requests: a request that came
    /// within the window after the last reply turns watching on. (A kick with nothing behind
    /// it is one the guest sent while the worker watched: it says nothing about the gap.)
    pub fn woke(&mut self, now: Instant, found: usize) {
        if found == 0 || self.window.is_zero() {
            return;
        }
        if let Some(at) = self.answered {
            if now.saturating_duration_since(at) < self.window {
                self.on = true;
            }
        }
    }

    /// Requests were answered at `now`.
    pub fn answered(&mut self, now: Instant) {
        self.answered = Some(now);
    }

    /// Whether to watch the ring after answering: watching is on.
    pub fn watching(&self) -> bool {
        self.on
    }

    /// Whether the window after the last reply is still open at `now`.
    pub fn within_window(&self, now: Instant) -> bool {
        self.answered
            .is_some_and(|at| now.saturating_duration_since(at) < self.window)
    }

    /// A window passed with no request: watching turns off until a kick comes close again.
    pub fn missed(&mut self) {
        self.on = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = POLL_WINDOW;

    #[test]
    fn a_request_close_after_a_reply_turns_watching_on_and_an_empty_window_off() {
        let t0 = Instant::now();
        let mut p = FsPoll::new(W);
        p.woke(t0, 1);
        assert!(!p.watching(), "nothing answered yet");
        p.answered(t0);
        p.woke(t0 + W / 3, 1);
        assert!(p.watching());
        assert!(p.within_window(t0 + W / 2));
        assert!(!p.within_window(t0 + W));
        p.missed();
        assert!(!p.watching());
    }

    #[test]
    fn slow_or_empty_kicks_leave_watching_off() {
        let t0 = Instant::now();
        let mut p = FsPoll::new(W);
        p.answered(t0);
        p.woke(t0 + 2 * W, 1);
        assert!(!p.watching(), "a request a while after the reply");
        p.woke(t0 + W / 3, 0);
        assert!(!p.watching(), "a kick with no request behind it");
    }

    #[test]
    fn a_zero_window_never_watches() {
        let t0 = Instant::now();
        let mut p = FsPoll::new(Duration::ZERO);
        p.answered(t0);
        p.woke(t0, 1);
        assert!(!p.watching());
    }
}
