//! The S3 backend against a real S3-protocol server on loopback (started by
//! scripts/setup-s3, found through GANTRY_TEST_S3_URL and the AWS_* variables).

mod common;
use common::*;

/// The S3 server's URL; fails the test with a sentence without it (the
/// test is ignored by a plain `cargo test`).
fn s3_url() -> String {
    std::env::var("GANTRY_TEST_S3_URL").expect(
        "GANTRY_TEST_S3_URL is not set: run ./scripts/test, or scripts/setup-s3 and source \
         .cache/env/s3.env",
    )
}

#[test]
#[ignore = "needs the S3 server: ./scripts/test runs it"]
fn s3_store_round_trip_verify_gc() {
    let base = s3_url();
    let env = Env::new();
    let store = format!(
        "{}/t-{:016x}",
        base.trim_end_matches('/'),
        std::process::id() as u64 * 7919 + 17
    );
    let img = env.path("disk.raw");
    raw_image(
        &img,
        10 * MIB + 3,
        &[
            (MIB, text(7, 2 * MIB as usize)),
            (6 * MIB, noise(8, MIB as usize + 3)),
        ],
    );
    // Published fast, so compaction rewrites objects on S3 too.
    let small = [
        "--owner",
        "alice",
        "--chunk-size",
        "1048576",
        "--publish-level=-10",
    ];
    let a = env.create(&store, &img, &small);
    let b = env.create(&store, &img, &small);
    assert_eq!(b["new_bytes"], 0);
    let c: serde_json::Value =
        serde_json::from_str(&env.ok(&["compact", "--store", &store, "--json"])).unwrap();
    assert_eq!(c["snapshots"], 1, "{c}");
    assert!(
        c["bytes_after"].as_u64() < c["bytes_before"].as_u64(),
        "{c}"
    );
    assert_eq!(env.list(&store).len(), 2);
    let out = env.path("out.raw");
    env.restore(&store, &id_of(&a), &out, &[]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    env.ok(&["delete", "--store", &store, "--id", &id_of(&a)]);
    env.ok(&["delete", "--store", &store, "--id", &id_of(&b)]);
    let gc: serde_json::Value =
        serde_json::from_str(&env.ok(&["gc", "--store", &store, "--json"])).unwrap();
    assert!(gc["deleted_chunks"].as_u64().unwrap() >= 3, "{gc}");
    let v = env.verify(&store);
    assert_eq!(v["chunks_checked"], 0);
    assert!(env.list(&store).is_empty());
}

#[test]
fn unreachable_s3_endpoint_is_a_clear_error() {
    let env = Env::new();
    let o = env
        .cmd(&["list", "--store", "s3://bucket/prefix"])
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not reachable"), "{err}");
}
