//! Ferry's own credentials for the upstream proxy: which scheme, and each step of it.
//!
//! The upstream's `407` names the schemes it takes (`Proxy-Authenticate`); ferry answers
//! with the strongest it can do, as curl's `--proxy-anyauth` does: Negotiate, then NTLM,
//! then Basic, each only if ferry can do it (a ticket for Negotiate, a password for the others).
//! - Negotiate (RFC 4559) is one step through the host's GSSAPI ([`super::negotiate`]): a
//!   Kerberos ticket authenticates the connection.
//! - Basic (RFC 7617) is one step: the credential goes with the request.
//! - NTLM (MS-NLMP, v2 responses) is a handshake on one connection: ferry sends a
//!   NEGOTIATE message, the upstream's next 407 carries its CHALLENGE, and ferry answers it
//!   with an AUTHENTICATE message; from then on that connection is authenticated, and the
//!   requests that follow on it carry nothing. The messages are built by the `ntlmclient`
//!   crate; ferry only carries them.
//!
//! Once a scheme has worked with an upstream, sessions start with it (Basic: the credential
//! on the first request; NTLM and Negotiate: their first token on each new connection), so a
//! request is sent once more, not twice. An upstream that offers only schemes ferry cannot
//! do gets its 407 passed to the guest, with a reason in ferry's log.

use base64::Engine;

use super::upstream::Secret;

/// A scheme ferry can answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Scheme {
    Basic,
    Ntlm,
    Negotiate,
}

impl Scheme {
    pub(super) fn name(self) -> &'static str {
        match self {
            Scheme::Basic => "Basic",
            Scheme::Ntlm => "NTLM",
            Scheme::Negotiate => "Negotiate",
        }
    }

    /// Whether the scheme authenticates the connection rather than each request.
    pub(super) fn per_connection(self) -> bool {
        matches!(self, Scheme::Ntlm | Scheme::Negotiate)
    }

    /// Whether the scheme needs the user and password ferry holds (Negotiate takes the
    /// host's Kerberos credentials instead).
    pub(super) fn needs_password(self) -> bool {
        self != Scheme::Negotiate
    }
}

/// One step of a scheme: the `Proxy-Authorization` value to send, and whether it is the
/// last (a 407 after it means the credentials were refused).
#[derive(Clone, Debug)]
pub(super) struct Step {
    pub scheme: Scheme,
    pub header: String,
    pub last: bool,
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

/// The schemes of an offer ferry knows, strongest first.
pub(super) fn choices(offered: &[String]) -> Vec<Scheme> {
    [Scheme::Negotiate, Scheme::Ntlm, Scheme::Basic]
        .into_iter()
        .filter(|s| offered.iter().any(|o| o.eq_ignore_ascii_case(s.name())))
        .collect()
}

/// `DOMAIN\user` (or `user@domain`, or a bare user) split for NTLM.
fn ntlm_credentials(user: &str, secret: &Secret) -> ntlmclient::Credentials {
    let (domain, username) = match user.split_once('\\') {
        Some((d, u)) => (d, u),
        None => match user.split_once('@') {
            Some((u, d)) => (d, u),
            None => ("", user),
        },
    };
    ntlmclient::Credentials {
        username: username.to_string(),
        password: secret.expose().to_string(),
        domain: domain.to_string(),
    }
}

/// The name ferry gives as its workstation in NTLM messages.
const WORKSTATION: &str = "FERRY";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The first step of `scheme` for the upstream proxy at `host`, with the user and password
/// `creds` for the schemes that take one ([`Scheme::needs_password`]).
pub(super) fn start(
    scheme: Scheme,
    host: &str,
    creds: Option<(&str, &Secret)>,
) -> Result<Step, String> {
    match scheme {
        Scheme::Negotiate => Ok(Step {
            scheme,
            header: format!("Negotiate {}", b64(&super::negotiate::token(host)?)),
            last: true,
        }),
        Scheme::Basic => {
            let (user, secret) = creds.ok_or("ferry holds no user and password for it")?;
            Ok(Step {
                scheme,
                header: format!(
                    "Basic {}",
                    b64(format!("{user}:{}", secret.expose()).as_bytes())
                ),
                last: true,
            })
        }
        Scheme::Ntlm => {
            let msg = ntlmclient::Message::Negotiate(ntlmclient::NegotiateMessage {
                flags: ntlmclient::Flags::NEGOTIATE_UNICODE
                    | ntlmclient::Flags::REQUEST_TARGET
                    | ntlmclient::Flags::NEGOTIATE_NTLM
                    | ntlmclient::Flags::NEGOTIATE_ALWAYS_SIGN
                    | ntlmclient::Flags::NEGOTIATE_NTLM2_KEY
                    | ntlmclient::Flags::NEGOTIATE_WORKSTATION_SUPPLIED,
                supplied_domain: String::new(),
                supplied_workstation: WORKSTATION.to_string(),
                os_version: Default::default(),
            });
            let bytes = msg
                .to_bytes()
                .map_err(|e| format!("cannot build the NTLM NEGOTIATE message: {e:?}"))?;
            Ok(Step {
                scheme,
                header: format!("NTLM {}", b64(&bytes)),
                last: false,
            })
        }
    }
}

/// The step after `sent`, from the upstream's 407 `challenges`.
pub(super) fn next<'a>(
    sent: &Step,
    challenges: impl Iterator<Item = &'a [u8]>,
    user: &str,
    secret: &Secret,
) -> Result<Step, String> {
    // NTLM is the only scheme with a second step.
    let token = challenges
        .filter_map(|c| {
            let c = std::str::from_utf8(c).ok()?.trim();
            let (scheme, token) = c.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("ntlm")
                .then(|| token.trim().to_string())
        })
        .next()
        .ok_or("the upstream did not send its NTLM CHALLENGE")?;
    debug_assert_eq!(sent.scheme, Scheme::Ntlm);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|e| format!("the upstream's NTLM CHALLENGE is not base64 ({e})"))?;
    let (server_challenge, target_info) = parse_challenge(&bytes)?;
    let creds = ntlm_credentials(user, secret);
    let response = ntlmclient::respond_challenge_ntlm_v2(
        server_challenge,
        target_info,
        ntlmclient::get_ntlm_time(),
        &creds,
    );
    let flags = ntlmclient::Flags::NEGOTIATE_UNICODE | ntlmclient::Flags::NEGOTIATE_NTLM;
    let bytes = response
        .to_message(&creds, WORKSTATION, flags)
        .to_bytes()
        .map_err(|e| format!("cannot build the NTLM AUTHENTICATE message: {e:?}"))?;
    Ok(Step {
        scheme: Scheme::Ntlm,
        header: format!("NTLM {}", b64(&bytes)),
        last: true,
    })
}

