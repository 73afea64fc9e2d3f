//! ICMP echo to other hosts: out through unprivileged ping sockets, and only real replies come
//! back (the stack never answers for an address it does not own).

use super::*;

impl NetStack {
    /// An echo request to an outside address goes out through a ping socket, never to the
    /// stack (which would answer it itself: a fake reply). Returns whether it took the frame.
    pub(super) fn ping_out(&mut self, frame: &[u8]) -> bool {
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
    pub(super) fn ping_in(&mut self, token: u64, buf: &mut [u8]) {
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
}
