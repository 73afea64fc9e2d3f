//! `ferry portd`: the privileged-port helper, in the role `com.docker.vmnetd` plays on macOS.
//!
//! Root runs it. It listens on a UNIX socket (root-owned, in a root-owned folder) and takes one
//! request per connection, a line:
//! ```text
//! bind tcp|udp ADDR PORT
//! ```
//! It grants it only to the uids it was told to trust (`SO_PEERCRED`), and only for ports
//! below `net.ipv4.ip_unprivileged_port_start`: everything else the caller can bind itself.
//! It binds (and for TCP listens), answers `ok` with the socket attached (`SCM_RIGHTS`), or
//! `error REASON`. It never runs guest traffic: the socket is the caller's from then on.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ferry_net::ports::{bind_host_socket, os_reason, unprivileged_port_start};
use ferry_net::{PortSpec, Protocol};
use log::{info, warn};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::cli::PortdArgs;
use crate::config::{Error, Result, DEFAULT_PORTD_SOCKET};
use crate::signals;

/// The uid of a user name or number.
fn parse_uid(s: &str) -> Result<u32> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(s)
        .map_err(|_| Error::Usage(format!("--allow-uid {s:?}: not a user name or uid")))?;
    // SAFETY: `name` is a valid C string; getpwnam returns a pointer into static storage (or
    // null), read at once on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(Error::Usage(format!(
            "--allow-uid {s}: no such user; give a user name or a numeric uid"
        )));
    }
    // SAFETY: `pw` is non-null and points at a valid passwd entry.
    Ok(unsafe { (*pw).pw_uid })
}

/// The uid of the process at the other end of `s`.
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid destinations of the right sizes.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// Parses `bind tcp|udp ADDR PORT`.
fn parse_request(line: &str) -> std::result::Result<PortSpec, String> {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let [verb, proto, addr, port] = parts[..] else {
        return Err("expected `bind tcp|udp ADDR PORT`".into());
    };
    if verb != "bind" {
        return Err(format!("unknown request {verb:?}; only `bind` is served"));
    }
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return Err(format!("protocol {proto:?}: expected tcp or udp")),
    };
    let bind = addr
        .parse::<IpAddr>()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let host_port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port:?}: expected 1 to 65535"))?;
    Ok(PortSpec {
        protocol,
        bind,
        host_port,
        guest_port: host_port,
    })
}

/// Serves one request on `s`.
fn handle(s: UnixStream, allowed: &[u32]) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let uid = peer_uid(&s);
    let mut line = String::new();
    let read = BufReader::new((&s).take(512)).read_line(&mut line);
    let answer = (|| {
        read.map_err(|e| format!("cannot read the request: {e}"))?;
        let uid = uid.ok_or("cannot tell who is asking")?;
        if !allowed.contains(&uid) {
            return Err(format!(
                "uid {uid} may not ask for ports; restart ferry portd with --allow-uid {uid} to allow it"
            ));
        }
        let spec = parse_request(line.trim())?;
        let start = unprivileged_port_start();
        if spec.host_port >= start {
            return Err(format!(
                "port {} is not privileged here (net.ipv4.ip_unprivileged_port_start is {start}); bind it yourself",
                spec.host_port
            ));
        }
        let fd = bind_host_socket(&spec).map_err(|e| os_reason(&e))?;
        Ok((uid, spec, fd))
    })();
    match answer {
        Ok((uid, spec, fd)) => {
            info!(
                "portd: gave uid {uid} {} {}",
                spec.protocol,
                ferry_net::ports::host_endpoint(&spec)
            );
            if let Err(e) = s.send_with_fd(&b"ok\n"[..], fd.as_raw_fd()) {
                warn!("portd: cannot pass the socket back: {e}");
            }
        }
        Err(why) => {
            warn!(
                "portd: refused {:?} from uid {}: {why}",
                line.trim(),
                uid.map_or("?".into(), |u| u.to_string())
            );
            let _ = (&s).write_all(format!("error {why}\n").as_bytes());
        }
    }
}

