//! The sandbox the devices run in (`--sandbox`, `--seccomp`).
//!
//! Three layers, all unprivileged and all inherited by every thread the device code starts:
//!
//! - **namespaces** (`--sandbox namespace`, [`namespace`]): ferry moves into new mount, PID,
//!   IPC and UTS namespaces (and a user namespace when it is not root), and its root becomes
//!   an empty file system holding only what it serves: the shares, its sockets' folders and
//!   the system files name resolution reads, bind-mounted at their own paths. The rest of the
//!   host's files, its processes and its IPC are not there to reach. The network namespace
//!   stays the host's: the NAT's sockets are host sockets.
//! - **Landlock** ([`landlock`], the default and part of `namespace`) confines file access to
//!   the same list, by where a file is rather than by how it was reached.
//! - **seccomp** ([`seccomp`]) allows only the system calls the devices make, narrowed further
//!   per thread. `exec*`, `ptrace`, `mount`, `bpf`, module loading and the rest are refused; a
//!   thread may only start threads, not processes.
//!
//! The sandbox restricts the calling thread and whatever it starts afterwards (Landlock before
//! ABI 8 cannot restrict sibling threads). `ferry serve` enters it on its main thread before any
//! other thread exists; `ferry run` enters it on the thread that starts the devices, so QEMU,
//! spawned from the main thread, is not confined by it.

mod landlock;
mod namespace;
mod seccomp;

use std::path::{Path, PathBuf};

use log::{info, warn};

pub use namespace::host_pid;
pub use seccomp::{confine_thread, Role};

use crate::cli::SandboxArgs;
use crate::config::{parent_dir, Error, Result, ServeConfig};

/// What `--sandbox` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SandboxMode {
    /// File access confined only by the file server's own checks.
    None,
    /// Landlock, and as root only the capabilities the devices need.
    #[default]
    Landlock,
    /// New namespaces and an empty root holding what ferry serves, then Landlock.
    Namespace,
}

/// What `--seccomp` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// A system call outside the list stops ferry with a message naming it.
    #[default]
    Kill,
    /// Outside calls are allowed and logged by the kernel (`dmesg`, audit type 1326).
    Log,
    /// No filter.
    None,
    /// Outside calls fail with EPERM (tests only: the test process survives).
    #[cfg(test)]
    Errno,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "kill" => Ok(Self::Kill),
            "log" => Ok(Self::Log),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "'{s}' is not a seccomp mode; use kill (the default), log or none"
            )),
        }
    }
}

/// What `--sandbox` and `--seccomp` ask for. `--sandbox landlock` (and `namespace`) also drops
/// the capabilities a root ferry does not need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// `--sandbox`.
    pub mode: SandboxMode,
    /// The system call filter.
    pub seccomp: SeccompMode,
    /// Refuse signals to processes outside the sandbox. Off for `ferry run`, whose main
    /// thread (outside it) a failing device thread must be able to stop: kernels before 6.15
    /// refuse that signal too.
    pub scope_signals: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            mode: SandboxMode::Landlock,
            seccomp: SeccompMode::Kill,
            scope_signals: true,
        }
    }
}

impl SandboxConfig {
    /// `--sandbox` and `--seccomp` as given (unset: the default).
    pub fn from_args(args: &SandboxArgs) -> std::result::Result<Self, String> {
        let mut c = Self::default();
        if let Some(s) = &args.sandbox {
            c.mode = s.parse().map_err(|e| format!("--sandbox {s}: {e}"))?;
        }
        if let Some(s) = &args.seccomp {
            c.seccomp = s.parse().map_err(|e| format!("--seccomp {s}: {e}"))?;
        }
        Ok(c)
    }

    /// The same, for a command that cannot take `--sandbox namespace` (`why` says why).
    pub fn without_namespace(self, command: &str, why: &str) -> std::result::Result<Self, String> {
        if self.mode == SandboxMode::Namespace {
            return Err(format!(
                "--sandbox namespace: {command} cannot run in namespaces ({why}); use --sandbox landlock (the default) or none, or ferry serve"
            ));
        }
        Ok(self)
    }

