//! Bodies of the controller's network-group calls (`/v1/network-groups...`,
//! `/v1/instances/{id}/network-group`), re-exported by [`super::v1`].

use crate::groups::GroupPlacement;
use crate::ids::{AccountId, InstanceId, NetworkGroupId};
use crate::instance::InstanceState;
use crate::net::Ipv4Net;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// `POST /v1/network-groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateNetworkGroup {
    /// An object name, unique among the account's groups.
    pub name: String,
    /// The group's private network; default: the lowest free /24 of the
    /// controller's `group_pool` that overlaps none of the account's groups.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub cidr: Option<Ipv4Net>,
    #[serde(default)]
    pub placement: GroupPlacement,
    /// Admins create groups for an account; tenants leave this out.
    #[serde(default)]
    pub account: Option<AccountId>,
}

/// `POST /v1/network-groups/{id}/members`: puts an instance into the group
/// (hot-plugged when it runs and its guest allows, else at its next start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JoinNetworkGroup {
    pub instance: InstanceId,
}

/// One member of a group, as its account sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkGroupMember {
    pub instance: InstanceId,
    /// The instance's name.
    pub name: String,
    /// Its address on the group's network.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub ip: Ipv4Addr,
    pub state: InstanceState,
    pub joined_at: DateTime<Utc>,
}

/// A network group (`GET /v1/network-groups/{id}`; the list leaves
/// `members` empty and counts them in `member_count`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkGroupInfo {
    pub id: NetworkGroupId,
    pub account: AccountId,
    pub name: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub cidr: Ipv4Net,
    pub placement: GroupPlacement,
    /// The MTU of members' group NICs.
    pub mtu: u16,
    pub member_count: usize,
    #[serde(default)]
    pub members: Vec<NetworkGroupMember>,
    pub created_at: DateTime<Utc>,
}

/// The instance's Network Group tab (`GET /v1/instances/{id}/network-group`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceNetworkGroup {
    pub instance: InstanceId,
    /// `None` when the instance is in no group.
    #[serde(default)]
    pub group: Option<NetworkGroupInfo>,
    /// Its own address on the group's network.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub private_ip: Option<Ipv4Addr>,
    /// The guest's interface name for the group NIC in Gantry's images
    /// (`eth1`; for NCCL: `NCCL_SOCKET_IFNAME=eth1`).
    #[serde(default)]
    pub interface: Option<String>,
}
