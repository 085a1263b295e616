//! Snapshot status: `Creating -> Success | Failed`, through one transition
//! function like the instance's.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SnapshotStatus {
    Creating,
    Success,
    Failed,
}

impl SnapshotStatus {
    pub const ALL: [SnapshotStatus; 3] = [Self::Creating, Self::Success, Self::Failed];

    pub fn name(self) -> &'static str {
        match self {
            Self::Creating => "Creating",
            Self::Success => "Success",
            Self::Failed => "Failed",
        }
    }

    pub fn can_become(self, to: SnapshotStatus) -> bool {
        matches!((self, to), (Self::Creating, Self::Success | Self::Failed))
    }

    pub fn transition(self, to: SnapshotStatus) -> Result<SnapshotStatus, String> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(format!("a snapshot cannot go from {self} to {to}"))
        }
    }
}

impl fmt::Display for SnapshotStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SnapshotStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown snapshot status {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustive_table() {
        use SnapshotStatus::*;
        for from in SnapshotStatus::ALL {
            for to in SnapshotStatus::ALL {
                let expected = matches!((from, to), (Creating, Success) | (Creating, Failed));
                assert_eq!(from.transition(to).is_ok(), expected, "{from} -> {to}");
            }
        }
    }
}
