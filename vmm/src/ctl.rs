//! `ferry ctl`: the control API from the command line. Tables for people, `--json` for
//! scripts; exit 1 with the API's own words when it refuses.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::{CtlArgs, CtlCommand, DnsChange, ProxyChange, RuleChange, SocketChange};
use crate::config::{Error, Result};

mod print;
use print::*;

/// One HTTP exchange over the API socket; returns the status and the JSON body (Null if none).
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    call_with_fd(socket, method, path, body, None)
}

/// [`call`], handing `fd` over with the request (SCM_RIGHTS) when given.
pub fn call_with_fd(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    fd: Option<std::os::fd::RawFd>,
) -> Result<(u16, Value)> {
    let unreachable = |e: std::io::Error| {
        Error::Runtime(format!(
            "cannot reach ferry's control API at {}: {e}; check that `ferry serve --api-socket {}` runs and that you may open the socket",
            socket.display(),
            socket.display()
        ))
    };
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    match fd {
        Some(fd) => {
            use vmm_sys_util::sock_ctrl_msg::ScmSocket;
            // The descriptor rides on the first bytes; the rest follow as usual.
            let sent = s
                .send_with_fd(req.as_bytes(), fd)
                .map_err(|e| unreachable(std::io::Error::from_raw_os_error(e.errno())))?;
            s.write_all(&req.as_bytes()[sent..]).map_err(unreachable)?;
        }
        None => s.write_all(req.as_bytes()).map_err(unreachable)?,
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(unreachable)?;
    let bad = |what: &str| {
        Error::Runtime(format!(
            "ferry's control API at {} sent {what}; is it a ferry API socket?",
            socket.display()
        ))
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(bad("a malformed HTTP response")),
    };
    let status = resp.code.ok_or_else(|| bad("no status"))?;
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let rest = &raw[head_len..];
    let body = &rest[..len.unwrap_or(rest.len()).min(rest.len())];
    let value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|_| bad("a body that is not JSON"))?
    };
    Ok((status, value))
}

/// The API's refusal as an error: its message, then its hint on the next line.
fn refusal(v: &Value, status: u16) -> Error {
    let msg = v["error"]
        .as_str()
        .map_or_else(|| format!("the API answered {status}"), str::to_string);
    match v["hint"].as_str() {
        Some(h) if !h.is_empty() => Error::Runtime(format!("{msg}\nhint: {h}")),
        _ => Error::Runtime(msg),
    }
}

/// One API call that must answer `want`; its JSON body, or the API's refusal.
fn expect(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    want: u16,
) -> Result<Value> {
    let (status, v) = call(socket, method, path, body)?;
    if status != want {
        return Err(refusal(&v, status));
    }
    Ok(v)
}

/// Opens a streaming response (`GET /events`, `GET /pcap`): the body's reader once the head
/// said 200, or the API's refusal.
fn open_stream(socket: &Path, path: &str) -> Result<std::io::BufReader<UnixStream>> {
    use std::io::BufRead;
    let unreachable = |e: std::io::Error| {
        Error::Runtime(format!(
            "cannot reach ferry's control API at {}: {e}; check that `ferry serve --api-socket {}` runs",
            socket.display(),
            socket.display()
        ))
    };
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(unreachable)?;
    let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
    // The head ends at an empty line.
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(unreachable)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    if status != "200" {
        let mut body = Vec::new();
        let _ = std::io::Read::read_to_end(&mut r, &mut body);
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        return Err(refusal(&v, status.parse().unwrap_or(0)));
    }
    Ok(r)
}

/// `ferry ctl events`: prints each event line of `GET /events` as it comes, `count` of them
/// or until the API closes the stream.
fn follow_events(socket: &Path, count: Option<usize>) -> Result<()> {
    use std::io::BufRead;
    let mut r = open_stream(socket, "/events")?;
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    let mut seen = 0;
    while !matches!(count, Some(n) if seen >= n) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if out
            .write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            break; // the reader went (a pipe closed)
        }
        seen += 1;
    }
    Ok(())
}

