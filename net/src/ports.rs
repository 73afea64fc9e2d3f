//! Published ports: host sockets whose traffic goes to the guest, as `docker run -p` does.
//!
//! [`Ports`] owns the table of published ports and their host sockets. It outlives any one
//! guest: the sockets stay bound while the VM reboots or QEMU restarts. Its own thread
//! (`ports`) waits on every listener:
//! - a TCP connection is accepted and, when a guest is attached, handed to the net stack, which
//!   opens the guest side ([`Ports::take_incoming`]); with no guest attached it is reset at once,
//!   so the client sees the refusal promptly instead of a hang;
//! - a UDP datagram is handed over the same way, or dropped with no guest.
//!
//! The stack learns of new work through an eventfd on its epoll ([`Ports::notify_fd`]).
//! Accepting is off the net thread (one hop per connection, not per byte); the data of a
//! connection moves on the net thread, between the accepted socket and the guest.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{PortSpec, Protocol};

mod bind;
mod sockets;
pub use bind::{bind_host_socket, os_reason, reset, unprivileged_port_start};
pub use sockets::{SocketError, SocketInfo, SocketSpec, DEFAULT_MODE};

/// Connections waiting for the net thread at most; past it, the listeners stop accepting
/// (clients wait in the kernel's backlog) until the net thread has taken them.
const MAX_INCOMING: usize = 4096;
/// The ports thread's epoll token for [`Ports::resume`].
const RESUME_TOKEN: u64 = u64::MAX;
/// Bytes of UDP datagrams waiting for the net thread at most; past it, datagrams are dropped.
const MAX_INCOMING_UDP_BYTES: usize = 4 << 20;
/// The listen backlog of published TCP ports: room for bursts of clients.
const BACKLOG: i32 = 1024;
/// Ports published at once, at most. Each holds a host socket (one descriptor) and a slot on
/// the ports thread's epoll; without a cap, API clients could publish until the process runs
/// out of descriptors and the guest's own connections fail. As many as the rules allow
/// (`rules::MAX_RULES`), which is more than any one VM has asked for.
pub const MAX_PORTS: usize = 1024;

/// What identifies a published port on the host: protocol, bind address and host port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The host address.
    pub bind: IpAddr,
    /// The host port.
    pub host_port: u16,
}

impl PortKey {
    /// The key of `spec`.
    pub fn of(spec: &PortSpec) -> Self {
        PortKey {
            protocol: spec.protocol,
            bind: spec.bind,
            host_port: spec.host_port,
        }
    }
}

/// Why a port could not be published.
#[derive(Debug)]
pub enum PublishError {
    /// The host socket cannot be had (in use, not allowed, no such address).
    Unavailable {
        /// What was asked for.
        spec: PortSpec,
        /// The guest address it forwards to.
        guest: Ipv4Addr,
        /// What the host said, in words ("address already in use").
        reason: String,
        /// What to do about it.
        hint: String,
    },
    /// The same protocol, address and host port is published already.
    Exists(PortSpec),
    /// [`MAX_PORTS`] ports are published already.
    Full,
}

impl PublishError {
    /// What to do about it, in one sentence.
    pub fn hint(&self) -> String {
        match self {
            PublishError::Unavailable { hint, .. } => hint.clone(),
            PublishError::Exists(_) => "unpublish it first, or pick another host port".to_string(),
            PublishError::Full => {
                "unpublish a port no longer needed; `ferry ctl ports` lists them".to_string()
            }
        }
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Docker's words, which users search for.
            PublishError::Unavailable {
                spec,
                guest,
                reason,
                ..
            } => write!(
                f,
                "Ports are not available: exposing port {} {} -> {guest}:{}: {reason}",
                spec.protocol.to_string().to_uppercase(),
                host_endpoint(spec),
                spec.guest_port
            ),
            PublishError::Exists(spec) => write!(
                f,
                "port {} {} is published already (to guest port {})",
                spec.protocol.to_string().to_uppercase(),
                host_endpoint(spec),
                spec.guest_port
            ),
            PublishError::Full => write!(
                f,
                "{MAX_PORTS} ports are published, the most allowed; unpublish one first"
            ),
        }
    }
}

