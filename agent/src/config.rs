//! The agent's configuration file (TOML), with defaults for every field.
//!
//! ```toml
//! state_dir = "/var/lib/gantry"        # instances, images, volumes, token
//! libvirt_uri = "qemu:///system"
//! domain_type = "auto"                 # auto | kvm | qemu (TCG)
//! listen = "127.0.0.1:8788"            # local operator API
//! stop_timeout_secs = 60               # ACPI shutdown grace before destroy
//! domain_prefix = "gantry-"            # libvirt domain names; gantry-<x>- when agents share libvirtd
//! reserved_memory_mib = 1024           # host memory never given to guests
//! machine = "pc"                       # QEMU machine type
//! snapshot_store = "<state_dir>/snapshots"   # path, file:// or s3://bucket/prefix
//! store_keyring = "<state_dir>/store-keys.json" # per-account chunk keys (0600)
//! store_gc_secs = 3600                 # garbage collection of the store; 0 = never
//! store_publish_level = 2              # zstd level snapshots are written at; below the
//!                                      # store's level at rest (2) the agent compacts later
//!
//! [gpu]                                # whole GPUs (docs/gpus.md)
//! source = "auto"                      # auto | nvml | none
//! nvml_library = "libnvidia-ml.so.1"   # or the simulated libgantry_nvml_sim.so
//! sysfs_root = "/sys"
//! poll_secs = 10                       # idle GPUs' health and samples
//! numa_pinning = true                  # pin to the GPUs' NUMA node(s) on multi-node hosts
//! gate_reset = true                    # reset every GPU between leases
//! gate_rebind = false                  # briefly bind vfio-pci GPUs to `host_driver` for NVML
//! gate_command = ["dcgmi", "diag", "-r", "1", "-i", "{index}"]   # optional diagnostic
//!
//! [controller]                         # optional: join a gantry-controller
//! url = "http://127.0.0.1:8787"        # or, replicas: urls = ["http://a:8787", "http://b:8787"]
//! join_token_file = "/etc/gantry/join-token"   # or join_token = "gjt_..."
//! host_name = "gpu1"                   # default: the system hostname
//! address = "10.0.0.5"                 # default: host_name
//! poll_wait_secs = 25                  # work long-poll, 0..=60
//!
//! [network]                            # instance access (docs/access.md)
//! netns = "gantry-dp"                  # data plane in this named namespace; default: the host's
//! bridge = "gantry0"                   # the access bridge the agent owns
//! https_listen = "0.0.0.0:443"         # shared HTTPS listener (by name); "" for none
//! loopback_forwards = true             # forwards also answer on 127.0.0.1
//! deny = ["10.0.0.0/8"]                # networks guests may never reach (the controller's
//!                                      # address is always added when it is an IP)
//! dns = ["1.1.1.1", "8.8.8.8"]         # resolvers guests are told to use
//! drift_check_secs = 10                # how often the rules are compared with the kernel's
//!
//! [monitor]                            # host, instance and GPU metrics (docs/monitoring.md)
//! enabled = true                       # collect, expose on /metrics, send to the controller
//! interval_secs = 10                   # collection interval, 1..=3600
//! ```

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// How guests are virtualised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    /// `kvm` when `/dev/kvm` exists and the rig did not find it broken
    /// (`GANTRY_DOMAIN_TYPE` overrides), else `qemu`.
    Auto,
    Kvm,
    /// TCG software emulation.
    Qemu,
}

