//! The stack over IPv6, frame by frame: the link's services (router advertisements, neighbour
//! discovery, DHCPv6, DNS), the NAT to host sockets on the host's `::1` through the host
//! alias, and hostile input.

use super::*;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6Packet, Icmpv6Repr, IpProtocol,
    Ipv6Packet, Ipv6Repr, NdiscRepr, TcpPacket, UdpPacket, UdpRepr,
};
use std::net::Ipv6Addr;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn guest_ll() -> Ipv6Addr {
    "fe80::5054:ff:fe12:3456".parse().unwrap()
}

fn guest_global(cfg: &NetConfig) -> Ipv6Addr {
    let mut o = cfg.gateway6().octets();
    o[8..].copy_from_slice(&[0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56]);
    Ipv6Addr::from(o)
}

/// An IPv6 frame from the guest, its payload written by `emit`.
fn frame6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    dst_mac: [u8; 6],
    proto: IpProtocol,
    hop_limit: u8,
    payload_len: usize,
    emit: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv6,
    };
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len,
        hop_limit,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + payload_len];
    let mut f = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut f);
    let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p);
    emit(p.payload_mut());
    buf
}

fn icmp6_frame(src: Ipv6Addr, dst: Ipv6Addr, dst_mac: [u8; 6], icmp: &Icmpv6Repr) -> Vec<u8> {
    frame6(
        src,
        dst,
        dst_mac,
        IpProtocol::Icmpv6,
        255,
        icmp.buffer_len(),
        |b| {
            icmp.emit(
                &src,
                &dst,
                &mut Icmpv6Packet::new_unchecked(b),
                &Default::default(),
            );
        },
    )
}

fn udp6_frame(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, data: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: sport,
        dst_port: dport,
    };
    frame6(
        src,
        dst,
        GATEWAY_MAC,
        IpProtocol::Udp,
        64,
        udp.header_len() + data.len(),
        |b| {
            udp.emit(
                &mut UdpPacket::new_unchecked(b),
                &src.into(),
                &dst.into(),
                data.len(),
                |p| p.copy_from_slice(data),
                &Default::default(),
            );
        },
    )
}

/// The IPv6 packets the stack sent, as (source, destination, next header, payload).
fn sent6(s: &mut NetStack) -> Vec<(Ipv6Addr, Ipv6Addr, IpProtocol, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(mut frame) = s.pop_frame() {
        // The guest's kernel finishes a partial checksum before it reads it (and sends the
        // packet on).
        frame.finish_checksum();
        let f = EthernetFrame::new_checked(&frame[..]).unwrap();
        if f.ethertype() != EthernetProtocol::Ipv6 {
            continue;
        }
        let p = Ipv6Packet::new_checked(f.payload()).unwrap();
        out.push((
            p.src_addr(),
            p.dst_addr(),
            p.next_header(),
            p.payload().to_vec(),
        ));
    }
    out
}

/// Runs the stack a few rounds, answering its neighbour solicitations for the guest's address
/// `me` as the guest would, and returns the other IPv6 packets it sent.
fn settle(s: &mut NetStack, me: Ipv6Addr) -> Vec<(Ipv6Addr, Ipv6Addr, IpProtocol, Vec<u8>)> {
    settle_as(s, &[me])
}

/// As [`settle`], for a guest that has each of the addresses `mine`.
fn settle_as(
    s: &mut NetStack,
    mine: &[Ipv6Addr],
) -> Vec<(Ipv6Addr, Ipv6Addr, IpProtocol, Vec<u8>)> {
    let mut out = Vec::new();
    for _ in 0..4 {
        s.handle_host_events();
        s.poll();
        for (src, dst, proto, p) in sent6(s) {
            // A neighbour solicitation: type 135, then code, checksum, reserved, the target.
            let target = p.get(8..24).and_then(|t| <[u8; 16]>::try_from(t).ok());
            let target = target.map(Ipv6Addr::from).filter(|t| mine.contains(t));
            if let (IpProtocol::Icmpv6, Some(&135), Some(me)) = (proto, p.first(), target) {
                let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                    flags: smoltcp::wire::NdiscNeighborFlags::SOLICITED,
                    target_addr: me,
                    lladdr: Some(smoltcp::wire::RawHardwareAddress::from_bytes(&GUEST_MAC)),
                });
                s.receive_frame(&icmp6_frame(me, src, GATEWAY_MAC, &na));
            } else if proto == IpProtocol::Icmpv6 && p.first() == Some(&135) {
            } else {
                out.push((src, dst, proto, p));
            }
        }
    }
    out
}

