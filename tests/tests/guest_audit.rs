//! The audit log of a guest session, end to end: what the guest did is what the log says.
//!
//! The guest fetches a page from a test host (a flow opened and closed), tries a server a
//! `reject` rule refuses (a refusal), fetches through the gateway's HTTP proxy (a proxy
//! request), serves a page that a host client fetches through a published port (a published
//! flow), and writes, renames and chmods files in an `audit=files` share (file events). The
//! test reads `--audit-log`, checks every line against the schema of docs/audit.md, and
//! finds exactly the expected events. `ferry ctl events`, started before the guest's last
//! connection, shows that connection's open and close within 100 ms of when the server saw
//! them (both on the host's clock). `ferry ctl pcap | tcpdump -r -` shows the guest's frames
//! while it serves a published port, with two captures at once and a third whose client
//! never reads.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_tests::{ferry_bin, serve_and_boot, FerryProcess, ServedGuest, TestHost, TestNet};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(180);
const HOST_PAGE: &str = "hello from the remote host";
const GUEST_PAGE: &str = "hello from the guest";

fn script(remote: &str, refused: &str) -> String {
    format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
step() {{ echo "FERRY-STEP $1"; i=0; while [ ! -e /mnt/tools/go-$1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; }}
check fetch "$(wget -q -O - http://{remote}:8080/ 2>&1)" '{HOST_PAGE}'
wget -q -O /dev/null http://{refused}:8080/ 2>/dev/null
check refused "$?" 1
check proxy "$(http_proxy=http://192.168.127.1:3128 wget -q -O - http://{remote}:8080/ 2>&1)" '{HOST_PAGE}'
mkdir -p /www && echo '{GUEST_PAGE}' > /www/index.html
httpd -p 80 -h /www
echo one > /mnt/data/a.txt
mv /mnt/data/a.txt /mnt/data/b.txt
chmod 600 /mnt/data/b.txt
mkdir /mnt/data/d
rm /mnt/data/b.txt
sync
step 1
echo bye | nc {remote} 7100
step 2
"#
    )
}

/// The fields each event has, by kind, as docs/audit.md lists them (besides ts and event).
fn schema(event: &str) -> &'static [&'static str] {
    match event {
        "flow_open" => &[
            "proto",
            "origin",
            "guest",
            "remote",
            "fd",
            "host_local",
            "host_peer",
            "state",
        ],
        "flow_close" => &[
            "proto",
            "origin",
            "guest",
            "remote",
            "fd",
            "host_local",
            "host_peer",
            "reason",
            "duration_secs",
            "to_guest_bytes",
            "from_guest_bytes",
            "to_guest_packets",
            "from_guest_packets",
        ],
        "flow_refused" => &["proto", "dir", "from", "to", "action", "rule"],
        "port_published" | "port_unpublished" => &["proto", "host", "guest_port"],
        "socket_forwarded" => &["path", "guest_port", "mode"],
        "socket_unforwarded" => &["path"],
        "guest_attached" | "guest_detached" => &[],
        "proxy_request" => &["method", "host", "upstream", "status", "result"],
        "file" => &["share", "op", "path", "uid", "gid", "pid"],
        other => panic!("an event the schema does not know: {other}"),
    }
}

fn check_schema(e: &Value) {
    let obj = e.as_object().expect("each line is a JSON object");
    assert!(obj["ts"].as_f64().is_some_and(|t| t > 1.7e9), "{e}");
    let kind = obj["event"].as_str().expect("event is a string");
    for f in schema(kind) {
        assert!(obj.contains_key(*f), "{kind} lacks {f}: {e}");
    }
}

/// Fetches the guest's page through the published port `n` times; how long that took.
fn fetch_published(net: &TestNet, n: usize) -> Duration {
    let t = std::time::Instant::now();
    for _ in 0..n {
        let o = TestNet::command(&net.inner, "curl")
            .args(["-sS", "-m", "20", "http://127.0.0.1:18080/"])
            .output()
            .expect("run curl");
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), GUEST_PAGE);
    }
    t.elapsed()
}

