//! The HTTP(S) proxy on the gateway's port 3128, in the role of Docker Desktop's
//! `http.docker.internal:3128`: a guest that sets `http_proxy=http://192.168.127.1:3128`
//! reaches the web the way the host does, through the host's resolver and, when one is set,
//! the host's upstream proxy.
//!
//! The NAT hands a guest connection to the gateway's port 3128 to an in-process listener on
//! the host's loopback. That listener takes only the connections the NAT announced (their
//! source address is registered before they connect), so it is no open proxy for other
//! local programs. Each connection is served by a thread with blocking sockets:
//! - `CONNECT host:port` opens a tunnel: `200 Connection established`, then bytes both ways;
//! - an absolute-form request (`GET http://host[:port]/path HTTP/1.1`) goes to that server in
//!   origin form, with its hop-by-hop headers replaced by `Connection: close`; the response
//!   comes back unchanged and the connection closes after it;
//! - with an upstream proxy set, both kinds go to the upstream as they came (a CONNECT is
//!   relayed, not answered here), so the upstream's own answers and authentication
//!   challenges reach the guest. The guest's `Proxy-Authorization` is passed on.
//!
//! Names are resolved on the host when the connection opens. Errors reach the client as
//! `400` (not a proxy request) or `502` (the server or upstream could not be reached), with
//! a one-line body that says what to do.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{
    Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, ToSocketAddrs,
};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::rules::{Action, Counters, Proto, RuleSpec, Rules};

/// The gateway's proxy port.
pub const PORT: u16 = 3128;
/// The longest request head taken.
const MAX_HEAD: usize = 64 * 1024;
/// Most request headers parsed.
const MAX_HEADERS: usize = 128;
/// How long a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to a server or upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; past it, clients get 503.
const MAX_ACTIVE: usize = 1024;
/// How long an announced connection may take to arrive.
const ANNOUNCE_TTL: Duration = Duration::from_secs(30);

/// An upstream proxy: `http://HOST:PORT` (or `HOST:PORT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Its host name or address.
    pub host: String,
    /// Its port.
    pub port: u16,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for Upstream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("bad upstream proxy {s:?}: {why}; give it as http://HOST:PORT, e.g. http://proxy.example:3128")
        };
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(bad("only http:// proxies are supported")),
            None => s,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(bad(
                "credentials in the URL are not supported (the guest's Proxy-Authorization is passed on)",
            ));
        }
        if rest.contains('/') {
            return Err(bad("a proxy address has no path"));
        }
        let (host, port) = split_host_port(rest).ok_or_else(|| bad("it needs a port"))?;
        if host.is_empty() {
            return Err(bad("it needs a host"));
        }
        Ok(Upstream { host, port })
    }
}

/// `host:port` or `[v6]:port`, split.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, rest) = v6.split_once(']')?;
        (h, rest.strip_prefix(':')?)
    } else {
        s.rsplit_once(':')?
    };
    Some((host.to_string(), port.parse().ok().filter(|p| *p != 0)?))
}

/// What the proxy has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Requests relayed (absolute-form), to servers or the upstream.
    pub requests: u64,
    /// CONNECT tunnels opened, to servers or through the upstream.
    pub tunnels: u64,
    /// Requests answered with an error (400, 502, 503).
    pub failed: u64,
    /// Connections being served now.
    pub active: u64,
}

/// The proxy: its loopback listener and its settings.
pub struct Proxy {
    addr: SocketAddrV4,
    upstream: RwLock<Option<Upstream>>,
    /// Source addresses of the connections the NAT announced, and when.
    announced: Mutex<HashMap<SocketAddr, Instant>>,
    /// The guest's outbound rules, which the servers it connects to directly are checked
    /// against.
    rules: Option<Arc<Rules>>,
    requests: AtomicU64,
    tunnels: AtomicU64,
    failed: AtomicU64,
    active: AtomicUsize,
    /// Where request events go (`--audit-log`), once set.
    audit: std::sync::OnceLock<ferry_audit::Audit>,
}

