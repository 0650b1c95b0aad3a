//! Safe RAII wrappers over librados and librbd. All `unsafe` of the crate lives
//! in this module.
