//! Interrupts that the guest's `used_event` does not ask for, sent so that none stays lost.
//!
//! Theory of operation. With EVENT_IDX a device interrupts the guest only when its used index
//! crosses the `used_event` the guest last wrote, and the guest moves `used_event` on only when
//! it takes what it was told of. So one interrupt that never arrives leaves the guest waiting
//! for good: `used_event` stays behind entries it never looked at, and every later crossing
//! test says it has been told. That happens when ferry is killed and started again under a
//! running guest (QEMU reconnecting): the process that died may have filled the used ring and
//! not yet interrupted, and an interrupt the new one sends while QEMU is still wiring its
//! notifiers can be dropped on the way. Seen here in the restart stress runs: 7 frames
//! delivered into an RX ring whose `used_event` stood 76 entries back, the first interrupt of
//! the connection sent, and the guest's RX interrupt count frozen.
//!
//! Two rules, each costing at most one extra wake-up for the guest (which finds nothing new,
//! or what it missed):
//! - each ring gets an interrupt at its first event of a connection (the relay kicks every
//!   ring once as it is set up);
//! - a ring that the device fills (RX) or takes chains from (TX) while the guest asks for no
//!   interrupt, and that has had none for [`LOST_AFTER`], gets one anyway (a guest that lost
//!   a TX interrupt waits for it to free what it sent, and stops sending once the ring is
//!   full). A guest that is busy taking entries (Linux
//!   leaves `used_event` behind while its NAPI poll runs) sees at most one such interrupt
//!   per [`LOST_AFTER`]; a guest that lost one is woken within that time of the next frame.
//!
//! QEMU's own virtio code makes the first rule too, when it takes rings back from a vhost
//! backend: it forgets which used index it last signalled
//! (`virtio_queue_invalidate_signalled_used`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;

use crate::Vring;

/// How long a ring the device fills may go without an interrupt.
pub(crate) const LOST_AFTER: Duration = Duration::from_millis(100);

/// Per ring: whether it had its first interrupt of the connection, and when its last one went.
pub(crate) struct LostInterrupts {
    /// One bit per ring.
    given: AtomicU64,
    /// Microseconds after `epoch` of each ring's last interrupt.
    last: Vec<AtomicU64>,
    epoch: Instant,
}

impl LostInterrupts {
    /// For a device of `rings` rings.
    pub(crate) fn new(rings: usize) -> Self {
        LostInterrupts {
            given: AtomicU64::new(0),
            last: (0..rings).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Interrupts the guest for ring `index` of `vrings` if it has not had its first
    /// interrupt of the connection yet (and once the frontend has given its call descriptor).
    pub(crate) fn first_event(&self, vrings: &[Vring], index: usize) {
        let bit = 1u64 << index.min(63);
        if self.given.load(Ordering::Relaxed) & bit != 0 {
            return;
        }
        let Some(vring) = vrings.get(index) else {
            return;
        };
        if vring.get_ref().get_call().is_none() {
            return;
        }
        match vring.signal_used_queue() {
            Ok(()) => {
                self.given.fetch_or(bit, Ordering::Relaxed);
                self.signalled(index);
                log::debug!("ring {index}: the first interrupt of the connection");
            }
            Err(e) => log::debug!("cannot interrupt the guest for ring {index}: {e}"),
        }
    }

    /// Ring `index` has just been interrupted.
    pub(crate) fn signalled(&self, index: usize) {
        if let Some(l) = self.last.get(index) {
            l.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Whether ring `index`, which the device filled and the guest asks no interrupt for, has
    /// gone [`LOST_AFTER`] without one (the caller interrupts it, and says so).
    pub(crate) fn overdue(&self, index: usize) -> bool {
        self.last.get(index).is_some_and(|l| {
            self.now().saturating_sub(l.load(Ordering::Relaxed)) >= LOST_AFTER.as_micros() as u64
        })
    }

    /// A new connection: every ring gets its first interrupt again.
    pub(crate) fn reset(&self) {
        self.given.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn each_ring_is_interrupted_once_per_connection_once_it_has_a_call_descriptor() {
        let m = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mem = crate::GuestMemoryAtomic::new(m);
        let vrings = [
            Vring::new(mem.clone(), 16).unwrap(),
            Vring::new(mem, 16).unwrap(),
        ];
        let lost = LostInterrupts::new(2);
        // No call descriptor yet: nothing to signal, and the ring still has its turn.
        lost.first_event(&vrings, 0);
        let call = crate::call_eventfd(&vrings[0]);
        lost.first_event(&vrings, 0);
        assert_eq!(call.read().unwrap(), 1, "the first interrupt");
        lost.first_event(&vrings, 0);
        assert!(call.read().is_err(), "only one per connection");
        lost.first_event(&vrings, 5); // no such ring: nothing happens
        lost.reset();
        lost.first_event(&vrings, 0);
        assert_eq!(call.read().unwrap(), 1, "again on the next connection");
    }

    #[test]
    fn a_ring_is_overdue_once_it_went_without_an_interrupt_for_a_while() {
        let lost = LostInterrupts::new(2);
        lost.signalled(0);
        assert!(!lost.overdue(0));
        std::thread::sleep(LOST_AFTER + Duration::from_millis(20));
        assert!(lost.overdue(0));
        lost.signalled(0);
        assert!(!lost.overdue(0));
        assert!(!lost.overdue(9), "no such ring");
    }
}
