//! Object-storage buckets connected to instances as directories
//! (docs/buckets.md), shared by the controller and the agent.
//!
//! An account keeps *storage connections* (an S3-protocol endpoint, a
//! region, a bucket and a key pair; the secret key is write-only: it is in
//! [`CreateStorageConnection`] and in the agent's [`BucketMount`], never in
//! a view, and `Debug` never shows it). A connection is *attached* to an
//! instance at a mount path (default `/mnt/<bucket>`), read-only or
//! read-write. The controller hands each host its whole bucket state
//! ([`HostBuckets`], revisioned like the network-group state); the host
//! mounts each bucket with a FUSE S3 filesystem and shares it into the
//! guest, and reports each attachment's health ([`BucketReport`]).
//!
//! Every value here ends up in a file the host writes (the s3fs password
//! file), a command line, a mount point or the guest's manifest, so each
//! struct has a `validate` that names the first bad field.

use crate::ids::{AccountId, InstanceId, StorageConnectionId};
use crate::net::Secret;
use crate::validate::{self, ValidationError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Most storage connections one account may have.
pub const MAX_CONNECTIONS_PER_ACCOUNT: usize = 64;
/// Most buckets one instance may have attached.
pub const MAX_ATTACHMENTS_PER_INSTANCE: usize = 8;
/// Longest mount path.
pub const MAX_MOUNT_PATH: usize = 200;
/// The region used when a connection names none.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Guest directories a bucket may not be mounted on or under: the system's
/// own, and the data volume's.
const RESERVED: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib64",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var",
    "/datadrive",
    "/root",
    "/tmp",
];

// ---------- API bodies ----------

/// `POST /v1/storage-connections`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateStorageConnection {
    pub name: String,
    /// `http://` or `https://` host (and port) of the S3-protocol endpoint.
    pub endpoint: String,
    #[serde(default)]
    pub region: Option<String>,
    pub bucket: String,
    pub access_key_id: String,
    /// Write-only: never shown again.
    pub secret_access_key: Secret,
    /// Create the bucket first (where the endpoint allows it); an existing
    /// bucket the key owns is fine.
    #[serde(default)]
    pub create_bucket: bool,
    /// Admins only: the account it is for.
    #[serde(default)]
    pub account: Option<AccountId>,
}

impl std::fmt::Debug for CreateStorageConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateStorageConnection")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("create_bucket", &self.create_bucket)
            .field("account", &self.account)
            .finish()
    }
}

impl CreateStorageConnection {
    /// The region, defaulted.
    pub fn region(&self) -> &str {
        self.region.as_deref().unwrap_or(DEFAULT_REGION)
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::object_name("name", &self.name)?;
        endpoint("endpoint", &self.endpoint)?;
        region("region", self.region())?;
        bucket_name("bucket", &self.bucket)?;
        key_part("access_key_id", &self.access_key_id, 128)?;
        key_part("secret_access_key", self.secret_access_key.expose(), 256)
    }
}

/// A storage connection as shown to its account: never the secret key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StorageConnectionInfo {
    pub id: StorageConnectionId,
    pub name: String,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    /// Instances it is attached to.
    pub attached_to: Vec<InstanceId>,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/instances/{id}/buckets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AttachBucket {
    pub connection: StorageConnectionId,
    /// Where the guest sees it; default `/mnt/<bucket>`.
    #[serde(default)]
    pub mount_path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

impl AttachBucket {
    /// The mount path, defaulted from the bucket's name.
    pub fn mount_path_for(&self, bucket: &str) -> String {
        self.mount_path
            .clone()
            .unwrap_or_else(|| format!("/mnt/{bucket}"))
    }
}

/// How an attachment stands on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum BucketHealth {
    /// Not yet reported by the host (or the instance is not on one).
    Pending,
    /// Mounted on the host and answering.
    Mounted,
    /// The mount failed or stopped answering; `detail` says why.
    Failed,
}

impl BucketHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Mounted => "mounted",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "mounted" => Self::Mounted,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

