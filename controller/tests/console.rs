//! The web console over real HTTP against a real controller (SQLite and
//! PostgreSQL), without a browser: sign-in and its refusals, the session
//! cookie's attributes and what is stored of it, CSRF on every form,
//! sign-out, revocation, redirects when signed out, account scoping (404
//! for another account's instance) and the admin page's admin rule. The
//! browser test is `tests/tests/e2e_console.rs`.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use serde_json::json;

on_both!(signed_out_pages_redirect_to_sign_in);
on_both!(sign_in_session_and_csrf);
on_both!(accounts_see_only_their_own);
on_both!(revoked_token_ends_the_session);
on_both!(expired_sessions_end);

/// Status, `Location` header and body of a console request.
struct Page {
    status: u16,
    location: String,
    set_cookie: String,
    body: String,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn page(resp: reqwest::Response) -> Page {
    let h = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (location, set_cookie) = (h("location"), h("set-cookie"));
    Page {
        status: resp.status().as_u16(),
        location,
        set_cookie,
        body: resp.text().await.unwrap(),
    }
}

async fn get(s: &Server, cookie: Option<&str>, path: &str) -> Page {
    let mut r = client().get(format!("{}{path}", s.url));
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    page(r.send().await.unwrap()).await
}

async fn post(s: &Server, cookie: Option<&str>, path: &str, form: &[(&str, &str)]) -> Page {
    let mut r = client().post(format!("{}{path}", s.url)).form(form);
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    page(r.send().await.unwrap()).await
}

/// Signs in with `token`: the `name=value` cookie to send back.
async fn sign_in(s: &Server, token: &str) -> String {
    let p = post(s, None, "/console/sign-in", &[("token", token)]).await;
    assert_eq!(p.status, 303, "{}", p.body);
    assert_eq!(p.location, "/console/instances");
    p.set_cookie.split(';').next().unwrap().to_string()
}

/// The CSRF token a page's forms carry.
fn csrf(body: &str) -> String {
    let at = body
        .find("name=\"csrf\" value=\"")
        .expect("the page has a CSRF field");
    body[at + 19..at + 19 + 64].to_string()
}

const PAGES: [&str; 6] = [
    "/console/instances",
    "/console/instances/new",
    "/console/instances/ins-00000000-0000-0000-0000-000000000000",
    "/console/instances/rows",
    "/console/snapshots",
    "/console/admin",
];

async fn signed_out_pages_redirect_to_sign_in(s: Server) {
    for path in PAGES {
        let p = get(&s, None, path).await;
        assert_eq!(
            (p.status, p.location.as_str()),
            (303, "/console/sign-in"),
            "GET {path}"
        );
        // A cookie that names no session is the same as none.
        let bogus = format!("gantry_console={}", "ab".repeat(32));
        let p = get(&s, Some(&bogus), path).await;
        assert_eq!(p.status, 303, "GET {path} with an unknown session");
    }
    let p = post(&s, None, "/console/instances/batch", &[("action", "stop")]).await;
    assert_eq!((p.status, p.location.as_str()), (303, "/console/sign-in"));
    let p = get(&s, None, "/").await;
    assert_eq!(p.location, "/console/instances");
    let p = get(&s, None, "/console/sign-in").await;
    assert_eq!(p.status, 200);
    assert!(p
        .body
        .contains("<form method=\"post\" action=\"/console/sign-in\""));
    // The assets are built in and need no session.
    let css = get(&s, None, "/console/assets/console.css").await;
    assert_eq!(css.status, 200);
    assert!(get(&s, None, "/console/assets/console.js")
        .await
        .body
        .contains("__gantryErrors"));
}

async fn sign_in_session_and_csrf(s: Server) {
    let (_, token) = s.account("acme").await;
    // A wrong token is refused on the sign-in page, with no cookie.
    let bad = post(&s, None, "/console/sign-in", &[("token", "gty_nope")]).await;
    assert_eq!(bad.status, 401, "{}", bad.body);
    assert!(bad.set_cookie.is_empty());
    assert!(bad.body.contains("role=\"alert\""));

    let p = post(&s, None, "/console/sign-in", &[("token", &token)]).await;
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age="] {
        assert!(p.set_cookie.contains(attr), "{attr} in {}", p.set_cookie);
    }
    assert!(
        !p.set_cookie.contains("Secure"),
        "plain HTTP: no Secure flag"
    );
    let cookie = p.set_cookie.split(';').next().unwrap().to_string();
    let id = cookie.strip_prefix("gantry_console=").unwrap();
    // Behind a TLS proxy the cookie is Secure.
    let tls = client()
        .post(format!("{}/console/sign-in", s.url))
        .header("x-forwarded-proto", "https")
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert!(page(tls).await.set_cookie.contains("; Secure"));