impl std::error::Error for PublishError {}

/// `0.0.0.0:8080`, `[::1]:8080`.
pub fn host_endpoint(spec: &PortSpec) -> String {
    SocketAddr::new(spec.bind, spec.host_port).to_string()
}

/// Binds privileged ports for an unprivileged ferry (the `ferry portd` client): returns the
/// bound socket (listening, for TCP), or an error whose text says what to do.
pub type PrivilegedBinder = Box<dyn Fn(&PortSpec) -> Result<OwnedFd, String> + Send + Sync>;

/// A connection or datagram for the guest.
pub enum Incoming {
    /// An accepted TCP connection to `guest_port`.
    Tcp {
        /// The host side.
        stream: TcpStream,
        /// Who connected.
        client: SocketAddr,
        /// The published host port it came in on.
        host_port: u16,
        /// Where it goes in the guest.
        guest_port: u16,
    },
    /// A datagram to `guest_port`; replies go back through `socket` to `client`.
    Udp {
        /// The published socket (weak: unpublishing closes it even while flows remember it).
        socket: Weak<UdpSocket>,
        /// Who sent it.
        client: SocketAddr,
        /// The published host port it came in on.
        host_port: u16,
        /// Where it goes in the guest.
        guest_port: u16,
        /// The payload.
        data: Vec<u8>,
    },
    /// An accepted connection to a forwarded UNIX socket, for `guest_port`.
    Unix {
        /// The host side.
        stream: std::os::unix::net::UnixStream,
        /// Where it goes in the guest.
        guest_port: u16,
    },
}

/// Counters of one published port.
#[derive(Clone, Copy, Debug, Default)]
pub struct PortCounters {
    /// Connections (TCP) or datagrams (UDP) handed to the net stack for the guest. Inbound
    /// rules may still refuse them there; the rules' counters say so.
    pub forwarded: u64,
    /// Connections reset, or datagrams dropped, because no guest was attached or the queue
    /// to the guest was full.
    pub refused: u64,
}

/// One published port, as listed.
#[derive(Clone, Copy, Debug)]
pub struct PortInfo {
    /// What was published (with the bind address made explicit).
    pub spec: PortSpec,
    /// Its counters.
    pub counters: PortCounters,
}

enum HostSocket {
    Tcp(Arc<TcpListener>),
    Udp(Arc<UdpSocket>),
}

struct Entry {
    spec: PortSpec,
    socket: HostSocket,
    counters: PortCounters,
}

struct Inner {
    ports: BTreeMap<PortKey, Entry>,
    by_token: HashMap<u64, PortKey>,
    next_token: u64,
    incoming: VecDeque<Incoming>,
    incoming_udp_bytes: usize,
    /// Listeners that stopped accepting while the queue was full: (token, fd).
    paused: Vec<(u64, RawFd)>,
    /// Forwarded UNIX sockets, by path, and their epoll tokens (from the same counter).
    sockets: BTreeMap<std::path::PathBuf, sockets::SocketEntry>,
    socket_tokens: HashMap<u64, std::path::PathBuf>,
}

/// The published ports of one ferry process.
pub struct Ports {
    inner: Mutex<Inner>,
    /// The ports thread's epoll: one registration per host socket.
    epoll: Epoll,
    /// Tells the net stack that [`take_incoming`](Self::take_incoming) has something.
    notify: EventFd,
    /// Tells the ports thread that the net stack took the queue, so paused listeners accept
    /// again.
    resume: EventFd,
    attached: AtomicBool,
    guest: Ipv4Addr,
    privileged: Option<PrivilegedBinder>,
    /// Datagram buffers the stack handed back, for reuse: steady UDP allocates nothing.
    spare: Mutex<Vec<Vec<u8>>>,
    /// Where port and guest events go (`--audit-log`), once set.
    audit: std::sync::OnceLock<ferry_audit::Audit>,
}

