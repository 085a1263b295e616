//! The command line's client for the local API: typed calls, errors printed
//! as the server's sentence, and waiting on operations with a progress bar
//! on a TTY.

use gantry_proto::api::error::ErrorBody;
use gantry_proto::api::local::{OperationInfo, OperationState};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::IsTerminal;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{0}")]
    Api(String),
    #[error("unexpected answer from the agent: {0}")]
    Decode(reqwest::Error),
    #[error("operation {id} ({kind}) failed: {error}")]
    OperationFailed {
        id: String,
        kind: String,
        error: String,
    },
}

pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            base: base.into().trim_end_matches('/').to_string(),
            token: token.into(),
            // Idle connections are dropped well before the API closes them
            // (`serve::HEADER_TIMEOUT`, keep-alive idle included), so a
            // request never goes out on a connection the agent is closing.
            http: reqwest::Client::builder()
                .pool_idle_timeout(crate::serve::HEADER_TIMEOUT / 3)
                .build()
                .unwrap_or_default(),
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or_else(|_| format!("HTTP {status}: {text}"));
            return Err(ClientError::Api(msg));
        }
        resp.json().await.map_err(ClientError::Decode)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Polls an operation until it ends; draws a bar when stderr is a TTY.
    pub async fn wait(&self, op: OperationInfo) -> Result<OperationInfo, ClientError> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(100);
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos:>3}%")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_message(op.kind.clone());
            b
        });
        let mut cur = op;
        while cur.state == OperationState::Running {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cur = self.get(&format!("/v1/operations/{}", cur.id)).await?;
            if let Some(b) = &bar {
                b.set_position(cur.progress.into());
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        match cur.state {
            OperationState::Failed => Err(ClientError::OperationFailed {
                id: cur.id.to_string(),
                kind: cur.kind,
                error: cur.error.unwrap_or_default(),
            }),
            _ => Ok(cur),
        }
    }
}
