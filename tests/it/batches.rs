//! Batches tracked on the server (`txq::db::batch`): exact counts whatever the
//! failures, exactly one completion per completion, on every backend.

use std::collections::{BTreeMap, HashSet};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::types::AMQPValue;
use serde_json::{Value, json};
use txq::{Backend, Db, Handler, JobError, JobMeta, Tx, Worker};

use crate::bank;
use crate::support::{
    Collector, Reply, Request, RunningWorker, Txq, amqp_url, bank_env, config, eventually, exec,
    spawn_bank, transfers, unique,
};

const ACCOUNTS: i64 = 20;

/// A job type that fails for good while `broken` holds (a cause an operator fixes
/// before replaying), and otherwise does what `noop` does.
#[derive(Clone)]
struct Fragile {
    broken: Arc<AtomicBool>,
}

impl Handler for Fragile {
    type Payload = Value;
    type Output = Value;

    async fn handle(&self, tx: &mut Tx, payload: Value, meta: &JobMeta) -> Result<Value, JobError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(JobError::permanent("the cause is not fixed yet"));
        }
        bank::Noop.handle(tx, payload, meta).await
    }
}

fn is_completion(r: &Reply) -> bool {
    r.props.kind().as_ref().map(|k| k.as_str()) == Some("txq.batch.completed")
}

fn completions(replies: &[Reply]) -> Vec<Value> {
    replies
        .iter()
        .filter(|r| is_completion(r))
        .map(|r| r.body.clone())
        .collect()
}

