//! HTTP/1.1 message framing on a blocking socket: heads, and bodies copied by their framing.
//!
//! A keep-alive connection is only safe if the proxy knows where each message ends, in both
//! directions; otherwise the rest of one body is read as the next request (RFC 9112, 6).
//! [`Peer`] wraps a socket with the bytes read past the current message, so a pipelined
//! request that arrived with the previous one waits its turn instead of being lost. Bodies
//! are copied by [`Framing`]; chunked bodies are parsed chunk by chunk and written again
//! with their sizes checked, so a malformed size is refused here, never passed on for the
//! next hop to read another way.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The longest head taken (request or response); longer gets 431.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size line, and the most trailer bytes.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// How a message body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// Why a head was not read.
#[derive(Debug)]
pub(super) enum HeadError {
    /// The peer closed before the head's first byte: the end of a keep-alive connection.
    Closed,
    /// The head did not end within [`MAX_HEAD`].
    TooLarge,
    /// The deadline passed with the head unfinished (`started`: some of it had come).
    Timeout { started: bool },
    /// Anything else: a reset, or a close in the middle of the head.
    Io(io::Error),
}

/// Why a body was not copied.
#[derive(Debug)]
pub(super) enum BodyError {
    /// The sender's framing is broken (a bad chunk size, a missing CRLF).
    Malformed(String),
    /// Reading from the sender failed or it closed early.
    Read(io::Error),
    /// Writing to the receiver failed.
    Write(io::Error),
}

/// What the proxy needs of a blocking stream socket. The guest's side is a UNIX socket (a
/// pair with the NAT, [`super::Proxy::accept`]); a server's or upstream's side is TCP.
pub(super) trait Socket: Read + Write + Send + Sized + 'static {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    fn try_clone(&self) -> io::Result<Self>;
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
                <$t>::set_read_timeout(self, d)
            }
            fn try_clone(&self) -> io::Result<Self> {
                <$t>::try_clone(self)
            }
            fn shutdown(&self, how: Shutdown) -> io::Result<()> {
                <$t>::shutdown(self, how)
            }
        }
    };
}
socket!(TcpStream);
socket!(UnixStream);

/// A socket and the bytes read from it that are not used yet.
pub(super) struct Peer<S: Socket = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
    pos: usize,
    /// Set while a read may be rewound: the buffer is not compacted under it.
    marked: bool,
}

