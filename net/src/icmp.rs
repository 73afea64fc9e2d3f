//! ICMP echo to the outside through unprivileged ping sockets (`SOCK_DGRAM`, `IPPROTO_ICMP`).
//! A reply the guest sees is one a real host sent; when the host does not allow ping sockets
//! (`net.ipv4.ping_group_range`), echo requests are dropped and that is logged once.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// A ping flow idle this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// Ping flows open at most.
const MAX_FLOWS: usize = 256;
/// Tokens of ping sockets on the stack's epoll start here.
pub const TOKEN_BASE: u64 = 1 << 40;

/// One guest "ping session": its identifier and the host pinged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PingKey {
    /// The guest's echo identifier.
    pub ident: u16,
    /// The destination.
    pub dst: Ipv4Addr,
}

struct PingFlow {
    socket: OwnedFd,
    last: Instant,
}

/// The ping sockets.
pub struct IcmpNat {
    flows: HashMap<PingKey, PingFlow>,
    by_token: HashMap<u64, PingKey>,
    next_token: u64,
    warned: bool,
}

impl Default for IcmpNat {
    fn default() -> Self {
        IcmpNat {
            flows: HashMap::new(),
            by_token: HashMap::new(),
            next_token: TOKEN_BASE,
            warned: false,
        }
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl IcmpNat {
    /// Sends an echo request (`icmp` is the ICMP message: header and data) to `key.dst`,
    /// opening the flow's ping socket if needed.
    pub fn send(&mut self, key: PingKey, icmp: &[u8], epoll: &Epoll) {
        if let Err(e) = self.try_send(key, icmp, epoll) {
            if !self.warned {
                self.warned = true;
                log::warn!(
                    "net: cannot ping {} for the guest ({e}); allow ping sockets with sysctl net.ipv4.ping_group_range, or the guest's pings go unanswered",
                    key.dst
                );
            }
        }
    }

    fn try_send(&mut self, key: PingKey, icmp: &[u8], epoll: &Epoll) -> io::Result<()> {
        if !self.flows.contains_key(&key) {
            if self.flows.len() >= MAX_FLOWS {
                self.expire(epoll, Duration::ZERO);
            }
            // SAFETY: socket() has no memory effects; the fd is owned right below.
            let fd = cvt(unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_ICMP,
                )
            })?;
            // SAFETY: `fd` was just created and is owned by nobody else.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            let addr = crate::tcp_nat::sockaddr_in(SocketAddrV4::new(key.dst, 0));
            // SAFETY: `addr` is a valid sockaddr_in of the given length.
            cvt(unsafe {
                libc::connect(
                    socket.as_raw_fd(),
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            })?;
            let token = self.next_token;
            self.next_token += 1;
            epoll.ctl(
                ControlOperation::Add,
                socket.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )?;
            self.by_token.insert(token, key);
            self.flows.insert(
                key,
                PingFlow {
                    socket,
                    last: Instant::now(),
                },
            );
        }
        let Some(flow) = self.flows.get_mut(&key) else {
            return Ok(());
        };
        flow.last = Instant::now();
        // The kernel sets the identifier (the socket's own) and the checksum.
        // SAFETY: `icmp` is valid for its length.
        let n = unsafe { libc::send(flow.socket.as_raw_fd(), icmp.as_ptr().cast(), icmp.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The replies waiting on the ping socket of `token`: (flow, ICMP message with the
    /// kernel's identifier).
    pub fn recv(&mut self, token: u64, buf: &mut [u8]) -> Option<(PingKey, usize)> {
        let key = *self.by_token.get(&token)?;
        let flow = self.flows.get_mut(&key)?;
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                flow.socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return None;
        }
        flow.last = Instant::now();
        Some((key, n as usize))
    }

    /// Closes flows idle for at least `idle` (zero: all of them).
    fn expire(&mut self, epoll: &Epoll, idle: Duration) {
        let now = Instant::now();
        let old: Vec<PingKey> = self
            .flows
            .iter()
            .filter(|(_, f)| now.duration_since(f.last) >= idle)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            if let Some(f) = self.flows.remove(&k) {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    f.socket.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.by_token.retain(|_, v| *v != k);
        }
    }

    /// Open ping flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no ping flow is open.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Closes flows idle for 30 s.
    pub fn expire_idle(&mut self, epoll: &Epoll) {
        self.expire(epoll, IDLE);
    }
}
