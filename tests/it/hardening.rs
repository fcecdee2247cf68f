//! No single message stops consumption or loops (ARCHITECTURE.md): properties the
//! broker refuses on a republish, replies over the size limit, frames the AMQP
//! client cannot parse, commits of unknown outcome, one dead-letter copy per
//! failure, shutdown while the broker does not answer, and fail-over between
//! broker URLs.

use std::num::NonZeroU32;
use std::time::Duration;

use lapin::options::{BasicGetOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use txq::broker::{Pipelined, PublishError, PublishOutcome, Publisher};
use txq::config::{QueueType, SecretUrl};
use txq::{Backend, Handler, JobError, JobMeta, Tx, Worker, with_conn};

use crate::support::{
    Alive as _, Blackhole, Client, Collector, Proxy, RabbitUser, Request, RunningWorker, TestDb,
    Txq, amqp_url, config, eventually, exec, publish_raw, unique,
};

/// Inserts a row into `t`, then answers with `{"text": "x" * n}`.
struct Sized;

#[derive(serde::Deserialize)]
struct SizedPayload {
    n: usize,
}

impl Handler for Sized {
    type Payload = SizedPayload;
    type Output = serde_json::Value;

    async fn handle(
        &self,
        tx: &mut Tx,
        p: SizedPayload,
        _: &JobMeta,
    ) -> Result<serde_json::Value, JobError> {
        with_conn!(tx, c => {
            txq::sqlx::query("INSERT INTO t (note) VALUES ('x')").execute(c).await?;
        });
        Ok(json!({ "text": "x".repeat(p.n) }))
    }
}

async fn table_t(db: &TestDb) {
    let sql = match db.db.backend() {
        Backend::Postgres => "CREATE TABLE t (id BIGSERIAL PRIMARY KEY, note TEXT)",
        Backend::MySql => "CREATE TABLE t (id BIGINT AUTO_INCREMENT PRIMARY KEY, note TEXT)",
        Backend::Sqlite => "CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT)",
    };
    exec(&db.db, sql).await;
}

async fn rows_in_t(db: &TestDb) -> i64 {
    let sql = "SELECT COUNT(*) FROM t";
    match &db.db {
        txq::Db::MySql(p) => txq::sqlx::query_scalar(sql).fetch_one(p).await,
        txq::Db::Postgres(p) => txq::sqlx::query_scalar(sql).fetch_one(p).await,
        txq::Db::Sqlite(p) => txq::sqlx::query_scalar(sql).fetch_one(p).await,
    }
    .expect("count")
}

/// Takes every message in `queue` (acking it).
async fn drain(client: &Client, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let channel = client.conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        out.push(m);
    }
    out
}

/// A producer logged in as another user sets `user_id` to itself, as RabbitMQ
/// requires of it. txq's copies of that request (here a dead-letter copy) must not
/// carry it: the broker would refuse them from txq's user, closing the channel, and
/// the request would come back for ever.
#[tokio::test]
async fn a_user_id_of_another_user_is_not_copied_and_never_loops() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    table_t(&test_db).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let mut cfg = config(&test_db.url, &requests, &replies, 1);
    cfg.prefetch = Some(std::num::NonZeroU16::MIN);
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("sized", Sized)
            .database(test_db.db.clone()),
    )
    .await;

    let app = RabbitUser::create().await;
    let producer = Connection::connect(&app.url(), ConnectionProperties::default())
        .await
        .expect("connect as the app user");
    let channel = producer.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let props = BasicProperties::default()
        .with_type("no-such-type".into())
        .with_message_id("with-user-id".into())
        .with_user_id(app.name.as_str().into())
        .with_reply_to(replies.as_str().into());
    publish_raw(&channel, &requests, b"{}", props).await;
    // With prefetch 1, this one is consumed only after the first was settled.
    client
        .publish(
            &requests,
            &Request::json("sized", json!({"n": 1}))
                .id("after")
                .reply_to(&replies),
        )
        .await;

    let got = client.replies(&replies, 2).await;
    let failed: Vec<_> = got.iter().filter(|r| r.status() == "failed").collect();
    assert_eq!(failed.len(), 1, "one failed reply: {got:?}");
    assert_eq!(failed[0].body["error"]["kind"], "unknown_type");
    assert_eq!(got.iter().filter(|r| r.status() == "ok").count(), 1);
    worker.stop().await.expect("clean stop");

    let dead = drain(&client, &format!("{requests}.dlq")).await;
    assert_eq!(dead.len(), 1, "exactly one dead-letter copy");
    let props = &dead[0].delivery.properties;
    assert_eq!(props.user_id(), &None, "the copy asserts no identity");
    let headers = props.headers().clone().expect("headers");
    assert_eq!(
        headers
            .inner()
            .get("x-txq-original-user-id")
            .and_then(txq::broker::header_text),
        Some(app.name.clone())
    );
    assert_eq!(rows_in_t(&test_db).await, 1);
}

