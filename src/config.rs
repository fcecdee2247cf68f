//! One `Config` for the worker and every tool: TOML file, then `TXQ_*` environment
//! variables, then command-line flags, each layer overriding the one before.
//!
//! Everything is validated here, at load time, so the worker never meets a bad value
//! deep inside a job.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
#[cfg(feature = "cli")]
use std::path::Path;
use std::time::Duration;

#[cfg(feature = "cli")]
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

use crate::db::{Backend, Isolation};

/// Everything the worker needs to run. Field defaults are the documented ones.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// RabbitMQ URL, or several for a cluster: a TOML array, or one string with the
    /// URLs separated by commas. txq connects to the first that answers and, when
    /// that connection is lost, tries the next one first. Default
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
    #[serde(deserialize_with = "url_list")]
    pub amqp_url: SecretUrl,
    /// Database URL; the scheme picks the backend (`mysql:`, `mariadb:`, `postgres:`,
    /// `sqlite:`). Default `sqlite://txq.db`, the embedded backend.
    pub database_url: SecretUrl,
    /// The request queue. Default `txq.requests`.
    pub queue: String,
    /// `classic` or `quorum` (the type the request queue is declared with). Default
    /// `classic`; quorum is what a RabbitMQ cluster should use.
    pub queue_type: QueueType,
    /// Job type for requests that carry no AMQP `type` property. Default: none, such
    /// requests are bad input.
    pub default_type: Option<String>,
    /// Where replies go when a request has no `reply_to`. Default `txq.replies`;
    /// an empty string means "no reply" for such requests.
    pub reply_queue: String,
    /// Where batch completion messages go. Default empty: to the `reply_to` of the
    /// member that opened the batch, else `reply_queue`.
    pub batch_completion_queue: String,
    /// Jobs in flight at once, at most: 1 to 65535. Default 16. Also the AMQP
    /// prefetch unless `prefetch` is set, so the backlog stays in RabbitMQ, not in
    /// memory.
    pub concurrency: NonZeroU16,
    /// AMQP `basic.qos` prefetch count. Default: `concurrency`. 0 (unlimited) is refused
    /// because it lets memory grow with the queue depth.
    pub prefetch: Option<NonZeroU16>,
    /// Maximum database connections. Default: `concurrency`. Smaller than
    /// `concurrency` makes jobs wait for a connection (a warning at start-up).
    pub db_pool_size: Option<NonZeroU32>,
    /// How long a job waits for a database connection before the attempt counts as
    /// a transient failure. Default 30s.
    #[serde(with = "humantime_serde")]
    pub db_acquire_timeout: Duration,
    /// SQLite only: how long a writer waits for the database lock. Default 30s.
    #[serde(with = "humantime_serde")]
    pub sqlite_busy_timeout: Duration,
    /// Requests failed for good go here, with headers saying why. Default
    /// `<queue>.dlq`.
    pub dead_letter_queue: Option<String>,
    /// Bodies larger than this are dead-lettered unread. Default 1 MiB.
    pub max_body_bytes: NonZeroUsize,
    /// Replies larger than this are not sent: the job rolls back and answers
    /// `failed`, kind `reply_too_large`. Checked before COMMIT, so a reply the broker
    /// would refuse is never committed to the inbox. Default 8 MiB, below RabbitMQ
    /// 4.x's `max_message_size` of 16 MiB.
    pub max_reply_bytes: usize,
    /// RabbitMQ's management API, `http://user:password@host:15672`: when set, `txq
    /// run` reads the policies applied to its queues at start-up, refuses to start
    /// on one that loses messages txq relies on (a `max-length` that drops requests,
    /// an `expires`, a `delivery-limit` on the DLQ) and warns about the rest.
    /// Default: none (AMQP cannot show policies; see docs/production.md).
    pub management_url: Option<SecretUrl>,
    /// Attempts to reach the broker at start-up before `txq run` gives up (with
    /// backoff: 0.5 s, doubling to 30 s). A refused login stops at once.
    /// Reconnects after a successful start are never given up. Default 20.
    pub connect_attempts: NonZeroU32,
    /// Quorum queues only: deliveries of one request, at most, before RabbitMQ itself
    /// dead-letters it into the dead-letter queue (`x-delivery-limit`). This is what
    /// ends a message no worker can even read. Default 20, RabbitMQ 4.x's own default.
    pub delivery_limit: u32,
    /// Default timeout of one attempt of a job (also pushed into the database as
    /// statement and lock timeouts). Default 30s; `jobs.<type>.timeout` overrides it.
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
    /// On SIGTERM/SIGINT, how long jobs in flight may take to finish before they are
    /// rolled back and requeued. Default 30s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The broker's `consumer_timeout` (RabbitMQ's default is 30m): a delivery not
    /// acked by then closes the channel. Only used to warn when jobs may take longer.
    #[serde(with = "humantime_serde")]
    pub consumer_timeout: Duration,
    /// How often the worker writes its row in `txq_workers` (and its outcomes by
    /// minute), which `txq workers` and the console read. Default 5s; at most 5s,
    /// since a worker is judged gone after 15 s without one; at least 100ms.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Retries: in-process for transient database errors, then delayed through
    /// TTL queues in the broker.
    pub retry: RetryConfig,
    /// The inbox: deduplication of redelivered requests by message_id.
    pub inbox: InboxConfig,
    /// Per job type settings, keyed by job type.
    pub jobs: BTreeMap<String, JobConfig>,
    /// `text` or `json` log lines. Default `text`.
    pub log_format: LogFormat,
    /// Where `txq run` serves `/metrics`, `/healthz` and `/readyz`. Default
    /// `127.0.0.1:9464` (this host only); `0.0.0.0:9464` in a container; `None`
    /// off, written `""` in files, variables and flags.
    #[serde(with = "metrics_addr")]
    pub metrics_addr: Option<SocketAddr>,
    /// `txq console`: its address, access tokens and read-only mode.
    pub console: ConsoleConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            amqp_url: SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            database_url: SecretUrl::new("sqlite://txq.db"),
            queue: "txq.requests".into(),
            queue_type: QueueType::Classic,
            default_type: None,
            reply_queue: "txq.replies".into(),
            batch_completion_queue: String::new(),
            concurrency: const { NonZeroU16::new(16).unwrap() },
            prefetch: None,
            db_pool_size: None,
            db_acquire_timeout: Duration::from_secs(30),
            sqlite_busy_timeout: Duration::from_secs(30),
            dead_letter_queue: None,
            max_body_bytes: const { NonZeroUsize::new(1024 * 1024).unwrap() },
            max_reply_bytes: 8 * 1024 * 1024,
            delivery_limit: 20,
            connect_attempts: const { NonZeroU32::new(20).unwrap() },
            management_url: None,
            job_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            consumer_timeout: Duration::from_secs(30 * 60),
            heartbeat: crate::db::fleet::HEARTBEAT,
            retry: RetryConfig::default(),
            inbox: InboxConfig::default(),
            jobs: BTreeMap::new(),
            log_format: LogFormat::Text,
            console: ConsoleConfig::default(),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

