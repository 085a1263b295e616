//! Carrying out one operation the controller sent: each [`AgentCommand`]
//! mapped onto the manager ([`run_command`]), the local operation it starts
//! followed with progress reports every ~2 s, and what a command needs on
//! this host first (the image in the cache, the owner's store keys).

use super::journal::Finished;
use super::work::{kind, running, send_report, state_of, LOOK_EVERY, PROGRESS_EVERY};
use super::Link;
use crate::images;
use crate::manager::{Manager, ManagerError};
use crate::snapshots::SnapshotError;
use crate::volumes::VolumeGrowth;
use gantry_proto::api::agent::{AgentCommand, AgentOp, ImageOrigin, ImageSource, SnapshotSizes};
use gantry_proto::api::local::{
    ActionRequest, DiskKind, ImageFromSnapshot, ImportImage, OperationState, TakeSnapshot,
};
use gantry_proto::net::Secret;
use gantry_proto::spec::InstanceSpec;
use gantry_proto::{AccountId, InstanceId, InstanceState, OperationId, SnapshotId, VolumeId};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The instance the operation names; a command that needs one and has
/// none is refused.
fn needs_instance(op: &AgentOp) -> Result<InstanceId, ManagerError> {
    op.instance.ok_or_else(|| {
        ManagerError::Conflict(format!(
            "operation {} ({}) names no instance",
            op.id,
            kind(&op.command)
        ))
    })
}

/// How long an operation waits for another one on its instance to end.
const BUSY_WAIT: Duration = Duration::from_secs(120);

/// What starting a command gave.
enum Started {
    /// A local operation on this instance, to follow.
    Local(InstanceId, OperationId),
    /// Already over.
    Done(Finished),
}

/// A release of an instance this host holds nothing of (released before
/// a restart, or never here): done.
fn nothing_left() -> Started {
    Started::Done(Finished {
        note: Some("nothing of the instance is left on this host".into()),
        ..Finished::ok(Some(InstanceState::Released))
    })
}

