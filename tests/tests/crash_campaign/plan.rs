//! The campaign's plan: which daemon is killed at which crash point
//! (and which hit of it), in which flow; and the check that the plan and
//! the sources cover exactly the points `gantry_crashpoint::POINTS` lists.

use gantry_crashpoint::POINTS;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Daemon {
    Controller,
    Agent,
}

/// What the test does to reach a point; each needs the cloud in a state
/// (see `prepare`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Create a new instance (the spare).
    Create,
    /// Release the spare.
    Release,
    /// Snapshot the spare with auto-release (stopped, saved, released).
    AutoRelease,
    /// Snapshot the steady instance while it runs.
    LiveSnapshot,
    /// Snapshot the steady instance while it is stopped.
    OfflineSnapshot,
    /// Stop the steady instance.
    Stop,
    /// Start the steady instance.
    Start,
    /// Nothing: heartbeats, billing and the storage meter run by themselves
    /// (the steady instance running).
    Idle,
}

pub struct Kill {
    pub point: &'static str,
    pub nth: u32,
    pub flow: Flow,
}

impl Kill {
    pub fn daemon(&self) -> Daemon {
        if self.point.starts_with("controller.") {
            Daemon::Controller
        } else {
            Daemon::Agent
        }
    }

    pub fn target(&self) -> String {
        format!("{}#{}", self.point, self.nth)
    }
}

/// The planned kills, in order: create/release pairs, snapshots, stop and
/// start, then the background work (its Nth-hit variants), the storage
/// meter last (it needs stored snapshots).
pub fn plan() -> Vec<Kill> {
    [create_and_release(), snapshots_stop_start(), background()]
        .into_iter()
        .flatten()
        .collect()
}

/// Create/release pairs and snapshots with auto-release, both daemons.
fn create_and_release() -> Vec<Kill> {
    use Flow::*;
    let k = |point, nth, flow| Kill { point, nth, flow };
    let mut p = Vec::new();
    // The controller: create and release.
    for (c, r) in [
        (
            "controller.create.before_commit",
            "controller.action.before_commit",
        ),
        (
            "controller.create.after_commit",
            "controller.action.after_commit",
        ),
        ("controller.work.deliver", "controller.work.deliver"),
        ("controller.report.progress", "controller.report.progress"),
        ("controller.report.begin", "controller.report.finished"),
        (
            "controller.report.finished",
            "controller.release.resources_freed",
        ),
        (
            "controller.report.before_commit",
            "controller.report.before_commit",
        ),
        (
            "controller.report.after_commit",
            "controller.report.after_commit",
        ),
    ] {
        p.push(k(c, 1, Create));
        p.push(k(r, 1, Release));
    }
    for point in [
        "controller.snapshot.after_commit",
        "controller.report.snapshot_saved",
        "controller.report.after_commit",
    ] {
        p.push(k(point, 1, AutoRelease));
    }
    // The agent: create and release.
    for (c, r) in [
        ("agent.work.received", "agent.work.received"),
        ("agent.op.journaled", "agent.op.journaled"),
        ("agent.op.started", "agent.op.started"),
        ("agent.create.overlay", "agent.release.releasing"),
        ("agent.create.defined", "agent.release.destroyed"),
        ("agent.create.started", "agent.release.undefined"),
        ("agent.create.running", "agent.release.dir_removed"),
        ("agent.op.ran", "agent.release.released"),
        ("agent.op.outcome_journaled", "agent.op.ran"),
        ("agent.op.reported", "agent.op.outcome_journaled"),
    ] {
        p.push(k(c, 1, Create));
        p.push(k(r, 1, Release));
    }
    p.push(k("agent.snapshot.offline_stored", 1, AutoRelease));
    p
}

