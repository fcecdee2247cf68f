//! Metrics, health and trace context, seen from outside: the `txq` binary's
//! `/metrics`, `/healthz` and `/readyz`, and the `traceparent` of what it publishes.

use std::collections::{BTreeMap, HashSet};

use serde_json::json;
use txq::{Backend, Worker};

use crate::bank;
use crate::support::{
    Alive as _, Client, Proxy, Request, RunningWorker, TestDb, Txq, TxqProcess, bank_env, config,
    http_get,
};

const OPS: &str = include_str!("../../examples/bank/ops.toml");

/// The bank operations plus one that sleeps past its timeout, to cause retries.
fn ops_file() -> tempfile_path::TempPath {
    let text = format!(
        "{OPS}\n[sleepy]\nparams = {{}}\n\n[[sleepy.steps]]\nname = \"nap\"\n\
         sql = \"SELECT SLEEP(5)\"\nsql_postgres = \"SELECT pg_sleep(5)\"\n"
    );
    tempfile_path::TempPath::with(&text)
}

/// A temporary file removed on drop.
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);

    impl TempPath {
        pub fn with(text: &str) -> TempPath {
            let path = std::env::temp_dir().join(format!("{}.toml", crate::support::unique("ops")));
            std::fs::write(&path, text).expect("writing the ops file");
            TempPath(path)
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// `txq run --ops` on these queues and database through `amqp_url`, stopped when
/// dropped.
fn txq_run(
    amqp_url: &str,
    db_url: &str,
    requests: &str,
    replies: &str,
    ops: &std::path::Path,
) -> Txq {
    Txq::run(db_url, requests, replies)
        .env("TXQ_AMQP_URL", amqp_url)
        .arg("--ops")
        .arg(ops)
}

/// The worker of the metrics tests: quick delayed retries, and `sleepy` timing
/// out.
fn spawn_txq(
    amqp_url: &str,
    db_url: &str,
    requests: &str,
    replies: &str,
    ops: &std::path::Path,
) -> TxqProcess {
    txq_run(amqp_url, db_url, requests, replies, ops)
        .args(["--concurrency", "4"])
        .env("TXQ_RETRY__DELAYS", "[\"100ms\"]")
        .env("TXQ_RETRY__MAX_ATTEMPTS", "2")
        .env("TXQ_RETRY__IN_PROCESS_ATTEMPTS", "2")
        .env("TXQ_JOBS__SLEEPY__TIMEOUT", "300ms")
        .spawn()
}

/// One scrape, as `name{sorted labels}` → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort_unstable();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_owned(),
        };
        out.insert(key, value);
    }
    out
}

async fn scrape(txq: &mut TxqProcess) -> BTreeMap<String, f64> {
    let (status, body) = txq.get("/metrics").await;
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}

/// Polls `path` until `ready` accepts the answer (the port comes up, or changes
/// its answer, on the worker's schedule); fails at once if txq exits.
async fn until<F: Fn(u16, &str) -> bool>(txq: &mut TxqProcess, path: &str, ready: F) {
    let port = txq.http_port().await;
    txq.eventually(&format!("{path} to change"), || async {
        http_get(port, path)
            .await
            .filter(|(status, body)| ready(*status, body))
            .map(drop)
    })
    .await;
}

/// The value of a series, which must be there: a renamed or missing series fails
/// the test rather than read as 0.
fn present(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key)
        .copied()
        .unwrap_or_else(|| panic!("no series {key} in the scrape: {m:#?}"))
}

/// The series an alert watches exist from the start, at 0, for every job type the
/// worker handles: `rate(txq_jobs_total{outcome="failed"}[5m])` must not be empty
/// until the first failure.
#[tokio::test]
async fn alerting_series_exist_at_zero_before_the_first_job() {
    let (test_db, _client, requests, replies) = bank_env(Backend::Sqlite, 2).await;
    let ops = ops_file();
    let mut txq = spawn_txq(
        &crate::support::amqp_url(),
        &test_db.url,
        &requests,
        &replies,
        &ops.0,
    );
    until(&mut txq, "/readyz", |status, _| status == 200).await;
    let m = scrape(&mut txq).await;
    for job_type in ["transfer", "noop", "balance", "sleepy"] {
        for outcome in [
            "ok",
            "rejected",
            "failed",
            "retried",
            "duplicate",
            "requeued",
        ] {
            let key = format!("txq_jobs_total{{outcome=\"{outcome}\",type=\"{job_type}\"}}");
            assert_eq!(present(&m, &key), 0.0, "{key}");
        }
    }
    for name in [
        "txq_duplicates_total",
        "txq_replies_returned_total",
        "txq_publishes_refused_total",
        "txq_unparsable_frames_total",
        "txq_broker_reconnects_total",
        "txq_heartbeat_failures_total",
        "txq_batch_completions_total{kind=\"first\"}",
        "txq_batch_completions_total{kind=\"revised\"}",
    ] {
        assert_eq!(present(&m, name), 0.0, "{name}");
    }
    txq.child.kill().await.expect("stopping txq");
}

