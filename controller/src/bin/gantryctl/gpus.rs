//! `gantryctl admin gpu ...` and `gantryctl admin gpu-alias ...`: clearing
//! a quarantined or lost GPU, and the GPU alias table.

use crate::{body, call, Call, CliResult, Fail};
use clap::Subcommand;
use gantry_proto::api::v1::{ClearGpu, SetGpuAlias};
use gantry_proto::validate::PciAddress;
use reqwest::Method as M;

#[derive(Subcommand)]
pub enum AdminCmd {
    /// A host's GPUs.
    #[command(subcommand)]
    Gpu(GpuCmd),
    /// The GPU alias table: which NVML models a flavor's GPU model matches.
    #[command(subcommand)]
    GpuAlias(GpuAliasCmd),
}

#[derive(Subcommand)]
pub enum GpuCmd {
    /// Put a quarantined or lost GPU through the host's health gate again
    /// (audited); prints the operation.
    Clear {
        host: String,
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
                format!("/v1/admin/hosts/{host}/gpus/{pci}/clear"),
                body(&ClearGpu { note }),
                &[],
            )
        }
        AdminCmd::GpuAlias(GpuAliasCmd::List) => {
            call(M::GET, "/v1/admin/gpu-aliases", None, &["alias", "models"])
        }
        AdminCmd::GpuAlias(GpuAliasCmd::Set { alias, models }) => call(
            M::PUT,
            format!("/v1/admin/gpu-aliases/{alias}"),
            body(&SetGpuAlias { models }),
            &[],
        ),
        AdminCmd::GpuAlias(GpuAliasCmd::Delete { alias }) => call(
            M::DELETE,
            format!("/v1/admin/gpu-aliases/{alias}"),
            None,
            &[],
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_api_types() {
        let c = plan_admin(AdminCmd::Gpu(GpuCmd::Clear {
            host: "hst-1".into(),
            pci: "0000:65:00.0".into(),
            note: Some("reseated".into()),
        }))
        .ok()
        .unwrap();
        assert_eq!(c.path, "/v1/admin/hosts/hst-1/gpus/0000:65:00.0/clear");
        assert_eq!(c.body, Some(serde_json::json!({"note": "reseated"})));
        let bad = plan_admin(AdminCmd::Gpu(GpuCmd::Clear {
            host: "hst-1".into(),
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
    }
}
