//! Admin commands: hosts (and their certificates), accounts, tokens,
//! flavors, images, join tokens, the audit log and usage.

use crate::client::{CliResult, Fail};
use crate::{body, call, Call};
use clap::Subcommand;
use gantry_proto::api::agent::{CreateJoinToken, ImageOrigin};
use gantry_proto::api::v1::*;
use gantry_proto::ids::{AccountId, HostId, InstanceId, TokenId};
use gantry_proto::net::Secret;
use gantry_proto::validate::PciAddress;
use reqwest::Method as M;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum JoinTokenCmd {
    /// Mint a one-time token a host joins with; it is shown once.
    Create {
        /// How long it can be used [default: 3600, at most 7 days].
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// The region the host joins [default: the host's own when it
        /// joins again, else the controller's default region].
        #[arg(long)]
        region: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum FlavorCmd {
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
pub enum ImageCmd {
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
pub enum HostCmd {
    List,
    Get {
        id: HostId,
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
        /// [default: the controller's default region]
        #[arg(long)]
        region: Option<String>,
    },
    Cordon {
        id: HostId,
    },
    Uncordon {
        id: HostId,
    },
    Drain {
        id: HostId,
    },
    /// Revoke the host's credential: it is refused at once and its
    /// instances are treated as on a dead host; it joins again with a new
    /// join token.
    Revoke {
        id: HostId,
    },
    /// Move a host with no instances to another region.
    SetRegion {
        id: HostId,
        #[arg(long)]
        region: String,
    },
    /// Use your own certificate for the host's HTTPS proxy (PEM files:
    /// the chain, leaf first, and its key).
    SetCertificate {
        id: HostId,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Go back to a certificate issued by the controller's CA.
    ClearCertificate {
        id: HostId,
    },
}

#[derive(Subcommand)]
pub enum AccountCmd {
    List,
    Show {
        id: Option<AccountId>,
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
        id: AccountId,
        #[arg(allow_hyphen_values = true)]
        amount_micros: i64,
        #[arg(long, default_value = "")]
        note: String,
    },
    Update {
        id: AccountId,
        #[arg(long)]
        billing_profile_complete: Option<bool>,
        #[arg(long)]
        snapshot_quota_gib: Option<u64>,
    },
    /// Disable: its tokens are refused, its Running instances stopped.
    Disable {
        id: AccountId,
    },
    /// Enable a disabled account.
    Enable {
        id: AccountId,
    },
    /// Delete a disabled account: its instances, snapshots and volumes go.
    Delete {
        id: AccountId,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    List,
    /// Mint a token (for an account, else admin); the secret is shown once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        account: Option<AccountId>,
        /// How long it works: seconds, or a number with s, m, h or d
        /// (`30d`); 1 minute to 5 years [default: it never expires].
        #[arg(long, value_name = "SECS", value_parser = parse_lifetime)]
        expires_in: Option<u64>,
    },
    Revoke {
        id: TokenId,
    },
}

/// `90`, `90s`, `15m`, `12h` or `30d` as seconds.
fn parse_lifetime(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?}: expected seconds, or a number with s, m, h or d"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(per))
        .ok_or_else(|| format!("{s:?}: expected seconds, or a number with s, m, h or d"))
}

pub fn plan_audit(account: Option<AccountId>, limit: u32) -> Call {
    call(
        M::GET,
        v1!("admin", "audit").query(&[
            ("account", account.map(|a| a.to_string())),
            ("limit", Some(limit.to_string())),
        ]),
        None,
        &["at", "actor", "method", "path", "status"],
    )
}

pub fn plan_usage(instance: Option<InstanceId>, account: Option<AccountId>, limit: u32) -> Call {
    let q = [
        ("instance", instance.map(|i| i.to_string())),
        ("account", account.map(|a| a.to_string())),
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
    call(M::GET, v1!("usage").query(&q), None, cols)
}

pub fn plan_join_token(c: JoinTokenCmd) -> Call {
    let JoinTokenCmd::Create { ttl_secs, region } = c;
    let b = body(&CreateJoinToken { ttl_secs, region });
    call(M::POST, v1!("admin", "join-tokens"), b, &[])
}

pub fn plan_flavor(c: FlavorCmd) -> Call {
    match c {
        FlavorCmd::List => call(
            M::GET,
            v1!("flavors"),
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
        } => {
            let b = body(&CreateFlavor {
                name,
                vcpus,
                memory_mib,
                root_disk_gib,
                gpu_model,
                gpu_count,
                price_micros_per_hour,
            });
            call(M::POST, v1!("admin", "flavors"), b, &[])
        }
    }
}

pub fn plan_image(c: ImageCmd) -> Call {
    match c {
        ImageCmd::List => call(
            M::GET,
            v1!("images"),
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
            let origin = disk.map(|disk| ImageOrigin::File {
                disk,
                kernel,
                initrd,
                cmdline,
            });
            let b = body(&CreateImage {
                name,
                size_gib,
                origin,
            });
            call(M::POST, v1!("admin", "images"), b, &[])
        }
    }
}

fn read(path: &PathBuf, what: &str) -> CliResult<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Fail::Local(format!("cannot read the {what} {}: {e}", path.display())))
}

pub fn plan_host(c: HostCmd) -> CliResult<Call> {
    Ok(match c {
        HostCmd::List => call(
            M::GET,
            v1!("admin", "hosts"),
            None,
            &[
                "id",
                "name",
                "region",
                "health",
                "cordoned",
                "used_vcpus",
                "vcpus",
                "instances",
                "access_subnet",
                "last_heartbeat",
                "gpus",
            ],
        ),
        HostCmd::Get { id } => call(M::GET, v1!("admin", "hosts", id), None, &[]),
        HostCmd::Register {
            name,
            address,
            vcpus,
            memory_mib,
            disk_gib,
            gpus,
            region,
        } => {
            let mut list = Vec::new();
            for g in gpus {
                let parsed = g
                    .split_once('@')
                    .and_then(|(m, p)| Some((m, PciAddress::parse(p)?)));
                let Some((model, pci)) = parsed else {
                    return Err(Fail::Local(format!(
                        "--gpu {g:?} should read MODEL@PCI, e.g. H100@0000:65:00.0"
                    )));
                };
                list.push(GpuDevice::new(model, pci));
            }
            let b = body(&RegisterHost {
                name,
                address,
                vcpus,
                memory_mib,
                disk_gib,
                gpus: list,
                region,
            });
            call(M::POST, v1!("admin", "hosts"), b, &[])
        }
        HostCmd::Cordon { id } => call(M::POST, v1!("admin", "hosts", id, "cordon"), None, &[]),
        HostCmd::Uncordon { id } => call(M::POST, v1!("admin", "hosts", id, "uncordon"), None, &[]),
        HostCmd::Drain { id } => call(M::POST, v1!("admin", "hosts", id, "drain"), None, &[]),
        HostCmd::Revoke { id } => call(M::POST, v1!("admin", "hosts", id, "revoke"), None, &[]),
        HostCmd::SetRegion { id, region } => {
            let b = body(&SetHostRegion { region });
            call(M::POST, v1!("admin", "hosts", id, "region"), b, &[])
        }
        HostCmd::SetCertificate { id, cert, key } => {
            let b = body(&SetHostCertificate {
                cert_chain_pem: read(&cert, "certificate file")?,
                key_pem: Secret::new(read(&key, "key file")?),
            });
            call(M::PUT, v1!("admin", "hosts", id, "certificate"), b, &[])
        }
        HostCmd::ClearCertificate { id } => call(
            M::DELETE,
            v1!("admin", "hosts", id, "certificate"),
            None,
            &[],
        ),
    })
}

pub fn plan_account(c: AccountCmd) -> Call {
    match c {
        AccountCmd::List => call(
            M::GET,
            v1!("admin", "accounts"),
            None,
            &[
                "id",
                "name",
                "credit_micros",
                "billing_profile_complete",
                "snapshot_quota_gib",
                "status",
            ],
        ),
        AccountCmd::Show { id: Some(id) } => call(M::GET, v1!("admin", "accounts", id), None, &[]),
        AccountCmd::Show { id: None } => call(M::GET, v1!("account"), None, &[]),
        AccountCmd::Create {
            name,
            billing_profile_complete,
            snapshot_quota_gib,
        } => {
            let b = body(&CreateAccount {
                name,
                billing_profile_complete,
                snapshot_quota_gib,
            });
            call(M::POST, v1!("admin", "accounts"), b, &[])
        }
        AccountCmd::Credit {
            id,
            amount_micros,
            note,
        } => {
            let b = body(&AddCredit {
                amount_micros,
                note,
            });
            call(M::POST, v1!("admin", "accounts", id, "credits"), b, &[])
        }
        AccountCmd::Update {
            id,
            billing_profile_complete,
            snapshot_quota_gib,
        } => {
            let b = body(&UpdateAccount {
                billing_profile_complete,
                snapshot_quota_gib,
            });
            call(M::PATCH, v1!("admin", "accounts", id), b, &[])
        }
        AccountCmd::Disable { id } => {
            call(M::POST, v1!("admin", "accounts", id, "disable"), None, &[])
        }
        AccountCmd::Enable { id } => {
            call(M::POST, v1!("admin", "accounts", id, "enable"), None, &[])
        }
        AccountCmd::Delete { id } => call(M::DELETE, v1!("admin", "accounts", id), None, &[]),
    }
}

pub fn plan_token(c: TokenCmd) -> Call {
    match c {
        TokenCmd::List => call(
            M::GET,
            v1!("admin", "tokens"),
            None,
            &[
                "id",
                "name",
                "account",
                "revoked",
                "created_at",
                "expires_at",
            ],
        ),
        TokenCmd::Create {
            name,
            account,
            expires_in,
        } => {
            let b = body(&CreateToken {
                name,
                account,
                expires_in_secs: expires_in,
            });
            call(M::POST, v1!("admin", "tokens"), b, &[])
        }
        TokenCmd::Revoke { id } => call(M::DELETE, v1!("admin", "tokens", id), None, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_read_as_seconds() {
        let secs: Vec<_> = ["90", "90s", "15m", "12h", "30d"]
            .iter()
            .map(|s| parse_lifetime(s).unwrap())
            .collect();
        assert_eq!(secs, [90, 90, 900, 43_200, 2_592_000]);
        for bad in ["", "d", "3w", "1.5h", "-5", "99999999999999999999d"] {
            assert_eq!(
                parse_lifetime(bad).unwrap_err(),
                format!("{bad:?}: expected seconds, or a number with s, m, h or d")
            );
        }
    }

    #[test]
    fn token_create_sends_the_expiry() {
        let c = plan_token(TokenCmd::Create {
            name: "ci".into(),
            account: None,
            expires_in: Some(3600),
        });
        assert_eq!(
            c.body,
            Some(serde_json::json!({"name": "ci", "expires_in_secs": 3600}))
        );
    }
}
