//! The upstream side: plain-TCP dialing with a timeout, and [`Pool`], the
//! keep-alive HTTP/1.1 connections per guest address. A connection is
//! checked out for one request and comes back by itself when the
//! response body has been read to the end ([`PooledBody`]), so no task is
//! spawned per request; idle ones are dropped after [`IDLE_TIMEOUT`].

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Connecting to an upstream gives up after this.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled connections older than this are closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// How often idle connections are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// At most this many idle connections are kept per upstream address.
const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// Why an upstream gave no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connect: timed out")]
    ConnectTimeout,
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// Whether the upstream never accepted the connection.
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout)
    }
}

/// Opens a TCP connection to `target` (no Nagle), within [`CONNECT_TIMEOUT`].
pub(crate) async fn dial(target: SocketAddr) -> Result<TcpStream, UpstreamError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
        .map_err(UpstreamError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
}

/// Idle keep-alive connections per upstream address.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
}

impl Pool {
    /// Sends `req` to `target` on an idle connection, or a new one when
    /// none is left (a request a closing connection refused goes on to
    /// the next).
    pub(crate) async fn send(
        self: &Arc<Self>,
        target: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        while let Some(mut sender) = self.checkout(target) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.lend(target, sender, resp)),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let stream = dial(target).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%target, error = %e, "upstream connection ended");
            }
        });
        let resp = sender.send_request(req).await?;
        Ok(self.lend(target, sender, resp))
    }

    /// Wraps the answer's body so that the connection returns when it ends.
    fn lend(
        self: &Arc<Self>,
        target: SocketAddr,
        sender: SendRequest<Incoming>,
        resp: Response<Incoming>,
    ) -> Response<PooledBody> {
        resp.map(|inner| {
            let mut body = PooledBody {
                inner,
                back: Some((Arc::clone(self), target, sender)),
            };
            if body.inner.is_end_stream() {
                body.release();
            }
            body
        })
    }

    fn checkout(&self, target: SocketAddr) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&target)?;
        while let Some(c) = list.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < IDLE_TIMEOUT {
                return Some(c.sender);
            }
        }
        None
    }

    fn checkin(&self, target: SocketAddr, sender: SendRequest<Incoming>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(target).or_default();
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes idle connections that are closed or too old.
    pub(crate) fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            list.retain(|c| !c.sender.is_closed() && c.since.elapsed() < IDLE_TIMEOUT);
            !list.is_empty()
        });
    }

    /// Sweeps every [`SWEEP_EVERY`] until `stop` is cancelled.
    pub(crate) async fn sweep_until(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => self.sweep(),
            }
        }
    }

    #[cfg(test)]
    fn idle_count(&self, target: SocketAddr) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get(&target).map_or(0, Vec::len)
    }
}

/// An upstream answer's body; its connection goes back to the pool once
/// the body has been read to the end (dropped earlier, it is closed).
pub(crate) struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<Pool>, SocketAddr, SendRequest<Incoming>)>,
}

impl PooledBody {
    /// A body whose connection is not pooled (a refused upgrade).
    pub(crate) fn unpooled(inner: Incoming) -> Self {
        Self { inner, back: None }
    }

    fn release(&mut self) {
        if let Some((pool, target, sender)) = self.back.take() {
            pool.checkin(target, sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A keep-alive upstream answering every request with `ok`; counts
    /// the connections it accepted.
    async fn upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// A request with an empty `Incoming` body, made by a loopback server.
    async fn get(pool: &Arc<Pool>, target: SocketAddr) -> String {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let pool = Arc::clone(pool);
        tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let pool = Arc::clone(&pool);
                let tx = tx.lock().unwrap().take();
                async move {
                    let resp = pool.send(target, req).await.unwrap();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    if let Some(tx) = tx {
                        let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        rx.await.unwrap()
    }

    #[tokio::test]
    async fn connections_are_reused_after_the_body_ends() {
        let (addr, accepted) = upstream().await;
        let pool = Arc::new(Pool::default());
        for _ in 0..3 {
            assert_eq!(get(&pool, addr).await, "ok");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(addr), 1);
    }

    #[tokio::test]
    async fn a_dead_upstream_is_a_connect_error() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(dial(addr).await.unwrap_err().is_connect());
    }
}