impl Proxy {
    /// Sends an event per request to `audit` from now on.
    pub fn set_audit(&self, audit: ferry_audit::Audit) {
        let _ = self.audit.set(audit);
    }

    /// The request event: what was asked, where it went, and ferry's answer (`status`: the
    /// code ferry answered with; relayed requests carry the server's, which ferry does not
    /// read).
    fn audit(&self, req: &Request, upstream: Option<&Upstream>, status: Option<u16>, result: &str) {
        if let Some(a) = self.audit.get() {
            let host = match &req.target {
                Target::Authority(h, p)
                | Target::Absolute {
                    host: h, port: p, ..
                } => {
                    format!("{h}:{p}")
                }
            };
            a.emit(
                "proxy_request",
                ferry_audit::json!({
                    "method": req.method,
                    "host": host,
                    "upstream": upstream.map(|u| u.to_string()),
                    "status": status,
                    "result": result,
                }),
            );
        }
    }

    /// Binds the proxy's listener on an ephemeral loopback port and starts serving.
    pub fn start(upstream: Option<Upstream>, rules: Option<Arc<Rules>>) -> io::Result<Arc<Proxy>> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = match listener.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => return Err(io::Error::other("the proxy's listener is not IPv4")),
        };
        let proxy = Arc::new(Proxy {
            addr,
            upstream: RwLock::new(upstream),
            announced: Mutex::new(HashMap::new()),
            rules,
            requests: AtomicU64::new(0),
            tunnels: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            audit: std::sync::OnceLock::new(),
        });
        let p = proxy.clone();
        std::thread::Builder::new()
            .name("ferry-proxy".into())
            .spawn(move || p.accept_loop(listener))?;
        Ok(proxy)
    }

    /// Where the NAT sends the guest's connections to the gateway's port 3128.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The upstream proxy, if one is set.
    pub fn upstream(&self) -> Option<Upstream> {
        self.upstream.read().map(|u| u.clone()).unwrap_or(None)
    }

    /// Sets or clears the upstream proxy; connections opened from now on use it.
    pub fn set_upstream(&self, up: Option<Upstream>) {
        if let Ok(mut u) = self.upstream.write() {
            *u = up;
        }
    }

    /// The counters, now.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            requests: self.requests.load(Ordering::Relaxed),
            tunnels: self.tunnels.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed) as u64,
        }
    }

    /// Announces a connection the NAT is about to open from `from` (its bound source
    /// address): the listener takes only announced connections.
    pub fn announce(&self, from: SocketAddr) {
        let now = Instant::now();
        if let Ok(mut a) = self.announced.lock() {
            // Connections whose connect failed never arrive: their entries age out.
            a.retain(|_, t| now.duration_since(*t) < ANNOUNCE_TTL);
            a.insert(from, now);
        }
    }

    fn take_announced(&self, from: SocketAddr) -> bool {
        self.announced
            .lock()
            .is_ok_and(|mut a| a.remove(&from).is_some())
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for conn in listener.incoming() {
            let client = match conn {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("proxy: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let Ok(peer) = client.peer_addr() else {
                continue;
            };
            if !self.take_announced(peer) {
                // Another local program found the port: it is not the guest's to use.
                log::debug!("proxy: refused a connection from {peer}, which the NAT did not open");
                continue;
            }
            if self.active.load(Ordering::Relaxed) >= MAX_ACTIVE {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let _ = respond(
                    &client,
                    503,
                    "Service Unavailable",
                    &format!("ferry proxy: {MAX_ACTIVE} connections are open, the most it serves; retry when some have closed"),
                );
                continue;
            }
            self.active.fetch_add(1, Ordering::Relaxed);
            let p = self.clone();
            let spawned = std::thread::Builder::new()
                .name("ferry-proxy-conn".into())
                .spawn(move || {
                    p.serve(client);
                    p.active.fetch_sub(1, Ordering::Relaxed);
                });
            if let Err(e) = spawned {
                self.active.fetch_sub(1, Ordering::Relaxed);
                log::warn!("proxy: cannot start a thread for a connection: {e}");
            }
        }
    }

    /// Serves one client connection to its end.
    fn serve(&self, mut client: TcpStream) {
        let _ = client.set_read_timeout(Some(HEAD_TIMEOUT));
        let (head, early) = match read_head(&mut client) {
            Ok(h) => h,
            Err(e) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    self.fail(
                        &client,
                        400,
                        "Bad Request",
                        &format!("ferry proxy: {e}; send one HTTP/1.1 proxy request"),
                    );
                }
                return;
            }
        };
        let req = match Request::parse(&head) {
            Ok(r) => r,
            Err(why) => {
                self.fail(&client, 400, "Bad Request", &format!("ferry proxy: {why}"));
                return;
            }
        };
        let upstream = self.upstream();
        let connect_to = match (&upstream, &req.target) {
            (Some(up), _) => (up.host.clone(), up.port),
            (None, Target::Authority(h, p))
            | (
                None,
                Target::Absolute {
                    host: h, port: p, ..
                },
            ) => (h.clone(), *p),
        };
        // Servers reached directly are checked against the guest's rules; an upstream proxy
        // is the host's own choice.
        let rules = if upstream.is_none() {
            self.rules.as_deref()
        } else {
            None
        };
        let (mut server, counters) = match connect(&connect_to.0, connect_to.1, rules) {
            Ok(s) => s,
            Err(ConnectError::Refused(a, pos, spec)) => {
                self.audit(&req, upstream.as_ref(), Some(403), "refused");
                log::debug!("proxy: rule {pos} ({spec}) refuses {a}");
                self.fail(
                    &client,
                    403,
                    "Forbidden",
                    &format!("ferry proxy: rule {pos} ({spec}) refuses connections to {a}; `ferry ctl rules` lists the rules"),
                );
                return;
            }
            Err(ConnectError::Io(e)) => {
                let what = match &upstream {
                    Some(up) => format!("the upstream proxy {up}"),
                    None => format!("{}:{}", connect_to.0, connect_to.1),
                };
                self.audit(&req, upstream.as_ref(), Some(502), "unreachable");
                log::debug!("proxy: cannot connect to {what}: {e}");
                self.fail(
                    &client,
                    502,
                    "Bad Gateway",
                    &format!("ferry proxy: cannot connect to {what}: {e}; check the address and that the server is up"),
                );
                return;
            }
        };
        let result = match (&req.target, upstream.is_some()) {
            (Target::Authority(..), false) => (Some(200), "tunnel"),
            (Target::Authority(..), true) => (None, "tunnel"),
            (Target::Absolute { .. }, _) => (None, "relayed"),
        };
        self.audit(&req, upstream.as_ref(), result.0, result.1);
        let sent = match (&req.target, upstream.is_some()) {
            (Target::Authority(..), false) => {
                self.tunnels.fetch_add(1, Ordering::Relaxed);
                client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            }
            (Target::Authority(..), true) => {
                self.tunnels.fetch_add(1, Ordering::Relaxed);
                server.write_all(&req.rewrite(true))
            }
            (Target::Absolute { .. }, through) => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                let head = req.rewrite(through);
                if let Some(c) = &counters {
                    c.add_bytes(head.len());
                }
                server.write_all(&head)
            }
        };
        if let Some(c) = &counters {
            c.add_bytes(early.len());
        }
        if sent.and_then(|()| server.write_all(&early)).is_err() {
            return;
        }
        let _ = client.set_read_timeout(None);
        splice(client, server, counters);
    }

    fn fail(&self, client: &TcpStream, code: u16, reason: &str, body: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let _ = respond(client, code, reason, body);
    }
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// CONNECT's `host:port`.
    Authority(String, u16),
    /// An absolute `http://host[:port]/path?query`.
    Absolute {
        host: String,
        port: u16,
        /// The origin-form target: the path and query.
        path: String,
    },
}

