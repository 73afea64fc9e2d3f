//! The relay between a frontend's connection and the vhost-user daemon serving it.
//!
//! vhost-user messages pass through unchanged, file descriptors included, with two exceptions:
//!
//! - QEMU 7.2's virtio-net sends SET_VRING_ENABLE before SET_FEATURES: when the guest resets
//!   the device, and again when it starts it. The vhost crate treats that as a protocol error
//!   and drops the connection, so the NIC would be dead from the start. The relay answers such a
//!   message itself (when a reply is asked for), remembers the state asked for, and replays it
//!   right after SET_FEATURES, when the backend can take it; with PROTOCOL_FEATURES negotiated
//!   the rings start disabled, and QEMU sends no other enable.
//! - A NIC's GET_QUEUE_NUM is answered here, in queue pairs: QEMU reads the answer as the
//!   most pairs it may use, while the backend library answers with its count of vrings (twice
//!   that), and a frontend that took it at its word would set up rings that do not exist and
//!   leave a dead NIC. A vring message naming a ring past the pairs offered ends the
//!   connection with a line in the log that says what to ask for instead.
//! - SET_MEM_TABLE without file descriptors means the guest's RAM is not shareable; vhost-user
//!   cannot work then, and the first I/O would hang. The relay refuses the connection with an
//!   error that says how to start QEMU.
//!
//! - After a ring's kick descriptor (SET_VRING_KICK) reaches the daemon, the relay kicks it
//!   once, so the device looks at the ring as soon as it is enabled, whether or not the
//!   guest kicks. A guest that queued buffers while no backend served it (ferry restarted
//!   under it, QEMU reconnecting) may have its notifications suppressed: with EVENT_IDX it
//!   kicks only when its index crosses the `avail_event` the device last wrote, and the
//!   device that wrote it is gone, or QEMU's own handling in between left it behind. It then
//!   never kicks again, and the ring stays full forever; one look, which ends by writing a
//!   fresh `avail_event`, puts it right. A kick on an empty ring costs a glance.
//!
//! - A GET_VRING_BASE on a connection that has not set its features belongs to the
//!   frontend's previous connection (a listening QEMU still stopping the old device when it
//!   accepted the new one): the relay closes the connection rather than let the daemon answer
//!   a fresh ring's position, which the frontend would take as the guest's.
//!
//! Only the control channel passes here: vring kicks and calls are eventfds and guest memory is
//! mapped directly, so the data path never touches the relay.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use log::{debug, error, warn};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of a vhost-user message header: request, flags, payload size.
const HEADER_LEN: usize = 12;
/// Largest payload accepted; real messages are at most a few KiB.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most file descriptors one message carries (SET_MEM_TABLE: one per region).
const MAX_FDS: usize = 32;

const SET_FEATURES: u32 = 2;
const GET_QUEUE_NUM: u32 = 17;
/// The vring messages whose payload starts with the ring's index (SET_VRING_NUM, _ADDR,
/// _BASE, GET_VRING_BASE, SET_VRING_KICK, _CALL, _ERR); for the last three the index is the
/// low byte of a u64.
const VRING_MESSAGES: [u32; 7] = [8, 9, 10, 11, 12, 13, 14];
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_ENABLE: u32 = 18;
const SET_VRING_KICK: u32 = 12;
const GET_VRING_BASE: u32 = 11;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// VHOST_USER_F_PROTOCOL_FEATURES, in SET_FEATURES' payload.
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// One message from the frontend, with the descriptors that came with it.
struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }
}

fn payload_len(header: &[u8; HEADER_LEN]) -> io::Result<usize> {
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes is larger than any valid one"),
        ));
    }
    Ok(size)
}

/// Reads one message; `None` at end of stream.
fn recv_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points at `header`, which outlives the call, and `raw_fds` has room
    // for MAX_FDS descriptors; received descriptors are taken into OwnedFd right below.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: the kernel just installed these descriptors for us; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut sock_r = sock;
    if n < HEADER_LEN {
        sock_r.read_exact(&mut header[n..])?;
    }
    let mut payload = vec![0u8; payload_len(&header)?];
    sock_r.read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

