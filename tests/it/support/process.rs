//! Workers: in this process, or as child processes (the `txq` binary, the bank
//! example), with their HTTP port, and waits that fail as soon as the worker died.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use txq::config::SecretUrl;
use txq::{Config, WorkerBuilder, WorkerError};

use super::services::amqp_url;
use super::{REPLY_DEADLINE, TEST_DELAYS};

/// A config for a test worker on `queue`, replying by default to `reply_queue`.
pub fn config(db_url: &str, queue: &str, reply_queue: &str, concurrency: u16) -> Config {
    Config {
        amqp_url: SecretUrl::new(amqp_url()),
        database_url: SecretUrl::new(db_url),
        queue: queue.to_owned(),
        reply_queue: reply_queue.to_owned(),
        concurrency: concurrency.try_into().expect("a concurrency of at least 1"),
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

    /// Starts a stop (the first SIGTERM of a process) without waiting for it.
    pub fn begin_stop(&self) {
        self.token.cancel();
    }

    /// Stops it and returns how its run ended.
    pub async fn stop(self) -> Result<(), WorkerError> {
        self.token.cancel();
        self.handle.await.expect("worker task panicked")
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

/// The `txq` binary without the test environment's `TXQ_*` settings (but
/// `TXQ_TEST_*`): each test sets what it means.
pub fn txq_command() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_txq"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("TXQ_") && !name.starts_with("TXQ_TEST_") {
            command.env_remove(name);
        }
    }
    command
}

/// A worker that can die under a test: waits on it fail at once when it did,
/// instead of timing out minutes later.
pub trait Alive {
    /// Why it is no longer running, if it is not.
    fn dead(&mut self) -> Option<String>;

    /// [`super::eventually`], failing as soon as this worker died.
    async fn eventually<T, F, Fut>(&mut self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        super::poll(what, check, || self.dead()).await
    }
}

/// Watches nothing: for waits with no worker to watch.
pub struct NoWorker;

impl Alive for NoWorker {
    fn dead(&mut self) -> Option<String> {
        None
    }
}

impl Alive for RunningWorker {
    fn dead(&mut self) -> Option<String> {
        self.handle
            .is_finished()
            .then(|| "the worker's task ended".to_owned())
    }
}

impl Alive for tokio::process::Child {
    fn dead(&mut self) -> Option<String> {
        match self.try_wait() {
            Ok(Some(status)) => Some(format!("the worker process exited ({status})")),
            Ok(None) => None,
            Err(e) => Some(format!("the worker process cannot be waited for: {e}")),
        }
    }
}

/// The `RUST_LOG` of child processes: the test run's, or `warn`.
fn rust_log() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// The one way tests run the `txq` binary: a command with none of the test
/// environment's `TXQ_*` settings (but `TXQ_TEST_*`), stopped when dropped.
pub struct Txq {
    command: tokio::process::Command,
    /// Its `RUST_LOG`.
    log: String,
}

/// How a run of `txq` ended.
#[derive(Debug)]
pub struct TxqOutput {
    /// `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Txq {
    /// `txq <args>`.
    pub fn new<I, S>(args: I) -> Txq
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = txq_command();
        let log = rust_log();
        command
            .args(args)
            .env("RUST_LOG", &log)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        Txq { command, log }
    }

    /// `txq run` on `queue`, replying by default to `reply_queue`, with the test
    /// delays, and its HTTP port on a port the system picks
    /// ([`TxqProcess::http_port`] learns which).
    pub fn run(db_url: &str, queue: &str, reply_queue: &str) -> Txq {
        let delays: Vec<String> = TEST_DELAYS
            .iter()
            .map(|d| format!("\"{}ms\"", d.as_millis()))
            .collect();
        Txq::new(["run"])
            .env("TXQ_METRICS_ADDR", "127.0.0.1:0")
            .env("TXQ_AMQP_URL", amqp_url())
            .env("TXQ_DATABASE_URL", db_url)
            .env("TXQ_QUEUE", queue)
            .env("TXQ_REPLY_QUEUE", reply_queue)
            .env("TXQ_RETRY__DELAYS", format!("[{}]", delays.join(",")))
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Txq {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Txq
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(mut self, name: &str, value: impl AsRef<std::ffi::OsStr>) -> Txq {
        if name == "RUST_LOG" {
            self.log = value.as_ref().to_string_lossy().into_owned();
        }
        self.command.env(name, value);
        self
    }

    /// Runs it to the end (a one-shot command).
    pub async fn output(mut self) -> TxqOutput {
        let out = self.command.output().await.expect("running txq");
        TxqOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts it (a worker). Its log (JSON lines) is kept, and shown in the test's
    /// output.
    pub fn spawn(mut self) -> TxqProcess {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = self
            .command
            .args(["--log-format", "json"])
            // The line saying where the HTTP port is bound is at info.
            .env("RUST_LOG", format!("{},txq=info", self.log))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning txq");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, lines) = tokio::sync::watch::channel(0usize);
        let sink = log.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("txq: {line}");
                let n = {
                    let mut log = sink.lock().expect("log");
                    log.push(line);
                    log.len()
                };
                let _ = tx.send(n);
            }
        });
        TxqProcess {
            child,
            log,
            lines,
            port: None,
        }
    }
}

