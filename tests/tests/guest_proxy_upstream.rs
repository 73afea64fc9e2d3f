//! The gateway proxy behind an authenticating corporate proxy, from the guest (issue 21).
//!
//! A real squid, from Debian's package, plays the corporate proxy in the test network's
//! remote namespace, with Basic authentication (`basic_ncsa_auth` and an htpasswd file).
//! Ferry holds the credentials (`--proxy-upstream http://alice@...` and
//! `--proxy-credentials FILE`); the guest has none. Its curl goes through
//! `http.docker.internal:3128`, and squid's access log, written in a format that names the
//! user and ferry's source port, shows what went through it and on how many connections.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use ferry_tests::{TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(240);

/// How squid authenticates.
enum Auth<'a> {
    /// Basic, with `basic_ncsa_auth` and these users and passwords.
    Basic(&'a [(&'a str, &'a str)]),
    /// NTLM, with squid's `ntlm_fake_auth` test helper (any password is taken; the user
    /// name is logged).
    Ntlm,
}

/// A squid in namespace `ns`, listening on `addr:3128`, wanting credentials as `auth`
/// says; its access log is `dir/access.log`. Killed on drop.
struct Squid {
    child: Child,
    log: std::path::PathBuf,
}

impl Squid {
    fn start(ns: &str, addr: &str, dir: &Path, auth: Auth) -> Squid {
        let squid = [
            "/usr/sbin/squid",
            "/usr/lib/squid/basic_ncsa_auth",
            "/usr/lib/squid/ntlm_fake_auth",
        ];
        for p in squid {
            assert!(
                Path::new(p).exists(),
                "{p} is missing: apt-get install squid (scripts/install-deps.sh does)"
            );
        }
        // squid's workers run as the proxy user: the folder must be theirs to write.
        std::fs::create_dir_all(dir).unwrap();
        let mut passwd = String::new();
        let users = match auth {
            Auth::Basic(u) => u,
            Auth::Ntlm => &[],
        };
        for (user, pw) in users {
            let out = Command::new("openssl")
                .args(["passwd", "-apr1", pw])
                .output()
                .expect("run openssl passwd");
            passwd.push_str(&format!("{user}:{}", String::from_utf8_lossy(&out.stdout)));
        }
        std::fs::write(dir.join("passwd"), passwd).unwrap();
        let d = dir.display();
        let auth = match auth {
            Auth::Basic(_) => format!(
                "auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd
auth_param basic realm ferry-test
auth_param basic children 2"
            ),
            Auth::Ntlm => "auth_param ntlm program /usr/lib/squid/ntlm_fake_auth
auth_param ntlm children 2"
                .to_string(),
        };
        let conf = format!(
            "http_port {addr}:3128
pid_filename {d}/squid.pid
cache_log {d}/cache.log
logformat ferry %>a:%>p %un %rm %ru %>Hs
access_log stdio:{d}/access.log ferry
cache deny all
strip_query_terms off
coredump_dir {d}
{auth}
acl authed proxy_auth REQUIRED
http_access allow authed
http_access deny all
dns_nameservers {addr}
hosts_file none
shutdown_lifetime 0 seconds
pinger_enable off
visible_hostname ferry-test
"
        );
        std::fs::write(dir.join("squid.conf"), conf).unwrap();
        Command::new("chmod")
            .args(["-R", "a+rwX", &dir.display().to_string()])
            .status()
            .unwrap();
        let child = TestNet::command(ns, "/usr/sbin/squid")
            .args(["-N", "-f", &dir.join("squid.conf").display().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("squid.err")).unwrap())
            .spawn()
            .expect("start squid");
        let up = ferry_tests::wait_for(Duration::from_secs(20), || {
            let ss = TestNet::command(ns, "ss").args(["-ltn"]).output().ok()?;
            String::from_utf8_lossy(&ss.stdout)
                .contains(&format!("{addr}:3128"))
                .then_some(())
        });
        assert!(
            up.is_some(),
            "squid did not listen within 20 s: {}{}",
            std::fs::read_to_string(dir.join("squid.err")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default()
        );
        Squid {
            child,
            log: dir.join("access.log"),
        }
    }

    /// The access log's lines: `client:port user method url status`.
    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate and key for the TLS test server, in `dir`.
fn certificate(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=origin.test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl req")
        .status
        .success();
    assert!(ok, "openssl could not make the test certificate");
    (cert.display().to_string(), key.display().to_string())
}

/// A guest script: a `check NAME GOT WANT` function that reports to the test, `$CURL` (the
/// host's curl, from the tools share), no proxy variables, then `body`.
fn guest_script(body: &str) -> String {
    format!(
        r#"check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
CURL="{}"
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY
{body}"#,
        ferry_tests::CURL
    )
}

/// Waits for the guest to touch `tools/name`, the end of a phase of its script.
fn wait_phase(g: &ferry_tests::ServedGuest, name: &str) {
    let reached = ferry_tests::wait_for(DEADLINE, || g.tools.dir.join(name).exists().then_some(()));
    assert!(
        reached.is_some(),
        "the guest never reached {name}; console:\n{}",
        ferry_tests::tail(&g.qemu.console(), 40)
    );
}

/// Runs `ferry ctl ARGS` against `g`'s API, which must succeed, then lets the guest go on
/// (`tools/go`).
fn ctl_then_go(g: &ferry_tests::ServedGuest, args: &[&str], go: &str) {
    let out = Command::new(ferry_tests::ferry_bin())
        .args(["ctl", "--api-socket"])
        .arg(&g.api)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(g.tools.dir.join(go), b"").unwrap();
}

/// Waits for the guest's script to end and asserts that its `want` checks all passed.
fn all_checks_pass(qemu: &mut ferry_tests::Qemu, ferry: &ferry_tests::FerryProcess, want: usize) {
    let done = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    let failed: Vec<_> = done.checks.iter().filter(|c| !c.ok).collect();
    assert!(
        failed.is_empty() && done.checks.len() == want,
        "{} checks, failed: {failed:#?}\nconsole:\n{}\nferry log:\n{}",
        done.checks.len(),
        ferry_tests::tail(&done.console, 40),
        ferry.log_tail()
    );
}

/// The test's web: `origin.test` (in the remote's DNS server) serving `hello.txt` over
/// HTTP on 8080 and 80, and HTTPS on 8443 and 443, on the remote side.
fn origin(net: &TestNet, dir: &Path) -> TestHost {
    let remote = &net.remote_addr;
    let www = dir.join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from remote\n").unwrap();
    let (cert, key) = certificate(dir);
    let names = format!("origin.test={remote}");
    let www_s = www.display().to_string();
    TestHost::start(
        &net.remote,
        &[
            remote, "--http", "8080", &www_s, "--https", "8443", &www_s, &cert, &key, "--http",
            "80", &www_s, "--https", "443", &www_s, &cert, &key, "--dns", "53", &names,
        ],
    )
}

/// `dir/proxy-password`, holding `pw`, readable by its owner only.
fn password_file(dir: &Path, pw: &str) -> std::path::PathBuf {
    let f = dir.join("proxy-password");
    std::fs::write(&f, format!("{pw}\n")).unwrap();
    Command::new("chmod").arg("600").arg(&f).status().unwrap();
    f
}

/// A test's network: the origin and a squid wanting `auth` on the remote side.
struct World {
    net: TestNet,
    dir: tempfile::TempDir,
    _host: TestHost,
    squid: Squid,
}

impl World {
    fn new(auth: Auth) -> World {
        let net = TestNet::new().expect("make the test network (needs root and iproute2)");
        let dir = tempfile::tempdir().unwrap();
        let _host = origin(&net, dir.path());
        let squid = Squid::start(
            &net.remote,
            &net.remote_addr,
            &dir.path().join("squid"),
            auth,
        );
        World {
            net,
            dir,
            _host,
            squid,
        }
    }
}

#[test]
fn the_guest_reaches_the_web_through_an_authenticating_upstream_with_no_credentials_of_its_own() {
    let World {
        net,
        dir,
        _host,
        squid,
    } = World::new(Auth::Basic(&[("alice", "s3cret pass"), ("bob", "another")]));
    let remote = net.remote_addr.clone();
    // The password: a file only its owner reads.
    let pw = password_file(dir.path(), "s3cret pass");

    let script = format!(
        r#"
PX=http://http.docker.internal:3128
C="$CURL -s --max-time 30 -x $PX"
check via-squid-http "$($C http://origin.test:8080/hello.txt)" "hello from remote"
check via-squid-https "$($C -k https://origin.test:8443/hello.txt)" "hello from remote"
# The bypass list: the remote's address goes direct.
check bypassed "$($C http://{remote}:8080/hello.txt?direct)" "hello from remote"
# 200 requests on one keep-alive connection to the proxy.
URLS=""; i=0; while [ $i -lt 200 ]; do URLS="$URLS http://origin.test:8080/hello.txt?k=$i"; i=$((i+1)); done
check keep-alive-200 "$($C $URLS | grep -c 'hello from remote')" 200
# Smuggling and floods: refused by ferry, never in squid's log.
NC="nc -w 15 192.168.127.1 3128"
check smuggle-cl-te "$(printf 'POST http://origin.test:8080/smuggle1 HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n' | $NC | head -1 | tr -d '\r')" "HTTP/1.1 400 Bad Request"
check bad-chunk "$(printf 'POST http://origin.test:8080/smuggle2 HTTP/1.1\r\nHost: origin.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n' | $NC | head -1 | tr -d '\r')" "HTTP/1.1 400 Bad Request"
H=""; i=0; while [ $i -lt 200 ]; do H="${{H}}X-Flood-$i: y\r\n"; i=$((i+1)); done
check header-flood "$(printf "GET http://origin.test:8080/smuggle3 HTTP/1.1\r\n$H\r\n" | $NC | head -1 | tr -d '\r')" "HTTP/1.1 431 Request Header Fields Too Large"
check slow-head "$( (printf 'GET http://origin.test:8080/smuggle4 HTTP/1.1\r\nX-Slow: '; sleep 13) | $NC | head -1 | tr -d '\r')" "HTTP/1.1 408 Request Timeout"
touch /mnt/tools/phase1-done
i=0; while [ ! -e /mnt/tools/user-changed ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
# The host switched to a user whose password ferry does not hold.
R="$($CURL -s --max-time 30 -o /tmp/body -w '%{{http_code}}' -x $PX http://origin.test:8080/hello.txt)"
check wrong-secret "$R $(grep -c 'refused ferry.s Basic credentials for user bob' /tmp/body)" "407 1"
"#
    );
    let args = vec![
        "--dns-upstream".to_string(),
        format!("{remote}:53"),
        "--proxy-upstream".into(),
        format!("http://alice@{remote}:3128"),
        "--proxy-credentials".into(),
        pw.display().to_string(),
        "--proxy-bypass".into(),
        remote.clone(),
    ];
    let mut g = ferry_tests::serve_and_boot(
        &net.inner,
        dir.path(),
        guest_script(&script),
        &args,
        &[],
        vec![],
    );
    wait_phase(&g, "phase1-done");
    let proxy = ferry_tests::api_get(&g.api, "/proxy");
    let log = squid.log();
    // Squid saw the guest's requests as alice, over as few connections as ferry opened.
    let alice: Vec<&String> = log.iter().filter(|l| l.contains(" alice ")).collect();
    let keep: Vec<&String> = alice
        .iter()
        .copied()
        .filter(|l| l.contains("?k="))
        .collect();
    assert_eq!(keep.len(), 200, "squid's log:\n{}", log.join("\n"));
    let ports: std::collections::HashSet<&str> =
        keep.iter().filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(
        ports.len(),
        1,
        "200 requests on one guest connection take one upstream connection: {ports:?}"
    );
    assert!(
        alice
            .iter()
            .any(|l| l.contains("CONNECT origin.test:8443") && l.ends_with(" 200")),
        "{}",
        log.join("\n")
    );
    // The bypassed address and the refused requests never reached squid.
    assert!(
        !log.iter()
            .any(|l| l.contains("direct") || l.contains("smuggle")),
        "{}",
        log.join("\n")
    );
    // What squid challenged (one 407 before ferry learned the scheme) is all it refused.
    assert!(
        log.iter().filter(|l| l.ends_with(" 407")).count() <= 2,
        "{}",
        log.join("\n")
    );
    assert_eq!(proxy["errors"]["bad_request"], 2, "{proxy}");
    assert_eq!(proxy["errors"]["too_large"], 1, "{proxy}");
    assert_eq!(proxy["errors"]["timeout"], 1, "{proxy}");
    assert_eq!(proxy["credentials"], true, "{proxy}");

    // The host switches the upstream user to bob; ferry holds alice's password.
    ctl_then_go(
        &g,
        &["proxy", "set", &format!("http://bob@{remote}:3128")],
        "user-changed",
    );
    all_checks_pass(&mut g.qemu, &g.ferry, 9);
    let proxy = ferry_tests::api_get(&g.api, "/proxy");
    assert_eq!(proxy["errors"]["auth"], 1, "{proxy}");
    // The password is in no log and no answer.
    let all = format!(
        "{}{proxy}{}",
        g.ferry.log_text(),
        ferry_tests::api_get(&g.api, "/stats")
    );
    assert!(!all.contains("s3cret"), "the password leaked");
}

#[test]
fn the_guest_reaches_the_web_through_an_ntlm_upstream() {
    let World {
        net,
        dir,
        _host,
        squid,
    } = World::new(Auth::Ntlm);
    let remote = net.remote_addr.clone();
    let script = r#"
C="$CURL -s --max-time 30 -x http://http.docker.internal:3128"
check ntlm-http "$($C http://origin.test:8080/hello.txt)" "hello from remote"
check ntlm-https "$($C -k https://origin.test:8443/hello.txt)" "hello from remote"
URLS=""; i=0; while [ $i -lt 20 ]; do URLS="$URLS http://origin.test:8080/hello.txt?n=$i"; i=$((i+1)); done
check ntlm-keep-alive "$($C $URLS | grep -c 'hello from remote')" 20
"#
    .to_string();
    // The password comes from the environment this time; a domain user, percent-encoded.
    let args = vec![
        "--dns-upstream".to_string(),
        format!("{remote}:53"),
        "--proxy-upstream".into(),
        format!("http://CORP%5Calice@{remote}:3128"),
    ];
    let dirp = dir.path().to_path_buf();
    let mut cmd = ferry_tests::wrapped(Some(&net.inner), None, &ferry_tests::ferry_bin());
    let sock = dirp.join("net.sock");
    let api = dirp.join("api.sock");
    let tools = ferry_tests::tools_share(&dirp);
    cmd.arg("serve")
        .args(["--net-socket", &sock.display().to_string()])
        .args(["--api-socket", &api.display().to_string()])
        .args(["--share", &tools.share])
        .args(&args)
        .env("FERRY_PROXY_PASSWORD", "anything goes");
    let ferry = ferry_tests::FerryProcess::start(
        cmd,
        &dirp,
        &[sock.clone(), api.clone(), tools.socket.clone()],
    );
    let mut qemu = ferry_tests::Qemu::boot(
        &dirp,
        &ferry_tests::GuestSpec {
            script: guest_script(&script),
            net_socket: Some(sock),
            shares: vec![("tools".into(), tools.socket.clone())],
            ..Default::default()
        },
    );
    all_checks_pass(&mut qemu, &ferry, 3);
    // Squid knew the user for every request it served; its refusals were the handshakes.
    let log = squid.log();
    let served: Vec<&String> = log.iter().filter(|l| l.ends_with(" 200")).collect();
    assert_eq!(served.len(), 22, "{}", log.join("\n"));
    assert!(
        served
            .iter()
            .all(|l| l.to_ascii_lowercase().contains("alice")),
        "{}",
        log.join("\n")
    );
    let keep: std::collections::HashSet<&str> = served
        .iter()
        .filter(|l| l.contains("?n="))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert_eq!(
        keep.len(),
        1,
        "one upstream connection for one guest connection: {keep:?}"
    );
}

#[test]
fn transparent_mode_takes_a_guest_with_no_proxy_settings_through_the_upstream() {
    let World {
        net,
        dir,
        _host,
        squid,
    } = World::new(Auth::Basic(&[("alice", "pw")]));
    let remote = net.remote_addr.clone();
    let pw = password_file(dir.path(), "pw");
    let script = r#"
check transparent-http "$($CURL -s --max-time 30 http://origin.test/hello.txt?t=1)" "hello from remote"
check transparent-https "$($CURL -sk --max-time 30 https://origin.test/hello.txt?t=2)" "hello from remote"
check other-port-direct "$($CURL -s --max-time 30 http://origin.test:8080/hello.txt?t=3)" "hello from remote"
touch /mnt/tools/phase1-done
i=0; while [ ! -e /mnt/tools/mode-off ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
check off-direct "$($CURL -s --max-time 30 http://origin.test/hello.txt?t=4)" "hello from remote"
"#
    .to_string();
    let args = vec![
        "--dns-upstream".to_string(),
        format!("{remote}:53"),
        "--proxy-upstream".into(),
        format!("http://alice@{remote}:3128"),
        "--proxy-credentials".into(),
        pw.display().to_string(),
        "--proxy-transparent".into(),
    ];
    let mut g = ferry_tests::serve_and_boot(
        &net.inner,
        dir.path(),
        guest_script(&script),
        &args,
        &[],
        vec![],
    );
    wait_phase(&g, "phase1-done");
    ctl_then_go(&g, &["proxy", "transparent", "off"], "mode-off");
    all_checks_pass(&mut g.qemu, &g.ferry, 4);
    let log = squid.log().join("\n");
    assert!(
        log.contains("alice GET http://origin.test/hello.txt?t=1 200"),
        "{log}"
    );
    assert!(log.contains("alice CONNECT origin.test:443 200"), "{log}");
    assert!(!log.contains("t=3") && !log.contains("t=4"), "{log}");
    let proxy = ferry_tests::api_get(&g.api, "/proxy");
    assert_eq!(proxy["intercepted"], 2, "{proxy}");
    assert_eq!(proxy["transparent"], false, "{proxy}");
}

#[test]
fn a_pac_file_sends_some_names_through_the_upstream_and_changes_at_run_time() {
    let World {
        net,
        dir,
        _host,
        squid,
    } = World::new(Auth::Basic(&[("alice", "pw")]));
    let remote = net.remote_addr.clone();
    let pw = password_file(dir.path(), "pw");
    // origin.test through squid, after a proxy that is down; the rest direct.
    let first = dir.path().join("first.pac");
    std::fs::write(
        &first,
        format!(
            r#"function FindProxyForURL(url, host) {{
                if (dnsDomainIs(host, "origin.test")) return "PROXY 127.0.0.1:9; PROXY {remote}:3128";
                return "DIRECT";
            }}"#
        ),
    )
    .unwrap();
    let second = dir.path().join("second.pac");
    std::fs::write(
        &second,
        format!(r#"function FindProxyForURL(url, host) {{ return "PROXY {remote}:3128"; }}"#),
    )
    .unwrap();
    let script = format!(
        r#"
C="$CURL -s --max-time 30 -x http://http.docker.internal:3128"
check pac-proxied "$($C http://origin.test:8080/hello.txt?p=1)" "hello from remote"
check pac-proxied-https "$($C -k https://origin.test:8443/hello.txt)" "hello from remote"
check pac-direct "$($C http://{remote}:8080/hello.txt?p=2)" "hello from remote"
touch /mnt/tools/phase1-done
i=0; while [ ! -e /mnt/tools/pac-changed ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
check pac-changed "$($C http://{remote}:8080/hello.txt?p=3)" "hello from remote"
"#
    );
    let args = vec![
        "--dns-upstream".to_string(),
        format!("{remote}:53"),
        "--proxy-upstream".into(),
        format!("http://alice@{remote}:3128"),
        "--proxy-credentials".into(),
        pw.display().to_string(),
        "--proxy-pac".into(),
        first.display().to_string(),
    ];
    let mut g = ferry_tests::serve_and_boot(
        &net.inner,
        dir.path(),
        guest_script(&script),
        &args,
        &[],
        vec![],
    );
    wait_phase(&g, "phase1-done");
    let log = squid.log().join("\n");
    assert!(
        log.contains("alice GET http://origin.test:8080/hello.txt?p=1 200"),
        "{log}"
    );
    assert!(log.contains("alice CONNECT origin.test:8443 200"), "{log}");
    assert!(!log.contains("p=2"), "{log}");
    ctl_then_go(
        &g,
        &["proxy", "pac", &second.display().to_string()],
        "pac-changed",
    );
    all_checks_pass(&mut g.qemu, &g.ferry, 4);
    let log = squid.log().join("\n");
    assert!(
        log.contains(&format!("alice GET http://{remote}:8080/hello.txt?p=3 200")),
        "{log}"
    );
    let proxy = ferry_tests::api_get(&g.api, "/proxy");
    assert_eq!(proxy["pac"], second.display().to_string(), "{proxy}");
}

/// The proxy's listener takes a burst of a thousand connections (std's backlog of 128
/// dropped SYNs past it, and some connects waited out a minute of retries), and a thousand
/// tunnels stay open at once.
#[test]
fn a_thousand_tunnels_are_held_at_once() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let _echo = TestHost::start(&net.remote, &[&remote, "--tcp-echo", "7005", "--dns", "53"]);
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"
check tunnels-1000 "$(/mnt/tools/probe tunnels 192.168.127.1 3128 {remote}:7005 1000)" "1000 of 1000"
"#
    );
    let args = vec!["--dns-upstream".to_string(), format!("{remote}:53")];
    let mut g = ferry_tests::serve_and_boot(
        &net.inner,
        dir.path(),
        guest_script(&script),
        &args,
        &[],
        vec![],
    );
    all_checks_pass(&mut g.qemu, &g.ferry, 1);
    let proxy = ferry_tests::api_get(&g.api, "/proxy");
    assert_eq!(proxy["tunnels"], 1000, "{proxy}");
    assert_eq!(proxy["failed"], 0, "{proxy}");
}
