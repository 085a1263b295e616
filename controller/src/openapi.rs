//! The OpenAPI document served at `/openapi.json`, built with utoipa from
//! one route table ([`ROUTES`]): each row names its request body, query
//! parameters, success statuses and answer schema; path parameters are
//! typed from their names, and every operation documents the
//! [`ErrorBody`] of its 4xx and 5xx answers. The body schemas derive from
//! the proto types (feature `openapi`), so a field added there shows here.
//! Tests check the table against the router both ways
//! (`tests/api.rs`, `tests/openapi.rs`) and a fuzzer checks the answers
//! against the schemas (`scripts/fuzz-api`).

use axum::Json;
use gantry_proto::api::agent::{
    CreateJoinToken, CreatedJoinToken, HeartbeatAck, JoinRequest, JoinResponse, OfferStoreKey,
    OpReport, StoreKeys, Work,
};
use gantry_proto::api::error::ErrorBody;
use gantry_proto::api::v1::*;
use gantry_proto::ids::*;
use gantry_proto::validate::PciAddress;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, Paths};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, ArrayBuilder, ObjectBuilder, Ref, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApi, OpenApiBuilder, RefOr, Required};
use utoipa::ToSchema;

/// The named schemas a document collects while it is built.
pub type Schemas = Vec<(String, RefOr<Schema>)>;

/// Makes a schema (and registers the named schemas it refers to).
pub type SchemaFn = fn(&mut Schemas) -> RefOr<Schema>;

/// A request body.
#[derive(Clone, Copy)]
pub enum Req {
    None,
    /// Required JSON.
    Json(SchemaFn),
    /// JSON that may be left out (an empty body reads as the defaults).
    Optional(SchemaFn),
}

/// A success answer's body.
#[derive(Clone, Copy)]
pub enum Answer {
    Json(SchemaFn),
    /// Text of this content type.
    Text(&'static str),
    /// No body (204).
    Empty,
}

/// A query parameter: name, schema, description.
pub type Query = (&'static str, SchemaFn, &'static str);

/// One API call.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub body: Req,
    pub query: &'static [Query],
    /// Success statuses (all with `answer`).
    pub ok: &'static [u16],
    pub answer: Answer,
}

/// A named schema, by reference.
pub fn of<T: ToSchema>(s: &mut Schemas) -> RefOr<Schema> {
    T::schemas(s);
    let name = T::name().to_string();
    if !s.iter().any(|(n, _)| *n == name) {
        s.push((name.clone(), T::schema()));
    }
    Ref::from_schema_name(name).into()
}

/// An array of a named schema.
pub fn list<T: ToSchema>(s: &mut Schemas) -> RefOr<Schema> {
    ArrayBuilder::new().items(of::<T>(s)).into()
}

fn string(_: &mut Schemas) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::new(Type::String))
        .into()
}

fn count(_: &mut Schemas) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::new(Type::Integer))
        .minimum(Some(0))
        .into()
}

fn any_object(_: &mut Schemas) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::new(Type::Object))
        .into()
}

/// `{"status": "ok"}`.
fn health(_: &mut Schemas) -> RefOr<Schema> {
    ObjectBuilder::new()
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(SchemaType::new(Type::String))
                .enum_values(Some(["ok"])),
        )
        .required("status")
        .into()
}

/// The answer to an instance action: `{"instance", "operation"}`.
fn action_started(s: &mut Schemas) -> RefOr<Schema> {
    ObjectBuilder::new()
        .property("instance", of::<InstanceId>(s))
        .property("operation", of::<OperationId>(s))
        .required("instance")
        .required("operation")
        .into()
}

/// The answer to instance creation: the summary plus its operation.
fn created_instance(s: &mut Schemas) -> RefOr<Schema> {
    AllOfBuilder::new()
        .item(of::<InstanceSummary>(s))
        .item(
            ObjectBuilder::new()
                .property("operation", of::<OperationId>(s))
                .required("operation"),
        )
        .into()
}

/// One of the instance views, by `{view}`.
fn instance_view(s: &mut Schemas) -> RefOr<Schema> {
    AnyOfBuilder::new()
        .item(of::<AccessView>(s))
        .item(of::<BillingView>(s))
        .item(of::<ConfigView>(s))
        .item(of::<HardwareView>(s))
        .into()
}

/// The names `{view}` takes.
/// (`monitor` has its own route: `/v1/instances/{id}/monitor`.)
pub const VIEWS: &[&str] = &["access", "billing", "config", "hardware"];

