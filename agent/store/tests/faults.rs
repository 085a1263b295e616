//! Crash safety: SIGKILL the CLI at random points during create and gc, and
//! run gc while a create is writing into the same store; afterwards the store
//! verifies, lists only complete snapshots, and a rerun succeeds.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn kill_after(env: &Env, args: &[&str], delay: Duration) -> bool {
    let mut child = env
        .cmd(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill(); // SIGKILL
    child.wait().unwrap();
    !finished
}

fn assert_store_sound(env: &Env, store: &str, image: &[u8]) -> usize {
    let v = env.verify(store);
    assert!(v["corrupt"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["missing"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["bad_manifests"].as_array().unwrap().is_empty(), "{v}");
    let list = env.list(store);
    // Every listed snapshot is complete: spot-check the newest by restoring it.
    if let Some(last) = list.last() {
        let out = env.path("check.raw");
        let _ = std::fs::remove_file(&out);
        env.restore(store, &id_of(last), &out, &[]);
        assert_eq!(std::fs::read(&out).unwrap(), image);
    }
    list.len()
}

#[test]
fn sigkill_during_create_and_gc_never_corrupts() {
    let env = Env::new();
    let img = env.path("disk.raw");
    let mut writes = Vec::new();
    for i in 0..6u64 {
        writes.push((i * 4 * MIB, noise(i, 3 * MIB as usize)));
        writes.push((i * 4 * MIB + 3 * MIB, text(i, MIB as usize)));
    }
    raw_image(&img, 24 * MIB, &writes);
    let image = std::fs::read(&img).unwrap();
    let store = env.store();
    let i = img.to_str().unwrap();
    // Time one create to spread kill points over its whole run.
    let t = Instant::now();
    env.create(
        &store,
        &img,
        &["--chunk-size", "65536", "--threads", "1", "--owner", "o1"],
    );
    let full = t.elapsed().as_millis() as u64;
    let mut listed = assert_store_sound(&env, &store, &image);
    let mut killed = 0;
    for k in 0..24u64 {
        // Each run uses a new owner, so it writes all chunks again.
        let owner = format!("k{k}");
        let delay = Duration::from_millis(full * (k % 12 + 1) / 12 + k % 3);
        if kill_after(
            &env,
            &[
                "create",
                "--store",
                &store,
                "--image",
                i,
                "--name",
                "k",
                "--owner",
                &owner,
                "--chunk-size",
                "65536",
                "--threads",
                "1",
            ],
            delay,
        ) {
            killed += 1;
        }
        let now = assert_store_sound(&env, &store, &image);
        assert!(
            now == listed || now == listed + 1,
            "at most the killed snapshot appeared"
        );
        listed = now;
        if k % 4 == 3 {
            // Delete everything but the first snapshot, then kill a gc midway.
            for s in env.list(&store).iter().skip(1) {
                env.ok(&["delete", "--store", &store, "--id", &id_of(s)]);
            }
            kill_after(
                &env,
                &["gc", "--store", &store],
                Duration::from_millis(k * 3),
            );
            listed = assert_store_sound(&env, &store, &image);
            assert_eq!(listed, 1);
        }
    }
    assert!(killed >= 6, "only {killed} kills landed during a create");
    env.create(&store, &img, &["--owner", "rerun"]);
    env.ok(&["gc", "--store", &store]);
    assert_store_sound(&env, &store, &image);
}

#[test]
fn gc_during_create_keeps_the_new_snapshot_whole() {
    let env = Env::new();
    let img = env.path("disk.raw");
    let writes: Vec<_> = (0..8u64)
        .map(|i| (i * 3 * MIB, noise(100 + i, 3 * MIB as usize)))
        .collect();
    raw_image(&img, 24 * MIB, &writes);
    let store = env.store();
    let old = env.create(&store, &img, &["--owner", "a"]);
    for round in 0..3 {
        // The old snapshot's chunks become garbage while a new create reuses them.
        let i = img.to_str().unwrap();
        let create = env
            .cmd(&[
                "create",
                "--store",
                &store,
                "--image",
                i,
                "--name",
                "new",
                "--owner",
                "a",
                "--chunk-size",
                "65536",
                "--threads",
                "1",
                "--json",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        if round == 0 {
            env.ok(&["delete", "--store", &store, "--id", &id_of(&old)]);
        }
        std::thread::sleep(Duration::from_millis(20 * round));
        env.ok(&["gc", "--store", &store]);
        let out = create.wait_with_output().unwrap();
        assert!(out.status.success());
        let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        env.ok(&["gc", "--store", &store]);
        let r = env.path("r.raw");
        let _ = std::fs::remove_file(&r);
        env.restore(&store, &id_of(&snap), &r, &[]);
        assert_eq!(std::fs::read(&r).unwrap(), std::fs::read(&img).unwrap());
    }
}
