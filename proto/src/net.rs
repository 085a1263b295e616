//! Instance access networking, shared by the controller and the agent: the
//! access NIC an instance gets ([`NicSpec`]), what its guest is told at boot
//! ([`GuestConfig`], written into a cloud-init NoCloud seed), its port
//! forwards ([`ForwardSpec`]) and a host's whole access state
//! ([`HostAccess`], [`HostTls`]) as the controller hands it to the agent.
//!
//! Every value here can end up in a firewall rule, a domain XML attribute, a
//! file in the guest's seed or a URL, so each type parses strictly and each
//! struct has a `validate` that names the first bad field.

use crate::ids::{ForwardId, InstanceId};
use crate::validate::ValidationError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The guest port JupyterLab listens on; forwarded over HTTPS by default.
pub const JUPYTER_PORT: u16 = 8888;
/// The guest port SSH listens on; forwarded by default.
pub const SSH_PORT: u16 = 22;
/// Most port forwards one instance may have (the two defaults included).
pub const MAX_FORWARDS_PER_INSTANCE: usize = 32;
/// Most SSH public keys one account may have.
pub const MAX_SSH_KEYS: usize = 64;
/// Longest SSH public key line accepted (RSA 16384 fits).
pub const MAX_SSH_KEY_LEN: usize = 16 * 1024;

// ---------- secrets ----------

/// A secret string (password hash, token, private key): serialized as a
/// plain string, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

// ---------- addresses ----------

/// An Ethernet address, written `52:54:00:0a:c8:02` (lower case).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The MAC Gantry gives the access NIC with address `ip`: QEMU's OUI
    /// `52:54:00` and the address's last three octets, so it is unique on
    /// the host's access bridge whenever the address is.
    pub fn for_ip(ip: Ipv4Addr) -> Self {
        let o = ip.octets();
        Self([0x52, 0x54, 0x00, o[1], o[2], o[3]])
    }

    /// Unicast: the group bit of the first octet is clear.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a MAC address like 52:54:00:0a:c8:02");
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An IPv4 network, written `10.200.0.0/24`. Parsing requires the host bits
/// to be zero, so every network has one spelling.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// `addr/prefix`, with the host bits of `addr` cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if prefix > 32 {
            return Err(format!("prefix /{prefix} is longer than 32"));
        }
        let a = u32::from(addr) & Self::mask_of(prefix);
        Ok(Self {
            addr: a.into(),
            prefix,
        })
    }

    fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        (u32::from(self.addr) | !Self::mask_of(self.prefix)).into()
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == u32::from(self.addr)
    }

    /// The `n`th address of the network (0 = the network address), if inside.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - self.prefix as u32);
        (u64::from(n) < size).then(|| (u32::from(self.addr) + n).into())
    }

    /// How many addresses the network spans.
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix as u32)
    }

    /// Whether two networks share any address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 network like 10.200.0.0/24");
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        let net = Self::new(addr, prefix)?;
        if net.addr != addr {
            return Err(format!("{s:?} has host bits set; the network is {net}"));
        }
        Ok(net)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A forwarded transport protocol.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(format!("{s:?} is not a protocol (tcp or udp)")),
        }
    }
}

// ---------- the instance's NIC and guest configuration ----------

/// The access NIC of an instance: on the host's access bridge, with a
/// static address from the controller's IPAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub mac: MacAddr,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Ipv4))]
    pub ip: Ipv4Addr,
    /// The host's access subnet.
    pub subnet: Ipv4Net,
    /// The bridge's own address, the guest's default route.
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Ipv4))]
    pub gateway: Ipv4Addr,
}

impl NicSpec {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        let f = |n: &str| format!("{field}.{n}");
        if !self.mac.is_unicast() {
            return Err(ValidationError::new(f("mac"), "must be a unicast address"));
        }
        check_host_address(&f("ip"), self.ip, &self.subnet)?;
        check_host_address(&f("gateway"), self.gateway, &self.subnet)?;
        if self.ip == self.gateway {
            return Err(ValidationError::new(
                f("ip"),
                "must differ from the gateway",
            ));
        }
        Ok(())
    }
}

