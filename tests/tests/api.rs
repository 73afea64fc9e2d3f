//! The control API over its real socket, with curl (as users call it) and `ferry ctl`: every
//! endpoint, and the bad input each must refuse with the right status and a reason.
//! No guest is needed; ferry runs in a test namespace because publishing binds host ports.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::{ferry_bin, wait_for, wrapped, FerryProcess, TestNet};
use serde_json::Value;

/// `curl --unix-socket`: the status and the JSON body (Null when empty).
fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut c = Command::new("curl");
    c.args(["-sS", "-m", "10", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = c
        .arg(format!("http://ferry{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"))
    };
    (code.trim().parse().unwrap_or(0), value)
}

fn expect_error(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    status: u16,
    says: &str,
) {
    let (st, v) = api(sock, method, path, body);
    assert_eq!(st, status, "{method} {path} {body:?}: {v}");
    let msg = v["error"].as_str().unwrap_or("");
    assert!(
        msg.contains(says),
        "{method} {path} {body:?}: {msg:?} should say {says:?}"
    );
    assert!(
        v["hint"].as_str().is_some_and(|h| !h.is_empty()),
        "{method} {path}: an error says what to do: {v}"
    );
}

#[test]
fn every_endpoint_over_the_socket_with_bad_input() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let api_sock = dir.path().join("api.sock");
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let fs_sock = dir.path().join("fs.sock");
    let mut ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--share".into(),
            format!(
                "tag=data,dir={},socket={}",
                share.display(),
                fs_sock.display()
            ),
            "--api-socket".into(),
            api_sock.display().to_string(),
            "--default-bind".into(),
            "127.0.0.1".into(),
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
            "--pcap".into(),
            dir.path().join("c.pcap").display().to_string(),
        ],
        &[sock.clone(), api_sock.clone()],
    );
    let s = api_sock.as_path();

    let (st, v) = api(s, "GET", "/health", None);
    assert_eq!((st, v["status"].as_str()), (200, Some("ok")), "{v}");
    assert_eq!(v["guest_attached"], Value::Bool(false));
    let (st, v) = api(s, "GET", "/ports", None);
    assert_eq!((st, v.clone()), (200, Value::Array(vec![])), "{v}");

    // Publish by spec (the default bind applies) and by fields.
    let (st, v) = api(s, "POST", "/ports", Some(r#"{"spec": "18080:80"}"#));
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (
            v["proto"].as_str(),
            v["bind_ip"].as_str(),
            v["host_port"].as_u64(),
            v["guest_port"].as_u64()
        ),
        (Some("tcp"), Some("127.0.0.1"), Some(18080), Some(80))
    );
    let (st, v) = api(
        s,
        "POST",
        "/ports",
        Some(r#"{"proto": "udp", "bind_ip": "0.0.0.0", "host_port": 15353, "guest_port": 53}"#),
    );
    assert_eq!(st, 201, "{v}");
    let (_, v) = api(s, "GET", "/ports", None);
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");

    // Conflicts: published already, and a host port in use by someone else.
    expect_error(
        s,
        "POST",
        "/ports",
        Some(r#"{"spec": "18080:81"}"#),
        409,
        "published already",
    );
    // Malformed JSON and specs: 400 with the reason.
    expect_error(s, "POST", "/ports", Some("{bad"), 400, "not JSON");
    expect_error(s, "POST", "/ports", Some("[1, 2]"), 400, "JSON object");
    expect_error(
        s,
        "POST",
        "/ports",
        Some(r#"{"spec": "80"}"#),
        400,
        "HOST_PORT:GUEST_PORT",
    );
    expect_error(
        s,
        "POST",
        "/ports",
        Some(r#"{"spec": "sctp/1:1"}"#),
        400,
        "tcp or udp",
    );
    expect_error(
        s,
        "POST",
        "/ports",
        Some(r#"{"spec": 8080}"#),
        400,
        "must be a string",
    );
    expect_error(
        s,
        "POST",
        "/ports",
        Some(r#"{"proto": "tcp", "host_port": 70000, "guest_port": 80}"#),
        400,
        "1 to 65535",
    );
    expect_error(
        s,
        "POST",
        "/ports",
        Some(r#"{"host_port": 1}"#),
        400,
        "guest_port",
    );
    expect_error(
        s,
        "POST",
        "/ports",
        Some(r#"{"bind_ip": "nowhere", "host_port": 1, "guest_port": 1}"#),
        400,
        "IP address",
    );
    let big = format!(r#"{{"spec": "{}"}}"#, "x".repeat(70_000));
    expect_error(s, "POST", "/ports", Some(&big), 413, "64 KiB");

    // Unpublish: bad paths are 400, unknown ports 404, the real one 204 (then gone).
    expect_error(
        s,
        "DELETE",
        "/ports/sctp/0.0.0.0/1",
        None,
        400,
        "tcp or udp",
    );
    expect_error(s, "DELETE", "/ports/tcp/nowhere/1", None, 400, "not an IP");
    expect_error(
        s,
        "DELETE",
        "/ports/tcp/127.0.0.1/0",
        None,
        400,
        "1 to 65535",
    );
    expect_error(
        s,
        "DELETE",
        "/ports/tcp/127.0.0.1/1",
        None,
        404,
        "not published",
    );
    let (st, _) = api(s, "DELETE", "/ports/tcp/127.0.0.1/18080", None);
    assert_eq!(st, 204);
    expect_error(
        s,
        "DELETE",
        "/ports/tcp/127.0.0.1/18080",
        None,
        404,
        "not published",
    );

    // Wrong methods and paths.
    expect_error(s, "PUT", "/ports", Some("{}"), 405, "GET or POST");
    expect_error(s, "POST", "/health", Some("{}"), 405, "GET");
    expect_error(s, "GET", "/ports/tcp/127.0.0.1/1", None, 405, "DELETE");
    expect_error(s, "GET", "/nothing", None, 404, "no endpoint");

    // The proxy: shown, its upstream set and cleared, bad bodies refused with the reason.
    let (st, v) = api(s, "GET", "/proxy", None);
    assert_eq!((st, v["port"].as_u64()), (200, Some(3128)), "{v}");
    assert!(v["upstream"].is_null(), "{v}");
    let (st, v) = api(
        s,
        "PUT",
        "/proxy",
        Some(r#"{"upstream": "http://127.0.0.1:3129"}"#),
    );
    assert_eq!(
        (st, v["upstream"].as_str()),
        (200, Some("http://127.0.0.1:3129")),
        "{v}"
    );
    let (st, v) = api(s, "PUT", "/proxy", Some(r#"{"upstream": null}"#));
    assert!(st == 200 && v["upstream"].is_null(), "{v}");
    expect_error(s, "PUT", "/proxy", Some("not json"), 400, "not JSON");
    expect_error(s, "PUT", "/proxy", Some("{}"), 400, "none of \"upstream\"");
    // A bypass list and an upstream for tunnels only, set apart from the upstream.
    let (st, v) = api(
        s,
        "PUT",
        "/proxy",
        Some(
            r#"{"bypass": "localhost,.corp.example 10.0.0.0/8", "https_upstream": "http://alice@127.0.0.1:3130"}"#,
        ),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["bypass"], "localhost,.corp.example 10.0.0.0/8", "{v}");
    assert_eq!(v["https_upstream"], "http://alice@127.0.0.1:3130", "{v}");
    assert!(v["upstream"].is_null() && v["credentials"] == false, "{v}");
    assert_eq!(v["errors"]["auth"], 0, "{v}");
    expect_error(
        s,
        "PUT",
        "/proxy",
        Some(r#"{"bypass": "10.0.0.0/33"}"#),
        400,
        "bad bypass entry",
    );
    expect_error(
        s,
        "PUT",
        "/proxy",
        Some(r#"{"upstream": "http://u:pw@h:1"}"#),
        400,
        "--proxy-credentials",
    );
    expect_error(
        s,
        "PUT",
        "/proxy",
        Some(r#"{"upstream": "socks5://h:1"}"#),
        400,
        "only http:// and https:// proxies",
    );
    expect_error(s, "POST", "/proxy", Some("{}"), 405, "GET or PUT");

    // Rules: listed with the default policy, added (at a position), refused with the reason,
    // deleted by id.
    let (st, v) = api(s, "GET", "/rules", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rules"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["default"]["action"].as_str(), Some("allow"), "{v}");
    let (st, last) = api(
        s,
        "POST",
        "/rules",
        Some(r#"{"spec": "drop,proto=udp,to=10.0.0.0/8"}"#),
    );
    assert_eq!((st, last["position"].as_u64()), (201, Some(1)), "{last}");
    let (st, first) = api(
        s,
        "POST",
        "/rules",
        Some(r#"{"spec": "reject,proto=tcp,port=22", "position": 1}"#),
    );
    assert_eq!(
        (st, first["position"].as_u64(), first["spec"].as_str()),
        (201, Some(1), Some("reject,proto=tcp,port=22")),
        "{first}"
    );
    let (_, v) = api(s, "GET", "/rules", None);
    assert_eq!(v["rules"][1]["id"], last["id"], "{v}");
    assert_eq!(v["rules"][1]["to"].as_str(), Some("10.0.0.0/8"), "{v}");
    assert_eq!(v["rules"][1]["dir"].as_str(), Some("out"), "{v}");
    assert_eq!(v["default_in"]["action"].as_str(), Some("allow"), "{v}");
    // An inbound rule: listed with `from`, and deleted again.
    let (st, inbound) = api(
        s,
        "POST",
        "/rules",
        Some(r#"{"spec": "drop,dir=in,proto=tcp,from=10.9.0.0/16,port=8080"}"#),
    );
    assert_eq!(
        (
            st,
            inbound["dir"].as_str(),
            inbound["from"].as_str(),
            inbound["ports"].as_str()
        ),
        (201, Some("in"), Some("10.9.0.0/16"), Some("8080")),
        "{inbound}"
    );
    assert!(inbound["to"].is_null(), "{inbound}");
    // An IPv6 network, for the clients of a port published on [::].
    let (st, v6) = api(
        s,
        "POST",
        "/rules",
        Some(r#"{"spec": "reject,dir=in,from=2001:db8::/32"}"#),
    );
    assert_eq!(
        (st, v6["from"].as_str()),
        (201, Some("2001:db8::/32")),
        "{v6}"
    );
    let (st, _) = api(s, "DELETE", &format!("/rules/{}", v6["id"]), None);
    assert_eq!(st, 204);
    let (st, _) = api(s, "DELETE", &format!("/rules/{}", inbound["id"]), None);
    assert_eq!(st, 204);
    expect_error(
        s,
        "POST",
        "/rules",
        Some(r#"{"spec": "drop,from=10.0.0.0/8"}"#),
        400,
        "from= matches the clients of published ports; add dir=in",
    );
    // Zeroing answers with the table; only POST does it.
    let (st, v) = api(s, "POST", "/rules/zero", None);
    assert_eq!(
        (st, v["rules"].as_array().map(Vec::len)),
        (200, Some(2)),
        "{v}"
    );
    expect_error(s, "GET", "/rules/zero", None, 405, "takes POST");
    expect_error(
        s,
        "POST",
        "/rules",
        Some(r#"{"spec": "reject,port=22"}"#),
        400,
        "port= needs proto=tcp or proto=udp",
    );
    expect_error(s, "POST", "/rules", Some("{}"), 400, "no \"spec\"");
    expect_error(
        s,
        "POST",
        "/rules",
        Some(r#"{"spec": "drop", "position": 0}"#),
        400,
        "\"position\" must be a number from 1",
    );
    let gone = format!("/rules/{}", first["id"]);
    let (st, _) = api(s, "DELETE", &gone, None);
    assert_eq!(st, 204);
    expect_error(s, "DELETE", &gone, None, 404, "no rule has id");
    expect_error(s, "DELETE", "/rules/x", None, 400, "expected a number");
    expect_error(s, "PUT", "/rules", Some("{}"), 405, "GET or POST");
    let (st, _) = api(s, "DELETE", &format!("/rules/{}", last["id"]), None);
    assert_eq!(st, 204);

    // Stats: net and fs counters, open flows, and the ports.
    let (st, v) = api(s, "GET", "/stats", None);
    assert_eq!(st, 200, "{v}");
    assert!(
        v["net"]["tx_frames"].is_u64() && v["net"]["flows"].is_array(),
        "{v}"
    );
    assert_eq!(v["fs"][0]["tag"].as_str(), Some("data"), "{v}");
    assert!(v["fs"][0]["requests"].is_u64(), "{v}");
    // No guest yet: no requests by opcode either.
    assert_eq!(v["fs"][0]["ops"], serde_json::json!({}), "{v}");
    assert_eq!(v["ports"].as_array().map(Vec::len), Some(1), "{v}");
    // No guest yet: the capture holds its header only.
    let pcap = dir.path().join("c.pcap");
    assert_eq!(v["net"]["pcap"]["path"].as_str(), pcap.to_str(), "{v}");
    assert_eq!(v["net"]["pcap"]["frames"].as_u64(), Some(0), "{v}");
    assert_eq!(std::fs::metadata(&pcap).map(|m| m.len()).ok(), Some(24));

    // ferry ctl: --json is the API's JSON; a table otherwise; exit 1 with the API's reason.
    let ctl = |args: &[&str]| {
        Command::new(ferry_bin())
            .arg("ctl")
            .arg("--api-socket")
            .arg(s)
            .args(args)
            .output()
            .unwrap()
    };
    let o = ctl(&["--json", "ports"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("ctl --json prints JSON");
    assert_eq!(v[0]["host_port"].as_u64(), Some(15353));
    let o = ctl(&["ports"]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("PROTO") && t.contains("0.0.0.0:15353"), "{t}");
    let o = ctl(&["publish", "nonsense"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("HOST_PORT:GUEST_PORT"));
    let o = ctl(&["unpublish", "udp/15353"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = ctl(&["unpublish", "udp/15353"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not published"));
    let o = ctl(&["stats"]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("SHARE") && t.contains("capturing to"), "{t}");
    let o = Command::new(ferry_bin())
        .args(["ctl", "--api-socket"])
        .arg(dir.path().join("missing.sock"))
        .arg("health")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach ferry's control API"));

    // SIGTERM removes the API socket with the others.
    assert_eq!(ferry.terminate(), Some(0));
    assert!(
        !api_sock.exists(),
        "the API socket should be removed at exit"
    );
}

#[test]
fn without_a_net_device_publishing_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let fs_sock = dir.path().join("fs.sock");
    let api_sock = dir.path().join("api.sock");
    let _ferry = FerryProcess::serve(
        dir.path(),
        &[
            "--share".into(),
            format!(
                "tag=data,dir={},socket={}",
                share.display(),
                fs_sock.display()
            ),
            "--api-socket".into(),
            api_sock.display().to_string(),
        ],
        &[fs_sock, api_sock.clone()],
    );
    expect_error(
        &api_sock,
        "POST",
        "/ports",
        Some(r#"{"spec": "1:1"}"#),
        409,
        "no network device",
    );
    let (st, v) = api(&api_sock, "GET", "/stats", None);
    assert_eq!(st, 200);
    assert!(v["net"].is_null(), "{v}");
    assert!(v["proxy"].is_null(), "{v}");
    expect_error(&api_sock, "GET", "/proxy", None, 404, "no net device");
    expect_error(&api_sock, "GET", "/rules", None, 404, "no net device");
}

/// Shares added and removed at run time: what `POST /shares` refuses and why (the handed-over
/// socket missing, a folder outside `--runtime-shares`, a tag in use), one added with a socket
/// handed over as `ferry virtiofsd` does it, listed, and removed; a command-line share stays.
#[test]
fn shares_are_added_with_a_handed_over_socket_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("runtime");
    let inside = root.join("vm1");
    let outside = dir.path().join("elsewhere");
    for d in [&inside, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    let fs_sock = dir.path().join("fs.sock");
    let api_sock = dir.path().join("api.sock");
    let _ferry = FerryProcess::serve(
        dir.path(),
        &[
            "--share".into(),
            format!(
                "tag=data,dir={},socket={}",
                outside.display(),
                fs_sock.display()
            ),
            "--api-socket".into(),
            api_sock.display().to_string(),
            "--runtime-shares".into(),
            root.display().to_string(),
        ],
        &[fs_sock, api_sock.clone()],
    );
    let body = format!(r#"{{"dir": "{}"}}"#, inside.display());
    expect_error(&api_sock, "POST", "/shares", Some(&body), 400, "not one");
    expect_error(&api_sock, "POST", "/shares", Some("{}"), 400, "not a share");
    expect_error(
        &api_sock,
        "DELETE",
        "/shares/data",
        None,
        409,
        "command line",
    );
    expect_error(&api_sock, "DELETE", "/shares/nope", None, 404, "no share");
    // As ferry virtiofsd does: the listening socket rides with the request.
    let add = |d: &Path, sock: &str, tag: Option<&str>| {
        let l = std::os::unix::net::UnixListener::bind(dir.path().join(sock)).unwrap();
        let mut args = vec![
            "virtiofsd".to_string(),
            format!("--fd={}", 0),
            format!("--shared-dir={}", d.display()),
            format!("--api-socket={}", api_sock.display()),
        ];
        if let Some(t) = tag {
            args.push(format!("--tag={t}"));
        }
        let mut c = Command::new(ferry_tests::ferry_bin());
        c.args(&args)
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(l)))
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let outside_child = add(&outside, "o.sock", None).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&outside_child.stderr);
    assert_eq!(outside_child.status.code(), Some(1), "{err}");
    assert!(err.contains("--runtime-shares"), "{err}");
    let taken = add(&inside, "t.sock", Some("data"))
        .wait_with_output()
        .unwrap();
    assert!(String::from_utf8_lossy(&taken.stderr).contains("served already"));
    let mut front = add(&inside, "in.sock", Some("vm1"));
    let listed = ferry_tests::wait_for(std::time::Duration::from_secs(5), || {
        let (_, v) = api(&api_sock, "GET", "/shares", None);
        v.as_array()
            .and_then(|a| a.iter().find(|s| s["tag"] == "vm1").cloned())
    })
    .expect("the share added through ferry virtiofsd is listed");
    assert_eq!(listed["runtime"], true, "{listed}");
    assert_eq!(
        listed["socket"],
        dir.path().join("in.sock").display().to_string()
    );
    // SIGTERM: the front end removes the share and exits 0.
    // SAFETY: kill has no memory effects; the child is ours and not yet reaped.
    unsafe { libc::kill(front.id() as libc::pid_t, libc::SIGTERM) };
    assert!(front.wait().unwrap().success());
    let (_, v) = api(&api_sock, "GET", "/shares", None);
    let tags: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["tag"].as_str())
        .collect();
    assert_eq!(tags, vec!["data"], "{v}");
}

/// `ferry serve` with a net device and the API in `net`'s namespace (published ports bind on
/// 127.0.0.1 there); the API socket's path.
fn serve_api(net: &TestNet, dir: &Path) -> (FerryProcess, PathBuf) {
    let sock = dir.join("net.sock");
    let api_sock = dir.join("api.sock");
    let ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir,
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--api-socket".into(),
            api_sock.display().to_string(),
            "--default-bind".into(),
            "127.0.0.1".into(),
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
        ],
        &[sock, api_sock.clone()],
    );
    (ferry, api_sock)
}

/// A connection to the API socket that sends bytes as given: what curl would not send.
struct Raw {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(sock: &Path) -> Self {
        let s = UnixStream::connect(sock).expect("connect to the API socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s, buf: Vec::new() }
    }

    /// Sends `bytes`; a server that refused the request may have stopped reading, so a
    /// failed write is not an error here: the answer says what happened.
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    fn fill(&mut self) {
        let mut b = [0u8; 65536];
        let n = self.s.read(&mut b).expect("read an answer within 10 s");
        assert!(n > 0, "the API closed the connection before answering");
        self.buf.extend_from_slice(&b[..n]);
    }

    /// The next answer: its status, head and JSON body (Null when it has none).
    fn answer(&mut self) -> (u16, String, Value) {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill();
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let len = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while self.buf.len() < end + 4 + len {
            self.fill();
        }
        let body = &self.buf[end + 4..end + 4 + len];
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {head}"))
        };
        self.buf.drain(..end + 4 + len);
        (status, head, value)
    }

    /// Whether the API closed the connection after its last answer.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        let end = match self.s.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        self.buf.is_empty() && end
    }
}

/// Sends `bytes` on a connection of its own: the answer, after which the API must have
/// closed the connection.
fn refused_and_closed(sock: &Path, bytes: &[u8]) -> (u16, String, Value) {
    let mut c = Raw::connect(sock);
    c.send(bytes);
    let a = c.answer();
    assert!(c.closed(), "the API should close the connection: {}", a.1);
    a
}

/// An error answer: its status, and whether it has the API's shape with `says` in it.
fn assert_refused(a: (u16, String, Value), status: u16, says: &str) {
    let (st, head, v) = a;
    assert_eq!(st, status, "{head}\n{v}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains(says)),
        "{v} should say {says:?}"
    );
    assert!(v["hint"].as_str().is_some_and(|h| !h.is_empty()), "{v}");
}

/// Lets this test process hold thousands of connections.
fn raise_fd_limit() {
    // SAFETY: rlimit is plain data; getrlimit/setrlimit only read and write it.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
}

fn count(dir: String) -> usize {
    std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn hostile_clients_are_refused_and_cost_no_threads() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let (_ferry, api_sock) = serve_api(&net, dir.path());
    let s = api_sock.as_path();
    let (_, health) = api(s, "GET", "/health", None);
    let pid = health["pid"].as_u64().expect("health has the pid");

    // Request smuggling: Content-Length and Transfer-Encoding both, a request in the body.
    let smuggled = "POST /rules HTTP/1.1\r\nHost: ferry\r\nContent-Length: 30\r\n\r\n{\"spec\": \"drop,to=10.9.9.0/24\"}";
    for body in [smuggled.to_string(), format!("0\r\n\r\n{smuggled}")] {
        let req = format!(
            "POST /health HTTP/1.1\r\nHost: ferry\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
            body.len()
        );
        // Nothing is answered after the refusal: the connection is closed.
        assert_refused(
            refused_and_closed(s, req.as_bytes()),
            400,
            "both Transfer-Encoding and Content-Length",
        );
    }
    let (st, v) = api(s, "GET", "/rules", None);
    assert_eq!(st, 200);
    assert_eq!(v["rules"], serde_json::json!([]), "no rule was smuggled in");
    // Lengths that differ, chunked bodies and malformed request lines.
    let differ = b"POST /rules HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}";
    assert_refused(refused_and_closed(s, differ), 400, "differ");
    let chunked = b"POST /rules HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    assert_refused(refused_and_closed(s, chunked), 501, "Transfer-Encoding");
    assert_refused(refused_and_closed(s, b"HELLO\r\n\r\n"), 400, "malformed");

    // A 1 MB header line, 20,000 headers, 65 headers: 431, and the connection closed.
    let mut big = b"GET /health HTTP/1.1\r\nHost: ferry\r\nX-Big: ".to_vec();
    big.resize(big.len() + 1_000_000, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    assert_refused(refused_and_closed(s, &big), 431, "larger than 16 KiB");
    let many: String = (0..20_000).map(|i| format!("X-{i}: 1\r\n")).collect();
    let many = format!("GET /health HTTP/1.1\r\n{many}\r\n");
    assert_refused(
        refused_and_closed(s, many.as_bytes()),
        431,
        "larger than 16 KiB",
    );
    let many: String = (0..65).map(|i| format!("X-{i}: 1\r\n")).collect();
    let many = format!("GET /health HTTP/1.1\r\n{many}\r\n");
    assert_refused(refused_and_closed(s, many.as_bytes()), 431, "64 headers");

    // Keep-alive and pipelining: three requests in one write, answered in order, the
    // connection closed after the one that asks for it.
    let mut c = Raw::connect(s);
    c.send(
        b"GET /health HTTP/1.1\r\nHost: ferry\r\n\r\n\
          POST /rules HTTP/1.1\r\nHost: ferry\r\nContent-Length: 16\r\n\r\n{\"spec\": \"drop\"}\
          GET /rules HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n",
    );
    let (st, _, v) = c.answer();
    assert_eq!((st, v["status"].as_str()), (200, Some("ok")), "{v}");
    let (st, _, rule) = c.answer();
    assert_eq!(st, 201, "{rule}");
    let (st, head, v) = c.answer();
    assert_eq!((st, v["rules"][0]["id"].clone()), (200, rule["id"].clone()));
    assert!(head.contains("Connection: close"), "{head}");
    assert!(c.closed());
    drop(c);
    let (st, _) = api(s, "DELETE", &format!("/rules/{}", rule["id"]), None);
    assert_eq!(st, 204);

    // 2,000 idle connections at once: ferry holds them all on its one API thread, and
    // answers a new client as before.
    raise_fd_limit();
    let threads_before = count(format!("/proc/{pid}/task"));
    let idle: Vec<UnixStream> = (0..2000)
        .map(|_| UnixStream::connect(s).expect("connect an idle client"))
        .collect();
    let fds = wait_for(Duration::from_secs(10), || {
        let n = count(format!("/proc/{pid}/fd"));
        (n >= 2000).then_some(n)
    });
    assert!(fds.is_some(), "ferry should hold the 2,000 connections");
    let (st, v) = api(s, "GET", "/health", None);
    assert_eq!((st, v["status"].as_str()), (200, Some("ok")), "{v}");
    let threads = count(format!("/proc/{pid}/task"));
    assert!(
        threads < 16,
        "{threads} threads with 2,000 connections open ({threads_before} before)"
    );
    // Past 4,096 connections, a new one is answered 503 and closed; those open stay open.
    let mut more: Vec<UnixStream> = (0..2200)
        .map(|_| UnixStream::connect(s).expect("connect a client past the cap"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut refused = Vec::new();
    for c in &mut more {
        c.set_nonblocking(true).unwrap();
        let mut b = [0u8; 4096];
        if let Ok(n) = c.read(&mut b) {
            refused.push(b[..n].to_vec());
        }
    }
    assert!(
        (104..=106).contains(&refused.len()),
        "{} of 4,200 connections refused; 104 should be",
        refused.len()
    );
    let text = String::from_utf8_lossy(&refused[0]);
    assert!(
        text.starts_with("HTTP/1.1 503 ") && text.contains("4096 connections"),
        "{text}"
    );
    drop(more);
    drop(idle);
    let released = wait_for(Duration::from_secs(10), || {
        (count(format!("/proc/{pid}/fd")) < 100).then_some(())
    });
    assert!(released.is_some(), "ferry should close the connections");
    let (st, _) = api(s, "GET", "/health", None);
    assert_eq!(st, 200);
}

#[test]
fn publishing_stops_at_1024_ports() {
    const MAX_PORTS: u16 = 1024;
    const FIRST: u16 = 30000;
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let (_ferry, api_sock) = serve_api(&net, dir.path());
    let s = api_sock.as_path();

    // All the publish requests pipelined on one connection, written while the answers are
    // read: answered in order, and the one past the cap refused.
    let mut c = Raw::connect(s);
    let mut writer = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for port in FIRST..=FIRST + MAX_PORTS {
            let body = format!(r#"{{"spec": "{port}:80"}}"#);
            let req = format!(
                "POST /ports HTTP/1.1\r\nHost: ferry\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            writer.write_all(req.as_bytes()).unwrap();
        }
    });
    for port in FIRST..FIRST + MAX_PORTS {
        let (st, _, v) = c.answer();
        assert_eq!(
            (st, v["host_port"].as_u64()),
            (201, Some(port.into())),
            "{v}"
        );
    }
    assert_refused(
        c.answer(),
        409,
        "1024 ports are published, the most allowed; unpublish one first",
    );
    sender.join().unwrap();
    let o = Command::new(ferry_bin())
        .args(["ctl", "--api-socket"])
        .arg(s)
        .args(["publish", "127.0.0.1:40000:80"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("1024 ports are published") && err.contains("hint:"),
        "{err}"
    );

    // Unpublished again, one request after the other on the same connection.
    for port in FIRST..FIRST + MAX_PORTS {
        c.send(
            format!("DELETE /ports/tcp/127.0.0.1/{port} HTTP/1.1\r\nHost: ferry\r\n\r\n")
                .as_bytes(),
        );
        let (st, _, v) = c.answer();
        assert_eq!(st, 204, "{port}: {v}");
    }
    let (st, v) = api(s, "GET", "/ports", None);
    assert_eq!((st, v), (200, serde_json::json!([])));

    // ferry serve --publish past the cap exits 1 with the same words.
    let mut serve = wrapped(Some(&net.inner), None, &ferry_bin());
    serve.arg("serve").args([
        "--net-socket".to_string(),
        dir.path().join("net2.sock").display().to_string(),
        "--default-bind".into(),
        "127.0.0.1".into(),
    ]);
    for port in FIRST..=FIRST + MAX_PORTS {
        serve.args(["--publish".to_string(), format!("{port}:80")]);
    }
    let o = serve.output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("1024 ports are published"), "{err}");
}
