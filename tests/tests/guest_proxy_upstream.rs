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
    /// Negotiate, with squid's `negotiate_kerberos_auth` and the service keytab of `kdc`.
    Negotiate(&'a Kdc),
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
            Auth::Ntlm | Auth::Negotiate(_) => &[],
        };
        for (user, pw) in users {
            let out = Command::new("openssl")
                .args(["passwd", "-apr1", pw])
                .output()
                .expect("run openssl passwd");
            passwd.push_str(&format!("{user}:{}", String::from_utf8_lossy(&out.stdout)));
        }
        std::fs::write(dir.join("passwd"), passwd).unwrap();
        let krb5_config = match auth {
            Auth::Negotiate(kdc) => Some(kdc.conf.clone()),
            _ => None,
        };
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
            Auth::Negotiate(kdc) => format!(
                "auth_param negotiate program /usr/lib/squid/negotiate_kerberos_auth -k {} -s {} -c {d}
auth_param negotiate children 2
auth_param negotiate keep_alive on",
                kdc.service_keytab.display(),
                kdc.service
            ),
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
        let mut squid = TestNet::command(ns, "/usr/sbin/squid");
        if let Some(conf) = krb5_config {
            // Its Kerberos helper reads the realm from here.
            squid.env("KRB5_CONFIG", conf);
        }
        let child = squid
            .args(["-N", "-f", &dir.join("squid.conf").display().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("squid.err")).unwrap())
            .spawn()
            .expect("start squid");
        assert!(
            listens(ns, &format!("{addr}:3128")),
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

/// Whether a TCP socket in namespace `ns` listens on `addr` (`ADDRESS:PORT`) within 20 s.
fn listens(ns: &str, addr: &str) -> bool {
    ferry_tests::wait_for(Duration::from_secs(20), || {
        let ss = TestNet::command(ns, "ss").args(["-ltn"]).output().ok()?;
        String::from_utf8_lossy(&ss.stdout)
            .contains(addr)
            .then_some(())
    })
    .is_some()
}

/// The realm of the Kerberos tests.
const REALM: &str = "FERRY.TEST";

/// A Kerberos KDC (MIT's `krb5kdc`, from Debian's `krb5-kdc`) in namespace `ns` on
/// `addr:8800`, for realm [`REALM`], with two principals: the user `alice`, whose keys are
/// in `client_keytab`, and the proxy's service `HTTP/addr`, whose keys are in
/// `service_keytab`. `conf` is the `krb5.conf` that names it. Killed on drop.
struct Kdc {
    child: Child,
    conf: std::path::PathBuf,
    client_keytab: std::path::PathBuf,
    service_keytab: std::path::PathBuf,
    service: String,
}

impl Kdc {
    fn start(ns: &str, addr: &str, dir: &Path) -> Kdc {
        for p in [
            "/usr/sbin/krb5kdc",
            "/usr/sbin/kdb5_util",
            "/usr/sbin/kadmin.local",
            "/usr/bin/kinit",
        ] {
            assert!(
                Path::new(p).exists(),
                "{p} is missing: apt-get install krb5-kdc krb5-admin-server krb5-user (scripts/install-deps.sh does)"
            );
        }
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.display();
        // Names as given: the test's hosts have no reverse DNS, and the service is named
        // by the proxy's address.
        let conf = dir.join("krb5.conf");
        std::fs::write(
            &conf,
            format!(
                "[libdefaults]
 default_realm = {REALM}
 dns_lookup_kdc = false
 dns_lookup_realm = false
 rdns = false
 dns_canonicalize_hostname = false
[realms]
 {REALM} = {{
  kdc = {addr}:8800
 }}
"
            ),
        )
        .unwrap();
        let profile = dir.join("kdc.conf");
        std::fs::write(
            &profile,
            format!(
                "[kdcdefaults]
 kdc_ports = 8800
 kdc_tcp_ports = 8800
[realms]
 {REALM} = {{
  database_name = {d}/principal
  key_stash_file = {d}/stash
  acl_file = {d}/kadm5.acl
 }}
[logging]
 kdc = FILE:{d}/kdc.log
"
            ),
        )
        .unwrap();
        let env = |c: &mut Command| {
            c.env("KRB5_CONFIG", &conf)
                .env("KRB5_KDC_PROFILE", &profile);
        };
        let run = |args: &[&str]| {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            env(&mut c);
            let out = c
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", args[0]));
            assert!(
                out.status.success(),
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "/usr/sbin/kdb5_util",
            "create",
            "-s",
            "-r",
            REALM,
            "-P",
            "master password",
        ]);
        let service = format!("HTTP/{addr}@{REALM}");
        let (client_keytab, service_keytab) = (dir.join("alice.keytab"), dir.join("http.keytab"));
        for q in [
            "addprinc -randkey alice".to_string(),
            format!("addprinc -randkey {service}"),
            format!("ktadd -k {} alice", client_keytab.display()),
            format!("ktadd -k {} {service}", service_keytab.display()),
        ] {
            run(&["/usr/sbin/kadmin.local", "-r", REALM, "-q", &q]);
        }
        let mut kdc = TestNet::command(ns, "/usr/sbin/krb5kdc");
        env(&mut kdc);
        let child = kdc
            .args(["-n", "-r", REALM])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("kdc.err")).unwrap())
            .spawn()
            .expect("start krb5kdc");
        assert!(
            listens(ns, ":8800"),
            "krb5kdc did not listen within 20 s: {}",
            std::fs::read_to_string(dir.join("kdc.err")).unwrap_or_default()
        );
        Kdc {
            child,
            conf,
            client_keytab,
            service_keytab,
            service,
        }
    }

    /// Gets alice a ticket, from namespace `ns`, into the ticket cache `ccache`.
    fn kinit(&self, ns: &str, ccache: &Path) {
        let out = TestNet::command(ns, "/usr/bin/kinit")
            .env("KRB5_CONFIG", &self.conf)
            .env("KRB5CCNAME", format!("FILE:{}", ccache.display()))
            .arg("-k")
            .arg("-t")
            .arg(&self.client_keytab)
            .arg("alice")
            .output()
            .expect("run kinit");
        assert!(
            out.status.success(),
            "kinit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Kdc {
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

/// A certificate for the https:// proxy at `addr`, issued by a CA of its own, in `dir`:
/// the CA's certificate (what ferry is told to trust), the proxy's certificate and its key.
fn proxy_certificate(dir: &Path, addr: &str) -> (String, String, String) {
    let f = |n: &str| dir.join(n).display().to_string();
    std::fs::write(
        dir.join("proxy.ext"),
        format!("subjectAltName=IP:{addr}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=ferry test CA",
            "-keyout",
            &f("ca.key"),
            "-out",
            &f("ca.pem"),
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={addr}"),
            "-keyout",
            &f("proxy.key"),
            "-out",
            &f("proxy.csr"),
        ],
        &[
            "x509",
            "-req",
            "-in",
            &f("proxy.csr"),
            "-CA",
            &f("ca.pem"),
            "-CAkey",
            &f("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &f("proxy.ext"),
            "-out",
            &f("proxy.pem"),
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (f("ca.pem"), f("proxy.pem"), f("proxy.key"))
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

/// Ferry's options for a test behind the upstream proxy `upstream`: the test network's DNS
/// server at `remote`, the password file `password` when given, and `more`.
fn upstream_args(
    remote: &str,
    upstream: &str,
    password: Option<&Path>,
    more: &[&str],
) -> Vec<String> {
    let mut a = vec![
        "--dns-upstream".to_string(),
        format!("{remote}:53"),
        "--proxy-upstream".into(),
        upstream.to_string(),
    ];
    if let Some(pw) = password {
        a.extend(["--proxy-credentials".to_string(), pw.display().to_string()]);
    }
    a.extend(more.iter().map(|m| m.to_string()));
    a
}

/// Starts `ferry serve` in `net`'s inner namespace with `args` and boots the guest with
/// `script`.
fn serve(net: &TestNet, dir: &Path, script: &str, args: &[String]) -> ferry_tests::ServedGuest {
    ferry_tests::serve_and_boot(&net.inner, dir, guest_script(script), args, &[], vec![])
}

/// Starts `ferry serve` in `net`'s inner namespace with `args` and the environment `env`
/// (which `ferry_tests::serve_and_boot` does not take), and boots the guest with `script`.
fn serve_with_env(
    net: &TestNet,
    dir: &Path,
    script: &str,
    args: &[String],
    env: &[(&str, String)],
) -> (ferry_tests::FerryProcess, ferry_tests::Qemu) {
    let dirp = dir.to_path_buf();
    let mut cmd = ferry_tests::wrapped(Some(&net.inner), None, &ferry_tests::ferry_bin());
    let sock = dirp.join("net.sock");
    let api = dirp.join("api.sock");
    let tools = ferry_tests::tools_share(&dirp);
    cmd.arg("serve")
        .args(["--net-socket", &sock.display().to_string()])
        .args(["--api-socket", &api.display().to_string()])
        .args(["--share", &tools.share])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)));
    let ferry = ferry_tests::FerryProcess::start(
        cmd,
        &dirp,
        &[sock.clone(), api.clone(), tools.socket.clone()],
    );
    let qemu = ferry_tests::Qemu::boot(
        &dirp,
        &ferry_tests::GuestSpec {
            script: guest_script(script),
            net_socket: Some(sock),
            shares: vec![("tools".into(), tools.socket.clone())],
            ..Default::default()
        },
    );
    (ferry, qemu)
}

/// The guest's script for a scheme (`tag` names its checks): an http:// and an https://
/// fetch, then 20 on one keep-alive connection (`?n=`), through the gateway's proxy.
fn three_fetches(tag: &str) -> String {
    format!(
        r#"
C="$CURL -s --max-time 30 -x http://http.docker.internal:3128"
check {tag}-http "$($C http://origin.test:8080/hello.txt)" "hello from remote"
check {tag}-https "$($C -k https://origin.test:8443/hello.txt)" "hello from remote"
URLS=""; i=0; while [ $i -lt 20 ]; do URLS="$URLS http://origin.test:8080/hello.txt?n=$i"; i=$((i+1)); done
check {tag}-keep-alive "$($C $URLS | grep -c 'hello from remote')" 20
"#
    )
}

/// Asserts that squid served [`three_fetches`]' 22 requests and `more`, each as `user`, and
/// the keep-alive ones on one upstream connection.
fn served_as(squid: &Squid, user: &str, more: usize) {
    let log = squid.log();
    let served: Vec<&String> = log.iter().filter(|l| l.ends_with(" 200")).collect();
    assert_eq!(served.len(), 22 + more, "{}", log.join("\n"));
    assert!(
        served
            .iter()
            .all(|l| l.split(' ').nth(1).is_some_and(|u| u == user)),
        "all as {user}:\n{}",
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
    let args = upstream_args(
        &remote,
        &format!("http://alice@{remote}:3128"),
        Some(&pw),
        &["--proxy-bypass", &remote],
    );
    let mut g = serve(&net, dir.path(), &script, &args);
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
fn the_guest_reaches_the_web_through_an_https_upstream() {
    let World {
        net,
        dir,
        _host,
        squid,
    } = World::new(Auth::Basic(&[("alice", "tls pass")]));
    let remote = net.remote_addr.clone();
    // squid behind TLS on port 3129, as stunnel would put it: an https:// proxy.
    let (ca, cert, key) = proxy_certificate(dir.path(), &remote);
    let _front = TestHost::start(
        &net.remote,
        &[&remote, "--tls-front", "3129", &remote, "3128", &cert, &key],
    );
    let pw = password_file(dir.path(), "tls pass");
    let args = upstream_args(
        &remote,
        &format!("https://alice@{remote}:3129"),
        Some(&pw),
        &[],
    );
    // Uploads both ways through the TLS to the upstream: a plain POST, and one inside a
    // tunnel; the origin answers each body's sha256.
    let script = three_fetches("https-upstream")
        + r#"
dd if=/dev/urandom of=/tmp/up bs=1024 count=4096 2>/dev/null
SUM=$(sha256sum /tmp/up | cut -d' ' -f1)
check upload-http "$($C --data-binary @/tmp/up http://origin.test:8080/sum)" "$SUM"
check upload-https "$($C -k --data-binary @/tmp/up https://origin.test:8443/sum)" "$SUM"
"#;
    // The host trusts the proxy's CA as OpenSSL-based tools are told to.
    let (ferry, mut qemu) =
        serve_with_env(&net, dir.path(), &script, &args, &[("SSL_CERT_FILE", ca)]);
    all_checks_pass(&mut qemu, &ferry, 5);
    served_as(&squid, "alice", 2);
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
    let script = three_fetches("ntlm");
    // The password comes from the environment this time; a domain user, percent-encoded.
    let args = upstream_args(
        &remote,
        &format!("http://CORP%5Calice@{remote}:3128"),
        None,
        &[],
    );
    let (ferry, mut qemu) = serve_with_env(
        &net,
        dir.path(),
        &script,
        &args,
        &[("FERRY_PROXY_PASSWORD", "anything goes".into())],
    );
    all_checks_pass(&mut qemu, &ferry, 3);
    // Squid knew the user for every request it served; its refusals were the handshakes.
    served_as(&squid, "CORP\\alice", 0);
}

#[test]
fn the_guest_reaches_the_web_through_a_kerberos_upstream_with_ferrys_ticket() {
    kerberos_upstream(false);
}

#[test]
fn the_guest_reaches_the_web_through_a_kerberos_upstream_with_ferrys_client_keytab() {
    kerberos_upstream(true);
}

/// The guest behind a squid that takes Negotiate only. Ferry's user holds a ticket from
/// kinit, or (`keytab`) only a client keytab, from which GSSAPI gets tickets itself into a
/// ticket cache in ferry's memory.
fn kerberos_upstream(keytab: bool) {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let remote = net.remote_addr.clone();
    let _host = origin(&net, dir.path());
    let kdc = Kdc::start(&net.remote, &remote, &dir.path().join("kdc"));
    // squid's helper runs as the proxy user: it reads the service keytab and krb5.conf.
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir.path())
        .status()
        .unwrap();
    let squid = Squid::start(
        &net.remote,
        &remote,
        &dir.path().join("squid"),
        Auth::Negotiate(&kdc),
    );
    // Ferry itself holds no password.
    let mut env = vec![("KRB5_CONFIG", kdc.conf.display().to_string())];
    if keytab {
        env.push((
            "KRB5_CLIENT_KTNAME",
            kdc.client_keytab.display().to_string(),
        ));
        env.push(("KRB5CCNAME", "MEMORY:ferry".into()));
    } else {
        let ccache = dir.path().join("ccache");
        kdc.kinit(&net.inner, &ccache);
        env.push(("KRB5CCNAME", format!("FILE:{}", ccache.display())));
    }
    let script = three_fetches("negotiate");
    let args = upstream_args(&remote, &format!("http://{remote}:3128"), None, &[]);
    let (ferry, mut qemu) = serve_with_env(&net, dir.path(), &script, &args, &env);
    all_checks_pass(&mut qemu, &ferry, 3);
    // squid knew alice's principal for every request it served.
    served_as(&squid, &format!("alice@{REALM}"), 0);
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
    let args = upstream_args(
        &remote,
        &format!("http://alice@{remote}:3128"),
        Some(&pw),
        &["--proxy-transparent"],
    );
    let mut g = serve(&net, dir.path(), &script, &args);
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
    let args = upstream_args(
        &remote,
        &format!("http://alice@{remote}:3128"),
        Some(&pw),
        &["--proxy-pac", &first.display().to_string()],
    );
    let mut g = serve(&net, dir.path(), &script, &args);
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
    let mut g = serve(&net, dir.path(), &script, &args);
    all_checks_pass(&mut g.qemu, &g.ferry, 1);
    let proxy = ferry_tests::api_get(&g.api, "/proxy");
    assert_eq!(proxy["tunnels"], 1000, "{proxy}");
    assert_eq!(proxy["failed"], 0, "{proxy}");
}
