//! `PassthroughFs` behind the FUSE `Server`, driven with raw requests over in-memory buffers:
//! the same bytes the guest kernel sends, no VM.

use std::mem::size_of;
use std::path::Path;

use ferry_fs::abi::{self, opcode, InHeader, OutHeader};
use ferry_fs::membuf::{ReplyBuf, RequestBuf};
use ferry_fs::passthrough::Config;
use ferry_fs::{PassthroughFs, Server};
use vm_memory::ByteValued;

struct Fixture {
    dir: tempfile::TempDir,
    server: Server<PassthroughFs>,
}

fn fixture(readonly: bool) -> Fixture {
    fixture_with(readonly, None)
}

/// A fixture serving a fresh temporary folder (its `dir`, not `share()`) with `cfg`, after
/// `prepare` has had the folder.
fn fixture_config(cfg: Config, prepare: impl FnOnce(&Path)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path());
    let fs = PassthroughFs::new(dir.path(), cfg).unwrap();
    Fixture {
        dir,
        server: Server::new(fs),
    }
}

fn fixture_with(readonly: bool, node_fds: Option<usize>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let fs = PassthroughFs::new(
        &share,
        Config {
            readonly,
            node_fds,
            ..Default::default()
        },
    )
    .unwrap();
    Fixture {
        dir,
        server: Server::new(fs),
    }
}

impl Fixture {
    fn share(&self) -> std::path::PathBuf {
        self.dir.path().join("share")
    }

    /// Sends one request; returns (errno, reply body).
    fn call(&self, op: u32, node: u64, parts: &[&[u8]]) -> (i32, Vec<u8>) {
        self.call_unique(op, node, 1, parts)
    }

    /// Sends one request with its unique id.
    fn call_unique(&self, op: u32, node: u64, unique: u64, parts: &[&[u8]]) -> (i32, Vec<u8>) {
        self.call_full(op, node, unique, (0, 0), parts)
    }

    /// Sends one request from the guest's user `ids` (uid, gid).
    fn call_as(&self, ids: (u32, u32), op: u32, node: u64, parts: &[&[u8]]) -> (i32, Vec<u8>) {
        self.call_full(op, node, 1, ids, parts)
    }

    fn call_full(
        &self,
        op: u32,
        node: u64,
        unique: u64,
        (uid, gid): (u32, u32),
        parts: &[&[u8]],
    ) -> (i32, Vec<u8>) {
        let body: Vec<u8> = parts.concat();
        let hdr = InHeader {
            len: (size_of::<InHeader>() + body.len()) as u32,
            opcode: op,
            unique,
            nodeid: node,
            uid,
            gid,
            ..Default::default()
        };
        let mut req = hdr.as_slice().to_vec();
        req.extend_from_slice(&body);
        let w = ReplyBuf::new(1 << 21);
        let n = self
            .server
            .handle_message(RequestBuf::new(req), w.clone())
            .unwrap();
        let reply = w.bytes(n);
        if n == 0 {
            return (0, vec![]);
        }
        let mut out = OutHeader::default();
        out.as_mut_slice().copy_from_slice(&reply[..16]);
        assert_eq!(out.len as usize, n);
        (-out.error, reply[16..].to_vec())
    }

    /// CREATE of `name` in the root with `flags` and mode 0644; returns (errno, reply body).
    fn create(&self, name: &str, flags: i32) -> (i32, Vec<u8>) {
        let c = abi::CreateIn {
            flags: flags as u32,
            mode: 0o644,
            ..Default::default()
        };
        self.call(opcode::CREATE, 1, &[c.as_slice(), name.as_bytes(), b"\0"])
    }

    /// CREATE of `name` as [`Self::create`], which must succeed; returns its entry.
    fn created(&self, name: &str) -> abi::EntryOut {
        let (e, body) = self.create(name, libc::O_RDWR);
        assert_eq!(e, 0, "CREATE {name}");
        let mut entry = abi::EntryOut::default();
        entry
            .as_mut_slice()
            .copy_from_slice(&body[..size_of::<abi::EntryOut>()]);
        entry
    }

    fn lookup(&self, parent: u64, name: &str) -> Result<abi::EntryOut, i32> {
        let (e, body) = self.call(opcode::LOOKUP, parent, &[name.as_bytes(), b"\0"]);
        if e != 0 {
            return Err(e);
        }
        let mut out = abi::EntryOut::default();
        out.as_mut_slice().copy_from_slice(&body);
        Ok(out)
    }

    /// INIT from a kernel of FUSE 7.38 that offers `flags` (the high half in `flags2`).
    fn init(&self, flags: abi::InitFlags) {
        let init = abi::InitIn {
            major: 7,
            minor: 38,
            max_readahead: 1 << 20,
            flags: flags as u32 | abi::INIT_EXT as u32,
        };
        let flags2 = ((flags >> 32) as u32).to_le_bytes();
        let unused = [0u8; 44];
        let (e, _) = self.call(opcode::INIT, 0, &[init.as_slice(), &flags2, &unused]);
        assert_eq!(e, 0);
    }

    /// Every name in directory `node` (sorted), read between OPENDIR and RELEASEDIR.
    fn readdir_names(&self, node: u64, plus: bool) -> Vec<String> {
        let (e, body) = self.call(opcode::OPENDIR, node, &[abi::OpenIn::default().as_slice()]);
        assert_eq!(e, 0);
        let mut open = abi::OpenOut::default();
        open.as_mut_slice().copy_from_slice(&body);
        let names = self.list(node, open.fh, plus);
        let rel = abi::ReleaseIn {
            fh: open.fh,
            ..Default::default()
        };
        assert_eq!(self.call(opcode::RELEASEDIR, node, &[rel.as_slice()]).0, 0);
        names
    }

    /// Every name in directory `node` (sorted), read through handle `fh` in 4 KiB calls
    /// until one comes back empty, as the kernel reads.
    fn list(&self, node: u64, fh: u64, plus: bool) -> Vec<String> {
        let mut names = Vec::new();
        let mut offset = 0u64;
        loop {
            let arg = abi::ReadIn {
                fh,
                offset,
                size: 4096,
                ..Default::default()
            };
            let op = if plus {
                opcode::READDIRPLUS
            } else {
                opcode::READDIR
            };
            let (e, body) = self.call(op, node, &[arg.as_slice()]);
            assert_eq!(e, 0);
            if body.is_empty() {
                break;
            }
            let mut pos = 0;
            while pos < body.len() {
                if plus {
                    pos += size_of::<abi::EntryOut>();
                }
                let mut d = abi::Dirent::default();
                d.as_mut_slice().copy_from_slice(&body[pos..pos + 24]);
                let name = &body[pos + 24..pos + 24 + d.namelen as usize];
                names.push(String::from_utf8_lossy(name).into_owned());
                offset = d.off;
                pos += (24 + d.namelen as usize + 7) & !7;
            }
        }
        names.sort();
        names
    }
}

