//! `gantryctl`: the command-line client of the controller API, for admins
//! and tenants. Reads `GANTRY_URL` and `GANTRY_TOKEN`; prints tables, or
//! the API's JSON with `--json`. Request bodies are the API's own types
//! (`gantry_proto::api::v1`), so a renamed field does not compile; ids on
//! the command line are the typed ids, and every path is built by
//! [`client::ApiPath`]. Exit codes, timeouts and what `--json` prints on a
//! failure: [`client::EXIT_CODES`] (also in `gantryctl --help`).

use clap::{Parser, Subcommand};
use client::{ApiPath, CliResult, Client, Fail, Want, EXIT_CODES};
use gantry_proto::ids::{AccountId, InstanceId, OperationId};
use reqwest::Method;
use serde_json::Value;
use text::{render, strip_nulls};

#[macro_use]
mod client;
mod access;
mod admin;
mod buckets;
mod gpus;
mod groups;
mod instances;
mod monitor;
mod text;

#[derive(Parser)]
#[command(
    version,
    about = "Command-line client for the Gantry controller",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Controller URL.
    #[arg(long, env = "GANTRY_URL", default_value = "http://127.0.0.1:8787")]
    url: String,
    /// API token (admin or account).
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table (and a failure as one JSON
    /// object on stdout).
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for a connection to the controller.
    #[arg(long, global = true, env = "GANTRY_CONNECT_TIMEOUT_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    connect_timeout_secs: u64,
    /// Seconds one request may take, answer included (commands that wait
    /// for an operation poll it with such requests).
    #[arg(long, global = true, env = "GANTRY_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout_secs: u64,
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
    /// Network groups: private networks between the account's instances.
    #[command(subcommand)]
    Group(groups::GroupCmd),
    /// SSH public keys put into new instances.
    #[command(subcommand)]
    SshKey(access::SshKeyCmd),
    /// S3 buckets as directories in instances: connections, attachments.
    #[command(subcommand)]
    Bucket(buckets::BucketCmd),
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
        account: Option<AccountId>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// An operation's state and progress.
    Operation { id: OperationId },
    /// Host join tokens (admin).
    #[command(subcommand)]
    JoinToken(admin::JoinTokenCmd),
    /// Usage ledger records, newest first.
    Usage {
        #[arg(long)]
        instance: Option<InstanceId>,
        /// Another account's records (admin).
        #[arg(long)]
        account: Option<AccountId>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// A request body from an API type (nulls, i.e. fields left out, dropped).
pub fn body<T: serde::Serialize>(t: &T) -> Option<Value> {
    serde_json::to_value(t).ok().map(strip_nulls)
}

/// One API call and how to show its answer.
pub struct Call {
    pub method: Method,
    pub path: ApiPath,
    pub body: Option<Value>,
    pub columns: &'static [&'static str],
    pub want: Want,
}

pub fn call(
    method: Method,
    path: ApiPath,
    body: Option<Value>,
    columns: &'static [&'static str],
) -> Call {
    Call {
        method,
        path,
        body,
        columns,
        want: Want::Json,
    }
}

/// Prints an answer: JSON with `--json`, else a table (text as it is;
/// nothing for an empty answer).
pub fn show(json: bool, v: &Value, columns: &[&str]) {
    match v {
        Value::Null => {}
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
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => usage_error(e),
    };
    let json = cli.json;
    if let Err(e) = run(cli).await {
        if json {
            println!("{}", e.json());
        }
        eprintln!("gantryctl: {e}");
        std::process::exit(e.code());
    }
}

/// A bad command line: clap's message and exit code 2 (help and version
/// print as usual); with `--json` also `{"error": ...}` on stdout.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let help = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !help && std::env::args().any(|a| a == "--json") {
        let first = e.to_string();
        let first = first
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ");
        println!("{}", serde_json::json!({ "error": first }));
    }
    e.exit()
}

async fn run(cli: Cli) -> CliResult<()> {
    let token = cli
        .token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Fail::Local("no API token: set GANTRY_TOKEN (or pass --token)".into()))?;
    let client = Client::new(cli.url, token, cli.connect_timeout_secs, cli.timeout_secs)?;
    let json = cli.json;
    let c = match cli.cmd {
        Cmd::Instance(c) => match instances::plan_instance(c, &client, json).await? {
            Some(c) => c,
            None => return Ok(()),
        },
        Cmd::Group(c) => match groups::plan_group(c, &client, json).await? {
            Some(c) => c,
            None => return Ok(()),
        },
        Cmd::Forward(c) => access::plan_forward(c),
        Cmd::SshKey(c) => access::plan_ssh_key(c)?,
        Cmd::Bucket(c) => buckets::plan_bucket(c)?,
        Cmd::Ca => Call {
            want: Want::Text,
            ..call(Method::GET, v1!("ca.pem"), None, &[])
        },
        Cmd::Snapshot(c) => instances::plan_snapshot(c),
        Cmd::Volume(c) => instances::plan_volume(c),
        Cmd::Flavor(c) => admin::plan_flavor(c),
        Cmd::Image(c) => admin::plan_image(c),
        Cmd::Host(c) => admin::plan_host(c)?,
        Cmd::Admin(c) => gpus::plan_admin(c)?,
        Cmd::Account(c) => admin::plan_account(c),
        Cmd::Token(c) => admin::plan_token(c),
        Cmd::Audit { account, limit } => admin::plan_audit(account, limit),
        Cmd::Operation { id } => call(Method::GET, v1!("operations", id), None, &[]),
        Cmd::JoinToken(c) => admin::plan_join_token(c),
        Cmd::Usage {
            instance,
            account,
            limit,
        } => admin::plan_usage(instance, account, limit),
    };
    let v = client.send(c.method, &c.path, c.body, c.want).await?;
    show(json, &v, c.columns);
    Ok(())
}
