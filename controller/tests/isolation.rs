//! The isolation sweep: every operation of the served `/openapi.json`
//! (walked from the document, so a new route is swept without a hand
//! list) is called with account A's object ids by
//!
//! - account B's token: A's objects answer exactly like missing ones
//!   (404, the same sentence), admin and agent paths 403, and no answer
//!   names any of A's ids;
//! - a host credential: 403 outside `/v1/agent/`;
//! - an expired join token, an expired account token (told that it
//!   expired), a revoked token, an unknown token and no token: 401.
//!
//! It prints a table of the answers per caller.

#[macro_use]
mod common;

use common::{Backend, Server, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// Account A's objects, and a missing id of each kind.
struct Objects {
    /// Path parameter (`{id}` by collection, `{fwd}`, ...) -> A's id.
    ids: HashMap<&'static str, String>,
    /// The same keys -> an id of the same kind that does not exist.
    missing: HashMap<&'static str, String>,
}

/// The key of a path parameter: `{id}` by the collection before it.
fn key(path: &str, name: &str) -> &'static str {
    let before = path
        .split('/')
        .take_while(|seg| *seg != format!("{{{name}}}"))
        .last()
        .unwrap_or("");
    match (name, before) {
        ("fwd", _) => "fwd",
        ("account", _) | ("id", "accounts") => "accounts",
        ("pci", _) => "pci",
        ("view", _) => "view",
        ("instance", _) => "instances",
        ("connection", _) => "storage-connections",
        ("alias", _) => "alias",
        ("id", "ops") => "operations",
        ("id", coll) => match coll {
            "tokens" => "tokens",
            "hosts" => "hosts",
            "operations" => "operations",
            "instances" => "instances",
            "snapshots" => "snapshots",
            "ssh-keys" => "ssh-keys",
            "volumes" => "volumes",
            "network-groups" => "network-groups",
            "storage-connections" => "storage-connections",
            other => panic!("no object for {{id}} after {other:?} in {path}: add one"),
        },
        (other, _) => panic!("no object for {{{other}}} in {path}: add one"),
    }
}

