//! GPU-aware placement: which host runs an instance.
//!
//! Filters: the instance's region (and host, when pinned), healthy, not
//! revoked, heard from within the heartbeat timeout, not cordoned; enough
//! free GPUs of the requested model, vCPUs, memory and disk. Weighing
//! ([`choose`], a pure function): `pack` fills partly used hosts first (and
//! keeps GPU hosts for GPU work), `spread` prefers the emptiest host.
//! A flavor's GPU model matches GPUs of that NVML name or listed under it
//! in the alias table, and only healthy GPUs no instance holds are offered
//! (`crate::gpus`).
//!
//! Scale: the candidates come from index walks in the weighing's own order
//! (migration 0008: `hosts.gpu_model`/`gpu_free`, kept by triggers on
//! `host_gpu_pools`, and expression indexes on free vCPUs and memory), a
//! shortlist of [`SHORTLIST`] hosts per walk, so a decision reads a few
//! dozen rows whether there are 100 hosts or 10,000.
//!
//! A member of a network group ([`GroupPref`], [`place_with`]) prefers,
//! before any of that, the hosts its group's placement asks for: `pack`
//! the hosts already holding members (loaded as candidates even when the
//! shortlist missed them), `spread` the hosts holding none. The preference
//! is soft: when no preferred host fits, any fitting host is taken.
//!
//! [`place`] claims the best candidate's capacity and GPUs inside the
//! caller's write transaction with conditional `UPDATE`s, so a GPU is never
//! booked twice; when another placement took a candidate's capacity first
//! it tries the next one, and a race lost on the GPUs answers
//! [`PlaceError::Raced`]: the caller retries with a fresh transaction.

use crate::db::{col, Backend, DbError, Tx};
use crate::groups::GroupPref;
use gantry_proto::api::v1::Placement;
use gantry_proto::groups::GroupPlacement;
use gantry_proto::ids::{HostId, InstanceId};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// Nothing fits; the sentence says what was missing.
    #[error("{0}")]
    NoFit(String),
    /// Another placement took the capacity first; retry.
    #[error("placement raced with another request")]
    Raced,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for PlaceError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
    }
}

/// What one instance needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub gpu_model: Option<String>,
    pub gpu_count: u32,
    pub placement: Placement,
    /// Only hosts of this region (see `crate::regions`).
    pub region: String,
    /// Only this host (a snapshot's host with a host-local store, a data
    /// volume's host).
    pub host: Option<HostId>,
}

/// One host's free capacity, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub free_vcpus: i64,
    pub free_memory_mib: i64,
    pub free_disk_gib: i64,
    /// Free GPUs of the requested model.
    pub free_gpus: i64,
    /// All GPUs of the host, any model, used or not.
    pub total_gpus: i64,
}

impl Candidate {
    pub fn fits(&self, n: &Need) -> bool {
        self.free_gpus >= n.gpu_count as i64
            && self.free_vcpus >= n.vcpus as i64
            && self.free_memory_mib >= n.memory_mib as i64
            && self.free_disk_gib >= n.disk_gib as i64
    }
}

/// The weighing: a smaller key is a better host. `pack` fills partly used
/// hosts first (fewest GPUs left, then fewest vCPUs and memory left);
/// `spread` takes the emptiest; CPU-only work prefers hosts with no GPUs
/// to waste either way; the id breaks ties.
fn key<'c>(c: &'c Candidate, need: &Need) -> (i64, i64, i64, i64, &'c str) {
    let gpu = need.gpu_count as i64;
    let waste = if gpu == 0 { c.total_gpus } else { 0 };
    match need.placement {
        Placement::Pack => (
            c.free_gpus - gpu,
            waste,
            c.free_vcpus,
            c.free_memory_mib,
            &c.id,
        ),
        Placement::Spread => (
            waste,
            -c.free_gpus,
            -c.free_vcpus,
            -c.free_memory_mib,
            &c.id,
        ),
    }
}

