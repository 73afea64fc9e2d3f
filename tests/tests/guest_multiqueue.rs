//! Guest end-to-end: a NIC with two queue pairs (QEMU's `queues=2`, libvirt's `<driver
//! queues='2'/>`). The guest sees both pairs, and four uploads at once from its two vCPUs, with
//! their ACKs back, travel on both: ferry's per-pair counters (`/stats`) show frames each way on
//! each pair. Before ferry offered multiqueue, this NIC never came up.
//!
//! Ferry runs in a test namespace with no route out; the uploads go to a test host on a veth
//! link.

use std::time::Duration;

use ferry_tests::{FerryProcess, GuestSpec, Qemu, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(240);
const SIZE: usize = 8 << 20;

#[test]
fn two_queue_pairs_carry_traffic_on_both() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let _host = TestHost::start(
        &net.remote,
        &[&remote, "--tcp-sha", "7001", &SIZE.to_string()],
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let api = dir.path().join("api.sock");
    let ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--api-socket".into(),
            api.display().to_string(),
            "--dns-upstream".into(),
            "127.0.0.1:1".into(),
        ],
        &[sock.clone(), api.clone()],
    );
    let script = format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
check queues "$(ls /sys/class/net/eth0/queues | tr '\n' ' ')" "rx-0 rx-1 tx-0 tx-1 "
for i in 1 2 3 4; do
  (head -c {SIZE} /dev/zero | nc {remote} 7001 > /tmp/up-$i) &
done
wait
check uploads "$(cat /tmp/up-* | sort -u | wc -l) $(cat /tmp/up-* | wc -l)" "1 4"
echo FERRY-QUIET; sleep 3
"#
    );
    let mut qemu = Qemu::boot(
        dir.path(),
        &GuestSpec {
            script,
            net_socket: Some(sock.clone()),
            memory_mib: 256,
            queue_pairs: 2,
            ..Default::default()
        },
    );
    // While the guest sits idle: where its rings stand, as /stats shows them.
    if let Err(e) = qemu.wait_console("FERRY-QUIET", DEADLINE) {
        panic!("{e}\nferry log:\n{}", ferry.log_tail());
    }
    let rings = ferry_tests::api_get(&api, "/stats")["net"]["rings"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let at = |r: &serde_json::Value, k: &str| r[k].as_u64().unwrap_or(u64::MAX);
    for r in &rings {
        let i = at(r, "index");
        if i >= 4 {
            // Pairs the guest did not set up.
            assert_eq!(r["ready"], false, "ring {i}: {r}");
            continue;
        }
        assert!(r["ready"] == true && r["enabled"] == true, "ring {i}: {r}");
        // Everything the device took it gave back; an idle TX ring has nothing waiting, and
        // RX rings hold the guest's spare buffers, at most a ring's worth.
        assert_eq!(at(r, "used_idx"), at(r, "next_used"), "ring {i}: {r}");
        let waiting = (at(r, "avail_idx") as u16).wrapping_sub(at(r, "next_avail") as u16);
        if i % 2 == 1 {
            assert_eq!(waiting, 0, "TX ring {i} has frames waiting: {r}");
        } else {
            assert!(waiting <= at(r, "size") as u16, "ring {i}: {r}");
        }
        assert!(
            r["used_event"].is_u64() && r["avail_event"].is_u64(),
            "ring {i}: {r}"
        );
    }
    assert!(rings.len() >= 4, "rings in /stats: {rings:?}");
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(2, &format!("ferry log:\n{}", ferry.log_tail()));
    let s = ferry_tests::api_get(&api, "/stats");
    let pairs = s["net"]["queue_pairs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let count = |p: usize, k: &str| pairs.get(p).and_then(|v| v[k].as_u64()).unwrap_or(0);
    for p in 0..2 {
        assert!(
            count(p, "tx_frames") > 0 && count(p, "rx_frames") > 0,
            "pair {p} carried nothing one way: {pairs:?}\nferry log:\n{}",
            ferry.log_tail()
        );
    }
    for p in 2..pairs.len() {
        assert_eq!(
            count(p, "tx_frames") + count(p, "rx_frames"),
            0,
            "pair {p} is not set up"
        );
    }
}
