//! Fault tests: crashes, lost connections, shutdown, poison, timeouts and
//! duplicates. Each ends by checking that every request was answered, each accepted
//! transfer applied exactly once, the books balance, and nothing is left queued.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::time::Duration;

use serde_json::json;
use txq::config::JobConfig;
use txq::{Backend, Db, Handler, JobError, JobMeta, Tx, Worker, with_conn};

use crate::bank;
use crate::support::{
    Alive as _, Client, Collector, Proxy, Reply, Request, RunningWorker, TempFile, TestDb, Txq,
    TxqProcess, bank_env, by_status, config, correlation_ids, eventually, publish_raw, spawn_bank,
    transfers, unique,
};

const ACCOUNTS: i64 = 50;

/// The bank tables without `UNIQUE(message_id)` on `transfers`: only the inbox
/// can keep a transfer from applying twice.
async fn fault_env(backend: Backend) -> (TestDb, Client, String, String) {
    let env = bank_env(backend, ACCOUNTS).await;
    let drop_unique = match backend {
        Backend::MySql => "ALTER TABLE transfers DROP INDEX message_id",
        Backend::Postgres => "ALTER TABLE transfers DROP CONSTRAINT transfers_message_id_key",
        Backend::Sqlite => panic!("the fault tests run on MariaDB and PostgreSQL"),
    };
    crate::support::exec(&env.0.db, drop_unique).await;
    env
}

/// Each account's balance now.
async fn balances(db: &Db) -> BTreeMap<i64, i64> {
    let sql = "SELECT id, balance FROM accounts";
    let rows: Vec<(i64, i64)> = match db {
        Db::MySql(p) => txq::sqlx::query_as(sql).fetch_all(p).await,
        Db::Postgres(p) => txq::sqlx::query_as(sql).fetch_all(p).await,
        Db::Sqlite(p) => txq::sqlx::query_as(sql).fetch_all(p).await,
    }
    .expect("balances");
    rows.into_iter().collect()
}

/// The end-of-test checks every fault test shares: every request of `batch` was
/// answered, and each transfer applied exactly once, account by account (a
/// transfer applied twice moves its amount twice, which the sum of balances would
/// not show).
async fn assert_exactly_once(
    test_db: &TestDb,
    client: &Client,
    requests: &str,
    batch: &[Request],
    replies: &[Reply],
) {
    let n = batch.len();
    let ids: HashSet<&str> = replies.iter().filter_map(Reply::correlation_id).collect();
    assert_eq!(ids.len(), n, "every request was answered");
    let not_ok: Vec<&Reply> = replies.iter().filter(|r| r.status() != "ok").collect();
    assert!(
        not_ok.is_empty(),
        "all transfers were accepted: {:?}",
        not_ok.first().map(|r| &r.body)
    );
    let mut expected: BTreeMap<i64, i64> = (1..=ACCOUNTS)
        .map(|id| (id, bank::INITIAL_BALANCE))
        .collect();
    for request in batch {
        let t: serde_json::Value = serde_json::from_slice(&request.body).expect("JSON");
        let (from, to, amount) = (
            t["from"].as_i64().expect("from"),
            t["to"].as_i64().expect("to"),
            t["amount"].as_i64().expect("amount"),
        );
        *expected.get_mut(&from).expect("account") -= amount;
        *expected.get_mut(&to).expect("account") += amount;
    }
    let actual = balances(&test_db.db).await;
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(id, balance)| actual.get(id) != Some(balance))
        .map(|(id, balance)| (id, balance, actual.get(id)))
        .collect();
    assert!(
        wrong.is_empty(),
        "accounts off (id, expected, actual): {wrong:?}"
    );
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(
        totals.transfers, n as i64,
        "each accepted transfer applied exactly once"
    );
    assert_eq!(
        totals.distinct_transfer_ids, n as i64,
        "no message_id applied twice"
    );
    assert_eq!(
        client.depth(requests).await,
        0,
        "nothing left queued or unacked"
    );
}