/// Retries. A transient failure (deadlock, serialization failure, lock wait
/// timeout, lost connection, timeout) is first retried at once in a fresh
/// transaction; a request still failing then is republished to a TTL queue and comes
/// back after the next delay of `delays`; after `max_attempts` deliveries it goes to
/// the dead-letter queue.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per delivery, in process (the first one included). Default 3.
    pub in_process_attempts: NonZeroU32,
    /// Pause before the second in-process attempt; doubled for each further one,
    /// with full jitter. Default 10ms.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Cap on one in-process pause. Default 500ms.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Deliveries at most (the first one included) before a transiently failing
    /// request is dead-lettered. Default 5.
    pub max_attempts: NonZeroU32,
    /// Delay before the 2nd, 3rd… delivery; the last one repeats. Each is a queue
    /// `<queue>.retry.<delay>` whose messages expire back into the request queue.
    /// Default 1s, 5s, 30s, 2m.
    #[serde(
        deserialize_with = "duration_list",
        serialize_with = "duration_list_out"
    )]
    pub delays: Vec<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            in_process_attempts: const { NonZeroU32::new(3).unwrap() },
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(500),
            max_attempts: const { NonZeroU32::new(5).unwrap() },
            delays: [1, 5, 30, 120].map(Duration::from_secs).to_vec(),
        }
    }
}

/// The inbox table `txq_inbox`: one row per processed message_id, written in the
/// job's own transaction.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// Deduplicate by message_id. Default true. Off, redelivered requests run again.
    pub enabled: bool,
    /// Rows older than this are removed by the automatic prune. Default 7d.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Prune every this often while running. Default: never (use `txq inbox prune`).
    #[serde(with = "humantime_serde")]
    pub prune_interval: Option<Duration>,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: None,
        }
    }
}

/// Settings of one job type.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// Isolation level of the job's transaction. Default: the database's own
    /// (REPEATABLE READ on MySQL/MariaDB, READ COMMITTED on PostgreSQL; SQLite is
    /// always serializable).
    pub isolation: Option<Isolation>,
    /// Timeout of one attempt. Default: `job_timeout`.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// How the request queue is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A classic durable queue: fine on one node.
    Classic,
    /// A replicated quorum queue: what a cluster should use.
    Quorum,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

