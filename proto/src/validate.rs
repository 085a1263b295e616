//! Input validation shared by every entry point (HTTP API, config, command
//! line). Each check returns a [`ValidationError`] that names the field, so a
//! caller can answer "HTTP 422: name: ..." or print a sentence and exit.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A rejected input value: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ValidationError {}

/// Object names (instances, volumes, images, flavors, hosts): 1 to 63
/// characters of ASCII letters, digits, `-`, `_` and `.`, starting with a
/// letter or digit.
pub fn object_name(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > 63 {
        return Err(ValidationError::new(
            field,
            "must be 1 to 63 characters long",
        ));
    }
    if !s.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(ValidationError::new(
            field,
            "must start with a letter or a digit",
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(ValidationError::new(
            field,
            format!("may contain only letters, digits, '-', '_' and '.', not {c:?}"),
        ));
    }
    Ok(())
}

/// Snapshot names: 1 to 50 characters of letters, digits, space, `-`, `_`
/// and `.`, neither blank nor beginning or ending with a space.
pub fn snapshot_name(field: &str, s: &str) -> Result<(), ValidationError> {
    let n = s.chars().count();
    if n == 0 || n > 50 {
        return Err(ValidationError::new(
            field,
            "must be 1 to 50 characters long",
        ));
    }
    if s.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be blank"));
    }
    if s.trim() != s {
        return Err(ValidationError::new(
            field,
            "must not begin or end with a space",
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.')))
    {
        return Err(ValidationError::new(
            field,
            format!("may contain only letters, digits, space, '-', '_' and '.', not {c:?}"),
        ));
    }
    Ok(())
}

/// Free text (descriptions): at most `max` characters, no control characters
/// but newline and tab.
pub fn free_text(field: &str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.chars().count() > max {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max} characters long"),
        ));
    }
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// The longest file path accepted (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// A file path on a host (an image's disk, kernel, initrd): absolute, at
/// most [`MAX_PATH_BYTES`] bytes, no `.` or `..` component, no empty
/// component (`//`), no control characters (NUL included).
pub fn host_path(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > MAX_PATH_BYTES {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {MAX_PATH_BYTES} bytes long"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    let Some(rest) = s.strip_prefix('/') else {
        return Err(ValidationError::new(
            field,
            "must be an absolute path (start with '/')",
        ));
    };
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(ValidationError::new(
            field,
            "must not contain '.', '..' or empty components",
        ));
    }
    Ok(())
}

/// An integer within `lo..=hi`.
pub fn in_range(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), ValidationError> {
    if v < lo || v > hi {
        return Err(ValidationError::new(
            field,
            format!("must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(())
}

/// A PCI address in the long form `dddd:bb:ss.f` (domain, bus, slot,
/// function), as NVML and sysfs print it, lower or upper case hex.
pub fn pci_address(field: &str, s: &str) -> Result<PciAddress, ValidationError> {
    PciAddress::parse(s).ok_or_else(|| {
        ValidationError::new(
            field,
            format!("{s:?} is not a PCI address like 0000:65:00.0"),
        )
    })
}

/// A parsed PCI address; only ever built from validated parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
}

impl PciAddress {
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (dom, rest) = s.split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (slot, func) = rest.split_once('.')?;
        fn hex(t: &str, len: usize) -> Option<&str> {
            (t.len() == len && t.bytes().all(|b| b.is_ascii_hexdigit())).then_some(t)
        }
        // NVML prints an 8-digit domain ("00000000:65:00.0"), sysfs 4 digits.
        let dom = match dom.len() {
            8 => dom.strip_prefix("0000")?,
            _ => hex(dom, 4)?,
        };
        let domain = u16::from_str_radix(hex(dom, 4)?, 16).ok()?;
        let bus = u8::from_str_radix(hex(bus, 2)?, 16).ok()?;
        let slot = u8::from_str_radix(hex(slot, 2)?, 16).ok()?;
        let function = u8::from_str_radix(hex(func, 1)?, 16).ok()?;
        (slot < 32 && function < 8).then_some(Self {
            domain,
            bus,
            slot,
            function,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

impl Serialize for PciAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PciAddress::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("{s:?} is not a PCI address like 0000:65:00.0"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names() {
        assert!(object_name("name", "web-1.prod_a").is_ok());
        assert_eq!(
            object_name("name", "").unwrap_err().to_string(),
            "name: must be 1 to 63 characters long"
        );
        assert!(object_name("name", "-x").is_err());
        assert!(object_name("name", "a'b").is_err());
        assert!(object_name("name", "a<b>").is_err());
        assert!(object_name("name", "a/b").is_err());
        assert!(object_name("name", &"a".repeat(64)).is_err());
    }

    #[test]
    fn snapshot_names() {
        assert!(snapshot_name("name", "before upgrade v1.2").is_ok());
        assert!(snapshot_name("name", &"x".repeat(50)).is_ok());
        assert!(snapshot_name("name", &"x".repeat(51)).is_err());
        let e = snapshot_name("name", "a;rm").unwrap_err();
        assert_eq!(e.field, "name");
        for blank in [" ", "   ", " \u{a0}"] {
            assert!(snapshot_name("name", blank).is_err(), "{blank:?}");
        }
        assert_eq!(
            snapshot_name("name", "  ").unwrap_err().to_string(),
            "name: must not be blank"
        );
        assert!(snapshot_name("name", " lead").is_err());
        assert!(snapshot_name("name", "trail ").is_err());
        assert!(object_name("name", " ").is_err());
        assert!(object_name("name", "a b").is_err());
        assert!(e.message.contains("';'"), "{e}");
    }

    #[test]
    fn host_paths() {
        assert!(host_path("disk", "/srv/images/ubuntu.qcow2").is_ok());
        for bad in [
            "",
            "images/u.qcow2",
            "/srv/../etc/shadow",
            "/srv/./x",
            "/srv//x",
            "/srv/x/",
            "/srv/a\0b",
            "/srv/a\nb",
        ] {
            let e = host_path("origin.disk", bad).unwrap_err();
            assert_eq!(e.field, "origin.disk", "{bad:?}");
        }
        assert!(host_path("disk", &format!("/{}", "a".repeat(MAX_PATH_BYTES))).is_err());
        assert_eq!(
            host_path("origin.disk", "/a/../b").unwrap_err().to_string(),
            "origin.disk: must not contain '.', '..' or empty components"
        );
    }

    #[test]
    fn pci_addresses() {
        let a = pci_address("gpus[0]", "0000:65:00.0").unwrap();
        assert_eq!(a.to_string(), "0000:65:00.0");
        assert_eq!(
            PciAddress::parse("00000000:B3:1F.7").unwrap().to_string(),
            "0000:b3:1f.7"
        );
        for bad in [
            "",
            "65:00.0",
            "0000:65:00.8",
            "0000:65:20.0",
            "0000:6g:00.0",
            "0000:65:00.0'",
        ] {
            assert!(PciAddress::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn ranges_and_text() {
        assert!(in_range("vcpus", 4, 1, 256).is_ok());
        assert_eq!(
            in_range("vcpus", 0, 1, 256).unwrap_err().to_string(),
            "vcpus: must be between 1 and 256, got 0"
        );
        assert!(free_text("description", "hello\nworld", 200).is_ok());
        assert!(free_text("description", "bell\u{7}", 200).is_err());
    }
}
