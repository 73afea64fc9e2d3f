//! The file shares ferry serves: each one a virtio-fs device on a thread of its own.
//!
//! Theory of operation: shares named on the command line start with ferry and last as long as
//! it does. Others are added and removed while it runs, through the control API, for launchers
//! that start one file server per share: libvirt runs its `<binary>` once per `<filesystem>`,
//! with a listening socket it bound itself, and `ferry virtiofsd` (virtiofsd.rs) hands that
//! socket and the options to the running `ferry serve` rather than serving the folder in a
//! process of its own, so all file I/O stays in this one process.
//!
//! The sandbox cannot widen once entered: a share added at run time must lie under a folder
//! given with `--runtime-shares` at start (Landlock admits those folders from the start), unless
//! the sandbox is off. Removing a share shuts its listening socket down: the device serves the
//! frontend it has until that one leaves (QEMU is gone already when libvirt stops the
//! launcher), then its thread ends without taking ferry with it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ferry_devices::{serve_connections, Endpoint, VhostUserFsBackend};
use ferry_fs::{passthrough, PassthroughFs, Server};
use log::{info, warn};

use crate::config::{Error, Result, ShareConfig};
use crate::sandbox::{confine_thread, Role, SandboxConfig, SeccompMode};

/// A share's device, as the API and the stats see it.
pub type FsDevice = Arc<VhostUserFsBackend<PassthroughFs>>;

/// One share being served.
struct Entry {
    config: ShareConfig,
    device: FsDevice,
    /// Added through the API (and removable there).
    runtime: bool,
    /// Set when the share is removed, before its listener is shut down.
    stopping: Arc<AtomicBool>,
    /// A copy of its listening socket, to shut down on removal (runtime shares only).
    listener: Option<OwnedFd>,
}

/// Why a share cannot be added or removed: the API's status, what happened, what to do.
#[derive(Debug)]
pub struct ShareError(pub u16, pub String, pub String);

/// The shares, and what adding one at run time needs.
pub struct Shares {
    entries: Mutex<Vec<Entry>>,
    /// Where the devices' private sockets go.
    private: PathBuf,
    /// Folders shares may be added under at run time (canonical).
    roots: Vec<PathBuf>,
    /// Whether the sandbox confines file access (then only `roots` can be added).
    confined: bool,
    /// The system call filter the shares' threads narrow.
    seccomp: SeccompMode,
    /// Numbers the private sockets and generated tags.
    next: AtomicUsize,
    /// Where `audit=files` shares send their file events.
    audit: Option<ferry_audit::Audit>,
}

