//! Network groups over real HTTP, each test on SQLite and on PostgreSQL:
//! the group API and its refusals (CIDRs, names, other accounts, deleting
//! a group with members), members joining at create and later, concurrent
//! joins, the hosts' group state in the work answer (local and remote
//! members, VXLAN endpoints from heartbeats, the revision, the long poll
//! woken by a join), addresses freed only once the host reports the
//! instance Released, and the scheduler's pack and spread.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

on_both!(group_api_and_cidrs);
on_both!(members_join_leave_and_delete);
on_both!(concurrent_joins_get_distinct_addresses);
on_both!(host_group_state_in_the_work_answer);
on_both!(release_frees_the_address_when_the_host_reports_it);
on_both!(scheduler_packs_and_spreads_members);

const GROUPS: &str = "/v1/network-groups";

/// A tenant (id, token), a CPU flavor and an image.
async fn basics(s: &Server, name: &str) -> (String, String, String, String) {
    let (a, t) = s.account(name).await;
    let f = s.flavor(&format!("{name}-cpu"), None, 0).await;
    let img = s.image(&format!("{name}-img")).await;
    (a, t, f, img)
}

async fn group(s: &Server, t: &str, body: Value) -> Value {
    s.ok(Method::POST, GROUPS, t, Some(body), 201).await
}

/// Creates an instance (optionally in a group, with a host placement).
async fn instance(s: &Server, t: &str, name: &str, f: &str, img: &str, extra: Value) -> String {
    let mut body = json!({"name": name, "flavor": f, "image": img});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = s.post("/v1/instances", t, body).await;
    assert_eq!(r.status, 202, "{}", r.body);
    r.id()
}

async fn join(s: &Server, t: &str, g: &str, ins: &str) -> common::Reply {
    s.post(
        &format!("{GROUPS}/{g}/members"),
        t,
        json!({"instance": ins}),
    )
    .await
}

async fn tab(s: &Server, t: &str, ins: &str) -> Value {
    let path = format!("/v1/instances/{ins}/network-group");
    s.ok(Method::GET, &path, t, None, 200).await
}

