//! `ferry virtiofsd`: a virtiofsd-compatible front end that hands its share to the running
//! `ferry serve`.
//!
//! Theory of operation: libvirt starts one file server per `<filesystem>` with `<binary
//! path=…>`: it binds the vhost-user socket itself, runs `BINARY --fd=N -o source=DIR[,…]`
//! (or, when the binary's JSON descriptor lists `separate-options`, `BINARY --fd=N
//! --shared-dir DIR [--cache …] [--xattr] …`), keeps the process as its handle and sends it
//! SIGTERM on `virsh destroy`. Serving the folder here would put that VM's file I/O in a second
//! process, which is what ferry exists to avoid. So this process only translates: it takes
//! both option syntaxes, sends the listening socket (SCM_RIGHTS) and the options to ferry
//! serve's control API (`POST /shares`), waits for SIGTERM or SIGINT, and then removes the
//! share (`DELETE /shares/TAG`). Without a running ferry serve it says so and how to start one,
//! and exits 1 (libvirt then reports that the file server did not start).
//!
//! Run as `ferry-virtiofsd` (a link to `ferry`), it is this command.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use log::{info, warn};
use serde_json::json;

use crate::config::{Error, Result};

/// What this front end prints for `--print-capabilities` (vhost-user's backend conventions):
/// libvirt reads `separate-options` and then passes virtiofsd's newer option syntax.
pub const CAPABILITIES: &str = r#"{"type": "fs", "features": ["separate-options"]}"#;

/// The options that matter, from either syntax.
#[derive(Debug, Default, PartialEq)]
pub struct Options {
    pub fd: Option<RawFd>,
    pub socket_path: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub tag: Option<String>,
    pub cache: Option<String>,
    pub xattr: bool,
    pub readonly: bool,
    pub writeback: bool,
    pub posix_acl: bool,
    /// `--security-label`: the guest's labels are set on what it makes.
    pub security_label: bool,
    /// `--xattrmap`, as `--share`'s `xattrmap=GUEST:HOST` rules.
    pub xattrmap: Vec<String>,
    /// `--thread-pool-size`: threads that answer the share's requests.
    pub threads: usize,
    pub uidmap: Vec<String>,
    pub gidmap: Vec<String>,
    pub api_socket: Option<PathBuf>,
    pub print_capabilities: bool,
    pub help: bool,
    /// Options taken and not acted on (ferry has its own sandbox and thread model), for the log.
    pub ignored: Vec<String>,
}

/// virtiofsd's options that ferry accepts and leaves to its own defaults: its sandbox,
/// seccomp, descriptor limit, logging, submount announcement, file handles.
const IGNORED_WITH_VALUE: &[&str] = &[
    "--rlimit-nofile",
    "--log-level",
    "--sandbox",
    "--seccomp",
    "--inode-file-handles",
    "--modcaps",
    "--translate-uid",
    "--translate-gid",
    "--migration-mode",
    "--migration-on-error",
];
const IGNORED_FLAGS: &[&str] = &[
    "-d",
    "-f",
    "--foreground",
    "--syslog",
    "--announce-submounts",
    "--no-announce-submounts",
    "--killpriv-v2",
    "--no-killpriv-v2",
    "--allow-direct-io",
    "--allow-mmap",
    "--preserve-noatime",
    "--no-readdirplus",
    "--writeback",
];

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// virtiofsd's `:namespace_id:host_id:count:` as `--share`'s `GUEST:HOST:COUNT`.
fn id_map(option: &str, v: &str) -> Result<String> {
    let parts: Vec<&str> = v.trim_matches(':').split(':').collect();
    match parts[..] {
        [g, h, n] if [g, h, n].iter().all(|p| p.parse::<u32>().is_ok()) => {
            Ok(format!("{g}:{h}:{n}"))
        }
        _ => Err(usage(format!(
            "{option}={v}: not :GUEST:HOST:COUNT: (for example :0:1000:1:)"
        ))),
    }
}

