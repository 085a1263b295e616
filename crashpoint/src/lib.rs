//! Named crash points for the crash campaign
//! (`tests/tests/crash_campaign.rs`): a daemon calls
//! [`hit`]`("controller.create.after_commit")` at a phase boundary, and when
//! the environment variable `GANTRY_CRASH_AT` names that point the process
//! SIGKILLs itself there — a true `kill -9`: no destructor, no flush, no
//! `Drop`, exactly what a power cut or the OOM killer leaves behind.
//!
//! `GANTRY_CRASH_AT=<name>` kills at the first hit, `<name>#<n>` at the
//! n-th. The variable is read once per process; unset (always, in
//! production), a hit is one load of an initialised `OnceLock` and a
//! branch. Before dying the process writes one line to stderr,
//! `crash point <name>#<n>: SIGKILL`, so a test can tell that it died
//! where it was told to and not elsewhere.
//!
//! Every point, in [`POINTS`] (the campaign kills each at least once, and
//! a test checks that the sources call exactly these):
//!
//! | point | where | what is done and what is not |
//! | --- | --- | --- |
//! | `controller.create.before_commit` | `api/instances.rs` create | instance, placement and create op written, not committed |
//! | `controller.create.after_commit` | `api/instances.rs` create | placement committed, the tenant not yet answered |
//! | `controller.work.deliver` | `api/agent.rs` work | a pending command is about to be sent to the agent |
//! | `controller.report.begin` | `api/agent.rs` report | an op report received, its transaction open, nothing applied |
//! | `controller.report.progress` | `api/commands.rs` apply_report | a Running (progress) report applied, not committed |
//! | `controller.report.snapshot_saved` | `api/commands.rs` apply_report | the snapshot set Success (sizes, image), op not finished, not committed |
//! | `controller.report.finished` | `api/commands.rs` apply_report | the op finished (undo, resources freed), not committed |
//! | `controller.report.before_commit` | `api/agent.rs` report | a final report (succeeded or failed) applied, not committed |
//! | `controller.report.after_commit` | `api/agent.rs` report | a final report committed, the agent not yet answered (it retries) |
//! | `controller.heartbeat.begin` | `api/agent.rs` heartbeat | the host row touched, nothing else |
//! | `controller.heartbeat.observed` | `api/agent.rs` heartbeat | observed states applied |
//! | `controller.heartbeat.billed` | `api/agent.rs` heartbeat | usage counters moved on the instance rows, no ledger row yet |
//! | `controller.heartbeat.figures_applied` | `api/agent.rs` heartbeat | the storage meter switched to the reported bytes |
//! | `controller.heartbeat.before_commit` | `api/agent.rs` heartbeat | everything applied, not committed |
//! | `controller.heartbeat.after_commit` | `api/agent.rs` heartbeat | committed, the ack not sent (the agent resends the same counters) |
//! | `controller.billing.counter_moved` | `billing.rs` bill_counter | an instance's `usage_seq`/`billed_ms` moved |
//! | `controller.billing.credit_taken` | `billing.rs` charge | the credit reduced, the ledger row not yet written |
//! | `controller.billing.ledger_inserted` | `billing.rs` charge | credit and ledger row both written (same transaction, not committed) |
//! | `controller.meter.window_claimed` | `meter.rs` charge_account | the storage meter window claimed, nothing charged |
//! | `controller.meter.before_commit` | `meter.rs` charge_account | storage charged, not committed |
//! | `controller.meter.after_commit` | `meter.rs` charge_account | storage charge committed |
//! | `controller.action.before_commit` | `api/actions.rs` do_action | desired state and op written, not committed |
//! | `controller.action.after_commit` | `api/actions.rs` do_action | the action committed, the tenant not yet answered |
//! | `controller.snapshot.before_commit` | `api/snapshots.rs` create | snapshot row, quota reservation and op written, not committed |
//! | `controller.snapshot.after_commit` | `api/snapshots.rs` create | committed, the tenant not yet answered |
//! | `controller.release.resources_freed` | `api/actions.rs` release_resources | a released instance's host room, GPUs and ports given back, not committed |
//! | `agent.work.received` | `link/work.rs` run | a work answer with commands received, nothing started |
//! | `agent.op.journaled` | `link/work.rs` carry_out | the op journalled as accepted, not run |
//! | `agent.op.started` | `link/work.rs` execute | the first progress report sent, the command not run |
//! | `agent.op.ran` | `link/work.rs` execute | the command done, its outcome not journalled |
//! | `agent.op.outcome_journaled` | `link/work.rs` report_outcome | outcome journalled, not reported |
//! | `agent.op.reported` | `link/work.rs` report_outcome | the controller took the report, not marked reported in the journal |
//! | `agent.create.overlay` | `lifecycle.rs` build_instance | the root overlay made, nothing defined |
//! | `agent.create.defined` | `lifecycle.rs` build_instance | the domain defined, not started |
//! | `agent.create.started` | `lifecycle.rs` build_instance | the domain started, the record not yet Running |
//! | `agent.create.running` | `lifecycle.rs` run_create | the record Running, the op not reported |
//! | `agent.action.started` | `lifecycle.rs` run_action | a start: the domain started, the record still Stopped |
//! | `agent.action.stopped` | `lifecycle.rs` run_action | a stop: the domain shut down, the record still Running |
//! | `agent.release.releasing` | `lifecycle.rs` release | the record Releasing, the domain still there |
//! | `agent.release.destroyed` | `lifecycle.rs` release | the domain destroyed, still defined |
//! | `agent.release.undefined` | `lifecycle.rs` release | the domain undefined, the instance directory still there |
//! | `agent.release.dir_removed` | `lifecycle.rs` release | the instance directory removed, not recorded Released |
//! | `agent.release.released` | `lifecycle.rs` release | recorded Released, not reported |
//! | `agent.snapshot.pending` | `snapshots/take.rs` take_live | the pending snapshot journalled (Switching), no overlay yet |
//! | `agent.snapshot.switched` | `snapshots/take.rs` take_live | the guest writes on the fresh overlay, still Switching |
//! | `agent.snapshot.saving` | `snapshots/take.rs` take_live | Saving journalled, the domain redefined, nothing stored |
//! | `agent.store.before_manifest` | `agent/store` Store::create | every chunk durable, the manifest not written |
//! | `agent.snapshot.stored` | `snapshots/take.rs` take_live | the manifest published, Saving still journalled |
//! | `agent.snapshot.merging` | `snapshots/take.rs` take_live | Merging journalled (published), the layers not merged |
//! | `agent.snapshot.merged` | `snapshots/take.rs` take_live | the frozen layer merged down, pending not cleared |
//! | `agent.snapshot.done` | `snapshots/take.rs` take_live | the chain settled, the op not reported |
//! | `agent.snapshot.offline_stored` | `snapshots/take.rs` take_offline | a stopped instance's layer stored, Saving still journalled |
//! | `agent.heartbeat.built` | `link/heartbeat.rs` send_once | counters' `seq` bumped and persisted, not sent |
//! | `agent.heartbeat.sent` | `link/heartbeat.rs` send_once | the controller acknowledged, the ack not applied |
//! | `agent.heartbeat.acked` | `link/heartbeat.rs` send_once | the ack applied (done counters forgotten) |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the point to die at.
pub const ENV: &str = "GANTRY_CRASH_AT";

