//! Guest end-to-end through the NAT, in a test network: ferry runs in a namespace with no
//! route out, and the "outside" is a test host on a veth link (198.18.0.0/15) running a UDP
//! echo server and a DNS server. Nothing leaves the namespaces the test made.

use std::process::Command;
use std::time::Duration;

use ferry_tests::{FerryProcess, GuestSpec, Qemu, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(180);

/// Waits for the guest to finish and asserts that its `want` checks all passed.
fn all_checks_pass(qemu: &mut Qemu, ferry: &FerryProcess, want: usize) {
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    let failed: Vec<_> = out.checks.iter().filter(|c| !c.ok).collect();
    assert!(
        failed.is_empty() && out.checks.len() == want,
        "{} checks, failed: {failed:#?}\nconsole:\n{}\nferry log:\n{}",
        out.checks.len(),
        ferry_tests::tail(&out.console, 40),
        ferry.log_tail()
    );
}

/// Runs `ferry ctl --api-socket API ARGS`: whether it succeeded, and what it printed.
fn ctl(api: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(ferry_tests::ferry_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run ferry ctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A ferry serving the net device (DNS upstream: the test host), the control API and the
/// tools share, in the test network's inner namespace.
struct Served {
    ferry: FerryProcess,
    sock: std::path::PathBuf,
    api: std::path::PathBuf,
    tools: std::path::PathBuf,
    tools_sock: std::path::PathBuf,
}

fn serve_with_api(net: &TestNet, dir: &std::path::Path, extra: &[String]) -> Served {
    let sock = dir.join("net.sock");
    let api = dir.join("api.sock");
    let t = ferry_tests::tools_share(dir);
    let mut args = vec![
        "--net-socket".into(),
        sock.display().to_string(),
        "--dns-upstream".into(),
        format!("{}:53", net.remote_addr),
        "--api-socket".into(),
        api.display().to_string(),
        "--share".into(),
        t.share.clone(),
    ];
    args.extend_from_slice(extra);
    let ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir,
        &args,
        &[sock.clone(), t.socket.clone(), api.clone()],
    );
    Served {
        ferry,
        sock,
        api,
        tools: t.dir.clone(),
        tools_sock: t.socket.clone(),
    }
}

/// Boots the guest on the net device `sock` with the tools share, running `script`.
fn boot_with_tools(
    dir: &std::path::Path,
    script: String,
    sock: std::path::PathBuf,
    tools_sock: std::path::PathBuf,
) -> Qemu {
    Qemu::boot(
        dir,
        &GuestSpec {
            script,
            net_socket: Some(sock),
            shares: vec![("tools".into(), tools_sock)],
            mac: Some("02:46:52:59:00:02".into()),
            ..Default::default()
        },
    )
}

/// Waits for the guest to touch `tools/name`, the mark of a step done.
fn guest_reaches(qemu: &Qemu, tools: &std::path::Path, name: &str) {
    let done = ferry_tests::wait_for(DEADLINE, || tools.join(name).exists().then_some(()));
    assert!(
        done.is_some(),
        "the guest never reached {name}; console:\n{}",
        ferry_tests::tail(&qemu.console(), 40)
    );
}

/// Writes `size` bytes of the pattern to `dir/pattern`; returns its sha256 and a guard value.
fn pattern_file(dir: &std::path::Path, size: usize) -> (String, ()) {
    let block: Vec<u8> = (0..256 * 1024).map(|i| ((i * 7 + 3) & 255) as u8).collect();
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        data.extend_from_slice(&block);
    }
    data.truncate(size);
    let f = dir.join("pattern");
    std::fs::write(&f, &data).unwrap();
    let out = Command::new("sha256sum").arg(&f).output().unwrap();
    let sha = String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap_or("")
        .to_string();
    (sha, ())
}

/// sha256 of `size` bytes of the test hosts' pattern, (i*7+3)&255 in 256 KiB blocks.
fn pattern_sha256(size: usize) -> String {
    let block: Vec<u8> = (0..256 * 1024).map(|i| ((i * 7 + 3) & 255) as u8).collect();
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        data.extend_from_slice(&block);
    }
    data.truncate(size);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pattern");
    std::fs::write(&f, &data).unwrap();
    let out = Command::new("sha256sum").arg(&f).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn udp_and_dns_through_the_nat() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let _remote_host = TestHost::start(
        &net.remote,
        &[
            &remote,
            "--echo",
            "7777",
            "--tcp-blob",
            "7000",
            "16777216",
            "--tcp-sha",
            "7001",
            "8388608",
            "--tcp-hold",
            "7004",
            "--dns",
            "53",
            &format!("remote.test={remote}"),
        ],
    );
    net.allow_ping_sockets();
    // The host side of the host alias: an echo, a blob, an HTTP server with a 64 MiB file,
    // and an upload sink, on the loopback of ferry's own namespace.
    let www = tempfile::tempdir().unwrap();
    let (big_sha, ()) = pattern_file(www.path(), 64 << 20);
    let www_dir = www.path().display().to_string();
    let _local_host = TestHost::start(
        &net.inner,
        &[
            "127.0.0.1",
            "--echo",
            "7778",
            "--tcp-blob",
            "7002",
            "16777216",
            "--tcp-sha",
            "7003",
            "67108864",
            "--http",
            "8080",
            &www_dir,
            "--tcp-echo",
            "7005",
        ],
    );
    let blob_sha = pattern_sha256(16 << 20);

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    // The probe reaches the guest through a share.
    let t = ferry_tests::tools_share(dir.path());
    let (tools, tools_sock) = (t.dir.clone(), t.socket.clone());
    let mut ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--dns-upstream".into(),
            format!("{remote}:53"),
            "--share".into(),
            t.share.clone(),
        ],
        &[sock.clone(), tools_sock.clone()],
    );
    // An address on the test link where no host answers.
    let nobody = {
        let mut parts: Vec<&str> = remote.split('.').collect();
        parts[3] = "77";
        parts.join(".")
    };
    let script = format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
