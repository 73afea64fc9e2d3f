//! The HTTP(S) proxy on the gateway's port 3128, in the role of Docker Desktop's
//! `http.docker.internal:3128`: a guest that sets `http_proxy=http://192.168.127.1:3128`
//! reaches the web the way the host does, through the host's resolver and, when one is set,
//! the host's upstream proxy, with credentials the host holds.
//!
//! # Theory of operation
//! The NAT hands a guest connection to the gateway's port 3128 to [`Proxy::accept`], which
//! makes a UNIX socket pair: the NAT's flow keeps one end as its host socket, and a thread
//! serves the other with blocking sockets ([`session`]). No listener takes guest
//! connections, so the proxy is no open proxy for other local programs, and the bytes
//! between the NAT and the proxy cross no TCP stack. Each connection is served as a keep-alive loop of requests:
//! - `CONNECT host:port` opens a tunnel ([`tunnel`]): `200 Connection established`, then
//!   bytes both ways; through an upstream the CONNECT is relayed and the upstream answers.
//!   Once open, the tunnel's server socket goes to the NAT's flow ([`handoff`]);
//! - an absolute-form request (`GET http://host[:port]/path HTTP/1.1`) goes to that server
//!   in origin form, or to the upstream as it came, with its body framed as the guest
//!   framed it ([`wire`]); the answer comes back the same way, and the connection to the
//!   server or upstream is held for the guest's next request.
//!
//! Where a request goes is decided per request ([`Proxy::route`]): the upstream (one for
//! plain requests and one for CONNECT, as `http_proxy` and `https_proxy` are two settings)
//! unless the bypass list ([`bypass`]) names the server, or as a PAC file says ([`pac`]), trying
//! its proxies in order until one connects. With no setting at all, ferry's own
//! environment (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`) is the host's setting. When the
//! upstream answers 407 and ferry holds a password ([`upstream::Secret`]) or its user a
//! Kerberos ticket ([`negotiate`]), ferry answers the challenge itself ([`auth`]); a guest that sends its own `Proxy-Authorization` keeps
//! it. Requests are checked before anything goes on ([`request`]): framing that could be
//! read two ways is refused with 400, too many or too long headers with 431, a head that
//! trickles in with 408.
//!
//! In transparent mode the NAT also sends here the guest's TCP to ports 80 and 443 that the
//! rules let out, with where the guest meant to go ([`Proxy::accept`]'s `original`).
//! HTTP is served as a proxy request made absolute from its `Host`; TLS becomes a CONNECT to
//! the name in its ClientHello ([`sni`]). Straight connections go to the address the guest
//! chose, which the NAT checked, not to a name a `Host` header could point anywhere.

mod auth;
pub mod bypass;
pub mod handoff;
mod negotiate;
pub mod pac;
mod pump;
mod request;
mod session;
mod sni;
mod tls;
mod tunnel;
pub mod upstream;
mod wire;

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};

pub use bypass::Bypass;
use request::{Request, Target};
pub use upstream::{Secret, Upstream};

use crate::rules::Rules;

/// The gateway's proxy port.
pub const PORT: u16 = 3128;
/// Connections served at once; past it, clients get 503.
const MAX_ACTIVE: usize = 1024;

/// A guest connection for [`Proxy::spawn_loop`].
struct Incoming {
    client: UnixStream,
    original: Option<SocketAddr>,
    handoff: Option<Arc<handoff::Handoff>>,
}

/// Where the proxy sends requests.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// The upstream for plain `http://` requests.
    pub http: Option<Upstream>,
    /// The upstream for CONNECT tunnels (`https://` and anything else).
    pub https: Option<Upstream>,
    /// Servers reached directly whatever the upstreams.
    pub bypass: Bypass,
    /// A PAC script that chooses per request, instead of `http` and `https` (whose user,
    /// if any, is the one ferry authenticates as to the proxies it names).
    pub pac: Option<Arc<pac::Pac>>,
}

impl Settings {
    /// One upstream for both kinds (`--proxy-upstream`).
    pub fn with_upstream(up: Option<Upstream>) -> Settings {
        Settings {
            http: up.clone(),
            https: up,
            bypass: Bypass::default(),
            pac: None,
        }
    }

