//! DNS on the gateway: names the plan owns are answered here, the rest forwarded to the
//! upstream with an id of ferry's, and the answer goes back unchanged but for it, from the
//! gateway address (IPv4 or IPv6) the guest asked.

use super::*;

/// Forwarded queries waiting at most.
pub(super) const MAX_DNS_PENDING: usize = 1024;

impl NetStack {
    /// A reply from the DNS upstream, back to the guest with its own id.
    /// Nothing listens at the upstream: every query waiting on it fails now, rather than after
    /// the guest's timeout. (The refusal comes back once, to whichever send or receive on the
    /// socket happens next, so it stands for all queries in flight.)
    pub(super) fn fail_pending_dns(&mut self) {
        let failed: Vec<_> = self.dns_pending.drain().map(|(_, v)| v).collect();
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        for (guest, gateway, query) in failed {
            if let Some(dns::Answer::Local(r)) = dns::answer(&self.cfg, &query, false) {
                let mut meta = udp::UdpMetadata::from(guest);
                meta.local_address = Some(gateway);
                let _ = socket.send_slice(&r, meta);
            }
        }
    }

    pub(super) fn dns_in(&mut self, buf: &mut [u8]) {
        loop {
            let Some(up) = &self.upstream else {
                return;
            };
            let (guest, gateway, reply) = match up.recv(buf) {
                Ok(n) if n >= 12 => {
                    let id = u16::from_be_bytes([buf[0], buf[1]]);
                    let Some((guest, gateway, query)) = self.dns_pending.remove(&id) else {
                        continue;
                    };
                    // The answer goes back unchanged but for the guest's own id.
                    buf[0..2].copy_from_slice(&query[0..2]);
                    (guest, gateway, buf[..n].to_vec())
                }
                Ok(_) => continue,
                // Nothing listens at the upstream: every query waiting on it fails now,
                // rather than after the guest's timeout.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.fail_pending_dns();
                    continue;
                }
                Err(_) => return,
            };
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
            let mut meta = udp::UdpMetadata::from(guest);
            meta.local_address = Some(gateway);
            if socket.send_slice(&reply, meta).is_ok() {
                self.stats.dns_replies += 1;
            }
        }
    }

    pub(super) fn serve_dns(&mut self) {
        let mut refused = false;
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        while let Ok((query, meta)) = socket.recv() {
            // The socket takes port 53 of every address the stack takes; only the gateway's
            // (either family) is the DNS server (the NAT took queries to others before).
            let Some(local) = meta
                .local_address
                .filter(|a| self.gateways.contains(&IpAddr::from(*a)))
            else {
                continue;
            };
            let reply = match dns::answer(&self.cfg, query, self.upstream.is_some()) {
                Some(dns::Answer::Local(reply)) => reply,
                Some(dns::Answer::Forward) => {
                    // Forward with an id of ours; the answer goes back unchanged but for it.
                    let addr = self.upstream_addr;
                    let sent = self.upstream.as_ref().and_then(|up| {
                        if self.dns_pending.len() >= MAX_DNS_PENDING {
                            self.dns_pending.clear();
                        }
                        let id = self.next_dns_id;
                        self.next_dns_id = self.next_dns_id.wrapping_add(1).max(1);
                        let mut q = query.to_vec();
                        q[0..2].copy_from_slice(&id.to_be_bytes());
                        up.send(&q)
                            .or_else(|_| {
                                // Unconnected: the upstream was unreachable at the start.
                                up.connect(addr.ok_or(io::ErrorKind::NotConnected)?)?;
                                up.send(&q)
                            })
                            .ok()?;
                        self.dns_pending
                            .insert(id, (meta.endpoint, local, query.to_vec()));
                        Some(())
                    });
                    if sent.is_some() {
                        continue;
                    }
                    refused = true;
                    // The upstream refused at once (nothing listens there): SERVFAIL now.
                    match dns::answer(&self.cfg, query, false) {
                        Some(dns::Answer::Local(reply)) => reply,
                        _ => continue,
                    }
                }
                None => continue,
            };
            let mut out = udp::UdpMetadata::from(meta.endpoint);
            out.local_address = Some(local);
            if socket.send_slice(&reply, out).is_ok() {
                self.stats.dns_replies += 1;
            }
        }
        if refused {
            self.fail_pending_dns();
        }
    }
}
