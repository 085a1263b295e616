//! The GPU health state machine, shared by the agent (which owns each
//! GPU's health) and the controller (which schedules on it and lets an
//! admin clear a quarantined GPU).
//!
//! One enum ([`GpuHealth`]), one transition function
//! ([`GpuHealth::apply`]) that every change goes through:
//!
//! ```text
//! Healthy     --lease-->        Leased
//! Healthy     --recheck-->      Checking      (a fault a reset clears: XID 63,
//!                                              pending row remaps, ...)
//! Healthy     --fault-->        Quarantined   (XID 79, uncorrected ECC, ...)
//! Leased      --return-->       Checking      (the VM let go of it)
//! Leased      --fault-->        Leased        (seen mid-lease; the gate
//!                                              decides when it comes back)
//! Checking    --passed-->       Healthy       (the gate found it sound, reset)
//! Checking    --failed/fault--> Quarantined
//! Quarantined --clear-->        Checking      (an admin cleared it; the gate
//!                                              runs again before any lease)
//! Lost        --clear-->        Checking
//! Lost        --found-->        Quarantined   (back on the bus; an admin
//!                                              must clear it)
//! any         --lost-->         Lost          (fell off the bus)
//! ```
//!
//! Only `Healthy` GPUs are leased; the controller's scheduler skips every
//! other state, so `Checking`, `Quarantined` and `Lost` are told apart from
//! `Leased` (held by an instance) and from a GPU that is simply gone from
//! the host's report (removed).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The health of one whole GPU, as its host reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum GpuHealth {
    /// In the pool: may be leased.
    #[default]
    Healthy,
    /// Passed through to an instance.
    Leased,
    /// Going through the health gate (back from a VM, or cleared).
    Checking,
    /// Never leased again until an admin clears it.
    Quarantined { reason: String },
    /// Gone from the PCI bus (or NVML says it fell off).
    Lost,
}

/// [`GpuHealth`] without its data: for tables, SQL columns and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum GpuHealthKind {
    Healthy,
    Leased,
    Checking,
    Quarantined,
    Lost,
}

impl GpuHealthKind {
    pub const ALL: [GpuHealthKind; 5] = [
        Self::Healthy,
        Self::Leased,
        Self::Checking,
        Self::Quarantined,
        Self::Lost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Leased => "leased",
            Self::Checking => "checking",
            Self::Quarantined => "quarantined",
            Self::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for GpuHealthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuEvent {
    /// Passed through to an instance.
    Lease,
    /// The instance let go of it (stopped for good, released, detached).
    Return,
    /// A fault a reset clears was seen on an idle GPU.
    Recheck,
    /// A fault that takes the GPU out of service.
    Fault { reason: String },
    /// The health gate passed (and reset the GPU).
    Passed,
    /// The health gate failed.
    Failed { reason: String },
    /// Gone from the bus.
    Lost,
    /// Enumerated again after being lost.
    Found,
    /// An admin cleared a quarantined or lost GPU.
    Clear,
}

impl GpuEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Lease => "lease",
            Self::Return => "return",
            Self::Recheck => "recheck",
            Self::Fault { .. } => "fault",
            Self::Passed => "passed",
            Self::Failed { .. } => "failed",
            Self::Lost => "lost",
            Self::Found => "found",
            Self::Clear => "clear",
        }
    }
}

/// A GPU event that does not apply in the GPU's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuTransitionError {
    pub state: GpuHealthKind,
    pub event: &'static str,
}

impl fmt::Display for GpuTransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} GPU cannot take `{}`", self.state, self.event)
    }
}

impl std::error::Error for GpuTransitionError {}

impl GpuHealth {
    pub fn kind(&self) -> GpuHealthKind {
        match self {
            Self::Healthy => GpuHealthKind::Healthy,
            Self::Leased => GpuHealthKind::Leased,
            Self::Checking => GpuHealthKind::Checking,
            Self::Quarantined { .. } => GpuHealthKind::Quarantined,
            Self::Lost => GpuHealthKind::Lost,
        }
    }

