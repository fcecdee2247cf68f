//! `txq console`: the operator's web console. It reads the fleet (`txq_workers`),
//! the queues (AMQP, and the management API when `management_url` is set), the
//! dead letters, the inbox and the batches, and it acts on dead letters — replay
//! and purge — through the same library code as `txq dlq`
//! ([`crate::tools::dlq`]), with its guarantees: nothing is acked before its
//! copy is confirmed, and what is not acted on goes back in its place.
//!
//! Server-rendered HTML (askama templates in `templates/console/`); every page
//! and every action works without JavaScript. Security rules, each enforced once
//! in `auth.rs`: loopback only unless tokens are configured; with tokens, every
//! request carries one (bearer header or the login cookie); actions are POSTs
//! that carry the page's CSRF token; `read_only` refuses them all.

mod auth;
mod dead_letters;
mod pages;
mod read;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::Db;

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Off loopback without an access token.
    #[error(
        "the console listens on {0}, which is not a loopback address, and no access token is configured: set one ([console.tokens] NAME = \"…\", or TXQ_CONSOLE__TOKENS__NAME), or listen on 127.0.0.1"
    )]
    TokenRequired(SocketAddr),
    /// A token too short to withstand guessing.
    #[error(
        "the console token `{0}` is shorter than {min} bytes: use a long random one (openssl rand -hex 24)",
        min = auth::MIN_TOKEN
    )]
    WeakToken(String),
    /// The address is taken or not ours.
    #[error("binding the console to {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// What a running console shares between requests.
pub(crate) struct Console {
    config: Config,
    db: Db,
    /// Sessions, CSRF tokens and confirmations (`auth.rs`).
    auth: auth::Sessions,
    broker: read::Broker,
    /// One reader of the dead-letter queue at a time: a page's sample holds its
    /// messages unacked, and an action running beside it would not see them.
    dlq: tokio::sync::Mutex<()>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

type State = Arc<Console>;

/// How long one connection may stay open. Actions do not depend on it: each runs
/// in a task of its own, to the end, whatever becomes of the request.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);

/// Checks the security rules, binds `config.console.listen` and serves until
/// `shutdown`. Returns the bound address (port 0 picks one) and the server task.
pub async fn serve(
    config: Config,
    db: Db,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ConsoleError> {
    let addr = config.console.listen;
    if !addr.ip().is_loopback() && config.console.tokens.is_empty() {
        return Err(ConsoleError::TokenRequired(addr));
    }
    if let Some((name, _)) = config
        .console
        .tokens
        .iter()
        .find(|(_, t)| t.expose().len() < auth::MIN_TOKEN)
    {
        return Err(ConsoleError::WeakToken(name.clone()));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ConsoleError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ConsoleError::Bind { addr, source })?;
    let state = Arc::new(Console {
        auth: auth::Sessions::new(config.console.tokens.keys()),
        broker: read::Broker::new(&config),
        dlq: tokio::sync::Mutex::new(()),
        config,
        db,
        metrics,
    });
    let app = router(state);
    let task = tokio::spawn(crate::http::accept_loop(
        listener,
        app,
        shutdown,
        CONNECTION_LIFETIME,
    ));
    Ok((bound, task))
}

fn router(state: State) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/workers", get(pages::workers))
        .route("/dead-letters", get(dead_letters::dead_letters))
        .route("/dead-letters/messages", get(dead_letters::messages))
        .route("/dead-letters/message", get(dead_letters::message))
        .route("/dead-letters/confirm", get(dead_letters::confirm))
        .route("/dead-letters/replay", post(dead_letters::replay))
        .route("/dead-letters/purge", post(dead_letters::purge))
        .route("/inbox", get(pages::inbox))
        .route("/batches", get(pages::batches))
        .route("/metrics", get(pages::metrics))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/static/console.css", get(pages::css))
        .route("/static/console.js", get(pages::js))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
        .with_state(state)
}
