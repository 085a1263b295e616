//! Bodies of the HTTP APIs.
//!
//! - [`local`]: the agent's local operator API (instances on this host).
//! - [`v1`]: the controller's API for admins and tenants ([`fleet`]: its
//!   fleet bodies; [`accounts`]: accounts and tokens; [`groups`]: network groups;
//!   both re-exported by `v1`).
//! - [`agent`]: the agent <-> controller protocol.
//! - [`error`]: the error body every API answers with.

pub mod accounts;
pub mod agent;
pub mod error;
pub mod fleet;
pub mod groups;
pub mod local;
pub mod v1;
