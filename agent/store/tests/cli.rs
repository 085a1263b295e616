//! End-to-end tests of the snapshot command line on a local store: exact
//! round trips of raw and qcow2 images, incremental snapshots, owners and
//! billing figures, corruption, garbage collection and bad input.

mod common;
use common::*;

fn sample_image(env: &Env, name: &str) -> std::path::PathBuf {
    let p = env.path(name);
    raw_image(
        &p,
        24 * MIB + 12345,
        &[
            (0, text(1, 3 * MIB as usize)),
            (5 * MIB + 7, noise(2, 2 * MIB as usize)),
            (20 * MIB, text(3, 4 * MIB as usize + 12345)),
        ],
    );
    p
}

#[test]
fn raw_round_trip_is_exact_and_sparse() {
    let env = Env::new();
    let img = sample_image(&env, "disk.raw");
    let store = env.store();
    let snap = env.create(&store, &img, &["--chunk-size", "1048576"]);
    assert_eq!(snap["logical_size"], 24 * MIB + 12345);
    // Holes are recorded, not stored: 24 MiB disk, ~9 MiB of data.
    assert!(snap["zero_chunks"].as_u64().unwrap() >= 10, "{snap}");
    assert!(
        snap["stored_bytes"].as_u64().unwrap() < 6 * MIB,
        "text compresses: {snap}"
    );
    let out = env.path("out.raw");
    env.restore(&store, &id_of(&snap), &out, &[]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    assert!(allocated(&out) < 12 * MIB, "zeros restored as holes");
    let q = env.path("out.qcow2");
    env.restore(&store, &id_of(&snap), &q, &["--format", "qcow2"]);
    assert!(sh("qemu-img", &["info", q.to_str().unwrap()]).contains("file format: qcow2"));
    sh(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            img.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    assert!(env.verify(&store)["chunks_checked"].as_u64().unwrap() > 0);
}

#[test]
fn qcow2_chain_and_incremental_snapshot() {
    let env = Env::new();
    let base = sample_image(&env, "base.raw");
    let ov = env.path("overlay.qcow2");
    let (b, o) = (base.to_str().unwrap(), ov.to_str().unwrap());
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", b, o],
    );
    sh(
        "qemu-io",
        &[
            "-c",
            "write -P 0x5a 2M 1M",
            "-c",
            "write -z 21M 512k",
            "-c",
            "write -P 0x17 23M 64k",
            o,
        ],
    );
    let store = env.store();
    let parent = env.create(&store, &base, &[]);
    let full = env.create(&store, &ov, &[]);
    let map = sh("qemu-img", &["map", "--output=json", o]);
    std::fs::write(env.path("map.json"), map).unwrap();
    let inc = env.create(
        &store,
        &ov,
        &[
            "--parent",
            &id_of(&parent),
            "--changed-extents",
            env.path("map.json").to_str().unwrap(),
        ],
    );
    assert_eq!(inc["parent"], parent["id"]);
    assert!(inc["new_bytes"].as_u64().unwrap() <= full["new_bytes"].as_u64().unwrap());
    let flat = env.path("flat.raw");
    sh(
        "qemu-img",
        &["convert", "-O", "raw", o, flat.to_str().unwrap()],
    );
    for snap in [&full, &inc] {
        let out = env.path(&format!("{}.raw", id_of(snap)));
        env.restore(&store, &id_of(snap), &out, &[]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&flat).unwrap(),
            "snapshot {}",
            id_of(snap)
        );
    }
    // A plain "OFFSET LENGTH" list works too.
    std::fs::write(
        env.path("ext.txt"),
        format!(
            "# changed\n{} {}\n{} {}\n{} {}\n",
            2 * MIB,
            MIB,
            21 * MIB,
            512 * 1024,
            23 * MIB,
            65536
        ),
    )
    .unwrap();
    let inc2 = env.create(
        &store,
        &ov,
        &[
            "--parent",
            &id_of(&parent),
            "--changed-extents",
            env.path("ext.txt").to_str().unwrap(),
        ],
    );
    let out = env.path("inc2.raw");
    env.restore(&store, &id_of(&inc2), &out, &[]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&flat).unwrap());
}