/// Maps the command onto the manager and waits for the local operation;
/// an instance busy with another operation is waited for a while.
pub(super) async fn run_command(link: &Arc<Link>, op: &AgentOp) -> Result<Finished, ManagerError> {
    let since = Instant::now();
    loop {
        match start(link, op).await {
            Ok(Started::Local(id, local)) => return Ok(follow(link, op.id, id, local).await),
            Ok(Started::Done(f)) => return Ok(f),
            Err(ManagerError::Busy { .. }) if since.elapsed() < BUSY_WAIT => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn start(link: &Arc<Link>, op: &AgentOp) -> Result<Started, ManagerError> {
    let m = &link.manager;
    let act = |req: ActionRequest| -> Result<Started, ManagerError> {
        let id = needs_instance(op)?;
        Ok(Started::Local(id, m.action(id, req)?.id))
    };
    match &op.command {
        AgentCommand::Create { spec, image } => create(link, spec, image).await,
        AgentCommand::Start {} => act(ActionRequest::Start),
        AgentCommand::Stop {} => act(ActionRequest::Stop { timeout_secs: None }),
        AgentCommand::Reboot {} => act(ActionRequest::Reboot),
        AgentCommand::ForceReboot {} => act(ActionRequest::ForceReboot),
        AgentCommand::Suspend {} => act(ActionRequest::Suspend),
        AgentCommand::Resume {} => act(ActionRequest::Resume),
        AgentCommand::Release {} if m.holds_nothing_of(needs_instance(op)?) => Ok(nothing_left()),
        AgentCommand::Release {} => act(ActionRequest::Release {
            delete_data_volume: false,
        }),
        AgentCommand::ChangeType {
            vcpus,
            memory_mib,
            gpus,
            root_disk_gib,
        } => act(ActionRequest::ChangeType {
            vcpus: *vcpus,
            memory_mib: *memory_mib,
            gpus: gpus.clone(),
            root_disk_gib: *root_disk_gib,
        }),
        AgentCommand::ClearGpu { pci } => {
            m.gpus().clear(pci)?;
            Ok(Started::Done(Finished {
                note: Some(format!("GPU {pci} goes through the health gate")),
                ..Finished::ok(None)
            }))
        }
        AgentCommand::GrowDisk { root_disk_gib } => act(ActionRequest::GrowDisk {
            disk: DiskKind::Root,
            size_gib: *root_disk_gib,
        }),
        AgentCommand::Snapshot {
            snapshot,
            name,
            owner,
            auto_release,
        } => {
            let id = needs_instance(op)?;
            owner_keys(link, owner).await?;
            let req = TakeSnapshot {
                name: name.clone(),
                owner: Some(owner.to_string()),
                auto_release: *auto_release,
            };
            Ok(Started::Local(
                id,
                m.snapshot_as(id, req, Some(*snapshot))?.id,
            ))
        }
        AgentCommand::SetPassword { password_hash } => {
            set_password(m, needs_instance(op)?, password_hash.clone()).await
        }
        AgentCommand::DeleteSnapshot { snapshot } => {
            delete_snapshot(m, *snapshot).await?;
            Ok(Started::Done(Finished::ok(None)))
        }
        AgentCommand::GrowVolume { volume, size_gib } => grow_volume(m, *volume, *size_gib).await,
        AgentCommand::MoveOut {
            snapshot,
            volume_snapshot,
            owner,
        } => {
            move_out(
                link,
                needs_instance(op)?,
                *snapshot,
                *volume_snapshot,
                owner,
            )
            .await
        }
        AgentCommand::MoveIn {
            spec,
            image,
            volume_snapshot,
            owner,
        } => move_in(link, spec, image, *volume_snapshot, owner).await,
        AgentCommand::MoveCleanup {} if m.holds_nothing_of(needs_instance(op)?) => {
            Ok(nothing_left())
        }
        AgentCommand::MoveCleanup {} => act(ActionRequest::Release {
            delete_data_volume: true,
        }),
        AgentCommand::DeleteVolume { volume } => delete_volume(m, *volume).await,
    }
}

/// A create: the image in the host's cache (its chunk keys first when it
/// comes from a snapshot), then the local create.
async fn create(
    link: &Arc<Link>,
    spec: &InstanceSpec,
    image: &ImageSource,
) -> Result<Started, ManagerError> {
    if spec.image != image.image {
        return Err(ManagerError::Conflict(format!(
            "spec.image {} differs from image.image {}",
            spec.image, image.image
        )));
    }
    image_keys(link, image).await?;
    ensure_image(link, image).await?;
    let mm = link.manager.clone();
    let spec = spec.clone();
    let id = spec.id;
    let local = tokio::task::spawn_blocking(move || mm.create(spec))
        .await
        .expect("create task")?;
    Ok(Started::Local(id, local.id))
}

/// A move's first half on the old host: the instance saved into the
/// owner's namespace of the store (its root disk as `snapshot`, its data
/// volume as `volume_snapshot`).
async fn move_out(
    link: &Arc<Link>,
    id: InstanceId,
    snapshot: SnapshotId,
    volume_snapshot: Option<SnapshotId>,
    owner: &AccountId,
) -> Result<Started, ManagerError> {
    owner_keys(link, owner).await?;
    let (mm, o) = (link.manager.clone(), owner.to_string());
    tokio::task::spawn_blocking(move || mm.move_out(id, snapshot, volume_snapshot, &o))
        .await
        .expect("move task")?;
    Ok(Started::Done(Finished::ok(state_of(
        &link.manager,
        Some(id),
    ))))
}

/// A move's second half on the new host: the instance defined here,
/// Stopped, its root disk from `image` (the store entry the old host
/// saved, filled into the cache) and its data volume from
/// `volume_snapshot`.
async fn move_in(
    link: &Arc<Link>,
    spec: &InstanceSpec,
    image: &ImageSource,
    volume_snapshot: Option<SnapshotId>,
    owner: &AccountId,
) -> Result<Started, ManagerError> {
    owner_keys(link, owner).await?;
    ensure_image(link, image).await?;
    let (mm, spec) = (link.manager.clone(), spec.clone());
    let id = spec.id;
    let local = tokio::task::spawn_blocking(move || mm.move_in(spec, volume_snapshot))
        .await
        .expect("move task")?;
    Ok(Started::Local(id, local.id))
}

/// The store keys of the snapshot's owner, fetched unless held.
async fn owner_keys(link: &Link, owner: &AccountId) -> Result<(), ManagerError> {
    super::keys::ensure(link, &owner.to_string())
        .await
        .map_err(|e| SnapshotError::Keys(e.to_string()).into())
}

async fn set_password(
    m: &Arc<Manager>,
    id: InstanceId,
    hash: Secret,
) -> Result<Started, ManagerError> {
    let mm = m.clone();
    let note = tokio::task::spawn_blocking(move || mm.set_password(id, hash))
        .await
        .expect("password task")?;
    Ok(Started::Done(Finished {
        note: Some(note),
        ..Finished::ok(state_of(m, Some(id)))
    }))
}

/// A data volume grown: through its instance's disk when one has it
/// attached, on the file otherwise.
async fn grow_volume(m: &Arc<Manager>, v: VolumeId, size: u64) -> Result<Started, ManagerError> {
    let mm = m.clone();
    let how = tokio::task::spawn_blocking(move || mm.grow_volume(v, size))
        .await
        .expect("volume task")?;
    match how {
        VolumeGrowth::Through(id) => {
            let req = ActionRequest::GrowDisk {
                disk: DiskKind::Data,
                size_gib: size,
            };
            Ok(Started::Local(id, m.action(id, req)?.id))
        }
        VolumeGrowth::Done(note) => Ok(Started::Done(Finished {
            note: Some(note),
            ..Finished::ok(None)
        })),
    }
}

async fn delete_volume(m: &Arc<Manager>, v: VolumeId) -> Result<Started, ManagerError> {
    let mm = m.clone();
    let removed = tokio::task::spawn_blocking(move || mm.delete_volume(v))
        .await
        .expect("volume task")?;
    Ok(Started::Done(Finished {
        note: (!removed).then(|| format!("volume {v} was not on this host")),
        ..Finished::ok(None)
    }))
}

pub(super) async fn delete_snapshot(m: &Arc<Manager>, id: SnapshotId) -> Result<(), ManagerError> {
    let mm = m.clone();
    tokio::task::spawn_blocking(move || mm.delete_snapshot(id))
        .await
        .expect("delete task")?;
    Ok(())
}

/// Waits for a local operation, reporting progress every ~2 s.
async fn follow(link: &Link, op: OperationId, id: InstanceId, local: OperationId) -> Finished {
    let m = &link.manager;
    let mut last_sent = Instant::now();
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        let info = match m.operation(local) {
            Ok(i) => i,
            Err(e) => return Finished::failed(e.to_string(), state_of(m, Some(id))),
        };
        match info.state {
            OperationState::Running => {
                if last_sent.elapsed() >= PROGRESS_EVERY {
                    last_sent = Instant::now();
                    send_report(link, op, running(info.progress, state_of(m, Some(id)))).await;
                }
            }
            OperationState::Succeeded => {
                return Finished {
                    ok: true,
                    error: None,
                    snapshot: info.snapshot.map(|s| SnapshotSizes {
                        logical_bytes: s.logical_size,
                        compressed_bytes: s.stored_bytes,
                        frozen: s.frozen,
                    }),
                    instance_state: state_of(m, Some(id)),
                    note: None,
                }
            }
            OperationState::Failed => {
                let why = info.error.unwrap_or_else(|| "failed".into());
                return Finished::failed(why, state_of(m, Some(id)));
            }
        }
    }
}

/// Fetches the chunk keys an image made from a snapshot needs, unless the
/// image is in the host's cache already.
async fn image_keys(link: &Link, src: &ImageSource) -> Result<(), ManagerError> {
    let ImageOrigin::Snapshot { snapshot, .. } = &src.origin else {
        return Ok(());
    };
    if images::open(link.manager.layout(), src.image, false).is_ok() {
        return Ok(());
    }
    super::keys::ensure_for_snapshot(link, *snapshot)
        .await
        .map_err(|e| SnapshotError::Keys(e.to_string()).into())
}

/// Makes sure the image is in the host's cache, filling it from its origin.
async fn ensure_image(link: &Link, src: &ImageSource) -> Result<(), ManagerError> {
    let _one_at_a_time = link.image_fill.lock().await;
    let m = link.manager.clone();
    let src = src.clone();
    tokio::task::spawn_blocking(move || fill_image(&m, &src))
        .await
        .expect("image task")
}

/// Fills the image cache with `src` unless it is there; an image restored
/// from a snapshot first gets the image it boots like (a snapshot taken on
/// another host: this host may never have had it).
fn fill_image(m: &Manager, src: &ImageSource) -> Result<(), ManagerError> {
    if images::open(m.layout(), src.image, false).is_ok() {
        return Ok(());
    }
    tracing::info!(image = %src.image, "filling the image cache");
    let filled = match &src.origin {
        ImageOrigin::File {
            disk,
            kernel,
            initrd,
            cmdline,
        } => images::import(
            m.layout(),
            &ImportImage {
                id: Some(src.image),
                name: src.name.clone(),
                disk: disk.clone(),
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            },
        )
        .map_err(ManagerError::from),
        ImageOrigin::Snapshot {
            snapshot,
            boot_like,
            boot_like_source,
        } => {
            if let Some(base) = boot_like_source {
                if !matches!(base.origin, ImageOrigin::File { .. }) {
                    return Err(ManagerError::Conflict(format!(
                        "image {}: the image it boots like must come from a file",
                        src.image
                    )));
                }
                fill_image(m, base)?;
            }
            m.image_from_snapshot(&ImageFromSnapshot {
                id: Some(ImageSource::snapshot_image_id(*snapshot)),
                name: src.name.clone(),
                snapshot: *snapshot,
                boot_like: *boot_like,
            })
        }
    };
    match filled {
        Ok(_) | Err(ManagerError::Image(images::ImageError::Exists(_))) => Ok(()),
        Err(e) => Err(e),
    }
}
