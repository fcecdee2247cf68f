//! The message contract and the worker's bounds: replies, bad input, rejections,
//! panics, concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde_json::json;
use txq::{Backend, Handler, JobError, JobMeta, Tx, Worker, with_conn};

use crate::bank;
use crate::support::{Client, Request, RunningWorker, TestDb, bank_env, by_status, config, unique};

/// Counts the jobs inside handlers at once.
#[derive(Clone, Default)]
struct Probe {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Handler for Probe {
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, tx: &mut Tx, _: serde_json::Value, _: &JobMeta) -> Result<(), JobError> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        // Hold the transaction open a while, as a real job would.
        with_conn!(tx, c => { txq::sqlx::query("SELECT pg_sleep(0.02)").execute(c).await?; });
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn jobs_in_flight_never_exceed_the_concurrency() {
    const CONCURRENCY: usize = 4;
    let test_db = TestDb::new(Backend::Postgres).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let batch: Vec<Request> = (0..60).map(|_| Request::json("probe", json!({}))).collect();
    client.publish_all(&requests, &batch).await;

    let probe = Probe::default();
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, CONCURRENCY))
            .handler("probe", probe.clone())
            .database(test_db.db.clone()),
    )
    .await;
    let got = client.replies(&replies, batch.len()).await;
    worker.stop().await.expect("clean stop");
    assert!(got.iter().all(|r| r.status() == "ok"));
    let peak = probe.peak.load(Ordering::SeqCst);
    assert!(
        peak <= CONCURRENCY,
        "{peak} jobs ran at once with concurrency {CONCURRENCY}"
    );
    assert!(
        peak > 1,
        "jobs ran one at a time: the pool is not concurrent"
    );
}

#[tokio::test]
async fn a_reply_reaches_a_direct_reply_to_consumer() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    bank::setup(&test_db.db, 2).await.expect("schema");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, "", 2))
            .handler("noop", bank::Noop)
            .database(test_db.db.clone()),
    )
    .await;
    // Direct reply-to: consume the pseudo-queue with no-ack, then publish on the
    // same channel with reply_to set to it.
    let channel = client.conn.create_channel().await.expect("channel");
    let mut replies = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "direct".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume amq.rabbitmq.reply-to");
    let request = Request::json("noop", json!({}))
        .correlation("rpc-1")
        .reply_to("amq.rabbitmq.reply-to");
    channel
        .basic_publish(
            "".into(),
            requests.as_str().into(),
            Default::default(),
            &request.body,
            lapin::BasicProperties::default()
                .with_type("noop".into())
                .with_correlation_id("rpc-1".into())
                .with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .expect("publish");
    let reply = tokio::time::timeout(Duration::from_secs(60), replies.next())
        .await
        .expect("a reply within a minute")
        .expect("consumer open")
        .expect("delivery");
    let body: serde_json::Value = serde_json::from_slice(&reply.data).expect("JSON");
    assert_eq!(body, json!({"status": "ok", "result": null}));
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("rpc-1")
    );
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_request_without_reply_to_is_processed_and_acked() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    bank::setup(&test_db.db, 2).await.expect("schema");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let default_replies = client.queue(&unique("replies")).await;

    // With no default reply queue: no reply at all.
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, "", 2))
            .handler("noop", bank::Noop)
            .database(test_db.db.clone()),
    )
    .await;
    client
        .publish(&requests, &Request::json("noop", json!({})).id("quiet"))
        .await;
    // Then a request whose reply proves the first one is behind us (one queue,
    // taken in order with concurrency 1 would be stricter; the count below checks
    // the effect itself).
    client
        .publish(
            &requests,
            &Request::json("noop", json!({})).reply_to(&default_replies),
        )
        .await;
    client.replies(&default_replies, 1).await;
    worker.stop().await.expect("clean stop");
    assert_eq!(
        bank::totals(&test_db.db).await.expect("totals").jobs_logged,
        2
    );
    assert_eq!(
        client.depth(&requests).await,
        0,
        "acked, not left or requeued"
    );
    assert_eq!(
        client.depth(&default_replies).await,
        0,
        "no reply for the quiet request"
    );

    // With a default reply queue: the reply goes there.
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &default_replies, 2))
            .handler("noop", bank::Noop)
            .database(test_db.db.clone()),
    )
    .await;
    client
        .publish(
            &requests,
            &Request::json("noop", json!({})).correlation("to-default"),
        )
        .await;
    let reply = client.replies(&default_replies, 1).await.remove(0);
    assert_eq!(reply.correlation_id(), Some("to-default"));
    worker.stop().await.expect("clean stop");
    assert_eq!(client.depth(&requests).await, 0);
}