/// `path` with its parameters filled from `ids`.
fn fill(path: &str, ids: &HashMap<&'static str, String>) -> String {
    path.split('/')
        .map(
            |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => ids[key(path, name)].clone(),
                None => seg.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

fn zero_id(prefix: &str) -> String {
    format!("{prefix}-{}", "0".repeat(31) + "1")
}

/// A's instance (with an operation, a forward and a snapshot), SSH key,
/// volume and token, on one joined host.
async fn objects_of_a(s: &Server, a_token: &str, a_id: &str) -> Objects {
    let host = s.host("iso-host", "H100", 1).await;
    s.heartbeat(&host, json!({})).await;
    let flavor = s.flavor("iso-1c", None, 0).await;
    let image = s.image("iso-image").await;
    let ins = s
        .ok(
            Method::POST,
            "/v1/instances",
            a_token,
            Some(json!({"name": "a-vm", "flavor": flavor, "image": image})),
            202,
        )
        .await;
    let ins_id = ins["id"].as_str().unwrap().to_string();
    let op = ins["operation"].as_str().unwrap().to_string();
    s.observe(&ins_id, "Running").await;
    // A's network group, with A's instance in it.
    let group = s
        .ok(
            Method::POST,
            "/v1/network-groups",
            a_token,
            Some(json!({"name": "a-group"})),
            201,
        )
        .await;
    let group = group["id"].as_str().unwrap().to_string();
    s.ok(
        Method::POST,
        &format!("/v1/network-groups/{group}/members"),
        a_token,
        Some(json!({"instance": ins_id})),
        201,
    )
    .await;
    let fwd = s
        .ok(
            Method::POST,
            &format!("/v1/instances/{ins_id}/forwards"),
            a_token,
            Some(json!({"guest_port": 9000})),
            201,
        )
        .await;
    let snap = s
        .ok(
            Method::POST,
            &format!("/v1/instances/{ins_id}/snapshots"),
            a_token,
            Some(json!({"name": "a-snap"})),
            202,
        )
        .await;
    let key = s
        .ok(
            Method::POST,
            "/v1/ssh-keys",
            a_token,
            Some(json!({"name": "a-key", "public_key":
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a"})),
            201,
        )
        .await;
    let vol = s
        .ok(
            Method::POST,
            "/v1/volumes",
            a_token,
            Some(json!({"name": "a-vol", "size_gib": 1})),
            201,
        )
        .await;
    let conn = storage_connection_of(s, a_id).await;
    let tokens = s.get("/v1/admin/tokens", ADMIN).await.body;
    let token = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["account"] == a_id)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ids = HashMap::from([
        ("accounts", a_id.to_string()),
        ("hosts", host),
        ("instances", ins_id),
        ("operations", op),
        ("fwd", fwd["id"].as_str().unwrap().to_string()),
        ("snapshots", snap["id"].as_str().unwrap().to_string()),
        ("ssh-keys", key["id"].as_str().unwrap().to_string()),
        ("volumes", vol["id"].as_str().unwrap().to_string()),
        ("network-groups", group),
        ("storage-connections", conn),
        ("tokens", token),
        ("pci", "0000:10:00.0".to_string()),
        ("view", "config".to_string()),
        ("alias", "H100".to_string()),
        ("flavor", flavor),
    ]);
    let missing = ids
        .iter()
        .map(|(k, v)| {
            let m = match v.split_once('-') {
                Some((prefix, _)) if v.len() > 32 && *k != "flavor" => zero_id(prefix),
                _ => v.clone(),
            };
            (*k, m)
        })
        .collect();
    Objects { ids, missing }
}

/// A's storage connection, stored directly (creating one through the API
/// checks the bucket at an S3 endpoint; controller/tests/buckets.rs does).
async fn storage_connection_of(s: &Server, a_id: &str) -> String {
    use gantry_controller::buckets::{insert_connection, secret_context, ConnectionRow};
    let id = gantry_proto::StorageConnectionId::new();
    let row = ConnectionRow {
        id,
        account: a_id.parse().unwrap(),
        name: "a-bucket".into(),
        endpoint: "http://127.0.0.1:9".into(),
        region: "us-east-1".into(),
        bucket: "a-bucket".into(),
        access_key_id: "a-key".into(),
        secret_sealed: s.state.sealer.seal(&secret_context(id), "a-secret"),
        created_ms: 1,
    };
    let db = s.db().await;
    let mut tx = db.begin_write().await.unwrap();
    insert_connection(&mut tx, &row).await.unwrap();
    tx.commit().await.unwrap();
    id.to_string()
}

/// A body the call accepts (so that the ids in the path, or A's ids in the
/// body, decide the answer), or `{}`.
fn body_for(
    method: &Method,
    template: &str,
    ids: &HashMap<&'static str, String>,
) -> Option<Vec<u8>> {
    if *method == Method::GET || *method == Method::DELETE {
        return None;
    }
    let body = match template {
        "/v1/instances/{id}/actions" => json!({"action": "stop"}),
        "/v1/instances/{id}/forwards" => json!({"guest_port": 8080}),
        "/v1/instances/{id}/forwards/{fwd}" => json!({"label": "b"}),
        "/v1/instances/{id}/snapshots" => json!({"name": "b-snap"}),
        "/v1/volumes/{id}/grow" => json!({"size_gib": 2}),
        "/v1/network-groups/{id}/members" => json!({"instance": ids["instances"]}),
        "/v1/instances/{id}/buckets" => json!({"connection": ids["storage-connections"]}),
        _ => match BODY_IDS.iter().find(|(t, _)| *t == template) {
            Some((_, f)) => f(ids),
            None => json!({}),
        },
    };
    Some(body.to_string().into_bytes())
}

/// Calls that name objects in their body: A's there must answer like
/// missing ones too.
type BodyFn = fn(&HashMap<&'static str, String>) -> Value;
const BODY_IDS: &[(&str, BodyFn)] = &[
    (
        "/v1/instances/batch",
        |ids| json!({"instances": [ids["instances"]], "request": {"action": "stop"}}),
    ),
    (
        "/v1/volumes/grow",
        |ids| json!({"volumes": [ids["volumes"]], "size_gib": 2}),
    ),
    (
        "/v1/instances",
        |ids| json!({"name": "b-vm", "flavor": ids["flavor"], "snapshot": ids["snapshots"]}),
    ),
    (
        "/v1/volumes",
        |ids| json!({"name": "b-vol", "size_gib": 1, "instance": ids["instances"]}),
    ),
];

/// A call of `template` filled as `path`, retried while the per-source
/// limit on refused calls answers 429 (10 a second from one address: the
/// four refused callers make the sweep take about 20 s).
async fn call(
    s: &Server,
    method: &Method,
    template: &str,
    ids: &HashMap<&'static str, String>,
    token: Option<&str>,
) -> (u16, Value) {
    let path = fill(template, ids);
    let body = body_for(method, template, ids);
    for _ in 0..200 {
        let r = s.raw(method.clone(), &path, token, body.clone()).await;
        if r.status != 429 {
            return (r.status, r.body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    panic!("{method} {path}: still 429 after 50 s");
}

/// The callers other than account B, and the answer each must get on
/// `path` (`None`: anything but 401, for a host on its own paths).
fn expected(caller: &str, path: &str) -> Option<u16> {
    let public = path == "/healthz" || path == "/openapi.json";
    let agent = path.starts_with("/v1/agent/");
    match caller {
        _ if public => Some(200),
        "host" if agent => None,
        "host" => Some(403),
        _ => Some(401),
    }
}

async fn isolation_sweep(s: Server) {
    let (a_id, a_token) = s.account("acct-a").await;
    let (_b_id, b_token) = s.account("acct-b").await;
    let objects = objects_of_a(&s, &a_token, &a_id).await;
    // A's token, revoked; a join token, expired; a host credential.
    let (_, revoked) = s.account("acct-r").await;
    let tokens = s.get("/v1/admin/tokens", ADMIN).await.body;
    let rid = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "acct-r-tok")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.ok(
        Method::DELETE,
        &format!("/v1/admin/tokens/{rid}"),
        ADMIN,
        None,
        200,
    )
    .await;
    let expired = s.join_token().await;
    let db = s.db().await;
    sqlx::query("UPDATE join_tokens SET expires_ms = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    s.state.verifier.forget_all();
    let (aged, aged_id) = expired_account_token(&s).await;
    let aged_says = format!("token {aged_id} has expired; ask an admin for a new one");
    let host_cred = s.cred(&objects.ids["hosts"]);
    let callers: [(&str, Option<&str>); 6] = [
        ("host", Some(&host_cred)),
        ("expired", Some(&expired)),
        ("aged", Some(&aged)),
        ("revoked", Some(&revoked)),
        (
            "unknown",
            Some("gty_tok-00000000000000000000000000000001_00"),
        ),
        ("none", None),
    ];

    let doc = s.raw(Method::GET, "/openapi.json", None, None).await.body;
    let paths = doc["paths"].as_object().unwrap();
    let a_ids: Vec<&String> = objects
        .ids
        .iter()
        .filter(|(k, _)| !matches!(**k, "pci" | "view" | "alias" | "flavor"))
        .map(|(_, v)| v)
        .collect();
    let mut table: BTreeMap<String, BTreeMap<u16, usize>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut swept = 0;
    for (path, item) in paths {
        for (m, _) in item.as_object().unwrap() {
            swept += 1;
            let method: Method = m.to_uppercase().parse().unwrap();
            let what = format!("{m} {path}");
            // What B sends: the path, and for some calls a body naming A's
            // objects (B may see those echoed back, no other of A's ids).
            let sent = format!(
                "{} {}",
                fill(path, &objects.ids),
                String::from_utf8(body_for(&method, path, &objects.ids).unwrap_or_default())
                    .unwrap()
            );
            let body_ids = method == Method::POST && BODY_IDS.iter().any(|(t, _)| t == path);
            // Account B.
            let (status, body) = call(&s, &method, path, &objects.ids, Some(&b_token)).await;
            *table
                .entry("account B".into())
                .or_default()
                .entry(status)
                .or_default() += 1;
            let text = body.to_string();
            let leaked = a_ids
                .iter()
                .find(|id| text.contains(id.as_str()) && !sent.contains(id.as_str()));
            if let Some(id) = leaked {
                failures.push(format!("{what}: account B's answer names A's {id}: {text}"));
            }
            let restricted = path.starts_with("/v1/admin/") || path.starts_with("/v1/agent/");
            if restricted || path == "/metrics" {
                if status != 403 {
                    failures.push(format!("{what}: account B got {status}, not 403: {text}"));
                }
            } else if path.contains('{') || body_ids {
                let (st2, body2) = call(&s, &method, path, &objects.missing, Some(&b_token)).await;
                let same = body2.to_string();
                let mut mine = text.clone();
                for (k, v) in &objects.ids {
                    mine = mine.replace(v.as_str(), &objects.missing[k]);
                }
                // Answered the same way; for an object in the path that is a
                // refusal (404, or the same 4xx for the body when that is
                // checked first), never a success or a 403.
                let refused = body_ids || (status >= 400 && status != 403);
                if (status, &mine) != (st2, &same) || !refused {
                    failures.push(format!(
                        "{what}: A's object answers B {status} {text}, a missing one {st2} {same}"
                    ));
                }
            }
            // Everyone else.
            for (name, token) in &callers {
                let (status, body) = call(&s, &method, path, &objects.ids, *token).await;
                *table
                    .entry((*name).into())
                    .or_default()
                    .entry(status)
                    .or_default() += 1;
                let ok = match expected(name, path) {
                    Some(want) => status == want,
                    None => status != 401,
                };
                if !ok {
                    failures.push(format!("{what}: {name} got {status}: {body}"));
                } else if *name == "aged" && status == 401 && body["error"] != aged_says {
                    failures.push(format!("{what}: the expired account token was told {body}"));
                }
            }
        }
    }
    println!("isolation sweep: {swept} operations x 7 callers");
    for (caller, statuses) in &table {
        let row: Vec<String> = statuses.iter().map(|(s, n)| format!("{s} x{n}")).collect();
        println!("  {caller:<10} {}", row.join(", "));
    }
    assert!(swept > 60, "only {swept} operations in the document");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

on_both!(isolation_sweep);

/// An account token minted with the shortest lifetime, used once (so the
/// verification is cached), then outlived on the controller's clock.
/// Returns the token and its id.
async fn expired_account_token(s: &Server) -> (String, String) {
    let (acct, _) = s.account("acct-e").await;
    let t = s
        .ok(
            Method::POST,
            "/v1/admin/tokens",
            ADMIN,
            Some(json!({"name": "acct-e-short", "account": acct, "expires_in_secs": 60})),
            201,
        )
        .await;
    let token = t["token"].as_str().unwrap().to_string();
    assert_eq!(s.get("/v1/account", &token).await.status, 200);
    s.clock.advance(61_000);
    (token, t["id"].as_str().unwrap().to_string())
}

#[test]
fn every_path_parameter_has_an_object() {
    // The sweep panics on a parameter it has no object for; check the
    // whole document here so a new one fails fast and by name.
    let doc = serde_json::to_value(gantry_controller::openapi::document()).unwrap();
    for path in doc["paths"].as_object().unwrap().keys() {
        for name in gantry_controller::openapi::path_params(path) {
            key(path, name);
        }
    }
    let _ = Backend::Sqlite;
}
