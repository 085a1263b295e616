//! Change-type: moving a Stopped instance to another flavor on its host,
//! GPUs included, and undoing it when the host fails the operation.
//!
//! The instance keeps those of its GPUs that match the new flavor's model
//! (up to its count) and books more free, healthy ones through the
//! scheduler; leaving a GPU flavor unbooks them all. The operation's detail
//! ([`OpDetail::ChangeType`]) holds the new flavor, then the old flavor,
//! root disk and GPU booking, so a failed operation restores exactly the
//! old booking. The agent's `ChangeType` command carries every GPU
//! booked after the change (`api::commands`).

use crate::db::{col, rows, rows::InstanceRec, Tx};
use crate::error::{ApiError, ApiResult};
use crate::operations::OpDetail;
use crate::scheduler::{self, Need, PlaceError};
use gantry_proto::api::v1::{FlavorInfo, Placement};
use gantry_proto::ids::{FlavorId, HostId, InstanceId};

async fn flavor(tx: &mut Tx, id: &str) -> ApiResult<Option<FlavorInfo>> {
    let row = sqlx::query(&format!(
        "SELECT {} FROM flavors WHERE id = $1",
        rows::FLAVOR_COLS
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.as_ref().map(rows::flavor).transpose()?)
}

fn need(f: &FlavorInfo, disk_gib: u64) -> Need {
    Need {
        vcpus: f.vcpus,
        memory_mib: f.memory_mib,
        disk_gib,
        gpu_model: f.gpu_model.clone(),
        gpu_count: f.gpu_count,
        placement: Placement::Pack,
        // Only the capacity counts: change-type stays on its host.
        region: String::new(),
        host: None,
    }
}

/// The GPUs booked for `instance`, sorted by PCI address.
async fn booked(tx: &mut Tx, instance: InstanceId) -> ApiResult<Vec<String>> {
    let found = sqlx::query("SELECT pci FROM host_gpus WHERE instance_id = $1 ORDER BY pci")
        .bind(instance.to_string())
        .fetch_all(&mut **tx)
        .await?;
    Ok(found
        .iter()
        .map(|r| col::<String>(r, "pci"))
        .collect::<Result<_, _>>()?)
}

/// Moves the instance to flavor `to` on its host (it is Stopped): frees its
/// capacity, books the new flavor's and re-books GPUs. Returns the
/// operation detail (see the module doc).
pub(crate) async fn change_type(
    tx: &mut Tx,
    rec: &InstanceRec,
    to: FlavorId,
) -> ApiResult<OpDetail> {
    let f = flavor(tx, &to.to_string())
        .await?
        .ok_or_else(|| ApiError::invalid("flavor", format!("no flavor {to}")))?;
    let host = rec
        .host
        .ok_or_else(|| ApiError::Conflict(format!("instance {} has no host", rec.id)))?;
    let disk = rec.root_disk_gib.max(f.root_disk_gib);
    let old = booked(tx, rec.id).await?;
    scheduler::free_capacity(tx, &host, rec.vcpus, rec.memory_mib, rec.root_disk_gib).await?;
    match scheduler::reserve_capacity(tx, &host, &need(&f, disk)).await {
        Ok(()) => {}
        Err(PlaceError::Db(e)) => return Err(e.into()),
        Err(_) => {
            return Err(ApiError::Conflict(format!(
                "host {host} has no room for flavor {}; release and recreate the instance \
                 from a snapshot instead",
                f.name
            )))
        }
    }
    rebook_gpus(tx, &host, rec.id, &f).await?;
    sqlx::query("UPDATE instances SET flavor_id = $1, root_disk_gib = $2 WHERE id = $3")
        .bind(to.to_string())
        .bind(disk as i64)
        .bind(rec.id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(OpDetail::ChangeType {
        flavor: to,
        old_flavor: rec.flavor,
        old_root_disk_gib: rec.root_disk_gib,
        old_gpus: old,
    })
}

/// Books flavor `f`'s GPUs for `id` on `host`: the instance's own GPUs
/// that match (healthy, or leased to it by the host) first, then free,
/// healthy ones; a 409 says how many the host has when too few.
async fn rebook_gpus(tx: &mut Tx, host: &HostId, id: InstanceId, f: &FlavorInfo) -> ApiResult<()> {
    let model = f.gpu_model.clone().filter(|_| f.gpu_count > 0);
    let keep = match &model {
        None => Vec::new(),
        Some(m) => {
            let found = sqlx::query(&format!(
                "SELECT pci FROM host_gpus WHERE instance_id = $2 AND health IN \
                 ('healthy', 'leased') AND {} ORDER BY pci LIMIT $3",
                crate::gpus::model_matches("model", "$1")
            ))
            .bind(m.clone())
            .bind(id.to_string())
            .bind(f.gpu_count as i64)
            .fetch_all(&mut **tx)
            .await?;
            found
                .iter()
                .map(|r| col::<String>(r, "pci"))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    scheduler::unbook_gpus(tx, host, id).await?;
    let Some(model) = model else {
        return Ok(());
    };
    let more = f.gpu_count - keep.len() as u32;
    let res = match scheduler::book_exact(tx, host, id, &keep).await {
        Ok(()) => scheduler::claim_gpus(tx, host, id, &model, more).await,
        Err(e) => Err(e),
    };
    match res {
        Ok(_) => Ok(()),
        Err(PlaceError::Db(e)) => Err(e.into()),
        Err(_) => {
            let free: usize = scheduler::free_gpus(tx, host, &model)
                .await?
                .values()
                .map(Vec::len)
                .sum();
            Err(ApiError::Conflict(format!(
                "host {host} has {} free healthy {model} GPUs for this instance; flavor {} \
                 needs {}",
                free + keep.len(),
                f.name,
                f.gpu_count
            )))
        }
    }
}

/// Undoes a `change-type` the host could not carry out: books the old
/// flavor, disk and GPUs again (the new ones if the old no longer fit) and
/// records them.
pub(crate) async fn undo(
    tx: &mut Tx,
    rec: &InstanceRec,
    old: &FlavorId,
    disk: u64,
    old_gpus: &[String],
) -> ApiResult<()> {
    let Some(host) = rec.host else {
        return Ok(());
    };
    let Some(f) = flavor(tx, &old.to_string()).await? else {
        return Ok(());
    };
    let old_gpus = Some(old_gpus.to_vec());
    let now_gpus = booked(tx, rec.id).await?;
    let id = rec.id;
    scheduler::free_capacity(tx, &host, rec.vcpus, rec.memory_mib, rec.root_disk_gib).await?;
    scheduler::unbook_gpus(tx, &host, id).await?;
    let (flavor_id, disk) = match scheduler::reserve_capacity(tx, &host, &need(&f, disk)).await {
        Ok(()) => {
            restore_gpus(tx, &host, id, &f, old_gpus.as_deref()).await?;
            (f.id, disk)
        }
        Err(e) => {
            // The old size no longer fits: keep the new one booked.
            tracing::error!(instance = %id, error = %e, "cannot restore the old flavor");
            let n = Need {
                vcpus: rec.vcpus,
                memory_mib: rec.memory_mib,
                disk_gib: rec.root_disk_gib,
                gpu_model: None,
                gpu_count: 0,
                placement: Placement::Pack,
                region: String::new(),
                host: None,
            };
            scheduler::reserve_capacity(tx, &host, &n)
                .await
                .map_err(place_error)?;
            scheduler::book_exact(tx, &host, id, &now_gpus)
                .await
                .map_err(place_error)?;
            (rec.flavor, rec.root_disk_gib)
        }
    };
    sqlx::query("UPDATE instances SET flavor_id = $1, root_disk_gib = $2 WHERE id = $3")
        .bind(flavor_id.to_string())
        .bind(disk as i64)
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn place_error(e: PlaceError) -> ApiError {
    match e {
        PlaceError::Db(e) => ApiError::Db(e),
        other => ApiError::Conflict(other.to_string()),
    }
}

/// Books the old GPUs again: exactly `old` when recorded and still free,
/// else any of the old flavor's model (logged when even that fails).
async fn restore_gpus(
    tx: &mut Tx,
    host: &HostId,
    id: InstanceId,
    f: &FlavorInfo,
    old: Option<&[String]>,
) -> ApiResult<()> {
    if let Some(old) = old {
        match scheduler::book_exact(tx, host, id, old).await {
            Ok(()) => return Ok(()),
            Err(PlaceError::Db(e)) => return Err(e.into()),
            Err(_) => scheduler::unbook_gpus(tx, host, id).await?,
        }
    }
    let model = f.gpu_model.as_deref().unwrap_or_default();
    match scheduler::claim_gpus(tx, host, id, model, f.gpu_count).await {
        Ok(_) => Ok(()),
        Err(PlaceError::Db(e)) => Err(e.into()),
        Err(e) => {
            tracing::error!(instance = %id, error = %e, "cannot restore the old GPUs");
            scheduler::unbook_gpus(tx, host, id).await?;
            Ok(())
        }
    }
}
