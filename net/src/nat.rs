//! UDP NAT: each guest flow (guest port, destination) gets a connected host UDP socket of its
//! own, opened by this process. Datagrams go out as the guest sent them and replies come back
//! from the destination's address; flows idle for a minute are closed.
//!
//! Traffic to the host alias goes to the host's 127.0.0.1.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use log::debug;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// A flow idle this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Flows open at most; past it the oldest idle one is closed to make room.
pub const MAX_UDP_FLOWS: usize = 4096;

/// A guest flow: its source port and the destination it talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The guest's source port.
    pub guest_port: u16,
    /// The destination the guest addressed.
    pub dst: SocketAddrV4,
}

/// One flow's host socket.
pub struct UdpFlow {
    /// Connected to the real destination.
    pub socket: UdpSocket,
    /// Last datagram either way.
    pub last: Instant,
    /// The counters of the rule that let it through, if rules are set.
    pub counters: Option<std::sync::Arc<crate::rules::Counters>>,
}

/// The UDP flows, and the epoll their sockets wake.
pub struct UdpNat {
    flows: HashMap<FlowKey, UdpFlow>,
    by_token: HashMap<u64, FlowKey>,
    next_token: u64,
    host_alias: Ipv4Addr,
}

/// Tokens at or above this on the NAT's epoll are UDP flows; below are the stack's own.
pub const FLOW_TOKEN_BASE: u64 = 1 << 32;

impl UdpNat {
    /// An empty table; traffic to `host_alias` goes to 127.0.0.1.
    pub fn new(host_alias: Ipv4Addr) -> Self {
        UdpNat {
            flows: HashMap::new(),
            by_token: HashMap::new(),
            next_token: FLOW_TOKEN_BASE,
            host_alias,
        }
    }

    /// Where the host socket really connects for a guest destination.
    fn host_target(&self, dst: SocketAddrV4) -> SocketAddr {
        if *dst.ip() == self.host_alias {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port()))
        } else {
            SocketAddr::V4(dst)
        }
    }

    /// The host socket for `key`, opened (and registered on `epoll`) if new.
    pub fn flow(&mut self, key: FlowKey, epoll: &Epoll) -> io::Result<&mut UdpFlow> {
        if !self.flows.contains_key(&key) {
            if self.flows.len() >= MAX_UDP_FLOWS {
                self.evict_oldest(epoll);
            }
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.connect(self.host_target(key.dst))?;
            socket.set_nonblocking(true)?;
            let token = self.next_token;
            self.next_token += 1;
            epoll.ctl(
                ControlOperation::Add,
                socket.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )?;
            debug!(
                "nat: udp flow {}:{} -> {}",
                "guest", key.guest_port, key.dst
            );
            self.by_token.insert(token, key);
            self.flows.insert(
                key,
                UdpFlow {
                    socket,
                    last: Instant::now(),
                    counters: None,
                },
            );
        }
        // Present: inserted above or before.
        self.flows
            .get_mut(&key)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    /// The flow a ready epoll token belongs to.
    pub fn key_of(&self, token: u64) -> Option<FlowKey> {
        self.by_token.get(&token).copied()
    }

    /// The flow for `key`, if open.
    pub fn get_mut(&mut self, key: &FlowKey) -> Option<&mut UdpFlow> {
        self.flows.get_mut(key)
    }

    /// Closes flows idle longer than [`UDP_IDLE`].
    pub fn expire(&mut self, epoll: &Epoll) {
        let now = Instant::now();
        let idle: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| now.duration_since(f.last) > UDP_IDLE)
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.close(&k, epoll);
        }
    }

    fn evict_oldest(&mut self, epoll: &Epoll) {
        if let Some(k) = self
            .flows
            .iter()
            .min_by_key(|(_, f)| f.last)
            .map(|(k, _)| *k)
        {
            self.close(&k, epoll);
        }
    }

    fn close(&mut self, key: &FlowKey, epoll: &Epoll) {
        if let Some(f) = self.flows.remove(key) {
            let fd: RawFd = f.socket.as_raw_fd();
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.by_token.retain(|_, k| k != key);
        }
    }

    /// Open flows.
    pub fn keys(&self) -> impl Iterator<Item = &FlowKey> {
        self.flows.keys()
    }

    /// Open flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}
