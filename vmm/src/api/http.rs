//! The control API's HTTP/1.1 server: just enough of RFC 9112 for JSON requests on a UNIX
//! socket, written to hold up against a hostile client.
//!
//! # Theory of operation
//!
//! One thread (`api`) runs an epoll loop over the listener and every connection, all
//! non-blocking. Each connection has a read buffer and the answers it has not taken yet.
//! Bytes read are framed by [`parse`] (the `ferry-http` crate, which also writes the answers):
//! the head with httparse, then exactly `Content-Length` bytes of body. A complete request goes to the handler (routing and JSON live in `api.rs`);
//! its answer is queued, and the next pipelined request is taken only after it, so answers go
//! out in order.
//!
//! Why not a thread per connection: an idle client would cost a thread, and a few thousand of
//! them took the process's memory. Here a connection costs its buffers, and every buffer is
//! bounded: the head by [`MAX_HEAD`] and [`MAX_HEADERS`], the body by [`MAX_BODY`], the answers
//! waiting for a client that does not read by [`MAX_PENDING_OUT`] (past it, its requests are not
//! read), the connections by [`MAX_CONNECTIONS`]. Time is bounded too: a request must arrive
//! within [`REQUEST_TIMEOUT`] of its first byte (slowloris), an idle keep-alive connection
//! closes after [`IDLE_TIMEOUT`], a client that takes no answer for [`WRITE_TIMEOUT`] is
//! dropped.
//!
//! Framing is strict, against request smuggling: a request whose length two parties could read
//! differently is refused with 400 and the connection closed, so no byte of it is ever taken as
//! the start of another request. That is `Transfer-Encoding` with `Content-Length`, two
//! `Content-Length`s that differ, or one that is not a number. `Transfer-Encoding` alone
//! (chunked) is answered 501: every client of this API knows its body's length.
//!
//! A client may send file descriptors with its request (SCM_RIGHTS): `ferry virtiofsd` hands
//! over the listening socket libvirt gave it. Those that come with a request's bytes go to the
//! handler with that request; at most [`MAX_FDS`] are held per connection (more are closed at
//! once), and whatever the handler leaves is closed after it answers.
//!
//! Errors close the connection after the answer is sent: the write side is shut down, then
//! what the client still sends is read and dropped for [`LINGER`], so that it reads the answer
//! rather than a reset.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Connections open at once, at most. Past it, a new connection is answered 503 and closed:
/// the clients already served keep their connections. Worst case memory is this many times
/// [`MAX_HEAD`] + [`MAX_BODY`] (about 320 MiB), reachable only by the socket's owner.
pub(crate) const MAX_CONNECTIONS: usize = 4096;
/// Time from a request's first byte to its last, at most: a client sending its head a byte
/// at a time (slowloris) would otherwise hold its connection and buffer forever.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a keep-alive connection may sit idle between requests.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Time a client may take no answer bytes while some wait for it.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time what a client still sends is read and dropped after its connection is shut down.
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// Bytes of answers waiting for one client, past which its next requests wait: a client that
/// pipelines requests and never reads cannot make the answers grow.
const MAX_PENDING_OUT: usize = 256 * 1024;
/// A connection's read buffer, at most: the largest request there is.
const MAX_INPUT: usize = MAX_HEAD + MAX_BODY;
/// Descriptors a connection may hold for its next request, at most.
pub(crate) const MAX_FDS: usize = 4;
/// How often deadlines are checked.
const TICK: Duration = Duration::from_secs(1);

const LISTENER: u64 = 0;
const STOP: u64 = 1;
const FIRST_CONNECTION: u64 = 2;

pub(crate) use ferry_http::*;

/// Where a connection is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taking requests.
    Open,
    /// Sending its last answers; then shut down.
    Closing,
    /// Shut down for writing; what the client still sends is dropped until the deadline.
    Lingering(Instant),
}

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// How much of `output` is sent.
    sent: usize,
    phase: Phase,
    /// The client shut down its side.
    eof: bool,
    /// `100 Continue` was sent for the request in `input`.
    continued: bool,
    /// When the first byte of the request in `input` came.
    request_started: Option<Instant>,
    /// The last byte read or written.
    active: Instant,
    /// What epoll watches for it.
    interest: EventSet,
    /// Descriptors the client sent that no request has taken yet.
    fds: Vec<OwnedFd>,
    /// A streaming response's function, which takes the connection once its head is sent.
    handoff: Option<Box<dyn FnOnce(UnixStream) + Send>>,
}

