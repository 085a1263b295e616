//! The `gantry-agent snapshot <create|restore|verify|list|delete|gc|stats>`
//! command line. The agent binary forwards its `snapshot` subcommand here.

use crate::store::{parse_extents, CreateRequest, Progress, RestoreFormat, Store, StoreConfig};
use crate::{CompactReport, Keyring};
use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

/// Default keyring location of the agent.
pub const DEFAULT_KEYRING: &str = "/var/lib/gantry/store-keys.json";

/// Options every subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Store location: a directory, file:///dir or s3://bucket/prefix (S3
    /// endpoint and credentials from the AWS_* environment variables).
    #[arg(long, env = "GANTRY_SNAPSHOT_STORE")]
    pub store: String,
    /// Keyring holding the per-account chunk keys.
    #[arg(long, env = "GANTRY_STORE_KEYRING", default_value = DEFAULT_KEYRING)]
    pub keyring: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Restore output format.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum OutFormat {
    Raw,
    Qcow2,
}

/// `gantry-agent snapshot` subcommands.
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot a raw or qcow2 image into the store.
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// Image to snapshot (raw, or qcow2 with its backing chain).
        #[arg(long)]
        image: PathBuf,
        /// Human name of the snapshot.
        #[arg(long)]
        name: String,
        /// Owning account; without it the snapshot is a public image.
        #[arg(long)]
        owner: Option<String>,
        /// Parent snapshot to reuse unchanged chunks from.
        #[arg(long)]
        parent: Option<String>,
        /// Ranges changed since the parent: "OFFSET LENGTH" lines or JSON
        /// (e.g. `qemu-img map --output=json` of the overlay).
        #[arg(long, requires = "parent")]
        changed_extents: Option<PathBuf>,
        /// Chunk size in bytes (power of two, 4 KiB - 64 MiB).
        #[arg(long)]
        chunk_size: Option<u32>,
        /// zstd level chunks rest at (after compaction).
        #[arg(long)]
        zstd_level: Option<i32>,
        /// zstd level new chunks are written at before the snapshot is
        /// published; below --zstd-level, `compact` recompresses them later.
        #[arg(long)]
        publish_level: Option<i32>,
        /// log2 of zstd's hash table size (0: the level's own).
        #[arg(long)]
        zstd_hash_log: Option<u32>,
        /// Compact right after publishing, so the command ends with the
        /// chunks at --zstd-level.
        #[arg(long)]
        compact: bool,
    },
    /// Rebuild a snapshot's disk, checking every chunk.
    Restore {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
    },
    /// Re-hash every chunk; exit non-zero when anything is damaged.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List snapshots.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a snapshot (its chunks are freed by gc).
    Delete {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        id: String,
    },
    /// Recompress chunks written at the publish level to the level at rest.
    Compact {
        #[command(flatten)]
        store: StoreArgs,
        /// zstd level at rest.
        #[arg(long)]
        zstd_level: Option<i32>,
    },
    /// Remove chunks no snapshot references.
    Gc {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Sizes per snapshot and per account.
    Stats {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Tuning a subcommand overrides.
#[derive(Default)]
struct Tuning {
    chunk: Option<u32>,
    level: Option<i32>,
    publish: Option<i32>,
    hash_log: Option<u32>,
}

fn open(a: &StoreArgs, create: bool, t: Tuning) -> anyhow::Result<Store> {
    let keyring = Keyring::load(&a.keyring)?;
    let mut cfg = StoreConfig {
        keyring: Arc::new(keyring),
        create_if_missing: create,
        ..StoreConfig::default()
    };
    if let Some(t) = a.threads {
        cfg.threads = t.max(1);
    }
    if let Some(c) = t.chunk {
        cfg.chunk_size = c;
    }
    if let Some(l) = t.level {
        cfg.zstd_level = l;
    }
    if let Some(l) = t.publish {
        cfg.publish_level = l;
    }
    if let Some(h) = t.hash_log {
        cfg.zstd_hash_log = h;
    }
    Ok(Store::open(&a.store, cfg)?)
}

fn bar(json: bool, what: &str) -> Option<ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .expect("template")
    .progress_chars("=> ");
    b.set_style(style);
    b.set_message(what.to_string());
    Some(b)
}

/// A progress callback that moves `pb` (when there is one).
fn follow(pb: &Option<ProgressBar>) -> impl Fn(Progress) + Sync + '_ {
    move |p: Progress| {
        if let Some(b) = pb {
            b.set_length(p.total);
            b.set_position(p.done);
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

/// Runs one `snapshot` subcommand.
pub fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        c @ SnapshotCommand::Create { .. } => create_cmd(c),
        c @ SnapshotCommand::Restore { .. } => restore_cmd(c),
        c @ SnapshotCommand::Verify { .. } => verify_cmd(c),
        c @ SnapshotCommand::List { .. } => list_cmd(c),
        c @ SnapshotCommand::Delete { .. } => delete_cmd(c),
        c @ SnapshotCommand::Gc { .. } => gc_cmd(c),
        c @ SnapshotCommand::Compact { .. } => compact_cmd(c),
        c @ SnapshotCommand::Stats { .. } => stats_cmd(c),
    }
}

fn create_cmd(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let SnapshotCommand::Create {
        store,
        image,
        name,
        owner,
        parent,
        changed_extents,
        chunk_size,
        zstd_level,
        publish_level,
        zstd_hash_log,
        compact,
    } = cmd
    else {
        unreachable!("dispatched by run")
    };
    let extents = changed_extents
        .map(|p| {
            let t = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            anyhow::Ok(parse_extents(&t)?)
        })
        .transpose()?;
    let tuning = Tuning {
        chunk: chunk_size,
        level: zstd_level,
        publish: publish_level,
        hash_log: zstd_hash_log,
    };
    let s = open(&store, true, tuning)?;
    let pb = bar(store.json, "snapshot");
    let cb = follow(&pb);
    let req = CreateRequest {
        image: &image,
        name: &name,
        owner: owner.as_deref(),
        parent: parent.as_deref(),
        changed_extents: extents.as_deref(),
        progress: Some(&cb),
        id: None,
    };
    let mut info = s.create(&req)?;
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    if compact {
        run_compact(&s, store.json)?;
        if let Some(now) = s.list()?.into_iter().find(|i| i.id == info.id) {
            // What compaction saved came out of the chunks this create wrote
            // (and those of parents still waiting for compaction).
            let saved = info.stored_bytes.saturating_sub(now.stored_bytes);
            info.new_bytes = info.new_bytes.saturating_sub(saved);
            info.stored_bytes = now.stored_bytes;
        }
    }
    if store.json {
        return print_json(&info);
    }
    println!(
        "created {} ({}): logical {}, allocated {}, stored {}, new {}",
        info.id,
        info.name,
        mib(info.logical_size),
        mib(info.allocated_size),
        mib(info.stored_bytes),
        mib(info.new_bytes)
    );
    Ok(())
}

fn restore_cmd(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let SnapshotCommand::Restore {
        store,
        id,
        out,
        format,
    } = cmd
    else {
        unreachable!("dispatched by run")
    };
    let s = open(&store, false, Tuning::default())?;
    let pb = bar(store.json, "restore");
    let cb = follow(&pb);
    let fmt = match format {
        OutFormat::Raw => RestoreFormat::Raw,
        OutFormat::Qcow2 => RestoreFormat::Qcow2,
    };
    let info = s.restore(&id, &out, fmt, Some(&cb))?;
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    if store.json {
        return print_json(&info);
    }
    println!(
        "restored {} to {} ({})",
        info.id,
        out.display(),
        mib(info.logical_size)
    );
    Ok(())
}

fn verify_cmd(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let SnapshotCommand::Verify { store } = cmd else {
        unreachable!("dispatched by run")
    };
    let s = open(&store, false, Tuning::default())?;
    let r = s.verify(None)?;
    if store.json {
        print_json(&r)?;
    } else {
        println!(
            "{} snapshots, {} chunks checked",
            r.snapshots, r.chunks_checked
        );
        for p in r.corrupt.iter().chain(&r.missing) {
            println!(
                "{} chunk {}/{}: needed by {}",
                p.reason,
                p.namespace,
                p.chunk,
                p.snapshots.join(", ")
            );
        }
        for m in &r.bad_manifests {
            println!("unreadable manifest {}: {}", m.snapshot, m.reason);
        }
        for ns in &r.unverifiable_namespaces {
            println!("not checked (no key in keyring): {ns}");
        }
    }
    if !r.is_ok() {
        bail!(
            "store is damaged: {} corrupt and {} missing chunks, {} unreadable manifests; broken snapshots: {}",
            r.corrupt.len(),
            r.missing.len(),
            r.bad_manifests.len(),
            r.broken_snapshots().join(", ")
        );
    }
    Ok(())
}

fn list_cmd(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let SnapshotCommand::List { store } = cmd else {
        unreachable!("dispatched by run")
    };
    let s = open(&store, false, Tuning::default())?;
    let list = s.list()?;
    if store.json {
        return print_json(&list);
    }
    for i in list {
        let owner = i.owner.as_deref().unwrap_or("public");
        println!(
            "{}  {}  {}  {}  {}",
            i.id,
            i.created_at.format("%F %T"),
            owner,
            mib(i.logical_size),
            i.name
        );
    }
    Ok(())
}

fn delete_cmd(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let SnapshotCommand::Delete { store, id } = cmd else {
        unreachable!("dispatched by run")
    };
    open(&store, false, Tuning::default())?.delete(&id)?;
    if store.json {
        return print_json(&serde_json::json!({ "deleted": id }));
    }
    println!("deleted {id}");
    Ok(())
}

fn run_compact(s: &Store, json: bool) -> anyhow::Result<CompactReport> {
    let pb = bar(json, "compact");
    if let Some(b) = &pb {
        b.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} chunks eta {eta}")
                .expect("template")
                .progress_chars("=> "),
        );
    }
    let cb = follow(&pb);
    let r = s.compact(Some(&cb))?;
    if let Some(b) = &pb {
        b.finish_and_clear();
    }
    Ok(r)
}

