//! Instances, snapshots and scheduling over real HTTP, each on SQLite and
//! on PostgreSQL (`GANTRY_TEST_PG_URL`; that variant is ignored by a plain
//! `cargo test`, `./scripts/test` runs it).

#[macro_use]
mod common;

use common::{Server, ADMIN};
use reqwest::Method;
use serde_json::json;
use std::collections::HashSet;

on_both!(lifecycle);
on_both!(snapshots);
on_both!(scheduling);
on_both!(concurrent_creates_never_double_book);

async fn lifecycle(s: Server) {
    let (_, t) = s.account("acme").await;
    let host = s.host("h1", "A100", 2).await;
    let f = s.flavor("a100x1", Some("A100"), 1).await;
    let big = s.flavor("a100x2", Some("A100"), 2).await;
    let img = s.image("ubuntu").await;
    let vol = s
        .post("/v1/volumes", &t, json!({"name": "data", "size_gib": 200}))
        .await
        .id();
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "web", "flavor": f, "image": img,
            "data_volume": vol, "ports": [8080]}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["status"], "Creating");
    assert_eq!(r.body["host"], host.as_str());
    let id = r.id();
    let op = r.body["operation"].as_str().unwrap().to_string();
    assert_eq!(
        s.get(&format!("/v1/operations/{op}"), &t).await.body["state"],
        "pending"
    );
    // Nothing may be asked while Creating.
    let r = s
        .post(
            &format!("/v1/instances/{id}/actions"),
            &t,
            json!({"action": "stop"}),
        )
        .await;
    assert_eq!(r.status, 409);
    s.observe(&id, "Running").await;
    assert_eq!(
        s.get(&format!("/v1/operations/{op}"), &t).await.body["state"],
        "succeeded"
    );
    let acc = s.get(&format!("/v1/instances/{id}/access"), &t).await.body;
    assert_eq!(acc["host_address"], "h1.example");
    let guest: Vec<u64> = acc["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["guest_port"].as_u64().unwrap())
        .collect();
    assert_eq!(guest, vec![22, 8080, 8888]);
    let hw = s
        .get(&format!("/v1/instances/{id}/hardware"), &t)
        .await
        .body;
    assert_eq!(hw["gpus"], json!(["0000:10:00.0"]));
    let cfg = s.get(&format!("/v1/instances/{id}/config"), &t).await.body;
    assert_eq!(
        (cfg["data_volume"].as_str(), cfg["root_disk_gib"].as_u64()),
        (Some(vol.as_str()), Some(50))
    );
    let mon = s.get(&format!("/v1/instances/{id}/monitor"), &t).await.body;
    assert_eq!(
        (mon["state"].as_str(), mon["host_health"].as_str()),
        (Some("Running"), Some("healthy"))
    );
    assert_eq!(
        s.get(&format!("/v1/instances/{id}/billing"), &t).await.body["price_micros_per_hour"],
        2_000_000
    );
    let row = &s.get("/v1/instances?status=running", &t).await.body[0];
    assert_eq!(
        row["allowed_actions"],
        json!([
            "stop",
            "reboot",
            "force-reboot",
            "suspend",
            "grow-disk",
            "snapshot",
            "release"
        ])
    );
    actions(&s, &t, &id, &big).await;
    released(&s, &t, &id, &host).await;
    batch(&s, &t, &id, &f, &img).await;
}

/// Actions on a Running, then Stopped instance.
async fn actions(s: &Server, t: &str, id: &str, big: &str) {
    // Grow disk: below the product minimum is refused naming the field.
    let act = format!("/v1/instances/{id}/actions");
    let r = s
        .post(&act, t, json!({"action": "grow-disk", "root_disk_gib": 40}))
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "root_disk_gib"),
        "{}",
        r.body
    );
    let r = s.post(&act, t, json!({"action": "reboot"})).await;
    assert_eq!(r.status, 202);
    let r = s.post(&act, t, json!({"action": "stop"})).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("pending operation"), "{}", r.body);
    s.observe(id, "Running").await;
    s.ok(Method::POST, &act, t, Some(json!({"action": "stop"})), 202)
        .await;
    s.observe(id, "Stopped").await;
    let r = s.post(&act, t, json!({"action": "reboot"})).await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (409, "cannot reboot an instance that is Stopped")
    );
    // Change type on the same host: 1 -> 2 GPUs.
    s.ok(
        Method::POST,
        &act,
        t,
        Some(json!({"action": "change-type", "flavor": big})),
        202,
    )
    .await;
    s.observe(id, "Stopped").await;
    let hw = s.get(&format!("/v1/instances/{id}/hardware"), t).await.body;
    assert_eq!(hw["gpus"].as_array().unwrap().len(), 2);
    s.ok(
        Method::POST,
        &act,
        t,
        Some(json!({"action": "grow-disk", "root_disk_gib": 80})),
        202,
    )
    .await;
    s.observe(id, "Stopped").await;
    s.ok(
        Method::POST,
        &act,
        t,
        Some(json!({"action": "release"})),
        202,
    )
    .await;
    s.observe(id, "Releasing").await;
    s.observe(id, "Released").await;
}