/// Datagrams a published UDP port's event reads at most.
const UDP_BATCH: usize = 64;

/// Connections a published TCP port's event accepts at most.
const ACCEPT_BATCH: usize = 64;

/// Datagram buffers kept for reuse at most.
const SPARE_BUFFERS: usize = 256;

/// Drops `socket`, closing it, once no one else holds it (a clone lives only while the ports
/// thread reads a batch from it or the stack sends on it, so this waits a moment; 5 s at most,
/// for a thread the machine's load keeps from running); false if it stayed shared.
fn close_when_alone<T>(mut socket: Arc<T>) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(socket) {
            Ok(s) => {
                drop(s);
                return true;
            }
            Err(shared) if std::time::Instant::now() < deadline => {
                socket = shared;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(_) => return false,
        }
    }
}

impl Ports {
    /// No ports yet; `guest` is the guest's address (for messages), `privileged` binds ports
    /// below `ip_unprivileged_port_start` when this process may not. Starts the `ports` thread.
    pub fn new(guest: Ipv4Addr, privileged: Option<PrivilegedBinder>) -> io::Result<Arc<Self>> {
        let ports = Arc::new(Ports {
            inner: Mutex::new(Inner {
                ports: BTreeMap::new(),
                by_token: HashMap::new(),
                next_token: 1,
                incoming: VecDeque::new(),
                incoming_udp_bytes: 0,
                paused: Vec::new(),
                sockets: BTreeMap::new(),
                socket_tokens: HashMap::new(),
            }),
            epoll: Epoll::new()?,
            notify: EventFd::new(EFD_NONBLOCK)?,
            resume: EventFd::new(EFD_NONBLOCK)?,
            attached: AtomicBool::new(false),
            guest,
            privileged,
            spare: Mutex::new(Vec::new()),
            audit: std::sync::OnceLock::new(),
        });
        ports.epoll.ctl(
            ControlOperation::Add,
            ports.resume.as_raw_fd(),
            EpollEvent::new(EventSet::IN, RESUME_TOKEN),
        )?;
        let weak = Arc::downgrade(&ports);
        std::thread::Builder::new()
            .name("ports".into())
            .spawn(move || run(weak))?;
        Ok(ports)
    }

    /// Sends port, socket and guest events to `audit` from now on.
    pub fn set_audit(&self, audit: ferry_audit::Audit) {
        let _ = self.audit.set(audit);
    }

    fn emit(&self, event: &str, fields: ferry_audit::Value) {
        if let Some(a) = self.audit.get() {
            a.emit(event, fields);
        }
    }

