//! `gantryctl admin ...`: clearing a quarantined or lost GPU, the GPU
//! alias table, settling a stuck operation and removing a dead host.

use crate::client::{CliResult, Fail};
use crate::{body, call, Call};
use clap::Subcommand;
use gantry_proto::api::v1::{ClearGpu, MoveInstance, SetGpuAlias, SettleOperation, SettleOutcome};
use gantry_proto::ids::{HostId, InstanceId, OperationId};
use gantry_proto::validate::{self, PciAddress};
use reqwest::Method as M;

#[derive(Subcommand)]
pub enum AdminCmd {
    /// A host's GPUs.
    #[command(subcommand)]
    Gpu(GpuCmd),
    /// The GPU alias table: which NVML models a flavor's GPU model matches.
    #[command(subcommand)]
    GpuAlias(GpuAliasCmd),
    /// End an operation its host will never finish (audited): `failed`
    /// undoes it and frees what it held; `succeeded` only for a release or
    /// a deletion on a host that is gone.
    Settle {
        operation: OperationId,
        #[arg(long, value_parser = ["failed", "succeeded"])]
        outcome: String,
        /// Why (kept with the operation and in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Remove a host that is down for good: its releases are settled, its
    /// other instances fail, its credential stops working.
    RemoveHost { host: HostId },
    /// Move a Stopped instance to another host (through the shared
    /// snapshot store, data volume too); prints the first operation.
    Move {
        instance: InstanceId,
        /// The host to move to [default: the best other host of its
        /// region; its own host must then be cordoned].
        #[arg(long)]
        host: Option<HostId>,
    },
}

#[derive(Subcommand)]
pub enum GpuCmd {
    /// Put a quarantined or lost GPU through the host's health gate again
    /// (audited); prints the operation.
    Clear {
        host: HostId,
        /// The GPU's PCI address, e.g. 0000:65:00.0.
        pci: String,
        /// Why (kept in the audit log).
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum GpuAliasCmd {
    /// Every alias and the NVML models it matches.
    List,
    /// Make ALIAS match exactly these NVML models.
    Set {
        alias: String,
        #[arg(required = true)]
        models: Vec<String>,
    },
    /// Remove an alias (flavors naming it then match only that exact model).
    Delete { alias: String },
}

pub fn plan_admin(c: AdminCmd) -> CliResult<Call> {
    Ok(match c {
        AdminCmd::Gpu(GpuCmd::Clear { host, pci, note }) => {
            let pci = PciAddress::parse(&pci).ok_or_else(|| {
                Fail::Local(format!(
                    "{pci:?} is not a PCI address (want dddd:bb:ss.f, e.g. 0000:65:00.0)"
                ))
            })?;
            call(
                M::POST,
                v1!("admin", "hosts", host, "gpus", pci, "clear"),
                body(&ClearGpu { note }),
                &[],
            )
        }
        AdminCmd::Settle {
            operation,
            outcome,
            reason,
        } => {
            let outcome = if outcome == "succeeded" {
                SettleOutcome::Succeeded
            } else {
                SettleOutcome::Failed
            };
            call(
                M::POST,
                v1!("admin", "operations", operation, "settle"),
                body(&SettleOperation { outcome, reason }),
                &[],
            )
        }
        AdminCmd::RemoveHost { host } => call(
            M::POST,
            v1!("admin", "hosts", host, "remove"),
            None,
            &["host", "released", "failed", "settled"],
        ),
        AdminCmd::Move { instance, host } => call(
            M::POST,
            v1!("admin", "instances", instance, "move"),
            body(&MoveInstance { host }),
            &[],
        ),
        AdminCmd::GpuAlias(GpuAliasCmd::List) => call(
            M::GET,
            v1!("admin", "gpu-aliases"),
            None,
            &["alias", "models"],
        ),
        AdminCmd::GpuAlias(GpuAliasCmd::Set { alias, models }) => call(
            M::PUT,
            v1!("admin", "gpu-aliases", alias_name(&alias)?),
            body(&SetGpuAlias { models }),
            &[],
        ),
        AdminCmd::GpuAlias(GpuAliasCmd::Delete { alias }) => call(
            M::DELETE,
            v1!("admin", "gpu-aliases", alias_name(&alias)?),
            None,
            &[],
        ),
    })
}

/// An alias as the API names it (an object name), refused here otherwise.
fn alias_name(alias: &str) -> CliResult<&str> {
    validate::object_name("alias", alias).map_err(|e| Fail::Local(e.to_string()))?;
    Ok(alias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_api_types() {
        let host = HostId::new();
        let c = plan_admin(AdminCmd::Gpu(GpuCmd::Clear {
            host,
            pci: "0000:65:00.0".into(),
            note: Some("reseated".into()),
        }))
        .ok()
        .unwrap();
        assert_eq!(
            c.path.as_str(),
            format!("/v1/admin/hosts/{host}/gpus/0000:65:00.0/clear")
        );
        assert_eq!(c.body, Some(serde_json::json!({"note": "reseated"})));
        let bad = plan_admin(AdminCmd::Gpu(GpuCmd::Clear {
            host,
            pci: "65:00".into(),
            note: None,
        }));
        assert!(matches!(bad, Err(Fail::Local(_))));
        let c = plan_admin(AdminCmd::GpuAlias(GpuAliasCmd::Set {
            alias: "H100".into(),
            models: vec!["NVIDIA H100 80GB HBM3".into()],
        }))
        .ok()
        .unwrap();
        assert_eq!(
            c.body,
            Some(serde_json::json!({"models": ["NVIDIA H100 80GB HBM3"]}))
        );
        let dots = plan_admin(AdminCmd::GpuAlias(GpuAliasCmd::Delete {
            alias: "..".into(),
        }));
        assert!(matches!(dots, Err(Fail::Local(_))));
    }
}
