//! HTTP/1.1 messages for Ferry's control API: a request's framing (RFC 9112: the head with
//! httparse, then exactly `Content-Length` bytes of body) and an answer's bytes.
//!
//! Theory of operation. No I/O here: the API server (`vmm/src/api/http.rs`) owns the
//! connections and feeds [`parse`] what it has read so far, which says whether a request is
//! complete (and how many bytes it took), incomplete, or refused. A crate of its own so that
//! the server and the fuzz target (`fuzz/fuzz_targets/api_requests.rs`) drive one parser.
//!
//! Framing is strict, against request smuggling: a request whose length two parties could
//! read differently (`Transfer-Encoding` with `Content-Length`, two lengths that differ, one
//! that is not a number) is refused with 400, and the server closes the connection after the
//! answer, so no byte of it is ever taken as the start of another request. Every size is
//! bounded: the head by [`MAX_HEAD`] and [`MAX_HEADERS`], the body by [`MAX_BODY`].

use std::io::Write;
use std::os::unix::net::UnixStream;

use serde_json::{json, Value};

/// Bytes of a request head (request line and headers), at most: ample for any client of
/// this API, and what one slow connection may make the server hold before its body.
pub const MAX_HEAD: usize = 16 * 1024;
/// Headers in a request, at most: curl sends 4; each is parsed into a fixed slot on the stack.
pub const MAX_HEADERS: usize = 64;
/// Bytes of a request body, at most: the largest valid body (a spec) is under 1 KiB.
pub const MAX_BODY: usize = 64 * 1024;

/// A complete request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ... (case-sensitive, as RFC 9110 says).
    pub method: String,
    /// The request target as sent, query included.
    pub target: String,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
}

/// An answer's body.
pub enum Body {
    /// JSON (Null: none, as for 204).
    Json(Value),
    /// Text of another type (`/metrics`: the Prometheus text format).
    Text {
        content_type: &'static str,
        text: String,
    },
    /// A response that goes on for as long as the client reads (`/events`): the server sends
    /// the head (newline-delimited JSON, no length, the connection closing at its end), takes
    /// the connection off its epoll and hands the socket, blocking, to this function on a
    /// thread of its own.
    Stream {
        content_type: &'static str,
        stream: Box<dyn FnOnce(UnixStream) + Send>,
    },
}

impl From<Value> for Body {
    fn from(v: Value) -> Self {
        Body::Json(v)
    }
}

/// An answer: the status and its body.
pub type Reply = (u16, Body);

/// A request the server refuses before the handler sees it; the connection closes after it.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 413, 431 or 501.
    pub status: u16,
    /// What happened.
    pub error: String,
    /// What to do.
    pub hint: &'static str,
}

/// What the buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Part of a request. `expects_continue`: its head is complete and asks for
    /// `100 Continue` before the client sends the body.
    Partial { expects_continue: bool },
    /// A request, and how many bytes of the buffer it took.
    Request(Request, usize),
    /// A request that must be refused.
    Refused(Refusal),
}

fn refuse(status: u16, error: impl Into<String>, hint: &'static str) -> Parsed {
    Parsed::Refused(Refusal {
        status,
        error: error.into(),
        hint,
    })
}

/// Where the head in `buf` ends (the index after its blank line), if it does. httparse takes
/// bare LF line ends too, so this does.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).enumerate().find_map(|(i, w)| match w {
        [b'\n', b'\n'] => Some(i + 2),
        [b'\n', b'\r'] if buf.get(i + 2) == Some(&b'\n') => Some(i + 3),
        _ => None,
    })
}

/// Frames the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    // httparse is run only on a whole head: parsing each partial read again would let a
    // client sending a byte at a time cost a parse of up to MAX_HEAD bytes per byte.
    let Some(end) = head_end(&buf[..buf.len().min(MAX_HEAD + 1)]) else {
        if buf.len() > MAX_HEAD {
            return refuse(
                431,
                "the request head is larger than 16 KiB",
                "send fewer or shorter headers",
            );
        }
        return Parsed::Partial {
            expects_continue: false,
        };
    };
    if end > MAX_HEAD {
        return refuse(
            431,
            "the request head is larger than 16 KiB",
            "send fewer or shorter headers",
        );
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return refuse(
                400,
                "the request head is malformed",
                "send METHOD PATH HTTP/1.1, then headers, then a blank line",
            )
        }
        Err(httparse::Error::TooManyHeaders) => {
            return refuse(
                431,
                "the request has more than 64 headers",
                "send fewer headers",
            )
        }
        Err(e) => {
            return refuse(
                400,
                format!("the request head is malformed: {e}"),
                "send METHOD PATH HTTP/1.1, then headers, then a blank line",
            )
        }
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return refuse(
            400,
            "the request line is incomplete",
            "send METHOD PATH HTTP/1.1",
        );
    };
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_asked = false;
    let mut expects_continue = false;
    for h in req.headers.iter() {
        let value = trim(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            // Digits only: "+5", "5 5" and "5, 5" are each read as something else somewhere.
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return refuse(
                    400,
                    "Content-Length is not a number",
                    "send the body's length in bytes, once",
                );
            }
            // Too many digits for a u64 is too long a body all the same.
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            if length.is_some_and(|l| l != n) {
                return refuse(
                    400,
                    "the request has two Content-Length headers that differ",
                    "send the body's length in bytes, once",
                );
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(trim) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expects_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    if chunked && length.is_some() {
        // RFC 9112 6.3: the message's length cannot be trusted; a proxy in front could have
        // framed it the other way, and the rest of the body be taken as a request of its own.
        return refuse(
            400,
            "the request has both Transfer-Encoding and Content-Length",
            "send the body with Content-Length only",
        );
    }
    if chunked {
        return refuse(
            501,
            "Transfer-Encoding is not supported",
            "send the body with Content-Length",
        );
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY as u64 {
        return refuse(413, "the body is larger than 64 KiB", "send a smaller body");
    }
    // At most MAX_BODY, so the cast and the addition are exact.
    let total = end + length as usize;
    if buf.len() < total {
        return Parsed::Partial { expects_continue };
    }
    let keep_alive = !close && (version == 1 || keep_alive_asked);
    let request = Request {
        method: method.to_string(),
        target: target.to_string(),
        body: buf[end..total].to_vec(),
        keep_alive,
    };
    Parsed::Request(request, total)
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Appends the answer `status`, `body` to `out`. 204 has no body (RFC 9110 15.3.5); `head`
/// (a HEAD request) sends the length without the body.
pub fn write_reply(out: &mut Vec<u8>, (status, body): &Reply, keep_alive: bool, head: bool) {
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(*status));
    if let Body::Stream { content_type, .. } = body {
        let _ = write!(
            out,
            "Content-Type: {content_type}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    let text = (*status != 204).then(|| match body {
        Body::Json(v) => {
            let mut text = serde_json::to_vec_pretty(v).unwrap_or_default();
            text.push(b'\n');
            ("application/json", text)
        }
        Body::Text { content_type, text } => (*content_type, text.as_bytes().to_vec()),
        Body::Stream { content_type, .. } => (*content_type, Vec::new()),
    });
    if let Some((content_type, text)) = &text {
        let _ = write!(
            out,
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            text.len()
        );
    }
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    if let Some((_, text)) = text.filter(|_| !head) {
        out.extend_from_slice(&text);
    }
}

/// The JSON error every refusal uses.
pub fn error_body(error: &str, hint: &str) -> Value {
    json!({"error": error, "hint": hint})
}
