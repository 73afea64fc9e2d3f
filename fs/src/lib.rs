//! Ferry's file server: the FUSE wire ABI, a request dispatcher generic over a [`FileSystem`],
//! and [`PassthroughFs`], which serves a host directory.
//!
//! This crate knows nothing of virtio. Requests arrive through [`RequestReader`] and replies
//! leave through [`ReplyWriter`]; the virtio-fs device in `ferry-devices` implements both over
//! descriptor chains, and tests implement them over byte buffers.

pub mod abi;
mod filesystem;
pub mod passthrough;
mod server;

pub use filesystem::{Context, FileSystem, InitFlags};
pub use passthrough::{CachePolicy, PassthroughFs};
pub use server::{
    ByteBuf, Error, ReplyWriter, RequestReader, Result, Server, ServerStats, MAX_WRITE,
};
