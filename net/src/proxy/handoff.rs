//! Handing an open tunnel's server socket to the NAT, so its bytes skip the proxy.
//!
//! Once a CONNECT tunnel is open, the proxy has nothing left to do but copy: server to
//! proxy thread to socket pair to NAT, and back. Each hop is a copy and a wakeup on a
//! machine whose cores the guest's vCPUs want. So the proxy gives the NAT the server's
//! socket, and the flow then moves the tunnel's bytes itself, as it does for a direct
//! connection.
//!
//! The bytes already under way must keep their order. The protocol, for a [`Handoff`]
//! shared by one guest connection's flow and its session:
//! 1. The proxy writes everything it owes the guest (the `200`, bytes the server sent
//!    early) to its end of the socket pair, and everything it owes the server (bytes the
//!    guest sent early) to the server.
//! 2. It puts the server socket, its own end of the pair and the tunnel's rule counters in
//!    the slot ([`Handoff::give`]), then shuts down its end for writing.
//! 3. The NAT reads the proxy's bytes up to that end of stream, so the guest gets them all
//!    first. At the end of stream it finds the slot full ([`Handoff::take`]): it reads what
//!    the guest sent into the pair that the proxy never read (it owns both ends now, so
//!    nothing more arrives), sends that to the server ahead of anything newer, and carries
//!    on with the server socket as the flow's host socket.
//!
//! The slot is filled before the end of stream is sent, so an end of stream with an empty
//! slot is a real one: the proxy closed the connection.

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::rules::Counters;

/// What the proxy gives the NAT.
pub struct Taken {
    /// The connection to the server (or the upstream that opened the tunnel).
    pub server: TcpStream,
    /// The proxy's end of the socket pair, with whatever the guest sent that it never read.
    pub proxy_end: UnixStream,
    /// The rule that let the connection out, which counts its bytes.
    pub counters: Option<Arc<Counters>>,
}

/// The slot one guest connection's flow and session share.
#[derive(Default)]
pub struct Handoff(Mutex<Option<Taken>>);

impl Handoff {
    /// Puts `taken` in the slot and tells the NAT, by the end of the proxy's stream; gives
    /// it back when it cannot (the caller then copies the tunnel itself).
    pub(super) fn give(&self, taken: Taken) -> Result<(), Taken> {
        let Ok(mut slot) = self.0.lock() else {
            return Err(taken);
        };
        // Under the lock: the NAT cannot see the end of stream before the slot is full.
        let _ = taken.proxy_end.shutdown(std::net::Shutdown::Write);
        *slot = Some(taken);
        Ok(())
    }

    /// What the proxy gave, once: `None` when the end of stream was a real one.
    pub fn take(&self) -> Option<Taken> {
        self.0.lock().ok()?.take()
    }
}
