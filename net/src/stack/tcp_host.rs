//! What a TCP flow keeps of its host side: the socket (TCP, or a UNIX stream for forwarded
//! sockets), where its connection is, which epoll events it asks for; and the TCP caps.
//!
//! Theory of operation. A guest SYN to A:p starts a non-blocking host `connect(A:p)` (the
//! host's loopback for the host alias). The SYN is held until the connect ends: on success the
//! stack gets a socket listening on A:p and the SYN, so the guest sees SYN-ACK; on failure the
//! SYN meets no listener and the stack answers RST. No half-open lies. A published port's
//! client arrives connected; its guest side connects to the guest, at most `MAX_HANDSHAKES` at
//! once. The host socket is watched only for what the flow can use now (EPOLLIN while the
//! stack socket has room toward the guest, EPOLLOUT while the host refused a write), so a
//! flow that waits costs no wakeups. `stack::tcp` moves the data.
//!
//! The host side is a UNIX stream when a host UNIX socket is the flow's other end: a client of
//! a `--forward-socket` socket, the service behind a `--guest-forward` address, or the
//! gateway's proxy (one end of a socket pair). Both kinds read, write and shut down alike, so
//! the flow does not care which it has. A proxy flow whose CONNECT tunnel opened swaps its
//! socket pair for the tunnel's server socket ([`adopt`], `proxy::handoff`).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use smoltcp::iface::SocketHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::flow::{FlowId, Token};
use crate::proxy::handoff::{Handoff, Taken};

/// Open TCP flows at most, unless configured otherwise.
pub const DEFAULT_MAX_FLOWS: usize = 16384;

/// Most published connections whose SYN the guest has yet to answer. More clients wait in
/// ferry (the host kernel already finished their handshakes), so a burst of clients does not
/// overflow the guest's accept queue, whose dropped handshakes the guest then retries for
/// seconds, or fill the stack with sockets it must visit on every poll. A client that leaves
/// while it waits costs the guest nothing.
pub const MAX_HANDSHAKES: usize = 64;

/// A TCP flow's host socket.
pub(crate) enum HostStream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A UNIX stream connection.
    Unix(UnixStream),
}

impl HostStream {
    /// Shuts down `how` of the connection.
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            HostStream::Tcp(s) => s.shutdown(how),
            HostStream::Unix(s) => s.shutdown(how),
        }
    }

    /// Closes the connection so that the peer sees a reset (TCP; a UNIX peer sees it close).
    pub(crate) fn reset(self) {
        match self {
            HostStream::Tcp(s) => crate::ports::reset(s),
            HostStream::Unix(s) => drop(s),
        }
    }
}

impl Read for HostStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.read(buf),
            HostStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for HostStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.write(buf),
            HostStream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for HostStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            HostStream::Tcp(s) => s.as_raw_fd(),
            HostStream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// Where a flow is.
pub(crate) enum TcpState {
    /// The host connect is in progress; the guest's SYN waits.
    Connecting {
        /// The guest's SYN frame.
        syn: Vec<u8>,
    },
    /// A published port's client waiting for its turn to be connected to the guest; it costs
    /// no stack socket until then.
    Queued,
    /// Connected: data moves between the stack socket and the host socket.
    Open {
        /// The stack's socket for the guest side.
        handle: SocketHandle,
        /// The host closed its side (EOF seen).
        host_eof: bool,
        /// The guest closed its side (host write side shut down).
        guest_eof: bool,
    },
}

/// The TCP part of a flow.
pub(crate) struct TcpFlow {
    /// The host socket.
    pub(crate) host: HostStream,
    /// Where the flow is.
    pub(crate) state: TcpState,
    /// Whether EPOLLIN is currently asked for.
    pub(crate) want_in: bool,
    /// Whether EPOLLOUT is currently asked for.
    pub(crate) want_out: bool,
    /// Whether EPOLLRDHUP is asked for: while a published connection waits for the guest to
    /// answer its SYN, so that a client that leaves meanwhile is let go at once.
    pub(crate) want_hup: bool,
    /// Whether the host socket may have data: set by EPOLLIN, cleared when a read finds it
    /// drained, so a flow that only sends costs no failing read per poll.
    pub(crate) readable: bool,
    /// Whether the host socket is still on the stack's epoll.
    pub(crate) watched: bool,
    /// Whether it is one of the published connections whose SYN the guest has yet to answer
    /// (counted in [`TcpLimits::handshaking`]).
    pub(crate) handshaking: bool,
    /// A proxy flow's slot for its tunnel's server socket.
    pub(crate) handoff: Option<Arc<Handoff>>,
    /// Bytes from the guest that go to the host before any the stack socket holds: what the
    /// guest sent into the proxy's socket pair that the proxy never read.
    pub(crate) to_host: Vec<u8>,
}

impl TcpFlow {
    /// A flow whose host side is `host`, registered on `epoll` for `events` under `id`.
    pub(crate) fn watched(
        host: HostStream,
        state: TcpState,
        events: EventSet,
        id: FlowId,
        epoll: &Epoll,
    ) -> std::io::Result<TcpFlow> {
        epoll.ctl(
            ControlOperation::Add,
            host.as_raw_fd(),
            EpollEvent::new(events, Token::Flow(id).to_u64()),
        )?;
        Ok(TcpFlow {
            host,
            state,
            want_in: events.contains(EventSet::IN),
            want_out: events.contains(EventSet::OUT),
            want_hup: events.contains(EventSet::READ_HANG_UP),
            readable: !events.contains(EventSet::READ_HANG_UP),
            watched: true,
            handshaking: false,
            handoff: None,
            to_host: Vec::new(),
        })
    }

