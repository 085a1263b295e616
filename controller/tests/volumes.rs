//! Data volumes across a fleet, on SQLite and PostgreSQL, over real HTTP
//! with simulated hosts (the agent protocol): a volume lives on a host and
//! an instance that reuses it is placed there (409 when that host is full
//! or down); its GiB count in the host's disk from placement to deletion;
//! delete and grow are operations for its host, settled by the host's
//! report (a failed grow gives its booking back); volume storage is billed
//! exactly size x price x time when the operator sets a price.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use gantry_controller::Config;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

on_both!(an_instance_reusing_a_volume_runs_on_its_host);
on_both!(
    a_volume_host_that_is_full_or_down_is_409,
    |c: &mut Config| {
        c.reconcile_secs = 3600; // the test runs the reconcile pass itself
        c.heartbeat_timeout_secs = 2;
    }
);
on_both!(
    grow_and_delete_are_operations_of_the_volume_host,
    |c: &mut Config| {
        c.min_volume_gib = 300;
    }
);
on_both!(volumes_are_billed_exactly_when_priced, |c: &mut Config| {
    c.reconcile_secs = 3600;
    c.volume_price_micros_per_gib_hour = 1_000;
    c.snapshot_meter_secs = 60;
});

/// A CPU-only flavor: 4 vCPUs, 50 GiB root disk.
async fn cpu_flavor(s: &Server) -> String {
    s.flavor("cpu", None, 0).await
}

/// A host whose heartbeats report `vcpus` and `disk_gib`.
async fn host(s: &Server, name: &str, vcpus: u64, disk_gib: u64) -> String {
    s.host_with(
        name,
        json!({"vcpus": vcpus, "memory_mib": 1_048_576, "disk_gib": disk_gib, "gpus": []}),
    )
    .await
}

async fn used_disk(s: &Server, host: &str) -> u64 {
    let h = s.get(&format!("/v1/admin/hosts/{host}"), ADMIN).await.body;
    h["used_disk_gib"].as_u64().expect("used_disk_gib")
}