pub use crate::gpu::{GpuConfig, GpuSource};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub libvirt_uri: String,
    pub domain_type: DomainType,
    pub listen: SocketAddr,
    pub stop_timeout_secs: u64,
    /// Prefix of this agent's libvirt domain names (`<prefix><instance
    /// id>`): `gantry-`, or `gantry-<x>-` when several agents share one
    /// libvirtd (a test rig with two hosts on one machine).
    pub domain_prefix: String,
    pub reserved_memory_mib: u64,
    pub machine: String,
    /// Whole GPUs: where they are found, how they are checked.
    pub gpu: GpuConfig,
    /// Where snapshots go; default `<state_dir>/snapshots`.
    pub snapshot_store: Option<String>,
    /// Per-account keys of the store; default `<state_dir>/store-keys.json`.
    pub store_keyring: Option<PathBuf>,
    /// How often the store's garbage is collected (deleted snapshots'
    /// chunks leave the disk), seconds; 0: never.
    pub store_gc_secs: u64,
    /// zstd level new snapshot chunks are written at; below the store's
    /// level at rest, a background compaction recompresses them later.
    /// Default: the level at rest (live snapshots save while the guest
    /// runs, so writing once costs the least CPU; docs/benchmarks.md).
    pub store_publish_level: Option<i32>,
    /// The controller to join and take work from; none = standalone.
    pub controller: Option<ControllerConfig>,
    /// Instance access networking.
    pub network: NetworkConfig,
    /// Metrics collection ([`crate::monitor`]).
    pub monitor: MonitorConfig,
}

/// The `[monitor]` section: whether and how often the agent samples the
/// host, its instances and GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Collect, expose on `/metrics` and send batches to the controller.
    pub enabled: bool,
    /// Seconds between two samples (rates are over this interval).
    pub interval_secs: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: gantry_proto::metrics::DEFAULT_INTERVAL_SECS,
        }
    }
}

/// The `[network]` section: where the data plane lives and how it behaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// A named network namespace (`/run/netns/<name>`) holding the bridge,
    /// the firewall rules and the HTTPS listeners; guests' taps are moved
    /// into it after they start. `None`: the host's own namespace.
    pub netns: Option<String>,
    /// The access bridge (created and owned by the agent).
    pub bridge: String,
    /// The shared HTTPS listener that answers by host name; empty: none.
    pub https_listen: String,
    /// Forwards also answer on the data plane's 127.0.0.1.
    pub loopback_forwards: bool,
    /// Networks guests may never reach (management, storage, BMCs).
    pub deny: Vec<gantry_proto::net::Ipv4Net>,
    /// Resolvers guests are told to use.
    pub dns: Vec<std::net::Ipv4Addr>,
    /// How often the kernel's rules are compared with the agent's, seconds.
    pub drift_check_secs: u64,
    /// This host's address on the underlay (the private interconnect the
    /// hosts reach each other on): network groups' VXLAN traffic leaves
    /// from and arrives at it. `None`: groups stay on this host.
    pub underlay_address: Option<std::net::Ipv4Addr>,
    /// The UDP port this host takes VXLAN on (other hosts learn it from
    /// the controller; differs only when hosts share an address, in tests).
    pub vxlan_port: u16,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            netns: None,
            bridge: "gantry0".into(),
            https_listen: "0.0.0.0:443".into(),
            loopback_forwards: true,
            deny: Vec::new(),
            dns: vec![[1, 1, 1, 1].into(), [8, 8, 8, 8].into()],
            drift_check_secs: 10,
            underlay_address: None,
            vxlan_port: gantry_proto::groups::VXLAN_PORT,
        }
    }
}

impl NetworkConfig {
    /// The shared HTTPS listener's address, if any.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        (!self.https_listen.is_empty())
            .then(|| self.https_listen.parse().ok())
            .flatten()
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        let iface = |s: &str| {
            !s.is_empty()
                && s.len() <= 15
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        };
        if !iface(&self.bridge) || self.bridge.starts_with("gt-") {
            return Err((
                "network.bridge",
                "must be 1 to 15 of letters, digits, '-' and '_' (not starting gt-)".into(),
            ));
        }
        if let Some(ns) = &self.netns {
            if !iface(ns) {
                return Err((
                    "network.netns",
                    "must be a namespace name of 1 to 15 letters, digits, '-' and '_'".into(),
                ));
            }
        }
        if !self.https_listen.is_empty() && self.https_listen.parse::<SocketAddr>().is_err() {
            return Err((
                "network.https_listen",
                "must be an address like 0.0.0.0:443, or empty for none".into(),
            ));
        }
        if self.drift_check_secs == 0 || self.drift_check_secs > 3600 {
            return Err(("network.drift_check_secs", "must be 1 to 3600".into()));
        }
        if let Some(a) = self.underlay_address {
            let vtep = gantry_proto::groups::Vtep {
                address: a,
                port: self.vxlan_port,
            };
            if vtep.validate("network").is_err() {
                return Err((
                    "network.underlay_address",
                    format!("{a} cannot be a VXLAN endpoint (use the host's interconnect address)"),
                ));
            }
        }
        if self.vxlan_port == 0 {
            return Err((
                "network.vxlan_port",
                "must be a UDP port (1 to 65535)".into(),
            ));
        }
        Ok(())
    }
}

