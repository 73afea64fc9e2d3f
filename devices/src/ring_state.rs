//! Where a device's rings stand, for `/stats`: the positions the guest and the device have
//! reached on each ring, read live.
//!
//! Theory of operation. A NIC that goes silent is a ring that stopped moving, and which side
//! stopped says where to look: the guest's avail index ahead of the device's next one is a
//! device that was not woken (a kick it never saw, an `avail_event` it left behind); a used
//! index past the guest's `used_event` that got no interrupt is a notification lost on the
//! way (QEMU's interrupt routing); neither moving is a guest that stopped posting. QEMU shows
//! its side with `x-query-virtio-queue-status`; this is the backend's. The device hands its
//! rings over on their first event of each connection ([`RingWatch::note`], one relaxed load
//! after that), and a reader takes each ring's lock for a moment to read them, so the data
//! path pays nothing for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};

use crate::queue::{avail_event_addr, used_event_addr};
use crate::{GuestMemoryAtomic, Vring};

/// One ring's positions. The indexes are free-running u16s, as the virtio spec has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RingState {
    /// The ring's index on the device.
    pub index: usize,
    /// Set up (addresses and size given) and enabled by the frontend.
    pub ready: bool,
    pub enabled: bool,
    pub size: u16,
    /// The guest's avail index, and the next one the device takes.
    pub avail_idx: Option<u16>,
    pub next_avail: u16,
    /// The used index in guest memory, and the next one the device writes.
    pub used_idx: Option<u16>,
    pub next_used: u16,
    /// With EVENT_IDX: the used index past which the guest wants an interrupt, and the avail
    /// index past which the device wants a kick (as last written).
    pub used_event: Option<u16>,
    pub avail_event: Option<u16>,
}

/// The rings of a device's current connection.
#[derive(Default)]
pub struct RingWatch {
    known: AtomicBool,
    vrings: Mutex<Vec<Vring>>,
}

impl RingWatch {
    /// Keeps `vrings` (the connection's; they are handles to shared state) the first time it
    /// is called after [`forget`](Self::forget).
    pub fn note(&self, vrings: &[Vring]) {
        if self.known.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut v) = self.vrings.lock() {
            *v = vrings.to_vec();
            self.known.store(true, Ordering::Relaxed);
        }
    }

    /// Drops the rings of a connection that ended.
    pub fn forget(&self) {
        if let Ok(mut v) = self.vrings.lock() {
            v.clear();
            self.known.store(false, Ordering::Relaxed);
        }
    }

    /// Each ring's positions, read from guest memory `mem` now.
    pub fn states(&self, mem: &GuestMemoryAtomic) -> Vec<RingState> {
        let vrings = self.vrings.lock().map(|v| v.clone()).unwrap_or_default();
        let mem = mem.memory();
        vrings
            .iter()
            .enumerate()
            .map(|(index, vring)| {
                let state = vring.get_ref();
                let q = state.get_queue();
                let ready = q.ready();
                // A ring not set up has no addresses to read.
                let read = |at: Option<GuestAddress>| -> Option<u16> {
                    ready
                        .then(|| mem.load::<u16>(at?, Ordering::Acquire).ok())
                        .flatten()
                        .map(u16::from_le)
                };
                let events = q.event_idx_enabled();
                RingState {
                    index,
                    ready,
                    enabled: state.is_enabled(),
                    size: q.size(),
                    avail_idx: read(GuestAddress(q.avail_ring()).checked_add(2)),
                    next_avail: q.next_avail(),
                    used_idx: read(GuestAddress(q.used_ring()).checked_add(2)),
                    next_used: q.next_used(),
                    used_event: events.then(|| read(used_event_addr(q))).flatten(),
                    avail_event: events.then(|| read(avail_event_addr(q))).flatten(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemoryMmap;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    #[test]
    fn positions_are_read_from_the_rings_and_forgotten_with_the_connection() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let descs: Vec<RawDescriptor> = (0..3)
            .map(|i| RawDescriptor::from(SplitDescriptor::new(0x10_0000 + i * 0x100, 0x100, 0, 0)))
            .collect();
        vq.build_multiple_desc_chains(&descs).unwrap();
        let mem = GuestMemoryAtomic::new(m.clone());
        let vring = Vring::new(mem.clone(), 16).unwrap();
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_size(16);
        vring.set_queue_ready(true);
        vring.set_queue_event_idx(true);
        vring.set_enabled(true);
        // The guest wants an interrupt past used index 1.
        m.write_obj(1u16, vq.avail_addr().unchecked_add(4 + 2 * 16))
            .unwrap();
        let watch = RingWatch::default();
        assert!(watch.states(&mem).is_empty());
        watch.note(std::slice::from_ref(&vring));
        vring.get_mut().get_queue_mut().set_next_avail(2);
        let s = &watch.states(&mem)[0];
        assert_eq!(
            (s.ready, s.enabled, s.size, s.avail_idx, s.next_avail),
            (true, true, 16, Some(3), 2)
        );
        assert_eq!(
            (s.used_idx, s.next_used, s.used_event),
            (Some(0), 0, Some(1))
        );
        watch.forget();
        assert!(watch.states(&mem).is_empty());
    }
}
