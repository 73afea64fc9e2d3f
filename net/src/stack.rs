//! The guest's network: a smoltcp interface that owns the gateway and the host alias (in
//! IPv4 and IPv6), and the NAT that turns the guest's flows into host sockets.
//!
//! Theory of operation. One `NetStack` runs on the device's worker thread and owns everything:
//! no locks on the way of a frame. There are two ways in, and this file holds both dispatchers:
//! - frames from the guest ([`NetStack::receive_frame_with`]): the learned guest
//!   (`crate::guest`) looks at each, fragments are put back together (`crate::fragments`),
//!   the link's own IPv6 services answer router solicitations and DHCPv6 (`link6`), then
//!   ICMP echo, TCP SYNs and UDP to other hosts are taken by the NAT paths (`ping`, `tcp`,
//!   `udp_flows`) and the rest goes to smoltcp (ARP, neighbour discovery, DHCP, DNS on the
//!   gateway, the established TCP flows);
//! - host events ([`NetStack::handle_host_events`]): one epoll for every host socket, each
//!   named by a `flow::Token`: the DNS upstream (`dns_forward`), published ports (`inbound`),
//!   and the flows, whose entry says which protocol takes the event.
//!
//! Every flow, of any protocol, direction or family, lives in one table (`flow`), with both
//! of its sides, its rule counters and its times; each protocol's file owns both directions of
//! its flows, as passt's do. [`NetStack::poll`] runs smoltcp and moves data between each TCP
//! flow's stack socket and its host socket; frames for the guest leave through
//! [`NetStack::pop_frame`]. The rules decide each new flow (`verdict`).

mod audit;
mod checksum;
mod dns_forward;
mod dns_tcp;
mod dns_upstream;
mod flow;
mod fragment_for_guest;
mod guest_paths;
mod inbound;
mod link;
mod link6;
mod path_errors;
mod ping;
pub(crate) mod sys;
mod tcp;
mod tcp_host;
mod udp_flows;
mod verdict;

#[cfg(test)]
mod forward_tests;
#[cfg(test)]
mod ipv6_tests;

pub use checksum::PartialChecksum;
pub use dns_upstream::{search_of, servers_of, DnsSource};
use flow::{FlowId, FlowTable, Token};
pub use flow::{Origin, Traffic};
pub use link::{is_bare_tcp_ack, Frame};
use link::{parse_ip, recycle, smol, v6, FrameQueue, IpInfo, QUEUE_FRAMES};
pub use tcp_host::DEFAULT_MAX_FLOWS;
use tcp_host::{HostStream, TcpFlow, TcpLimits};

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::time::Instant as StdInstant;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::udp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint, Ipv4Address,
};

use crate::pcap::{self, Capture, CaptureStats};
use crate::ports::{Incoming, Ports};
use crate::rules::{Action, Counters, Proto, Rules};
use crate::{dhcp, dns};
use crate::{NetConfig, GATEWAY_MAC};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Weak};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

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

/// One open flow, as the control API lists it: both of its sides, ferry's host socket as
/// `ss` shows it, and what crossed it.
#[derive(Clone, Debug)]
pub struct FlowInfo {
    /// "tcp", "udp", "icmp" or "icmpv6".
    pub protocol: &'static str,
    /// Who opened it, and for what.
    pub origin: Origin,
    /// The guest's end (its echo identifier as the port, for pings).
    pub guest: SocketAddr,
    /// The other end as the guest sees it.
    pub remote: SocketAddr,
    /// Ferry's host socket: its descriptor, its own address and its peer's (a UNIX path for
    /// a UNIX stream; none while unknown, or for a published UDP client's shared socket).
    pub fd: Option<RawFd>,
    pub host_local: Option<String>,
    pub host_peer: Option<String>,
    /// The TCP state ("Established"...), or "open".
    pub state: String,
    /// What went to the guest and what came from it.
    pub to_guest: Traffic,
    pub from_guest: Traffic,
    /// How long it has been open, and since traffic last crossed it.
    pub age: std::time::Duration,
    pub idle: std::time::Duration,
    /// The counters of the rule that let it through (`Rules::rule_of` names the rule).
    pub counters: Option<Arc<Counters>>,
}

/// What a flow of the table keeps for its protocol.
pub(crate) enum Kind {
    /// A TCP connection, either way.
    Tcp(TcpFlow),
    /// The guest's datagrams to one destination: the host socket connected there, and the
    /// stack socket the replies leave from (shared by the flows to that destination).
    Udp {
        socket: UdpSocket,
        reply: SocketHandle,
        /// The TTL its datagrams leave with (`path_errors`): the guest's, less one.
        ttl: u8,
    },
    /// One client of a published UDP port (the flow's `host`), answered through the port's
    /// socket while the port is published.
    UdpPublished { socket: Weak<UdpSocket> },
    /// The guest's echo requests to one host, with one identifier, and the TTL they leave
    /// with.
    Ping { socket: OwnedFd, ttl: u8 },
}

/// The flows.
pub(crate) type Flows = FlowTable<Kind>;