    /// Whether file access is confined beyond the file server's own checks.
    pub fn confines_files(&self) -> bool {
        self.mode != SandboxMode::None
    }
}

impl std::str::FromStr for SandboxMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "landlock" => Ok(Self::Landlock),
            "namespace" => Ok(Self::Namespace),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "'{s}' is not a sandbox; use landlock (the default), namespace or none"
            )),
        }
    }
}

/// The files and folders the devices may reach, and how.
#[derive(Debug, Default, Clone)]
pub struct Paths {
    /// Read, write, create and remove beneath these (writable shares, the private folder).
    pub read_write: Vec<PathBuf>,
    /// Read beneath these (read-only shares, system files).
    pub read_only: Vec<PathBuf>,
    /// Create and remove sockets in these folders (where ferry's own sockets live).
    pub sockets: Vec<PathBuf>,
    /// Remove folders beneath these (the private folder's parent, at shutdown).
    pub remove_dir: Vec<PathBuf>,
    /// Make device nodes beneath these (shares with `devices`).
    pub devices: Vec<PathBuf>,
    /// The folders of sockets ferry connects to (`ferry portd`'s, guest forwards' UNIX
    /// targets, frontends' sockets in client mode): connecting needs no Landlock right, but in
    /// the namespace sandbox they must be there (read-only) to be reached.
    pub connect: Vec<PathBuf>,
    /// The capabilities a process running as root keeps (bit numbers, `CAP_*`).
    pub capabilities: Vec<u32>,
}

/// What the devices need of root's capabilities: the file server acts for the guest's users
/// (ownership, permissions, `setfsuid`, file handles) and published ports below 1024 bind.
const SERVE_CAPS: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    2,  // CAP_DAC_READ_SEARCH: open_by_handle_at
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    6,  // CAP_SETGID: setfsgid
    7,  // CAP_SETUID: setfsuid
    10, // CAP_NET_BIND_SERVICE
    31, // CAP_SETFCAP: clearing security.capability when the guest writes (kill_suidgid)
];

/// The system files name resolution (`getaddrinfo`, for the proxy and the DNS upstream) and
/// port publishing read at run time. Missing ones are skipped.
const SYSTEM_READ: &[&str] = &[
    // Folders, not files: a rule on a file holds its inode, and resolv.conf and hosts are
    // replaced by rename when the network changes. (Root's ferry may so read all of /etc.)
    "/etc",
    "/run/systemd/resolve",
    "/run/NetworkManager",
    "/run/resolvconf",
    // NSS modules glibc may load for the lines of nsswitch.conf.
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/proc/sys/net/ipv4/ip_unprivileged_port_start",
    "/proc/sys/net/ipv4/ping_group_range",
];

