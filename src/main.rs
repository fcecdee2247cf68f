//! The `txq` command: parses flags, loads the config, and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;
use txq::config::{LogFormat, Overrides};
use txq::{Config, Handler, JobError, JobMeta, Tx, Worker};

#[derive(Parser)]
#[command(version, about = "Transactional job processor for RabbitMQ")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

/// Flags every command shares; each overrides the config file and `TXQ_*` variables.
#[derive(Args)]
struct Common {
    /// TOML config file.
    #[arg(long, short, global = true, env = "TXQ_CONFIG")]
    config: Option<PathBuf>,
    /// RabbitMQ URL [config: amqp_url]
    #[arg(long, global = true)]
    amqp_url: Option<String>,
    /// Database URL: mysql://, mariadb://, postgres:// or sqlite:// [config: database_url]
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Request queue [config: queue]
    #[arg(long, global = true)]
    queue: Option<String>,
    /// Log format [config: log_format]
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
    /// Create or update txq's tables (the inbox) in the database.
    Migrate,
    /// Operations files: job types defined as SQL steps.
    #[command(subcommand)]
    Ops(OpsCommand),
    /// The inbox of processed message_ids.
    #[command(subcommand)]
    Inbox(InboxCommand),
    /// The dead-letter queue: list, show, replay, purge (exit codes: README).
    Dlq(txq::tools::dlq::cli::DlqArgs),
    /// Publish a file of JSON-lines requests; with --wait, collect the replies.
    Submit(SubmitArgs),
}

