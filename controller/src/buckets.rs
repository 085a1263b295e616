//! Buckets connected to instances as directories (docs/buckets.md): an
//! account's storage connections (the secret key sealed under
//! `storage_connections.secret: <id>`, opened only to hand it to the host
//! that mounts the bucket), their attachments to instances, the host's
//! whole bucket state for the work long-poll ([`host_buckets`], revisioned
//! by content like the network-group state), the health hosts report, and
//! the signed S3 requests that check a connection ([`probe`]) or create its
//! bucket ([`create_bucket`]) before anything is stored or attached.
//!
//! The secret key never leaves this module except inside a
//! [`BucketMount`] for the host's authenticated work answer; errors and
//! logs name the endpoint, bucket and key id only.

use crate::db::{col, parsed, DbError, Tx};
use crate::secrets::{Sealer, SecretError};
use axum::http::{Method, Request};
use gantry_proto::buckets::{BucketHealth, BucketMount, BucketReport, HostBuckets};
use gantry_proto::ids::{AccountId, HostId, InstanceId, StorageConnectionId};
use gantry_proto::net::Secret;
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::HttpRequestBody;
use std::time::Duration;

/// How long a check or create may take in all.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// Longest health detail stored from a host.
pub const MAX_DETAIL: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("the endpoint {endpoint} cannot be reached: {why}")]
    Unreachable { endpoint: String, why: String },
    #[error("bucket {bucket:?} does not exist at {endpoint}")]
    NoSuchBucket { endpoint: String, bucket: String },
    #[error(
        "the endpoint {endpoint} refused access key {key_id:?} for bucket {bucket:?} (HTTP \
         {status}): wrong access key or secret, or the key may not use this bucket"
    )]
    Refused {
        endpoint: String,
        bucket: String,
        key_id: String,
        status: u16,
    },
    #[error("bucket {bucket:?} is in another region than {region:?} (HTTP {status})")]
    WrongRegion {
        bucket: String,
        region: String,
        status: u16,
    },
    #[error("the endpoint {endpoint} answered HTTP {status} for bucket {bucket:?}")]
    Other {
        endpoint: String,
        bucket: String,
        status: u16,
    },
    #[error("bucket {bucket:?} is taken by another owner at {endpoint}")]
    Taken { endpoint: String, bucket: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for BucketError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e.into())
    }
}

/// What a connection reaches: endpoint, region, bucket and the key pair.
pub struct Target<'a> {
    pub endpoint: &'a str,
    pub region: &'a str,
    pub bucket: &'a str,
    pub key_id: &'a str,
    pub secret: &'a Secret,
}

impl Target<'_> {
    fn url(&self) -> String {
        format!("{}/{}", self.endpoint.trim_end_matches('/'), self.bucket)
    }

    /// Sends one SigV4-signed request on the bucket (path-style).
    async fn send(&self, method: Method, body: Vec<u8>) -> Result<u16, BucketError> {
        let unreachable = |why: String| BucketError::Unreachable {
            endpoint: self.endpoint.into(),
            why,
        };
        let mut req: Request<HttpRequestBody> = Request::builder()
            .method(method.clone())
            .uri(self.url())
            .body(HttpRequestBody::from(body.clone()))
            .map_err(|e| unreachable(e.to_string()))?;
        let cred = AwsCredential {
            key_id: self.key_id.into(),
            secret_key: self.secret.expose().into(),
            token: None,
        };
        AwsAuthorizer::new(&cred, "s3", self.region).authorize(&mut req, None);
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(PROBE_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        let mut out = client.request(method, self.url()).body(body);
        for (name, value) in req.headers() {
            out = out.header(name, value);
        }
        let res = out.send().await.map_err(|e| {
            // reqwest's error names the URL (no credentials in it).
            unreachable(std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string()))
        })?;
        Ok(res.status().as_u16())
    }

    fn verdict(&self, status: u16) -> Result<(), BucketError> {
        match status {
            200..=299 => Ok(()),
            404 => Err(BucketError::NoSuchBucket {
                endpoint: self.endpoint.into(),
                bucket: self.bucket.into(),
            }),
            401 | 403 => Err(BucketError::Refused {
                endpoint: self.endpoint.into(),
                bucket: self.bucket.into(),
                key_id: self.key_id.into(),
                status,
            }),
            301 | 400 => Err(BucketError::WrongRegion {
                bucket: self.bucket.into(),
                region: self.region.into(),
                status,
            }),
            _ => Err(BucketError::Other {
                endpoint: self.endpoint.into(),
                bucket: self.bucket.into(),
                status,
            }),
        }
    }
}

/// Checks that the bucket exists and the key may use it: a signed
/// `HEAD /<bucket>` (S3's HeadBucket).
pub async fn probe(t: &Target<'_>) -> Result<(), BucketError> {
    let status = t.send(Method::HEAD, Vec::new()).await?;
    t.verdict(status)
}