/// A running `txq` process.
pub struct TxqProcess {
    pub child: tokio::process::Child,
    log: Arc<std::sync::Mutex<Vec<String>>>,
    lines: tokio::sync::watch::Receiver<usize>,
    port: Option<u16>,
}

impl TxqProcess {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`).
    pub async fn signal(&self, signal: &str) {
        let sent = tokio::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .await
            .expect("kill");
        assert!(sent.success(), "kill -{signal}");
    }

    /// Waits for it to exit, at most `limit`; its exit code (`None`: a signal).
    pub async fn exit_within(&mut self, limit: Duration) -> Option<i32> {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("txq did not exit within {limit:?}"))
            .expect("wait");
        status.code()
    }

    /// Waits for a log line (as JSON) that `wanted` accepts; fails at once if the
    /// process exits first.
    pub async fn log_line(
        &mut self,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut seen = 0;
        let deadline = tokio::time::Instant::now() + REPLY_DEADLINE;
        loop {
            let found = {
                let log = self.log.lock().expect("log");
                let fresh = log[seen..].iter();
                seen = log.len();
                fresh
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| wanted(v))
            };
            if let Some(line) = found {
                return line;
            }
            tokio::select! {
                changed = self.lines.changed() => {
                    if changed.is_err() {
                        // stderr closed: the process is ending.
                        let status = self.child.wait().await.expect("wait");
                        panic!("txq exited ({status}) before logging {what}");
                    }
                }
                status = self.child.wait() => {
                    // Lines logged just before the exit may still be in the pipe.
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.lines.changed()).await;
                    if let Some(line) = self.log.lock().expect("log")[seen..]
                        .iter()
                        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                        .find(|v| wanted(v))
                    {
                        return line;
                    }
                    panic!("txq exited ({}) before logging {what}", status.expect("wait"));
                }
                _ = tokio::time::sleep_until(deadline) => {
                    panic!("txq did not log {what} within {REPLY_DEADLINE:?}");
                }
            }
        }
    }

    /// Its whole log, once it has exited and its stderr is closed.
    pub async fn final_log(&mut self) -> Vec<String> {
        self.child.wait().await.expect("wait");
        let closed = async { while self.lines.changed().await.is_ok() {} };
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("txq's stderr closes when it exits");
        self.log.lock().expect("log").clone()
    }

    /// Waits for a log line whose message contains `text`.
    pub async fn logged(&mut self, text: &str) -> serde_json::Value {
        self.log_line(&format!("{text:?}"), |v| {
            v["message"].as_str().is_some_and(|m| m.contains(text))
        })
        .await
    }

    /// The port its `/metrics`, `/healthz` and `/readyz` are served on, from its
    /// log.
    pub async fn http_port(&mut self) -> u16 {
        if let Some(port) = self.port {
            return port;
        }
        let line = self.logged("serving /metrics").await;
        let addr: std::net::SocketAddr = line["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line}"));
        self.port = Some(addr.port());
        addr.port()
    }

    /// `GET path` on its port; fails at once if it exited.
    pub async fn get(&mut self, path: &str) -> (u16, String) {
        let port = self.http_port().await;
        match http_get(port, path).await {
            Some(answer) => answer,
            None => match self.dead() {
                Some(why) => panic!("{why} before GET {path}"),
                None => panic!("GET {path} got no answer"),
            },
        }
    }
}

impl Alive for TxqProcess {
    fn dead(&mut self) -> Option<String> {
        let why = self.child.dead()?;
        let log = self.log.lock().expect("log");
        let tail = log[log.len().saturating_sub(20)..].join("\n");
        Some(format!("{why}; the end of its log:\n{tail}"))
    }
}
