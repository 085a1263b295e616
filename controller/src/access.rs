//! Instance access, the controller's half: each host's access subnet (the
//! lowest free `access_subnet_prefix` block of `access_network`, taken
//! when the host first needs one), instance addresses (the lowest free
//! from `.2`; the gateway is `.1`), host ports for port forwards (the
//! lowest free in `[port_range_start, port_range_end]` per host and
//! protocol), the host's access state as its agent gets it, and the URLs
//! tenants see.
//!
//! Allocation reads what is taken and inserts the lowest free value inside
//! the caller's write transaction; unique constraints (`hosts.
//! access_subnet`, `ip_leases (host_id, ip)`, `port_forwards (host_id,
//! protocol, host_port)`) turn a lost race into [`AccessError::Taken`],
//! and the caller retries with a fresh transaction. Subnets, which every
//! host's first allocation races for, take turns on PostgreSQL instead
//! ([`ensure_subnet`]; SQLite has one writer). Every change to a
//! host's forwards moves `hosts.access_rev` ([`bump`]) in the same
//! transaction; the caller wakes the host's long poll after the commit.

use crate::db::{col, parsed, Backend, DbError, Tx};
use crate::Config;
use gantry_proto::ids::{AccountId, ForwardId, HostId, InstanceId};
use gantry_proto::net::{ForwardSpec, HostAccess, Ipv4Net, Protocol};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The pool is used up; the sentence says which.
    #[error("{0}")]
    Exhausted(String),
    /// Another transaction took the value first (a unique constraint).
    #[error("an address or port was taken by another request")]
    Taken,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for AccessError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_unique_violation(&e) {
            Self::Taken
        } else {
            Self::Db(DbError::Sqlx(e))
        }
    }
}

/// The lowest block of `/prefix` inside `net` that overlaps none of `taken`.
pub fn lowest_free_subnet(net: Ipv4Net, prefix: u8, taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    if prefix < net.prefix() || prefix > 32 {
        return None;
    }
    let step = 1u64 << (32 - prefix as u32);
    let base = u64::from(u32::from(net.network()));
    (0..net.size() / step)
        .filter_map(|i| Ipv4Net::new(Ipv4Addr::from((base + i * step) as u32), prefix).ok())
        .find(|c| !taken.iter().any(|t| t.overlaps(c)))
}

/// The lowest address of `subnet` from `.2` up (never the network, the
/// gateway `.1` or the broadcast address) not in `taken`.
pub fn lowest_free_address(subnet: Ipv4Net, taken: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let last = subnet.size().saturating_sub(2);
    (2..=last)
        .filter_map(|n| subnet.nth(n as u32))
        .find(|ip| !taken.contains(ip))
}

/// The gateway (bridge) address of a subnet: its `.1`.
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.nth(1).unwrap_or(subnet.network())
}

fn corrupt(table: &'static str, message: String) -> DbError {
    DbError::Corrupt { table, message }
}

/// The host's access subnet, allocating the lowest free one if it has none.
pub async fn ensure_subnet(
    tx: &mut Tx,
    cfg: &Config,
    host: &HostId,
) -> Result<Ipv4Net, AccessError> {
    if let Some(s) = host_subnet(tx, host).await? {
        return Ok(s);
    }
    if tx.backend() == Backend::Postgres {
        // Writers run side by side on PostgreSQL: allocations take turns,
        // else creates landing on fresh hosts at once all pick the same
        // lowest block and all but one fail. The host's row first (every
        // caller's order), then the allocation lock, then a fresh look.
        sqlx::query("SELECT id FROM hosts WHERE id = $1 FOR UPDATE")
            .bind(host.to_string())
            .execute(&mut **tx)
            .await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SUBNET_LOCK)
            .execute(&mut **tx)
            .await?;
        if let Some(s) = host_subnet(tx, host).await? {
            return Ok(s);
        }
    }
    let found = sqlx::query("SELECT access_subnet FROM hosts WHERE access_subnet IS NOT NULL")
        .fetch_all(&mut **tx)
        .await?;
    let mut taken = Vec::with_capacity(found.len());
    for r in &found {
        taken.push(parsed::<Ipv4Net>(r, "access_subnet", "hosts")?);
    }
    let (net, prefix) = (cfg.access_network, cfg.access_subnet_prefix);
    let subnet = lowest_free_subnet(net, prefix, &taken).ok_or_else(|| {
        AccessError::Exhausted(format!(
            "access_network {net} has no free /{prefix} subnet left for host {host}"
        ))
    })?;
    let done =
        sqlx::query("UPDATE hosts SET access_subnet = $1 WHERE id = $2 AND access_subnet IS NULL")
            .bind(subnet.to_string())
            .bind(host.to_string())
            .execute(&mut **tx)
            .await?;
    if done.rows_affected() != 1 {
        return Err(AccessError::Taken);
    }
    tracing::info!(%host, %subnet, "host access subnet allocated");
    Ok(subnet)
}