    /// The host's setting as ferry's environment gives it: `HTTP_PROXY`, `HTTPS_PROXY` and
    /// `NO_PROXY` (or their lowercase forms, which curl prefers); `None` when none is set.
    /// An unusable value is an error naming the variable.
    pub fn from_env() -> Result<Option<Settings>, String> {
        let var = |name: &str| {
            [name.to_ascii_lowercase(), name.to_string()]
                .into_iter()
                .find_map(|n| {
                    std::env::var(&n)
                        .ok()
                        .filter(|v| !v.is_empty())
                        .map(|v| (n, v))
                })
        };
        let up = |name: &str| -> Result<Option<Upstream>, String> {
            match var(name) {
                None => Ok(None),
                Some((n, v)) => v
                    .parse()
                    .map(Some)
                    .map_err(|e| format!("the environment's {n}: {e}")),
            }
        };
        let (http, https) = (up("HTTP_PROXY")?, up("HTTPS_PROXY")?);
        if http.is_none() && https.is_none() {
            return Ok(None);
        }
        let bypass = match var("NO_PROXY") {
            None => Bypass::default(),
            Some((n, v)) => v
                .parse()
                .map_err(|e| format!("the environment's {n}: {e}"))?,
        };
        Ok(Some(Settings {
            http,
            https,
            bypass,
            pac: None,
        }))
    }
}

/// Kinds of failure the proxy answers with, counted apart in [`ProxyStats::errors`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 400: not a proxy request, framing refused, a malformed body.
    BadRequest = 0,
    /// 431: too many or too long headers.
    TooLarge,
    /// 408: a head that did not arrive in time.
    Timeout,
    /// 403: a rule refuses the server.
    Refused,
    /// 502: the server or upstream could not be reached or gave no answer.
    Unreachable,
    /// 407: the upstream refused ferry's credentials, or asked for some ferry does not hold.
    Auth,
    /// 503: too many connections.
    Busy,
    /// 502: the PAC file failed or named nothing usable.
    Pac,
}

impl Failure {
    /// Every kind, in counter order.
    pub const ALL: [Failure; 8] = [
        Failure::BadRequest,
        Failure::TooLarge,
        Failure::Timeout,
        Failure::Refused,
        Failure::Unreachable,
        Failure::Auth,
        Failure::Busy,
        Failure::Pac,
    ];

    /// The kind's name in `/proxy`, `/stats` and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Failure::BadRequest => "bad_request",
            Failure::TooLarge => "too_large",
            Failure::Timeout => "timeout",
            Failure::Refused => "refused",
            Failure::Unreachable => "unreachable",
            Failure::Auth => "auth",
            Failure::Busy => "busy",
            Failure::Pac => "pac",
        }
    }

    fn reason(self, code: u16) -> &'static str {
        match code {
            400 => "Bad Request",
            403 => "Forbidden",
            407 => "Proxy Authentication Required",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Bad Gateway",
        }
    }
}

/// What the proxy has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Requests relayed (absolute-form), to servers or the upstream.
    pub requests: u64,
    /// CONNECT tunnels opened, to servers or through the upstream.
    pub tunnels: u64,
    /// Requests answered with an error, all kinds.
    pub failed: u64,
    /// Connections being served now.
    pub active: u64,
    /// Connections opened to servers and upstreams (fewer than requests when kept alive).
    pub connections: u64,
    /// Guest connections to ports 80 and 443 taken in transparent mode.
    pub intercepted: u64,
    /// Errors by kind, in [`Failure::ALL`]'s order.
    pub errors: [u64; 8],
}

