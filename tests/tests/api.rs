//! The control API over its real socket, with curl (as users call it) and `ferry ctl`: every
//! endpoint, and the bad input each must refuse with the right status and a reason.
//! No guest is needed; ferry runs in a test namespace because publishing binds host ports.

use std::path::Path;
use std::process::Command;

use ferry_tests::{ferry_bin, FerryProcess, TestNet};
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
    expect_error(s, "PUT", "/proxy", Some("{}"), 400, "no \"upstream\"");
    expect_error(
        s,
        "PUT",
        "/proxy",
        Some(r#"{"upstream": "socks5://h:1"}"#),
        400,
        "only http:// proxies",
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
