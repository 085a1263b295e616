//! Two agents as two hosts on one S3 store (the moto server of
//! scripts/setup-s3), linked to a real controller process: chunk keys
//! come from the controller, so a snapshot host A writes restores
//! byte-exact on host B; with per-host random keys it does not. Host A
//! had a key of its own from before (an upgrade): the controller adopts
//! it. Host B had a different one: the controller's wins, B's is kept to
//! read. With the controller gone, the cached keys still serve.
//!
//! Needs the controller binary (`cargo build -p gantry-controller`) and
//! `GANTRY_TEST_S3_URL` with the `AWS_*` variables (`.cache/env/s3.env`).

use gantry_agent::config::{AgentConfig, ControllerConfig, DomainType};
use gantry_agent::hypervisor_fake::FakeHypervisor;
use gantry_agent::link::{self, Link};
use gantry_agent::manager::Manager;
use gantry_store::keys::{KeySource, Keyring, Namespace};
use gantry_store::{CreateRequest, RestoreFormat, Store, StoreConfig};
use gantry_tests::controller::{Database, TestController};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

/// The S3 server's URL; fails the test with a sentence without it (the
/// test is ignored by a plain `cargo test`).
fn s3_base() -> String {
    std::env::var("GANTRY_TEST_S3_URL").expect(
        "GANTRY_TEST_S3_URL is not set: run ./scripts/test, or scripts/setup-s3 and source \
         .cache/env/s3.env",
    )
}

/// A manager (fake hypervisor) linked to `ctl` as host `name` on `store`.
fn host(
    rt: &tokio::runtime::Runtime,
    ctl: &TestController,
    dir: &Path,
    name: &str,
    store: &str,
) -> Arc<Link> {
    let token = ctl
        .admin()
        .post("/v1/admin/join-tokens", &json!({}))
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let cc: ControllerConfig = serde_json::from_value(json!({
        "url": ctl.url, "join_token": token, "host_name": name, "address": "127.0.0.1",
        "poll_wait_secs": 1
    }))
    .unwrap();
    let cfg = AgentConfig {
        state_dir: dir.join(name),
        domain_type: DomainType::Qemu,
        gpu: Default::default(),
        reserved_memory_mib: 0,
        snapshot_store: Some(store.to_string()),
        controller: Some(cc.clone()),
        ..AgentConfig::default()
    };
    let m = Manager::open_with(
        cfg,
        gantry_agent::gpu::GpuPool::empty(),
        Arc::new(FakeHypervisor::new()),
    )
    .unwrap();
    rt.block_on(async {
        let l = link::connect(m, cc).await.unwrap();
        link::heartbeat::send_once(&l).await.unwrap();
        l
    })
}

/// A key this host made itself before it was linked.
fn own_key(l: &Link, account: &str) {
    let ring = Keyring::load(&l.manager().config().store_keyring_path()).unwrap();
    let ns = Namespace::for_owner(Some(account)).unwrap();
    ring.hasher(&ns, true).unwrap();
    assert_eq!(ring.source(account), Some(KeySource::Local));
}

fn disk(path: &Path) -> Vec<u8> {
    let mut data = vec![0u8; 24 << 20];
    for (i, b) in data.iter_mut().enumerate().take(9 << 20) {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2];
    }
    data[(20 << 20)..(20 << 20) + 4096].fill(0x5a);
    std::fs::write(path, &data).unwrap();
    data
}

