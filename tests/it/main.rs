//! Integration tests against real RabbitMQ, MariaDB, PostgreSQL and SQLite.
//! One test binary (faster to build), a module per topic.
#![allow(unreachable_pub)]

mod support;

#[path = "../../examples/bank/handlers.rs"]
mod bank;

mod batches;
mod bench;
mod cli;
mod commands;
mod console;
mod contract;
mod dlq;
mod faults;
mod fleet;
mod hardening;
mod http_port;
mod jobs_pool;
mod observe;
mod ops;
mod ops_types;
mod roundtrip;
mod submit;
mod transfers;
