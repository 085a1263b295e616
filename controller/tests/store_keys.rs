//! The snapshot store shared across hosts, over real HTTP on SQLite and
//! PostgreSQL: chunk keys owned by the controller (handed only to hosts
//! that serve the account, sealed at rest, the same to every host, a
//! host's own key adopted or kept), and snapshot availability from the
//! stores hosts report (a host-local store's snapshot is unavailable once
//! its host is gone; a shared store's restores on another host reading it,
//! never on a host with another store).

#[macro_use]
mod common;

use common::{Server, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

on_both!(keys_go_only_to_hosts_serving_the_account);
on_both!(offered_keys_are_adopted_or_kept);
on_both!(local_store_snapshot_is_unavailable_once_its_host_is_gone);
on_both!(shared_store_snapshot_restores_on_another_host);

fn store(kind: &str, n: u8) -> Value {
    json!({"kind": kind, "id": format!("{kind}-{}", format!("{n:02x}").repeat(16))})
}

async fn keys(s: &Server, host: &str, account: &str) -> common::Reply {
    let cred = s.cred(host);
    s.get(&format!("/v1/agent/store-keys/{account}"), &cred)
        .await
}

/// An instance of the tenant, Running, on the host the scheduler chose.
async fn running(s: &Server, t: &str, body: Value) -> String {
    let r = s.post("/v1/instances", t, body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.id();
    s.observe(&id, "Running").await;
    id
}

async fn keys_go_only_to_hosts_serving_the_account(s: Server) {
    let (acct, t) = s.account("keyed").await;
    let (other, t2) = s.account("other").await;
    let h1 = s.host("h1", "L4", 1).await;
    let h2 = s.host("h2", "L4", 1).await;
    let f = s.flavor("l4", Some("L4"), 1).await;
    let img = s.image("ubuntu").await;
    let path = format!("/v1/agent/store-keys/{acct}");

    // Nobody but a host serving the account gets its key.
    let r = keys(&s, &h1, &acct).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.error().contains("gets no chunk key"), "{}", r.body);
    assert_eq!(s.raw(Method::GET, &path, None, None).await.status, 401);
    assert_eq!(s.get(&path, &t).await.status, 403, "a tenant");
    assert_eq!(s.get(&path, ADMIN).await.status, 403, "an admin");
    let r = keys(&s, &h1, "acc-nonsense").await;
    assert_eq!(r.status, 404, "{}", r.body);

    // An instance of the account on a host: that host gets the key.
    let i1 = running(&s, &t, json!({"name": "a", "flavor": f, "image": img})).await;
    let first = s.host_of(&i1).await;
    let second = if first == h1 { h2.clone() } else { h1.clone() };
    assert_eq!(keys(&s, &second, &acct).await.status, 403);
    let r = keys(&s, &first, &acct).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let key = r.body["current"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 64);
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(r.body["previous"], json!([]));
    assert_eq!(r.body["account"], acct.as_str());
    assert_eq!(keys(&s, &first, &acct).await.body["current"], key.as_str());

    // The other host, once it has work for the account, gets the same key.
    let i2 = running(&s, &t, json!({"name": "b", "flavor": f, "image": img})).await;
    assert_eq!(s.host_of(&i2).await, second);
    assert_eq!(keys(&s, &second, &acct).await.body["current"], key.as_str());

    // Released: no more work for the account there.
    let act = format!("/v1/instances/{i1}/actions");
    s.ok(
        Method::POST,
        &act,
        &t,
        Some(json!({"action": "release"})),
        202,
    )
    .await;
    s.observe(&i1, "Released").await;
    assert_eq!(
        keys(&s, &first, &acct).await.status,
        403,
        "no more work for it there"
    );

    // Another account's key differs, and only its host gets it.
    let i3 = running(&s, &t2, json!({"name": "c", "flavor": f, "image": img})).await;
    assert_eq!(s.host_of(&i3).await, first);
    assert_eq!(keys(&s, &second, &other).await.status, 403);
    let theirs = keys(&s, &first, &other).await;
    assert_eq!(theirs.status, 200, "{}", theirs.body);
    assert_ne!(theirs.body["current"], key.as_str());

    // Sealed at rest: the raw row does not hold the key.
    let db = s.db().await;
    let rows = sqlx::query("SELECT key_sealed, fingerprint, origin FROM store_keys")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "one key per account, made once");
    use sqlx::Row;
    for row in &rows {
        let sealed: String = row.get("key_sealed");
        let fp: String = row.get("fingerprint");
        let origin: String = row.get("origin");
        assert!(sealed.starts_with("v1:"), "{sealed}");
        assert!(
            !sealed.contains(&key) && !key.contains(&fp),
            "sealed, one-way fingerprint"
        );
        assert_eq!(origin, "controller");
    }

    // Never in a tenant's or admin's answers.
    for p in [
        "/v1/snapshots",
        "/v1/instances",
        &format!("/v1/admin/accounts/{acct}"),
    ] {
        let body = s.get(p, ADMIN).await.body.to_string();
        assert!(!body.contains(&key), "{p}");
    }
}

