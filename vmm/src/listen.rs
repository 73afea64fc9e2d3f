//! Where the devices' listening sockets come from.
//!
//! Theory of operation: every device is named by a socket path, which is how QEMU, libvirt and
//! the sandbox know it. By default ferry binds that path itself. A launcher may instead hand
//! over a socket it has already bound and put in listening state, as vhost-user's "backend
//! program conventions" describe (`--fd N`) and as systemd does (`LISTEN_FDS`, socket units).
//! A handed-over socket is matched to its device by the path it is bound to (getsockname), so
//! a socket unit with `ListenStream=/run/ferry/net.sock` serves `--net-socket
//! /run/ferry/net.sock` with no other option; `--fd N` names the net device's socket directly
//! and `fd=N` a share's. A handed-over socket belongs to whoever made it: ferry neither
//! re-binds, re-owns nor removes it.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use ferry_devices::bind_socket;

use crate::config::{Error, Result};

/// The name a socket handed over without a path (unnamed, or abstract) is known by.
pub fn fd_name(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("fd:{fd}"))
}

/// Checks that `fd` is an open, listening UNIX stream socket, marks it close-on-exec and
/// returns the path it is bound to (or [`fd_name`] when it has none). `option` names where the
/// fd came from, for the error.
pub fn adopt(option: &str, fd: RawFd) -> Result<PathBuf> {
    let bad = |why: String| {
        Error::Usage(format!(
            "{option}: fd {fd} {why}; pass the number of a UNIX socket that is bound and listening (socket, bind, listen) and open in ferry"
        ))
    };
    if fd < 0 {
        return Err(bad("is negative".into()));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => bad("is not open".into()),
        Some(libc::ENOTSOCK) => bad("is not a socket".into()),
        _ => bad(format!("cannot be inspected ({e})")),
    })?;
    if domain != libc::AF_UNIX {
        return Err(bad("is not a UNIX socket".into()));
    }
    if sockopt(fd, libc::SO_TYPE).ok() != Some(libc::SOCK_STREAM) {
        return Err(bad("is not a stream socket".into()));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN).ok() != Some(1) {
        return Err(bad("is not listening".into()));
    }
    // SAFETY: F_SETFD on an fd checked open above; no memory is passed.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(bound_path(fd).unwrap_or_else(|| fd_name(fd)))
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// The filesystem path a UNIX socket is bound to, if it has one.
fn bound_path(fd: RawFd) -> Option<PathBuf> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes of the size given.
    let r =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    let header = std::mem::size_of::<libc::sa_family_t>();
    if r < 0 || (len as usize) <= header || addr.sun_path[0] == 0 {
        return None; // unnamed or abstract
    }
    let bytes: Vec<u8> = addr.sun_path[..len as usize - header]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)))
}

/// The sockets systemd handed over (`LISTEN_PID`, `LISTEN_FDS`, from fd 3), by the path each
/// is bound to. The variables are removed so that nothing ferry starts sees them.
pub fn from_systemd() -> Result<HashMap<PathBuf, RawFd>> {
    let mut out = HashMap::new();
    let (Some(pid), Some(n)) = (
        std::env::var_os("LISTEN_PID"),
        std::env::var_os("LISTEN_FDS"),
    ) else {
        return Ok(out);
    };
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(out); // meant for another process (a parent that did not clear them)
    }
    let n: RawFd = n.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
        Error::Usage(format!(
            "LISTEN_FDS={}: not a number; check the socket unit or launcher that started ferry",
            n.to_string_lossy()
        ))
    })?;
    for fd in 3..3 + n {
        let path = adopt("LISTEN_FDS (systemd socket activation)", fd)?;
        out.insert(path, fd);
    }
    Ok(out)
}

/// A group for the sockets ferry binds (`--socket-group`, a forwarded socket's `group=`), by
/// name or number; `opt` names the option in the message.
pub fn parse_group(opt: &str, name: &str) -> std::result::Result<libc::gid_t, String> {
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let c = CString::new(name).map_err(|_| format!("{opt} {name:?}: not a group name"))?;
    // getgrnam's static buffer: one caller at a time (the API may ask while another thread
    // parses options).
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: getgrnam reads a NUL-terminated string; the result is read at once, under the
    // lock, before another call could reuse its static buffer.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        return Err(format!(
            "{opt} {name}: no such group; create it (groupadd {name}), give its number, or give another"
        ));
    }
    // SAFETY: non-null, so it points at a valid group entry.
    Ok(unsafe { (*gr).gr_gid })
}

/// The listener for the device named by `path`: the handed-over socket bound there if there is
/// one (`Ok((listener, false))`), else a socket ferry binds now (`Ok((listener, true))`: ferry
/// removes it on exit), given to `group` with mode 0660 when a group is set.
pub fn listener(
    path: &Path,
    handed: &mut HashMap<PathBuf, RawFd>,
    group: Option<libc::gid_t>,
) -> Result<(UnixListener, bool)> {
    if let Some(fd) = handed.remove(path) {
        // SAFETY: `fd` was checked to be an open listening socket when it was adopted, and it is
        // taken out of the map, so this is its only owner.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        return Ok((UnixListener::from(owned), false));
    }
    let l = bind_socket(path).map_err(|e| Error::Runtime(e.to_string()))?;
    if let Some(gid) = group {
        let shown = path.display();
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            Error::Runtime(format!("{shown}: the path holds a NUL byte; use another"))
        })?;
        // The *at forms: they are what the sandbox's system call list allows.
        // SAFETY: `c` is a NUL-terminated path; fchownat and fchmodat read only it.
        let r = unsafe {
            if libc::fchownat(libc::AT_FDCWD, c.as_ptr(), u32::MAX, gid, 0) < 0 {
                -1
            } else {
                libc::fchmodat(libc::AT_FDCWD, c.as_ptr(), 0o660, 0)
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(path);
            return Err(Error::Runtime(format!(
                "--socket-group: cannot give {shown} to group {gid} ({e}); run ferry as root or as a member of that group"
            )));
        }
    }
    Ok((l, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn adopts_a_listening_socket_by_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let l = UnixListener::bind(&p).unwrap();
        assert_eq!(adopt("--fd", l.as_raw_fd()).unwrap(), p);
    }

    #[test]
    fn refuses_what_is_not_a_listening_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        let e = adopt("--fd", f.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = adopt("--fd", a.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("is not listening"), "{e}");
        let e = adopt("--fd", 999_999).unwrap_err().to_string();
        assert!(e.contains("is not open"), "{e}");
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = adopt("--fd", t.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("not a UNIX socket"), "{e}");
    }
}