/// A parsed request head.
#[derive(Debug)]
struct Request {
    method: String,
    /// The request target as the client sent it.
    raw_target: String,
    target: Target,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    version: u8,
    headers: Vec<(String, Vec<u8>)>,
}

/// Headers that belong to one hop and are not passed on (RFC 9110, 7.6.1), besides the ones
/// `Connection` names.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

impl Request {
    fn parse(head: &[u8]) -> Result<Request, String> {
        let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut hdrs);
        match r.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("the request head is incomplete".into()),
            Err(e) => return Err(format!("the request head is malformed ({e})")),
        }
        let method = r.method.unwrap_or_default().to_string();
        let raw_target = r.path.unwrap_or_default().to_string();
        let version = r.version.unwrap_or(1);
        let target = if method.eq_ignore_ascii_case("CONNECT") {
            let (h, p) = split_host_port(&raw_target)
                .ok_or_else(|| format!("CONNECT needs host:port, not {raw_target:?}"))?;
            Target::Authority(h, p)
        } else {
            parse_absolute(&raw_target)?
        };
        let headers: Vec<(String, Vec<u8>)> = r
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect();
        // Framing that two parsers may read two ways is how requests are smuggled past a
        // proxy (RFC 9112, 6.3): refused, as are lengths that disagree.
        let has = |n: &'static str| {
            headers
                .iter()
                .filter(move |(h, _)| h.eq_ignore_ascii_case(n))
        };
        if has("transfer-encoding").next().is_some() && has("content-length").next().is_some() {
            return Err(
                "the request has both Transfer-Encoding and Content-Length; send one of them"
                    .into(),
            );
        }
        let mut lengths = has("content-length").map(|(_, v)| v.trim_ascii());
        if let Some(first) = lengths.next() {
            if !first.iter().all(u8::is_ascii_digit)
                || first.is_empty()
                || lengths.any(|v| v != first)
            {
                return Err("the request's Content-Length is not one number; send one".into());
            }
        }
        Ok(Request {
            method,
            raw_target,
            target,
            version,
            headers,
        })
    }

    /// The head to send on: to an upstream (`through`) with the target as it came, else to
    /// the server in origin form. Hop-by-hop headers give way to `Connection: close`.
    fn rewrite(&self, through: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        let target = match (&self.target, through) {
            (Target::Absolute { path, .. }, false) => path.as_str(),
            _ => self.raw_target.as_str(),
        };
        out.extend_from_slice(
            format!("{} {} HTTP/1.{}\r\n", self.method, target, self.version).as_bytes(),
        );
        let named: Vec<String> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .collect();
        let tunnel = matches!(self.target, Target::Authority(..));
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            if HOP_BY_HOP.contains(&lower.as_str()) || named.contains(&lower) {
                continue;
            }
            // Credentials for a proxy are for the upstream only, never for the server.
            if lower == "proxy-authorization" && !through {
                continue;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if !tunnel {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Entry points for the fuzz targets (`fuzz/`), with the `fuzzing` feature.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    /// Parses a request head as the proxy does and, when it is one, writes both heads the
    /// proxy could send on (to an upstream proxy and to the server).
    pub fn request_head(head: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let r = super::Request::parse(head).ok()?;
        Some((r.rewrite(true), r.rewrite(false)))
    }
}

/// `http://host[:port][/path]` into its parts (the path defaults to `/`).
fn parse_absolute(t: &str) -> Result<Target, String> {
    let Some((scheme, rest)) = t.split_once("://") else {
        return Err(format!(
            "this is a proxy: ask for an absolute URL (GET http://host/path) or CONNECT host:port, not {t:?}"
        ));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!(
            "{scheme}:// URLs go through CONNECT (a client does this when its proxy is set for {scheme}); plain requests take http:// only"
        ));
    }
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
        let h = authority.trim_start_matches('[').trim_end_matches(']');
        (h.to_string(), 80)
    } else {
        split_host_port(authority).ok_or_else(|| format!("bad host in {t:?}"))?
    };
    if host.is_empty() {
        return Err(format!("no host in {t:?}"));
    }
    Ok(Target::Absolute { host, port, path })
}