/// A stack whose guest has said who it is (a router solicitation from its link-local
/// address), with what that solicited answered.
fn stack() -> (NetStack, NetConfig) {
    let cfg = NetConfig::default();
    assert!(cfg.subnet6.is_some(), "IPv6 is on by default");
    let s = NetStack::new(cfg.clone(), None).unwrap();
    (s, cfg)
}

#[test]
fn a_router_solicitation_gets_an_advertisement_of_the_prefix() {
    let (mut s, cfg) = stack();
    let rs = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit {
        lladdr: Some(smoltcp::wire::RawHardwareAddress::from_bytes(&GUEST_MAC)),
    });
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    s.receive_frame(&icmp6_frame(
        guest_ll(),
        all_routers,
        [0x33, 0x33, 0, 0, 0, 2],
        &rs,
    ));
    s.poll();
    let sent = sent6(&mut s);
    let ra = sent
        .iter()
        .find(|(src, dst, proto, p)| {
            *src == cfg.gateway_ll()
                && *dst == guest_ll()
                && *proto == IpProtocol::Icmpv6
                && p.first() == Some(&134)
        })
        .unwrap_or_else(|| panic!("no advertisement to the guest in {sent:?}"));
    let pkt = Icmpv6Packet::new_checked(&ra.3[..]).unwrap();
    assert!(pkt.verify_checksum(&ra.0, &ra.1));
    match NdiscRepr::parse(&pkt).unwrap() {
        NdiscRepr::RouterAdvert {
            router_lifetime,
            prefix_info,
            ..
        } => {
            assert!(router_lifetime.secs() > 0);
            let p = prefix_info.expect("a prefix");
            let mut o = cfg.gateway6().octets();
            o[8..].fill(0);
            assert_eq!(p.prefix, Ipv6Addr::from(o));
            assert_eq!(p.prefix_len, 64);
        }
        other => panic!("not an advertisement: {other:?}"),
    }
}

#[test]
fn router_advertisements_and_redirects_from_the_guest_are_dropped() {
    let (mut s, cfg) = stack();
    // A guest claiming to be a router: nothing answers, nothing changes.
    let mut ra = icmp6_frame(
        guest_ll(),
        "ff02::1".parse().unwrap(),
        [0x33, 0x33, 0, 0, 0, 1],
        &Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: None }),
    );
    ra[54] = 134; // the type: an advertisement
    s.receive_frame(&ra);
    ra[54] = 137; // a redirect
    s.receive_frame(&ra);
    s.poll();
    assert!(sent6(&mut s)
        .iter()
        .all(|(src, _, _, p)| *src == cfg.gateway_ll() && p.first() == Some(&134)));
}

#[test]
fn neighbour_solicitations_for_the_router_are_answered() {
    let (mut s, cfg) = stack();
    let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: cfg.gateway_ll(),
        lladdr: Some(smoltcp::wire::RawHardwareAddress::from_bytes(&GUEST_MAC)),
    });
    let solicited: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
    s.receive_frame(&icmp6_frame(
        guest_ll(),
        solicited,
        [0x33, 0x33, 0xff, 0, 0, 1],
        &ns,
    ));
    s.poll();
    let sent = sent6(&mut s);
    assert!(
        sent.iter()
            .any(|(src, dst, _, p)| *src == cfg.gateway_ll() && *dst == guest_ll() && p[0] == 136),
        "no neighbour advertisement in {sent:?}"
    );
}

