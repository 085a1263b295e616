//! The instance manager: the one owner of this host's instance records.
//!
//! Every state change goes through [`Manager::set_state`], which applies
//! `InstanceState::transition` and persists the record before anything else
//! sees it; it also starts and stops the instance's Running-time counter
//! ([`crate::usage`]) and wakes the controller link's heartbeat.
//! Operations run one at a time per instance on their own thread;
//! each has an id and reports state and progress through [`OperationInfo`].
//! The blocking bodies of the operations live in [`crate::lifecycle`];
//! recovery after a restart and the observed-state watcher in
//! [`crate::recover`].

use crate::config::AgentConfig;
use crate::fsutil::FsError;
use crate::gpu::GpuPool;
use crate::hypervisor::Hypervisor;
use crate::layout::{InstanceRecord, Layout};
use crate::libvirt::LibvirtError;
use crate::{disks, images};
use gantry_proto::api::local::{
    ActionRequest, InstanceInfo, OperationInfo, OperationState, VolumeInfo,
};
use gantry_proto::spec::InstanceSpec;
use gantry_proto::{
    ImageId, InstanceId, InstanceState, OperationId, TransitionError, ValidationError,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("instance {0} not found")]
    NotFound(InstanceId),
    #[error("operation {0} not found")]
    NoOperation(OperationId),
    #[error("instance {0} already exists")]
    Exists(InstanceId),
    #[error("instance {id} is busy with operation {op}")]
    Busy { id: InstanceId, op: OperationId },
    #[error(transparent)]
    State(#[from] TransitionError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("not enough host memory: {need} MiB asked, {free} MiB free")]
    NoMemory { need: u64, free: u64 },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Image(#[from] images::ImageError),
    #[error(transparent)]
    Disk(#[from] disks::DiskError),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshots::SnapshotError),
    #[error(transparent)]
    Usage(#[from] crate::usage::UsageError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Buckets(#[from] crate::buckets::BucketError),
}

/// What the manager holds in memory; the records are also on disk.
#[derive(Default)]
pub(crate) struct Inner {
    pub instances: BTreeMap<InstanceId, InstanceRecord>,
    /// Released and failed instances: nothing of them is left on disk.
    pub gone: BTreeMap<InstanceId, (InstanceRecord, Option<String>)>,
    pub busy: HashMap<InstanceId, OperationId>,
    pub ops: BTreeMap<OperationId, OperationInfo>,
    pub verified_images: HashSet<ImageId>,
}

pub struct Manager {
    pub(crate) cfg: AgentConfig,
    pub(crate) layout: Layout,
    pub(crate) virt: Arc<dyn Hypervisor>,
    pub(crate) domain_type: &'static str,
    pub(crate) gpus: Arc<GpuPool>,
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) inner: Mutex<Inner>,
    /// Running-time counters, moved by [`Manager::set_state_locked`].
    pub(crate) usage: crate::usage::UsageBook,
    /// Woken whenever an instance changes state or an operation ends (the
    /// controller link heartbeats promptly then).
    pub(crate) changed: tokio::sync::Notify,
    /// Background recompression of the host's snapshot store.
    pub(crate) compaction: crate::snapshots::Compaction,
    /// Instance access: bridge, taps, forwards, the HTTPS front.
    pub(crate) net: Arc<crate::net::Network>,
    /// Network groups' data plane (bridges, VXLAN, group taps, rules).
    pub(crate) groups: Arc<crate::net::groups::Groups>,
    /// Guests' group NICs: hot-plugs tried, seeds written, problems
    /// ([`crate::group_nic`]).
    pub(crate) group_nics: crate::group_nic::GroupNics,
    /// Buckets attached as directories ([`crate::buckets`]).
    pub(crate) buckets: Arc<crate::buckets::Buckets>,
}

/// The libvirt domain name of an instance with the default prefix.
pub fn domain_name(id: InstanceId) -> String {
    format!("{}{id}", crate::libvirt::DOMAIN_PREFIX)
}

impl Manager {
    /// This agent's libvirt domain name of an instance (`domain_prefix`).
    pub fn domain_name(&self, id: InstanceId) -> String {
        format!("{}{id}", self.cfg.domain_prefix)
    }

    /// The domain's UUID: the instance's own, or (with a non-default
    /// `domain_prefix`) one derived from the domain name, since libvirt
    /// refuses two domains with one UUID and agents sharing a libvirtd may
    /// both hold an instance for a moment (a move).
    pub fn domain_uuid(&self, id: InstanceId) -> uuid::Uuid {
        if self.cfg.domain_prefix == crate::libvirt::DOMAIN_PREFIX {
            return id.uuid();
        }
        let h = blake3::hash(self.domain_name(id).as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&h.as_bytes()[..16]);
        uuid::Builder::from_random_bytes(b).into_uuid()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn libvirt(&self) -> &dyn Hypervisor {
        self.virt.as_ref()
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    pub fn gpus(&self) -> &Arc<GpuPool> {
        &self.gpus
    }

    pub fn usage(&self) -> &crate::usage::UsageBook {
        &self.usage
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    pub fn net(&self) -> &Arc<crate::net::Network> {
        &self.net
    }

    pub fn buckets(&self) -> &Arc<crate::buckets::Buckets> {
        &self.buckets
    }

    /// Mounts and unmounts buckets for the instances this host holds (not
    /// final), looks at their health, rewrites the guests' manifests; on a
    /// thread of its own ([`crate::buckets::Buckets::apply_in_background`]).
    pub fn reconcile_buckets(&self) {
        self.buckets.apply_in_background(self.live_instances());
    }

    /// The instances this host holds that are not final.
    pub fn live_instances(&self) -> Vec<InstanceId> {
        self.lock()
            .instances
            .values()
            .filter(|r| !r.state.is_final())
            .map(|r| r.spec.id)
            .collect()
    }

    /// The access NICs of the instances this host holds (not final).
    pub fn nics(&self) -> Vec<(InstanceId, gantry_proto::net::NicSpec)> {
        self.lock()
            .instances
            .values()
            .filter(|r| !r.state.is_final())
            .filter_map(|r| r.spec.nic.map(|n| (r.spec.id, n)))
            .collect()
    }

    /// Applies the access rules for the instances held now (after one
    /// appears or goes); a failure is logged and shows in the heartbeat.
    pub(crate) fn apply_network(&self) {
        if let Err(e) = self.net.apply(&self.nics()) {
            tracing::warn!(error = %e, "cannot apply the access rules");
        }
    }

    /// Resolves once an instance changed state or an operation ended since
    /// the last call (one waiter).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Live instances (id, state) and those gone since the agent started.
    pub fn states(&self) -> (Vec<(InstanceId, InstanceState)>, Vec<InstanceRecord>) {
        let inner = self.lock();
        let live = inner
            .instances
            .values()
            .map(|r| (r.spec.id, r.state))
            .collect();
        let gone = inner.gone.values().map(|(r, _)| r.clone()).collect();
        (live, gone)
    }

    /// Whether this host holds nothing of `id`: no record (live or gone
    /// since the start), no libvirt domain and no directory. An instance
    /// released just before a restart is such (the record of its release
    /// lived in memory); so is one that never came here. Either way a
    /// release of it is done.
    pub fn holds_nothing_of(&self, id: InstanceId) -> bool {
        self.record(id).is_err()
            && matches!(
                self.virt.state(&self.domain_name(id)),
                Ok(crate::libvirt::PowerState::Missing)
            )
            && !self.layout.instance_dir(id).exists()
    }

    /// Whether an operation is running on the instance.
    pub fn is_busy(&self, id: InstanceId) -> bool {
        self.lock().busy.contains_key(&id)
    }

    /// The one place instance states change: checks the edge, persists the
    /// record, then updates memory.
    pub(crate) fn set_state(&self, id: InstanceId, to: InstanceState) -> Result<(), ManagerError> {
        self.set_state_locked(&mut self.lock(), id, to)
    }

    /// [`Manager::set_state`] for a caller that already holds the lock.
    pub(crate) fn set_state_locked(
        &self,
        inner: &mut Inner,
        id: InstanceId,
        to: InstanceState,
    ) -> Result<(), ManagerError> {
        let rec = inner
            .instances
            .get_mut(&id)
            .ok_or(ManagerError::NotFound(id))?;
        let mut next = rec.clone();
        next.state = rec.state.transition(to)?;
        if !to.is_final() {
            self.layout.save_instance(&next)?;
        }
        tracing::info!(instance = %id, from = %rec.state, to = %to, "state");
        let from = rec.state;
        *rec = next;
        self.usage.on_state(id, from, to);
        self.changed.notify_one();
        Ok(())
    }

    /// Replaces a record's spec or flags (not its state) and persists it.
    pub(crate) fn update_record(
        &self,
        id: InstanceId,
        f: impl FnOnce(&mut InstanceRecord),
    ) -> Result<InstanceRecord, ManagerError> {
        let mut inner = self.lock();
        let rec = inner
            .instances
            .get_mut(&id)
            .ok_or(ManagerError::NotFound(id))?;
        let mut next = rec.clone();
        f(&mut next);
        assert_eq!(next.state, rec.state, "update_record must not change state");
        self.layout.save_instance(&next)?;
        *rec = next.clone();
        Ok(next)
    }

    /// Moves a final instance out of the live table into `gone`.
    pub(crate) fn bury(&self, id: InstanceId, error: Option<String>) {
        // Its GPUs go back through the health gate.
        self.gpus.release(id, &[]);
        let mut inner = self.lock();
        if let Some(mut rec) = inner.instances.remove(&id) {
            rec.last_error = error.clone();
            inner.gone.insert(id, (rec, error));
        }
    }

    pub fn record(&self, id: InstanceId) -> Result<InstanceRecord, ManagerError> {
        let inner = self.lock();
        inner
            .instances
            .get(&id)
            .or_else(|| inner.gone.get(&id).map(|(r, _)| r))
            .cloned()
            .ok_or(ManagerError::NotFound(id))
    }

    pub fn instance_info(&self, id: InstanceId) -> Result<InstanceInfo, ManagerError> {
        let rec = self.record(id)?;
        Ok(self.to_info(rec))
    }

    pub fn list(&self) -> Vec<InstanceInfo> {
        let recs: Vec<InstanceRecord> = self.lock().instances.values().cloned().collect();
        recs.into_iter().map(|r| self.to_info(r)).collect()
    }

    /// Every instance with its libvirt domain name, whether its guest runs
    /// (Running or Snapshotting) and its metrics channel, for the monitor;
    /// read-only.
    pub fn monitored(&self) -> Vec<crate::monitor::InstanceRef> {
        self.lock()
            .instances
            .values()
            .map(|r| {
                let id = r.spec.id;
                crate::monitor::InstanceRef {
                    id,
                    domain: self.domain_name(id),
                    running: matches!(
                        r.state,
                        InstanceState::Running | InstanceState::Snapshotting
                    ),
                    metrics_socket: self.layout.metrics_socket(id),
                }
            })
            .collect()
    }

    fn to_info(&self, rec: InstanceRecord) -> InstanceInfo {
        let id = rec.spec.id;
        let data_volume = rec.spec.data_volume.and_then(|v| {
            let vr = self.layout.load_volume(v.id).ok().flatten()?;
            Some(VolumeInfo {
                id: v.id,
                size_bytes: vr.size_bytes,
                path: self.layout.volume_disk(v.id).display().to_string(),
                attached_to: vr.attached_to,
            })
        });
        InstanceInfo {
            domain: domain_name(id),
            console_socket: self.layout.console_socket(id).display().to_string(),
            console_log: self.layout.console_log(id).display().to_string(),
            root_disk_bytes: rec.spec.root_disk_gib * disks::GIB,
            state: rec.state,
            last_error: rec.last_error,
            data_volume,
            spec: rec.spec,
        }
    }

    /// Prometheus text for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let mut counts: Vec<(&'static str, i64)> = Vec::new();
        for r in self.lock().instances.values() {
            match counts.iter_mut().find(|(s, _)| *s == r.state.name()) {
                Some((_, n)) => *n += 1,
                None => counts.push((r.state.name(), 1)),
            }
        }
        let mut text = self.metrics.render(&counts, &self.net.stats());
        let mut gpu = String::new();
        self.gpus.render_metrics(&mut gpu);
        match text.rfind("# EOF") {
            Some(at) => text.insert_str(at, &gpu),
            None => text.push_str(&gpu),
        }
        text
    }

    pub fn operation(&self, id: OperationId) -> Result<OperationInfo, ManagerError> {
        self.lock()
            .ops
            .get(&id)
            .cloned()
            .ok_or(ManagerError::NoOperation(id))
    }

    /// Registers an operation on `id` and runs `body` on its own thread.
    /// Refuses when another operation is running on the instance.
    pub(crate) fn submit(
        self: &Arc<Self>,
        id: InstanceId,
        kind: &str,
        body: impl FnOnce(&Manager, OperationId) -> Result<(), ManagerError> + Send + 'static,
    ) -> Result<OperationInfo, ManagerError> {
        let op = OperationInfo {
            id: OperationId::new(),
            instance: id,
            kind: kind.to_string(),
            state: OperationState::Running,
            progress: 0,
            error: None,
            snapshot: None,
        };
        {
            let mut inner = self.lock();
            if let Some(busy) = inner.busy.get(&id) {
                return Err(ManagerError::Busy { id, op: *busy });
            }
            inner.busy.insert(id, op.id);
            inner.ops.insert(op.id, op.clone());
        }
        let me = Arc::clone(self);
        let op_id = op.id;
        let kind = kind.to_string();
        std::thread::Builder::new()
            .name(format!("op-{kind}"))
            .spawn(move || {
                let started = std::time::Instant::now();
                let result = body(&me, op_id);
                me.metrics.operation_done(&kind, result.is_ok(), started.elapsed());
                let mut inner = me.lock();
                inner.busy.remove(&id);
                if let Some(o) = inner.ops.get_mut(&op_id) {
                    match result {
                        Ok(()) => {
                            o.state = OperationState::Succeeded;
                            o.progress = 100;
                        }
                        Err(e) => {
                            tracing::warn!(instance = %id, op = %op_id, kind, error = %e, "operation failed");
                            o.state = OperationState::Failed;
                            o.error = Some(e.to_string());
                        }
                    }
                }
                drop(inner);
                me.changed.notify_one();
            })
            .expect("spawn operation thread");
        Ok(op)
    }

    pub(crate) fn progress(&self, op: OperationId, pct: u8) {
        if let Some(o) = self.lock().ops.get_mut(&op) {
            o.progress = pct.min(99);
        }
    }

    /// Starts creating an instance; checks what can be checked at once.
    pub fn create(self: &Arc<Self>, spec: InstanceSpec) -> Result<OperationInfo, ManagerError> {
        self.create_with(spec, true)
    }

    /// Creates an instance that stays Stopped (a moved one: see `moves`).
    pub fn create_stopped(
        self: &Arc<Self>,
        spec: InstanceSpec,
    ) -> Result<OperationInfo, ManagerError> {
        self.create_with(spec, false)
    }

    fn create_with(
        self: &Arc<Self>,
        spec: InstanceSpec,
        start: bool,
    ) -> Result<OperationInfo, ManagerError> {
        spec.validate()?;
        {
            let inner = self.lock();
            if inner.instances.contains_key(&spec.id) || inner.gone.contains_key(&spec.id) {
                return Err(ManagerError::Exists(spec.id));
            }
        }
        self.precheck_create(&spec)?;
        let id = spec.id;
        // Leased before the record exists, atomically: a concurrent create
        // asking for the same GPU is refused here.
        self.gpus.lease(id, &spec.gpus)?;
        let rec = InstanceRecord {
            spec,
            state: InstanceState::Creating,
            created_volume: false,
            last_error: None,
            chain: Default::default(),
        };
        let saved = crate::fsutil::create_dir(&self.layout.instance_dir(id), 0o711)
            .and_then(|_| self.layout.save_instance(&rec));
        if let Err(e) = saved {
            self.gpus.release(id, &[]);
            return Err(e.into());
        }
        self.lock().instances.insert(id, rec);
        self.submit(id, "create", move |m, op| m.run_create(id, op, start))
    }

    /// Starts an action on an instance, after checking it is allowed now.
    pub fn action(
        self: &Arc<Self>,
        id: InstanceId,
        req: ActionRequest,
    ) -> Result<OperationInfo, ManagerError> {
        let rec = self.record(id)?;
        rec.state.check_action(req.action())?;
        self.precheck_action(&rec, &req)?;
        let kind = req.action().name();
        self.submit(id, kind, move |m, op| m.run_action(id, req, op))
    }
}
