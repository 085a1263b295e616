//! Buckets as directories (docs/buckets.md): storage connections
//! (connect, list, show, disconnect) and attachments to instances (attach,
//! detach, list). The secret key is read from a file or from
//! `GANTRY_S3_SECRET_ACCESS_KEY`, never from the command line (where `ps`
//! would show it).

use crate::client::{CliResult, Fail};
use crate::{body, call, Call};
use clap::Subcommand;
use gantry_proto::buckets::{AttachBucket, CreateStorageConnection};
use gantry_proto::ids::{AccountId, InstanceId, StorageConnectionId};
use gantry_proto::net::Secret;
use reqwest::Method as M;
use std::path::PathBuf;

/// Where the secret key comes from when no `--secret-file` is given.
const SECRET_ENV: &str = "GANTRY_S3_SECRET_ACCESS_KEY";

#[derive(Subcommand)]
pub enum BucketCmd {
    /// Add a storage connection (checked against the endpoint first).
    Connect {
        name: String,
        /// http:// or https:// endpoint of the S3-protocol service.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        bucket: String,
        #[arg(long)]
        access_key_id: String,
        /// A file holding the secret key [default: $GANTRY_S3_SECRET_ACCESS_KEY].
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// [default: us-east-1]
        #[arg(long)]
        region: Option<String>,
        /// Create the bucket first (an existing one the key owns is fine).
        #[arg(long)]
        create: bool,
        /// For admins: the owning account.
        #[arg(long)]
        account: Option<AccountId>,
    },
    /// The account's storage connections.
    Connections {
        /// Another account's (admin).
        #[arg(long)]
        account: Option<AccountId>,
    },
    /// Delete a storage connection attached nowhere (the bucket stays).
    Disconnect { id: StorageConnectionId },
    /// Attach a connection's bucket to an instance as a directory.
    Attach {
        instance: InstanceId,
        connection: StorageConnectionId,
        /// Where the guest sees it [default: /mnt/<bucket>].
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        read_only: bool,
    },
    /// Detach a bucket (what was written stays in the bucket).
    Detach {
        instance: InstanceId,
        connection: StorageConnectionId,
    },
    /// The buckets attached to an instance, with their health.
    List { instance: InstanceId },
}

const CONN_COLS: &[&str] = &[
    "id",
    "name",
    "endpoint",
    "bucket",
    "access_key_id",
    "attached_to",
];
const ATTACH_COLS: &[&str] = &[
    "connection",
    "bucket",
    "mount_path",
    "read_only",
    "health",
    "detail",
];

fn secret(file: Option<PathBuf>) -> CliResult<Secret> {
    let text = match file {
        Some(f) => std::fs::read_to_string(&f)
            .map_err(|e| Fail::Local(format!("cannot read {}: {e}", f.display())))?,
        None => std::env::var(SECRET_ENV).map_err(|_| {
            Fail::Local(format!(
                "no secret key: pass --secret-file or set {SECRET_ENV}"
            ))
        })?,
    };
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

pub fn plan_bucket(c: BucketCmd) -> CliResult<Call> {
    Ok(match c {
        BucketCmd::Connect {
            name,
            endpoint,
            bucket,
            access_key_id,
            secret_file,
            region,
            create,
            account,
        } => {
            let b = body(&CreateStorageConnection {
                name,
                endpoint,
                region,
                bucket,
                access_key_id,
                secret_access_key: secret(secret_file)?,
                create_bucket: create,
                account,
            });
            call(M::POST, v1!("storage-connections"), b, &[])
        }
        BucketCmd::Connections { account } => call(
            M::GET,
            v1!("storage-connections").query(&[("account", account.map(|a| a.to_string()))]),
            None,
            CONN_COLS,
        ),
        BucketCmd::Disconnect { id } => call(M::DELETE, v1!("storage-connections", id), None, &[]),
        BucketCmd::Attach {
            instance,
            connection,
            path,
            read_only,
        } => call(
            M::POST,
            v1!("instances", instance, "buckets"),
            body(&AttachBucket {
                connection,
                mount_path: path,
                read_only,
            }),
            &[],
        ),
        BucketCmd::Detach {
            instance,
            connection,
        } => call(
            M::DELETE,
            v1!("instances", instance, "buckets", connection),
            None,
            &[],
        ),
        BucketCmd::List { instance } => call(
            M::GET,
            v1!("instances", instance, "buckets"),
            None,
            ATTACH_COLS,
        ),
    })
}
