//! Listeners and client connections: [`Shared`] (routes, counters, TLS
//! acceptor, HTTP server and upstream client settings), [`Listening`] (a
//! bound listener with its accept loop, closable with every connection it
//! accepted), and the per-connection TLS handshake and HTTP/1.1 + HTTP/2
//! serving.

use crate::error::ProxyError;
use crate::forward;
use crate::headers;
use crate::netns::Namespace;
use crate::pool::Pool;
use crate::stats::Stats;
use crate::Routes;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A TLS handshake must finish within this (slow-loris before HTTP).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause after an accept error (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What every listener and connection of one proxy shares.
pub(crate) struct Shared {
    /// The routing table and its version (bumped on every change, so that
    /// connections can keep a copy and check it with one atomic load).
    routes: RwLock<(u64, Arc<Routes>)>,
    routes_version: AtomicU64,
    pub(crate) stats: Stats,
    /// Each worker's runtime, by worker number.
    handles: Vec<Handle>,
    /// Each worker's upstream pool, by worker number.
    pub(crate) pools: Vec<Arc<Pool>>,
    /// Round-robin cursor for new connections.
    next_worker: AtomicUsize,
    tls: TlsAcceptor,
    http: auto::Builder<TokioExecutor>,
    netns: Option<Namespace>,
}

impl Shared {
    pub(crate) fn new(
        tls: Arc<rustls::ServerConfig>,
        netns: Option<Namespace>,
        handles: Vec<Handle>,
    ) -> Self {
        let mut http = auto::Builder::new(TokioExecutor::new());
        // hyper's header-read timer also runs while a keep-alive connection
        // waits for its next request, so it would close idle connections:
        // leave it off (the handshake has its own timeout).
        http.http1().header_read_timeout(None).keep_alive(true);
        Self {
            routes: RwLock::new((0, Arc::new(Routes::default()))),
            routes_version: AtomicU64::new(0),
            stats: Stats::default(),
            pools: handles.iter().map(|_| Arc::new(Pool::default())).collect(),
            handles,
            next_worker: AtomicUsize::new(0),
            tls: TlsAcceptor::from(tls),
            http,
            netns,
        }
    }

    /// The routing table now, with its version.
    fn routes(&self) -> (u64, Arc<Routes>) {
        let current = self.routes.read().unwrap_or_else(|e| e.into_inner());
        (current.0, Arc::clone(&current.1))
    }

    /// Replaces the routing table; requests from now on use it.
    pub(crate) fn set_routes(&self, routes: Routes) {
        let mut current = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let version = current.0 + 1;
        *current = (version, Arc::new(routes));
        self.routes_version.store(version, Ordering::Release);
    }
}

/// How requests on a listener are routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// The shared listener: by the request's host name.
    Name,
    /// A per-port listener: by `Routes::by_port[port]`.
    Port(u16),
}

/// One client connection; counted in `active_connections` while alive
/// (upgraded connections hold it too).
pub(crate) struct Conn {
    pub(crate) shared: Arc<Shared>,
    pub(crate) peer: SocketAddr,
    /// The client's address as an `X-Forwarded-For` entry.
    pub(crate) client: HeaderValue,
    pub(crate) via: Via,
    /// The worker it runs on (its upstream pool).
    pub(crate) worker: usize,
    pub(crate) token: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// This connection's copy of the routing table and its version.
    routes: Mutex<(u64, Arc<Routes>)>,
}

impl Conn {
    /// Looks `f` up in the routing table as it is now.
    pub(crate) fn with_routes<T>(&self, f: impl FnOnce(&Routes) -> T) -> T {
        let version = self.shared.routes_version.load(Ordering::Acquire);
        let mut copy = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if copy.0 != version {
            *copy = self.shared.routes();
        }
        f(&copy.1)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.stats.close_connection();
    }
}

/// A bound listener and its accept loop.
pub(crate) struct Listening {
    token: CancellationToken,
    tracker: TaskTracker,
    accept: JoinHandle<()>,
    pub(crate) local: SocketAddr,
}

impl Listening {
    /// Binds `addr` (call on a runtime thread, so that the socket is made
    /// in the runtime's namespace) and starts accepting.
    pub(crate) async fn open(
        shared: Arc<Shared>,
        addr: SocketAddr,
        via: Via,
        token: CancellationToken,
    ) -> Result<Self, ProxyError> {
        if let Some(ns) = &shared.netns {
            ns.check()?;
        }
        let bind_err = |source| ProxyError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let tracker = TaskTracker::new();
        let accept = tokio::spawn(accept_loop(
            listener,
            shared,
            via,
            token.clone(),
            tracker.clone(),
        ));
        tracing::debug!(%local, ?via, "listening");
        Ok(Self {
            token,
            tracker,
            accept,
            local,
        })
    }

    /// Closes the listener and every connection it accepted, and waits
    /// until they are gone.
    pub(crate) async fn close(self) {
        self.token.cancel();
        let _ = self.accept.await;
        self.tracker.close();
        self.tracker.wait().await;
        tracing::debug!(local = %self.local, "listener closed");
    }
}

/// An accepted stream, still registered with worker 0's reactor or
/// moved out of it for another worker.
enum Handoff {
    Here(TcpStream),
    Moved(std::net::TcpStream),
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    via: Via,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        hand_off(&shared, stream, peer, via, &token, &tracker);
    }
}

/// Starts serving an accepted connection on the next worker (round robin).
fn hand_off(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    via: Via,
    token: &CancellationToken,
    tracker: &TaskTracker,
) {
    let worker = shared.next_worker.fetch_add(1, Ordering::Relaxed) % shared.handles.len();
    // The accept loop runs on worker 0; a stream for another worker leaves
    // this reactor and joins that worker's.
    let stream = if worker == 0 {
        Handoff::Here(stream)
    } else {
        match stream.into_std() {
            Ok(s) => Handoff::Moved(s),
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection to its worker");
                return;
            }
        }
    };
    shared.stats.open_connection();
    let conn = Arc::new(Conn {
        shared: Arc::clone(shared),
        peer,
        client: headers::client_value(peer.ip()),
        via,
        worker,
        token: token.clone(),
        tracker: tracker.clone(),
        routes: Mutex::new(shared.routes()),
    });
    let token = token.clone();
    let task = async move {
        let stream = match stream {
            Handoff::Here(s) => s,
            Handoff::Moved(s) => match TcpStream::from_std(s) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot take over a connection");
                    return;
                }
            },
        };
        tokio::select! {
            () = token.cancelled() => {}
            () = serve(conn, stream) => {}
        }
    };
    tracker.spawn_on(task, &shared.handles[worker]);
}

/// TLS handshake, then HTTP/1.1 or HTTP/2 until the client leaves.
async fn serve(conn: Arc<Conn>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let shared = Arc::clone(&conn.shared);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, shared.tls.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %conn.peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %conn.peer, "TLS handshake timed out");
            return;
        }
    };
    let peer = conn.peer;
    let service = service_fn(move |req| forward::handle(Arc::clone(&conn), req));
    let served = shared
        .http
        .serve_connection_with_upgrades(TokioIo::new(tls), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
