//! The guest's link: a smoltcp interface that owns the gateway (.1) and the host alias, and
//! answers ARP, ICMP echo to its own addresses, and DHCP.
//!
//! Frames come in with [`NetStack::receive_frame`] and go out through
//! [`NetStack::pop_frame`]; [`NetStack::poll`] runs the stack in between. The NAT, DNS and port
//! publishing build on this in the virtio-net issue.

use std::collections::VecDeque;
use std::time::Instant as StdInstant;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::udp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};

use crate::{dhcp, dns};
use crate::{NetConfig, GATEWAY_MAC};

/// Frames held at most in each direction; past it, new frames are dropped (and counted).
const QUEUE_FRAMES: usize = 1024;

/// Frames between the guest and the stack.
struct FrameQueue {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct FrameRx(Vec<u8>);
struct FrameTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for FrameRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for FrameTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl Device for FrameQueue {
    type RxToken<'a> = FrameRx;
    type TxToken<'a> = FrameTx<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(FrameRx, FrameTx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((FrameRx(frame), FrameTx(&mut self.tx)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<FrameTx<'_>> {
        (self.tx.len() < QUEUE_FRAMES).then_some(FrameTx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // The MTU counts the IP packet; smoltcp's counts the Ethernet frame.
        caps.max_transmission_unit = self.mtu + 14;
        caps
    }
}

/// Counters for the link.
#[derive(Debug, Default, Clone, Copy)]
pub struct StackStats {
    /// Frames the guest sent that the stack took.
    pub frames_in: u64,
    /// Frames dropped because the queue toward the stack was full.
    pub dropped_in: u64,
    /// DHCP answers sent.
    pub dhcp_replies: u64,
    /// DNS answers sent.
    pub dns_replies: u64,
}

/// The guest's link and the services on it.
pub struct NetStack {
    cfg: NetConfig,
    iface: Interface,
    device: FrameQueue,
    sockets: SocketSet<'static>,
    dhcp: SocketHandle,
    dns: SocketHandle,
    epoch: StdInstant,
    stats: StackStats,
}

/// A UDP socket bound to `port` on the stack's addresses.
fn udp_socket(port: u16) -> udp::Socket<'static> {
    let rx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16 * 1024]);
    let tx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16 * 1024]);
    let mut socket = udp::Socket::new(rx, tx);
    // Binding a fresh socket to a free port cannot fail.
    let _ = socket.bind(port);
    socket
}

fn smol(a: std::net::Ipv4Addr) -> Ipv4Address {
    Ipv4Address::from(a.octets())
}

