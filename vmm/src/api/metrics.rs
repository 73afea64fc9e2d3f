//! `GET /metrics`: ferry's counters in the Prometheus text format, for a scraper pointed at
//! the API socket (or `curl --unix-socket`).
//!
//! Theory of operation. Nothing is kept for Prometheus: each scrape reads the counters the
//! devices keep anyway (the net device's, the stack's under its lock for a moment, the
//! proxy's, the rules', each share's FUSE server's) into a snapshot of metric families, which
//! the `prometheus` crate's text encoder writes in the Prometheus text format 0.0.4 (HELP and
//! TYPE lines, escaping, cumulative histogram buckets), as `promtool check metrics` reads
//! it. Names follow Prometheus conventions: the `ferry_` prefix, base units in the name
//! (`_bytes`, `_seconds`), `_total` on counters, labels for what varies (direction,
//! protocol, opcode, share).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::Encoder;

use super::http::Body;
use super::Control;
use ferry_fs::abi::opcode;

type Labels = Vec<(&'static str, String)>;

/// One histogram of a family: its labels, the sum and count of what it saw, and its
/// cumulative buckets (upper bound, count; the encoder adds +Inf).
type HistogramRow = (Labels, f64, u64, Vec<(f64, u64)>);

/// One metric family, read at scrape time.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, i64)>),
    Histogram(Vec<HistogramRow>),
}

/// Everything one scrape read.
#[derive(Debug, Default)]
struct Snapshot(Vec<Family>);

impl Snapshot {
    fn counter(&mut self, name: &'static str, help: &'static str, rows: Vec<(Labels, u64)>) {
        self.0.push(Family {
            name,
            help,
            kind: Kind::Counter(rows),
        });
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, rows: Vec<(Labels, i64)>) {
        self.0.push(Family {
            name,
            help,
            kind: Kind::Gauge(rows),
        });
    }

    /// The families as the encoder takes them (a family with no rows is left out: the text
    /// format has no way to say "none yet" but silence).
    fn families(&self) -> Vec<MetricFamily> {
        let metric = |labels: &Labels| {
            let mut m = proto::Metric::default();
            m.set_label(
                labels
                    .iter()
                    .map(|(k, v)| {
                        let mut p = proto::LabelPair::default();
                        p.set_name(k.to_string());
                        p.set_value(v.clone());
                        p
                    })
                    .collect(),
            );
            m
        };
        let mut out = Vec::new();
        for f in &self.0 {
            let mut mf = MetricFamily::default();
            mf.set_name(f.name.to_string());
            mf.set_help(f.help.to_string());
            let metrics: Vec<proto::Metric> = match &f.kind {
                Kind::Counter(rows) => {
                    mf.set_field_type(MetricType::COUNTER);
                    rows.iter()
                        .map(|(labels, v)| {
                            let mut m = metric(labels);
                            let mut c = proto::Counter::default();
                            c.set_value(*v as f64);
                            m.set_counter(c);
                            m
                        })
                        .collect()
                }
                Kind::Gauge(rows) => {
                    mf.set_field_type(MetricType::GAUGE);
                    rows.iter()
                        .map(|(labels, v)| {
                            let mut m = metric(labels);
                            let mut g = proto::Gauge::default();
                            g.set_value(*v as f64);
                            m.set_gauge(g);
                            m
                        })
                        .collect()
                }
                Kind::Histogram(rows) => {
                    mf.set_field_type(MetricType::HISTOGRAM);
                    rows.iter()
                        .map(|(labels, sum, count, buckets)| {
                            let mut m = metric(labels);
                            let mut h = proto::Histogram::default();
                            h.set_sample_sum(*sum);
                            h.set_sample_count(*count);
                            h.set_bucket(
                                buckets
                                    .iter()
                                    .map(|(bound, n)| {
                                        let mut b = proto::Bucket::default();
                                        b.set_upper_bound(*bound);
                                        b.set_cumulative_count(*n);
                                        b
                                    })
                                    .collect(),
                            );
                            m.set_histogram(h);
                            m
                        })
                        .collect()
                }
            };
            if !metrics.is_empty() {
                mf.set_metric(metrics);
                out.push(mf);
            }
        }
        out
    }
}

