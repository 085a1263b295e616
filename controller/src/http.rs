//! The HTTP server: an accept loop that no client can stall.
//!
//! Each connection is HTTP/1.1 ([`hyper`]) with four limits, all from the
//! config ([`Limits`]):
//!
//! - **headers**: a connection waiting for a request (a fresh one, or one
//!   kept alive after an answer) must receive the whole header within
//!   `header_timeout`, else it is closed: this is also the keep-alive
//!   idle time;
//! - **body**: a request body must arrive within `body_timeout` of its
//!   headers, else the answer is `408` and the connection is closed;
//! - **idle**: a connection with no request being handled that has moved
//!   no byte for `idle_timeout` is closed (a client that stopped reading
//!   its answer);
//! - **count**: at most `max_connections` are open. At the cap a new
//!   connection takes the place of an idle one (no request being
//!   handled): one that has never made a request first, else the one idle
//!   the longest, so a flood of silent connections cannot push out a
//!   client that is working (whose next request may already sit unread in
//!   the socket while the server is busy); when every one is busy it is
//!   answered `503` and closed. Running out of file descriptors (`EMFILE`) also closes the
//!   idlest connection, and accepting resumes after a short pause: the
//!   loop never spins and never stops.
//!
//! Shutdown ([`run`]'s `shutdown` future): the listener is closed at once,
//! requests being handled finish, idle connections close (a connection
//! that moves no byte for half a second counts as idle then), and whatever
//! is still open after `shutdown_timeout` is dropped, so shutdown always
//! ends within that deadline.
//!
//! [`probe`] asks the server's own `/healthz` through all of this; the
//! systemd watchdog in `main.rs` pings only when it answers.

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("probe: {0}")]
    Probe(String),
}

/// The server's limits (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

impl Limits {
    pub fn from_config(cfg: &crate::Config) -> Self {
        Self {
            header_timeout: Duration::from_millis(cfg.http_header_timeout_ms),
            body_timeout: Duration::from_millis(cfg.http_body_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.http_idle_timeout_ms),
            max_connections: cfg.http_max_connections,
            shutdown_timeout: Duration::from_millis(cfg.shutdown_timeout_ms),
        }
    }
}

/// How long a connection may move no byte during shutdown before it
/// counts as idle and is closed.
const SHUTDOWN_IDLE: Duration = Duration::from_millis(500);
/// The pause after an accept error (file descriptors exhausted, ...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Descriptors kept for everything but connections (database, files,
/// probes) when the open-file limit caps the connections.
const RESERVED_FDS: u64 = 128;
/// Idle connections closed when descriptors run out anyway.
const EVICT_ON_EMFILE: usize = 8;
/// Sent to a connection refused at the cap.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 50\r\n\r\n{\"error\":\"too many connections; try again shortly\"}";

/// One open connection, as the accept loop sees it.
struct Conn {
    /// Milliseconds since [`Registry::epoch`] of the last byte moved.
    last_io: AtomicU64,
    /// Requests being handled now.
    in_flight: AtomicUsize,
    /// Has made at least one request (its header arrived whole).
    worked: AtomicBool,
    /// Told to close now (evicted).
    close: tokio::sync::Notify,
}

