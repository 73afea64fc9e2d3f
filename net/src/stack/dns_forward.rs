//! DNS on the gateway: names the plan owns are answered here, then the host's (records set
//! through the API, the hosts file: `crate::names`), and the rest forwarded to the
//! upstream servers (`dns_upstream`) with an id of ferry's, and the answer goes back unchanged
//! but for it, from the gateway address (IPv4 or IPv6) the guest asked. A server that refuses
//! or stays silent for `dns_upstream::TIMEOUT` passes the query to the next; when none is
//! left, the guest gets SERVFAIL. Names of a split zone (`--dns-zone`) go to its server only.

use super::dns_upstream::TIMEOUT;
use super::*;

/// Forwarded queries waiting at most.
pub(super) const MAX_DNS_PENDING: usize = 1024;

/// A query forwarded upstream.
pub(super) struct Pending {
    /// The guest's endpoint and the gateway address it asked.
    guest: IpEndpoint,
    local: IpAddress,
    /// The query as sent upstream (ferry's id), and the guest's own id.
    query: Vec<u8>,
    guest_id: [u8; 2],
    /// The split-DNS zone whose server alone answers it, if any.
    zone: Option<usize>,
    /// Which server, counted from the preferred one, has it now; where; since when.
    tries: usize,
    server: SocketAddr,
    sent: StdInstant,
}

impl NetStack {
    /// Sends pending query `id` to the next server that takes it, from its `tries`th on; the
    /// guest gets SERVFAIL when none is left.
    fn dns_send(&mut self, id: u16, mut p: Pending) {
        if let Some(z) = p.zone {
            // A zone's names go to its server only: once, then SERVFAIL.
            let sent = if p.tries == 0 {
                self.upstreams.send_zone(z, &p.query, &self.epoll)
            } else {
                None
            };
            match sent {
                Some(server) => {
                    p.server = server;
                    p.sent = StdInstant::now();
                    self.dns_pending.insert(id, p);
                }
                None => self.dns_fail(p),
            }
            return;
        }
        while let Some(n) = (p.tries < self.upstreams.len()).then_some(p.tries) {
            if let Some(server) = self.upstreams.send(n, &p.query, &self.epoll) {
                p.server = server;
                p.sent = StdInstant::now();
                self.dns_pending.insert(id, p);
                return;
            }
            p.tries += 1;
        }
        self.dns_fail(p);
    }

    /// Answers a query no server answered with SERVFAIL.
    fn dns_fail(&mut self, p: Pending) {
        let mut q = p.query;
        q[0..2].copy_from_slice(&p.guest_id);
        if let Some(dns::Answer::Local(r)) = dns::answer(&self.cfg, &q, false) {
            self.dns_reply(p.guest, p.local, &r);
        }
    }

    fn dns_reply(&mut self, guest: IpEndpoint, local: IpAddress, reply: &[u8]) {
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        let mut meta = udp::UdpMetadata::from(guest);
        meta.local_address = Some(local);
        if socket.send_slice(reply, meta).is_ok() {
            self.stats.dns_replies += 1;
        }
    }

    /// Passes query `id` on to the next server.
    fn dns_failover(&mut self, id: u16) {
        if let Some(mut p) = self.dns_pending.remove(&id) {
            p.tries += 1;
            self.dns_send(id, p);
        }
    }

