//! Draining one virtqueue: the loop both devices share.

use log::warn;
use vhost_user_backend::VringT;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryLoadGuard};

use crate::{GuestMemoryAtomic, GuestMemoryMmap, Vring};

/// A chain popped from a queue, over a snapshot of guest memory.
pub(crate) type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// Pops every available chain from `vring`, hands it to `handle` (which returns the number of
/// bytes it wrote into the chain, or `None` when it took the chain to finish later), marks it
/// used, and signals the guest once at the end if anything was used and the guest wants to
/// hear of it.
///
/// With EVENT_IDX, notifications stay off while draining and the queue is re-checked after
/// turning them back on, so a kick that races with the end of the loop is not lost.
pub(crate) fn drain_queue<F>(
    vring: &Vring,
    mem: &GuestMemoryAtomic,
    event_idx: bool,
    handle: F,
) -> std::io::Result<usize>
where
    F: FnMut(Chain) -> Option<u32>,
{
    let drained = drain_queue_unsignalled(vring, mem, event_idx, true, handle)?;
    if drained.signal {
        vring.signal_used_queue()?;
    }
    Ok(drained.used)
}

/// What [`drain_queue_unsignalled`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Chains taken and marked used.
    pub used: usize,
    /// The guest wants an interrupt for them: the caller signals the queue.
    pub signal: bool,
}

/// [`drain_queue`], but the caller signals the guest (when [`Drained::signal`] says so), so it
/// can signal together with other queues; and with `notify_after` false the guest's
/// notifications stay off once the queue is empty (when anything was used): the caller polls
/// the queue again later.
pub(crate) fn drain_queue_unsignalled<F>(
    vring: &Vring,
    mem: &GuestMemoryAtomic,
    event_idx: bool,
    notify_after: bool,
    mut handle: F,
) -> std::io::Result<Drained>
where
    F: FnMut(Chain) -> Option<u32>,
{
    let mem = mem.memory();
    let mut used = 0usize;
    let mut state = vring.get_mut();
    // A ring the frontend stopped (GET_VRING_BASE marks it not ready under this lock) is not
    // the device's to touch: not its chains, not its notification fields.
    if !state.get_queue().ready() {
        return Ok(Drained::default());
    }
    // Rounds in a row that took nothing though more was announced (see below).
    let mut empty = 0;
    loop {
        let queue = state.get_queue_mut();
        if event_idx || !notify_after {
            queue
                .disable_notification(&*mem)
                .map_err(std::io::Error::other)?;
        }
        let mut popped = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
            popped += 1;
            let head = chain.head_index();
            let Some(len) = handle(chain) else {
                continue;
            };
            if let Err(e) = queue.add_used(&*mem, head, len) {
                warn!("cannot return descriptor {head} to the guest: {e}");
            } else {
                used += 1;
            }
        }
        if !notify_after && used > 0 {
            break;
        }
        // Without EVENT_IDX this clears the no-notify flag an earlier poll may have left set.
        if !queue
            .enable_notification(&*mem)
            .map_err(std::io::Error::other)?
        {
            break;
        }
        // More is announced. Once, with nothing taken, is the race the re-check is for (the
        // guest posted a chain after the last pop looked): go round and take it. Twice in a
        // row, the avail ring is broken (an index more than a ring ahead, a ring outside
        // memory): looping would spin forever at full CPU on what the guest wrote, so stop,
        // and look again on its next kick.
        empty = if popped == 0 { empty + 1 } else { 0 };
        if empty >= 2 {
            if let Err(e) = queue.iter(mem.clone()) {
                warn!("the guest's avail ring cannot be read ({e}); its requests wait until it is valid again");
            }
            break;
        }
    }
    // The library calls us when a vring is enabled even with nothing queued: only signal when
    // something was really used.
    let signal = used > 0
        && state
            .get_queue_mut()
            .needs_notification(&*mem)
            .map_err(std::io::Error::other)?;
    Ok(Drained { used, signal })
}

/// Adds several chains to the used ring and publishes them with one index update, so the
/// guest sees all of them or none: a mergeable RX frame spans several buffers, and a driver
/// that finds the first (whose header counts them all) before the rest drops the frame as
/// "buffers missing". `add_used` publishes each element on its own.
pub(crate) fn add_used_together<Q: QueueT, M: vm_memory::GuestMemory>(
    queue: &mut Q,
    mem: &M,
    elems: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    use std::num::Wrapping;
    use vm_memory::{Address, Bytes, GuestAddress};
    let size = queue.size();
    let used = GuestAddress(queue.used_ring());
    let mut next = Wrapping(queue.next_used());
    for &(head, len) in elems {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        // struct virtq_used_elem { le32 id; le32 len; }, after the 4-byte ring header.
        let slot = used
            .checked_add(4 + u64::from(next.0 % size) * 8)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, slot)
            .map_err(virtio_queue::Error::GuestMemory)?;
        next += Wrapping(1);
    }
    queue.set_next_used(next.0);
    // Release: the elements and the buffers' contents are visible before the new index.
    mem.store(
        next.0.to_le(),
        used.checked_add(2)
            .ok_or(virtio_queue::Error::AddressOverflow)?,
        std::sync::atomic::Ordering::Release,
    )
    .map_err(virtio_queue::Error::GuestMemory)
}

