//! Jobs' own pool on MariaDB (ARCHITECTURE.md, "one job = one connection = one
//! transaction"): a worker that connects itself runs jobs on sessions with
//! autocommit off, where a transaction opens with its first statement. A
//! transaction that did not end (a rollback, a timeout that dropped it) must
//! never reach the next job on that connection: with one connection and one job
//! at a time, the next job's COMMIT would otherwise commit it too.
//!
//! On SQLite, jobs take turns at the database's one write lock before they
//! begin, instead of in SQLite's busy handler.

use std::num::NonZeroU32;
use std::time::Duration;

use serde_json::json;
use txq::config::JobConfig;
use txq::{Backend, Handler, JobError, JobMeta, Tx, Worker, with_conn};

use crate::support::{Client, RunningWorker, TestDb, config, exec, unique};

/// Inserts `note` into `t`; then answers, rejects, or outlives its timeout.
struct Mark;

#[derive(serde::Deserialize)]
struct MarkPayload {
    note: String,
    /// `ok`, `reject` or `hang`.
    then: String,
}

impl Handler for Mark {
    type Payload = MarkPayload;
    type Output = serde_json::Value;

    async fn handle(
        &self,
        tx: &mut Tx,
        p: MarkPayload,
        _: &JobMeta,
    ) -> Result<serde_json::Value, JobError> {
        let autocommit: i64 = with_conn!(tx, c => {
            txq::sqlx::query("INSERT INTO t (note) VALUES (?)")
                .bind(&p.note)
                .execute(&mut *c)
                .await?;
            txq::sqlx::query_scalar("SELECT @@autocommit").fetch_one(&mut *c).await?
        });
        match p.then.as_str() {
            "reject" => Err(JobError::Rejected {
                code: "no".into(),
                message: "rolled back on purpose".into(),
            }),
            // Not a statement the database would time out: only the worker's
            // own timeout ends it, by dropping the transaction mid-way.
            "hang" => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(json!(null))
            }
            _ => Ok(json!({ "autocommit": autocommit })),
        }
    }
}