#[cfg(feature = "cli")]
pub mod flags;

#[cfg(feature = "cli")]
pub use flags::Overrides;

/// The name of the flags' layer, for errors to say a value came from a flag.
#[cfg(feature = "cli")]
const FLAGS: &str = "command-line flags";

/// [`Overrides`] as the top layer: serialized, with each flag not given (`None`)
/// left out, so that it sets nothing.
#[cfg(feature = "cli")]
struct Flags<'a>(&'a Overrides);

#[cfg(feature = "cli")]
impl figment::Provider for Flags<'_> {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(FLAGS)
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        fn given(dict: &mut figment::value::Dict) {
            use figment::value::Value;
            dict.retain(|_, value| !matches!(value, Value::Empty(..)));
            for value in dict.values_mut() {
                if let Value::Dict(_, inner) = value {
                    given(inner);
                }
            }
        }
        let mut data = Serialized::defaults(self.0).data()?;
        data.values_mut().for_each(given);
        Ok(data)
    }
}

/// `TXQ_*` variables that are not config keys: the config file's name, the
/// variables of flags that have no config key, and the test suite's.
#[cfg(feature = "cli")]
const NOT_CONFIG: &[&str] = &["config", "ops"];

/// Whether `TXQ_<key>` is meant for the config loader. Besides [`NOT_CONFIG`] and
/// `TXQ_TEST_*`, the variables Kubernetes injects for a Service named `txq-…`
/// (`TXQ_METRICS_PORT=tcp://…`, `…_SERVICE_HOST`, `…_PORT_9464_TCP_ADDR`) are
/// skipped: they must never stop txq, and no config key has their shape.
#[cfg(feature = "cli")]
fn is_config_variable(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if NOT_CONFIG.contains(&key.as_str()) || key.starts_with("test_") {
        return false;
    }
    let service_link = key.ends_with("_service_host")
        || key.contains("_service_port")
        || key.ends_with("_port")
        || key.split("_port_").nth(1).is_some_and(|rest| {
            let mut parts = rest.split('_');
            parts.next().is_some_and(|n| n.parse::<u16>().is_ok())
                && parts
                    .next()
                    .is_some_and(|proto| ["tcp", "udp", "sctp"].contains(&proto))
        });
    !service_link
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file or an environment variable does not parse, or has the wrong type:
    /// one line per problem, naming the key and where it came from.
    #[cfg(feature = "cli")]
    #[error("configuration: {message}")]
    Parse {
        /// What is wrong, for people.
        message: String,
        /// figment's own account (not a `source`: `message` says it all).
        error: Box<figment::Error>,
    },
    /// A value parses but is not allowed.
    #[error("configuration: `{key}` {problem}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

#[cfg(feature = "cli")]
impl ConfigError {
    fn parse(error: figment::Error) -> Self {
        let lines: Vec<String> = error.clone().into_iter().map(|e| describe(&e)).collect();
        Self::Parse {
            message: lines.join("; "),
            error: Box::new(error),
        }
    }
}

/// One figment error as `` `key` (from where): what; did you mean `…`? ``.
#[cfg(feature = "cli")]
fn describe(e: &figment::Error) -> String {
    use figment::error::Kind;
    let mut path = e.path.clone();
    if let Kind::UnknownField(field, _) = &e.kind {
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    let key = path.join(".");
    let from = match &e.metadata {
        Some(m) if m.name == FLAGS => format!(" (flag --{})", key.replace('_', "-")),
        Some(m) if m.name.contains("environment") => {
            format!(
                " (environment variable TXQ_{})",
                path.join("__").to_ascii_uppercase()
            )
        }
        Some(m) => match &m.source {
            Some(figment::Source::File(file)) => format!(" (in {})", file.display()),
            _ => String::new(),
        },
        None => String::new(),
    };
    let what = match &e.kind {
        Kind::UnknownField(field, expected) => {
            let closest = expected
                .iter()
                .map(|k| (strsim::jaro_winkler(field, k), *k))
                .filter(|(score, _)| *score > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            match closest {
                Some((_, k)) => format!("unknown key; did you mean `{k}`?"),
                None => format!("unknown key; the keys here are: {}", expected.join(", ")),
            }
        }
        Kind::InvalidType(actual, expected) => {
            format!("expected {}, found {}", plain(expected), found(actual))
        }
        Kind::InvalidValue(actual, expected) => {
            let found = found(actual);
            let why = WHY_REFUSED
                .iter()
                .find(|(k, v, _)| *k == key && *v == found)
                .map_or(String::new(), |(_, _, why)| format!(" ({why})"));
            format!("expected {}, found {found}{why}", plain(expected))
        }
        Kind::MissingField(field) => format!("`{field}` is missing"),
        other => other.to_string(),
    };
    if key.is_empty() {
        format!("{what}{from}")
    } else {
        format!("`{key}`{from}: {what}")
    }
}

/// Why a key's type refuses a value, where the range alone does not say.
#[cfg(feature = "cli")]
const WHY_REFUSED: &[(&str, &str, &str)] = &[(
    "prefetch",
    "0",
    "0 means unlimited, which lets memory grow with the queue",
)];

/// What serde calls an integer type, in words: the values a key takes.
#[cfg(feature = "cli")]
fn plain(expected: &str) -> String {
    let range = |min: u8, max: u64| format!("an integer from {min} to {max}");
    match expected {
        "a nonzero u16" => range(1, u16::MAX.into()),
        "a nonzero u32" => range(1, u32::MAX.into()),
        "a nonzero usize" | "a nonzero u64" => "an integer of at least 1".to_owned(),
        "u16" => range(0, u16::MAX.into()),
        "u32" => range(0, u32::MAX.into()),
        "usize" | "u64" => "an integer of at least 0".to_owned(),
        other => other.to_owned(),
    }
}

/// The value found, a number as written (figment says "unsigned int `0`").
#[cfg(feature = "cli")]
fn found(actual: &figment::error::Actual) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(n) => n.to_string(),
        other => other.to_string(),
    }
}

impl Config {
    /// Loads defaults, then `file` (when given), then `TXQ_*` environment variables
    /// (`TXQ_RETRY__MAX_ATTEMPTS` reaches `retry.max_attempts`), then `overrides`, and
    /// validates the result.
    #[cfg(feature = "cli")]
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let config: Config = figment
            .merge(
                Env::prefixed("TXQ_")
                    .split("__")
                    .filter(|key| is_config_variable(key.as_str())),
            )
            .merge(Flags(overrides))
            .extract()
            .map_err(|e| ConfigError::parse(*Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that parse but make no sense. What a field's type already
    /// rules out (a zero `concurrency`, a `metrics_addr` that is not an address) is
    /// refused while parsing, by serde, and cannot reach here.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| ConfigError::Invalid {
            key,
            problem: problem.to_owned(),
        };
        if self.queue.is_empty() || self.queue.len() > 255 {
            return Err(invalid("queue", "must be 1 to 255 bytes long"));
        }
        if self.queue.starts_with("amq.") {
            return Err(invalid("queue", "must not start with `amq.` (reserved)"));
        }
        for (name, queue) in [
            ("reply_queue", &self.reply_queue),
            ("batch_completion_queue", &self.batch_completion_queue),
        ] {
            if queue.len() > 255 {
                return Err(invalid(name, "must be at most 255 bytes long"));
            }
        }
        if self.retry.max_attempts.get() > 1 && self.retry.delays.is_empty() {
            return Err(invalid(
                "retry.delays",
                "must not be empty when max_attempts > 1",
            ));
        }
        if self
            .retry
            .delays
            .iter()
            .any(|d| d.is_zero() || d.as_millis() > u128::from(u32::MAX))
        {
            return Err(invalid(
                "retry.delays",
                "each must be between 1ms and 49 days",
            ));
        }
        if self.max_reply_bytes < 1024 {
            return Err(invalid(
                "max_reply_bytes",
                "must be at least 1024 (a `failed` reply must fit)",
            ));
        }
        if let Some(url) = &self.management_url {
            let scheme = url
                .expose()
                .split_once("://")
                .map(|(s, _)| s.to_ascii_lowercase());
            if scheme.as_deref() != Some("http") || url::Url::parse(url.expose()).is_err() {
                return Err(invalid(
                    "management_url",
                    "must be an http:// URL of the management API (put a TLS-terminating proxy on loopback for https)",
                ));
            }
        }
        if self.delivery_limit == 0 || i32::try_from(self.delivery_limit).is_err() {
            return Err(invalid(
                "delivery_limit",
                "must be between 1 and 2147483647",
            ));
        }
        let timeouts = std::iter::once(("job_timeout", Some(self.job_timeout))).chain(
            self.jobs
                .values()
                .map(|j| ("jobs.<type>.timeout", j.timeout)),
        );
        for (key, timeout) in timeouts {
            if timeout.is_some_and(|t| t < Duration::from_millis(1)) {
                return Err(invalid(key, "must be at least 1ms"));
            }
            // The timeout is pushed into the database as a statement timeout in
            // milliseconds, which PostgreSQL keeps in a 32-bit integer.
            if timeout.is_some_and(|t| t.as_millis() > i32::MAX as u128) {
                return Err(invalid(
                    key,
                    "must be at most 24 days (the databases' statement timeouts stop there)",
                ));
            }
        }
        if self.heartbeat < Duration::from_millis(100)
            || self.heartbeat > crate::db::fleet::HEARTBEAT
        {
            return Err(invalid(
                "heartbeat",
                "must be between 100ms and 5s (a worker is judged gone after 15 s without one)",
            ));
        }
        if self.db_acquire_timeout < Duration::from_millis(10) {
            return Err(invalid(
                "db_acquire_timeout",
                "must be at least 10ms (0 would fail every job that waits for a connection)",
            ));
        }
        if self.inbox.enabled {
            if self
                .inbox
                .prune_interval
                .is_some_and(|every| every < Duration::from_secs(1))
            {
                return Err(invalid(
                    "inbox.prune_interval",
                    "must be at least 1s (each prune is a DELETE on the inbox); leave it unset to never prune",
                ));
            }
            // A request can come back as late as its last delayed retry, or a
            // consumer_timeout after it was delivered: its inbox row must still
            // be there, or it runs again.
            let comeback = self
                .retry
                .delays
                .iter()
                .take(self.retry.max_attempts.get() as usize - 1)
                .sum::<Duration>()
                + self.consumer_timeout;
            if self.inbox.retention < comeback {
                return Err(invalid(
                    "inbox.retention",
                    &format!(
                        "must be at least {} (the retry delays plus consumer_timeout): a redelivery \
                         after its row was pruned would run again",
                        humantime::format_duration(comeback)
                    ),
                ));
            }
        }
        let dlq = self.dead_letter_queue();
        if dlq.is_empty() || dlq.len() > 255 || dlq == self.queue {
            return Err(invalid(
                "dead_letter_queue",
                "must be 1 to 255 bytes long and differ from `queue`",
            ));
        }
        if self.retry.base_delay > self.retry.max_delay {
            return Err(invalid(
                "retry.base_delay",
                "must not exceed retry.max_delay",
            ));
        }
        for url in self.amqp_url.split() {
            let raw = url.expose();
            let scheme = raw.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
            if !matches!(scheme.as_deref(), Some("amqp" | "amqps")) {
                return Err(invalid(
                    "amqp_url",
                    &format!("must be an amqp:// or amqps:// URL, not `{url}`"),
                ));
            }
            if let Err(e) = raw.parse::<lapin::uri::AMQPUri>() {
                return Err(invalid(
                    "amqp_url",
                    &format!("is not a valid AMQP URL ({url}): {e}"),
                ));
            }
        }
        if let Err(e) = Backend::from_url(self.database_url.expose()) {
            return Err(invalid("database_url", &e.to_string()));
        }
        Ok(())
    }

    /// The AMQP prefetch count: `prefetch`, or `concurrency`.
    pub fn prefetch(&self) -> NonZeroU16 {
        self.prefetch.unwrap_or(self.concurrency)
    }

    /// Maximum database connections: `db_pool_size`, or `concurrency`.
    pub fn db_pool_size(&self) -> NonZeroU32 {
        self.db_pool_size.unwrap_or(self.concurrency.into())
    }

    /// The database pool this config describes.
    pub fn pool_options(&self) -> crate::db::PoolOptions {
        crate::db::PoolOptions {
            max_connections: self.db_pool_size().get(),
            acquire_timeout: self.db_acquire_timeout,
            sqlite_busy_timeout: self.sqlite_busy_timeout,
            session_timeout: Some(self.job_timeout),
        }
    }

    /// Settings of `job_type` (defaults where it has no section).
    pub fn job(&self, job_type: &str) -> JobConfig {
        self.jobs.get(job_type).cloned().unwrap_or_default()
    }

    /// Timeout of one attempt of `job_type`.
    pub fn job_timeout(&self, job_type: &str) -> Duration {
        self.jobs
            .get(job_type)
            .and_then(|j| j.timeout)
            .unwrap_or(self.job_timeout)
    }

    /// The virtual host of the first `amqp_url` (`/` when it names none).
    pub fn vhost(&self) -> String {
        self.amqp_url
            .split()
            .first()
            .and_then(|u| u.expose().parse::<lapin::uri::AMQPUri>().ok())
            .map_or_else(|| "/".to_owned(), |u| u.vhost)
    }

    /// The dead-letter queue: `dead_letter_queue`, or `<queue>.dlq`.
    pub fn dead_letter_queue(&self) -> String {
        self.dead_letter_queue
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.queue))
    }
}

