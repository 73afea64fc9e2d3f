//! TCP, both directions: the guest's SYNs become host connects (SYN-ACK only once the connect
//! succeeds; a failed one answered as the host's error says: RST, ICMP unreachable or, for a
//! timeout, nothing), published ports' clients become connections to the guest (at most
//! `MAX_HANDSHAKES` at once), and `pump` moves data between each flow's stack socket and host
//! socket with backpressure both ways, and closes them. Either address family: a flow's ends
//! are whatever the guest addressed (the host's loopback stands in for the host alias).

use super::flow::{Flow, FlowId, FlowKey, Origin, Proto as FlowProto};
use super::sys::{connect_nonblocking, connect_nonblocking_as_router, peek_eof, take_error};
use super::tcp_host::{adopt, HostStream, TcpFlow, TcpState, MAX_HANDSHAKES};
use super::verdict::Unreachable;
use super::*;
use crate::guest_forward::ForwardTarget;
use crate::proxy::handoff::Handoff;

/// How long the guest has to answer a published connection's SYN.
pub(super) const PUBLISH_CONNECT_TIMEOUT: smoltcp::time::Duration =
    smoltcp::time::Duration::from_secs(10);

/// How long the guest may stay silent while ferry waits for it to acknowledge the FIN that
/// follows everything else the host side sent: then the guest's connection is reset and the
/// host socket goes. A guest that drops it (its accept queue overflowed, it hung, it left)
/// would otherwise hold a host descriptor for minutes of retransmissions; one that answers
/// keeps its side open as long as it likes.
pub(super) const FIN_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(3);

/// Send buffer of each NAT'd TCP connection (host to guest): what the guest has not yet
/// acknowledged. Under TCG the guest's round trip is milliseconds long, and 256 KiB held
/// host-to-guest TCP to a third of what 4 MiB allows. The memory is virtual until used
/// (ferry's allocator maps buffers this size on demand), so an idle or short connection costs
/// a few pages.
pub(super) const TCP_TX_BUFFER: usize = 4096 * 1024;

/// Receive buffer of each NAT'd TCP connection (guest to host): the window the guest sees.
/// `pump` drains it into the host socket at each wake-up, so it rarely holds much; but smoltcp
/// writes each segment at the next place in the ring, and a 4 MiB ring cycles through more
/// than a core's L2 cache (2 MiB on the machine measured): the copy of every guest segment
/// into it missed the cache. 1 MiB costs guest-to-host TCP 15% less CPU per byte at the same
/// throughput (docs/performance.md, 2026-12-07).
pub(super) const TCP_RX_BUFFER: usize = 1024 * 1024;

fn tcp_socket() -> smoltcp::socket::tcp::Socket<'static> {
    use smoltcp::socket::tcp;
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_RX_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_TX_BUFFER]),
    );
    socket.set_ack_delay(None);
    socket
}

/// The TCP part of flow `id` of `flows`, if it is a TCP flow.
fn tcp_of(flows: &mut Flows, id: FlowId) -> Option<&mut Flow<Kind>> {
    flows.get_mut(id).filter(|f| matches!(f.kind, Kind::Tcp(_)))
}

impl NetStack {
    /// Forgets TCP flow `id`: its host socket closes (and is returned, for a reset), its
    /// handshake slot frees.
    pub(super) fn tcp_remove(&mut self, id: FlowId, reason: &'static str) -> Option<HostStream> {
        let f = self.flows.remove(id)?;
        self.audit_close(&f, reason);
        let Kind::Tcp(mut t) = f.kind else {
            return None;
        };
        t.unwatch(&self.epoll);
        if t.handshaking {
            self.tcp_limits.handshaking -= 1;
        }
        Some(t.host)
    }

