//! The guest's link: a smoltcp interface that owns the gateway (.1) and the host alias, and
//! answers ARP, ICMP echo to its own addresses, and DHCP.
//!
//! Frames come in with [`NetStack::receive_frame`] and go out through
//! [`NetStack::pop_frame`]; [`NetStack::poll`] runs the stack in between. The NAT, DNS and port
//! publishing build on this in the virtio-net issue.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::time::Instant as StdInstant;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::udp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};

use crate::nat::{FlowKey, UdpNat, FLOW_TOKEN_BASE};
use crate::pcap::{self, Capture, CaptureStats};
use crate::ports::{Incoming, Ports};
use crate::rules::{Action, Counters, Proto, Rules};
use crate::{dhcp, dns};
use crate::{NetConfig, GATEWAY_MAC};
use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Weak};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Frames held at most in each direction; past it, new frames are dropped (and counted).
const QUEUE_FRAMES: usize = 1024;

/// Frame buffers kept for reuse at most.
const POOL_FRAMES: usize = 512;

/// One frame, in a buffer from the pool. The buffer keeps the longest length it has had,
/// initialised, and the frame is its first `len` bytes: a buffer that held a 54-byte ACK and
/// then takes a 64 KiB segment zeroes nothing, where a truncated `Vec` would zero 64 KiB.
#[derive(Debug, Default)]
pub struct Frame {
    buf: Vec<u8>,
    len: usize,
}

impl Frame {
    /// A `len`-byte frame in a buffer from `pool`. Its bytes are whatever the buffer held
    /// (this link's own earlier frames), or zeros where it grows: the caller writes them all.
    fn take(pool: &RefCell<Vec<Vec<u8>>>, len: usize) -> Frame {
        let mut buf = pool.borrow_mut().pop().unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Frame { buf, len }
    }
}

impl From<Vec<u8>> for Frame {
    fn from(buf: Vec<u8>) -> Self {
        let len = buf.len();
        Frame { buf, len }
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
struct FrameQueue {
    rx: VecDeque<Frame>,
    tx: VecDeque<Frame>,
    pool: RefCell<Vec<Vec<u8>>>,
    mtu: usize,
    /// The guest takes TCP/UDP frames without checksums (the device marks them valid).
    csum_offload: bool,
    /// `--pcap`: every frame both ways.
    capture: RefCell<Option<Capture>>,
}

/// Puts `f`'s buffer back in `pool` (unless the pool is full).
fn recycle(pool: &RefCell<Vec<Vec<u8>>>, f: Frame) {
    let mut p = pool.borrow_mut();
    if p.len() < POOL_FRAMES {
        p.push(f.buf);
    }
}

struct FrameRx<'a> {
    frame: Frame,
    pool: &'a RefCell<Vec<Vec<u8>>>,
}

struct FrameTx<'a> {
    tx: &'a mut VecDeque<Frame>,
    pool: &'a RefCell<Vec<Vec<u8>>>,
    capture: &'a RefCell<Option<Capture>>,
}

impl RxToken for FrameRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.frame);
        recycle(self.pool, self.frame);
        r
    }
}

impl TxToken for FrameTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // smoltcp writes every byte of the frames it emits (headers, option padding, zeroed
        // checksum fields, payload), so the buffer is not zeroed for it.
        let mut frame = Frame::take(self.pool, len);
        let r = f(&mut frame);
        pcap::record(&mut self.capture.borrow_mut(), &frame);
        self.tx.push_back(frame);
        r
    }
}

impl Device for FrameQueue {
    type RxToken<'a> = FrameRx<'a>;
    type TxToken<'a> = FrameTx<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(FrameRx<'_>, FrameTx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((
            FrameRx {
                frame,
                pool: &self.pool,
            },
            FrameTx {
                tx: &mut self.tx,
                pool: &self.pool,
                capture: &self.capture,
            },
        ))
    }

    fn transmit(&mut self, _t: Instant) -> Option<FrameTx<'_>> {
        (self.tx.len() < QUEUE_FRAMES).then_some(FrameTx {
            tx: &mut self.tx,
            pool: &self.pool,
            capture: &self.capture,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // The MTU counts the IP packet; smoltcp's counts the Ethernet frame.
        caps.max_transmission_unit = self.mtu + 14;
        // TCP/UDP checksums of guest frames are not verified: the link is memory and cannot
        // corrupt, as with a tap device, and a guest that offloads them (VIRTIO_NET_F_CSUM)
        // sends partial sums. Frames to the guest carry them unless it takes them without.
        let out = if self.csum_offload {
            smoltcp::phy::Checksum::None
        } else {
            smoltcp::phy::Checksum::Tx
        };
        caps.checksum.tcp = out;
        caps.checksum.udp = out;
        caps
    }
}

/// Counters for the link.
#[derive(Debug, Default, Clone, Copy)]
pub struct StackStats {
    /// Frames the guest sent that the stack took.
    pub frames_in: u64,
    /// Frames dropped because the queue toward the stack was full.
    pub dropped_in: u64,
    /// DHCP answers sent.
    pub dhcp_replies: u64,
    /// DNS answers sent.
    pub dns_replies: u64,
    /// Open NAT flows: TCP, UDP, ICMP echo.
    pub tcp_flows: u64,
    /// Open UDP flows.
    pub udp_flows: u64,
    /// Open ping flows.
    pub icmp_flows: u64,
    /// Guest connections refused because the host connect failed (RST sent).
    pub tcp_refused: u64,
    /// Connections from published ports handed to the guest.
    pub published_connections: u64,
    /// Open published UDP mappings.
    pub udp_published: u64,
}

/// One open flow, as the control API lists it.
#[derive(Clone, Debug)]
pub struct FlowInfo {
    /// "tcp", "udp" or "udp-published".
    pub protocol: &'static str,
    /// The guest's end.
    pub guest: SocketAddrV4,
    /// The other end as the guest sees it.
    pub remote: SocketAddrV4,
    /// The TCP state ("Established"...), or "open".
    pub state: String,
    /// Whether a published port opened it (the host's client connected in).
    pub inbound: bool,
}

/// The guest's link and the services on it.
pub struct NetStack {
    cfg: NetConfig,
    /// The guest's MAC and address as its frames show them.
    guest: crate::guest::Guest,
    /// Datagrams the guest is sending in fragments.
    fragments: crate::fragments::Reassembly,
    /// The identification of the last datagram ferry sent the guest in fragments.
    ip_id: u16,
    iface: Interface,
    device: FrameQueue,
    sockets: SocketSet<'static>,
    dhcp: SocketHandle,
    dns: SocketHandle,
    epoch: StdInstant,
    stats: StackStats,
    /// Host sockets that wake the stack (NAT flows, the DNS upstream socket).
    epoll: Epoll,
    nat: UdpNat,
    icmp: crate::icmp::IcmpNat,
    tcp: crate::tcp_nat::TcpNat,
    /// The stack's UDP socket for each destination the guest talks to through the NAT.
    nat_sockets: HashMap<SocketAddrV4, SocketHandle>,
    /// The DNS server queries are forwarded to, and the host socket connected to it.
    upstream: Option<UdpSocket>,
    /// Where `upstream` sends (it connects again when a send finds it unconnected).
    upstream_addr: Option<SocketAddr>,
    /// The upstream for DNS over TCP (IPv4 upstreams only, as the NAT is IPv4).
    upstream_tcp: Option<SocketAddrV4>,
    /// Forwarded queries in flight: our id -> (guest endpoint, the guest's query).
    dns_pending: HashMap<u16, (IpEndpoint, Vec<u8>)>,
    next_dns_id: u16,
    last_expiry: StdInstant,
    /// Reused buffers: host reads, and the flow keys a poll walks.
    host_buf: Vec<u8>,
    pump_keys: Vec<crate::tcp_nat::TcpKey>,
    /// Published ports (shared with the control API and the ports thread), if any.
    ports: Option<Arc<Ports>>,
    /// The HTTP(S) proxy the gateway's port 3128 leads to, if any.
    proxy: Option<Arc<crate::proxy::Proxy>>,
    /// The rules new outbound flows and published ports' clients are checked against, if any.
    rules: Option<Arc<Rules>>,
    /// Reused buffer for what the ports thread hands over.
    incoming: Vec<Incoming>,
    /// Published UDP mappings: the guest-side flow (guest port, the client as the guest sees
    /// it) -> the published socket and the real client.
    udp_pub: HashMap<FlowKey, UdpMapping>,
}

/// One client of a published UDP port.
struct UdpMapping {
    socket: Weak<UdpSocket>,
    client: SocketAddr,
    last: StdInstant,
    /// The counters of the inbound rule that let the client in, if rules are set.
    counters: Option<Arc<Counters>>,
}

/// How long a published UDP mapping lives without traffic.
const UDP_PUBLISH_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// How long the guest has to answer a published connection's SYN.
const PUBLISH_CONNECT_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(10);
/// How long the guest may stay silent while ferry waits for it to acknowledge the FIN that
/// follows everything else the host side sent: then the guest's connection is reset and the
/// host socket goes. A guest that drops it (its accept queue overflowed, it hung, it left)
/// would otherwise hold a host descriptor for minutes of retransmissions; one that answers
/// keeps its side open as long as it likes.
const FIN_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(3);

/// Receive and send buffer of each NAT'd TCP connection: the window the guest sees. Under TCG
/// the guest's round trip is milliseconds long, and 256 KiB held host-to-guest TCP to a third
/// of what 4 MiB allows. The memory is virtual until used (ferry's allocator maps buffers this
/// size on demand), so an idle or short connection costs a few pages.
const TCP_BUFFER: usize = 4096 * 1024;

/// The epoll token of the DNS upstream socket.
const DNS_TOKEN: u64 = 1;
/// The epoll token of the published ports' handover.
const PUBLISH_TOKEN: u64 = 2;
/// Forwarded queries waiting at most.
const MAX_DNS_PENDING: usize = 1024;

/// A UDP socket bound to `port` on the stack's addresses.
fn udp_socket(port: u16) -> udp::Socket<'static> {
    let rx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16 * 1024]);
    let tx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16 * 1024]);
    let mut socket = udp::Socket::new(rx, tx);
    // Binding a fresh socket to a free port cannot fail.
    let _ = socket.bind(port);
    socket
}

/// The stack socket NAT replies leave from: room for datagrams up to 65507 bytes toward the
/// guest, and none the other way (guest datagrams to NAT flows go straight to host sockets).
fn udp_reply_socket() -> udp::Socket<'static> {
    let rx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 1], vec![0; 0]);
    let tx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 160 * 1024]);
    udp::Socket::new(rx, tx)
}