    /// Why the GPU is quarantined, if it is.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Quarantined { reason } => Some(reason),
            _ => None,
        }
    }

    /// Rebuilds a health from its kind and reason (a stored row).
    pub fn from_parts(kind: GpuHealthKind, reason: Option<String>) -> Self {
        match kind {
            GpuHealthKind::Healthy => Self::Healthy,
            GpuHealthKind::Leased => Self::Leased,
            GpuHealthKind::Checking => Self::Checking,
            GpuHealthKind::Quarantined => Self::Quarantined {
                reason: reason.unwrap_or_else(|| "quarantined".into()),
            },
            GpuHealthKind::Lost => Self::Lost,
        }
    }

    /// Whether a new lease may take this GPU.
    pub fn is_leasable(&self) -> bool {
        matches!(self, Self::Healthy)
    }

    /// Whether an admin may clear this GPU.
    pub fn is_clearable(&self) -> bool {
        matches!(self, Self::Quarantined { .. } | Self::Lost)
    }

    /// The one transition function: the health after `event`.
    pub fn apply(&self, event: GpuEvent) -> Result<GpuHealth, GpuTransitionError> {
        use GpuEvent as E;
        use GpuHealth as H;
        let next = match (self, event) {
            (_, E::Lost) => H::Lost,
            (H::Healthy, E::Lease) => H::Leased,
            (H::Healthy, E::Recheck) => H::Checking,
            (H::Healthy | H::Checking, E::Fault { reason }) => H::Quarantined { reason },
            (H::Leased, E::Return) => H::Checking,
            (H::Leased, E::Fault { .. }) => H::Leased,
            (H::Checking, E::Passed) => H::Healthy,
            (H::Checking, E::Failed { reason }) => H::Quarantined { reason },
            (H::Quarantined { reason }, E::Fault { .. }) => H::Quarantined {
                reason: reason.clone(),
            },
            (H::Quarantined { .. } | H::Lost, E::Clear) => H::Checking,
            (H::Lost, E::Found) => H::Quarantined {
                reason: "was lost from the bus".into(),
            },
            (H::Lost, E::Fault { .. }) => H::Lost,
            (s, e) => {
                return Err(GpuTransitionError {
                    state: s.kind(),
                    event: e.name(),
                })
            }
        };
        Ok(next)
    }
}

