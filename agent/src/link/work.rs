//! The work loop: long-polls the controller, carries out each operation
//! once (journalled by id), reports Running at once, progress every ~2 s
//! and the outcome; re-reports the outcome of an operation delivered again.
//! Operations found unfinished after an agent restart are settled first
//! ([`settle_interrupted`]). Instances the controller wants Released that
//! this host still has, with nothing in flight, are released.

use super::client::{self, backoff};
use super::commands::{delete_snapshot, run_command};
use super::journal::{Entry, Finished};
use super::{now_ms, Link};
use crate::manager::Manager;
use backon::BackoffBuilder;
use gantry_proto::api::agent::{AgentCommand, AgentOp, DesiredInstance, OpOutcome, OpReport, Work};
use gantry_proto::api::local::ActionRequest;
use gantry_proto::{InstanceId, InstanceState, OperationId};
use std::sync::Arc;
use std::time::Duration;

/// How often progress is sent while a local operation runs.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often the local operation is looked at.
pub(super) const LOOK_EVERY: Duration = Duration::from_millis(250);

/// The work loop (runs forever).
pub async fn run(link: Arc<Link>) {
    settle_interrupted(&link).await;
    if let Err(e) = link
        .journal
        .prune(now_ms().saturating_sub(super::journal::KEEP_REPORTED_MS))
    {
        tracing::warn!(error = %e, "cannot prune the operation journal");
    }
    let mut delays = backoff().build();
    loop {
        let wait = link.cfg.poll_wait_secs;
        let (rev, tls, groups_rev) = (
            link.manager.net().access_rev(),
            link.manager.net().tls_fingerprint(),
            link.manager.groups().rev(),
        );
        match link
            .client
            .work(
                link.credential(),
                wait,
                rev,
                tls,
                (groups_rev, link.manager.buckets().rev()),
            )
            .await
        {
            Ok(work) => {
                link.link_up(true);
                if !work.ops.is_empty() {
                    gantry_crashpoint::hit("agent.work.received");
                }
                delays = backoff().build();
                take_access(&link, &work).await;
                // Before the ops: a create or start among them needs its
                // group NIC known.
                take_groups(&link, &work).await;
                take_buckets(&link, &work);
                let started = handle(&link, &work);
                if started == 0 && !work.ops.is_empty() {
                    // Everything listed is already in hand: don't spin while
                    // the controller still shows it pending.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(e) => {
                link.link_up(false);
                let d = delays.next().unwrap_or(client::MAX_BACKOFF);
                if !super::revoked(&link, &e.to_string()) {
                    tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "work poll failed");
                }
                tokio::time::sleep(d).await;
            }
        }
    }
}

/// Applies the access state and certificate the work answer carries.
async fn take_access(link: &Arc<Link>, work: &Work) {
    if work.access.is_none() && work.tls.is_none() {
        return;
    }
    let m = link.manager.clone();
    let (access, tls) = (work.access.clone(), work.tls.clone());
    let done = tokio::task::spawn_blocking(move || {
        if let Some(t) = tls {
            if let Err(e) = m.net().set_tls(t) {
                tracing::warn!(error = %e, "cannot install the HTTPS certificate");
            }
        }
        if let Some(a) = access {
            let rev = a.rev;
            if let Err(e) = m.net().set_access(a, &m.nics()) {
                tracing::warn!(rev, error = %e, "cannot apply the access state");
            }
        }
    })
    .await;
    if let Err(e) = done {
        tracing::error!(error = %e, "the access task failed");
    }
}

/// Applies the network-group state the work answer carries, then brings
/// guests' group NICs in line (hot-plug on join, unplug on leave).
async fn take_groups(link: &Arc<Link>, work: &Work) {
    let Some(groups) = work.groups.clone() else {
        return;
    };
    let m = link.manager.clone();
    let done = tokio::task::spawn_blocking(move || {
        let rev = groups.rev;
        match m.groups().set(groups, &m.running_guests()) {
            // Guests' NICs hot-plugged, their taps onto their bridges (one
            // pass at a time with the periodic one).
            Ok(()) => m.reconcile_groups(),
            Err(e) => tracing::warn!(rev, error = %e, "cannot apply the network-group state"),
        }
    })
    .await;
    if let Err(e) = done {
        tracing::error!(error = %e, "the network-group task failed");
    }
}

