//! UDP, both directions: the guest's datagrams go out on one connected host socket per flow,
//! with their TTL less one, replies come back through the stack (and the ICMP errors the host
//! socket queues, from the router or remote that sent them: `path_errors`; the host's lack of
//! a route from the gateway); published UDP ports map
//! each client to the guest and back. Datagrams larger than the link's MTU bypass smoltcp's
//! socket; the link fragments them.

use super::flow::{Flow, FlowId, FlowKey, Origin, Proto as FlowProto};
use super::path_errors::hop_limit_for;
use super::verdict::Unreachable;
use super::*;

/// How long a UDP flow or a published UDP client lives without traffic.
pub(super) const UDP_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Outbound UDP flows open at most; past it, the one idle longest goes.
pub(super) const MAX_UDP_FLOWS: usize = 4096;

/// The flow of a guest UDP datagram, and its payload, if `payload` (an IP payload) is one
/// (the UDP checksum is not checked, see `FrameQueue::capabilities`).
pub(super) fn parse_udp<'a>(ip: &IpInfo, payload: &'a [u8]) -> Option<(FlowKey, &'a [u8])> {
    use smoltcp::wire::UdpPacket;
    if ip.proto != smoltcp::wire::IpProtocol::Udp {
        return None;
    }
    let u = UdpPacket::new_checked(payload).ok()?;
    let len = usize::from(u.len()).checked_sub(8)?;
    Some((
        FlowKey {
            proto: FlowProto::Udp,
            guest: ip.src,
            guest_port: u.src_port(),
            remote: SocketAddr::new(ip.dst, u.dst_port()),
        },
        payload.get(8..8 + len)?,
    ))
}

impl NetStack {
    /// A datagram to published UDP host port `host_port`: to the guest from the client's
    /// address; the mapping sends the guest's replies back through the published socket. A
    /// client with no mapping yet is checked against the inbound rules first.
    pub(super) fn publish_udp_in(
        &mut self,
        socket: Weak<UdpSocket>,
        client: SocketAddr,
        host_port: u16,
        guest_port: u16,
        data: &[u8],
    ) {
        let seen = self.seen_addr(client);
        let Some(guest) = self.guest_addr_for(seen) else {
            return;
        };
        let key = FlowKey {
            proto: FlowProto::Udp,
            guest,
            guest_port,
            remote: SocketAddr::new(seen, client.port()),
        };
        match self.flows.by_key_mut(&key) {
            Some((_, f)) if f.host == client && matches!(f.kind, Kind::UdpPublished { .. }) => {
                // Another publication's socket, maybe: its address is asked for anew.
                let same = matches!(&f.kind, Kind::UdpPublished { socket: s } if s.ptr_eq(&socket));
                if !same {
                    f.host_addrs.take();
                }
                f.kind = Kind::UdpPublished { socket };
                f.count_to_guest(data.len());
            }
            Some(_) => {
                // The guest's own flow, or another client that looks alike: not this one.
                return;
            }
            None => {
                let counters = match self.decide_in(Proto::Udp, client, host_port, data.len()) {
                    Ok(c) => c,
                    // Refused, whether dropped or rejected: an unprivileged socket cannot send
                    // the ICMP error, so the datagram is discarded (and counted).
                    Err(_) => return,
                };
                let mut flow = Flow::new(
                    key,
                    client,
                    Origin::Published,
                    Kind::UdpPublished { socket },
                );
                flow.counters = counters;
                flow.count_to_guest(data.len());
                if let Some(id) = self.flows.insert(flow) {
                    self.audit_open(id);
                }
            }
        }
        self.udp_to_guest(
            SocketAddr::new(seen, client.port()),
            guest,
            guest_port,
            data,
        );
    }

