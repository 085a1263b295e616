//! The OpenAPI document served at `/openapi.json`, built with utoipa from
//! one route table ([`ROUTES`]); a test checks that every listed route is
//! answered by the router, so the two cannot drift apart.

use axum::Json;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, Paths};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApi, OpenApiBuilder};

/// (method, path, tag, summary) of every API call.
pub const ROUTES: &[(&str, &str, &str, &str)] = &[
    ("get", "/healthz", "service", "Liveness; needs no token"),
    ("get", "/openapi.json", "service", "This document"),
    ("get", "/v1/account", "accounts", "The caller's own account"),
    (
        "post",
        "/v1/admin/accounts",
        "accounts",
        "Create an account (admin)",
    ),
    (
        "get",
        "/v1/admin/accounts",
        "accounts",
        "List accounts (admin)",
    ),
    (
        "get",
        "/v1/admin/accounts/{id}",
        "accounts",
        "Get an account",
    ),
    (
        "patch",
        "/v1/admin/accounts/{id}",
        "accounts",
        "Update billing profile / quota (admin)",
    ),
    (
        "post",
        "/v1/admin/accounts/{id}/credits",
        "accounts",
        "Add (or remove) credit (admin)",
    ),
    (
        "post",
        "/v1/admin/tokens",
        "tokens",
        "Mint an admin or account token (admin)",
    ),
    (
        "get",
        "/v1/admin/tokens",
        "tokens",
        "List tokens, never secrets (admin)",
    ),
    (
        "delete",
        "/v1/admin/tokens/{id}",
        "tokens",
        "Revoke a token (admin)",
    ),
    (
        "post",
        "/v1/admin/hosts",
        "hosts",
        "Register a host and its capacity (admin)",
    ),
    ("get", "/v1/admin/hosts", "hosts", "List hosts (admin)"),
    ("get", "/v1/admin/hosts/{id}", "hosts", "Get a host (admin)"),
    (
        "post",
        "/v1/admin/hosts/{id}/cordon",
        "hosts",
        "Stop placing on a host (admin)",
    ),
    (
        "post",
        "/v1/admin/hosts/{id}/uncordon",
        "hosts",
        "Place on a host again (admin)",
    ),
    (
        "post",
        "/v1/admin/hosts/{id}/drain",
        "hosts",
        "Cordon and drain a host (admin)",
    ),
    (
        "post",
        "/v1/admin/hosts/{id}/revoke",
        "hosts",
        "Revoke a host's credential; it joins again with a new join token (admin)",
    ),
    (
        "post",
        "/v1/admin/hosts/{id}/region",
        "hosts",
        "Move a host with no instances to another region (admin)",
    ),
    (
        "post",
        "/v1/admin/hosts/{id}/gpus/{pci}/clear",
        "hosts",
        "Put a quarantined or lost GPU through the health gate again (admin, audited)",
    ),
    (
        "get",
        "/v1/admin/gpu-aliases",
        "hosts",
        "List the GPU alias table (admin)",
    ),
    (
        "put",
        "/v1/admin/gpu-aliases/{alias}",
        "hosts",
        "Set the NVML models a flavor GPU model matches (admin)",
    ),
    (
        "delete",
        "/v1/admin/gpu-aliases/{alias}",
        "hosts",
        "Delete a GPU alias (admin)",
    ),
    (
        "get",
        "/metrics",
        "service",
        "Prometheus metrics (admin token)",
    ),
    ("get", "/v1/flavors", "flavors", "List flavors"),
    (
        "post",
        "/v1/admin/flavors",
        "flavors",
        "Create a flavor (admin)",
    ),
    ("get", "/v1/images", "images", "List usable images"),
    (
        "post",
        "/v1/admin/images",
        "images",
        "Create a base image (admin)",
    ),
    (
        "get",
        "/v1/admin/audit",
        "audit",
        "Audit log, newest first (admin)",
    ),
    (
        "get",
        "/v1/operations/{id}",
        "operations",
        "An operation's state and progress",
    ),
    (
        "post",
        "/v1/instances",
        "instances",
        "Create an instance (scheduled)",
    ),
    (
        "get",
        "/v1/instances",
        "instances",
        "List instances (?status=)",
    ),
    (
        "post",
        "/v1/instances/batch",
        "instances",
        "One action on many instances",
    ),
    ("get", "/v1/instances/{id}", "instances", "Get an instance"),
    (
        "post",
        "/v1/instances/{id}/actions",
        "instances",
        "Start, stop, reboot, change type, grow disk, release",
    ),
    (
        "get",
        "/v1/instances/{id}/{view}",
        "instances",
        "access, monitor, billing, config or hardware view",
    ),
    (
        "post",
        "/v1/instances/{id}/snapshots",
        "snapshots",
        "Snapshot a Running or Stopped instance",
    ),
    (
        "get",
        "/v1/snapshots",
        "snapshots",
        "List snapshots with their progress (?status=&instance=)",
    ),
    ("get", "/v1/snapshots/{id}", "snapshots", "Get a snapshot"),
    (
        "delete",
        "/v1/snapshots/{id}",
        "snapshots",
        "Delete a snapshot",
    ),
    (
        "get",
        "/v1/usage",
        "usage",
        "Usage ledger records (?instance=&limit=)",
    ),
    (
        "post",
        "/v1/admin/join-tokens",
        "agent",
        "Mint a one-time host join token (admin)",
    ),
    (
        "post",
        "/v1/agent/join",
        "agent",
        "A host joins (join token); answers its credential",
    ),
    (
        "post",
        "/v1/agent/heartbeat",
        "agent",
        "Host heartbeat: capacity, health, states, usage (host)",
    ),
    (
        "get",
        "/v1/agent/work",
        "agent",
        "Long-poll the host's work (?wait_secs=&access_rev=&tls=) (host)",
    ),
    (
        "post",
        "/v1/agent/ops/{id}",
        "agent",
        "Report an operation's progress or outcome (host)",
    ),
    (
        "get",
        "/v1/agent/store-keys/{account}",
        "agent",
        "An account's snapshot-store chunk keys, for a host serving it (host)",
    ),
    (
        "post",
        "/v1/agent/store-keys/{account}",
        "agent",
        "Offer the host's own chunk key of an account: adopted if it has none (host)",
    ),
    (
        "post",
        "/v1/instances/{id}/forwards",
        "access",
        "Add a port forward (guest port, tcp/udp, HTTPS, label)",
    ),
    (
        "get",
        "/v1/instances/{id}/forwards",
        "access",
        "List an instance's port forwards with their URLs",
    ),
    (
        "patch",
        "/v1/instances/{id}/forwards/{fwd}",
        "access",
        "Edit a port forward",
    ),
    (
        "delete",
        "/v1/instances/{id}/forwards/{fwd}",
        "access",
        "Delete a port forward",
    ),
    (
        "get",
        "/v1/instances/{id}/password",
        "access",
        "Reveal the root password (audited)",
    ),
    (
        "post",
        "/v1/instances/{id}/password",
        "access",
        "Reset the root password (202 + set-password operation)",
    ),
    ("post", "/v1/ssh-keys", "access", "Add an SSH public key"),
    (
        "get",
        "/v1/ssh-keys",
        "access",
        "List SSH keys (admins: ?account=)",
    ),
    ("delete", "/v1/ssh-keys/{id}", "access", "Delete an SSH key"),
    (
        "get",
        "/v1/ca.pem",
        "access",
        "The CA certificate that signs the hosts' HTTPS certificates (PEM)",
    ),
    (
        "put",
        "/v1/admin/hosts/{id}/certificate",
        "hosts",
        "Set the operator's certificate for a host's HTTPS proxy (admin)",
    ),
    (
        "delete",
        "/v1/admin/hosts/{id}/certificate",
        "hosts",
        "Go back to a CA-issued certificate for a host (admin)",
    ),
    (
        "post",
        "/v1/volumes",
        "volumes",
        "Create a data volume (optionally on a host or beside an instance)",
    ),
    ("get", "/v1/volumes", "volumes", "List data volumes"),
    ("get", "/v1/volumes/{id}", "volumes", "Get a data volume"),
    (
        "delete",
        "/v1/volumes/{id}",
        "volumes",
        "Delete an unattached volume (a delete-volume operation for its host)",
    ),
    (
        "post",
        "/v1/volumes/{id}/grow",
        "volumes",
        "Grow a data volume (a grow-volume operation for its host)",
    ),
    (
        "post",
        "/v1/volumes/grow",
        "volumes",
        "Grow several data volumes to one size, one result each",
    ),
];

