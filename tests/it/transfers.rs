//! Many transactions at once against one database, colliding on purpose.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;

use rand::Rng as _;
use serde_json::json;
use tokio::sync::Barrier;
use txq::config::JobConfig;
use txq::{Backend, Handler, Isolation, JobError, JobMeta, Tx, Worker, with_conn};

use crate::bank;
use crate::support::{
    Alive as _, Client, Request, RunningWorker, TestDb, bank_env, by_status, config, eventually,
    exec, unique,
};

/// Few accounts, many concurrent transfers: row locks collide all the time.
async fn contended_transfers_keep_the_books(
    backend: Backend,
    jobs: usize,
    isolation: Option<Isolation>,
) {
    const ACCOUNTS: i64 = 20;
    let test_db = TestDb::new(backend).await;
    bank::setup(&test_db.db, ACCOUNTS)
        .await
        .expect("bank schema");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;

    let mut rng = rand::rng();
    let mut too_big = 0;
    let batch: Vec<Request> = (0..jobs)
        .map(|i| {
            let from = rng.random_range(1..=ACCOUNTS);
            let to = loop {
                let to = rng.random_range(1..=ACCOUNTS);
                if to != from {
                    break to;
                }
            };
            // Every 25th asks for more than any account holds: rejected, not applied.
            let amount = if i % 25 == 0 {
                too_big += 1;
                10 * bank::INITIAL_BALANCE * ACCOUNTS
            } else {
                rng.random_range(1..=100)
            };
            Request::json(
                "transfer",
                json!({"from": from, "to": to, "amount": amount}),
            )
            .id(&format!("m-{i}"))
            .correlation(&format!("c-{i}"))
            .reply_to(&replies)
        })
        .collect();
    client.publish_all(&requests, &batch).await;

    let mut cfg = config(&test_db.url, &requests, &replies, 16);
    cfg.jobs.insert(
        "transfer".into(),
        JobConfig {
            isolation,
            ..JobConfig::default()
        },
    );
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    let got = client.replies(&replies, jobs).await;
    worker.stop().await.expect("clean stop");

    let ids: HashSet<String> = got
        .iter()
        .filter_map(|r| r.correlation_id().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), jobs, "each request got its own reply");
    let expected: HashSet<String> = (0..jobs).map(|i| format!("c-{i}")).collect();
    assert_eq!(ids, expected);
    for r in &got {
        let cid = r.correlation_id().expect("correlation_id");
        let request_id = r.header_text("x-txq-request-id").expect("x-txq-request-id");
        assert_eq!(
            cid.replace("c-", "m-"),
            request_id,
            "reply matched to its request"
        );
    }
    assert_eq!(
        client.depth(&replies).await,
        0,
        "no second reply to any request"
    );
    assert_eq!(client.depth(&requests).await, 0, "every request was acked");

    let statuses = by_status(&got);
    assert_eq!(
        statuses.get("rejected").copied().unwrap_or(0),
        too_big,
        "{statuses:?}"
    );
    let ok = statuses.get("ok").copied().unwrap_or(0);
    assert_eq!(ok + too_big, jobs, "{statuses:?}");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(
        totals.balance_sum,
        ACCOUNTS * bank::INITIAL_BALANCE,
        "money was created or lost"
    );
    assert_eq!(
        totals.transfers, ok as i64,
        "one transfer row per accepted request"
    );
    assert_eq!(totals.distinct_transfer_ids, ok as i64);
}

#[tokio::test]
async fn two_thousand_contended_transfers_on_mariadb_keep_the_books() {
    contended_transfers_keep_the_books(Backend::MySql, 2000, Some(Isolation::ReadCommitted)).await;
}

#[tokio::test]
async fn two_thousand_contended_transfers_on_postgres_keep_the_books() {
    contended_transfers_keep_the_books(Backend::Postgres, 2000, None).await;
}

#[tokio::test]
async fn contended_transfers_on_sqlite_keep_the_books() {
    contended_transfers_keep_the_books(Backend::Sqlite, 500, None).await;
}

/// Updates two rows in the order given; on the first attempt both jobs of a pair
/// meet at a barrier after their first lock, so they deadlock for certain.
struct CrossLock {
    barrier: Arc<Barrier>,
}

impl Handler for CrossLock {
    type Payload = (i64, i64);
    type Output = u32;

