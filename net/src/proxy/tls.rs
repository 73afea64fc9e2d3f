//! TLS to an `https://` upstream proxy, as a shim beneath the rest of the proxy.
//!
//! Everything above this module speaks HTTP over a `TcpStream`: sessions read heads and
//! bodies from it, tunnels hand it to [`super::pump`], whose two threads each own one
//! direction of a cloned socket. A TLS connection cannot be split that way (one state
//! machine holds both directions), so it is not threaded through them. Instead [`wrap`]
//! makes the TLS handshake with the upstream, then gives the caller one end of a loopback
//! socket pair; a thread of its own moves bytes between the other end and the TLS
//! connection, with both sockets non-blocking and one `poll` for both. Half-closes pass
//! through: an end of stream from ferry's side becomes a `close_notify` and a FIN, the
//! upstream's `close_notify` or FIN an end of stream; a TLS error resets both sides. The
//! cost is one more copy, a loopback hop and a thread per connection, for `https://`
//! upstreams only.
//!
//! The upstream's certificate is checked against the host's trusted certificates (the
//! system store, or `SSL_CERT_FILE`/`SSL_CERT_DIR`, as OpenSSL-based tools read them) and
//! the name in the upstream's URL, as curl's `--proxy https://...` does.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// How long the handshake with the upstream may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client configuration, built once: loading the host's certificates reads a few
/// hundred files.
fn config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(format!(
                    "the host has no trusted certificates to check it with{why}"
                ));
            }
            // ring rather than aws-lc-rs, which would add a C build of its own (cmake); its
            // lack of post-quantum key exchange, the reason for the deprecation, is a
            // lesser concern for the hop to a proxy on the host's own network.
            #[allow(deprecated)]
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| format!("cannot set up TLS: {e}"))
        })
        .clone()
}

/// Makes a TLS connection to the upstream at `host` over `sock`, and returns the socket
/// the caller speaks plain HTTP on, or why the handshake failed.
pub(super) fn wrap(mut sock: TcpStream, host: &str) -> Result<TcpStream, String> {
    let config = config()?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host} is not a name TLS can check ({e})"))?;
    let mut tls = ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
    let _ = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    while tls.is_handshaking() {
        tls.complete_io(&mut sock).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("no TLS answer within {} s", HANDSHAKE_TIMEOUT.as_secs())
            }
            _ => format!("the TLS handshake failed: {e}"),
        })?;
    }
    let _ = sock.set_read_timeout(None);
    let _ = sock.set_write_timeout(None);
    let (near, far) = loopback_pair().map_err(|e| format!("cannot make a loopback pair: {e}"))?;
    std::thread::Builder::new()
        .name("ferry-proxy-tls".into())
        .spawn(move || relay(tls, sock, far))
        .map_err(|e| format!("cannot start its thread: {e}"))?;
    Ok(near)
}

/// Two connected TCP sockets on the loopback. The listener lives only while they connect,
/// and the accepted socket is checked to be the one this call connected.
fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let near = TcpStream::connect(l.local_addr()?)?;
    loop {
        let (far, from) = l.accept()?;
        if from == near.local_addr()? {
            let _ = near.set_nodelay(true);
            let _ = far.set_nodelay(true);
            return Ok((near, far));
        }
    }
}

/// Most plaintext from the upstream held for ferry's side before the upstream is read again.
const HELD: usize = 256 * 1024;

