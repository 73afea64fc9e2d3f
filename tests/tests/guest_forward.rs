//! Forwarding between host UNIX sockets and the guest, end to end.
//!
//! Host to guest (`--forward-socket`): `curl --unix-socket` on the host reaches busybox httpd
//! in the guest, the way a desktop tool reaches its engine's API through `docker.sock`. The
//! socket is 0600 by default: another uid cannot connect to it, while it can to a socket
//! forwarded with `mode=0666` in the same folder (so the folder is not what stops it). A
//! socket added with `ferry ctl sockets add` works at once and goes with `remove`.
//!
//! Guest to host (`--guest-forward`): the guest's `wget` to a virtual address in its subnet
//! reaches an HTTP server on a host UNIX socket (port 80) and one on a test host over TCP
//! (port 81); another port of the address is refused.
//!
//! Ferry runs in a test namespace; the TCP server is a test host on the remote link.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_tests::ferry_ctl as ctl;
use ferry_tests::{serve_and_boot, ServedGuest, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(180);
const GUEST_PAGE: &str = "hello from the guest";
const HOST_PAGE: &str = "hello from the host";
/// The guest forward's address: in the guest's subnet (ferry's default), so the guest asks
/// for it with ARP.
const FORWARD: &str = "192.168.127.100";

fn script() -> String {
    format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
step() {{ echo "FERRY-STEP $1"; i=0; while [ ! -e /mnt/tools/go-$1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; }}
mkdir -p /www && echo '{GUEST_PAGE}' > /www/index.html
httpd -p 80 -h /www
check guest-forward-unix "$(wget -q -O - http://{FORWARD}/ 2>&1)" '{HOST_PAGE}'
check guest-forward-tcp "$(wget -q -O - http://{FORWARD}:81/ 2>&1)" '{HOST_PAGE}'
wget -q -O /dev/null http://{FORWARD}:82/ 2>/dev/null
check guest-forward-other-port-refused "$?" 1
step 1
"#
    )
}

/// `curl --unix-socket SOCK http://x/` as `uid` (None: this process's), its output or error.
fn curl_unix(sock: &Path, uid: Option<u32>) -> (bool, String) {
    let mut c = match uid {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={u}"),
                &format!("--regid={u}"),
                "--clear-groups",
                "curl",
            ]);
            c
        }
        None => Command::new("curl"),
    };
    let o = c
        .args(["-sS", "-m", "20", "--unix-socket"])
        .arg(sock)
        .arg("http://x/")
        .output()
        .expect("run curl");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
    )
}

#[test]
fn host_sockets_reach_the_guest_and_guest_forwards_reach_host_sockets() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    // Others may enter the folder: only the socket's own mode keeps them out.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), format!("{HOST_PAGE}\n")).unwrap();
    let host_http = dir.path().join("host-http.sock");
    let www_s = www.display().to_string();
    let _unix_server = TestHost::start(
        &net.inner,
        &[
            "127.0.0.1",
            "--http-unix",
            &host_http.display().to_string(),
            &www_s,
        ],
    );
    let _tcp_server = TestHost::start(&net.remote, &[&net.remote_addr, "--http", "8080", &www_s]);

    let engine = dir.path().join("engine.sock");
    let open = dir.path().join("open.sock");
    let ServedGuest {
        ferry,
        mut qemu,
        tools: t,
        api,
    } = serve_and_boot(
        &net.inner,
        dir.path(),
        script(),
        &[
            "--forward-socket".into(),
            format!("{}=80", engine.display()),
            "--forward-socket".into(),
            format!("{}=80,mode=0666", open.display()),
            "--guest-forward".into(),
            format!("{FORWARD}:80=unix:{}", host_http.display()),
            "--guest-forward".into(),
            format!("{FORWARD}:81=tcp:{}:8080", net.remote_addr),
        ],
        std::slice::from_ref(&engine),
        vec![],
    );
    if let Err(e) = qemu.wait_console("FERRY-STEP 1", DEADLINE) {
        panic!("{e}\nferry log:\n{}", ferry.log_tail());
    }
    let log = || ferry.log_tail();

    // The engine's API through its socket.
    assert_eq!(
        curl_unix(&engine, None),
        (true, GUEST_PAGE.into()),
        "{}",
        log()
    );
    let mode = std::fs::metadata(&engine).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a forwarded socket is its owner's only");
    // Another uid: refused by the socket's mode, not the folder's.
    let (ok, text) = curl_unix(&engine, Some(65534));
    assert!(!ok, "nobody connected to a 0600 socket: {text}");
    assert!(
        text.contains("ermission denied") || text.contains("Couldn't connect"),
        "{text}"
    );
    assert_eq!(
        curl_unix(&open, Some(65534)),
        (true, GUEST_PAGE.into()),
        "mode=0666 lets others in"
    );

    // At run time.
    // A name that must be escaped in the API's URL.
    let late = dir.path().join("late 100%?.sock");
    let o = ctl(&api, &["sockets", "add", &format!("{}=80", late.display())]);
    assert!(o.status.success(), "ferry ctl sockets add: {o:?}");
    assert_eq!(
        curl_unix(&late, None),
        (true, GUEST_PAGE.into()),
        "{}",
        log()
    );
    let listed = String::from_utf8_lossy(&ctl(&api, &["sockets"]).stdout).to_string();
    for p in [&engine, &open, &late] {
        assert!(listed.contains(&p.display().to_string()), "{listed}");
    }
    let o = ctl(&api, &["sockets", "remove", &late.display().to_string()]);
    assert!(o.status.success(), "ferry ctl sockets remove: {o:?}");
    assert!(!late.exists(), "the socket file goes with the forward");
    let o = ctl(&api, &["sockets", "remove", &late.display().to_string()]);
    assert!(!o.status.success(), "removing it twice is an error");

    std::fs::write(t.dir.join("go-1"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(3, &format!("ferry log:\n{}", ferry.log_tail()));
    drop(ferry);
    assert!(
        !engine.exists(),
        "ferry removes its forwarded sockets when it stops"
    );
}
