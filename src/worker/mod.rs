//! The worker: consumes requests, runs each as a job in its own transaction with
//! bounded concurrency, publishes the confirmed reply (or retry, or dead-letter
//! copy), then acks.

mod acks;
mod batches;
mod decide;
mod dispatch;
mod finish;
mod heartbeat;
mod job;
mod outcome;

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::{BrokerError, Publisher, Topology};
use crate::config::{Config, ConfigError, SecretUrl};
use crate::db::{Backend, Db, DbError, JobPool};
use crate::handler::{Handler, Registry};
use crate::health::Health;

pub use outcome::FailureKind;

/// Why a worker could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be reached or set up.
    #[error(transparent)]
    Db(#[from] DbError),
    /// RabbitMQ refused the topology, or the consumer was lost.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// `build` was called with no handler registered.
    #[error("no handler is registered: nothing to run")]
    NoHandlers,
}

impl WorkerError {
    /// RabbitMQ refused the login or the virtual host: retrying cannot help.
    pub fn is_refused_login(&self) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
        let Self::Broker(BrokerError::Amqp(e)) = self else {
            return false;
        };
        match e.kind() {
            lapin::ErrorKind::ProtocolError(e) => matches!(
                e.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            ),
            _ => false,
        }
    }

    /// The broker connection ended because the AMQP client could not parse a frame
    /// the broker sent: in practice, a message whose short-string properties are not
    /// UTF-8. The broker hands that message to the next consumer, unread.
    pub fn is_unparsable_frame(&self) -> bool {
        let amqp = match self {
            Self::Broker(BrokerError::Amqp(e)) => e,
            Self::Broker(BrokerError::Declare { source, .. }) => source,
            _ => return false,
        };
        matches!(amqp.kind(), lapin::ErrorKind::ParsingError(_))
    }
}

impl From<lapin::Error> for WorkerError {
    fn from(e: lapin::Error) -> Self {
        Self::Broker(BrokerError::Amqp(e))
    }
}

impl From<sqlx::Error> for WorkerError {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(DbError::Sqlx(e))
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

    /// Runs `handler` once per batch completion (and once per revision), in a
    /// transaction of its own, before that completion is published: the chord
    /// callback. Its payload is the completion message's body (README, "Batches
    /// tracked on the server"); `settings` give its isolation and timeout (default:
    /// the database's own, and `job_timeout`). A rejection is final; any other
    /// error rolls it back, and the sweep runs it again later, holding the
    /// completion back until it commits.
    pub fn on_batch_complete<H: Handler>(
        mut self,
        handler: H,
        settings: crate::config::JobConfig,
    ) -> Self {
        self.registry.set_batch_callback(handler, settings);
        self
    }

    /// Sets the settings of one job type (isolation, timeout), as `[jobs.<type>]`
    /// in the config file would.
    pub fn job_config(
        mut self,
        job_type: impl Into<String>,
        job: crate::config::JobConfig,
    ) -> Self {
        self.config.jobs.insert(job_type.into(), job);
        self
    }

    /// Settings of `job_type` for what the config leaves unset: an operator's
    /// `jobs.<type>` in the config file or environment wins over these.
    pub fn job_defaults(
        mut self,
        job_type: impl Into<String>,
        defaults: crate::config::JobConfig,
    ) -> Self {
        let job = self.config.jobs.entry(job_type.into()).or_default();
        job.isolation = job.isolation.or(defaults.isolation);
        job.timeout = job.timeout.or(defaults.timeout);
        self
    }

    /// Uses an existing pool instead of connecting to `config.database_url`, for
    /// everything, jobs included: each job's transaction opens with a `BEGIN`.
    /// Left to connect itself, a worker on MySQL/MariaDB gives jobs a second pool
    /// whose sessions run with autocommit off, so a transaction opens with its
    /// first statement and saves that round trip; it cannot do that beside a pool
    /// whose sessions it did not set up.
    pub fn database(mut self, db: Db) -> Self {
        self.db = Some(db);
        self
    }

    /// Validates the configuration, connects to the database and applies txq's
    /// migrations (the inbox table).
    pub async fn build(self) -> Result<Worker, WorkerError> {
        let config = self.config;
        config.validate()?;
        if self.registry.is_empty() {
            return Err(WorkerError::NoHandlers);
        }
        check_job_sections(&config, &self.registry)?;
        let (db, jobs) = connect_db(&config, self.db).await?;
        let specs = job_specs(&config, &self.registry, &db).await?;
        let shared = Shared {
            amqp_url: config.amqp_url.clone(),
            amqp_urls: config.amqp_url.split(),
            connection_name: format!(
                "txq worker {} pid {}",
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            ),
            topology: Topology::from_config(&config),
            prefetch: config.prefetch().get(),
            concurrency: usize::from(config.concurrency.get()),
            shutdown_grace: config.shutdown_grace,
            heartbeat: config.heartbeat,
            connect_attempts: config.connect_attempts.get(),
            health: Health::default(),
            db,
            jobs,
            batch_callback_timeout: self
                .registry
                .batch_callback()
                .and_then(|c| c.timeout)
                .unwrap_or(config.job_timeout),
            registry: self.registry,
            specs,
            inbox: config.inbox.enabled,
            retry: Retry {
                in_process_attempts: config.retry.in_process_attempts.get(),
                base_delay: config.retry.base_delay,
                max_delay: config.retry.max_delay,
                max_attempts: config.retry.max_attempts.get(),
            },
            max_body_bytes: config.max_body_bytes.get(),
            max_reply_bytes: config.max_reply_bytes,
            requeue_pause: RequeuePause::default(),
            default_type: config.default_type.clone(),
        };
        Ok(Worker {
            shared: Arc::new(shared),
            prune: config
                .inbox
                .enabled
                .then_some(config.inbox.prune_interval)
                .flatten()
                .map(|every| (every, config.inbox.retention)),
        })
    }
}

