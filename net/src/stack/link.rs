//! The link: frames and the frame queue that is smoltcp's device.
//!
//! Theory of operation. Frames from the guest wait in `rx` for smoltcp, frames for the guest
//! wait in `tx` for the device; both are `Frame`s from one pool of buffers, handed back after
//! use, so steady traffic allocates nothing per frame. smoltcp emits TCP and UDP without
//! checksums, and `FrameTx` fills them in as the guest takes them (`checksum`: partial for a
//! guest that negotiated GUEST_CSUM, whole for one that did not). The parsers here read frames
//! the NAT paths take before smoltcp.

use super::checksum::{self, PartialChecksum};
use super::fragment_for_guest::{self, FragmentIds};
use super::guest_paths::GuestPaths;
use super::*;

/// Frames held at most in each direction; past it, new frames are dropped (and counted).
pub(super) const QUEUE_FRAMES: usize = 1024;

/// Frame buffers kept for reuse at most.
pub(super) const POOL_FRAMES: usize = 512;

/// One frame, in a buffer from the pool. The buffer keeps the longest length it has had,
/// initialised, and the frame is its first `len` bytes: a buffer that held a 54-byte ACK and
/// then takes a 64 KiB segment zeroes nothing, where a truncated `Vec` would zero 64 KiB.
#[derive(Debug, Default)]
pub struct Frame {
    pub(super) buf: Vec<u8>,
    pub(super) len: usize,
    /// Its TCP or UDP checksum is left for the guest to finish (see `checksum`).
    pub(super) partial: Option<PartialChecksum>,
}

impl Frame {
    /// A `len`-byte frame in a buffer from `pool`. Its bytes are whatever the buffer held
    /// (this link's own earlier frames), or zeros where it grows: the caller writes them all.
    pub(super) fn take(pool: &RefCell<Vec<Vec<u8>>>, len: usize) -> Frame {
        let mut buf = pool.borrow_mut().pop().unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Frame {
            buf,
            len,
            partial: None,
        }
    }

    /// Where its TCP or UDP checksum was left partial, for the device's VIRTIO_NET_HDR_F_NEEDS_CSUM;
    /// `None` when the frame's checksums are whole (or it has none).
    pub fn partial_checksum(&self) -> Option<PartialChecksum> {
        self.partial
    }

    /// Makes a partial checksum whole, for a guest that cannot take it so (one that connected
    /// without GUEST_CSUM while the frame waited).
    pub fn finish_checksum(&mut self) {
        if let Some(p) = self.partial.take() {
            checksum::finish(&mut self.buf[..self.len], p);
        }
    }
}

impl From<Vec<u8>> for Frame {
    fn from(buf: Vec<u8>) -> Self {
        let len = buf.len();
        Frame {
            buf,
            len,
            partial: None,
        }
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Frame {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

/// Frames between the guest and the stack. Buffers go back to a pool once used, so steady
/// traffic allocates nothing per frame.
pub(super) struct FrameQueue {
    pub(super) rx: VecDeque<Frame>,
    pub(super) tx: VecDeque<Frame>,
    pub(super) pool: RefCell<Vec<Vec<u8>>>,
    pub(super) mtu: usize,
    /// The guest takes TCP/UDP frames with partial checksums (GUEST_CSUM; `checksum`).
    pub(super) csum_offload: bool,
    /// `--pcap`: every frame both ways.
    pub(super) capture: RefCell<Option<Capture>>,
    /// Captures on demand (`GET /pcap`).
    pub(super) live: Option<std::sync::Arc<crate::pcap_live::LiveCaptures>>,
    /// The longest IP packet the guest's link carries: `mtu`, or less when its RX buffers
    /// take less (`NetStack::limit_frames`). Longer ones go to it in fragments.
    pub(super) link_mtu: usize,
    pub(super) fragment_ids: FragmentIds,
    /// The path MTUs the guest reported (IPv6 Packet Too Big), for what it routes on.
    pub(super) paths: GuestPaths,
}

impl FrameQueue {
    /// Records a frame in the captures, the file's and the live ones.
    pub(super) fn record(&mut self, frame: &[u8]) {
        pcap::record(self.capture.get_mut(), frame);
        if let Some(l) = &self.live {
            l.record(frame);
        }
    }

    /// The way frames the stack makes itself go to the guest: `FrameTx::push`.
    pub(super) fn outbox(&mut self) -> FrameTx<'_> {
        self.split_borrow().2
    }

    /// The frames from the guest, the buffer pool, and the way to the guest, borrowed apart.
    fn split_borrow(&mut self) -> (&mut VecDeque<Frame>, &RefCell<Vec<Vec<u8>>>, FrameTx<'_>) {
        let fill_checksums = !self.csum_offload;
        (
            &mut self.rx,
            &self.pool,
            FrameTx {
                tx: &mut self.tx,
                pool: &self.pool,
                capture: &self.capture,
                live: &self.live,
                fill_checksums,
                link_mtu: self.link_mtu,
                fragment_ids: &mut self.fragment_ids,
                paths: &self.paths,
            },
        )
    }
}

/// Puts `f`'s buffer back in `pool` (unless the pool is full).
pub(super) fn recycle(pool: &RefCell<Vec<Vec<u8>>>, f: Frame) {
    let mut p = pool.borrow_mut();
    if p.len() < POOL_FRAMES {
        p.push(f.buf);
    }
}

pub(super) struct FrameRx<'a> {
    pub(super) frame: Frame,
    pub(super) pool: &'a RefCell<Vec<Vec<u8>>>,
}

pub(super) struct FrameTx<'a> {
    pub(super) tx: &'a mut VecDeque<Frame>,
    pub(super) pool: &'a RefCell<Vec<Vec<u8>>>,
    pub(super) capture: &'a RefCell<Option<Capture>>,
    pub(super) live: &'a Option<std::sync::Arc<crate::pcap_live::LiveCaptures>>,
    /// The guest needs whole TCP/UDP checksums (it did not negotiate GUEST_CSUM).
    pub(super) fill_checksums: bool,
    pub(super) link_mtu: usize,
    pub(super) fragment_ids: &'a mut FragmentIds,
    pub(super) paths: &'a GuestPaths,
}