P=/mnt/tools/probe
check udp-echo-remote "$($P udp {remote} 7777 100)" "100 SAME"
check udp-echo-host-alias "$($P udp 192.168.127.254 7778 100)" "100 SAME"
check udp-large-datagram "$($P udp {remote} 7777 65000)" "65000 SAME"
# A burst with no pause between datagrams: the device polls the TX queue instead of waiting
# for kicks, and the last datagrams must not wait for a kick that never comes.
check udp-burst-host-alias "$($P udpburst 192.168.127.254 7778 200)" "200 of 200"
check dns-upstream-name "$(nslookup -type=A remote.test 2>&1 | awk '/^Address/ {{a=$2}} END {{print a}}')" {remote}
nslookup missing.test > /tmp/ns 2>&1
check dns-upstream-nxdomain "$(grep -q NXDOMAIN /tmp/ns && echo 1)" 1
check ping-remote "$(ping -c 2 -W 2 {remote} 2>&1 | grep -c 'bytes from {remote}')" 2
check ping-nobody "$(ping -c 1 -W 1 {nobody} 2>&1 | grep -c 'bytes from')" 0
# TCP: downloads from the remote host and from the host's loopback (host alias), an upload,
# and a closed port refused at once.
nc {remote} 7000 > /tmp/blob; check tcp-download-remote "$(sha256sum /tmp/blob | cut -d' ' -f1)" {blob_sha}
nc 192.168.127.254 7002 > /tmp/blob2; check tcp-download-host-alias "$(sha256sum /tmp/blob2 | cut -d' ' -f1)" {blob_sha}
head -c 8388608 /dev/urandom > /tmp/up
check tcp-upload "$(nc {remote} 7001 < /tmp/up)" "$(sha256sum /tmp/up | cut -d' ' -f1)"
t0=$(cut -d' ' -f1 /proc/uptime); nc {remote} 9 < /dev/null > /tmp/refused 2>&1; t1=$(cut -d' ' -f1 /proc/uptime)
# 64 MiB by HTTP from the host's loopback, by name, and 64 MiB uploaded to it.
wget -q -O /tmp/big http://host.ferry.internal:8080/pattern
check http-64m-host-by-name "$(sha256sum /tmp/big | cut -d' ' -f1)" {big_sha}
rm /tmp/big
head -c 67108864 /dev/urandom > /tmp/up64
check tcp-upload-64m-host "$(nc host.ferry.internal 7003 < /tmp/up64)" "$(sha256sum /tmp/up64 | cut -d' ' -f1)"
rm /tmp/up64
# 1000 connections at once to a server on the host, all answered.
ulimit -n 8192
touch /mnt/tools/many-start; sleep 2
check tcp-1000-concurrent "$($P tcpmany 192.168.127.254 7005 1000)" "1000 of 1000"
touch /mnt/tools/many-done
# A connection held open while the host checks who owns its socket.
sleep 60 | nc {remote} 7004 > /dev/null &
held=$!
touch /mnt/tools/holding
i=0; while [ ! -e /mnt/tools/checked ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
kill $held 2>/dev/null
check tcp-refused "$(grep -c 'refused' /tmp/refused) $(echo "$t1 $t0" | awk '{{print ($1 - $2) < 1}}')" "1 1"
check dns-over-tcp "$($P dnstcp 192.168.127.1 remote.test)" {remote}
check dns-local-still "$(nslookup -type=A host.ferry.internal 2>&1 | awk '/^Address/ {{a=$2}} END {{print a}}')" 192.168.127.254
"#
    );
    let mut qemu = Qemu::boot(
        dir.path(),
        &GuestSpec {
            script,
            net_socket: Some(sock),
            shares: vec![("tools".into(), tools_sock)],
            mac: Some("02:46:52:59:00:02".into()),
            memory_mib: 512,
            ..Default::default()
        },
    );
    // After 1000 connections, ferry's descriptors come back to where they were.
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    ferry_tests::wait_for(DEADLINE, || tools.join("many-start").exists().then_some(()));
    let before = fds(ferry.serving_pid());
    ferry_tests::wait_for(DEADLINE, || tools.join("many-done").exists().then_some(()));
    let after = ferry_tests::wait_for(Duration::from_secs(20), || {
        let n = fds(ferry.serving_pid());
        // A few new file nodes on the share are fine; a leak would be ~1000.
        (n <= before + 16).then_some(n)
    });
    assert!(
        after.is_some(),
        "ferry's descriptors grew from {before} to {} after 1000 connections",
        fds(ferry.serving_pid())
    );
    // While the guest holds a connection to the test host, the host-side socket is ferry's.
    let holding = ferry_tests::wait_for(DEADLINE, || tools.join("holding").exists().then_some(()));
    let ss = holding.map(|_| {
        let out = TestNet::command(&net.inner, "ss")
            .args(["-tnp"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    std::fs::write(tools.join("checked"), b"").unwrap();
    let ss = ss.unwrap_or_else(|| {
        panic!(
            "the guest never held its connection; console:\n{}",
            ferry_tests::tail(&qemu.console(), 40)
        )
    });
    let line = ss
        .lines()
        .find(|l| l.contains(&format!("{remote}:7004")))
        .unwrap_or_else(|| panic!("no socket to {remote}:7004 in ss -tnp:\n{ss}"));
    assert!(
        line.contains(&format!("pid={},", ferry.serving_pid())),
        "the socket to the test host is not ferry's (pid {}): {line}",
        ferry.serving_pid()
    );
    all_checks_pass(&mut qemu, &ferry, 17);
    assert!(ferry.is_running());
}

/// The HTTP(S) proxy on the gateway's port 3128, from the guest: plain requests and CONNECT
/// tunnels to a remote test host, its errors, and an upstream proxy set while the guest runs.
#[test]
fn http_proxy_on_the_gateway() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("hello.txt"), "hello from remote\n").unwrap();
    let (big_sha, ()) = pattern_file(www.path(), 16 << 20);
    let www_dir = www.path().display().to_string();
    let _remote_host = TestHost::start(
        &net.remote,
        &[
            &remote,
            "--http",
            "8080",
            &www_dir,
            "--tcp-echo",
            "7005",
            "--fake-proxy",
            "3129",
            "--dns",
            "53",
        ],
    );

    let dir = tempfile::tempdir().unwrap();
    let Served {
        ferry,
        sock,
        api,
        tools,
        tools_sock,
    } = serve_with_api(&net, dir.path(), &[]);
    let script = format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
PX=http://192.168.127.1:3128
check proxy-http "$(http_proxy=$PX wget -q -O - http://{remote}:8080/hello.txt)" "hello from remote"
check proxy-http-by-docker-name "$(http_proxy=http://http.docker.internal:3128 wget -q -O - http://{remote}:8080/hello.txt)" "hello from remote"
http_proxy=$PX wget -q -O /tmp/big http://{remote}:8080/pattern
check proxy-http-16m "$(sha256sum /tmp/big | cut -d' ' -f1)" {big_sha}
# A tunnel: the proxy's answer, then the echo server's bytes.
printf 'CONNECT {remote}:7005 HTTP/1.1\r\nHost: {remote}:7005\r\n\r\nthrough the tunnel\n' | nc -w 3 192.168.127.1 3128 > /tmp/t
check proxy-connect "$(head -1 /tmp/t | tr -d '\r') / $(grep -c 'through the tunnel' /tmp/t)" "HTTP/1.1 200 Connection established / 1"
check proxy-not-a-proxy-request "$(printf 'GET / HTTP/1.1\r\nHost: x\r\n\r\n' | nc -w 3 192.168.127.1 3128 | head -1 | tr -d '\r')" "HTTP/1.1 400 Bad Request"
check proxy-refused-server "$(printf 'GET http://{remote}:9/ HTTP/1.1\r\n\r\n' | nc -w 3 192.168.127.1 3128 | head -1 | tr -d '\r')" "HTTP/1.1 502 Bad Gateway"
# The host sets an upstream proxy now; requests and tunnels go to it as they came.
touch /mnt/tools/direct-done
i=0; while [ ! -e /mnt/tools/upstream-set ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
check proxy-via-upstream "$(http_proxy=$PX wget -q -O - "http://198.51.100.7/x?y=1")" "upstream saw: GET http://198.51.100.7/x?y=1 HTTP/1.1"
printf 'CONNECT 198.51.100.7:443 HTTP/1.1\r\n\r\nvia upstream\n' | nc -w 3 192.168.127.1 3128 > /tmp/u
check proxy-connect-via-upstream "$(head -1 /tmp/u | tr -d '\r') / $(grep -c 'via upstream' /tmp/u)" "HTTP/1.1 200 Connection established / 1"
"#
    );
    let mut qemu = boot_with_tools(dir.path(), script, sock, tools_sock);
    let ctl = |args: &[&str]| ctl(&api, args);
    guest_reaches(&qemu, &tools, "direct-done");
    // Before the upstream: 3 requests (and 2 refused), 1 tunnel, straight to servers.
    let (ok, shown) = ctl(&["proxy"]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains("to servers directly; 3 requests, 1 tunnels, 2 failed"),
        "{shown}"
    );
    let (ok, refused) = ctl(&["proxy", "set", "socks5://nowhere:1"]);
    assert!(
        !ok && refused.contains("only http:// and https:// proxies"),
        "{refused}"
    );
    let (ok, set) = ctl(&["proxy", "set", &format!("http://{remote}:3129")]);
    assert!(
        ok && set.contains(&format!("through http://{remote}:3129")),
        "{set}"
    );
    std::fs::write(tools.join("upstream-set"), b"").unwrap();

    all_checks_pass(&mut qemu, &ferry, 8);
    let (ok, stats) = ctl(&["--json", "stats"]);
    assert!(ok, "{stats}");
    let v: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    assert_eq!(v["proxy"]["requests"], 4, "{stats}");
    assert_eq!(v["proxy"]["tunnels"], 2, "{stats}");
    let (ok, cleared) = ctl(&["proxy", "clear"]);
    assert!(ok && cleared.contains("to servers directly"), "{cleared}");
}

#[test]
fn rules_refuse_flows_and_count_them() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("hello.txt"), "hello from remote\n").unwrap();
    let www_dir = www.path().display().to_string();
    let _remote_host = TestHost::start(
        &net.remote,
        &[
            &remote,
            "--echo",
            "7777",
            "--echo",
            "7778",
            "--tcp-blob",
            "7000",
            "1048576",
            "--tcp-echo",
            "7005",
            "--tcp-echo",
            "7006",
            "--http",
            "8080",
            &www_dir,
            "--dns",
            "53",
        ],
    );
    net.allow_ping_sockets();

    let dir = tempfile::tempdir().unwrap();
    let rules: Vec<String> = [
        format!("reject,proto=tcp,to={remote}/32,port=7005"),
        format!("drop,proto=tcp,to={remote},port=7006"),
        format!("reject,proto=udp,to={remote},port=7777"),
        "drop,proto=icmp".into(),
        format!("allow,proto=tcp,to={remote},port=7000"),
        "reject,proto=tcp,to=192.168.127.254".into(),
    ]
    .into_iter()
    .flat_map(|r| ["--rule".to_string(), r])
    .collect();
    let Served {
        ferry,
        sock,
        api,
        tools,
        tools_sock,
    } = serve_with_api(&net, dir.path(), &rules);
    let script = format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