fn send_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fds: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let bufs: [&[u8]; 2] = [&msg.header, &msg.payload];
    let total = HEADER_LEN + msg.payload.len();
    let sent = sock
        .send_with_fds(&bufs[..], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // The descriptors went with the first byte; finish any short write without them.
    if sent < total {
        let mut rest = msg.header.to_vec();
        rest.extend_from_slice(&msg.payload);
        let mut w = sock;
        w.write_all(&rest[sent..])?;
    }
    Ok(())
}

/// What the relay does with one frontend message.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Forward,
    /// Answer with this u64 (when a reply is asked for) and do not forward.
    Absorb,
    /// Answer with this u64 (always: the request has a reply) and do not forward.
    Answer(u64),
    /// Close the connection.
    Refuse(String),
    /// Close the connection: a message that belongs to the frontend's previous connection
    /// (see [`FrontendState::judge`]); the frontend recovers and connects again.
    Stale(String),
}

#[derive(Default)]
struct FrontendState {
    /// For a NIC: the queue pairs offered.
    queue_pairs: Option<u16>,
    features_set: bool,
    /// Ring enable states asked for before SET_FEATURES, as (index, enable) payloads.
    early_enables: Vec<[u8; 8]>,
}

impl FrontendState {
    fn judge(&mut self, msg: &Message) -> Verdict {
        match msg.request() {
            // A ring's position asked for on a connection that has not even set its
            // features belongs to the frontend's previous connection. QEMU stops a vhost-user
            // NIC whose backend went away in a bottom half run after the disconnect; were a
            // listening QEMU to accept the restarted backend's connection before that runs,
            // the stop's requests would reach the new connection. The daemon's answer, a
            // fresh ring's position 0, would then become the guest's, and the new session would
            // take the guest's old buffers again and move its used index backwards: a NIC dead
            // for good. Closed instead, the request fails, and QEMU takes the position from
            // the guest's used ring, as it does for a backend that died. (Not seen to happen:
            // a guard against an ordering QEMU's code allows.)
            GET_VRING_BASE if !self.features_set => Verdict::Stale(
                "the frontend asked for a ring's position before setting this connection up \
                 (it was still stopping the device of its previous connection): closed, so it \
                 takes the position from the guest's rings; the next connection is served"
                    .to_string(),
            ),
            GET_QUEUE_NUM if self.queue_pairs.is_some() => {
                Verdict::Answer(u64::from(self.queue_pairs.unwrap_or(1)))
            }
            r if VRING_MESSAGES.contains(&r) && self.queue_pairs.is_some() => {
                let pairs = u32::from(self.queue_pairs.unwrap_or(1));
                let index = msg.payload.first().map_or(0, |&b| u32::from(b));
                let index = if r >= 12 {
                    index
                } else {
                    msg.payload
                        .get(0..4)
                        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                };
                if index >= 2 * pairs {
                    return Verdict::Refuse(format!(
                        "the frontend set up vring {index}, past the {pairs} queue pairs this NIC offers; ask for at most {pairs} (QEMU: queues={pairs} on -netdev vhost-user; libvirt: <driver queues='{pairs}'/>)"
                    ));
                }
                Verdict::Forward
            }
            SET_FEATURES => {
                self.features_set = true;
                Verdict::Forward
            }
            SET_VRING_ENABLE if !self.features_set => {
                if let Ok(state) = <[u8; 8]>::try_from(msg.payload.as_slice()) {
                    // The last state asked for each ring wins.
                    self.early_enables.retain(|s| s[0..4] != state[0..4]);
                    self.early_enables.push(state);
                }
                Verdict::Absorb
            }
            SET_MEM_TABLE if msg.fds.is_empty() => Verdict::Refuse(
                "the frontend's guest memory cannot be shared: start QEMU with \
                 -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem"
                    .to_string(),
            ),
            _ => Verdict::Forward,
        }
    }