async fn volume(s: &Server, t: &str, body: Value) -> Value {
    let r = s.post("/v1/volumes", t, body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body
}

async fn get_volume(s: &Server, t: &str, id: &str) -> (u16, Value) {
    let r = s.get(&format!("/v1/volumes/{id}"), t).await;
    (r.status, r.body)
}

/// Creates an instance; returns the reply (202 expected by callers).
async fn create(s: &Server, t: &str, name: &str, f: &str, img: &str, extra: Value) -> (u16, Value) {
    let mut body = json!({"name": name, "flavor": f, "image": img, "placement": "spread"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = s.post("/v1/instances", t, body).await;
    (r.status, r.body)
}

fn created(r: &(u16, Value)) -> String {
    assert!(r.0 == 202 || r.0 == 201, "{}", r.1);
    r.1["id"].as_str().unwrap().to_string()
}

async fn release(s: &Server, t: &str, id: &str) {
    let r = s
        .post(
            &format!("/v1/instances/{id}/actions"),
            t,
            json!({"action": "release"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    s.observe(id, "Released").await;
}

/// The host's unfinished operations of `kind`.
async fn host_ops(s: &Server, host: &str, kind: &str) -> Vec<Value> {
    let w = s.work(host, 0).await;
    w["ops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["command"]["kind"] == kind)
        .cloned()
        .collect()
}

async fn grow_to(s: &Server, t: &str, id: String, gib: u64) -> common::Reply {
    s.post(
        &format!("/v1/volumes/{id}/grow"),
        t,
        json!({ "size_gib": gib }),
    )
    .await
}

async fn credit(s: &Server, t: &str) -> i64 {
    let a = s.get("/v1/account", t).await.body;
    a["credit_micros"].as_i64().unwrap_or_else(|| panic!("{a}"))
}

async fn report(s: &Server, host: &str, op: &str, ok: bool) {
    let body = if ok {
        json!({"outcome": "succeeded", "progress": 100})
    } else {
        json!({"outcome": "failed", "progress": 0, "error": "qemu-img: disk full"})
    };
    let r = s.report(host, op, body).await;
    assert_eq!(r.status, 204, "{}", r.body);
}

async fn an_instance_reusing_a_volume_runs_on_its_host(s: Server) {
    let (acct, t) = s.account("acme").await;
    // Spread prefers the host with the most free vCPUs: big.
    let small = host(&s, "small", 16, 20_000).await;
    let big = host(&s, "big", 128, 20_000).await;
    let (f, img) = (cpu_flavor(&s).await, s.image("ubuntu").await);

    // A volume never attached is nowhere and books nothing.
    let v = volume(&s, &t, json!({"name": "data", "size_gib": 100})).await;
    let vid = v["id"].as_str().unwrap().to_string();
    assert!(v["host"].is_null(), "{v}");
    assert_eq!(
        (used_disk(&s, &small).await, used_disk(&s, &big).await),
        (0, 0)
    );

    // First attach places it with the instance: root disk and volume.
    let i1 = created(&create(&s, &t, "one", &f, &img, json!({"data_volume": vid})).await);
    assert_eq!(s.host_of(&i1).await, big);
    let (_, v) = get_volume(&s, &t, &vid).await;
    assert_eq!(v["host"], big.as_str(), "{v}");
    assert_eq!(used_disk(&s, &big).await, 150);
    s.observe(&i1, "Running").await;
    // Released: the volume stays on its host, and counted there.
    release(&s, &t, &i1).await;
    let (_, v) = get_volume(&s, &t, &vid).await;
    assert!(v["instance"].is_null(), "{v}");
    assert_eq!(v["host"], big.as_str());
    assert_eq!(
        used_disk(&s, &big).await,
        100,
        "the detached volume still counts"
    );

    // A volume placed on `small` (admin) pulls its instance there though
    // spread would pick `big`.
    let w = volume(
        &s,
        ADMIN,
        json!({"name": "pinned", "size_gib": 70, "account": acct, "host": small}),
    )
    .await;
    let wid = w["id"].as_str().unwrap().to_string();
    assert_eq!(used_disk(&s, &small).await, 70);
    let other = created(&create(&s, &t, "other", &f, &img, json!({})).await);
    assert_eq!(s.host_of(&other).await, big, "spread prefers big");
    let i2 = created(&create(&s, &t, "two", &f, &img, json!({"data_volume": wid})).await);
    assert_eq!(s.host_of(&i2).await, small);
    let cmd = s.op_of(&i2).await.unwrap();
    assert_eq!(cmd["command"]["spec"]["data_volume"]["id"], wid.as_str());
    assert_eq!(used_disk(&s, &small).await, 120);
    // The earlier volume goes back to its host too.
    let i3 = created(&create(&s, &t, "three", &f, &img, json!({"data_volume": vid})).await);
    assert_eq!(s.host_of(&i3).await, big);
    assert_eq!(used_disk(&s, &big).await, 100 + 50 + 50);

    // Placed next to an instance of the account; a tenant cannot name a
    // host, nor another account's instance.
    let n = volume(
        &s,
        &t,
        json!({"name": "near", "size_gib": 10, "instance": i2}),
    )
    .await;
    assert_eq!(n["host"], small.as_str(), "{n}");
    assert_eq!(used_disk(&s, &small).await, 130);
    let r = s
        .post(
            "/v1/volumes",
            &t,
            json!({"name": "x", "size_gib": 10, "host": small}),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (422, "host".to_string()),
        "{}",
        r.body
    );
    let (_, other_t) = s.account("other").await;
    let r = s
        .post(
            "/v1/volumes",
            &other_t,
            json!({"name": "x", "size_gib": 10, "instance": i2}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    // An attached volume cannot be attached twice.
    let r = create(&s, &t, "four", &f, &img, json!({"data_volume": wid})).await;
    assert_eq!(r.0, 422, "{}", r.1);
    assert_eq!(r.1["field"], "data_volume");
}

async fn a_volume_host_that_is_full_or_down_is_409(s: Server) {
    let (acct, t) = s.account("acme").await;
    let a = host(&s, "a", 64, 200).await;
    let b = host(&s, "b", 64, 20_000).await;
    let (f, img) = (cpu_flavor(&s).await, s.image("ubuntu").await);
    let v = volume(
        &s,
        ADMIN,
        json!({"name": "data", "size_gib": 100, "account": acct, "host": a}),
    )
    .await;
    let vid = v["id"].as_str().unwrap().to_string();
    // Placing on a host with less room than the volume is refused.
    let r = s
        .post(
            "/v1/volumes",
            ADMIN,
            json!({"name": "huge", "size_gib": 150, "account": acct, "host": a}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("less than 150 GiB"), "{}", r.body);
    volume(
        &s,
        ADMIN,
        json!({"name": "more", "size_gib": 60, "account": acct, "host": a}),
    )
    .await;
    assert_eq!(used_disk(&s, &a).await, 160);

    // Host a has 40 GiB left: an instance with the volume (50 GiB root)
    // does not fit there and is not put on b.
    let r = create(&s, &t, "one", &f, &img, json!({"data_volume": vid})).await;
    assert_eq!(r.0, 409, "{}", r.1);
    let e = r.1["error"].as_str().unwrap();
    assert!(e.contains(&a) && e.contains(&vid), "{e}");
    assert!(e.contains("not supported yet"), "{e}");
    let (_, v) = get_volume(&s, &t, &vid).await;
    assert!(v["instance"].is_null(), "{v}");
    assert_eq!(used_disk(&s, &b).await, 0);

    // Host a goes silent (b keeps beating): a is down; the same request
    // is refused naming a, and the volume cannot be grown there.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    s.heartbeat(&b, json!({})).await;
    gantry_controller::reconcile::once(&s.state).await.unwrap();
    let r = create(&s, &t, "two", &f, &img, json!({"data_volume": vid})).await;
    assert_eq!(r.0, 409, "{}", r.1);
    assert!(r.1["error"].as_str().unwrap().contains(&a), "{}", r.1);
    let r = s
        .post(
            &format!("/v1/volumes/{vid}/grow"),
            &t,
            json!({"size_gib": 200}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("is down"), "{}", r.body);
    // A deletion waits for the host: it is an operation of host a.
    let r = s
        .call(Method::DELETE, &format!("/v1/volumes/{vid}"), &t, None)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["deleting"], true);
    assert_eq!(host_ops(&s, &a, "delete-volume").await.len(), 1);
}

async fn grow_and_delete_are_operations_of_the_volume_host(s: Server) {
    let (acct, t) = s.account("acme").await;
    let h = host(&s, "h", 64, 20_000).await;
    let (f, img) = (cpu_flavor(&s).await, s.image("ubuntu").await);
    let place =
        |name: &str, gib: u64| json!({"name": name, "size_gib": gib, "account": acct, "host": h});
    let v = volume(&s, ADMIN, place("data", 100)).await;
    let vid = v["id"].as_str().unwrap().to_string();
    assert_eq!(used_disk(&s, &h).await, 100);
    let grow = |id: String, gib: u64| grow_to(&s, &t, id, gib);

    // Never shrinks, never below the policy's minimum (300 here).
    for (gib, why) in [(99, "never shrink"), (100, "never shrink"), (200, "300")] {
        let r = grow(vid.clone(), gib).await;
        assert_eq!(
            (r.status, r.field()),
            (422, "size_gib".into()),
            "{}",
            r.body
        );
        assert!(r.error().contains(why), "{gib}: {}", r.body);
    }
    // More than the host has free: 409, nothing booked.
    let r = grow(vid.clone(), 30_000).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(used_disk(&s, &h).await, 100);

    // A grow books the extra GiB at once; the host fails it: given back.
    let r = grow(vid.clone(), 400).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = r.body["operation"].as_str().unwrap().to_string();
    assert_eq!(r.body["size_gib"], 400);
    assert_eq!(used_disk(&s, &h).await, 400);
    let ops = host_ops(&s, &h, "grow-volume").await;
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0]["command"]["volume"], vid.as_str());
    assert_eq!(ops[0]["command"]["size_gib"], 400);
    assert!(ops[0]["instance"].is_null());
    let r = grow(vid.clone(), 500).await;
    assert_eq!(r.status, 409, "a second grow waits: {}", r.body);
    let r = s
        .call(Method::DELETE, &format!("/v1/volumes/{vid}"), &t, None)
        .await;
    assert_eq!(r.status, 409, "no delete while growing: {}", r.body);
    report(&s, &h, &op, false).await;
    let (_, v) = get_volume(&s, &t, &vid).await;
    assert_eq!(
        (v["size_gib"].as_u64(), v["operation"].is_null()),
        (Some(100), true)
    );
    assert_eq!(used_disk(&s, &h).await, 100);
    let o = s.get(&format!("/v1/operations/{op}"), &t).await.body;
    assert_eq!(o["state"], "failed", "{o}");

    // Attached: the grow is the instance's operation too (it is busy).
    let i = created(&create(&s, &t, "i", &f, &img, json!({"data_volume": vid})).await);
    s.observe(&i, "Running").await;
    assert_eq!(used_disk(&s, &h).await, 150);
    let r = grow(vid.clone(), 400).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = r.body["operation"].as_str().unwrap().to_string();
    let ops = host_ops(&s, &h, "grow-volume").await;
    assert_eq!(ops[0]["instance"], i.as_str());
    let r = s
        .post(
            &format!("/v1/instances/{i}/actions"),
            &t,
            json!({"action": "stop"}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = s
        .report(
            &h,
            &op,
            json!({"outcome": "succeeded", "progress": 100, "instance_state": "Running"}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let (_, v) = get_volume(&s, &t, &vid).await;
    assert_eq!(
        (v["size_gib"].as_u64(), v["operation"].is_null()),
        (Some(400), true)
    );
    assert_eq!(used_disk(&s, &h).await, 450);

    // Attached volumes are not deleted; released, the delete is the
    // host's operation and the row goes when it reports success.
    let r = s
        .call(Method::DELETE, &format!("/v1/volumes/{vid}"), &t, None)
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("attached"), "{}", r.body);
    release(&s, &t, &i).await;
    assert_eq!(used_disk(&s, &h).await, 400);
    let r = s
        .call(Method::DELETE, &format!("/v1/volumes/{vid}"), &t, None)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["deleting"], true);
    let op = r.body["operation"].as_str().unwrap().to_string();
    let ops = host_ops(&s, &h, "delete-volume").await;
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0]["command"]["volume"], vid.as_str());
    let r = create(&s, &t, "j", &f, &img, json!({"data_volume": vid})).await;
    assert_eq!(r.0, 422, "no attach while deleting: {}", r.1);
    assert_eq!(
        used_disk(&s, &h).await,
        400,
        "counted until the host deleted it"
    );
    report(&s, &h, &op, true).await;
    assert_eq!(get_volume(&s, &t, &vid).await.0, 404);
    assert_eq!(used_disk(&s, &h).await, 0);

    // A failed delete leaves the volume as it was.
    let k = volume(&s, ADMIN, place("keep", 30)).await;
    let kid = k["id"].as_str().unwrap().to_string();
    let r = s
        .call(Method::DELETE, &format!("/v1/volumes/{kid}"), &t, None)
        .await;
    let op = r.body["operation"].as_str().unwrap().to_string();
    report(&s, &h, &op, false).await;
    let (_, k) = get_volume(&s, &t, &kid).await;
    assert_eq!(
        (k["deleting"].as_bool(), k["operation"].is_null()),
        (Some(false), true)
    );
    assert_eq!(used_disk(&s, &h).await, 30);

    // Never placed: deleted (and grown) in its row alone.
    let u = volume(&s, &t, json!({"name": "nowhere", "size_gib": 5})).await;
    let uid = u["id"].as_str().unwrap().to_string();
    let r = grow(uid.clone(), 300).await;
    assert_eq!(
        (r.status, r.body["size_gib"].as_u64()),
        (200, Some(300)),
        "{}",
        r.body
    );
    let r = s
        .call(Method::DELETE, &format!("/v1/volumes/{uid}"), &t, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get_volume(&s, &t, &uid).await.0, 404);
    assert!(host_ops(&s, &h, "delete-volume").await.is_empty());

    // Batch: one result per volume, in order.
    let b = volume(&s, ADMIN, place("b", 40)).await;
    let bid = b["id"].as_str().unwrap().to_string();
    let r = s
        .post(
            "/v1/volumes/grow",
            &t,
            json!({"volumes": [kid, bid], "size_gib": 350}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let out = r.body.as_array().unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(
        (out[0]["volume"].as_str(), out[0]["status"].as_u64()),
        (Some(kid.as_str()), Some(202))
    );
    assert!(out[0]["operation"].is_string());
    assert_eq!(
        (out[1]["volume"].as_str(), out[1]["status"].as_u64()),
        (Some(bid.as_str()), Some(202))
    );
    assert_eq!(used_disk(&s, &h).await, 700);
    let r = s
        .post(
            "/v1/volumes/grow",
            &t,
            json!({"volumes": [kid, kid], "size_gib": 400}),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (422, "volumes[1]".into()),
        "{}",
        r.body
    );
    // Another account's volume is not found, in a batch too.
    let (_, other) = s.account("other").await;
    let r = s
        .post(
            "/v1/volumes/grow",
            &other,
            json!({"volumes": [bid], "size_gib": 400}),
        )
        .await;
    assert_eq!(r.body[0]["status"], 404, "{}", r.body);

    // Unpriced (the default): nothing is billed for volumes.
    gantry_controller::volume_meter::tick(&s.state)
        .await
        .unwrap();
    let usage = s.get("/v1/usage", &t).await.body;
    assert!(
        usage
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["kind"] != "volume"),
        "{usage}"
    );
}

async fn volumes_are_billed_exactly_when_priced(s: Server) {
    let (acct, t) = s.account("acme").await;
    let h = host(&s, "h", 64, 20_000).await;
    let t0 = 1_900_000_000_000;
    s.clock.set(t0);
    let before = credit(&s, &t).await;
    // 100 GiB placed at t0, 1000 micros per GiB-hour.
    let v = volume(
        &s,
        ADMIN,
        json!({"name": "data", "size_gib": 100, "account": acct, "host": h}),
    )
    .await;
    let vid = v["id"].as_str().unwrap().to_string();
    // A volume never placed costs nothing.
    volume(&s, &t, json!({"name": "nowhere", "size_gib": 500})).await;
    let tick = || gantry_controller::volume_meter::tick(&s.state);
    s.clock.set(t0 + 2 * 3_600_000);
    assert_eq!(tick().await.unwrap(), 1);
    // Not due again yet: a retry charges nothing twice.
    assert_eq!(tick().await.unwrap(), 0);
    let usage = s.get("/v1/usage", &t).await.body;
    let vol: Vec<&Value> = usage
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["kind"] == "volume")
        .collect();
    assert_eq!(vol.len(), 1, "{usage}");
    assert_eq!(vol[0]["amount_micros"], 100 * 1_000 * 2);
    assert_eq!(vol[0]["quantity"], 100 * 2 * 3_600_000i64);
    assert_eq!(vol[0]["price_micros"], 1_000);

    // Deleting stops billing at once (30 min later), though the host
    // reports it an hour after that.
    s.clock.set(t0 + 5 * 1_800_000);
    let r = s
        .call(Method::DELETE, &format!("/v1/volumes/{vid}"), &t, None)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    s.clock.set(t0 + 7 * 1_800_000);
    let op = r.body["operation"].as_str().unwrap().to_string();
    report(&s, &h, &op, true).await;
    assert_eq!(tick().await.unwrap(), 1);
    s.clock.set(t0 + 20 * 3_600_000);
    assert_eq!(tick().await.unwrap(), 0, "nothing held, nothing owed");
    let usage = s.get("/v1/usage", &t).await.body;
    let total: i64 = usage
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["kind"] == "volume")
        .map(|u| u["amount_micros"].as_i64().unwrap())
        .sum();
    // 100 GiB x 2.5 h x 1000 micros.
    assert_eq!(total, 250_000, "{usage}");
    assert_eq!(before - credit(&s, &t).await, 250_000);
}

/// Runs gantryctl against `s`: exit code, stdout, stderr.
async fn ctl(s: &Server, token: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let (url, token) = (s.url.clone(), token.to_string());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gantryctl"))
            .args(&args)
            .env("GANTRY_URL", url)
            .env("GANTRY_TOKEN", token)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gantryctl_creates_grows_and_deletes_volumes() {
    let s = Server::start(common::Backend::Sqlite).await.unwrap();
    let (_, t) = s.account("cli").await;
    let h = host(&s, "h", 64, 20_000).await;
    let (f, img) = (cpu_flavor(&s).await, s.image("ubuntu").await);
    let i = created(&create(&s, &t, "i", &f, &img, json!({})).await);
    s.observe(&i, "Running").await;
    let (code, out, err) = ctl(
        &s,
        &t,
        &[
            "--json",
            "volume",
            "create",
            "--name",
            "d",
            "--size-gib",
            "60",
            "--instance",
            &i,
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let vid = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["host"], h.as_str());
    // Too small: one sentence naming the field, exit 1.
    let (code, _, err) = ctl(&s, &t, &["volume", "grow", &vid, "--size-gib", "40"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("size_gib") && err.contains("never shrink"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (code, out, err) = ctl(
        &s,
        &t,
        &["--json", "volume", "grow", &vid, "--size-gib", "80"],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let g: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(g["size_gib"], 80);
    let op = g["operation"].as_str().unwrap().to_string();
    report(&s, &h, &op, true).await;
    // Several: one row per volume.
    let w = volume(&s, &t, json!({"name": "e", "size_gib": 10})).await;
    let wid = w["id"].as_str().unwrap();
    let (code, out, err) = ctl(&s, &t, &["volume", "grow", &vid, wid, "--size-gib", "100"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("VOLUME") && out.contains(&vid) && out.contains(wid),
        "{out}"
    );
    let (_, out, _) = ctl(&s, &t, &["volume", "list"]).await;
    assert!(out.contains("HOST") && out.contains(&h), "{out}");
    let (code, out, err) = ctl(&s, &t, &["--json", "volume", "delete", wid]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["id"], wid);
    assert_eq!(get_volume(&s, &t, wid).await.0, 404);
}

#[tokio::test]
async fn migration_11_sqlite() {
    migration_11(common::Backend::Sqlite).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: ./scripts/test runs it"]
async fn migration_11_postgres() {
    migration_11(common::Backend::Postgres).await;
}

/// Version 11 places existing volumes on the host of the newest instance
/// that used them and counts them in that host's disk; a volume no
/// instance used stays unplaced.
async fn migration_11(backend: common::Backend) {
    use sqlx::Row;
    let dir = tempfile::tempdir().unwrap();
    let Some((pool, url)) = common::db_before_migration(backend, dir.path(), 11).await else {
        return;
    };
    for sql in [
        "INSERT INTO accounts (id, name, snapshot_quota_gib, created_ms) VALUES ('a1', 'a', 10, 1)",
        "INSERT INTO flavors (id, name, vcpus, memory_mib, root_disk_gib, gpu_count, \
         price_micros_per_hour, created_ms) VALUES ('f1', 'f', 1, 1024, 50, 0, 0, 1)",
        "INSERT INTO hosts (id, name, address, vcpus, memory_mib, disk_gib, used_disk_gib, \
         health, last_heartbeat_ms, created_ms) VALUES \
         ('h1', 'h1', 'a', 8, 8192, 1000, 0, 'healthy', 5, 5), \
         ('h2', 'h2', 'b', 8, 8192, 1000, 50, 'healthy', 5, 5)",
        "INSERT INTO volumes (id, account_id, name, size_gib, instance_id, created_ms) VALUES \
         ('v1', 'a1', 'used', 100, 'i2', 1), ('v2', 'a1', 'never', 30, NULL, 1)",
        "INSERT INTO instances (id, account_id, name, flavor_id, host_id, desired_state, \
         observed_state, state_since_ms, root_disk_gib, data_volume_id, created_ms) VALUES \
         ('i1', 'a1', 'old', 'f1', 'h1', 'Released', 'Released', 1, 50, 'v1', 1), \
         ('i2', 'a1', 'new', 'f1', 'h2', 'Running', 'Running', 2, 50, 'v1', 2)",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let db = gantry_controller::db::Db::connect(&url, 2).await.unwrap();
    let vols: Vec<(String, Option<String>, i64)> =
        sqlx::query("SELECT id, host_id, settled_gib FROM volumes ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
    assert_eq!(
        vols,
        vec![
            ("v1".into(), Some("h2".into()), 100),
            ("v2".into(), None, 30)
        ]
    );
    let used: Vec<i64> = sqlx::query("SELECT used_disk_gib FROM hosts ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(used, [0, 150]);
}