/// virtiofsd's `--xattrmap` rules as `--share`'s `xattrmap=GUEST:HOST` ones. A rule is
/// `<c>TYPE<c>SCOPE<c>KEY<c>PREPEND<c>` or `<c>map<c>KEY<c>PREPEND<c>`, any character `c` the
/// separator, rules one after another. ferry's rules rename a prefix both ways, so
/// `:map:K:P:` and `:prefix:all:K:P:` (the guest's `K…` is the host's `PK…`) become `K:PK`,
/// and `:ok:all:::` (the rest as they are) is what ferry does with names no rule covers.
/// Other rules (`bad`, `unsupported`, one-way scopes) have no ferry form: refused, named.
fn xattr_map(option: &str, v: &str) -> Result<Vec<String>> {
    let bad = |why: &str| {
        usage(format!(
            "{option}={v}: {why}; ferry takes :map:KEY:PREPEND:, :prefix:all:KEY:PREPEND: and :ok:all:::, or give ferry serve's share xattrmap=GUEST:HOST"
        ))
    };
    let mut out = Vec::new();
    let mut rest = v.trim_start();
    while let Some(sep) = rest.chars().next() {
        let mut fields = rest[sep.len_utf8()..].split(sep);
        let kind = fields.next().unwrap_or_default();
        let n = if kind == "map" { 2 } else { 3 };
        let f: Vec<&str> = fields.by_ref().take(n).collect();
        if f.len() < n {
            return Err(bad(
                "a rule ends early (each field ends with the separator)",
            ));
        }
        let used = sep.len_utf8() * (n + 2) + kind.len() + f.iter().map(|x| x.len()).sum::<usize>();
        rest = rest.get(used..).unwrap_or_default().trim_start();
        match (kind, &f[..]) {
            ("map", [key, prepend]) | ("prefix", ["all", key, prepend]) => {
                out.push(format!("{key}:{prepend}{key}"))
            }
            ("ok", ["all", "", ""]) => {}
            _ => {
                return Err(bad(&format!(
                    "the rule {kind} {} has no ferry form",
                    f.join(" ")
                )))
            }
        }
    }
    Ok(out)
}

/// The `-o` list: comma-separated, with a literal comma in a value written twice (as libvirt
/// escapes the folder's path).
fn split_o(list: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().unwrap().push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().unwrap().push(c);
        }
    }
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

fn apply_o(o: &mut Options, list: &str) -> Result<()> {
    for item in split_o(list) {
        match item.split_once('=') {
            Some(("source", v)) => o.dir = Some(PathBuf::from(v)),
            Some(("cache", v)) => o.cache = Some(v.to_string()),
            Some(("xattrmap", v)) => o.xattrmap.extend(xattr_map("-o xattrmap", v)?),
            Some(("sandbox" | "modcaps" | "timeout", _)) => o.ignored.push(item),
            None if item == "xattr" => o.xattr = true,
            None if item == "no_xattr" => o.xattr = false,
            None if item == "writeback" => o.writeback = true,
            None if item == "no_writeback" => o.writeback = false,
            None if item == "readonly" || item == "ro" => o.readonly = true,
            None if item == "posix_acl" => o.posix_acl = true,
            None if item == "no_posix_acl" => o.posix_acl = false,
            None if item == "security_label" => o.security_label = true,
            None if item == "no_security_label" => o.security_label = false,
            None if matches!(
                item.as_str(),
                "flock" | "no_flock" | "posix_lock" | "no_posix_lock" | "announce_submounts"
                    | "no_announce_submounts" | "allow_direct_io" | "no_allow_direct_io"
                    | "killpriv_v2" | "no_killpriv_v2" | "readdirplus" | "no_readdirplus"
            ) =>
            {
                o.ignored.push(item)
            }
            _ => {
                return Err(usage(format!(
                    "-o {item}: not an option ferry virtiofsd knows; it takes source=, cache=, xattr, no_xattr, writeback, readonly, posix_acl, security_label, xattrmap= and virtiofsd's locking and sandbox options"
                )))
            }
        }
    }
    Ok(())
}

