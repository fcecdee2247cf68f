//! Tests against a three-node RabbitMQ cluster (`bash scripts/cluster.sh up`):
//! node failures under load, and shutdown during a memory alarm. Every test is
//! ignored by default, so `cargo test` on a machine without the cluster passes;
//! CI runs them as a step of their own:
//!
//! ```text
//! bash scripts/cluster.sh up
//! cargo test --locked --test cluster -- --ignored --test-threads=1
//! bash scripts/cluster.sh down
//! ```
//!
//! A test fails, naming the node or service that is down, when the cluster (or
//! MariaDB) is not there. The workers are bank example processes
//! (`cargo build --examples`).
#![allow(unreachable_pub)]

mod support;

#[path = "../../examples/bank/handlers.rs"]
mod bank;

mod alarm;
mod console;
mod failover;
mod policy;
