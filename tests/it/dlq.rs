//! `txq dlq`: the binary against a real broker, worker and databases.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use txq::{Backend, Db, Worker, with_conn};

use crate::bank;
use crate::support::{
    Client, Collector, Proxy, RabbitUser, Reply, Request, RunningWorker, TestDb, Txq, TxqOutput,
    amqp_url, bank_env, config, exec, rabbitmqctl, transfers, unique,
};

/// What a run of the `txq` binary left.
type Run = TxqOutput;

/// What `dlq` commands print with `--json`.
trait Printed {
    fn json_lines(&self) -> Vec<Value>;
    fn summary(&self) -> Value;
}

/// The `--json` convention's last line: an object holding `summary` alone.
fn is_summary(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|o| o.len() == 1 && o.contains_key("summary"))
}

fn all_json(out: &TxqOutput) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

impl Printed for TxqOutput {
    /// The rows: every JSON line but the summary.
    fn json_lines(&self) -> Vec<Value> {
        all_json(self)
            .into_iter()
            .filter(|v| !is_summary(v))
            .collect()
    }

    fn summary(&self) -> Value {
        all_json(self)
            .into_iter()
            .find_map(|v| v.get("summary").cloned())
            .unwrap_or_else(|| panic!("no summary line in {}", self.stdout))
    }
}

/// `txq <args>` on the broker at `amqp` with `queue` as the worker's queue, so
/// the dead-letter queue is `<queue>.dlq`.
fn txq_at(amqp: &str, queue: &str, args: &[&str]) -> Txq {
    Txq::new(args)
        .env("TXQ_AMQP_URL", amqp)
        .env("TXQ_QUEUE", queue)
}

