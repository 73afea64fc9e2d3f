//! TCP, both directions: the guest's SYNs become host connects (SYN-ACK only once the connect
//! succeeds), published ports' clients become connections to the guest (at most
//! `MAX_HANDSHAKES` at once), and `pump` moves data between each flow's stack socket and host
//! socket with backpressure both ways, and closes them.

use super::*;

/// How long the guest has to answer a published connection's SYN.
pub(super) const PUBLISH_CONNECT_TIMEOUT: smoltcp::time::Duration =
    smoltcp::time::Duration::from_secs(10);

/// How long the guest may stay silent while ferry waits for it to acknowledge the FIN that
/// follows everything else the host side sent: then the guest's connection is reset and the
/// host socket goes. A guest that drops it (its accept queue overflowed, it hung, it left)
/// would otherwise hold a host descriptor for minutes of retransmissions; one that answers
/// keeps its side open as long as it likes.
pub(super) const FIN_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(3);

/// Receive and send buffer of each NAT'd TCP connection: the window the guest sees. Under TCG
/// the guest's round trip is milliseconds long, and 256 KiB held host-to-guest TCP to a third
/// of what 4 MiB allows. The memory is virtual until used (ferry's allocator maps buffers this
/// size on demand), so an idle or short connection costs a few pages.
pub(super) const TCP_BUFFER: usize = 4096 * 1024;

