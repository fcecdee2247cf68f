//! Harness of the cluster tests: the three nodes of `scripts/cluster.sh`, rabbitmqctl,
//! a MariaDB database of the test's own, bank worker processes, and a publisher and
//! a reply collector that fail over between nodes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use txq::Db;
use txq::db::PoolOptions;

/// The cluster's nodes, in `scripts/cluster.sh`'s order.
pub const NODES: [Node; 3] = [
    Node {
        name: "txq1@localhost",
        port: 5681,
    },
    Node {
        name: "txq2@localhost",
        port: 5682,
    },
    Node {
        name: "txq3@localhost",
        port: 5683,
    },
];

const START_HINT: &str = "start it with `bash scripts/cluster.sh up`";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    pub name: &'static str,
    pub port: u16,
}

impl Node {
    pub fn url(self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// The node list a worker is given: all three, starting with `first` (the worker
/// connects to the first that answers and fails over to the next).
pub fn urls_from(first: usize) -> String {
    (0..NODES.len())
        .map(|i| NODES[(first + i) % NODES.len()].url())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    format!(
        "txq-cluster-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Polls `check` every 200 ms until it holds; fails the test after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `rabbitmqctl -q -n <node> args…`: its standard output, or what went wrong.
pub async fn ctl(node: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", node])
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("rabbitmqctl: {e} (the cluster tests need RabbitMQ's CLI, run as root)")
        });
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "rabbitmqctl -n {node} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// `rabbitmqctl` that must succeed.
pub async fn ctl_ok(node: &str, args: &[&str]) -> String {
    ctl(node, args).await.unwrap_or_else(|e| panic!("{e}"))
}

/// The same, without a runtime (drop guards).
pub fn ctl_blocking(node: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", node])
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// `bash scripts/cluster.sh <command>`; panics with its output when it fails.
pub async fn cluster_sh(command: &str) {
    let script = repo_root().join("scripts/cluster.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(command)
        .output()
        .await
        .unwrap_or_else(|e| panic!("bash {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "bash scripts/cluster.sh {command} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails the test, naming what is down and how to start it, unless the three nodes
/// accept AMQP connections and form one cluster.
pub async fn require_cluster() {
    for node in NODES {
        match Connection::connect(&node.url(), ConnectionProperties::default()).await {
            Ok(conn) => {
                let _ = conn.close(200, "probe".into()).await;
            }
            Err(e) => panic!(
                "RabbitMQ cluster node {} is down (no AMQP on 127.0.0.1:{}: {e}); {START_HINT}",
                node.name, node.port
            ),
        }
    }
    let running = ctl(
        NODES[0].name,
        &["eval", "lists:sort(rabbit_mnesia:cluster_nodes(running))."],
    )
    .await
    .unwrap_or_else(|e| panic!("RabbitMQ cluster: {e}; {START_HINT}"));
    for node in NODES {
        assert!(
            running.contains(node.name),
            "RabbitMQ cluster: {} is not running in {}'s cluster (running: {running}); {START_HINT}",
            node.name,
            NODES[0].name
        );
    }
}

/// One connection to the first node that answers, trying them from `first` on.
pub async fn connect_any(first: usize) -> Option<(Connection, usize)> {
    for i in 0..NODES.len() {
        let index = (first + i) % NODES.len();
        let url = NODES[index].url();
        let connect = Connection::connect(&url, ConnectionProperties::default());
        if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(10), connect).await {
            return Some((conn, index));
        }
    }
    None
}

/// A quorum queue's figures as `rabbitmqctl list_queues` gives them.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    pub leader: String,
    pub members: Vec<String>,
    pub online: Vec<String>,
    pub messages: u64,
}

/// The figures of `queue`, asked of the first node that answers.
pub async fn queue_info(queue: &str) -> Option<QueueInfo> {
    for node in NODES {
        let Ok(out) = ctl(
            node.name,
            &[
                "list_queues",
                "name",
                "leader",
                "members",
                "online",
                "messages",
                "--formatter",
                "json",
            ],
        )
        .await
        else {
            continue;
        };
        let Ok(rows) = serde_json::from_str::<Vec<serde_json::Value>>(&out) else {
            continue;
        };
        let row = rows.into_iter().find(|r| r["name"] == queue)?;
        let names = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        return Some(QueueInfo {
            leader: row["leader"].as_str().unwrap_or("").to_owned(),
            members: names(&row["members"]),
            online: names(&row["online"]),
            messages: row["messages"].as_u64().unwrap_or(0),
        });
    }
    None
}

/// The AMQP connections of bank workers: (worker pid, the node it is connected to).
pub async fn worker_connections() -> Vec<(u32, Node)> {
    for node in NODES {
        let Ok(out) = ctl(
            node.name,
            &[
                "list_connections",
                "name",
                "client_properties",
                "--formatter",
                "json",
            ],
        )
        .await
        else {
            continue;
        };
        let Ok(rows) = serde_json::from_str::<Vec<serde_json::Value>>(&out) else {
            continue;
        };
        return rows
            .iter()
            .filter_map(|row| {
                // "127.0.0.1:41004 -> 127.0.0.1:5682"
                let port: u16 = row["name"].as_str()?.rsplit(':').next()?.parse().ok()?;
                let node = NODES.into_iter().find(|n| n.port == port)?;
                // [["connection_name","longstr","txq worker 0.1.0 pid 15130"], …]
                let name = row["client_properties"]
                    .as_array()?
                    .iter()
                    .find(|p| p[0] == "connection_name")?[2]
                    .as_str()?
                    .to_owned();
                let pid = name
                    .strip_prefix("txq worker ")?
                    .rsplit(' ')
                    .next()?
                    .parse()
                    .ok()?;
                Some((pid, node))
            })
            .collect();
    }
    Vec::new()
}

/// The OS pid of a node's Erlang VM.
pub async fn beam_pid(node: &str) -> u32 {
    let out = ctl_ok(node, &["eval", "os:getpid()."]).await;
    out.trim_matches('"')
        .parse()
        .unwrap_or_else(|e| panic!("pid of {node} from {out:?}: {e}"))
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Sends `signal` (`-9`, `-TERM`…) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

// ---------------------------------------------------------------- database

pub fn mysql_url() -> String {
    std::env::var("TXQ_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

fn small_pool() -> PoolOptions {
    PoolOptions {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(10),
        ..PoolOptions::default()
    }
}

async fn exec(db: &Db, sql: String) {
    let Db::MySql(pool) = db else {
        panic!("MariaDB only")
    };
    txq::sqlx::query(txq::sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .expect("statement");
}

/// A MariaDB database of the test's own, dropped with it, pass or fail.
pub struct TestDb {
    pub db: Db,
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin_url = mysql_url();
        let name = unique("db").replace('-', "_");
        let admin = Db::connect(&admin_url, &small_pool())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "MariaDB is not reachable at {} ({e}). Start it with `bash ../shared/services.sh`, \
                     or point TXQ_TEST_MYSQL_URL at a running one.",
                    txq::config::redact_url(&admin_url)
                )
            });
        exec(&admin, format!("CREATE DATABASE {name}")).await;
        admin.close().await;
        let mut url = url::Url::parse(&admin_url).expect("TXQ_TEST_MYSQL_URL");
        url.set_path(&name);
        let url = url.to_string();
        let options = PoolOptions {
            max_connections: 4,
            ..PoolOptions::default()
        };
        let db = Db::connect(&url, &options)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test database {url}: {e}"));
        TestDb {
            db,
            url,
            admin_url,
            name,
        }
    }

    pub fn pool(&self) -> &txq::sqlx::MySqlPool {
        match &self.db {
            Db::MySql(pool) => pool,
            _ => unreachable!("MariaDB only"),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        on_fresh_runtime(async move {
            let Ok(admin) = Db::connect(&admin_url, &small_pool()).await else {
                return;
            };
            if let Db::MySql(pool) = &admin {
                // A worker left behind may hold transactions here.
                let ids: Vec<i64> = txq::sqlx::query_scalar(
                    "SELECT id FROM information_schema.processlist WHERE db = ?",
                )
                .bind(name.as_str())
                .fetch_all(pool)
                .await
                .unwrap_or_default();
                for id in ids {
                    let kill = txq::sqlx::AssertSqlSafe(format!("KILL {id}"));
                    let _ = txq::sqlx::query(kill).execute(pool).await;
                }
            }
            exec(&admin, format!("DROP DATABASE IF EXISTS {name}")).await;
            admin.close().await;
        });
    }
}

/// Drop impls cannot await, and may run inside or outside a runtime.
pub fn on_fresh_runtime(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(fut);
        }
    })
    .join();
}

// ---------------------------------------------------------------- queues

/// Deletes its queues when dropped, through whichever node answers.
#[derive(Default)]
pub struct Queues(pub Vec<String>);

impl Queues {
    /// The request queue and the dead-letter and retry queues a worker declares
    /// beside it.
    pub fn worker(&mut self, queue: &str, delays: &[Duration]) {
        self.0.push(queue.to_owned());
        self.0.push(format!("{queue}.dlq"));
        for delay in delays {
            self.0.push(txq::broker::retry_queue_name(queue, *delay));
        }
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.0);
        on_fresh_runtime(async move {
            let Some((conn, _)) = connect_any(0).await else {
                return;
            };
            for q in queues {
                // A channel per delete: an error closes the channel.
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
            }
            let _ = conn.close(200, "cleanup".into()).await;
        });
    }
}

/// Declares a durable quorum queue (replicated on every node) from `conn`.
pub async fn declare_quorum(conn: &Connection, name: &str) {
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .unwrap_or_else(|e| panic!("declaring {name}: {e}"));
    let _ = ch.close(200, "declared".into()).await;
}

// ---------------------------------------------------------------- requests

/// A request to publish: its body, ids and reply queue.
#[derive(Debug, Clone)]
pub struct Request {
    pub job_type: &'static str,
    pub body: Vec<u8>,
    pub message_id: String,
    pub correlation_id: String,
    pub reply_to: Option<String>,
}

impl Request {
    fn properties(&self) -> BasicProperties {
        let mut p = BasicProperties::default()
            .with_delivery_mode(2)
            .with_type(self.job_type.into())
            .with_message_id(self.message_id.as_str().into())
            .with_correlation_id(self.correlation_id.as_str().into());
        if let Some(r) = &self.reply_to {
            p = p.with_reply_to(r.as_str().into());
        }
        p
    }
}

/// A transfer as published, to check the books against.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub from: i64,
    pub to: i64,
    pub amount: i64,
}

/// `n` random transfers between `accounts` accounts; request `i` has the
/// correlation id `c-<i>`.
pub fn transfers(n: usize, accounts: i64, reply_to: Option<&str>) -> Vec<(Transfer, Request)> {
    use rand::Rng as _;
    let mut rng = rand::rng();
    let run = unique("m");
    (0..n)
        .map(|i| {
            let from = rng.random_range(1..=accounts);
            let to = loop {
                let to = rng.random_range(1..=accounts);
                if to != from {
                    break to;
                }
            };
            let t = Transfer {
                from,
                to,
                amount: rng.random_range(1..=100),
            };
            let body = serde_json::json!({"from": t.from, "to": t.to, "amount": t.amount});
            let request = Request {
                job_type: "transfer",
                body: serde_json::to_vec(&body).expect("JSON"),
                message_id: format!("{run}-{i}"),
                correlation_id: format!("c-{i}"),
                reply_to: reply_to.map(str::to_owned),
            };
            (t, request)
        })
        .collect()
}

/// Publishes with confirms on one connection (no fail-over): the memory alarm test.
pub async fn publish_confirmed(conn: &Connection, queue: &str, requests: &[Request]) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for r in requests {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &r.body,
                r.properties(),
            )
            .await
            .expect("basic.publish");
        assert!(confirm.await.expect("confirm").is_ack(), "broker nacked");
    }
    let _ = ch.close(200, "published".into()).await;
}

