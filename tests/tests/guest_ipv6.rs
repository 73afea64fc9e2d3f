//! IPv6 for the guest, end to end. The guest (NIC MAC left to QEMU's default) brings IPv6 up
//! as a distribution does: SLAAC from ferry's router advertisement and a stateless DHCPv6
//! client for its DNS server. Then, over IPv6 only: DNS to the gateway (AAAA for ferry's own
//! names and for an upstream name; the upstream is IPv6-only, over UDP and over TCP), ping, HTTP and UDP to an IPv6-only test host, a `reject`
//! rule's ICMPv6 port unreachable, the host alias (either family) reaching a server on the
//! host's `::1`, and
//! published TCP and UDP ports whose IPv6 clients the guest sees with their own addresses;
//! and, in both families, traceroute (UDP), echo requests and TCP connects (as tcptraceroute)
//! with short TTLs to a host one router further, each hop answering from its own address,
//! ferry's gateway the first; the
//! router's MTU errors; TCP connects with no route or no host met by ICMP, not RST; and a
//! guest set up for stateful DHCPv6 gets an address of its own that works.
//!
//! Ferry runs in a test namespace with no route out; the "outside" is a test host on a veth
//! link (`tests/servers/testhosts.py`) with an IPv4 and an IPv6 address. Nothing leaves the
//! namespaces the test made.

use std::time::Duration;

use ferry_tests::{clients, FerryProcess, GuestSpec, Qemu, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(180);
const PAGE: &str = "served over IPv6 by the remote host";
const LOOPBACK_PAGE: &str = "served on the host's ::1";

/// The guest's IPv6 prefix, gateway and host alias with ferry's defaults.
const PREFIX: &str = "fd46:6572:7279::";
/// What every address in the prefix starts with as `ip` prints it (a SLAAC address's fourth
/// group, zero, is written out, not folded into `::`).
const IN_PREFIX: &str = "fd46:6572:7279:";
const GATEWAY6: &str = "fd46:6572:7279::1";
const ALIAS6: &str = "fd46:6572:7279::fe";

/// The far side's addresses and the router's before it (`TestNet::add_far_side`).
struct Far<'a> {
    far: &'a str,
    far6: &'a str,
    router: &'a str,
    router6: &'a str,
    /// An address on the far link that nobody has.
    nobody: &'a str,
}