/// The IPv4 header of an Ethernet frame (checksum checked) and the packet's payload.
fn parse_ipv4(frame: &[u8]) -> Option<(smoltcp::wire::Ipv4Repr, &[u8])> {
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

/// Whether `frame` is an IPv4 or IPv6 TCP segment with no payload and no SYN, FIN or RST: what
/// a receiver sends a sender, which the sender need not answer. The device asks it of the
/// frames the stack makes, so no checksum is checked.
pub fn is_bare_tcp_ack(frame: &[u8]) -> bool {
    use smoltcp::wire::{
        EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    };
    let Ok(f) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    let segment = match f.ethertype() {
        EthernetProtocol::Ipv4 => match Ipv4Packet::new_checked(f.payload()) {
            Ok(p) if p.next_header() == IpProtocol::Tcp => p.payload(),
            _ => return false,
        },
        EthernetProtocol::Ipv6 => match Ipv6Packet::new_checked(f.payload()) {
            // Stack-made frames carry no extension headers.
            Ok(p) if p.next_header() == IpProtocol::Tcp => p.payload(),
            _ => return false,
        },
        _ => return false,
    };
    TcpPacket::new_checked(segment)
        .is_ok_and(|t| !t.syn() && !t.fin() && !t.rst() && t.payload().is_empty())
}

/// The flow of a guest UDP datagram to an IPv4 destination, and its payload, if `frame` is
/// one (the IPv4 header's checksum checked; the UDP one is not, see
/// `FrameQueue::capabilities`).
fn parse_udp_payload(frame: &[u8]) -> Option<(FlowKey, &[u8])> {
    use smoltcp::wire::{IpProtocol, UdpPacket, UdpRepr};
    let (ip, payload) = parse_ipv4(frame)?;
    if ip.next_header != IpProtocol::Udp {
        return None;
    }
    let u = UdpPacket::new_checked(payload).ok()?;
    let mut caps = smoltcp::phy::ChecksumCapabilities::default();
    caps.udp = smoltcp::phy::Checksum::Tx;
    let repr = UdpRepr::parse(&u, &ip.src_addr.into(), &ip.dst_addr.into(), &caps).ok()?;
    let dst = std::net::Ipv4Addr::from(ip.dst_addr.octets());
    let len = u.payload().len();
    Some((
        FlowKey {
            guest_port: repr.src_port,
            dst: SocketAddrV4::new(dst, repr.dst_port),
        },
        &payload[8..8 + len],
    ))
}

/// Sends a guest datagram on its flow's host socket, counting it for the flow's rule. UDP may
/// drop: a full host socket buffer loses the datagram, as a router would.
fn send_on(flow: &mut crate::nat::UdpFlow, payload: &[u8]) {
    if let (Ok(n), Some(c)) = (flow.socket.send(payload), &flow.counters) {
        c.add_bytes(n);
    }
    flow.last = StdInstant::now();
}

/// Whether the peer of `host` has closed its side with nothing left to read (Some(true)), has
/// sent data (Some(false)), or neither yet (None), without taking anything from the socket.
fn peek_eof(host: &std::net::TcpStream) -> Option<bool> {
    let mut b = [0u8; 1];
    // SAFETY: the fd is valid and `b` has room for the one byte asked for.
    let n = unsafe {
        libc::recv(
            host.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Some(true),
        n if n > 0 => Some(false),
        _ => None,
    }
}

fn smol(a: std::net::Ipv4Addr) -> Ipv4Address {
    Ipv4Address::from(a.octets())
}

impl NetStack {
    /// A link for the network plan `cfg`, forwarding DNS to `upstream` when given.
    pub fn new(cfg: NetConfig, upstream: Option<SocketAddr>) -> io::Result<Self> {
        let mut device = FrameQueue {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            pool: RefCell::new(Vec::new()),
            mtu: usize::from(cfg.mtu),
            csum_offload: false,
            capture: RefCell::new(None),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = u64::from(std::process::id()) ^ 0x5eed_f00d;
        let epoch = StdInstant::now();
        let mut iface = Interface::new(config, &mut device, Instant::from_millis(0));
        let prefix = cfg.subnet.prefix();
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(smol(cfg.gateway())), prefix));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(smol(cfg.host_alias())), prefix));
        });
        // Accept packets for any destination: the NAT answers for the whole world.
        iface.set_any_ip(true);
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(smol(cfg.gateway()));
        let mut sockets = SocketSet::new(Vec::new());
        let socket = udp_socket(dhcp::SERVER_PORT);
        let dhcp = sockets.add(socket);
        let mut dns_socket = udp_socket(dns::PORT);
        // Only the gateway's port 53: queries the guest sends elsewhere go through the NAT.
        let _ = dns_socket.bind(IpEndpoint::new(
            IpAddress::Ipv4(smol(cfg.gateway())),
            dns::PORT,
        ));
        let dns = sockets.add(dns_socket);
        let epoll = Epoll::new()?;
        let upstream_addr = upstream;
        let upstream = match upstream {
            Some(addr) => {
                let s = UdpSocket::bind(if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                })?;
                // An upstream the host cannot reach now (offline, VPN not up yet) must not keep
                // the device from starting: queries get SERVFAIL until it can be reached (each
                // one tries again).
                if let Err(e) = s.connect(addr) {
                    log::warn!("dns: the upstream {addr} cannot be reached now ({e}); names ferry does not answer itself get SERVFAIL until it can");
                }
                s.set_nonblocking(true)?;
                epoll.ctl(
                    ControlOperation::Add,
                    s.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, DNS_TOKEN),
                )?;
                Some(s)
            }
            None => None,
        };
        let host_alias = cfg.host_alias();
        let max_connections = cfg.max_connections;
        let upstream_tcp = match upstream_addr {
            Some(SocketAddr::V4(a)) => Some(a),
            _ => None,
        };
        Ok(NetStack {
            upstream_tcp,
            upstream_addr,
            guest: crate::guest::Guest::new(&cfg),
            fragments: Default::default(),
            ip_id: 0,
            cfg,
            iface,
            device,
            sockets,
            dhcp,
            dns,
            epoch,
            stats: StackStats::default(),
            epoll,
            nat: UdpNat::new(host_alias),
            icmp: crate::icmp::IcmpNat::default(),
            tcp: {
                let mut t = crate::tcp_nat::TcpNat::new(host_alias);
                t.max_flows = max_connections;
                t
            },
            nat_sockets: HashMap::new(),
            upstream,
            dns_pending: HashMap::new(),
            next_dns_id: 1,
            last_expiry: StdInstant::now(),
            host_buf: Vec::new(),
            pump_keys: Vec::new(),
            ports: None,
            proxy: None,
            rules: None,
            incoming: Vec::new(),
            udp_pub: HashMap::new(),
        })
    }

    /// Whether the guest takes TCP/UDP frames without checksums (negotiated GUEST_CSUM).
    pub fn set_checksum_offload(&mut self, on: bool) {
        self.device.csum_offload = on;
    }

    /// Takes connections and datagrams from published ports.
    pub fn with_ports(mut self, ports: Arc<Ports>) -> io::Result<Self> {
        self.epoll.ctl(
            ControlOperation::Add,
            ports.notify_fd(),
            EpollEvent::new(EventSet::IN, PUBLISH_TOKEN),
        )?;
        self.ports = Some(ports);
        Ok(self)
    }

    /// The gateway's port 3128 leads to `proxy`.
    pub fn with_proxy(mut self, proxy: Arc<crate::proxy::Proxy>) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// New outbound flows and published ports' clients are checked against `rules`.
    pub fn with_rules(mut self, rules: Arc<Rules>) -> Self {
        self.rules = Some(rules);
        self
    }

    /// What the rules say of a new flow of `proto` to `dst` whose first packet is `frame`:
    /// `Ok` with the counters its traffic adds to (None: no rules), or `Err` with the action
    /// that refused it, after answering the guest as that action says.
    fn decide(
        &mut self,
        proto: Proto,
        dst: SocketAddrV4,
        frame: &[u8],
    ) -> Result<Option<Arc<Counters>>, Action> {
        let Some(rules) = &self.rules else {
            return Ok(None);
        };
        // The IPv4 total length (callers parsed the header), without Ethernet padding.
        let len = frame
            .get(16..18)
            .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
        let v = rules.check(proto, SocketAddr::V4(dst), len);
        match v.action {
            Action::Allow => Ok(Some(v.counters)),
            Action::Reject if proto != Proto::Tcp => {
                self.port_unreachable(frame);
                Err(Action::Reject)
            }
            refused => Err(refused),
        }
    }

    /// Answers a guest IPv4 packet with ICMP port unreachable from its destination, quoting
    /// its header and first 8 bytes (RFC 792), as `iptables -j REJECT` does.
    fn port_unreachable(&mut self, frame: &[u8]) {
        use smoltcp::wire::{Icmpv4Packet, IpProtocol};
        let Some((ip, _)) = parse_ipv4(frame) else {
            return;
        };
        if self.device.tx.len() >= QUEUE_FRAMES {
            return;
        }
        // parse_ipv4 checked the header: its length fits in the frame.
        let packet = &frame[14..];
        let header = usize::from(packet[0] & 0x0f) * 4;
        let quote = &packet[..(header + 8).min(packet.len())];
        self.emit_to_guest(ip.dst_addr, IpProtocol::Icmp, 8 + quote.len(), |p| {
            p[..8].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
            p[8..].copy_from_slice(quote);
            Icmpv4Packet::new_unchecked(p).fill_checksum();
        });
    }

    /// The address a published port's client has in the guest: its own when it is remote,
    /// the host alias when it is this host (loopback) or not IPv4.
    fn seen_addr(&self, client: SocketAddr) -> std::net::Ipv4Addr {
        let v4 = match client.ip() {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(a) => a.to_ipv4_mapped(),
        };
        match v4 {
            Some(a) if !a.is_loopback() && !a.is_unspecified() => a,
            _ => self.cfg.host_alias(),
        }
    }

    /// Connections and datagrams from published ports, to the guest.
    fn publish_in(&mut self) {
        let Some(ports) = &self.ports else {
            return;
        };
        let mut incoming = std::mem::take(&mut self.incoming);
        ports.take_incoming(&mut incoming);
        for item in incoming.drain(..) {
            match item {
                Incoming::Tcp {
                    stream,
                    client,
                    host_port,
                    guest_port,
                } => {
                    match self.decide_in(Proto::Tcp, client, host_port, 0) {
                        Ok(counters) => self.publish_tcp(stream, client, guest_port, counters),
                        Err(Action::Reject) => crate::ports::reset(stream),
                        // Dropped: closed without a word.
                        Err(_) => drop(stream),
                    }
                }
                Incoming::Udp {
                    socket,
                    client,
                    host_port,
                    guest_port,
                    data,
                } => {
                    self.publish_udp_in(socket, client, host_port, guest_port, &data);
                    if let Some(p) = &self.ports {
                        p.recycle(data);
                    }
                }
            }
        }
        self.incoming = incoming;
    }

    /// What the inbound rules say of a client at `client` of published host port
    /// `host_port` (a connection, or a datagram of `len` bytes): `Ok` with the counters its
    /// traffic adds to (None: no rules), or `Err` with the action that refused it.
    fn decide_in(
        &self,
        proto: Proto,
        client: SocketAddr,
        host_port: u16,
        len: usize,
    ) -> Result<Option<Arc<Counters>>, Action> {
        let Some(rules) = &self.rules else {
            return Ok(None);
        };
        let v = rules.check_in(proto, client, host_port, len);
        match v.action {
            Action::Allow => Ok(Some(v.counters)),
            refused => {
                log::debug!(
                    "rules: {client} -> host port {host_port} ({proto}): {refused} by {}",
                    v.rule.map_or("the default policy".into(), |(n, s)| format!(
                        "rule {n} ({s})"
                    ))
                );
                Err(refused)
            }
        }
    }

    /// A client connected to a published TCP port: the stack connects to the guest from the
    /// client's address, and the flow splices the two once the guest accepts. A guest that
    /// does not listen answers RST, and the client is reset too. `counters` are those of the
    /// rule that let it in.
    fn publish_tcp(
        &mut self,
        stream: std::net::TcpStream,
        client: SocketAddr,
        guest_port: u16,
        counters: Option<Arc<Counters>>,
    ) {
        use crate::tcp_nat::TcpKey;
        let seen = self.seen_addr(client);
        let mut key = TcpKey {
            guest_port,
            dst: SocketAddrV4::new(seen, client.port()),
        };
        // Two clients that look alike to the guest (loopback clients of one port from
        // different addresses): the later one gets another source port.
        let mut tries = 0u16;
        while self.tcp.flows.contains_key(&key) && tries < 1024 {
            let port = 49152 + (client.port().wrapping_add(tries.wrapping_mul(7919)) % 16384);
            key.dst.set_port(port);
            tries += 1;
        }
        if self.tcp.flows.contains_key(&key) || self.tcp.flows.len() >= self.tcp.max_flows {
            crate::ports::reset(stream);
            return;
        }
        let handle = if self.tcp.handshaking < crate::tcp_nat::MAX_HANDSHAKES {
            match self.connect_to_guest(key) {
                Some(h) => Some(h),
                None => {
                    crate::ports::reset(stream);
                    return;
                }
            }
        } else {
            None
        };
        if let Err(e) = self.tcp.adopt(key, stream, handle, &self.epoll, counters) {
            log::warn!("ports: cannot watch a connection from {client}: {e}");
            if let Some(h) = handle {
                self.sockets.remove(h);
            }
            return;
        }
        self.stats.published_connections += 1;
    }

    /// A stack socket connecting to the guest's `key.guest_port` from `key.dst` (the
    /// published client as the guest sees it); None when smoltcp refuses the endpoints.
    fn connect_to_guest(&mut self, key: crate::tcp_nat::TcpKey) -> Option<SocketHandle> {
        use smoltcp::socket::tcp;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        socket.set_ack_delay(None);
        socket.set_timeout(Some(PUBLISH_CONNECT_TIMEOUT));
        let remote = IpEndpoint::new(IpAddress::Ipv4(smol(self.guest.ip())), key.guest_port);
        let local = IpEndpoint::new(IpAddress::Ipv4(smol(*key.dst.ip())), key.dst.port());
        socket.connect(self.iface.context(), remote, local).ok()?;
        Some(self.sockets.add(socket))
    }

    /// Connects queued published clients to the guest, oldest first, while fewer than
    /// [`MAX_HANDSHAKES`] wait for the guest's answer.
    fn dequeue_published(&mut self) {
        use crate::tcp_nat::FlowState;
        while self.tcp.handshaking < crate::tcp_nat::MAX_HANDSHAKES {
            let Some(key) = self.tcp.queued.pop_front() else {
                return;
            };
            if !matches!(
                self.tcp.flows.get(&key).map(|f| &f.state),
                Some(FlowState::Queued)
            ) {
                continue; // it left while it waited
            }
            let Some(handle) = self.connect_to_guest(key) else {
                if let Some(f) = self.tcp.remove(&key, &self.epoll) {
                    crate::ports::reset(f.host);
                }
                continue;
            };
            if let Some(f) = self.tcp.flows.get_mut(&key) {
                f.state = FlowState::Open {
                    handle,
                    host_eof: false,
                    guest_eof: false,
                };
                f.handshaking = true;
                self.tcp.handshaking += 1;
            }
        }
    }

    /// A datagram to published UDP host port `host_port`: to the guest from the client's
    /// address; the mapping sends the guest's replies back through the published socket. A
    /// client with no mapping yet is checked against the inbound rules first.
    fn publish_udp_in(
        &mut self,
        socket: Weak<UdpSocket>,
        client: SocketAddr,
        host_port: u16,
        guest_port: u16,
        data: &[u8],
    ) {
        let seen = self.seen_addr(client);
        let key = FlowKey {
            guest_port,
            dst: SocketAddrV4::new(seen, client.port()),
        };
        let now = StdInstant::now();
        if let Some(m) = self.udp_pub.get_mut(&key).filter(|m| m.client == client) {
            m.socket = socket;
            m.last = now;
            if let Some(c) = &m.counters {
                c.add_bytes(data.len());
            }
        } else {
            let counters = match self.decide_in(Proto::Udp, client, host_port, data.len()) {
                Ok(c) => c,
                // Refused, whether dropped or rejected: an unprivileged socket cannot send
                // the ICMP error, so the datagram is discarded (and counted).
                Err(_) => return,
            };
            if let Some(c) = &counters {
                c.add_bytes(data.len());
            }
            self.udp_pub.insert(
                key,
                UdpMapping {
                    socket,
                    client,
                    last: now,
                    counters,
                },
            );
        }
        self.udp_to_guest(seen, client.port(), guest_port, data);
    }

    /// A guest datagram that answers a published UDP port's client, sent back through the
    /// published socket. Returns whether it took the frame.
    fn publish_udp_out(&mut self, frame: &[u8]) -> bool {
        if self.udp_pub.is_empty() {
            return false;
        }
        let Some((key, payload)) = parse_udp_payload(frame) else {
            return false;
        };
        let Some(m) = self.udp_pub.get_mut(&key) else {
            return false;
        };
        match m.socket.upgrade() {
            Some(s) => {
                m.last = StdInstant::now();
                // UDP may drop: a full socket buffer loses the datagram.
                if let (Ok(n), Some(c)) = (s.send_to(payload, m.client), &m.counters) {
                    c.add_bytes(n);
                }
            }
            None => {
                // The port was unpublished.
                self.udp_pub.remove(&key);
            }
        }
        true
    }

    /// Emits a UDP datagram from `src:src_port` to the guest's `dst_port`.
    fn udp_to_guest(&mut self, src: std::net::Ipv4Addr, src_port: u16, dst_port: u16, data: &[u8]) {
        use smoltcp::wire::{IpProtocol, UdpPacket, UdpRepr};
        let udp = UdpRepr { src_port, dst_port };
        let len = udp.header_len() + data.len();
        if len > 65535 - 20 || self.device.tx.len() >= QUEUE_FRAMES {
            // Larger than IPv4 carries, or the guest is not reading.
            return;
        }
        let guest = smol(self.guest.ip());
        let mtu_payload = usize::from(self.cfg.mtu).saturating_sub(20);
        if len > mtu_payload {
            // More than the link takes in one packet: in fragments, which the guest puts
            // back together (the checksum covers the whole datagram).
            let mut whole = vec![0u8; len];
            udp.emit(
                &mut UdpPacket::new_unchecked(&mut whole[..]),
                &IpAddress::Ipv4(smol(src)),
                &IpAddress::Ipv4(guest),
                data.len(),
                |p| p.copy_from_slice(data),
                &Default::default(),
            );
            self.emit_fragments(smol(src), IpProtocol::Udp, &whole, mtu_payload & !7);
            return;
        }
        self.emit_to_guest(smol(src), IpProtocol::Udp, len, |buf| {
            udp.emit(
                &mut UdpPacket::new_unchecked(buf),
                &IpAddress::Ipv4(smol(src)),
                &IpAddress::Ipv4(guest),
                data.len(),
                |p| p.copy_from_slice(data),
                &Default::default(),
            );
        });
    }

    /// Queues `payload` for the guest from `src` as IPv4 fragments of at most `chunk` bytes of
    /// payload each (a multiple of 8).
    fn emit_fragments(
        &mut self,
        src: Ipv4Address,
        next_header: smoltcp::wire::IpProtocol,
        payload: &[u8],
        chunk: usize,
    ) {
        use smoltcp::wire::{EthernetFrame, EthernetProtocol, EthernetRepr, Ipv4Packet, Ipv4Repr};
        if chunk == 0 {
            return;
        }
        self.ip_id = self.ip_id.wrapping_add(1);
        let eth = EthernetRepr {
            src_addr: EthernetAddress(GATEWAY_MAC),
            dst_addr: EthernetAddress(self.guest.mac()),
            ethertype: EthernetProtocol::Ipv4,
        };
        for (i, part) in payload.chunks(chunk).enumerate() {
            let ip = Ipv4Repr {
                src_addr: src,
                dst_addr: smol(self.guest.ip()),
                next_header,
                payload_len: part.len(),
                hop_limit: 64,
            };
            let mut frame = Frame::take(
                &self.device.pool,
                eth.buffer_len() + ip.buffer_len() + part.len(),
            );
            let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
            eth.emit(&mut f);
            let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
            ip.emit(&mut p, &Default::default());
            p.set_ident(self.ip_id);
            p.set_dont_frag(false);
            p.set_more_frags((i + 1) * chunk < payload.len());
            p.set_frag_offset((i * chunk) as u16);
            p.fill_checksum();
            p.payload_mut()[..part.len()].copy_from_slice(part);
            pcap::record(self.device.capture.get_mut(), &frame);
            self.device.tx.push_back(frame);
        }
    }

    /// Queues an IPv4 packet for the guest from `src`, its `len`-byte payload written by `fill`.
    fn emit_to_guest(
        &mut self,
        src: Ipv4Address,
        next_header: smoltcp::wire::IpProtocol,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) {
        use smoltcp::wire::{EthernetFrame, EthernetProtocol, EthernetRepr, Ipv4Packet, Ipv4Repr};
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: smol(self.guest.ip()),
            next_header,
            payload_len: len,
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(GATEWAY_MAC),
            dst_addr: EthernetAddress(self.guest.mac()),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut frame = Frame::take(&self.device.pool, eth.buffer_len() + ip.buffer_len() + len);
        let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &Default::default());
        fill(&mut p.payload_mut()[..len]);
        pcap::record(self.device.capture.get_mut(), &frame);
        self.device.tx.push_back(frame);
    }

    /// The fd that becomes readable when a host socket has something for the guest; the
    /// device watches it and calls [`handle_host_events`](Self::handle_host_events).
    pub fn host_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// A guest UDP datagram to the outside (or the host alias): sent at once on its flow's host
    /// socket, opened on the flow's first datagram together with the stack socket its replies
    /// leave from. It never waits in a stack socket, so a burst cannot overflow one. Returns
    /// whether it took the frame.
    fn nat_udp_out(&mut self, frame: &[u8]) -> bool {
        let Some((key, payload)) = parse_udp_payload(frame) else {
            return false;
        };
        let gw = self.cfg.gateway();
        if *key.dst.ip() == gw || key.dst.ip().is_broadcast() || key.dst.ip().is_multicast() {
            return false;
        }
        // A flow already open: one lookup, and the datagram goes (its reply socket was made
        // with it).
        if let Some(flow) = self.nat.get_mut(&key) {
            send_on(flow, payload);
            return true;
        }
        let counters = match self.decide(Proto::Udp, key.dst, frame) {
            Ok(c) => c,
            Err(_) => return true,
        };
        if !self.nat_sockets.contains_key(&key.dst) {
            let mut s = udp_reply_socket();
            let ep = IpEndpoint::new(IpAddress::Ipv4(smol(*key.dst.ip())), key.dst.port());
            if s.bind(ep).is_err() {
                return true;
            }
            let h = self.sockets.add(s);
            self.nat_sockets.insert(key.dst, h);
        }
        match self.nat.flow(key, &self.epoll) {
            Ok(flow) => {
                flow.counters = counters;
                send_on(flow, payload);
            }
            Err(e) => log::debug!("nat: cannot open a host socket for {}: {e}", key.dst),
        }
        true
    }

    /// A guest SYN to an outside address: held while ferry connects on the host. Returns
    /// whether it took the frame.
    fn tcp_syn(&mut self, frame: &[u8]) -> bool {
        use crate::tcp_nat::{FlowState, TcpKey};
        use smoltcp::wire::{IpProtocol, TcpPacket};
        let Some((ip, payload)) = parse_ipv4(frame) else {
            return false;
        };
        if ip.next_header != IpProtocol::Tcp {
            return false;
        }
        let Ok(t) = TcpPacket::new_checked(payload) else {
            return false;
        };
        if !t.syn() || t.ack() {
            return false;
        }
        let dst = std::net::Ipv4Addr::from(ip.dst_addr.octets());
        let key = TcpKey {
            guest_port: t.src_port(),
            dst: SocketAddrV4::new(dst, t.dst_port()),
        };
        match self.tcp.flows.get(&key).map(|f| &f.state) {
            // A retransmitted SYN while the host connect runs: the first one is held.
            Some(FlowState::Connecting { .. }) => return true,
            Some(FlowState::Open { .. } | FlowState::Queued) => return false,
            None => {}
        }
        let mut target = None;
        let mut proxy = None;
        let mut counters = None;
        if dst == self.cfg.gateway() {
            // The gateway's TCP services: DNS, relayed to the upstream server, and the HTTP
            // proxy, served in this process. They are not outbound flows: the proxy checks
            // the rules for the servers it connects to.
            match (t.dst_port(), self.upstream_tcp, &self.proxy) {
                (dns::PORT, Some(up), _) => target = Some(up),
                (crate::proxy::PORT, _, Some(p)) => {
                    target = Some(p.addr());
                    proxy = Some(&**p);
                }
                _ => return false,
            }
        } else {
            match self.decide(Proto::Tcp, key.dst, frame) {
                Ok(c) => counters = c,
                // No listener meets the SYN: the stack answers RST.
                Err(Action::Reject) => return false,
                Err(_) => return true,
            }
        }
        // The proxy takes only the connections it was told of, by their source address.
        let tell_proxy = |a: SocketAddr| {
            if let Some(p) = proxy {
                p.announce(a);
            }
        };
        let announce: Option<&dyn Fn(SocketAddr)> = proxy.is_some().then_some(&tell_proxy);
        let started = self
            .tcp
            .start(key, target, announce, frame.to_vec(), &self.epoll)
            .is_ok();
        if let Some(f) = self.tcp.flows.get_mut(&key) {
            f.counters = counters;
        }
        started
    }

    /// A TCP flow's host socket is ready.
    fn tcp_event(&mut self, token: u64, readable: bool) {
        use crate::tcp_nat::{take_error, FlowState, TcpNat};
        use smoltcp::socket::tcp;
        let Some(key) = self.tcp.key_of(token) else {
            return;
        };
        let Some(flow) = self.tcp.flows.get_mut(&key) else {
            return;
        };
        flow.readable |= readable;
        if let FlowState::Connecting { syn } = &mut flow.state {
            let syn = std::mem::take(syn);
            let err = take_error(flow.host.as_raw_fd());
            if err != 0 {
                // Refused or unreachable: the SYN meets no listener and the guest gets RST.
                log::debug!("nat: tcp connect to {} failed: errno {err}", key.dst);
                self.stats.tcp_refused += 1;
                self.tcp.remove(&key, &self.epoll);
                self.device.rx.push_back(syn.into());
                return;
            }
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
                tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            );
            socket.set_ack_delay(None);
            let ep = smoltcp::wire::IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(smol(*key.dst.ip()))),
                port: key.dst.port(),
            };
            if socket.listen(ep).is_err() {
                self.tcp.remove(&key, &self.epoll);
                self.device.rx.push_back(syn.into());
                return;
            }
            let handle = self.sockets.add(socket);
            flow.state = FlowState::Open {
                handle,
                host_eof: false,
                guest_eof: false,
            };
            TcpNat::watch(flow, true, false, &self.epoll);
            self.device.rx.push_back(syn.into());
            return;
        }
        self.pump(key);
    }

    fn pump_all(&mut self) {
        // The key list is a reused buffer: polling allocates nothing.
        let mut keys = std::mem::take(&mut self.pump_keys);
        keys.clear();
        // Queued published clients have no stack socket to move data for: their events pump them.
        keys.extend(
            self.tcp
                .flows
                .iter()
                .filter(|(_, f)| !matches!(f.state, crate::tcp_nat::FlowState::Queued))
                .map(|(k, _)| *k),
        );
        for k in &keys {
            self.pump(*k);
        }
        self.pump_keys = keys;
        self.dequeue_published();
    }

    /// Moves data between a flow's stack socket and its host socket, as far as both sides
    /// take it; closes and cleans up.
    fn pump(&mut self, key: crate::tcp_nat::TcpKey) {
        use crate::tcp_nat::{FlowState, TcpNat};
        use smoltcp::socket::tcp;
        use std::io::{Read, Write};
        let Some(flow) = self.tcp.flows.get_mut(&key) else {
            return;
        };
        if matches!(flow.state, FlowState::Queued) {
            // Waiting for its turn: only a client that leaves is news.
            if flow.readable {
                flow.readable = false;
                match peek_eof(&flow.host) {
                    Some(true) => {
                        self.tcp.remove(&key, &self.epoll);
                    }
                    // Data (it waits for the guest), so EPOLLRDHUP would only repeat itself.
                    Some(false) if flow.want_hup => {
                        flow.want_hup = false;
                        TcpNat::watch(flow, false, false, &self.epoll);
                    }
                    _ => {}
                }
            }
            return;
        }
        if flow.handshaking {
            if let FlowState::Open { handle, .. } = flow.state {
                if self.sockets.get::<tcp::Socket>(handle).state() != tcp::State::SynSent {
                    flow.handshaking = false;
                    self.tcp.handshaking -= 1;
                }
            }
        }
        let Some(flow) = self.tcp.flows.get_mut(&key) else {
            return;
        };
        if flow.want_hup {
            if let FlowState::Open { handle, .. } = flow.state {
                if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::SynSent {
                    // A published connection still waiting for the guest: a client that left
                    // without a word is let go now, rather than after the guest answers (which
                    // a guest behind on its accept queue may take seconds to do, while the
                    // descriptors pile up).
                    if !flow.readable {
                        return;
                    }
                    flow.readable = false;
                    let eof = peek_eof(&flow.host);
                    if eof == Some(true) {
                        // The guest's half-open connection meets no socket when it retransmits
                        // its SYN-ACK, and smoltcp answers that with RST.
                        self.sockets.remove(handle);
                        self.tcp.remove(&key, &self.epoll);
                        return;
                    }
                    // Data (it waits for the guest) or nothing yet. A client that half-closed
                    // after its request is served as usual once the guest answers.
                    if eof == Some(false) {
                        flow.want_hup = false;
                        TcpNat::watch(flow, flow.want_in, flow.want_out, &self.epoll);
                    }
                    return;
                }
            }
            // The guest answered: from now on EPOLLIN tells of the client's end.
            flow.want_hup = false;
            flow.readable = true;
            TcpNat::watch(flow, flow.want_in, flow.want_out, &self.epoll);
        }
        let FlowState::Open {
            handle,
            host_eof,
            guest_eof,
        } = &mut flow.state
        else {
            return;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
        let mut want_out = false;
        let mut broken = false;
        if socket.state() == tcp::State::Closed && !*guest_eof {
            // The guest reset the connection (or never answered a published port's SYN):
            // the host peer is reset too, not closed as if all went well.
            let h = *handle;
            self.sockets.remove(h);
            if let Some(f) = self.tcp.remove(&key, &self.epoll) {
                crate::ports::reset(f.host);
            }
            return;
        }
        if socket.timeout().is_some() && socket.state() != tcp::State::SynSent && !*host_eof {
            // A published connection the guest accepted: no more connect deadline (the one
            // set when the host side closes stays).
            socket.set_timeout(None);
        }
        // Guest to host: write what the host takes; the rest stays in the window.
        let counters = flow.counters.as_deref();
        while socket.can_recv() {
            let host = &mut flow.host;
            let r = socket.recv(|data| match host.write(data) {
                Ok(n) => {
                    if let Some(c) = counters {
                        c.add_bytes(n);
                    }
                    (n, Ok(n))
                }
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    want_out = true;
                    break;
                }
                _ => {
                    broken = true;
                    break;
                }
            }
        }
        if !broken
            && !*guest_eof
            && !socket.may_recv()
            && !socket.can_recv()
            && socket.state() != tcp::State::Listen
            && socket.state() != tcp::State::SynReceived
            && socket.state() != tcp::State::SynSent
        {
            let _ = flow.host.shutdown(std::net::Shutdown::Write);
            *guest_eof = true;
        }
        // Host to guest: read only as much as the stack can send.
        while !broken && !*host_eof && flow.readable && socket.can_send() {
            let host = &mut flow.host;
            let r = socket.send(|buf| match host.read(buf) {
                Ok(0) => (0, Ok((0, false))),
                Ok(n) => {
                    if let Some(c) = counters {
                        c.add_bytes(n);
                    }
                    (n, Ok((n, n < buf.len())))
                }
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok((0, _))) => {
                    *host_eof = true;
                    socket.close();
                }
                // A short read drained the socket: epoll says when there is more.
                Ok(Ok((_, drained))) => flow.readable = !drained,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    flow.readable = false;
                    break;
                }
                _ => broken = true,
            }
        }
        if broken {
            // The host side failed: reset the guest's connection.
            socket.abort();
        }
        if *host_eof
            && socket.send_queue() == 0
            && socket.timeout().is_none()
            && matches!(
                socket.state(),
                tcp::State::FinWait1 | tcp::State::Closing | tcp::State::LastAck
            )
        {
            // Only the FIN is left for the guest to acknowledge, which a guest that is there
            // does at once (a closed window holds back data, never the FIN's answer).
            socket.set_timeout(Some(FIN_TIMEOUT));
        }
        let state = socket.state();
        let done = matches!(state, tcp::State::Closed | tcp::State::TimeWait)
            && (broken || *host_eof || *guest_eof || state == tcp::State::Closed);
        if done {
            let h = *handle;
            self.sockets.remove(h);
            self.tcp.remove(&key, &self.epoll);
            return;
        }
        if *host_eof && *guest_eof {
            // Nothing more to read or write on the host: only the guest's side is closing.
            TcpNat::unwatch(flow, &self.epoll);
            return;
        }
        let want_in = !*host_eof && socket.can_send();
        if want_in != flow.want_in || want_out != flow.want_out {
            TcpNat::watch(flow, want_in, want_out, &self.epoll);
        }
    }

    /// An echo request to an outside address goes out through a ping socket, never to the
    /// stack (which would answer it itself: a fake reply). Returns whether it took the frame.
    fn ping_out(&mut self, frame: &[u8]) -> bool {
        use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, IpProtocol};
        let Some((ip, payload)) = parse_ipv4(frame) else {
            return false;
        };
        if ip.next_header != IpProtocol::Icmp {
            return false;
        }
        let dst = std::net::Ipv4Addr::from(ip.dst_addr.octets());
        if dst == self.cfg.gateway() || dst == self.cfg.host_alias() {
            return false;
        }
        let Ok(icmp) = Icmpv4Packet::new_checked(payload) else {
            return true;
        };
        if icmp.msg_type() != Icmpv4Message::EchoRequest || !icmp.verify_checksum() {
            // Other ICMP to the outside has nowhere to go; drop it here.
            return true;
        }
        // Every echo request is checked: a ping flow is a request and its reply.
        match self.decide(Proto::Icmp, SocketAddrV4::new(dst, 0), frame) {
            Ok(Some(c)) => c.add_bytes(payload.len()),
            Ok(None) => {}
            Err(_) => return true,
        }
        let key = crate::icmp::PingKey {
            ident: icmp.echo_ident(),
            dst,
        };
        self.icmp.send(key, payload, &self.epoll);
        true
    }

    /// A reply on a ping socket: back to the guest from the host that sent it, with the guest's
    /// own identifier.
    fn ping_in(&mut self, token: u64, buf: &mut [u8]) {
        use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, IpProtocol};
        while let Some((key, n)) = self.icmp.recv(token, buf) {
            let msg = &mut buf[..n];
            let Ok(mut icmp) = Icmpv4Packet::new_checked(&mut msg[..]) else {
                continue;
            };
            if icmp.msg_type() != Icmpv4Message::EchoReply {
                continue;
            }
            icmp.set_echo_ident(key.ident);
            icmp.fill_checksum();
            if self.device.tx.len() < QUEUE_FRAMES {
                let msg = &buf[..n];
                self.emit_to_guest(smol(key.dst), IpProtocol::Icmp, n, |p| {
                    p.copy_from_slice(msg)
                });
            }
        }
    }

    /// Reads what host sockets received and hands it to the guest.
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        let mut buf = std::mem::take(&mut self.host_buf);
        buf.resize(65536, 0);
        for ev in &events[..n] {
            let token = ev.data();
            if token == DNS_TOKEN {
                self.dns_in(&mut buf);
                continue;
            }
            if token == PUBLISH_TOKEN {
                self.publish_in();
                continue;
            }
            if token >= crate::tcp_nat::TOKEN_BASE {
                let readable = ev.event_set().intersects(
                    EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP,
                );
                self.tcp_event(token, readable);
                continue;
            }
            if token >= crate::icmp::TOKEN_BASE {
                self.ping_in(token, &mut buf);
                continue;
            }
            if token < FLOW_TOKEN_BASE {
                continue;
            }
            let Some(key) = self.nat.key_of(token) else {
                continue;
            };
            let Some(&h) = self.nat_sockets.get(&key.dst) else {
                continue;
            };
            let guest = IpEndpoint::new(IpAddress::Ipv4(smol(self.guest.ip())), key.guest_port);
            loop {
                let socket = self.sockets.get_mut::<udp::Socket>(h);
                // Backpressure: stop reading while the stack's buffer toward the guest is full.
                if !socket.can_send() {
                    break;
                }
                let Some(flow) = self.nat.get_mut(&key) else {
                    break;
                };
                let n = match flow.socket.recv(&mut buf) {
                    Ok(n) => n,
                    Err(_) => break,
                };
                flow.last = StdInstant::now();
                if let Some(c) = &flow.counters {
                    c.add_bytes(n);
                }
                let mut meta = udp::UdpMetadata::from(guest);
                meta.local_address = Some(IpAddress::Ipv4(smol(*key.dst.ip())));
                let _ = socket.send_slice(&buf[..n], meta);
            }
        }
        self.host_buf = buf;
        self.poll();
    }

    /// A reply from the DNS upstream, back to the guest with its own id.
    /// Nothing listens at the upstream: every query waiting on it fails now, rather than after
    /// the guest's timeout. (The refusal comes back once, to whichever send or receive on the
    /// socket happens next, so it stands for all queries in flight.)
    fn fail_pending_dns(&mut self) {
        let gateway = IpAddress::Ipv4(smol(self.cfg.gateway()));
        let failed: Vec<_> = self.dns_pending.drain().map(|(_, v)| v).collect();
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        for (guest, query) in failed {
            if let Some(dns::Answer::Local(r)) = dns::answer(&self.cfg, &query, false) {
                let mut meta = udp::UdpMetadata::from(guest);
                meta.local_address = Some(gateway);
                let _ = socket.send_slice(&r, meta);
            }
        }
    }

    fn dns_in(&mut self, buf: &mut [u8]) {
        let gateway = IpAddress::Ipv4(smol(self.cfg.gateway()));
        loop {
            let Some(up) = &self.upstream else {
                return;
            };
            let (guest, reply) = match up.recv(buf) {
                Ok(n) if n >= 12 => {
                    let id = u16::from_be_bytes([buf[0], buf[1]]);
                    let Some((guest, query)) = self.dns_pending.remove(&id) else {
                        continue;
                    };
                    // The answer goes back unchanged but for the guest's own id.
                    buf[0..2].copy_from_slice(&query[0..2]);
                    (guest, buf[..n].to_vec())
                }
                Ok(_) => continue,
                // Nothing listens at the upstream: every query waiting on it fails now,
                // rather than after the guest's timeout.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.fail_pending_dns();
                    continue;
                }
                Err(_) => return,
            };
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
            let mut meta = udp::UdpMetadata::from(guest);
            meta.local_address = Some(gateway);
            if socket.send_slice(&reply, meta).is_ok() {
                self.stats.dns_replies += 1;
            }
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Takes one Ethernet frame from the guest.
    pub fn receive_frame(&mut self, frame: &[u8]) {
        self.receive_frame_with(frame.len(), |b| {
            b.copy_from_slice(frame);
            true
        });
    }

    /// Takes one Ethernet frame of `len` bytes from the guest, which `fill` writes straight
    /// into the stack's buffer (no copy in between). `fill` returns false when it could not,
    /// and so does this; a frame dropped because the queue is full counts as taken.
    pub fn receive_frame_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool {
        if self.device.rx.len() >= QUEUE_FRAMES {
            self.stats.dropped_in += 1;
            return true;
        }
        // `fill` writes every byte: the buffer is not zeroed for it.
        let mut b = Frame::take(&self.device.pool, len);
        if !fill(&mut b) {
            recycle(&self.device.pool, b);
            return false;
        }
        self.stats.frames_in += 1;
        pcap::record(self.device.capture.get_mut(), &b);
        self.guest.learn(&b);
        match self.fragments.take(&b, StdInstant::now()) {
            crate::fragments::Verdict::Whole => self.dispatch(b),
            crate::fragments::Verdict::Kept => recycle(&self.device.pool, b),
            crate::fragments::Verdict::Complete(whole) => {
                recycle(&self.device.pool, b);
                self.dispatch(Frame::from(whole));
            }
        }
        true
    }

    /// One whole frame from the guest: to the NAT paths that read frames themselves, or to
    /// smoltcp.
    fn dispatch(&mut self, b: Frame) {
        if self.ping_out(&b) || self.tcp_syn(&b) || self.publish_udp_out(&b) || self.nat_udp_out(&b)
        {
            recycle(&self.device.pool, b);
            return;
        }
        self.device.rx.push_back(b);
    }

    /// Runs the stack: handles the frames taken, answers what needs answering.
    pub fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.serve_dhcp();
        self.serve_dns();
        self.pump_all();
        self.iface
            .poll(self.now(), &mut self.device, &mut self.sockets);
        if self.last_expiry.elapsed() > std::time::Duration::from_secs(5) {
            self.last_expiry = StdInstant::now();
            self.nat.expire(&self.epoll);
            self.icmp.expire_idle(&self.epoll);
            self.udp_pub
                .retain(|_, m| m.last.elapsed() < UDP_PUBLISH_IDLE && m.socket.strong_count() > 0);
        }
    }

    fn serve_dhcp(&mut self) {
        let socket = self.sockets.get_mut::<udp::Socket>(self.dhcp);
        while let Ok((payload, _meta)) = socket.recv() {
            let Some(answer) = dhcp::reply(&self.cfg, payload) else {
                continue;
            };
            let to = IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::BROADCAST), dhcp::CLIENT_PORT);
            let mut meta = udp::UdpMetadata::from(to);
            meta.local_address = Some(IpAddress::Ipv4(smol(self.cfg.gateway())));
            if socket.send_slice(&answer, meta).is_ok() {
                self.stats.dhcp_replies += 1;
            }
        }
    }

    fn serve_dns(&mut self) {
        let mut refused = false;
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        while let Ok((query, meta)) = socket.recv() {
            let reply = match dns::answer(&self.cfg, query, self.upstream.is_some()) {
                Some(dns::Answer::Local(reply)) => reply,
                Some(dns::Answer::Forward) => {
                    // Forward with an id of ours; the answer goes back unchanged but for it.
                    let addr = self.upstream_addr;
                    let sent = self.upstream.as_ref().and_then(|up| {
                        if self.dns_pending.len() >= MAX_DNS_PENDING {
                            self.dns_pending.clear();
                        }
                        let id = self.next_dns_id;
                        self.next_dns_id = self.next_dns_id.wrapping_add(1).max(1);
                        let mut q = query.to_vec();
                        q[0..2].copy_from_slice(&id.to_be_bytes());
                        up.send(&q)
                            .or_else(|_| {
                                // Unconnected: the upstream was unreachable at the start.
                                up.connect(addr.ok_or(io::ErrorKind::NotConnected)?)?;
                                up.send(&q)
                            })
                            .ok()?;
                        self.dns_pending.insert(id, (meta.endpoint, query.to_vec()));
                        Some(())
                    });
                    if sent.is_some() {
                        continue;
                    }
                    refused = true;
                    // The upstream refused at once (nothing listens there): SERVFAIL now.
                    match dns::answer(&self.cfg, query, false) {
                        Some(dns::Answer::Local(reply)) => reply,
                        _ => continue,
                    }
                }
                None => continue,
            };
            let mut out = udp::UdpMetadata::from(meta.endpoint);
            out.local_address = meta.local_address;
            if socket.send_slice(&reply, out).is_ok() {
                self.stats.dns_replies += 1;
            }
        }
        if refused {
            self.fail_pending_dns();
        }
    }

    /// How long until the stack wants to be polled again without new frames (ARP retries,
    /// and later TCP timers); `None` when it has nothing pending.
    pub fn poll_delay(&mut self) -> Option<std::time::Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|d| std::time::Duration::from_micros(d.total_micros()))
    }

    /// The next frame for the guest, if any.
    pub fn pop_frame(&mut self) -> Option<Frame> {
        self.device.tx.pop_front()
    }

    /// Returns a frame's buffer (from [`pop_frame`](Self::pop_frame)) for reuse.
    pub fn recycle_frame(&mut self, frame: Frame) {
        recycle(&self.device.pool, frame);
    }

    /// Puts back a frame the guest had no room for; it goes first next time.
    pub fn unpop_frame(&mut self, frame: Frame) {
        self.device.tx.push_front(frame);
    }

    /// Tells the stack the guest's MAC (tests: skips the first ARP round).
    #[cfg(test)]
    fn neighbor_hint(&mut self) {
        use smoltcp::wire::{
            ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, EthernetRepr,
        };
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(crate::GUEST_MAC),
            source_protocol_addr: smol(self.cfg.guest()),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: smol(self.cfg.gateway()),
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(crate::GUEST_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        self.receive_frame(&buf);
        self.poll();
        while self.pop_frame().is_some() {}
    }

    /// The open flows: TCP and UDP, outbound and from published ports.
    pub fn flows(&self) -> Vec<FlowInfo> {
        use crate::tcp_nat::FlowState;
        use smoltcp::socket::tcp;
        let guest = self.guest.ip();
        let mut out = Vec::new();
        for (k, f) in &self.tcp.flows {
            let (state, inbound) = match &f.state {
                FlowState::Connecting { .. } => ("Connecting".to_string(), false),
                FlowState::Queued => ("Queued".to_string(), true),
                FlowState::Open { handle, .. } => (
                    format!("{:?}", self.sockets.get::<tcp::Socket>(*handle).state()),
                    f.inbound,
                ),
            };
            out.push(FlowInfo {
                protocol: "tcp",
                guest: SocketAddrV4::new(guest, k.guest_port),
                remote: k.dst,
                state,
                inbound,
            });
        }
        for k in self.nat.keys() {
            out.push(FlowInfo {
                protocol: "udp",
                guest: SocketAddrV4::new(guest, k.guest_port),
                remote: k.dst,
                state: "open".into(),
                inbound: false,
            });
        }
        for k in self.udp_pub.keys() {
            out.push(FlowInfo {
                protocol: "udp",
                guest: SocketAddrV4::new(guest, k.guest_port),
                remote: k.dst,
                state: "open".into(),
                inbound: true,
            });
        }
        out
    }

    /// Starts (or with `None` ends) capturing every frame to and from the guest.
    pub fn set_capture(&mut self, capture: Option<Capture>) {
        *self.device.capture.get_mut() = capture;
    }

    /// Ends the capture, with everything recorded written, and returns it (a frontend left:
    /// the next guest's link goes on with it).
    pub fn take_capture(&mut self) -> Option<Capture> {
        pcap::flush(self.device.capture.get_mut());
        self.device.capture.get_mut().take()
    }

    /// Writes the frames captured so far (the device calls it after each event).
    pub fn flush_capture(&mut self) {
        pcap::flush(self.device.capture.get_mut());
    }

    /// The capture's counters, when one is on.
    pub fn capture_stats(&self) -> Option<CaptureStats> {
        self.device.capture.borrow().as_ref().map(Capture::stats)
    }

    /// The link's counters, with the open flows counted now.
    pub fn stats(&self) -> StackStats {
        StackStats {
            tcp_flows: self.tcp.flows.len() as u64,
            udp_flows: self.nat.len() as u64,
            icmp_flows: self.icmp.len() as u64,
            udp_published: self.udp_pub.len() as u64,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, EthernetRepr,
        Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
    };

    const GUEST: EthernetAddress = EthernetAddress(crate::GUEST_MAC);

    fn eth(
        dst: EthernetAddress,
        proto: EthernetProtocol,
        payload_len: usize,
    ) -> (Vec<u8>, EthernetRepr) {
        let repr = EthernetRepr {
            src_addr: GUEST,
            dst_addr: dst,
            ethertype: proto,
        };
        (vec![0u8; repr.buffer_len() + payload_len], repr)
    }

    #[test]
    fn a_pooled_buffer_keeps_its_length_across_small_frames() {
        let pool = RefCell::new(Vec::new());
        let mut big = Frame::take(&pool, 1000);
        big.fill(7);
        recycle(&pool, big);
        let small = Frame::take(&pool, 54);
        assert_eq!(small.len(), 54);
        recycle(&pool, small);
        // The same buffer, taken for a large frame again: nothing was truncated or zeroed.
        let again = Frame::take(&pool, 1000);
        assert_eq!(again.len(), 1000);
        assert!(again.iter().all(|&b| b == 7));
        let grown = Frame::take(&pool, 1200);
        assert_eq!(grown.len(), 1200);
    }

    #[test]
    fn answers_arp_for_the_gateway_and_pings_to_it() {
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: GUEST,
            source_protocol_addr: smol(cfg.guest()),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: smol(cfg.gateway()),
        };
        let (mut buf, e) = eth(
            EthernetAddress::BROADCAST,
            EthernetProtocol::Arp,
            arp.buffer_len(),
        );
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        e.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        s.receive_frame(&buf);
        s.poll();
        let reply = s.pop_frame().expect("an ARP reply");
        let f = EthernetFrame::new_checked(&reply[..]).unwrap();
        let r = ArpRepr::parse(&ArpPacket::new_checked(f.payload()).unwrap()).unwrap();
        match r {
            ArpRepr::EthernetIpv4 {
                operation,
                source_hardware_addr,
                ..
            } => {
                assert_eq!(operation, ArpOperation::Reply);
                assert_eq!(source_hardware_addr, EthernetAddress(GATEWAY_MAC));
            }
            _ => panic!("not an IPv4 ARP reply"),
        }

        // Echo request to the gateway.
        let icmp = Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no: 1,
            data: b"ping",
        };
        let ip = Ipv4Repr {
            src_addr: smol(cfg.guest()),
            dst_addr: smol(cfg.gateway()),
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let (mut buf, e) = eth(
            EthernetAddress(GATEWAY_MAC),
            EthernetProtocol::Ipv4,
            ip.buffer_len() + icmp.buffer_len(),
        );
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        e.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &Default::default());
        icmp.emit(
            &mut Icmpv4Packet::new_unchecked(p.payload_mut()),
            &Default::default(),
        );
        s.receive_frame(&buf);
        s.poll();
        let reply = s.pop_frame().expect("an echo reply");
        let f = EthernetFrame::new_checked(&reply[..]).unwrap();
        let p = Ipv4Packet::new_checked(f.payload()).unwrap();
        assert_eq!(p.src_addr(), smol(cfg.gateway()));
        let r = Icmpv4Repr::parse(
            &Icmpv4Packet::new_checked(p.payload()).unwrap(),
            &Default::default(),
        )
        .unwrap();
        assert!(matches!(
            r,
            Icmpv4Repr::EchoReply {
                ident: 7,
                seq_no: 1,
                ..
            }
        ));
    }

    #[test]
    fn garbage_frames_are_dropped_quietly() {
        let mut s = NetStack::new(NetConfig::default(), None).unwrap();
        for len in [0usize, 1, 13, 14, 60, 1500] {
            s.receive_frame(&vec![0xffu8; len]);
        }
        s.poll();
        assert!(s.pop_frame().is_none());
    }
}

