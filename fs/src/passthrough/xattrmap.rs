//! Extended attribute names that the guest and the host see differently (`xattrmap=`).
//!
//! A rule `GUEST:HOST` pairs two prefixes: the guest's attribute `GUEST…` is the host file's
//! `HOST…`. What it is for: a guest that labels its files (SELinux's `security.selinux`, file
//! capabilities' `security.capability`), on a share that ferry serves without host
//! privileges. With `security.:user.virtiofs.security.` the labels live in `user.` attributes
//! that a file's owner may set, and which the host's own security module neither reads nor
//! enforces. That host prefix is also where virtiofsd's `:map:security.:user.virtiofs.:` keeps
//! them, so a folder can move between the two servers with its labels.
//!
//! The mapping is one to one, so that what the guest sets is what it reads back and nothing
//! else:
//! - a guest name under a HOST prefix is not the guest's to reach (a guest could otherwise set
//!   `user.virtiofs.security.selinux` directly, and forge the label another name maps to);
//! - the host's own attributes under a GUEST prefix (the host's real SELinux label, say) are
//!   not shown: the guest sees only its own.
//!
//! The first rule whose guest prefix matches a name maps it. Host prefixes must start with
//! `user.` (ferry makes no other kind of attribute on the host for the guest, see `xattr`), and
//! no host prefix may start another, so that each host name has one guest name.

use std::fmt;
use std::str::FromStr;

/// One `GUEST:HOST` prefix pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XattrRule {
    guest: Vec<u8>,
    host: Vec<u8>,
}

impl FromStr for XattrRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((guest, host)) = s.split_once(':') else {
            return Err(format!(
                "xattrmap={s}: give two prefixes, the guest's and the host's, as xattrmap=security.:user.virtiofs.security."
            ));
        };
        if guest.is_empty() || host.is_empty() || host.contains(':') {
            return Err(format!(
                "xattrmap={s}: give exactly two non-empty prefixes separated by ':', as xattrmap=security.:user.virtiofs.security."
            ));
        }
        if s.contains('\0') {
            return Err(format!("xattrmap={s}: an attribute name holds no NUL byte"));
        }
        if !host.starts_with("user.") || host == "user." {
            return Err(format!(
                "xattrmap={s}: the host prefix must start with user. and name a part of it (ferry keeps the guest's attributes in user. ones, which need no privilege on the host)"
            ));
        }
        Ok(XattrRule {
            guest: guest.as_bytes().to_vec(),
            host: host.as_bytes().to_vec(),
        })
    }
}

impl fmt::Display for XattrRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            String::from_utf8_lossy(&self.guest),
            String::from_utf8_lossy(&self.host)
        )
    }
}

/// A share's rules, in order. Empty: every name is the same on both sides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XattrMap {
    rules: Vec<XattrRule>,
}

/// What a guest name is on the host.
#[derive(Debug, PartialEq, Eq)]
pub enum HostName<'a> {
    /// The same name.
    Same(&'a [u8]),
    /// A mapped one.
    Mapped(Vec<u8>),
    /// None: the name is under a host prefix, which the guest reaches only by its mapped name.
    Reserved,
}

impl XattrMap {
    /// The map of `rules`, refused when one host prefix starts another.
    pub fn new(rules: Vec<XattrRule>) -> Result<Self, String> {
        for (i, a) in rules.iter().enumerate() {
            for b in &rules[i + 1..] {
                if a.host.starts_with(&b.host) || b.host.starts_with(&a.host) {
                    return Err(format!(
                        "xattrmap={a} and xattrmap={b}: one host prefix starts the other, so a host attribute would have two guest names; give them host prefixes apart"
                    ));
                }
            }
        }
        Ok(XattrMap { rules })
    }

    /// Whether there is no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The host's name for the guest's attribute `name`.
    pub fn to_host<'a>(&self, name: &'a [u8]) -> HostName<'a> {
        if let Some(r) = self.rules.iter().find(|r| name.starts_with(&r.guest)) {
            let mut host = r.host.clone();
            host.extend_from_slice(&name[r.guest.len()..]);
            return HostName::Mapped(host);
        }
        if self.rules.iter().any(|r| name.starts_with(&r.host)) {
            return HostName::Reserved;
        }
        HostName::Same(name)
    }

    /// The guest's name for the host attribute `name`, or `None` when the guest does not see
    /// it.
    pub fn to_guest(&self, name: &[u8]) -> Option<Vec<u8>> {
        if let Some(r) = self.rules.iter().find(|r| name.starts_with(&r.host)) {
            let mut guest = r.guest.clone();
            guest.extend_from_slice(&name[r.host.len()..]);
            return Some(guest);
        }
        if self.rules.iter().any(|r| name.starts_with(&r.guest)) {
            return None;
        }
        Some(name.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rules: &[&str]) -> XattrMap {
        XattrMap::new(rules.iter().map(|r| r.parse().unwrap()).collect()).unwrap()
    }

    #[test]
    fn labels_live_under_the_host_prefix() {
        let m = map(&["security.:user.virtiofs.security."]);
        assert_eq!(
            m.to_host(b"security.selinux"),
            HostName::Mapped(b"user.virtiofs.security.selinux".to_vec())
        );
        assert_eq!(
            m.to_guest(b"user.virtiofs.security.selinux").as_deref(),
            Some(&b"security.selinux"[..])
        );
        assert_eq!(m.to_host(b"user.color"), HostName::Same(b"user.color"));
        assert_eq!(
            m.to_guest(b"user.color").as_deref(),
            Some(&b"user.color"[..])
        );
    }

    #[test]
    fn the_guest_cannot_reach_mapped_names_directly_nor_see_the_hosts_labels() {
        let m = map(&["security.:user.virtiofs.security."]);
        assert_eq!(
            m.to_host(b"user.virtiofs.security.selinux"),
            HostName::Reserved
        );
        assert_eq!(m.to_guest(b"security.selinux"), None);
    }

    #[test]
    fn every_name_round_trips() {
        let m = map(&[
            "security.:user.virtiofs.security.",
            "trusted.:user.virtiofs.trusted.",
            "user.:user.guest.",
        ]);
        for name in [
            &b"security.selinux"[..],
            b"security.capability",
            b"trusted.overlay.opaque",
            b"user.color",
            b"user.guest.x",
            b"system.posix_acl_access",
        ] {
            let host = match m.to_host(name) {
                HostName::Same(h) => h.to_vec(),
                HostName::Mapped(h) => h,
                HostName::Reserved => panic!("{name:?} reserved"),
            };
            assert_eq!(m.to_guest(&host).as_deref(), Some(name), "{name:?}");
        }
        // The first rule whose guest prefix matches wins: user.guest.x is the guest's own.
        assert_eq!(
            m.to_host(b"user.guest.x"),
            HostName::Mapped(b"user.guest.guest.x".to_vec())
        );
    }

    #[test]
    fn bad_rules_are_refused_with_what_to_give() {
        for bad in [
            "security.",
            ":user.x.",
            "security.:",
            "security.:trusted.x.",
            "security.:user.",
            "a:b:c",
        ] {
            let e = bad.parse::<XattrRule>().unwrap_err();
            assert!(e.contains("xattrmap="), "{e}");
        }
        let nested = ["a.:user.x.", "b.:user.x.y."]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        assert!(XattrMap::new(nested).unwrap_err().contains("host prefix"));
    }
}
