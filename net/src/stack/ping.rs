//! ICMP echo to other hosts, IPv4 and IPv6: out through unprivileged ping sockets with their
//! TTL less one, and only real replies come back (the stack never answers for an address it
//! does not own), or the ICMP errors the requests met on the way (`path_errors`).

use super::flow::{Flow, FlowId, FlowKey, Origin, Proto as FlowProto};
use super::*;

/// How long a ping flow lives without an echo.
pub(super) const PING_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Ping flows open at most; past it, the one idle longest goes.
const MAX_PING_FLOWS: usize = 256;

impl NetStack {
    /// An echo request to an outside address goes out through a ping socket, never to the
    /// stack (which would answer it itself: a fake reply). Returns whether it took the frame.
    pub(super) fn ping_out(&mut self, frame: &[u8], ip: &IpInfo, payload: &[u8]) -> bool {
        use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpProtocol};
        let ident = match ip.proto {
            IpProtocol::Icmp => {
                if self.is_gateway(ip.dst)
                    || self.is_host_alias(ip.dst)
                    || self.is_forward_addr(ip.dst)
                {
                    return false;
                }
                let Ok(icmp) = Icmpv4Packet::new_checked(payload) else {
                    return true;
                };
                if icmp.msg_type() != Icmpv4Message::EchoRequest
                    || !icmp.verify_checksum()
                    || !self.leaves_link(ip.dst)
                {
                    // Other ICMP to the outside has nowhere to go, nor has an echo request
                    // to a broadcast or multicast address; drop it here.
                    return true;
                }
                icmp.echo_ident()
            }
            IpProtocol::Icmpv6 => {
                let Ok(icmp) = Icmpv6Packet::new_checked(payload) else {
                    return false;
                };
                // Neighbour discovery, router solicitations, the guest's errors: the link's,
                // and only echo requests to other hosts are the NAT's.
                if icmp.msg_type() != Icmpv6Message::EchoRequest
                    || self.is_gateway(ip.dst)
                    || self.is_host_alias(ip.dst)
                    || self.is_forward_addr(ip.dst)
                    || ip.dst.is_multicast()
                {
                    return false;
                }
                if !is_unicast_v6(ip.dst) {
                    // Another link-local address: nobody else is on this link, and the stack
                    // must not answer for it.
                    return true;
                }
                if !icmp.verify_checksum(&v6(ip.src), &v6(ip.dst)) {
                    return true;
                }
                icmp.echo_ident()
            }
            _ => return false,
        };
        let Some(hops) = self.hops_or_expire(frame, ip) else {
            return true;
        };
        // Every echo request is checked: a ping flow is a request and its reply.
        match self.decide(Proto::Icmp, SocketAddr::new(ip.dst, 0), frame, ip) {
            Ok(Some(c)) => c.add_bytes(payload.len()),
            Ok(None) => {}
            Err(_) => return true,
        }
        let key = FlowKey {
            proto: FlowProto::Ping,
            guest: ip.src,
            guest_port: ident,
            remote: SocketAddr::new(ip.dst, 0),
        };
        let id = match self.flows.lookup(&key) {
            Some(id) => id,
            None => match self.ping_open(key) {
                Ok(id) => id,
                Err(e) => {
                    // No route from the host: the gateway says so, as for UDP and TCP.
                    if self.no_route_from_gateway(frame, ip, &e) {
                        return true;
                    }
                    if !self.ping_warned {
                        self.ping_warned = true;
                        log::warn!(
                            "net: cannot ping {} for the guest ({e}); allow ping sockets with sysctl net.ipv4.ping_group_range, or the guest's pings go unanswered",
                            ip.dst
                        );
                    }
                    return true;
                }
            },
        };
        self.send_on_flow(id, payload, hops);
        true
    }

    fn ping_open(&mut self, key: FlowKey) -> io::Result<FlowId> {
        if self.flows.count(FlowProto::Ping) >= MAX_PING_FLOWS {
            let oldest = self
                .flows
                .iter()
                .filter(|(_, f)| matches!(f.kind, Kind::Ping { .. }))
                .min_by_key(|(_, f)| f.last)
                .map(|(id, _)| id);
            if let Some(id) = oldest {
                self.ping_close(id, "evicted");
            }
        }
        let socket = sys::ping_socket(key.remote.ip())?;
        let id = self.flows.next_id();
        self.epoll.ctl(
            ControlOperation::Add,
            socket.as_raw_fd(),
            EpollEvent::new(EventSet::IN, Token::Flow(id).to_u64()),
        )?;
        self.flows.insert(Flow::new(
            key,
            key.remote,
            Origin::Outbound,
            Kind::Ping { socket, ttl: 0 },
        ));
        self.audit_open(id);
        Ok(id)
    }

    pub(super) fn ping_close(&mut self, id: FlowId, reason: &'static str) {
        if let Some(f) = self.flows.remove(id) {
            self.audit_close(&f, reason);
            if let Kind::Ping { socket, .. } = &f.kind {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    socket.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }

    /// Closes ping flows idle for [`PING_IDLE`].
    pub(super) fn ping_expire(&mut self) {
        let mut ids = std::mem::take(&mut self.pump_ids);
        self.flows.select(&mut ids, |f| {
            matches!(f.kind, Kind::Ping { .. }) && f.last.elapsed() >= PING_IDLE
        });
        for id in &ids {
            self.ping_close(*id, "idle");
        }
        self.pump_ids = ids;
    }

    /// A reply on a ping socket: back to the guest from the host that sent it, with the guest's
    /// own identifier.
    pub(super) fn ping_in(&mut self, id: FlowId, buf: &mut [u8]) {
        use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpProtocol};
        loop {
            let Some(f) = self.flows.get_mut(id) else {
                return;
            };
            let Kind::Ping { socket, .. } = &f.kind else {
                return;
            };
            let Ok(n) = sys::recv(socket.as_raw_fd(), buf) else {
                return;
            };
            f.count_to_guest(n);
            let (remote, guest, ident) = (f.key.remote.ip(), f.key.guest, f.key.guest_port);
            let msg = &mut buf[..n];
            let proto = if remote.is_ipv4() {
                let Ok(mut icmp) = Icmpv4Packet::new_checked(&mut msg[..]) else {
                    continue;
                };
                if icmp.msg_type() != Icmpv4Message::EchoReply {
                    continue;
                }
                icmp.set_echo_ident(ident);
                icmp.fill_checksum();
                IpProtocol::Icmp
            } else {
                let Ok(mut icmp) = Icmpv6Packet::new_checked(&mut msg[..]) else {
                    continue;
                };
                if icmp.msg_type() != Icmpv6Message::EchoReply {
                    continue;
                }
                icmp.set_echo_ident(ident);
                icmp.fill_checksum(&v6(remote), &v6(guest));
                IpProtocol::Icmpv6
            };
            if self.device.tx.len() < QUEUE_FRAMES {
                let msg = &buf[..n];
                self.emit_ip(remote, guest, proto, n, |p| p.copy_from_slice(msg));
            }
        }
    }
}

/// Whether `a` is an IPv6 unicast address outside the link (no multicast, no link-local).
fn is_unicast_v6(a: std::net::IpAddr) -> bool {
    match a {
        std::net::IpAddr::V6(a) => {
            !a.is_multicast() && !a.is_unspecified() && (a.segments()[0] & 0xffc0) != 0xfe80
        }
        std::net::IpAddr::V4(_) => false,
    }
}