/// Publishes `requests` in order in the background, as far as a budget the test
/// raises, with confirms; a batch not confirmed (its node died, a nack, no answer
/// in time) is published again through the next node. A request may so arrive
/// twice: the same message_id, which the worker's inbox answers without applying it
/// again.
pub struct Publisher {
    budget: watch::Sender<usize>,
    published: watch::Receiver<usize>,
    pub republished: Arc<Mutex<usize>>,
    task: JoinHandle<()>,
}

impl Publisher {
    pub fn start(queue: &str, requests: Vec<Request>, budget: usize) -> Publisher {
        let (budget_tx, mut budget_rx) = watch::channel(budget);
        let (published_tx, published) = watch::channel(0);
        let republished = Arc::new(Mutex::new(0));
        let again = republished.clone();
        let queue = queue.to_owned();
        let task = tokio::spawn(async move {
            let mut next = 0;
            let mut node = 0;
            while next < requests.len() {
                if budget_rx.wait_for(|b| *b > next).await.is_err() {
                    return;
                }
                let Some((conn, index)) = connect_any(node).await else {
                    // No node answers at all: try again shortly.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                node = index;
                let Ok(ch) = conn.create_channel().await else {
                    node = (node + 1) % NODES.len();
                    continue;
                };
                if ch
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .is_err()
                {
                    node = (node + 1) % NODES.len();
                    continue;
                }
                while next < requests.len() {
                    let budget = *budget_rx.borrow();
                    if budget <= next {
                        if budget_rx.wait_for(|b| *b > next).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let end = budget.min(next + 250).min(requests.len());
                    let batch = async {
                        let mut confirms = Vec::with_capacity(end - next);
                        for r in &requests[next..end] {
                            let c = ch
                                .basic_publish(
                                    "".into(),
                                    queue.as_str().into(),
                                    BasicPublishOptions::default(),
                                    &r.body,
                                    r.properties(),
                                )
                                .await
                                .map_err(|e| e.to_string())?;
                            confirms.push(c);
                        }
                        for c in confirms {
                            let confirmation = c.await.map_err(|e| e.to_string())?;
                            if !confirmation.is_ack() {
                                return Err("nack".to_owned());
                            }
                        }
                        Ok::<(), String>(())
                    };
                    match tokio::time::timeout(Duration::from_secs(30), batch).await {
                        Ok(Ok(())) => {
                            next = end;
                            let _ = published_tx.send(next);
                        }
                        Ok(Err(e)) => {
                            eprintln!(
                                "publisher: batch {next}..{end} via {} failed ({e}); again via the next node",
                                NODES[node].name
                            );
                            *again.lock().expect("count") += end - next;
                            node = (node + 1) % NODES.len();
                            // A nack comes at once while the queue elects a leader:
                            // no hot loop meanwhile.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break;
                        }
                        Err(_) => {
                            eprintln!(
                                "publisher: batch {next}..{end} via {} not confirmed in 30s; again via the next node",
                                NODES[node].name
                            );
                            *again.lock().expect("count") += end - next;
                            node = (node + 1) % NODES.len();
                            break;
                        }
                    }
                }
                let _ = conn.close(200, "published".into()).await;
            }
        });
        Publisher {
            budget: budget_tx,
            published,
            republished,
            task,
        }
    }

    /// Lets it publish the first `n` requests.
    pub fn allow(&self, n: usize) {
        let _ = self.budget.send(n);
    }

    /// Waits until the first `n` requests are confirmed.
    pub async fn wait_published(&mut self, n: usize, limit: Duration) {
        let ok = tokio::time::timeout(limit, self.published.wait_for(|p| *p >= n))
            .await
            .is_ok_and(|r| r.is_ok());
        let got = *self.published.borrow();
        assert!(ok, "only {got} of {n} requests published in {limit:?}");
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- replies

/// A reply as the requester sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub body: serde_json::Value,
    pub correlation_id: Option<String>,
    pub duplicate: bool,
}

impl Reply {
    pub fn status(&self) -> &str {
        self.body["status"].as_str().unwrap_or("<no status>")
    }
}

/// Consumes a reply queue in the background (acking), reconnecting through the
/// next node whenever its connection is lost.
pub struct Collector {
    replies: Arc<Mutex<HashMap<String, Vec<Reply>>>>,
    /// Distinct correlation ids answered.
    answered: watch::Receiver<usize>,
    pub reconnects: Arc<Mutex<usize>>,
    task: JoinHandle<()>,
}

impl Collector {
    pub fn start(queue: &str, first: usize) -> Collector {
        let replies: Arc<Mutex<HashMap<String, Vec<Reply>>>> = Arc::default();
        let (tx, answered) = watch::channel(0);
        let reconnects = Arc::new(Mutex::new(0));
        let (sink, count) = (replies.clone(), reconnects.clone());
        let queue = queue.to_owned();
        let task = tokio::spawn(async move {
            let mut node = first;
            let mut sessions = 0;
            loop {
                let Some((conn, index)) = connect_any(node).await else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                node = index;
                sessions += 1;
                if sessions > 1 {
                    *count.lock().expect("count") += 1;
                }
                let consumer = async {
                    let ch = conn.create_channel().await.ok()?;
                    ch.basic_qos(1000, BasicQosOptions::default()).await.ok()?;
                    ch.basic_consume(
                        queue.as_str().into(),
                        unique("collector").as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .ok()
                };
                if let Some(mut consumer) = consumer.await {
                    while let Some(Ok(d)) = consumer.next().await {
                        let reply = Reply {
                            body: serde_json::from_slice(&d.data)
                                .unwrap_or(serde_json::Value::Null),
                            correlation_id: d
                                .properties
                                .correlation_id()
                                .as_ref()
                                .map(|c| c.to_string()),
                            duplicate: d
                                .properties
                                .headers()
                                .as_ref()
                                .and_then(|h| h.inner().get("x-txq-duplicate").cloned())
                                .is_some_and(|v| matches!(v, AMQPValue::Boolean(true))),
                        };
                        let n = {
                            let mut all = sink.lock().expect("replies");
                            let key = reply.correlation_id.clone().unwrap_or_default();
                            all.entry(key).or_default().push(reply);
                            all.len()
                        };
                        let _ = tx.send(n);
                        if d.ack(BasicAckOptions::default()).await.is_err() {
                            break;
                        }
                    }
                }
                let _ = conn.close(200, "collector".into()).await;
                node = (node + 1) % NODES.len();
            }
        });
        Collector {
            replies,
            answered,
            reconnects,
            task,
        }
    }

    /// Distinct correlation ids answered so far.
    pub fn answered(&self) -> usize {
        *self.answered.borrow()
    }

    /// Waits until `n` distinct requests have been answered.
    pub async fn wait_answered(&mut self, n: usize, limit: Duration) {
        let ok = tokio::time::timeout(limit, self.answered.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok());
        let got = self.answered();
        assert!(ok, "only {got} of {n} requests answered in {limit:?}");
    }

    /// Every reply so far, by correlation id.
    pub fn snapshot(&self) -> HashMap<String, Vec<Reply>> {
        self.replies.lock().expect("replies").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- workers

/// The bank example's binary (`cargo test` builds it; so does `cargo build
/// --examples`). `TXQ_TEST_BANK_BIN` points at another build, an older one say.
pub fn bank_bin() -> PathBuf {
    if let Ok(path) = std::env::var("TXQ_TEST_BANK_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = profile.join("examples").join("bank");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --examples` (or the whole `cargo test`) first",
        bin.display()
    );
    bin
}

/// The settings of a bank worker process.
#[derive(Debug, Clone)]
pub struct BankConfig {
    pub amqp_url: String,
    pub database_url: String,
    pub queue: String,
    pub queue_type: &'static str,
    pub reply_queue: String,
    pub concurrency: usize,
    pub retry_delays: Vec<Duration>,
    pub shutdown_grace: Duration,
}

const SETPRIV: &str = "/usr/bin/setpriv";

/// A bank worker process; its log (stderr and stdout) goes to a file whose tail is
/// printed when the test fails.
pub struct BankWorker {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub name: String,
    log: PathBuf,
}

impl BankWorker {
    pub fn spawn(name: &str, config: &BankConfig) -> BankWorker {
        let delays: Vec<String> = config
            .retry_delays
            .iter()
            .map(|d| format!("\"{}ms\"", d.as_millis()))
            .collect();
        let log = std::env::temp_dir().join(format!("{}.log", unique(name)));
        let file = std::fs::File::create(&log).expect("worker log file");
        // Killed with the test process if that dies first (a test timed out, a
        // Ctrl-C), rather than left consuming from the cluster.
        let mut command = if std::path::Path::new(SETPRIV).exists() {
            let mut c = tokio::process::Command::new(SETPRIV);
            c.args(["--pdeathsig", "KILL", "--"]).arg(bank_bin());
            c
        } else {
            tokio::process::Command::new(bank_bin())
        };
        let child = command
            .env("TXQ_AMQP_URL", &config.amqp_url)
            .env("TXQ_DATABASE_URL", &config.database_url)
            .env("TXQ_QUEUE", &config.queue)
            .env("TXQ_QUEUE_TYPE", config.queue_type)
            .env("TXQ_REPLY_QUEUE", &config.reply_queue)
            .env("TXQ_CONCURRENCY", config.concurrency.to_string())
            .env("TXQ_RETRY__DELAYS", format!("[{}]", delays.join(",")))
            .env(
                "TXQ_SHUTDOWN_GRACE",
                format!("{}ms", config.shutdown_grace.as_millis()),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawning the bank worker");
        let pid = child.id().expect("pid");
        BankWorker {
            child,
            pid,
            name: name.to_owned(),
            log,
        }
    }

    /// Whether the process still runs (it never exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; how long it took to exit, and its exit status (`None`: not within
    /// `limit`).
    pub async fn terminate(
        &mut self,
        limit: Duration,
    ) -> (Duration, Option<std::process::ExitStatus>) {
        let started = Instant::now();
        signal(self.pid, "-TERM");
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|s| s.expect("wait"));
        (started.elapsed(), status)
    }
}

impl Drop for BankWorker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- {} (pid {}) log, last {} lines of {}:",
                self.name,
                self.pid,
                tail.len(),
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
