//! Capture on demand (`GET /pcap`, `ferry ctl pcap | tcpdump -r -`): the live link's frames,
//! both ways, streamed in the libpcap format to a client for as long as it reads, with no
//! file and no restart.
//!
//! Theory of operation. The net device keeps one [`LiveCaptures`] for every guest it serves;
//! each stack records each frame into it where it records into `--pcap`'s file. With no
//! capture running that is one relaxed atomic load per frame. Each running capture has a
//! filter (protocol, address, port), a snap length and a bounded queue of encoded records:
//! the frames it matches are copied in while there is room, and dropped and counted when its
//! client reads slower than the guest sends, so the guest never waits for a capture. The
//! client side ([`LiveCapture::next`]) takes records off the queue on its own thread.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Captures at once at most.
pub const MAX_CAPTURES: usize = 8;
/// Bytes of records one capture holds for its client at most.
const QUEUE_BYTES: usize = 8 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which frames a capture keeps: all of them, or those of a protocol, an address (either
/// end) and a port (either end). ARP and other non-IP frames pass only an empty filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureFilter {
    /// The IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    pub proto: Option<u8>,
    /// An address at either end.
    pub host: Option<IpAddr>,
    /// A TCP or UDP port at either end.
    pub port: Option<u16>,
}

impl CaptureFilter {
    /// Parses `proto=tcp|udp|icmp|icmpv6`, `host=ADDR`, `port=N`, joined by `&` (a URL's
    /// query; `%3A` for an IPv6 address's colons is understood).
    pub fn parse(query: &str) -> Result<(CaptureFilter, Vec<(String, String)>), String> {
        let mut f = CaptureFilter::default();
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = v.replace("%3A", ":").replace("%3a", ":");
            match k {
                "proto" => {
                    f.proto = Some(match v.as_str() {
                        "tcp" => 6,
                        "udp" => 17,
                        "icmp" => 1,
                        "icmpv6" => 58,
                        _ => return Err(format!("proto={v}: give tcp, udp, icmp or icmpv6")),
                    })
                }
                "host" => {
                    f.host = Some(
                        v.trim_matches(['[', ']'])
                            .parse()
                            .map_err(|_| format!("host={v}: give an IP address"))?,
                    )
                }
                "port" => {
                    f.port = Some(
                        v.parse()
                            .map_err(|_| format!("port={v}: give a port number"))?,
                    )
                }
                _ => rest.push((k.to_string(), v)),
            }
        }
        Ok((f, rest))
    }

    /// Whether `frame` (Ethernet) passes.
    pub fn matches(&self, frame: &[u8]) -> bool {
        if *self == CaptureFilter::default() {
            return true;
        }
        let Some(ethertype) = frame.get(12..14) else {
            return false;
        };
        let (proto, src, dst, l4) = match ethertype {
            [0x08, 0x00] => {
                let Some(h) = frame.get(14..34) else {
                    return false;
                };
                let ihl = usize::from(h[0] & 0x0f) * 4;
                let s: [u8; 4] = h[12..16].try_into().unwrap_or_default();
                let d: [u8; 4] = h[16..20].try_into().unwrap_or_default();
                (h[9], IpAddr::from(s), IpAddr::from(d), 14 + ihl)
            }
            [0x86, 0xdd] => {
                let Some(h) = frame.get(14..54) else {
                    return false;
                };
                let s: [u8; 16] = h[8..24].try_into().unwrap_or_default();
                let d: [u8; 16] = h[24..40].try_into().unwrap_or_default();
                (h[6], IpAddr::from(s), IpAddr::from(d), 54)
            }
            _ => return false,
        };
        if self.proto.is_some_and(|p| p != proto) {
            return false;
        }
        if self.host.is_some_and(|h| h != src && h != dst) {
            return false;
        }
        if let Some(port) = self.port {
            if proto != 6 && proto != 17 {
                return false;
            }
            let Some(p) = frame.get(l4..l4 + 4) else {
                return false;
            };
            let (sp, dp) = (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            );
            if sp != port && dp != port {
                return false;
            }
        }
        true
    }
}

/// One capture a client reads.
pub struct LiveCapture {
    filter: CaptureFilter,
    snaplen: u32,
    queue: Mutex<(VecDeque<Vec<u8>>, usize)>,
    wake: Condvar,
    closed: AtomicBool,
    dropped: AtomicU64,
}

impl LiveCapture {
    /// The libpcap file header of this capture.
    pub fn header(&self) -> Vec<u8> {
        crate::pcap::file_header(self.snaplen)
    }

