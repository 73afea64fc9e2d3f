//! Published ports: what the `ports` thread accepted and received, handed to TCP and UDP with
//! the client's address as the guest will see it.

use super::*;

impl NetStack {
    /// The address a published port's client has in the guest: its own when it is remote,
    /// the host alias when it is this host (loopback) or not IPv4.
    pub(super) fn seen_addr(&self, client: SocketAddr) -> std::net::Ipv4Addr {
        let v4 = match client.ip() {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(a) => a.to_ipv4_mapped(),
        };
        match v4 {
            Some(a) if !a.is_loopback() && !a.is_unspecified() => a,
            _ => self.cfg.host_alias(),
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
                    match self.decide_in(Proto::Tcp, client, host_port, 0) {
                        Ok(counters) => self.publish_tcp(stream, client, guest_port, counters),
                        Err(Action::Reject) => crate::ports::reset(stream),
                        // Dropped: closed without a word.
                        Err(_) => drop(stream),
                    }
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