/// The best fitting candidate's index, or `None`.
pub fn choose(cands: &[Candidate], need: &Need) -> Option<usize> {
    (0..cands.len())
        .filter(|&i| cands[i].fits(need))
        .min_by(|&a, &b| key(&cands[a], need).cmp(&key(&cands[b], need)))
}

/// The fitting candidates' indexes, best first.
pub fn ranked(cands: &[Candidate], need: &Need) -> Vec<usize> {
    ranked_with(cands, need, None)
}

/// [`ranked`], the hosts `pref` prefers first.
pub fn ranked_with(cands: &[Candidate], need: &Need, pref: Option<&GroupPref>) -> Vec<usize> {
    let mut fitting: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].fits(need)).collect();
    let group = |c: &Candidate| pref.map_or(0, |p| p.rank(c));
    fitting.sort_by(|&a, &b| {
        let (ca, cb) = (&cands[a], &cands[b]);
        (group(ca), key(ca, need)).cmp(&(group(cb), key(cb, need)))
    });
    fitting
}

/// Says what was missing when nothing fits, e.g. "no host has 8 free H100
/// GPUs; largest is 4". `cands` are all schedulable hosts, unfiltered.
pub fn explain(cands: &[Candidate], need: &Need, timeout_secs: u64) -> String {
    if cands.is_empty() {
        return format!(
            "no host is schedulable: none is healthy, uncordoned and heard from in the last \
             {timeout_secs} s"
        );
    }
    let mut pool: Vec<&Candidate> = cands.iter().collect();
    let mut what = String::new();
    if need.gpu_count > 0 {
        let model = need.gpu_model.as_deref().unwrap_or("?");
        let best = pool.iter().map(|c| c.free_gpus).max().unwrap_or(0);
        if best < need.gpu_count as i64 {
            return format!(
                "no host has {} free {model} GPUs; largest is {best}",
                need.gpu_count
            );
        }
        pool.retain(|c| c.free_gpus >= need.gpu_count as i64);
        what = format!(" with {} free {model} GPUs", need.gpu_count);
    }
    type Get = fn(&Candidate) -> i64;
    let checks: [(&str, i64, Get); 3] = [
        ("vCPUs", need.vcpus as i64, |c| c.free_vcpus),
        ("MiB of memory", need.memory_mib as i64, |c| {
            c.free_memory_mib
        }),
        ("GiB of disk", need.disk_gib as i64, |c| c.free_disk_gib),
    ];
    for (label, want, get) in checks {
        let best = pool.iter().map(|c| get(c)).max().unwrap_or(0);
        if best < want {
            return format!("no host{what} has {want} free {label}; largest is {best}");
        }
        pool.retain(|c| get(c) >= want);
    }
    "no host has room for this flavor".into()
}

/// A host's free vCPUs and memory, spelled exactly as in the placement
/// indexes of migration 0008 (so the databases walk them in order).
const FREE_VCPUS: &str = "(h.vcpus - h.used_vcpus)";
const FREE_MEMORY: &str = "(h.memory_mib - h.used_memory_mib)";

/// Schedulable: joined (its agent holds a credential: a host an admin
/// registered is no candidate until its agent joins), healthy, not
/// revoked, not cordoned, heard from since `$2`, in region `$3`.
const SCHEDULABLE: &str = "h.credential_hash IS NOT NULL AND h.health = 'healthy' \
     AND h.revoked_ms IS NULL AND h.cordoned = 0 AND h.last_heartbeat_ms >= $2 \
     AND h.region = $3";

/// Room for vCPUs `$4`, memory `$5`, disk `$6`.
const ROOM: &str = " AND h.vcpus - h.used_vcpus >= $4 AND h.memory_mib - h.used_memory_mib \
     >= $5 AND h.disk_gib - h.used_disk_gib >= $6";

/// How many of the best fitting hosts (by [`key`]'s order, in SQL) each
/// walk loads for [`ranked`] to weigh.
const SHORTLIST: i64 = 32;

