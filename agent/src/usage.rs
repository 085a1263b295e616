//! Per-instance Running-time counters, the basis of billing.
//!
//! For each instance the agent keeps `running_ms` (milliseconds the guest
//! has been Running on this host) and `seq`, bumped and persisted every time
//! the counters are read for a heartbeat ([`UsageBook::snapshot`]), so
//! nothing sent is ever lost on a restart. Both only grow; a wall clock that
//! steps back is clamped to the last time seen.
//!
//! Files: `<state_dir>/usage/<instance-id>.json`, envelopes with magic
//! [`USAGE_MAGIC`] version [`USAGE_VERSION`], holding a [`CounterRecord`].
//!
//! Counting starts and stops in the manager's one state setter (entering or
//! leaving Running). After an agent restart a VM that kept running keeps
//! counting from `running_since_ms`; one found not running is counted only
//! up to `last_seen_ms` (the last read, at most a heartbeat ago). A released
//! instance's counter stays until the controller acknowledges its final
//! value with `done`.

use crate::fsutil::{self, FsError};
use gantry_proto::api::agent::{UsageAck, UsageCounter};
use gantry_proto::{InstanceId, InstanceState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Magic of a usage counter file.
pub const USAGE_MAGIC: &str = "gantry-usage";
/// Version of a usage counter file.
pub const USAGE_VERSION: u32 = 1;

/// Wall-clock time in Unix milliseconds.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
    }
}

/// A clock tests move by hand.
#[derive(Default)]
pub struct FakeClock(AtomicU64);

