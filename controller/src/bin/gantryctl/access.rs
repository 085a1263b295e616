//! Reaching instances: port forwards, SSH keys, the Access view as text,
//! and the password reset that waits for its operation.

use crate::client::{CliResult, Client, Fail, Want};
use crate::text::render;
use crate::{body, call, show, Call};
use clap::Subcommand;
use gantry_proto::api::v1::*;
use gantry_proto::ids::{AccountId, ForwardId, InstanceId, SshKeyId};
use gantry_proto::net::Protocol;
use reqwest::Method as M;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum ForwardCmd {
    /// Forward a guest port (the host port is chosen by the controller).
    Add {
        instance: InstanceId,
        #[arg(long)]
        guest_port: u16,
        /// tcp (default) or udp.
        #[arg(long, default_value = "tcp")]
        protocol: Protocol,
        /// Serve it over HTTPS (web services).
        #[arg(long)]
        https: bool,
        #[arg(long, default_value = "")]
        label: String,
    },
    List {
        instance: InstanceId,
    },
    /// Change a forward; options left out stay as they are.
    Edit {
        instance: InstanceId,
        forward: ForwardId,
        #[arg(long)]
        guest_port: Option<u16>,
        #[arg(long)]
        protocol: Option<Protocol>,
        #[arg(long)]
        https: Option<bool>,
        #[arg(long)]
        label: Option<String>,
    },
    Delete {
        instance: InstanceId,
        forward: ForwardId,
    },
}

#[derive(Subcommand)]
pub enum SshKeyCmd {
    /// Add a public key (from a file such as ~/.ssh/id_ed25519.pub, or
    /// given inline).
    Add {
        #[arg(long)]
        name: String,
        #[arg(long, conflicts_with = "key", required_unless_present = "key")]
        file: Option<PathBuf>,
        #[arg(long)]
        key: Option<String>,
        /// For admins: the owning account.
        #[arg(long)]
        account: Option<AccountId>,
    },
    List {
        /// Another account's keys (admin).
        #[arg(long)]
        account: Option<AccountId>,
    },
    Delete {
        id: SshKeyId,
    },
}

const FORWARD_COLS: &[&str] = &[
    "id",
    "label",
    "protocol",
    "guest_port",
    "host_port",
    "https",
    "url",
    "domain_url",
];

pub fn plan_forward(c: ForwardCmd) -> Call {
    match c {
        ForwardCmd::Add {
            instance,
            guest_port,
            protocol,
            https,
            label,
        } => {
            let b = body(&CreateForward {
                guest_port,
                protocol,
                https,
                label,
            });
            call(M::POST, v1!("instances", instance, "forwards"), b, &[])
        }
        ForwardCmd::List { instance } => call(
            M::GET,
            v1!("instances", instance, "forwards"),
            None,
            FORWARD_COLS,
        ),
        ForwardCmd::Edit {
            instance,
            forward,
            guest_port,
            protocol,
            https,
            label,
        } => {
            let b = body(&UpdateForward {
                guest_port,
                protocol,
                https,
                label,
            });
            let path = v1!("instances", instance, "forwards", forward);
            call(M::PATCH, path, b, &[])
        }
        ForwardCmd::Delete { instance, forward } => call(
            M::DELETE,
            v1!("instances", instance, "forwards", forward),
            None,
            &[],
        ),
    }
}

pub fn plan_ssh_key(c: SshKeyCmd) -> CliResult<Call> {
    Ok(match c {
        SshKeyCmd::Add {
            name,
            file,
            key,
            account,
        } => {
            let public_key = match (file, key) {
                (Some(f), _) => std::fs::read_to_string(&f).map_err(|e| {
                    Fail::Local(format!("cannot read the key file {}: {e}", f.display()))
                })?,
                (None, Some(k)) => k,
                (None, None) => return Err(Fail::Local("give --file or --key".into())),
            };
            let b = body(&CreateSshKey {
                name,
                public_key: public_key.trim().to_string(),
                account,
            });
            call(M::POST, v1!("ssh-keys"), b, &[])
        }
        SshKeyCmd::List { account } => call(
            M::GET,
            v1!("ssh-keys").query(&[("account", account.map(|a| a.to_string()))]),
            None,
            &["id", "name", "fingerprint", "account", "created_at"],
        ),
        SshKeyCmd::Delete { id } => call(M::DELETE, v1!("ssh-keys", id), None, &[]),
    })
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value, what: &str) -> CliResult<T> {
    serde_json::from_value(v).map_err(|e| {
        Fail::Local(format!(
            "the controller's {what} answer is not understood: {e}"
        ))
    })
}

/// The Access view as text: the SSH command, the JupyterLab link, the
/// forwards and whether a password is set.
pub async fn print_access(client: &Client, id: InstanceId) -> CliResult<()> {
    let v = client.get(&v1!("instances", id, "access")).await?;
    let a: AccessView = decode(v.clone(), "access view")?;
    let dash = || "-".to_string();
    println!("SSH:        {}", a.ssh_command.clone().unwrap_or_else(dash));
    println!("JupyterLab: {}", a.jupyter_url.clone().unwrap_or_else(dash));
    println!("Private IP: {}", a.private_ip.clone().unwrap_or_else(dash));
    let pw = if a.password_set {
        format!("set (gantryctl instance password {id})")
    } else {
        "not set".into()
    };
    println!("Password:   {pw}");
    println!("CA:         {} (gantryctl ca)", a.ca_certificate_path);
    println!("{}", render(&v["forwards"], FORWARD_COLS));
    Ok(())
}

/// Resets the password and waits for its operation; prints the note.
pub async fn reset_password(
    client: &Client,
    id: InstanceId,
    wait_secs: u64,
    json: bool,
) -> CliResult<()> {
    let v = client
        .send(M::POST, &v1!("instances", id, "password"), None, Want::Json)
        .await?;
    let mut op: OperationInfo = decode(v, "operation")?;
    let deadline = Instant::now() + Duration::from_secs(wait_secs);
    while !op.state.is_final() {
        if Instant::now() >= deadline {
            return Err(Fail::Operation(format!(
                "operation {} is still {:?} after {wait_secs} s; see gantryctl operation {}",
                op.id, op.state, op.id
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        op = decode(client.get(&v1!("operations", op.id)).await?, "operation")?;
    }
    if json {
        show(true, &serde_json::to_value(&op).unwrap_or_default(), &[]);
    }
    if op.state != OperationState::Succeeded {
        return Err(Fail::Operation(format!(
            "the password reset {}: {}",
            op.state,
            op.error.unwrap_or_default()
        )));
    }
    if !json {
        let note = op.note.unwrap_or_else(|| "applied".into());
        println!("Password reset: {note}. Reveal it with: gantryctl instance password {id}");
    }
    Ok(())
}