#[tokio::test]
async fn a_worker_killed_nine_times_over_loses_and_repeats_nothing() {
    const N: usize = 5000;
    let (test_db, client, requests, replies) = fault_env(Backend::MySql).await;
    let batch = transfers(N, ACCOUNTS, &replies);
    client.publish_all(&requests, &batch).await;
    let mut collector = Collector::start(&client, &replies).await;
    let cfg = config(&test_db.url, &requests, &replies, 16);
    for seen in [300, 1500, 3000] {
        let mut worker = spawn_bank(&cfg);
        collector.wait_while(seen, &mut worker).await;
        worker.start_kill().expect("kill -9");
        let status = worker.wait().await.expect("wait");
        assert!(!status.success(), "killed, not exited");
    }
    let mut worker = spawn_bank(&cfg);
    collector
        .wait_for_ids_while(&correlation_ids(N), &mut worker)
        .await;
    terminate(&mut worker).await;
    let got = collector.stop();
    assert_exactly_once(&test_db, &client, &requests, &batch, &got).await;
}

/// Sends SIGTERM and expects a clean exit.
async fn terminate(worker: &mut tokio::process::Child) {
    let pid = worker.id().expect("running");
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("kill -TERM");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(60), worker.wait())
        .await
        .expect("the worker exits within a minute of SIGTERM")
        .expect("wait");
    assert!(status.success(), "SIGTERM ends in exit 0, got {status}");
}

#[tokio::test]
async fn sigterm_finishes_jobs_in_flight_exits_zero_and_leaves_the_rest_queued() {
    const N: usize = 3000;
    let (test_db, client, requests, replies) = fault_env(Backend::MySql).await;
    let batch = transfers(N, ACCOUNTS, &replies);
    client.publish_all(&requests, &batch).await;
    let mut collector = Collector::start(&client, &replies).await;
    let cfg = config(&test_db.url, &requests, &replies, 8);
    let mut worker = spawn_bank(&cfg);
    collector.wait_while(200, &mut worker).await;
    terminate(&mut worker).await;

    let left = client.depth(&requests).await as usize;
    assert!(left > 0, "the rest stays queued for the next worker");
    // Every job that was in flight finished: its reply was confirmed before it was
    // acked, so replies and the remaining queue add up exactly.
    collector.wait_for(N - left).await;
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(
        totals.transfers as usize,
        N - left,
        "no half-done or lost job"
    );

    let mut next = RunningWorker::start(
        Worker::builder(cfg)
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    collector
        .wait_for_ids_while(&correlation_ids(N), &mut next)
        .await;
    next.stop().await.expect("clean stop");
    let got = collector.stop();
    assert_eq!(got.len(), N, "no request answered twice");
    assert_exactly_once(&test_db, &client, &requests, &batch, &got).await;
}

#[tokio::test]
async fn cut_broker_connections_are_rebuilt_and_nothing_is_lost() {
    const N: usize = 3000;
    let (test_db, client, requests, replies) = fault_env(Backend::Postgres).await;
    let batch = transfers(N, ACCOUNTS, &replies);
    client.publish_all(&requests, &batch).await;
    let mut collector = Collector::start(&client, &replies).await;
    let proxy = Proxy::start().await;
    let mut cfg = config(&test_db.url, &requests, &replies, 16);
    cfg.amqp_url = txq::config::SecretUrl::new(proxy.url());
    let mut worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    for seen in [300, 1200] {
        collector.wait_while(seen, &mut worker).await;
        proxy.cut();
    }
    collector
        .wait_for_ids_while(&correlation_ids(N), &mut worker)
        .await;
    assert!(
        worker.health.reconnects() >= 2,
        "the worker reconnected after each cut"
    );
    assert!(worker.health.is_consuming(), "and consumes again");
    worker.stop().await.expect("clean stop");
    let got = collector.stop();
    assert_exactly_once(&test_db, &client, &requests, &batch, &got).await;
}

/// `given`: the test's pool handed in, else the pools the worker makes itself.
async fn killed_database_connections_are_retried(backend: Backend, given: bool) {
    const N: usize = 3000;
    let (mut test_db, client, requests, replies) = fault_env(backend).await;
    let batch = transfers(N, ACCOUNTS, &replies);
    client.publish_all(&requests, &batch).await;
    let mut collector = Collector::start(&client, &replies).await;
    let mut builder = Worker::builder(config(&test_db.url, &requests, &replies, 16))
        .handler("transfer", bank::Transfer);
    if given {
        builder = builder.database(test_db.db.clone());
    }
    let mut worker = RunningWorker::start(builder).await;
    let mut killed = 0;
    for seen in [300, 1200] {
        collector.wait_while(seen, &mut worker).await;
        killed += test_db.kill_connections().await;
    }
    assert!(killed > 0, "connections were killed");
    collector
        .wait_for_ids_while(&correlation_ids(N), &mut worker)
        .await;
    assert!(
        worker.is_running(),
        "a lost database connection never kills the worker"
    );
    worker.stop().await.expect("clean stop");
    let got = collector.stop();
    if !given {
        // The kills ended the idle connections of the test's own pool too, and
        // no job ran on it to find that out.
        test_db.reconnect().await;
    }
    assert_exactly_once(&test_db, &client, &requests, &batch, &got).await;
}

#[tokio::test]
async fn killed_mariadb_connections_are_retried_and_nothing_is_lost() {
    killed_database_connections_are_retried(Backend::MySql, true).await;
}

#[tokio::test]
async fn killed_mariadb_connections_of_jobs_own_pool_are_retried_and_nothing_is_lost() {
    killed_database_connections_are_retried(Backend::MySql, false).await;
}

#[tokio::test]
async fn terminated_postgres_backends_are_retried_and_nothing_is_lost() {
    killed_database_connections_are_retried(Backend::Postgres, true).await;
}

/// Panics on every request.
struct Boom;

impl Handler for Boom {
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, _: &mut Tx, _: serde_json::Value, _: &JobMeta) -> Result<(), JobError> {
        panic!("boom")
    }
}