fn compact_cmd(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let SnapshotCommand::Compact { store, zstd_level } = cmd else {
        unreachable!("dispatched by run")
    };
    let tuning = Tuning {
        level: zstd_level,
        ..Tuning::default()
    };
    let r = run_compact(&open(&store, false, tuning)?, store.json)?;
    if store.json {
        return print_json(&r);
    }
    println!(
        "compacted {} snapshots: {} chunks, {} rewritten, {} -> {}{}",
        r.snapshots,
        r.chunks,
        r.rewritten,
        mib(r.bytes_before),
        mib(r.bytes_after),
        match r.waiting {
            0 => String::new(),
            n => format!(", {n} still being created"),
        }
    );
    for p in &r.problems {
        println!("left as is: {p}");
    }
    if !r.problems.is_empty() {
        bail!("{} chunks failed their check; run verify", r.problems.len());
    }
    Ok(())
}

fn gc_cmd(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let SnapshotCommand::Gc { store } = cmd else {
        unreachable!("dispatched by run")
    };
    let r = open(&store, false, Tuning::default())?.gc()?;
    if store.json {
        return print_json(&r);
    }
    println!(
        "deleted {} chunks ({}), kept {}",
        r.deleted_chunks,
        mib(r.deleted_bytes),
        r.kept_chunks
    );
    Ok(())
}

fn stats_cmd(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let SnapshotCommand::Stats { store } = cmd else {
        unreachable!("dispatched by run")
    };
    let r = open(&store, false, Tuning::default())?.stats()?;
    if store.json {
        return print_json(&r);
    }
    for sn in &r.snapshots {
        let i = &sn.info;
        println!(
            "{}  logical {}  stored {}  unique {}  {}",
            i.id,
            mib(i.logical_size),
            mib(i.stored_bytes),
            mib(sn.unique_bytes),
            i.name
        );
    }
    for o in &r.owners {
        let owner = o.owner.as_deref().unwrap_or("public");
        println!(
            "owner {owner}: {} snapshots, billed {}",
            o.snapshots,
            mib(o.billed_bytes)
        );
    }
    println!(
        "store: {} chunk objects, {}, garbage {}",
        r.chunk_objects,
        mib(r.stored_bytes),
        mib(r.garbage_bytes)
    );
    Ok(())
}
