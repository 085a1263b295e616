//! `gantryctl`: the command-line client of the controller API, for admins
//! and tenants. Reads `GANTRY_URL` and `GANTRY_TOKEN`; prints tables, or
//! the API's JSON with `--json`.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use text::{qs, render, strip_nulls};

mod text;

#[derive(Parser)]
#[command(version, about = "Command-line client for the Gantry controller")]
struct Cli {
    /// Controller URL.
    #[arg(long, env = "GANTRY_URL", default_value = "http://127.0.0.1:8787")]
    url: String,
    /// API token (admin or account).
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Instances: list, get, create, actions, batch.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Data volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Flavors (create: admin).
    #[command(subcommand)]
    Flavor(FlavorCmd),
    /// Images (create: admin).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Hosts (admin).
    #[command(subcommand)]
    Host(HostCmd),
    /// Accounts and credit (admin; `show` without id: your own).
    #[command(subcommand)]
    Account(AccountCmd),
    /// API tokens (admin).
    #[command(subcommand)]
    Token(TokenCmd),
    /// The audit log (admin).
    Audit {
        #[arg(long)]
        account: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// An operation's state and progress.
    Operation { id: String },
    /// Host join tokens (admin).
    #[command(subcommand)]
    JoinToken(JoinTokenCmd),
    /// Usage ledger records, newest first.
    Usage {
        #[arg(long)]
        instance: Option<String>,
        /// Another account's records (admin).
        #[arg(long)]
        account: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum JoinTokenCmd {
    /// Mint a one-time token a host joins with; it is shown once.
    Create {
        /// How long it can be used [default: 3600, at most 7 days].
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
}

#[derive(Subcommand)]
enum InstanceCmd {
    List {
        /// Running, Stopped, Snapshotting, Released, ...
        #[arg(long)]
        status: Option<String>,
    },
    /// Summary, or one view: access, monitor, billing, config, hardware.
    Get {
        id: String,
        #[arg(long)]
        view: Option<String>,
    },
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        flavor: String,
        #[arg(long, conflicts_with = "snapshot")]
        image: Option<String>,
        #[arg(long)]
        snapshot: Option<String>,
        #[arg(long)]
        data_volume: Option<String>,
        /// Extra guest port to forward (repeatable).
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// pack (default) or spread.
        #[arg(long)]
        placement: Option<String>,
        /// For admins: the owning account.
        #[arg(long)]
        account: Option<String>,
    },
    /// start, stop, reboot, force-reboot, change-type, grow-disk, release.
    Action {
        id: String,
        action: String,
        #[arg(long)]
        flavor: Option<String>,
        #[arg(long)]
        root_disk_gib: Option<u64>,
    },
    /// The same action on many instances.
    Batch {
        action: String,
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        flavor: Option<String>,
        #[arg(long)]
        root_disk_gib: Option<u64>,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    List {
        #[arg(long)]
        status: Option<String>,
    },
    Create {
        instance: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        auto_release: bool,
        #[arg(long)]
        as_image: bool,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    List,
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        size_gib: u64,
        #[arg(long)]
        account: Option<String>,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum FlavorCmd {
    List,
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        vcpus: u32,
        #[arg(long)]
        memory_mib: u64,
        #[arg(long)]
        root_disk_gib: u64,
        #[arg(long)]
        gpu_model: Option<String>,
        #[arg(long, default_value_t = 0)]
        gpu_count: u32,
        #[arg(long)]
        price_micros_per_hour: i64,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    List,
    /// A base image; hosts read it from `--disk` (with optional direct-boot
    /// `--kernel`, `--initrd`, `--cmdline`).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        size_gib: u64,
        #[arg(long)]
        disk: Option<String>,
        #[arg(long, requires = "disk")]
        kernel: Option<String>,
        #[arg(long, requires = "disk")]
        initrd: Option<String>,
        #[arg(long, requires = "disk")]
        cmdline: Option<String>,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    List,
    Get {
        id: String,
    },
    /// Register a host; GPUs as MODEL@PCI, e.g. H100@0000:65:00.0.
    Register {
        #[arg(long)]
        name: String,
        #[arg(long)]
        address: String,
        #[arg(long)]
        vcpus: u32,
        #[arg(long)]
        memory_mib: u64,
        #[arg(long)]
        disk_gib: u64,
        #[arg(long = "gpu")]
        gpus: Vec<String>,
    },
    Cordon {
        id: String,
    },
    Uncordon {
        id: String,
    },
    Drain {
        id: String,
    },
}

#[derive(Subcommand)]
enum AccountCmd {
    List,
    Show {
        id: Option<String>,
    },
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        billing_profile_complete: bool,
        #[arg(long)]
        snapshot_quota_gib: Option<u64>,
    },
    /// Add credit (negative to debit), in micro-units.
    Credit {
        id: String,
        amount_micros: i64,
        #[arg(long, default_value = "")]
        note: String,
    },
    Update {
        id: String,
        #[arg(long)]
        billing_profile_complete: Option<bool>,
        #[arg(long)]
        snapshot_quota_gib: Option<u64>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    List,
    /// Mint a token (for an account, else admin); the secret is shown once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        account: Option<String>,
    },
    Revoke {
        id: String,
    },
}

/// One API call and how to show its answer.
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
    columns: &'static [&'static str],
}

fn call(
    method: Method,
    path: impl Into<String>,
    body: Option<Value>,
    columns: &'static [&'static str],
) -> Call {
    Call {
        method,
        path: path.into(),
        body,
        columns,
    }
}

fn action_body(action: &str, flavor: Option<String>, gib: Option<u64>) -> Value {
    let mut b = json!({ "action": action });
    if let Some(f) = flavor {
        b["flavor"] = f.into();
    }
    if let Some(g) = gib {
        b["root_disk_gib"] = g.into();
    }
    b
}

const INSTANCE_COLS: &[&str] = &[
    "id",
    "name",
    "status",
    "host",
    "cost_micros",
    "allowed_actions",
];

fn plan(cmd: Cmd) -> anyhow::Result<Call> {
    use Method as M;
    Ok(match cmd {
        Cmd::Instance(c) => plan_instance(c),
        Cmd::Snapshot(c) => plan_snapshot(c),
        Cmd::Volume(c) => plan_volume(c),
        Cmd::Flavor(c) => plan_flavor(c),
        Cmd::Image(c) => plan_image(c),
        Cmd::Host(c) => plan_host(c)?,
        Cmd::Account(c) => plan_account(c),
        Cmd::Token(c) => plan_token(c),
        Cmd::Audit { account, limit } => call(
            M::GET,
            format!(
                "/v1/admin/audit{}",
                qs(&[("account", account), ("limit", Some(limit.to_string()))])
            ),
            None,
            &["at", "actor", "method", "path", "status"],
        ),
        Cmd::Operation { id } => call(M::GET, format!("/v1/operations/{id}"), None, &[]),
        Cmd::JoinToken(JoinTokenCmd::Create { ttl_secs }) => call(
            M::POST,
            "/v1/admin/join-tokens",
            Some(json!({"ttl_secs": ttl_secs})),
            &[],
        ),
        Cmd::Usage {
            instance,
            account,
            limit,
        } => {
            let q = [
                ("instance", instance),
                ("account", account),
                ("limit", Some(limit.to_string())),
            ];
            let cols = &[
                "at",
                "kind",
                "instance",
                "quantity",
                "price_micros",
                "amount_micros",
            ];
            call(M::GET, format!("/v1/usage{}", qs(&q)), None, cols)
        }
    })
}

fn plan_instance(c: InstanceCmd) -> Call {
    use Method as M;
    match c {
        InstanceCmd::List { status } => call(
            M::GET,
            format!("/v1/instances{}", qs(&[("status", status)])),
            None,
            INSTANCE_COLS,
        ),
        InstanceCmd::Get { id, view } => match view {
            Some(v) => call(M::GET, format!("/v1/instances/{id}/{v}"), None, &[]),
            None => call(M::GET, format!("/v1/instances/{id}"), None, &[]),
        },
        InstanceCmd::Create {
            name,
            flavor,
            image,
            snapshot,
            data_volume,
            ports,
            placement,
            account,
        } => call(
            M::POST,
            "/v1/instances",
            Some(
                json!({"name": name, "flavor": flavor, "image": image, "snapshot": snapshot,
                "data_volume": data_volume, "ports": ports, "placement": placement, "account": account}),
            ),
            &[],
        ),
        InstanceCmd::Action {
            id,
            action,
            flavor,
            root_disk_gib,
        } => call(
            M::POST,
            format!("/v1/instances/{id}/actions"),
            Some(action_body(&action, flavor, root_disk_gib)),
            &[],
        ),
        InstanceCmd::Batch {
            action,
            ids,
            flavor,
            root_disk_gib,
        } => call(
            M::POST,
            "/v1/instances/batch",
            Some(json!({"instances": ids, "request": action_body(&action, flavor, root_disk_gib)})),
            &["instance", "status", "operation", "error"],
        ),
    }
}

fn plan_snapshot(c: SnapshotCmd) -> Call {
    use Method as M;
    match c {
        SnapshotCmd::List { status } => call(
            M::GET,
            format!("/v1/snapshots{}", qs(&[("status", status)])),
            None,
            &[
                "id",
                "name",
                "instance",
                "status",
                "compressed_bytes",
                "created_at",
            ],
        ),
        SnapshotCmd::Create {
            instance,
            name,
            description,
            auto_release,
            as_image,
        } => call(
            M::POST,
            format!("/v1/instances/{instance}/snapshots"),
            Some(
                json!({"name": name, "description": description, "auto_release": auto_release, "as_image": as_image}),
            ),
            &[],
        ),
        SnapshotCmd::Delete { id } => call(M::DELETE, format!("/v1/snapshots/{id}"), None, &[]),
    }
}

fn plan_volume(c: VolumeCmd) -> Call {
    use Method as M;
    match c {
        VolumeCmd::List => call(
            M::GET,
            "/v1/volumes",
            None,
            &["id", "name", "size_gib", "instance"],
        ),
        VolumeCmd::Create {
            name,
            size_gib,
            account,
        } => call(
            M::POST,
            "/v1/volumes",
            Some(json!({"name": name, "size_gib": size_gib, "account": account})),
            &[],
        ),
        VolumeCmd::Delete { id } => call(M::DELETE, format!("/v1/volumes/{id}"), None, &[]),
    }
}

fn plan_flavor(c: FlavorCmd) -> Call {
    use Method as M;
    match c {
        FlavorCmd::List => call(
            M::GET,
            "/v1/flavors",
            None,
            &[
                "id",
                "name",
                "vcpus",
                "memory_mib",
                "root_disk_gib",
                "gpu_model",
                "gpu_count",
                "price_micros_per_hour",
            ],
        ),
        FlavorCmd::Create {
            name,
            vcpus,
            memory_mib,
            root_disk_gib,
            gpu_model,
            gpu_count,
            price_micros_per_hour,
        } => call(
            M::POST,
            "/v1/admin/flavors",
            Some(
                json!({"name": name, "vcpus": vcpus, "memory_mib": memory_mib, "root_disk_gib": root_disk_gib,
                "gpu_model": gpu_model, "gpu_count": gpu_count, "price_micros_per_hour": price_micros_per_hour}),
            ),
            &[],
        ),
    }
}

fn plan_image(c: ImageCmd) -> Call {
    use Method as M;
    match c {
        ImageCmd::List => call(
            M::GET,
            "/v1/images",
            None,
            &["id", "name", "size_gib", "source_snapshot"],
        ),
        ImageCmd::Create {
            name,
            size_gib,
            disk,
            kernel,
            initrd,
            cmdline,
        } => {
            let origin = disk.map(|d| {
                json!({"from": "file", "disk": d, "kernel": kernel, "initrd": initrd,
                    "cmdline": cmdline})
            });
            let body = json!({"name": name, "size_gib": size_gib, "origin": origin});
            call(M::POST, "/v1/admin/images", Some(body), &[])
        }
    }
}

fn plan_host(c: HostCmd) -> anyhow::Result<Call> {
    use Method as M;
    Ok(match c {
        HostCmd::List => call(
            M::GET,
            "/v1/admin/hosts",
            None,
            &[
                "id",
                "name",
                "health",
                "cordoned",
                "used_vcpus",
                "vcpus",
                "instances",
                "last_heartbeat",
            ],
        ),
        HostCmd::Get { id } => call(M::GET, format!("/v1/admin/hosts/{id}"), None, &[]),
        HostCmd::Register {
            name,
            address,
            vcpus,
            memory_mib,
            disk_gib,
            gpus,
        } => {
            let mut list = Vec::new();
            for g in gpus {
                let Some((model, pci)) = g.split_once('@') else {
                    bail!("--gpu {g:?} should read MODEL@PCI, e.g. H100@0000:65:00.0");
                };
                list.push(json!({"model": model, "pci": pci}));
            }
            call(
                M::POST,
                "/v1/admin/hosts",
                Some(
                    json!({"name": name, "address": address, "vcpus": vcpus, "memory_mib": memory_mib,
                    "disk_gib": disk_gib, "gpus": list}),
                ),
                &[],
            )
        }
        HostCmd::Cordon { id } => call(M::POST, format!("/v1/admin/hosts/{id}/cordon"), None, &[]),
        HostCmd::Uncordon { id } => {
            call(M::POST, format!("/v1/admin/hosts/{id}/uncordon"), None, &[])
        }
        HostCmd::Drain { id } => call(M::POST, format!("/v1/admin/hosts/{id}/drain"), None, &[]),
    })
}

fn plan_account(c: AccountCmd) -> Call {
    use Method as M;
    match c {
        AccountCmd::List => call(
            M::GET,
            "/v1/admin/accounts",
            None,
            &[
                "id",
                "name",
                "credit_micros",
                "billing_profile_complete",
                "snapshot_quota_gib",
            ],
        ),
        AccountCmd::Show { id: Some(id) } => {
            call(M::GET, format!("/v1/admin/accounts/{id}"), None, &[])
        }
        AccountCmd::Show { id: None } => call(M::GET, "/v1/account", None, &[]),
        AccountCmd::Create {
            name,
            billing_profile_complete,
            snapshot_quota_gib,
        } => call(
            M::POST,
            "/v1/admin/accounts",
            Some(
                json!({"name": name, "billing_profile_complete": billing_profile_complete,
                "snapshot_quota_gib": snapshot_quota_gib}),
            ),
            &[],
        ),
        AccountCmd::Credit {
            id,
            amount_micros,
            note,
        } => call(
            M::POST,
            format!("/v1/admin/accounts/{id}/credits"),
            Some(json!({"amount_micros": amount_micros, "note": note})),
            &[],
        ),
        AccountCmd::Update {
            id,
            billing_profile_complete,
            snapshot_quota_gib,
        } => call(
            M::PATCH,
            format!("/v1/admin/accounts/{id}"),
            Some(
                json!({"billing_profile_complete": billing_profile_complete, "snapshot_quota_gib": snapshot_quota_gib}),
            ),
            &[],
        ),
    }
}

fn plan_token(c: TokenCmd) -> Call {
    use Method as M;
    match c {
        TokenCmd::List => call(
            M::GET,
            "/v1/admin/tokens",
            None,
            &["id", "name", "account", "revoked", "created_at"],
        ),
        TokenCmd::Create { name, account } => call(
            M::POST,
            "/v1/admin/tokens",
            Some(json!({"name": name, "account": account})),
            &[],
        ),
        TokenCmd::Revoke { id } => call(M::DELETE, format!("/v1/admin/tokens/{id}"), None, &[]),
    }
}

/// Drops `null` members (optional fields left out) from a request body.
#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("gantryctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let token = cli
        .token
        .filter(|t| !t.is_empty())
        .context("no API token: set GANTRY_TOKEN (or pass --token)")?;
    let c = plan(cli.cmd)?;
    let url = format!("{}{}", cli.url.trim_end_matches('/'), c.path);
    let mut req = reqwest::Client::new()
        .request(c.method, &url)
        .bearer_auth(token);
    if let Some(b) = c.body {
        req = req.json(&strip_nulls(b));
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach the controller at {}", cli.url))?;
    let status = resp.status();
    let text = resp.text().await.context("reading the answer")?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let msg = body["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| body.to_string());
        bail!("{msg} (HTTP {})", status.as_u16());
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!("{}", render(&body, c.columns));
    }
    Ok(())
}