async fn notes(db: &TestDb) -> Vec<String> {
    let txq::Db::MySql(pool) = &db.db else {
        panic!("MariaDB only")
    };
    txq::sqlx::query_scalar("SELECT note FROM t ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("notes")
}

/// One worker, one job at a time on one connection; `given`: the test's pool
/// handed in (`Worker::database`) instead of the worker connecting itself.
async fn run(jobs: &[(&str, &str)], given: bool) -> (Vec<serde_json::Value>, Vec<String>) {
    let test_db = TestDb::new(Backend::MySql).await;
    exec(
        &test_db.db,
        "CREATE TABLE t (id BIGINT AUTO_INCREMENT PRIMARY KEY, note TEXT)",
    )
    .await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let mut cfg = config(&test_db.url, &requests, &replies, 1);
    cfg.prefetch = Some(std::num::NonZeroU16::MIN);
    cfg.db_pool_size = Some(NonZeroU32::MIN);
    cfg.retry.in_process_attempts = NonZeroU32::MIN;
    cfg.retry.max_attempts = NonZeroU32::MIN;
    cfg.jobs.insert(
        "mark".into(),
        JobConfig {
            timeout: Some(Duration::from_millis(500)),
            ..JobConfig::default()
        },
    );
    let mut builder = Worker::builder(cfg).handler("mark", Mark);
    if given {
        builder = builder.database(test_db.db.clone());
    }
    let worker = RunningWorker::start(builder).await;
    let requests_out: Vec<_> = jobs
        .iter()
        .map(|(note, then)| {
            crate::support::Request::json("mark", json!({"note": note, "then": then}))
                .correlation(note)
                .reply_to(&replies)
        })
        .collect();
    client.publish_all(&requests, &requests_out).await;
    let got = client.replies(&replies, jobs.len()).await;
    worker.stop().await.expect("clean stop");
    // In the order the jobs were published.
    let bodies = jobs
        .iter()
        .map(|(note, _)| {
            let reply = got
                .iter()
                .find(|r| r.correlation_id() == Some(note))
                .unwrap_or_else(|| panic!("a reply to {note}: {got:?}"));
            reply.body.clone()
        })
        .collect();
    (bodies, notes(&test_db).await)
}

#[tokio::test]
async fn a_worker_that_connects_itself_runs_jobs_with_autocommit_off() {
    let (own, _) = run(&[("a", "ok")], false).await;
    assert_eq!(own[0]["result"]["autocommit"], 0, "{own:?}");
    // A pool handed in is used as it is.
    let (given, _) = run(&[("a", "ok")], true).await;
    assert_eq!(given[0]["result"]["autocommit"], 1, "{given:?}");
}

#[tokio::test]
async fn a_rolled_back_job_leaves_nothing_for_the_next_commit() {
    let (replies, notes) = run(&[("rejected", "reject"), ("kept", "ok")], false).await;
    assert_eq!(replies[0]["status"], "rejected", "{replies:?}");
    assert_eq!(replies[1]["status"], "ok", "{replies:?}");
    assert_eq!(notes, vec!["kept".to_owned()]);
}

#[tokio::test]
async fn a_job_dropped_at_its_timeout_leaves_nothing_for_the_next_commit() {
    let (replies, notes) = run(&[("dropped", "hang"), ("kept", "ok")], false).await;
    assert_eq!(replies[0]["status"], "failed", "{replies:?}");
    assert_eq!(replies[1]["status"], "ok", "{replies:?}");
    assert_eq!(notes, vec!["kept".to_owned()]);
}

/// Inserts `note` into `t` and keeps the transaction, and with it SQLite's
/// write lock, for a while: the work a handler does between its statements.
struct Hold;

impl Handler for Hold {
    type Payload = String;
    type Output = ();

    async fn handle(&self, tx: &mut Tx, note: String, _: &JobMeta) -> Result<(), JobError> {
        with_conn!(tx, c => {
            txq::sqlx::query("INSERT INTO t (note) VALUES (?)")
                .bind(&note)
                .execute(&mut *c)
                .await?;
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(())
    }
}

/// Eight jobs at once on SQLite, each holding the write lock five times longer
/// than the busy timeout: every one must still run once and commit, because jobs
/// wait for their turn in the worker, not in SQLite's busy handler (where all
/// but the first would fail with "database is locked").
async fn turns(given: bool) {
    let test_db = TestDb::new(Backend::Sqlite).await;
    exec(&test_db.db, "CREATE TABLE t (note TEXT NOT NULL)").await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let busy_timeout = Duration::from_millis(20);
    let mut cfg = config(&test_db.url, &requests, &replies, 8);
    cfg.sqlite_busy_timeout = busy_timeout;
    cfg.retry.in_process_attempts = NonZeroU32::MIN;
    cfg.retry.max_attempts = NonZeroU32::MIN;
    let mut builder = Worker::builder(cfg).handler("hold", Hold);
    if given {
        let options = txq::db::PoolOptions {
            max_connections: 8,
            sqlite_busy_timeout: busy_timeout,
            ..Default::default()
        };
        let db = txq::Db::connect(&test_db.url, &options)
            .await
            .expect("the test's pool");
        builder = builder.database(db);
    }
    let worker = RunningWorker::start(builder).await;
    let notes: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
    let out: Vec<_> = notes
        .iter()
        .map(|n| {
            crate::support::Request::json("hold", json!(n))
                .correlation(n)
                .reply_to(&replies)
        })
        .collect();
    client.publish_all(&requests, &out).await;
    let got = client.replies(&replies, notes.len()).await;
    worker.stop().await.expect("clean stop");
    for reply in &got {
        assert_eq!(reply.status(), "ok", "{got:?}");
        assert_eq!(
            reply.header("x-txq-attempts"),
            Some(lapin::types::AMQPValue::LongLongInt(1)),
            "{got:?}"
        );
    }
    let txq::Db::Sqlite(pool) = &test_db.db else {
        unreachable!("SQLite")
    };
    let stored: Vec<String> = txq::sqlx::query_scalar("SELECT note FROM t ORDER BY note")
        .fetch_all(pool)
        .await
        .expect("notes");
    assert_eq!(stored, notes);
}

#[tokio::test]
async fn sqlite_jobs_take_turns_at_the_write_lock_in_the_worker() {
    turns(false).await;
}

#[tokio::test]
async fn sqlite_jobs_take_turns_on_a_pool_handed_in_too() {
    turns(true).await;
}
