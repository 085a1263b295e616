//! The proxy's threads: one single-threaded tokio runtime per worker, as
//! nginx has one process per core. A connection lives on one worker from
//! accept to close, with its upstream connections, so no request hops
//! between threads. Each thread (and its blocking pool) enters the network
//! namespace, when one is set, before its runtime is built.

use crate::error::ProxyError;
use crate::netns::Namespace;
use std::future::Future;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How long a stopping worker waits for its tasks.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The worker threads; stopped and joined on drop.
pub(crate) struct Workers {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` workers (at least one), in `netns` when given.
    pub(crate) fn start(n: usize, netns: Option<&Namespace>) -> Result<Self, ProxyError> {
        let mut workers = Self {
            handles: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
            stop: CancellationToken::new(),
        };
        for i in 0..n.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let ns = netns.cloned();
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("gantry-proxy-{i}"))
                .spawn(move || run(ns, stop, tx))
                .map_err(ProxyError::Runtime)?;
            workers.threads.push(thread);
            let handle = rx.recv().map_err(|_| ProxyError::Stopped)?;
            workers.handles.push(handle.map_err(ProxyError::Runtime)?);
        }
        Ok(workers)
    }

    /// Every worker's runtime handle, indexed by worker number.
    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Runs `fut` on worker 0 (so sockets are made on a proxy thread, in
    /// its namespace) and waits for it from any thread, async or not.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, ProxyError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handles[0].spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| ProxyError::Stopped)
    }
}

/// One worker thread: enter the namespace, build the runtime, hand its
/// handle back, run until stopped.
fn run(
    ns: Option<Namespace>,
    stop: CancellationToken,
    tx: std::sync::mpsc::SyncSender<std::io::Result<Handle>>,
) {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    if let Some(ns) = &ns {
        let hook = ns.thread_start_hook();
        hook();
        builder.on_thread_start(hook);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    if tx.send(Ok(runtime.handle().clone())).is_err() {
        return;
    }
    runtime.block_on(stop.cancelled());
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