impl FrameTx<'_> {
    /// The longest IP packet `frame`'s path to the guest takes: the link's MTU, or less where
    /// the guest reported less for it (`guest_paths`).
    fn mtu_for(&self, frame: &[u8]) -> usize {
        self.paths
            .mtu_for(frame)
            .map_or(self.link_mtu, |m| m.min(self.link_mtu))
    }

    /// Whether `frame`'s IP packet is longer than `mtu`.
    fn longer_than(frame: &[u8], mtu: usize) -> bool {
        fragment_for_guest::ip_len(frame).is_some_and(|l| l > mtu)
    }

    /// Queues `frame` for the guest, in fragments if its IP packet is longer than its path
    /// carries, free to be fragmented further unless TCP (see `fragment_for_guest`), and
    /// records what is queued in the captures.
    pub(super) fn push(&mut self, frame: Frame) {
        let mtu = self.mtu_for(&frame);
        let too_long = Self::longer_than(&frame, mtu);
        self.push_within(frame, mtu, too_long);
    }

    /// [`Self::push`], the path's MTU and whether the packet exceeds it known.
    fn push_within(&mut self, mut frame: Frame, mtu: usize, too_long: bool) {
        fragment_for_guest::allow_fragments(&mut frame);
        let pieces = too_long
            .then(|| fragment_for_guest::split(&frame, mtu, self.fragment_ids, self.pool))
            .flatten();
        match pieces {
            Some(pieces) => {
                recycle(self.pool, frame);
                for p in pieces {
                    self.queue(p);
                }
            }
            None => self.queue(frame),
        }
    }

    fn queue(&mut self, frame: Frame) {
        pcap::record(&mut self.capture.borrow_mut(), &frame);
        if let Some(l) = self.live {
            l.record(&frame);
        }
        self.tx.push_back(frame);
    }
}

impl RxToken for FrameRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.frame);
        recycle(self.pool, self.frame);
        r
    }
}

impl TxToken for FrameTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        // smoltcp writes every byte of the frames it emits (headers, option padding, zeroed
        // checksum fields, payload), so the buffer is not zeroed for it.
        let mut frame = Frame::take(self.pool, len);
        let r = f(&mut frame);
        // A packet the link splits gets its whole checksum: no fragment is a segment the
        // guest could finish.
        let mtu = self.mtu_for(&frame);
        let split = Self::longer_than(&frame, mtu);
        frame.partial = checksum::fill(&mut frame, self.fill_checksums || split);
        self.push_within(frame, mtu, split);
        r
    }
}

impl Device for FrameQueue {
    type RxToken<'a> = FrameRx<'a>;
    type TxToken<'a> = FrameTx<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(FrameRx<'_>, FrameTx<'_>)> {
        let (rx, pool, tx) = self.split_borrow();
        let frame = rx.pop_front()?;
        Some((FrameRx { frame, pool }, tx))
    }

    fn transmit(&mut self, _t: Instant) -> Option<FrameTx<'_>> {
        (self.tx.len() < QUEUE_FRAMES).then(|| self.outbox())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // The MTU counts the IP packet; smoltcp's counts the Ethernet frame.
        caps.max_transmission_unit = self.mtu + 14;
        // TCP/UDP checksums of guest frames are not verified: the link is memory and cannot
        // corrupt, as with a tap device, and a guest that offloads them (VIRTIO_NET_F_CSUM)
        // sends partial sums. Nor does smoltcp fill them in the frames it emits: it reads these
        // capabilities once, when the interface is made, and whether the guest takes partial
        // checksums (GUEST_CSUM) is negotiated later and may change with the next guest;
        // `FrameTx` fills them in as the guest takes them (`checksum`).
        caps.checksum.tcp = smoltcp::phy::Checksum::None;
        caps.checksum.udp = smoltcp::phy::Checksum::None;
        caps
    }
}

