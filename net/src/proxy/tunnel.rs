//! Connections out of the proxy: to a server the guest's rules allow, CONNECT tunnels
//! (straight or through the upstream, asked by the guest or made for an intercepted TLS
//! connection); once open, a tunnel goes to the NAT's flow ([`super::handoff`]), or to
//! [`super::pump`] when the NAT offered none.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::handoff::{Handoff, Taken};
use super::pump::bridge;
use super::request::Request;
use super::session::{answer_challenge, open, preemptive, Choices, ANSWER_TIMEOUT};
use super::wire::{Framing, HeadError, Peer, Response};
use super::{Failure, Proxy};
use crate::rules::{Action, Counters, Proto, RuleSpec, Rules};

/// How long connecting to a server or upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection to a server was not made.
pub(super) enum ConnectError {
    /// A rule refused its address: the address, the rule's position and the rule.
    Refused(SocketAddr, usize, RuleSpec),
    /// The resolver or the connect failed.
    Io(io::Error),
    /// The TLS handshake with an `https://` upstream failed: why.
    Tls(String),
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
pub(super) fn connect(
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

/// Connects to `to`, an address the NAT already checked against the rules.
pub(super) fn connect_pinned(to: SocketAddr) -> io::Result<(TcpStream, Option<Arc<Counters>>)> {
    let s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
    let _ = s.set_nodelay(true);
    Ok((s, None))
}

/// A writer that adds what passes through it to a rule's byte counter.
pub(super) struct Counted<'a, W: Write> {
    pub inner: W,
    pub counters: Option<&'a Counters>,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        if let Some(c) = self.counters {
            c.add_bytes(n);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// An open tunnel (or upgraded connection) from its first bytes: what the guest sent early
/// goes to the server and what the server sent early to the guest, then the rest both ways.
pub(super) fn carry(
    guest: UnixStream,
    early: &[u8],
    server: TcpStream,
    late: &[u8],
    counters: Option<Arc<Counters>>,
    handoff: Option<&Handoff>,
) {
    if (&server).write_all(early).is_ok() && (&guest).write_all(late).is_ok() {
        relay(guest, server, counters, handoff);
    }
}

/// An open tunnel's bytes: the NAT's to move when it takes them (`handoff`), else this
/// thread's.
fn relay(
    guest: UnixStream,
    server: TcpStream,
    counters: Option<Arc<Counters>>,
    handoff: Option<&Handoff>,
) {
    let taken = Taken {
        server,
        proxy_end: guest,
        counters,
    };
    let taken = match handoff {
        Some(h) => match h.give(taken) {
            Ok(()) => return,
            Err(t) => t,
        },
        None => taken,
    };
    bridge(taken.proxy_end, taken.server, taken.counters);
}

/// A CONNECT: straight to the server (ferry answers 200), or relayed to the upstream, whose
/// answer the guest gets; then bytes both ways. For a TLS connection the NAT intercepted
/// (`req.pin` set), the guest sent no CONNECT and gets no answer to one: its ClientHello
/// goes on once the way is open, and a failure closes the connection.
pub(super) fn tunnel(
    proxy: &Proxy,
    mut guest: Peer<UnixStream>,
    req: &Request,
    choices: &Choices,
    handoff: Option<&Handoff>,
) {
    let silent = req.pin.is_some();
    let Some((upstream, first, counters)) = open(proxy, &guest.stream, req, choices) else {
        return;
    };
    let Some(up) = upstream else {
        proxy.tunnels.fetch_add(1, Ordering::Relaxed);
        proxy.audit(req, None, Some(200), "tunnel");
        let early = guest.take_pending();
        if let Some(c) = &counters {
            c.add_bytes(early.len());
        }
        let answered = silent
            || guest
                .stream
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .is_ok();
        if answered {
            carry(guest.stream, &early, first, &[], counters, handoff);
        }
        return;
    };
    let mut cred = preemptive(proxy, req, Some(&up));
    let mut held = Some(Peer::new(first));
    let only = [Some(up.clone())];
    for attempt in 0..3 {
        let mut server = match held.take() {
            Some(p) => p,
            None => match open(proxy, &guest.stream, req, &only) {
                Some((_, s, _)) => Peer::new(s),
                None => return,
            },
        };
        if attempt == 0 {
            proxy.tunnels.fetch_add(1, Ordering::Relaxed);
            proxy.audit(req, Some(&up), None, "tunnel");
        }
        let head = req.rewrite(true, cred.as_ref().map(|c| c.header.as_str()), false);
        let answer = server
            .stream
            .write_all(&head)
            .map_err(HeadError::Io)
            .and_then(|()| server.read_head(Some(ANSWER_TIMEOUT), ANSWER_TIMEOUT));
        let (rhead, resp) = match answer.map(|h| (Response::parse(&h), h)) {
            Ok((Some(r), h)) => (h, r),
            Ok((None, _)) | Err(_) => {
                proxy.fail_for(&guest.stream, req, Failure::Unreachable, 502, &format!("ferry proxy: the upstream proxy {up} gave no answer to CONNECT; check that it is an HTTP proxy"));
                return;
            }
        };
        let rframing = resp.framing("CONNECT");
        if resp.code == 407 {
            match answer_challenge(proxy, req, &up, &resp, cred.as_ref()) {
                Ok(Some(c)) => {
                    if server.copy_body(rframing, &mut io::sink()).is_ok()
                        && !resp.closes()
                        && rframing != Framing::UntilClose
                    {
                        held = Some(server);
                    }
                    proxy.learn(&up, c.scheme);
                    cred = Some(c);
                    continue;
                }
                Ok(None) => {}
                Err(why) => {
                    proxy.forget(&up);
                    return proxy.fail_for(&guest.stream, req, Failure::Auth, 407, &why);
                }
            }
        }
        if !silent && guest.stream.write_all(&rhead).is_err() {
            return;
        }
        if (200..300).contains(&resp.code) {
            let (early, late) = (guest.take_pending(), server.take_pending());
            carry(guest.stream, &early, server.stream, &late, None, handoff);
        } else if silent {
            log::debug!(
                "proxy: the upstream proxy {up} answered {} to the CONNECT for an intercepted TLS connection to {}; closing it",
                resp.code,
                req.raw_target
            );
        } else {
            let _ = server.copy_body(rframing, &mut &guest.stream);
        }
        return;
    }
}
