//! On-disk formats of the store: chunk objects, snapshot manifests and the
//! store marker. Every object starts with a magic and a format version so a
//! reader can refuse what it does not understand.
//!
//! Chunk object (`chunks/<namespace>/<xx>/<64 hex>`), version 1:
//! ```text
//! 0   8  magic  b"GNTYCHNK"
//! 8   2  version (u16 LE) = 1
//! 10  1  codec: 0 = stored, 1 = zstd
//! 11  1  reserved (0)
//! 12  4  raw length (u32 LE)
//! 16  .. payload (raw bytes, or one zstd frame)
//! ```
//! The object name is the chunk id: blake3 of the raw bytes, keyed with the
//! namespace's key (unkeyed for the public namespace).
//!
//! Snapshot manifest (`snapshots/<snap-id>`), version 1:
//! ```text
//! 0   8  magic  b"GNTYSNAP"
//! 8   2  version (u16 LE) = 1
//! 10  2  reserved (0)
//! 12  4  header length H (u32 LE, <= 64 KiB)
//! 16  H  header: JSON `SnapshotMeta`
//! ..  8  entry count N (u64 LE) = ceil(virtual_size / chunk_size)
//! ..     N entries: tag u8 (0 zero, 1 owner namespace, 2 public namespace);
//!        tags 1 and 2 are followed by the 32-byte chunk id and the stored
//!        object size (u32 LE)
//! ..  32 blake3 of every byte before it
//! ```
//!
//! Compaction queue (`compact/<snap-id>`), version 1: the chunks a create
//! wrote at the fast publish level, to be recompressed at the store's
//! level at rest (see `compact.rs`). Written durably before the manifest.
//! ```text
//! 0   8  magic  b"GNTYCMPQ"
//! 8   2  version (u16 LE) = 1
//! 10  2  reserved (0)
//! 12  4  namespace name length L (u32 LE, <= 256)
//! 16  L  namespace directory name (`public` or `acct-<owner>`)
//! ..  8  chunk count N (u64 LE)
//! ..  32*N chunk ids
//! ..  32 blake3 of every byte before it
//! ```

use serde::{Deserialize, Serialize};
use std::fmt;

/// Magic at the start of every chunk object.
pub const CHUNK_MAGIC: &[u8; 8] = b"GNTYCHNK";
/// Current chunk object version.
pub const CHUNK_VERSION: u16 = 1;
/// Size of the chunk object header.
pub const CHUNK_HEADER_LEN: usize = 16;
/// Magic at the start of every manifest.
pub const MANIFEST_MAGIC: &[u8; 8] = b"GNTYSNAP";
/// Current manifest version.
pub const MANIFEST_VERSION: u16 = 1;
/// Largest accepted manifest header.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Smallest and largest accepted chunk sizes.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest accepted chunk size.
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;
/// Magic at the start of every compaction queue.
pub const QUEUE_MAGIC: &[u8; 8] = b"GNTYCMPQ";
/// Current compaction queue version.
pub const QUEUE_VERSION: u16 = 1;
/// Longest namespace name a queue may hold.
const MAX_QUEUE_NS_LEN: usize = 256;
/// Codec byte: payload stored as is.
pub const CODEC_STORED: u8 = 0;
/// Codec byte: payload is one zstd frame.
pub const CODEC_ZSTD: u8 = 1;

/// Errors decoding an on-disk object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("bad magic: not a gantry {0}")]
    BadMagic(&'static str),
    #[error("unsupported {what} format version {version}")]
    Version { what: &'static str, version: u16 },
    #[error("manifest checksum mismatch")]
    Checksum,
    #[error("invalid manifest header: {0}")]
    Header(String),
    #[error("invalid manifest: {0}")]
    Invalid(String),
    #[error("invalid chunk: {0}")]
    Chunk(String),
}

/// A chunk id: 32 bytes of (keyed) blake3.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Parses 64 lowercase hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let h = blake3::Hash::from_hex(s).ok()?;
        (s.len() == 64 && s.bytes().all(|b| !b.is_ascii_uppercase())).then(|| Self(*h.as_bytes()))
    }
    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

/// Which namespace a manifest entry points into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// The snapshot owner's namespace (the public one for public snapshots).
    Own,
    /// The shared public namespace.
    Public,
}

/// One chunk-sized slice of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// All zero (or a hole); nothing stored.
    Zero,
    /// Stored chunk.
    Chunk {
        space: Space,
        id: ChunkId,
        stored_len: u32,
    },
}

/// Snapshot metadata kept in the manifest header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub id: String,
    pub name: String,
    /// Owning account; `None` for public (admin) images.
    pub owner: Option<String>,
    pub parent: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub virtual_size: u64,
    pub chunk_size: u32,
    pub zstd_level: i32,
    pub source_format: String,
    /// Bytes in non-zero chunks.
    pub allocated_bytes: u64,
}

