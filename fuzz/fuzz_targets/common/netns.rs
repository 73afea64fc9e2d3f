//! The network namespace the targets that drive the net stack run in (included with
//! `#[path]` by `guest_frames` and `dns_answers`): their own, with only the loopback up, so
//! nothing the stack sends leaves it (the project's network rule). Entering it needs root
//! (CAP_SYS_ADMIN), as the guest tests do.

/// Moves this thread into a new network namespace and brings its loopback up: the host
/// alias's flows and the DNS upstream are there.
pub fn enter() {
    // SAFETY: unshare has no memory effects; it only moves this thread into a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "cannot enter a network namespace of its own ({}); run the fuzz target as root",
            std::io::Error::last_os_error()
        );
    }
    loopback_up();
}

/// Brings up the namespace's loopback.
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
