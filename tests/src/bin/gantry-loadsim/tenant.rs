//! Tenant loops: each account creates instances (a CPU or, one time in
//! four, a GPU flavor), waits for them to run, and releases each after a
//! random lifetime. Creating stops when the run ends; the instances still
//! live then are released when their lifetime is up (the drain).

use crate::api::{Api, CallError, NO_BODY};
use crate::host::Shared;
use gantry_proto::api::v1::{OperationInfo, OperationState};
use gantry_proto::ids::{AccountId, FlavorId, ImageId, InstanceId, OperationId};
use reqwest::Method;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

pub struct Tenant {
    pub index: usize,
    pub account: AccountId,
    pub token: String,
    pub initial_credit: i64,
}

/// What every tenant loop follows.
pub struct Plan {
    pub cpu_flavor: FlavorId,
    pub gpu_flavor: FlavorId,
    pub image: ImageId,
    /// Creating stops at this time.
    pub end: Instant,
    pub lifetime_secs: (u64, u64),
    /// Most live instances per tenant.
    pub live: usize,
    /// `pack` or `spread`.
    pub placement: String,
    /// Read each instance's Monitor view every 2 s while it lives.
    pub monitor_views: bool,
}

const CALL: Duration = Duration::from_secs(30);

/// Runs one tenant until `plan.end`, then until all its instances are
/// released. Returns the ids it created.
pub async fn run(t: Arc<Tenant>, sh: Arc<Shared>, plan: Arc<Plan>) -> Vec<InstanceId> {
    let sem = Arc::new(Semaphore::new(plan.live));
    let mut tasks = JoinSet::new();
    let mut made = Vec::new();
    let mut n = 0u64;
    while Instant::now() < plan.end {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p.expect("semaphore open"),
            _ = tokio::time::sleep_until(plan.end) => break,
        };
        n += 1;
        let name = format!("t{}-{n}", t.index);
        let gpu = rand::random_range(0..4) == 0;
        let flavor = if gpu {
            plan.gpu_flavor
        } else {
            plan.cpu_flavor
        };
        let body = json!({
            "name": name, "flavor": flavor, "image": plan.image, "placement": plan.placement,
        });
        sh.create_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), std::time::Instant::now());
        let started = Instant::now();
        let r: Result<serde_json::Value, _> = sh
            .api
            .call(
                "tenant: create",
                Method::POST,
                "/v1/instances",
                &t.token,
                Some(&body),
                CALL,
            )
            .await;
        match r.ok().and_then(|v| parse_created(&v)) {
            Some((id, op)) => {
                made.push(id);
                let (sh, t, plan) = (sh.clone(), t.clone(), plan.clone());
                tasks.spawn(async move {
                    lifecycle(&sh.api, &t, &plan, id, op, started).await;
                    drop(permit);
                });
            }
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
        let gap = rand::random_range(50..300);
        tokio::time::sleep(Duration::from_millis(gap)).await;
    }
    while tasks.join_next().await.is_some() {}
    made
}

fn parse_created(v: &serde_json::Value) -> Option<(InstanceId, OperationId)> {
    let id = v.get("id")?.as_str()?.parse().ok()?;
    let op = v.get("operation")?.as_str()?.parse().ok()?;
    Some((id, op))
}

/// Waits for the create, keeps the instance for its lifetime, releases it
/// and waits for the release.
async fn lifecycle(
    api: &Api,
    t: &Tenant,
    plan: &Plan,
    id: InstanceId,
    op: OperationId,
    start: Instant,
) {
    if !wait_op(api, &t.token, op, "create").await {
        return;
    }
    api.stats
        .sample("tenant: create -> op succeeded", start.elapsed());
    let (lo, hi) = plan.lifetime_secs;
    let life = Duration::from_millis(rand::random_range(lo * 1000..=hi * 1000));
    if plan.monitor_views {
        crate::monitor::watch(api, &t.token, id, start + life).await;
    }
    tokio::time::sleep_until(start + life).await;
    let path = format!("/v1/instances/{id}/actions");
    let body = json!({"action": "release"});
    let released = Instant::now();
    let mut op = None;
    // Retried only when the call itself failed (timeout, connection).
    for _ in 0..5 {
        let r: Result<serde_json::Value, _> = api
            .call(
                "tenant: release",
                Method::POST,
                &path,
                &t.token,
                Some(&body),
                CALL,
            )
            .await;
        match r {
            Ok(v) => {
                op = v.get("operation").and_then(|o| o.as_str()?.parse().ok());
                if op.is_none() {
                    api.stats
                        .error("tenant: release: no operation in the answer".into());
                }
                break;
            }
            Err(CallError::Timeout | CallError::Connect(_)) => {
                tokio::time::sleep(Duration::from_secs(1)).await
            }
            Err(_) => break,
        }
    }
    let Some(op) = op else { return };
    if wait_op(api, &t.token, op, "release").await {
        api.stats
            .sample("tenant: release -> op succeeded", released.elapsed());
    }
}

/// Polls an operation every 200 ms until it ends (60 s at most); true
/// when it succeeded.
async fn wait_op(api: &Api, token: &str, op: OperationId, what: &str) -> bool {
    let path = format!("/v1/operations/{op}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r: Result<OperationInfo, _> = api
            .call(
                "tenant: get operation",
                Method::GET,
                &path,
                token,
                NO_BODY,
                CALL,
            )
            .await;
        match r.map(|i| (i.state, i.error)) {
            Ok((OperationState::Succeeded, _)) => return true,
            Ok((s, e)) if s.is_final() => {
                api.stats.error(format!(
                    "tenant: {what} op failed: {}",
                    e.unwrap_or_default()
                ));
                return false;
            }
            _ => {}
        }
    }
    api.stats
        .error(format!("tenant: {what} op not done in 60 s"));
    false
}
