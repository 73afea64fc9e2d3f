//! The DNS servers the gateway forwards to: every one the host has, in order, with failover,
//! following the host's resolv.conf as it changes.
//!
//! Theory of operation. The servers come from `--dns-upstream` (fixed) or from a resolv.conf
//! (the host's by default), which is looked at again every `RECHECK` (a stat: path, inode,
//! size and mtime; the file is often a symlink that the network manager or a VPN client
//! replaces) and re-read when it changed, so a laptop that joins a VPN or another network
//! keeps resolving without a ferry restart. Each server has its own connected UDP socket: a
//! server that is not there answers with ICMP, which a connected socket reports
//! (ECONNREFUSED), so failing over to the next costs no timeout. A query goes to the server
//! that answered last; if no answer comes within `TIMEOUT` it goes to the next one (same id:
//! the first answer wins), and when every server has had its turn the guest gets SERVFAIL.
//! An answer is taken only from the server the query was last sent to, with the id ferry
//! gave it (an off-path guess must match both). What the servers answer goes back to the
//! guest unchanged but for the id.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::flow::Token;

/// How long a server has to answer before the query goes to the next one: well inside a
/// guest resolver's own timeout (5 s by default for glibc and musl), so a dead first server
/// costs the guest one slow answer, not a failed lookup.
pub(super) const TIMEOUT: Duration = Duration::from_millis(1500);
/// How often the resolv.conf is looked at for changes.
const RECHECK: Duration = Duration::from_secs(2);
/// Servers used at most (glibc reads 3; more only spreads the failover thinner).
const MAX_SERVERS: usize = 8;

/// Where the servers come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsSource {
    /// These servers, in order (`--dns-upstream`).
    Servers(Vec<SocketAddr>),
    /// The `nameserver` lines of this resolv.conf, followed as it changes.
    ResolvConf(PathBuf),
}

/// The servers of a resolv.conf's text, in order: IPv4 and IPv6 `nameserver` lines, port 53.
/// A link-local IPv6 server with a zone (`fe80::1%eth0`) is kept with its zone's index.
pub fn servers_of(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| {
            let (addr, zone) = a.split_once('%').map_or((a, None), |(a, z)| (a, Some(z)));
            let ip: std::net::IpAddr = addr.parse().ok()?;
            match (ip, zone) {
                (std::net::IpAddr::V6(v6), Some(z)) => {
                    let index = std::ffi::CString::new(z).ok().map_or(0, |c| {
                        // SAFETY: `c` is a valid NUL-terminated string.
                        unsafe { libc::if_nametoindex(c.as_ptr()) }
                    });
                    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                        v6, 53, 0, index,
                    )))
                }
                _ => Some(SocketAddr::new(ip, 53)),
            }
        })
        .take(MAX_SERVERS)
        .collect()
}

/// The search domains of a resolv.conf's text: its last `search` or `domain` line (as the
/// resolver reads them), at most 6, `ferry.internal` left out (the guest gets it first anyway).
pub fn search_of(resolv_conf: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in resolv_conf.lines() {
        let mut w = l.split_whitespace();
        if matches!(w.next(), Some("search" | "domain")) {
            out = w
                .filter_map(crate::names::normalize)
                .filter(|n| n != crate::dhcp::DOMAIN)
                .take(6)
                .collect();
        }
    }
    out
}

/// One server and the socket connected to it.
struct Server {
    addr: SocketAddr,
    socket: Option<UdpSocket>,
}

use crate::names::{stamp, Stamp};

/// The servers and their sockets.
pub(super) struct Upstreams {
    source: DnsSource,
    servers: Vec<Server>,
    /// Split DNS: names under a suffix go to that zone's own server (`--dns-zone`), never to
    /// the others (a VPN's internal names must not leak to a public resolver).
    zones: Vec<(String, Server)>,
    /// The server that answered last: queries go there first.
    preferred: usize,
    stamp: Option<Stamp>,
    checked: Instant,
    /// The resolv.conf's search domains.
    search: Vec<String>,
}

impl Upstreams {
    /// The servers of `source`, their sockets registered on `epoll`.
    pub(super) fn new(source: DnsSource, epoll: &Epoll) -> Self {
        let mut u = Upstreams {
            source,
            servers: Vec::new(),
            zones: Vec::new(),
            preferred: 0,
            stamp: None,
            checked: Instant::now(),
            search: Vec::new(),
        };
        let addrs = match &u.source {
            DnsSource::Servers(s) => s.clone(),
            DnsSource::ResolvConf(p) => {
                u.stamp = stamp(p);
                let (addrs, search) = Self::read(p);
                u.search = search;
                addrs
            }
        };
        u.set(addrs, epoll);
        if u.servers.is_empty() && matches!(u.source, DnsSource::ResolvConf(_)) {
            log::warn!("net: no DNS upstream ({}): names outside ferry.internal get SERVFAIL until one appears", u.describe());
        }
        u
    }

