//! `/sockets`: forwarded UNIX sockets, host sockets whose clients become TCP connections to a
//! guest port (`--forward-socket`), added and removed while ferry runs.

use serde_json::{json, Value};

use super::{error, json_body, Control};
use ferry_net::ports::{SocketError, SocketInfo, SocketSpec};

const ADD_HINT: &str =
    r#"send {"spec": "/run/myapp/docker.sock=2375"} (options: ,mode=0660 ,group=GROUP)"#;

fn socket_json(i: &SocketInfo) -> Value {
    json!({
        "path": i.spec.path.display().to_string(),
        "guest_port": i.spec.guest_port,
        "mode": format!("{:04o}", i.spec.mode),
        "group": i.spec.group,
        "spec": i.spec.to_string(),
        "forwarded": i.counters.forwarded,
        "refused": i.counters.refused,
    })
}

fn no_net() -> (u16, Value) {
    error(
        409,
        "ferry serves no network device, so it cannot forward sockets",
        "start ferry serve with --net-socket PATH",
    )
}

/// GET /sockets.
pub(super) fn list(control: &Control) -> (u16, Value) {
    match &control.ports {
        Some(p) => (
            200,
            Value::Array(p.sockets().iter().map(socket_json).collect()),
        ),
        None => (200, json!([])),
    }
}

/// POST /sockets {"spec": "HOST_PATH=GUEST_PORT[,mode=…][,group=…]"}.
pub(super) fn add(control: &Control, body: &[u8]) -> (u16, Value) {
    let Some(ports) = &control.ports else {
        return no_net();
    };
    let v = match json_body(body, ADD_HINT) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(spec) = v.get("spec").and_then(Value::as_str) else {
        return error(400, "the body needs a \"spec\" string", ADD_HINT);
    };
    let spec = match SocketSpec::parse(spec, |g| crate::listen::parse_group("group=", g)) {
        Ok(s) => s,
        Err(e) => return error(400, e, ADD_HINT),
    };
    match ports.forward_socket(spec) {
        Ok(info) => (201, socket_json(&info)),
        Err(e @ SocketError::Exists(_)) => {
            error(409, e.to_string(), "DELETE /sockets/{path} removes it")
        }
        Err(e @ SocketError::Full) => error(409, e.to_string(), "DELETE /sockets/{path} frees room"),
        Err(e) => error(
            409,
            e.to_string(),
            "under the sandbox, ferry makes sockets only in the folders of the sockets it started with; put it there, or name it with --forward-socket at start",
        ),
    }
}

/// DELETE /sockets/{path}: the socket's path, its slashes as they are and any other byte
/// that a URL cannot hold (a space, `%`, `?`) percent-encoded, as `ferry ctl` sends it.
pub(super) fn remove(control: &Control, rest: &[&str]) -> (u16, Value) {
    use std::os::unix::ffi::OsStrExt;
    let Some(ports) = &control.ports else {
        return no_net();
    };
    let raw = format!("/{}", rest.join("/"));
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(&raw).collect();
    let path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
    match ports.unforward_socket(&path) {
        Some(_) => (204, Value::Null),
        None => error(
            404,
            format!("{} is not forwarded", path.display()),
            "GET /sockets lists them",
        ),
    }
}
