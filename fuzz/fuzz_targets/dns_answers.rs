//! DNS answers from the upstream server into the real `NetStack`. For each input the guest
//! asks the gateway a name; the stack forwards the query to the upstream, a UDP socket of
//! this target's on the namespace's loopback; and the input comes back as the answer. An
//! input whose first byte is even carries the query's id in its first two bytes, so the stack
//! takes the answer and builds the guest's reply from it (whole, or in fragments when it is
//! larger than the link's MTU); an odd one keeps its own bytes, as a stray or forged answer
//! would, which the stack must refuse.

#![no_main]

use std::net::UdpSocket;
use std::sync::Mutex;
use std::time::Duration;

use ferry_net::stack::NetStack;
use ferry_net::{NetConfig, GATEWAY_MAC, GUEST_MAC};
use libfuzzer_sys::fuzz_target;

#[path = "common/netns.rs"]
mod netns;

/// Where the upstream listens.
const UPSTREAM: &str = "127.0.0.1:5300";

struct State {
    stack: NetStack,
    upstream: UdpSocket,
    id: u16,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> State {
    netns::enter();
    let upstream = UdpSocket::bind(UPSTREAM).expect("the upstream's socket");
    upstream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("a read timeout");
    let stack = NetStack::new(NetConfig::default(), UPSTREAM.parse().ok()).expect("a stack");
    State {
        stack,
        upstream,
        id: 0,
    }
}

/// The guest's ARP request for the gateway, from which the stack learns where the guest is
/// (its neighbour entries age out, so it goes with every input).
fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[192, 168, 127, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&NetConfig::default().gateway().octets());
    f
}

/// The guest's query for `fuzz.example` (A), with DNS id `id`, to the gateway's port 53.
fn query(id: u16) -> Vec<u8> {
    let mut dns = Vec::new();
    dns.extend_from_slice(&id.to_be_bytes());
    dns.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    dns.extend_from_slice(b"\x04fuzz\x07example\x00\x00\x01\x00\x01");
    let udp_len = 8 + dns.len();
    let mut f = Vec::new();
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&[192, 168, 127, 2]);
    ip.extend_from_slice(&NetConfig::default().gateway().octets());
    let sum = !ip.chunks(2).fold(0u32, |s, w| {
        let s = s + u32::from(u16::from_be_bytes([w[0], w[1]]));
        (s & 0xffff) + (s >> 16)
    }) as u16;
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&53u16.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(&dns);
    f
}

fuzz_target!(|data: &[u8]| {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let st = guard.get_or_insert_with(state);
    st.id = st.id.wrapping_add(1);
    st.stack.receive_frame(&arp());
    st.stack.receive_frame(&query(st.id));
    st.stack.poll();
    let mut q = [0u8; 512];
    if let Ok((n, from)) = st.upstream.recv_from(&mut q) {
        let mut answer = data.to_vec();
        if n >= 2 && answer.len() >= 2 && answer[0] & 1 == 0 {
            answer[..2].copy_from_slice(&q[..2]);
        }
        let _ = st.upstream.send_to(&answer, from);
    }
    st.stack.handle_host_events();
    while let Some(f) = st.stack.pop_frame() {
        st.stack.recycle_frame(f);
    }
});
