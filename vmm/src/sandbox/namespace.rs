//! `--sandbox namespace`: ferry in namespaces of its own, with a root that holds only what it
//! serves.
//!
//! Theory of operation. `ferry serve` calls [`enter`] on its main thread while it is still the
//! only thread, after it has opened the files it writes (the capture, the audit log) and before
//! it binds any socket:
//!
//! 1. Not root: a new user namespace that maps ferry's own uid and gid to themselves, so files
//!    keep their owners and the file server acts as the same user it would outside. Root needs
//!    none, and must not have one: a namespace's root cannot make device nodes, bind ports
//!    below 1024 in the host's network namespace, or open files by handle.
//! 2. New PID, IPC and UTS namespaces. A new PID namespace takes effect for children only,
//!    so ferry forks: the child (PID 1 in there) takes a new mount namespace of its own and
//!    goes on to serve, and the process that was started stays outside as its supervisor ([`supervise`]): it passes termination
//!    signals on, waits, removes the private folder and exits with the child's status. The
//!    child dies with its supervisor (`PR_SET_PDEATHSIG`), so a SIGKILL to the PID a launcher
//!    knows ends both.
//! 3. The child builds a new root on a small tmpfs in the private folder: every path of
//!    [`Paths`] bind-mounted at its own path (read-only ones read-only; the folders of sockets
//!    ferry connects to, such as `ferry portd`'s, read-only too), the few device nodes
//!    C libraries open, and a fresh `/proc` of the new PID namespace (the file server reaches
//!    files through `/proc/self/fd`). Paths stay what they were, so nothing else in ferry
//!    changes. Then `pivot_root` into it and detach the old root: the rest of the host's
//!    files, its processes and its System V IPC are not there to reach.
//!
//! Landlock and seccomp follow as in `--sandbox landlock`. They matter still: a descriptor to a
//! folder the host moved out of a share leads past a bind mount's root (mounts bound what a
//! path can name, not what an open descriptor reaches), and Landlock, which checks where a
//! file is, refuses it. The network namespace stays the host's: the NAT's sockets are host
//! sockets.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use log::{info, warn};

use super::Paths;
use crate::config::{Error, Result};

/// The PID the host knows the serving process by, when it is not the one `getpid` gives (1,
/// inside the sandbox's PID namespace).
static HOST_PID: OnceLock<u32> = OnceLock::new();

/// The PID of the process that serves, as the host sees it: for logs, the API and launchers.
pub fn host_pid() -> u32 {
    HOST_PID.get().copied().unwrap_or_else(std::process::id)
}

/// Device nodes bound into the new root: what C libraries and Rust's standard library open.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!(
        "cannot enter the namespace sandbox ({what}: {e}); run with --sandbox landlock instead"
    ))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Enters the namespaces and the new root built in `private` (see the module's comment). It
/// returns in the child that serves; the calling process stays outside as its supervisor and
/// never returns. Not root, `paths` loses its capabilities: the ones a user namespace grants
/// are not root's, and nothing needs them once the root is built.
pub fn enter(paths: &mut Paths, private: &Path) -> Result<()> {
    // SAFETY: getuid, geteuid and getegid have no preconditions and cannot fail.
    let (uid, euid, gid) = unsafe { (libc::getuid(), libc::geteuid(), libc::getegid()) };
    if euid != 0 {
        // SAFETY: unshare takes flags only.
        check(unsafe { libc::unshare(libc::CLONE_NEWUSER) }).map_err(|e| {
            Error::Runtime(format!(
                "cannot enter the namespace sandbox: this system refuses a user namespace to uid {uid} ({e}; see user.max_user_namespaces, and any AppArmor or SELinux policy on unprivileged user namespaces); run ferry as root, or with --sandbox landlock"
            ))
        })?;
        let map = |file: &str, text: String| {
            std::fs::write(format!("/proc/self/{file}"), text).map_err(|e| failed(file, e))
        };
        map("setgroups", "deny".into())?;
        map("uid_map", format!("{euid} {euid} 1"))?;
        map("gid_map", format!("{gid} {gid} 1"))?;
        paths.capabilities.clear();
    }
    // The mount namespace is the child's alone (below): pivot_root moves every process of a
    // mount namespace to the new root, and the supervisor must stay where it can remove the
    // private folder.
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) })
        .map_err(|e| failed("unshare", e))?;

    // SIGCHLD is blocked before the fork so the supervisor cannot miss it.
    // SAFETY: the set is initialised by sigemptyset before use; a null old set is allowed.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // SAFETY: the process is single-threaded here (a user namespace could not have been made
    // otherwise, and `ferry serve` starts no thread before this), so the child may go on to
    // run any code.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(failed("fork", io::Error::last_os_error()));
    }
    if child > 0 {
        supervise(child, private);
    }
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // The host's /proc is still mounted: its `self` names this process by its host PID.
    if let Some(pid) = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
    {
        let _ = HOST_PID.set(pid);
    }
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }).map_err(|e| failed("unshare", e))?;
    let root = private.join("root");
    build_root(paths, &root).map_err(|e| failed("building the root", e))?;
    pivot_root(&root).map_err(|e| failed("pivot_root", e))?;
    // SAFETY: sethostname reads `name` for its length.
    unsafe {
        let name = b"ferry";
        libc::sethostname(name.as_ptr().cast(), name.len());
    }
    info!(
        "sandbox: namespaces entered (mount, PID, IPC, UTS{}); the root holds {} bound paths",
        if euid != 0 { ", user" } else { "" },
        paths.read_write.len() + paths.read_only.len() + paths.sockets.len()
    );
    Ok(())
}