/// Parses virtiofsd's command line, both syntaxes (`-o a=b,c` and `--long[=]value`).
pub fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        // The option's value: after '=', or the next argument.
        let mut value = |what: &str| -> Result<String> {
            if let Some(v) = &inline {
                return Ok(v.clone());
            }
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| usage(format!("{what} needs a value")))
        };
        match name {
            "--fd" => {
                let v = value("--fd")?;
                o.fd = Some(
                    v.parse()
                        .map_err(|_| usage(format!("--fd {v}: not a number")))?,
                );
            }
            "--socket-path" => o.socket_path = Some(PathBuf::from(value(name)?)),
            "--shared-dir" => o.dir = Some(PathBuf::from(value(name)?)),
            "--tag" => o.tag = Some(value(name)?),
            "--cache" => o.cache = Some(value(name)?),
            "--xattr" => o.xattr = true,
            "--readonly" => o.readonly = true,
            "--posix-acl" => o.posix_acl = true,
            "--thread-pool-size" => {
                let v = value(name)?;
                o.threads = v.parse().map_err(|_| {
                    usage(format!("--thread-pool-size {v}: not a number of threads"))
                })?;
            }
            "--no-posix-acl" => o.posix_acl = false,
            "--security-label" => o.security_label = true,
            "--xattrmap" => {
                let v = value(name)?;
                o.xattrmap.extend(xattr_map(name, &v)?);
            }
            "--uid-map" => {
                let v = value(name)?;
                o.uidmap.push(id_map(name, &v)?);
            }
            "--gid-map" => {
                let v = value(name)?;
                o.gidmap.push(id_map(name, &v)?);
            }
            "--api-socket" => o.api_socket = Some(PathBuf::from(value(name)?)),
            "--print-capabilities" => o.print_capabilities = true,
            "-h" | "--help" => o.help = true,
            "-o" => {
                let v = value("-o")?;
                apply_o(&mut o, &v)?;
            }
            _ if name.starts_with("-o") && name.len() > 2 => apply_o(&mut o, &name[2..])?,
            _ if IGNORED_WITH_VALUE.contains(&name) => {
                let v = value(name)?;
                o.ignored.push(format!("{name}={v}"));
            }
            _ if IGNORED_FLAGS.contains(&name) => {
                if name == "--writeback" {
                    o.writeback = true;
                } else {
                    o.ignored.push(a.clone());
                }
            }
            _ => {
                return Err(usage(format!(
                    "{a}: not an option ferry virtiofsd takes; see `ferry virtiofsd --help`"
                )))
            }
        }
        i += 1;
    }
    Ok(o)
}

const HELP: &str = "\
ferry virtiofsd: a virtiofsd-compatible front end (for libvirt's <binary>) that hands the
share to the running `ferry serve`, which serves it; this process stays until SIGTERM and then
removes the share.

  --fd=N | --socket-path=PATH        the vhost-user socket (inherited, listening; or bound here)
  --shared-dir DIR | -o source=DIR   the folder (under a --runtime-shares folder of ferry serve)
  --cache never|metadata|auto|always | -o cache=…
  --xattr | -o xattr                 extended attributes on (off by default, as virtiofsd)
  --readonly | -o readonly           refuse writes
  --posix-acl | -o posix_acl         POSIX ACLs, enforced by the guest (turns xattr on)
  --xattrmap RULES | -o xattrmap=…   rename attributes: :map:KEY:PREPEND: and
                                     :prefix:all:KEY:PREPEND: rules (turns xattr on)
  --security-label | -o security_label
                                     set the guest's labels on what it makes (needs an
                                     --xattrmap rule for security. to a user. name)
  --thread-pool-size N               threads that answer the share's requests (0: none)
  --uid-map=:GUEST:HOST:COUNT:  --gid-map=…
  --tag TAG                          the share's name in ferry (default: share<N>)
  --api-socket PATH                  ferry serve's control API [default: $FERRY_API_SOCKET,
                                     else /run/ferry/api.sock as root,
                                     $XDG_RUNTIME_DIR/ferry/api.sock otherwise]
  --print-capabilities               print the vhost-user capabilities JSON and exit
