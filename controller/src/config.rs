//! The controller's config file (TOML) and its defaults.
//!
//! Every key is optional; an unknown key is an error naming it. The file is
//! documented, with its defaults, in `docs/controller.md`.

use gantry_proto::net::{self, Ipv4Net};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on (`--listen` wins).
    pub listen: SocketAddr,
    /// Database URL; default `sqlite://<state-dir>/controller.db`.
    pub database_url: Option<String>,
    /// The first admin token (`GANTRY_ADMIN_TOKEN` wins).
    pub admin_token: Option<String>,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
    /// Requests per second allowed per token, and the burst above it.
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    /// How often agents are told to heartbeat.
    pub heartbeat_secs: u64,
    /// A host not heard from for this long is marked unhealthy and not
    /// scheduled on.
    pub heartbeat_timeout_secs: u64,
    /// How often the reconcile loop runs.
    pub reconcile_secs: u64,
    /// How often snapshot storage is charged.
    pub snapshot_meter_secs: u64,
    /// Snapshot storage price, micro-units per TB (10^12 bytes) per hour.
    pub snapshot_price_micros_per_tb_hour: i64,
    /// How long an account may stay at or below zero credit before its
    /// Running instances are stopped.
    pub credit_grace_secs: u64,
    /// Whether every host sees one shared snapshot store (then a snapshot
    /// can be restored anywhere and store usage is counted once).
    pub snapshot_store_shared: bool,
    /// Smallest root disk `grow-disk` accepts, GiB.
    pub min_root_disk_gib: u64,
    /// Smallest size a data volume may be grown to, GiB.
    pub min_volume_gib: u64,
    /// Data volume storage price, micro-units per GiB per hour (0: volumes
    /// are not billed).
    pub volume_price_micros_per_gib_hour: i64,
    /// Snapshot storage quota of new accounts, GiB.
    pub default_snapshot_quota_gib: u64,
    /// First host port used for port forwards.
    pub port_range_start: u16,
    /// Last host port used for port forwards.
    pub port_range_end: u16,
    /// The network host access subnets are taken from.
    pub access_network: Ipv4Net,
    /// Prefix length of each host's access subnet (the lowest free one of
    /// `access_network` is taken when the host first needs one).
    pub access_subnet_prefix: u8,
    /// The network default network-group CIDRs come from: each group that
    /// names none gets the lowest `/24` of it that overlaps none of its
    /// account's groups (`crate::groups`).
    pub group_pool: Ipv4Net,
    /// The MTU of group NICs: the hosts' underlay MTU less the VXLAN
    /// overhead (50 bytes); stored per group when it is created.
    pub group_mtu: u16,
    /// HTTPS name suffix: a host's domain is `<host name>.<suffix>` (the
    /// name as a DNS label); none: hosts have no domain.
    pub host_domain_suffix: Option<String>,
    /// The 32-byte key secrets are sealed with at rest; default
    /// `<state-dir>/secret.key` (created 0600 at first start).
    pub secret_key_file: Option<PathBuf>,
    /// Database pool size.
    pub max_db_connections: u32,
    /// The region of hosts whose join token names none, and of instances
    /// created without one (`crate::regions`).
    pub default_region: String,
    /// Replicas on PostgreSQL: how long the leader's lease lasts (it
    /// renews every third of it); a follower takes over within this long
    /// after the leader's last renewal (`crate::leader`).
    pub leader_lease_secs: u64,
    /// Per operation kind, how long (s) a host may leave an operation
    /// without progress before it times out (`operations`); kinds not
    /// listed use `OperationKind::default_timeout_secs`.
    pub operation_timeout_secs: std::collections::BTreeMap<gantry_proto::OperationKind, u64>,
    /// HTTP: a connection waiting for a request (fresh or kept alive)
    /// must receive its whole header within this long (ms), else it is
    /// closed (`crate::http`).
    pub http_header_timeout_ms: u64,
    /// HTTP: a request body must arrive within this long (ms) of its
    /// headers, else the answer is 408.
    pub http_body_timeout_ms: u64,
    /// HTTP: a connection with no request being handled that moves no
    /// byte for this long (ms) is closed (a client not reading its answer).
    pub http_idle_timeout_ms: u64,
    /// HTTP: most connections open at once; at the cap a new one replaces
    /// the one idle the longest, or is answered 503 when all are busy.
    pub http_max_connections: usize,
    /// On SIGTERM: how long (ms) requests in flight may take to finish
    /// before their connections are dropped and the process exits.
    pub shutdown_timeout_ms: u64,
    /// Monitoring samples: retention of each tier, or the Prometheus
    /// server the Monitor view reads instead (`crate::monitor`).
    pub metrics: MetricsConfig,
}

