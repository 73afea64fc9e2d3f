//! TLS to an `https://` upstream proxy, as a shim beneath the rest of the proxy.
//!
//! Everything above this module speaks HTTP over a `TcpStream`: sessions read heads and
//! bodies from it, tunnels hand it to [`super::pump`], whose two threads each own one
//! direction of a cloned socket. A TLS connection cannot be split that way (one state
//! machine holds both directions), so it is not threaded through them. Instead [`wrap`]
//! makes the TLS handshake with the upstream, then gives the caller one end of a loopback
//! socket pair; a thread of its own moves bytes between the other end and the TLS
//! connection, waiting on both sockets with `poll`. Half-closes pass through: an end of
//! stream from ferry's side becomes a `close_notify` and a FIN, the upstream's
//! `close_notify` or FIN an end of stream. The cost is one more copy and a loopback hop,
//! for `https://` upstreams only.
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
                    "the host has no trusted certificates to check it with{why}; install ca-certificates or point SSL_CERT_FILE at the proxy's CA"
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
    let name = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(name.to_string())
        .map_err(|e| format!("{host} is not a name TLS can check ({e})"))?;
    let mut tls = ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
    let _ = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    while tls.is_handshaking() {
        tls.complete_io(&mut sock)
            .map_err(|e| format!("the TLS handshake failed: {e}"))?;
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

/// Moves bytes between `inner` (ferry's plain side) and the TLS connection `tls` over
/// `sock` until both directions have ended.
fn relay(mut tls: ClientConnection, mut sock: TcpStream, mut inner: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    // Whether each side may still send: ferry's side (plaintext to encrypt) and the
    // upstream (records to decrypt).
    let (mut inner_open, mut upstream_open) = (true, true);
    loop {
        while tls.wants_write() {
            if tls.write_tls(&mut sock).is_err() {
                let _ = inner.shutdown(Shutdown::Both);
                return;
            }
        }
        if !inner_open && !upstream_open {
            return;
        }
        let mut fds = [poll_for(&inner, inner_open), poll_for(&sock, upstream_open)];
        // SAFETY: `fds` is a valid array of two pollfd for the length given; both
        // descriptors are owned by this frame and open.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[0].revents != 0 {
            match inner.read(&mut buf) {
                Ok(0) | Err(_) => {
                    inner_open = false;
                    tls.send_close_notify();
                    while tls.wants_write() && tls.write_tls(&mut sock).is_ok() {}
                    let _ = sock.shutdown(Shutdown::Write);
                }
                Ok(n) => {
                    if send_plain(&mut tls, &mut sock, &buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        if fds[1].revents != 0 && !from_upstream(&mut tls, &mut sock, &mut inner, &mut buf) {
            upstream_open = false;
            let _ = inner.shutdown(Shutdown::Write);
        }
    }
    let _ = inner.shutdown(Shutdown::Both);
    let _ = sock.shutdown(Shutdown::Both);
}

/// Encrypts `data` for the upstream. rustls takes plaintext only while its queue of records
/// is under its limit (64 KiB): a write it takes in part is followed by sending what is
/// queued, so no byte is dropped however much comes at once.
fn send_plain(tls: &mut ClientConnection, sock: &mut TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = tls.writer().write(data)?;
        if n == 0 && !tls.wants_write() {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
        if n == 0 || tls.wants_write() {
            while tls.wants_write() {
                tls.write_tls(sock)?;
            }
        }
    }
    Ok(())
}

/// What `poll` waits for on `s`: input while `open`; nothing after (a negative descriptor
/// is skipped, so a hung-up side does not wake the loop again and again).
fn poll_for(s: &TcpStream, open: bool) -> libc::pollfd {
    libc::pollfd {
        fd: if open { s.as_raw_fd() } else { -1 },
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Reads what the upstream sent and passes its plaintext on; `false` once the upstream
/// has ended its side (or broke the connection).
fn from_upstream(
    tls: &mut ClientConnection,
    sock: &mut TcpStream,
    inner: &mut TcpStream,
    buf: &mut [u8],
) -> bool {
    match tls.read_tls(sock) {
        Ok(0) | Err(_) => return false,
        Ok(_) => {}
    }
    if let Err(e) = tls.process_new_packets() {
        log::debug!("proxy: TLS from the upstream: {e}");
        return false;
    }
    loop {
        match tls.reader().read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                if inner.write_all(&buf[..n]).is_err() {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
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
