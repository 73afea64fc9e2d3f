//! Frames from the stack into the guest's RX rings: the host-to-guest half of the device.
//!
//! Theory of operation. After each event the device pops the stack's frames and writes each
//! into buffers of the RX ring its flow is steered to (`rx_steer`): the virtio header, then the
//! frame, over as many buffers as it takes with MRG_RXBUF, published together
//! (`add_used_together`) so the guest never sees a frame's first buffer without the rest. When
//! a ring has too few buffers the frame waits in the stack for the guest's next RX kick. Each
//! ring that got frames is interrupted once at the end, when the guest's `used_event` asks for
//! it or the ring has gone too long without one (`lost_interrupts`).
//!
//! Without MRG_RXBUF a frame must fit one buffer, whose size the guest chose: the size of the
//! first one it posts is given to the stack (`learn_rx_buffers`), which then offers the guest
//! an MTU its buffers take. The virtio header is 12 bytes, or 10 on a legacy device without
//! mergeable buffers (no `num_buffers`).

use std::io;
use std::sync::atomic::Ordering;

use ferry_net::stack::{is_bare_tcp_ack, Frame, NetStack};
use log::warn;
use smallvec::SmallVec;
use vhost_user_backend::VringT;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory, Permissions, VolatileSlice};

use super::{ring_in_use, VhostUserNetBackend, MAX_QUEUE_PAIRS, NET_HDR_LEN};
use crate::chain::CopyFrom;
use crate::queue::{add_used_together, wants_interrupt};
use crate::{GuestMemoryAtomic, GuestMemoryMmap, Vring};

/// The smallest RX buffer taken as a guest's buffer size: a 576-byte IP packet, its Ethernet
/// header and the virtio header. A guest posting less is not configured to receive at all.
const SMALLEST_RX_BUFFER: usize = NET_HDR_LEN + 14 + 576;

/// What [`VhostUserNetBackend::deliver`] gave the guest.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Delivered {
    /// Some frame went to the guest.
    pub(super) any: bool,
    /// Some frame was more than a bare TCP ACK: the guest may answer it.
    pub(super) answers: bool,
}

/// One guest RX buffer (a descriptor chain's device-writable part) taken for a frame. Not
/// `chain::ChainWriter`: its list holds 16 slices inline, sized for FUSE requests, and a 64 KiB
/// frame takes 17 buffers, so a frame's writers would be some 10 KiB to build and move; a
/// Linux guest's RX buffer is one slice.
struct RxBuf<'m> {
    head: u16,
    /// Where the buffer lies in guest memory (one slice for a Linux guest's buffers).
    slices: SmallVec<[VolatileSlice<'m>; 2]>,
    /// Its bytes: 0 for a chain that points outside guest memory, which is handed back
    /// used and empty.
    room: usize,
}

impl<'m> RxBuf<'m> {
    fn of(mem: &'m GuestMemoryMmap, chain: DescriptorChain<&'m GuestMemoryMmap>) -> Self {
        let head = chain.head_index();
        let mut slices = SmallVec::new();
        let mut room = 0usize;
        for d in chain.writable() {
            let Ok(parts) = mem.get_slices(d.addr(), d.len() as usize, Permissions::Write) else {
                return RxBuf::empty(head);
            };
            for s in parts {
                let Ok(s) = s else {
                    return RxBuf::empty(head);
                };
                room = room.saturating_add(s.len());
                slices.push(s);
            }
        }
        RxBuf { head, slices, room }
    }

    fn empty(head: u16) -> Self {
        RxBuf {
            head,
            slices: SmallVec::new(),
            room: 0,
        }
    }

    /// Copies the front of `src` (the header, then the frame) into the buffer, consuming
    /// what it copied; returns the bytes written.
    fn fill(&self, src: &mut [&[u8]; 2]) -> usize {
        let mut written = 0;
        for s in &self.slices {
            let mut at = 0;
            for part in src.iter_mut() {
                if at == s.len() {
                    break;
                }
                let Ok(rest) = s.subslice(at, s.len() - at) else {
                    break;
                };
                let n = rest.copy_from_slice_len(part);
                *part = &part[n..];
                at += n;
            }
            written += at;
        }
        written
    }
}

