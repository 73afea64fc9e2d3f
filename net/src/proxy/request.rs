//! A guest's request head: parsed, checked for framing a second parser could read another
//! way, and written again for the next hop.
//!
//! Request smuggling works by making the proxy and the server disagree on where a request
//! ends (RFC 9112, 6.3 and 11.2). So the proxy refuses what it could read two ways: both
//! `Transfer-Encoding` and `Content-Length`, lengths that are not one number, and transfer
//! codings that do not end in `chunked`. The head it sends on is written afresh, not edited:
//! one request line, the headers that belong to the end-to-end message, and the framing it
//! will itself keep to.

use super::wire::Framing;

/// Most request headers parsed; more gets 431.
pub(super) const MAX_HEADERS: usize = 128;

/// Where a request goes.
#[derive(Debug, PartialEq, Eq, Clone)]
pub(super) enum Target {
    /// CONNECT's `host:port`.
    Authority(String, u16),
    /// An absolute `http://host[:port]/path?query`.
    Absolute {
        host: String,
        port: u16,
        /// The origin-form target: the path and query.
        path: String,
    },
}

impl Target {
    /// The host and port the request is for.
    pub(super) fn host_port(&self) -> (&str, u16) {
        match self {
            Target::Authority(h, p)
            | Target::Absolute {
                host: h, port: p, ..
            } => (h, *p),
        }
    }
}

/// Why a request head is refused: the status and a one-line reason.
#[derive(Debug)]
pub(super) struct Refusal {
    pub code: u16,
    pub why: String,
}

fn bad(why: impl Into<String>) -> Refusal {
    Refusal {
        code: 400,
        why: why.into(),
    }
}

/// A parsed request head.
#[derive(Debug)]
pub(super) struct Request {
    pub method: String,
    /// The request target as the client sent it.
    pub raw_target: String,
    pub target: Target,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    /// For a request the NAT intercepted (transparent mode): the address the guest
    /// connected to, which a direct request goes to whatever its `Host` says; the NAT
    /// checked the rules for it.
    pub pin: Option<std::net::SocketAddr>,
}

/// Headers that belong to one hop and are not passed on (RFC 9110, 7.6.1), besides the ones
/// `Connection` names.
pub(super) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

