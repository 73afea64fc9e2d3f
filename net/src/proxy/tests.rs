//! The proxy against real sockets on loopback: origins and upstreams played by threads.

use super::*;
use std::io::Read;
use std::net::{Shutdown, TcpListener};
use std::time::{Duration, Instant};
use wire::Peer;

/// An HTTP server on loopback that keeps connections alive: answers each request with
/// `body` (after reading the request's body), records each head, and counts connections.
/// A request with `X-Close` gets `Connection: close`.
struct Origin {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    conns: Arc<AtomicU64>,
}

fn origin(body: &'static str) -> Origin {
    origin_with(move |_| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    })
}

/// As [`origin`], with the answer `answer(head)` gives.
fn origin_with(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> Origin {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let o = Origin {
        addr: l.local_addr().unwrap(),
        heads: Default::default(),
        bodies: Default::default(),
        conns: Default::default(),
    };
    let (heads, bodies, conns) = (o.heads.clone(), o.bodies.clone(), o.conns.clone());
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for c in l.incoming() {
            conns.fetch_add(1, Ordering::Relaxed);
            let (heads, bodies, answer) = (heads.clone(), bodies.clone(), answer.clone());
            std::thread::spawn(move || {
                let mut p = Peer::new(c.unwrap());
                while let Ok(h) = p.read_head(None, Duration::from_secs(5)) {
                    let text = String::from_utf8_lossy(&h).into_owned();
                    let r = Request::parse(&h).ok();
                    let framing = match Request::parse_any(&h) {
                        Some(f) => f,
                        None => wire::Framing::None,
                    };
                    let _ = r;
                    let mut body = Vec::new();
                    if p.copy_body(framing, &mut body).is_err() {
                        return;
                    }
                    heads.lock().unwrap().push(text.clone());
                    bodies.lock().unwrap().push(body);
                    let a = answer(&text);
                    if p.stream.write_all(a.as_bytes()).is_err() || a.contains("Connection: close")
                    {
                        return;
                    }
                }
            });
        }
    });
    o
}

impl Request {
    /// The body framing of any request head, origin-form included (for the test servers).
    fn parse_any(head: &[u8]) -> Option<wire::Framing> {
        let text = String::from_utf8_lossy(head).to_ascii_lowercase();
        if text.contains("transfer-encoding: chunked") {
            return Some(wire::Framing::Chunked);
        }
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))?
            .trim()
            .parse()
            .ok()?;
        Some(wire::Framing::Length(n))
    }
}

/// A TCP echo server on loopback.
fn echo_server() -> SocketAddr {
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in echo.incoming() {
            let mut c = c.unwrap();
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = io::copy(&mut r, &mut c);
            });
        }
    });
    addr
}

