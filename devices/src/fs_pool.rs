//! A bounded pool of threads that answer a virtio-fs device's requests off the queue's thread
//! (a share's `threads=N`, virtiofsd's `--thread-pool-size`).
//!
//! Theory of operation. Without a pool the queue's worker answers each request before it
//! takes the next, so one slow request (an fsync, a read of a cold file) holds up every other
//! the guest has queued, on every file. With one, the worker takes requests off the ring and
//! hands them to the pool (all but the few it answers as quickly as it could hand them
//! over: `vhu_fs`); a pool thread answers each, puts the chain on the used ring and signals
//! the guest, in whatever order requests finish (FUSE requests are independent: the kernel
//! waits for a reply before it sends one that depends on it).
//!
//! At most `threads` x [`BACKLOG_PER_THREAD`] requests wait for a thread, so a guest cannot
//! queue unbounded work in ferry's memory. The worker reserves a place before it hands a
//! request over ([`RequestPool::reserve`]); when there is none it answers the request itself.
//! It never waits for the pool: it drains the ring holding the ring's lock, which a pool
//! thread takes to return its chain, so a worker waiting for a thread that waits for the
//! lock would stall the share for good. The threads start on first use, from the queue's
//! worker, so they inherit its sandbox (seccomp filter and Landlock domain). Which requests
//! go to the pool is the device's policy (`vhu_fs`); this is the mechanism.
//!
//! The jobs wait in one queue under a mutex, and a job handed over wakes one idle thread
//! (a condition variable's `notify_one`). The usual Rust pool, a channel whose receiver idle
//! threads share under a mutex (virtiofsd's, `futures::executor::ThreadPool`, and the
//! `threadpool` crate's), wakes two for each job: the thread waiting in the channel, and, as
//! that one lets the mutex go, the next thread waiting for the mutex, which only takes it to
//! wait in the channel again. That second wake-up is CPU that a host busy running the
//! guest's vCPUs does not have.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use log::warn;

/// One request to answer.
pub type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting per thread before the queue's worker answers requests itself.
pub const BACKLOG_PER_THREAD: usize = 4;

/// A pool of `threads` threads, started on first use.
pub struct RequestPool {
    name: String,
    threads: usize,
    jobs: OnceLock<Arc<Jobs>>,
    /// Places reserved and not yet taken by a thread: at most `threads` x BACKLOG_PER_THREAD.
    queued: Arc<AtomicUsize>,
}

/// A place in the pool's queue, from [`RequestPool::reserve`], for one [`RequestPool::submit`].
pub struct Place(());

/// The jobs waiting for a thread, and the idle threads waiting for a job.
#[derive(Default)]
struct Jobs {
    waiting: Mutex<VecDeque<Job>>,
    /// Signalled once per job handed over, and to every thread when the pool closes.
    ready: Condvar,
    /// Threads running.
    live: AtomicUsize,
    /// The pool is gone, or its threads: they end once the jobs left are done, and no job is
    /// taken any more. Set under `waiting`'s lock, so a thread that saw it clear there is
    /// already waiting when `close` signals; read without it by `reserve`.
    closed: AtomicBool,
}

impl Jobs {
    /// Queues `job` and wakes one idle thread; false when the pool has closed.
    fn push(&self, job: Job) -> bool {
        let Ok(mut w) = self.waiting.lock() else {
            return false;
        };
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        w.push_back(job);
        drop(w);
        self.ready.notify_one();
        true
    }

    /// The next job, waiting for one; `None` once the pool has closed and none is left.
    fn pop(&self) -> Option<Job> {
        let mut w = self.waiting.lock().ok()?;
        loop {
            if let Some(job) = w.pop_front() {
                return Some(job);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            w = self.ready.wait(w).ok()?;
        }
    }

    fn close(&self) {
        {
            let _w = self.waiting.lock();
            self.closed.store(true, Ordering::SeqCst);
        }
        self.ready.notify_all();
    }
}

/// A pool thread's life: the last thread to end (a job that panicked ends its thread) closes
/// the queue and drops the jobs left in it, so the queue's worker answers the share's
/// requests from then on rather than handing them to no one.
struct Alive<'a> {
    name: &'a str,
    jobs: &'a Jobs,
    queued: &'a AtomicUsize,
}

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        if self.jobs.live.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        if !self.jobs.closed.load(Ordering::SeqCst) {
            warn!(
                "{}: every request thread has ended (see the errors above); the share's requests are answered one at a time from now on",
                self.name
            );
        }
        self.jobs.close();
        let left = match self.jobs.waiting.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => VecDeque::new(),
        };
        self.queued.fetch_sub(left.len(), Ordering::SeqCst);
        // Dropped here, outside the lock: their requests stay unanswered.
        drop(left);
    }
}

