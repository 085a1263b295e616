//! GPUs through the controller, on SQLite and on PostgreSQL: per-GPU
//! health from the hosts' reports gates the scheduler's pools, concurrent
//! creates never book a GPU twice, an admin clears a quarantined GPU (a
//! host operation), the alias table matches flavor models to NVML names,
//! and change-type to and from a GPU flavor re-books GPUs and tells the
//! agent which it has.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::Row;

on_both!(health_gates_the_pool);
on_both!(concurrent_creates_never_book_a_gpu_twice);
on_both!(admin_clears_a_quarantined_gpu);
on_both!(aliases_match_flavor_models);
on_both!(change_type_books_and_frees_gpus);

const H100: &str = "NVIDIA H100 80GB HBM3";

fn pci(i: usize) -> String {
    format!("0000:{:02x}:00.0", 0x10 + i)
}

/// One GPU as a host reports it.
fn gpu(i: usize, health: Value) -> Value {
    json!({"model": H100, "pci": pci(i), "uuid": format!("GPU-{i:08}"),
        "memory_bytes": 85_520_809_984u64, "numa_node": i / 4, "health": health})
}

/// A host capacity with these GPUs.
fn capacity(gpus: Vec<Value>) -> Value {
    json!({"vcpus": 128, "memory_mib": 1_048_576, "disk_gib": 20_000, "gpus": gpus})
}

/// Eight GPUs: 0 quarantined, 1 checking, 2 lost, the rest healthy (`n`:
/// GPU 3's health).
fn eight(gpu3: Value) -> Value {
    let health = |i| match i {
        0 => json!({"state": "quarantined", "reason": "XID 79 (fell off the bus)"}),
        1 => json!({"state": "checking"}),
        2 => json!({"state": "lost"}),
        3 => gpu3.clone(),
        _ => json!({"state": "healthy"}),
    };
    capacity((0..8).map(|i| gpu(i, health(i))).collect())
}

async fn create(s: &Server, t: &str, name: &str, flavor: &str, img: &str) -> common::Reply {
    s.post(
        "/v1/instances",
        t,
        json!({"name": name, "flavor": flavor, "image": img}),
    )
    .await
}

/// Free GPUs in the host's pools, from the database.
async fn pool_free(s: &Server, host: &str) -> i64 {
    let db = s.db().await;
    let r = sqlx::query(
        "SELECT CAST(COALESCE(SUM(free), 0) AS BIGINT) AS n FROM host_gpu_pools WHERE host_id = $1",
    )
    .bind(host)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    r.get::<i64, _>("n")
}

async fn health_gates_the_pool(s: Server) {
    let (_, t) = s.account("acme").await;
    let h = s.host_with("g", eight(json!({"state": "healthy"}))).await;
    let hosts = s.get("/v1/admin/hosts", ADMIN).await.body;
    let gpus = hosts[0]["gpus"].as_array().unwrap();
    let states: Vec<&str> = gpus
        .iter()
        .map(|g| g["health"]["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "quarantined",
            "checking",
            "lost",
            "healthy",
            "healthy",
            "healthy",
            "healthy",
            "healthy"
        ]
    );
    assert_eq!(gpus[0]["health"]["reason"], "XID 79 (fell off the bus)");
    assert_eq!(
        (gpus[4]["uuid"].as_str(), gpus[4]["numa_node"].as_u64()),
        (Some("GPU-00000004"), Some(1))
    );
    assert_eq!(gpus[4]["memory_bytes"], 85_520_809_984u64);
    let f8 = s.flavor("h8", Some("H100"), 8).await;
    let f5 = s.flavor("h5", Some("H100"), 5).await;
    let img = s.image("ubuntu").await;
    let r = create(&s, &t, "big", &f8, &img).await;
    assert_eq!(
        (r.status, r.error()),
        (409, "no host has 8 free H100 GPUs; largest is 5".into())
    );
    // A heartbeat quarantining GPU 3 takes it out of the pool ...
    let q = eight(json!({"state": "quarantined", "reason": "uncorrected ECC"}));
    s.set_capacity(&h, q);
    assert_eq!(s.heartbeat(&h, json!({})).await.status, 200);
    assert_eq!(pool_free(&s, &h).await, 4);
    let r = create(&s, &t, "five", &f5, &img).await;
    assert_eq!(r.error(), "no host has 5 free H100 GPUs; largest is 4");
    // ... and its passing the gate again puts it back.
    s.set_capacity(&h, eight(json!({"state": "healthy"})));
    s.heartbeat(&h, json!({})).await;
    assert_eq!(pool_free(&s, &h).await, 5);
    let r = create(&s, &t, "five", &f5, &img).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.id();
    let hw = s
        .get(&format!("/v1/instances/{id}/hardware"), &t)
        .await
        .body;
    let want: Vec<String> = (3..8).map(pci).collect();
    assert_eq!(hw["gpus"], json!(want), "{hw}");
    assert_eq!(hw["gpu_devices"][0]["uuid"], "GPU-00000003");
    assert_eq!(hw["gpu_devices"][0]["health"]["state"], "healthy");
    assert_eq!(pool_free(&s, &h).await, 0);
    booked_gpus_stay_booked(&s, &h, &id, &t).await;
    metrics(&s).await;
}