/// Blocking clients (the test's API client, the S3 backend) run outside
/// the runtime; the link's calls inside it.
#[test]
#[ignore = "needs the S3 server: ./scripts/test runs it"]
fn a_snapshot_written_on_one_host_restores_on_another() {
    let base = s3_base();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = format!(
        "{}/keys-{}-{:x}",
        base.trim_end_matches('/'),
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    );
    let mut ctl = TestController::start(&Database::Sqlite, "").expect("controller starts");
    let admin = ctl.admin();
    let acct = admin
        .post(
            "/v1/admin/accounts",
            &json!({"name": "keys", "billing_profile_complete": true}),
        )
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    admin
        .post(
            &format!("/v1/admin/accounts/{acct}/credits"),
            &json!({"amount_micros": 100_000_000, "note": "t"}),
        )
        .unwrap();
    let token = admin
        .post("/v1/admin/tokens", &json!({"name": "t", "account": acct}))
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let tenant = ctl.with_token(&token);
    let flavor = admin
        .post(
            "/v1/admin/flavors",
            &json!({"name": "tiny", "vcpus": 1, "memory_mib": 64,
            "root_disk_gib": 1, "gpu_model": null, "gpu_count": 0, "price_micros_per_hour": 1}),
        )
        .unwrap()["id"]
        .clone();
    let image = admin
        .post(
            "/v1/admin/images",
            &json!({"name": "img", "size_gib": 1,
            "origin": {"from": "file", "disk": "/nonexistent/img.qcow2"}}),
        )
        .unwrap()["id"]
        .clone();

    let dir = tempfile::tempdir().unwrap();
    let a = host(&rt, &ctl, dir.path(), "host-a", &store);
    own_key(&a, &acct);
    // Work for the account on A (never carried out here): A may get its key.
    tenant
        .post(
            "/v1/instances",
            &json!({"name": "one", "flavor": flavor, "image": image}),
        )
        .unwrap();
    rt.block_on(link::keys::ensure(&a, &acct)).unwrap();
    let ring_a = Keyring::load(&a.manager().config().store_keyring_path()).unwrap();
    assert_eq!(
        ring_a.source(&acct),
        Some(KeySource::Controller),
        "A's own key was adopted"
    );
    assert!(ring_a.local_keys().is_empty());

    // A writes a snapshot of the account to the shared store.
    let src = dir.path().join("disk.raw");
    let data = disk(&src);
    let written = a
        .manager()
        .open_store()
        .unwrap()
        .create(&CreateRequest {
            image: &src,
            name: "s",
            owner: Some(&acct),
            parent: None,
            changed_extents: None,
            progress: None,
            id: None,
        })
        .unwrap();

    // B joins with a key of its own; work for the account lands on B.
    let b = host(&rt, &ctl, dir.path(), "host-b", &store);
    own_key(&b, &acct);
    admin
        .post(&format!("/v1/admin/hosts/{}/cordon", a.host()), &json!({}))
        .unwrap();
    let two = tenant
        .post(
            "/v1/instances",
            &json!({"name": "two", "flavor": flavor, "image": image}),
        )
        .unwrap();
    assert_eq!(two["host"], b.host().to_string());
    let sid = written.id.parse().unwrap();
    rt.block_on(link::keys::ensure_for_snapshot(&b, sid))
        .unwrap();
    let out = dir.path().join("restored.raw");
    b.manager()
        .open_store()
        .unwrap()
        .restore(&written.id, &out, RestoreFormat::Raw, None)
        .unwrap();
    assert!(
        std::fs::read(&out).unwrap() == data,
        "restored byte-exact on B"
    );
    let ring_b = Keyring::load(&b.manager().config().store_keyring_path()).unwrap();
    assert_eq!(
        ring_b.source(&acct),
        Some(KeySource::Controller),
        "the controller's key won"
    );
    assert!(ring_b.local_keys().is_empty());

    // Per-host random keys (as before): B's own key does not read A's chunks.
    let random = Keyring::in_memory();
    random
        .hasher(&Namespace::for_owner(Some(&acct)).unwrap(), true)
        .unwrap();
    let cfg = StoreConfig {
        keyring: Arc::new(random),
        ..StoreConfig::default()
    };
    let e = Store::open(&store, cfg)
        .unwrap()
        .restore(
            &written.id,
            &dir.path().join("bad.raw"),
            RestoreFormat::Raw,
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match its hash"), "{e}");

    // The controller gone: B's cached keys still serve a restore.
    ctl.kill9();
    rt.block_on(link::keys::ensure(&b, &acct)).unwrap();
    let again = dir.path().join("again.raw");
    b.manager()
        .open_store()
        .unwrap()
        .restore(&written.id, &again, RestoreFormat::Raw, None)
        .unwrap();
    assert!(std::fs::read(&again).unwrap() == data);
    // Neither keyring file is readable by others.
    for l in [&a, &b] {
        let meta = std::fs::metadata(l.manager().config().store_keyring_path()).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077,
            0
        );
    }
}
