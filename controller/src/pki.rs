//! The controller's certificate authority and the certificates of the
//! hosts' HTTPS proxies.
//!
//! The CA (ECDSA P-256, 10 years, `CN=Gantry controller CA`) is created at
//! first start in the state dir: `ca.pem` (served at `GET /v1/ca.pem`) and
//! `ca-key.pem` (mode 0600; a key file group or others may read stops the
//! controller). Replicas sharing a database must share both files. A host
//! leaf ([`Ca::issue`]) is ECDSA P-256, valid 90 days, for the host's
//! names (`*.<domain>`, `<domain>`, its address as an IP or DNS SAN).
//! [`check_operator`] checks a certificate an operator supplies: PEM, key
//! matching the leaf, not expired.

use gantry_proto::net::Secret;
use gantry_proto::ValidationError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The CA's subject; leaves name it as their issuer, so it never changes.
const CA_NAME: &str = "Gantry controller CA";
const CA_DAYS: i64 = 3650;
/// Life of a host leaf.
pub const LEAF_DAYS: i64 = 90;
/// A leaf with less left than this is renewed.
pub const RENEW_BEFORE_DAYS: i64 = 30;
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}); run chmod 600 on it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{0} exists without its partner (ca.pem and ca-key.pem go together)")]
    Half(PathBuf),
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A certificate issued for a host, with its key.
#[derive(Debug)]
pub struct Issued {
    /// Leaf, then the CA (PEM).
    pub chain_pem: String,
    pub key_pem: Secret,
    pub fingerprint: String,
    pub not_after_ms: i64,
}

/// The controller's CA.
pub struct Ca {
    key: KeyPair,
    /// The CA certificate rebuilt from its key (only its subject and key
    /// identifier are used, when signing).
    issuer: rcgen::Certificate,
    pem: String,
}

fn ca_params(now_ms: i64) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "Gantry");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = to_time(now_ms - DAY_MS);
    p.not_after = to_time(now_ms + CA_DAYS * DAY_MS);
    p.serial_number = Some(serial());
    Ok(p)
}

fn to_time(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

impl Ca {
    /// Loads `ca.pem` and `ca-key.pem` from `dir`, creating both when
    /// neither exists.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        let now = crate::db::now_ms();
        match (cert_path.exists(), key_path.exists()) {
            (false, false) => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let issuer = ca_params(now)?.self_signed(&key)?;
                write_private(&key_path, &key.serialize_pem())?;
                write_file(&cert_path, &issuer.pem(), 0o644)?;
                tracing::info!(path = %cert_path.display(), "created the controller CA");
            }
            (true, false) => return Err(PkiError::Half(cert_path)),
            (false, true) => return Err(PkiError::Half(key_path)),
            (true, true) => {}
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| PkiError::Read {
                path: p.into(),
                source,
            })
        };
        let mode = std::fs::metadata(&key_path)
            .map_err(|source| PkiError::Read {
                path: key_path.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(PkiError::Exposed {
                path: key_path,
                mode: mode & 0o777,
            });
        }
        let key = KeyPair::from_pem(&read(&key_path)?)?;
        let issuer = ca_params(now)?.self_signed(&key)?;
        Ok(Self {
            key,
            issuer,
            pem: read(&cert_path)?,
        })
    }

    /// The CA certificate (PEM), as `ca.pem` holds it.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A fresh leaf for `names` (the first is also the subject's CN), valid
    /// [`LEAF_DAYS`] from `now_ms`.
    pub fn issue(&self, names: &[String], now_ms: i64) -> Result<Issued, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("gantry host", String::as_str),
        );
        p.distinguished_name = dn;
        p.not_before = to_time(now_ms - 3_600_000);
        let not_after_ms = now_ms + LEAF_DAYS * DAY_MS;
        p.not_after = to_time(not_after_ms);
        p.serial_number = Some(serial());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let leaf = p.signed_by(&key, &self.issuer, &self.key)?;
        Ok(Issued {
            chain_pem: format!("{}{}", leaf.pem(), self.pem),
            key_pem: Secret::new(key.serialize_pem()),
            fingerprint: fingerprint(leaf.der()),
            not_after_ms: (not_after_ms / 1000) * 1000,
        })
    }
}

/// Whether a leaf expiring at `not_after_ms` is due for renewal.
pub fn due(not_after_ms: i64, now_ms: i64) -> bool {
    not_after_ms - now_ms < RENEW_BEFORE_DAYS * DAY_MS
}

/// Hex SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> String {
    crate::credentials::hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// An operator's certificate, checked.
#[derive(Debug)]
pub struct Checked {
    pub fingerprint: String,
    pub not_after_ms: i64,
}

