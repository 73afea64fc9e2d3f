//! Published ports under load: a burst of short connections costs nothing once it ends, and
//! many clients at once are all served. The guest's servers (`probe tcppeer`, one process that
//! accepts, writes a line and closes; `probe tcpecho`, which echoes each connection until its
//! end) are fast enough not to be the limit, so what is measured is ferry's published path.
//!
//! A range of 100 ports published in one spec at run time is served port by port, and
//! unpublishing the range closes every listener.
//!
//! Ferry runs in a test namespace (`TestNet::inner`); the clients run there too, on loopback.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::{clients, FerryProcess, GuestSpec, Qemu, TestNet};

const DEADLINE: Duration = Duration::from_secs(120);

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn boot(dir: &Path, net: &Path, tools: &Path) -> Qemu {
    let mut q = Qemu::boot(
        dir,
        &GuestSpec {
            script: concat!(
                "/mnt/tools/probe tcppeer 9000 &\n",
                "for p in $(seq 9100 9199); do /mnt/tools/probe tcppeer $p & done\n",
                "/mnt/tools/probe tcpecho 9001 >/dev/null &\n",
                "sleep 1\necho FERRY-READY\nsleep 3600\n"
            )
            .into(),
            net_socket: Some(net.to_path_buf()),
            shares: vec![("tools".to_string(), tools.to_path_buf())],
            memory_mib: 256,
            ..Default::default()
        },
    );
    q.wait_console("FERRY-READY", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}"));
    q
}

#[test]
fn a_burst_of_short_connections_is_released_and_many_clients_are_served() {
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
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
            "--publish".into(),
            "9000:9000".into(),
            "--publish".into(),
            "9001:9001".into(),
            "--api-socket".into(),
            api.display().to_string(),
        ],
        &[sock.clone(), tools_sock.clone(), api.clone()],
    );
    let _qemu = boot(dir.path(), &sock, &tools_sock);
    let peer = clients(&net.inner, &["peer", "127.0.0.1", "9000"]);
    assert!(peer.starts_with("192.168.127.254:"), "{peer}");
    let base = fds(ferry.serving_pid());

    // 10,000 connections, each closed at once by the client: once the burst ends, ferry's
    // descriptors are back where they were within 5 s. The guest's echo server says nothing
    // first, so every connection ends with FIN both ways (a client that closes with a line
    // of the guest's unread resets, and a reused port may then meet that RST).
    let churn = clients(&net.inner, &["churn", "127.0.0.1", "9001", "10000"]);
    assert_eq!(
        churn,
        "10000 done, 0 errors",
        "{}\n{}",
        tcp_counters(&net.inner),
        ferry.log_tail()
    );
    let ended = Instant::now();
    let mut last = fds(ferry.serving_pid());
    while last > base + 4 && ended.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
        last = fds(ferry.serving_pid());
        if std::env::var("FERRY_HOLD").is_ok() {
            eprintln!(
                "T {:?} fds {last} flows {}",
                ended.elapsed(),
                flow_states(&api)
            );
        }
    }
    let took = ended.elapsed();
    assert!(
        last <= base + 4 && took <= Duration::from_secs(5),
        "after the burst ferry holds {last} descriptors ({base} before), {took:?} after it ended; flows by state: {}; ferry's sockets by state: {}\n{}",
        flow_states(&api),
        socket_states(&net.inner, ferry.serving_pid()),
        ferry.log_tail()
    );

    // 500 clients at once, 10 s each to connect and read: every one is served.
    let many = clients(&net.inner, &["many", "127.0.0.1", "9000", "500", "10"]);
    assert!(
        many.starts_with("500 of 500"),
        "500 clients at once: {many}\n{}",
        ferry.log_tail()
    );
    assert!(ferry.is_running());
}

/// How many TCP flows ferry has in each state, from `ferry ctl --json stats`.
fn flow_states(api: &Path) -> String {
    let stats = ferry_tests::api_get(api, "/stats");
    let mut by_state = std::collections::BTreeMap::<String, usize>::new();
    for f in stats["net"]["flows"].as_array().into_iter().flatten() {
        *by_state
            .entry(f["state"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    format!("{by_state:?}")
}

/// How many of `pid`'s TCP sockets are in each state, from `ss` in namespace `ns`.
fn socket_states(ns: &str, pid: u32) -> String {
    let out = TestNet::command(ns, "ss")
        .args(["-tanpH"])
        .output()
        .expect("run ss");
    let mut by_state = std::collections::BTreeMap::<String, usize>::new();
    let me = format!("pid={pid},");
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if l.contains(&me) {
            let state = l.split_whitespace().next().unwrap_or("?").to_string();
            *by_state.entry(state).or_default() += 1;
        }
    }
    format!("{by_state:?}")
}

/// The namespace's TCP counters that are not zero (`nstat`), for a failure's message.
fn tcp_counters(ns: &str) -> String {
    let out = TestNet::command(ns, "nstat")
        .args(["-az"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter(|l| l.starts_with("Tcp") && l.split_whitespace().nth(1).is_none_or(|v| v != "0"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn a_published_range_is_served_port_by_port_and_unpublished_whole() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let api = dir.path().join("api.sock");
    let t = ferry_tests::tools_share(dir.path());
    let ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--share".into(),
            t.share.clone(),
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
            "--api-socket".into(),
            api.display().to_string(),
        ],
        &[sock.clone(), t.socket.clone(), api.clone()],
    );
    let _qemu = boot(dir.path(), &sock, &t.socket);
    let base = fds(ferry.serving_pid());
    let o = ferry_tests::ferry_ctl(&api, &["publish", "8100-8199:9100-9199"]);
    assert!(o.status.success(), "ferry ctl publish a range: {o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        100,
        "one line per published port"
    );
    // A range that collides with a published port fails whole.
    let o = ferry_tests::ferry_ctl(&api, &["publish", "8190-8210:9190-9210"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("8190"),
        "the message names the first busy port: {o:?}"
    );
    assert_eq!(
        clients(&net.inner, &["range", "127.0.0.1", "8100", "8199"]),
        "100 of 100"
    );
    let o = ferry_tests::ferry_ctl(&api, &["unpublish", "8100-8199"]);
    assert!(o.status.success(), "ferry ctl unpublish a range: {o:?}");
    let back = ferry_tests::wait_for(Duration::from_secs(10), || {
        (fds(ferry.serving_pid()) <= base).then_some(())
    });
    assert!(
        back.is_some(),
        "descriptors: {} before the range, {} after unpublishing it",
        base,
        fds(ferry.serving_pid())
    );
    assert_eq!(
        clients(&net.inner, &["probe", "127.0.0.1", "8150"])
            .split_whitespace()
            .next(),
        Some("refused")
    );
}