async fn scalar(db: &Db, text: &str) -> i64 {
    let sql = txq::sqlx::AssertSqlSafe(text.to_owned());
    match db {
        Db::MySql(p) => txq::sqlx::query_scalar(sql).fetch_one(p).await,
        Db::Postgres(p) => txq::sqlx::query_scalar(sql).fetch_one(p).await,
        Db::Sqlite(p) => txq::sqlx::query_scalar(sql).fetch_one(p).await,
    }
    .unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// The members of `batch` the database holds, by status.
async fn member_rows(db: &Db, batch: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for status in ["ok", "rejected", "failed"] {
        let sql = format!(
            "SELECT COUNT(*) FROM txq_batch_members WHERE batch_id = '{batch}' AND status = '{status}'"
        );
        out.insert(status.to_owned(), scalar(db, &sql).await);
    }
    out
}

/// A completion body's counts.
fn counts(c: &Value) -> (i64, i64, i64, i64) {
    let n = |k: &str| c[k].as_i64().unwrap_or(-1);
    (n("revision"), n("ok"), n("rejected"), n("failed"))
}

/// A batch of 12 of two job types: 8 transfers that succeed, 2 the handler
/// refuses (`same_account`), 2 `fragile` jobs that fail for good and are
/// dead-lettered. One completion, revision 1, with exactly those counts. Then the
/// cause is fixed and the dead letters replayed with `txq dlq replay`: they move
/// from failed to ok, and revisions 2 and 3 say so. Nothing else is published.
async fn a_mixed_batch_then_a_replay(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, ACCOUNTS).await;
    let broken = Arc::new(AtomicBool::new(true));
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 4))
            .handler("transfer", bank::Transfer)
            .handler(
                "fragile",
                Fragile {
                    broken: broken.clone(),
                },
            )
            .database(test_db.db.clone()),
    )
    .await;
    let mut collector = Collector::start(&client, &replies).await;
    let batch = unique("mixed");
    let mut members: Vec<Request> = transfers(8, ACCOUNTS, &replies);
    for i in 0..2 {
        members.push(
            Request::json("transfer", json!({"from": 1, "to": 1, "amount": 5}))
                .id(&unique("same"))
                .correlation(&format!("r-{i}"))
                .reply_to(&replies),
        );
        members.push(
            Request::json("fragile", json!({"i": i}))
                .id(&unique("fragile"))
                .correlation(&format!("f-{i}"))
                .reply_to(&replies),
        );
    }
    let members: Vec<Request> = members.into_iter().map(|m| m.batch(&batch, 12)).collect();
    client.publish_all(&requests, &members).await;
    // 12 replies and a completion.
    collector.wait_for(13).await;
    let got = collector.snapshot();
    let first = completions(&got);
    assert_eq!(first.len(), 1, "one completion: {first:?}");
    assert_eq!(counts(&first[0]), (1, 8, 2, 2), "{}", first[0]);
    assert_eq!(first[0]["batch_id"], batch.as_str());
    assert_eq!(first[0]["size"], 12);
    assert!(first[0]["completed_at"].is_string(), "{}", first[0]);
    let completion = got.iter().find(|r| is_completion(r)).expect("completion");
    assert_eq!(
        completion
            .props
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned()),
        Some(format!("txq-batch:1:{batch}")),
        "a stable message_id to deduplicate by"
    );
    assert_eq!(
        member_rows(&test_db.db, &batch).await,
        BTreeMap::from([
            ("failed".into(), 2),
            ("ok".into(), 8),
            ("rejected".into(), 2)
        ])
    );
    assert_eq!(
        scalar(&test_db.db, "SELECT COUNT(*) FROM transfers").await,
        8
    );

    broken.store(false, Ordering::SeqCst);
    let replay = Txq::new(["dlq", "replay", "--json"])
        .env("TXQ_AMQP_URL", amqp_url())
        .env("TXQ_QUEUE", &requests)
        .output()
        .await;
    assert_eq!(replay.code, Some(0), "{replay:?}");
    // 2 more replies, and revisions until one has the final counts: a change of
    // a complete batch's counts makes a revision, and changes that commit close
    // together may share one, so a replay of 2 makes revision 2, or 2 and 3.
    collector
        .wait_until("a revision with both replays ok", |got| {
            completions(got).iter().any(|c| {
                let (_, ok, rejected, failed) = counts(c);
                (ok, rejected, failed) == (10, 2, 0)
            })
        })
        .await;
    collector.wait_for(15).await;
    let got = collector.snapshot();
    let mut all = completions(&got);
    all.sort_by_key(|c| c["revision"].as_i64());
    let revisions: Vec<i64> = all.iter().map(|c| counts(c).0).collect();
    assert!(
        revisions == [1, 2] || revisions == [1, 2, 3],
        "consecutive revisions, each once: {all:?}"
    );
    let last = all.last().expect("revisions");
    let (final_revision, ok, rejected, failed) = counts(last);
    assert_eq!((ok, rejected, failed), (10, 2, 0), "{last}");
    if let [_, second, _] = all.as_slice() {
        assert_eq!(counts(second), (2, 9, 2, 1), "{second}");
    }
    let row = txq::db::batch::status(&test_db.db, &batch)
        .await
        .expect("status")
        .expect("the batch");
    assert_eq!(
        (row.revision, row.ok, row.rejected, row.failed),
        (final_revision, 10, 2, 0)
    );
    assert_eq!(
        member_rows(&test_db.db, &batch).await,
        BTreeMap::from([
            ("failed".into(), 0),
            ("ok".into(), 10),
            ("rejected".into(), 2)
        ])
    );
    worker.stop().await.expect("clean stop");
    let replies_after: Vec<Reply> = collector.stop();
    assert_eq!(
        replies_after.len(),
        14 + all.len(),
        "nothing more was published"
    );
}

