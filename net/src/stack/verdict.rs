//! The rules' verdicts on new flows: outbound on their first packet (answering the guest as
//! `reject` says, in either family), inbound for published ports' clients.

use super::*;

impl NetStack {
    /// What the rules say of a new flow of `proto` to `dst` whose first packet is `frame`:
    /// `Ok` with the counters its traffic adds to (None: no rules), or `Err` with the action
    /// that refused it, after answering the guest as that action says.
    pub(super) fn decide(
        &mut self,
        proto: Proto,
        dst: SocketAddr,
        frame: &[u8],
        ip: &IpInfo,
    ) -> Result<Option<Arc<Counters>>, Action> {
        let Some(rules) = &self.rules else {
            return Ok(None);
        };
        let v = rules.check(proto, dst, ip.len);
        if v.action != Action::Allow {
            let guest = SocketAddr::new(ip.src, super::audit::guest_port(ip, frame));
            self.audit_refused(proto, "out", guest, dst, v.action, v.rule.map(|(n, _)| n));
        }
        match v.action {
            Action::Allow => Ok(Some(v.counters)),
            Action::Reject if proto != Proto::Tcp => {
                self.port_unreachable(frame, ip);
                Err(Action::Reject)
            }
            refused => Err(refused),
        }
    }

    /// Answers a guest packet with a port unreachable error from its destination, as
    /// `iptables -j REJECT` does: ICMP quoting its header and first 8 bytes (RFC 792), or
    /// ICMPv6 quoting as much as fits the minimum IPv6 MTU (RFC 4443).
    pub(super) fn port_unreachable(&mut self, frame: &[u8], ip: &IpInfo) {
        use smoltcp::wire::{Icmpv4Packet, Icmpv6Packet, IpProtocol};
        if self.device.tx.len() >= QUEUE_FRAMES {
            return;
        }
        // The caller parsed the header: the packet is in the frame.
        let Some(packet) = frame.get(14..14 + ip.len) else {
            return;
        };
        match ip.dst {
            IpAddr::V4(_) => {
                let header = usize::from(packet[0] & 0x0f) * 4;
                let quote = &packet[..(header + 8).min(packet.len())];
                self.emit_ip(ip.dst, ip.src, IpProtocol::Icmp, 8 + quote.len(), |p| {
                    p[..8].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
                    p[8..].copy_from_slice(quote);
                    Icmpv4Packet::new_unchecked(p).fill_checksum();
                });
            }
            IpAddr::V6(_) => {
                // 1280 bytes at most: the IPv6 header (40) and the ICMPv6 header (8) first.
                let quote = &packet[..packet.len().min(1280 - 48)];
                let (src, dst) = (ip.dst, ip.src);
                self.emit_ip(src, dst, IpProtocol::Icmpv6, 8 + quote.len(), |p| {
                    // Destination unreachable, code 4: port unreachable.
                    p[..8].copy_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
                    p[8..].copy_from_slice(quote);
                    Icmpv6Packet::new_unchecked(p).fill_checksum(&v6(src), &v6(dst));
                });
            }
        }
    }

    /// What the inbound rules say of a client at `client` of published host port
    /// `host_port` (a connection, or a datagram of `len` bytes): `Ok` with the counters its
    /// traffic adds to (None: no rules), or `Err` with the action that refused it.
    pub(super) fn decide_in(
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
                self.audit_refused(
                    proto,
                    "in",
                    client,
                    SocketAddr::new(client.ip(), host_port),
                    refused,
                    v.rule.as_ref().map(|(n, _)| *n),
                );
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
}
