//! `ferry serve`: run the devices until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::atomic::Ordering;

use log::info;

use crate::config::{Error, Result, ServeConfig};
use crate::devices::{Devices, FAILURE};
use crate::signals;

/// Serves until a termination signal; removes the sockets on the way out.
pub fn serve(cfg: ServeConfig) -> Result<ExitCode> {
    signals::block_termination()
        .map_err(|e| Error::Runtime(format!("cannot block termination signals: {e}")))?;
    let devices = Devices::start(&cfg)?;
    info!("ready (pid {})", crate::sandbox::host_pid());
    let sig = signals::wait_termination()
        .map_err(|e| Error::Runtime(format!("cannot wait for signals: {e}")))?;
    let failed = FAILURE.load(Ordering::SeqCst);
    if failed == 0 {
        info!("{}: shutting down", signals::name(sig));
    }
    devices.shutdown();
    Ok(ExitCode::from(failed))
}
