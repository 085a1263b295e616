//! The agent protocol over real HTTP, driven by simulated hosts (the test
//! harness joins them with join tokens and calls `/v1/agent/*` as an agent
//! would), each test on SQLite and on PostgreSQL: join and credentials,
//! who may call what, the work long-poll, idempotent operation reports,
//! snapshots and host health. Billing is in `billing.rs`.

#[macro_use]
mod common;

use common::{eventually, Server, ADMIN};
use gantry_controller::Config;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

on_both!(join_and_credentials);
on_both!(who_may_call_what);
on_both!(work_long_poll_and_reports);
on_both!(failed_resizes_are_undone);
on_both!(snapshots_through_operations);
on_both!(many_instances_in_one_heartbeat);
on_both!(concurrent_heartbeats_bill_once_and_a_revoked_one_fails_alone);
on_both!(heartbeat_timeout, |c: &mut Config| {
    c.heartbeat_timeout_secs = 1;
    c.reconcile_secs = 1;
});

fn join_body(name: &str) -> Value {
    json!({"name": name, "address": "10.0.0.5", "capacity": Server::capacity("H100", 2)})
}

async fn join_and_credentials(s: Server) {
    let r = s
        .post("/v1/admin/join-tokens", ADMIN, json!({"ttl_secs": 0}))
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "ttl_secs"),
        "{}",
        r.body
    );
    let r = s
        .post(
            "/v1/admin/join-tokens",
            ADMIN,
            json!({"ttl_secs": 8 * 86400}),
        )
        .await;
    assert_eq!((r.status, r.field().as_str()), (422, "ttl_secs"));
    let token = s.join_token().await;
    assert!(token.starts_with("gjt_"), "{token}");
    let r = s.post("/v1/agent/join", &token, join_body("gpu1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let host = r.body["host"].as_str().unwrap().to_string();
    let first = r.body["credential"].as_str().unwrap().to_string();
    assert!(first.starts_with("ghc_"));
    assert_eq!(r.body["heartbeat_secs"], 10);
    let h = s.get(&format!("/v1/admin/hosts/{host}"), ADMIN).await.body;
    assert_eq!(
        (h["name"].as_str(), h["gpus"].as_array().unwrap().len()),
        (Some("gpu1"), 2)
    );
    // Join tokens are single-use: the same token and name again is refused
    // and the host keeps its credential (see tests/hardening.rs).
    let r = s.post("/v1/agent/join", &token, join_body("gpu1")).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.error().contains("already used"), "{}", r.body);
    let second = first;
    assert_eq!(
        s.get("/v1/agent/work?wait_secs=0", &second).await.status,
        200
    );
    join_reuse(&s, &token, &second).await;
}

/// Join tokens reused wrongly, expired or forged; pre-registered hosts;
/// the audit log.
async fn join_reuse(s: &Server, token: &str, second: &str) {
    // Any other reuse is refused.
    let r = s.post("/v1/agent/join", token, join_body("gpu2")).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.error().contains("already used"), "{}", r.body);
    let other = s.join_token().await;
    let r = s.post("/v1/agent/join", &other, join_body("gpu1")).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let short = s
        .ok(
            Method::POST,
            "/v1/admin/join-tokens",
            ADMIN,
            Some(json!({"ttl_secs": 1})),
            201,
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = s
        .post(
            "/v1/agent/join",
            short["token"].as_str().unwrap(),
            join_body("gpu3"),
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(r.error().contains("expired"), "{}", r.body);
    let forged = format!("{}0000", &token[..token.len() - 4]);
    assert_eq!(
        s.post("/v1/agent/join", &forged, join_body("gpu4"))
            .await
            .status,
        401
    );
    // A pre-registered host is adopted by its first join.
    let pre = s.registered_host("gpu5", "L4", 1).await;
    let r = s.post("/v1/agent/join", &other, join_body("gpu5")).await;
    assert_eq!(
        (r.status, r.body["host"].as_str()),
        (201, Some(pre.as_str())),
        "{}",
        r.body
    );
    let h = s.get(&format!("/v1/admin/hosts/{pre}"), ADMIN).await.body;
    assert_eq!(h["gpus"][0]["model"], "H100", "{h}");
    // Joins are audited, heartbeats are not.
    let hb = s
        .post(
            "/v1/agent/heartbeat",
            second,
            json!({"sent_at_ms": 1, "capacity": Server::capacity("H100", 2),
                "health": "healthy", "instances": [], "usage": []}),
        )
        .await;
    assert_eq!(hb.status, 200, "{}", hb.body);
    let log = s.get("/v1/admin/audit", ADMIN).await.body;
    let paths: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"/v1/agent/join"), "{paths:?}");
    assert!(!paths.contains(&"/v1/agent/heartbeat"), "{paths:?}");
}

