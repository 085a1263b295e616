//! Billing over real HTTP with simulated hosts, on SQLite and on
//! PostgreSQL: usage counters charged once and without drift, the usage
//! ledger, credit exhaustion (402s and grace stops) and the snapshot
//! storage meter.

#[macro_use]
mod common;

use common::{eventually, Server, ADMIN};
use gantry_controller::Config;
use reqwest::Method;
use serde_json::{json, Value};

on_both!(usage_counters_bill_once);
on_both!(credit_exhaustion, |c: &mut Config| {
    c.credit_grace_secs = 0;
    c.reconcile_secs = 1;
});
on_both!(snapshot_meter, |c: &mut Config| {
    c.snapshot_meter_secs = 1;
    c.reconcile_secs = 1;
    c.snapshot_price_micros_per_tb_hour = 3_600_000;
});

/// A heartbeat's `usage` with one counter.
fn usage(id: &str, seq: u64, ms: u64) -> Value {
    json!({"usage": [{"instance": id, "seq": seq, "running_ms": ms}]})
}

async fn usage_counters_bill_once(s: Server) {
    let (acct, t) = s.account("acme").await;
    let (_, other) = s.account("other").await;
    let h = s.host("h", "none", 0).await;
    let h2 = s.host("h2", "none", 0).await;
    // 3_600_000 micros an hour: 1_000 a second.
    let f = s
        .ok(
            Method::POST,
            "/v1/admin/flavors",
            ADMIN,
            Some(json!({"name": "c", "vcpus": 2,
            "memory_mib": 2048, "root_disk_gib": 10, "price_micros_per_hour": 3_600_000})),
            201,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = s.image("ubuntu").await;
    let id = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w", "flavor": f, "image": img, "placement": "pack"}),
        )
        .await
        .id();
    let on = s.host_of(&id).await;
    let off = if on == h { h2.clone() } else { h.clone() };
    s.observe(&id, "Running").await;
    let credit = |v: &Value| v["credit_micros"].as_i64().unwrap();
    let before = credit(&s.get("/v1/account", &t).await.body);
    let usage = |seq, ms| usage(&id, seq, ms);
    let r = s.heartbeat(&on, usage(1, 10_500)).await;
    assert_eq!(
        r.body["billed"],
        json!([{"instance": id, "seq": 1, "done": false}]),
        "{}",
        r.body
    );
    let bill = s.get(&format!("/v1/instances/{id}/billing"), &t).await.body;
    assert_eq!(
        (
            bill["billed_seconds"].as_u64(),
            bill["cost_micros"].as_i64()
        ),
        (Some(10), Some(10_000))
    );
    // The same counter again (a retried heartbeat) bills nothing more.
    let r = s.heartbeat(&on, usage(1, 10_500)).await;
    assert_eq!(r.body["billed"][0]["seq"], 1);
    assert_eq!(
        s.get(&format!("/v1/instances/{id}/billing"), &t).await.body,
        bill
    );
    larger_counter(&s, &t, &id, &on, before).await;
    usage_views(&s, &t, &id, [&on, &off], &other, &acct).await;
    usage_after_release(&s, &t, &id, &on).await;
}

/// A larger counter bills the delta, with no drift; one that went
/// backwards bills nothing.
async fn larger_counter(s: &Server, t: &str, id: &str, on: &str, before: i64) {
    let usage = |seq, ms| usage(id, seq, ms);
    s.heartbeat(on, usage(2, 25_999)).await;
    let bill = s.get(&format!("/v1/instances/{id}/billing"), t).await.body;
    assert_eq!(
        (
            bill["billed_seconds"].as_u64(),
            bill["cost_micros"].as_i64()
        ),
        (Some(25), Some(25_000))
    );
    assert_eq!(
        bill["account_credit_micros"].as_i64(),
        Some(before - 25_000)
    );
    let rows = s.get("/v1/instances?status=Running", t).await.body;
    assert_eq!(rows[0]["cost_micros"], 25_000);
    let recs = s.get(&format!("/v1/usage?instance={id}"), t).await.body;
    let recs = recs.as_array().unwrap();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(
        recs.iter()
            .map(|r| r["amount_micros"].as_i64().unwrap())
            .sum::<i64>(),
        25_000
    );
    assert_eq!(
        (recs[0]["quantity"].as_i64(), recs[0]["kind"].as_str()),
        (Some(15_499), Some("instance"))
    );
    assert_eq!(recs[0]["price_micros"], 3_600_000);
    let r = s.heartbeat(on, usage(3, 20_000)).await;
    assert_eq!(r.body["billed"][0]["seq"], 3);
    let bill = s.get(&format!("/v1/instances/{id}/billing"), t).await.body;
    assert_eq!(bill["cost_micros"], 25_000);
}