/// A bucket attached to an instance, as its account sees it (in the
/// instance's Config view and `GET /v1/instances/{id}/buckets`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BucketAttachmentInfo {
    pub connection: StorageConnectionId,
    pub connection_name: String,
    pub endpoint: String,
    pub bucket: String,
    pub mount_path: String,
    pub read_only: bool,
    pub health: BucketHealth,
    /// Why it failed, as the host said.
    #[serde(default)]
    pub detail: Option<String>,
}

// ---------- agent protocol ----------

/// One bucket a host must mount for one of its instances.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BucketMount {
    pub instance: InstanceId,
    pub connection: StorageConnectionId,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub mount_path: String,
    pub read_only: bool,
}

impl std::fmt::Debug for BucketMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketMount")
            .field("instance", &self.instance)
            .field("connection", &self.connection)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("mount_path", &self.mount_path)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl BucketMount {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let f = |n: &str| format!("{field}.{n}");
        endpoint(&f("endpoint"), &self.endpoint)?;
        region(&f("region"), &self.region)?;
        bucket_name(&f("bucket"), &self.bucket)?;
        key_part(&f("access_key_id"), &self.access_key_id, 128)?;
        key_part(
            &f("secret_access_key"),
            self.secret_access_key.expose(),
            256,
        )?;
        mount_path(&f("mount_path"), &self.mount_path)
    }
}

/// A host's whole bucket state: every attachment of its live instances.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostBuckets {
    /// Changes whenever the content does; the agent sends back the last one
    /// it received (`buckets_rev`).
    pub rev: u64,
    /// By instance, then connection.
    pub mounts: Vec<BucketMount>,
}

impl HostBuckets {
    pub fn validate(&self) -> Result<(), ValidationError> {
        let mut seen = std::collections::HashSet::new();
        let mut paths = std::collections::HashSet::new();
        for (i, m) in self.mounts.iter().enumerate() {
            let f = format!("mounts[{i}]");
            m.validate(&f)?;
            if !seen.insert((m.instance, m.connection)) {
                return Err(ValidationError::new(f, "repeats an attachment"));
            }
            if !paths.insert((m.instance, m.mount_path.clone())) {
                return Err(ValidationError::new(
                    format!("{f}.mount_path"),
                    "is another attachment's mount path",
                ));
            }
        }
        Ok(())
    }

    /// The attachments of instance `id`.
    pub fn of(&self, id: InstanceId) -> impl Iterator<Item = &BucketMount> {
        self.mounts.iter().filter(move |m| m.instance == id)
    }
}

/// An attachment's health as its host reports it (in the heartbeat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BucketReport {
    pub instance: InstanceId,
    pub connection: StorageConnectionId,
    pub health: BucketHealth,
    #[serde(default)]
    pub detail: Option<String>,
}

// ---------- validation ----------

/// S3 bucket names: 3 to 63 characters of lower-case letters, digits, `.`
/// and `-`, starting and ending with a letter or digit, no `..`, not an
/// IPv4 address.
pub fn bucket_name(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.len() < 3 || s.len() > 63 {
        return Err(ValidationError::new(
            field,
            "must be 3 to 63 characters long",
        ));
    }
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    if !s.chars().all(ok) {
        return Err(ValidationError::new(
            field,
            "may hold only lower-case letters, digits, '.' and '-'",
        ));
    }
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge(s.chars().next()) || !edge(s.chars().last()) {
        return Err(ValidationError::new(
            field,
            "must start and end with a letter or digit",
        ));
    }
    if s.contains("..") {
        return Err(ValidationError::new(field, "must not contain '..'"));
    }
    if s.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(ValidationError::new(field, "must not be an IP address"));
    }
    Ok(())
}

