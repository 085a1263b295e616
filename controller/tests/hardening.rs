//! Hardening against broken or hostile hosts and runaway numbers, over
//! real HTTP on SQLite and PostgreSQL: money arithmetic is bounded and
//! checked (a report out of range is refused whole, naming its field, and
//! never blocks billing for others), join tokens are single-use, a host
//! bills only what it holds, host timestamps are bounded by the
//! controller's clock, freed host ports are reused, and hosts that never
//! joined get no placements.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use gantry_controller::Config;
use gantry_proto::api::agent::{MAX_CLOCK_SKEW_MS, MAX_RUNNING_MS, MAX_STORE_BYTES};
use gantry_proto::api::v1::{MAX_CREDIT_CHANGE_MICROS, MAX_CREDIT_MICROS};
use reqwest::Method;
use serde_json::{json, Value};

on_both!(huge_running_counter_is_refused);
on_both!(credit_is_bounded);
on_both!(oversized_sizes_are_refused, |c: &mut Config| {
    c.snapshot_meter_secs = 1;
    c.reconcile_secs = 3600; // the test ticks the meter itself
    c.snapshot_price_micros_per_tb_hour = 3_600_000;
});
on_both!(join_tokens_are_single_use);
on_both!(hosts_bill_only_what_they_hold, |c: &mut Config| {
    c.snapshot_meter_secs = 1;
    c.reconcile_secs = 3600;
    c.snapshot_price_micros_per_tb_hour = 3_600_000;
});
on_both!(far_future_heartbeats_are_refused);
on_both!(freed_ports_are_reused, |c: &mut Config| {
    c.port_range_end = c.port_range_start + 2;
});
on_both!(hosts_that_never_joined_get_no_placements);

