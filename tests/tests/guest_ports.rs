//! Published ports end to end: host clients reach servers in the guest through ports that
//! ferry publishes, changes made at runtime with `ferry ctl`, inbound rules that keep some
//! clients out, a QEMU restart under a bound port, and an unprivileged ferry publishing :80
//! through `ferry portd`.
//!
//! Ferry runs in a test namespace (`TestNet::inner`); "non-local" clients run in the other one
//! (`remote`) and come in over the veth link. Nothing leaves the namespaces the test made.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use ferry_tests::{clients, ferry_bin, wait_for, FerryProcess, GuestSpec, Qemu, TestNet};

const DEADLINE: Duration = Duration::from_secs(120);
const PAGE: &str = "hello from the guest";

/// The guest: busybox httpd on :80, a UDP echo on :7, and a server that tells each TCP client
/// its address on :9000. It stays up until QEMU is killed.
fn guest_script(with_probe: bool) -> String {
    let mut s = format!("mkdir -p /www && echo '{PAGE}' > /www/index.html\nhttpd -p 80 -h /www\n");
    if with_probe {
        s.push_str("/mnt/tools/probe udpecho 7 &\n/mnt/tools/probe tcppeer 9000 &\n");
    }
    s.push_str("sleep 1\necho FERRY-READY\nsleep 3600\n");
    s
}

fn curl(ns: &str, url: &str) -> String {
    let out = TestNet::command(ns, "curl")
        .args(["-sS", "-m", "20", url])
        .output()
        .expect("run curl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

use ferry_tests::ferry_ctl as ctl;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// How many of `pid`'s sockets are bound to a port in `ports` (TCP or UDP, IPv4 or IPv6, as
/// its network namespace's /proc/net tables list them).
fn sockets_on_ports(pid: u32, ports: std::ops::Range<u16>) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(String::from)
        })
        .collect();
    let mut n = 0;
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (f.get(1), f.get(9)) else {
                continue;
            };
            let port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if port.is_some_and(|p| ports.contains(&p)) && inodes.contains(*inode) {
                n += 1;
            }
        }
    }
    n
}

fn boot(dir: &Path, net: &Path, tools: Option<&Path>) -> Qemu {
    let mut q = Qemu::boot(
        dir,
        &GuestSpec {
            script: guest_script(tools.is_some()),
            net_socket: Some(net.to_path_buf()),
            shares: tools
                .map(|t| vec![("tools".to_string(), t.to_path_buf())])
                .unwrap_or_default(),
            mac: Some("02:46:52:59:00:02".into()),
            memory_mib: 256,
            ..Default::default()
        },
    );
    q.wait_console("FERRY-READY", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}"));
    q
}