    /// The next record (header and frame), waiting up to `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut q = lock(&self.queue);
        if q.0.is_empty() {
            q = self
                .wake
                .wait_timeout(q, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let r = q.0.pop_front()?;
        q.1 -= r.len();
        Some(r)
    }

    /// Frames the client lost: it read slower than they came.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Ends the capture: the stack stops recording into it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    fn offer(&self, frame: &[u8]) {
        if !self.filter.matches(frame) {
            return;
        }
        let record = crate::pcap::encode_record(frame, self.snaplen);
        let mut q = lock(&self.queue);
        if q.1 + record.len() > QUEUE_BYTES {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.1 += record.len();
        q.0.push_back(record);
        drop(q);
        self.wake.notify_one();
    }
}

/// The captures running on one net device.
#[derive(Default)]
pub struct LiveCaptures {
    any: AtomicBool,
    taps: Mutex<Vec<Arc<LiveCapture>>>,
}

impl LiveCaptures {
    /// Starts a capture of the frames `filter` passes, each cut at `snaplen` bytes; refused
    /// past [`MAX_CAPTURES`].
    pub fn start(&self, filter: CaptureFilter, snaplen: u32) -> Result<Arc<LiveCapture>, String> {
        let mut taps = lock(&self.taps);
        taps.retain(|t| !t.closed.load(Ordering::Relaxed));
        if taps.len() >= MAX_CAPTURES {
            return Err(format!(
                "{MAX_CAPTURES} captures are running, the most at once; stop one first"
            ));
        }
        let t = Arc::new(LiveCapture {
            filter,
            snaplen,
            queue: Mutex::new((VecDeque::new(), 0)),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        taps.push(t.clone());
        self.any.store(true, Ordering::Relaxed);
        Ok(t)
    }

    /// Records `frame` into every running capture that wants it.
    pub fn record(&self, frame: &[u8]) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let mut taps = lock(&self.taps);
        taps.retain(|t| !t.closed.load(Ordering::Relaxed));
        if taps.is_empty() {
            self.any.store(false, Ordering::Relaxed);
        }
        for t in taps.iter() {
            t.offer(frame);
        }
    }

    /// Captures running now.
    pub fn running(&self) -> usize {
        lock(&self.taps)
            .iter()
            .filter(|t| !t.closed.load(Ordering::Relaxed))
            .count()
    }
}

/// The current time as libpcap stamps records: seconds and microseconds.
pub(crate) fn stamp() -> (u32, u32) {
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    (ts.as_secs() as u32, ts.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(src_port: u16, dst: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8 + 4];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[14 + 9] = 17;
        f[14 + 12..14 + 16].copy_from_slice(&[192, 168, 127, 2]);
        f[14 + 16..14 + 20].copy_from_slice(&dst);
        f[34..36].copy_from_slice(&src_port.to_be_bytes());
        f[36..38].copy_from_slice(&53u16.to_be_bytes());
        f
    }

    #[test]
    fn filters_by_protocol_address_and_port() {
        let (f, rest) = CaptureFilter::parse("proto=udp&host=10.0.0.1&port=53&count=5").unwrap();
        assert_eq!(rest, vec![("count".to_string(), "5".to_string())]);
        assert!(f.matches(&udp4(40000, [10, 0, 0, 1])));
        assert!(!f.matches(&udp4(40000, [10, 0, 0, 2])), "another host");
        let (tcp, _) = CaptureFilter::parse("proto=tcp").unwrap();
        assert!(!tcp.matches(&udp4(40000, [10, 0, 0, 1])));
        let (port, _) = CaptureFilter::parse("port=40000").unwrap();
        assert!(
            port.matches(&udp4(40000, [10, 0, 0, 1])),
            "the source port counts"
        );
        assert!(
            CaptureFilter::default().matches(&[0u8; 42]),
            "no filter: ARP too"
        );
        assert!(!port.matches(&[0u8; 42]));
        for bad in ["proto=sctp", "host=x", "port=http"] {
            assert!(CaptureFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_client_that_does_not_read_loses_frames_not_time() {
        let live = LiveCaptures::default();
        let slow = live.start(CaptureFilter::default(), 65535).unwrap();
        let frame = vec![0u8; 9000];
        let t = std::time::Instant::now();
        for _ in 0..5000 {
            live.record(&frame);
        }
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(slow.dropped() > 0);
        let first = slow.next(Duration::from_millis(10)).unwrap();
        assert_eq!(first.len(), 16 + 9000);
        slow.close();
        live.record(&frame);
        assert_eq!(live.running(), 0);
        for _ in 0..MAX_CAPTURES {
            live.start(CaptureFilter::default(), 100).unwrap();
        }
        assert!(live.start(CaptureFilter::default(), 100).is_err());
    }
}
