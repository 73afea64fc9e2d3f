//! `GET /pcap`: a capture of the live link, streamed in the libpcap format while the client
//! reads (`ferry ctl pcap | tcpdump -r -`), so a capture starts and stops without restarting
//! ferry and without the sandbox allowing a new file.
//!
//! Theory of operation. The request starts a capture on the net device
//! (`ferry_net::pcap_live`) with the query's filter; the connection goes to a thread of its
//! own (`http::Body::Stream`), which writes the file header and then each record as the stack
//! queues it, until `count` frames or `bytes` bytes went out, or the client hangs up, and then
//! ends the capture. A client that reads slowly loses frames (its queue is bounded); the guest
//! never waits for it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

use super::error;
use super::http::Body;
use super::Control;
use ferry_net::pcap_live::CaptureFilter;

/// Bytes a capture streams unless `bytes=` says otherwise.
const DEFAULT_BYTES: u64 = 256 << 20;
const HINT: &str = "GET /pcap?proto=tcp|udp|icmp|icmpv6&host=ADDR&port=N&count=N&bytes=N&snaplen=N (each optional)";

/// GET /pcap[?filter and limits].
pub(super) fn capture(control: &Control, query: &str) -> (u16, Body) {
    let json = |(status, v): (u16, Value)| (status, Body::Json(v));
    let Some(net) = &control.net else {
        return json(error(
            404,
            "no capture: ferry serves no net device",
            "start ferry with --net-socket PATH",
        ));
    };
    let (filter, rest) = match CaptureFilter::parse(query) {
        Ok(f) => f,
        Err(e) => return json(error(400, e, HINT)),
    };
    let (mut count, mut bytes, mut snaplen) = (u64::MAX, DEFAULT_BYTES, 65535u32);
    for (k, v) in rest {
        let n = match v.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => return json(error(400, format!("{k}={v}: give a positive number"), HINT)),
        };
        match k.as_str() {
            "count" => count = n,
            "bytes" => bytes = n,
            "snaplen" => snaplen = n.clamp(64, 262_144) as u32,
            _ => return json(error(400, format!("unknown parameter {k:?}"), HINT)),
        }
    }
    let cap = match net.live_captures().start(filter, snaplen) {
        Ok(c) => c,
        Err(e) => return json(error(503, e, "end another capture, then ask again")),
    };
    let stream = move |mut s: UnixStream| {
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        let header = cap.header();
        let mut sent = header.len() as u64;
        if s.write_all(&header).is_ok() {
            let mut frames = 0;
            while frames < count && sent < bytes {
                match cap.next(Duration::from_secs(1)) {
                    Some(r) => {
                        if s.write_all(&r).is_err() {
                            break;
                        }
                        frames += 1;
                        sent += r.len() as u64;
                    }
                    None if super::events::hung_up(&s) => break,
                    None => {}
                }
            }
        }
        cap.close();
        if cap.dropped() > 0 {
            log::info!(
                "api: a capture ended; its client read too slowly for {} frames",
                cap.dropped()
            );
        }
    };
    (
        200,
        Body::Stream {
            content_type: "application/vnd.tcpdump.pcap",
            stream: Box::new(stream),
        },
    )
}