/// The broker closes a channel over one message it refuses; the publishes that
/// shared the channel with it must not fail with it, and the refused one must be
/// told apart.
#[tokio::test]
async fn a_refused_publish_is_named_and_its_neighbours_go_through() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("sink")).await;
    let conn = std::sync::Arc::new(
        Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect"),
    );
    let publisher = Publisher::new(conn, 1, CancellationToken::new());
    let good = |i: usize| {
        let publisher = publisher.clone();
        let queue = queue.clone();
        async move {
            let props = BasicProperties::default().with_message_id(format!("good-{i}").into());
            publisher.publish_pipelined(&queue, b"{}", props).await
        }
    };
    let bad = {
        let publisher = publisher.clone();
        let queue = queue.clone();
        async move {
            // guest may not claim to be someone else.
            let props = BasicProperties::default().with_user_id("someone-else".into());
            publisher.publish_pipelined(&queue, b"{}", props).await
        }
    };
    let (bad, goods) = tokio::join!(bad, futures_util::future::join_all((0..30).map(good)));
    match bad {
        Err(PublishError::Refused(reason)) => {
            assert!(reason.contains("user_id"), "the broker's reason: {reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    for (i, g) in goods.into_iter().enumerate() {
        assert_eq!(g.expect("good publish"), Pipelined::Confirmed, "good-{i}");
    }
    let kept = drain(&client, &queue).await;
    let ids: std::collections::HashSet<String> = kept
        .iter()
        .filter_map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
        })
        .collect();
    assert_eq!(ids.len(), 30, "every good message arrived");
    assert!(
        kept.iter()
            .all(|m| m.delivery.properties.user_id().is_none())
    );
}