#[tokio::test]
async fn poison_is_dead_lettered_with_its_reason_and_good_requests_are_answered() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, ACCOUNTS).await;
    let dlq = format!("{requests}.dlq");
    let mut cfg = config(&test_db.url, &requests, &replies, 4);
    cfg.max_body_bytes = std::num::NonZeroUsize::new(2048).expect("nonzero");
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("transfer", bank::Transfer)
            .handler("boom", Boom)
            .database(test_db.db.clone()),
    )
    .await;
    let poison = |t: Option<&str>, body: &[u8], cid: &str| Request {
        job_type: t.map(str::to_owned),
        body: body.to_vec(),
        correlation_id: Some(cid.to_owned()),
        message_id: Some(format!("{cid}-{}", unique("p"))),
        reply_to: Some(replies.clone()),
        ..Request::default()
    };
    let bad = vec![
        (
            poison(Some("transfer"), b"\xff\xfe\xfd", "utf8"),
            "malformed_json",
        ),
        (
            poison(Some("transfer"), b"{\"from\":", "json"),
            "malformed_json",
        ),
        (
            poison(
                Some("transfer"),
                br#"{"from":[1],"to":2,"amount":3}"#,
                "shape",
            ),
            "invalid_payload",
        ),
        (poison(Some("nope"), b"{}", "type"), "unknown_type"),
        (
            poison(Some("transfer"), &vec![b' '; 4096], "big"),
            "body_too_large",
        ),
        (poison(Some("boom"), b"{}", "panic"), "panic"),
        // No properties at all: no type, no ids, no reply_to.
        (
            Request {
                body: b"{}".to_vec(),
                ..Request::default()
            },
            "missing_type",
        ),
    ];
    let good = transfers(20, ACCOUNTS, &replies);
    let mut batch = Vec::new();
    for (i, g) in good.iter().enumerate() {
        batch.push(g.clone());
        if let Some((b, _)) = bad.get(i) {
            batch.push(b.clone());
        }
    }
    client.publish_all(&requests, &batch).await;

    // The one without reply_to is answered on the worker's default reply queue,
    // which is the same queue here.
    let answered = client.replies(&replies, good.len() + bad.len()).await;
    let statuses = by_status(&answered);
    assert_eq!(statuses.get("ok"), Some(&good.len()), "{statuses:?}");
    assert_eq!(statuses.get("failed"), Some(&bad.len()), "{statuses:?}");

    let dead = client.replies(&dlq, bad.len()).await;
    for (request, kind) in &bad {
        let copy = dead
            .iter()
            .find(|d| {
                d.props.message_id().as_ref().map(|m| m.as_str()) == request.message_id.as_deref()
            })
            .unwrap_or_else(|| panic!("{kind} was dead-lettered"));
        assert_eq!(copy.header_text("x-txq-error-kind").as_deref(), Some(*kind));
        assert_eq!(
            copy.header_text("x-txq-original-queue").as_deref(),
            Some(requests.as_str())
        );
        assert!(
            copy.header_text("x-txq-error")
                .is_some_and(|e| !e.is_empty()),
            "{kind}: says why"
        );
        assert!(copy.header_text("x-txq-failed-at").is_some());
        assert_eq!(
            copy.data, request.body,
            "{kind}: the original body, untouched"
        );
    }
    assert!(worker.is_running(), "poison never stops the worker");
    worker.stop().await.expect("clean stop");
    assert_eq!(client.depth(&requests).await, 0);
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.transfers, good.len() as i64);
    assert_eq!(totals.balance_sum, ACCOUNTS * bank::INITIAL_BALANCE);
}

