//! Serving connections with the limits `axum::serve` does not set: at most so many connections
//! at once (beyond them, new ones wait in the listen backlog), a deadline for a request's
//! headers (a client that trickles them is cut off) and, through the router, for its body.

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// How long a stopping server waits for the requests under way to be answered, and then for
/// their connections to close: with the pipeline's and the delivery lanes' own limits, a stop
/// ends within 10 s.
const DRAIN_REQUESTS: Duration = Duration::from_secs(5);
const DRAIN_CONNECTIONS: Duration = Duration::from_secs(2);
/// A stopping server goes on answering (503) until no request has come for this long, so that
/// clients and load balancers hear that it is stopping instead of finding the port closed.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// Whether the server is stopping, and how many requests it is answering: a stopping server
/// answers new requests 503 with `Retry-After` (the router's `refuse_while_stopping` layer)
/// while those under way finish.
#[derive(Clone, Default)]
pub struct Drain {
    stopping: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    /// Requests that arrived, answered or refused.
    arrivals: Arc<AtomicUsize>,
}

impl Drain {
    /// Whether the server is stopping; counts the request asking.
    pub fn is_stopping(&self) -> bool {
        self.arrivals.fetch_add(1, Ordering::SeqCst);
        self.stopping.load(Ordering::SeqCst)
    }

    /// Counts a request as under way until the guard is dropped.
    pub fn enter(&self) -> impl Drop + use<> {
        struct Guard(Arc<AtomicUsize>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Guard(self.in_flight.clone())
    }
}

/// What a client is allowed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves; then, marking `drain` stopping,
/// goes on accepting (new requests are answered 503) until the requests under way are answered,
/// stops accepting, and returns once the connections are closed (or the drain's time is up).
pub async fn serve<L>(mut listener: L, router: Router, limits: Limits, drain: Drain, shutdown: impl Future<Output = ()>)
where
    L: Listener<Addr = std::net::SocketAddr>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut draining_since: Option<Instant> = None;
    loop {
        // Stopping: done once nothing is under way (checked often), or at the drain's limit.
        let (since, drain_state) = (draining_since, drain.clone());
        let drained = async move {
            let Some(since) = since else { return std::future::pending().await };
            let mut seen = (drain_state.arrivals.load(Ordering::SeqCst), Instant::now());
            loop {
                let arrivals = drain_state.arrivals.load(Ordering::SeqCst);
                if arrivals != seen.0 {
                    seen = (arrivals, Instant::now());
                }
                let idle = drain_state.in_flight.load(Ordering::SeqCst) == 0 && seen.1.elapsed() >= DRAIN_QUIET;
                if idle || since.elapsed() >= DRAIN_REQUESTS {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let mut drained = std::pin::pin!(drained);
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = &mut shutdown, if draining_since.is_none() => {
                drain.stopping.store(true, Ordering::SeqCst);
                draining_since = Some(Instant::now());
                continue;
            }
            _ = &mut drained => break,
        };
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown, if draining_since.is_none() => {
                drain.stopping.store(true, Ordering::SeqCst);
                draining_since = Some(Instant::now());
                continue;
            }
            _ = &mut drained => break,
        };
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        // Handlers that record where a request came from (Segment's `context.ip`) read it as
        // axum's `ConnectInfo`.
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                request
            },
        ));
        tokio::spawn(async move {
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!("connection ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_CONNECTIONS, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {DRAIN_CONNECTIONS:?}; closing them");
    }
}