fn method(m: &str) -> HttpMethod {
    match m {
        "post" => HttpMethod::Post,
        "patch" => HttpMethod::Patch,
        "delete" => HttpMethod::Delete,
        "put" => HttpMethod::Put,
        _ => HttpMethod::Get,
    }
}

/// Builds the document.
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    for (m, path, tag, summary) in ROUTES {
        let mut op = OperationBuilder::new()
            .tag(*tag)
            .summary(Some(*summary))
            .operation_id(Some(format!(
                "{m}{}",
                path.replace(['/', '{', '}', '.'], "_")
            )))
            .response("200", ResponseBuilder::new().description("Success (JSON)"))
            .response(
                "4XX",
                ResponseBuilder::new()
                    .description("Refused: {\"error\": sentence, \"field\": name}"),
            );
        if path.starts_with("/v1/") {
            op = op.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        }
        paths.add_path_operation(path, vec![method(m)], op.build());
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Gantry controller API")
                .version(env!("CARGO_PKG_VERSION"))
                .build(),
        )
        .paths(paths)
        .components(Some(
            ComponentsBuilder::new()
                .security_scheme(
                    "bearer",
                    SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
                )
                .build(),
        ))
        .build()
}

pub async fn serve() -> Json<OpenApi> {
    Json(document())
}
