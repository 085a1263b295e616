//! Types shared by `gantry-agent` and `gantry-controller`.
//!
//! This crate is a leaf: it depends only on serde and id/time types. It owns
//! the identifiers ([`ids`]), the instance and snapshot state machines
//! ([`instance`], [`snapshot`], [`gpu`]), the operations model ([`operation`]), the instance spec an agent turns into a VM
//! ([`spec`]), instance access networking ([`net`]), network groups ([`groups`]), input validation shared by every entry point ([`validate`]),
//! monitoring samples and the Monitor view ([`metrics`]), and the bodies of the HTTP APIs ([`api`]).

pub mod api;
pub mod buckets;
pub mod gpu;
pub mod groups;
pub mod ids;
pub mod instance;
pub mod metrics;
pub mod net;
#[cfg(feature = "openapi")]
mod openapi;
pub mod operation;
pub mod snapshot;
pub mod spec;
pub mod validate;

pub use ids::*;
pub use instance::{Action, InstanceState, TransitionError};
pub use operation::{OperationKind, OperationState};
pub use snapshot::SnapshotStatus;
pub use validate::ValidationError;
