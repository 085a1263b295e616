//! API token expiry and the account list's status, over real HTTP on
//! SQLite and on PostgreSQL: a token with an expiry works until it is
//! reached on the controller's (settable) clock, then answers 401 saying it
//! expired (a cached verification included); lifetimes out of range are
//! 422 naming `expires_in_secs`; `GET /v1/admin/accounts` shows each
//! account's status.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};

on_both!(token_expires_on_the_controller_clock);
on_both!(token_lifetime_is_bounded);
on_both!(account_list_shows_status);

async fn mint(s: &Server, body: Value) -> Value {
    s.ok(Method::POST, "/v1/admin/tokens", ADMIN, Some(body), 201)
        .await
}

async fn token_expires_on_the_controller_clock(s: Server) {
    let (acct, forever) = s.account("acme").await;
    let t = mint(
        &s,
        json!({"name": "ci", "account": acct, "expires_in_secs": 3600}),
    )
    .await;
    let (id, token) = (t["id"].as_str().unwrap(), t["token"].as_str().unwrap());
    let created: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(t["created_at"].clone()).unwrap();
    let expires: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(t["expires_at"].clone()).unwrap();
    assert_eq!((expires - created).num_seconds(), 3600, "{t}");
    // The list shows the expiry; a token without one shows none.
    let list = s
        .ok(Method::GET, "/v1/admin/tokens", ADMIN, None, 200)
        .await;
    let listed = |name: &str| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {list}"))
            .clone()
    };
    assert_eq!(listed("ci")["expires_at"], t["expires_at"]);
    assert_eq!(listed("acme-tok")["expires_at"], Value::Null);
    // Works before (and is now cached), refused with its sentence after.
    let r = s.get("/v1/account", token).await;
    assert_eq!(
        (r.status, r.body["id"].as_str()),
        (200, Some(acct.as_str()))
    );
    s.clock.advance(3_599_000);
    assert_eq!(s.get("/v1/account", token).await.status, 200);
    s.clock.advance(1_000);
    let r = s.get("/v1/account", token).await;
    assert_eq!(
        (r.status, r.error()),
        (
            401,
            format!("token {id} has expired; ask an admin for a new one")
        )
    );
    // Only the holder of the secret hears why; the other token still works.
    let flip = if token.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{flip}", &token[..token.len() - 1]);
    let r = s.get("/v1/account", &wrong).await;
    assert_eq!(
        (r.status, r.error()),
        (
            401,
            "the bearer token is not valid (unknown token or wrong secret)".to_string()
        )
    );
    assert_eq!(s.get("/v1/account", &forever).await.status, 200);
}

async fn token_lifetime_is_bounded(s: Server) {
    let (acct, _) = s.account("acme").await;
    for secs in [0u64, 59, 5 * 365 * 24 * 3600 + 1] {
        let r = s
            .post(
                "/v1/admin/tokens",
                ADMIN,
                json!({"name": "x", "account": acct, "expires_in_secs": secs}),
            )
            .await;
        assert_eq!(
            (r.status, r.field(), r.error()),
            (
                422,
                "expires_in_secs".to_string(),
                format!("expires_in_secs: must be between 60 and 157680000, got {secs}")
            ),
            "{}",
            r.body
        );
    }
    for secs in [60u64, 5 * 365 * 24 * 3600] {
        let t = mint(
            &s,
            json!({"name": format!("ok{secs}"), "expires_in_secs": secs}),
        )
        .await;
        assert!(t["expires_at"].is_string(), "{t}");
        // An admin token with an expiry works as an admin token.
        let token = t["token"].as_str().unwrap();
        assert_eq!(s.get("/v1/admin/accounts", token).await.status, 200);
    }
}

async fn account_list_shows_status(s: Server) {
    let (a, _) = s.account("acme").await;
    let (b, _) = s.account("bolt").await;
    s.ok(
        Method::POST,
        &format!("/v1/admin/accounts/{b}/disable"),
        ADMIN,
        None,
        200,
    )
    .await;
    let list = s
        .ok(Method::GET, "/v1/admin/accounts", ADMIN, None, 200)
        .await;
    let status = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {list}"))["status"]
            .clone()
    };
    assert_eq!(
        (status(&a), status(&b)),
        (json!("active"), json!("disabled"))
    );
    let one = s
        .ok(
            Method::GET,
            &format!("/v1/admin/accounts/{b}"),
            ADMIN,
            None,
            200,
        )
        .await;
    assert_eq!(one["status"], "disabled", "{one}");
}