    fn describe(&self) -> String {
        match &self.source {
            DnsSource::Servers(_) => "none given".into(),
            DnsSource::ResolvConf(p) => format!("no nameserver in {}", p.display()),
        }
    }

    fn read(path: &Path) -> (Vec<SocketAddr>, Vec<String>) {
        std::fs::read_to_string(path)
            .map(|t| (servers_of(&t), search_of(&t)))
            .unwrap_or_default()
    }

    /// The host's search domains (from the resolv.conf; none with fixed servers).
    pub(super) fn search(&self) -> &[String] {
        &self.search
    }

    /// Replaces the servers with `addrs` (sockets of servers still in the list are kept).
    fn set(&mut self, addrs: Vec<SocketAddr>, epoll: &Epoll) {
        let mut old = std::mem::take(&mut self.servers);
        for addr in addrs {
            if let Some(i) = old.iter().position(|s| s.addr == addr) {
                self.servers.push(old.swap_remove(i));
                continue;
            }
            let socket = connect(addr, epoll)
                .map_err(|e| {
                    // Offline, or the VPN is not up yet: ferry starts all the same, and the
                    // next query tries again.
                    log::warn!("dns: the upstream {addr} cannot be reached now ({e}); ferry tries it again with the next query");
                })
                .ok();
            self.servers.push(Server { addr, socket });
        }
        for s in old {
            if let Some(sock) = s.socket {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    sock.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        self.preferred = 0;
    }

    /// Looks at the resolv.conf again, at most every [`RECHECK`]; true when the servers or
    /// the search domains changed.
    pub(super) fn follow(&mut self, epoll: &Epoll) -> bool {
        let DnsSource::ResolvConf(path) = &self.source else {
            return false;
        };
        if self.checked.elapsed() < RECHECK {
            return false;
        }
        self.checked = Instant::now();
        let now = stamp(path);
        if now == self.stamp {
            return false;
        }
        self.stamp = now;
        let path = path.clone();
        let (addrs, search) = Self::read(&path);
        let search_changed = search != self.search;
        self.search = search;
        if addrs == self.addrs() {
            return search_changed;
        }
        log::info!(
            "dns: {} changed: forwarding to {}",
            path.display(),
            if addrs.is_empty() {
                "nobody (SERVFAIL)".to_string()
            } else {
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        self.set(addrs, epoll);
        true
    }

    /// The servers, in order.
    pub(super) fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.addr).collect()
    }

    /// How many servers there are.
    pub(super) fn len(&self) -> usize {
        self.servers.len()
    }

    /// The servers, the one queries go to first leading.
    pub(super) fn in_use(&self) -> Vec<SocketAddr> {
        let n = self.servers.len();
        (0..n)
            .map(|i| self.servers[(self.preferred + i) % n].addr)
            .collect()
    }

    /// Sends names under `suffix` to `server` only.
    pub(super) fn add_zone(&mut self, suffix: &str, server: SocketAddr, epoll: &Epoll) {
        let socket = connect(server, epoll)
            .map_err(|e| log::warn!("dns: the server {server} of zone {suffix} cannot be reached now ({e}); ferry tries it again with the next query"))
            .ok();
        self.zones.push((
            suffix.to_string(),
            Server {
                addr: server,
                socket,
            },
        ));
    }

    /// The zone `name` (lowercase, no trailing dot) is in, if any: the longest suffix.
    /// The split zones: each suffix and its server.
    pub(super) fn zones(&self) -> Vec<(String, SocketAddr)> {
        self.zones
            .iter()
            .map(|(z, s)| (z.clone(), s.addr))
            .collect()
    }

    pub(super) fn zone_of(&self, name: &str) -> Option<usize> {
        self.zones
            .iter()
            .enumerate()
            .filter(|(_, (z, _))| in_zone(name, z))
            .max_by_key(|(_, (z, _))| z.len())
            .map(|(i, _)| i)
    }

    /// Sends `query` to zone `i`'s server; where it went.
    pub(super) fn send_zone(
        &mut self,
        i: usize,
        query: &[u8],
        epoll: &Epoll,
    ) -> Option<SocketAddr> {
        let (_, s) = self.zones.get_mut(i)?;
        if s.socket.is_none() {
            s.socket = connect(s.addr, epoll).ok();
        }
        s.socket.as_ref()?.send(query).ok()?;
        Some(s.addr)
    }

    /// Whether there is any server to ask.
    pub(super) fn any(&self) -> bool {
        !self.servers.is_empty() || !self.zones.is_empty()
    }

    /// The server DNS over TCP to the gateway goes to: the preferred one.
    pub(super) fn preferred(&self) -> Option<SocketAddr> {
        self.servers.get(self.preferred).map(|s| s.addr)
    }

    /// Sends `query` to the server `tries` places after the preferred one; the address it
    /// went to, or None when that server cannot be sent to (the caller tries the next).
    pub(super) fn send(&mut self, tries: usize, query: &[u8], epoll: &Epoll) -> Option<SocketAddr> {
        let n = self.servers.len();
        if n == 0 || tries >= n {
            return None;
        }
        let s = &mut self.servers[(self.preferred + tries) % n];
        if s.socket.is_none() {
            s.socket = connect(s.addr, epoll).ok();
        }
        let sock = s.socket.as_ref()?;
        match sock.send(query) {
            Ok(_) => Some(s.addr),
            Err(_) => None,
        }
    }

    /// Marks `addr` as the server that answered: the next queries go there first.
    pub(super) fn answered(&mut self, addr: SocketAddr) {
        if let Some(i) = self.servers.iter().position(|s| s.addr == addr) {
            self.preferred = i;
        }
    }

    /// Reads what the servers sent, as (server, answer length in `buf`), calling `each` per
    /// datagram; servers that refused (nothing listens there) are passed with `None`.
    pub(super) fn drain(
        &mut self,
        buf: &mut [u8],
        mut each: impl FnMut(SocketAddr, Option<&mut [u8]>),
    ) {
        for s in self.servers.iter().chain(self.zones.iter().map(|(_, s)| s)) {
            let Some(sock) = &s.socket else {
                continue;
            };
            loop {
                match sock.recv(buf) {
                    Ok(n) => each(s.addr, Some(&mut buf[..n])),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => each(s.addr, None),
                    Err(_) => break,
                }
            }
        }
    }
}
/// Whether `name` is zone `zone` or a name under it.
pub(super) fn in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || name
            .strip_suffix(zone)
            .is_some_and(|head| head.ends_with('.'))
}

/// A non-blocking UDP socket connected to `addr`, on `epoll` as the DNS upstream.
fn connect(addr: SocketAddr, epoll: &Epoll) -> io::Result<UdpSocket> {
    let s = super::udp_flows::udp_host_socket(addr)?;
    epoll.ctl(
        ControlOperation::Add,
        s.as_raw_fd(),
        EpollEvent::new(EventSet::IN, Token::DnsUpstream.to_u64()),
    )?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nameserver_in_order_of_either_family() {
        let t =
            "# generated\nsearch corp.example\nnameserver 10.0.0.53\nnameserver  2001:db8::53 \n\
                 nameserver bogus\noptions edns0\nnameserver 10.0.0.54\n";
        assert_eq!(
            servers_of(t),
            vec![
                "10.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                "10.0.0.54:53".parse().unwrap(),
            ]
        );
        assert!(servers_of("").is_empty());
        assert_eq!(search_of(t), vec!["corp.example".to_string()]);
        assert_eq!(
            search_of("domain a.test\nsearch b.test ferry.internal c.test\n"),
            vec!["b.test".to_string(), "c.test".to_string()]
        );
        let lo = servers_of("nameserver fe80::1%lo\n");
        assert!(matches!(lo[0], SocketAddr::V6(a) if a.scope_id() == 1));
    }

    #[test]
    fn a_replaced_resolv_conf_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.conf");
        let b = dir.path().join("b.conf");
        let link = dir.path().join("resolv.conf");
        std::fs::write(&a, "nameserver 127.0.0.1\n").unwrap();
        std::fs::write(&b, "nameserver 127.0.0.2\nnameserver ::1\n").unwrap();
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let epoll = Epoll::new().unwrap();
        let mut u = Upstreams::new(DnsSource::ResolvConf(link.clone()), &epoll);
        assert_eq!(u.addrs(), vec!["127.0.0.1:53".parse().unwrap()]);
        // Replaced as a network manager does: a new symlink renamed over the old one.
        let tmp = dir.path().join("resolv.conf.new");
        std::os::unix::fs::symlink(&b, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        assert!(!u.follow(&epoll), "looked again too soon");
        u.checked -= RECHECK;
        assert!(u.follow(&epoll));
        assert_eq!(
            u.addrs(),
            vec![
                "127.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        u.answered("[::1]:53".parse().unwrap());
        assert_eq!(u.in_use()[0], "[::1]:53".parse::<SocketAddr>().unwrap());
        u.checked -= RECHECK;
        assert!(!u.follow(&epoll), "nothing changed");
    }
}