/// A heartbeat announcing the host's VXLAN endpoint (loopback: nothing is
/// sent to it).
async fn vtep(s: &Server, host: &str, port: u16) {
    let r = s
        .heartbeat(
            host,
            json!({"vtep": {"address": "127.0.0.1", "port": port}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn group_api_and_cidrs(s: Server) {
    let (a_id, a) = s.account("acme").await;
    let (_, b) = s.account("other").await;
    // Default CIDRs: the lowest free /24 of the pool, per account.
    let g1 = group(&s, &a, json!({"name": "train"})).await;
    assert_eq!(
        (
            g1["cidr"].as_str(),
            g1["mtu"].as_u64(),
            g1["placement"].as_str()
        ),
        (Some("172.16.0.0/24"), Some(1450), Some("pack")),
        "{g1}"
    );
    let g2 = group(&s, &a, json!({"name": "eval", "placement": "spread"})).await;
    assert_eq!(g2["cidr"], "172.16.1.0/24", "{g2}");
    let gb = group(&s, &b, json!({"name": "train"})).await;
    assert_eq!(gb["cidr"], "172.16.0.0/24", "another account's own range");
    // Refusals name the field.
    for (cidr, says) in [
        (
            "172.16.1.128/25",
            "overlaps network group \"eval\" (172.16.1.0/24)",
        ),
        ("8.8.8.0/24", "is not a private network"),
        ("10.1.0.0/30", "the prefix must be between /8 and /29"),
        ("10.200.0.0/20", "overlaps the access network 10.200.0.0/16"),
        ("10.0.0.1/24", "host bits"),
    ] {
        let r = s.post(GROUPS, &a, json!({"name": "x", "cidr": cidr})).await;
        assert!(
            (r.status == 422 || r.status == 400) && r.field() == "cidr",
            "{cidr}: {}",
            r.body
        );
        assert!(r.error().contains(says), "{cidr}: {}", r.body);
    }
    let r = s.post(GROUPS, &a, json!({"name": "train"})).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("already exists"), "{}", r.body);
    let r = s
        .post(GROUPS, &a, json!({"name": "x", "placement": "random"}))
        .await;
    assert_eq!(
        (r.status, r.field()),
        (400, "placement".into()),
        "{}",
        r.body
    );
    // A chosen CIDR; the next default skips it.
    let g3 = group(&s, &a, json!({"name": "big", "cidr": "172.16.2.0/23"})).await;
    let g4 = group(&s, &a, json!({"name": "next"})).await;
    assert_eq!(
        (g3["cidr"].as_str(), g4["cidr"].as_str()),
        (Some("172.16.2.0/23"), Some("172.16.4.0/24"))
    );
    // List and get, one's own only; another account's answers 404 like a
    // missing one.
    let list = s.ok(Method::GET, GROUPS, &a, None, 200).await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["train", "eval", "big", "next"]);
    assert_eq!(list[0]["member_count"], 0);
    let id = g1["id"].as_str().unwrap();
    let one = s
        .ok(Method::GET, &format!("{GROUPS}/{id}"), &a, None, 200)
        .await;
    assert_eq!(
        (
            one["name"].as_str(),
            one["members"].as_array().map(Vec::len)
        ),
        (Some("train"), Some(0))
    );
    let missing = "ng-00000000000000000000000000000001";
    for g in [id, missing] {
        let r = s.get(&format!("{GROUPS}/{g}"), &b).await;
        assert_eq!(
            (r.status, r.error()),
            (404, format!("no network group {g}"))
        );
        let r = s
            .call(Method::DELETE, &format!("{GROUPS}/{g}"), &b, None)
            .await;
        assert_eq!(r.status, 404, "{}", r.body);
    }
    // Admins see every account's groups, and create for an account.
    let all = s.ok(Method::GET, GROUPS, ADMIN, None, 200).await;
    assert_eq!(all.as_array().unwrap().len(), 5);
    let mine = s
        .ok(
            Method::GET,
            &format!("{GROUPS}?account={a_id}"),
            ADMIN,
            None,
            200,
        )
        .await;
    assert_eq!(mine.as_array().unwrap().len(), 4);
    let r = s.post(GROUPS, ADMIN, json!({"name": "adm"})).await;
    assert_eq!((r.status, r.field()), (400, "account".into()), "{}", r.body);
    let ga = group(&s, ADMIN, json!({"name": "adm", "account": a_id})).await;
    assert_eq!(ga["cidr"], "172.16.5.0/24");
    // Every group has its own VNI.
    let db = s.db().await;
    let vnis: Vec<i64> = sqlx::query_scalar("SELECT vni FROM network_groups")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(vnis.iter().collect::<HashSet<_>>().len(), 6, "{vnis:?}");
    assert!(vnis.iter().all(|v| (4096..1 << 24).contains(v)), "{vnis:?}");
    // Deleting an empty group; then it is gone.
    let del = format!("{GROUPS}/{id}");
    assert_eq!(s.call(Method::DELETE, &del, &a, None).await.status, 204);
    assert_eq!(s.get(&del, &a).await.status, 404);
    // Idempotency-Key: a retried create is answered once.
    let keyed = || {
        s.http
            .post(format!("{}{GROUPS}", s.url))
            .bearer_auth(&a)
            .header("Idempotency-Key", "ng-1")
            .json(&json!({"name": "once"}))
            .send()
    };
    let first: Value = keyed().await.unwrap().json().await.unwrap();
    let again = keyed().await.unwrap();
    assert!(again.headers().get("idempotency-replayed").is_some());
    assert_eq!(again.json::<Value>().await.unwrap(), first);
}

async fn members_join_leave_and_delete(s: Server) {
    let (_, t, f, img) = basics(&s, "acme").await;
    let (_, other) = s.account("other").await;
    s.host("h1", "H100", 0).await;
    let g = group(&s, &t, json!({"name": "train"})).await;
    let gid = g["id"].as_str().unwrap().to_string();
    // Joined at create: the lowest address from .2.
    let i1 = instance(&s, &t, "w1", &f, &img, json!({"network_group": gid})).await;
    let v = tab(&s, &t, &i1).await;
    assert_eq!(
        (
            v["private_ip"].as_str(),
            v["interface"].as_str(),
            v["group"]["cidr"].as_str()
        ),
        (Some("172.16.0.2"), Some("eth1"), Some("172.16.0.0/24")),
        "{v}"
    );
    // Another account's group is missing, at create and on join; an id that
    // does not parse names the field.
    let r = s
        .post(
            "/v1/instances",
            &other,
            json!({"name": "x", "flavor": f, "image": img, "network_group": gid}),
        )
        .await;
    assert_eq!(
        (r.status, r.error()),
        (404, format!("no network group {gid}")),
        "{}",
        r.body
    );
    let r = s
        .post(
            "/v1/instances",
            &t,
            json!({"name": "x", "flavor": f, "image": img, "network_group": "ng-nope"}),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (400, "network_group".into()),
        "{}",
        r.body
    );
    // Joined later.
    let i2 = instance(&s, &t, "w2", &f, &img, json!({})).await;
    assert!(tab(&s, &t, &i2).await["group"].is_null());
    let r = join(&s, &t, &gid, &i2).await;
    assert_eq!(
        (r.status, r.body["ip"].as_str()),
        (201, Some("172.16.0.3")),
        "{}",
        r.body
    );
    assert_eq!(join(&s, &other, &gid, &i2).await.status, 404);
    let r = join(&s, &t, &gid, &i2).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("already in network group"), "{}", r.body);
    let theirs = instance(&s, &other, "o1", &f, &img, json!({})).await;
    let r = join(&s, &t, &gid, &theirs).await;
    assert_eq!(
        (r.status, r.error()),
        (404, format!("no instance {theirs}")),
        "{}",
        r.body
    );
    // The tab lists every member with its address and state.
    let v = tab(&s, &t, &i2).await;
    let members: Vec<(&str, &str)> = v["group"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["ip"].as_str().unwrap()))
        .collect();
    assert_eq!(members, [("w1", "172.16.0.2"), ("w2", "172.16.0.3")], "{v}");
    assert_eq!(v["group"]["member_count"], 2);
    let list = s.ok(Method::GET, GROUPS, &t, None, 200).await;
    assert_eq!(list[0]["member_count"], 2, "{list}");
    // A non-empty group cannot be deleted.
    let r = s
        .call(Method::DELETE, &format!("{GROUPS}/{gid}"), &t, None)
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(
        r.error(),
        format!("network group train still has 2 members: remove them first (gantryctl group leave {gid} INSTANCE)")
    );
    // Leaving; leaving twice is 404; another account's leave is 404.
    let leave = |ins: &str| format!("{GROUPS}/{gid}/members/{ins}");
    assert_eq!(
        s.call(Method::DELETE, &leave(&i1), &other, None)
            .await
            .status,
        404
    );
    assert_eq!(
        s.call(Method::DELETE, &leave(&i1), &t, None).await.status,
        204
    );
    let r = s.call(Method::DELETE, &leave(&i1), &t, None).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(tab(&s, &t, &i1).await["group"].is_null());
    // The freed address is the lowest free again.
    assert_eq!(join(&s, &t, &gid, &i1).await.body["ip"], "172.16.0.2");
    for i in [&i1, &i2] {
        assert_eq!(
            s.call(Method::DELETE, &leave(i), &t, None).await.status,
            204
        );
    }
    assert_eq!(
        s.call(Method::DELETE, &format!("{GROUPS}/{gid}"), &t, None)
            .await
            .status,
        204
    );
    // A full CIDR (a /29: six addresses) is refused with 409.
    let small = group(&s, &t, json!({"name": "small", "cidr": "10.9.0.0/29"})).await;
    let sid = small["id"].as_str().unwrap();
    let mut codes = Vec::new();
    for n in 0..6 {
        let i = instance(&s, &t, &format!("s{n}"), &f, &img, json!({})).await;
        let r = join(&s, &t, sid, &i).await;
        codes.push(r.status);
        if r.status == 409 {
            assert!(
                r.error().contains("no free address left in 10.9.0.0/29"),
                "{}",
                r.body
            );
        }
    }
    assert_eq!(codes, [201, 201, 201, 201, 201, 409]);
}

