//! The flow table, live: what `ferry ctl flows` lists is what `ss` shows of ferry's sockets.
//!
//! The guest holds 50 TCP connections open to three test hosts (three addresses on the remote
//! link), sends a UDP datagram and pings. Each row of `ferry ctl flows --json` names ferry's
//! host socket (fd, local and peer address); the test reads `ss -tnpe` for ferry's PID and
//! checks both ways: every TCP flow row is exactly one `ss` row, and every ferry TCP socket
//! in `ss` is a flow row. The UDP and ICMP flows are listed with their traffic, the filters
//! pick what they say, and once idle past their timeouts (60 s, 30 s) the UDP and ICMP flows
//! are gone while the TCP ones stay. `GET /metrics` counts the same flows, and `promtool check
//! metrics` finds nothing wrong with it.

use std::collections::HashSet;
use std::time::Duration;

use ferry_tests::ferry_ctl as ctl;
use ferry_tests::{serve_and_boot, FerryProcess, ServedGuest, TestHost, TestNet};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(240);

fn script(servers: &[String]) -> String {
    let mut s = String::from(
        r#"
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
step() { echo "FERRY-STEP $1"; i=0; while [ ! -e /mnt/tools/go-$1 ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; }
"#,
    );
    for i in 0..50 {
        let server = &servers[i % servers.len()];
        s.push_str(&format!("sleep 600 | nc {server} 7000 > /dev/null &\n"));
    }
    s.push_str(&format!(
        r#"check udp "$(/mnt/tools/probe udp {r} 7 6)" "6 SAME"
check ping "$(ping -c 2 -W 2 {r} 2>&1 | grep -c 'bytes from')" 2
step 1
ping -c 1 -W 1 192.168.127.1 > /dev/null
step 2
"#,
        r = servers[0]
    ));
    s
}

/// Ferry's TCP sockets as `ss -tnpe` shows them in namespace `ns`: (local, peer, fd).
fn ss_rows(ns: &str, pid: u32) -> Vec<(String, String, i64)> {
    let out = TestNet::command(ns, "ss")
        .args(["-tnpeH"])
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let tag = format!("pid={pid},fd=");
    let mut rows = Vec::new();
    for line in text.lines() {
        let Some(at) = line.find(&tag) else {
            continue;
        };
        let fd: i64 = line[at + tag.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap();
        // State Recv-Q Send-Q Local Peer ...
        let cols: Vec<&str> = line.split_whitespace().collect();
        rows.push((cols[3].to_string(), cols[4].to_string(), fd));
    }
    rows
}

/// `GET /metrics`, with its content type checked.
fn curl_metrics(api: &std::path::Path) -> String {
    let o = std::process::Command::new("curl")
        .args(["-sS", "-i", "--unix-socket"])
        .arg(api)
        .arg("http://ferry/metrics")
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&o.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").expect("an HTTP answer");
    assert!(
        head.contains("200 OK") && head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// `promtool check metrics` finds no problem in `text`.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (Debian's prometheus package; scripts/install-deps.sh installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn flows(api: &std::path::Path, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["--json", "flows"];
    a.extend_from_slice(args);
    let o = ctl(api, &a);
    assert!(o.status.success(), "ferry ctl flows: {o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("flows JSON");
    v.as_array().expect("an array").clone()
}

#[test]
fn the_flow_list_matches_ss_both_ways_and_udp_and_icmp_flows_expire() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    net.allow_ping_sockets();
    let servers = vec![
        net.remote_addr.clone(),
        net.add_remote_addr(3),
        net.add_remote_addr(4),
    ];
    let _hosts: Vec<TestHost> = servers
        .iter()
        .map(|a| TestHost::start(&net.remote, &[a, "--tcp-hold", "7000", "--echo", "7"]))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let ServedGuest {
        ferry,
        mut qemu,
        tools: t,
        api,
    } = serve_and_boot(&net.inner, dir.path(), script(&servers), &[], &[], vec![]);
    let fail = |e: String, ferry: &FerryProcess| panic!("{e}\nferry log:\n{}", ferry.log_tail());
    if let Err(e) = qemu.wait_console("FERRY-STEP 1", DEADLINE) {
        fail(e, &ferry);
    }

    let all = flows(&api, &[]);
    let tcp: Vec<&Value> = all.iter().filter(|f| f["proto"] == "tcp").collect();
    assert_eq!(tcp.len(), 50, "{all:#?}");
    for f in &tcp {
        assert_eq!(f["origin"], "outbound");
        assert_eq!(f["state"], "Established", "{f}");
        // The handshake's segments: SYN and ACK from the guest, SYN-ACK to it.
        assert!(
            f["from_guest"]["packets"].as_u64() >= Some(2)
                && f["to_guest"]["packets"].as_u64() >= Some(1),
            "{f}"
        );
    }
    // Both ways: each flow is one ss row, each ferry socket in ss is one flow.
    let ss: HashSet<(String, String, i64)> = ss_rows(&net.inner, ferry.serving_pid())
        .into_iter()
        .collect();
    let listed: HashSet<(String, String, i64)> = tcp
        .iter()
        .map(|f| {
            (
                f["host"]["local"].as_str().unwrap().to_string(),
                f["host"]["peer"].as_str().unwrap().to_string(),
                f["host"]["fd"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed.len(), 50, "fifty distinct host sockets");
    assert_eq!(
        ss, listed,
        "ss -tnpe for ferry and the flow list name the same sockets"
    );
    // The datagram and the pings, with their traffic.
    let udp: Vec<&Value> = all.iter().filter(|f| f["proto"] == "udp").collect();
    assert_eq!(udp.len(), 1, "{all:#?}");
    assert_eq!(udp[0]["remote"], format!("{}:7", servers[0]));
    assert_eq!(udp[0]["from_guest"]["bytes"], 6, "{}", udp[0]);
    assert_eq!(udp[0]["to_guest"]["packets"], 1, "{}", udp[0]);
    let icmp: Vec<&Value> = all.iter().filter(|f| f["proto"] == "icmp").collect();
    assert_eq!(icmp.len(), 1, "{all:#?}");
    assert_eq!(icmp[0]["from_guest"]["packets"], 2, "{}", icmp[0]);
    // Filters, on the server side.
    assert_eq!(flows(&api, &["--proto", "udp"]).len(), 1);
    assert_eq!(flows(&api, &["--port", "7000"]).len(), 50);
    let to_second = flows(&api, &["--remote", &servers[1]]);
    assert!(
        (16..=17).contains(&to_second.len())
            && to_second
                .iter()
                .all(|f| f["remote"] == format!("{}:7000", servers[1])),
        "{to_second:#?}"
    );
    let table =
        String::from_utf8_lossy(&ctl(&api, &["flows", "--proto", "icmp"]).stdout).to_string();
    assert!(table.contains("PROTO") && table.contains("icmp"), "{table}");

    // The same, as Prometheus metrics, which promtool accepts.
    let metrics = curl_metrics(&api);
    for want in [
        "ferry_net_flows{proto=\"tcp\",origin=\"outbound\",state=\"established\"} 50",
        "ferry_net_flows{proto=\"udp\",origin=\"outbound\",state=\"open\"} 1",
        "# TYPE ferry_fs_request_duration_seconds histogram",
        "ferry_fs_requests_total{share=\"tools\",opcode=\"lookup\"}",
        "ferry_net_frames_total{direction=\"from_guest\"}",
    ] {
        assert!(metrics.contains(want), "{want} in\n{metrics}");
    }
    promtool_accepts(&metrics);

    // Idle past the UDP timeout: the guest's next packet makes the stack look.
    std::thread::sleep(Duration::from_secs(66));
    std::fs::write(t.dir.join("go-1"), b"").unwrap();
    if let Err(e) = qemu.wait_console("FERRY-STEP 2", DEADLINE) {
        fail(e, &ferry);
    }
    let left = flows(&api, &[]);
    assert!(
        left.iter().all(|f| f["proto"] == "tcp"),
        "UDP and ICMP flows expire: {left:#?}"
    );
    assert_eq!(left.len(), 50);
    std::fs::write(t.dir.join("go-2"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(2, &format!("ferry log:\n{}", ferry.log_tail()));
}
