//! FUSE requests into the real `Server` over a `PassthroughFs` serving a temporary folder, one
//! session per input: an INIT as a 5.x guest kernel sends it, then the input read as FUSE
//! messages one after another (each header's `len` says where the next begins), so lookups
//! and creates make nodes and handles that the following requests use. The share takes the
//! guest's security labels (`seclabel`, its `security.` names mapped to `user.`), so what
//! follows a create's name is parsed as a security context. A fresh folder every 1000 inputs
//! keeps what the inputs create from piling up.

#![no_main]

use std::sync::Mutex;

use ferry_fs::membuf::{ReplyBuf, RequestBuf};
use ferry_fs::passthrough::Config;
use ferry_fs::{FileSystem, PassthroughFs, Server, XattrMap};
use libfuzzer_sys::fuzz_target;

#[path = "common/fuse_init.rs"]
mod fuse_init;
use fuse_init::init;

struct Share {
    _dir: tempfile::TempDir,
    server: Server<PassthroughFs>,
    inputs: u32,
}

static SHARE: Mutex<Option<Share>> = Mutex::new(None);

fn share() -> Share {
    fuse_init::cap_file_size();
    let dir = tempfile::tempdir().expect("a temporary folder");
    std::fs::create_dir(dir.path().join("d")).ok();
    std::fs::write(dir.path().join("f"), b"ferry").ok();
    let labels = XattrMap::new(vec!["security.:user.virtiofs.security.".parse().unwrap()]);
    let cfg = Config {
        security_label: true,
        xattr_map: labels.expect("a valid xattr map"),
        ..Default::default()
    };
    let fs = PassthroughFs::new(dir.path(), cfg).expect("serve the folder");
    Share {
        _dir: dir,
        server: Server::new(fs),
        inputs: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = SHARE.lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_none_or(|s| s.inputs >= 1000) {
        *guard = Some(share());
    }
    let Some(s) = guard.as_mut() else { return };
    s.inputs += 1;
    let _ = s
        .server
        .handle_message(RequestBuf::new(init()), ReplyBuf::new(4096));
    let mut rest = data;
    while !rest.is_empty() {
        let len = rest
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .unwrap_or(rest.len());
        let len = len.clamp(1, rest.len());
        let (msg, tail) = rest.split_at(len);
        let _ = s
            .server
            .handle_message(RequestBuf::new(msg.to_vec()), ReplyBuf::new(256 * 1024));
        rest = tail;
    }
    // The session ends as a guest that goes away ends it: nodes and handles dropped.
    s.server.cancel_waits();
    s.server.fs().destroy();
});
