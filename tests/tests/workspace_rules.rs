//! Architecture rules of the workspace, checked from `cargo metadata`:
//! `gantry-proto` is a leaf (serde, id and time types only; OpenAPI schema
//! derives behind its `openapi` feature), and the agent
//! and the controller never depend on each other; the crash-point crate
//! they share depends on libc only.

use std::collections::BTreeMap;
use std::process::Command;

fn deps_by_package() -> BTreeMap<String, Vec<(String, String)>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let mut map = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let deps = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .map(|d| {
                // An optional dependency (behind a feature) is its own kind.
                let kind = match d["optional"].as_bool() {
                    Some(true) => "optional".to_string(),
                    _ => d["kind"].as_str().unwrap_or("normal").to_string(),
                };
                (d["name"].as_str().expect("name").to_string(), kind)
            })
            .collect();
        map.insert(p["name"].as_str().expect("name").to_string(), deps);
    }
    map
}

#[test]
fn proto_is_a_leaf_and_agent_and_controller_stay_apart() {
    let deps = deps_by_package();
    let normal = |pkg: &str| -> Vec<String> {
        deps[pkg]
            .iter()
            .filter(|(_, kind)| kind == "normal")
            .map(|(n, _)| n.clone())
            .collect()
    };
    let allowed = ["serde", "uuid", "chrono"];
    for d in normal("gantry-proto") {
        assert!(
            allowed.contains(&d.as_str()),
            "gantry-proto must stay a leaf, but depends on {d}"
        );
    }
    // Only the OpenAPI schema derives may come in, behind a feature.
    for (d, kind) in &deps["gantry-proto"] {
        if kind == "optional" {
            assert_eq!(
                d, "utoipa",
                "gantry-proto's only optional dependency is utoipa"
            );
        }
    }
    for (a, b) in [
        ("gantry-agent", "gantry-controller"),
        ("gantry-controller", "gantry-agent"),
    ] {
        assert!(
            !deps[a].iter().any(|(n, _)| n == b),
            "{a} must not depend on {b}: shared types belong in gantry-proto"
        );
    }
    assert!(normal("gantry-agent").contains(&"gantry-proto".to_string()));
    assert!(normal("gantry-controller").contains(&"gantry-proto".to_string()));
}

/// The crash-point crate both daemons link stays tiny (std and libc only),
/// so sharing it couples neither daemon to the other.
#[test]
fn the_crash_point_crate_depends_on_libc_only() {
    let deps = deps_by_package();
    let normal: Vec<&str> = deps["gantry-crashpoint"]
        .iter()
        .filter(|(_, kind)| kind == "normal")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        normal,
        ["libc"],
        "gantry-crashpoint must depend on libc only"
    );
}