async fn concurrent_joins_get_distinct_addresses(s: Server) {
    let (_, t, f, img) = basics(&s, "acme").await;
    s.host("h1", "H100", 0).await;
    let g = group(&s, &t, json!({"name": "train"})).await;
    let gid = g["id"].as_str().unwrap().to_string();
    let mut ids = Vec::new();
    for n in 0..12 {
        ids.push(instance(&s, &t, &format!("w{n}"), &f, &img, json!({})).await);
    }
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let (s, t, gid, id, f, img) = (
            s.clone(),
            t.clone(),
            gid.clone(),
            id.clone(),
            f.clone(),
            img.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Half join existing instances, half are created into the group.
            if n % 2 == 0 {
                let r = join(&s, &t, &gid, &id).await;
                assert_eq!(r.status, 201, "{}", r.body);
                r.body["ip"].as_str().unwrap().to_string()
            } else {
                let i = instance(
                    &s,
                    &t,
                    &format!("c{n}"),
                    &f,
                    &img,
                    json!({"network_group": gid}),
                )
                .await;
                tab(&s, &t, &i).await["private_ip"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        }));
    }
    let mut ips = HashSet::new();
    for task in tasks {
        assert!(ips.insert(task.await.unwrap()));
    }
    let want: HashSet<String> = (2..14).map(|n| format!("172.16.0.{n}")).collect();
    assert_eq!(ips, want);
}

