//! Test harness: real RabbitMQ and databases, unique names per test, and cleanup
//! that runs even when a test fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use txq::config::SecretUrl;
use txq::db::PoolOptions;
use txq::{Backend, Config, Db, WorkerBuilder, WorkerError};

/// Delayed-retry schedule of test workers: short, so retry tests are quick.
pub const TEST_DELAYS: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(300)];

/// How long a test waits for replies before it fails: a guard against a hang, not
/// a measurement.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(120);

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

pub fn amqp_url() -> String {
    env_or("TXQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

pub fn mysql_url() -> String {
    env_or("TXQ_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
}

pub fn pg_url() -> String {
    env_or("TXQ_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/test")
}

fn service_down(service: &str, var: &str, url: &str, error: impl std::fmt::Display) -> ! {
    panic!(
        "{service} is not reachable at {} ({error}). Start it with `bash ../shared/services.sh` \
         (or `docker compose up -d`), or point {var} at a running one.",
        txq::config::redact_url(url)
    )
}

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    format!(
        "txq-test-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub async fn broker() -> Connection {
    let url = amqp_url();
    match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => service_down("RabbitMQ", "TXQ_TEST_AMQP_URL", &url, e),
    }
}

/// A database of its own for one test: a fresh database on MariaDB/PostgreSQL, a
/// temporary file on SQLite. Dropped with the test, pass or fail.
pub struct TestDb {
    pub db: Db,
    pub url: String,
    cleanup: Option<Cleanup>,
}

impl TestDb {
    /// Kills every server connection to this test's database (MariaDB `KILL`,
    /// PostgreSQL `pg_terminate_backend`); returns how many.
    pub async fn kill_connections(&self) -> usize {
        let Some(Cleanup::Server { admin_url, name }) = &self.cleanup else {
            panic!("only server databases have connections to kill");
        };
        let admin = Db::connect(admin_url, &small_pool())
            .await
            .expect("admin connection");
        let killed = match &admin {
            Db::MySql(pool) => {
                let ids: Vec<i64> = txq::sqlx::query_scalar(
                    "SELECT id FROM information_schema.processlist WHERE db = ? AND id <> CONNECTION_ID()",
                )
                .bind(name.as_str())
                .fetch_all(pool)
                .await
                .expect("processlist");
                for id in &ids {
                    // The connection may have gone meanwhile.
                    let _ = txq::sqlx::query(txq::sqlx::AssertSqlSafe(format!("KILL {id}")))
                        .execute(pool)
                        .await;
                }
                ids.len()
            }
            Db::Postgres(pool) => {
                let killed: Vec<bool> = txq::sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(name.as_str())
                .fetch_all(pool)
                .await
                .expect("pg_stat_activity");
                killed.len()
            }
            Db::Sqlite(_) => 0,
        };
        admin.close().await;
        killed
    }
}

enum Cleanup {
    Server { admin_url: String, name: String },
    File(std::path::PathBuf),
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        Self::with_pool(backend, 32).await
    }

    pub async fn with_pool(backend: Backend, max_connections: u32) -> TestDb {
        let name = unique("db").replace('-', "_");
        let (url, cleanup) = match backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir().join(format!("{name}.db"));
                (format!("sqlite://{}", path.display()), Cleanup::File(path))
            }
            Backend::MySql | Backend::Postgres => {
                let (admin_url, service, var) = match backend {
                    Backend::MySql => (mysql_url(), "MariaDB", "TXQ_TEST_MYSQL_URL"),
                    _ => (pg_url(), "PostgreSQL", "TXQ_TEST_PG_URL"),
                };
                let admin = Db::connect(&admin_url, &small_pool())
                    .await
                    .unwrap_or_else(|e| service_down(service, var, &admin_url, e));
                exec(&admin, &format!("CREATE DATABASE {name}")).await;
                admin.close().await;
                let mut url = url::Url::parse(&admin_url).expect("test database URL");
                url.set_path(&name);
                (url.to_string(), Cleanup::Server { admin_url, name })
            }
        };
        let options = PoolOptions {
            max_connections,
            ..PoolOptions::default()
        };
        let db = Db::connect(&url, &options)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test database {url}: {e}"));
        TestDb {
            db,
            url,
            cleanup: Some(cleanup),
        }
    }
}

fn small_pool() -> PoolOptions {
    PoolOptions {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(10),
        ..PoolOptions::default()
    }
}

