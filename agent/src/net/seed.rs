//! The instance's seed disk: a cloud-init NoCloud seed (ISO9660, volume
//! label `cidata`) attached read-only, carrying the hostname, root's
//! password hash, the account's SSH keys, the static network configuration
//! and the JupyterLab token.
//!
//! Files (format 1):
//!
//! ```text
//! meta-data                  instance-id, local-hostname (cloud-init)
//! user-data                  #cloud-config: root's password hash, keys (replacing
//!                            authorized_keys), sshd drop-in allowing root with a
//!                            password, the token, and a bootcmd that re-applies
//!                            the password hash from this disk at every boot,
//!                            and one that starts the bucket loop when this disk
//!                            carries it (docs/buckets.md)
//! network-config             netplan v2: the access NIC by MAC, static address,
//!                            default route, resolvers; with a network group also
//!                            its NIC by MAC (`eth1`): static address, MTU, no
//!                            route, no resolvers
//! gantry/format              "1"
//! gantry/guest.env           HOSTNAME, MAC, ADDRESS, PREFIX, GATEWAY, DNS (KEY=VALUE)
//! gantry/group.env           only in a network group: GROUP_MAC, GROUP_IP,
//!                            GROUP_PREFIX, GROUP_MTU (KEY=VALUE, no quoting)
//! gantry/root-password-hash  one line
//! gantry/authorized_keys     OpenSSH key lines
//! gantry/jupyter-token       one line
//! ```
//!
//! The image is padded to [`SEED_SIZE`] so a rewrite never changes the disk's
//! size: a seed is replaced atomically while the instance is stopped, and
//! rewritten in place while it runs (QEMU keeps the file open; the guest
//! reads the seed at boot, so the next boot sees the new one; Gantry's test
//! guest also re-reads it when a NIC is hot-plugged). Every value comes
//! from validated proto types (`NicSpec`, `GuestConfig`, `GroupNic`).

