//! Ferry's audit log and event stream: what happened, one JSON object per line, for the
//! people whose firewall or EDR sees one process for a whole VM.
//!
//! Theory of operation. The devices call [`Audit::emit`] with an event name and its fields;
//! the line (with `ts`, the Unix time in seconds, and `event`; keys in name order) is pushed onto a bounded
//! queue under a mutex held for a push, and a condition variable wakes the `audit` thread
//! (for the first line of a batch only: the thread lets a batch gather for 5 ms, so a busy
//! guest costs a wake-up and a write per batch, not per event).
//! That thread alone does I/O: it appends each line to the sink (`--audit-log FILE`, `-` for
//! stderr, or `unix:PATH` for a collector's datagram socket, one line per datagram) and hands
//! it to every subscriber (`GET /events`), each of which has a bounded queue of its own. When
//! the queue is full (the sink stalls), or a subscriber's is, the event is dropped there and
//! counted ([`Audit::stats`]); nothing that emits ever waits on I/O. The schema is in
//! docs/audit.md; fields are only ever added to it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use serde_json::{json, Map, Value};

/// Events waiting for the sink at most, unless told otherwise (`--audit-queue`); past it,
/// new ones are dropped and counted.
pub const QUEUE_EVENTS: usize = 8192;
/// The smallest and largest queue `--audit-queue` may ask for.
pub const QUEUE_RANGE: std::ops::RangeInclusive<usize> = 16..=1 << 20;
/// Events waiting for one subscriber at most.
pub const SUBSCRIBER_EVENTS: usize = 4096;
/// Subscribers at once at most.
pub const MAX_SUBSCRIBERS: usize = 16;
/// How long the writer lets events gather after the first of a batch before it writes
/// them: one wake-up and one write per batch instead of per event, at a cost in latency
/// far below what a follower notices.
const LINGER: Duration = Duration::from_millis(5);

/// Where the audit log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    /// Appended to a file (created 0600).
    File(PathBuf),
    /// Standard error.
    Stderr,
    /// Datagrams to a collector's UNIX datagram socket, one line each.
    Datagram(PathBuf),
    /// Nowhere: only subscribers see events.
    None,
}

impl std::str::FromStr for Sink {
    type Err = String;

    /// `-` is stderr, `unix:PATH` a datagram socket, anything else a file.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err(
                "--audit-log: give FILE, - (stderr) or unix:PATH (a datagram socket)".into(),
            );
        }
        Ok(match s {
            "-" => Sink::Stderr,
            _ => match s.strip_prefix("unix:") {
                Some(p) => Sink::Datagram(PathBuf::from(p)),
                None => Sink::File(PathBuf::from(s)),
            },
        })
    }
}

impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::File(p) => write!(f, "{}", p.display()),
            Sink::Stderr => f.write_str("-"),
            Sink::Datagram(p) => write!(f, "unix:{}", p.display()),
            Sink::None => f.write_str("none"),
        }
    }
}

/// Counters of the audit log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Events emitted.
    pub events: u64,
    /// Events written to the sink.
    pub written: u64,
    /// Events the sink lost: the queue was full, or a write failed.
    pub dropped: u64,
    /// Events subscribers lost (their queues were full).
    pub dropped_subscribers: u64,
    /// Subscribers now.
    pub subscribers: u64,
}

struct Shared {
    /// Events waiting for the sink at most.
    capacity: usize,
    /// Whether there is a sink (else events matter only while someone follows them).
    sink: bool,
    /// Followers now (read without the lock by [`Audit::wanted`]).
    followers: std::sync::atomic::AtomicUsize,
    queue: Mutex<State>,
    wake: Condvar,
    events: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    dropped_subscribers: AtomicU64,
}

struct State {
    lines: VecDeque<String>,
    subscribers: Vec<Arc<SubscriberQueue>>,
    stop: bool,
}

/// One subscriber's queue.
struct SubscriberQueue {
    lines: Mutex<(VecDeque<String>, bool)>,
    wake: Condvar,
}

/// A live follower of the events (`GET /events`): [`next`](Self::next) gives each line,
/// [`take_all`](Self::take_all) all that wait.
pub struct Subscription {
    queue: Arc<SubscriberQueue>,
    audit: Audit,
}

