//! The rules' verdicts on new flows: outbound on their first packet (answering the guest as
//! `reject` says), inbound for published ports' clients.

use super::*;

impl NetStack {
    /// What the rules say of a new flow of `proto` to `dst` whose first packet is `frame`:
    /// `Ok` with the counters its traffic adds to (None: no rules), or `Err` with the action
    /// that refused it, after answering the guest as that action says.
    pub(super) fn decide(
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
    pub(super) fn port_unreachable(&mut self, frame: &[u8]) {
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
