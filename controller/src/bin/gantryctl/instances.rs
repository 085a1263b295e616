//! Instance commands (list, get and views, create, actions, batch,
//! password), snapshots and volumes.

use crate::client::{CliResult, Client, Fail};
use crate::{body, call, Call};
use clap::Subcommand;
use gantry_proto::api::v1::*;
use gantry_proto::ids::*;
use reqwest::Method as M;

#[derive(Subcommand)]
pub enum InstanceCmd {
    List {
        /// Running, Stopped, Snapshotting, Released, ...
        #[arg(long)]
        status: Option<String>,
    },
    /// Summary, or one view.
    Get {
        id: InstanceId,
        #[arg(long, value_parser = ["access", "monitor", "billing", "config", "hardware",
            "network-group"])]
        view: Option<String>,
        /// With `--view monitor`: how far back (`15m`, `1h`, `7d`, or RFC
        /// 3339) [default: 1h].
        #[arg(long)]
        since: Option<String>,
    },
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        flavor: FlavorId,
        #[arg(long, conflicts_with = "snapshot")]
        image: Option<ImageId>,
        #[arg(long)]
        snapshot: Option<SnapshotId>,
        #[arg(long)]
        data_volume: Option<VolumeId>,
        /// Extra guest TCP port to forward (repeatable; SSH and JupyterLab
        /// always are).
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// pack (default) or spread.
        #[arg(long, value_parser = parse_placement)]
        placement: Option<Placement>,
        /// For admins: the owning account.
        #[arg(long)]
        account: Option<AccountId>,
        /// The region to place it in [default: the snapshot's region, else
        /// the controller's default region].
        #[arg(long)]
        region: Option<String>,
        /// A network group of the account to put it in (a second NIC,
        /// eth1, on the group's private network).
        #[arg(long)]
        network_group: Option<NetworkGroupId>,
    },
    /// start, stop, reboot, force-reboot, suspend, resume, change-type,
    /// grow-disk, release.
    Action {
        id: InstanceId,
        action: String,
        #[arg(long)]
        flavor: Option<FlavorId>,
        #[arg(long)]
        root_disk_gib: Option<u64>,
    },
    /// The same action on many instances.
    Batch {
        action: String,
        #[arg(required = true)]
        ids: Vec<InstanceId>,
        #[arg(long)]
        flavor: Option<FlavorId>,
        #[arg(long)]
        root_disk_gib: Option<u64>,
    },
    /// Reveal root's password (audited); `--reset` sets a new one and waits
    /// until the host has applied it.
    Password {
        id: InstanceId,
        #[arg(long)]
        reset: bool,
        /// How long `--reset` waits for the host.
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Snapshots with their status and progress.
    List {
        #[arg(long)]
        status: Option<String>,
        /// Only the snapshots of this region.
        #[arg(long)]
        region: Option<String>,
    },
    /// One snapshot (progress, sizes, error).
    Get {
        id: SnapshotId,
    },
    Create {
        instance: InstanceId,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        auto_release: bool,
        #[arg(long)]
        as_image: bool,
    },
    Delete {
        id: SnapshotId,
    },
}

#[derive(Subcommand)]
pub enum VolumeCmd {
    List,
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        size_gib: u64,
        #[arg(long)]
        account: Option<AccountId>,
        /// Place it on this host now (admins).
        #[arg(long, conflicts_with = "instance")]
        host: Option<HostId>,
        /// Place it on this instance's host now.
        #[arg(long)]
        instance: Option<InstanceId>,
    },
    Get {
        id: VolumeId,
    },
    /// Grow one volume, or several to the same size (never shrinks).
    Grow {
        #[arg(required = true)]
        ids: Vec<VolumeId>,
        #[arg(long)]
        size_gib: u64,
    },
    /// Delete a detached volume (and its file on its host).
    Delete {
        id: VolumeId,
    },
}

fn parse_placement(s: &str) -> Result<Placement, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?} is not a placement (pack or spread)"))
}

const INSTANCE_COLS: &[&str] = &[
    "id",
    "name",
    "status",
    "progress_percent",
    "region",
    "host",
    "cost_micros",
    "allowed_actions",
];

fn action(name: &str, flavor: Option<FlavorId>, gib: Option<u64>) -> CliResult<InstanceAction> {
    let missing = |what: &str| Fail::Local(format!("{name} needs --{what}"));
    Ok(match name {
        "start" => InstanceAction::Start {},
        "stop" => InstanceAction::Stop {},
        "reboot" => InstanceAction::Reboot {},
        "force-reboot" => InstanceAction::ForceReboot {},
        "suspend" => InstanceAction::Suspend {},
        "resume" => InstanceAction::Resume {},
        "release" => InstanceAction::Release {},
        "change-type" => InstanceAction::ChangeType {
            flavor: flavor.ok_or_else(|| missing("flavor"))?,
        },
        "grow-disk" => InstanceAction::GrowDisk {
            root_disk_gib: gib.ok_or_else(|| missing("root-disk-gib"))?,
        },
        other => {
            return Err(Fail::Local(format!(
                "unknown action {other:?} (start, stop, reboot, force-reboot, suspend, resume, \
                 change-type, grow-disk, release)"
            )))
        }
    })
}

