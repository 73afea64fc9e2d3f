//! Shares: `--share tag=TAG,dir=DIR,socket=PATH[,OPTION]...` and the TOML file's `[[share]]`
//! tables turned into checked [`ShareConfig`]s, each error naming the share.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::path::PathBuf;

use ferry_fs::{CachePolicy, IdMap, IdMaps, XattrMap, XattrRule};
use serde::Deserialize;

use super::{check_socket_path, usage, Error, Result, MAX_SOCKET_PATH, MAX_TAG_LEN};

/// How long a share's worker watches for the next request after a reply unless `poll=` says
/// otherwise, in µs.
pub const DEFAULT_POLL_US: u64 = ferry_devices::vhu_fs::DEFAULT_POLL_WINDOW.as_micros() as u64;
/// The longest `poll=` takes: a watch of milliseconds costs more CPU than the wake-ups it saves.
pub const MAX_POLL_US: u64 = 10_000;
/// The most threads a share's pool may have.
pub const MAX_THREADS: usize = 64;

/// One virtio-fs share.
#[derive(Clone, Debug)]
pub struct ShareConfig {
    /// The tag the guest mounts.
    pub tag: String,
    /// The host directory served.
    pub dir: PathBuf,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Answer writes with EROFS.
    pub readonly: bool,
    /// Cache policy.
    pub cache: CachePolicy,
    /// Let the guest cache writes (FUSE writeback cache).
    pub writeback: bool,
    /// Answer the xattr requests with ENOSYS (virtiofsd's default).
    pub noxattr: bool,
    /// Pass owners and set-id bits the guest sets through to the host files.
    pub trusted: bool,
    /// Connect to `socket` (the frontend listens) instead of listening on it.
    pub client: bool,
    /// Let the guest make device nodes (a container's root file system); needs root.
    pub devices: bool,
    /// `audit=files`: the guest's changes to files go to the audit log.
    pub audit_files: bool,
    /// User ids the guest names differently from the host (`uidmap=GUEST:HOST[:COUNT]`, once
    /// per range).
    pub uidmap: IdMaps,
    /// Group ids the same way (`gidmap=`).
    pub gidmap: IdMaps,
    /// Attribute names the guest and the host see differently (`xattrmap=GUEST:HOST`, once
    /// per rule).
    pub xattrmap: XattrMap,
    /// POSIX ACLs, which the guest's kernel enforces (`posixacl`).
    pub posixacl: bool,
    /// The labels the guest's LSM gives what it makes are set as it is made (`seclabel`).
    pub seclabel: bool,
    /// Threads that answer the request queue (`threads=N`; 0: the queue's worker does).
    pub threads: usize,
    /// How long, in µs, the queue's worker watches for the guest's next request after a
    /// reply while requests come that close (`poll=US`; 0: never, it waits for the kick).
    pub poll_us: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileShare {
    tag: String,
    dir: PathBuf,
    socket: PathBuf,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    writeback: bool,
    #[serde(default)]
    noxattr: bool,
    #[serde(default)]
    trusted: bool,
    #[serde(default)]
    client: bool,
    #[serde(default)]
    devices: bool,
    #[serde(default)]
    posixacl: bool,
    #[serde(default)]
    seclabel: bool,
    #[serde(default)]
    threads: usize,
    poll: Option<u64>,
    audit: Option<String>,
    cache: Option<String>,
    #[serde(default)]
    uidmap: OneOrMany,
    #[serde(default)]
    gidmap: OneOrMany,
    #[serde(default)]
    xattrmap: OneOrMany,
}

/// A TOML value that is one string or a list of them (`uidmap = "0:1000"` or
/// `uidmap = ["0:1000", "1:100000:65536"]`).
#[derive(Debug, Default, Deserialize)]
#[serde(
    untagged,
    expecting = "uidmap and gidmap take a range \"GUEST:HOST[:COUNT]\" or a list of them, as uidmap = [\"0:1000\", \"1:100000:65536\"]"
)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn values(&self) -> &[String] {
        match self {
            OneOrMany::None => &[],
            OneOrMany::One(v) => std::slice::from_ref(v),
            OneOrMany::Many(v) => v,
        }
    }
}

impl TryFrom<FileShare> for ShareConfig {
    type Error = Error;

