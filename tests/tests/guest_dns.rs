//! DNS that follows the host: ferry forwards to every nameserver of its resolv.conf in order,
//! passes a query on when a server is gone, and follows the file when it is replaced.
//!
//! Three DNS test hosts on the remote link answer one name each their own way. Ferry reads a
//! resolv.conf of the test's (`--resolv-conf`, a symlink, as systemd-resolved and
//! NetworkManager make it) naming the first two. The guest resolves the name (the first
//! answers); the test stops the first server, and the guest's next lookup is answered by the
//! second within one resolver timeout; the test replaces the symlink with one naming the
//! third, and the guest's next lookup reaches it without a ferry restart. `/stats` names the
//! servers in use.

use std::time::Duration;

use ferry_tests::{api_get, FerryProcess, GuestSpec, Qemu, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(180);

const SCRIPT: &str = r#"
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
lookup() { nslookup -type=A who.test 2>&1 | awk '/^Address/ {a=$2} END {print a}'; }
step() { echo "FERRY-STEP $1"; i=0; while [ ! -e /mnt/tools/go-$1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; }
check first "$(lookup)" 10.0.0.1
step 1
t0=$(cut -d' ' -f1 /proc/uptime)
check failover "$(lookup)" 10.0.0.2
t1=$(cut -d' ' -f1 /proc/uptime)
check failover-fast "$(awk -v a=$t0 -v b=$t1 'BEGIN {print (b - a < 5) ? "yes" : "no " b - a}')" yes
step 2
check followed "$(lookup)" 10.0.0.3
"#;

#[test]
fn lookups_fail_over_and_follow_a_replaced_resolv_conf() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let servers: Vec<String> = vec![
        net.remote_addr.clone(),
        net.add_remote_addr(3),
        net.add_remote_addr(4),
    ];
    let mut hosts: Vec<Option<TestHost>> = servers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Some(TestHost::start(
                &net.remote,
                &[a, "--dns", "53", &format!("who.test=10.0.0.{}", i + 1)],
            ))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let conf = |name: &str, servers: &[&String]| {
        let p = dir.path().join(name);
        let text: String = servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        std::fs::write(&p, text).unwrap();
        p
    };
    let first = conf("first.conf", &[&servers[0], &servers[1]]);
    let third = conf("third.conf", &[&servers[2]]);
    let resolv = dir.path().join("resolv.conf");
    std::os::unix::fs::symlink(&first, &resolv).unwrap();
    let sock = dir.path().join("net.sock");
    let api = dir.path().join("api.sock");
    let t = ferry_tests::tools_share(dir.path());
    let ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--resolv-conf".into(),
            resolv.display().to_string(),
            "--api-socket".into(),
            api.display().to_string(),
            "--share".into(),
            t.share.clone(),
        ],
        &[sock.clone(), t.socket.clone(), api.clone()],
    );
    let mut qemu = Qemu::boot(
        dir.path(),
        &GuestSpec {
            script: SCRIPT.into(),
            net_socket: Some(sock.clone()),
            shares: vec![("tools".into(), t.socket.clone())],
            ..Default::default()
        },
    );
    let fail = |e: String, ferry: &FerryProcess| panic!("{e}\nferry log:\n{}", ferry.log_tail());
    if let Err(e) = qemu.wait_console("FERRY-STEP 1", DEADLINE) {
        fail(e, &ferry);
    }
    let stats = api_get(&api, "/stats");
    assert_eq!(
        stats["net"]["dns_servers"],
        serde_json::json!([format!("{}:53", servers[0]), format!("{}:53", servers[1])]),
        "the servers of the resolv.conf, in order"
    );
    // The first server goes away.
    hosts[0] = None;
    std::fs::write(t.dir.join("go-1"), b"").unwrap();
    if let Err(e) = qemu.wait_console("FERRY-STEP 2", DEADLINE) {
        fail(e, &ferry);
    }
    assert_eq!(
        api_get(&api, "/stats")["net"]["dns_servers"][0],
        serde_json::json!(format!("{}:53", servers[1])),
        "the server that answered is asked first"
    );
    // The network changes: the symlink is replaced (a new one renamed over it).
    let tmp = dir.path().join("resolv.conf.new");
    std::os::unix::fs::symlink(&third, &tmp).unwrap();
    std::fs::rename(&tmp, &resolv).unwrap();
    // ferry looks every 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    std::fs::write(t.dir.join("go-2"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(4, &format!("ferry log:\n{}", ferry.log_tail()));
    assert!(
        ferry.log_text().contains("changed: forwarding to"),
        "{}",
        ferry.log_tail()
    );
    drop(hosts);
}
