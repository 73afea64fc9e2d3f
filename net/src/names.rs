//! Names the gateway answers from the host: records set at run time, and the host's hosts
//! file.
//!
//! Theory of operation. A desktop tool wants its containers to see names of its own (gvproxy's
//! zones API), and the host's own `/etc/hosts` entries (a VPN client or a developer adds
//! them) should resolve in the guest as on the host. Both are looked up before a query goes
//! upstream: records set through the API first, then the hosts file. The hosts file is looked
//! at again at most every `RECHECK` (a stat) and re-read when it changed. One lock guards it
//! all: the API thread sets records, the net thread looks names up, and DNS queries are far
//! too rare for the lock to matter. Loopback addresses in the hosts file mean "this host": the
//! stack gives the guest the host alias instead.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the hosts file is looked at for changes.
const RECHECK: Duration = Duration::from_secs(2);
/// Records held at most, and addresses per name.
pub const MAX_RECORDS: usize = 1024;
const MAX_ADDRESSES: usize = 16;

/// A record that cannot be set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// Not a DNS name.
    #[error("{0:?} is not a DNS name: use letters, digits, '-' and '.', labels of 1 to 63 characters, 253 at most in all")]
    Name(String),
    /// Ferry's own zone.
    #[error("{0} is in ferry.internal, whose names ferry sets itself; pick a name outside it")]
    Reserved(String),
    /// Too many.
    #[error("{MAX_RECORDS} names, or {MAX_ADDRESSES} addresses for one name, are the most; delete some first")]
    Full,
}

/// `name` in the form lookups use (lowercase, no trailing dot), if it is a DNS name.
pub fn normalize(name: &str) -> Option<String> {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(n)
}

/// The names of a hosts file's text, each with its addresses in order.
pub fn parse_hosts(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut out: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
            continue;
        };
        for name in words.filter_map(normalize) {
            let v = out.entry(name).or_default();
            if !v.contains(&ip) && v.len() < MAX_ADDRESSES {
                v.push(ip);
            }
        }
    }
    out
}

struct Inner {
    records: BTreeMap<String, Vec<IpAddr>>,
    hosts_path: Option<PathBuf>,
    hosts: HashMap<String, Vec<IpAddr>>,
    stamp: Option<Stamp>,
    checked: Option<Instant>,
}

/// The records and the hosts file.
pub struct Names {
    inner: Mutex<Inner>,
}

/// What tells a followed file (the hosts file, a resolv.conf) changed without reading it:
/// inode (a replaced file or symlink target), size and mtime.
pub(crate) type Stamp = (u64, u64, i64, i64);

/// `p`'s stamp, following symlinks; None if it cannot be read.
pub(crate) fn stamp(p: &std::path::Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

impl Names {
    /// No records yet; the names of `hosts_file`, if given.
    pub fn new(hosts_file: Option<PathBuf>) -> Self {
        Names {
            inner: Mutex::new(Inner {
                records: BTreeMap::new(),
                hosts_path: hosts_file,
                hosts: HashMap::new(),
                stamp: None,
                checked: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `addr` to the record of `name`.
    pub fn add(&self, name: &str, addr: IpAddr) -> Result<String, NameError> {
        let n = normalize(name).ok_or_else(|| NameError::Name(name.to_string()))?;
        if n == "ferry.internal" || n.ends_with(".ferry.internal") {
            return Err(NameError::Reserved(n));
        }
        let mut i = self.lock();
        if !i.records.contains_key(&n) && i.records.len() >= MAX_RECORDS {
            return Err(NameError::Full);
        }
        let v = i.records.entry(n.clone()).or_default();
        if !v.contains(&addr) {
            if v.len() >= MAX_ADDRESSES {
                return Err(NameError::Full);
            }
            v.push(addr);
        }
        Ok(n)
    }

    /// Removes the record of `name` (every address); whether there was one.
    pub fn remove(&self, name: &str) -> bool {
        normalize(name).is_some_and(|n| self.lock().records.remove(&n).is_some())
    }

    /// The records, by name.
    pub fn records(&self) -> Vec<(String, Vec<IpAddr>)> {
        self.lock()
            .records
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The addresses of `name` (lowercase, as `dns` parses it): a record's, else the hosts
    /// file's (re-read first if it changed).
    pub fn lookup(&self, name: &str) -> Option<Vec<IpAddr>> {
        let mut i = self.lock();
        if let Some(v) = i.records.get(name) {
            return Some(v.clone());
        }
        let path = i.hosts_path.clone()?;
        if i.checked.is_none_or(|t| t.elapsed() >= RECHECK) {
            i.checked = Some(Instant::now());
            let now = stamp(&path);
            if now != i.stamp {
                i.stamp = now;
                i.hosts = std::fs::read_to_string(&path)
                    .map(|t| parse_hosts(&t))
                    .unwrap_or_default();
            }
        }
        i.hosts.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lines_give_every_name_its_addresses() {
        let h = parse_hosts(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost # comment\n\n# a comment\n\
             10.1.2.3  Build.Corp.Example build\nbogus line\n10.1.2.4 build.corp.example\n",
        );
        assert_eq!(
            h["localhost"],
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(h["build.corp.example"].len(), 2);
        assert!(h.contains_key("build"));
        assert!(!h.contains_key("line"));
    }

    #[test]
    fn records_come_before_the_hosts_file_which_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "10.0.0.1 db.test\n").unwrap();
        let n = Names::new(Some(hosts.clone()));
        assert_eq!(n.lookup("db.test"), Some(vec!["10.0.0.1".parse().unwrap()]));
        assert_eq!(
            n.add("DB.test.", "10.9.9.9".parse().unwrap()),
            Ok("db.test".into())
        );
        assert_eq!(n.lookup("db.test"), Some(vec!["10.9.9.9".parse().unwrap()]));
        assert!(n.remove("db.test"));
        assert!(!n.remove("db.test"));
        std::fs::write(&hosts, "10.0.0.2 db.test other.test\n").unwrap();
        n.lock().checked = Some(Instant::now() - RECHECK);
        assert_eq!(n.lookup("db.test"), Some(vec!["10.0.0.2".parse().unwrap()]));
        assert!(n.lookup("missing.test").is_none());
        for bad in ["", "a..b", "-a.b", "a b", &"x".repeat(64)] {
            assert!(
                matches!(
                    n.add(bad, "10.0.0.1".parse().unwrap()),
                    Err(NameError::Name(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            n.add("x.ferry.internal", "10.0.0.1".parse().unwrap()),
            Err(NameError::Reserved(_))
        ));
    }
}
