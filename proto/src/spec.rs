//! The instance spec: what an agent needs to build a VM. The controller
//! derives it from a flavor, an image and a volume; the agent validates it
//! again before anything reaches libvirt.

use crate::ids::{ImageId, InstanceId, VolumeId};
use crate::net::{GuestConfig, NicSpec};
use crate::validate::{self, PciAddress, ValidationError};
use serde::{Deserialize, Serialize};

/// Limits an agent accepts whatever the caller says.
pub const MAX_VCPUS: u64 = 512;
pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 8 * 1024 * 1024;
pub const MAX_DISK_GIB: u64 = 64 * 1024;

/// One instance, as its host should run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub id: InstanceId,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Virtual size of the root disk; at least the image's size.
    pub root_disk_gib: u64,
    pub image: ImageId,
    #[serde(default)]
    pub data_volume: Option<VolumeSpec>,
    /// Whole GPUs passed through, by PCI address.
    #[serde(default)]
    pub gpus: Vec<PciAddress>,
    /// The access NIC; `None`: the instance has no network.
    #[serde(default)]
    pub nic: Option<NicSpec>,
    /// What the guest is told at boot (the seed disk); `None`: no seed.
    #[serde(default)]
    pub guest: Option<GuestConfig>,
}

/// The data disk the guest mounts at `/datadrive`. It outlives instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    pub id: VolumeId,
    pub size_gib: u64,
}

impl InstanceSpec {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::object_name("name", &self.name)?;
        validate::in_range("vcpus", self.vcpus.into(), 1, MAX_VCPUS)?;
        validate::in_range(
            "memory_mib",
            self.memory_mib,
            MIN_MEMORY_MIB,
            MAX_MEMORY_MIB,
        )?;
        validate::in_range("root_disk_gib", self.root_disk_gib, 1, MAX_DISK_GIB)?;
        if let Some(v) = &self.data_volume {
            validate::in_range("data_volume.size_gib", v.size_gib, 1, MAX_DISK_GIB)?;
        }
        if let Some(n) = &self.nic {
            n.validate("nic")?;
        }
        if let Some(g) = &self.guest {
            g.validate("guest")?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, g) in self.gpus.iter().enumerate() {
            if !seen.insert(*g) {
                return Err(ValidationError::new(
                    format!("gpus[{i}]"),
                    format!("{g} is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            id: InstanceId::new(),
            name: "web-1".into(),
            vcpus: 2,
            memory_mib: 512,
            root_disk_gib: 2,
            image: ImageId::new(),
            data_volume: None,
            gpus: vec![],
            nic: None,
            guest: None,
        }
    }

    #[test]
    fn validates_each_field() {
        assert!(spec().validate().is_ok());
        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(s.validate().unwrap_err().field, "vcpus");
        let mut s = spec();
        s.name = "x y".into();
        assert_eq!(s.validate().unwrap_err().field, "name");
        let mut s = spec();
        let g = PciAddress::parse("0000:65:00.0").unwrap();
        s.gpus = vec![g, g];
        assert_eq!(s.validate().unwrap_err().field, "gpus[1]");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(spec()).unwrap();
        v["colour"] = "red".into();
        let e = serde_json::from_value::<InstanceSpec>(v).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
