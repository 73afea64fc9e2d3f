//! Ferry's own credentials for the upstream proxy: which scheme, and the header.
//!
//! The upstream's `407` names the schemes it takes (`Proxy-Authenticate`); ferry answers
//! with the first it holds credentials for, as curl's `--proxy-anyauth` does. Once a scheme
//! has worked, the session sends it with every request from the start, so a request body is
//! sent once, not once per challenge. Today that scheme is Basic (RFC 7617); NTLM and
//! Negotiate, which take a handshake on the connection, are not built yet, and an upstream
//! that offers only those gets its 407 passed to the guest with a reason.

use base64::Engine;

use super::upstream::Secret;

/// A scheme ferry can answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Scheme {
    Basic,
}

impl Scheme {
    pub(super) fn name(self) -> &'static str {
        match self {
            Scheme::Basic => "Basic",
        }
    }
}

/// The schemes a `407` offers, lowercased, in its order.
pub(super) fn offered<'a>(challenges: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    challenges
        .filter_map(|c| {
            let c = String::from_utf8_lossy(c);
            c.split_whitespace()
                .next()
                .map(|s| s.trim_end_matches(',').to_ascii_lowercase())
        })
        .collect()
}

/// The scheme ferry answers an offer with, if it has one.
pub(super) fn choose(offered: &[String]) -> Option<Scheme> {
    offered
        .iter()
        .find_map(|s| (s == "basic").then_some(Scheme::Basic))
}

/// The `Proxy-Authorization` value for `scheme`.
pub(super) fn credential(scheme: Scheme, user: &str, secret: &Secret) -> String {
    match scheme {
        Scheme::Basic => {
            let raw = format!("{user}:{}", secret.expose());
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_the_schemes_it_holds() {
        let offers = offered([&b"Negotiate"[..], b"NTLM", b"Basic realm=\"Squid\""].into_iter());
        assert_eq!(offers, ["negotiate", "ntlm", "basic"]);
        assert_eq!(choose(&offers), Some(Scheme::Basic));
        assert_eq!(choose(&offers[..2]), None);
        assert_eq!(
            credential(Scheme::Basic, "Aladdin", &Secret::new("open sesame")),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }
}
