//! Network groups, the controller's half (docs/network-groups.md): each
//! group's CIDR (the lowest free `/24` of `group_pool` that overlaps none
//! of the account's groups, or one the tenant chose), its VNI (unique
//! among live groups: one past the highest in use, else the lowest free
//! from [`VNI_MIN`]), member addresses (the lowest free from `.2`; the
//! network, `.1` and the broadcast address are never given) and the
//! per-host state agents get in the work answer ([`host_groups`]).
//!
//! Allocation reads what is taken and inserts inside the caller's write
//! transaction, after locking the group's (or the account's) row; unique
//! constraints (`network_groups.vni`, `network_group_members (group_id,
//! ip)` and `(instance_id)`) turn a lost race into [`GroupError::Taken`],
//! and the caller retries with a fresh transaction.
//!
//! A host's [`HostGroups`] is computed from the rows each time (every group
//! with a live member on the host, with all of its live members), and its
//! `rev` is a digest of that content, so nothing has to be bumped. Every
//! change that may alter some host's state notes the hosts to wake
//! ([`note_wakes`]); the API's guard wakes their work long polls after the
//! handler (and so its commit) is done ([`collecting_wakes`]).

use crate::access::{lowest_free_address, lowest_free_subnet};
use crate::db::{col, parsed, parsed_opt, DbError, Tx};
use crate::scheduler::Candidate;
use gantry_proto::groups::{
    group_mac, GroupMember, GroupPlacement, GroupSpec, HostGroups, Vtep, MAX_GROUP_MEMBERS,
    MAX_GROUP_PREFIX, VNI_MAX, VNI_MIN,
};
use gantry_proto::ids::{AccountId, HostId, InstanceId, NetworkGroupId};
use gantry_proto::net::Ipv4Net;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The group's CIDR (or the VNI range) is used up; the sentence says which.
    #[error("{0}")]
    Full(String),
    /// The instance is already in a group; the sentence says which.
    #[error("{0}")]
    Member(String),
    /// The group was deleted meanwhile.
    #[error("no network group {0}")]
    Gone(NetworkGroupId),
    /// Another transaction took the value first (a unique constraint).
    #[error("an address or VNI was taken by another request")]
    Taken,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for GroupError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_unique_violation(&e) {
            Self::Taken
        } else {
            Self::Db(DbError::Sqlx(e))
        }
    }
}

/// States whose instances are no longer members of anything.
const LIVE: &str = "i.observed_state NOT IN ('Released', 'Failed')";

/// A network group's wish for where its next member goes: its placement
/// and the hosts that hold its members now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPref {
    pub placement: GroupPlacement,
    pub hosts: BTreeSet<String>,
}

impl GroupPref {
    /// 0 for a host the group prefers, 1 for the others.
    pub(crate) fn rank(&self, c: &Candidate) -> u8 {
        let holds = self.hosts.contains(&c.id);
        match self.placement {
            GroupPlacement::Pack => u8::from(!holds),
            GroupPlacement::Spread => u8::from(holds),
        }
    }
}

/// The spelling of a placement in `network_groups.placement`.
pub fn placement_str(p: GroupPlacement) -> &'static str {
    match p {
        GroupPlacement::Pack => "pack",
        GroupPlacement::Spread => "spread",
    }
}

fn parse_placement(s: &str) -> Result<GroupPlacement, DbError> {
    match s {
        "pack" => Ok(GroupPlacement::Pack),
        "spread" => Ok(GroupPlacement::Spread),
        other => Err(corrupt(format!("placement: unknown {other:?}"))),
    }
}

fn corrupt(message: String) -> DbError {
    DbError::Corrupt {
        table: "network_groups",
        message,
    }
}

/// One `network_groups` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRow {
    pub id: NetworkGroupId,
    pub account: AccountId,
    pub name: String,
    pub cidr: Ipv4Net,
    pub vni: u32,
    pub mtu: u16,
    pub placement: GroupPlacement,
    pub created_ms: i64,
}

pub const GROUP_COLS: &str = "id, account_id, name, cidr, vni, mtu, placement, created_ms";

pub fn group_row(r: &sqlx::any::AnyRow) -> Result<GroupRow, DbError> {
    const T: &str = "network_groups";
    let vni: i64 = col(r, "vni")?;
    let mtu: i64 = col(r, "mtu")?;
    Ok(GroupRow {
        id: parsed(r, "id", T)?,
        account: parsed(r, "account_id", T)?,
        name: col(r, "name")?,
        cidr: parsed(r, "cidr", T)?,
        vni: u32::try_from(vni).map_err(|_| corrupt(format!("vni: {vni}")))?,
        mtu: u16::try_from(mtu).map_err(|_| corrupt(format!("mtu: {mtu}")))?,
        placement: parse_placement(&col::<String>(r, "placement")?)?,
        created_ms: col(r, "created_ms")?,
    })
}