/// The worker's pool, connected unless given, and migrated; and where its jobs'
/// transactions come from. A pool handed in is used for both, as it is: txq
/// cannot know how its sessions were set up, so it makes no second pool beside it.
async fn connect_db(config: &Config, given: Option<Db>) -> Result<(Db, JobPool), WorkerError> {
    let (db, jobs) = match given {
        Some(db) => (db.clone(), JobPool::shared(db)),
        None => {
            let url = config.database_url.expose();
            let options = config.pool_options();
            let db = Db::connect(url, &options).await?;
            let jobs = JobPool::for_worker(&db, url, &options).await?;
            (db, jobs)
        }
    };
    let pool = db.max_connections();
    if pool < u32::from(config.concurrency.get()) {
        warn!(
            db_pool_size = pool,
            concurrency = config.concurrency.get(),
            "the database pool is smaller than the concurrency: jobs will wait for connections"
        );
    }
    // The inbox's and the batches' tables.
    crate::db::migrate(&db).await?;
    Ok((db, jobs))
}

/// Each job type's BEGIN statement and timeout, with warnings for settings that
/// cannot work as asked.
async fn job_specs(
    config: &Config,
    registry: &Registry,
    db: &Db,
) -> Result<HashMap<String, JobSpec>, WorkerError> {
    let timeouts: std::collections::HashSet<Duration> = registry
        .job_types()
        .map(|t| config.job_timeout(t))
        .collect();
    let begins = db.job_begins(&timeouts).await?;
    debug!(?begins, "how job transactions begin");
    let mut specs = HashMap::new();
    for job_type in registry.job_types() {
        let job = config.job(job_type);
        if job.isolation.is_some() && db.backend() == Backend::Sqlite {
            warn!(
                job_type,
                "SQLite transactions are always serializable; `isolation` is ignored"
            );
        }
        let timeout = config.job_timeout(job_type);
        let worst =
            timeout.saturating_mul(config.retry.in_process_attempts.get()) + config.retry.max_delay;
        if worst > config.consumer_timeout / 2 {
            warn!(job_type, ?timeout, consumer_timeout = ?config.consumer_timeout,
                "a delivery of this job type may stay unacked for more than half the broker's \
                 consumer_timeout, which closes the channel: lower the timeout or raise consumer_timeout");
        }
        let begin = begins.statement(job.isolation, timeout);
        specs.insert(job_type.to_owned(), JobSpec { begin, timeout });
    }
    Ok(specs)
}

/// `jobs.<type>` sections must name a job type this worker handles. One that
/// differs from a handler only in case is refused: it is what a `TXQ_JOBS__<Type>__…`
/// variable becomes (environment names are lowercased), and its settings would
/// silently never apply. Any other stranger is only warned about: one config may
/// serve workers with different handlers.
fn check_job_sections(config: &Config, registry: &Registry) -> Result<(), ConfigError> {
    for section in config.jobs.keys() {
        if registry.get(section).is_some() {
            continue;
        }
        if let Some(handler) = registry
            .job_types()
            .find(|t| t.eq_ignore_ascii_case(section))
        {
            return Err(ConfigError::Invalid {
                key: "jobs",
                problem: format!(
                    "has a section `{section}`, but the job type is `{handler}`: job types are \
                     case-sensitive, and environment variables are lowercased, so set it in the \
                     config file"
                ),
            });
        }
        let mut known: Vec<&str> = registry.job_types().collect();
        known.sort_unstable();
        warn!(
            section,
            handlers = known.join(", "),
            "`jobs.{section}` matches no job type this worker handles; its settings do nothing here"
        );
    }
    Ok(())
}

