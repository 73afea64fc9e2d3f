//! Lock requests (SETLK, SETLKW, INTERRUPT) and the FUSE sessions a lock wait spans.
//!
//! Theory of operation. Host locks are open-file-description locks and flock on descriptors
//! every guest request shares, so a lock cannot be waited for in the kernel without stalling
//! the rest: SETLKW is a retry with a growing pause, on a thread the transport gives it
//! ([`may_block`]), until the lock is free, the guest interrupts the request (INTERRUPT, noted
//! by unique id), or the session ends. A transport that cannot spare a thread asks for no wait,
//! and a taken lock is refused with ENOLCK rather than waited for where the unlock would queue
//! behind it.
//!
//! A transport that stops its queues (the frontend's GET_VRING_BASE: the VM pauses, resets
//! or migrates) may not touch them afterwards, and cannot wait for a lock to be freed first:
//! [`Server::refuse_waits`] ends every wait at its next try with ENOLCK, the answer a wait
//! past the transport's threads gets too, into a ring that is still the guest's.
//!
//! A session is a number ([`Server::session`]) that changes when one ends: a second INIT (the
//! guest rebooted) or the transport's [`Server::cancel_waits`] (the frontend left). A request
//! carries the session it was taken in; one whose session ended, before it is answered or
//! while it waits, answers nothing ([`Error::Abandoned`](super::Error::Abandoned)): its
//! buffers were the previous kernel's, and after a reboot that memory is the next one's.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Server;
use crate::abi::{self, opcode, InHeader};
use crate::filesystem::{Context, FileSystem};

/// Interrupts remembered at most; the guest interrupts only requests still in flight.
const MAX_INTERRUPTS: usize = 1024;
/// Longest pause between two tries of a lock that SETLKW waits for.
const LOCK_RETRY_MAX: Duration = Duration::from_millis(50);

/// Whether a request may wait for a long time (SETLKW waits for the lock): the transport
/// should answer it off the queue's thread, so other requests keep flowing.
pub fn may_block(opcode: u32) -> bool {
    opcode == opcode::SETLKW
}

/// The marker `wait_lock` returns for a wait whose session ended
/// ([`Error::Abandoned`](super::Error::Abandoned)).
#[derive(Debug, thiserror::Error)]
#[error("the session ended")]
pub(super) struct SessionEnded;

pub(super) fn is_session_ended(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<SessionEnded>())
}

impl<F: FileSystem> Server<F> {
    /// The FUSE session now: a number that changes when one ends (a second INIT, a
    /// transport's [`Self::cancel_waits`]).
    pub fn session(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Abandons every request waiting for a lock (they end unanswered,
    /// [`Error::Abandoned`](super::Error::Abandoned)): the session is over.
    pub fn cancel_waits(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut i) = self.interrupts.lock() {
            i.clear();
        }
    }

    /// Ends every request waiting for a lock now, at its next try, with ENOLCK (the lock
    /// stays taken; the guest's fcntl or flock fails rather than waits). For a transport that
    /// must have every request answered before it stops a queue. A wait that starts after
    /// this is not ended: call it until the waits are gone.
    pub fn refuse_waits(&self) {
        self.refusals.fetch_add(1, Ordering::SeqCst);
    }

    fn take_interrupt(&self, unique: u64) -> bool {
        self.interrupts
            .lock()
            .map(|mut i| i.remove(&unique))
            .unwrap_or(false)
    }

    /// SETLKW: tries the lock until it is free, the guest interrupts the request, or the
    /// session ends. Host locks cannot be waited for on a descriptor shared by all the guest's
    /// requests without stalling them, so the wait is a retry with a growing pause.
    ///
    /// A wait whose session ended answers nothing ([`SessionEnded`]): the request's buffers
    /// were the previous kernel's, and after a reboot the memory belongs to the next one. The
    /// check follows every try, since the session's end also drops the handle the try used.
    fn wait_lock(
        &self,
        ctx: Context,
        hdr: &InHeader,
        arg: &abi::LkIn,
        flock: bool,
        session: u64,
    ) -> io::Result<()> {
        let mut pause = Duration::from_millis(1);
        let refusals = self.refusals.load(Ordering::SeqCst);
        loop {
            let tried = self.try_lock(ctx, hdr, arg, flock);
            if self.session() != session {
                return Err(io::Error::other(SessionEnded));
            }
            match tried {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                other => return other,
            }
            if self.refusals.load(Ordering::SeqCst) != refusals {
                return Err(io::Error::from_raw_os_error(libc::ENOLCK));
            }
            if self.take_interrupt(hdr.unique) {
                return Err(io::Error::from_raw_os_error(libc::EINTR));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(LOCK_RETRY_MAX);
        }
    }

    /// INTERRUPT of request `unique`: noted for its lock wait, if it has one.
    pub(super) fn note_interrupt(&self, unique: u64) {
        if let Ok(mut i) = self.interrupts.lock() {
            if i.len() >= MAX_INTERRUPTS {
                i.clear();
            }
            i.insert(unique);
        }
    }

    /// SETLK or SETLKW `arg`: SETLK and unlocks at once; SETLKW waits (`may_wait`) for the
    /// lock, or refuses a taken one with ENOLCK.
    pub(super) fn set_lock(
        &self,
        ctx: Context,
        hdr: &InHeader,
        arg: &abi::LkIn,
        may_wait: bool,
        session: u64,
    ) -> io::Result<()> {
        let flock = arg.lk_flags & abi::LK_FLOCK != 0;
        if hdr.opcode == opcode::SETLK || arg.lk.type_ == libc::F_UNLCK as u32 {
            self.try_lock(ctx, hdr, arg, flock)
        } else if may_wait {
            self.wait_lock(ctx, hdr, arg, flock, session)
        } else {
            self.try_lock(ctx, hdr, arg, flock)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EAGAIN) => io::Error::from_raw_os_error(libc::ENOLCK),
                    _ => e,
                })
        }
    }

    /// One try of the lock `arg` asks for (EAGAIN: someone holds it).
    fn try_lock(
        &self,
        ctx: Context,
        hdr: &InHeader,
        arg: &abi::LkIn,
        flock: bool,
    ) -> io::Result<()> {
        self.fs
            .setlk(ctx, hdr.nodeid, arg.fh, arg.owner, arg.lk, flock)
    }
}