/// Takes account 1's row lock, then sleeps in the database far past its timeout.
struct Hog;

impl Handler for Hog {
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, tx: &mut Tx, _: serde_json::Value, _: &JobMeta) -> Result<(), JobError> {
        let (lock, sleep) = match tx.backend() {
            Backend::Postgres => (
                "UPDATE accounts SET balance = balance + 1000 WHERE id = 1",
                "SELECT pg_sleep(30)",
            ),
            _ => (
                "UPDATE accounts SET balance = balance + 1000 WHERE id = 1",
                "SELECT SLEEP(30)",
            ),
        };
        with_conn!(tx, c => {
            txq::sqlx::query(lock).execute(&mut *c).await?;
            txq::sqlx::query(sleep).execute(&mut *c).await?;
        });
        Ok(())
    }
}

/// Where the job's database-side timeout is set: in each BEGIN (job types with
/// different timeouts), or once per session when the pool was connected with the
/// one timeout every type uses; `OwnPools`: the same, on the pools a worker
/// makes when it connects itself (on MariaDB, jobs' own with autocommit off).
#[derive(Clone, Copy, PartialEq)]
enum TimeoutVia {
    Begin,
    Session,
    OwnPools,
}

async fn a_timed_out_job_releases_its_locks(backend: Backend, via: TimeoutVia) {
    let (test_db, client, requests, replies) = bank_env(backend, ACCOUNTS).await;
    let mut cfg = config(&test_db.url, &requests, &replies, 4);
    let db = match via {
        TimeoutVia::Begin => {
            cfg.jobs.insert(
                "hog".into(),
                JobConfig {
                    timeout: Some(Duration::from_secs(1)),
                    ..JobConfig::default()
                },
            );
            Some(test_db.db.clone())
        }
        TimeoutVia::OwnPools => {
            cfg.job_timeout = Duration::from_secs(1);
            None
        }
        TimeoutVia::Session => {
            cfg.job_timeout = Duration::from_secs(1);
            let db = Db::connect(&test_db.url, &cfg.pool_options())
                .await
                .expect("pool with session timeouts");
            let mariadb = db.is_mariadb().await.expect("version");
            assert!(
                db.session_timeout_is(mariadb, Duration::from_secs(1))
                    .await
                    .expect("read back"),
                "the sessions carry the timeout, so BEGIN sets none"
            );
            Some(db)
        }
    };
    cfg.retry.in_process_attempts = NonZeroU32::MIN;
    cfg.retry.max_attempts = NonZeroU32::new(2).expect("nonzero");
    let mut builder = Worker::builder(cfg)
        .handler("hog", Hog)
        .handler("transfer", bank::Transfer);
    if let Some(db) = db {
        builder = builder.database(db);
    }
    let worker = RunningWorker::start(builder).await;
    client
        .publish(
            &requests,
            &Request::json("hog", json!({}))
                .correlation("hog")
                .reply_to(&replies),
        )
        .await;
    let others: Vec<Request> = (0..20)
        .map(|i| {
            Request::json("transfer", json!({"from": 1, "to": 2, "amount": 1}))
                .correlation(&format!("t-{i}"))
                .reply_to(&replies)
        })
        .collect();
    client.publish_all(&requests, &others).await;
    let got = client.replies(&replies, 21).await;
    worker.stop().await.expect("clean stop");

    let hog = got
        .iter()
        .find(|r| r.correlation_id() == Some("hog"))
        .expect("hog's reply");
    assert_eq!(hog.body["error"]["kind"], "timeout", "{:?}", hog.body);
    assert_eq!(
        hog.body["error"]["attempts"], 2,
        "retried once through the retry queue"
    );
    let ok = by_status(&got).get("ok").copied().unwrap_or(0);
    match via {
        TimeoutVia::Begin => assert_eq!(ok, 20, "jobs on the same rows proceeded"),
        // Every job waits on locks for the one timeout at most (lock wait or
        // statement limit, whichever ends first), and the hog holds its lock for
        // as long: a transfer queued right behind it may give up first.
        // Had the database not ended the hog, none could have proceeded.
        TimeoutVia::Session | TimeoutVia::OwnPools => {
            assert!(ok >= 1, "jobs on the same rows proceeded");
            for r in got.iter().filter(|r| r.correlation_id() != Some("hog")) {
                let kind = &r.body["error"]["kind"];
                assert!(
                    r.status() == "ok" || kind == "lock_timeout" || kind == "timeout",
                    "{:?}",
                    r.body
                );
            }
        }
    }
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(
        totals.balance_sum,
        ACCOUNTS * bank::INITIAL_BALANCE,
        "the hog's update was rolled back"
    );
    assert_eq!(totals.transfers, ok as i64);
    let dead = client
        .replies(&format!("{requests}.dlq"), got.len() - ok)
        .await;
    let hog = dead
        .iter()
        .find(|r| r.correlation_id() == Some("hog"))
        .expect("the hog was dead-lettered");
    assert_eq!(
        hog.header_text("x-txq-error-kind").as_deref(),
        Some("timeout")
    );
    assert_eq!(
        hog.header("x-txq-attempts"),
        Some(lapin::types::AMQPValue::LongLongInt(2))
    );
}

