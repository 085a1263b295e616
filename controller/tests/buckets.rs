//! Buckets as directories over real HTTP, on SQLite and PostgreSQL,
//! against real S3-protocol servers (moto): storage connections (checked,
//! created buckets, the secret never answered and sealed at rest),
//! attachments (default mount path, Config view, the host's work answer
//! with the key, health from heartbeats, detach), the refusals (bad
//! fields, a missing bucket, an unreachable endpoint, Snapshotting,
//! Released, other accounts' objects: 404), and wrong credentials refused
//! by a moto that checks signatures, at create and at attach.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use reqwest::Method;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Both backends; the S3 server is needed, so both are ignored by a plain
/// `cargo test` (`./scripts/test` runs them).
macro_rules! with_s3 {
    ($name:ident) => {
        mod $name {
            use crate::common::{Backend, Server};
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            #[ignore = "needs the S3 server: ./scripts/test runs it"]
            async fn sqlite() {
                let s = Server::start(Backend::Sqlite).await.unwrap();
                super::$name(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            #[ignore = "needs PostgreSQL and the S3 server: ./scripts/test runs it"]
            async fn postgres() {
                let s = Server::start(Backend::Postgres)
                    .await
                    .expect("GANTRY_TEST_PG_URL names a PostgreSQL server");
                super::$name(s).await;
            }
        }
    };
}

with_s3!(connections_and_attachments);
with_s3!(wrong_credentials_are_refused);

const CONNS: &str = "/v1/storage-connections";
const SECRET: &str = "never-shown-secret-4711";

/// The suite's S3 server (scripts/setup-s3).
fn s3_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").expect(
        "AWS_ENDPOINT_URL names the suite's S3 server (scripts/setup-s3 writes .cache/env/s3.env)",
    )
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

async fn running_instance(s: &Server, t: &str, f: &str, img: &str, name: &str) -> String {
    let r = s
        .post(
            "/v1/instances",
            t,
            json!({"name": name, "flavor": f, "image": img}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.id();
    s.observe(&id, "Running").await;
    id
}

fn conn_body(name: &str, endpoint: &str, bucket: &str, key: &str, secret: &str) -> Value {
    json!({"name": name, "endpoint": endpoint, "bucket": bucket,
        "access_key_id": key, "secret_access_key": secret})
}

async fn connections_and_attachments(s: Server) {
    let (_, t) = s.account("acme").await;
    let (_, other) = s.account("other").await;
    let f = s.flavor("cpu", None, 0).await;
    let img = s.image("ubuntu").await;
    let host = s.host("h1", "H100", 0).await;
    let ep = s3_endpoint();
    let bucket = unique("ckpt");

    // Bad fields are named; a missing bucket and a dead endpoint are
    // refused with what is wrong.
    let mut bad = conn_body("c", "ftp://x", &bucket, "k", SECRET);
    let r = s.post(CONNS, &t, bad.clone()).await;
    assert_eq!(
        (r.status, r.field()),
        (422, "endpoint".into()),
        "{}",
        r.body
    );
    bad["endpoint"] = json!(ep);
    bad["bucket"] = json!("Bad_Bucket");
    let r = s.post(CONNS, &t, bad).await;
    assert_eq!((r.status, r.field()), (422, "bucket".into()), "{}", r.body);
    let r = s
        .post(CONNS, &t, conn_body("c", &ep, &bucket, "k", SECRET))
        .await;
    assert_eq!((r.status, r.field()), (422, "bucket".into()), "{}", r.body);
    assert!(r.error().contains("does not exist"), "{}", r.body);
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let r = s
        .post(CONNS, &t, conn_body("c", &dead, &bucket, "k", SECRET))
        .await;
    assert_eq!(
        (r.status, r.field()),
        (422, "endpoint".into()),
        "{}",
        r.body
    );
    assert!(r.error().contains("cannot be reached"), "{}", r.body);

    // Created with its bucket; the secret is never answered.
    let mut body = conn_body("ckpt", &ep, &bucket, "gantry", SECRET);
    body["create_bucket"] = json!(true);
    let r = s.post(CONNS, &t, body.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let conn = r.id();
    assert!(!r.body.to_string().contains(SECRET));
    assert_eq!(r.body["region"], "us-east-1");
    let r = s.post(CONNS, &t, body).await;
    assert_eq!(r.status, 409, "the name is taken: {}", r.body);
    let list = s.ok(Method::GET, CONNS, &t, None, 200).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(SECRET));
    // Sealed at rest.
    let db = s.db().await;
    let sealed: String =
        sqlx::query_scalar("SELECT secret_sealed FROM storage_connections WHERE id = $1")
            .bind(&conn)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        sealed.starts_with("v1:") && !sealed.contains(SECRET),
        "{sealed}"
    );

    // Another account sees none of it.
    assert_eq!(s.get(&format!("{CONNS}/{conn}"), &other).await.status, 404);
    assert!(s
        .ok(Method::GET, CONNS, &other, None, 200)
        .await
        .as_array()
        .unwrap()
        .is_empty());

    let ins = running_instance(&s, &t, &f, &img, "trainer").await;
    let att = format!("/v1/instances/{ins}/buckets");
    let r = s
        .post(
            &att,
            &t,
            json!({"connection": conn, "mount_path": "/etc/x"}),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (422, "mount_path".into()),
        "{}",
        r.body
    );
    let r = s.post(&att, &other, json!({"connection": conn})).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let o_ins = running_instance(&s, &other, &f, &img, "theirs").await;
    let r = s
        .post(
            &format!("/v1/instances/{o_ins}/buckets"),
            &other,
            json!({"connection": conn}),
        )
        .await;
    assert_eq!(r.status, 404, "another account's connection: {}", r.body);

    // Attached at /mnt/<bucket>; the host's work answer has the key.
    let r = s.post(&att, &t, json!({"connection": conn})).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["mount_path"], format!("/mnt/{bucket}"));
    assert_eq!(r.body["health"], "pending");
    assert!(!r.body.to_string().contains(SECRET));
    let r = s.post(&att, &t, json!({"connection": conn})).await;
    assert_eq!(r.status, 409, "attached twice: {}", r.body);
    let w = s.work(&host, 0).await;
    let m = &w["buckets"]["mounts"][0];
    assert_eq!(m["instance"], ins);
    assert_eq!(m["secret_access_key"], SECRET);
    assert_eq!(m["read_only"], false);
    let rev = w["buckets"]["rev"].as_u64().unwrap();
    let again = s.work_q(&host, &format!("buckets_rev={rev}")).await;
    assert!(
        again["buckets"].is_null(),
        "unchanged state not sent again: {again}"
    );

    // Health from the heartbeat; shown in the list and the Config view.
    let r = s
        .heartbeat(
            &host,
            json!({"buckets": [{"instance": ins, "connection": conn, "health": "failed",
                "detail": "s3fs: unable to connect"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let listed = s.ok(Method::GET, &att, &t, None, 200).await;
    assert_eq!(listed[0]["health"], "failed");
    assert_eq!(listed[0]["detail"], "s3fs: unable to connect");
    let cfg = s
        .ok(
            Method::GET,
            &format!("/v1/instances/{ins}/config"),
            &t,
            None,
            200,
        )
        .await;
    assert_eq!(cfg["buckets"][0]["bucket"], bucket.as_str());
    assert_eq!(s.get(&att, &other).await.status, 404);

    // Refused while attached; detach, then delete.
    let r = s
        .call(Method::DELETE, &format!("{CONNS}/{conn}"), &t, None)
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let one = format!("{att}/{conn}");
    assert_eq!(s.call(Method::DELETE, &one, &other, None).await.status, 404);
    assert_eq!(s.call(Method::DELETE, &one, &t, None).await.status, 204);
    assert_eq!(s.call(Method::DELETE, &one, &t, None).await.status, 404);
    let w = s.work(&host, 0).await;
    assert_eq!(w["buckets"]["mounts"], json!([]));

    // Snapshotting and Released instances are refused.
    let r = s
        .post(
            &format!("/v1/instances/{ins}/snapshots"),
            &t,
            json!({"name": "s1"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    s.observe(&ins, "Snapshotting").await;
    let r = s
        .post(&att, &t, json!({"connection": conn, "read_only": true}))
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("Snapshotting"), "{}", r.body);
    s.observe(&ins, "Running").await;
    s.finish_snapshot(&ins, 1 << 30, 1 << 20).await;
    let r = s
        .post(&att, &t, json!({"connection": conn, "read_only": true}))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = s
        .post(
            &format!("/v1/instances/{ins}/actions"),
            &t,
            json!({"action": "release"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    s.observe(&ins, "Released").await;
    let r = s.post(&att, &t, json!({"connection": conn})).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("Released"), "{}", r.body);
    // A Released instance holds nothing: the connection may go.
    let r = s
        .call(Method::DELETE, &format!("{CONNS}/{conn}"), &t, None)
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    // Admins see every account's (none left here).
    let all = s.ok(Method::GET, CONNS, ADMIN, None, 200).await;
    assert!(all.as_array().unwrap().is_empty(), "{all}");
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A moto server of this test's own that checks request signatures, with
/// one IAM user allowed everything and two access keys.
struct AuthS3 {
    child: Child,
    endpoint: String,
    keys: Vec<(String, String)>,
}

impl Drop for AuthS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn venv_bin(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../.cache/s3/venv/bin/{name}"))
}

fn auth_s3() -> AuthS3 {
    let moto = venv_bin("moto_server");
    assert!(
        moto.exists(),
        "{} is missing: run scripts/setup-s3",
        moto.display()
    );
    let port = closed_port();
    let child = Command::new(&moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        // The first four calls (the user, its policy, two keys) go
        // unsigned; everything after is checked.
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "moto_server did not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let script = r#"
import sys, json, boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
    aws_access_key_id="x", aws_secret_access_key="x")
iam.create_user(UserName="gantry")
iam.put_user_policy(UserName="gantry", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
keys = [iam.create_access_key(UserName="gantry")["AccessKey"] for _ in range(2)]
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
    aws_access_key_id=keys[0]["AccessKeyId"], aws_secret_access_key=keys[0]["SecretAccessKey"])
s3.create_bucket(Bucket="guarded")
print(json.dumps([[k["AccessKeyId"], k["SecretAccessKey"]] for k in keys]))
"#;
    let out = Command::new(venv_bin("python"))
        .args(["-c", script, &endpoint])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: Vec<(String, String)> = serde_json::from_slice(&out.stdout).unwrap();
    AuthS3 {
        child,
        endpoint,
        keys,
    }
}

async fn wrong_credentials_are_refused(s: Server) {
    let s3 = auth_s3();
    let (_, t) = s.account("acme").await;
    let f = s.flavor("cpu", None, 0).await;
    let img = s.image("ubuntu").await;
    s.host("h1", "H100", 0).await;
    let (k1, secret1) = s3.keys[0].clone();
    let (k2, secret2) = s3.keys[1].clone();

    let r = s
        .post(
            CONNS,
            &t,
            conn_body("bad", &s3.endpoint, "guarded", &k1, "wrong-secret"),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (422, "secret_access_key".into()),
        "{}",
        r.body
    );
    assert!(
        r.error().contains("wrong access key or secret"),
        "{}",
        r.body
    );
    assert!(!r.body.to_string().contains("wrong-secret"));

    let r = s
        .post(
            CONNS,
            &t,
            conn_body("good", &s3.endpoint, "guarded", &k2, &secret2),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let conn = r.id();
    // The key is revoked at the endpoint: the attach says so.
    let script = r#"
import sys, boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
    aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
iam.delete_access_key(UserName="gantry", AccessKeyId=sys.argv[4])
"#;
    let out = Command::new(venv_bin("python"))
        .args(["-c", script, &s3.endpoint, &k1, &secret1, &k2])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ins = running_instance(&s, &t, &f, &img, "trainer").await;
    let r = s
        .post(
            &format!("/v1/instances/{ins}/buckets"),
            &t,
            json!({"connection": conn}),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (422, "connection".into()),
        "{}",
        r.body
    );
    assert!(r.error().contains("refused access key"), "{}", r.body);
    assert!(!r.body.to_string().contains(&secret2));
}
