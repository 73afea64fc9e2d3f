//! `ferry mount`: the guest's file server mounted on the host through /dev/fuse, exercised with
//! ordinary file system calls and checked against the shared directory itself.
//!
//! These tests need kernel FUSE and root (for the mount and for chown). Without /dev/fuse they
//! fail, saying so: they never pass by skipping.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_tests::xattr::{get_xattr, list_xattr, set_xattr};
use ferry_tests::{ferry_bin, tail, wait_for};

const DEV_FUSE: &str = "/dev/fuse";

/// Fails the test (never skips it) when the host has no FUSE device.
fn require_dev_fuse() {
    assert!(
        Path::new(DEV_FUSE).exists(),
        "{DEV_FUSE} does not exist, so `ferry mount` cannot be tested here: load the fuse \
         module (modprobe fuse) or, in a container, pass the device in (--device {DEV_FUSE})"
    );
}

/// Whether `/proc/self/mounts` lists a FUSE mount at `mnt`.
fn is_fuse_mounted(mnt: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    // Mount points are written with spaces and the like escaped; test paths have none.
    let want = mnt.to_string_lossy();
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == want && (f[2] == "fuse" || f[2].starts_with("fuse."))
    })
}

/// A running `ferry mount`. On drop (a failed test included) it is stopped and the mount is
/// removed, so no stale mount is left behind.
struct HostMount {
    child: Child,
    mnt: PathBuf,
    log: PathBuf,
}

impl HostMount {
    /// Runs `ferry mount --share SRC MNT EXTRA...` and waits until MNT is a FUSE mount.
    fn start(src: &Path, mnt: &Path, extra: &[&str]) -> Self {
        Self::start_limited(src, mnt, extra, None)
    }

    /// As [`Self::start`], with ferry's open-file limit set to `nofile`.
    fn start_limited(src: &Path, mnt: &Path, extra: &[&str], nofile: Option<u64>) -> Self {
        require_dev_fuse();
        let mnt = mnt.canonicalize().expect("the mount point exists");
        let log = mnt.with_extension("log");
        let err = File::create(&log).expect("create the ferry log");
        let mut cmd = Command::new(ferry_bin());
        if let Some(n) = nofile {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and `lim` lives in the closure.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd
            .arg("mount")
            .arg("--share")
            .arg(src)
            .args(extra)
            .arg(&mnt)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start ferry mount");
        let mut m = HostMount { child, mnt, log };
        let up = wait_for(Duration::from_secs(10), || {
            if is_fuse_mounted(&m.mnt) {
                return Some(true);
            }
            matches!(m.child.try_wait(), Ok(Some(_))).then_some(false)
        });
        if up != Some(true) {
            let status = m.child.try_wait().ok().flatten();
            panic!(
                "ferry mount did not mount {} within 10 s (exit status {status:?}); log:\n{}",
                m.mnt.display(),
                m.log_tail()
            );
        }
        m
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn log_tail(&self) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }

    /// Waits for ferry to exit; returns its exit code (None: it had to be killed).
    fn wait_exit(&mut self) -> Option<i32> {
        let status = wait_for(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten()
        });
        match status {
            Some(s) => s.code(),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                None
            }
        }
    }

    /// Checks that ferry exited 0 and the mount is gone.
    fn assert_clean_exit(&mut self, how: &str) {
        let code = self.wait_exit();
        assert_eq!(
            code,
            Some(0),
            "ferry mount did not exit 0 after {how}; log:\n{}",
            self.log_tail()
        );
        assert!(
            !is_fuse_mounted(&self.mnt),
            "{} is still mounted after {how}",
            self.mnt.display()
        );
    }

    /// Unmounts from outside, as a user would; ferry must notice and exit 0.
    fn unmount(mut self) {
        // Retried while busy: a child another test forks may hold a descriptor into the mount
        // for the moment between its fork and exec.
        let mut last = String::new();
        let done = wait_for(Duration::from_secs(5), || {
            let out = Command::new("umount")
                .arg(&self.mnt)
                .output()
                .expect("run umount");
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            out.status.success().then_some(())
        });
        assert!(
            done.is_some(),
            "umount {} failed: {last}",
            self.mnt.display()
        );
        self.assert_clean_exit("umount");
    }

    /// Stops ferry with SIGTERM; it must unmount and exit 0.
    fn terminate(mut self) {
        self.signal(libc::SIGTERM);
        self.assert_clean_exit("SIGTERM");
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory effects; the child is ours and not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGTERM);
            if self.wait_exit().is_none() {
                eprintln!("ferry mount ignored SIGTERM and was killed");
            }
        }
        if is_fuse_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A temporary folder holding `src` (the share) and `mnt` (the mount point). Declare it before
