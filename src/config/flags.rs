//! The command-line flags that set config keys, declared once.
//!
//! Each group is a clap argument struct whose fields are named after the keys they
//! set: serialized, it is the top layer of [`Config::load`](super::Config::load),
//! and a flag not given (`None`) sets nothing. A new flag for a key is one field
//! here; the `txq` commands take these groups as they are.

use std::num::NonZeroU16;

use clap::builder::TypedValueParser as _;
use serde::Serialize;

use super::LogFormat;

/// Every flag that sets a config key; `None` leaves the lower layers alone. `txq
/// run` takes all of them; a program that loads the config itself may fill in
/// what it has.
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct Overrides {
    /// `--amqp-url`, `--queue`
    #[command(flatten)]
    #[serde(flatten)]
    pub broker: BrokerArgs,
    /// `--database-url`
    #[command(flatten)]
    #[serde(flatten)]
    pub db: DbArgs,
    /// `--log-format`
    #[command(flatten)]
    #[serde(flatten)]
    pub log: LogArgs,
    /// `--concurrency`, `--metrics-addr`
    #[command(flatten)]
    #[serde(flatten)]
    pub worker: WorkerArgs,
}

/// How to reach RabbitMQ [config: amqp_url, queue].
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
#[command(next_help_heading = "Connection")]
pub struct BrokerArgs {
    /// RabbitMQ URL, or several separated by commas [config: amqp_url]
    #[arg(long, global = true)]
    pub amqp_url: Option<String>,
    /// Request queue [config: queue]
    #[arg(long, global = true)]
    pub queue: Option<String>,
}

/// How to reach the database [config: database_url].
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
#[command(next_help_heading = "Connection")]
pub struct DbArgs {
    /// Database URL: mysql://, mariadb://, postgres:// or sqlite:// [config: database_url]
    #[arg(long, global = true)]
    pub database_url: Option<String>,
}

/// Log line format [config: log_format].
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
#[command(next_help_heading = "Connection")]
pub struct LogArgs {
    /// Log format: text or json [config: log_format]
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// What only a worker reads [config: concurrency, metrics_addr].
#[derive(Debug, Default, Clone, clap::Args, Serialize)]
pub struct WorkerArgs {
    /// Jobs in flight at most, 1 to 65535 [config: concurrency]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..).try_map(NonZeroU16::try_from))]
    pub concurrency: Option<NonZeroU16>,
    /// Serve /metrics, /healthz and /readyz here; "" turns it off [config: metrics_addr]
    #[arg(long)]
    pub metrics_addr: Option<String>,
}
