//! The instance state machine.
//!
//! One enum ([`InstanceState`]) and one transition function
//! ([`InstanceState::transition`]) that every state change goes through, on
//! the agent and in the controller alike. User-facing operations are
//! [`Action`]s; [`InstanceState::check_action`] says whether an action is
//! allowed in a state and, when it is not, gives a sentence naming the state.
//!
//! ```text
//! Creating -> Running | Stopped | Failed
//! Running  -> Stopped | Suspended | Snapshotting | Releasing
//! Stopped  -> Running | Releasing
//! Suspended -> Running | Stopped | Releasing
//! Snapshotting -> Running | Stopped       (the guest is paused only while its
//!                                          root disk switches to a fresh
//!                                          overlay; Stopped: it died meanwhile)
//! Releasing -> Released
//! Released, Failed: final
//! ```
//!
//! A snapshot is an operation with phases of its own (switch, save, merge):
//! the instance shows `Snapshotting` only for the instant its guest is
//! paused, and is `Running` (and billed) while the snapshot saves. Records
//! written before (`Suspending`, `Paused`, `Saving`) read as `Snapshotting`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum InstanceState {
    /// Disks and domain are being prepared.
    Creating,
    /// The guest runs (and is billed).
    Running,
    /// Shut down; disks kept; not billed.
    Stopped,
    /// Paused by its owner (`suspend`), memory kept.
    Suspended,
    /// The guest is paused while its root disk switches to a fresh
    /// overlay for a snapshot (milliseconds); not billed.
    #[serde(alias = "Suspending", alias = "Paused", alias = "Saving")]
    Snapshotting,
    /// Domain and root disk are being removed.
    Releasing,
    /// Gone for good; only the data volume may remain.
    Released,
    /// Creation failed and was rolled back; nothing remains on the host.
    Failed,
}

impl InstanceState {
    /// Every state, in declaration order (for tables and exhaustive tests).
    pub const ALL: [InstanceState; 8] = [
        Self::Creating,
        Self::Running,
        Self::Stopped,
        Self::Suspended,
        Self::Snapshotting,
        Self::Releasing,
        Self::Released,
        Self::Failed,
    ];

    /// The status users filter on (the state's name).
    pub fn status(self) -> &'static str {
        self.name()
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Creating => "Creating",
            Self::Running => "Running",
            Self::Stopped => "Stopped",
            Self::Suspended => "Suspended",
            Self::Snapshotting => "Snapshotting",
            Self::Releasing => "Releasing",
            Self::Released => "Released",
            Self::Failed => "Failed",
        }
    }

    pub fn is_snapshotting(self) -> bool {
        self == Self::Snapshotting
    }

    /// Final states: nothing ever leaves them.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Released | Self::Failed)
    }

    /// Whether the instance is billed for time spent in this state.
    pub fn is_billed(self) -> bool {
        self == Self::Running
    }

    /// Whether `self -> to` is an edge of the state machine.
    pub fn can_become(self, to: InstanceState) -> bool {
        use InstanceState::*;
        matches!(
            (self, to),
            (Creating, Running | Stopped | Failed)
                | (Running, Stopped | Suspended | Snapshotting | Releasing)
                | (Stopped, Running | Releasing)
                | (Suspended, Running | Stopped | Releasing)
                | (Snapshotting, Running | Stopped)
                | (Releasing, Released)
        )
    }

    /// The one transition function: returns the new state or an error that
    /// names both states. Staying in the same state is not a transition.
    pub fn transition(self, to: InstanceState) -> Result<InstanceState, TransitionError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError::Illegal { from: self, to })
        }
    }

    /// Whether `to` can be reached from `self` through zero or more edges.
    pub fn can_reach(self, to: InstanceState) -> bool {
        let mut seen = vec![self];
        let mut i = 0;
        while i < seen.len() {
            let from = seen[i];
            if from == to {
                return true;
            }
            for next in Self::ALL {
                if from.can_become(next) && !seen.contains(&next) {
                    seen.push(next);
                }
            }
            i += 1;
        }
        false
    }

    /// Applies a state a host *observed*, which may skip steps the reporter
    /// went through between two reports (Running -> Snapshotting -> Running
    /// reads as Running -> Running). Accepted when `to` is
    /// reachable from `self`; a report that would leave a final state or go
    /// backwards along no path is refused, so a stale report cannot
    /// resurrect a released instance.
    pub fn observe(self, to: InstanceState) -> Result<InstanceState, TransitionError> {
        if self == to || self.can_reach(to) {
            Ok(to)
        } else {
            Err(TransitionError::Illegal { from: self, to })
        }
    }

    /// Whether `action` may be asked for in this state.
    pub fn check_action(self, action: Action) -> Result<(), TransitionError> {
        use Action::*;
        use InstanceState::*;
        let ok = match action {
            Start => self == Stopped,
            Stop => matches!(self, Running | Suspended),
            Reboot | ForceReboot | Suspend => self == Running,
            // A stopped instance is saved from its disk as it is.
            Snapshot => matches!(self, Running | Stopped),
            Resume => self == Suspended,
            ChangeType => self == Stopped,
            GrowDisk => matches!(self, Running | Stopped),
            Release => matches!(self, Running | Stopped | Suspended),
        };
        if ok {
            Ok(())
        } else {
            Err(TransitionError::NotAllowed {
                action,
                state: self,
            })
        }
    }

    /// The actions allowed in this state, in [`Action::ALL`] order.
    pub fn allowed_actions(self) -> Vec<Action> {
        Action::ALL
            .into_iter()
            .filter(|a| self.check_action(*a).is_ok())
            .collect()
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for InstanceState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The snapshot phases of earlier versions.
        if ["Suspending", "Paused", "Saving"]
            .iter()
            .any(|old| old.eq_ignore_ascii_case(s))
        {
            return Ok(Self::Snapshotting);
        }
        Self::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown instance state {s:?}"))
    }
}

