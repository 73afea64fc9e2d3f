//! The test network itself: the inner namespace reaches the remote one, and nothing else.

use ferry_tests::TestNet;

#[test]
fn inner_reaches_remote_and_nothing_else() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let ping = TestNet::command(&net.inner, "ping")
        .args(["-c", "1", "-W", "2", &net.remote_addr])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "inner cannot reach remote: {}",
        String::from_utf8_lossy(&ping.stderr)
    );
    // No default route: an outside address is unreachable, and `ip route get` says so without
    // sending anything.
    let route = TestNet::command(&net.inner, "ip")
        .args(["route", "get", "192.0.2.1"])
        .output()
        .unwrap();
    assert!(
        !route.status.success(),
        "the inner namespace has a route out"
    );
    assert!(String::from_utf8_lossy(&route.stderr).contains("unreachable"));
}

/// A host that cannot reach its DNS server (offline, the VPN not up yet) still gets a net
/// device: ferry starts, says why names will fail, and serves the socket.
#[test]
fn ferry_starts_when_the_dns_upstream_is_unreachable() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let mut ferry = ferry_tests::FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--dns-upstream".into(),
            "192.0.2.1".into(),
        ],
        std::slice::from_ref(&sock),
    );
    assert!(ferry.is_running(), "{}", ferry.log_tail());
    let log = ferry.log_text();
    assert!(
        log.contains("192.0.2.1:53 cannot be reached now"),
        "the log should say why names will fail:\n{log}"
    );
}