/// A batch of three: one completion written and published live, its duration
/// observed, and the open-batch gauge back at 0 by the next sweep.
#[tokio::test]
async fn batch_metrics_count_the_completion() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, 2).await;
    let ops = ops_file();
    let mut txq = spawn_txq(
        &crate::support::amqp_url(),
        &test_db.url,
        &requests,
        &replies,
        &ops.0,
    );
    until(&mut txq, "/readyz", |status, _| status == 200).await;
    let batch = crate::support::unique("b");
    let members: Vec<Request> = (0..3)
        .map(|i| {
            Request::json("noop", json!({}))
                .id(&crate::support::unique(&format!("m{i}")))
                .reply_to(&replies)
                .batch(&batch, 3)
        })
        .collect();
    client.publish_all(&requests, &members).await;
    let got = client.replies(&replies, 4).await;
    assert_eq!(got.len(), 4, "three replies and the completion");
    // Marked published after the confirm, and the gauge read by the next sweep.
    until(&mut txq, "/metrics", |_, body| {
        let m = parse_metrics(body);
        m.get("txq_batch_completions_published_total{route=\"live\"}") == Some(&1.0)
            && m.get("txq_batches_open") == Some(&0.0)
    })
    .await;
    let m = scrape(&mut txq).await;
    assert_eq!(
        present(&m, "txq_batch_completions_total{kind=\"first\"}"),
        1.0
    );
    assert_eq!(
        present(&m, "txq_batch_completions_total{kind=\"revised\"}"),
        0.0
    );
    assert_eq!(present(&m, "txq_batch_duration_seconds_count"), 1.0);
    txq.child.kill().await.expect("stopping txq");
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let (test_db, client, requests, replies) = bank_env(Backend::MySql, 10).await;
    let ops = ops_file();
    let mut txq = spawn_txq(
        &crate::support::amqp_url(),
        &test_db.url,
        &requests,
        &replies,
        &ops.0,
    );
    until(&mut txq, "/readyz", |status, _| status == 200).await;
    let (status, _) = txq.get("/healthz").await;
    assert_eq!(status, 200);

    const OK: usize = 40;
    let mut batch: Vec<Request> = (0..OK)
        .map(|i| {
            Request::json(
                "transfer",
                json!({"from": 1 + i % 5, "to": 6 + i % 5, "amount": 1}),
            )
            .id(&format!("ok-{i}"))
            .reply_to(&replies)
        })
        .collect();
    // Rejected: the same account twice; a missing parameter.
    for i in 0..3 {
        batch.push(
            Request::json("transfer", json!({"from": 2, "to": 2, "amount": 1}))
                .id(&format!("same-{i}"))
                .reply_to(&replies),
        );
    }
    for i in 0..2 {
        batch.push(
            Request::json("transfer", json!({"from": 2}))
                .id(&format!("param-{i}"))
                .reply_to(&replies),
        );
    }
    // Failed and dead-lettered: a type nobody handles.
    batch.push(
        Request::json("refund", json!({}))
            .id("unknown-type")
            .reply_to(&replies),
    );
    // Timed out twice in process on each of two deliveries, then dead-lettered.
    batch.push(
        Request::json("sleepy", json!({}))
            .id("sleepy")
            .reply_to(&replies),
    );
    client.publish_all(&requests, &batch).await;
    // A requester whose reply queue is gone: its transfer is done and acked, the
    // reply dropped and counted.
    let gone = crate::support::unique("gone");
    client
        .publish(
            &requests,
            &Request::json("transfer", json!({"from": 1, "to": 6, "amount": 1}))
                .id("to-a-gone-queue")
                .reply_to(&gone),
        )
        .await;
    let first = client.replies(&replies, batch.len()).await;
    assert_eq!(first.len(), batch.len());
    // A redelivery of a finished request: answered from the inbox.
    client
        .publish(
            &requests,
            &Request::json("transfer", json!({"from": 1, "to": 6, "amount": 1}))
                .id("ok-0")
                .reply_to(&replies),
        )
        .await;
    let dup = client.replies(&replies, 1).await;
    assert_eq!(
        dup[0].header("x-txq-duplicate"),
        Some(lapin::types::AMQPValue::Boolean(true))
    );

    // Replies go out before the ack, and the count after it: wait for the last.
    let settled = (OK + 1 + 3 + 2 + 1 + 2 + 1) as f64;
    let port = txq.http_port().await;
    let m = txq
        .eventually("every delivery to be counted", || async {
            let (_, body) = http_get(port, "/metrics").await?;
            let m = parse_metrics(&body);
            let total: f64 = m
                .iter()
                .filter(|(k, _)| k.starts_with("txq_jobs_total{"))
                .map(|(_, v)| v)
                .sum();
            (total >= settled).then_some(m)
        })
        .await;
    let jobs = |t: &str, o: &str| {
        present(
            &m,
            &format!("txq_jobs_total{{outcome=\"{o}\",type=\"{t}\"}}"),
        )
    };
    assert_eq!(jobs("transfer", "ok"), (OK + 1) as f64, "{m:#?}");
    assert_eq!(jobs("transfer", "rejected"), 5.0, "{m:#?}");
    assert_eq!(jobs("transfer", "duplicate"), 1.0, "{m:#?}");
    assert_eq!(
        jobs("unknown", "failed"),
        1.0,
        "an unknown type is one series: {m:#?}"
    );
    assert_eq!(jobs("sleepy", "retried"), 1.0, "{m:#?}");
    assert_eq!(jobs("sleepy", "failed"), 1.0, "{m:#?}");
    assert_eq!(present(&m, "txq_duplicates_total"), 1.0);
    assert_eq!(
        present(&m, "txq_retries_total{kind=\"timeout\",type=\"sleepy\"}"),
        1.0,
        "{m:#?}"
    );
    assert_eq!(
        present(&m, "txq_db_transaction_retries_total{reason=\"timeout\"}"),
        2.0,
        "one in-process retry on each delivery: {m:#?}"
    );
    assert_eq!(
        present(
            &m,
            "txq_dead_lettered_total{kind=\"unknown_type\",type=\"unknown\"}"
        ),
        1.0
    );
    assert_eq!(
        present(
            &m,
            "txq_dead_lettered_total{kind=\"timeout\",type=\"sleepy\"}"
        ),
        1.0
    );
    assert_eq!(
        present(&m, "txq_job_duration_seconds_count{type=\"transfer\"}"),
        (OK + 1 + 5 + 1) as f64
    );
    assert_eq!(
        present(
            &m,
            "txq_job_duration_seconds_bucket{le=\"+Inf\",type=\"transfer\"}"
        ),
        (OK + 1 + 5 + 1) as f64
    );
    assert_eq!(present(&m, "txq_concurrency_limit"), 4.0);
    assert_eq!(present(&m, "txq_jobs_in_flight"), 0.0);
    assert!(
        present(&m, "txq_db_pool_connections{state=\"max\"}") >= 4.0,
        "{m:#?}"
    );
    present(&m, "txq_db_pool_connections{state=\"idle\"}");
    present(&m, "txq_db_pool_connections{state=\"in_use\"}");
    assert_eq!(
        present(&m, "txq_replies_returned_total"),
        1.0,
        "the reply to the gone queue: {m:#?}"
    );
    // What never happened is there at 0.
    assert_eq!(present(&m, "txq_broker_reconnects_total"), 0.0, "{m:#?}");

    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(
        totals.transfers,
        (OK + 1) as i64,
        "the metrics match the database"
    );
    assert_eq!(client.depth(&requests).await, 0, "every request was acked");
    txq.child.kill().await.expect("stopping txq");
}