/// The host reports the booked GPUs as leased to the instance: the
/// booking stays, the health shows, nothing becomes free.
async fn booked_gpus_stay_booked(s: &Server, h: &str, id: &str, t: &str) {
    let health = |i: usize| match i {
        0 => json!({"state": "quarantined", "reason": "XID 79 (fell off the bus)"}),
        1 | 2 => json!({"state": "healthy"}),
        _ => json!({"state": "leased"}),
    };
    let mut gpus: Vec<Value> = (0..8).map(|i| gpu(i, health(i))).collect();
    for g in gpus.iter_mut().skip(3) {
        g["instance"] = json!(id);
    }
    s.set_capacity(h, capacity(gpus));
    s.heartbeat(h, json!({})).await;
    // The same report again changes nothing.
    s.heartbeat(h, json!({})).await;
    let hw = s.get(&format!("/v1/instances/{id}/hardware"), t).await.body;
    assert_eq!(hw["gpus"].as_array().unwrap().len(), 5, "{hw}");
    assert_eq!(hw["gpu_devices"][4]["health"]["state"], "leased");
    assert_eq!(pool_free(s, h).await, 2);
}

async fn metrics(s: &Server) {
    let (status, ct, body) = s.text("/metrics", ADMIN).await;
    assert_eq!(status, 200, "{body}");
    assert!(ct.starts_with("text/plain"), "{ct}");
    for line in [
        "gantry_host_gpus{host=\"g\",health=\"quarantined\"} 1",
        "gantry_host_gpus{host=\"g\",health=\"leased\"} 5",
        "gantry_host_gpus{host=\"g\",health=\"healthy\"} 2",
        "gantry_host_gpus{host=\"g\",health=\"lost\"} 0",
    ] {
        assert!(body.contains(line), "{line} missing from\n{body}");
    }
    let (status, _, _) = s.text("/metrics", "not-a-token").await;
    assert_eq!(status, 401);
}

