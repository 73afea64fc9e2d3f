//! The sandbox the devices run in (`--sandbox`, `--seccomp`).
//!
//! Two layers, both unprivileged and both inherited by every thread the device code starts:
//!
//! - **Landlock** confines file access to what the devices need: the shares (read-only ones
//!   read-only), ferry's private folder, the folders of its own sockets (to remove them when it
//!   stops), and read access to the few system files name resolution reads. A path the guest
//!   smuggles past the file server's own confinement still meets the kernel's check.
//! - **seccomp** allows only the system calls the devices make. `exec*`, `ptrace`, `mount`,
//!   `bpf`, module loading and the rest are refused; a thread may only start threads, not
//!   processes.
//!
//! The sandbox restricts the calling thread and whatever it starts afterwards (Landlock before
//! ABI 8 cannot restrict sibling threads). `ferry serve` enters it on its main thread before any
//! other thread exists; `ferry run` enters it on the thread that starts the devices, so QEMU,
//! spawned from the main thread, is not confined by it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use log::{info, warn};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::cli::SandboxArgs;
use crate::config::{parent_dir, Error, Result, ServeConfig};

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

/// What `--sandbox` and `--seccomp` ask for. `--sandbox landlock` also drops the capabilities
/// a root ferry does not need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Confine file access with Landlock (`--sandbox landlock`, the default).
    pub landlock: bool,
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
            landlock: true,
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
            c.landlock = parse_sandbox(s).map_err(|e| format!("--sandbox {s}: {e}"))?;
        }
        if let Some(s) = &args.seccomp {
            c.seccomp = s.parse().map_err(|e| format!("--seccomp {s}: {e}"))?;
        }
        Ok(c)
    }
}

/// Parses `--sandbox landlock|none`.
pub fn parse_sandbox(s: &str) -> std::result::Result<bool, String> {
    match s {
        "landlock" => Ok(true),
        "none" => Ok(false),
        _ => Err(format!(
            "'{s}' is not a sandbox; use landlock (the default) or none"
        )),
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

/// Enters the sandbox on the calling thread: Landlock first (its own setup needs system calls
/// the filter then refuses), then seccomp.
pub fn enter(cfg: SandboxConfig, paths: &Paths) -> Result<()> {
    if cfg.landlock {
        keep_capabilities(&paths.capabilities)
            .map_err(|e| sandbox_error("dropping capabilities", e))?;
        landlock(paths, cfg.scope_signals)?;
    } else {
        warn!("sandbox: off (--sandbox none): file access is confined only by the file server's own checks, and root keeps its capabilities");
    }
    seccomp(cfg.seccomp)
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
    info!(
        "sandbox: keeping capabilities {:#x} of root's",
        u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32)
    );
    Ok(())
}

fn sandbox_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!(
        "cannot enter the sandbox ({what}: {e}); run with --sandbox none or --seccomp none to go without that part"
    ))
}

/// Confines file access to `paths`.
fn landlock(paths: &Paths, scope_signals: bool) -> Result<()> {
    let abi = ABI::V6;
    let all = AccessFs::from_all(abi);
    // What a writable share allows: everything but executing and device nodes (the file server
    // makes only FIFOs and sockets, unless a share takes `devices`: see `paths.devices`) and
    // device ioctls.
    let write =
        all & !(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::IoctlDev);
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let err = |e| sandbox_error("Landlock", e);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(err)?
        .scope(if scope_signals {
            Scope::AbstractUnixSocket | Scope::Signal
        } else {
            Scope::AbstractUnixSocket.into()
        })
        .map_err(err)?
        .create()
        .map_err(err)?;
    let rules = [
        (&paths.read_write, write),
        (&paths.read_only, read),
        (&paths.sockets, AccessFs::MakeSock | AccessFs::RemoveFile),
        (&paths.remove_dir, AccessFs::RemoveDir.into()),
        (&paths.devices, AccessFs::MakeChar | AccessFs::MakeBlock),
    ];
    for (list, access) in rules {
        for path in list {
            let fd = PathFd::new(path).map_err(|e| {
                Error::Runtime(format!(
                    "cannot enter the sandbox: cannot open {} ({e}); check that it exists",
                    path.display()
                ))
            })?;
            // A rule on a file may only carry file rights.
            let access = if path.is_dir() {
                access
            } else {
                access & AccessFs::from_file(abi)
            };
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(err)?;
        }
    }
    let paths = paths.read_write.len()
        + paths.read_only.len()
        + paths.sockets.len()
        + paths.remove_dir.len()
        + paths.devices.len();
    let status = ruleset.restrict_self().map_err(err)?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => {
            info!("sandbox: Landlock confines file access to {paths} folders and files")
        }
        RulesetStatus::PartiallyEnforced => info!(
            "sandbox: Landlock confines file access to {paths} folders and files (this kernel enforces part of the rights)"
        ),
        RulesetStatus::NotEnforced => warn!(
            "sandbox: this kernel has no Landlock: file access is confined only by the file server's own checks"
        ),
    }
    Ok(())
}