/// The `[controller]` section.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Base URL of the controller (`http://` or `https://`); or `urls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Base URLs of controller replicas (one database): calls go to one
    /// and fail over to the next on connection errors and 5xx answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// A file holding the join token (wins over `join_token`).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// The join token itself; never printed back.
    #[serde(default, skip_serializing)]
    pub join_token: Option<String>,
    /// Default: the system hostname.
    #[serde(default)]
    pub host_name: Option<String>,
    /// Default: the host name.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default = "default_poll_wait")]
    pub poll_wait_secs: u64,
}

fn default_poll_wait() -> u64 {
    25
}

impl std::fmt::Debug for ControllerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerConfig")
            .field("url", &self.url)
            .field("urls", &self.urls)
            .field("join_token_file", &self.join_token_file)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .field("host_name", &self.host_name)
            .field("address", &self.address)
            .field("poll_wait_secs", &self.poll_wait_secs)
            .finish()
    }
}

impl ControllerConfig {
    /// Every controller URL, in the order they are tried: `url`, or `urls`.
    pub fn urls(&self) -> Vec<String> {
        match &self.url {
            Some(u) => vec![u.clone()],
            None => self.urls.clone(),
        }
    }

    /// The controller URLs for messages: `a, b`.
    pub fn urls_text(&self) -> String {
        self.urls().join(", ")
    }