/// The columns a [`Candidate`] is read from; `free_gpus` is the SQL for
/// the host's free GPUs of the requested model.
fn columns(free_gpus: &str) -> String {
    format!(
        "h.id, {FREE_VCPUS} AS free_vcpus, {FREE_MEMORY} AS free_memory, \
         h.disk_gib - h.used_disk_gib AS free_disk, {free_gpus} AS free_gpus, \
         h.gpu_total AS total_gpus"
    )
}

/// The host's free GPUs of every model matching the flavor model `$1`
/// (through the alias table; the pools count only healthy GPUs no instance
/// holds). Costs one pool lookup per host: only for hosts with GPUs of
/// more than one model, a pinned host and [`explain`].
fn matching_free() -> String {
    format!(
        "COALESCE((SELECT CAST(SUM(p.free) AS BIGINT) FROM host_gpu_pools p \
         WHERE p.host_id = h.id AND {}), 0)",
        crate::gpus::model_matches("p.model", "$1")
    )
}

fn dir(need: &Need) -> &'static str {
    match need.placement {
        Placement::Pack => "ASC",
        Placement::Spread => "DESC",
    }
}

/// One index walk (see migration 0008): the best [`SHORTLIST`] hosts of
/// one kind, in [`key`]'s order (`first`: its leading term, direction
/// included).
fn walk(need: &Need, filter: &str, free_gpus: &str, first: &str) -> String {
    let d = dir(need);
    format!(
        "SELECT * FROM (SELECT {} FROM hosts h WHERE {SCHEDULABLE}{ROOM} AND {filter} \
         ORDER BY {first}, {FREE_VCPUS} {d}, {FREE_MEMORY} {d}, h.id ASC LIMIT {SHORTLIST})",
        columns(free_gpus)
    )
}

/// The shortlist query for `need` (not pinned) over `walks` (see
/// [`walks`]; `$7` is the GPU count, the walked models are bound from `$8`
/// on): for CPU work one walk over the region's hosts; for GPU work one
/// walk per model over the hosts with GPUs of that model only, and, when
/// `*` is listed, the hosts with several models (whose matching GPUs are
/// counted per host).
fn shortlist_sql(need: &Need, walks: &[String]) -> String {
    if need.gpu_count == 0 {
        return format!(
            "{} c0",
            // Least GPUs wasted first, for pack and spread alike.
            walk(need, "1 = 1", "CAST(0 AS BIGINT)", "h.gpu_total ASC")
        );
    }
    let mut parts: Vec<String> = Vec::new();
    let models = walks.iter().filter(|m| *m != MIXED).count();
    for i in 0..models {
        let filter = format!("h.gpu_model = ${} AND h.gpu_free >= $7", 8 + i);
        let first = format!("h.gpu_free {}", dir(need));
        parts.push(format!(
            "{} c{i}",
            walk(need, &filter, "h.gpu_free", &first)
        ));
    }
    if walks.iter().any(|m| m == MIXED) {
        // Few, in practice: all of the region's with room; `ranked` drops
        // those with too few matching GPUs and orders the rest.
        parts.push(format!(
            "SELECT {} FROM hosts h WHERE {SCHEDULABLE}{ROOM} AND h.gpu_model = '{MIXED}'",
            columns(&matching_free())
        ));
    }
    parts.join(" UNION ALL ")
}

/// `hosts.gpu_model` of a host with GPUs of several models.
const MIXED: &str = "*";

