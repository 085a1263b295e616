//! Billing over real HTTP with simulated hosts, on SQLite and on
//! PostgreSQL: usage counters charged once and without drift, the usage
//! ledger, credit exhaustion (402s and grace stops) and snapshot storage
//! billed as the integral of the deduplicated bytes over a simulated
//! clock.

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
on_both!(storage_is_billed_as_an_integral, |c: &mut Config| {
    c.snapshot_meter_secs = 1;
    c.reconcile_secs = 3600; // the test ticks the meter itself
    c.snapshot_price_micros_per_tb_hour = PRICE;
});
on_both!(shared_store_counts_once, |c: &mut Config| {
    c.snapshot_meter_secs = 1;
    c.reconcile_secs = 3600;
    c.snapshot_price_micros_per_tb_hour = PRICE;
    c.snapshot_store_shared = true;
});
on_both!(snapshot_meter_runs_in_the_loop, |c: &mut Config| {
    c.snapshot_meter_secs = 1;
    c.reconcile_secs = 1;
    c.snapshot_price_micros_per_tb_hour = 3_600_000;
});

/// Micros per TB-hour: not a divisor of anything in sight.
const PRICE: i64 = 123_457;

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

/// One step of a simulated storage history: after `after_ms` on the
/// billing clock, a host reports the account's bytes (`None`: it lists
/// the account no more), or the meter ticks.
enum Step {
    Report(usize, Option<u64>),
    Tick,
}

const TB: u64 = 1_000_000_000_000;

fn history() -> Vec<(i64, Step)> {
    use Step::*;
    vec![
        (0, Report(0, Some(5 * TB))),
        (1_234_567, Tick),
        (600_001, Report(1, Some(2 * TB + 7))),
        (3_600_000, Tick),
        (17, Report(0, Some(1))),
        (5_000, Tick),
        (1_000, Report(0, None)),
        (999, Report(1, Some(2 * TB + 7))),
        (1_001, Report(1, Some(3 * TB))),
        (86_400_000, Tick),
        (1_500, Tick),
    ]
}

/// Plays [`history`] on a simulated clock; after every tick the charged
/// total is exactly `floor(integral x price / (10^12 x 3.6e6))` of the
/// account's figure, which `figure` computes from the hosts' last reports.
async fn play(s: &Server, figure: fn(&[Option<u64>; 2], usize) -> u64) {
    let (acct, t) = s.account("store").await;
    let hosts = [s.host("h0", "none", 0).await, s.host("h1", "none", 0).await];
    served_by(s, &t, &hosts).await;
    let mut now = 1_900_000_000_000i64;
    s.clock.set(now);
    let (mut last, mut bytes, mut integral) = ([None, None], 0u64, 0i128);
    for (after, step) in history() {
        now += after;
        s.clock.set(now);
        integral += i128::from(bytes) * i128::from(after);
        match step {
            Step::Report(h, b) => {
                let store: Vec<Value> = b
                    .map(|b| json!({"account": acct, "billed_bytes": b}))
                    .into_iter()
                    .collect();
                let r = s.heartbeat(&hosts[h], json!({ "store": store })).await;
                assert_eq!(r.status, 200, "{}", r.body);
                last[h] = b;
                bytes = figure(&last, h);
                let shown = s.get("/v1/account", &t).await.body["snapshot_used_bytes"].as_u64();
                assert_eq!(shown, Some(bytes));
            }
            Step::Tick => {
                gantry_controller::meter::tick(&s.state).await.unwrap();
                let recs = s.get("/v1/usage?limit=10000", &t).await.body;
                let recs = recs.as_array().unwrap();
                let sum = |k: &str| -> i128 {
                    recs.iter()
                        .map(|r| i128::from(r[k].as_i64().unwrap()))
                        .sum()
                };
                assert!(recs
                    .iter()
                    .all(|r| r["kind"] == "snapshot" && r["price_micros"] == PRICE));
                assert_eq!(sum("quantity"), integral, "byte-ms at {now}");
                let want = integral * i128::from(PRICE) / (1_000_000_000_000 * 3_600_000);
                assert_eq!(sum("amount_micros"), want, "micros at {now}");
                let credit = s.get("/v1/account", &t).await.body["credit_micros"].as_i64();
                assert_eq!(credit.map(i128::from), Some(100_000_000 - want));
            }
        }
    }
    assert!(
        integral > i128::from(i64::MAX),
        "a charge was split into rows"
    );
}

/// Gives the tenant `t` an instance on each of `hosts` (spread; never
/// charged here: no usage counter is sent),
/// so that each host holds something of the account and may report its
/// store usage (a host bills only what it holds).
async fn served_by(s: &Server, t: &str, hosts: &[String]) {
    let f = s.flavor("free", None, 0).await;
    let img = s.image("ubuntu").await;
    let mut on = Vec::new();
    for i in 0..hosts.len() {
        let r = s
            .post(
                "/v1/instances",
                t,
                json!({"name": format!("hold{i}"), "flavor": f, "image": img,
                    "placement": "spread"}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.body);
        on.push(r.body["host"].as_str().unwrap().to_string());
    }
    on.sort();
    let mut want = hosts.to_vec();
    want.sort();
    assert_eq!(on, want, "one instance on each host");
}

/// Host-local stores: the account's figure is the sum over hosts.
async fn storage_is_billed_as_an_integral(s: Server) {
    play(&s, |last, _| last.iter().map(|b| b.unwrap_or(0)).sum()).await;
}

/// A shared store: every host reports the same store, the newest report
/// is the account's figure (counted once).
async fn shared_store_counts_once(s: Server) {
    play(&s, |last, h| last[h].unwrap_or(0)).await;
}

/// The reconcile loop ticks the meter on its own.
async fn snapshot_meter_runs_in_the_loop(s: Server) {
    let (acct, t) = s.account("store").await;
    let h = s.host("h", "none", 0).await;
    served_by(&s, &t, std::slice::from_ref(&h)).await;
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
    // byte-ms of 1 TB; 3.6e6 micros per TB-hour is one micro per TB-ms.
    let qty = rec["quantity"].as_i64().unwrap();
    assert_eq!(qty % 1_000_000_000_000, 0);
    assert_eq!(rec["amount_micros"].as_i64(), Some(qty / 1_000_000_000_000));
}