/// An operation a user (or the controller) asks of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Start,
    Stop,
    Reboot,
    ForceReboot,
    Suspend,
    Resume,
    ChangeType,
    GrowDisk,
    Snapshot,
    Release,
}

impl Action {
    pub const ALL: [Action; 10] = [
        Self::Start,
        Self::Stop,
        Self::Reboot,
        Self::ForceReboot,
        Self::Suspend,
        Self::Resume,
        Self::ChangeType,
        Self::GrowDisk,
        Self::Snapshot,
        Self::Release,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Reboot => "reboot",
            Self::ForceReboot => "force-reboot",
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::ChangeType => "change-type",
            Self::GrowDisk => "grow-disk",
            Self::Snapshot => "snapshot",
            Self::Release => "release",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A refused state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransitionError {
    Illegal {
        from: InstanceState,
        to: InstanceState,
    },
    NotAllowed {
        action: Action,
        state: InstanceState,
    },
}

impl fmt::Display for TransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Illegal { from, to } => {
                write!(f, "an instance cannot go from {from} to {to}")
            }
            Self::NotAllowed { action, state } => {
                write!(f, "cannot {action} an instance that is {state}")
            }
        }
    }
}

impl std::error::Error for TransitionError {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use InstanceState::*;

    /// The whole edge table, written out once more by hand: every (from, to)
    /// pair of states is checked against it.
    const EDGES: &[(InstanceState, InstanceState)] = &[
        (Creating, Running),
        (Creating, Stopped),
        (Creating, Failed),
        (Running, Stopped),
        (Running, Suspended),
        (Running, Snapshotting),
        (Running, Releasing),
        (Stopped, Running),
        (Stopped, Releasing),
        (Suspended, Running),
        (Suspended, Stopped),
        (Suspended, Releasing),
        (Snapshotting, Running),
        (Snapshotting, Stopped),
        (Releasing, Released),
    ];

    #[test]
    fn exhaustive_transition_table() {
        for from in InstanceState::ALL {
            for to in InstanceState::ALL {
                let expected = EDGES.contains(&(from, to));
                let got = from.transition(to);
                assert_eq!(got.is_ok(), expected, "{from} -> {to}");
                if let Err(e) = got {
                    assert_eq!(
                        e.to_string(),
                        format!("an instance cannot go from {from} to {to}")
                    );
                }
            }
        }
    }