#[tokio::test]
async fn a_mixed_batch_completes_once_and_a_replay_revises_it_on_sqlite() {
    a_mixed_batch_then_a_replay(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_mixed_batch_completes_once_and_a_replay_revises_it_on_mariadb() {
    a_mixed_batch_then_a_replay(Backend::MySql).await;
}

#[tokio::test]
async fn a_mixed_batch_completes_once_and_a_replay_revises_it_on_postgres() {
    a_mixed_batch_then_a_replay(Backend::Postgres).await;
}

/// Two batches interleaved, and members that cannot count: an unknown batch (no
/// size), a size that disagrees with the open batch, one member too many, a batch
/// id that is not text. Each bad one is answered `failed` (`invalid_batch`) and
/// dead-lettered, nothing is lost, and each good batch completes once, exactly.
async fn interleaved_batches_and_bad_members(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, ACCOUNTS).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 4))
            .handler("noop", bank::Noop)
            .database(test_db.db.clone()),
    )
    .await;
    let mut collector = Collector::start(&client, &replies).await;
    let (a, b) = (unique("a"), unique("b"));
    let member = |batch: &str, size: i64, i: usize| {
        Request::json("noop", json!({}))
            .id(&unique("m"))
            .correlation(&format!("{batch}-{i}"))
            .reply_to(&replies)
            .batch(batch, size)
    };
    let mut good = Vec::new();
    for i in 0..5 {
        good.push(member(&a, 5, i));
        if i < 4 {
            good.push(member(&b, 4, i));
        }
    }
    client.publish_all(&requests, &good).await;
    collector.wait_for(9 + 2).await;
    let bad = vec![
        Request::json("noop", json!({}))
            .id(&unique("m"))
            .correlation("unknown")
            .reply_to(&replies)
            .header(
                "x-txq-batch-id",
                AMQPValue::LongString("nobody-opened-this".into()),
            ),
        member(&a, 7, 90).correlation("wrong-size"),
        member(&a, 5, 91).correlation("one-too-many"),
        Request::json("noop", json!({}))
            .id(&unique("m"))
            .correlation("not-text")
            .reply_to(&replies)
            .header("x-txq-batch-id", AMQPValue::LongLongInt(7))
            .header("x-txq-batch-size", AMQPValue::LongLongInt(1)),
        Request::json("noop", json!({}))
            .correlation("no-message-id")
            .reply_to(&replies)
            .batch(&unique("c"), 1),
        // PostgreSQL's text refuses NUL: counting would fail on every delivery.
        Request::json("noop", json!({}))
            .id(&unique("m"))
            .correlation("nul-in-batch-id")
            .reply_to(&replies)
            .batch("nul\0batch", 1),
    ];
    client.publish_all(&requests, &bad).await;
    let ids: HashSet<String> = [
        "unknown",
        "wrong-size",
        "one-too-many",
        "not-text",
        "no-message-id",
        "nul-in-batch-id",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    collector.wait_for_ids(&ids).await;
    worker.stop().await.expect("clean stop");
    let got = collector.stop();
    for r in got
        .iter()
        .filter(|r| r.correlation_id().is_some_and(|c| ids.contains(c)))
    {
        assert_eq!(r.status(), "failed", "{:?}", r.body);
        assert_eq!(r.body["error"]["kind"], "invalid_batch", "{:?}", r.body);
    }
    let by_batch: BTreeMap<String, Value> = completions(&got)
        .into_iter()
        .map(|c| (c["batch_id"].as_str().unwrap_or_default().to_owned(), c))
        .collect();
    assert_eq!(by_batch.len(), 2, "{by_batch:?}");
    assert_eq!(counts(&by_batch[&a]), (1, 5, 0, 0));
    assert_eq!(counts(&by_batch[&b]), (1, 4, 0, 0));
    assert_eq!(
        client.depth(&format!("{requests}.dlq")).await,
        6,
        "every bad member is kept"
    );
    let status_a = txq::db::batch::status(&test_db.db, &a)
        .await
        .expect("a")
        .expect("row");
    assert_eq!((status_a.size, status_a.ok, status_a.revision), (5, 5, 1));
    assert_eq!(
        scalar(&test_db.db, "SELECT COUNT(*) FROM jobs_log").await,
        9,
        "bad members changed nothing"
    );
    assert!(
        txq::db::batch::status(&test_db.db, "nobody-opened-this")
            .await
            .expect("status")
            .is_none()
    );
}

#[tokio::test]
async fn interleaved_batches_and_bad_members_on_sqlite() {
    interleaved_batches_and_bad_members(Backend::Sqlite).await;
}

#[tokio::test]
async fn interleaved_batches_and_bad_members_on_mariadb() {
    interleaved_batches_and_bad_members(Backend::MySql).await;
}

