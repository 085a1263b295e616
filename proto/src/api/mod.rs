//! Bodies of the HTTP APIs.
//!
//! - [`local`]: the agent's local operator API (instances on this host).
//! - [`error`]: the error body every API answers with.

pub mod error;
pub mod local;
pub mod v1;
