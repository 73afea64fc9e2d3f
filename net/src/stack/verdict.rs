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
                // The caller parsed the header: the packet is in the frame.
                if let Some(packet) = frame.get(14..14 + ip.len) {
                    self.unreachable(packet, ip.src, ip.dst, Unreachable::Port);
                }
                Err(Action::Reject)
            }
            refused => Err(refused),
        }
    }

    /// Answers `packet`, an IP packet the guest sent from `guest` to `to`, with a destination
    /// unreachable error (`why`) from `to`, as `iptables -j REJECT` does for a port.
    pub(super) fn unreachable(
        &mut self,
        packet: &[u8],
        guest: IpAddr,
        to: IpAddr,
        why: Unreachable,
    ) {
        let e = super::path_errors::IcmpError::unreachable(to.is_ipv6(), why);
        self.icmp_error(packet, guest, to, e);
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

/// Why a destination is unreachable, in the codes of ICMP's type 3 and ICMPv6's type 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unreachable {
    /// No route to the network (ENETUNREACH).
    Net,
    /// The host did not answer its neighbour discovery (EHOSTUNREACH).
    Host,
    /// Nothing listens on the port (ECONNREFUSED, or a `reject` rule).
    Port,
}

impl Unreachable {
    /// What the host's socket said, if it is one of these.
    pub(super) fn of(e: &std::io::Error) -> Option<Self> {
        match e.kind() {
            std::io::ErrorKind::NetworkUnreachable => Some(Unreachable::Net),
            std::io::ErrorKind::HostUnreachable => Some(Unreachable::Host),
            std::io::ErrorKind::ConnectionRefused => Some(Unreachable::Port),
            _ => None,
        }
    }

    pub(super) fn code4(self) -> u8 {
        match self {
            Unreachable::Net => 0,
            Unreachable::Host => 1,
            Unreachable::Port => 3,
        }
    }

    /// ICMPv6: no route, address unreachable, port unreachable.
    pub(super) fn code6(self) -> u8 {
        match self {
            Unreachable::Net => 0,
            Unreachable::Host => 3,
            Unreachable::Port => 4,
        }
    }
}