/// Runs one statement with no parameters, outside any transaction (test set-up
/// only: CREATE DATABASE refuses to run in one).
pub async fn exec(db: &Db, sql: &str) {
    use txq::sqlx::{AssertSqlSafe, query};
    let sql = AssertSqlSafe(sql.to_owned());
    let result = match db {
        Db::MySql(pool) => query(sql).execute(pool).await.map(drop),
        Db::Postgres(pool) => query(sql).execute(pool).await.map(drop),
        Db::Sqlite(pool) => query(sql).execute(pool).await.map(drop),
    };
    result.expect("statement");
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(cleanup) = self.cleanup.take() else {
            return;
        };
        // The pool's sockets belong to the test's runtime, which is blocked here:
        // leave the pool alone (it closes when dropped) and drop the database from
        // a connection of the cleanup's own.
        on_fresh_runtime(async move {
            match cleanup {
                Cleanup::File(path) => {
                    for suffix in ["", "-wal", "-shm"] {
                        let mut p = path.clone().into_os_string();
                        p.push(suffix);
                        let _ = std::fs::remove_file(p);
                    }
                }
                Cleanup::Server { admin_url, name } => {
                    if let Ok(admin) = Db::connect(&admin_url, &small_pool()).await {
                        // A failed test may leave a worker holding transactions in
                        // this database; its runtime is blocked here, so end its
                        // sessions rather than wait for them.
                        let drop = match &admin {
                            Db::MySql(pool) => {
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
                                format!("DROP DATABASE IF EXISTS {name}")
                            }
                            _ => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                        };
                        exec(&admin, &drop).await;
                        admin.close().await;
                    }
                }
            }
        });
    }
}

/// Drop impls cannot await, and may run inside or outside a runtime.
fn on_fresh_runtime(fut: impl std::future::Future<Output = ()> + Send + 'static) {
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

/// A request to publish.
#[derive(Default, Clone)]
pub struct Request {
    pub job_type: Option<String>,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub traceparent: Option<String>,
}

impl Request {
    pub fn json(job_type: &str, body: serde_json::Value) -> Self {
        Request {
            job_type: Some(job_type.to_owned()),
            body: serde_json::to_vec(&body).expect("JSON"),
            ..Request::default()
        }
    }

    pub fn id(mut self, message_id: &str) -> Self {
        self.message_id = Some(message_id.to_owned());
        self
    }

    pub fn correlation(mut self, id: &str) -> Self {
        self.correlation_id = Some(id.to_owned());
        self
    }

    pub fn reply_to(mut self, queue: &str) -> Self {
        self.reply_to = Some(queue.to_owned());
        self
    }

    pub fn traceparent(mut self, tp: &str) -> Self {
        self.traceparent = Some(tp.to_owned());
        self
    }

    fn properties(&self) -> BasicProperties {
        let mut p = BasicProperties::default().with_delivery_mode(2);
        if let Some(tp) = &self.traceparent {
            let mut headers = FieldTable::default();
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(tp.as_str().into()),
            );
            p = p.with_headers(headers);
        }
        if let Some(t) = &self.job_type {
            p = p.with_type(t.as_str().into());
        }
        if let Some(m) = &self.message_id {
            p = p.with_message_id(m.as_str().into());
        }
        if let Some(c) = &self.correlation_id {
            p = p.with_correlation_id(c.as_str().into());
        }
        if let Some(r) = &self.reply_to {
            p = p.with_reply_to(r.as_str().into());
        }
        p
    }
}

/// A reply as the requester sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The body as JSON (`null` when it is not JSON, as for poison requests).
    pub body: serde_json::Value,
    pub data: Vec<u8>,
    pub props: BasicProperties,
}

impl From<&lapin::message::Delivery> for Reply {
    fn from(d: &lapin::message::Delivery) -> Reply {
        Reply {
            body: serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null),
            data: d.data.clone(),
            props: d.properties.clone(),
        }
    }
}

impl Reply {
    pub fn status(&self) -> &str {
        self.body["status"].as_str().unwrap_or("<no status>")
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.props.correlation_id().as_ref().map(|c| c.as_str())
    }

    pub fn header(&self, name: &str) -> Option<AMQPValue> {
        self.props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name).cloned())
    }

    pub fn header_text(&self, name: &str) -> Option<String> {
        self.header(name)
            .as_ref()
            .and_then(txq::broker::header_text)
    }
}