#[test]
fn readdir_and_readdirplus_list_everything_across_calls() {
    let f = fixture(false);
    for i in 0..300 {
        std::fs::write(f.share().join(format!("file-{i:03}")), b"x").unwrap();
    }
    for plus in [false, true] {
        let names = f.readdir_names(abi::ROOT_ID, plus);
        assert_eq!(names.len(), 302, "plus={plus}");
        assert_eq!(names[0], ".");
        assert_eq!(names[2], "file-000");
    }
}

/// Names up to NAME_MAX: the server reads the host's entries a page at a time and grows its
/// buffer while the reply takes more, so a few long names fill a read.
#[test]
fn long_names_list_across_calls() {
    let f = fixture(false);
    let name = |i: usize| format!("{i:03}{}", "n".repeat(252));
    for i in 0..100 {
        std::fs::write(f.share().join(name(i)), b"").unwrap();
    }
    for plus in [false, true] {
        let names = f.readdir_names(abi::ROOT_ID, plus);
        assert_eq!(names.len(), 102, "plus={plus}");
        assert_eq!((&*names[2], &*names[101]), (&*name(0), &*name(99)));
    }
}

/// A kernel that offers FUSE_NO_OPENDIR_SUPPORT has its first OPENDIR refused with ENOSYS
/// (it then sends none) and reads directories with handle 0: every entry, across calls, with
/// nothing left open. One that does not offer it opens directories as before.
#[test]
fn directories_are_read_without_opendir_when_the_kernel_offers_it() {
    let f = fixture(false);
    std::fs::create_dir(f.share().join("d")).unwrap();
    for i in 0..300 {
        std::fs::write(f.share().join(format!("d/file-{i:03}")), b"x").unwrap();
    }
    f.init(abi::NO_OPENDIR_SUPPORT);
    let d = f.lookup(abi::ROOT_ID, "d").unwrap().nodeid;
    let open = abi::OpenIn::default();
    assert_eq!(
        f.call(opcode::OPENDIR, d, &[open.as_slice()]).0,
        libc::ENOSYS
    );
    for plus in [false, true] {
        let names = f.list(d, 0, plus);
        assert_eq!(names.len(), 302, "plus={plus}");
        assert_eq!((&*names[2], &*names[301]), ("file-000", "file-299"));
    }
    let sync = abi::FsyncIn::default();
    assert_eq!(f.call(opcode::FSYNCDIR, d, &[sync.as_slice()]).0, 0);
    assert_eq!(f.server.fs().handle_count(), 0);
    // A directory removed on the host reads as it would locally: ENOENT. An unknown node,
    // EBADF.
    std::fs::create_dir(f.share().join("gone")).unwrap();
    let gone = f.lookup(abi::ROOT_ID, "gone").unwrap().nodeid;
    std::fs::remove_dir(f.share().join("gone")).unwrap();
    let arg = abi::ReadIn {
        size: 4096,
        ..Default::default()
    };
    for (node, want) in [(gone, libc::ENOENT), (gone + 1000, libc::EBADF)] {
        let (e, _) = f.call(opcode::READDIRPLUS, node, &[arg.as_slice()]);
        assert_eq!(e, want, "node {node}");
    }

    // A new session, from a kernel that does not offer it (and looks its nodes up anew).
    f.init(0);
    let d = f.lookup(abi::ROOT_ID, "d").unwrap().nodeid;
    assert_eq!(f.readdir_names(d, true).len(), 302);
}

#[test]
fn dotdot_at_the_root_is_the_root() {
    let f = fixture(false);
    std::fs::write(f.dir.path().join("outside"), b"secret").unwrap();
    let e = f.lookup(abi::ROOT_ID, "..").unwrap();
    assert_eq!(e.nodeid, abi::ROOT_ID);
    assert_eq!(f.lookup(e.nodeid, "outside").err(), Some(libc::ENOENT));
}

#[test]
fn symlinks_are_never_followed_by_the_server() {
    let f = fixture(false);
    std::fs::write(f.dir.path().join("outside"), b"secret").unwrap();
    std::os::unix::fs::symlink("../outside", f.share().join("escape")).unwrap();
    std::os::unix::fs::symlink(f.dir.path(), f.share().join("escapedir")).unwrap();
    // The link itself is a symlink node; opening it is refused (the guest resolves links).
    let e = f.lookup(abi::ROOT_ID, "escape").unwrap();
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    let (err, _) = f.call(opcode::OPEN, e.nodeid, &[abi::OpenIn::default().as_slice()]);
    assert_ne!(err, 0, "opening a symlink node must fail");
    // Looking up through a symlinked directory does not walk into it.
    let d = f.lookup(abi::ROOT_ID, "escapedir").unwrap();
    assert_eq!(f.lookup(d.nodeid, "outside").err(), Some(libc::ENOTDIR));
    // CREATE over a symlink does not write through it.
    let (err, _) = f.create("escape", libc::O_WRONLY);
    assert_eq!(err, libc::ELOOP);
    assert_eq!(
        std::fs::read(f.dir.path().join("outside")).unwrap(),
        b"secret"
    );
}

#[test]
fn readonly_share_answers_writes_with_erofs() {
    let f = fixture(true);
    std::fs::write(f.share().join("f"), b"data").unwrap();
    let mk = abi::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    assert_eq!(
        f.call(opcode::MKDIR, 1, &[mk.as_slice(), b"d\0"]).0,
        libc::EROFS
    );
    assert_eq!(f.call(opcode::UNLINK, 1, &[b"f\0"]).0, libc::EROFS);
    let e = f.lookup(1, "f").unwrap();
    let open = abi::OpenIn {
        flags: libc::O_RDWR as u32,
        open_flags: 0,
    };
    assert_eq!(
        f.call(opcode::OPEN, e.nodeid, &[open.as_slice()]).0,
        libc::EROFS
    );
    // Reading still works.
    let open = abi::OpenIn::default();
    assert_eq!(f.call(opcode::OPEN, e.nodeid, &[open.as_slice()]).0, 0);
    assert!(std::fs::read(f.share().join("f")).is_ok());
}

/// A guest that reboots sends INIT again on the same device, without DESTROY: the previous
/// kernel's nodes and open files are dropped (it can no longer forget or release them), as a
/// frontend that leaves has them dropped.
#[test]
fn a_second_init_drops_the_previous_sessions_nodes_and_files() {
    let f = fixture(false);
    std::fs::write(f.share().join("f"), b"data").unwrap();
    f.init(0);
    let e = f.lookup(1, "f").unwrap();
    let open = abi::OpenIn::default();
    assert_eq!(f.call(opcode::OPEN, e.nodeid, &[open.as_slice()]).0, 0);
    assert_eq!(
        (f.server.fs().inode_count(), f.server.fs().handle_count()),
        (2, 1)
    );
    f.init(0);
    assert_eq!(
        (f.server.fs().inode_count(), f.server.fs().handle_count()),
        (1, 0),
        "only the root after the new INIT"
    );
    assert!(f.lookup(1, "f").is_ok(), "the new session looks up again");
}