/// Checks an operator's chain and key: PEM certificates (leaf first), a
/// PEM key (PKCS#8, SEC1 or PKCS#1) that matches the leaf, a leaf that has
/// not expired. Refusals name `cert_chain_pem` or `key_pem`.
pub fn check_operator(
    chain_pem: &str,
    key_pem: &str,
    now_ms: i64,
) -> Result<Checked, ValidationError> {
    let bad_chain = |m: &str| ValidationError::new("cert_chain_pem", m);
    let bad_key = |m: &str| ValidationError::new("key_pem", m);
    let certs = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad_chain("is not valid PEM"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| bad_chain("must hold at least one PEM certificate, the leaf first"))?;
    let not_after_ms = not_after_ms(leaf)
        .ok_or_else(|| bad_chain("the leaf is not a readable X.509 certificate"))?;
    if not_after_ms <= now_ms {
        return Err(bad_chain("the leaf certificate has expired"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| bad_key("must be one PEM private key (PKCS#8, SEC1 or PKCS#1)"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|_| bad_key("is not a supported key (ECDSA P-256/P-384, Ed25519 or RSA)"))?;
    rustls::sign::CertifiedKey::new(certs.clone(), signer)
        .keys_match()
        .map_err(|_| bad_key("does not match the leaf (first) certificate"))?;
    Ok(Checked {
        fingerprint: fingerprint(leaf),
        not_after_ms,
    })
}

/// The first certificate of a PEM chain, DER.
pub fn leaf_der(chain_pem: &str) -> Option<Vec<u8>> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

/// One DER TLV at the start of `b`: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&l0, mut rest) = rest.split_first()?;
    let len = if l0 < 0x80 {
        l0 as usize
    } else {
        let n = (l0 & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The `notAfter` of an X.509 certificate (DER), Unix ms.
pub fn not_after_ms(der: &[u8]) -> Option<i64> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let (tag, _, after_version) = tlv(tbs)?;
    let mut rest = if tag == 0xa0 { after_version } else { tbs };
    // serialNumber, signature, issuer
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (_, validity, _) = tlv(rest)?;
    let (_, _, after_not_before) = tlv(validity)?;
    let (tag, t, _) = tlv(after_not_before)?;
    der_time(tag, std::str::from_utf8(t).ok()?)
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, s: &str) -> Option<i64> {
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = s.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    if rest.len() != 11 || !rest.ends_with('Z') {
        return None;
    }
    let n = |i: usize| rest.get(i..i + 2)?.parse::<u32>().ok();
    let day = chrono::NaiveDate::from_ymd_opt(year, n(0)?, n(2)?)?;
    Some(
        day.and_hms_opt(n(4)?, n(6)?, n(8)?)?
            .and_utc()
            .timestamp_millis(),
    )
}

fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    write_file(path, text, 0o600)
}

/// Temp file with `mode`, fsync, rename.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    let fail = |source| PkiError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("pki")
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_and_issues_leaves_that_match_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(again.pem(), ca.pem());
        let now = crate::db::now_ms();
        let names = vec!["*.gpu1.example".to_string(), "10.0.0.5".to_string()];
        let leaf = again.issue(&names, now).unwrap();
        let checked = check_operator(&leaf.chain_pem, leaf.key_pem.expose(), now).unwrap();
        assert_eq!(checked.fingerprint, leaf.fingerprint);
        assert_eq!(checked.not_after_ms, leaf.not_after_ms);
        assert!(!due(leaf.not_after_ms, now));
        assert!(due(leaf.not_after_ms, now + 61 * DAY_MS));
        let other = ca.issue(&names, now).unwrap();
        let e = check_operator(&leaf.chain_pem, other.key_pem.expose(), now).unwrap_err();
        assert_eq!(e.field, "key_pem");
        let e = check_operator("junk", leaf.key_pem.expose(), now).unwrap_err();
        assert_eq!(e.field, "cert_chain_pem");
        let e = check_operator(&leaf.chain_pem, leaf.key_pem.expose(), now + 91 * DAY_MS);
        assert_eq!(e.unwrap_err().field, "cert_chain_pem");
        std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
        assert!(matches!(
            Ca::load_or_create(dir.path()),
            Err(PkiError::Half(_))
        ));
    }

    #[test]
    fn der_times_read_both_forms() {
        assert_eq!(der_time(0x17, "491231235959Z"), Some(2524607999000));
        assert_eq!(der_time(0x18, "20491231235959Z"), Some(2524607999000));
        assert_eq!(der_time(0x17, "4912312359Z"), None);
    }
}
