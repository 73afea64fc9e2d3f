//! DNS that follows the host: ferry forwards to every nameserver of its resolv.conf in order,
//! passes a query on when a server is gone, and follows the file when it is replaced.
//!
//! Three DNS test hosts on the remote link answer one name each their own way. Ferry reads a
//! resolv.conf of the test's (`--resolv-conf`, a symlink, as systemd-resolved and
//! NetworkManager make it) naming the first two. The guest resolves the name (the first
//! answers); the test stops the first server, and the guest's next lookup is answered by the
//! second within one resolver timeout; the test replaces the symlink with one naming the
//! third, and the guest's next lookup reaches it without a ferry restart. `/stats` names the
//! servers in use. Names come from the host too: a hosts file of the test's (`--hosts-file`,
//! a loopback entry becoming the host alias, an entry added while ferry runs) and a record set
//! and deleted with `ferry ctl dns`. A split zone (`--dns-zone`) goes to its own server.

use std::time::Duration;

use ferry_tests::{api_get, FerryProcess, GuestSpec, Qemu, TestHost, TestNet};

use ferry_tests::ferry_ctl as ctl;

const DEADLINE: Duration = Duration::from_secs(180);

const SCRIPT: &str = r#"
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
lookup() { nslookup -type=A who.test 2>&1 | awk '/^Address/ {a=$2} END {print a}'; }
step() { echo "FERRY-STEP $1"; i=0; while [ ! -e /mnt/tools/go-$1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; }
check first "$(lookup)" 10.0.0.1
check search "$(grep -c '^search ferry.internal corp.test$' /etc/resolv.conf)" 1
name() { nslookup -type=A "$1" 2>&1 | grep -c "Address.*$2\$"; }
check hosts-file "$(name build.corp.test 10.0.0.77)" 1
check split-zone "$(name who.corp.test 10.0.0.44)" 1
check hosts-loopback-is-alias "$(name local.corp.test 192.168.127.254)" 1
# Over TCP (a resolver's retry after a truncated answer) each name goes where it does over
# UDP: the split zone's server, ferry's own names, the hosts file.
P=/mnt/tools/probe
check split-zone-tcp "$($P dnstcp 192.168.127.1 who.corp.test)" 10.0.0.44
check own-name-tcp "$($P dnstcp 192.168.127.1 host.ferry.internal)" 192.168.127.254
check hosts-file-tcp "$($P dnstcp 192.168.127.1 build.corp.test)" 10.0.0.77
step 1
check record "$(name app.test 10.0.0.88)" 1
t0=$(cut -d' ' -f1 /proc/uptime)
check failover "$(lookup)" 10.0.0.2
t1=$(cut -d' ' -f1 /proc/uptime)
check failover-fast "$(awk -v a=$t0 -v b=$t1 'BEGIN {print (b - a < 5) ? "yes" : "no " b - a}')" yes
step 2
check followed "$(lookup)" 10.0.0.3
check hosts-file-followed "$(name late.corp.test 10.0.0.99)" 1
check record-deleted "$(name app.test 10.0.0.88)" 0
"#;

#[test]
fn lookups_fail_over_follow_a_replaced_resolv_conf_and_answer_the_hosts_names() {
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
    // Split DNS: a fourth server answers corp.test's names, and only it is asked for them.
    let zone_server = net.add_remote_addr(5);
    let _zone = TestHost::start(
        &net.remote,
        &[&zone_server, "--dns", "53", "who.corp.test=10.0.0.44"],
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = |name: &str, servers: &[&String]| {
        let p = dir.path().join(name);
        let text: String = servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        // The host's search domain, which the guest gets after ferry.internal.
        std::fs::write(&p, format!("search corp.test\n{text}")).unwrap();
        p
    };
    let first = conf("first.conf", &[&servers[0], &servers[1]]);
    let third = conf("third.conf", &[&servers[2]]);
    let hosts_file = dir.path().join("hosts");
    std::fs::write(
        &hosts_file,
        "10.0.0.77 build.corp.test\n127.0.0.1 local.corp.test\n",
    )
    .unwrap();
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
            "--hosts-file".into(),
            hosts_file.display().to_string(),
            "--dns-zone".into(),
            format!("corp.test={zone_server}"),
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
    // The first server goes away; a record is set.
    hosts[0] = None;
    let o = ctl(&api, &["dns", "add", "app.test", "10.0.0.88"]);
    assert!(o.status.success(), "ferry ctl dns add: {o:?}");
    std::fs::write(t.dir.join("go-1"), b"").unwrap();
    if let Err(e) = qemu.wait_console("FERRY-STEP 2", DEADLINE) {
        fail(e, &ferry);
    }
    assert_eq!(
        api_get(&api, "/stats")["net"]["dns_servers"][0],
        serde_json::json!(format!("{}:53", servers[1])),
        "the server that answered is asked first"
    );
    // The record goes; the hosts file gains a name; the network changes: the symlink is
    // replaced (a new one renamed over it).
    let o = ctl(&api, &["dns", "delete", "app.test"]);
    assert!(o.status.success(), "ferry ctl dns delete: {o:?}");
    let listed = ctl(&api, &["dns"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("no DNS records"),
        "{listed:?}"
    );
    std::fs::write(
        &hosts_file,
        "10.0.0.77 build.corp.test\n10.0.0.99 late.corp.test\n",
    )
    .unwrap();
    let tmp = dir.path().join("resolv.conf.new");
    std::os::unix::fs::symlink(&third, &tmp).unwrap();
    std::fs::rename(&tmp, &resolv).unwrap();
    // ferry looks every 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    std::fs::write(t.dir.join("go-2"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(14, &format!("ferry log:\n{}", ferry.log_tail()));
    assert!(
        ferry.log_text().contains("changed: forwarding to"),
        "{}",
        ferry.log_tail()
    );
    drop(hosts);
}