/// Publishes from tasks on several threads at once, a third of them to a queue
/// that does not exist (mandatory: they come back). In the exact lane each
/// outcome is the publish's own. In the pipelined lane lapin may hand a return to
/// a neighbour, but every return is reported once, with its own routing key, and
/// every publish is answered; had two publishes swapped their numbers on the
/// channel, confirms would go astray or the broker would close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_are_each_answered_and_exact_ones_exactly() {
    let mut client = Client::new().await;
    let queue = client.queue(&unique("sink")).await;
    let missing = unique("no-such-queue");
    let conn = std::sync::Arc::new(
        Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect"),
    );
    let publisher = Publisher::new(conn, 1, CancellationToken::new());
    let to = |i: usize| if i % 3 == 0 { &missing } else { &queue };

    const EXACT: usize = 300;
    let tasks: Vec<_> = (0..EXACT)
        .map(|i| {
            let (publisher, to) = (publisher.clone(), to(i).clone());
            tokio::spawn(async move {
                // Persistent: their confirms wait for the disk, and so come in
                // multiple acks that may cover a return.
                let props = BasicProperties::default()
                    .with_message_id(format!("e-{i}").into())
                    .with_delivery_mode(2);
                publisher.publish(&to, b"{}", props).await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.expect("publish task").expect("publish") {
            PublishOutcome::Confirmed => assert_ne!(i % 3, 0, "e-{i} had no queue to go to"),
            PublishOutcome::Returned(_) => assert_eq!(i % 3, 0, "e-{i} had a queue"),
            other => panic!("e-{i}: {other:?}"),
        }
    }

    const PIPELINED: usize = 600;
    let tasks: Vec<_> = (0..PIPELINED)
        .map(|i| {
            let (publisher, to) = (publisher.clone(), to(i).clone());
            tokio::spawn(async move {
                let props = BasicProperties::default().with_message_id(format!("p-{i}").into());
                publisher.publish_pipelined(&to, b"{}", props).await
            })
        })
        .collect();
    let mut returned = 0;
    for task in tasks {
        match task.await.expect("publish task").expect("publish") {
            Pipelined::Confirmed => {}
            Pipelined::Returned { routing_key, .. } => {
                assert_eq!(routing_key, missing);
                returned += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(returned, PIPELINED.div_ceil(3), "each return reported once");
    let kept = (EXACT - EXACT.div_ceil(3)) + (PIPELINED - PIPELINED.div_ceil(3));
    assert_eq!(drain(&client, &queue).await.len(), kept);
}

/// A reply over `max_reply_bytes` is never committed into the inbox (where every
/// redelivery would find it and fail to publish it again): the job rolls back and
/// answers `failed`, kind `reply_too_large`.
#[tokio::test]
async fn a_reply_over_max_reply_bytes_rolls_back_and_fails() {
    let test_db = TestDb::new(Backend::Postgres).await;
    table_t(&test_db).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let mut cfg = config(&test_db.url, &requests, &replies, 2);
    cfg.max_reply_bytes = 4096;
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("sized", Sized)
            .database(test_db.db.clone()),
    )
    .await;
    client
        .publish_all(
            &requests,
            &[
                Request::json("sized", json!({"n": 100_000}))
                    .id("big")
                    .correlation("big"),
                Request::json("sized", json!({"n": 10}))
                    .id("small")
                    .correlation("small"),
            ],
        )
        .await;
    let got = client.replies(&replies, 2).await;
    worker.stop().await.expect("clean stop");
    let big = got
        .iter()
        .find(|r| r.correlation_id() == Some("big"))
        .expect("big");
    assert_eq!(big.status(), "failed", "{:?}", big.body);
    assert_eq!(big.body["error"]["kind"], "reply_too_large");
    let small = got
        .iter()
        .find(|r| r.correlation_id() == Some("small"))
        .expect("small");
    assert_eq!(small.status(), "ok");
    assert_eq!(
        rows_in_t(&test_db).await,
        1,
        "the big job's insert was rolled back"
    );
    assert_eq!(client.depth(&format!("{requests}.dlq")).await, 1);
}

/// RabbitMQ passes on short strings that are not UTF-8; lapin cannot parse such a
/// frame and drops the connection, and the broker hands the message to the next
/// consumer. On a quorum queue txq declares a delivery limit and a dead-letter
/// target, so the message leaves the request queue after that many deliveries,
/// lands in the DLQ, and everything behind it is answered: the messages sent
/// with it in the prefetch window come back with it on each loss, and must not
/// reach the delivery limit alongside it.
#[tokio::test]
async fn an_unparsable_message_leaves_a_quorum_queue_and_the_rest_is_answered() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    table_t(&test_db).await;
    let mut client = Client::new().await;
    let requests = unique("requests");
    let replies = client.queue(&unique("replies")).await;
    let mut cfg = config(&test_db.url, &requests, &replies, 4);
    cfg.queue_type = QueueType::Quorum;
    cfg.delivery_limit = 3;
    // The test declares the quorum queues and owns them for cleanup.
    let topology = txq::broker::Topology::from_config(&cfg);
    for q in txq::broker::queue_arguments(&topology) {
        client.own(&q.0);
    }
    txq::broker::declare(&client.channel, &topology)
        .await
        .expect("declare the quorum queues");

    // The marker becomes bytes that are not UTF-8 on the way to the broker.
    let marker = b"POISON-MARKER-01".to_vec();
    let poison = vec![0xFF; marker.len()];
    let proxy = Proxy::start_to(&amqp_url(), Some((marker.clone(), poison))).await;
    let producer = Connection::connect(&proxy.url(), ConnectionProperties::default())
        .await
        .expect("connect through the proxy");
    let channel = producer.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let props = BasicProperties::default()
        .with_type("sized".into())
        .with_message_id(String::from_utf8(marker).expect("ascii").into())
        .with_delivery_mode(2);
    publish_raw(&channel, &requests, br#"{"n":1}"#, props).await;
    // Queued behind the poison before the worker starts, so its prefetch window
    // holds them with it: they must not share its fate.
    let good: Vec<Request> = (0..20)
        .map(|i| {
            Request::json("sized", json!({"n": 1}))
                .id(&format!("good-{i}"))
                .correlation(&format!("good-{i}"))
        })
        .collect();
    client.publish_all(&requests, &good).await;
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("sized", Sized)
            .database(test_db.db.clone()),
    )
    .await;

    let mut collector = Collector::start(&client, &replies).await;
    let ids = (0..20).map(|i| format!("good-{i}")).collect();
    collector.wait_for_ids(&ids).await;
    let dlq = format!("{requests}.dlq");
    eventually("the unparsable message in the DLQ", || async {
        (client.depth(&dlq).await == 1).then_some(())
    })
    .await;
    assert!(worker.is_running(), "the worker kept going");
    assert!(
        worker.health.reconnects() >= 1,
        "the message did break connections"
    );
    worker.stop().await.expect("clean stop");
    assert_eq!(client.depth(&requests).await, 0);
    collector.stop();
}

/// The COMMIT is sent and the connection drops before its answer: the commit may
/// land, or may still be landing. On the last attempt that used to be answered
/// `failed` and dead-lettered, although the work was done. It must come back
/// instead, and the inbox answers it once the commit is known.
#[tokio::test]
async fn a_commit_of_unknown_outcome_is_never_failed() {
    let test_db = TestDb::new(Backend::Postgres).await;
    table_t(&test_db).await;
    // At COMMIT, the first transaction sleeps 2 s: the test cuts the connection
    // meanwhile, and the server commits afterwards all the same.
    for sql in [
        "CREATE SEQUENCE slow_once",
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF nextval('slow_once') = 1 THEN PERFORM pg_sleep(2); END IF; RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED
         FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    ] {
        exec(&test_db.db, sql).await;
    }
    let proxy = Proxy::start_to(&test_db.url, None).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let mut cfg = config(&proxy.url(), &requests, &replies, 1);
    cfg.retry.in_process_attempts = NonZeroU32::MIN;
    cfg.retry.max_attempts = NonZeroU32::MIN;
    let worker = RunningWorker::start(Worker::builder(cfg).handler("sized", Sized)).await;
    client
        .publish(
            &requests,
            &Request::json("sized", json!({"n": 1}))
                .id("slow")
                .correlation("slow"),
        )
        .await;
    let db = test_db.db.clone();
    eventually("the COMMIT to be in its trigger", || {
        let db = db.clone();
        async move {
            let txq::Db::Postgres(pool) = &db else {
                unreachable!()
            };
            let n: i64 = txq::sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event = 'PgSleep'",
            )
            .fetch_one(pool)
            .await
            .expect("pg_stat_activity");
            (n == 1).then_some(())
        }
    })
    .await;
    proxy.cut();

    let got = client.replies(&replies, 1).await;
    assert_eq!(got[0].status(), "ok", "{:?}", got[0].body);
    worker.stop().await.expect("clean stop");
    assert_eq!(rows_in_t(&test_db).await, 1, "applied once");
    assert_eq!(client.depth(&format!("{requests}.dlq")).await, 0);
    assert_eq!(client.depth(&replies).await, 0, "one answer only");
}

/// A failure dead-letters one copy and replies `failed`. When that reply is not
/// confirmed (here the reply queue refuses everything), the request used to be
/// requeued, run again and dead-lettered again, without end.
#[tokio::test]
async fn one_failure_makes_one_dead_letter_copy_even_when_its_reply_is_refused() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let refusing = unique("full");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    client.declare(&refusing, args).await;
    client.own(&refusing);
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 1))
            .handler("sized", Sized)
            .database(test_db.db.clone()),
    )
    .await;
    client
        .publish(
            &requests,
            &Request::json("nope", json!({}))
                .id("fails")
                .reply_to(&refusing),
        )
        .await;
    let health = worker.health.clone();
    eventually("the failed request to be acked", || async {
        (health.settled() == 1).then_some(())
    })
    .await;
    worker.stop().await.expect("clean stop");
    assert_eq!(client.depth(&format!("{requests}.dlq")).await, 1);
    assert_eq!(client.depth(&requests).await, 0);
}