#[cfg(test)]
pub(crate) mod hostile_frames {
    use super::*;
    use crate::dns;
    use smoltcp::wire::{
        EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket,
        UdpRepr,
    };

    /// For other test modules.
    pub(super) fn udp_frame_pub(dst: Ipv4Address, port: u16, payload: &[u8]) -> Vec<u8> {
        udp_frame(dst, port, payload)
    }

    /// A UDP datagram from the guest to `dst:port`, as an Ethernet frame.
    /// An Ethernet frame from the guest to the gateway's MAC carrying an IPv4 packet to `dst`;
    /// `emit` writes the `payload_len`-byte payload given the IP header.
    pub(super) fn guest_ip_frame(
        dst: Ipv4Address,
        proto: IpProtocol,
        payload_len: usize,
        emit: impl FnOnce(&mut [u8], &Ipv4Repr),
    ) -> Vec<u8> {
        let cfg = NetConfig::default();
        let ip = Ipv4Repr {
            src_addr: smol(cfg.guest()),
            dst_addr: dst,
            next_header: proto,
            payload_len,
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(crate::GUEST_MAC),
            dst_addr: EthernetAddress(GATEWAY_MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + payload_len];
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &Default::default());
        emit(p.payload_mut(), &ip);
        buf
    }

    /// A guest SYN from `src_port` to `dst_port`, sequence number 1000, MSS 1460.
    pub(super) fn guest_syn(src_port: u16, dst_port: u16) -> smoltcp::wire::TcpRepr<'static> {
        smoltcp::wire::TcpRepr {
            src_port,
            dst_port,
            control: smoltcp::wire::TcpControl::Syn,
            seq_number: smoltcp::wire::TcpSeqNumber(1000),
            ack_number: None,
            window_len: 64000,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        }
    }

    /// A TCP segment from the guest to `dst`, as an Ethernet frame.
    pub(super) fn guest_tcp_frame(dst: Ipv4Address, tcp: &smoltcp::wire::TcpRepr) -> Vec<u8> {
        guest_ip_frame(dst, IpProtocol::Tcp, tcp.buffer_len(), |b, ip| {
            tcp.emit(
                &mut smoltcp::wire::TcpPacket::new_unchecked(b),
                &ip.src_addr.into(),
                &ip.dst_addr.into(),
                &Default::default(),
            );
        })
    }

    fn udp_frame(dst: Ipv4Address, port: u16, payload: &[u8]) -> Vec<u8> {
        let udp = UdpRepr {
            src_port: 40000,
            dst_port: port,
        };
        guest_ip_frame(
            dst,
            IpProtocol::Udp,
            udp.header_len() + payload.len(),
            |b, ip| {
                udp.emit(
                    &mut UdpPacket::new_unchecked(b),
                    &ip.src_addr.into(),
                    &ip.dst_addr.into(),
                    payload.len(),
                    |d| d.copy_from_slice(payload),
                    &Default::default(),
                );
            },
        )
    }

    #[test]
    fn dns_query_over_the_link_gets_its_answer() {
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        let q = dns::query(9, "host.ferry.internal", dns::QTYPE_A);
        s.receive_frame(&udp_frame(smol(cfg.gateway()), dns::PORT, &q));
        s.poll();
        // The answer waits for the guest's ARP reply; the stack wants a poll to retry.
        assert!(
            s.poll_delay().is_some(),
            "no timer while a reply waits for ARP"
        );
        // The stack first asks who the guest is (ARP), then answers once it knows.
        let mut got_answer = false;
        for _ in 0..4 {
            while let Some(frame) = s.pop_frame() {
                let f = EthernetFrame::new_checked(&frame[..]).unwrap();
                if f.ethertype() == EthernetProtocol::Arp {
                    // Answer the ARP so the DNS reply can go out.
                    let mut reply = frame.to_vec();
                    let mut rf = EthernetFrame::new_unchecked(&mut reply[..]);
                    let req = smoltcp::wire::ArpRepr::parse(
                        &smoltcp::wire::ArpPacket::new_checked(f.payload()).unwrap(),
                    )
                    .unwrap();
                    if let smoltcp::wire::ArpRepr::EthernetIpv4 {
                        source_hardware_addr,
                        source_protocol_addr,
                        target_protocol_addr,
                        ..
                    } = req
                    {
                        let ans = smoltcp::wire::ArpRepr::EthernetIpv4 {
                            operation: smoltcp::wire::ArpOperation::Reply,
                            source_hardware_addr: EthernetAddress(crate::GUEST_MAC),
                            source_protocol_addr: target_protocol_addr,
                            target_hardware_addr: source_hardware_addr,
                            target_protocol_addr: source_protocol_addr,
                        };
                        rf.set_src_addr(EthernetAddress(crate::GUEST_MAC));
                        rf.set_dst_addr(source_hardware_addr);
                        ans.emit(&mut smoltcp::wire::ArpPacket::new_unchecked(
                            rf.payload_mut(),
                        ));
                        s.receive_frame(&reply);
                    }
                } else {
                    let p = Ipv4Packet::new_checked(f.payload()).unwrap();
                    let u = UdpPacket::new_checked(p.payload()).unwrap();
                    assert_eq!(u.src_port(), dns::PORT);
                    assert_eq!(&u.payload()[u.payload().len() - 4..], &[192, 168, 127, 254]);
                    got_answer = true;
                }
            }
            s.poll();
        }
        assert!(got_answer);
    }

    #[test]
    fn random_and_mangled_frames_never_panic() {
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = [
            udp_frame(smol(cfg.gateway()), dns::PORT, &dns::query(1, "a.b", 1)),
            udp_frame(Ipv4Address::BROADCAST, dhcp::SERVER_PORT, &[0u8; 300]),
            udp_frame(smol(cfg.host_alias()), 9, b"x"),
        ];
        for i in 0..20_000 {
            let mut f = if i % 3 == 0 {
                (0..(rnd() % 1600) as usize).map(|_| rnd() as u8).collect()
            } else {
                seeds[i % seeds.len()].clone()
            };
            // Flip a few bytes anywhere (headers included), and sometimes cut the frame short.
            for _ in 0..(rnd() % 4) {
                if !f.is_empty() {
                    let at = (rnd() as usize) % f.len();
                    f[at] = rnd() as u8;
                }
            }
            if rnd() % 8 == 0 {
                let keep = (rnd() as usize) % (f.len() + 1);
                f.truncate(keep);
            }
            s.receive_frame(&f);
            if i % 16 == 0 {
                s.poll();
                while s.pop_frame().is_some() {}
            }
        }
        s.poll();
    }
}