/// A flavor at 3_600_000 micros an hour (1_000 a second).
async fn priced_flavor(s: &Server) -> String {
    s.ok(
        Method::POST,
        "/v1/admin/flavors",
        ADMIN,
        Some(
            json!({"name": "c", "vcpus": 2, "memory_mib": 2048, "root_disk_gib": 10,
            "price_micros_per_hour": 3_600_000}),
        ),
        201,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A Running instance of the tenant `t` (on the host the scheduler picks).
async fn running(s: &Server, t: &str, f: &str, img: &str, name: &str) -> String {
    let r = s
        .post(
            "/v1/instances",
            t,
            json!({"name": name, "flavor": f, "image": img, "placement": "spread"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.id();
    s.observe(&id, "Running").await;
    id
}

async fn credit(s: &Server, t: &str) -> i64 {
    s.get("/v1/account", t).await.body["credit_micros"]
        .as_i64()
        .expect("credit_micros")
}

/// The ledger rows of the tenant `t`.
async fn ledger(s: &Server, t: &str) -> Vec<Value> {
    let r = s.get("/v1/usage?limit=10000", t).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body.as_array().unwrap().clone()
}

async fn huge_running_counter_is_refused(s: Server) {
    let (_, t) = s.account("acme").await;
    let h = s.host("h", "none", 0).await;
    let f = priced_flavor(&s).await;
    let img = s.image("ubuntu").await;
    let id = running(&s, &t, &f, &img, "w").await;
    let before = credit(&s, &t).await;
    for ms in [u64::MAX, i64::MAX as u64, MAX_RUNNING_MS + 1] {
        let r = s
            .heartbeat(
                &h,
                json!({"usage": [{"instance": id, "seq": 1, "running_ms": ms}]}),
            )
            .await;
        assert_eq!(
            (r.status, r.field().as_str()),
            (422, "usage[0].running_ms"),
            "{}",
            r.body
        );
        assert_eq!(credit(&s, &t).await, before, "nothing was applied");
    }
    let r = s
        .heartbeat(
            &h,
            json!({"usage": [{"instance": id, "seq": u64::MAX, "running_ms": 1}]}),
        )
        .await;
    assert_eq!((r.status, r.field().as_str()), (422, "usage[0].seq"));
    assert!(ledger(&s, &t).await.is_empty());
    // A sane counter is still billed afterwards.
    let r = s
        .heartbeat(
            &h,
            json!({"usage": [{"instance": id, "seq": 2, "running_ms": 10_000}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(credit(&s, &t).await, before - 10_000);
    // The largest counter allowed is charged exactly, never negatively.
    let r = s
        .heartbeat(
            &h,
            json!({"usage": [{"instance": id, "seq": 3, "running_ms": MAX_RUNNING_MS}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let after = credit(&s, &t).await;
    assert_eq!(after, before - (MAX_RUNNING_MS / 1000) as i64 * 1000);
}

async fn credit_is_bounded(s: Server) {
    let (acct, t) = s.account("acme").await;
    s.account("bystander").await;
    let add = |amount: i64| {
        let s = &s;
        let acct = acct.clone();
        async move {
            s.post(
                &format!("/v1/admin/accounts/{acct}/credits"),
                ADMIN,
                json!({"amount_micros": amount, "note": "top-up"}),
            )
            .await
        }
    };
    let r = add(MAX_CREDIT_CHANGE_MICROS + 1).await;
    assert_eq!((r.status, r.field().as_str()), (422, "amount_micros"));
    // Up to the bound in the largest steps allowed...
    let mut have = credit(&s, &t).await;
    while have + MAX_CREDIT_CHANGE_MICROS <= MAX_CREDIT_MICROS {
        let r = add(MAX_CREDIT_CHANGE_MICROS).await;
        assert_eq!(r.status, 200, "{}", r.body);
        have += MAX_CREDIT_CHANGE_MICROS;
    }
    assert_eq!(credit(&s, &t).await, have);
    // ...then refused, naming the field, and nothing changes.
    for _ in 0..3 {
        let r = add(MAX_CREDIT_CHANGE_MICROS).await;
        assert_eq!(
            (r.status, r.field().as_str()),
            (422, "amount_micros"),
            "{}",
            r.body
        );
        assert!(r.error().contains("at most"), "{}", r.body);
    }
    let r = add(MAX_CREDIT_MICROS - have).await;
    assert_eq!(r.status, 200, "exactly the bound is allowed: {}", r.body);
    assert_eq!(credit(&s, &t).await, MAX_CREDIT_MICROS);
    assert_eq!(add(1).await.status, 422);
    // Debits are bounded the same way below zero.
    for _ in 0..((2 * MAX_CREDIT_MICROS) / MAX_CREDIT_CHANGE_MICROS) {
        assert_eq!(add(-MAX_CREDIT_CHANGE_MICROS).await.status, 200);
    }
    assert_eq!(credit(&s, &t).await, -MAX_CREDIT_MICROS);
    assert_eq!(add(-1).await.field(), "amount_micros");
    let list = s.get("/v1/admin/accounts", ADMIN).await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.body.as_array().unwrap().len(), 2);
}

async fn oversized_sizes_are_refused(s: Server) {
    let (victim, vt) = s.account("victim").await;
    let (other, ot) = s.account("other").await;
    let h1 = s.host("h1", "none", 0).await;
    let h2 = s.host("h2", "none", 0).await;
    let f = s.flavor("cpu", None, 0).await;
    let img = s.image("ubuntu").await;
    // Each account has an instance on each host (so both hosts serve both).
    for (t, n) in [(&vt, "v"), (&ot, "o")] {
        running(&s, t, &f, &img, &format!("{n}1")).await;
        running(&s, t, &f, &img, &format!("{n}2")).await;
    }
    let now = 1_900_000_000_000i64;
    s.clock.set(now);
    let ok = s
        .heartbeat(
            &h2,
            json!({"store": [{"account": other, "billed_bytes": 1_000_000_000_000u64}]}),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    for bytes in [u64::MAX, 1 << 62, MAX_STORE_BYTES + 1] {
        for h in [&h1, &h2] {
            let r = s
                .heartbeat(
                    h,
                    json!({"store": [{"account": victim, "billed_bytes": bytes}]}),
                )
                .await;
            assert_eq!(
                (r.status, r.field().as_str()),
                (422, "store[0].billed_bytes"),
                "{}",
                r.body
            );
        }
    }
    let r = s
        .heartbeat(
            &h1,
            json!({"snapshot_sizes": [{"snapshot": gantry_proto::ids::SnapshotId::new().to_string(),
                "compressed_bytes": u64::MAX}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "snapshot_sizes[0].compressed_bytes"),
        "{}",
        r.body
    );
    s.clock.set(now + 3_600_000);
    gantry_controller::meter::tick(&s.state).await.unwrap();
    // The other account is billed for its terabyte-hour; the victim for nothing.
    let recs = ledger(&s, &ot).await;
    let amount: i64 = recs
        .iter()
        .map(|r| r["amount_micros"].as_i64().unwrap())
        .sum();
    assert_eq!(amount, 3_600_000, "{recs:?}");
    assert!(ledger(&s, &vt).await.is_empty());
    let me = s.get("/v1/account", &vt).await;
    assert_eq!(
        (me.status, me.body["snapshot_used_bytes"].as_u64()),
        (200, Some(0))
    );
    assert_eq!(s.get("/v1/admin/accounts", ADMIN).await.status, 200);
    oversized_snapshot_report(&s, &vt, &f, &img).await;
}

/// A snapshot operation reporting sizes past the largest disk is refused.
async fn oversized_snapshot_report(s: &Server, t: &str, f: &str, img: &str) {
    let id = running(s, t, f, img, "snapme").await;
    let r = s
        .post(
            &format!("/v1/instances/{id}/snapshots"),
            t,
            json!({"name": "s1"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let r = s.finish_snapshot(&id, u64::MAX, 1).await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "snapshot.logical_bytes"),
        "{}",
        r.body
    );
    let r = s.finish_snapshot(&id, 1 << 62, 1 << 61).await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "snapshot.logical_bytes")
    );
    let r = s.finish_snapshot(&id, 10 << 30, 1 << 30).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(s.get("/v1/account", t).await.status, 200);
}

fn join_body(name: &str) -> Value {
    json!({"name": name, "address": "10.0.0.5", "capacity": Server::capacity("H100", 0)})
}

async fn join_tokens_are_single_use(s: Server) {
    let token = s.join_token().await;
    let r = s.post("/v1/agent/join", &token, join_body("gpu1")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let host = r.body["host"].as_str().unwrap().to_string();
    let cred = r.body["credential"].as_str().unwrap().to_string();
    // The same token again, same name or another: refused with a sentence.
    for name in ["gpu1", "gpu2"] {
        let r = s.post("/v1/agent/join", &token, join_body(name)).await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(
            r.error().contains("already used") && r.error().contains("new join token"),
            "{}",
            r.body
        );
    }
    // The host keeps its identity and its credential.
    let w = s.get("/v1/agent/work?wait_secs=0", &cred).await;
    assert_eq!(w.status, 200, "{}", w.body);
    let hosts = s.get("/v1/admin/hosts", ADMIN).await.body;
    assert_eq!(hosts.as_array().unwrap().len(), 1, "{hosts}");
    assert_eq!(hosts[0]["id"], host.as_str());
    // The way back for an agent that lost its credential: revoke, new token.
    let r = s
        .post(&format!("/v1/admin/hosts/{host}/revoke"), ADMIN, json!({}))
        .await;
    assert!(r.status < 300, "{}", r.body);
    let fresh = s.join_token().await;
    let r = s.post("/v1/agent/join", &fresh, join_body("gpu1")).await;
    assert_eq!(
        (r.status, r.body["host"].as_str()),
        (201, Some(host.as_str()))
    );
    assert_eq!(
        s.post("/v1/agent/join", &fresh, join_body("gpu1"))
            .await
            .status,
        401
    );
}

async fn hosts_bill_only_what_they_hold(s: Server) {
    let (acct, t) = s.account("acme").await;
    let a = s.host("a", "none", 0).await;
    let f = priced_flavor(&s).await;
    let img = s.image("ubuntu").await;
    let id = running(&s, &t, &f, &img, "w").await;
    assert_eq!(s.host_of(&id).await, a);
    let b = s.host("b", "none", 0).await;
    let before = credit(&s, &t).await;
    let now = 1_900_000_000_000i64;
    s.clock.set(now);
    // Host B reports host A's instance and the account's storage: neither
    // is billed (nor acknowledged).
    let r = s
        .heartbeat(
            &b,
            json!({"usage": [{"instance": id, "seq": 1, "running_ms": 3_600_000}],
                "store": [{"account": acct, "billed_bytes": 1_000_000_000_000u64}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["billed"], json!([]));
    let me = s.get("/v1/account", &t).await.body;
    assert_eq!(me["snapshot_used_bytes"], 0, "{me}");
    s.clock.set(now + 3_600_000);
    gantry_controller::meter::tick(&s.state).await.unwrap();
    assert_eq!(credit(&s, &t).await, before);
    assert!(ledger(&s, &t).await.is_empty());
    // Host A, which runs it, is billed as usual.
    let r = s
        .heartbeat(
            &a,
            json!({"usage": [{"instance": id, "seq": 1, "running_ms": 2_000}],
                "store": [{"account": acct, "billed_bytes": 1_000_000_000_000u64}]}),
        )
        .await;
    assert_eq!(r.body["billed"][0]["seq"], 1, "{}", r.body);
    assert_eq!(credit(&s, &t).await, before - 2_000);
    let me = s.get("/v1/account", &t).await.body;
    assert_eq!(me["snapshot_used_bytes"], 1_000_000_000_000u64, "{me}");
}

async fn far_future_heartbeats_are_refused(s: Server) {
    let h = s.host("h", "none", 0).await;
    let cred = s.cred(&h);
    let now = chrono::Utc::now().timestamp_millis();
    let body = |sent: i64| {
        json!({"sent_at_ms": sent, "capacity": Server::capacity("none", 0),
            "health": "unhealthy", "problems": ["from the future"], "instances": [],
            "usage": []})
    };
    for sent in [now + 86_400_000, i64::MAX, now + 2 * MAX_CLOCK_SKEW_MS, -1] {
        let r = s.post("/v1/agent/heartbeat", &cred, body(sent)).await;
        assert_eq!(
            (r.status, r.field().as_str()),
            (422, "sent_at_ms"),
            "{}",
            r.body
        );
    }
    // The host's later heartbeats still count.
    let r = s
        .heartbeat(
            &h,
            json!({"health": "unhealthy", "problems": ["disk slow"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = s.get(&format!("/v1/admin/hosts/{h}"), ADMIN).await.body;
    assert_eq!(got["health"], "unhealthy", "{got}");
    // A row poisoned before this fix (a far-future time stored) heals.
    let db = s.db().await;
    sqlx::query("UPDATE hosts SET last_heartbeat_sent_ms = $1 WHERE id = $2")
        .bind(i64::MAX)
        .bind(&h)
        .execute(&db.pool)
        .await
        .unwrap();
    let r = s.heartbeat(&h, json!({"health": "healthy"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got = s.get(&format!("/v1/admin/hosts/{h}"), ADMIN).await.body;
    assert_eq!(got["health"], "healthy", "{got}");
}

async fn freed_ports_are_reused(s: Server) {
    let (_, t) = s.account("acme").await;
    s.host("a", "none", 0).await;
    let f = s.flavor("cpu", None, 0).await;
    let img = s.image("ubuntu").await;
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w", "flavor": f, "image": img, "ports": []}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.id();
    let fwds = format!("/v1/instances/{id}/forwards");
    let start = 20000u64;
    for round in 0..3 {
        // Allocate to exhaustion: the range's ports, lowest first.
        let existing = s.get(&fwds, &t).await.body;
        let mut ids = Vec::new();
        for f in existing.as_array().unwrap() {
            ids.push(f["id"].as_str().unwrap().to_string());
        }
        let mut got = Vec::new();
        for g in 0..(3 - ids.len() as u64) {
            let r = s
                .post(&fwds, &t, json!({"guest_port": 8000 + round * 10 + g}))
                .await;
            assert_eq!(r.status, 201, "round {round}: {}", r.body);
            got.push(r.body["host_port"].as_u64().unwrap());
            ids.push(r.id());
        }
        let r = s.post(&fwds, &t, json!({"guest_port": 9999})).await;
        assert_eq!(r.status, 409, "{}", r.body);
        assert!(r.error().contains("no free host port"), "{}", r.body);
        let all: Vec<u64> = s
            .get(&fwds, &t)
            .await
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["host_port"].as_u64().unwrap())
            .collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, vec![start, start + 1, start + 2], "round {round}");
        // Free the middle port (round 0) or all of them (later rounds).
        let free: Vec<&String> = if round == 0 {
            ids.iter().skip(1).take(1).collect()
        } else {
            ids.iter().collect()
        };
        for fid in free {
            let r = s
                .call(Method::DELETE, &format!("{fwds}/{fid}"), &t, None)
                .await;
            assert_eq!(r.status, 204, "{}", r.body);
        }
        if round == 0 {
            let r = s.post(&fwds, &t, json!({"guest_port": 7000})).await;
            assert_eq!(
                (r.status, r.body["host_port"].as_u64()),
                (201, Some(start + 1)),
                "the freed port is the lowest free one: {}",
                r.body
            );
        }
    }
}

async fn hosts_that_never_joined_get_no_placements(s: Server) {
    let (_, t) = s.account("acme").await;
    let pre = s.registered_host("pre", "none", 0).await;
    let f = s.flavor("cpu", None, 0).await;
    let img = s.image("ubuntu").await;
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(
        r.status, 409,
        "placed on a host that never joined: {}",
        r.body
    );
    assert!(r.error().contains("no host"), "{}", r.body);
    // Once its agent joins, it is a candidate.
    let token = s.join_token().await;
    let j = s
        .post(
            "/v1/agent/join",
            &token,
            json!({"name": "pre", "address": "pre.example",
                "capacity": Server::capacity("none", 0)}),
        )
        .await;
    assert_eq!(
        (j.status, j.body["host"].as_str()),
        (201, Some(pre.as_str()))
    );
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "w", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["host"].as_str()),
        (202, Some(pre.as_str()))
    );
}