#[tokio::test]
async fn bad_input_gets_an_error_reply_and_the_worker_stays_up() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, 2).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 4))
            .handler("transfer", bank::Transfer)
            .handler("noop", bank::Noop)
            .database(test_db.db.clone()),
    )
    .await;
    let raw = |t: Option<&str>, body: &[u8], cid: &str| Request {
        job_type: t.map(str::to_owned),
        body: body.to_vec(),
        correlation_id: Some(cid.to_owned()),
        ..Request::default()
    };
    let bad = [
        (
            raw(Some("transfer"), b"{\"from\": 1, ", "truncated"),
            "malformed_json",
        ),
        (
            raw(Some("transfer"), b"\xff\xfe\x00garbage", "not-utf8"),
            "malformed_json",
        ),
        (
            raw(
                Some("transfer"),
                br#"{"from":"one","to":2,"amount":5}"#,
                "wrong-type",
            ),
            "invalid_payload",
        ),
        (
            raw(Some("transfer"), br#"{"from":1,"to":2}"#, "missing-field"),
            "invalid_payload",
        ),
        (
            raw(
                Some("transfer"),
                br#"{"from":1,"to":2,"amount":5,"x":1}"#,
                "extra-field",
            ),
            "invalid_payload",
        ),
        (
            raw(Some("launch_missiles"), b"{}", "unknown-type"),
            "unknown_type",
        ),
        (raw(None, b"{}", "no-type"), "missing_type"),
    ];
    for (request, _) in &bad {
        client.publish(&requests, request).await;
    }
    let got = client.replies(&replies, bad.len()).await;
    for (request, kind) in &bad {
        let cid = request.correlation_id.as_deref().expect("cid");
        let reply = got
            .iter()
            .find(|r| r.correlation_id() == Some(cid))
            .expect("a reply for each");
        assert_eq!(reply.status(), "failed", "{cid}: {:?}", reply.body);
        assert_eq!(
            reply.body["error"]["kind"], *kind,
            "{cid}: {:?}",
            reply.body
        );
        assert!(
            reply.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{cid}: the reply says why"
        );
        assert_eq!(reply.header_text("x-txq-status").as_deref(), Some("failed"));
    }

    assert!(worker.is_running(), "bad input must not stop the worker");
    client
        .publish(
            &requests,
            &Request::json("transfer", json!({"from": 1, "to": 2, "amount": 1}))
                .correlation("good"),
        )
        .await;
    let good = client.replies(&replies, 1).await.remove(0);
    assert_eq!(good.status(), "ok", "{:?}", good.body);
    worker.stop().await.expect("clean stop");
    assert_eq!(
        client.depth(&requests).await,
        0,
        "bad requests are not requeued"
    );
}

/// Writes a row, then does what the payload says.
struct WriteThen;

impl Handler for WriteThen {
    type Payload = String;
    type Output = ();

