//! The HTTP client of the controller's `/v1/agent/*` endpoints, and the
//! retry schedule every call to it follows: exponential backoff from
//! 500 ms, doubling up to 15 s, each wait stretched by a random 0-100 %
//! (jitter), so never more than 30 s; a transient failure (connection
//! refused, timeout, 5xx, 408, 429) is retried forever.

use backon::{ExponentialBuilder, Retryable};
use gantry_proto::api::agent::{
    AgentHeartbeat, HeartbeatAck, JoinRequest, JoinResponse, OpReport, Work,
};
use gantry_proto::OperationId;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
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
}

impl ClientError {
    /// A refusal that trying again will not change (4xx but 408 and 429).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Http(_) => false,
            Self::Status { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
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

/// The controller's agent API. Secrets are passed per call and never
/// logged.
#[derive(Clone)]
pub struct ControllerClient {
    http: reqwest::Client,
    base: String,
}

impl ControllerClient {
    pub fn new(base: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("gantry-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
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
            .http
            .post(format!("{}/v1/agent/join", self.base))
            .bearer_auth(token)
            .timeout(CALL_TIMEOUT)
            .json(req);
        Self::expect(Self::send(r).await?)
    }

    pub async fn heartbeat(
        &self,
        credential: &str,
        hb: &AgentHeartbeat,
    ) -> Result<HeartbeatAck, ClientError> {
        let r = self
            .http
            .post(format!("{}/v1/agent/heartbeat", self.base))
            .bearer_auth(credential)
            .timeout(CALL_TIMEOUT)
            .json(hb);
        Self::expect(Self::send(r).await?)
    }

    /// The work long-poll; `access_rev` and `tls` name the access state
    /// and certificate the agent already has (they come back only when
    /// they changed).
    pub async fn work(
        &self,
        credential: &str,
        wait_secs: u64,
        access_rev: Option<u64>,
        tls: Option<String>,
    ) -> Result<Work, ClientError> {
        let mut q = vec![("wait_secs", wait_secs.to_string())];
        if let Some(r) = access_rev {
            q.push(("access_rev", r.to_string()));
        }
        if let Some(f) = tls {
            q.push(("tls", f));
        }
        let r = self
            .http
            .get(format!("{}/v1/agent/work", self.base))
            .query(&q)
            .bearer_auth(credential)
            .timeout(Duration::from_secs(wait_secs) + CALL_TIMEOUT);
        Self::expect(Self::send(r).await?)
    }

    pub async fn report(
        &self,
        credential: &str,
        op: OperationId,
        report: &OpReport,
    ) -> Result<(), ClientError> {
        let r = self
            .http
            .post(format!("{}/v1/agent/ops/{op}", self.base))
            .bearer_auth(credential)
            .timeout(CALL_TIMEOUT)
            .json(report);
        Self::send::<serde_json::Value>(r).await.map(|_| ())
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
    }
}