/// A Released instance answers only config and hardware; its host
/// resources and volume are free again.
async fn released(s: &Server, t: &str, id: &str, host: &str) {
    // Released: only config and hardware answer; resources are free again.
    for v in ["", "/access", "/monitor", "/billing"] {
        let r = s.get(&format!("/v1/instances/{id}{v}"), t).await;
        assert_eq!(r.status, 409, "{v}");
        assert!(r.error().contains("is Released"), "{}", r.body);
    }
    assert_eq!(
        s.get(&format!("/v1/instances/{id}/config"), t).await.status,
        200
    );
    let h = s.get(&format!("/v1/admin/hosts/{host}"), ADMIN).await.body;
    // The detached 200 GiB data volume stays on the host, counted.
    assert_eq!(
        (h["used_vcpus"].as_u64(), h["used_disk_gib"].as_u64()),
        (Some(0), Some(200))
    );
    assert!(h["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .all(|g| g["instance"].is_null()));
    let v = s.get("/v1/volumes", t).await.body;
    assert!(v[0]["instance"].is_null());
    assert_eq!(
        s.get("/v1/instances?status=Released", t)
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

async fn batch(s: &Server, t: &str, id: &str, f: &str, img: &str) {
    // Batch: one result per instance.
    let a = s
        .post(
            "/v1/instances",
            t,
            json!({"name": "b1", "flavor": f, "image": img}),
        )
        .await
        .id();
    let b = s
        .post(
            "/v1/instances",
            t,
            json!({"name": "b2", "flavor": f, "image": img}),
        )
        .await
        .id();
    s.observe(&a, "Running").await;
    let r = s
        .post(
            "/v1/instances/batch",
            t,
            json!({"instances": [a, b, id], "request": {"action": "reboot"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let codes: Vec<u64> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, vec![202, 409, 409]);
    assert_eq!(
        r.body[1]["error"],
        "cannot reboot an instance that is Creating"
    );
}

async fn snapshots(s: Server) {
    let (acct, t) = s.account("snappy").await;
    s.host("h1", "L4", 4).await;
    let f = s.flavor("l4", Some("L4"), 1).await;
    let img = s.image("ubuntu").await;
    let id = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w", "flavor": f, "image": img}),
        )
        .await
        .id();
    let snap = format!("/v1/instances/{id}/snapshots");
    let r = s.post(&snap, &t, json!({"name": "s1"})).await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (409, "cannot snapshot an instance that is Creating")
    );
    s.observe(&id, "Running").await;
    let r = s.post(&snap, &t, json!({"name": "bad/name"})).await;
    assert_eq!((r.status, r.field().as_str()), (422, "name"));
    let r = s.post(&snap, &t, json!({"name": "x".repeat(51)})).await;
    assert_eq!((r.status, r.field().as_str()), (422, "name"));
    let acc = format!("/v1/admin/accounts/{acct}");
    s.ok(
        Method::PATCH,
        &acc,
        ADMIN,
        Some(json!({"billing_profile_complete": false})),
        200,
    )
    .await;
    let r = s.post(&snap, &t, json!({"name": "s1"})).await;
    assert_eq!(r.status, 402);
    assert!(r.error().contains("billing profile"), "{}", r.body);
    s.ok(
        Method::PATCH,
        &acc,
        ADMIN,
        Some(json!({"billing_profile_complete": true})),
        200,
    )
    .await;
    s.ok(
        Method::POST,
        &format!("{acc}/credits"),
        ADMIN,
        Some(json!({"amount_micros": -100_000_000})),
        200,
    )
    .await;
    let r = s.post(&snap, &t, json!({"name": "s1"})).await;
    assert_eq!(r.status, 402);
    assert!(r.error().contains("no credit"), "{}", r.body);
    s.ok(
        Method::POST,
        &format!("{acc}/credits"),
        ADMIN,
        Some(json!({"amount_micros": 5_000_000})),
        200,
    )
    .await;
    s.ok(
        Method::PATCH,
        &acc,
        ADMIN,
        Some(json!({"snapshot_quota_gib": 0})),
        200,
    )
    .await;
    let r = s.post(&snap, &t, json!({"name": "s1"})).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("quota"), "{}", r.body);
    s.ok(
        Method::PATCH,
        &acc,
        ADMIN,
        Some(json!({"snapshot_quota_gib": 100})),
        200,
    )
    .await;
    let r = s
        .post(
            &snap,
            &t,
            json!({"name": "before upgrade", "description": "v1", "as_image": true}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["status"], "Creating");
    let sid = r.id();
    snapshotting(&s, &t, &id, &sid).await;
    snapshot_success(&s, &t, &id, &sid, &f).await;
}

/// While Snapshotting only config and hardware answer.
async fn snapshotting(s: &Server, t: &str, id: &str, sid: &str) {
    let snap = format!("/v1/instances/{id}/snapshots");
    // A second snapshot with the same name is refused once the first settles.
    s.observe(id, "Snapshotting").await;
    for v in ["", "/access", "/monitor", "/billing"] {
        let r = s.get(&format!("/v1/instances/{id}{v}"), t).await;
        assert_eq!(r.status, 409, "{v}");
        assert!(r.error().contains("Snapshotting"), "{}", r.body);
    }
    for v in ["/config", "/hardware"] {
        assert_eq!(
            s.get(&format!("/v1/instances/{id}{v}"), t).await.status,
            200,
            "{v}"
        );
    }
    let r = s
        .post(
            &format!("/v1/instances/{id}/actions"),
            t,
            json!({"action": "stop"}),
        )
        .await;
    assert_eq!(r.status, 409);
    let rows = s.get("/v1/instances?status=Snapshotting", t).await.body;
    assert_eq!(rows[0]["status"], "Snapshotting");
    // A host of the previous version reports the old phases: read as
    // Snapshotting.
    s.observe(id, "Paused").await;
    let mon = s.get(&format!("/v1/instances/{id}/config"), t).await;
    assert_eq!(mon.status, 200);
    let rows = s.get("/v1/instances?status=Snapshotting", t).await.body;
    assert_eq!(rows[0]["state"], "Snapshotting");
    s.observe(id, "Running").await;
    // Until the host reports the snapshot operation, the instance is busy.
    let r = s.post(&snap, t, json!({"name": "other"})).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("pending operation"), "{}", r.body);
    let list = s.get("/v1/snapshots?status=Creating", t).await.body;
    assert_eq!(list[0]["id"], sid);
    let r = s
        .call(Method::DELETE, &format!("/v1/snapshots/{sid}"), t, None)
        .await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("still being created"));
}

async fn snapshot_success(s: &Server, t: &str, id: &str, sid: &str, f: &str) {
    // The host reports success: the snapshot counts against the quota and,
    // made as an image, new instances can start from it.
    let r = s.finish_snapshot(id, 20u64 << 30, 3u64 << 30).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let snap = s.get(&format!("/v1/snapshots/{sid}"), t).await.body;
    assert_eq!(
        (snap["status"].as_str(), snap["logical_bytes"].as_u64()),
        (Some("Success"), Some(20u64 << 30))
    );
    // The name is now taken.
    let r = s
        .post(
            &format!("/v1/instances/{id}/snapshots"),
            t,
            json!({"name": "before upgrade"}),
        )
        .await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("already exists"), "{}", r.body);
    // Its compressed size is reserved until its host's store reports
    // hold it; then the account's deduplicated bytes count.
    let acc = s.get("/v1/account", t).await.body;
    assert_eq!(
        (
            acc["snapshot_used_bytes"].as_u64(),
            acc["snapshot_reserved_bytes"].as_u64()
        ),
        (Some(0), Some(3u64 << 30))
    );
    let imgs = s.get("/v1/images", t).await.body;
    assert!(imgs
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["source_snapshot"] == sid));
    let r = s
        .post(
            "/v1/instances",
            t,
            json!({"name": "w2", "flavor": f, "snapshot": sid}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let cfg = s
        .get(&format!("/v1/instances/{}/config", r.id()), t)
        .await
        .body;
    assert_eq!(cfg["snapshot"], sid);
    assert!(cfg["image"].as_str().unwrap().starts_with("img-"));
    // Another account neither sees the image nor can start from the snapshot.
    let (_, other) = s.account("other").await;
    let r = s
        .post(
            "/v1/instances",
            &other,
            json!({"name": "w3", "flavor": f, "snapshot": sid}),
        )
        .await;
    assert_eq!((r.status, r.field().as_str()), (422, "snapshot"));
    let imgs = s.get("/v1/images", &other).await.body;
    assert_eq!(imgs.as_array().unwrap().len(), 1);
    s.ok(
        Method::DELETE,
        &format!("/v1/snapshots/{sid}"),
        t,
        None,
        200,
    )
    .await;
}

async fn scheduling(s: Server) {
    let (_, t) = s.account("sched").await;
    let h_a = s.host("a", "H100", 4).await;
    let h_b = s.host("b", "H100", 4).await;
    let h_cpu = s.host("cpu", "none", 0).await;
    let one = s.flavor("h100x1", Some("H100"), 1).await;
    let eight = s.flavor("h100x8", Some("H100"), 8).await;
    let cpu = s.flavor("cpu", None, 0).await;
    let img = s.image("ubuntu").await;
    let mk = |name: &str, flavor: &str, placement: &str| json!({"name": name, "flavor": flavor, "image": img, "placement": placement});
    // Pack: both GPUs land on the same host.
    let p1 = s.post("/v1/instances", &t, mk("p1", &one, "pack")).await;
    let p2 = s.post("/v1/instances", &t, mk("p2", &one, "pack")).await;
    assert_eq!(p1.body["host"], p2.body["host"], "{} {}", p1.body, p2.body);
    // Spread: the emptier host.
    let sp = s.post("/v1/instances", &t, mk("s1", &one, "spread")).await;
    assert_ne!(sp.body["host"], p1.body["host"]);
    // CPU-only work goes to the host without GPUs.
    let c = s.post("/v1/instances", &t, mk("c1", &cpu, "pack")).await;
    assert_eq!(c.body["host"], h_cpu.as_str());
    let r = s.post("/v1/instances", &t, mk("big", &eight, "pack")).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.error(), "no host has 8 free H100 GPUs; largest is 3");
    // Cordoned and unhealthy hosts are skipped.
    let used = p1.body["host"].as_str().unwrap().to_string();
    let other = if used == h_a {
        h_b.clone()
    } else {
        h_a.clone()
    };
    s.ok(
        Method::POST,
        &format!("/v1/admin/hosts/{other}/cordon"),
        ADMIN,
        None,
        200,
    )
    .await;
    let r = s.heartbeat(&used, json!({"health": "unhealthy"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.post("/v1/instances", &t, mk("x", &one, "pack")).await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (409, "no host has 1 free H100 GPUs; largest is 0"),
        "{}",
        r.body
    );
    s.ok(
        Method::POST,
        &format!("/v1/admin/hosts/{other}/uncordon"),
        ADMIN,
        None,
        200,
    )
    .await;
    let r = s.post("/v1/instances", &t, mk("y", &one, "pack")).await;
    assert_eq!(
        (r.status, r.body["host"].as_str()),
        (202, Some(other.as_str()))
    );
    s.ok(
        Method::POST,
        &format!("/v1/admin/hosts/{other}/drain"),
        ADMIN,
        None,
        200,
    )
    .await;
    let h = s.get(&format!("/v1/admin/hosts/{other}"), ADMIN).await.body;
    assert_eq!(
        (
            h["cordoned"].as_bool(),
            h["draining"].as_bool(),
            h["instances"].as_u64()
        ),
        (Some(true), Some(true), Some(2))
    );
}

async fn concurrent_creates_never_double_book(s: Server) {
    let (_, t) = s.account("race").await;
    for i in 0..4 {
        s.host(&format!("h{i}"), "H100", 4).await;
    }
    let f = s.flavor("h100x1", Some("H100"), 1).await;
    let img = s.image("ubuntu").await;
    let s = std::sync::Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (s, t, f, img) = (s.clone(), t.clone(), f.clone(), img.clone());
        tasks.push(tokio::spawn(async move {
            s.post(
                "/v1/instances",
                &t,
                json!({"name": format!("r{i}"), "flavor": f, "image": img}),
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
                r.error().starts_with("no host has 1 free H100 GPUs"),
                "{}",
                r.body
            ),
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert_eq!(ok, 16);
    let hosts = s.get("/v1/admin/hosts", ADMIN).await.body;
    let mut holders = HashSet::new();
    for h in hosts.as_array().unwrap() {
        assert_eq!(h["used_vcpus"], 16, "{h}");
        for g in h["gpus"].as_array().unwrap() {
            let owner = g["instance"]
                .as_str()
                .expect("every GPU is booked")
                .to_string();
            assert!(holders.insert(owner), "an instance holds two GPUs");
        }
    }
    assert_eq!(holders.len(), 16);
}
