//! Root passwords, SSH keys and certificates over real HTTP, each test on
//! SQLite and on PostgreSQL: reveal (audited) and reset through a
//! `set-password` operation, secrets sealed at rest, SSH keys into the
//! Create command, the CA and the hosts' HTTPS certificates (checked with
//! `openssl verify`), operators' own certificates.

#[macro_use]
mod common;

use common::{Server, ADMIN};
use gantry_controller::Config;
use reqwest::Method;
use serde_json::{json, Value};

on_both!(passwords);
on_both!(ssh_keys);
on_both!(certificates, |c: &mut Config| {
    c.host_domain_suffix = Some("gpu.example.net".into());
});

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@laptop";

/// Another well-formed ed25519 key line (its blob names its type).
fn other_key(seed: u8) -> String {
    use base64::Engine;
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&[seed; 32]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(blob);
    format!("ssh-ed25519 {b64} k{seed}")
}

async fn setup(s: &Server) -> (String, String, String, String, String) {
    let (acct, t) = s.account("acme").await;
    let host = s.host("gpu1", "H100", 0).await;
    let f = s.flavor("cpu", None, 0).await;
    let img = s.image("ubuntu").await;
    (acct, t, host, f, img)
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

/// The instance's unfinished operation in its host's work.
async fn op(s: &Server, id: &str) -> Value {
    s.op_of(id).await.expect("an operation")
}

/// `openssl passwd -6 -salt <salt of hash> <password>` equals `hash`.
fn openssl_agrees(password: &str, hash: &str) -> bool {
    let salt = hash.strip_prefix("$6$").unwrap().split('$').next().unwrap();
    let out = std::process::Command::new("openssl")
        .args(["passwd", "-6", "-salt", salt, password])
        .output()
        .expect("openssl runs");
    String::from_utf8_lossy(&out.stdout).trim() == hash
}

async fn reveal(s: &Server, t: &str, id: &str) -> String {
    let r = s.get(&format!("/v1/instances/{id}/password"), t).await;
    assert_eq!(
        (r.status, r.body["user"].as_str()),
        (200, Some("root")),
        "{}",
        r.body
    );
    r.body["password"].as_str().unwrap().to_string()
}

async fn passwords(s: Server) {
    let (_, t, host, f, img) = setup(&s).await;
    let (_, other) = s.account("other").await;
    let id = create(&s, &t, "web", &f, &img).await;
    let guest = op(&s, &id).await["command"]["spec"]["guest"].clone();
    let hash = guest["root_password_hash"].as_str().unwrap().to_string();
    let pw = reveal(&s, &t, &id).await;
    assert_eq!(pw.len(), 20);
    assert!(openssl_agrees(&pw, &hash), "{pw} {hash}");
    assert_eq!(
        s.get(&format!("/v1/instances/{id}/password"), &other)
            .await
            .status,
        404
    );
    // Every reveal is audited although it is a GET.
    let log = s.get("/v1/admin/audit", ADMIN).await.body;
    let path = format!("/v1/instances/{id}/password");
    let reveals: Vec<&Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"] == path.as_str() && e["method"] == "GET")
        .collect();
    assert_eq!(reveals.len(), 2, "{log}");
    assert!(reveals.iter().any(|e| e["status"] == 200));
    at_rest(&s, &id, &pw, guest["jupyter_token"].as_str().unwrap()).await;
    resets(&s, &t, &host, &id, &pw, &hash).await;
}

/// Resets: a set-password operation, its note, a failed one undone.
async fn resets(s: &Server, t: &str, host: &str, id: &str, pw: &str, hash: &str) {
    let path = format!("/v1/instances/{id}/password");
    // Not while the create is pending; then a set-password operation.
    let r = s.post(&path, t, json!({})).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.error().contains("pending operation"), "{}", r.body);
    s.observe(id, "Running").await;
    let r = s.call(Method::POST, &path, t, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        (r.body["kind"].as_str(), r.body["state"].as_str()),
        (Some("set-password"), Some("pending"))
    );
    let op_id = r.id();
    assert_eq!(s.call(Method::POST, &path, t, None).await.status, 409);
    let cmd = op(s, id).await["command"].clone();
    assert_eq!(cmd["kind"], "set-password");
    let new_hash = cmd["password_hash"].as_str().unwrap().to_string();
    let text = format!(
        "{:?}",
        serde_json::from_value::<gantry_proto::api::agent::AgentCommand>(cmd).unwrap()
    );
    assert!(
        !text.contains(&new_hash),
        "the hash is redacted in Debug: {text}"
    );
    let new_pw = reveal(s, t, id).await;
    assert_ne!((new_pw.as_str(), new_hash.as_str()), (pw, hash));
    assert!(openssl_agrees(&new_pw, &new_hash));
    let note = "applies at the next boot: the guest runs no guest agent";
    let r = s
        .report(
            host,
            &op_id,
            json!({"outcome": "succeeded", "progress": 100, "note": note}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let o = s.get(&format!("/v1/operations/{op_id}"), t).await.body;
    assert_eq!(
        (o["state"].as_str(), o["note"].as_str()),
        (Some("succeeded"), Some(note))
    );
    // A failed reset brings the password before it back.
    let r = s.call(Method::POST, &path, t, None).await;
    let failed = r.id();
    assert_ne!(reveal(s, t, id).await, new_pw);
    let r = s
        .report(
            host,
            &failed,
            json!({"outcome": "failed", "progress": 0, "error": "guest agent timed out"}),
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(reveal(s, t, id).await, new_pw);
    let r = s
        .report(
            host,
            &failed,
            json!({"outcome": "succeeded", "progress": 100, "note": "a\nb"}),
        )
        .await;
    assert_eq!(r.field(), "note");
}

/// Neither the password nor the token is stored in clear.
async fn at_rest(s: &Server, id: &str, pw: &str, token: &str) {
    use sqlx::Row;
    let db = s.db().await;
    let row = sqlx::query(
        "SELECT root_password_sealed, root_password_hash, jupyter_token_sealed FROM instances \
         WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    for c in [
        "root_password_sealed",
        "root_password_hash",
        "jupyter_token_sealed",
    ] {
        let v: String = row.try_get(c).unwrap();
        assert!(
            !v.contains(pw) && !v.contains(token),
            "{c} holds a secret in clear"
        );
    }
    let sealed: String = row.try_get("root_password_sealed").unwrap();
    assert!(sealed.starts_with("v1:"), "{sealed}");
    db.pool.close().await;
}

async fn ssh_keys(s: Server) {
    let (acct, t, _, f, img) = setup(&s).await;
    let (_, other) = s.account("other").await;
    let r = s
        .post(
            "/v1/ssh-keys",
            &t,
            json!({"name": "laptop", "public_key": ED25519}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["fingerprint"],
        "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU"
    );
    assert_eq!(r.body["account"], acct.as_str());
    let k1 = r.id();
    for (body, status, field) in [
        (
            json!({"name": "bad name", "public_key": ED25519}),
            422,
            "name",
        ),
        (
            json!({"name": "x", "public_key": "ssh-ed25519 AAAA"}),
            422,
            "public_key",
        ),
        (
            json!({"name": "x", "public_key": format!("command=\"x\" {ED25519}")}),
            422,
            "public_key",
        ),
        (
            json!({"name": "laptop", "public_key": other_key(1)}),
            409,
            "",
        ),
        (
            json!({"name": "again", "public_key": ED25519.replace("user@laptop", "me")}),
            409,
            "",
        ),
        (
            json!({"name": "x", "public_key": ED25519, "extra": 1}),
            400,
            "extra",
        ),
    ] {
        let r = s.post("/v1/ssh-keys", &t, body.clone()).await;
        assert_eq!(
            (r.status, r.field()),
            (status, field.to_string()),
            "{body}: {}",
            r.body
        );
    }
    let r = s
        .post(
            "/v1/ssh-keys",
            &t,
            json!({"name": "desk", "public_key": other_key(2)}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let k2 = r.id();
    keys_in_use(&s, &t, &other, &acct, [&k1, &k2], &f, &img).await;
}

/// Keys reach the Create command; another account sees none of them.
async fn keys_in_use(
    s: &Server,
    t: &str,
    other: &str,
    acct: &str,
    [k1, k2]: [&str; 2],
    f: &str,
    img: &str,
) {
    // Keys of the account at the time the command is built.
    let id = create(s, t, "web", f, img).await;
    let keys = op(s, &id).await["command"]["spec"]["guest"]["ssh_authorized_keys"].clone();
    assert_eq!(keys, json!([ED25519, other_key(2)]));
    // Another account neither sees nor deletes them.
    assert_eq!(s.get("/v1/ssh-keys", other).await.body, json!([]));
    let del = format!("/v1/ssh-keys/{k1}");
    assert_eq!(s.call(Method::DELETE, &del, other, None).await.status, 404);
    let mine = s.get("/v1/ssh-keys", t).await.body;
    assert_eq!(mine.as_array().unwrap().len(), 2);
    let by_admin = s
        .get(&format!("/v1/ssh-keys?account={acct}"), ADMIN)
        .await
        .body;
    assert_eq!(by_admin, mine);
    assert_eq!(s.call(Method::DELETE, &del, t, None).await.status, 204);
    let id2 = create(s, t, "web2", f, img).await;
    let keys = op(s, &id2).await["command"]["spec"]["guest"]["ssh_authorized_keys"].clone();
    assert_eq!(keys, json!([other_key(2)]));
    assert_eq!(s.get(&format!("/v1/ssh-keys/{k2}"), t).await.status, 405);
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `openssl verify` of the chain's leaf against the CA, for `name`.
fn verifies(ca: &str, chain: &str, flag: &str, name: &str) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaf) = (
        write(dir.path(), "ca.pem", ca),
        write(dir.path(), "leaf.pem", chain),
    );
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca)
        .args([flag, name])
        .arg(&leaf)
        .output()
        .expect("openssl runs");
    out.status.success()
}

async fn certificates(s: Server) {
    let (_, t, host, _, _) = setup(&s).await;
    let (status, ct, ca) = s.text("/v1/ca.pem", &t).await;
    assert_eq!((status, ct.as_str()), (200, "application/x-pem-file"));
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    let tls = s.work(&host, 0).await["tls"].clone();
    let chain = tls["cert_chain_pem"].as_str().unwrap().to_string();
    let fp = tls["fingerprint"].as_str().unwrap().to_string();
    assert!(tls["key_pem"].as_str().unwrap().contains("PRIVATE KEY"));
    assert!(verifies(
        &ca,
        &chain,
        "-verify_hostname",
        "8888-x.gpu1.gpu.example.net"
    ));
    assert!(verifies(
        &ca,
        &chain,
        "-verify_hostname",
        "gpu1.gpu.example.net"
    ));
    assert!(verifies(&ca, &chain, "-verify_hostname", "gpu1.example"));
    assert!(!verifies(
        &ca,
        &chain,
        "-verify_hostname",
        "gpu2.gpu.example.net"
    ));
    let der = gantry_controller::pki::leaf_der(&chain).unwrap();
    assert_eq!(gantry_controller::pki::fingerprint(&der), fp);
    // The agent that has it gets none; the poll does not answer for it.
    assert!(s.work_q(&host, &format!("tls={fp}")).await["tls"].is_null());
    assert_eq!(
        s.work(&host, 0).await["tls"]["fingerprint"],
        fp.as_str(),
        "stable"
    );
    operator_certificate(&s, &t, &host, &ca, &fp).await;
}

/// An operator's certificate replaces the CA's; a key that does not match
/// is refused; DELETE goes back.
async fn operator_certificate(s: &Server, t: &str, host: &str, ca: &str, fp: &str) {
    // An operator's certificate replaces it; a key that does not match is refused.
    let mine = rcgen::generate_simple_self_signed(vec!["*.gpu1.example.org".to_string()]).unwrap();
    let stranger = rcgen::KeyPair::generate().unwrap();
    let path = format!("/v1/admin/hosts/{host}/certificate");
    let set = |key: String| json!({"cert_chain_pem": mine.cert.pem(), "key_pem": key});
    let r = s
        .call(
            Method::PUT,
            &path,
            ADMIN,
            Some(set(stranger.serialize_pem())),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (422, "key_pem".to_string()),
        "{}",
        r.body
    );
    let r = s
        .call(
            Method::PUT,
            &path,
            ADMIN,
            Some(json!({"cert_chain_pem": "x", "key_pem": "y"})),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (422, "cert_chain_pem".to_string()),
        "{}",
        r.body
    );
    let r = s
        .call(
            Method::PUT,
            &path,
            t,
            Some(set(mine.key_pair.serialize_pem())),
        )
        .await;
    assert_eq!(r.status, 403);
    let r = s
        .call(
            Method::PUT,
            &path,
            ADMIN,
            Some(set(mine.key_pair.serialize_pem())),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let w = s.work_q(host, &format!("tls={fp}")).await;
    let theirs = gantry_controller::pki::fingerprint(mine.cert.der());
    assert_eq!(w["tls"]["fingerprint"], theirs.as_str(), "{w}");
    assert_eq!(w["tls"]["key_pem"], mine.key_pair.serialize_pem().as_str());
    // Back to the CA's.
    assert_eq!(s.call(Method::DELETE, &path, ADMIN, None).await.status, 204);
    let w = s.work_q(host, &format!("tls={theirs}")).await;
    let back = w["tls"]["cert_chain_pem"].as_str().unwrap();
    assert_ne!(w["tls"]["fingerprint"], theirs.as_str());
    assert!(verifies(
        ca,
        back,
        "-verify_hostname",
        "gpu1.gpu.example.net"
    ));
}
