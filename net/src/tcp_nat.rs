//! TCP NAT: a guest SYN to A:p starts a non-blocking host `connect(A:p)` (the host's
//! 127.0.0.1 for the host alias). The SYN is held until the connect ends: on success the
//! stack gets a socket listening on A:p and the SYN, so the guest sees SYN-ACK; on failure
//! the SYN meets no listener and the stack answers RST. No half-open lies.
//!
//! DNS over TCP to the gateway is a flow like any other, to the DNS upstream: a client that
//! got a truncated answer over UDP retries over TCP and reaches the same server.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use smoltcp::iface::SocketHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Tokens of TCP flows on the stack's epoll start here.
pub const TOKEN_BASE: u64 = 1 << 48;
/// Open TCP flows at most, unless configured otherwise.
pub const DEFAULT_MAX_FLOWS: usize = 16384;

/// A guest connection: its source port and the destination it connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpKey {
    /// The guest's source port.
    pub guest_port: u16,
    /// The destination the guest addressed.
    pub dst: SocketAddrV4,
}

/// Where a flow is.
pub enum FlowState {
    /// The host connect is in progress; the guest's SYN waits.
    Connecting {
        /// The guest's SYN frame.
        syn: Vec<u8>,
    },
    /// A published port's client waiting for its turn to be connected to the guest (at most
    /// [`MAX_HANDSHAKES`] connect at once); it costs no stack socket until then.
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

/// One flow.
pub struct TcpFlow {
    /// The host socket.
    pub host: TcpStream,
    /// Where the flow is.
    pub state: FlowState,
    /// Its epoll token.
    pub token: u64,
    /// Whether EPOLLIN is currently asked for.
    pub want_in: bool,
    /// Whether EPOLLOUT is currently asked for.
    pub want_out: bool,
    /// Whether EPOLLRDHUP is asked for: while a published connection waits for the guest to
    /// answer its SYN, so that a client that leaves meanwhile is let go at once.
    pub want_hup: bool,
    /// Whether the host socket may have data: set by EPOLLIN, cleared when a read finds it
    /// drained, so a flow that only sends costs no failing read per poll.
    pub readable: bool,
    /// Whether the host socket is still on the stack's epoll.
    pub watched: bool,
    /// Whether a published port's client opened it (else the guest did).
    pub inbound: bool,
    /// The counters of the rule that let it through, if rules are set.
    pub counters: Option<std::sync::Arc<crate::rules::Counters>>,
    /// Whether it is one of the published connections whose SYN the guest has yet to answer
    /// (counted in [`TcpNat::handshaking`]).
    pub handshaking: bool,
}

/// Most published connections whose SYN the guest has yet to answer. More clients wait in
/// ferry (the host kernel already finished their handshakes), so a burst of clients does not
/// overflow the guest's accept queue, whose dropped handshakes the guest then retries for
/// seconds, or fill the stack with sockets it must visit on every poll. A client that leaves
/// while it waits costs the guest nothing.
pub const MAX_HANDSHAKES: usize = 64;

/// The TCP flows.
pub struct TcpNat {
    /// Flows by key.
    pub flows: HashMap<TcpKey, TcpFlow>,
    by_token: HashMap<u64, TcpKey>,
    next_token: u64,
    host_alias: Ipv4Addr,
    /// Most flows open at once.
    pub max_flows: usize,
    /// Published connections whose SYN the guest has yet to answer.
    pub handshaking: usize,
    /// Published connections waiting for their turn, oldest first (some may have gone).
    pub queued: VecDeque<TcpKey>,
    cap_logged: bool,
}

impl TcpNat {
    /// An empty table.
    pub fn new(host_alias: Ipv4Addr) -> Self {
        TcpNat {
            flows: HashMap::new(),
            by_token: HashMap::new(),
            next_token: TOKEN_BASE,
            host_alias,
            max_flows: DEFAULT_MAX_FLOWS,
            cap_logged: false,
            handshaking: 0,
            queued: VecDeque::new(),
        }
    }

    /// The flow of a ready epoll token.
    pub fn key_of(&self, token: u64) -> Option<TcpKey> {
        self.by_token.get(&token).copied()
    }

    /// Starts the host connect for a new guest SYN. `announce`, if given, learns the socket's
    /// source address before it connects (the in-process proxy takes only such connections).
    /// `Err` when the flow cannot be opened
    /// (the cap, or no socket): the caller lets the SYN meet no listener, so the guest gets RST.
    pub fn start(
        &mut self,
        key: TcpKey,
        target: Option<SocketAddrV4>,
        announce: Option<&dyn Fn(SocketAddr)>,
        syn: Vec<u8>,
        epoll: &Epoll,
    ) -> io::Result<()> {
        if self.flows.len() >= self.max_flows {
            if !self.cap_logged {
                self.cap_logged = true;
                log::warn!(
                    "net: {} TCP connections are open, the most allowed; refusing new ones with RST",
                    self.max_flows
                );
            }
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        // Where the host socket really connects: the given target (DNS over TCP goes to the
        // upstream), the host's loopback for the host alias, or the guest's destination.
        let target = target.unwrap_or(if *key.dst.ip() == self.host_alias {
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, key.dst.port())
        } else {
            key.dst
        });
        let host = connect_nonblocking(target, announce)?;
        let token = self.next_token;
        self.next_token += 1;
        epoll.ctl(
            ControlOperation::Add,
            host.as_raw_fd(),
            EpollEvent::new(EventSet::OUT, token),
        )?;
        self.by_token.insert(token, key);
        self.flows.insert(
            key,
            TcpFlow {
                host,
                state: FlowState::Connecting { syn },
                token,
                want_in: false,
                want_out: true,
                want_hup: false,
                readable: true,
                watched: true,
                inbound: false,
                counters: None,
                handshaking: false,
            },
        );
        Ok(())
    }

