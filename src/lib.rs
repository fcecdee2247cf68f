//! txq: a transactional job processor for RabbitMQ.
//!
//! Requests arrive on an AMQP queue; a bounded pool of jobs runs each in its own SQL
//! transaction (MySQL/MariaDB, PostgreSQL or SQLite) and publishes the result to the
//! request's reply queue. A request is acked only after its transaction committed
//! and its reply was confirmed by the broker.
//!
//! ```no_run
//! use txq::{Config, Handler, JobError, JobMeta, Tx, Worker};
//! use tokio_util::sync::CancellationToken;
//!
//! struct Noop;
//!
//! impl Handler for Noop {
//!     type Payload = serde_json::Value;
//!     type Output = &'static str;
//!
//!     async fn handle(&self, _tx: &mut Tx, _p: serde_json::Value, _m: &JobMeta)
//!         -> Result<&'static str, JobError> {
//!         Ok("done")
//!     }
//! }
//!
//! # async fn run() -> Result<(), txq::WorkerError> {
//! let worker = Worker::builder(Config::default()).handler("noop", Noop).build().await?;
//! worker.run(CancellationToken::new()).await
//! # }
//! ```

pub mod broker;
pub mod config;
pub mod db;
mod handler;
pub mod health;
pub mod signals;
pub mod sqlops;
pub mod telemetry;
pub mod tools;
mod worker;

pub use config::Config;
pub use db::{Backend, Conn, Db, Isolation, Tx};
pub use handler::{Handler, JobError, JobMeta};
pub use health::Health;
pub use worker::{FailureKind, Worker, WorkerBuilder, WorkerError};

/// Re-exported so handlers use the same sqlx as txq.
pub use sqlx;
