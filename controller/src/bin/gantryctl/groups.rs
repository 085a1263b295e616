//! Network groups: create, list, get, delete, join, leave, and an
//! instance's Network Group tab as text (`instance get ID --view
//! network-group`).

use crate::client::{CliResult, Client, Fail};
use crate::text::render;
use crate::{body, call, Call};
use clap::Subcommand;
use gantry_proto::api::v1::{
    CreateNetworkGroup, InstanceNetworkGroup, JoinNetworkGroup, NetworkGroupInfo,
};
use gantry_proto::groups::GroupPlacement;
use gantry_proto::ids::{AccountId, InstanceId, NetworkGroupId};
use gantry_proto::net::Ipv4Net;
use reqwest::Method as M;

#[derive(Subcommand)]
pub enum GroupCmd {
    /// Create a group: a private network for the account's instances.
    Create {
        name: String,
        /// Its private network (RFC 1918 or 100.64.0.0/10, /8 to /29)
        /// [default: the lowest free /24 of the controller's group_pool].
        #[arg(long)]
        cidr: Option<Ipv4Net>,
        /// pack (members on as few hosts as fit; default) or spread.
        #[arg(long, value_parser = parse_placement)]
        placement: Option<GroupPlacement>,
        /// For admins: the owning account.
        #[arg(long)]
        account: Option<AccountId>,
    },
    List {
        /// Another account's groups (admin).
        #[arg(long)]
        account: Option<AccountId>,
    },
    /// A group and its members.
    Get { id: NetworkGroupId },
    /// Delete an empty group.
    Delete { id: NetworkGroupId },
    /// Put an instance into the group (a second NIC, eth1, on its network).
    Join {
        id: NetworkGroupId,
        instance: InstanceId,
    },
    /// Take an instance out of the group.
    Leave {
        id: NetworkGroupId,
        instance: InstanceId,
    },
}

fn parse_placement(s: &str) -> Result<GroupPlacement, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?} is not a group placement (pack or spread)"))
}

const GROUP_COLS: &[&str] = &[
    "id",
    "name",
    "cidr",
    "placement",
    "mtu",
    "member_count",
    "account",
];

const MEMBER_COLS: &[&str] = &["instance", "name", "ip", "state", "joined_at"];

/// The call to make, or `None` when the command was carried out here.
pub async fn plan_group(c: GroupCmd, client: &Client, json: bool) -> CliResult<Option<Call>> {
    Ok(Some(match c {
        GroupCmd::Create {
            name,
            cidr,
            placement,
            account,
        } => {
            let b = body(&CreateNetworkGroup {
                name,
                cidr,
                placement: placement.unwrap_or_default(),
                account,
            });
            call(M::POST, v1!("network-groups"), b, &[])
        }
        GroupCmd::List { account } => call(
            M::GET,
            v1!("network-groups").query(&[("account", account.map(|a| a.to_string()))]),
            None,
            GROUP_COLS,
        ),
        GroupCmd::Get { id } if !json => {
            let g: NetworkGroupInfo = decode(client.get(&v1!("network-groups", id)).await?)?;
            print_group(&g, None);
            return Ok(None);
        }
        GroupCmd::Get { id } => call(M::GET, v1!("network-groups", id), None, &[]),
        GroupCmd::Delete { id } => call(M::DELETE, v1!("network-groups", id), None, &[]),
        GroupCmd::Join { id, instance } => call(
            M::POST,
            v1!("network-groups", id, "members"),
            body(&JoinNetworkGroup { instance }),
            &[],
        ),
        GroupCmd::Leave { id, instance } => call(
            M::DELETE,
            v1!("network-groups", id, "members", instance),
            None,
            &[],
        ),
    }))
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> CliResult<T> {
    serde_json::from_value(v).map_err(|e| {
        Fail::BadAnswer(format!(
            "the controller's network-group answer is not understood: {e}"
        ))
    })
}

/// A group as text: its settings, then its members (with `me` marked).
fn print_group(g: &NetworkGroupInfo, me: Option<InstanceId>) {
    println!("Group:      {} ({})", g.name, g.id);
    println!("CIDR:       {}", g.cidr);
    println!("MTU:        {}", g.mtu);
    println!(
        "Placement:  {}",
        serde_json::to_value(g.placement)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    println!("Members:    {}", g.member_count);
    let mut rows = serde_json::to_value(&g.members).unwrap_or_default();
    if let (Some(me), Some(rows)) = (me, rows.as_array_mut()) {
        for r in rows.iter_mut().filter(|r| r["instance"] == me.to_string()) {
            r["name"] = format!("{} (this)", r["name"].as_str().unwrap_or_default()).into();
        }
    }
    println!("{}", render(&rows, MEMBER_COLS));
}

/// `instance get ID --view network-group` as text: the group, its CIDR,
/// the instance's own address and interface, and every member.
pub async fn print_instance_group(client: &Client, id: InstanceId) -> CliResult<()> {
    let v: InstanceNetworkGroup =
        decode(client.get(&v1!("instances", id, "network-group")).await?)?;
    let Some(g) = &v.group else {
        println!("Instance {id} is in no network group (gantryctl group join GROUP {id}).");
        return Ok(());
    };
    let dash = || "-".to_string();
    println!(
        "Private IP: {} on {} (NCCL_SOCKET_IFNAME={})",
        v.private_ip.map(|i| i.to_string()).unwrap_or_else(dash),
        v.interface.clone().unwrap_or_else(dash),
        v.interface.clone().unwrap_or_else(dash)
    );
    print_group(g, Some(id));
    Ok(())
}