async fn who_may_call_what(s: Server) {
    let (_, tenant) = s.account("acme").await;
    let a = s.host("a", "H100", 2).await;
    let b = s.host("b", "H100", 0).await;
    let f = s.flavor("g1", Some("H100"), 1).await;
    let img = s.image("ubuntu").await;
    let ins = s
        .post(
            "/v1/instances",
            &tenant,
            json!({"name": "w", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(
        (ins.status, ins.body["host"].as_str()),
        (202, Some(a.as_str()))
    );
    let op = ins.body["operation"].as_str().unwrap().to_string();
    // Host B may not report host A's operation.
    let r = s
        .report(&b, &op, json!({"outcome": "succeeded", "progress": 100}))
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.error(), format!("operation {op} belongs to another host"));
    assert_eq!(
        s.get(&format!("/v1/operations/{op}"), ADMIN).await.body["state"],
        "pending"
    );
    let r = s
        .report(
            &b,
            "op-00000000000000000000000000000000",
            json!({"outcome": "running", "progress": 1}),
        )
        .await;
    assert_eq!(r.status, 404);
    // B's work does not show A's instance or operation, and B's heartbeat
    // cannot change A's instance.
    let w = s.work(&b, 0).await;
    assert_eq!(
        (
            w["ops"].as_array().unwrap().len(),
            w["instances"].as_array().unwrap().len()
        ),
        (0, 0)
    );
    let id = ins.id();
    let r = s
        .heartbeat(&b, json!({"instances": [{"id": id, "state": "Failed"}]}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.get(&format!("/v1/instances/{id}"), &tenant).await.body["state"],
        "Creating"
    );
    credentials_stay_in_lane(&s, &tenant, &b, &id).await;
}

/// Every credential kind is refused outside its own paths.
async fn credentials_stay_in_lane(s: &Server, tenant: &str, b: &str, id: &str) {
    // A host credential reaches nothing but /v1/agent/*.
    let cred = s.cred(b);
    for path in [
        "/v1/flavors",
        "/v1/admin/hosts",
        "/v1/instances",
        &format!("/v1/instances/{id}"),
    ] {
        let r = s.get(path, &cred).await;
        assert_eq!(r.status, 403, "{path}: {}", r.body);
    }
    assert_eq!(
        s.post("/v1/agent/join", &cred, join_body("x")).await.status,
        403
    );
    // Tenants and admins do not call the agent protocol; join tokens only join.
    for t in [tenant, ADMIN] {
        assert_eq!(s.get("/v1/agent/work", t).await.status, 403);
        assert_eq!(
            s.post("/v1/agent/heartbeat", t, json!({})).await.status,
            403
        );
    }
    let jt = s.join_token().await;
    assert_eq!(s.get("/v1/flavors", &jt).await.status, 403);
    assert_eq!(s.get("/v1/agent/work", &jt).await.status, 403);
    let r = s.get("/v1/agent/work?wait_secs=61", &cred).await;
    assert_eq!((r.status, r.field().as_str()), (422, "wait_secs"));
}

async fn work_long_poll_and_reports(s: Server) {
    let (_, t) = s.account("acme").await;
    let h = s.host("h", "A100", 2).await;
    let f = s.flavor("a1", Some("A100"), 1).await;
    let img = s.image("ubuntu").await;
    let vol = s
        .post("/v1/volumes", &t, json!({"name": "data", "size_gib": 100}))
        .await
        .id();
    // Nothing to do: an empty answer once wait_secs has passed.
    let start = Instant::now();
    let w = s.poll(&h, 1).await;
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        w,
        json!({"instances": [], "ops": [], "access": null, "tls": null, "groups": null,
            "buckets": null})
    );
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w", "flavor": f, "image": img, "data_volume": vol}),
        )
        .await;
    let id = r.id();
    let op = r.body["operation"].as_str().unwrap().to_string();
    // A pending operation answers at once, with the whole command.
    let start = Instant::now();
    let w = s.work(&h, 30).await;
    assert!(start.elapsed() < Duration::from_secs(10));
    let o = &w["ops"][0];
    assert_eq!(
        (o["id"].as_str(), o["phase"].as_str()),
        (Some(op.as_str()), Some("pending"))
    );
    let c = &o["command"];
    assert_eq!(c["kind"], "create");
    assert_eq!(c["spec"]["gpus"], json!(["0000:10:00.0"]));
    assert_eq!(
        c["spec"]["data_volume"],
        json!({"id": vol, "size_gib": 100})
    );
    assert_eq!(
        (
            c["spec"]["vcpus"].as_u64(),
            c["spec"]["memory_mib"].as_u64()
        ),
        (Some(4), Some(8192))
    );
    let origin = &c["image"]["origin"];
    assert_eq!(
        (origin["from"].as_str(), origin["disk"].as_str()),
        (Some("file"), Some("/srv/images/ubuntu.qcow2"))
    );
    assert_eq!(c["image"]["image"], img.as_str());
    assert_eq!(
        w["instances"][0],
        json!({"id": id, "desired": "Running", "observed": "Creating"})
    );
    // Acknowledged: now the poll waits.
    let r = s
        .report(&h, &op, json!({"outcome": "running", "progress": 40}))
        .await;
    assert_eq!(r.status, 204);
    let info = s.get(&format!("/v1/operations/{op}"), &t).await.body;
    assert_eq!(
        (info["state"].as_str(), info["progress_percent"].as_u64()),
        (Some("running"), Some(40))
    );
    // The tenant's list shows it on the instance's row too.
    let list = s.get("/v1/instances", &t).await.body;
    let row = list
        .as_array()
        .and_then(|l| l.iter().find(|i| i["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} not listed: {list}"));
    assert_eq!(row["progress_percent"], 40, "{row}");
    let start = Instant::now();
    let w = s.poll(&h, 1).await;
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert_eq!(w["ops"][0]["phase"], "running");
    reports_and_wakes(&s, &t, &h, &op, &id).await;
    failed_create(&s, &t, &h, &f, &img, &id).await;
}

/// Idempotent reports, and a poll woken early by a new operation.
async fn reports_and_wakes(s: &Server, t: &str, h: &str, op: &str, id: &str) {
    // Succeeded twice: one state change, the second report changes nothing.
    let done = json!({"outcome": "succeeded", "progress": 100, "instance_state": "Running"});
    assert_eq!(s.report(h, op, done.clone()).await.status, 204);
    let after = s.get(&format!("/v1/operations/{op}"), t).await.body;
    assert_eq!(s.report(h, op, done).await.status, 204);
    let fail = json!({"outcome": "failed", "progress": 0, "error": "late"});
    assert_eq!(s.report(h, op, fail).await.status, 204);
    assert_eq!(s.get(&format!("/v1/operations/{op}"), t).await.body, after);
    assert_eq!(after["state"], "succeeded");
    assert_eq!(
        s.get(&format!("/v1/instances/{id}"), t).await.body["state"],
        "Running"
    );
    // Op reports are host traffic: kept in the operation, not audited.
    let log = s.get("/v1/admin/audit?limit=1000", ADMIN).await.body;
    let reported = format!("/v1/agent/ops/{op}");
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .all(|e| e["path"] != reported.as_str()),
        "{log}"
    );
    // A new operation wakes a waiting poll early.
    let cred = s.cred(h);
    let url = format!("{}/v1/agent/work?wait_secs=30&{}", s.url, s.known(h).await);
    let http = s.http.clone();
    let start = Instant::now();
    let poll = tokio::spawn(async move {
        let r = http.get(url).bearer_auth(cred).send().await.unwrap();
        (r.json::<Value>().await.unwrap(), start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = s
        .ok(
            Method::POST,
            &format!("/v1/instances/{id}/actions"),
            t,
            Some(json!({"action": "stop"})),
            202,
        )
        .await;
    let (w, took) = poll.await.unwrap();
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(w["ops"][0]["id"], stop["operation"]);
    assert_eq!(w["ops"][0]["command"], json!({"kind": "stop"}));
}

/// A failed create: the instance is Failed and its resources are free.
async fn failed_create(s: &Server, t: &str, h: &str, f: &str, img: &str, id: &str) {
    // A failed create: the instance is Failed and its resources are free.
    let r = s
        .post(
            "/v1/instances",
            t,
            json!({"name": "bad", "flavor": f, "image": img}),
        )
        .await;
    let bad = r.id();
    let op = r.body["operation"].as_str().unwrap();
    let r = s
        .report(
            h,
            op,
            json!({"outcome": "failed", "progress": 10, "error": "no disk space"}),
        )
        .await;
    assert_eq!(r.status, 204);
    let info = s.get(&format!("/v1/operations/{op}"), t).await.body;
    assert_eq!(
        (info["state"].as_str(), info["error"].as_str()),
        (Some("failed"), Some("no disk space"))
    );
    let rows = s.get("/v1/instances?status=Failed", t).await.body;
    assert_eq!(rows[0]["id"], bad.as_str());
    let host = s.get(&format!("/v1/admin/hosts/{h}"), ADMIN).await.body;
    assert_eq!(host["used_vcpus"], 4, "{host}");
    let held: Vec<&Value> = host["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| !g["instance"].is_null())
        .collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0]["instance"], id);
}

async fn snapshots_through_operations(s: Server) {
    let (_, t) = s.account("snappy").await;
    // Two hosts: restores must still land on the snapshot's.
    let hosts = [s.host("h", "L4", 3).await, s.host("o", "L4", 3).await];
    let f = s.flavor("l4", Some("L4"), 1).await;
    let img = s.image("ubuntu").await;
    let id = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w", "flavor": f, "image": img, "placement": "pack"}),
        )
        .await
        .id();
    let home = s.host_of(&id).await;
    s.observe(&id, "Running").await;
    let snap = s
        .ok(
            Method::POST,
            &format!("/v1/instances/{id}/snapshots"),
            &t,
            Some(json!({"name": "s1", "as_image": true, "auto_release": false})),
            202,
        )
        .await;
    let sid = snap["id"].as_str().unwrap().to_string();
    let op = s.op_of(&id).await.unwrap();
    assert_eq!(op["command"]["snapshot"], sid.as_str());
    assert_eq!(
        (
            op["command"]["name"].as_str(),
            op["command"]["auto_release"].as_bool()
        ),
        (Some("s1"), Some(false))
    );
    assert_eq!(
        op["command"]["owner"],
        s.get("/v1/account", &t).await.body["id"]
    );
    // Success without sizes is refused; with them, Success and an image.
    let r = s
        .report(
            &home,
            op["id"].as_str().unwrap(),
            json!({"outcome": "succeeded", "progress": 100}),
        )
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "snapshot"),
        "{}",
        r.body
    );
    assert_eq!(s.finish_snapshot(&id, 10 << 30, 2 << 30).await.status, 204);
    let got = s.get(&format!("/v1/snapshots/{sid}"), &t).await.body;
    assert_eq!(
        (got["status"].as_str(), got["compressed_bytes"].as_u64()),
        (Some("Success"), Some(2 << 30))
    );
    let other = hosts.iter().find(|h| **h != home).unwrap();
    compacted_sizes(&s, &t, &home, other, &sid).await;
    let imgs = s.get("/v1/images", &t).await.body;
    let mine = imgs
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["source_snapshot"] == sid.as_str())
        .expect("image listed");
    restore_on_home(&s, &t, &home, &f, &img, &sid, mine["id"].as_str().unwrap()).await;
    snapshot_failure_and_delete(&s, &t, &id, &home, &sid).await;
}