#[tokio::test]
async fn a_timed_out_job_on_mariadb_is_rolled_back_and_releases_its_locks() {
    a_timed_out_job_releases_its_locks(Backend::MySql, TimeoutVia::Begin).await;
}

#[tokio::test]
async fn a_session_timeout_on_mariadb_rolls_back_and_releases_locks() {
    a_timed_out_job_releases_its_locks(Backend::MySql, TimeoutVia::Session).await;
}

#[tokio::test]
async fn a_session_timeout_on_mariadb_jobs_own_pool_rolls_back_and_releases_locks() {
    a_timed_out_job_releases_its_locks(Backend::MySql, TimeoutVia::OwnPools).await;
}

#[tokio::test]
async fn a_session_timeout_on_postgres_rolls_back_and_releases_locks() {
    a_timed_out_job_releases_its_locks(Backend::Postgres, TimeoutVia::Session).await;
}

#[tokio::test]
async fn a_timed_out_job_on_postgres_is_rolled_back_and_releases_its_locks() {
    a_timed_out_job_releases_its_locks(Backend::Postgres, TimeoutVia::Begin).await;
}

async fn duplicates_run_once_and_get_the_same_reply(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, ACCOUNTS).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 4))
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    let transfer = |id: &str, amount: i64, cid: &str| {
        Request::json("transfer", json!({"from": 1, "to": 2, "amount": amount}))
            .id(id)
            .correlation(cid)
            .reply_to(&replies)
    };
    // A redelivery of a processed id.
    client.publish(&requests, &transfer("x", 10, "first")).await;
    let first = client.replies(&replies, 1).await.remove(0);
    client.publish(&requests, &transfer("x", 10, "again")).await;
    let again = client.replies(&replies, 1).await.remove(0);
    assert_eq!(first.status(), "ok");
    assert_eq!(
        again.body, first.body,
        "the stored reply, not a second transfer"
    );
    assert_eq!(first.header("x-txq-duplicate"), None);
    assert_eq!(
        again.header("x-txq-duplicate"),
        Some(lapin::types::AMQPValue::Boolean(true)),
        "a reply from the inbox says so"
    );

    // Two deliveries of one id at once.
    client
        .publish_all(
            &requests,
            &[transfer("y", 20, "y1"), transfer("y", 20, "y2")],
        )
        .await;
    let pair = client.replies(&replies, 2).await;
    assert_eq!(
        pair[0].body, pair[1].body,
        "both deliveries get the same reply"
    );
    assert_eq!(pair[0].status(), "ok");

    // A rejection is stored too: a redelivery after the cause went away still gets it.
    client
        .publish(&requests, &transfer("z", 10 * bank::INITIAL_BALANCE, "z1"))
        .await;
    let refused = client.replies(&replies, 1).await.remove(0);
    assert_eq!(refused.body["error"]["code"], "insufficient_funds");
    crate::support::exec(
        &test_db.db,
        "UPDATE accounts SET balance = balance * 100 WHERE id = 1",
    )
    .await;
    client
        .publish(&requests, &transfer("z", 10 * bank::INITIAL_BALANCE, "z2"))
        .await;
    let still = client.replies(&replies, 1).await.remove(0);
    assert_eq!(still.body, refused.body);

    worker.stop().await.expect("clean stop");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.transfers, 2, "x and y applied once each, z never");
    assert_eq!(client.depth(&requests).await, 0);
}

