//! The blocking bodies of instance operations: create (with rollback),
//! start, stop, reboot, reset, suspend, resume, change type, grow disk and
//! release. Called on operation threads by [`crate::manager::Manager`].

use crate::disks::{self, Format, GIB};
use crate::domain_xml::{Boot, DiskDef, DomainDef};
use crate::hypervisor::{GuestCall, Power};
use crate::images;
use crate::layout::{InstanceRecord, VolumeRecord};
use crate::libvirt::PowerState;
use crate::manager::{Manager, ManagerError};
use gantry_proto::api::local::{ActionRequest, DiskKind};
use gantry_proto::spec::{self, InstanceSpec};
use gantry_proto::validate::{self, PciAddress, ValidationError};
use gantry_proto::{InstanceId, InstanceState, OperationId};
use std::time::{Duration, Instant};

impl Manager {
    /// Checks made before a create is accepted: the image is cached, the
    /// root disk is large enough, the data volume is free, GPUs exist and
    /// are free, and the host has the memory.
    pub(crate) fn precheck_create(&self, spec: &InstanceSpec) -> Result<(), ManagerError> {
        let image = images::open(&self.layout, spec.image, false)?;
        if spec.root_disk_gib * GIB < image.record.virtual_size {
            return Err(ValidationError::new(
                "root_disk_gib",
                format!(
                    "must be at least the image's size ({} GiB)",
                    image.record.virtual_size.div_ceil(GIB)
                ),
            )
            .into());
        }
        if let Some(v) = &spec.data_volume {
            if let Some(rec) = self.layout.load_volume(v.id)? {
                if let Some(other) = rec.attached_to {
                    return Err(ManagerError::Conflict(format!(
                        "volume {} is attached to instance {other}",
                        v.id
                    )));
                }
            }
        }
        self.check_gpus(spec.id, &spec.gpus)?;
        let free = available_memory_mib();
        let need = spec.memory_mib + self.cfg.reserved_memory_mib;
        if need > free {
            return Err(ManagerError::NoMemory {
                need: spec.memory_mib,
                free: free.saturating_sub(self.cfg.reserved_memory_mib),
            });
        }
        Ok(())
    }

    /// The GPUs exist and are free for `id` (healthy, or already its own).
    fn check_gpus(&self, id: InstanceId, gpus: &[PciAddress]) -> Result<(), ManagerError> {
        if gpus.is_empty() {
            return Ok(());
        }
        let present = self.gpus.list();
        for (i, g) in gpus.iter().enumerate() {
            let Some(s) = present.iter().find(|p| p.pci == *g) else {
                return Err(ValidationError::new(
                    format!("gpus[{i}]"),
                    format!("no GPU at {g} on this host"),
                )
                .into());
            };
            match s.instance {
                Some(other) if other != id => {
                    return Err(ManagerError::Conflict(format!(
                        "GPU {g} is in use by instance {other}"
                    )))
                }
                Some(_) => {}
                None if !s.health.is_leasable() => {
                    return Err(ManagerError::Conflict(format!("GPU {g} is {}", s.health)))
                }
                None => {}
            }
        }
        Ok(())
    }

