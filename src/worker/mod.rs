//! The worker: consumes requests, runs each as a job in its own transaction with
//! bounded concurrency, publishes the confirmed reply, then acks.

mod dispatch;
mod job;
mod outcome;

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{self, BrokerError, Publisher, Topology};
use crate::config::{Config, ConfigError, RetryConfig};
use crate::db::{Db, DbError, Isolation, PoolOptions};
use crate::handler::{Handler, Registry};

pub use outcome::FailureKind;

/// Why a worker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be reached or set up.
    #[error(transparent)]
    Db(#[from] DbError),
    /// RabbitMQ could not be reached, or the consumer was lost.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// `build` was called with no handler registered.
    #[error("no handler is registered: nothing to run")]
    NoHandlers,
}

impl From<lapin::Error> for WorkerError {
    fn from(e: lapin::Error) -> Self {
        Self::Broker(BrokerError::Amqp(e))
    }
}

/// Collects handlers and settings for a [`Worker`].
#[derive(Debug)]
pub struct WorkerBuilder {
    config: Config,
    registry: Registry,
    db: Option<Db>,
}

impl WorkerBuilder {
    /// Runs `handler` for requests of `job_type`. A second handler for the same type
    /// replaces the first.
    pub fn handler<H: Handler>(mut self, job_type: impl Into<String>, handler: H) -> Self {
        let job_type = job_type.into();
        if self.registry.insert(job_type.clone(), handler) {
            warn!(
                job_type,
                "a handler was registered twice; the last one wins"
            );
        }
        self
    }

    /// Uses an existing pool instead of connecting to `config.database_url`.
    pub fn database(mut self, db: Db) -> Self {
        self.db = Some(db);
        self
    }

    /// Validates the configuration and connects to the database.
    pub async fn build(self) -> Result<Worker, WorkerError> {
        let config = self.config;
        config.validate()?;
        if self.registry.is_empty() {
            return Err(WorkerError::NoHandlers);
        }
        let db = match self.db {
            Some(db) => db,
            None => {
                let options = PoolOptions {
                    max_connections: config.db_pool_size(),
                    acquire_timeout: config.db_acquire_timeout,
                    sqlite_busy_timeout: config.sqlite_busy_timeout,
                };
                Db::connect(config.database_url.expose(), &options).await?
            }
        };
        let pool = db.max_connections();
        if (pool as usize) < config.concurrency {
            warn!(
                db_pool_size = pool,
                concurrency = config.concurrency,
                "the database pool is smaller than the concurrency: jobs will wait for connections"
            );
        }
        for (job_type, job) in &config.jobs {
            if job.isolation.is_some() && db.backend() == crate::db::Backend::Sqlite {
                warn!(
                    job_type,
                    "SQLite transactions are always serializable; `isolation` is ignored"
                );
            }
        }
        Ok(Worker {
            config: Arc::new(config),
            registry: self.registry,
            db,
        })
    }
}

/// A configured worker, ready to [`run`](Worker::run).
#[derive(Debug)]
pub struct Worker {
    config: Arc<Config>,
    registry: Registry,
    db: Db,
}

impl Worker {
    /// Starts building a worker from `config`.
    pub fn builder(config: Config) -> WorkerBuilder {
        WorkerBuilder {
            config,
            registry: Registry::default(),
            db: None,
        }
    }

    /// The worker's database pool.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Connects to RabbitMQ, declares the topology and processes requests until
    /// `shutdown` fires; then stops consuming, lets in-flight jobs finish, and
    /// closes the connection. Unacked prefetched requests go back to the queue.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let config = &self.config;
        let name = format!(
            "txq worker {} pid {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
        let connection = Arc::new(broker::connect(config.amqp_url.expose(), &name).await?);
        info!(amqp_url = %config.amqp_url, "connected to rabbitmq");

        let topology = Topology::from_config(config);
        let channel = connection.create_channel().await?;
        broker::declare(&channel, &topology).await?;

        // Confirms are pipelined, so a few channels carry all the replies.
        let publisher = Publisher::new(connection.clone(), 4);
        let isolation = self
            .registry
            .job_types()
            .map(|t| (t.to_owned(), config.job(t).isolation))
            .collect();
        let ctx = Arc::new(Context {
            db: self.db.clone(),
            registry: self.registry,
            publisher: publisher.clone(),
            isolation,
            retry: config.retry.clone(),
            default_type: config.default_type.clone(),
            reply_queue: topology.reply_queue.clone(),
        });
        let result = dispatch::consume(
            ctx,
            &channel,
            &topology.request_queue,
            config.prefetch(),
            config.concurrency,
            shutdown,
        )
        .await;
        publisher.close().await;
        // Closing the connection hands unacked deliveries back to the queue.
        let _ = connection.close(200, "txq worker stopping".into()).await;
        info!("worker stopped");
        result
    }
}

/// What every job of one worker shares.
pub(crate) struct Context {
    pub(crate) db: Db,
    pub(crate) registry: Registry,
    pub(crate) publisher: Publisher,
    isolation: HashMap<String, Option<Isolation>>,
    pub(crate) retry: RetryConfig,
    pub(crate) default_type: Option<String>,
    pub(crate) reply_queue: Option<String>,
}

impl Context {
    fn isolation(&self, job_type: &str) -> Option<Isolation> {
        self.isolation.get(job_type).copied().flatten()
    }
}
