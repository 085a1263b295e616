//! The OpenAPI document against the code: every route the router
//! registers (read from the `.route(...)` calls in `src/api/`) is
//! documented, every documented route is registered, every `$ref`
//! resolves, and every operation has its parameters, bodies and error
//! schema. (`tests/api.rs` checks that the router answers each row.)

use gantry_controller::openapi::{document, ROUTES};
use serde_json::Value;
use std::collections::BTreeSet;

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

/// The served document, as JSON.
fn doc() -> Value {
    serde_json::to_value(document()).unwrap()
}

/// The text of the call that starts at `open` (just after its `(`), up to
/// its matching `)`.
fn call_args(src: &str, open: usize) -> &str {
    let mut depth = 1;
    for (i, c) in src[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &src[open..open + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced .route( call")
}

/// (method, path) of every `.route("path", method(handler)...)` in `src`,
/// with `prefix` put before the path.
fn routes_in(src: &str, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (at, _) in src.match_indices(".route(") {
        let args = call_args(src, at + ".route(".len());
        let path = args
            .split('"')
            .nth(1)
            .unwrap_or_else(|| panic!("a route without a literal path: {args}"));
        let rest = &args[args.find(path).unwrap() + path.len() + 1..];
        let mut found = 0;
        for m in METHODS {
            for (i, _) in rest.match_indices(&format!("{m}(")) {
                let before = rest[..i].chars().next_back().unwrap_or(' ');
                if !(before.is_alphanumeric() || before == '_') {
                    out.push((m.to_string(), format!("{prefix}{path}")));
                    found += 1;
                }
            }
        }
        assert!(found > 0, "no method found for route {path}: {rest}");
    }
    out
}

/// Every (method, path) the router registers, from the source.
fn router_routes() -> BTreeSet<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api");
    let mut all = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let src = std::fs::read_to_string(&path).unwrap();
        // `mod.rs` holds the top-level routes; the others are nested at /v1.
        let prefix = if path.ends_with("mod.rs") { "" } else { "/v1" };
        all.extend(routes_in(&src, prefix));
    }
    all
}

#[test]
fn every_registered_route_is_documented_and_every_documented_one_registered() {
    let registered = router_routes();
    assert!(registered.len() > 50, "found only {registered:?}");
    let documented: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented.len(), ROUTES.len(), "a route is listed twice");
    let undocumented: Vec<_> = registered.difference(&documented).collect();
    let unregistered: Vec<_> = documented.difference(&registered).collect();
    assert!(
        undocumented.is_empty(),
        "routes the router registers but the document lacks (add rows to \
         controller/src/openapi.rs ROUTES): {undocumented:?}"
    );
    assert!(
        unregistered.is_empty(),
        "documented routes no router registers: {unregistered:?}"
    );
    let paths = doc()["paths"].as_object().unwrap().clone();
    let ops: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(ops, registered.len(), "operations in the served document");
}

/// Every `"$ref"` under `v`.
fn refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.insert(r.clone());
            }
            m.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_reference_resolves_to_a_named_schema() {
    let d = doc();
    let schemas = d["components"]["schemas"].as_object().unwrap();
    let mut all = BTreeSet::new();
    refs(&d, &mut all);
    assert!(all.len() > 40, "{all:?}");
    for r in &all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected reference {r}"));
        assert!(schemas.contains_key(name), "{r} is not defined");
    }
    // Ids are strings with their prefix.
    assert_eq!(
        schemas["InstanceId"]["pattern"], "^ins-[0-9a-f]{32}$",
        "{}",
        schemas["InstanceId"]
    );
}

#[test]
fn every_operation_has_its_parameters_bodies_and_error_schema() {
    let d = doc();
    let error = serde_json::json!({"$ref": "#/components/schemas/ErrorBody"});
    for route in ROUTES {
        let op = &d["paths"][route.path][route.method];
        let what = format!("{} {}", route.method, route.path);
        let params: Vec<&str> = op["parameters"]
            .as_array()
            .map(|a| a.iter().filter(|p| p["in"] == "path"))
            .into_iter()
            .flatten()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        let wanted: Vec<&str> = gantry_controller::openapi::path_params(route.path).collect();
        assert_eq!(params, wanted, "{what}: path parameters");
        let responses = op["responses"].as_object().unwrap();
        for class in ["4XX", "5XX"] {
            assert_eq!(
                responses[class]["content"]["application/json"]["schema"], error,
                "{what}"
            );
        }
        let ok: Vec<&String> = responses.keys().filter(|k| k.starts_with('2')).collect();
        assert!(!ok.is_empty(), "{what}: no success answer");
        for k in ok {
            let r = &responses[k];
            if k != "204" {
                assert!(r["content"].is_object(), "{what} {k}: no body schema");
            }
        }
        let has_body = !matches!(route.body, gantry_controller::openapi::Req::None);
        assert_eq!(op["requestBody"].is_object(), has_body, "{what}");
        if has_body {
            assert!(
                op["requestBody"]["content"]["application/json"]["schema"]["$ref"].is_string(),
                "{what}: request body schema"
            );
        }
    }
    // A request body names its fields and their types.
    let create = &d["components"]["schemas"]["CreateInstance"];
    assert_eq!(
        create["properties"]["flavor"]["$ref"],
        "#/components/schemas/FlavorId"
    );
    let required: Vec<&str> = create["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["name", "flavor"], "{create}");
}

#[test]
fn the_route_reader_sees_methods_chained_and_nested() {
    let src = r#"Router::new()
        .route("/a/{id}", get(one).patch(update))
        .route(
            "/b",
            axum::routing::delete(gone),
        )"#;
    assert_eq!(
        routes_in(src, "/v1"),
        [
            ("get".to_string(), "/v1/a/{id}".to_string()),
            ("patch".to_string(), "/v1/a/{id}".to_string()),
            ("delete".to_string(), "/v1/b".to_string()),
        ]
    );
}