/// `ip` is a usable host address of `net` (not its network or broadcast
/// address), and `net` is at most a /30.
pub fn check_host_address(field: &str, ip: Ipv4Addr, net: &Ipv4Net) -> Result<(), ValidationError> {
    if net.prefix() > 30 {
        return Err(ValidationError::new(
            field,
            format!("subnet {net} is too small for a gateway and a guest"),
        ));
    }
    if !net.contains(ip) || ip == net.network() || ip == net.broadcast() {
        return Err(ValidationError::new(
            field,
            format!("{ip} is not a host address of {net}"),
        ));
    }
    Ok(())
}

/// What the guest is told at boot (through the seed disk): its hostname,
/// root's password hash, the account's SSH keys and the JupyterLab token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    pub hostname: String,
    /// crypt(3) SHA-512 hash (`$6$...`) of root's password.
    pub root_password_hash: Secret,
    /// OpenSSH public key lines for root.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// JupyterLab's token (hex).
    pub jupyter_token: Secret,
}

impl GuestConfig {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        hostname(&format!("{field}.hostname"), &self.hostname)?;
        password_hash(
            &format!("{field}.root_password_hash"),
            self.root_password_hash.expose(),
        )?;
        if self.ssh_authorized_keys.len() > MAX_SSH_KEYS {
            return Err(ValidationError::new(
                format!("{field}.ssh_authorized_keys"),
                format!("at most {MAX_SSH_KEYS} keys"),
            ));
        }
        for (i, k) in self.ssh_authorized_keys.iter().enumerate() {
            ssh_public_key(&format!("{field}.ssh_authorized_keys[{i}]"), k)?;
        }
        token(
            &format!("{field}.jupyter_token"),
            self.jupyter_token.expose(),
        )
    }
}

/// A host name label (RFC 1123): 1 to 63 of `a-z`, `0-9` and `-`, not
/// starting or ending with `-`.
pub fn hostname(field: &str, s: &str) -> Result<(), ValidationError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "must be 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'",
        ))
    }
}

/// The guest host name for an instance name: lower case, `_` and `.` as
/// `-`, trimmed of leading and trailing `-` (`instance` if nothing is left).
pub fn hostname_for(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' => c,
            _ => '-',
        })
        .take(63)
        .collect();
    let h = h.trim_matches('-');
    if h.is_empty() {
        "instance".into()
    } else {
        h.to_string()
    }
}

/// A crypt(3) hash: `$6$` (SHA-512) or `$5$` (SHA-256), of the crypt
/// alphabet only.
pub fn password_hash(field: &str, s: &str) -> Result<(), ValidationError> {
    let ok = (s.starts_with("$6$") || s.starts_with("$5$"))
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'$' | b'='));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "must be a SHA-512 ($6$) or SHA-256 ($5$) crypt hash",
        ))
    }
}

/// A token: 32 to 128 lower-case hex digits.
pub fn token(field: &str, s: &str) -> Result<(), ValidationError> {
    let ok = (32..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "must be 32 to 128 lower-case hex digits",
        ))
    }
}

/// Key types accepted in SSH public keys.
pub const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// One OpenSSH public key line: `<type> <base64 blob> [comment]`. The blob
/// must decode and name the same type; the comment is printable text of at
/// most 200 characters. No options (`command=...`) are accepted.
pub fn ssh_public_key(field: &str, s: &str) -> Result<(), ValidationError> {
    let bad = |m: &str| Err(ValidationError::new(field, m));
    if s.len() > MAX_SSH_KEY_LEN {
        return bad("is too long for an SSH public key");
    }
    if s.chars().any(char::is_control) {
        return bad("must be one line without control characters");
    }
    let mut parts = s.splitn(3, ' ');
    let kind = parts.next().unwrap_or("");
    let blob = parts.next().unwrap_or("");
    let comment = parts.next().unwrap_or("");
    if !SSH_KEY_TYPES.contains(&kind) {
        return bad("must start with a key type such as ssh-ed25519 or ssh-rsa");
    }
    let Some(raw) = base64_decode(blob) else {
        return bad("the key blob is not valid base64");
    };
    // The blob starts with the type as an SSH string: u32 length, bytes.
    let named = raw
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|n| raw.get(4..4 + n));
    if named != Some(kind.as_bytes()) {
        return bad("the key blob does not match its type");
    }
    if comment.chars().count() > 200 {
        return bad("the comment must be at most 200 characters");
    }
    Ok(())
}