fn view_name(_: &mut Schemas) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::new(Type::String))
        .enum_values(Some(VIEWS.iter().copied()))
        .into()
}

/// The schema of a path parameter, from its name and the collection it
/// follows (`/instances/{id}` is an instance id).
pub fn path_param(path: &str, name: &str, s: &mut Schemas) -> RefOr<Schema> {
    let before = path
        .split('/')
        .take_while(|seg| *seg != format!("{{{name}}}"))
        .last()
        .unwrap_or("");
    match (name, before) {
        ("fwd", _) => of::<ForwardId>(s),
        ("account", _) | ("id", "accounts") => of::<AccountId>(s),
        ("pci", _) => of::<PciAddress>(s),
        ("view", _) => view_name(s),
        ("id", "tokens") => of::<TokenId>(s),
        ("id", "hosts") => of::<HostId>(s),
        ("id", "operations" | "ops") => of::<OperationId>(s),
        ("id", "instances") => of::<InstanceId>(s),
        ("id", "snapshots") => of::<SnapshotId>(s),
        ("id", "ssh-keys") => of::<SshKeyId>(s),
        ("id", "volumes") => of::<VolumeId>(s),
        ("id", "network-groups") => of::<NetworkGroupId>(s),
        ("id", "storage-connections") | ("connection", _) => of::<StorageConnectionId>(s),
        ("instance", _) => of::<InstanceId>(s),
        _ => string(s),
    }
}

const LIMIT: Query = ("limit", count, "Most rows to answer");
const ACCOUNT: Query = ("account", of::<AccountId>, "Admins: one account's rows");
const MONITOR_QUERY: &[Query] = &[
    (
        "since",
        string,
        "RFC 3339, or a duration ago (90s, 15m, 1h, 7d); default 1h",
    ),
    ("until", string, "RFC 3339, or a duration ago; default now"),
    (
        "step",
        string,
        "Seconds, or a duration; default: at most 360 points",
    ),
];

/// Shorthand for a row.
const fn r(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
    body: Req,
    ok: u16,
    answer: Answer,
) -> Route {
    Route {
        method,
        path,
        tag,
        summary,
        body,
        query: &[],
        ok: match ok {
            201 => &[201],
            202 => &[202],
            204 => &[204],
            _ => &[200],
        },
        answer,
    }
}

/// The same row with query parameters.
const fn q(route: Route, query: &'static [Query]) -> Route {
    Route { query, ..route }
}

/// The same row with other success statuses.
const fn oks(route: Route, ok: &'static [u16]) -> Route {
    Route { ok, ..route }
}

use Answer::{Empty, Json as J, Text};
use Req::{Json as B, None as N, Optional as O};