virtiofsd's sandbox, seccomp, thread-pool, logging and locking options are taken and left to
ferry serve's own settings.";

/// Where ferry serve's API is, unless `--api-socket` says.
fn default_api_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_API_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/ferry/api.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(d) => PathBuf::from(d).join("ferry/api.sock"),
        None => PathBuf::from("/run/ferry/api.sock"),
    }
}

/// Runs the front end with virtiofsd's arguments.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let o = parse(args)?;
    if o.print_capabilities {
        println!("{CAPABILITIES}");
        return Ok(ExitCode::SUCCESS);
    }
    if o.help {
        println!("{HELP}");
        return Ok(ExitCode::SUCCESS);
    }
    let dir = o
        .dir
        .clone()
        .ok_or_else(|| usage("no folder to share: give --shared-dir DIR (or -o source=DIR)"))?;
    // The listening socket: inherited, or bound here as virtiofsd's --socket-path does.
    let (fd, bound): (RawFd, Option<UnixListener>) = match (o.fd, &o.socket_path) {
        (Some(fd), _) => {
            crate::listen::adopt(&format!("--fd={fd}"), fd)?;
            (fd, None)
        }
        (None, Some(p)) => {
            let l = ferry_devices::bind_socket(p).map_err(|e| Error::Runtime(e.to_string()))?;
            (l.as_raw_fd(), Some(l))
        }
        (None, None) => {
            return Err(usage(
                "no vhost-user socket: give --fd=N (a listening socket) or --socket-path=PATH",
            ))
        }
    };
    for i in &o.ignored {
        info!("ferry virtiofsd: {i}: left to ferry serve's own settings");
    }
    let api = o.api_socket.clone().unwrap_or_else(default_api_socket);
    let body = json!({
        "dir": dir,
        "tag": o.tag,
        "cache": o.cache,
        "xattr": o.xattr,
        "readonly": o.readonly,
        "writeback": o.writeback,
        "posixacl": o.posix_acl,
        "seclabel": o.security_label,
        "xattrmap": o.xattrmap,
        "threads": o.threads,
        "uidmap": o.uidmap,
        "gidmap": o.gidmap,
    });
    signals_block()?;
    let (status, v) = crate::ctl::call_with_fd(&api, "POST", "/shares", Some(&body), Some(fd))
        .map_err(|e| {
            Error::Runtime(format!(
                "{e}\nhint: ferry virtiofsd hands its share to a running `ferry serve --api-socket {} --runtime-shares DIR`; start one (or name its socket with --api-socket or FERRY_API_SOCKET)",
                api.display()
            ))
        })?;
    if status != 201 {
        let msg = v["error"].as_str().unwrap_or("the share was refused");
        let hint = v["hint"].as_str().unwrap_or("");
        return Err(Error::Runtime(format!("{msg}\nhint: {hint}")));
    }
    let tag = v["tag"].as_str().unwrap_or_default().to_string();
    let pid = crate::ctl::call(&api, "GET", "/health", None)
        .ok()
        .and_then(|(_, h)| h["pid"].as_u64());
    info!(
        "ferry virtiofsd: {} is served as share {tag} by ferry serve (pid {}); waiting for SIGTERM",
        dir.display(),
        pid.map_or_else(|| "?".into(), |p| p.to_string())
    );
    let sig = crate::signals::wait_termination()
        .map_err(|e| Error::Runtime(format!("cannot wait for signals: {e}")))?;
    match crate::ctl::call(&api, "DELETE", &format!("/shares/{tag}"), None) {
        Ok((204, _)) => info!(
            "ferry virtiofsd: {}: share {tag} removed",
            crate::signals::name(sig)
        ),
        Ok((status, v)) => warn!(
            "ferry virtiofsd: removing share {tag}: {status} {}",
            v["error"].as_str().unwrap_or("")
        ),
        Err(e) => warn!("ferry virtiofsd: removing share {tag}: {e}"),
    }
    // A socket bound here (--socket-path) goes with this process, as virtiofsd's does.
    if let (Some(p), Some(_)) = (&o.socket_path, &bound) {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::SUCCESS)
}

