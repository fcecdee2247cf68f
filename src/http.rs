//! The operator's port: `/metrics` (Prometheus), `/healthz` (the process is alive)
//! and `/readyz` (a consumer is registered on the request queue and the database
//! answers). Binds to 127.0.0.1 unless configured otherwise: metrics name queues
//! and job types, which are nobody else's business.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::Db;
use crate::events::{self, DURATION_BUCKETS};
use crate::health::Health;

/// How often histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// How long `/readyz` waits for the database. A probe's own time limit must be
/// longer (the Kubernetes manifest's `timeoutSeconds` is 3).
pub const DB_CHECK: Duration = Duration::from_secs(2);

/// Why the port could not be served.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A metrics recorder is installed already, or the buckets were refused.
    #[error("installing the Prometheus recorder: {0}")]
    Recorder(#[from] BuildError),
    /// The address is taken or not ours.
    #[error("binding the metrics/health port {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Installs the process-wide Prometheus recorder, with the job-duration buckets,
/// and describes txq's metrics. Call once, before the worker starts.
pub fn install_recorder() -> Result<PrometheusHandle, HttpError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("txq_job_duration_seconds".into()),
            DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("txq_batch_duration_seconds".into()),
            events::BATCH_DURATION_BUCKETS,
        )?
        .install_recorder()?;
    events::describe();
    // Histogram samples pile up until folded into buckets: without this, a worker
    // nobody scrapes would grow with every job.
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("txq-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP);
                upkeep.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread: histograms are folded at scrapes only");
    }
    Ok(handle)
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Health,
    db: Db,
    /// A one-connection pool of its own for `/readyz`.
    probe: Db,
}

/// Binds `addr` now (so a taken port fails the start-up, not a scrape later) and
/// serves until `shutdown`. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Health,
    db: Db,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AppState {
            metrics,
            health,
            probe: db.probe(),
            db,
        });
    let task = tokio::spawn(accept_loop(listener, app, shutdown, CONNECTION_LIFETIME));
    Ok((bound, task))
}

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection may stay open, keep-alive included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves each connection with bounded header reads and lifetime, until
/// `shutdown`; then drops the connections still open. Scrapers and probes retry,
/// and a slow or idle client must never hold a stop open (axum's graceful shutdown
/// waits for every connection).
pub(crate) async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
    lifetime: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        // Finished connections are reaped as we go.
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(error = %e, "accepting a metrics/health connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        connections.spawn(async move {
            let _ = tokio::time::timeout(lifetime, connection).await;
        });
    }
    connections.shutdown().await;
}

async fn metrics_page(State(state): State<AppState>) -> impl IntoResponse {
    let (size, idle) = state.db.pool_state();
    events::pool_state(state.db.max_connections(), size, idle);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn ready(State(state): State<AppState>) -> (StatusCode, String) {
    if !state.health.is_consuming() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no consumer on the request queue (broker down or reconnecting)\n".into(),
        );
    }
    // On a connection of its own: a pool busy with jobs is no reason to be unready.
    match tokio::time::timeout(DB_CHECK, state.probe.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the database does not answer: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the database did not answer within {DB_CHECK:?}\n"),
        ),
    }
}