/// What to walk for `count` GPUs of the flavor model `model` in `region`:
/// the NVML models it matches (itself and its aliases) of which some host
/// of the region has `count` free, and [`MIXED`] when a host there with
/// several models has `count` free GPUs of any model. Empty: no host of the
/// region can have them.
async fn walks(tx: &mut Tx, model: &str, region: &str, count: u32) -> Result<Vec<String>, DbError> {
    // Per model, the most free GPUs a host of the region has: a scalar
    // subquery walking the placement index (its ORDER BY keeps both
    // databases on the index even where their statistics say every host
    // has the model), never a join over every host.
    let sql = format!(
        "SELECT x.model FROM (SELECT m.model, (SELECT h.gpu_free FROM hosts h \
         WHERE h.region = $2 AND h.gpu_model = m.model ORDER BY h.gpu_free DESC LIMIT 1) \
         AS most FROM (SELECT $1 AS model UNION SELECT a.model FROM gpu_aliases a \
         WHERE a.alias = $1 UNION SELECT '{MIXED}') m) x WHERE x.most >= $3"
    );
    let mut found: Vec<String> = sqlx::query_scalar(&sql)
        .bind(model)
        .bind(region)
        .bind(count as i64)
        .fetch_all(&mut **tx)
        .await?;
    found.sort();
    found.dedup();
    Ok(found)
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// `sql` with `$1` (the flavor's GPU model), `$2` (the heartbeat cutoff)
/// and `$3` (the region) bound.
fn bind_first<'q>(sql: &'q str, model: &str, cutoff_ms: i64, region: &str) -> Query<'q> {
    sqlx::query(sql)
        .bind(model.to_string())
        .bind(cutoff_ms)
        .bind(region.to_string())
}

fn read(rows: &[sqlx::any::AnyRow]) -> Result<Vec<Candidate>, DbError> {
    rows.iter()
        .map(|r| {
            Ok(Candidate {
                id: col(r, "id")?,
                free_vcpus: col(r, "free_vcpus")?,
                free_memory_mib: col(r, "free_memory")?,
                free_disk_gib: col(r, "free_disk")?,
                free_gpus: col(r, "free_gpus")?,
                total_gpus: col(r, "total_gpus")?,
            })
        })
        .collect()
}

/// Loads schedulable hosts of `need.region` (only `need.host` when set).
/// With `fitting`, a shortlist of the best hosts with room for `need` (each
/// walk reads a few dozen index entries, however many hosts there are);
/// without, every schedulable host (for [`explain`]).
pub async fn candidates(
    tx: &mut Tx,
    need: &Need,
    cutoff_ms: i64,
    fitting: bool,
) -> Result<Vec<Candidate>, DbError> {
    let model = need.gpu_model.clone().unwrap_or_default();
    let bind_common = |sql| bind_first(sql, &model, cutoff_ms, &need.region);
    let rows = match (&need.host, fitting) {
        (Some(h), _) => {
            let sql = format!(
                "SELECT {} FROM hosts h WHERE {SCHEDULABLE} AND h.id = $4",
                columns(&matching_free())
            );
            bind_common(&sql)
                .bind(h.to_string())
                .fetch_all(&mut **tx)
                .await?
        }
        (None, false) => {
            let sql = format!(
                "SELECT {} FROM hosts h WHERE {SCHEDULABLE}",
                columns(&matching_free())
            );
            bind_common(&sql).fetch_all(&mut **tx).await?
        }
        (None, true) => {
            let walked = if need.gpu_count > 0 {
                let w = walks(tx, &model, &need.region, need.gpu_count).await?;
                if w.is_empty() {
                    return Ok(Vec::new());
                }
                w
            } else {
                Vec::new()
            };
            let sql = shortlist_sql(need, &walked);
            let mut q = bind_common(&sql)
                .bind(need.vcpus as i64)
                .bind(need.memory_mib as i64)
                .bind(need.disk_gib as i64);
            if need.gpu_count > 0 {
                q = q.bind(need.gpu_count as i64);
                for m in walked.into_iter().filter(|m| m != MIXED) {
                    q = q.bind(m);
                }
            }
            q.fetch_all(&mut **tx).await?
        }
    };
    read(&rows)
}

/// Picks a host of `need.region` (only `need.host` when set) and claims
/// capacity and GPUs on it for `instance`: the best candidate first, the
/// next one when another placement took a candidate's capacity meanwhile.
/// Returns the host and the claimed GPUs' PCI addresses. [`PlaceError::NoFit`]
/// names a pinned host (the caller says why it pinned, and names the
/// region where that helps).
pub async fn place(
    tx: &mut Tx,
    instance: InstanceId,
    need: &Need,
    cutoff_ms: i64,
    timeout_secs: u64,
) -> Result<(HostId, Vec<String>), PlaceError> {
    place_with(tx, instance, need, None, cutoff_ms, timeout_secs).await
}

