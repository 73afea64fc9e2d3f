//! Serving a [`FileSystem`] through the host kernel's `/dev/fuse`, with the same [`Server`]
//! (the one decoder) that serves a guest's virtio-fs queue.
//!
//! Theory of operation. `fuser` does what it does well: it mounts (through `fusermount3` when
//! not root) and unmounts, and answers the kernel's INIT, with the flags and limits the
//! server would give (the file system's own `init`, as `Server` calls it for a guest). From
//! then on `fuser`'s session is only the mount's owner: its `/dev/fuse` descriptor is read
//! here, each request handed whole to [`Server::handle_message`] and the reply written back
//! in one `write`, as a guest's requests go through the queue. So `ferry mount` shows on the
//! host what a guest sees, byte for byte: the host's inode numbers, INTERRUPT, flock and
//! POSIX locks, READDIRPLUS and the stateless directories of FUSE_NO_OPENDIR_SUPPORT.
//!
//! One thread serves the mount; a request that may wait long (SETLKW) is answered on a thread
//! of its own, as on the virtio path. By default only the mounting user may use the mount,
//! and the kernel checks no permissions for it. With [`MountConfig::allow_other`] every user
//! may, and the kernel checks each access against the attributes the mount shows
//! (`allow_other,default_permissions`), as a guest's kernel does on virtio-fs. Buffers are copied: READ
//! replies go through memory rather than straight from the file, which is fine for an
//! inspection and test tool.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{Filesystem, KernelConfig, MountOption, Request};

use crate::abi;
use crate::filesystem::FileSystem;
use crate::membuf::{ReplyBuf, RequestBuf};
use crate::server::{may_block, Server, MAX_WRITE};

/// Room for the largest request the kernel sends: a WRITE of `MAX_WRITE` bytes and its
/// headers (the kernel's own buffer is max_write plus a page).
const REQUEST_ROOM: usize = MAX_WRITE as usize + 4096;
/// Room for the largest reply: a READ of `MAX_WRITE` bytes and its header.
const REPLY_ROOM: usize = MAX_WRITE as usize + 4096;

/// What [`spawn_mount`] mounts with.
pub struct MountConfig {
    /// The file system's name in /proc/mounts (the "device" column).
    pub fsname: String,
    /// Runs on the thread that mounts, after the mount is made and before any request is
    /// served: where `ferry mount` enters its sandbox, which the mount itself must precede.
    /// The serving threads start from it and inherit it. An error unmounts.
    pub confine: Option<Confine>,
    /// Let every user use the mount, the kernel checking permissions (`allow_other` and
    /// `default_permissions`; as root, or with `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
}

/// A confinement for the serving thread (see [`MountConfig::confine`]).
pub type Confine = Box<dyn FnOnce() -> io::Result<()> + Send + Sync>;

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            fsname: "ferry".to_string(),
            confine: None,
            allow_other: false,
        }
    }
}

/// A mount being served. Dropping it unmounts.
pub struct HostSession {
    /// Unmounts from whichever thread holds the session (the serving one may be confined).
    unmounter: fuser::SessionUnmounter,
    /// `fuser`'s session, kept for its mount: it serves nothing.
    _session: Box<dyn Send>,
    /// The thread that serves the mount; it ends when the mount goes away.
    pub guard: JoinHandle<()>,
}

impl HostSession {
    /// Unmounts, and waits for the serving thread to end.
    pub fn umount_and_join(mut self) -> io::Result<()> {
        self.unmounter.unmount()?;
        let _ = self.guard.join();
        Ok(())
    }
}

/// `fuser`'s side of the session: the INIT handshake, answered as [`Server`] answers it.
struct Handshake<F: FileSystem> {
    server: Arc<Server<F>>,
}

impl<F: FileSystem + 'static> Filesystem for Handshake<F> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let caps = config.capabilities();
        // Not SECURITY_CTX: the host's own LSM labels what is made through a host mount, and
        // the requests' extra part would reach a `Server` that did not answer this INIT.
        let offered = caps.bits() & !abi::SECURITY_CTX;
        let wanted = self.server.fs().init(offered)? | abi::MAX_PAGES;
        let flags = fuser::InitFlags::from_bits_truncate(wanted & !abi::SECURITY_CTX) & caps;
        if let Err(unsupported) = config.add_capabilities(flags) {
            log::warn!("the host's FUSE lacks INIT flags {unsupported:?}");
        }
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_background(u16::MAX);
        let _ = config.set_congestion_threshold((u16::MAX / 4) * 3);
        log::info!(
            "FUSE session started: the host's kernel speaks {}.{}, flags {:#x} accepted",
            config.kernel_abi().0,
            config.kernel_abi().1,
            flags.bits()
        );
        Ok(())
    }
}