/// The proxy: its settings and counters; [`Proxy::accept`] takes the guest's connections.
pub struct Proxy {
    /// Guest connections on their way to [`Proxy::spawn_loop`], which starts their threads
    /// (off the NAT's thread, which a thousand thread starts at once would hold up).
    incoming: mpsc::Sender<Incoming>,
    settings: RwLock<Arc<Settings>>,
    /// The password for the upstream's user, if ferry holds one.
    secret: Option<Secret>,
    /// The scheme that worked with each upstream, sent from the start.
    learned: Mutex<HashMap<Upstream, auth::Scheme>>,
    /// Transparent mode: the NAT sends the guest's TCP to ports 80 and 443 here.
    transparent: std::sync::atomic::AtomicBool,
    /// The guest's outbound rules, which the servers it connects to directly are checked
    /// against.
    rules: Option<Arc<Rules>>,
    requests: AtomicU64,
    tunnels: AtomicU64,
    connections: AtomicU64,
    intercepted: AtomicU64,
    errors: [AtomicU64; 8],
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
            let (h, p) = req.target.host_port();
            a.emit(
                "proxy_request",
                ferry_audit::json!({
                    "method": req.method,
                    "host": format!("{h}:{p}"),
                    "upstream": upstream.map(|u| u.to_string()),
                    "status": status,
                    "result": result,
                }),
            );
        }
    }

    /// The proxy, ready to take connections, with the thread that starts their sessions.
    pub fn new(
        settings: Settings,
        secret: Option<Secret>,
        rules: Option<Arc<Rules>>,
    ) -> io::Result<Arc<Proxy>> {
        let (tx, rx) = mpsc::channel();
        let proxy = Arc::new(Proxy {
            incoming: tx,
            settings: RwLock::new(Arc::new(settings)),
            secret,
            learned: Mutex::new(HashMap::new()),
            transparent: std::sync::atomic::AtomicBool::new(false),
            rules,
            requests: AtomicU64::new(0),
            tunnels: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            intercepted: AtomicU64::new(0),
            errors: Default::default(),
            active: AtomicUsize::new(0),
            audit: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&proxy);
        std::thread::Builder::new()
            .name("ferry-proxy".into())
            .spawn(move || Proxy::spawn_loop(&weak, &rx))?;
        Ok(proxy)
    }

    /// Takes a guest connection the NAT opens (`original`: where the guest meant to go, for
    /// a connection it intercepted in transparent mode): returns the NAT's end of a socket
    /// pair, non-blocking, whose other end a thread of the proxy serves. A tunnel's server
    /// socket is given to the NAT through `handoff`, when it offers one.
    pub fn accept(
        self: &Arc<Self>,
        original: Option<SocketAddr>,
        handoff: Option<Arc<handoff::Handoff>>,
    ) -> io::Result<UnixStream> {
        let (nat, client) = UnixStream::pair()?;
        nat.set_nonblocking(true)?;
        self.incoming
            .send(Incoming {
                client,
                original,
                handoff,
            })
            .map_err(|_| io::Error::other("the proxy's thread has stopped"))?;
        Ok(nat)
    }

    /// Starts a session thread for each connection [`Proxy::accept`] takes, until the
    /// proxy is dropped. Past [`MAX_ACTIVE`] the guest gets a 503 instead.
    fn spawn_loop(proxy: &std::sync::Weak<Proxy>, rx: &mpsc::Receiver<Incoming>) {
        while let Ok(c) = rx.recv() {
            let Some(p) = proxy.upgrade() else {
                return;
            };
            if p.active.load(Ordering::Relaxed) >= MAX_ACTIVE {
                p.fail(
                    &c.client,
                    Failure::Busy,
                    503,
                    &format!("ferry proxy: {MAX_ACTIVE} connections are open, the most it serves; retry when some have closed"),
                );
                continue;
            }
            p.active.fetch_add(1, Ordering::Relaxed);
            let p2 = p.clone();
            let spawned = std::thread::Builder::new()
                .name("ferry-proxy-conn".into())
                .spawn(move || {
                    session::serve(&p2, c.client, c.original, c.handoff.as_deref());
                    p2.active.fetch_sub(1, Ordering::Relaxed);
                });
            if let Err(e) = spawned {
                p.active.fetch_sub(1, Ordering::Relaxed);
                log::warn!("proxy: cannot start a thread for a connection: {e}");
            }
        }
    }

    /// The settings now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Replaces the settings; requests from now on follow them (tunnels already open and
    /// held connections to a server keep their way).
    pub fn set_settings(&self, s: Settings) {
        if let Ok(mut cur) = self.settings.write() {
            *cur = Arc::new(s);
        }
    }

    /// The upstream for plain requests, if one is set.
    pub fn upstream(&self) -> Option<Upstream> {
        self.settings().http.clone()
    }

    /// Sets or clears the one upstream for both kinds of request, keeping the bypass list.
    pub fn set_upstream(&self, up: Option<Upstream>) {
        let mut s = (*self.settings()).clone();
        s.http = up.clone();
        s.https = up;
        self.set_settings(s);
    }

    /// Whether ferry holds a password for the upstream.
    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }

    /// Where `req` may go, in the order to try: upstreams, and `None` for straight to the
    /// server. The bypass list first, then the PAC file if one is set (an error when it
    /// fails), else the upstream for the request's kind.
    fn route(&self, req: &Request) -> Result<Vec<Option<Upstream>>, String> {
        let s = self.settings();
        let (host, port) = req.target.host_port();
        if s.bypass.matches(host, port) {
            return Ok(vec![None]);
        }
        let Some(pac) = &s.pac else {
            return Ok(vec![match req.target {
                Target::Authority(..) => s.https.clone(),
                Target::Absolute { .. } => s.http.clone(),
            }]);
        };
        // What a browser passes: the URL, or for a tunnel https://host/.
        let url = match &req.target {
            Target::Authority(..) if port == 443 => format!("https://{host}/"),
            Target::Authority(..) => format!("https://{host}:{port}/"),
            Target::Absolute { .. } => req.raw_target.clone(),
        };
        let user = s.http.as_ref().and_then(|u| u.user.clone());
        Ok(pac
            .find(&url, host)?
            .into_iter()
            .map(|c| match c {
                pac::Choice::Direct => None,
                pac::Choice::Proxy { host, port, tls } => Some(Upstream {
                    tls,
                    host,
                    port,
                    user: user.clone(),
                }),
            })
            .collect())
    }

    fn learned_scheme(&self, up: &Upstream) -> Option<auth::Scheme> {
        self.learned.lock().ok()?.get(up).copied()
    }

    fn learn(&self, up: &Upstream, scheme: auth::Scheme) {
        if let Ok(mut l) = self.learned.lock() {
            l.insert(up.clone(), scheme);
        }
    }

    fn forget(&self, up: &Upstream) {
        if let Ok(mut l) = self.learned.lock() {
            l.remove(up);
        }
    }

    /// The first step of `scheme` for `up`, unless the scheme takes a password and ferry
    /// holds none for `up`.
    fn start_auth(
        &self,
        up: &Upstream,
        scheme: auth::Scheme,
    ) -> Option<Result<auth::Step, String>> {
        let creds = up.user.as_deref().zip(self.secret.as_ref());
        if scheme.needs_password() && creds.is_none() {
            return None;
        }
        Some(auth::start(scheme, &up.host, creds))
    }

    /// The step after `sent`, from the upstream's 407 `resp`.
    fn next_auth(
        &self,
        up: &Upstream,
        sent: &auth::Step,
        resp: &wire::Response,
    ) -> Result<auth::Step, String> {
        let (Some(user), Some(secret)) = (up.user.as_deref(), self.secret.as_ref()) else {
            return Err("ferry holds no credentials for it".into());
        };
        auth::next(sent, resp.header("proxy-authenticate"), user, secret)
    }

    /// The counters, now.
    pub fn stats(&self) -> ProxyStats {
        let errors = std::array::from_fn(|i| self.errors[i].load(Ordering::Relaxed));
        ProxyStats {
            requests: self.requests.load(Ordering::Relaxed),
            tunnels: self.tunnels.load(Ordering::Relaxed),
            failed: errors.iter().sum(),
            active: self.active.load(Ordering::Relaxed) as u64,
            connections: self.connections.load(Ordering::Relaxed),
            intercepted: self.intercepted.load(Ordering::Relaxed),
            errors,
        }
    }

    /// Whether transparent mode is on.
    pub fn transparent(&self) -> bool {
        self.transparent.load(Ordering::Relaxed)
    }

    /// Turns transparent mode on or off, for connections the guest opens from now on.
    pub fn set_transparent(&self, on: bool) {
        self.transparent.store(on, Ordering::Relaxed);
    }

    /// Whether the NAT sends the guest's new TCP connection to `port` here: in transparent
    /// mode, plain web traffic (80 as HTTP, 443 as TLS).
    pub fn intercepts(&self, port: u16) -> bool {
        (port == 80 || port == 443) && self.transparent()
    }

    /// As [`Proxy::fail`], for `req`: an intercepted TLS connection, which sent no HTTP,
    /// gets no HTTP answer, only the close (the failure is counted and logged).
    fn fail_for(&self, client: &UnixStream, req: &Request, kind: Failure, code: u16, body: &str) {
        if req.pin.is_some() && matches!(req.target, Target::Authority(..)) {
            self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
            log::info!(
                "proxy: an intercepted TLS connection to {} closed: {body}",
                req.raw_target
            );
            return;
        }
        self.fail(client, kind, code, body);
    }

    /// Answers the client with an error of `kind` and closes; `body` is one line that says
    /// what happened and what to do.
    fn fail(&self, client: &UnixStream, kind: Failure, code: u16, body: &str) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        let body = format!("{body}\n");
        let _ = write!(
            &*client,
            "HTTP/1.1 {code} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            kind.reason(code),
            body.len()
        );
    }
}