/// [`place`] for a network group's member: the hosts `pref` prefers first
/// (a `pack` group's hosts are candidates even when the shortlist missed
/// them).
pub async fn place_with(
    tx: &mut Tx,
    instance: InstanceId,
    need: &Need,
    pref: Option<&GroupPref>,
    cutoff_ms: i64,
    timeout_secs: u64,
) -> Result<(HostId, Vec<String>), PlaceError> {
    let mut cands = candidates(tx, need, cutoff_ms, true).await?;
    if let (Some(p), None) = (pref, &need.host) {
        if p.placement == GroupPlacement::Pack {
            for h in p.hosts.iter().take(SHORTLIST as usize) {
                if cands.iter().any(|c| c.id == *h) {
                    continue;
                }
                let Ok(id) = h.parse::<HostId>() else {
                    continue;
                };
                let pinned = Need {
                    host: Some(id),
                    ..need.clone()
                };
                cands.extend(candidates(tx, &pinned, cutoff_ms, true).await?);
            }
        }
    }
    let order = ranked_with(&cands, need, pref);
    if order.is_empty() {
        let all = candidates(tx, need, cutoff_ms, false).await?;
        let why = explain(&all, need, timeout_secs);
        return Err(PlaceError::NoFit(match &need.host {
            Some(h) => format!("host {h} cannot take this instance: {why}"),
            None => why,
        }));
    }
    // On PostgreSQL writers run side by side: a first pass passes over
    // candidates whose row another transaction holds (a heartbeat, another
    // placement) rather than wait for it, since the next candidate is as
    // good a home; only when every candidate was held or full does the
    // second pass wait. SQLite has one writer: nothing is ever held.
    let passes: &[Lock] = match tx.backend() {
        Backend::Postgres => &[Lock::SkipHeld, Lock::Wait],
        Backend::Sqlite => &[Lock::Wait],
    };
    for &lock in passes {
        for &i in &order {
            let host: HostId = cands[i].id.parse().map_err(|e| {
                PlaceError::Db(DbError::Corrupt {
                    table: "hosts",
                    message: format!("id: {e}"),
                })
            })?;
            match reserve_capacity_as(tx, &host, need, lock).await {
                // Nothing was written: the next candidate may still fit.
                Err(PlaceError::Raced) => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            let model = need.gpu_model.as_deref().unwrap_or_default();
            let gpus = claim_gpus(tx, &host, instance, model, need.gpu_count).await?;
            return Ok((host, gpus));
        }
    }
    Err(PlaceError::Raced)
}

/// How a placement takes a candidate host's row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lock {
    /// Waits for a transaction that holds it.
    Wait,
    /// Passes over it (as if full) while another transaction holds it
    /// (PostgreSQL's `SKIP LOCKED`).
    SkipHeld,
}

/// Claims `need` on `host` (conditional updates; [`PlaceError::Raced`] when
/// the capacity is gone): capacity, then GPUs ([`claim_gpus`]).
pub async fn reserve(
    tx: &mut Tx,
    host: &HostId,
    instance: InstanceId,
    need: &Need,
) -> Result<Vec<String>, PlaceError> {
    reserve_capacity(tx, host, need).await?;
    let model = need.gpu_model.as_deref().unwrap_or_default();
    claim_gpus(tx, host, instance, model, need.gpu_count).await
}

/// Claims `need`'s vCPUs, memory and disk on `host` (not its GPUs). The
/// host row is the first row every placement locks.
pub async fn reserve_capacity(tx: &mut Tx, host: &HostId, need: &Need) -> Result<(), PlaceError> {
    reserve_capacity_as(tx, host, need, Lock::Wait).await
}

