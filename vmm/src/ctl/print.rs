//! `ferry ctl`'s tables: what the API answers, laid out for people (`--json` prints the
//! answer as it came instead).

use serde_json::{json, Value};

/// The rows `row` makes of each element of the array `v` (none when it is not an array).
pub(super) fn table_rows(v: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array()
        .map(|a| a.iter().map(row).collect())
        .unwrap_or_default()
}

/// Prints rows as aligned columns under `header`.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

pub(super) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub(super) fn print_ports(ports: &Value) {
    let rows = table_rows(ports, |p| {
        vec![
            s(&p["proto"]).to_uppercase(),
            format!("{}:{}", bracket(&s(&p["bind_ip"])), s(&p["host_port"])),
            s(&p["guest_port"]),
            s(&p["forwarded"]),
            s(&p["refused"]),
        ]
    });
    if rows.is_empty() {
        println!("no published ports");
        return;
    }
    table(
        &["PROTO", "HOST", "GUEST PORT", "FORWARDED", "REFUSED"],
        &rows,
    );
}

pub(super) fn bracket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

pub(super) fn print_proxy(p: &Value) {
    let way = |u: &Value| match u.as_str() {
        Some(u) => format!("through {u}"),
        None => "to servers directly".to_string(),
    };
    let mut upstream = way(&p["upstream"]);
    if p["https_upstream"] != p["upstream"] {
        upstream = format!("{upstream}, tunnels {}", way(&p["https_upstream"]));
    }
    println!(
        "proxy: gateway port {}, {upstream}; {} requests, {} tunnels, {} failed, {} open, {} server connections",
        s(&p["port"]),
        s(&p["requests"]),
        s(&p["tunnels"]),
        s(&p["failed"]),
        s(&p["active"]),
        s(&p["connections"])
    );
    if let Some(pac) = p["pac"].as_str() {
        println!("PAC file: {pac} (chooses the proxies per request)");
    }
    if let Some(b) = p["bypass"].as_str().filter(|b| !b.is_empty()) {
        println!("bypass: {b}");
    }
    if p["transparent"].as_bool() == Some(true) {
        println!(
            "transparent mode: on ({} guest connections to ports 80 and 443 taken)",
            s(&p["intercepted"])
        );
    }
    if p["credentials"].as_bool() == Some(true) {
        println!("credentials: held by ferry");
    }
    if let Some(errors) = p["errors"]
        .as_object()
        .filter(|e| e.values().any(|v| v.as_u64() != Some(0)))
    {
        let list: Vec<String> = errors
            .iter()
            .filter(|(_, v)| v.as_u64() != Some(0))
            .map(|(k, v)| format!("{k} {}", s(v)))
            .collect();
        println!("errors: {}", list.join(", "));
    }
}

/// The rules as `iptables -L -v` shows a chain: counters first, then the match; the two
/// default policies last.
pub(super) fn print_rules(v: &Value) {
    let mut rows: Vec<Vec<String>> = v["rules"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let net = match r["from"].as_str() {
                        Some(from) => format!("from {from}"),
                        None => format!("to {}", s(&r["to"])),
                    };
                    vec![
                        s(&r["position"]),
                        s(&r["id"]),
                        s(&r["packets"]),
                        s(&r["bytes"]),
                        s(&r["action"]),
                        s(&r["dir"]),
                        s(&r["proto"]),
                        net,
                        r["ports"].as_str().unwrap_or("any").to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    for (key, dir, what) in [
        ("default", "out", "(default: flows no rule matches)"),
        ("default_in", "in", "(default: clients no rule matches)"),
    ] {
        let d = &v[key];
        rows.push(vec![
            "-".into(),
            "-".into(),
            s(&d["packets"]),
            s(&d["bytes"]),
            "allow".into(),
            dir.into(),
            what.into(),
            String::new(),
            String::new(),
        ]);
    }
    table(
        &[
            "#", "ID", "PACKETS", "BYTES", "ACTION", "DIR", "PROTO", "NETWORK", "PORTS",
        ],
        &rows,
    );
}

pub(super) fn print_stats(v: &Value) {
    let net = &v["net"];
    if net.is_object() {
        println!(
            "net: guest {}; from guest {} frames / {} bytes ({} malformed, {} dropped); to guest {} frames / {} bytes",
            if net["guest_attached"] == json!(true) { "attached" } else { "not attached" },
            s(&net["tx_frames"]), s(&net["tx_bytes"]), s(&net["tx_malformed"]), s(&net["dropped"]),
            s(&net["rx_frames"]), s(&net["rx_bytes"])
        );
        println!(
            "     {} DHCP and {} DNS answers; flows open: {} TCP, {} UDP, {} ICMP; {} refused; {} published connections",
            s(&net["dhcp_replies"]), s(&net["dns_replies"]), s(&net["tcp_flows"]), s(&net["udp_flows"]),
            s(&net["icmp_flows"]), s(&net["tcp_refused"]), s(&net["published_connections"])
        );
        let dns: Vec<&str> = net["dns_servers"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "     DNS servers: {}",
            if dns.is_empty() {
                "none (names outside ferry.internal get SERVFAIL)".to_string()
            } else {
                dns.join(", ")
            }
        );
        if net["pcap"].is_object() {
            println!(
                "     capturing to {}: {} frames / {} bytes",
                net["pcap"]["path"].as_str().unwrap_or("?"),
                s(&net["pcap"]["frames"]),
                s(&net["pcap"]["bytes"])
            );
        }
        if v["proxy"].is_object() {
            print_proxy(&v["proxy"]);
        }
    } else {
        println!("net: no device");
    }
    let fs: Vec<Vec<String>> = v["fs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    [
                        "tag",
                        "requests",
                        "reads",
                        "writes",
                        "errors",
                        "malformed",
                        "nodes",
                        "open_files",
                    ]
                    .iter()
                    .map(|k| s(&f[*k]))
                    .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    if !fs.is_empty() {
        println!();
        table(
            &[
                "SHARE",
                "REQUESTS",
                "READS",
                "WRITES",
                "ERRORS",
                "MALFORMED",
                "NODES",
                "OPEN FILES",
            ],
            &fs,
        );
    }
    let flows: Vec<Vec<String>> = net["flows"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    ["proto", "direction", "guest", "remote", "state"]
                        .iter()
                        .map(|k| s(&f[*k]))
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    if !flows.is_empty() {
        println!();
        table(&["PROTO", "DIR", "GUEST", "REMOTE", "STATE"], &flows);
    }
    if v["ports"].as_array().is_some_and(|a| !a.is_empty()) {
        println!();
        print_ports(&v["ports"]);
    }
    if v["rules"]["rules"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        println!();
        print_rules(&v["rules"]);
    }
}
