//! One guest connection to the proxy, served to its end: a keep-alive loop of requests.
//!
//! Each request is read whole-head, checked, routed (straight to the server, or through the
//! upstream unless the bypass list says otherwise) and relayed with its body; the answer
//! comes back with its body framed as the server framed it, and the loop reads the next
//! request. The server or upstream connection is held between requests and used again
//! while the next request goes the same way, so a guest's keep-alive connection is one
//! upstream connection too. A held connection the server closed meanwhile is noticed when
//! the request gets no answer at all, and the request is sent again on a new one (RFC 9112,
//! 9.3.1) when its body is in memory.
//!
//! Request bodies up to [`PREREAD`] are read before anything is sent on: a malformed body
//! is refused before it reaches the next hop, and a request the upstream answers with 407
//! can be sent again with ferry's credentials. Longer bodies are streamed.
//!
//! A CONNECT ends the loop: the connection becomes a tunnel. So does a `101` upgrade.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::auth::{self, Step};
use super::handoff::Handoff;
use super::request::{Request, Target};
use super::tls;
use super::tunnel::{connect, connect_pinned, ConnectError, Counted};
use super::upstream::Upstream;
use super::wire::{BodyError, Framing, HeadError, Peer, Response};
use super::{Failure, Proxy};
use crate::rules::Counters;

/// How long a client has to send a request head once it has begun.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a keep-alive connection may wait for its next request; and how long a body may
/// stall.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server or upstream may take to answer.
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// Request bodies up to this size are read before the request is sent on.
const PREREAD: usize = 64 * 1024;

/// The connection to a server or upstream held between requests.
struct Held {
    /// Where it goes: the upstream, or the server's host and port.
    to: (Option<Upstream>, String, u16),
    peer: Peer,
    counters: Option<Arc<Counters>>,
    /// Whether a per-connection scheme (NTLM) has authenticated it with the upstream.
    authed: bool,
}

/// What the loop does after an exchange.
enum Next {
    Again,
    Close,
}

/// Serves `client` until it closes, errs or becomes a tunnel (which goes to the NAT through
/// `handoff`, when the NAT offers one).
pub(super) fn serve(
    proxy: &Proxy,
    client: UnixStream,
    original: Option<SocketAddr>,
    handoff: Option<&Handoff>,
) {
    let mut guest = Peer::new(client);
    if let Some(o) = original {
        proxy.intercepted.fetch_add(1, Ordering::Relaxed);
        // TLS or HTTP by what the guest sends first, not by the port: a TLS record starts
        // with 22 (handshake), a request with a method's letter.
        if guest.peek_until(HEAD_TIMEOUT, |_| Some(1)).first() == Some(&22) {
            return intercept_tls(proxy, guest, o, handoff);
        }
    }
    let mut held: Option<Held> = None;
    loop {
        let head = match guest.read_head(Some(IDLE_TIMEOUT), HEAD_TIMEOUT) {
            Ok(h) => h,
            // The ends of a keep-alive connection: the client closed, or went quiet.
            Err(HeadError::Closed | HeadError::Timeout { started: false }) => return,
            Err(HeadError::Timeout { started: true }) => {
                return proxy.fail(
                    &guest.stream,
                    Failure::Timeout,
                    408,
                    &format!(
                        "ferry proxy: the request head did not arrive within {} s; send it whole",
                        HEAD_TIMEOUT.as_secs()
                    ),
                )
            }
            Err(HeadError::TooLarge) => {
                return proxy.fail(
                    &guest.stream,
                    Failure::TooLarge,
                    431,
                    &format!(
                        "ferry proxy: the request head is longer than {} KiB; send shorter headers",
                        super::wire::MAX_HEAD / 1024
                    ),
                )
            }
            Err(HeadError::Io(_)) => return,
        };
        let parsed = match original {
            Some(o) => Request::parse_intercepted(&head, o),
            None => Request::parse(&head),
        };
        let req = match parsed {
            Ok(r) => r,
            Err(r) => {
                let kind = if r.code == 431 {
                    Failure::TooLarge
                } else {
                    Failure::BadRequest
                };
                return proxy.fail(
                    &guest.stream,
                    kind,
                    r.code,
                    &format!("ferry proxy: {}", r.why),
                );
            }
        };
        let _ = guest.stream.set_read_timeout(Some(IDLE_TIMEOUT));
        let choices = match proxy.route(&req) {
            Ok(c) => c,
            Err(e) => {
                return proxy.fail(
                    &guest.stream,
                    Failure::Pac,
                    502,
                    &format!("ferry proxy: the PAC file says nothing usable for this request: {e}; fix the PAC file or `ferry ctl proxy pac` another"),
                )
            }
        };
        if let Target::Authority(..) = req.target {
            return super::tunnel::tunnel(proxy, guest, &req, &choices, handoff);
        }
        match exchange(proxy, &mut guest, &req, &choices, &mut held) {
            Next::Again => continue,
            Next::Close => return,
        }
    }
}

