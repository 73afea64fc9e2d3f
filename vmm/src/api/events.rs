//! `GET /events`: the audit log's events as they happen, newline-delimited JSON on a response
//! that lasts as long as the client reads (`ferry ctl events` follows it).
//!
//! Theory of operation. Each follower is a subscription of the audit log with a bounded queue
//! of its own, and a thread of its own that owns the connection: it writes the events that
//! came as lines (all that waited, with one write), and looks every second whether the
//! client hung up. A client that stops reading is
//! given 10 s per write, then dropped; meanwhile its queue fills and its events are dropped
//! and counted, so nothing else waits for it. The HTTP server hands the connection over once
//! the response head is out (`http::Body::Stream`).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

use super::error;
use super::http::Body;
use super::Control;

/// Whether the client closed its end (or the socket failed): a look, no wait.
pub(super) fn hung_up(s: &UnixStream) -> bool {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd; a zero timeout does not block.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && (p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR)) != 0
}

/// GET /events.
pub(super) fn follow(control: &Control) -> (u16, Body) {
    let json = |(status, v): (u16, Value)| (status, Body::Json(v));
    let Some(audit) = &control.audit else {
        return json(error(
            404,
            "no events: the audit log is off",
            "start ferry serve with --api-socket (events need no --audit-log)",
        ));
    };
    let Some(sub) = audit.subscribe() else {
        return json(error(
            503,
            format!(
                "{} clients follow the events already",
                ferry_audit::MAX_SUBSCRIBERS
            ),
            "close one of them, then ask again",
        ));
    };
    let stream = move |mut s: UnixStream| {
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        let mut lines = Vec::new();
        loop {
            lines.clear();
            match sub.take_all(Duration::from_secs(1), &mut lines) {
                0 if sub.closed() || hung_up(&s) => return,
                0 => {}
                _ => {
                    if s.write_all(&lines).is_err() {
                        return;
                    }
                }
            }
        }
    };
    (
        200,
        Body::Stream {
            content_type: "application/x-ndjson",
            stream: Box::new(stream),
        },
    )
}
