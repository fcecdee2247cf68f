//! The fleet: each worker's row in `txq_workers`, kept by its heartbeat (jobs in
//! flight, settled, outcomes by minute) and deleted at a clean stop; rows of
//! workers that died read as gone, then are pruned; `txq workers`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;
use txq::db::fleet::{self, Minute, WorkerRow};
use txq::{Backend, Db, Handler, JobError, JobMeta, Tx, Worker};

use crate::bank;
use crate::support::{
    Alive, REPLY_DEADLINE, Request, RunningWorker, Txq, bank_env, by_status, config, exec, http_get,
};

/// The test workers' heartbeat.
const BEAT: Duration = Duration::from_millis(200);

/// Holds each job until the test opens the gate; `waiting` counts those held.
struct Gated {
    gate: Arc<Semaphore>,
    waiting: tokio::sync::watch::Sender<usize>,
}

impl Handler for Gated {
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, _: &mut Tx, _: serde_json::Value, _: &JobMeta) -> Result<(), JobError> {
        self.waiting.send_modify(|n| *n += 1);
        self.gate.acquire().await.expect("gate open").forget();
        self.waiting.send_modify(|n| *n -= 1);
        Ok(())
    }
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970");
    i64::try_from(since.as_millis()).expect("ms fit")
}

/// A test worker on `queue` with a short heartbeat.
fn worker_config(url: &str, queue: &str, replies: &str) -> txq::Config {
    let mut config = config(url, queue, replies, 4);
    config.heartbeat = BEAT;
    config
}

/// The row of the worker consuming `queue`, once one that `wanted` accepts is
/// there; fails at once if the worker died.
async fn row_where(
    worker: &mut RunningWorker,
    db: &Db,
    queue: &str,
    what: &str,
    wanted: impl Fn(&WorkerRow) -> bool,
) -> WorkerRow {
    worker
        .eventually(what, || async {
            fleet::workers(db)
                .await
                .expect("workers")
                .into_iter()
                .find(|w| w.queue == queue && wanted(w))
        })
        .await
}

/// Every worker's outcomes, over every minute.
async fn total(db: &Db) -> Minute {
    let minutes = fleet::throughput(db, 0).await.expect("throughput");
    minutes.iter().fold(Minute::default(), |sum, m| Minute {
        minute_ms: 0,
        ok: sum.ok + m.ok,
        rejected: sum.rejected + m.rejected,
        dead_lettered: sum.dead_lettered + m.dead_lettered,
        retried: sum.retried + m.retried,
    })
}

async fn a_worker_keeps_its_row_while_it_runs(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, 10).await;
    let db = &test_db.db;
    let (waiting, mut held) = tokio::sync::watch::channel(0usize);
    let gate = Arc::new(Semaphore::new(0));
    let mut worker = RunningWorker::start(
        Worker::builder(worker_config(&test_db.url, &requests, &replies))
            .handler("transfer", bank::Transfer)
            .handler(
                "gated",
                Gated {
                    gate: gate.clone(),
                    waiting,
                },
            )
            .database(db.clone()),
    )
    .await;

    // Registered at start, before any request.
    let first = row_where(&mut worker, db, &requests, "the worker's row", |_| true).await;
    assert_eq!(first.pid, i64::from(std::process::id()));
    assert_eq!(first.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(first.concurrency, 4);
    assert!(!first.host.is_empty());
    assert!(uuid::Uuid::parse_str(&first.id).is_ok(), "{}", first.id);
    assert_eq!(
        (first.in_flight, first.settled, first.reconnects),
        (0, 0, 0)
    );
    assert!(!first.is_gone(now_ms()));

    // Three ok, one rejected, one dead-lettered (no handler for its type).
    let transfer = |from: i64, to: i64| {
        Request::json("transfer", json!({"from": from, "to": to, "amount": 1})).reply_to(&replies)
    };
    let batch = [
        transfer(1, 2),
        transfer(2, 3),
        transfer(3, 4),
        transfer(5, 5),
        Request::json("nope", json!({})).reply_to(&replies),
    ];
    client.publish_all(&requests, &batch).await;
    let got = client.replies_while(&replies, 5, &mut worker).await;
    assert_eq!(
        by_status(&got),
        HashMap::from([
            ("ok".to_owned(), 3),
            ("rejected".to_owned(), 1),
            ("failed".to_owned(), 1)
        ])
    );
    let grown = row_where(&mut worker, db, &requests, "5 settled", |w| w.settled >= 5).await;
    assert_eq!(grown.id, first.id, "the same worker");
    assert_eq!(grown.settled, 5);
    assert_eq!(grown.started_at_ms, first.started_at_ms);
    assert!(grown.last_seen_ms > first.last_seen_ms);
    let counted = worker
        .eventually("the outcomes counted by minute", || async {
            let t = total(db).await;
            (t.ok + t.rejected + t.dead_lettered + t.retried >= 5).then_some(t)
        })
        .await;
    assert_eq!(
        (
            counted.ok,
            counted.rejected,
            counted.dead_lettered,
            counted.retried
        ),
        (3, 1, 1, 0)
    );

    // A job held open is in flight until it ends.
    let gated = Request::json("gated", json!({})).reply_to(&replies);
    client.publish(&requests, &gated).await;
    tokio::time::timeout(REPLY_DEADLINE, held.wait_for(|n| *n == 1))
        .await
        .expect("the gated job started")
        .expect("the handler lives");
    assert_eq!(worker.health.in_flight(), 1);
    if backend != Backend::Sqlite {
        row_where(&mut worker, db, &requests, "one job in flight", |w| {
            w.in_flight == 1
        })
        .await;
    }
    // (On SQLite the held job holds the write lock, which the heartbeat waits for.)
    gate.add_permits(1);
    client.replies_while(&replies, 1, &mut worker).await;
    row_where(&mut worker, db, &requests, "no job in flight", |w| {
        w.in_flight == 0 && w.settled == 6
    })
    .await;

    // A clean stop counts the last outcomes and deletes the row.
    worker.stop().await.expect("clean stop");
    assert_eq!(worker_ids(db).await, Vec::<String>::new());
    assert_eq!(total(db).await.ok, 4, "the gated job counted at the stop");
}