    fn try_from(s: FileShare) -> Result<Self> {
        let audit_files = match s.audit.as_deref() {
            None => false,
            Some("files") => true,
            Some(v) => {
                return Err(usage(format!(
                    "[[share]] {}: audit = \"{v}\": the one kind is \"files\"",
                    s.tag
                )))
            }
        };
        let cache = match s.cache {
            Some(c) => c
                .parse()
                .map_err(|e| usage(format!("--share tag={}: {e}", s.tag)))?,
            None => CachePolicy::default(),
        };
        let opt = format!("--share tag={}", s.tag);
        let map = |key: &str, v: &OneOrMany| {
            parse_id_maps(&opt, key, v.values().iter().map(String::as_str))
        };
        Ok(ShareConfig {
            uidmap: map("uidmap", &s.uidmap)?,
            gidmap: map("gidmap", &s.gidmap)?,
            xattrmap: parse_xattr_map(&opt, s.xattrmap.values().iter().map(String::as_str))?,
            tag: s.tag,
            dir: s.dir,
            socket: s.socket,
            readonly: s.readonly,
            cache,
            writeback: s.writeback,
            noxattr: s.noxattr,
            trusted: s.trusted,
            client: s.client,
            devices: s.devices,
            posixacl: s.posixacl,
            seclabel: s.seclabel,
            threads: s.threads,
            poll_us: s.poll.unwrap_or(DEFAULT_POLL_US),
            audit_files,
        })
    }
}

/// Parses the values of `uidmap=`/`gidmap=` (each `GUEST:HOST[:COUNT]`, one per range) for the
/// option `opt`.
pub(crate) fn parse_id_maps<'a>(
    opt: &str,
    key: &str,
    values: impl Iterator<Item = &'a str>,
) -> Result<IdMaps> {
    let mut maps = Vec::new();
    for v in values {
        maps.push(IdMap::parse(v).map_err(|why| {
            usage(format!(
                "{opt}: {key}={v}: {why}; for example {key}=0:1000 shows host id 1000 to the guest as 0, and the guest's 0 creates files as 1000"
            ))
        })?);
    }
    IdMaps::new(maps).map_err(|why| usage(format!("{opt}: {key}: {why}")))
}

/// Parses `--share tag=TAG,dir=DIR,socket=PATH[,readonly][,cache=POLICY][,writeback][,noxattr]
/// [,trusted][,devices][,posixacl][,seclabel][,uidmap=GUEST:HOST[:COUNT]][,gidmap=GUEST:HOST[:COUNT]]
/// [,xattrmap=GUEST:HOST][,threads=N][,poll=US]`.
pub(super) fn parse_share(spec: &str, handed: &mut HashMap<PathBuf, RawFd>) -> Result<ShareConfig> {
    let bad = |why: String| usage(format!("--share {spec}: {why}"));
    let (mut tag, mut dir, mut socket, mut cache) = (None, None, None, CachePolicy::default());
    let (mut readonly, mut writeback, mut noxattr, mut trusted) = (false, false, false, false);
    let mut client = false;
    let (mut devices, mut posixacl, mut seclabel, mut threads) = (false, false, false, 0);
    let mut audit_files = false;
    let mut poll_us = DEFAULT_POLL_US;
    let (mut uidmap, mut gidmap, mut xattrmap) = (Vec::new(), Vec::new(), Vec::new());
    let opt = format!("--share {spec}");
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("tag", v)) => tag = Some(v.to_string()),
            Some(("dir", v)) => dir = Some(PathBuf::from(v)),
            Some(("socket", v)) => socket = Some(PathBuf::from(v)),
            Some(("fd", v)) => {
                let fd = v.parse::<RawFd>().map_err(|_| {
                    bad(format!("fd={v}: not a file descriptor number"))
                })?;
                let path = crate::listen::adopt(&format!("--share {spec}"), fd)?;
                handed.insert(path.clone(), fd);
                socket = Some(path);
            }
            Some(("cache", v)) => cache = v.parse().map_err(bad)?,
            Some(("uidmap", v)) => uidmap.push(v),
            Some(("gidmap", v)) => gidmap.push(v),
            Some(("xattrmap", v)) => xattrmap.push(v),
            Some(("threads", v)) => {
                threads = v.parse().map_err(|_| {
                    bad(format!(
                        "threads={v}: not a number of threads; give 0 (no pool) to {MAX_THREADS}"
                    ))
                })?
            }
            Some(("poll", v)) => {
                poll_us = v.parse().map_err(|_| {
                    bad(format!(
                        "poll={v}: not a number of microseconds; give 0 (never watch) to {MAX_POLL_US}"
                    ))
                })?
            }
            Some(("audit", "files")) => audit_files = true,
            Some(("audit", v)) => {
                return Err(bad(format!(
                    "audit={v}: the one kind is audit=files (the guest's file changes go to the audit log)"
                )))
            }
            None if part == "readonly" => readonly = true,
            None if part == "writeback" => writeback = true,
            None if part == "noxattr" => noxattr = true,
            None if part == "trusted" => trusted = true,
            None if part == "client" => client = true,
            None if part == "devices" => devices = true,
            None if part == "posixacl" => posixacl = true,
            None if part == "seclabel" => seclabel = true,
            _ => {
                return Err(bad(format!(
                    "unknown part '{part}'; the known ones are tag=, dir=, socket=, fd=, cache=, uidmap=, gidmap=, xattrmap=, threads=, poll=, audit=files, readonly, writeback, noxattr, trusted, client, devices, posixacl and seclabel"
                )))
            }
        }
    }
    let missing = |what: &str| {
        bad(format!(
            "{what}= is missing; give tag=TAG,dir=DIR,socket=PATH (or fd=N for a socket already listening)"
        ))
    };
    Ok(ShareConfig {
        tag: tag.ok_or_else(|| missing("tag"))?,
        dir: dir.ok_or_else(|| missing("dir"))?,
        socket: socket.ok_or_else(|| missing("socket"))?,
        readonly,
        cache,
        writeback,
        noxattr,
        trusted,
        client,
        devices,
        posixacl,
        seclabel,
        threads,
        poll_us,
        audit_files,
        uidmap: parse_id_maps(&opt, "uidmap", uidmap.into_iter())?,
        gidmap: parse_id_maps(&opt, "gidmap", gidmap.into_iter())?,
        xattrmap: parse_xattr_map(&opt, xattrmap.into_iter())?,
    })
}

