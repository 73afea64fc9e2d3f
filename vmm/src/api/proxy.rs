//! `/proxy`: the gateway HTTP proxy's settings (upstreams, bypass list) and counters.
//! The password ferry holds is never shown, only whether it holds one.

use ferry_net::proxy::{Bypass, Failure, Proxy, Upstream};
use log::info;
use serde_json::{json, Value};

use super::{error, json_body, no_net, Control};

/// The proxy's settings and counters.
pub fn proxy_json(p: &Proxy) -> Value {
    let st = p.stats();
    let set = p.settings();
    let errors: serde_json::Map<String, Value> = Failure::ALL
        .iter()
        .map(|f| (f.name().to_string(), json!(st.errors[*f as usize])))
        .collect();
    json!({
        "port": ferry_net::proxy::PORT,
        "upstream": set.http.as_ref().map(|u| u.to_string()),
        "https_upstream": set.https.as_ref().map(|u| u.to_string()),
        "bypass": set.bypass.to_string(),
        "pac": set.pac.as_ref().map(|p| p.source().to_string()),
        "credentials": p.has_secret(),
        "transparent": p.transparent(),
        "intercepted": st.intercepted,
        "requests": st.requests,
        "tunnels": st.tunnels,
        "failed": st.failed,
        "errors": errors,
        "active": st.active,
        "connections": st.connections,
    })
}

const SET_PROXY_HINT: &str = r#"send {"upstream": "http://HOST:PORT" | null}, {"https_upstream": ...} or {"bypass": "LIST"}, {"pac": "FILE|URL" | null} or {"transparent": true|false}, or several"#;

/// PUT /proxy {"upstream": "http://HOST:PORT" | null}.
pub(super) fn set_proxy(control: &Control, body: &[u8]) -> (u16, Value) {
    let Some(p) = &control.proxy else {
        return no_net("HTTP proxy");
    };
    let v = match json_body(body, SET_PROXY_HINT) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let upstream = |key: &str| -> std::result::Result<Option<Option<Upstream>>, (u16, Value)> {
        match v.get(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(Value::String(u)) => match u.parse::<Upstream>() {
                Ok(u) => Ok(Some(Some(u))),
                Err(e) => Err(error(
                    400,
                    e,
                    "give the upstream as http://[USER@]HOST:PORT or https://[USER@]HOST:PORT",
                )),
            },
            Some(_) => Err(error(
                400,
                format!("\"{key}\" is not a string or null"),
                SET_PROXY_HINT,
            )),
        }
    };
    let (both, https) = match (upstream("upstream"), upstream("https_upstream")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let bypass = match v.get("bypass") {
        None => None,
        Some(Value::String(b)) => match b.parse::<Bypass>() {
            Ok(b) => Some(b),
            Err(e) => return error(400, e, SET_PROXY_HINT),
        },
        Some(_) => return error(400, "\"bypass\" is not a string", SET_PROXY_HINT),
    };
    // A PAC script comes in the body ("pac_script", named by "pac"), since ferry's sandbox
    // reads few files; or ferry fetches a "pac" URL, or reads a "pac" path it may read.
    let pac = match (v.get("pac"), v.get("pac_script")) {
        (None, None) => None,
        (Some(Value::Null), None) => Some(None),
        (name, Some(Value::String(script))) => {
            let name = name.and_then(Value::as_str).unwrap_or("(PAC script)");
            match ferry_net::proxy::pac::Pac::from_script(name, script.clone()) {
                Ok(p) => Some(Some(std::sync::Arc::new(p))),
                Err(e) => return error(400, e, "send a script that defines FindProxyForURL(url, host)"),
            }
        }
        (Some(Value::String(spec)), None) => match ferry_net::proxy::pac::Pac::load(spec) {
            Ok(p) => Some(Some(std::sync::Arc::new(p))),
            Err(e) => {
                return error(
                    400,
                    e,
                    "give an http:// URL, or send the script itself as \"pac_script\" (`ferry ctl proxy pac FILE` does)",
                )
            }
        },
        _ => {
            return error(
                400,
                "\"pac\" is not a string or null, or \"pac_script\" is not a string",
                SET_PROXY_HINT,
            )
        }
    };
    let transparent = match v.get("transparent") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return error(400, "\"transparent\" is not true or false", SET_PROXY_HINT),
    };
    if both.is_none()
        && https.is_none()
        && bypass.is_none()
        && transparent.is_none()
        && pac.is_none()
    {
        return error(
            400,
            "the body has none of \"upstream\", \"https_upstream\", \"bypass\", \"pac\" and \"transparent\"",
            SET_PROXY_HINT,
        );
    }
    if let Some(on) = transparent {
        info!(
            "proxy: transparent mode {} for new guest connections",
            if on { "on" } else { "off" }
        );
        p.set_transparent(on);
    }
    let mut s = (*p.settings()).clone();
    if let Some(up) = both {
        match &up {
            Some(u) => info!("proxy: requests go through the upstream proxy {u} from now on"),
            None => info!("proxy: requests go straight to servers from now on"),
        }
        s.http = up.clone();
        s.https = up;
    }
    if let Some(up) = https {
        info!(
            "proxy: tunnels go {} from now on",
            up.as_ref().map_or_else(
                || "straight to servers".to_string(),
                |u| format!("through {u}")
            )
        );
        s.https = up;
    }
    if let Some(p) = pac {
        match &p {
            Some(p) => info!(
                "proxy: the PAC file {} chooses the proxies from now on",
                p.source()
            ),
            None => info!("proxy: no PAC file from now on"),
        }
        s.pac = p;
    }
    if let Some(b) = bypass {
        info!("proxy: bypass list {:?} from now on", b.to_string());
        s.bypass = b;
    }
    p.set_settings(s);
    (200, proxy_json(p))
}
