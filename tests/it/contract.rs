//! The message contract and the worker's bounds: replies, bad input, rejections,
//! panics, concurrency.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde_json::json;
use txq::{Backend, Handler, JobError, JobMeta, Tx, Worker, with_conn};

use crate::bank;
use tokio::sync::Semaphore;

use crate::support::{
    Alive as _, Client, Collector, Proxy, REPLY_DEADLINE, Request, RunningWorker, TestDb, Txq,
    bank_env, by_status, config, correlation_ids, http_get, rabbitmqctl, unique,
};

/// Logs its message_id in `jobs_log`, then waits at the gate with its
/// transaction open; counts the jobs started, inside and waiting at once.
#[derive(Clone)]
struct Gated {
    gate: Arc<Semaphore>,
    started: Arc<AtomicUsize>,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    waiting: tokio::sync::watch::Sender<usize>,
}

impl Handler for Gated {
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(
        &self,
        tx: &mut Tx,
        _: serde_json::Value,
        meta: &JobMeta,
    ) -> Result<(), JobError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        with_conn!(tx, c => {
            txq::sqlx::query("INSERT INTO jobs_log (message_id) VALUES ($1)")
                .bind(meta.message_id.as_deref())
                .execute(c)
                .await?;
        });
        self.waiting.send_modify(|n| *n += 1);
        self.gate.acquire().await.expect("gate open").forget();
        self.waiting.send_modify(|n| *n -= 1);
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Messages delivered to a consumer of `queue` and not yet acked, as the broker
/// counts them.
async fn unacked(queue: &str) -> u64 {
    let out = rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_unacknowledged",
    ])
    .await;
    out.lines()
        .find_map(|l| {
            let (name, n) = l.split_once('\t')?;
            (name == queue).then(|| n.trim().parse().expect("a count"))
        })
        .unwrap_or_else(|| panic!("{queue} is not listed: {out}"))
}

/// With a prefetch above the concurrency the broker hands over more than may run:
/// the worker itself must hold the rest back, across a reconnect too.
#[tokio::test]
async fn jobs_in_flight_never_exceed_the_concurrency() {
    const CONCURRENCY: usize = 3;
    const PREFETCH: u16 = 10;
    const N: usize = 30;
    let (test_db, client, requests, replies) = bank_env(Backend::Postgres, 2).await;
    let batch: Vec<Request> = (0..N)
        .map(|i| {
            Request::json("gated", json!({}))
                .id(&format!("g-{i}-{}", unique("m")))
                .correlation(&format!("c-{i}"))
        })
        .collect();
    client.publish_all(&requests, &batch).await;

    let proxy = Proxy::start().await;
    let mut cfg = config(&test_db.url, &requests, &replies, CONCURRENCY as u16);
    cfg.amqp_url = txq::config::SecretUrl::new(proxy.url());
    cfg.prefetch = std::num::NonZeroU16::new(PREFETCH);
    let (waiting, mut held) = tokio::sync::watch::channel(0);
    let gated = Gated {
        gate: Arc::new(Semaphore::new(0)),
        started: Arc::default(),
        now: Arc::default(),
        peak: Arc::default(),
        waiting,
    };
    let mut worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("gated", gated.clone())
            .database(test_db.db.clone()),
    )
    .await;
    let all_held = |n: &usize| *n >= CONCURRENCY;
    tokio::time::timeout(REPLY_DEADLINE, held.wait_for(all_held))
        .await
        .expect("the first jobs reach the gate")
        .expect("watch");
    // The broker has handed over a full prefetch, more than may run…
    worker
        .eventually("a full prefetch delivered", || async {
            (unacked(&requests).await == u64::from(PREFETCH)).then_some(())
        })
        .await;
    // …and none of the rest started.
    assert_eq!(gated.started.load(Ordering::SeqCst), CONCURRENCY);

    // A cut while they are held: the worker notices at once (it used not to,
    // while every permit was taken), the broker takes the deliveries back, and a
    // new session is handed a full prefetch again, of which none may start.
    proxy.cut();
    let health = worker.health.clone();
    worker
        .eventually("the loss noticed while every permit is held", || async {
            (health.reconnects() >= 1 && health.is_consuming()).then_some(())
        })
        .await;
    worker
        .eventually("a full prefetch on the new connection", || async {
            (unacked(&requests).await == u64::from(PREFETCH)).then_some(())
        })
        .await;
    assert_eq!(gated.started.load(Ordering::SeqCst), CONCURRENCY);

    gated.gate.add_permits(2 * N);
    let mut collector = Collector::start(&client, &replies).await;
    collector
        .wait_for_ids_while(&correlation_ids(N), &mut worker)
        .await;
    assert!(worker.health.reconnects() >= 1, "the worker reconnected");
    worker.stop().await.expect("clean stop");
    let got = collector.stop();
    assert!(got.iter().all(|r| r.status() == "ok"), "{got:?}");
    // A request cut off after its commit may be answered again, from the inbox
    // (flagged duplicate): never run twice, so never two first answers.
    let answered: HashSet<&str> = got.iter().filter_map(|r| r.correlation_id()).collect();
    assert_eq!(answered.len(), N, "every request was answered");
    let mut first = HashSet::new();
    for r in got.iter().filter(|r| r.header("x-txq-duplicate").is_none()) {
        let id = r.correlation_id().expect("correlation_id");
        assert!(
            first.insert(id),
            "{id} was answered twice as a first answer"
        );
    }
    let peak = gated.peak.load(Ordering::SeqCst);
    assert!(
        peak <= CONCURRENCY,
        "{peak} jobs ran at once with concurrency {CONCURRENCY}"
    );
    assert_eq!(peak, CONCURRENCY, "jobs ran one at a time");
    let (rows, ids) = jobs_logged(&test_db).await;
    assert_eq!((rows, ids), (N as i64, N as i64), "each job committed once");
    assert_eq!(client.depth(&requests).await, 0);
}