P=/mnt/tools/probe
check reject-tcp "$($P connect {remote} 7005 3000)" errno:ECONNREFUSED
check drop-tcp "$($P connect {remote} 7006 1500)" timeout
check reject-udp "$($P udp {remote} 7777 100)" errno:ECONNREFUSED
check default-allows-udp "$($P udp {remote} 7778 100)" "100 SAME"
check drop-icmp "$(ping -c 2 -W 1 {remote} 2>&1 | grep -c 'bytes from')" 0
check allow-tcp "$(nc {remote} 7000 | wc -c)" 1048576
check default-allows-http "$(wget -q -O - http://{remote}:8080/hello.txt)" "hello from remote"
check proxy-obeys-rules "$(http_proxy=http://192.168.127.1:3128 wget -q -O - http://{remote}:7005/ 2>&1 | grep -c '403')" 1
# The host's loopback is the host alias, through the NAT and through the proxy.
check reject-host-alias "$($P connect 192.168.127.254 22 3000)" errno:ECONNREFUSED
check proxy-host-loopback "$(printf 'CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n' | nc -w 3 192.168.127.1 3128 | head -1 | tr -d '\r')" "HTTP/1.1 403 Forbidden"
# The host changes the rules while the guest runs: 7005 opens, 7000 closes.
touch /mnt/tools/phase1-done
i=0; while [ ! -e /mnt/tools/rules-changed ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
check deleted-rule-opens "$($P connect {remote} 7005 3000)" connected
check added-rule-refuses "$($P connect {remote} 7000 3000)" errno:ECONNREFUSED
"#
    );
    let mut qemu = boot_with_tools(dir.path(), script, sock, tools_sock);
    guest_reaches(&qemu, &tools, "phase1-done");
    let rules = |api: &std::path::Path| {
        let (ok, out) = ctl(api, &["--json", "rules"]);
        assert!(ok, "{out}");
        serde_json::from_str::<serde_json::Value>(&out).expect("rules JSON")
    };
    let v = rules(&api);
    let r = &v["rules"];
    let counts = |i: usize| {
        (
            r[i]["packets"].as_u64().unwrap(),
            r[i]["bytes"].as_u64().unwrap(),
        )
    };
    // The guest's connect and the proxy's, each refused once (RST: no retransmits).
    assert_eq!(counts(0).0, 2, "{v}");
    // A dropped SYN comes again: at least the first, and what the guest retried.
    assert!(counts(1).0 >= 1 && counts(1).1 >= 60, "{v}");
    // One datagram refused: its IP packet, 28 + 100 bytes.
    assert_eq!(counts(2), (1, 128), "{v}");
    // Two echo requests.
    assert_eq!(counts(3).0, 2, "{v}");
    // One connection let through, carrying the 1 MiB blob.
    assert_eq!(counts(4).0, 1, "{v}");
    assert!(counts(4).1 >= 1 << 20, "{v}");
    // The host alias: the guest's connect and the proxy's CONNECT to 127.0.0.1.
    assert_eq!(counts(5).0, 2, "{v}");
    // The default policy: the UDP flow to 7778 (200 bytes) and the HTTP connection.
    let d = &v["default"];
    assert!(d["packets"].as_u64().unwrap() >= 2, "{v}");
    assert!(d["bytes"].as_u64().unwrap() >= 200 + 18, "{v}");
    // The table, as people read it.
    let (ok, table) = ctl(&api, &["rules"]);
    assert!(ok, "{table}");
    assert!(table.starts_with("#  ID  PACKETS  BYTES"), "{table}");
    assert!(
        table.contains("(default: flows no rule matches)"),
        "{table}"
    );

    let first = r[0]["id"].as_u64().unwrap().to_string();
    let (ok, out) = ctl(&api, &["rules", "delete", &first]);
    assert!(
        ok && out.contains(&format!("deleted rule {first}")),
        "{out}"
    );
    let (ok, out) = ctl(&api, &["rules", "delete", &first]);
    assert!(!ok && out.contains("no rule has id"), "{out}");
    let (ok, out) = ctl(&api, &["rules", "add", "reject,proto=tcp,port=0"]);
    assert!(!ok && out.contains("port=0: expected a port"), "{out}");
    let spec = format!("reject,proto=tcp,to={remote}/32,port=7000");
    let (ok, out) = ctl(&api, &["rules", "add", &spec, "--at", "1"]);
    assert!(ok && out.contains("at position 1"), "{out}");
    std::fs::write(tools.join("rules-changed"), b"").unwrap();

    all_checks_pass(&mut qemu, &ferry, 12);
    let v = rules(&api);
    assert_eq!(v["rules"][0]["spec"].as_str(), Some(spec.as_str()), "{v}");
    assert_eq!(v["rules"][0]["packets"], 1, "{v}");
}