/// Creates the bucket (a signed `PUT /<bucket>`); a bucket the key already
/// owns is fine.
pub async fn create_bucket(t: &Target<'_>) -> Result<(), BucketError> {
    let body = if t.region == "us-east-1" {
        Vec::new()
    } else {
        format!(
            "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
            t.region
        )
        .into_bytes()
    };
    match t.send(Method::PUT, body).await? {
        // 409 BucketAlreadyOwnedByYou or BucketAlreadyExists: tell them apart.
        409 => probe(t).await.map_err(|e| match e {
            BucketError::Refused { .. } => BucketError::Taken {
                endpoint: t.endpoint.into(),
                bucket: t.bucket.into(),
            },
            e => e,
        }),
        s => t.verdict(s),
    }
}

/// The sealing context of a connection's secret key.
pub fn secret_context(id: StorageConnectionId) -> String {
    format!("storage_connections.secret: {id}")
}

/// A stored connection.
#[derive(Debug, Clone)]
pub struct ConnectionRow {
    pub id: StorageConnectionId,
    pub account: AccountId,
    pub name: String,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    /// Sealed; see [`open_secret`].
    pub secret_sealed: String,
    pub created_ms: i64,
}

pub const CONNECTION_COLS: &str = "id, account_id, name, endpoint, region, bucket, \
     access_key_id, secret_sealed, created_ms";

pub fn connection_row(r: &sqlx::any::AnyRow) -> Result<ConnectionRow, DbError> {
    const T: &str = "storage_connections";
    Ok(ConnectionRow {
        id: parsed(r, "id", T)?,
        account: parsed(r, "account_id", T)?,
        name: col(r, "name")?,
        endpoint: col(r, "endpoint")?,
        region: col(r, "region")?,
        bucket: col(r, "bucket")?,
        access_key_id: col(r, "access_key_id")?,
        secret_sealed: col(r, "secret_sealed")?,
        created_ms: col(r, "created_ms")?,
    })
}

impl ConnectionRow {
    pub fn open_secret(&self, sealer: &Sealer) -> Result<Secret, SecretError> {
        sealer.open(&secret_context(self.id), &self.secret_sealed)
    }
}

pub async fn insert_connection(tx: &mut Tx, c: &ConnectionRow) -> Result<(), DbError> {
    sqlx::query(&format!(
        "INSERT INTO storage_connections ({CONNECTION_COLS}) VALUES ($1, $2, $3, $4, $5, $6, \
         $7, $8, $9)"
    ))
    .bind(c.id.to_string())
    .bind(c.account.to_string())
    .bind(&c.name)
    .bind(&c.endpoint)
    .bind(&c.region)
    .bind(&c.bucket)
    .bind(&c.access_key_id)
    .bind(&c.secret_sealed)
    .bind(c.created_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An attachment with its connection.
#[derive(Debug, Clone)]
pub struct AttachmentRow {
    pub instance: InstanceId,
    pub connection: ConnectionRow,
    pub mount_path: String,
    pub read_only: bool,
    pub health: BucketHealth,
    pub detail: Option<String>,
}

const ATTACHMENT_SELECT: &str = "SELECT a.instance_id, a.mount_path, a.read_only, a.health, \
     a.detail, c.id, c.account_id, c.name, c.endpoint, c.region, c.bucket, c.access_key_id, \
     c.secret_sealed, c.created_ms FROM bucket_attachments a JOIN storage_connections c ON \
     c.id = a.connection_id";

fn attachment_row(r: &sqlx::any::AnyRow) -> Result<AttachmentRow, DbError> {
    const T: &str = "bucket_attachments";
    let health: String = col(r, "health")?;
    Ok(AttachmentRow {
        instance: parsed(r, "instance_id", T)?,
        connection: connection_row(r)?,
        mount_path: col(r, "mount_path")?,
        read_only: col::<i64>(r, "read_only")? != 0,
        health: BucketHealth::parse(&health).unwrap_or(BucketHealth::Pending),
        detail: col(r, "detail")?,
    })
}

/// The attachments of `instance`, by mount path.
pub async fn attachments_of<'e, E>(
    ex: E,
    instance: InstanceId,
) -> Result<Vec<AttachmentRow>, DbError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let found = sqlx::query(&format!(
        "{ATTACHMENT_SELECT} WHERE a.instance_id = $1 ORDER BY a.mount_path"
    ))
    .bind(instance.to_string())
    .fetch_all(ex)
    .await?;
    found.iter().map(attachment_row).collect()
}