    async fn handle(
        &self,
        tx: &mut Tx,
        (a, b): (i64, i64),
        meta: &JobMeta,
    ) -> Result<u32, JobError> {
        let sql = match tx.backend() {
            Backend::Postgres => "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
            _ => "UPDATE accounts SET balance = balance + 1 WHERE id = ?",
        };
        with_conn!(tx, c => { txq::sqlx::query(sql).bind(a).execute(&mut *c).await?; });
        if meta.attempt == 1 {
            self.barrier.wait().await;
        }
        with_conn!(tx, c => { txq::sqlx::query(sql).bind(b).execute(&mut *c).await?; });
        Ok(meta.attempt)
    }
}

async fn a_deadlock_is_retried_in_a_fresh_transaction(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, 2).await;
    client
        .publish_all(
            &requests,
            &[
                Request::json("cross", json!([1, 2]))
                    .correlation("a")
                    .reply_to(&replies),
                Request::json("cross", json!([2, 1]))
                    .correlation("b")
                    .reply_to(&replies),
            ],
        )
        .await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 2))
            .handler(
                "cross",
                CrossLock {
                    barrier: Arc::new(Barrier::new(2)),
                },
            )
            .database(test_db.db.clone()),
    )
    .await;
    let got = client.replies(&replies, 2).await;
    worker.stop().await.expect("clean stop");

    assert!(got.iter().all(|r| r.status() == "ok"), "{got:?}");
    let mut attempts: Vec<i64> = got
        .iter()
        .map(|r| r.body["result"].as_i64().expect("attempt"))
        .collect();
    attempts.sort_unstable();
    assert_eq!(
        attempts,
        [1, 2],
        "exactly one job was the deadlock victim and ran again"
    );
    // sqlx rolls back and returns a dropped transaction's connection in a task of
    // its own: wait for it.
    let db = test_db.db.clone();
    eventually("every connection to go back to the pool", || async {
        let (size, idle) = db.pool_state();
        (size as usize == idle).then_some(())
    })
    .await;
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(
        totals.balance_sum,
        2 * bank::INITIAL_BALANCE + 4,
        "both jobs applied, once each"
    );
}

#[tokio::test]
async fn a_deadlock_on_mariadb_is_retried_and_both_jobs_apply_once() {
    a_deadlock_is_retried_in_a_fresh_transaction(Backend::MySql).await;
}

#[tokio::test]
async fn a_deadlock_on_postgres_is_retried_and_both_jobs_apply_once() {
    a_deadlock_is_retried_in_a_fresh_transaction(Backend::Postgres).await;
}

/// Reports the isolation level its transaction runs at.
struct ShowIsolation;

impl Handler for ShowIsolation {
    type Payload = serde_json::Value;
    type Output = String;

    async fn handle(
        &self,
        tx: &mut Tx,
        _: serde_json::Value,
        _: &JobMeta,
    ) -> Result<String, JobError> {
        let level: String = with_conn!(tx, c => {
            txq::sqlx::query_scalar("SELECT current_setting('transaction_isolation')").fetch_one(c).await?
        });
        Ok(level)
    }
}

#[tokio::test]
async fn each_job_type_runs_at_its_configured_isolation_level() {
    let test_db = TestDb::new(Backend::Postgres).await;
    exec(&test_db.db, "SELECT 1").await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let mut cfg = config(&test_db.url, &requests, &replies, 2);
    cfg.jobs.insert(
        "strict".into(),
        JobConfig {
            isolation: Some(Isolation::Serializable),
            ..JobConfig::default()
        },
    );
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("strict", ShowIsolation)
            .handler("default", ShowIsolation)
            .database(test_db.db.clone()),
    )
    .await;
    client
        .publish(
            &requests,
            &Request::json("strict", json!({})).correlation("s"),
        )
        .await;
    client
        .publish(
            &requests,
            &Request::json("default", json!({})).correlation("d"),
        )
        .await;
    let got = client.replies(&replies, 2).await;
    worker.stop().await.expect("clean stop");
    for r in got {
        let expected = if r.correlation_id() == Some("s") {
            "serializable"
        } else {
            "read committed"
        };
        assert_eq!(r.body["result"], expected, "{r:?}");
    }
}

/// Reads both accounts, then adds to its own: two at once under SERIALIZABLE are
/// a write skew PostgreSQL refuses to one of them (40001). On the first attempt
/// both meet at a barrier after the read, so the conflict is certain.
struct WriteSkew {
    barrier: Arc<Barrier>,
}