/// The open connections.
struct Registry {
    epoch: Instant,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(Conn {
            last_io: AtomicU64::new(self.now_ms()),
            in_flight: AtomicUsize::new(0),
            worked: AtomicBool::new(false),
            close: tokio::sync::Notify::new(),
        });
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(id, c.clone());
        (id, c)
    }

    fn remove(&self, id: u64) {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(&id);
    }

    /// Closes an idle connection (none handling a request): of those that
    /// never made a request the one idle the longest, else the idlest of
    /// all; false when every one is busy.
    fn evict_idlest(&self) -> bool {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let idlest = m
            .iter()
            .filter(|(_, c)| c.in_flight.load(Ordering::SeqCst) == 0)
            .min_by_key(|(_, c)| {
                (
                    c.worked.load(Ordering::Relaxed),
                    c.last_io.load(Ordering::Relaxed),
                )
            })
            .map(|(id, _)| *id);
        match idlest.and_then(|id| m.remove(&id)) {
            Some(c) => {
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then shuts down
/// as the module docs say. Returns how many connections were still open
/// at the deadline (dropped unfinished).
pub async fn run(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> usize {
    let reg = Arc::new(Registry {
        epoch: Instant::now(),
        next_id: AtomicU64::new(0),
        conns: Mutex::default(),
    });
    let cap = connection_cap(limits.max_connections);
    tracing::info!(max_connections = cap, "serving HTTP");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_warn: Option<Instant> = None;
    let hang_at = test_hang_at();
    tokio::pin!(shutdown);
    loop {
        if hang_at.is_some_and(|t| Instant::now() >= t) {
            tracing::warn!("GANTRY_TEST_HANG_AFTER_MS: the accept loop hangs now (test only)");
            std::future::pending::<()>().await;
        }
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next() => {}
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    if reg.len() >= cap && !reg.evict_idlest() {
                        // Every slot handles a request: refuse this one.
                        let _ = stream.try_write(BUSY);
                        continue;
                    }
                    let (id, conn) = reg.add();
                    let (app, reg2, stop) = (app.clone(), reg.clone(), stop_rx.clone());
                    tasks.spawn(async move {
                        serve_conn(stream, peer, app, &reg2, conn, limits, stop).await;
                        reg2.remove(id);
                    });
                }
                Err(e) => accept_failed(&e, &reg, &mut last_warn).await,
            },
            () = tick(hang_at) => {}
        }
    }
    drop(listener);
    let open = reg.len();
    tracing::info!(
        connections = open,
        "stopped accepting; finishing requests in flight"
    );
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let left = tasks.len();
    if drained.is_err() {
        tracing::warn!(
            connections = left,
            timeout = ?limits.shutdown_timeout,
            "connections still open at the shutdown deadline; dropping them"
        );
        tasks.abort_all();
    }
    left
}

/// `max_connections`, lowered to fit the open-file limit (less
/// [`RESERVED_FDS`]), so the cap is met before descriptors run out.
fn connection_cap(max_connections: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return max_connections;
    }
    let fit = lim.rlim_cur.saturating_sub(RESERVED_FDS).max(16);
    max_connections.min(usize::try_from(fit).unwrap_or(usize::MAX))
}

/// Wakes the accept loop when a test hang is due (never otherwise).
async fn tick(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Debug builds only: `GANTRY_TEST_HANG_AFTER_MS=N` makes the accept loop
/// hang N ms after start, so a test can prove the watchdog notices.
fn test_hang_at() -> Option<Instant> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let ms: u64 = std::env::var("GANTRY_TEST_HANG_AFTER_MS")
        .ok()?
        .parse()
        .ok()?;
    Some(Instant::now() + Duration::from_millis(ms))
}

