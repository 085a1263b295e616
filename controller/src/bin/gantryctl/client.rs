//! Talking to the controller: the one place API paths are built (every
//! segment percent-encoded; ids are the typed ids of `gantry_proto::ids`,
//! parsed on the command line), the connect and request timeouts, and how
//! an answer or a failure becomes output and an exit code.

use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// Why gantryctl failed; each kind has its exit code (see [`EXIT_CODES`]).
#[derive(Debug, thiserror::Error)]
pub enum Fail {
    /// The API answered with an error status; `body` is its JSON error
    /// body (`{"error": ..., "field": ...}`) when it sent one.
    #[error("{message} (HTTP {status})")]
    Api {
        status: u16,
        message: String,
        body: Option<Value>,
    },
    #[error("{0}")]
    Local(String),
    #[error("cannot reach the controller at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error(
        "no answer from the controller at {url} within {secs} s (raise --timeout-secs or \
         GANTRY_TIMEOUT_SECS)"
    )]
    TimedOut { url: String, secs: u64 },
    #[error("{0}")]
    Operation(String),
    #[error("{0}")]
    BadAnswer(String),
}

/// The exit codes, as `gantryctl --help` prints them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0   done
  1   the API refused the call (400, 413, 422, 429: its sentence is printed)
  2   bad command line (unknown option, malformed id, ...)
  3   local input (no token, unreadable file, unknown action)
  4   network: the controller cannot be reached or did not answer in time
  5   the controller failed (HTTP 5xx)
  6   an operation waited for failed or did not finish in time
  7   authentication or permission (HTTP 401, 403)
  8   not found (HTTP 404)
  9   conflict with the object's state (HTTP 409)
  10  the answer is not the API's JSON (e.g. a proxy's page)

With --json, a failure prints one JSON object on stdout: the API's own
error body ({\"error\": ..., \"field\": ...}) when it sent one, else
{\"error\": \"<sentence>\"}; the sentence also goes to stderr.

Timeouts: --connect-timeout-secs (GANTRY_CONNECT_TIMEOUT_SECS, default 5)
and --timeout-secs (GANTRY_TIMEOUT_SECS, default 30) bound every request;
commands that wait for an operation poll it with such short requests.";

impl Fail {
    pub fn code(&self) -> i32 {
        match self {
            Self::Api {
                status: 401 | 403, ..
            } => 7,
            Self::Api { status: 404, .. } => 8,
            Self::Api { status: 409, .. } => 9,
            Self::Api { status, .. } if *status >= 500 => 5,
            Self::Api { .. } => 1,
            Self::Local(_) => 3,
            Self::Unreachable { .. } | Self::TimedOut { .. } => 4,
            Self::Operation(_) => 6,
            Self::BadAnswer(_) => 10,
        }
    }

    /// What `--json` prints on stdout for this failure.
    pub fn json(&self) -> Value {
        match self {
            Self::Api {
                body: Some(b @ Value::Object(_)),
                ..
            } => b.clone(),
            other => json!({"error": other.to_string()}),
        }
    }
}

pub type CliResult<T> = Result<T, Fail>;

/// A path under `/v1`, built only by [`ApiPath::v1`] (or [`v1!`]): each
/// segment percent-encoded, so no id or name can add a segment, a query or
/// a `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPath {
    path: String,
    /// A segment that cannot be sent (empty, `.` or `..`).
    refused: Option<String>,
}

/// `v1!("instances", id, "actions")`: an [`ApiPath`] from anything
/// `Display` (typed ids, literals).
#[macro_export]
macro_rules! v1 {
    ($($seg:expr),+ $(,)?) => {
        $crate::client::ApiPath::v1(&[$(&$seg.to_string()),+])
    };
}

impl ApiPath {
    pub fn v1(segments: &[&str]) -> Self {
        let mut path = String::from("/v1");
        let mut refused = None;
        for s in segments {
            if s.is_empty() || *s == "." || *s == ".." {
                refused.get_or_insert_with(|| format!("{s:?} cannot be a path segment"));
            }
            path.push('/');
            path.push_str(&encode(s));
        }
        Self { path, refused }
    }

    /// Adds a query string (values percent-encoded, `None`s left out).
    pub fn query(mut self, pairs: &[(&str, Option<String>)]) -> Self {
        let parts: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
            .collect();
        if !parts.is_empty() {
            self.path.push('?');
            self.path.push_str(&parts.join("&"));
        }
        self
    }

    pub fn as_str(&self) -> &str {
        &self.path
    }
}

/// Percent-encodes everything but unreserved characters and `:` (a PCI
/// address stays readable; `:` is a plain character in a path segment).
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a call expects back: the API's JSON, or text (the CA's PEM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Json,
    Text,
}

/// The controller's address, the caller's token and the timeouts.
pub struct Client {
    url: String,
    token: String,
    timeout_secs: u64,
    http: reqwest::Client,
}

impl Client {
    pub fn new(
        url: String,
        token: String,
        connect_secs: u64,
        timeout_secs: u64,
    ) -> CliResult<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(connect_secs))
            .timeout(Duration::from_secs(timeout_secs))
            .build()
            .map_err(|e| Fail::Local(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self {
            url,
            token,
            timeout_secs,
            http,
        })
    }

    fn net(&self, e: reqwest::Error) -> Fail {
        if e.is_timeout() {
            return Fail::TimedOut {
                url: self.url.clone(),
                secs: self.timeout_secs,
            };
        }
        let mut why = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            why = format!("{why}: {s}");
            src = s.source();
        }
        Fail::Unreachable {
            url: self.url.clone(),
            why,
        }
    }

    /// Sends one call; its JSON answer (`Null` for an empty one), or its
    /// text when `want` is [`Want::Text`].
    pub async fn send(
        &self,
        method: Method,
        path: &ApiPath,
        body: Option<Value>,
        want: Want,
    ) -> CliResult<Value> {
        if let Some(why) = &path.refused {
            return Err(Fail::Local(why.clone()));
        }
        let url = format!("{}{}", self.url.trim_end_matches('/'), path.as_str());
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| self.net(e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.net(e))?;
        let parsed = serde_json::from_str::<Value>(&text).ok();
        if !status.is_success() {
            let message = match &parsed {
                Some(v) if v["error"].is_string() => v["error"].as_str().unwrap_or("").to_string(),
                _ if text.trim().is_empty() => status
                    .canonical_reason()
                    .unwrap_or("no reason given")
                    .to_string(),
                _ => format!("the controller answered: {}", snippet(&text)),
            };
            return Err(Fail::Api {
                status: status.as_u16(),
                message,
                body: parsed.filter(|v| v["error"].is_string()),
            });
        }
        match (want, parsed) {
            _ if text.is_empty() => Ok(Value::Null),
            (Want::Text, _) => Ok(Value::String(text)),
            (Want::Json, Some(v)) => Ok(v),
            (Want::Json, None) => Err(Fail::BadAnswer(format!(
                "the answer from {url} is not JSON (HTTP {status}): {}",
                snippet(&text)
            ))),
        }
    }

    pub async fn get(&self, path: &ApiPath) -> CliResult<Value> {
        self.send(Method::GET, path, None, Want::Json).await
    }
}

