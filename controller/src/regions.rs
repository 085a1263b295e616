//! Regions: every host is in one (controller-owned: its join token or an
//! admin sets it), instances are placed in one, and snapshots live in their
//! instance's. A region name is a DNS-label-like word: 1 to 32 lowercase
//! letters, digits and hyphens, starting with a letter and not ending with
//! a hyphen (`default`, `eu-1`, `us-west-2`).

use crate::error::{ApiError, ApiResult};

/// The longest region name.
pub const MAX_LEN: usize = 32;

/// Why `name` is not a region name, if it is not.
pub fn problem(name: &str) -> Option<String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if name.is_empty() || name.len() > MAX_LEN {
        Some(format!("must be 1 to {MAX_LEN} characters long"))
    } else if !ok_chars {
        Some("may hold only lowercase letters, digits and hyphens".into())
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("must start with a lowercase letter".into())
    } else if name.ends_with('-') {
        Some("must not end with a hyphen".into())
    } else {
        None
    }
}

/// Checks a region name given in field `field` (422 naming it).
pub fn check(field: &str, name: &str) -> ApiResult<()> {
    match problem(name) {
        Some(p) => Err(ApiError::invalid(field, p)),
        None => Ok(()),
    }
}

/// The region of an optional field: checked when given, else `default`.
pub fn or_default(field: &str, given: Option<&str>, default: &str) -> ApiResult<String> {
    match given {
        Some(r) => check(field, r).map(|_| r.to_string()),
        None => Ok(default.to_string()),
    }
}

/// The 409 sentence for using a snapshot of one region in another.
pub fn cross_region(snapshot: &impl std::fmt::Display, from: &str, to: &str) -> ApiError {
    ApiError::Conflict(format!(
        "snapshot {snapshot} is in region {from}, not {to}; copying between regions is not \
         supported yet"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names() {
        for ok in ["default", "eu-1", "us-west-2", "a"] {
            assert_eq!(problem(ok), None, "{ok}");
        }
        for bad in ["", "EU", "eu_1", "1eu", "eu-", "eu 1", &"a".repeat(33), "é"] {
            assert!(problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(
            or_default("region", None, "default").unwrap(),
            "default".to_string()
        );
        assert!(or_default("region", Some("Bad"), "default").is_err());
    }
}