/// `metrics_addr`: an IP address and port, or `""` for off, as files, variables,
/// flags and `txq config` spell it.
mod metrics_addr {
    use std::fmt;
    use std::net::SocketAddr;

    use serde::de::{self, Unexpected};

    pub(super) fn serialize<S: serde::Serializer>(
        addr: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        d.deserialize_str(AddrOrOff)
    }

    struct AddrOrOff;

    impl de::Visitor<'_> for AddrOrOff {
        type Value = Option<SocketAddr>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(r#"an IP address and port, like 127.0.0.1:9464, or "" (off)"#)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v.is_empty() {
                return Ok(None);
            }
            v.parse()
                .map(Some)
                .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
}

fn duration_list_out<S: serde::Serializer>(list: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq as _;
    let mut seq = s.serialize_seq(Some(list.len()))?;
    for d in list {
        seq.serialize_element(&humantime::format_duration(*d).to_string())?;
    }
    seq.end()
}

fn duration_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let list = Vec::<humantime_serde::Serde<Duration>>::deserialize(d)?;
    Ok(list
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
}

/// `amqp_url` as one string or a list of them; a list is kept as one string with
/// the URLs separated by commas, the form an environment variable takes.
fn url_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretUrl, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(s)) => Ok(SecretUrl(s)),
        Ok(OneOrMany::Many(list)) if !list.is_empty() => Ok(SecretUrl(list.join(","))),
        Ok(OneOrMany::Many(_)) => Err(serde::de::Error::custom("the list of URLs is empty")),
        Err(_) => Err(serde::de::Error::custom("expected a URL or a list of URLs")),
    }
}

