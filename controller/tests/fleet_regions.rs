//! A fleet in regions, over real HTTP with simulated hosts, each test on
//! SQLite and on PostgreSQL: regions filter placement (and say so when a
//! region has no room), snapshots live in their instance's region and are
//! not used in another, an admin revokes a host's credential (refused at
//! once, its long-poll ended) and the host joins again with a new token,
//! keeping its id; and the placement shortlist (index walks) picks the same
//! host as weighing every host.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use gantry_controller::scheduler::{self, Need};
use gantry_proto::api::v1::Placement;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

on_both!(regions_filter_placement);
on_both!(snapshots_live_in_their_region);
on_both!(revoked_host_is_refused_and_rejoins);
on_both!(shortlist_matches_full_weighing);

/// Mints a join token (for `region`, if given).
async fn join_token(s: &Server, region: Option<&str>) -> String {
    let t = s
        .ok(
            Method::POST,
            "/v1/admin/join-tokens",
            ADMIN,
            Some(json!({ "region": region })),
            201,
        )
        .await;
    t["token"].as_str().unwrap().to_string()
}

/// Joins host `name` with `token`: the reply.
async fn join(s: &Server, token: &str, name: &str, cap: &Value) -> common::Reply {
    s.post(
        "/v1/agent/join",
        token,
        json!({"name": name, "address": format!("{name}.example"), "capacity": cap}),
    )
    .await
}

/// A simulated host joined in `region` through a join token naming it.
async fn host_in(s: &Server, name: &str, model: &str, gpus: usize, region: &str) -> String {
    let token = join_token(s, Some(region)).await;
    let cap = Server::capacity(model, gpus);
    let r = join(s, &token, name, &cap).await;
    assert_eq!(r.status, 201, "join: {}", r.body);
    let id = r.body["host"].as_str().unwrap().to_string();
    s.set_cred(&id, r.body["credential"].as_str().unwrap(), cap);
    id
}

async fn create(s: &Server, t: &str, body: Value) -> common::Reply {
    s.post("/v1/instances", t, body).await
}

async fn host_info(s: &Server, id: &str) -> Value {
    s.ok(
        Method::GET,
        &format!("/v1/admin/hosts/{id}"),
        ADMIN,
        None,
        200,
    )
    .await
}

