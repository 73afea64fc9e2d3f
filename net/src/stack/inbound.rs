//! Published ports and forwarded sockets: what the `ports` thread accepted and received,
//! handed to TCP and UDP with the client's address as the guest will see it.

use super::flow::Origin;
use super::*;

impl NetStack {
    /// The address a published port's client has in the guest: its own when it is remote
    /// (an IPv6 client keeps its IPv6 address when the guest has IPv6), the host alias of its
    /// family when it is this host (loopback), and the IPv4 host alias when the guest has not
    /// shown it has IPv6.
    pub(super) fn seen_addr(&self, client: SocketAddr) -> IpAddr {
        let alias = IpAddr::V4(self.cfg.host_alias());
        match client.ip() {
            IpAddr::V4(a) if a.is_loopback() || a.is_unspecified() => alias,
            IpAddr::V4(a) => IpAddr::V4(a),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) if v4.is_loopback() || v4.is_unspecified() => alias,
                Some(v4) => IpAddr::V4(v4),
                // A guest that has not spoken IPv6 may have it off: it would reset the client.
                None if !self.spoke_ipv6 || self.guest.ip6().is_none() => alias,
                None if a.is_loopback() || a.is_unspecified() => IpAddr::V6(self.cfg.host_alias6()),
                // A link-local client cannot be told apart from the guest's own neighbours.
                None if (a.segments()[0] & 0xffc0) == 0xfe80 => IpAddr::V6(self.cfg.host_alias6()),
                None => IpAddr::V6(a),
            },
        }
    }

    /// Connections and datagrams from published ports, to the guest.
    pub(super) fn publish_in(&mut self) {
        let Some(ports) = &self.ports else {
            return;
        };
        let mut incoming = std::mem::take(&mut self.incoming);
        ports.take_incoming(&mut incoming);
        for item in incoming.drain(..) {
            match item {
                Incoming::Tcp {
                    stream,
                    client,
                    host_port,
                    guest_port,
                } => {
                    let stream = HostStream::Tcp(stream);
                    match self.decide_in(Proto::Tcp, client, host_port, 0) {
                        Ok(counters) => self.publish_tcp(
                            stream,
                            client,
                            guest_port,
                            counters,
                            Origin::Published,
                        ),
                        Err(Action::Reject) => stream.reset(),
                        // Dropped: closed without a word.
                        Err(_) => drop(stream),
                    }
                }
                Incoming::Unix { stream, guest_port } => {
                    // A client of a forwarded socket: a local user the socket's permissions
                    // let in, so no inbound rule applies. The guest sees it come from the
                    // host alias, as a client on the host's loopback; its port is only a name
                    // for the flow (another is picked if it is taken).
                    let port = 49152 + (stream.as_raw_fd() as u16 % 16384);
                    let client = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port);
                    self.publish_tcp(
                        HostStream::Unix(stream),
                        client,
                        guest_port,
                        None,
                        Origin::Socket,
                    );
                }
                Incoming::Udp {
                    socket,
                    client,
                    host_port,
                    guest_port,
                    data,
                } => {
                    self.publish_udp_in(socket, client, host_port, guest_port, &data);
                    if let Some(p) = &self.ports {
                        p.recycle(data);
                    }
                }
            }
        }
        self.incoming = incoming;
    }
}