    // Only the session id's hash and the sealed token are stored.
    let db = s.db().await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id_hash, token_sealed FROM console_sessions")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    for (h, sealed) in &rows {
        assert!(!h.contains(id) && !sealed.contains(id) && !sealed.contains(&token));
    }

    let list = get(&s, Some(&cookie), "/console/instances").await;
    assert_eq!(list.status, 200);
    assert!(list.body.contains("My Instances"));
    let token_csrf = csrf(&list.body);

    // Every form needs the session's CSRF token.
    let id0 = "ins-00000000-0000-0000-0000-000000000000";
    for form in [
        vec![("action", "stop")],
        vec![("action", "stop"), ("csrf", "0")],
    ] {
        let p = post(
            &s,
            Some(&cookie),
            &format!("/console/instances/{id0}/action"),
            &form,
        )
        .await;
        assert_eq!(p.status, 403, "{}", p.body);
        let p = post(&s, Some(&cookie), "/console/sign-out", &form).await;
        assert_eq!(p.status, 403);
    }
    let p = post(
        &s,
        Some(&cookie),
        "/console/instances/new",
        &[("name", "x")],
    )
    .await;
    assert_eq!(p.status, 403);
    // With it, an unknown instance is the API's 404.
    let p = post(
        &s,
        Some(&cookie),
        &format!("/console/instances/{id0}/action"),
        &[("action", "stop"), ("csrf", &token_csrf)],
    )
    .await;
    assert_eq!(p.status, 404, "{}", p.body);

    // Sign-out deletes the session.
    let p = post(
        &s,
        Some(&cookie),
        "/console/sign-out",
        &[("csrf", &token_csrf)],
    )
    .await;
    assert_eq!((p.status, p.location.as_str()), (303, "/console/sign-in"));
    assert!(p.set_cookie.contains("Max-Age=0"));
    let left: Vec<(String,)> = sqlx::query_as("SELECT id_hash FROM console_sessions")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "only the other browser's session is left");
    let p = get(&s, Some(&cookie), "/console/instances").await;
    assert_eq!((p.status, p.location.as_str()), (303, "/console/sign-in"));
}