/// A snapshot manifest: metadata plus one entry per chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub meta: SnapshotMeta,
    pub entries: Vec<Entry>,
}

/// Number of chunks needed to cover `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

impl Manifest {
    /// Serializes to the version-1 byte layout.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.meta).expect("meta serializes");
        let mut out = Vec::with_capacity(64 + header.len() + self.entries.len() * 37);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            match e {
                Entry::Zero => out.push(0),
                Entry::Chunk {
                    space,
                    id,
                    stored_len,
                } => {
                    out.push(if *space == Space::Own { 1 } else { 2 });
                    out.extend_from_slice(&id.0);
                    out.extend_from_slice(&stored_len.to_le_bytes());
                }
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses and validates a manifest; any malformed input is an error.
    pub fn decode(data: &[u8]) -> Result<Self, FormatError> {
        let body = unseal(data, MANIFEST_MAGIC, MANIFEST_VERSION, "manifest")?;
        let mut r = Reader { buf: body, pos: 12 };
        let hlen = r.u32()? as usize;
        if hlen > MAX_HEADER_LEN {
            return Err(FormatError::Header("header too long".into()));
        }
        let meta: SnapshotMeta = serde_json::from_slice(r.take(hlen)?)
            .map_err(|e| FormatError::Header(e.to_string()))?;
        validate_meta(&meta)?;
        let count = r.u64()?;
        if count != chunk_count(meta.virtual_size, meta.chunk_size) {
            return Err(FormatError::Invalid(format!(
                "{count} entries for a {} byte disk",
                meta.virtual_size
            )));
        }
        if count > (body.len() as u64) {
            return Err(FormatError::Truncated("manifest entries"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let tag = r.take(1)?[0];
            let entry = match tag {
                0 => Entry::Zero,
                1 | 2 => {
                    let id = ChunkId(r.take(32)?.try_into().expect("32 bytes"));
                    let stored_len = r.u32()?;
                    let space = if tag == 1 { Space::Own } else { Space::Public };
                    Entry::Chunk {
                        space,
                        id,
                        stored_len,
                    }
                }
                t => return Err(FormatError::Invalid(format!("unknown entry tag {t}"))),
            };
            entries.push(entry);
        }
        if r.pos != body.len() {
            return Err(FormatError::Invalid("trailing bytes".into()));
        }
        Ok(Self { meta, entries })
    }
}

/// Checks the magic, version and trailing blake3 of a sealed object
/// (manifest or compaction queue); returns the bytes before the checksum.
fn unseal<'a>(
    data: &'a [u8],
    magic: &[u8; 8],
    version: u16,
    what: &'static str,
) -> Result<&'a [u8], FormatError> {
    if data.len() < 16 + 8 + 32 {
        return Err(FormatError::Truncated(what));
    }
    if &data[..8] != magic {
        return Err(FormatError::BadMagic(what));
    }
    let found = u16::from_le_bytes([data[8], data[9]]);
    if found != version {
        return Err(FormatError::Version {
            what,
            version: found,
        });
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(FormatError::Checksum);
    }
    Ok(body)
}

fn validate_meta(m: &SnapshotMeta) -> Result<(), FormatError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&m.chunk_size) || !m.chunk_size.is_power_of_two()
    {
        return Err(FormatError::Header(format!(
            "chunk size {} out of range",
            m.chunk_size
        )));
    }
    if m.id.parse::<gantry_proto::SnapshotId>().is_err() {
        return Err(FormatError::Header(format!("bad snapshot id {:?}", m.id)));
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(FormatError::Truncated("manifest"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

/// Chunks of one namespace waiting to be recompressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactQueue {
    /// Directory name of the namespace (`Namespace::dir`).
    pub namespace: String,
    pub chunks: Vec<ChunkId>,
}

impl CompactQueue {
    /// Serializes to the version-1 byte layout.
    pub fn encode(&self) -> Vec<u8> {
        let ns = self.namespace.as_bytes();
        let mut out = Vec::with_capacity(64 + ns.len() + self.chunks.len() * 32);
        out.extend_from_slice(QUEUE_MAGIC);
        out.extend_from_slice(&QUEUE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(ns.len() as u32).to_le_bytes());
        out.extend_from_slice(ns);
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.0);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses and validates a queue; any malformed input is an error.
    pub fn decode(data: &[u8]) -> Result<Self, FormatError> {
        let body = unseal(data, QUEUE_MAGIC, QUEUE_VERSION, "compaction queue")?;
        let mut r = Reader { buf: body, pos: 12 };
        let ns_len = r.u32()? as usize;
        if ns_len > MAX_QUEUE_NS_LEN {
            return Err(FormatError::Invalid("namespace name too long".into()));
        }
        let namespace = std::str::from_utf8(r.take(ns_len)?)
            .map_err(|_| FormatError::Invalid("namespace name is not UTF-8".into()))?
            .to_string();
        let count = r.u64()?;
        if count.checked_mul(32) != Some((body.len() - r.pos) as u64) {
            return Err(FormatError::Invalid(format!(
                "{count} chunk ids do not fit"
            )));
        }
        let chunks = (0..count)
            .map(|_| Ok(ChunkId(r.take(32)?.try_into().expect("32 bytes"))))
            .collect::<Result<_, FormatError>>()?;
        Ok(Self { namespace, chunks })
    }
}

/// Builds a chunk object around an already-encoded payload.
pub fn chunk_header(codec: u8, raw_len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..8].copy_from_slice(CHUNK_MAGIC);
    h[8..10].copy_from_slice(&CHUNK_VERSION.to_le_bytes());
    h[10] = codec;
    h[12..16].copy_from_slice(&raw_len.to_le_bytes());
    h
}

/// Parses a chunk object header: returns (codec, raw length, payload).
pub fn parse_chunk(data: &[u8]) -> Result<(u8, u32, &[u8]), FormatError> {
    if data.len() < CHUNK_HEADER_LEN {
        return Err(FormatError::Truncated("chunk"));
    }
    if &data[..8] != CHUNK_MAGIC {
        return Err(FormatError::BadMagic("chunk"));
    }
    let version = u16::from_le_bytes([data[8], data[9]]);
    if version != CHUNK_VERSION {
        return Err(FormatError::Version {
            what: "chunk",
            version,
        });
    }
    let codec = data[10];
    if codec > CODEC_ZSTD {
        return Err(FormatError::Chunk(format!("unknown codec {codec}")));
    }
    let raw_len = u32::from_le_bytes(data[12..16].try_into().expect("4"));
    if raw_len > MAX_CHUNK_SIZE {
        return Err(FormatError::Chunk(format!("raw length {raw_len} too big")));
    }
    Ok((codec, raw_len, &data[CHUNK_HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest {
            meta: SnapshotMeta {
                id: gantry_proto::SnapshotId::new().to_string(),
                name: "n".into(),
                owner: Some("acct".into()),
                parent: None,
                created_at: chrono::Utc::now(),
                virtual_size: 3 * 65536 + 5,
                chunk_size: 65536,
                zstd_level: 3,
                source_format: "raw".into(),
                allocated_bytes: 65536,
            },
            entries: vec![
                Entry::Zero,
                Entry::Chunk {
                    space: Space::Own,
                    id: ChunkId([7; 32]),
                    stored_len: 99,
                },
                Entry::Chunk {
                    space: Space::Public,
                    id: ChunkId([9; 32]),
                    stored_len: 12,
                },
                Entry::Zero,
            ],
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn wrong_entry_count_is_refused() {
        let mut m = sample();
        m.entries.pop();
        let err = Manifest::decode(&m.encode()).unwrap_err();
        assert!(err.to_string().contains("entries"), "{err}");
    }

    #[test]
    fn chunk_id_hex_round_trips_and_rejects_junk() {
        let id = ChunkId([0xab; 32]);
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex("xyz"), None);
        assert_eq!(ChunkId::from_hex(&id.to_hex().to_uppercase()), None);
    }

    #[test]
    fn compaction_queue_round_trips_and_refuses_damage() {
        let q = CompactQueue {
            namespace: "acct-a1".into(),
            chunks: vec![ChunkId([1; 32]), ChunkId([2; 32])],
        };
        let data = q.encode();
        assert_eq!(CompactQueue::decode(&data).unwrap(), q);
        for p in 0..data.len() {
            let mut bad = data.clone();
            bad[p] ^= 0x40;
            assert!(CompactQueue::decode(&bad).is_err(), "flip at {p} accepted");
        }
        let err = CompactQueue::decode(&data[..data.len() - 1]).unwrap_err();
        assert_eq!(err, FormatError::Checksum);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Manifest::decode(&data);
            let _ = parse_chunk(&data);
            let _ = CompactQueue::decode(&data);
        }

        #[test]
        fn mutated_manifests_are_refused_or_equal(pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
            let good = sample().encode();
            let mut bad = good.clone();
            let p = pos % bad.len();
            bad[p] ^= byte | 1;
            prop_assert!(Manifest::decode(&bad).is_err());
            let short = &good[..cut % good.len()];
            prop_assert!(Manifest::decode(short).is_err());
        }

        #[test]
        fn mutated_bodies_with_fixed_checksum_never_panic(pos in any::<usize>(), byte in any::<u8>()) {
            // Re-seal the checksum so the parser's structural checks are exercised.
            let good = sample().encode();
            let mut body = good[..good.len() - 32].to_vec();
            let p = pos % body.len();
            body[p] = byte;
            let sum = blake3::hash(&body);
            body.extend_from_slice(sum.as_bytes());
            let _ = Manifest::decode(&body);
        }
    }
}
