//! Shutdown while a memory alarm blocks publishers (issue 11 §6): a broker in an
//! alarm stops reading from a publishing connection, so nothing the worker sends on
//! it (the reply, the consumer's cancel, the close) is ever answered. The worker
//! must still exit within `shutdown_grace` and a few seconds of SIGTERM.
//!
//! A memory alarm blocks publishers cluster-wide, so these tests run on the test
//! cluster, never on the main broker the other suites share.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use txq::config::RetryConfig;

use crate::bank;
use crate::support::{
    BankConfig, BankWorker, Collector, NODES, Node, Queues, TestDb, bank_bin, ctl, ctl_blocking,
    ctl_ok, eventually, publish_confirmed, require_cluster, transfers, unique,
};

const GRACE: Duration = Duration::from_secs(2);
/// `shutdown_grace` plus a few seconds.
const BOUND: Duration = Duration::from_secs(10);
const DELAYS: [Duration; 1] = [Duration::from_millis(200)];
const ACCOUNTS: i64 = 10;

/// Sets a node's memory high watermark so low that the memory alarm goes off, and
/// puts it back to RabbitMQ's default 0.4 when dropped, pass or fail.
struct MemoryAlarm(&'static str);

impl MemoryAlarm {
    async fn raise(node: Node) -> MemoryAlarm {
        let guard = MemoryAlarm(node.name);
        ctl_ok(node.name, &["set_vm_memory_high_watermark", "0.0000001"]).await;
        eventually(
            &format!("the memory alarm on {}", node.name),
            Duration::from_secs(30),
            || async { alarm_on(node.name).await },
        )
        .await;
        guard
    }
}

async fn alarm_on(node: &str) -> bool {
    ctl(node, &["eval", "rabbit_alarm:get_alarms()."])
        .await
        .is_ok_and(|alarms| alarms.contains("memory"))
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let node = self.0;
        if let Err(e) = ctl_blocking(node, &["set_vm_memory_high_watermark", "0.4"]) {
            eprintln!(
                "COULD NOT RESTORE the memory watermark of {node}: {e}; \
                 run `rabbitmqctl -n {node} set_vm_memory_high_watermark 0.4` \
                 (or `bash scripts/cluster.sh down; bash scripts/cluster.sh up`)"
            );
            return;
        }
        // Until the alarm clears, every publisher of the cluster stays blocked.
        for _ in 0..150 {
            match ctl_blocking(node, &["eval", "rabbit_alarm:get_alarms()."]) {
                Ok(alarms) if !alarms.contains("memory") => return,
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        eprintln!("the memory alarm of {node} did not clear within 30 s");
    }
}

/// Whether a connection of the cluster is blocked (it published during the alarm).
async fn blocked_connections(node: &str) -> usize {
    ctl(node, &["list_connections", "state", "--formatter", "json"])
        .await
        .ok()
        .and_then(|out| serde_json::from_str::<Vec<serde_json::Value>>(&out).ok())
        .map_or(0, |rows| {
            rows.iter().filter(|r| r["state"] == "blocked").count()
        })
}

/// Transactions of the test's database waiting for a row lock.
async fn lock_waits(test_db: &TestDb) -> i64 {
    let db_name = test_db
        .url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    txq::sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.innodb_trx t
         JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id
         WHERE t.trx_state = 'LOCK WAIT' AND p.db = ?",
    )
    .bind(db_name)
    .fetch_one(test_db.pool())
    .await
    .expect("innodb_trx")
}

async fn transfers_applied(test_db: &TestDb) -> i64 {
    txq::sqlx::query_scalar("SELECT COUNT(*) FROM transfers")
        .fetch_one(test_db.pool())
        .await
        .expect("transfers")
}

/// A bank worker on one node of the cluster, its queues and database, and a
/// collector of its replies; the worker has answered one request (it consumes).
struct Setup {
    test_db: TestDb,
    _queues: Queues,
    queue: String,
    config: BankConfig,
    collector: Collector,
    worker: BankWorker,
    conn: Connection,
    node: Node,
}

async fn consuming_worker() -> Setup {
    require_cluster().await;
    bank_bin();
    let node = NODES[1];
    let test_db = TestDb::new().await;
    bank::setup(&test_db.db, ACCOUNTS)
        .await
        .expect("bank schema");
    let queue = unique("requests");
    let replies = unique("replies");
    let mut queues = Queues::default();
    queues.worker(&queue, &DELAYS);
    queues.0.push(replies.clone());
    let config = BankConfig {
        amqp_url: node.url(),
        database_url: test_db.url.clone(),
        queue: queue.clone(),
        queue_type: "classic",
        reply_queue: replies.clone(),
        concurrency: 4,
        retry_delays: DELAYS.to_vec(),
        shutdown_grace: GRACE,
    };
    let conn = Connection::connect(&node.url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", node.name));
    let topology = txq::broker::Topology::from_config(&txq::Config {
        queue: queue.clone(),
        reply_queue: replies.clone(),
        retry: RetryConfig {
            delays: DELAYS.to_vec(),
            ..RetryConfig::default()
        },
        ..txq::Config::default()
    });
    let channel = conn.create_channel().await.expect("channel");
    txq::broker::declare(&channel, &topology)
        .await
        .expect("declaring the worker's queues");
    let _ = channel.close(200, "declared".into()).await;
    let mut collector = Collector::start(&replies, 1);
    let worker = BankWorker::spawn("bank", &config);
    let (_, warm_up) = transfers(1, ACCOUNTS, None).remove(0);
    publish_confirmed(&conn, &queue, &[warm_up]).await;
    collector.wait_answered(1, Duration::from_secs(60)).await;
    Setup {
        test_db,
        _queues: queues,
        queue,
        config,
        collector,
        worker,
        conn,
        node,
    }
}

/// SIGTERM, and the bound on the exit (waiting a while longer, to say how long it
/// took when it is too long).
async fn assert_exits_in_time(worker: &mut BankWorker, situation: &str) {
    let (took, status) = worker.terminate(BOUND + Duration::from_secs(20)).await;
    eprintln!("{situation}: SIGTERM to exit {took:?} (bound {BOUND:?}), status {status:?}");
    let status = status.unwrap_or_else(|| {
        panic!(
            "{situation}: the worker did not exit within {:?} of SIGTERM (shutdown_grace {GRACE:?}; \
             bound {BOUND:?})",
            BOUND + Duration::from_secs(20)
        )
    });
    assert!(
        took <= BOUND,
        "{situation}: the worker took {took:?} to exit after SIGTERM (shutdown_grace {GRACE:?}), \
         more than {BOUND:?}; status {status}"
    );
}

#[tokio::test]
#[ignore = "needs a 3-node cluster: bash scripts/cluster.sh up; CI runs them as their own step"]
async fn sigterm_during_a_memory_alarm_exits_in_time_when_idle() {
    let mut s = consuming_worker().await;
    let alarm = MemoryAlarm::raise(s.node).await;
    assert_exits_in_time(&mut s.worker, "idle worker, memory alarm").await;
    drop(alarm);
    assert_eq!(transfers_applied(&s.test_db).await, 1);
    let _ = s.conn.close(200, "done".into()).await;
}

#[tokio::test]
#[ignore = "needs a 3-node cluster: bash scripts/cluster.sh up; CI runs them as their own step"]
async fn sigterm_during_a_memory_alarm_exits_in_time_with_a_reply_blocked() {
    let mut s = consuming_worker().await;
    // A job in flight: a transfer from account 1 waits for the row lock the test
    // holds, inside its transaction.
    let mut lock = s.test_db.pool().begin().await.expect("begin");
    let _: (i64,) = txq::sqlx::query_as("SELECT balance FROM accounts WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut *lock)
        .await
        .expect("lock account 1");
    let (_, mut stuck) = transfers(1, ACCOUNTS, None).remove(0);
    stuck.body =
        serde_json::to_vec(&serde_json::json!({"from": 1, "to": 2, "amount": 5})).expect("JSON");
    stuck.correlation_id = "stuck".into();
    publish_confirmed(&s.conn, &s.queue, std::slice::from_ref(&stuck)).await;
    eventually(
        "the transfer waiting for the row lock",
        Duration::from_secs(30),
        || async { lock_waits(&s.test_db).await > 0 },
    )
    .await;

    // Publishers blocked, then the job goes on: it commits, and its reply is
    // published into a connection the broker no longer reads.
    let alarm = MemoryAlarm::raise(s.node).await;
    lock.rollback().await.expect("release the lock");
    eventually(
        "the transfer committed",
        Duration::from_secs(30),
        || async { transfers_applied(&s.test_db).await == 2 },
    )
    .await;
    eventually(
        "the worker's connection blocked by its reply",
        Duration::from_secs(30),
        || async { blocked_connections(s.node.name).await > 0 },
    )
    .await;
    assert_exits_in_time(&mut s.worker, "reply blocked, memory alarm").await;

    // Once the alarm is over, the request is answered, and applied once only.
    drop(alarm);
    let next = BankWorker::spawn("bank-after", &s.config);
    s.collector.wait_answered(2, Duration::from_secs(60)).await;
    // The blocked reply may have reached the broker from the first worker's socket
    // buffer once the alarm cleared: wait for the new worker itself to consume
    // before signalling it, or the signal could come before its handler.
    let channel = s.conn.create_channel().await.expect("channel");
    eventually("the new worker to consume", Duration::from_secs(60), || {
        let channel = channel.clone();
        let queue = s.queue.clone();
        async move {
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.as_str().into(), passive, Default::default())
                .await
                .is_ok_and(|q| q.consumer_count() >= 1)
        }
    })
    .await;
    let got = s.collector.snapshot();
    assert!(
        got["stuck"].iter().all(|r| r.status() == "ok"),
        "{:?}",
        got["stuck"]
    );
    assert_eq!(
        transfers_applied(&s.test_db).await,
        2,
        "the blocked job applied once"
    );
    let sum: i64 = txq::sqlx::query_scalar("SELECT CAST(SUM(balance) AS SIGNED) FROM accounts")
        .fetch_one(s.test_db.pool())
        .await
        .expect("sum");
    assert_eq!(sum, ACCOUNTS * bank::INITIAL_BALANCE);
    let mut next = next;
    let (_, status) = next.terminate(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let _ = s.conn.close(200, "done".into()).await;
}