/// A process killed on drop.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn published_ports_reach_the_guest_change_at_runtime_and_survive_a_restart() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let api = dir.path().join("api.sock");
    let t = ferry_tests::tools_share(dir.path());
    let tools_sock = t.socket.clone();
    let mut ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--share".into(),
            t.share.clone(),
            "--api-socket".into(),
            api.display().to_string(),
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
            "--publish".into(),
            "8080:80".into(),
            "--publish".into(),
            "udp/5300:7".into(),
        ],
        &[sock.clone(), tools_sock.clone(), api.clone()],
    );
    let mode = std::fs::metadata(&api).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket must be private");

    // No VM yet: a client is refused at once, not left hanging.
    let early = clients(&net.inner, &["probe", "127.0.0.1", "8080"]);
    let secs: f64 = early.split(' ').nth(1).unwrap_or("99").parse().unwrap();
    assert!(
        early.starts_with("reset") && secs < 2.0,
        "with no guest attached, a client should be reset at once: {early}"
    );

    let mut qemu = boot(dir.path(), &sock, Some(&tools_sock));

    // The page and the echo, through the published ports.
    assert_eq!(
        curl(&net.inner, "http://127.0.0.1:8080/"),
        PAGE,
        "{}",
        ferry.log_tail()
    );
    assert_eq!(
        clients(
            &net.inner,
            &["udp", "127.0.0.1", "5300", "ping-through-udp"]
        ),
        "ping-through-udp"
    );
    // A port on 0.0.0.0 takes IPv6 clients too, as Docker's do (`localhost` is often ::1).
    assert_eq!(curl(&net.inner, "http://[::1]:8080/"), PAGE);
    assert_eq!(
        clients(&net.inner, &["udp", "::1", "5300", "ping-over-ipv6"]),
        "ping-over-ipv6"
    );
    // A non-local client, over the link from the other namespace, gets the page too.
    assert_eq!(
        curl(&net.remote, &format!("http://{}:8080/", net.inner_addr)),
        PAGE
    );
    assert_eq!(
        clients(&net.remote, &["udp", &net.inner_addr, "5300", "remote-udp"]),
        "remote-udp"
    );

    // A port added at runtime: the guest sees the non-local client's own address, and a
    // loopback client as the host alias of its family.
    let o = ctl(&api, &["publish", "9000:9000"]);
    assert!(o.status.success(), "ferry ctl publish: {}", text(&o));
    let seen = clients(&net.remote, &["peer", &net.inner_addr, "9000"]);
    assert!(
        seen.starts_with(&format!("{}:", net.remote_addr)),
        "the guest should see the client's address {}, saw {seen:?}",
        net.remote_addr
    );
    let seen = clients(&net.inner, &["peer", "127.0.0.1", "9000"]);
    assert!(
        seen.starts_with("192.168.127.254:"),
        "loopback client seen as {seen:?}"
    );
    // The guest has IPv6 (its image brings it up): an IPv6 loopback client is the IPv6 alias.
    let seen = clients(&net.inner, &["peer", "::1", "9000"]);
    assert!(
        seen.starts_with("[fd46:6572:7279::fe]:"),
        "IPv6 loopback client seen as {seen:?}"
    );
    let o = ctl(&api, &["ports"]);
    assert!(text(&o).contains("0.0.0.0:9000"), "{}", text(&o));

    // Inbound rules keep published ports from the other namespace's client, as a
    // DOCKER-USER rule with `-s` would; local clients still come in. Counted, then zeroed.
    let rules = || -> serde_json::Value {
        let o = ctl(&api, &["--json", "rules"]);
        assert!(o.status.success(), "{}", text(&o));
        serde_json::from_slice(&o.stdout).expect("rules JSON")
    };
    // The clients above came in on the inbound default.
    let before = rules()["default_in"]["packets"].as_u64().unwrap();
    assert!(before >= 8, "{}", rules());
    let remote = format!("{}/32", net.remote_addr);
    let specs = [
        format!("reject,dir=in,proto=tcp,from={remote},port=9000"),
        format!("drop,dir=in,proto=tcp,from={remote},port=8080"),
        format!("drop,dir=in,proto=udp,from={remote}"),
        // An outbound rule that would match the client's address: inbound clients never
        // meet it.
        format!("reject,to={remote}"),
    ];
    for spec in &specs {
        let o = ctl(&api, &["rules", "add", spec]);
        assert!(o.status.success(), "ferry ctl rules add: {}", text(&o));
    }
    let r = clients(&net.remote, &["probe", &net.inner_addr, "9000"]);
    assert!(r.starts_with("reset"), "a rejected client: {r}");
    let r = clients(&net.remote, &["probe", &net.inner_addr, "8080"]);
    assert!(r.starts_with("closed"), "a dropped client: {r}");
    assert_eq!(
        clients(&net.remote, &["udp", &net.inner_addr, "5300", "nope"]),
        "timeout"
    );
    let seen = clients(&net.inner, &["peer", "127.0.0.1", "9000"]);
    assert!(
        seen.starts_with("192.168.127.254:"),
        "a local client: {seen:?}"
    );
    assert_eq!(
        clients(&net.inner, &["udp", "127.0.0.1", "5300", "still-in"]),
        "still-in"
    );
    let v = rules();
    let r = &v["rules"];
    assert_eq!(r[0]["dir"], "in", "{v}");
    assert_eq!(r[0]["from"].as_str(), Some(remote.as_str()), "{v}");
    assert_eq!(
        (&r[0]["packets"], &r[0]["bytes"]),
        (&1.into(), &0.into()),
        "{v}"
    );
    assert_eq!(r[1]["packets"], 1, "{v}");
    // The client sent its datagram 5 times, waiting for an answer.
    assert_eq!(
        (&r[2]["packets"], &r[2]["bytes"]),
        (&5.into(), &20.into()),
        "{v}"
    );
    assert_eq!(r[3]["packets"], 0, "{v}");
    let d = &v["default_in"];
    assert_eq!(
        d["packets"].as_u64(),
        Some(before + 2),
        "the local connection and datagram: {v}"
    );
    assert!(d["bytes"].as_u64() >= Some(16), "{v}");
    let table = text(&ctl(&api, &["rules"]));
    assert!(
        table.contains(&format!("from {remote}"))
            && table.contains("(default: clients no rule matches)"),
        "{table}"
    );
    let o = ctl(&api, &["rules", "zero"]);
    assert!(
        o.status.success() && text(&o).contains("every counter set to 0"),
        "{}",
        text(&o)
    );
    let v = rules();
    for r in v["rules"].as_array().unwrap() {
        assert_eq!((&r["packets"], &r["bytes"]), (&0.into(), &0.into()), "{v}");
    }
    assert_eq!(v["default_in"]["packets"], 0, "{v}");
    for r in v["rules"].as_array().unwrap() {
        let id = r["id"].to_string();
        assert!(ctl(&api, &["rules", "delete", &id]).status.success());
    }
    let seen = clients(&net.remote, &["peer", &net.inner_addr, "9000"]);
    assert!(
        seen.starts_with(&format!("{}:", net.remote_addr)),
        "with the rules deleted the client comes in again: {seen:?}"
    );

    // An IPv6 network: the port's ::1 client is kept off, its 127.0.0.1 client comes in.
    let o = ctl(
        &api,
        &[
            "rules",
            "add",
            "reject,dir=in,proto=tcp,from=::1/128,port=9000",
        ],
    );
    assert!(o.status.success(), "ferry ctl rules add: {}", text(&o));
    let r = clients(&net.inner, &["probe", "::1", "9000"]);
    assert!(r.starts_with("reset"), "a rejected IPv6 client: {r}");
    let seen = clients(&net.inner, &["peer", "127.0.0.1", "9000"]);
    assert!(
        seen.starts_with("192.168.127.254:"),
        "an IPv4 client: {seen:?}"
    );
    let v = rules();
    assert_eq!(
        (v["rules"][0]["from"].as_str(), &v["rules"][0]["packets"]),
        (Some("::1/128"), &1.into()),
        "{v}"
    );
    let id = v["rules"][0]["id"].to_string();
    assert!(ctl(&api, &["rules", "delete", &id]).status.success());

    // 200 clients at once through one published port.
    let many = clients(&net.inner, &["many", "127.0.0.1", "9000", "200"]);
    assert!(
        many.starts_with("200 of 200"),
        "200 parallel clients: {many}\nferry log:\n{}",
        ferry.log_tail()
    );

    // Removed at runtime: the port is closed on the host.
    let o = ctl(&api, &["unpublish", "9000"]);
    assert!(o.status.success(), "ferry ctl unpublish: {}", text(&o));
    let gone = clients(&net.remote, &["probe", &net.inner_addr, "9000"]);
    assert!(gone.starts_with("refused"), "after unpublish: {gone}");
    assert!(!text(&ctl(&api, &["ports"])).contains(":9000"));

    // A host port in use: Docker's message and exit code 1, from ctl and from serve.
    let _holder = Bg(TestNet::command(&net.inner, "python3")
        .args([
            "-c",
            "import socket,time\ns=socket.socket()\ns.bind(('0.0.0.0',7070))\ns.listen()\nprint('ready',flush=True)\ntime.sleep(600)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap());
    wait_for(Duration::from_secs(10), || {
        let ss = TestNet::command(&net.inner, "ss")
            .arg("-ltn")
            .output()
            .ok()?;
        String::from_utf8_lossy(&ss.stdout)
            .contains(":7070")
            .then_some(())
    })
    .expect("the port holder listens");
    let msg = "Ports are not available: exposing port TCP 0.0.0.0:7070 -> 192.168.127.2:80: address already in use";
    let o = ctl(&api, &["publish", "7070:80"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains(msg), "{}", text(&o));
    let o = ferry_tests::wrapped(Some(&net.inner), None, &ferry_bin())
        .args(["serve", "--net-socket"])
        .arg(dir.path().join("other.sock"))
        .args(["--publish", "7070:80"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains(msg), "{}", text(&o));

    // Publishing and unpublishing leaks no descriptors.
    let before = fds(ferry.serving_pid());
    for i in 0..25 {
        let spec = format!("udp/127.0.0.1:{}:7", 6000 + i);
        assert!(ctl(&api, &["publish", &spec]).status.success());
        assert!(ctl(&api, &["publish", &format!("{}:80", 6100 + i)])
            .status
            .success());
        if i == 0 {
            // What the check below counts is there while the port is published.
            let bound = sockets_on_ports(ferry.serving_pid(), 6100..6101);
            assert!(bound >= 1, "no socket found on a published port");
        }
        assert!(ctl(&api, &["unpublish", &spec]).status.success());
        assert!(ctl(&api, &["unpublish", &format!("{}", 6100 + i)])
            .status
            .success());
    }
    // None of the 50 ports keeps a socket, and the descriptor count is back where it was
    // (give or take the guest's own flows, which come and go meanwhile: a leak per publish
    // would show 25 or 50 more).
    let pid = ferry.serving_pid();
    let left = sockets_on_ports(pid, 6000..6125);
    assert_eq!(left, 0, "sockets left on unpublished ports");
    let settled = wait_for(Duration::from_secs(10), || {
        (fds(pid) == before).then_some(())
    });
    assert!(
        settled.is_some() || fds(pid) <= before + 2,
        "fds leaked by publish/unpublish: {} after, {before} before",
        fds(pid)
    );

    // QEMU dies; the port stays bound and refuses at once; a new QEMU serves it again.
    qemu.kill();
    let down = wait_for(Duration::from_secs(10), || {
        let r = clients(&net.inner, &["probe", "127.0.0.1", "8080"]);
        r.starts_with("reset").then_some(r)
    });
    let down = down.expect("with QEMU gone, clients of a published port are reset");
    let secs: f64 = down.split(' ').nth(1).unwrap_or("99").parse().unwrap();
    assert!(secs < 2.0, "refusal took {secs} s");
    let _qemu = boot(dir.path(), &sock, Some(&tools_sock));
    assert_eq!(
        curl(&net.inner, "http://127.0.0.1:8080/"),
        PAGE,
        "{}",
        ferry.log_tail()
    );
    let o = ctl(&api, &["stats"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(ferry.is_running());
}

/// A folder that user nobody can use: the unprivileged ferry's sockets, and its binary.
fn open_dir(base: &Path, name: &str, mode: u32) -> PathBuf {
    let d = base.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
    d
}

#[test]
fn an_unprivileged_ferry_publishes_port_80_through_portd() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Its own copy of the binary, where nobody may run it.
    let bin = dir.path().join("ferry");
    std::fs::copy(ferry_bin(), &bin).unwrap();
    let run = open_dir(dir.path(), "run", 0o777);
    let helper = open_dir(dir.path(), "portd", 0o755);
    let portd_sock = helper.join("portd.sock");
    let sock = run.join("net.sock");
    let serve_args = |sock: &Path| -> Vec<String> {
        vec![
            "--net-socket".into(),
            sock.display().to_string(),
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
            "--publish".into(),
            "80:80".into(),
            "--portd-socket".into(),
            portd_sock.display().to_string(),
        ]
    };

    // Without the helper: a clear refusal that names its socket and how to start it.
    let o = ferry_tests::wrapped(Some(&net.inner), Some("nobody"), &bin)
        .arg("serve")
        .args(serve_args(&run.join("first.sock")))
        .env("TMPDIR", &run)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("Ports are not available: exposing port TCP 0.0.0.0:80 -> 192.168.127.2:80")
            && t.contains(&portd_sock.display().to_string())
            && t.contains("ferry portd"),
        "{t}"
    );

    // With the helper (root, in the same namespace), the same command publishes :80.
    let helper_log = std::fs::File::create(dir.path().join("portd.log")).unwrap();
    let _portd = Bg(ferry_tests::wrapped(Some(&net.inner), None, &bin)
        .args(["portd", "--socket"])
        .arg(&portd_sock)
        .args(["--allow-uid", "nobody"])
        .stderr(helper_log)
        .spawn()
        .unwrap());
    wait_for(Duration::from_secs(10), || {
        portd_sock.exists().then_some(())
    })
    .expect("ferry portd makes its socket");
    let ferry = FerryProcess::serve_as(
        Some(&net.inner),
        Some("nobody"),
        &bin,
        &run,
        &serve_args(&sock),
        std::slice::from_ref(&sock),
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", ferry.serving_pid()))
        .unwrap_or_default();
    // The pid is ip's until it execs; wait for ferry's own uid line.
    let uid_line = wait_for(Duration::from_secs(5), || {
        let s = std::fs::read_to_string(format!("/proc/{}/status", ferry.serving_pid())).ok()?;
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .filter(|l| l.contains("65534"))
            .map(str::to_string)
    });
    assert!(
        uid_line.is_some(),
        "ferry does not run as nobody:\n{status}"
    );
    let _qemu = boot(dir.path(), &sock, None);
    assert_eq!(
        curl(&net.inner, "http://127.0.0.1:80/"),
        PAGE,
        "{}",
        ferry.log_tail()
    );
    assert_eq!(
        curl(&net.remote, &format!("http://{}/", net.inner_addr)),
        PAGE
    );
}
