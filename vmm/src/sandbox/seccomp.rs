//! seccomp: the system calls the devices make, and per-thread narrowing.
//!
//! One allow-list for the whole process, installed on the thread that enters the sandbox and
//! inherited by every thread it starts. A thread with one job then narrows it further for
//! itself and the threads it starts ([`confine_thread`]): the file server makes no network
//! sockets, the network threads change no files. A refused call stops ferry with a message
//! naming it (`--seccomp kill`), or is logged by the kernel (`--seccomp log`).

use std::collections::BTreeMap;

use log::{info, warn};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use super::{sandbox_error, SeccompMode};
use crate::config::Result;

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
    // Thread names, and the no-new-privileges bit Landlock set (setting it again is how a
    // thread narrows its own filter: see `confine_thread`).
    rules.insert(
        libc::SYS_prctl,
        [
            libc::PR_SET_NAME,
            libc::PR_GET_NAME,
            libc::PR_GET_NO_NEW_PRIVS,
            libc::PR_SET_NO_NEW_PRIVS,
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
    // A thread may add a filter of its own (`confine_thread`): filters only ever narrow what
    // is allowed, and without flags the new one applies to the calling thread alone.
    rules.insert(
        libc::SYS_seccomp,
        vec![rule(vec![
            arg_eq(0, u64::from(libc::SECCOMP_SET_MODE_FILTER))?,
            arg_eq(1, 0)?,
        ])?],
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
pub(super) fn install(mode: SeccompMode) -> Result<()> {
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

/// A thread's one job, for [`confine_thread`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves a share: files, and UNIX sockets for vhost-user. It makes no network sockets.
    FileServer,
    /// Runs the network device: sockets, and files only read (name resolution). It creates,
    /// changes and removes no file.
    Network,
}

/// The system calls that create, change or remove files, or act as another user on them.
#[rustfmt::skip]
fn changes_files() -> Vec<libc::c_long> {
    use libc::*;
    let mut v = vec![
        SYS_mkdirat, SYS_mknodat, SYS_symlinkat, SYS_linkat, SYS_unlinkat, SYS_renameat2,
        SYS_fchmod, SYS_fchmodat, SYS_fchmodat2, SYS_fchown, SYS_fchownat, SYS_utimensat,
        SYS_ftruncate, SYS_fallocate, SYS_copy_file_range, SYS_setxattr, SYS_lsetxattr,
        SYS_fsetxattr, SYS_removexattr, SYS_lremovexattr, SYS_fremovexattr,
        SYS_open_by_handle_at, SYS_name_to_handle_at, SYS_setfsuid, SYS_setfsgid,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([SYS_unlink, SYS_rmdir, SYS_mkdir, SYS_rename, SYS_renameat, SYS_chmod, SYS_creat]);
    v
}

/// The filter that narrows a thread to `role`: listed calls (under their conditions) meet
/// `action`, everything else goes on to the process's allow-list.
fn role_filter(
    role: Role,
    action: SeccompAction,
) -> std::result::Result<BpfProgram, seccompiler::Error> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(seccompiler::Error::Backend)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    match role {
        Role::FileServer => {
            let not_unix = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Ne,
                libc::AF_UNIX as u64,
            )?;
            rules.insert(libc::SYS_socket, vec![rule(vec![not_unix])?]);
        }
        Role::Network => {
            for nr in changes_files() {
                rules.insert(nr, vec![]);
            }
            // Opening for writing, creating or truncating (the flags are argument 2 of openat,
            // 1 of open).
            let writes = |arg: u8| {
                [libc::O_WRONLY, libc::O_RDWR, libc::O_CREAT, libc::O_TRUNC]
                    .into_iter()
                    .map(|f| {
                        rule(vec![SeccompCondition::new(
                            arg,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::MaskedEq(f as u64),
                            f as u64,
                        )?])
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()
            };
            rules.insert(libc::SYS_openat, writes(2)?);
            #[cfg(target_arch = "x86_64")]
            rules.insert(libc::SYS_open, writes(1)?);
        }
    }
    Ok(SeccompFilter::new(rules, SeccompAction::Allow, action, arch)?.try_into()?)
}

/// Narrows the calling thread (and the threads it starts from now on) to `role`, under the
/// process's filter in `mode`. Nothing to do without a filter.
pub fn confine_thread(role: Role, mode: SeccompMode) -> Result<()> {
    let action = match mode {
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::None => return Ok(()),
        #[cfg(test)]
        SeccompMode::Errno => SeccompAction::Errno(libc::EPERM as u32),
    };
    let prog = role_filter(role, action).map_err(|e| sandbox_error("seccomp", e))?;
    seccompiler::apply_filter(&prog).map_err(|e| sandbox_error("seccomp", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{enter, Paths, SandboxConfig, SandboxMode};

    /// Runs `f` on a thread under the process's filter narrowed to `role` (refusals are EPERM).
    fn as_role<T: Send + 'static>(role: Role, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            let cfg = SandboxConfig {
                mode: SandboxMode::None,
                seccomp: SeccompMode::Errno,
                scope_signals: true,
            };
            enter(cfg, &Paths::default()).unwrap();
            confine_thread(role, SeccompMode::Errno).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn errno<T>(r: std::io::Result<T>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn the_file_server_makes_no_network_socket() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let (udp, tcp, unix, file) = as_role(Role::FileServer, move || {
            (
                errno(std::net::UdpSocket::bind("127.0.0.1:0")),
                errno(std::net::TcpListener::bind("127.0.0.1:0")),
                errno(std::os::unix::net::UnixListener::bind(d.join("s"))),
                errno(std::fs::write(d.join("f"), b"x")),
            )
        });
        assert_eq!((udp, tcp), (Some(libc::EPERM), Some(libc::EPERM)));
        assert_eq!((unix, file), (None, None));
    }

    #[test]
    fn the_network_threads_change_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        std::fs::write(d.join("kept"), b"x").unwrap();
        let got = as_role(Role::Network, move || {
            // And a thread it starts inherits the narrowing.
            let d2 = d.clone();
            let child =
                std::thread::spawn(move || errno(std::fs::write(d2.join("by-child"), b"x")))
                    .join()
                    .unwrap();
            (
                errno(std::fs::read(d.join("kept"))),
                errno(std::fs::write(d.join("new"), b"x")),
                errno(
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(d.join("kept")),
                ),
                errno(std::fs::remove_file(d.join("kept"))),
                errno(std::fs::create_dir(d.join("dir"))),
                errno(std::net::UdpSocket::bind("127.0.0.1:0")),
                child,
            )
        });
        let eperm = Some(libc::EPERM);
        assert_eq!(got, (None, eperm, eperm, eperm, eperm, None, eperm));
        assert!(dir.path().join("kept").exists());
    }
}