/// Every API call. A new route is one row: `r(method, path, tag, summary,
/// body, success status, answer)`: body `N` (none), `B(of::<T>)` (required
/// JSON) or `O(of::<T>)` (optional); answer `J(of::<T>)`, `J(list::<T>)`,
/// `Text(content type)` or `Empty`; wrap it in `q(.., &[query params])` or
/// `oks(.., &[statuses])` where needed. `{id}` parameters are typed by the
/// collection before them ([`path_param`]). `tests/openapi.rs` fails while
/// a registered route has no row.
#[rustfmt::skip]
pub const ROUTES: &[Route] = &[
    // ---- service
    r("get", "/healthz", "service", "Liveness; needs no token", N, 200, J(health)),
    r("get", "/openapi.json", "service", "This document", N, 200, J(any_object)),
    r("get", "/metrics", "service", "Prometheus metrics (admin token)", N, 200,
        Text("text/plain")),
    // ---- accounts and tokens
    r("get", "/v1/account", "accounts", "The caller's own account", N, 200,
        J(of::<AccountInfo>)),
    r("post", "/v1/admin/accounts", "accounts", "Create an account (admin)",
        B(of::<CreateAccount>), 201, J(of::<AccountInfo>)),
    r("get", "/v1/admin/accounts", "accounts", "List accounts (admin)", N, 200,
        J(list::<AccountInfo>)),
    r("get", "/v1/admin/accounts/{id}", "accounts", "Get an account (admin)", N, 200,
        J(of::<AccountInfo>)),
    r("patch", "/v1/admin/accounts/{id}", "accounts", "Update billing profile / quota (admin)",
        B(of::<UpdateAccount>), 200, J(of::<AccountInfo>)),
    r("post", "/v1/admin/accounts/{id}/credits", "accounts", "Add (or remove) credit (admin)",
        B(of::<AddCredit>), 200, J(of::<AccountInfo>)),
    r("post", "/v1/admin/accounts/{id}/disable", "accounts",
        "Disable an account: tokens refused, Running instances stopped, data kept (admin)", N,
        200, J(of::<AccountLifecycle>)),
    r("post", "/v1/admin/accounts/{id}/enable", "accounts", "Enable a disabled account (admin)",
        N, 200, J(of::<AccountLifecycle>)),
    oks(r("delete", "/v1/admin/accounts/{id}", "accounts",
        "Delete an account: its instances, snapshots and volumes are removed (admin; 202 while \
         deleting)", N, 200, J(of::<AccountLifecycle>)), &[200, 202]),
    r("post", "/v1/admin/tokens", "tokens", "Mint an admin or account token (admin)",
        B(of::<CreateToken>), 201, J(of::<CreatedToken>)),
    r("get", "/v1/admin/tokens", "tokens", "List tokens, never secrets (admin)", N, 200,
        J(list::<TokenInfo>)),
    r("delete", "/v1/admin/tokens/{id}", "tokens", "Revoke a token (admin)", N, 200,
        J(of::<TokenInfo>)),
    // ---- hosts
    r("post", "/v1/admin/hosts", "hosts", "Register a host and its capacity (admin)",
        B(of::<RegisterHost>), 201, J(of::<HostInfo>)),
    r("get", "/v1/admin/hosts", "hosts", "List hosts (admin)", N, 200, J(list::<HostInfo>)),
    r("get", "/v1/admin/hosts/{id}", "hosts", "Get a host (admin)", N, 200, J(of::<HostInfo>)),
    r("post", "/v1/admin/hosts/{id}/cordon", "hosts", "Stop placing on a host (admin)", N, 200,
        J(of::<HostInfo>)),
    r("post", "/v1/admin/hosts/{id}/uncordon", "hosts", "Place on a host again (admin)", N, 200,
        J(of::<HostInfo>)),
    r("post", "/v1/admin/hosts/{id}/drain", "hosts", "Cordon and drain a host (admin)", N, 200,
        J(of::<DrainReport>)),
    r("post", "/v1/admin/hosts/{id}/revoke", "hosts",
        "Revoke a host's credential; it joins again with a new join token (admin)", N, 200,
        J(of::<HostInfo>)),
    r("post", "/v1/admin/hosts/{id}/region", "hosts",
        "Move a host with no instances to another region (admin)", B(of::<SetHostRegion>), 200,
        J(of::<HostInfo>)),
    r("post", "/v1/admin/hosts/{id}/remove", "hosts",
        "Remove a down host, settling what it held (admin)", N, 200, J(of::<RemovedHost>)),
    r("post", "/v1/admin/hosts/{id}/gpus/{pci}/clear", "hosts",
        "Put a quarantined or lost GPU through the health gate again (admin, audited)",
        O(of::<ClearGpu>), 202, J(of::<OperationInfo>)),
    r("get", "/v1/admin/gpu-aliases", "hosts", "List the GPU alias table (admin)", N, 200,
        J(list::<GpuAlias>)),
    r("put", "/v1/admin/gpu-aliases/{alias}", "hosts",
        "Set the NVML models a flavor GPU model matches (admin)", B(of::<SetGpuAlias>), 200,
        J(of::<GpuAlias>)),
    r("delete", "/v1/admin/gpu-aliases/{alias}", "hosts", "Delete a GPU alias (admin)", N, 204,
        Empty),
    r("put", "/v1/admin/hosts/{id}/certificate", "hosts",
        "Set the operator's certificate for a host's HTTPS proxy (admin)",
        B(of::<SetHostCertificate>), 200, J(of::<HostInfo>)),
    r("delete", "/v1/admin/hosts/{id}/certificate", "hosts",
        "Go back to a CA-issued certificate for a host (admin)", N, 204, Empty),
    // ---- operations
    r("get", "/v1/operations/{id}", "operations", "An operation's state and progress", N, 200,
        J(of::<OperationInfo>)),
    r("post", "/v1/admin/operations/{id}/settle", "operations",
        "End an operation its host will never finish (admin, audited)",
        B(of::<SettleOperation>), 200, J(of::<OperationInfo>)),
    r("post", "/v1/admin/instances/{id}/move", "operations",
        "Move a Stopped instance to another host (admin)", O(of::<MoveInstance>), 202,
        J(of::<MoveStarted>)),
    // ---- flavors, images, audit
    r("get", "/v1/flavors", "flavors", "List flavors", N, 200, J(list::<FlavorInfo>)),
    r("post", "/v1/admin/flavors", "flavors", "Create a flavor (admin)", B(of::<CreateFlavor>),
        201, J(of::<FlavorInfo>)),
    r("get", "/v1/images", "images", "List usable images", N, 200, J(list::<ImageInfo>)),
    r("post", "/v1/admin/images", "images", "Create a base image (admin)",
        B(of::<CreateImage>), 201, J(of::<ImageInfo>)),
    q(r("get", "/v1/admin/audit", "audit", "Audit log, newest first (admin)", N, 200,
        J(list::<AuditEntry>)), &[ACCOUNT, LIMIT]),
    // ---- instances
    r("post", "/v1/instances", "instances", "Create an instance (scheduled)",
        B(of::<CreateInstance>), 202, J(created_instance)),
    q(r("get", "/v1/instances", "instances", "List instances", N, 200,
        J(list::<InstanceSummary>)), &[
        ("status", string, "Comma-separated states or statuses"),
        ACCOUNT,
        LIMIT,
        ("after", of::<InstanceId>, "Page after this instance"),
    ]),
    r("post", "/v1/instances/batch", "instances", "One action on many instances",
        B(of::<BatchAction>), 200, J(list::<BatchResult>)),
    r("get", "/v1/instances/{id}", "instances", "Get an instance", N, 200,
        J(of::<InstanceSummary>)),
    r("post", "/v1/instances/{id}/actions", "instances",
        "Start, stop, reboot, change type, grow disk, release", B(of::<InstanceAction>), 202,
        J(action_started)),
    r("get", "/v1/instances/{id}/{view}", "instances",
        "access, billing, config or hardware view", N, 200, J(instance_view)),
    q(r("get", "/v1/instances/{id}/monitor", "monitoring",
        "The Monitor view: state and series (CPU, memory, disk, network, GPUs), means per step",
        N, 200, J(of::<gantry_proto::metrics::MonitorView>)), MONITOR_QUERY),
    q(r("get", "/v1/admin/hosts/{id}/monitor", "monitoring",
        "A host's own Monitor view (admin)", N, 200,
        J(of::<gantry_proto::metrics::MonitorView>)), MONITOR_QUERY),
    r("post", "/v1/agent/metrics", "agent",
        "A host's metrics batch, one per interval (host; lossy, never audited)",
        B(of::<gantry_proto::metrics::MetricsBatch>), 204, Empty),
    // ---- snapshots
    r("post", "/v1/instances/{id}/snapshots", "snapshots",
        "Snapshot a Running or Stopped instance", B(of::<CreateSnapshot>), 202,
        J(of::<SnapshotInfo>)),
    q(r("get", "/v1/snapshots", "snapshots", "List snapshots with their progress", N, 200,
        J(list::<SnapshotInfo>)), &[
        ("status", string, "Creating, Success or Failed"),
        ("instance", of::<InstanceId>, "One instance's snapshots"),
        ("region", string, "One region's snapshots"),
    ]),
    r("get", "/v1/snapshots/{id}", "snapshots", "Get a snapshot", N, 200,
        J(of::<SnapshotInfo>)),
    oks(r("delete", "/v1/snapshots/{id}", "snapshots", "Delete a snapshot", N, 200,
        J(of::<SnapshotInfo>)), &[200, 202]),
    // ---- usage
    q(r("get", "/v1/usage", "usage", "Usage ledger records", N, 200, J(list::<UsageRecord>)),
        &[("instance", of::<InstanceId>, "One instance's records"), LIMIT, ACCOUNT]),
    // ---- agent protocol
    r("post", "/v1/admin/join-tokens", "agent", "Mint a one-time host join token (admin)",
        B(of::<CreateJoinToken>), 201, J(of::<CreatedJoinToken>)),
    r("post", "/v1/agent/join", "agent", "A host joins (join token); answers its credential",
        B(of::<JoinRequest>), 201, J(of::<JoinResponse>)),
    r("post", "/v1/agent/heartbeat", "agent",
        "Host heartbeat: capacity, health, states, usage (host)",
        B(of::<gantry_proto::api::agent::AgentHeartbeat>), 200, J(of::<HeartbeatAck>)),
    q(r("get", "/v1/agent/work", "agent", "Long-poll the host's work (host)", N, 200,
        J(of::<Work>)), &[
        ("wait_secs", count, "Longest wait, seconds (at most 60)"),
        ("access_rev", count, "The access revision the host has"),
        ("tls", string, "The certificate fingerprint the host has"),
        ("groups_rev", count, "The network-group revision the host has"),
        ("buckets_rev", count, "The bucket-attachment revision the host has"),
    ]),
    r("post", "/v1/agent/ops/{id}", "agent", "Report an operation's progress or outcome (host)",
        B(of::<OpReport>), 204, Empty),
    r("get", "/v1/agent/store-keys/{account}", "agent",
        "An account's snapshot-store chunk keys, for a host serving it (host)", N, 200,
        J(of::<StoreKeys>)),
    r("post", "/v1/agent/store-keys/{account}", "agent",
        "Offer the host's own chunk key of an account: adopted if it has none (host)",
        B(of::<OfferStoreKey>), 200, J(of::<StoreKeys>)),
    // ---- access
    r("post", "/v1/instances/{id}/forwards", "access",
        "Add a port forward (guest port, tcp/udp, HTTPS, label)", B(of::<CreateForward>), 201,
        J(of::<PortForwardInfo>)),
    r("get", "/v1/instances/{id}/forwards", "access",
        "List an instance's port forwards with their URLs", N, 200,
        J(list::<PortForwardInfo>)),
    r("patch", "/v1/instances/{id}/forwards/{fwd}", "access", "Edit a port forward",
        B(of::<UpdateForward>), 200, J(of::<PortForwardInfo>)),
    r("delete", "/v1/instances/{id}/forwards/{fwd}", "access", "Delete a port forward", N, 204,
        Empty),
    r("get", "/v1/instances/{id}/password", "access", "Reveal the root password (audited)", N,
        200, J(of::<PasswordView>)),
    r("post", "/v1/instances/{id}/password", "access",
        "Reset the root password (a set-password operation)", N, 202, J(of::<OperationInfo>)),
    r("post", "/v1/ssh-keys", "access", "Add an SSH public key", B(of::<CreateSshKey>), 201,
        J(of::<SshKeyInfo>)),
    q(r("get", "/v1/ssh-keys", "access", "List SSH keys", N, 200, J(list::<SshKeyInfo>)),
        &[ACCOUNT]),
    r("delete", "/v1/ssh-keys/{id}", "access", "Delete an SSH key", N, 204, Empty),
    r("get", "/v1/ca.pem", "access",
        "The CA certificate that signs the hosts' HTTPS certificates (PEM)", N, 200,
        Text("application/x-pem-file")),
    // ---- volumes
    r("post", "/v1/volumes", "volumes",
        "Create a data volume (optionally on a host or beside an instance)",
        B(of::<CreateVolume>), 201, J(of::<VolumeInfo>)),
    r("get", "/v1/volumes", "volumes", "List data volumes", N, 200, J(list::<VolumeInfo>)),
    r("get", "/v1/volumes/{id}", "volumes", "Get a data volume", N, 200, J(of::<VolumeInfo>)),
    oks(r("delete", "/v1/volumes/{id}", "volumes",
        "Delete an unattached volume (202: a delete-volume operation for its host)", N, 200,
        J(of::<VolumeInfo>)), &[200, 202]),
    oks(r("post", "/v1/volumes/{id}/grow", "volumes",
        "Grow a data volume (202: a grow-volume operation for its host)", B(of::<GrowVolume>),
        200, J(of::<VolumeInfo>)), &[200, 202]),
    r("post", "/v1/volumes/grow", "volumes",
        "Grow several data volumes to one size, one result each", B(of::<BatchGrowVolumes>),
        200, J(list::<VolumeBatchResult>)),
    // ---- network groups
    r("post", "/v1/network-groups", "network-groups",
        "Create a network group (private CIDR chosen or allocated; pack or spread)",
        B(of::<CreateNetworkGroup>), 201, J(of::<NetworkGroupInfo>)),
    q(r("get", "/v1/network-groups", "network-groups",
        "List network groups (members counted)", N, 200, J(list::<NetworkGroupInfo>)),
        &[ACCOUNT]),
    r("get", "/v1/network-groups/{id}", "network-groups",
        "Get a network group with its members", N, 200, J(of::<NetworkGroupInfo>)),
    r("delete", "/v1/network-groups/{id}", "network-groups",
        "Delete an empty network group", N, 204, Empty),
    r("post", "/v1/network-groups/{id}/members", "network-groups",
        "Put an instance into the group (an address from its CIDR)",
        B(of::<JoinNetworkGroup>), 201, J(of::<NetworkGroupMember>)),
    r("delete", "/v1/network-groups/{id}/members/{instance}", "network-groups",
        "Take an instance out of the group", N, 204, Empty),
    r("get", "/v1/instances/{id}/network-group", "network-groups",
        "The instance's Network Group tab: group, CIDR, own address, members", N, 200,
        J(of::<InstanceNetworkGroup>)),
    // ---- buckets (docs/buckets.md)
    r("post", "/v1/storage-connections", "buckets",
        "Add an S3 storage connection (checked; optionally creating the bucket)",
        B(of::<gantry_proto::buckets::CreateStorageConnection>), 201,
        J(of::<gantry_proto::buckets::StorageConnectionInfo>)),
    q(r("get", "/v1/storage-connections", "buckets", "List storage connections", N, 200,
        J(list::<gantry_proto::buckets::StorageConnectionInfo>)), &[ACCOUNT]),
    r("get", "/v1/storage-connections/{id}", "buckets", "Get a storage connection", N, 200,
        J(of::<gantry_proto::buckets::StorageConnectionInfo>)),
    r("delete", "/v1/storage-connections/{id}", "buckets",
        "Delete a storage connection attached nowhere (the bucket is kept)", N, 204, Empty),
    r("post", "/v1/instances/{id}/buckets", "buckets",
        "Attach a bucket to an instance as a directory (checked first)",
        B(of::<gantry_proto::buckets::AttachBucket>), 201,
        J(of::<gantry_proto::buckets::BucketAttachmentInfo>)),
    r("get", "/v1/instances/{id}/buckets", "buckets",
        "The buckets attached to an instance, with their health", N, 200,
        J(list::<gantry_proto::buckets::BucketAttachmentInfo>)),
    r("delete", "/v1/instances/{id}/buckets/{connection}", "buckets",
        "Detach a bucket (its objects stay in the bucket)", N, 204, Empty),
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

/// The names of a path's `{parameters}`.
pub fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

fn json(schema: RefOr<Schema>) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(schema)).build()
}