/// An endpoint: `http://` or `https://`, a host of letters, digits, `.`,
/// `-` (or a bracketed IPv6 address), an optional port, an optional `/`;
/// no user, path, query or fragment.
pub fn endpoint(field: &str, s: &str) -> Result<(), ValidationError> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| ValidationError::new(field, "must start with http:// or https://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.len() > 253 {
        return Err(ValidationError::new(field, "must name a host"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| ValidationError::new(field, "has an unclosed '['"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(ValidationError::new(field, "has a bad IPv6 address"));
        }
        (h, after.strip_prefix(':'))
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let host_ok = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == ':';
    if host.is_empty() || !host.chars().all(host_ok) {
        return Err(ValidationError::new(
            field,
            "must be a URL with only a scheme, a host and a port",
        ));
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(ValidationError::new(field, "has a bad port"));
        }
    }
    Ok(())
}

/// A region: 1 to 32 lower-case letters, digits and `-`.
pub fn region(field: &str, s: &str) -> Result<(), ValidationError> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if s.is_empty() || s.len() > 32 || !s.chars().all(ok) {
        return Err(ValidationError::new(
            field,
            "must be 1 to 32 lower-case letters, digits and '-'",
        ));
    }
    Ok(())
}

/// A key id or secret: 1 to `max` printable ASCII characters without
/// spaces or `:` (the s3fs password file's separator).
pub fn key_part(field: &str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > max {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {max} characters long"),
        ));
    }
    if !s.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        return Err(ValidationError::new(
            field,
            "may hold only printable ASCII without spaces or ':'",
        ));
    }
    Ok(())
}

