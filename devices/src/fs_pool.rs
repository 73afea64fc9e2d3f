//! A bounded pool of threads that answer a virtio-fs device's requests off the queue's thread
//! (a share's `threads=N`, virtiofsd's `--thread-pool-size`).
//!
//! Theory of operation. Without a pool the queue's worker answers each request before it
//! takes the next, so one slow request (an fsync, a read of a cold file) holds up every other
//! the guest has queued, on every file. With one, the worker only takes requests off the ring
//! and hands each to the pool; a pool thread answers it, puts the chain on the used ring and
//! signals the guest, in whatever order requests finish (FUSE requests are independent: the
//! kernel waits for a reply before it sends one that depends on it).
//!
//! At most `threads` x [`BACKLOG_PER_THREAD`] requests wait for a thread, so a guest cannot
//! queue unbounded work in ferry's memory. The worker reserves a place before it hands a
//! request over ([`RequestPool::reserve`]); when there is none it answers the request itself.
//! It never waits for the pool: it drains the ring holding the ring's lock, which a pool
//! thread takes to return its chain, so a worker waiting for a thread that waits for the
//! lock would stall the share for good. The threads start on first use, from the queue's
//! worker, so they inherit its sandbox (seccomp filter and Landlock domain). Which requests
//! go to the pool is the device's policy (`vhu_fs`); this is the mechanism.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use log::warn;

/// One request to answer.
pub type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting per thread before the queue's worker answers requests itself.
pub const BACKLOG_PER_THREAD: usize = 4;

/// A pool of `threads` threads, started on first use.
pub struct RequestPool {
    name: String,
    threads: usize,
    tx: OnceLock<Sender<Job>>,
    /// Places reserved and not yet taken by a thread: at most `threads` x BACKLOG_PER_THREAD.
    queued: Arc<AtomicUsize>,
}

/// A place in the pool's queue, from [`RequestPool::reserve`], for one [`RequestPool::submit`].
pub struct Place(());

impl RequestPool {
    /// A pool of `threads` threads (at least one) named after `name`.
    pub fn new(name: &str, threads: usize) -> Self {
        RequestPool {
            name: name.to_string(),
            threads: threads.max(1),
            tx: OnceLock::new(),
            queued: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many threads it has (or will have).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// A place for one job, if the queue has room and a thread is running; `None` tells the
    /// caller to answer the request itself.
    pub fn reserve(&self) -> Option<Place> {
        self.sender()?;
        let most = self.threads * BACKLOG_PER_THREAD;
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < most).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(()))
    }

    /// Runs `job` on a pool thread, in the place reserved for it; never waits.
    pub fn submit(&self, _place: Place, job: Job) {
        // A place exists only once a sender does; a send fails only when every thread has
        // ended, which they do when the pool is dropped.
        if let Some(tx) = self.tx.get() {
            if tx.send(job).is_ok() {
                return;
            }
        }
        self.queued.fetch_sub(1, Ordering::SeqCst);
        warn!(
            "{}: no request thread is left; a request goes unanswered",
            self.name
        );
    }

    fn sender(&self) -> Option<&Sender<Job>> {
        if let Some(tx) = self.tx.get() {
            return Some(tx);
        }
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..self.threads {
            let (rx, queued) = (rx.clone(), self.queued.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{i}", self.name))
                .spawn(move || work(&rx, &queued));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => warn!("{}: cannot start a request thread: {e}", self.name),
            }
        }
        if started == 0 {
            return None;
        }
        // Another caller may have raced this one; its pool wins and this one's threads end
        // when their channel's sender is dropped here.
        let _ = self.tx.set(tx);
        self.tx.get()
    }
}

/// A pool thread: runs jobs until the pool is gone.
fn work(rx: &Mutex<Receiver<Job>>, queued: &AtomicUsize) {
    loop {
        // The lock is held only while waiting for the next job, by one idle thread at a time.
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => {
                queued.fetch_sub(1, Ordering::SeqCst);
                job()
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn jobs_run_side_by_side_on_the_pool() {
        let pool = RequestPool::new("test", 4);
        // Four jobs that each wait for the other three: they finish only if they run at once.
        let barrier = Arc::new(Barrier::new(4));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let (b, d) = (barrier.clone(), done.clone());
            let place = pool.reserve().expect("room for four jobs");
            pool.submit(
                place,
                Box::new(move || {
                    b.wait();
                    d.fetch_add(1, Ordering::SeqCst);
                }),
            );
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.load(Ordering::SeqCst) < 4 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(done.load(Ordering::SeqCst), 4);
        assert_eq!(pool.threads(), 4);
    }

    #[test]
    fn a_full_pool_has_no_place_until_a_thread_takes_a_job() {
        let pool = RequestPool::new("test", 1);
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        // The thread takes the first job and waits in it; four more fill the queue.
        let first = pool.reserve().expect("a place");
        pool.submit(
            first,
            Box::new(move || {
                let _ = wait.lock().map(|w| w.recv());
            }),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pool.queued.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for _ in 0..BACKLOG_PER_THREAD {
            let place = pool.reserve().expect("room in the queue");
            pool.submit(place, Box::new(|| {}));
        }
        assert!(pool.reserve().is_none(), "a full queue has no place");
        go.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pool.reserve().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(pool.queued.load(Ordering::SeqCst) <= BACKLOG_PER_THREAD);
    }
}