/// The CIDR a group gets when its creator names none: the lowest block of
/// `pool` (a `/24`, or the pool's own prefix when that is longer) that
/// overlaps none of `taken` (the account's groups and the access network).
pub fn default_cidr(pool: Ipv4Net, taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    let prefix = pool.prefix().clamp(24, MAX_GROUP_PREFIX);
    lowest_free_subnet(pool, prefix, taken)
}

/// The VNI for a new group, given those of the live groups: one past the
/// highest (so a deleted group's VNI is not handed out again at once), else
/// the lowest free from [`VNI_MIN`].
pub fn next_vni(used: &BTreeSet<u32>) -> Option<u32> {
    match used.last() {
        None => Some(VNI_MIN),
        Some(&top) if top < VNI_MAX => Some((top + 1).max(VNI_MIN)),
        Some(_) => (VNI_MIN..=VNI_MAX).find(|v| !used.contains(v)),
    }
}

/// Locks the account's row (so two creates of one account cannot both
/// take a CIDR) and reads its groups.
pub async fn account_groups(tx: &mut Tx, account: &AccountId) -> Result<Vec<GroupRow>, DbError> {
    sqlx::query("UPDATE accounts SET credit_micros = credit_micros WHERE id = $1")
        .bind(account.to_string())
        .execute(&mut **tx)
        .await?;
    let found = sqlx::query(&format!(
        "SELECT {GROUP_COLS} FROM network_groups WHERE account_id = $1 ORDER BY created_ms, id"
    ))
    .bind(account.to_string())
    .fetch_all(&mut **tx)
    .await?;
    found.iter().map(group_row).collect()
}