use super::NetError;
use gantry_proto::groups::GroupNic;
use gantry_proto::net::{GuestConfig, NicSpec};
use gantry_proto::InstanceId;
use std::io::{Seek, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The seed image's fixed size.
pub const SEED_SIZE: u64 = 2 << 20;
/// The layout version written to `gantry/format`.
pub const SEED_FORMAT: u32 = 1;

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The bootcmd that applies the seed's root password hash on every boot.
const REAPPLY_PASSWORD: &str = "dev=$(blkid -L cidata) && mkdir -p /run/gantry-seed && \
                   mount -o ro \"$dev\" /run/gantry-seed && \
                   printf 'root:%s\\n' \"$(cat /run/gantry-seed/gantry/root-password-hash)\" | chpasswd -e; \
                   umount /run/gantry-seed 2>/dev/null; true";

/// The bootcmd that starts the bucket share's guest loop on cloud images:
/// with a bucket share the seed carries it (crate::buckets::guest); it
/// runs from a copy, as a transient unit where systemd runs, else in its
/// own session. /run is empty at boot.
const START_BUCKETS: &str = "dev=$(blkid -L cidata) && mkdir -p /run/gantry-seed /run/gantry && \
                   mount -o ro \"$dev\" /run/gantry-seed && \
                   if [ -f /run/gantry-seed/gantry/buckets-watch ]; then \
                   cp /run/gantry-seed/gantry/buckets-watch /run/gantry/buckets-watch; \
                   . /run/gantry-seed/gantry/buckets.env; fi; \
                   umount /run/gantry-seed 2>/dev/null; \
                   if [ -f /run/gantry/buckets-watch ]; then \
                   if command -v systemd-run >/dev/null; then \
                   systemd-run --unit=gantry-buckets sh /run/gantry/buckets-watch \"$BUCKETS_TAG\" \"$BUCKETS_DIR\"; \
                   else setsid sh /run/gantry/buckets-watch \"$BUCKETS_TAG\" \"$BUCKETS_DIR\" \
                   </dev/null >/dev/null 2>&1 & fi; fi; true";

/// The cloud-config `user-data`: hostname, root's password hash and SSH
/// keys, sshd's settings, the JupyterLab token, and the boot commands.
fn user_data(guest: &GuestConfig, hash: &str, token: &str, keys: &str) -> String {
    format!(
        "#cloud-config\n\
         hostname: {host}\n\
         preserve_hostname: false\n\
         disable_root: false\n\
         ssh_pwauth: true\n\
         users:\n  - name: root\n    lock_passwd: false\n    hashed_passwd: {hash}\n\
         chpasswd:\n  expire: false\n\
         write_files:\n\
         \x20 - path: /root/.ssh/authorized_keys\n    permissions: \"0600\"\n    owner: root:root\n    content: {keys}\n\
         \x20 - path: /etc/ssh/sshd_config.d/60-gantry.conf\n    content: {sshd}\n\
         \x20 - path: /etc/gantry/jupyter-token\n    permissions: \"0600\"\n    content: {token}\n\
         bootcmd:\n  - [sh, -c, {reapply}]\n  - [sh, -c, {buckets}]\n\
         runcmd:\n  - [sh, -c, \"systemctl reload ssh 2>/dev/null || service ssh reload 2>/dev/null || true\"]\n",
        host = q(&guest.hostname),
        hash = q(hash),
        keys = q(keys),
        sshd = q("PermitRootLogin yes\nPasswordAuthentication yes\n"),
        token = q(&format!("{token}\n")),
        reapply = q(REAPPLY_PASSWORD),
        buckets = q(START_BUCKETS),
    )
}

/// The netplan `network-config`: the access NIC (`eth0`) and, in a
/// network group, the group NIC (`eth1`).
fn network_config(nic: &NicSpec, dns_list: &[String], group: Option<&GroupNic>) -> String {
    let mut network = format!(
        "version: 2\n\
         ethernets:\n  access0:\n    match:\n      macaddress: {mac}\n    set-name: eth0\n\
         \x20   addresses: [{addr}]\n\
         \x20   routes:\n      - to: default\n        via: {gw}\n\
         \x20   nameservers:\n      addresses: [{dns}]\n",
        mac = q(&nic.mac.to_string()),
        addr = q(&format!("{}/{}", nic.ip, nic.subnet.prefix())),
        gw = nic.gateway,
        dns = dns_list.join(", "),
    );
    if let Some(g) = group {
        network.push_str(&format!(
            "  group0:\n    match:\n      macaddress: {mac}\n    set-name: eth1\n\
             \x20   addresses: [{addr}]\n\
             \x20   mtu: {mtu}\n",
            mac = q(&g.mac.to_string()),
            addr = q(&format!("{}/{}", g.ip, g.cidr.prefix())),
            mtu = g.mtu,
        ));
    }
    network
}

/// The seed's files, by relative path; `group` is the instance's network
/// group NIC, if it is in one.
pub fn files(
    id: InstanceId,
    nic: &NicSpec,
    guest: &GuestConfig,
    dns: &[Ipv4Addr],
    group: Option<&GroupNic>,
) -> Vec<(&'static str, String)> {
    let keys: String = guest
        .ssh_authorized_keys
        .iter()
        .map(|k| format!("{k}\n"))
        .collect();
    let hash = guest.root_password_hash.expose();
    let token = guest.jupyter_token.expose();
    let dns_list: Vec<String> = dns.iter().map(Ipv4Addr::to_string).collect();
    let meta = format!("instance-id: {id}\nlocal-hostname: {}\n", guest.hostname);
    let user = user_data(guest, hash, token, &keys);
    let network = network_config(nic, &dns_list, group);
    let env = format!(
        "HOSTNAME={}\nMAC={}\nADDRESS={}\nPREFIX={}\nGATEWAY={}\nDNS=\"{}\"\n",
        guest.hostname,
        nic.mac,
        nic.ip,
        nic.subnet.prefix(),
        nic.gateway,
        dns_list.join(" ")
    );
    let mut out = vec![
        ("meta-data", meta),
        ("user-data", user),
        ("network-config", network),
        ("gantry/format", format!("{SEED_FORMAT}\n")),
        ("gantry/guest.env", env),
        ("gantry/root-password-hash", format!("{hash}\n")),
        ("gantry/authorized_keys", keys),
        ("gantry/jupyter-token", format!("{token}\n")),
    ];
    if let Some(g) = group {
        out.push((
            "gantry/group.env",
            format!(
                "GROUP_MAC={}\nGROUP_IP={}\nGROUP_PREFIX={}\nGROUP_MTU={}\n",
                g.mac,
                g.ip,
                g.cidr.prefix(),
                g.mtu
            ),
        ));
    }
    out
}

/// Builds the ISO image of `files` (genisoimage), padded to [`SEED_SIZE`].
pub fn build_image(files: &[(&str, String)]) -> Result<Vec<u8>, NetError> {
    let fail = |m: String| NetError::Seed(m);
    let dir = tempfile::tempdir().map_err(|e| fail(format!("temp dir: {e}")))?;
    for (rel, content) in files {
        let p = dir.path().join("root").join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| fail(format!("{}: {e}", parent.display())))?;
        }
        std::fs::write(&p, content).map_err(|e| fail(format!("{}: {e}", p.display())))?;
    }
    let out = dir.path().join("seed.iso");
    let res = std::process::Command::new("genisoimage")
        .args([
            "-quiet",
            "-input-charset",
            "utf-8",
            "-volid",
            "cidata",
            "-joliet",
            "-rock",
            "-o",
        ])
        .arg(&out)
        .arg(dir.path().join("root"))
        .output()
        .map_err(|e| {
            fail(format!(
                "cannot run genisoimage (install it: apt install genisoimage): {e}"
            ))
        })?;
    if !res.status.success() {
        return Err(fail(format!(
            "genisoimage: {}",
            String::from_utf8_lossy(&res.stderr).trim()
        )));
    }
    let mut bytes = std::fs::read(&out).map_err(|e| fail(format!("{}: {e}", out.display())))?;
    if bytes.len() as u64 > SEED_SIZE {
        return Err(fail(format!(
            "the seed is {} bytes, more than {SEED_SIZE} (too many SSH keys?)",
            bytes.len()
        )));
    }
    bytes.resize(SEED_SIZE as usize, 0);
    Ok(bytes)
}

