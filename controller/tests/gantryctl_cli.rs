//! `gantryctl` as a user meets it, against a real controller (and two fake
//! servers: one that never answers, one that answers a web page): request
//! timeouts, ids parsed before they reach a URL, what `--json` prints on
//! a failure, the exit code of each kind of failure; and the API's field
//! names on a blank snapshot name, a bad image origin and a bad action.

#[macro_use]
mod common;

use common::{Backend, Server, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one gantryctl run left: exit code, stdout, stderr, how long.
struct Run {
    code: Option<i32>,
    out: String,
    err: String,
    took: Duration,
}

impl Run {
    /// stdout as the one JSON document `--json` prints.
    fn json(&self) -> Value {
        serde_json::from_str(self.out.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.out))
    }
}

/// Runs gantryctl against `url`; kills it (and fails) after 20 s.
fn ctl(url: &str, token: &str, args: &[&str]) -> Run {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gantryctl"))
        .args(args)
        .env("GANTRY_URL", url)
        .env("GANTRY_TOKEN", token)
        .env_remove("GANTRY_TIMEOUT_SECS")
        .env_remove("GANTRY_CONNECT_TIMEOUT_SECS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("gantryctl {args:?} still runs after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    Run {
        code: out.status.code(),
        out: text(&out.stdout),
        err: text(&out.stderr),
        took: started.elapsed(),
    }
}

/// [`ctl`] off the async runtime (the controller runs in this process).
async fn actl(url: &str, token: &str, args: &[&str]) -> Run {
    let (url, token) = (url.to_string(), token.to_string());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&url, &token, &args)
    })
    .await
    .unwrap()
}

#[test]
fn a_silent_server_times_out_with_the_network_code() {
    // Accepts connections (the kernel does, into the backlog) and never
    // answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let r = ctl(&url, "t", &["--timeout-secs", "1", "flavor", "list"]);
    assert_eq!(r.code, Some(4), "{}", r.err);
    assert!(r.took < Duration::from_secs(8), "took {:?}", r.took);
    assert_eq!(
        r.err.trim(),
        format!(
            "gantryctl: no answer from the controller at {url} within 1 s (raise --timeout-secs \
             or GANTRY_TIMEOUT_SECS)"
        )
    );
    // The variable does the same; --json prints the sentence as JSON.
    let r = {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gantryctl"));
        c.args(["--json", "flavor", "list"])
            .env("GANTRY_URL", &url)
            .env("GANTRY_TOKEN", "t")
            .env("GANTRY_TIMEOUT_SECS", "1");
        let started = Instant::now();
        let out = c.output().unwrap();
        assert!(started.elapsed() < Duration::from_secs(8));
        out
    };
    assert_eq!(r.status.code(), Some(4));
    let v: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("within 1 s"), "{v}");
    drop(silent);
}

/// Serves `answer` (a whole HTTP response) to every connection.
fn fake_server(answer: &'static str) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(answer.as_bytes());
        }
    });
    url
}