/// Parses `xattrmap=GUEST:HOST` rules, in order, for the option `opt` names.
pub(crate) fn parse_xattr_map<'a>(
    opt: &str,
    rules: impl Iterator<Item = &'a str>,
) -> Result<XattrMap> {
    let rules = rules
        .map(|r| r.parse::<XattrRule>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| usage(format!("{opt}: {e}")))?;
    XattrMap::new(rules).map_err(|e| usage(format!("{opt}: {e}")))
}

/// Whether `map` gives the guest's `security.` labels a host name (one under `user.`: the
/// map's rules take no other host prefix).
fn maps_labels(map: &XattrMap) -> bool {
    matches!(
        map.to_host(b"security.selinux"),
        ferry_fs::passthrough::HostName::Mapped(_)
    )
}

pub(super) fn check_share(s: &ShareConfig, handed: &HashMap<PathBuf, RawFd>) -> Result<()> {
    let opt = format!("--share tag={}", s.tag);
    // SAFETY: geteuid has no preconditions.
    if s.devices && unsafe { libc::geteuid() } != 0 {
        return Err(usage(format!(
            "{opt}: devices: making device nodes needs root (CAP_MKNOD); run ferry as root or leave the option out"
        )));
    }
    if s.threads > MAX_THREADS {
        return Err(usage(format!(
            "{opt}: threads={}: at most {MAX_THREADS} threads answer a share's requests; give fewer",
            s.threads
        )));
    }
    if s.poll_us > MAX_POLL_US {
        return Err(usage(format!(
            "{opt}: poll={}: the worker watches for at most {MAX_POLL_US} µs after a reply; give less, or 0 to never watch",
            s.poll_us
        )));
    }
    if s.noxattr && s.posixacl {
        return Err(usage(format!(
            "{opt}: posixacl keeps ACLs in extended attributes, which noxattr turns off; leave one of them out"
        )));
    }
    if s.seclabel && !maps_labels(&s.xattrmap) {
        return Err(usage(format!(
            "{opt}: seclabel: the guest's labels (security.selinux) must be kept under a host user. name, which ferry can set without privileges; add xattrmap=security.:user.virtiofs.security. (or another user. prefix)"
        )));
    }
    if s.noxattr && !s.xattrmap.is_empty() {
        return Err(usage(format!(
            "{opt}: xattrmap renames extended attributes, which noxattr turns off; leave one of them out"
        )));
    }
    if s.tag.is_empty() || s.tag.len() > MAX_TAG_LEN {
        return Err(usage(format!(
            "{opt}: a tag must be 1 to {MAX_TAG_LEN} bytes long"
        )));
    }
    if !s.dir.is_dir() {
        return Err(usage(format!(
            "{opt}: dir {} does not exist or is not a directory; create it or share another one",
            s.dir.display()
        )));
    }
    if handed.contains_key(&s.socket) {
        return Ok(());
    }
    if s.client {
        if s.socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(usage(format!(
                "{opt}: socket {}: the path is longer than the {MAX_SOCKET_PATH} bytes a UNIX socket address holds; use a shorter one",
                s.socket.display()
            )));
        }
        return Ok(());
    }
    check_socket_path(&format!("{opt}: socket"), &s.socket)
}