/// `ferry ctl pcap`: the live link in the libpcap format on stdout (not a terminal), for
/// `tcpdump -r -` or a file.
fn capture(socket: &Path, path: &str) -> Result<()> {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        return Err(Error::Usage(
            "ferry ctl pcap writes a binary capture; pipe it into `tcpdump -r -` or redirect it to a file".into(),
        ));
    }
    let mut r = open_stream(socket, path)?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match std::io::Read::read(&mut r, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
            break; // the reader went
        }
    }
    Ok(())
}

/// `path`, with the query the given `key=value` pairs make (the ones given).
fn with_query(path: &str, pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
    if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

/// The one-port unpublish specs of a spec that names a range or list of host ports
/// (`8000-8010`, `3000,3001`, `udp/127.0.0.1:5000-5005:5000-5005`), or None for one port.
fn unpublish_many(spec: &str) -> Result<Option<Vec<String>>> {
    let ports_part = spec.rsplit(']').next().unwrap_or(spec);
    if !ports_part.contains(['-', ',', '~']) {
        return Ok(None);
    }
    let any = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    let specs = ferry_net::PortSpec::parse_many_with_default(spec, any)
        .map_err(|e| Error::Usage(e.to_string().replacen("--publish", "unpublish", 1)))?;
    // Without a bind address in the spec, each port is looked up by its host port alone.
    let named_bind = spec.contains('[')
        || spec.split(':').count() > 2
        || spec
            .split_once('/')
            .map_or(spec, |(_, r)| r)
            .split(':')
            .next()
            .is_some_and(|a| a.parse::<std::net::IpAddr>().is_ok());
    Ok(Some(
        specs
            .iter()
            .map(|p| {
                if named_bind {
                    let b = match p.bind {
                        std::net::IpAddr::V6(a) => format!("[{a}]"),
                        a => a.to_string(),
                    };
                    format!("{}/{b}:{}", p.protocol, p.host_port)
                } else {
                    format!("{}/{}", p.protocol, p.host_port)
                }
            })
            .collect(),
    ))
}

/// Finds the published port an unpublish spec names: `[tcp|udp/][BIND_IP:]HOST_PORT[:GUEST_PORT]`.
/// Without a bind address, the one published port with that protocol and host port.
fn resolve_unpublish(socket: &Path, spec: &str) -> Result<String> {
    let usage = || {
        Error::Usage(format!(
            "unpublish {spec}: write it as [tcp|udp/][BIND_IP:]HOST_PORT[:GUEST_PORT], for example 8080 or udp/127.0.0.1:5353"
        ))
    };
    let (proto, rest) = match spec.split_once('/') {
        Some((p @ ("tcp" | "udp"), rest)) => (p, rest),
        Some(_) => return Err(usage()),
        None => ("tcp", spec),
    };
    // A full publish spec names the bind address and the host port; take those.
    let (bind, host_port) = if let Some(v6) = rest.strip_prefix('[') {
        let (a, ports) = v6.split_once("]:").ok_or_else(usage)?;
        (Some(a.to_string()), ports.split(':').next().unwrap_or(""))
    } else {
        let parts: Vec<&str> = rest.split(':').collect();
        match parts[..] {
            [h] | [h, _] if h.parse::<u16>().is_ok() => (None, h),
            [a, h] | [a, h, _] => (Some(a.to_string()), h),
            _ => return Err(usage()),
        }
    };
    let port: u16 = host_port.parse().map_err(|_| usage())?;
    if let Some(b) = bind {
        b.parse::<std::net::IpAddr>().map_err(|_| usage())?;
        return Ok(format!("/ports/{proto}/{b}/{port}"));
    }
    let list = expect(socket, "GET", "/ports", None, 200)?;
    let matches: Vec<&Value> = list
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["proto"] == json!(proto) && p["host_port"] == json!(port))
                .collect()
        })
        .unwrap_or_default();
    match matches[..] {
        [one] => Ok(format!("/ports/{proto}/{}/{port}", s(&one["bind_ip"]))),
        [] => Err(Error::Runtime(format!(
            "port {} {port} is not published; `ferry ctl ports` lists what is",
            proto.to_uppercase()
        ))),
        _ => Err(Error::Usage(format!(
            "unpublish {spec}: {} addresses publish {} {port}; name one, for example {proto}/{}:{port}",
            matches.len(),
            proto.to_uppercase(),
            s(&matches[0]["bind_ip"])
        ))),
    }
}