/// An accept error: out of descriptors closes the idlest connection; every
/// error pauses briefly (no spin) and is logged at most once a second.
async fn accept_failed(e: &std::io::Error, reg: &Registry, last_warn: &mut Option<Instant>) {
    use std::io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted
    ) {
        return; // the client went away before we took it
    }
    let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    if exhausted {
        for _ in 0..EVICT_ON_EMFILE {
            reg.evict_idlest();
        }
    }
    if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        *last_warn = Some(Instant::now());
        tracing::warn!(
            error = %e,
            connections = reg.len(),
            "accept failed; pausing briefly"
        );
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// One connection, until it ends, is evicted, goes idle, or shutdown
/// drains it.
async fn serve_conn(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    app: Router,
    reg: &Registry,
    conn: Arc<Conn>,
    limits: Limits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Tracked {
        inner: stream,
        conn: conn.clone(),
        epoch: reg.epoch,
    });
    let c2 = conn.clone();
    let svc =
        hyper::service::service_fn(move |req| handle(app.clone(), c2.clone(), peer, limits, req));
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(io, svc);
    tokio::pin!(http);
    let mut idle = limits.idle_timeout;
    let mut stopping = *stop.borrow();
    if stopping {
        http.as_mut().graceful_shutdown();
        idle = idle.min(SHUTDOWN_IDLE);
    }
    loop {
        let last = Duration::from_millis(conn.last_io.load(Ordering::Relaxed));
        let idle_at = reg.epoch + last + idle;
        tokio::select! {
            _ = http.as_mut() => return,
            () = conn.close.notified() => return,
            r = stop.changed(), if !stopping => {
                stopping = true;
                if r.is_ok() {
                    http.as_mut().graceful_shutdown();
                }
                idle = idle.min(SHUTDOWN_IDLE);
            }
            () = tokio::time::sleep_until(idle_at.into()) => {
                let quiet = reg.now_ms().saturating_sub(conn.last_io.load(Ordering::Relaxed));
                if conn.in_flight.load(Ordering::SeqCst) == 0 && quiet >= idle.as_millis() as u64 {
                    return;
                }
                if conn.in_flight.load(Ordering::SeqCst) > 0 {
                    // A handler runs (a long poll may be quiet): look again later.
                    conn.last_io.store(reg.now_ms(), Ordering::Relaxed);
                }
            }
        }
    }
}

/// One request: counted as in flight while its handler runs, its body read
/// under a deadline; a body that missed it is answered 408.
async fn handle(
    app: Router,
    conn: Arc<Conn>,
    peer: std::net::SocketAddr,
    limits: Limits,
    mut req: hyper::Request<Incoming>,
) -> Result<axum::response::Response, std::convert::Infallible> {
    use axum::response::IntoResponse;
    use tower::ServiceExt;
    struct InFlight(Arc<Conn>);
    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
    conn.in_flight.fetch_add(1, Ordering::SeqCst);
    conn.worked.store(true, Ordering::Relaxed);
    let _guard = InFlight(conn);
    // The peer's address, for per-address limits on refused calls.
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    let late = Arc::new(AtomicBool::new(false));
    let req = req.map(|b| {
        axum::body::Body::new(DeadlineBody {
            inner: b,
            sleep: Box::pin(tokio::time::sleep(limits.body_timeout)),
            limit: limits.body_timeout,
            late: late.clone(),
        })
    });
    let resp = app.oneshot(req).await?;
    if late.load(Ordering::SeqCst) {
        let e = HttpError::BodyTimeout(limits.body_timeout);
        let body = serde_json::json!({ "error": e.to_string() });
        let mut r = (axum::http::StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response();
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return Ok(r);
    }
    Ok(resp)
}

/// A request body that fails once its deadline passes (and says so in
/// `late`).
struct DeadlineBody {
    inner: Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    late: Arc<AtomicBool>,
}

impl http_body::Body for DeadlineBody {
    type Data = hyper::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.late.store(true, Ordering::SeqCst);
            return Poll::Ready(Some(Err(HttpError::BodyTimeout(self.limit).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting the time of every byte moved.
struct Tracked {
    inner: TcpStream,
    conn: Arc<Conn>,
    epoch: Instant,
}

impl Tracked {
    fn moved(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.conn.last_io.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Asks `GET /healthz` of the server at `addr` (an unspecified address
/// means this machine's loopback) over a fresh connection: Ok when it
/// answers 200 within `timeout`. Proves the runtime, the accept loop and
/// the request path are alive.
pub async fn probe(addr: std::net::SocketAddr, timeout: Duration) -> Result<(), HttpError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let ask = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: gantry\r\nconnection: close\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head)
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(h)) if h.starts_with(b"HTTP/1.1 200") => Ok(()),
        Ok(Ok(h)) => Err(HttpError::Probe(format!(
            "answered {:?}",
            String::from_utf8_lossy(&h)
        ))),
        Ok(Err(e)) => Err(HttpError::Probe(e.to_string())),
        Err(_) => Err(HttpError::Probe(format!("no answer within {timeout:?}"))),
    }
}
