//! Ferry as the guest's router: the TTL of what the NAT sends on, and the ICMP errors the
//! guest's packets meet on the way, so `traceroute`, `mtr` and path MTU discovery work from the
//! guest as behind any router.
//!
//! Theory of operation. The gateway is one hop: a datagram or echo request the guest sends
//! through the NAT with a TTL (hop limit) of 1 expires there, and the gateway answers "time
//! exceeded" from its own address, quoting the packet, as Linux forwarding does (never about
//! a packet from or to a broadcast, multicast or link-local address, nor one for the link
//! itself, such as the host alias: `hops_or_expire`); any other goes out with its TTL less
//! one (`hop_limit_for`), set on the flow's host socket when it changes (a traceroute
//! changes it on each probe; other traffic never does). The host
//! sockets of UDP and ping flows queue the ICMP errors their packets meet (IP_RECVERR), with
//! who sent each: `relay` passes each on to the guest, from that sender (a router on the
//! host's path, or the remote; the host's own loopback stands for the address the guest
//! used), quoting the guest's packet rebuilt from the flow and what the error quotes of it:
//! the guest's kernel matches it by addresses, protocol and ports (or echo identifier), and
//! traceroute6 by its probe's payload.
//! Destination unreachable, time exceeded and IPv6's packet too big pass, the next hop's MTU
//! with them; other kinds (redirects, parameter problems) stay on the host.
//!
//! TCP is the same up to the connection: a SYN on its last hop expires at the gateway, any
//! other makes the host's connection send with the SYN's TTL less one, and an ICMP error that
//! ends the host's connect reaches the guest from the router that sent it, quoting the guest's
//! SYN (`relay_connect_error`; tcptraceroute). Once connected, TCP's ICMP errors are the host
//! kernel's: ferry's connection carries the guest's bytes, not its segments. Errors the
//! host's own stack makes (from one of its addresses: its neighbour discovery failed, its
//! firewall said no) are told from the gateway, never from the host's address.

use super::sys::QueuedError;
use super::verdict::Unreachable;
use super::*;

/// The first 8 bytes of an ICMP or ICMPv6 error (type, code, checksum, and the word that
/// holds the next hop's MTU for "too big"), the checksum left to fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IcmpError {
    pub(super) icmp_type: u8,
    pub(super) code: u8,
    pub(super) rest: [u8; 4],
}

impl IcmpError {
    /// "Time exceeded in transit", in the family of `v6`.
    fn time_exceeded(v6: bool) -> Self {
        IcmpError {
            icmp_type: if v6 { 3 } else { 11 },
            code: 0,
            rest: [0; 4],
        }
    }

    /// Destination unreachable for `why`, in the family of `v6`.
    pub(super) fn unreachable(v6: bool, why: Unreachable) -> Self {
        let (icmp_type, code) = if v6 {
            (1, why.code6())
        } else {
            (3, why.code4())
        };
        IcmpError {
            icmp_type,
            code,
            rest: [0; 4],
        }
    }

    /// The error to give the guest for one a host socket queued, if it is a kind that passes.
    fn of(e: &QueuedError) -> Option<Self> {
        let rest = match (e.v6, e.icmp_type, e.code) {
            // Fragmentation needed: the next hop's MTU in the low half (RFC 1191).
            (false, 3, 4) => [0, 0, (e.info >> 8) as u8, e.info as u8],
            (false, 3, _) | (false, 11, _) => [0; 4],
            (true, 2, _) => e.info.to_be_bytes(),
            (true, 1, _) | (true, 3, _) => [0; 4],
            _ => return None,
        };
        Some(IcmpError {
            icmp_type: e.icmp_type,
            code: e.code,
            rest,
        })
    }
}

/// The TTL (hop limit) that a guest packet arriving with `hops` leaves the host with, if it
/// goes on: one hop less, as a router forwards it; None when it expires at the gateway.
pub(super) fn hop_limit_for(hops: u8) -> Option<u8> {
    hops.checked_sub(1).filter(|h| *h > 0)
}

