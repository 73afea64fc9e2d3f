//! The virtio-fs device over vhost-user.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT), the others are request queues:
//! one by default, up to [`MAX_REQUEST_QUEUES`] when the frontend sets them up (QEMU's
//! `num-request-queues`, which it does not check against the backend's maximum, so ferry
//! takes any count a guest is likely to get; Linux 6.11 and later spread requests over them
//! by CPU, earlier kernels use the first). Each chain holds one FUSE request in its readable
//! descriptors and room for the reply in its writable ones. The config space (GET_CONFIG,
//! with the CONFIG protocol feature) holds the tag and one request queue, as virtiofsd's
//! `--tag` puts them there, for frontends that read them (crosvm, QEMU's `vhost-user-fs`
//! without `tag=`); QEMU and cloud-hypervisor build it from their own options.
//!
//! Requests are answered on the device's worker thread, one after another and from every
//! request queue, unless the share has a pool (`threads=N`): then each goes to a pool
//! thread (`fs_pool`), which answers it and returns its chain to the guest; that is how
//! requests from several queues, or one, proceed side by side. A READ of up to 64 KiB whose
//! data the host has in its page cache is the exception: the worker answers it as it takes
//! it, without reading the disk (`preadv2(RWF_NOWAIT)`, as io_uring tries a read before it
//! hands it to a thread), since the hand-over would cost as much as the read; so is a
//! buffered WRITE of up to 64 KiB to a local file system, unless one took long lately
//! (`fs_inline`, `ferry_fs`'s `passthrough/quick.rs`). When the pool has no place (every
//! thread busy, four requests per thread waiting) the worker answers the request itself: it
//! drains the ring holding its lock, which the pool's threads take to return their chains,
//! so it must never wait for them. A request that may wait long (SETLKW) gets a thread of
//! its own either way (at most 64 at once; past them a lock that is taken is refused with
//! ENOLCK), so it never holds a pool thread or the queue. A request handed over keeps the
//! FUSE session it was taken in: if that session ends first (the guest rebooted, the
//! frontend left) it is dropped unanswered, its buffers being the next kernel's. When the
//! frontend stops a queue (GET_VRING_BASE: the VM pauses, resets or migrates) the requests
//! handed over from it are answered before the reply, since the ring is the frontend's
//! after it: the pool finishes its own, and lock waits are refused with ENOLCK
//! (`stop_queue`). High-priority requests (FORGET, INTERRUPT) are answered on the worker:
//! they are short, and INTERRUPT must not wait behind the requests it interrupts.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use ferry_fs::abi::opcode;
use ferry_fs::{may_block, FileSystem, RequestReader, Server};
use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::chain::{split_chain, ChainReader, ChainWriter};
use crate::fs_inline::InlineWrites;
use crate::fs_poll::{FsPoll, POLL_MAX};
use crate::fs_pool::RequestPool;
use crate::queue::{drain_queue, drain_queue_unsignalled, Chain};
use crate::{GuestMemoryAtomic, Vring};

/// The longest the worker watches a request queue for the guest's next request after a reply,
/// unless the share says otherwise (`poll=`; see `fs_poll`).
pub const DEFAULT_POLL_WINDOW: std::time::Duration = POLL_MAX;

/// The most request queues a frontend may set up.
pub const MAX_REQUEST_QUEUES: usize = 16;
const NUM_QUEUES: usize = 1 + MAX_REQUEST_QUEUES;
/// The high-priority queue; every other is a request queue.
const HIPRIO_QUEUE: usize = 0;
/// `struct virtio_fs_config`: the tag (36 bytes, NUL-padded) and the number of request queues
/// (le32).
const CONFIG_LEN: usize = 40;
/// The longest tag the config space holds.
pub const MAX_TAG_LEN: usize = 36;
/// Most requests that wait for a lock at once, each on a thread; past it a lock that is taken
/// is refused (ENOLCK).
const MAX_WAITING: usize = 64;

/// Answers one request in `chain`, taken off the ring during FUSE session `session`
/// (`Server::session` then); returns the reply's length, or `None` for a request that must not
/// go back to the guest (its session ended before it was answered).
fn answer<F: FileSystem>(server: &Server<F>, chain: &Chain, session: u64) -> Option<u32> {
    match split_chain(chain.memory(), chain.clone()) {
        Ok((r, w)) => outcome(server.handle_message_in_session(session, r, w)),
        Err(e) => {
            warn!("fs: dropping a malformed descriptor chain: {e}");
            Some(0)
        }
    }
}

/// What a request's answer gives the ring: the reply's length, or `None` for a request that
/// must not go back to the guest.
/// Answers a request on the thread that takes the queue's requests, which must not wait: a
/// lock wait (SETLKW, which `may_block` sends elsewhere) is refused rather than waited for,
/// should a guest rewrite a request's opcode after it was looked at.
fn answer_here<F: FileSystem>(
    server: &Server<F>,
    reader: ChainReader<'_>,
    writer: ChainWriter<'_>,
) -> Option<u32> {
    outcome(server.handle_message_without_waiting(reader, writer))
}

fn outcome(replied: ferry_fs::Result<usize>) -> Option<u32> {
    match replied {
        Ok(n) => Some(n as u32),
        Err(ferry_fs::Error::Abandoned) => {
            debug!("fs: a request of an ended session is dropped unanswered");
            None
        }
        Err(e) => {
            warn!("fs: request not answered: {e}");
            Some(0)
        }
    }
}

const QUEUE_SIZE: usize = 1024;

/// The largest READ (from the host's page cache) or WRITE (into it) a worker with a pool
/// answers itself: a copy of 64 KiB takes a few microseconds, as a pool thread's wake-up
/// does; a larger one holds up the queue's other requests, which the pool would answer
/// meanwhile.
const INLINE_MOST: u32 = 64 * 1024;