/// Where a request may go, in order: an upstream, or `None` for straight to the server.
pub(super) type Choices = [Option<Upstream>];

/// Opens a connection to where the request goes, trying `choices` in order until one
/// connects (a proxy that cannot be reached falls back to the next), or answers the guest
/// why not. Returns the choice that connected, the socket, and the rule counters of a
/// direct connection.
pub(super) fn open(
    proxy: &Proxy,
    guest: &UnixStream,
    req: &Request,
    choices: &Choices,
) -> Option<(Option<Upstream>, TcpStream, Option<Arc<Counters>>)> {
    let mut failed = Vec::new();
    let mut last = None;
    for upstream in choices {
        let (host, port) = match upstream {
            Some(up) => (up.host.as_str(), up.port),
            None => req.target.host_port(),
        };
        // Servers reached directly are checked against the guest's rules; an upstream proxy
        // is the host's own choice. A request the NAT intercepted goes to the address the
        // guest chose, which the NAT checked.
        let rules = if upstream.is_none() {
            proxy.rules.as_deref()
        } else {
            None
        };
        let pinned = req.pin.filter(|_| upstream.is_none());
        let connected = match pinned {
            Some(a) => connect_pinned(a).map_err(ConnectError::Io),
            None => connect(host, port, rules),
        };
        // An https:// upstream: TLS beneath, plain HTTP above.
        let connected = match (connected, upstream) {
            (Ok((s, counters)), Some(up)) if up.tls => tls::wrap(s, &up.host)
                .map(|s| (s, counters))
                .map_err(ConnectError::Tls),
            (c, _) => c,
        };
        let what = match upstream {
            Some(up) => format!("the upstream proxy {up}"),
            None => format!("{host}:{port}"),
        };
        match connected {
            Ok((s, counters)) => {
                if !failed.is_empty() {
                    log::info!("proxy: {} unreachable; {what} instead", failed.join(", "));
                }
                proxy.connections.fetch_add(1, Ordering::Relaxed);
                return Some((upstream.clone(), s, counters));
            }
            Err(ConnectError::Refused(a, pos, spec)) => {
                proxy.audit(req, upstream.as_ref(), Some(403), "refused");
                log::debug!("proxy: rule {pos} ({spec}) refuses {a}");
                proxy.fail_for(
                    guest,
                    req,
                    Failure::Refused,
                    403,
                    &format!("ferry proxy: rule {pos} ({spec}) refuses connections to {a}; `ferry ctl rules` lists the rules"),
                );
                return None;
            }
            Err(ConnectError::Io(e)) => {
                log::debug!("proxy: cannot connect to {what}: {e}");
                let why = format!("cannot connect to {what}: {e}");
                last = Some((upstream, why, "check the address and that the server is up"));
                failed.push(what);
            }
            Err(ConnectError::Tls(e)) => {
                log::warn!("proxy: no TLS with {what}: {e}");
                let why = format!("no TLS with {what}: {e}");
                last = Some((upstream, why, "check that the host trusts the proxy's certificate (SSL_CERT_FILE names a CA) and that it is a TLS port"));
                failed.push(what);
            }
        }
    }
    let (upstream, why, hint) = last?;
    proxy.audit(req, upstream.as_ref(), Some(502), "unreachable");
    let tried = if failed.len() > 1 {
        format!(" (tried {})", failed.join(", "))
    } else {
        String::new()
    };
    proxy.fail_for(
        guest,
        req,
        Failure::Unreachable,
        502,
        &format!("ferry proxy: {why}{tried}; {hint}"),
    );
    None
}