/// Writes the seed image to `path`: atomically when `in_place` is false
/// (the instance is not running), else over the existing file's bytes
/// (same size, same inode, synced).
pub fn write(path: &Path, image: &[u8], in_place: bool) -> Result<(), NetError> {
    let fail = |e: std::io::Error| NetError::Seed(format!("{}: {e}", path.display()));
    if !in_place || !path.exists() {
        return crate::fsutil::write_atomic(path, image, 0o600)
            .map_err(|e| NetError::Seed(e.to_string()));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(path)
        .map_err(fail)?;
    f.seek(std::io::SeekFrom::Start(0)).map_err(fail)?;
    f.write_all(image).map_err(fail)?;
    f.set_len(image.len() as u64).map_err(fail)?;
    f.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::net::{MacAddr, Secret};

    fn sample() -> (InstanceId, NicSpec, GuestConfig) {
        let ip: Ipv4Addr = "10.200.0.2".parse().unwrap();
        let nic = NicSpec {
            mac: MacAddr::for_ip(ip),
            ip,
            subnet: "10.200.0.0/24".parse().unwrap(),
            gateway: "10.200.0.1".parse().unwrap(),
        };
        let guest = GuestConfig {
            hostname: "web-1".into(),
            root_password_hash: Secret::new("$6$saltsaltsalt$hashhash./"),
            ssh_authorized_keys: vec![
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b".into(),
            ],
            jupyter_token: Secret::new("ab".repeat(24)),
        };
        (InstanceId::from_uuid(uuid::Uuid::from_u128(7)), nic, guest)
    }

    #[test]
    fn golden_seed_files() {
        let (id, nic, guest) = sample();
        let dns = ["1.1.1.1".parse().unwrap(), "8.8.8.8".parse().unwrap()];
        let mut all = String::new();
        for (name, content) in files(id, &nic, &guest, &dns, None) {
            all.push_str(&format!("==> {name} <==\n{content}"));
        }
        crate::testutil::golden("seed-files.txt", &all);
    }

    /// Every `bootcmd`/`runcmd` shell line of the user-data parses as sh.
    #[test]
    fn user_data_commands_are_valid_sh() {
        let (id, nic, guest) = sample();
        let files = files(id, &nic, &guest, &[], None);
        let user = &files.iter().find(|f| f.0 == "user-data").unwrap().1;
        let cmds: Vec<String> = user
            .lines()
            .filter_map(|l| l.strip_prefix("  - [sh, -c, ")?.strip_suffix(']'))
            .map(|q| serde_json::from_str(q).expect("a JSON string"))
            .collect();
        assert_eq!(cmds.len(), 3, "{user}");
        for c in cmds {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", &c])
                .output()
                .unwrap();
            assert!(out.status.success(), "sh -n refused {c:?}: {out:?}");
        }
    }

    #[test]
    fn golden_seed_files_with_a_group_nic() {
        let (id, nic, guest) = sample();
        let ip: Ipv4Addr = "172.16.0.2".parse().unwrap();
        let group = GroupNic {
            group: gantry_proto::NetworkGroupId::from_uuid(uuid::Uuid::from_u128(9)),
            vni: 5000,
            mac: gantry_proto::groups::group_mac(ip),
            ip,
            cidr: "172.16.0.0/24".parse().unwrap(),
            mtu: 1450,
        };
        let with = files(id, &nic, &guest, &[], Some(&group));
        let without = files(id, &nic, &guest, &[], None);
        let mut all = String::new();
        for (name, content) in &with {
            let same = without.iter().any(|(n, c)| n == name && c == content);
            if !same {
                all.push_str(&format!("==> {name} <==\n{content}"));
            }
        }
        // Only the network configuration and group.env differ.
        crate::testutil::golden("seed-files-group.txt", &all);
        assert_eq!(with.len(), without.len() + 1);
    }

    #[test]
    #[ignore = "needs genisoimage: ./scripts/test runs it"]
    fn image_is_a_cidata_iso_of_fixed_size() {
        let (id, nic, guest) = sample();
        let img = build_image(&files(id, &nic, &guest, &[], None)).unwrap();
        assert_eq!(img.len() as u64, SEED_SIZE);
        // ISO9660 primary volume descriptor at sector 16: "CD001", and the
        // volume id at offset 40.
        let pvd = &img[16 * 2048..17 * 2048];
        assert_eq!(&pvd[1..6], b"CD001");
        assert!(pvd[40..46].eq_ignore_ascii_case(b"cidata"), "volume id");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seed.iso");
        write(&p, &img, false).unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).unwrap());
        write(&p, &img, true).unwrap();
        let after = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).unwrap());
        assert_eq!(
            inode, after,
            "an in-place rewrite keeps the inode QEMU holds"
        );
    }
}
