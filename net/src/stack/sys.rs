//! The raw socket calls the NAT needs that std does not offer: a TCP connect that does not
//! wait, ping sockets, a socket's pending error, the TTL of its packets and the ICMP errors
//! they met on the way. Every `unsafe` of the flows is here.
//!
//! Theory of operation. std's `TcpStream::connect` blocks and its UDP and TCP types cannot
//! make an ICMP socket, so these few calls go to libc directly, for either address family
//! (a `SocketAddr` becomes a `sockaddr_in` or a `sockaddr_in6`). The descriptors become owned
//! std types at once, so they close on every path.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A C socket address of either family, and its length.
pub(crate) struct CAddr {
    storage: libc::sockaddr_storage,
    pub(crate) len: libc::socklen_t,
}

impl CAddr {
    pub(crate) fn new(a: SocketAddr) -> CAddr {
        // SAFETY: sockaddr_storage is plain old data: all zeroes is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in6.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        CAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }

    pub(crate) fn ptr(&self) -> *const libc::sockaddr {
        (&self.storage as *const libc::sockaddr_storage).cast()
    }
}

/// A socket's own address (`peer` false) or its peer's, if it is an IPv4 or IPv6 one: what
/// `ss` shows for it. For the flow list only; nothing on the data path asks.
pub(crate) fn socket_addr(fd: RawFd, peer: bool) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data: all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut storage as *mut libc::sockaddr_storage).cast();
    // SAFETY: `p` points at `len` writable bytes; the call writes at most that many.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    };
    if r < 0 {
        return None;
    }
    from_storage(&storage)
}

/// The IPv4 or IPv6 address in a C socket address.
fn from_storage(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // enough and aligned for.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => None,
    }
}