/// Ferry's first step for `upstream` when the guest brought no credentials: the scheme
/// learned from an earlier 407, if any.
pub(super) fn preemptive(
    proxy: &Proxy,
    req: &Request,
    upstream: Option<&Upstream>,
) -> Option<Step> {
    let up = upstream?;
    if req.has_proxy_auth() {
        return None;
    }
    let scheme = proxy.learned_scheme(up)?;
    proxy.start_auth(up, scheme)?.ok()
}

/// What a 407 from the upstream means for this request, after ferry sent `sent`: `Some`
/// step to send it again with, `None` when the 407 goes to the guest as it is, or the
/// one-line reason the guest gets instead.
pub(super) fn answer_challenge(
    proxy: &Proxy,
    req: &Request,
    up: &Upstream,
    resp: &Response,
    sent: Option<&Step>,
) -> Result<Option<Step>, String> {
    if req.has_proxy_auth() {
        return Ok(None);
    }
    match sent {
        Some(s) if s.last && !s.scheme.needs_password() => {
            return Err(format!(
                "ferry proxy: the upstream proxy {up} refused ferry's Kerberos ticket; check that the proxy's keytab holds HTTP/{} in the realm of ferry's ticket (klist, as ferry's user, shows it)",
                up.host
            ))
        }
        Some(s) if s.last => {
            return Err(format!(
                "ferry proxy: the upstream proxy {up} refused ferry's {} credentials for user {}; check the password in --proxy-credentials or {}",
                s.scheme.name(),
                up.user.as_deref().unwrap_or("?"),
                super::upstream::SECRET_ENV
            ))
        }
        Some(s) => {
            return proxy.next_auth(up, s, resp).map(Some).map_err(|e| {
                format!("ferry proxy: the {} handshake with the upstream proxy {up} failed: {e}; check that the upstream is a working proxy", s.scheme.name())
            })
        }
        None => {}
    }
    let offered = auth::offered(resp.header("proxy-authenticate"));
    let schemes = auth::choices(&offered);
    if schemes.is_empty() {
        if up.user.is_some() {
            log::warn!(
                "proxy: the upstream proxy {up} asks for {} authentication, which ferry does not do; its 407 goes to the guest",
                offered.join(", ")
            );
        }
        return Ok(None);
    }
    // The strongest scheme ferry can do; a Negotiate with no ticket falls back to a
    // password, when ferry holds one.
    let mut failed = None;
    for scheme in schemes {
        match proxy.start_auth(up, scheme) {
            Some(Ok(step)) => return Ok(Some(step)),
            Some(Err(e)) => {
                log::debug!("proxy: no {} step for {up}: {e}", scheme.name());
                failed.get_or_insert(e);
            }
            None => {}
        }
    }
    Err(match failed {
        Some(e) => format!(
            "ferry proxy: ferry cannot authenticate to the upstream proxy {up}: {e}; run kinit as ferry's user before ferry starts (or name a client keytab in KRB5_CLIENT_KTNAME), or give a password in --proxy-credentials FILE"
        ),
        None => format!(
            "ferry proxy: the upstream proxy {up} asks for credentials and ferry holds none; give the user in --proxy-upstream http://USER@HOST:PORT and the password in --proxy-credentials FILE"
        ),
    })
}