#[tokio::test]
async fn interleaved_batches_and_bad_members_on_postgres() {
    interleaved_batches_and_bad_members(Backend::Postgres).await;
}

/// A worker that dies between a completion's COMMIT and its confirm leaves the
/// completion in the outbox, unpublished. That state is made here from a real
/// completion (its row set back to unpublished and due, its message taken off
/// the queue); a worker started afterwards publishes it once, with the same
/// message_id, and marks it.
async fn an_unpublished_completion_is_published_by_a_sweep(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, ACCOUNTS).await;
    let start = || {
        RunningWorker::start(
            Worker::builder(config(&test_db.url, &requests, &replies, 2))
                .handler("noop", bank::Noop)
                .database(test_db.db.clone()),
        )
    };
    let batch = unique("swept");
    let worker = start().await;
    let mut collector = Collector::start(&client, &replies).await;
    let members: Vec<Request> = (0..3)
        .map(|i| {
            Request::json("noop", json!({}))
                .id(&unique("m"))
                .correlation(&format!("c-{i}"))
                .reply_to(&replies)
                .batch(&batch, 3)
        })
        .collect();
    client.publish_all(&requests, &members).await;
    collector.wait_for(4).await;
    worker.stop().await.expect("clean stop");
    assert_eq!(completions(&collector.stop()).len(), 1);
    exec(
        &test_db.db,
        &format!(
            "UPDATE txq_batch_completions SET published_at_ms = NULL, due_at_ms = 0 \
             WHERE batch_id = '{batch}'"
        ),
    )
    .await;

    let worker = start().await;
    let mut collector = Collector::start(&client, &replies).await;
    collector.wait_for(1).await;
    let published = format!(
        "SELECT COUNT(*) FROM txq_batch_completions WHERE batch_id = '{batch}' \
         AND published_at_ms IS NOT NULL"
    );
    eventually("the swept completion marked published", || async {
        (scalar(&test_db.db, &published).await == 1).then_some(())
    })
    .await;
    worker.stop().await.expect("clean stop");
    let got = collector.stop();
    assert_eq!(
        got.len(),
        1,
        "published once: {:?}",
        got.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    assert!(is_completion(&got[0]));
    assert_eq!(counts(&got[0].body), (1, 3, 0, 0));
    assert_eq!(
        got[0]
            .props
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned()),
        Some(format!("txq-batch:1:{batch}"))
    );
}

#[tokio::test]
async fn an_unpublished_completion_is_published_once_by_a_sweep_on_sqlite() {
    an_unpublished_completion_is_published_by_a_sweep(Backend::Sqlite).await;
}

#[tokio::test]
async fn an_unpublished_completion_is_published_once_by_a_sweep_on_mariadb() {
    an_unpublished_completion_is_published_by_a_sweep(Backend::MySql).await;
}

#[tokio::test]
async fn an_unpublished_completion_is_published_once_by_a_sweep_on_postgres() {
    an_unpublished_completion_is_published_by_a_sweep(Backend::Postgres).await;
}

