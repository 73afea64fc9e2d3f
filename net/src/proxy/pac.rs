//! PAC files (`--proxy-pac FILE|URL`): a JavaScript function, `FindProxyForURL(url, host)`,
//! that names the proxies for each request, as browsers and corporate networks use them.
//!
//! The script runs in an embedded QuickJS (the `rquickjs` crate) on one thread of its own,
//! which owns the engine: sessions send it (url, host) and wait for the answer, so no
//! engine is shared between threads and a script cannot slow more than the requests that
//! wait for it. Each call has a time limit (an interrupt handler stops a script that loops)
//! and the engine a memory limit. PAC's helper functions are in `pac.js`; `dnsResolve` and
//! `myIpAddress` are natives that use the host's resolver and interfaces.
//!
//! The answer (`"PROXY a:3128; PROXY b:8080; DIRECT"`) becomes an ordered list of
//! [`Choice`]s, and the session tries each until one connects: an unreachable proxy falls
//! back to the next entry.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rquickjs::{CatchResultExt, Context, Function, Runtime};

/// How long one `FindProxyForURL` may run.
const CALL_LIMIT: Duration = Duration::from_secs(1);
/// The engine's memory limit.
const MEMORY_LIMIT: usize = 32 << 20;
/// The longest PAC script taken.
const MAX_SCRIPT: usize = 1 << 20;

/// One entry of a PAC answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Straight to the server.
    Direct,
    /// Through the proxy at host:port: `PROXY` (or `HTTP`), or `HTTPS` for one spoken to
    /// over TLS.
    Proxy { host: String, port: u16, tls: bool },
}

/// Parses a PAC answer; entries ferry cannot use (SOCKS) are left out, and
/// an answer with none left is an error.
pub fn parse_answer(answer: &str) -> Result<Vec<Choice>, String> {
    let mut out = Vec::new();
    for entry in answer.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let mut words = entry.split_whitespace();
        let kind = words.next().unwrap_or("").to_ascii_uppercase();
        match (kind.as_str(), words.next()) {
            ("DIRECT", _) => out.push(Choice::Direct),
            ("PROXY" | "HTTP" | "HTTPS", Some(hp)) => match super::request::split_host_port(hp) {
                Some((host, port)) if !host.is_empty() => out.push(Choice::Proxy {
                    host,
                    port,
                    tls: kind == "HTTPS",
                }),
                _ => {
                    log::debug!("proxy: the PAC answer's entry {entry:?} has no host:port; skipped")
                }
            },
            _ => log::debug!(
                "proxy: the PAC answer's entry {entry:?} is not PROXY, HTTPS or DIRECT; skipped"
            ),
        }
    }
    if out.is_empty() {
        return Err(format!(
            "the PAC file's answer {answer:?} names no PROXY or DIRECT entry ferry can use"
        ));
    }
    Ok(out)
}

/// A request for the evaluator thread.
struct Job {
    url: String,
    host: String,
    reply: mpsc::SyncSender<Result<String, String>>,
}

/// A loaded PAC script and the thread that runs it.
pub struct Pac {
    jobs: mpsc::Sender<Job>,
    /// Where it came from (the path or URL), for display.
    source: String,
}

impl std::fmt::Debug for Pac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pac({})", self.source)
    }
}

/// Where a PAC script comes from, read but not yet running: a file is read when this is
/// made (before ferry's sandbox closes the file system), a URL is fetched when the script
/// starts.
#[derive(Clone, Debug)]
pub struct PacSource {
    /// The path or URL.
    pub name: String,
    /// A file's script; `None` for a URL.
    script: Option<String>,
}