#[test]
fn forget_drops_nodes_and_bad_nodes_are_ebadf() {
    let f = fixture(false);
    std::fs::write(f.share().join("f"), b"data").unwrap();
    let e = f.lookup(1, "f").unwrap();
    let again = f.lookup(1, "f").unwrap();
    assert_eq!(e.nodeid, again.nodeid, "one node per host inode");
    assert_eq!(f.server.fs().inode_count(), 2);
    f.call(
        opcode::FORGET,
        e.nodeid,
        &[abi::ForgetIn { nlookup: 2 }.as_slice()],
    );
    assert_eq!(f.server.fs().inode_count(), 1);
    let (err, _) = f.call(
        opcode::GETATTR,
        e.nodeid,
        &[abi::GetattrIn::default().as_slice()],
    );
    assert_eq!(err, libc::EBADF);
}

#[test]
fn rename_noreplace_and_exchange() {
    let f = fixture(false);
    std::fs::write(f.share().join("a"), b"A").unwrap();
    std::fs::write(f.share().join("b"), b"B").unwrap();
    let r = abi::Rename2In {
        newdir: 1,
        flags: libc::RENAME_NOREPLACE,
        padding: 0,
    };
    assert_eq!(
        f.call(opcode::RENAME2, 1, &[r.as_slice(), b"a\0b\0"]).0,
        libc::EEXIST
    );
    let r = abi::Rename2In {
        newdir: 1,
        flags: libc::RENAME_EXCHANGE,
        padding: 0,
    };
    assert_eq!(f.call(opcode::RENAME2, 1, &[r.as_slice(), b"a\0b\0"]).0, 0);
    assert_eq!(std::fs::read(f.share().join("a")).unwrap(), b"B");
    assert_eq!(std::fs::read(f.share().join("b")).unwrap(), b"A");
}

#[test]
fn write_then_read_round_trips() {
    let f = fixture(false);
    let (e, body) = f.create("data", libc::O_RDWR);
    assert_eq!(e, 0);
    let mut open = abi::OpenOut::default();
    open.as_mut_slice().copy_from_slice(&body[128..]);
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let w = abi::WriteIn {
        fh: open.fh,
        offset: 10,
        size: payload.len() as u32,
        ..Default::default()
    };
    let (e, body) = f.call(opcode::WRITE, 2, &[w.as_slice(), &payload]);
    assert_eq!(e, 0);
    assert_eq!(u32::from_ne_bytes(body[0..4].try_into().unwrap()), 100_000);
    let r = abi::ReadIn {
        fh: open.fh,
        offset: 10,
        size: 200_000,
        ..Default::default()
    };
    let (e, body) = f.call(opcode::READ, 2, &[r.as_slice()]);
    assert_eq!(e, 0);
    assert_eq!(body, payload);
    let on_host = std::fs::read(f.share().join("data")).unwrap();
    assert_eq!(&on_host[10..], &payload[..]);
}

/// A `devices` share (a container's root file system) takes device nodes and whiteouts, as
/// virtiofsd does. Making a device node needs CAP_MKNOD: the test runs as root.
#[test]
fn a_devices_share_takes_device_nodes_and_whiteouts() {
    let f = fixture_config(
        Config {
            devices: true,
            ..Config::default()
        },
        |_| {},
    );
    let dev = abi::MknodIn {
        mode: libc::S_IFCHR | 0o666,
        rdev: (1 << 8) | 3, // 1:3, /dev/null
        umask: 0,
        padding: 0,
    };
    let (err, _) = f.call(opcode::MKNOD, 1, &[dev.as_slice(), b"null\0"]);
    assert_eq!(err, 0, "mknod c 1 3");
    let meta = std::fs::symlink_metadata(f.dir.path().join("null")).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), libc::makedev(1, 3));
    std::fs::write(f.dir.path().join("upper"), b"x").unwrap();
    let r = abi::Rename2In {
        newdir: 1,
        flags: libc::RENAME_WHITEOUT,
        padding: 0,
    };
    let (err, _) = f.call(opcode::RENAME2, 1, &[r.as_slice(), b"upper\0moved\0"]);
    assert_eq!(err, 0, "RENAME_WHITEOUT");
    let wh = std::fs::symlink_metadata(f.dir.path().join("upper")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "the whiteout"
    );
}

#[test]
fn share_root_must_be_a_directory() {
    assert!(PassthroughFs::new(Path::new("/etc/hostname"), Config::default()).is_err());
}

#[test]
fn guest_cannot_make_devices_or_privileged_xattrs() {
    let f = fixture(false);
    let dev = abi::MknodIn {
        mode: libc::S_IFCHR | 0o666,
        rdev: 0x0801,
        umask: 0,
        padding: 0,
    };
    assert_eq!(
        f.call(opcode::MKNOD, 1, &[dev.as_slice(), b"sda\0"]).0,
        libc::EPERM
    );
    assert!(!f.share().join("sda").exists());
    let fifo = abi::MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..Default::default()
    };
    assert_eq!(f.call(opcode::MKNOD, 1, &[fifo.as_slice(), b"pipe\0"]).0, 0);
    std::fs::write(f.share().join("bin"), b"x").unwrap();
    let e = f.lookup(1, "bin").unwrap();
    let set = abi::SetxattrIn { size: 4, flags: 0 };
    let (err, _) = f.call(
        opcode::SETXATTR,
        e.nodeid,
        &[
            set.as_slice(),
            b"security.capability\0",
            b"\x01\x02\x03\x04",
        ],
    );
    assert_eq!(err, libc::EPERM);
    let (err, _) = f.call(
        opcode::SETXATTR,
        e.nodeid,
        &[set.as_slice(), b"user.k\0", b"vvvv"],
    );
    if err != libc::EOPNOTSUPP {
        assert_eq!(err, 0);
        let get = abi::GetxattrIn {
            size: 64,
            padding: 0,
        };
        let (err, v) = f.call(opcode::GETXATTR, e.nodeid, &[get.as_slice(), b"user.k\0"]);
        assert_eq!((err, v.as_slice()), (0, &b"vvvv"[..]));
    }
    let r = abi::Rename2In {
        newdir: 1,
        flags: libc::RENAME_WHITEOUT,
        padding: 0,
    };
    assert_eq!(
        f.call(opcode::RENAME2, 1, &[r.as_slice(), b"bin\0bin2\0"])
            .0,
        libc::EINVAL
    );
}