/// 10,000 transfers in one batch over three bank worker processes, one of them
/// killed with SIGKILL mid-run and started again. Exactly one completion, and its
/// counts are the database's own: `ok` is the number of transfer rows, and every
/// member is counted once.
async fn a_big_batch_over_three_workers_with_a_kill(backend: Backend, n: usize) {
    let (test_db, client, requests, replies) = bank_env(backend, ACCOUNTS).await;
    let batch = unique("big");
    let members: Vec<Request> = transfers(n, ACCOUNTS, &replies)
        .into_iter()
        .map(|m| m.batch(&batch, n as i64))
        .collect();
    client.publish_all(&requests, &members).await;
    let cfg = config(&test_db.url, &requests, &replies, 8);
    let mut workers: Vec<tokio::process::Child> = (0..3).map(|_| spawn_bank(&cfg)).collect();
    let mut collector = Collector::start(&client, &replies).await;
    collector.wait_for(n / 3).await;
    workers[0].start_kill().expect("SIGKILL");
    let _ = workers[0].wait().await;
    workers[0] = spawn_bank(&cfg);
    // Every member's reply, and the completion (its correlation_id is the batch's).
    let mut ids = crate::support::correlation_ids(n);
    ids.insert(batch.clone());
    collector.wait_for_ids(&ids).await;
    let row = eventually("the batch complete", || async {
        txq::db::batch::status(&test_db.db, &batch)
            .await
            .expect("status")
            .filter(|b| b.revision > 0)
    })
    .await;
    for w in &mut workers {
        let _ = w.start_kill();
        let _ = w.wait().await;
    }
    let got = collector.stop();
    let all = completions(&got);
    assert_eq!(all.len(), 1, "exactly one completion: {all:?}");
    assert_eq!(counts(&all[0]), (1, row.ok, row.rejected, 0));
    assert_eq!(row.ok + row.rejected, n as i64, "{row:?}");
    let transfers_done = scalar(&test_db.db, "SELECT COUNT(*) FROM transfers").await;
    assert_eq!(
        row.ok, transfers_done,
        "ok = the transfers the database holds"
    );
    let m = member_rows(&test_db.db, &batch).await;
    assert_eq!(
        (m["ok"], m["rejected"], m["failed"]),
        (row.ok, row.rejected, 0)
    );
}

#[tokio::test]
async fn a_10000_member_batch_over_three_workers_with_a_kill_9_completes_once_on_mariadb() {
    a_big_batch_over_three_workers_with_a_kill(Backend::MySql, 10_000).await;
}

#[tokio::test]
async fn a_2000_member_batch_over_three_workers_with_a_kill_9_completes_once_on_postgres() {
    a_big_batch_over_three_workers_with_a_kill(Backend::Postgres, 2_000).await;
}

/// `txq submit --batch` tags every line; `txq batch status`, `list` and `wait`
/// read the batch, with `--json`, and `wait` says by its exit code whether every
/// member is ok.
#[tokio::test]
async fn submit_batch_then_status_list_and_wait() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, ACCOUNTS).await;
    drop(client);
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 2))
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    let input = crate::support::TempFile::with(
        "batch.jsonl",
        "{\"type\":\"transfer\",\"payload\":{\"from\":1,\"to\":2,\"amount\":1}}\n\
         {\"type\":\"transfer\",\"payload\":{\"from\":2,\"to\":3,\"amount\":1}}\n\
         {\"type\":\"transfer\",\"payload\":{\"from\":3,\"to\":3,\"amount\":1}}\n",
    );
    let batch = unique("nightly");
    let env = |t: Txq| {
        t.env("TXQ_AMQP_URL", amqp_url())
            .env("TXQ_QUEUE", &requests)
            .env("TXQ_REPLY_QUEUE", &replies)
            .env("TXQ_DATABASE_URL", &test_db.url)
    };
    let submitted = env(Txq::new(["submit", "--json", "--batch", &batch]))
        .arg(&input.0)
        .output()
        .await;
    assert_eq!(submitted.code, Some(0), "{submitted:?}");
    assert!(submitted.stdout.contains(&batch), "{submitted:?}");
    let waited = env(Txq::new([
        "batch",
        "wait",
        &batch,
        "--timeout",
        "60s",
        "--json",
    ]))
    .output()
    .await;
    assert_eq!(waited.code, Some(1), "one member was rejected: {waited:?}");
    let summary: Value = serde_json::from_str(waited.stdout.trim()).expect("JSON");
    assert_eq!(summary["summary"]["ok"], 2, "{summary}");
    assert_eq!(summary["summary"]["rejected"], 1, "{summary}");
    assert_eq!(summary["summary"]["complete"], true, "{summary}");
    let status = env(Txq::new(["batch", "status", &batch])).output().await;
    assert_eq!(status.code, Some(0), "{status:?}");
    assert!(
        status
            .stdout
            .contains("complete (revision 1), 3 of 3 answered: 2 ok, 1 rejected"),
        "{status:?}"
    );
    let listed = env(Txq::new(["batch", "list", "--json"])).output().await;
    let lines: Vec<Value> = listed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{listed:?}");
    assert_eq!(lines[0]["batch_id"], batch.as_str());
    assert_eq!(lines[1]["summary"]["batches"], 1);
    let open = env(Txq::new(["batch", "list", "--open", "--json"]))
        .output()
        .await;
    assert_eq!(open.stdout.lines().count(), 1, "only the summary: {open:?}");
    let unknown = env(Txq::new(["batch", "status", "no-such-batch"]))
        .output()
        .await;
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    let timed_out = env(Txq::new([
        "batch",
        "wait",
        "no-such-batch",
        "--timeout",
        "300ms",
    ]))
    .output()
    .await;
    assert_eq!(timed_out.code, Some(1), "{timed_out:?}");
    worker.stop().await.expect("clean stop");
}

