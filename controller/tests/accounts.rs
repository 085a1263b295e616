//! Account lifecycle over real HTTP with a simulated host, on SQLite and
//! on PostgreSQL: disable (tokens refused, instances stopped, data kept),
//! enable, and delete (instances released, snapshots and volumes deleted,
//! tokens answer 404, ledger and audit kept).

#[macro_use]
mod common;

use common::{Server, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

on_both!(disable_enable_delete);

/// A Running instance with a saved snapshot, and a volume, for `t`.
async fn holdings(s: &Server, t: &str) -> (String, String, String) {
    s.host("h", "none", 0).await;
    let f = s.flavor("c", None, 0).await;
    let img = s.image("ubuntu").await;
    let ins = s
        .post(
            "/v1/instances",
            t,
            json!({"name": "run", "flavor": f, "image": img}),
        )
        .await
        .id();
    s.observe(&ins, "Running").await;
    let snap = s
        .ok(
            Method::POST,
            &format!("/v1/instances/{ins}/snapshots"),
            t,
            Some(json!({"name": "s1"})),
            202,
        )
        .await;
    let snap = snap["snapshot"]["id"]
        .as_str()
        .or(snap["id"].as_str())
        .unwrap_or_else(|| panic!("a snapshot id in {snap}"))
        .to_string();
    let r = s.finish_snapshot(&ins, 1 << 30, 1 << 29).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let vol = s
        .ok(
            Method::POST,
            "/v1/volumes",
            t,
            Some(json!({"name": "data", "size_gib": 10})),
            201,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (ins, snap, vol)
}

async fn admin(s: &Server, method: Method, path: &str, want: u16) -> Value {
    s.ok(method, path, ADMIN, None, want).await
}

async fn disable_enable_delete(s: Server) {
    let (acct, t) = s.account("doomed").await;
    let (ins, snap, vol) = holdings(&s, &t).await;
    let base = format!("/v1/admin/accounts/{acct}");
    // Only admins; an active account cannot be deleted.
    let r = s
        .call(Method::POST, &format!("{base}/disable"), &t, None)
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = s.call(Method::DELETE, &base, ADMIN, None).await;
    assert_eq!(
        (r.status, r.error()),
        (
            409,
            format!("account {acct} is active; disable it first (POST {base}/disable)")
        )
    );
    // Disable: 401 with its own sentence, the Running instance is stopped.
    let d = admin(&s, Method::POST, &format!("{base}/disable"), 200).await;
    assert_eq!(d["status"], "disabled", "{d}");
    assert_eq!(d["operations"].as_array().unwrap().len(), 1, "{d}");
    let r = s.get("/v1/instances", &t).await;
    assert_eq!(
        (r.status, r.error()),
        (
            401,
            format!("account {acct} is disabled; ask an admin to enable it")
        )
    );
    let op = s.op_of(&ins).await.expect("a stop operation");
    assert_eq!(op["command"]["kind"], "stop", "{op}");
    s.observe(&ins, "Stopped").await;
    // Data kept; enable brings access back (the instance stays stopped).
    let i = admin(&s, Method::GET, &format!("/v1/instances/{ins}"), 200).await;
    assert_eq!(i["state"], "Stopped", "{i}");
    admin(&s, Method::GET, &format!("/v1/snapshots/{snap}"), 200).await;
    let e = admin(&s, Method::POST, &format!("{base}/enable"), 200).await;
    assert_eq!(e["status"], "active", "{e}");
    assert_eq!(s.get("/v1/instances", &t).await.status, 200);
    // Delete: releases, deletes, revokes; tokens answer 404.
    admin(&s, Method::POST, &format!("{base}/disable"), 200).await;
    let d = admin(&s, Method::DELETE, &base, 202).await;
    assert_eq!(d["status"], "deleting", "{d}");
    assert_eq!(
        d["waiting_for"],
        json!([format!("instance {ins}: being released")]),
        "{d}"
    );
    let r = s.get("/v1/instances", &t).await;
    assert_eq!(
        (r.status, r.error()),
        (404, format!("account {acct} no longer exists"))
    );
    admin(&s, Method::GET, &format!("/v1/snapshots/{snap}"), 404).await;
    admin(&s, Method::GET, &format!("/v1/volumes/{vol}"), 404).await;
    // The host reports the release; the reconcile loop finishes the job.
    s.observe(&ins, "Released").await;
    gantry_controller::reconcile::once(&s.state).await.unwrap();
    let d = admin(&s, Method::DELETE, &base, 200).await;
    assert_eq!(
        (d["status"].as_str(), d["waiting_for"].clone()),
        (Some("deleted"), json!([]))
    );
    let r = s
        .call(Method::POST, &format!("{base}/enable"), ADMIN, None)
        .await;
    assert_eq!(
        (r.status, r.error()),
        (
            409,
            format!("account {acct} is deleted; it can no longer be changed")
        )
    );
    // The ledger and the audit rows are kept.
    let db = s.db().await;
    let ledger: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM credit_ledger WHERE account_id = $1")
            .bind(&acct)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(ledger >= 1, "ledger rows: {ledger}");
    let log = admin(
        &s,
        Method::GET,
        &format!("/v1/admin/audit?account={acct}"),
        200,
    )
    .await;
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "/v1/volumes"),
        "{log}"
    );
    let log = admin(&s, Method::GET, "/v1/admin/audit", 200).await;
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == base && e["method"] == "DELETE" && e["status"] == 200),
        "{log}"
    );
}