/// Standard base64 with padding; `None` for anything else.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let b = s.as_bytes();
    // `is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    if b.is_empty() || b.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, q) in b.chunks(4).enumerate() {
        let last = i == b.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

// ---------- forwards and the host's access state ----------

/// One port forward as the agent realises it: kernel DNAT from
/// `host_port` to the guest's `guest_port`, or, with `https`, the agent's
/// TLS proxy on `host_port` (and on the host's HTTPS name
/// `<guest_port>-<instance>.<domain>`) to the guest's plain HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    pub id: ForwardId,
    pub instance: InstanceId,
    pub protocol: Protocol,
    pub host_port: u16,
    pub guest_port: u16,
    pub https: bool,
}

/// The host's access state, from the controller's work answer. `rev` grows
/// with every change; an agent that already has `rev` gets `None` instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostAccess {
    pub rev: u64,
    /// The host's access subnet; the bridge takes `gateway`.
    pub subnet: Ipv4Net,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Ipv4))]
    pub gateway: Ipv4Addr,
    /// The host's HTTPS name suffix: forwards answer at
    /// `https://<guest_port>-<instance>.<domain>`. `None` without wildcard DNS.
    #[serde(default)]
    pub domain: Option<String>,
    /// Every forward of every instance placed on the host.
    pub forwards: Vec<ForwardSpec>,
}

impl HostAccess {
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_host_address("gateway", self.gateway, &self.subnet)?;
        if let Some(d) = &self.domain {
            dns_name("domain", d)?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, f) in self.forwards.iter().enumerate() {
            let field = format!("forwards[{i}]");
            if f.host_port == 0 || f.guest_port == 0 {
                return Err(ValidationError::new(field, "ports must be 1 to 65535"));
            }
            if f.https && f.protocol != Protocol::Tcp {
                return Err(ValidationError::new(field, "HTTPS forwards must be TCP"));
            }
            if !seen.insert((f.protocol, f.host_port)) {
                return Err(ValidationError::new(
                    field,
                    format!("host port {}/{} is listed twice", f.host_port, f.protocol),
                ));
            }
        }
        Ok(())
    }
}

/// A DNS name: dot-separated [`hostname`] labels, at most 253 characters.
pub fn dns_name(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() || s.len() > 253 || s.split('.').any(|l| hostname(field, l).is_err()) {
        return Err(ValidationError::new(
            field,
            "must be a DNS name of lower-case labels (a-z, 0-9, '-') separated by dots",
        ));
    }
    Ok(())
}

/// The certificate the host's HTTPS proxy presents, with its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HostTls {
    /// SHA-256 of the leaf certificate's DER, hex: the agent sends the one
    /// it has and gets `None` while it is current.
    pub fingerprint: String,
    /// Leaf first, then intermediates (PEM).
    pub cert_chain_pem: String,
    pub key_pem: Secret,
}