#[test]
fn owners_never_share_chunks_and_are_billed_separately() {
    let env = Env::new();
    let img = sample_image(&env, "disk.raw");
    let store = env.store();
    let a1 = env.create(&store, &img, &["--owner", "alice"]);
    let a2 = env.create(&store, &img, &["--owner", "alice"]);
    assert_eq!(a2["new_bytes"], 0, "same data dedups inside one account");
    let b = env.create(&store, &img, &["--owner", "bob"]);
    assert_eq!(b["new_bytes"], a1["new_bytes"], "no dedup across accounts");
    let stats: serde_json::Value =
        serde_json::from_str(&env.ok(&["stats", "--store", &store, "--json"])).unwrap();
    let owners = stats["owners"].as_array().unwrap();
    let billed = |o: &str| {
        owners.iter().find(|x| x["owner"] == o).unwrap()["billed_bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(billed("alice"), a1["stored_bytes"].as_u64().unwrap());
    assert_eq!(billed("bob"), b["stored_bytes"].as_u64().unwrap());
    let snaps = stats["snapshots"].as_array().unwrap();
    let unique = |id: &serde_json::Value| {
        snaps.iter().find(|s| s["id"] == *id).unwrap()["unique_bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(unique(&a1["id"]), 0, "shared with alice's second snapshot");
    assert_eq!(unique(&b["id"]), b["stored_bytes"].as_u64().unwrap());
    // A public image is referenced, not copied, by an account's snapshot of the same data.
    let store2 = env.path("store2").display().to_string();
    let public = env.create(&store2, &img, &[]);
    let private = env.create(&store2, &img, &["--owner", "carol"]);
    assert!(public["new_bytes"].as_u64().unwrap() > 0);
    assert_eq!(private["new_bytes"], 0);
    let stats: serde_json::Value =
        serde_json::from_str(&env.ok(&["stats", "--store", &store2, "--json"])).unwrap();
    let carol = stats["owners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["owner"] == "carol")
        .unwrap()
        .clone();
    assert_eq!(carol["billed_bytes"], 0);
}

fn chunk_files(store: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(store).join("chunks")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

#[test]
fn flipped_byte_is_found_by_verify_and_refused_by_restore() {
    let env = Env::new();
    let img = sample_image(&env, "disk.raw");
    let store = env.store();
    let snap = env.create(&store, &img, &["--owner", "alice"]);
    let victim = chunk_files(&store).pop().unwrap();
    let mut data = std::fs::read(&victim).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x40;
    std::fs::write(&victim, data).unwrap();
    let chunk = victim.file_name().unwrap().to_str().unwrap().to_string();
    let err = env.fails(&["verify", "--store", &store]);
    assert!(
        err.contains("1 corrupt") && err.contains(&id_of(&snap)),
        "{err}"
    );
    let report = env.verify(&store);
    assert_eq!(report["corrupt"][0]["chunk"], chunk.as_str());
    let out = env.path("out.raw");
    let err = env.fails(&[
        "restore",
        "--store",
        &store,
        "--id",
        &id_of(&snap),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains(&chunk) && err.contains(&id_of(&snap)), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(env.dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".out"))
            .count(),
        0,
        "no temp output left"
    );
    // A missing chunk is reported too.
    std::fs::remove_file(&victim).unwrap();
    let report = env.verify(&store);
    assert_eq!(report["missing"][0]["snapshots"][0], snap["id"]);
}

#[test]
fn delete_and_gc_free_only_unreferenced_chunks() {
    let env = Env::new();
    let img = sample_image(&env, "disk.raw");
    let img2 = env.path("disk2.raw");
    raw_image(&img2, 8 * MIB, &[(0, noise(9, 4 * MIB as usize))]);
    let store = env.store();
    let keep = env.create(&store, &img, &["--chunk-size", "1048576"]);
    let gone = env.create(&store, &img2, &["--chunk-size", "1048576"]);
    let before = chunk_files(&store).len();
    env.ok(&["delete", "--store", &store, "--id", &id_of(&gone)]);
    assert_eq!(env.list(&store).len(), 1);
    let gc: serde_json::Value =
        serde_json::from_str(&env.ok(&["gc", "--store", &store, "--json"])).unwrap();
    assert_eq!(gc["deleted_chunks"].as_u64().unwrap(), 4);
    assert_eq!(chunk_files(&store).len(), before - 4);
    let out = env.path("out.raw");
    env.restore(&store, &id_of(&keep), &out, &[]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    let err = env.fails(&["delete", "--store", &store, "--id", &id_of(&gone)]);
    assert!(err.contains("unknown snapshot"), "{err}");
}

#[test]
fn bad_input_gives_clear_errors_and_changes_nothing() {
    let env = Env::new();
    let img = sample_image(&env, "disk.raw");
    let store = env.store();
    let snap = env.create(&store, &img, &[]);
    let i = img.to_str().unwrap();
    let missing = env.path("nope.raw");
    let vmdk = env.path("d.vmdk");
    let absent = env.path("absent");
    std::fs::write(&vmdk, b"KDMV\x01\0\0\0junk").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "create",
                "--store",
                &store,
                "--image",
                missing.to_str().unwrap(),
                "--name",
                "x",
            ],
            "cannot open image",
        ),
        (
            vec![
                "create",
                "--store",
                &store,
                "--image",
                vmdk.to_str().unwrap(),
                "--name",
                "x",
            ],
            "unsupported format vmdk",
        ),
        (
            vec!["create", "--store", &store, "--image", i, "--name", ""],
            "invalid name",
        ),
        (
            vec![
                "create", "--store", &store, "--image", i, "--name", "x", "--owner", "../evil",
            ],
            "invalid owner",
        ),
        (
            vec![
                "create",
                "--store",
                &store,
                "--image",
                i,
                "--name",
                "x",
                "--parent",
                "snap-00000000000000000000000000000000",
            ],
            "unknown snapshot",
        ),
        (
            vec![
                "create",
                "--store",
                "ftp://host/x",
                "--image",
                i,
                "--name",
                "x",
            ],
            "invalid",
        ),
        (
            vec![
                "create",
                "--store",
                &store,
                "--image",
                i,
                "--name",
                "x",
                "--chunk-size",
                "1000",
            ],
            "chunk size",
        ),
        (
            vec![
                "restore",
                "--store",
                &store,
                "--id",
                "snap-00000000000000000000000000000000",
                "--out",
                "/tmp/x",
            ],
            "unknown snapshot",
        ),
        (
            vec![
                "restore",
                "--store",
                &store,
                "--id",
                "../../etc/passwd",
                "--out",
                "/tmp/x",
            ],
            "invalid snapshot id",
        ),
        (
            vec!["list", "--store", absent.to_str().unwrap()],
            "does not exist",
        ),
        (vec!["list", "--store", "s3://"], "invalid"),
    ];
    for (args, want) in cases {
        let err = env.fails(&args);
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    let extents = env.path("bad-extents.txt");
    std::fs::write(&extents, "12 abc\n").unwrap();
    let err = env.fails(&[
        "create",
        "--store",
        &store,
        "--image",
        i,
        "--name",
        "x",
        "--parent",
        &id_of(&snap),
        "--changed-extents",
        extents.to_str().unwrap(),
    ]);
    assert!(err.contains("line 1"), "{err}");
    std::fs::write(&extents, format!("{} 4096\n", 1u64 << 40)).unwrap();
    let err = env.fails(&[
        "create",
        "--store",
        &store,
        "--image",
        i,
        "--name",
        "x",
        "--parent",
        &id_of(&snap),
        "--changed-extents",
        extents.to_str().unwrap(),
    ]);
    assert!(err.contains("beyond"), "{err}");
    assert_eq!(
        env.list(&store).len(),
        1,
        "no failed create left a snapshot"
    );
    assert!(env.verify(&store)["corrupt"].as_array().unwrap().is_empty());
}

#[test]
#[ignore = "needs root (a tmpfs mount): ./scripts/test runs it"]
fn full_disk_fails_cleanly() {
    let env = Env::new();
    let mnt = env.path("small");
    std::fs::create_dir(&mnt).unwrap();
    let m = mnt.to_str().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs", m])
        .status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "cannot mount a 3 MiB tmpfs to test ENOSPC: needs root; run ./scripts/test"
    );
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(m.to_string());
    let img = env.path("big.raw");
    raw_image(&img, 8 * MIB, &[(0, noise(4, 6 * MIB as usize))]);
    let store = format!("{m}/store");
    let small = env.path("small.raw");
    raw_image(&small, MIB, &[(0, text(5, 100_000))]);
    env.create(&store, &small, &[]);
    let err = env.fails(&[
        "create",
        "--store",
        &store,
        "--image",
        img.to_str().unwrap(),
        "--name",
        "big",
    ]);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(
        env.list(&store).len(),
        1,
        "the failed snapshot is not listed"
    );
    let v = env.verify(&store);
    assert!(
        v["corrupt"].as_array().unwrap().is_empty() && v["missing"].as_array().unwrap().is_empty(),
        "{v}"
    );
    env.ok(&["gc", "--store", &store]);
    env.create(&store, &small, &[]);
}

#[test]
fn damaged_manifest_is_reported_blocks_gc_and_can_be_deleted() {
    let env = Env::new();
    let img = sample_image(&env, "disk.raw");
    let store = env.store();
    let good = env.create(&store, &img, &[]);
    let bad = env.create(&store, &img, &["--owner", "x"]);
    let mpath = std::path::Path::new(&store)
        .join("snapshots")
        .join(id_of(&bad));
    let mut data = std::fs::read(&mpath).unwrap();
    data[40] ^= 1;
    std::fs::write(&mpath, data).unwrap();
    let v = env.verify(&store);
    assert_eq!(v["bad_manifests"][0]["snapshot"], bad["id"]);
    let listed: Vec<String> = env.list(&store).iter().map(id_of).collect();
    assert_eq!(
        listed,
        vec![id_of(&good)],
        "a damaged snapshot is not listed"
    );
    let err = env.fails(&["gc", "--store", &store]);
    assert!(
        err.contains("checksum") && err.contains(&id_of(&bad)),
        "{err}"
    );
    env.ok(&["delete", "--store", &store, "--id", &id_of(&bad)]);
    env.ok(&["gc", "--store", &store]);
    env.ok(&["verify", "--store", &store]);
}

#[test]
fn compressed_qcow2_clusters_are_read_through_qemu() {
    let env = Env::new();
    let img = env.path("disk.raw");
    // qcow2 sizes are whole sectors, so use a sector-aligned raw image.
    raw_image(
        &img,
        16 * MIB,
        &[
            (MIB, text(11, 3 * MIB as usize)),
            (9 * MIB, noise(12, MIB as usize)),
        ],
    );
    let q = env.path("packed.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            img.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    let store = env.store();
    let snap = env.create(&store, &q, &[]);
    let out = env.path("out.raw");
    env.restore(&store, &id_of(&snap), &out, &[]);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap(),
        "restore differs from the image"
    );
}