#[cfg(test)]
mod upstream_tests {
    use super::*;
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, UdpPacket};

    #[test]
    fn a_refusing_upstream_gives_servfail_at_once() {
        let cfg = NetConfig::default();
        // Loopback, where nothing listens: the only upstream a test may use without a server.
        let mut s = NetStack::new(cfg.clone(), Some("127.0.0.1:1".parse().unwrap())).unwrap();
        // Teach the stack the guest's MAC first, so replies need no ARP round.
        s.neighbor_hint();
        let q = dns::query(77, "other.example.test", dns::QTYPE_A);
        s.receive_frame(&hostile_frames::udp_frame_pub(
            smol(cfg.gateway()),
            dns::PORT,
            &q,
        ));
        s.poll();
        let mut rcode = None;
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            s.handle_host_events();
            while let Some(frame) = s.pop_frame() {
                let f = EthernetFrame::new_checked(&frame[..]).unwrap();
                if let Ok(p) = Ipv4Packet::new_checked(f.payload()) {
                    if let Ok(u) = UdpPacket::new_checked(p.payload()) {
                        if u.src_port() == dns::PORT {
                            rcode = Some(u.payload()[3] & 0x0f);
                        }
                    }
                }
            }
            if rcode.is_some() {
                break;
            }
        }
        assert_eq!(rcode, Some(2), "no SERVFAIL within 0.5 s");
    }
}

