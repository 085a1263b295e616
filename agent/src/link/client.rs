//! The HTTP client of the controller's `/v1/agent/*` endpoints, and the
//! retry schedule every call to it follows: exponential backoff from
//! 500 ms, doubling up to 15 s, each wait stretched by a random 0-100 %
//! (jitter), so never more than 30 s; a transient failure (connection
//! refused, timeout, 5xx, 408, 429) is retried forever.
//!
//! With several controller URLs (replicas on one database), a call that
//! cannot connect, times out or gets a 5xx goes at once to the next URL,
//! in order, each tried once per call; the one that answers is where
//! later calls start (sticky). Only when every URL failed does the
//! failure reach the retry schedule.

use backon::{ExponentialBuilder, Retryable};
use gantry_proto::api::agent::{
    AgentHeartbeat, HeartbeatAck, JoinRequest, JoinResponse, OpReport, Work,
};
use gantry_proto::api::agent::{OfferStoreKey, StoreKeys};
use gantry_proto::OperationId;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest wait between two tries (jitter included).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Where the doubling stops, before jitter.
const BASE_CAP: Duration = Duration::from_secs(15);
/// First wait after a failure.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Timeout of a call that is not a long poll.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("controller unreachable: {0}")]
    Http(#[from] reqwest::Error),
    #[error("controller answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("no controller URL configured")]
    NoUrl,
}

impl ClientError {
    /// A refusal that trying again will not change (4xx but 408 and 429).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Http(_) => false,
            Self::Status { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            Self::NoUrl => true,
        }
    }

    /// A failure of that controller, not of the request: another replica
    /// may answer (connection errors, timeouts, 5xx).
    pub fn fails_over(&self) -> bool {
        match self {
            Self::Http(_) => true,
            Self::Status { status, .. } => *status >= 500,
            Self::NoUrl => false,
        }
    }
}

/// The retry schedule of controller calls (see the module docs).
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(MIN_BACKOFF)
        .with_max_delay(BASE_CAP)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// The controller's agent API, over one or several controller URLs (see
/// the module docs). Secrets are passed per call and never logged.
/// Clones share which URL is current.
#[derive(Clone)]
pub struct ControllerClient {
    http: reqwest::Client,
    bases: Arc<[String]>,
    /// Index into `bases` of the URL calls start at.
    current: Arc<AtomicUsize>,
}