#[test]
fn duplicate_address_detection_teaches_the_guests_address_and_gets_no_answer() {
    let (mut s, cfg) = stack();
    let mine: Ipv6Addr = {
        let mut o = cfg.gateway6().octets();
        o[8..].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0x12, 0x34]);
        Ipv6Addr::from(o)
    };
    let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: mine,
        lladdr: None,
    });
    let o = mine.octets();
    let solicited = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    );
    s.receive_frame(&icmp6_frame(
        Ipv6Addr::UNSPECIFIED,
        solicited,
        [0x33, 0x33, 0xff, o[13], o[14], o[15]],
        &ns,
    ));
    s.poll();
    assert!(
        sent6(&mut s).iter().all(|(_, _, _, p)| p[0] != 136),
        "ferry must not claim the guest's tentative address"
    );
    assert_eq!(s.guest.ip6(), Some(mine));
}

#[test]
fn dhcpv6_information_requests_get_the_dns_server() {
    let (mut s, cfg) = stack();
    // An information request: type 11, transaction id, elapsed time, an option request
    // for DNS servers (23) and the domain list (24).
    let mut msg = vec![11, 1, 2, 3];
    msg.extend_from_slice(&[0, 8, 0, 2, 0, 0]);
    msg.extend_from_slice(&[0, 6, 0, 4, 0, 23, 0, 24]);
    let servers: Ipv6Addr = "ff02::1:2".parse().unwrap();
    s.receive_frame(&udp6_frame(guest_ll(), 546, servers, 547, &msg));
    s.poll();
    let sent = sent6(&mut s);
    let (src, dst, _, p) = sent
        .iter()
        .find(|(_, _, proto, _)| *proto == IpProtocol::Udp)
        .unwrap_or_else(|| panic!("no DHCPv6 reply in {sent:?}"));
    assert_eq!((*src, *dst), (cfg.gateway_ll(), guest_ll()));
    let u = UdpPacket::new_checked(&p[..]).unwrap();
    assert!(u.verify_checksum(&(*src).into(), &(*dst).into()));
    assert_eq!((u.src_port(), u.dst_port()), (547, 546));
    assert_eq!(
        &u.payload()[..4],
        &[7, 1, 2, 3],
        "a reply to our transaction"
    );
    let dns = cfg.gateway6().octets();
    assert!(
        u.payload().windows(16).any(|w| w == dns),
        "the gateway's address as DNS server"
    );
}

#[test]
fn dns_over_ipv6_answers_aaaa_for_the_host_alias() {
    let (mut s, cfg) = stack();
    // For a guest that takes partial checksums too: a zero UDP checksum is invalid in IPv6,
    // and Linux drops such a datagram whatever the device says; a partial one is finished.
    s.set_checksum_offload(true);
    let q = dns::query(5, "host.ferry.internal", dns::QTYPE_AAAA);
    let me = guest_global(&cfg);
    s.receive_frame(&udp6_frame(me, 40000, cfg.gateway6(), 53, &q));
    s.poll();
    // smoltcp asks who the guest is first, then answers.
    let answer = settle(&mut s, me)
        .into_iter()
        .find(|(src, dst, proto, _)| {
            *proto == IpProtocol::Udp && *src == cfg.gateway6() && *dst == me
        })
        .map(|(_, _, _, p)| p);
    let p = answer.expect("a DNS answer over IPv6");
    let u = UdpPacket::new_checked(&p[..]).unwrap();
    assert_ne!(u.checksum(), 0, "zero is no checksum, which IPv6 forbids");
    assert!(u.verify_checksum(&cfg.gateway6().into(), &me.into()));
    assert!(
        u.payload().ends_with(&cfg.host_alias6().octets()),
        "the host alias's IPv6 address"
    );
}