impl NetStack {
    /// A link for the network plan `cfg`.
    pub fn new(cfg: NetConfig) -> Self {
        let mut device = FrameQueue {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu: usize::from(cfg.mtu),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = u64::from(std::process::id()) ^ 0x5eed_f00d;
        let epoch = StdInstant::now();
        let mut iface = Interface::new(config, &mut device, Instant::from_millis(0));
        let prefix = cfg.subnet.prefix();
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(smol(cfg.gateway())), prefix));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(smol(cfg.host_alias())), prefix));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let socket = udp_socket(dhcp::SERVER_PORT);
        let dhcp = sockets.add(socket);
        let dns = sockets.add(udp_socket(dns::PORT));
        NetStack {
            cfg,
            iface,
            device,
            sockets,
            dhcp,
            dns,
            epoch,
            stats: StackStats::default(),
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Takes one Ethernet frame from the guest.
    pub fn receive_frame(&mut self, frame: &[u8]) {
        if self.device.rx.len() >= QUEUE_FRAMES {
            self.stats.dropped_in += 1;
            return;
        }
        self.stats.frames_in += 1;
        self.device.rx.push_back(frame.to_vec());
    }

    /// Runs the stack: handles the frames taken, answers what needs answering.
    pub fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.serve_dhcp();
        self.serve_dns();
        self.iface
            .poll(self.now(), &mut self.device, &mut self.sockets);
    }

    fn serve_dhcp(&mut self) {
        let socket = self.sockets.get_mut::<udp::Socket>(self.dhcp);
        while let Ok((payload, _meta)) = socket.recv() {
            let Some(answer) = dhcp::reply(&self.cfg, payload) else {
                continue;
            };
            let to = IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::BROADCAST), dhcp::CLIENT_PORT);
            let mut meta = udp::UdpMetadata::from(to);
            meta.local_address = Some(IpAddress::Ipv4(smol(self.cfg.gateway())));
            if socket.send_slice(&answer, meta).is_ok() {
                self.stats.dhcp_replies += 1;
            }
        }
    }

    fn serve_dns(&mut self) {
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
        while let Ok((query, meta)) = socket.recv() {
            // Forwarding to the upstream server arrives with the NAT's host sockets; until then
            // names outside the plan get SERVFAIL at once rather than a timeout.
            let Some(dns::Answer::Local(reply)) = dns::answer(&self.cfg, query, false) else {
                continue;
            };
            let mut out = udp::UdpMetadata::from(meta.endpoint);
            out.local_address = meta.local_address;
            if socket.send_slice(&reply, out).is_ok() {
                self.stats.dns_replies += 1;
            }
        }
    }

    /// How long until the stack wants to be polled again without new frames (ARP retries,
    /// and later TCP timers); `None` when it has nothing pending.
    pub fn poll_delay(&mut self) -> Option<std::time::Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|d| std::time::Duration::from_micros(d.total_micros()))
    }

    /// The next frame for the guest, if any.
    pub fn pop_frame(&mut self) -> Option<Vec<u8>> {
        self.device.tx.pop_front()
    }

    /// Puts back a frame the guest had no room for; it goes first next time.
    pub fn unpop_frame(&mut self, frame: Vec<u8>) {
        self.device.tx.push_front(frame);
    }

    /// The link's counters.
    pub fn stats(&self) -> StackStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, EthernetRepr,
        Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr,
    };

    const GUEST: EthernetAddress = EthernetAddress(crate::GUEST_MAC);

    fn eth(
        dst: EthernetAddress,
        proto: EthernetProtocol,
        payload_len: usize,
    ) -> (Vec<u8>, EthernetRepr) {
        let repr = EthernetRepr {
            src_addr: GUEST,
            dst_addr: dst,
            ethertype: proto,
        };
        (vec![0u8; repr.buffer_len() + payload_len], repr)
    }

    #[test]
    fn answers_arp_for_the_gateway_and_pings_to_it() {
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone());
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: GUEST,
            source_protocol_addr: smol(cfg.guest()),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: smol(cfg.gateway()),
        };
        let (mut buf, e) = eth(
            EthernetAddress::BROADCAST,
            EthernetProtocol::Arp,
            arp.buffer_len(),
        );
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        e.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        s.receive_frame(&buf);
        s.poll();
        let reply = s.pop_frame().expect("an ARP reply");
        let f = EthernetFrame::new_checked(&reply[..]).unwrap();
        let r = ArpRepr::parse(&ArpPacket::new_checked(f.payload()).unwrap()).unwrap();
        match r {
            ArpRepr::EthernetIpv4 {
                operation,
                source_hardware_addr,
                ..
            } => {
                assert_eq!(operation, ArpOperation::Reply);
                assert_eq!(source_hardware_addr, EthernetAddress(GATEWAY_MAC));
            }
            _ => panic!("not an IPv4 ARP reply"),
        }

        // Echo request to the gateway.
        let icmp = Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no: 1,
            data: b"ping",
        };
        let ip = Ipv4Repr {
            src_addr: smol(cfg.guest()),
            dst_addr: smol(cfg.gateway()),
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let (mut buf, e) = eth(
            EthernetAddress(GATEWAY_MAC),
            EthernetProtocol::Ipv4,
            ip.buffer_len() + icmp.buffer_len(),
        );
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        e.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &Default::default());
        icmp.emit(
            &mut Icmpv4Packet::new_unchecked(p.payload_mut()),
            &Default::default(),
        );
        s.receive_frame(&buf);
        s.poll();
        let reply = s.pop_frame().expect("an echo reply");
        let f = EthernetFrame::new_checked(&reply[..]).unwrap();
        let p = Ipv4Packet::new_checked(f.payload()).unwrap();
        assert_eq!(p.src_addr(), smol(cfg.gateway()));
        let r = Icmpv4Repr::parse(
            &Icmpv4Packet::new_checked(p.payload()).unwrap(),
            &Default::default(),
        )
        .unwrap();
        assert!(matches!(
            r,
            Icmpv4Repr::EchoReply {
                ident: 7,
                seq_no: 1,
                ..
            }
        ));
    }

    #[test]
    fn garbage_frames_are_dropped_quietly() {
        let mut s = NetStack::new(NetConfig::default());
        for len in [0usize, 1, 13, 14, 60, 1500] {
            s.receive_frame(&vec![0xffu8; len]);
        }
        s.poll();
        assert!(s.pop_frame().is_none());
    }
}

#[cfg(test)]
mod hostile_frames {
    use super::*;
    use crate::dns;
    use smoltcp::wire::{
        EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket,
        UdpRepr,
    };