async fn regions_filter_placement(s: Server) {
    let (_, t) = s.account("regional").await;
    let home = s.host("home", "L4", 4).await;
    let eu = host_in(&s, "eu", "L4", 2, "eu-1").await;
    assert_eq!(host_info(&s, &home).await["region"], "default");
    assert_eq!(host_info(&s, &eu).await["region"], "eu-1");
    let listed = s.get("/v1/admin/hosts", ADMIN).await.body;
    let regions: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["name"].as_str().unwrap(), h["region"].as_str().unwrap()))
        .collect();
    assert_eq!(regions, [("eu", "eu-1"), ("home", "default")]);
    // A bad region name is refused, naming the field.
    let r = s
        .post("/v1/admin/join-tokens", ADMIN, json!({"region": "EU_1"}))
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "region"),
        "{}",
        r.body
    );

    let f = s.flavor("l4", Some("L4"), 1).await;
    let img = s.image("ubuntu").await;
    // Both eu-1 instances land on the only eu-1 host, though "home" is
    // emptier and packing would prefer neither.
    for name in ["e1", "e2"] {
        let r = create(
            &s,
            &t,
            json!({"name": name, "flavor": f, "image": img, "region": "eu-1", "placement": "spread"}),
        )
        .await;
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.body["region"], "eu-1");
        assert_eq!(s.host_of(&r.id()).await, eu);
    }
    // eu-1 is full of L4s; "home" still has four, and is not used.
    let r = create(
        &s,
        &t,
        json!({"name": "e3", "flavor": f, "image": img, "region": "eu-1"}),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(
        r.error(),
        "no host has 1 free L4 GPUs; largest is 0 (region eu-1)"
    );
    // No region: the default one.
    let r = create(&s, &t, json!({"name": "d1", "flavor": f, "image": img})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["region"], "default");
    assert_eq!(s.host_of(&r.id()).await, home);
    let got = s.get(&format!("/v1/instances/{}", r.id()), &t).await.body;
    assert_eq!(got["region"], "default");
    // A region without hosts, and a malformed one.
    let r = create(
        &s,
        &t,
        json!({"name": "x1", "flavor": f, "image": img, "region": "ap-9"}),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().ends_with("(region ap-9)"), "{}", r.error());
    assert!(
        r.error().starts_with("no host is schedulable"),
        "{}",
        r.error()
    );
    let r = create(
        &s,
        &t,
        json!({"name": "x2", "flavor": f, "image": img, "region": "Europe!"}),
    )
    .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "region"),
        "{}",
        r.body
    );

    // Moving hosts between regions: not while instances are on them.
    let r = s
        .post(
            &format!("/v1/admin/hosts/{eu}/region"),
            ADMIN,
            json!({"region": "eu-2"}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.error().contains("2 instances in region eu-1"),
        "{}",
        r.error()
    );
    let spare = s.host("spare", "L4", 1).await;
    let moved = s
        .ok(
            Method::POST,
            &format!("/v1/admin/hosts/{spare}/region"),
            ADMIN,
            Some(json!({"region": "eu-1"})),
            200,
        )
        .await;
    assert_eq!(moved["region"], "eu-1");
    let r = create(
        &s,
        &t,
        json!({"name": "e3", "flavor": f, "image": img, "region": "eu-1"}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(s.host_of(&r.id()).await, spare);
    // Only admins move hosts.
    let r = s
        .post(
            &format!("/v1/admin/hosts/{spare}/region"),
            &t,
            json!({"region": "eu-2"}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
}

/// An instance from `img`, Running, with a Success snapshot: (instance,
/// snapshot).
async fn snapshotted(s: &Server, t: &str, body: Value) -> (String, String) {
    let r = create(s, t, body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.id();
    s.observe(&id, "Running").await;
    let snap = s
        .ok(
            Method::POST,
            &format!("/v1/instances/{id}/snapshots"),
            t,
            Some(json!({"name": format!("{id}-s"), "as_image": true})),
            202,
        )
        .await;
    assert_eq!(s.finish_snapshot(&id, 10 << 30, 2 << 30).await.status, 204);
    (id, snap["id"].as_str().unwrap().to_string())
}

async fn snapshots_live_in_their_region(s: Server) {
    let (_, t) = s.account("snaps").await;
    let home = s.host("home", "L4", 4).await;
    let eu = host_in(&s, "eu", "L4", 4, "eu-1").await;
    let f = s.flavor("l4", Some("L4"), 1).await;
    let img = s.image("ubuntu").await;
    let (_, eu_snap) = snapshotted(
        &s,
        &t,
        json!({"name": "a", "flavor": f, "image": img, "region": "eu-1"}),
    )
    .await;
    let (_, home_snap) = snapshotted(&s, &t, json!({"name": "b", "flavor": f, "image": img})).await;
    let got = s.get(&format!("/v1/snapshots/{eu_snap}"), &t).await.body;
    assert_eq!(
        (got["status"].as_str(), got["region"].as_str()),
        (Some("Success"), Some("eu-1"))
    );
    // Listed by region.
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect()
    };
    let eu_list = s.get("/v1/snapshots?region=eu-1", &t).await.body;
    assert_eq!(ids(&eu_list), std::slice::from_ref(&eu_snap));
    let home_list = s.get("/v1/snapshots?region=default", &t).await.body;
    assert_eq!(ids(&home_list), std::slice::from_ref(&home_snap));
    assert_eq!(ids(&s.get("/v1/snapshots", &t).await.body).len(), 2);
    let r = s.get("/v1/snapshots?region=EU%201", &t).await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (400, "region"),
        "{}",
        r.body
    );

    // Another region is refused with the reason; its own region (asked
    // for, or by default) is placed there.
    let want = format!(
        "snapshot {eu_snap} is in region eu-1, not default; copying between regions is not \
         supported yet"
    );
    let r = create(
        &s,
        &t,
        json!({"name": "c", "flavor": f, "snapshot": eu_snap, "region": "default"}),
    )
    .await;
    assert_eq!((r.status, r.error()), (409, want.clone()), "{}", r.body);
    let image = s.get("/v1/images", &t).await.body;
    let from_eu = image
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["source_snapshot"] == eu_snap.as_str())
        .expect("the snapshot's image")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = create(
        &s,
        &t,
        json!({"name": "d", "flavor": f, "image": from_eu, "region": "default"}),
    )
    .await;
    assert_eq!((r.status, r.error()), (409, want), "{}", r.body);
    for body in [
        json!({"name": "e", "flavor": f, "snapshot": eu_snap}),
        json!({"name": "g", "flavor": f, "image": from_eu, "region": "eu-1"}),
    ] {
        let r = create(&s, &t, body).await;
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.body["region"], "eu-1");
        assert_eq!(s.host_of(&r.id()).await, eu);
    }
    let r = create(
        &s,
        &t,
        json!({"name": "h", "flavor": f, "snapshot": home_snap}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(s.host_of(&r.id()).await, home);
}

async fn revoked_host_is_refused_and_rejoins(s: Server) {
    let (_, t) = s.account("revoke").await;
    let h = host_in(&s, "gpu1", "L4", 2, "eu-1").await;
    let f = s.flavor("l4", Some("L4"), 1).await;
    let img = s.image("ubuntu").await;
    let r = create(
        &s,
        &t,
        json!({"name": "w", "flavor": f, "image": img, "region": "eu-1"}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let inst = r.id();
    s.observe(&inst, "Running").await;
    assert_eq!(s.heartbeat(&h, json!({})).await.status, 200);
    let stale_token = join_token(&s, None).await;
    // Only admins revoke; an unknown host is 404.
    let r = s
        .post(&format!("/v1/admin/hosts/{h}/revoke"), &t, json!({}))
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = s
        .post(
            "/v1/admin/hosts/hst-00000000000000000000000000000000/revoke",
            ADMIN,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);

    // An open long-poll ends with the refusal when the credential goes.
    let known = s.known(&h).await;
    let (http, url, cred) = (s.http.clone(), s.url.clone(), s.cred(&h));
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let r = http
            .get(format!("{url}/v1/agent/work?wait_secs=30&{known}"))
            .bearer_auth(cred)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        (status, body, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let revoked = s
        .ok(
            Method::POST,
            &format!("/v1/admin/hosts/{h}/revoke"),
            ADMIN,
            None,
            200,
        )
        .await;
    assert_eq!(revoked["health"], "unhealthy");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    let (status, body, took) = poll.await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(took < Duration::from_secs(10), "the poll lasted {took:?}");
    let sentence = body["error"].as_str().unwrap().to_string();
    assert!(
        sentence.contains("credential was revoked") && sentence.contains("new join token"),
        "{sentence}"
    );
    // Every call of the host is refused at once with that sentence.
    let r = s.heartbeat(&h, json!({})).await;
    assert_eq!((r.status, r.error()), (401, sentence.clone()), "{}", r.body);
    let r = s
        .call(Method::GET, "/v1/agent/work?wait_secs=0", &s.cred(&h), None)
        .await;
    assert_eq!((r.status, r.error()), (401, sentence.clone()));
    // Its instance is no longer shown Running, and nothing is placed there.
    let got = s.get(&format!("/v1/instances/{inst}"), &t).await.body;
    assert_ne!(got["status"], "Running", "{got}");
    let r = create(
        &s,
        &t,
        json!({"name": "w2", "flavor": f, "image": img, "region": "eu-1"}),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    // The audit log records who revoked it.
    let audit = s.get("/v1/admin/audit", ADMIN).await.body;
    let path = format!("/v1/admin/hosts/{h}/revoke");
    let rows: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["path"] == path.as_str())
        .collect();
    assert!(
        rows.iter()
            .any(|a| a["status"] == 200 && a["actor"] == "bootstrap-admin"),
        "{audit}"
    );

    // Joining again: not with a token minted before the revocation, not
    // into another region while its instance is there; with a new token,
    // the same host, a new credential, no longer revoked.
    let cap = Server::capacity("L4", 2);
    let r = join(&s, &stale_token, "gpu1", &cap).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.error().contains("minted before"), "{}", r.error());
    let other = join_token(&s, Some("us-1")).await;
    let r = join(&s, &other, "gpu1", &cap).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let old_cred = s.cred(&h);
    let fresh = join_token(&s, None).await;
    let r = join(&s, &fresh, "gpu1", &cap).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["host"], h.as_str(), "the same host row");
    let new_cred = r.body["credential"].as_str().unwrap().to_string();
    assert_ne!(new_cred, old_cred);
    s.set_cred(&h, &new_cred, cap);
    assert_eq!(s.heartbeat(&h, json!({})).await.status, 200);
    let info = host_info(&s, &h).await;
    assert_eq!(
        (info["health"].as_str(), info["region"].as_str()),
        (Some("healthy"), Some("eu-1"))
    );
    assert!(info["revoked_at"].is_null(), "{info}");
    let r = s
        .call(Method::GET, "/v1/agent/work?wait_secs=0", &old_cred, None)
        .await;
    assert_eq!(r.status, 401, "the old credential: {}", r.body);
    let r = create(
        &s,
        &t,
        json!({"name": "w3", "flavor": f, "image": img, "region": "eu-1"}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(s.host_of(&r.id()).await, h);
}

fn need(model: Option<&str>, gpus: u32, placement: Placement) -> Need {
    Need {
        vcpus: 4,
        memory_mib: 8192,
        disk_gib: 50,
        gpu_model: model.map(str::to_string),
        gpu_count: gpus,
        placement,
        region: "default".into(),
        host: None,
    }
}

async fn shortlist_matches_full_weighing(s: Server) {
    // Hosts of two models (one known by an alias), one with both models
    // (only its sum fits 3), one without GPUs, one in another region.
    let gpus = |list: &[(&str, usize)]| {
        let mut out = Vec::new();
        for (m, n) in list {
            for _ in 0..*n {
                let i = out.len();
                out.push(json!({"model": m, "pci": format!("0000:{:02x}:00.0", 0x10 + i)}));
            }
        }
        json!({"vcpus": 64, "memory_mib": 262_144, "disk_gib": 2_000, "gpus": out})
    };
    let mixed = s
        .host_with(
            "mixed",
            gpus(&[("NVIDIA H100 PCIe", 2), ("NVIDIA H100 NVL", 1)]),
        )
        .await;
    s.host_with("pcie2", gpus(&[("NVIDIA H100 PCIe", 2)])).await;
    s.host_with("nvl1", gpus(&[("NVIDIA H100 NVL", 1)])).await;
    s.host_with("a100", gpus(&[("A100", 4)])).await;
    s.host_with("cpu", gpus(&[])).await;
    host_in(&s, "far", "NVIDIA H100 NVL", 8, "eu-1").await;
    // More hosts than one walk's shortlist (32), in every order: GPUs
    // (0 to 4 A100s) and free vCPUs vary.
    for i in 0..36usize {
        let mut cap = gpus(&[("A100", i % 5)]);
        cap["vcpus"] = json!(16 + (i * 7) % 48);
        s.host_with(&format!("n{i:02}"), cap).await;
    }
    let st = &s.state;
    let mut checked = 0;
    for placement in [Placement::Pack, Placement::Spread] {
        for (model, count) in [
            (Some("H100"), 1),
            (Some("H100"), 2),
            (Some("H100"), 3),
            (Some("NVIDIA H100 NVL"), 1),
            (Some("A100"), 2),
            (Some("H100"), 9),
            (None, 0),
        ] {
            let n = need(model, count, placement);
            let mut tx = st.db.begin_write().await.unwrap();
            let short = scheduler::candidates(&mut tx, &n, 0, true).await.unwrap();
            let all = scheduler::candidates(&mut tx, &n, 0, false).await.unwrap();
            tx.rollback().await.unwrap();
            let pick =
                |c: &[scheduler::Candidate]| scheduler::choose(c, &n).map(|i| c[i].id.clone());
            assert_eq!(pick(&short), pick(&all), "{n:?}");
            checked += usize::from(pick(&all).is_some());
        }
    }
    assert_eq!(checked, 12, "all but the 9-GPU need fit somewhere");
    // The 3-GPU H100 need fits only the mixed host, through its sum.
    let n = need(Some("H100"), 3, Placement::Pack);
    let mut tx = st.db.begin_write().await.unwrap();
    let short = scheduler::candidates(&mut tx, &n, 0, true).await.unwrap();
    tx.rollback().await.unwrap();
    let best = scheduler::choose(&short, &n).map(|i| short[i].id.clone());
    assert_eq!(best, Some(mixed));
}
