//! txq: a transactional job processor for RabbitMQ.
//!
//! Requests arrive on an AMQP queue; a bounded pool of jobs runs each in its own SQL
//! transaction (MySQL/MariaDB, PostgreSQL or SQLite) and publishes the result to the
//! request's reply queue. A request is acked only after its transaction committed
//! and its reply was confirmed by the broker.
//!
//! A handler is a plain `async fn` (wrapped by [`handler_fn`]) or, when it has
//! state, a type implementing [`Handler`]:
//!
//! ```no_run
//! use txq::{Config, Handler, JobError, JobMeta, Tx, Worker, handler_fn};
//!
//! async fn echo(_tx: &mut Tx, p: serde_json::Value, _m: &JobMeta)
//!     -> Result<serde_json::Value, JobError> {
//!     Ok(p)
//! }
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
//! let worker = Worker::builder(Config::default())
//!     .handler("noop", Noop)
//!     .handler("echo", handler_fn(echo))
//!     .build()
//!     .await?;
//! // Runs until SIGINT/SIGTERM, then drains.
//! worker.run(txq::signals::shutdown_signal()).await
//! # }
//! ```
//!
//! With its default feature `cli`, the crate also builds the `txq` command, its
//! tools and the SQL operations file. A crate that only writes handlers depends on
//! it with `default-features = false`.

// The library's API is what a handler crate needs: the items re-exported below,
// `config`, `signals` and (feature `cli`) `sqlops`. The modules marked hidden are
// the command's own parts, public only because the `txq` binary, the examples and
// the integration tests are crates of their own; they are not an API and change
// with any release.
#[doc(hidden)]
pub mod broker;
pub mod config;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod console;
#[doc(hidden)]
pub mod db;
#[doc(hidden)]
pub mod events;
mod handler;
#[doc(hidden)]
pub mod health;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod http;
pub mod signals;
#[cfg(feature = "cli")]
pub mod sqlops;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod telemetry;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod tools;
mod worker;

pub use config::Config;
pub use db::{Backend, Conn, Db, DbError, Isolation, PoolOptions, Tx};
pub use handler::{FnHandler, Handler, HandlerFn, JobError, JobMeta, handler_fn};
pub use health::Health;
pub use worker::{FailureKind, Worker, WorkerBuilder, WorkerError};

/// Re-exported so handlers use the same sqlx as txq.
pub use sqlx;
