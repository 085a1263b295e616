//! The controller's record of each host's GPUs (`host_gpus`): what the
//! host last reported of each one (model, NVML UUID, memory, NUMA node,
//! health; see `gantry_proto::gpu`), the per-model pools the scheduler
//! reads (`host_gpu_pools`: only healthy GPUs no instance holds are
//! free), the alias table that lets a flavor's `gpu_model` ("H100") match
//! NVML names ("NVIDIA H100 80GB HBM3"), and the views and metrics built
//! from them.
//!
//! The host owns a GPU's health; the controller owns its booking
//! (`instance_id`). A report never changes a booking, and booking never
//! changes a health.

use crate::db::{col, parsed_opt, DbError, Tx};
use crate::error::{ApiError, ApiResult};
use gantry_proto::api::v1::{GpuDevice, GpuInfo};
use gantry_proto::gpu::{GpuHealth, GpuHealthKind};
use gantry_proto::ids::HostId;
use gantry_proto::validate::{self, PciAddress};
use std::collections::HashMap;

/// The longest GPU model name (and alias model) accepted.
pub const MAX_MODEL_LEN: usize = 96;

/// SQL that is true when the column `model` matches the flavor model bound
/// at `param` (`$1`): the same name, or a model listed under it in
/// `gpu_aliases`.
pub fn model_matches(column: &str, param: &str) -> String {
    format!(
        "({column} = {param} OR {column} IN (SELECT a.model FROM gpu_aliases a \
         WHERE a.alias = {param}))"
    )
}

/// A GPU model name: 1 to 96 printable characters, no surrounding spaces.
pub fn check_model(field: &str, s: &str) -> ApiResult<()> {
    if s.trim().is_empty() || s.chars().count() > MAX_MODEL_LEN {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_MODEL_LEN} characters long"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    if s.trim() != s {
        return Err(ApiError::invalid(
            field,
            "must not start or end with a space",
        ));
    }
    Ok(())
}

/// Checks what a host reports of one GPU beyond its model and address.
pub fn check_device(field: &str, g: &GpuDevice) -> ApiResult<()> {
    check_model(&format!("{field}.model"), &g.model)?;
    if let Some(u) = &g.uuid {
        validate::free_text(&format!("{field}.uuid"), u, MAX_MODEL_LEN)?;
    }
    if let Some(r) = g.health.reason() {
        validate::free_text(&format!("{field}.health.reason"), r, 500)?;
    }
    Ok(())
}

/// One GPU's row as stored (all but the booking), for comparing with a
/// report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    model: String,
    uuid: Option<String>,
    memory_bytes: Option<i64>,
    numa_node: Option<i64>,
    health: String,
    reason: Option<String>,
}

impl Stored {
    fn of(g: &GpuDevice) -> Self {
        Self {
            model: g.model.clone(),
            uuid: g.uuid.clone(),
            memory_bytes: g.memory_bytes.map(|m| m.min(i64::MAX as u64) as i64),
            numa_node: g.numa_node.map(i64::from),
            health: g.health.kind().name().to_string(),
            reason: g.health.reason().map(str::to_string),
        }
    }

    fn read(r: &sqlx::any::AnyRow) -> Result<Self, DbError> {
        Ok(Self {
            model: col(r, "model")?,
            uuid: col(r, "uuid")?,
            memory_bytes: col(r, "memory_bytes")?,
            numa_node: col(r, "numa_node")?,
            health: col(r, "health")?,
            reason: col(r, "health_reason")?,
        })
    }
}

const GPU_COLS: &str = "pci, model, instance_id, uuid, memory_bytes, numa_node, health, \
     health_reason";

