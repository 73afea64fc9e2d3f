//! Negotiate (RFC 4559): Kerberos through the host's GSSAPI, as curl and browsers do it.
//!
//! Ferry asks GSSAPI (MIT krb5's `libgssapi_krb5`) for a SPNEGO token naming the service
//! `HTTP@<upstream host>`. GSSAPI finds the credentials the way every other Kerberos client
//! on the host does: the ticket cache in `KRB5CCNAME` (or the default one), or a client
//! keytab in `KRB5_CLIENT_KTNAME` from which it gets tickets itself; `KRB5_CONFIG` names
//! the realm's KDCs. Ferry holds no password for it and never sees one.
//!
//! The token is one step: it carries the service ticket (an AP-REQ), and a proxy that takes
//! it authenticates the connection. Ferry asks for no mutual authentication, so the
//! upstream's answer token is not needed: the upstream is trusted as any `http://` proxy is.
//! The call may reach the KDC over the network (for the service ticket, the first time),
//! which is why it runs on the guest connection's own thread, never on the stack's.

use libgssapi::context::{ClientCtx, CtxFlags};
use libgssapi::name::Name;
use libgssapi::oid::{GSS_MECH_SPNEGO, GSS_NT_HOSTBASED_SERVICE};

/// The first (and only) Negotiate token for the proxy at `host`, or GSSAPI's reason why
/// there is none (no ticket, no KDC, an unknown service).
pub(super) fn token(host: &str) -> Result<Vec<u8>, String> {
    let service = format!("HTTP@{host}");
    let name = Name::new(service.as_bytes(), Some(&GSS_NT_HOSTBASED_SERVICE))
        .map_err(|e| format!("GSSAPI cannot name the service {service}: {e}"))?;
    let mut ctx = ClientCtx::new(None, name, CtxFlags::empty(), Some(&GSS_MECH_SPNEGO));
    match ctx.step(None, None) {
        Ok(Some(tok)) => Ok(tok.to_vec()),
        Ok(None) => Err(format!("GSSAPI gave no token for {service}")),
        Err(e) => Err(format!(
            "GSSAPI could not get a ticket for {service}: {}",
            one_line(&e.to_string())
        )),
    }
}

/// GSSAPI's messages may span lines; the guest's error and ferry's log take one.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs in a child process (see below), so that its environment is its own.
    #[test]
    fn no_ticket_child() {
        if std::env::var_os("FERRY_NEGOTIATE_CHILD").is_none() {
            return;
        }
        let e = token("proxy.example").unwrap_err();
        assert!(
            e.starts_with("GSSAPI could not get a ticket for HTTP@proxy.example: "),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn without_a_ticket_the_reason_is_gssapis() {
        // A ticket cache that does not exist and a configuration with no realm, in a child
        // process: setting the environment here would race the other tests' threads.
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("krb5.conf");
        std::fs::write(&conf, "[libdefaults]\n").unwrap();
        let _spawning = crate::SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "proxy::negotiate::tests::no_ticket_child",
                "--nocapture",
            ])
            .env("FERRY_NEGOTIATE_CHILD", "1")
            .env("KRB5CCNAME", format!("FILE:{}/none", dir.path().display()))
            .env("KRB5_CONFIG", &conf)
            .env_remove("KRB5_CLIENT_KTNAME")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn messages_take_one_line() {
        assert_eq!(
            one_line("No credentials\n  were supplied "),
            "No credentials were supplied"
        );
    }
}