impl Paths {
    /// What `ferry serve` with `cfg` needs, with its private folder `private`.
    pub fn for_serve(cfg: &ServeConfig, private: &Path) -> Self {
        let mut p = Paths::default();
        for s in &cfg.shares {
            if s.readonly {
                p.read_only.push(s.dir.clone());
            } else {
                p.read_write.push(s.dir.clone());
            }
        }
        // Shares added while running must be admitted now: Landlock cannot widen later.
        p.read_write.extend(cfg.runtime_shares.iter().cloned());
        p.read_write.push(private.to_path_buf());
        if let Some(parent) = private.parent() {
            p.remove_dir.push(parent.to_path_buf());
        }
        let sockets = cfg
            .net_socket
            .iter()
            .chain(cfg.api_socket.iter())
            .chain(cfg.shares.iter().map(|s| &s.socket))
            .filter(|s| cfg.binds(s))
            .chain(cfg.forward_sockets.iter().map(|f| &f.path));
        for s in sockets {
            let dir = parent_dir(s).to_path_buf();
            if !p.sockets.contains(&dir) {
                p.sockets.push(dir);
            }
        }
        p.read_only
            .extend(SYSTEM_READ.iter().map(PathBuf::from).filter(|p| p.exists()));
        // A resolv.conf or hosts file elsewhere (--resolv-conf, --hosts-file): its folder, and
        // where its symlink leads now (it may lead elsewhere later; the system folders above
        // cover the usual places).
        let resolv = match &cfg.dns {
            ferry_net::stack::DnsSource::ResolvConf(r) => Some(r),
            ferry_net::stack::DnsSource::Servers(_) => None,
        };
        for r in resolv.into_iter().chain([&cfg.hosts_file]) {
            for f in [Some(r.clone()), std::fs::canonicalize(r).ok()]
                .into_iter()
                .flatten()
            {
                let dir = parent_dir(&f).to_path_buf();
                if dir.exists() && !p.read_only.iter().any(|d| dir.starts_with(d)) {
                    p.read_only.push(dir);
                }
            }
        }
        // The proxy's libraries (GSSAPI, the TLS trust store) run only with a net device.
        if cfg.net_socket.is_some() {
            library_files(&mut p, |v| std::env::var(v).ok());
        }
        let targets = cfg
            .net
            .guest_forwards
            .iter()
            .filter_map(|f| match &f.target {
                ferry_net::guest_forward::ForwardTarget::Unix(p) => Some(p),
                _ => None,
            });
        let clients = cfg
            .net_socket
            .iter()
            .chain(cfg.shares.iter().map(|s| &s.socket))
            .filter(|s| !cfg.binds(s) && !cfg.handed.contains_key(*s));
        for s in [&cfg.portd_socket]
            .into_iter()
            .chain(targets)
            .chain(clients)
        {
            let dir = parent_dir(s).to_path_buf();
            if !p.connect.contains(&dir) {
                p.connect.push(dir);
            }
        }
        p.capabilities = SERVE_CAPS.to_vec();
        p.devices = cfg
            .shares
            .iter()
            .filter(|s| s.devices && !s.readonly)
            .map(|s| s.dir.clone())
            .collect();
        if !p.devices.is_empty() {
            p.capabilities.push(27); // CAP_MKNOD: a `devices` share's device nodes
        }
        p
    }

    /// What `ferry mount` serving `share` needs: the share, and the capabilities the file
    /// server uses as root.
    pub fn for_mount(share: &Path, readonly: bool) -> Self {
        let mut p = Paths::default();
        if readonly {
            p.read_only.push(share.to_path_buf());
        } else {
            p.read_write.push(share.to_path_buf());
        }
        p.capabilities = SERVE_CAPS.iter().copied().filter(|c| *c != 10).collect();
        p
    }

    /// What `ferry portd` listening on `socket` needs: its socket's folder (to remove it), the
    /// port limit, and of root's capabilities only binding privileged ports.
    pub fn for_portd(socket: &Path) -> Self {
        Paths {
            sockets: vec![parent_dir(socket).to_path_buf()],
            read_only: vec![PathBuf::from(
                "/proc/sys/net/ipv4/ip_unprivileged_port_start",
            )],
            capabilities: vec![10],
            ..Default::default()
        }
    }
}

