//! A guest configured its own way: ferry learns its MAC and address from its frames. One ferry
//! serves two boots: a guest whose NIC has QEMU's default MAC and takes its lease by DHCP, then
//! one with a libvirt-style `52:54:00:…` MAC that sets the static address `.50` itself. Each
//! does DNS, TCP, UDP and ICMP echo to a test host, is refused by a `reject` rule with ICMP port
//! unreachable, and serves published TCP and UDP ports to host clients. Each also echoes a
//! 65,507-byte datagram, and an 8,000-byte one with its MTU set to 1500, which it fragments.
//! Each checks that a TCP segment from ferry carries a checksum that holds if the guest sends
//! it on (partial, finished by the guest, where it negotiated GUEST_CSUM), and asks the DHCP
//! server from its address, as a bound client does (a renewal, or an INFORM from the static
//! guest), and gets the answer there.
//! A third boot does it all on a legacy NIC (virtio 0.9, as old guests speak it) without
//! offloads or mergeable RX buffers (`disable-modern=on,csum=off,guest_csum=off,mrg_rxbuf=off`):
//! every frame has the 10-byte legacy header, and every frame ferry sends must carry its TCP
//! and UDP checksums and fit one of the 1,518-byte buffers such a guest posts.
//!
//! Ferry runs in a test namespace with no route out; the "outside" is a test host on a veth
//! link (`tests/servers/testhosts.py`). Nothing leaves the namespaces the test made.

use std::time::Duration;

