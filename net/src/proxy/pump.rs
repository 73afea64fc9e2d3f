//! Bytes between two sockets, both ways, for a tunnel or an upgraded connection that the
//! NAT did not take ([`super::handoff`]: a connection not from the NAT, an upgrade, or a
//! hand-off that failed).
//!
//! Each direction is one blocking loop on a thread of its own, copying through a 64 KiB
//! buffer. An end of stream on one side is passed on as a half-close; a reset on one side
//! resets the other. (splice(2) through a pipe was tried: in `make bench QUICK=1`'s proxy
//! rows it gave the same tunnel/direct ratio, 0.80x to 0.88x against 0.84x to 0.87x over
//! three runs each, since the guest side sets the pace; it is not worth its unsafe code.)

use std::io;
use std::net::Shutdown;
use std::sync::Arc;

use super::wire::Socket;
use crate::rules::Counters;

/// Moves bytes both ways until both sides have finished, adding them to `counters`.
pub(super) fn bridge<C: Socket, S: Socket>(client: C, server: S, counters: Option<Arc<Counters>>) {
    let _ = client.set_read_timeout(None);
    let _ = server.set_read_timeout(None);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let c = counters.clone();
    let up = std::thread::Builder::new()
        .name("ferry-proxy-up".into())
        .spawn(move || pump(c2, s2, c.as_deref()));
    pump(server, client, counters.as_deref());
    if let Ok(t) = up {
        let _ = t.join();
    }
}

/// How one direction ended.
enum End {
    /// `from` ended its stream: pass it on.
    Eof,
    /// Writing to `to` failed: stop reading `from`.
    WriteFailed,
    /// Reading `from` failed (a reset): reset `to`.
    ReadFailed,
}

/// Copies `from` to `to` until either ends, adding what it moves to `counters`.
fn pump<F: Socket, T: Socket>(mut from: F, mut to: T, counters: Option<&Counters>) {
    match copy_loop(&mut from, &mut to, counters) {
        End::Eof => {
            let _ = to.shutdown(Shutdown::Write);
        }
        End::WriteFailed => {
            let _ = from.shutdown(Shutdown::Read);
            let _ = to.shutdown(Shutdown::Write);
        }
        End::ReadFailed => {
            let _ = to.shutdown(Shutdown::Both);
        }
    }
}

fn copy_loop(from: &mut impl Socket, to: &mut impl Socket, counters: Option<&Counters>) -> End {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return End::Eof,
            Ok(n) => {
                if let Some(c) = counters {
                    c.add_bytes(n);
                }
                if to.write_all(&buf[..n]).is_err() {
                    return End::WriteFailed;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return End::ReadFailed,
        }
    }
}