/// The supervisor: passes termination signals to `child`, waits for it, removes `private` and
/// exits with its status.
fn supervise(child: libc::pid_t, private: &Path) -> ! {
    // SAFETY: the set is initialised before use; sigtimedwait and waitpid write only into the
    // locals given; kill sends a signal to the child this process made.
    let code = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGCHLD,
        ] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let second = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        loop {
            let mut status = 0;
            if libc::waitpid(child, &mut status, libc::WNOHANG) == child {
                break if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
            }
            let sig = libc::sigtimedwait(&set, std::ptr::null_mut(), &second);
            if sig > 0 && sig != libc::SIGCHLD {
                libc::kill(child, sig);
            }
        }
    };
    // Its tmpfs root was a mount point only in the child's mount namespace.
    if let Err(e) = std::fs::remove_dir_all(private) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!("cannot remove {}: {e}", private.display());
        }
    }
    std::process::exit(code)
}

/// One bind mount of the new root.
#[derive(Debug, PartialEq, Eq)]
struct Bind {
    /// Where it is, with no symlink on the way.
    real: PathBuf,
    read_only: bool,
}

/// The paths of `paths` and the device nodes that exist outside `/proc` (the new one's), each
/// as (how it was named, where it is with no symlink on the way, whether it is read-only).
fn resolved(paths: &Paths) -> Vec<(&Path, PathBuf, bool)> {
    paths
        .read_write
        .iter()
        .chain(&paths.sockets)
        .map(|p| (p.as_path(), false))
        .chain(
            paths
                .read_only
                .iter()
                .chain(&paths.connect)
                .map(|p| (p.as_path(), true)),
        )
        .chain(DEVICES.iter().map(|d| (Path::new(d), false)))
        .filter_map(|(p, read_only)| {
            let real = std::fs::canonicalize(p).ok()?;
            (!real.starts_with("/proc")).then_some((p, real, read_only))
        })
        .collect()
}

/// The symlinks on the way to listed paths (`/lib` to `usr/lib`, say), as (how the path was
/// named, where it is): the new root gets the same names.
fn links(resolved: &[(&Path, PathBuf, bool)]) -> Vec<(PathBuf, PathBuf)> {
    resolved
        .iter()
        .filter(|(p, real, _)| real != p)
        .map(|(p, real, _)| (p.to_path_buf(), real.clone()))
        .collect()
}

/// The bind mounts for the resolved paths, parents before children; a path beneath another of
/// at least its access is left out.
fn binds(resolved: &[(&Path, PathBuf, bool)]) -> Vec<Bind> {
    let mut all: Vec<Bind> = Vec::new();
    for (_, real, read_only) in resolved {
        match all.iter_mut().find(|b| b.real == *real) {
            Some(b) => b.read_only &= read_only,
            None => all.push(Bind {
                real: real.clone(),
                read_only: *read_only,
            }),
        }
    }
    all.sort_by(|a, b| a.real.cmp(&b.real));
    let mut kept: Vec<Bind> = Vec::new();
    for b in all {
        let covered = kept
            .iter()
            .any(|k| b.real.starts_with(&k.real) && (b.read_only || !k.read_only));
        if !covered {
            kept.push(b);
        }
    }
    kept
}