#[test]
fn nodes_past_the_fd_budget_work_through_file_handles() {
    // With no descriptor budget every node but the root is a file handle (as root); the
    // operations must behave the same.
    let f = fixture_with(false, Some(0));
    std::fs::create_dir(f.share().join("dir")).unwrap();
    for i in 0..50 {
        std::fs::write(f.share().join("dir").join(format!("f{i}")), b"x").unwrap();
    }
    let d = f.lookup(1, "dir").unwrap();
    assert_eq!(f.readdir_names(d.nodeid, true).len(), 52);
    let e = f.lookup(d.nodeid, "f7").unwrap();
    let (err, _) = f.call(
        opcode::GETATTR,
        e.nodeid,
        &[abi::GetattrIn::default().as_slice()],
    );
    assert_eq!(err, 0);
    let open = abi::OpenIn {
        flags: libc::O_RDWR as u32,
        open_flags: 0,
    };
    let (err, body) = f.call(opcode::OPEN, e.nodeid, &[open.as_slice()]);
    assert_eq!(err, 0);
    let mut out = abi::OpenOut::default();
    out.as_mut_slice().copy_from_slice(&body);
    let w = abi::WriteIn {
        fh: out.fh,
        size: 5,
        ..Default::default()
    };
    assert_eq!(
        f.call(opcode::WRITE, e.nodeid, &[w.as_slice(), b"hello"]).0,
        0
    );
    assert_eq!(std::fs::read(f.share().join("dir/f7")).unwrap(), b"hello");
    let mk = abi::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    assert_eq!(
        f.call(opcode::MKDIR, d.nodeid, &[mk.as_slice(), b"sub\0"])
            .0,
        0
    );
    assert!(f.share().join("dir/sub").is_dir());
    // The fd table stays small: 50 nodes did not take 50 descriptors.
    let fds = fds_under(&f.share());
    assert!(fds < 40, "{fds} descriptors open");
}

/// This process's descriptors open on files in `dir` (other tests run in parallel and hold
/// descriptors of their own).
fn fds_under(dir: &std::path::Path) -> usize {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(&dir))
        .count()
}

#[test]
fn descriptors_stay_bounded_past_the_budget() {
    let f = fixture_with(false, Some(100));
    std::fs::create_dir(f.share().join("dir")).unwrap();
    for i in 0..3000 {
        std::fs::write(f.share().join("dir").join(format!("f{i}")), b"x").unwrap();
    }
    let d = f.lookup(1, "dir").unwrap();
    assert_eq!(f.readdir_names(d.nodeid, true).len(), 3002);
    let fds = fds_under(&f.share());
    assert!(fds < 300, "{fds} descriptors open");
}

fn open_rw(f: &Fixture, node: u64) -> u64 {
    let open = abi::OpenIn {
        flags: libc::O_RDWR as u32,
        open_flags: 0,
    };
    let (err, body) = f.call(opcode::OPEN, node, &[open.as_slice()]);
    assert_eq!(err, 0);
    let mut out = abi::OpenOut::default();
    out.as_mut_slice().copy_from_slice(&body);
    out.fh
}

fn lk(fh: u64, type_: i32, pid: u32) -> abi::LkIn {
    abi::LkIn {
        fh,
        owner: u64::from(pid),
        lk: abi::FileLock {
            start: 0,
            end: 99,
            type_: type_ as u32,
            pid,
        },
        lk_flags: 0,
        padding: 0,
    }
}

