//! Ethernet frames from the guest into the real `NetStack`: ARP, IPv4, TCP, UDP, ICMP, DHCP and
//! DNS all start here. The input is a sequence of frames, each preceded by its length (two
//! bytes, little-endian); after each one the stack polls and what it sends back is taken, as
//! the device does. One stack per process, so state (ARP, flows, pending DNS) carries over.
//!
//! The stack opens host sockets for the guest's flows: the process first moves into a network
//! namespace of its own with only its loopback up, so nothing it sends leaves it (the project's
//! network rule). That needs root (CAP_SYS_ADMIN), as the guest tests do.

#![no_main]

use std::sync::Mutex;

use ferry_net::stack::NetStack;
use ferry_net::NetConfig;
use libfuzzer_sys::fuzz_target;

#[path = "common/netns.rs"]
mod netns;

static STACK: Mutex<Option<NetStack>> = Mutex::new(None);

fn stack() -> NetStack {
    netns::enter();
    // The DNS upstream is a port nothing listens on, in a namespace no packet leaves.
    NetStack::new(NetConfig::default(), "127.0.0.1:9".parse().ok()).expect("a stack")
}

fuzz_target!(|data: &[u8]| {
    let mut guard = STACK.lock().unwrap_or_else(|e| e.into_inner());
    let s = guard.get_or_insert_with(stack);
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (frame, tail) = rest[2..].split_at(len);
        s.receive_frame(frame);
        s.handle_host_events();
        while let Some(f) = s.pop_frame() {
            s.recycle_frame(f);
        }
        rest = tail;
    }
});
