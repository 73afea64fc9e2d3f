//! Draining one virtqueue: the loop both devices share.

use log::warn;
use vhost_user_backend::VringT;
use virtio_queue::{DescriptorChain, QueueT};
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
    mut handle: F,
) -> std::io::Result<usize>
where
    F: FnMut(Chain) -> Option<u32>,
{
    let mem = mem.memory();
    let mut used = 0usize;
    let mut state = vring.get_mut();
    loop {
        let queue = state.get_queue_mut();
        if event_idx {
            queue
                .disable_notification(&*mem)
                .map_err(std::io::Error::other)?;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
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
        if !event_idx
            || !queue
                .enable_notification(&*mem)
                .map_err(std::io::Error::other)?
        {
            break;
        }
    }
    // The library calls us when a vring is enabled even with nothing queued: only signal when
    // something was really used.
    if used > 0
        && state
            .get_queue_mut()
            .needs_notification(&*mem)
            .map_err(std::io::Error::other)?
    {
        state.signal_used_queue()?;
    }
    Ok(used)
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
}