    /// A guest datagram on a UDP flow: out on its host socket, or back through the published
    /// socket to the published port's client it answers. Returns whether it took the frame.
    pub(super) fn udp_out(&mut self, frame: &[u8], ip: &IpInfo, payload: &[u8]) -> bool {
        let Some((key, data)) = parse_udp(ip, payload) else {
            return false;
        };
        let hops = match hop_limit_for(ip.hop_limit) {
            Some(h) => h,
            // Its last hop: it ends at the gateway, unless it is for the gateway (DHCP, DNS)
            // or the link in the first place.
            None if !self.routes(ip.dst) => return false,
            None => match self.hops_or_expire(frame, ip) {
                Some(h) => h,
                None => return true,
            },
        };
        // A flow already open: one lookup, and the datagram goes.
        if let Some((id, f)) = self.flows.by_key_mut(&key) {
            match &mut f.kind {
                Kind::Udp { .. } => self.send_on_flow(id, data, hops),
                Kind::UdpPublished { socket } => match socket.upgrade() {
                    Some(s) => {
                        if let Ok(n) = s.send_to(data, f.host) {
                            f.count_from_guest(n);
                        }
                    }
                    // The port was unpublished.
                    None => self.udp_close(id, "unpublished"),
                },
                _ => {}
            }
            return true;
        }
        if !self.routes(ip.dst) {
            return false;
        }
        let counters = match self.decide(Proto::Udp, key.remote, frame, ip) {
            Ok(c) => c,
            Err(_) => return true,
        };
        if self.flows.count(FlowProto::Udp) >= MAX_UDP_FLOWS {
            self.udp_evict_oldest();
        }
        let target = self.host_target(key.remote);
        let socket = match udp_host_socket(target) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("nat: cannot open a host socket for {}: {e}", key.remote);
                // No route from the host: the gateway says so, as a router without one does.
                self.no_route_from_gateway(frame, ip, &e);
                return true;
            }
        };
        let Some(reply) = self.udp_reply_socket(key.remote) else {
            return true;
        };
        let id = self.flows.next_id();
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                socket.as_raw_fd(),
                EpollEvent::new(EventSet::IN, Token::Flow(id).to_u64()),
            )
            .is_err()
        {
            self.udp_reply_release(key.remote);
            return true;
        }
        log::debug!("nat: udp flow guest:{} -> {}", key.guest_port, key.remote);
        let kind = Kind::Udp {
            socket,
            reply,
            ttl: 0,
        };
        let mut flow = Flow::new(key, target, Origin::Outbound, kind);
        flow.counters = counters;
        if let Some(id) = self.flows.insert(flow) {
            self.audit_open(id);
            self.send_on_flow(id, data, hops);
        }
        true
    }

    /// The stack socket the replies from `remote` leave from, shared by every flow to it.
    fn udp_reply_socket(&mut self, remote: SocketAddr) -> Option<SocketHandle> {
        if let Some((h, users)) = self.udp_replies.get_mut(&remote) {
            *users += 1;
            return Some(*h);
        }
        let mut s = udp_reply_socket();
        s.bind(IpEndpoint::from(remote)).ok()?;
        let h = self.sockets.add(s);
        self.udp_replies.insert(remote, (h, 1));
        Some(h)
    }

    /// One flow fewer uses the reply socket of `remote`; the last one removes it.
    fn udp_reply_release(&mut self, remote: SocketAddr) {
        if let Some((h, users)) = self.udp_replies.get_mut(&remote) {
            *users -= 1;
            if *users == 0 {
                let h = *h;
                self.udp_replies.remove(&remote);
                self.sockets.remove(h);
            }
        }
    }

    /// Closes UDP flow `id` (either kind).
    pub(super) fn udp_close(&mut self, id: FlowId, reason: &'static str) {
        let Some(f) = self.flows.remove(id) else {
            return;
        };
        self.audit_close(&f, reason);
        if let Kind::Udp { socket, .. } = &f.kind {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                socket.as_raw_fd(),
                EpollEvent::default(),
            );
            self.udp_reply_release(f.key.remote);
        }
    }

    fn udp_evict_oldest(&mut self) {
        let oldest = self
            .flows
            .iter()
            .filter(|(_, f)| matches!(f.kind, Kind::Udp { .. }))
            .min_by_key(|(_, f)| f.last)
            .map(|(id, _)| id);
        if let Some(id) = oldest {
            self.udp_close(id, "evicted");
        }
    }

    /// Closes the UDP flows idle for [`UDP_IDLE`], and published clients whose port went.
    pub(super) fn udp_expire(&mut self) {
        let mut ids = std::mem::take(&mut self.pump_ids);
        self.flows.select(&mut ids, |f| match &f.kind {
            Kind::Udp { .. } => f.last.elapsed() > UDP_IDLE,
            Kind::UdpPublished { socket } => {
                f.last.elapsed() > UDP_IDLE || socket.strong_count() == 0
            }
            _ => false,
        });
        for id in &ids {
            self.udp_close(*id, "idle");
        }
        self.pump_ids = ids;
    }

    /// Emits a UDP datagram from `from` to the guest's `guest:dst_port`.
    pub(super) fn udp_to_guest(
        &mut self,
        from: SocketAddr,
        guest: std::net::IpAddr,
        dst_port: u16,
        data: &[u8],
    ) {
        use smoltcp::wire::{IpProtocol, UdpPacket, UdpRepr};
        let (src, src_port) = (from.ip(), from.port());
        let udp = UdpRepr { src_port, dst_port };
        let len = udp.header_len() + data.len();
        // IPv4's total length counts its header; IPv6's payload length does not.
        let largest = if src.is_ipv4() { 65535 - 20 } else { 65535 };
        if len > largest || self.device.tx.len() >= QUEUE_FRAMES {
            // Larger than IP carries, or the guest is not reading.
            return;
        }
        let (s, d) = (IpAddress::from(src), IpAddress::from(guest));
        // More than the link takes in one packet goes in fragments (`fragment_for_guest`), which
        // the guest puts back together (the checksum covers the whole datagram). For IPv6
        // too: routers never fragment it, but ferry is the guest-side packet's source, not a
        // router (the host socket's datagram arrived whole), and a source fragments.
        self.emit_ip(src, guest, IpProtocol::Udp, len, |buf| {
            udp.emit(
                &mut UdpPacket::new_unchecked(buf),
                &s,
                &d,
                data.len(),
                |p| p.copy_from_slice(data),
                &Default::default(),
            );
        });
    }

    /// Whether a guest datagram to `dst` goes through the NAT: DHCP, DNS on the gateway and
    /// broadcasts are the stack's (and a guest forward's address has no UDP: the stack says
    /// the port is unreachable).
    fn routes(&self, dst: IpAddr) -> bool {
        !self.is_gateway(dst) && !self.is_forward_addr(dst) && self.leaves_link(dst)
    }

    /// Replies on UDP flow `id`'s host socket, to the guest as far as the stack takes them,
    /// after the ICMP errors it queued (`errors`: epoll said there are some).
    pub(super) fn udp_in(&mut self, id: FlowId, buf: &mut [u8], errors: bool) {
        if errors {
            self.relay_path_errors(id);
        }
        let Some(f) = self.flows.get(id) else {
            return;
        };
        let (remote, guest, guest_port) = (f.key.remote, f.key.guest, f.key.guest_port);
        let Kind::Udp { reply, .. } = f.kind else {
            return;
        };
        let to = IpEndpoint::new(guest.into(), guest_port);
        // A datagram larger than the link's MTU is built here, not sent through smoltcp's
        // socket (it may pass smaller ones still in the socket's buffer; UDP promises no
        // order): smoltcp cannot send an IPv6 datagram over the MTU it was made with. The link
        // fragments it (`fragment_for_guest`).
        let header = if remote.is_ipv4() { 20 } else { 40 };
        let fits = usize::from(self.cfg.mtu).saturating_sub(header + 8);
        loop {
            // Backpressure: stop reading while the stack's buffer toward the guest is full.
            if !self.sockets.get_mut::<udp::Socket>(reply).can_send() {
                break;
            }
            let Some(f) = self.flows.get_mut(id) else {
                break;
            };
            let Kind::Udp { socket: host, .. } = &f.kind else {
                break;
            };
            let n = match host.recv(buf) {
                Ok(n) => n,
                // The remote (or a router on the way) answered a datagram with an ICMP
                // error, which the host's kernel queued with who sent it: the guest hears it
                // too, as it would on a real network, so its resolver or client gives up at
                // once rather than wait out a timeout, and its traceroute sees the router.
                Err(e) => {
                    // The error queue holds it, unless the socket's buffer had no room for
                    // it: then it is rebuilt from the errno, from the remote.
                    if e.kind() != io::ErrorKind::WouldBlock && self.relay_path_errors(id) == 0 {
                        if let (Some(why), Some(quote)) = (
                            Unreachable::of(&e),
                            super::path_errors::quote_udp(guest, guest_port, remote, &[]),
                        ) {
                            self.unreachable(&quote, guest, remote.ip(), why);
                        }
                    }
                    break;
                }
            };
            f.count_to_guest(n);
            if n > fits {
                self.udp_to_guest(remote, guest, guest_port, &buf[..n]);
                continue;
            }
            let socket = self.sockets.get_mut::<udp::Socket>(reply);
            let mut meta = udp::UdpMetadata::from(to);
            meta.local_address = Some(remote.ip().into());
            let _ = socket.send_slice(&buf[..n], meta);
        }
    }
}

/// A non-blocking host socket connected to `to`, of its family.
pub(super) fn udp_host_socket(to: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any)?;
    s.connect(to)?;
    s.set_nonblocking(true)?;
    // The ICMP errors its datagrams meet, queued with who sent them (`path_errors`).
    sys::enable_recverr(s.as_raw_fd(), to.is_ipv6())?;
    Ok(s)
}
