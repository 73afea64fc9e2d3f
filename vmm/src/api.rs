//! The control API: HTTP/1.1 and JSON on a UNIX socket (mode 0600), served by the epoll
//! server in [`http`] on a thread of its own. Every endpoint is documented in docs/api.md.
//!
//! ```text
//! GET    /health                               {"status":"ok",...}
//! GET    /ports                                [port, ...]
//! POST   /ports        {"spec":"8080:80"}      201 port | 400 | 409
//! DELETE /ports/{proto}/{bind_ip}/{host_port}  204 | 400 | 404
//! GET    /stats                                {"net":{...},"fs":[...],"flows":[...]}
//! GET    /flows?proto=&port=&remote=           [flow, ...]
//! GET    /metrics                              the Prometheus text format
//! GET    /events                               newline-delimited JSON, as events happen
//! GET    /pcap?proto=&host=&port=&count=&bytes= the live link, in the libpcap format
//! GET    /proxy                                {"upstream":...,"requests":...}
//! PUT    /proxy        {"upstream":URL|null}   200 proxy | 400
//! GET    /rules                                {"rules":[rule, ...],"default":{...},"default_in":{...}}
//! POST   /rules        {"spec":"drop,to=10.0.0.0/8","position":1}   201 rule | 400 | 409
//! POST   /rules/zero                           200 {"rules":...} (every counter back to 0)
//! DELETE /rules/{id}                           204 | 400 | 404
//! GET    /shares                               [share, ...]
//! POST   /shares       {"dir":DIR,...} + fd    201 share | 400 | 403 | 409   (the listening
//!                      socket comes with the request as SCM_RIGHTS: `ferry virtiofsd`)
//! DELETE /shares/{tag}                         204 | 404 | 409
//! GET    /sockets                              [socket, ...]
//! POST   /sockets      {"spec":"/run/x.sock=2375"}  201 socket | 400 | 409
//! DELETE /sockets/{path}                       204 | 404   (the socket's absolute path)
//! ```
//! Errors are `{"error": "...", "hint": "..."}` with the status that fits: 400 for malformed
//! specs and JSON, 404 for no such port, 405 for a method an endpoint does not take, 409 when
//! the host port is in use or published already, or the ports or rules are at their cap.
//! Requests the HTTP layer refuses (framing, sizes) have the same shape; see [`http`].

mod capture;
mod dns;
mod events;
mod flows;
mod http;
mod metrics;
mod proxy;
mod sockets;

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use ferry_devices::VhostUserNetBackend;
use ferry_fs::abi::opcode;
use ferry_net::ports::{host_endpoint, PortInfo, PortKey, Ports};
use ferry_net::proxy::Proxy;
use ferry_net::rules::{Dir, RuleInfo, RuleSpec, Rules};
use ferry_net::{PortSpec, Protocol};
use log::info;
pub use proxy::proxy_json;
use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{Error, Result};

/// What the API reads and changes.
pub struct Control {
    /// Published ports (None: no net device).
    pub ports: Option<Arc<Ports>>,
    /// The bind address of specs that name none.
    pub default_bind: IpAddr,
    /// The net device.
    pub net: Option<Arc<VhostUserNetBackend>>,
    /// The HTTP(S) proxy on the gateway's port 3128 (None: no net device).
    pub proxy: Option<Arc<Proxy>>,
    /// The rules for the guest's flows and published ports' clients (None: no net device).
    pub rules: Option<Arc<Rules>>,
    /// The names the gateway's DNS answers from records and the hosts file (None: no net
    /// device).
    pub names: Option<Arc<ferry_net::names::Names>>,
    /// The file shares.
    pub shares: Arc<crate::shares::Shares>,
    /// When ferry started.
    pub started: Instant,
    /// The audit log, whose events `/events` follows.
    pub audit: Option<ferry_audit::Audit>,
}