impl Connection {
    fn pending(&self) -> usize {
        self.output.len() - self.sent
    }

    /// What to wait for: answers to send, requests to read (while answers are not piling up),
    /// or the end of a lingering client.
    fn wanted(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.pending() > 0 {
            e |= EventSet::OUT;
        }
        let reading = match self.phase {
            Phase::Open => {
                !self.eof && self.input.len() < MAX_INPUT && self.pending() < MAX_PENDING_OUT
            }
            Phase::Closing => false,
            Phase::Lingering(_) => true,
        };
        if reading {
            e |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        e
    }

    /// When it must be dropped (or, for a request, answered 408).
    fn deadline(&self) -> Instant {
        match self.phase {
            Phase::Lingering(until) => until,
            _ if self.pending() > 0 => self.active + WRITE_TIMEOUT,
            _ => match self.request_started {
                Some(t) => t + REQUEST_TIMEOUT,
                None => self.active + IDLE_TIMEOUT,
            },
        }
    }
}

/// The API's server: serves `listener` with `handler` until `stop` is written.
pub(crate) struct Server<H> {
    epoll: Epoll,
    listener: UnixListener,
    connections: HashMap<u64, Connection>,
    next_token: u64,
    handler: H,
    scratch: Vec<u8>,
    /// Accepting pauses until then after the process ran out of descriptors.
    accept_paused: Option<Instant>,
}

impl<H: FnMut(&Request, &mut Vec<OwnedFd>) -> Reply> Server<H> {
    /// A server for `listener` (made non-blocking here); `stop` ends [`run`](Self::run).
    pub(crate) fn new(listener: UnixListener, stop: &EventFd, handler: H) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        check_fd_limit();
        Ok(Server {
            epoll,
            listener,
            connections: HashMap::new(),
            next_token: FIRST_CONNECTION,
            handler,
            scratch: vec![0; MAX_INPUT],
            accept_paused: None,
        })
    }