/// The system calls the devices make. Everything else is refused.
#[rustfmt::skip]
fn allowed_syscalls() -> Vec<libc::c_long> {
    use libc::*;
    let mut v = vec![
        // Memory and threads.
        SYS_mmap, SYS_munmap, SYS_mprotect, SYS_mremap, SYS_madvise, SYS_brk, SYS_futex,
        SYS_set_robust_list, SYS_rseq, SYS_exit, SYS_exit_group, SYS_gettid, SYS_getpid,
        SYS_tgkill, SYS_kill, SYS_sched_yield, SYS_sched_getaffinity, SYS_getrandom,
        SYS_clock_gettime, SYS_clock_getres, SYS_gettimeofday, SYS_clock_nanosleep, SYS_nanosleep,
        SYS_getrlimit, SYS_prlimit64, SYS_membarrier,
        // Signals.
        SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_rt_sigtimedwait,
        SYS_sigaltstack, SYS_restart_syscall,
        // Descriptors and polling.
        SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_close, SYS_dup, SYS_dup3, SYS_fcntl,
        SYS_lseek, SYS_pipe2, SYS_splice, SYS_sendfile, SYS_ppoll, SYS_epoll_create1, SYS_epoll_ctl,
        SYS_epoll_pwait, SYS_epoll_pwait2, SYS_eventfd2, SYS_timerfd_create, SYS_timerfd_settime,
        SYS_timerfd_gettime,
        // Sockets: the NAT, published ports, the proxy, DNS, ping, vhost-user and the API.
        SYS_socket, SYS_socketpair, SYS_connect, SYS_bind, SYS_listen, SYS_accept4, SYS_sendto,
        SYS_recvfrom, SYS_sendmsg, SYS_recvmsg, SYS_sendmmsg, SYS_recvmmsg, SYS_shutdown,
        SYS_getsockname, SYS_getpeername, SYS_setsockopt, SYS_getsockopt,
        // Files: the passthrough file server.
        SYS_openat, SYS_open_by_handle_at, SYS_name_to_handle_at, SYS_newfstatat, SYS_fstat,
        SYS_statx, SYS_statfs, SYS_fstatfs, SYS_getdents64, SYS_readlinkat, SYS_mkdirat,
        SYS_mknodat, SYS_symlinkat, SYS_linkat, SYS_unlinkat, SYS_renameat2, SYS_fchmod,
        SYS_fchmodat, SYS_fchmodat2, SYS_fchown, SYS_fchownat, SYS_utimensat, SYS_ftruncate,
        SYS_fallocate, SYS_fsync, SYS_fdatasync, SYS_syncfs, SYS_flock, SYS_copy_file_range,
        SYS_pread64, SYS_pwrite64, SYS_preadv, SYS_pwritev, SYS_preadv2, SYS_pwritev2,
        SYS_faccessat, SYS_faccessat2, SYS_getxattr, SYS_lgetxattr, SYS_fgetxattr, SYS_setxattr,
        SYS_lsetxattr, SYS_fsetxattr, SYS_listxattr, SYS_llistxattr, SYS_flistxattr,
        SYS_removexattr, SYS_lremovexattr, SYS_fremovexattr, SYS_getcwd,
        // Credentials: the file server creates files as the guest's caller.
        SYS_getuid, SYS_geteuid, SYS_getgid, SYS_getegid, SYS_setfsuid, SYS_setfsgid, SYS_uname,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        SYS_open, SYS_stat, SYS_lstat, SYS_poll, SYS_epoll_wait, SYS_dup2, SYS_pipe, SYS_access,
        SYS_readlink, SYS_unlink, SYS_rmdir, SYS_mkdir, SYS_rename, SYS_arch_prctl, SYS_chmod,
        SYS_renameat,
    ]);
    v
}

/// An ioctl request number as a filter operand (its C type differs between C libraries).
#[allow(clippy::unnecessary_cast)]
fn ioctl_request(op: libc::Ioctl) -> u64 {
    op as u64
}