/// A UDP socket on the host's `::1` (reads time out after 5 s) and its port; None, said so,
/// where the host has no IPv6 loopback.
fn udp_server6() -> Option<(std::net::UdpSocket, u16)> {
    let Ok(server) = std::net::UdpSocket::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; skipped");
        return None;
    };
    server
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let port = server.local_addr().unwrap().port();
    Some((server, port))
}

#[test]
fn udp_to_the_host_alias_reaches_the_hosts_loopback_and_back() {
    let Some((server, port)) = udp_server6() else {
        return;
    };
    let (mut s, cfg) = stack();
    let me = guest_global(&cfg);
    s.receive_frame(&udp6_frame(me, 41000, cfg.host_alias6(), port, b"over six"));
    let mut buf = [0u8; 64];
    let (n, from) = server.recv_from(&mut buf).expect("the datagram on ::1");
    assert_eq!(&buf[..n], b"over six");
    server.send_to(b"and back", from).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let sent = settle(&mut s, me);
    assert!(
        sent.iter().any(|(src, dst, proto, p)| {
            *proto == IpProtocol::Udp
                && *src == cfg.host_alias6()
                && *dst == me
                && p.ends_with(b"and back")
        }),
        "no reply from the host alias in {sent:?}"
    );
    assert_eq!(s.stats().udp_flows, 1);
    assert!(s
        .flows()
        .iter()
        .any(|f| f.remote == SocketAddr::new(cfg.host_alias6().into(), port)));
}

/// A guest with a stable address and a temporary one (RFC 8981, as Ubuntu's default
/// `use_tempaddr=2` makes) uses both at once: each flow's replies go to the address it came
/// from, not to the one the guest spoke from last.
#[test]
fn replies_go_to_the_address_each_flow_came_from() {
    let Some((server, port)) = udp_server6() else {
        return;
    };
    let (mut s, cfg) = stack();
    let stable = guest_global(&cfg);
    let mut o = stable.octets();
    o[8..].copy_from_slice(&[0x3c, 0x91, 0x07, 0x5e, 0xa2, 0x44, 0x19, 0xd0]);
    let temporary = Ipv6Addr::from(o);
    let alias = cfg.host_alias6();
    // The stable address's flow first; then the temporary one's, which the guest was last
    // seen using when the replies come.
    let flows = [(stable, 41001u16), (temporary, 41002u16)];
    for (addr, sport) in flows {
        // Its neighbour advertisement, as after duplicate address detection (smoltcp asks
        // for one neighbour a second, which would hold the second reply that long).
        let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: smoltcp::wire::NdiscNeighborFlags::OVERRIDE,
            target_addr: addr,
            lladdr: Some(smoltcp::wire::RawHardwareAddress::from_bytes(&GUEST_MAC)),
        });
        s.receive_frame(&icmp6_frame(
            addr,
            "ff02::1".parse().unwrap(),
            [0x33, 0x33, 0, 0, 0, 1],
            &na,
        ));
        s.receive_frame(&udp6_frame(addr, sport, alias, port, &sport.to_be_bytes()));
    }
    let mut buf = [0u8; 64];
    for _ in flows {
        let (n, from) = server.recv_from(&mut buf).expect("a datagram on ::1");
        let mut reply = b"back to ".to_vec();
        reply.extend_from_slice(&buf[..n]);
        server.send_to(&reply, from).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let sent = settle_as(&mut s, &[stable, temporary]);
    for (addr, sport) in flows {
        let mut want = b"back to ".to_vec();
        want.extend_from_slice(&sport.to_be_bytes());
        assert!(
            sent.iter().any(|(src, dst, proto, p)| {
                *proto == IpProtocol::Udp
                    && *src == alias
                    && *dst == addr
                    && p.get(2..4) == Some(&sport.to_be_bytes()[..])
                    && p.ends_with(&want)
            }),
            "no reply to {addr} port {sport} in {sent:?}"
        );
        assert!(
            s.flows()
                .iter()
                .any(|f| f.guest == SocketAddr::new(addr.into(), sport)),
            "/flows shows the guest's end {addr}"
        );
    }
}