/// `ferry ctl pcap | tcpdump -r -` while the guest serves: two captures at once each get
/// their frames, and one whose client never reads does not slow the guest.
fn captures_on_demand(net: &TestNet, api: &std::path::Path) {
    let pcap = |args: &[&str]| {
        let mut c = Command::new(ferry_bin());
        c.args(["ctl", "--api-socket"])
            .arg(api)
            .arg("pcap")
            .args(args);
        c.stdout(Stdio::piped())
            .spawn()
            .expect("run ferry ctl pcap")
    };
    let tcpdump = |child: std::process::Child| {
        let o = Command::new("tcpdump")
            .args(["-n", "-r", "-"])
            .stdin(child.stdout.unwrap())
            .stderr(Stdio::null())
            .output()
            .expect("run tcpdump (scripts/install-deps.sh installs it)");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let baseline = fetch_published(net, 10);
    // Two captures at once: every frame, and the guest's web server's TCP only.
    let all = pcap(&["--count", "20"]);
    let web = pcap(&["--proto", "tcp", "--port", "80", "--count", "6"]);
    // A client that asks for a capture and never reads: its queue fills and drops.
    let mut stalled = std::os::unix::net::UnixStream::connect(api).unwrap();
    std::io::Write::write_all(&mut stalled, b"GET /pcap HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let with_captures = fetch_published(net, 10);
    let all = tcpdump(all);
    assert_eq!(all.lines().count(), 20, "{all}");
    assert!(
        all.contains("192.168.127.2.80"),
        "the guest's web server's frames: {all}"
    );
    let web = tcpdump(web);
    assert_eq!(web.lines().count(), 6, "{web}");
    assert!(
        web.lines().all(|l| l.contains(" IP") && l.contains(".80")),
        "{web}"
    );
    // The stalled reader costs the guest nothing that shows.
    assert!(
        with_captures < baseline * 3 + Duration::from_secs(2),
        "10 fetches took {with_captures:?} with a stalled capture running, {baseline:?} before"
    );
    drop(stalled);
}

#[test]
fn the_audit_log_says_what_the_guest_did() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let refused = net.add_remote_addr(3);
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), format!("{HOST_PAGE}\n")).unwrap();
    let _http = TestHost::start(
        &net.remote,
        &[
            &net.remote_addr,
            "--http",
            "8080",
            &www.display().to_string(),
        ],
    );
    // A server that says on the host's clock when a connection came and when it ended.
    let times = Arc::new(Mutex::new(Vec::<(String, f64)>::new()));
    let mut server = TestNet::command(&net.remote, "python3")
        .stderr(Stdio::null())
        .args([
            "-c",
            "import socket,sys,time\n\
             s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind((sys.argv[1], 7100)); s.listen(4); print('ready', flush=True)\n\
             c,_=s.accept(); print('accept', time.time(), flush=True)\n\
             while c.recv(100): pass\n\
             print('eof', time.time(), flush=True); c.close()\n",
            &net.remote_addr,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the timing server");
    // Killed however the test ends: it would hold the test's output open.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server_stdout = server.stdout.take().unwrap();
    let _server = Killed(server);
    let mut server_out = BufReader::new(server_stdout);
    let mut line = String::new();
    server_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    {
        let times = times.clone();
        std::thread::spawn(move || {
            for l in server_out.lines().map_while(Result::ok) {
                let mut w = l.split_whitespace();
                if let (Some(k), Some(t)) = (w.next(), w.next().and_then(|t| t.parse().ok())) {
                    times.lock().unwrap().push((k.to_string(), t));
                }
            }
        });
    }

    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let data_sock = dir.path().join("data.sock");
    let log = dir.path().join("audit.log");
    let ServedGuest {
        ferry,
        mut qemu,
        tools: t,
        api,
    } = serve_and_boot(
        &net.inner,
        dir.path(),
        script(&net.remote_addr, &refused),
        &[
            "--audit-log".into(),
            log.display().to_string(),
            "--rule".into(),
            format!("reject,proto=tcp,to={refused}/32"),
            "--publish".into(),
            "127.0.0.1:18080:80".into(),
            "--share".into(),
            format!(
                "tag=data,dir={},socket={},audit=files",
                data.display(),
                data_sock.display()
            ),
        ],
        std::slice::from_ref(&data_sock),
        vec![("data".into(), data_sock.clone())],
    );
    let fail = |e: String, ferry: &FerryProcess| panic!("{e}\nferry log:\n{}", ferry.log_tail());
    if let Err(e) = qemu.wait_console("FERRY-STEP 1", DEADLINE) {
        fail(e, &ferry);
    }
    // A published port's client.
    let page = TestNet::command(&net.inner, "curl")
        .args(["-sS", "-m", "20", "http://127.0.0.1:18080/"])
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&page.stdout).trim(), GUEST_PAGE);
    captures_on_demand(&net, &api);
    // Follow the events, then let the guest make its last connection.
    let mut follower = Command::new(ferry_bin())
        .args(["ctl", "--api-socket"])
        .arg(&api)
        .arg("events")
        .stdout(Stdio::piped())
        .spawn()
        .expect("run ferry ctl events");
    let follower_stdout = follower.stdout.take().unwrap();
    let _follower = Killed(follower);
    let followed = Arc::new(Mutex::new(Vec::<Value>::new()));
    {
        let followed = followed.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(follower_stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str(&l) {
                    followed.lock().unwrap().push(v);
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(t.dir.join("go-1"), b"").unwrap();
    if let Err(e) = qemu.wait_console("FERRY-STEP 2", DEADLINE) {
        fail(e, &ferry);
    }
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(t.dir.join("go-2"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(3, &format!("ferry log:\n{}", ferry.log_tail()));

    // ferry ctl events: the last connection's open and close, within 100 ms of the server's
    // accept and end of file.
    let times = times.lock().unwrap().clone();
    let at = |k: &str| times.iter().find(|(n, _)| n == k).map(|(_, t)| *t);
    let (accepted, eof) = (
        at("accept").expect("the server's accept"),
        at("eof").expect("the server's eof"),
    );
    let followed = followed.lock().unwrap().clone();
    let to_7100 = |e: &&Value| e["remote"] == format!("{}:7100", net.remote_addr);
    let open = followed
        .iter()
        .filter(|e| e["event"] == "flow_open")
        .find(to_7100)
        .unwrap_or_else(|| panic!("no flow_open followed: {followed:#?}"));
    let close = followed
        .iter()
        .filter(|e| e["event"] == "flow_close")
        .find(to_7100)
        .unwrap_or_else(|| panic!("no flow_close followed: {followed:#?}"));
    let open_gap = (open["ts"].as_f64().unwrap() - accepted).abs();
    let close_gap = (close["ts"].as_f64().unwrap() - eof).abs();
    assert!(
        open_gap < 0.1,
        "flow_open {open_gap:.3} s from the server's accept"
    );
    assert!(
        close_gap < 0.1,
        "flow_close {close_gap:.3} s from the server's eof"
    );

    // The log: every line in the schema, and the expected events.
    drop(ferry);
    let text = std::fs::read_to_string(&log).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for e in &events {
        check_schema(e);
    }
    let count = |pred: &dyn Fn(&Value) -> bool| events.iter().filter(|e| pred(e)).count();
    let dump = || text.clone();
    let remote_8080 = format!("{}:8080", net.remote_addr);
    assert_eq!(
        count(&|e| e["event"] == "port_published" && e["host"] == "127.0.0.1:18080"),
        1,
        "{}",
        dump()
    );
    assert_eq!(count(&|e| e["event"] == "guest_attached"), 1, "{}", dump());
    // The direct fetch: opened and closed once, with the page's bytes.
    let direct = |e: &Value| e["origin"] == "outbound" && e["remote"] == remote_8080;
    assert_eq!(
        count(&|e| e["event"] == "flow_open" && direct(e)),
        1,
        "{}",
        dump()
    );
    let closes: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "flow_close" && direct(e))
        .collect();
    assert_eq!(closes.len(), 1, "{}", dump());
    assert!(closes[0]["to_guest_bytes"].as_u64().unwrap() > HOST_PAGE.len() as u64);
    // Its segments: at least SYN-ACK, the answer and FIN to the guest; SYN, the request,
    // an ACK and FIN from it.
    assert!(
        closes[0]["to_guest_packets"].as_u64().unwrap() >= 3
            && closes[0]["from_guest_packets"].as_u64().unwrap() >= 4,
        "{}",
        closes[0]
    );
    assert_eq!(closes[0]["reason"], "closed");
    // The refusal, by the rule.
    let refusals: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "flow_refused")
        .collect();
    assert_eq!(refusals.len(), 1, "{}", dump());
    assert_eq!(refusals[0]["to"], format!("{refused}:8080"));
    assert_eq!(
        (refusals[0]["action"].as_str(), refusals[0]["rule"].as_u64()),
        (Some("reject"), Some(1))
    );
    // The proxy request and its flow.
    let proxied: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "proxy_request")
        .collect();
    assert_eq!(proxied.len(), 1, "{}", dump());
    assert_eq!(
        (
            proxied[0]["method"].as_str(),
            proxied[0]["host"].as_str(),
            proxied[0]["result"].as_str()
        ),
        (Some("GET"), Some(remote_8080.as_str()), Some("relayed"))
    );
    assert_eq!(
        count(&|e| e["event"] == "flow_open" && e["origin"] == "proxy"),
        1,
        "{}",
        dump()
    );
    // The published port's clients: one, then twice ten while captures ran; each closed.
    let published = |e: &Value| e["origin"] == "published" && e["host_local"] == "127.0.0.1:18080";
    assert_eq!(
        count(&|e| e["event"] == "flow_open" && published(e)),
        21,
        "{}",
        dump()
    );
    assert_eq!(
        count(&|e| e["event"] == "flow_close" && published(e)),
        21,
        "{}",
        dump()
    );
    // The files, in order.
    let files: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["event"] == "file" && e["share"] == "data")
        .map(|e| {
            (
                e["op"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("create", "/a.txt"),
        ("rename", "/a.txt"),
        ("setattr", "/b.txt"),
        ("create", "/d"),
        ("unlink", "/b.txt"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(files, want, "{}", dump());
    let rename = events.iter().find(|e| e["op"] == "rename").unwrap();
    assert_eq!(rename["to"], "/b.txt");
    let chmod = events.iter().find(|e| e["op"] == "setattr").unwrap();
    assert_eq!(chmod["mode"], "0600");
    assert_eq!(chmod["uid"], 0, "the guest's root did it");
    // ferry stopped: the guest's leaving was logged.
    assert_eq!(count(&|e| e["event"] == "guest_detached"), 1, "{}", dump());
}