/// Makes the host's GPU rows match its report: new GPUs are added, changed
/// ones updated (bookings kept), missing ones removed unless an instance
/// holds them; when anything changed, the per-model pools and `gpu_total`
/// are recounted. A report equal to the rows costs one `SELECT`.
pub async fn sync(tx: &mut Tx, id: &HostId, gpus: &[GpuDevice]) -> Result<(), DbError> {
    let host = id.to_string();
    let rows = sqlx::query(&format!(
        "SELECT {GPU_COLS} FROM host_gpus WHERE host_id = $1"
    ))
    .bind(&host)
    .fetch_all(&mut **tx)
    .await?;
    let mut known: HashMap<String, (Stored, bool)> = HashMap::with_capacity(rows.len());
    for r in &rows {
        let held = col::<Option<String>>(r, "instance_id")?.is_some();
        known.insert(col(r, "pci")?, (Stored::read(r)?, held));
    }
    let want: HashMap<String, Stored> = gpus
        .iter()
        .map(|g| (g.pci.to_string(), Stored::of(g)))
        .collect();
    if want.len() == known.len()
        && want
            .iter()
            .all(|(p, s)| known.get(p).is_some_and(|k| k.0 == *s))
    {
        return Ok(());
    }
    for (pci, (_, held)) in &known {
        if want.contains_key(pci) {
            continue;
        }
        if *held {
            tracing::warn!(%host, %pci, "a held GPU is gone from the host's report; keeping it");
            continue;
        }
        sqlx::query("DELETE FROM host_gpus WHERE host_id = $1 AND pci = $2")
            .bind(&host)
            .bind(pci)
            .execute(&mut **tx)
            .await?;
    }
    for (pci, s) in &want {
        let sql = match known.get(pci) {
            Some((k, _)) if k == s => continue,
            Some(_) => {
                "UPDATE host_gpus SET model = $3, uuid = $4, memory_bytes = $5, numa_node = $6, \
                 health = $7, health_reason = $8 WHERE host_id = $1 AND pci = $2"
            }
            None => {
                "INSERT INTO host_gpus (host_id, pci, model, uuid, memory_bytes, numa_node, \
                 health, health_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            }
        };
        sqlx::query(sql)
            .bind(&host)
            .bind(pci)
            .bind(&s.model)
            .bind(s.uuid.clone())
            .bind(s.memory_bytes)
            .bind(s.numa_node)
            .bind(&s.health)
            .bind(s.reason.clone())
            .execute(&mut **tx)
            .await?;
    }
    recount(tx, &host).await
}

/// Recounts the host's pools (free: healthy and not booked) and its
/// `gpu_total` from its GPU rows.
async fn recount(tx: &mut Tx, host: &str) -> Result<(), DbError> {
    sqlx::query("DELETE FROM host_gpu_pools WHERE host_id = $1")
        .bind(host)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO host_gpu_pools (host_id, model, total, free) SELECT host_id, model, \
         COUNT(*), SUM(CASE WHEN instance_id IS NULL AND health = 'healthy' THEN 1 ELSE 0 END) \
         FROM host_gpus WHERE host_id = $1 GROUP BY host_id, model",
    )
    .bind(host)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE hosts SET gpu_total = (SELECT COUNT(*) FROM host_gpus g WHERE g.host_id = $1) \
         WHERE id = $1",
    )
    .bind(host)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn parse_pci(s: &str) -> Result<PciAddress, DbError> {
    PciAddress::parse(s).ok_or_else(|| DbError::Corrupt {
        table: "host_gpus",
        message: format!("pci {s:?}"),
    })
}

/// A `host_gpus` row (selected with [`GPU_COLS`]) as the API shows it.
fn info(r: &sqlx::any::AnyRow) -> Result<GpuInfo, DbError> {
    let s = Stored::read(r)?;
    let kind = GpuHealthKind::parse(&s.health).ok_or_else(|| DbError::Corrupt {
        table: "host_gpus",
        message: format!("health {:?}", s.health),
    })?;
    Ok(GpuInfo {
        model: s.model,
        pci: parse_pci(&col::<String>(r, "pci")?)?,
        instance: parsed_opt(r, "instance_id", "host_gpus")?,
        uuid: s.uuid,
        memory_bytes: s.memory_bytes.map(|m| m.max(0) as u64),
        numa_node: s.numa_node.and_then(|n| u32::try_from(n).ok()),
        health: GpuHealth::from_parts(kind, s.reason),
    })
}