    async fn handle(&self, tx: &mut Tx, then: String, _: &JobMeta) -> Result<(), JobError> {
        with_conn!(tx, c => {
            txq::sqlx::query("INSERT INTO jobs_log (message_id) VALUES ('written')").execute(c).await?;
        });
        match then.as_str() {
            "reject" => Err(JobError::reject("not_today", "refused after writing")),
            "fail" => Err(JobError::permanent("gave up after writing")),
            "panic" => panic!("handler blew up after writing"),
            "bad_sql" => {
                with_conn!(tx, c => { txq::sqlx::query("SELEC nonsense").execute(c).await?; });
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn a_refused_failed_or_panicking_job_rolls_back_everything_it_wrote() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, 2).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 2))
            .handler("write_then", WriteThen)
            .database(test_db.db.clone()),
    )
    .await;
    for then in ["reject", "fail", "panic", "bad_sql"] {
        client
            .publish(
                &requests,
                &Request::json("write_then", json!(then)).correlation(then),
            )
            .await;
    }
    let got = client.replies(&replies, 4).await;
    let find = |cid: &str| {
        got.iter()
            .find(|r| r.correlation_id() == Some(cid))
            .expect("reply")
    };
    let rejected = find("reject");
    assert_eq!(
        rejected.body,
        json!({"status": "rejected", "error": {"code": "not_today", "message": "refused after writing"}})
    );
    assert_eq!(find("fail").body["error"]["kind"], "handler_error");
    assert_eq!(find("panic").body["error"]["kind"], "panic");
    assert_eq!(find("bad_sql").body["error"]["kind"], "database_error");
    assert_eq!(by_status(&got).get("failed"), Some(&3));
    assert_eq!(
        bank::totals(&test_db.db).await.expect("totals").jobs_logged,
        0,
        "nothing committed"
    );

    assert!(worker.is_running(), "a panic must not stop the worker");
    client
        .publish(
            &requests,
            &Request::json("write_then", json!("commit")).correlation("ok"),
        )
        .await;
    assert_eq!(client.replies(&replies, 1).await[0].status(), "ok");
    worker.stop().await.expect("clean stop");
    assert_eq!(
        bank::totals(&test_db.db).await.expect("totals").jobs_logged,
        1
    );
    assert_eq!(client.depth(&requests).await, 0);
}

/// Fails with a permanent error whose cause has a cause of its own.
async fn chained(_tx: &mut Tx, _p: serde_json::Value, _m: &JobMeta) -> Result<(), JobError> {
    let root = std::io::Error::other("disk quota exceeded");
    #[derive(Debug, thiserror::Error)]
    #[error("writing the export")]
    struct Export(#[source] std::io::Error);
    Err(JobError::permanent(Export(root)))
}

/// Echoes its payload.
async fn echo(
    _tx: &mut Tx,
    p: serde_json::Value,
    _m: &JobMeta,
) -> Result<serde_json::Value, JobError> {
    Ok(p)
}

/// A plain `async fn` is a handler (through `handler_fn`), and a handler error's
/// whole source chain reaches the reply and the dead-letter headers.
#[tokio::test]
async fn plain_async_fns_are_handlers_and_error_chains_reach_the_dead_letter() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 2))
            .handler("echo", txq::handler_fn(echo))
            .handler("chained", txq::handler_fn(chained))
            .database(test_db.db.clone()),
    )
    .await;
    client
        .publish_all(
            &requests,
            &[
                Request::json("echo", json!({"n": 7})).correlation("echo"),
                Request::json("chained", json!({})).correlation("chained"),
            ],
        )
        .await;
    let got = client.replies(&replies, 2).await;
    worker.stop().await.expect("clean stop");
    let echoed = got
        .iter()
        .find(|r| r.correlation_id() == Some("echo"))
        .expect("echo");
    assert_eq!(echoed.body, json!({"status": "ok", "result": {"n": 7}}));
    let failed = got
        .iter()
        .find(|r| r.correlation_id() == Some("chained"))
        .expect("chained");
    assert_eq!(
        failed.body["error"]["message"],
        "writing the export: disk quota exceeded"
    );
    let channel = client.conn.create_channel().await.expect("channel");
    let dead = channel
        .basic_get(
            format!("{requests}.dlq").as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
        .expect("a dead letter");
    let error = dead.delivery.properties.headers().as_ref().and_then(|h| {
        h.inner()
            .get("x-txq-error")
            .and_then(txq::broker::header_text)
    });
    assert_eq!(
        error.as_deref(),
        Some("writing the export: disk quota exceeded")
    );
}