/// A producer/requester: declares, publishes with confirms, collects replies, and
/// deletes its queues when dropped.
pub struct Client {
    pub conn: Arc<Connection>,
    pub channel: Channel,
    queues: Vec<String>,
}

impl Client {
    pub async fn new() -> Client {
        let conn = broker().await;
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Client {
            conn: Arc::new(conn),
            channel,
            queues: Vec::new(),
        }
    }

    /// Declares a durable classic queue as the worker does, and owns it.
    pub async fn queue(&mut self, name: &str) -> String {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        self.declare(name, args).await;
        // A worker on this queue declares its dead-letter and retry queues beside it.
        self.queues.push(name.to_owned());
        self.queues.push(format!("{name}.dlq"));
        for delay in TEST_DELAYS {
            self.queues.push(txq::broker::retry_queue_name(name, delay));
        }
        name.to_owned()
    }

    /// Declares a durable queue with `args` of the test's choosing; [`Client::own`]
    /// it for cleanup.
    pub async fn declare(&self, name: &str, args: FieldTable) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .expect("queue.declare");
    }

    /// Deletes `name` with the client's other queues (for queues declared with
    /// arguments of their own).
    pub fn own(&mut self, name: &str) {
        self.queues.push(name.to_owned());
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(&self, queue: &str, request: &Request) {
        self.publish_all(queue, std::slice::from_ref(request)).await;
    }

    /// Publishes many, pipelining the confirms.
    pub async fn publish_all(&self, queue: &str, requests: &[Request]) {
        for chunk in requests.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for r in chunk {
                let confirm = self
                    .channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &r.body,
                        r.properties(),
                    )
                    .await
                    .expect("basic.publish");
                confirms.push(confirm);
            }
            for c in confirms {
                assert!(
                    c.await.expect("confirm").is_ack(),
                    "broker nacked a request"
                );
            }
        }
    }

    /// Consumes `n` replies from `queue` (acking them), failing the test after
    /// [`REPLY_DEADLINE`].
    pub async fn replies(&self, queue: &str, n: usize) -> Vec<Reply> {
        let channel = self.conn.create_channel().await.expect("channel");
        let tag = unique("collector");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume");
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + REPLY_DEADLINE;
        while out.len() < n {
            let next = tokio::time::timeout_at(deadline, consumer.next()).await;
            let delivery = match next {
                Ok(Some(Ok(d))) => d,
                Ok(other) => panic!("reply consumer ended: {other:?}"),
                Err(_) => panic!(
                    "only {} of {n} replies arrived in {REPLY_DEADLINE:?}",
                    out.len()
                ),
            };
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(Reply::from(&delivery));
        }
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .expect("basic.cancel");
        let _ = channel.close(200, "done".into()).await;
        out
    }

    /// Messages ready in `queue` (not counting unacked ones).
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.conn.create_channel().await.expect("channel");
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive queue.declare");
        let _ = channel.close(200, "done".into()).await;
        q.message_count()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        on_fresh_runtime(async move {
            let url = amqp_url();
            if let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await {
                if let Ok(ch) = conn.create_channel().await {
                    for q in queues {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "cleanup".into()).await;
            }
        });
    }
}

/// A config for a test worker on `queue`, replying by default to `reply_queue`.
pub fn config(db_url: &str, queue: &str, reply_queue: &str, concurrency: usize) -> Config {
    Config {
        amqp_url: SecretUrl::new(amqp_url()),
        database_url: SecretUrl::new(db_url),
        queue: queue.to_owned(),
        reply_queue: reply_queue.to_owned(),
        concurrency,
        retry: txq::config::RetryConfig {
            delays: TEST_DELAYS.to_vec(),
            ..txq::config::RetryConfig::default()
        },
        ..Config::default()
    }
}

/// A worker running in this process.
pub struct RunningWorker {
    token: CancellationToken,
    handle: JoinHandle<Result<(), WorkerError>>,
    pub health: txq::Health,
}

impl RunningWorker {
    pub async fn start(builder: WorkerBuilder) -> RunningWorker {
        // Worker logs in test output (RUST_LOG, default warn); captured per test.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let worker = builder.build().await.expect("worker builds");
        let health = worker.health();
        let token = CancellationToken::new();
        let handle = tokio::spawn(worker.run(token.clone().cancelled_owned()));
        RunningWorker {
            token,
            handle,
            health,
        }
    }