#[test]
fn a_tcp_syn_to_the_host_alias_connects_to_the_hosts_loopback_first() {
    let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    let (mut s, cfg) = stack();
    let me = guest_global(&cfg);
    let syn = hostile_frames::guest_syn(42000, port);
    let dst = cfg.host_alias6();
    let frame = frame6(
        me,
        dst,
        GATEWAY_MAC,
        IpProtocol::Tcp,
        64,
        syn.buffer_len(),
        |b| {
            syn.emit(
                &mut TcpPacket::new_unchecked(b),
                &me.into(),
                &dst.into(),
                &Default::default(),
            )
        },
    );
    s.receive_frame(&frame);
    s.poll();
    let (_conn, _) = listener.accept().expect("ferry connects to [::1] first");
    let mut synack = false;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        synack = settle(&mut s, me).iter().any(|(src, d, proto, p)| {
            *proto == IpProtocol::Tcp
                && *src == dst
                && *d == me
                && TcpPacket::new_checked(&p[..]).is_ok_and(|t| t.syn() && t.ack())
        });
        if synack {
            break;
        }
    }
    assert!(synack, "no SYN-ACK from the host alias");
    assert_eq!(s.stats().tcp_flows, 1);
}

#[test]
fn mangled_ipv6_frames_never_panic() {
    let (mut s, cfg) = stack();
    let me = guest_global(&cfg);
    let seeds = [
        udp6_frame(me, 40000, cfg.gateway6(), 53, &dns::query(1, "a.b", 28)),
        udp6_frame(
            guest_ll(),
            546,
            "ff02::1:2".parse().unwrap(),
            547,
            &[11, 0, 0, 1],
        ),
        icmp6_frame(
            guest_ll(),
            "ff02::2".parse().unwrap(),
            [0x33, 0x33, 0, 0, 0, 2],
            &Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: None }),
        ),
        udp6_frame(me, 40001, "2001:db8::1".parse().unwrap(), 9, b"x"),
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..20_000 {
        let mut f = seeds[i % seeds.len()].clone();
        for _ in 0..(rnd() % 4) {
            let at = 14 + (rnd() as usize) % (f.len() - 14);
            f[at] = rnd() as u8;
        }
        if rnd() % 5 == 0 {
            f.truncate((rnd() as usize) % f.len());
        }
        s.receive_frame(&f);
        if i % 64 == 0 {
            s.poll();
            while s.pop_frame().is_some() {}
        }
    }
    s.poll();
    assert!(s.stats().udp_flows <= 4096);
}

#[test]
fn echo_requests_to_other_hosts_are_never_answered_by_the_stack() {
    let (mut s, cfg) = stack();
    let me = guest_global(&cfg);
    let echo = Icmpv6Repr::EchoRequest {
        ident: 9,
        seq_no: 1,
        data: b"are you there",
    };
    // A link-local neighbour that does not exist, and an outside host (its reply, if any,
    // would come from a ping socket, later and for real).
    for (src, dst) in [
        (guest_ll(), "fe80::99".parse::<Ipv6Addr>().unwrap()),
        (me, "2001:db8::1".parse().unwrap()),
    ] {
        s.receive_frame(&icmp6_frame(src, dst, GATEWAY_MAC, &echo));
    }
    let replies: Vec<_> = settle(&mut s, me)
        .into_iter()
        .filter(|(_, _, proto, p)| *proto == IpProtocol::Icmpv6 && p.first() == Some(&129))
        .collect();
    assert!(replies.is_empty(), "fake echo replies: {replies:?}");
    // The gateway answers for itself (once the guest has resolved it, as a guest does before
    // its first packet: the solicitation tells the stack the guest's MAC).
    let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: cfg.gateway6(),
        lladdr: Some(smoltcp::wire::RawHardwareAddress::from_bytes(&GUEST_MAC)),
    });
    s.receive_frame(&icmp6_frame(
        me,
        "ff02::1:ff00:1".parse().unwrap(),
        [0x33, 0x33, 0xff, 0, 0, 1],
        &ns,
    ));
    s.receive_frame(&icmp6_frame(me, cfg.gateway6(), GATEWAY_MAC, &echo));
    assert!(settle(&mut s, me)
        .iter()
        .any(|(src, _, proto, p)| *src == cfg.gateway6()
            && *proto == IpProtocol::Icmpv6
            && p.first() == Some(&129)));
}