/// Reads up to the end of the request head; returns it and any bytes read past it.
fn read_head(s: &mut TcpStream) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed before its request head ended",
            ));
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + i + 4;
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the request head is longer than {} KiB", MAX_HEAD / 1024),
            ));
        }
    }
}

/// Why a connection to a server was not made.
enum ConnectError {
    /// A rule refused its address: the address, the rule's position and the rule.
    Refused(SocketAddr, usize, RuleSpec),
    /// The resolver or the connect failed.
    Io(io::Error),
}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        ConnectError::Io(e)
    }
}

/// Connects to `host:port`, trying each address the host's resolver gives that `rules`
/// allow. A connection counts as one packet of the rule that let it through, which then
/// counts its bytes; one that no allowed address took counts on the rule that refused it
/// (and fails with that rule's name).
fn connect(
    host: &str,
    port: u16,
    rules: Option<&Rules>,
) -> Result<(TcpStream, Option<Arc<Counters>>), ConnectError> {
    let mut io_err = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    let mut refused = None;
    for a in (host, port).to_socket_addrs()? {
        let verdict = rules.map(|r| r.peek(Proto::Tcp, a));
        if let Some(v) = verdict.as_ref().filter(|v| v.action != Action::Allow) {
            if let Some((pos, spec)) = v.rule {
                refused.get_or_insert((a, pos, spec, v.clone()));
            }
            continue;
        }
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let counters = verdict.map(|v| {
                    v.count(0);
                    v.counters
                });
                return Ok((s, counters));
            }
            Err(e) => io_err = e,
        }
    }
    match refused {
        Some((a, pos, spec, v)) => {
            v.count(0);
            Err(ConnectError::Refused(a, pos, spec))
        }
        None => Err(ConnectError::Io(io_err)),
    }
}