#[tokio::test]
async fn readyz_follows_the_broker_connection() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let mut client = Client::new().await;
    let requests = client.queue(&crate::support::unique("requests")).await;
    let replies = client.queue(&crate::support::unique("replies")).await;
    let proxy = Proxy::start().await;
    let ops = ops_file();
    let mut txq = spawn_txq(&proxy.url(), &test_db.url, &requests, &replies, &ops.0);
    until(&mut txq, "/readyz", |status, _| status == 200).await;

    proxy.cut();
    until(&mut txq, "/readyz", |status, body| {
        status == 503 && body.contains("no consumer")
    })
    .await;
    let (status, _) = txq.get("/healthz").await;
    assert_eq!(status, 200, "alive while reconnecting");

    until(&mut txq, "/readyz", |status, _| status == 200).await;
    let m = scrape(&mut txq).await;
    assert!(present(&m, "txq_broker_reconnects_total") >= 1.0, "{m:#?}");
    txq.child.kill().await.expect("stopping txq");
}

#[tokio::test]
async fn traceparent_continues_through_the_job_to_reply_and_copies() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, 4).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 2))
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    let tp = format!("00-{TRACE}-{PARENT}-01");
    client
        .publish_all(
            &requests,
            &[
                Request::json("transfer", json!({"from": 1, "to": 2, "amount": 1}))
                    .correlation("ok")
                    .traceparent(&tp)
                    .reply_to(&replies),
                Request::json("nope", json!({}))
                    .correlation("dead")
                    .traceparent(&tp)
                    .reply_to(&replies),
                Request::json("transfer", json!({"from": 1, "to": 2, "amount": 1}))
                    .correlation("fresh")
                    .reply_to(&replies),
            ],
        )
        .await;
    let got = client.replies(&replies, 3).await;
    let dead = client.replies(&format!("{requests}.dlq"), 1).await;
    worker.stop().await.expect("clean stop");

    let parts = |tp: Option<String>| -> Vec<String> {
        let tp = tp.expect("a traceparent");
        tp.split('-').map(str::to_owned).collect()
    };
    let mut spans = HashSet::new();
    for reply in got.iter().filter(|r| r.correlation_id() != Some("fresh")) {
        let p = parts(reply.header_text("traceparent"));
        assert_eq!(p[1], TRACE, "the request's trace continues");
        assert_ne!(p[2], PARENT, "with the job's span as parent");
        assert!(spans.insert(p[2].clone()), "one span per job");
    }
    let p = parts(dead[0].header_text("traceparent"));
    assert_eq!(p[1], TRACE, "the dead-letter copy carries the trace");
    assert!(spans.contains(&p[2]), "as a child of the job that failed");
    let fresh = got
        .iter()
        .find(|r| r.correlation_id() == Some("fresh"))
        .expect("fresh reply");
    let p = parts(fresh.header_text("traceparent"));
    assert_ne!(p[1], TRACE, "a request without a trace starts one");
    assert_eq!(p[1].len(), 32);
}

