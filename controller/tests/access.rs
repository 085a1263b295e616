//! Instance access over real HTTP, each test on SQLite and on PostgreSQL:
//! host subnets and instance addresses (IPAM), host ports, concurrent
//! creates, the port-forward API and its refusals, the host's access state
//! in the work long poll, and the Access view. Passwords, SSH keys and
//! certificates are in `credentials.rs`.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use gantry_controller::Config;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

on_both!(addresses_and_ports);
on_both!(port_range_exhaustion, |c: &mut Config| {
    c.port_range_end = c.port_range_start + 4;
});
on_both!(concurrent_creates_get_distinct_addresses_and_ports);
on_both!(forward_api);
on_both!(access_view_without_domain);
on_both!(access_view_with_domain, |c: &mut Config| {
    c.host_domain_suffix = Some("gpu.example.net".into());
});

/// A tenant, a CPU flavor and an image; returns (tenant token, flavor, image).
async fn basics(s: &Server) -> (String, String, String) {
    let (_, t) = s.account("acme").await;
    let f = s.flavor("cpu", None, 0).await;
    let img = s.image("ubuntu").await;
    (t, f, img)
}

async fn create(s: &Server, t: &str, name: &str, f: &str, img: &str) -> String {
    let r = s
        .post(
            "/v1/instances",
            t,
            json!({"name": name, "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    r.id()
}

/// The `Create` command of `id` in its host's work.
async fn create_cmd(s: &Server, id: &str) -> Value {
    let op = s.op_of(id).await.expect("a create operation");
    assert_eq!(op["command"]["kind"], "create", "{op}");
    op["command"].clone()
}

async fn access(s: &Server, t: &str, id: &str) -> Value {
    s.ok(
        Method::GET,
        &format!("/v1/instances/{id}/access"),
        t,
        None,
        200,
    )
    .await
}

/// (guest port, protocol) -> host port of an instance's forwards.
async fn ports(s: &Server, t: &str, id: &str) -> Vec<(u64, String, u64)> {
    let a = access(s, t, id).await;
    a["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["guest_port"].as_u64().unwrap(),
                f["protocol"].as_str().unwrap().to_string(),
                f["host_port"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn add_forward(s: &Server, t: &str, id: &str, body: Value) -> common::Reply {
    s.post(&format!("/v1/instances/{id}/forwards"), t, body)
        .await
}

async fn addresses_and_ports(s: Server) {
    let (t, f, img) = basics(&s).await;
    let a = s.host("a", "H100", 0).await;
    let i1 = create(&s, &t, "one", &f, &img).await;
    let i2 = create(&s, &t, "two", &f, &img).await;
    // The lowest free addresses from .2; the MAC follows the address.
    let nic = &create_cmd(&s, &i1).await["spec"]["nic"];
    assert_eq!(
        nic,
        &json!({"mac": "52:54:00:c8:00:02", "ip": "10.200.0.2",
            "subnet": "10.200.0.0/24", "gateway": "10.200.0.1"})
    );
    let nic2 = &create_cmd(&s, &i2).await["spec"]["nic"];
    assert_eq!(
        (nic2["ip"].as_str(), nic2["mac"].as_str()),
        (Some("10.200.0.3"), Some("52:54:00:c8:00:03"))
    );
    assert_eq!(access(&s, &t, &i2).await["private_ip"], "10.200.0.3");
    // SSH and JupyterLab, lowest free host ports.
    let tcp = |g: u64, h: u64| (g, "tcp".to_string(), h);
    assert_eq!(
        ports(&s, &t, &i1).await,
        vec![tcp(22, 20000), tcp(8888, 20001)]
    );
    assert_eq!(
        ports(&s, &t, &i2).await,
        vec![tcp(22, 20002), tcp(8888, 20003)]
    );
    // A second host gets the next subnet when it first polls for work.
    let b = s.host("b", "H100", 0).await;
    let w = s.work(&b, 0).await;
    assert_eq!(
        (
            w["access"]["subnet"].as_str(),
            w["access"]["gateway"].as_str()
        ),
        (Some("10.200.1.0/24"), Some("10.200.1.1"))
    );
    // tcp and udp may share a number; freed ports are reused.
    let r = add_forward(&s, &t, &i1, json!({"guest_port": 53, "protocol": "udp"})).await;
    assert_eq!(
        (r.status, r.body["host_port"].as_u64()),
        (201, Some(20000)),
        "{}",
        r.body
    );
    let r = add_forward(&s, &t, &i1, json!({"guest_port": 8080})).await;
    assert_eq!(r.body["host_port"], 20004, "{}", r.body);
    let del = format!("/v1/instances/{i1}/forwards/{}", r.id());
    assert_eq!(s.call(Method::DELETE, &del, &t, None).await.status, 204);
    let r = add_forward(&s, &t, &i2, json!({"guest_port": 9000})).await;
    assert_eq!(r.body["host_port"], 20004, "{}", r.body);
    released_frees(&s, &t, &a, &i1, &i2, &f, &img).await;
}

/// Releasing frees nothing until the host reports the instance Released.
async fn released_frees(s: &Server, t: &str, a: &str, i1: &str, i2: &str, f: &str, img: &str) {
    let tcp = |g: u64, h: u64| (g, "tcp".to_string(), h);
    // Releasing frees nothing until the host reports the instance Released.
    let act = format!("/v1/instances/{i1}/actions");
    s.observe(i1, "Running").await;
    s.observe(i2, "Running").await;
    assert_eq!(
        s.post(&act, t, json!({"action": "release"})).await.status,
        202
    );
    let i3 = create(s, t, "three", f, img).await;
    assert_eq!(create_cmd(s, &i3).await["spec"]["nic"]["ip"], "10.200.0.4");
    assert_eq!(
        ports(s, t, &i3).await,
        vec![tcp(22, 20005), tcp(8888, 20006)]
    );
    s.observe(i1, "Released").await;
    let i4 = create(s, t, "four", f, img).await;
    assert_eq!(create_cmd(s, &i4).await["spec"]["nic"]["ip"], "10.200.0.2");
    assert_eq!(
        ports(s, t, &i4).await,
        vec![tcp(22, 20000), tcp(8888, 20001)]
    );
    let w = s.work(a, 0).await;
    let udp: Vec<&Value> = w["access"]["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["protocol"] == "udp")
        .collect();
    assert!(
        udp.is_empty(),
        "the released instance's udp forward is gone: {w}"
    );
}

async fn port_range_exhaustion(s: Server) {
    let (t, f, img) = basics(&s).await;
    s.host("a", "H100", 0).await;
    let i1 = create(&s, &t, "one", &f, &img).await;
    create(&s, &t, "two", &f, &img).await;
    let r = add_forward(&s, &t, &i1, json!({"guest_port": 8080})).await;
    assert_eq!((r.status, r.body["host_port"].as_u64()), (201, Some(20004)));
    let r = add_forward(&s, &t, &i1, json!({"guest_port": 8081})).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("no free host port"), "{}", r.body);
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "three", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("no free host port"), "{}", r.body);
    let r = add_forward(&s, &t, &i1, json!({"guest_port": 8081, "protocol": "udp"})).await;
    assert_eq!((r.status, r.body["host_port"].as_u64()), (201, Some(20000)));
}

async fn concurrent_creates_get_distinct_addresses_and_ports(s: Server) {
    let (t, f, img) = basics(&s).await;
    s.host("a", "H100", 0).await;
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (s, t, f, img) = (s.clone(), t.clone(), f.clone(), img.clone());
        tasks.push(tokio::spawn(async move {
            create(&s, &t, &format!("r{i}"), &f, &img).await
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    let (mut ips, mut host_ports) = (HashSet::new(), HashSet::new());
    for id in &ids {
        let a = access(&s, &t, id).await;
        assert!(
            ips.insert(a["private_ip"].as_str().unwrap().to_string()),
            "{a}"
        );
        for f in a["forwards"].as_array().unwrap() {
            assert!(host_ports.insert(f["host_port"].as_u64().unwrap()), "{a}");
        }
    }
    let want_ips: HashSet<String> = (2..18).map(|n| format!("10.200.0.{n}")).collect();
    assert_eq!(ips, want_ips);
    assert_eq!(host_ports, (20000..20032).collect::<HashSet<u64>>());
}

async fn forward_api(s: Server) {
    let (t, f, img) = basics(&s).await;
    let (_, other) = s.account("other").await;
    let host = s.host("a", "H100", 0).await;
    let id = create(&s, &t, "one", &f, &img).await;
    let fwds = format!("/v1/instances/{id}/forwards");
    // Every refusal names its field.
    for (body, field) in [
        (json!({"guest_port": 0}), "guest_port"),
        (
            json!({"guest_port": 53, "protocol": "udp", "https": true}),
            "https",
        ),
        (json!({"guest_port": 80, "label": "x".repeat(41)}), "label"),
        (json!({"guest_port": 80, "label": "a\u{7}b"}), "label"),
    ] {
        let r = s.post(&fwds, &t, body.clone()).await;
        assert_eq!(
            (r.status, r.field()),
            (422, field.to_string()),
            "{body}: {}",
            r.body
        );
    }
    let r = s.post(&fwds, &t, json!({"guest_port": 22})).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.error().contains("already forwards guest port 22/tcp"),
        "{}",
        r.body
    );
    // Another account's instance does not exist for it.
    assert_eq!(
        s.post(&fwds, &other, json!({"guest_port": 80}))
            .await
            .status,
        404
    );
    assert_eq!(s.get(&fwds, &other).await.status, 404);
    poll_wakes(&s, &t, &other, &host, &id, &f, &img).await;
}

/// The host's long poll wakes with the new access state.
async fn poll_wakes(s: &Server, t: &str, other: &str, host: &str, id: &str, f: &str, img: &str) {
    let fwds = format!("/v1/instances/{id}/forwards");
    // The host's long poll wakes with the new access state.
    s.observe(id, "Running").await;
    let w = s.work(host, 0).await;
    let rev = w["access"]["rev"].as_u64().unwrap();
    let fp = w["tls"]["fingerprint"].as_str().unwrap().to_string();
    let cred = s.cred(host);
    let poll = {
        let url = format!(
            "{}/v1/agent/work?wait_secs=20&access_rev={rev}&tls={fp}",
            s.url
        );
        let http = s.http.clone();
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(cred).send().await.unwrap();
            (Instant::now(), r.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s
        .post(
            &fwds,
            t,
            json!({"guest_port": 3000, "https": true, "label": "Grafana"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let added = Instant::now();
    let fwd = r.id();
    let (answered, w) = poll.await.unwrap();
    assert!(
        answered.duration_since(added) < Duration::from_secs(5),
        "the poll was not woken"
    );
    assert_eq!(w["access"]["rev"], rev + 1, "{w}");
    assert!(w["access"]["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["id"] == fwd.as_str()));
    // Without news the poll waits; with the current rev there is no access.
    assert!(s.work_q(host, &format!("access_rev={}", rev + 1)).await["access"].is_null());
    let quiet = Instant::now();
    let cred = s.cred(host);
    let url = format!("/v1/agent/work?wait_secs=1&access_rev={}&tls={fp}", rev + 1);
    let w = s.ok(Method::GET, &url, &cred, None, 200).await;
    assert!(
        quiet.elapsed() >= Duration::from_millis(900),
        "no news: the poll waits"
    );
    assert!(w["access"].is_null() && w["tls"].is_null(), "{w}");
    edit_and_delete(s, t, other, id, &fwd).await;
    gated(s, t, f, img).await;
}

async fn edit_and_delete(s: &Server, t: &str, other: &str, id: &str, fwd: &str) {
    let one = format!("/v1/instances/{id}/forwards/{fwd}");
    let r = s
        .call(Method::PATCH, &one, t, Some(json!({"protocol": "udp"})))
        .await;
    assert_eq!(
        (r.status, r.field()),
        (422, "protocol".to_string()),
        "{}",
        r.body
    );
    let r = s
        .call(Method::PATCH, &one, t, Some(json!({"guest_port": 22})))
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = s
        .call(
            Method::PATCH,
            &one,
            t,
            Some(json!({"https": false, "protocol": "udp", "label": "dns"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The host port stays when it is free for the new protocol.
    assert_eq!(
        (r.body["protocol"].as_str(), r.body["host_port"].as_u64()),
        (Some("udp"), Some(20002))
    );
    assert_eq!(r.body["url"], "udp://a.example:20002");
    assert_eq!(
        s.call(Method::PATCH, &one, other, Some(json!({})))
            .await
            .status,
        404
    );
    assert_eq!(s.call(Method::DELETE, &one, other, None).await.status, 404);
    let list = s.get(&format!("/v1/instances/{id}/forwards"), t).await.body;
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    // Deleting SSH is the user's choice.
    let ssh = list
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["guest_port"] == 22)
        .unwrap();
    let path = format!(
        "/v1/instances/{id}/forwards/{}",
        ssh["id"].as_str().unwrap()
    );
    assert_eq!(s.call(Method::DELETE, &path, t, None).await.status, 204);
    assert_eq!(s.call(Method::DELETE, &path, t, None).await.status, 404);
    assert!(s.get(&format!("/v1/instances/{id}/access"), t).await.body["ssh_command"].is_null());
    // The limit per instance.
    let fwds = format!("/v1/instances/{id}/forwards");
    for p in 0..30u16 {
        s.post(&fwds, t, json!({"guest_port": 10000 + p})).await;
    }
    let r = s.post(&fwds, t, json!({"guest_port": 11000})).await;
    assert_eq!(
        (r.status, r.field()),
        (422, "forwards".to_string()),
        "{}",
        r.body
    );
}

/// Forwards cannot change while the instance is Snapshotting or Released.
async fn gated(s: &Server, t: &str, f: &str, img: &str) {
    let id = create(s, t, "gated", f, img).await;
    s.observe(&id, "Running").await;
    let fwds = format!("/v1/instances/{id}/forwards");
    let r = s
        .post(
            &format!("/v1/instances/{id}/snapshots"),
            t,
            json!({"name": "s1"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    s.observe(&id, "Snapshotting").await;
    let r = s.post(&fwds, t, json!({"guest_port": 80})).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("Snapshotting"), "{}", r.body);
    assert_eq!(s.get(&fwds, t).await.status, 409);
    s.observe(&id, "Running").await;
    s.finish_snapshot(&id, 1 << 30, 1 << 20).await;
    let r = s
        .post(
            &format!("/v1/instances/{id}/actions"),
            t,
            json!({"action": "release"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    s.observe(&id, "Released").await;
    let r = s.post(&fwds, t, json!({"guest_port": 80})).await;
    assert_eq!(r.status, 409);
    assert!(r.error().contains("Released"), "{}", r.body);
}

async fn access_view_without_domain(s: Server) {
    let (t, f, img) = basics(&s).await;
    s.host("a", "H100", 0).await;
    let id = create(&s, &t, "one", &f, &img).await;
    add_forward(
        &s,
        &t,
        &id,
        json!({"guest_port": 6006, "https": true, "label": "TensorBoard"}),
    )
    .await;
    let a = access(&s, &t, &id).await;
    assert_eq!(a["ssh_command"], "ssh -p 20000 root@a.example");
    assert_eq!(a["ssh_user"], "root");
    assert_eq!(a["password_set"], true);
    assert_eq!(a["ca_certificate_path"], "/v1/ca.pem");
    let url = a["jupyter_url"].as_str().unwrap();
    let token = url
        .strip_prefix("https://a.example:20001/lab?token=")
        .expect(url);
    assert!(
        token.len() == 48 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{url}"
    );
    let f: Vec<&Value> = a["forwards"].as_array().unwrap().iter().collect();
    assert_eq!(f[0]["url"], "tcp://a.example:20000");
    assert_eq!(
        (f[0]["label"].as_str(), f[0]["https"].as_bool()),
        (Some("SSH"), Some(false))
    );
    assert_eq!(f[1]["url"], "https://a.example:20002/");
    assert_eq!(f[2]["label"], "JupyterLab");
    assert!(f.iter().all(|f| f["domain_url"].is_null()), "{a}");
    // The Create command carries the same token.
    let guest = &create_cmd(&s, &id).await["spec"]["guest"];
    assert_eq!(guest["jupyter_token"], token);
    assert_eq!(guest["hostname"], "one");
}

async fn access_view_with_domain(s: Server) {
    let (t, f, img) = basics(&s).await;
    let host = s.host("gpu_1", "H100", 0).await;
    let id = create(&s, &t, "one", &f, &img).await;
    let w = s.work(&host, 0).await;
    assert_eq!(w["access"]["domain"], "gpu-1.gpu.example.net", "{w}");
    let a = access(&s, &t, &id).await;
    let jl = format!("https://8888-{id}.gpu-1.gpu.example.net/lab?token=");
    assert!(a["jupyter_url"].as_str().unwrap().starts_with(&jl), "{a}");
    // A listener off 443 shows in the domain URLs.
    let r = s.heartbeat(&host, json!({"https_port": 8443})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let a = access(&s, &t, &id).await;
    let j = a["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["guest_port"] == 8888)
        .unwrap();
    assert_eq!(
        j["domain_url"],
        format!("https://8888-{id}.gpu-1.gpu.example.net:8443/")
    );
    assert_eq!(j["url"], "https://gpu_1.example:20001/");
    let h = s.get(&format!("/v1/admin/hosts/{host}"), ADMIN).await.body;
    assert_eq!(
        (
            h["access_subnet"].as_str(),
            h["domain"].as_str(),
            h["https_port"].as_u64()
        ),
        (
            Some("10.200.0.0/24"),
            Some("gpu-1.gpu.example.net"),
            Some(8443)
        )
    );
    assert_eq!(
        s.heartbeat(&host, json!({"https_port": 0})).await.field(),
        "https_port"
    );
}

#[tokio::test]
async fn forwards_survive_the_migration_sqlite() {
    forwards_survive_the_migration(common::Backend::Sqlite).await;
}

#[tokio::test]
#[ignore = "needs PostgreSQL: ./scripts/test runs it"]
async fn forwards_survive_the_migration_postgres() {
    forwards_survive_the_migration(common::Backend::Postgres).await;
}

/// Rows of the old `port_forwards` become TCP forwards with ids, the
/// instance's account and `SSH` as the label of guest port 22.
async fn forwards_survive_the_migration(backend: common::Backend) {
    use gantry_proto::ids::*;
    use sqlx::Row;
    let dir = tempfile::tempdir().unwrap();
    let Some((pool, url)) = common::db_before_migration(backend, dir.path(), 4).await else {
        return;
    };
    let (a, h) = seed_v3(&pool).await;
    pool.close().await;
    let db = gantry_controller::db::Db::connect(&url, 2).await.unwrap();
    let rows = sqlx::query(
        "SELECT id, account_id, protocol, host_port, guest_port, https, label, created_ms \
         FROM port_forwards ORDER BY host_port",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut ids = HashSet::new();
    let mut seen = Vec::new();
    for r in &rows {
        let id: String = r.try_get("id").unwrap();
        assert!(ids.insert(id.parse::<ForwardId>().expect("a forward id")));
        assert_eq!(r.try_get::<String, _>("account_id").unwrap(), a.to_string());
        assert_eq!(r.try_get::<i64, _>("created_ms").unwrap(), 7);
        seen.push((
            r.try_get::<String, _>("protocol").unwrap(),
            r.try_get::<i64, _>("host_port").unwrap(),
            r.try_get::<i64, _>("guest_port").unwrap(),
            r.try_get::<i64, _>("https").unwrap(),
            r.try_get::<String, _>("label").unwrap(),
        ));
    }
    let tcp = |h, g, l: &str| ("tcp".to_string(), h, g, 0, l.to_string());
    assert_eq!(seen, vec![tcp(20000, 22, "SSH"), tcp(20001, 8080, "")]);
    // The new constraints hold.
    let dup = sqlx::query(
        "INSERT INTO port_forwards (id, host_id, instance_id, account_id, protocol, host_port, \
         guest_port, created_ms) VALUES ($1, $2, 'ins-x', $3, 'tcp', 20000, 1, 1)",
    )
    .bind(ForwardId::new().to_string())
    .bind(h.to_string())
    .bind(a.to_string())
    .execute(&db.pool)
    .await;
    assert!(dup.is_err(), "(host, protocol, host_port) is unique");
}

/// An account, flavor, host and instance with two forwards, in a version 3
/// database.
async fn seed_v3(
    pool: &sqlx::AnyPool,
) -> (gantry_proto::ids::AccountId, gantry_proto::ids::HostId) {
    use gantry_proto::ids::*;
    let (a, f, h, i) = (
        AccountId::new(),
        FlavorId::new(),
        HostId::new(),
        InstanceId::new(),
    );
    for sql in [
        format!("INSERT INTO accounts (id, name, snapshot_quota_gib, created_ms) VALUES ('{a}', 'a', 1, 5)"),
        format!(
            "INSERT INTO flavors (id, name, vcpus, memory_mib, root_disk_gib, gpu_count, \
             price_micros_per_hour, created_ms) VALUES ('{f}', 'f', 1, 1024, 10, 0, 1, 5)"
        ),
        format!(
            "INSERT INTO hosts (id, name, address, vcpus, memory_mib, disk_gib, health, \
             last_heartbeat_ms, created_ms) VALUES ('{h}', 'h', 'h.example', 8, 8192, 100, \
             'healthy', 5, 5)"
        ),
        format!(
            "INSERT INTO instances (id, account_id, name, flavor_id, host_id, desired_state, \
             observed_state, state_since_ms, root_disk_gib, created_ms) VALUES ('{i}', '{a}', \
             'old', '{f}', '{h}', 'Running', 'Running', 5, 10, 7)"
        ),
        format!(
            "INSERT INTO port_forwards (host_id, host_port, instance_id, guest_port) VALUES \
             ('{h}', 20000, '{i}', 22), ('{h}', 20001, '{i}', 8080)"
        ),
    ] {
        sqlx::query(&sql).execute(pool).await.unwrap();
    }
    (a, h)
}