#[tokio::test]
async fn duplicates_on_mariadb_run_once_and_get_the_same_reply() {
    duplicates_run_once_and_get_the_same_reply(Backend::MySql).await;
}

#[tokio::test]
async fn duplicates_on_postgres_run_once_and_get_the_same_reply() {
    duplicates_run_once_and_get_the_same_reply(Backend::Postgres).await;
}

#[tokio::test]
async fn duplicates_on_sqlite_run_once_and_get_the_same_reply() {
    duplicates_run_once_and_get_the_same_reply(Backend::Sqlite).await;
}

/// Fails transiently until its third delivery.
struct Flaky;

impl Handler for Flaky {
    type Payload = serde_json::Value;
    type Output = u32;

    async fn handle(
        &self,
        _: &mut Tx,
        _: serde_json::Value,
        meta: &JobMeta,
    ) -> Result<u32, JobError> {
        if meta.delivery_attempt < 3 {
            return Err(JobError::transient(format!(
                "not yet ({})",
                meta.delivery_attempt
            )));
        }
        Ok(meta.delivery_attempt)
    }
}

#[tokio::test]
async fn a_transient_failure_is_retried_later_through_the_broker() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, ACCOUNTS).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 2))
            .handler("flaky", Flaky)
            .database(test_db.db.clone()),
    )
    .await;
    client
        .publish(
            &requests,
            &Request::json("flaky", json!({})).id("f").reply_to(&replies),
        )
        .await;
    let reply = client.replies(&replies, 1).await.remove(0);
    assert_eq!(reply.body, json!({"status": "ok", "result": 3}));
    assert_eq!(
        reply.header("x-txq-attempts"),
        Some(lapin::types::AMQPValue::LongLongInt(3))
    );
    worker.stop().await.expect("clean stop");
    assert_eq!(client.depth(&requests).await, 0);
}

#[tokio::test]
async fn a_request_with_huge_headers_is_dead_lettered_without_breaking_the_connection() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, ACCOUNTS).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 2))
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    // 100 KiB of headers: fits the request's frame, but not with txq's own added.
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "big".into(),
        txq::broker::long_string(&"x".repeat(100 * 1024)),
    );
    let props = lapin::BasicProperties::default()
        .with_type("nope".into())
        .with_message_id("huge".into())
        .with_headers(headers);
    publish_raw(&client.channel, &requests, b"{}", props).await;
    let reply = client.replies(&replies, 1).await.remove(0);
    assert_eq!(reply.body["error"]["kind"], "unknown_type");
    let dead = client
        .replies(&format!("{requests}.dlq"), 1)
        .await
        .remove(0);
    assert!(
        dead.header("x-txq-headers-dropped").is_some(),
        "{:?}",
        dead.props.headers()
    );
    assert!(dead.header("big").is_none());
    assert_eq!(
        dead.header_text("x-txq-error-kind").as_deref(),
        Some("unknown_type")
    );
    assert_eq!(
        worker.health.reconnects(),
        0,
        "the connection was never broken"
    );
    worker.stop().await.expect("clean stop");
    assert_eq!(client.depth(&requests).await, 0);
}