    /// A client connected to a published TCP port: the stack connects to the guest from the
    /// client's address, and the flow splices the two once the guest accepts. A guest that
    /// does not listen answers RST, and the client is reset too. `counters` are those of the
    /// rule that let it in.
    pub(super) fn publish_tcp(
        &mut self,
        stream: HostStream,
        client: SocketAddr,
        guest_port: u16,
        counters: Option<Arc<Counters>>,
        origin: Origin,
    ) {
        let seen = self.seen_addr(client);
        // A guest with no address of the client's family: nothing to connect to.
        let Some(guest) = self.guest_addr_for(seen) else {
            stream.reset();
            return;
        };
        let mut key = FlowKey {
            proto: FlowProto::Tcp,
            guest,
            guest_port,
            remote: SocketAddr::new(seen, client.port()),
        };
        // Two clients that look alike to the guest (loopback clients of one port from
        // different addresses): the later one gets another source port.
        let mut tries = 0u16;
        while self.flows.lookup(&key).is_some() && tries < 1024 {
            let port = 49152 + (client.port().wrapping_add(tries.wrapping_mul(7919)) % 16384);
            key.remote.set_port(port);
            tries += 1;
        }
        if self.flows.lookup(&key).is_some()
            || self.flows.count(FlowProto::Tcp) >= self.tcp_limits.max_flows
        {
            stream.reset();
            return;
        }
        let handle = if self.tcp_limits.handshaking < MAX_HANDSHAKES {
            match self.connect_to_guest(key) {
                Some(h) => Some(h),
                None => {
                    stream.reset();
                    return;
                }
            }
        } else {
            None
        };
        let state = match handle {
            Some(handle) => TcpState::Open {
                handle,
                host_eof: false,
                guest_eof: false,
            },
            None => TcpState::Queued,
        };
        // Its end is watched until the guest accepts; then its data.
        let id = self.flows.next_id();
        let mut t = match TcpFlow::watched(stream, state, EventSet::READ_HANG_UP, id, &self.epoll) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("ports: cannot watch a connection from {client}: {e}");
                if let Some(h) = handle {
                    self.sockets.remove(h);
                }
                return;
            }
        };
        t.handshaking = handle.is_some();
        let mut flow = Flow::new(key, client, origin, Kind::Tcp(t));
        flow.counters = counters;
        if let Some(id) = self.flows.insert(flow) {
            self.audit_open(id);
        }
        match handle {
            Some(_) => self.tcp_limits.handshaking += 1,
            None => self.tcp_limits.queued.push_back(id),
        }
        self.stats.published_connections += 1;
    }

    /// A stack socket connecting to the guest's `key.guest:key.guest_port` from `key.remote`
    /// (the published client as the guest sees it); None when smoltcp refuses the endpoints.
    pub(super) fn connect_to_guest(&mut self, key: FlowKey) -> Option<SocketHandle> {
        let mut socket = tcp_socket();
        socket.set_timeout(Some(PUBLISH_CONNECT_TIMEOUT));
        let remote = IpEndpoint::new(key.guest.into(), key.guest_port);
        socket
            .connect(self.iface.context(), remote, IpEndpoint::from(key.remote))
            .ok()?;
        Some(self.sockets.add(socket))
    }

    /// Connects queued published clients to the guest, oldest first, while fewer than
    /// [`MAX_HANDSHAKES`] wait for the guest's answer.
    pub(super) fn dequeue_published(&mut self) {
        while self.tcp_limits.handshaking < MAX_HANDSHAKES {
            let Some(id) = self.tcp_limits.queued.pop_front() else {
                return;
            };
            let Some(key) = self.flows.get(id).map(|f| f.key) else {
                continue; // it left while it waited
            };
            let Some(handle) = self.connect_to_guest(key) else {
                if let Some(host) = self.tcp_remove(id, "error") {
                    host.reset();
                }
                continue;
            };
            if let Some(Kind::Tcp(t)) = self.flows.get_mut(id).map(|f| &mut f.kind) {
                t.state = TcpState::Open {
                    handle,
                    host_eof: false,
                    guest_eof: false,
                };
                t.handshaking = true;
                self.tcp_limits.handshaking += 1;
            }
        }
    }

    /// A segment the guest sent: counted against its flow (every segment, as conntrack
    /// counts packets); a SYN to an outside address opens a flow and is held while ferry
    /// connects on the host. Returns whether it took the frame (else smoltcp has it).
    pub(super) fn tcp_in(&mut self, frame: &[u8], ip: &IpInfo, payload: &[u8]) -> bool {
        use smoltcp::wire::TcpPacket;
        let Ok(t) = TcpPacket::new_checked(payload) else {
            return false;
        };
        let syn = t.syn() && !t.ack();
        let key = FlowKey {
            proto: FlowProto::Tcp,
            guest: ip.src,
            guest_port: t.src_port(),
            remote: SocketAddr::new(ip.dst, t.dst_port()),
        };
        if let Some(f) = self
            .flows
            .lookup(&key)
            .and_then(|id| self.flows.get_mut(id))
        {
            f.from_guest.packets += 1;
            // A retransmitted SYN while the host connect runs: the first one is held.
            return syn
                && matches!(
                    f.kind,
                    Kind::Tcp(TcpFlow {
                        state: TcpState::Connecting { .. },
                        ..
                    })
                );
        }
        if !syn {
            return false;
        }
        let mut target = None;
        let mut proxy = None;
        let mut intercepted = None;
        let mut counters = None;
        let mut unix = None;
        let mut handoff = None;
        let mut dns_tcp = None;
        let mut origin = Origin::Outbound;
        // The TTL the host's SYN leaves with, for the guest's own destinations.
        let mut hops = None;
        if self.is_forward_addr(ip.dst) {
            origin = Origin::Forward;
            // A guest forward: its target, not the address; other ports meet no listener.
            match self
                .cfg
                .guest_forwards
                .iter()
                .find(|f| f.addr == key.remote)
            {
                Some(f) => match &f.target {
                    ForwardTarget::Tcp(a) => target = Some(*a),
                    ForwardTarget::Unix(p) => unix = Some(p.clone()),
                },
                None => return false,
            }
        } else if self.is_gateway(ip.dst) {
            // The gateway's TCP services: DNS, answered as over UDP (`dns_tcp`), and the HTTP
            // proxy, served in this process. They are not outbound flows: the proxy checks
            // the rules for the servers it connects to.
            match (t.dst_port(), &self.proxy) {
                (dns::PORT, _) => {
                    dns_tcp = Some(super::dns_tcp::Resolver {
                        cfg: self.cfg.clone(),
                        names: self.names.clone(),
                        zones: self.upstreams.zones(),
                        preferred: self.upstreams.preferred(),
                    });
                    origin = Origin::Dns;
                }
                (crate::proxy::PORT, Some(p)) => {
                    proxy = Some(p.clone());
                    origin = Origin::Proxy;
                }
                _ => return false,
            }
        } else {
            match self.decide(Proto::Tcp, key.remote, frame, ip) {
                Ok(c) => counters = c,
                // No listener meets the SYN: the stack answers RST.
                Err(Action::Reject) => return false,
                Err(_) => return true,
            }
            // The gateway is a hop, for TCP as for UDP and ICMP (`path_errors`): a SYN on its
            // last one expires here (tcptraceroute), any other leaves one hop shorter.
            let Some(h) = self.hops_or_expire(frame, ip) else {
                return true;
            };
            hops = Some(h);
            // Transparent mode: web traffic the rules let out goes through the proxy's
            // logic (and so the host's upstream proxy), not straight out. The host alias
            // is the host's own, and stays direct.
            if let Some(p) = self.proxy.as_ref().filter(|p| p.intercepts(t.dst_port())) {
                if self.host_target(key.remote) == key.remote {
                    proxy = Some(p.clone());
                    intercepted = Some(key.remote);
                    origin = Origin::Proxy;
                }
            }
        }
        if self.flows.count(FlowProto::Tcp) >= self.tcp_limits.max_flows {
            if !self.tcp_limits.cap_logged {
                self.tcp_limits.cap_logged = true;
                log::warn!(
                    "net: {} TCP connections are open, the most allowed; refusing new ones with RST (raise it with --max-connections)",
                    self.tcp_limits.max_flows
                );
            }
            return false;
        }
        // Where the host socket really connects: the given target (DNS over TCP goes to the
        // upstream), the host's loopback for the host alias, or the guest's destination.
        let target = target.unwrap_or_else(|| self.host_target(key.remote));
        let connected = match (&unix, proxy, dns_tcp) {
            // A UNIX connect ends at once (made, refused or the backlog full), and so does
            // the proxy's or the DNS server's socket pair: the flow still waits for EPOLLOUT,
            // which a connected socket reports straight away.
            (Some(path), _, _) => super::sys::connect_unix_nonblocking(path).map(HostStream::Unix),
            (None, Some(p), _) => {
                let slot = Arc::new(Handoff::default());
                handoff = Some(slot.clone());
                p.accept(intercepted, Some(slot)).map(HostStream::Unix)
            }
            (None, None, Some(resolver)) => super::dns_tcp::accept(resolver).map(HostStream::Unix),
            (None, None, None) => {
                // Not for the host alias: the host's loopback is no hop away.
                let hops = hops.filter(|_| target == key.remote);
                connect_nonblocking_as_router(target, hops).map(HostStream::Tcp)
            }
        };
        let host = match connected {
            Ok(h) => h,
            Err(e) => {
                match &unix {
                    Some(p) => log::debug!("nat: connect to {} failed: {e}", p.display()),
                    None => log::debug!("nat: tcp connect to {target} failed at once: {e}"),
                }
                self.stats.tcp_refused += 1;
                // No route from the host: the gateway says so. Else the SYN goes to smoltcp,
                // which meets it with RST.
                return self.no_route_from_gateway(frame, ip, &e);
            }
        };
        let id = self.flows.next_id();
        let state = TcpState::Connecting {
            syn: frame.to_vec(),
        };
        let Ok(mut t) = TcpFlow::watched(host, state, EventSet::OUT, id, &self.epoll) else {
            return false;
        };
        t.handoff = handoff;
        let mut flow = Flow::new(key, target, origin, Kind::Tcp(t));
        flow.counters = counters;
        flow.from_guest.packets = 1;
        if let Some(id) = self.flows.insert(flow) {
            self.audit_open(id);
        }
        true
    }

    /// Counts a TCP segment leaving for the guest against its flow (`n` = 1), or takes it
    /// back (`n` = -1) when the guest had no room for it and it waits for the next round.
    pub(super) fn tcp_count_to_guest(&mut self, frame: &[u8], n: i64) {
        let Some((src, dst, t)) = super::link::stack_tcp_segment(frame) else {
            return;
        };
        let key = FlowKey {
            proto: FlowProto::Tcp,
            guest: dst,
            guest_port: t.dst_port(),
            remote: SocketAddr::new(src, t.src_port()),
        };
        if let Some(f) = self
            .flows
            .lookup(&key)
            .and_then(|id| self.flows.get_mut(id))
        {
            f.to_guest.packets = f.to_guest.packets.wrapping_add_signed(n);
        }
    }

    /// The other loopback to try for flow `id`, when its connect to the host alias's loopback
    /// of the same family was refused and the other family's was not tried yet.
    fn loopback_retry(&self, id: FlowId, err: i32) -> Option<SocketAddr> {
        let f = self.flows.get(id)?;
        if err != libc::ECONNREFUSED
            || !self.is_host_alias(f.key.remote.ip())
            || f.host.is_ipv4() != f.key.remote.is_ipv4()
        {
            return None;
        }
        Some(if f.host.is_ipv4() {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), f.host.port())
        } else {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), f.host.port())
        })
    }

    /// Flow `id`'s host connect failed with `e`: the guest hears it as from a real network,
    /// for its held SYN `syn`. Refused: RST (smoltcp's answer to a SYN no listener meets). No
    /// route or no host: ICMP net or host unreachable from the gateway (Linux ends a connect
    /// at once on either, with the errno the host saw: "No route to host", not "Connection
    /// refused"). Timed out: nothing, as the guest's own connect times out too.
    fn connect_failed(&mut self, id: FlowId, syn: Vec<u8>, e: &io::Error) {
        // An ICMP error from a router on the way (the SYN's TTL ran out there, or it has no
        // route on) ended the connect: the guest hears it from that router.
        if self.relay_connect_error(id, &syn) {
            self.tcp_remove(id, "unreachable");
            return;
        }
        let why = Unreachable::of(e);
        let reason = match why {
            Some(Unreachable::Net | Unreachable::Host) => "unreachable",
            _ if e.kind() == io::ErrorKind::TimedOut => "timeout",
            _ => "refused",
        };
        self.tcp_remove(id, reason);
        match reason {
            "unreachable" => {
                if let Some((ip, _)) = parse_ip(&syn) {
                    self.no_route_from_gateway(&syn, &ip, e);
                }
            }
            "timeout" => {}
            _ => self.device.rx.push_back(syn.into()),
        }
    }

    /// TCP flow `id`'s host socket is ready.
    pub(super) fn tcp_event(&mut self, id: FlowId, readable: bool) {
        // How the host connect ended, if it was under way (reading it clears it).
        let err = match self.flows.get(id).map(|f| &f.kind) {
            Some(Kind::Tcp(t)) if matches!(t.state, TcpState::Connecting { .. }) => {
                let fd = t.host.as_raw_fd();
                let err = take_error(fd);
                if err == 0 && !super::sys::is_connected(fd) {
                    // Not over yet: an ICMP error queued (IP_RECVERR) while the connect
                    // runs, which the kernel counts as soft, wakes the flow first. Read it
                    // (epoll would report it again and again) and wait for the connect.
                    while super::sys::recv_error(fd).is_some() {}
                    return;
                }
                err
            }
            _ => 0,
        };
        let alias_retry = self.loopback_retry(id, err);
        let Some(flow) = tcp_of(&mut self.flows, id) else {
            return;
        };
        let remote = flow.key.remote;
        let Kind::Tcp(t) = &mut flow.kind else {
            return;
        };
        t.readable |= readable;
        if let Some(other) = alias_retry {
            // The host alias is the host's loopback, whichever family listens there: a server
            // on 127.0.0.1 only is reached from the IPv6 alias too (a guest picks the AAAA
            // answer as often as not), and one on ::1 only from the IPv4 alias.
            if let Ok(host) = connect_nonblocking(other).map(HostStream::Tcp) {
                let syn = match &mut t.state {
                    TcpState::Connecting { syn } => std::mem::take(syn),
                    _ => Vec::new(),
                };
                t.unwatch(&self.epoll);
                let state = TcpState::Connecting { syn };
                if let Ok(again) = TcpFlow::watched(host, state, EventSet::OUT, id, &self.epoll) {
                    *t = again;
                    flow.host = other;
                    flow.host_addrs.take();
                    return;
                }
                // Could not watch it: the SYN is gone with the old state; the guest retries.
                self.tcp_remove(id, "error");
                return;
            }
        }
        if let TcpState::Connecting { syn } = &mut t.state {
            let syn = std::mem::take(syn);
            if err != 0 {
                log::debug!("nat: tcp connect to {remote} failed: errno {err}");
                self.stats.tcp_refused += 1;
                self.connect_failed(id, syn, &io::Error::from_raw_os_error(err));
                return;
            }
            let mut socket = tcp_socket();
            if socket.listen(IpListenEndpoint::from(remote)).is_err() {
                self.tcp_remove(id, "error");
                self.device.rx.push_back(syn.into());
                return;
            }
            // Connected: ICMP errors about the connection's segments go back to being the
            // kernel's business (see `disable_recverr`).
            if let (HostStream::Tcp(h), Origin::Outbound) = (&t.host, flow.origin) {
                let _ = super::sys::disable_recverr(h.as_raw_fd(), flow.host.is_ipv6());
            }
            let handle = self.sockets.add(socket);
            t.state = TcpState::Open {
                handle,
                host_eof: false,
                guest_eof: false,
            };
            t.watch(true, false, id, &self.epoll);
            self.device.rx.push_back(syn.into());
            return;
        }
        self.pump(id);
    }

    pub(super) fn pump_all(&mut self) {
        // The id list is a reused buffer: polling allocates nothing.
        let mut ids = std::mem::take(&mut self.pump_ids);
        // Queued published clients have no stack socket to move data for: their events pump
        // them.
        self.flows.select(
            &mut ids,
            |f| matches!(&f.kind, Kind::Tcp(t) if !matches!(t.state, TcpState::Queued)),
        );
        for id in &ids {
            self.pump(*id);
        }
        self.pump_ids = ids;
        self.dequeue_published();
    }

    /// Moves data between a flow's stack socket and its host socket, as far as both sides
    /// take it; closes and cleans up.
    pub(super) fn pump(&mut self, id: FlowId) {
        use smoltcp::socket::tcp;
        use std::io::{Read, Write};
        let Some(flow) = tcp_of(&mut self.flows, id) else {
            return;
        };
        let Kind::Tcp(t) = &mut flow.kind else {
            return;
        };
        if matches!(t.state, TcpState::Queued) {
            // Waiting for its turn: only a client that leaves is news.
            if t.readable {
                t.readable = false;
                match peek_eof(&t.host) {
                    Some(true) => {
                        self.tcp_remove(id, "client_left");
                    }
                    // Data (it waits for the guest), so EPOLLRDHUP would only repeat itself.
                    Some(false) if t.want_hup => {
                        t.want_hup = false;
                        t.watch(false, false, id, &self.epoll);
                    }
                    _ => {}
                }
            }
            return;
        }
        if t.handshaking {
            if let TcpState::Open { handle, .. } = t.state {
                if self.sockets.get::<tcp::Socket>(handle).state() != tcp::State::SynSent {
                    t.handshaking = false;
                    self.tcp_limits.handshaking -= 1;
                }
            }
        }
        if t.want_hup {
            if let TcpState::Open { handle, .. } = t.state {
                if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::SynSent {
                    // A published connection still waiting for the guest: a client that left
                    // without a word is let go now, rather than after the guest answers (which
                    // a guest behind on its accept queue may take seconds to do, while the
                    // descriptors pile up).
                    if !t.readable {
                        return;
                    }
                    t.readable = false;
                    let eof = peek_eof(&t.host);
                    if eof == Some(true) {
                        // The guest's half-open connection meets no socket when it retransmits
                        // its SYN-ACK, and smoltcp answers that with RST.
                        self.sockets.remove(handle);
                        self.tcp_remove(id, "client_left");
                        return;
                    }
                    // Data (it waits for the guest) or nothing yet. A client that half-closed
                    // after its request is served as usual once the guest answers.
                    if eof == Some(false) {
                        t.want_hup = false;
                        t.watch(t.want_in, t.want_out, id, &self.epoll);
                    }
                    return;
                }
            }
            // The guest answered: from now on EPOLLIN tells of the client's end.
            t.want_hup = false;
            t.readable = true;
            t.watch(t.want_in, t.want_out, id, &self.epoll);
        }
        let TcpState::Open {
            handle,
            host_eof,
            guest_eof,
        } = &mut t.state
        else {
            return;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
        let mut want_out = false;
        let mut broken = false;
        if socket.state() == tcp::State::Closed && !*guest_eof {
            // The guest reset the connection (or never answered a published port's SYN):
            // the host peer is reset too, not closed as if all went well.
            let h = *handle;
            self.sockets.remove(h);
            if let Some(host) = self.tcp_remove(id, "guest_reset") {
                host.reset();
            }
            return;
        }
        if socket.timeout().is_some() && socket.state() != tcp::State::SynSent && !*host_eof {
            // A published connection the guest accepted: no more connect deadline (the one
            // set when the host side closes stays).
            socket.set_timeout(None);
        }
        // Guest to host: write what the host takes; the rest stays in the window. Bytes
        // queued ahead of the stack socket's (a tunnel the proxy handed over) go first.
        let mut from_guest = 0;
        if !t.to_host.is_empty() {
            // Counted already, when the stack socket gave them to the proxy's pair.
            match t.host.write(&t.to_host) {
                Ok(n) if n == t.to_host.len() => t.to_host = Vec::new(),
                Ok(n) => {
                    t.to_host.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => want_out = true,
                Err(_) => broken = true,
            }
        }
        while t.to_host.is_empty() && socket.can_recv() {
            let host = &mut t.host;
            let r = socket.recv(|data| match host.write(data) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => from_guest += n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    want_out = true;
                    break;
                }
                _ => {
                    broken = true;
                    break;
                }
            }
        }
        if !broken
            && !*guest_eof
            && t.to_host.is_empty()
            && !socket.may_recv()
            && !socket.can_recv()
            && socket.state() != tcp::State::Listen
            && socket.state() != tcp::State::SynReceived
            && socket.state() != tcp::State::SynSent
        {
            let _ = t.host.shutdown(std::net::Shutdown::Write);
            *guest_eof = true;
        }
        // Host to guest: read only as much as the stack can send.
        let mut to_guest = 0;
        while !broken && !*host_eof && t.readable && socket.can_send() {
            let host = &mut t.host;
            let r = socket.send(|buf| match host.read(buf) {
                Ok(0) => (0, Ok((0, false))),
                Ok(n) => (n, Ok((n, n < buf.len()))),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok((0, _))) => match t.handoff.take().and_then(|h| h.take()) {
                    // The proxy's end of stream with its tunnel in the slot: carry on with
                    // the server socket.
                    Some(taken) => {
                        let counters = taken.counters.clone();
                        match adopt(
                            &mut t.host,
                            t.watched,
                            &mut t.to_host,
                            taken,
                            id,
                            &self.epoll,
                        ) {
                            Ok(to) => {
                                t.watched = true;
                                t.want_in = true;
                                t.want_out = !t.to_host.is_empty();
                                t.readable = true;
                                flow.host = to;
                                flow.host_addrs.take();
                                // The rule that let a direct tunnel out counts it from now
                                // on; an intercepted flow keeps the one it had.
                                if counters.is_some() {
                                    flow.counters = counters;
                                }
                                // A guest that finished sending meanwhile: shut the server's
                                // side once the queued bytes are out.
                                *guest_eof = false;
                                want_out |= !t.to_host.is_empty();
                            }
                            Err(e) => {
                                log::debug!("nat: cannot take the proxy's tunnel: {e}");
                                broken = true;
                            }
                        }
                    }
                    None => {
                        *host_eof = true;
                        socket.close();
                    }
                },
                // A short read drained the socket: epoll says when there is more.
                Ok(Ok((n, drained))) => {
                    to_guest += n;
                    t.readable = !drained;
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    t.readable = false;
                    break;
                }
                _ => broken = true,
            }
        }
        if to_guest + from_guest > 0 {
            // Field by field: `t` still borrows the flow's kind.
            flow.to_guest.bytes += to_guest as u64;
            flow.from_guest.bytes += from_guest as u64;
            if let Some(c) = &flow.counters {
                c.add_bytes(to_guest + from_guest);
            }
            flow.last = StdInstant::now();
        }
        if broken {
            // The host side failed: reset the guest's connection.
            socket.abort();
        }
        if *host_eof
            && socket.send_queue() == 0
            && socket.timeout().is_none()
            && matches!(
                socket.state(),
                tcp::State::FinWait1 | tcp::State::Closing | tcp::State::LastAck
            )
        {
            // Only the FIN is left for the guest to acknowledge, which a guest that is there
            // does at once (a closed window holds back data, never the FIN's answer).
            socket.set_timeout(Some(FIN_TIMEOUT));
        }
        let state = socket.state();
        let done = matches!(state, tcp::State::Closed | tcp::State::TimeWait)
            && (broken || *host_eof || *guest_eof || state == tcp::State::Closed);
        if done {
            let h = *handle;
            self.sockets.remove(h);
            self.tcp_remove(id, if broken { "host_error" } else { "closed" });
            return;
        }
        if *host_eof && *guest_eof {
            // Nothing more to read or write on the host: only the guest's side is closing.
            t.unwatch(&self.epoll);
            return;
        }
        let want_in = !*host_eof && socket.can_send();
        let want_out = want_out || !t.to_host.is_empty();
        if want_in != t.want_in || want_out != t.want_out {
            t.watch(want_in, want_out, id, &self.epoll);
        }
    }
}