/// Entry points for the fuzz targets (`fuzz/`), with the `fuzzing` feature.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    /// Parses a request head as the proxy does and, when it is one, writes both heads the
    /// proxy could send on (to an upstream proxy and to the server).
    pub fn request_head(head: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let r = super::Request::parse(head).ok()?;
        Some((r.rewrite(true, None, false), r.rewrite(false, None, true)))
    }

    /// A head the NAT intercepted (transparent mode), made absolute as the proxy makes it.
    pub fn intercepted_head(head: &[u8]) -> Option<Vec<u8>> {
        let original = std::net::SocketAddr::from(([198, 18, 0, 9], 80));
        let r = super::Request::parse_intercepted(head, original).ok()?;
        Some(r.rewrite(true, None, false))
    }

    /// A response head as the proxy reads it, its framing, and the head it passes on.
    pub fn response_head(head: &[u8]) -> Option<Vec<u8>> {
        let r = super::wire::Response::parse(head)?;
        let _ = (r.framing("GET"), r.framing("HEAD"), r.closes());
        Some(r.rewrite(head, false))
    }

    /// The name in a TLS ClientHello, as transparent mode reads it.
    pub fn client_hello(rec: &[u8]) -> Option<String> {
        let _ = super::sni::record_len(rec);
        super::sni::server_name(rec)
    }
}

#[cfg(test)]
mod tests;
