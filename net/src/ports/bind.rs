//! The host sockets of published ports: binding them as Docker does (a port on 0.0.0.0 is
//! dual-stack, a deep backlog, non-blocking), the errors in Docker's words, and resets.
//! `Ports` and `ferry portd` (which binds privileged ports for an unprivileged ferry) both
//! bind through here.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{host_endpoint, BACKLOG};
use crate::{PortSpec, Protocol};

/// The first port an unprivileged process may bind (`net.ipv4.ip_unprivileged_port_start`).
pub fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// Binds the host socket of `spec`: a TCP listener with a deep backlog, or a UDP socket.
/// Non-blocking and close-on-exec. `ferry portd` binds with this too.
///
/// A port on 0.0.0.0 takes IPv6 clients too, as Docker's do: `localhost` is `::1` first on
/// many hosts, and some clients try no other address. One dual-stack socket on `[::]` serves
/// both families (IPv4 clients arrive as `::ffff:a.b.c.d`, which the stack maps back). Where
/// IPv6 is off, or another program holds `[::]` on that port, the port is IPv4 only, as asked.
pub fn bind_host_socket(spec: &PortSpec) -> io::Result<OwnedFd> {
    if spec.bind == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        let any6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), spec.host_port);
        match bind_socket(spec.protocol, any6, Some(false)) {
            Ok(fd) => return Ok(fd),
            Err(e) => log::debug!(
                "ports: {} takes IPv4 clients only ([::]:{} failed: {e})",
                host_endpoint(spec),
                spec.host_port
            ),
        }
    }
    bind_socket(
        spec.protocol,
        SocketAddr::new(spec.bind, spec.host_port),
        None,
    )
}

/// Binds one socket of `protocol` to `addr` (listening, for TCP); `v6only` sets IPV6_V6ONLY.
fn bind_socket(protocol: Protocol, addr: SocketAddr, v6only: Option<bool>) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let ty = match protocol {
        Protocol::Tcp => libc::SOCK_STREAM,
        Protocol::Udp => libc::SOCK_DGRAM,
    };
    // SAFETY: socket() has no memory effects; the fd is owned right below.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: `value` is a valid c_int of the given length.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if protocol == Protocol::Tcp {
        // As every server does: a restart can rebind while old connections sit in TIME_WAIT.
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    if let Some(only) = v6only {
        set(
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            libc::c_int::from(only),
        )?;
    }
    let c = crate::stack::sys::CAddr::new(addr);
    // SAFETY: `c` holds a valid address of its length.
    let r = unsafe { libc::bind(fd.as_raw_fd(), c.ptr(), c.len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if protocol == Protocol::Tcp {
        // SAFETY: listen() has no memory effects.
        if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// An OS error in words, lower case and without the "(os error N)" tail, as Docker prints it.
pub fn os_reason(e: &io::Error) -> String {
    let s = e.to_string();
    let s = s.split(" (os error").next().unwrap_or(&s).to_string();
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => s,
    }
}

/// Resets a TCP connection: the peer sees RST, not FIN.
pub fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid struct linger of the given length.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(stream);
}