/// The server challenge and target information of an NTLM CHALLENGE message (MS-NLMP
/// 2.2.1.2). Read here rather than by `ntlmclient`, which takes only the full 56-byte form:
/// older servers (and squid's test helper) send the 32-byte form without target
/// information, which NTLMv2 then does without.
fn parse_challenge(m: &[u8]) -> Result<([u8; 8], &[u8]), String> {
    if m.len() < 32 || &m[..8] != b"NTLMSSP\0" || m[8..12] != 2u32.to_le_bytes() {
        return Err(format!(
            "the upstream's NTLM message ({} bytes) is not a CHALLENGE",
            m.len()
        ));
    }
    let mut challenge = [0u8; 8];
    challenge.copy_from_slice(&m[24..32]);
    let flags = u32::from_le_bytes([m[20], m[21], m[22], m[23]]);
    const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;
    if flags & NEGOTIATE_TARGET_INFO == 0 || m.len() < 48 {
        return Ok((challenge, &[]));
    }
    let len = usize::from(u16::from_le_bytes([m[40], m[41]]));
    let off = u32::from_le_bytes([m[44], m[45], m[46], m[47]]) as usize;
    let info = off
        .checked_add(len)
        .and_then(|end| m.get(off..end))
        .ok_or("the upstream's NTLM CHALLENGE points past its end")?;
    Ok((challenge, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_the_strongest_scheme_it_holds() {
        let offers = offered([&b"Basic realm=\"Squid\""[..], b"NTLM", b"Negotiate"].into_iter());
        assert_eq!(offers, ["basic", "ntlm", "negotiate"]);
        use Scheme::*;
        assert_eq!(choices(&offers), [Negotiate, Ntlm, Basic]);
        assert_eq!(choices(&offers[..1]), [Basic]);
        assert_eq!(choices(&["digest".to_string()]), []);
        let basic = start(Basic, "p", Some(("Aladdin", &Secret::new("open sesame")))).unwrap();
        assert_eq!(basic.header, "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(basic.last);
    }

    #[test]
    fn ntlm_takes_a_challenge_and_refuses_garbage() {
        let secret = Secret::new("pw");
        let t1 = start(Scheme::Ntlm, "p", Some(("CORP\\alice", &secret))).unwrap();
        assert!(
            t1.header.starts_with("NTLM TlRMTVNTUAAB") && !t1.last,
            "{}",
            t1.header
        );
        // A CHALLENGE as MS-NLMP 4.2.4.3 shapes it: no target name, no target info.
        let mut c = b"NTLMSSP\0\x02\0\0\0".to_vec();
        c.extend_from_slice(&[0, 0, 0, 0, 56, 0, 0, 0]); // target name: empty
        c.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // unicode, ntlm
        c.extend_from_slice(b"\x01\x23\x45\x67\x89\xab\xcd\xef"); // the challenge
        c.extend_from_slice(&[0; 8]); // reserved
        c.extend_from_slice(&[0, 0, 0, 0, 56, 0, 0, 0]); // target info: empty
        c.extend_from_slice(&[0; 8]); // version
        let header = format!("NTLM {}", b64(&c));
        let t3 = next(&t1, [header.as_bytes()].into_iter(), "CORP\\alice", &secret).unwrap();
        assert!(
            t3.header.starts_with("NTLM TlRMTVNTUAAD") && t3.last,
            "{}",
            t3.header
        );
        // The short, older form (no target information) is taken too.
        let header = format!("NTLM {}", b64(&c[..32]));
        assert!(next(&t1, [header.as_bytes()].into_iter(), "alice", &secret).is_ok());
        // Whatever an upstream sends, an error and never a panic.
        let mut seed = 0x1234_5678u32;
        for len in 0..400 {
            let mut junk = b"NTLMSSP\0\x02\0\0\0".to_vec();
            for _ in 0..len {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                junk.push((seed >> 16) as u8);
            }
            let h = format!("NTLM {}", b64(&junk));
            let _ = next(&t1, [h.as_bytes()].into_iter(), "alice", &secret);
        }
        for bad in [&b"NTLM !!!"[..], b"Basic realm=x", b"NTLM TlRMTVNTUAAB"] {
            assert!(next(&t1, [bad].into_iter(), "alice", &secret).is_err());
        }
    }
}
