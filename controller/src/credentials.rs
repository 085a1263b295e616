//! Instance credentials: root passwords (20 characters of an unambiguous
//! alphabet) and their SHA-512 crypt(3) hashes (`$6$<salt>$<hash>`, 5000
//! rounds, what glibc's `crypt()` and `openssl passwd -6` write),
//! JupyterLab tokens (48 lower-case hex digits), and SSH key fingerprints
//! as `ssh-keygen -l` prints them.

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use gantry_proto::net::{self, Secret};
use rand::Rng;

/// Letters and digits without the look-alikes 0/O/o, 1/l/I.
const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789";
pub const PASSWORD_LEN: usize = 20;
/// crypt(3)'s salt alphabet.
const SALT_ALPHABET: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const SALT_LEN: usize = 16;
/// The default rounds of SHA-crypt (then `rounds=` is not written).
const ROUNDS: usize = 5000;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("{0:?} is not a SHA-512 crypt hash with the default rounds")]
    Format(&'static str),
}

fn pick(alphabet: &[u8], n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

/// A fresh root password.
pub fn new_password() -> Secret {
    Secret::new(pick(PASSWORD_ALPHABET, PASSWORD_LEN))
}

/// A fresh JupyterLab token: 48 lower-case hex digits.
pub fn new_jupyter_token() -> Secret {
    let bytes: [u8; 24] = rand::random();
    Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// `$6$<16-character salt>$<hash>` of `password` (SHA-512 crypt, 5000
/// rounds), with a fresh random salt.
pub fn hash_password(password: &Secret) -> Result<String, CredentialError> {
    crypt_sha512(password.expose(), &pick(SALT_ALPHABET, SALT_LEN))
}

/// [`hash_password`] on the blocking pool: its 5,000 rounds of SHA-512
/// would otherwise hold up every other request on the same runtime worker.
pub async fn hash_password_blocking(password: Secret) -> Result<String, CredentialError> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| CredentialError::Hash(e.to_string()))?
}

/// SHA-512 crypt of `password` with `salt` (default rounds; like crypt(3),
/// only the first 16 characters of the salt count).
pub fn crypt_sha512(password: &str, salt: &str) -> Result<String, CredentialError> {
    let salt = salt.get(..SALT_LEN).unwrap_or(salt);
    let params = sha_crypt::Sha512Params::new(ROUNDS)
        .map_err(|e| CredentialError::Hash(format!("{e:?}")))?;
    let hash = sha_crypt::sha512_crypt_b64(password.as_bytes(), salt.as_bytes(), &params)
        .map_err(|e| CredentialError::Hash(format!("{e:?}")))?;
    let out = format!("$6${salt}${hash}");
    net::password_hash("root_password_hash", &out)
        .map_err(|_| CredentialError::Format("the hash written"))?;
    Ok(out)
}

/// Whether `password` matches `hash` (`$6$<salt>$...`, default rounds),
/// compared in constant time.
pub fn verify_password(password: &str, hash: &str) -> Result<bool, CredentialError> {
    let salt = hash
        .strip_prefix("$6$")
        .and_then(|r| r.split_once('$'))
        .map(|(salt, _)| salt)
        .filter(|s| !s.starts_with("rounds="))
        .ok_or(CredentialError::Format("the stored hash"))?;
    let again = crypt_sha512(password, salt)?;
    use subtle::ConstantTimeEq;
    Ok(again.as_bytes().ct_eq(hash.as_bytes()).into())
}

/// `SHA256:<base64 without padding>` of a public key line's blob, as
/// `ssh-keygen -l` prints it; `None` for a line that is not a key.
pub fn ssh_fingerprint(public_key: &str) -> Option<String> {
    let blob = public_key.split(' ').nth(1)?;
    let raw = net::base64_decode(blob)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &raw);
    Some(format!(
        "SHA256:{}",
        STANDARD_NO_PAD.encode(digest.as_ref())
    ))
}

/// The sealing context of an instance's root password.
pub fn password_context(instance: gantry_proto::ids::InstanceId) -> String {
    format!("instances.root_password:{instance}")
}

/// The sealing context of an instance's JupyterLab token.
pub fn token_context(instance: gantry_proto::ids::InstanceId) -> String {
    format!("instances.jupyter_token:{instance}")
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_have_their_shape() {
        let p = new_password();
        assert_eq!(p.expose().len(), PASSWORD_LEN);
        assert!(p.expose().bytes().all(|b| PASSWORD_ALPHABET.contains(&b)));
        assert_ne!(new_password(), p);
        let t = new_jupyter_token();
        assert!(net::token("t", t.expose()).is_ok());
        assert_eq!(t.expose().len(), 48);
    }

    /// The vectors of Ulrich Drepper's SHA-crypt specification (default
    /// rounds; salts longer than 16 characters are cut to 16).
    #[test]
    fn sha512_crypt_matches_the_specification() {
        assert_eq!(
            crypt_sha512("Hello world!", "saltstring").unwrap(),
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJu\
             esI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
        );
        assert_eq!(
            crypt_sha512("This is just a test", "toolongsaltstring").unwrap(),
            "$6$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUh\
             x1yxdYcz/e1JSbq3y6JMxxl8audkUEm0"
        );
    }

    /// The hash is the one `openssl passwd -6` (glibc's format) writes.
    #[test]
    fn hashes_match_openssl() {
        let pw = new_password();
        let h = hash_password(&pw).unwrap();
        let salt = h[3..].split('$').next().unwrap();
        let out = std::process::Command::new("openssl")
            .args(["passwd", "-6", "-salt", salt, pw.expose()])
            .output();
        let Ok(out) = out else {
            panic!("openssl is needed for this test");
        };
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), h);
        assert!(verify_password(pw.expose(), &h).unwrap());
        assert!(!verify_password("wrong", &h).unwrap());
    }

    #[test]
    fn fingerprints_read_like_ssh_keygen() {
        // `ssh-keygen -l -f` of this key prints this fingerprint.
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl u@h";
        assert_eq!(
            ssh_fingerprint(key).unwrap(),
            "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"
        );
        assert_eq!(ssh_fingerprint("ssh-ed25519 !!"), None);
    }
}