/// The guest's link and the services on it.
pub struct NetStack {
    cfg: NetConfig,
    /// The guest's MAC and address as its frames show them.
    guest: crate::guest::Guest,
    /// Datagrams the guest is sending in fragments.
    fragments: crate::fragments::Reassembly,
    /// Boxed: with IPv4 reassembly its buffer makes it ~64 KiB, and the stack is built by
    /// value through builder calls (a debug build would copy it onto the stack at each).
    iface: Box<Interface>,
    device: FrameQueue,
    sockets: SocketSet<'static>,
    dhcp: SocketHandle,
    dns: SocketHandle,
    epoch: StdInstant,
    stats: StackStats,
    /// Host sockets that wake the stack (NAT flows, the DNS upstream socket).
    epoll: Epoll,
    /// Every flow through the NAT.
    flows: Flows,
    /// The TCP caps and the published connections waiting for the guest.
    tcp_limits: TcpLimits,
    /// The stack's UDP socket for each destination the guest talks to through the NAT, and
    /// how many flows use it.
    udp_replies: HashMap<SocketAddr, (SocketHandle, usize)>,
    /// A ping socket could not be made (logged once).
    ping_warned: bool,
    /// When the last router advertisement went out.
    last_ra: Option<StdInstant>,
    /// The guest has sent an IPv6 frame (so it has IPv6 on).
    spoke_ipv6: bool,
    /// The DNS servers queries are forwarded to.
    upstreams: dns_upstream::Upstreams,
    /// Forwarded queries in flight, by ferry's id.
    dns_pending: HashMap<u16, dns_forward::Pending>,
    /// The gateway's addresses: IPv4, and with IPv6 its global and link-local ones.
    gateways: Vec<IpAddr>,
    next_dns_id: u16,
    last_expiry: StdInstant,
    /// Reused buffers: host reads, and the flow ids a poll walks.
    host_buf: Vec<u8>,
    pump_ids: Vec<FlowId>,
    /// Published ports (shared with the control API and the ports thread), if any.
    ports: Option<Arc<Ports>>,
    /// The HTTP(S) proxy the gateway's port 3128 leads to, if any.
    proxy: Option<Arc<crate::proxy::Proxy>>,
    /// The rules new outbound flows and published ports' clients are checked against, if any.
    rules: Option<Arc<Rules>>,
    /// Where flow events go (`--audit-log`, `GET /events`), if anywhere.
    audit: Option<ferry_audit::Audit>,
    /// Names answered from the host (records set at run time, the hosts file), if any.
    names: Option<Arc<crate::names::Names>>,
    /// Reused buffer for what the ports thread hands over.
    incoming: Vec<Incoming>,
}

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
            live: None,
            link_mtu: usize::from(cfg.mtu),
            fragment_ids: Default::default(),
            paths: Default::default(),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        // smoltcp draws TCP initial sequence numbers and IP identifications from this: a
        // random seed (std's hasher keys come from the OS), not the PID, which is 1 for every
        // ferry in the namespace sandbox.
        config.random_seed = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        let epoch = StdInstant::now();
        let mut iface = Interface::new(config, &mut device, Instant::from_millis(0));
        let prefix = cfg.subnet.prefix();
        let mut gateways = vec![IpAddr::V4(cfg.gateway())];
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(smol(cfg.gateway())), prefix));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(smol(cfg.host_alias())), prefix));
            if cfg.subnet6.is_some() {
                // The router's link-local address (router advertisements come from it), and
                // the gateway and the host alias in the guest's /64.
                for a in [cfg.gateway_ll(), cfg.gateway6(), cfg.host_alias6()] {
                    let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(a), 64));
                }
            }
            // Guest forwards' addresses: the stack answers ARP and neighbour solicitations
            // for them (`guest_forward::check` kept them within the room left).
            for f in &cfg.guest_forwards {
                let a = match f.addr.ip() {
                    IpAddr::V4(a) => IpCidr::new(IpAddress::Ipv4(smol(a)), 32),
                    IpAddr::V6(a) => IpCidr::new(IpAddress::Ipv6(a), 128),
                };
                if !addrs.contains(&a) && addrs.push(a).is_err() {
                    log::warn!("net: no room to answer for {}; it is not reachable", f.addr);
                }
            }
        });
        if cfg.subnet6.is_some() {
            gateways.push(IpAddr::V6(cfg.gateway6()));
            gateways.push(IpAddr::V6(cfg.gateway_ll()));
        }
        // Accept packets for any destination: the NAT answers for the whole world.
        iface.set_any_ip(true);
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(smol(cfg.gateway()));
        let mut sockets = SocketSet::new(Vec::new());
        let socket = udp_socket(dhcp::SERVER_PORT);
        let dhcp = sockets.add(socket);
        // Port 53 of every address: `serve_dns` answers only the gateway's (queries the guest
        // sends elsewhere went through the NAT).
        let dns = sockets.add(udp_socket(dns::PORT));
        let epoll = Epoll::new()?;
        let upstreams = dns_upstream::Upstreams::new(
            DnsSource::Servers(upstream.into_iter().collect()),
            &epoll,
        );
        let max_connections = cfg.max_connections;
        Ok(NetStack {
            upstreams,
            gateways,
            last_ra: None,
            spoke_ipv6: false,
            guest: crate::guest::Guest::new(&cfg),
            fragments: Default::default(),
            cfg,
            iface: Box::new(iface),
            device,
            sockets,
            dhcp,
            dns,
            epoch,
            stats: StackStats::default(),
            epoll,
            flows: Flows::default(),
            tcp_limits: TcpLimits::new(max_connections),
            udp_replies: HashMap::new(),
            ping_warned: false,
            dns_pending: HashMap::new(),
            next_dns_id: 1,
            last_expiry: StdInstant::now(),
            host_buf: Vec::new(),
            pump_ids: Vec::new(),
            ports: None,
            proxy: None,
            rules: None,
            audit: None,
            names: None,
            incoming: Vec::new(),
        })
    }

    /// Answers the names of `names` (records, the host's hosts file) before asking upstream.
    pub fn with_names(mut self, names: Arc<crate::names::Names>) -> Self {
        self.names = Some(names);
        self
    }

    /// Forwards DNS to the servers of `source` (a resolv.conf is followed as it changes).
    pub fn with_dns(mut self, source: DnsSource) -> Self {
        self.upstreams = dns_upstream::Upstreams::new(source, &self.epoll);
        self.cfg.search = self.upstreams.search().to_vec();
        self
    }

    /// Whether the guest takes TCP/UDP frames with partial checksums (negotiated GUEST_CSUM).
    pub fn set_checksum_offload(&mut self, on: bool) {
        self.device.csum_offload = on;
    }

    /// The largest frame the guest's RX buffers take, when it is less than the MTU allows
    /// (a guest without mergeable RX buffers posts buffers of a size of its choosing, 1,518
    /// bytes for Linux unless it was told a larger MTU); `None` lifts the limit. DHCP and
    /// router advertisements then offer the MTU those frames carry, so the guest's TCP MSS
    /// follows, and datagrams to the guest are fragmented to fit.
    pub fn limit_frames(&mut self, max_frame: Option<usize>) {
        let cap = max_frame.map_or(usize::MAX, |f| f.saturating_sub(14).max(576));
        let mtu = self.device.mtu.min(cap);
        if usize::from(self.cfg.mtu) != mtu {
            log::info!("net: the guest's link carries IP packets of up to {mtu} bytes");
        }
        self.cfg.mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
        self.device.link_mtu = usize::from(self.cfg.mtu);
    }

    /// The MTU the guest is offered: the configured one, or less if its buffers take less.
    pub fn link_mtu(&self) -> u16 {
        self.cfg.mtu
    }

    /// Takes connections and datagrams from published ports.
    pub fn with_ports(mut self, ports: Arc<Ports>) -> io::Result<Self> {
        self.epoll.ctl(
            ControlOperation::Add,
            ports.notify_fd(),
            EpollEvent::new(EventSet::IN, Token::Published.to_u64()),
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

    /// Queues an IP packet for the guest from `src` to `dst` (the same family), its
    /// `len`-byte payload written by `fill`; the link sends it in fragments when it is more
    /// than the link's MTU carries (a large datagram or ping reply, or a guest whose buffers
    /// take less).
    fn emit_ip(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        next_header: smoltcp::wire::IpProtocol,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) {
        use smoltcp::wire::{
            EthernetFrame, EthernetProtocol, EthernetRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet,
            Ipv6Repr,
        };
        let (ethertype, header) = match src {
            IpAddr::V4(_) => (EthernetProtocol::Ipv4, 20),
            IpAddr::V6(_) => (EthernetProtocol::Ipv6, 40),
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(GATEWAY_MAC),
            dst_addr: EthernetAddress(self.guest.mac()),
            ethertype,
        };
        let mut frame = Frame::take(&self.device.pool, eth.buffer_len() + header + len);
        let mut f = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.emit(&mut f);
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ip = Ipv4Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header,
                    payload_len: len,
                    hop_limit: 64,
                };
                let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
                ip.emit(&mut p, &Default::default());
                fill(&mut p.payload_mut()[..len]);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let ip = Ipv6Repr {
                    src_addr: src,
                    dst_addr: dst,
                    next_header,
                    payload_len: len,
                    hop_limit: 64,
                };
                let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
                ip.emit(&mut p);
                fill(&mut p.payload_mut()[..len]);
            }
            _ => return,
        }
        self.device.outbox().push(frame);
    }

    /// The gateway's address in the family of `a` (IPv6: its address in the prefix, which
    /// the guest's own global addresses reach).
    fn gateway_for(&self, a: IpAddr) -> IpAddr {
        match a {
            IpAddr::V4(_) => IpAddr::V4(self.cfg.gateway()),
            IpAddr::V6(_) => IpAddr::V6(self.cfg.gateway6()),
        }
    }

    /// Whether the guest's packets to `a` may leave its link through the NAT: no broadcast
    /// (the subnet's own included: nobody else is on the link, and the host's network is
    /// not the guest's to broadcast on), no multicast, no unspecified address.
    fn leaves_link(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => {
                !a.is_broadcast()
                    && !a.is_multicast()
                    && !a.is_unspecified()
                    && a != self.cfg.subnet.broadcast()
            }
            IpAddr::V6(a) => !a.is_multicast() && !a.is_unspecified(),
        }
    }

    /// Whether `a` is one of the gateway's addresses.
    fn is_gateway(&self, a: IpAddr) -> bool {
        self.gateways.contains(&a)
    }

    /// Whether `a` is a guest forward's address.
    fn is_forward_addr(&self, a: IpAddr) -> bool {
        self.cfg.guest_forwards.iter().any(|f| f.addr.ip() == a)
    }

    /// Whether `a` is the host alias (either family).
    fn is_host_alias(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => a == self.cfg.host_alias(),
            IpAddr::V6(a) => self.cfg.subnet6.is_some() && a == self.cfg.host_alias6(),
        }
    }

    /// Where a host socket goes for the guest's destination `to`: the host's loopback for the
    /// host alias, else `to` itself.
    fn host_target(&self, to: SocketAddr) -> SocketAddr {
        match to.ip() {
            IpAddr::V4(_) if self.is_host_alias(to.ip()) => {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), to.port())
            }
            IpAddr::V6(_) if self.is_host_alias(to.ip()) => {
                SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), to.port())
            }
            _ => to,
        }
    }

    /// The guest's address of `peer`'s family (IPv6: link-local for a link-local peer), as
    /// last seen, if it has one: where a flow ferry starts toward the guest goes (a published
    /// port's client). A flow the guest opened answers to its own (`FlowKey::guest`).
    fn guest_addr_for(&self, peer: IpAddr) -> Option<IpAddr> {
        match peer {
            IpAddr::V4(_) => Some(IpAddr::V4(self.guest.ip())),
            IpAddr::V6(p) if (p.segments()[0] & 0xffc0) == 0xfe80 => {
                self.guest.link_local().map(IpAddr::V6)
            }
            IpAddr::V6(_) => self.guest.ip6().map(IpAddr::V6),
        }
    }

    /// The fd that becomes readable when a host socket has something for the guest; the
    /// device watches it and calls [`handle_host_events`](Self::handle_host_events).
    pub fn host_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Reads what host sockets received and hands it to the guest.
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        let mut buf = std::mem::take(&mut self.host_buf);
        buf.resize(65536, 0);
        for ev in &events[..n] {
            match Token::from_u64(ev.data()) {
                Some(Token::DnsUpstream) => self.dns_in(&mut buf),
                Some(Token::Published) => self.publish_in(),
                Some(Token::Flow(id)) => match self.flows.get(id).map(|f| &f.kind) {
                    Some(Kind::Tcp(_)) => {
                        let readable = ev.event_set().intersects(
                            EventSet::IN
                                | EventSet::HANG_UP
                                | EventSet::ERROR
                                | EventSet::READ_HANG_UP,
                        );
                        self.tcp_event(id, readable);
                    }
                    Some(Kind::Udp { .. }) => {
                        let errors = ev.event_set().contains(EventSet::ERROR);
                        self.udp_in(id, &mut buf, errors)
                    }
                    Some(Kind::Ping { .. }) => {
                        if ev.event_set().contains(EventSet::ERROR) {
                            self.relay_path_errors(id);
                        }
                        self.ping_in(id, &mut buf)
                    }
                    // Published UDP clients have no socket of their own; a closed flow's
                    // last event finds nothing.
                    Some(Kind::UdpPublished { .. }) | None => {}
                },
                None => {}
            }
        }
        self.host_buf = buf;
        self.poll();
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
    /// and so does this, as for a frame it drops as malformed (an IPv6 extension header chain
    /// that breaks RFC 8200); a frame dropped because the queue is full counts as taken.
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
        self.device.record(&b);
        self.guest.learn(&b);
        self.spoke_ipv6 |= b.get(12..14) == Some(&[0x86, 0xdd]);
        match crate::ext_headers::strip(&mut b) {
            crate::ext_headers::Outcome::Untouched => {}
            crate::ext_headers::Outcome::Stripped(n) => b.len = n,
            crate::ext_headers::Outcome::Drop => {
                recycle(&self.device.pool, b);
                return false;
            }
        }
        match self.fragments.take(&b, StdInstant::now) {
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
        if self.cfg.subnet6.is_none() && b.get(12..14) == Some(&[0x86, 0xdd]) {
            // IPv6 is off: no router, no neighbour, no flow answers it.
            recycle(&self.device.pool, b);
            return;
        }
        let taken = match parse_ip(&b) {
            Some((ip, payload)) => {
                use smoltcp::wire::IpProtocol;
                match ip.proto {
                    IpProtocol::Tcp => self.tcp_in(&b, &ip, payload),
                    IpProtocol::Udp => {
                        self.link6_udp(&ip, payload) || self.udp_out(&b, &ip, payload)
                    }
                    IpProtocol::Icmp => self.ping_out(&b, &ip, payload),
                    IpProtocol::Icmpv6 => {
                        self.link6_icmp(&ip, payload) || self.ping_out(&b, &ip, payload)
                    }
                    _ => false,
                }
            }
            None => false,
        };
        if taken {
            recycle(&self.device.pool, b);
        } else {
            self.device.rx.push_back(b);
        }
    }

    /// Runs the stack: handles the frames taken, answers what needs answering.
    pub fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.serve_dhcp();
        self.serve_dns();
        self.dns_timers();
        self.advertise_router();
        self.pump_all();
        self.iface
            .poll(self.now(), &mut self.device, &mut self.sockets);
        if self.last_expiry.elapsed() > std::time::Duration::from_secs(5) {
            self.last_expiry = StdInstant::now();
            self.udp_expire();
            self.ping_expire();
        }
    }

    fn serve_dhcp(&mut self) {
        let socket = self.sockets.get_mut::<udp::Socket>(self.dhcp);
        let mut unicast = Vec::new();
        while let Ok((payload, _meta)) = socket.recv() {
            let Some(answer) = dhcp::reply(&self.cfg, payload) else {
                continue;
            };
            if let Some(to) = answer.unicast {
                unicast.push((to, answer.payload));
                continue;
            }
            let to = IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::BROADCAST), dhcp::CLIENT_PORT);
            let mut meta = udp::UdpMetadata::from(to);
            meta.local_address = Some(IpAddress::Ipv4(smol(self.cfg.gateway())));
            if socket.send_slice(&answer.payload, meta).is_ok() {
                self.stats.dhcp_replies += 1;
            }
        }
        // An answer to the client's address goes to the guest's MAC straight, not through
        // smoltcp's socket: one for an address nobody answers ARP for would wait at the head
        // of the socket's queue, and every answer after it behind it.
        let server = SocketAddr::new(IpAddr::V4(self.cfg.gateway()), dhcp::SERVER_PORT);
        for (to, payload) in unicast {
            self.udp_to_guest(server, IpAddr::V4(to), dhcp::CLIENT_PORT, &payload);
            self.stats.dhcp_replies += 1;
        }
    }

    /// How long until the stack wants to be polled again without new frames (ARP retries,
    /// and later TCP timers); `None` when it has nothing pending.
    pub fn poll_delay(&mut self) -> Option<std::time::Duration> {
        let now = self.now();
        let stack = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| std::time::Duration::from_micros(d.total_micros()));
        // A forwarded DNS query waits for its server's timeout (then the next server's turn).
        match (stack, self.dns_delay()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next frame for the guest, if any.
    pub fn pop_frame(&mut self) -> Option<Frame> {
        let f = self.device.tx.pop_front()?;
        self.tcp_count_to_guest(&f, 1);
        Some(f)
    }

    /// Returns a frame's buffer (from [`pop_frame`](Self::pop_frame)) for reuse.
    pub fn recycle_frame(&mut self, frame: Frame) {
        recycle(&self.device.pool, frame);
    }

    /// Puts back a frame the guest had no room for; it goes first next time.
    pub fn unpop_frame(&mut self, frame: Frame) {
        self.tcp_count_to_guest(&frame, -1);
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

    /// The open flows, of every protocol and origin, with ferry's host socket of each.
    pub fn flows(&self) -> Vec<FlowInfo> {
        self.flows
            .iter()
            .map(|(_, f)| self.flow_info(f, true, true))
            .collect()
    }

    /// The open flows without their host sockets' addresses, which cost two system calls
    /// each: for counts and `/stats`, read often and under the stack's lock.
    pub fn flows_brief(&self) -> Vec<FlowInfo> {
        self.flows
            .iter()
            .map(|(_, f)| self.flow_info(f, true, false))
            .collect()
    }

    /// Flow `f` as the API and the audit log show it. `in_table`: it is still in the table,
    /// so its stack socket is too (a flow being closed may have lost it already, and its
    /// handle may name another socket by now).
    /// `sockets`: give the host socket's addresses, which the kernel is asked for once per
    /// socket (two system calls, which a `GET /flows` of thousands of flows would otherwise
    /// make under the stack's lock at every call).
    fn flow_info(&self, f: &flow::Flow<Kind>, in_table: bool, sockets: bool) -> FlowInfo {
        use smoltcp::socket::tcp;
        use tcp_host::TcpState;
        let cached = sockets.then(|| f.host_addrs.get()).flatten();
        let ask = sockets && cached.is_none();
        let inet = |fd: RawFd, peer: bool| {
            ask.then(|| sys::socket_addr(fd, peer).map(|a| a.to_string()))
                .flatten()
        };
        let unix = |a: &dyn Fn() -> std::io::Result<std::os::unix::net::SocketAddr>| {
            ask.then(|| a().ok())
                .flatten()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
        };
        let (protocol, state, fd, host_local, host_peer) = match &f.kind {
            Kind::Tcp(t) => {
                let state = match &t.state {
                    TcpState::Connecting { .. } => "Connecting".to_string(),
                    TcpState::Queued => "Queued".to_string(),
                    TcpState::Open { handle, .. } if in_table => {
                        format!("{:?}", self.sockets.get::<tcp::Socket>(*handle).state())
                    }
                    TcpState::Open { .. } => "Closed".to_string(),
                };
                let fd = t.host.as_raw_fd();
                let (local, peer) = match &t.host {
                    // A peer that has gone has no address to ask for: where the socket went.
                    HostStream::Tcp(_) => (
                        inet(fd, false),
                        inet(fd, true).or_else(|| ask.then(|| f.host.to_string())),
                    ),
                    HostStream::Unix(u) => (unix(&|| u.local_addr()), unix(&|| u.peer_addr())),
                };
                ("tcp", state, Some(fd), local, peer)
            }
            Kind::Udp { socket, .. } => {
                let fd = socket.as_raw_fd();
                let (l, p) = (inet(fd, false), inet(fd, true));
                ("udp", "open".to_string(), Some(fd), l, p)
            }
            Kind::UdpPublished { socket } => {
                let fd = socket.upgrade().map(|s| s.as_raw_fd());
                let local = fd.and_then(|fd| inet(fd, false));
                (
                    "udp",
                    "open".to_string(),
                    fd,
                    local,
                    Some(f.host.to_string()),
                )
            }
            Kind::Ping { socket, .. } => {
                let fd = socket.as_raw_fd();
                let icmp = if f.key.remote.is_ipv4() {
                    "icmp"
                } else {
                    "icmpv6"
                };
                let peer = Some(f.host.ip().to_string());
                (icmp, "open".to_string(), Some(fd), inet(fd, false), peer)
            }
        };
        let (host_local, host_peer) = match cached {
            Some(addrs) => addrs.clone(),
            None => {
                // Not for a socket that is gone (a published UDP port removed): another may
                // take its place.
                if ask && fd.is_some() {
                    let _ = f.host_addrs.set((host_local.clone(), host_peer.clone()));
                }
                (host_local, host_peer)
            }
        };
        FlowInfo {
            protocol,
            origin: f.origin,
            guest: SocketAddr::new(f.key.guest, f.key.guest_port),
            remote: f.key.remote,
            fd,
            host_local,
            host_peer,
            state,
            to_guest: f.to_guest,
            from_guest: f.from_guest,
            age: f.since.elapsed(),
            idle: f.last.elapsed(),
            counters: f.counters.clone(),
        }
    }

    /// Records every frame into the captures `live` runs (`GET /pcap`).
    pub fn with_live_captures(mut self, live: Arc<crate::pcap_live::LiveCaptures>) -> Self {
        self.device.live = Some(live);
        self
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
            tcp_flows: self.flows.count(flow::Proto::Tcp) as u64,
            udp_flows: self
                .flows
                .iter()
                .filter(|(_, f)| matches!(f.kind, Kind::Udp { .. }))
                .count() as u64,
            icmp_flows: self.flows.count(flow::Proto::Ping) as u64,
            udp_published: self
                .flows
                .iter()
                .filter(|(_, f)| matches!(f.kind, Kind::UdpPublished { .. }))
                .count() as u64,
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
    fn a_renewing_dhcp_client_is_answered_at_its_address() {
        use smoltcp::wire::DhcpMessageType;
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        // RENEWING: a unicast REQUEST from the client's address naming it in ciaddr; the
        // client reads the answer from a socket bound to that address (systemd-networkd).
        let mut req = crate::dhcp::tests::request(DhcpMessageType::Request, None);
        req[12..16].copy_from_slice(&cfg.guest().octets());
        s.receive_frame(&udp_frame(smol(cfg.gateway()), dhcp::SERVER_PORT, &req));
        s.poll();
        let f = s.pop_frame().expect("an answer");
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress(crate::GUEST_MAC));
        let p = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(p.dst_addr(), smol(cfg.guest()), "to the client's address");
        assert_eq!(p.src_addr(), smol(cfg.gateway()));
        let u = UdpPacket::new_checked(p.payload()).unwrap();
        assert_eq!((u.src_port(), u.dst_port()), (67, 68));
        assert_eq!(
            u.payload()[240..243],
            [53, 1, u8::from(DhcpMessageType::Ack)]
        );
    }

    /// An answer to an address nobody answers ARP for (a client that names one it no longer
    /// holds) holds up no other answer.
    #[test]
    fn a_dhcp_answer_to_an_unknown_address_holds_up_no_other() {
        use smoltcp::wire::DhcpMessageType;
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        let mut inform = crate::dhcp::tests::request(DhcpMessageType::Inform, None);
        inform[12..16].copy_from_slice(&[192, 168, 127, 77]);
        s.receive_frame(&udp_frame(smol(cfg.gateway()), dhcp::SERVER_PORT, &inform));
        let discover = crate::dhcp::tests::request(DhcpMessageType::Discover, None);
        s.receive_frame(&udp_frame(
            Ipv4Address::BROADCAST,
            dhcp::SERVER_PORT,
            &discover,
        ));
        s.poll();
        let mut to = Vec::new();
        while let Some(f) = s.pop_frame() {
            let eth = EthernetFrame::new_checked(&f[..]).unwrap();
            if let Ok(p) = Ipv4Packet::new_checked(eth.payload()) {
                let u = UdpPacket::new_checked(p.payload()).unwrap();
                to.push((p.dst_addr(), u.payload()[242]));
            }
        }
        let (ack, offer) = (DhcpMessageType::Ack.into(), DhcpMessageType::Offer.into());
        assert!(
            to.contains(&(Ipv4Address::new(192, 168, 127, 77), ack)),
            "{to:?}"
        );
        assert!(to.contains(&(Ipv4Address::BROADCAST, offer)), "{to:?}");
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
        let rcode = dns_answer_within(&mut s, 0.5).map(|a| a[3] & 0x0f);
        assert_eq!(rcode, Some(2), "no SERVFAIL within 0.5 s");
    }

    /// Runs the stack for up to `secs`, returning the first DNS answer to the guest.
    fn dns_answer_within(s: &mut NetStack, secs: f64) -> Option<Vec<u8>> {
        let end = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
        while std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(10));
            s.handle_host_events();
            while let Some(frame) = s.pop_frame() {
                let f = EthernetFrame::new_checked(&frame[..]).unwrap();
                if let Ok(p) = Ipv4Packet::new_checked(f.payload()) {
                    if let Ok(u) = UdpPacket::new_checked(p.payload()) {
                        if u.src_port() == dns::PORT {
                            return Some(u.payload().to_vec());
                        }
                    }
                }
            }
        }
        None
    }

    /// A server on loopback that answers every query with its id, QR set and one byte of
    /// `tag` in the answer count's place, so the test can tell who answered.
    fn answering_server(tag: u8) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let h = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let mut r = buf[..n].to_vec();
                r[2] |= 0x80;
                r[7] = tag;
                let _ = sock.send_to(&r, from);
            }
        });
        (addr, h)
    }

    #[test]
    fn a_refusing_first_server_passes_the_query_to_the_next_at_once() {
        let cfg = NetConfig::default();
        let (good, _h) = answering_server(7);
        let mut s = NetStack::new(cfg.clone(), None)
            .unwrap()
            .with_dns(DnsSource::Servers(vec![
                "127.0.0.1:1".parse().unwrap(),
                good,
            ]));
        s.neighbor_hint();
        let q = dns::query(0x4242, "other.example.test", dns::QTYPE_A);
        s.receive_frame(&hostile_frames::udp_frame_pub(
            smol(cfg.gateway()),
            dns::PORT,
            &q,
        ));
        s.poll();
        let a = dns_answer_within(&mut s, 1.0).expect("an answer within 1 s");
        assert_eq!(
            (&a[0..2], a[7]),
            (&[0x42, 0x42][..], 7),
            "the guest's id, from the second server"
        );
        assert_eq!(
            s.dns_servers()[0],
            good,
            "the server that answered goes first now"
        );
    }

    #[test]
    fn a_zones_names_go_to_its_server_only() {
        let cfg = NetConfig::default();
        let (default, _h1) = answering_server(1);
        let (zone, _h2) = answering_server(2);
        let mut s = NetStack::new(cfg.clone(), None)
            .unwrap()
            .with_dns(DnsSource::Servers(vec![default]))
            .with_dns_zones(&[("corp.test".into(), zone)]);
        s.neighbor_hint();
        for (name, from) in [("who.corp.test", 2), ("corp.test", 2), ("notcorp.test", 1)] {
            let q = dns::query(0x0707, name, dns::QTYPE_A);
            s.receive_frame(&hostile_frames::udp_frame_pub(
                smol(cfg.gateway()),
                dns::PORT,
                &q,
            ));
            s.poll();
            let a = dns_answer_within(&mut s, 1.0).expect("an answer");
            assert_eq!(a[7], from, "{name}");
        }
    }

    /// A stack forwarding to a server on loopback, whose guest asked `name` with `id`: the
    /// stack, the server, the query as it arrived there, and where from.
    fn asked_upstream(
        id: u16,
        name: &str,
        limit: Option<usize>,
    ) -> (NetStack, std::net::UdpSocket, Vec<u8>, std::net::SocketAddr) {
        let cfg = NetConfig::default();
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut s = NetStack::new(cfg.clone(), None)
            .unwrap()
            .with_dns(DnsSource::Servers(vec![server.local_addr().unwrap()]));
        s.limit_frames(limit);
        s.neighbor_hint();
        let q = dns::query(id, name, dns::QTYPE_A);
        s.receive_frame(&hostile_frames::udp_frame_pub(
            smol(cfg.gateway()),
            dns::PORT,
            &q,
        ));
        s.poll();
        let mut buf = [0u8; 512];
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let (n, from) = server.recv_from(&mut buf).expect("the query upstream");
        (s, server, buf[..n].to_vec(), from)
    }

    #[test]
    fn malformed_or_mismatched_upstream_answers_are_dropped() {
        let (mut s, server, query, from) = asked_upstream(0x5151, "other.example.test", None);
        let (buf, n) = (&query[..], query.len());
        let ours = [buf[0], buf[1]];
        let mut wrong_id = buf[..n].to_vec();
        wrong_id[0] ^= 0xff;
        let mut huge = buf[..n].to_vec();
        huge.resize(65000, 0xee);
        huge[0..2].copy_from_slice(&[ours[0] ^ 0x55, ours[1]]);
        // Short, empty, another id, a huge one with another id: none reaches the guest.
        for bad in [&b""[..], &b"\x51"[..], &buf[..11], &wrong_id, &huge] {
            server.send_to(bad, from).unwrap();
        }
        assert!(
            dns_answer_within(&mut s, 0.3).is_none(),
            "a bad answer reached the guest"
        );
        // The real one, truncated to its header plus garbage, still with our id: passed on
        // unchanged (the guest's resolver judges it) with the guest's id.
        let mut real = buf[..12].to_vec();
        real[2] |= 0x80;
        real.extend_from_slice(&[0xde, 0xad]);
        server.send_to(&real, from).unwrap();
        let a = dns_answer_within(&mut s, 1.0).expect("the answer with our id");
        assert_eq!(&a[0..2], &[0x51, 0x51]);
        assert_eq!(&a[12..], &[0xde, 0xad]);
    }

    #[test]
    fn a_large_answer_reaches_a_guest_with_small_buffers_in_fragments() {
        // A guest without mergeable RX buffers takes frames of 1,518 bytes; an answer of
        // 3,000 (a DNSSEC or TXT reply to a query with EDNS) must reach it in fragments that
        // fit, not as one frame its device would drop.
        let (mut s, server, query, from) = asked_upstream(0x3131, "big.example.test", Some(1518));
        let n = query.len();
        let mut answer = query;
        answer[2] |= 0x80;
        answer.extend((0..3000 - n).map(|i| i as u8));
        server.send_to(&answer, from).unwrap();
        let mut whole = crate::fragments::Reassembly::default();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut got = None;
        while got.is_none() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(10));
            s.handle_host_events();
            while let Some(frame) = s.pop_frame() {
                assert!(frame.len() <= 1518, "a {}-byte frame", frame.len());
                if let crate::fragments::Verdict::Complete(f) =
                    whole.take(&frame, std::time::Instant::now)
                {
                    got = Some(f);
                }
            }
        }
        let f = got.expect("the answer, in fragments");
        let (ip, payload) = link::parse_ipv4(&f).unwrap();
        assert_eq!(ip.next_header, smoltcp::wire::IpProtocol::Udp);
        let u = UdpPacket::new_checked(payload).unwrap();
        assert_eq!(u.src_port(), dns::PORT);
        assert_eq!(u.payload().len(), 3000);
        assert_eq!(&u.payload()[0..2], &[0x31, 0x31], "the guest's id");
        assert_eq!(&u.payload()[n..], &answer[n..]);
    }

    #[test]
    fn a_silent_first_server_passes_the_query_on_after_its_timeout() {
        let cfg = NetConfig::default();
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (good, _h) = answering_server(9);
        let mut s = NetStack::new(cfg.clone(), None)
            .unwrap()
            .with_dns(DnsSource::Servers(vec![silent.local_addr().unwrap(), good]));
        s.neighbor_hint();
        let q = dns::query(0x0101, "other.example.test", dns::QTYPE_A);
        s.receive_frame(&hostile_frames::udp_frame_pub(
            smol(cfg.gateway()),
            dns::PORT,
            &q,
        ));
        s.poll();
        assert!(
            s.poll_delay().is_some_and(|d| d <= dns_upstream::TIMEOUT),
            "the stack wants to wake for the server's timeout"
        );
        let mut buf = [0u8; 512];
        silent
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        silent
            .recv_from(&mut buf)
            .expect("the first server is asked first");
        let a = dns_answer_within(&mut s, 3.0).expect("an answer after the timeout");
        assert_eq!(a[7], 9, "from the second server");
    }
}