#[cfg(test)]
mod nat_tests {
    use super::*;
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, UdpPacket};

    #[test]
    fn udp_to_the_host_alias_reaches_loopback_and_the_reply_comes_back() {
        let cfg = NetConfig::default();
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = echo.local_addr().unwrap().port();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        // The checksum field holds only the pseudo-header's sum, as from a guest that offloads
        // it (VIRTIO_NET_F_CSUM): the stack takes the datagram all the same.
        let mut frame = hostile_frames::udp_frame_pub(smol(cfg.host_alias()), port, b"ping!");
        frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0x12, 0x34]);
        s.receive_frame(&frame);
        s.poll();
        let mut buf = [0u8; 64];
        echo.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let (n, from) = echo
            .recv_from(&mut buf)
            .expect("the datagram reached loopback");
        assert_eq!(&buf[..n], b"ping!");
        echo.send_to(b"pong!", from).unwrap();
        let mut got = None;
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            s.handle_host_events();
            while let Some(frame) = s.pop_frame() {
                let f = EthernetFrame::new_checked(&frame[..]).unwrap();
                if let Ok(p) = Ipv4Packet::new_checked(f.payload()) {
                    if let Ok(u) = UdpPacket::new_checked(p.payload()) {
                        // Without GUEST_CSUM, frames to the guest carry full checksums.
                        assert!(u.verify_checksum(&p.src_addr().into(), &p.dst_addr().into()));
                        got = Some((p.src_addr(), u.src_port(), u.payload().to_vec()));
                    }
                }
            }
            if got.is_some() {
                break;
            }
        }
        let (src, sport, data) = got.expect("the reply came back to the guest");
        assert_eq!(
            (src, sport, data.as_slice()),
            (smol(cfg.host_alias()), port, &b"pong!"[..])
        );
    }
}