impl<S: Socket> Peer<S> {
    pub(super) fn new(stream: S) -> Peer<S> {
        Peer {
            stream,
            buf: Vec::new(),
            pos: 0,
            marked: false,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more into the buffer; 0 at the end of the stream.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() && !self.marked {
            self.buf.clear();
            self.pos = 0;
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether bytes are waiting already (a pipelined request).
    pub(super) fn has_pending(&self) -> bool {
        self.pos < self.buf.len()
    }

    /// Reads one head, up to its blank line. Empty lines before it are skipped (RFC 9112,
    /// 2.2). `deadline`, if set, bounds the whole head, so a client that trickles a byte at
    /// a time cannot hold a thread forever; `idle` bounds the wait for its first byte.
    pub(super) fn read_head(
        &mut self,
        idle: Option<std::time::Duration>,
        deadline: std::time::Duration,
    ) -> Result<Vec<u8>, HeadError> {
        let mut started: Option<Instant> = None;
        let mut scanned: usize = 0;
        loop {
            // Skip the empty lines a client may send between requests.
            while started.is_none() && self.pending().starts_with(b"\r\n") {
                self.pos += 2;
            }
            let p = self.pending();
            if started.is_none() && !p.is_empty() && p != b"\r" {
                started = Some(Instant::now());
            }
            if let Some(i) = p[scanned.saturating_sub(3)..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                let end = scanned.saturating_sub(3) + i + 4;
                if end > MAX_HEAD {
                    return Err(HeadError::TooLarge);
                }
                let head = p[..end].to_vec();
                self.pos += end;
                return Ok(head);
            }
            scanned = p.len();
            if scanned > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            let wait = match started {
                Some(t) => match deadline.checked_sub(t.elapsed()) {
                    Some(w) if !w.is_zero() => Some(w),
                    _ => return Err(HeadError::Timeout { started: true }),
                },
                None => idle,
            };
            let _ = self.stream.set_read_timeout(wait);
            match self.fill() {
                Ok(0) if started.is_none() => return Err(HeadError::Closed),
                Ok(0) => {
                    return Err(HeadError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed in the middle of a head",
                    )))
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(HeadError::Timeout {
                        started: started.is_some(),
                    })
                }
                Err(e) => return Err(HeadError::Io(e)),
            }
        }
    }

    /// Copies exactly `n` bytes to `to`.
    fn copy_exact(&mut self, mut n: u64, to: &mut dyn Write) -> Result<(), BodyError> {
        while n > 0 {
            if !self.has_pending() && self.fill().map_err(BodyError::Read)? == 0 {
                return Err(BodyError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the sender closed before its body ended",
                )));
            }
            let p = self.pending();
            let take = p.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            to.write_all(&p[..take]).map_err(BodyError::Write)?;
            self.pos += take;
            n -= take as u64;
        }
        Ok(())
    }

    /// One CRLF-terminated line, without its CRLF.
    fn line(&mut self) -> Result<Vec<u8>, BodyError> {
        loop {
            if let Some(i) = self.pending().windows(2).position(|w| w == b"\r\n") {
                let line = self.pending()[..i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            if self.pending().len() > MAX_LINE {
                return Err(BodyError::Malformed(format!(
                    "a chunk line is longer than {MAX_LINE} bytes"
                )));
            }
            if self.fill().map_err(BodyError::Read)? == 0 {
                return Err(BodyError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the sender closed in the middle of a chunked body",
                )));
            }
        }
    }

    /// Copies a chunked body, chunk by chunk, writing each size again in plain hex (chunk
    /// extensions stay behind), then the trailers.
    fn copy_chunked(&mut self, to: &mut dyn Write) -> Result<(), BodyError> {
        loop {
            let line = self.line()?;
            let size = chunk_size(&line).ok_or_else(|| {
                BodyError::Malformed(format!(
                    "{:?} is not a chunk size",
                    String::from_utf8_lossy(&line[..line.len().min(40)])
                ))
            })?;
            to.write_all(format!("{size:x}\r\n").as_bytes())
                .map_err(BodyError::Write)?;
            if size == 0 {
                let mut total = 0;
                loop {
                    let t = self.line()?;
                    total += t.len() + 2;
                    if total > MAX_TRAILERS {
                        return Err(BodyError::Malformed("the trailers are too long".into()));
                    }
                    to.write_all(&t).map_err(BodyError::Write)?;
                    to.write_all(b"\r\n").map_err(BodyError::Write)?;
                    if t.is_empty() {
                        return Ok(());
                    }
                }
            }
            self.copy_exact(size, to)?;
            while self.pending().len() < 2 {
                if self.fill().map_err(BodyError::Read)? == 0 {
                    return Err(BodyError::Read(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the sender closed in the middle of a chunked body",
                    )));
                }
            }
            if !self.pending().starts_with(b"\r\n") {
                return Err(BodyError::Malformed("a chunk does not end in CRLF".into()));
            }
            self.pos += 2;
            to.write_all(b"\r\n").map_err(BodyError::Write)?;
        }
    }

    /// Copies one body framed by `framing` to `to`.
    pub(super) fn copy_body(
        &mut self,
        framing: Framing,
        to: &mut dyn Write,
    ) -> Result<(), BodyError> {
        match framing {
            Framing::None => Ok(()),
            Framing::Length(n) => self.copy_exact(n, to),
            Framing::Chunked => self.copy_chunked(to),
            Framing::UntilClose => loop {
                if self.has_pending() {
                    to.write_all(self.pending()).map_err(BodyError::Write)?;
                    self.pos = self.buf.len();
                }
                if self.fill().map_err(BodyError::Read)? == 0 {
                    return Ok(());
                }
            },
        }
    }

    /// Reads a body of at most `limit` bytes (as it is on the wire) into memory: `Ok(Some)`
    /// when it ended within the limit, `Ok(None)` when it is longer, with what was read
    /// left in `out` and the rest of the body unread.
    pub(super) fn read_body_upto(
        &mut self,
        framing: Framing,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<bool, BodyError> {
        struct Capped<'a> {
            out: &'a mut Vec<u8>,
            limit: usize,
        }
        impl Write for Capped<'_> {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.out.len() + b.len() > self.limit {
                    return Err(io::Error::other("over the limit"));
                }
                self.out.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        // Only Content-Length bodies can stop at a limit and go on later; chunked ones are
        // buffered only when they fit.
        match framing {
            Framing::Length(n) if n as usize > limit => Ok(false),
            Framing::Chunked => {
                // Take the whole body if it has arrived and fits; otherwise leave it to be
                // streamed, parsed on the way.
                let saved = self.pos;
                self.marked = true;
                let copied = self.copy_chunked(&mut Capped { out, limit });
                self.marked = false;
                match copied {
                    Ok(()) => Ok(true),
                    Err(BodyError::Write(_)) => {
                        self.pos = saved;
                        out.clear();
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            }
            f => {
                self.copy_body(f, &mut Capped { out, limit })?;
                Ok(true)
            }
        }
    }

    /// Reads until `enough` (given what has come) says how many bytes make the unit the
    /// caller wants and that many are here, the peer closes, or `within` passes. The bytes
    /// stay pending; what has come is returned.
    pub(super) fn peek_until(
        &mut self,
        within: std::time::Duration,
        enough: impl Fn(&[u8]) -> Option<usize>,
    ) -> &[u8] {
        let start = Instant::now();
        loop {
            if enough(self.pending()).is_some_and(|n| self.pending().len() >= n) {
                break;
            }
            let Some(left) = within.checked_sub(start.elapsed()).filter(|d| !d.is_zero()) else {
                break;
            };
            self.marked = true;
            let _ = self.stream.set_read_timeout(Some(left));
            let got = self.fill();
            self.marked = false;
            if !matches!(got, Ok(n) if n > 0) {
                break;
            }
        }
        self.pending()
    }

    /// The bytes read past the last message, for a tunnel that takes over the socket.
    pub(super) fn take_pending(&mut self) -> Vec<u8> {
        let p = self.pending().to_vec();
        self.pos = self.buf.len();
        p
    }
}