    #[test]
    fn final_states_have_no_exits_and_only_running_is_billed() {
        for s in InstanceState::ALL {
            let exits = InstanceState::ALL
                .iter()
                .filter(|t| s.can_become(**t))
                .count();
            assert_eq!(s.is_final(), exits == 0, "{s}");
            assert_eq!(s.is_billed(), s == Running);
        }
    }

    #[test]
    fn earlier_snapshot_phases_read_as_snapshotting() {
        assert_eq!(Snapshotting.status(), "Snapshotting");
        assert_eq!(Running.status(), "Running");
        assert_eq!("released".parse::<InstanceState>().unwrap(), Released);
        for old in ["Suspending", "Paused", "Saving"] {
            assert_eq!(old.parse::<InstanceState>().unwrap(), Snapshotting);
            let json = format!("\"{old}\"");
            assert_eq!(
                serde_json::from_str::<InstanceState>(&json).unwrap(),
                Snapshotting
            );
        }
        assert_eq!(
            serde_json::to_string(&Snapshotting).unwrap(),
            "\"Snapshotting\""
        );
    }

    #[test]
    fn action_refusal_names_the_state() {
        let e = Stopped.check_action(Action::Reboot).unwrap_err();
        assert_eq!(e.to_string(), "cannot reboot an instance that is Stopped");
        assert_eq!(
            Running.allowed_actions(),
            vec![
                Action::Stop,
                Action::Reboot,
                Action::ForceReboot,
                Action::Suspend,
                Action::GrowDisk,
                Action::Snapshot,
                Action::Release
            ]
        );
        assert!(Stopped.allowed_actions().contains(&Action::Snapshot));
        for s in [Snapshotting, Releasing, Released, Failed, Creating] {
            assert!(s.allowed_actions().is_empty(), "{s}");
        }
    }

    fn any_state() -> impl Strategy<Value = InstanceState> {
        prop::sample::select(InstanceState::ALL.to_vec())
    }

    proptest! {
        /// Any sequence of attempted transitions keeps the machine on its
        /// edges: a refused step leaves the state as it was, and a final
        /// state is never left.
        #[test]
        fn random_walks_stay_on_edges(steps in prop::collection::vec(any_state(), 0..64)) {
            let mut state = Creating;
            for to in steps {
                let before = state;
                match state.transition(to) {
                    Ok(next) => {
                        prop_assert!(EDGES.contains(&(before, next)));
                        prop_assert!(!before.is_final());
                        state = next;
                    }
                    Err(_) => prop_assert_eq!(state, before),
                }
            }
        }

        /// An allowed action always has an edge to leave by, except those that
        /// keep the state (reboot, grow-disk, change-type).
        #[test]
        fn allowed_actions_are_consistent(s in any_state()) {
            for a in s.allowed_actions() {
                let target = match a {
                    Action::Start | Action::Resume => Some(Running),
                    Action::Stop => Some(Stopped),
                    Action::Suspend => Some(Suspended),
                    // A running guest pauses for the switch; a stopped
                    // one is saved as it is.
                    Action::Snapshot if s == Running => Some(Snapshotting),
                    Action::Snapshot => None,
                    Action::Release => Some(Releasing),
                    Action::Reboot | Action::ForceReboot | Action::GrowDisk | Action::ChangeType => None,
                };
                if let Some(t) = target {
                    prop_assert!(s.can_become(t), "{} allowed in {} but no edge to {}", a, s, t);
                }
            }
        }
    }

    #[test]
    fn observe_accepts_reachable_states_only() {
        use InstanceState::*;
        for from in InstanceState::ALL {
            for to in InstanceState::ALL {
                let direct = from == to || from.can_become(to);
                if direct {
                    assert!(from.observe(to).is_ok(), "{from} -> {to}");
                }
                if from.is_final() && from != to {
                    assert!(from.observe(to).is_err(), "{from} -> {to}");
                }
            }
        }
        assert!(Snapshotting.observe(Released).is_ok());
        assert!(Creating.observe(Released).is_ok());
        assert!(Stopped.observe(Snapshotting).is_ok());
        assert!(Released.observe(Running).is_err());
        assert!(Releasing.observe(Running).is_err());
    }
}