/// Moves bytes between `inner` (ferry's plain side) and the TLS connection `tls` over
/// `sock` until both directions have ended. Both sockets are non-blocking and each direction
/// waits only on its own: a side that does not read holds back what goes to it, never the
/// other direction (a blocking write to one side would stop the thread from reading the
/// other, and two bulk directions could then wait on each other for good).
fn relay(mut tls: ClientConnection, mut sock: TcpStream, mut inner: TcpStream) {
    if sock.set_nonblocking(true).is_err() || inner.set_nonblocking(true).is_err() {
        return reset(sock, inner);
    }
    let mut buf = vec![0u8; 16 * 1024];
    // Plaintext from the upstream that ferry's side has not taken yet.
    let mut down: Vec<u8> = Vec::new();
    // Each side's end of stream, when seen; and whether it was passed on.
    let (mut inner_eof, mut upstream_eof) = (false, false);
    let (mut sock_shut, mut inner_shut) = (false, false);
    loop {
        // Out as far as each side takes: records to the upstream, plaintext to ferry's side.
        while tls.wants_write() {
            match tls.write_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return reset(sock, inner),
            }
        }
        while !down.is_empty() {
            match inner.write(&down) {
                Ok(n) => {
                    down.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return reset(sock, inner),
            }
        }
        // An end of stream goes on after everything before it.
        if inner_eof && !sock_shut && !tls.wants_write() {
            let _ = sock.shutdown(Shutdown::Write);
            sock_shut = true;
        }
        if upstream_eof && !inner_shut && down.is_empty() {
            let _ = inner.shutdown(Shutdown::Write);
            inner_shut = true;
        }
        if sock_shut && inner_shut {
            return;
        }
        // Ferry's side is read only once the records before are out (which bounds what
        // rustls queues), the upstream only while ferry's side keeps up.
        let read_inner = !inner_eof && !tls.wants_write();
        let read_sock = !upstream_eof && down.len() < HELD;
        let mut fds = [
            poll_for(&inner, read_inner, !down.is_empty()),
            poll_for(&sock, read_sock, tls.wants_write()),
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the length given; both
        // descriptors are owned by this frame and open (or -1, which poll skips).
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return reset(sock, inner);
        }
        if read_inner && fds[0].revents != 0 {
            match inner.read(&mut buf) {
                Ok(0) => {
                    inner_eof = true;
                    tls.send_close_notify();
                }
                // Under rustls' limit on queued records (64 KiB), which are all out.
                Ok(n) => {
                    if tls.writer().write_all(&buf[..n]).is_err() {
                        return reset(sock, inner);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return reset(sock, inner),
            }
        }
        if read_sock && fds[1].revents != 0 {
            match from_upstream(&mut tls, &mut sock, &mut down, &mut buf) {
                Ok(ended) => upstream_eof |= ended,
                Err(e) => {
                    log::debug!("proxy: TLS from the upstream: {e}");
                    return reset(sock, inner);
                }
            }
        }
    }
}

/// What `poll` waits for on `s`: input when `read`, room when `write`; a socket that waits
/// for neither is skipped (a negative descriptor), so a hung-up side does not wake the loop
/// again and again.
fn poll_for(s: &TcpStream, read: bool, write: bool) -> libc::pollfd {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    libc::pollfd {
        fd: if events == 0 { -1 } else { s.as_raw_fd() },
        events,
        revents: 0,
    }
}

/// Reads what the upstream sent and adds its plaintext to `down`; `true` once the upstream
/// has ended its stream. An end of TCP without TLS's `close_notify` counts as an end too,
/// as many servers close that way and a plain upstream's end looks no different; a TLS
/// error is an error.
fn from_upstream(
    tls: &mut ClientConnection,
    sock: &mut TcpStream,
    down: &mut Vec<u8>,
    buf: &mut [u8],
) -> io::Result<bool> {
    match tls.read_tls(sock) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(e),
    }
    tls.process_new_packets().map_err(io::Error::other)?;
    loop {
        match tls.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => down.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// Ends the relay with a reset of both sockets, so each peer sees a broken connection
/// rather than a clean end of stream.
fn reset(sock: TcpStream, inner: TcpStream) {
    crate::ports::reset(sock);
    crate::ports::reset(inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_speaks_no_tls_is_an_error_not_a_hang() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut hello = [0u8; 512];
            let _ = s.read(&mut hello);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        });
        let e = wrap(TcpStream::connect(addr).unwrap(), "127.0.0.1").unwrap_err();
        // Without trusted certificates on this host, that is the reason instead.
        assert!(
            e.starts_with("the TLS handshake failed: ") || e.contains("no trusted certificates"),
            "{e}"
        );
        server.join().unwrap();
        let (a, b) = loopback_pair().unwrap();
        assert_eq!(a.local_addr().unwrap(), b.peer_addr().unwrap());
    }
}