impl ControllerClient {
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Self::with_urls(&[base.to_string()])
    }

    /// A client of controller replicas, tried in this order.
    pub fn with_urls(urls: &[String]) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::NoUrl);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // The controller closes a kept-alive connection that sends no
            // request within its header timeout (10 s by default), the
            // heartbeat's period: a pooled connection idle for half of it
            // is dropped, so a heartbeat never goes out on a connection the
            // controller is closing at that moment.
            .pool_idle_timeout(Duration::from_secs(5))
            .user_agent(concat!("gantry-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let bases: Vec<String> = urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        Ok(Self {
            http,
            bases: bases.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The URL calls go to first now.
    pub fn base(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Every controller URL, in order.
    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    /// Whether `url` is one of this client's controllers.
    pub fn knows(&self, url: &str) -> bool {
        let url = url.trim_end_matches('/');
        self.bases.iter().any(|b| b == url)
    }

    /// Sends the request `build` makes for a base URL: to the current
    /// controller, then on a failure that [`ClientError::fails_over`] to
    /// each next one; the one that answers becomes current.
    async fn call<T: DeserializeOwned>(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<Option<T>, ClientError> {
        let n = self.bases.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut k = 0;
        loop {
            let i = (start + k) % n;
            let res = Self::send(build(&self.bases[i])).await;
            match res {
                Err(e) if e.fails_over() && k + 1 < n => {
                    tracing::warn!(controller = %self.bases[i], error = %e,
                        next = %self.bases[(i + 1) % n], "controller call failed; trying the next controller");
                    k += 1;
                }
                res => {
                    let answered = !matches!(&res, Err(e) if e.fails_over());
                    if answered && i != start {
                        self.current.store(i, Ordering::Relaxed);
                        tracing::info!(controller = %self.bases[i], "now using this controller");
                    }
                    return res;
                }
            }
        }
    }

    async fn send<T: DeserializeOwned>(
        req: reqwest::RequestBuilder,
    ) -> Result<Option<T>, ClientError> {
        let resp = req.send().await?;
        let status = resp.status();
        if status.is_success() {
            if status == StatusCode::NO_CONTENT {
                return Ok(None);
            }
            return Ok(Some(resp.json().await?));
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<gantry_proto::api::error::ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or_else(|_| text.chars().take(200).collect());
        Err(ClientError::Status {
            status: status.as_u16(),
            message,
        })
    }

    fn expect<T>(v: Option<T>) -> Result<T, ClientError> {
        v.ok_or_else(|| ClientError::Status {
            status: 204,
            message: "an empty answer where a body was expected".into(),
        })
    }

    pub async fn join(&self, token: &str, req: &JoinRequest) -> Result<JoinResponse, ClientError> {
        let r = self
            .call(|base| {
                self.http
                    .post(format!("{base}/v1/agent/join"))
                    .bearer_auth(token)
                    .timeout(CALL_TIMEOUT)
                    .json(req)
            })
            .await?;
        Self::expect(r)
    }

    pub async fn heartbeat(
        &self,
        credential: &str,
        hb: &AgentHeartbeat,
    ) -> Result<HeartbeatAck, ClientError> {
        let r = self
            .call(|base| {
                self.http
                    .post(format!("{base}/v1/agent/heartbeat"))
                    .bearer_auth(credential)
                    .timeout(CALL_TIMEOUT)
                    .json(hb)
            })
            .await?;
        Self::expect(r)
    }

    /// POSTs one metrics batch to the current controller, ONCE: no retry,
    /// no failover, no backoff, at most `timeout` (the monitor's sender
    /// drops the batch on any failure).
    pub async fn post_metrics_once(
        &self,
        credential: &str,
        batch: &gantry_proto::metrics::MetricsBatch,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let url = format!(
            "{}{}",
            self.base(),
            gantry_proto::metrics::AGENT_METRICS_PATH
        );
        let req = self
            .http
            .post(url)
            .bearer_auth(credential)
            .timeout(timeout)
            .json(batch);
        Self::send::<serde::de::IgnoredAny>(req).await.map(|_| ())
    }

    /// The work long-poll; `access_rev`, `tls`, `groups_rev` and
    /// `buckets_rev` name the access state, certificate, network-group and
    /// bucket state the agent already has (they come back only when they
    /// changed).
    pub async fn work(
        &self,
        credential: &str,
        wait_secs: u64,
        access_rev: Option<u64>,
        tls: Option<String>,
        (groups_rev, buckets_rev): (Option<u64>, Option<u64>),
    ) -> Result<Work, ClientError> {
        let mut q = vec![("wait_secs", wait_secs.to_string())];
        if let Some(r) = access_rev {
            q.push(("access_rev", r.to_string()));
        }
        if let Some(r) = groups_rev {
            q.push(("groups_rev", r.to_string()));
        }
        if let Some(r) = buckets_rev {
            q.push(("buckets_rev", r.to_string()));
        }
        if let Some(f) = tls {
            q.push(("tls", f));
        }
        let r = self
            .call(|base| {
                self.http
                    .get(format!("{base}/v1/agent/work"))
                    .query(&q)
                    .bearer_auth(credential)
                    .timeout(Duration::from_secs(wait_secs) + CALL_TIMEOUT)
            })
            .await?;
        Self::expect(r)
    }

    pub async fn report(
        &self,
        credential: &str,
        op: OperationId,
        report: &OpReport,
    ) -> Result<(), ClientError> {
        self.call::<serde_json::Value>(|base| {
            self.http
                .post(format!("{base}/v1/agent/ops/{op}"))
                .bearer_auth(credential)
                .timeout(CALL_TIMEOUT)
                .json(report)
        })
        .await
        .map(|_| ())
    }

    /// An account's snapshot-store chunk keys (see `link::keys`).
    pub async fn store_keys(
        &self,
        credential: &str,
        account: &str,
    ) -> Result<StoreKeys, ClientError> {
        let r = self
            .call(|base| {
                self.http
                    .get(format!("{base}/v1/agent/store-keys/{account}"))
                    .bearer_auth(credential)
                    .timeout(CALL_TIMEOUT)
            })
            .await?;
        Self::expect(r)
    }

    /// Offers the host's own chunk key of an account; answers the keys
    /// the controller keeps for it.
    pub async fn offer_store_key(
        &self,
        credential: &str,
        account: &str,
        offer: &OfferStoreKey,
    ) -> Result<StoreKeys, ClientError> {
        let r = self
            .call(|base| {
                self.http
                    .post(format!("{base}/v1/agent/store-keys/{account}"))
                    .bearer_auth(credential)
                    .timeout(CALL_TIMEOUT)
                    .json(offer)
            })
            .await?;
        Self::expect(r)
    }
}

/// Runs `call` until it succeeds or fails permanently, waiting per
/// [`backoff`] between tries; `on_fail` sees every failure.
pub async fn retry<T, F, Fut>(
    what: &str,
    call: F,
    on_fail: impl Fn(&ClientError),
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    call.retry(backoff())
        .sleep(tokio::time::sleep)
        .when(|e: &ClientError| !e.is_permanent())
        .notify(|e: &ClientError, wait: Duration| {
            on_fail(e);
            tracing::warn!(call = what, error = %e, retry_in_ms = wait.as_millis() as u64, "controller call failed");
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn backoff_doubles_with_jitter_and_caps_at_30s() {
        let delays: Vec<Duration> = backoff().build().take(12).collect();
        assert_eq!(delays.len(), 12, "never gives up");
        for (i, d) in delays.iter().enumerate() {
            let base = (MIN_BACKOFF * 2u32.pow(i as u32)).min(BASE_CAP);
            // Jitter adds up to one more base delay; the cap still holds.
            assert!(*d >= base, "try {i}: {d:?} < {base:?}");
            assert!(*d <= base * 2, "try {i}: {d:?} > {:?}", base * 2);
            assert!(*d <= MAX_BACKOFF, "try {i}: {d:?}");
        }
        assert!(delays[11] >= BASE_CAP, "reaches the cap");
        let spread: std::collections::HashSet<Duration> = delays[6..].iter().copied().collect();
        assert!(spread.len() > 1, "jittered: {delays:?}");
    }

    #[test]
    fn only_client_errors_are_permanent() {
        let e = |status| ClientError::Status {
            status,
            message: String::new(),
        };
        assert!(e(401).is_permanent());
        assert!(e(404).is_permanent());
        assert!(!e(429).is_permanent());
        assert!(!e(503).is_permanent());
        assert!(e(503).fails_over() && e(500).fails_over());
        assert!(!e(401).fails_over() && !e(429).fails_over());
    }

    /// A stand-in controller answering op reports with `status` (settable)
    /// and counting them; the task serves until aborted.
    async fn controller(
        status: u16,
    ) -> (
        String,
        Arc<std::sync::atomic::AtomicU16>,
        Arc<AtomicUsize>,
        tokio::task::JoinHandle<()>,
    ) {
        use axum::http::StatusCode;
        let code = Arc::new(std::sync::atomic::AtomicU16::new(status));
        let hits = Arc::new(AtomicUsize::new(0));
        let (c, h) = (code.clone(), hits.clone());
        let app = axum::Router::new().route(
            "/v1/agent/ops/{op}",
            axum::routing::post(move || {
                let (c, h) = (c.clone(), h.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let code = StatusCode::from_u16(c.load(Ordering::SeqCst)).unwrap();
                    (
                        code,
                        axum::Json(serde_json::json!({"error": "refused here"})),
                    )
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        (url, code, hits, task)
    }

    #[tokio::test]
    async fn fails_over_across_controllers_and_sticks_to_the_one_that_answers() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let (a, a_code, a_hits, _a) = controller(503).await;
        let (b, _b_code, b_hits, b_task) = controller(204).await;
        let c = ControllerClient::with_urls(&[dead.clone(), a.clone(), format!("{b}/")]).unwrap();
        let report = OpReport {
            outcome: gantry_proto::api::agent::OpOutcome::Succeeded,
            progress: 100,
            error: None,
            snapshot: None,
            instance_state: None,
            note: None,
        };
        let op = OperationId::new();
        let hits = || (a_hits.load(Ordering::SeqCst), b_hits.load(Ordering::SeqCst));
        // Refused, then 503, then answered: B is current from now on.
        assert_eq!(c.base(), dead);
        c.report("cred", op, &report).await.unwrap();
        assert_eq!((c.base(), hits()), (b.as_str(), (1, 1)));
        c.report("cred", op, &report).await.unwrap();
        assert_eq!(hits(), (1, 2), "sticks to B");
        assert!(c.knows(&format!("{b}/")) && c.knows(&dead) && !c.knows("http://x"));
        // B goes away: the next call goes round to A, which answers now.
        b_task.abort();
        let _ = b_task.await;
        a_code.store(204, Ordering::SeqCst);
        let clone = c.clone();
        clone.report("cred", op, &report).await.unwrap();
        assert_eq!((c.base(), hits()), (a.as_str(), (2, 2)), "clones share it");
        // A refusal is the answer, not a failure of A: no fail-over.
        a_code.store(401, Ordering::SeqCst);
        let e = c.report("cred", op, &report).await.unwrap_err();
        assert!(e.is_permanent() && !e.fails_over(), "{e}");
        assert_eq!((c.base(), hits()), (a.as_str(), (3, 2)));
        // Every one failing: the last failure, for the retry schedule.
        a_code.store(503, Ordering::SeqCst);
        let e = c.report("cred", op, &report).await.unwrap_err();
        assert!(!e.is_permanent(), "{e}");
        assert_eq!((c.base(), hits()), (a.as_str(), (4, 2)));
        assert!(matches!(
            ControllerClient::with_urls(&[]),
            Err(ClientError::NoUrl)
        ));
    }
}
