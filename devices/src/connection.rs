//! Serving one device's socket: one frontend at a time, again and again.
//!
//! `ferry serve` binds the socket once, before QEMU starts, and keeps it across frontend
//! disconnects (VM reboot, QEMU restart). Each connection gets a fresh `VhostUserDaemon` around
//! the same backend object, because a daemon's handler state cannot be reused.

use std::path::Path;

use log::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};

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
        source: vhost::vhost_user::Error,
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

/// Binds the vhost-user socket at `path`, replacing a stale socket file left by a previous run.
pub fn bind_socket(path: &Path) -> Result<Listener, Error> {
    Listener::new(path, true).map_err(|source| Error::Bind {
        path: path.display().to_string(),
        source,
    })
}

/// Serves frontends on `listener` one after another, forever. `on_disconnect` runs after each
/// frontend leaves, so the device can drop per-connection state.
pub fn serve_connections<T, D>(
    name: &str,
    listener: &mut Listener,
    backend: T,
    on_disconnect: D,
) -> Result<(), Error>
where
    T: VhostUserBackend<Bitmap = (), Vring = Vring> + Clone + 'static,
    D: Fn(),
{
    let daemon_err = |e: vhost_user_backend::Error| Error::Daemon {
        name: name.to_string(),
        reason: e.to_string(),
    };
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new(name.to_string(), backend.clone(), mem).map_err(daemon_err)?;
        daemon.start(listener).map_err(daemon_err)?;
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
        on_disconnect();
    }
}