fn family(a: &SocketAddr) -> libc::c_int {
    if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new non-blocking, close-on-exec socket.
fn socket(family: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket() has no memory effects; the fd is owned right below.
    let fd =
        cvt(unsafe { libc::socket(family, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A UNIX stream socket connected to `path`, without waiting: a UNIX connect ends at once
/// (made, or refused), except that a listener whose backlog is full would keep a blocking
/// connect waiting, and the net thread must not; that case fails with `WouldBlock`.
pub(crate) fn connect_unix_nonblocking(
    path: &std::path::Path,
) -> io::Result<std::os::unix::net::UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data: all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
    // SAFETY: `addr` is a valid sockaddr_un of the given length.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    })?;
    Ok(std::os::unix::net::UnixStream::from(fd))
}

/// A TCP socket connecting to `to` without waiting.
pub(crate) fn connect_nonblocking(to: SocketAddr) -> io::Result<TcpStream> {
    connect_nonblocking_as_router(to, None)
}

/// [`connect_nonblocking`], the SYN sent with TTL (hop limit) `hops` when given, and the
/// ICMP error that ends the connect, if one does, queued with who sent it ([`recv_error`];
/// [`enable_recverr`] is to be turned off once connected, see [`disable_recverr`]).
pub(crate) fn connect_nonblocking_as_router(
    to: SocketAddr,
    hops: Option<u8>,
) -> io::Result<TcpStream> {
    let stream = TcpStream::from(socket(family(&to), libc::SOCK_STREAM, 0)?);
    if let Some(h) = hops {
        set_hop_limit(stream.as_raw_fd(), to.is_ipv6(), h)?;
        enable_recverr(stream.as_raw_fd(), to.is_ipv6())?;
    }
    let addr = CAddr::new(to);
    // SAFETY: `addr` is a valid socket address of its length.
    let r = unsafe { libc::connect(stream.as_raw_fd(), addr.ptr(), addr.len) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// An unprivileged ping socket connected to `dst` (ICMP or ICMPv6 by its family): the kernel
/// sends echo requests from it and hands back only the replies to them, with the identifier
/// it chose, which `ping` puts back, and queues the errors they meet ([`recv_error`]).
pub(crate) fn ping_socket(dst: std::net::IpAddr) -> io::Result<OwnedFd> {
    let to = SocketAddr::new(dst, 0);
    let proto = if to.is_ipv4() {
        libc::IPPROTO_ICMP
    } else {
        libc::IPPROTO_ICMPV6
    };
    let fd = socket(family(&to), libc::SOCK_DGRAM, proto)?;
    enable_recverr(fd.as_raw_fd(), to.is_ipv6())?;
    let addr = CAddr::new(to);
    // SAFETY: `addr` is a valid socket address of its length.
    cvt(unsafe { libc::connect(fd.as_raw_fd(), addr.ptr(), addr.len) })?;
    Ok(fd)
}

/// Sends `buf` on a connected datagram socket.
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives one datagram into `buf` without waiting.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether the peer of `host` has closed its side with nothing left to read (Some(true)), has
/// sent data (Some(false)), or neither yet (None), without taking anything from the socket.
pub(crate) fn peek_eof(host: &impl AsRawFd) -> Option<bool> {
    let mut b = [0u8; 1];
    // SAFETY: the fd is valid and `b` has room for the one byte asked for.
    let n = unsafe {
        libc::recv(
            host.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Some(true),
        n if n > 0 => Some(false),
        _ => None,
    }
}

/// The pending error of a socket whose connect ended (0: connected).
/// Whether a socket has a peer: a connect that went through, not one still under way.
pub(crate) fn is_connected(fd: RawFd) -> bool {
    // SAFETY: sockaddr_storage is plain old data: all zeroes is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid destinations of the sizes given.
    let r = unsafe {
        libc::getpeername(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    r == 0
}

pub(crate) fn take_error(fd: RawFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are valid destinations of the right sizes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        libc::EIO
    } else {
        err
    }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the value is a valid c_int of the length given.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Has the kernel queue the ICMP errors that a datagram socket's packets meet (IP_RECVERR or
/// IPV6_RECVERR), each with the address of the router or host that sent it, for
/// [`recv_error`]. Without it a UDP socket hears of port unreachable only, and never who
/// said so.
pub(crate) fn enable_recverr(fd: RawFd, v6: bool) -> io::Result<()> {
    if v6 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)
    } else {
        set_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1)
    }
}

/// Turns [`enable_recverr`] off. A connected TCP socket must not keep it: with it, every ICMP
/// error about its segments (a router's passing "unreachable" during a route change) is a
/// hard error that ends the connection, where without it only one that outlasts the
/// retransmissions does.
pub(crate) fn disable_recverr(fd: RawFd, v6: bool) -> io::Result<()> {
    if v6 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 0)
    } else {
        set_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 0)
    }
}

/// Whether `a` is one of this host's own addresses (one a socket can bind): the source of
/// the ICMP errors the host's own stack makes (its neighbour discovery failed, its firewall
/// rejected a packet), as opposed to a router's on the way.
pub(crate) fn is_local_address(a: std::net::IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(a, 0)).is_ok()
}

/// Sets the TTL (IPv4) or hop limit (IPv6) of the packets a socket sends.
pub(crate) fn set_hop_limit(fd: RawFd, v6: bool, hops: u8) -> io::Result<()> {
    let hops = libc::c_int::from(hops);
    if v6 {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, hops)
    } else {
        set_int(fd, libc::IPPROTO_IP, libc::IP_TTL, hops)
    }
}

/// One ICMP error from a socket's error queue (`recv_error`).
#[derive(Debug, Clone)]
pub(crate) struct QueuedError {
    /// ICMPv6 (true) or ICMP.
    pub(crate) v6: bool,
    pub(crate) icmp_type: u8,
    pub(crate) code: u8,
    /// The next hop's MTU of "fragmentation needed" and "packet too big".
    pub(crate) info: u32,
    /// Who sent the error: a router on the way, or the destination.
    pub(crate) offender: Option<std::net::IpAddr>,
    /// What the error quotes of the packet past its transport header: a UDP datagram's
    /// payload (traceroute6 finds its probe's sequence there), or for a ping socket the echo
    /// request, header first (its sequence number). At most [`QUOTED_MAX`] bytes.
    pub(crate) quoted: Vec<u8>,
}

/// The most of a packet an ICMP error about it quotes that [`recv_error`] keeps: what an
/// ICMPv6 error holds at most (RFC 4443: the error fits 1280 bytes).
pub(crate) const QUOTED_MAX: usize = 1280 - 48;

/// Takes the oldest ICMP error from the error queue of a socket with [`enable_recverr`], or
/// None when the queue is empty. Errors of the socket's own making (no ICMP behind them) are
/// passed over.
pub(crate) fn recv_error(fd: RawFd) -> Option<QueuedError> {
    let mut data = [0u8; QUOTED_MAX];
    loop {
        // Room for the one control message the kernel sends: the extended error and the
        // offender's address (at most a sockaddr_in6), with the headers and padding.
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain old data: all zeroes is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `msg` points at the valid buffers above, of the lengths it gives.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            return None;
        }
        let quoted = &data[..(n as usize).min(QUOTED_MAX)];
        // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR and CMSG_NXTHDR stay within the
        // control buffer it describes.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies inside `control`.
            let (level, ty, len) =
                unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
            let ours = (level == libc::IPPROTO_IP && ty == libc::IP_RECVERR)
                || (level == libc::IPPROTO_IPV6 && ty == libc::IPV6_RECVERR);
            let ee_len = std::mem::size_of::<libc::sock_extended_err>();
            // SAFETY: CMSG_LEN(0) is the header's length, a constant computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            // Within what the kernel wrote, which is within the buffer.
            let inside = (cmsg as usize - control.as_ptr() as usize) + len <= msg.msg_controllen;
            if ours && inside && len >= header + ee_len {
                // SAFETY: the control message holds a sock_extended_err (its length was
                // checked); it may be unaligned, hence read_unaligned.
                let (ee, at) = unsafe {
                    let at = libc::CMSG_DATA(cmsg);
                    (
                        std::ptr::read_unaligned(at.cast::<libc::sock_extended_err>()),
                        at,
                    )
                };
                let v6 = match ee.ee_origin {
                    libc::SO_EE_ORIGIN_ICMP => false,
                    libc::SO_EE_ORIGIN_ICMP6 => true,
                    _ => break,
                };
                // The offender's address follows the error (SO_EE_OFFENDER), as much of a
                // sockaddr_storage as the message holds.
                // SAFETY: sockaddr_storage is plain old data: all zeroes is a valid value.
                let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
                let room = (len - header - ee_len).min(std::mem::size_of_val(&storage));
                // SAFETY: `room` bytes past the error are inside the control message, and
                // `storage` has room for them.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        at.add(ee_len),
                        (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
                        room,
                    )
                };
                return Some(QueuedError {
                    v6,
                    icmp_type: ee.ee_type,
                    code: ee.ee_code,
                    info: ee.ee_info,
                    offender: from_storage(&storage).map(|a| a.ip()),
                    quoted: quoted.to_vec(),
                });
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_own_addresses_are_told_from_others() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        // TEST-NET-1: documentation only, never a host's (nothing is sent: a bind only).
        assert!(!is_local_address("192.0.2.1".parse().unwrap()));
    }
}