/// A client connection to the proxy, as the NAT opens it.
fn client(p: &Arc<Proxy>) -> UnixStream {
    let s = p.accept(None, None).unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Sends `req` and reads until the proxy closes.
fn roundtrip(mut s: UnixStream, req: &str) -> String {
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    if let Err(e) = s.read_to_string(&mut out) {
        panic!("{req:.100}: {e}; read {out:?}");
    }
    out
}

/// Reads one answer (head and Content-Length body) from a kept-alive connection.
fn answer<S: wire::Socket>(p: &mut Peer<S>) -> (String, String) {
    let h = p.read_head(None, Duration::from_secs(10)).unwrap();
    let r = wire::Response::parse(&h).unwrap();
    let mut body = Vec::new();
    p.copy_body(r.framing("GET"), &mut body).unwrap();
    (
        String::from_utf8_lossy(&h).into_owned(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn start(settings: Settings, secret: Option<&str>, rules: Option<Arc<Rules>>) -> Arc<Proxy> {
    Proxy::new(settings, secret.map(Secret::new), rules).unwrap()
}

fn via(o: &Origin, user: Option<&str>) -> Settings {
    let mut u: Upstream = o.addr.to_string().parse().unwrap();
    u.user = user.map(str::to_string);
    Settings::with_upstream(Some(u))
}

#[test]
fn relays_a_request_and_reports_an_unreachable_server() {
    let o = origin("hello");
    let origin = o.addr;
    let p = start(Settings::default(), None, None);
    let out = roundtrip(
        client(&p),
        &format!("GET http://{origin}/x HTTP/1.1\r\nHost: {origin}\r\nProxy-Connection: keep-alive\r\nConnection: close\r\n\r\n"),
    );
    assert!(
        out.starts_with("HTTP/1.1 200 OK") && out.ends_with("hello"),
        "{out}"
    );
    assert_eq!(
        o.heads.lock().unwrap()[0],
        format!("GET /x HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n")
    );
    // A port where nothing listens.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = roundtrip(client(&p), &format!("GET http://{dead}/ HTTP/1.1\r\n\r\n"));
    assert!(out.starts_with("HTTP/1.1 502 Bad Gateway"), "{out}");
    assert!(out.contains(&format!("cannot connect to {dead}")), "{out}");
    let st = p.stats();
    assert_eq!((st.requests, st.failed), (1, 1));
    assert_eq!(st.errors[Failure::Unreachable as usize], 1);
}

#[test]
fn keep_alive_reuses_one_server_connection_and_pipelined_requests_wait_their_turn() {
    let o = origin("hi");
    let p = start(Settings::default(), None, None);
    let s = client(&p);
    let mut g = Peer::new(s.try_clone().unwrap());
    let req = format!("GET http://{}/n HTTP/1.1\r\nHost: x\r\n\r\n", o.addr);
    for _ in 0..50 {
        (&s).write_all(req.as_bytes()).unwrap();
        let (h, b) = answer(&mut g);
        assert!(h.starts_with("HTTP/1.1 200 OK"), "{h}");
        assert_eq!(b, "hi");
    }
    // Three at once: answered in order, each whole.
    (&s).write_all(req.repeat(3).as_bytes()).unwrap();
    for _ in 0..3 {
        assert_eq!(answer(&mut g).1, "hi");
    }
    assert_eq!(o.conns.load(Ordering::Relaxed), 1);
    assert_eq!(p.stats().connections, 1);
    assert_eq!(p.stats().requests, 53);
    // A request body, chunked, arrives as sent and the connection goes on.
    (&s).write_all(format!("POST http://{}/p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", o.addr).as_bytes()).unwrap();
    assert_eq!(answer(&mut g).1, "hi");
    assert_eq!(
        o.bodies.lock().unwrap().last().unwrap(),
        b"5\r\nhello\r\n0\r\n\r\n"
    );
    // A body larger than what is read ahead is streamed.
    let big = vec![b'x'; 300_000];
    (&s).write_all(
        format!(
            "POST http://{}/p HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            o.addr,
            big.len()
        )
        .as_bytes(),
    )
    .unwrap();
    (&s).write_all(&big).unwrap();
    assert_eq!(answer(&mut g).1, "hi");
    assert_eq!(o.bodies.lock().unwrap().last().unwrap().len(), big.len());
    assert_eq!(o.conns.load(Ordering::Relaxed), 1);
}

#[test]
fn a_server_that_closed_its_kept_connection_gets_the_request_on_a_new_one() {
    // The server closes after each answer without saying so.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let mut p = Peer::new(c.unwrap());
            if p.read_head(None, Duration::from_secs(5)).is_ok() {
                let _ = p
                    .stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        }
    });
    let p = start(Settings::default(), None, None);
    let s = client(&p);
    let mut g = Peer::new(s.try_clone().unwrap());
    for _ in 0..3 {
        (&s).write_all(format!("GET http://{addr}/ HTTP/1.1\r\n\r\n").as_bytes())
            .unwrap();
        assert_eq!(answer(&mut g).1, "ok");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_framing_never_reaches_the_next_hop() {
    let o = origin("must not be asked");
    let p = start(Settings::default(), None, None);
    let a = o.addr;
    for (req, code) in [
        (format!("POST http://{a}/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "400"),
        (format!("POST http://{a}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"), "400"),
        (format!("POST http://{a}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"), "400"),
        (format!("POST http://{a}/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"), "400"),
        (format!("GET http://{a}/ HTTP/1.1\r\n{}\r\n", "X-F: 1\r\n".repeat(200)), "431"),
        (format!("GET http://{a}/ HTTP/1.1\r\nX-Big: {}\r\n\r\n", "y".repeat(70_000)), "431"),
    ] {
        let out = roundtrip(client(&p), &req);
        assert!(out.starts_with(&format!("HTTP/1.1 {code} ")), "{req:.80}: {out}");
        assert!(out.contains("ferry proxy: "), "{out}");
    }
    assert_eq!(o.conns.load(Ordering::Relaxed), 0);
    let st = p.stats();
    assert_eq!(st.errors[Failure::BadRequest as usize], 4);
    assert_eq!(st.errors[Failure::TooLarge as usize], 2);
}

#[test]
fn a_head_that_trickles_in_gets_408() {
    let p = start(Settings::default(), None, None);
    let mut s = client(&p);
    s.write_all(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    let t = Instant::now();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 408 Request Timeout"), "{out}");
    assert!(t.elapsed() >= Duration::from_secs(9), "{:?}", t.elapsed());
    assert_eq!(p.stats().errors[Failure::Timeout as usize], 1);
}

#[test]
fn rules_refuse_servers_the_guest_may_not_reach() {
    let server = origin("hello").addr;
    let rules = Arc::new(Rules::new(&[format!(
        "reject,proto=tcp,to=127.0.0.1/32,port={}",
        server.port()
    )
    .parse()
    .unwrap()]));
    let p = start(Settings::default(), None, Some(rules.clone()));
    let out = roundtrip(
        client(&p),
        &format!("GET http://{server}/ HTTP/1.1\r\n\r\n"),
    );
    assert!(out.starts_with("HTTP/1.1 403 Forbidden"), "{out}");
    assert!(
        out.contains("rule 1 (reject,proto=tcp,to=127.0.0.1/32,port="),
        "{out}"
    );
    let out = roundtrip(client(&p), &format!("CONNECT {server} HTTP/1.1\r\n\r\n"));
    assert!(out.starts_with("HTTP/1.1 403 Forbidden"), "{out}");
    assert_eq!(rules.list()[0].packets, 2);
    // An allowed server counts one packet and the bytes both ways on the default policy.
    let open = origin("hello").addr;
    let out = roundtrip(
        client(&p),
        &format!("GET http://{open}/ HTTP/1.1\r\nConnection: close\r\n\r\n"),
    );
    assert!(out.ends_with("hello"), "{out}");
    let (packets, bytes) = rules.default_counters(crate::rules::Dir::Out);
    assert_eq!(packets, 1);
    assert!(bytes as usize > out.len(), "{bytes}");
    // Through an upstream proxy, the upstream decides.
    let up = origin("from upstream");
    p.set_upstream(Some(up.addr.to_string().parse().unwrap()));
    let out = roundtrip(
        client(&p),
        &format!("GET http://{server}/ HTTP/1.1\r\nConnection: close\r\n\r\n"),
    );
    assert!(out.ends_with("from upstream"), "{out}");
}

#[test]
fn tunnels_connect_and_relays_through_an_upstream() {
    // CONNECT straight to an echo server.
    let echo_addr = echo_server();
    let p = start(Settings::default(), None, None);
    let mut s = client(&p);
    s.write_all(
        format!("CONNECT {echo_addr} HTTP/1.1\r\nHost: {echo_addr}\r\n\r\nearly").as_bytes(),
    )
    .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out, "HTTP/1.1 200 Connection established\r\n\r\nearly");

    // With an upstream, both kinds go to it as they came; the upstream answers.
    let up = origin_with(|head| {
        let body = if head.starts_with("CONNECT") {
            "tunnel"
        } else {
            "from upstream"
        };
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    });
    let upstream: Upstream = up.addr.to_string().parse().unwrap();
    p.set_upstream(Some(upstream.clone()));
    assert_eq!(p.upstream(), Some(upstream));
    let out = roundtrip(client(&p), "GET http://198.18.0.9/y HTTP/1.1\r\nHost: 198.18.0.9\r\nProxy-Authorization: Basic eA==\r\nConnection: close\r\n\r\n");
    assert!(out.ends_with("from upstream"), "{out}");
    let out = roundtrip(client(&p), "CONNECT 198.18.0.9:443 HTTP/1.1\r\n\r\n");
    assert!(out.ends_with("tunnel"), "{out}");
    let heads = up.heads.lock().unwrap();
    assert_eq!(
        heads[0],
        "GET http://198.18.0.9/y HTTP/1.1\r\nHost: 198.18.0.9\r\nProxy-Authorization: Basic eA==\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(
        heads[1],
        "CONNECT 198.18.0.9:443 HTTP/1.1\r\nHost: 198.18.0.9:443\r\n\r\n"
    );
    let st = p.stats();
    assert_eq!((st.tunnels, st.requests, st.failed), (2, 1, 0));
}

/// An upstream that wants Basic `alice:s3cret` (and offers Negotiate first, which ferry
/// does not do), then answers as a proxy would.
fn authenticating_upstream() -> Origin {
    origin_with(|head| {
        let good = head.contains("Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n");
        if !good {
            let body = "auth first";
            return format!("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
        if head.starts_with("CONNECT") {
            return "HTTP/1.1 200 Connection established\r\n\r\n".into();
        }
        "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\npassed!".into()
    })
}

#[test]
fn ferry_answers_the_upstreams_basic_challenge_with_its_own_credentials() {
    let up = authenticating_upstream();
    let p = start(via(&up, Some("alice")), Some("s3cret"), None);
    let s = client(&p);
    let mut g = Peer::new(s.try_clone().unwrap());
    for _ in 0..3 {
        (&s).write_all(b"POST http://198.18.0.9/ HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody")
            .unwrap();
        let (h, b) = answer(&mut g);
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert_eq!(b, "passed!");
    }
    // One challenge, then the scheme goes with every request; the body went each time.
    let heads = up.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 4, "{heads:?}");
    assert!(!heads[0].contains("Proxy-Authorization"));
    assert!(heads[1..]
        .iter()
        .all(|h| h.contains("Basic YWxpY2U6czNjcmV0")));
    assert!(up.bodies.lock().unwrap().iter().all(|b| b == b"body"));
    assert_eq!(up.conns.load(Ordering::Relaxed), 1);
    // A tunnel, too.
    let mut t = client(&p);
    t.write_all(b"CONNECT 198.18.0.9:443 HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut tp = Peer::new(t.try_clone().unwrap());
    let h = tp.read_head(None, Duration::from_secs(5)).unwrap();
    assert!(
        h.starts_with(b"HTTP/1.1 200 Connection established"),
        "{}",
        String::from_utf8_lossy(&h)
    );
    // The password shows nowhere.
    assert!(!format!("{:?}", p.settings()).contains("s3cret"));
}

#[test]
fn a_wrong_secret_gives_the_guest_a_407_that_names_the_upstream() {
    let up = authenticating_upstream();
    let p = start(via(&up, Some("alice")), Some("wrong"), None);
    let out = roundtrip(client(&p), "GET http://198.18.0.9/ HTTP/1.1\r\n\r\n");
    assert!(
        out.starts_with("HTTP/1.1 407 Proxy Authentication Required"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "the upstream proxy http://alice@{} refused ferry's Basic credentials for user alice",
            up.addr
        )),
        "{out}"
    );
    assert!(!out.contains("wrong"), "{out}");
    let out = roundtrip(client(&p), "CONNECT 198.18.0.9:443 HTTP/1.1\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 407"), "{out}");
    assert_eq!(p.stats().errors[Failure::Auth as usize], 2);
    // Without a password, the 407 says how to give one; a guest with its own
    // credentials gets the upstream's answer as it is.
    let p = start(via(&up, Some("alice")), None, None);
    let out = roundtrip(
        client(&p),
        "GET http://198.18.0.9/ HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(out.contains("--proxy-credentials"), "{out}");
    let out = roundtrip(client(&p), "GET http://198.18.0.9/ HTTP/1.1\r\nProxy-Authorization: Basic eA==\r\nConnection: close\r\n\r\n");
    assert!(out.ends_with("auth first"), "{out}");
}

#[test]
fn the_bypass_list_sends_named_servers_direct() {
    let up = origin("via upstream");
    let direct = origin("direct");
    let mut s = via(&up, None);
    s.bypass = "localhost, 127.0.0.0/8".parse().unwrap();
    let p = start(s, None, None);
    let get = |host: &str| {
        roundtrip(
            client(&p),
            &format!("GET http://{host}/ HTTP/1.1\r\nConnection: close\r\n\r\n"),
        )
    };
    assert!(get(&direct.addr.to_string()).ends_with("direct"));
    assert!(get(&format!("localhost:{}", direct.addr.port())).ends_with("direct"));
    assert!(get("198.18.0.9").ends_with("via upstream"));
    assert_eq!(up.heads.lock().unwrap().len(), 1);
    assert_eq!(direct.heads.lock().unwrap().len(), 2);
}

#[test]
fn the_environment_is_the_hosts_setting() {
    // Only this test touches these variables.
    std::env::set_var("http_proxy", "http://proxy.corp:3128");
    std::env::set_var("HTTPS_PROXY", "proxy.corp:3129");
    std::env::set_var("no_proxy", ".internal,10.0.0.0/8");
    let s = Settings::from_env().unwrap().unwrap();
    assert_eq!(s.http.unwrap().port, 3128);
    assert_eq!(s.https.unwrap().port, 3129);
    assert!(s.bypass.matches("a.internal", 80));
    std::env::set_var("http_proxy", "socks5://x:1");
    let e = Settings::from_env().unwrap_err();
    assert!(e.contains("the environment's http_proxy"), "{e}");
    for v in ["http_proxy", "HTTPS_PROXY", "no_proxy"] {
        std::env::remove_var(v);
    }
}

/// An upstream that takes NTLM as squid does: a NEGOTIATE gets a CHALLENGE, an
/// AUTHENTICATE authenticates the connection, and requests after it on that connection need
/// nothing. Records, per request, which message came (or none).
#[test]
fn ferry_does_the_ntlm_handshake_once_per_upstream_connection() {
    use base64::Engine;
    let mut c = b"NTLMSSP\0\x02\0\0\0".to_vec();
    c.extend_from_slice(&[0, 0, 0, 0, 56, 0, 0, 0]);
    c.extend_from_slice(&0x0000_0201u32.to_le_bytes());
    c.extend_from_slice(b"\x01\x23\x45\x67\x89\xab\xcd\xef");
    c.extend_from_slice(&[0; 8]);
    c.extend_from_slice(&[0, 0, 0, 0, 56, 0, 0, 0]);
    c.extend_from_slice(&[0; 8]);
    let challenge = base64::engine::general_purpose::STANDARD.encode(&c);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let seen = s2.clone();
            let challenge = challenge.clone();
            std::thread::spawn(move || {
                let mut p = Peer::new(conn.unwrap());
                let mut authed = false;
                while let Ok(h) = p.read_head(None, Duration::from_secs(5)) {
                    let h = String::from_utf8_lossy(&h).into_owned();
                    let msg = if h.contains("NTLM TlRMTVNTUAAB") {
                        "negotiate"
                    } else if h.contains("NTLM TlRMTVNTUAAD") {
                        "authenticate"
                    } else {
                        "none"
                    };
                    seen.lock().unwrap().push(msg);
                    let answer = match (msg, authed) {
                        ("negotiate", _) => format!("HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM {challenge}\r\nContent-Length: 0\r\n\r\n"),
                        ("authenticate", _) | ("none", true) => {
                            authed = true;
                            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".into()
                        }
                        _ => "HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM\r\nProxy-Authenticate: Basic realm=x\r\nContent-Length: 0\r\n\r\n".into(),
                    };
                    if p.stream.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut u: Upstream = addr.to_string().parse().unwrap();
    u.user = Some("CORP\\alice".into());
    let p = start(Settings::with_upstream(Some(u)), Some("pw"), None);
    for _ in 0..2 {
        let s = client(&p);
        let mut g = Peer::new(s.try_clone().unwrap());
        for _ in 0..3 {
            (&s).write_all(b"GET http://198.18.0.9/ HTTP/1.1\r\n\r\n")
                .unwrap();
            assert_eq!(answer(&mut g).1, "ok");
        }
    }
    // The first connection learns NTLM from a plain 407; the second starts with it.
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "none",
            "negotiate",
            "authenticate",
            "none",
            "none",
            "negotiate",
            "authenticate",
            "none",
            "none"
        ]
    );
}

/// A client connection the NAT intercepted on its way to `original` (transparent mode).
fn intercepted(p: &Arc<Proxy>, original: SocketAddr) -> UnixStream {
    let s = p.accept(Some(original), None).unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

#[test]
fn transparent_http_goes_to_the_address_directly_or_by_name_through_the_upstream() {
    let o = origin("plain");
    let p = start(Settings::default(), None, None);
    // Direct: to the address the guest chose, whatever its Host says.
    let out = roundtrip(
        intercepted(&p, o.addr),
        "GET /x?y HTTP/1.1\r\nHost: name.test\r\nConnection: close\r\n\r\n",
    );
    assert!(out.ends_with("plain"), "{out}");
    assert_eq!(
        o.heads.lock().unwrap()[0],
        "GET /x?y HTTP/1.1\r\nHost: name.test\r\nConnection: close\r\n\r\n"
    );
    // Through the upstream: by name, in absolute form.
    let up = origin("via upstream");
    p.set_upstream(Some(up.addr.to_string().parse().unwrap()));
    let out = roundtrip(
        intercepted(&p, "198.18.0.9:80".parse().unwrap()),
        "GET /x HTTP/1.1\r\nHost: name.test\r\nConnection: close\r\n\r\n",
    );
    assert!(out.ends_with("via upstream"), "{out}");
    assert!(
        up.heads.lock().unwrap()[0].starts_with("GET http://name.test/x HTTP/1.1\r\n"),
        "{:?}",
        up.heads.lock().unwrap()
    );
    // No Host: the address.
    let _ = roundtrip(
        intercepted(&p, "198.18.0.9:80".parse().unwrap()),
        "GET / HTTP/1.0\r\n\r\n",
    );
    assert!(up.heads.lock().unwrap()[1].starts_with("GET http://198.18.0.9:80/ HTTP/1.1\r\n"));
    assert_eq!(p.stats().intercepted, 3);
}

#[test]
fn transparent_tls_becomes_a_connect_to_the_name_it_asked_for() {
    // An upstream that answers CONNECT with 200, then echoes.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let mut p = Peer::new(c.unwrap());
            let h = p.read_head(None, Duration::from_secs(5)).unwrap();
            s2.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&h).into_owned());
            p.stream
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .unwrap();
            let mut echo = p.stream.try_clone().unwrap();
            let pending = p.take_pending();
            echo.write_all(&pending).unwrap();
            let _ = io::copy(&mut p.stream, &mut echo);
        }
    });
    let p = start(
        Settings::with_upstream(Some(up_addr.to_string().parse().unwrap())),
        None,
        None,
    );
    let hello = sni::tests::client_hello(Some("secure.test"));
    let mut s = intercepted(&p, "198.18.0.9:443".parse().unwrap());
    s.write_all(&hello).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    // The guest sees only its own bytes come back: no HTTP from ferry or the upstream.
    assert_eq!(back, hello);
    assert_eq!(
        seen.lock().unwrap()[0],
        "CONNECT secure.test:443 HTTP/1.1\r\nHost: secure.test:443\r\n\r\n"
    );
    // Bypassed: straight to the address, the ClientHello first.
    let echo_addr = echo_server();
    let mut s = (*p.settings()).clone();
    s.bypass = "secure.test".parse().unwrap();
    p.set_settings(s);
    let mut s = intercepted(&p, echo_addr);
    s.write_all(&hello).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, hello);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn a_pac_file_chooses_per_request_and_falls_back_past_an_unreachable_proxy() {
    let up = origin("via upstream");
    let direct = origin("direct");
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let script = format!(
        r#"function FindProxyForURL(url, host) {{
            if (host == "broken.test") return null.x;
            if (dnsDomainIs(host, ".corp.test")) return "PROXY {dead}; PROXY {}";
            return "DIRECT";
        }}"#,
        up.addr
    );
    let mut s = Settings::with_upstream(Some("http://alice@127.0.0.1:1".parse().unwrap()));
    s.pac = Some(Arc::new(pac::Pac::from_script("test.pac", script).unwrap()));
    let p = start(s, None, None);
    let get = |url: &str| {
        roundtrip(
            client(&p),
            &format!("GET {url} HTTP/1.1\r\nConnection: close\r\n\r\n"),
        )
    };
    // The dead proxy first, then the live one.
    assert!(get("http://www.corp.test/").ends_with("via upstream"));
    assert!(up.heads.lock().unwrap()[0].starts_with("GET http://www.corp.test/ HTTP/1.1"));
    assert!(get(&format!("http://{}/", direct.addr)).ends_with("direct"));
    let out = get("http://broken.test/");
    assert!(
        out.starts_with("HTTP/1.1 502") && out.contains("the PAC file"),
        "{out}"
    );
    assert_eq!(p.stats().errors[Failure::Pac as usize], 1);
    // A new PAC at run time takes effect for the next request.
    let mut s = (*p.settings()).clone();
    s.pac = Some(Arc::new(
        pac::Pac::from_script(
            "new.pac",
            format!(
                "function FindProxyForURL(u, h) {{ return 'PROXY {}'; }}",
                up.addr
            ),
        )
        .unwrap(),
    ));
    p.set_settings(s);
    assert!(get(&format!("http://{}/", direct.addr)).ends_with("via upstream"));
}

#[test]
fn an_intercepted_tls_connection_that_fails_gets_a_close_not_http() {
    let p = start(Settings::default(), None, None);
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut s = intercepted(&p, dead);
    s.write_all(&sni::tests::client_hello(Some("secure.test")))
        .unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    assert!(back.is_empty(), "{:?}", String::from_utf8_lossy(&back));
    assert_eq!(p.stats().errors[Failure::Unreachable as usize], 1);
}

#[test]
fn a_websocket_upgrade_goes_on_and_the_connection_becomes_a_tunnel() {
    // A server that takes the upgrade, checks what it was sent, then echoes.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut p = Peer::new(l.accept().unwrap().0);
        let head = String::from_utf8(p.read_head(None, Duration::from_secs(10)).unwrap()).unwrap();
        p.stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
            .unwrap();
        let mut echo = p.take_pending();
        let mut buf = [0u8; 64];
        while echo.len() < 8 {
            let n = p.stream.read(&mut buf).unwrap();
            echo.extend_from_slice(&buf[..n]);
        }
        p.stream.write_all(&echo).unwrap();
        head
    });
    let p = start(Settings::default(), None, None);
    let mut s = client(&p);
    s.write_all(
        format!("GET http://{addr}/chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: k\r\n\r\nping").as_bytes(),
    )
    .unwrap();
    let mut g = Peer::new(s.try_clone().unwrap());
    let (head, _) = (g.read_head(None, Duration::from_secs(10)).unwrap(), ());
    let head = String::from_utf8(head).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 101 ") && head.contains("Upgrade: websocket\r\n"),
        "{head}"
    );
    s.write_all(b"pong").unwrap();
    let mut echo = g.take_pending();
    let mut buf = [0u8; 64];
    while echo.len() < 8 {
        let n = g.stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {echo:?}");
        echo.extend_from_slice(&buf[..n]);
    }
    assert_eq!(echo, b"pingpong");
    let sent = server.join().unwrap();
    assert!(
        sent.starts_with("GET /chat HTTP/1.1\r\n")
            && sent.contains("Upgrade: websocket\r\n")
            && sent.contains("Connection: upgrade\r\n")
            && !sent.contains("keep-alive"),
        "{sent}"
    );
}