/// Applies the bucket state the work answer carries, on a thread of its
/// own (a mount against a slow endpoint takes seconds; operations go on).
fn take_buckets(link: &Arc<Link>, work: &Work) {
    let Some(buckets) = work.buckets.clone() else {
        return;
    };
    let m = link.manager.clone();
    tokio::task::spawn_blocking(move || {
        let rev = buckets.rev;
        if let Err(e) = m.buckets().set(buckets, &m.live_instances()) {
            tracing::warn!(rev, error = %e, "cannot apply the bucket state");
        }
    });
}

/// Starts what is new in `work`; returns how many tasks it started.
pub fn handle(link: &Arc<Link>, work: &Work) -> usize {
    let mut started = 0;
    for op in &work.ops {
        if !claim(link, op.id) {
            continue;
        }
        started += 1;
        let l = link.clone();
        let op = op.clone();
        tokio::spawn(async move {
            carry_out(&l, op.clone()).await;
            release_claim(&l, op.id);
        });
    }
    let mut absent = std::collections::BTreeSet::new();
    for d in &work.instances {
        // Released here before a restart that forgot it: the controller
        // hears it is Released, or its view never ends.
        if d.desired == InstanceState::Released
            && d.observed != InstanceState::Released
            && !work.ops.iter().any(|o| op_instance(o) == Some(d.id))
            && link.manager.holds_nothing_of(d.id)
        {
            absent.insert(d.id);
            continue;
        }
        if drifted_to_release(link, d, work) {
            tracing::info!(instance = %d.id, "the controller wants this instance released; releasing");
            let req = ActionRequest::Release {
                delete_data_volume: false,
            };
            if let Err(e) = link.manager.action(d.id, req) {
                tracing::warn!(instance = %d.id, error = %e, "cannot release");
            }
        }
    }
    let mut was = link
        .absent_released
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for id in absent.difference(&was) {
        tracing::info!(instance = %id, "the controller wants released an instance this host holds nothing of; reporting it Released");
    }
    *was = absent;
    started
}

fn claim(link: &Link, id: OperationId) -> bool {
    link.in_flight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id)
}

fn release_claim(link: &Link, id: OperationId) {
    link.in_flight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
}

/// Desired Released, still here, not busy, and no operation for it listed
/// or in flight.
fn drifted_to_release(link: &Link, d: &DesiredInstance, work: &Work) -> bool {
    if d.desired != InstanceState::Released {
        return false;
    }
    let Ok(rec) = link.manager.record(d.id) else {
        return false;
    };
    let listed = work.ops.iter().any(|o| op_instance(o) == Some(d.id));
    !rec.state.is_final()
        && rec.state != InstanceState::Releasing
        && !rec.state.is_snapshotting()
        && !listed
        && !link.manager.is_busy(d.id)
}

fn op_instance(op: &AgentOp) -> Option<InstanceId> {
    match &op.command {
        AgentCommand::Create { spec, .. } => Some(spec.id),
        _ => op.instance,
    }
}

/// The name of a command, for logs and metrics.
pub fn kind(c: &AgentCommand) -> &'static str {
    c.kind().name()
}

/// Runs (or re-reports) one operation, journalled by id.
async fn carry_out(link: &Arc<Link>, op: AgentOp) {
    let (entry, new) = match link.journal.accept(&op, now_ms()) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(op = %op.id, error = %e, "cannot journal the operation; not running it");
            return;
        }
    };
    if !new {
        match entry.outcome {
            Some(outcome) => report_outcome(link, &entry.op, outcome).await,
            // Journalled but never finished by this process: settled at
            // start-up normally; settle it now.
            None => settle_one(link, entry).await,
        }
        return;
    }
    gantry_crashpoint::hit("agent.op.journaled");
    execute(link, op).await;
}

