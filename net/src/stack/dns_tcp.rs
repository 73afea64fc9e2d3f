//! DNS over TCP to the gateway, answered as its UDP queries are: ferry's own names and the
//! host's here, a name under a `--dns-zone` suffix by that zone's server, the rest by the
//! preferred upstream server.
//!
//! Theory of operation. A guest's resolver turns to TCP when a UDP answer came truncated
//! (a split zone's SRV records for a directory's domain controllers easily pass 512 bytes), or
//! when it is set to. Relaying the connection byte for byte to one upstream server would send
//! every query there: ferry's own names and a split zone's would get that server's NXDOMAIN.
//! So the connection's host side is one end of a UNIX socket pair, as the HTTP proxy's is, and
//! a thread of its own serves the other end: it reads the length-prefixed queries one at a time
//! (RFC 7766 6.2.1), answers each before reading the next (a local answer at once, a forwarded
//! one over a TCP connection to the server the name belongs to, kept for the connection's next
//! queries to that server), and ends at the guest's end of stream, an idle timeout, or a
//! malformed query. Blocking calls with timeouts keep it simple; a resolver opens few such
//! connections, and at most [`MAX_CONNECTIONS`] are served at once (past it, the guest's
//! connection is closed at once and its resolver retries).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{dns, NetConfig};

/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection may go without a query (RFC 7766 suggests seconds).
const IDLE: Duration = Duration::from_secs(10);
/// How long a server may take to accept the connection, and to answer.
const SERVER_CONNECT: Duration = Duration::from_secs(3);
const SERVER_ANSWER: Duration = Duration::from_secs(5);

static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// What a connection's thread answers with: the plan, the host's names, and where names go.
pub(super) struct Resolver {
    pub(super) cfg: NetConfig,
    pub(super) names: Option<Arc<crate::names::Names>>,
    /// The split zones' suffixes and servers.
    pub(super) zones: Vec<(String, SocketAddr)>,
    /// Where other names go.
    pub(super) preferred: Option<SocketAddr>,
}

impl Resolver {
    /// The server `name` goes to: its zone's, or the preferred one.
    fn server_for(&self, name: &str) -> Option<SocketAddr> {
        self.zones
            .iter()
            .filter(|(z, _)| super::dns_upstream::in_zone(name, z))
            .max_by_key(|(z, _)| z.len())
            .map(|(_, s)| *s)
            .or(self.preferred)
    }

    /// The answer to `query`: a local one, the server's, or SERVFAIL when the server cannot
    /// be reached; `None` for a malformed query.
    fn answer(
        &self,
        query: &[u8],
        servers: &mut HashMap<SocketAddr, TcpStream>,
    ) -> Option<Vec<u8>> {
        let any = self.preferred.is_some() || !self.zones.is_empty();
        let lookup = |n: &str| super::dns_forward::host_names(self.names.as_deref(), &self.cfg, n);
        match dns::answer_with(&self.cfg, query, any, lookup)? {
            dns::Answer::Local(r) => Some(r),
            dns::Answer::Forward => {
                let name = dns::parse_query(query)?.name;
                let asked = self.server_for(&name).and_then(|s| ask(servers, s, query));
                match asked {
                    Some(r) => Some(r),
                    // Without a server to ask, the gateway's SERVFAIL.
                    None => match dns::answer_with(&self.cfg, query, false, |_| None)? {
                        dns::Answer::Local(r) => Some(r),
                        dns::Answer::Forward => None,
                    },
                }
            }
        }
    }
}

/// The flow's end of a new connection, whose other end a thread serves with `resolver`.
pub(super) fn accept(resolver: Resolver) -> io::Result<UnixStream> {
    let (nat, guest) = UnixStream::pair()?;
    nat.set_nonblocking(true)?;
    if ACTIVE.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
        // `guest` closes here: the guest's connection ends, and its resolver retries.
        return Ok(nat);
    }
    let spawned = std::thread::Builder::new()
        .name("ferry-dns-tcp".into())
        .spawn(move || {
            serve(&resolver, guest);
            ACTIVE.fetch_sub(1, Ordering::Relaxed);
        });
    if let Err(e) = spawned {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
        return Err(e);
    }
    Ok(nat)
}

