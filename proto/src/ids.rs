//! Typed identifiers.
//!
//! Every object id is a UUID (v7, so ids sort by creation time) written with a
//! short type prefix, e.g. `ins-0190b4c2e7a47c3a9d2b8f1e4a6c0d12`. The textual
//! form contains only `[a-z0-9-]`, so an id is always safe to put in a path,
//! a libvirt domain name or a command line; parsing rejects anything else.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Error for a string that is not a valid id of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdParseError {
    pub kind: &'static str,
    pub input: String,
}

impl fmt::Display for IdParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.input.chars().take(80).collect();
        write!(f, "{shown:?} is not a valid {} id", self.kind)
    }
}

impl std::error::Error for IdParseError {}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// The prefix of this id's textual form.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(u: Uuid) -> Self {
                Self(u)
            }

            pub fn uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}-{}", $prefix, self.0.simple())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_prefixed(s, $prefix, $kind).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

fn parse_prefixed(s: &str, prefix: &str, kind: &'static str) -> Result<Uuid, IdParseError> {
    let err = || IdParseError {
        kind,
        input: s.to_string(),
    };
    let rest = s
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .ok_or_else(err)?;
    // Only the 32-hex-digit "simple" form is accepted, lower case, so that each
    // id has exactly one spelling.
    if rest.len() != 32
        || !rest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(err());
    }
    Uuid::parse_str(rest).map_err(|_| err())
}

define_id!(
    /// An instance (a virtual machine) on some host.
    InstanceId, "ins", "instance"
);
define_id!(
    /// A GPU server running `gantry-agent`.
    HostId, "host", "host"
);
define_id!(
    /// A tenant account.
    AccountId, "acct", "account"
);
define_id!(
    /// A snapshot of an instance's root disk.
    SnapshotId, "snap", "snapshot"
);
define_id!(
    /// A base image (or an image made from a snapshot).
    ImageId, "img", "image"
);
define_id!(
    /// A data volume, the disk the guest mounts at `/datadrive`.
    VolumeId, "vol", "volume"
);
define_id!(
    /// A flavor: a priced bundle of vCPUs, memory, disk and GPUs.
    FlavorId, "flv", "flavor"
);
define_id!(
    /// A long-running operation, reported by state and progress.
    OperationId, "op", "operation"
);
define_id!(
    /// An API token (the id, never the secret).
    TokenId, "tok", "token"
);
define_id!(
    /// A one-time token a host joins the controller with.
    JoinTokenId, "jtk", "join token"
);
define_id!(
    /// A port forward of an instance (a host port leading to a guest port).
    ForwardId, "fwd", "port forward"
);
define_id!(
    /// An SSH public key of an account.
    SshKeyId, "key", "ssh key"
);
define_id!(
    /// A network group: a private network between an account's instances.
    NetworkGroupId, "ng", "network group"
);
define_id!(
    /// An account's object-storage connection (endpoint, bucket, credentials).
    StorageConnectionId, "s3c", "storage connection"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text_and_json() {
        let id = InstanceId::new();
        let text = id.to_string();
        assert!(text.starts_with("ins-"));
        assert_eq!(text.len(), 4 + 32);
        assert_eq!(text.parse::<InstanceId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<InstanceId>(&json).unwrap(), id);
    }

    #[test]
    fn rejects_wrong_prefix_case_and_junk() {
        let id = InstanceId::new().to_string();
        let host_text = id.replacen("ins-", "host-", 1);
        assert!(host_text.parse::<InstanceId>().is_err());
        assert!(id.to_uppercase().parse::<InstanceId>().is_err());
        assert!("ins-../../etc/passwd".parse::<InstanceId>().is_err());
        assert!("ins-".parse::<InstanceId>().is_err());
        let err = "nope".parse::<SnapshotId>().unwrap_err();
        assert_eq!(err.to_string(), "\"nope\" is not a valid snapshot id");
        assert!(serde_json::from_str::<InstanceId>("\"x\"").is_err());
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = OperationId::new();
        let b = OperationId::new();
        assert!(a < b);
    }
}