impl Subscription {
    /// The queue, once it holds a line or `timeout` passed or the audit log stopped.
    fn wait(&self, timeout: Duration) -> MutexGuard<'_, (VecDeque<String>, bool)> {
        let q = lock(&self.queue.lines);
        if !q.0.is_empty() || q.1 {
            return q;
        }
        self.queue
            .wake
            .wait_timeout(q, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// The next event line (no newline), waiting up to `timeout`; `None` when none came or
    /// the audit log stopped.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.wait(timeout).0.pop_front()
    }

    /// Every event line waiting (at least one, waiting up to `timeout` for it), each with
    /// its newline, appended to `out`: a follower writes them with one system call. How
    /// many; 0 when none came or the audit log stopped.
    pub fn take_all(&self, timeout: Duration, out: &mut Vec<u8>) -> usize {
        let mut q = self.wait(timeout);
        let n = q.0.len();
        for l in q.0.drain(..) {
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        n
    }

    /// Whether the audit log stopped (no more events will come).
    pub fn closed(&self) -> bool {
        let q = lock(&self.queue.lines);
        q.1 && q.0.is_empty()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut s = lock(&self.audit.shared.queue);
        s.subscribers.retain(|q| !Arc::ptr_eq(q, &self.queue));
        self.audit
            .shared
            .followers
            .store(s.subscribers.len(), Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere leaves nothing half-done here: queues are consistent between calls.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The audit log: cheap to clone, shared by every device.
#[derive(Clone)]
pub struct Audit {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("stats", &self.stats())
            .finish()
    }
}

/// The Unix time now, in seconds with milliseconds.
fn now() -> f64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_millis() as f64) / 1000.0
}

/// A sink opened and not yet written to: ferry opens it before its sandbox closes the file
/// system, and starts the writer thread inside the sandbox.
pub struct Opened(Output);

impl Opened {
    /// Starts the audit log's thread, with room for `queue` events waiting for the sink
    /// (clamped to [`QUEUE_RANGE`]).
    pub fn start(self, queue: usize) -> Result<Audit, String> {
        let mut out = self.0;
        let shared = Arc::new(Shared {
            capacity: queue.clamp(*QUEUE_RANGE.start(), *QUEUE_RANGE.end()),
            sink: !matches!(out, Output::None),
            followers: std::sync::atomic::AtomicUsize::new(0),
            queue: Mutex::new(State {
                lines: VecDeque::new(),
                subscribers: Vec::new(),
                stop: false,
            }),
            wake: Condvar::new(),
            events: AtomicU64::new(0),
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dropped_subscribers: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || run(&s, &mut out))
            .map_err(|e| format!("cannot start the audit thread: {e}"))?;
        Ok(Audit { shared })
    }
}

impl Audit {
    /// Opens `sink` (a file that cannot be opened is an error that says why); see [`Opened`].
    pub fn open(sink: &Sink) -> Result<Opened, String> {
        Output::open(sink).map(Opened)
    }

    /// Opens `sink` and starts writing to it, with the default queue.
    pub fn start(sink: Sink) -> Result<Audit, String> {
        Self::open(&sink)?.start(QUEUE_EVENTS)
    }

    /// Whether an event would go anywhere: a sink, or someone following. Callers whose
    /// fields cost something to gather ask first.
    pub fn wanted(&self) -> bool {
        self.shared.sink || self.shared.followers.load(Ordering::Relaxed) > 0
    }

