//! Landlock: the file access the devices keep.
//!
//! One ruleset, built from [`Paths`]: read-write beneath the writable shares and ferry's
//! private folder, read beneath the read-only shares and the system files name resolution
//! reads, sockets made and removed in the folders of ferry's own sockets. A path the guest
//! smuggles past the file server's own confinement still meets the kernel's check, and so
//! does a descriptor the file server holds to a folder the host moved out of a share: Landlock
//! decides by where the file is now, not by how it was reached.

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use log::{info, warn};

use super::{sandbox_error, Paths};
use crate::config::{Error, Result};

/// Confines file access to `paths`.
pub(super) fn confine(paths: &Paths, scope_signals: bool) -> Result<()> {
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
