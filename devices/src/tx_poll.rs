//! TX coalescing: when the net device reads the guest's TX queue without waiting for a kick.
//!
//! Theory of operation: this is policy only. The device (vhu_net.rs) tells it when the guest
//! kicked and what each drain found; it answers whether the guest is streaming (leave its
//! kicks off and poll) and how long the next poll waits. Nothing here touches a queue.

/// TX coalescing, the idea of QEMU's virtio-net `tx=timer` (150 µs there), made adaptive. A
/// guest that kicks again less than [`TX_STREAMING`] after its previous kick is streaming, or
/// less than [`TX_BULK_STREAMING`] after it when its previous drain was a bulk sender's (a
/// frame of [`TX_BULK`] bytes or more): its kicks are left off, and the TX queue is polled a while after each
/// drain that found frames. Kicks come back on when a poll finds the queue empty, and as soon
/// as frames go to the guest that it may be waiting to answer, so request/response traffic
/// never waits for a poll. After a bulk drain a bare TCP ACK is not such a frame: the guest
/// that gets it is sending, and its next segments can wait for the poll. After small frames
/// (connections opening and closing, requests) any frame is, since what the guest sends next
/// may be a new connection's SYN.
///
/// Under TCG a kick costs the guest an exit and the backend a wake-up per frame, and each
/// wake-up costs more than the frame's bytes. How long a poll waits adapts, as NICs' adaptive
/// interrupt moderation does, to what the polls find: see [`TxPoll::adapt`].
pub(crate) const TX_STREAMING: std::time::Duration = std::time::Duration::from_micros(200);

/// How close a bulk sender's kicks must be for it to be streaming. Under TCG a guest served
/// a kick, an ACK interrupt and a TX interrupt per 64 KiB segment spends so much on them that
/// its segments come 400–500 µs apart, and it stays there at half its speed (the backend never
/// sees it streaming at 200 µs); polled, it sends one every 180 µs.
pub(crate) const TX_BULK_STREAMING: std::time::Duration = std::time::Duration::from_millis(1);

/// A drain with a frame this large was a bulk sender's: a TCP segment bigger than requests
/// and handshakes make (a guest with the default 65520-byte MTU sends 64 KiB segments). At a
/// 1500-byte MTU a bulk sender's frames come closer than [`TX_STREAMING`] anyway.
pub(crate) const TX_BULK: usize = 16 * 1024;

/// The shortest wait between polls, where every streaming guest starts.
pub(crate) const TX_POLL_MIN: std::time::Duration = std::time::Duration::from_micros(200);

/// The longest wait between polls. Longer holds a TCP sender's sent frames (and so its TCP
/// small-queue budget) too long.
pub(crate) const TX_POLL_MAX: std::time::Duration = std::time::Duration::from_micros(1000);

/// How much one poll lengthens or shortens the wait.
pub(crate) const TX_POLL_STEP: std::time::Duration = std::time::Duration::from_micros(100);

/// Where TX coalescing stands.
#[derive(Debug)]
pub(crate) struct TxPoll {
    /// When the TX queue is to be polled (None: the guest's kicks are on).
    pub at: Option<std::time::Instant>,
    /// When the guest last kicked.
    pub last_kick: Option<std::time::Instant>,
    /// How long after a drain the next poll comes.
    pub wait: std::time::Duration,
    /// The last drain that found frames took one of at least [`TX_BULK`] bytes.
    pub bulk: bool,
}

impl Default for TxPoll {
    fn default() -> Self {
        TxPoll {
            at: None,
            last_kick: None,
            wait: TX_POLL_MIN,
            bulk: false,
        }
    }
}

impl TxPoll {
    /// Adapts the wait to the `found` frames a poll took, from a bulk sender (`self.bulk`) or
    /// not:
    /// - none or one, from a sender of big frames: it is slower than the wait (a guest the
    ///   host starves of CPU sends a 64 KiB segment every 500 µs or so, and a shorter wait
    ///   would wake the backend twice per segment, once for nothing), so the wait grows by a
    ///   step, up to [`TX_POLL_MAX`]. (A poll that finds none also turns the kicks back on,
    ///   so a sender that stopped waits for nothing.);
    /// - none or one, from other senders: the guest may be waiting on what the poll gives it
    ///   (the completions of what it sent, which hold its socket's send budget), so the wait
    ///   halves, down to [`TX_POLL_MIN`];
    /// - a few (2 to 7): batching works and costs nobody, so the wait grows by a step;
    /// - many: a stream of small frames (UDP), which a longer wait would turn into bursts, so
    ///   it stays.
    pub fn adapt(&mut self, found: usize) {
        self.wait = match found {
            0 | 1 if !self.bulk => (self.wait / 2).max(TX_POLL_MIN),
            0..=7 => (self.wait + TX_POLL_STEP).min(TX_POLL_MAX),
            _ => self.wait,
        };
    }
}
