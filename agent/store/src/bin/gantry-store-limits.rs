//! Measures this machine's limits for the snapshot benchmark, on the
//! allocated data of a real image: reading it, blake3 and zstd throughput
//! per chunk on N threads, and writing that data to disk with an fsync,
//! through the page cache and with `O_DIRECT` (the floors of a durable
//! restore). Usage:
//! `gantry-store-limits IMAGE [--threads N] [--chunk-size BYTES] [--levels 1,3] [--write-dir DIR]`

use anyhow::{bail, Context};
use gantry_store::image::ImageSource;
use std::time::Instant;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn par<F: Fn(&[u8]) -> usize + Sync>(chunks: &[Vec<u8>], threads: usize, f: F) -> (f64, usize) {
    let t = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut acc = 0;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(c) = chunks.get(i) else { break };
                        acc += f(c);
                    }
                    acc
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("worker")).sum()
    });
    (t.elapsed().as_secs_f64(), out)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(image) = args.get(1) else {
        bail!("usage: gantry-store-limits IMAGE [--threads N] [--chunk-size B] [--levels 1,3] [--write-dir DIR]")
    };
    let threads: usize = arg(&args, "--threads")
        .map_or(Ok(2), |s| s.parse())
        .context("--threads")?;
    let cs: usize = arg(&args, "--chunk-size")
        .map_or(Ok(1 << 20), |s| s.parse())
        .context("--chunk-size")?;
    let levels: Vec<i32> = arg(&args, "--levels")
        .unwrap_or_else(|| "1,3".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("--levels")?;
    let img = ImageSource::open(std::path::Path::new(image))?;
    let size = img.virtual_size();
    let t = Instant::now();
    let mut chunks = Vec::new();
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(cs as u64) as usize;
        if img.has_data(off, len as u64) {
            let mut b = vec![0u8; len];
            img.read(off, &mut b)?;
            if b.iter().any(|x| *x != 0) {
                chunks.push(b);
            }
        }
        off += len as u64;
    }
    let read_s = t.elapsed().as_secs_f64();
    let bytes: usize = chunks.iter().map(Vec::len).sum();
    let gb = bytes as f64 / 1e9;
    println!(
        "allocated non-zero data: {:.3} GB in {} chunks of {cs}",
        gb,
        chunks.len()
    );
    println!("read (1 thread, page cache): {:.2} GB/s", gb / read_s);
    let (s, _) = par(&chunks, threads, |c| blake3::hash(c).as_bytes()[0] as usize);
    println!("blake3 ({threads} threads): {:.2} GB/s", gb / s);
    for level in levels {
        let (s, out) = par(&chunks, threads, |c| {
            zstd::bulk::compress(c, level).expect("zstd").len()
        });
        println!(
            "zstd level {level} ({threads} threads): {:.2} GB/s, ratio {:.3} ({:.3} GB)",
            gb / s,
            out as f64 / bytes as f64,
            out as f64 / 1e9
        );
    }
    if let Some(dir) = arg(&args, "--write-dir") {
        let dir = std::path::Path::new(&dir);
        let s = write_synced(dir, &chunks, false)?;
        println!(
            "write + fsync (1 thread, page cache, to {}): {:.2} GB/s",
            dir.display(),
            gb / s
        );
        let s = write_synced(dir, &chunks, true)?;
        println!(
            "write + fsync (1 thread, O_DIRECT, to {}): {:.2} GB/s",
            dir.display(),
            gb / s
        );
    }
    Ok(())
}

/// Seconds to write `chunks` into a new file in `dir` and fsync it, with
/// `direct`: in 4 KiB-aligned blocks with `O_DIRECT`.
fn write_synced(dir: &std::path::Path, chunks: &[Vec<u8>], direct: bool) -> anyhow::Result<f64> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const ALIGN: usize = 4096;
    let path = dir.join(".gantry-store-limits.tmp");
    let mut buf = vec![0u8; chunks.iter().map(Vec::len).max().unwrap_or(0) + 2 * ALIGN];
    let at = buf.as_ptr().align_offset(ALIGN);
    let t = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    for c in chunks {
        if direct {
            let n = c.len().next_multiple_of(ALIGN);
            buf[at..at + c.len()].copy_from_slice(c);
            buf[at + c.len()..at + n].fill(0);
            f.write_all(&buf[at..at + n])?;
        } else {
            f.write_all(c)?;
        }
    }
    f.sync_all()?;
    let s = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(s)
}