impl FakeClock {
    pub fn new(ms: u64) -> Self {
        Self(AtomicU64::new(ms))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// One instance's counter as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRecord {
    pub instance: InstanceId,
    pub seq: u64,
    /// Running time accumulated up to `running_since_ms` (or in total when
    /// not running).
    pub running_ms: u64,
    /// When the current Running stretch began; `None` when not Running.
    pub running_since_ms: Option<u64>,
    /// The last time the counter was read (or changed).
    pub last_seen_ms: u64,
    /// The instance is gone (Released or Failed) on this host.
    #[serde(default)]
    pub released: bool,
    /// The first `seq` sent after the instance was gone: an ack of it (or
    /// later) with `done` lets the counter be forgotten.
    #[serde(default)]
    pub final_seq: Option<u64>,
}

impl CounterRecord {
    fn total_at(&self, now: u64) -> u64 {
        self.running_ms + self.running_since_ms.map_or(0, |s| now.saturating_sub(s))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Every counter of the host, in memory and on disk.
pub struct UsageBook {
    dir: PathBuf,
    clock: Arc<dyn Clock>,
    counters: Mutex<BTreeMap<InstanceId, CounterRecord>>,
    /// Set until [`UsageBook::finish_recovery`]: a Running stretch ended by
    /// re-attach ends at `last_seen_ms`, not now.
    recovering: AtomicBool,
    /// Latest time handed out, so the clock never goes back.
    latest: AtomicU64,
    /// When a guest was powered on (started or resumed) and its move to
    /// Running not yet recorded: that stretch (network set-up, taps) is
    /// the guest running and is billed. Taken by the next change of state;
    /// a start that fails moves it elsewhere, so it is dropped unbilled.
    powered: Mutex<BTreeMap<InstanceId, u64>>,
}

impl UsageBook {
    /// Loads every counter under `dir` (created if missing). Unreadable
    /// files are logged and left alone.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<Self, UsageError> {
        fsutil::create_dir(dir, 0o700)?;
        let mut counters = BTreeMap::new();
        let mut latest = 0;
        let rd = std::fs::read_dir(dir).map_err(fsutil::io_err("read dir", dir))?;
        for entry in rd.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match fsutil::read_state::<CounterRecord>(&path, USAGE_MAGIC, USAGE_VERSION) {
                Ok(rec) => {
                    latest = latest.max(rec.last_seen_ms);
                    counters.insert(rec.instance, rec);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable usage counter; left as is")
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            clock,
            counters: Mutex::new(counters),
            recovering: AtomicBool::new(true),
            latest: AtomicU64::new(latest),
            powered: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<InstanceId, CounterRecord>> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Now, never earlier than any time handed out before.
    fn now(&self) -> u64 {
        let now = self.clock.now_ms();
        self.latest.fetch_max(now, Ordering::SeqCst).max(now)
    }

    fn path(&self, id: InstanceId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn save(&self, rec: &CounterRecord) -> Result<(), UsageError> {
        Ok(fsutil::write_state(
            &self.path(rec.instance),
            USAGE_MAGIC,
            USAGE_VERSION,
            rec,
        )?)
    }

    /// The guest `id` was just powered on (started or resumed); its move to
    /// Running, recorded a little later, counts from now.
    pub fn powered_on(&self, id: InstanceId) {
        let now = self.now();
        self.powered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, now);
    }

    /// Called by the manager's state setter for every change of state.
    pub fn on_state(&self, id: InstanceId, from: InstanceState, to: InstanceState) {
        let now = self.now();
        let recovering = self.recovering.load(Ordering::SeqCst);
        let powered = self
            .powered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id)
            .filter(|&t| t <= now);
        let mut counters = self.lock();
        let rec = counters.entry(id).or_insert_with(|| new_counter(id, now));
        if to == InstanceState::Running && rec.running_since_ms.is_none() {
            // Re-attach finding the guest running (the agent died between
            // starting, resuming or snapshotting it and recording that): it
            // has run since the agent last looked, not since now — the
            // mirror of a stretch ended by re-attach, at most one heartbeat
            // early, where counting from now would drop the whole outage.
            rec.running_since_ms = Some(match (recovering, powered) {
                (true, _) => rec.last_seen_ms,
                (false, Some(on)) => on,
                (false, None) => now,
            });
        } else if from == InstanceState::Running && to != InstanceState::Running {
            let end = if recovering { rec.last_seen_ms } else { now };
            stop(rec, end);
        }
        if to.is_final() {
            stop(rec, now);
            rec.released = true;
        }
        if !recovering {
            rec.last_seen_ms = rec.last_seen_ms.max(now);
        }
        if let Err(e) = self.save(rec) {
            tracing::error!(instance = %id, error = %e, "cannot persist usage counter");
        }
    }

    /// Ends recovery, given the state of every live instance: a counter
    /// still counting whose instance is not Running now is closed at its
    /// `last_seen_ms`; a Running instance with no open stretch (or no
    /// counter yet) starts counting now; a counter of an instance no longer
    /// here is marked gone.
    pub fn finish_recovery(&self, live: &HashMap<InstanceId, InstanceState>) {
        let now = self.now();
        let mut counters = self.lock();
        for (id, st) in live {
            if *st == InstanceState::Running {
                counters.entry(*id).or_insert_with(|| new_counter(*id, now));
            }
        }
        for rec in counters.values_mut() {
            let st = live.get(&rec.instance).copied();
            let running = st == Some(InstanceState::Running);
            let mut changed = match (running, rec.running_since_ms) {
                (false, Some(_)) => {
                    stop(rec, rec.last_seen_ms);
                    true
                }
                (true, None) => {
                    rec.running_since_ms = Some(now);
                    true
                }
                _ => false,
            };
            if st.is_none_or(InstanceState::is_final) && !rec.released {
                rec.released = true;
                changed = true;
            }
            if changed {
                if let Err(e) = self.save(rec) {
                    tracing::error!(instance = %rec.instance, error = %e, "cannot persist usage counter");
                }
            }
        }
        self.recovering.store(false, Ordering::SeqCst);
    }

    /// Counters to send: each `seq` bumped and persisted before it is
    /// returned. Live instances missing a counter are not invented here.
    pub fn snapshot(&self) -> Result<Vec<UsageCounter>, UsageError> {
        let now = self.now();
        let mut counters = self.lock();
        let mut out = Vec::with_capacity(counters.len());
        for rec in counters.values_mut() {
            let mut next = rec.clone();
            next.seq += 1;
            next.last_seen_ms = next.last_seen_ms.max(now);
            if next.released && next.final_seq.is_none() {
                next.final_seq = Some(next.seq);
            }
            self.save(&next)?;
            *rec = next;
            out.push(UsageCounter {
                instance: rec.instance,
                seq: rec.seq,
                running_ms: rec.total_at(now),
            });
        }
        Ok(out)
    }

    /// Applies the controller's acknowledgements: a gone instance's counter
    /// acknowledged with `done` at or after its final value is forgotten.
    pub fn ack(&self, acks: &[UsageAck]) {
        let mut counters = self.lock();
        for a in acks.iter().filter(|a| a.done) {
            let forget = counters
                .get(&a.instance)
                .is_some_and(|r| r.released && r.final_seq.is_some_and(|f| a.seq >= f));
            if forget {
                counters.remove(&a.instance);
                let p = self.path(a.instance);
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove usage counter");
                }
            }
        }
    }

    /// The counter of one instance, as it would be sent now (without
    /// bumping `seq`).
    pub fn peek(&self, id: InstanceId) -> Option<(u64, u64)> {
        let now = self.now();
        self.lock().get(&id).map(|r| (r.seq, r.total_at(now)))
    }
}

fn new_counter(instance: InstanceId, now: u64) -> CounterRecord {
    CounterRecord {
        instance,
        seq: 0,
        running_ms: 0,
        running_since_ms: None,
        last_seen_ms: now,
        released: false,
        final_seq: None,
    }
}

fn stop(rec: &mut CounterRecord, end: u64) {
    if let Some(since) = rec.running_since_ms.take() {
        rec.running_ms += end.saturating_sub(since);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::*;

    fn book(dir: &Path, clock: &Arc<FakeClock>) -> UsageBook {
        UsageBook::open(&dir.join("usage"), clock.clone()).unwrap()
    }

    fn counter(b: &UsageBook, id: InstanceId) -> UsageCounter {
        *b.snapshot()
            .unwrap()
            .iter()
            .find(|c| c.instance == id)
            .expect("counter")
    }

    #[test]
    fn a_guest_counts_from_power_on_and_a_failed_start_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new(1_000_000));
        let b = book(dir.path(), &clock);
        b.finish_recovery(&HashMap::new());
        let id = InstanceId::new();
        b.on_state(id, Creating, Stopped);
        // Powered on; its network took 1.5 s before Running was recorded.
        b.powered_on(id);
        clock.advance(1_500);
        b.on_state(id, Stopped, Running);
        clock.advance(2_000);
        assert_eq!(counter(&b, id).running_ms, 3_500);
        b.on_state(id, Running, Stopped);
        // A start that fails after power-on is not billed, nor carried over.
        b.powered_on(id);
        clock.advance(4_000);
        b.on_state(id, Stopped, Failed);
        assert_eq!(counter(&b, id).running_ms, 3_500);
    }

    #[test]
    fn counts_running_time_only_and_seq_grows() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new(1_000_000));
        let b = book(dir.path(), &clock);
        b.finish_recovery(&HashMap::new());
        let id = InstanceId::new();
        b.on_state(id, Creating, Running);
        clock.advance(5_000);
        let c1 = counter(&b, id);
        assert_eq!(c1.running_ms, 5_000);
        b.on_state(id, Running, Stopped);
        clock.advance(60_000);
        let c2 = counter(&b, id);
        assert_eq!(c2.running_ms, 5_000, "stopped time is not counted");
        assert!(c2.seq > c1.seq);
        b.on_state(id, Stopped, Running);
        clock.advance(1_000);
        let c3 = counter(&b, id);
        assert_eq!(c3.running_ms, 6_000);
        assert!(c3.seq > c2.seq);
        // A clock that steps back never makes the counter go back.
        clock.set(500);
        let c4 = counter(&b, id);
        assert_eq!(c4.running_ms, 6_000);
        assert!(c4.seq > c3.seq);
    }

