//! Ethernet frames from the guest into the real `NetStack`: ARP, IPv4, TCP, UDP, ICMP, DHCP and
//! DNS all start here. The input is a sequence of frames, each preceded by its length (two
//! bytes, little-endian); after each one the stack polls and what it sends back is taken, as
//! the device does. One stack per process, so state (ARP, flows, pending DNS) carries over.
//!
//! The stack opens host sockets for the guest's flows: the process first moves into a network
//! namespace of its own with no interface up, so nothing it sends leaves it (the project's
//! network rule). That needs root (CAP_SYS_ADMIN), as the guest tests do.

#![no_main]

use std::sync::Mutex;

use ferry_net::stack::NetStack;
use ferry_net::NetConfig;
use libfuzzer_sys::fuzz_target;

static STACK: Mutex<Option<NetStack>> = Mutex::new(None);

fn stack() -> NetStack {
    // SAFETY: unshare has no memory effects; it only moves this thread into a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "cannot enter a network namespace of its own ({}); run the fuzz target as root",
            std::io::Error::last_os_error()
        );
    }
    loopback_up();
    // The DNS upstream is a port nothing listens on, in a namespace no packet leaves.
    NetStack::new(NetConfig::default(), "127.0.0.1:9".parse().ok()).expect("a stack")
}

/// Brings up the namespace's loopback: the host alias's flows and the DNS upstream are there.
fn loopback_up() {
    // SAFETY: a plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq naming "lo"; the ioctls read and write only it.
    unsafe {
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), 0);
        libc::close(fd);
    }
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