/// The HTTPS host name of a forward: `<guest_port>-<instance>.<domain>`.
pub fn https_host_name(guest_port: u16, instance: InstanceId, domain: &str) -> String {
    format!("{guest_port}-{instance}.{domain}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@laptop";

    #[test]
    fn macs_parse_print_and_follow_addresses() {
        let m: MacAddr = "52:54:00:0a:c8:02".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:0a:c8:02");
        assert_eq!(MacAddr::for_ip("10.10.200.2".parse().unwrap()), m);
        for bad in [
            "52:54:00:0a:c8",
            "52-54-00-0a-c8-02",
            "52:54:00:0a:c8:zz",
            "52:54:00:0a:c8:002",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(!"01:00:5e:00:00:01".parse::<MacAddr>().unwrap().is_unicast());
    }

    #[test]
    fn networks_parse_strictly() {
        let n: Ipv4Net = "10.200.3.0/24".parse().unwrap();
        assert_eq!(n.broadcast(), "10.200.3.255".parse::<Ipv4Addr>().unwrap());
        assert_eq!(n.nth(1), Some("10.200.3.1".parse().unwrap()));
        assert_eq!(n.nth(256), None);
        assert!(n.contains("10.200.3.77".parse().unwrap()));
        assert!(!n.contains("10.200.4.1".parse().unwrap()));
        assert!("10.200.3.1/24".parse::<Ipv4Net>().is_err());
        assert!("10.200.3.0/33".parse::<Ipv4Net>().is_err());
        assert!("10.200.3.0".parse::<Ipv4Net>().is_err());
        assert!("10.200.0.0/16".parse::<Ipv4Net>().unwrap().overlaps(&n));
    }

    #[test]
    fn nic_specs_are_checked() {
        let subnet: Ipv4Net = "10.200.0.0/24".parse().unwrap();
        let ok = NicSpec {
            mac: MacAddr::for_ip("10.200.0.2".parse().unwrap()),
            ip: "10.200.0.2".parse().unwrap(),
            subnet,
            gateway: "10.200.0.1".parse().unwrap(),
        };
        assert!(ok.validate("nic").is_ok());
        let mut bad = ok;
        bad.ip = "10.200.0.255".parse().unwrap();
        assert_eq!(bad.validate("nic").unwrap_err().field, "nic.ip");
        let mut bad = ok;
        bad.gateway = bad.ip;
        assert_eq!(bad.validate("nic").unwrap_err().field, "nic.ip");
    }

    #[test]
    fn ssh_keys_are_checked() {
        assert!(ssh_public_key("k", ED25519).is_ok());
        let no_comment = ED25519.rsplit_once(' ').unwrap().0;
        assert!(ssh_public_key("k", no_comment).is_ok());
        let wrong_type = ED25519.replacen("ssh-ed25519", "ssh-rsa", 1);
        assert!(ssh_public_key("k", &wrong_type).is_err());
        assert!(ssh_public_key("k", &format!("command=\"x\" {ED25519}")).is_err());
        assert!(ssh_public_key("k", &format!("{ED25519}\nssh-rsa AAAA")).is_err());
        assert!(ssh_public_key("k", "ssh-ed25519 !!!!").is_err());
    }

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert!(base64_decode("aGk").is_none());
        assert!(base64_decode("a=Gk").is_none());
    }

    #[test]
    fn guest_config_fields_are_checked() {
        let g = GuestConfig {
            hostname: hostname_for("Web_1.prod"),
            root_password_hash: Secret::new("$6$saltsalt$abcDEF./0123"),
            ssh_authorized_keys: vec![ED25519.into()],
            jupyter_token: Secret::new("ab".repeat(24)),
        };
        assert_eq!(g.hostname, "web-1-prod");
        assert!(g.validate("guest").is_ok());
        assert!(!format!("{g:?}").contains("saltsalt"));
        let mut b = g.clone();
        b.root_password_hash = Secret::new("$6$x$a;rm -rf /");
        assert_eq!(
            b.validate("guest").unwrap_err().field,
            "guest.root_password_hash"
        );
        let mut b = g.clone();
        b.hostname = "-x".into();
        assert_eq!(b.validate("guest").unwrap_err().field, "guest.hostname");
        let mut b = g;
        b.jupyter_token = Secret::new("XYZ");
        assert_eq!(
            b.validate("guest").unwrap_err().field,
            "guest.jupyter_token"
        );
        assert_eq!(hostname_for("__"), "instance");
    }

    #[test]
    fn host_access_refuses_duplicates_and_udp_https() {
        let f = ForwardSpec {
            id: ForwardId::new(),
            instance: InstanceId::new(),
            protocol: Protocol::Tcp,
            host_port: 20000,
            guest_port: 22,
            https: false,
        };
        let mut a = HostAccess {
            rev: 1,
            subnet: "10.200.0.0/24".parse().unwrap(),
            gateway: "10.200.0.1".parse().unwrap(),
            domain: Some("gpu1.gantry.example".into()),
            forwards: vec![
                f,
                ForwardSpec {
                    protocol: Protocol::Udp,
                    ..f
                },
            ],
        };
        assert!(a.validate().is_ok());
        a.forwards.push(f);
        assert_eq!(a.validate().unwrap_err().field, "forwards[2]");
        a.forwards.pop();
        a.forwards[1].https = true;
        assert_eq!(a.validate().unwrap_err().field, "forwards[1]");
        a.forwards[1].https = false;
        a.domain = Some("Bad_Domain".into());
        assert_eq!(a.validate().unwrap_err().field, "domain");
    }
}