/// A connection URL whose password never reaches a log line: `Debug` and `Display`
/// print `***` in its place. It may hold several URLs separated by commas
/// ([`SecretUrl::split`]).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URLs of a list: split at each comma that starts another `amqp://` or
    /// `amqps://` URL (a comma elsewhere, in a password say, stays), trimmed.
    pub fn split(&self) -> Vec<SecretUrl> {
        let mut out = Vec::new();
        let mut rest = self.0.as_str();
        loop {
            let next = rest.match_indices(',').map(|(i, _)| i).find(|&i| {
                let after = rest[i + 1..].trim_start().to_ascii_lowercase();
                after.starts_with("amqp://") || after.starts_with("amqps://")
            });
            let (head, tail) = match next {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            if !head.trim().is_empty() {
                out.push(SecretUrl(head.trim().to_owned()));
            }
            match tail {
                Some(t) => rest = t,
                None => break,
            }
        }
        if out.is_empty() {
            out.push(self.clone());
        }
        out
    }
}

/// Serialized redacted, as displayed: what `txq config` prints is safe to paste.
impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.split().iter().map(|u| redact_url(&u.0)).collect();
        f.write_str(&parts.join(","))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// `scheme://user:***@host/…`; a string that is not a URL is hidden whole, since
/// it may be a secret that failed to parse.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Only fails for cannot-be-a-base URLs, which have no password.
                let _ = url.set_password(Some("***"));
            }
            let sensitive = ["password", "pass", "pwd", "secret", "token"];
            if url
                .query_pairs()
                .any(|(k, _)| sensitive.contains(&k.as_ref()))
            {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if sensitive.contains(&k.as_ref()) {
                            "***".to_owned()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "***".to_owned(),
    }
}