async fn reserve_capacity_as(
    tx: &mut Tx,
    host: &HostId,
    need: &Need,
    lock: Lock,
) -> Result<(), PlaceError> {
    const WAIT: &str = "UPDATE hosts SET used_vcpus = used_vcpus + $1, \
        used_memory_mib = used_memory_mib + $2, used_disk_gib = used_disk_gib + $3 \
        WHERE id = $4 AND vcpus - used_vcpus >= $1 \
        AND memory_mib - used_memory_mib >= $2 AND disk_gib - used_disk_gib >= $3";
    const SKIP_HELD: &str = "UPDATE hosts SET used_vcpus = used_vcpus + $1, \
        used_memory_mib = used_memory_mib + $2, used_disk_gib = used_disk_gib + $3 \
        WHERE id = (SELECT id FROM hosts WHERE id = $4 FOR UPDATE SKIP LOCKED) \
        AND vcpus - used_vcpus >= $1 \
        AND memory_mib - used_memory_mib >= $2 AND disk_gib - used_disk_gib >= $3";
    let done = sqlx::query(match lock {
        Lock::Wait => WAIT,
        Lock::SkipHeld => SKIP_HELD,
    })
    .bind(need.vcpus as i64)
    .bind(need.memory_mib as i64)
    .bind(need.disk_gib as i64)
    .bind(host.to_string())
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(PlaceError::Raced);
    }
    Ok(())
}

/// Free, healthy GPUs on `host` matching the flavor model `model` (alias
/// table included), by NVML model, each list in PCI order.
pub async fn free_gpus(
    tx: &mut Tx,
    host: &HostId,
    model: &str,
) -> Result<BTreeMap<String, Vec<String>>, DbError> {
    let rows = sqlx::query(&format!(
        "SELECT pci, model FROM host_gpus WHERE host_id = $2 AND instance_id IS NULL \
         AND health = 'healthy' AND {} ORDER BY model, pci",
        crate::gpus::model_matches("model", "$1")
    ))
    .bind(model)
    .bind(host.to_string())
    .fetch_all(&mut **tx)
    .await?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &rows {
        out.entry(col(r, "model")?)
            .or_default()
            .push(col(r, "pci")?);
    }
    Ok(out)
}

/// Which of `free` (PCI addresses by model) to take for `count` GPUs: all
/// of one model when some model has enough (the one with the fewest free,
/// to pack), else the largest models first. `None` when there are too few.
pub fn pick_gpus(
    free: &BTreeMap<String, Vec<String>>,
    count: usize,
) -> Option<Vec<(String, Vec<String>)>> {
    if free.values().map(Vec::len).sum::<usize>() < count {
        return None;
    }
    if let Some((m, p)) = free
        .iter()
        .filter(|(_, p)| p.len() >= count)
        .min_by_key(|(m, p)| (p.len(), *m))
    {
        return Some(vec![(m.clone(), p[..count].to_vec())]);
    }
    let mut models: Vec<_> = free.iter().collect();
    models.sort_by_key(|(m, p)| (std::cmp::Reverse(p.len()), *m));
    let mut left = count;
    let mut out = Vec::new();
    for (m, p) in models {
        let take = left.min(p.len());
        if take > 0 {
            out.push((m.clone(), p[..take].to_vec()));
            left -= take;
        }
    }
    Some(out)
}

/// Books `count` free, healthy GPUs of `model` on `host` for `instance`
/// (conditional updates of the pool and of each GPU, so a GPU is never
/// booked twice). Returns their PCI addresses, sorted.
pub async fn claim_gpus(
    tx: &mut Tx,
    host: &HostId,
    instance: InstanceId,
    model: &str,
    count: u32,
) -> Result<Vec<String>, PlaceError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let free = free_gpus(tx, host, model).await?;
    let picked = pick_gpus(&free, count as usize).ok_or(PlaceError::Raced)?;
    let mut gpus = Vec::with_capacity(count as usize);
    for (m, pcis) in picked {
        take_from_pool(tx, host, &m, pcis.len() as i64).await?;
        for pci in pcis {
            let done = sqlx::query(
                "UPDATE host_gpus SET instance_id = $1 WHERE host_id = $2 AND pci = $3 \
                 AND instance_id IS NULL AND health = 'healthy'",
            )
            .bind(instance.to_string())
            .bind(host.to_string())
            .bind(&pci)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() != 1 {
                return Err(PlaceError::Raced);
            }
            gpus.push(pci);
        }
    }
    gpus.sort();
    Ok(gpus)
}