    /// Serves until the stop event.
    pub(crate) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 256];
        let mut next_tick = Instant::now() + TICK;
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            let n = match self.epoll.wait(timeout.as_millis() as i32, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    warn!("api: cannot wait for connections: {e}; the API stops");
                    return;
                }
            };
            for e in &events[..n] {
                match e.data() {
                    STOP => return,
                    LISTENER => self.accept(),
                    token => self.ready(token, e.event_set()),
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.expire(now);
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors (EMFILE, ENFILE) or memory: the listener stays
                    // readable, so stop watching it for a tick rather than spin.
                    warn!("api: cannot accept a connection: {e}; retrying in a second");
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        self.listener.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.accept_paused = Some(Instant::now() + TICK);
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.connections.len() >= MAX_CONNECTIONS {
                // One non-blocking write of a small answer: it fits the socket's buffer.
                let mut out = Vec::new();
                let body = error_body(
                    &format!("the control API serves {MAX_CONNECTIONS} connections already"),
                    "close idle connections, then connect again",
                );
                write_reply(&mut out, &(503, body.into()), false, false);
                let _ = (&stream).write(&out);
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            let interest = EventSet::IN | EventSet::READ_HANG_UP;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(interest, token),
            ) {
                warn!("api: cannot watch a connection: {e}");
                continue;
            }
            self.connections.insert(
                token,
                Connection {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    sent: 0,
                    phase: Phase::Open,
                    eof: false,
                    continued: false,
                    request_started: None,
                    active: Instant::now(),
                    interest,
                    fds: Vec::new(),
                    handoff: None,
                },
            );
        }
    }

    fn ready(&mut self, token: u64, events: EventSet) {
        let Some(mut c) = self.connections.remove(&token) else {
            return;
        };
        let mut alive = !events.contains(EventSet::ERROR) && self.read(&mut c);
        while alive {
            let held_back = self.serve(&mut c);
            alive = flush(&mut c);
            // Requests held back while answers piled up go once those are sent.
            if !held_back || c.pending() >= MAX_PENDING_OUT {
                break;
            }
        }
        if alive && c.handoff.is_some() && c.pending() == 0 {
            self.hand_off(c);
            return;
        }
        // Otherwise dropping the stream closes it, which takes it off the epoll.
        if alive && self.watch(token, &mut c) {
            self.connections.insert(token, c);
        }
    }

    /// Gives a streaming response's connection to its function, on a thread of its own: off
    /// the epoll first (another descriptor of the socket would keep it there).
    fn hand_off(&mut self, c: Connection) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            c.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Connection {
            stream, handoff, ..
        } = c;
        let Some(f) = handoff else {
            return;
        };
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("api-stream".into())
            .spawn(move || f(stream));
        if let Err(e) = spawned {
            warn!("api: cannot start a thread for a streaming response: {e}");
        }
    }

    /// Reads what the client sent; false when the connection is done with.
    fn read(&mut self, c: &mut Connection) -> bool {
        let room = match c.phase {
            Phase::Open if !c.eof => MAX_INPUT - c.input.len(),
            Phase::Lingering(_) => self.scratch.len(),
            _ => return true,
        };
        if room == 0 {
            return true;
        }
        match recv_with_fds(&c.stream, &mut self.scratch[..room], &mut c.fds) {
            Ok(0) => {
                c.eof = true;
                // A lingering client has read its answer and closed; nothing more to do.
                !matches!(c.phase, Phase::Lingering(_))
            }
            Ok(n) => {
                c.active = Instant::now();
                if c.phase == Phase::Open {
                    if c.input.is_empty() {
                        c.request_started = Some(c.active);
                    }
                    c.input.extend_from_slice(&self.scratch[..n]);
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(_) => false,
        }
    }

    /// Answers the complete requests in the buffer, in order. True when some may be left
    /// because too many answers wait for the client.
    fn serve(&mut self, c: &mut Connection) -> bool {
        while c.phase == Phase::Open && c.pending() < MAX_PENDING_OUT && !c.input.is_empty() {
            match parse(&c.input) {
                Parsed::Partial { expects_continue } => {
                    if expects_continue && !c.continued {
                        c.output.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        c.continued = true;
                    }
                    break;
                }
                Parsed::Request(req, used) => {
                    // A bug in one handler must not take the API down with it.
                    let handler = &mut self.handler;
                    let fds = &mut c.fds;
                    let reply = std::panic::catch_unwind(AssertUnwindSafe(|| handler(&req, fds)))
                        .unwrap_or_else(|_| {
                            let body = error_body(
                                "the API failed on this request",
                                "see ferry's log, and report it as a bug",
                            );
                            (500, body.into())
                        });
                    debug!("api: {} {} -> {}", req.method, req.target, reply.0);
                    write_reply(&mut c.output, &reply, req.keep_alive, req.method == "HEAD");
                    if let (_, Body::Stream { stream: f, .. }) = reply {
                        // Nothing after it is read: the connection is the stream's now.
                        c.handoff = Some(f);
                        c.input = Vec::new();
                        c.fds.clear();
                        c.request_started = None;
                        break;
                    }
                    // Descriptors the request did not take are not kept for the next one.
                    c.fds.clear();
                    c.input.drain(..used);
                    c.continued = false;
                    c.request_started = (!c.input.is_empty()).then(Instant::now);
                    if !req.keep_alive {
                        c.phase = Phase::Closing;
                    }
                }
                Parsed::Refused(r) => {
                    debug!("api: refused: {} {}", r.status, r.error);
                    let body = error_body(&r.error, r.hint);
                    write_reply(&mut c.output, &(r.status, body.into()), false, false);
                    c.phase = Phase::Closing;
                }
            }
        }
        let held_back =
            c.phase == Phase::Open && !c.input.is_empty() && c.pending() >= MAX_PENDING_OUT;
        // The client has sent all it will: answer what is complete, then close.
        if c.eof && c.phase == Phase::Open && !held_back {
            c.phase = Phase::Closing;
        }
        if c.phase != Phase::Open {
            // Nothing after the last answer is taken; its memory goes now.
            c.input = Vec::new();
            c.request_started = None;
        } else if c.input.is_empty() && c.input.capacity() > 4096 {
            // An idle connection keeps no large buffer.
            c.input = Vec::new();
        }
        held_back
    }

    /// Changes what epoll watches for `c`, when that changed; false when it cannot.
    fn watch(&mut self, token: u64, c: &mut Connection) -> bool {
        let wanted = c.wanted();
        if wanted == c.interest {
            return true;
        }
        if wanted.is_empty() {
            // Nothing to read or send: a client that shut down with no request pending.
            return false;
        }
        c.interest = wanted;
        self.epoll
            .ctl(
                ControlOperation::Modify,
                c.stream.as_raw_fd(),
                EpollEvent::new(wanted, token),
            )
            .is_ok()
    }

    /// Drops the connections past their deadline; a request that took too long is answered
    /// 408 first.
    fn expire(&mut self, now: Instant) {
        if self.accept_paused.is_some_and(|t| now >= t) {
            self.accept_paused = None;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            ) {
                warn!("api: cannot watch the listener again: {e}");
            }
            self.accept();
        }
        let late: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, c)| now >= c.deadline())
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            let Some(mut c) = self.connections.remove(&token) else {
                continue;
            };
            if c.phase == Phase::Open && c.request_started.is_some() && c.pending() == 0 {
                let body = error_body(
                    "the request did not arrive within 30 s",
                    "send the whole request at once",
                );
                write_reply(&mut c.output, &(408, body.into()), false, false);
                c.input = Vec::new();
                c.request_started = None;
                c.phase = Phase::Closing;
                c.active = now;
                if flush(&mut c) && self.watch(token, &mut c) {
                    self.connections.insert(token, c);
                }
            }
        }
    }
}