    /// Sets which events the host socket wakes the stack for (EPOLLRDHUP as long as
    /// `want_hup` says).
    pub(crate) fn watch(&mut self, want_in: bool, want_out: bool, id: FlowId, epoll: &Epoll) {
        if !self.watched {
            return;
        }
        let mut ev = EventSet::empty();
        if want_in {
            ev |= EventSet::IN;
        }
        if want_out {
            ev |= EventSet::OUT;
        }
        if self.want_hup {
            ev |= EventSet::READ_HANG_UP;
        }
        self.want_in = want_in;
        self.want_out = want_out;
        let _ = epoll.ctl(
            ControlOperation::Modify,
            self.host.as_raw_fd(),
            EpollEvent::new(ev, Token::Flow(id).to_u64()),
        );
    }

    /// Takes the host socket off the epoll for good: both of its directions are closed, and a
    /// socket in that state reports EPOLLHUP on every wait, whatever it was asked for, which
    /// would spin the stack until the guest has finished closing its side.
    pub(crate) fn unwatch(&mut self, epoll: &Epoll) {
        if self.watched {
            self.watched = false;
            let _ = epoll.ctl(
                ControlOperation::Delete,
                self.host.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }
}

/// Takes the proxy's open tunnel for flow `id`, whose host socket `host` is the proxy's
/// socket pair: the tunnel's server socket becomes `host`, on `epoll` for EPOLLIN (and
/// EPOLLOUT when bytes wait), and what the guest sent into the pair that the proxy never
/// read is queued in `to_host`, ahead of anything newer. Returns the server's address. (A
/// function of the fields, not a method: the caller holds the flow's state borrowed.)
pub(crate) fn adopt(
    host: &mut HostStream,
    watched: bool,
    to_host: &mut Vec<u8>,
    taken: Taken,
    id: FlowId,
    epoll: &Epoll,
) -> io::Result<std::net::SocketAddr> {
    let Taken {
        server,
        mut proxy_end,
        ..
    } = taken;
    server.set_nonblocking(true)?;
    proxy_end.set_nonblocking(true)?;
    let to = server.peer_addr()?;
    // This thread holds both ends of the pair now: nothing more arrives in it.
    let mut buf = [0u8; 16 * 1024];
    loop {
        match proxy_end.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => to_host.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if watched {
        let _ = epoll.ctl(
            ControlOperation::Delete,
            host.as_raw_fd(),
            EpollEvent::default(),
        );
    }
    *host = HostStream::Tcp(server);
    let mut ev = EventSet::IN;
    if !to_host.is_empty() {
        ev |= EventSet::OUT;
    }
    epoll.ctl(
        ControlOperation::Add,
        host.as_raw_fd(),
        EpollEvent::new(ev, Token::Flow(id).to_u64()),
    )?;
    Ok(to)
}

/// The TCP caps and the published connections' queue.
pub(crate) struct TcpLimits {
    /// Most flows open at once.
    pub(crate) max_flows: usize,
    /// Published connections whose SYN the guest has yet to answer.
    pub(crate) handshaking: usize,
    /// Published connections waiting for their turn, oldest first (some may have gone).
    pub(crate) queued: VecDeque<FlowId>,
    /// The cap was logged (once is enough).
    pub(crate) cap_logged: bool,
}

impl TcpLimits {
    pub(crate) fn new(max_flows: usize) -> Self {
        TcpLimits {
            max_flows,
            handshaking: 0,
            queued: VecDeque::new(),
            cap_logged: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::flow::{Flow, FlowKey, FlowTable, Origin, Proto};
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn adopting_a_tunnel_queues_what_the_proxy_never_read_and_watches_the_server() {
        let epoll = Epoll::new().unwrap();
        let key = FlowKey {
            proto: Proto::Tcp,
            guest: "192.168.127.2".parse().unwrap(),
            guest_port: 40000,
            remote: "192.168.127.1:3128".parse().unwrap(),
        };
        let mut flows = FlowTable::default();
        let id = flows
            .insert(Flow::new(key, key.remote, Origin::Proxy, ()))
            .unwrap();
        let (nat, proxy_end) = UnixStream::pair().unwrap();
        nat.set_nonblocking(true).unwrap();
        // What the guest sent after the proxy's last read: still in the pair.
        (&nat).write_all(b"early bytes").unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut far, _) = l.accept().unwrap();
        let mut host = HostStream::Unix(nat);
        let token = Token::Flow(id).to_u64();
        epoll
            .ctl(
                ControlOperation::Add,
                host.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .unwrap();
        let mut to_host = Vec::new();
        let taken = Taken {
            server,
            proxy_end,
            counters: None,
        };
        let to = adopt(&mut host, true, &mut to_host, taken, id, &epoll).unwrap();
        assert_eq!(to, l.local_addr().unwrap());
        assert_eq!(to_host, b"early bytes");
        assert!(matches!(host, HostStream::Tcp(_)));
        // The server socket is on the epoll, under the flow's token, for room to write the
        // queued bytes; the pair is not (its ends are closed).
        let mut events = [EpollEvent::default(); 4];
        let n = epoll.wait(1000, &mut events).unwrap();
        assert_eq!(n, 1);
        assert_eq!(events[0].data(), token);
        assert!(events[0].event_set().contains(EventSet::OUT));
        // And it is the server: what the flow writes arrives there.
        host.write_all(&to_host).unwrap();
        let mut got = [0u8; 11];
        far.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"early bytes");
    }
}
