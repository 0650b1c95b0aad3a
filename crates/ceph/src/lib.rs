//! Safe RAII wrappers over librados and librbd (Ceph 16.2 Pacific as Debian 12
//! packages it). This crate and `csirr-ceph-sys` (the raw FFI it wraps) are the
//! only ones with `unsafe`; every block has a `SAFETY:` comment.
//!
//! Handles are reference counted one way: an image holds its ioctx, an ioctx
//! holds its cluster. Every call here is blocking (even aio submission may
//! wait on librbd locks): async code runs them through
//! `tokio::task::spawn_blocking` or on dedicated threads, never on runtime
//! worker threads.

#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod admin;
pub mod aio;
pub mod alloc;
pub mod error;
pub mod group;
pub mod objects;
pub mod rados;
pub mod rbd;
mod reaper;
pub mod watch;

pub use error::{Error, ErrorKind, Result};
pub use objects::DataObjects;
pub use rados::{Cluster, ConnectConfig, IoCtx, OmapCmp, WriteOp};
pub use rbd::{
    CreateOptions, Image, ImageInfo, ImageSpec, LockMode, MigrationStatus, MirrorPeer, ParentSpec,
    SnapInfo, Watcher, features,
};
pub use watch::Watch;