impl Shares {
    /// No shares yet; `roots` are the `--runtime-shares` folders.
    pub fn new(
        private: PathBuf,
        roots: &[PathBuf],
        sandbox: SandboxConfig,
        audit: Option<ferry_audit::Audit>,
    ) -> Self {
        Shares {
            entries: Mutex::new(Vec::new()),
            private,
            roots: roots
                .iter()
                .map(|r| r.canonicalize().unwrap_or_else(|_| r.clone()))
                .collect(),
            confined: sandbox.confines_files(),
            seccomp: sandbox.seccomp,
            next: AtomicUsize::new(0),
            audit,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shares being served: tag, folder, socket, whether added at run time, device.
    pub fn list(&self) -> Vec<(ShareConfig, bool, FsDevice)> {
        self.entries()
            .iter()
            .map(|e| (e.config.clone(), e.runtime, e.device.clone()))
            .collect()
    }

    /// Opens `share`'s folder (a failure is the caller's to word).
    pub fn open(share: &ShareConfig) -> std::io::Result<PassthroughFs> {
        PassthroughFs::new(
            &share.dir,
            passthrough::Config {
                cache: share.cache,
                readonly: share.readonly,
                node_fds: None,
                writeback: share.writeback,
                no_xattr: share.noxattr,
                trusted: share.trusted,
                devices: share.devices,
                uid_map: share.uidmap.clone(),
                gid_map: share.gidmap.clone(),
                xattr_map: share.xattrmap.clone(),
                posix_acl: share.posixacl,
                security_label: share.seclabel,
            },
        )
    }

    /// Starts serving `share` (its folder opened as `fs`) on `endpoint`. A command-line share's
    /// thread that fails stops ferry, as any device's does; a run-time share's only logs.
    pub fn start(
        &self,
        endpoint: Endpoint,
        share: &ShareConfig,
        fs: PassthroughFs,
        runtime: bool,
    ) -> Result<FsDevice> {
        let name = format!("fs-{}", share.tag);
        let server = Server::new(fs);
        if share.audit_files {
            if let Some(a) = &self.audit {
                server.set_file_audit(ferry_fs::audit::FileAudit::new(a.clone(), &share.tag));
            }
        }
        let device = VhostUserFsBackend::with_threads(Arc::new(server), &share.tag, share.threads);
        device.set_poll_window(std::time::Duration::from_micros(share.poll_us));
        info!(
            "{name}: serving {} as tag {} {} {}{}{}",
            share.dir.display(),
            share.tag,
            if share.client { "as a client of" } else { "on" },
            share.socket.display(),
            if share.readonly { " (read-only)" } else { "" },
            if runtime { " (added at run time)" } else { "" }
        );
        let listener = match (&endpoint, runtime) {
            // A second descriptor of the listener, to shut it down from the API's thread.
            (Endpoint::Listen(l), true) => Some(
                l.as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| Error::Runtime(format!("{name}: cannot keep its socket: {e}")))?,
            ),
            _ => None,
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let inner = self.private.join(format!(
            "fs{}.sock",
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        let (b, n, stop) = (device.clone(), name.clone(), stopping.clone());
        let seccomp = self.seccomp;
        let serve = move || {
            let n2 = n.clone();
            let b2 = b.clone();
            serve_connections(
                &n,
                endpoint,
                inner,
                b,
                None,
                |_| {},
                move || end_session(&n2, &b2),
            )
        };
        if runtime {
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || match confine_thread(Role::FileServer, seccomp) {
                    Err(e) => warn!("{name}: {e}; this share is not served"),
                    Ok(()) => match serve() {
                        Err(_) if stop.load(Ordering::SeqCst) => info!("{name}: removed"),
                        Err(e) => warn!("{name}: {e}; this share is no longer served"),
                        Ok(()) => {}
                    },
                })
                .map_err(|e| Error::Runtime(format!("cannot start a share's thread: {e}")))?;
        } else {
            crate::devices::spawn(&name, Some((Role::FileServer, seccomp)), serve)?;
        }
        self.entries().push(Entry {
            config: share.clone(),
            device: device.clone(),
            runtime,
            stopping,
            listener,
        });
        Ok(device)
    }

    /// Whether a share may be added at run time at `dir`: under a `--runtime-shares` folder, or
    /// anywhere when the sandbox is off.
    fn admits(&self, dir: &Path) -> bool {
        !self.confined || self.roots.iter().any(|r| dir.starts_with(r))
    }

    /// A tag no share has: `wanted`, or `share<N>`.
    pub fn free_tag(&self, wanted: Option<&str>) -> std::result::Result<String, ShareError> {
        let taken = |t: &str| self.entries().iter().any(|e| e.config.tag == t);
        match wanted {
            Some(t) if taken(t) => Err(ShareError(
                409,
                format!("a share with tag {t} is served already"),
                "give another tag, or remove that share first".into(),
            )),
            Some(t) => Ok(t.to_string()),
            None => loop {
                let t = format!("share{}", self.next.fetch_add(1, Ordering::Relaxed));
                if !taken(&t) {
                    return Ok(t);
                }
            },
        }
    }

    /// Adds `share` at run time, served on `listener` (a listening socket the client handed
    /// over).
    pub fn add(
        &self,
        mut share: ShareConfig,
        listener: OwnedFd,
    ) -> std::result::Result<(), ShareError> {
        let dir = share.dir.canonicalize().map_err(|e| {
            ShareError(
                400,
                format!("dir {}: {e}", share.dir.display()),
                "give a folder that exists".into(),
            )
        })?;
        if !dir.is_dir() {
            return Err(ShareError(
                400,
                format!("dir {} is not a folder", dir.display()),
                "give a folder".into(),
            ));
        }
        if !self.admits(&dir) {
            return Err(ShareError(
                403,
                format!(
                    "{} is not under a folder ferry serve was started with --runtime-shares",
                    dir.display()
                ),
                "start ferry serve with --runtime-shares naming a folder that holds it (the sandbox cannot admit more once running)".into(),
            ));
        }
        share.dir = dir;
        let fd = listener.as_raw_fd();
        share.socket = crate::listen::adopt("the handed-over socket", fd).map_err(|e| {
            ShareError(
                400,
                e.to_string(),
                "hand over a listening UNIX socket".into(),
            )
        })?;
        let fs = Self::open(&share).map_err(|e| {
            ShareError(
                403,
                format!("cannot open {}: {e}", share.dir.display()),
                "check that ferry's user can read the folder".into(),
            )
        })?;
        let endpoint = Endpoint::Listen(UnixListener::from(listener));
        self.start(endpoint, &share, fs, true)
            .map(|_| ())
            .map_err(|e| ShareError(500, e.to_string(), "see ferry's log".into()))
    }

    /// Stops serving the run-time share `tag`.
    pub fn remove(&self, tag: &str) -> std::result::Result<(), ShareError> {
        let mut entries = self.entries();
        let Some(i) = entries.iter().position(|e| e.config.tag == tag) else {
            return Err(ShareError(
                404,
                format!("no share with tag {tag}"),
                "GET /shares lists them".into(),
            ));
        };
        if !entries[i].runtime {
            return Err(ShareError(
                409,
                format!("share {tag} was given on the command line"),
                "it is served until ferry stops; only shares added through the API can be removed"
                    .into(),
            ));
        }
        let e = entries.remove(i);
        e.stopping.store(true, Ordering::SeqCst);
        if let Some(l) = &e.listener {
            // SAFETY: shutdown on a descriptor this entry owns; it takes no memory.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        info!("fs-{tag}: removed; its frontend, if one is connected, is served until it leaves");
        Ok(())
    }
}

/// A frontend left: drop its FUSE session's nodes and open files, which the guest that held
/// them can no longer release.
fn end_session(name: &str, device: &FsDevice) {
    let server = device.server();
    let fs = server.fs();
    server.cancel_waits();
    // Requests still on the pool's threads finish first: one that landed after `destroy`
    // would leave a node or an open file no one releases.
    if !device.wait_until_answered(std::time::Duration::from_secs(5)) {
        warn!("{name}: requests of the departed guest are still being answered after 5 s (a host file system that hangs?); ending its session anyway");
    }
    info!(
        "{name}: session ended with {} nodes and {} open files; {} requests answered with an error, {} malformed",
        fs.inode_count(),
        fs.handle_count(),
        server.stats().errors(),
        server.stats().malformed()
    );
    ferry_fs::FileSystem::destroy(fs);
}