/// Sets the TTL of `fd`'s packets to `want` unless `current` (the last one set) already is.
fn keep_hop_limit(fd: RawFd, v6: bool, current: &mut u8, want: u8) {
    if *current != want {
        match sys::set_hop_limit(fd, v6, want) {
            Ok(()) => *current = want,
            Err(e) => log::debug!("nat: cannot set a host socket's TTL to {want}: {e}"),
        }
    }
}

/// An IPv4 header of 20 bytes or an IPv6 one, `guest` to `remote`, for a payload of `len`
/// bytes of `proto`: the start of a rebuilt quote.
fn quote_header(guest: IpAddr, remote: IpAddr, proto: u8, len: u16) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(48);
    match (guest, remote) {
        (IpAddr::V4(g), IpAddr::V4(r)) => {
            let total = (20 + len).to_be_bytes();
            q.extend_from_slice(&[0x45, 0, total[0], total[1], 0, 0, 0x40, 0, 64, proto, 0, 0]);
            q.extend_from_slice(&g.octets());
            q.extend_from_slice(&r.octets());
            let sum = crate::fragments::checksum(&q);
            q[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        (IpAddr::V6(g), IpAddr::V6(r)) => {
            let l = len.to_be_bytes();
            q.extend_from_slice(&[0x60, 0, 0, 0, l[0], l[1], proto, 64]);
            q.extend_from_slice(&g.octets());
            q.extend_from_slice(&r.octets());
        }
        _ => return None,
    }
    Some(q)
}

/// A guest datagram of UDP flow `guest:guest_port` -> `remote` as far as an error quotes it,
/// rebuilt: its IP and UDP headers, then `data`, the payload quoted.
pub(super) fn quote_udp(
    guest: IpAddr,
    guest_port: u16,
    remote: SocketAddr,
    data: &[u8],
) -> Option<Vec<u8>> {
    let len = u16::try_from(8 + data.len()).ok()?;
    let mut q = quote_header(guest, remote.ip(), 17, len)?;
    q.extend_from_slice(&guest_port.to_be_bytes());
    q.extend_from_slice(&remote.port().to_be_bytes());
    q.extend_from_slice(&len.to_be_bytes());
    q.extend_from_slice(&[0, 0]);
    q.extend_from_slice(data);
    Some(q)
}

/// A guest echo request `guest` -> `remote` with identifier `ident` as far as an error quotes
/// it, rebuilt from `echo`, the request the host's socket sent (the kernel's identifier in
/// it is the guest's again).
fn quote_echo(guest: IpAddr, remote: IpAddr, ident: u16, echo: &[u8]) -> Option<Vec<u8>> {
    let proto = if remote.is_ipv4() { 1 } else { 58 };
    let mut q = quote_header(guest, remote, proto, u16::try_from(echo.len()).ok()?)?;
    let at = q.len();
    q.extend_from_slice(echo);
    q[at + 4..at + 6].copy_from_slice(&ident.to_be_bytes());
    Some(q)
}

/// Who sent an ICMP error a host socket queued, as the guest is to hear of it.
enum Sender {
    /// A router on the host's path, or the remote itself at another address: heard from it.
    Beyond(IpAddr),
    /// The host's own stack, from one of its addresses (its neighbour discovery failed, its
    /// firewall said no): heard from the gateway, so the guest never sees the host's address.
    HostStack,
    /// The flow's own far end (the address the host socket sent to, or the host's loopback
    /// for the host alias), or nobody named: heard from the address the guest sent to.
    FlowsEnd,
}

impl Sender {
    /// The sender of an error whose offender is `offender`, on a host socket sending to
    /// `host`.
    fn of(offender: Option<IpAddr>, host: IpAddr) -> Self {
        match offender {
            Some(o) if o == host || o.is_loopback() || o.is_unspecified() => Sender::FlowsEnd,
            Some(o) if sys::is_local_address(o) => Sender::HostStack,
            Some(o) => Sender::Beyond(o),
            None => Sender::FlowsEnd,
        }
    }
}

/// Whether `a` is an address an ICMP error may be about or go to (RFC 1812 4.3.2.7): no
/// broadcast, multicast, unspecified or link-local one.
fn unicast_beyond_link(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => {
            !a.is_broadcast() && !a.is_multicast() && !a.is_unspecified() && !a.is_link_local()
        }
        IpAddr::V6(a) => {
            !a.is_multicast() && !a.is_unspecified() && (a.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

impl NetStack {
    /// The TTL the NAT sends guest packet `ip` on with (`hop_limit_for`), or None when it
    /// expires at the gateway, which then answers "time exceeded" (and the packet is taken).
    /// A packet on its last hop to the link itself (the host alias) or about which no error
    /// may be sent (from or to a broadcast, multicast or link-local address) goes on with a
    /// TTL of 1.
    pub(super) fn hops_or_expire(&mut self, frame: &[u8], ip: &IpInfo) -> Option<u8> {
        if let Some(h) = hop_limit_for(ip.hop_limit) {
            return Some(h);
        }
        let on_link =
            self.is_host_alias(ip.dst) || self.is_gateway(ip.dst) || self.is_forward_addr(ip.dst);
        if on_link || !unicast_beyond_link(ip.dst) || !unicast_beyond_link(ip.src) {
            return Some(1);
        }
        let from = self.gateway_for(ip.src);
        if let Some(packet) = frame.get(14..14 + ip.len) {
            let e = IcmpError::time_exceeded(ip.src.is_ipv6());
            self.icmp_error(packet, ip.src, from, e);
        }
        None
    }

    /// The host could not send guest packet `ip` (in `frame`) on, for no route or no host
    /// (`e`, from a host socket's connect): the gateway says so as a router without one does,
    /// with ICMP net or host unreachable quoting it. Returns whether `e` was such an error.
    pub(super) fn no_route_from_gateway(
        &mut self,
        frame: &[u8],
        ip: &IpInfo,
        e: &std::io::Error,
    ) -> bool {
        let why = match Unreachable::of(e) {
            Some(why @ (Unreachable::Net | Unreachable::Host)) => why,
            _ => return false,
        };
        if let Some(packet) = frame.get(14..14 + ip.len) {
            let gateway = self.gateway_for(ip.src);
            self.unreachable(packet, ip.src, gateway, why);
        }
        true
    }

    /// The ICMP errors queued on flow `id`'s host socket (UDP or ping), passed on to the
    /// guest. Returns how many it read.
    pub(super) fn relay_path_errors(&mut self, id: FlowId) -> usize {
        let mut read = 0;
        loop {
            let Some(f) = self.flows.get(id) else {
                return read;
            };
            let fd = match &f.kind {
                Kind::Udp { socket, .. } => socket.as_raw_fd(),
                Kind::Ping { socket, .. } => socket.as_raw_fd(),
                _ => return read,
            };
            let Some(e) = sys::recv_error(fd) else {
                return read;
            };
            read += 1;
            let (key, host) = (f.key, f.host.ip());
            let Some(error) = IcmpError::of(&e) else {
                continue;
            };
            let quote = if key.proto == super::flow::Proto::Ping {
                if e.quoted.len() < 8 {
                    continue;
                }
                quote_echo(key.guest, key.remote.ip(), key.guest_port, &e.quoted)
            } else {
                quote_udp(key.guest, key.guest_port, key.remote, &e.quoted)
            };
            let Some(quote) = quote else {
                continue;
            };
            // The host's side of the flow, or its loopback (the host alias's), stands for the
            // address the guest sent to; the host's own stack (its neighbour discovery
            // failed) is the gateway; a router on the way is itself.
            let from = match Sender::of(e.offender, host) {
                Sender::Beyond(o) => o,
                Sender::HostStack => self.gateway_for(key.guest),
                Sender::FlowsEnd => key.remote.ip(),
            };
            if from.is_ipv4() != key.guest.is_ipv4() {
                continue;
            }
            log::debug!(
                "nat: ICMP type {} code {} from {from} for the guest's flow to {}",
                e.icmp_type,
                e.code,
                key.remote
            );
            self.icmp_error(&quote, key.guest, from, error);
        }
    }

    /// The ICMP error that ended TCP flow `id`'s host connect, if one is queued on its socket
    /// and came from beyond the host (a router whose TTL ran out, or that has no route on):
    /// passed on to the guest from its sender, quoting the guest's SYN `syn` as it came.
    /// Returns whether one was.
    pub(super) fn relay_connect_error(&mut self, id: FlowId, syn: &[u8]) -> bool {
        let Some(f) = self.flows.get(id) else {
            return false;
        };
        let Kind::Tcp(t) = &f.kind else {
            return false;
        };
        let (guest, host) = (f.key.guest, f.host.ip());
        let Some(e) = sys::recv_error(t.host.as_raw_fd()) else {
            return false;
        };
        let Some(error) = IcmpError::of(&e) else {
            return false;
        };
        // Only a router's (or the remote's) error is passed on here; the host's own are the
        // gateway's to tell (`no_route_from_gateway`), and the remote's refusal is a RST.
        let Sender::Beyond(from) = Sender::of(e.offender, host) else {
            return false;
        };
        if from.is_ipv4() != guest.is_ipv4() {
            return false;
        }
        let Some((ip, _)) = parse_ip(syn) else {
            return false;
        };
        let Some(packet) = syn.get(14..14 + ip.len) else {
            return false;
        };
        log::debug!(
            "nat: ICMP type {} code {} from {from} for the guest's connect to {}",
            e.icmp_type,
            e.code,
            f.key.remote
        );
        self.icmp_error(packet, guest, from, error);
        true
    }

    /// Sends `data` on flow `id`'s host socket (UDP or ping), with TTL `hops`, and counts
    /// it. With IP_RECVERR
    /// every ICMP error the socket heard leaves it a pending error, which the kernel hands to
    /// the next send instead of sending: then the errors go to the guest and the send is
    /// tried again, rather than the datagram lost. A full socket buffer loses the datagram,
    /// as a router would.
    pub(super) fn send_on_flow(&mut self, id: FlowId, data: &[u8], hops: u8) {
        for attempt in 0..2 {
            let Some(f) = self.flows.get_mut(id) else {
                return;
            };
            let v6 = f.key.remote.is_ipv6();
            let fd = match &mut f.kind {
                Kind::Udp { socket, ttl, .. } => {
                    keep_hop_limit(socket.as_raw_fd(), v6, ttl, hops);
                    socket.as_raw_fd()
                }
                Kind::Ping { socket, ttl } => {
                    keep_hop_limit(socket.as_raw_fd(), v6, ttl, hops);
                    socket.as_raw_fd()
                }
                _ => return,
            };
            match sys::send(fd, data) {
                Ok(n) => return f.count_from_guest(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || attempt == 1 => return,
                Err(_) => {
                    self.relay_path_errors(id);
                }
            }
        }
    }

    /// Sends the guest ICMP error `e` from `from` about `packet`, an IP packet it sent from
    /// `guest` (or the start of one): quoting as much of it as Linux does, up to 576 bytes in
    /// all for ICMP (RFC 1812 4.3.2.3), the minimum IPv6 MTU for ICMPv6 (RFC 4443).
    pub(super) fn icmp_error(&mut self, packet: &[u8], guest: IpAddr, from: IpAddr, e: IcmpError) {
        use smoltcp::wire::{Icmpv4Packet, Icmpv6Packet, IpProtocol};
        if self.device.tx.len() >= QUEUE_FRAMES || packet.is_empty() {
            return;
        }
        let head = [
            e.icmp_type,
            e.code,
            0,
            0,
            e.rest[0],
            e.rest[1],
            e.rest[2],
            e.rest[3],
        ];
        match from {
            IpAddr::V4(_) => {
                let quote = &packet[..packet.len().min(576 - 28)];
                self.emit_ip(from, guest, IpProtocol::Icmp, 8 + quote.len(), |p| {
                    p[..8].copy_from_slice(&head);
                    p[8..].copy_from_slice(quote);
                    Icmpv4Packet::new_unchecked(p).fill_checksum();
                });
            }
            IpAddr::V6(_) => {
                // 1280 bytes at most: the IPv6 header (40) and the ICMPv6 header (8) first.
                let quote = &packet[..packet.len().min(1280 - 48)];
                self.emit_ip(from, guest, IpProtocol::Icmpv6, 8 + quote.len(), |p| {
                    p[..8].copy_from_slice(&head);
                    p[8..].copy_from_slice(quote);
                    Icmpv6Packet::new_unchecked(p).fill_checksum(&v6(from), &v6(guest));
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_is_taken_off_and_the_last_one_ends_here() {
        assert_eq!(hop_limit_for(64), Some(63));
        assert_eq!(hop_limit_for(2), Some(1));
        assert_eq!(hop_limit_for(1), None);
        assert_eq!(hop_limit_for(0), None);
    }

    fn queued(v6: bool, icmp_type: u8, code: u8, info: u32) -> QueuedError {
        QueuedError {
            v6,
            icmp_type,
            code,
            info,
            offender: None,
            quoted: Vec::new(),
        }
    }

    #[test]
    fn errors_pass_with_the_next_hops_mtu_and_others_stay() {
        let e = IcmpError::of(&queued(false, 3, 4, 1400)).unwrap();
        assert_eq!((e.icmp_type, e.code, e.rest), (3, 4, [0, 0, 0x05, 0x78]));
        let e = IcmpError::of(&queued(false, 11, 0, 0)).unwrap();
        assert_eq!((e.icmp_type, e.code, e.rest), (11, 0, [0; 4]));
        let e = IcmpError::of(&queued(true, 2, 0, 1280)).unwrap();
        assert_eq!((e.icmp_type, e.rest), (2, [0, 0, 0x05, 0x00]));
        assert!(IcmpError::of(&queued(true, 3, 0, 0)).is_some());
        assert!(IcmpError::of(&queued(true, 1, 4, 0)).is_some());
        // Redirects, parameter problems, source quench: not the guest's business.
        assert!(IcmpError::of(&queued(false, 5, 1, 0)).is_none());
        assert!(IcmpError::of(&queued(false, 12, 0, 0)).is_none());
        assert!(IcmpError::of(&queued(true, 4, 0, 0)).is_none());
    }

    #[test]
    fn quotes_are_headers_the_guest_can_match() {
        let g: IpAddr = "192.168.127.2".parse().unwrap();
        let q = quote_udp(g, 40000, "198.18.1.2:33435".parse().unwrap(), b"probe").unwrap();
        assert_eq!(q.len(), 33);
        assert_eq!(
            crate::fragments::checksum(&q[..20]),
            0,
            "a valid IPv4 header"
        );
        assert_eq!(&q[2..4], &[0, 33], "the IP length");
        assert_eq!(&q[12..16], &[192, 168, 127, 2]);
        assert_eq!(
            &q[20..26],
            &[0x9c, 0x40, 0x82, 0x9b, 0, 13],
            "ports and UDP length"
        );
        assert_eq!(
            &q[28..],
            b"probe",
            "the payload quoted, where traceroute6 looks"
        );
        let echo = [8, 0, 0xab, 0xcd, 0x77, 0x77, 0, 7, b'x'];
        let q = quote_echo(g, "198.18.1.2".parse().unwrap(), 0x1234, &echo).unwrap();
        assert_eq!(
            (q[9], &q[20..]),
            (1, &[8, 0, 0xab, 0xcd, 0x12, 0x34, 0, 7, b'x'][..])
        );
        let g6: IpAddr = "fd46:6572:7279::2".parse().unwrap();
        let echo6 = [128, 0, 0, 0, 0, 9, 0, 1];
        let q = quote_echo(g6, "fd00::2".parse().unwrap(), 1, &echo6).unwrap();
        assert_eq!(
            (q.len(), q[6], q[40], &q[44..46]),
            (48, 58, 128, &[0, 1][..])
        );
        assert!(quote_udp(g, 1, "[fd00::2]:53".parse().unwrap(), b"").is_none());
    }

    /// `frame`, a guest IPv4 frame, with its TTL set to `ttl` (header checksum mended).
    fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
        frame[14 + 8] = ttl;
        frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let sum = crate::fragments::checksum(&frame[14..34]);
        frame[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
        frame
    }

    /// The ICMP messages the stack sends the guest within half a second: (source, message).
    fn icmp_to_guest(s: &mut NetStack) -> Vec<(IpAddr, Vec<u8>)> {
        use smoltcp::wire::{EthernetFrame, IpProtocol, Ipv4Packet};
        let mut got = Vec::new();
        for _ in 0..50 {
            s.handle_host_events();
            while let Some(frame) = s.pop_frame() {
                let f = EthernetFrame::new_checked(&frame[..]).unwrap();
                if let Ok(p) = Ipv4Packet::new_checked(f.payload()) {
                    if p.next_header() == IpProtocol::Icmp {
                        got.push((IpAddr::V4(p.src_addr()), p.payload().to_vec()));
                    }
                }
            }
            if !got.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        got
    }

    #[test]
    fn a_datagram_on_its_last_hop_expires_at_the_gateway() {
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        let far = smoltcp::wire::Ipv4Address::new(198, 51, 100, 7);
        let frame = with_ttl(
            super::super::hostile_frames::udp_frame_pub(far, 33434, b"x"),
            1,
        );
        s.receive_frame(&frame);
        s.poll();
        let got = icmp_to_guest(&mut s);
        assert_eq!(got.len(), 1, "one ICMP error: {got:?}");
        let (src, icmp) = &got[0];
        assert_eq!(*src, IpAddr::V4(cfg.gateway()), "from the gateway");
        assert_eq!(&icmp[0..2], &[11, 0], "time exceeded in transit");
        assert_eq!(
            &icmp[8..8 + 28],
            &frame[14..14 + 28],
            "quoting the datagram"
        );
        assert_eq!(
            s.flows.count(super::super::flow::Proto::Udp),
            0,
            "and no flow"
        );
    }

    /// The TTL an IPv4 socket sends with.
    fn ttl_of(fd: RawFd) -> i32 {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid destinations of the right sizes.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_TTL,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        v
    }

    #[test]
    fn a_datagram_leaves_the_host_with_one_hop_less() {
        let cfg = NetConfig::default();
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        let alias = smol(cfg.host_alias());
        let ttl_of_flow = |s: &NetStack| -> Vec<(u8, i32)> {
            s.flows
                .iter()
                .filter_map(|(_, f)| match &f.kind {
                    Kind::Udp { socket, ttl, .. } => Some((*ttl, ttl_of(socket.as_raw_fd()))),
                    _ => None,
                })
                .collect()
        };
        let frame = super::super::hostile_frames::udp_frame_pub(alias, port, b"one");
        s.receive_frame(&with_ttl(frame.clone(), 5));
        assert_eq!(ttl_of_flow(&s), vec![(4, 4)]);
        s.receive_frame(&frame);
        assert_eq!(
            ttl_of_flow(&s),
            vec![(63, 63)],
            "the flow follows the guest"
        );
        let mut b = [0u8; 16];
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        assert_eq!(server.recv(&mut b).unwrap(), 3, "both went out");
        assert_eq!(server.recv(&mut b).unwrap(), 3);
    }

    #[test]
    fn a_syn_on_its_last_hop_expires_at_the_gateway_and_others_leave_one_hop_shorter() {
        use super::super::hostile_frames::{guest_syn, guest_tcp_frame};
        let cfg = NetConfig::default();
        // Loopback: the one destination a test may connect to; not the host alias, so the
        // NAT treats it as any remote one.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        let dst = smoltcp::wire::Ipv4Address::new(127, 0, 0, 1);
        let syn = guest_tcp_frame(dst, &guest_syn(40100, port));
        s.receive_frame(&with_ttl(syn, 1));
        s.poll();
        let got = icmp_to_guest(&mut s);
        assert_eq!(got.len(), 1, "one ICMP error: {got:?}");
        assert_eq!(got[0].0, IpAddr::V4(cfg.gateway()), "from the gateway");
        assert_eq!(&got[0].1[0..2], &[11, 0], "time exceeded");
        assert_eq!(
            &got[0].1[8 + 20..8 + 24],
            &[&40100u16.to_be_bytes()[..], &port.to_be_bytes()].concat()[..],
            "quoting the SYN's ports"
        );
        assert_eq!(
            s.flows.count(super::super::flow::Proto::Tcp),
            0,
            "no connect"
        );
        let syn = guest_tcp_frame(dst, &guest_syn(40101, port));
        s.receive_frame(&with_ttl(syn, 5));
        s.poll();
        let ttls: Vec<i32> = s
            .flows
            .iter()
            .filter_map(|(_, f)| match &f.kind {
                Kind::Tcp(t) => Some(ttl_of(t.host.as_raw_fd())),
                _ => None,
            })
            .collect();
        assert_eq!(ttls, vec![4], "the host's SYN leaves one hop shorter");
        listener.accept().expect("the connect went on");
    }

    #[test]
    fn an_echo_request_on_its_last_hop_expires_at_the_gateway() {
        use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpProtocol};
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        let echo = Icmpv4Repr::EchoRequest {
            ident: 0x1234,
            seq_no: 3,
            data: b"ferry",
        };
        let far = smoltcp::wire::Ipv4Address::new(198, 51, 100, 7);
        let frame = super::super::hostile_frames::guest_ip_frame(
            far,
            IpProtocol::Icmp,
            echo.buffer_len(),
            |b, _| {
                echo.emit(&mut Icmpv4Packet::new_unchecked(b), &Default::default());
            },
        );
        s.receive_frame(&with_ttl(frame, 1));
        s.poll();
        let got = icmp_to_guest(&mut s);
        assert_eq!(got.len(), 1, "one ICMP error: {got:?}");
        assert_eq!(got[0].0, IpAddr::V4(cfg.gateway()));
        assert_eq!(&got[0].1[0..2], &[11, 0]);
        assert_eq!(
            &got[0].1[8 + 20..8 + 28][4..8],
            &[0x12, 0x34, 0, 3],
            "its id and sequence"
        );
    }

    #[test]
    fn a_last_hop_to_the_link_itself_goes_on_and_no_error_is_about_multicast() {
        use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpProtocol};
        let cfg = NetConfig::default();
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let port = server.local_addr().unwrap().port();
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        // TTL 1 to the host alias, which is on the link: delivered, not expired.
        let alias = smol(cfg.host_alias());
        let frame = super::super::hostile_frames::udp_frame_pub(alias, port, b"near");
        s.receive_frame(&with_ttl(frame, 1));
        let mut b = [0u8; 8];
        assert_eq!(server.recv(&mut b).unwrap(), 4);
        // TTL 1 to a multicast group and to the subnet's broadcast: no ICMP error about it.
        let echo = Icmpv4Repr::EchoRequest {
            ident: 1,
            seq_no: 1,
            data: b"all",
        };
        let group = smoltcp::wire::Ipv4Address::new(224, 0, 0, 1);
        let ping = super::super::hostile_frames::guest_ip_frame(
            group,
            IpProtocol::Icmp,
            echo.buffer_len(),
            |b, _| echo.emit(&mut Icmpv4Packet::new_unchecked(b), &Default::default()),
        );
        s.receive_frame(&with_ttl(ping, 1));
        let bcast = smol(cfg.subnet.broadcast());
        let frame = super::super::hostile_frames::udp_frame_pub(bcast, 9, b"all");
        s.receive_frame(&with_ttl(frame, 1));
        s.poll();
        let errors: Vec<_> = icmp_to_guest(&mut s)
            .into_iter()
            .filter(|(_, m)| m[0] == 11)
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
    }

    /// With IP_RECVERR, an ICMP error leaves the host socket a pending error that the next
    /// send returns instead of sending: the datagram must still go.
    #[test]
    fn a_datagram_after_an_icmp_error_is_not_lost() {
        let cfg = NetConfig::default();
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let mut s = NetStack::new(cfg.clone(), None).unwrap();
        s.neighbor_hint();
        let alias = smol(cfg.host_alias());
        let frame = super::super::hostile_frames::udp_frame_pub(alias, port, b"first");
        // Nothing listens yet: the host's port unreachable comes back on the flow's socket.
        s.receive_frame(&frame);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let server = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        s.receive_frame(&super::super::hostile_frames::udp_frame_pub(
            alias, port, b"again",
        ));
        let mut b = [0u8; 8];
        let n = server.recv(&mut b).expect("the second datagram arrives");
        assert_eq!(&b[..n], b"again");
        s.poll();
        let got = icmp_to_guest(&mut s);
        assert!(
            got.iter().any(|(_, m)| m[..2] == [3, 3]),
            "and the guest heard the first's error"
        );
    }
}
