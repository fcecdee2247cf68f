//! The metrics and health port under slow clients and a busy pool.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use txq::{Backend, Handler, JobError, JobMeta, Tx, Worker, with_conn};

use crate::support::{
    Alive as _, Client, Request, RunningWorker, TestDb, Txq, config, eventually, http_get, unique,
};

/// Holds its transaction (and so the pool's only connection) until let go.
#[derive(Clone)]
struct Held(Arc<Semaphore>);

impl Handler for Held {
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, tx: &mut Tx, _: serde_json::Value, _: &JobMeta) -> Result<(), JobError> {
        with_conn!(tx, c => { txq::sqlx::query("SELECT 1").execute(c).await?; });
        let _ = self.0.acquire().await;
        Ok(())
    }
}

/// A job holding the pool's only connection must not make the worker unready:
/// `/readyz` checks the database on a connection of its own.
#[tokio::test]
async fn readyz_stays_ready_while_jobs_hold_every_pooled_connection() {
    let test_db = TestDb::with_pool(Backend::Postgres, 1).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let gate = Arc::new(Semaphore::new(0));
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 1))
            .handler("held", Held(gate.clone()))
            .database(test_db.db.clone()),
    )
    .await;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let stop = CancellationToken::new();
    let (addr, server) = txq::http::serve(
        "127.0.0.1:0".parse().expect("addr"),
        recorder,
        worker.health.clone(),
        test_db.db.clone(),
        stop.clone(),
    )
    .await
    .expect("serve");
    client
        .publish(&requests, &Request::json("held", json!({})))
        .await;
    let db = test_db.db.clone();
    eventually("the job to hold the only connection", || {
        let db = db.clone();
        async move { (db.pool_state() == (1, 0)).then_some(()) }
    })
    .await;
    for _ in 0..3 {
        let (status, body) = http_get(addr.port(), "/readyz").await.expect("/readyz");
        assert_eq!(status, 200, "{body}");
    }
    gate.add_permits(1);
    client.replies(&replies, 1).await;
    stop.cancel();
    server.await.expect("server task");
    worker.stop().await.expect("clean stop");
}

/// A client that sends half a request and waits: the server closes it after
/// the header-read limit, and a stop does not wait for it.
#[tokio::test]
async fn a_half_sent_request_neither_lives_on_nor_holds_the_stop() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let mut client = Client::new().await;
    let queue = client.queue(&unique("requests")).await;
    let mut txq = Txq::run(&test_db.url, &queue, "").spawn();
    let port = txq.http_port().await;
    txq.eventually("the port to answer", || async {
        http_get(port, "/healthz").await.map(|_| ())
    })
    .await;

    // One client the header-read limit must end…
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept a half-sent request open");

    // …and one still open when the stop comes.
    let mut held = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    held.write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .expect("write");
    txq.signal("TERM").await;
    // With a client half-way through a request.
    let code = txq.exit_within(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    drop(held);
}

/// Serves `/readyz` for `health` and `db` as `txq run` does, on a port of its own.
async fn serve(
    health: txq::Health,
    db: txq::Db,
) -> (u16, CancellationToken, tokio::task::JoinHandle<()>) {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let stop = CancellationToken::new();
    let (addr, server) = txq::http::serve(
        "127.0.0.1:0".parse().expect("addr"),
        recorder,
        health,
        db,
        stop.clone(),
    )
    .await
    .expect("serve");
    (addr.port(), stop, server)
}

/// Waits until `/readyz` answers `status` with `text` in its body.
async fn readyz_until(worker: &mut RunningWorker, port: u16, status: u16, text: &str) {
    worker
        .eventually(&format!("/readyz to answer {status} ({text})"), || async {
            let (got, body) = http_get(port, "/readyz").await?;
            (got == status && body.contains(text)).then_some(())
        })
        .await;
}

/// A database outage makes the worker unready, and its end ready again.
#[tokio::test]
async fn readyz_says_unready_while_the_database_is_down() {
    let test_db = TestDb::new(Backend::Postgres).await;
    let proxy = crate::support::Proxy::start_to(&test_db.url, None).await;
    let db = txq::Db::connect(&proxy.url(), &txq::db::PoolOptions::default())
        .await
        .expect("connect through the proxy");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let mut worker = RunningWorker::start(
        Worker::builder(config(&proxy.url(), &requests, &replies, 1))
            .handler("held", Held(Arc::new(Semaphore::new(1))))
            .database(db.clone()),
    )
    .await;
    let (port, stop, server) = serve(worker.health.clone(), db).await;
    readyz_until(&mut worker, port, 200, "ready").await;
    proxy.down();
    readyz_until(&mut worker, port, 503, "database").await;
    let (status, _) = http_get(port, "/healthz").await.expect("/healthz");
    assert_eq!(status, 200, "alive all the same");
    proxy.up();
    readyz_until(&mut worker, port, 200, "ready").await;
    stop.cancel();
    server.await.expect("server task");
    worker.stop().await.expect("clean stop");
}

/// During a drain the worker takes no new work: unready, while its job finishes.
#[tokio::test]
async fn readyz_says_unready_during_a_drain() {
    let test_db = TestDb::new(Backend::Postgres).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let gate = Arc::new(Semaphore::new(0));
    let mut worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 1))
            .handler("held", Held(gate.clone()))
            .database(test_db.db.clone()),
    )
    .await;
    let (port, stop, server) = serve(worker.health.clone(), test_db.db.clone()).await;
    client
        .publish(&requests, &Request::json("held", json!({})))
        .await;
    let db = test_db.db.clone();
    worker
        .eventually("the job to hold its connection", || async {
            let (size, idle) = db.pool_state();
            (size as usize > idle).then_some(())
        })
        .await;
    readyz_until(&mut worker, port, 200, "ready").await;
    worker.begin_stop();
    readyz_until(&mut worker, port, 503, "no consumer").await;
    assert_eq!(client.depth(&replies).await, 0, "the job is still held");
    gate.add_permits(1);
    let reply = client.replies(&replies, 1).await.remove(0);
    assert_eq!(reply.status(), "ok", "the job in flight finished");
    worker.stop().await.expect("clean stop");
    stop.cancel();
    server.await.expect("server task");
}