/// Executes a journalled operation and reports its outcome.
async fn execute(link: &Arc<Link>, op: AgentOp) {
    tracing::info!(op = %op.id, kind = kind(&op.command), "operation started");
    send_report(
        link,
        op.id,
        running(0, state_of(&link.manager, op_instance(&op))),
    )
    .await;
    gantry_crashpoint::hit("agent.op.started");
    let outcome = match run_command(link, &op).await {
        Ok(o) => o,
        Err(e) => Finished::failed(e.to_string(), state_of(&link.manager, op_instance(&op))),
    };
    link.manager
        .metrics()
        .controller_op_done(kind(&op.command), outcome.ok);
    gantry_crashpoint::hit("agent.op.ran");
    report_outcome(link, &op, outcome).await;
}

async fn report_outcome(link: &Arc<Link>, op: &AgentOp, outcome: Finished) {
    if let Err(e) = link.journal.finish(op.id, outcome.clone()) {
        tracing::error!(op = %op.id, error = %e, "cannot journal the outcome");
    }
    gantry_crashpoint::hit("agent.op.outcome_journaled");
    tracing::info!(op = %op.id, kind = kind(&op.command), ok = outcome.ok, error = outcome.error.as_deref().unwrap_or(""), "operation ended");
    let report = OpReport {
        outcome: if outcome.ok {
            OpOutcome::Succeeded
        } else {
            OpOutcome::Failed
        },
        progress: 100,
        error: outcome.error,
        snapshot: outcome.snapshot,
        instance_state: outcome.instance_state,
        note: outcome.note,
    };
    let r = client::retry(
        "report",
        || link.client.report(link.credential(), op.id, &report),
        |_| link.link_up(false),
    )
    .await;
    match r {
        Ok(()) => gantry_crashpoint::hit("agent.op.reported"),
        Err(e) => tracing::warn!(op = %op.id, error = %e, "the controller refused the report"),
    }
    if let Err(e) = link.journal.mark_reported(op.id) {
        tracing::error!(op = %op.id, error = %e, "cannot journal the report");
    }
    if report.snapshot.is_some() {
        // Only now: the sizes the compaction measures reach the controller
        // after the snapshot they belong to is settled there.
        link.manager.compact_store_soon();
        // The next heartbeat measures the store again: the controller frees
        // the snapshot's quota reservation once it sees it counted.
        *link
            .store_measured
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// One report, not retried (progress; a later one supersedes it).
pub(super) async fn send_report(link: &Link, op: OperationId, report: OpReport) {
    if let Err(e) = link.client.report(link.credential(), op, &report).await {
        tracing::debug!(op = %op, error = %e, "progress report failed");
    }
}

pub(super) fn running(progress: u8, instance_state: Option<InstanceState>) -> OpReport {
    OpReport {
        outcome: OpOutcome::Running,
        progress,
        error: None,
        snapshot: None,
        instance_state,
        note: None,
    }
}

pub(super) fn state_of(m: &Manager, id: Option<InstanceId>) -> Option<InstanceState> {
    m.record(id?).ok().map(|r| r.state)
}

/// Settles operations journalled by an earlier process and never finished:
/// reports recorded outcomes; decides the rest ([`settle_one`]). Once all
/// are reported, compacts the store (queues a restart left), so no new
/// snapshot size reaches the controller before its snapshot's outcome.
pub async fn settle_interrupted(link: &Arc<Link>) {
    let entries = match link.journal.all() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the operation journal");
            link.manager.compact_store_soon();
            return;
        }
    };
    let mut settling = Vec::new();
    for entry in entries.into_iter().filter(|e| !e.reported) {
        if !claim(link, entry.op.id) {
            continue;
        }
        let l = link.clone();
        settling.push(tokio::spawn(async move {
            let id = entry.op.id;
            match entry.outcome.clone() {
                Some(o) => report_outcome(&l, &entry.op, o).await,
                None => settle_one(&l, entry).await,
            }
            release_claim(&l, id);
        }));
    }
    let manager = link.manager.clone();
    tokio::spawn(async move {
        for s in settling {
            let _ = s.await;
        }
        manager.compact_store_soon();
    });
}

