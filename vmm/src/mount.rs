//! `ferry mount`: serve a host directory through the host kernel's FUSE, with the same
//! `PassthroughFs` a guest gets over virtio-fs, for inspection and tests.
//!
//! Runs in the foreground until SIGINT or SIGTERM (then unmounts) or until the mount point is
//! unmounted from outside (`umount`, `fusermount3 -u`), and exits 0 either way.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use ferry_fs::fuse_host::{self, MountConfig};
use ferry_fs::passthrough::Config as FsConfig;
use ferry_fs::{CachePolicy, PassthroughFs};
use log::{info, warn};

use crate::cli::MountArgs;
use crate::config::{Error, Result};
use crate::sandbox::{self, Paths, SandboxConfig};
use crate::signals;

/// How often the main thread looks whether the mount went away while waiting for signals.
const POLL: Duration = Duration::from_millis(100);

const DEV_FUSE: &str = "/dev/fuse";

/// Waits up to `timeout` for SIGINT or SIGTERM (blocked beforehand); returns which arrived.
fn wait_termination_for(timeout: Duration) -> io::Result<Option<libc::c_int>> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; these calls only write to it.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` are initialised; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    if sig < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(sig))
}

/// Detaches the mount at `path` lazily: for a mount still busy when ferry must go.
fn lazy_unmount(path: &Path) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `p` is NUL-terminated; umount2 has no other memory effects.
    if unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `ferry mount`.
pub fn mount(args: MountArgs) -> Result<ExitCode> {
    let cache: CachePolicy = args.cache.parse().map_err(|_| {
        Error::Usage(format!(
            "--cache {}: not a cache policy; use never, metadata, auto or always",
            args.cache
        ))
    })?;
    let share = &args.share;
    if !share.is_dir() {
        return Err(Error::Usage(format!(
            "--share {}: does not exist or is not a directory; create it or share another one",
            share.display()
        )));
    }
    if !args.mountpoint.is_dir() {
        return Err(Error::Usage(format!(
            "mount point {}: does not exist or is not a directory; create it first (mkdir -p {})",
            args.mountpoint.display(),
            args.mountpoint.display()
        )));
    }
    let mountpoint = args.mountpoint.canonicalize().map_err(|e| {
        Error::Usage(format!(
            "mount point {}: cannot resolve it ({e}); give a directory you can reach",
            args.mountpoint.display()
        ))
    })?;
    if !Path::new(DEV_FUSE).exists() {
        return Err(Error::Runtime(format!(
            "cannot mount at {}: {DEV_FUSE} does not exist; load the fuse module (modprobe fuse) or, in a container, pass the device in (--device {DEV_FUSE})",
            mountpoint.display()
        )));
    }
    let fs = PassthroughFs::new(
        share,
        FsConfig {
            cache,
            readonly: args.readonly,
            node_fds: None,
            writeback: false,
            no_xattr: false,
            trusted: false,
            devices: false,
            uid_map: Default::default(),
            gid_map: Default::default(),
            xattr_map: Default::default(),
            posix_acl: false,
            security_label: false,
        },
    )
    .map_err(|e| {
        Error::Runtime(format!(
            "--share {}: cannot open it ({e}); check its permissions",
            share.display()
        ))
    })?;

    // Blocked before the session's threads start, so they inherit the mask and only the
    // main thread takes the signals.
    signals::block_termination()
        .map_err(|e| Error::Runtime(format!("cannot block termination signals: {e}")))?;
    // The threads that serve the mount enter the sandbox once the mount is made (mounting is
    // what the sandbox refuses): from then on they reach only the share, so a folder the host
    // moves out of it is out of reach even through a node the client holds.
    let sandbox = SandboxConfig::from_args(&args.sandbox)
        .and_then(|s| s.without_namespace("ferry mount", "its mount must be made in the host's mount namespace, by a thread that stays outside the sandbox"))
        .map_err(Error::Usage)?;
    let paths = Paths::for_mount(
        &share.canonicalize().unwrap_or(share.clone()),
        args.readonly,
    );
    let mount_cfg = MountConfig {
        confine: Some(Box::new(move || {
            sandbox::enter(sandbox, &paths).map_err(|e| io::Error::other(e.to_string()))
        })),
        allow_other: args.allow_other,
        ..MountConfig::default()
    };
    // fuser mounts and answers INIT on the thread that mounts, which then enters the
    // sandbox; the thread that serves requests starts from it and inherits the sandbox. A thread of its own does the
    // mounting, so that this one stays outside and can unmount at the end (which Landlock
    // refuses to a confined thread).
    let mp = mountpoint.clone();
    let mounting = std::thread::Builder::new()
        .name("mount".into())
        .spawn(move || fuse_host::spawn_mount(fs, &mp, mount_cfg))
        .map_err(|e| Error::Runtime(format!("cannot start the mount thread: {e}")))?;
    let mounted = mounting
        .join()
        .map_err(|_| Error::Runtime("the mount thread panicked; this is a bug in ferry".into()))?;
    let session = mounted.map_err(|e| {
        Error::Runtime(format!(
            "cannot mount {} at {} ({e}); ferry mount needs root (or fusermount3) and a usable {DEV_FUSE}",
            share.display(),
            mountpoint.display()
        ))
    })?;
    info!(
        "serving {} at {}{} (pid {}); stop with SIGINT/SIGTERM or umount {}",
        share.display(),
        mountpoint.display(),
        if args.readonly { ", read-only" } else { "" },
        std::process::id(),
        mountpoint.display()
    );

    let sig = loop {
        if session.guard.is_finished() {
            break None;
        }
        match wait_termination_for(POLL) {
            Ok(Some(sig)) => break Some(sig),
            Ok(None) => {}
            Err(e) => {
                // Unmount (by dropping the session) before giving up.
                drop(session);
                return Err(Error::Runtime(format!("cannot wait for signals: {e}")));
            }
        }
    };

    match sig {
        None => {
            // Unmounted from outside, and the session thread has ended. Dropping the session
            // would try to unmount again (fuser 0.18 cannot tell that the mount is gone) and
            // log a bogus "Unmount failed", so it is forgotten instead; the process ends right
            // after, which closes the /dev/fuse descriptor it holds.
            std::mem::forget(session);
            info!("{} was unmounted; exiting", mountpoint.display());
        }
        Some(sig) => {
            info!(
                "{}: unmounting {}",
                signals::name(sig),
                mountpoint.display()
            );
            match session.umount_and_join() {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    warn!(
                        "{} is busy; detaching it lazily (it goes away when no longer used)",
                        mountpoint.display()
                    );
                    lazy_unmount(&mountpoint).map_err(|e| {
                        Error::Runtime(format!(
                            "cannot unmount {} ({e}); unmount it by hand with umount -l",
                            mountpoint.display()
                        ))
                    })?;
                }
                Err(e) => {
                    return Err(Error::Runtime(format!(
                        "unmounting {} failed: {e}; check that it is gone with `mount`",
                        mountpoint.display()
                    )))
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