/// An operation that logs a row, then sleeps in the database for a minute: a job
/// that outlives any grace period.
const SLOW_OPS: &str = r#"
[slow]
[[slow.steps]]
name = "log"
sql = "INSERT INTO jobs_log (message_id) VALUES (:$message_id)"
[[slow.steps]]
name = "nap"
sql = "SELECT pg_sleep(60)"
"#;

/// Waits until a job of `txq` sleeps in PostgreSQL.
async fn until_sleeping(txq: &mut TxqProcess, test_db: &TestDb) {
    let Db::Postgres(pool) = &test_db.db else {
        unreachable!("PostgreSQL")
    };
    txq.eventually("the job to sleep in the database", || async {
        let n: i64 = txq::sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event = 'PgSleep'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        (n == 1).then_some(())
    })
    .await;
}

/// The exit code of a stop past its grace period, and of a second signal.
const EXIT_AFTER_GRACE: Option<i32> = Some(0);
const EXIT_ON_SECOND_SIGNAL: Option<i32> = Some(130);

/// SIGTERM with a job running past the grace period: it is rolled back and its
/// request handed back, and txq exits 0 soon after the grace period.
#[tokio::test]
async fn a_job_past_the_grace_period_is_rolled_back_and_requeued() {
    const GRACE: Duration = Duration::from_millis(500);
    let (test_db, client, requests, replies) = bank_env(Backend::Postgres, 2).await;
    let ops = TempFile::with("slow.toml", SLOW_OPS);
    let mut txq = Txq::run(&test_db.url, &requests, &replies)
        .arg("--ops")
        .arg(&ops.0)
        .env("TXQ_SHUTDOWN_GRACE", format!("{}ms", GRACE.as_millis()))
        .spawn();
    client
        .publish(&requests, &Request::json("slow", json!({})).id("slow"))
        .await;
    until_sleeping(&mut txq, &test_db).await;

    let signalled = tokio::time::Instant::now();
    txq.signal("TERM").await;
    txq.logged("grace period over; rolling back and requeueing")
        .await;
    let code = txq.exit_within(GRACE + Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert_eq!(code, EXIT_AFTER_GRACE, "a stop past the grace period");
    assert!(took >= GRACE, "it waited for the grace period: {took:?}");
    // The job gives its delivery back at once: txq need not wait out its
    // teardown limit (3 s) for it.
    assert!(
        took < GRACE + Duration::from_millis(2500),
        "it stopped soon after the grace period: {took:?}"
    );
    let log = txq.final_log().await;
    assert!(
        !log.iter()
            .any(|l| l.contains("did not hand their deliveries back")),
        "the job was rolled back and its delivery handed back: {log:#?}"
    );

    let requeued = eventually("the request back in its queue", || async {
        let channel = client.conn.create_channel().await.expect("channel");
        channel
            .basic_get(
                requests.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
    })
    .await;
    assert!(requeued.delivery.redelivered, "handed back, not lost");
    assert_eq!(
        bank::totals(&test_db.db).await.expect("totals").jobs_logged,
        0,
        "its row was rolled back"
    );
    assert_eq!(client.depth(&replies).await, 0, "and nothing answered");
}

/// A second signal ends txq at once, whatever is in flight.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let (test_db, client, requests, replies) = bank_env(Backend::Postgres, 2).await;
    let ops = TempFile::with("slow.toml", SLOW_OPS);
    let mut txq = Txq::run(&test_db.url, &requests, &replies)
        .arg("--ops")
        .arg(&ops.0)
        .env("TXQ_SHUTDOWN_GRACE", "60s")
        .spawn();
    client
        .publish(&requests, &Request::json("slow", json!({})).id("slow"))
        .await;
    until_sleeping(&mut txq, &test_db).await;
    txq.signal("TERM").await;
    txq.logged("shutdown signal: finishing jobs in flight")
        .await;
    txq.signal("TERM").await;
    let code = txq.exit_within(Duration::from_secs(5)).await;
    assert_eq!(code, EXIT_ON_SECOND_SIGNAL, "a second signal");
    assert_eq!(
        bank::totals(&test_db.db).await.expect("totals").jobs_logged,
        0
    );
    eventually("the request back in its queue", || async {
        (client.depth(&requests).await == 1).then_some(())
    })
    .await;
}