/// Makes `target` (a folder when `dir`, else an empty file) where nothing is yet, creating
/// only on the new root's own file system (`root_dev`): never inside a bound host folder.
fn make_target(target: &Path, dir: bool, root_dev: u64) -> io::Result<()> {
    if target.symlink_metadata().is_ok() {
        return Ok(());
    }
    let mut base = target.parent();
    while let Some(b) = base {
        if let Ok(m) = b.metadata() {
            if m.dev() != root_dev {
                return Err(io::Error::other(format!(
                    "{} would be made inside a bound host folder",
                    target.display()
                )));
            }
            break;
        }
        base = b.parent();
    }
    if dir {
        std::fs::create_dir_all(target)
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::File::create(target).map(drop)
    }
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data = data.map(|s| CString::new(s).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&src),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", target.to_string_lossy())))
}

/// The mount flags a read-only remount must keep: in a user namespace the kernel refuses to
/// clear the flags the host's mount has (they are locked).
fn kept_flags(target: &Path) -> io::Result<libc::c_ulong> {
    let t = cstr(target)?;
    // SAFETY: statvfs writes only into `st`; `t` is NUL-terminated.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        check(libc::statvfs(t.as_ptr(), &mut st))?;
        st
    };
    let pairs = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms))
}

/// Builds the new root at `root`: a tmpfs holding the bind mounts of `paths` and a fresh
/// `/proc`.
fn build_root(paths: &Paths, root: &Path) -> io::Result<()> {
    // Nothing mounted from here on reaches the host's mount namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    std::fs::create_dir_all(root)?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755,size=1m"),
    )?;
    let root_dev = root.metadata()?.dev();
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let resolved = resolved(paths);
    for b in binds(&resolved) {
        let target = inside(&b.real);
        make_target(&target, b.real.is_dir(), root_dev)?;
        mount(
            Some(&b.real),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        if b.read_only {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(&target)?;
            mount(None, &target, None, flags, None)?;
        }
    }
    // The same links in the new root, where one can be made on its own file system (inside a
    // bound folder the host's own link is there already).
    for (named, real) in links(&resolved) {
        let link = inside(&named);
        let Some(parent) = link.parent() else {
            continue;
        };
        if link.symlink_metadata().is_err()
            && make_target(parent, true, root_dev).is_ok()
            && parent.metadata()?.dev() == root_dev
        {
            std::os::unix::fs::symlink(&real, &link)?;
        }
    }
    // A share that holds the private folder (a share of /tmp, say) brought the new root
    // along, with everything bound in it so far: not for the guest to see.
    // SAFETY: the path is a NUL-terminated string; EINVAL (not a mount point) is the usual
    // answer and means there is nothing to do.
    unsafe { libc::umount2(cstr(&inside(root))?.as_ptr(), libc::MNT_DETACH) };
    let proc = inside(Path::new("/proc"));
    make_target(&proc, true, root_dev)?;
    mount(
        Some(Path::new("proc")),
        &proc,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
}

/// Makes `root` the root and detaches the old one.
fn pivot_root(root: &Path) -> io::Result<()> {
    let r = cstr(root)?;
    let dot = c".";
    let slash = c"/";
    // SAFETY: the paths are NUL-terminated strings; pivot_root(".", ".") stacks the old root
    // on the new one, which umount2 then detaches.
    unsafe {
        check(libc::chdir(r.as_ptr()))?;
        check(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int)?;
        check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(slash.as_ptr()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_parents_first_and_leave_out_what_a_parent_covers() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().join("share");
        let inner = share.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        let ro = d.path().join("ro");
        std::fs::create_dir_all(&ro).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&ro, &link).unwrap();
        let paths = Paths {
            read_write: vec![inner.clone(), share.clone()],
            read_only: vec![
                link.clone(),
                share.clone(),
                "/proc/sys".into(),
                "/nowhere".into(),
            ],
            ..Default::default()
        };
        let r = resolved(&paths);
        let b = binds(&r);
        let share = share.canonicalize().unwrap();
        let ro = ro.canonicalize().unwrap();
        let got: Vec<_> = b
            .iter()
            .filter(|b| !b.real.starts_with("/dev"))
            .map(|b| (b.real.clone(), b.read_only))
            .collect();
        // The share read-write (its inner folder and its read-only mention are covered), the
        // link's target read-only; /proc and a missing path left out.
        let mut want = vec![(share, false), (ro.clone(), true)];
        want.sort();
        assert_eq!(got, want);
        assert!(b.iter().any(|b| b.real == Path::new("/dev/null")));
        assert!(links(&r).contains(&(link, ro)));
    }
}
