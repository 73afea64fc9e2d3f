//! The virtio-fs device over vhost-user.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT), queue 1 the request queue. Each
//! chain holds one FUSE request in its readable descriptors and room for the reply in its
//! writable ones. The tag and the number of request queues live in QEMU's device options, not
//! here.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use ferry_fs::{FileSystem, Server};
use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::chain::split_chain;
use crate::queue::{drain_queue, Chain};
use crate::{GuestMemoryAtomic, Vring};

const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 1024;

/// The virtio-fs vhost-user backend, serving one `FileSystem`.
pub struct VhostUserFsBackend<F> {
    server: Arc<Server<F>>,
    mem: RwLock<GuestMemoryAtomic>,
    event_idx: AtomicBool,
}

impl<F: FileSystem> VhostUserFsBackend<F> {
    /// A device serving `server`.
    pub fn new(server: Arc<Server<F>>) -> Arc<Self> {
        Arc::new(VhostUserFsBackend {
            server,
            mem: RwLock::new(GuestMemoryAtomic::new(crate::GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
        })
    }

    /// The FUSE server behind the device.
    pub fn server(&self) -> &Arc<Server<F>> {
        &self.server
    }

    /// Answers one request; returns the number of reply bytes written into the chain.
    fn handle_chain(&self, chain: Chain) -> u32 {
        let mem = chain.memory();
        let (reader, writer) = match split_chain(mem, chain.clone()) {
            Ok(rw) => rw,
            Err(e) => {
                warn!("fs: dropping a malformed descriptor chain: {e}");
                return 0;
            }
        };
        match self.server.handle_message(reader, writer) {
            Ok(n) => n as u32,
            Err(e) => {
                warn!("fs: request not answered: {e}");
                0
            }
        }
    }

    fn process_queue(&self, vring: &Vring) -> io::Result<()> {
        let mem = self
            .mem
            .read()
            .map_err(|_| io::Error::other("poisoned"))?
            .clone();
        drain_queue(vring, &mem, self.event_idx.load(Ordering::Relaxed), |c| {
            self.handle_chain(c)
        })?;
        Ok(())
    }
}

impl<F: FileSystem + 'static> VhostUserBackend for VhostUserFsBackend<F> {
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
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
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
        let Some(vring) = vrings.get(device_event as usize) else {
            debug!("fs: event for unknown source {device_event}");
            return Ok(());
        };
        // An Err here would end the worker thread for good: log and carry on instead.
        if let Err(e) = self.process_queue(vring) {
            warn!("fs: error while processing queue {device_event}: {e}");
        }
        Ok(())
    }
}