impl fmt::Display for GpuHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Quarantined { reason } => write!(f, "quarantined: {reason}"),
            s => f.write_str(s.kind().name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GpuHealthKind as K;

    fn sample(k: K) -> GpuHealth {
        GpuHealth::from_parts(k, Some("xid 79".into()))
    }

    fn events() -> Vec<GpuEvent> {
        vec![
            GpuEvent::Lease,
            GpuEvent::Return,
            GpuEvent::Recheck,
            GpuEvent::Fault {
                reason: "new".into(),
            },
            GpuEvent::Passed,
            GpuEvent::Failed {
                reason: "new".into(),
            },
            GpuEvent::Lost,
            GpuEvent::Found,
            GpuEvent::Clear,
        ]
    }

    #[test]
    fn exhaustive_transition_table() {
        // (state, event) -> next kind, or None when refused.
        let table: &[(K, &str, Option<K>)] = &[
            (K::Healthy, "lease", Some(K::Leased)),
            (K::Healthy, "return", None),
            (K::Healthy, "recheck", Some(K::Checking)),
            (K::Healthy, "fault", Some(K::Quarantined)),
            (K::Healthy, "passed", None),
            (K::Healthy, "failed", None),
            (K::Healthy, "lost", Some(K::Lost)),
            (K::Healthy, "found", None),
            (K::Healthy, "clear", None),
            (K::Leased, "lease", None),
            (K::Leased, "return", Some(K::Checking)),
            (K::Leased, "recheck", None),
            (K::Leased, "fault", Some(K::Leased)),
            (K::Leased, "passed", None),
            (K::Leased, "failed", None),
            (K::Leased, "lost", Some(K::Lost)),
            (K::Leased, "found", None),
            (K::Leased, "clear", None),
            (K::Checking, "lease", None),
            (K::Checking, "return", None),
            (K::Checking, "recheck", None),
            (K::Checking, "fault", Some(K::Quarantined)),
            (K::Checking, "passed", Some(K::Healthy)),
            (K::Checking, "failed", Some(K::Quarantined)),
            (K::Checking, "lost", Some(K::Lost)),
            (K::Checking, "found", None),
            (K::Checking, "clear", None),
            (K::Quarantined, "lease", None),
            (K::Quarantined, "return", None),
            (K::Quarantined, "recheck", None),
            (K::Quarantined, "fault", Some(K::Quarantined)),
            (K::Quarantined, "passed", None),
            (K::Quarantined, "failed", None),
            (K::Quarantined, "lost", Some(K::Lost)),
            (K::Quarantined, "found", None),
            (K::Quarantined, "clear", Some(K::Checking)),
            (K::Lost, "lease", None),
            (K::Lost, "return", None),
            (K::Lost, "recheck", None),
            (K::Lost, "fault", Some(K::Lost)),
            (K::Lost, "passed", None),
            (K::Lost, "failed", None),
            (K::Lost, "lost", Some(K::Lost)),
            (K::Lost, "found", Some(K::Quarantined)),
            (K::Lost, "clear", Some(K::Checking)),
        ];
        assert_eq!(table.len(), K::ALL.len() * events().len());
        for s in K::ALL {
            for e in events() {
                let want = table
                    .iter()
                    .find(|(k, n, _)| *k == s && *n == e.name())
                    .unwrap_or_else(|| panic!("{s} / {} missing from the table", e.name()))
                    .2;
                let got = sample(s).apply(e.clone()).ok().map(|h| h.kind());
                assert_eq!(got, want, "{s} --{}-->", e.name());
            }
        }
    }

    #[test]
    fn only_healthy_is_leasable_and_a_quarantine_keeps_its_first_reason() {
        for k in K::ALL {
            assert_eq!(sample(k).is_leasable(), k == K::Healthy);
            assert_eq!(
                sample(k).is_clearable(),
                matches!(k, K::Quarantined | K::Lost)
            );
        }
        let q = GpuHealth::Healthy
            .apply(GpuEvent::Fault {
                reason: "XID 79".into(),
            })
            .unwrap()
            .apply(GpuEvent::Fault {
                reason: "XID 48".into(),
            })
            .unwrap();
        assert_eq!(q.reason(), Some("XID 79"));
        let err = GpuHealth::Leased.apply(GpuEvent::Lease).unwrap_err();
        assert_eq!(err.to_string(), "a leased GPU cannot take `lease`");
    }

    #[test]
    fn health_serializes_tagged_and_kinds_round_trip() {
        let q = GpuHealth::Quarantined {
            reason: "XID 79 (GPU has fallen off the bus)".into(),
        };
        let j = serde_json::to_string(&q).unwrap();
        assert_eq!(
            j,
            r#"{"state":"quarantined","reason":"XID 79 (GPU has fallen off the bus)"}"#
        );
        assert_eq!(serde_json::from_str::<GpuHealth>(&j).unwrap(), q);
        assert_eq!(
            serde_json::to_string(&GpuHealth::Leased).unwrap(),
            r#"{"state":"leased"}"#
        );
        for k in K::ALL {
            assert_eq!(GpuHealthKind::parse(k.name()), Some(k));
            let h = GpuHealth::from_parts(k, Some("r".into()));
            assert_eq!(h.kind(), k);
        }
    }
}
