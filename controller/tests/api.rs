//! Security and bad input over real HTTP: tokens, account isolation, strict
//! bodies, rate limits, the audit log and the OpenAPI document.

mod common;

use common::{Backend, Server, ADMIN};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn every_call_needs_a_valid_token_and_tenants_are_not_admins() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let r = s.raw(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    let r = s.raw(Method::GET, "/v1/flavors", None, None).await;
    assert_eq!(r.status, 401);
    assert!(r.error().contains("bearer token"), "{}", r.body);
    let r = s.get("/v1/flavors", "wrong-token-xxxxxxxxxxxx").await;
    assert_eq!(r.status, 401);
    // A well-formed but forged token for a real token id is refused too.
    let (_, tok) = s.account("acme").await;
    let forged = format!("{}{}", &tok[..tok.len() - 4], "0000");
    assert_eq!(s.get("/v1/flavors", &forged).await.status, 401);
    assert_eq!(s.get("/v1/flavors", &tok).await.status, 200);
    let r = s.post("/v1/admin/hosts", &tok, json!({})).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error(), "this call needs an admin token");
    // Revoked tokens stop working.
    let toks = s.get("/v1/admin/tokens", ADMIN).await.body;
    let tid = toks[0]["id"].as_str().unwrap();
    assert!(toks[0].get("token").is_none() && toks[0].get("hash").is_none());
    s.ok(
        Method::DELETE,
        &format!("/v1/admin/tokens/{tid}"),
        ADMIN,
        None,
        200,
    )
    .await;
    assert_eq!(s.get("/v1/flavors", &tok).await.status, 401);
}

