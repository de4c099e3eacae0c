//! The HTTP server of `metrics.listen`: `GET /metrics` (OpenMetrics text) and `GET /healthz`.
//!
//! A scrape never holds the node up: the node is asked for its `status` like any local observer
//! ([`inbox::ask_status`]), bounded by [`PROBE_TIMEOUT`]; without an answer the last values are
//! served with `ebb_node_up 0`. A server that cannot bind is logged and left off: a metrics port
//! must never stop the agent from draining.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use bytes::Bytes;
use ebb_sdk::status::StatusResult;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use super::{Metrics, CONTENT_TYPE as OPENMETRICS};
use crate::bus::publisher::PublisherReport;
use crate::inbox::{self, Input};

/// How long a scrape or a health check waits for the node's `status`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections served at once; more wait to be accepted. Scrapers are few.
const MAX_CONNECTIONS: usize = 32;
/// A client that has not sent its request headers by then is let go.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the server reads what it reports, besides the events [`Metrics::record`] counted.
#[derive(Clone)]
pub struct Sources {
    /// The node's inputs, for the `status` probe.
    pub inputs: mpsc::Sender<Input>,
    pub publisher: watch::Receiver<PublisherReport>,
    pub nats: async_nats::Client,
    /// Whether the local control socket serves commands: main.rs sets it; false until then. With
    /// NATS away, a node is still commandable through it, so `/healthz` counts it.
    pub control_socket_up: Arc<AtomicBool>,
}

/// Why the server is not serving.
#[derive(Debug, thiserror::Error)]
#[error(
    "metrics.listen {addr}: cannot listen ({source}); free the port, or set metrics.listen to \
     another IP:PORT (\"\" turns metrics off). The agent goes on without /metrics and /healthz"
)]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr`, then serves until the runtime ends. A bind failure is returned for the caller to
/// log; once bound, errors of single connections are logged at debug level only.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves `/metrics` and `/healthz` on `listener` until the runtime ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, sources: Sources) {
    let app = Arc::new(App { metrics, sources });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: the next accept may succeed once some are closed.
                tracing::warn!("metrics server: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, "metrics server: connection ended: {e}");
            }
            drop(slot);
        });
    }
}

/// Binds and serves in a task of its own; a bind failure is logged as an error (naming the
/// address and the fix) and the agent goes on.
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>, sources: Sources) {
    tokio::spawn(async move {
        match bind(addr).await {
            Ok(listener) => {
                let local = listener.local_addr().unwrap_or(addr);
                tracing::info!(%local, "serving /metrics and /healthz on http://{local}");
                serve(listener, metrics, sources).await;
            }
            Err(e) => tracing::error!("{e}"),
        }
    });
}

struct App {
    metrics: Arc<Metrics>,
    sources: Sources,
}

impl App {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if path != "/metrics" && path != "/healthz" {
            return text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics or /healthz\n",
            );
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        if path == "/metrics" {
            let body = self.scrape().await;
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            return response;
        }
        match self.health().await {
            Ok(()) => text(StatusCode::OK, "ok\n"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n")),
        }
    }

    async fn status(&self) -> Option<StatusResult> {
        let reply = inbox::ask_status(&self.sources.inputs, PROBE_TIMEOUT).await?;
        reply.result_as::<StatusResult>()?.ok()
    }

    fn nats_connected(&self) -> bool {
        self.sources.nats.connection_state() == State::Connected
    }

    async fn scrape(&self) -> String {
        let status = self.status().await;
        self.metrics.observe(status.as_ref());
        self.metrics
            .observe_outbox(self.sources.publisher.borrow().outbox_depth);
        self.metrics.observe_nats(self.nats_connected());
        self.metrics.encode()
    }

    /// Healthy: the node's loop turns (it answers `status`) and it can be commanded (NATS is
    /// connected or the control socket is up).
    async fn health(&self) -> Result<(), &'static str> {
        if self.status().await.is_none() {
            return Err("unhealthy: the node does not answer status within 1s");
        }
        if !self.nats_connected() && !self.sources.control_socket_up.load(Ordering::Relaxed) {
            return Err(
                "unhealthy: cannot be commanded: NATS is not connected and the control socket is not up",
            );
        }
        Ok(())
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
