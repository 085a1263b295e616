//! Changed-extent lists: the byte ranges of a guest disk that changed
//! since the parent snapshot (from a dirty bitmap or `qemu-img map`), as
//! an incremental snapshot reads them.

use crate::store::StoreError;
use serde::{Deserialize, Serialize};

/// A byte range of the guest disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// Parses a changed-extent list: JSON (`[{"offset":..,"length":..}]`, or
/// the `qemu-img map --output=json` output of an overlay, whose entries
/// from backing files (`depth` > 0) are skipped) or lines of
/// `OFFSET LENGTH` (decimal bytes, `#` comments).
pub fn parse_extents(text: &str) -> Result<Vec<Extent>, StoreError> {
    let bad = |reason: String| StoreError::Invalid {
        field: "changed extents",
        reason,
    };
    let t = text.trim_start();
    if t.starts_with('[') {
        #[derive(Deserialize)]
        struct J {
            offset: Option<u64>,
            start: Option<u64>,
            length: u64,
            depth: Option<u64>,
        }
        let items: Vec<J> = serde_json::from_str(t).map_err(|e| bad(e.to_string()))?;
        return items
            .into_iter()
            .filter(|j| j.depth.unwrap_or(0) == 0)
            .map(|j| match (j.start, j.offset) {
                (Some(s), _) => Ok(Extent {
                    offset: s,
                    length: j.length,
                }),
                (None, Some(o)) => Ok(Extent {
                    offset: o,
                    length: j.length,
                }),
                (None, None) => Err(bad("an entry has neither offset nor start".into())),
            })
            .collect();
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut it = line.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next(), it.next()) {
            (Some(Ok(offset)), Some(Ok(length)), None) => out.push(Extent { offset, length }),
            _ => return Err(bad(format!("line {}: expected \"OFFSET LENGTH\"", n + 1))),
        }
    }
    Ok(out)
}