/// The host's group state from a work answer that carries it.
async fn groups_of(s: &Server, host: &str) -> Value {
    let w = s.work(host, 0).await;
    assert!(w["groups"].is_object(), "no groups in {w}");
    w["groups"].clone()
}

/// instance -> (local, vtep port) of a group state's only group.
fn member_view(hg: &Value) -> Vec<(String, bool, Option<u64>)> {
    let mut out: Vec<_> = hg["groups"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["instance"].as_str().unwrap().to_string(),
                m["local"].as_bool().unwrap(),
                m["vtep"]["port"].as_u64(),
            )
        })
        .collect();
    out.sort();
    out
}

async fn host_group_state_in_the_work_answer(s: Server) {
    let (_, t, f, img) = basics(&s, "acme").await;
    let (h1, h2) = (s.host("h1", "H100", 0).await, s.host("h2", "H100", 0).await);
    vtep(&s, &h1, 4789).await;
    vtep(&s, &h2, 4790).await;
    // A host with no groups gets an empty state.
    let empty = groups_of(&s, &h1).await;
    assert_eq!(empty["groups"], json!([]));
    let g = group(&s, &t, json!({"name": "train", "placement": "spread"})).await;
    let gid = g["id"].as_str().unwrap().to_string();
    let i1 = instance(&s, &t, "w1", &f, &img, json!({"network_group": gid})).await;
    let i2 = instance(&s, &t, "w2", &f, &img, json!({"network_group": gid})).await;
    let (on1, on2) = (s.host_of(&i1).await, s.host_of(&i2).await);
    assert_ne!(on1, on2, "spread");
    let (a, b) = if on1 == h1 {
        (i1.clone(), i2.clone())
    } else {
        (i2.clone(), i1.clone())
    };
    let s1 = groups_of(&s, &h1).await;
    let s2 = groups_of(&s, &h2).await;
    let want = |local: &str, remote: &str, port: u64| {
        let mut v = vec![
            (local.to_string(), true, None),
            (remote.to_string(), false, Some(port)),
        ];
        v.sort();
        v
    };
    assert_eq!(member_view(&s1), want(&a, &b, 4790), "{s1}");
    assert_eq!(member_view(&s2), want(&b, &a, 4789), "{s2}");
    let spec = &s1["groups"][0];
    assert_eq!(
        (
            spec["id"].as_str(),
            spec["cidr"].as_str(),
            spec["mtu"].as_u64()
        ),
        (Some(gid.as_str()), Some("172.16.0.0/24"), Some(1450))
    );
    assert!(spec["vni"].as_u64().unwrap() >= 4096);
    let m = spec["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["ip"] == "172.16.0.2")
        .unwrap();
    assert_eq!(m["mac"], "52:54:01:10:00:02");
    // The state parses as the proto type and validates.
    let typed: gantry_proto::groups::HostGroups = serde_json::from_value(s1.clone()).unwrap();
    typed.validate().unwrap();
    // The revision stays while nothing changes; with it, no state is sent.
    let rev = s1["rev"].as_u64().unwrap();
    assert_eq!(groups_of(&s, &h1).await["rev"], rev);
    assert!(s.work_q(&h1, &format!("groups_rev={rev}")).await["groups"].is_null());
    // A changed endpoint of h2 changes h1's state.
    vtep(&s, &h2, 4791).await;
    let s1b = groups_of(&s, &h1).await;
    assert_eq!(member_view(&s1b), want(&a, &b, 4791));
    let rev = s1b["rev"].as_u64().unwrap();
    assert_ne!(rev, s1["rev"].as_u64().unwrap());
    // A join elsewhere wakes h1's long poll at once, with the new state.
    let i3 = instance(&s, &t, "w3", &f, &img, json!({})).await;
    // No pending operation either: the creates are done.
    for i in [&i1, &i2, &i3] {
        s.observe(i, "Running").await;
    }
    let known = format!("{}&groups_rev={rev}", s.known(&h1).await);
    let poll = {
        let url = format!("{}/v1/agent/work?wait_secs=20&{known}", s.url);
        let (http, cred) = (s.http.clone(), s.cred(&h1));
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(cred).send().await.unwrap();
            (Instant::now(), r.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet = poll.is_finished();
    assert!(!quiet, "the poll waits while nothing changes");
    assert_eq!(join(&s, &t, &gid, &i3).await.status, 201);
    let joined = Instant::now();
    let (answered, w) = poll.await.unwrap();
    assert!(
        answered.duration_since(joined) < Duration::from_secs(5),
        "the poll was not woken"
    );
    let n = w["groups"]["groups"][0]["members"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(n, 3, "{w}");
    assert_ne!(w["groups"]["rev"], rev);
    // Leaving moves it again; the last local member's leave empties a host.
    let leave = format!("{GROUPS}/{gid}/members/{b}");
    assert_eq!(s.call(Method::DELETE, &leave, &t, None).await.status, 204);
    let on_b = s.host_of(&b).await;
    let i3_host = s.host_of(&i3).await;
    if i3_host != on_b {
        assert_eq!(groups_of(&s, &on_b).await["groups"], json!([]));
    }
    let left = groups_of(&s, &h1).await;
    assert!(!member_view(&left).iter().any(|m| m.0 == b), "{left}");
}

async fn release_frees_the_address_when_the_host_reports_it(s: Server) {
    let (_, t, f, img) = basics(&s, "acme").await;
    let h = s.host("h1", "H100", 0).await;
    let g = group(&s, &t, json!({"name": "train"})).await;
    let gid = g["id"].as_str().unwrap().to_string();
    let i1 = instance(&s, &t, "w1", &f, &img, json!({"network_group": gid})).await;
    s.observe(&i1, "Running").await;
    let r = s
        .post(
            &format!("/v1/instances/{i1}/actions"),
            &t,
            json!({"action": "release"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    // Still a member (its address held) until the host reports it gone.
    let one = s
        .ok(Method::GET, &format!("{GROUPS}/{gid}"), &t, None, 200)
        .await;
    assert_eq!(one["member_count"], 1, "{one}");
    let i2 = instance(&s, &t, "w2", &f, &img, json!({"network_group": gid})).await;
    assert_eq!(tab(&s, &t, &i2).await["private_ip"], "172.16.0.3");
    s.observe(&i1, "Released").await;
    let one = s
        .ok(Method::GET, &format!("{GROUPS}/{gid}"), &t, None, 200)
        .await;
    let ips: Vec<&str> = one["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, ["172.16.0.3"], "{one}");
    let hg = groups_of(&s, &h).await;
    assert_eq!(member_view(&hg).len(), 1, "{hg}");
    let i3 = instance(&s, &t, "w3", &f, &img, json!({"network_group": gid})).await;
    assert_eq!(tab(&s, &t, &i3).await["private_ip"], "172.16.0.2");
    // A create that fails frees its address the same way.
    let op = s.op_of(&i3).await.unwrap();
    let r = s
        .report(
            &h,
            op["id"].as_str().unwrap(),
            json!({"outcome": "failed", "progress": 0, "error": "no disk"}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let one = s
        .ok(Method::GET, &format!("{GROUPS}/{gid}"), &t, None, 200)
        .await;
    assert_eq!(one["member_count"], 1, "{one}");
    // A Released instance cannot join.
    let r = join(&s, &t, &gid, &i1).await;
    assert_eq!(r.status, 409, "{}", r.body);
}

async fn scheduler_packs_and_spreads_members(s: Server) {
    let (_, t, f, img) = basics(&s, "acme").await;
    s.host("h1", "H100", 0).await;
    s.host("h2", "H100", 0).await;
    // The group's placement comes before the host weighing: a pack group
    // with instances asking to spread still lands on one host...
    let pack = group(&s, &t, json!({"name": "p", "placement": "pack"})).await;
    let spread = group(&s, &t, json!({"name": "s", "placement": "spread"})).await;
    let mut hosts = Vec::new();
    for n in 0..3 {
        let extra = json!({"network_group": pack["id"], "placement": "spread"});
        let i = instance(&s, &t, &format!("p{n}"), &f, &img, extra).await;
        hosts.push(s.host_of(&i).await);
    }
    assert!(hosts.iter().all(|h| *h == hosts[0]), "pack: {hosts:?}");
    // ... and a spread group with instances asking to pack uses both.
    let mut seen = HashSet::new();
    for n in 0..2 {
        let extra = json!({"network_group": spread["id"], "placement": "pack"});
        let i = instance(&s, &t, &format!("s{n}"), &f, &img, extra).await;
        seen.insert(s.host_of(&i).await);
    }
    assert_eq!(seen.len(), 2, "spread: {seen:?}");
    // Soft: a third spread member still finds a host.
    let extra = json!({"network_group": spread["id"]});
    instance(&s, &t, "s2", &f, &img, extra).await;
}

/// One gantryctl run (off the runtime, which serves the controller):
/// exit code and stdout.
async fn ctl(s: &Server, token: &str, args: &[&str]) -> (Option<i32>, String) {
    let (url, token) = (s.url.clone(), token.to_string());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gantryctl"))
            .args(&args)
            .env("GANTRY_URL", url)
            .env("GANTRY_TOKEN", token)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.code(), format!("{text}{err}"))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gantryctl_group_commands() {
    let s = Server::start(common::Backend::Sqlite).await.unwrap();
    let (_, t, f, img) = basics(&s, "acme").await;
    s.host("h1", "H100", 0).await;
    let (code, out) = ctl(
        &s,
        &t,
        &[
            "--json",
            "group",
            "create",
            "train",
            "--placement",
            "spread",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let g: Value = serde_json::from_str(&out).unwrap();
    let gid = g["id"].as_str().unwrap().to_string();
    let (code, out) = ctl(&s, &t, &["group", "list"]).await;
    assert!(
        code == Some(0) && out.contains("train") && out.contains("172.16.0.0/24"),
        "{out}"
    );
    let args = [
        "--json",
        "instance",
        "create",
        "--name",
        "w1",
        "--flavor",
        &f,
        "--image",
        &img,
        "--network-group",
        &gid,
    ];
    let (code, out) = ctl(&s, &t, &args).await;
    assert_eq!(code, Some(0), "{out}");
    let i1 = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let i2 = instance(&s, &t, "w2", &f, &img, json!({})).await;
    let (code, out) = ctl(&s, &t, &["group", "join", &gid, &i2]).await;
    assert!(code == Some(0) && out.contains("172.16.0.3"), "{out}");
    let (code, out) = ctl(&s, &t, &["instance", "get", &i1, "--view", "network-group"]).await;
    assert_eq!(code, Some(0), "{out}");
    for want in [
        "Private IP: 172.16.0.2 on eth1",
        "NCCL_SOCKET_IFNAME=eth1",
        "172.16.0.0/24",
        "w1 (this)",
        "172.16.0.3",
        "Creating",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    let (code, out) = ctl(&s, &t, &["group", "get", &gid]).await;
    assert!(code == Some(0) && out.contains("Members:    2"), "{out}");
    // Refusals keep gantryctl's exit codes: 409 is 9, 422 is 1, 404 is 8.
    let (code, out) = ctl(&s, &t, &["group", "delete", &gid]).await;
    assert_eq!(code, Some(9), "{out}");
    assert!(
        out.contains("still has 2 members: remove them first (gantryctl group leave"),
        "{out}"
    );
    let (code, out) = ctl(&s, &t, &["group", "create", "x", "--cidr", "8.8.8.0/24"]).await;
    assert_eq!(code, Some(1), "{out}");
    let (code, _) = ctl(
        &s,
        &t,
        &["group", "get", "ng-00000000000000000000000000000001"],
    )
    .await;
    assert_eq!(code, Some(8));
    for i in [&i1, &i2] {
        assert_eq!(ctl(&s, &t, &["group", "leave", &gid, i]).await.0, Some(0));
    }
    let (code, out) = ctl(&s, &t, &["instance", "get", &i1, "--view", "network-group"]).await;
    assert!(
        code == Some(0) && out.contains("is in no network group"),
        "{out}"
    );
    assert_eq!(ctl(&s, &t, &["group", "delete", &gid]).await.0, Some(0));
}