/// Where the guest's `used_event` sits: after the avail ring's flags, index and `size` entries.
pub(crate) fn used_event_addr<Q: QueueT>(queue: &Q) -> Option<vm_memory::GuestAddress> {
    use vm_memory::Address;
    vm_memory::GuestAddress(queue.avail_ring()).checked_add(4 + 2 * u64::from(queue.size()))
}

/// Where the device's `avail_event` sits: after the used ring's flags, index and `size`
/// 8-byte entries.
pub(crate) fn avail_event_addr<Q: QueueT>(queue: &Q) -> Option<vm_memory::GuestAddress> {
    use vm_memory::Address;
    vm_memory::GuestAddress(queue.used_ring()).checked_add(4 + 8 * u64::from(queue.size()))
}

/// Whether the guest wants an interrupt for the used entries from `old` to now: with
/// EVENT_IDX, when its `used_event` falls in that range (the Linux rule); always without.
pub(crate) fn wants_interrupt<Q: QueueT, M: vm_memory::GuestMemory>(
    queue: &Q,
    mem: &M,
    old: u16,
) -> bool {
    use vm_memory::Bytes;
    if !queue.event_idx_enabled() {
        return true;
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let Some(at) = used_event_addr(queue) else {
        return true;
    };
    let Ok(event) = mem.load::<u16>(at, std::sync::atomic::Ordering::Acquire) else {
        return true;
    };
    let new = queue.next_used();
    new.wrapping_sub(u16::from_le(event)).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_user_backend::VringT;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryAtomic};

    fn setup(n: u16) -> (GuestMemoryAtomic<GuestMemoryMmap>, Vring) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    0x10_0000 + u64::from(i) * 0x100,
                    0x100,
                    virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        vq.build_multiple_desc_chains(&descs).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let vring = Vring::new(atomic.clone(), 16).unwrap();
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_size(16);
        vring.set_queue_ready(true);
        (atomic, vring)
    }

    #[test]
    fn drains_every_chain_and_reports_lengths() {
        let (mem, vring) = setup(3);
        let mut seen = 0;
        let used = drain_queue(&vring, &mem, false, |c| {
            seen += 1;
            Some(c.head_index() as u32)
        })
        .unwrap();
        assert_eq!((used, seen), (3, 3));
        assert_eq!(vring.queue_used_idx().unwrap(), 3);
        // Nothing left: a second pass uses nothing.
        assert_eq!(drain_queue(&vring, &mem, true, |_| Some(0)).unwrap(), 0);
    }

    #[test]
    fn several_used_entries_are_published_with_one_index_update() {
        use vm_memory::{Bytes, GuestAddress};
        let (mem, vring) = setup(3);
        let m = mem.memory();
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        let used_ring = q.used_ring();
        add_used_together(q, &*m, &[(0, 100), (1, 200), (2, 300)]).unwrap();
        assert_eq!(q.next_used(), 3);
        let idx: u16 = m.read_obj(GuestAddress(used_ring + 2)).unwrap();
        assert_eq!(idx, 3);
        for (i, (head, len)) in [(0u32, 100u32), (1, 200), (2, 300)].iter().enumerate() {
            let at = GuestAddress(used_ring + 4 + i as u64 * 8);
            let got: [u32; 2] = [
                m.read_obj(at).unwrap(),
                m.read_obj(GuestAddress(at.0 + 4)).unwrap(),
            ];
            assert_eq!(got, [*head, *len]);
        }
        // A head outside the ring is refused before anything is published.
        assert!(add_used_together(q, &*m, &[(99, 1)]).is_err());
        assert_eq!(q.next_used(), 3);
    }

    #[test]
    fn an_avail_index_far_ahead_of_the_ring_ends_the_drain_instead_of_spinning() {
        use vm_memory::{Bytes, GuestAddress};
        for event_idx in [false, true] {
            let (mem, vring) = setup(3);
            vring.set_queue_event_idx(event_idx);
            // The guest claims 100 new chains in a ring of 16.
            let avail = vring.get_ref().get_queue().avail_ring();
            mem.memory()
                .write_obj(100u16, GuestAddress(avail + 2))
                .unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let (m, v) = (mem.clone(), vring.clone());
            std::thread::spawn(move || {
                let _ =
                    tx.send(drain_queue(&v, &m, event_idx, |_| Some(0)).map_err(|e| e.to_string()));
            });
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("the drain returned (it spun before)");
            assert_eq!(got, Ok(0), "event_idx {event_idx}");
        }
    }
}