/// Every crash point, named `<daemon>.<flow>.<phase>`. The table in the crate docs says
/// where each one is and what is done when it fires.
pub const POINTS: &[&str] = &[
    "controller.create.before_commit",
    "controller.create.after_commit",
    "controller.work.deliver",
    "controller.report.begin",
    "controller.report.progress",
    "controller.report.snapshot_saved",
    "controller.report.finished",
    "controller.report.before_commit",
    "controller.report.after_commit",
    "controller.heartbeat.begin",
    "controller.heartbeat.observed",
    "controller.heartbeat.billed",
    "controller.heartbeat.figures_applied",
    "controller.heartbeat.before_commit",
    "controller.heartbeat.after_commit",
    "controller.billing.counter_moved",
    "controller.billing.ledger_inserted",
    "controller.billing.credit_taken",
    "controller.meter.window_claimed",
    "controller.meter.before_commit",
    "controller.meter.after_commit",
    "controller.action.before_commit",
    "controller.action.after_commit",
    "controller.snapshot.before_commit",
    "controller.snapshot.after_commit",
    "controller.release.resources_freed",
    "agent.work.received",
    "agent.op.journaled",
    "agent.op.started",
    "agent.op.ran",
    "agent.op.outcome_journaled",
    "agent.op.reported",
    "agent.create.overlay",
    "agent.create.defined",
    "agent.create.started",
    "agent.create.running",
    "agent.action.started",
    "agent.action.stopped",
    "agent.release.releasing",
    "agent.release.destroyed",
    "agent.release.undefined",
    "agent.release.dir_removed",
    "agent.release.released",
    "agent.snapshot.pending",
    "agent.snapshot.switched",
    "agent.snapshot.saving",
    "agent.store.before_manifest",
    "agent.snapshot.stored",
    "agent.snapshot.merging",
    "agent.snapshot.merged",
    "agent.snapshot.done",
    "agent.snapshot.offline_stored",
    "agent.heartbeat.built",
    "agent.heartbeat.sent",
    "agent.heartbeat.acked",
];