/// `frame` (an IPv6 packet without extension headers) as fragments of `chunk` payload bytes
/// each, behind a Fragment header with identification `id`, as a guest with a small MTU
/// sends a large datagram.
fn fragmented6(frame: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    let (head, payload) = frame.split_at(14 + 40);
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut f = head.to_vec();
            f[18..20].copy_from_slice(&((8 + part.len()) as u16).to_be_bytes());
            let next = f[20];
            f[20] = 44;
            let more = (i + 1) * chunk < payload.len();
            let fo = (((i * chunk) / 8) as u16) << 3 | u16::from(more);
            f.extend_from_slice(&[next, 0]);
            f.extend_from_slice(&fo.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(part);
            f
        })
        .collect()
}

#[test]
fn large_udp_datagrams_cross_in_ipv6_fragments_both_ways_at_an_mtu_of_1500() {
    let Ok(server) = std::net::UdpSocket::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let port = server.local_addr().unwrap().port();
    let cfg = NetConfig {
        mtu: 1500,
        ..NetConfig::default()
    };
    let mut s = NetStack::new(cfg.clone(), None).unwrap();
    let me = guest_global(&cfg);
    let data: Vec<u8> = (0..8000).map(|i| (i * 7 + 3) as u8).collect();
    // From the guest: its fragments, the last first, become one datagram on the host.
    let mut parts = fragmented6(
        &udp6_frame(me, 41000, cfg.host_alias6(), port, &data),
        1448,
        5,
    );
    parts.rotate_right(1);
    for p in &parts {
        s.receive_frame(p);
    }
    let mut buf = vec![0u8; 65536];
    server
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let (n, from) = server.recv_from(&mut buf).expect("the datagram on ::1");
    assert_eq!(&buf[..n], &data[..], "the guest's datagram, whole");
    // To the guest: the host's reply comes in fragments that fit the link.
    server.send_to(&data, from).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let sent: Vec<_> = settle(&mut s, me)
        .into_iter()
        .filter(|(src, dst, _, _)| *src == cfg.host_alias6() && *dst == me)
        .collect();
    assert!(sent.len() > 1, "fragments: {}", sent.len());
    let mut whole = Vec::new();
    for (k, (_, _, proto, p)) in sent.iter().enumerate() {
        assert_eq!(*proto, IpProtocol::Ipv6Frag);
        assert!(40 + p.len() <= 1500, "a fragment of {} bytes", 40 + p.len());
        assert_eq!(p[0], 17, "UDP inside");
        let fo = u16::from_be_bytes([p[2], p[3]]);
        assert_eq!(usize::from(fo >> 3) * 8, whole.len(), "in order, no gaps");
        assert_eq!(fo & 1 == 1, k + 1 < sent.len(), "M on all but the last");
        assert_eq!(&p[4..8], &sent[0].3[4..8], "one identification");
        whole.extend_from_slice(&p[8..]);
    }
    let udp = UdpPacket::new_checked(&whole[..]).unwrap();
    assert!(udp.verify_checksum(&cfg.host_alias6().into(), &me.into()));
    assert_eq!((udp.src_port(), udp.dst_port()), (port, 41000));
    assert_eq!(udp.payload(), &data[..]);
}

/// `frame` (an IPv6 packet without extension headers) with a Hop-by-Hop Options header and a
/// Destination Options header (PadN only) put in before its payload.
fn with_options(frame: &[u8]) -> Vec<u8> {
    let proto = frame[14 + 6];
    let mut f = frame[..14 + 40].to_vec();
    f[14 + 6] = 0; // Hop-by-Hop first
    f.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]); // then Destination Options
    f.extend_from_slice(&[proto, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&frame[14 + 40..]);
    let len = u16::from_be_bytes([frame[18], frame[19]]) + 24;
    f[18..20].copy_from_slice(&len.to_be_bytes());
    f
}

