//! Operations: the one model of work the controller asks a host to do.
//!
//! Every operation has a [`OperationKind`] (what it does) and an
//! [`OperationState`] that changes only through [`OperationState::apply`],
//! on the controller and in its tests alike:
//!
//! ```text
//! Pending --Progress--> Running --Progress--> Running
//! Pending | Running --Succeeded--> Succeeded
//! Pending | Running --Failed-----> Failed
//! Pending | Running --TimedOut---> TimedOut      (its host never finished it)
//! Pending | Running --Settled(ok)-> Succeeded | Failed   (an admin, by hand)
//! Succeeded, Failed, TimedOut: final
//! ```
//!
//! A report that arrives for an operation already ended (a host that comes
//! back after its operation timed out, a retried report) changes nothing:
//! [`OperationState::apply`] refuses it and the caller ignores it.

use crate::instance::Action;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum OperationKind {
    Create,
    Start,
    Stop,
    Reboot,
    ForceReboot,
    Suspend,
    Resume,
    ChangeType,
    GrowDisk,
    Release,
    Snapshot,
    DeleteSnapshot,
    SetPassword,
    /// Host operation: run the health gate on a cleared GPU.
    ClearGpu,
    /// Grow a data volume (attached or not) on its host.
    GrowVolume,
    /// Delete a detached data volume's file on its host.
    DeleteVolume,
    /// A move's first step, on the instance's host: save its root disk
    /// and data volume (it is Stopped) into the shared snapshot store.
    MoveOut,
    /// A move's second step, on the new host: restore them and define the
    /// instance there, Stopped.
    MoveIn,
    /// A move's last step, on the old host: remove the instance and its
    /// data volume there.
    MoveCleanup,
}

impl OperationKind {
    /// Every kind, in declaration order.
    pub const ALL: [OperationKind; 19] = [
        Self::Create,
        Self::Start,
        Self::Stop,
        Self::Reboot,
        Self::ForceReboot,
        Self::Suspend,
        Self::Resume,
        Self::ChangeType,
        Self::GrowDisk,
        Self::Release,
        Self::Snapshot,
        Self::DeleteSnapshot,
        Self::SetPassword,
        Self::ClearGpu,
        Self::GrowVolume,
        Self::DeleteVolume,
        Self::MoveOut,
        Self::MoveIn,
        Self::MoveCleanup,
    ];

    /// The name stored and shown (`change-type`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Reboot => "reboot",
            Self::ForceReboot => "force-reboot",
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::ChangeType => "change-type",
            Self::GrowDisk => "grow-disk",
            Self::Release => "release",
            Self::Snapshot => "snapshot",
            Self::DeleteSnapshot => "delete-snapshot",
            Self::SetPassword => "set-password",
            Self::ClearGpu => "clear-gpu",
            Self::GrowVolume => "grow-volume",
            Self::DeleteVolume => "delete-volume",
            Self::MoveOut => "move-out",
            Self::MoveIn => "move-in",
            Self::MoveCleanup => "move-cleanup",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The operation that carries out a tenant's instance action.
    pub fn for_action(a: Action) -> Self {
        match a {
            Action::Start => Self::Start,
            Action::Stop => Self::Stop,
            Action::Reboot => Self::Reboot,
            Action::ForceReboot => Self::ForceReboot,
            Action::Suspend => Self::Suspend,
            Action::Resume => Self::Resume,
            Action::ChangeType => Self::ChangeType,
            Action::GrowDisk => Self::GrowDisk,
            Action::Snapshot => Self::Snapshot,
            Action::Release => Self::Release,
        }
    }

    /// Whether the operation waits for its host however long it is away
    /// rather than timing out: a release on a dead host is settled when
    /// the host returns (the agent carries it out) or is removed.
    pub fn waits_for_host(self) -> bool {
        matches!(
            self,
            Self::Release | Self::DeleteVolume | Self::DeleteSnapshot
        )
    }