/// An RX ring being filled by [`VhostUserNetBackend::deliver`].
struct RxRing<'a> {
    pair: usize,
    state: std::sync::RwLockWriteGuard<'a, vhost_user_backend::VringState<GuestMemoryAtomic>>,
    first_used: u16,
    used: usize,
}

impl VhostUserNetBackend {
    /// Without MRG_RXBUF each frame must fit one RX buffer, whose size is the guest's choice:
    /// Linux posts 1,518-byte buffers unless the device offered a larger MTU or TSO before the
    /// driver started (QEMU offers the MTU only with `host_mtu`), and then 64 KiB ones. Ferry
    /// would send 64 KiB segments that every buffer refuses, so it reads the size of the
    /// first buffer the guest posts (and leaves it posted) and gives the stack the frame
    /// limit. Once per negotiation: a guest posts one size.
    pub(super) fn learn_rx_buffers(
        &self,
        stack: &mut NetStack,
        vrings: &[Vring],
        mem: &GuestMemoryAtomic,
    ) {
        if self.mrg_rxbuf.load(Ordering::Relaxed) || self.rx_buffers_learned.load(Ordering::Relaxed)
        {
            return;
        }
        let mem = mem.memory();
        for pair in 0..vrings.len() / 2 {
            let vring = &vrings[2 * pair];
            if !ring_in_use(vring) {
                continue;
            }
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                continue;
            };
            let room = RxBuf::of(&mem, chain).room;
            queue.set_next_avail(queue.next_avail().wrapping_sub(1));
            if room < SMALLEST_RX_BUFFER {
                continue;
            }
            log::info!(
                "net: the guest has no mergeable RX buffers and posts {room}-byte ones: frames to it are kept within them"
            );
            stack.limit_frames(Some(room - self.hdr_len.load(Ordering::Relaxed)));
            self.rx_buffers_learned.store(true, Ordering::Relaxed);
            return;
        }
    }

    /// The virtio header of `frame` but for `num_buffers`: a checksum the stack left partial
    /// goes as NEEDS_CSUM with where it starts and lies; other frames to a guest that
    /// negotiated GUEST_CSUM carry whole checksums, or none (the IPv4 fragments smoltcp makes
    /// of a UDP datagram, where zero means none), and are DATA_VALID.
    /// A guest without GUEST_CSUM must not see a partial one (a frame made for the guest
    /// before it): the checksum is finished here.
    fn header_for(&self, frame: &mut Frame) -> [u8; NET_HDR_LEN] {
        let mut hdr = [0u8; NET_HDR_LEN];
        if !self.guest_csum.load(Ordering::Relaxed) {
            frame.finish_checksum();
            return hdr;
        }
        match frame.partial_checksum() {
            Some(p) => {
                hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
                hdr[6..8].copy_from_slice(&p.start.to_le_bytes());
                hdr[8..10].copy_from_slice(&p.offset.to_le_bytes());
            }
            None => hdr[0] = VIRTIO_NET_HDR_F_DATA_VALID as u8,
        }
        hdr
    }

    /// Writes the stack's frames into the guest's RX buffers, each on the RX ring of the pair
    /// its flow is steered to. With MRG_RXBUF a frame may span several buffers; the first
    /// one's header says how many. When that ring has too few buffers posted, the frame (and
    /// the ones after it) wait for the guest's next RX kick.
    pub(super) fn deliver(
        &self,
        stack: &mut NetStack,
        vrings: &[Vring],
        mem: &GuestMemoryAtomic,
    ) -> io::Result<Delivered> {
        let mem = mem.memory();
        // The RX rings the frontend has enabled (a ring it has not is not ours to write; frames
        // wait until it enables one, and its kick delivers them).
        let mut rings: SmallVec<[RxRing<'_>; MAX_QUEUE_PAIRS]> = SmallVec::new();
        for pair in 0..vrings.len() / 2 {
            let vring = &vrings[2 * pair];
            if ring_in_use(vring) {
                let state = vring.get_mut();
                let first_used = state.get_queue().next_used();
                rings.push(RxRing {
                    pair,
                    state,
                    first_used,
                    used: 0,
                });
            }
        }
        if rings.is_empty() {
            return Ok(Delivered::default());
        }
        let mut answers = false;
        let mut retries = 0;
        let mergeable = self.mrg_rxbuf.load(Ordering::Relaxed);
        let h = self.hdr_len.load(Ordering::Relaxed);
        while let Some(mut frame) = stack.pop_frame() {
            let at = crate::rx_steer::ring_for(&frame, rings.len());
            let ring = &mut rings[at];
            let queue = ring.state.get_queue_mut();
            let need = h + frame.len();
            // Each buffer's descriptors are read once, into slices of guest memory, and
            // borrow the memory snapshot rather than clone its reference count: with 4 KiB
            // buffers a 64 KiB frame takes 17 of them, and the atomic increments of cloned
            // chains were a tenth of ferry's host-to-guest CPU.
            let mut bufs: SmallVec<[RxBuf<'_>; 20]> = SmallVec::new();
            let mut room = 0usize;
            while room < need && (mergeable || bufs.is_empty()) {
                match queue.pop_descriptor_chain(&*mem) {
                    Some(c) => {
                        let buf = RxBuf::of(&mem, c);
                        room = room.saturating_add(buf.room);
                        bufs.push(buf);
                    }
                    None => break,
                }
            }
            if room < need && !mergeable && !bufs.is_empty() {
                // Without MRG_RXBUF a frame must fit one buffer (the header's num_buffers is 1
                // by the spec): a guest whose buffers are smaller than the frame cannot take
                // it. Drop it, counted, and keep the buffer for the next frame.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                self.stats
                    .rx_dropped_too_big
                    .fetch_add(1, Ordering::Relaxed);
                stack.recycle_frame(frame);
                continue;
            }
            if room < need {
                // Not enough buffers: give the chains back and wait for the guest's kick. If
                // the guest posted more while we looked (it saw the old avail_event and will
                // not kick for them), try again now rather than stall until some other event.
                let back = queue.next_avail().wrapping_sub(bufs.len() as u16);
                queue.set_next_avail(back);
                stack.unpop_frame(frame);
                if queue.enable_notification(&*mem).unwrap_or(false) && retries < 8 {
                    retries += 1;
                    continue;
                }
                break;
            }
            let mut hdr = self.header_for(&mut frame);
            // num_buffers, in the header of every length but the legacy one.
            hdr[10..12].copy_from_slice(&(bufs.len() as u16).to_le_bytes());
            let mut src: [&[u8]; 2] = [&hdr[..h], &frame];
            let mut elems: SmallVec<[(u16, u32); 20]> = SmallVec::new();
            for b in &bufs {
                elems.push((b.head, b.fill(&mut src) as u32));
            }
            if let Err(e) = add_used_together(queue, &*mem, &elems) {
                warn!("net: cannot return RX descriptors: {e}");
            }
            ring.used += elems.len();
            answers |= !is_bare_tcp_ack(&frame);
            self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            self.stats.rx_frames_by_pair[ring.pair].fetch_add(1, Ordering::Relaxed);
            self.stats
                .rx_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            stack.recycle_frame(frame);
        }
        let mut any = false;
        for ring in &mut rings {
            if ring.used > 0 {
                any = true;
                let index = 2 * ring.pair;
                if wants_interrupt(ring.state.get_queue_mut(), &*mem, ring.first_used)
                    || self.lost_interrupts.overdue(index)
                {
                    ring.state.signal_used_queue()?;
                    self.lost_interrupts.signalled(index);
                }
            }
        }
        Ok(Delivered { any, answers })
    }
}