#[test]
fn udp_behind_extension_headers_reaches_the_host() {
    let Some((server, port)) = udp_server6() else {
        return;
    };
    let (mut s, cfg) = stack();
    let me = guest_global(&cfg);
    let plain = udp6_frame(me, 41001, cfg.host_alias6(), port, b"with options");
    assert!(s.receive_frame_with(plain.len() + 24, |b| {
        b.copy_from_slice(&with_options(&plain));
        true
    }));
    let mut buf = [0u8; 64];
    let (n, _) = server.recv_from(&mut buf).expect("the datagram on ::1");
    assert_eq!(&buf[..n], b"with options");
    // A Routing header with a segment left is not ours to follow: dropped, said so.
    let mut routed = with_options(&plain);
    routed[14 + 40] = 43; // Hop-by-Hop, then a Routing header: to UDP, type 0, 1 left
    routed[14 + 40 + 8..14 + 40 + 12].copy_from_slice(&[17, 1, 0, 1]);
    assert!(!s.receive_frame_with(routed.len(), |b| {
        b.copy_from_slice(&routed);
        true
    }));
}

/// A guest that routes what it gets on (a container bridge of MTU 1500 behind it) answers a
/// datagram too long for the next link with Packet Too Big, as IPv6 routers do: the path's
/// next datagrams come in fragments that fit it, and other paths stay whole.
#[test]
fn a_packet_too_big_from_the_guest_makes_its_paths_datagrams_fragments() {
    let Some((server, port)) = udp_server6() else {
        return;
    };
    let (mut s, cfg) = stack();
    let me = guest_global(&cfg);
    s.receive_frame(&udp6_frame(me, 41000, cfg.host_alias6(), port, b"hello"));
    let mut buf = [0u8; 64];
    let (_, from) = server.recv_from(&mut buf).expect("the datagram on ::1");
    let data: Vec<u8> = (0..3000).map(|i| (i * 11 + 1) as u8).collect();
    let replies = |s: &mut NetStack| {
        server.send_to(&data, from).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        settle(s, me)
            .into_iter()
            .filter(|(src, dst, _, _)| *src == cfg.host_alias6() && *dst == me)
            .collect::<Vec<_>>()
    };
    let whole = replies(&mut s);
    assert_eq!(whole.len(), 1, "one packet on a 65520-byte link");
    assert_eq!(whole[0].2, IpProtocol::Udp);
    // The guest cannot pass it on: Packet Too Big, quoting it, to its source.
    let mut quoted = vec![0x60, 0, 0, 0];
    quoted.extend_from_slice(&(whole[0].3.len() as u16).to_be_bytes());
    quoted.extend_from_slice(&[17, 64]);
    quoted.extend_from_slice(&cfg.host_alias6().octets());
    quoted.extend_from_slice(&me.octets());
    quoted.extend_from_slice(&whole[0].3[..1000]);
    let ptb = Icmpv6Repr::PktTooBig {
        mtu: 1500,
        header: Ipv6Repr {
            src_addr: cfg.host_alias6(),
            dst_addr: me,
            next_header: IpProtocol::Udp,
            payload_len: whole[0].3.len(),
            hop_limit: 64,
        },
        data: &quoted[40..],
    };
    s.receive_frame(&icmp6_frame(me, cfg.host_alias6(), GATEWAY_MAC, &ptb));
    s.poll();
    let pieces = replies(&mut s);
    assert!(pieces.len() > 1, "fragments: {}", pieces.len());
    for (_, _, proto, p) in &pieces {
        assert_eq!(*proto, IpProtocol::Ipv6Frag);
        assert!(40 + p.len() <= 1500, "a fragment of {} bytes", 40 + p.len());
    }
}