/// The instances (not Released) a connection is attached to.
pub async fn attached_to<'e, E>(ex: E, c: StorageConnectionId) -> Result<Vec<InstanceId>, DbError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let found = sqlx::query(
        "SELECT a.instance_id FROM bucket_attachments a JOIN instances i ON i.id = \
         a.instance_id WHERE a.connection_id = $1 AND i.observed_state <> 'Released' ORDER BY \
         a.instance_id",
    )
    .bind(c.to_string())
    .fetch_all(ex)
    .await?;
    found
        .iter()
        .map(|r| parsed(r, "instance_id", "bucket_attachments"))
        .collect()
}

/// Forgets the attachments of instances that are Released (their buckets
/// keep their data; only the link is gone).
pub async fn forget_released(tx: &mut Tx) -> Result<(), DbError> {
    sqlx::query(
        "DELETE FROM bucket_attachments WHERE instance_id IN (SELECT id FROM instances WHERE \
         observed_state = 'Released')",
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// `host`'s whole bucket state: every attachment of its live instances,
/// with the secret keys opened (for the host's work answer only).
pub async fn host_buckets(
    pool: &sqlx::AnyPool,
    sealer: &Sealer,
    host: &HostId,
) -> Result<HostBuckets, BucketError> {
    let found = sqlx::query(&format!(
        "{ATTACHMENT_SELECT} JOIN instances i ON i.id = a.instance_id WHERE i.host_id = $1 AND \
         i.observed_state NOT IN ('Released', 'Failed') ORDER BY a.instance_id, c.id"
    ))
    .bind(host.to_string())
    .fetch_all(pool)
    .await?;
    let mut mounts = Vec::with_capacity(found.len());
    for r in &found {
        let a = attachment_row(r)?;
        let c = &a.connection;
        mounts.push(BucketMount {
            instance: a.instance,
            connection: c.id,
            endpoint: c.endpoint.clone(),
            region: c.region.clone(),
            bucket: c.bucket.clone(),
            access_key_id: c.access_key_id.clone(),
            secret_access_key: c.open_secret(sealer)?,
            mount_path: a.mount_path.clone(),
            read_only: a.read_only,
        });
    }
    Ok(HostBuckets {
        rev: rev_of(&mounts),
        mounts,
    })
}

/// A digest of the content: the same state has the same revision, any
/// change (a rotated secret included) moves it. 53 bits, exact in JSON.
pub fn rev_of(mounts: &[BucketMount]) -> u64 {
    let json = serde_json::to_vec(mounts).unwrap_or_default();
    let digest = blake3::hash(&json);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first) & ((1 << 53) - 1)
}

/// Records the health `host` reports for its instances' attachments
/// (reports about other hosts' instances are ignored).
pub async fn record_reports(
    tx: &mut Tx,
    host: &HostId,
    reports: &[BucketReport],
) -> Result<(), DbError> {
    for r in reports {
        let detail = r.detail.as_ref().map(|d| {
            d.chars()
                .filter(|c| !c.is_control())
                .take(MAX_DETAIL)
                .collect::<String>()
        });
        sqlx::query(
            "UPDATE bucket_attachments SET health = $1, detail = $2 WHERE instance_id = $3 AND \
             connection_id = $4 AND instance_id IN (SELECT id FROM instances WHERE host_id = $5)",
        )
        .bind(r.health.as_str())
        .bind(detail)
        .bind(r.instance.to_string())
        .bind(r.connection.to_string())
        .bind(host.to_string())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_never_carry_the_secret() {
        let e = BucketError::Refused {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            key_id: "AKID".into(),
            status: 403,
        };
        let text = e.to_string();
        assert!(
            text.contains("AKID") && text.contains("wrong access key"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_not_a_hang() {
        // A port nobody listens on (bound, then dropped).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let secret = Secret::new("never-shown-secret");
        let t = Target {
            endpoint: &endpoint,
            region: "us-east-1",
            bucket: "abc",
            key_id: "k",
            secret: &secret,
        };
        let e = probe(&t).await.unwrap_err();
        assert!(matches!(e, BucketError::Unreachable { .. }), "{e}");
        assert!(!e.to_string().contains("never-shown"), "{e}");
    }

    #[test]
    fn revision_follows_content() {
        let m = BucketMount {
            instance: InstanceId::new(),
            connection: StorageConnectionId::new(),
            endpoint: "http://127.0.0.1:1".into(),
            region: "us-east-1".into(),
            bucket: "abc".into(),
            access_key_id: "k".into(),
            secret_access_key: Secret::new("s"),
            mount_path: "/mnt/abc".into(),
            read_only: false,
        };
        let mut ro = m.clone();
        ro.read_only = true;
        assert_eq!(
            rev_of(std::slice::from_ref(&m)),
            rev_of(std::slice::from_ref(&m))
        );
        assert_ne!(rev_of(&[m]), rev_of(&[ro]));
        assert!(rev_of(&[]) < (1 << 53));
    }
}