#[derive(Subcommand)]
enum OpsCommand {
    /// Check a file: parameters, step references, types; exit 1 on any error.
    Check {
        /// The operations file.
        file: PathBuf,
    },
    /// Print a JSON Schema of each operation's payload and reply.
    Schema {
        /// The operations file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum InboxCommand {
    /// Delete rows older than a duration; a redelivery of such a request runs again.
    Prune {
        /// For example 7d, 12h, 30m.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Jobs in flight at most [config: concurrency]
    #[arg(long)]
    concurrency: Option<usize>,
    /// Job types defined as SQL steps in this TOML file (one handler per operation)
    #[arg(long, env = "TXQ_OPS")]
    ops: Option<PathBuf>,
    /// SQL script run before starting (idempotent schema set-up, e.g.
    /// examples/bank/schema.sqlite.sql)
    #[arg(long)]
    init_sql: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz here; "" turns it off [config: metrics_addr]
    #[arg(long)]
    metrics_addr: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("txq: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("txq: {e:#}");
            // A bad configuration is a usage error, as clap's own are.
            if e.downcast_ref::<txq::config::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (concurrency, metrics_addr) = match &cli.command {
        Command::Run(args) => (args.concurrency, args.metrics_addr.clone()),
        _ => (None, None),
    };
    let overrides = Overrides {
        amqp_url: cli.common.amqp_url,
        database_url: cli.common.database_url,
        queue: cli.common.queue,
        concurrency,
        log_format: cli.common.log_format,
        metrics_addr,
    };
    let config = Config::load(cli.common.config.as_deref(), &overrides)?;
    // Held to the end of the command: dropping it flushes exported spans.
    let _telemetry = match cli.command {
        // Their stderr is for their own counts and errors (`--json`: one object);
        // lapin logs the 404 of a missing queue and a lost connection, which the
        // commands report themselves.
        Command::Dlq(_) | Command::Submit(_) => {
            txq::telemetry::init_with(config.log_format, "warn,lapin=off")
        }
        _ => txq::telemetry::init(config.log_format),
    };
    match cli.command {
        Command::Dlq(args) => Ok(txq::tools::dlq::cli::run(&config, args).await),
        Command::Config => {
            println!("{config:#?}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let db = connect_db(&config).await?;
            let applied = txq::db::migrate(&db).await.context("migrating")?;
            println!("applied {} migration(s): {applied:?}", applied.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Inbox(InboxCommand::Prune { older_than }) => {
            let db = connect_db(&config).await?;
            let older =
                i64::try_from(older_than.as_millis()).context("--older-than is too large")?;
            let now = i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("the clock is before 1970")?
                    .as_millis(),
            )?;
            let removed = txq::db::inbox::prune(&db, now - older)
                .await
                .context("pruning")?;
            println!("removed {removed} inbox row(s)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Ops(OpsCommand::Check { file }) => {
            let ops = txq::sqlops::load(&file)?;
            for w in &ops.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: {} operation(s), ok",
                file.display(),
                ops.operations.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ops(OpsCommand::Schema { file }) => {
            let ops = txq::sqlops::load(&file)?;
            println!("{:#}", txq::sqlops::schemas(&ops.operations));
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit(args) => Ok(submit(&config, args).await),
        Command::Run(args) => {
            info!(?config, "starting");
            let metrics_addr = config.metrics_addr();
            let recorder = match metrics_addr {
                Some(_) => Some(txq::http::install_recorder()?),
                None => None,
            };
            let db = txq::Db::connect(config.database_url.expose(), &config.pool_options())
                .await
                .with_context(|| format!("connecting to {}", config.database_url))?;
            if let Some(path) = &args.init_sql {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let n = db
                    .execute_sql_file(&text)
                    .await
                    .with_context(|| format!("running {}", path.display()))?;
                info!(statements = n, file = %path.display(), "ran the init SQL");
            }
            let mut builder = Worker::builder(config).database(db.clone());
            match &args.ops {
                Some(path) => {
                    let ops = txq::sqlops::load(path)?;
                    for w in &ops.warnings {
                        tracing::warn!("{w}");
                    }
                    builder = ops.register(builder, db.backend())?;
                    info!(operations = ops.operations.len(), file = %path.display(), "loaded operations");
                }
                None => builder = builder.handler("echo", Echo),
            }
            let worker = builder.build().await.context("starting the worker")?;
            let shutdown = CancellationToken::new();
            cancel_on_signals(shutdown.clone());
            let health = worker.health();
            // Outlives the drain: /healthz keeps answering, /readyz says no.
            let server_stop = CancellationToken::new();
            let server = match (metrics_addr, recorder) {
                (Some(addr), Some(recorder)) => {
                    let (bound, task) = txq::http::serve(
                        addr,
                        recorder,
                        health.clone(),
                        worker.db().clone(),
                        server_stop.clone(),
                    )
                    .await?;
                    info!(addr = %bound, "serving /metrics, /healthz and /readyz");
                    Some(task)
                }
                _ => None,
            };
            let result = worker.run(shutdown.cancelled_owned()).await.context("worker");
            server_stop.cancel();
            if let Some(task) = server {
                let _ = task.await;
            }
            result?;
            // One machine-readable line for scripts and the benchmark driver.
            println!(
                "txq-stats {{\"settled\":{},\"retries\":{}}}",
                health.settled(),
                health.retries()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `txq submit`; exit codes in `txq::tools::submit::exit`.
#[derive(Args)]
struct SubmitArgs {
    /// JSON-lines file of requests; `-` or nothing reads standard input
    file: Option<PathBuf>,
    /// Job type of every line; each line is then a bare payload (otherwise a line is
    /// {"type":…,"payload":…,"message_id"?:…,"correlation_id"?:…})
    #[arg(long = "type", value_name = "TYPE")]
    job_type: Option<String>,
    /// Identity derived message_ids are made from [default: the file's absolute
    /// path; a hash of the input for standard input]
    #[arg(long)]
    batch_id: Option<String>,
    /// Unconfirmed publishes at most
    #[arg(long, default_value_t = txq::tools::submit::DEFAULT_WINDOW,
        value_parser = clap::value_parser!(u16).range(1..))]
    window: u16,
    /// Publish at most this fast: 100/s, 600/m, 1000/h
    #[arg(long)]
    rate: Option<txq::tools::submit::Rate>,
    /// Collect the replies; write one JSON line per request to stdout (or --output)
    #[arg(long)]
    wait: bool,
    /// Receive replies through RabbitMQ direct reply-to instead of an exclusive queue
    #[arg(long, requires = "wait")]
    direct_reply_to: bool,
    /// Once all are published, give up on missing replies after this long without one
    #[arg(long, default_value_t = txq::tools::submit::DEFAULT_TIMEOUT.into(), requires = "wait")]
    timeout: humantime::Duration,
    /// Write the replies in input order (each waits for the lines before it)
    #[arg(long, requires = "wait")]
    ordered: bool,
    /// Write the replies to this file (replaced, unless --resume) instead of stdout
    #[arg(long, short, requires = "wait")]
    output: Option<PathBuf>,
    /// Skip the lines --output already has a reply for, and append to it
    #[arg(long, requires = "output")]
    resume: bool,
    /// Summary (and errors) as one JSON object on stderr; no periodic counts
    #[arg(long)]
    json: bool,
    /// No progress bar or periodic counts
    #[arg(long, short)]
    quiet: bool,
}

async fn submit(config: &Config, args: SubmitArgs) -> ExitCode {
    use txq::tools::submit::{self, ProgressMode, ReplyMode, Source, SubmitOptions, WaitOptions};
    let options = SubmitOptions {
        source: match args.file {
            Some(path) if path.as_os_str() != "-" => Source::File(path),
            _ => Source::Stdin,
        },
        job_type: args.job_type,
        batch_id: args.batch_id,
        window: usize::from(args.window),
        rate: args.rate,
        wait: args.wait.then_some(WaitOptions {
            mode: if args.direct_reply_to {
                ReplyMode::DirectReplyTo
            } else {
                ReplyMode::ExclusiveQueue
            },
            timeout: args.timeout.into(),
            ordered: args.ordered,
            output: args.output,
            resume: args.resume,
        }),
        progress: if args.quiet || args.json {
            ProgressMode::Off
        } else {
            ProgressMode::Auto
        },
    };
    match submit::submit(config, &options).await {
        Ok(summary) => {
            if args.json {
                eprintln!("{}", serde_json::json!(summary));
            } else {
                eprintln!("txq submit: {summary}");
            }
            ExitCode::from(summary.exit_code())
        }
        Err(e) => {
            if args.json {
                eprintln!("{}", serde_json::json!({"error": e.to_string()}));
            } else if e.exit_code() == submit::exit::BROKER {
                eprintln!(
                    "txq submit: {e}\n(running the same input again is safe: the inbox answers what was done)"
                );
            } else {
                eprintln!("txq submit: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

async fn connect_db(config: &Config) -> anyhow::Result<txq::Db> {
    let options = txq::db::PoolOptions {
        max_connections: 1,
        ..config.pool_options()
    };
    txq::Db::connect(config.database_url.expose(), &options)
        .await
        .with_context(|| format!("connecting to {}", config.database_url))
}

/// The job type of `txq run` without `--ops`: replies with its payload, and proves
/// the round trip through the database with a `SELECT 1`.
struct Echo;

impl Handler for Echo {
    type Payload = serde_json::Value;
    type Output = serde_json::Value;

    async fn handle(
        &self,
        tx: &mut Tx,
        payload: serde_json::Value,
        _meta: &JobMeta,
    ) -> Result<serde_json::Value, JobError> {
        let one: i64 = txq::with_conn!(tx, conn => {
            txq::sqlx::query_scalar("SELECT 1").fetch_one(conn).await?
        });
        Ok(serde_json::json!({ "echo": payload, "db": one }))
    }
}

/// Cancels `token` on the first SIGINT or SIGTERM, and exits at once (status 130)
/// on the second: the broker redelivers whatever was unacked, and the inbox keeps
/// that safe.
fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        txq::signals::shutdown_signal().await;
        info!("shutdown signal: finishing jobs in flight (signal again to exit at once)");
        token.cancel();
        txq::signals::shutdown_signal().await;
        tracing::warn!("second signal: exiting now; unacked requests will be redelivered");
        std::process::exit(130);
    });
}