/// A guest mount path: absolute, at most [`MAX_MOUNT_PATH`] characters of
/// letters, digits, `.`, `_`, `-` and `/`; no `.` or `..` component, no
/// empty component; not `/`, nor on or under a system directory or
/// `/datadrive`.
pub fn mount_path(field: &str, s: &str) -> Result<(), ValidationError> {
    if !s.starts_with('/') {
        return Err(ValidationError::new(field, "must be an absolute path"));
    }
    if s.len() > MAX_MOUNT_PATH {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_MOUNT_PATH} characters"),
        ));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
    if !s.chars().all(ok) {
        return Err(ValidationError::new(
            field,
            "may hold only letters, digits, '.', '_', '-' and '/'",
        ));
    }
    let parts: Vec<&str> = s[1..].split('/').collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(ValidationError::new(field, "must not contain '.' or '..'"));
    }
    if parts.iter().any(|p| p.is_empty()) {
        return Err(ValidationError::new(
            field,
            "must not be '/' nor hold empty components or a trailing '/'",
        ));
    }
    for r in RESERVED {
        if s == *r || s.starts_with(&format!("{r}/")) {
            return Err(ValidationError::new(
                field,
                format!("must not be on or under {r}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> CreateStorageConnection {
        CreateStorageConnection {
            name: "data".into(),
            endpoint: "http://127.0.0.1:9787".into(),
            region: None,
            bucket: "my-data.set1".into(),
            access_key_id: "AKIA123".into(),
            secret_access_key: Secret::new("top/secret+key="),
            create_bucket: false,
            account: None,
        }
    }

    #[test]
    fn a_good_connection_passes_and_defaults_its_region() {
        conn().validate().unwrap();
        assert_eq!(conn().region(), "us-east-1");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = conn();
        let shown = format!("{c:?}");
        assert!(!shown.contains("top/secret"), "{shown}");
        let m = BucketMount {
            instance: InstanceId::new(),
            connection: StorageConnectionId::new(),
            endpoint: c.endpoint.clone(),
            region: "us-east-1".into(),
            bucket: c.bucket.clone(),
            access_key_id: c.access_key_id.clone(),
            secret_access_key: c.secret_access_key.clone(),
            mount_path: "/mnt/x".into(),
            read_only: false,
        };
        let shown = format!(
            "{:?}",
            HostBuckets {
                rev: 1,
                mounts: vec![m]
            }
        );
        assert!(!shown.contains("top/secret"), "{shown}");
    }

    #[test]
    fn bad_fields_are_named() {
        type Edit = fn(&mut CreateStorageConnection);
        let cases: Vec<(Edit, &str)> = vec![
            (|c| c.endpoint = "ftp://x".into(), "endpoint"),
            (|c| c.endpoint = "http://u@x".into(), "endpoint"),
            (|c| c.endpoint = "http://x/path".into(), "endpoint"),
            (|c| c.endpoint = "http://x:0".into(), "endpoint"),
            (|c| c.endpoint = "https://".into(), "endpoint"),
            (|c| c.region = Some("US East".into()), "region"),
            (|c| c.bucket = "ab".into(), "bucket"),
            (|c| c.bucket = "Upper".into(), "bucket"),
            (|c| c.bucket = "-abc".into(), "bucket"),
            (|c| c.bucket = "a..b".into(), "bucket"),
            (|c| c.bucket = "10.0.0.1".into(), "bucket"),
            (|c| c.bucket = "a/b/c".into(), "bucket"),
            (|c| c.access_key_id = "a:b".into(), "access_key_id"),
            (|c| c.access_key_id = String::new(), "access_key_id"),
            (
                |c| c.secret_access_key = Secret::new("a\nb"),
                "secret_access_key",
            ),
            (|c| c.name = "bad name".into(), "name"),
        ];
        for (edit, field) in cases {
            let mut c = conn();
            edit(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn endpoints() {
        for ok in [
            "http://127.0.0.1:9787",
            "https://s3.eu-central-1.amazonaws.com/",
            "http://[::1]:9000",
            "http://minio",
        ] {
            endpoint("e", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["http://[::1", "http://a b", "http://x?y", "http://x#y", "x"] {
            assert!(endpoint("e", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_paths() {
        for ok in ["/mnt/data", "/data", "/home/user/ckpt", "/mnt/a.b_c-d"] {
            mount_path("p", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "mnt/x",
            "/",
            "/mnt/../etc",
            "/mnt/./x",
            "/mnt//x",
            "/mnt/x/",
            "/datadrive",
            "/datadrive/x",
            "/etc",
            "/usr/local/x",
            "/proc/1",
            "/mnt/x y",
            "/mnt/$(reboot)",
            "/mnt/a\nb",
        ] {
            let e = mount_path("mount_path", bad).expect_err(bad);
            assert_eq!(e.field, "mount_path");
        }
        assert!(mount_path("p", &format!("/{}", "a".repeat(MAX_MOUNT_PATH))).is_err());
    }

    #[test]
    fn default_mount_path_is_under_mnt() {
        let a = AttachBucket {
            connection: StorageConnectionId::new(),
            mount_path: None,
            read_only: true,
        };
        assert_eq!(a.mount_path_for("ckpt"), "/mnt/ckpt");
        mount_path("p", &a.mount_path_for("my-data.set1")).unwrap();
    }

    #[test]
    fn host_state_refuses_repeats() {
        let i = InstanceId::new();
        let m = |c: StorageConnectionId, p: &str| BucketMount {
            instance: i,
            connection: c,
            endpoint: "http://127.0.0.1:1".into(),
            region: "us-east-1".into(),
            bucket: "abc".into(),
            access_key_id: "k".into(),
            secret_access_key: Secret::new("s"),
            mount_path: p.into(),
            read_only: false,
        };
        let (a, b) = (StorageConnectionId::new(), StorageConnectionId::new());
        let ok = HostBuckets {
            rev: 1,
            mounts: vec![m(a, "/mnt/a"), m(b, "/mnt/b")],
        };
        ok.validate().unwrap();
        assert_eq!(ok.of(i).count(), 2);
        let twice = HostBuckets {
            rev: 1,
            mounts: vec![m(a, "/mnt/a"), m(a, "/mnt/b")],
        };
        assert_eq!(twice.validate().unwrap_err().field, "mounts[1]");
        let same = HostBuckets {
            rev: 1,
            mounts: vec![m(a, "/mnt/a"), m(b, "/mnt/a")],
        };
        assert_eq!(same.validate().unwrap_err().field, "mounts[1].mount_path");
        let bad = HostBuckets {
            rev: 1,
            mounts: vec![m(a, "/etc/x")],
        };
        assert_eq!(bad.validate().unwrap_err().field, "mounts[0].mount_path");
    }

    #[test]
    fn health_round_trips() {
        for h in [
            BucketHealth::Pending,
            BucketHealth::Mounted,
            BucketHealth::Failed,
        ] {
            assert_eq!(BucketHealth::parse(h.as_str()), Some(h));
            let j = serde_json::to_string(&h).unwrap();
            assert_eq!(j, format!("\"{}\"", h.as_str()));
        }
    }
}