    #[test]
    fn restart_while_running_keeps_counting() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new(1_000_000));
        let id = InstanceId::new();
        let sent = {
            let b = book(dir.path(), &clock);
            b.finish_recovery(&HashMap::new());
            b.on_state(id, Creating, Running);
            clock.advance(10_000);
            counter(&b, id)
        };
        // The agent is down for 30 s; the VM keeps running.
        clock.advance(30_000);
        let b = book(dir.path(), &clock);
        b.finish_recovery(&HashMap::from([(id, Running)]));
        let c = counter(&b, id);
        assert_eq!(c.running_ms, 40_000);
        assert!(c.seq > sent.seq);
    }

    #[test]
    fn a_guest_found_running_at_restart_counts_from_the_last_read() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new(1_000_000));
        let id = InstanceId::new();
        let sent = {
            let b = book(dir.path(), &clock);
            b.finish_recovery(&HashMap::new());
            b.on_state(id, Creating, Running);
            clock.advance(10_000);
            b.on_state(id, Running, Stopped);
            clock.advance(5_000);
            // The last heartbeat before the agent dies; then it starts the
            // guest and is killed before the record says Running.
            counter(&b, id)
        };
        assert_eq!(sent.running_ms, 10_000);
        // Down for a minute while the guest runs.
        clock.advance(60_000);
        let b = book(dir.path(), &clock);
        b.on_state(id, Stopped, Running);
        b.finish_recovery(&HashMap::from([(id, Running)]));
        assert_eq!(counter(&b, id).running_ms, 70_000, "the outage is billed");
    }

    #[test]
    fn restart_after_the_vm_stopped_counts_up_to_the_last_read() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new(1_000_000));
        let id = InstanceId::new();
        let sent = {
            let b = book(dir.path(), &clock);
            b.finish_recovery(&HashMap::new());
            b.on_state(id, Creating, Running);
            clock.advance(10_000);
            counter(&b, id)
        };
        clock.advance(3_600_000);
        let b = book(dir.path(), &clock);
        // Re-attach finds the guest powered off while the agent was down.
        b.on_state(id, Running, Stopped);
        b.finish_recovery(&HashMap::from([(id, Stopped)]));
        let c = counter(&b, id);
        assert_eq!(c.running_ms, sent.running_ms);
        assert!(c.seq > sent.seq);

        // Same when the record already said Stopped (crash between the
        // instance record and the counter being written).
        let id2 = InstanceId::new();
        b.on_state(id2, Creating, Running);
        clock.advance(2_000);
        let sent2 = counter(&b, id2);
        clock.advance(100_000);
        drop(b);
        let b = book(dir.path(), &clock);
        b.finish_recovery(&HashMap::from([(id, Stopped), (id2, Stopped)]));
        assert_eq!(counter(&b, id2).running_ms, sent2.running_ms);
    }

    #[test]
    fn released_counters_stay_until_acknowledged_done() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new(1_000_000));
        let b = book(dir.path(), &clock);
        b.finish_recovery(&HashMap::new());
        let id = InstanceId::new();
        b.on_state(id, Creating, Running);
        clock.advance(1_000);
        let before = counter(&b, id);
        clock.advance(1_000);
        b.on_state(id, Running, Releasing);
        b.on_state(id, Releasing, Released);
        // An ack (done) of a value sent before the release forgets nothing.
        b.ack(&[UsageAck {
            instance: id,
            seq: before.seq,
            done: true,
        }]);
        let last = counter(&b, id);
        assert_eq!(last.running_ms, 2_000);
        // Not done: kept.
        b.ack(&[UsageAck {
            instance: id,
            seq: last.seq,
            done: false,
        }]);
        assert!(b.peek(id).is_some());
        b.ack(&[UsageAck {
            instance: id,
            seq: last.seq,
            done: true,
        }]);
        assert!(b.peek(id).is_none());
        assert!(b.snapshot().unwrap().is_empty());
        let b = book(dir.path(), &clock);
        assert!(b.peek(id).is_none(), "forgotten on disk too");
    }

    #[test]
    fn a_running_instance_without_a_counter_starts_one_at_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new(1_000));
        let b = book(dir.path(), &clock);
        let id = InstanceId::new();
        b.finish_recovery(&HashMap::from([
            (id, Running),
            (InstanceId::new(), Stopped),
        ]));
        clock.advance(700);
        let all = b.snapshot().unwrap();
        assert_eq!(all.len(), 1, "only the running one: {all:?}");
        assert_eq!(all[0].running_ms, 700);
    }

    #[test]
    fn live_instances_are_never_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new(1_000));
        let b = book(dir.path(), &clock);
        b.finish_recovery(&HashMap::new());
        let id = InstanceId::new();
        b.on_state(id, Creating, Running);
        let c = counter(&b, id);
        b.ack(&[UsageAck {
            instance: id,
            seq: c.seq,
            done: true,
        }]);
        assert!(b.peek(id).is_some());
    }
}
