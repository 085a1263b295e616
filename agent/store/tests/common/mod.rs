//! Helpers for the gantry-store integration tests: running the CLI binary
//! (the same code `gantry-agent snapshot` runs) and building test images.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const MIB: u64 = 1024 * 1024;

/// A scratch area with its own keyring and local store.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn store(&self) -> String {
        self.path("store").display().to_string()
    }
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gantry-snapshot"));
        c.args(args)
            .env("GANTRY_STORE_KEYRING", self.path("keys.json"))
            .env_remove("GANTRY_SNAPSHOT_STORE");
        c
    }
    /// Runs the CLI and returns its output (whatever the exit status).
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run gantry-snapshot")
    }
    /// Runs the CLI, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).expect("utf8")
    }
    /// Runs the CLI, asserting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "{args:?} unexpectedly succeeded");
        String::from_utf8(o.stderr).expect("utf8")
    }
    /// `create --json` and returns the parsed result.
    pub fn create(&self, store: &str, image: &Path, extra: &[&str]) -> serde_json::Value {
        let img = image.display().to_string();
        let mut args = vec![
            "create", "--store", store, "--image", &img, "--name", "t", "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.ok(&args)).expect("create json")
    }
    /// `restore --id ID --out OUT [extra...]`, asserting success.
    pub fn restore(&self, store: &str, id: &str, out: &Path, extra: &[&str]) -> String {
        let out = out.display().to_string();
        let mut args = vec!["restore", "--store", store, "--id", id, "--out", &out];
        args.extend_from_slice(extra);
        self.ok(&args)
    }
    pub fn list(&self, store: &str) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["list", "--store", store, "--json"])).expect("list json")
    }
    pub fn verify(&self, store: &str) -> serde_json::Value {
        let o = self.run(&["verify", "--store", store, "--json"]);
        serde_json::from_slice(&o.stdout).expect("verify json")
    }
}

/// Deterministic pseudo-random bytes (xorshift), incompressible.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Compressible text-like bytes.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "gantry ",
        "snapshot ",
        "chunk ",
        "disk ",
        "qemu ",
        "\n",
        "zstd ",
        "blake3 ",
    ];
    let r = noise(seed, len);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(words[(r[i % len] % 8) as usize].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// A sparse raw image: `size` bytes with the given (offset, data) writes.
pub fn raw_image(path: &Path, size: u64, writes: &[(u64, Vec<u8>)]) {
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("set_len");
    for (off, data) in writes {
        f.write_all_at(data, *off).expect("write");
    }
    f.sync_all().expect("sync");
}

/// Runs a host tool, asserting success.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Allocated bytes of a file.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

pub fn id_of(v: &serde_json::Value) -> String {
    v["id"].as_str().expect("id").to_string()
}