    /// Whether `spec` may be published: not published already, and room in the table. The
    /// duplicate is reported first: it says more than "full" does.
    fn check_room(inner: &Inner, spec: &PortSpec) -> Result<(), PublishError> {
        if inner.ports.contains_key(&PortKey::of(spec)) {
            return Err(PublishError::Exists(*spec));
        }
        if inner.ports.len() >= MAX_PORTS {
            return Err(PublishError::Full);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the ports down with it: the table stays consistent
        // between statements.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `spec`: binds its host socket now (so a conflict is reported now). Refused
    /// with [`PublishError::Full`] once [`MAX_PORTS`] are published.
    pub fn publish(&self, spec: PortSpec) -> Result<PortInfo, PublishError> {
        let key = PortKey::of(&spec);
        Self::check_room(&self.lock(), &spec)?;
        let fd = self.bind(&spec)?;
        let token;
        {
            let mut inner = self.lock();
            // Checked again: another caller may have published while this one was binding.
            Self::check_room(&inner, &spec)?;
            token = inner.next_token;
            inner.next_token += 1;
            let raw = fd.as_raw_fd();
            let socket = match spec.protocol {
                Protocol::Tcp => HostSocket::Tcp(Arc::new(TcpListener::from(fd))),
                Protocol::Udp => HostSocket::Udp(Arc::new(UdpSocket::from(fd))),
            };
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                raw,
                EpollEvent::new(EventSet::IN, token),
            ) {
                return Err(self.unavailable(&spec, &e, "check the process's limits".into()));
            }
            inner.by_token.insert(token, key);
            inner.ports.insert(
                key,
                Entry {
                    spec,
                    socket,
                    counters: PortCounters::default(),
                },
            );
        }
        self.emit(
            "port_published",
            ferry_audit::json!({
                "proto": spec.protocol.to_string(),
                "host": host_endpoint(&spec),
                "guest_port": spec.guest_port,
            }),
        );
        log::info!(
            "ports: publishing {} {} -> {}:{}",
            spec.protocol.to_string().to_uppercase(),
            host_endpoint(&spec),
            self.guest,
            spec.guest_port
        );
        Ok(PortInfo {
            spec,
            counters: PortCounters::default(),
        })
    }

    /// Unpublishes a port: its host socket closes now. Connections already open stay open.
    /// Returns what was published, or `None` if nothing was.
    pub fn unpublish(&self, key: &PortKey) -> Option<PortSpec> {
        let entry = {
            let mut inner = self.lock();
            let entry = inner.ports.remove(key)?;
            inner.by_token.retain(|_, k| k != key);
            entry
        };
        let fd = match &entry.socket {
            HostSocket::Tcp(l) => l.as_raw_fd(),
            HostSocket::Udp(s) => s.as_raw_fd(),
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.emit(
            "port_unpublished",
            ferry_audit::json!({
                "proto": entry.spec.protocol.to_string(),
                "host": host_endpoint(&entry.spec),
                "guest_port": entry.spec.guest_port,
            }),
        );
        log::info!(
            "ports: unpublished {} {}",
            entry.spec.protocol.to_string().to_uppercase(),
            host_endpoint(&entry.spec)
        );
        // The port is free when this returns, for a program (or a publish) that binds it next:
        // the ports thread and the stack hold a clone of the socket only while they use it.
        let closed = match entry.socket {
            HostSocket::Tcp(l) => close_when_alone(l),
            HostSocket::Udp(s) => close_when_alone(s),
        };
        if !closed {
            log::warn!(
                "ports: {} stays bound a while longer: the socket is in use",
                host_endpoint(&entry.spec)
            );
        }
        Some(entry.spec)
    }

    /// The published ports, in order.
    pub fn list(&self) -> Vec<PortInfo> {
        self.lock()
            .ports
            .values()
            .map(|e| PortInfo {
                spec: e.spec,
                counters: e.counters,
            })
            .collect()
    }

    /// The guest address ports forward to.
    pub fn guest(&self) -> Ipv4Addr {
        self.guest
    }

    /// Whether a guest is attached (connections are forwarded) or not (they are reset).
    pub fn set_attached(&self, attached: bool) {
        let was = self.attached.swap(attached, Ordering::SeqCst);
        if was != attached {
            self.emit(
                if attached {
                    "guest_attached"
                } else {
                    "guest_detached"
                },
                ferry_audit::json!({}),
            );
        }
        if !attached {
            // What the last guest never took: refuse it now.
            let pending: Vec<_> = {
                let mut inner = self.lock();
                inner.incoming_udp_bytes = 0;
                inner.incoming.drain(..).collect()
            };
            for i in pending {
                if let Incoming::Tcp { stream, .. } = i {
                    reset(stream);
                }
            }
        }
    }

    /// Whether a guest is attached.
    pub fn attached(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }

    /// The fd the net stack watches: readable when [`take_incoming`](Self::take_incoming) has
    /// something.
    pub fn notify_fd(&self) -> RawFd {
        self.notify.as_raw_fd()
    }

    /// Everything waiting for the guest, oldest first.
    pub fn take_incoming(&self, into: &mut Vec<Incoming>) {
        let _ = self.notify.read();
        let mut inner = self.lock();
        inner.incoming_udp_bytes = 0;
        into.extend(inner.incoming.drain(..));
        if !inner.paused.is_empty() {
            let _ = self.resume.write(1);
        }
    }

    /// Gives back a datagram's buffer (from [`Incoming::Udp`]) once its data went to the guest.
    pub fn recycle(&self, data: Vec<u8>) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(data);
        }
    }