/// A running API server; on drop its thread stops and its socket is removed.
pub struct Api {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Drop for Api {
    fn drop(&mut self) {
        if self.stop.write(1).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the API socket (mode 0600) and serves it on the `api` thread.
pub fn start(path: &Path, control: Control) -> Result<Api> {
    let listener = ferry_devices::bind_socket(path).map_err(|e| Error::Runtime(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        Error::Runtime(format!(
            "--api-socket {}: cannot make it private (mode 0600): {e}",
            path.display()
        ))
    })?;
    let cannot_serve = |e: std::io::Error| {
        Error::Runtime(format!(
            "--api-socket {}: cannot serve it: {e}",
            path.display()
        ))
    };
    let stop = EventFd::new(EFD_NONBLOCK).map_err(cannot_serve)?;
    let server = http::Server::new(
        listener,
        &stop,
        move |req: &http::Request, fds: &mut Vec<OwnedFd>| {
            let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
            match (req.method.as_str(), path.trim_end_matches('/')) {
                ("GET", "/metrics") => return (200, metrics::render(&control)),
                ("GET", "/events") => return events::follow(&control),
                ("GET", "/pcap") => return capture::capture(&control, query),
                _ => {}
            }
            let (status, body) = route(&control, &req.method, path, query, &req.body, fds);
            (status, body.into())
        },
    )
    .map_err(cannot_serve)?;
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || server.run())
        .map_err(|e| Error::Runtime(format!("cannot start the api thread: {e}")))?;
    info!("api: serving the control API on {}", path.display());
    Ok(Api {
        stop,
        thread: Some(thread),
        path: path.to_path_buf(),
    })
}

fn error(status: u16, msg: impl Into<String>, hint: impl Into<String>) -> (u16, Value) {
    (status, json!({"error": msg.into(), "hint": hint.into()}))
}

fn route(
    control: &Control,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    fds: &mut Vec<OwnedFd>,
) -> (u16, Value) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, &segments[..]) {
        ("GET", ["health"]) => (200, health(control)),
        ("GET", ["stats"]) => (200, stats(control)),
        ("GET", ["flows"]) => flows::list(control, query),
        ("GET", ["ports"]) => match &control.ports {
            Some(p) => (200, Value::Array(p.list().iter().map(port_json).collect())),
            None => (200, json!([])),
        },
        ("POST", ["ports"]) => publish(control, body),
        ("GET", ["proxy"]) => match &control.proxy {
            Some(p) => (200, proxy_json(p)),
            None => no_net("HTTP proxy"),
        },
        ("PUT", ["proxy"]) => proxy::set_proxy(control, body),
        ("GET", ["rules"]) => match &control.rules {
            Some(r) => (200, rules_json(r)),
            None => no_net("rules"),
        },
        ("POST", ["rules"]) => add_rule(control, body),
        ("POST", ["rules", "zero"]) => match &control.rules {
            Some(r) => {
                r.zero();
                info!("rules: counters set to 0");
                (200, rules_json(r))
            }
            None => no_net("rules"),
        },
        ("DELETE", ["rules", id]) => delete_rule(control, id),
        ("GET", ["dns", "records"]) => dns::list(control),
        ("POST", ["dns", "records"]) => dns::add(control, body),
        ("DELETE", ["dns", "records", name]) => dns::delete(control, name),
        (_, ["dns", "records"]) => error(
            405,
            "/dns/records takes GET or POST",
            "use GET to list, POST {\"name\": NAME, \"address\": ADDR} to add",
        ),
        (_, ["dns", "records", _]) => error(
            405,
            format!("{path} takes DELETE"),
            "use DELETE to remove the record",
        ),
        ("GET", ["sockets"]) => sockets::list(control),
        ("POST", ["sockets"]) => sockets::add(control, body),
        ("DELETE", ["sockets", rest @ ..]) if !rest.is_empty() => sockets::remove(control, rest),
        (_, ["sockets", ..]) => error(
            405,
            format!("{path} takes GET or POST (/sockets) or DELETE (/sockets/{{path}})"),
            "use GET to list, POST {\"spec\": SPEC} to add, DELETE /sockets/PATH to remove",
        ),
        ("GET", ["shares"]) => (200, shares_json(control)),
        ("POST", ["shares"]) => add_share(control, body, fds),
        ("DELETE", ["shares", tag]) => match control.shares.remove(tag) {
            Ok(()) => (204, Value::Null),
            Err(crate::shares::ShareError(status, e, hint)) => error(status, e, hint),
        },
        (_, ["shares"]) => error(
            405,
            "/shares takes GET or POST",
            "use GET to list, POST {\"dir\": DIR} with the listening socket to add",
        ),
        (_, ["shares", _]) => error(
            405,
            format!("{path} takes DELETE"),
            "use DELETE to remove the share",
        ),
        ("DELETE", ["ports", proto, bind, port]) => unpublish(control, proto, bind, port),
        (_, ["health"] | ["stats"] | ["flows"]) => {
            error(405, format!("{path} takes GET"), "use GET")
        }
        (_, ["ports"]) => error(
            405,
            "/ports takes GET or POST",
            "use GET to list, POST to publish",
        ),
        (_, ["proxy"]) => error(
            405,
            "/proxy takes GET or PUT",
            "use GET to show it, PUT {\"upstream\": URL or null} to change it",
        ),
        (_, ["rules"]) => error(
            405,
            "/rules takes GET or POST",
            "use GET to list, POST {\"spec\": SPEC} to add",
        ),
        (_, ["rules", "zero"]) => error(
            405,
            format!("{path} takes POST"),
            "use POST to set every counter to 0",
        ),
        (_, ["rules", _]) => error(
            405,
            format!("{path} takes DELETE"),
            "use DELETE to delete the rule",
        ),
        (_, ["ports", _, _, _]) => error(
            405,
            format!("{path} takes DELETE"),
            "use DELETE to unpublish",
        ),
        _ => error(
            404,
            format!("no endpoint {path}"),
            "see docs/api.md: /health, /ports, /ports/{proto}/{bind_ip}/{host_port}, /proxy, /rules, /rules/zero, /rules/{id}, /shares, /shares/{tag}, /stats",
        ),
    }
}

