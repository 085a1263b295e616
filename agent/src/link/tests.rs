//! The link against a tiny controller played by an axum server in the
//! test: join, heartbeat, work with operations, reports, re-delivery.
//! The manager runs on libvirt's built-in `test:///default` driver: these
//! operations (store deletes, refused actions) never reach a hypervisor.

use super::*;
use crate::config::AgentConfig;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::api::agent::{
    AgentCommand, AgentHeartbeat, AgentOp, HeartbeatAck, JoinResponse, OpOutcome, OpPhase,
    OpReport, Work,
};
use gantry_proto::api::agent::{ImageOrigin, ImageSource};
use gantry_proto::spec::InstanceSpec;
use gantry_proto::{InstanceId, InstanceState, SnapshotId};
use std::os::unix::fs::PermissionsExt;

#[derive(Default)]
struct Ctl {
    joins: u32,
    heartbeats: Vec<AgentHeartbeat>,
    ops: Vec<AgentOp>,
    desired: Vec<gantry_proto::api::agent::DesiredInstance>,
    /// Listed in every work answer, reported or not.
    sticky: Vec<AgentOp>,
    reports: Vec<(OperationId, OpReport)>,
}

type Shared = Arc<Mutex<Ctl>>;

fn bearer(h: &HeaderMap) -> String {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string()
}

async fn join(State(s): State<Shared>, h: HeaderMap) -> (StatusCode, Json<serde_json::Value>) {
    if bearer(&h) != "gjt_test" {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "bad token"})),
        );
    }
    s.lock().unwrap().joins += 1;
    let r = JoinResponse {
        host: HostId::new(),
        credential: "ghc_test".into(),
        heartbeat_secs: 1,
    };
    (StatusCode::CREATED, Json(serde_json::to_value(r).unwrap()))
}