    fn unavailable(&self, spec: &PortSpec, e: &io::Error, hint: String) -> PublishError {
        PublishError::Unavailable {
            spec: *spec,
            guest: self.guest,
            reason: os_reason(e),
            hint,
        }
    }

    /// The host socket for `spec`: bound here, or by the privileged helper for a low port this
    /// process may not bind.
    fn bind(&self, spec: &PortSpec) -> Result<OwnedFd, PublishError> {
        match bind_host_socket(spec) {
            Ok(fd) => Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                let start = unprivileged_port_start();
                match &self.privileged {
                    Some(helper) if spec.host_port < start => {
                        helper(spec).map_err(|why| PublishError::Unavailable {
                            spec: *spec,
                            guest: self.guest,
                            reason: why,
                            hint: "start the helper as root with `ferry portd --allow-uid UID`, or publish a port at or above net.ipv4.ip_unprivileged_port_start".into(),
                        })
                    }
                    _ => Err(self.unavailable(
                        spec,
                        &e,
                        format!("ports below {start} need root or `ferry portd`; pick a host port at or above {start}"),
                    )),
                }
            }
            Err(e) => {
                let hint = match e.raw_os_error() {
                    Some(libc::EADDRINUSE) => {
                        "stop the program that holds it (`ss -lntup` names it) or pick another host port"
                    }
                    Some(libc::EADDRNOTAVAIL) => {
                        "bind to an address this host has (see `ip addr`), or to 0.0.0.0"
                    }
                    _ => "check the address and port",
                };
                Err(self.unavailable(spec, &e, hint.into()))
            }
        }
    }

    /// A ready host socket: accept or receive what it has.
    fn ready(&self, token: u64, buf: &mut [u8]) {
        if token == RESUME_TOKEN {
            let _ = self.resume.read();
            let mut inner = self.lock();
            let paused = std::mem::take(&mut inner.paused);
            for (token, fd) in paused {
                // A port unpublished meanwhile: its descriptor may now be another's.
                let same = inner
                    .by_token
                    .get(&token)
                    .and_then(|k| inner.ports.get(k))
                    .is_some_and(
                        |e| matches!(&e.socket, HostSocket::Tcp(l) if l.as_raw_fd() == fd),
                    )
                    || inner
                        .socket_tokens
                        .get(&token)
                        .and_then(|p| inner.sockets.get(p))
                        .is_some_and(|e| e.listener.as_raw_fd() == fd);
                if !same {
                    continue;
                }
                let _ = self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                );
            }
            return;
        }
        let socket = {
            let inner = self.lock();
            if let Some((path, e)) = inner
                .socket_tokens
                .get(&token)
                .and_then(|p| inner.sockets.get_key_value(p))
            {
                let (path, listener) = (path.clone(), e.listener.clone());
                drop(inner);
                self.accept_unix_all(token, &path, &listener);
                return;
            }
            let Some(entry) = inner.by_token.get(&token).and_then(|k| inner.ports.get(k)) else {
                return;
            };
            match &entry.socket {
                HostSocket::Tcp(l) => (entry.spec, Some(l.clone()), None),
                HostSocket::Udp(s) => (entry.spec, None, Some(s.clone())),
            }
        };
        match socket {
            (spec, Some(listener), _) => self.accept_batch(token, &spec, &listener),
            (spec, _, Some(udp)) => self.receive_batch(&spec, &udp, buf),
            _ => {}
        }
    }

    /// Queues `item` for the guest; gives it back when no guest is attached or the queue is
    /// full. `udp_bytes` is the datagram's size (0 for a connection).
    fn offer(&self, item: Incoming, udp_bytes: usize) -> Result<(), Incoming> {
        if !self.attached() {
            return Err(item);
        }
        let mut inner = self.lock();
        if inner.incoming.len() >= MAX_INCOMING
            || inner.incoming_udp_bytes + udp_bytes > MAX_INCOMING_UDP_BYTES
        {
            return Err(item);
        }
        inner.incoming_udp_bytes += udp_bytes;
        inner.incoming.push_back(item);
        Ok(())
    }

    fn count(&self, spec: &PortSpec, forwarded: u64, refused: u64) {
        if let Some(e) = self.lock().ports.get_mut(&PortKey::of(spec)) {
            e.counters.forwarded += forwarded;
            e.counters.refused += refused;
        }
    }

    /// Takes a batch of the clients waiting on a published TCP port: to the guest, or reset
    /// when none is attached. A batch, as for UDP: the listener is watched level-triggered,
    /// and a port flooded with connections would otherwise hold the thread while every other
    /// port waited.
    fn accept_batch(&self, token: u64, spec: &PortSpec, listener: &TcpListener) {
        let (mut forwarded, mut refused) = (0, 0);
        for _ in 0..ACCEPT_BATCH {
            if self.attached() {
                let mut inner = self.lock();
                if inner.incoming.len() >= MAX_INCOMING {
                    // Backpressure, not resets: the listener waits (its clients in the kernel's
                    // backlog) until the net thread has taken the queue.
                    let fd = listener.as_raw_fd();
                    let _ = self.epoll.ctl(
                        ControlOperation::Modify,
                        fd,
                        EpollEvent::new(EventSet::empty(), token),
                    );
                    inner.paused.push((token, fd));
                    break;
                }
            }
            let (stream, client) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, most likely: the connection stays in the backlog.
                    log::warn!(
                        "ports: cannot accept on {}: {e}; raise the open-file limit",
                        host_endpoint(spec)
                    );
                    break;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                reset(stream);
                refused += 1;
                continue;
            }
            let _ = stream.set_nodelay(true);
            let item = Incoming::Tcp {
                stream,
                client,
                host_port: spec.host_port,
                guest_port: spec.guest_port,
            };
            match self.offer(item, 0) {
                Ok(()) => forwarded += 1,
                Err(item) => {
                    log::debug!(
                        "ports: {client} -> {}: no guest attached; reset",
                        host_endpoint(spec)
                    );
                    if let Incoming::Tcp { stream, .. } = item {
                        reset(stream);
                    }
                    refused += 1;
                }
            }
        }
        if forwarded > 0 {
            let _ = self.notify.write(1);
        }
        self.count(spec, forwarded, refused);
    }

    fn receive_batch(&self, spec: &PortSpec, socket: &Arc<UdpSocket>, buf: &mut [u8]) {
        let (mut forwarded, mut dropped) = (0, 0);
        // A batch at a time: the socket is watched level-triggered, so what is left wakes the
        // thread again, after the other ports' events. Reading until the socket is empty let
        // one flooded port hold the thread (every other port's clients waited) and its
        // socket (an unpublish could not close it).
        for _ in 0..UDP_BATCH {
            let (n, client) = match socket.recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let mut data = self
                .spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_default();
            data.clear();
            data.extend_from_slice(&buf[..n]);
            let item = Incoming::Udp {
                socket: Arc::downgrade(socket),
                client,
                host_port: spec.host_port,
                guest_port: spec.guest_port,
                data,
            };
            match self.offer(item, n) {
                Ok(()) => forwarded += 1,
                Err(item) => {
                    dropped += 1;
                    if let Incoming::Udp { data, .. } = item {
                        self.recycle(data);
                    }
                }
            }
        }
        if forwarded > 0 {
            let _ = self.notify.write(1);
        }
        self.count(spec, forwarded, dropped);
    }
}

