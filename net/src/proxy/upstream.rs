//! The upstream proxy and the secret ferry holds for it.
//!
//! An upstream is `http://[USER@]HOST:PORT`, or `https://` for one ferry speaks TLS to
//! ([`super::tls`]). The user may sit in the URL, the password never
//! does: a command line is readable by every local user (`ps`, `/proc/PID/cmdline`), so the
//! secret comes from a file only its owner can read (`--proxy-credentials FILE`) or from
//! ferry's environment (`FERRY_PROXY_PASSWORD`). [`Secret`] prints as `***` in every `Debug`
//! and `Display`, so no log line, `/proxy` or `/stats` answer can carry it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The environment variable a secret may come from instead of a file.
pub const SECRET_ENV: &str = "FERRY_PROXY_PASSWORD";

/// An upstream proxy: `http://[USER@]HOST:PORT` (or `HOST:PORT`), or `https://...`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// Whether ferry speaks TLS to it (`https://`).
    pub tls: bool,
    /// Its host name or address.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The user ferry authenticates as, when the upstream asks (percent-decoded, so
    /// `DOMAIN%5Cuser` is `DOMAIN\user`).
    pub user: Option<String>,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.tls { "https://" } else { "http://" })?;
        if let Some(u) = &self.user {
            write!(f, "{}@", percent_encode(u))?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for Upstream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // The value is echoed without any password in it.
        let shown = match s.rsplit_once('@') {
            Some((cred, host)) if cred.contains(':') => {
                format!("{}:***@{host}", &cred[..cred.rfind(':').unwrap_or(0)])
            }
            _ => s.to_string(),
        };
        let bad = |why: &str| {
            format!("bad upstream proxy {shown:?}: {why}; give it as http://HOST:PORT or https://HOST:PORT, e.g. http://proxy.example:3128")
        };
        let (tls, rest) = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
            Some(_) => return Err(bad("only http:// and https:// proxies are supported")),
            None => (false, s),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (user, rest) = match rest.rsplit_once('@') {
            Some((u, _)) if u.contains(':') => {
                return Err(bad(&format!(
                    "a password in the URL would show in `ps`; put it in a file for --proxy-credentials, or in {SECRET_ENV}"
                )))
            }
            Some(("", _)) => return Err(bad("the user before @ is empty")),
            Some((u, r)) => (
                Some(percent_decode(u).ok_or_else(|| bad("the user is not valid percent-encoded UTF-8"))?),
                r,
            ),
            None => (None, rest),
        };
        if rest.contains('/') {
            return Err(bad("a proxy address has no path"));
        }
        let (host, port) =
            super::request::split_host_port(rest).ok_or_else(|| bad("it needs a port"))?;
        if host.is_empty() {
            return Err(bad("it needs a host"));
        }
        Ok(Upstream {
            tls,
            host,
            port,
            user,
        })
    }
}

/// A password, which never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The password itself, for building a credential.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads the secret from `path` (its first line), refusing a file that users other
    /// than its owner may read, or, with no path, from [`SECRET_ENV`]; `None` when neither
    /// is there.
    pub fn load(path: Option<&Path>) -> Result<Option<Secret>, String> {
        let Some(path) = path else {
            return Ok(std::env::var(SECRET_ENV)
                .ok()
                .filter(|s| !s.is_empty())
                .map(Secret));
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            format!("cannot read the proxy credentials file {}: {e}; give a file that holds the upstream proxy's password", path.display())
        })?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "the proxy credentials file {} has mode {:o}, so other users can read the password; run `chmod 600 {}`",
                path.display(),
                meta.mode() & 0o777,
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the proxy credentials file {}: {e}; it must be a text file holding the password",
                path.display()
            )
        })?;
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if line.is_empty() {
            return Err(format!(
                "the proxy credentials file {} is empty; write the upstream proxy's password on its first line",
                path.display()
            ));
        }
        Ok(Some(Secret(line.to_string())))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_upstreams() {
        let u: Upstream = "http://proxy.example:3128".parse().unwrap();
        assert_eq!(
            u,
            Upstream {
                tls: false,
                host: "proxy.example".into(),
                port: 3128,
                user: None,
            }
        );
        assert_eq!(u.to_string(), "http://proxy.example:3128");
        let u: Upstream = "10.0.0.1:8080/".parse().unwrap();
        assert_eq!(u.port, 8080);
        let u: Upstream = "http://[::1]:3128".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.to_string().as_str()),
            ("::1", "http://[::1]:3128")
        );
        let u: Upstream = "http://CORP%5Calice@p:3128".parse().unwrap();
        assert_eq!(u.user.as_deref(), Some("CORP\\alice"));
        assert_eq!(u.to_string(), "http://CORP%5Calice@p:3128");
        let u: Upstream = "HTTPS://alice@p.example:443".parse().unwrap();
        assert!(u.tls);
        assert_eq!(u.to_string(), "https://alice@p.example:443");
        for bad in [
            "socks5://p:1",
            "http://p",
            "p:0",
            ":80",
            "http://p:1/x",
            "http://@p:1",
        ] {
            let e = bad.parse::<Upstream>().unwrap_err();
            assert!(e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
        let e = "http://u:pw@p:1".parse::<Upstream>().unwrap_err();
        assert!(
            e.contains("--proxy-credentials") && !e.contains("pw@"),
            "{e}"
        );
    }

    #[test]
    fn secrets_come_from_a_private_file_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\nignored\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::load(Some(&f)).unwrap_err();
        assert!(e.contains("chmod 600") && e.contains("644"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = Secret::load(Some(&f)).unwrap().unwrap();
        assert_eq!(s.expose(), "s3cret");
        assert_eq!(format!("{s} {s:?} {:?}", Some(&s)), "*** *** Some(***)");
        std::fs::write(&f, "\n").unwrap();
        assert!(Secret::load(Some(&f)).unwrap_err().contains("empty"));
        let e = Secret::load(Some(&dir.path().join("none"))).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }
}
