//! Compaction through the CLI: snapshots published at a fast level
//! (`--publish-level -10`; by default a create writes at the level at rest
//! and queues nothing), then `compact` brings their chunks to the level at rest; sizes, billing and
//! restores follow, a SIGKILL at any point leaves a sound store, and gc
//! drops queues whose snapshot never appeared.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// Publish below the level at rest, so the create queues its chunks.
const FAST: [&str; 1] = ["--publish-level=-10"];

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).expect("json")
}

fn queues(store: &str) -> Vec<String> {
    match std::fs::read_dir(std::path::Path::new(store).join("compact")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn image(env: &Env) -> (std::path::PathBuf, Vec<u8>) {
    let img = env.path("disk.raw");
    let writes: Vec<_> = (0..6u64)
        .map(|i| {
            let data = if i % 3 == 2 {
                noise(i, MIB as usize)
            } else {
                text(i, 2 * MIB as usize)
            };
            (i * 3 * MIB, data)
        })
        .collect();
    raw_image(&img, 20 * MIB, &writes);
    let bytes = std::fs::read(&img).unwrap();
    (img, bytes)
}

fn restored(env: &Env, store: &str, id: &str) -> Vec<u8> {
    let out = env.path("out.raw");
    let _ = std::fs::remove_file(&out);
    env.restore(store, id, &out, &[]);
    std::fs::read(&out).unwrap()
}

fn billed(env: &Env, store: &str) -> u64 {
    let s = json(&env.ok(&["stats", "--store", store, "--json"]));
    s["owners"][0]["billed_bytes"].as_u64().unwrap()
}

#[test]
fn compaction_shrinks_chunks_to_the_level_at_rest() {
    let env = Env::new();
    let (img, bytes) = image(&env);
    let plain = ["--owner", "acct1", "--chunk-size", "1048576"];
    let small = [&plain[..], &FAST[..]].concat();

    // The same disk written straight at the level at rest (the default),
    // for reference.
    let direct_store = env.path("direct").display().to_string();
    let direct = env.create(&direct_store, &img, &plain);
    assert!(queues(&direct_store).is_empty(), "nothing to compact");

    let store = env.store();
    let snap = env.create(&store, &img, &small);
    let id = id_of(&snap);
    assert_eq!(queues(&store), vec![id.clone()]);
    let published = snap["stored_bytes"].as_u64().unwrap();
    assert!(published > direct["stored_bytes"].as_u64().unwrap());
    assert_eq!(
        restored(&env, &store, &id),
        bytes,
        "restorable before compaction"
    );
    assert_eq!(billed(&env, &store), published);

    let r = json(&env.ok(&["compact", "--store", &store, "--json"]));
    assert_eq!(r["snapshots"], 1, "{r}");
    assert!(r["rewritten"].as_u64().unwrap() >= 3, "{r}");
    assert_eq!(r["bytes_before"].as_u64().unwrap(), published, "{r}");
    assert!(queues(&store).is_empty());
    // Compacted chunks are byte for byte what the level at rest writes.
    let listed = env.list(&store);
    assert_eq!(listed[0]["stored_bytes"], direct["stored_bytes"]);
    assert_eq!(r["bytes_after"], direct["stored_bytes"]);
    assert_eq!(billed(&env, &store), r["bytes_after"].as_u64().unwrap());
    assert_eq!(restored(&env, &store, &id), bytes);
    assert!(env.verify(&store)["corrupt"].as_array().unwrap().is_empty());

    // A second run finds nothing; --compact on create ends at rest.
    let again = json(&env.ok(&["compact", "--store", &store, "--json"]));
    assert_eq!(again["chunks"], 0);
    let args = [
        "--owner",
        "acct2",
        "--chunk-size",
        "1048576",
        FAST[0],
        "--compact",
    ];
    let at_rest = env.create(&store, &img, &args);
    assert_eq!(at_rest["stored_bytes"], direct["stored_bytes"]);
    assert_eq!(at_rest["new_bytes"], direct["stored_bytes"]);
    assert!(queues(&store).is_empty());
}

#[test]
fn queues_of_deleted_or_unpublished_snapshots_go() {
    let env = Env::new();
    let (img, _) = image(&env);
    let store = env.store();
    let a = env.create(&store, &img, &["--owner", "o1", FAST[0]]);
    // A create killed between its queue and its manifest leaves a queue
    // with no snapshot: compaction waits for it, gc removes it.
    let orphan = "snap-0123456789abcdef0123456789abcdef";
    let dir = std::path::Path::new(&store).join("compact");
    std::fs::copy(dir.join(id_of(&a)), dir.join(orphan)).unwrap();
    let r = json(&env.ok(&["compact", "--store", &store, "--json"]));
    assert_eq!(
        (r["snapshots"].as_u64(), r["waiting"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(queues(&store), vec![orphan.to_string()]);
    env.ok(&["gc", "--store", &store]);
    assert!(queues(&store).is_empty());

    let b = env.create(&store, &img, &["--owner", "o2", FAST[0]]);
    assert_eq!(queues(&store), vec![id_of(&b)]);
    env.ok(&["delete", "--store", &store, "--id", &id_of(&b)]);
    assert!(queues(&store).is_empty(), "delete takes the queue along");
}

#[test]
fn sigkill_during_compaction_leaves_a_sound_store() {
    let env = Env::new();
    let (img, bytes) = image(&env);
    let store = env.store();
    let opts = ["--chunk-size", "65536", "--threads", "1", FAST[0]];
    let mut ids = Vec::new();
    for k in 0..8 {
        let owner = format!("k{k}");
        let mut args = opts.to_vec();
        args.extend(["--owner", &owner]);
        ids.push(id_of(&env.create(&store, &img, &args)));
    }
    let probe = env.path("probe");
    std::fs::create_dir(&probe).unwrap();
    // Time one compaction (in a copy) to spread the kill points over it.
    let copy = probe.join("store").display().to_string();
    sh("cp", &["-a", &store, &copy]);
    let t = Instant::now();
    env.ok(&["compact", "--store", &copy, "--threads", "1"]);
    let full = t.elapsed().as_millis() as u64;
    let mut killed = 0;
    for k in 1..=10u64 {
        let mut child = env
            .cmd(&["compact", "--store", &store, "--threads", "1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(full * k / 40));
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = child.kill();
        child.wait().unwrap();
        let v = env.verify(&store);
        assert!(v["corrupt"].as_array().unwrap().is_empty(), "{v}");
        assert!(v["missing"].as_array().unwrap().is_empty(), "{v}");
        assert_eq!(restored(&env, &store, &ids[(k % 8) as usize]), bytes);
    }
    assert!(
        killed >= 3,
        "only {killed} kills landed during a compaction"
    );
    env.ok(&["compact", "--store", &store]);
    assert!(queues(&store).is_empty());
    let s = json(&env.ok(&["stats", "--store", &store, "--json"]));
    let c = json(&env.ok(&["stats", "--store", &copy, "--json"]));
    assert_eq!(s["stored_bytes"], c["stored_bytes"], "same end state");
    env.ok(&["gc", "--store", &store]);
    assert!(env.verify(&store)["corrupt"].as_array().unwrap().is_empty());
}
