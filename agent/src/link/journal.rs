//! The journal of controller operations: one file per operation id,
//! `<state_dir>/controller-ops/<op-id>.json` (envelope magic
//! [`OP_MAGIC`], version [`OP_VERSION`]), written when the operation is
//! accepted and again with its outcome, so that an operation delivered
//! twice is never run twice: its recorded outcome is reported again.

use crate::fsutil::{self, FsError};
use gantry_proto::api::agent::{AgentOp, SnapshotSizes};
use gantry_proto::{InstanceState, OperationId};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Magic of a journal entry.
pub const OP_MAGIC: &str = "gantry-controller-op";
/// Version of a journal entry.
pub const OP_VERSION: u32 = 1;
/// Reported entries older than this are pruned.
pub const KEEP_REPORTED_MS: u64 = 24 * 3600 * 1000;

/// How an operation ended on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub snapshot: Option<SnapshotSizes>,
    #[serde(default)]
    pub instance_state: Option<InstanceState>,
    /// A sentence about a success (how a password reset applies).
    #[serde(default)]
    pub note: Option<String>,
}

impl Finished {
    pub fn failed(error: impl Into<String>, instance_state: Option<InstanceState>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            snapshot: None,
            instance_state,
            note: None,
        }
    }

    pub fn ok(instance_state: Option<InstanceState>) -> Self {
        Self {
            ok: true,
            error: None,
            snapshot: None,
            instance_state,
            note: None,
        }
    }
}

/// One accepted operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub op: AgentOp,
    pub accepted_ms: u64,
    /// Its outcome, once known.
    #[serde(default)]
    pub outcome: Option<Finished>,
    /// The controller took the outcome.
    #[serde(default)]
    pub reported: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Fs(#[from] FsError),
}

pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        fsutil::create_dir(dir, 0o700)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: OperationId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn get(&self, id: OperationId) -> Result<Option<Entry>, JournalError> {
        let p = self.path(id);
        if !p.exists() {
            return Ok(None);
        }
        Ok(Some(fsutil::read_state(&p, OP_MAGIC, OP_VERSION)?))
    }

    pub fn save(&self, e: &Entry) -> Result<(), JournalError> {
        Ok(fsutil::write_state(
            &self.path(e.op.id),
            OP_MAGIC,
            OP_VERSION,
            e,
        )?)
    }

    /// Records `op` as accepted; returns `(entry, true)` when it is new, or
    /// the entry already recorded for that id and `false`.
    pub fn accept(&self, op: &AgentOp, now_ms: u64) -> Result<(Entry, bool), JournalError> {
        if let Some(e) = self.get(op.id)? {
            return Ok((e, false));
        }
        let e = Entry {
            op: op.clone(),
            accepted_ms: now_ms,
            outcome: None,
            reported: false,
        };
        self.save(&e)?;
        Ok((e, true))
    }

    /// Records the outcome (kept even once reported).
    pub fn finish(&self, id: OperationId, outcome: Finished) -> Result<Entry, JournalError> {
        let mut e = self.get(id)?.ok_or_else(|| FsError::Io {
            op: "read",
            path: self.path(id),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        e.outcome = Some(outcome);
        self.save(&e)?;
        Ok(e)
    }

    pub fn mark_reported(&self, id: OperationId) -> Result<(), JournalError> {
        if let Some(mut e) = self.get(id)? {
            e.reported = true;
            self.save(&e)?;
        }
        Ok(())
    }

    /// Every entry; unreadable files are logged and skipped.
    pub fn all(&self) -> Result<Vec<Entry>, JournalError> {
        let rd = std::fs::read_dir(&self.dir).map_err(fsutil::io_err("read dir", &self.dir))?;
        let mut out = Vec::new();
        for p in rd.filter_map(|e| e.ok().map(|e| e.path())) {
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match fsutil::read_state(&p, OP_MAGIC, OP_VERSION) {
                Ok(e) => out.push(e),
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "unreadable operation journal entry")
                }
            }
        }
        out.sort_by_key(|e: &Entry| e.accepted_ms);
        Ok(out)
    }

    /// Forgets reported entries accepted before `before_ms`.
    pub fn prune(&self, before_ms: u64) -> Result<usize, JournalError> {
        let mut n = 0;
        for e in self.all()? {
            if e.reported && e.accepted_ms < before_ms {
                let p = self.path(e.op.id);
                std::fs::remove_file(&p).map_err(fsutil::io_err("remove", &p))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::api::agent::{AgentCommand, OpPhase};
    use gantry_proto::InstanceId;

    fn op() -> AgentOp {
        AgentOp {
            id: OperationId::new(),
            instance: Some(InstanceId::new()),
            phase: OpPhase::Pending,
            command: AgentCommand::Start {},
        }
    }

    #[test]
    fn an_operation_is_accepted_once_and_keeps_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("ops")).unwrap();
        let o = op();
        let (e, new) = j.accept(&o, 10).unwrap();
        assert!(new);
        assert_eq!(e.outcome, None);
        let (_, again) = j.accept(&o, 20).unwrap();
        assert!(!again, "a re-delivered id is not new");
        j.finish(o.id, Finished::failed("boom", Some(InstanceState::Stopped)))
            .unwrap();
        // A new process sees the same entry and outcome.
        let j = Journal::open(&dir.path().join("ops")).unwrap();
        let (e, new) = j.accept(&o, 30).unwrap();
        assert!(!new);
        assert_eq!(e.accepted_ms, 10);
        assert_eq!(e.outcome.unwrap().error.as_deref(), Some("boom"));
        assert!(!e.reported);
        j.mark_reported(o.id).unwrap();
        assert!(j.get(o.id).unwrap().unwrap().reported);
        // Pruning keeps unreported and recent entries.
        let o2 = op();
        j.accept(&o2, 15).unwrap();
        assert_eq!(j.prune(10).unwrap(), 0, "accepted at 10: not before 10");
        assert_eq!(j.prune(100).unwrap(), 1);
        assert!(j.get(o.id).unwrap().is_none());
        assert!(j.get(o2.id).unwrap().is_some());
    }
}