/// the `HostMount`, so the mount goes away before the folder is removed.
fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().expect("create a temporary folder");
    let src = tmp.path().join("src");
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    (tmp, src, mnt)
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            // xorshift: no repeating short cycle, so misplaced blocks show.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn files_round_trip_and_match_the_host() {
    let (_tmp, src, mnt) = dirs();
    let m = HostMount::start(&src, &mnt, &[]);

    // A 4 MiB file written through the mount reads back the same, there and on the host.
    let data = pattern(4 << 20);
    fs::write(m.path("big.bin"), &data).unwrap();
    let back = fs::read(m.path("big.bin")).unwrap();
    assert!(back == data, "4 MiB read back through the mount differs");
    let host = fs::read(src.join("big.bin")).unwrap();
    assert!(
        host == data,
        "4 MiB file on the host differs from what was written"
    );
    assert_eq!(fs::metadata(m.path("big.bin")).unwrap().len(), 4 << 20);

    // Reading at an offset.
    let mut f = File::open(m.path("big.bin")).unwrap();
    f.seek(SeekFrom::Start(1_000_003)).unwrap();
    let mut buf = vec![0u8; 70_000];
    f.read_exact(&mut buf).unwrap();
    assert!(buf == data[1_000_003..1_070_003]);
    drop(f);

    // Append.
    fs::write(m.path("log.txt"), b"one\n").unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.path("log.txt"))
        .unwrap();
    f.write_all(b"two\n").unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("log.txt")).unwrap(), b"one\ntwo\n");
    assert_eq!(fs::read(src.join("log.txt")).unwrap(), b"one\ntwo\n");

    // Truncate, down and up; and O_TRUNC on open.
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("big.bin"))
        .unwrap();
    f.set_len(10).unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("big.bin")).unwrap(), &data[..10]);
    assert_eq!(fs::metadata(src.join("big.bin")).unwrap().len(), 10);
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("big.bin"))
        .unwrap();
    f.set_len(4096).unwrap();
    drop(f);
    let grown = fs::read(m.path("big.bin")).unwrap();
    assert_eq!(grown.len(), 4096);
    assert!(grown[..10] == data[..10] && grown[10..].iter().all(|b| *b == 0));
    fs::write(m.path("big.bin"), b"short").unwrap();
    assert_eq!(fs::read(src.join("big.bin")).unwrap(), b"short");

    // A file the host writes is seen through the mount.
    fs::write(src.join("from-host.txt"), b"hello from the host").unwrap();
    assert_eq!(
        fs::read(m.path("from-host.txt")).unwrap(),
        b"hello from the host"
    );

    // Unlink.
    fs::remove_file(m.path("log.txt")).unwrap();
    assert!(!src.join("log.txt").exists());

    m.unmount();
}