/// Acks are coalesced into multiple acks, and a multiple ack settles every tag
/// below it. One must never cover a job still running: then a cut connection (or
/// a crash) would lose that request. The first delivery is held at a gate while the
/// rest finish; the broker must keep exactly it unacked, and after a cut it must
/// come back and be answered.
#[tokio::test]
async fn a_multiple_ack_never_covers_a_job_still_running() {
    const N: usize = 6;
    let (test_db, client, requests, replies) = bank_env(Backend::Postgres, 2).await;
    let batch: Vec<Request> = (0..N)
        .map(|i| {
            Request::json(if i == 0 { "gated" } else { "free" }, json!({}))
                .id(&format!("a-{i}-{}", unique("m")))
                .correlation(&format!("c-{i}"))
        })
        .collect();
    client.publish_all(&requests, &batch).await;
    let gated = |permits| {
        let (waiting, _) = tokio::sync::watch::channel(0);
        Gated {
            gate: Arc::new(Semaphore::new(permits)),
            started: Arc::default(),
            now: Arc::default(),
            peak: Arc::default(),
            waiting,
        }
    };
    let (held, free) = (gated(0), gated(N));
    let proxy = Proxy::start().await;
    let mut cfg = config(&test_db.url, &requests, &replies, N as u16);
    cfg.amqp_url = txq::config::SecretUrl::new(proxy.url());
    let mut worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("gated", held.clone())
            .handler("free", free)
            .database(test_db.db.clone()),
    )
    .await;
    let mut collector = Collector::start(&client, &replies).await;
    let rest: HashSet<String> = (1..N).map(|i| format!("c-{i}")).collect();
    collector.wait_for_ids_while(&rest, &mut worker).await;
    // Every finished job's ack goes out (alone, past the hold: tag 1 blocks the
    // prefix), and the held one stays unacked. A multiple ack over tag 1 would
    // take the count to 0.
    worker
        .eventually("the finished jobs acked, the held one not", || async {
            (unacked(&requests).await == 1).then_some(())
        })
        .await;
    assert_eq!(held.started.load(Ordering::SeqCst), 1);

    proxy.cut();
    held.gate.add_permits(2);
    collector
        .wait_for_ids_while(&correlation_ids(N), &mut worker)
        .await;
    worker.stop().await.expect("clean stop");
    let got = collector.stop();
    assert!(got.iter().all(|r| r.status() == "ok"), "{got:?}");
    let (rows, ids) = jobs_logged(&test_db).await;
    assert_eq!((rows, ids), (N as i64, N as i64), "each job committed once");
    assert_eq!(client.depth(&requests).await, 0);
}

/// Rows in `jobs_log`, and distinct message_ids among them.
async fn jobs_logged(test_db: &TestDb) -> (i64, i64) {
    let sql = "SELECT COUNT(*), COUNT(DISTINCT message_id) FROM jobs_log";
    match &test_db.db {
        txq::Db::MySql(p) => txq::sqlx::query_as(sql).fetch_one(p).await,
        txq::Db::Postgres(p) => txq::sqlx::query_as(sql).fetch_one(p).await,
        txq::Db::Sqlite(p) => txq::sqlx::query_as(sql).fetch_one(p).await,
    }
    .expect("jobs_log")
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

/// The bank operations file, for `txq run --ops`.
const BANK_OPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bank/ops.toml");

/// Without reply_to and with no default reply queue, nothing is published at all:
/// a reply sent anyway would come back unroutable, and be counted.
#[tokio::test]
async fn a_request_without_reply_to_and_no_reply_queue_gets_no_reply() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    bank::setup(&test_db.db, 2).await.expect("schema");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let mut txq = Txq::run(&test_db.url, &requests, "")
        .args(["--ops", BANK_OPS, "--concurrency", "1"])
        .spawn();
    client
        .publish_all(
            &requests,
            &[
                Request::json("noop", json!({})).id("quiet"),
                Request::json("noop", json!({}))
                    .id("loud")
                    .reply_to(&replies),
            ],
        )
        .await;
    let loud = client.replies_while(&replies, 1, &mut txq).await.remove(0);
    assert_eq!(
        loud.header_text("x-txq-request-id").as_deref(),
        Some("loud")
    );
    let port = txq.http_port().await;
    let metrics = txq
        .eventually("both requests to be counted", || async {
            let (_, body) = http_get(port, "/metrics").await?;
            body.contains("txq_jobs_total{type=\"noop\",outcome=\"ok\"} 2")
                .then_some(body)
        })
        .await;
    // Nothing was returned unroutable: no reply went out for the quiet request
    // (its series is there from the start, at 0).
    assert!(
        metrics.contains("\ntxq_replies_returned_total 0\n"),
        "a reply was published for the quiet request: {metrics}"
    );
    txq.signal("TERM").await;
    assert_eq!(txq.exit_within(Duration::from_secs(30)).await, Some(0));
    assert_eq!(
        bank::totals(&test_db.db).await.expect("totals").jobs_logged,
        2,
        "the quiet request was processed"
    );
    assert_eq!(client.depth(&requests).await, 0, "and acked");
    assert_eq!(client.depth(&replies).await, 0);
}

#[tokio::test]
async fn a_request_without_reply_to_is_answered_on_the_default_reply_queue() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    bank::setup(&test_db.db, 2).await.expect("schema");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let default_replies = client.queue(&unique("replies")).await;
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