/// An operations file's `[on_batch_complete]`, the chord callback: its steps run
/// once per completion revision, in a transaction of their own, with the
/// completion's fields as parameters, and have committed before the completion is
/// published. A batch of 3 (2 ok, 1 dead-lettered), then a replay of the failure:
/// revision 1 and revision 2 each run it once, with their counts.
async fn the_ops_file_callback_runs_once_per_revision(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, ACCOUNTS).await;
    let stamp = match backend {
        Backend::MySql => "DATETIME(6)",
        Backend::Postgres => "TIMESTAMPTZ",
        Backend::Sqlite => "TEXT",
    };
    exec(
        &test_db.db,
        "CREATE TABLE imports (id VARCHAR(255) PRIMARY KEY, status VARCHAR(16) NOT NULL,
         ok BIGINT NOT NULL, failed BIGINT NOT NULL, revision BIGINT NOT NULL)",
    )
    .await;
    exec(
        &test_db.db,
        &format!(
            "CREATE TABLE import_log (batch_id VARCHAR(255) NOT NULL, revision INTEGER NOT NULL,
             size INTEGER NOT NULL, rejected INTEGER NOT NULL, opened_at {stamp} NOT NULL,
             completed_at {stamp} NOT NULL)"
        ),
    )
    .await;
    let batch = unique("import");
    exec(
        &test_db.db,
        &format!("INSERT INTO imports VALUES ('{batch}', 'running', 0, 0, 0)"),
    )
    .await;
    let ops = txq::sqlops::parse(
        r#"
[[on_batch_complete.steps]]
name = "mark"
sql = "UPDATE imports SET status = 'done', ok = :ok, failed = :failed, revision = :revision WHERE id = :batch_id"
expect_rows = 1

[[on_batch_complete.steps]]
name = "log"
sql = "INSERT INTO import_log VALUES (:batch_id, :revision, :size, :rejected, :opened_at, :completed_at)"
"#,
    )
    .expect("a valid file");
    assert!(ops.operations.is_empty(), "the callback is not a job type");
    let broken = Arc::new(AtomicBool::new(true));
    let builder = Worker::builder(config(&test_db.url, &requests, &replies, 4))
        .handler("noop", bank::Noop)
        .handler(
            "fragile",
            Fragile {
                broken: broken.clone(),
            },
        )
        .database(test_db.db.clone());
    let worker = RunningWorker::start(ops.register(builder, backend).expect("compiles")).await;
    let mut collector = Collector::start(&client, &replies).await;
    let member = |kind: &str, i: usize| {
        Request::json(kind, json!({"i": i}))
            .id(&unique("m"))
            .correlation(&format!("{kind}-{i}"))
            .reply_to(&replies)
            .batch(&batch, 3)
    };
    let members = vec![member("noop", 0), member("noop", 1), member("fragile", 2)];
    client.publish_all(&requests, &members).await;
    collector.wait_for(4).await;
    // Read as soon as the completion arrived: the callback committed before it.
    let mark = format!(
        "SELECT revision * 100 + ok * 10 + failed FROM imports WHERE id = '{batch}' AND status = 'done'"
    );
    assert_eq!(
        scalar(&test_db.db, &mark).await,
        121,
        "revision 1: 2 ok, 1 failed"
    );

    broken.store(false, Ordering::SeqCst);
    let replay = Txq::new(["dlq", "replay", "--json"])
        .env("TXQ_AMQP_URL", amqp_url())
        .env("TXQ_QUEUE", &requests)
        .output()
        .await;
    assert_eq!(replay.code, Some(0), "{replay:?}");
    collector.wait_for(6).await;
    assert_eq!(
        scalar(&test_db.db, &mark).await,
        230,
        "revision 2: 3 ok, 0 failed"
    );
    worker.stop().await.expect("clean stop");
    let got = collector.stop();
    assert_eq!(completions(&got).len(), 2, "{:?}", completions(&got));
    assert_eq!(
        scalar(&test_db.db, "SELECT COUNT(*) FROM import_log").await,
        2,
        "once per revision"
    );
    for revision in [1, 2] {
        let row = format!(
            "SELECT COUNT(*) FROM import_log WHERE batch_id = '{batch}' AND revision = {revision} AND size = 3 AND rejected = 0"
        );
        assert_eq!(scalar(&test_db.db, &row).await, 1, "revision {revision}");
    }
    assert_eq!(
        scalar(
            &test_db.db,
            "SELECT COUNT(*) FROM import_log WHERE completed_at >= opened_at"
        )
        .await,
        2,
        "the timestamps bind as timestamps"
    );
}