    /// Whether the worker's task is still running.
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Stops it and returns how its run ended.
    pub async fn stop(self) -> Result<(), WorkerError> {
        self.token.cancel();
        self.handle.await.expect("worker task panicked")
    }
}

/// Groups replies by status.
pub fn by_status(replies: &[Reply]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in replies {
        *m.entry(r.status().to_owned()).or_insert(0) += 1;
    }
    m
}

/// Collects replies in the background, so a test can act (kill, cut) while they
/// arrive and await progress instead of sleeping.
pub struct Collector {
    replies: Arc<std::sync::Mutex<Vec<Reply>>>,
    count: tokio::sync::watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Collector {
    pub async fn start(client: &Client, queue: &str) -> Collector {
        let channel = client.conn.create_channel().await.expect("channel");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                unique("collector").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume");
        let replies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, count) = tokio::sync::watch::channel(0);
        let sink = replies.clone();
        let task = tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(d)) = consumer.next().await {
                let _ = d.ack(BasicAckOptions::default()).await;
                let n = {
                    let mut all = sink.lock().expect("replies");
                    all.push(Reply::from(&d));
                    all.len()
                };
                let _ = tx.send(n);
            }
        });
        Collector {
            replies,
            count,
            task,
        }
    }

    /// Waits until `n` replies (duplicates included) have arrived.
    pub async fn wait_for(&mut self, n: usize) {
        let waited = tokio::time::timeout(REPLY_DEADLINE, self.count.wait_for(|c| *c >= n))
            .await
            .is_ok();
        let got = *self.count.borrow();
        assert!(
            waited,
            "only {got} of {n} replies arrived in {REPLY_DEADLINE:?}"
        );
    }

    /// Waits until a reply for every one of `ids` (correlation ids) has arrived.
    pub async fn wait_for_ids(&mut self, ids: &std::collections::HashSet<String>) {
        let replies = self.replies.clone();
        let all_seen = |_: &usize| {
            let got = replies.lock().expect("replies");
            let seen: std::collections::HashSet<&str> =
                got.iter().filter_map(|r| r.correlation_id()).collect();
            ids.iter().all(|id| seen.contains(id.as_str()))
        };
        let waited = tokio::time::timeout(REPLY_DEADLINE, self.count.wait_for(all_seen))
            .await
            .is_ok();
        let got = *self.count.borrow();
        assert!(
            waited,
            "replies for some ids never came ({got} replies in all)"
        );
    }

    pub fn snapshot(&self) -> Vec<Reply> {
        self.replies.lock().expect("replies").clone()
    }

    pub fn stop(self) -> Vec<Reply> {
        self.task.abort();
        self.snapshot()
    }
}

