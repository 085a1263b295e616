//! One shared HTTP client (one connection pool for every simulated host and
//! tenant) and the call helper that times each request and counts each
//! failure by kind.

use crate::stats::Stats;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    Timeout,
    Connect(String),
    Status(StatusCode, String),
    Decode(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout => write!(f, "timed out"),
            CallError::Connect(e) => write!(f, "connection failed: {e}"),
            CallError::Status(s, b) => write!(f, "HTTP {}: {b}", s.as_u16()),
            CallError::Decode(e) => write!(f, "bad answer: {e}"),
        }
    }
}

impl std::error::Error for CallError {}

impl CallError {
    /// The error's kind for the error table (no bodies: they vary).
    pub fn kind(&self) -> String {
        match self {
            CallError::Timeout => "timeout".into(),
            CallError::Connect(_) => "connection".into(),
            CallError::Status(s, _) => format!("HTTP {}", s.as_u16()),
            CallError::Decode(_) => "bad answer".into(),
        }
    }
}

#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub stats: Arc<Stats>,
}

impl Api {
    pub fn new(base: &str, stats: Arc<Stats>, pool: usize) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(pool)
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').to_string(),
            stats,
        })
    }

    /// Sends one request; times it under `kind` when it succeeds, counts
    /// it as `kind: <error kind>` when it does not.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        kind: &'static str,
        method: Method,
        path: &str,
        token: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .timeout(timeout);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let t = Instant::now();
        let res = self.finish(rb).await;
        match &res {
            Ok(_) => self.stats.sample(kind, t.elapsed()),
            Err(e) => self.stats.error(format!("{kind}: {}", e.kind())),
        }
        let bytes = res?;
        let text = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes
        };
        serde_json::from_slice(text).map_err(|e| {
            self.stats.error(format!("{kind}: bad answer"));
            CallError::Decode(e.to_string())
        })
    }

    async fn finish(&self, rb: reqwest::RequestBuilder) -> Result<Vec<u8>, CallError> {
        let resp = rb.send().await.map_err(classify)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(classify)?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes).chars().take(300).collect();
            return Err(CallError::Status(status, body));
        }
        Ok(bytes.to_vec())
    }
}

fn classify(e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        CallError::Timeout
    } else {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        CallError::Connect(msg)
    }
}

/// A body-less request.
pub const NO_BODY: Option<&()> = None;