/// An operation interrupted by a restart: succeeded when the instance
/// already is where it leads, failed for a snapshot, else run again (which
/// fails with a sentence when the state no longer allows it).
async fn settle_one(link: &Arc<Link>, entry: Entry) {
    let op = entry.op;
    match interrupted_outcome(&link.manager, &op) {
        Some(outcome) => {
            if let (AgentCommand::Snapshot { snapshot, .. }, false) = (&op.command, outcome.ok) {
                // The controller records it as failed: nothing may remain.
                if let Err(e) = delete_snapshot(&link.manager, *snapshot).await {
                    tracing::warn!(snapshot = %snapshot, error = %e, "cannot remove an interrupted snapshot");
                }
            }
            tracing::info!(op = %op.id, ok = outcome.ok, "settled an operation interrupted by a restart");
            report_outcome(link, &op, outcome).await;
        }
        None => {
            tracing::info!(op = %op.id, "running an interrupted operation again");
            execute(link, op).await;
        }
    }
}

/// The outcome of an interrupted operation, or `None` to run it again.
pub fn interrupted_outcome(m: &Manager, op: &AgentOp) -> Option<Finished> {
    let id = op_instance(op);
    let rec = id.and_then(|i| m.record(i).ok());
    let state = rec.as_ref().map(|r| r.state);
    let done = |ok: bool| ok.then_some(Finished::ok(state));
    use InstanceState::*;
    match &op.command {
        // The restarted agent finished or undid the snapshot on the disk
        // (snapshots::recover); it succeeded if it was published.
        AgentCommand::Snapshot { snapshot, .. } => Some(match m.published_snapshot(*snapshot) {
            Some(sizes) => Finished {
                snapshot: Some(sizes),
                ..Finished::ok(state)
            },
            None => Finished::failed("interrupted by an agent restart", state),
        }),
        // Idempotent: run again.
        AgentCommand::DeleteSnapshot { .. }
        | AgentCommand::SetPassword { .. }
        | AgentCommand::GrowVolume { .. }
        | AgentCommand::DeleteVolume { .. }
        | AgentCommand::MoveOut { .. } => None,
        AgentCommand::MoveIn { .. } => done(state == Some(Stopped)),
        AgentCommand::Create { .. } => done(matches!(state, Some(Running | Stopped))),
        AgentCommand::Release {} | AgentCommand::MoveCleanup {} => {
            if rec.is_none() || state == Some(Released) {
                Some(Finished::ok(Some(Released)))
            } else {
                None
            }
        }
        AgentCommand::Start {} | AgentCommand::Reboot {} | AgentCommand::ForceReboot {} => {
            done(state == Some(Running))
        }
        AgentCommand::Stop {} => done(state == Some(Stopped)),
        AgentCommand::Suspend {} => done(state == Some(Suspended)),
        AgentCommand::Resume {} => done(state == Some(Running)),
        AgentCommand::ChangeType {
            vcpus,
            memory_mib,
            gpus,
            root_disk_gib,
        } => done(rec.is_some_and(|r| {
            r.state == Stopped
                && r.spec.vcpus == *vcpus
                && r.spec.memory_mib == *memory_mib
                && gpus.as_ref().is_none_or(|g| *g == r.spec.gpus)
                && root_disk_gib.is_none_or(|d| r.spec.root_disk_gib >= d)
        })),
        AgentCommand::ClearGpu { pci } => {
            let cleared = m
                .gpus()
                .list()
                .iter()
                .any(|g| g.pci == *pci && !g.health.is_clearable());
            done(cleared)
        }
        AgentCommand::GrowDisk { root_disk_gib } => {
            done(rec.is_some_and(|r| r.spec.root_disk_gib >= *root_disk_gib))
        }
    }
}