/// After compacting its store a host reports smaller sizes for its
/// snapshots; another host's report, or a size above the logical size,
/// changes nothing.
async fn compacted_sizes(s: &Server, t: &str, home: &str, other: &str, sid: &str) {
    let size = |b: u64| json!({"snapshot_sizes": [{"snapshot": sid, "compressed_bytes": b}]});
    let shown = || async {
        s.get(&format!("/v1/snapshots/{sid}"), t).await.body["compressed_bytes"].as_u64()
    };
    assert_eq!(s.heartbeat(other, size(1)).await.status, 200);
    assert_eq!(s.heartbeat(home, size(11 << 30)).await.status, 200);
    assert_eq!(shown().await, Some(2 << 30));
    assert_eq!(s.heartbeat(home, size(1 << 30)).await.status, 200);
    assert_eq!(shown().await, Some(1 << 30));
}

/// Instances from the snapshot (or its image) land on its host.
async fn restore_on_home(
    s: &Server,
    t: &str,
    home: &str,
    f: &str,
    img: &str,
    sid: &str,
    image: &str,
) {
    // Instances from the snapshot (or its image) go to the snapshot's host
    // and restore it from that host's store.
    for body in [
        json!({"name": "r1", "flavor": f, "snapshot": sid}),
        json!({"name": "r2", "flavor": f, "image": image, "placement": "spread"}),
    ] {
        let r = s.post("/v1/instances", t, body).await;
        assert_eq!(
            (r.status, r.body["host"].as_str()),
            (202, Some(home)),
            "{}",
            r.body
        );
        let op = s.op_of(&r.id()).await.unwrap();
        let image = &op["command"]["image"];
        let origin = &image["origin"];
        assert_eq!(
            (&origin["from"], &origin["snapshot"], &origin["boot_like"]),
            (&json!("snapshot"), &json!(sid), &json!(img)),
            "{origin}"
        );
        // A host that never had the image it boots like can fetch it.
        let base = &origin["boot_like_source"];
        assert_eq!(base["image"], json!(img), "{origin}");
        assert_eq!(base["origin"]["from"], "file", "{origin}");
        assert_eq!(
            image["image"],
            format!("img-{}", sid.split_once('-').unwrap().1)
        );
    }
    s.ok(
        Method::POST,
        &format!("/v1/admin/hosts/{home}/cordon"),
        ADMIN,
        None,
        200,
    )
    .await;
    let r = s
        .post(
            "/v1/instances",
            t,
            json!({"name": "r3", "flavor": f, "snapshot": sid}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.error().contains(&format!("stored on host {home}")),
        "{}",
        r.body
    );
}

/// A failed snapshot keeps its reason; deleting a stored one asks its host
/// to drop it.
async fn snapshot_failure_and_delete(s: &Server, t: &str, id: &str, home: &str, sid: &str) {
    // A failed snapshot keeps its reason.
    let snap2 = s
        .ok(
            Method::POST,
            &format!("/v1/instances/{id}/snapshots"),
            t,
            Some(json!({"name": "s2"})),
            202,
        )
        .await;
    let op = s.op_of(id).await.unwrap();
    let r = s
        .report(
            home,
            op["id"].as_str().unwrap(),
            json!({"outcome": "failed", "progress": 30,
            "error": "store is full", "instance_state": "Running"}),
        )
        .await;
    assert_eq!(r.status, 204);
    let got = s
        .get(
            &format!("/v1/snapshots/{}", snap2["id"].as_str().unwrap()),
            t,
        )
        .await
        .body;
    assert_eq!(
        (got["status"].as_str(), got["error"].as_str()),
        (Some("Failed"), Some("store is full"))
    );
    // Deleting a stored snapshot asks its host to drop it.
    s.ok(
        Method::DELETE,
        &format!("/v1/snapshots/{sid}"),
        t,
        None,
        200,
    )
    .await;
    let w = s.work(home, 0).await;
    let del = w["ops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["command"]["kind"] == "delete-snapshot")
        .expect("delete op");
    assert_eq!(
        (
            del["command"]["snapshot"].as_str(),
            del["instance"].is_null()
        ),
        (Some(sid), true)
    );
    assert_eq!(
        s.report(
            home,
            del["id"].as_str().unwrap(),
            json!({"outcome": "succeeded", "progress": 100})
        )
        .await
        .status,
        204
    );
}

async fn heartbeat_timeout(s: Server) {
    let (_, t) = s.account("acme").await;
    let h = s.host("h", "none", 0).await;
    let f = s.flavor("c", None, 0).await;
    let img = s.image("ubuntu").await;
    eventually("the silent host is unhealthy", || async {
        s.get(&format!("/v1/admin/hosts/{h}"), ADMIN).await.body["health"] == "unhealthy"
    })
    .await;
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "x", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(r.status, 409);
    assert!(
        r.error().starts_with("no host is schedulable"),
        "{}",
        r.body
    );
    // The host says why it is unhealthy; the admin sees it.
    let why = "libvirt does not answer: connection refused";
    let r = s
        .heartbeat(&h, json!({"health": "unhealthy", "problems": [why]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let host = s.get(&format!("/v1/admin/hosts/{h}"), ADMIN).await.body;
    assert_eq!(host["problems"], json!([why]), "{host}");
    let r = s
        .heartbeat(&h, json!({"health": "unhealthy", "problems": ["a\nb"]}))
        .await;
    assert_eq!(
        (r.status, r.body["field"].as_str()),
        (422, Some("problems[0]"))
    );
    // A healthy heartbeat brings it back; an older one changes nothing.
    s.heartbeat(&h, json!({"health": "healthy"})).await;
    let host = s.get(&format!("/v1/admin/hosts/{h}"), ADMIN).await.body;
    assert_eq!(host["problems"], json!([]), "{host}");
    let r = s
        .heartbeat(&h, json!({"health": "unhealthy", "sent_at_ms": 5}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.get(&format!("/v1/admin/hosts/{h}"), ADMIN).await.body["health"],
        "healthy"
    );
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "y", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["host"].as_str()),
        (202, Some(h.as_str())),
        "{}",
        r.body
    );
}

async fn failed_resizes_are_undone(s: Server) {
    let (_, t) = s.account("acme").await;
    let h = s.host("h", "A100", 4).await;
    let one = s.flavor("a1", Some("A100"), 1).await;
    let two = s.flavor("a2", Some("A100"), 2).await;
    let img = s.image("ubuntu").await;
    let id = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w", "flavor": one, "image": img}),
        )
        .await
        .id();
    s.observe(&id, "Running").await;
    let act = format!("/v1/instances/{id}/actions");
    s.ok(Method::POST, &act, &t, Some(json!({"action": "stop"})), 202)
        .await;
    s.observe(&id, "Stopped").await;
    let fail = json!({"outcome": "failed", "progress": 0, "error": "qemu-img failed"});
    for body in [
        json!({"action": "grow-disk", "root_disk_gib": 80}),
        json!({"action": "change-type", "flavor": two}),
    ] {
        let op = s.ok(Method::POST, &act, &t, Some(body), 202).await;
        let r = s
            .report(&h, op["operation"].as_str().unwrap(), fail.clone())
            .await;
        assert_eq!(r.status, 204, "{}", r.body);
        let cfg = s.get(&format!("/v1/instances/{id}/config"), &t).await.body;
        assert_eq!(
            (cfg["flavor"].as_str(), cfg["root_disk_gib"].as_u64()),
            (Some(one.as_str()), Some(50))
        );
        let host = s.get(&format!("/v1/admin/hosts/{h}"), ADMIN).await.body;
        assert_eq!(
            (host["used_vcpus"].as_u64(), host["used_disk_gib"].as_u64()),
            (Some(4), Some(50)),
            "{host}"
        );
        let hw = s
            .get(&format!("/v1/instances/{id}/hardware"), &t)
            .await
            .body;
        assert_eq!(hw["gpus"].as_array().unwrap().len(), 1, "{hw}");
    }
    // Nothing is left pending: the instance takes actions again.
    s.ok(
        Method::POST,
        &act,
        &t,
        Some(json!({"action": "start"})),
        202,
    )
    .await;
}

/// One heartbeat for several instances of two accounts: only the changed
/// states move (a repeated instance's reports apply in order), every new
/// counter is charged once, with its own ledger row, and a repeated counter
/// is acknowledged but not charged again.
async fn many_instances_in_one_heartbeat(s: Server) {
    let (_, t) = s.account("acme").await;
    let (_, t2) = s.account("beta").await;
    s.host("h", "none", 0).await;
    let f = s.flavor("c", None, 0).await;
    let img = s.image("ubuntu").await;
    let mut ids = Vec::new();
    for (name, tok) in [("a", &t), ("b", &t), ("c", &t2)] {
        let body = json!({"name": name, "flavor": f, "image": img});
        let id = s.post("/v1/instances", tok, body).await.id();
        s.observe(&id, "Running").await;
        ids.push(id);
    }
    let credit = |v: &Value| v["credit_micros"].as_i64().unwrap();
    let before = [
        credit(&s.get("/v1/account", &t).await.body),
        credit(&s.get("/v1/account", &t2).await.body),
    ];
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    let counter = |id: &str, ms: u64| json!({"instance": id, "seq": 1, "running_ms": ms});
    let h = s.host_of(a).await;
    let r = s
        .heartbeat(
            &h,
            json!({"instances": [{"id": a, "state": "Running"}, {"id": b, "state": "Stopped"},
                {"id": c, "state": "Stopped"}, {"id": c, "state": "Running"}],
            "usage": [counter(a, 10_000), counter(b, 20_000), counter(c, 30_000),
                counter(c, 30_000)]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["billed"].as_array().map(Vec::len),
        Some(4),
        "{}",
        r.body
    );
    for (id, tok, want) in [(a, &t, "Running"), (b, &t, "Stopped"), (c, &t2, "Running")] {
        let got = s.get(&format!("/v1/instances/{id}"), tok).await.body;
        assert_eq!(got["state"], want, "{id}: {got}");
    }
    // 2_000_000 micros an hour.
    let amount = |secs: i64| secs * 2_000_000 / 3600;
    let after = [
        credit(&s.get("/v1/account", &t).await.body),
        credit(&s.get("/v1/account", &t2).await.body),
    ];
    assert_eq!(after[0], before[0] - amount(10) - amount(20));
    assert_eq!(after[1], before[1] - amount(30));
    for (id, tok, secs) in [(a, &t, 10), (b, &t, 20), (c, &t2, 30)] {
        let recs = s.get(&format!("/v1/usage?instance={id}"), tok).await.body;
        let amounts: Vec<i64> = recs
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["amount_micros"].as_i64().unwrap())
            .collect();
        assert_eq!(amounts, vec![amount(secs)], "{id}: {recs}");
    }
}

/// Thirteen hosts heartbeat at once (on SQLite they are applied in groups
/// of one transaction each: `api/heartbeats.rs`), one of them revoked
/// after its credential was last verified (its call passes the cached
/// check and is refused inside the transaction): the revoked one is
/// refused and changes nothing, every other is applied and billed once,
/// exactly.
async fn concurrent_heartbeats_bill_once_and_a_revoked_one_fails_alone(s: Server) {
    let (_, t) = s.account("acme").await;
    let f = s.flavor("c", None, 0).await;
    let img = s.image("ubuntu").await;
    let mut hosts = Vec::new();
    for i in 0..13 {
        hosts.push(s.host(&format!("h{i}"), "none", 0).await);
    }
    let mut running: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..12 {
        let body = json!({"name": format!("i{i}"), "flavor": f, "image": img});
        let id = s.post("/v1/instances", &t, body).await.id();
        s.observe(&id, "Running").await;
        running.entry(s.host_of(&id).await).or_default().push(id);
    }
    // The host to revoke has no instance; its credential is now cached.
    let revoked = hosts
        .iter()
        .find(|h| !running.contains_key(*h))
        .expect("13 hosts for 12 instances")
        .clone();
    assert_eq!(s.heartbeat(&revoked, json!({})).await.status, 200);
    sqlx::query("UPDATE hosts SET revoked_ms = 1 WHERE id = $1")
        .bind(&revoked)
        .execute(&s.db().await.pool)
        .await
        .unwrap();
    let credit = |v: &Value| v["credit_micros"].as_i64().unwrap();
    let before = credit(&s.get("/v1/account", &t).await.body);
    let calls = hosts.iter().map(|h| {
        let usage: Vec<Value> = running
            .get(h)
            .into_iter()
            .flatten()
            .map(|id| json!({"instance": id, "seq": 1, "running_ms": 36_000}))
            .collect();
        let states: Vec<Value> = running
            .get(h)
            .into_iter()
            .flatten()
            .map(|id| json!({"id": id, "state": "Running"}))
            .collect();
        let s = &s;
        async move {
            let r = s
                .heartbeat(h, json!({"instances": states, "usage": usage}))
                .await;
            (h.clone(), usage.len(), r)
        }
    });
    for (h, counters, r) in futures::future::join_all(calls).await {
        if h == revoked {
            assert_eq!(r.status, 401, "{}", r.body);
            assert!(r.error().contains("revoked"), "{}", r.body);
        } else {
            assert_eq!(r.status, 200, "{h}: {}", r.body);
            assert_eq!(
                r.body["billed"].as_array().map(Vec::len),
                Some(counters),
                "{}",
                r.body
            );
        }
    }
    // 36 s at 2,000,000 micros an hour, for each of the 12, once.
    let after = credit(&s.get("/v1/account", &t).await.body);
    assert_eq!(before - after, 12 * 36 * 2_000_000 / 3600);
    for ids in running.values() {
        for id in ids {
            let recs = s.get(&format!("/v1/usage?instance={id}"), &t).await.body;
            let n = recs.as_array().unwrap().len();
            assert_eq!(n, 1, "{id}: one usage record: {recs}");
        }
    }
}