    /// What the servers sent: answers back to the guest with its own id, refusals passed on.
    pub(super) fn dns_in(&mut self, buf: &mut [u8]) {
        let mut got: Vec<(SocketAddr, Option<Vec<u8>>)> = Vec::new();
        self.upstreams
            .drain(buf, |from, data| got.push((from, data.map(|d| d.to_vec()))));
        for (from, data) in got {
            let Some(mut reply) = data else {
                // Nothing listens at `from`: its queries go to the next server now, rather than
                // after the guest's timeout.
                let ids: Vec<u16> = self
                    .dns_pending
                    .iter()
                    .filter(|(_, p)| p.server == from)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.dns_failover(id);
                }
                continue;
            };
            if reply.len() < 12 {
                continue;
            }
            let id = u16::from_be_bytes([reply[0], reply[1]]);
            // Only from the server the query went to: another one's (late) answer, or a
            // guess, is not taken.
            if self.dns_pending.get(&id).is_none_or(|p| p.server != from) {
                continue;
            }
            let Some(p) = self.dns_pending.remove(&id) else {
                continue;
            };
            self.upstreams.answered(from);
            // The answer goes back unchanged but for the guest's own id.
            reply[0..2].copy_from_slice(&p.guest_id);
            self.dns_reply(p.guest, p.local, &reply);
        }
    }

    /// Queries a server has left unanswered for too long go to the next one; the servers
    /// follow the host's resolv.conf.
    pub(super) fn dns_timers(&mut self) {
        if self.upstreams.follow(&self.epoll) {
            // The guest gets the new search domains with its next lease or advertisement.
            self.cfg.search = self.upstreams.search().to_vec();
        }
        if self.dns_pending.is_empty() {
            return;
        }
        let late: Vec<u16> = self
            .dns_pending
            .iter()
            .filter(|(_, p)| p.sent.elapsed() >= TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.dns_failover(id);
        }
    }

    /// How long until a forwarded query times out, if one waits.
    pub(super) fn dns_delay(&self) -> Option<std::time::Duration> {
        self.dns_pending
            .values()
            .map(|p| TIMEOUT.saturating_sub(p.sent.elapsed()))
            .min()
    }

    pub(super) fn serve_dns(&mut self) {
        loop {
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
            let Ok((query, meta)) = socket.recv() else {
                return;
            };
            // The socket takes port 53 of every address the stack takes; only the gateway's
            // (either family) is the DNS server (the NAT took queries to others before).
            let Some(local) = meta
                .local_address
                .filter(|a| self.gateways.contains(&IpAddr::from(*a)))
            else {
                continue;
            };
            let query = query.to_vec();
            let (names, cfg) = (&self.names, &self.cfg);
            let lookup = |n: &str| host_names(names.as_deref(), cfg, n);
            match dns::answer_with(cfg, &query, self.upstreams.any(), lookup) {
                Some(dns::Answer::Local(reply)) => self.dns_reply(meta.endpoint, local, &reply),
                Some(dns::Answer::Forward) => {
                    if self.dns_pending.len() >= MAX_DNS_PENDING {
                        self.dns_pending.clear();
                    }
                    // Forward with an id of ours; the answer goes back unchanged but for it.
                    let id = self.next_dns_id;
                    self.next_dns_id = self.next_dns_id.wrapping_add(1).max(1);
                    let mut q = query.clone();
                    q[0..2].copy_from_slice(&id.to_be_bytes());
                    let zone =
                        dns::parse_query(&query).and_then(|q| self.upstreams.zone_of(&q.name));
                    let p = Pending {
                        zone,
                        guest: meta.endpoint,
                        local,
                        query: q,
                        guest_id: [query[0], query[1]],
                        tries: 0,
                        server: SocketAddr::from(([0, 0, 0, 0], 0)),
                        sent: StdInstant::now(),
                    };
                    self.dns_send(id, p);
                }
                None => {}
            }
        }
    }

    /// Sends the names under each suffix of `zones` to its own server only (split DNS).
    pub fn with_dns_zones(mut self, zones: &[(String, SocketAddr)]) -> Self {
        for (suffix, server) in zones {
            self.upstreams.add_zone(suffix, *server, &self.epoll);
        }
        self
    }

    /// The DNS servers queries are forwarded to, the one asked first leading.
    pub fn dns_servers(&self) -> Vec<SocketAddr> {
        self.upstreams.in_use()
    }
}

/// The addresses the host's names (records set at run time, the hosts file) give `n`; the
/// host's loopback is the host alias to the guest.
pub(super) fn host_names(
    names: Option<&crate::names::Names>,
    cfg: &NetConfig,
    n: &str,
) -> Option<Vec<IpAddr>> {
    let addrs = names?.lookup(n)?;
    Some(
        addrs
            .into_iter()
            .map(|a| match a {
                IpAddr::V4(v) if v.is_loopback() => IpAddr::V4(cfg.host_alias()),
                IpAddr::V6(v) if v.is_loopback() => IpAddr::V6(cfg.host_alias6()),
                a => a,
            })
            .collect(),
    )
}
