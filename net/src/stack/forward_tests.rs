//! Host UNIX sockets and the guest, frame by frame: a `--guest-forward` address whose port is
//! a host socket, and a `--forward-socket` socket whose clients become connections to the
//! guest.

use super::hostile_frames::{guest_syn, guest_tcp_frame};
use super::published::next_segment;
use super::*;
use crate::guest_forward::GuestForward;
use smoltcp::wire::TcpPacket;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

/// The first segment the stack sends to the guest's port `to`.
fn segment_to(s: &mut NetStack, to: u16) -> Option<Vec<u8>> {
    for _ in 0..8 {
        let (_, seg) = next_segment(s)?;
        if TcpPacket::new_checked(&seg[..]).ok()?.dst_port() == to {
            return Some(seg);
        }
    }
    None
}

#[test]
fn a_guest_forward_port_reaches_its_host_socket_and_other_ports_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut cfg = NetConfig::default();
    let fwd: GuestForward = format!("192.168.127.100:22=unix:{}", path.display())
        .parse()
        .unwrap();
    cfg.guest_forwards.push(fwd);
    let mut s = NetStack::new(cfg, None).unwrap();
    s.neighbor_hint();
    let dst = smol(std::net::Ipv4Addr::new(192, 168, 127, 100));
    s.receive_frame(&guest_tcp_frame(dst, &guest_syn(40001, 22)));
    s.poll();
    let (src, synack) = next_segment(&mut s).expect("SYN-ACK from the forward's address");
    assert_eq!(src, dst);
    let t = TcpPacket::new_checked(&synack[..]).unwrap();
    assert!(t.syn() && t.ack(), "SYN-ACK once the socket is connected");
    let (mut peer, _) = listener.accept().unwrap();
    // The guest's data reaches the socket.
    let mut seg = guest_syn(40001, 22);
    seg.control = smoltcp::wire::TcpControl::Psh;
    seg.seq_number = smoltcp::wire::TcpSeqNumber(1001);
    seg.ack_number = Some(t.seq_number() + 1);
    seg.max_seg_size = None;
    seg.payload = b"hello";
    s.receive_frame(&guest_tcp_frame(dst, &seg));
    s.poll();
    peer.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mut b = [0u8; 5];
    peer.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    // Segments are counted as they cross the link: SYN and data from the guest, the
    // SYN-ACK taken to it; a frame the guest had no room for is taken back.
    let packets = |s: &NetStack| {
        let f = &s.flows_brief()[0];
        (f.from_guest.packets, f.to_guest.packets)
    };
    assert_eq!(packets(&s), (2, 1));
    s.poll();
    if let Some(ack) = s.pop_frame() {
        assert_eq!(packets(&s), (2, 2));
        s.unpop_frame(ack);
    }
    assert_eq!(packets(&s), (2, 1));
    // Another port of the address meets no listener.
    s.receive_frame(&guest_tcp_frame(dst, &guest_syn(40002, 23)));
    s.poll();
    let rst = segment_to(&mut s, 40002).expect("an answer to the SYN to port 23");
    assert!(TcpPacket::new_checked(&rst[..]).unwrap().rst());
    // With the socket gone, the SYN meets RST too.
    drop(listener);
    std::fs::remove_file(&path).unwrap();
    s.receive_frame(&guest_tcp_frame(dst, &guest_syn(40003, 22)));
    s.poll();
    let rst = segment_to(&mut s, 40003).expect("an answer to the SYN to a closed socket");
    assert!(TcpPacket::new_checked(&rst[..]).unwrap().rst());
}

#[test]
fn a_forwarded_socket_client_becomes_a_connection_to_the_guest_port_from_the_host_alias() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("engine.sock");
    let cfg = NetConfig::default();
    let ports = crate::ports::Ports::new(cfg.guest(), None).unwrap();
    let spec = crate::ports::SocketSpec::parse(&format!("{}=2375", path.display()), |_| {
        Err("no groups".into())
    })
    .unwrap();
    ports.forward_socket(spec).unwrap();
    let mut s = NetStack::new(cfg.clone(), None)
        .unwrap()
        .with_ports(ports.clone())
        .unwrap();
    s.neighbor_hint();
    ports.set_attached(true);
    let mut c = UnixStream::connect(&path).unwrap();
    let (src, syn) = next_segment(&mut s).expect("a SYN to the guest");
    assert_eq!(src, smol(cfg.host_alias()));
    let t = TcpPacket::new_checked(&syn[..]).unwrap();
    assert!(t.syn() && !t.ack());
    assert_eq!(t.dst_port(), 2375);
    assert_eq!(ports.sockets()[0].counters.forwarded, 1);
    // The client's bytes wait for the guest's answer; the client may write meanwhile.
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    ports.close_sockets();
    assert!(!path.exists(), "the socket file goes with the forward");
}