/// The files the proxy reads through libraries, from the variables of ferry's environment
/// (`var`): the certificates `SSL_CERT_FILE` and `SSL_CERT_DIR` name for an https://
/// upstream, and what Negotiate reads and writes through GSSAPI, as MIT krb5 finds it: `KRB5_CONFIG`'s files, the client
/// keytab in `KRB5_CLIENT_KTNAME`, and the ticket cache in `KRB5CCNAME` (by default
/// `/tmp/krb5cc_<uid>`), which GSSAPI also writes the proxy's service ticket to. `/etc`'s
/// files are readable already; a `MEMORY:` or `KCM:` cache has no file. A `KEYRING:` cache
/// needs system calls the filter refuses: use `FILE:` or `KCM:` with `--seccomp kill`.
fn library_files(p: &mut Paths, var: impl Fn(&str) -> Option<String>) {
    let file = |name: &str| -> Option<PathBuf> {
        match name.split_once(':') {
            None => Some(PathBuf::from(name)),
            Some(("FILE", path)) => Some(PathBuf::from(path)),
            Some(_) => None,
        }
    };
    for f in var("KRB5_CONFIG").iter().flat_map(|l| l.split(':')) {
        let f = PathBuf::from(f);
        if f.exists() {
            p.read_only.push(f);
        }
    }
    if let Some(kt) = var("KRB5_CLIENT_KTNAME").as_deref().and_then(file) {
        if kt.exists() {
            p.read_only.push(kt);
        }
    }
    // The certificates an https:// upstream is checked against, when not the system's.
    for f in ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .iter()
        .filter_map(|v| var(v))
        .flat_map(|l| l.split(':').map(PathBuf::from).collect::<Vec<_>>())
    {
        if f.exists() {
            p.read_only.push(f);
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let cc = var("KRB5CCNAME").unwrap_or_else(|| format!("FILE:/tmp/krb5cc_{uid}"));
    let cache = match cc.split_once(':') {
        // A collection: `DIR:folder`, or `DIR::folder/file` for one cache in it.
        Some(("DIR", d)) => d
            .strip_prefix(':')
            .map_or(PathBuf::from(d), |f| parent_dir(Path::new(f)).to_path_buf()),
        _ => match file(&cc) {
            Some(f) => f,
            None => return,
        },
    };
    if cache.is_absolute() && cache.exists() {
        p.read_write.push(cache);
    } else if var("KRB5CCNAME").is_some() {
        // Not its folder: that may be the user's home, or a folder every user writes to.
        warn!(
            "sandbox: the Kerberos ticket cache {} does not exist yet, and the sandbox cannot admit it later; run kinit before ferry starts, or give a client keytab in KRB5_CLIENT_KTNAME",
            cache.display()
        );
    }
}

/// Enters the sandbox `ferry serve` asks for, on its main thread while it is the only one:
/// with `namespace`, the namespaces and the new root first (the process that called this stays
/// outside as the supervisor and never returns; see [`namespace`]), then [`enter`].
pub fn enter_serving(cfg: SandboxConfig, paths: &mut Paths, private: &Path) -> Result<()> {
    if cfg.mode == SandboxMode::Namespace {
        namespace::enter(paths, private)?;
    }
    enter(cfg, paths)
}

/// Enters the sandbox on the calling thread: Landlock first (its own setup needs system calls
/// the filter then refuses), then seccomp.
pub fn enter(cfg: SandboxConfig, paths: &Paths) -> Result<()> {
    if cfg.confines_files() {
        keep_capabilities(&paths.capabilities)
            .map_err(|e| sandbox_error("dropping capabilities", e))?;
        landlock::confine(paths, cfg.scope_signals)?;
    } else {
        warn!("sandbox: off (--sandbox none): file access is confined only by the file server's own checks, and root keeps its capabilities");
    }
    seccomp::install(cfg.seccomp)
}

/// Keeps only `keep` of the calling thread's permitted and effective capabilities and clears
/// its inheritable ones (threads it starts inherit the result). Nothing to do without any.
fn keep_capabilities(keep: &[u32]) -> std::io::Result<()> {
    // linux/capability.h, version 3: two 32-bit words per set.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut hdr = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: `hdr` and `data` have the layout capget expects for version 3 (a header and two
    // data words); the kernel writes only into them.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if data.iter().all(|d| d.permitted == 0 && d.inheritable == 0) {
        return Ok(());
    }
    let mut mask = [0u32; 2];
    for &c in keep {
        mask[(c / 32) as usize] |= 1 << (c % 32);
    }
    for (d, m) in data.iter_mut().zip(mask) {
        d.permitted &= m;
        d.effective &= m;
        d.inheritable = 0;
    }
    // SAFETY: as above; capset only reads `hdr` and `data`.
    if unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if keep.is_empty() {
        info!("sandbox: dropping every capability");
    } else {
        info!(
            "sandbox: keeping capabilities {:#x} of root's",
            u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32)
        );
    }
    Ok(())
}