fn rule(
    conditions: Vec<SeccompCondition>,
) -> std::result::Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(conditions)
}

fn arg_eq(
    index: u8,
    value: u64,
) -> std::result::Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// The filters, in the order to install them, and how many system calls they allow: the
/// allow-list, and one that answers `clone3` with ENOSYS so the C library falls back to
/// `clone`, whose flags a filter can see (it allows threads, not processes).
fn filters(mode: SeccompMode) -> std::result::Result<(Vec<BpfProgram>, usize), seccompiler::Error> {
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::None => return Ok((vec![], 0)),
        #[cfg(test)]
        SeccompMode::Errno => SeccompAction::Errno(libc::EPERM as u32),
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(seccompiler::Error::Backend)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls()
        .into_iter()
        .map(|nr| (nr, vec![]))
        .collect();
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )?;
    rules.insert(libc::SYS_clone, vec![rule(vec![thread])?]);
    // clone3 reaches the second filter, which answers ENOSYS.
    rules.insert(libc::SYS_clone3, vec![]);
    // Thread names, and the no-new-privileges bit Landlock set.
    rules.insert(
        libc::SYS_prctl,
        [
            libc::PR_SET_NAME,
            libc::PR_GET_NAME,
            libc::PR_GET_NO_NEW_PRIVS,
        ]
        .into_iter()
        .map(|op| rule(vec![arg_eq(0, op as u64)?]))
        .collect::<std::result::Result<_, _>>()?,
    );
    // Non-blocking and close-on-exec switches, and isatty (the logger).
    rules.insert(
        libc::SYS_ioctl,
        [libc::FIONBIO, libc::FIOCLEX, libc::TCGETS, libc::FIONREAD]
            .into_iter()
            .map(|op| rule(vec![arg_eq(1, ioctl_request(op))?]))
            .collect::<std::result::Result<_, _>>()?,
    );
    let allowed = rules.len();
    let allow = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    // Installing a filter sets no-new-privileges with prctl, which the allow-list refuses:
    // it goes last.
    Ok((vec![clone3.try_into()?, allow.try_into()?], allowed))
}

/// Installs the system call filter on the calling thread.
fn seccomp(mode: SeccompMode) -> Result<()> {
    if mode == SeccompMode::None {
        warn!("sandbox: no system call filter (--seccomp none)");
        return Ok(());
    }
    if mode == SeccompMode::Kill {
        install_sigsys_handler().map_err(|e| sandbox_error("SIGSYS handler", e))?;
    }
    let (progs, allowed) = filters(mode).map_err(|e| sandbox_error("seccomp", e))?;
    for p in &progs {
        seccompiler::apply_filter(p).map_err(|e| sandbox_error("seccomp", e))?;
    }
    info!(
        "sandbox: seccomp allows {allowed} system calls{}",
        if mode == SeccompMode::Log {
            " and logs the others to the kernel log (--seccomp log)"
        } else {
            ""
        }
    );
    Ok(())
}

/// SIGSYS: a refused system call. Says which one and stops the process (there is no safe way
/// to go on: the code that made the call expects it to have happened).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The kernel fills si_syscall (an int at offset 24 of siginfo_t on 64-bit Linux) for
    // SIGSYS from seccomp.
    // SAFETY: `info` is the siginfo the kernel passed for this signal; SA_SIGINFO guarantees it
    // is valid, and a seccomp SIGSYS carries si_call_addr, si_syscall and si_arch there.
    let nr = unsafe { *((info as *const u8).add(24) as *const libc::c_int) };
    let mut buf = [0u8; 200];
    let mut len = 0;
    let mut put = |b: &[u8]| {
        let n = b.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&b[..n]);
        len += n;
    };
    put(b"ferry: the sandbox refused system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut n = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" and stopped; this is a bug in ferry: please report it, and run with --seccomp log meanwhile\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(128 + libc::SIGSYS);
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: the sigaction struct is plain data, zeroed then filled; the handler only calls
    // async-signal-safe functions.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
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
            read_only: vec![],
            sockets: vec![],
            remove_dir: vec![],
            devices: vec![],
            capabilities: vec![],
        };
        let (s, o) = (share.path().to_path_buf(), outside.path().to_path_buf());
        let res = std::thread::spawn(move || {
            enter(
                SandboxConfig {
                    landlock: true,
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
        assert_eq!(parse_sandbox("none"), Ok(false));
        assert!(parse_sandbox("chroot").unwrap_err().contains("landlock"));
    }
}