impl RequestPool {
    /// A pool of `threads` threads (at least one) named after `name`.
    pub fn new(name: &str, threads: usize) -> Self {
        RequestPool {
            name: name.to_string(),
            threads: threads.max(1),
            jobs: OnceLock::new(),
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
        if self.started()?.closed.load(Ordering::SeqCst) {
            return None;
        }
        let most = self.threads * BACKLOG_PER_THREAD;
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < most).then_some(n + 1)
            })
            .ok()
            .map(|_| Place(()))
    }

    /// Runs `job` on a pool thread, in the place reserved for it; never waits (but for the
    /// queue's mutex, which a thread holds only to take a job).
    pub fn submit(&self, _place: Place, job: Job) {
        // A place exists only once the threads do; the queue closes only when the pool is
        // dropped.
        if self.jobs.get().is_some_and(|j| j.push(job)) {
            return;
        }
        self.queued.fetch_sub(1, Ordering::SeqCst);
        warn!(
            "{}: the request threads ended as a request was handed to them, and it goes unanswered; restart ferry if the guest waits on it",
            self.name
        );
    }

    fn started(&self) -> Option<&Arc<Jobs>> {
        if let Some(jobs) = self.jobs.get() {
            return Some(jobs);
        }
        let jobs = Arc::new(Jobs::default());
        let mut started = 0;
        for i in 0..self.threads {
            // Counted before it runs, so an early end cannot find the count at zero.
            jobs.live.fetch_add(1, Ordering::SeqCst);
            let (ours, queued, name) = (jobs.clone(), self.queued.clone(), self.name.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{i}", self.name))
                .spawn(move || work(&name, &ours, &queued));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    jobs.live.fetch_sub(1, Ordering::SeqCst);
                    warn!("{}: cannot start a request thread: {e}", self.name)
                }
            }
        }
        if started == 0 {
            return None;
        }
        // Another caller may have raced this one; its pool wins, and this one's threads end.
        if let Err(ours) = self.jobs.set(jobs) {
            ours.close();
        }
        self.jobs.get()
    }
}

impl Drop for RequestPool {
    fn drop(&mut self) {
        if let Some(jobs) = self.jobs.get() {
            jobs.close();
        }
    }
}

/// A pool thread: runs jobs until the pool is gone.
fn work(name: &str, jobs: &Jobs, queued: &AtomicUsize) {
    let _alive = Alive { name, jobs, queued };
    while let Some(job) = jobs.pop() {
        queued.fetch_sub(1, Ordering::SeqCst);
        job();
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

    /// The context switches the threads named `prefix`-N of this process made to wait.
    fn waits_of(prefix: &str) -> u64 {
        let mut sum = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            sum += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        sum
    }

    #[test]
    fn each_job_wakes_one_thread() {
        // Jobs one at a time, each handed over while all four threads are idle: one thread
        // wakes for each (a pool whose idle threads share a channel under a mutex wakes two,
        // the second only to wait again).
        const JOBS: u64 = 200;
        let pool = RequestPool::new("wakes", 4);
        let (done, finished) = std::sync::mpsc::channel();
        let run = |n: u64| {
            for _ in 0..n {
                let done = done.clone();
                let place = pool.reserve().expect("an idle pool has room");
                pool.submit(place, Box::new(move || done.send(()).unwrap()));
                finished.recv().unwrap();
                // The thread that ran it goes back to wait before the next comes.
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        };
        run(1);
        let before = waits_of("wakes-");
        run(JOBS);
        let waits = waits_of("wakes-") - before;
        assert!(
            waits <= JOBS + JOBS / 4,
            "{waits} waits of the pool's threads for {JOBS} jobs"
        );
        assert!(waits >= JOBS / 2, "{waits} waits: the count is not read");
    }

    /// Hands `pool` a job that waits until the sender returned sends, then runs `then`.
    fn job_that_waits(
        pool: &RequestPool,
        then: impl FnOnce() + Send + 'static,
    ) -> std::sync::mpsc::Sender<()> {
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let place = pool.reserve().expect("a place");
        pool.submit(
            place,
            Box::new(move || {
                let _ = wait.lock().map(|w| w.recv());
                then()
            }),
        );
        go
    }

    #[test]
    fn when_its_last_thread_ends_the_pool_drops_its_jobs_and_takes_no_more() {
        let pool = RequestPool::new("panics", 1);
        let go = job_that_waits(&pool, || panic!("a job that panics (this test's)"));
        // A job that waits behind it, and tells when it is dropped unrun.
        struct Dropped(std::sync::mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (dropped, was_dropped) = std::sync::mpsc::channel();
        let waiting = Dropped(dropped);
        let second = pool.reserve().expect("room behind it");
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        pool.submit(
            second,
            Box::new(move || {
                r.store(true, Ordering::SeqCst);
                drop(waiting)
            }),
        );
        go.send(()).unwrap();
        was_dropped
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the job left in the queue is dropped");
        assert!(!ran.load(Ordering::SeqCst), "dropped, not run");
        assert!(
            pool.reserve().is_none(),
            "no place: the worker answers requests itself"
        );
        assert_eq!(pool.queued.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_full_pool_has_no_place_until_a_thread_takes_a_job() {
        let pool = RequestPool::new("test", 1);
        // The thread takes the first job and waits in it; four more fill the queue.
        let go = job_that_waits(&pool, || {});
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