impl PacSource {
    /// Reads the file at `spec`, or takes an `http://` URL; an error says what to fix.
    pub fn read(spec: &str) -> Result<PacSource, String> {
        if spec.starts_with("http://") {
            return Ok(PacSource {
                name: spec.to_string(),
                script: None,
            });
        }
        if spec.contains("://") {
            return Err(format!(
                "the PAC location {spec:?} is not a file or an http:// URL; give a path, or an http:// URL"
            ));
        }
        let bytes = std::fs::read(spec).map_err(|e| {
            format!("cannot read the PAC file {spec}: {e}; give the path of a PAC script")
        })?;
        if bytes.len() > MAX_SCRIPT {
            return Err(format!(
                "the PAC file {spec} is over {} KiB",
                MAX_SCRIPT >> 10
            ));
        }
        let script = String::from_utf8(bytes)
            .map_err(|_| format!("the PAC file {spec} is not UTF-8 text"))?;
        Ok(PacSource {
            name: spec.to_string(),
            script: Some(script),
        })
    }
}

impl Pac {
    /// Reads and starts the script at `spec` (a file, or an `http://` URL fetched through
    /// the host's network); an error says what to fix.
    pub fn load(spec: &str) -> Result<Pac, String> {
        Self::start(&PacSource::read(spec)?)
    }

    /// Fetches the script of `src` if it is a URL, compiles it and starts its thread.
    pub fn start(src: &PacSource) -> Result<Pac, String> {
        let script = match &src.script {
            Some(s) => s.clone(),
            None => fetch(&src.name)?,
        };
        Self::from_script(&src.name, script)
    }

    /// Compiles `script` (from `source`) and starts its thread.
    pub fn from_script(source: &str, script: String) -> Result<Pac, String> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let name = source.to_string();
        std::thread::Builder::new()
            .name("ferry-pac".into())
            .spawn(move || evaluator(&name, &script, &ready_tx, &rx))
            .map_err(|e| format!("cannot start the PAC thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Pac {
                jobs,
                source: source.to_string(),
            }),
            Ok(Err(e)) => Err(format!(
                "the PAC file {source} does not load: {e}; fix the script"
            )),
            Err(_) => Err(format!(
                "the PAC file {source} stopped its thread while loading"
            )),
        }
    }

    /// Where the script came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The proxies for `url` on `host`, in order.
    pub fn find(&self, url: &str, host: &str) -> Result<Vec<Choice>, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Job {
                url: url.to_string(),
                host: host.to_string(),
                reply: tx,
            })
            .map_err(|_| "the PAC thread has stopped".to_string())?;
        let answer = rx
            .recv_timeout(CALL_LIMIT * 5)
            .map_err(|_| "the PAC file gave no answer in time".to_string())??;
        parse_answer(&answer)
    }
}