#[cfg(test)]
mod udp_burst {
    use super::*;

    #[test]
    fn a_burst_of_guest_datagrams_taken_in_one_poll_all_reach_the_host() {
        let cfg = NetConfig::default();
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sink.local_addr().unwrap().port();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        // More datagrams than any stack socket holds, all taken before the stack runs, as
        // from one drain of the TX queue.
        for i in 0..100u8 {
            let f = hostile_frames::udp_frame_pub(smol(cfg.host_alias()), port, &[i; 32]);
            s.receive_frame(&f);
        }
        s.poll();
        sink.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 64];
        for i in 0..100u8 {
            let n = sink
                .recv(&mut buf)
                .expect("every datagram reached the host");
            assert_eq!(&buf[..n], &[i; 32], "in order");
        }
    }
}

#[cfg(test)]
mod no_fake_icmp {
    use super::*;
    use smoltcp::wire::{EthernetFrame, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet};

    #[test]
    fn echo_to_an_outside_address_is_never_answered_by_the_stack() {
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        // A loopback destination: the ping socket (if the host allows one) stays on this
        // machine; either way the stack itself must not answer.
        let dst = Ipv4Address::new(127, 0, 0, 2);
        let icmp = Icmpv4Repr::EchoRequest {
            ident: 3,
            seq_no: 1,
            data: b"abcd",
        };
        let buf =
            hostile_frames::guest_ip_frame(dst, IpProtocol::Icmp, icmp.buffer_len(), |b, _| {
                icmp.emit(&mut Icmpv4Packet::new_unchecked(b), &Default::default());
            });
        s.receive_frame(&buf);
        s.poll();
        while let Some(frame) = s.pop_frame() {
            let f = EthernetFrame::new_checked(&frame[..]).unwrap();
            if let Ok(p) = Ipv4Packet::new_checked(f.payload()) {
                assert_ne!(p.src_addr(), dst, "the stack answered for {dst} itself");
            }
        }
    }
}