fn script(remote: &str, remote6: &str, path: &Far) -> String {
    let Far {
        far,
        far6,
        router,
        router6,
        nobody,
    } = path;
    format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
P=/mnt/tools/probe
check slaac "$(ip -6 -o addr show dev eth0 scope global | grep -v tentative | grep -c 'inet6 {IN_PREFIX}')" 1
check router "$(ip -6 route show default | grep -c 'via fe80::1 ')" 1
check dns-server "$(grep -c '^nameserver {GATEWAY6}$' /etc/resolv.conf)" 1
check aaaa-alias "$(nslookup -type=AAAA host.ferry.internal {GATEWAY6} 2>&1 | grep -c 'Address.*{ALIAS6}$')" 1
check aaaa-remote "$(nslookup -type=AAAA remote6.test {GATEWAY6} 2>&1 | grep -c 'Address.*{remote6}$')" 1
# The upstream DNS server is IPv6-only: over UDP and, relayed by the gateway, over TCP.
check dns-tcp-v6-upstream "$($P dnstcp 192.168.127.1 remote4.test)" {remote}
check ping6 "$(ping -6 -c 1 -W 3 {remote6} 2>&1 | grep -c 'bytes from')" 1
# Two addresses at once, as a guest with privacy addresses has (a stable one and a temporary
# one, RFC 8981): a datagram from each, both out before the late echo server answers either,
# and each echo reaches the address its datagram came from.
A1=$(ip -6 -o addr show dev eth0 scope global | grep -v tentative | sed -n 's/.*inet6 \([^/]*\).*/\1/p' | head -1)
ip -6 addr add {PREFIX}beef/64 dev eth0
i=0; while ip -6 addr show dev eth0 | grep -q tentative && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
check two-addresses "$($P udpfrom {remote6} 7781 $A1 {PREFIX}beef)" "2 of 2"
ip -6 addr del {PREFIX}beef/64 dev eth0
# (busybox 1.35's wget crashes with -T and an IPv6 peer: no -T here.)
check http6 "$(wget -q -O - http://remote6.test:8000/index.html)" "{PAGE}"
check http6-literal "$(wget -q -O - 'http://[{remote6}]:8000/index.html')" "{PAGE}"
check udp6 "$($P udp {remote6} 7777 100)" "100 SAME"
check udp6-big "$($P udp {remote6} 7777 1400)" "1400 SAME"
check reject6 "$($P udp {remote6} 7779 100)" errno:ECONNREFUSED
# No server on 7778: the test host's ICMPv6 port unreachable reaches the guest.
check refused6 "$($P udp {remote6} 7778 100)" errno:ECONNREFUSED
check host-alias6 "$(wget -q -O - 'http://[{ALIAS6}]:8100/index.html')" "{LOOPBACK_PAGE}"
# The IPv4 alias reaches a server on the host's ::1 only too (and the IPv6 one a server on
# 127.0.0.1 only: guest_net's downloads by name): the alias is the host's loopback.
check host-alias4-to-v6-loopback "$(wget -q -O - 'http://192.168.127.254:8100/index.html')" "{LOOPBACK_PAGE}"
# Larger than the link: the guest sends it in IPv6 fragments and ferry puts them together;
# the echo comes back in ferry's fragments. Then the same at the MTU most guests keep.
check udp6-65507 "$($P udp {remote6} 7777 65507)" "65507 SAME"
ip link set eth0 mtu 1500
check udp6-8000-at-mtu-1500 "$($P udp {remote6} 7777 8000)" "8000 SAME"
# Ferry is the guest's router: a probe whose TTL ends at the gateway gets "time exceeded"
# from it, the next from the test network's router, and the last reaches the far host (its
# port unreachable, or its echo reply), in either family, UDP and ICMP, as traceroute and
# mtr send them.
# Two probes a hop, the first address that answered each (one lost probe prints "*").
hops() {{ awk '/^ *[0-9]/ {{ a = "*"; for (i = 2; i <= NF; i++) if ($i ~ /[.:]/) {{ a = $i; break }}; print a }}' | tr '\n' ' '; }}
check traceroute "$(traceroute -n -q 2 -w 2 -m 5 {far} 2>/dev/null | hops)" "192.168.127.1 {router} {far} "
check traceroute6 "$(traceroute6 -n -q 2 -w 2 -m 5 {far6} 2>/dev/null | hops)" "{GATEWAY6} {router6} {far6} "
check ping-ttl "$($P pingttl {far} 1) $($P pingttl {far} 2) $($P pingttl {far} 3)" "time-exceeded 192.168.127.1 time-exceeded {router} reply {far}"
check ping-ttl6 "$($P pingttl {far6} 1) $($P pingttl {far6} 2) $($P pingttl {far6} 3)" "time-exceeded {GATEWAY6} time-exceeded {router6} reply {far6}"
# TCP as tcptraceroute probes: a SYN on its last hop expires at the gateway, the next at the
# router (its error passed on from it), the last reaches the far host, which has no listener.
check tcp-ttl "$($P tcpttl {far} 9 1) $($P tcpttl {far} 9 2) $($P tcpttl {far} 9 3)" "time-exceeded 192.168.127.1 time-exceeded {router} errno:ECONNREFUSED"
check tcp-ttl6 "$($P tcpttl {far6} 9 1) $($P tcpttl {far6} 9 2) $($P tcpttl {far6} 9 3)" "time-exceeded {GATEWAY6} time-exceeded {router6} errno:ECONNREFUSED"
# The far link's MTU is 1400: the router's "fragmentation needed" and "packet too big" reach
# the guest, whose socket hears EMSGSIZE and learns the path's MTU.
check pmtu "$($P udp {far} 9 1450)" "errno:EMSGSIZE mtu 1400"
check pmtu6 "$($P udp {far6} 9 1450)" "errno:EMSGSIZE mtu 1400"
# A connect the host cannot make, with no route (ferry's namespace has none to 203.0.113.0/24
# or 2001:db8::/32) or no host behind the router (its ARP goes unanswered): the guest hears
# ICMP from the gateway, as behind any router, not a reset.
check tcp-no-route "$($P connect 203.0.113.9 80 3000)" errno:ENETUNREACH
check tcp-no-route6 "$($P connect 2001:db8::9 80 3000)" errno:ENETUNREACH
check tcp-no-host "$($P connect {nobody} 80 8000)" errno:EHOSTUNREACH
$P tcppeer 81 &
$P udpecho 7 &
# Ready once both listen (the host's clients come at once; a slower guest kernel, 6.12's,
# was not there yet and the published port's client was reset).
i=0; while ! grep -q ':0051 ' /proc/net/tcp6 || ! grep -q ':0007 ' /proc/net/udp6; do [ $i -lt 100 ] || break; sleep 0.1; i=$((i+1)); done
echo FERRY-READY
i=0; while [ ! -e /mnt/tools/host-done ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
# A guest set up for stateful DHCPv6 (dhcpcd's ia_na; NetworkManager's ipv6.method=dhcp):
# ferry leases it an address of its own in the prefix (a /128), which works as any other.
dhcpcd -x eth0 >/dev/null 2>&1
printf 'ipv6only\nnoipv4ll\nnodelay\nia_na 1\n' > /tmp/na.conf
dhcpcd -b -f /tmp/na.conf eth0 >/tmp/na.log 2>&1
i=0; while ! ip -6 addr show dev eth0 | grep -v tentative | grep -q "inet6 {IN_PREFIX}.*/128" && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
NA=$(ip -6 addr show dev eth0 | grep -v tentative | sed -n 's|.*inet6 \({IN_PREFIX}[^/]*\)/128.*|\1|p' | head -1)
check dhcpv6-address "$(echo "$NA" | grep -c .)" 1
check dhcpv6-address-works "$($P udpfrom {remote6} 7781 $NA)" "1 of 1"
"#
    )
}