/// The key of PostgreSQL's transaction-scoped advisory lock that subnet
/// allocations take turns under ("GSUBNET\0" as bytes).
const SUBNET_LOCK: i64 = 0x4753_5542_4e45_5400;

/// The host's access subnet, if it has one.
async fn host_subnet(tx: &mut Tx, host: &HostId) -> Result<Option<Ipv4Net>, AccessError> {
    let row = sqlx::query("SELECT access_subnet FROM hosts WHERE id = $1")
        .bind(host.to_string())
        .fetch_one(&mut **tx)
        .await?;
    col::<Option<String>>(&row, "access_subnet")?
        .map(|s| {
            s.parse()
                .map_err(|e| corrupt("hosts", format!("access_subnet: {e}")).into())
        })
        .transpose()
}

/// Leases the lowest free address of `subnet` on `host` to `instance`.
pub async fn lease_address(
    tx: &mut Tx,
    host: &HostId,
    subnet: Ipv4Net,
    instance: InstanceId,
) -> Result<Ipv4Addr, AccessError> {
    let found = sqlx::query("SELECT ip FROM ip_leases WHERE host_id = $1")
        .bind(host.to_string())
        .fetch_all(&mut **tx)
        .await?;
    let mut taken = HashSet::with_capacity(found.len());
    for r in &found {
        taken.insert(parsed::<Ipv4Addr>(r, "ip", "ip_leases")?);
    }
    let ip = lowest_free_address(subnet, &taken).ok_or_else(|| {
        AccessError::Exhausted(format!(
            "host {host} has no free address left in its access subnet {subnet}"
        ))
    })?;
    sqlx::query("INSERT INTO ip_leases (host_id, ip, instance_id) VALUES ($1, $2, $3)")
        .bind(host.to_string())
        .bind(ip.to_string())
        .bind(instance.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(ip)
}

/// Whether `port` is free for `protocol` on `host`.
async fn port_free(
    tx: &mut Tx,
    host: &HostId,
    protocol: Protocol,
    port: i64,
) -> Result<bool, AccessError> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM port_forwards WHERE host_id = $1 AND protocol = $2 \
         AND host_port = $3",
    )
    .bind(host.to_string())
    .bind(protocol.as_str())
    .bind(port)
    .fetch_one(&mut **tx)
    .await?;
    Ok(col::<i64>(&row, "n")? == 0)
}

/// The lowest free host port for `protocol` on `host` in the configured
/// range, preferring `keep` when it is free.
pub async fn free_port(
    tx: &mut Tx,
    cfg: &Config,
    host: &HostId,
    protocol: Protocol,
    keep: Option<u16>,
) -> Result<u16, AccessError> {
    if let Some(k) = keep {
        if port_free(tx, host, protocol, k.into()).await? {
            return Ok(k);
        }
    }
    let (start, end) = (
        i64::from(cfg.port_range_start),
        i64::from(cfg.port_range_end),
    );
    if port_free(tx, host, protocol, start).await? {
        return Ok(start as u16);
    }
    // The lowest used port in the range whose successor is free.
    let row = sqlx::query(
        "SELECT MIN(p.host_port) AS m FROM port_forwards p WHERE p.host_id = $1 \
         AND p.protocol = $2 AND p.host_port >= $3 AND p.host_port < $4 AND NOT EXISTS \
         (SELECT 1 FROM port_forwards q WHERE q.host_id = $1 AND q.protocol = $2 \
         AND q.host_port = p.host_port + 1)",
    )
    .bind(host.to_string())
    .bind(protocol.as_str())
    .bind(start)
    .bind(end)
    .fetch_one(&mut **tx)
    .await?;
    match col::<Option<i64>>(&row, "m")? {
        Some(m) => Ok((m + 1) as u16),
        None => Err(AccessError::Exhausted(format!(
            "no free host port: host {host} has no free {protocol} port left in \
             {start}-{end}"
        ))),
    }
}

/// A forward as requested (its host port is allocated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewForward {
    pub protocol: Protocol,
    pub guest_port: u16,
    pub https: bool,
    pub label: String,
}

/// One `port_forwards` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRow {
    pub id: ForwardId,
    pub host: HostId,
    pub instance: InstanceId,
    pub protocol: Protocol,
    pub host_port: u16,
    pub guest_port: u16,
    pub https: bool,
    pub label: String,
}

