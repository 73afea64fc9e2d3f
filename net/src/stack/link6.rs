//! The IPv6 link's own services: router advertisements and stateless DHCPv6, answered here
//! before smoltcp sees the frames (smoltcp answers neighbour solicitations itself).
//!
//! Theory of operation. A guest brings IPv6 up by soliciting a router: the answer
//! (`crate::ndp`) gives it the /64 to build its address in (SLAAC), the gateway's link-local
//! address as its default router, the MTU and the DNS server (RDNSS), and says "other
//! configuration" is on DHCPv6, where `crate::dhcpv6` answers information requests with the
//! DNS server and the search list. Router advertisements also go out unsolicited, once when
//! the guest first speaks IPv6 and then every `RA_INTERVAL`, well inside the router lifetime, so a
//! guest whose ferry restarted keeps its default route. Router advertisements and redirects
//! *from* the guest are dropped: nobody on this link is a router but ferry.

use super::*;

/// How often an unsolicited router advertisement goes out (RFC 4861's MaxRtrAdvInterval
/// default is 600 s; the advertised router lifetime is 1800 s).
const RA_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

use crate::ndp::ALL_NODES;

impl NetStack {
    /// ICMPv6 the link answers itself: router solicitations (answered), router
    /// advertisements and redirects from the guest (dropped), Packet Too Big from a guest
    /// that routes (kept, `guest_paths`). Returns whether it took it.
    pub(super) fn link6_icmp(&mut self, ip: &IpInfo, payload: &[u8]) -> bool {
        const ROUTER_SOLICIT: u8 = 133;
        const ROUTER_ADVERT: u8 = 134;
        const REDIRECT: u8 = 137;
        if self.cfg.subnet6.is_none() {
            return false;
        }
        match payload.first() {
            Some(&ROUTER_SOLICIT) => {
                if ip.hop_limit == 255 {
                    // From the unspecified address (no address yet): to all nodes.
                    let to = match ip.src {
                        IpAddr::V6(a) if !a.is_unspecified() => a,
                        _ => ALL_NODES,
                    };
                    self.send_router_advert(to);
                }
                true
            }
            Some(&ROUTER_ADVERT) | Some(&REDIRECT) => true,
            // A packet the stack sent that the guest could not route on (`guest_paths`).
            _ => self.device.paths.learn(payload),
        }
    }

    /// DHCPv6 to the link's servers: answered from the gateway's link-local address. Returns
    /// whether it took it.
    pub(super) fn link6_udp(&mut self, ip: &IpInfo, payload: &[u8]) -> bool {
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (ip.src, ip.dst) else {
            return false;
        };
        if self.cfg.subnet6.is_none() || payload.len() < 8 {
            return false;
        }
        let dst_port = u16::from_be_bytes([payload[2], payload[3]]);
        if dst_port != crate::dhcpv6::SERVER_PORT
            || !(dst == crate::dhcpv6::ALL_SERVERS || dst == self.cfg.gateway_ll())
        {
            return false;
        }
        let src_port = u16::from_be_bytes([payload[0], payload[1]]);
        let len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
        let Some(body) = payload.get(8..len.max(8)) else {
            return true;
        };
        let Some(answer) = crate::dhcpv6::reply(&self.cfg, body) else {
            return true;
        };
        use smoltcp::wire::{IpProtocol, UdpPacket, UdpRepr};
        let udp = UdpRepr {
            src_port: crate::dhcpv6::SERVER_PORT,
            dst_port: src_port,
        };
        let from = IpAddr::V6(self.cfg.gateway_ll());
        let (s, d) = (IpAddress::from(from), IpAddress::Ipv6(src));
        self.emit_ip(
            from,
            IpAddr::V6(src),
            IpProtocol::Udp,
            udp.header_len() + answer.len(),
            |b| {
                udp.emit(
                    &mut UdpPacket::new_unchecked(b),
                    &s,
                    &d,
                    answer.len(),
                    |p| p.copy_from_slice(&answer),
                    // The checksum is always filled: the guest's DHCPv6 client reads it
                    // from a raw or packet socket, which no offload covers.
                    &Default::default(),
                );
            },
        );
        true
    }

    /// Sends a router advertisement to `to` (the guest's MAC either way).
    fn send_router_advert(&mut self, to: std::net::Ipv6Addr) {
        if self.device.tx.len() >= QUEUE_FRAMES {
            return;
        }
        let mac = if to.is_multicast() {
            crate::ndp::multicast_mac(to)
        } else {
            self.guest.mac()
        };
        let frame = crate::ndp::router_advert(&self.cfg, mac, to);
        self.device.outbox().push(Frame::from(frame));
        self.last_ra = Some(StdInstant::now());
    }

    /// Unsolicited router advertisements: once the guest has spoken IPv6 (a guest with IPv6
    /// off hears none), then every [`RA_INTERVAL`].
    pub(super) fn advertise_router(&mut self) {
        if self.cfg.subnet6.is_none() || !self.spoke_ipv6 {
            return;
        }
        if self.last_ra.is_none_or(|t| t.elapsed() >= RA_INTERVAL) {
            self.send_router_advert(ALL_NODES);
        }
    }
}