    /// A UDP datagram from the guest to `dst:port`, as an Ethernet frame.
    fn udp_frame(dst: Ipv4Address, port: u16, payload: &[u8]) -> Vec<u8> {
        let cfg = NetConfig::default();
        let udp = UdpRepr {
            src_port: 40000,
            dst_port: port,
        };
        let ip = Ipv4Repr {
            src_addr: smol(cfg.guest()),
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + payload.len(),
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(crate::GUEST_MAC),
            dst_addr: EthernetAddress(GATEWAY_MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &Default::default());
        let mut u = UdpPacket::new_unchecked(p.payload_mut());
        udp.emit(
            &mut u,
            &ip.src_addr.into(),
            &ip.dst_addr.into(),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &Default::default(),
        );
        buf
    }

    #[test]
    fn dns_query_over_the_link_gets_its_answer() {
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone());
        let q = dns::query(9, "host.ferry.internal", dns::QTYPE_A);
        s.receive_frame(&udp_frame(smol(cfg.gateway()), dns::PORT, &q));
        s.poll();
        // The answer waits for the guest's ARP reply; the stack wants a poll to retry.
        assert!(
            s.poll_delay().is_some(),
            "no timer while a reply waits for ARP"
        );
        // The stack first asks who the guest is (ARP), then answers once it knows.
        let mut got_answer = false;
        for _ in 0..4 {
            while let Some(frame) = s.pop_frame() {
                let f = EthernetFrame::new_checked(&frame[..]).unwrap();
                if f.ethertype() == EthernetProtocol::Arp {
                    // Answer the ARP so the DNS reply can go out.
                    let mut reply = frame.clone();
                    let mut rf = EthernetFrame::new_unchecked(&mut reply[..]);
                    let req = smoltcp::wire::ArpRepr::parse(
                        &smoltcp::wire::ArpPacket::new_checked(f.payload()).unwrap(),
                    )
                    .unwrap();
                    if let smoltcp::wire::ArpRepr::EthernetIpv4 {
                        source_hardware_addr,
                        source_protocol_addr,
                        target_protocol_addr,
                        ..
                    } = req
                    {
                        let ans = smoltcp::wire::ArpRepr::EthernetIpv4 {
                            operation: smoltcp::wire::ArpOperation::Reply,
                            source_hardware_addr: EthernetAddress(crate::GUEST_MAC),
                            source_protocol_addr: target_protocol_addr,
                            target_hardware_addr: source_hardware_addr,
                            target_protocol_addr: source_protocol_addr,
                        };
                        rf.set_src_addr(EthernetAddress(crate::GUEST_MAC));
                        rf.set_dst_addr(source_hardware_addr);
                        ans.emit(&mut smoltcp::wire::ArpPacket::new_unchecked(
                            rf.payload_mut(),
                        ));
                        s.receive_frame(&reply);
                    }
                } else {
                    let p = Ipv4Packet::new_checked(f.payload()).unwrap();
                    let u = UdpPacket::new_checked(p.payload()).unwrap();
                    assert_eq!(u.src_port(), dns::PORT);
                    assert_eq!(&u.payload()[u.payload().len() - 4..], &[192, 168, 127, 254]);
                    got_answer = true;
                }
            }
            s.poll();
        }
        assert!(got_answer);
    }

    #[test]
    fn random_and_mangled_frames_never_panic() {
        let cfg = NetConfig::default();
        let mut s = NetStack::new(cfg.clone());
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = [
            udp_frame(smol(cfg.gateway()), dns::PORT, &dns::query(1, "a.b", 1)),
            udp_frame(Ipv4Address::BROADCAST, dhcp::SERVER_PORT, &[0u8; 300]),
            udp_frame(smol(cfg.host_alias()), 9, b"x"),
        ];
        for i in 0..20_000 {
            let mut f = if i % 3 == 0 {
                (0..(rnd() % 1600) as usize).map(|_| rnd() as u8).collect()
            } else {
                seeds[i % seeds.len()].clone()
            };
            // Flip a few bytes anywhere (headers included), and sometimes cut the frame short.
            for _ in 0..(rnd() % 4) {
                if !f.is_empty() {
                    let at = (rnd() as usize) % f.len();
                    f[at] = rnd() as u8;
                }
            }
            if rnd() % 8 == 0 {
                let keep = (rnd() as usize) % (f.len() + 1);
                f.truncate(keep);
            }
            s.receive_frame(&f);
            if i % 16 == 0 {
                s.poll();
                while s.pop_frame().is_some() {}
            }
        }
        s.poll();
    }
}