fn l(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// The net device's, the stack's, the published ports', the proxy's and the rules' metrics.
fn net(control: &Control, s: &mut Snapshot) {
    let Some(n) = &control.net else {
        return;
    };
    let d = n.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let (st, flows) = n.stack_stats();
    s.counter(
        "ferry_net_frames_total",
        "Ethernet frames between the guest and ferry, by direction.",
        vec![
            (l(&[("direction", "from_guest")]), load(&d.tx_frames)),
            (l(&[("direction", "to_guest")]), load(&d.rx_frames)),
        ],
    );
    s.counter(
        "ferry_net_bytes_total",
        "Bytes of Ethernet frames between the guest and ferry, by direction.",
        vec![
            (l(&[("direction", "from_guest")]), load(&d.tx_bytes)),
            (l(&[("direction", "to_guest")]), load(&d.rx_bytes)),
        ],
    );
    s.counter(
        "ferry_net_dropped_frames_total",
        "Frames dropped, by reason: the stack's queue was full, a frame did not fit the guest's buffers, a malformed frame from the guest.",
        vec![
            (l(&[("reason", "queue_full")]), st.dropped_in),
            (l(&[("reason", "too_big")]), load(&d.rx_dropped_too_big)),
            (l(&[("reason", "malformed")]), load(&d.tx_malformed)),
        ],
    );
    s.counter(
        "ferry_net_dhcp_replies_total",
        "DHCP answers to the guest.",
        vec![(vec![], st.dhcp_replies)],
    );
    s.counter(
        "ferry_net_dns_replies_total",
        "DNS answers to the guest from the gateway.",
        vec![(vec![], st.dns_replies)],
    );
    s.counter(
        "ferry_net_tcp_refused_total",
        "Guest TCP connections refused: the host connect failed or the cap was reached.",
        vec![(vec![], st.tcp_refused)],
    );
    // Open flows by protocol, origin and state (states of TCP; "open" for the others).
    let mut by: BTreeMap<(&'static str, &'static str, String), i64> = BTreeMap::new();
    for f in &flows {
        *by.entry((f.protocol, f.origin.name(), f.state.to_ascii_lowercase()))
            .or_default() += 1;
    }
    s.gauge(
        "ferry_net_flows",
        "Open flows through the NAT, by protocol, origin and state.",
        by.into_iter()
            .map(|((p, o, st), n)| (l(&[("proto", p), ("origin", o), ("state", &st)]), n))
            .collect(),
    );
    if let Some(p) = &control.ports {
        let mut fwd = Vec::new();
        for port in p.list() {
            let proto = port.spec.protocol.to_string();
            let host = ferry_net::ports::host_endpoint(&port.spec);
            for (result, v) in [
                ("forwarded", port.counters.forwarded),
                ("refused", port.counters.refused),
            ] {
                fwd.push((
                    l(&[("proto", &proto), ("host", &host), ("result", result)]),
                    v,
                ));
            }
        }
        s.counter(
            "ferry_published_port_clients_total",
            "Connections (TCP) or datagrams (UDP) of published ports' clients, by port and result.",
            fwd,
        );
    }
    if let Some(px) = &control.proxy {
        let ps = px.stats();
        s.counter(
            "ferry_proxy_requests_total",
            "Requests the gateway's HTTP proxy served, by kind (relayed request or CONNECT tunnel).",
            vec![
                (l(&[("kind", "request")]), ps.requests),
                (l(&[("kind", "tunnel")]), ps.tunnels),
            ],
        );
        s.counter(
            "ferry_proxy_failures_total",
            "Proxy requests answered with an error, by kind (bad_request 400, too_large 431, timeout 408, refused 403, unreachable 502, auth 407, busy 503).",
            ferry_net::proxy::Failure::ALL
                .iter()
                .map(|f| (l(&[("kind", f.name())]), ps.errors[*f as usize]))
                .collect(),
        );
        s.counter(
            "ferry_proxy_server_connections_total",
            "Connections the proxy opened to servers and upstream proxies (kept alive across requests).",
            vec![(vec![], ps.connections)],
        );
        s.gauge(
            "ferry_proxy_active_connections",
            "Connections the proxy serves now.",
            vec![(vec![], ps.active as i64)],
        );
    }
    if let Some(r) = &control.rules {
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        for rule in r.list() {
            let labels = l(&[
                ("rule", &rule.id.to_string()),
                ("action", &rule.spec.action.to_string()),
                ("dir", &rule.spec.dir.to_string()),
            ]);
            packets.push((labels.clone(), rule.packets));
            bytes.push((labels, rule.bytes));
        }
        for dir in [ferry_net::rules::Dir::Out, ferry_net::rules::Dir::In] {
            let (p, b) = r.default_counters(dir);
            let labels = l(&[
                ("rule", "default"),
                ("action", "allow"),
                ("dir", &dir.to_string()),
            ]);
            packets.push((labels.clone(), p));
            bytes.push((labels, b));
        }
        s.counter(
            "ferry_rule_packets_total",
            "Packets (new flows and refused packets) each rule decided.",
            packets,
        );
        s.counter(
            "ferry_rule_bytes_total",
            "Bytes carried by the flows each rule let through, or refused.",
            bytes,
        );
    }
}

/// Each share's FUSE server: requests and errors by opcode, and their latency.
fn fs(control: &Control, s: &mut Snapshot) {
    let (mut requests, mut errors, mut malformed, mut hist, mut nodes, mut files) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (share, _, dev) in control.shares.list() {
        let server = dev.server();
        let st = server.stats();
        let tag = share.tag.clone();
        for o in 0..=opcode::MAX + 1 {
            let name = opcode::name(o).unwrap_or("unknown").to_ascii_lowercase();
            if st.ops(o) > 0 {
                requests.push((l(&[("share", &tag), ("opcode", &name)]), st.ops(o)));
            }
            if st.op_errors(o) > 0 {
                errors.push((l(&[("share", &tag), ("opcode", &name)]), st.op_errors(o)));
            }
        }
        malformed.push((l(&[("share", &tag)]), st.malformed()));
        let (counts, sum) = st.latency();
        let mut cumulative = 0;
        let mut buckets = Vec::new();
        for (i, c) in counts.iter().enumerate() {
            cumulative += c;
            // The encoder writes the +Inf bucket itself, from the count.
            if let Some(bound) = ferry_fs::LATENCY_BUCKETS.get(i) {
                buckets.push((*bound, cumulative));
            }
        }
        hist.push((
            l(&[("share", &tag)]),
            sum.as_secs_f64(),
            cumulative,
            buckets,
        ));
        nodes.push((l(&[("share", &tag)]), server.fs().inode_count() as i64));
        files.push((l(&[("share", &tag)]), server.fs().handle_count() as i64));
    }
    s.counter(
        "ferry_fs_requests_total",
        "FUSE requests from the guest, by share and opcode.",
        requests,
    );
    s.counter(
        "ferry_fs_request_errors_total",
        "FUSE requests answered with an error, by share and opcode.",
        errors,
    );
    s.counter(
        "ferry_fs_malformed_requests_total",
        "FUSE requests too malformed to trust, by share.",
        malformed,
    );
    s.0.push(Family {
        name: "ferry_fs_request_duration_seconds",
        help: "How long FUSE requests took to answer, by share.",
        kind: Kind::Histogram(hist),
    });
    s.gauge(
        "ferry_fs_nodes",
        "Nodes (inodes) the guest holds, by share.",
        nodes,
    );
    s.gauge(
        "ferry_fs_open_files",
        "Files and folders the guest has open, by share.",
        files,
    );
}

/// The metrics, as the body of `GET /metrics`.
pub(super) fn render(control: &Control) -> Body {
    let mut snap = Snapshot::default();
    snap.gauge(
        "ferry_uptime_seconds",
        "Seconds since ferry started serving.",
        vec![(vec![], control.started.elapsed().as_secs() as i64)],
    );
    net(control, &mut snap);
    fs(control, &mut snap);
    let mut text = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&snap.families(), &mut text) {
        text = format!("# cannot encode the metrics: {e}\n").into_bytes();
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    Body::Text {
        content_type: prometheus::TEXT_FORMAT,
        text,
    }
}
