//! `gantryctl`: the command-line client of the controller API, for admins
//! and tenants. Reads `GANTRY_URL` and `GANTRY_TOKEN`; prints tables, or
//! the API's JSON with `--json`. Request bodies are the API's own types
//! (`gantry_proto::api::v1`), so a renamed field does not compile.
//!
//! Exit codes: 0 done; 1 the API refused the call (4xx, its sentence is
//! printed); 2 bad command line; 3 local input (no token, unreadable
//! file, missing option); 4 the controller cannot be reached; 5 the
//! controller failed (5xx); 6 an operation waited for failed or timed out.

use clap::{Parser, Subcommand};
use reqwest::Method;
use serde_json::Value;
use text::{render, strip_nulls};

mod access;
mod admin;
mod gpus;
mod instances;
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
    /// Instances: list, get, create, actions, batch, password.
    #[command(subcommand)]
    Instance(instances::InstanceCmd),
    /// Port forwards of an instance.
    #[command(subcommand)]
    Forward(access::ForwardCmd),
    /// SSH public keys put into new instances.
    #[command(subcommand)]
    SshKey(access::SshKeyCmd),
    /// Print the CA certificate that signs the hosts' HTTPS certificates.
    Ca,
    /// Snapshots.
    #[command(subcommand)]
    Snapshot(instances::SnapshotCmd),
    /// Data volumes.
    #[command(subcommand)]
    Volume(instances::VolumeCmd),
    /// Flavors (create: admin).
    #[command(subcommand)]
    Flavor(admin::FlavorCmd),
    /// Images (create: admin).
    #[command(subcommand)]
    Image(admin::ImageCmd),
    /// Hosts (admin).
    #[command(subcommand)]
    Host(admin::HostCmd),
    /// Admin calls on GPUs: clear a quarantined GPU, the GPU alias table.
    #[command(subcommand)]
    Admin(gpus::AdminCmd),
    /// Accounts and credit (admin; `show` without id: your own).
    #[command(subcommand)]
    Account(admin::AccountCmd),
    /// API tokens (admin).
    #[command(subcommand)]
    Token(admin::TokenCmd),
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
    JoinToken(admin::JoinTokenCmd),
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

/// Why gantryctl failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Fail {
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Local(String),
    #[error("cannot reach the controller at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error("{0}")]
    Operation(String),
}

impl Fail {
    fn code(&self) -> i32 {
        match self {
            Self::Api { status, .. } if *status >= 500 => 5,
            Self::Api { .. } => 1,
            Self::Local(_) => 3,
            Self::Unreachable { .. } => 4,
            Self::Operation(_) => 6,
        }
    }
}

pub type CliResult<T> = Result<T, Fail>;

/// A request body from an API type (nulls, i.e. fields left out, dropped).
pub fn body<T: serde::Serialize>(t: &T) -> Option<Value> {
    serde_json::to_value(t).ok().map(strip_nulls)
}

/// One API call and how to show its answer.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub body: Option<Value>,
    pub columns: &'static [&'static str],
}

pub fn call(
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

/// The controller's address and the caller's token.
pub struct Client {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    /// Sends one call; the answer's JSON (or its text, when not JSON).
    pub async fn send(&self, method: Method, path: &str, b: Option<Value>) -> CliResult<Value> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = b {
            req = req.json(&b);
        }
        let unreachable = |e: reqwest::Error| Fail::Unreachable {
            url: self.url.clone(),
            why: e.to_string(),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let text = resp.text().await.map_err(unreachable)?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = body["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| body.to_string());
            return Err(Fail::Api {
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> CliResult<Value> {
        self.send(Method::GET, path, None).await
    }
}

/// Prints an answer: JSON with `--json`, else a table (text as it is).
pub fn show(json: bool, v: &Value, columns: &[&str]) {
    match v {
        Value::String(s) if s.is_empty() => {}
        Value::String(s) if !json => print!("{s}"),
        _ if json => println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        ),
        _ => println!("{}", render(v, columns)),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("gantryctl: {e}");
        std::process::exit(e.code());
    }
}

async fn run(cli: Cli) -> CliResult<()> {
    let token = cli
        .token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Fail::Local("no API token: set GANTRY_TOKEN (or pass --token)".into()))?;
    let client = Client {
        url: cli.url,
        token,
        http: reqwest::Client::new(),
    };
    let json = cli.json;
    let c = match cli.cmd {
        Cmd::Instance(c) => match instances::plan_instance(c, &client, json).await? {
            Some(c) => c,
            None => return Ok(()),
        },
        Cmd::Forward(c) => access::plan_forward(c),
        Cmd::SshKey(c) => access::plan_ssh_key(c)?,
        Cmd::Ca => call(Method::GET, "/v1/ca.pem", None, &[]),
        Cmd::Snapshot(c) => instances::plan_snapshot(c),
        Cmd::Volume(c) => instances::plan_volume(c),
        Cmd::Flavor(c) => admin::plan_flavor(c),
        Cmd::Image(c) => admin::plan_image(c),
        Cmd::Host(c) => admin::plan_host(c)?,
        Cmd::Admin(c) => gpus::plan_admin(c)?,
        Cmd::Account(c) => admin::plan_account(c),
        Cmd::Token(c) => admin::plan_token(c),
        Cmd::Audit { account, limit } => admin::plan_audit(account, limit),
        Cmd::Operation { id } => call(Method::GET, format!("/v1/operations/{id}"), None, &[]),
        Cmd::JoinToken(c) => admin::plan_join_token(c),
        Cmd::Usage {
            instance,
            account,
            limit,
        } => admin::plan_usage(instance, account, limit),
    };
    let v = client.send(c.method, &c.path, c.body).await?;
    show(json, &v, c.columns);
    Ok(())
}