/// The `[metrics]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// How long raw samples are kept, seconds.
    pub raw_retention_secs: u64,
    /// How long one-minute means are kept, seconds.
    pub minute_retention_secs: u64,
    /// How long hourly means are kept, seconds.
    pub hour_retention_secs: u64,
    /// Set: the Monitor view is answered from this Prometheus server's
    /// HTTP API, and agents' batches are accepted but not stored.
    pub prometheus_url: Option<url::Url>,
    /// Prometheus: the shortest window of `rate()`/`avg_over_time()`
    /// (seconds; at least four of its scrape intervals).
    pub prometheus_min_window_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            raw_retention_secs: 3600,
            minute_retention_secs: 7 * 24 * 3600,
            hour_retention_secs: 90 * 24 * 3600,
            prometheus_url: None,
            prometheus_min_window_secs: 60,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            database_url: None,
            admin_token: None,
            max_body_bytes: 64 * 1024,
            rate_limit_per_second: 50,
            rate_limit_burst: 100,
            heartbeat_secs: 10,
            heartbeat_timeout_secs: 60,
            reconcile_secs: 5,
            snapshot_meter_secs: 3600,
            snapshot_price_micros_per_tb_hour: 100_000,
            credit_grace_secs: 3600,
            snapshot_store_shared: false,
            min_root_disk_gib: 50,
            min_volume_gib: 50,
            volume_price_micros_per_gib_hour: 0,
            default_snapshot_quota_gib: 100,
            port_range_start: 20000,
            port_range_end: 29999,
            access_network: Ipv4Net::new(std::net::Ipv4Addr::new(10, 200, 0, 0), 16)
                .unwrap_or_else(|_| unreachable!("a /16 is a valid prefix")),
            access_subnet_prefix: 24,
            group_pool: Ipv4Net::new(std::net::Ipv4Addr::new(172, 16, 0, 0), 12)
                .unwrap_or_else(|_| unreachable!("a /12 is a valid prefix")),
            group_mtu: gantry_proto::groups::DEFAULT_GROUP_MTU,
            host_domain_suffix: None,
            secret_key_file: None,
            max_db_connections: 8,
            default_region: "default".into(),
            leader_lease_secs: 10,
            operation_timeout_secs: Default::default(),
            http_header_timeout_ms: 10_000,
            http_body_timeout_ms: 30_000,
            http_idle_timeout_ms: 60_000,
            http_max_connections: 4096,
            shutdown_timeout_ms: 20_000,
            metrics: MetricsConfig::default(),
        }
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_string(),
        })?;
        cfg.check()
            .map_err(|(field, message)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                message,
            })?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), (&'static str, String)> {
        let positive = |field: &'static str, v: u64| {
            if v == 0 {
                Err((field, "must be greater than 0".to_string()))
            } else {
                Ok(())
            }
        };
        positive("max_body_bytes", self.max_body_bytes as u64)?;
        positive("rate_limit_per_second", self.rate_limit_per_second.into())?;
        positive("rate_limit_burst", self.rate_limit_burst.into())?;
        positive("heartbeat_secs", self.heartbeat_secs)?;
        positive("heartbeat_timeout_secs", self.heartbeat_timeout_secs)?;
        if self.operation_timeout_secs.values().any(|v| *v == 0) {
            return Err((
                "operation_timeout_secs",
                "every timeout must be greater than 0".to_string(),
            ));
        }
        positive("reconcile_secs", self.reconcile_secs)?;
        positive("snapshot_meter_secs", self.snapshot_meter_secs)?;
        if self.snapshot_price_micros_per_tb_hour < 0 {
            return Err((
                "snapshot_price_micros_per_tb_hour",
                "must not be negative".into(),
            ));
        }
        if self.volume_price_micros_per_gib_hour < 0 {
            return Err((
                "volume_price_micros_per_gib_hour",
                "must not be negative".into(),
            ));
        }
        positive("max_db_connections", self.max_db_connections.into())?;
        self.check_http()?;
        if let Some(p) = crate::regions::problem(&self.default_region) {
            return Err(("default_region", p));
        }
        if !(1..=3600).contains(&self.leader_lease_secs) {
            return Err(("leader_lease_secs", "must be 1 to 3600".into()));
        }
        positive("port_range_start", self.port_range_start.into())?;
        if self.port_range_end < self.port_range_start {
            return Err((
                "port_range_end",
                format!(
                    "must not be below port_range_start ({})",
                    self.port_range_start
                ),
            ));
        }
        self.check_access()?;
        self.check_groups()?;
        self.check_metrics()?;
        if let Some(t) = &self.admin_token {
            if t.len() < 16 {
                return Err(("admin_token", "must be at least 16 characters".into()));
            }
        }
        Ok(())
    }

    fn check_http(&self) -> Result<(), (&'static str, String)> {
        let ms = |field: &'static str, v: u64| {
            if (1..=3_600_000).contains(&v) {
                Ok(())
            } else {
                Err((field, "must be 1 to 3600000 (milliseconds)".to_string()))
            }
        };
        ms("http_header_timeout_ms", self.http_header_timeout_ms)?;
        ms("http_body_timeout_ms", self.http_body_timeout_ms)?;
        ms("http_idle_timeout_ms", self.http_idle_timeout_ms)?;
        ms("shutdown_timeout_ms", self.shutdown_timeout_ms)?;
        if !(1..=1_000_000).contains(&self.http_max_connections) {
            return Err(("http_max_connections", "must be 1 to 1000000".into()));
        }
        Ok(())
    }

    fn check_access(&self) -> Result<(), (&'static str, String)> {
        let (net, p) = (self.access_network, self.access_subnet_prefix);
        if p < net.prefix() || p > 30 {
            return Err((
                "access_subnet_prefix",
                format!("must be between {} (access_network's) and 30", net.prefix()),
            ));
        }
        if let Some(s) = &self.host_domain_suffix {
            net::dns_name("host_domain_suffix", s)
                .map_err(|e| ("host_domain_suffix", e.message))?;
        }
        Ok(())
    }

    fn check_groups(&self) -> Result<(), (&'static str, String)> {
        use gantry_proto::groups::{check_group_cidr, MAX_GROUP_MTU, MIN_GROUP_MTU};
        check_group_cidr("group_pool", &self.group_pool).map_err(|e| ("group_pool", e.message))?;
        if !(MIN_GROUP_MTU..=MAX_GROUP_MTU).contains(&self.group_mtu) {
            return Err((
                "group_mtu",
                format!("must be {MIN_GROUP_MTU} to {MAX_GROUP_MTU} (the underlay MTU less 50)"),
            ));
        }
        Ok(())
    }

    fn check_metrics(&self) -> Result<(), (&'static str, String)> {
        let m = &self.metrics;
        if m.raw_retention_secs < 120 {
            return Err((
                "metrics.raw_retention_secs",
                "must be at least 120 (the one-minute means are made from raw samples)".into(),
            ));
        }
        if m.minute_retention_secs < 7200 || m.minute_retention_secs < m.raw_retention_secs {
            return Err((
                "metrics.minute_retention_secs",
                "must be at least 7200 and not below metrics.raw_retention_secs".into(),
            ));
        }
        if m.hour_retention_secs < m.minute_retention_secs {
            return Err((
                "metrics.hour_retention_secs",
                "must not be below metrics.minute_retention_secs".into(),
            ));
        }
        if !(1..=86_400).contains(&m.prometheus_min_window_secs) {
            return Err((
                "metrics.prometheus_min_window_secs",
                "must be 1 to 86400".into(),
            ));
        }
        if let Some(u) = &m.prometheus_url {
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err((
                    "metrics.prometheus_url",
                    "must be an http:// or https:// URL with a host".into(),
                ));
            }
        }
        Ok(())
    }

    /// Where the secret key lives.
    pub fn secret_key_path(&self, state_dir: &Path) -> PathBuf {
        self.secret_key_file
            .clone()
            .unwrap_or_else(|| state_dir.join("secret.key"))
    }

    /// A host's HTTPS domain: `<hostname_for(name)>.<suffix>`, when a
    /// suffix is configured.
    pub fn host_domain(&self, host_name: &str) -> Option<String> {
        let suffix = self.host_domain_suffix.as_ref()?;
        Some(format!("{}.{suffix}", net::hostname_for(host_name)))
    }

    /// The database URL, defaulting to SQLite in `state_dir`.
    pub fn database_url(&self, state_dir: &Path) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                state_dir.join("controller.db").display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listen = \"0.0.0.0:9000\"\ncolour = 1\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        std::fs::write(&p, "rate_limit_per_second = 0\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("rate_limit_per_second: must be greater than 0"),
            "{e}"
        );
        std::fs::write(&p, "listen = \"0.0.0.0:9000\"\nmin_root_disk_gib = 80\n").unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.min_root_disk_gib, 80);
        assert_eq!(c.rate_limit_burst, 100);
        assert_eq!(c.access_network.to_string(), "10.200.0.0/16");
        assert_eq!((c.access_subnet_prefix, c.port_range_end), (24, 29999));
        assert_eq!(c.leader_lease_secs, 10);
        std::fs::write(&p, "leader_lease_secs = 0\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("leader_lease_secs: must be 1 to 3600"), "{e}");
    }

    #[test]
    fn access_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let bad = [
            ("access_network = \"10.200.0.1/16\"\n", "host bits"),
            ("access_subnet_prefix = 8\n", "access_subnet_prefix"),
            ("access_subnet_prefix = 31\n", "access_subnet_prefix"),
            ("port_range_start = 30000\n", "port_range_end"),
            ("host_domain_suffix = \"Gpu_Cloud\"\n", "host_domain_suffix"),
            (
                "group_pool = \"8.8.0.0/16\"\n",
                "group_pool: 8.8.0.0/16 is not a private",
            ),
            ("group_pool = \"10.0.0.0/30\"\n", "group_pool"),
            ("group_mtu = 9000\n", "group_mtu: must be 576 to 8950"),
            ("group_mtu = 100\n", "group_mtu"),
        ];
        for (text, want) in bad {
            std::fs::write(&p, text).unwrap();
            let e = Config::load(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        std::fs::write(
            &p,
            "access_network = \"10.10.0.0/20\"\naccess_subnet_prefix = 26\n\
             host_domain_suffix = \"gpu.example.com\"\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(
            c.host_domain("GPU_1").as_deref(),
            Some("gpu-1.gpu.example.com")
        );
        assert_eq!(c.secret_key_path(dir.path()), dir.path().join("secret.key"));
        assert_eq!(
            (c.group_pool.to_string(), c.group_mtu),
            ("172.16.0.0/12".into(), 1450)
        );
        std::fs::write(&p, "group_pool = \"10.64.0.0/16\"\ngroup_mtu = 8950\n").unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(
            (c.group_pool.to_string(), c.group_mtu),
            ("10.64.0.0/16".into(), 8950)
        );
    }

    #[test]
    fn http_limits_default_and_are_checked() {
        let c = Config::default();
        assert_eq!(
            (
                c.http_header_timeout_ms,
                c.http_body_timeout_ms,
                c.http_idle_timeout_ms,
                c.http_max_connections,
                c.shutdown_timeout_ms
            ),
            (10_000, 30_000, 60_000, 4096, 20_000)
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for (text, want) in [
            (
                "http_header_timeout_ms = 0\n",
                "http_header_timeout_ms: must be 1 to",
            ),
            (
                "http_max_connections = 0\n",
                "http_max_connections: must be 1 to",
            ),
            (
                "shutdown_timeout_ms = 4000000\n",
                "shutdown_timeout_ms: must be 1 to",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = Config::load(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        std::fs::write(
            &p,
            "http_body_timeout_ms = 500\nhttp_max_connections = 10\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!((c.http_body_timeout_ms, c.http_max_connections), (500, 10));
    }

    #[test]
    fn metrics_section_defaults_and_is_checked() {
        let c = Config::default();
        let m = &c.metrics;
        assert_eq!(
            (
                m.raw_retention_secs,
                m.minute_retention_secs,
                m.hour_retention_secs
            ),
            (3600, 7 * 86_400, 90 * 86_400)
        );
        assert!(m.prometheus_url.is_none());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for (text, want) in [
            (
                "[metrics]\nraw_retention_secs = 10\n",
                "metrics.raw_retention_secs",
            ),
            (
                "[metrics]\nhour_retention_secs = 7200\n",
                "metrics.hour_retention_secs",
            ),
            (
                "[metrics]\nprometheus_url = \"ftp://x/\"\n",
                "metrics.prometheus_url",
            ),
            ("[metrics]\ncolour = 1\n", "colour"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = Config::load(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        std::fs::write(
            &p,
            "[metrics]\nprometheus_url = \"http://127.0.0.1:9090/\"\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(
            c.metrics.prometheus_url.map(|u| u.to_string()).as_deref(),
            Some("http://127.0.0.1:9090/")
        );
    }
}