/// The controller's chunk key of an account: fixed per account here.
async fn store_keys(
    h: HeaderMap,
    UrlPath(account): UrlPath<String>,
) -> Result<Json<gantry_proto::api::agent::StoreKeys>, StatusCode> {
    if bearer(&h) != "ghc_test" {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let key = blake3::derive_key("test store key", account.as_bytes());
    Ok(Json(gantry_proto::api::agent::StoreKeys {
        account: account.parse().map_err(|_| StatusCode::NOT_FOUND)?,
        current: gantry_proto::net::Secret::new(blake3::Hash::from_bytes(key).to_hex().to_string()),
        previous: Vec::new(),
    }))
}

async fn heartbeat(
    State(s): State<Shared>,
    h: HeaderMap,
    Json(hb): Json<AgentHeartbeat>,
) -> Result<Json<HeartbeatAck>, StatusCode> {
    if bearer(&h) != "ghc_test" {
        return Err(StatusCode::UNAUTHORIZED);
    }
    s.lock().unwrap().heartbeats.push(hb);
    Ok(Json(HeartbeatAck {
        heartbeat_secs: 1,
        billed: vec![],
    }))
}

async fn work(State(s): State<Shared>, h: HeaderMap) -> Result<Json<Work>, StatusCode> {
    if bearer(&h) != "ghc_test" {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let (ops, instances) = {
        let c = s.lock().unwrap();
        let mut ops = c.ops.clone();
        ops.extend(c.sticky.iter().cloned());
        (ops, c.desired.clone())
    };
    if ops.is_empty() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Json(Work {
        instances,
        ops,
        access: None,
        tls: None,
        groups: None,
        buckets: None,
    }))
}

async fn report(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<OperationId>,
    Json(r): Json<OpReport>,
) -> StatusCode {
    let mut c = s.lock().unwrap();
    if r.outcome != OpOutcome::Running {
        c.ops.retain(|o| o.id != id);
    }
    c.reports.push((id, r));
    StatusCode::NO_CONTENT
}

async fn controller(shared: Shared) -> String {
    let app = Router::new()
        .route("/v1/agent/join", post(join))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/work", get(work))
        .route("/v1/agent/ops/{id}", post(report))
        .route("/v1/agent/store-keys/{account}", get(store_keys))
        .with_state(shared);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn op(command: AgentCommand, instance: Option<InstanceId>) -> AgentOp {
    AgentOp {
        id: OperationId::new(),
        instance,
        phase: OpPhase::Pending,
        command,
    }
}

async fn wait_for(shared: &Shared, what: &str, f: impl Fn(&Ctl) -> bool) {
    for _ in 0..200 {
        if f(&shared.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn outcomes(c: &Ctl, id: OperationId) -> Vec<OpOutcome> {
    c.reports
        .iter()
        .filter(|(o, _)| *o == id)
        .map(|(_, r)| r.outcome)
        .collect()
}

async fn open_manager(dir: &std::path::Path) -> Arc<Manager> {
    let cfg = AgentConfig {
        state_dir: dir.join("state"),
        libvirt_uri: "test:///default".into(),
        gpu: Default::default(),
        ..AgentConfig::default()
    };
    tokio::task::spawn_blocking(move || Manager::open(cfg, crate::gpu::GpuPool::empty()))
        .await
        .unwrap()
        .unwrap()
}

fn controller_cfg(url: &str) -> ControllerConfig {
    ControllerConfig {
        url: Some(url.into()),
        urls: Vec::new(),
        join_token_file: None,
        join_token: Some("gjt_test".into()),
        host_name: Some("gpu-test".into()),
        address: None,
        poll_wait_secs: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_heartbeats_and_carries_out_each_operation_once() {
    let dir = tempfile::tempdir().unwrap();
    let shared: Shared = Arc::default();
    let url = controller(shared.clone()).await;
    let ccfg = controller_cfg(&url);
    let manager = open_manager(dir.path()).await;
    let delete = op(
        AgentCommand::DeleteSnapshot {
            snapshot: SnapshotId::new(),
        },
        None,
    );
    let ghost = InstanceId::new();
    let start = op(AgentCommand::Start {}, Some(ghost));
    shared.lock().unwrap().ops = vec![delete.clone(), start.clone()];

    let link = connect(manager.clone(), ccfg.clone()).await.unwrap();
    let cred = manager.layout().controller_file();
    let mode = std::fs::metadata(&cred).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!std::fs::read_to_string(&cred).unwrap().contains("gjt_test"));
    let task = tokio::spawn(run(link));

    wait_for(&shared, "both outcomes", |c| c.ops.is_empty()).await;
    wait_for(&shared, "a heartbeat", |c| !c.heartbeats.is_empty()).await;
    {
        let c = shared.lock().unwrap();
        assert_eq!(c.joins, 1);
        let got = outcomes(&c, delete.id);
        assert_eq!(
            got[..2],
            [OpOutcome::Running, OpOutcome::Succeeded],
            "an unknown snapshot is already deleted"
        );
        let failed = c
            .reports
            .iter()
            .find(|(o, r)| *o == start.id && r.outcome == OpOutcome::Failed)
            .expect("start failed");
        let why = failed.1.error.clone().unwrap();
        assert!(why.contains(&ghost.to_string()), "{why}");
        let hb = &c.heartbeats[0];
        assert!(hb.capacity.vcpus >= 1 && hb.capacity.memory_mib > 0);
        assert!(hb.capacity.disk_gib > 0);
    }

    // The same operation delivered again: its outcome is re-reported, it is
    // not run again (no second Running report).
    let before = outcomes(&shared.lock().unwrap(), delete.id).len();
    shared.lock().unwrap().ops = vec![delete.clone()];
    wait_for(&shared, "the re-report", |c| c.ops.is_empty()).await;
    let got = outcomes(&shared.lock().unwrap(), delete.id);
    assert!(got.len() > before, "re-reported: {got:?}");
    assert_eq!(
        got.iter().filter(|o| **o == OpOutcome::Running).count(),
        1,
        "run once: {got:?}"
    );
    assert!(
        got[1..].iter().all(|o| *o == OpOutcome::Succeeded),
        "{got:?}"
    );
    task.abort();

    // A restarted link keeps its credential (no second join).
    let again = connect(manager, ccfg).await.unwrap();
    assert_eq!(shared.lock().unwrap().joins, 1);
    assert_eq!(again.credential(), "ghc_test");
}

/// An instance released just before a restart leaves nothing the restarted
/// agent knows of: a release of it succeeds (Released), and while the
/// controller still wants it Released, heartbeats say it is. An instance
/// whose create is listed is not reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_host_holds_nothing_of_is_released() {
    use gantry_proto::api::agent::{DesiredInstance, ObservedInstance};
    let dir = tempfile::tempdir().unwrap();
    let shared: Shared = Arc::default();
    let url = controller(shared.clone()).await;
    let manager = open_manager(dir.path()).await;
    let (forgotten, drifted, queued) = (InstanceId::new(), InstanceId::new(), InstanceId::new());
    let release = op(AgentCommand::Release {}, Some(forgotten));
    let desired = |id| DesiredInstance {
        id,
        desired: InstanceState::Released,
        observed: InstanceState::Stopped,
    };
    {
        let mut c = shared.lock().unwrap();
        c.ops = vec![release.clone()];
        c.desired = vec![desired(drifted), desired(queued)];
    }
    let link = connect(manager.clone(), controller_cfg(&url))
        .await
        .unwrap();
    let task = tokio::spawn(run(link));
    wait_for(&shared, "the release's outcome", |c| c.ops.is_empty()).await;
    {
        let c = shared.lock().unwrap();
        let (_, r) = c
            .reports
            .iter()
            .find(|(o, r)| *o == release.id && r.outcome != OpOutcome::Running)
            .expect("a final report");
        assert_eq!(r.outcome, OpOutcome::Succeeded, "{r:?}");
        assert_eq!(r.instance_state, Some(InstanceState::Released));
    }
    // An operation on `queued` is listed (a create whose image is still
    // being fetched, say): not reported while it is.
    shared.lock().unwrap().sticky = vec![op(AgentCommand::Start {}, Some(queued))];
    let released = |hb: &AgentHeartbeat, id| {
        hb.instances.contains(&ObservedInstance {
            id,
            state: InstanceState::Released,
            last_error: None,
        })
    };
    shared.lock().unwrap().heartbeats.clear();
    wait_for(&shared, "two heartbeats", |c| c.heartbeats.len() >= 2).await;
    {
        let c = shared.lock().unwrap();
        let hb = c.heartbeats.last().unwrap();
        assert!(released(hb, drifted), "{:?}", hb.instances);
        assert!(!released(hb, queued), "{:?}", hb.instances);
    }
    // Once the controller no longer lists it, it is not reported.
    {
        let mut c = shared.lock().unwrap();
        c.desired.clear();
        c.sticky.clear();
    }
    wait_for(&shared, "a heartbeat without it", |c| {
        c.heartbeats.last().is_some_and(|hb| !released(hb, drifted))
    })
    .await;
    task.abort();
}

/// Publishes a small snapshot under `id` in the manager's store.
fn publish(
    m: &Manager,
    dir: &std::path::Path,
    id: SnapshotId,
    owner: gantry_proto::AccountId,
) -> gantry_store::Store {
    let disk = dir.join("root.raw");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let store = m.open_store().unwrap();
    let (sid, own) = (id.to_string(), owner.to_string());
    store
        .create(&gantry_store::CreateRequest {
            image: &disk,
            name: "s",
            owner: Some(&own),
            parent: None,
            changed_extents: None,
            progress: None,
            id: Some(&sid),
        })
        .unwrap();
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_interrupted_by_a_restart_are_settled_not_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let shared: Shared = Arc::default();
    let url = controller(shared.clone()).await;
    let manager = open_manager(dir.path()).await;
    let j = journal::Journal::open(&manager.layout().controller_ops_dir()).unwrap();
    // A snapshot the previous process started, a release of an instance
    // that is gone, and an outcome recorded but never reported.
    let snap_id = SnapshotId::new();
    let owner = gantry_proto::AccountId::new();
    let snap = op(
        AgentCommand::Snapshot {
            snapshot: snap_id,
            name: "s".into(),
            owner,
            auto_release: false,
        },
        Some(InstanceId::new()),
    );
    // The snapshot made it into the store just before the "restart";
    // another one did not.
    let store = publish(&manager, dir.path(), snap_id, owner);
    let lost = op(
        AgentCommand::Snapshot {
            snapshot: SnapshotId::new(),
            name: "lost".into(),
            owner,
            auto_release: false,
        },
        Some(InstanceId::new()),
    );
    let release = op(AgentCommand::Release {}, Some(InstanceId::new()));
    let done = op(AgentCommand::Stop {}, Some(InstanceId::new()));
    for o in [&snap, &lost, &release, &done] {
        j.accept(o, now_ms()).unwrap();
    }
    j.finish(done.id, journal::Finished::failed("it was refused", None))
        .unwrap();
    shared.lock().unwrap().ops = vec![snap.clone(), lost.clone(), release.clone(), done.clone()];

    let link = connect(manager, controller_cfg(&url)).await.unwrap();
    let task = tokio::spawn(run(link));
    wait_for(&shared, "four outcomes", |c| c.ops.is_empty()).await;
    task.abort();
    let c = shared.lock().unwrap();
    let settled = |id: OperationId| -> &OpReport {
        let rs: Vec<&OpReport> = c
            .reports
            .iter()
            .filter(|(o, _)| *o == id)
            .map(|(_, r)| r)
            .collect();
        // Never run again (no Running report); a poll racing the first
        // report may see the outcome re-reported, always the same one.
        assert!(!rs.is_empty());
        assert!(
            rs.iter()
                .all(|r| *r == rs[0] && r.outcome != OpOutcome::Running),
            "{rs:?}"
        );
        rs[0]
    };
    // Published: it succeeded, with its sizes.
    let s = settled(snap.id);
    assert_eq!(s.outcome, OpOutcome::Succeeded, "{s:?}");
    assert!(
        s.snapshot.as_ref().is_some_and(|z| z.compressed_bytes > 0),
        "{s:?}"
    );
    let l = settled(lost.id);
    assert_eq!(l.outcome, OpOutcome::Failed);
    assert_eq!(l.error.as_deref(), Some("interrupted by an agent restart"));
    let r = settled(release.id);
    assert_eq!(r.outcome, OpOutcome::Succeeded);
    assert_eq!(r.instance_state, Some(InstanceState::Released));
    let d = settled(done.id);
    assert_eq!(d.error.as_deref(), Some("it was refused"));
    assert!(j.all().unwrap().iter().all(|e| e.reported));
    assert_eq!(
        store.snapshot_ids().unwrap(),
        vec![snap_id.to_string()],
        "the published snapshot stays in the store"
    );
}

/// The real-VM rig (libvirtd + the test guest); fails the test with a
/// sentence without it (the test is ignored by a plain `cargo test`).
fn rig(test: &str) -> Option<(String, std::path::PathBuf)> {
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").ok();
    let guest = std::env::var_os("GANTRY_GUEST_DIR").map(std::path::PathBuf::from);
    if let (Some(u), Some(g)) = (uri, guest) {
        return Some((u, g));
    }
    panic!(
        "{test}: needs LIBVIRT_DEFAULT_URI and GANTRY_GUEST_DIR (run ./scripts/test, or scripts/setup-host and scripts/build-guest, then source .cache/env/*.env)"
    );
}

/// Waits for the final report of `id` and returns it.
async fn outcome_of(shared: &Shared, id: OperationId) -> OpReport {
    for _ in 0..1200 {
        let found = shared
            .lock()
            .unwrap()
            .reports
            .iter()
            .rev()
            .find(|(o, r)| *o == id && r.outcome != OpOutcome::Running)
            .map(|(_, r)| r.clone());
        if let Some(r) = found {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no outcome for {id}");
}

async fn run_op(shared: &Shared, o: AgentOp) -> OpReport {
    shared.lock().unwrap().ops.push(o.clone());
    let r = outcome_of(shared, o.id).await;
    assert_eq!(r.outcome, OpOutcome::Succeeded, "{:?}: {r:?}", o.command);
    r
}

/// Removes the state directory and any domain the test left behind.
struct Cleanup(std::path::PathBuf, Vec<InstanceId>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.1 {
            let name = crate::manager::domain_name(*id);
            for verb in ["destroy", "undefine"] {
                let _ = std::process::Command::new("virsh")
                    .args([verb, &name])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn guest_source(guest: &std::path::Path, image: gantry_proto::ImageId) -> ImageSource {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(guest.join("image.json")).unwrap()).unwrap();
    let file = |k: &str| guest.join(meta[k].as_str().unwrap()).display().to_string();
    ImageSource {
        image,
        name: "guest".into(),
        origin: ImageOrigin::File {
            disk: file("disk"),
            kernel: Some(file("kernel")),
            initrd: Some(file("initrd")),
            cmdline: meta["cmdline"].as_str().map(str::to_string),
        },
    }
}

fn vm_spec(id: InstanceId, image: gantry_proto::ImageId) -> InstanceSpec {
    InstanceSpec {
        id,
        name: "link-vm".into(),
        vcpus: 1,
        memory_mib: 256,
        root_disk_gib: 1,
        image,
        data_volume: None,
        gpus: vec![],
        nic: None,
        guest: None,
    }
}

/// Creates `a` from the guest file, snapshots it under the controller's
/// id, and creates `b` from that snapshot.
async fn create_snapshot_restore(
    shared: &Shared,
    m: &Manager,
    guest: &std::path::Path,
    a: InstanceId,
    b: InstanceId,
) {
    let image = gantry_proto::ImageId::new();
    let create = AgentCommand::Create {
        spec: vm_spec(a, image),
        image: guest_source(guest, image),
    };
    let r = run_op(shared, op(create, Some(a))).await;
    assert_eq!(r.instance_state, Some(InstanceState::Running));

    let snap = SnapshotId::new();
    let take = AgentCommand::Snapshot {
        snapshot: snap,
        name: "first".into(),
        owner: gantry_proto::AccountId::new(),
        auto_release: false,
    };
    let r = run_op(shared, op(take, Some(a))).await;
    let sizes = r.snapshot.expect("snapshot sizes");
    assert_eq!(sizes.logical_bytes, 1 << 30);
    assert!(sizes.compressed_bytes > 0);
    assert_eq!(r.instance_state, Some(InstanceState::Running));
    // Published under the controller's id, on top of the image's own
    // manifest (the first snapshot of an image's instance publishes it).
    let mut ids = m.open_store().unwrap().snapshot_ids().unwrap();
    ids.sort();
    let mut want = vec![
        snap.to_string(),
        crate::snapshots::chain::image_manifest(image).to_string(),
    ];
    want.sort();
    assert_eq!(ids, want, "published under the controller's id");

    let restored = ImageSource::snapshot_image_id(snap);
    let from_snap = ImageSource {
        image: restored,
        name: "first".into(),
        origin: ImageOrigin::Snapshot {
            snapshot: snap,
            boot_like: Some(image),
            boot_like_source: None,
        },
    };
    let create_b = AgentCommand::Create {
        spec: vm_spec(b, restored),
        image: from_snap,
    };
    let r = run_op(shared, op(create_b, Some(b))).await;
    assert_eq!(r.instance_state, Some(InstanceState::Running));
}

/// Stops `a` (its Running time stops growing) and releases both.
async fn stop_and_release(shared: &Shared, m: &Manager, a: InstanceId, b: InstanceId) {
    let r = run_op(shared, op(AgentCommand::Stop {}, Some(a))).await;
    assert_eq!(r.instance_state, Some(InstanceState::Stopped));
    let (_, ran) = m.usage().peek(a).unwrap();
    assert!(ran > 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(m.usage().peek(a).unwrap().1, ran, "stopped: not counted");

    for id in [a, b] {
        let r = run_op(shared, op(AgentCommand::Release {}, Some(id))).await;
        assert_eq!(r.instance_state, Some(InstanceState::Released));
    }
    wait_for(shared, "a heartbeat with both released", |c| {
        c.heartbeats.last().is_some_and(|hb| {
            [a, b].iter().all(|id| {
                hb.instances
                    .iter()
                    .any(|o| o.id == *id && o.state == InstanceState::Released)
            }) && hb
                .usage
                .iter()
                .any(|u| u.instance == a && u.running_ms == ran)
        })
    })
    .await;
}

/// Create (image from a host file), snapshot under the controller's id,
/// create from that snapshot, stop, release: each op once, with the
/// outcome and the instance state a controller needs; Running time counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the VM rig: ./scripts/test runs it"]
async fn real_vms_through_the_link() {
    let Some((uri, guest)) = rig("real_vms_through_the_link") else {
        return;
    };
    // Not a 0700 tempdir: QEMU runs as its own user and must traverse it.
    let state = std::path::PathBuf::from(format!("/var/tmp/gl-{:08x}", rand::random::<u32>()));
    let (a, b) = (InstanceId::new(), InstanceId::new());
    let _cleanup = Cleanup(state.clone(), vec![a, b]);
    let cfg = AgentConfig {
        state_dir: state.clone(),
        libvirt_uri: uri,
        reserved_memory_mib: 256,
        stop_timeout_secs: 5,
        gpu: Default::default(),
        ..AgentConfig::default()
    };
    let manager =
        tokio::task::spawn_blocking(move || Manager::open(cfg, crate::gpu::GpuPool::empty()))
            .await
            .unwrap()
            .unwrap();
    let shared: Shared = Arc::default();
    let url = controller(shared.clone()).await;
    let link = connect(manager.clone(), controller_cfg(&url))
        .await
        .unwrap();
    let task = tokio::spawn(run(link));
    create_snapshot_restore(&shared, &manager, &guest, a, b).await;
    stop_and_release(&shared, &manager, a, b).await;
    task.abort();
}
