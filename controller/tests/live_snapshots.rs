//! Live snapshots on the controller's side (issue 11), on SQLite and on
//! PostgreSQL: the one status setter, progress over the API, snapshots of
//! stopped instances, and the quota with reservations (also under
//! concurrent creates).

#[macro_use]
mod common;

use common::{Server, ADMIN};
use gantry_proto::ids::SnapshotId;
use gantry_proto::{InstanceState, SnapshotStatus};
use reqwest::Method;
use serde_json::{json, Value};

on_both!(status_setter);
on_both!(progress_and_stopped_instances);
on_both!(quota_reservations);
on_both!(concurrent_snapshots_never_exceed_quota);

const GIB: u64 = 1 << 30;

/// An account, a host, a flavor with a 50 GiB root disk and an image.
async fn setup(s: &Server) -> (String, String, String, String, String) {
    let (acct, t) = s.account("snappy").await;
    let h = s.host("h1", "none", 0).await;
    let f = s.flavor("c4", None, 0).await;
    let img = s.image("ubuntu").await;
    (acct, t, h, f, img)
}

/// A Running instance.
async fn running(s: &Server, t: &str, f: &str, img: &str, name: &str) -> String {
    let id = s
        .post(
            "/v1/instances",
            t,
            json!({"name": name, "flavor": f, "image": img}),
        )
        .await
        .id();
    s.observe(&id, "Running").await;
    id
}

async fn snapshot(s: &Server, t: &str, id: &str, name: &str) -> Value {
    s.ok(
        Method::POST,
        &format!("/v1/instances/{id}/snapshots"),
        t,
        Some(json!({ "name": name })),
        202,
    )
    .await
}

async fn status_of(s: &Server, t: &str, sid: &str) -> Value {
    s.get(&format!("/v1/snapshots/{sid}"), t).await.body
}

/// Moves `sid` to `to` with the controller's setter, in a committed
/// transaction of its own; whether it moved.
async fn set(s: &Server, sid: &str, to: SnapshotStatus) -> bool {
    let db = s.db().await;
    let mut tx = db.begin_write().await.unwrap();
    let id: SnapshotId = sid.parse().unwrap();
    let moved = gantry_controller::snapshots::set_status(&mut tx, id, to)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    moved
}

async fn status_setter(s: Server) {
    let (_, t, h, f, img) = setup(&s).await;
    let id = running(&s, &t, &f, &img, "w").await;
    let a = snapshot(&s, &t, &id, "a").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Only Creating -> Success | Failed.
    assert!(!set(&s, &a, SnapshotStatus::Creating).await);
    assert!(set(&s, &a, SnapshotStatus::Success).await);
    assert!(!set(&s, &a, SnapshotStatus::Failed).await);
    assert!(!set(&s, &a, SnapshotStatus::Success).await);
    assert_eq!(status_of(&s, &t, &a).await["status"], "Success");
    let ghost = SnapshotId::new().to_string();
    assert!(!set(&s, &ghost, SnapshotStatus::Failed).await);
    // Let the instance's operation end, then a second snapshot.
    let op = s.op_of(&id).await.unwrap();
    let done = json!({"outcome": "failed", "progress": 0, "error": "x"});
    assert_eq!(
        s.report(&h, op["id"].as_str().unwrap(), done).await.status,
        204
    );
    // That failure report could not turn the saved snapshot Failed.
    let got = status_of(&s, &t, &a).await;
    assert_eq!(
        (got["status"].as_str(), got["error"].as_str()),
        (Some("Success"), None)
    );
    let b = snapshot(&s, &t, &id, "b").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(set(&s, &b, SnapshotStatus::Failed).await);
    // The host's success report for it is refused by the machine: 204,
    // and the snapshot stays Failed with no sizes and no image.
    let op = s.op_of(&id).await.unwrap();
    let ok = json!({"outcome": "succeeded", "progress": 100, "instance_state": "Running",
        "snapshot": {"logical_bytes": 50 * GIB, "compressed_bytes": GIB}});
    assert_eq!(
        s.report(&h, op["id"].as_str().unwrap(), ok).await.status,
        204
    );
    let got = status_of(&s, &t, &b).await;
    assert_eq!(
        (got["status"].as_str(), got["compressed_bytes"].as_u64()),
        (Some("Failed"), Some(0)),
        "{got}"
    );
    assert!(!set(&s, &b, SnapshotStatus::Success).await);
    let imgs = s.get("/v1/images", &t).await.body;
    assert!(imgs
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["source_snapshot"] != b.as_str()));
}