/// The call to make, or `None` when the command was carried out here.
pub async fn plan_instance(c: InstanceCmd, client: &Client, json: bool) -> CliResult<Option<Call>> {
    Ok(Some(match c {
        InstanceCmd::List { status } => call(
            M::GET,
            v1!("instances").query(&[("status", status)]),
            None,
            INSTANCE_COLS,
        ),
        InstanceCmd::Get { id, view, since } => match view.as_deref() {
            Some("access") if !json => {
                crate::access::print_access(client, id).await?;
                return Ok(None);
            }
            Some("monitor") if !json => {
                crate::monitor::print_monitor(client, id, since).await?;
                return Ok(None);
            }
            Some("monitor") => call(M::GET, crate::monitor::path(id, since), None, &[]),
            Some("network-group") if !json => {
                crate::groups::print_instance_group(client, id).await?;
                return Ok(None);
            }
            Some(v) => call(M::GET, v1!("instances", id, v), None, &[]),
            None => call(M::GET, v1!("instances", id), None, &[]),
        },
        InstanceCmd::Create {
            name,
            flavor,
            image,
            snapshot,
            data_volume,
            ports,
            placement,
            account,
            region,
            network_group,
        } => {
            let b = body(&CreateInstance {
                name,
                flavor,
                image,
                snapshot,
                data_volume,
                ports,
                placement,
                account,
                region,
                network_group,
            });
            call(M::POST, v1!("instances"), b, &[])
        }
        InstanceCmd::Action {
            id,
            action: a,
            flavor,
            root_disk_gib,
        } => call(
            M::POST,
            v1!("instances", id, "actions"),
            body(&action(&a, flavor, root_disk_gib)?),
            &[],
        ),
        InstanceCmd::Batch {
            action: a,
            ids,
            flavor,
            root_disk_gib,
        } => {
            let b = body(&BatchAction {
                instances: ids,
                request: action(&a, flavor, root_disk_gib)?,
            });
            let cols = &["instance", "status", "operation", "error"];
            call(M::POST, v1!("instances", "batch"), b, cols)
        }
        InstanceCmd::Password {
            id, reset: false, ..
        } => call(M::GET, v1!("instances", id, "password"), None, &[]),
        InstanceCmd::Password {
            id,
            reset: true,
            wait_secs,
        } => {
            crate::access::reset_password(client, id, wait_secs, json).await?;
            return Ok(None);
        }
    }))
}

pub fn plan_snapshot(c: SnapshotCmd) -> Call {
    match c {
        SnapshotCmd::List { status, region } => call(
            M::GET,
            v1!("snapshots").query(&[("status", status), ("region", region)]),
            None,
            &[
                "id",
                "name",
                "instance",
                "region",
                "status",
                "progress_percent",
                "compressed_bytes",
                "frozen",
                "created_at",
            ],
        ),
        SnapshotCmd::Get { id } => call(M::GET, v1!("snapshots", id), None, &[]),
        SnapshotCmd::Create {
            instance,
            name,
            description,
            auto_release,
            as_image,
        } => {
            let b = body(&CreateSnapshot {
                name,
                description,
                auto_release,
                as_image,
            });
            call(M::POST, v1!("instances", instance, "snapshots"), b, &[])
        }
        SnapshotCmd::Delete { id } => call(M::DELETE, v1!("snapshots", id), None, &[]),
    }
}

pub fn plan_volume(c: VolumeCmd) -> Call {
    match c {
        VolumeCmd::List => call(
            M::GET,
            v1!("volumes"),
            None,
            &["id", "name", "size_gib", "host", "instance", "operation"],
        ),
        VolumeCmd::Create {
            name,
            size_gib,
            account,
            host,
            instance,
        } => {
            let b = body(&CreateVolume {
                name,
                size_gib,
                account,
                host,
                instance,
            });
            call(M::POST, v1!("volumes"), b, &[])
        }
        VolumeCmd::Get { id } => call(M::GET, v1!("volumes", id), None, &[]),
        VolumeCmd::Grow { ids, size_gib } if ids.len() == 1 => call(
            M::POST,
            v1!("volumes", ids[0], "grow"),
            body(&GrowVolume { size_gib }),
            &[],
        ),
        VolumeCmd::Grow { ids, size_gib } => {
            let b = body(&BatchGrowVolumes {
                volumes: ids,
                size_gib,
            });
            call(
                M::POST,
                v1!("volumes", "grow"),
                b,
                &["volume", "status", "operation", "error"],
            )
        }
        VolumeCmd::Delete { id } => call(M::DELETE, v1!("volumes", id), None, &[]),
    }
}