/// Inserts `g` with a fresh VNI (its `vni` is ignored); returns the VNI.
pub async fn insert_group(tx: &mut Tx, g: &GroupRow) -> Result<u32, GroupError> {
    let found = sqlx::query("SELECT vni FROM network_groups")
        .fetch_all(&mut **tx)
        .await?;
    let mut used = BTreeSet::new();
    for r in &found {
        used.insert(col::<i64>(r, "vni")?.clamp(0, u32::MAX.into()) as u32);
    }
    let vni = next_vni(&used).ok_or_else(|| {
        GroupError::Full(format!(
            "every VNI from {VNI_MIN} to {VNI_MAX} is in use; delete unused network groups"
        ))
    })?;
    sqlx::query(
        "INSERT INTO network_groups (id, account_id, name, cidr, vni, mtu, placement, \
         created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(g.id.to_string())
    .bind(g.account.to_string())
    .bind(&g.name)
    .bind(g.cidr.to_string())
    .bind(i64::from(vni))
    .bind(i64::from(g.mtu))
    .bind(placement_str(g.placement))
    .bind(g.created_ms)
    .execute(&mut **tx)
    .await?;
    Ok(vni)
}

/// Locks group `id`'s row and reads it; [`GroupError::Gone`] when missing.
pub async fn lock_group(tx: &mut Tx, id: NetworkGroupId) -> Result<GroupRow, GroupError> {
    let done = sqlx::query("UPDATE network_groups SET mtu = mtu WHERE id = $1")
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() != 1 {
        return Err(GroupError::Gone(id));
    }
    let row = sqlx::query(&format!(
        "SELECT {GROUP_COLS} FROM network_groups WHERE id = $1"
    ))
    .bind(id.to_string())
    .fetch_one(&mut **tx)
    .await?;
    Ok(group_row(&row)?)
}

/// The group `instance` is in, if any.
pub async fn group_of(
    tx: &mut Tx,
    instance: InstanceId,
) -> Result<Option<NetworkGroupId>, DbError> {
    let row = sqlx::query("SELECT group_id FROM network_group_members WHERE instance_id = $1")
        .bind(instance.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| parsed(&r, "group_id", "network_group_members"))
        .transpose()
}

/// Puts `instance` into group `g` (locked by [`lock_group`]) with the
/// lowest free address of its CIDR, and notes the hosts to wake.
pub async fn join(tx: &mut Tx, g: &GroupRow, instance: InstanceId) -> Result<Ipv4Addr, GroupError> {
    if let Some(other) = group_of(tx, instance).await? {
        return Err(GroupError::Member(format!(
            "instance {instance} is already in network group {other}: an instance is in one \
             group at a time (leave it first)"
        )));
    }
    let found = sqlx::query("SELECT ip FROM network_group_members WHERE group_id = $1")
        .bind(g.id.to_string())
        .fetch_all(&mut **tx)
        .await?;
    if found.len() >= MAX_GROUP_MEMBERS {
        return Err(GroupError::Full(format!(
            "network group {} has {MAX_GROUP_MEMBERS} members, the most a group may have",
            g.name
        )));
    }
    let mut taken = HashSet::with_capacity(found.len());
    for r in &found {
        taken.insert(parsed::<Ipv4Addr>(r, "ip", "network_group_members")?);
    }
    let ip = lowest_free_address(g.cidr, &taken).ok_or_else(|| {
        GroupError::Full(format!(
            "network group {} has no free address left in {}",
            g.name, g.cidr
        ))
    })?;
    sqlx::query(
        "INSERT INTO network_group_members (group_id, instance_id, ip, joined_ms) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(g.id.to_string())
    .bind(instance.to_string())
    .bind(ip.to_string())
    .bind(crate::db::now_ms())
    .execute(&mut **tx)
    .await?;
    note_wakes(member_hosts(tx, g.id).await?);
    Ok(ip)
}

/// Takes `instance` out of whatever group it is in (a leave, or its host
/// reported it Released or its create Failed), freeing its address, and
/// notes the hosts to wake. Returns the group it left.
pub async fn leave(tx: &mut Tx, instance: InstanceId) -> Result<Option<NetworkGroupId>, DbError> {
    let Some(group) = group_of(tx, instance).await? else {
        return Ok(None);
    };
    // Before the delete: the instance's own host is among them.
    note_wakes(member_hosts(tx, group).await?);
    sqlx::query("DELETE FROM network_group_members WHERE instance_id = $1")
        .bind(instance.to_string())
        .execute(&mut **tx)
        .await?;
    tracing::info!(%instance, %group, "left its network group");
    Ok(Some(group))
}

/// `instance` moved away from `from` (keeping its group and address):
/// notes its group's hosts, `from` included, to wake.
pub async fn note_moved(tx: &mut Tx, instance: InstanceId, from: &HostId) -> Result<(), DbError> {
    if let Some(g) = group_of(tx, instance).await? {
        note_wakes(member_hosts(tx, g).await?);
        note_wakes([*from]);
    }
    Ok(())
}

/// The hosts of group `g`'s members (whatever their state).
pub async fn member_hosts(tx: &mut Tx, g: NetworkGroupId) -> Result<Vec<HostId>, DbError> {
    let found = sqlx::query(
        "SELECT DISTINCT i.host_id FROM network_group_members m JOIN instances i \
         ON i.id = m.instance_id WHERE m.group_id = $1 AND i.host_id IS NOT NULL",
    )
    .bind(g.to_string())
    .fetch_all(&mut **tx)
    .await?;
    found
        .iter()
        .map(|r| parsed(r, "host_id", "instances"))
        .collect()
}

/// Where group `g` wants its next member (see `scheduler::place_with`).
pub async fn placement_pref(tx: &mut Tx, g: &GroupRow) -> Result<GroupPref, DbError> {
    let hosts = member_hosts(tx, g.id).await?;
    Ok(GroupPref {
        placement: g.placement,
        hosts: hosts.iter().map(ToString::to_string).collect(),
    })
}

/// The hosts sharing a group with `host` (their live members), `host`
/// included when it has any.
pub async fn peer_hosts(tx: &mut Tx, host: &HostId) -> Result<Vec<HostId>, DbError> {
    let found = sqlx::query(&format!(
        "SELECT DISTINCT i.host_id FROM network_group_members m JOIN instances i \
         ON i.id = m.instance_id WHERE i.host_id IS NOT NULL AND {LIVE} AND m.group_id IN \
         ({ON_HOST})"
    ))
    .bind(host.to_string())
    .fetch_all(&mut **tx)
    .await?;
    found
        .iter()
        .map(|r| parsed(r, "host_id", "instances"))
        .collect()
}

/// Stores the VXLAN endpoint `host` reported; a change notes the hosts
/// sharing a group with it (their forwarding entries name it).
pub async fn set_vtep(tx: &mut Tx, host: &HostId, vtep: Option<&Vtep>) -> Result<(), DbError> {
    let row = sqlx::query("SELECT vtep_address, vtep_port FROM hosts WHERE id = $1")
        .bind(host.to_string())
        .fetch_one(&mut **tx)
        .await?;
    let now = stored_vtep(&row)?;
    if now.as_ref() == vtep {
        return Ok(());
    }
    sqlx::query("UPDATE hosts SET vtep_address = $1, vtep_port = $2 WHERE id = $3")
        .bind(vtep.map(|v| v.address.to_string()))
        .bind(vtep.map(|v| i64::from(v.port)))
        .bind(host.to_string())
        .execute(&mut **tx)
        .await?;
    tracing::info!(%host, vtep = ?vtep, "host VXLAN endpoint changed");
    note_wakes(peer_hosts(tx, host).await?);
    Ok(())
}

/// The VXLAN endpoint in a row's `vtep_address` and `vtep_port`.
fn stored_vtep(r: &sqlx::any::AnyRow) -> Result<Option<Vtep>, DbError> {
    let address: Option<Ipv4Addr> = parsed_opt(r, "vtep_address", "hosts")?;
    let port: Option<i64> = col(r, "vtep_port")?;
    Ok(match (address, port.and_then(|p| u16::try_from(p).ok())) {
        (Some(address), Some(port)) => Some(Vtep { address, port }),
        _ => None,
    })
}

/// The groups with a live member on host `$1`.
const ON_HOST: &str = "SELECT m2.group_id FROM network_group_members m2 JOIN instances i2 \
     ON i2.id = m2.instance_id WHERE i2.host_id = $1 AND \
     i2.observed_state NOT IN ('Released', 'Failed')";

/// `host`'s whole group state: every group with a live member on it, with
/// all of the group's live members (local ones flagged, remote ones with
/// their host's VXLAN endpoint), groups by id and members by instance.
pub async fn host_groups(pool: &sqlx::AnyPool, host: &HostId) -> Result<HostGroups, DbError> {
    let found = sqlx::query(&format!(
        "SELECT {GROUP_COLS} FROM network_groups WHERE id IN ({ON_HOST}) ORDER BY id"
    ))
    .bind(host.to_string())
    .fetch_all(pool)
    .await?;
    let mut groups = BTreeMap::new();
    for r in &found {
        let g = group_row(r)?;
        groups.insert(
            g.id,
            GroupSpec {
                id: g.id,
                vni: g.vni,
                cidr: g.cidr,
                mtu: g.mtu,
                members: Vec::new(),
            },
        );
    }
    let found = sqlx::query(&format!(
        "SELECT m.group_id, m.instance_id, m.ip, i.host_id, h.vtep_address, h.vtep_port FROM \
         network_group_members m JOIN instances i ON i.id = m.instance_id LEFT JOIN hosts h \
         ON h.id = i.host_id WHERE {LIVE} AND m.group_id IN ({ON_HOST}) ORDER BY m.group_id, \
         m.instance_id"
    ))
    .bind(host.to_string())
    .fetch_all(pool)
    .await?;
    for r in &found {
        const T: &str = "network_group_members";
        let group: NetworkGroupId = parsed(r, "group_id", T)?;
        let ip: Ipv4Addr = parsed(r, "ip", T)?;
        let on: Option<HostId> = parsed_opt(r, "host_id", "instances")?;
        let local = on.as_ref() == Some(host);
        let member = GroupMember {
            instance: parsed(r, "instance_id", T)?,
            mac: group_mac(ip),
            ip,
            local,
            vtep: if local { None } else { stored_vtep(r)? },
        };
        if let Some(g) = groups.get_mut(&group) {
            g.members.push(member);
        }
    }
    let groups: Vec<GroupSpec> = groups.into_values().collect();
    Ok(HostGroups {
        rev: rev_of(&groups),
        groups,
    })
}

/// A digest of the content (its canonical JSON: groups by id, members by
/// instance): the same state always has the same revision, and any change
/// moves it. 53 bits, so JSON clients read it exactly.
pub fn rev_of(groups: &[GroupSpec]) -> u64 {
    let json = serde_json::to_vec(groups).unwrap_or_default();
    let digest = blake3::hash(&json);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first) & ((1 << 53) - 1)
}

tokio::task_local! {
    /// The hosts whose group state a request changed (see [`note_wakes`]).
    static WAKES: RefCell<BTreeSet<HostId>>;
}

/// Notes hosts whose group state the current request may have changed, to
/// be woken once it is done (outside [`collecting_wakes`], e.g. in the
/// reconcile loop, nothing is noted: those hosts see the change when their
/// long poll next ends).
pub fn note_wakes(hosts: impl IntoIterator<Item = HostId>) {
    let _ = WAKES.try_with(|w| w.borrow_mut().extend(hosts));
}

/// Runs `f`, collecting the hosts it notes with [`note_wakes`].
pub async fn collecting_wakes<F: std::future::Future>(f: F) -> (F::Output, Vec<HostId>) {
    WAKES
        .scope(RefCell::new(BTreeSet::new()), async {
            let out = f.await;
            let hosts = WAKES.with(|w| std::mem::take(&mut *w.borrow_mut()));
            (out, hosts.into_iter().collect())
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::api::v1::Placement;
    use gantry_proto::groups::DEFAULT_GROUP_MTU;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn host(id: &str, gpus: i64) -> Candidate {
        Candidate {
            id: id.into(),
            free_vcpus: 64,
            free_memory_mib: 1 << 20,
            free_disk_gib: 10_000,
            free_gpus: gpus,
            total_gpus: 8,
        }
    }

    use crate::scheduler::tests::need;

    #[test]
    fn a_group_prefers_its_hosts_to_pack_and_others_to_spread() {
        let hosts = [host("a", 8), host("b", 3), host("c", 4)];
        let n = need(2, Placement::Pack);
        // Without a group, b (the fullest) wins.
        assert_eq!(crate::scheduler::ranked(&hosts, &n), vec![1, 2, 0]);
        let pack = GroupPref {
            placement: GroupPlacement::Pack,
            hosts: ["a".to_string()].into(),
        };
        assert_eq!(
            crate::scheduler::ranked_with(&hosts, &n, Some(&pack)),
            vec![0, 1, 2]
        );
        let spread = GroupPref {
            placement: GroupPlacement::Spread,
            hosts: ["b".to_string(), "c".to_string()].into(),
        };
        assert_eq!(
            crate::scheduler::ranked_with(&hosts, &n, Some(&spread)),
            vec![0, 1, 2]
        );
        // Soft: a preferred host that does not fit is skipped, the others
        // still rank.
        let full = GroupPref {
            placement: GroupPlacement::Pack,
            hosts: ["b".to_string()].into(),
        };
        assert_eq!(
            crate::scheduler::ranked_with(&hosts, &need(4, Placement::Pack), Some(&full)),
            vec![2, 0]
        );
        let spread_all = GroupPref {
            placement: GroupPlacement::Spread,
            hosts: ["a".to_string(), "b".to_string(), "c".to_string()].into(),
        };
        assert_eq!(
            crate::scheduler::ranked_with(&hosts, &n, Some(&spread_all)),
            vec![1, 2, 0]
        );
    }

    #[test]
    fn default_cidrs_are_the_lowest_free_24_avoiding_what_is_taken() {
        let pool = net("172.16.0.0/12");
        assert_eq!(default_cidr(pool, &[]), Some(net("172.16.0.0/24")));
        let taken = [net("172.16.0.0/24"), net("172.16.1.0/25")];
        assert_eq!(default_cidr(pool, &taken), Some(net("172.16.2.0/24")));
        // A pool smaller than a /24 hands out itself once.
        let small = net("192.168.7.0/26");
        assert_eq!(default_cidr(small, &[]), Some(small));
        assert_eq!(default_cidr(small, &[small]), None);
    }

    #[test]
    fn vnis_go_up_and_wrap_to_the_lowest_free() {
        assert_eq!(next_vni(&BTreeSet::new()), Some(VNI_MIN));
        let used: BTreeSet<u32> = [VNI_MIN, VNI_MIN + 5].into();
        assert_eq!(next_vni(&used), Some(VNI_MIN + 6));
        let top: BTreeSet<u32> = [VNI_MIN, VNI_MAX].into();
        assert_eq!(next_vni(&top), Some(VNI_MIN + 1));
        let below: BTreeSet<u32> = [7].into();
        assert_eq!(next_vni(&below), Some(VNI_MIN));
    }

    #[test]
    fn the_revision_follows_the_content() {
        let ip: Ipv4Addr = "172.16.0.2".parse().unwrap();
        let g = GroupSpec {
            id: NetworkGroupId::new(),
            vni: VNI_MIN,
            cidr: net("172.16.0.0/24"),
            mtu: DEFAULT_GROUP_MTU,
            members: vec![GroupMember {
                instance: InstanceId::new(),
                mac: group_mac(ip),
                ip,
                local: true,
                vtep: None,
            }],
        };
        let a = rev_of(std::slice::from_ref(&g));
        let same = vec![g.clone()];
        assert_eq!(a, rev_of(&same));
        assert!(a < (1 << 53));
        let mut moved = g.clone();
        moved.members[0].local = false;
        assert_ne!(a, rev_of(&[moved]));
        assert_ne!(a, rev_of(&[]));
    }

    #[tokio::test]
    async fn wakes_are_collected_inside_the_scope_only() {
        let h = HostId::new();
        note_wakes([h]);
        let ((), got) = collecting_wakes(async move {
            note_wakes([h, h]);
        })
        .await;
        assert_eq!(got, vec![h]);
    }
}