/// SIGTERM (here the shutdown token) while the broker does not answer: connecting
/// must not hold the stop until a TCP time-out.
#[tokio::test]
async fn a_stop_while_the_broker_hangs_ends_at_once() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let hole = Blackhole::start().await;
    let mut cfg = config(&test_db.url, &unique("requests"), "", 1);
    cfg.amqp_url = SecretUrl::new(format!("amqp://guest:guest@127.0.0.1:{}/%2f", hole.port));
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("sized", Sized)
            .database(test_db.db.clone()),
    )
    .await;
    // Let it get as far as waiting on the silent broker.
    tokio::task::yield_now().await;
    let stopped = tokio::time::timeout(Duration::from_secs(3), worker.stop()).await;
    assert!(
        stopped.is_ok(),
        "the worker did not stop within 3 s while connecting"
    );
}

/// `amqp_url` lists several nodes: the worker uses the first that answers.
#[tokio::test]
async fn the_worker_fails_over_to_the_next_broker_url() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    table_t(&test_db).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port();
    let mut cfg = config(&test_db.url, &requests, &replies, 1);
    cfg.amqp_url = SecretUrl::new(format!(
        "amqp://guest:guest@127.0.0.1:{closed}/%2f,{}",
        amqp_url()
    ));
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("sized", Sized)
            .database(test_db.db.clone()),
    )
    .await;
    client
        .publish(
            &requests,
            &Request::json("sized", json!({"n": 1})).id("one"),
        )
        .await;
    let got = client.replies(&replies, 1).await;
    assert_eq!(got[0].status(), "ok");
    worker.stop().await.expect("clean stop");
}