#[test]
fn a_guest_gets_ipv6_by_slaac_and_dhcpv6_and_reaches_ipv6_hosts() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let (remote, remote6) = (net.remote_addr.clone(), net.remote_addr6.clone());
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), format!("{PAGE}\n")).unwrap();
    let lo_www = tempfile::tempdir().unwrap();
    std::fs::write(
        lo_www.path().join("index.html"),
        format!("{LOOPBACK_PAGE}\n"),
    )
    .unwrap();
    let www_dir = www.path().display().to_string();
    let lo_dir = lo_www.path().display().to_string();
    // The remote host, on its IPv6 address only: DNS (ferry's upstream) and the servers.
    let _dns = TestHost::start(
        &net.remote,
        &[
            &remote6,
            "--dns",
            "53",
            &format!("remote6.test={remote6}"),
            &format!("remote4.test={remote}"),
        ],
    );
    let _host6 = TestHost::start(
        &net.remote,
        &[
            &remote6,
            "--echo",
            "7777",
            "--echo",
            "7779",
            "--echo-late",
            "7781",
            "300",
            "--http",
            "8000",
            &www_dir,
        ],
    );
    // A server on the host's ::1 only, for the host alias.
    let _loopback = TestHost::start(&net.inner, &["::1", "--http", "8100", &lo_dir]);
    net.allow_ping_sockets();
    let far = net
        .add_far_side()
        .expect("make a host one router further (needs root and iproute2)");
    let nobody = format!("{}.99", far.addr.rsplit_once('.').map_or("", |(n, _)| n));
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
            format!("[{remote6}]:53"),
            "--share".into(),
            t.share.clone(),
            "--rule".into(),
            "reject,proto=udp,port=7779".into(),
            "--publish".into(),
            "8081:81".into(),
            "--publish".into(),
            "udp/5300:7".into(),
        ],
        &[sock.clone(), t.socket.clone()],
    );
    let mut qemu = Qemu::boot(
        dir.path(),
        &GuestSpec {
            script: script(
                &remote,
                &remote6,
                &Far {
                    far: &far.addr,
                    far6: &far.addr6,
                    router: &net.remote_addr,
                    router6: &net.remote_addr6,
                    nobody: &nobody,
                },
            ),
            net_socket: Some(sock.clone()),
            shares: vec![("tools".into(), t.socket.clone())],
            ..Default::default()
        },
    );
    qemu.wait_console("FERRY-READY", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    // Clients on the remote host reach the guest's published ports over IPv6, and the guest
    // sees their own IPv6 address.
    let inner6 = net.inner_addr6.clone();
    let peer = clients(&net.remote, &["peer", &inner6, "8081"]);
    let echo = clients(
        &net.remote,
        &["udp", &inner6, "5300", "through-5300-over-ipv6"],
    );
    // An IPv4 client of the same port is still seen with its IPv4 address.
    let peer4 = clients(&net.remote, &["peer", &net.inner_addr, "8081"]);
    std::fs::write(t.dir.join("host-done"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(31, &format!("ferry log:\n{}", ferry.log_tail()));
    assert!(
        peer.starts_with(&format!("[{remote6}]:")),
        "the guest saw the published port's IPv6 client as {peer:?}, not [{remote6}]"
    );
    assert!(
        peer4.starts_with(&format!("{remote}:")),
        "the guest saw the published port's IPv4 client as {peer4:?}, not {remote}"
    );
    assert_eq!(echo, "through-5300-over-ipv6", "published UDP over IPv6");
    assert!(ferry.is_running());
}
