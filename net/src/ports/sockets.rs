//! Forwarded UNIX sockets (`--forward-socket HOST_PATH=GUEST_PORT`): a socket on the host
//! whose every connection becomes a TCP connection to the guest's port, the link Docker
//! Desktop and gvproxy (`--forward-sock`) make for `docker.sock`.
//!
//! Theory of operation. The socket is bound, given its mode (0600 unless `mode=` says
//! otherwise) and group, and only then made to listen: no client can connect in between, so
//! no other user slips in before the permissions hold. The file's permissions are the access
//! control, as for any UNIX socket; there is no TCP port that any local user could open. The
//! listener sits on the ports thread's epoll beside the published ports and shares their
//! queue to the net thread, their backpressure and their "no guest, no connection" answer.
//! The net stack turns each accepted stream into a TCP flow to the guest's port, from the host
//! alias, as for a client on the host's loopback. Removing the forward (or ferry stopping)
//! removes the socket file, if it is still the one ferry made.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{Incoming, PortCounters, Ports, BACKLOG, MAX_INCOMING, MAX_PORTS};

/// The mode of a forwarded socket unless `mode=` says otherwise: its owner only.
pub const DEFAULT_MODE: u32 = 0o600;

/// What `--forward-socket` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketSpec {
    /// Where the socket is on the host.
    pub path: PathBuf,
    /// The guest's TCP port its connections go to.
    pub guest_port: u16,
    /// The socket file's permission bits.
    pub mode: u32,
    /// The group the socket file is given to (None: the process's).
    pub group: Option<libc::gid_t>,
}

impl SocketSpec {
    /// Parses `HOST_PATH=GUEST_PORT[,mode=OCTAL][,group=GROUP]`; `group` turns a group name
    /// or number into a gid, or says why it cannot.
    pub fn parse(
        s: &str,
        group: impl Fn(&str) -> Result<libc::gid_t, String>,
    ) -> Result<SocketSpec, String> {
        const FORM: &str =
            "use HOST_PATH=GUEST_PORT[,mode=0660][,group=GROUP], e.g. /run/myapp/docker.sock=2375";
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or("");
        let Some((path, port)) = head.rsplit_once('=') else {
            return Err(format!("{s:?}: no guest port; {FORM}"));
        };
        if !path.starts_with('/') {
            return Err(format!("{s:?}: the socket path must be absolute; {FORM}"));
        }
        let guest_port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{s:?}: {port:?} is not a port (1-65535); {FORM}")),
        };
        let mut spec = SocketSpec {
            path: PathBuf::from(path),
            guest_port,
            mode: DEFAULT_MODE,
            group: None,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("mode", m)) => {
                    spec.mode = u32::from_str_radix(m.trim_start_matches("0o"), 8)
                        .ok()
                        .filter(|m| *m <= 0o777)
                        .ok_or_else(|| {
                            format!("{s:?}: mode={m} is not an octal mode such as 0660; {FORM}")
                        })?
                }
                Some(("group", g)) => spec.group = Some(group(g)?),
                _ => return Err(format!("{s:?}: unknown option {opt:?}; {FORM}")),
            }
        }
        Ok(spec)
    }
}

impl std::fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}={},mode={:04o}",
            self.path.display(),
            self.guest_port,
            self.mode
        )?;
        if let Some(g) = self.group {
            write!(f, ",group={g}")?;
        }
        Ok(())
    }
}

/// One forwarded socket, as listed.
#[derive(Clone, Debug)]
pub struct SocketInfo {
    /// What was asked for.
    pub spec: SocketSpec,
    /// Connections handed to the guest, and refused (no guest, or the queue full).
    pub counters: PortCounters,
}

/// A forwarded socket in the table.
pub(super) struct SocketEntry {
    pub(super) spec: SocketSpec,
    pub(super) listener: Arc<UnixListener>,
    pub(super) token: u64,
    pub(super) counters: PortCounters,
    /// The socket file's device and inode, so that only ferry's own file is removed.
    id: (u64, u64),
}

impl SocketEntry {
    /// Removes the socket file if it is still the one ferry bound.
    fn remove_file(&self) {
        let ours =
            std::fs::symlink_metadata(&self.spec.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.spec.path);
        }
    }
}

/// Why a socket cannot be forwarded.
#[derive(Debug)]
pub enum SocketError {
    /// The path is forwarded already.
    Exists(PathBuf),
    /// The table is full.
    Full,
    /// The socket could not be made: the message says why and what to do.
    Unavailable(String),
}