#[cfg(test)]
mod nat_tests {
    use super::*;
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, UdpPacket};

    /// IPv4 fragments of `frame` (a guest's frame, an IPv4 packet without options), `chunk`
    /// payload bytes each.
    fn fragmented4(frame: &[u8], chunk: usize, id: u16) -> Vec<Vec<u8>> {
        let payload = &frame[34..];
        payload
            .chunks(chunk)
            .enumerate()
            .map(|(i, part)| {
                let mut f = frame[..34].to_vec();
                f.extend_from_slice(part);
                let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
                p.set_total_len((20 + part.len()) as u16);
                p.set_ident(id);
                p.set_dont_frag(false);
                p.set_more_frags((i + 1) * chunk < payload.len());
                p.set_frag_offset((i * chunk) as u16);
                p.fill_checksum();
                f
            })
            .collect()
    }

    /// A guest without mergeable RX buffers takes 1,518-byte frames: a datagram larger than
    /// that reaches it in fragments that fit, whether it comes from a UDP flow or a ping.
    #[test]
    fn replies_to_a_guest_with_small_buffers_come_in_fragments_that_fit_them() {
        let cfg = NetConfig::default();
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = echo.local_addr().unwrap().port();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        s.limit_frames(Some(1518));
        let data: Vec<u8> = (0..8000).map(|i| (i * 7 + 3) as u8).collect();
        let alias = smol(cfg.host_alias());
        for f in fragmented4(&hostile_frames::udp_frame_pub(alias, port, &data), 1480, 7) {
            s.receive_frame(&f);
        }
        s.poll();
        let mut buf = vec![0u8; 65536];
        echo.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let (n, from) = echo.recv_from(&mut buf).expect("the datagram on loopback");
        assert_eq!(&buf[..n], &data[..], "the guest's datagram, whole");
        echo.send_to(&data, from).unwrap();
        let mut whole = Vec::new();
        let mut last = false;
        for _ in 0..100 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            s.handle_host_events();
            while let Some(frame) = s.pop_frame() {
                assert!(frame.len() <= 1518, "a frame of {} bytes", frame.len());
                let f = EthernetFrame::new_checked(&frame[..]).unwrap();
                let Ok(p) = Ipv4Packet::new_checked(f.payload()) else {
                    continue;
                };
                if p.src_addr() != alias || p.next_header() != smoltcp::wire::IpProtocol::Udp {
                    continue;
                }
                assert_eq!(usize::from(p.frag_offset()), whole.len(), "in order");
                whole.extend_from_slice(p.payload());
                last = !p.more_frags();
            }
            if last {
                break;
            }
        }
        assert!(last, "the reply came back, {} bytes of it", whole.len());
        let u = UdpPacket::new_checked(&whole[..]).unwrap();
        assert!(u.verify_checksum(&alias.into(), &smol(cfg.guest()).into()));
        assert_eq!(u.payload(), &data[..]);
    }

    /// Handles host events for up to half a second, until `pick` takes an IPv4 packet the
    /// stack sends the guest; what it made of it.
    fn ipv4_to_guest_within<T>(
        s: &mut NetStack,
        mut pick: impl FnMut(&Ipv4Packet<&[u8]>) -> Option<T>,
    ) -> Option<T> {
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            s.handle_host_events();
            let mut got = None;
            while let Some(frame) = s.pop_frame() {
                let f = EthernetFrame::new_checked(&frame[..]).unwrap();
                if let Ok(p) = Ipv4Packet::new_checked(f.payload()) {
                    got = pick(&p).or(got);
                }
            }
            if got.is_some() {
                return got;
            }
        }
        None
    }

    /// What the host's socket says becomes the ICMP code a router would send: no route is
    /// net unreachable (the error ferry's own connect gets), from the gateway.
    #[test]
    fn the_hosts_unreachable_errors_become_their_icmp_codes() {
        use super::verdict::Unreachable;
        let err = |n| std::io::Error::from_raw_os_error(n);
        assert_eq!(
            Unreachable::of(&err(libc::ENETUNREACH)),
            Some(Unreachable::Net)
        );
        assert_eq!(
            Unreachable::of(&err(libc::EHOSTUNREACH)),
            Some(Unreachable::Host)
        );
        assert_eq!(
            Unreachable::of(&err(libc::ECONNREFUSED)),
            Some(Unreachable::Port)
        );
        assert_eq!(Unreachable::of(&err(libc::EAGAIN)), None);
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        let remote: SocketAddr = "198.51.100.7:53".parse().unwrap();
        let gateway = IpAddr::V4(cfg.gateway());
        let guest = IpAddr::V4(cfg.guest());
        let quote = super::path_errors::quote_udp(guest, 40000, remote, b"q").unwrap();
        s.unreachable(&quote, guest, gateway, Unreachable::Net);
        let frame = s.pop_frame().expect("an ICMP error for the guest");
        let f = EthernetFrame::new_checked(&frame[..]).unwrap();
        let p = Ipv4Packet::new_checked(f.payload()).unwrap();
        assert_eq!(
            p.src_addr(),
            smol(cfg.gateway()),
            "from the router without a route"
        );
        assert_eq!(&p.payload()[0..2], &[3, 0], "destination unreachable, net");
        assert_eq!(
            &p.payload()[8 + 20..8 + 24],
            &[0x9c, 0x40, 0, 53],
            "the flow's ports"
        );
    }

    /// A datagram to a port where nothing listens: the host's socket hears the ICMP error,
    /// and so does the guest, from the address it sent to, quoting its ports.
    #[test]
    fn a_remote_port_unreachable_reaches_the_guest() {
        let cfg = NetConfig::default();
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        let alias = smol(cfg.host_alias());
        s.receive_frame(&hostile_frames::udp_frame_pub(alias, port, b"anyone?"));
        s.poll();
        let got = ipv4_to_guest_within(&mut s, |p| {
            (p.next_header() == smoltcp::wire::IpProtocol::Icmp)
                .then(|| (p.src_addr(), p.payload().to_vec()))
        });
        let (src, icmp) = got.expect("an ICMP error for the guest");
        assert_eq!(src, alias, "from the address the guest sent to");
        assert_eq!(&icmp[0..2], &[3, 3], "destination unreachable, port");
        let quote = &icmp[8..];
        assert_eq!(quote[9], 17, "a UDP datagram quoted");
        assert_eq!(&quote[12..16], &cfg.guest().octets(), "from the guest");
        assert_eq!(&quote[16..20], &cfg.host_alias().octets());
        assert_eq!(&quote[22..24], &port.to_be_bytes(), "to the port");
    }

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
        let got = ipv4_to_guest_within(&mut s, |p| {
            let u = UdpPacket::new_checked(p.payload()).ok()?;
            // Without GUEST_CSUM, frames to the guest carry full checksums.
            assert!(u.verify_checksum(&p.src_addr().into(), &p.dst_addr().into()));
            // A guest that routes it on to a smaller MTU may fragment it.
            assert!(!p.dont_frag() && p.verify_checksum(), "DF on a datagram");
            Some((p.src_addr(), u.src_port(), u.payload().to_vec()))
        });
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
    pub(super) fn next_segment(stack: &mut NetStack) -> Option<(Ipv4Address, Vec<u8>)> {
        let f = next_segment_frame(stack)?;
        let (ip, payload) = link::parse_ipv4(&f)?;
        Some((ip.src_addr, payload.to_vec()))
    }

    /// The next TCP segment to the guest, as the frame the device gets.
    pub(super) fn next_segment_frame(stack: &mut NetStack) -> Option<Frame> {
        let end = StdInstant::now() + std::time::Duration::from_secs(2);
        while StdInstant::now() < end {
            stack.handle_host_events();
            while let Some(f) = stack.pop_frame() {
                if let Some((ip, _)) = link::parse_ipv4(&f) {
                    if ip.next_header == IpProtocol::Tcp && ip.dst_addr == smol(stack.cfg.guest()) {
                        return Some(f);
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }

    /// A stack that knows the guest's MAC, a host listener on loopback and its port.
    fn stack_and_listener() -> (NetConfig, NetStack, std::net::TcpListener, u16) {
        let cfg = NetConfig::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        (cfg, s, listener, port)
    }

    #[test]
    fn a_flow_closed_on_the_host_side_does_not_wake_the_stack_while_the_guest_closes() {
        let (cfg, mut s, listener, port) = stack_and_listener();
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

    /// Whether the guest takes partial checksums is negotiated after the stack is made (and
    /// again for each guest): the stack's TCP segments follow it either way.
    #[test]
    fn segments_to_the_guest_carry_whole_checksums_unless_it_takes_them_partial() {
        let (cfg, mut s, listener, port) = stack_and_listener();
        let dst = smol(cfg.host_alias());
        let guest = smol(cfg.guest());
        let synack = |s: &mut NetStack, sport: u16| {
            let seg = hostile_frames::guest_syn(sport, port);
            s.receive_frame(&hostile_frames::guest_tcp_frame(dst, &seg));
            s.poll();
            let synack = next_segment_frame(s).expect("SYN-ACK");
            listener.accept().unwrap();
            synack
        };
        let verifies = |f: &Frame| {
            let (_, seg) = link::parse_ipv4(f).unwrap();
            let t = TcpPacket::new_checked(seg).unwrap();
            assert!(t.syn() && t.ack());
            t.verify_checksum(&dst.into(), &guest.into())
        };
        s.set_checksum_offload(true);
        let mut f = synack(&mut s, 40010);
        assert_eq!(
            f.partial_checksum(),
            Some(PartialChecksum {
                start: 34,
                offset: 16
            }),
            "partial for a guest that takes it so"
        );
        assert!(!verifies(&f));
        // As the guest's kernel does before it sends the segment on.
        f.finish_checksum();
        assert!(verifies(&f), "the guest finishes a correct checksum");
        s.set_checksum_offload(false);
        let f = synack(&mut s, 40011);
        assert_eq!(f.partial_checksum(), None);
        assert!(verifies(&f), "a whole checksum for a guest that does not");
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
        use tcp_host::MAX_HANDSHAKES;
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
        assert_eq!(stack.tcp_limits.handshaking, 0);
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