/// The ports thread: waits on every published socket until the table is dropped.
fn run(ports: Weak<Ports>) {
    let mut events = [EpollEvent::default(); 64];
    let mut buf = vec![0u8; 65536];
    loop {
        let Some(p) = ports.upgrade() else {
            return;
        };
        // A timeout, so the thread notices when the table is dropped (tests make many).
        let n = match p.epoll.wait(1000, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("ports: cannot wait for connections: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        for e in &events[..n] {
            p.ready(e.data(), &mut buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port unpublished is free when `unpublish` returns, even while datagrams stream in
    /// (the ports thread holds the socket while it reads them).
    #[test]
    fn an_unpublished_port_is_free_at_once() {
        let _no_child_holds_it = crate::SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let ports = Ports::new(Ipv4Addr::new(192, 168, 127, 2), None).expect("ports");
        // Below the ephemeral range, so the other tests' sockets bound to port 0 never take
        // it between rounds, and above the ports `publishing_stops_at_max_ports` fills from
        // 20000 at the same time.
        let port = (31000..32700)
            .find(|p| std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok())
            .expect("a free port");
        let spec = PortSpec {
            protocol: Protocol::Udp,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port: port,
            guest_port: 53,
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = c.send_to(&[7u8; 512], ("127.0.0.1", port));
                }
            })
        };
        for round in 0..50 {
            ports.publish(spec).expect("publish");
            std::thread::sleep(std::time::Duration::from_millis(2));
            assert!(ports.unpublish(&PortKey::of(&spec)).is_some());
            let again = std::net::UdpSocket::bind(("127.0.0.1", port));
            assert!(
                again.is_ok(),
                "round {round}: the port is still bound: {again:?}"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sender.join().unwrap();
    }

    /// One event takes a batch of a flooded port's clients, and leaves the rest for the next.
    #[test]
    fn a_port_flooded_with_connections_takes_a_batch_per_event() {
        let ports = Ports::new(Ipv4Addr::new(192, 168, 127, 2), None).expect("ports");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let at = listener.local_addr().unwrap();
        let clients: Vec<_> = (0..ACCEPT_BATCH + 36)
            .map(|_| std::net::TcpStream::connect(at).unwrap())
            .collect();
        let spec = PortSpec {
            protocol: Protocol::Tcp,
            bind: at.ip(),
            host_port: at.port(),
            guest_port: 80,
        };
        // No guest is attached: each client taken is reset.
        ports.accept_batch(0, &spec, &listener);
        let mut left = 0;
        while listener.accept().is_ok() {
            left += 1;
        }
        assert_eq!(left, 36, "one event took {} of them", clients.len() - left);
    }

    /// The table stops at MAX_PORTS, with the error the API and `ferry ctl` show, and takes
    /// a port again once one is unpublished.
    #[test]
    fn publishing_stops_at_max_ports() {
        let ports = Ports::new(Ipv4Addr::new(192, 168, 127, 2), None).expect("ports");
        let spec = |host_port| PortSpec {
            protocol: Protocol::Udp,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port,
            guest_port: 53,
        };
        // Ports other programs hold are skipped: only the count matters.
        let mut published = Vec::new();
        for p in 20000..=u16::MAX {
            if published.len() == MAX_PORTS {
                break;
            }
            if ports.publish(spec(p)).is_ok() {
                published.push(p);
            }
        }
        assert_eq!(published.len(), MAX_PORTS);
        let e = ports.publish(spec(1)).expect_err("one port too many");
        assert!(matches!(e, PublishError::Full), "{e}");
        assert_eq!(
            e.to_string(),
            "1024 ports are published, the most allowed; unpublish one first"
        );
        // A duplicate still says so, rather than "full".
        let dup = ports
            .publish(spec(published[0]))
            .expect_err("published already");
        assert!(matches!(dup, PublishError::Exists(_)), "{dup}");
        assert!(ports.unpublish(&PortKey::of(&spec(published[0]))).is_some());
        assert!(ports.publish(spec(published[0])).is_ok());
    }
}
