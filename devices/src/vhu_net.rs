//! The virtio-net device over vhost-user.
//!
//! Up to [`MAX_QUEUE_PAIRS`] queue pairs (VIRTIO_NET_F_MQ): vring 2p is pair p's RX (host to
//! guest), 2p+1 its TX (guest to host). Every TX chain starts with a `virtio_net_hdr_v1` (12
//! bytes) followed by one Ethernet frame.
//!
//! Theory of operation: one worker thread serves every vring, and one stack (one flow table)
//! serves every pair. A guest with several vCPUs sends on the TX queue of the vCPU it runs on;
//! the device takes from every enabled TX ring whenever it takes from one. Frames to the guest
//! go to an RX ring chosen by a hash of their flow (rx_steer.rs), so one flow's frames stay in
//! order on one ring and the guest's receive work spreads over its vCPUs. With one pair (the
//! frontends' default) none of this costs anything: there is one ring to look at. Delivery
//! into the RX rings is in `vhu_net/rx.rs`; TX coalescing's policy in `tx_poll.rs`; which
//! interrupts go out beyond what the guest's `used_event` asks for in `lost_interrupts.rs`.

use std::io;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ferry_fs::RequestReader;
use ferry_net::ports::Ports;
use ferry_net::proxy::Proxy;
use ferry_net::rules::Rules;
use ferry_net::stack::{FlowInfo, NetStack, StackStats};
use ferry_net::NetConfig;
use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use vhost_user_backend::VringT;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::chain::split_chain;
use crate::queue::drain_queue_unsignalled;
use crate::tx_poll::{TxPoll, TX_BULK, TX_BULK_STREAMING, TX_STREAMING};
use crate::{GuestMemoryAtomic, Vring};

mod rx;

/// Index of the first pair's receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the first pair's transmit queue.
pub const TX_QUEUE: u16 = 1;
/// The queue pairs offered: QEMU's `queues=N` (libvirt's `<driver queues='N'/>`) may ask for
/// up to this many. The frontend learns it from GET_QUEUE_NUM (which the relay answers in
/// pairs, as QEMU reads it for a NIC).
pub const MAX_QUEUE_PAIRS: usize = 4;
const NUM_QUEUES: usize = 2 * MAX_QUEUE_PAIRS;
/// The event token of the stack's timer on the worker's epoll (tokens up to NUM_QUEUES are the
/// library's).
pub const TIMER_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// The event token of the stack's host sockets (NAT flows, DNS upstream).
pub const HOST_EVENT: u16 = NUM_QUEUES as u16 + 2;
const QUEUE_SIZE: usize = 1024;
/// Size of `virtio_net_hdr_v1`, which precedes every frame (with VERSION_1 or MRG_RXBUF).
pub const NET_HDR_LEN: usize = 12;
/// Size of the legacy `virtio_net_hdr`, without `num_buffers`: a legacy device (no
/// VERSION_1, QEMU's `disable-modern=on`) without MRG_RXBUF.
const LEGACY_HDR_LEN: usize = 10;
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
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest, virtio headers excluded.
    pub rx_bytes: AtomicU64,
    /// Frames to the guest dropped because it takes no merged buffers (no MRG_RXBUF) and its
    /// buffer was smaller than the frame.
    pub rx_dropped_too_big: AtomicU64,
    /// Frames the guest sent, per queue pair.
    pub tx_frames_by_pair: [AtomicU64; MAX_QUEUE_PAIRS],
    /// Frames delivered to the guest, per queue pair.
    pub rx_frames_by_pair: [AtomicU64; MAX_QUEUE_PAIRS],
}

/// The virtio-net vhost-user backend.
pub struct VhostUserNetBackend {
    cfg: NetConfig,
    /// Where DNS queries for other names go.
    upstream: Option<SocketAddr>,
    /// Published ports, the proxy and the rules; they outlive guests.
    services: NetServices,
    /// The guest's link. One thread serves the device, so the lock is never contended.
    stack: Mutex<NetStack>,
    /// Fires when the stack wants a poll without new frames (ARP retries, TCP timers).
    timer: Mutex<TimerFd>,
    /// When the timer is set to fire (None: disarmed).
    armed: Mutex<Option<std::time::Instant>>,
    mem: RwLock<GuestMemoryAtomic>,
    event_idx: AtomicBool,
    /// The connection's rings, for `/stats`.
    rings: crate::ring_state::RingWatch,
    /// Interrupts the guest's `used_event` does not ask for, so none stays lost.
    lost_interrupts: crate::lost_interrupts::LostInterrupts,
    /// The guest accepts frames whose TCP/UDP checksums are partial (GUEST_CSUM): they go
    /// as NEEDS_CSUM (`rx::header_for`), and neither side sums the payload of a segment the
    /// guest delivers locally.
    guest_csum: AtomicBool,
    /// The guest takes a frame over several RX buffers (MRG_RXBUF). Without it, a frame must
    /// fit one descriptor chain.
    mrg_rxbuf: AtomicBool,
    /// Without MRG_RXBUF: the guest's RX buffer size is known to the stack (`rx::learn_rx_buffers`).
    rx_buffers_learned: AtomicBool,
    /// The virtio header's size as negotiated: `NET_HDR_LEN` or `LEGACY_HDR_LEN`.
    hdr_len: std::sync::atomic::AtomicUsize,
    stats: NetDeviceStats,
    /// TX coalescing state (see [`TX_STREAMING`]).
    tx_poll: Mutex<TxPoll>,
}

/// What [`VhostUserNetBackend::drain_tx`] took from the TX rings.
#[derive(Debug, Default, Clone, Copy)]
struct TxDrained {
    /// Chains taken, on every ring.
    used: usize,
    /// The TX rings whose interrupt the guest wants (bit p for pair p).
    signal: u32,
}

/// Whether the frontend has set `vring` up and enabled it: only then may the device read or
/// write it (a pair the guest does not use is neither).
fn ring_in_use(vring: &Vring) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// What a net device serves besides the link, shared with the control API.
#[derive(Clone, Default)]
pub struct NetServices {
    /// Published ports: their clients' connections go to the guest.
    pub ports: Option<Arc<Ports>>,
    /// The HTTP(S) proxy the gateway's port 3128 leads to.
    pub proxy: Option<Arc<Proxy>>,
    /// The rules new outbound flows are checked against.
    pub rules: Option<Arc<Rules>>,
    /// Where the DNS servers come from (None: the `upstream` given, if any).
    pub dns: Option<ferry_net::stack::DnsSource>,
    /// Names the gateway's DNS answers from the host (records, the hosts file).
    pub names: Option<Arc<ferry_net::names::Names>>,
    /// Split DNS: names under each suffix go to its own server only.
    pub dns_zones: Vec<(String, SocketAddr)>,
    /// Where flow events go (`--audit-log`, `GET /events`).
    pub audit: Option<ferry_audit::Audit>,
    /// Captures on demand (`GET /pcap`), across guests.
    pub live_captures: Arc<ferry_net::pcap_live::LiveCaptures>,
}

impl VhostUserNetBackend {
    /// A net device for the network plan `cfg`.
    pub fn new(cfg: NetConfig, upstream: Option<SocketAddr>) -> io::Result<Arc<Self>> {
        Self::with_services(cfg, upstream, NetServices::default())
    }