#[cfg(test)]
mod tcp_cap {
    use super::*;
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpPacket};

    #[test]
    fn past_the_connection_cap_the_guest_gets_rst() {
        let cfg = NetConfig {
            max_connections: 0,
            ..Default::default()
        };
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        let tcp = hostile_frames::guest_syn(40000, 80);
        let dst = smol(cfg.host_alias());
        let buf = hostile_frames::guest_tcp_frame(dst, &tcp);
        s.receive_frame(&buf);
        s.poll();
        let reply = s.pop_frame().expect("an answer to the SYN");
        let f = EthernetFrame::new_checked(&reply[..]).unwrap();
        let p = Ipv4Packet::new_checked(f.payload()).unwrap();
        let t = TcpPacket::new_checked(p.payload()).unwrap();
        assert!(t.rst(), "expected RST past the cap");
        assert_eq!(s.stats().tcp_flows, 0);
    }
}

#[cfg(test)]
mod published {
    use super::*;
    use crate::ports::Ports;
    use crate::PortSpec;
    use smoltcp::wire::{IpProtocol, TcpPacket, TcpRepr, TcpSeqNumber};
    use std::io::Read;

    /// The first TCP segment the stack sends the guest within a second, as (src, segment).
    fn next_segment(stack: &mut NetStack) -> Option<(Ipv4Address, Vec<u8>)> {
        let end = StdInstant::now() + std::time::Duration::from_secs(2);
        while StdInstant::now() < end {
            stack.handle_host_events();
            while let Some(f) = stack.pop_frame() {
                if let Some((ip, payload)) = parse_ipv4(&f) {
                    if ip.next_header == IpProtocol::Tcp && ip.dst_addr == smol(stack.cfg.guest()) {
                        return Some((ip.src_addr, payload.to_vec()));
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn a_flow_closed_on_the_host_side_does_not_wake_the_stack_while_the_guest_closes() {
        let cfg = NetConfig::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        let dst = smol(cfg.host_alias());
        let mut seg = hostile_frames::guest_syn(40001, port);
        s.receive_frame(&hostile_frames::guest_tcp_frame(dst, &seg));
        s.poll();
        let (_, synack) = next_segment(&mut s).expect("SYN-ACK");
        let t = TcpPacket::new_checked(&synack[..]).unwrap();
        assert!(t.syn() && t.ack());
        let (mut peer, _) = listener.accept().unwrap();
        // The guest ACKs and closes at once; the host peer sees EOF and closes too.
        seg.control = smoltcp::wire::TcpControl::Fin;
        seg.seq_number = TcpSeqNumber(1001);
        seg.ack_number = Some(t.seq_number() + 1);
        seg.max_seg_size = None;
        s.receive_frame(&hostile_frames::guest_tcp_frame(dst, &seg));
        s.poll();
        let mut b = [0u8; 8];
        peer.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        assert_eq!(peer.read(&mut b).unwrap(), 0, "the host peer sees EOF");
        drop(peer);
        // The stack answers with its FIN; the guest never ACKs it (a slow guest).
        let end = StdInstant::now() + std::time::Duration::from_secs(2);
        let mut fin = false;
        while !fin && StdInstant::now() < end {
            if let Some((_, f)) = next_segment(&mut s) {
                fin = TcpPacket::new_checked(&f[..]).unwrap().fin();
            }
        }
        assert!(fin, "the host's close reaches the guest as FIN");
        assert_eq!(s.stats().tcp_flows, 1, "the flow waits for the guest's ACK");
        // Both directions of the host socket are closed: it must not wake the stack (its
        // EPOLLHUP, reported whatever is asked for, spun the net thread at 100% CPU).
        let mut events = [EpollEvent::default(); 4];
        assert_eq!(s.epoll.wait(0, &mut events).unwrap(), 0);
    }

    /// A stack with one TCP port published on `bind` (a free host port, which it returns) to
    /// the guest's port 80; the guest's MAC is known, and no guest is attached yet.
    fn stack_with_published_port(cfg: &NetConfig, bind: &str) -> (u16, Arc<Ports>, NetStack) {
        let ports = Ports::new(cfg.guest(), None).unwrap();
        // A free host port, in both families: ask the kernel for one, then publish it.
        let port = std::net::TcpListener::bind("[::]:0")
            .or_else(|_| std::net::TcpListener::bind("0.0.0.0:0"))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec: PortSpec = format!("{bind}:{port}:80").parse().unwrap();
        ports.publish(spec).unwrap();
        let mut stack = NetStack::new(cfg.clone(), None)
            .unwrap()
            .with_ports(ports.clone())
            .unwrap();
        stack.neighbor_hint();
        (port, ports, stack)
    }

    #[test]
    fn inbound_rules_reset_or_close_published_clients_before_the_guest_sees_them() {
        let cfg = NetConfig::default();
        let (port, ports, stack) = stack_with_published_port(&cfg, "127.0.0.1");
        let reject: crate::rules::RuleSpec = format!("reject,dir=in,proto=tcp,port={port}")
            .parse()
            .unwrap();
        let rules = Arc::new(Rules::new(&[reject]));
        let mut stack = stack.with_rules(rules.clone());
        ports.set_attached(true);
        let connect = || {
            let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(3)))
                .unwrap();
            c
        };
        let mut c = connect();
        assert!(
            next_segment(&mut stack).is_none(),
            "no SYN goes to the guest"
        );
        let e = c.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        // drop: closed, no reset.
        let id = rules.list()[0].id;
        rules.remove(id).unwrap();
        let drop: crate::rules::RuleSpec = "drop,dir=in,from=127.0.0.0/8".parse().unwrap();
        rules.add(drop, None).unwrap();
        let mut c = connect();
        assert!(
            next_segment(&mut stack).is_none(),
            "no SYN goes to the guest"
        );
        assert_eq!(
            c.read(&mut [0u8; 1]).unwrap(),
            0,
            "the client reads end of file"
        );
        assert_eq!((rules.list()[0].packets, rules.list()[0].bytes), (1, 0));
        // A client no rule matches comes in, counted on the inbound default.
        rules.remove(rules.list()[0].id).unwrap();
        let _c = connect();
        assert!(next_segment(&mut stack).is_some(), "a SYN to the guest");
        assert_eq!(rules.default_counters(crate::rules::Dir::In).0, 1);
        assert_eq!(rules.default_counters(crate::rules::Dir::Out).0, 0);
    }

    /// A port published on `[::]` has IPv6 clients: an inbound rule with an IPv6 network keeps
    /// them off before the guest sees them, and the port's IPv4 clients (whom no IPv6 network
    /// holds) come in.
    #[test]
    fn an_ipv6_network_in_an_inbound_rule_keeps_ipv6_clients_off() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("skipped: this machine has no IPv6 loopback");
            return;
        }
        let cfg = NetConfig::default();
        let (port, ports, stack) = stack_with_published_port(&cfg, "[::]");
        let reject: crate::rules::RuleSpec = "reject,dir=in,from=::1/128".parse().unwrap();
        let rules = Arc::new(Rules::new(&[reject]));
        let mut stack = stack.with_rules(rules.clone());
        ports.set_attached(true);
        let mut c = std::net::TcpStream::connect(("::1", port)).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .unwrap();
        assert!(
            next_segment(&mut stack).is_none(),
            "no SYN goes to the guest"
        );
        let e = c.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let _c4 = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(next_segment(&mut stack).is_some(), "a SYN to the guest");
        assert_eq!(rules.list()[0].packets, 1);
        assert_eq!(rules.default_counters(crate::rules::Dir::In).0, 1);
    }

    /// Flows by state name.
    fn flow_states(stack: &NetStack) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for f in stack.flows() {
            *m.entry(f.state).or_default() += 1;
        }
        m
    }