/// Live snapshots of the steady instance; stop, offline snapshot, start.
fn snapshots_stop_start() -> Vec<Kill> {
    use Flow::*;
    let k = |point, nth, flow| Kill { point, nth, flow };
    let mut p = Vec::new();
    // Live snapshots of the steady instance.
    for point in [
        "controller.snapshot.before_commit",
        "controller.snapshot.after_commit",
        "controller.work.deliver",
        "controller.report.progress",
        "controller.report.snapshot_saved",
        "controller.report.finished",
        "controller.report.before_commit",
        "controller.report.after_commit",
        "agent.snapshot.pending",
        "agent.snapshot.switched",
        "agent.snapshot.saving",
        "agent.store.before_manifest",
        "agent.snapshot.stored",
        "agent.snapshot.merging",
        "agent.snapshot.merged",
        "agent.snapshot.done",
        "agent.op.started",
        "agent.op.ran",
        "agent.op.outcome_journaled",
        "agent.op.reported",
    ] {
        p.push(k(point, 1, LiveSnapshot));
    }
    // Stop, an offline snapshot, start.
    for (stop, offline, start) in [
        (
            "controller.action.before_commit",
            "agent.snapshot.offline_stored",
            "controller.action.after_commit",
        ),
        (
            "agent.action.stopped",
            "agent.store.before_manifest",
            "agent.action.started",
        ),
        (
            "controller.report.finished",
            "controller.report.snapshot_saved",
            "controller.report.after_commit",
        ),
        ("agent.op.reported", "agent.op.ran", "agent.work.received"),
    ] {
        p.push(k(stop, 1, Stop));
        p.push(k(offline, 1, OfflineSnapshot));
        p.push(k(start, 1, Start));
    }
    p
}

/// Heartbeats, instance billing and the storage meter (it needs stored snapshots: last).
fn background() -> Vec<Kill> {
    use Flow::*;
    let k = |point, nth, flow| Kill { point, nth, flow };
    let mut p = Vec::new();
    // Heartbeats and instance billing, first and later hits.
    for nth in 1..=2 {
        for point in [
            "controller.heartbeat.begin",
            "controller.heartbeat.observed",
            "controller.heartbeat.billed",
            "controller.heartbeat.figures_applied",
            "controller.heartbeat.before_commit",
            "controller.heartbeat.after_commit",
            "controller.billing.counter_moved",
            "controller.billing.ledger_inserted",
            "controller.billing.credit_taken",
        ] {
            p.push(k(point, nth, Idle));
        }
    }
    for nth in 1..=4 {
        for point in [
            "agent.heartbeat.built",
            "agent.heartbeat.sent",
            "agent.heartbeat.acked",
        ] {
            p.push(k(point, nth, Idle));
        }
    }
    for nth in 1..=2 {
        for point in [
            "controller.meter.window_claimed",
            "controller.meter.before_commit",
            "controller.meter.after_commit",
        ] {
            p.push(k(point, nth, Idle));
        }
    }
    p
}

/// The crash points the daemons' sources call, read from the sources.
fn points_in_sources() -> BTreeMap<String, usize> {
    fn walk(dir: &std::path::Path, out: &mut BTreeMap<String, usize>) {
        for e in std::fs::read_dir(dir).expect("read source dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("read source");
                for part in text.split("gantry_crashpoint::hit(\"").skip(1) {
                    let name = part.split('"').next().unwrap_or_default();
                    *out.entry(name.to_string()).or_default() += 1;
                }
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = BTreeMap::new();
    for d in ["controller/src", "agent/src", "agent/store/src"] {
        walk(&root.join(d), &mut out);
    }
    out
}

#[test]
fn the_crash_points_in_the_sources_are_the_documented_ones_and_all_planned() {
    let used = points_in_sources();
    let listed: BTreeSet<String> = POINTS.iter().map(|p| p.to_string()).collect();
    let called: BTreeSet<String> = used.keys().cloned().collect();
    assert_eq!(
        called, listed,
        "the sources call exactly the points gantry_crashpoint::POINTS lists"
    );
    let plan = plan();
    for p in POINTS {
        assert!(
            plan.iter().any(|k| k.point == *p),
            "the campaign never kills at {p}"
        );
    }
    for d in [Daemon::Controller, Daemon::Agent] {
        let kills = plan.iter().filter(|k| k.daemon() == d).count();
        let distinct: BTreeSet<_> = plan
            .iter()
            .filter(|k| k.daemon() == d)
            .map(|k| k.point)
            .collect();
        assert!(kills >= 50, "{d:?}: only {kills} kills planned");
        assert!(
            distinct.len() >= 25,
            "{d:?}: only {} points",
            distinct.len()
        );
    }
}