fn shares_json(control: &Control) -> Value {
    Value::Array(
        control
            .shares
            .list()
            .iter()
            .map(|(s, runtime, _)| {
                json!({
                    "tag": s.tag,
                    "dir": s.dir.display().to_string(),
                    "socket": s.socket.display().to_string(),
                    "readonly": s.readonly,
                    "cache": format!("{:?}", s.cache).to_ascii_lowercase(),
                    "runtime": runtime,
                })
            })
            .collect(),
    )
}

/// What `POST /shares` takes. `cache`, `uidmap`, `gidmap` and `xattrmap` as `--share` takes
/// them.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareRequest {
    dir: PathBuf,
    tag: Option<String>,
    #[serde(default)]
    readonly: bool,
    cache: Option<String>,
    #[serde(default)]
    writeback: bool,
    #[serde(default)]
    xattr: bool,
    #[serde(default)]
    trusted: bool,
    #[serde(default)]
    audit_files: bool,
    #[serde(default)]
    uidmap: Vec<String>,
    #[serde(default)]
    gidmap: Vec<String>,
    #[serde(default)]
    xattrmap: Vec<String>,
    #[serde(default)]
    posixacl: bool,
    #[serde(default)]
    seclabel: bool,
    #[serde(default)]
    threads: usize,
    poll: Option<u64>,
}