/// Runs one `ferry ctl` command.
pub fn ctl(a: CtlArgs) -> Result<ExitCode> {
    let sock = a.api_socket.as_path();
    let out = |v: &Value, human: &dyn Fn(&Value)| {
        if a.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            human(v);
        }
    };
    match &a.command {
        CtlCommand::Health => {
            let v = expect(sock, "GET", "/health", None, 200)?;
            out(&v, &|v| {
                println!(
                    "ok: ferry {} (pid {}), up {} s, guest {}",
                    s(&v["version"]),
                    s(&v["pid"]),
                    s(&v["uptime_secs"]),
                    if v["guest_attached"] == json!(true) {
                        "attached"
                    } else {
                        "not attached"
                    }
                )
            });
        }
        CtlCommand::Ports => {
            let v = expect(sock, "GET", "/ports", None, 200)?;
            out(&v, &print_ports);
        }
        CtlCommand::Events { count } => follow_events(sock, *count)?,
        CtlCommand::Pcap {
            count,
            bytes,
            proto,
            host,
            port,
            snaplen,
        } => {
            let path = with_query(
                "/pcap",
                &[
                    ("count", count.map(|v| v.to_string())),
                    ("bytes", bytes.map(|v| v.to_string())),
                    ("proto", proto.clone()),
                    ("host", host.as_ref().map(|h| h.replace(':', "%3A"))),
                    ("port", port.map(|v| v.to_string())),
                    ("snaplen", snaplen.map(|v| v.to_string())),
                ],
            );
            capture(sock, &path)?
        }
        CtlCommand::Flows {
            proto,
            port,
            remote,
        } => {
            let path = with_query(
                "/flows",
                &[
                    ("proto", proto.clone()),
                    ("port", port.map(|v| v.to_string())),
                    ("remote", remote.as_ref().map(|r| r.replace(':', "%3A"))),
                ],
            );
            let v = expect(sock, "GET", &path, None, 200)?;
            out(&v, &|v| {
                let rows = table_rows(v, |f| {
                    vec![
                        s(&f["proto"]),
                        s(&f["origin"]),
                        s(&f["guest"]),
                        s(&f["remote"]),
                        s(&f["host"]["fd"]),
                        s(&f["host"]["local"]),
                        s(&f["host"]["peer"]),
                        s(&f["state"]),
                        s(&f["to_guest"]["bytes"]),
                        s(&f["from_guest"]["bytes"]),
                        format!("{:.0}", f["age_secs"].as_f64().unwrap_or(0.0)),
                        format!("{:.0}", f["idle_secs"].as_f64().unwrap_or(0.0)),
                        s(&f["rule"]),
                    ]
                });
                if rows.is_empty() {
                    println!("no flows");
                } else {
                    table(
                        &[
                            "PROTO",
                            "ORIGIN",
                            "GUEST",
                            "REMOTE",
                            "FD",
                            "HOST LOCAL",
                            "HOST PEER",
                            "STATE",
                            "TO GUEST",
                            "FROM GUEST",
                            "AGE",
                            "IDLE",
                            "RULE",
                        ],
                        &rows,
                    );
                }
            });
        }
        CtlCommand::Stats => {
            let v = expect(sock, "GET", "/stats", None, 200)?;
            out(&v, &print_stats);
        }
        CtlCommand::Publish { spec } => {
            let v = expect(sock, "POST", "/ports", Some(&json!({ "spec": spec })), 201)?;
            out(&v, &|v| {
                // One port, or the ports of a range or list.
                for p in v.as_array().map_or_else(|| vec![v], |a| a.iter().collect()) {
                    println!(
                        "published {} {}:{} -> guest port {}",
                        s(&p["proto"]).to_uppercase(),
                        bracket(&s(&p["bind_ip"])),
                        s(&p["host_port"]),
                        s(&p["guest_port"])
                    )
                }
            });
        }
        CtlCommand::Proxy { change } => {
            let v = match change {
                None => expect(sock, "GET", "/proxy", None, 200)?,
                Some(ProxyChange::Set { url }) => {
                    let body = json!({ "upstream": url });
                    expect(sock, "PUT", "/proxy", Some(&body), 200)?
                }
                Some(ProxyChange::Clear) => {
                    let body = json!({ "upstream": null });
                    expect(sock, "PUT", "/proxy", Some(&body), 200)?
                }
                Some(ProxyChange::Pac { location }) => {
                    // A file is read here and sent: ferry's sandbox reads few files.
                    let body = if location == "none" {
                        json!({ "pac": null })
                    } else if location.contains("://") {
                        json!({ "pac": location })
                    } else {
                        let script = std::fs::read_to_string(location).map_err(|e| {
                            Error::Usage(format!(
                                "cannot read the PAC file {location}: {e}; give a readable PAC file or an http:// URL"
                            ))
                        })?;
                        json!({ "pac": location, "pac_script": script })
                    };
                    expect(sock, "PUT", "/proxy", Some(&body), 200)?
                }
                Some(ProxyChange::Transparent { mode }) => {
                    let body = json!({ "transparent": mode == "on" });
                    expect(sock, "PUT", "/proxy", Some(&body), 200)?
                }
                Some(ProxyChange::Bypass { list }) => {
                    let body = json!({ "bypass": list });
                    expect(sock, "PUT", "/proxy", Some(&body), 200)?
                }
            };
            out(&v, &print_proxy);
        }
        CtlCommand::Rules { change } => match change {
            None => {
                let v = expect(sock, "GET", "/rules", None, 200)?;
                out(&v, &print_rules);
            }
            Some(RuleChange::Add { spec, at }) => {
                // A malformed spec is a usage error here, said once, before the API is asked.
                spec.parse::<ferry_net::rules::RuleSpec>()
                    .map_err(|e| Error::Usage(e.to_string()))?;
                let body = json!({ "spec": spec, "position": at });
                let v = expect(sock, "POST", "/rules", Some(&body), 201)?;
                out(&v, &|v| {
                    println!(
                        "added rule {} at position {}: {}",
                        s(&v["id"]),
                        s(&v["position"]),
                        s(&v["spec"])
                    )
                });
            }
            Some(RuleChange::Delete { id }) => {
                expect(sock, "DELETE", &format!("/rules/{id}"), None, 204)?;
                out(&json!({ "deleted": id }), &|_| {
                    println!("deleted rule {id}")
                });
            }
            Some(RuleChange::Zero) => {
                let v = expect(sock, "POST", "/rules/zero", None, 200)?;
                out(&v, &|v| {
                    println!("every counter set to 0");
                    print_rules(v)
                });
            }
        },
        CtlCommand::Dns { change } => match change {
            None => {
                let v = expect(sock, "GET", "/dns/records", None, 200)?;
                out(&v, &|v| {
                    let rows = table_rows(v, |r| {
                        let addrs: Vec<String> = r["addresses"]
                            .as_array()
                            .map(|x| x.iter().map(s).collect())
                            .unwrap_or_default();
                        vec![s(&r["name"]), addrs.join(" ")]
                    });
                    if rows.is_empty() {
                        println!("no DNS records (ferry ctl dns add NAME ADDR sets one)");
                    } else {
                        table(&["NAME", "ADDRESSES"], &rows);
                    }
                });
            }
            Some(DnsChange::Add { name, addr }) => {
                let body = json!({ "name": name, "address": addr.to_string() });
                let v = expect(sock, "POST", "/dns/records", Some(&body), 201)?;
                out(&v, &|v| {
                    println!("{} -> {}", s(&v["name"]), s(&v["address"]))
                });
            }
            Some(DnsChange::Delete { name }) => {
                expect(sock, "DELETE", &format!("/dns/records/{name}"), None, 204)?;
                out(&json!({ "deleted": name }), &|_| println!("deleted {name}"));
            }
        },
        CtlCommand::Sockets { change } => match change {
            None => {
                let v = expect(sock, "GET", "/sockets", None, 200)?;
                out(&v, &|v| {
                    let rows = table_rows(v, |r| {
                        vec![
                            s(&r["path"]),
                            s(&r["guest_port"]),
                            s(&r["mode"]),
                            s(&r["forwarded"]),
                            s(&r["refused"]),
                        ]
                    });
                    if rows.is_empty() {
                        println!("no forwarded sockets (ferry ctl sockets add PATH=PORT adds one)");
                    } else {
                        table(
                            &["SOCKET", "GUEST PORT", "MODE", "FORWARDED", "REFUSED"],
                            &rows,
                        );
                    }
                });
            }
            Some(SocketChange::Add { spec }) => {
                let v = expect(
                    sock,
                    "POST",
                    "/sockets",
                    Some(&json!({ "spec": spec })),
                    201,
                )?;
                out(&v, &|v| {
                    println!(
                        "forwarding {} -> guest port {}",
                        s(&v["path"]),
                        s(&v["guest_port"])
                    )
                });
            }
            Some(SocketChange::Remove { path }) => {
                let shown = path.display().to_string();
                if !shown.starts_with('/') {
                    return Err(Error::Usage(format!(
                        "{shown}: give the socket's absolute path, as `ferry ctl sockets` lists it"
                    )));
                }
                expect(
                    sock,
                    "DELETE",
                    &format!("/sockets{}", url_path(path)),
                    None,
                    204,
                )?;
                out(&json!({ "removed": shown }), &|_| {
                    println!("no longer forwarding {shown}")
                });
            }
        },
        CtlCommand::Unpublish { spec } => {
            // A range or list: each of its host ports, the bind address as given.
            let paths = match unpublish_many(spec)? {
                Some(each) => each
                    .iter()
                    .map(|one| resolve_unpublish(sock, one))
                    .collect::<Result<Vec<_>>>()?,
                None => vec![resolve_unpublish(sock, spec)?],
            };
            for path in &paths {
                expect(sock, "DELETE", path, None, 204)?;
            }
            out(&json!({"unpublished": paths}), &|_| {
                println!("unpublished {spec}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The bytes of a URL path that are escaped: controls, a space, and what would end the path
/// or be read as an escape (`?`, `#`, `%`); `/` stays, and non-ASCII bytes are escaped too.
const URL_PATH: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// `path` as a URL's path, escaped as the API reads it back (`DELETE /sockets/{path}`).
fn url_path(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    percent_encoding::percent_encode(path.as_os_str().as_bytes(), URL_PATH).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_go_in_urls_escaped_and_come_back_whole() {
        use std::os::unix::ffi::OsStrExt;
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(
            b"/run/user 1/docker 100%?#\xff.sock",
        ));
        let url = url_path(path);
        assert_eq!(url, "/run/user%201/docker%20100%25%3F%23%FF.sock");
        let back: Vec<u8> = percent_encoding::percent_decode_str(&url).collect();
        assert_eq!(back, path.as_os_str().as_bytes());
    }
}
