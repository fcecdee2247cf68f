//! Test harness: real RabbitMQ and databases, unique names per test, and cleanup
//! that runs even when a test fails. By concern:
//!
//! - [`services`]: the services' URLs, a database of each test's own, statements;
//! - [`amqp`]: a producer/requester client, replies, RabbitMQ users;
//! - [`process`]: workers in this process and as child processes (`txq`, the bank
//!   example), their HTTP port, and waits that fail at once when a worker died;
//! - [`proxy`]: a TCP proxy whose connections can be cut, and a silent port.

use std::time::Duration;

mod amqp;
mod process;
mod proxy;
mod services;

pub use amqp::{
    Client, Collector, RabbitUser, Reply, Request, by_status, correlation_ids, publish_raw,
    rabbitmqctl, transfers,
};
pub use process::{
    Alive, RunningWorker, Txq, TxqOutput, TxqProcess, config, http_get, spawn_bank, txq_command,
};
pub use proxy::{Blackhole, Proxy};
pub use services::{TestDb, amqp_url, exec};
// The servers' admin URLs, for tests that connect beside their own database.
#[allow(unused_imports)]
pub use services::{mysql_url, pg_url};

/// Delayed-retry schedule of test workers: short, so retry tests are quick.
pub const TEST_DELAYS: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(300)];

/// How long a test waits for replies before it fails: a guard against a hang, not
/// a measurement.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(120);

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    format!(
        "txq-test-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Polls `check` until it returns `Some`, failing the test with `what` after
/// [`REPLY_DEADLINE`]. For conditions with no event to await (a queue's depth, a
/// row in another database session). [`Alive::eventually`] also fails as soon as
/// the worker it watches has died.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    poll(what, check, || None).await
}

/// The poll loop behind [`eventually`]: `dead` says why to give up at once.
async fn poll<T, F, Fut>(what: &str, mut check: F, mut dead: impl FnMut() -> Option<String>) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + REPLY_DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if let Some(why) = dead() {
            panic!("{why} while waiting for {what}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {REPLY_DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The set-up most tests share: a database with the bank tables and `accounts`
/// accounts, a client, and a request and a reply queue of their own.
pub async fn bank_env(backend: txq::Backend, accounts: i64) -> (TestDb, Client, String, String) {
    let test_db = TestDb::new(backend).await;
    crate::bank::setup(&test_db.db, accounts)
        .await
        .expect("bank schema");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    (test_db, client, requests, replies)
}

/// A file of a test's own in the temporary directory, removed on drop.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    /// Writes `text` to a fresh file named after `name` (`name` ends in the
    /// extension).
    pub fn with(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("{}-{name}", unique("file")));
        std::fs::write(&path, text).expect("writing a temporary file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