/// Whether the peer of `host` has closed its side with nothing left to read (Some(true)), has
/// sent data (Some(false)), or neither yet (None), without taking anything from the socket.
pub(super) fn peek_eof(host: &std::net::TcpStream) -> Option<bool> {
    let mut b = [0u8; 1];
    // SAFETY: the fd is valid and `b` has room for the one byte asked for.
    let n = unsafe {
        libc::recv(
            host.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Some(true),
        n if n > 0 => Some(false),
        _ => None,
    }
}

impl NetStack {
    /// A client connected to a published TCP port: the stack connects to the guest from the
    /// client's address, and the flow splices the two once the guest accepts. A guest that
    /// does not listen answers RST, and the client is reset too. `counters` are those of the
    /// rule that let it in.
    pub(super) fn publish_tcp(
        &mut self,
        stream: std::net::TcpStream,
        client: SocketAddr,
        guest_port: u16,
        counters: Option<Arc<Counters>>,
    ) {
        use crate::tcp_nat::TcpKey;
        let seen = self.seen_addr(client);
        let mut key = TcpKey {
            guest_port,
            dst: SocketAddrV4::new(seen, client.port()),
        };
        // Two clients that look alike to the guest (loopback clients of one port from
        // different addresses): the later one gets another source port.
        let mut tries = 0u16;
        while self.tcp.flows.contains_key(&key) && tries < 1024 {
            let port = 49152 + (client.port().wrapping_add(tries.wrapping_mul(7919)) % 16384);
            key.dst.set_port(port);
            tries += 1;
        }
        if self.tcp.flows.contains_key(&key) || self.tcp.flows.len() >= self.tcp.max_flows {
            crate::ports::reset(stream);
            return;
        }
        let handle = if self.tcp.handshaking < crate::tcp_nat::MAX_HANDSHAKES {
            match self.connect_to_guest(key) {
                Some(h) => Some(h),
                None => {
                    crate::ports::reset(stream);
                    return;
                }
            }
        } else {
            None
        };
        if let Err(e) = self.tcp.adopt(key, stream, handle, &self.epoll, counters) {
            log::warn!("ports: cannot watch a connection from {client}: {e}");
            if let Some(h) = handle {
                self.sockets.remove(h);
            }
            return;
        }
        self.stats.published_connections += 1;
    }

    /// A stack socket connecting to the guest's `key.guest_port` from `key.dst` (the
    /// published client as the guest sees it); None when smoltcp refuses the endpoints.
    pub(super) fn connect_to_guest(&mut self, key: crate::tcp_nat::TcpKey) -> Option<SocketHandle> {
        use smoltcp::socket::tcp;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        socket.set_ack_delay(None);
        socket.set_timeout(Some(PUBLISH_CONNECT_TIMEOUT));
        let remote = IpEndpoint::new(IpAddress::Ipv4(smol(self.guest.ip())), key.guest_port);
        let local = IpEndpoint::new(IpAddress::Ipv4(smol(*key.dst.ip())), key.dst.port());
        socket.connect(self.iface.context(), remote, local).ok()?;
        Some(self.sockets.add(socket))
    }

    /// Connects queued published clients to the guest, oldest first, while fewer than
    /// [`MAX_HANDSHAKES`] wait for the guest's answer.
    pub(super) fn dequeue_published(&mut self) {
        use crate::tcp_nat::FlowState;
        while self.tcp.handshaking < crate::tcp_nat::MAX_HANDSHAKES {
            let Some(key) = self.tcp.queued.pop_front() else {
                return;
            };
            if !matches!(
                self.tcp.flows.get(&key).map(|f| &f.state),
                Some(FlowState::Queued)
            ) {
                continue; // it left while it waited
            }
            let Some(handle) = self.connect_to_guest(key) else {
                if let Some(f) = self.tcp.remove(&key, &self.epoll) {
                    crate::ports::reset(f.host);
                }
                continue;
            };
            if let Some(f) = self.tcp.flows.get_mut(&key) {
                f.state = FlowState::Open {
                    handle,
                    host_eof: false,
                    guest_eof: false,
                };
                f.handshaking = true;
                self.tcp.handshaking += 1;
            }
        }
    }

    /// A guest SYN to an outside address: held while ferry connects on the host. Returns
    /// whether it took the frame.
    pub(super) fn tcp_syn(&mut self, frame: &[u8]) -> bool {
        use crate::tcp_nat::{FlowState, TcpKey};
        use smoltcp::wire::{IpProtocol, TcpPacket};
        let Some((ip, payload)) = parse_ipv4(frame) else {
            return false;
        };
        if ip.next_header != IpProtocol::Tcp {
            return false;
        }
        let Ok(t) = TcpPacket::new_checked(payload) else {
            return false;
        };
        if !t.syn() || t.ack() {
            return false;
        }
        let dst = std::net::Ipv4Addr::from(ip.dst_addr.octets());
        let key = TcpKey {
            guest_port: t.src_port(),
            dst: SocketAddrV4::new(dst, t.dst_port()),
        };
        match self.tcp.flows.get(&key).map(|f| &f.state) {
            // A retransmitted SYN while the host connect runs: the first one is held.
            Some(FlowState::Connecting { .. }) => return true,
            Some(FlowState::Open { .. } | FlowState::Queued) => return false,
            None => {}
        }
        let mut target = None;
        let mut proxy = None;
        let mut counters = None;
        if dst == self.cfg.gateway() {
            // The gateway's TCP services: DNS, relayed to the upstream server, and the HTTP
            // proxy, served in this process. They are not outbound flows: the proxy checks
            // the rules for the servers it connects to.
            match (t.dst_port(), self.upstream_tcp, &self.proxy) {
                (dns::PORT, Some(up), _) => target = Some(up),
                (crate::proxy::PORT, _, Some(p)) => {
                    target = Some(p.addr());
                    proxy = Some(&**p);
                }
                _ => return false,
            }
        } else {
            match self.decide(Proto::Tcp, key.dst, frame) {
                Ok(c) => counters = c,
                // No listener meets the SYN: the stack answers RST.
                Err(Action::Reject) => return false,
                Err(_) => return true,
            }
        }
        // The proxy takes only the connections it was told of, by their source address.
        let tell_proxy = |a: SocketAddr| {
            if let Some(p) = proxy {
                p.announce(a);
            }
        };
        let announce: Option<&dyn Fn(SocketAddr)> = proxy.is_some().then_some(&tell_proxy);
        let started = self
            .tcp
            .start(key, target, announce, frame.to_vec(), &self.epoll)
            .is_ok();
        if let Some(f) = self.tcp.flows.get_mut(&key) {
            f.counters = counters;
        }
        started
    }

    /// A TCP flow's host socket is ready.
    pub(super) fn tcp_event(&mut self, token: u64, readable: bool) {
        use crate::tcp_nat::{take_error, FlowState, TcpNat};
        use smoltcp::socket::tcp;
        let Some(key) = self.tcp.key_of(token) else {
            return;
        };
        let Some(flow) = self.tcp.flows.get_mut(&key) else {
            return;
        };
        flow.readable |= readable;
        if let FlowState::Connecting { syn } = &mut flow.state {
            let syn = std::mem::take(syn);
            let err = take_error(flow.host.as_raw_fd());
            if err != 0 {
                // Refused or unreachable: the SYN meets no listener and the guest gets RST.
                log::debug!("nat: tcp connect to {} failed: errno {err}", key.dst);
                self.stats.tcp_refused += 1;
                self.tcp.remove(&key, &self.epoll);
                self.device.rx.push_back(syn.into());
                return;
            }
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
                tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            );
            socket.set_ack_delay(None);
            let ep = smoltcp::wire::IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(smol(*key.dst.ip()))),
                port: key.dst.port(),
            };
            if socket.listen(ep).is_err() {
                self.tcp.remove(&key, &self.epoll);
                self.device.rx.push_back(syn.into());
                return;
            }
            let handle = self.sockets.add(socket);
            flow.state = FlowState::Open {
                handle,
                host_eof: false,
                guest_eof: false,
            };
            TcpNat::watch(flow, true, false, &self.epoll);
            self.device.rx.push_back(syn.into());
            return;
        }
        self.pump(key);
    }

    pub(super) fn pump_all(&mut self) {
        // The key list is a reused buffer: polling allocates nothing.
        let mut keys = std::mem::take(&mut self.pump_keys);
        keys.clear();
        // Queued published clients have no stack socket to move data for: their events pump them.
        keys.extend(
            self.tcp
                .flows
                .iter()
                .filter(|(_, f)| !matches!(f.state, crate::tcp_nat::FlowState::Queued))
                .map(|(k, _)| *k),
        );
        for k in &keys {
            self.pump(*k);
        }
        self.pump_keys = keys;
        self.dequeue_published();
    }

    /// Moves data between a flow's stack socket and its host socket, as far as both sides
    /// take it; closes and cleans up.
    pub(super) fn pump(&mut self, key: crate::tcp_nat::TcpKey) {
        use crate::tcp_nat::{FlowState, TcpNat};
        use smoltcp::socket::tcp;
        use std::io::{Read, Write};
        let Some(flow) = self.tcp.flows.get_mut(&key) else {
            return;
        };
        if matches!(flow.state, FlowState::Queued) {
            // Waiting for its turn: only a client that leaves is news.
            if flow.readable {
                flow.readable = false;
                match peek_eof(&flow.host) {
                    Some(true) => {
                        self.tcp.remove(&key, &self.epoll);
                    }
                    // Data (it waits for the guest), so EPOLLRDHUP would only repeat itself.
                    Some(false) if flow.want_hup => {
                        flow.want_hup = false;
                        TcpNat::watch(flow, false, false, &self.epoll);
                    }
                    _ => {}
                }
            }
            return;
        }
        if flow.handshaking {
            if let FlowState::Open { handle, .. } = flow.state {
                if self.sockets.get::<tcp::Socket>(handle).state() != tcp::State::SynSent {
                    flow.handshaking = false;
                    self.tcp.handshaking -= 1;
                }
            }
        }
        let Some(flow) = self.tcp.flows.get_mut(&key) else {
            return;
        };
        if flow.want_hup {
            if let FlowState::Open { handle, .. } = flow.state {
                if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::SynSent {
                    // A published connection still waiting for the guest: a client that left
                    // without a word is let go now, rather than after the guest answers (which
                    // a guest behind on its accept queue may take seconds to do, while the
                    // descriptors pile up).
                    if !flow.readable {
                        return;
                    }
                    flow.readable = false;
                    let eof = peek_eof(&flow.host);
                    if eof == Some(true) {
                        // The guest's half-open connection meets no socket when it retransmits
                        // its SYN-ACK, and smoltcp answers that with RST.
                        self.sockets.remove(handle);
                        self.tcp.remove(&key, &self.epoll);
                        return;
                    }
                    // Data (it waits for the guest) or nothing yet. A client that half-closed
                    // after its request is served as usual once the guest answers.
                    if eof == Some(false) {
                        flow.want_hup = false;
                        TcpNat::watch(flow, flow.want_in, flow.want_out, &self.epoll);
                    }
                    return;
                }
            }
            // The guest answered: from now on EPOLLIN tells of the client's end.
            flow.want_hup = false;
            flow.readable = true;
            TcpNat::watch(flow, flow.want_in, flow.want_out, &self.epoll);
        }
        let FlowState::Open {
            handle,
            host_eof,
            guest_eof,
        } = &mut flow.state
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
            if let Some(f) = self.tcp.remove(&key, &self.epoll) {
                crate::ports::reset(f.host);
            }
            return;
        }
        if socket.timeout().is_some() && socket.state() != tcp::State::SynSent && !*host_eof {
            // A published connection the guest accepted: no more connect deadline (the one
            // set when the host side closes stays).
            socket.set_timeout(None);
        }
        // Guest to host: write what the host takes; the rest stays in the window.
        let counters = flow.counters.as_deref();
        while socket.can_recv() {
            let host = &mut flow.host;
            let r = socket.recv(|data| match host.write(data) {
                Ok(n) => {
                    if let Some(c) = counters {
                        c.add_bytes(n);
                    }
                    (n, Ok(n))
                }
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
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
            && !socket.may_recv()
            && !socket.can_recv()
            && socket.state() != tcp::State::Listen
            && socket.state() != tcp::State::SynReceived
            && socket.state() != tcp::State::SynSent
        {
            let _ = flow.host.shutdown(std::net::Shutdown::Write);
            *guest_eof = true;
        }
        // Host to guest: read only as much as the stack can send.
        while !broken && !*host_eof && flow.readable && socket.can_send() {
            let host = &mut flow.host;
            let r = socket.send(|buf| match host.read(buf) {
                Ok(0) => (0, Ok((0, false))),
                Ok(n) => {
                    if let Some(c) = counters {
                        c.add_bytes(n);
                    }
                    (n, Ok((n, n < buf.len())))
                }
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok((0, _))) => {
                    *host_eof = true;
                    socket.close();
                }
                // A short read drained the socket: epoll says when there is more.
                Ok(Ok((_, drained))) => flow.readable = !drained,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    flow.readable = false;
                    break;
                }
                _ => broken = true,
            }
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
            self.tcp.remove(&key, &self.epoll);
            return;
        }
        if *host_eof && *guest_eof {
            // Nothing more to read or write on the host: only the guest's side is closing.
            TcpNat::unwatch(flow, &self.epoll);
            return;
        }
        let want_in = !*host_eof && socket.can_send();
        if want_in != flow.want_in || want_out != flow.want_out {
            TcpNat::watch(flow, want_in, want_out, &self.epoll);
        }
    }
}