#[tokio::test]
async fn another_accounts_objects_answer_404() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let (_, a) = s.account("alpha").await;
    let (b_id, b) = s.account("beta").await;
    s.host("h1", "H100", 8).await;
    let f = s.flavor("g1", Some("H100"), 1).await;
    let img = s.image("ubuntu").await;
    let ins = s
        .post(
            "/v1/instances",
            &a,
            json!({"name": "a1", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(ins.status, 202, "{}", ins.body);
    let id = ins.id();
    s.observe(&id, "Running").await;
    let vol = s
        .post("/v1/volumes", &a, json!({"name": "data", "size_gib": 100}))
        .await;
    assert_eq!(vol.status, 201);
    for path in [
        format!("/v1/instances/{id}"),
        format!("/v1/instances/{id}/config"),
        format!("/v1/instances/{id}/billing"),
    ] {
        let r = s.get(&path, &b).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert!(r.error().contains("no instance"), "{}", r.body);
        assert_eq!(s.get(&path, &a).await.status, 200, "{path}");
    }
    let r = s
        .post(
            &format!("/v1/instances/{id}/actions"),
            &b,
            json!({"action": "stop"}),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = s
        .post(
            &format!("/v1/instances/{id}/snapshots"),
            &b,
            json!({"name": "x"}),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = s
        .call(
            Method::DELETE,
            &format!("/v1/volumes/{}", vol.id()),
            &b,
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        s.get("/v1/instances", &b)
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        s.get("/v1/instances", &a)
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A tenant cannot create for someone else.
    let r = s
        .post(
            "/v1/instances",
            &a,
            json!({"name": "x", "flavor": f, "image": img, "account": b_id}),
        )
        .await;
    assert_eq!((r.status, r.field().as_str()), (400, "account"));
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let s = Server::start_with(Backend::Sqlite, |c| c.max_body_bytes = 4096)
        .await
        .unwrap();
    let r = s
        .raw(
            Method::POST,
            "/v1/admin/accounts",
            Some(ADMIN),
            Some(b"{\"name\":".to_vec()),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.error().starts_with("malformed JSON"), "{}", r.body);
    let r = s
        .post(
            "/v1/admin/accounts",
            ADMIN,
            json!({"name": "a", "colour": "red"}),
        )
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (400, "colour"),
        "{}",
        r.body
    );
    let r = s
        .post("/v1/admin/accounts", ADMIN, json!({"name": 5}))
        .await;
    assert_eq!((r.status, r.field().as_str()), (400, "name"), "{}", r.body);
    let r = s.post("/v1/admin/accounts", ADMIN, json!({})).await;
    assert_eq!((r.status, r.field().as_str()), (400, "name"), "{}", r.body);
    let r = s
        .post("/v1/admin/accounts", ADMIN, json!({"name": "bad name!"}))
        .await;
    assert_eq!((r.status, r.field().as_str()), (422, "name"), "{}", r.body);
    let r = s
        .post(
            "/v1/admin/flavors",
            ADMIN,
            json!({"name": "f", "vcpus": 0, "memory_mib": 1024,
            "root_disk_gib": 10, "price_micros_per_hour": 1}),
        )
        .await;
    assert_eq!((r.status, r.field().as_str()), (422, "vcpus"), "{}", r.body);
    assert_eq!(r.error(), "vcpus: must be between 1 and 512, got 0");
    let r = s
        .post(
            "/v1/admin/hosts",
            ADMIN,
            json!({"name": "h", "address": "h", "vcpus": 8,
            "memory_mib": 8192, "disk_gib": 100, "gpus": [{"model": "H100", "pci": "65:00"}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (400, "gpus[0].pci"),
        "{}",
        r.body
    );
    let big = vec![b' '; 8192];
    let r = s
        .raw(Method::POST, "/v1/admin/accounts", Some(ADMIN), Some(big))
        .await;
    assert_eq!(r.status, 413);
    let r = s.get("/v1/instances?colour=red", ADMIN).await;
    assert_eq!((r.status, r.field().as_str()), (400, "colour"));
    let r = s.get("/v1/instances?status=Sleeping", ADMIN).await;
    assert_eq!((r.status, r.field().as_str()), (400, "status"));
    let r = s.get("/v1/instances/ins-nope", ADMIN).await;
    assert_eq!(r.status, 404);
    // Nothing was created by any of the refused calls.
    assert_eq!(
        s.get("/v1/admin/accounts", ADMIN)
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test]
async fn tokens_are_rate_limited() {
    let s = Server::start_with(Backend::Sqlite, |c| {
        c.rate_limit_per_second = 1;
        c.rate_limit_burst = 3;
    })
    .await
    .unwrap();
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(s.get("/v1/flavors", ADMIN).await.status);
    }
    assert_eq!(&codes[..3], &[200, 200, 200]);
    assert!(codes[3..].contains(&429), "{codes:?}");
}

#[tokio::test]
async fn state_changing_calls_are_audited() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let (acct, tok) = s.account("gamma").await;
    s.post("/v1/volumes", &tok, json!({"name": "v1", "size_gib": 10}))
        .await;
    s.post(
        "/v1/volumes",
        &tok,
        json!({"name": "bad name", "size_gib": 10}),
    )
    .await;
    s.raw(Method::POST, "/v1/volumes", None, Some(b"{}".to_vec()))
        .await;
    s.get("/v1/volumes", &tok).await;
    let log = s.get("/v1/admin/audit", ADMIN).await.body;
    let log = log.as_array().unwrap();
    let vols: Vec<_> = log.iter().filter(|e| e["path"] == "/v1/volumes").collect();
    // Newest first; GETs are not recorded, nor are refusals without a
    // valid token (they are counted in the metrics instead).
    assert_eq!(vols.len(), 2, "{log:?}");
    assert_eq!(vols[0]["status"], 422);
    assert_eq!(vols[1]["status"], 201);
    assert_eq!(vols[1]["account"], acct.as_str());
    assert!(vols[1]["actor"].as_str().unwrap().starts_with("tok-"));
    let mine = s
        .get(&format!("/v1/admin/audit?account={acct}"), ADMIN)
        .await
        .body;
    assert_eq!(mine.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn openapi_lists_every_route_and_the_router_answers_each() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let doc = s.raw(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(doc.status, 200);
    let paths = doc.body["paths"].as_object().unwrap();
    for route in gantry_controller::openapi::ROUTES {
        let (m, path) = (&route.method, &route.path);
        assert!(
            paths[*path].get(*m).is_some(),
            "{m} {path} missing from the document"
        );
        let real = path
            .replace("{id}", "ins-00000000000000000000000000000000")
            .replace("{view}", "config")
            .replace("{fwd}", "fwd-00000000000000000000000000000000");
        let method: Method = m.to_uppercase().parse().unwrap();
        let r = s.call(method, &real, ADMIN, Some(json!({}))).await;
        assert_ne!(r.status, 405, "{m} {path}");
        assert_ne!(r.error(), "no such API path", "{m} {path}");
    }
    assert_eq!(
        s.get("/v1/nothing-here", ADMIN).await.error(),
        "no such API path"
    );
}

#[tokio::test]
async fn the_binary_generates_a_private_admin_token_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // The whole log, at debug level, goes to a file (a pipe would fill up).
    let logs = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(logs.path().join("log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gantry-controller"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path())
        .env_remove("GANTRY_ADMIN_TOKEN")
        .env("RUST_LOG", "debug")
        .stderr(log.try_clone().unwrap())
        .stdout(log)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    // The bound address (port 0 asked for any) is written to the state dir.
    let mut url = String::new();
    let mut up = false;
    for _ in 0..100 {
        if let Ok(a) = std::fs::read_to_string(dir.path().join("listen-addr")) {
            url = format!("http://{}", a.trim());
            if http.get(format!("{url}/healthz")).send().await.is_ok() {
                up = true;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(up, "controller did not come up");
    let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    let token = token.trim();
    let r = http
        .get(format!("{url}/v1/admin/hosts"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A host long-polling for work does not hold up shutdown.
    let jt: serde_json::Value = http
        .post(format!("{url}/v1/admin/join-tokens"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let joined: serde_json::Value = http
        .post(format!("{url}/v1/agent/join"))
        .bearer_auth(jt["token"].as_str().unwrap())
        .json(&json!({"name": "h1", "address": "h1", "capacity":
            {"vcpus": 8, "memory_mib": 8192, "disk_gib": 100}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cred = joined["credential"].as_str().unwrap().to_string();
    let secrets = instance_secrets(&http, &url, token).await;
    // A poll that already has the host's access state and certificate waits.
    let known = known_state(&http, &url, &cred).await;
    let poll = tokio::spawn(
        http.get(format!("{url}/v1/agent/work?wait_secs=60&{known}"))
            .bearer_auth(cred)
            .send(),
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let asked = std::time::Instant::now();
    nix_kill(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(30),
        "shutdown waited for the long-poll"
    );
    assert_eq!(poll.await.unwrap().unwrap().status(), 200);
    let out = std::fs::read_to_string(logs.path().join("log")).unwrap();
    assert!(out.contains("admin-token"), "{out}");
    assert!(!out.contains(token), "the token was logged");
    for secret in secrets {
        assert!(!out.contains(&secret), "an instance secret was logged");
    }
}

/// `access_rev=R&tls=F` of what the host has now.
async fn known_state(http: &reqwest::Client, url: &str, cred: &str) -> String {
    let w: serde_json::Value = http
        .get(format!("{url}/v1/agent/work?wait_secs=0"))
        .bearer_auth(cred)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    format!(
        "access_rev={}&tls={}",
        w["access"]["rev"],
        w["tls"]["fingerprint"].as_str().unwrap()
    )
}

/// Creates an instance on the joined host and returns its root password,
/// JupyterLab token and password hash (none of which may be logged).
async fn instance_secrets(http: &reqwest::Client, url: &str, admin: &str) -> Vec<String> {
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{url}{path}"))
            .bearer_auth(admin)
            .json(&body)
            .send()
    };
    let get = |path: &str| http.get(format!("{url}{path}")).bearer_auth(admin).send();
    let json = |r: reqwest::Response| async move { r.json::<serde_json::Value>().await.unwrap() };
    let a = json(
        post("/v1/admin/accounts", json!({"name": "logs"}))
            .await
            .unwrap(),
    )
    .await;
    let acct = a["id"].as_str().unwrap();
    let credit = json!({"amount_micros": 1_000_000});
    post(&format!("/v1/admin/accounts/{acct}/credits"), credit)
        .await
        .unwrap();
    let f = json!({"name": "small", "vcpus": 1, "memory_mib": 1024, "root_disk_gib": 10,
        "price_micros_per_hour": 1});
    let f = json(post("/v1/admin/flavors", f).await.unwrap()).await;
    let img = json!({"name": "img", "size_gib": 1, "origin": {"from": "file", "disk": "/x"}});
    let img = json(post("/v1/admin/images", img).await.unwrap()).await;
    let ins = json!({"name": "w", "flavor": f["id"], "image": img["id"], "account": acct});
    let ins = json(post("/v1/instances", ins).await.unwrap()).await;
    let id = ins["id"].as_str().expect("instance created").to_string();
    let pw = json(get(&format!("/v1/instances/{id}/password")).await.unwrap()).await;
    let acc = json(get(&format!("/v1/instances/{id}/access")).await.unwrap()).await;
    let jl = acc["jupyter_url"].as_str().unwrap();
    let token = jl.split("token=").nth(1).unwrap().to_string();
    vec![pw["password"].as_str().unwrap().to_string(), token]
}

fn nix_kill(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantryctl_prints_tables_json_and_errors() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let (_, tok) = s.account("cli").await;
    s.host("h1", "H100", 2).await;
    let f = s.flavor("h100x1", Some("H100"), 1).await;
    let img = s.image("ubuntu").await;
    let ctl = |token: &str, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_gantryctl"))
            .args(args)
            .env("GANTRY_URL", &s.url)
            .env("GANTRY_TOKEN", token)
            .output()
            .unwrap()
    };
    let out = ctl(
        &tok,
        &[
            "--json", "instance", "create", "--name", "web", "--flavor", &f, "--image", &img,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let out = ctl(&tok, &["instance", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("STATUS") && text.contains(&id) && text.contains("Creating"),
        "{text}"
    );
    let out = ctl(&tok, &["instance", "action", &id, "reboot"]);
    assert_eq!(out.status.code(), Some(9), "a conflict");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "gantryctl: cannot reboot an instance that is Creating (HTTP 409)"
    );
    let out = ctl(&tok, &["host", "list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs an admin token"));
    let out = ctl(ADMIN, &["host", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("h1"));
    let out = ctl(
        ADMIN,
        &["--json", "join-token", "create", "--ttl-secs", "60"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["token"].as_str().unwrap().starts_with("gjt_"), "{v}");
    let out = ctl(&tok, &["usage", "--instance", &id]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("AMOUNT_MICROS"));
    let out = ctl(&tok, &["join-token", "create"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs an admin token"));
    let out = ctl("", &["flavor", "list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("set GANTRY_TOKEN"));
    assert_eq!(out.status.code(), Some(3));
    gantryctl_access(&s, &tok, &id).await;
}

/// Runs gantryctl against `url`: exit code, stdout, stderr.
fn run_ctl(url: &str, token: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gantryctl"))
        .args(args)
        .env("GANTRY_URL", url)
        .env("GANTRY_TOKEN", token)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// Forwards, SSH keys, the CA, the Access view, passwords; exit codes.
async fn gantryctl_access(s: &Server, tok: &str, id: &str) {
    let ctl = |token: &str, args: &[&str]| run_ctl(&s.url, token, args);
    let add = [
        "--json",
        "forward",
        "add",
        id,
        "--guest-port",
        "3000",
        "--https",
        "--label",
        "Grafana",
    ];
    let (code, out, err) = ctl(tok, &add);
    assert_eq!(code, Some(0), "{err}");
    let fwd: serde_json::Value = serde_json::from_str(&out).unwrap();
    let fwd = fwd["id"].as_str().unwrap().to_string();
    let (_, out, _) = ctl(tok, &["forward", "list", id]);
    assert!(
        out.contains("Grafana") && out.contains("https://h1.example:20002/"),
        "{out}"
    );
    let (code, _, err) = ctl(tok, &["forward", "edit", id, &fwd, "--label", "Dash"]);
    assert_eq!(code, Some(0), "{err}");
    let bad = [
        "forward",
        "add",
        id,
        "--guest-port",
        "53",
        "--protocol",
        "udp",
        "--https",
    ];
    let (code, _, err) = ctl(tok, &bad);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("HTTPS forwards must use the tcp protocol"),
        "{err}"
    );
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl u@h";
    let (code, _, err) = ctl(tok, &["ssh-key", "add", "--name", "laptop", "--key", key]);
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = ctl(tok, &["ssh-key", "list"]);
    assert!(
        out.contains("SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"),
        "{out}"
    );
    let (_, out, _) = ctl(tok, &["ca"]);
    assert!(out.starts_with("-----BEGIN CERTIFICATE-----"), "{out}");
    let (_, out, _) = ctl(tok, &["instance", "get", id, "--view", "access"]);
    assert!(out.contains("ssh -p 20000 root@h1.example"), "{out}");
    assert!(out.contains("https://h1.example:20001/lab?token="), "{out}");
    assert!(
        out.contains("Password:   set") && out.contains("Dash"),
        "{out}"
    );
    let (_, out, _) = ctl(tok, &["--json", "instance", "password", id]);
    let pw: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pw["user"], "root");
    gantryctl_exit_codes(s, tok, id).await;
}

/// Exit codes: local input 3, usage 2, unreachable 4.
async fn gantryctl_exit_codes(s: &Server, tok: &str, id: &str) {
    let ctl = |token: &str, args: &[&str]| run_ctl(&s.url, token, args);
    let host = s.host_of(id).await;
    let (code, _, err) = ctl(
        ADMIN,
        &[
            "host",
            "set-certificate",
            &host,
            "--cert",
            "/nonexistent",
            "--key",
            "/x",
        ],
    );
    assert_eq!(code, Some(3), "{err}");
    let (code, _, _) = ctl(tok, &["forward", "add", id]);
    assert_eq!(code, Some(2), "a missing option is a usage error");
    let (code, _, _) = run_ctl("http://127.0.0.1:1", tok, &["flavor", "list"]);
    assert_eq!(code, Some(4), "the controller cannot be reached");
    gantryctl_reset(s, tok, id).await;
}

/// `instance password --reset` waits for its operation and prints the
/// host's note.
async fn gantryctl_reset(s: &Server, tok: &str, id: &str) {
    s.observe(id, "Running").await;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_gantryctl"))
        .args(["instance", "password", id, "--reset", "--wait-secs", "30"])
        .env("GANTRY_URL", &s.url)
        .env("GANTRY_TOKEN", tok)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut op = None;
    for _ in 0..100 {
        op = s.op_of(id).await;
        if op.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let op = op.expect("the reset's operation");
    let host = s.host_of(id).await;
    let note = "applied through the guest agent";
    let r = s
        .report(
            &host,
            op["id"].as_str().unwrap(),
            json!({"outcome": "succeeded", "progress": 100, "note": note}),
        )
        .await;
    assert_eq!(r.status, 204);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(note));
}