#[test]
fn directories_renames_and_links() {
    let (_tmp, src, mnt) = dirs();
    let m = HostMount::start(&src, &mnt, &[]);

    // mkdir / rmdir.
    fs::create_dir(m.path("d")).unwrap();
    assert!(src.join("d").is_dir());
    fs::create_dir_all(m.path("d/e/f")).unwrap();
    assert!(src.join("d/e/f").is_dir());
    fs::remove_dir(m.path("d/e/f")).unwrap();
    assert!(!src.join("d/e/f").exists());
    let err = fs::remove_dir(m.path("d")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY), "{err}");

    // Rename a file within and across directories, and a directory.
    fs::write(m.path("a.txt"), b"A").unwrap();
    fs::rename(m.path("a.txt"), m.path("b.txt")).unwrap();
    assert!(!src.join("a.txt").exists());
    assert_eq!(fs::read(src.join("b.txt")).unwrap(), b"A");
    fs::rename(m.path("b.txt"), m.path("d/e/b.txt")).unwrap();
    assert_eq!(fs::read(m.path("d/e/b.txt")).unwrap(), b"A");
    fs::rename(m.path("d/e"), m.path("g")).unwrap();
    assert_eq!(fs::read(src.join("g/b.txt")).unwrap(), b"A");
    // Rename over an existing file replaces it.
    fs::write(m.path("c.txt"), b"C").unwrap();
    fs::rename(m.path("c.txt"), m.path("g/b.txt")).unwrap();
    assert_eq!(fs::read(m.path("g/b.txt")).unwrap(), b"C");

    // Hard link: one inode under two names, on both sides.
    fs::hard_link(m.path("g/b.txt"), m.path("hard.txt")).unwrap();
    let a = fs::metadata(m.path("g/b.txt")).unwrap();
    let b = fs::metadata(m.path("hard.txt")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard links show different inodes");
    assert_eq!(b.nlink(), 2);
    assert_eq!(
        fs::metadata(src.join("hard.txt")).unwrap().ino(),
        fs::metadata(src.join("g/b.txt")).unwrap().ino()
    );
    fs::write(m.path("hard.txt"), b"via the link").unwrap();
    assert_eq!(fs::read(m.path("g/b.txt")).unwrap(), b"via the link");

    // Symlink: created as given, read back as given, not followed by lstat.
    std::os::unix::fs::symlink("g/b.txt", m.path("sym")).unwrap();
    assert_eq!(
        fs::read_link(m.path("sym")).unwrap(),
        PathBuf::from("g/b.txt")
    );
    assert_eq!(
        fs::read_link(src.join("sym")).unwrap(),
        PathBuf::from("g/b.txt")
    );
    assert!(fs::symlink_metadata(m.path("sym"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(m.path("sym")).unwrap(), b"via the link");

    m.terminate();
}

#[test]
fn permissions_and_ownership() {
    let (_tmp, src, mnt) = dirs();
    let m = HostMount::start(&src, &mnt, &[]);

    fs::write(m.path("p.txt"), b"x").unwrap();
    fs::set_permissions(m.path("p.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&m.path("p.txt")), 0o640);
    assert_eq!(mode(&src.join("p.txt")), 0o640);

    // Ownership is emulated (the default): the mount shows the set-user-ID bit and the owner
    // it was given, the host file keeps root and no set-id bit, and the attribute that keeps
    // them is neither listed nor readable through the mount.
    // SAFETY: geteuid has no memory effects.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "these tests run as root (the mount needs it)");
    fs::set_permissions(m.path("p.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(mode(&m.path("p.txt")), 0o4755);
    assert_eq!(mode(&src.join("p.txt")), 0o755);
    std::os::unix::fs::chown(m.path("p.txt"), Some(1234), Some(5678)).unwrap();
    let st = fs::metadata(src.join("p.txt")).unwrap();
    assert_eq!((st.uid(), st.gid()), (0, 0));
    let st = fs::metadata(m.path("p.txt")).unwrap();
    assert_eq!((st.uid(), st.gid()), (1234, 5678));
    // A chown clears the set-user-ID bit of an executable, root's too, as on any Linux file
    // system (the kernel asks with FUSE_HANDLE_KILLPRIV_V2).
    assert_eq!(mode(&m.path("p.txt")), 0o755);
    // Group only.
    std::os::unix::fs::chown(m.path("p.txt"), None, Some(42)).unwrap();
    let st = fs::metadata(m.path("p.txt")).unwrap();
    assert_eq!((st.uid(), st.gid()), (1234, 42));
    let st = fs::metadata(src.join("p.txt")).unwrap();
    assert_eq!((st.uid(), st.gid()), (0, 0));
    fs::set_permissions(m.path("p.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
    let kept = get_xattr(&src.join("p.txt"), "user.containers.override_stat");
    assert_eq!(kept.as_deref(), Ok(&b"1234:42:04755:file"[..]));
    assert_eq!(
        get_xattr(&m.path("p.txt"), "user.containers.override_stat"),
        Err(libc::ENODATA)
    );
    assert!(!list_xattr(&m.path("p.txt")).contains(&"user.containers.override_stat".to_string()));
    assert_eq!(
        set_xattr(
            &m.path("p.txt"),
            "user.containers.override_stat",
            b"0:0:04755"
        ),
        Err(libc::EPERM)
    );

    // Times.
    let f = File::options().write(true).open(m.path("p.txt")).unwrap();
    let t = std::time::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    f.set_modified(t).unwrap();
    drop(f);
    assert_eq!(
        fs::metadata(src.join("p.txt")).unwrap().modified().unwrap(),
        t
    );
    assert_eq!(
        fs::metadata(m.path("p.txt")).unwrap().modified().unwrap(),
        t
    );

    m.unmount();
}

#[test]
fn readdir_lists_1000_entries() {
    let (_tmp, src, mnt) = dirs();
    let m = HostMount::start(&src, &mnt, &[]);

    fs::create_dir(m.path("many")).unwrap();
    for i in 0..500 {
        fs::write(m.path(&format!("many/mount-{i:04}")), i.to_string()).unwrap();
    }
    for i in 0..500 {
        fs::write(src.join(format!("many/host-{i:04}")), i.to_string()).unwrap();
    }
    let list = |d: &Path| {
        let mut v: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let through = list(&m.path("many"));
    assert_eq!(through.len(), 1000);
    assert_eq!(through, list(&src.join("many")));
    // Entries carry types without a stat.
    for e in fs::read_dir(m.path("many")).unwrap().take(5) {
        assert!(e.unwrap().file_type().unwrap().is_file());
    }
    // Listed entries are reachable, and a second listing is the same.
    assert_eq!(fs::read(m.path("many/host-0499")).unwrap(), b"499");
    assert_eq!(list(&m.path("many")), through);

    m.unmount();
}

#[test]
fn extended_attributes() {
    let (_tmp, src, mnt) = dirs();
    fs::write(src.join("probe"), b"").unwrap();
    if let Err(e) = set_xattr(&src.join("probe"), "user.probe", b"1") {
        if e == libc::EOPNOTSUPP {
            eprintln!(
                "skipped: the file system under {} has no user xattrs",
                src.display()
            );
            return;
        }
        panic!("setxattr on the host failed with errno {e}");
    }
    let m = HostMount::start(&src, &mnt, &[]);

    fs::write(m.path("x.txt"), b"x").unwrap();
    set_xattr(&m.path("x.txt"), "user.ferry", b"some value").expect("setxattr via the mount");
    assert_eq!(
        get_xattr(&m.path("x.txt"), "user.ferry").unwrap(),
        b"some value"
    );
    assert_eq!(
        get_xattr(&src.join("x.txt"), "user.ferry").unwrap(),
        b"some value",
        "the xattr did not reach the host file"
    );
    assert!(list_xattr(&m.path("x.txt")).contains(&"user.ferry".to_string()));
    assert_eq!(
        get_xattr(&m.path("x.txt"), "user.missing"),
        Err(libc::ENODATA)
    );
    // An xattr the host sets is seen through the mount.
    set_xattr(&src.join("x.txt"), "user.host", b"h").unwrap();
    assert_eq!(get_xattr(&m.path("x.txt"), "user.host").unwrap(), b"h");

    let (p, n) = (cpath(&m.path("x.txt")), CString::new("user.ferry").unwrap());
    // SAFETY: both strings are NUL-terminated.
    let r = unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) };
    assert_eq!(r, 0, "removexattr: {}", std::io::Error::last_os_error());
    assert_eq!(
        get_xattr(&src.join("x.txt"), "user.ferry"),
        Err(libc::ENODATA)
    );

    m.unmount();
}

#[test]
fn symlink_out_of_the_share_stays_a_symlink() {
    let (tmp, src, mnt) = dirs();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret.txt"), b"secret").unwrap();
    std::os::unix::fs::symlink(&outside, src.join("to-dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), src.join("to-file")).unwrap();
    std::os::unix::fs::symlink("../outside/secret.txt", src.join("relative")).unwrap();
    let m = HostMount::start(&src, &mnt, &[]);

    for (name, target) in [
        ("to-dir", outside.clone()),
        ("to-file", outside.join("secret.txt")),
        ("relative", PathBuf::from("../outside/secret.txt")),
    ] {
        let st = fs::symlink_metadata(m.path(name)).unwrap();
        assert!(
            st.file_type().is_symlink(),
            "{name}: the server followed the symlink (got {:?})",
            st.file_type()
        );
        assert_eq!(st.len(), target.as_os_str().len() as u64, "{name}: size");
        assert_eq!(fs::read_link(m.path(name)).unwrap(), target, "{name}");
        // Opening the link itself without following it is refused, as on a local file system.
        let err = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(m.path(name))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{name}: {err}");
    }
    // The directory listing reports them as symlinks too.
    let e = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name() == "to-dir")
        .unwrap();
    assert!(e.file_type().unwrap().is_symlink());
    // A DirEntry keeps its directory open, which would keep the mount busy.
    drop(e);
    // Replacing the link through the mount replaces the link, not what it points at.
    fs::remove_file(m.path("to-file")).unwrap();
    assert_eq!(fs::read(outside.join("secret.txt")).unwrap(), b"secret");
    assert!(fs::symlink_metadata(src.join("to-file")).is_err());

    m.unmount();
}

#[test]
fn readonly_mount_refuses_writes() {
    let (_tmp, src, mnt) = dirs();
    fs::write(src.join("ro.txt"), b"read only").unwrap();
    fs::create_dir(src.join("dir")).unwrap();
    let m = HostMount::start(&src, &mnt, &["--readonly", "--cache", "never"]);

    assert_eq!(fs::read(m.path("ro.txt")).unwrap(), b"read only");
    assert_eq!(fs::read_dir(m.path("dir")).unwrap().count(), 0);
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(
        OpenOptions::new()
            .write(true)
            .open(m.path("ro.txt"))
            .map(drop),
        "open for writing",
    );
    erofs(File::create(m.path("new.txt")).map(drop), "create");
    erofs(fs::create_dir(m.path("newdir")), "mkdir");
    erofs(fs::remove_file(m.path("ro.txt")), "unlink");
    erofs(fs::rename(m.path("ro.txt"), m.path("moved")), "rename");
    erofs(
        fs::set_permissions(m.path("ro.txt"), fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    assert_eq!(fs::read(src.join("ro.txt")).unwrap(), b"read only");
    assert!(!src.join("new.txt").exists() && !src.join("newdir").exists());

    // With --cache never, host changes show at once.
    fs::write(src.join("ro.txt"), b"changed on the host").unwrap();
    assert_eq!(fs::read(m.path("ro.txt")).unwrap(), b"changed on the host");

    m.terminate();
}

#[test]
fn bad_arguments_exit_2_with_one_sentence() {
    let (_tmp, src, mnt) = dirs();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(ferry_bin())
            .arg("mount")
            .args(args)
            .output()
            .expect("run ferry mount");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = src.join("missing");
    let (code, err) = run(&["--share".as_ref(), missing.as_os_str(), mnt.as_os_str()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("ferry: --share") && err.contains("missing"),
        "{err}"
    );
    let missing = mnt.join("missing");
    let (code, err) = run(&["--share".as_ref(), src.as_os_str(), missing.as_os_str()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("ferry: mount point"), "{err}");
    let (code, err) = run(&[
        "--share".as_ref(),
        src.as_os_str(),
        "--cache".as_ref(),
        "sometimes".as_ref(),
        mnt.as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("ferry: --cache sometimes"), "{err}");
    assert!(!is_fuse_mounted(&mnt));
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), i32> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: both paths are NUL-terminated.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

#[test]
fn large_files_rename_flags_sparse_files_and_locks() {
    use std::os::fd::AsRawFd;
    let (_tmp, src, mnt) = dirs();
    let m = HostMount::start(&src, &mnt, &[]);

    // 64 MiB through the mount, byte for byte on the host.
    let data = pattern(64 << 20);
    fs::write(m.path("big"), &data).unwrap();
    assert!(
        fs::read(src.join("big")).unwrap() == data,
        "64 MiB differs on the host"
    );
    drop(data);

    // RENAME_NOREPLACE and RENAME_EXCHANGE.
    fs::write(m.path("x"), b"X").unwrap();
    fs::write(m.path("y"), b"Y").unwrap();
    assert_eq!(
        renameat2(&m.path("x"), &m.path("y"), libc::RENAME_NOREPLACE),
        Err(libc::EEXIST)
    );
    renameat2(&m.path("x"), &m.path("y"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(src.join("x")).unwrap(), b"Y");
    assert_eq!(fs::read(src.join("y")).unwrap(), b"X");

    // fallocate, then SEEK_DATA / SEEK_HOLE over a sparse file.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("sparse"))
        .unwrap();
    // SAFETY: valid fd; fallocate has no memory effects.
    assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) }, 0);
    assert_eq!(fs::metadata(src.join("sparse")).unwrap().len(), 1 << 20);
    f.set_len(4 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[1u8; 4096], 2 << 20).unwrap();
    // SAFETY: valid fd; lseek has no memory effects.
    let data_at = unsafe { libc::lseek(f.as_raw_fd(), (1 << 20) + 1, libc::SEEK_DATA) };
    assert_eq!(data_at, 2 << 20);
    // SAFETY: as above.
    let hole_at = unsafe { libc::lseek(f.as_raw_fd(), 2 << 20, libc::SEEK_HOLE) };
    assert_eq!(hole_at, (2 << 20) + 4096);

    // flock: a second open file cannot take the exclusive lock the first holds.
    let g = fs::File::open(m.path("sparse")).unwrap();
    // SAFETY: valid fds; flock has no memory effects.
    unsafe {
        assert_eq!(libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB), 0);
        assert_eq!(
            libc::flock(g.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1
        );
        assert_eq!(libc::flock(f.as_raw_fd(), libc::LOCK_UN), 0);
        assert_eq!(libc::flock(g.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB), 0);
    }

    // POSIX locks reach the host: a lock taken through the mount shows on the share's file.
    // SAFETY: flock is plain data; the fds are valid and the structs are valid flocks.
    unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_len = 10;
        assert_eq!(libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut fl), 0);
        let host = fs::File::open(src.join("sparse")).unwrap();
        let mut q: libc::flock = std::mem::zeroed();
        q.l_type = libc::F_RDLCK as i16;
        q.l_whence = libc::SEEK_SET as i16;
        q.l_len = 10;
        assert_eq!(libc::fcntl(host.as_raw_fd(), libc::F_OFD_GETLK, &mut q), 0);
        assert_eq!(
            q.l_type,
            libc::F_WRLCK as i16,
            "the host does not see the lock"
        );
    }
}

/// openat(2) of `name` in the folder `dir` with `flags` (mode 0644); the errno on failure.
fn open_in(dir: &File, name: &str, flags: i32) -> Result<File, i32> {
    let n = CString::new(name).unwrap();
    // SAFETY: the fd is valid and `n` is NUL-terminated.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), n.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[test]
fn a_folder_the_host_moves_out_of_the_share_is_out_of_reach() {
    let (tmp, src, mnt) = dirs();
    fs::create_dir(src.join("d")).unwrap();
    fs::write(src.join("d/secret"), b"inside").unwrap();
    let m = HostMount::start(&src, &mnt, &[]);
    // The client holds the folder (as a shell's cwd would), and reads it while it is inside.
    let held = File::open(m.path("d")).unwrap();
    assert!(open_in(&held, "secret", libc::O_RDONLY).is_ok());
    // The host moves it out of the share: through the node the client holds, ferry can
    // neither read it nor write into it any more.
    let outside = tmp.path().join("outside");
    fs::rename(src.join("d"), &outside).unwrap();
    assert_eq!(
        open_in(&held, "secret", libc::O_RDONLY).err(),
        Some(libc::EACCES),
        "read a file of a folder moved out of the share"
    );
    assert_eq!(
        open_in(&held, "planted", libc::O_WRONLY | libc::O_CREAT).err(),
        Some(libc::EACCES),
        "wrote into a folder moved out of the share"
    );
    assert!(!outside.join("planted").exists());
    // The share itself still works, and the log says the sandbox is on.
    fs::write(m.path("after"), b"ok").unwrap();
    assert_eq!(fs::read(src.join("after")).unwrap(), b"ok");
    assert!(m.log_tail().contains("Landlock"), "{}", m.log_tail());
    drop(held);
    m.unmount();
}

#[test]
fn running_out_of_descriptors_is_logged_once() {
    let (_tmp, src, mnt) = dirs();
    for i in 0..400 {
        fs::write(src.join(format!("f{i}")), b"").unwrap();
    }
    let m = HostMount::start_limited(&src, &mnt, &[], Some(256));
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..400 {
        match File::open(m.path(&format!("f{i}"))) {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "f{i}: {e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 100, "ferry never ran out ({} open)", held.len());
    let log = m.log_tail();
    assert_eq!(log.matches("open-file limit").count(), 1, "{log}");
    drop(held);
    // Once the client closes files, opens work again.
    assert!(File::open(m.path("f399")).is_ok());
    m.unmount();
}

/// pjdfstest through `ferry mount --allow-other` (the kernel checks permissions, as a
/// guest's does) gives what it gives in a guest on a default share: only the device-node
/// tests fail, each refused with EPERM (tests/tests/guest_pjdfstest.rs).
#[test]
fn pjdfstest_through_the_mount_fails_only_device_nodes_as_in_a_guest() {
    use ferry_tests::pjdfstest::{config as config_for, forgive_etxtbsy, parse, pjdfstest};
    let (tmp, src, mnt) = dirs();
    // Searchable by the users pjdfstest switches to.
    for d in [tmp.path(), &src, &mnt] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let config = tmp.path().join("pjdfstest.toml");
    // The users it switches to are ones every Debian host has.
    fs::write(
        &config,
        config_for(&[("nobody", "nogroup"), ("daemon", "daemon")]),
    )
    .unwrap();
    let m = HostMount::start(&src, &mnt, &["--allow-other"]);
    let work = m.path("work");
    fs::create_dir(&work).unwrap();
    fs::set_permissions(&work, fs::Permissions::from_mode(0o755)).unwrap();
    let run_suite = |pattern: Option<&str>| {
        let out = Command::new(pjdfstest())
            .env("NO_COLOR", "1")
            .arg("-c")
            .arg(&config)
            .arg("-p")
            .arg(&work)
            .args(pattern)
            .current_dir(&work)
            .output()
            .expect("run pjdfstest");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let mut run = parse(&run_suite(None));
    if run.failed.iter().any(|(n, _)| n == "open::etxtbsy") {
        let reruns: String = (0..3).map(|_| run_suite(Some("open::etxtbsy"))).collect();
        forgive_etxtbsy(&mut run, &reruns);
    }
    let not_devices: Vec<_> = run
        .failed
        .iter()
        .filter(|(name, why)| {
            !((name.ends_with("::char") || name.ends_with("::block"))
                && (why.contains("EPERM") || why.contains("mknod(")))
        })
        .collect();
    assert!(
        not_devices.is_empty(),
        "pjdfstest failures through ferry mount other than device nodes refused with EPERM: {not_devices:#?}\nlog:\n{}",
        m.log_tail()
    );
    assert!(
        !run.failed.is_empty() && run.passed > 250,
        "fewer tests ran than pjdfstest has: {} passed",
        run.passed
    );
    eprintln!(
        "pjdfstest through ferry mount: {} passed, {} failed (device nodes)",
        run.passed,
        run.failed.len()
    );
}