async fn accounts_see_only_their_own(s: Server) {
    let (_, a) = s.account("alpha").await;
    let (_, b) = s.account("beta").await;
    let h1 = s.host("h1", "none", 0).await;
    let f = s.flavor("cpu", None, 0).await;
    let img = s.image("ubuntu").await;
    let r = s
        .post(
            "/v1/instances",
            &a,
            json!({"name": "alpha-one", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.id();
    let ca = sign_in(&s, &a).await;
    // The host at work on the create: the row's badge says how far it is.
    let op = r.body["operation"].as_str().unwrap().to_string();
    let rep = s
        .report(&h1, &op, json!({"outcome": "running", "progress": 40}))
        .await;
    assert_eq!(rep.status, 204, "{}", rep.body);
    let rows = get(&s, Some(&ca), "/console/instances/rows").await;
    assert!(
        rows.body
            .contains("Creating <span class=\"percent\">40%</span>"),
        "{}",
        rows.body
    );
    s.observe(&id, "Running").await;
    let rows = get(&s, Some(&ca), "/console/instances/rows").await;
    assert!(!rows.body.contains("class=\"percent\""), "{}", rows.body);

    let list = get(&s, Some(&ca), "/console/instances?status=Running").await;
    assert!(
        list.body.contains(&id) && list.body.contains("alpha-one"),
        "{}",
        list.body
    );
    // The row offers the state machine's actions for Running, cost in money.
    assert!(list.body.contains("data-action=\"stop\""));
    assert!(list.body.contains("data-action=\"snapshot\""));
    assert!(!list.body.contains("data-action=\"start\""));
    assert!(list.body.contains("<td class=\"cost\">$"));
    let stopped = get(&s, Some(&ca), "/console/instances/rows?status=Stopped").await;
    assert!(!stopped.body.contains(&id));
    let mine = get(
        &s,
        Some(&ca),
        &format!("/console/instances/{id}?tab=config"),
    )
    .await;
    assert_eq!(mine.status, 200);
    assert!(mine.body.contains("alpha-one"));

    // What tenants type reaches the page escaped.
    let evil = "<img src=x onerror=alert(1)>";
    let r = s
        .post(
            &format!("/v1/instances/{id}/forwards"),
            &a,
            json!({"guest_port": 8080, "label": evil}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let p = get(
        &s,
        Some(&ca),
        &format!("/console/instances/{id}?tab=access"),
    )
    .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(!p.body.contains(evil), "unescaped label");
    assert!(p.body.contains("&lt;img src=x onerror=alert(1)&gt;"));
    // While Snapshotting (and once Released) only Config and Hardware
    // answer: the other tabs are disabled buttons, the page opens on Config.
    for state in ["Snapshotting", "Released"] {
        s.observe(&id, state).await;
        let rows = get(&s, Some(&ca), "/console/instances/rows").await;
        assert!(
            rows.body.contains(&format!("data-status=\"{state}\"")),
            "{}",
            rows.body
        );
        let p = get(&s, Some(&ca), &format!("/console/instances/{id}")).await;
        assert_eq!(p.status, 200, "{state}: {}", p.body);
        assert!(
            p.body.contains("id=\"tab-config-panel\""),
            "{state}: {}",
            p.body
        );
        for tab in ["access", "monitor", "billing", "network-group"] {
            assert!(
                p.body.contains(&format!("id=\"tab-{tab}\" disabled")),
                "{state}: {tab} enabled"
            );
        }
        for tab in ["config", "hardware"] {
            assert!(p
                .body
                .contains(&format!("<a class=\"tab\" id=\"tab-{tab}\"")));
        }
        if state == "Snapshotting" {
            s.observe(&id, "Running").await;
        }
    }
    let cb = sign_in(&s, &b).await;
    let theirs = get(&s, Some(&cb), "/console/instances").await;
    assert!(!theirs.body.contains(&id));
    for tail in ["", "?tab=access", "/status", "/password"] {
        let p = get(&s, Some(&cb), &format!("/console/instances/{id}{tail}")).await;
        assert_eq!(p.status, 404, "{tail}: {}", p.body);
    }
    let p = post(
        &s,
        Some(&cb),
        &format!("/console/instances/{id}/action"),
        &[("action", "stop"), ("csrf", &csrf(&theirs.body))],
    )
    .await;
    assert_eq!(p.status, 404);
    // A batch reports the foreign row as not found, row by row.
    let p = post(
        &s,
        Some(&cb),
        "/console/instances/batch",
        &[
            ("action", "stop"),
            ("id", &id),
            ("csrf", &csrf(&theirs.body)),
        ],
    )
    .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(p.body.contains("Refused (404)"), "{}", p.body);
    // Admin pages follow the API's admin rule.
    assert_eq!(get(&s, Some(&cb), "/console/admin").await.status, 403);
    let gpu_host = s.host("g1", "H100", 1).await;
    let admin = sign_in(&s, ADMIN).await;
    let p = get(&s, Some(&admin), "/console/admin").await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(p.body.contains("h1") && p.body.contains("alpha"));
    // Each GPU with its health.
    let host = s.get(&format!("/v1/admin/hosts/{gpu_host}"), ADMIN).await;
    let pci = host.body["gpus"][0]["pci"].as_str().unwrap().to_string();
    let state = host.body["gpus"][0]["health"]["state"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        p.body.contains(&format!(
            "<code>{pci}</code> H100 — <span class=\"badge\">{state}</span>"
        )),
        "{}",
        p.body
    );
}

async fn revoked_token_ends_the_session(s: Server) {
    let (acct, _) = s.account("gamma").await;
    let t = s
        .ok(
            reqwest::Method::POST,
            "/v1/admin/tokens",
            ADMIN,
            Some(json!({"name": "gamma-2", "account": acct})),
            201,
        )
        .await;
    let cookie = sign_in(&s, t["token"].as_str().unwrap()).await;
    assert_eq!(
        get(&s, Some(&cookie), "/console/snapshots").await.status,
        200
    );
    let tid = t["id"].as_str().unwrap();
    s.ok(
        reqwest::Method::DELETE,
        &format!("/v1/admin/tokens/{tid}"),
        ADMIN,
        None,
        200,
    )
    .await;
    let p = get(&s, Some(&cookie), "/console/snapshots").await;
    assert_eq!((p.status, p.location.as_str()), (303, "/console/sign-in"));
}

async fn expired_sessions_end(s: Server) {
    let (_, t) = s.account("delta").await;
    let cookie = sign_in(&s, &t).await;
    assert_eq!(
        get(&s, Some(&cookie), "/console/instances").await.status,
        200
    );
    let db = s.db().await;
    sqlx::query("UPDATE console_sessions SET expires_ms = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    let p = get(&s, Some(&cookie), "/console/instances").await;
    assert_eq!((p.status, p.location.as_str()), (303, "/console/sign-in"));
    let left: Vec<(String,)> = sqlx::query_as("SELECT id_hash FROM console_sessions")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(left.is_empty(), "the expired session's row is deleted");
}