/// Mounts `fs` at `mountpoint` and serves it on a thread of its own until the returned
/// session is dropped or unmounted, or the mount point is unmounted from outside (the thread
/// then ends). Returns once the kernel's INIT is answered.
pub fn spawn_mount<F: FileSystem + 'static>(
    fs: F,
    mountpoint: &Path,
    cfg: MountConfig,
) -> io::Result<HostSession> {
    let server = Arc::new(Server::new(fs));
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(cfg.fsname.clone()),
        MountOption::Subtype("ferry".to_string()),
    ];
    if cfg.allow_other {
        config.acl = fuser::SessionACL::All;
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    let handshake = Handshake {
        server: server.clone(),
    };
    let mut session = fuser::Session::new(handshake, mountpoint, &config)?;
    let dev = File::from(session.as_fd().try_clone_to_owned()?);
    let unmounter = session.unmount_callable();
    if let Some(confine) = cfg.confine {
        if let Err(e) = confine() {
            log::error!("{e}");
            let _ = session.unmount();
            return Err(e);
        }
    }
    let guard = std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || serve(&server, dev))?;
    Ok(HostSession {
        unmounter,
        _session: Box::new(session),
        guard,
    })
}

/// Reads the kernel's requests from `dev` and answers them, until the mount goes away.
fn serve<F: FileSystem + 'static>(server: &Arc<Server<F>>, mut dev: File) {
    let mut buf = vec![0u8; REQUEST_ROOM];
    // One reply buffer for the thread, reused: a reply is sent only up to the length the
    // server wrote, so what an earlier one left past it is never read.
    let reply = ReplyBuf::new(REPLY_ROOM);
    loop {
        let n = match dev.read(&mut buf) {
            Ok(n) => n,
            // ENOENT: the request was interrupted before it was read.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => continue,
            // ENODEV: unmounted.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => break,
            Err(e) => {
                log::error!("fuse: cannot read a request from {}: {e}", "/dev/fuse");
                break;
            }
        };
        let request = buf[..n].to_vec();
        let opcode = request
            .get(4..8)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if may_block(opcode) {
            // The thread takes a copy: if it cannot start, the request is answered here.
            let (s, copy) = (server.clone(), request.clone());
            let spawned = dev.try_clone().and_then(|d| {
                std::thread::Builder::new()
                    .name("fuse-lock-wait".into())
                    .spawn(move || answer(&s, &d, copy, ReplyBuf::new(REPLY_ROOM)))
            });
            match spawned {
                Ok(_) => continue,
                // Not waited for here, on the thread that reads the unlock it would wait for.
                Err(e) => log::warn!(
                    "fuse: cannot start a thread for a lock wait ({e}); a lock that is taken is refused (ENOLCK)"
                ),
            }
            answer_with(server, &dev, request, reply.clone(), false);
            continue;
        }
        answer(server, &dev, request, reply.clone());
    }
    server.cancel_waits();
    server.fs().destroy();
}

/// Answers one request, whole in `request`, on `dev`, writing the reply into `reply`.
fn answer<F: FileSystem>(server: &Server<F>, dev: &File, request: Vec<u8>, reply: ReplyBuf) {
    answer_with(server, dev, request, reply, true)
}

/// [`answer`]; with `may_wait` false a lock that is taken is refused rather than waited for
/// (`Server::handle_message_without_waiting`).
fn answer_with<F: FileSystem>(
    server: &Server<F>,
    mut dev: &File,
    request: Vec<u8>,
    reply: ReplyBuf,
    may_wait: bool,
) {
    let (request, to) = (RequestBuf::new(request), reply.clone());
    let replied = if may_wait {
        server.handle_message(request, to)
    } else {
        server.handle_message_without_waiting(request, to)
    };
    match replied {
        // FORGET and its kind take no reply.
        Ok(0) => {}
        Ok(n) => {
            // ENOENT: the request was interrupted and its reply is no longer awaited.
            if let Err(e) = dev.write_all(&reply.bytes(n)) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    log::warn!("fuse: cannot write a reply: {e}");
                }
            }
        }
        // The mount ended while it waited for a lock: no one reads a reply.
        Err(crate::server::Error::Abandoned) => {}
        Err(e) => log::warn!("fuse: request not answered: {e}"),
    }
}