impl Request {
    pub(super) fn parse(head: &[u8]) -> Result<Request, Refusal> {
        let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut hdrs);
        match r.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(bad("the request head is incomplete")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal {
                    code: 431,
                    why: format!("the request has more than {MAX_HEADERS} headers; send fewer"),
                })
            }
            Err(e) => return Err(bad(format!("the request head is malformed ({e})"))),
        }
        let method = r.method.unwrap_or_default().to_string();
        let raw_target = r.path.unwrap_or_default().to_string();
        let version = r.version.unwrap_or(1);
        let target = if method.eq_ignore_ascii_case("CONNECT") {
            let (h, p) = split_host_port(&raw_target)
                .ok_or_else(|| bad(format!("CONNECT needs host:port, not {raw_target:?}")))?;
            Target::Authority(h, p)
        } else {
            parse_absolute(&raw_target).map_err(bad)?
        };
        let req = Request {
            method,
            raw_target,
            target,
            version,
            headers: r
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
            pin: None,
        };
        req.framing()?;
        Ok(req)
    }

    /// A request the guest sent to `original` (port 80) with no proxy configured, in
    /// origin form: made absolute from its `Host` (or the address, without one), and
    /// pinned to `original` for a direct connection.
    pub(super) fn parse_intercepted(
        head: &[u8],
        original: std::net::SocketAddr,
    ) -> Result<Request, Refusal> {
        let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut hdrs);
        let path = match r.parse(head) {
            Ok(httparse::Status::Complete(_)) => r.path.unwrap_or("/"),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal {
                    code: 431,
                    why: format!("the request has more than {MAX_HEADERS} headers; send fewer"),
                })
            }
            _ => return Err(bad("the request head is malformed")),
        };
        if path.contains("://") || r.method == Some("CONNECT") {
            // A client that knows it talks to a proxy: served as one.
            let mut req = Request::parse(head)?;
            req.pin = None;
            return Ok(req);
        }
        if !path.starts_with('/') && path != "*" {
            return Err(bad(format!("the request target {path:?} is not a path")));
        }
        let host = r
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
            .filter(|h| !h.is_empty() && !h.contains(['/', '@', ' ']));
        let authority = match host {
            Some(h) => h.to_string(),
            None if original.is_ipv6() => format!("[{}]:{}", original.ip(), original.port()),
            None => original.to_string(),
        };
        // The head again with an absolute target: a new request line, then the header lines
        // as they came (after any empty lines before the request line, which httparse skips).
        let start = head
            .iter()
            .position(|b| !b"\r\n".contains(b))
            .unwrap_or(head.len());
        let headers = head[start..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(&[][..], |i| &head[start + i + 1..]);
        let line = format!(
            "{} http://{authority}{path} HTTP/1.1\r\n",
            r.method.unwrap_or("GET")
        );
        let mut req = Request::parse(&[line.as_bytes(), headers].concat())?;
        req.version = r.version.unwrap_or(1);
        req.pin = Some(original);
        Ok(req)
    }

    /// A CONNECT to `host:port`, as ferry sends it for a TLS connection it intercepted.
    pub(super) fn connect_to(host: &str, port: u16, original: std::net::SocketAddr) -> Request {
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Request {
            method: "CONNECT".into(),
            raw_target: authority.clone(),
            target: Target::Authority(host.to_string(), port),
            version: 1,
            headers: vec![("Host".into(), authority.into_bytes())],
            pin: Some(original),
        }
    }

    /// The values of header `name`.
    pub(super) fn header<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        values(&self.headers, name)
    }

    /// How the body is framed, or why the framing is refused.
    pub(super) fn framing(&self) -> Result<Framing, Refusal> {
        let te: Vec<&[u8]> = self.header("transfer-encoding").collect();
        let mut lengths = self.header("content-length").map(|v| v.trim_ascii());
        if !te.is_empty() {
            if lengths.next().is_some() {
                return Err(bad(
                    "the request has both Transfer-Encoding and Content-Length; send one of them",
                ));
            }
            let codings = tokens(&te);
            if codings.last().map(String::as_str) != Some("chunked")
                || codings.iter().filter(|c| *c == "chunked").count() != 1
            {
                return Err(bad(
                    "the request's Transfer-Encoding does not end in chunked once; send chunked or a Content-Length",
                ));
            }
            return Ok(Framing::Chunked);
        }
        match lengths.next() {
            None => Ok(Framing::None),
            Some(first) => {
                let n = std::str::from_utf8(first)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok());
                match n {
                    Some(n) if lengths.all(|v| v == first) => Ok(Framing::Length(n)),
                    _ => Err(bad(
                        "the request's Content-Length is not one number; send one",
                    )),
                }
            }
        }
    }

    /// Whether the client asks to close after this exchange (`Connection: close`, or
    /// HTTP/1.0 without keep-alive).
    pub(super) fn wants_close(&self) -> bool {
        let conn = header_tokens(&self.headers, "connection");
        conn.iter().any(|t| t == "close")
            || (self.version == 0 && !conn.iter().any(|t| t == "keep-alive"))
    }

    /// Whether the client waits for `100 Continue` before it sends its body.
    pub(super) fn expects_continue(&self) -> bool {
        self.header("expect")
            .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
    }

    /// Whether the request asks to switch protocols (a WebSocket handshake): an `Upgrade`
    /// header that its `Connection` names. Both go on (RFC 9110, 7.8), and a `101` answer
    /// makes the connection a tunnel.
    pub(super) fn upgrade(&self) -> bool {
        !matches!(self.target, Target::Authority(..))
            && self.header("upgrade").next().is_some()
            && header_tokens(&self.headers, "connection")
                .iter()
                .any(|t| t == "upgrade")
    }

    /// Whether the guest brought its own credentials for the upstream.
    pub(super) fn has_proxy_auth(&self) -> bool {
        self.header("proxy-authorization").next().is_some()
    }

    /// The head to send on: to an upstream (`through`) with the target as it came, else to
    /// the server in origin form, as HTTP/1.1 (a proxy sends its own version). Hop-by-hop
    /// headers stay behind; `auth`, when given, is the `Proxy-Authorization` value ferry
    /// adds for the upstream; `close` asks the next hop to close after its answer.
    pub(super) fn rewrite(&self, through: bool, auth: Option<&str>, close: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        let target = match (&self.target, through) {
            (Target::Absolute { path, .. }, false) => path.as_str(),
            _ => self.raw_target.as_str(),
        };
        out.extend_from_slice(format!("{} {} HTTP/1.1\r\n", self.method, target).as_bytes());
        let named = header_tokens(&self.headers, "connection");
        let tunnel = matches!(self.target, Target::Authority(..));
        let upgrade = self.upgrade();
        let mut has_host = false;
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            let hop = HOP_BY_HOP.contains(&lower.as_str()) || named.contains(&lower);
            if hop && !(upgrade && lower == "upgrade") {
                continue;
            }
            // Credentials for a proxy are for the upstream only, never for the server.
            if lower == "proxy-authorization" && (!through || auth.is_some()) {
                continue;
            }
            has_host |= lower == "host";
            push_header(&mut out, name, value);
        }
        if !has_host {
            let (h, p) = self.target.host_port();
            let host = match (h.contains(':'), p) {
                (true, 80) if !tunnel => format!("[{h}]"),
                (false, 80) if !tunnel => h.to_string(),
                (true, _) => format!("[{h}]:{p}"),
                (false, _) => format!("{h}:{p}"),
            };
            push_header(&mut out, "Host", host.as_bytes());
        }
        if let Some(a) = auth {
            push_header(&mut out, "Proxy-Authorization", a.as_bytes());
        }
        if upgrade {
            out.extend_from_slice(b"Connection: upgrade\r\n");
        } else if close && !tunnel {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

pub(super) fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The values of header `name` in `headers` (a request's or a response's).
pub(super) fn values<'a>(
    headers: &'a [(String, Vec<u8>)],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |(h, _)| h.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// The comma-separated tokens of header `name` in `headers`, trimmed and lowercased.
pub(super) fn header_tokens(headers: &[(String, Vec<u8>)], name: &str) -> Vec<String> {
    tokens(&values(headers, name).collect::<Vec<_>>())
}

/// The comma-separated tokens of header values, trimmed and lowercased.
pub(super) fn tokens(values: &[&[u8]]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `host:port` or `[v6]:port`, split.
pub(super) fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, rest) = v6.split_once(']')?;
        (h, rest.strip_prefix(':')?)
    } else {
        s.rsplit_once(':')?
    };
    Some((host.to_string(), port.parse().ok().filter(|p| *p != 0)?))
}