/// The same as a process to watch (its stdout and stderr piped).
fn txq_command(amqp: &str, queue: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = crate::support::txq_command();
    cmd.args(args)
        .env("TXQ_AMQP_URL", amqp)
        .env("TXQ_QUEUE", queue)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// `txq <args>` on the test broker, to the end.
async fn txq(queue: &str, args: &[&str]) -> Run {
    txq_at(&amqp_url(), queue, args).output().await
}

/// A dead letter as a txq worker writes it.
struct Dead {
    id: String,
    job_type: &'static str,
    kind: &'static str,
    error: String,
    original_queue: Option<String>,
}

async fn publish_dead(client: &Client, dlq: &str, dead: &[Dead]) {
    publish_dead_replying(client, dlq, dead, None).await;
}

/// As [`publish_dead`], each with `reply_to` if given.
async fn publish_dead_replying(client: &Client, dlq: &str, dead: &[Dead], reply_to: Option<&str>) {
    for d in dead {
        let mut h = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        h.insert("x-txq-error-kind".into(), text(d.kind));
        h.insert("x-txq-error".into(), text(&d.error));
        h.insert("x-txq-attempts".into(), AMQPValue::LongLongInt(3));
        h.insert("x-txq-attempt".into(), AMQPValue::LongLongInt(3));
        h.insert("x-txq-failed-at".into(), text("2026-01-02T03:04:05.000Z"));
        if let Some(q) = &d.original_queue {
            h.insert("x-txq-original-queue".into(), text(q));
        }
        let mut props = BasicProperties::default()
            .with_message_id(d.id.as_str().into())
            .with_type(d.job_type.into())
            .with_correlation_id(format!("c-{}", d.id).as_str().into())
            .with_delivery_mode(2)
            .with_headers(h);
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        let body = serde_json::to_vec(&json!({"id": d.id})).expect("JSON");
        let confirm = client
            .channel
            .basic_publish(
                "".into(),
                dlq.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack());
    }
}

/// The message_ids `dlq list --json` shows, in queue order.
async fn listed_ids(queue: &str) -> Vec<String> {
    let run = txq(queue, &["dlq", "list", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let ids: Vec<String> = run
        .json_lines()
        .iter()
        .map(|v| v["message_id"].as_str().expect("message_id").to_owned())
        .collect();
    // The `--json` convention: a summary last, counting what was listed.
    let last = all_json(&run).pop().expect("a last line");
    assert_eq!(last["summary"]["matched"], ids.len(), "{run:?}");
    assert_eq!(last["summary"]["queue"], format!("{queue}.dlq"), "{run:?}");
    ids
}

fn ids_of(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .map(|r| {
            r.props
                .message_id()
                .as_ref()
                .expect("message_id kept")
                .to_string()
        })
        .collect()
}

/// Ten dead letters of two types and two kinds, back from `original`.
fn sample(original: &str) -> Vec<Dead> {
    (0..10)
        .map(|i| Dead {
            id: format!("d-{i}"),
            job_type: if i % 2 == 0 { "even" } else { "odd" },
            kind: if i < 5 { "database_error" } else { "timeout" },
            error: if i == 7 {
                "needle in the haystack".into()
            } else {
                format!("Table 'db_{i}.t' doesn't exist (row {i})")
            },
            original_queue: Some(original.to_owned()),
        })
        .collect()
}

#[tokio::test]
async fn replay_filters_take_only_what_they_name_and_dry_run_changes_nothing() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = client.queue(&format!("{queue}.dlq")).await;
    publish_dead(&client, &dlq, &sample(&queue)).await;
    let all: Vec<String> = (0..10).map(|i| format!("d-{i}")).collect();
    assert_eq!(
        listed_ids(&queue).await,
        all,
        "list keeps every message in its place"
    );
    assert_eq!(listed_ids(&queue).await, all, "and again");

    let dry = txq(
        &queue,
        &["dlq", "replay", "--type", "even", "--dry-run", "--json"],
    )
    .await;
    assert_eq!(dry.code, Some(0), "{dry:?}");
    let would: Vec<String> = dry
        .json_lines()
        .iter()
        .filter(|v| v["action"] == "would_replay")
        .map(|v| v["message_id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(would, ["d-0", "d-2", "d-4", "d-6", "d-8"]);
    // The summary says what a dry run did: nothing, and what it would do.
    let summary = dry.summary();
    assert_eq!(summary["dry_run"], true, "{summary}");
    assert_eq!(summary["would_replay"], 5, "{summary}");
    assert_eq!(summary["replayed"], 0, "{summary}");
    assert!(
        dry.stderr.contains("nothing replayed: would replay 5"),
        "{dry:?}"
    );
    assert_eq!(client.depth(&queue).await, 0, "dry run published nothing");
    assert_eq!(listed_ids(&queue).await, all, "dry run took nothing");

    // Each filter alone, then the rest stays in order.
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--type", "odd"], &["d-1", "d-3", "d-5", "d-7", "d-9"]),
        (&["--limit", "1"], &["d-0"]),
        (&["--error-kind", "database_error"], &["d-2", "d-4"]),
        (&["--grep", "needle"], &[]),
        (&["--id", "d-6", "d-8"], &["d-6", "d-8"]),
    ];
    let mut left = all.clone();
    for (args, expected) in cases {
        let mut argv = vec!["dlq", "replay"];
        argv.extend_from_slice(args);
        let run = txq(&queue, &argv).await;
        if expected.is_empty() {
            // --grep needle only matches d-7, already replayed by --type odd.
            assert_eq!(run.code, Some(4), "nothing matched: {run:?}");
            continue;
        }
        assert_eq!(run.code, Some(0), "{args:?}: {run:?}");
        let got = client.replies(&queue, expected.len()).await;
        assert_eq!(ids_of(&got), expected, "{args:?} replayed in DLQ order");
        assert_eq!(client.depth(&queue).await, 0, "{args:?} replayed no more");
        left.retain(|id| !expected.contains(&id.as_str()));
        assert_eq!(
            listed_ids(&queue).await,
            left,
            "{args:?}: the rest kept their place"
        );
    }
    assert!(left.is_empty(), "{left:?}");

    // The grep case, on a fresh copy: the error, the body and the id are searched.
    publish_dead(&client, &dlq, &sample(&queue)).await;
    let run = txq(&queue, &["dlq", "replay", "--grep", "needle", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let got = client.replies(&queue, 1).await;
    assert_eq!(ids_of(&got), ["d-7"]);
    let h = |name: &str| got[0].header(name);
    assert_eq!(h("x-txq-replayed"), Some(AMQPValue::LongLongInt(1)));
    assert!(got[0].header_text("x-txq-replayed-at").is_some());
    for gone in [
        "x-txq-error",
        "x-txq-error-kind",
        "x-txq-attempt",
        "x-txq-attempts",
        "x-txq-failed-at",
        "x-txq-original-queue",
    ] {
        assert_eq!(h(gone), None, "{gone} dropped");
    }
    assert_eq!(got[0].correlation_id(), Some("c-d-7"));
    assert_eq!(got[0].body, json!({"id": "d-7"}));
    assert_eq!(*got[0].props.delivery_mode(), Some(2));
    let left: Vec<String> = all.iter().filter(|i| *i != "d-7").cloned().collect();
    assert_eq!(listed_ids(&queue).await, left);
}

/// Balances of every account.
async fn balances(db: &Db) -> HashMap<i64, i64> {
    let mut tx = db.begin(None).await.expect("tx");
    let rows: Vec<(i64, i64)> = with_conn!(tx, c => {
        txq::sqlx::query_as("SELECT id, balance FROM accounts").fetch_all(c).await.expect("balances")
    });
    tx.commit().await.expect("commit");
    rows.into_iter().collect()
}

/// The balances `requests` lead to when each is applied once.
fn expected_balances(accounts: i64, requests: &[Request]) -> HashMap<i64, i64> {
    let mut b: HashMap<i64, i64> = (1..=accounts).map(|i| (i, bank::INITIAL_BALANCE)).collect();
    for r in requests {
        let v: Value = serde_json::from_slice(&r.body).expect("JSON");
        let (from, to, amount) = (
            v["from"].as_i64().expect("from"),
            v["to"].as_i64().expect("to"),
            v["amount"].as_i64().expect("amount"),
        );
        *b.entry(from).or_default() -= amount;
        *b.entry(to).or_default() += amount;
    }
    b
}

/// `jobs` transfers fail because their table is missing and land in the DLQ,
/// with a `failed` reply each; the worker keeps running.
async fn fail_for_a_missing_table(
    backend: Backend,
    jobs: usize,
) -> (TestDb, Client, String, String, Vec<Request>, RunningWorker) {
    const ACCOUNTS: i64 = 100;
    let (test_db, client, requests, replies) = bank_env(backend, ACCOUNTS).await;
    exec(
        &test_db.db,
        "ALTER TABLE transfers RENAME TO transfers_parked",
    )
    .await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 8))
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    let batch = transfers(jobs, ACCOUNTS, &replies);
    client.publish_all(&requests, &batch).await;
    let failed = client.replies(&replies, jobs).await;
    for r in &failed {
        assert_eq!(r.status(), "failed", "{:?}", r.body);
        assert_eq!(r.body["error"]["kind"], "database_error", "{:?}", r.body);
    }
    // Each dead-letter copy was confirmed before its reply was sent.
    assert_eq!(client.depth(&format!("{requests}.dlq")).await, jobs as u32);
    (test_db, client, requests, replies, batch, worker)
}

/// Every request applied exactly once, each answered `ok`, nothing left behind.
async fn assert_applied_once(
    test_db: &TestDb,
    client: &Client,
    requests: &str,
    batch: &[Request],
    collector: &mut Collector,
) {
    let ids: HashSet<String> = (0..batch.len()).map(|i| format!("c-{i}")).collect();
    collector.wait_for_ids(&ids).await;
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.transfers, batch.len() as i64, "one row per transfer");
    assert_eq!(totals.distinct_transfer_ids, batch.len() as i64);
    assert_eq!(totals.balance_sum, 100 * bank::INITIAL_BALANCE);
    assert_eq!(balances(&test_db.db).await, expected_balances(100, batch));
    for r in collector.snapshot() {
        assert_eq!(r.status(), "ok", "{:?}", r.body);
    }
    assert_eq!(
        client.depth(&format!("{requests}.dlq")).await,
        0,
        "DLQ empty"
    );
}

#[tokio::test]
async fn a_thousand_jobs_failed_for_a_missing_table_are_applied_once_after_replay() {
    let (test_db, client, requests, replies, batch, worker) =
        fail_for_a_missing_table(Backend::MySql, 1000).await;
    let mut collector = Collector::start(&client, &replies).await;

    let group = txq(&requests, &["dlq", "list", "--group", "--json"]).await;
    assert_eq!(group.code, Some(0), "{group:?}");
    let groups = group.json_lines();
    assert_eq!(groups.len(), 1, "one cause: {groups:?}");
    assert_eq!(group.summary()["groups"], 1, "{group:?}");
    assert_eq!(group.summary()["matched"], 1000, "{group:?}");
    assert_eq!(groups[0]["count"], 1000);
    assert_eq!(groups[0]["type"], "transfer");
    assert_eq!(groups[0]["error_kind"], "database_error");

    // Fix the cause, then replay.
    exec(
        &test_db.db,
        "ALTER TABLE transfers_parked RENAME TO transfers",
    )
    .await;
    let run = txq(&requests, &["dlq", "replay", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.summary()["replayed"], 1000);
    assert_applied_once(&test_db, &client, &requests, &batch, &mut collector).await;
    assert_eq!(collector.snapshot().len(), 1000, "no second reply");
    worker.stop().await.expect("clean stop");
}

/// Waits until the broker has taken back what a dead tool held unacked (its
/// connection close is handled asynchronously).
async fn wait_until_nothing_unacked(queue: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages_unacknowledged",
            ])
            .output()
            .await
            .expect("rabbitmqctl");
        let text = String::from_utf8_lossy(&out.stdout);
        let unacked = text
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .map(|(_, n)| n.trim().parse::<u64>().expect("a count"));
        if unacked == Some(0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue}: still unacked: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

enum Interruption {
    Kill,
    Cut,
}

async fn an_interrupted_replay_loses_nothing(backend: Backend, how: Interruption) {
    const JOBS: usize = 200;
    let (test_db, client, requests, replies, batch, worker) =
        fail_for_a_missing_table(backend, JOBS).await;
    let dlq = format!("{requests}.dlq");
    let mut collector = Collector::start(&client, &replies).await;
    exec(
        &test_db.db,
        "ALTER TABLE transfers_parked RENAME TO transfers",
    )
    .await;

    let proxy = Proxy::start().await;
    let url = match how {
        Interruption::Kill => amqp_url(),
        Interruption::Cut => proxy.url(),
    };
    let mut child = txq_command(&url, &requests, &["dlq", "replay", "--rate", "100/s"])
        .spawn()
        .expect("spawning txq");
    // Mid-replay: some replied to, most not yet.
    collector.wait_for(40).await;
    match how {
        Interruption::Kill => child.start_kill().expect("kill -9"),
        Interruption::Cut => proxy.cut(),
    }
    let out = child.wait_with_output().await.expect("txq ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match how {
        Interruption::Kill => assert_eq!(out.status.code(), None, "killed by a signal"),
        Interruption::Cut => {
            assert_eq!(out.status.code(), Some(3), "{stderr}");
            assert!(stderr.contains("lost the connection"), "{stderr}");
        }
    }
    let before = collector.snapshot().len();
    assert!(
        before < JOBS,
        "the interruption came mid-replay ({before} replies)"
    );

    wait_until_nothing_unacked(&dlq).await;
    let run = txq(&requests, &["dlq", "replay", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_applied_once(&test_db, &client, &requests, &batch, &mut collector).await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_kill_9_of_the_tool_mid_replay_loses_nothing() {
    an_interrupted_replay_loses_nothing(Backend::Postgres, Interruption::Kill).await;
}

#[tokio::test]
async fn a_broker_connection_cut_mid_replay_loses_nothing() {
    an_interrupted_replay_loses_nothing(Backend::MySql, Interruption::Cut).await;
}

async fn wait_for_depth(client: &Client, queue: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client.depth(queue).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} never reached {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn messages_rabbitmq_dead_lettered_after_a_ttl_are_replayed_and_applied_once() {
    let (test_db, mut client, requests, replies) = bank_env(Backend::Sqlite, 10).await;
    let dlq = client.queue(&format!("{requests}.dlq")).await;
    // A staging queue whose messages expire into the DLQ (RabbitMQ dead-letters
    // them with x-death), as when nobody consumed them in time.
    let staging = unique("staging");
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongUInt(20));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.as_str().into()),
    );
    client.declare(&staging, args).await;
    client.own(&staging);
    let jobs: Vec<Request> = (0..20)
        .map(|i| {
            Request::json("noop", json!({}))
                .id(&format!("r-{i}-{}", unique("x")))
                .correlation(&format!("c-{i}"))
                .reply_to(&replies)
        })
        .collect();
    client.publish_all(&staging, &jobs).await;
    wait_for_depth(&client, &dlq, 20).await;

    let list = txq(&requests, &["dlq", "list", "--json"]).await;
    assert_eq!(list.code, Some(0), "{list:?}");
    let lines = list.json_lines();
    assert_eq!(lines.len(), 20);
    for l in &lines {
        assert_eq!(l["origin"], "rabbitmq", "{l}");
        assert_eq!(l["error_kind"], "rabbitmq:expired", "{l}");
        assert_eq!(l["original_queue"], staging.as_str(), "{l}");
        assert!(l["failed_at"].is_string(), "{l}");
    }
    let dry = txq(&requests, &["dlq", "replay", "--dry-run"]).await;
    assert_eq!(dry.code, Some(0), "{dry:?}");
    assert!(dry.stdout.contains(&format!("-> {staging}")), "{dry:?}");

    // Two to an inspection queue: the copy has no trace of its death.
    let inspect = client.queue(&unique("inspect")).await;
    let run = txq(
        &requests,
        &["dlq", "replay", "--limit", "2", "--to", &inspect],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    for r in client.replies(&inspect, 2).await {
        for gone in [
            "x-death",
            "x-first-death-queue",
            "x-first-death-reason",
            "x-first-death-exchange",
        ] {
            assert_eq!(r.header(gone), None, "{gone} dropped");
        }
        assert_eq!(r.header("x-txq-replayed"), Some(AMQPValue::LongLongInt(1)));
        assert_eq!(r.props.expiration(), &None);
        // Back into the DLQ-to-be-replayed, as if they had never left.
        client
            .channel
            .basic_publish(
                "".into(),
                dlq.as_str().into(),
                BasicPublishOptions::default(),
                &r.data,
                r.props.clone(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    // The rest (and those two, replayed once before) to the worker's queue.
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 4))
            .handler("noop", bank::Noop)
            .database(test_db.db.clone()),
    )
    .await;
    let mut collector = Collector::start(&client, &replies).await;
    let run = txq(&requests, &["dlq", "replay", "--to", &requests, "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.summary()["replayed"], 20);
    let ids: HashSet<String> = (0..20).map(|i| format!("c-{i}")).collect();
    collector.wait_for_ids(&ids).await;
    worker.stop().await.expect("clean stop");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.jobs_logged, 20, "each applied once");
    for r in collector.stop() {
        assert_eq!(r.status(), "ok", "{:?}", r.body);
    }
    assert_eq!(client.depth(&dlq).await, 0);
}

#[tokio::test]
async fn messages_over_a_quorum_delivery_limit_are_understood_and_replayed() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    // Quorum, as a worker with `queue_type = "quorum"` declares it.
    let dlq = format!("{queue}.dlq");
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    client.declare(&dlq, quorum).await;
    let source = unique("limited");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.as_str().into()),
    );
    client.declare(&source, args).await;
    client.own(&source);
    client
        .publish(&source, &Request::json("noop", json!({})).id("q-1"))
        .await;
    // Rejected (requeued) until RabbitMQ gives up on it.
    let ch = client.conn.create_channel().await.expect("channel");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client.depth(&dlq).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered"
        );
        let got = ch
            .basic_get(
                source.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .expect("basic.get");
        match got {
            Some(m) => {
                m.delivery
                    .nack(lapin::options::BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .expect("nack");
            }
            // Requeueing and dead-lettering happen in the background.
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }

    // What RabbitMQ put on it: x-death (reason delivery_limit, count 1). Its
    // attempts are that count, not the x-delivery-count the quorum DLQ sets.
    for _ in 0..3 {
        let show = txq(&queue, &["dlq", "show", "q-1", "--json"]).await;
        assert_eq!(show.code, Some(0), "{show:?}");
        let v = &show.json_lines()[0];
        assert_eq!(v["summary"]["origin"], "rabbitmq", "{v}");
        assert_eq!(v["summary"]["error_kind"], "rabbitmq:delivery_limit", "{v}");
        assert_eq!(v["summary"]["original_queue"], source.as_str(), "{v}");
        assert_eq!(v["summary"]["attempts"], 1, "{v}");
        assert!(v["summary"]["failed_at"].is_string(), "{v}");
        let error = v["summary"]["error"].as_str().unwrap_or("");
        assert!(error.contains("delivery_limit, 1 time(s)"), "{v}");
        assert_eq!(
            v["headers"]["x-death"][0]["reason"], "delivery_limit",
            "{v}"
        );
        let count = &v["headers"]["x-delivery-count"];
        assert!(count.is_null() || count == 0, "{v}");
    }

    let target = client.queue(&unique("target")).await;
    let run = txq(&queue, &["dlq", "replay", "--to", &target]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let got = client.replies(&target, 1).await;
    assert_eq!(ids_of(&got), ["q-1"]);
    for gone in ["x-death", "x-delivery-count", "x-first-death-reason"] {
        assert_eq!(got[0].header(gone), None, "{gone}");
    }
    assert_eq!(client.depth(&dlq).await, 0);
}

#[tokio::test]
async fn messages_rabbitmq_dead_lettered_as_rejected_or_over_max_length_are_understood() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = client.queue(&format!("{queue}.dlq")).await;
    let dead_letter_to = |args: &mut FieldTable| {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(dlq.as_str().into()),
        );
    };
    // Holds one message: a second pushes the first out (maxlen).
    let short = unique("short");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    dead_letter_to(&mut args);
    client.declare(&short, args).await;
    client.own(&short);
    // Its consumer rejects without requeue (rejected).
    let picky = unique("picky");
    let mut args = FieldTable::default();
    dead_letter_to(&mut args);
    client.declare(&picky, args).await;
    client.own(&picky);

    client
        .publish(&short, &Request::json("noop", json!({})).id("pushed-out"))
        .await;
    client
        .publish(&short, &Request::json("noop", json!({})).id("kept"))
        .await;
    client
        .publish(&picky, &Request::json("noop", json!({})).id("refused"))
        .await;
    let ch = client.conn.create_channel().await.expect("channel");
    let got = ch
        .basic_get(
            picky.as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .expect("basic.get")
        .expect("a message");
    got.delivery
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    wait_for_depth(&client, &dlq, 2).await;

    let lines = listed(&queue, &[]).await;
    let seen: Vec<(String, String, String, i64)> = lines
        .iter()
        .map(|v| {
            (
                v["message_id"].as_str().unwrap_or("").to_owned(),
                v["error_kind"].as_str().unwrap_or("").to_owned(),
                v["original_queue"].as_str().unwrap_or("").to_owned(),
                v["attempts"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "pushed-out".into(),
                "rabbitmq:maxlen".into(),
                short.clone(),
                1
            ),
            (
                "refused".into(),
                "rabbitmq:rejected".into(),
                picky.clone(),
                1
            ),
        ]
    );
    let run = txq(
        &queue,
        &["dlq", "replay", "--error-kind", "rabbitmq:rejected"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(client.depth(&picky).await, 1, "back where it was rejected");
}

#[tokio::test]
async fn list_show_group_and_purge_print_what_they_did_and_exit_meaningfully() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;

    let down = txq_at(
        "amqp://guest:hunter2@127.0.0.1:1/%2f",
        &queue,
        &["dlq", "list"],
    )
    .output()
    .await;
    let stderr = &down.stderr;
    assert_eq!(down.code, Some(3), "{stderr}");
    assert!(stderr.contains("guest:***@127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let missing = txq(&queue, &["dlq", "list"]).await;
    assert_eq!(missing.code, Some(2), "{missing:?}");
    assert!(missing.stderr.contains("does not exist"), "{missing:?}");

    let dlq = client.queue(&format!("{queue}.dlq")).await;
    let mut dead = sample(&queue);
    dead.push(Dead {
        id: "orphan".into(),
        job_type: "odd",
        kind: "handler_error",
        error: "no origin".into(),
        original_queue: None,
    });
    publish_dead(&client, &dlq, &dead).await;

    let list = txq(&queue, &["dlq", "list"]).await;
    assert_eq!(list.code, Some(0), "{list:?}");
    let rows: Vec<&str> = list.stdout.lines().collect();
    assert!(rows[0].starts_with("MESSAGE_ID"), "{list:?}");
    assert_eq!(rows.len(), 12, "a header and a row each: {list:?}");
    assert!(
        rows[1].starts_with("d-0 ")
            && rows[1].contains("database_error")
            && rows[1].contains("Table 'db_0.t'"),
        "{}",
        rows[1]
    );
    assert!(list.stderr.contains("11 of 11"), "{list:?}");

    let group = txq(&queue, &["dlq", "list", "--group", "--json"]).await;
    assert_eq!(group.code, Some(0), "{group:?}");
    let counts: Vec<(u64, String, String, String)> = group
        .json_lines()
        .iter()
        .map(|g| {
            (
                g["count"].as_u64().expect("count"),
                g["type"].as_str().unwrap_or("").to_owned(),
                g["error_kind"].as_str().unwrap_or("").to_owned(),
                g["fingerprint"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let t = "Table '?' doesn't exist (row ?)".to_owned();
    assert_eq!(
        counts,
        [
            (3, "even".into(), "database_error".into(), t.clone()),
            (2, "odd".into(), "database_error".into(), t.clone()),
            (2, "even".into(), "timeout".into(), t.clone()),
            (2, "odd".into(), "timeout".into(), t.clone()),
            (1, "odd".into(), "handler_error".into(), "no origin".into()),
            (
                1,
                "odd".into(),
                "timeout".into(),
                "needle in the haystack".into()
            ),
        ]
    );
    let text = txq(&queue, &["dlq", "list", "--group"]).await;
    assert!(text.stdout.starts_with("  COUNT"), "{text:?}");

    let show = txq(&queue, &["dlq", "show", "d-3"]).await;
    assert_eq!(show.code, Some(0), "{show:?}");
    for needle in [
        "message_id:     d-3",
        "x-txq-error-kind: \"database_error\"",
        "x-txq-attempts: 3",
        "{\"id\":\"d-3\"}",
        "correlation_id: \"c-d-3\"",
    ] {
        assert!(show.stdout.contains(needle), "{needle} in {show:?}");
    }
    let none = txq(&queue, &["dlq", "show", "nope"]).await;
    assert_eq!(none.code, Some(4), "{none:?}");

    // Replay: one has no original queue; --to the DLQ itself is refused.
    let orphan = txq(&queue, &["dlq", "replay", "--id", "orphan", "--json"]).await;
    assert_eq!(orphan.code, Some(1), "{orphan:?}");
    assert_eq!(orphan.json_lines()[0]["action"], "skipped");
    let to_self = txq(&queue, &["dlq", "replay", "--to", &dlq]).await;
    assert_eq!(to_self.code, Some(2), "{to_self:?}");
    let gone = unique("no-such-queue");
    let unroutable = txq(&queue, &["dlq", "replay", "--id", "d-1", "--to", &gone]).await;
    assert_eq!(unroutable.code, Some(1), "{unroutable:?}");
    assert!(
        unroutable.stdout.contains("does not exist"),
        "{unroutable:?}"
    );
    let bad_rate = txq(&queue, &["dlq", "replay", "--rate", "fast"]).await;
    assert_eq!(bad_rate.code, Some(2), "{bad_rate:?}");
    assert_eq!(client.depth(&dlq).await, 11, "nothing left the DLQ");

    // Purge: never without a confirmation; exactly what the filter names.
    let refused = txq(&queue, &["dlq", "purge", "--type", "even"]).await;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(refused.stderr.contains("--yes"), "{refused:?}");
    assert_eq!(client.depth(&dlq).await, 11);
    let purge = txq(
        &queue,
        &["dlq", "purge", "--type", "even", "--yes", "--json"],
    )
    .await;
    assert_eq!(purge.code, Some(0), "{purge:?}");
    assert_eq!(purge.summary()["purged"], 5);
    assert_eq!(
        listed_ids(&queue).await,
        ["d-1", "d-3", "d-5", "d-7", "d-9", "orphan"]
    );
    let nothing = txq(&queue, &["dlq", "purge", "--type", "even", "--yes"]).await;
    assert_eq!(nothing.code, Some(4), "{nothing:?}");
    let rest = txq(&queue, &["dlq", "purge", "--yes"]).await;
    assert_eq!(rest.code, Some(0), "{rest:?}");
    assert_eq!(client.depth(&dlq).await, 0);
    // An empty queue lists no rows, only the summary.
    let empty = txq(&queue, &["dlq", "list", "--json"]).await;
    assert_eq!(empty.code, Some(0), "{empty:?}");
    assert_eq!(all_json(&empty).len(), 1, "{empty:?}");
    assert_eq!(empty.summary()["matched"], 0, "{empty:?}");
}

#[tokio::test]
async fn a_quorum_dead_letter_queue_keeps_its_order_through_list_and_replay() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = format!("{queue}.dlq");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    client.declare(&dlq, args).await;
    publish_dead(&client, &dlq, &sample(&queue)).await;
    let all: Vec<String> = (0..10).map(|i| format!("d-{i}")).collect();
    assert_eq!(listed_ids(&queue).await, all);
    assert_eq!(listed_ids(&queue).await, all);
    let run = txq(&queue, &["dlq", "replay", "--type", "odd"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        ids_of(&client.replies(&queue, 5).await),
        ["d-1", "d-3", "d-5", "d-7", "d-9"]
    );
    assert_eq!(
        listed_ids(&queue).await,
        ["d-0", "d-2", "d-4", "d-6", "d-8"]
    );
    // Four passes (list, list, replay, list), and none counted a delivery: a
    // quorum queue counts every requeue in x-delivery-count (which a delivery
    // limit acts on), so the tools never requeue there; each message kept went
    // back to the tail as a copy, which the broker has delivered once (the
    // header says 0, or is absent).
    for _ in 0..2 {
        let show = txq(&queue, &["dlq", "show", "d-0", "--json"]).await;
        assert_eq!(show.code, Some(0), "{show:?}");
        let count = &show.json_lines()[0]["headers"]["x-delivery-count"];
        assert!(count.is_null() || count == 0, "{show:?}");
    }
}

/// `txq dlq purge` on a terminal (util-linux `script` gives it one), answering
/// `answer` at the prompt.
async fn purge_on_a_terminal(queue: &str, answer: &str) -> (Option<i32>, String) {
    use tokio::io::AsyncWriteExt as _;
    let command = format!("{} dlq purge --type even", env!("CARGO_BIN_EXE_txq"));
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("TXQ_AMQP_URL", amqp_url())
        .env("TXQ_QUEUE", queue)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("util-linux script");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(answer.as_bytes()).await.expect("answer");
    // stdin stays open until the end: script ends the session at its EOF.
    let out = child.wait_with_output().await.expect("script ends");
    drop(stdin);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn purge_asks_on_a_terminal_and_a_no_keeps_everything() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = client.queue(&format!("{queue}.dlq")).await;
    publish_dead(&client, &dlq, &sample(&queue)).await;

    let (code, out) = purge_on_a_terminal(&queue, "n\n").await;
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("purge 5 message(s)"), "{out}");
    assert!(out.contains("aborted, nothing purged"), "{out}");
    assert!(!out.contains("purged 0"), "{out}");
    assert_eq!(listed_ids(&queue).await.len(), 10, "declined: all kept");

    let (code, out) = purge_on_a_terminal(&queue, "y\n").await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        listed_ids(&queue).await,
        ["d-1", "d-3", "d-5", "d-7", "d-9"]
    );
}

/// A dead letter whose x-death entry and one more header carry `time` as their
/// AMQP timestamp.
async fn publish_with_timestamp(client: &Client, dlq: &str, id: &str, time: u64) {
    let mut death = FieldTable::default();
    death.insert("queue".into(), AMQPValue::LongString("q".into()));
    death.insert("reason".into(), AMQPValue::LongString("expired".into()));
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert("time".into(), AMQPValue::Timestamp(time));
    let mut deaths = lapin::types::FieldArray::default();
    deaths.push(AMQPValue::FieldTable(death));
    let mut h = FieldTable::default();
    h.insert("x-death".into(), AMQPValue::FieldArray(deaths));
    h.insert("x-sent".into(), AMQPValue::Timestamp(time));
    let props = BasicProperties::default()
        .with_message_id(id.into())
        .with_headers(h);
    let confirm = client
        .channel
        .basic_publish(
            "".into(),
            dlq.into(),
            BasicPublishOptions::default(),
            b"{}",
            props,
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack());
}

#[tokio::test]
async fn timestamps_no_calendar_can_show_do_not_stop_list_show_or_purge() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = client.queue(&format!("{queue}.dlq")).await;
    // Year 10000 (humantime cannot print it), and past what SystemTime holds.
    publish_with_timestamp(&client, &dlq, "y10k", 253_402_300_800).await;
    publish_with_timestamp(&client, &dlq, "max", u64::MAX).await;

    let list = txq(&queue, &["dlq", "list", "--json"]).await;
    assert_eq!(list.code, Some(0), "{list:?}");
    let lines = list.json_lines();
    assert_eq!(lines.len(), 2, "{list:?}");
    for v in &lines {
        assert_eq!(v["error_kind"], "rabbitmq:expired", "{v}");
        assert_eq!(v["failed_at"], Value::Null, "{v}");
    }
    let table = txq(&queue, &["dlq", "list"]).await;
    assert_eq!(table.code, Some(0), "{table:?}");

    let show = txq(&queue, &["dlq", "show", "max", "--json"]).await;
    assert_eq!(show.code, Some(0), "{show:?}");
    let v = &show.json_lines()[0];
    assert_eq!(v["headers"]["x-sent"], json!(u64::MAX), "raw number: {v}");
    assert_eq!(v["headers"]["x-death"][0]["time"], json!(u64::MAX), "{v}");
    let text = txq(&queue, &["dlq", "show", "y10k"]).await;
    assert_eq!(text.code, Some(0), "{text:?}");
    assert!(text.stdout.contains("253402300800"), "{text:?}");

    let purge = txq(&queue, &["dlq", "purge", "--yes"]).await;
    assert_eq!(purge.code, Some(0), "{purge:?}");
    assert_eq!(client.depth(&dlq).await, 0);
}

#[tokio::test]
async fn an_original_queue_no_amqp_name_can_carry_is_skipped_and_the_rest_replayed() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = client.queue(&format!("{queue}.dlq")).await;
    let mut dead = sample(&queue);
    dead.truncate(3);
    dead[1].original_queue = Some("q".repeat(256));
    publish_dead(&client, &dlq, &dead).await;

    // Twice: a re-run must not stop at the same message either.
    for _ in 0..2 {
        let run = txq(&queue, &["dlq", "replay", "--json"]).await;
        assert_eq!(run.code, Some(1), "some skipped: {run:?}");
        let lines = run.json_lines();
        let skipped: Vec<&Value> = lines.iter().filter(|v| v["action"] == "skipped").collect();
        assert_eq!(skipped.len(), 1, "{run:?}");
        assert_eq!(skipped[0]["message_id"], "d-1", "{run:?}");
        assert!(
            skipped[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("255 bytes")),
            "{run:?}"
        );
        assert_eq!(run.summary()["skipped"], 1, "{run:?}");
    }
    assert_eq!(ids_of(&client.replies(&queue, 2).await), ["d-0", "d-2"]);
    assert_eq!(listed_ids(&queue).await, ["d-1"], "kept in the DLQ");
}

#[tokio::test]
async fn list_into_a_pipe_closed_early_ends_cleanly_and_keeps_every_message_in_order() {
    use tokio::io::AsyncBufReadExt as _;
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = client.queue(&format!("{queue}.dlq")).await;
    // Enough that the scan (one basic.get a message) is still going when the
    // reader goes away after the first line, so a later line meets a closed pipe.
    let all: Vec<String> = (0..500).map(|i| format!("p-{i:03}")).collect();
    let dead: Vec<Dead> = all
        .iter()
        .map(|id| Dead {
            id: id.clone(),
            job_type: "t",
            kind: "timeout",
            error: "slow".into(),
            original_queue: Some(queue.clone()),
        })
        .collect();
    publish_dead(&client, &dlq, &dead).await;

    let mut child = txq_command(&amqp_url(), &queue, &["dlq", "list"])
        .spawn()
        .expect("txq");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first = lines.next_line().await.expect("read").expect("a line");
    assert!(first.starts_with("MESSAGE_ID"), "{first}");
    // As `| head -1` does.
    drop(lines);
    let out = child.wait_with_output().await.expect("txq ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "panicked: {stderr}");
    // Quietly, with success, as ripgrep and cargo end on a closed pipe.
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("writing the output"), "{stderr}");
    assert_eq!(listed_ids(&queue).await, all, "all back, in order");
}

/// A policy on one queue, cleared on drop.
struct Policy(String);

impl Policy {
    async fn on(queue: &str, definition: &str) -> Policy {
        let name = unique("policy");
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        rabbitmqctl(&[
            "set_policy",
            &name,
            &pattern,
            definition,
            "--apply-to",
            "queues",
            "--priority",
            "10",
        ])
        .await;
        Policy(name)
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.0])
            .output();
    }
}

/// A quorum dead-letter queue for `queue`. Returns its name.
async fn quorum_dlq(client: &mut Client, queue: &str) -> String {
    let dlq = format!("{queue}.dlq");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    client.declare(&dlq, args).await;
    client.own(&dlq);
    dlq
}

/// A policy that drops a message of `dlq` once it was delivered more than
/// `limit` times. Set once the queue took messages: RabbitMQ 3.10 can miss a
/// policy set while a new quorum queue is still electing its leader.
async fn delivery_limit(dlq: &str, limit: u32) -> Policy {
    Policy::on(dlq, &format!(r#"{{"delivery-limit":{limit}}}"#)).await
}

/// `dlq list --json`'s lines, checking it went well.
async fn listed(queue: &str, args: &[&str]) -> Vec<Value> {
    let mut argv = vec!["dlq", "list", "--json"];
    argv.extend_from_slice(args);
    let run = txq(queue, &argv).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    run.json_lines()
}

#[tokio::test]
async fn reading_a_quorum_dlq_with_a_delivery_limit_again_and_again_loses_nothing() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = quorum_dlq(&mut client, &queue).await;
    let mut dead = sample(&queue);
    dead.truncate(3);
    dead[2].original_queue = None;
    publish_dead(&client, &dlq, &dead).await;
    let _policy = delivery_limit(&dlq, 2).await;
    let all = ["d-0", "d-1", "d-2"];

    // Each pass used to hand every message back with basic.nack(requeue), which
    // a quorum queue counts: after the third, the policy dropped all three.
    for pass in 0..6 {
        let lines = listed(&queue, &[]).await;
        let ids: Vec<&str> = lines
            .iter()
            .map(|v| v["message_id"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(ids, all, "pass {pass}: every message, in order");
        for v in &lines {
            // txq's own count, never the reads of the tool.
            assert_eq!(v["attempts"], 3, "pass {pass}: {v}");
        }
    }
    for _ in 0..3 {
        let dry = txq(&queue, &["dlq", "replay", "--dry-run", "--json"]).await;
        assert_eq!(dry.code, Some(1), "d-2 has no original queue: {dry:?}");
        assert_eq!(dry.summary()["would_replay"], 2, "{dry:?}");
        assert_eq!(dry.summary()["replayed"], 0, "a dry run: {dry:?}");
        let skip = txq(&queue, &["dlq", "replay", "--id", "d-2", "--json"]).await;
        assert_eq!(skip.code, Some(1), "{skip:?}");
        let show = txq(&queue, &["dlq", "show", "d-1", "--json"]).await;
        assert_eq!(show.code, Some(0), "{show:?}");
        let count = &show.json_lines()[0]["headers"]["x-delivery-count"];
        assert!(count.is_null() || count == 0, "nothing counted: {show:?}");
    }
    assert_eq!(client.depth(&dlq).await, 3);
    assert_eq!(client.depth(&queue).await, 0, "dry runs published nothing");

    // What the tools remove they remove; the rest keeps its order.
    let run = txq(&queue, &["dlq", "replay", "--id", "d-1"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(ids_of(&client.replies(&queue, 1).await), ["d-1"]);
    let purge = txq(&queue, &["dlq", "purge", "--id", "d-2", "--yes"]).await;
    assert_eq!(purge.code, Some(0), "{purge:?}");
    assert_eq!(listed_ids(&queue).await, ["d-0"]);
}

#[tokio::test]
async fn a_quorum_dlq_this_user_may_not_publish_to_is_not_read_at_all() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = quorum_dlq(&mut client, &queue).await;
    let mut dead = sample(&queue);
    dead.truncate(2);
    publish_dead(&client, &dlq, &dead).await;
    let _policy = delivery_limit(&dlq, 0).await;
    // May read and declare, but not publish: a message taken could only go back
    // with a requeue, which a limit of 0 would drop.
    let user = RabbitUser::create().await;
    rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", "^$", ".*"]).await;
    for _ in 0..3 {
        let out = txq_at(&user.url(), &queue, &["dlq", "list"]).output().await;
        let stderr = &out.stderr;
        assert_eq!(out.code, Some(2), "{stderr}");
        assert!(stderr.contains("is not a classic queue"), "{stderr}");
        assert!(stderr.contains("amq.default"), "{stderr}");
        assert!(stderr.contains("nothing was read"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    assert_eq!(listed_ids(&queue).await, ["d-0", "d-1"], "all still there");
}

/// Where `publish_unreadable` puts bytes that are not UTF-8.
enum Unreadable<'a> {
    /// The message_id.
    MessageId,
    /// A header key; the message_id is this.
    HeaderKey(&'a str),
}

/// Publishes one dead letter (as `publish_dead` does) with `marker` as its
/// message_id or a header key, which reaches the broker as bytes that are not
/// UTF-8, through a rewriting proxy.
async fn publish_unreadable(dlq: &str, original_queue: &str, marker: &str, at: Unreadable<'_>) {
    let proxy = Proxy::start_to(
        &amqp_url(),
        Some((marker.as_bytes().to_vec(), vec![0xFF; marker.len()])),
    )
    .await;
    let conn = lapin::Connection::connect(&proxy.url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect through the proxy");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut h = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(s.into());
    h.insert("x-txq-error-kind".into(), text("timeout"));
    h.insert("x-txq-error".into(), text("never parsed"));
    h.insert("x-txq-attempts".into(), AMQPValue::LongLongInt(3));
    h.insert("x-txq-original-queue".into(), text(original_queue));
    let id = match at {
        Unreadable::MessageId => marker,
        Unreadable::HeaderKey(id) => {
            h.insert(marker.into(), text("x"));
            id
        }
    };
    let props = BasicProperties::default()
        .with_message_id(id.into())
        .with_type("odd".into())
        .with_delivery_mode(2)
        .with_headers(h);
    let confirm = channel
        .basic_publish(
            "".into(),
            dlq.into(),
            BasicPublishOptions::default(),
            br#"{"id":"poison"}"#,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "the broker takes it");
    let _ = conn.close(200, "done".into()).await;
}

/// What `dlq list` shows for the unreadable message_id: each byte replaced.
fn replaced(marker: &str) -> String {
    "\u{FFFD}".repeat(marker.len())
}

#[tokio::test]
async fn a_message_no_amqp_client_can_parse_is_listed_moved_with_replay_to_and_purged() {
    const MARKER: &str = "UNREADABLE-ID-01";
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = client.queue(&format!("{queue}.dlq")).await;
    let mut dead = sample(&queue);
    dead.truncate(3);
    publish_dead(&client, &dlq, &dead[..1]).await;
    publish_unreadable(&dlq, &queue, MARKER, Unreadable::MessageId).await;
    publish_dead(&client, &dlq, &dead[1..]).await;
    let order = [
        "d-0".to_owned(),
        replaced(MARKER),
        "d-1".into(),
        "d-2".into(),
    ];

    // Listed in its place, every time, and said what it is.
    for _ in 0..2 {
        let run = txq(&queue, &["dlq", "list", "--json"]).await;
        assert_eq!(run.code, Some(0), "{run:?}");
        let lines = run.json_lines();
        let ids: Vec<&str> = lines
            .iter()
            .map(|v| v["message_id"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(ids, order, "{run:?}");
        assert_eq!(lines[1]["unreadable"], json!(["message_id"]), "{run:?}");
        assert_eq!(lines[1]["error_kind"], "timeout");
        assert_eq!(lines[0].get("unreadable"), None, "{run:?}");
        assert!(run.stderr.contains("4 of 4 message(s)"), "{run:?}");
        assert!(
            run.stderr
                .contains("1 of them have properties that are not UTF-8"),
            "{run:?}"
        );
    }
    let table = txq(&queue, &["dlq", "list", "--unreadable"]).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    assert_eq!(
        table.stdout.lines().count(),
        2,
        "a header and one row: {table:?}"
    );
    // Shown by its id as listed, with the bytes as sent.
    let show = txq(&queue, &["dlq", "show", &replaced(MARKER), "--json"]).await;
    assert_eq!(show.code, Some(0), "{show:?}");
    let v = &show.json_lines()[0];
    assert_eq!(
        v["unreadable_base64"]["message_id"], "/////////////////////w==",
        "{v}"
    );
    assert_eq!(v["summary"]["attempts"], 3, "{v}");

    // Replay to its original queue: the others go, it stays, said why; twice.
    let run = txq(&queue, &["dlq", "replay", "--json"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    let lines = run.json_lines();
    let skipped: Vec<&Value> = lines.iter().filter(|v| v["action"] == "skipped").collect();
    assert_eq!(skipped.len(), 1, "{run:?}");
    let reason = skipped[0]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("not UTF-8 (message_id)"), "{reason}");
    assert!(reason.contains("--to"), "{reason}");
    assert_eq!(run.summary()["replayed"], 3, "{run:?}");
    assert_eq!(
        ids_of(&client.replies(&queue, 3).await),
        ["d-0", "d-1", "d-2"]
    );
    let again = txq(&queue, &["dlq", "replay"]).await;
    assert_eq!(again.code, Some(1), "{again:?}");
    assert_eq!(client.depth(&dlq).await, 1);

    // --to moves it, byte for byte (as the tools see it in the target queue).
    let inspect = client.queue(&unique("inspect")).await;
    let moved = txq(
        &queue,
        &["dlq", "replay", "--unreadable", "--to", &inspect, "--json"],
    )
    .await;
    assert_eq!(moved.code, Some(0), "{moved:?}");
    assert_eq!(moved.summary()["replayed"], 1, "{moved:?}");
    assert_eq!(client.depth(&dlq).await, 0);
    let there = listed(&queue, &["--dlq", &inspect]).await;
    assert_eq!(there.len(), 1);
    assert_eq!(there[0]["message_id"], replaced(MARKER));
    assert_eq!(there[0]["unreadable"], json!(["message_id"]));
    assert_eq!(there[0]["replayed"], 1, "a replayed copy: {}", there[0]);

    // Purge takes it like any other.
    let purge = txq(
        &queue,
        &[
            "dlq",
            "--dlq",
            &inspect,
            "purge",
            "--unreadable",
            "--yes",
            "--json",
        ],
    )
    .await;
    assert_eq!(purge.code, Some(0), "{purge:?}");
    assert_eq!(purge.summary()["purged"], 1, "{purge:?}");
    assert_eq!(client.depth(&inspect).await, 0);
}

#[tokio::test]
async fn a_message_no_amqp_client_can_parse_never_nears_a_quorum_delivery_limit() {
    const MARKER: &str = "UNREADABLE-ID-02";
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    // One delivery returned would be one too many.
    let dlq = quorum_dlq(&mut client, &queue).await;
    let mut dead = sample(&queue);
    dead.truncate(2);
    publish_dead(&client, &dlq, &dead[..1]).await;
    publish_unreadable(&dlq, &queue, MARKER, Unreadable::MessageId).await;
    publish_dead(&client, &dlq, &dead[1..]).await;
    let _policy = delivery_limit(&dlq, 0).await;
    let order = ["d-0".to_owned(), replaced(MARKER), "d-1".into()];
    for pass in 0..4 {
        let lines = listed(&queue, &[]).await;
        let ids: Vec<&str> = lines
            .iter()
            .map(|v| v["message_id"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(ids, order, "pass {pass}");
    }
    for _ in 0..2 {
        let run = txq(&queue, &["dlq", "replay", "--unreadable", "--json"]).await;
        assert_eq!(run.code, Some(1), "skipped: {run:?}");
    }
    let purge = txq(&queue, &["dlq", "purge", "--unreadable", "--yes"]).await;
    assert_eq!(purge.code, Some(0), "{purge:?}");
    assert_eq!(listed_ids(&queue).await, ["d-0", "d-1"]);
}

#[tokio::test]
async fn a_message_whose_headers_cannot_be_decoded_is_purged_and_replay_says_why_not() {
    const MARKER: &str = "UNREADABLE-KEY-3";
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = client.queue(&format!("{queue}.dlq")).await;
    let mut dead = sample(&queue);
    dead.truncate(2);
    publish_dead(&client, &dlq, &dead[..1]).await;
    publish_unreadable(&dlq, &queue, MARKER, Unreadable::HeaderKey("bad-key")).await;
    publish_dead(&client, &dlq, &dead[1..]).await;

    let lines = listed(&queue, &[]).await;
    let ids: Vec<&str> = lines
        .iter()
        .map(|v| v["message_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids, ["d-0", "bad-key", "d-1"]);
    // Without its headers, nothing says how it failed.
    assert_eq!(lines[1]["unreadable"], json!(["headers"]), "{}", lines[1]);
    assert_eq!(lines[1]["error_kind"], "unknown", "{}", lines[1]);

    // A copy without the failure headers cannot be made: said, and kept.
    let inspect = client.queue(&unique("inspect")).await;
    for _ in 0..2 {
        let run = txq(
            &queue,
            &["dlq", "replay", "--unreadable", "--to", &inspect, "--json"],
        )
        .await;
        assert_eq!(run.code, Some(1), "{run:?}");
        let reason = run.json_lines()[0]["reason"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(
            reason.contains("header table cannot be decoded"),
            "{reason}"
        );
        assert!(reason.contains("purge"), "{reason}");
    }
    assert_eq!(client.depth(&inspect).await, 0);

    let purge = txq(&queue, &["dlq", "purge", "--unreadable", "--yes"]).await;
    assert_eq!(purge.code, Some(0), "{purge:?}");
    assert_eq!(listed_ids(&queue).await, ["d-0", "d-1"]);
}

/// Every line of `run`'s stdout, parsed; panics on one that is not JSON.
fn every_line_json(run: &Run) -> Vec<Value> {
    assert!(!run.stdout.is_empty(), "no output: {run:?}");
    all_json(run)
}

/// Issue 14 §9: one `--json` convention: JSON lines on stdout and nothing else
/// there, the summary last, an error as one `{"error":…}` line on stdout.
#[tokio::test]
async fn every_json_output_is_json_lines_with_the_summary_or_the_error_last() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;

    // An error: no dead-letter queue yet.
    let missing = txq(&queue, &["dlq", "list", "--json"]).await;
    assert_eq!(missing.code, Some(2), "{missing:?}");
    let lines = every_line_json(&missing);
    assert_eq!(lines.len(), 1, "{missing:?}");
    let error = lines[0]["error"].as_str().expect("an error");
    assert!(error.contains("does not exist"), "{missing:?}");

    let dlq = client.queue(&format!("{queue}.dlq")).await;
    publish_dead(&client, &dlq, &sample(&queue)).await;

    let list = txq(&queue, &["dlq", "list", "--json"]).await;
    assert_eq!(list.code, Some(0), "{list:?}");
    let mut lines = every_line_json(&list);
    assert_eq!(lines.len(), 11, "ten rows and the summary: {list:?}");
    let summary = lines.pop().expect("the summary");
    assert_eq!(summary["summary"]["matched"], 10, "{list:?}");
    assert!(
        lines.iter().all(|l| l["message_id"].is_string()),
        "{list:?}"
    );

    let group = txq(&queue, &["dlq", "list", "--group", "--json"]).await;
    assert_eq!(group.code, Some(0), "{group:?}");
    let mut lines = every_line_json(&group);
    let summary = lines.pop().expect("the summary");
    assert_eq!(summary["summary"]["groups"], lines.len(), "{group:?}");
    assert!(lines.iter().all(|l| l["count"].is_u64()), "{group:?}");

    let show = txq(&queue, &["dlq", "show", "d-3", "--json"]).await;
    assert_eq!(show.code, Some(0), "{show:?}");
    let lines = every_line_json(&show);
    assert_eq!(lines.len(), 1, "{show:?}");
    assert_eq!(lines[0]["properties"]["message_id"], "d-3", "{show:?}");

    // Nothing matched (exit 4): an error line, not text.
    let none = txq(&queue, &["dlq", "show", "nope", "--json"]).await;
    assert_eq!(none.code, Some(4), "{none:?}");
    let lines = every_line_json(&none);
    assert_eq!(lines.len(), 1, "{none:?}");
    let error = lines[0]["error"].as_str().expect("an error");
    assert!(error.contains("`nope`") && error.contains(&dlq), "{error}");

    let dry = txq(
        &queue,
        &["dlq", "replay", "--type", "odd", "--dry-run", "--json"],
    )
    .await;
    assert_eq!(dry.code, Some(0), "{dry:?}");
    let lines = every_line_json(&dry);
    assert_eq!(lines.len(), 6, "five messages and the summary: {dry:?}");
    assert!(lines[..5].iter().all(|l| l["action"] == "would_replay"));
    let summary = &lines[5]["summary"];
    assert_eq!(
        (&summary["would_replay"], &summary["replayed"]),
        (&json!(5), &json!(0)),
        "{summary}"
    );

    let replay = txq(&queue, &["dlq", "replay", "--type", "odd", "--json"]).await;
    assert_eq!(replay.code, Some(0), "{replay:?}");
    let lines = every_line_json(&replay);
    assert_eq!(lines.len(), 6, "{replay:?}");
    assert!(lines[..5].iter().all(|l| l["action"] == "replayed"));
    let summary = &lines[5]["summary"];
    assert_eq!(
        (
            &summary["would_replay"],
            &summary["replayed"],
            &summary["dry_run"]
        ),
        (&json!(0), &json!(5), &json!(false)),
        "{summary}"
    );
    assert_eq!(client.depth(&queue).await, 5);

    let nothing = txq(&queue, &["dlq", "replay", "--type", "odd", "--json"]).await;
    assert_eq!(nothing.code, Some(4), "{nothing:?}");
    let lines = every_line_json(&nothing);
    assert_eq!(lines.len(), 1, "{nothing:?}");
    assert_eq!(lines[0]["summary"]["matched"], 0, "{nothing:?}");

    let purge = txq(&queue, &["dlq", "purge", "--yes", "--json"]).await;
    assert_eq!(purge.code, Some(0), "{purge:?}");
    let lines = every_line_json(&purge);
    assert_eq!(lines.len(), 1, "{purge:?}");
    assert_eq!(lines[0]["summary"]["purged"], 5, "{purge:?}");

    // Without --yes and without a terminal: an error line, exit 2.
    let refused = txq(&queue, &["dlq", "purge", "--json"]).await;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    let lines = every_line_json(&refused);
    assert!(
        lines[0]["error"]
            .as_str()
            .expect("an error")
            .contains("--yes")
    );
}

/// Issue 14 §10: a replayed message whose reply_to queue is gone (the
/// exclusive queue of a `txq submit --wait` that ended) is replayed, and the
/// operator is told its reply will be dropped; a live reply queue and direct
/// reply-to (which cannot be checked) get no warning.
#[tokio::test]
async fn replaying_a_message_whose_reply_queue_is_gone_warns_that_its_reply_is_dropped() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let dlq = client.queue(&format!("{queue}.dlq")).await;
    let live = client.queue(&unique("replies")).await;
    let gone = unique("gone-replies");
    let one = |id: &str| {
        vec![Dead {
            id: id.into(),
            job_type: "even",
            kind: "database_error",
            error: "boom".into(),
            original_queue: Some(queue.clone()),
        }]
    };
    publish_dead_replying(&client, &dlq, &one("to-gone"), Some(&gone)).await;
    publish_dead_replying(&client, &dlq, &one("to-live"), Some(&live)).await;
    let direct = format!(
        "{}.g1h2AA5yZXBseUAxAAAAAA==",
        txq::tools::submit::DIRECT_REPLY_TO
    );
    publish_dead_replying(&client, &dlq, &one("to-direct"), Some(&direct)).await;
    publish_dead_replying(&client, &dlq, &one("to-gone-too"), Some(&gone)).await;

    let warned = |lines: &[Value]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.get("warning").is_some())
            .map(|l| {
                let w = l["warning"].as_str().expect("a warning text");
                assert!(w.contains(&gone) && w.contains("dropped"), "{w}");
                l["message_id"].as_str().expect("message_id").to_owned()
            })
            .collect()
    };

    let dry = txq(&queue, &["dlq", "replay", "--dry-run", "--json"]).await;
    assert_eq!(dry.code, Some(0), "{dry:?}");
    let lines = dry.json_lines();
    assert_eq!(warned(&lines), ["to-gone", "to-gone-too"], "{dry:?}");
    assert_eq!(dry.summary()["reply_to_gone"], 2, "{dry:?}");

    let text = txq(&queue, &["dlq", "replay", "--id", "to-gone", "to-live"]).await;
    assert_eq!(text.code, Some(0), "{text:?}");
    let warnings: Vec<&str> = text
        .stderr
        .lines()
        .filter(|l| l.contains("warning"))
        .collect();
    assert_eq!(
        warnings.len(),
        2,
        "one for the message, one in the counts: {text:?}"
    );
    assert!(
        warnings[0].contains("to-gone") && warnings[0].contains("will be dropped"),
        "{text:?}"
    );
    assert!(!text.stderr.contains("to-live"), "{text:?}");

    // Still replayed: the request runs, only its reply has nowhere to go.
    let replay = txq(&queue, &["dlq", "replay", "--json"]).await;
    assert_eq!(replay.code, Some(0), "{replay:?}");
    assert_eq!(warned(&replay.json_lines()), ["to-gone-too"], "{replay:?}");
    assert_eq!(client.depth(&queue).await, 4, "all four replayed");
}