/// The bank example's binary, built by `cargo test` beside this test binary.
pub fn bank_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = debug.join("examples").join("bank");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test`",
        bin.display()
    );
    bin
}

/// Runs the bank worker as a separate process, configured by `TXQ_*` variables.
pub fn spawn_bank(config: &Config) -> tokio::process::Child {
    let delays: Vec<String> = config
        .retry
        .delays
        .iter()
        .map(|d| format!("\"{}ms\"", d.as_millis()))
        .collect();
    tokio::process::Command::new(bank_bin())
        .env("TXQ_AMQP_URL", config.amqp_url.expose())
        .env("TXQ_DATABASE_URL", config.database_url.expose())
        .env("TXQ_QUEUE", &config.queue)
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
        .kill_on_drop(true)
        .spawn()
        .expect("spawning the bank worker")
}

/// A TCP proxy whose connections can be cut, to drop one process's connection to
/// RabbitMQ or a database without touching other tests' connections. It can also
/// rewrite bytes on their way to the server.
pub struct Proxy {
    pub port: u16,
    upstream_url: String,
    cut: Arc<std::sync::Mutex<CancellationToken>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy in front of RabbitMQ.
    pub async fn start() -> Proxy {
        Self::start_to(&amqp_url(), None).await
    }

    /// A proxy in front of the server of `url` (any scheme with a host and port).
    /// With `rewrite = (from, to)`, each `from` in what the client sends becomes
    /// `to` (same length, so AMQP frame sizes hold): a way to send bytes no client
    /// library will encode, such as a short string that is not UTF-8.
    pub async fn start_to(url: &str, rewrite: Option<(Vec<u8>, Vec<u8>)>) -> Proxy {
        let target = url::Url::parse(url).expect("server URL");
        let upstream = format!(
            "{}:{}",
            target.host_str().unwrap_or("127.0.0.1"),
            target.port_or_known_default().unwrap_or(5672)
        );
        if let Some((from, to)) = &rewrite {
            assert_eq!(from.len(), to.len(), "a rewrite keeps the length");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let current = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let token = current.lock().expect("token").clone();
                let upstream = upstream.clone();
                let rewrite = rewrite.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = pipe(inbound, outbound, rewrite) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            upstream_url: url.to_owned(),
            cut,
            task,
        }
    }

    /// The server's URL through this proxy.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&self.upstream_url).expect("server URL");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(self.port)).expect("port");
        url.to_string()
    }

    /// Drops every connection through the proxy; new ones are accepted.
    pub fn cut(&self) {
        let mut token = self.cut.lock().expect("token");
        token.cancel();
        *token = CancellationToken::new();
    }
}

/// Copies both ways until either side closes, rewriting client-to-server bytes.
async fn pipe(
    mut client: tokio::net::TcpStream,
    mut server: tokio::net::TcpStream,
    rewrite: Option<(Vec<u8>, Vec<u8>)>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Some((from, to)) = rewrite else {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            let mut i = 0;
            while i + from.len() <= chunk.len() {
                if chunk[i..].starts_with(&from) {
                    chunk[i..i + from.len()].copy_from_slice(&to);
                    i += from.len();
                } else {
                    i += 1;
                }
            }
            if server_write.write_all(chunk).await.is_err() {
                break;
            }
        }
    };
    let down = tokio::io::copy(&mut server_read, &mut client_write);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// A port that accepts TCP connections and never answers: a broker that hangs.
pub struct Blackhole {
    pub port: u16,
    task: JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        Blackhole { port, task }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `rabbitmqctl` against the test broker's node; panics with its output on failure.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("running rabbitmqctl {args:?}: {e} (is rabbitmq-server installed?)")
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A RabbitMQ user of the test's own, with full rights on `/`; deleted on drop.
pub struct RabbitUser {
    pub name: String,
    pub password: String,
}

impl RabbitUser {
    pub async fn create() -> RabbitUser {
        let name = unique("user");
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", &name, &password]).await;
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]).await;
        RabbitUser { name, password }
    }

    /// The test broker's URL, logged in as this user.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).expect("AMQP URL");
        url.set_username(&self.name).expect("user");
        url.set_password(Some(&self.password)).expect("password");
        url.to_string()
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let name = self.name.clone();
        on_fresh_runtime(async move {
            let _ = tokio::process::Command::new("rabbitmqctl")
                .args(["delete_user", &name])
                .output()
                .await;
        });
    }
}

/// Polls `check` until it returns `Some`, failing the test with `what` after
/// [`REPLY_DEADLINE`]. For conditions with no event to await (a queue's depth, a
/// row in another database session).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + REPLY_DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {REPLY_DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Random transfers between `accounts` accounts, each with its own message_id
/// and correlation_id (`c-<i>`), replying to `replies`.
pub fn transfers(n: usize, accounts: i64, replies: &str) -> Vec<Request> {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..n)
        .map(|i| {
            let from = rng.random_range(1..=accounts);
            let to = loop {
                let to = rng.random_range(1..=accounts);
                if to != from {
                    break to;
                }
            };
            Request::json(
                "transfer",
                serde_json::json!({"from": from, "to": to, "amount": rng.random_range(1..=100)}),
            )
            .id(&format!("m-{i}-{}", unique("x")))
            .correlation(&format!("c-{i}"))
            .reply_to(replies)
        })
        .collect()
}

pub fn correlation_ids(n: usize) -> std::collections::HashSet<String> {
    (0..n).map(|i| format!("c-{i}")).collect()
}

/// The set-up most tests share: a database with the bank tables and `accounts`
/// accounts, a client, and a request and a reply queue of their own.
pub async fn bank_env(backend: Backend, accounts: i64) -> (TestDb, Client, String, String) {
    let test_db = TestDb::new(backend).await;
    crate::bank::setup(&test_db.db, accounts)
        .await
        .expect("bank schema");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    (test_db, client, requests, replies)
}

/// A free local port for a child process to bind (released before it starts; the
/// OS does not hand it out again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

/// `GET path` on `port`: (status, body); `None` while nothing listens.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}