/// The GPUs of one host (or of every host), by host id, in PCI order.
pub async fn of_hosts(
    pool: &sqlx::AnyPool,
    host: Option<&HostId>,
) -> Result<HashMap<String, Vec<GpuInfo>>, DbError> {
    let found = sqlx::query(&format!(
        "SELECT host_id, {GPU_COLS} FROM host_gpus WHERE $1 = '' OR host_id = $1 \
         ORDER BY host_id, pci"
    ))
    .bind(host.map(|h| h.to_string()).unwrap_or_default())
    .fetch_all(pool)
    .await?;
    let mut out: HashMap<String, Vec<GpuInfo>> = HashMap::new();
    for r in &found {
        out.entry(col(r, "host_id")?).or_default().push(info(r)?);
    }
    Ok(out)
}

/// The GPUs booked for an instance, in PCI order.
pub async fn of_instance<'e, E>(ex: E, instance: &str) -> Result<Vec<GpuInfo>, DbError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let found = sqlx::query(&format!(
        "SELECT {GPU_COLS} FROM host_gpus WHERE instance_id = $1 ORDER BY pci"
    ))
    .bind(instance)
    .fetch_all(ex)
    .await?;
    found.iter().map(info).collect()
}

/// The PCI addresses booked for an instance, sorted.
pub async fn booked<'e, E>(ex: E, instance: &str) -> Result<Vec<PciAddress>, DbError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let found = sqlx::query("SELECT pci FROM host_gpus WHERE instance_id = $1")
        .bind(instance)
        .fetch_all(ex)
        .await?;
    let mut out = found
        .iter()
        .map(|r| parse_pci(&col::<String>(r, "pci")?))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    Ok(out)
}

/// `gantry_host_gpus{host,health}`: each host's GPUs by health (every
/// kind, zeros included), in the Prometheus text format.
pub async fn render_metrics(pool: &sqlx::AnyPool) -> Result<String, DbError> {
    let hosts = sqlx::query("SELECT id, name FROM hosts ORDER BY name")
        .fetch_all(pool)
        .await?;
    let counts = sqlx::query(
        "SELECT host_id, health, COUNT(*) AS n FROM host_gpus GROUP BY host_id, health",
    )
    .fetch_all(pool)
    .await?;
    let mut by: HashMap<(String, String), i64> = HashMap::new();
    for r in &counts {
        by.insert((col(r, "host_id")?, col(r, "health")?), col(r, "n")?);
    }
    let mut out = String::from(
        "# HELP gantry_host_gpus GPUs of each host by health, as the host last reported them.\n\
         # TYPE gantry_host_gpus gauge\n",
    );
    for r in &hosts {
        let (id, name): (String, String) = (col(r, "id")?, col(r, "name")?);
        for k in GpuHealthKind::ALL {
            let n = by.get(&(id.clone(), k.name().to_string())).unwrap_or(&0);
            out.push_str(&format!(
                "gantry_host_gpus{{host=\"{}\",health=\"{}\"}} {n}\n",
                crate::metrics::escape(&name),
                k.name()
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_checked() {
        assert!(check_model("m", "NVIDIA H100 80GB HBM3").is_ok());
        assert!(check_model("m", "H100").is_ok());
        assert!(check_model("m", "").is_err());
        assert!(check_model("m", " H100").is_err());
        assert!(check_model("m", "H100\u{7}").is_err());
        assert!(check_model("m", &"x".repeat(97)).is_err());
    }

    #[test]
    fn alias_sql_names_the_parameter_twice() {
        let s = model_matches("g.model", "$2");
        assert_eq!(s.matches("$2").count(), 2);
        assert_eq!(crate::metrics::escape("a\"b"), "a\\\"b");
    }
}
