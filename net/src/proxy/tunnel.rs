//! Connections out of the proxy: to a server the guest's rules allow, and the byte pump
//! that a CONNECT tunnel or an upgraded connection becomes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use crate::rules::{Action, Counters, Proto, RuleSpec, Rules};

/// How long connecting to a server or upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection to a server was not made.
pub(super) enum ConnectError {
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

/// Moves bytes both ways until both sides have finished; an end on one side is passed on
/// as a half-close, so a client that shuts its writing side still gets its answer.
pub(super) fn splice(client: TcpStream, server: TcpStream, counters: Option<Arc<Counters>>) {
    let _ = client.set_read_timeout(None);
    let _ = server.set_read_timeout(None);
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
