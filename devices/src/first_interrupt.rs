//! One interrupt on each ring at the start of a connection, whether or not anything is new.
//!
//! Theory of operation. With EVENT_IDX a device interrupts the guest only when its used index
//! crosses the `used_event` the guest last wrote, and the guest moves `used_event` on only
//! when it takes what it was told of. A device that takes over rings another left (ferry
//! killed and started again under a running guest, QEMU reconnecting) cannot know whether
//! the one before sent the interrupt for the last entries it put in the used ring. If it died
//! between the two, the guest never looks at them, `used_event` stays behind them, and every
//! later crossing test says the guest has been told already: the guest's NIC hears nothing
//! again, for good. (Seen here: 7 frames delivered into a ring whose `used_event` stood 143
//! entries back, and the guest's RX interrupt count frozen.) So each ring gets one interrupt
//! at its first event of each connection (the relay kicks every ring once as it is set up);
//! a guest with nothing to take finds its ring as it left it, and costs one wake-up. QEMU's
//! own virtio code does the same when it takes rings back from a vhost backend: it forgets
//! which used index it last signalled (`virtio_queue_invalidate_signalled_used`), so its next
//! interrupt goes out whatever `used_event` says.

use std::sync::atomic::{AtomicU64, Ordering};

use vhost_user_backend::VringT;

use crate::Vring;

/// The rings that have had their first interrupt of the connection, one bit each.
#[derive(Default)]
pub(crate) struct FirstInterrupts(AtomicU64);

impl FirstInterrupts {
    /// Interrupts the guest for ring `index` of `vrings` if it has not had its first
    /// interrupt of the connection yet (and once the frontend has given its call descriptor).
    pub(crate) fn give(&self, vrings: &[Vring], index: usize) {
        let bit = 1u64 << index.min(63);
        if self.0.load(Ordering::Relaxed) & bit != 0 {
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
                self.0.fetch_or(bit, Ordering::Relaxed);
            }
            Err(e) => log::debug!("cannot interrupt the guest for ring {index}: {e}"),
        }
    }

    /// A new connection: every ring gets its first interrupt again.
    pub(crate) fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn each_ring_is_interrupted_once_per_connection_once_it_has_a_call_descriptor() {
        let m = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mem = crate::GuestMemoryAtomic::new(m);
        let vrings = [
            Vring::new(mem.clone(), 16).unwrap(),
            Vring::new(mem, 16).unwrap(),
        ];
        let first = FirstInterrupts::default();
        // No call descriptor yet: nothing to signal, and the ring still has its turn.
        first.give(&vrings, 0);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: the descriptor is a fresh duplicate that the File alone owns.
        let file = unsafe { std::fs::File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
        vrings[0].set_call(Some(file));
        first.give(&vrings, 0);
        assert_eq!(call.read().unwrap(), 1, "the first interrupt");
        first.give(&vrings, 0);
        assert!(call.read().is_err(), "only one per connection");
        first.give(&vrings, 5); // no such ring: nothing happens
        first.reset();
        first.give(&vrings, 0);
        assert_eq!(call.read().unwrap(), 1, "again on the next connection");
    }
}