/// The first line of `text`, at most 200 characters, for a message.
fn snippet(text: &str) -> String {
    let line = text.trim().lines().next().unwrap_or("");
    let mut s: String = line.chars().take(200).collect();
    if s.len() < line.len() {
        s.push('…');
    }
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::ids::SnapshotId;

    #[test]
    fn every_segment_is_encoded_and_dot_segments_are_refused() {
        let id = SnapshotId::new();
        assert_eq!(v1!("snapshots", id).as_str(), format!("/v1/snapshots/{id}"));
        assert_eq!(
            v1!("admin", "gpu-aliases", "a/b?c=d#e f").as_str(),
            "/v1/admin/gpu-aliases/a%2Fb%3Fc%3Dd%23e%20f"
        );
        assert_eq!(
            v1!("admin", "hosts", "x", "gpus", "0000:65:00.0").as_str(),
            "/v1/admin/hosts/x/gpus/0000:65:00.0"
        );
        assert!(v1!("admin", "gpu-aliases", "..").refused.is_some());
        assert!(v1!("admin", "gpu-aliases", "").refused.is_some());
        assert_eq!(
            v1!("usage")
                .query(&[("instance", None), ("limit", Some("5 &x".into()))])
                .as_str(),
            "/v1/usage?limit=5%20%26x"
        );
    }

    #[test]
    fn exit_codes_are_distinct_per_kind() {
        let api = |status| Fail::Api {
            status,
            message: "m".into(),
            body: None,
        };
        let codes = [
            api(400).code(),
            api(401).code(),
            api(403).code(),
            api(404).code(),
            api(409).code(),
            api(503).code(),
            Fail::Local("x".into()).code(),
            Fail::TimedOut {
                url: "u".into(),
                secs: 1,
            }
            .code(),
            Fail::Operation("x".into()).code(),
            Fail::BadAnswer("x".into()).code(),
        ];
        assert_eq!(codes, [1, 7, 7, 8, 9, 5, 3, 4, 6, 10]);
        let with_body = Fail::Api {
            status: 404,
            message: "no snapshot".into(),
            body: Some(json!({"error": "no snapshot"})),
        };
        assert_eq!(with_body.json(), json!({"error": "no snapshot"}));
        assert_eq!(
            Fail::Local("no token".into()).json(),
            json!({"error": "no token"})
        );
    }
}