    pub(crate) fn precheck_action(
        &self,
        rec: &InstanceRecord,
        req: &ActionRequest,
    ) -> Result<(), ManagerError> {
        match req {
            ActionRequest::ChangeType {
                vcpus,
                memory_mib,
                gpus,
                root_disk_gib,
            } => {
                let (vcpus, memory_mib) = (*vcpus, *memory_mib);
                if let Some(d) = root_disk_gib {
                    validate::in_range("root_disk_gib", *d, 1, spec::MAX_DISK_GIB)?;
                }
                if let Some(gpus) = gpus {
                    let mut seen = std::collections::HashSet::new();
                    for (i, g) in gpus.iter().enumerate() {
                        if !seen.insert(g) {
                            return Err(ValidationError::new(
                                format!("gpus[{i}]"),
                                format!("{g} is listed twice"),
                            )
                            .into());
                        }
                    }
                    self.check_gpus(rec.spec.id, gpus)?;
                }
                validate::in_range("vcpus", vcpus.into(), 1, spec::MAX_VCPUS)?;
                validate::in_range(
                    "memory_mib",
                    memory_mib,
                    spec::MIN_MEMORY_MIB,
                    spec::MAX_MEMORY_MIB,
                )?;
            }
            &ActionRequest::GrowDisk { disk, size_gib } => {
                validate::in_range("size_gib", size_gib, 1, spec::MAX_DISK_GIB)?;
                let current = match disk {
                    DiskKind::Root => rec.spec.root_disk_gib * GIB,
                    DiskKind::Data => match rec.spec.data_volume {
                        Some(v) => self.layout.load_volume(v.id)?.map_or(0, |r| r.size_bytes),
                        None => {
                            return Err(ValidationError::new(
                                "disk",
                                "this instance has no data volume",
                            )
                            .into())
                        }
                    },
                };
                if size_gib * GIB < current {
                    return Err(ValidationError::new(
                        "size_gib",
                        format!(
                            "disks only grow: {size_gib} GiB is less than the current {} GiB",
                            current / GIB
                        ),
                    )
                    .into());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Builds the domain definition of an instance from its record.
    pub(crate) fn domain_def(&self, spec: &InstanceSpec) -> Result<DomainDef, ManagerError> {
        let image = images::open(&self.layout, spec.image, false)?;
        let boot = match &image.kernel {
            Some(k) => Boot::Kernel {
                kernel: k.clone(),
                initrd: image.initrd.clone(),
                cmdline: image.record.cmdline.clone().unwrap_or_default(),
            },
            None => Boot::Disk,
        };
        // The active layer of the root disk's chain (root.qcow2 until the
        // first snapshot).
        let active = self
            .record(spec.id)
            .map(|r| self.layout.active_disk(&r))
            .unwrap_or_else(|_| self.layout.root_disk(spec.id));
        let mut disks = vec![DiskDef {
            path: active,
            target: "vda",
            serial: "root",
        }];
        if let Some(v) = &spec.data_volume {
            disks.push(DiskDef {
                path: self.layout.volume_disk(v.id),
                target: "vdb",
                serial: "data",
            });
        }
        Ok(DomainDef {
            name: self.domain_name(spec.id),
            uuid: self.domain_uuid(spec.id),
            domain_type: self.domain_type,
            machine: self.cfg.machine.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            boot,
            disks,
            console_socket: self.layout.console_socket(spec.id),
            console_log: self.layout.console_log(spec.id),
            exec_socket: self.layout.exec_socket(spec.id),
            passthrough: self.gpus.passthrough(&spec.gpus)?,
            instance_id: spec.id.to_string(),
            interface: spec.nic.map(|n| self.net.interface(spec.id, &n)),
            group_interface: self.group_interface(spec.id),
            seed: (spec.nic.is_some() && spec.guest.is_some())
                .then(|| self.layout.seed_disk(spec.id)),
            guest_agent_socket: spec
                .guest
                .is_some()
                .then(|| self.layout.guest_agent_socket(spec.id)),
            metrics_socket: self.layout.metrics_socket(spec.id),
            share: self.bucket_share(spec)?,
        })
    }

    /// The instance's bucket share: every instance with a guest config has
    /// one when the host has virtiofsd (docs/buckets.md).
    fn bucket_share(
        &self,
        spec: &InstanceSpec,
    ) -> Result<Option<crate::domain_xml::ShareDef>, ManagerError> {
        if spec.guest.is_none() {
            return Ok(None);
        }
        let (Some(dir), Some(v)) = (self.buckets.share_dir(spec.id)?, self.buckets.virtiofsd())
        else {
            return Ok(None);
        };
        Ok(Some(crate::domain_xml::ShareDef {
            dir,
            tag: crate::buckets::SHARE_TAG,
            virtiofsd: v.to_path_buf(),
        }))
    }

    /// Writes the instance's seed disk from its record and its network
    /// group NIC: atomically, or in place while the guest runs (it reads
    /// the seed at boot, Gantry's test guest also when a NIC appears).
    pub(crate) fn write_seed(
        &self,
        spec: &InstanceSpec,
        in_place: bool,
    ) -> Result<(), ManagerError> {
        let group = self.groups.nic_of(spec.id);
        let (Some(nic), Some(guest)) = (&spec.nic, &spec.guest) else {
            self.seeded_with(spec.id, group);
            return Ok(());
        };
        let mut files =
            crate::net::seed::files(spec.id, nic, guest, &self.cfg.network.dns, group.as_ref());
        if self.buckets.virtiofsd().is_some() {
            files.extend(crate::buckets::guest::seed_files());
        }
        let image = crate::net::seed::build_image(&files)?;
        crate::net::seed::write(&self.layout.seed_disk(spec.id), &image, in_place)?;
        self.seeded_with(spec.id, group);
        Ok(())
    }

    /// Before a guest starts: the bridge its access NIC plugs into exists;
    /// its definition has the group NIC it should have, whose bridge exists.
    fn before_start(&self, spec: &InstanceSpec) -> Result<(), ManagerError> {
        if let Some(nic) = &spec.nic {
            self.net.ensure_bridge_for(nic)?;
        }
        self.group_before_start(spec.id)
    }

    /// After a guest started: its access tap is on the access bridge
    /// (moved into the data plane's namespace when it has its own), its
    /// group tap on its group's bridge (a failure there is retried by the
    /// periodic reconciliation).
    fn after_start(&self, spec: &InstanceSpec) -> Result<(), ManagerError> {
        if spec.nic.is_some() {
            self.net.adopt_taps(&[spec.id])?;
        }
        if let Err(e) = self.group_after_start(spec.id) {
            tracing::warn!(instance = %spec.id, error = %e, "cannot put the group tap on its bridge");
        }
        Ok(())
    }

    pub(crate) fn run_create(
        &self,
        id: InstanceId,
        op: OperationId,
        start: bool,
    ) -> Result<(), ManagerError> {
        match self.build_instance(id, op, start) {
            Ok(()) if start => self.set_state(id, InstanceState::Running).inspect(|_| {
                gantry_crashpoint::hit("agent.create.running");
            }),
            Ok(()) => self.set_state(id, InstanceState::Stopped),
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "create failed; rolling back");
                self.rollback_create(id);
                let _ = self.set_state(id, InstanceState::Failed);
                self.bury(id, Some(e.to_string()));
                Err(e)
            }
        }
    }

    fn build_instance(
        &self,
        id: InstanceId,
        op: OperationId,
        start: bool,
    ) -> Result<(), ManagerError> {
        let spec = self.record(id)?.spec;
        let verified = self.lock().verified_images.contains(&spec.image);
        let image = images::open(&self.layout, spec.image, !verified)?;
        self.lock().verified_images.insert(spec.image);
        self.progress(op, 20);
        disks::create_overlay(
            &image.disk,
            &self.layout.root_disk(id),
            spec.root_disk_gib * GIB,
        )?;
        gantry_crashpoint::hit("agent.create.overlay");
        self.progress(op, 40);
        if let Some(v) = spec.data_volume {
            let mut vol = match self.layout.load_volume(v.id)? {
                Some(rec) => rec,
                None => {
                    disks::create_blank(&self.layout.volume_disk(v.id), v.size_gib * GIB)?;
                    self.update_record(id, |r| r.created_volume = true)?;
                    VolumeRecord {
                        id: v.id,
                        size_bytes: v.size_gib * GIB,
                        attached_to: None,
                    }
                }
            };
            vol.attached_to = Some(id);
            self.layout.save_volume(&vol)?;
        }
        self.write_seed(&spec, false)?;
        self.progress(op, 60);
        let xml = self.domain_def(&spec)?.to_xml();
        self.virt.define(&self.domain_name(id), &xml)?;
        gantry_crashpoint::hit("agent.create.defined");
        self.progress(op, 80);
        if !start {
            return Ok(());
        }
        self.before_start(&spec)?;
        self.virt.power(&self.domain_name(id), Power::Start)?;
        self.usage.powered_on(id);
        gantry_crashpoint::hit("agent.create.started");
        self.after_start(&spec)?;
        if spec.nic.is_some() {
            self.apply_network();
        }
        Ok(())
    }

    /// Removes everything a create made: domain, instance directory, and the
    /// data volume if this create made it (else it is detached, kept).
    pub(crate) fn rollback_create(&self, id: InstanceId) {
        let name = self.domain_name(id);
        if let Err(e) = self
            .virt
            .power(&name, Power::Destroy)
            .and_then(|_| self.virt.undefine(&name))
        {
            tracing::error!(instance = %id, error = %e, "rollback: cannot remove domain");
        }
        let Ok(rec) = self.record(id) else { return };
        self.let_go_of_volume(id, &rec, rec.created_volume);
        if let Err(e) = std::fs::remove_dir_all(self.layout.instance_dir(id)) {
            tracing::error!(instance = %id, error = %e, "rollback: cannot remove instance directory");
        }
    }

    /// Deletes the instance's data volume, or detaches it (kept for a later
    /// instance).
    fn let_go_of_volume(&self, id: InstanceId, rec: &InstanceRecord, delete: bool) {
        let Some(v) = rec.spec.data_volume else {
            return;
        };
        if delete {
            let _ = std::fs::remove_file(self.layout.volume_disk(v.id));
            let _ = std::fs::remove_file(self.layout.volume_record(v.id));
            return;
        }
        if let Ok(Some(mut vol)) = self.layout.load_volume(v.id) {
            if vol.attached_to == Some(id) {
                vol.attached_to = None;
                if let Err(e) = self.layout.save_volume(&vol) {
                    tracing::error!(volume = %v.id, error = %e, "cannot detach volume");
                }
            }
        }
    }

    pub(crate) fn run_action(
        &self,
        id: InstanceId,
        req: ActionRequest,
        op: OperationId,
    ) -> Result<(), ManagerError> {
        let name = self.domain_name(id);
        // The state may have changed since the request was accepted.
        let state = self.record(id)?.state;
        state.check_action(req.action())?;
        match req {
            ActionRequest::Start => {
                let spec = self.record(id)?.spec;
                // The guest is off: a fresh seed, atomically (repairs one
                // an interrupted in-place rewrite left).
                self.write_seed(&spec, false)?;
                self.before_start(&spec)?;
                self.virt.power(&name, Power::Start)?;
                self.usage.powered_on(id);
                gantry_crashpoint::hit("agent.action.started");
                self.after_start(&spec)?;
                self.set_state(id, InstanceState::Running)
            }
            ActionRequest::Stop { timeout_secs } => {
                let timeout =
                    Duration::from_secs(timeout_secs.unwrap_or(self.cfg.stop_timeout_secs));
                self.stop_domain(&name, state == InstanceState::Running, timeout, op)?;
                gantry_crashpoint::hit("agent.action.stopped");
                self.set_state(id, InstanceState::Stopped)
            }
            ActionRequest::Reboot => Ok(self.virt.power(&name, Power::Reboot)?),
            ActionRequest::ForceReboot => Ok(self.virt.power(&name, Power::Reset)?),
            ActionRequest::Suspend => {
                self.virt.power(&name, Power::Suspend)?;
                self.set_state(id, InstanceState::Suspended)
            }
            ActionRequest::Resume => {
                self.virt.power(&name, Power::Resume)?;
                self.usage.powered_on(id);
                self.set_state(id, InstanceState::Running)
            }
            ActionRequest::ChangeType {
                vcpus,
                memory_mib,
                gpus,
                root_disk_gib,
            } => {
                // The disk first: it only grows, so a later failure leaves
                // a larger disk and nothing else changed.
                let current = self.record(id)?.spec.root_disk_gib;
                if let Some(d) = root_disk_gib.filter(|d| *d > current) {
                    self.grow_disk(id, state, DiskKind::Root, d)?;
                }
                self.change_type(id, vcpus, memory_mib, gpus)
            }
            ActionRequest::GrowDisk { disk, size_gib } => self.grow_disk(id, state, disk, size_gib),
            ActionRequest::Release { delete_data_volume } => self.release(id, delete_data_volume),
        }
    }

    /// New vCPUs, memory and (when given) GPUs, while stopped: new GPUs
    /// are leased first, the domain is redefined, then GPUs no longer
    /// wanted go back through the gate.
    fn change_type(
        &self,
        id: InstanceId,
        vcpus: u32,
        memory_mib: u64,
        gpus: Option<Vec<PciAddress>>,
    ) -> Result<(), ManagerError> {
        let before = self.record(id)?.spec;
        if let Some(g) = &gpus {
            self.gpus.lease(id, g)?;
        }
        let rec = self.update_record(id, |r| {
            r.spec.vcpus = vcpus;
            r.spec.memory_mib = memory_mib;
            if let Some(g) = &gpus {
                r.spec.gpus = g.clone();
            }
        })?;
        let defined = self
            .domain_def(&rec.spec)
            .and_then(|d| Ok(self.virt.define(&self.domain_name(id), &d.to_xml())?));
        if let Err(e) = defined {
            // Back to what it was: record, domain and leases.
            let old = before.clone();
            self.update_record(id, |r| r.spec = old)?;
            if let Ok(d) = self.domain_def(&before) {
                let _ = self.virt.define(&self.domain_name(id), &d.to_xml());
            }
            self.gpus.release(id, &before.gpus);
            return Err(e);
        }
        self.gpus.release(id, &rec.spec.gpus);
        Ok(())
    }

    /// ACPI shutdown, waiting up to `timeout`, then destroy.
    pub(crate) fn stop_domain(
        &self,
        name: &str,
        graceful: bool,
        timeout: Duration,
        op: OperationId,
    ) -> Result<(), ManagerError> {
        if graceful {
            self.virt.power(name, Power::Shutdown)?;
            let start = Instant::now();
            while start.elapsed() < timeout {
                if matches!(
                    self.virt.state(name)?,
                    PowerState::Off | PowerState::Missing
                ) {
                    return Ok(());
                }
                let pct = (start.elapsed().as_millis() * 90 / timeout.as_millis().max(1)) as u8;
                self.progress(op, pct);
                std::thread::sleep(Duration::from_millis(200));
            }
            tracing::warn!(domain = name, "guest ignored ACPI shutdown; destroying");
        }
        Ok(self.virt.power(name, Power::Destroy)?)
    }

    fn grow_disk(
        &self,
        id: InstanceId,
        state: InstanceState,
        disk: DiskKind,
        size_gib: u64,
    ) -> Result<(), ManagerError> {
        let rec = self.record(id)?;
        let live = state == InstanceState::Running;
        let bytes = size_gib * GIB;
        let (path, target) = match disk {
            DiskKind::Root => (self.layout.active_disk(&rec), "vda"),
            DiskKind::Data => {
                let v = rec
                    .spec
                    .data_volume
                    .ok_or_else(|| ValidationError::new("disk", "no data volume"))?;
                (self.layout.volume_disk(v.id), "vdb")
            }
        };
        let current = disks::info(&path, Some(Format::Qcow2))?.virtual_size;
        if bytes < current {
            return Err(disks::DiskError::Shrink {
                what: format!("{disk:?} disk"),
                from: current,
                to: bytes,
            }
            .into());
        }
        if live {
            self.virt
                .block_resize(&self.domain_name(id), target, bytes)?;
        } else {
            disks::grow(&path, bytes)?;
        }
        match disk {
            DiskKind::Root => {
                self.update_record(id, |r| r.spec.root_disk_gib = size_gib)?;
            }
            DiskKind::Data => {
                let v = rec.spec.data_volume.expect("checked above");
                if let Some(mut vol) = self.layout.load_volume(v.id)? {
                    vol.size_bytes = bytes;
                    self.layout.save_volume(&vol)?;
                }
                self.update_record(id, |r| {
                    if let Some(dv) = r.spec.data_volume.as_mut() {
                        dv.size_gib = size_gib;
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Destroys and undefines the domain, deletes the instance directory, and
    /// keeps the data volume (detached) unless asked to delete it. Resumable:
    /// a restart during Releasing finishes the job.
    pub(crate) fn release(
        &self,
        id: InstanceId,
        delete_data_volume: bool,
    ) -> Result<(), ManagerError> {
        if self.record(id)?.state != InstanceState::Releasing {
            self.set_state(id, InstanceState::Releasing)?;
        }
        gantry_crashpoint::hit("agent.release.releasing");
        let name = self.domain_name(id);
        self.virt.power(&name, Power::Destroy)?;
        gantry_crashpoint::hit("agent.release.destroyed");
        self.virt.undefine(&name)?;
        gantry_crashpoint::hit("agent.release.undefined");
        let rec = self.record(id)?;
        self.let_go_of_volume(id, &rec, delete_data_volume);
        let dir = self.layout.instance_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(crate::fsutil::io_err("remove", &dir))?;
        }
        gantry_crashpoint::hit("agent.release.dir_removed");
        self.set_state(id, InstanceState::Released)?;
        gantry_crashpoint::hit("agent.release.released");
        self.bury(id, None);
        if rec.spec.nic.is_some() {
            self.apply_network();
        }
        Ok(())
    }
}

impl Manager {
    /// Sets root's password to `hash`: recorded, written into the seed
    /// disk (so every later boot applies it), and, while the guest runs,
    /// applied at once through qemu-guest-agent when the guest has one.
    /// Returns a sentence saying which.
    pub fn set_password(
        &self,
        id: InstanceId,
        hash: gantry_proto::net::Secret,
    ) -> Result<String, ManagerError> {
        gantry_proto::net::password_hash("password_hash", hash.expose())?;
        let rec = self.record(id)?;
        if rec.spec.guest.is_none() {
            return Err(ManagerError::Conflict(format!(
                "instance {id} has no seed disk (it was created without access); its password cannot be set"
            )));
        }
        let rec = self.update_record(id, |r| {
            if let Some(g) = r.spec.guest.as_mut() {
                g.root_password_hash = hash.clone();
            }
        })?;
        let power = self.virt.state(&self.domain_name(id))?;
        let open = matches!(power, PowerState::Running | PowerState::Paused);
        self.write_seed(&rec.spec, open)?;
        if power != PowerState::Running {
            return Ok("applies at the next start (the instance is not running)".into());
        }
        match self.virt.guest_agent(
            &self.domain_name(id),
            GuestCall::SetPassword {
                user: "root".into(),
                hash: hash.expose().to_string(),
            },
        ) {
            Ok(()) => Ok("applied now through the guest agent".into()),
            Err(e) => {
                tracing::info!(instance = %id, error = %e, "no guest agent; the password applies at the next boot");
                Ok("applies at the next boot (the guest runs no qemu-guest-agent)".into())
            }
        }
    }
}

/// Memory the host can still give, in MiB (MemAvailable).
fn available_memory_mib() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.available_memory() / (1024 * 1024)
}