impl Handler for WriteSkew {
    type Payload = i64;
    type Output = u32;

    async fn handle(&self, tx: &mut Tx, id: i64, meta: &JobMeta) -> Result<u32, JobError> {
        with_conn!(tx, c => {
            txq::sqlx::query("SELECT SUM(balance) FROM accounts").execute(&mut *c).await?;
        });
        if meta.attempt == 1 {
            self.barrier.wait().await;
        }
        with_conn!(tx, c => {
            txq::sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
                .bind(id)
                .execute(&mut *c)
                .await?;
        });
        Ok(meta.attempt)
    }
}

#[tokio::test]
async fn a_serialization_failure_on_postgres_is_retried_and_both_jobs_apply_once() {
    let (test_db, client, requests, replies) = bank_env(Backend::Postgres, 2).await;
    let mut cfg = config(&test_db.url, &requests, &replies, 2);
    cfg.jobs.insert(
        "skew".into(),
        JobConfig {
            isolation: Some(Isolation::Serializable),
            ..JobConfig::default()
        },
    );
    cfg.retry.max_attempts = NonZeroU32::MIN;
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler(
                "skew",
                WriteSkew {
                    barrier: Arc::new(Barrier::new(2)),
                },
            )
            .database(test_db.db.clone()),
    )
    .await;
    client
        .publish_all(
            &requests,
            &[
                Request::json("skew", json!(1)).correlation("a"),
                Request::json("skew", json!(2)).correlation("b"),
            ],
        )
        .await;
    let got = client.replies(&replies, 2).await;
    let retries = worker.health.retries();
    worker.stop().await.expect("clean stop");
    assert!(got.iter().all(|r| r.status() == "ok"), "{got:?}");
    let mut attempts: Vec<i64> = got
        .iter()
        .map(|r| r.body["result"].as_i64().expect("attempt"))
        .collect();
    attempts.sort_unstable();
    assert_eq!(attempts, [1, 2], "one job was refused and ran again");
    assert_eq!(retries, 1, "in a fresh transaction, in process");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.balance_sum, 2 * bank::INITIAL_BALANCE + 2);
}

/// Reports its attempt.
struct Attempt;

impl Handler for Attempt {
    type Payload = serde_json::Value;
    type Output = u32;

    async fn handle(
        &self,
        tx: &mut Tx,
        _: serde_json::Value,
        meta: &JobMeta,
    ) -> Result<u32, JobError> {
        with_conn!(tx, c => {
            txq::sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
                .execute(&mut *c)
                .await?;
        });
        Ok(meta.attempt)
    }
}

/// Another connection holds SQLite's write lock past `sqlite_busy_timeout`: the
/// job's BEGIN IMMEDIATE gives up (`busy`), and is retried in a fresh transaction
/// until the lock is free.
#[tokio::test]
async fn a_busy_sqlite_database_is_retried() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, 2).await;
    let txq::Db::Sqlite(pool) = &test_db.db else {
        unreachable!("SQLite")
    };
    let mut cfg = config(&test_db.url, &requests, &replies, 1);
    cfg.sqlite_busy_timeout = std::time::Duration::from_millis(100);
    cfg.retry.in_process_attempts = NonZeroU32::new(10).expect("nonzero");
    cfg.retry.max_attempts = NonZeroU32::MIN;
    // Its own pool, so the busy timeout is the config's.
    let mut worker = RunningWorker::start(Worker::builder(cfg).handler("attempt", Attempt)).await;
    // Once it has migrated its tables (which writes).
    let mut holder = pool.acquire().await.expect("a connection");
    txq::sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *holder)
        .await
        .expect("the write lock");
    client
        .publish(&requests, &Request::json("attempt", json!({})))
        .await;
    let health = worker.health.clone();
    worker
        .eventually("the job to find the database busy", || async {
            (health.retries() >= 1).then_some(())
        })
        .await;
    txq::sqlx::query("COMMIT")
        .execute(&mut *holder)
        .await
        .expect("release the write lock");
    let reply = client.replies(&replies, 1).await.remove(0);
    worker.stop().await.expect("clean stop");
    assert_eq!(reply.status(), "ok", "{:?}", reply.body);
    let attempt = reply.body["result"].as_i64().expect("attempt");
    assert!(attempt >= 2, "retried in process: attempt {attempt}");
    drop(holder);
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(
        totals.balance_sum,
        2 * bank::INITIAL_BALANCE + 1,
        "applied once"
    );
}