fn respond(mut client: &TcpStream, code: u16, reason: &str, body: &str) -> io::Result<()> {
    let body = format!("{body}\n");
    write!(
        client,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Moves bytes both ways until both sides have finished; an end on one side is passed on
/// as a half-close, so a client that shuts its writing side still gets its answer.
fn splice(client: TcpStream, server: TcpStream, counters: Option<Arc<Counters>>) {
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let c = counters.clone();
    let up = std::thread::Builder::new()
        .name("ferry-proxy-up".into())
        .spawn(move || pump(c2, s2, c.as_deref()));
    pump(server, client, counters.as_deref());
    if let Ok(t) = up {
        let _ = t.join();
    }
}

/// Copies `from` to `to` until either ends, adding what it moves to `counters`.
fn pump(mut from: TcpStream, mut to: TcpStream, counters: Option<&Counters>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(c) = counters {
                    c.add_bytes(n);
                }
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Read);
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // A reset on one side resets the other, not a clean close.
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstreams() {
        let u: Upstream = "http://proxy.example:3128".parse().unwrap();
        assert_eq!(
            u,
            Upstream {
                host: "proxy.example".into(),
                port: 3128
            }
        );
        assert_eq!(u.to_string(), "http://proxy.example:3128");
        let u: Upstream = "10.0.0.1:8080/".parse().unwrap();
        assert_eq!(u.port, 8080);
        let u: Upstream = "http://[::1]:3128".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.to_string().as_str()),
            ("::1", "http://[::1]:3128")
        );
        for bad in [
            "https://p:1",
            "http://p",
            "http://u:pw@p:1",
            "p:0",
            ":80",
            "http://p:1/x",
        ] {
            let e = bad.parse::<Upstream>().unwrap_err();
            assert!(e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_requests_and_rewrites_them_for_the_server_or_the_upstream() {
        let head = b"GET http://198.18.0.2:8080/a/b?c=1 HTTP/1.1\r\nHost: 198.18.0.2:8080\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nProxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n";
        let r = Request::parse(head).unwrap();
        assert_eq!(r.target, absolute("198.18.0.2", 8080, "/a/b?c=1"));
        let direct = String::from_utf8(r.rewrite(false)).unwrap();
        assert_eq!(
            direct,
            "GET /a/b?c=1 HTTP/1.1\r\nHost: 198.18.0.2:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let through = String::from_utf8(r.rewrite(true)).unwrap();
        assert!(through.starts_with("GET http://198.18.0.2:8080/a/b?c=1 HTTP/1.1\r\n"));
        assert!(through.contains("Proxy-Authorization: Basic eA==\r\n"));
        assert!(!through.contains("X-Hop") && !through.contains("keep-alive"));

        let c = Request::parse(b"CONNECT 198.18.0.2:443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(c.target, Target::Authority("198.18.0.2".into(), 443));
        assert_eq!(
            String::from_utf8(c.rewrite(true)).unwrap(),
            "CONNECT 198.18.0.2:443 HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let target = |head: &[u8]| Request::parse(head).unwrap().target;
        assert_eq!(
            target(b"GET http://h HTTP/1.0\r\n\r\n"),
            absolute("h", 80, "/")
        );
        assert_eq!(
            target(b"GET http://h?q HTTP/1.1\r\n\r\n"),
            absolute("h", 80, "/?q")
        );
    }

    fn absolute(host: &str, port: u16, path: &str) -> Target {
        Target::Absolute {
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn requests_that_are_not_for_a_proxy_are_refused_with_a_reason() {
        for (head, want) in [
            (&b"GET /index.html HTTP/1.1\r\n\r\n"[..], "absolute URL"),
            (b"GET https://h/ HTTP/1.1\r\n\r\n", "CONNECT"),
            (b"CONNECT h HTTP/1.1\r\n\r\n", "host:port"),
            (b"GARBAGE\r\n\r\n", "malformed"),
            (
                b"POST http://h/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both Transfer-Encoding and Content-Length",
            ),
            (
                b"POST http://h/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                "not one number",
            ),
            (b"POST http://h/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "not one number"),
        ] {
            let e = Request::parse(head).unwrap_err();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(head));
        }
    }

    /// A one-shot HTTP server on loopback: answers each connection with `body` and records
    /// the request head it got.
    fn origin(body: &'static str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let mut c = c.unwrap();
                let (head, _) = read_head(&mut c).unwrap();
                s2.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (addr, seen)
    }

    /// A client connection to the proxy, opened and announced as the NAT does it.
    fn client(p: &Proxy) -> TcpStream {
        let to = p.addr();
        let s = crate::stack::sys::connect_nonblocking(
            std::net::SocketAddr::V4(to),
            Some(&|a| p.announce(a)),
        )
        .unwrap();
        s.set_nonblocking(false).unwrap();
        s
    }

    fn roundtrip(mut s: TcpStream, req: &str) -> String {
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn unannounced_connections_are_closed_unserved() {
        let p = Proxy::start(None, None).unwrap();
        let mut s = TcpStream::connect(p.addr()).unwrap();
        let _ = s.write_all(b"GET http://127.0.0.1:1/ HTTP/1.1\r\n\r\n");
        // Closed unread: an end of stream, or a reset for the unread request.
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert_eq!(out, "");
        assert_eq!(p.stats().requests, 0);
    }

    #[test]
    fn relays_a_request_and_reports_an_unreachable_server() {
        let (origin, seen) = origin("hello");
        let p = Proxy::start(None, None).unwrap();
        let out = roundtrip(
            client(&p),
            &format!("GET http://{origin}/x HTTP/1.1\r\nHost: {origin}\r\nProxy-Connection: keep-alive\r\n\r\n"),
        );
        assert!(
            out.starts_with("HTTP/1.1 200 OK") && out.ends_with("hello"),
            "{out}"
        );
        assert_eq!(
            seen.lock().unwrap()[0],
            format!("GET /x HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n")
        );
        // A port where nothing listens.
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let out = roundtrip(client(&p), &format!("GET http://{dead}/ HTTP/1.1\r\n\r\n"));
        assert!(out.starts_with("HTTP/1.1 502 Bad Gateway"), "{out}");
        assert!(out.contains(&format!("cannot connect to {dead}")), "{out}");
        let st = p.stats();
        assert_eq!((st.requests, st.failed), (1, 1));
    }

    #[test]
    fn rules_refuse_servers_the_guest_may_not_reach() {
        let (server, _) = origin("hello");
        let rules = Arc::new(Rules::new(&[format!(
            "reject,proto=tcp,to=127.0.0.1/32,port={}",
            server.port()
        )
        .parse()
        .unwrap()]));
        let p = Proxy::start(None, Some(rules.clone())).unwrap();
        let out = roundtrip(
            client(&p),
            &format!("GET http://{server}/ HTTP/1.1\r\n\r\n"),
        );
        assert!(out.starts_with("HTTP/1.1 403 Forbidden"), "{out}");
        assert!(
            out.contains("rule 1 (reject,proto=tcp,to=127.0.0.1/32,port="),
            "{out}"
        );
        let out = roundtrip(client(&p), &format!("CONNECT {server} HTTP/1.1\r\n\r\n"));
        assert!(out.starts_with("HTTP/1.1 403 Forbidden"), "{out}");
        assert_eq!(rules.list()[0].packets, 2);
        // An allowed server counts one packet and the bytes both ways on the default policy.
        let (open, _) = origin("hello");
        let out = roundtrip(client(&p), &format!("GET http://{open}/ HTTP/1.1\r\n\r\n"));
        assert!(out.ends_with("hello"), "{out}");
        let (packets, bytes) = rules.default_counters(crate::rules::Dir::Out);
        assert_eq!(packets, 1);
        assert!(bytes as usize > out.len(), "{bytes}");
        // Through an upstream proxy, the upstream decides.
        let (up, _) = origin("from upstream");
        p.set_upstream(Some(up.to_string().parse().unwrap()));
        let out = roundtrip(
            client(&p),
            &format!("GET http://{server}/ HTTP/1.1\r\n\r\n"),
        );
        assert!(out.ends_with("from upstream"), "{out}");
    }

    #[test]
    fn tunnels_connect_and_relays_through_an_upstream() {
        // CONNECT straight to an echo server.
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in echo.incoming() {
                let mut c = c.unwrap();
                let mut r = c.try_clone().unwrap();
                let _ = io::copy(&mut r, &mut c);
            }
        });
        let p = Proxy::start(None, None).unwrap();
        let mut s = client(&p);
        s.write_all(
            format!("CONNECT {echo_addr} HTTP/1.1\r\nHost: {echo_addr}\r\n\r\nearly").as_bytes(),
        )
        .unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert_eq!(out, "HTTP/1.1 200 Connection established\r\n\r\nearly");

        // With an upstream, both kinds go to it as they came; the upstream answers.
        let (up, seen) = origin("from upstream");
        let up: Upstream = up.to_string().parse().unwrap();
        p.set_upstream(Some(up.clone()));
        assert_eq!(p.upstream(), Some(up));
        let out = roundtrip(client(&p), "GET http://198.18.0.9/y HTTP/1.1\r\nHost: 198.18.0.9\r\nProxy-Authorization: Basic eA==\r\n\r\n");
        assert!(out.ends_with("from upstream"), "{out}");
        let out = roundtrip(client(&p), "CONNECT 198.18.0.9:443 HTTP/1.1\r\n\r\n");
        assert!(out.ends_with("from upstream"), "{out}");
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen[0],
            "GET http://198.18.0.9/y HTTP/1.1\r\nHost: 198.18.0.9\r\nProxy-Authorization: Basic eA==\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(seen[1], "CONNECT 198.18.0.9:443 HTTP/1.1\r\n\r\n");
        let st = p.stats();
        assert_eq!((st.tunnels, st.requests, st.failed), (2, 1, 0));
    }
}
