//! The bank benchmark workloads (docs/workloads.md), end to end, beside the limits they are judged
//! against — all in one invocation, on the same machine state:
//!
//! - `txq`: the bank example (Rust handlers) as a separate worker process;
//! - `ops`: `txq run --ops examples/bank/ops.toml` (the SQL-file path);
//! - `bare`: a straight-line lapin + sqlx loop (examples/bare.rs);
//! - `bare-inbox`: the same plus the inbox row txq writes (bare --mode inbox);
//! - `bare-contract`: bare-inbox replying as txq does (bare --reply txq);
//! - `broker`: the same messaging without a database (bare --mode broker);
//! - `db`: the same transaction on C connections without a broker (in process).
//!
//! Each run pre-loads N persistent requests with confirms, starts the worker, and
//! times from its start to the last reply; it reads the worker's CPU and peak RSS
//! and RabbitMQ's and the database's CPU from /proc, and checks the invariants.
//! With `--latency`, the throughput runs are followed by request-to-reply
//! latency runs under a fixed offered load (latency.rs).
//! Build first: `cargo build --release --bins --examples`; see BENCHMARKS.md.

#[path = "../bank/handlers.rs"]
mod handlers;
mod latency;
mod procstat;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::SeedableRng as _;
use serde::Serialize;
use txq::{Db, Handler as _, JobMeta};

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/test")]
    database_url: String,
    /// `transfer` or `noop`
    #[arg(long, default_value = "transfer")]
    workload: String,
    /// Requests pre-loaded per run
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Comma-separated: txq, txq-batch (every request a member of one batch), ops,
    /// bare, bare-inbox (bare plus the inbox row), bare-contract (bare-inbox plus
    /// txq's reply properties and mandatory flag), broker, db
    /// [default: txq,ops,bare,broker,db;
    /// with --latency: bare,txq,ops]
    #[arg(long)]
    variants: Option<String>,
    /// Pad each request body to about this many bytes
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Run txq with the inbox off
    #[arg(long)]
    no_inbox: bool,
    /// Accounts for the transfer workload
    #[arg(long, default_value_t = 1000)]
    accounts: i64,
    /// Append JSON results here
    #[arg(long)]
    json: Option<PathBuf>,
    /// A label for this configuration in the report
    #[arg(long, default_value = "")]
    label: String,
    /// After the throughput runs, measure request-to-reply latency under a fixed
    /// offered load (open loop; see latency.rs)
    #[arg(long)]
    latency: bool,
    /// Offered loads, as fractions of the maximum throughput
    #[arg(long, default_value = "0.5,0.9")]
    latency_loads: String,
    /// Whose maximum: `bare` (the same rate for every variant) or `own`
    #[arg(long, default_value = "bare", value_parser = ["bare", "own"])]
    latency_basis: String,
    /// The maximum: `sustained`, what closed-loop runs (4×C requests out, one
    /// more published per reply) answer a second while requests are being
    /// published; or `preloaded`, the throughput runs' drain rate, their publishing
    /// done beforehand
    #[arg(long, default_value = "sustained", value_parser = ["sustained", "preloaded"])]
    latency_max: String,
    /// Seconds of publishing per latency run
    #[arg(long, default_value_t = 20.0)]
    latency_seconds: f64,
    /// Seconds at the start of each latency run that are not counted
    #[arg(long, default_value_t = 2.0)]
    latency_warmup: f64,
    /// Append every measured request of the latency runs here, as CSV
    /// (variant, load, run start in Unix ms, when it was due in ms from the run's
    /// start, its latency in µs): to see whether the tail comes in bursts
    #[arg(long)]
    latency_trace: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    variant: String,
    jobs_per_sec: f64,
    worker_cpu_s_per_1k: f64,
    worker_peak_rss_mib: f64,
    broker_cpu_s_per_1k: f64,
    db_cpu_s_per_1k: f64,
    retries: u64,
    seconds: f64,
    /// CPU steal during the timed part, % of all CPUs' time (/proc/stat)
    steal_pct: f64,
}

/// Runs whose steal was above this share of the CPUs' time are marked.
const STEAL_LIMIT_PCT: f64 = 5.0;