    /// Takes an accepted host connection: a published port's client, whose traffic adds to
    /// `counters` (the inbound rule that let it in), with its guest side (`handle`) connecting,
    /// or (None) queued until fewer handshakes are in flight. Its end is watched until the
    /// guest accepts; then its data.
    pub fn adopt(
        &mut self,
        key: TcpKey,
        host: TcpStream,
        handle: Option<SocketHandle>,
        epoll: &Epoll,
        counters: Option<std::sync::Arc<crate::rules::Counters>>,
    ) -> io::Result<()> {
        let token = self.next_token;
        self.next_token += 1;
        epoll.ctl(
            ControlOperation::Add,
            host.as_raw_fd(),
            EpollEvent::new(EventSet::READ_HANG_UP, token),
        )?;
        self.by_token.insert(token, key);
        self.flows.insert(
            key,
            TcpFlow {
                host,
                state: match handle {
                    Some(handle) => FlowState::Open {
                        handle,
                        host_eof: false,
                        guest_eof: false,
                    },
                    None => FlowState::Queued,
                },
                token,
                want_in: false,
                want_out: false,
                want_hup: true,
                readable: false,
                watched: true,
                inbound: true,
                counters,
                handshaking: handle.is_some(),
            },
        );
        match handle {
            Some(_) => self.handshaking += 1,
            None => self.queued.push_back(key),
        }
        Ok(())
    }

    /// Sets which events a flow's host socket wakes the stack for (EPOLLRDHUP as long as
    /// `flow.want_hup` says).
    pub fn watch(flow: &mut TcpFlow, want_in: bool, want_out: bool, epoll: &Epoll) {
        if !flow.watched {
            return;
        }
        let mut ev = EventSet::empty();
        if want_in {
            ev |= EventSet::IN;
        }
        if want_out {
            ev |= EventSet::OUT;
        }
        if flow.want_hup {
            ev |= EventSet::READ_HANG_UP;
        }
        flow.want_in = want_in;
        flow.want_out = want_out;
        let _ = epoll.ctl(
            ControlOperation::Modify,
            flow.host.as_raw_fd(),
            EpollEvent::new(ev, flow.token),
        );
    }

    /// Takes a flow's host socket off the epoll for good: both of its directions are closed,
    /// and a socket in that state reports EPOLLHUP on every wait, whatever it was asked for,
    /// which would spin the stack until the guest has finished closing its side.
    pub fn unwatch(flow: &mut TcpFlow, epoll: &Epoll) {
        if flow.watched {
            flow.watched = false;
            let _ = epoll.ctl(
                ControlOperation::Delete,
                flow.host.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Forgets a flow (its host socket closes).
    pub fn remove(&mut self, key: &TcpKey, epoll: &Epoll) -> Option<TcpFlow> {
        let mut f = self.flows.remove(key)?;
        Self::unwatch(&mut f, epoll);
        if f.handshaking {
            self.handshaking -= 1;
        }
        self.by_token.remove(&f.token);
        Some(f)
    }
}

/// A TCP socket connecting to `to` without waiting. With `announce`, the socket is bound to
/// an ephemeral loopback port first and `announce` gets that address before the connect.
pub(crate) fn connect_nonblocking(
    to: SocketAddrV4,
    announce: Option<&dyn Fn(SocketAddr)>,
) -> io::Result<TcpStream> {
    // SAFETY: socket() has no memory effects; the fd is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    if let Some(announce) = announce {
        let local = sockaddr_in(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        // SAFETY: `local` is a valid sockaddr_in of the given length.
        let r = unsafe {
            libc::bind(
                fd,
                (&local as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        announce(stream.local_addr()?);
    }
    let addr = sockaddr_in(to);
    // SAFETY: `addr` is a valid sockaddr_in of the given length.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// `a` as the C socket address.
pub(crate) fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The pending error of a socket whose connect ended (0: connected).
pub fn take_error(fd: RawFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are valid destinations of the right sizes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        libc::EIO
    } else {
        err
    }
}

/// The address a flow's host socket really connected to, for logs.
pub fn peer(flow: &TcpFlow) -> Option<SocketAddr> {
    flow.host.peer_addr().ok()
}