impl std::fmt::Display for SocketError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketError::Exists(p) => write!(
                f,
                "{} is forwarded already; remove it first to change it",
                p.display()
            ),
            SocketError::Full => write!(
                f,
                "{MAX_PORTS} sockets are forwarded, the most allowed; remove one first"
            ),
            SocketError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// Binds a UNIX socket at `spec.path` with its mode and group, then listens: no client can
/// connect before the permissions hold. A stale socket file (nobody listening) is replaced;
/// anything else at the path is an error.
fn bind_socket(spec: &SocketSpec) -> Result<(UnixListener, (u64, u64)), String> {
    let path = &spec.path;
    let shown = path.display();
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(format!(
                "{shown} exists and is not a socket; remove it or choose another path"
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{shown}: another program listens there; stop it or choose another path"
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{shown}: the path holds a NUL byte; use another"))?;
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    let bytes = c.as_bytes_with_nul();
    if bytes.len() > addr.sun_path.len() {
        return Err(format!(
            "{shown}: longer than the 107 bytes a UNIX socket path may have; use a shorter one"
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let fail = |what: &str, e: io::Error| {
        format!(
            "cannot {what} {shown} ({}); check that its folder exists and ferry may write there",
            super::os_reason(&e)
        )
    };
    // SAFETY: socket() has no memory effects; the fd is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(fail("create", io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the given length.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(fail("bind", io::Error::last_os_error()));
    }
    // The *at forms: they are what the sandbox's system call list allows.
    // SAFETY: `c` is a NUL-terminated path; fchmodat and fchownat read only it.
    let r = unsafe {
        if libc::fchmodat(libc::AT_FDCWD, c.as_ptr(), spec.mode, 0) < 0 {
            -1
        } else if let Some(gid) = spec.group {
            libc::fchownat(libc::AT_FDCWD, c.as_ptr(), u32::MAX, gid, 0)
        } else {
            0
        }
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(format!(
            "cannot set the mode or group of {shown} ({}); run ferry as a member of that group, or choose another",
            super::os_reason(&e)
        ));
    }
    // SAFETY: listen() has no memory effects.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(fail("listen on", e));
    }
    let m = std::fs::symlink_metadata(path).map_err(|e| fail("look at", e))?;
    Ok((UnixListener::from(fd), (m.dev(), m.ino())))
}

impl Ports {
    /// Forwards the host socket `spec.path` to the guest's `spec.guest_port`: binds it now
    /// (so a conflict is reported now).
    pub fn forward_socket(&self, spec: SocketSpec) -> Result<SocketInfo, SocketError> {
        let check = |inner: &super::Inner| {
            if inner.sockets.contains_key(&spec.path) {
                Err(SocketError::Exists(spec.path.clone()))
            } else if inner.sockets.len() >= MAX_PORTS {
                Err(SocketError::Full)
            } else {
                Ok(())
            }
        };
        check(&self.lock())?;
        let (listener, id) = bind_socket(&spec).map_err(SocketError::Unavailable)?;
        let mut inner = self.lock();
        let entry = SocketEntry {
            spec: spec.clone(),
            listener: Arc::new(listener),
            token: inner.next_token,
            counters: PortCounters::default(),
            id,
        };
        if let Err(e) = check(&inner) {
            // Forwarded meanwhile by another caller: this bind replaced its file; say so.
            entry.remove_file();
            return Err(e);
        }
        inner.next_token += 1;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            entry.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, entry.token),
        ) {
            entry.remove_file();
            return Err(SocketError::Unavailable(format!(
                "cannot watch {} ({e}); check the process's limits",
                spec.path.display()
            )));
        }
        inner.socket_tokens.insert(entry.token, spec.path.clone());
        inner.sockets.insert(spec.path.clone(), entry);
        drop(inner);
        self.emit(
            "socket_forwarded",
            ferry_audit::json!({
                "path": spec.path.display().to_string(),
                "guest_port": spec.guest_port,
                "mode": format!("{:04o}", spec.mode),
            }),
        );
        log::info!(
            "ports: forwarding socket {} (mode {:04o}) -> {}:{}",
            spec.path.display(),
            spec.mode,
            self.guest,
            spec.guest_port
        );
        Ok(SocketInfo {
            spec,
            counters: PortCounters::default(),
        })
    }

    /// Stops forwarding `path`: the socket file goes now; connections already open stay.
    pub fn unforward_socket(&self, path: &Path) -> Option<SocketSpec> {
        let entry = {
            let mut inner = self.lock();
            let entry = inner.sockets.remove(path)?;
            inner.socket_tokens.remove(&entry.token);
            entry
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            entry.listener.as_raw_fd(),
            EpollEvent::default(),
        );
        entry.remove_file();
        self.emit(
            "socket_unforwarded",
            ferry_audit::json!({"path": path.display().to_string()}),
        );
        log::info!("ports: no longer forwarding socket {}", path.display());
        Some(entry.spec)
    }

    /// The forwarded sockets, by path.
    pub fn sockets(&self) -> Vec<SocketInfo> {
        self.lock()
            .sockets
            .values()
            .map(|e| SocketInfo {
                spec: e.spec.clone(),
                counters: e.counters,
            })
            .collect()
    }

    /// Removes every forwarded socket's file: ferry is about to exit.
    pub fn close_sockets(&self) {
        let paths: Vec<PathBuf> = self.lock().sockets.keys().cloned().collect();
        for p in paths {
            self.unforward_socket(&p);
        }
    }

    /// The forwarded socket `path`'s listener is ready: accepts its clients and queues them
    /// for the guest (or refuses them with no guest attached).
    pub(super) fn accept_unix_all(&self, token: u64, path: &Path, listener: &UnixListener) {
        let (mut forwarded, mut refused) = (0u64, 0u64);
        loop {
            let guest_port = {
                let mut inner = self.lock();
                let Some(e) = inner.sockets.get(path) else {
                    break;
                };
                let guest_port = e.spec.guest_port;
                if self.attached() && inner.incoming.len() >= MAX_INCOMING {
                    // Backpressure: clients wait in the backlog until the net thread catches up.
                    let fd = listener.as_raw_fd();
                    let _ = self.epoll.ctl(
                        ControlOperation::Modify,
                        fd,
                        EpollEvent::new(EventSet::empty(), token),
                    );
                    inner.paused.push((token, fd));
                    break;
                }
                guest_port
            };
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!(
                        "ports: cannot accept on {}: {e}; raise the open-file limit",
                        path.display()
                    );
                    break;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                refused += 1;
                continue;
            }
            match self.offer(Incoming::Unix { stream, guest_port }, 0) {
                Ok(()) => forwarded += 1,
                Err(_) => {
                    log::debug!(
                        "ports: a client of {}: no guest attached; closed",
                        path.display()
                    );
                    refused += 1;
                }
            }
        }
        if forwarded > 0 {
            let _ = self.notify.write(1);
        }
        if let Some(e) = self.lock().sockets.get_mut(path) {
            e.counters.forwarded += forwarded;
            e.counters.refused += refused;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn no_groups(g: &str) -> Result<libc::gid_t, String> {
        g.parse().map_err(|_| format!("no group {g}"))
    }

    #[test]
    fn parses_specs_and_says_what_is_wrong() {
        let s = SocketSpec::parse("/run/x/docker.sock=2375", no_groups).unwrap();
        assert_eq!(s.path, Path::new("/run/x/docker.sock"));
        assert_eq!((s.guest_port, s.mode, s.group), (2375, 0o600, None));
        let s = SocketSpec::parse("/a=b=22,mode=0660,group=100", no_groups).unwrap();
        assert_eq!(s.path, Path::new("/a=b"));
        assert_eq!((s.guest_port, s.mode, s.group), (22, 0o660, Some(100)));
        assert_eq!(s.to_string(), "/a=b=22,mode=0660,group=100");
        for (bad, says) in [
            ("/x", "no guest port"),
            ("x.sock=22", "absolute"),
            ("/x=0", "not a port"),
            ("/x=70000", "not a port"),
            ("/x=22,mode=999", "octal"),
            ("/x=22,owner=me", "unknown option"),
            ("/x=22,group=wheel", "no group"),
        ] {
            let e = SocketSpec::parse(bad, no_groups).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn binds_with_its_mode_replaces_stale_files_and_removes_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sock");
        let ports = Ports::new(std::net::Ipv4Addr::new(10, 0, 0, 2), None).unwrap();
        // A stale socket (nobody listens) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let spec = SocketSpec::parse(&format!("{}=80", path.display()), no_groups).unwrap();
        ports.forward_socket(spec.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            ports.forward_socket(spec),
            Err(SocketError::Exists(_))
        ));
        assert_eq!(ports.sockets().len(), 1);
        // With no guest attached, a client is let go at once.
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(io::Read::read(&mut c, &mut b).unwrap(), 0);
        // A file that is not a socket is left alone.
        let other = dir.path().join("plain");
        std::fs::write(&other, b"x").unwrap();
        let e = ports
            .forward_socket(
                SocketSpec::parse(&format!("{}=80", other.display()), no_groups).unwrap(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        ports.close_sockets();
        assert!(!path.exists());
        assert!(other.exists());
        assert!(ports.sockets().is_empty());
    }
}