#[test]
fn an_answer_that_is_not_json_is_an_error() {
    let page = "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 19\r\n\
                Connection: close\r\n\r\n<html>portal</html>";
    let url = fake_server(page);
    let r = ctl(&url, "t", &["--json", "flavor", "list"]);
    assert_eq!(r.code, Some(10), "{}", r.err);
    let e = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("is not JSON (HTTP 200 OK)") && e.contains("<html>portal</html>"),
        "{e}"
    );
    assert!(r.err.contains("is not JSON"), "{}", r.err);
    let r = ctl(&url, "t", &["flavor", "list"]);
    assert_eq!(r.code, Some(10), "without --json too: {}", r.out);
    // A proxy's error page: the server's failure, its first line shown.
    let bad = "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 12\r\n\
               Connection: close\r\n\r\n<h1>502</h1>";
    let r = ctl(&fake_server(bad), "t", &["--json", "flavor", "list"]);
    assert_eq!(r.code, Some(5));
    assert_eq!(
        r.json(),
        json!({"error": "the controller answered: \"<h1>502</h1>\" (HTTP 502)"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_parsed_before_they_reach_a_url() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let (_, tok) = s.account("cli").await;
    let vol = s
        .ok(
            Method::POST,
            "/v1/volumes",
            &tok,
            Some(json!({"name": "data", "size_gib": 10})),
            201,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sneaky = format!("../volumes/{vol}");
    let r = actl(&s.url, &tok, &["snapshot", "delete", &sneaky]).await;
    assert_eq!(r.code, Some(2), "{}", r.err);
    assert!(
        r.err
            .contains(&format!("{sneaky:?} is not a valid snapshot id")),
        "{}",
        r.err
    );
    assert_eq!(s.get(&format!("/v1/volumes/{vol}"), &tok).await.status, 200);
    // The right kind of id, but of the wrong kind of object: refused too.
    let r = actl(&s.url, &tok, &["--json", "snapshot", "get", &vol]).await;
    assert_eq!(r.code, Some(2));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("is not a valid snapshot id"),
        "{}",
        r.out
    );
    let r = actl(&s.url, ADMIN, &["admin", "gpu-alias", "delete", ".."]).await;
    assert_eq!(r.code, Some(3), "{}", r.err);
    assert!(r.err.contains("alias: must start with a letter or a digit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_failures_print_the_apis_error_and_exit_by_kind() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let (_, tok) = s.account("cli").await;
    // 404: the API's own JSON error body, exit 8.
    let missing = "snap-0190b4c2e7a47c3a9d2b8f1e4a6c0d12";
    let r = actl(&s.url, &tok, &["--json", "snapshot", "get", missing]).await;
    assert_eq!(r.code, Some(8), "{}", r.err);
    let api = s.get(&format!("/v1/snapshots/{missing}"), &tok).await;
    assert_eq!(api.status, 404);
    assert_eq!(r.json(), api.body);
    assert!(r.err.contains("(HTTP 404)"), "{}", r.err);
    // 401 and 403: exit 7.
    let r = actl(&s.url, "gtk_wrong", &["--json", "flavor", "list"]).await;
    assert_eq!(r.code, Some(7), "{}", r.err);
    assert!(r.json()["error"].is_string());
    let r = actl(&s.url, &tok, &["host", "list"]).await;
    assert_eq!(r.code, Some(7), "{}", r.err);
    // 409: exit 9.
    s.host("h1", "H100", 1).await;
    let f = s.flavor("h100x1", Some("H100"), 1).await;
    let img = s.image("ubuntu").await;
    let ins = s
        .ok(
            Method::POST,
            "/v1/instances",
            &tok,
            Some(json!({"name": "web", "flavor": f, "image": img})),
            202,
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = actl(
        &s.url,
        &tok,
        &["--json", "instance", "action", &ins, "reboot"],
    )
    .await;
    assert_eq!(r.code, Some(9), "{}", r.err);
    assert_eq!(
        r.json()["error"],
        "cannot reboot an instance that is Creating"
    );
    // 422 naming the field: exit 1, the field in the JSON.
    let r = actl(
        &s.url,
        &tok,
        &["--json", "snapshot", "create", &ins, "--name", "   "],
    )
    .await;
    assert_eq!(r.code, Some(1), "{}", r.err);
    assert_eq!(r.json()["field"], "name", "{}", r.out);
    assert!(r.err.contains("name: must not be blank"), "{}", r.err);
    // A usage error with --json: JSON too, exit 2.
    let r = actl(&s.url, &tok, &["--json", "instance", "get"]).await;
    assert_eq!(r.code, Some(2));
    assert!(r.json()["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_snapshot_names_are_refused_naming_name() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let (_, tok) = s.account("names").await;
    s.host("h1", "H100", 1).await;
    let f = s.flavor("h100x1", Some("H100"), 1).await;
    let img = s.image("ubuntu").await;
    let r = s
        .post(
            "/v1/instances",
            &tok,
            json!({"name": "web", "flavor": f, "image": img}),
        )
        .await;
    let ins = r.id();
    s.observe(&ins, "Running").await;
    for name in [" ", "   ", "\t", " lead", "trail "] {
        let r = s
            .post(
                &format!("/v1/instances/{ins}/snapshots"),
                &tok,
                json!({ "name": name }),
            )
            .await;
        assert_eq!(r.status, 422, "{name:?}: {}", r.body);
        assert_eq!(r.field(), "name", "{name:?}: {}", r.body);
    }
    // Other name fields refuse blanks too.
    let r = s
        .post(
            "/v1/instances",
            &tok,
            json!({"name": "  ", "flavor": f, "image": img}),
        )
        .await;
    assert_eq!((r.status, r.field().as_str()), (422, "name"), "{}", r.body);
    let r = s
        .post("/v1/volumes", &tok, json!({"name": " ", "size_gib": 10}))
        .await;
    assert_eq!((r.status, r.field().as_str()), (422, "name"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_origins_are_refused_naming_the_field() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let file = |extra: Value| {
        let mut o = json!({"from": "file", "disk": "/srv/images/u.qcow2"});
        o.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"name": "u", "size_gib": 1, "origin": o})
    };
    let cases = [
        (json!({"disk": "images/u.qcow2"}), "origin.disk"),
        (json!({"disk": "/srv/../etc/shadow"}), "origin.disk"),
        (json!({"disk": ""}), "origin.disk"),
        (
            json!({"disk": format!("/{}", "a".repeat(5000))}),
            "origin.disk",
        ),
        (json!({"kernel": "/boot/vmlinuz\u{0}x"}), "origin.kernel"),
        (json!({"initrd": "/boot/../../initrd"}), "origin.initrd"),
        (
            json!({"cmdline": "console=ttyS0\nrm -rf /"}),
            "origin.cmdline",
        ),
    ];
    for (extra, field) in cases {
        let r = s.post("/v1/admin/images", ADMIN, file(extra.clone())).await;
        assert_eq!(r.status, 422, "{extra}: {}", r.body);
        assert_eq!(r.field(), field, "{extra}: {}", r.body);
    }
    let r = s
        .post(
            "/v1/admin/images",
            ADMIN,
            file(json!({"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0 root=/dev/vda"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = actl(
        &s.url,
        ADMIN,
        &[
            "image",
            "create",
            "--name",
            "rel",
            "--size-gib",
            "1",
            "--disk",
            "rel.qcow2",
        ],
    )
    .await;
    assert_eq!(r.code, Some(1), "{}", r.err);
    assert!(
        r.err
            .contains("origin.disk: must be an absolute path (start with '/')"),
        "{}",
        r.err
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_action_errors_name_the_field() {
    let s = Server::start(Backend::Sqlite).await.unwrap();
    let (_, tok) = s.account("acts").await;
    s.host("h1", "H100", 1).await;
    let f = s.flavor("h100x1", Some("H100"), 1).await;
    let img = s.image("ubuntu").await;
    let ins = s
        .post(
            "/v1/instances",
            &tok,
            json!({"name": "web", "flavor": f, "image": img}),
        )
        .await
        .id();
    s.observe(&ins, "Running").await;
    let path = format!("/v1/instances/{ins}/actions");
    let cases = [
        (json!({"action": "explode"}), "action"),
        (json!({"action": 7}), "action"),
        (json!({}), "action"),
        (json!(["stop"]), "action"),
        (json!({"action": "change-type"}), "flavor"),
        (json!({"action": "change-type", "flavor": "big"}), "flavor"),
        (
            json!({"action": "grow-disk", "root_disk_gib": "big"}),
            "root_disk_gib",
        ),
        (
            json!({"action": "grow-disk", "root_disk_gib": -1}),
            "root_disk_gib",
        ),
        (json!({"action": "stop", "force": true}), "force"),
    ];
    for (body, field) in cases {
        let r = s.post(&path, &tok, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.field(), field, "{body}: {}", r.body);
        assert!(r.error().starts_with(&format!("{field}: ")), "{}", r.body);
    }
    let r = s
        .post(
            "/v1/instances/batch",
            &tok,
            json!({"instances": [ins], "request": {"action": "explode"}}),
        )
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (400, "request.action"),
        "{}",
        r.body
    );
    let r = s
        .post(
            "/v1/instances/batch",
            &tok,
            json!({"instances": [ins], "request": {"action": "grow-disk"}}),
        )
        .await;
    assert_eq!(
        (r.status, r.field().as_str()),
        (400, "request.root_disk_gib"),
        "{}",
        r.body
    );
    // A good action still works.
    let r = s.post(&path, &tok, json!({"action": "release"})).await;
    assert_eq!(r.status, 202, "{}", r.body);
}
