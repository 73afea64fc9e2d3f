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