    /// A net device with `services`, which outlive guests.
    pub fn with_services(
        cfg: NetConfig,
        upstream: Option<SocketAddr>,
        services: NetServices,
    ) -> io::Result<Arc<Self>> {
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // Non-blocking: an event earlier in the same epoll batch may re-arm the timer (which
        // resets its count) before process_timer reads it, and a blocking read would then hang
        // the device's only thread until the new deadline, or forever if it was cleared.
        // SAFETY: fcntl on an fd we own; no memory is passed.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(VhostUserNetBackend {
            upstream,
            timer: Mutex::new(timer),
            armed: Mutex::new(None),
            stack: Mutex::new(Self::fresh_stack(&cfg, upstream, &services)?),
            services,
            cfg,
            mem: RwLock::new(GuestMemoryAtomic::new(crate::GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            rings: Default::default(),
            lost_interrupts: crate::lost_interrupts::LostInterrupts::new(NUM_QUEUES),
            guest_csum: AtomicBool::new(false),
            mrg_rxbuf: AtomicBool::new(true),
            rx_buffers_learned: AtomicBool::new(false),
            hdr_len: std::sync::atomic::AtomicUsize::new(NET_HDR_LEN),
            stats: NetDeviceStats::default(),
            tx_poll: Mutex::new(TxPoll::default()),
        }))
    }

    fn fresh_stack(
        cfg: &NetConfig,
        upstream: Option<SocketAddr>,
        services: &NetServices,
    ) -> io::Result<NetStack> {
        let mut stack = NetStack::new(cfg.clone(), upstream)?;
        if let Some(d) = &services.dns {
            stack = stack.with_dns(d.clone());
        }
        stack = stack.with_dns_zones(&services.dns_zones);
        if let Some(n) = &services.names {
            stack = stack.with_names(n.clone());
        }
        if let Some(p) = &services.proxy {
            stack = stack.with_proxy(p.clone());
        }
        if let Some(r) = &services.rules {
            stack = stack.with_rules(r.clone());
        }
        if let Some(a) = &services.audit {
            stack = stack.with_audit(a.clone());
        }
        stack = stack.with_live_captures(services.live_captures.clone());
        match &services.ports {
            Some(p) => stack.with_ports(p.clone()),
            None => Ok(stack),
        }
    }

    /// The DNS servers the gateway forwards to, the one asked first leading.
    pub fn dns_servers(&self) -> Vec<SocketAddr> {
        self.stack
            .lock()
            .map(|s| s.dns_servers())
            .unwrap_or_default()
    }

    /// The device's counters.
    pub fn stats(&self) -> &NetDeviceStats {
        &self.stats
    }

    /// Captures every frame to and from the guest from now on (`--pcap`), across guests.
    pub fn set_capture(&self, capture: ferry_net::pcap::Capture) {
        if let Ok(mut s) = self.stack.lock() {
            s.set_capture(Some(capture));
        }
    }

    /// Captures on demand of this device's link.
    pub fn live_captures(&self) -> &Arc<ferry_net::pcap_live::LiveCaptures> {
        &self.services.live_captures
    }

    /// The capture's counters, when one is on.
    pub fn capture_stats(&self) -> Option<ferry_net::pcap::CaptureStats> {
        self.stack.lock().ok().and_then(|s| s.capture_stats())
    }

    /// Where each ring of the current connection stands (none between connections).
    pub fn ring_states(&self) -> Vec<crate::ring_state::RingState> {
        match self.mem.read() {
            Ok(mem) => self.rings.states(&mem),
            Err(_) => Vec::new(),
        }
    }

    /// How much guest memory the device maps now, in MiB (see [`crate::mapped_mib`]).
    pub fn guest_memory_mib(&self) -> u64 {
        self.mem.read().map_or(0, |m| crate::mapped_mib(&m))
    }

    /// The stack's counters and open flows, now.
    pub fn stack_stats(&self) -> (StackStats, Vec<FlowInfo>) {
        self.stack
            .lock()
            .map(|s| (s.stats(), s.flows_brief()))
            .unwrap_or_default()
    }

    /// The open flows with ferry's host socket of each (fd and addresses).
    pub fn flows(&self) -> Vec<FlowInfo> {
        self.stack.lock().map(|s| s.flows()).unwrap_or_default()
    }

    /// A frontend is attached: published ports forward to its guest from now on.
    pub fn frontend_attached(&self) {
        if let Some(p) = &self.services.ports {
            p.set_attached(true);
        }
    }

    /// The fd the stack's host sockets wake, to register with [`HOST_EVENT`] (it changes
    /// when a frontend leaves, so ask at each connection).
    pub fn host_fd(&self) -> RawFd {
        self.stack.lock().map(|s| s.host_fd()).unwrap_or(-1)
    }

    /// Runs `f` on the stack (with guest memory), then delivers what it produced to the guest
    /// and re-arms the timer: the shape of every event the device handles. `f` returns which
    /// TX queues need their interrupt (bit p for pair p).
    fn with_stack(
        &self,
        vrings: &[Vring],
        f: impl FnOnce(&mut NetStack, &GuestMemoryAtomic) -> io::Result<u32>,
    ) -> io::Result<()> {
        let mem = self
            .mem
            .read()
            .map_err(|_| io::Error::other("poisoned"))?
            .clone();
        let mut stack = self
            .stack
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        let res = f(&mut stack, &mem).and_then(|mut tx_signal| {
            let delivered = self.deliver_all(&mut stack, &mem, vrings, &mut tx_signal);
            // The TX interrupt goes right after the RX one rather than before the stack runs:
            // a frontend that finds both eventfds set in one wake-up raises one interrupt
            // (legacy INTx is one line), and the guest takes its ACK and frees its sent
            // buffers in one pass.
            for pair in 0..vrings.len() / 2 {
                if tx_signal & (1 << pair) != 0 {
                    vrings[2 * pair + 1].signal_used_queue()?;
                    self.lost_interrupts.signalled(2 * pair + 1);
                }
            }
            delivered
        });
        stack.flush_capture();
        self.rearm(&mut stack);
        res
    }

    /// Delivers the stack's frames to the guest. When that ends TX coalescing, also takes what
    /// the guest queued meanwhile (adding to `tx_signal` the TX queues that need their
    /// interrupt) and delivers the answers.
    fn deliver_all(
        &self,
        stack: &mut NetStack,
        mem: &GuestMemoryAtomic,
        vrings: &[Vring],
        tx_signal: &mut u32,
    ) -> io::Result<()> {
        let delivered = self.deliver(stack, vrings, mem)?;
        let end_polls = {
            let mut p = self.tx_poll();
            let answers = if p.bulk {
                delivered.answers
            } else {
                delivered.any
            };
            answers && p.at.take().is_some()
        };
        if end_polls {
            // The guest has frames to answer: its kicks come back on (and what it queued
            // meanwhile is taken now).
            *tx_signal |= self.drain_tx(stack, mem, vrings, true)?.0.signal;
            stack.poll();
            self.deliver(stack, vrings, mem)?;
        }
        Ok(())
    }

    fn tx_poll(&self) -> std::sync::MutexGuard<'_, TxPoll> {
        self.tx_poll.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The timer's fd, to register on each connection's worker epoll with [`TIMER_EVENT`].
    pub fn timer_fd(&self) -> RawFd {
        self.timer.lock().map(|t| t.as_raw_fd()).unwrap_or(-1)
    }

    /// Sets the timer to the stack's next deadline.
    fn rearm(&self, stack: &mut NetStack) {
        let Ok(mut t) = self.timer.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        let mut deadline = stack.poll_delay().map(|d| now + d);
        if let Some(t) = self.tx_poll().at {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        }
        // Most events leave the deadline where it was (a retransmit timer a second away):
        // skip the syscall when it moves by less than a millisecond.
        let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        let same = match (*armed, deadline) {
            (None, None) => true,
            (Some(a), Some(d)) => {
                a > now && a.max(d) - a.min(d) < std::time::Duration::from_millis(1) && a <= d
            }
            _ => false,
        };
        if same {
            return;
        }
        *armed = deadline;
        let res = match deadline {
            // A zero delay would disarm the timer; "now" is the next microsecond.
            Some(d) => t.reset(
                d.saturating_duration_since(now)
                    .max(std::time::Duration::from_micros(1)),
                None,
            ),
            None => t.clear(),
        };
        if let Err(e) = res {
            warn!("net: cannot set the stack's timer: {e}");
        }
    }

    fn process_timer(&self, vrings: &[Vring]) -> io::Result<()> {
        debug!("net: stack timer fired");
        if let Ok(mut t) = self.timer.lock() {
            // Readable means expired; the read clears it (EAGAIN: re-armed meanwhile).
            let _ = t.wait();
        }
        if self
            .tx_poll()
            .at
            .is_some_and(|t| t <= std::time::Instant::now())
        {
            // A ring the frontend has disabled is not ours to read (the vhost-user spec); its
            // kicks, once it is enabled again, restart the coalescing.
            if (0..vrings.len() / 2).any(|p| vrings[2 * p + 1].get_ref().is_enabled()) {
                return self.process_tx(vrings, false);
            }
            self.tx_poll().at = None;
        }
        self.with_stack(vrings, |stack, _| {
            stack.poll();
            Ok(0)
        })
    }

    /// Called when a frontend leaves: log what crossed the device so far, and start the next
    /// guest with a fresh link.
    pub fn frontend_gone(&self) {
        self.rings.forget();
        self.lost_interrupts.reset();
        self.rx_buffers_learned.store(false, Ordering::Relaxed);
        *self.tx_poll() = TxPoll::default();
        if let Some(p) = &self.services.ports {
            // Until the next guest, published ports refuse their clients at once.
            p.set_attached(false);
        }
        let s = &self.stats;
        let st = self.stack.lock().map(|st| st.stats()).unwrap_or_default();
        log::info!(
            "net: the guest has sent {} frames ({} bytes) so far, {} malformed, {} dropped (queue full); {} frames ({} bytes) delivered to it; {} DHCP and {} DNS answers; flows open: {} TCP, {} UDP, {} ICMP; {} connections refused",
            s.tx_frames.load(Ordering::Relaxed),
            s.tx_bytes.load(Ordering::Relaxed),
            s.tx_malformed.load(Ordering::Relaxed),
            st.dropped_in,
            s.rx_frames.load(Ordering::Relaxed),
            s.rx_bytes.load(Ordering::Relaxed),
            st.dhcp_replies,
            st.dns_replies,
            st.tcp_flows,
            st.udp_flows,
            st.icmp_flows,
            st.tcp_refused
        );
        if let Ok(mut st) = self.stack.lock() {
            match Self::fresh_stack(&self.cfg, self.upstream, &self.services) {
                Ok(mut fresh) => {
                    // The capture goes on across guests, as published ports do.
                    fresh.set_capture(st.take_capture());
                    *st = fresh;
                }
                Err(e) => warn!("net: cannot make a fresh link for the next guest: {e}"),
            }
        }
    }

    /// The virtio-net config space: MAC, link status, the most queue pairs, MTU.
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.cfg.guest_mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&(MAX_QUEUE_PAIRS as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.cfg.mtu.to_le_bytes());
        c
    }

    /// Takes the guest's frames, after a kick or (`kicked` false) at a coalescing poll.
    fn process_tx(&self, vrings: &[Vring], kicked: bool) -> io::Result<()> {
        self.process_tx_at(vrings, kicked, std::time::Instant::now())
    }

    /// [`process_tx`](Self::process_tx) at time `now` (tests set the clock).
    fn process_tx_at(
        &self,
        vrings: &[Vring],
        kicked: bool,
        now: std::time::Instant,
    ) -> io::Result<()> {
        let streaming = {
            let mut p = self.tx_poll();
            let hot = !kicked
                || p.last_kick.is_some_and(|l| {
                    let since = now.saturating_duration_since(l);
                    since < TX_STREAMING || (p.bulk && since < TX_BULK_STREAMING)
                });
            if kicked {
                p.last_kick = Some(now);
            }
            hot
        };
        self.with_stack(vrings, |stack, mem| {
            // Before the guest's frames: its DHCP request is answered with the MTU its RX
            // buffers take.
            self.learn_rx_buffers(stack, vrings, mem);
            let (drained, largest) = self.drain_tx(stack, mem, vrings, !streaming)?;
            let mut p = self.tx_poll();
            if drained.used > 0 {
                p.bulk = largest >= TX_BULK;
            }
            if !kicked {
                p.adapt(drained.used);
            }
            p.at = (streaming && drained.used > 0).then(|| now + p.wait);
            drop(p);
            stack.poll();
            Ok(drained.signal)
        })
    }

    /// Hands every frame on the enabled TX queues to the stack; the caller signals the queues
    /// the result's `signal` names (bit p for pair p). With `notify_after` false the guest's
    /// kicks stay off (on queues that had frames). Also returns the largest frame's length, in
    /// bytes.
    fn drain_tx(
        &self,
        stack: &mut NetStack,
        mem: &GuestMemoryAtomic,
        vrings: &[Vring],
        notify_after: bool,
    ) -> io::Result<(TxDrained, usize)> {
        let max = self.max_frame();
        let h = self.hdr_len.load(Ordering::Relaxed);
        let mut largest = 0usize;
        let mut all = TxDrained::default();
        for pair in 0..vrings.len() / 2 {
            let vring = &vrings[2 * pair + 1];
            if !ring_in_use(vring) {
                continue;
            }
            let d = drain_queue_unsignalled(
                vring,
                mem,
                self.event_idx.load(Ordering::Relaxed),
                notify_after,
                |chain| {
                    let Ok((mut r, _)) = split_chain(chain.memory(), chain.clone()) else {
                        self.stats.tx_malformed.fetch_add(1, Ordering::Relaxed);
                        return Some(0);
                    };
                    let len = r.available_bytes();
                    // A chain shorter than the virtio header, or longer than the largest frame
                    // the MTU allows, is not a frame: drop it. The header itself is not
                    // needed: a partial checksum (VIRTIO_NET_F_CSUM) stays partial, since the
                    // stack does not verify guest checksums, and GSO is not offered.
                    let mut hdr = [0u8; NET_HDR_LEN];
                    if len < h || len > h + max || r.read_exact(&mut hdr[..h]).is_err() {
                        self.stats.tx_malformed.fetch_add(1, Ordering::Relaxed);
                        return Some(0);
                    }
                    if !stack.receive_frame_with(len - h, |buf| r.read_exact(buf).is_ok()) {
                        self.stats.tx_malformed.fetch_add(1, Ordering::Relaxed);
                        return Some(0);
                    }
                    self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                    self.stats.tx_frames_by_pair[pair].fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .tx_bytes
                        .fetch_add((len - h) as u64, Ordering::Relaxed);
                    largest = largest.max(len - h);
                    Some(0)
                },
            )?;
            all.used += d.used;
            // As for RX rings (`lost_interrupts`): a guest that lost an interrupt waits for it to
            // free what it sent, and stops sending once the ring is full.
            if d.signal || (d.used > 0 && self.lost_interrupts.overdue(2 * pair + 1)) {
                all.signal |= 1 << pair;
            }
        }
        Ok((all, largest))
    }

    /// The largest Ethernet frame the MTU allows.
    fn max_frame(&self) -> usize {
        usize::from(self.cfg.mtu) + 14 + 4
    }

    fn process_rx(&self, vrings: &[Vring]) -> io::Result<()> {
        // New RX buffers: only delivery to do.
        self.with_stack(vrings, |_, _| Ok(0))
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
            | 1 << VIRTIO_NET_F_MQ
            // The control queue is the frontend's to serve (QEMU and cloud-hypervisor both do;
            // neither passes its ring here). Offered because MQ needs it: cloud-hypervisor gives
            // the guest CTRL_VQ only when the backend offers it, and Linux refuses a NIC with
            // MQ and no CTRL_VQ.
            | 1 << VIRTIO_NET_F_CTRL_VQ
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn acked_features(&self, features: u64) {
        // What the frontend acked, for the log: after a reconnect it must match what the guest
        // negotiated (QEMU restores it), or kicks and interrupts go astray.
        log::info!("net: the frontend acked features {features:#x}");
        self.mrg_rxbuf.store(
            features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            Ordering::Relaxed,
        );
        let long = features & (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.hdr_len.store(
            if long { NET_HDR_LEN } else { LEGACY_HDR_LEN },
            Ordering::Relaxed,
        );
        let on = features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
        self.guest_csum.store(on, Ordering::Relaxed);
        // A new negotiation (firmware, then the OS) may post buffers of another size.
        self.rx_buffers_learned.store(false, Ordering::Relaxed);
        if let Ok(mut s) = self.stack.lock() {
            s.set_checksum_offload(on);
            s.limit_frames(None);
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::config_bytes(&self.config_space(), offset, size)
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
        self.rings.note(vrings);
        if usize::from(device_event) < NUM_QUEUES {
            self.lost_interrupts
                .first_event(vrings, usize::from(device_event));
        }
        // An Err here would end the worker thread for good: log and carry on instead.
        let res = match device_event {
            q if usize::from(q) < NUM_QUEUES && q % 2 == 1 => self.process_tx(vrings, true),
            // New RX buffers: deliver what waited for them.
            q if usize::from(q) < NUM_QUEUES => self.process_rx(vrings),
            TIMER_EVENT => self.process_timer(vrings),
            HOST_EVENT => self.with_stack(vrings, |stack, _| {
                stack.handle_host_events();
                Ok(0)
            }),
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
    use crate::tx_poll::{TX_POLL_MAX, TX_POLL_MIN, TX_POLL_STEP};
    use ferry_net::stack::is_bare_tcp_ack;

    #[test]
    fn config_space_has_mac_status_and_mtu() {
        let b = VhostUserNetBackend::new(NetConfig::default(), None).unwrap();
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
        let f = VhostUserNetBackend::new(NetConfig::default(), None)
            .unwrap()
            .features();
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

    /// An Ethernet frame with a TCP segment: `flags` (FIN 1, SYN 2, RST 4, ACK 16),
    /// `options` bytes of TCP options and `payload` bytes of data, over IPv4 or IPv6.
    pub(super) fn segment(v6: bool, flags: u8, options: usize, payload: usize) -> Vec<u8> {
        let tcp = 20 + options;
        let ip = if v6 { 40 } else { 20 };
        let mut f = vec![0u8; 14 + ip + tcp + payload];
        if v6 {
            f[12..14].copy_from_slice(&[0x86, 0xdd]);
            f[14] = 0x60;
            f[18..20].copy_from_slice(&((tcp + payload) as u16).to_be_bytes());
            f[20] = 6;
        } else {
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14] = 0x45;
            f[16..18].copy_from_slice(&((ip + tcp + payload) as u16).to_be_bytes());
            f[23] = 6;
        }
        f[14 + ip + 12] = ((tcp / 4) as u8) << 4;
        f[14 + ip + 13] = flags;
        f
    }

    #[test]
    fn only_a_bare_tcp_ack_lets_a_sender_wait_for_its_poll() {
        for v6 in [false, true] {
            assert!(is_bare_tcp_ack(&segment(v6, 0x10, 0, 0)), "v6 {v6}");
            assert!(
                is_bare_tcp_ack(&segment(v6, 0x10, 12, 0)),
                "timestamps, v6 {v6}"
            );
            // Data, or a SYN, FIN or RST, is something the guest may answer.
            assert!(!is_bare_tcp_ack(&segment(v6, 0x18, 12, 1)));
            for flags in [0x12, 0x11, 0x14, 0x04] {
                assert!(
                    !is_bare_tcp_ack(&segment(v6, flags, 0, 0)),
                    "flags {flags:#x}"
                );
            }
        }
        // Not TCP: UDP, ARP.
        let mut udp = segment(false, 0x10, 0, 0);
        udp[23] = 17;
        assert!(!is_bare_tcp_ack(&udp));
        let mut arp = segment(false, 0x10, 0, 0);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(!is_bare_tcp_ack(&arp));
        // Short frames and a header length past the end are not ACKs, and do not panic.
        let ack = segment(true, 0x10, 0, 0);
        for len in 0..ack.len() {
            assert!(!is_bare_tcp_ack(&ack[..len]), "{len} bytes");
        }
        let mut long_header = segment(false, 0x10, 0, 0);
        long_header[14] = 0x4f;
        assert!(!is_bare_tcp_ack(&long_header));
    }

    #[test]
    fn the_wait_between_polls_follows_what_the_polls_find() {
        let mut p = TxPoll::default();
        assert_eq!(p.wait, TX_POLL_MIN);
        // A few frames per poll: the wait grows by steps to its longest.
        p.adapt(3);
        assert_eq!(p.wait, TX_POLL_MIN + TX_POLL_STEP);
        for _ in 0..20 {
            p.adapt(5);
        }
        assert_eq!(p.wait, TX_POLL_MAX);
        // Many frames per poll (a stream of small datagrams): it stays where it is.
        p.adapt(40);
        assert_eq!(p.wait, TX_POLL_MAX);
        // One frame or none, small: the guest may be waiting on the poll, so the wait
        // halves, down to the shortest.
        p.adapt(1);
        assert_eq!(p.wait, TX_POLL_MAX / 2);
        for _ in 0..10 {
            p.adapt(0);
        }
        assert_eq!(p.wait, TX_POLL_MIN);
        // One big segment or none: a bulk sender slower than the wait, which grows.
        p.bulk = true;
        p.adapt(1);
        assert_eq!(p.wait, TX_POLL_MIN + TX_POLL_STEP);
        for found in [0, 1].into_iter().cycle().take(20) {
            p.adapt(found);
        }
        assert_eq!(p.wait, TX_POLL_MAX);
    }
}

#[cfg(test)]
mod tx_tests {
    use super::*;
    use vhost_user_backend::VringT;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryAtomic as Atomic};

    type Mem = crate::GuestMemoryMmap;

    pub(super) fn vring(mem: &Atomic<Mem>, vq: &MockSplitQueue<'_, Mem>) -> Vring {
        let v = Vring::new(mem.clone(), 16).unwrap();
        v.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        v.set_queue_size(16);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    #[test]
    fn chains_that_lie_are_dropped_and_counted() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let atomic = Atomic::new(m.clone());
        let tx_q = MockSplitQueue::new(&m, 16);
        // Three TX chains: shorter than the virtio header; pointing outside guest memory; and
        // one real (all-zero, so the stack drops it quietly) 60-byte frame.
        let descs = [
            SplitDescriptor::new(0x10_0000, 5, 0, 0),
            SplitDescriptor::new(0x3f_fff0, 4096, 0, 0),
            SplitDescriptor::new(0x10_1000, (NET_HDR_LEN + 60) as u32, 0, 0),
        ]
        .map(RawDescriptor::from);
        tx_q.build_multiple_desc_chains(&descs).unwrap();
        let rx_q = MockSplitQueue::create(&m, GuestAddress(0x20_0000), 16);
        let rx_descs = [RawDescriptor::from(SplitDescriptor::new(
            0x30_0000,
            2048,
            VRING_DESC_F_WRITE as u16,
            0,
        ))];
        rx_q.add_desc_chains(&rx_descs, 0).unwrap();

        let b = VhostUserNetBackend::new(NetConfig::default(), None).unwrap();
        b.update_memory(atomic.clone()).unwrap();
        let vrings = [vring(&atomic, &rx_q), vring(&atomic, &tx_q)];
        b.process_tx(&vrings, true).unwrap();
        assert_eq!(b.stats().tx_malformed.load(Ordering::Relaxed), 2);
        assert_eq!(b.stats().tx_frames.load(Ordering::Relaxed), 1);
        // Every chain went back to the guest, the bad ones too.
        assert_eq!(vrings[1].queue_used_idx().unwrap(), 3);
    }
}

#[cfg(test)]
mod coalesce_tests {
    use super::*;
    use crate::tx_poll::{TX_POLL_MAX, TX_POLL_MIN};
    use vhost_user_backend::VringT;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic as Atomic};

    type Mem = crate::GuestMemoryMmap;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    /// Queues one 60-byte frame (all zero: the stack drops it quietly) as descriptor `i`.
    fn queue_frame(q: &MockSplitQueue<'_, Mem>, i: u16) {
        let d = SplitDescriptor::new(0x10_0000 + u64::from(i) * 0x1000, 72, 0, 0);
        q.add_desc_chains(&[RawDescriptor::from(d)], i).unwrap();
    }

    /// A TX queue, and an RX queue with one 2 KiB buffer posted.
    fn queues(m: &Mem) -> (MockSplitQueue<'_, Mem>, MockSplitQueue<'_, Mem>) {
        let tx_q = MockSplitQueue::new(m, 16);
        let rx_q = MockSplitQueue::create(m, GuestAddress(0x20_0000), 16);
        let rx = SplitDescriptor::new(0x30_0000, 2048, VRING_DESC_F_WRITE as u16, 0);
        rx_q.add_desc_chains(&[RawDescriptor::from(rx)], 0).unwrap();
        (tx_q, rx_q)
    }

    /// A device with the default network plan on those queues.
    fn device(
        m: &Mem,
        tx_q: &MockSplitQueue<'_, Mem>,
        rx_q: &MockSplitQueue<'_, Mem>,
    ) -> (Arc<VhostUserNetBackend>, [Vring; 2]) {
        let atomic = Atomic::new(m.clone());
        let b = VhostUserNetBackend::new(NetConfig::default(), None).unwrap();
        b.update_memory(atomic.clone()).unwrap();
        let vrings = [
            super::tx_tests::vring(&atomic, rx_q),
            super::tx_tests::vring(&atomic, tx_q),
        ];
        (b, vrings)
    }

    /// Frames `first` and `first + 1`, each with its kick, at one instant of the device's
    /// clock: a streaming guest, whatever this machine's speed.
    fn two_quick_kicks(
        b: &VhostUserNetBackend,
        vrings: &[Vring],
        tx_q: &MockSplitQueue<'_, Mem>,
        first: u16,
    ) {
        let t = std::time::Instant::now();
        for i in [first, first + 1] {
            queue_frame(tx_q, i);
            b.process_tx_at(vrings, true, t).unwrap();
        }
    }

    /// Queues one 20000-byte frame (all zero too), a bulk sender's, as descriptor `i`.
    fn queue_big_frame(q: &MockSplitQueue<'_, Mem>, i: u16) {
        let len = (NET_HDR_LEN + 20_000) as u32;
        let d = SplitDescriptor::new(0x10_0000 + u64::from(i) * 0x8000, len, 0, 0);
        q.add_desc_chains(&[RawDescriptor::from(d)], i).unwrap();
    }

    /// Whether the device has told the guest not to kick (VRING_USED_F_NO_NOTIFY).
    fn kicks_off(m: &Mem, q: &MockSplitQueue<'_, Mem>) -> bool {
        m.read_obj::<u16>(q.used_addr()).unwrap() & 1 != 0
    }

    #[test]
    fn a_bulk_sender_streams_at_kicks_further_apart() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        let t = std::time::Instant::now();
        let at = |us| t + std::time::Duration::from_micros(us);

        // Small frames 500 µs apart are served on their kicks.
        queue_frame(&tx_q, 0);
        b.process_tx_at(&vrings, true, at(0)).unwrap();
        queue_frame(&tx_q, 1);
        b.process_tx_at(&vrings, true, at(500)).unwrap();
        assert!(!kicks_off(&m, &tx_q));
        assert!(b.tx_poll().at.is_none());

        // Big ones as far apart are a bulk sender streaming: kicks off, polls on.
        queue_big_frame(&tx_q, 2);
        b.process_tx_at(&vrings, true, at(1000)).unwrap();
        assert!(
            !kicks_off(&m, &tx_q),
            "the first big frame follows a small one"
        );
        queue_big_frame(&tx_q, 3);
        b.process_tx_at(&vrings, true, at(1500)).unwrap();
        assert!(kicks_off(&m, &tx_q));
        assert!(b.tx_poll().at.is_some());
        assert_eq!(b.stats().tx_frames.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn kicks_in_quick_succession_turn_into_polls_until_the_queue_runs_dry() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let (b, vrings) = device(&m, &tx_q, &rx_q);

        // A lone kick is served and the guest keeps kicking.
        let t = std::time::Instant::now();
        queue_frame(&tx_q, 0);
        b.process_tx_at(&vrings, true, t).unwrap();
        assert!(!kicks_off(&m, &tx_q));
        assert!(b.tx_poll().at.is_none());

        // A second kick right after (on the device's clock, however slow this machine is):
        // the guest is streaming, so its kicks go off and a poll is due within the window.
        queue_frame(&tx_q, 1);
        b.process_tx_at(&vrings, true, t).unwrap();
        assert!(kicks_off(&m, &tx_q));
        let at = b.tx_poll().at.expect("a poll is due");
        assert!(at <= std::time::Instant::now() + TX_POLL_MIN);

        // The poll finds a frame the guest queued without kicking, and polls again.
        queue_frame(&tx_q, 2);
        std::thread::sleep(TX_POLL_MAX);
        b.process_timer(&vrings).unwrap();
        assert_eq!(b.stats().tx_frames.load(Ordering::Relaxed), 3);
        assert!(kicks_off(&m, &tx_q));
        assert!(b.tx_poll().at.is_some());

        // The next poll finds nothing: kicks come back on and polling stops.
        std::thread::sleep(TX_POLL_MAX);
        b.process_timer(&vrings).unwrap();
        assert!(!kicks_off(&m, &tx_q));
        assert!(b.tx_poll().at.is_none());
        assert_eq!(vrings[1].queue_used_idx().unwrap(), 3);
    }

    #[test]
    fn frames_to_the_guest_turn_its_kicks_back_on() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let cfg = NetConfig::default();
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        two_quick_kicks(&b, &vrings, &tx_q, 0);
        assert!(kicks_off(&m, &tx_q), "streaming");

        // The guest asks who the gateway is, without kicking; the poll takes the request and
        // the answer goes to the guest, which may be waiting on it: kicks come back on.
        queue_arp_request(&m, &tx_q, &cfg, 2);
        std::thread::sleep(TX_POLL_MAX);
        b.process_timer(&vrings).unwrap();
        assert_eq!(
            b.stats().rx_frames.load(Ordering::Relaxed),
            1,
            "the ARP reply"
        );
        assert!(!kicks_off(&m, &tx_q));
        assert!(b.tx_poll().at.is_none());
    }

    /// Puts `frame` first in line for the guest, where the stack's own frames wait.
    fn for_the_guest(b: &VhostUserNetBackend, frame: Vec<u8>) {
        b.stack
            .lock()
            .unwrap()
            .unpop_frame(ferry_net::stack::Frame::from(frame));
    }

    /// Posts one more 2 KiB RX buffer, as descriptor `i`.
    fn post_rx_buffer(rx_q: &MockSplitQueue<'_, Mem>, i: u16) {
        let at = 0x30_0000 + u64::from(i) * 0x1000;
        let d = SplitDescriptor::new(at, 2048, VRING_DESC_F_WRITE as u16, 0);
        rx_q.add_desc_chains(&[RawDescriptor::from(d)], i).unwrap();
    }

    /// After a bulk drain, a bare TCP ACK to the guest leaves the polls on: the guest is
    /// sending, and its next segments can wait for the poll. A segment with data ends them (the
    /// guest may answer it), and so does any frame after small drains.
    #[test]
    fn only_a_bare_ack_after_a_bulk_drain_leaves_the_polls_on() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        post_rx_buffer(&rx_q, 1);
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        let t = std::time::Instant::now();
        let at = |us| t + std::time::Duration::from_micros(us);
        let ack = super::tests::segment(false, 0x10, 12, 0);
        let data = super::tests::segment(false, 0x18, 12, 100);
        let delivered = || b.stats().rx_frames.load(Ordering::Relaxed);

        // A bulk sender, streaming.
        queue_big_frame(&tx_q, 0);
        b.process_tx_at(&vrings, true, at(0)).unwrap();
        queue_big_frame(&tx_q, 1);
        b.process_tx_at(&vrings, true, at(500)).unwrap();
        assert!(kicks_off(&m, &tx_q));

        // A poll takes its next segment and the guest gets an ACK: the polls go on.
        queue_big_frame(&tx_q, 2);
        for_the_guest(&b, ack.clone());
        std::thread::sleep(TX_POLL_MAX);
        b.process_timer(&vrings).unwrap();
        assert_eq!(delivered(), 1);
        assert!(kicks_off(&m, &tx_q));
        assert!(b.tx_poll().at.is_some());

        // The next one, and data for the guest: its kicks come back on.
        queue_big_frame(&tx_q, 3);
        for_the_guest(&b, data);
        std::thread::sleep(TX_POLL_MAX);
        b.process_timer(&vrings).unwrap();
        assert_eq!(delivered(), 2);
        assert!(!kicks_off(&m, &tx_q));
        assert!(b.tx_poll().at.is_none());

        // Small frames, streaming; a poll and a bare ACK for the guest end the polls too.
        post_rx_buffer(&rx_q, 2);
        two_quick_kicks(&b, &vrings, &tx_q, 4);
        assert!(kicks_off(&m, &tx_q));
        queue_frame(&tx_q, 6);
        for_the_guest(&b, ack);
        std::thread::sleep(TX_POLL_MAX);
        b.process_timer(&vrings).unwrap();
        assert_eq!(delivered(), 3);
        assert!(!kicks_off(&m, &tx_q));
        assert!(b.tx_poll().at.is_none());
    }

    /// Queues, as descriptor `i`, the guest's ARP request for the gateway.
    fn queue_arp_request(m: &Mem, tx_q: &MockSplitQueue<'_, Mem>, cfg: &NetConfig, i: u16) {
        queue_arp_request_after(m, tx_q, cfg, i, NET_HDR_LEN);
    }

    /// [`queue_arp_request`] behind a virtio header of `hdr` bytes.
    fn queue_arp_request_after(
        m: &Mem,
        tx_q: &MockSplitQueue<'_, Mem>,
        cfg: &NetConfig,
        i: u16,
        hdr: usize,
    ) {
        let mut arp = vec![0u8; hdr];
        arp.extend_from_slice(&[0xff; 6]);
        arp.extend_from_slice(&cfg.guest_mac);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&cfg.guest_mac);
        arp.extend_from_slice(&cfg.guest().octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&cfg.gateway().octets());
        arp.resize(hdr + 60, 0);
        let at = 0x18_0000 + u64::from(i) * 0x1000;
        m.write_slice(&arp, GuestAddress(at)).unwrap();
        let d = SplitDescriptor::new(at, arp.len() as u32, 0, 0);
        tx_q.add_desc_chains(&[RawDescriptor::from(d)], i).unwrap();
    }

    /// A restarted ferry under a running guest: the RX ring's used index already past the
    /// guest's `used_event` (the dead process's last interrupt may never have gone out). The
    /// first event on each ring of a connection interrupts the guest, once.
    #[test]
    fn a_connections_first_event_on_a_ring_interrupts_the_guest_once() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        b.set_event_idx(true);
        for v in &vrings {
            v.set_queue_event_idx(true);
        }
        let calls: Vec<_> = vrings.iter().map(crate::call_eventfd).collect();
        for (ring, call) in calls.iter().enumerate() {
            b.handle_event(ring as u16, EventSet::IN, &vrings, 0)
                .unwrap();
            assert_eq!(
                call.read().ok(),
                Some(1),
                "ring {ring}: the first interrupt"
            );
            b.handle_event(ring as u16, EventSet::IN, &vrings, 0)
                .unwrap();
            assert!(call.read().is_err(), "ring {ring}: one per connection");
        }
        b.frontend_gone();
        b.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(
            calls[0].read().ok(),
            Some(1),
            "again on the next connection"
        );
    }

    /// A guest whose `used_event` stands behind the used index asks for no interrupt: the
    /// device still sends one when the ring has had none for LOST_AFTER, so a guest that lost
    /// one (a restart under it) hears of its frames again.
    #[test]
    fn a_ring_filled_without_an_interrupt_for_a_while_gets_one() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        for i in 1..3u16 {
            let rx = SplitDescriptor::new(
                0x30_0000 + u64::from(i) * 0x1000,
                2048,
                VRING_DESC_F_WRITE as u16,
                0,
            );
            rx_q.add_desc_chains(&[RawDescriptor::from(rx)], i).unwrap();
        }
        let cfg = NetConfig::default();
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        b.set_event_idx(true);
        for v in &vrings {
            v.set_queue_event_idx(true);
        }
        let call = crate::call_eventfd(&vrings[0]);
        // The guest's used_event (after the avail ring) stays at 0 while the used index moves
        // on from 0: past the first frame, no crossing asks for an interrupt.
        let used_event = GuestAddress(rx_q.avail_addr().0 + 4 + 2 * 16);
        m.write_obj(0u16, used_event).unwrap();
        let arp = |i: u16| {
            // An ARP request from the guest for the gateway: the stack answers it.
            queue_arp_request(&m, &tx_q, &cfg, i);
            b.process_tx(&vrings, true).unwrap();
        };
        arp(0);
        assert_eq!(
            call.read().ok(),
            Some(1),
            "the first answer crosses used_event 0"
        );
        arp(1);
        assert!(
            call.read().is_err(),
            "the guest asked for no interrupt, and had one just now"
        );
        std::thread::sleep(
            crate::lost_interrupts::LOST_AFTER + std::time::Duration::from_millis(20),
        );
        arp(2);
        assert_eq!(call.read().ok(), Some(1), "none for LOST_AFTER: one anyway");
        assert_eq!(
            vrings[0].queue_used_idx().unwrap(),
            3,
            "three answers delivered"
        );
    }

    /// The same for a TX ring: a guest that lost the interrupt for the chains it sent waits
    /// for it to free them, and stops sending once the ring is full.
    #[test]
    fn a_tx_ring_used_without_an_interrupt_for_a_while_gets_one() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let cfg = NetConfig::default();
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        b.set_event_idx(true);
        for v in &vrings {
            v.set_queue_event_idx(true);
        }
        let call = crate::call_eventfd(&vrings[1]);
        let used_event = GuestAddress(tx_q.avail_addr().0 + 4 + 2 * 16);
        m.write_obj(0u16, used_event).unwrap();
        let send = |i: u16| {
            queue_arp_request(&m, &tx_q, &cfg, i);
            b.process_tx(&vrings, true).unwrap();
        };
        send(0);
        assert_eq!(
            call.read().ok(),
            Some(1),
            "the first chain crosses used_event 0"
        );
        send(1);
        assert!(call.read().is_err(), "the guest asked for no interrupt");
        std::thread::sleep(
            crate::lost_interrupts::LOST_AFTER + std::time::Duration::from_millis(20),
        );
        send(2);
        assert_eq!(call.read().ok(), Some(1), "none for LOST_AFTER: one anyway");
        assert_eq!(vrings[1].queue_used_idx().unwrap(), 3, "three chains taken");
    }

    /// Without MRG_RXBUF a frame must fit one buffer: one that does not is dropped and
    /// counted, the small buffer stays for the next frame, and no frame spans two.
    #[test]
    fn without_mergeable_buffers_a_frame_never_spans_two() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let cfg = NetConfig::default();
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        b.acked_features(1 << VIRTIO_F_VERSION_1);
        // Two 40-byte buffers: together room for the ARP reply (12 + 42), each too small.
        for i in 0..2u16 {
            let d = SplitDescriptor::new(
                0x30_0000 + u64::from(i) * 0x1000,
                40,
                VRING_DESC_F_WRITE as u16,
                0,
            );
            rx_q.add_desc_chains(&[RawDescriptor::from(d)], i).unwrap();
        }
        queue_arp_request(&m, &tx_q, &cfg, 0);
        b.process_tx(&vrings, true).unwrap();
        assert_eq!(vrings[0].queue_used_idx().unwrap(), 0, "nothing written");
        assert_eq!(b.stats().rx_dropped_too_big.load(Ordering::Relaxed), 1);
        // With MRG_RXBUF the same buffers take it, in two.
        b.acked_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF);
        queue_arp_request(&m, &tx_q, &cfg, 1);
        b.process_tx(&vrings, true).unwrap();
        assert_eq!(
            vrings[0].queue_used_idx().unwrap(),
            2,
            "one frame over both buffers"
        );
    }

    /// Without MRG_RXBUF the guest's first RX buffer sets the MTU the stack offers it (and
    /// stays posted); a negotiation with mergeable buffers lifts the limit.
    #[test]
    fn without_mergeable_buffers_the_stack_learns_the_buffer_size() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let cfg = NetConfig::default();
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        b.acked_features(1 << VIRTIO_F_VERSION_1);
        // Linux's small buffers: the virtio header and a 1,518-byte frame.
        let d = SplitDescriptor::new(0x30_0000, 1530, VRING_DESC_F_WRITE as u16, 0);
        rx_q.add_desc_chains(&[RawDescriptor::from(d)], 0).unwrap();
        queue_arp_request(&m, &tx_q, &cfg, 0);
        b.process_tx(&vrings, true).unwrap();
        assert_eq!(b.stack.lock().unwrap().link_mtu(), 1504);
        assert_eq!(
            vrings[0].queue_used_idx().unwrap(),
            1,
            "the buffer looked at still took the ARP reply"
        );
        b.acked_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF);
        assert_eq!(b.stack.lock().unwrap().link_mtu(), cfg.mtu);
    }

    /// A legacy device without MRG_RXBUF (QEMU's `disable-modern=on,mrg_rxbuf=off`): the
    /// virtio header has no `num_buffers` and is 10 bytes, both ways.
    #[test]
    fn a_legacy_device_without_mergeable_buffers_has_the_short_header() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let cfg = NetConfig::default();
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        b.acked_features(0);
        let d = SplitDescriptor::new(0x30_0000, 1528, VRING_DESC_F_WRITE as u16, 0);
        rx_q.add_desc_chains(&[RawDescriptor::from(d)], 0).unwrap();
        queue_arp_request_after(&m, &tx_q, &cfg, 0, LEGACY_HDR_LEN);
        b.process_tx(&vrings, true).unwrap();
        assert_eq!(b.stats().tx_malformed.load(Ordering::Relaxed), 0);
        assert_eq!(vrings[0].queue_used_idx().unwrap(), 1, "an answer");
        let mut reply = [0u8; 14];
        m.read_slice(&mut reply, GuestAddress(0x30_0000 + LEGACY_HDR_LEN as u64))
            .unwrap();
        assert_eq!(
            &reply[..6],
            &cfg.guest_mac,
            "the frame right after 10 bytes"
        );
        assert_eq!(&reply[12..], &[0x08, 0x06], "an ARP reply");
    }

    /// The gateway's DNS answer, a UDP datagram smoltcp emits: to a guest that negotiated
    /// GUEST_CSUM it goes with NEEDS_CSUM and the pseudo-header's sum, which the guest finishes
    /// into the right checksum; to one that did not, whole, with no flags.
    #[test]
    fn partial_checksums_go_as_needs_csum_and_whole_ones_without_flags() {
        use virtio_bindings::bindings::virtio_net::{
            VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_HDR_F_NEEDS_CSUM,
        };
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let cfg = NetConfig::default();
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        // One's complement sum of `data`, folded.
        let sum = |data: &[u8]| {
            let mut s: u32 = data
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
                .sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            s as u16
        };
        for (i, guest_csum) in [(0u16, true), (1, false)] {
            let csum = if guest_csum {
                1 << VIRTIO_NET_F_GUEST_CSUM
            } else {
                0
            };
            b.acked_features(1 << VIRTIO_F_VERSION_1 | csum);
            // The ARP request (its reply), then the query (its answer).
            for j in 0..2u16 {
                let d = SplitDescriptor::new(
                    0x30_0000 + u64::from(2 * i + j) * 0x1000,
                    2048,
                    VRING_DESC_F_WRITE as u16,
                    0,
                );
                rx_q.add_desc_chains(&[RawDescriptor::from(d)], 2 * i + j)
                    .unwrap();
            }
            queue_arp_request(&m, &tx_q, &cfg, 2 * i);
            let q = ferry_net::dns::query(7, "gateway.ferry.internal", 1);
            let mut f = vec![0u8; NET_HDR_LEN];
            f.extend_from_slice(&[0xff; 6]);
            f.extend_from_slice(&cfg.guest_mac);
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
            ip[2..4].copy_from_slice(&(20 + 8 + q.len() as u16).to_be_bytes());
            ip.extend_from_slice(&cfg.guest().octets());
            ip.extend_from_slice(&cfg.gateway().octets());
            let c = !sum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&40000u16.to_be_bytes());
            f.extend_from_slice(&53u16.to_be_bytes());
            f.extend_from_slice(&(8 + q.len() as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
            f.extend_from_slice(&q);
            let at = 0x18_0000 + u64::from(2 * i + 1) * 0x1000;
            m.write_slice(&f, GuestAddress(at)).unwrap();
            let d = SplitDescriptor::new(at, f.len() as u32, 0, 0);
            tx_q.add_desc_chains(&[RawDescriptor::from(d)], 2 * i + 1)
                .unwrap();
            b.process_tx(&vrings, true).unwrap();
            assert_eq!(
                vrings[0].queue_used_idx().unwrap(),
                2 * i + 2,
                "two answers"
            );
            // The used ring's element for the answer: id, then length.
            let elem = rx_q.used_addr().0 + 4 + 8 * u64::from(2 * i + 1);
            let id = m.read_obj::<u32>(GuestAddress(elem)).unwrap();
            let len = m.read_obj::<u32>(GuestAddress(elem + 4)).unwrap() as usize;
            let mut got = vec![0u8; len];
            m.read_slice(&mut got, GuestAddress(0x30_0000 + u64::from(id) * 0x1000))
                .unwrap();
            let (hdr, frame) = got.split_at_mut(NET_HDR_LEN);
            assert_eq!(&frame[12..14], &[0x08, 0x00]);
            assert_eq!(frame[23], 17, "UDP");
            let l4 = 34;
            let udp_len = usize::from(u16::from_be_bytes([frame[l4 + 4], frame[l4 + 5]]));
            if guest_csum {
                assert_eq!(hdr[0], VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, "NEEDS_CSUM");
                assert_eq!(u16::from_le_bytes([hdr[6], hdr[7]]), 34, "csum_start");
                assert_eq!(u16::from_le_bytes([hdr[8], hdr[9]]), 6, "csum_offset");
                // As the guest's kernel finishes it.
                let c = !sum(&frame[l4..l4 + udp_len]);
                frame[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
            } else {
                assert_eq!(hdr[0], 0, "no flags");
            }
            let mut pseudo = frame[26..34].to_vec();
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
            pseudo.extend_from_slice(&frame[l4..l4 + udp_len]);
            assert_eq!(sum(&pseudo), 0xffff, "the checksum verifies ({guest_csum})");
        }
    }

    #[test]
    fn a_frame_with_an_answer_signals_both_queues() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let cfg = NetConfig::default();
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        let calls: Vec<_> = vrings.iter().map(crate::call_eventfd).collect();
        // The TX interrupt is held back until the reply is on the RX ring, and then sent too.
        queue_arp_request(&m, &tx_q, &cfg, 0);
        b.process_tx(&vrings, true).unwrap();
        assert_eq!(vrings[0].queue_used_idx().unwrap(), 1, "the ARP reply");
        assert_eq!(vrings[1].queue_used_idx().unwrap(), 1, "the request, used");
        assert_eq!(calls[0].read().unwrap(), 1, "RX signalled");
        assert_eq!(calls[1].read().unwrap(), 1, "TX signalled");
    }

    #[test]
    fn a_disabled_ring_is_left_alone_until_the_frontend_enables_it() {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (tx_q, rx_q) = queues(&m);
        let cfg = NetConfig::default();
        let (b, vrings) = device(&m, &tx_q, &rx_q);
        // The RX ring is disabled (SET_VRING_ENABLE 0): the ARP reply waits in the stack.
        vrings[0].set_enabled(false);
        queue_arp_request(&m, &tx_q, &cfg, 0);
        b.process_tx(&vrings, true).unwrap();
        assert_eq!(b.stats().rx_frames.load(Ordering::Relaxed), 0);
        assert_eq!(vrings[0].queue_used_idx().unwrap(), 0);
        // Enabled again: the library calls the RX handler, which delivers it.
        vrings[0].set_enabled(true);
        b.process_rx(&vrings).unwrap();
        assert_eq!(b.stats().rx_frames.load(Ordering::Relaxed), 1);

        // A TX poll falls due while the TX ring is disabled: the ring is not read, and the
        // poll is dropped.
        two_quick_kicks(&b, &vrings, &tx_q, 1);
        assert!(b.tx_poll().at.is_some(), "streaming");
        vrings[1].set_enabled(false);
        queue_frame(&tx_q, 3);
        std::thread::sleep(TX_POLL_MAX);
        b.process_timer(&vrings).unwrap();
        assert_eq!(b.stats().tx_frames.load(Ordering::Relaxed), 3);
        assert!(b.tx_poll().at.is_none());
    }
}