#[test]
fn posix_locks_conflict_wait_and_can_be_interrupted() {
    let f = fixture(false);
    std::fs::write(f.share().join("l"), b"data").unwrap();
    let node = f.lookup(1, "l").unwrap().nodeid;
    let (a, b) = (open_rw(&f, node), open_rw(&f, node));
    assert_eq!(
        f.call(opcode::SETLK, node, &[lk(a, libc::F_WRLCK, 100).as_slice()])
            .0,
        0
    );
    assert_eq!(
        f.call(opcode::SETLK, node, &[lk(b, libc::F_WRLCK, 200).as_slice()])
            .0,
        libc::EAGAIN
    );
    // GETLK names the holder by its guest pid.
    let (err, body) = f.call(opcode::GETLK, node, &[lk(b, libc::F_WRLCK, 200).as_slice()]);
    assert_eq!(err, 0);
    let mut held = abi::FileLock::default();
    held.as_mut_slice().copy_from_slice(&body);
    assert_eq!(
        (held.type_, held.pid, held.start, held.end),
        (libc::F_WRLCK as u32, 100, 0, 99)
    );
    // A host process sees the guest's lock too.
    let host = std::fs::OpenOptions::new()
        .write(true)
        .open(f.share().join("l"))
        .unwrap();
    // SAFETY: flock is plain data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_len = 10;
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd and struct flock.
    let r = unsafe { libc::fcntl(host.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!((r, fl.l_type), (0, libc::F_WRLCK as i16));

    std::thread::scope(|s| {
        // SETLKW waits until the holder unlocks.
        let waiter = s.spawn(|| {
            f.call_unique(
                opcode::SETLKW,
                node,
                7,
                &[lk(b, libc::F_WRLCK, 200).as_slice()],
            )
            .0
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!waiter.is_finished());
        assert_eq!(
            f.call(opcode::SETLK, node, &[lk(a, libc::F_UNLCK, 100).as_slice()])
                .0,
            0
        );
        assert_eq!(waiter.join().unwrap(), 0);
        // Now `a` waits for `b`, and the guest interrupts it: EINTR.
        let waiter = s.spawn(|| {
            f.call_unique(
                opcode::SETLKW,
                node,
                9,
                &[lk(a, libc::F_RDLCK, 100).as_slice()],
            )
            .0
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        f.call(
            opcode::INTERRUPT,
            0,
            &[abi::InterruptIn { unique: 9 }.as_slice()],
        );
        assert_eq!(waiter.join().unwrap(), libc::EINTR);
    });
}

#[test]
fn flock_locks_are_per_open_file() {
    let f = fixture(false);
    std::fs::write(f.share().join("l"), b"data").unwrap();
    let node = f.lookup(1, "l").unwrap().nodeid;
    let (a, b) = (open_rw(&f, node), open_rw(&f, node));
    let mut la = lk(a, libc::F_WRLCK, 1);
    la.lk_flags = abi::LK_FLOCK;
    let mut lb = lk(b, libc::F_WRLCK, 2);
    lb.lk_flags = abi::LK_FLOCK;
    assert_eq!(f.call(opcode::SETLK, node, &[la.as_slice()]).0, 0);
    assert_eq!(
        f.call(opcode::SETLK, node, &[lb.as_slice()]).0,
        libc::EAGAIN
    );
    la.lk.type_ = libc::F_UNLCK as u32;
    assert_eq!(f.call(opcode::SETLK, node, &[la.as_slice()]).0, 0);
    assert_eq!(f.call(opcode::SETLK, node, &[lb.as_slice()]).0, 0);
}

#[test]
fn writeback_is_opt_in_and_write_only_opens_become_read_write() {
    for writeback in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let fs = PassthroughFs::new(
            dir.path(),
            Config {
                writeback,
                ..Default::default()
            },
        )
        .unwrap();
        let f = Fixture {
            server: Server::new(fs),
            dir,
        };
        let init = abi::InitIn {
            major: 7,
            minor: 38,
            max_readahead: 0,
            flags: u32::MAX,
        };
        let (err, body) = f.call(opcode::INIT, 0, &[init.as_slice()]);
        assert_eq!(err, 0);
        let mut out = abi::InitOut::default();
        out.as_mut_slice().copy_from_slice(&body);
        assert_eq!(out.flags & abi::WRITEBACK_CACHE as u32 != 0, writeback);
        // Under writeback, a write-only open can also be read (the kernel reads pages).
        std::fs::write(f.dir.path().join("w"), b"data").unwrap();
        let node = f.lookup(1, "w").unwrap().nodeid;
        let open = abi::OpenIn {
            flags: libc::O_WRONLY as u32,
            open_flags: 0,
        };
        let (err, body) = f.call(opcode::OPEN, node, &[open.as_slice()]);
        assert_eq!(err, 0);
        let mut o = abi::OpenOut::default();
        o.as_mut_slice().copy_from_slice(&body);
        let r = abi::ReadIn {
            fh: o.fh,
            size: 4,
            ..Default::default()
        };
        let (err, _) = f.call(opcode::READ, node, &[r.as_slice()]);
        assert_eq!(
            err == 0,
            writeback,
            "read on a write-only open, writeback={writeback}"
        );
    }
}

#[test]
fn a_directory_swapped_for_a_symlink_does_not_lead_outside() {
    // The guest holds a node for `d`; the host then replaces `d` with a symlink to a folder
    // outside the share. Names under the old node resolve in the old directory, and a fresh
    // lookup of `d` finds the symlink, never the outside folder.
    let f = fixture(false);
    std::fs::create_dir(f.share().join("d")).unwrap();
    let outside = f.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"HOST").unwrap();
    let d = f.lookup(1, "d").unwrap();
    std::fs::rename(f.share().join("d"), f.dir.path().join("moved-away")).unwrap();
    std::os::unix::fs::symlink(&outside, f.share().join("d")).unwrap();
    assert_eq!(f.lookup(d.nodeid, "secret").err(), Some(libc::ENOENT));
    let again = f.lookup(1, "d").unwrap();
    assert_eq!(again.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(f.lookup(again.nodeid, "secret").err(), Some(libc::ENOTDIR));
    let mk = abi::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    assert_eq!(
        f.call(opcode::MKDIR, again.nodeid, &[mk.as_slice(), b"x\0"])
            .0,
        libc::ENOTDIR
    );
    assert!(!outside.join("x").exists());
}

/// As root, nodes past the descriptor budget keep file handles. A file whose dentry the host
/// evicted comes back from its handle with no path to it, and Landlock (ferry's sandbox)
/// refuses to open such a file, not knowing it lies in the share: the server then reaches it
/// through the name it was last known by, renames by the guest included.
#[test]
fn handle_nodes_open_under_landlock_after_the_host_evicts_them() {
    use landlock::{
        Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, ABI,
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: file handles need root");
        return;
    }
    let f = fixture_with(false, Some(0));
    std::fs::write(f.share().join("file"), b"payload").unwrap();
    let node = f.lookup(1, "file").unwrap().nodeid;
    let r = abi::Rename2In {
        newdir: 1,
        flags: 0,
        padding: 0,
    };
    assert_eq!(
        f.call(opcode::RENAME2, 1, &[r.as_slice(), b"file\0moved\0"])
            .0,
        0
    );
    let share = f.share();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let read = std::thread::scope(|s| {
        let t = s.spawn(move || {
            let abi = ABI::V3;
            Ruleset::default()
                .handle_access(AccessFs::from_all(abi))
                .unwrap()
                .create()
                .unwrap()
                .add_rule(PathBeneath::new(
                    PathFd::new(&share).unwrap(),
                    AccessFs::from_all(abi),
                ))
                .unwrap()
                .restrict_self()
                .unwrap();
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            let open = abi::OpenIn {
                flags: libc::O_RDONLY as u32,
                open_flags: 0,
            };
            let (err, body) = f.call(opcode::OPEN, node, &[open.as_slice()]);
            assert_eq!(err, 0, "OPEN of the evicted handle node");
            let mut out = abi::OpenOut::default();
            out.as_mut_slice().copy_from_slice(&body);
            let r = abi::ReadIn {
                fh: out.fh,
                offset: 0,
                size: 100,
                ..Default::default()
            };
            let (err, body) = f.call(opcode::READ, node, &[r.as_slice()]);
            assert_eq!(err, 0);
            body
        });
        ready_rx.recv().unwrap();
        // The host drops its unused dentries and inodes (the sandboxed thread may not).
        let dropped = std::process::Command::new("sh")
            .args(["-c", "sync; echo 2 > /proc/sys/vm/drop_caches"])
            .status()
            .unwrap();
        assert!(dropped.success());
        go_tx.send(()).unwrap();
        t.join().unwrap()
    });
    assert_eq!(read, b"payload");
}

#[test]
fn id_maps_rename_owners_both_ways() {
    use ferry_fs::{IdMap, IdMaps};
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: giving files to other ids needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    // The share belongs to the host user the guest's root is, as it would.
    std::os::unix::fs::chown(&share, Some(1234), Some(2345)).unwrap();
    let fs = PassthroughFs::new(
        &share,
        Config {
            // Two user ranges: root, and a block of 100 as a rootless engine's subuids are.
            uid_map: IdMaps::new(vec![
                IdMap::parse("0:1234").unwrap(),
                IdMap::parse("1:100000:100").unwrap(),
            ])
            .unwrap(),
            gid_map: IdMaps::new(vec![IdMap::parse("0:2345:10").unwrap()]).unwrap(),
            // Owners reach the host: this test is about the names ids have on each side.
            trusted: true,
            ..Default::default()
        },
    )
    .unwrap();
    let f = Fixture {
        dir,
        server: Server::new(fs),
    };
    let host = |name: &str| {
        let m = std::fs::symlink_metadata(f.share().join(name)).unwrap();
        (m.uid(), m.gid())
    };
    let shown = |name: &str| {
        let e = f.lookup(1, name).unwrap();
        (e.attr.uid, e.attr.gid)
    };
    for (name, owner) in [
        ("mine", (1234, 2347)),
        ("sub", (100_041, 2345)),
        ("other", (5000, 5000)),
    ] {
        std::fs::write(f.share().join(name), b"x").unwrap();
        std::os::unix::fs::lchown(f.share().join(name), Some(owner.0), Some(owner.1)).unwrap();
    }
    // The host's 1234:2347 is the guest's 0:2; ids outside the ranges pass unchanged.
    assert_eq!(shown("mine"), (0, 2));
    assert_eq!(shown("sub"), (42, 0));
    assert_eq!(shown("other"), (5000, 5000));

    // What the guest's root creates belongs to 1234:2345 on the host, and to 0:0 in the reply.
    let (e, body) = f.create("new", libc::O_RDWR);
    assert_eq!(e, 0);
    let mut entry = abi::EntryOut::default();
    entry
        .as_mut_slice()
        .copy_from_slice(&body[..size_of::<abi::EntryOut>()]);
    assert_eq!((entry.attr.uid, entry.attr.gid), (0, 0));
    assert_eq!(host("new"), (1234, 2345));
    let mk = abi::MkdirIn {
        mode: 0o755,
        ..Default::default()
    };
    assert_eq!(f.call(opcode::MKDIR, 1, &[mk.as_slice(), b"d\0"]).0, 0);
    assert_eq!(host("d"), (1234, 2345));

    // chown by the guest: to 0:9 is to 1234:2354 on the host, to 100:9 is to 100099:2354; to
    // 700:11, outside, is to 700:11.
    let other = f.lookup(1, "other").unwrap().nodeid;
    for ((uid, gid), on_host) in [
        ((0, 9), (1234, 2354)),
        ((100, 9), (100_099, 2354)),
        ((700, 11), (700, 11)),
    ] {
        let s = abi::SetattrIn {
            valid: abi::fattr::UID | abi::fattr::GID,
            uid,
            gid,
            ..Default::default()
        };
        let (e, body) = f.call(opcode::SETATTR, other, &[s.as_slice()]);
        assert_eq!(e, 0);
        let mut out = abi::AttrOut::default();
        out.as_mut_slice().copy_from_slice(&body);
        assert_eq!((out.attr.uid, out.attr.gid), (uid, gid));
        assert_eq!(host("other"), on_host);
        let (e, body) = f.call(
            opcode::GETATTR,
            other,
            &[abi::GetattrIn::default().as_slice()],
        );
        assert_eq!(e, 0);
        out.as_mut_slice().copy_from_slice(&body);
        assert_eq!((out.attr.uid, out.attr.gid), (uid, gid));
    }
}

#[test]
fn id_maps_refuse_what_they_cannot_mean() {
    use ferry_fs::{IdMap, IdMaps};
    assert_eq!(
        IdMap::parse("0:1000").unwrap(),
        IdMap {
            guest: 0,
            host: 1000,
            count: 1
        }
    );
    for (s, why) in [
        ("0", "expected GUEST:HOST"),
        ("0:1:2:3", "expected GUEST:HOST"),
        ("x:1", "not an id"),
        ("0:1:0", "at least 1"),
        ("0:4294967295", "not an id"),
        ("4294967290:0:10", "past the largest id"),
    ] {
        let e = IdMap::parse(s).unwrap_err();
        assert!(e.contains(why), "{s}: {e}");
    }
    let maps =
        |specs: &[&str]| IdMaps::new(specs.iter().map(|s| IdMap::parse(s).unwrap()).collect());
    let m = maps(&["10:20:5", "0:1000"]).unwrap();
    assert_eq!((m.to_host(14), m.to_host(15), m.to_host(0)), (24, 15, 1000));
    assert_eq!(
        (m.to_guest(20), m.to_guest(9), m.to_guest(1000)),
        (10, 9, 0)
    );
    // A swap is two ranges that overlap only across sides: allowed.
    let swap = maps(&["0:1000", "1000:0"]).unwrap();
    assert_eq!((swap.to_host(0), swap.to_host(1000)), (1000, 0));
    assert_eq!((swap.to_guest(0), swap.to_guest(1000)), (1000, 0));
    // Ranges that give an id two names on one side are refused, saying which ids.
    for (specs, why) in [
        (
            &["0:1000:10", "5:2000"][..],
            "0:1000:10 and 5:2000:1 both map guest ids 5 to 5",
        ),
        (
            &["0:1000:10", "100:1009:3"][..],
            "both map host ids 1009 to 1009",
        ),
        (
            &["0:1000:2", "2:2000", "1:3000:5"][..],
            "0:1000:2 and 1:3000:5 both map guest ids 1 to 1",
        ),
    ] {
        let e = maps(specs).unwrap_err();
        assert!(
            e.contains(why) && e.contains("do not overlap"),
            "{specs:?}: {e}"
        );
    }
}

/// GETATTR of `node`: (uid, gid, mode bits) as the guest sees them.
fn shown_attr(f: &Fixture, node: u64) -> (u32, u32, u32) {
    let (e, body) = f.call(
        opcode::GETATTR,
        node,
        &[abi::GetattrIn::default().as_slice()],
    );
    assert_eq!(e, 0);
    let mut out = abi::AttrOut::default();
    out.as_mut_slice().copy_from_slice(&body);
    (out.attr.uid, out.attr.gid, out.attr.mode & 0o7777)
}

/// SETATTR of `node` with `valid` fields: (errno, (uid, gid, mode bits) in the reply).
fn set_attr(f: &Fixture, node: u64, valid: u32, uid: u32, gid: u32, mode: u32) -> i32 {
    let s = abi::SetattrIn {
        valid,
        uid,
        gid,
        mode,
        ..Default::default()
    };
    f.call(opcode::SETATTR, node, &[s.as_slice()]).0
}

/// The host's (uid, gid, mode bits) of `p`, not following a symlink.
fn host_attr(p: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn kept(p: &Path) -> Option<String> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = [0u8; 128];
    // SAFETY: both strings are NUL-terminated and `buf` has the room given.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"user.containers.override_stat".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

#[test]
fn ownership_the_guest_sets_stays_off_the_host_by_default() {
    let f = fixture(false);
    // SAFETY: geteuid has no memory effects.
    let me = unsafe { libc::geteuid() };
    let share = f.share();
    let owner = host_attr(&share);
    f.init(0);

    // The guest's root plants a set-user-ID root program and gives a folder to 12345: both
    // look done in the guest, while the host files keep the share owner's ids and no set-id
    // bit.
    let plant = f.created("plant").nodeid;
    assert_eq!(
        kept(&share.join("plant")),
        None,
        "root's file as root: nothing to keep"
    );
    assert_eq!(set_attr(&f, plant, abi::fattr::MODE, 0, 0, 0o4755), 0);
    assert_eq!(shown_attr(&f, plant), (0, 0, 0o4755));
    assert_eq!(host_attr(&share.join("plant")), (owner.0, owner.1, 0o755));
    let mk = abi::MkdirIn {
        mode: 0o750,
        ..Default::default()
    };
    assert_eq!(f.call(opcode::MKDIR, 1, &[mk.as_slice(), b"data\0"]).0, 0);
    let data = f.lookup(1, "data").unwrap().nodeid;
    assert_eq!(
        set_attr(&f, data, abi::fattr::UID | abi::fattr::GID, 12345, 12345, 0),
        0
    );
    assert_eq!(shown_attr(&f, data), (12345, 12345, 0o750));
    assert_eq!(host_attr(&share.join("data")), (owner.0, owner.1, 0o750));
    assert_eq!(
        kept(&share.join("data")).as_deref(),
        Some("12345:12345:0750:dir")
    );
    // The share's folder is marked: from now on (and after a restart) nodes are asked.
    let c = std::ffi::CString::new(share.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: both strings are NUL-terminated; size 0 asks for the length only.
    let marked = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"user.ferry.keeps-ownership".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    assert!(marked >= 0, "the share's folder is not marked");

    // A guest user's file: the caller's ids in the guest, the share owner's on the host.
    let c = abi::CreateIn {
        flags: libc::O_RDWR as u32,
        mode: 0o640,
        ..Default::default()
    };
    let (e, body) = f.call_as((1000, 1001), opcode::CREATE, 1, &[c.as_slice(), b"users\0"]);
    assert_eq!(e, 0);
    let mut entry = abi::EntryOut::default();
    entry
        .as_mut_slice()
        .copy_from_slice(&body[..size_of::<abi::EntryOut>()]);
    assert_eq!(
        (entry.attr.uid, entry.attr.gid, entry.attr.mode & 0o7777),
        (1000, 1001, 0o640)
    );
    assert_eq!(host_attr(&share.join("users")), (owner.0, owner.1, 0o640));

    // A set-group-ID folder passes its group and the bit on, as on a local file system.
    assert_eq!(set_attr(&f, data, abi::fattr::MODE, 0, 0, 0o2775), 0);
    assert_eq!(host_attr(&share.join("data")).2, 0o775);
    let (e, _) = f.call(opcode::MKDIR, data, &[mk.as_slice(), b"sub\0"]);
    assert_eq!(e, 0);
    let sub = f.lookup(data, "sub").unwrap().nodeid;
    assert_eq!(shown_attr(&f, sub), (0, 12345, 0o2750));

    // A write by another user clears the set-user-ID bit the guest sees.
    let fh = open_rw(&f, plant);
    let w = abi::WriteIn {
        fh,
        size: 1,
        write_flags: abi::WRITE_KILL_SUIDGID,
        ..Default::default()
    };
    assert_eq!(f.call(opcode::WRITE, plant, &[w.as_slice(), b"x"]).0, 0);
    assert_eq!(shown_attr(&f, plant), (0, 0, 0o755));
    assert_eq!(set_attr(&f, plant, abi::fattr::MODE, 0, 0, 0o4755), 0);

    // The guest can neither read nor change the attribute that keeps it.
    let name = b"user.containers.override_stat\0";
    let g = abi::GetxattrIn {
        size: 64,
        ..Default::default()
    };
    assert_eq!(
        f.call(opcode::GETXATTR, data, &[g.as_slice(), name]).0,
        libc::ENODATA
    );
    let sx = abi::SetxattrIn {
        size: 9,
        ..Default::default()
    };
    assert_eq!(
        f.call(
            opcode::SETXATTR,
            plant,
            &[sx.as_slice(), name, b"0:0:04755"]
        )
        .0,
        libc::EPERM
    );
    assert_eq!(f.call(opcode::REMOVEXATTR, data, &[name]).0, libc::EPERM);
    let (e, body) = f.call(opcode::LISTXATTR, data, &[g.as_slice()]);
    assert_eq!(e, 0);
    assert!(
        !String::from_utf8_lossy(&body).contains("override_stat"),
        "{body:?}"
    );

    // Symlinks and FIFOs run nothing: their owner and mode reach the host file.
    std::os::unix::fs::symlink("plant", share.join("link")).unwrap();
    let link = f.lookup(1, "link").unwrap().nodeid;
    let chown_link = set_attr(&f, link, abi::fattr::UID, 7, 0, 0);
    assert_eq!(chown_link, if me == 0 { 0 } else { libc::EPERM });
    let fifo = abi::MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..Default::default()
    };
    assert_eq!(f.call(opcode::MKNOD, 1, &[fifo.as_slice(), b"fifo\0"]).0, 0);
    let fifo = f.lookup(1, "fifo").unwrap().nodeid;
    if me == 0 {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(set_attr(&f, fifo, abi::fattr::UID, 7, 0, 0), 0);
        assert_eq!(set_attr(&f, fifo, abi::fattr::MODE, 0, 0, 0o4640), 0);
        let host = |n: &str| std::fs::symlink_metadata(share.join(n)).unwrap();
        assert_eq!(host("link").uid(), 7);
        assert_eq!(
            (host("fifo").uid(), host("fifo").mode() & 0o7777),
            (7, 0o4640)
        );
    }

    // A new session (a remount) reads what was kept.
    f.call(opcode::DESTROY, 0, &[]);
    f.init(0);
    let plant = f.lookup(1, "plant").unwrap().nodeid;
    assert_eq!(shown_attr(&f, plant), (0, 0, 0o4755));
    let data = f.lookup(1, "data").unwrap();
    assert_eq!(
        (data.attr.uid, data.attr.gid, data.attr.mode & 0o7777),
        (12345, 12345, 0o2775)
    );
    // Back to the host's own values: nothing is kept.
    assert_eq!(
        set_attr(
            &f,
            data.nodeid,
            abi::fattr::UID | abi::fattr::GID | abi::fattr::MODE,
            owner.0,
            owner.1,
            0o755
        ),
        0
    );
    assert_eq!(kept(&share.join("data")), None);
    assert_eq!(me, 0, "these tests run as root");
}

#[test]
fn a_trusted_share_passes_ownership_to_the_host() {
    let cfg = Config {
        trusted: true,
        ..Default::default()
    };
    let f = fixture_config(cfg, |_| {});
    let share = f.dir.path().to_path_buf();
    // chown first: a chown clears the set-user-ID bit, on the host as anywhere.
    let node = f.created("plant").nodeid;
    let ids = abi::fattr::UID | abi::fattr::GID;
    assert_eq!(set_attr(&f, node, ids, 12345, 12345, 0), 0);
    assert_eq!(set_attr(&f, node, abi::fattr::MODE, 0, 0, 0o4755), 0);
    assert_eq!(host_attr(&share.join("plant")), (12345, 12345, 0o4755));
    assert_eq!(kept(&share.join("plant")), None);
}

#[test]
fn files_the_guest_makes_belong_to_the_share_owner_on_the_host() {
    let f = fixture_config(Config::default(), |d| {
        std::os::unix::fs::chown(d, Some(4321), Some(4322)).unwrap()
    });
    let share = f.dir.path().to_path_buf();
    let entry = f.created("made");
    assert_eq!((entry.attr.uid, entry.attr.gid), (0, 0));
    assert_eq!(host_attr(&share.join("made")), (4321, 4322, 0o644));
    assert_eq!(kept(&share.join("made")).as_deref(), Some("0:0:0644:file"));
    let mk = abi::MkdirIn {
        mode: 0o755,
        ..Default::default()
    };
    assert_eq!(f.call(opcode::MKDIR, 1, &[mk.as_slice(), b"d\0"]).0, 0);
    assert_eq!(host_attr(&share.join("d")), (4321, 4322, 0o755));
    assert_eq!(f.lookup(1, "d").unwrap().attr.uid, 0);
}

/// SETATTR of a symlink's times sets the link's own, as `touch -h` asks (utimensat with
/// AT_SYMLINK_NOFOLLOW in the guest), and leaves its target alone.
#[test]
fn a_symlinks_own_times_are_set() {
    use std::os::unix::fs::MetadataExt;
    let f = fixture(false);
    let share = f.share();
    std::fs::write(share.join("target"), b"x").unwrap();
    std::os::unix::fs::symlink("target", share.join("link")).unwrap();
    f.init(0);
    let link = f.lookup(1, "link").unwrap().nodeid;
    let s = abi::SetattrIn {
        valid: abi::fattr::MTIME,
        mtime: 1_000_000,
        ..Default::default()
    };
    assert_eq!(f.call(opcode::SETATTR, link, &[s.as_slice()]).0, 0);
    assert_eq!(
        std::fs::symlink_metadata(share.join("link"))
            .unwrap()
            .mtime(),
        1_000_000
    );
    assert_ne!(
        std::fs::metadata(share.join("target")).unwrap().mtime(),
        1_000_000
    );
}

/// On a `devices,trusted` share (a container's root file system) a device node's mode and
/// owner reach the host as the guest sets them, as any file's do there.
#[test]
fn a_trusted_devices_shares_device_nodes_take_chmod_and_chown() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let f = fixture_config(
        Config {
            trusted: true,
            devices: true,
            ..Default::default()
        },
        |_| {},
    );
    f.init(0);
    let mk = abi::MknodIn {
        mode: libc::S_IFCHR | 0o644,
        rdev: libc::makedev(1, 3) as u32,
        ..Default::default()
    };
    assert_eq!(f.call(opcode::MKNOD, 1, &[mk.as_slice(), b"null\0"]).0, 0);
    let node = f.lookup(1, "null").unwrap().nodeid;
    assert_eq!(set_attr(&f, node, abi::fattr::MODE, 0, 0, 0o111), 0);
    assert_eq!(set_attr(&f, node, abi::fattr::UID, 7, 0, 0), 0);
    let m = std::fs::symlink_metadata(f.dir.path().join("null")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid()), (0o111, 7));
}

#[test]
fn open_of_a_fifo_is_refused_at_once() {
    // Guest kernels open FIFOs themselves; an OPEN of one is a crafted driver's, and opening
    // the host's FIFO for reading waited for a writer, holding a thread of ferry's for good.
    let f = std::sync::Arc::new(fixture(false));
    let path =
        std::ffi::CString::new(f.share().join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `path` is NUL-terminated; mkfifo has no other memory effects.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
    f.init(0);
    let node = f.lookup(1, "fifo").unwrap().nodeid;
    let (tx, rx) = std::sync::mpsc::channel();
    let g = f.clone();
    std::thread::spawn(move || {
        let open = abi::OpenIn {
            flags: libc::O_RDONLY as u32,
            open_flags: 0,
        };
        let _ = tx.send(g.call(opcode::OPEN, node, &[open.as_slice()]).0);
    });
    let got = rx.recv_timeout(std::time::Duration::from_secs(5));
    assert_eq!(got, Ok(libc::ENXIO), "answered at once, with ENXIO");
}

/// A share with a pool answers some reads and writes on the thread that takes its requests
/// (`passthrough/quick.rs`): only where they cannot wait on a disk, a network or another
/// process. A READ of cached data through a handle opened O_DIRECT would still go to the
/// device; a WRITE through one opened O_DSYNC or O_DIRECT waits for it.
#[test]
fn only_handles_that_cannot_wait_are_read_and_written_on_the_worker() {
    use ferry_fs::FileSystem;
    let f = fixture(false);
    // SAFETY: statfs fills the struct it is given; the path is a valid C string.
    let kind = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        let p = std::ffi::CString::new(f.share().as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(libc::statfs(p.as_ptr(), &mut st), 0);
        st.f_type as i64
    };
    let local = [0xEF53, 0x5846_5342, 0x9123_683E, 0xF2F5_2010, 0x0102_1994].contains(&kind);
    let nowait_reads = [0xEF53, 0x5846_5342, 0x9123_683E].contains(&kind);
    let open = |name: &str, flags: i32| {
        let (e, body) = f.create(name, flags);
        assert_eq!(e, 0, "CREATE {name}");
        let mut open = abi::OpenOut::default();
        open.as_mut_slice().copy_from_slice(&body[128..]);
        open.fh
    };
    let plain = open("plain", libc::O_RDWR);
    let synced = open("synced", libc::O_RDWR | libc::O_DSYNC);
    let direct = open("direct", libc::O_RDWR | libc::O_DIRECT);
    assert_eq!(f.server.fs().write_is_quick(plain), local);
    assert!(!f.server.fs().write_is_quick(synced));
    assert!(!f.server.fs().write_is_quick(direct));
    assert!(!f.server.fs().write_is_quick(9999), "no such handle");
    std::fs::write(f.share().join("plain"), [5u8; 4096]).unwrap();
    let read = |fh: u64| {
        let r = abi::ReadIn {
            fh,
            size: 4096,
            ..Default::default()
        };
        let hdr = InHeader {
            len: (size_of::<InHeader>() + size_of::<abi::ReadIn>()) as u32,
            opcode: opcode::READ,
            nodeid: 2,
            ..Default::default()
        };
        let req = [hdr.as_slice(), r.as_slice()].concat();
        let w = ReplyBuf::new(4096 + 16);
        f.server
            .handle_read_if_cached(RequestBuf::new(req), w, 64 * 1024)
    };
    // Just written, so cached (tmpfs and other file systems without RWF_NOWAIT reads answer
    // EOPNOTSUPP: never read here). Which handles are never tried (O_DIRECT): the unit tests
    // of `passthrough/quick.rs`.
    assert_eq!(read(plain), nowait_reads.then_some(16 + 4096));
}