/// The point and hit number to die at, parsed from [`ENV`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub point: String,
    pub nth: u64,
}

impl Target {
    /// `name` or `name#n` (n >= 1); anything else is no target.
    pub fn parse(v: &str) -> Option<Self> {
        let v = v.trim();
        let (point, nth) = match v.split_once('#') {
            Some((p, n)) => (p, n.parse().ok().filter(|n| *n >= 1)?),
            None => (v, 1),
        };
        (!point.is_empty()).then(|| Self {
            point: point.to_string(),
            nth,
        })
    }
}

static TARGET: OnceLock<Option<Target>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// Marks the crash point `name`: SIGKILLs the process when [`ENV`] names
/// it (at its n-th hit with `name#n`); does nothing otherwise.
#[inline]
pub fn hit(name: &'static str) {
    let target = TARGET.get_or_init(|| std::env::var(ENV).ok().and_then(|v| Target::parse(&v)));
    if let Some(t) = target {
        if t.point == name {
            fire(t);
        }
    }
}

#[cold]
fn fire(t: &Target) {
    let n = HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if n != t.nth {
        return;
    }
    eprintln!("crash point {}#{n}: SIGKILL", t.point);
    // SAFETY: kill(2) on our own pid with a valid signal number.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; nothing runs after it is delivered.
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_and_without_a_hit_number() {
        assert_eq!(
            Target::parse("agent.op.ran"),
            Some(Target {
                point: "agent.op.ran".into(),
                nth: 1
            })
        );
        assert_eq!(Target::parse("agent.op.ran#3").map(|t| t.nth), Some(3));
        assert_eq!(Target::parse("agent.op.ran#0"), None);
        assert_eq!(Target::parse("agent.op.ran#x"), None);
        assert_eq!(Target::parse(""), None);
    }

    #[test]
    fn point_names_are_unique_and_name_their_daemon() {
        let mut seen = std::collections::HashSet::new();
        for p in POINTS {
            assert!(seen.insert(p), "{p} is listed twice");
            assert!(
                p.starts_with("controller.") || p.starts_with("agent."),
                "{p} names no daemon"
            );
        }
    }

    #[test]
    fn a_point_not_named_does_nothing() {
        // The variable is unset in tests: a hit returns.
        hit("agent.op.ran");
    }

    #[test]
    fn the_named_point_kills_the_process_with_sigkill() {
        // A child process (this test binary, filtered to the helper below)
        // with the variable set must die by SIGKILL at the second hit.
        if std::env::var_os("GANTRY_CRASHPOINT_CHILD").is_some() {
            hit("agent.op.ran");
            println!("survived the first hit");
            hit("agent.op.ran");
            println!("survived the second hit");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::the_named_point_kills_the_process_with_sigkill",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("GANTRY_CRASHPOINT_CHILD", "1")
            .env(ENV, "agent.op.ran#2")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("survived the first hit"), "{stdout}");
        assert!(!stdout.contains("survived the second hit"), "{stdout}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("crash point agent.op.ran#2: SIGKILL"),
            "{stderr}"
        );
    }
}
