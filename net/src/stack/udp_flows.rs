//! UDP, both directions: the guest's datagrams go out on one connected host socket per flow,
//! replies come back through the stack; published UDP ports map each client to the guest and
//! back. Datagrams larger than the link's MTU go to the guest in fragments.

use super::*;

/// One client of a published UDP port.
pub(super) struct UdpMapping {
    pub(super) socket: Weak<UdpSocket>,
    pub(super) client: SocketAddr,
    pub(super) last: StdInstant,
    /// The counters of the inbound rule that let the client in, if rules are set.
    pub(super) counters: Option<Arc<Counters>>,
}

/// How long a published UDP mapping lives without traffic.
pub(super) const UDP_PUBLISH_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The flow of a guest UDP datagram to an IPv4 destination, and its payload, if `frame` is
/// one (the IPv4 header's checksum checked; the UDP one is not, see
/// `FrameQueue::capabilities`).
pub(super) fn parse_udp_payload(frame: &[u8]) -> Option<(FlowKey, &[u8])> {
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
pub(super) fn send_on(flow: &mut crate::nat::UdpFlow, payload: &[u8]) {
    if let (Ok(n), Some(c)) = (flow.socket.send(payload), &flow.counters) {
        c.add_bytes(n);
    }
    flow.last = StdInstant::now();
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
    pub(super) fn publish_udp_out(&mut self, frame: &[u8]) -> bool {
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
    pub(super) fn udp_to_guest(
        &mut self,
        src: std::net::Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        data: &[u8],
    ) {
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
    pub(super) fn emit_fragments(
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

    /// A guest UDP datagram to the outside (or the host alias): sent at once on its flow's host
    /// socket, opened on the flow's first datagram together with the stack socket its replies
    /// leave from. It never waits in a stack socket, so a burst cannot overflow one. Returns
    /// whether it took the frame.
    pub(super) fn nat_udp_out(&mut self, frame: &[u8]) -> bool {
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

    /// Replies on a NAT'd UDP flow's host socket, to the guest as far as the stack takes them.
    pub(super) fn udp_in(&mut self, token: u64, buf: &mut [u8]) {
        let Some(key) = self.nat.key_of(token) else {
            return;
        };
        let Some(&h) = self.nat_sockets.get(&key.dst) else {
            return;
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
            let n = match flow.socket.recv(buf) {
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
}