/// Reads into `buf` like `read`, taking the descriptors that come along into `fds` (past
/// [`MAX_FDS`] held, they are closed at once).
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points at `buf`, which outlives the call, and `raw` has room for
    // MAX_FDS descriptors; every one received is owned right below.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    for &fd in &raw[..nfds] {
        // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if fds.len() < MAX_FDS {
            fds.push(owned);
        }
    }
    Ok(n)
}

/// Warns when the open-file limit cannot hold [`MAX_CONNECTIONS`] besides what the devices
/// take. `devices::raise_fd_limit` raises it to the kernel's maximum (or the hard limit)
/// first; below this, past the limit connections wait in the listen backlog until one closes.
fn check_fd_limit() {
    /// Descriptors left for published ports, guest connections and share nodes, at least.
    const OTHERS: usize = 4096;
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the rlimit it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return;
    }
    let want = (MAX_CONNECTIONS + OTHERS) as libc::rlim_t;
    if r.rlim_cur < want {
        warn!(
            "api: the open-file limit is {}, below the {want} that {MAX_CONNECTIONS} API connections and the devices may take; raise it (ulimit -n) to serve that many clients",
            r.rlim_cur
        );
    }
}

/// Sends what it can of the answers; once the last is sent on a closing connection, shuts
/// down its write side and lingers. False when the connection is done with.
fn flush(c: &mut Connection) -> bool {
    while c.pending() > 0 {
        match c.stream.write(&c.output[c.sent..]) {
            Ok(0) => return false,
            Ok(n) => {
                c.sent += n;
                c.active = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    c.sent = 0;
    if c.output.capacity() > MAX_PENDING_OUT {
        c.output = Vec::new();
    } else {
        c.output.clear();
    }
    if c.phase == Phase::Closing {
        if c.eof {
            return false;
        }
        let _ = c.stream.shutdown(Shutdown::Write);
        c.phase = Phase::Lingering(Instant::now() + LINGER);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn request(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Parsed::Request(r, n) => (r, n),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn refused(buf: &[u8]) -> Refusal {
        match parse(buf) {
            Parsed::Refused(r) => r,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn a_request_with_its_body() {
        let buf = b"POST /rules HTTP/1.1\r\nHost: ferry\r\nContent-Length: 4\r\n\r\n{}\r\nGET";
        let (r, n) = request(buf);
        assert_eq!(
            r,
            Request {
                method: "POST".into(),
                target: "/rules".into(),
                body: b"{}\r\n".to_vec(),
                keep_alive: true,
            }
        );
        assert_eq!(&buf[n..], b"GET");
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused() {
        // The smuggling case: the "body" holds a request of its own.
        let smuggled = b"POST /rules HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"spec\": \"drop\"}";
        let mut buf = format!(
            "POST /health HTTP/1.1\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
            smuggled.len()
        )
        .into_bytes();
        buf.extend_from_slice(smuggled);
        let r = refused(&buf);
        assert_eq!(r.status, 400);
        assert!(r
            .error
            .contains("both Transfer-Encoding and Content-Length"));
        // Either order of the headers.
        let r =
            refused(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(r.status, 400);
    }

    #[test]
    fn transfer_encoding_alone_is_not_implemented() {
        let r = refused(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(r.status, 501);
        assert!(r.hint.contains("Content-Length"));
    }

    #[test]
    fn content_lengths_that_differ_or_are_not_numbers_are_refused() {
        let r = refused(b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!((r.status, r.error.contains("differ")), (400, true));
        for bad in ["abc", "+3", "3 3", "3, 3", "-1", "", "0x10"] {
            let buf = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\nabc");
            let r = refused(buf.as_bytes());
            assert_eq!(r.status, 400, "{bad:?}");
        }
        // The same length twice says one thing; it is taken.
        let (r, _) =
            request(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(r.body, b"abc");
    }

    #[test]
    fn a_long_head_or_many_headers_are_refused_with_431() {
        let long = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(refused(long.as_bytes()).status, 431);
        // Before the head ends: a client that never ends it is refused all the same.
        assert_eq!(refused(&long.as_bytes()[..MAX_HEAD + 1]).status, 431);
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: 1\r\n"))
            .collect();
        let r = refused(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
        assert_eq!((r.status, r.error.contains("64 headers")), (431, true));
        // 64 are fine.
        let ok: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        request(format!("GET / HTTP/1.1\r\n{ok}\r\n").as_bytes());
    }

    #[test]
    fn a_large_body_is_refused_with_413_before_it_arrives() {
        let r = refused(b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n");
        assert_eq!(r.status, 413);
        let r = refused(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
        assert_eq!(r.status, 413);
    }

    #[test]
    fn malformed_request_lines_are_refused() {
        for bad in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon\r\n\r\n",
            b"\x00\x01\x02\n\n",
        ] {
            assert_eq!(
                refused(bad).status,
                400,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn partial_requests_wait_for_more() {
        let full = b"POST /rules HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        for n in 0..full.len() {
            assert_eq!(
                parse(&full[..n]),
                Parsed::Partial {
                    expects_continue: false
                },
                "{n}"
            );
        }
        let expect = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            parse(expect),
            Parsed::Partial {
                expects_continue: true
            }
        );
    }

    #[test]
    fn pipelined_requests_are_taken_in_order() {
        let buf = b"GET /health HTTP/1.1\r\n\r\nPOST /rules HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}DELETE /rules/1 HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut at = 0;
        let mut seen = Vec::new();
        while at < buf.len() {
            let (r, n) = request(&buf[at..]);
            seen.push((r.method, r.target, r.keep_alive));
            at += n;
        }
        assert_eq!(
            seen,
            [
                ("GET".into(), "/health".into(), true),
                ("POST".into(), "/rules".into(), true),
                ("DELETE".into(), "/rules/1".into(), false),
            ]
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let alive = |head: &str| request(head.as_bytes()).0.keep_alive;
        assert!(alive("GET / HTTP/1.1\r\n\r\n"));
        assert!(!alive("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!alive(
            "GET / HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n"
        ));
        assert!(!alive("GET / HTTP/1.0\r\n\r\n"));
        assert!(alive("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn replies_carry_their_length_and_json() {
        let mut out = Vec::new();
        write_reply(
            &mut out,
            &(409, error_body("full", "delete one").into()),
            true,
            false,
        );
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 409 Conflict\r\n"), "{head}");
        assert!(head.contains("Content-Type: application/json"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            (v["error"].as_str(), v["hint"].as_str()),
            (Some("full"), Some("delete one"))
        );
        let mut out = Vec::new();
        write_reply(&mut out, &(204, Value::Null.into()), false, false);
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    }
}
