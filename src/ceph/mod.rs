//! Safe RAII wrappers over librados and librbd (Ceph 16.2 Pacific as Debian 12
//! packages it). All `unsafe` of the crate lives in this module: [`sys`] is the
//! checked-in bindgen output, the other submodules wrap it.
//!
//! Handles are reference counted one way: an image holds its ioctx, an ioctx
//! holds its cluster. Every call here is blocking (even aio submission may
//! wait on librbd locks): async code runs them through
//! `tokio::task::spawn_blocking` or on dedicated threads, never on runtime
//! worker threads.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod aio;
pub mod alloc;
pub mod error;
pub mod group;
pub mod objects;
pub mod rados;
pub mod rbd;
mod reaper;
#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks
)]
pub mod sys;
pub mod watch;

pub use error::{Error, ErrorKind, Result};
pub use objects::DataObjects;
pub use rados::{Cluster, ConnectConfig, IoCtx, OmapCmp, WriteOp};
pub use rbd::{
    CreateOptions, Image, ImageInfo, ImageSpec, LockMode, MigrationStatus, MirrorPeer, ParentSpec,
    SnapInfo, Watcher, features,
};
pub use watch::Watch;
