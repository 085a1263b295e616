//! Secrets at rest: the controller's secret key and sealing with it.
//!
//! The key is 32 random bytes in `secret_key_file` (default
//! `<state-dir>/secret.key`), created with mode 0600 at first start; a key
//! file that group or others may read (or that is not 32 bytes) stops the
//! controller. Replicas sharing one database must share the key file.
//!
//! [`Sealer::seal`] encrypts with ChaCha20-Poly1305 (`ring::aead`) under a
//! random 96-bit nonce and writes `v1:<base64(nonce || ciphertext || tag)>`.
//! Every value is sealed for a *context* (e.g. `instances.root_password:
//! ins-...`) used as the AEAD's associated data, so a sealed value copied
//! into another row or column does not open. Root passwords, JupyterLab
//! tokens and host TLS keys are sealed; [`Secret`] keeps them out of logs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use gantry_proto::net::Secret;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The version prefix of sealed values.
const PREFIX: &str = "v1:";
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the secret key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the secret key file {path} is readable by group or others (mode {mode:o}); \
         run chmod 600 on it"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the secret key file {path} holds {len} bytes, not {KEY_LEN}")]
    Length { path: PathBuf, len: usize },
    #[error("a sealed value for {context} is malformed")]
    Malformed { context: String },
    #[error("a sealed value for {context} does not open with this controller's key")]
    Open { context: String },
}

/// Seals and opens secrets with the controller's key.
pub struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    /// A sealer over raw key bytes.
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, key)
            .unwrap_or_else(|_| unreachable!("a 32-byte key fits ChaCha20-Poly1305"));
        Self {
            key: LessSafeKey::new(unbound),
        }
    }

    /// Loads the key file, creating it (0600) when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(path)?,
            Err(source) => {
                return Err(SecretError::Read {
                    path: path.into(),
                    source,
                })
            }
        }
        let read = |source| SecretError::Read {
            path: path.into(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SecretError::Exposed {
                path: path.into(),
                mode: mode & 0o777,
            });
        }
        let bytes = std::fs::read(path).map_err(read)?;
        let key: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SecretError::Length {
                path: path.into(),
                len: bytes.len(),
            })?;
        Ok(Self::new(&key))
    }

    /// `v1:<base64(nonce || ciphertext || tag)>` of `plain` for `context`.
    pub fn seal(&self, context: &str, plain: &str) -> String {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut buf = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut buf,
            )
            .unwrap_or_else(|_| unreachable!("sealing only fails past 256 GiB"));
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!("{PREFIX}{}", STANDARD.encode(out))
    }

    /// Opens a value sealed for `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Secret, SecretError> {
        let malformed = || SecretError::Malformed {
            context: context.into(),
        };
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| STANDARD.decode(b).ok())
            .ok_or_else(malformed)?;
        if raw.len() < NONCE_LEN {
            return Err(malformed());
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| malformed())?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut body)
            .map_err(|_| SecretError::Open {
                context: context.into(),
            })?;
        String::from_utf8(plain.to_vec())
            .map(Secret::new)
            .map_err(|_| malformed())
    }
}

/// Writes 32 random bytes to `path` (0600, temp file then rename).
fn create_key(path: &Path) -> Result<(), SecretError> {
    let fail = |source| SecretError::Create {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let tmp = dir.join(".secret.key.tmp");
    let key: [u8; KEY_LEN] = rand::random();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(&key).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)?;
    tracing::info!(path = %path.display(), "created the secret key file");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_open_only_in_their_context() {
        let s = Sealer::new(&[7; 32]);
        let a = s.seal("instances.root_password:ins-1", "hunter2");
        let b = s.seal("instances.root_password:ins-1", "hunter2");
        assert!(a.starts_with("v1:") && !a.contains("hunter2"));
        assert_ne!(a, b, "nonces are random");
        let open = s.open("instances.root_password:ins-1", &a).unwrap();
        assert_eq!(open.expose(), "hunter2");
        assert!(matches!(
            s.open("instances.root_password:ins-2", &a),
            Err(SecretError::Open { .. })
        ));
        assert!(matches!(
            Sealer::new(&[8; 32]).open("instances.root_password:ins-1", &a),
            Err(SecretError::Open { .. })
        ));
        assert!(matches!(
            s.open("x", "v1:!!"),
            Err(SecretError::Malformed { .. })
        ));
        assert!(matches!(
            s.open("x", "v1:"),
            Err(SecretError::Malformed { .. })
        ));
    }

    #[test]
    fn key_file_is_created_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret.key");
        let s1 = Sealer::load_or_create(&p).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let sealed = s1.seal("c", "v");
        let s2 = Sealer::load_or_create(&p).unwrap();
        assert_eq!(s2.open("c", &sealed).unwrap().expose(), "v");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Sealer::load_or_create(&p).err().unwrap().to_string();
        assert!(e.contains("readable by group or others"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, b"short").unwrap();
        assert!(matches!(
            Sealer::load_or_create(&p),
            Err(SecretError::Length { len: 5, .. })
        ));
    }
}