/// Watches `vring` until the guest posts a request (true), or the window after the last reply
/// closes, or one of the `others` queues has requests, whose kick the worker must go and take
/// (false).
fn watch(vring: &Vring, mem: &GuestMemoryAtomic, others: &[&Vring], poll: &FsPoll) -> bool {
    use vm_memory::GuestAddressSpace;
    let mem = mem.memory();
    loop {
        if has_requests(vring, &mem) {
            return true;
        }
        // Stopped by the frontend (GET_VRING_BASE): nothing more to take.
        if !vring.get_ref().get_queue().ready() {
            return false;
        }
        if others.iter().any(|v| has_requests(v, &mem)) {
            return false;
        }
        if !poll.within_window(Instant::now()) {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Whether the guest has posted requests on `vring` that the device has not taken.
fn has_requests(vring: &Vring, mem: &crate::GuestMemoryMmap) -> bool {
    let state = vring.get_ref();
    let q = state.get_queue();
    q.ready()
        && q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|a| a.0 != q.next_avail())
}

/// How long GET_VRING_BASE waits for the requests handed off from its queue. The frontend
/// waits for the reply (QEMU holding its big lock), so a request stuck in a hung host file
/// system must not hold it for good.
const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Requests handed to the pool or to threads of their own and not yet done with, per queue.
type Counts = [AtomicUsize; NUM_QUEUES];

/// How many times each queue was stopped, and the gate a handed-off request holds while it
/// returns its chain (read) and a stop while it counts (write).
#[derive(Default)]
struct Stops {
    counts: [AtomicU64; NUM_QUEUES],
    gate: RwLock<()>,
    /// When a stop last gave up waiting for a request.
    gave_up: Mutex<Option<std::time::Instant>>,
}

/// One request in [`VhostUserFsBackend::answering`], for as long as it lives.
struct Answering(Arc<Counts>, usize);

impl Answering {
    fn new(counts: &Arc<Counts>, queue: usize) -> Self {
        counts[queue].fetch_add(1, Ordering::SeqCst);
        Answering(counts.clone(), queue)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::SeqCst);
    }
}

/// The virtio-fs vhost-user backend, serving one `FileSystem`.
pub struct VhostUserFsBackend<F> {
    server: Arc<Server<F>>,
    /// Requests waiting for a lock on threads of their own.
    waiting: Arc<AtomicUsize>,
    /// Requests handed to the pool or to a thread of their own and not yet done with, by the
    /// queue they came from.
    answering: Arc<Counts>,
    /// How many times each queue was stopped (GET_VRING_BASE): a handed-off request taken
    /// before its queue's last stop leaves the ring alone.
    stops: Arc<Stops>,
    mem: RwLock<GuestMemoryAtomic>,
    event_idx: AtomicBool,
    config: [u8; CONFIG_LEN],
    /// The request queues' pool, if the share has one.
    pool: Option<RequestPool>,
    /// When the worker watches each request queue for the next request (`fs_poll`).
    polls: [Mutex<FsPoll>; NUM_QUEUES],
    /// With a pool: whether the worker answers small writes itself (`fs_inline`).
    inline_writes: InlineWrites,
    /// Requests taken off each request queue (queue 1 first).
    taken: [AtomicU64; MAX_REQUEST_QUEUES],
}

impl<F: FileSystem + 'static> VhostUserFsBackend<F> {
    /// A device serving `server` under `tag` (cut to [`MAX_TAG_LEN`] bytes; ferry's options
    /// refuse longer ones).
    pub fn new(server: Arc<Server<F>>, tag: &str) -> Arc<Self> {
        Self::with_threads(server, tag, 0)
    }

    /// [`Self::new`], answering the request queue on a pool of `threads` threads (0: on the
    /// queue's worker).
    pub fn with_threads(server: Arc<Server<F>>, tag: &str, threads: usize) -> Arc<Self> {
        let mut config = [0u8; CONFIG_LEN];
        let t = &tag.as_bytes()[..tag.len().min(MAX_TAG_LEN)];
        config[..t.len()].copy_from_slice(t);
        config[MAX_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Arc::new(VhostUserFsBackend {
            server,
            waiting: Arc::new(AtomicUsize::new(0)),
            answering: Arc::new(std::array::from_fn(|_| AtomicUsize::new(0))),
            stops: Arc::new(Stops::default()),
            mem: RwLock::new(GuestMemoryAtomic::new(crate::GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
            config,
            pool: (threads > 0).then(|| RequestPool::new(&format!("fs-{tag}"), threads)),
            taken: std::array::from_fn(|_| AtomicU64::new(0)),
            polls: std::array::from_fn(|_| Mutex::new(FsPoll::new(POLL_MAX))),
            inline_writes: InlineWrites::new(),
        })
    }

    /// Sets the longest the worker watches a request queue for the guest's next request after
    /// a reply (`fs_poll`, which adapts the watch below it; zero: never, the worker sleeps
    /// until the guest's kick).
    pub fn set_poll_window(&self, window: std::time::Duration) {
        for p in &self.polls {
            if let Ok(mut p) = p.lock() {
                *p = FsPoll::new(window);
            }
        }
    }

    /// The FUSE server behind the device.
    pub fn server(&self) -> &Arc<Server<F>> {
        &self.server
    }

    /// How many threads answer the request queue (0: its worker does, without a pool).
    pub fn pool_threads(&self) -> usize {
        self.pool.as_ref().map_or(0, RequestPool::threads)
    }

    /// Requests taken off each request queue so far, queue 1 first, up to the last queue
    /// that carried one.
    pub fn requests_by_queue(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .taken
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    }

    /// How much guest memory the device maps now, in MiB (see [`crate::mapped_mib`]).
    pub fn guest_memory_mib(&self) -> u64 {
        self.mem.read().map_or(0, |m| crate::mapped_mib(&m))
    }

    /// How many requests wait for a lock on threads of their own now.
    pub fn waiting_requests(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Waits up to `limit` for every request handed to the pool or to a thread of its own
    /// to be done with; says whether they all were. A departed frontend's session is ended
    /// after this (its lock waits cancelled first), so no request of the old guest's lands
    /// in the file system after its nodes and files are dropped. (A guest that reboots in
    /// the same VM ends its session with the next INIT; requests of the old one that a pool
    /// thread takes after that are dropped unanswered, see `answer`.)
    pub fn wait_until_answered(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.answering.iter().any(|n| n.load(Ordering::SeqCst) > 0) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Stops `queue` for GET_VRING_BASE: after the reply the ring is the frontend's (the VM
    /// pauses, resets or migrates), so the requests taken from it are answered first, as the
    /// vhost-user backend crate asks of backends that answer off the queue's thread. The pool
    /// finishes its requests; lock waits end at their next try with ENOLCK (a paused VM's
    /// process sees its lock refused rather than QEMU waiting on it for good). Past `limit` a
    /// request still running (a host file system that hangs) is left to finish without a
    /// reply, and the ring is left alone from here on: its chain is lost to the guest, which
    /// beats a used entry written into memory the next kernel owns. The worker no longer
    /// takes from the ring: the frontend's stop marks it not ready first, which waits for a
    /// drain under way to end.
    fn stop_queue(&self, queue: usize, limit: std::time::Duration) {
        let Some(count) = self.answering.get(queue) else {
            return;
        };
        let now = std::time::Instant::now();
        // The frontend stops the queues one after another, holding its big lock: once one
        // stop gave up on a hung request, the others of the same stop do not wait again.
        let gave_up = self
            .stops
            .gave_up
            .lock()
            .ok()
            .and_then(|g| *g)
            .is_some_and(|at| now.saturating_duration_since(at) < limit);
        let deadline = if gave_up { now } else { now + limit };
        while count.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                if let Ok(mut g) = self.stops.gave_up.lock() {
                    *g = Some(std::time::Instant::now());
                }
                warn!(
                    "fs: {} request(s) from queue {queue} still running as the frontend stops \
                     it; they will not be answered (is a host file system in the share hung?)",
                    count.load(Ordering::SeqCst)
                );
                break;
            }
            // Again each round: a wait that began after the last call is not refused.
            self.server.refuse_waits();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Under the gate: a job returning its chain now finishes first, or sees the stop.
        let _gate = self.stops.gate.write();
        self.stops.counts[queue].fetch_add(1, Ordering::SeqCst);
    }

    /// Answers one request; returns the number of reply bytes written into the chain, or
    /// `None` when the chain went to a pool thread or (SETLKW, which may wait long) to a
    /// thread of its own, which completes it, or must not go back (its session ended).
    /// Raises `largest` to the bytes the request brought or its reply took, headers
    /// included (for `fs_poll`).
    fn handle_chain(
        &self,
        chain: Chain,
        vring: &Vring,
        queue: usize,
        largest: &mut usize,
    ) -> Option<u32> {
        if let Some(n) = queue.checked_sub(1).and_then(|i| self.taken.get(i)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        let (reader, writer) = match split_chain(chain.memory(), chain.clone()) {
            Ok(rw) => rw,
            Err(e) => {
                warn!("fs: dropping a malformed descriptor chain: {e}");
                return Some(0);
            }
        };
        // What the request brought (a WRITE's data); the reply's length is added below. The
        // room the guest gave for the reply is not a measure: a GETXATTR may offer 64 KiB
        // for a few bytes.
        *largest = (*largest).max(reader.available_bytes());
        if may_block(reader.peek_opcode()) {
            // Past MAX_WAITING waits, answered here without waiting: a lock that is taken is
            // refused (ENOLCK). Waiting here would stall the queue, and with it the unlock the
            // wait is for.
            if self.waiting.fetch_add(1, Ordering::SeqCst) >= MAX_WAITING {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return outcome(self.server.handle_message_without_waiting(reader, writer));
            }
            drop((reader, writer));
            return self.defer(chain, vring, queue);
        }
        // With a pool, a request goes to it when it has a place; otherwise it is answered
        // here (see `fs_pool`: the worker never waits for the pool). But what costs less to
        // answer than to hand over is answered here first (`answer_quickly`).
        if let Some(pool) = self.pool.as_ref().filter(|_| queue != HIPRIO_QUEUE) {
            if let Some(replied) = self.answer_quickly(&reader, &writer, largest) {
                return replied;
            }
            if let Some(place) = pool.reserve() {
                drop((reader, writer));
                pool.submit(place, self.completion(chain, vring, queue));
                return None;
            }
        }
        let replied = answer_here(&self.server, reader, writer);
        *largest = (*largest).max(replied.unwrap_or(0) as usize);
        replied
    }

    /// With a pool: answers the request here if handing it over would cost more than the
    /// copy, a READ whose data the host's page cache holds or a small buffered WRITE unless
    /// one was slow lately (`fs_inline`, `ferry_fs`'s `server::quick`); `None`: hand it over
    /// (nothing was replied).
    fn answer_quickly(
        &self,
        reader: &ChainReader<'_>,
        writer: &ChainWriter<'_>,
        largest: &mut usize,
    ) -> Option<Option<u32>> {
        match reader.peek_opcode() {
            opcode::READ => {
                let n = self.server.handle_read_if_cached(
                    reader.clone(),
                    writer.clone(),
                    INLINE_MOST,
                )?;
                *largest = (*largest).max(n);
                Some(Some(n as u32))
            }
            opcode::WRITE => {
                let began = Instant::now();
                if !self.inline_writes.allowed(began)
                    || !self.server.is_quick_write(reader, INLINE_MOST)
                {
                    return None;
                }
                let replied = answer_here(&self.server, reader.clone(), writer.clone());
                let now = Instant::now();
                self.inline_writes.took(now, now - began);
                Some(replied)
            }
            _ => None,
        }
    }

    /// Answers `chain` on a thread of its own, which completes it; counted in `waiting` (by
    /// the caller, which keeps it under MAX_WAITING) until then.
    fn defer(&self, chain: Chain, vring: &Vring, queue: usize) -> Option<u32> {
        let job = self.completion(chain, vring, queue);
        let waiting = self.waiting.clone();
        let spawned = std::thread::Builder::new()
            .name("fs-lock-wait".into())
            .spawn(move || {
                job();
                // Counted until its chain is back with the guest: see `waiting_requests`.
                waiting.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(_) => None,
            Err(e) => {
                // The chain went with the closure; return it to the guest unanswered.
                warn!("fs: cannot start a thread for a lock wait ({e}); returning the request");
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Some(0)
            }
        }
    }

    /// A job that answers `chain`, taken from `queue`, returns it to the guest on `vring` and
    /// signals the guest when it asks to be.
    fn completion(&self, chain: Chain, vring: &Vring, queue: usize) -> crate::fs_pool::Job {
        let server = self.server.clone();
        let vring = vring.clone();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let head = chain.head_index();
        // The session the request belongs to, as it is taken off the ring: one that ends
        // before the job runs or while it waits (the guest rebooted, the frontend left) is
        // not answered.
        let session = self.server.session();
        // The queue's stops so far: one after this (past `stop_queue`'s limit) leaves the ring
        // alone. (The worker, which holds the ring's lock here, only loads the count: the gate
        // is taken before the ring's lock, never after it.)
        let stops = self.stops.clone();
        let taken_after = stops.counts[queue].load(Ordering::SeqCst);
        let stopped = move |s: &Stops| s.counts[queue].load(Ordering::SeqCst) != taken_after;
        // Counted until the job has run or is dropped unrun.
        let answering = Answering::new(&self.answering, queue);
        Box::new(move || {
            let _answering = answering;
            if stopped(&stops) {
                return;
            }
            // A chain of a session that ended stays where it is: the ring it came from may be
            // the next kernel's now.
            let Some(len) = answer(&server, &chain, session) else {
                return;
            };
            // Held while the chain goes back, so a stop waits for it or comes before it.
            let Ok(_gate) = stops.gate.read() else { return };
            if stopped(&stops) {
                debug!("fs: a request answered after its queue stopped stays off the ring");
                return;
            }
            if let Err(e) = vring.add_used(head, len) {
                warn!("fs: cannot return descriptor {head} to the guest: {e}");
            } else if !event_idx || vring.needs_notification().unwrap_or(true) {
                if let Err(e) = vring.signal_used_queue() {
                    warn!("fs: cannot signal the guest: {e}");
                }
            }
        })
    }

    /// Answers the requests on `vring`, queue `queue` of `vrings`; then, while the guest's
    /// requests come close after the replies (`fs_poll`), watches the ring for the next one
    /// instead of waiting for its kick. With a pool only a drain in which the worker answered
    /// some request itself (a read from the page cache, a small write, one the full pool
    /// left to it) opens a watch: after a request handed over it would spin for as long as
    /// the pool's thread takes, and through every request of a busy guest.
    fn process_queue(&self, vring: &Vring, queue: usize, vrings: &[Vring]) -> io::Result<()> {
        let mem = self
            .mem
            .read()
            .map_err(|_| io::Error::other("poisoned"))?
            .clone();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let poll = self.polls.get(queue).filter(|_| queue != HIPRIO_QUEUE);
        let Some(mut poll) = poll.and_then(|p| p.lock().ok()) else {
            drain_queue(vring, &mem, event_idx, |c| {
                self.handle_chain(c, vring, queue, &mut 0)
            })?;
            return Ok(());
        };
        let woke = Instant::now();
        let watched = self.drain_and_watch(vring, &mem, event_idx, queue, vrings, &mut poll, woke);
        if let Ok(false) = watched {
            return Ok(());
        }
        // Kicks back on, and a request posted before they were is taken now: after an error
        // too, or the guest would never kick again.
        drain_queue(vring, &mem, event_idx, |c| {
            self.handle_chain(c, vring, queue, &mut 0)
        })?;
        watched.map(|_| ())
    }

    /// Drains `vring` (queue `queue` of `vrings`), woken by a kick at `woke`, and while the
    /// window `poll` keeps is open after each reply, watches it and drains again. Says
    /// whether it left the guest's kicks off (the caller turns them on).
    #[allow(clippy::too_many_arguments)]
    fn drain_and_watch(
        &self,
        vring: &Vring,
        mem: &GuestMemoryAtomic,
        event_idx: bool,
        queue: usize,
        vrings: &[Vring],
        poll: &mut FsPoll,
        woke: Instant,
    ) -> io::Result<bool> {
        // Watching: the guest's kicks stay off after this drain (one that takes nothing turns
        // them on again, and ends the watch below).
        let kicks_off = poll.watching();
        let (used, largest) = self.drain(vring, mem, event_idx, queue, !kicks_off)?;
        poll.woke(woke, used);
        if used > 0 {
            poll.answered(Instant::now(), largest);
        }
        if used == 0 || !poll.watching() {
            return Ok(kicks_off);
        }
        // The other queues set up, whose requests end a watch.
        let others: Vec<&Vring> = vrings
            .iter()
            .enumerate()
            .filter(|&(i, v)| i != queue && v.get_ref().get_queue().ready())
            .map(|(_, v)| v)
            .collect();
        // Announced but nothing taken (a ring the guest broke, or a request handed to a
        // lock-wait thread) ends it too, rather than spinning on it.
        while watch(vring, mem, &others, poll) {
            let (used, largest) = self.drain(vring, mem, event_idx, queue, false)?;
            if used == 0 {
                break;
            }
            poll.answered(Instant::now(), largest);
            if !poll.watching() {
                break;
            }
        }
        Ok(true)
    }

    /// One drain of `vring` (notifications left off after it unless `notify_after`), the
    /// guest signalled if it asks to be; returns how many requests were answered, and the
    /// most bytes one of them moved.
    fn drain(
        &self,
        vring: &Vring,
        mem: &GuestMemoryAtomic,
        event_idx: bool,
        queue: usize,
        notify_after: bool,
    ) -> io::Result<(usize, usize)> {
        let mut largest = 0;
        let d = drain_queue_unsignalled(vring, mem, event_idx, notify_after, |c| {
            self.handle_chain(c, vring, queue, &mut largest)
        })?;
        if d.signal {
            vring.signal_used_queue()?;
        }
        Ok((d.used, largest))
    }
}

impl<F: FileSystem + 'static> VhostUserBackend for VhostUserFsBackend<F> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::config_bytes(&self.config, offset, size)
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        *self.mem.write().map_err(|_| io::Error::other("poisoned"))? = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.stop_queue(queue_index as usize, STOP_LIMIT);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            debug!("fs: event for unknown source {device_event}");
            return Ok(());
        };
        // An Err here would end the worker thread for good: log and carry on instead.
        if let Err(e) = self.process_queue(vring, device_event as usize, vrings) {
            warn!("fs: error while processing queue {device_event}: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_fs::abi::{
        self,
        opcode::{DESTROY, READ, SETLKW, WRITE},
    };
    use ferry_fs::FileLock;
    use std::time::{Duration, Instant};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::ByteValued;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

    /// A file system whose every DESTROY takes a while (a request slower than the guest's
    /// posting, as a read of a cold file or an fsync is), and whose locks are all taken
    /// until `free` is set.
    #[derive(Default)]
    struct Slow {
        free: Arc<AtomicBool>,
        tries: Arc<AtomicUsize>,
        /// DESTROY waits while this is set (a host file system that hangs).
        hold: Arc<AtomicBool>,
        /// READs find their data in the host's page cache; without it each takes 100 ms.
        cached: Arc<AtomicBool>,
        /// How long each WRITE takes, in ms.
        write_ms: Arc<AtomicU64>,
        /// The threads that answered READs and WRITEs, in order.
        ran_on: Arc<Mutex<Vec<String>>>,
    }

    impl Slow {
        fn ran(&self) {
            let name = std::thread::current().name().unwrap_or("").to_string();
            self.ran_on.lock().unwrap().push(name);
        }
    }

    /// Whether `name` is one of a pool's threads (`fs_pool` names them `fs-TAG-N`).
    fn on_the_pool(name: &str) -> bool {
        name.starts_with("fs-t-")
    }

    impl FileSystem for Slow {
        fn destroy(&self) {
            std::thread::sleep(Duration::from_millis(20));
            while self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn setlk(
            &self,
            _: ferry_fs::Context,
            _: u64,
            _: u64,
            _: u64,
            _: FileLock,
            _: bool,
        ) -> io::Result<()> {
            self.tries.fetch_add(1, Ordering::SeqCst);
            if self.free.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            }
        }

        fn read(
            &self,
            _: ferry_fs::Context,
            _: u64,
            _: u64,
            _: &mut dyn ferry_fs::FileWriter,
            _: u32,
            _: u64,
        ) -> io::Result<usize> {
            self.ran();
            std::thread::sleep(Duration::from_millis(100));
            Ok(0)
        }

        fn write(
            &self,
            _: ferry_fs::Context,
            _: u64,
            _: u64,
            _: &mut dyn ferry_fs::FileReader,
            size: u32,
            _: u64,
        ) -> io::Result<usize> {
            self.ran();
            let ms = self.write_ms.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(ms));
            Ok(size as usize)
        }

        fn write_is_quick(&self, _: u64) -> bool {
            true
        }

        fn read_cached(
            &self,
            _: ferry_fs::Context,
            _: u64,
            _: u64,
            _: &mut dyn ferry_fs::FileWriter,
            _: u32,
            _: u64,
        ) -> io::Result<usize> {
            if self.cached.load(Ordering::SeqCst) {
                self.ran();
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    /// A FUSE request: its header, then `body`.
    fn request(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let hdr = abi::InHeader {
            len: (std::mem::size_of::<abi::InHeader>() + body.len()) as u32,
            opcode,
            unique,
            ..Default::default()
        };
        [hdr.as_slice(), body].concat()
    }

    /// Where the reply to request `i` of [`queue_of`] goes.
    fn reply_at(i: usize) -> GuestAddress {
        GuestAddress(0x10_0000 + i as u64 * 0x200 + 0x100)
    }

    /// `requests` on a fresh request queue, each a readable descriptor and a writable one
    /// for the reply.
    fn queue_of(requests: &[Vec<u8>]) -> (GuestMemoryAtomic, Vring) {
        queue_with_bulk_request(requests, None)
    }

    /// [`queue_of`], but the request at index `bulk` carries 128 KiB after its header (as a
    /// large WRITE does), out of the way of the others.
    fn queue_with_bulk_request(
        requests: &[Vec<u8>],
        bulk: Option<usize>,
    ) -> (GuestMemoryAtomic, Vring) {
        // A ring of two descriptors per request, its size a power of two.
        let size = (2 * requests.len() as u16).next_power_of_two();
        let mem = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, size);
        let mut descs = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let at = if bulk == Some(i) {
                0x18_0000
            } else {
                0x10_0000 + i as u64 * 0x200
            };
            mem.write_slice(r, GuestAddress(at)).unwrap();
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                at,
                r.len() as u32,
                VRING_DESC_F_NEXT as u16,
                2 * i as u16 + 1,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                reply_at(i).0,
                0x100,
                VRING_DESC_F_WRITE as u16,
                0,
            )));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let vring = Vring::new(atomic.clone(), size).unwrap();
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_size(size);
        vring.set_queue_ready(true);
        (atomic, vring)
    }

    /// Drains `vring` on a thread of its own and waits (from another: a stalled worker may
    /// hold the ring's lock, and reading the used index would wait for it too) up to 10 s for
    /// `want` chains to come back; returns how many did.
    fn serve_until(dev: &Arc<VhostUserFsBackend<Slow>>, vring: &Vring, want: u16) -> u16 {
        let (d, v) = (dev.clone(), vring.clone());
        std::thread::spawn(move || d.process_queue(&v, 1, &[]));
        let (tx, rx) = std::sync::mpsc::channel();
        let v = vring.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while v.queue_used_idx().unwrap() < want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = tx.send(v.queue_used_idx().unwrap());
        });
        rx.recv_timeout(Duration::from_secs(20)).unwrap_or(0)
    }

    /// Drains `vring` once, in this thread; returns the chains used so far.
    fn serve_until_idle(dev: &Arc<VhostUserFsBackend<Slow>>, vring: &Vring) -> u16 {
        dev.process_queue(vring, 1, &[]).unwrap();
        vring.queue_used_idx().unwrap()
    }

    /// `n` slow requests (DESTROY) on the request queue of a device with a pool of one thread.
    fn slow_requests_on_a_pool_of_one(n: u16) -> (Vring, Arc<VhostUserFsBackend<Slow>>) {
        let requests: Vec<_> = (0..n)
            .map(|i| request(DESTROY, u64::from(i) + 1, &[]))
            .collect();
        let (mem, vring) = queue_of(&requests);
        let dev = VhostUserFsBackend::with_threads(Arc::new(Server::new(Slow::default())), "t", 1);
        dev.update_memory(mem).unwrap();
        (vring, dev)
    }

    #[test]
    fn more_requests_than_the_pool_holds_are_all_answered() {
        // A pool of one thread takes one request and holds four more; the worker answers the
        // rest itself. It waited for room before, holding the ring, whose lock the thread
        // takes to return its chains.
        const REQUESTS: u16 = 16;
        let (vring, dev) = slow_requests_on_a_pool_of_one(REQUESTS);
        assert_eq!(
            serve_until(&dev, &vring, REQUESTS),
            REQUESTS,
            "every request answered (the queue's worker held the ring while it waited for the \
             pool, whose threads wait for the ring to return their chains)"
        );
    }

    /// A SETLKW body: a write lock on the whole file.
    fn write_lock() -> Vec<u8> {
        let lk = abi::LkIn {
            lk: FileLock {
                start: 0,
                end: u64::MAX,
                type_: libc::F_WRLCK as u32,
                pid: 0,
            },
            ..Default::default()
        };
        lk.as_slice().to_vec()
    }

    #[test]
    fn the_end_of_a_session_can_wait_for_the_pool_to_be_done() {
        const REQUESTS: u16 = 4;
        let (vring, dev) = slow_requests_on_a_pool_of_one(REQUESTS);
        // Handed to the pool: 20 ms each, one after another.
        serve_until_idle(&dev, &vring);
        assert!(dev.wait_until_answered(Duration::from_secs(10)));
        assert_eq!(vring.queue_used_idx().unwrap(), REQUESTS);
    }

    #[test]
    fn requests_of_an_ended_session_left_on_the_pool_are_not_answered() {
        // Four slow requests on a pool of one; the session ends (the guest rebooted) while
        // the thread answers the first: the three still queued belong to a kernel that is
        // gone, and their buffers and ring to the next one.
        const REQUESTS: u16 = 4;
        let (vring, dev) = slow_requests_on_a_pool_of_one(REQUESTS);
        serve_until_idle(&dev, &vring);
        dev.server().cancel_waits();
        assert!(dev.wait_until_answered(Duration::from_secs(10)));
        assert!(
            vring.queue_used_idx().unwrap() <= 1,
            "at most the one begun"
        );
        let m = dev.mem.read().unwrap().memory();
        for i in 1..usize::from(REQUESTS) {
            let reply: [u8; 16] = m.read_obj(reply_at(i)).unwrap();
            assert_eq!(reply, [0u8; 16], "nothing written for request {i}");
        }
    }

    #[test]
    fn a_lock_wait_past_the_limit_is_refused_rather_than_stalling_the_queue() {
        // MAX_WAITING lock waits on threads of their own, one more, then a request behind it.
        let lk = write_lock();
        let mut requests: Vec<_> = (0..=MAX_WAITING as u64)
            .map(|i| request(SETLKW, i + 1, &lk))
            .collect();
        requests.push(request(DESTROY, 1000, &[]));
        let (mem, vring) = queue_of(&requests);
        let fs = Slow::default();
        let free = fs.free.clone();
        let dev = VhostUserFsBackend::new(Arc::new(Server::new(fs)), "t");
        dev.update_memory(mem.clone()).unwrap();
        let answered = serve_until(&dev, &vring, 2);
        free.store(true, Ordering::SeqCst);
        assert_eq!(answered, 2, "the queue went on past the waits");
        // The one past the limit got ENOLCK.
        let out: abi::OutHeader = mem.memory().read_obj(reply_at(MAX_WAITING)).unwrap();
        let error = out.error;
        assert_eq!(error, -libc::ENOLCK);
        assert_eq!(
            serve_until(&dev, &vring, requests.len() as u16),
            requests.len() as u16
        );
    }

    #[test]
    fn a_lock_wait_whose_session_ended_leaves_its_chain_alone() {
        // The guest rebooted while a request waited for a lock: its buffers and the ring are
        // the next kernel's now, so neither a reply nor a used entry may reach them, even once
        // the lock is free.
        let (mem, vring) = queue_of(&[request(SETLKW, 1, &write_lock())]);
        let fs = Slow::default();
        let (free, tries) = (fs.free.clone(), fs.tries.clone());
        let dev = VhostUserFsBackend::new(Arc::new(Server::new(fs)), "t");
        dev.update_memory(mem.clone()).unwrap();
        assert_eq!(
            serve_until_idle(&dev, &vring),
            0,
            "the lock is taken: it waits"
        );
        assert_eq!(dev.waiting_requests(), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tries.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // What a new session's INIT, or the frontend leaving, does.
        dev.server().cancel_waits();
        free.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while dev.waiting_requests() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(dev.waiting_requests(), 0, "the wait ended");
        assert_eq!(vring.queue_used_idx().unwrap(), 0, "no used entry");
        let reply: [u8; 16] = mem.memory().read_obj(reply_at(0)).unwrap();
        assert_eq!(
            reply, [0u8; 16],
            "nothing written into the request's buffers"
        );
    }

    #[test]
    fn a_stopped_queue_has_the_requests_the_pool_took_answered_first() {
        // GET_VRING_BASE: after its reply the ring is the frontend's, so what the pool took
        // from it is answered before (four slow requests on a pool of one).
        const REQUESTS: u16 = 4;
        let (vring, dev) = slow_requests_on_a_pool_of_one(REQUESTS);
        serve_until_idle(&dev, &vring);
        vring.set_queue_ready(false);
        dev.stop_vring(1).unwrap();
        assert_eq!(
            vring.queue_used_idx().unwrap(),
            REQUESTS,
            "every request taken is back in the ring when the stop returns"
        );
    }

    #[test]
    fn a_stopped_queue_has_its_lock_waits_refused_first() {
        // A lock that stays taken: the stop cannot wait for it, nor leave the wait to answer
        // later, into a ring that is no longer the device's.
        let (mem, vring) = queue_of(&[request(SETLKW, 1, &write_lock())]);
        let dev = VhostUserFsBackend::new(Arc::new(Server::new(Slow::default())), "t");
        dev.update_memory(mem.clone()).unwrap();
        assert_eq!(
            serve_until_idle(&dev, &vring),
            0,
            "the lock is taken: it waits"
        );
        vring.set_queue_ready(false);
        let began = Instant::now();
        dev.stop_vring(1).unwrap();
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "the stop did not wait for the lock"
        );
        assert_eq!(vring.queue_used_idx().unwrap(), 1, "the wait was answered");
        let out: abi::OutHeader = mem.memory().read_obj(reply_at(0)).unwrap();
        let error = out.error;
        assert_eq!(error, -libc::ENOLCK);
        // The wait's thread counts itself out just after it returned the chain.
        let deadline = Instant::now() + Duration::from_secs(10);
        while dev.waiting_requests() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(dev.waiting_requests(), 0);
    }

    #[test]
    fn a_request_that_outlives_its_queue_stop_leaves_the_ring_alone() {
        // A request still running past the stop's limit (a hung host file system): when it
        // ends, the ring may be the next kernel's.
        let (mem, vring) = queue_of(&[request(DESTROY, 1, &[])]);
        let fs = Slow::default();
        let hold = fs.hold.clone();
        hold.store(true, Ordering::SeqCst);
        let dev = VhostUserFsBackend::with_threads(Arc::new(Server::new(fs)), "t", 1);
        dev.update_memory(mem).unwrap();
        serve_until_idle(&dev, &vring);
        vring.set_queue_ready(false);
        dev.stop_queue(1, Duration::ZERO);
        hold.store(false, Ordering::SeqCst);
        assert!(dev.wait_until_answered(Duration::from_secs(10)));
        assert_eq!(
            vring.queue_used_idx().unwrap(),
            0,
            "no used entry after the stop"
        );
    }

    /// Sets the avail index of `vring` in `mem`: the guest posting its first `n` requests.
    fn post(mem: &GuestMemoryAtomic, vring: &Vring, n: u16) {
        let idx = GuestAddress(vring.get_ref().get_queue().avail_ring() + 2);
        mem.memory().write_obj(n, idx).unwrap();
    }

    /// Requests on one request queue, in rounds of the watch's tests.
    const ROUNDS: u16 = 16;

    /// A device with a 500 ms maximum watch whose first `ROUNDS - 1` requests (of an opcode
    /// the server does not know, answered at once with ENOSYS) came 20 ms after each reply,
    /// each woken by its kick: the window has doubled from 4 µs to 32 ms (and goes to 65 ms
    /// as the next kick wakes the worker). The request at index `bulk` carries 128 KiB, as a
    /// 128 KiB WRITE does.
    fn watched_queue(
        bulk: Option<usize>,
    ) -> (GuestMemoryAtomic, Vring, Arc<VhostUserFsBackend<Slow>>) {
        let requests: Vec<_> = (0..=ROUNDS)
            .map(|i| {
                let body = if bulk == Some(usize::from(i)) {
                    vec![0; 128 << 10]
                } else {
                    vec![]
                };
                request(9999, u64::from(i) + 1, &body)
            })
            .collect();
        let dev = VhostUserFsBackend::new(Arc::new(Server::new(Slow::default())), "t");
        watched(dev, &requests, bulk)
    }

    /// [`watched_queue`] for a device with a pool of one thread, whose requests are READs,
    /// all found in the page cache until the caller clears `cached`.
    fn watched_queue_with_a_pool() -> (
        GuestMemoryAtomic,
        Vring,
        Arc<VhostUserFsBackend<Slow>>,
        Arc<AtomicBool>,
    ) {
        let read = abi::ReadIn {
            size: 16,
            ..Default::default()
        };
        let requests: Vec<_> = (0..=ROUNDS)
            .map(|i| request(READ, u64::from(i) + 1, read.as_slice()))
            .collect();
        let fs = Slow::default();
        let cached = fs.cached.clone();
        cached.store(true, Ordering::SeqCst);
        let dev = VhostUserFsBackend::with_threads(Arc::new(Server::new(fs)), "t", 1);
        let (mem, vring, dev) = watched(dev, &requests, None);
        (mem, vring, dev, cached)
    }

    fn watched(
        dev: Arc<VhostUserFsBackend<Slow>>,
        requests: &[Vec<u8>],
        bulk: Option<usize>,
    ) -> (GuestMemoryAtomic, Vring, Arc<VhostUserFsBackend<Slow>>) {
        let (mem, vring) = queue_with_bulk_request(requests, bulk);
        dev.update_memory(mem.clone()).unwrap();
        dev.set_poll_window(Duration::from_millis(500));
        for n in 1..ROUNDS {
            post(&mem, &vring, n);
            dev.process_queue(&vring, 1, &[]).unwrap();
            assert_eq!(vring.queue_used_idx().unwrap(), n);
            std::thread::sleep(Duration::from_millis(20));
        }
        (mem, vring, dev)
    }

    /// Posts request `ROUNDS` (kicked) and, `after` later, the last one (not kicked), while
    /// the worker answers the first; returns how long the worker took.
    fn post_two(
        mem: &GuestMemoryAtomic,
        vring: &Vring,
        dev: &VhostUserFsBackend<Slow>,
        after: Duration,
    ) -> Duration {
        post(mem, vring, ROUNDS);
        let (m, v) = (mem.clone(), vring.clone());
        let guest = std::thread::spawn(move || {
            std::thread::sleep(after);
            post(&m, &v, ROUNDS + 1);
        });
        let began = Instant::now();
        dev.process_queue(vring, 1, &[]).unwrap();
        let took = began.elapsed();
        guest.join().unwrap();
        took
    }

    #[test]
    fn a_request_close_after_a_reply_is_taken_without_a_kick() {
        let (mem, vring, dev) = watched_queue(None);
        // The last comes 5 ms after a reply: the worker, watching, takes it in the same
        // call, with no kick.
        post_two(&mem, &vring, &dev, Duration::from_millis(5));
        assert_eq!(vring.queue_used_idx().unwrap(), ROUNDS + 1);
    }

    #[test]
    fn no_request_is_watched_for_after_a_bulk_one() {
        // As above, but after a request that brought 128 KiB the worker waits for the kick,
        // however wide its window.
        let (mem, vring, dev) = watched_queue(Some(usize::from(ROUNDS) - 1));
        let took = post_two(&mem, &vring, &dev, Duration::from_millis(50));
        assert!(took < Duration::from_millis(50), "no watch");
        assert_eq!(vring.queue_used_idx().unwrap(), ROUNDS, "the last waits");
        // Its kick: taken.
        dev.process_queue(&vring, 1, &[]).unwrap();
        assert_eq!(vring.queue_used_idx().unwrap(), ROUNDS + 1);
    }

    #[test]
    fn with_a_pool_a_read_from_the_page_cache_is_answered_by_the_worker() {
        // Two READs on a device with a pool of one thread: cached, the worker answers them
        // (here, on the test's thread); not, it hands them to the pool's thread.
        let read = abi::ReadIn {
            size: 16,
            ..Default::default()
        };
        for cached in [true, false] {
            let requests: Vec<_> = (0..2)
                .map(|i| request(READ, i + 1, read.as_slice()))
                .collect();
            let (mem, vring) = queue_of(&requests);
            let fs = Slow::default();
            fs.cached.store(cached, Ordering::SeqCst);
            let ran_on = fs.ran_on.clone();
            let dev = VhostUserFsBackend::with_threads(Arc::new(Server::new(fs)), "t", 1);
            dev.update_memory(mem).unwrap();
            serve_until_idle(&dev, &vring);
            assert_eq!(serve_until(&dev, &vring, 2), 2, "cached: {cached}");
            let ran_on = ran_on.lock().unwrap();
            assert_eq!(ran_on.len(), 2);
            assert!(
                ran_on.iter().all(|t| on_the_pool(t) != cached),
                "{ran_on:?}"
            );
        }
    }

    #[test]
    fn with_a_pool_small_writes_are_answered_by_the_worker_until_one_is_slow() {
        // Three WRITEs on a device with a pool of one thread, posted one at a time: the
        // first, quick, the worker answers (on the test's thread); so it does the second,
        // which takes 100 ms; the third it hands to the pool, for writes are paused.
        let write = abi::WriteIn {
            size: 16,
            ..Default::default()
        };
        let body = [write.as_slice(), &[7u8; 16]].concat();
        let requests: Vec<_> = (0..3).map(|i| request(WRITE, i + 1, &body)).collect();
        let (mem, vring) = queue_of(&requests);
        let fs = Slow::default();
        let (write_ms, ran_on) = (fs.write_ms.clone(), fs.ran_on.clone());
        let dev = VhostUserFsBackend::with_threads(Arc::new(Server::new(fs)), "t", 1);
        dev.update_memory(mem.clone()).unwrap();
        for n in 1..=3 {
            post(&mem, &vring, n);
            serve_until_idle(&dev, &vring);
            assert_eq!(serve_until(&dev, &vring, n), n);
            write_ms.store(100, Ordering::SeqCst);
        }
        let pooled: Vec<_> = ran_on
            .lock()
            .unwrap()
            .iter()
            .map(|t| on_the_pool(t))
            .collect();
        assert_eq!(pooled, [false, false, true]);
    }

    #[test]
    fn with_a_pool_the_worker_watches_after_a_read_it_answered() {
        let (mem, vring, dev, _) = watched_queue_with_a_pool();
        post_two(&mem, &vring, &dev, Duration::from_millis(5));
        assert_eq!(vring.queue_used_idx().unwrap(), ROUNDS + 1);
    }

    #[test]
    fn with_a_pool_no_request_is_watched_for_after_a_hand_over() {
        // As above, but the first of the two is not in the cache: handed to the pool, it
        // opens no watch (the worker would spin through the pool's every request).
        let (mem, vring, dev, cached) = watched_queue_with_a_pool();
        cached.store(false, Ordering::SeqCst);
        let took = post_two(&mem, &vring, &dev, Duration::from_millis(50));
        assert!(took < Duration::from_millis(50), "no watch");
        assert_eq!(
            vring.get_ref().get_queue().next_avail(),
            ROUNDS,
            "the last waits"
        );
        assert_eq!(serve_until(&dev, &vring, ROUNDS + 1), ROUNDS + 1);
    }

    #[test]
    fn with_a_zero_window_the_worker_waits_for_the_kick() {
        let requests: Vec<_> = (0..2).map(|i| request(9999, i + 1, &[])).collect();
        let (mem, vring) = queue_of(&requests);
        let dev = VhostUserFsBackend::new(Arc::new(Server::new(Slow::default())), "t");
        dev.update_memory(mem.clone()).unwrap();
        dev.set_poll_window(Duration::ZERO);
        post(&mem, &vring, 1);
        dev.process_queue(&vring, 1, &[]).unwrap();
        post(&mem, &vring, 2);
        let began = Instant::now();
        dev.process_queue(&vring, 1, &[]).unwrap();
        assert!(began.elapsed() < Duration::from_millis(100), "no watch");
        assert_eq!(vring.queue_used_idx().unwrap(), 2);
    }

    #[test]
    fn the_stops_of_one_frontend_stop_give_up_on_hung_requests_once() {
        // Two request queues, each with a request that hangs (a host file system that does
        // not answer): the second queue's stop does not wait the limit again.
        let (mem, vring) = queue_of(&[request(DESTROY, 1, &[]), request(DESTROY, 2, &[])]);
        let fs = Slow::default();
        let hold = fs.hold.clone();
        hold.store(true, Ordering::SeqCst);
        let dev = VhostUserFsBackend::with_threads(Arc::new(Server::new(fs)), "t", 2);
        dev.update_memory(mem).unwrap();
        serve_until_idle(&dev, &vring);
        let began = Instant::now();
        dev.stop_queue(1, Duration::from_millis(300));
        assert!(
            began.elapsed() >= Duration::from_millis(300),
            "the first stop waited"
        );
        // The same requests stand for another queue's: its stop gives up at once.
        let began = Instant::now();
        dev.answering[2].fetch_add(1, Ordering::SeqCst);
        dev.stop_queue(2, Duration::from_millis(300));
        assert!(
            began.elapsed() < Duration::from_millis(200),
            "the second did not wait"
        );
        dev.answering[2].fetch_sub(1, Ordering::SeqCst);
        hold.store(false, Ordering::SeqCst);
        assert!(dev.wait_until_answered(Duration::from_secs(10)));
    }
}