    /// The enables to send the backend after `set_features` went through.
    fn replays(&mut self, set_features: &Message) -> Vec<Message> {
        let features = <[u8; 8]>::try_from(set_features.payload.as_slice())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        let early = std::mem::take(&mut self.early_enables);
        if features & PROTOCOL_FEATURES == 0 {
            // Without protocol features the backend enables every ring itself.
            return Vec::new();
        }
        early
            .into_iter()
            .map(|state| {
                let mut header = [0u8; HEADER_LEN];
                header[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                header[4..8].copy_from_slice(&FLAG_VERSION_1.to_le_bytes());
                header[8..12].copy_from_slice(&8u32.to_le_bytes());
                Message {
                    header,
                    payload: state.to_vec(),
                    fds: Vec::new(),
                }
            })
            .collect()
    }
}

/// Kicks the ring whose kick eventfd `msg` (a SET_VRING_KICK) carried, once (see the module's
/// notes). The eventfd stays readable until the daemon's worker reads it, which it does once
/// the ring is enabled.
fn kick_once(name: &str, msg: &Message) {
    let Some(fd) = msg.fds.first() else {
        return;
    };
    let kicked = fd
        .try_clone()
        .and_then(|fd| std::fs::File::from(fd).write_all(&1u64.to_ne_bytes()));
    if let Err(e) = kicked {
        debug!("{name}: cannot kick a new ring once: {e}");
    }
}

/// Relays between `frontend` and `daemon` until either side closes. Returns the two relay
/// threads; both end when the connection does.
pub(crate) fn relay(
    name: &str,
    frontend: UnixStream,
    daemon: UnixStream,
    queue_pairs: Option<u16>,
) -> io::Result<[JoinHandle<()>; 2]> {
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let daemon_rx = daemon.try_clone()?;
    let n = name.to_string();
    let replies = to_frontend.clone();
    let up = thread::Builder::new()
        .name(format!("{name}-relay"))
        .spawn(move || {
            let mut state = FrontendState {
                queue_pairs,
                ..Default::default()
            };
            loop {
                let msg = match recv_message(&frontend) {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        debug!("{n}: frontend connection: {e}");
                        break;
                    }
                };
                match state.judge(&msg) {
                    Verdict::Forward => {
                        let mut out = vec![];
                        if msg.request() == SET_FEATURES {
                            out = state.replays(&msg);
                        }
                        let res = std::iter::once(&msg)
                            .chain(&out)
                            .try_for_each(|m| send_message(&daemon, m));
                        if let Err(e) = res {
                            debug!("{n}: daemon connection: {e}");
                            break;
                        }
                        if msg.request() == SET_VRING_KICK {
                            kick_once(&n, &msg);
                        }
                    }
                    v @ (Verdict::Absorb | Verdict::Answer(_)) => {
                        let value = match v {
                            Verdict::Answer(v) => {
                                debug!("{n}: GET_QUEUE_NUM answered: {v} queue pairs");
                                Some(v)
                            }
                            _ => {
                                debug!(
                                    "{n}: SET_VRING_ENABLE before SET_FEATURES kept for after it"
                                );
                                (msg.flags() & FLAG_NEED_REPLY != 0).then_some(0)
                            }
                        };
                        if let Some(value) = value {
                            let mut reply = Vec::with_capacity(HEADER_LEN + 8);
                            reply.extend_from_slice(&msg.request().to_le_bytes());
                            reply.extend_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
                            reply.extend_from_slice(&8u32.to_le_bytes());
                            reply.extend_from_slice(&value.to_le_bytes());
                            let res = match replies.lock() {
                                Ok(mut s) => s.write_all(&reply),
                                Err(_) => break,
                            };
                            if res.is_err() {
                                break;
                            }
                        }
                    }
                    Verdict::Refuse(why) => {
                        error!("{n}: {why}");
                        break;
                    }
                    Verdict::Stale(why) => {
                        warn!("{n}: {why}");
                        break;
                    }
                }
            }
            let _ = frontend.shutdown(std::net::Shutdown::Both);
            let _ = daemon.shutdown(std::net::Shutdown::Both);
        })?;
    let n = name.to_string();
    let down = thread::Builder::new()
        .name(format!("{name}-relay"))
        .spawn(move || {
            // Replies are relayed whole, so one the relay writes itself never lands inside one.
            let mut rx = daemon_rx;
            loop {
                let mut header = [0u8; HEADER_LEN];
                if rx.read_exact(&mut header).is_err() {
                    break;
                }
                let mut msg = header.to_vec();
                let len = match payload_len(&header) {
                    Ok(l) => l,
                    Err(e) => {
                        debug!("{n}: daemon reply: {e}");
                        break;
                    }
                };
                msg.resize(HEADER_LEN + len, 0);
                if rx.read_exact(&mut msg[HEADER_LEN..]).is_err() {
                    break;
                }
                let res = match to_frontend.lock() {
                    Ok(mut s) => s.write_all(&msg),
                    Err(_) => break,
                };
                if res.is_err() {
                    break;
                }
            }
            if let Ok(s) = to_frontend.lock() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            let _ = rx.shutdown(std::net::Shutdown::Both);
        })?;
    Ok([up, down])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Message {
            header,
            payload: payload.to_vec(),
            fds,
        }
    }

    fn enable(index: u32, on: u32) -> Message {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&on.to_le_bytes());
        msg(SET_VRING_ENABLE, 1, &p, vec![])
    }

    #[test]
    fn early_vring_enables_are_replayed_after_set_features() {
        let mut s = FrontendState::default();
        assert_eq!(s.judge(&enable(0, 0)), Verdict::Absorb);
        assert_eq!(s.judge(&enable(1, 1)), Verdict::Absorb);
        assert_eq!(s.judge(&enable(0, 1)), Verdict::Absorb);
        let features = msg(SET_FEATURES, 1, &PROTOCOL_FEATURES.to_le_bytes(), vec![]);
        assert_eq!(s.judge(&features), Verdict::Forward);
        let replays = s.replays(&features);
        let got: Vec<&[u8]> = replays.iter().map(|m| m.payload.as_slice()).collect();
        assert_eq!(
            got,
            vec![
                enable(1, 1).payload.as_slice(),
                enable(0, 1).payload.as_slice()
            ]
        );
        assert!(replays
            .iter()
            .all(|m| m.request() == SET_VRING_ENABLE && m.flags() == 1));
        // After SET_FEATURES, enables go straight through.
        assert_eq!(s.judge(&enable(0, 0)), Verdict::Forward);
    }

    #[test]
    fn no_replay_without_protocol_features() {
        let mut s = FrontendState::default();
        assert_eq!(s.judge(&enable(0, 1)), Verdict::Absorb);
        let features = msg(SET_FEATURES, 1, &0u64.to_le_bytes(), vec![]);
        assert_eq!(s.judge(&features), Verdict::Forward);
        assert!(s.replays(&features).is_empty());
    }

    #[test]
    fn a_nics_rings_past_its_pairs_are_refused_and_other_devices_pass() {
        let mut nic = FrontendState {
            queue_pairs: Some(2),
            ..Default::default()
        };
        assert_eq!(
            nic.judge(&msg(GET_QUEUE_NUM, 1, &[], vec![])),
            Verdict::Answer(2)
        );
        let num = |i: u32| {
            msg(
                8,
                1,
                &[&i.to_le_bytes()[..], &256u32.to_le_bytes()].concat(),
                vec![],
            )
        };
        let kick = |i: u64| msg(12, 1, &i.to_le_bytes(), vec![]);
        assert_eq!(nic.judge(&num(3)), Verdict::Forward);
        assert_eq!(nic.judge(&kick(3)), Verdict::Forward);
        assert!(matches!(nic.judge(&num(4)), Verdict::Refuse(m) if m.contains("queues=2")));
        assert!(matches!(nic.judge(&kick(4)), Verdict::Refuse(_)));
        let mut fs = FrontendState::default();
        assert_eq!(
            fs.judge(&msg(GET_QUEUE_NUM, 1, &[], vec![])),
            Verdict::Forward
        );
        assert_eq!(fs.judge(&num(9)), Verdict::Forward);
    }

    #[test]
    fn a_rings_position_asked_before_set_features_closes_the_connection() {
        let state = |i: u32| {
            msg(
                GET_VRING_BASE,
                1,
                &[&i.to_le_bytes()[..], &[0; 4]].concat(),
                vec![],
            )
        };
        for queue_pairs in [Some(1), None] {
            let mut s = FrontendState {
                queue_pairs,
                ..Default::default()
            };
            assert!(
                matches!(s.judge(&state(0)), Verdict::Stale(m) if m.contains("previous connection"))
            );
            // Once the connection is set up, stopping a ring is the frontend's right.
            assert_eq!(
                s.judge(&msg(SET_FEATURES, 1, &[0; 8], vec![])),
                Verdict::Forward
            );
            assert_eq!(s.judge(&state(1)), Verdict::Forward);
        }
    }

    #[test]
    fn memory_without_fds_is_refused() {
        let mut s = FrontendState::default();
        assert!(matches!(
            s.judge(&msg(SET_MEM_TABLE, 1, &[0u8; 8], vec![])),
            Verdict::Refuse(_)
        ));
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            s.judge(&msg(SET_MEM_TABLE, 1, &[0u8; 8], vec![f.into()])),
            Verdict::Forward
        );
    }

    #[test]
    fn messages_and_fds_cross_the_relay_and_early_enable_gets_its_reply() {
        use std::os::fd::AsRawFd;
        let (fe, fe_peer) = UnixStream::pair().unwrap();
        let (dm, dm_peer) = UnixStream::pair().unwrap();
        let threads = relay("test", fe_peer, dm_peer, Some(4)).unwrap();
        // A NIC's GET_QUEUE_NUM is answered here, in queue pairs.
        send_message(&fe, &msg(GET_QUEUE_NUM, 1, &[], vec![])).unwrap();
        let mut reply = [0u8; HEADER_LEN + 8];
        (&fe).read_exact(&mut reply).unwrap();
        assert_eq!(&reply[0..4], &GET_QUEUE_NUM.to_le_bytes());
        assert_eq!(&reply[HEADER_LEN..], &4u64.to_le_bytes());
        // An early enable asking for a reply is answered by the relay, not forwarded.
        send_message(
            &fe,
            &msg(SET_VRING_ENABLE, 1 | FLAG_NEED_REPLY, &[0u8; 8], vec![]),
        )
        .unwrap();
        let mut reply = [0u8; HEADER_LEN + 8];
        (&fe).read_exact(&mut reply).unwrap();
        assert_eq!(
            u32::from_le_bytes(reply[0..4].try_into().unwrap()),
            SET_VRING_ENABLE
        );
        assert_eq!(u32::from_le_bytes(reply[4..8].try_into().unwrap()), 0x5);
        // A message with a descriptor reaches the daemon side whole, descriptor included.
        let f = std::fs::File::open("/dev/null").unwrap();
        send_message(&fe, &msg(SET_MEM_TABLE, 1, b"regions!", vec![f.into()])).unwrap();
        let got = recv_message(&dm).unwrap().unwrap();
        assert_eq!(got.request(), SET_MEM_TABLE);
        assert_eq!(got.payload, b"regions!");
        assert_eq!(got.fds.len(), 1);
        // A ring's kick eventfd reaches the daemon kicked once.
        let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // SAFETY: dup gives a new descriptor that nothing else owns.
        let kick_fd = unsafe { OwnedFd::from_raw_fd(libc::dup(efd.as_raw_fd())) };
        send_message(
            &fe,
            &msg(SET_VRING_KICK, 1, &1u64.to_le_bytes(), vec![kick_fd]),
        )
        .unwrap();
        let got = recv_message(&dm).unwrap().unwrap();
        assert_eq!((got.request(), got.fds.len()), (SET_VRING_KICK, 1));
        let mut kicked = None;
        for _ in 0..100 {
            if let Ok(v) = efd.read() {
                kicked = Some(v);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(kicked, Some(1));
        // Daemon replies come back unchanged.
        let r = msg(1, FLAG_VERSION_1 | FLAG_REPLY, &7u64.to_le_bytes(), vec![]);
        send_message(&dm, &r).unwrap();
        let mut back = [0u8; HEADER_LEN + 8];
        (&fe).read_exact(&mut back).unwrap();
        assert_eq!(&back[HEADER_LEN..], &7u64.to_le_bytes());
        // Closing the frontend ends both threads and closes the daemon side.
        drop(fe);
        for t in threads {
            t.join().unwrap();
        }
        assert!(recv_message(&dm).unwrap().is_none());
    }
}
