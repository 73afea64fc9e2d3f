//! The virtio-net device over vhost-user.
//!
//! Queue 0 is RX (host to guest), queue 1 is TX (guest to host). Every TX chain starts with a
//! `virtio_net_hdr_v1` (12 bytes) followed by one Ethernet frame.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ferry_net::NetConfig;
use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::queue::drain_queue;
use crate::{GuestMemoryAtomic, Vring};

/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 1024;
/// Size of `virtio_net_hdr_v1`, which precedes every frame.
pub const NET_HDR_LEN: usize = 12;
/// Size of the virtio-net config space Ferry exposes (mac, status, max pairs, mtu).
const CONFIG_LEN: usize = 12;

/// Counters for the net device.
#[derive(Debug, Default)]
pub struct NetDeviceStats {
    /// Frames the guest sent.
    pub tx_frames: AtomicU64,
    /// Bytes the guest sent, virtio headers excluded.
    pub tx_bytes: AtomicU64,
    /// Frames dropped because they were malformed (shorter than the virtio header).
    pub tx_malformed: AtomicU64,
    /// Frames dropped because nothing carries them yet (no network stack attached).
    pub tx_unrouted: AtomicU64,
}

/// The virtio-net vhost-user backend.
pub struct VhostUserNetBackend {
    cfg: NetConfig,
    mem: RwLock<GuestMemoryAtomic>,
    event_idx: AtomicBool,
    stats: NetDeviceStats,
}

impl VhostUserNetBackend {
    /// A net device for the network plan `cfg`.
    pub fn new(cfg: NetConfig) -> Arc<Self> {
        Arc::new(VhostUserNetBackend {
            cfg,
            mem: RwLock::new(GuestMemoryAtomic::new(crate::GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            stats: NetDeviceStats::default(),
        })
    }

    /// The device's counters.
    pub fn stats(&self) -> &NetDeviceStats {
        &self.stats
    }

    /// Called when a frontend leaves: log what crossed the device so far.
    pub fn frontend_gone(&self) {
        let s = &self.stats;
        log::info!(
            "net: the guest has sent {} frames ({} bytes) so far, {} malformed; {} dropped because no network stack is attached yet",
            s.tx_frames.load(Ordering::Relaxed),
            s.tx_bytes.load(Ordering::Relaxed),
            s.tx_malformed.load(Ordering::Relaxed),
            s.tx_unrouted.load(Ordering::Relaxed),
        );
    }

    /// The virtio-net config space: MAC, link status, one queue pair, MTU.
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.cfg.guest_mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.cfg.mtu.to_le_bytes());
        c
    }

    fn process_tx(&self, vring: &Vring) -> io::Result<()> {
        let mem = self
            .mem
            .read()
            .map_err(|_| io::Error::other("poisoned"))?
            .clone();
        drain_queue(
            vring,
            &mem,
            self.event_idx.load(Ordering::Relaxed),
            |chain| {
                let len: usize = chain
                    .clone()
                    .readable()
                    .map(|d| d.len() as usize)
                    .fold(0usize, usize::saturating_add);
                if len < NET_HDR_LEN {
                    self.stats.tx_malformed.fetch_add(1, Ordering::Relaxed);
                    return Some(0);
                }
                self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .tx_bytes
                    .fetch_add((len - NET_HDR_LEN) as u64, Ordering::Relaxed);
                // The network stack arrives with the virtio-net data path; until then frames are
                // counted and dropped, which is what a link with nothing behind it does.
                self.stats.tx_unrouted.fetch_add(1, Ordering::Relaxed);
                Some(0)
            },
        )?;
        Ok(())
    }
}

impl VhostUserBackend for VhostUserNetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Answer exactly `size` bytes; anything past the fields Ferry defines reads as zero.
        let space = self.config_space();
        (offset as usize..(offset as usize).saturating_add(size as usize))
            .map(|i| space.get(i).copied().unwrap_or(0))
            .collect()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        *self.mem.write().map_err(|_| io::Error::other("poisoned"))? = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // An Err here would end the worker thread for good: log and carry on instead.
        let res = match device_event {
            TX_QUEUE => self.process_tx(&vrings[TX_QUEUE as usize]),
            // RX buffers are used when there is something to deliver.
            RX_QUEUE => Ok(()),
            other => {
                debug!("net: event for unknown source {other}");
                Ok(())
            }
        };
        if let Err(e) = res {
            warn!("net: error while processing queue {device_event}: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_has_mac_status_and_mtu() {
        let b = VhostUserNetBackend::new(NetConfig::default());
        let c = b.get_config(0, 12);
        assert_eq!(&c[0..6], &ferry_net::GUEST_MAC);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 65520);
        // Reads past the end or straddling it are zero-filled to the asked size.
        assert_eq!(b.get_config(10, 8), vec![0xf0, 0xff, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.get_config(u32::MAX, 4), vec![0; 4]);
    }

    #[test]
    fn features_include_the_contract() {
        let f = VhostUserNetBackend::new(NetConfig::default()).features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
        }
    }
}