/// One route's operation.
fn operation(route: &Route, s: &mut Schemas) -> utoipa::openapi::path::Operation {
    let mut op = OperationBuilder::new()
        .tag(route.tag)
        .summary(Some(route.summary))
        .operation_id(Some(format!(
            "{}{}",
            route.method,
            route.path.replace(['/', '{', '}', '.', '-'], "_")
        )));
    for name in path_params(route.path) {
        op = op.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(path_param(route.path, name, s))),
        );
    }
    for (name, schema, what) in route.query {
        op = op.parameter(
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(*what))
                .schema(Some(schema(s))),
        );
    }
    let body = match route.body {
        Req::None => None,
        Req::Json(f) => Some((f, Required::True)),
        Req::Optional(f) => Some((f, Required::False)),
    };
    if let Some((f, required)) = body {
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .content("application/json", json(f(s)))
                .required(Some(required))
                .build(),
        ));
    }
    for status in route.ok {
        let ok = ResponseBuilder::new().description("Success");
        let ok = match route.answer {
            Answer::Json(f) => ok.content("application/json", json(f(s))),
            Answer::Text(ct) => ok.content(ct, json(string(s))),
            Answer::Empty => ok.description("Done; no body"),
        };
        op = op.response(status.to_string(), ok);
    }
    let error = of::<ErrorBody>(s);
    for (class, what) in [
        ("4XX", "Refused: {\"error\": sentence, \"field\": name}"),
        ("5XX", "Failed: {\"error\": sentence}"),
    ] {
        op = op.response(
            class,
            ResponseBuilder::new()
                .description(what)
                .content("application/json", json(error.clone())),
        );
    }
    if route.path.starts_with("/v1/") || route.path == "/metrics" {
        op = op.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
    }
    op.build()
}

/// Builds the document.
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    let mut schemas = Schemas::new();
    for route in ROUTES {
        let op = operation(route, &mut schemas);
        paths.add_path_operation(route.path, vec![method(route.method)], op);
    }
    schemas.sort_by(|a, b| a.0.cmp(&b.0));
    schemas.dedup_by(|a, b| a.0 == b.0);
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
                .schemas_from_iter(schemas)
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