/// Progress while Creating, 100 once Success; a Stopped instance is
/// snapshotted and stays Stopped; other states are refused.
async fn progress_and_stopped_instances(s: Server) {
    let (_, t, h, f, img) = setup(&s).await;
    let id = running(&s, &t, &f, &img, "w").await;
    let act = format!("/v1/instances/{id}/actions");
    s.ok(Method::POST, &act, &t, Some(json!({"action": "stop"})), 202)
        .await;
    s.observe(&id, "Stopped").await;
    let snap = snapshot(&s, &t, &id, "cold").await;
    assert_eq!(
        (snap["status"].as_str(), snap["progress_percent"].as_u64()),
        (Some("Creating"), Some(0))
    );
    let sid = snap["id"].as_str().unwrap().to_string();
    let mon = s.get(&format!("/v1/instances/{id}/monitor"), &t).await.body;
    assert_eq!(mon["desired_state"], "Stopped", "{mon}");
    let op = s.op_of(&id).await.unwrap();
    assert_eq!(op["command"]["kind"], "snapshot");
    let op = op["id"].as_str().unwrap().to_string();
    let r = s
        .report(&h, &op, json!({"outcome": "running", "progress": 40}))
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(status_of(&s, &t, &sid).await["progress_percent"], 40);
    let list = s.get("/v1/snapshots?status=Creating", &t).await.body;
    assert_eq!(list[0]["progress_percent"], 40, "{list}");
    let r = s
        .report(
            &h,
            &op,
            json!({"outcome": "succeeded", "progress": 100, "instance_state": "Stopped",
            "snapshot": {"logical_bytes": 50 * GIB, "compressed_bytes": 3 * GIB}}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let got = status_of(&s, &t, &sid).await;
    assert_eq!(
        (got["status"].as_str(), got["progress_percent"].as_u64()),
        (Some("Success"), Some(100))
    );
    let mon = s.get(&format!("/v1/instances/{id}/monitor"), &t).await.body;
    assert_eq!(mon["state"], "Stopped");
    refused_states_and_failures(&s, &t, &h, &id).await;
}

/// Suspended is refused with the state's sentence; a failed snapshot
/// shows where it stopped; auto-release asks for Released.
async fn refused_states_and_failures(s: &Server, t: &str, h: &str, id: &str) {
    let act = format!("/v1/instances/{id}/actions");
    s.ok(Method::POST, &act, t, Some(json!({"action": "start"})), 202)
        .await;
    s.observe(id, "Running").await;
    // Suspended by the host (as a guest paused outside Gantry would be).
    s.observe(id, "Suspended").await;
    let r = s
        .post(
            &format!("/v1/instances/{id}/snapshots"),
            t,
            json!({"name": "x"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (409, "cannot snapshot an instance that is Suspended")
    );
    s.observe(id, "Running").await;
    let sid = snapshot(s, t, id, "warm").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let op = s.op_of(id).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fail = json!({"outcome": "failed", "progress": 30, "error": "store is full",
        "instance_state": "Running"});
    assert_eq!(s.report(h, &op, fail).await.status, 204);
    let got = status_of(s, t, &sid).await;
    assert_eq!(
        (got["status"].as_str(), got["progress_percent"].as_u64()),
        (Some("Failed"), Some(30))
    );
    s.ok(
        Method::POST,
        &format!("/v1/instances/{id}/snapshots"),
        t,
        Some(json!({"name": "last", "auto_release": true})),
        202,
    )
    .await;
    let mon = s.get(&format!("/v1/instances/{id}/monitor"), t).await.body;
    assert_eq!(mon["desired_state"], "Released");
    let op = s.op_of(id).await.unwrap();
    assert_eq!(op["command"]["auto_release"], true);
    // Saved; the host is yet to release it (or released it and forgot, as
    // a restart does): it reads Releasing, offers nothing, refuses a start.
    assert_eq!(s.finish_snapshot(id, 10 * GIB, GIB).await.status, 204);
    let view = s.get(&format!("/v1/instances/{id}"), t).await.body;
    assert_eq!(
        (view["state"].as_str(), view["status"].as_str()),
        (Some("Releasing"), Some(InstanceState::Releasing.status())),
        "{view}"
    );
    assert_eq!(view["allowed_actions"], json!([]), "{view}");
    let start = s
        .post(
            &format!("/v1/instances/{id}/actions"),
            t,
            json!({"action": "start"}),
        )
        .await;
    assert_eq!(start.status, 409, "{}", start.body);
    assert!(start.error().contains("being released"), "{}", start.body);
    // The host says Released: it is.
    s.observe(id, "Released").await;
    let all = s.get("/v1/instances", t).await.body;
    let view = all
        .as_array()
        .and_then(|a| a.iter().find(|i| i["id"] == *id))
        .expect("listed");
    assert_eq!(view["state"], "Released", "{view}");
}

async fn account(s: &Server, t: &str) -> (u64, u64) {
    let a = s.get("/v1/account", t).await.body;
    (
        a["snapshot_used_bytes"].as_u64().unwrap(),
        a["snapshot_reserved_bytes"].as_u64().unwrap(),
    )
}

/// Creating snapshots reserve their root disk; a saved one reserves its
/// compressed size until its host's second store report.
async fn quota_reservations(s: Server) {
    let (acct, t, h, f, img) = setup(&s).await;
    let ids = [
        running(&s, &t, &f, &img, "a").await,
        running(&s, &t, &f, &img, "b").await,
        running(&s, &t, &f, &img, "c").await,
    ];
    snapshot(&s, &t, &ids[0], "s0").await;
    let s1 = snapshot(&s, &t, &ids[1], "s1").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(account(&s, &t).await, (0, 100 * GIB));
    let refused = |r: common::Reply| {
        assert_eq!(r.status, 409, "{}", r.body);
        assert!(
            r.error().contains("snapshot_quota_gib is 100 GiB"),
            "{}",
            r.body
        );
    };
    let third = format!("/v1/instances/{}/snapshots", ids[2]);
    refused(s.post(&third, &t, json!({"name": "s2"})).await);
    assert_eq!(
        s.finish_snapshot(&ids[0], 50 * GIB, 2 * GIB).await.status,
        204
    );
    assert_eq!(account(&s, &t).await, (0, 52 * GIB));
    refused(s.post(&third, &t, json!({"name": "s2"})).await);
    let store = json!({"store": [{"account": acct, "billed_bytes": 2 * GIB}]});
    assert_eq!(s.heartbeat(&h, store.clone()).await.status, 200);
    assert_eq!(account(&s, &t).await, (2 * GIB, 52 * GIB));
    assert_eq!(s.heartbeat(&h, store).await.status, 200);
    assert_eq!(account(&s, &t).await, (2 * GIB, 50 * GIB));
    // A failed snapshot gives its reservation back.
    let op = s.op_of(&ids[1]).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fail = json!({"outcome": "failed", "progress": 5, "error": "libvirt: gone"});
    assert_eq!(s.report(&h, &op, fail).await.status, 204);
    assert_eq!(status_of(&s, &t, &s1).await["status"], "Failed");
    assert_eq!(account(&s, &t).await, (2 * GIB, 0));
    snapshot(&s, &t, &ids[2], "s2").await;
    assert_eq!(account(&s, &t).await, (2 * GIB, 50 * GIB));
    let admin = s
        .get(&format!("/v1/admin/accounts/{acct}"), ADMIN)
        .await
        .body;
    assert_eq!(admin["snapshot_reserved_bytes"], 50 * GIB);
}

/// A quota that fits exactly 3 reservations: of 8 concurrent requests 3
/// are accepted, the rest refused naming the quota.
async fn concurrent_snapshots_never_exceed_quota(s: Server) {
    let (acct, t, _, f, img) = setup(&s).await;
    s.ok(
        Method::PATCH,
        &format!("/v1/admin/accounts/{acct}"),
        ADMIN,
        Some(json!({"snapshot_quota_gib": 150})),
        200,
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(running(&s, &t, &f, &img, &format!("r{i}")).await);
    }
    let s = std::sync::Arc::new(s);
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (s, t, id) = (s.clone(), t.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            s.post(
                &format!("/v1/instances/{id}/snapshots"),
                &t,
                json!({ "name": format!("s{i}") }),
            )
            .await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        let r = task.await.unwrap();
        match r.status {
            202 => ok += 1,
            409 => assert!(
                r.error().contains("snapshot_quota_gib is 150 GiB"),
                "{}",
                r.body
            ),
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(account(&s, &t).await, (0, 150 * GIB));
    let creating = s.get("/v1/snapshots?status=Creating", &t).await.body;
    assert_eq!(creating.as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantryctl_shows_snapshot_progress() {
    let s = Server::start(common::Backend::Sqlite).await.unwrap();
    let (_, t, h, f, img) = setup(&s).await;
    let id = running(&s, &t, &f, &img, "w").await;
    let sid = snapshot(&s, &t, &id, "s").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let op = s.op_of(&id).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.report(&h, &op, json!({"outcome": "running", "progress": 64}))
        .await;
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gantryctl"))
            .args(args)
            .env("GANTRY_URL", &s.url)
            .env("GANTRY_TOKEN", &t)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let list = ctl(&["snapshot", "list"]);
    assert!(
        list.contains("PROGRESS_PERCENT") && list.contains("64"),
        "{list}"
    );
    let one = ctl(&["snapshot", "get", &sid]);
    assert!(
        one.contains("progress_percent") && one.contains("64"),
        "{one}"
    );
    let v: Value = serde_json::from_str(&ctl(&["--json", "snapshot", "get", &sid])).unwrap();
    assert_eq!(v["progress_percent"], 64);
}

#[tokio::test]
async fn migration_5_sqlite() {
    migration_5(common::Backend::Sqlite).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: ./scripts/test runs it"]
async fn migration_5_postgres() {
    migration_5(common::Backend::Postgres).await;
}

/// Version 5 reads the old snapshot phases as Snapshotting, starts each
/// account's figure from the last store reports (accrued from its last
/// charge) and reserves the root disk of snapshots still Creating.
async fn migration_5(backend: common::Backend) {
    use sqlx::Row;
    let dir = tempfile::tempdir().unwrap();
    let Some((pool, url)) = common::db_before_migration(backend, dir.path(), 5).await else {
        return;
    };
    for sql in [
        "INSERT INTO accounts (id, name, snapshot_quota_gib, created_ms, snapshot_metered_ms) \
         VALUES ('acct-a', 'a', 1, 5, 1000), ('acct-b', 'b', 1, 5, NULL)",
        "INSERT INTO flavors (id, name, vcpus, memory_mib, root_disk_gib, gpu_count, \
         price_micros_per_hour, created_ms) VALUES ('flv-f', 'f', 1, 1024, 10, 0, 1, 5)",
        "INSERT INTO instances (id, account_id, name, flavor_id, desired_state, observed_state, \
         state_since_ms, root_disk_gib, created_ms) VALUES \
         ('ins-1', 'acct-a', 'p', 'flv-f', 'Running', 'Paused', 5, 10, 7), \
         ('ins-2', 'acct-a', 's', 'flv-f', 'Saving', 'Suspending', 5, 20, 7)",
        "INSERT INTO host_store_usage (host_id, account_id, billed_bytes, at_ms) VALUES \
         ('h1', 'acct-a', 3, 50), ('h2', 'acct-a', 4, 60), ('h1', 'acct-b', 9, 70)",
        "INSERT INTO snapshots (id, account_id, instance_id, name, description, status, \
         auto_release, as_image, compressed_bytes, created_ms) VALUES \
         ('snp-1', 'acct-a', 'ins-2', 'c', '', 'Creating', 0, 0, 0, 5), \
         ('snp-2', 'acct-a', 'ins-1', 's', '', 'Success', 0, 0, 8, 5)",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let db = gantry_controller::db::Db::connect(&url, 2).await.unwrap();
    let states: Vec<(String, String)> =
        sqlx::query("SELECT desired_state, observed_state FROM instances ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let st = |d: &str, o: &str| (d.to_string(), o.to_string());
    assert_eq!(
        states,
        vec![
            st("Running", "Snapshotting"),
            st("Snapshotting", "Snapshotting")
        ]
    );
    let figures: Vec<(i64, Option<i64>)> =
        sqlx::query("SELECT snapshot_bytes, snapshot_bytes_since_ms FROM accounts ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(figures, vec![(7, Some(1000)), (9, Some(70))]);
    let reserved: Vec<(i64, i64)> =
        sqlx::query("SELECT reserved_bytes, store_reports_due FROM snapshots ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(reserved, vec![(20 * GIB as i64, 0), (0, 0)]);
}