pub const FORWARD_COLS: &str =
    "id, host_id, instance_id, protocol, host_port, guest_port, https, label";

pub fn forward_row(r: &sqlx::any::AnyRow) -> Result<ForwardRow, DbError> {
    const T: &str = "port_forwards";
    let port = |name: &str| -> Result<u16, DbError> {
        let v: i64 = col(r, name)?;
        u16::try_from(v).map_err(|_| corrupt(T, format!("{name}: {v}")))
    };
    Ok(ForwardRow {
        id: parsed(r, "id", T)?,
        host: parsed(r, "host_id", T)?,
        instance: parsed(r, "instance_id", T)?,
        protocol: parsed(r, "protocol", T)?,
        host_port: port("host_port")?,
        guest_port: port("guest_port")?,
        https: col::<i64>(r, "https")? != 0,
        label: col(r, "label")?,
    })
}

/// Allocates a host port and inserts the forward.
pub async fn insert_forward(
    tx: &mut Tx,
    cfg: &Config,
    host: &HostId,
    instance: InstanceId,
    account: &AccountId,
    f: &NewForward,
) -> Result<ForwardRow, AccessError> {
    let host_port = free_port(tx, cfg, host, f.protocol, None).await?;
    let id = ForwardId::new();
    sqlx::query(
        "INSERT INTO port_forwards (id, host_id, instance_id, account_id, protocol, host_port, \
         guest_port, https, label, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id.to_string())
    .bind(host.to_string())
    .bind(instance.to_string())
    .bind(account.to_string())
    .bind(f.protocol.as_str())
    .bind(i64::from(host_port))
    .bind(i64::from(f.guest_port))
    .bind(f.https as i64)
    .bind(&f.label)
    .bind(crate::db::now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(ForwardRow {
        id,
        host: *host,
        instance,
        protocol: f.protocol,
        host_port,
        guest_port: f.guest_port,
        https: f.https,
        label: f.label.clone(),
    })
}

/// Moves the host's access revision (and locks its row first, so changes
/// to one host's forwards are serialized on PostgreSQL too).
pub async fn bump(tx: &mut Tx, host: &HostId) -> Result<(), DbError> {
    sqlx::query("UPDATE hosts SET access_rev = access_rev + 1 WHERE id = $1")
        .bind(host.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Frees what an instance that reached a final state held here: its
/// address and forwards. Returns whether the host's forwards changed.
pub async fn release(
    tx: &mut Tx,
    host: Option<&HostId>,
    instance: InstanceId,
) -> Result<bool, DbError> {
    let id = instance.to_string();
    sqlx::query("DELETE FROM ip_leases WHERE instance_id = $1")
        .bind(&id)
        .execute(&mut **tx)
        .await?;
    let gone = sqlx::query("DELETE FROM port_forwards WHERE instance_id = $1")
        .bind(&id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    match host {
        Some(h) if gone > 0 => {
            bump(tx, h).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Brings the host's stored domain in line with the config (a change
/// moves the access revision) and gives its subnet, allocating one.
pub async fn prepare_host(
    tx: &mut Tx,
    cfg: &Config,
    host: &HostId,
) -> Result<Ipv4Net, AccessError> {
    let subnet = ensure_subnet(tx, cfg, host).await?;
    let row = sqlx::query("SELECT name, access_domain FROM hosts WHERE id = $1")
        .bind(host.to_string())
        .fetch_one(&mut **tx)
        .await?;
    let want = cfg.host_domain(&col::<String>(&row, "name")?);
    if col::<Option<String>>(&row, "access_domain")? != want {
        sqlx::query(
            "UPDATE hosts SET access_domain = $1, access_rev = access_rev + 1 WHERE id = $2",
        )
        .bind(want)
        .bind(host.to_string())
        .execute(&mut **tx)
        .await?;
    }
    Ok(subnet)
}

/// The host's access state: revision, subnet, gateway, domain, and every
/// forward of its instances that are not Released or Failed.
pub async fn host_access<'e, E>(
    ex: E,
    host: &HostId,
    subnet: Ipv4Net,
) -> Result<(HostAccess, Option<String>), DbError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any> + Copy,
{
    let row = sqlx::query("SELECT access_rev, access_domain FROM hosts WHERE id = $1")
        .bind(host.to_string())
        .fetch_one(ex)
        .await?;
    let sql = format!(
        "SELECT {} FROM port_forwards f WHERE f.host_id = $1 AND EXISTS (SELECT 1 FROM \
         instances i WHERE i.id = f.instance_id AND i.observed_state NOT IN ('Released', \
         'Failed')) ORDER BY f.protocol, f.host_port",
        FORWARD_COLS
            .split(", ")
            .map(|c| format!("f.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let found = sqlx::query(&sql)
        .bind(host.to_string())
        .fetch_all(ex)
        .await?;
    let mut forwards = Vec::with_capacity(found.len());
    for r in &found {
        let f = forward_row(r)?;
        forwards.push(ForwardSpec {
            id: f.id,
            instance: f.instance,
            protocol: f.protocol,
            host_port: f.host_port,
            guest_port: f.guest_port,
            https: f.https,
        });
    }
    let domain: Option<String> = col(&row, "access_domain")?;
    let access = HostAccess {
        rev: col::<i64>(&row, "access_rev")?.max(0) as u64,
        subnet,
        gateway: gateway(subnet),
        domain: domain.clone(),
        forwards,
    };
    Ok((access, domain))
}

/// A host address as the host part of a URL: IPv6 literals in brackets.
pub fn url_host(address: &str) -> String {
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => address.to_string(),
    }
}

/// `https://<address>:<port>/`, `tcp://<address>:<port>` or
/// `udp://<address>:<port>`.
pub fn forward_url(address: &str, protocol: Protocol, https: bool, host_port: u16) -> String {
    let h = url_host(address);
    match (protocol, https) {
        (Protocol::Tcp, true) => format!("https://{h}:{host_port}/"),
        (p, _) => format!("{p}://{h}:{host_port}"),
    }
}

/// `https://<guest_port>-<instance>.<domain>[:<https_port>]/` (the port
/// only when the host's HTTPS listener is not on 443).
pub fn domain_url(
    guest_port: u16,
    instance: InstanceId,
    domain: &str,
    https_port: Option<u16>,
) -> String {
    let name = gantry_proto::net::https_host_name(guest_port, instance, domain);
    match https_port {
        Some(p) if p != 443 => format!("https://{name}:{p}/"),
        _ => format!("https://{name}/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_are_the_lowest_free_block() {
        let n = net("10.200.0.0/16");
        assert_eq!(lowest_free_subnet(n, 24, &[]), Some(net("10.200.0.0/24")));
        let taken = [net("10.200.0.0/24"), net("10.200.2.0/24")];
        assert_eq!(
            lowest_free_subnet(n, 24, &taken),
            Some(net("10.200.1.0/24"))
        );
        // A block overlapping a taken one of another size is skipped too.
        assert_eq!(
            lowest_free_subnet(n, 24, &[net("10.200.0.0/23")]),
            Some(net("10.200.2.0/24"))
        );
        assert_eq!(
            lowest_free_subnet(net("10.0.0.0/24"), 24, &[net("10.0.0.0/24")]),
            None
        );
        assert_eq!(lowest_free_subnet(net("10.0.0.0/24"), 16, &[]), None);
    }

    #[test]
    fn addresses_skip_network_gateway_and_broadcast() {
        let s = net("10.200.3.0/24");
        let mut taken = HashSet::new();
        assert_eq!(
            lowest_free_address(s, &taken),
            Some("10.200.3.2".parse().unwrap())
        );
        taken.insert("10.200.3.2".parse().unwrap());
        taken.insert("10.200.3.4".parse().unwrap());
        assert_eq!(
            lowest_free_address(s, &taken),
            Some("10.200.3.3".parse().unwrap())
        );
        let small = net("10.0.0.0/30");
        assert_eq!(
            lowest_free_address(small, &HashSet::new()),
            Some("10.0.0.2".parse().unwrap())
        );
        let full: HashSet<Ipv4Addr> = ["10.0.0.2".parse().unwrap()].into();
        assert_eq!(lowest_free_address(small, &full), None);
        assert_eq!(gateway(s), "10.200.3.1".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn urls_bracket_ipv6_and_name_the_port_off_443() {
        assert_eq!(
            forward_url("gpu1.example", Protocol::Tcp, true, 20001),
            "https://gpu1.example:20001/"
        );
        assert_eq!(
            forward_url("2001:db8::5", Protocol::Udp, false, 20000),
            "udp://[2001:db8::5]:20000"
        );
        assert_eq!(
            forward_url("10.0.0.5", Protocol::Tcp, false, 20000),
            "tcp://10.0.0.5:20000"
        );
        let i = InstanceId::new();
        assert_eq!(
            domain_url(8888, i, "gpu1.x.io", Some(443)),
            format!("https://8888-{i}.gpu1.x.io/")
        );
        assert_eq!(
            domain_url(8888, i, "gpu1.x.io", None),
            format!("https://8888-{i}.gpu1.x.io/")
        );
        assert_eq!(
            domain_url(80, i, "d.io", Some(8443)),
            format!("https://80-{i}.d.io:8443/")
        );
    }
}