/// A stand-in OTLP/HTTP collector: answers 200 to every POST and keeps the bodies.
#[cfg(feature = "otlp")]
async fn collector() -> (u16, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let _ = tx.send(body);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

#[cfg(feature = "otlp")]
fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// With the `otlp` feature: the job's span reaches a collector as a child of the
/// request's span, and the reply's `traceparent` names that exported span.
#[cfg(feature = "otlp")]
#[tokio::test]
async fn otlp_exports_the_job_span_the_reply_names() {
    let (test_db, client, requests, replies) = bank_env(Backend::Sqlite, 4).await;
    let (collector_port, mut bodies) = collector().await;
    let ops = ops_file();
    let mut txq = txq_run(
        &crate::support::amqp_url(),
        &test_db.url,
        &requests,
        &replies,
        &ops.0,
    )
    .args(["--metrics-addr", ""])
    .env(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{collector_port}"),
    )
    .env("OTEL_BSP_SCHEDULE_DELAY", "100")
    // The filter applies to exported spans too; the job span is at info.
    .env("RUST_LOG", "info")
    .spawn();
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    client
        .publish(
            &requests,
            &Request::json("transfer", json!({"from": 1, "to": 2, "amount": 1}))
                .traceparent(&format!("00-{TRACE}-{PARENT}-01"))
                .reply_to(&replies),
        )
        .await;
    let reply = client.replies(&replies, 1).await;
    assert_eq!(reply[0].status(), "ok", "{:?}", reply[0].body);
    let tp = reply[0].header_text("traceparent").expect("traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], TRACE);
    let (trace, span, parent) = (hex_bytes(TRACE), hex_bytes(parts[2]), hex_bytes(PARENT));
    let contains = |body: &[u8], needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    let found = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(body) = bodies.recv().await {
            if contains(&body, &trace) && contains(&body, &span) && contains(&body, &parent) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "the collector got the job span (trace {TRACE}, span {}, parent {PARENT})",
        parts[2]
    );
    txq.child.kill().await.expect("stopping txq");
}