/// The thread that owns the engine: loads the script, says whether it loaded, then answers
/// jobs until the `Pac` is dropped.
fn evaluator(
    name: &str,
    script: &str,
    ready: &mpsc::SyncSender<Result<(), String>>,
    jobs: &mpsc::Receiver<Job>,
) {
    let started = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
    let setup = || -> Result<(Runtime, Context), String> {
        let rt = Runtime::new().map_err(|e| e.to_string())?;
        rt.set_memory_limit(MEMORY_LIMIT);
        rt.set_max_stack_size(512 << 10);
        let s = started.clone();
        rt.set_interrupt_handler(Some(Box::new(move || {
            s.lock()
                .ok()
                .and_then(|t| *t)
                .is_some_and(|t| t.elapsed() > CALL_LIMIT)
        })));
        let ctx = Context::full(&rt).map_err(|e| e.to_string())?;
        ctx.with(|ctx| -> Result<(), String> {
            let g = ctx.globals();
            let natives = || -> rquickjs::Result<()> {
                g.set("dnsResolve", Function::new(ctx.clone(), dns_resolve)?)?;
                g.set("myIpAddress", Function::new(ctx.clone(), my_ip_address)?)?;
                g.set(
                    "alert",
                    Function::new(ctx.clone(), |m: String| log::info!("proxy: PAC alert: {m}"))?,
                )
            };
            natives().map_err(|e| e.to_string())?;
            ctx.eval::<(), _>(include_str!("pac.js"))
                .catch(&ctx)
                .map_err(|e| format!("ferry's PAC helpers: {e}"))?;
            *started.lock().map_err(|_| "lock")? = Some(Instant::now());
            ctx.eval::<(), _>(script)
                .catch(&ctx)
                .map_err(|e| e.to_string())?;
            *started.lock().map_err(|_| "lock")? = None;
            let f: Function = g
                .get("FindProxyForURL")
                .map_err(|_| "it defines no function FindProxyForURL(url, host)".to_string())?;
            drop(f);
            Ok(())
        })?;
        Ok((rt, ctx))
    };
    let (_rt, ctx) = match setup() {
        Ok(x) => {
            let _ = ready.send(Ok(()));
            x
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    log::debug!("proxy: PAC file {name} loaded");
    for job in jobs {
        if let Ok(mut t) = started.lock() {
            *t = Some(Instant::now());
        }
        let answer = ctx.with(|ctx| {
            let f: Function = ctx
                .globals()
                .get("FindProxyForURL")
                .map_err(|e| e.to_string())?;
            f.call::<_, String>((job.url.as_str(), job.host.as_str()))
                .catch(&ctx)
                .map_err(|e| {
                    let late = started
                        .lock()
                        .ok()
                        .and_then(|t| *t)
                        .is_some_and(|t| t.elapsed() > CALL_LIMIT);
                    if late {
                        format!("FindProxyForURL ran over {} ms", CALL_LIMIT.as_millis())
                    } else {
                        format!("FindProxyForURL failed: {e}")
                    }
                })
        });
        if let Ok(mut t) = started.lock() {
            *t = None;
        }
        let _ = job.reply.send(answer);
    }
}

/// PAC's `dnsResolve`: the host's first IPv4 address, or null.
fn dns_resolve(host: String) -> Option<String> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Some(ip.to_string());
    }
    (host.as_str(), 0)
        .to_socket_addrs()
        .ok()?
        .find_map(|a| match a.ip() {
            IpAddr::V4(v4) => Some(v4.to_string()),
            IpAddr::V6(_) => None,
        })
}