/// `http://host[:port][/path]` into its parts (the path defaults to `/`).
fn parse_absolute(t: &str) -> Result<Target, String> {
    let Some((scheme, rest)) = t.split_once("://") else {
        return Err(format!(
            "this is a proxy: ask for an absolute URL (GET http://host/path) or CONNECT host:port, not {t:?}"
        ));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!(
            "{scheme}:// URLs go through CONNECT (a client does this when its proxy is set for {scheme}); plain requests take http:// only"
        ));
    }
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
        let h = authority.trim_start_matches('[').trim_end_matches(']');
        (h.to_string(), 80)
    } else {
        split_host_port(authority).ok_or_else(|| format!("bad host in {t:?}"))?
    };
    if host.is_empty() {
        return Err(format!("no host in {t:?}"));
    }
    Ok(Target::Absolute { host, port, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absolute(host: &str, port: u16, path: &str) -> Target {
        Target::Absolute {
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn parses_requests_and_rewrites_them_for_the_server_or_the_upstream() {
        let head = b"GET http://198.18.0.2:8080/a/b?c=1 HTTP/1.1\r\nHost: 198.18.0.2:8080\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nProxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n";
        let r = Request::parse(head).unwrap();
        assert_eq!(r.target, absolute("198.18.0.2", 8080, "/a/b?c=1"));
        assert!(!r.wants_close());
        let direct = String::from_utf8(r.rewrite(false, None, false)).unwrap();
        assert_eq!(
            direct,
            "GET /a/b?c=1 HTTP/1.1\r\nHost: 198.18.0.2:8080\r\nAccept: */*\r\n\r\n"
        );
        let through = String::from_utf8(r.rewrite(true, None, true)).unwrap();
        assert!(through.starts_with("GET http://198.18.0.2:8080/a/b?c=1 HTTP/1.1\r\n"));
        assert!(through.contains("Proxy-Authorization: Basic eA==\r\n"));
        assert!(through.ends_with("Connection: close\r\n\r\n"));
        assert!(!through.contains("X-Hop") && !through.contains("keep-alive"));
        // Ferry's own credentials replace the guest's.
        let own = String::from_utf8(r.rewrite(true, Some("Basic eQ=="), false)).unwrap();
        assert!(own.contains("Proxy-Authorization: Basic eQ==\r\n") && !own.contains("eA=="));

        let c = Request::parse(b"CONNECT 198.18.0.2:443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(c.target, Target::Authority("198.18.0.2".into(), 443));
        assert_eq!(
            String::from_utf8(c.rewrite(true, None, true)).unwrap(),
            "CONNECT 198.18.0.2:443 HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let target = |head: &[u8]| Request::parse(head).unwrap().target;
        assert_eq!(
            target(b"GET http://h HTTP/1.0\r\n\r\n"),
            absolute("h", 80, "/")
        );
        assert_eq!(
            target(b"GET http://h?q HTTP/1.1\r\n\r\n"),
            absolute("h", 80, "/?q")
        );
        // HTTP/1.0 closes unless it asks for keep-alive; a missing Host is added.
        let old = Request::parse(b"GET http://h:81/ HTTP/1.0\r\n\r\n").unwrap();
        assert!(old.wants_close());
        assert_eq!(
            String::from_utf8(old.rewrite(false, None, true)).unwrap(),
            "GET / HTTP/1.1\r\nHost: h:81\r\nConnection: close\r\n\r\n"
        );
        let kept = Request::parse(b"GET http://h/ HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(!kept.unwrap().wants_close());
    }

    #[test]
    fn intercepted_heads_are_made_absolute_and_odd_ones_refused_without_a_panic() {
        let o: std::net::SocketAddr = "198.18.0.9:80".parse().unwrap();
        let r =
            Request::parse_intercepted(b"GET /a?b HTTP/1.1\r\nHost: h.test\r\n\r\n", o).unwrap();
        assert_eq!(r.raw_target, "http://h.test/a?b");
        assert_eq!(r.pin, Some(o));
        let r = Request::parse_intercepted(b"\r\nGET / HTTP/1.0\n\n", o).unwrap();
        assert_eq!(r.raw_target, "http://198.18.0.9:80/");
        // Found by proxy_requests: a head that starts with an empty line.
        let crash = b"\nHTT44444 /P HTTP/1.0\n\nIIII1.1$$:A@I\t\t\t\r";
        let _ = Request::parse_intercepted(crash, o);
    }

    #[test]
    fn framing_is_read_one_way_or_refused() {
        let framing = |h: &str| Request::parse(h.as_bytes()).map(|r| r.framing().unwrap());
        assert_eq!(
            framing("GET http://h/ HTTP/1.1\r\n\r\n").unwrap(),
            Framing::None
        );
        assert_eq!(
            framing("POST http://h/ HTTP/1.1\r\nContent-Length: 12\r\n\r\n").unwrap(),
            Framing::Length(12)
        );
        assert_eq!(
            framing("POST http://h/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap(),
            Framing::Chunked
        );
    }

    #[test]
    fn requests_that_are_not_for_a_proxy_are_refused_with_a_reason() {
        for (head, code, want) in [
            (&b"GET /index.html HTTP/1.1\r\n\r\n"[..], 400, "absolute URL"),
            (b"GET https://h/ HTTP/1.1\r\n\r\n", 400, "CONNECT"),
            (b"CONNECT h HTTP/1.1\r\n\r\n", 400, "host:port"),
            (b"GARBAGE\r\n\r\n", 400, "malformed"),
            (
                b"POST http://h/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                "both Transfer-Encoding and Content-Length",
            ),
            (
                b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                400,
                "does not end in chunked",
            ),
            (
                b"POST http://h/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
                "does not end in chunked",
            ),
            (
                b"POST http://h/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                400,
                "not one number",
            ),
            (b"POST http://h/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "not one number"),
            (
                b"POST http://h/ HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                400,
                "not one number",
            ),
        ] {
            let e = Request::parse(head).unwrap_err();
            assert_eq!(e.code, code, "{:?}", String::from_utf8_lossy(head));
            assert!(e.why.contains(want), "{:?}: {}", String::from_utf8_lossy(head), e.why);
        }
        let flood = format!(
            "GET http://h/ HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(Request::parse(flood.as_bytes()).unwrap_err().code, 431);
    }
}
