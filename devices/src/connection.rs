//! Serving one device's socket: one frontend at a time, again and again.
//!
//! `ferry serve` binds the socket once, before QEMU starts, and keeps it across frontend
//! disconnects (VM reboot, QEMU restart). Or, as a client ([`Endpoint::Connect`]), it connects
//! to a socket the frontend listens on (QEMU's `server=on`, libvirt's `mode='server'`), and
//! connects again whenever that connection ends, as Open vSwitch's vhost-user-client ports do:
//! a frontend that outlives ferry gets its device back when ferry starts again. Each connection
//! gets a fresh `VhostUserDaemon` around the same backend object, because a daemon's handler
//! state cannot be reused. The frontend's connection reaches the daemon through the
//! [relay](crate::relay), over a private socket that only this process uses.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};

use crate::relay::relay;
use crate::{GuestMemoryAtomic, GuestMemoryMmap, Vring};

/// Errors serving a device socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be created.
    #[error("cannot listen on {path}: check that its folder exists and is writable")]
    Bind {
        /// The socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process already serves the socket.
    #[error("{0} is in use by another running process; stop it or choose another path")]
    InUse(String),
    /// Accepting or relaying a connection failed.
    #[error("{name}: cannot accept a frontend connection")]
    Accept {
        /// The device's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The vhost-user daemon could not be set up.
    #[error("cannot set up the vhost-user device {name}: {reason}")]
    Daemon {
        /// The device's name.
        name: String,
        /// Why (the library's error has no `Error` impl to chain).
        reason: String,
    },
}

/// Binds the vhost-user socket at `path`. A stale socket file left by a process that is gone
/// is replaced; one that a running process still answers on is not.
pub fn bind_socket(path: &Path) -> Result<UnixListener, Error> {
    let shown = || path.display().to_string();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(shown()));
            }
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|source| Error::Bind {
        path: shown(),
        source,
    })
}

/// Where a device meets its frontends.
pub enum Endpoint {
    /// Accept them on this listening socket.
    Listen(UnixListener),
    /// Connect to the frontend's listening socket at this path, again after each disconnect.
    Connect(PathBuf),
}

/// How often a client endpoint tries to connect while its frontend's socket is not there.
const CONNECT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

impl Endpoint {
    /// The next frontend's connection.
    fn next(&self, name: &str) -> std::io::Result<UnixStream> {
        match self {
            Endpoint::Listen(l) => l.accept().map(|(s, _)| s),
            Endpoint::Connect(path) => {
                let mut said = false;
                loop {
                    match UnixStream::connect(path) {
                        Ok(s) => return Ok(s),
                        Err(e) => {
                            if !said {
                                info!(
                                    "{name}: waiting for the frontend to listen on {} ({e})",
                                    path.display()
                                );
                                said = true;
                            }
                            std::thread::sleep(CONNECT_RETRY);
                        }
                    }
                }
            }
        }
    }
}

/// Serves frontends on `endpoint` one after another, forever. `private` is a socket path for
/// the daemon's side of the relay, in a folder only this process uses, where nothing is yet
/// (the thread may be one that removes no file: see ferry's sandbox). `on_connect` runs when
/// a frontend's daemon is up (to register the device's own fds with its worker), and
/// `on_disconnect` after each frontend leaves, so the device can drop per-connection state.
/// `queue_pairs` is set for a NIC: the queue pairs it offers, which GET_QUEUE_NUM reports (see
/// the relay).
pub fn serve_connections<T, C, D>(
    name: &str,
    endpoint: Endpoint,
    private: PathBuf,
    backend: T,
    queue_pairs: Option<u16>,
    on_connect: C,
    on_disconnect: D,
) -> Result<(), Error>
where
    T: VhostUserBackend<Bitmap = (), Vring = Vring> + Clone + 'static,
    C: Fn(&VhostUserDaemon<T>),
    D: Fn(),
{
    let daemon_err = |e: vhost_user_backend::Error| Error::Daemon {
        name: name.to_string(),
        reason: e.to_string(),
    };
    let accept_err = |source| Error::Accept {
        name: name.to_string(),
        source,
    };
    let mut inner: Listener = UnixListener::bind(&private)
        .map_err(|source| Error::Bind {
            path: private.display().to_string(),
            source,
        })?
        .into();
    loop {
        let frontend = endpoint.next(name).map_err(accept_err)?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new(name.to_string(), backend.clone(), mem).map_err(daemon_err)?;
        // The connect completes into the private listener's backlog; the daemon accepts it.
        let daemon_side = UnixStream::connect(&private).map_err(accept_err)?;
        daemon.start(&mut inner).map_err(daemon_err)?;
        let relays = relay(name, frontend, daemon_side, queue_pairs).map_err(accept_err)?;
        on_connect(&daemon);
        info!("{name}: frontend connected");
        match daemon.wait() {
            // A frontend that quits (QEMU exit, VM reboot) shows up as one of these.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("{name}: frontend disconnected; waiting for the next one"),
            Err(e) => warn!("{name}: connection ended: {e}; waiting for the next frontend"),
        }
        // Dropping the daemon stops its vring workers before the backend is reused.
        drop(daemon);
        for t in relays {
            let _ = t.join();
        }
        // The backend keeps the last memory table it was given: hand it an empty one, so the
        // departed guest's RAM is unmapped now rather than when the next frontend connects.
        if let Err(e) = backend.update_memory(GuestMemoryAtomic::new(GuestMemoryMmap::new())) {
            warn!("{name}: cannot let go of the departed guest's memory: {e}");
        }
        on_disconnect();
    }
}