fn add_share(control: &Control, body: &[u8], fds: &mut Vec<OwnedFd>) -> (u16, Value) {
    let req: ShareRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                400,
                format!("not a share: {e}"),
                "send {\"dir\": DIR} and optionally tag, readonly, cache, writeback, xattr, trusted, uidmap, gidmap, xattrmap, posixacl, seclabel, threads, poll",
            )
        }
    };
    if fds.len() != 1 {
        return error(
            400,
            format!("the request came with {} file descriptors, not one", fds.len()),
            "send the share's listening socket with the request (SCM_RIGHTS), as ferry virtiofsd does",
        );
    }
    let bad = |e: Error| {
        error(
            400,
            e.to_string(),
            "see docs/serve.md for --share's options",
        )
    };
    let cache = match req
        .cache
        .as_deref()
        .map(str::parse::<ferry_fs::CachePolicy>)
    {
        None => Default::default(),
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            return error(
                400,
                format!("cache: {e}"),
                "use never, metadata, auto or always",
            )
        }
    };
    let opt = "POST /shares";
    let uidmap =
        match crate::config::parse_id_maps(opt, "uidmap", req.uidmap.iter().map(String::as_str)) {
            Ok(m) => m,
            Err(e) => return bad(e),
        };
    let gidmap =
        match crate::config::parse_id_maps(opt, "gidmap", req.gidmap.iter().map(String::as_str)) {
            Ok(m) => m,
            Err(e) => return bad(e),
        };
    let xattrmap =
        match crate::config::parse_xattr_map(opt, req.xattrmap.iter().map(String::as_str)) {
            Ok(m) => m,
            Err(e) => return bad(e),
        };
    if req.threads > crate::config::MAX_THREADS {
        return error(
            400,
            format!(
                "threads: {} is more than the {} threads a share may have",
                req.threads,
                crate::config::MAX_THREADS
            ),
            "give fewer threads, or 0 for none",
        );
    }
    if let Some(poll) = req.poll.filter(|&p| p > crate::config::MAX_POLL_US) {
        return error(
            400,
            format!(
                "poll: {poll} µs is more than the {} µs a share's worker may watch for a request",
                crate::config::MAX_POLL_US
            ),
            "give less, or 0 to never watch",
        );
    }
    let tag = match control.shares.free_tag(req.tag.as_deref()) {
        Ok(t) => t,
        Err(crate::shares::ShareError(status, e, hint)) => return error(status, e, hint),
    };
    let share = crate::config::ShareConfig {
        tag,
        dir: req.dir,
        socket: PathBuf::new(),
        readonly: req.readonly,
        cache,
        writeback: req.writeback,
        // As virtiofsd's --xattrmap, rules turn extended attributes on.
        noxattr: !req.xattr && xattrmap.is_empty() && !req.posixacl,
        trusted: req.trusted,
        client: false,
        devices: false,
        audit_files: req.audit_files,
        uidmap,
        gidmap,
        xattrmap,
        posixacl: req.posixacl,
        seclabel: req.seclabel,
        threads: req.threads,
        poll_us: req.poll.unwrap_or(crate::config::DEFAULT_POLL_US),
    };
    let tag = share.tag.clone();
    let fd = fds.remove(0);
    match control.shares.add(share, fd) {
        Ok(()) => {
            let list = shares_json(control);
            let me = list
                .as_array()
                .and_then(|a| a.iter().find(|s| s["tag"] == tag.as_str()).cloned())
                .unwrap_or(Value::Null);
            (201, me)
        }
        Err(crate::shares::ShareError(status, e, hint)) => error(status, e, hint),
    }
}

fn health(control: &Control) -> Value {
    json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "pid": crate::sandbox::host_pid(),
        "uptime_secs": control.started.elapsed().as_secs(),
        "net": control.net.is_some(),
        "guest_attached": control.ports.as_ref().is_some_and(|p| p.attached()),
        "shares": control.shares.list().iter().map(|(s, _, _)| s.tag.clone()).collect::<Vec<_>>(),
    })
}

/// A published port as JSON.
pub fn port_json(p: &PortInfo) -> Value {
    json!({
        "proto": p.spec.protocol.to_string(),
        "bind_ip": p.spec.bind.to_string(),
        "host_port": p.spec.host_port,
        "guest_port": p.spec.guest_port,
        "spec": p.spec.to_string(),
        "forwarded": p.counters.forwarded,
        "refused": p.counters.refused,
    })
}