    /// `url` or `urls`: one at least, not both, each http(s), no repeats.
    fn check_urls(&self) -> Result<(), (&'static str, String)> {
        let field = if self.url.is_some() {
            "controller.url"
        } else {
            "controller.urls"
        };
        if self.url.is_some() && !self.urls.is_empty() {
            return Err(("controller.urls", "give url or urls, not both".into()));
        }
        let urls = self.urls();
        if urls.is_empty() {
            return Err((
                "controller.url",
                "a controller URL is required (url, or urls for replicas)".into(),
            ));
        }
        for (i, u) in urls.iter().enumerate() {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err((field, format!("{u:?} must start with http:// or https://")));
            }
            let same = |v: &String| v.trim_end_matches('/') == u.trim_end_matches('/');
            if urls[..i].iter().any(same) {
                return Err((field, format!("{u:?} is listed twice")));
            }
        }
        Ok(())
    }

    /// The join token: the file's content (trimmed) or the inline value.
    pub fn read_join_token(&self) -> Result<Option<String>, std::io::Error> {
        if let Some(p) = &self.join_token_file {
            let t = std::fs::read_to_string(p)?;
            let t = t.trim();
            return Ok((!t.is_empty()).then(|| t.to_string()));
        }
        Ok(self.join_token.clone())
    }

    /// The host name: configured, else the system's.
    pub fn resolved_host_name(&self) -> String {
        self.host_name
            .clone()
            .or_else(sysinfo::System::host_name)
            .unwrap_or_else(|| "localhost".into())
    }

    pub fn resolved_address(&self) -> String {
        self.address
            .clone()
            .unwrap_or_else(|| self.resolved_host_name())
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/gantry"),
            libvirt_uri: "qemu:///system".into(),
            domain_type: DomainType::Auto,
            listen: "127.0.0.1:8788".parse().expect("valid default address"),
            stop_timeout_secs: 60,
            domain_prefix: crate::libvirt::DOMAIN_PREFIX.into(),
            reserved_memory_mib: 1024,
            machine: "pc".into(),
            gpu: GpuConfig::default(),
            snapshot_store: None,
            store_keyring: None,
            store_gc_secs: 3600,
            store_publish_level: None,
            controller: None,
            network: NetworkConfig::default(),
            monitor: MonitorConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

impl AgentConfig {
    /// Reads a config file; a missing file is an error, unknown keys too.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let cfg: AgentConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| ConfigError::Invalid {
            path: path.into(),
            field,
            message: message.into(),
        };
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        let rest = self
            .domain_prefix
            .strip_prefix(crate::libvirt::DOMAIN_PREFIX);
        let ok = rest.is_some_and(|r| {
            r.len() <= 16
                && (r.is_empty() || r.ends_with('-'))
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        if !ok {
            return Err(invalid(
                "domain_prefix",
                "must be gantry- or gantry-<a-z, 0-9, -; up to 16>- (ending in -)",
            ));
        }
        if self.machine.is_empty()
            || !self
                .machine
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(invalid(
                "machine",
                "must be a QEMU machine type like pc or q35",
            ));
        }
        if let Some(l) = self.store_publish_level {
            if !(-131072..=22).contains(&l) {
                return Err(invalid(
                    "store_publish_level",
                    "must be a zstd level, -131072 to 22",
                ));
            }
        }
        self.network
            .check()
            .map_err(|(field, m)| invalid(field, &m))?;
        if self.monitor.interval_secs == 0 || self.monitor.interval_secs > 3600 {
            return Err(invalid("monitor.interval_secs", "must be 1 to 3600"));
        }
        if let Some(c) = &self.controller {
            c.check_urls().map_err(|(field, m)| invalid(field, &m))?;
            if c.poll_wait_secs > gantry_proto::api::agent::MAX_WAIT_SECS {
                return Err(invalid("controller.poll_wait_secs", "must be 0 to 60"));
            }
            if c.host_name.as_deref().is_some_and(str::is_empty) {
                return Err(invalid("controller.host_name", "must not be empty"));
            }
        }
        Ok(())
    }

    pub fn snapshot_store_url(&self) -> String {
        self.snapshot_store
            .clone()
            .unwrap_or_else(|| self.state_dir.join("snapshots").display().to_string())
    }

    pub fn store_keyring_path(&self) -> PathBuf {
        self.store_keyring
            .clone()
            .unwrap_or_else(|| self.state_dir.join("store-keys.json"))
    }

    /// The domain type to put in XML, resolving `auto`.
    pub fn resolved_domain_type(&self) -> &'static str {
        match self.domain_type {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
            DomainType::Auto => match std::env::var("GANTRY_DOMAIN_TYPE").as_deref() {
                Ok("kvm") => "kvm",
                Ok("qemu") => "qemu",
                _ if Path::new("/dev/kvm").exists() => "kvm",
                _ => "qemu",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "state_dir = \"/srv/gantry\"\ndomain_type = \"qemu\"\n").unwrap();
        let cfg = AgentConfig::load(&p).unwrap();
        assert_eq!(cfg.state_dir, PathBuf::from("/srv/gantry"));
        assert_eq!(cfg.resolved_domain_type(), "qemu");
        assert_eq!(cfg.stop_timeout_secs, 60);

        std::fs::write(&p, "state_dirr = \"/x\"\n").unwrap();
        let e = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("state_dirr"), "{e}");

        std::fs::write(&p, "state_dir = \"relative\"\n").unwrap();
        let e = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("state_dir: must be an absolute path"), "{e}");
    }

    #[test]
    fn underlay_and_vxlan_port() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        let load = |extra: &str| {
            std::fs::write(&p, format!("state_dir = \"/srv/g\"\n[network]\n{extra}")).unwrap();
            AgentConfig::load(&p)
        };
        let cfg = load("").unwrap();
        assert_eq!(cfg.network.vxlan_port, 4789);
        assert_eq!(cfg.network.underlay_address, None);
        let cfg = load("underlay_address = \"10.1.0.5\"\nvxlan_port = 4790\n").unwrap();
        assert_eq!(cfg.network.underlay_address, Some([10, 1, 0, 5].into()));
        assert_eq!(cfg.network.vxlan_port, 4790);
        let e = load("underlay_address = \"0.0.0.0\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("network.underlay_address"), "{e}");
        let e = load("vxlan_port = 0\n").unwrap_err().to_string();
        assert!(e.contains("network.vxlan_port"), "{e}");
        let e = load("underlay = \"10.1.0.5\"\n").unwrap_err().to_string();
        assert!(e.contains("underlay"), "{e}");
    }

    #[test]
    fn controller_section() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        let tok = dir.path().join("join-token");
        std::fs::write(&tok, "gjt_from_file\n").unwrap();
        std::fs::write(
            &p,
            format!(
                "[controller]\nurl = \"http://10.0.0.1:8787\"\njoin_token = \"gjt_inline\"\n\
                 join_token_file = \"{}\"\nhost_name = \"gpu1\"\n",
                tok.display()
            ),
        )
        .unwrap();
        let cfg = AgentConfig::load(&p).unwrap();
        let c = cfg.controller.clone().unwrap();
        assert_eq!(c.poll_wait_secs, 25);
        assert_eq!(c.resolved_address(), "gpu1");
        assert_eq!(
            c.read_join_token().unwrap().as_deref(),
            Some("gjt_from_file")
        );
        // The token is never printed back.
        let printed = toml::to_string(&cfg).unwrap();
        assert!(!printed.contains("gjt_inline"), "{printed}");
        assert!(!format!("{c:?}").contains("gjt_inline"));

        std::fs::write(&p, "[controller]\nurl = \"ftp://x\"\n").unwrap();
        let e = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("controller.url"), "{e}");
        std::fs::write(
            &p,
            "[controller]\nurl = \"http://x\"\npoll_wait_secs = 61\n",
        )
        .unwrap();
        let e = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("poll_wait_secs"), "{e}");
        std::fs::write(&p, "[controller]\nurl = \"http://x\"\ntoken = \"x\"\n").unwrap();
        let e = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("token"), "{e}");
    }

    #[test]
    fn controller_replicas_urls() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            "[controller]\nurls = [\"http://a:8787\", \"https://b:8787/\"]\n",
        )
        .unwrap();
        let cfg = AgentConfig::load(&p).unwrap();
        let c = cfg.controller.clone().unwrap();
        assert_eq!(c.urls(), ["http://a:8787", "https://b:8787/"]);
        assert_eq!(c.urls_text(), "http://a:8787, https://b:8787/");
        // Printed back and read again: the same.
        std::fs::write(&p, toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(AgentConfig::load(&p).unwrap(), cfg);
        let one = "[controller]\nurl = \"http://a:8787\"\n";
        std::fs::write(&p, one).unwrap();
        let c = AgentConfig::load(&p).unwrap().controller.unwrap();
        assert_eq!(c.urls(), ["http://a:8787"]);
        let bad = [
            (
                "urls = []\n",
                "controller.url: a controller URL is required",
            ),
            ("", "controller.url: a controller URL is required"),
            (
                "url = \"http://a\"\nurls = [\"http://b\"]\n",
                "controller.urls: give url or urls, not both",
            ),
            (
                "urls = [\"http://a\", \"ftp://b\"]\n",
                "controller.urls: \"ftp://b\" must start with http:// or https://",
            ),
            (
                "urls = [\"http://a\", \"http://a/\"]\n",
                "controller.urls: \"http://a/\" is listed twice",
            ),
        ];
        for (text, want) in bad {
            std::fs::write(&p, format!("[controller]\n{text}")).unwrap();
            let e = AgentConfig::load(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