/// PAC's `myIpAddress`: the host's first IPv4 address that is not loopback.
fn my_ip_address() -> String {
    let mut out = Ipv4Addr::LOCALHOST;
    let mut ifs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifs` with a list it allocates, freed below.
    if unsafe { libc::getifaddrs(&mut ifs) } == 0 {
        let mut cur = ifs;
        while !cur.is_null() {
            // SAFETY: `cur` is an entry of the list getifaddrs returned, not yet freed.
            let ifa = unsafe { &*cur };
            if !ifa.ifa_addr.is_null() {
                // SAFETY: ifa_addr points to a sockaddr of the family it names.
                let family = unsafe { (*ifa.ifa_addr).sa_family };
                if i32::from(family) == libc::AF_INET {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    if !ip.is_loopback() {
                        out = ip;
                        break;
                    }
                }
            }
            cur = ifa.ifa_next;
        }
        // SAFETY: `ifs` came from getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(ifs) };
    }
    out.to_string()
}

/// Fetches a PAC script over plain HTTP through the host's network.
fn fetch(url: &str) -> Result<String, String> {
    let bad = |why: String| format!("cannot fetch the PAC file {url}: {why}; check the URL");
    let rest = &url["http://".len()..];
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) =
        super::request::split_host_port(authority).unwrap_or((authority.to_string(), 80));
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("the name has no address".into()))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| bad(e.to_string()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    use std::io::{Read, Write};
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: ferry\r\n\r\n"
    )
    .map_err(|e| bad(e.to_string()))?;
    let mut body = Vec::new();
    s.take((MAX_SCRIPT + 64 * 1024) as u64)
        .read_to_end(&mut body)
        .map_err(|e| bad(e.to_string()))?;
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("the answer is not HTTP".into()))?;
    let status = String::from_utf8_lossy(&body[..end]);
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(bad(format!(
            "the server answered {:?}",
            status.lines().next().unwrap_or("")
        )));
    }
    String::from_utf8(body[end + 4..].to_vec()).map_err(|_| bad("it is not UTF-8 text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(host: &str, port: u16) -> Choice {
        Choice::Proxy {
            host: host.into(),
            port,
            tls: false,
        }
    }

    fn pac(script: &str) -> Pac {
        Pac::from_script("test.pac", script.to_string()).unwrap()
    }

    #[test]
    fn answers_are_parsed_in_order_and_unusable_entries_left_out() {
        assert_eq!(
            parse_answer("PROXY a.corp:3128; SOCKS s:1080;DIRECT").unwrap(),
            [proxy("a.corp", 3128), Choice::Direct]
        );
        assert_eq!(
            parse_answer("HTTPS p.corp:443").unwrap(),
            [Choice::Proxy {
                host: "p.corp".into(),
                port: 443,
                tls: true
            }]
        );
        assert!(parse_answer("SOCKS5 s:1")
            .unwrap_err()
            .contains("names no PROXY"));
        assert!(parse_answer("").is_err());
        assert_eq!(
            parse_answer("PROXY [::1]:3128").unwrap(),
            [proxy("::1", 3128)]
        );
    }

    #[test]
    fn the_standard_helpers_work() {
        let p = pac(r#"
            function FindProxyForURL(url, host) {
                if (isPlainHostName(host)) return "DIRECT";
                if (dnsDomainIs(host, ".internal.test") || shExpMatch(host, "*.local")) return "DIRECT";
                if (isInNet(host, "10.0.0.0", "255.0.0.0")) return "DIRECT";
                if (localHostOrDomainIs(host, "www.mozilla.org")) return "PROXY a:1";
                if (dnsDomainLevels(host) > 3) return "PROXY deep:1";
                if (url.substring(0, 6) == "https:") return "PROXY tls:3128; DIRECT";
                if (!weekdayRange("SUN", "SAT") || !timeRange(0, 24) ) return "PROXY never:1";
                if (dateRange(1, 31) && isResolvable("127.0.0.1") && myIpAddress() != "") return "PROXY up:3128; DIRECT";
                return "PROXY wrong:1";
            }"#);
        let find = |url: &str, host: &str| p.find(url, host).unwrap();
        assert_eq!(find("http://intranet/", "intranet"), [Choice::Direct]);
        assert_eq!(
            find("http://a.internal.test/", "a.internal.test"),
            [Choice::Direct]
        );
        assert_eq!(find("http://x.local/", "x.local"), [Choice::Direct]);
        assert_eq!(find("http://10.1.2.3/", "10.1.2.3"), [Choice::Direct]);
        assert_eq!(find("http://www/", "www.mozilla.org"), [proxy("a", 1)]);
        assert_eq!(find("http://a.b.c.d.e/", "a.b.c.d.e"), [proxy("deep", 1)]);
        assert_eq!(
            find("https://example.test/", "example.test"),
            [proxy("tls", 3128), Choice::Direct]
        );
        assert_eq!(
            find("http://example.test/", "example.test"),
            [proxy("up", 3128), Choice::Direct]
        );
    }

    #[test]
    fn bad_scripts_are_errors_that_say_so() {
        let e = Pac::from_script("x.pac", "function FindProxyForURL(".into()).unwrap_err();
        assert!(e.contains("x.pac does not load"), "{e}");
        let e = Pac::from_script("x.pac", "var a = 1;".into()).unwrap_err();
        assert!(e.contains("no function FindProxyForURL"), "{e}");
        let p = pac("function FindProxyForURL(u, h) { throw new Error('boom ' + h); }");
        let e = p.find("http://a/", "a").unwrap_err();
        assert!(e.contains("boom a"), "{e}");
        // A script that loops is stopped, and the next call runs.
        let p =
            pac("function FindProxyForURL(u, h) { if (h == 'loop') for (;;) {} return 'DIRECT'; }");
        let t = Instant::now();
        let e = p.find("http://loop/", "loop").unwrap_err();
        assert!(e.contains("ran over"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(4));
        assert_eq!(p.find("http://a/", "a").unwrap(), [Choice::Direct]);
        let p = pac(
            "function FindProxyForURL(u, h) { var a = []; for (;;) a.push(new Array(100000)); }",
        );
        assert!(p.find("http://a/", "a").is_err());
        let e = Pac::load("/nonexistent.pac").unwrap_err();
        assert!(e.contains("cannot read the PAC file"), "{e}");
    }
}