/// A chunk-size line's size: hex digits, then optional `;extensions` (RFC 9112, 7.1).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|b| *b == b';').next()?.trim_ascii_end();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// A response head, parsed.
pub(super) struct Response {
    pub code: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    /// HTTP/1.0 (0) or 1.1 (1).
    pub version: u8,
}

impl Response {
    pub(super) fn parse(head: &[u8]) -> Option<Response> {
        let mut hdrs = [httparse::EMPTY_HEADER; super::request::MAX_HEADERS];
        let mut r = httparse::Response::new(&mut hdrs);
        match r.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return None,
        }
        Some(Response {
            code: r.code?,
            version: r.version.unwrap_or(1),
            headers: r
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
        })
    }

    pub(super) fn header<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        super::request::values(&self.headers, name)
    }

    /// How the body of this answer to `method` ends (RFC 9112, 6.3).
    pub(super) fn framing(&self, method: &str) -> Framing {
        if method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&self.code)
            || self.code == 204
            || self.code == 304
        {
            return Framing::None;
        }
        let te = super::request::header_tokens(&self.headers, "transfer-encoding");
        if !te.is_empty() {
            return if te.last().map(String::as_str) == Some("chunked") {
                Framing::Chunked
            } else {
                Framing::UntilClose
            };
        }
        let lengths: Vec<&[u8]> = self
            .header("content-length")
            .map(|v| v.trim_ascii())
            .collect();
        match lengths
            .first()
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
        {
            Some(n) if lengths.iter().all(|v| *v == lengths[0]) => Framing::Length(n),
            _ => Framing::UntilClose,
        }
    }

    /// Whether the sender closes after this answer.
    pub(super) fn closes(&self) -> bool {
        let conn = super::request::header_tokens(&self.headers, "connection");
        conn.iter().any(|t| t == "close")
            || (self.version == 0 && !conn.iter().any(|t| t == "keep-alive"))
    }

    /// The head to pass on: the status line as HTTP/1.1, hop-by-hop headers dropped, and
    /// `Connection: close` when the proxy closes after it.
    pub(super) fn rewrite(&self, head: &[u8], close: bool) -> Vec<u8> {
        let reason = head
            .split(|b| *b == b'\n')
            .next()
            .and_then(|l| l.splitn(3, |b| *b == b' ').nth(2))
            .map(|r| r.trim_ascii())
            .unwrap_or(b"");
        let mut out = Vec::with_capacity(head.len() + 32);
        out.extend_from_slice(format!("HTTP/1.1 {} ", self.code).as_bytes());
        out.extend_from_slice(reason);
        out.extend_from_slice(b"\r\n");
        let named = super::request::header_tokens(&self.headers, "connection");
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            let hop =
                super::request::HOP_BY_HOP.contains(&lower.as_str()) || named.contains(&lower);
            if hop && lower != "upgrade" {
                continue;
            }
            super::request::push_header(&mut out, name, value);
        }
        if self.code == 101 {
            out.extend_from_slice(b"Connection: upgrade\r\n");
        } else if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    /// A connected pair: what the test writes to `.1` arrives at the `Peer`.
    fn pair() -> (Peer, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (Peer::new(l.accept().unwrap().0), c)
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn heads_come_one_at_a_time_and_pipelined_bytes_wait() {
        let (mut p, mut c) = pair();
        c.write_all(
            b"\r\nGET http://a/ HTTP/1.1\r\n\r\nGET http://b/ HTTP/1.1\r\nX: 1\r\n\r\nPART",
        )
        .unwrap();
        assert_eq!(
            p.read_head(None, T).unwrap(),
            b"GET http://a/ HTTP/1.1\r\n\r\n"
        );
        assert_eq!(
            p.read_head(None, T).unwrap(),
            b"GET http://b/ HTTP/1.1\r\nX: 1\r\n\r\n"
        );
        assert!(p.has_pending());
        drop(c);
        assert!(matches!(p.read_head(None, T), Err(HeadError::Io(_))));
        let (mut p, c) = pair();
        drop(c);
        assert!(matches!(p.read_head(None, T), Err(HeadError::Closed)));
    }

    #[test]
    fn slow_and_huge_heads_are_cut_off() {
        let (mut p, mut c) = pair();
        c.write_all(b"GET http://a/ HTTP/1.1\r\nX-Slow: ").unwrap();
        let t = Instant::now();
        let e = p.read_head(None, Duration::from_millis(300));
        assert!(
            matches!(e, Err(HeadError::Timeout { started: true })),
            "{e:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        let (mut p, mut c) = pair();
        let e = p.read_head(Some(Duration::from_millis(100)), T);
        assert!(
            matches!(e, Err(HeadError::Timeout { started: false })),
            "{e:?}"
        );
        std::thread::spawn(move || {
            let line = format!("X: {}\r\n", "y".repeat(1000));
            let _ = c.write_all(b"GET http://a/ HTTP/1.1\r\n");
            for _ in 0..100 {
                if c.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
        });
        assert!(matches!(p.read_head(None, T), Err(HeadError::TooLarge)));
    }

    #[test]
    fn chunked_bodies_are_checked_and_written_again() {
        let (mut p, mut c) = pair();
        c.write_all(b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nNEXT")
            .unwrap();
        let mut out = Vec::new();
        p.copy_body(Framing::Chunked, &mut out).unwrap();
        assert_eq!(out, b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n");
        assert_eq!(p.take_pending(), b"NEXT");
        for bad in [
            &b"zz\r\n"[..],
            b"-1\r\n",
            b"5\r\nhelloXX",
            b"ffffffffffffffffff\r\n",
            b"\r\n",
        ] {
            let (mut p, mut c) = pair();
            c.write_all(bad).unwrap();
            drop(c);
            let e = p.copy_body(Framing::Chunked, &mut Vec::new());
            assert!(
                matches!(e, Err(BodyError::Malformed(_))),
                "{:?}: {e:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn small_bodies_are_read_whole_and_large_ones_left_to_stream() {
        let (mut p, mut c) = pair();
        c.write_all(b"3\r\nabc\r\n0\r\n\r\n").unwrap();
        let mut out = Vec::new();
        assert!(p.read_body_upto(Framing::Chunked, 100, &mut out).unwrap());
        assert_eq!(out, b"3\r\nabc\r\n0\r\n\r\n");
        c.write_all(b"a\r\n0123456789\r\n0\r\n\r\n").unwrap();
        let mut out = Vec::new();
        assert!(!p.read_body_upto(Framing::Chunked, 8, &mut out).unwrap());
        let mut all = Vec::new();
        p.copy_body(Framing::Chunked, &mut all).unwrap();
        assert_eq!(all, b"a\r\n0123456789\r\n0\r\n\r\n");
        let mut out = Vec::new();
        assert!(!p.read_body_upto(Framing::Length(9), 8, &mut out).unwrap());
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let r = |h: &str| Response::parse(h.as_bytes()).unwrap();
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n").framing("GET"),
            Framing::Length(3)
        );
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n").framing("HEAD"),
            Framing::None
        );
        assert_eq!(
            r("HTTP/1.1 304 Not Modified\r\n\r\n").framing("GET"),
            Framing::None
        );
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing("GET"),
            Framing::Chunked
        );
        assert_eq!(
            r("HTTP/1.1 200 OK\r\n\r\n").framing("GET"),
            Framing::UntilClose
        );
        assert!(r("HTTP/1.0 200 OK\r\n\r\n").closes());
        assert!(!r("HTTP/1.1 200 OK\r\n\r\n").closes());
        let head = b"HTTP/1.0 200 Fine Thanks\r\nConnection: x-a\r\nX-A: 1\r\nKeep-Alive: 5\r\nServer: s\r\n\r\n";
        let out = Response::parse(head).unwrap().rewrite(head, true);
        assert_eq!(
            out,
            b"HTTP/1.1 200 Fine Thanks\r\nServer: s\r\nConnection: close\r\n\r\n"
        );
    }
}
