//! A bounded pool of threads that answer a virtio-fs device's requests off the queue's thread
//! (a share's `threads=N`, virtiofsd's `--thread-pool-size`).
//!
//! Theory of operation. Without a pool the queue's worker answers each request before it
//! takes the next, so one slow request (an fsync, a read of a cold file) holds up every other
//! the guest has queued, on every file. With one, the worker only takes requests off the ring
//! and hands each to the pool; a pool thread answers it, puts the chain on the used ring and
//! signals the guest, in whatever order requests finish (FUSE requests are independent: the
//! kernel waits for a reply before it sends one that depends on it). The hand-over is a
//! bounded channel: when every thread is busy and the channel is full, the worker waits, so a
//! guest cannot queue unbounded work in ferry's memory. It waits without the ring's lock
//! (`queue::drain_queue`), which a pool thread takes to return its chain. The threads start on first use, from
//! the queue's worker, so they inherit its sandbox (seccomp filter and Landlock domain).
//! Which requests go to the pool is the device's policy (`vhu_fs`); this is the mechanism.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

use log::warn;

/// One request to answer.
pub type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting per thread before the queue's worker waits for a free one.
const BACKLOG_PER_THREAD: usize = 4;

/// A pool of `threads` threads, started on first use.
pub struct RequestPool {
    name: String,
    threads: usize,
    tx: OnceLock<SyncSender<Job>>,
}

impl RequestPool {
    /// A pool of `threads` threads (at least one) named after `name`.
    pub fn new(name: &str, threads: usize) -> Self {
        RequestPool {
            name: name.to_string(),
            threads: threads.max(1),
            tx: OnceLock::new(),
        }
    }

    /// How many threads it has (or will have).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job` on a pool thread; waits while the pool is full. Gives the job back when no
    /// pool thread could be started, for the caller to run itself.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let Some(tx) = self.sender() else {
            return Err(job);
        };
        tx.send(job).map_err(|e| e.0)
    }

    fn sender(&self) -> Option<&SyncSender<Job>> {
        if let Some(tx) = self.tx.get() {
            return Some(tx);
        }
        let (tx, rx) = sync_channel::<Job>(self.threads * BACKLOG_PER_THREAD);
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..self.threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{i}", self.name))
                .spawn(move || work(&rx));
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
fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, by one idle thread at a time.
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn jobs_run_side_by_side_on_the_pool() {
        let pool = RequestPool::new("test", 4);
        // Four jobs that each wait for the other three: they finish only if they run at once.
        let barrier = Arc::new(Barrier::new(4));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let (b, d) = (barrier.clone(), done.clone());
            pool.submit(Box::new(move || {
                b.wait();
                d.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap_or_else(|_| panic!("the pool took no job"));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.load(Ordering::SeqCst) < 4 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(done.load(Ordering::SeqCst), 4);
        assert_eq!(pool.threads(), 4);
    }
}
