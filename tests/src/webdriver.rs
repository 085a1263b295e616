//! A minimal W3C WebDriver client for browser tests: starts Debian's
//! `chromedriver` on a loopback port, opens one headless Chromium session
//! and drives it (navigate, find by CSS, click, type, read text, run a
//! script, screenshots, the browser's console log). Paths come from
//! `GANTRY_TEST_CHROMEDRIVER` / `GANTRY_TEST_CHROMIUM` (written by
//! `scripts/setup-browser` to `.cache/env/browser.env`); a missing one
//! fails the test with a sentence.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser path from the environment, or a failed test saying how to
/// get one.
fn env_path(var: &str) -> anyhow::Result<String> {
    match std::env::var(var) {
        Ok(p) if !p.is_empty() && Path::new(&p).exists() => Ok(p),
        _ => bail!(
            "{var} is not set to an existing file: run scripts/setup-browser and source \
             .cache/env/browser.env (./scripts/test does both)"
        ),
    }
}

/// A running chromedriver and one browser session; both end on drop.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::blocking::Client,
}

/// An element found on the page.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium `width`x`height`.
    pub fn start(width: u32, height: u32) -> anyhow::Result<Self> {
        let driver_bin = env_path("GANTRY_TEST_CHROMEDRIVER")?;
        let chromium = env_path("GANTRY_TEST_CHROMIUM")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {driver_bin}"))?;
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let base = format!("http://127.0.0.1:{port}");
        let mut b = Self {
            driver,
            base,
            session: String::new(),
            http,
        };
        b.wait_ready()?;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-default-apps",
                         format!("--window-size={width},{height}")],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = b.raw("POST", "/session", Some(&caps))?;
        b.session = v["sessionId"]
            .as_str()
            .context("no sessionId in the new session's answer")?
            .to_string();
        Ok(b)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(r) = self.http.get(format!("{}/status", self.base)).send() {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(st) = self.driver.try_wait()? {
                bail!("chromedriver exited at start: {st}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("chromedriver did not answer within 20 s")
    }

    /// One WebDriver command: its `value`, or an error naming the command.
    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).json(body.unwrap_or(&json!({}))),
        };
        let resp = req.send().with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let v: Value = resp
            .json()
            .with_context(|| format!("{method} {path}: not JSON"))?;
        if !status.is_success() {
            bail!(
                "WebDriver {method} {path}: {status}: {} {}",
                v["value"]["error"],
                v["value"]["message"]
            );
        }
        Ok(v["value"].clone())
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Opens `url` and waits for the page to load.
    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.cmd("POST", "/url", Some(&json!({"url": url})))
            .map(|_| ())
    }

    /// The page's URL now.
    pub fn url(&self) -> anyhow::Result<String> {
        Ok(self
            .cmd("GET", "/url", None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Every element matching `css` (none is not an error).
    pub fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(&json!({"using": "css selector", "value": css})),
        )?;
        Ok(v.as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_string())))
            .collect())
    }

    /// The first element matching `css`, waiting up to 10 s for one.
    pub fn find(&self, css: &str) -> anyhow::Result<Element> {
        let start = Instant::now();
        loop {
            if let Some(e) = self.find_all(css)?.into_iter().next() {
                return Ok(e);
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("no element matches {css:?} on {}", self.url()?);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn click(&self, e: &Element) -> anyhow::Result<()> {
        self.cmd("POST", &format!("/element/{}/click", e.0), None)
            .map(|_| ())
    }

    /// Clicks the first element matching `css`.
    pub fn click_css(&self, css: &str) -> anyhow::Result<()> {
        let e = self.find(css)?;
        self.click(&e)
    }

    /// Types `text` into an element (after clearing it when `clear`).
    pub fn type_into(&self, e: &Element, text: &str, clear: bool) -> anyhow::Result<()> {
        if clear {
            self.cmd("POST", &format!("/element/{}/clear", e.0), None)?;
        }
        self.cmd(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(&json!({"text": text})),
        )
        .map(|_| ())
    }

    /// The element's visible text.
    pub fn text(&self, e: &Element) -> anyhow::Result<String> {
        Ok(self
            .cmd("GET", &format!("/element/{}/text", e.0), None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// The visible text of the first element matching `css`.
    pub fn text_of(&self, css: &str) -> anyhow::Result<String> {
        let e = self.find(css)?;
        self.text(&e)
    }

    /// A DOM property of the element (`href`, `tagName`, ...).
    pub fn property(&self, e: &Element, name: &str) -> anyhow::Result<Value> {
        self.cmd("GET", &format!("/element/{}/property/{name}", e.0), None)
    }

    /// The text of the first element matching `css` now, read in one
    /// script (so a live table replaced meanwhile cannot go stale).
    pub fn query_text(&self, css: &str) -> anyhow::Result<Option<String>> {
        let v = self.exec(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : null;",
            json!([css]),
        )?;
        Ok(v.as_str().map(str::to_string))
    }

    /// Whether the element is enabled (not `disabled`).
    pub fn enabled(&self, e: &Element) -> anyhow::Result<bool> {
        Ok(self
            .cmd("GET", &format!("/element/{}/enabled", e.0), None)?
            .as_bool()
            .unwrap_or(false))
    }

    /// Runs `script` (a function body; `arguments` holds `args`).
    pub fn exec(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": args})),
        )
    }

    /// Polls `check` every 200 ms until it answers `Some` or `timeout`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            if let Some(v) = check(self)? {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what} on {}",
                    self.url()?
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Resizes the window (e.g. to a phone's size).
    pub fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.cmd(
            "POST",
            "/window/rect",
            Some(&json!({"width": width, "height": height})),
        )
        .map(|_| ())
    }

    /// Saves a PNG screenshot of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine;
        let v = self.cmd("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().context("screenshot is not base64 text")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// The browser console's entries at level SEVERE since the last call
    /// (chromedriver's log endpoint), as `level: message` lines.
    pub fn console_errors(&self) -> anyhow::Result<Vec<String>> {
        let v = self.cmd("POST", "/se/log", Some(&json!({"type": "browser"})))?;
        Ok(v.as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| format!("{}: {}", e["level"], e["message"]))
            .collect())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.raw("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