    /// How long the controller waits for a host to finish it by default
    /// (operators override it per kind in the controller's config).
    pub fn default_timeout_secs(self) -> u64 {
        match self {
            // Image downloads, restores of large snapshots.
            Self::Create => 6 * 3600,
            Self::Snapshot | Self::MoveOut | Self::MoveIn => 12 * 3600,
            Self::MoveCleanup => 3600,
            Self::GrowVolume | Self::GrowDisk | Self::ChangeType => 3600,
            Self::Release | Self::DeleteVolume | Self::DeleteSnapshot => 3600,
            Self::ClearGpu => 1800,
            Self::Start
            | Self::Stop
            | Self::Reboot
            | Self::ForceReboot
            | Self::Suspend
            | Self::Resume
            | Self::SetPassword => 900,
        }
    }
}

impl fmt::Display for OperationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum OperationState {
    /// Recorded; its host has not acknowledged it yet.
    Pending,
    /// Its host works on it.
    Running,
    Succeeded,
    Failed,
    /// Its host did not finish it in time; what it held was given back.
    TimedOut,
}

/// What happens to an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationEvent {
    /// The host acknowledged it or reported progress.
    Progress,
    Succeeded,
    Failed,
    TimedOut,
    /// An admin settled it by hand: succeeded (`true`) or failed.
    Settled(bool),
}

impl OperationEvent {
    /// Every event (for tables).
    pub const ALL: [OperationEvent; 6] = [
        Self::Progress,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Settled(true),
        Self::Settled(false),
    ];
}

/// A refused operation event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationTransitionError {
    pub from: OperationState,
    pub event: OperationEvent,
}

impl fmt::Display for OperationTransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "operation is already {} ({:?} changes nothing)",
            self.from.name(),
            self.event
        )
    }
}

impl std::error::Error for OperationTransitionError {}

impl OperationState {
    pub const ALL: [OperationState; 5] = [
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
    ];

    /// The stored and shown name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed-out",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Final states: nothing leaves them.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::TimedOut)
    }

    /// The one transition function.
    pub fn apply(self, event: OperationEvent) -> Result<Self, OperationTransitionError> {
        use OperationEvent as E;
        use OperationState as S;
        let to = match (self, event) {
            (S::Pending | S::Running, E::Progress) => S::Running,
            (S::Pending | S::Running, E::Succeeded | E::Settled(true)) => S::Succeeded,
            (S::Pending | S::Running, E::Failed | E::Settled(false)) => S::Failed,
            (S::Pending | S::Running, E::TimedOut) => S::TimedOut,
            (from, event) => return Err(OperationTransitionError { from, event }),
        };
        Ok(to)
    }
}

impl fmt::Display for OperationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OperationEvent as E;
    use OperationState as S;

    #[test]
    fn every_state_and_event() {
        let table: &[(S, E, Option<S>)] = &[
            (S::Pending, E::Progress, Some(S::Running)),
            (S::Pending, E::Succeeded, Some(S::Succeeded)),
            (S::Pending, E::Failed, Some(S::Failed)),
            (S::Pending, E::TimedOut, Some(S::TimedOut)),
            (S::Pending, E::Settled(true), Some(S::Succeeded)),
            (S::Pending, E::Settled(false), Some(S::Failed)),
            (S::Running, E::Progress, Some(S::Running)),
            (S::Running, E::Succeeded, Some(S::Succeeded)),
            (S::Running, E::Failed, Some(S::Failed)),
            (S::Running, E::TimedOut, Some(S::TimedOut)),
            (S::Running, E::Settled(true), Some(S::Succeeded)),
            (S::Running, E::Settled(false), Some(S::Failed)),
        ];
        for from in S::ALL {
            for ev in E::ALL {
                let want = table
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == ev)
                    .and_then(|(_, _, to)| *to);
                assert_eq!(from.apply(ev).ok(), want, "{from} + {ev:?}");
                if from.is_final() {
                    assert!(from.apply(ev).is_err(), "{from} is final");
                }
            }
        }
    }

    #[test]
    fn names_round_trip_and_match_serde() {
        for k in OperationKind::ALL {
            assert_eq!(OperationKind::parse(k.name()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
            assert!(k.default_timeout_secs() > 0);
        }
        for s in OperationState::ALL {
            assert_eq!(OperationState::parse(s.name()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        assert_eq!(OperationKind::parse("nonsense"), None);
    }

    #[test]
    fn every_action_has_an_operation_of_its_name() {
        for a in Action::ALL {
            assert_eq!(OperationKind::for_action(a).name(), a.name());
        }
    }
}