/// Takes `n` from the free count of the host's pool of NVML model `model`.
async fn take_from_pool(tx: &mut Tx, host: &HostId, model: &str, n: i64) -> Result<(), PlaceError> {
    let done = sqlx::query(
        "UPDATE host_gpu_pools SET free = free - $1 WHERE host_id = $2 AND model = $3 \
         AND free >= $1",
    )
    .bind(n)
    .bind(host.to_string())
    .bind(model)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Err(PlaceError::Raced);
    }
    Ok(())
}

/// Books exactly the GPUs `pcis` on `host` for `instance`, whatever their
/// health (an instance keeps GPUs it already has on the host), when no
/// other instance holds any of them; the healthy ones leave their pool.
/// [`PlaceError::Raced`] when one is taken or gone.
pub async fn book_exact(
    tx: &mut Tx,
    host: &HostId,
    instance: InstanceId,
    pcis: &[String],
) -> Result<(), PlaceError> {
    for pci in pcis {
        let row = sqlx::query(
            "SELECT model, health FROM host_gpus WHERE host_id = $1 AND pci = $2 \
             AND instance_id IS NULL",
        )
        .bind(host.to_string())
        .bind(pci)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(PlaceError::Raced)?;
        if col::<String>(&row, "health")? == "healthy" {
            take_from_pool(tx, host, &col::<String>(&row, "model")?, 1).await?;
        }
        let done = sqlx::query(
            "UPDATE host_gpus SET instance_id = $1 WHERE host_id = $2 AND pci = $3 \
             AND instance_id IS NULL",
        )
        .bind(instance.to_string())
        .bind(host.to_string())
        .bind(pci)
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(PlaceError::Raced);
        }
    }
    Ok(())
}

/// Gives back what `instance` holds on `host`: capacity and GPUs (not its
/// address or ports: see `crate::access::release`).
pub async fn free(
    tx: &mut Tx,
    host: &HostId,
    instance: InstanceId,
    vcpus: u32,
    memory_mib: u64,
    disk_gib: u64,
) -> Result<(), DbError> {
    free_capacity(tx, host, vcpus, memory_mib, disk_gib).await?;
    unbook_gpus(tx, host, instance).await
}

/// Gives back vCPUs, memory and disk on `host`.
pub async fn free_capacity(
    tx: &mut Tx,
    host: &HostId,
    vcpus: u32,
    memory_mib: u64,
    disk_gib: u64,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE hosts SET used_vcpus = used_vcpus - $1, used_memory_mib = used_memory_mib - $2, \
         used_disk_gib = used_disk_gib - $3 WHERE id = $4",
    )
    .bind(vcpus as i64)
    .bind(memory_mib as i64)
    .bind(disk_gib as i64)
    .bind(host.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Unbooks every GPU `instance` holds; the healthy ones go back to their
/// pools (the others come back when the host reports them healthy).
pub async fn unbook_gpus(tx: &mut Tx, host: &HostId, instance: InstanceId) -> Result<(), DbError> {
    let held = sqlx::query(
        "SELECT model, COUNT(*) AS n FROM host_gpus WHERE host_id = $1 AND instance_id = $2 \
         AND health = 'healthy' GROUP BY model",
    )
    .bind(host.to_string())
    .bind(instance.to_string())
    .fetch_all(&mut **tx)
    .await?;
    for r in &held {
        sqlx::query("UPDATE host_gpu_pools SET free = free + $1 WHERE host_id = $2 AND model = $3")
            .bind(col::<i64>(r, "n")?)
            .bind(host.to_string())
            .bind(col::<String>(r, "model")?)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query("UPDATE host_gpus SET instance_id = NULL WHERE instance_id = $1")
        .bind(instance.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