use ferry_tests::{clients, FerryProcess, GuestSpec, Qemu, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(180);
const PAGE: &str = "served by a guest ferry learned";

/// The guest's checks; `setup` configures its NIC first, `addr` is the address it ends with.
fn script(setup: &str, mac: &str, addr: &str, remote: &str) -> String {
    format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
P=/mnt/tools/probe
{setup}
check mac "$(cat /sys/class/net/eth0/address)" "{mac}"
check address "$(ip -4 -o addr show eth0 | grep -c ' {addr}/24')" 1
check dns "$(nslookup remote.test 2>&1 | grep -c 'Address.*{remote}')" 1
# 150 A records, 2,427 bytes: more than a guest without mergeable buffers takes in one frame.
check dns-large "$($P dnsudp $(sed -n 's/^nameserver //p' /etc/resolv.conf | head -1) many.test)" "150 2427"
check tcp "$(nc {remote} 7000 | wc -c)" 65536
check udp "$($P udp {remote} 7777 100)" "100 SAME"
check ping "$(ping -c 1 -W 3 {remote} 2>&1 | grep -c 'bytes from')" 1
check ping-4000 "$(ping -c 1 -W 3 -s 4000 {remote} 2>&1 | grep -c '4008 bytes from')" 1
check reject-udp "$($P udp {remote} 7779 100)" errno:ECONNREFUSED
# No server on 7778: the test host's port unreachable reaches the guest through ferry.
check refused-udp "$($P udp {remote} 7778 100)" errno:ECONNREFUSED
# The SYN-ACK's checksum as a guest that routes the segment on sends it: finished where the
# device left it partial, and correct.
check tcp-checksum "$($P tcpcsum {remote} 7000)" ok
# A bound client asks from its address, and reads the answer from a socket bound there.
if [ "{addr}" = 192.168.127.2 ]; then
	check dhcp-renew "$($P dhcp eth0 192.168.127.1 request)" "ack {addr}"
else
	check dhcp-inform "$($P dhcp eth0 192.168.127.1 inform)" "ack 0.0.0.0"
fi
check udp-65507 "$($P udp {remote} 7777 65507)" "65507 SAME"
# With the MTU most guests keep when they ignore DHCP's, the guest fragments its datagram and
# ferry puts it back together.
ip link set eth0 mtu 1500
check udp-8000-at-mtu-1500 "$($P udp {remote} 7777 8000)" "8000 SAME"
mkdir -p /www && echo '{PAGE}' > /www/index.html && httpd -p 80 -h /www
$P udpecho 7 &
echo FERRY-READY
i=0; while [ ! -e /mnt/tools/host-done ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
rm -f /mnt/tools/host-done
"#
    )
}

#[test]
fn a_guest_with_any_mac_and_a_static_address_works_in_full() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let host_args: Vec<String> = [
        &remote,
        "--echo",
        "7777",
        "--echo",
        "7779",
        "--tcp-blob",
        "7000",
        "65536",
        "--dns",
        "53",
        &format!("remote.test={remote}"),
    ]
    .into_iter()
    .map(String::from)
    .chain((1..=150).map(|i| format!("many.test=10.9.0.{i}")))
    .collect();
    let _host = TestHost::start(
        &net.remote,
        &host_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    net.allow_ping_sockets();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let t = ferry_tests::tools_share(dir.path());
    let mut ferry = FerryProcess::serve_in(
        Some(&net.inner),
        dir.path(),
        &[
            "--net-socket".into(),
            sock.display().to_string(),
            "--dns-upstream".into(),
            format!("{remote}:53"),
            "--share".into(),
            t.share.clone(),
            "--rule".into(),
            "reject,proto=udp,port=7779".into(),
            "--publish".into(),
            "8080:80".into(),
            "--publish".into(),
            "udp/5300:7".into(),
        ],
        &[sock.clone(), t.socket.clone()],
    );
    let static_setup = "ip link set eth0 up\nip addr add 192.168.127.50/24 dev eth0\n\
                        ip route add default via 192.168.127.1\n\
                        echo nameserver 192.168.127.1 > /etc/resolv.conf";
    // (QEMU's MAC option, its other NIC options, the guest's own setup, the MAC it shows, the
    // address it ends with)
    let boots = [
        (None, "", "", "52:54:00:12:34:56", "192.168.127.2"),
        (
            Some("52:54:00:6b:3c:01"),
            "",
            static_setup,
            "52:54:00:6b:3c:01",
            "192.168.127.50",
        ),
        (
            Some("52:54:00:6b:3c:02"),
            ",disable-modern=on,disable-legacy=off,csum=off,guest_csum=off,mrg_rxbuf=off",
            "",
            "52:54:00:6b:3c:02",
            "192.168.127.2",
        ),
    ];
    for (qemu_mac, nic_options, setup, mac, addr) in boots {
        let mut qemu = Qemu::boot(
            dir.path(),
            &GuestSpec {
                script: script(setup, mac, addr, &remote),
                net_socket: Some(sock.clone()),
                shares: vec![("tools".into(), t.socket.clone())],
                mac: qemu_mac.map(str::to_string),
                nic_options: nic_options.into(),
                no_dhcp: !setup.is_empty(),
                ..Default::default()
            },
        );
        qemu.wait_console("FERRY-READY", DEADLINE)
            .unwrap_or_else(|e| panic!("{mac}: {e}\nferry log:\n{}", ferry.log_tail()));
        // Published ports reach the guest at the address it uses.
        let page = TestNet::command(&net.inner, "curl")
            .args(["-sS", "-m", "20", "http://127.0.0.1:8080/"])
            .output()
            .expect("run curl");
        let echo = clients(&net.inner, &["udp", "127.0.0.1", "5300", "through-5300"]);
        // The largest datagram, both ways through the published port: ferry sends it to the
        // guest in fragments (it is more than the link's MTU), the guest answers in fragments.
        let big = "x".repeat(65507);
        let big_echo = clients(&net.inner, &["udp", "127.0.0.1", "5300", &big]);
        std::fs::write(t.dir.join("host-done"), b"").unwrap();
        let out = qemu
            .wait_done(DEADLINE)
            .unwrap_or_else(|e| panic!("{mac}: {e}\nferry log:\n{}", ferry.log_tail()));
        let failed: Vec<_> = out.checks.iter().filter(|c| !c.ok).collect();
        assert!(
            failed.is_empty() && out.checks.len() == 14,
            "{mac}: {} checks, failed: {failed:#?}\nconsole:\n{}\nferry log:\n{}",
            out.checks.len(),
            ferry_tests::tail(&out.console, 40),
            ferry.log_tail()
        );
        assert_eq!(
            String::from_utf8_lossy(&page.stdout).trim(),
            PAGE,
            "{mac}: published TCP: {}",
            String::from_utf8_lossy(&page.stderr)
        );
        assert_eq!(echo, "through-5300", "{mac}: published UDP");
        assert!(
            big_echo == big,
            "{mac}: a 65,507-byte datagram through the published port came back as {} bytes",
            big_echo.len()
        );
    }
    assert!(ferry.is_running());
    let log = ferry.log_text();
    assert!(
        log.contains("the guest uses MAC 52:54:00:6b:3c:01"),
        "{log}"
    );
    assert!(
        log.contains("the guest uses address 192.168.127.50"),
        "{log}"
    );
}
