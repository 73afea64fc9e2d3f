//! `/dns/records`: the names the gateway's DNS answers from records set at run time, the way
//! gvproxy's zones API lets a desktop tool give its containers names of its own.

use serde_json::{json, Value};

use super::{error, json_body, no_net, Control};

const ADD_HINT: &str =
    "POST {\"name\": \"db.myapp.test\", \"address\": \"10.0.0.5\"} (an IPv6 address makes an AAAA record)";

fn records_json(names: &ferry_net::names::Names) -> Value {
    Value::Array(
        names
            .records()
            .into_iter()
            .map(|(name, addrs)| {
                json!({
                    "name": name,
                    "addresses": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// GET /dns/records.
pub(super) fn list(control: &Control) -> (u16, Value) {
    match &control.names {
        Some(n) => (200, records_json(n)),
        None => no_net("DNS records"),
    }
}

/// POST /dns/records.
pub(super) fn add(control: &Control, body: &[u8]) -> (u16, Value) {
    let Some(names) = &control.names else {
        return no_net("DNS records");
    };
    let v = match json_body(body, ADD_HINT) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let (Some(name), Some(addr)) = (
        v.get("name").and_then(Value::as_str),
        v.get("address").and_then(Value::as_str),
    ) else {
        return error(
            400,
            "the body needs \"name\" and \"address\" strings",
            ADD_HINT,
        );
    };
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return error(400, format!("{addr:?} is not an IP address"), ADD_HINT);
    };
    match names.add(name, ip) {
        Ok(n) => {
            log::info!("dns: {n} -> {ip} (record set through the API)");
            (201, json!({ "name": n, "address": ip.to_string() }))
        }
        Err(e @ ferry_net::names::NameError::Full) => {
            error(409, e.to_string(), "DELETE /dns/records/{name} frees room")
        }
        Err(e) => error(400, e.to_string(), ADD_HINT),
    }
}

/// DELETE /dns/records/{name}.
pub(super) fn delete(control: &Control, name: &str) -> (u16, Value) {
    let Some(names) = &control.names else {
        return no_net("DNS records");
    };
    if names.remove(name) {
        log::info!("dns: record {name} deleted through the API");
        (204, Value::Null)
    } else {
        error(
            404,
            format!("no record for {name}"),
            "GET /dns/records lists them",
        )
    }
}
