//! Ferry's file server: the FUSE wire ABI, a request dispatcher generic over a [`FileSystem`],
//! and [`PassthroughFs`], which serves a host directory.
//!
//! This crate knows nothing of virtio. Requests arrive through [`RequestReader`] and replies
//! leave through [`ReplyWriter`]; the virtio-fs device in `ferry-devices` implements both over
//! descriptor chains, and [`membuf`] implements them over memory.

pub mod abi;
pub mod audit;
mod filesystem;
/// Serving a [`FileSystem`] through the host kernel's /dev/fuse (`ferry mount`).
pub mod fuse_host;
pub mod membuf;
pub mod passthrough;
mod server;
mod stats;

pub use filesystem::{
    read_cached_into, Context, DirEntry, Entry, FileLock, FileReader, FileSystem, FileWriter,
    InitFlags, SecCtx, SetattrArgs, TimeSpec,
};
pub use passthrough::{CachePolicy, IdMap, IdMaps, PassthroughFs, XattrMap, XattrRule};
pub use server::{
    may_block, Error, ReplyWriter, RequestReader, Result, Server, ServerStats, MAX_WRITE,
};
pub use stats::LATENCY_BUCKETS;