    /// Records `event` with `fields` (an object; other values are ignored). Never waits.
    pub fn emit(&self, event: &str, fields: Value) {
        if !self.wanted() {
            return;
        }
        let mut obj = Map::new();
        obj.insert("ts".into(), json!(now()));
        obj.insert("event".into(), json!(event));
        if let Value::Object(f) = fields {
            obj.extend(f);
        }
        let line = Value::Object(obj).to_string();
        self.shared.events.fetch_add(1, Ordering::Relaxed);
        let mut s = lock(&self.shared.queue);
        if s.lines.len() >= self.shared.capacity {
            drop(s);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // The writer takes the whole queue when it wakes: only the first line of a batch
        // needs to wake it (a wake is a system call), and the line that half fills the
        // queue ends the writer's linger early.
        s.lines.push_back(line);
        let n = s.lines.len();
        drop(s);
        if n == 1 || n == self.shared.capacity / 2 {
            self.shared.wake.notify_one();
        }
    }

    /// A new follower of the events from now on, or `None` past [`MAX_SUBSCRIBERS`].
    pub fn subscribe(&self) -> Option<Subscription> {
        let queue = Arc::new(SubscriberQueue {
            lines: Mutex::new((VecDeque::new(), false)),
            wake: Condvar::new(),
        });
        let mut s = lock(&self.shared.queue);
        if s.subscribers.len() >= MAX_SUBSCRIBERS {
            return None;
        }
        s.subscribers.push(queue.clone());
        self.shared
            .followers
            .store(s.subscribers.len(), Ordering::Relaxed);
        Some(Subscription {
            queue,
            audit: self.clone(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> AuditStats {
        let subscribers = lock(&self.shared.queue).subscribers.len() as u64;
        AuditStats {
            events: self.shared.events.load(Ordering::Relaxed),
            written: self.shared.written.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            dropped_subscribers: self.shared.dropped_subscribers.load(Ordering::Relaxed),
            subscribers,
        }
    }

    /// Writes what is queued and stops the thread (ferry is exiting); subscribers see the
    /// end.
    pub fn stop(&self) {
        lock(&self.shared.queue).stop = true;
        self.shared.wake.notify_all();
    }
}

/// The sink, opened.
enum Output {
    File(File),
    Stderr,
    Datagram(UnixDatagram, PathBuf),
    None,
}

impl Output {
    fn open(sink: &Sink) -> Result<Output, String> {
        Ok(match sink {
            Sink::File(p) => Output::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(p)
                    .map_err(|e| {
                        format!(
                            "--audit-log {}: cannot open it ({e}); check that its folder exists and ferry may write there",
                            p.display()
                        )
                    })?,
            ),
            Sink::Stderr => Output::Stderr,
            Sink::Datagram(p) => {
                let s = UnixDatagram::unbound()
                    .map_err(|e| format!("--audit-log unix:{}: cannot make a socket ({e})", p.display()))?;
                // Sends never wait: a collector that stops reading loses events, not traffic.
                s.set_nonblocking(true)
                    .map_err(|e| format!("--audit-log unix:{}: {e}", p.display()))?;
                Output::Datagram(s, p.clone())
            }
            Sink::None => Output::None,
        })
    }

    /// Writes `lines`, a batch: one write for a file or stderr, a datagram each for a
    /// collector. Returns how many were lost.
    fn write(&mut self, lines: &[String], buf: &mut Vec<u8>) -> u64 {
        let mut whole = |w: &mut dyn Write| {
            buf.clear();
            for l in lines {
                buf.extend_from_slice(l.as_bytes());
                buf.push(b'\n');
            }
            if w.write_all(buf).is_ok() {
                0
            } else {
                lines.len() as u64
            }
        };
        match self {
            Output::File(f) => whole(f),
            Output::Stderr => whole(&mut std::io::stderr().lock()),
            Output::Datagram(s, p) => lines
                .iter()
                .filter(|l| s.send_to(l.as_bytes(), &*p).is_err())
                .count() as u64,
            Output::None => 0,
        }
    }
}

fn run(shared: &Shared, out: &mut Output) {
    let mut batch: Vec<String> = Vec::new();
    let mut buf = Vec::new();
    loop {
        let (subscribers, stop) = {
            let mut s = lock(&shared.queue);
            while s.lines.is_empty() && !s.stop {
                s = shared.wake.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            // Let the batch gather (see LINGER), unless the queue is half full.
            let until = std::time::Instant::now() + LINGER;
            while !s.stop && s.lines.len() < shared.capacity / 2 {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                s = shared
                    .wake
                    .wait_timeout(s, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            batch.extend(s.lines.drain(..));
            (s.subscribers.clone(), s.stop)
        };
        if !batch.is_empty() && !matches!(out, Output::None) {
            let lost = out.write(&batch, &mut buf);
            shared.dropped.fetch_add(lost, Ordering::Relaxed);
            shared
                .written
                .fetch_add(batch.len() as u64 - lost, Ordering::Relaxed);
        }
        for sub in &subscribers {
            let mut q = lock(&sub.lines);
            let room = SUBSCRIBER_EVENTS.saturating_sub(q.0.len());
            let lost = batch.len().saturating_sub(room);
            q.0.extend(batch.iter().take(room).cloned());
            drop(q);
            shared
                .dropped_subscribers
                .fetch_add(lost as u64, Ordering::Relaxed);
            sub.wake.notify_one();
        }
        batch.clear();
        if stop {
            for sub in &subscribers {
                lock(&sub.lines).1 = true;
                sub.wake.notify_all();
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_file_and_subscribers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let a = Audit::start(Sink::File(path.clone())).unwrap();
        let sub = a.subscribe().unwrap();
        a.emit(
            "flow_open",
            json!({"proto": "tcp", "remote": "10.0.0.1:80"}),
        );
        a.emit("flow_close", json!({"proto": "tcp", "reason": "closed"}));
        let first: Value =
            serde_json::from_str(&sub.next(Duration::from_secs(5)).unwrap()).unwrap();
        assert_eq!(first["event"], "flow_open");
        assert_eq!(first["remote"], "10.0.0.1:80");
        assert!(first["ts"].as_f64().unwrap() > 1.7e9);
        let second: Value =
            serde_json::from_str(&sub.next(Duration::from_secs(5)).unwrap()).unwrap();
        assert_eq!(second["event"], "flow_close");
        a.stop();
        std::thread::sleep(Duration::from_millis(100));
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events.len(), 2);
        assert_eq!(a.stats().written, 2);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(sub);
        assert_eq!(a.stats().subscribers, 0);
    }

    #[test]
    fn a_collector_that_stops_reading_loses_events_not_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("collector.sock");
        // Bound, never read: its receive queue fills up.
        let _collector = UnixDatagram::bind(&path).unwrap();
        let a = Audit::start(Sink::Datagram(path)).unwrap();
        let t = std::time::Instant::now();
        for i in 0..50_000 {
            a.emit("flow_open", json!({"n": i}));
        }
        assert!(t.elapsed() < Duration::from_secs(2), "emitting never waits");
        std::thread::sleep(Duration::from_millis(300));
        let s = a.stats();
        assert_eq!(s.events, 50_000);
        assert!(s.dropped > 0, "{s:?}");
        assert_eq!(s.written + s.dropped, 50_000, "{s:?}");
    }

    #[test]
    fn a_sink_that_blocks_for_5_s_loses_events_and_nobody_waits() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stalled");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A reader that opens the FIFO and then reads nothing for 5 s: the writer blocks once
        // the pipe's buffer is full.
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || {
            let mut f = std::fs::File::open(&reader_path).unwrap();
            std::thread::sleep(Duration::from_secs(5));
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut f, &mut sink);
            sink.iter().filter(|b| **b == b'\n').count()
        });
        let a = Audit::start(Sink::File(fifo)).unwrap();
        let line = "x".repeat(200);
        let t = std::time::Instant::now();
        let mut slowest = Duration::ZERO;
        for i in 0..40_000 {
            let t0 = std::time::Instant::now();
            a.emit("flow_open", json!({"n": i, "pad": line}));
            slowest = slowest.max(t0.elapsed());
        }
        let emitting = t.elapsed();
        assert!(
            emitting < Duration::from_secs(2),
            "emitting took {emitting:?}"
        );
        assert!(
            slowest < Duration::from_millis(50),
            "one emit took {slowest:?}"
        );
        let s = a.stats();
        assert!(s.dropped > 0, "a stalled sink loses events: {s:?}");
        a.stop();
        let read = reader.join().unwrap() as u64;
        let s = a.stats();
        assert_eq!(s.written, read, "{s:?}");
        assert_eq!(s.written + s.dropped, 40_000, "{s:?}");
    }

    #[test]
    fn sinks_parse_and_a_bad_file_says_why() {
        assert_eq!("-".parse::<Sink>().unwrap(), Sink::Stderr);
        assert_eq!(
            "unix:/run/c.sock".parse::<Sink>().unwrap(),
            Sink::Datagram("/run/c.sock".into())
        );
        assert_eq!(
            "/var/log/ferry.jsonl".parse::<Sink>().unwrap(),
            Sink::File("/var/log/ferry.jsonl".into())
        );
        let e = Audit::start(Sink::File("/nonexistent/dir/a.log".into())).unwrap_err();
        assert!(e.contains("cannot open it"), "{e}");
    }
}