fn signals_block() -> Result<()> {
    crate::signals::block_termination()
        .map_err(|e| Error::Runtime(format!("cannot block termination signals: {e}")))
}

/// The arguments as `ferry virtiofsd` takes them, when ferry runs as `ferry-virtiofsd` (or any
/// name ending in `virtiofsd`): libvirt's `<binary>` names one program, with no arguments.
pub fn as_alias(argv: &[String]) -> Option<Vec<String>> {
    let prog = std::path::Path::new(argv.first()?).file_name()?.to_str()?;
    (prog != "ferry" && prog.ends_with("virtiofsd")).then(|| argv[1..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn libvirt_9_syntax() {
        let o = parse(&args(&[
            "--fd=3",
            "-o",
            "source=/srv/a,,b,cache=always,sandbox=chroot,xattr,no_flock",
            "--thread-pool-size=4",
            "--uid-map=:0:1000:1:",
        ]))
        .unwrap();
        assert_eq!(o.fd, Some(3));
        assert_eq!(o.dir, Some(PathBuf::from("/srv/a,b")));
        assert_eq!(o.cache.as_deref(), Some("always"));
        assert!(o.xattr);
        assert_eq!(o.uidmap, vec!["0:1000:1"]);
        assert_eq!(o.threads, 4);
        assert_eq!(o.ignored.len(), 2);
    }

    #[test]
    fn separate_options_syntax() {
        let o = parse(&args(&[
            "--fd=5",
            "--shared-dir",
            "/srv/x",
            "--cache",
            "never",
            "--sandbox",
            "namespace",
            "--xattr",
            "--gid-map=:0:100:1:",
            "--log-level",
            "debug",
        ]))
        .unwrap();
        assert_eq!(o.fd, Some(5));
        assert_eq!(o.dir, Some(PathBuf::from("/srv/x")));
        assert_eq!(o.cache.as_deref(), Some("never"));
        assert!(o.xattr);
        assert_eq!(o.gidmap, vec!["0:100:1"]);
    }

    #[test]
    fn bad_options_say_which() {
        let e = parse(&args(&["--frobnicate"])).unwrap_err().to_string();
        assert!(e.contains("--frobnicate"), "{e}");
        let e = parse(&args(&["-o", "source=/a,bogus"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse(&args(&["--uid-map=0:1"])).unwrap_err().to_string();
        assert!(e.contains(":GUEST:HOST:COUNT:"), "{e}");
        assert!(parse(&args(&["--fd"])).is_err());
    }

    #[test]
    fn xattrmap_rules_become_prefix_rules() {
        let o = parse(&args(&[
            "--fd=3",
            "--xattrmap",
            ":map:security.:user.virtiofs.:",
            "--security-label",
        ]))
        .unwrap();
        assert_eq!(o.xattrmap, vec!["security.:user.virtiofs.security."]);
        assert!(o.security_label);
        let o = parse(&args(&[
            "-o",
            "xattrmap=/prefix/all/trusted./user.t./ /ok/all///,security_label",
        ]))
        .unwrap();
        assert_eq!(o.xattrmap, vec!["trusted.:user.t.trusted."]);
        assert!(o.security_label);
        for bad in [
            ":bad:all:::",
            ":prefix:client:a:b:",
            ":map:a",
            ":unsupported:all:x::",
        ] {
            let e = parse(&args(&["--xattrmap", bad])).unwrap_err().to_string();
            assert!(e.contains(":map:KEY:PREPEND:"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_alias_is_recognised() {
        assert_eq!(
            as_alias(&args(&["/usr/libexec/ferry-virtiofsd", "--fd=3"])),
            Some(args(&["--fd=3"]))
        );
        assert_eq!(as_alias(&args(&["ferry", "serve"])), None);
    }
}
