//! What the targets that serve a share share (included with `#[path]` by `fuse_requests`
//! and `queue_chains`): the FUSE INIT they open their session with, and a cap on the size
//! of the files the inputs make.

/// Caps every file this process writes at 64 MiB, and makes a write past it fail with
/// EFBIG instead of killing the process with SIGXFSZ. Without it, an input's FALLOCATE or
/// WRITE at a large offset fills the disk under the temporary folder (one run left 55 GB).
pub fn cap_file_size() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let limit = libc::rlimit {
            rlim_cur: 64 << 20,
            rlim_max: 64 << 20,
        };
        // SAFETY: setrlimit reads the struct given; ignoring SIGXFSZ installs no handler.
        unsafe {
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0, "setrlimit");
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        }
    });
}

/// An INIT from a guest kernel of FUSE 7.38 offering what 6.1 offers (FUSE_SECURITY_CTX, in
/// flags2, included: a share with `seclabel` takes it, and its creates carry a context).
pub fn init() -> Vec<u8> {
    let mut m = Vec::with_capacity(104);
    let body_len = 64u32;
    m.extend_from_slice(&(40 + body_len).to_le_bytes()); // len
    m.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
    m.extend_from_slice(&1u64.to_le_bytes()); // unique
    m.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen + padding
    m.extend_from_slice(&7u32.to_le_bytes());
    m.extend_from_slice(&38u32.to_le_bytes());
    m.extend_from_slice(&(128u32 << 10).to_le_bytes()); // max_readahead
    m.extend_from_slice(&0xffff_fffbu32.to_le_bytes()); // flags
    m.extend_from_slice(&1u32.to_le_bytes()); // flags2: FUSE_SECURITY_CTX
    m.resize(40 + body_len as usize, 0);
    m
}