async fn worker_ids(db: &Db) -> Vec<String> {
    let rows = fleet::workers(db).await.expect("workers");
    rows.into_iter().map(|w| w.id).collect()
}

#[tokio::test]
async fn a_worker_keeps_its_row_while_it_runs_on_sqlite() {
    a_worker_keeps_its_row_while_it_runs(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_worker_keeps_its_row_while_it_runs_on_mariadb() {
    a_worker_keeps_its_row_while_it_runs(Backend::MySql).await;
}

#[tokio::test]
async fn a_worker_keeps_its_row_while_it_runs_on_postgres() {
    a_worker_keeps_its_row_while_it_runs(Backend::Postgres).await;
}

/// A row as a worker that died left it.
async fn insert_worker(db: &Db, id: &str, last_seen_ms: i64) {
    exec(
        db,
        &format!(
            "INSERT INTO txq_workers (id, host, pid, version, queue, concurrency, started_at_ms,
               last_seen_ms, in_flight, settled, reconnects)
             VALUES ('{id}', 'lost-host', 1, '0.0.1', 'q', 8, {last_seen_ms}, {last_seen_ms}, 2, 10, 0)"
        ),
    )
    .await;
}

async fn old_rows_read_gone_and_are_pruned(backend: Backend) {
    let (test_db, _client, requests, replies) = bank_env(backend, 2).await;
    let db = &test_db.db;
    txq::db::migrate(db).await.expect("migrate");
    let now = now_ms();
    let prune_after = i64::try_from(fleet::PRUNE_AFTER.as_millis()).expect("ms");
    insert_worker(db, "stale", now - 60_000).await;
    insert_worker(db, "dead", now - prune_after - 60_000).await;
    let recent = Minute::start_of(now);
    let old = recent - 3 * 3_600_000;
    for minute in [old, recent] {
        exec(
            db,
            &format!("INSERT INTO txq_throughput VALUES ({minute}, 'dead', 1, 0, 0, 0)"),
        )
        .await;
    }
    let before = fleet::workers(db).await.expect("workers");
    assert_eq!(before.len(), 2);
    assert!(before.iter().all(|w| w.is_gone(now_ms())), "{before:?}");

    // The first beat of a worker prunes what is past PRUNE_AFTER.
    let mut worker = RunningWorker::start(
        Worker::builder(worker_config(&test_db.url, &requests, &replies))
            .handler("transfer", bank::Transfer)
            .database(db.clone()),
    )
    .await;
    let own = row_where(&mut worker, db, &requests, "the worker's row", |_| true).await;
    // A prune is two statements (workers, then minutes): wait for both, or the
    // check below could land between them.
    let left = worker
        .eventually(
            "the dead worker's row and the old minute pruned",
            || async {
                let rows = fleet::workers(db).await.expect("workers");
                let minutes = fleet::throughput(db, 0).await.expect("throughput");
                let pruned = !rows.iter().any(|w| w.id == "dead")
                    && !minutes.iter().any(|m| m.minute_ms == old);
                pruned.then_some(rows)
            },
        )
        .await;
    let now = now_ms();
    let states: Vec<(&str, bool)> = left
        .iter()
        .map(|w| (w.id.as_str(), w.is_gone(now)))
        .collect();
    assert_eq!(states, [("stale", true), (own.id.as_str(), false)]);
    let minutes: Vec<i64> = fleet::throughput(db, 0)
        .await
        .expect("throughput")
        .iter()
        .map(|m| m.minute_ms)
        .collect();
    assert_eq!(minutes, [recent], "the minute older than 2 hours pruned");
    worker.stop().await.expect("clean stop");
    assert_eq!(worker_ids(db).await, ["stale"]);
}

#[tokio::test]
async fn old_rows_read_gone_and_are_pruned_on_sqlite() {
    old_rows_read_gone_and_are_pruned(Backend::Sqlite).await;
}

#[tokio::test]
async fn old_rows_read_gone_and_are_pruned_on_mariadb() {
    old_rows_read_gone_and_are_pruned(Backend::MySql).await;
}

#[tokio::test]
async fn old_rows_read_gone_and_are_pruned_on_postgres() {
    old_rows_read_gone_and_are_pruned(Backend::Postgres).await;
}

async fn txq_workers_lists_the_live_worker(backend: Backend) {
    let (test_db, _client, requests, replies) = bank_env(backend, 2).await;
    let db = &test_db.db;
    let mut worker = RunningWorker::start(
        Worker::builder(worker_config(&test_db.url, &requests, &replies))
            .handler("transfer", bank::Transfer)
            .database(db.clone()),
    )
    .await;
    let own = row_where(&mut worker, db, &requests, "the worker's row", |_| true).await;
    let workers = |args: &[&str]| {
        Txq::new(["workers"])
            .args(args)
            .env("TXQ_DATABASE_URL", &test_db.url)
            .output()
    };

    let out = workers(&["--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let list: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    let list = list.as_array().expect("a JSON array");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], own.id.as_str());
    assert_eq!(list[0]["queue"], requests.as_str());
    assert_eq!(list[0]["pid"], std::process::id());
    assert_eq!(list[0]["concurrency"], 4);
    assert_eq!(list[0]["state"], "live");

    let out = workers(&[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a header and a line: {out:?}");
    assert!(lines[0].starts_with("ID "), "{out:?}");
    let line = lines[1];
    assert!(
        line.starts_with(&own.id[..8])
            && line.contains(&requests)
            && line.contains("/4 ")
            && line.ends_with("live"),
        "{out:?}"
    );

    worker.stop().await.expect("clean stop");
    let out = workers(&["--json"]).await;
    assert_eq!((out.code, out.stdout.trim()), (Some(0), "[]"), "{out:?}");
}

#[tokio::test]
async fn txq_workers_lists_the_live_worker_on_sqlite() {
    txq_workers_lists_the_live_worker(Backend::Sqlite).await;
}

#[tokio::test]
async fn txq_workers_lists_the_live_worker_on_mariadb() {
    txq_workers_lists_the_live_worker(Backend::MySql).await;
}

/// `txq_heartbeat_failures_total` on the `/metrics` of the `txq run` on `port`.
async fn heartbeat_failures(port: u16) -> f64 {
    let (status, body) = http_get(port, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("txq_heartbeat_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no txq_heartbeat_failures_total in {body}"))
}

/// While the heartbeat cannot write its row (the table is gone), the worker
/// consumes on and counts the failures; once it can again, the row is back.
async fn a_failing_heartbeat_never_stops_consumption(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, 2).await;
    let db = &test_db.db;
    let mut txq = Txq::run(&test_db.url, &requests, &replies)
        .env("TXQ_HEARTBEAT", "200ms")
        .spawn();
    let own = txq
        .eventually("the worker's row", || async {
            let rows = fleet::workers(db).await.ok()?;
            rows.into_iter().find(|w| w.queue == requests)
        })
        .await;
    assert_eq!(own.pid, i64::from(txq.pid()));
    let port = txq.http_port().await;
    assert_eq!(heartbeat_failures(port).await, 0.0);

    exec(db, "ALTER TABLE txq_workers RENAME TO txq_workers_away").await;
    txq.eventually("a failed heartbeat", || async {
        (heartbeat_failures(port).await >= 1.0).then_some(())
    })
    .await;
    let echo = Request::json("echo", json!({"n": 1})).reply_to(&replies);
    client.publish(&requests, &echo).await;
    let reply = client.replies_while(&replies, 1, &mut txq).await.remove(0);
    assert_eq!(reply.status(), "ok", "{:?}", reply.body);

    // Back, empty: the next beat writes the row again.
    exec(db, "DELETE FROM txq_workers_away").await;
    exec(db, "ALTER TABLE txq_workers_away RENAME TO txq_workers").await;
    let again = txq
        .eventually("the worker's row written again", || async {
            let rows = fleet::workers(db).await.ok()?;
            rows.into_iter().find(|w| w.id == own.id && w.settled >= 1)
        })
        .await;
    assert_eq!(again.started_at_ms, own.started_at_ms);

    txq.signal("TERM").await;
    assert_eq!(txq.exit_within(REPLY_DEADLINE).await, Some(0));
    assert_eq!(worker_ids(db).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_failing_heartbeat_never_stops_consumption_on_sqlite() {
    a_failing_heartbeat_never_stops_consumption(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_failing_heartbeat_never_stops_consumption_on_mariadb() {
    a_failing_heartbeat_never_stops_consumption(Backend::MySql).await;
}