fn serve(resolver: &Resolver, mut conn: UnixStream) {
    if conn.set_read_timeout(Some(IDLE)).is_err() || conn.set_write_timeout(Some(IDLE)).is_err() {
        return;
    }
    let mut servers = HashMap::new();
    while let Some(query) = read_message(&mut conn) {
        let Some(answer) = resolver.answer(&query, &mut servers) else {
            log::debug!("dns: a malformed query over TCP; closing the connection");
            return;
        };
        if write_message(&mut conn, &answer).is_err() {
            return;
        }
    }
}

/// `query` asked of `server` over the connection kept for it (made, or made again once if the
/// server closed it); its answer.
fn ask(
    servers: &mut HashMap<SocketAddr, TcpStream>,
    server: SocketAddr,
    query: &[u8],
) -> Option<Vec<u8>> {
    for _ in 0..2 {
        let conn = match servers.entry(server) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let c = TcpStream::connect_timeout(&server, SERVER_CONNECT).ok()?;
                c.set_read_timeout(Some(SERVER_ANSWER)).ok()?;
                c.set_write_timeout(Some(SERVER_ANSWER)).ok()?;
                v.insert(c)
            }
        };
        // The answer to this query: a server answers in any order (RFC 7766 7), but one
        // query at a time is asked here, so the next message is it.
        let answer = write_message(conn, query)
            .ok()
            .and_then(|()| read_message(conn))
            .filter(|a| a.get(0..2) == query.get(0..2));
        match answer {
            Some(a) => return Some(a),
            None => {
                servers.remove(&server);
            }
        }
    }
    log::debug!("dns: {server} did not answer over TCP");
    None
}

/// One length-prefixed message; `None` at the end of the stream, a timeout or an error.
fn read_message(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).ok()?;
    let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut m).ok()?;
    Some(m)
}

fn write_message(w: &mut impl Write, m: &[u8]) -> io::Result<()> {
    let len = u16::try_from(m.len()).map_err(|_| io::Error::other("a DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(2 + m.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(m);
    w.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A DNS server over TCP on loopback answering every query with its id, QR set, and
    /// `tag` as the answer count, for as many queries as a connection sends.
    fn server(tag: u8) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    while let Some(mut q) = read_message(&mut c) {
                        q[2] |= 0x80;
                        q[7] = tag;
                        if write_message(&mut c, &q).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn ask_over(conn: &mut UnixStream, id: u16, name: &str) -> Vec<u8> {
        write_message(conn, &dns::query(id, name, dns::QTYPE_A)).unwrap();
        read_message(conn).expect("an answer")
    }

    #[test]
    fn each_query_goes_where_its_name_belongs() {
        let (general, zone) = (server(1), server(2));
        let resolver = Resolver {
            cfg: NetConfig::default(),
            names: None,
            zones: vec![("corp.test".into(), zone)],
            preferred: Some(general),
        };
        let mut conn = accept(resolver).unwrap();
        conn.set_nonblocking(false).unwrap();
        // Ferry's own name, a split zone's, another: three queries on one connection.
        let a = ask_over(&mut conn, 1, "host.ferry.internal");
        assert_eq!(
            (&a[0..2], &a[a.len() - 4..]),
            (&[0, 1][..], &[192, 168, 127, 254][..])
        );
        let a = ask_over(&mut conn, 2, "dc1.corp.test");
        assert_eq!((&a[0..2], a[7]), (&[0, 2][..], 2), "the zone's server");
        let a = ask_over(&mut conn, 3, "example.test");
        assert_eq!((&a[0..2], a[7]), (&[0, 3][..], 1), "the preferred server");
    }

    #[test]
    fn an_unreachable_server_gets_servfail_and_junk_ends_the_connection() {
        let resolver = Resolver {
            cfg: NetConfig::default(),
            names: None,
            zones: vec![],
            // Loopback, where nothing listens: refused at once.
            preferred: Some("127.0.0.1:1".parse().unwrap()),
        };
        let mut conn = accept(resolver).unwrap();
        conn.set_nonblocking(false).unwrap();
        let a = ask_over(&mut conn, 4, "example.test");
        assert_eq!(a[3] & 0x0f, 2, "SERVFAIL");
        write_message(&mut conn, b"\x00\x05junk").unwrap();
        assert!(
            read_message(&mut conn).is_none(),
            "closed after a malformed query"
        );
    }
}