async fn offered_keys_are_adopted_or_kept(s: Server) {
    let (acct, t) = s.account("upgraded").await;
    let h1 = s.host("h1", "L4", 1).await;
    let h2 = s.host("h2", "L4", 1).await;
    let f = s.flavor("l4", Some("L4"), 1).await;
    let img = s.image("ubuntu").await;
    let offer = |host: String, key: String| {
        let s = &s;
        let acct = acct.clone();
        async move {
            let cred = s.cred(&host);
            s.post(
                &format!("/v1/agent/store-keys/{acct}"),
                &cred,
                json!({"key": key}),
            )
            .await
        }
    };
    let k1 = "1a".repeat(32);
    let k2 = "2b".repeat(32);
    let r = offer(h1.clone(), k1.clone()).await;
    assert_eq!(r.status, 403, "no work for the account yet: {}", r.body);
    let i1 = running(&s, &t, json!({"name": "a", "flavor": f, "image": img})).await;
    let i2 = running(&s, &t, json!({"name": "b", "flavor": f, "image": img})).await;
    let (a, b) = (s.host_of(&i1).await, s.host_of(&i2).await);
    assert_ne!(a, b);
    let _ = h2;
    let r = offer(a.clone(), "zz".repeat(32)).await;
    assert_eq!((r.status, r.field().as_str()), (422, "key"), "{}", r.body);
    // The first host's own key becomes the account's (no key yet).
    let r = offer(a.clone(), k1.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["current"].as_str(), r.body["previous"].clone()),
        (Some(k1.as_str()), json!([]))
    );
    // Another host's different key is kept, to read, but does not win.
    let r = offer(b.clone(), k2.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["current"], k1.as_str());
    assert_eq!(r.body["previous"], json!([k2]));
    // Offering again changes nothing; every host gets both.
    let again = offer(b.clone(), k2.clone()).await.body;
    assert_eq!(again, r.body);
    assert_eq!(keys(&s, &a, &acct).await.body, r.body);
}

/// Takes a snapshot of `instance` through the API and plays its host
/// saving it; returns the snapshot id.
async fn snapshot(s: &Server, t: &str, instance: &str, name: &str) -> String {
    let r = s
        .post(
            &format!("/v1/instances/{instance}/snapshots"),
            t,
            json!({"name": name}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let sid = r.id();
    assert_eq!(r.body["available"], false, "{}", r.body);
    let why = r.body["unavailable_reason"].as_str().unwrap_or_default();
    assert!(why.contains("is Creating, not Success"), "{why}");
    let done = s.finish_snapshot(instance, 10 << 30, 1 << 30).await;
    assert_eq!(done.status, 204, "{}", done.body);
    sid
}

async fn local_store_snapshot_is_unavailable_once_its_host_is_gone(s: Server) {
    let (_, t) = s.account("local").await;
    let h1 = s.host("h1", "L4", 4).await;
    let r = s
        .heartbeat(&h1, json!({"store_identity": store("local", 1)}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A malformed store identity is refused, naming the field.
    let r = s
        .heartbeat(
            &h1,
            json!({"store_identity": {"kind": "local", "id": "s3-00"}}),
        )
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (422, "store_identity.id"),
        "{}",
        r.body
    );
    let f = s.flavor("l4", Some("L4"), 1).await;
    let img = s.image("ubuntu").await;
    let i = running(&s, &t, json!({"name": "a", "flavor": f, "image": img})).await;
    let sid = snapshot(&s, &t, &i, "s1").await;
    let snap = s.get(&format!("/v1/snapshots/{sid}"), &t).await.body;
    assert_eq!(
        (
            snap["available"].clone(),
            snap["unavailable_reason"].clone()
        ),
        (json!(true), Value::Null)
    );

    // Another host with its own local store, emptier: the restore still
    // goes to the snapshot's host.
    let h2 = s.host_with("h2", json!({"vcpus": 512, "memory_mib": 4_194_304, "disk_gib": 90_000,
        "gpus": (0..8).map(|i| json!({"model": "L4", "pci": format!("0000:{:02x}:00.0", 0x10 + i)})).collect::<Vec<_>>()})).await;
    s.heartbeat(&h2, json!({"store_identity": store("local", 2)}))
        .await;
    let body = json!({"name": "from-snap", "flavor": f, "snapshot": sid, "placement": "spread"});
    let r = s.post("/v1/instances", &t, body.clone()).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["host"], h1.as_str(), "only h1 reads its local store");

    // h1 is revoked: the snapshot is unavailable, and says why.
    s.ok(
        Method::POST,
        &format!("/v1/admin/hosts/{h1}/revoke"),
        ADMIN,
        None,
        200,
    )
    .await;
    let snap = s.get(&format!("/v1/snapshots/{sid}"), &t).await.body;
    assert_eq!(snap["available"], false, "{snap}");
    let why = snap["unavailable_reason"].as_str().unwrap().to_string();
    assert!(
        why.contains(&h1) && why.contains("down or revoked"),
        "{why}"
    );
    let listed = s.get("/v1/snapshots", &t).await.body;
    assert_eq!(listed[0]["available"], false);
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "again", "flavor": f, "snapshot": sid}),
        )
        .await;
    assert_eq!(
        (r.status, r.error()),
        (409, why),
        "refused with the sentence"
    );

    // Removed for good: the snapshot can no longer be restored, and says so.
    let r = s
        .post(&format!("/v1/admin/hosts/{h1}/remove"), ADMIN, json!({}))
        .await;
    assert!(r.status < 300, "{}", r.body);
    let snap = s.get(&format!("/v1/snapshots/{sid}"), &t).await.body;
    assert_eq!(snap["available"], false, "{snap}");
    let why = snap["unavailable_reason"].as_str().unwrap().to_string();
    assert!(
        why.contains("was removed, so it can no longer be restored"),
        "{why}"
    );
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "gone", "flavor": f, "snapshot": sid}),
        )
        .await;
    assert_eq!((r.status, r.error()), (409, why));
}