#[tokio::test]
async fn the_ops_file_callback_runs_once_per_revision_on_sqlite() {
    the_ops_file_callback_runs_once_per_revision(Backend::Sqlite).await;
}

#[tokio::test]
async fn the_ops_file_callback_runs_once_per_revision_on_mariadb() {
    the_ops_file_callback_runs_once_per_revision(Backend::MySql).await;
}

#[tokio::test]
async fn the_ops_file_callback_runs_once_per_revision_on_postgres() {
    the_ops_file_callback_runs_once_per_revision(Backend::Postgres).await;
}

/// A callback that writes a row, then fails or refuses as told.
#[derive(Clone, Default)]
struct Callback {
    failing: Arc<AtomicBool>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl Handler for Callback {
    type Payload = Value;
    type Output = ();

    async fn handle(&self, tx: &mut Tx, c: Value, _meta: &JobMeta) -> Result<(), JobError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let id = c["batch_id"].as_str().unwrap_or_default().to_owned();
        let rev = c["revision"].as_i64().unwrap_or_default();
        match tx.conn() {
            txq::Conn::Sqlite(conn) => {
                txq::sqlx::query("INSERT INTO called (batch_id, revision) VALUES (?, ?)")
                    .bind(&id)
                    .bind(rev)
                    .execute(&mut *conn)
                    .await?;
            }
            _ => return Err(JobError::permanent("this test runs on SQLite")),
        }
        if id.contains("refuse") {
            return Err(JobError::reject("no_such_import", "refused for good"));
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(JobError::permanent("the callback's table is locked"));
        }
        Ok(())
    }
}