/// `TXQ_JOBS__MyType__TIMEOUT` reaches the config as `jobs.mytype`: a section that
/// differs from a handler only in case would silently never apply, so the worker
/// refuses to start and says why.
#[tokio::test]
async fn a_jobs_section_in_the_wrong_case_is_refused() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let mut cfg = config(&test_db.url, &unique("requests"), "", 1);
    cfg.jobs.insert(
        "mytype".into(),
        txq::config::JobConfig {
            timeout: Some(Duration::from_secs(1)),
            ..txq::config::JobConfig::default()
        },
    );
    let err = Worker::builder(cfg)
        .handler("MyType", Sized)
        .database(test_db.db.clone())
        .build()
        .await
        .expect_err("a section for `mytype` with a handler `MyType`");
    let text = err.to_string();
    assert!(text.contains("`jobs`") && text.contains("MyType"), "{text}");
}

/// A request's `expiration` is the producer's deadline for the request, not for
/// txq's copies of it: the dead-letter copy carries none (it would expire unseen
/// in the DLQ), and keeps the value in `x-txq-original-expiration`.
#[tokio::test]
async fn a_dead_letter_copy_carries_no_expiration_and_keeps_the_original() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 1))
            .handler("sized", Sized)
            .database(test_db.db.clone()),
    )
    .await;
    let props = BasicProperties::default()
        .with_type("no-such-type".into())
        .with_message_id("expiring".into())
        .with_expiration("600000".into());
    publish_raw(&client.channel, &requests, b"{}", props).await;
    let reply = client.replies(&replies, 1).await.remove(0);
    assert_eq!(reply.body["error"]["kind"], "unknown_type");
    worker.stop().await.expect("clean stop");
    let dead = drain(&client, &format!("{requests}.dlq")).await;
    assert_eq!(dead.len(), 1);
    let props = &dead[0].delivery.properties;
    assert_eq!(props.expiration(), &None, "the copy does not expire");
    let original = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-txq-original-expiration").cloned());
    assert_eq!(
        original
            .as_ref()
            .and_then(txq::broker::header_text)
            .as_deref(),
        Some("600000")
    );
}

/// The bank operations file, for `txq run --ops`.
const BANK_OPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bank/ops.toml");

/// The broker nacks the reply (its queue is full and rejects publishes): the
/// request goes back to its queue, nothing runs twice, and once the queue takes
/// messages again the answer comes from the inbox, once.
#[tokio::test]
async fn a_nacked_reply_requeues_the_request_and_the_inbox_answers_it_once() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    crate::bank::setup(&test_db.db, 2).await.expect("schema");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let full = unique("full");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    client.declare(&full, args).await;
    client.own(&full);
    // Full: the broker nacks every publish to it until this one is taken.
    client
        .publish(&full, &Request::json("filler", json!({})).id("filler"))
        .await;

    let mut txq = Txq::run(&test_db.url, &requests, "")
        .args(["--ops", BANK_OPS])
        .spawn();
    client
        .publish(
            &requests,
            &Request::json("noop", json!({}))
                .id("nacked")
                .reply_to(&full),
        )
        .await;
    txq.logged("a publish was not confirmed").await;
    let channel = client.conn.create_channel().await.expect("channel");
    let filler = channel
        .basic_get(full.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("the filler");
    assert_eq!(
        filler
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some("filler"),
        "the broker kept nothing but the filler"
    );

    let reply = client.replies_while(&full, 1, &mut txq).await.remove(0);
    assert_eq!(reply.status(), "ok", "{:?}", reply.body);
    assert_eq!(
        reply.header("x-txq-duplicate"),
        Some(AMQPValue::Boolean(true)),
        "the answer is the inbox's"
    );
    txq.eventually("the request to be acked", || async {
        (client.depth(&requests).await == 0).then_some(())
    })
    .await;
    txq.signal("TERM").await;
    txq.exit_within(Duration::from_secs(30)).await;
    assert_eq!(
        crate::bank::totals(&test_db.db)
            .await
            .expect("totals")
            .jobs_logged,
        1,
        "the job ran once"
    );
    assert_eq!(client.depth(&full).await, 0, "one answer");
}