/// Relays one request and its answer. The guest connection goes on unless either side
/// closes or the framing broke.
fn exchange(
    proxy: &Proxy,
    guest: &mut Peer<UnixStream>,
    req: &Request,
    choices: &Choices,
    held: &mut Option<Held>,
) -> Next {
    let framing = req.framing().unwrap_or(Framing::None);
    let streaming_continue = req.expects_continue() && framing != Framing::None;
    let mut body = Vec::new();
    let whole = if streaming_continue {
        false
    } else {
        match guest.read_body_upto(framing, PREREAD, &mut body) {
            Ok(w) => w,
            Err(BodyError::Malformed(why)) => {
                return malformed(proxy, &guest.stream, &why);
            }
            Err(_) => return Next::Close,
        }
    };
    let (host, port) = req.target.host_port();
    let close = req.wants_close();
    let mut cred: Option<Step> = None;
    let mut upstream: Option<Upstream> = None;
    // A plain try, an NTLM NEGOTIATE, its AUTHENTICATE, and once more for a stale connection.
    for attempt in 0..4 {
        // Once a way is chosen, the request's later tries keep to it (a handshake is with
        // one upstream).
        let only = [upstream.clone()];
        let ways: &Choices = if attempt == 0 { choices } else { &only };
        let reused = held
            .as_ref()
            .is_some_and(|h| h.to.1 == host && h.to.2 == port && ways.contains(&h.to.0));
        let mut server = match held.take().filter(|_| reused) {
            Some(h) => h,
            None => match open(proxy, &guest.stream, req, ways) {
                Some((up, s, counters)) => Held {
                    to: (up, host.to_string(), port),
                    peer: Peer::new(s),
                    counters,
                    authed: false,
                },
                None => return Next::Close,
            },
        };
        upstream = server.to.0.clone();
        let through = upstream.is_some();
        if cred.is_none() && !server.authed {
            cred = preemptive(proxy, req, upstream.as_ref());
        }
        if attempt == 0 {
            // A request counts as relayed once a way to its server is open.
            proxy.requests.fetch_add(1, Ordering::Relaxed);
            proxy.audit(req, upstream.as_ref(), None, "relayed");
        }
        let counters = server.counters.clone();
        let mut out = Counted {
            inner: &server.peer.stream,
            counters: counters.as_deref(),
        };
        let auth = cred
            .as_ref()
            .filter(|_| !server.authed)
            .map(|c| c.header.as_str());
        let head = req.rewrite(through, auth, close);
        let mut sent = out.write_all(&head).and_then(|()| out.write_all(&body));
        if sent.is_ok() && streaming_continue {
            // The guest waits for 100 Continue before its body; ferry gives it at once
            // and streams the body, as the server would have asked for it anyway.
            sent = guest.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        if sent.is_ok() && !whole {
            match guest.copy_body(framing, &mut out) {
                Ok(()) => {}
                Err(BodyError::Malformed(why)) => {
                    return malformed(proxy, &guest.stream, &why);
                }
                Err(BodyError::Read(e)) => {
                    log::debug!("proxy: the guest's request body ended early: {e}");
                    return Next::Close;
                }
                Err(BodyError::Write(e)) => sent = Err(e),
            }
        }
        let answer = sent
            .map_err(HeadError::Io)
            .and_then(|()| server.peer.read_head(Some(ANSWER_TIMEOUT), ANSWER_TIMEOUT));
        let mut rhead = match answer {
            Ok(h) => h,
            // A held connection the server had closed: once more on a new one.
            Err(HeadError::Closed | HeadError::Io(_)) if reused && whole && attempt == 0 => {
                continue
            }
            Err(e) => {
                let what = match &upstream {
                    Some(up) => format!("the upstream proxy {up}"),
                    None => format!("{host}:{port}"),
                };
                proxy.fail(
                    &guest.stream,
                    Failure::Unreachable,
                    502,
                    &format!(
                        "ferry proxy: {what} gave no answer ({}); try again, and check the server",
                        head_error(&e)
                    ),
                );
                return Next::Close;
            }
        };
        // Interim answers (102, 103; a 100 the server sent anyway) go on as they came.
        let mut resp = Response::parse(&rhead);
        while let Some(r) = resp
            .as_ref()
            .filter(|r| (100..200).contains(&r.code) && r.code != 101)
        {
            if (r.code != 100 || !streaming_continue) && guest.stream.write_all(&rhead).is_err() {
                return Next::Close;
            }
            rhead = match server.peer.read_head(Some(ANSWER_TIMEOUT), ANSWER_TIMEOUT) {
                Ok(h) => h,
                Err(_) => return Next::Close,
            };
            resp = Response::parse(&rhead);
        }
        let Some(resp) = resp else {
            proxy.fail(&guest.stream, Failure::Unreachable, 502, "ferry proxy: the server's answer is not HTTP; check that the address is a web server");
            return Next::Close;
        };
        let rframing = resp.framing(&req.method);
        if resp.code == 407 {
            if let Some(up) = upstream.as_ref() {
                match answer_challenge(proxy, req, up, &resp, cred.as_ref()) {
                    Ok(Some(c)) if whole => {
                        // Read the challenge's body off, then send the request again.
                        if server.peer.copy_body(rframing, &mut io::sink()).is_ok()
                            && !resp.closes()
                            && rframing != Framing::UntilClose
                        {
                            *held = Some(server);
                        }
                        proxy.learn(up, c.scheme);
                        cred = Some(c);
                        continue;
                    }
                    Ok(_) => {}
                    Err(why) => {
                        proxy.forget(up);
                        proxy.fail(&guest.stream, Failure::Auth, 407, &why);
                        return Next::Close;
                    }
                }
            }
        }
        let close_after = close || rframing == Framing::UntilClose || resp.code == 101;
        let mut to_guest = Counted {
            inner: &guest.stream,
            counters: counters.as_deref(),
        };
        if to_guest
            .write_all(&resp.rewrite(&rhead, close_after))
            .is_err()
        {
            return Next::Close;
        }
        if resp.code == 101 {
            // An upgrade (WebSocket): the connection is a tunnel now.
            let (early, late) = (guest.take_pending(), server.peer.take_pending());
            if let Ok(g) = guest.stream.try_clone() {
                super::tunnel::carry(g, &early, server.peer.stream, &late, counters, None);
            }
            return Next::Close;
        }
        if server.peer.copy_body(rframing, &mut to_guest).is_err() {
            return Next::Close;
        }
        if resp.code != 407
            && cred
                .as_ref()
                .is_some_and(|c| c.scheme.per_connection() && c.last)
        {
            server.authed = true;
        }
        if !resp.closes() && rframing != Framing::UntilClose {
            *held = Some(server);
        }
        return if close_after {
            Next::Close
        } else {
            Next::Again
        };
    }
    proxy.fail(
        &guest.stream,
        Failure::Unreachable,
        502,
        "ferry proxy: the server closed the connection before answering, twice; try again",
    );
    Next::Close
}

/// Refuses a request whose body's framing broke, and ends the connection: where the next
/// request would begin is unknown.
fn malformed(proxy: &Proxy, guest: &UnixStream, why: &str) -> Next {
    proxy.fail(
        guest,
        Failure::BadRequest,
        400,
        &format!("ferry proxy: the request body is malformed: {why}; send a well-formed body"),
    );
    Next::Close
}

fn head_error(e: &HeadError) -> String {
    match e {
        HeadError::Closed => "it closed the connection".into(),
        HeadError::TooLarge => "its answer's head is too long".into(),
        HeadError::Timeout { .. } => format!("none within {} s", ANSWER_TIMEOUT.as_secs()),
        HeadError::Io(e) => e.to_string(),
    }
}

/// A guest's TLS connection that the NAT sent here in transparent mode (to port 443, as a
/// rule): a CONNECT to the name in its TLS ClientHello (the address
/// it connected to, without one), through the upstream or straight to that address.
fn intercept_tls(
    proxy: &Proxy,
    mut guest: Peer<UnixStream>,
    original: SocketAddr,
    handoff: Option<&Handoff>,
) {
    let hello = guest.peek_until(HEAD_TIMEOUT, super::sni::record_len);
    let host = super::sni::server_name(hello).unwrap_or_else(|| original.ip().to_string());
    let req = Request::connect_to(&host, original.port(), original);
    match proxy.route(&req) {
        Ok(choices) => super::tunnel::tunnel(proxy, guest, &req, &choices, handoff),
        Err(e) => {
            // No HTTP answer for a TLS client: counted, logged, closed.
            proxy.errors[Failure::Pac as usize].fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "proxy: the PAC file failed for an intercepted TLS connection to {host}: {e}"
            );
        }
    }
}
