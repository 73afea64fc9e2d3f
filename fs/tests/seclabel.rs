//! `seclabel` shares through the FUSE `Server`: the label a guest's LSM sends with CREATE,
//! MKDIR, MKNOD and SYMLINK (FUSE_SECURITY_CTX, in 6.1's layout and as a 6.2 request
//! extension) lands on the host node under the name the share's `xattrmap` gives it; what the
//! host cannot label is made unlabelled; a label that cannot be set fails the request and
//! leaves no node behind.

use std::ffi::CString;
use std::mem::size_of;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ferry_fs::abi::{self, opcode, InHeader, OutHeader};
use ferry_fs::membuf::{ReplyBuf, RequestBuf};
use ferry_fs::passthrough::Config;
use ferry_fs::{PassthroughFs, Server, XattrMap};
use vm_memory::ByteValued;

const HOST_NAME: &str = "user.virtiofs.security.selinux";

fn server(dir: &Path) -> Server<PassthroughFs> {
    let map = XattrMap::new(vec!["security.:user.virtiofs.security.".parse().unwrap()]).unwrap();
    let cfg = Config {
        security_label: true,
        xattr_map: map,
        ..Default::default()
    };
    Server::new(PassthroughFs::new(dir, cfg).unwrap())
}

/// Sends one request, with `ext` as a request extension; returns (errno, reply body).
fn call(s: &Server<PassthroughFs>, op: u32, parts: &[&[u8]], ext: &[u8]) -> (i32, Vec<u8>) {
    let body = [parts.concat(), ext.to_vec()].concat();
    let hdr = InHeader {
        len: (size_of::<InHeader>() + body.len()) as u32,
        opcode: op,
        unique: 9,
        nodeid: 1,
        total_extlen: (ext.len() / 8) as u16,
        ..Default::default()
    };
    let req = [hdr.as_slice(), &body].concat();
    let w = ReplyBuf::new(1 << 16);
    let n = s.handle_message(RequestBuf::new(req), w.clone()).unwrap();
    let reply = w.bytes(n);
    let mut out = OutHeader::default();
    out.as_mut_slice().copy_from_slice(&reply[..16]);
    (-out.error, reply[16..].to_vec())
}

/// INIT from a kernel that offers FUSE_SECURITY_CTX; returns whether it was taken.
fn init(s: &Server<PassthroughFs>) -> bool {
    let i = abi::InitIn {
        major: 7,
        minor: 38,
        max_readahead: 1 << 20,
        flags: (abi::INIT_EXT | abi::MAX_PAGES) as u32,
    };
    let (e, body) = call(
        s,
        opcode::INIT,
        &[i.as_slice(), &1u32.to_le_bytes(), &[0; 44]],
        &[],
    );
    assert_eq!(e, 0);
    let mut out = abi::InitOut::default();
    out.as_mut_slice().copy_from_slice(&body);
    out.flags2 & 1 != 0
}

/// The security context record the kernel sends (padded to 8).
fn label(name: &str, value: &[u8]) -> Vec<u8> {
    let mut l = (value.len() as u32).to_le_bytes().to_vec();
    l.extend_from_slice(&[0; 4]);
    l.extend_from_slice(name.as_bytes());
    l.push(0);
    l.extend_from_slice(value);
    while !l.len().is_multiple_of(8) {
        l.push(0);
    }
    let mut r = ((8 + l.len()) as u32).to_le_bytes().to_vec();
    r.extend_from_slice(&1u32.to_le_bytes());
    r.extend(l);
    r
}

fn host_label(p: &Path) -> Option<Vec<u8>> {
    let path = CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = CString::new(HOST_NAME).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and `buf` has the room given.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 256) };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

const CTX: &[u8] = b"system_u:object_r:container_file_t:s0\0";

#[test]
fn labels_land_on_what_the_guest_makes_in_both_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    assert!(init(&s), "a seclabel share takes FUSE_SECURITY_CTX");
    let sel = label("security.selinux", CTX);

    // 6.1: the context right after the name.
    let mk = abi::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let (e, _) = call(&s, opcode::MKDIR, &[mk.as_slice(), b"d\0", &sel], &[]);
    assert_eq!(e, 0);
    assert_eq!(host_label(&dir.path().join("d")).as_deref(), Some(CTX));

    // 6.2 and later: a request extension. A file made read-only is labelled all the same.
    let c = abi::CreateIn {
        flags: libc::O_RDONLY as u32,
        mode: 0o444,
        ..Default::default()
    };
    let (e, _) = call(&s, opcode::CREATE, &[c.as_slice(), b"f\0"], &sel);
    assert_eq!(e, 0);
    assert_eq!(host_label(&dir.path().join("f")).as_deref(), Some(CTX));

    // The host keeps no user. attribute on a symlink or FIFO: made, unlabelled.
    let (e, _) = call(&s, opcode::SYMLINK, &[b"l\0", b"f\0"], &sel);
    assert_eq!(e, 0);
    assert!(dir.path().join("l").symlink_metadata().is_ok());
    let mn = abi::MknodIn {
        mode: libc::S_IFIFO | 0o644,
        ..Default::default()
    };
    let (e, _) = call(&s, opcode::MKNOD, &[mn.as_slice(), b"p\0"], &sel);
    assert_eq!(e, 0);
    assert!(host_label(&dir.path().join("p")).is_none());

    // No LSM in the guest: an empty context, nothing set.
    let (e, _) = call(
        &s,
        opcode::MKDIR,
        &[mk.as_slice(), b"plain\0"],
        &[8, 0, 0, 0, 0, 0, 0, 0],
    );
    assert_eq!(e, 0);
    assert!(host_label(&dir.path().join("plain")).is_none());

    // The guest reads its label back under its own name.
    let other = label("security.selinux", b"x\0");
    let (e, _) = call(&s, opcode::MKDIR, &[mk.as_slice(), b"e\0"], &other);
    assert_eq!(e, 0);
    assert_eq!(
        host_label(&dir.path().join("e")).as_deref(),
        Some(&b"x\0"[..])
    );
}

#[test]
fn a_label_that_cannot_be_set_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    assert!(init(&s));
    // No rule maps trusted. names, and the guest may not set them on the host.
    let bad = label("trusted.label", CTX);
    let mk = abi::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let (e, _) = call(&s, opcode::MKDIR, &[mk.as_slice(), b"d\0", &bad], &[]);
    assert_eq!(e, libc::EPERM);
    assert!(!dir.path().join("d").exists());
    let c = abi::CreateIn {
        flags: libc::O_RDWR as u32,
        mode: 0o644,
        ..Default::default()
    };
    let (e, _) = call(&s, opcode::CREATE, &[c.as_slice(), b"f\0"], &bad);
    assert_eq!(e, libc::EPERM);
    assert!(!dir.path().join("f").exists());
    // A malformed context is EINVAL, and nothing is made.
    let sel = label("security.selinux", CTX);
    let (e, _) = call(&s, opcode::MKDIR, &[mk.as_slice(), b"m\0", &sel[..12]], &[]);
    assert_eq!(e, libc::EINVAL);
    assert!(!dir.path().join("m").exists());
}

#[test]
fn a_share_without_seclabel_does_not_ask() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::new(PassthroughFs::new(dir.path(), Config::default()).unwrap());
    assert!(!init(&s));
}