/// Counters from elsewhere; the ledger as tenants and admins see it.
async fn usage_views(s: &Server, t: &str, id: &str, [on, off]: [&str; 2], other: &str, acct: &str) {
    // Another host's counter for this instance is ignored; unknown ones are done.
    let r = s.heartbeat(off, usage(id, 3, 99_000)).await;
    assert_eq!(r.body["billed"], json!([]));
    let ghost = "ins-00000000000000000000000000000000";
    let r = s
        .heartbeat(
            on,
            json!({"usage": [{"instance": ghost, "seq": 1, "running_ms": 5}]}),
        )
        .await;
    assert_eq!(
        r.body["billed"],
        json!([{"instance": ghost, "seq": 1, "done": true}])
    );
    assert_eq!(
        s.get(&format!("/v1/instances/{id}/billing"), t).await.body["cost_micros"],
        25_000
    );
    // Other accounts see none of it; admins pick the account.
    assert_eq!(s.get("/v1/usage", other).await.body, json!([]));
    let all = s
        .get(&format!("/v1/usage?account={acct}&limit=1"), ADMIN)
        .await
        .body;
    assert_eq!(all.as_array().unwrap().len(), 1);
    let r = s.get(&format!("/v1/usage?account={acct}"), other).await;
    assert_eq!((r.status, r.field().as_str()), (400, "account"));
}

/// A Released instance's last counter is billed and acknowledged as done.
async fn usage_after_release(s: &Server, t: &str, id: &str, on: &str) {
    // Released: the last counter is acknowledged as done.
    s.ok(
        Method::POST,
        &format!("/v1/instances/{id}/actions"),
        t,
        Some(json!({"action": "release"})),
        202,
    )
    .await;
    s.observe(id, "Released").await;
    let r = s.heartbeat(on, usage(id, 4, 27_000)).await;
    assert_eq!(
        r.body["billed"],
        json!([{"instance": id, "seq": 4, "done": true}])
    );
    let recs = s.get(&format!("/v1/usage?instance={id}"), t).await.body;
    assert_eq!(
        recs.as_array()
            .unwrap()
            .iter()
            .map(|r| r["amount_micros"].as_i64().unwrap())
            .sum::<i64>(),
        27_000
    );
}

async fn credit_exhaustion(s: Server) {
    let (acct, t) = s.account("broke").await;
    let h = s.host("h", "none", 0).await;
    let f = s.flavor("c", None, 0).await;
    let img = s.image("ubuntu").await;
    let mk = |n: &str| json!({"name": n, "flavor": f, "image": img});
    let run = s.post("/v1/instances", &t, mk("run")).await.id();
    let stopped = s.post("/v1/instances", &t, mk("stopped")).await.id();
    s.observe(&run, "Running").await;
    s.observe(&stopped, "Running").await;
    s.ok(
        Method::POST,
        &format!("/v1/instances/{stopped}/actions"),
        &t,
        Some(json!({"action": "stop"})),
        202,
    )
    .await;
    s.observe(&stopped, "Stopped").await;
    s.ok(
        Method::POST,
        &format!("/v1/admin/accounts/{acct}/credits"),
        ADMIN,
        Some(json!({"amount_micros": -100_000_000, "note": "spent"})),
        200,
    )
    .await;
    let r = s.post("/v1/instances", &t, mk("more")).await;
    assert_eq!(r.status, 402, "{}", r.body);
    assert_eq!(
        r.error(),
        "account broke has no credit left; add credit before creating instances"
    );
    let r = s
        .post(
            &format!("/v1/instances/{stopped}/actions"),
            &t,
            json!({"action": "start"}),
        )
        .await;
    assert_eq!(r.status, 402, "{}", r.body);
    assert!(r.error().contains("add credit"), "{}", r.body);
    let r = s
        .post(
            &format!("/v1/instances/{run}/snapshots"),
            &t,
            json!({"name": "s"}),
        )
        .await;
    assert_eq!(r.status, 402, "{}", r.body);
    // After the grace time (0 here) the reconcile loop stops what runs.
    eventually("a stop operation for the running instance", || async {
        let w = s.work(&h, 0).await;
        w["ops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["instance"] == run.as_str() && o["command"]["kind"] == "stop")
    })
    .await;
    let mon = s
        .get(&format!("/v1/instances/{run}/monitor"), &t)
        .await
        .body;
    assert_eq!(mon["desired_state"], "Stopped");
    // The stopped instance got no operation.
    let w = s.work(&h, 0).await;
    assert_eq!(w["ops"].as_array().unwrap().len(), 1, "{w}");
}

async fn snapshot_meter(s: Server) {
    let (acct, t) = s.account("store").await;
    let h = s.host("h", "none", 0).await;
    let r = s
        .heartbeat(
            &h,
            json!({"store": [{"account": acct, "billed_bytes": 1_000_000_000_000u64}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually("a snapshot storage charge", || async {
        !s.get("/v1/usage", &t)
            .await
            .body
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    let recs = s.get("/v1/usage", &t).await.body;
    let rec = &recs[0];
    assert_eq!(
        (rec["kind"].as_str(), rec["instance"].is_null()),
        (Some("snapshot"), true)
    );
    let qty = rec["quantity"].as_i64().unwrap();
    // byte-ms over about one meter interval; 3.6e6 micros per TB-hour is
    // one micro per TB-ms.
    assert_eq!(qty % 1_000_000_000_000, 0);
    let ms = qty / 1_000_000_000_000;
    assert!((1000..10_000).contains(&ms), "{ms} ms");
    assert_eq!(rec["amount_micros"].as_i64(), Some(ms));
    let acc = s.get("/v1/account", &t).await.body;
    let charged: i64 = recs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["amount_micros"].as_i64().unwrap())
        .sum();
    // Charges keep coming while the bytes are held (there may be more by now).
    assert!(acc["credit_micros"].as_i64().unwrap() <= 100_000_000 - charged);
}