/// `txq console`'s settings (`[console]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Where it listens. Default `127.0.0.1:8080`; any address that is not
    /// loopback needs at least one token.
    pub listen: SocketAddr,
    /// Access tokens by name (`[console.tokens] alice = "…"`, or
    /// `TXQ_CONSOLE__TOKENS__ALICE`): the name is who each action is logged as.
    /// With none, only loopback is served and actions are logged as `local`.
    pub tokens: BTreeMap<String, Secret>,
    /// Hide and refuse every action (replay, purge).
    pub read_only: bool,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tokens: BTreeMap::new(),
            read_only: false,
        }
    }
}

/// A secret string (an access token): `Debug`, `Display` and `Serialize` print
/// `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, to compare with what a client sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

#[cfg(test)]
// figment's Jail returns its own large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_in_debug_and_display() {
        let url = SecretUrl::new("amqp://guest:hunter2@127.0.0.1:5672/%2f");
        assert_eq!(url.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!format!("{url:?}").contains("hunter2"));
        let pg = redact_url("postgres://u@h/db?sslmode=require&password=hunter2");
        assert!(!pg.contains("hunter2"), "{pg}");
        assert!(pg.contains("sslmode=require"), "{pg}");
        assert_eq!(redact_url("not a url hunter2"), "***");
        let list = SecretUrl::new("amqp://a:pw1@h1/%2f, amqps://b:p,w2@h2/%2f");
        assert_eq!(list.to_string(), "amqp://a:***@h1/%2f,amqps://b:***@h2/%2f");
    }

    #[test]
    fn values_that_cannot_work_are_refused_by_name() {
        let refused = |config: Config, key: &str| {
            let err = config.validate().expect_err(key).to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        };
        let inbox = |prune: Option<u64>, retention: u64| InboxConfig {
            prune_interval: prune.map(Duration::from_millis),
            retention: Duration::from_millis(retention),
            ..InboxConfig::default()
        };
        refused(
            Config {
                inbox: inbox(Some(0), 7 * 24 * 3600 * 1000),
                ..Config::default()
            },
            "inbox.prune_interval",
        );
        refused(
            Config {
                inbox: inbox(None, 0),
                ..Config::default()
            },
            "inbox.retention",
        );
        refused(
            Config {
                db_acquire_timeout: Duration::ZERO,
                ..Config::default()
            },
            "db_acquire_timeout",
        );
        for heartbeat in [Duration::from_millis(99), Duration::from_millis(5001)] {
            refused(
                Config {
                    heartbeat,
                    ..Config::default()
                },
                "heartbeat",
            );
        }
        refused(
            Config {
                job_timeout: Duration::from_secs(25 * 24 * 3600),
                ..Config::default()
            },
            "job_timeout",
        );
        let mut jobs = BTreeMap::new();
        jobs.insert(
            "t".to_owned(),
            JobConfig {
                timeout: Some(Duration::from_secs(25 * 24 * 3600)),
                ..JobConfig::default()
            },
        );
        refused(
            Config {
                jobs,
                ..Config::default()
            },
            "jobs.<type>.timeout",
        );
        // The boundary: retention just long enough is accepted; the inbox off
        // needs no retention.
        let enough = Config {
            inbox: inbox(Some(60_000), 0),
            ..Config::default()
        };
        let comeback = enough.retry.delays[..4].iter().sum::<Duration>() + enough.consumer_timeout;
        let mut ok = enough.clone();
        ok.inbox.retention = comeback;
        ok.validate().expect("retention = the comeback time");
        ok.inbox.retention = comeback - Duration::from_millis(1);
        assert!(ok.validate().is_err());
        ok.inbox.enabled = false;
        ok.validate().expect("no inbox, no retention to check");
    }

    #[test]
    fn url_lists_split_only_before_another_url() {
        let list = SecretUrl::new("amqp://u:p,x@h1:5681/%2f,amqp://h2:5682, AMQPS://h3");
        let parts: Vec<String> = list.split().iter().map(|u| u.expose().to_owned()).collect();
        assert_eq!(
            parts,
            ["amqp://u:p,x@h1:5681/%2f", "amqp://h2:5682", "AMQPS://h3"]
        );
        assert_eq!(SecretUrl::new("amqp://one").split().len(), 1);
    }

    #[test]
    #[cfg(feature = "cli")]
    fn amqp_url_takes_a_toml_list() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "amqp_url = [\"amqp://h1:5681\", \"amqp://h2:5682\"]\n",
            )?;
            let config = Config::load(Some(Path::new("c.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(config.amqp_url.split().len(), 2);
            jail.create_file("d.toml", "max_reply_bytes = 10\n")?;
            let err = Config::load(Some(Path::new("d.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("max_reply_bytes"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_their_key() {
        let config = Config {
            database_url: SecretUrl::new("oracle://x"),
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`database_url`"), "{err}");
    }

    /// What a field's type rules out is refused while parsing, naming the key,
    /// where it came from, and what it takes.
    #[test]
    #[cfg(feature = "cli")]
    fn values_their_type_rules_out_are_refused_by_name() {
        let cases = [
            (
                "concurrency = 0",
                "`concurrency` (in ",
                "an integer from 1 to 65535, found 0",
            ),
            (
                "concurrency = 70000",
                "`concurrency`",
                "an integer from 1 to 65535, found 70000",
            ),
            (
                "concurrency = -1",
                "`concurrency`",
                "an integer from 1 to 65535, found -1",
            ),
            ("prefetch = 0", "`prefetch`", "found 0 (0 means unlimited"),
            (
                "db_pool_size = 0",
                "`db_pool_size`",
                "an integer from 1 to 4294967295",
            ),
            (
                "max_body_bytes = 0",
                "`max_body_bytes`",
                "an integer of at least 1, found 0",
            ),
            (
                "connect_attempts = 0",
                "`connect_attempts`",
                "an integer from 1 to",
            ),
            (
                "retry.in_process_attempts = 0",
                "`retry.in_process_attempts`",
                "from 1 to",
            ),
            (
                "retry.max_attempts = 0",
                "`retry.max_attempts`",
                "from 1 to",
            ),
            (
                "metrics_addr = \"localhost\"",
                "`metrics_addr`",
                r#"an IP address and port, like 127.0.0.1:9464, or "" (off), found string "localhost""#,
            ),
            (
                "metrics_addr = 9464",
                "`metrics_addr`",
                "like 127.0.0.1:9464",
            ),
        ];
        figment::Jail::expect_with(|jail| {
            for (line, key, what) in cases {
                jail.create_file("bad.toml", line)?;
                let err = Config::load(Some(Path::new("bad.toml")), &Overrides::default())
                    .expect_err(line)
                    .to_string();
                assert!(err.contains(key) && err.contains(what), "{line}: {err}");
            }
            jail.set_env("TXQ_PREFETCH", "0");
            let err = Config::load(None, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`prefetch` (environment variable TXQ_PREFETCH)"),
                "{err}"
            );
            Ok(())
        });
    }

    /// `metrics_addr = ""` is off, and `txq config` writes it so.
    #[test]
    #[cfg(feature = "cli")]
    fn an_empty_metrics_addr_is_off_both_ways() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("off.toml", "metrics_addr = \"\"\n")?;
            let config = Config::load(Some(Path::new("off.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(config.metrics_addr, None);
            let text = toml::to_string(&config).map_err(|e| e.to_string())?;
            assert!(text.contains("metrics_addr = \"\"\n"), "{text}");
            jail.set_env("TXQ_METRICS_ADDR", "[::1]:9464");
            let config = Config::load(Some(Path::new("off.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(config.metrics_addr, "[::1]:9464".parse().ok());
            let json = serde_json::to_value(&config).map_err(|e| e.to_string())?;
            assert_eq!(json["metrics_addr"], "[::1]:9464");
            Ok(())
        });
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::default();
        assert_eq!(config.concurrency.get(), 16);
        assert_eq!(config.prefetch().get(), 16);
        assert_eq!(config.db_pool_size().get(), 16);
        assert_eq!(config.max_body_bytes.get(), 1024 * 1024);
        assert_eq!(config.connect_attempts.get(), 20);
        assert_eq!(config.retry.in_process_attempts.get(), 3);
        assert_eq!(config.retry.max_attempts.get(), 5);
        assert_eq!(config.metrics_addr, "127.0.0.1:9464".parse().ok());
        assert_eq!(config.heartbeat, Duration::from_secs(5));
        config.validate().expect("the defaults are valid");
    }

    #[test]
    #[cfg(feature = "cli")]
    fn file_then_env_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "txq.toml",
                "concurrency = 4\nqueue = \"from.file\"\nmetrics_addr = \"\"\n[jobs.transfer]\nisolation = \"serializable\"\n",
            )?;
            jail.set_env("TXQ_QUEUE", "from.env");
            jail.set_env("TXQ_RETRY__MAX_ATTEMPTS", "7");
            jail.set_env("TXQ_RETRY__DELAYS", "[\"2s\", \"1m\"]");
            jail.set_env("TXQ_TEST_AMQP_URL", "ignored");
            // One key in all three layers: the flag wins.
            jail.set_env("TXQ_CONCURRENCY", "6");
            let load = |flags: &Overrides| {
                Config::load(Some(Path::new("txq.toml")), flags).map_err(|e| e.to_string())
            };
            let mut flags = Overrides::default();
            flags.worker.concurrency = NonZeroU16::new(8);
            let config = load(&flags)?;
            assert_eq!(config.concurrency.get(), 8);
            // Flags not given hide nothing.
            assert_eq!(config.queue, "from.env");
            assert_eq!(config.metrics_addr, None);
            assert_eq!(load(&Overrides::default())?.concurrency.get(), 6);
            flags.worker.metrics_addr = Some("0.0.0.0:9464".into());
            assert_eq!(load(&flags)?.metrics_addr, "0.0.0.0:9464".parse().ok());
            flags.worker.metrics_addr = Some("anywhere".into());
            let err = load(&flags).unwrap_err();
            assert!(
                err.contains("`metrics_addr` (flag --metrics-addr): expected"),
                "{err}"
            );
            assert_eq!(config.retry.max_attempts.get(), 7);
            assert_eq!(
                config.retry.delays,
                [Duration::from_secs(2), Duration::from_secs(60)]
            );
            assert_eq!(
                config.job("transfer").isolation,
                Some(Isolation::Serializable)
            );
            Ok(())
        });
    }

    #[test]
    #[cfg(feature = "cli")]
    fn unknown_keys_and_bad_types_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("a.toml", "concurency = 4\n")?;
            let err = Config::load(Some(Path::new("a.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("concurency"), "{err}");
            jail.create_file("b.toml", "concurrency = \"many\"\n")?;
            let err = Config::load(Some(Path::new("b.toml")), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("concurrency"), "{err}");
            Ok(())
        });
    }
}