fn publish(control: &Control, body: &[u8]) -> (u16, Value) {
    let Some(ports) = &control.ports else {
        return error(
            409,
            "ferry serves no network device, so it cannot publish ports",
            "start ferry serve with --net-socket PATH",
        );
    };
    let v = match json_body(
        body,
        r#"send {"spec": "[tcp|udp/][BIND_IP:]HOST_PORT:GUEST_PORT"}"#,
    ) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let specs = match spec_from_json(&v, control.default_bind) {
        Ok(s) => s,
        Err(e) => {
            return error(
                400,
                e,
                r#"send {"spec": "8080:80"} or {"proto": "tcp", "bind_ip": "0.0.0.0", "host_port": 8080, "guest_port": 80}"#,
            )
        }
    };
    // A range or list is published whole or not at all: the first port that fails undoes the
    // ones before it, and its error (Docker's message names the busy port) is the answer.
    let mut done = Vec::new();
    let mut failed = None;
    for spec in &specs {
        match ports.publish(*spec) {
            Ok(info) => done.push(info),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let Some(e) = failed else {
        return if done.len() == 1 {
            (201, port_json(&done[0]))
        } else {
            (201, Value::Array(done.iter().map(port_json).collect()))
        };
    };
    for d in &done {
        ports.unpublish(&PortKey {
            protocol: d.spec.protocol,
            bind: d.spec.bind,
            host_port: d.spec.host_port,
        });
    }
    // In use, published already, or MAX_PORTS published: each a conflict with the state.
    error(409, e.to_string(), e.hint())
}

/// The port specs of `{"spec": "..."}` (which may name ranges and lists) or of its fields.
fn spec_from_json(v: &Value, default_bind: IpAddr) -> std::result::Result<Vec<PortSpec>, String> {
    let obj = v
        .as_object()
        .ok_or("the body must be a JSON object".to_string())?;
    if let Some(s) = obj.get("spec") {
        let s = s.as_str().ok_or("\"spec\" must be a string")?;
        return PortSpec::parse_many_with_default(s, default_bind).map_err(|e| e.to_string());
    }
    let protocol = match obj.get("proto").map(|p| p.as_str()) {
        None => Protocol::Tcp,
        Some(Some("tcp")) => Protocol::Tcp,
        Some(Some("udp")) => Protocol::Udp,
        Some(_) => return Err("\"proto\" must be \"tcp\" or \"udp\"".into()),
    };
    let bind = match obj.get("bind_ip") {
        None => default_bind,
        Some(b) => b
            .as_str()
            .and_then(|b| b.parse::<IpAddr>().ok())
            .ok_or("\"bind_ip\" must be an IP address string")?,
    };
    let port = |name: &str| -> std::result::Result<u16, String> {
        obj.get(name)
            .ok_or(format!("\"{name}\" is missing"))?
            .as_u64()
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or(format!("\"{name}\" must be a number from 1 to 65535"))
    };
    Ok(vec![PortSpec {
        protocol,
        bind,
        host_port: port("host_port")?,
        guest_port: port("guest_port")?,
    }])
}

fn unpublish(control: &Control, proto: &str, bind: &str, port: &str) -> (u16, Value) {
    let hint = "DELETE /ports/{tcp|udp}/{bind_ip}/{host_port}, for example /ports/tcp/0.0.0.0/8080";
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => {
            return error(
                400,
                format!("protocol {proto:?}: expected tcp or udp"),
                hint,
            )
        }
    };
    let bind_ip = bind.trim_start_matches('[').trim_end_matches(']');
    let Ok(bind) = bind_ip.parse::<IpAddr>() else {
        return error(400, format!("{bind:?} is not an IP address"), hint);
    };
    let Some(host_port) = port.parse::<u16>().ok().filter(|p| *p != 0) else {
        return error(400, format!("port {port:?}: expected 1 to 65535"), hint);
    };
    let key = PortKey {
        protocol,
        bind,
        host_port,
    };
    let removed = control.ports.as_ref().and_then(|p| p.unpublish(&key));
    match removed {
        Some(_) => (204, Value::Null),
        None => error(
            404,
            format!(
                "port {} {} is not published",
                proto.to_uppercase(),
                host_endpoint(&PortSpec {
                    protocol,
                    bind,
                    host_port,
                    guest_port: host_port,
                })
            ),
            "GET /ports lists what is",
        ),
    }
}

/// The 404 for a net service (`what`: "HTTP proxy", "rules") when there is no net device.
fn no_net(what: &str) -> (u16, Value) {
    error(
        404,
        format!("no {what}: ferry serves no net device"),
        "start ferry with --net-socket PATH",
    )
}

/// The request body as JSON, or the 400 that says what to send (`hint`).
fn json_body(body: &[u8], hint: &str) -> std::result::Result<Value, (u16, Value)> {
    serde_json::from_slice(body).map_err(|e| error(400, format!("the body is not JSON: {e}"), hint))
}

/// A rule as JSON: `to` for an outbound rule's network, `from` for an inbound one's.
pub fn rule_json(r: &RuleInfo) -> Value {
    let mut v = json!({
        "id": r.id,
        "position": r.position,
        "spec": r.spec.to_string(),
        "action": r.spec.action.to_string(),
        "dir": r.spec.dir.to_string(),
        "proto": r.spec.proto.to_string(),
        "ports": r.spec.ports.map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") }),
        "packets": r.packets,
        "bytes": r.bytes,
    });
    let key = match r.spec.dir {
        Dir::Out => "to",
        Dir::In => "from",
    };
    v[key] = json!(format!("{}/{}", r.spec.net, r.spec.prefix));
    v
}

/// The rules in order, and the default policy's counters, outbound and inbound.
pub fn rules_json(rules: &Rules) -> Value {
    let (packets, bytes) = rules.default_counters(Dir::Out);
    let (packets_in, bytes_in) = rules.default_counters(Dir::In);
    json!({
        "rules": rules.list().iter().map(rule_json).collect::<Vec<_>>(),
        "default": {"action": "allow", "packets": packets, "bytes": bytes},
        "default_in": {"action": "allow", "packets": packets_in, "bytes": bytes_in},
    })
}

const ADD_RULE_HINT: &str = r#"send {"spec": "allow|reject|drop[,dir=out|in][,proto=tcp|udp|icmp][,to=ADDR[/LEN] (out)|,from=ADDR[/LEN] (in)][,port=N[-M]]"} and, to put it before others, "position": N (from 1)"#;

/// POST /rules {"spec": SPEC, "position": N}.
fn add_rule(control: &Control, body: &[u8]) -> (u16, Value) {
    let Some(rules) = &control.rules else {
        return no_net("rules");
    };
    let v = match json_body(body, ADD_RULE_HINT) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(spec) = v.get("spec").and_then(Value::as_str) else {
        return error(400, "the body has no \"spec\" string", ADD_RULE_HINT);
    };
    let spec = match spec.parse::<RuleSpec>() {
        Ok(s) => s,
        Err(e) => return error(400, e.to_string(), ADD_RULE_HINT),
    };
    let position = match v.get("position") {
        None | Some(Value::Null) => None,
        Some(p) => match p.as_u64().filter(|p| *p >= 1) {
            Some(p) => Some(p as usize),
            None => return error(400, "\"position\" must be a number from 1", ADD_RULE_HINT),
        },
    };
    match rules.add(spec, position) {
        Ok(r) => {
            info!("rules: added rule {} at {}: {}", r.id, r.position, r.spec);
            (201, rule_json(&r))
        }
        Err(e) => error(409, e.to_string(), "DELETE /rules/{id} frees room"),
    }
}

/// DELETE /rules/{id}.
fn delete_rule(control: &Control, id: &str) -> (u16, Value) {
    let Some(rules) = &control.rules else {
        return no_net("rules");
    };
    let Ok(id) = id.parse::<u64>() else {
        return error(
            400,
            format!("rule id {id:?}: expected a number"),
            "GET /rules lists the ids",
        );
    };
    match rules.remove(id) {
        Ok(r) => {
            info!("rules: deleted rule {}: {}", r.id, r.spec);
            (204, Value::Null)
        }
        Err(e) => error(404, e.to_string(), "GET /rules lists the ids"),
    }
}

/// One ring's positions, as `/stats` shows them.
fn ring_json(r: &ferry_devices::ring_state::RingState) -> Value {
    json!({
        "index": r.index,
        "ready": r.ready,
        "enabled": r.enabled,
        "size": r.size,
        "avail_idx": r.avail_idx,
        "next_avail": r.next_avail,
        "used_idx": r.used_idx,
        "next_used": r.next_used,
        "used_event": r.used_event,
        "avail_event": r.avail_event,
    })
}

fn stats(control: &Control) -> Value {
    let net = control.net.as_ref().map(|n| {
        let d = n.stats();
        let (s, flows) = n.stack_stats();
        let flows: Vec<Value> = flows
            .iter()
            .map(|f| {
                json!({
                    "proto": f.protocol,
                    "guest": f.guest.to_string(),
                    "remote": f.remote.to_string(),
                    "state": f.state,
                    "direction": if f.origin.inbound() { "in" } else { "out" },
                    "age_secs": f.age.as_secs(),
                })
            })
            .collect();
        json!({
            "guest_attached": control.ports.as_ref().is_some_and(|p| p.attached()),
            "dns_servers": n.dns_servers().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "tx_frames": d.tx_frames.load(Ordering::Relaxed),
            "tx_bytes": d.tx_bytes.load(Ordering::Relaxed),
            "tx_malformed": d.tx_malformed.load(Ordering::Relaxed),
            "rx_frames": d.rx_frames.load(Ordering::Relaxed),
            "rx_dropped_too_big": d.rx_dropped_too_big.load(Ordering::Relaxed),
            "rx_bytes": d.rx_bytes.load(Ordering::Relaxed),
            // Frames each way per queue pair (one entry per pair offered; a guest with one
            // pair uses the first).
            "queue_pairs": d
                .tx_frames_by_pair
                .iter()
                .zip(&d.rx_frames_by_pair)
                .map(|(t, r)| serde_json::json!({
                    "tx_frames": t.load(Ordering::Relaxed),
                    "rx_frames": r.load(Ordering::Relaxed),
                }))
                .collect::<Vec<_>>(),
            // Each ring's positions, the guest's and the device's (docs/api.md).
            "rings": n.ring_states().iter().map(ring_json).collect::<Vec<_>>(),
            "guest_memory_mib": n.guest_memory_mib(),
            "dropped": s.dropped_in,
            "dhcp_replies": s.dhcp_replies,
            "dns_replies": s.dns_replies,
            "tcp_flows": s.tcp_flows,
            "udp_flows": s.udp_flows + s.udp_published,
            "icmp_flows": s.icmp_flows,
            "tcp_refused": s.tcp_refused,
            "published_connections": s.published_connections,
            "flows": flows,
            "pcap": n.capture_stats().map(|c| json!({
                "path": c.path.display().to_string(),
                "frames": c.frames,
                "bytes": c.bytes,
            })),
        })
    });
    let fs: Vec<Value> = control
        .shares
        .list()
        .iter()
        .map(|(share, _, b)| {
            let tag = &share.tag;
            let server = b.server();
            let st = server.stats();
            let total: u64 = (0..=opcode::MAX + 1).map(|o| st.ops(o)).sum();
            // Requests by opcode, those the guest sent at least once.
            let ops: serde_json::Map<String, Value> = (0..=opcode::MAX + 1)
                .filter(|&o| st.ops(o) > 0)
                .map(|o| {
                    let name = opcode::name(o).unwrap_or("unknown");
                    (name.to_ascii_lowercase(), json!(st.ops(o)))
                })
                .collect();
            json!({
                "tag": tag,
                "requests": total,
                "reads": st.ops(opcode::READ),
                "writes": st.ops(opcode::WRITE),
                "lookups": st.ops(opcode::LOOKUP),
                "errors": st.errors(),
                "malformed": st.malformed(),
                "max_in_flight": st.max_in_flight(),
                "request_queues": b.requests_by_queue(),
                "guest_memory_mib": b.guest_memory_mib(),
                "nodes": server.fs().inode_count(),
                "open_files": server.fs().handle_count(),
                "ops": ops,
            })
        })
        .collect();
    json!({
        "uptime_secs": control.started.elapsed().as_secs(),
        "net": net,
        "fs": fs,
        "ports": control.ports.as_ref().map(|p| p.list().iter().map(port_json).collect::<Vec<_>>()).unwrap_or_default(),
        "proxy": control.proxy.as_ref().map(|p| proxy_json(p)),
        "audit": control.audit.as_ref().map(|a| {
            let s = a.stats();
            json!({
                "events": s.events,
                "written": s.written,
                "dropped": s.dropped,
                "dropped_followers": s.dropped_subscribers,
                "followers": s.subscribers,
            })
        }),
        "rules": control.rules.as_ref().map(|r| rules_json(r)),
    })
}
