//! What a FUSE server counts for the control API and `/metrics`: requests by opcode, errors
//! by opcode, requests too malformed to trust, how long requests take, and the most
//! requests answered at once.
//!
//! Theory of operation. Every counter is an atomic the server's threads add to without a
//! lock; readers take a consistent-enough snapshot by loading them one by one. The latency
//! histogram has fixed buckets (10 µs to 1 s, Prometheus' cumulative form is made when it is
//! read), so recording one request is one clock read, one comparison walk over twelve bounds
//! and two atomic adds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::abi::opcode;

/// The upper bounds of the latency buckets, in seconds (a last one holds the rest).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1, 1.0,
];

/// Counters a server keeps.
#[derive(Debug)]
pub struct ServerStats {
    ops: Vec<AtomicU64>,
    op_errors: Vec<AtomicU64>,
    errors: AtomicU64,
    malformed: AtomicU64,
    /// Requests per latency bucket (not cumulative), the last past every bound.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
    /// Requests being answered now, and the most there have been at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl Default for ServerStats {
    fn default() -> Self {
        let slots = || (0..=opcode::MAX + 1).map(|_| AtomicU64::new(0)).collect();
        ServerStats {
            ops: slots(),
            op_errors: slots(),
            errors: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            latency: Default::default(),
            latency_sum_ns: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
        }
    }
}

impl ServerStats {
    fn slot(&self, opcode: u32) -> usize {
        (opcode as usize).min(self.ops.len() - 1)
    }

    /// Requests seen with `opcode` (unknown opcodes share the last slot).
    pub fn ops(&self, opcode: u32) -> u64 {
        self.ops[self.slot(opcode)].load(Ordering::Relaxed)
    }

    /// Requests with `opcode` answered with an error.
    pub fn op_errors(&self, opcode: u32) -> u64 {
        self.op_errors[self.slot(opcode)].load(Ordering::Relaxed)
    }

    /// Requests answered with an error.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Requests too malformed to answer, or answered with EINVAL for lying about themselves.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// The latency histogram: requests per bucket of [`LATENCY_BUCKETS`] (not cumulative; one
    /// more for the rest) and the sum of every request's time.
    pub fn latency(&self) -> (Vec<u64>, Duration) {
        let counts = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let sum = Duration::from_nanos(self.latency_sum_ns.load(Ordering::Relaxed));
        (counts, sum)
    }

    /// The most requests that were being answered at once (more than one with a pool, or
    /// while lock waits are pending).
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::Relaxed)
    }

    /// A request is being answered until the guard returned is dropped.
    pub(crate) fn in_flight(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(self)
    }

    pub(crate) fn count_op(&self, opcode: u32) {
        self.ops[self.slot(opcode)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_error(&self, opcode: u32) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.op_errors[self.slot(opcode)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_malformed(&self) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one request that took `t`.
    pub(crate) fn observe(&self, t: Duration) {
        let secs = t.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns.fetch_add(
            t.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }
}

/// One request being answered (see [`ServerStats::in_flight`]).
pub(crate) struct InFlight<'a>(&'a ServerStats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_opcode_and_buckets_latencies() {
        let s = ServerStats::default();
        s.count_op(opcode::READ);
        s.count_op(u32::MAX);
        s.count_error(opcode::READ);
        assert_eq!(
            (s.ops(opcode::READ), s.op_errors(opcode::READ), s.errors()),
            (1, 1, 1)
        );
        assert_eq!(s.ops(u32::MAX - 1), 1, "unknown opcodes share a slot");
        s.observe(Duration::from_micros(5));
        s.observe(Duration::from_micros(300));
        s.observe(Duration::from_secs(3));
        let (counts, sum) = s.latency();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[5], 1, "300 µs is in the 500 µs bucket");
        assert_eq!(counts[LATENCY_BUCKETS.len()], 1, "3 s is past every bound");
        assert_eq!(sum, Duration::from_micros(3_000_305));
    }
}