/// The IPv4 header of an Ethernet frame (checksum checked) and the packet's payload.
pub(super) fn parse_ipv4(frame: &[u8]) -> Option<(smoltcp::wire::Ipv4Repr, &[u8])> {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, Ipv4Packet, Ipv4Repr};
    let f = EthernetFrame::new_checked(frame).ok()?;
    if f.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let p = Ipv4Packet::new_checked(f.payload()).ok()?;
    let ip = Ipv4Repr::parse(&p, &Default::default()).ok()?;
    // The payload without Ethernet padding, as the IP header counts it.
    let payload = &frame[14 + p.header_len() as usize..][..ip.payload_len];
    Some((ip, payload))
}

/// What the NAT paths need of an IP packet's header, either family.
pub(super) struct IpInfo {
    pub(super) src: std::net::IpAddr,
    pub(super) dst: std::net::IpAddr,
    /// The transport protocol (IPv6: the first next header; packets with extension headers
    /// are smoltcp's).
    pub(super) proto: smoltcp::wire::IpProtocol,
    pub(super) hop_limit: u8,
    /// The whole packet's length, header included, as the rules count it.
    pub(super) len: usize,
}

/// The header of an IPv4 (checksum checked) or IPv6 packet in an Ethernet frame, and the
/// packet's payload without Ethernet padding.
pub(super) fn parse_ip(frame: &[u8]) -> Option<(IpInfo, &[u8])> {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, Ipv6Packet, Ipv6Repr};
    match frame.get(12..14)? {
        [0x08, 0x00] => {
            let (ip, payload) = parse_ipv4(frame)?;
            Some((
                IpInfo {
                    src: ip.src_addr.into(),
                    dst: ip.dst_addr.into(),
                    proto: ip.next_header,
                    hop_limit: ip.hop_limit,
                    len: frame
                        .len()
                        .min(14 + usize::from(u16::from_be_bytes([frame[16], frame[17]])))
                        - 14,
                },
                payload,
            ))
        }
        [0x86, 0xdd] => {
            let f = EthernetFrame::new_checked(frame).ok()?;
            if f.ethertype() != EthernetProtocol::Ipv6 {
                return None;
            }
            let p = Ipv6Packet::new_checked(f.payload()).ok()?;
            let ip = Ipv6Repr::parse(&p).ok()?;
            let payload = frame.get(14 + 40..14 + 40 + ip.payload_len)?;
            Some((
                IpInfo {
                    src: ip.src_addr.into(),
                    dst: ip.dst_addr.into(),
                    proto: ip.next_header,
                    hop_limit: ip.hop_limit,
                    len: 40 + ip.payload_len,
                },
                payload,
            ))
        }
        _ => None,
    }
}

/// The TCP segment of a frame the stack made, IPv4 or IPv6, and its IP source and destination:
/// no checksum is checked (the stack wrote the frame), so it costs a few header reads per
/// frame.
pub(super) fn stack_tcp_segment(
    frame: &[u8],
) -> Option<(
    std::net::IpAddr,
    std::net::IpAddr,
    smoltcp::wire::TcpPacket<&[u8]>,
)> {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet};
    let f = EthernetFrame::new_checked(frame).ok()?;
    // The frame's buffer, past the Ethernet header (the packet views borrow `f` otherwise).
    let ip = frame.get(14..)?;
    let (src, dst, segment) = match f.ethertype() {
        EthernetProtocol::Ipv4 => {
            let p = Ipv4Packet::new_checked(ip).ok()?;
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            let at = usize::from(p.header_len());
            let end = usize::from(p.total_len()).min(ip.len());
            (p.src_addr().into(), p.dst_addr().into(), ip.get(at..end)?)
        }
        EthernetProtocol::Ipv6 => {
            // Stack-made frames carry no extension headers.
            let p = Ipv6Packet::new_checked(ip).ok()?;
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            let end = (40 + usize::from(p.payload_len())).min(ip.len());
            (p.src_addr().into(), p.dst_addr().into(), ip.get(40..end)?)
        }
        _ => return None,
    };
    Some((
        src,
        dst,
        smoltcp::wire::TcpPacket::new_checked(segment).ok()?,
    ))
}

/// Whether `frame` is an IPv4 or IPv6 TCP segment with no payload and no SYN, FIN or RST: what
/// a receiver sends a sender, which the sender need not answer. The device asks it of the
/// frames the stack makes, so no checksum is checked.
pub fn is_bare_tcp_ack(frame: &[u8]) -> bool {
    stack_tcp_segment(frame)
        .is_some_and(|(_, _, t)| !t.syn() && !t.fin() && !t.rst() && t.payload().is_empty())
}

/// `a` as IPv6 (IPv4 mapped; callers on IPv6 paths have IPv6 addresses).
pub(super) fn v6(a: std::net::IpAddr) -> std::net::Ipv6Addr {
    match a {
        std::net::IpAddr::V6(a) => a,
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

pub(super) fn smol(a: std::net::Ipv4Addr) -> Ipv4Address {
    Ipv4Address::from(a.octets())
}