fn steal_mark(pct: f64) -> &'static str {
    if pct > STEAL_LIMIT_PCT { " ⚠" } else { "" }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let default_variants = if args.latency {
        "bare,txq,ops"
    } else {
        "txq,ops,bare,broker,db"
    };
    let variants: Vec<String> = args
        .variants
        .as_deref()
        .unwrap_or(default_variants)
        .split(',')
        .map(str::trim)
        .map(str::to_owned)
        .collect();
    if args.latency {
        ensure!(
            !variants.iter().any(|v| v == "db"),
            "--latency: the db variant has no broker to measure"
        );
        ensure!(
            args.latency_basis == "own" || variants.iter().any(|v| v == "bare"),
            "--latency takes bare's maximum: add bare to --variants, or --latency-basis own"
        );
    }
    let mut results: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for run in 0..args.runs {
        for v in &variants {
            let r = one_run(&args, v)
                .await
                .with_context(|| format!("{v}, run {}", run + 1))?;
            eprintln!(
                "{v:>7} run {}: {:>8.0} jobs/s, worker {:.3} CPU-s/1k, {:.1} MiB, retries {}, steal {:.1}%",
                run + 1,
                r.jobs_per_sec,
                r.worker_cpu_s_per_1k,
                r.worker_peak_rss_mib,
                r.retries,
                r.steal_pct
            );
            results.entry(v.clone()).or_default().push(r);
        }
    }
    report(&args, &results)?;
    if args.latency {
        latency::run_all(&args, &variants, &results).await?;
    }
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(args: &Args, results: &BTreeMap<String, Vec<Run>>) -> anyhow::Result<()> {
    let med =
        |v: &str, f: fn(&Run) -> f64| results.get(v).map(|rs| median(rs.iter().map(f).collect()));
    println!(
        "\n{} — workload {}, {} jobs, concurrency {}, payload {} B, inbox {}, {} runs",
        if args.label.is_empty() {
            "bench"
        } else {
            &args.label
        },
        args.workload,
        args.jobs,
        args.concurrency,
        args.payload_bytes,
        if args.no_inbox { "off" } else { "on" },
        args.runs
    );
    println!(
        "\n| variant | jobs/s median (min–max) | worker CPU s/1k | worker peak RSS MiB | RabbitMQ CPU s/1k | DB CPU s/1k | retries | steal % max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (v, rs) in results {
        let js: Vec<f64> = rs.iter().map(|r| r.jobs_per_sec).collect();
        let min = js.iter().copied().fold(f64::INFINITY, f64::min);
        let max = js.iter().copied().fold(0.0, f64::max);
        let steal = rs.iter().map(|r| r.steal_pct).fold(0.0, f64::max);
        println!(
            "| {v} | {:.0} ({min:.0}–{max:.0}) | {:.3} | {:.1} | {:.3} | {:.3} | {} | {steal:.1}{} |",
            median(js.clone()),
            median(rs.iter().map(|r| r.worker_cpu_s_per_1k).collect()),
            median(rs.iter().map(|r| r.worker_peak_rss_mib).collect()),
            median(rs.iter().map(|r| r.broker_cpu_s_per_1k).collect()),
            median(rs.iter().map(|r| r.db_cpu_s_per_1k).collect()),
            rs.iter().map(|r| r.retries).max().unwrap_or(0),
            steal_mark(steal),
        );
    }
    if results
        .values()
        .flatten()
        .any(|r| r.steal_pct > STEAL_LIMIT_PCT)
    {
        println!(
            "\n⚠ CPU steal above {STEAL_LIMIT_PCT}% of the CPUs' time in a run: redo on a quieter machine."
        );
    }
    let mut ratios = serde_json::Map::new();
    for txq in ["txq", "ops"] {
        if let (Some(t), Some(b)) = (
            med(txq, |r| r.jobs_per_sec),
            med("bare", |r| r.jobs_per_sec),
        ) {
            println!("\n{txq} ÷ bare (throughput): {:.2}", t / b);
            ratios.insert(format!("{txq}_over_bare"), serde_json::json!(t / b));
        }
        if let (Some(t), Some(b)) = (
            med(txq, |r| r.worker_cpu_s_per_1k),
            med("bare", |r| r.worker_cpu_s_per_1k),
        ) {
            println!("{txq} ÷ bare (worker CPU per job): {:.2}", t / b);
            ratios.insert(format!("{txq}_cpu_over_bare"), serde_json::json!(t / b));
        }
        if let (Some(t), Some(a), Some(b)) = (
            med(txq, |r| r.jobs_per_sec),
            med("broker", |r| r.jobs_per_sec),
            med("db", |r| r.jobs_per_sec),
        ) {
            println!("{txq} ÷ min(broker-only, db-only): {:.2}", t / a.min(b));
            ratios.insert(
                format!("{txq}_over_limits"),
                serde_json::json!(t / a.min(b)),
            );
        }
    }
    if let Some(path) = &args.json {
        use std::io::Write as _;
        let line = serde_json::json!({
            "label": args.label, "workload": args.workload, "jobs": args.jobs,
            "concurrency": args.concurrency, "payload_bytes": args.payload_bytes,
            "inbox": !args.no_inbox, "runs": results, "ratios": ratios,
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let examples = exe.parent().context("no parent")?;
    let candidates = [
        examples.join(name),
        examples.parent().context("no parent")?.join(name),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("{name} is not built: cargo build --release --bins --examples"))
}

/// What every run starts from: the bank tables rebuilt, an empty inbox, and a
/// queue of its own with txq's topology (retry and dead-letter queues, replies).
struct Setup {
    db: Db,
    conn: Connection,
    channel: lapin::Channel,
    queue: String,
    replies: String,
}

async fn setup(args: &Args) -> anyhow::Result<Setup> {
    let db = Db::connect(
        &args.database_url,
        &txq::db::PoolOptions {
            max_connections: args.concurrency as u32 + 2,
            ..Default::default()
        },
    )
    .await?;
    handlers::setup(&db, args.accounts).await?;
    // The inbox left by earlier runs must not make these requests duplicates.
    let _ = db.execute_sql_file("DELETE FROM txq_inbox;").await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("bench-{}", &tag[..8]);
    let replies = format!("{queue}.replies");
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let config = txq::Config {
        queue: queue.clone(),
        reply_queue: replies.clone(),
        ..txq::Config::default()
    };
    txq::broker::declare(&channel, &txq::broker::Topology::from_config(&config)).await?;
    Ok(Setup {
        db,
        conn,
        channel,
        queue,
        replies,
    })
}

impl Setup {
    async fn close(self) {
        cleanup(&self.channel, &self.queue).await;
        let _ = self.conn.close(200, "bye".into()).await;
        self.db.close().await;
    }
}

/// Stops a worker with SIGTERM and returns the retries it reports.
async fn stop_worker(child: tokio::process::Child, pid: u32) -> anyhow::Result<u64> {
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    let out = child.wait_with_output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(stdout
        .lines()
        .find_map(|l| l.strip_prefix("txq-stats "))
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .and_then(|j| j["retries"].as_u64())
        .unwrap_or(0))
}

/// A consumer of `replies` that takes them without acks.
async fn consume_replies(
    channel: &lapin::Channel,
    replies: &str,
) -> anyhow::Result<lapin::Consumer> {
    Ok(channel
        .basic_consume(
            replies.into(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}

/// A reply's `status`: `ok`, `rejected`, `failed`, or `?`.
fn reply_status(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["status"].as_str().unwrap_or("?").to_owned()
}

async fn one_run(args: &Args, variant: &str) -> anyhow::Result<Run> {
    let s = setup(args).await?;
    if variant == "db" {
        let result = db_only(args, &s.db).await;
        s.close().await;
        return result;
    }
    // `txq-batch`: txq with every request a member of one batch (issue 16's cost).
    let batch = (variant == "txq-batch").then(|| format!("{}-batch", s.queue));
    preload(args, &s.channel, &s.queue, &s.replies, batch.as_deref()).await?;

    let services_before = procstat::services();
    let cpu_before = procstat::cpu_times();
    let started = Instant::now();
    let mut child = spawn_worker(args, variant, &s.queue, &s.replies)?;
    let pid = child.id().context("worker pid")?;
    let mut consumer = consume_replies(&s.channel, &s.replies).await?;
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut got = 0;
    let mut completion_due = batch.is_some();
    while got < args.jobs || completion_due {
        let next = tokio::time::timeout(Duration::from_secs(120), consumer.next()).await;
        let Ok(Some(Ok(d))) = next else {
            let _ = child.start_kill();
            bail!("only {got} of {} replies arrived", args.jobs);
        };
        if d.properties.kind().as_ref().map(|k| k.as_str()) == Some("txq.batch.completed") {
            let body: serde_json::Value = serde_json::from_slice(&d.data)?;
            ensure!(
                completion_due
                    && body["ok"].as_u64().unwrap_or(0) + body["rejected"].as_u64().unwrap_or(0)
                        == args.jobs as u64,
                "{variant}: an unexpected completion {body}"
            );
            completion_due = false;
            continue;
        }
        *statuses.entry(reply_status(&d.data)).or_default() += 1;
        got += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let worker = procstat::process(pid).context("reading the worker's /proc")?;
    let services_after = procstat::services();
    let steal_pct = procstat::cpu_times().steal_pct_since(&cpu_before);
    let retries = stop_worker(child, pid).await?;
    check(args, variant, &s.db, &statuses, args.jobs).await?;
    s.close().await;
    let per_1k = |s: f64| s * 1000.0 / args.jobs as f64;
    Ok(Run {
        variant: variant.to_owned(),
        jobs_per_sec: args.jobs as f64 / seconds,
        worker_cpu_s_per_1k: per_1k(worker.cpu_seconds),
        worker_peak_rss_mib: worker.peak_rss_kib as f64 / 1024.0,
        broker_cpu_s_per_1k: per_1k(services_after.broker - services_before.broker),
        db_cpu_s_per_1k: per_1k(services_after.database - services_before.database),
        retries,
        seconds,
        steal_pct,
    })
}

async fn cleanup(channel: &lapin::Channel, queue: &str) {
    let mut names = vec![
        queue.to_owned(),
        format!("{queue}.replies"),
        format!("{queue}.dlq"),
    ];
    for d in txq::config::RetryConfig::default().delays {
        names.push(txq::broker::retry_queue_name(queue, d));
    }
    for n in names {
        let _ = channel
            .queue_delete(n.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

fn request_body(args: &Args, rng: &mut impl rand::Rng) -> Vec<u8> {
    let mut v = if args.workload == "noop" {
        serde_json::json!({})
    } else {
        let from = rng.random_range(1..=args.accounts);
        let to = loop {
            let t = rng.random_range(1..=args.accounts);
            if t != from {
                break t;
            }
        };
        serde_json::json!({"from": from, "to": to, "amount": rng.random_range(1..=100)})
    };
    if args.payload_bytes > 0 {
        v["pad"] = serde_json::json!("x".repeat(args.payload_bytes));
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

async fn preload(
    args: &Args,
    channel: &lapin::Channel,
    queue: &str,
    replies: &str,
    batch: Option<&str>,
) -> anyhow::Result<()> {
    let mut rng = rand::rng();
    let mut pending = Vec::new();
    let mut headers = lapin::types::FieldTable::default();
    if let Some(id) = batch {
        use lapin::types::AMQPValue;
        headers.insert("x-txq-batch-id".into(), AMQPValue::LongString(id.into()));
        headers.insert(
            "x-txq-batch-size".into(),
            AMQPValue::LongLongInt(i64::try_from(args.jobs)?),
        );
    }
    for i in 0..args.jobs {
        let mut props = BasicProperties::default()
            .with_type(args.workload.as_str().into())
            .with_message_id(format!("{queue}-{i}").into())
            .with_reply_to(replies.into())
            .with_delivery_mode(2);
        if batch.is_some() {
            props = props.with_headers(headers.clone());
        }
        let body = request_body(args, &mut rng);
        pending.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?,
        );
        if pending.len() >= 1000 {
            for c in pending.drain(..) {
                ensure!(c.await?.is_ack(), "nacked");
            }
        }
    }
    for c in pending {
        ensure!(c.await?.is_ack(), "nacked");
    }
    Ok(())
}

fn spawn_worker(
    args: &Args,
    variant: &str,
    queue: &str,
    replies: &str,
) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = match variant {
        "txq" | "txq-batch" => wrapped(sibling("bank")?),
        "ops" => {
            let mut c = wrapped(sibling("txq")?);
            c.args(["run", "--ops", "examples/bank/ops.toml"]);
            c
        }
        "bare" | "bare-inbox" | "bare-contract" | "broker" => {
            let mut c = wrapped(sibling("bare")?);
            c.args([
                "--amqp-url",
                &args.amqp_url,
                "--database-url",
                &args.database_url,
                "--queue",
                queue,
            ]);
            c.args(["--concurrency", &args.concurrency.to_string()]);
            c.args([
                "--mode",
                match variant {
                    "bare" => "full",
                    "bare-inbox" | "bare-contract" => "inbox",
                    _ => "broker",
                },
            ]);
            if variant == "bare-contract" {
                c.args(["--reply", "txq"]);
            }
            c
        }
        other => bail!("unknown variant {other}"),
    };
    cmd.env("TXQ_AMQP_URL", &args.amqp_url)
        .env("TXQ_DATABASE_URL", &args.database_url)
        .env("TXQ_QUEUE", queue)
        .env("TXQ_REPLY_QUEUE", replies)
        .env("TXQ_CONCURRENCY", args.concurrency.to_string())
        .env("TXQ_INBOX__ENABLED", (!args.no_inbox).to_string())
        .env(
            "RUST_LOG",
            std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    Ok(cmd.spawn()?)
}

/// The worker's command; with `BENCH_WORKER_WRAP` (say `valgrind
/// --tool=callgrind`), run under that program: for instruction counts, which
/// a noisy host does not change.
fn wrapped(program: PathBuf) -> tokio::process::Command {
    let wrap = std::env::var("BENCH_WORKER_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    match words.next() {
        Some(wrapper) => {
            let mut c = tokio::process::Command::new(wrapper);
            c.args(words).arg(program);
            c
        }
        None => tokio::process::Command::new(program),
    }
}

/// The same transaction on C connections, no broker: the database's limit.
async fn db_only(args: &Args, db: &Db) -> anyhow::Result<Run> {
    let me = std::process::id();
    let cpu_before = procstat::process(me).map(|p| p.cpu_seconds).unwrap_or(0.0);
    let services_before = procstat::services();
    let cpu_times_before = procstat::cpu_times();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (db, next, args) = (db.clone(), next.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let meta = JobMeta::default();
            while next.fetch_add(1, Ordering::Relaxed) < args.jobs {
                let body = request_body(&args, &mut rng);
                loop {
                    let mut tx = db.begin(None).await?;
                    let r = if args.workload == "noop" {
                        handlers::Noop
                            .handle(&mut tx, serde_json::Value::Null, &meta)
                            .await
                            .map(drop)
                    } else {
                        let req: handlers::TransferRequest = serde_json::from_slice(&body)?;
                        handlers::Transfer
                            .handle(&mut tx, req, &meta)
                            .await
                            .map(drop)
                    };
                    match r {
                        Ok(()) => {
                            tx.commit().await?;
                            break;
                        }
                        // Deadlocks and the like: again, as any loop would.
                        Err(txq::JobError::Database(_)) => continue,
                        Err(_) => break,
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = procstat::process(me).map(|p| p.cpu_seconds).unwrap_or(0.0) - cpu_before;
    let services_after = procstat::services();
    let steal_pct = procstat::cpu_times().steal_pct_since(&cpu_times_before);
    let statuses = BTreeMap::from([("ok".to_owned(), args.jobs)]);
    check(args, "db", db, &statuses, args.jobs).await?;
    let per_1k = |s: f64| s * 1000.0 / args.jobs as f64;
    Ok(Run {
        variant: "db".into(),
        jobs_per_sec: args.jobs as f64 / seconds,
        worker_cpu_s_per_1k: per_1k(cpu),
        worker_peak_rss_mib: 0.0,
        broker_cpu_s_per_1k: per_1k(services_after.broker - services_before.broker),
        db_cpu_s_per_1k: per_1k(services_after.database - services_before.database),
        retries: 0,
        seconds,
        steal_pct,
    })
}

/// The invariants: every request answered, nothing failed, the books balance and
/// one row per accepted request.
async fn check(
    args: &Args,
    variant: &str,
    db: &Db,
    statuses: &BTreeMap<String, usize>,
    requests: usize,
) -> anyhow::Result<()> {
    let answered: usize = statuses.values().sum();
    ensure!(
        answered == requests,
        "{variant}: {answered} replies for {requests} requests"
    );
    ensure!(
        !statuses.contains_key("failed"),
        "{variant}: failures {statuses:?}"
    );
    if variant == "broker" {
        return Ok(());
    }
    let totals = handlers::totals(db).await?;
    ensure!(
        totals.balance_sum == args.accounts * handlers::INITIAL_BALANCE,
        "{variant}: the books do not balance"
    );
    let ok = statuses.get("ok").copied().unwrap_or(0) as i64;
    if args.workload == "noop" {
        ensure!(
            totals.jobs_logged == ok,
            "{variant}: {} rows for {ok} jobs",
            totals.jobs_logged
        );
    } else if variant != "db" {
        ensure!(
            totals.transfers == ok,
            "{variant}: {} transfers for {ok} accepted",
            totals.transfers
        );
    }
    Ok(())
}