    #[test]
    fn published_clients_past_the_handshake_limit_wait_and_those_that_leave_go_at_once() {
        use crate::tcp_nat::MAX_HANDSHAKES;
        let cfg = NetConfig::default();
        let (port, ports, mut stack) = stack_with_published_port(&cfg, "127.0.0.1");
        ports.set_attached(true);
        let n = MAX_HANDSHAKES + 10;
        let clients: Vec<_> = (0..n)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let end = StdInstant::now() + std::time::Duration::from_secs(5);
        while (stack.stats().tcp_flows as usize) < n && StdInstant::now() < end {
            stack.handle_host_events();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // The guest never answers: MAX_HANDSHAKES SYNs are out, the rest wait in ferry.
        let states = flow_states(&stack);
        assert_eq!(states.get("SynSent"), Some(&MAX_HANDSHAKES), "{states:?}");
        assert_eq!(states.get("Queued"), Some(&10), "{states:?}");
        // Every client leaves: those waiting and those whose SYN is out are let go at once,
        // without waiting for the guest, and as they go the queue moves up.
        drop(clients);
        let end = StdInstant::now() + std::time::Duration::from_secs(5);
        while stack.stats().tcp_flows > 0 && StdInstant::now() < end {
            stack.handle_host_events();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(stack.stats().tcp_flows, 0, "{:?}", flow_states(&stack));
        assert_eq!(stack.tcp.handshaking, 0);
        // A new client goes straight to the guest.
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_, seg) = next_segment(&mut stack).expect("a SYN to the guest");
        assert!(TcpPacket::new_checked(&seg[..]).unwrap().syn());
    }

    #[test]
    fn a_loopback_client_reaches_the_guest_as_the_host_alias_and_a_guest_rst_resets_it() {
        let cfg = NetConfig::default();
        let (port, ports, mut stack) = stack_with_published_port(&cfg, "127.0.0.1");

        // No guest attached: the client is reset at once.
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let e = c.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);

        ports.set_attached(true);
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .unwrap();
        let (src, seg) = next_segment(&mut stack).expect("a SYN to the guest");
        assert_eq!(
            src,
            smol(cfg.host_alias()),
            "loopback clients are the host alias"
        );
        let t = TcpPacket::new_checked(&seg[..]).unwrap();
        assert!(t.syn() && !t.ack());
        assert_eq!(t.dst_port(), 80);
        // The guest does not listen: RST+ACK. The client must see a reset.
        let rst = TcpRepr {
            src_port: 80,
            dst_port: t.src_port(),
            control: smoltcp::wire::TcpControl::Rst,
            seq_number: TcpSeqNumber(0),
            ack_number: Some(t.seq_number() + 1),
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let frame = hostile_frames::guest_tcp_frame(src, &rst);
        stack.receive_frame(&frame);
        stack.poll();
        let e = c.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(stack.stats().tcp_flows, 0, "the flow is gone");
        assert_eq!(stack.stats().published_connections, 1);
        let counters = ports.list()[0].counters;
        assert_eq!((counters.forwarded, counters.refused), (1, 1));
    }

    #[test]
    fn a_port_on_all_addresses_takes_ipv4_and_ipv6_clients() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("skipped: this host has no IPv6 loopback");
            return;
        }
        let cfg = NetConfig::default();
        let (port, ports, mut stack) = stack_with_published_port(&cfg, "0.0.0.0");
        let spec: PortSpec = format!("0.0.0.0:{port}:80").parse().unwrap();
        assert_eq!(ports.list()[0].spec, spec, "listed as published");
        ports.set_attached(true);
        for client in ["127.0.0.1", "::1"] {
            let _c = std::net::TcpStream::connect((client, port))
                .unwrap_or_else(|e| panic!("{client} cannot connect: {e}"));
            let (src, seg) = next_segment(&mut stack)
                .unwrap_or_else(|| panic!("no SYN to the guest for the client {client}"));
            assert_eq!(src, smol(cfg.host_alias()), "{client} is the host alias");
            assert!(TcpPacket::new_checked(&seg[..]).unwrap().syn());
        }
        assert_eq!(ports.list()[0].counters.forwarded, 2);
    }

    #[test]
    fn a_port_in_use_gives_dockers_words() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let ports = Ports::new(NetConfig::default().guest(), None).unwrap();
        let spec: PortSpec = format!("127.0.0.1:{port}:80").parse().unwrap();
        let e = ports.publish(spec).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("Ports are not available: exposing port TCP 127.0.0.1:{port} -> 192.168.127.2:80: address already in use")
        );
        drop(holder);
        ports.publish(spec).unwrap();
        assert!(ports
            .publish(spec)
            .unwrap_err()
            .to_string()
            .contains("published already"));
        assert!(ports.unpublish(&crate::ports::PortKey::of(&spec)).is_some());
        assert!(ports.list().is_empty());
    }
}