/// A configured worker, ready to [`run`](Worker::run).
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
    prune: Option<(Duration, Duration)>,
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
        &self.shared.db
    }

    /// Liveness and readiness of this worker.
    pub fn health(&self) -> Health {
        self.shared.health.clone()
    }

    /// Connects to RabbitMQ (retrying with backoff), declares the topology and
    /// processes requests until `shutdown` completes (for example
    /// [`signals::shutdown_signal`](crate::signals::shutdown_signal)), reconnecting
    /// whenever the broker connection is lost. Then it stops consuming, gives jobs in
    /// flight `shutdown_grace` to finish, rolls back and requeues the rest, and
    /// closes the connection. Meanwhile it keeps its row in `txq_workers` (every
    /// `heartbeat`, `txq workers`), deleted once it has stopped.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), WorkerError> {
        info!(amqp_url = %self.shared.amqp_url, queue = %self.shared.topology.request_queue, "starting");
        let stop = CancellationToken::new();
        let trigger = stop.clone();
        let watcher = tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
        let pruner = self.prune.map(|(every, retention)| {
            tokio::spawn(prune_every(
                self.shared.db.clone(),
                every,
                retention,
                stop.clone(),
            ))
        });
        // Registers at once, beats through the drain, deregisters after it.
        let heartbeat = heartbeat::Heartbeat::spawn(&self.shared);
        let result = dispatch::run(self.shared, stop).await;
        heartbeat.finish().await;
        if let Some(p) = pruner {
            p.abort();
        }
        watcher.abort();
        info!("worker stopped");
        result
    }
}

async fn prune_every(db: Db, every: Duration, retention: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let cutoff = crate::db::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match crate::db::inbox::prune(&db, cutoff).await {
            Ok(n) => info!(removed = n, "pruned the inbox"),
            Err(e) => warn!(error = %e, "pruning the inbox failed; trying again next interval"),
        }
    }
}

/// How one job type's transactions begin, and how long an attempt may take.
#[derive(Debug)]
pub(crate) struct JobSpec {
    pub(crate) begin: Arc<str>,
    pub(crate) timeout: Duration,
}

/// What every job of one worker shares, across connections.
#[derive(Debug)]
pub(crate) struct Shared {
    amqp_url: SecretUrl,
    /// The broker nodes to try, in order.
    amqp_urls: Vec<SecretUrl>,
    connection_name: String,
    pub(crate) topology: Topology,
    prefetch: u16,
    concurrency: usize,
    shutdown_grace: Duration,
    /// How often the worker's row in `txq_workers` is written.
    heartbeat: Duration,
    /// Connection attempts at start-up before giving up.
    connect_attempts: u32,
    pub(crate) health: Health,
    pub(crate) db: Db,
    /// Where job transactions come from: `db`, or on MySQL/MariaDB, when the
    /// worker connected itself, a pool of its own with autocommit off.
    pub(crate) jobs: JobPool,
    pub(crate) registry: Registry,
    pub(crate) specs: HashMap<String, JobSpec>,
    pub(crate) inbox: bool,
    pub(crate) retry: Retry,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_reply_bytes: usize,
    pub(crate) requeue_pause: RequeuePause,
    pub(crate) default_type: Option<String>,
    /// The timeout of the batch callback's transaction.
    pub(crate) batch_callback_timeout: Duration,
}

impl Shared {
    /// Where batch completions go, from the topology's queues.
    pub(crate) fn batch_destinations(&self) -> crate::db::batch::Destinations<'_> {
        crate::db::batch::Destinations {
            completion_queue: self.topology.batch_completion_queue.as_deref(),
            reply_queue: self.topology.reply_queue.as_deref(),
        }
    }
}

/// The `retry` settings a job reads, as plain numbers (the config's types have
/// already refused zeros).
#[derive(Debug)]
pub(crate) struct Retry {
    /// Attempts per delivery, in process.
    pub(crate) in_process_attempts: u32,
    pub(crate) base_delay: Duration,
    pub(crate) max_delay: Duration,
    /// Deliveries at most before dead-lettering.
    pub(crate) max_attempts: u32,
}

/// The pause before a delivery is requeued after a failed publish: it grows while
/// publishes keep failing (0.2 s, doubling, up to 10 s, with jitter) and starts over
/// after one goes through, so a failure the broker repeats can never spin.
#[derive(Debug, Default)]
pub(crate) struct RequeuePause {
    failures: std::sync::atomic::AtomicU32,
}

impl RequeuePause {
    const BASE: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(10);

    /// The next pause, counting one more failure.
    pub(crate) fn next(&self) -> Duration {
        use std::sync::atomic::Ordering;
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let ceiling = Self::BASE
            .saturating_mul(1 << failures.saturating_sub(1).min(10))
            .min(Self::MAX);
        ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    pub(crate) fn reset(&self) {
        self.failures.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the jobs of one broker connection share.
pub(crate) struct Context {
    shared: Arc<Shared>,
    pub(crate) publisher: Publisher,
    /// The consumer channel's acks, coalesced.
    pub(crate) acks: Arc<acks::Acks>,
    /// Cancelled when this connection is lost: nothing sent on it can complete.
    pub(crate) connection_lost: CancellationToken,
}

impl Deref for Context {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// The `type` label of a delivery's metrics: a type nobody registered is a
/// producer's mistake, not a new series.
pub(crate) fn type_label<'a>(shared: &Shared, env: &'a crate::broker::Envelope) -> &'a str {
    match env.job_type.as_deref() {
        Some(t) if shared.specs.contains_key(t) => t,
        _ => "unknown",
    }
}