/// Runs the helper until SIGTERM or SIGINT.
pub fn portd(args: PortdArgs) -> Result<ExitCode> {
    if args.allow_uid.is_empty() {
        return Err(Error::Usage(
            "name the users whose ferry may ask for ports: --allow-uid UID (repeatable)".into(),
        ));
    }
    let allowed = args
        .allow_uid
        .iter()
        .map(|u| parse_uid(u))
        .collect::<Result<Vec<_>>>()?;
    let sandbox = crate::sandbox::SandboxConfig::from_args(&args.sandbox)
        .and_then(|s| {
            s.without_namespace(
                "ferry portd",
                "it hands out host sockets and holds no files",
            )
        })
        .map_err(Error::Usage)?;
    let path = args
        .socket
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PORTD_SOCKET));
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } != 0 {
        warn!("portd: not running as root: it can bind only what this user could bind anyway");
    }
    signals::block_termination()
        .map_err(|e| Error::Runtime(format!("cannot block termination signals: {e}")))?;
    let listener = listen(&path)?;
    // Root's helper keeps only what binding ports needs: no file access beyond its socket's
    // folder, no capability but CAP_NET_BIND_SERVICE, the devices' system call list.
    crate::sandbox::enter(sandbox, &crate::sandbox::Paths::for_portd(&path))?;
    info!(
        "portd: listening on {} for uids {:?} (ports below {})",
        path.display(),
        allowed,
        unprivileged_port_start()
    );
    std::thread::Builder::new()
        .name("portd".into())
        .spawn(move || {
            for s in listener.incoming() {
                match s {
                    Ok(s) => handle(s, &allowed),
                    Err(e) => {
                        warn!("portd: cannot accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(|e| Error::Runtime(format!("cannot start the portd thread: {e}")))?;
    let sig = signals::wait_termination()
        .map_err(|e| Error::Runtime(format!("cannot wait for signals: {e}")))?;
    info!("{}: shutting down", signals::name(sig));
    let _ = std::fs::remove_file(&path);
    Ok(ExitCode::SUCCESS)
}

/// Binds the helper's socket: its folder made if missing, the socket open to every user (who
/// may ask is checked per request).
fn listen(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Runtime(format!(
                    "--socket {}: cannot create {}: {e}; run ferry portd as root or pick another path",
                    path.display(),
                    dir.display()
                ))
            })?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
    }
    let listener = ferry_devices::bind_socket(path).map_err(|e| Error::Runtime(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(|e| {
        Error::Runtime(format!(
            "--socket {}: cannot open it to users: {e}",
            path.display()
        ))
    })?;
    Ok(listener)
}

/// Asks the helper at `socket` for the host socket of `spec` (the client side, used when
/// `ferry serve` may not bind a low port).
pub fn request(socket: &Path, spec: &PortSpec) -> std::result::Result<OwnedFd, String> {
    let not_running = |e: std::io::Error| {
        format!(
            "permission denied, and the privileged-port helper is not running ({}: {e}); start it as root with `ferry portd --socket {} --allow-uid {}`",
            socket.display(),
            socket.display(),
            // SAFETY: getuid has no memory effects.
            unsafe { libc::getuid() }
        )
    };
    let s = UnixStream::connect(socket).map_err(not_running)?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("bind {} {} {}\n", spec.protocol, spec.bind, spec.host_port);
    (&s).write_all(req.as_bytes()).map_err(not_running)?;
    let mut buf = [0u8; 512];
    let (n, file) = s.recv_with_fd(&mut buf).map_err(|e| {
        format!(
            "the privileged-port helper at {} did not answer: {e}",
            socket.display()
        )
    })?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let text = text.trim();
    match (text, file) {
        ("ok", Some(f)) => Ok(OwnedFd::from(f)),
        _ => Err(format!(
            "the privileged-port helper refused: {}",
            text.strip_prefix("error ").unwrap_or(text)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let s = parse_request("bind tcp 0.0.0.0 80").unwrap();
        assert_eq!((s.protocol, s.host_port), (Protocol::Tcp, 80));
        let s = parse_request("bind udp ::1 53").unwrap();
        assert_eq!(s.protocol, Protocol::Udp);
        for bad in [
            "",
            "bind tcp 0.0.0.0",
            "open tcp 0.0.0.0 80",
            "bind sctp 0.0.0.0 80",
            "bind tcp x 80",
            "bind tcp 0.0.0.0 0",
            "bind tcp 0.0.0.0 99999",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }
}