async fn concurrent_creates_never_book_a_gpu_twice(s: Server) {
    let (_, t) = s.account("acme").await;
    let h = s.host("g", H100, 8).await;
    let f1 = s.flavor("h1", Some("H100"), 1).await;
    let f2 = s.flavor("h2", Some("H100"), 2).await;
    let img = s.image("ubuntu").await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (http, url, t) = (s.http.clone(), s.url.clone(), t.clone());
        let flavor = if i % 4 == 3 { f2.clone() } else { f1.clone() };
        let body = json!({"name": format!("w{i}"), "flavor": flavor, "image": img});
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/instances"))
                .bearer_auth(t)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap(), i % 4 == 3)
        }));
    }
    let mut gpus_granted = 0;
    for task in tasks {
        let (status, body, two) = task.await.unwrap();
        match status {
            202 => gpus_granted += if two { 2 } else { 1 },
            409 => {
                let e = body["error"].as_str().unwrap();
                assert!(e.contains("free H100") || e.contains("racing"), "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let db = s.db().await;
    let rows = sqlx::query("SELECT pci, instance_id FROM host_gpus WHERE host_id = $1")
        .bind(&h)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let booked: Vec<String> = rows
        .iter()
        .filter_map(|r| r.get::<Option<String>, _>("instance_id"))
        .collect();
    assert_eq!(booked.len(), gpus_granted);
    assert!(gpus_granted >= 6, "only {gpus_granted} GPUs booked");
    let held = sqlx::query("SELECT COUNT(*) AS n FROM host_gpus WHERE instance_id IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap()
        .get::<i64, _>("n");
    assert_eq!(held as usize, gpus_granted);
    assert_eq!(pool_free(&s, &h).await, 8 - gpus_granted as i64);
}

async fn admin_clears_a_quarantined_gpu(s: Server) {
    let (_, t) = s.account("acme").await;
    let h = s.host_with("g", eight(json!({"state": "healthy"}))).await;
    let clear = |i: usize| format!("/v1/admin/hosts/{h}/gpus/{}/clear", pci(i));
    let r = s.post(&clear(0), ADMIN, json!({"note": "reseated"})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        (r.body["kind"].as_str(), r.body["state"].as_str()),
        (Some("clear-gpu"), Some("pending"))
    );
    let op = r.id();
    let w = s.work(&h, 0).await;
    let ops = w["ops"].as_array().unwrap();
    assert_eq!(ops.len(), 1, "{w}");
    assert_eq!(ops[0]["id"], op.as_str());
    assert_eq!(ops[0]["instance"], Value::Null);
    assert_eq!(
        ops[0]["command"],
        json!({"kind": "clear-gpu", "pci": pci(0)})
    );
    // Audited, with the note.
    let audit = s.get("/v1/admin/audit", ADMIN).await.body;
    let entry = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == clear(0) && e["status"] == 202)
        .cloned()
        .unwrap_or_else(|| panic!("no audit entry for the clear: {audit}"));
    assert!(
        entry["note"].as_str().unwrap_or("").contains("reseated"),
        "{entry}"
    );
    let again = s.post(&clear(0), ADMIN, json!({})).await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(
        again.error().contains("already under way"),
        "{}",
        again.error()
    );
    // A lost GPU, with no body at all.
    let r = s.raw(Method::POST, &clear(2), Some(ADMIN), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    clear_refusals(&s, &h, &t).await;
    // A tenant does not see host operations; the host finishes it.
    assert_eq!(s.get(&format!("/v1/operations/{op}"), &t).await.status, 404);
    let done = json!({"outcome": "succeeded", "progress": 100});
    assert_eq!(s.report(&h, &op, done).await.status, 204);
    let info = s.get(&format!("/v1/operations/{op}"), ADMIN).await.body;
    assert_eq!(info["state"], "succeeded", "{info}");
}

/// 409 for a healthy GPU, 403 for a tenant, 404 for an unknown GPU or host.
async fn clear_refusals(s: &Server, h: &str, t: &str) {
    let clear = |i: usize| format!("/v1/admin/hosts/{h}/gpus/{}/clear", pci(i));
    let r = s.post(&clear(5), ADMIN, json!({})).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("is healthy"), "{}", r.error());
    assert_eq!(s.post(&clear(0), t, json!({})).await.status, 403);
    let r = s
        .post(
            &format!("/v1/admin/hosts/{h}/gpus/0000:99:00.0/clear"),
            ADMIN,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = s
        .post(
            &format!("/v1/admin/hosts/{h}/gpus/nonsense/clear"),
            ADMIN,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let ghost = "host-00000000000000000000000000000000";
    let r = s
        .post(
            &format!("/v1/admin/hosts/{ghost}/gpus/{}/clear", pci(0)),
            ADMIN,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
}

async fn aliases_match_flavor_models(s: Server) {
    let (_, t) = s.account("acme").await;
    let list = s.get("/v1/admin/gpu-aliases", ADMIN).await.body;
    let h100 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alias"] == "H100")
        .expect("H100 is seeded");
    assert!(h100["models"].as_array().unwrap().contains(&json!(H100)));
    s.host("g", H100, 2).await;
    let img = s.image("ubuntu").await;
    let exact = s.flavor("exact", Some(H100), 1).await;
    assert_eq!(create(&s, &t, "e", &exact, &img).await.status, 202);
    let b200 = s.flavor("b", Some("B200"), 1).await;
    let r = create(&s, &t, "b", &b200, &img).await;
    assert_eq!(
        (r.status, r.error()),
        (409, "no host has 1 free B200 GPUs; largest is 0".into())
    );
    let path = "/v1/admin/gpu-aliases/B200";
    let set = |models: Value| s.call(Method::PUT, path, ADMIN, Some(json!({"models": models})));
    let r = set(json!(["NVIDIA B200", H100])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"alias": "B200", "models": ["NVIDIA B200", H100]})
    );
    assert_eq!(create(&s, &t, "b", &b200, &img).await.status, 202);
    for (models, field) in [
        (json!([]), "models"),
        (json!(["ok", ""]), "models[1]"),
        (json!(["bell\u{7}"]), "models[0]"),
        (json!(["x".repeat(97)]), "models[0]"),
        (json!(["a", "a"]), "models[1]"),
    ] {
        let r = set(models.clone()).await;
        assert_eq!(
            (r.status, r.field()),
            (422, field.to_string()),
            "{models}: {}",
            r.body
        );
    }
    let bad = s
        .call(
            Method::PUT,
            "/v1/admin/gpu-aliases/bad%20name",
            ADMIN,
            Some(json!({"models": ["m"]})),
        )
        .await;
    assert_eq!(
        (bad.status, bad.field()),
        (422, "alias".to_string()),
        "{}",
        bad.body
    );
    let r = s
        .call(Method::PUT, path, &t, Some(json!({"models": ["m"]})))
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(s.call(Method::DELETE, path, ADMIN, None).await.status, 204);
    assert_eq!(s.call(Method::DELETE, path, ADMIN, None).await.status, 404);
    let audit = s.get("/v1/admin/audit", ADMIN).await.body;
    let audited = |m: &str| {
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == path && e["method"] == m)
    };
    assert!(audited("PUT") && audited("DELETE"), "{audit}");
}

async fn change_type_books_and_frees_gpus(s: Server) {
    let (_, t) = s.account("acme").await;
    let h = s.host("g", H100, 4).await;
    let cpu = s.flavor("c", None, 0).await;
    let g2 = gpu_flavor(&s).await;
    let g8 = s.flavor("g8", Some("H100"), 8).await;
    let img = s.image("ubuntu").await;
    let id = create(&s, &t, "w", &cpu, &img).await.id();
    s.observe(&id, "Running").await;
    let act = format!("/v1/instances/{id}/actions");
    let change = |f: &str| json!({"action": "change-type", "flavor": f});
    // Only while stopped.
    let r = s.post(&act, &t, change(&g2)).await;
    assert_eq!(r.status, 409, "{}", r.body);
    s.ok(Method::POST, &act, &t, Some(json!({"action": "stop"})), 202)
        .await;
    s.observe(&id, "Stopped").await;
    let r = s.post(&act, &t, change(&g8)).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.error().contains("has 4 free healthy H100 GPUs"),
        "{}",
        r.error()
    );
    let gpus = change_type(&s, &h, &act, &t, &g2, "succeeded").await;
    assert_eq!(gpus, json!([pci(0), pci(1)]));
    let hw = s
        .get(&format!("/v1/instances/{id}/hardware"), &t)
        .await
        .body;
    assert_eq!(
        (&hw["gpus"], hw["vcpus"].as_u64()),
        (&gpus, Some(8)),
        "{hw}"
    );
    assert_eq!(hw["gpu_devices"][1]["pci"], pci(1));
    assert_eq!(pool_free(&s, &h).await, 2);
    billed_at_the_new_price(&s, &id, &t, &act).await;
    // Back to the CPU flavor, failed by the host: the old booking returns.
    assert_eq!(
        change_type(&s, &h, &act, &t, &cpu, "failed").await,
        json!([])
    );
    let hw = s
        .get(&format!("/v1/instances/{id}/hardware"), &t)
        .await
        .body;
    assert_eq!(hw["gpus"], gpus, "{hw}");
    assert_eq!(pool_free(&s, &h).await, 2);
    let host = s.get(&format!("/v1/admin/hosts/{h}"), ADMIN).await.body;
    assert_eq!(host["used_vcpus"], 8, "{host}");
    // Then for real: the GPUs go back to the pool.
    assert_eq!(
        change_type(&s, &h, &act, &t, &cpu, "succeeded").await,
        json!([])
    );
    let hw = s
        .get(&format!("/v1/instances/{id}/hardware"), &t)
        .await
        .body;
    assert_eq!(hw["gpus"], json!([]), "{hw}");
    assert_eq!(pool_free(&s, &h).await, 4);
}

/// Flavor g2: 2 H100s, 8 vCPUs, 2_000 micros a second.
async fn gpu_flavor(s: &Server) -> String {
    let body = json!({"name": "g2", "vcpus": 8, "memory_mib": 16384, "root_disk_gib": 50,
        "gpu_model": "H100", "gpu_count": 2, "price_micros_per_hour": 7_200_000});
    let f = s
        .ok(Method::POST, "/v1/admin/flavors", ADMIN, Some(body), 201)
        .await;
    f["id"].as_str().unwrap().to_string()
}

/// Asks for a change-type and has the host end it with `outcome`; returns
/// the GPUs the agent's `ChangeType` command carried.
async fn change_type(s: &Server, h: &str, act: &str, t: &str, f: &str, outcome: &str) -> Value {
    let body = json!({"action": "change-type", "flavor": f});
    let op = s.ok(Method::POST, act, t, Some(body), 202).await["operation"]
        .as_str()
        .unwrap()
        .to_string();
    let w = s.work(h, 0).await;
    let cmd = w["ops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == op.as_str())
        .expect("the change-type is in the work")["command"]
        .clone();
    assert_eq!(cmd["kind"], "change-type", "{cmd}");
    let r = s
        .report(
            h,
            &op,
            json!({"outcome": outcome, "progress": 100, "instance_state": "Stopped",
            "error": (outcome == "failed").then_some("virsh failed")}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    cmd["gpus"].clone()
}

/// Running time after the change is charged at the GPU flavor's price.
async fn billed_at_the_new_price(s: &Server, id: &str, t: &str, act: &str) {
    s.ok(Method::POST, act, t, Some(json!({"action": "start"})), 202)
        .await;
    s.observe(id, "Running").await;
    let host = s.host_of(id).await;
    let usage = json!({"usage": [{"instance": id, "seq": 1, "running_ms": 10_000}]});
    assert_eq!(s.heartbeat(&host, usage).await.status, 200);
    let bill = s.get(&format!("/v1/instances/{id}/billing"), t).await.body;
    assert_eq!(bill["price_micros_per_hour"], 7_200_000, "{bill}");
    assert_eq!(bill["cost_micros"], 20_000, "{bill}");
    s.ok(Method::POST, act, t, Some(json!({"action": "stop"})), 202)
        .await;
    s.observe(id, "Stopped").await;
}

#[tokio::test]
async fn migration_6_sqlite() {
    migration_6(common::Backend::Sqlite).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: ./scripts/test runs it"]
async fn migration_6_postgres() {
    migration_6(common::Backend::Postgres).await;
}

/// Version 6 reads existing GPUs as healthy with nothing else known, keeps
/// their pools, and seeds the alias table.
async fn migration_6(backend: common::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((pool, url)) = common::db_before_migration(backend, dir.path(), 6).await else {
        return;
    };
    for sql in [
        "INSERT INTO hosts (id, name, address, vcpus, memory_mib, disk_gib, health, \
         last_heartbeat_ms, created_ms) VALUES ('h1', 'h', 'a', 8, 8192, 100, 'healthy', 5, 5)",
        "INSERT INTO host_gpus (host_id, pci, model, instance_id) VALUES \
         ('h1', '0000:10:00.0', 'H100', NULL), ('h1', '0000:11:00.0', 'H100', 'ins-1')",
        "INSERT INTO host_gpu_pools (host_id, model, total, free) VALUES ('h1', 'H100', 2, 1)",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let db = gantry_controller::db::Db::connect(&url, 2).await.unwrap();
    let gpus: Vec<(String, Option<String>, Option<i64>)> =
        sqlx::query("SELECT health, uuid, memory_bytes FROM host_gpus ORDER BY pci")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
    assert_eq!(gpus, vec![("healthy".into(), None, None); 2]);
    let free: i64 = sqlx::query("SELECT free FROM host_gpu_pools")
        .fetch_one(&db.pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(free, 1);
    let models: Vec<String> =
        sqlx::query("SELECT model FROM gpu_aliases WHERE alias = 'H100' ORDER BY model")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(
        models,
        [
            "NVIDIA H100 80GB HBM3",
            "NVIDIA H100 NVL",
            "NVIDIA H100 PCIe"
        ]
    );
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM gpu_aliases")
        .fetch_one(&db.pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 12);
}