/// A callback that fails holds its completion back, and a sweep runs it again
/// and then publishes; one that refuses (`JobError::reject`) is final, rolled
/// back, and the completion goes out without it.
#[tokio::test]
async fn a_failing_callback_holds_the_completion_and_a_refusing_one_does_not() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, ACCOUNTS).await;
    exec(
        &test_db.db,
        "CREATE TABLE called (batch_id TEXT NOT NULL, revision INTEGER NOT NULL)",
    )
    .await;
    let callback = Callback::default();
    callback.failing.store(true, Ordering::SeqCst);
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 4))
            .handler("noop", bank::Noop)
            .on_batch_complete(callback.clone(), txq::config::JobConfig::default())
            .database(test_db.db.clone()),
    )
    .await;
    let mut collector = Collector::start(&client, &replies).await;
    let batch = unique("held");
    let members: Vec<Request> = (0..2)
        .map(|i| {
            Request::json("noop", json!({}))
                .id(&unique("m"))
                .correlation(&format!("held-{i}"))
                .reply_to(&replies)
                .batch(&batch, 2)
        })
        .collect();
    client.publish_all(&requests, &members).await;
    collector.wait_for(2).await;
    eventually("the callback to have failed once", || async {
        (callback.calls.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    let called = format!("SELECT COUNT(*) FROM called WHERE batch_id = '{batch}'");
    assert_eq!(scalar(&test_db.db, &called).await, 0, "rolled back");
    assert!(
        completions(&collector.snapshot()).is_empty(),
        "the completion waits for its callback"
    );
    callback.failing.store(false, Ordering::SeqCst);
    collector.wait_for(3).await;
    assert_eq!(
        scalar(&test_db.db, &called).await,
        1,
        "committed before the completion was published"
    );

    let refused = unique("refuse");
    let member = Request::json("noop", json!({}))
        .id(&unique("m"))
        .correlation("refused-0")
        .reply_to(&replies)
        .batch(&refused, 1);
    client.publish_all(&requests, &[member]).await;
    collector.wait_for(5).await;
    worker.stop().await.expect("clean stop");
    let got = collector.stop();
    let done = completions(&got);
    assert_eq!(done.len(), 2, "{done:?}");
    assert_eq!(
        scalar(
            &test_db.db,
            &format!("SELECT COUNT(*) FROM called WHERE batch_id = '{refused}'")
        )
        .await,
        0,
        "a refusal rolls the callback back"
    );
    let outbox = format!(
        "SELECT COUNT(*) FROM txq_batch_completions WHERE batch_id = '{refused}' AND callback_at_ms IS NOT NULL"
    );
    assert_eq!(scalar(&test_db.db, &outbox).await, 1, "and is final");
}

/// The worker that committed a batch's last member died before it settled the
/// batch: the counters are complete, the batch row still open, no completion in
/// the outbox. That state is made from a real completion (its row set back, its
/// outbox row deleted); the running worker's sweep settles the batch and
/// publishes the completion.
async fn a_batch_left_unsettled_is_settled_by_a_sweep(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, ACCOUNTS).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 4))
            .handler("noop", bank::Noop)
            .database(test_db.db.clone()),
    )
    .await;
    let mut collector = Collector::start(&client, &replies).await;
    let batch = unique("unsettled");
    let members: Vec<Request> = (0..2)
        .map(|i| {
            Request::json("noop", json!({}))
                .id(&unique("m"))
                .correlation(&format!("u-{i}"))
                .reply_to(&replies)
                .batch(&batch, 2)
        })
        .collect();
    client.publish_all(&requests, &members).await;
    collector.wait_for(3).await;
    exec(
        &test_db.db,
        &format!(
            "UPDATE txq_batches SET revision = 0, completed_at_ms = NULL, ok = 0 WHERE batch_id = '{batch}'"
        ),
    )
    .await;
    exec(
        &test_db.db,
        &format!("DELETE FROM txq_batch_completions WHERE batch_id = '{batch}'"),
    )
    .await;
    collector.wait_for(4).await;
    worker.stop().await.expect("clean stop");
    let got = collector.stop();
    let all = completions(&got);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(counts(&all[1]), (1, 2, 0, 0), "{}", all[1]);
    let row = txq::db::batch::status(&test_db.db, &batch)
        .await
        .expect("status")
        .expect("the batch");
    assert_eq!((row.revision, row.ok), (1, 2));
}

#[tokio::test]
async fn a_batch_left_unsettled_is_settled_by_a_sweep_on_sqlite() {
    a_batch_left_unsettled_is_settled_by_a_sweep(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_batch_left_unsettled_is_settled_by_a_sweep_on_mariadb() {
    a_batch_left_unsettled_is_settled_by_a_sweep(Backend::MySql).await;
}

#[tokio::test]
async fn a_batch_left_unsettled_is_settled_by_a_sweep_on_postgres() {
    a_batch_left_unsettled_is_settled_by_a_sweep(Backend::Postgres).await;
}