async fn shared_store_snapshot_restores_on_another_host(s: Server) {
    let (acct, t) = s.account("shared").await;
    let h1 = s.host("h1", "L4", 4).await;
    let h2 = s.host("h2", "L4", 4).await;
    let shared = store("s3", 7);
    for h in [&h1, &h2] {
        let r = s.heartbeat(h, json!({"store_identity": shared})).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let f = s.flavor("l4", Some("L4"), 1).await;
    let img = s.image("ubuntu").await;
    // Cordon h2 so the snapshot is taken on h1.
    s.ok(
        Method::POST,
        &format!("/v1/admin/hosts/{h2}/cordon"),
        ADMIN,
        None,
        200,
    )
    .await;
    let i = running(&s, &t, json!({"name": "a", "flavor": f, "image": img})).await;
    assert_eq!(s.host_of(&i).await, h1);
    let key_a = keys(&s, &h1, &acct).await.body["current"].clone();
    let sid = snapshot(&s, &t, &i, "s1").await;
    s.ok(
        Method::POST,
        &format!("/v1/admin/hosts/{h2}/uncordon"),
        ADMIN,
        None,
        200,
    )
    .await;

    // A third host, the emptiest, with a store of its own.
    let h3 = s.host_with("h3", json!({"vcpus": 512, "memory_mib": 4_194_304, "disk_gib": 90_000,
        "gpus": (0..8).map(|i| json!({"model": "L4", "pci": format!("0000:{:02x}:00.0", 0x10 + i)})).collect::<Vec<_>>()})).await;
    s.heartbeat(&h3, json!({"store_identity": store("local", 3)}))
        .await;

    // h1 goes away; h2 reads the same store, so the snapshot stays usable
    // and restores there (never on h3, whatever the weighing prefers).
    s.ok(
        Method::POST,
        &format!("/v1/admin/hosts/{h1}/revoke"),
        ADMIN,
        None,
        200,
    )
    .await;
    let snap = s.get(&format!("/v1/snapshots/{sid}"), &t).await.body;
    assert_eq!(snap["available"], true, "{snap}");
    for n in 0..2 {
        let body =
            json!({"name": format!("r{n}"), "flavor": f, "snapshot": sid, "placement": "spread"});
        let r = s.post("/v1/instances", &t, body).await;
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(
            r.body["host"],
            h2.as_str(),
            "only h2 reads the shared store"
        );
    }
    // h2 now serves the account: the same key h1 wrote with.
    assert_eq!(keys(&s, &h2, &acct).await.body["current"], key_a);
    assert_eq!(keys(&s, &h3, &acct).await.status, 403);

    // With h2 revoked too, nobody reads the store.
    s.ok(
        Method::POST,
        &format!("/v1/admin/hosts/{h2}/revoke"),
        ADMIN,
        None,
        200,
    )
    .await;
    let snap = s.get(&format!("/v1/snapshots/{sid}"), &t).await.body;
    assert_eq!(snap["available"], false, "{snap}");
    assert!(
        snap["unavailable_reason"]
            .as_str()
            .unwrap()
            .contains("no live host reads"),
        "{snap}"
    );
}