pub(crate) fn sandbox_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!(
        "cannot enter the sandbox ({what}: {e}); run with --sandbox none or --seccomp none to go without that part"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A thread that enters the sandbox can do its work inside the share and nothing outside.
    #[test]
    fn confines_files_and_system_calls() {
        let share = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        let private = tempfile::tempdir().unwrap();
        let paths = Paths {
            read_write: vec![share.path().to_path_buf(), private.path().to_path_buf()],
            ..Default::default()
        };
        let (s, o) = (share.path().to_path_buf(), outside.path().to_path_buf());
        let res = std::thread::spawn(move || {
            enter(
                SandboxConfig {
                    mode: SandboxMode::Landlock,
                    seccomp: SeccompMode::Errno,
                    scope_signals: true,
                },
                &paths,
            )
            .unwrap();
            let mut f = std::fs::File::create(s.join("inside")).unwrap();
            f.write_all(b"ok").unwrap();
            let inside = std::fs::read(s.join("inside")).unwrap();
            let read_outside = std::fs::read(o.join("secret")).map_err(|e| e.kind());
            let write_outside = std::fs::write(o.join("new"), b"x").map_err(|e| e.kind());
            // Threads may start; processes may not, nor may anything be executed.
            let thread_ok = std::thread::spawn(|| 7).join().unwrap();
            let exec = std::process::Command::new("/bin/true")
                .status()
                .map_err(|e| e.raw_os_error());
            (
                inside,
                read_outside,
                write_outside,
                thread_ok,
                exec.is_err(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(res.0, b"ok");
        assert_eq!(res.1, Err(std::io::ErrorKind::PermissionDenied));
        assert_eq!(res.2, Err(std::io::ErrorKind::PermissionDenied));
        assert_eq!(res.3, 7);
        assert!(res.4, "a sandboxed thread could start a program");
        assert!(!outside.path().join("new").exists());
    }

    #[test]
    fn admits_the_files_the_environment_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["krb5.conf", "client.keytab", "ccache", "ca.pem"] {
            std::fs::write(d.join(f), "").unwrap();
        }
        let env = |cc: &'static str| {
            let d = d.to_path_buf();
            move |v: &str| match v {
                "KRB5_CONFIG" => Some(format!(
                    "{}:/nowhere/krb5.conf",
                    d.join("krb5.conf").display()
                )),
                "KRB5_CLIENT_KTNAME" => Some(format!("FILE:{}", d.join("client.keytab").display())),
                "KRB5CCNAME" => Some(cc.replace("@", &d.display().to_string())),
                "SSL_CERT_FILE" => Some(d.join("ca.pem").display().to_string()),
                _ => None,
            }
        };
        let mut p = Paths::default();
        library_files(&mut p, env("FILE:@/ccache"));
        assert_eq!(
            p.read_only,
            [
                d.join("krb5.conf"),
                d.join("client.keytab"),
                d.join("ca.pem")
            ]
        );
        assert_eq!(p.read_write, [d.join("ccache")]);
        // A cache a later kinit makes, and caches with no file: nothing. A collection: its
        // folder.
        for (cc, want) in [
            ("@/later", vec![]),
            ("DIR:@", vec![d.to_path_buf()]),
            ("MEMORY:x", vec![]),
            ("KCM:", vec![]),
        ] {
            let mut p = Paths::default();
            library_files(&mut p, env(cc));
            assert_eq!(p.read_write, want, "{cc}");
        }
    }

    #[test]
    fn parses_modes() {
        assert_eq!("kill".parse(), Ok(SeccompMode::Kill));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert!("off".parse::<SeccompMode>().unwrap_err().contains("kill"));
        assert_eq!("none".parse(), Ok(SandboxMode::None));
        assert_eq!("namespace".parse(), Ok(SandboxMode::Namespace));
        assert!("chroot"
            .parse::<SandboxMode>()
            .unwrap_err()
            .contains("landlock"));
    }
}
