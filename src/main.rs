//! The `txq` command: parses flags, loads the config, and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;
use txq::config::Overrides;
use txq::config::flags::{BrokerArgs, DbArgs, LogArgs, WorkerArgs};

// Exit codes and the `--json` convention: README, "Exit codes".
use txq::{Config, Handler, JobError, JobMeta, Tx, Worker};

#[derive(Parser)]
#[command(
    version,
    about = "Transactional job processor for RabbitMQ",
    after_long_help = "EXIT CODES (every command):\n  0  success\n  1  the command ran, \
        and some of the work it reports on did not succeed (a reply not ok, a dead letter \
        left)\n  2  usage or configuration error: flags, config file, TXQ_* variables, an \
        operations file\n  3  the broker, the database or a file could not be used\n\n\
        EXAMPLES:\n  txq run --ops examples/bank/ops.toml --init-sql examples/bank/schema.sqlite.sql\n  \
        txq submit examples/bank/transfers.jsonl --wait\n  txq dlq list --group\n  txq config --json"
)]
struct Cli {
    /// TOML config file
    #[arg(long, short, global = true, env = "TXQ_CONFIG")]
    config: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace (RUST_LOG, when set, wins)
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<tracing::level_filters::LevelFilter>,
    /// More log lines: -v adds a line per job (type, message_id, outcome, time), -vv debug
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

// The flags that set config keys are declared once, in txq::config::flags; each
// command takes the groups it needs.

#[derive(Subcommand)]
enum Command {
    /// Run the worker until SIGINT or SIGTERM.
    #[command(after_long_help = "EXAMPLES:\n  \
        txq run --ops examples/bank/ops.toml --init-sql examples/bank/schema.sqlite.sql\n  \
        txq run -v --concurrency 32 --database-url mysql://root@127.0.0.1:3306/test\n  \
        TXQ_CONFIG=txq.toml txq run --metrics-addr 0.0.0.0:9464")]
    Run {
        #[command(flatten)]
        args: RunArgs,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Print the effective configuration as TOML (or JSON), passwords redacted.
    #[command(after_long_help = "EXAMPLES:\n  txq config\n  txq -c txq.toml config --json")]
    Config {
        /// One JSON document instead of TOML
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Create or update txq's tables (the inbox) in the database.
    #[command(
        after_long_help = "EXAMPLES:\n  txq migrate --database-url postgres://postgres@127.0.0.1/test"
    )]
    Migrate {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Operations files: job types defined as SQL steps.
    #[command(subcommand)]
    Ops(OpsCommand),
    /// The inbox of processed message_ids.
    #[command(subcommand)]
    Inbox(InboxCommand),
    /// The dead-letter queue: list, show, replay, purge.
    #[command(
        after_long_help = "EXAMPLES:\n  txq dlq list --group\n  txq dlq show 7d0c…\n  \
        txq dlq replay --kind database_error --dry-run\n  txq dlq purge --yes"
    )]
    Dlq {
        #[command(flatten)]
        args: txq::tools::dlq::cli::DlqArgs,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Batches tracked on the server: status, list, wait.
    #[command(subcommand)]
    Batch(txq::tools::batch::BatchCommand),
    /// The workers that keep a row in the database (their heartbeat), live or gone.
    #[command(after_long_help = "EXAMPLES:\n  txq workers\n  txq workers --json")]
    Workers(txq::tools::workers::WorkersArgs),
    /// The operator's web console: queues, workers, dead letters (replay and
    /// purge), inbox lookups and batches.
    #[command(after_long_help = "EXAMPLES:\n  txq console\n  \
        txq console --listen 127.0.0.1:9000 --read-only\n  \
        TXQ_CONSOLE__TOKENS__ALICE=s3cret txq console --listen 0.0.0.0:8080")]
    Console {
        /// Listen here; an address off loopback needs an access token [config:
        /// console.listen, default 127.0.0.1:8080]
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Show no action, and refuse every one [config: console.read_only]
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Publish a file of JSON-lines requests; with --wait, collect the replies.
    #[command(
        after_long_help = "EXAMPLES:\n  txq submit examples/bank/transfers.jsonl --wait\n  \
        txq submit --type noop --rate 200/s < payloads.jsonl\n  \
        txq submit big.jsonl --wait --output replies.jsonl --resume"
    )]
    Submit {
        #[command(flatten)]
        args: SubmitArgs,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

impl Command {
    /// The config overrides this command's flags make: the groups of flags it
    /// takes, as they are.
    fn overrides(&self) -> Overrides {
        let mut all = Overrides::default();
        match self {
            Command::Run {
                args,
                broker,
                db,
                log,
            } => {
                all.broker = broker.clone();
                all.db = db.clone();
                all.log = log.clone();
                all.worker = args.worker.clone();
            }
            Command::Config {
                broker, db, log, ..
            }
            | Command::Console {
                broker, db, log, ..
            } => {
                all.broker = broker.clone();
                all.db = db.clone();
                all.log = log.clone();
            }
            Command::Migrate { db } | Command::Inbox(InboxCommand::Prune { db, .. }) => {
                all.db = db.clone();
            }
            Command::Dlq { broker, .. } | Command::Submit { broker, .. } => {
                all.broker = broker.clone();
            }
            Command::Batch(command) => {
                all.db = command.db_args().clone();
            }
            Command::Workers(args) => {
                all.db = args.db.clone();
            }
            Command::Ops(_) => {}
        }
        all
    }
}

#[derive(Subcommand)]
enum OpsCommand {
    /// Check a file: parameters, step references, types; exit 2 on any error.
    #[command(after_long_help = "EXAMPLES:\n  txq ops check examples/bank/ops.toml")]
    Check {
        /// The operations file.
        file: PathBuf,
    },
    /// Print a JSON Schema of each operation's payload and reply.
    #[command(after_long_help = "EXAMPLES:\n  txq ops schema examples/bank/ops.toml > schema.json")]
    Schema {
        /// The operations file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum InboxCommand {
    /// Delete rows older than a duration; a redelivery of such a request runs again.
    #[command(after_long_help = "EXAMPLES:\n  txq inbox prune --older-than 7d")]
    Prune {
        /// For example 7d, 12h, 30m.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    worker: WorkerArgs,
    /// Job types defined as SQL steps in this TOML file (one handler per operation)
    #[arg(long, env = "TXQ_OPS")]
    ops: Option<PathBuf>,
    /// SQL script run before starting (idempotent schema set-up, e.g.
    /// examples/bank/schema.sqlite.sql)
    #[arg(long)]
    init_sql: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("txq: cannot start the async runtime: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        // A closed stdout (`txq config | head -1`) ends the command quietly, as
        // ripgrep and cargo do.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("txq: {}", report(&e));
            ExitCode::from(exit::code(&e))
        }
    }
}

/// The exit codes of errors that end a command (README, "Exit codes"; 1, "some
/// work not ok", is the tools' own to give).
mod exit {
    /// Usage or configuration: flags, config, `TXQ_*` variables, an operations file.
    pub(crate) const USAGE: u8 = 2;
    /// The broker, the database or a file could not be used.
    pub(crate) const UNAVAILABLE: u8 = 3;

    /// The code of an error that ended a command.
    pub(crate) fn code(e: &anyhow::Error) -> u8 {
        let usage = e.chain().any(|c| {
            c.is::<txq::config::ConfigError>()
                || c.downcast_ref::<txq::broker::PolicyError>()
                    .is_some_and(|p| matches!(p, txq::broker::PolicyError::Dangerous(_)))
                || c.is::<txq::sqlops::SpecError>()
                || c.downcast_ref::<txq::sqlops::OpsError>()
                    .is_some_and(|o| !matches!(o, txq::sqlops::OpsError::Read { .. }))
                || c.downcast_ref::<txq::WorkerError>().is_some_and(|w| {
                    matches!(
                        w,
                        txq::WorkerError::Config(_) | txq::WorkerError::NoHandlers
                    )
                })
        });
        if usage { USAGE } else { UNAVAILABLE }
    }
}

/// `e` and its causes on one line, each said once: a cause whose text the level
/// above already shows (sqlx and io errors repeat theirs) is left out.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut shown = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // PostgreSQL names the line of its own source that raised the error.
        let text = match text.rsplit_once(" at line ") {
            Some((head, line)) if line.chars().all(|c| c.is_ascii_digit()) => head,
            _ => text.as_str(),
        };
        let text = text.trim();
        if text.is_empty() || shown.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
        shown.push_str(text);
    }
    out.replace('\n', " ")
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes `text` and a newline to stdout; a closed pipe is an error the caller
/// turns into a quiet exit.
fn out(text: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()
}

/// The log filter when `RUST_LOG` is unset: `--log-level`, or from `-v`. Per-job
/// lines (target `txq::job`) show from `-v`; lapin stays quiet (txq
/// reports what they are about itself, and they carry raw bytes).
fn log_filter(cli: &Cli, quiet_default: bool) -> String {
    let level = match (cli.log_level, cli.verbose) {
        (Some(level), _) => level.to_string().to_lowercase(),
        (None, 0) if quiet_default => "warn".into(),
        (None, 0 | 1) => "info".into(),
        (None, 2) => "debug".into(),
        (None, _) => "trace".into(),
    };
    let jobs = if cli.verbose >= 1 || cli.log_level.is_some() {
        &level
    } else {
        "warn"
    };
    format!("{level},txq::job={jobs},lapin=off")
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = cli.command.overrides();
    let config = Config::load(cli.config.as_deref(), &overrides)?;
    // Their stderr is for their own counts and errors (`--json`: one object).
    let quiet = matches!(
        cli.command,
        Command::Dlq { .. } | Command::Submit { .. } | Command::Batch(_) | Command::Workers(_)
    );
    // Held to the end of the command: dropping it flushes exported spans.
    let _telemetry = txq::telemetry::init_with(config.log_format, &log_filter(&cli, quiet));
    match cli.command {
        Command::Dlq { args, .. } => Ok(txq::tools::dlq::cli::run(&config, args).await),
        Command::Batch(command) => Ok(txq::tools::batch::run(&config, command).await),
        Command::Workers(args) => Ok(txq::tools::workers::run(&config, args).await),
        Command::Config { json, .. } => {
            let text = if json {
                serde_json::to_string_pretty(&config).context("encoding the config")?
            } else {
                toml::to_string(&config).context("encoding the config")?
            };
            out(text.trim_end())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { .. } => {
            let db = connect_db(&config).await?;
            let applied = txq::db::migrate(&db).await.context("migrating")?;
            out(format_args!(
                "applied {} migration(s): {applied:?}",
                applied.len()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Inbox(InboxCommand::Prune { older_than, .. }) => {
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
            out(format_args!("removed {removed} inbox row(s)"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ops(OpsCommand::Check { file }) => {
            let ops = txq::sqlops::load(&file)?;
            for w in &ops.warnings {
                eprintln!("warning: {w}");
            }
            let callback = if ops.on_batch_complete.is_some() {
                " and a batch callback"
            } else {
                ""
            };
            out(format_args!(
                "{}: {} operation(s){callback}, ok",
                file.display(),
                ops.operations.len()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ops(OpsCommand::Schema { file }) => {
            let ops = txq::sqlops::load(&file)?;
            out(format_args!("{:#}", txq::sqlops::schemas(&ops.operations)))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit { args, .. } => Ok(submit(&config, args).await),
        Command::Run { args, .. } => run_worker(config, args).await,
        Command::Console {
            listen, read_only, ..
        } => {
            let mut config = config;
            if let Some(listen) = listen {
                config.console.listen = listen;
            }
            config.console.read_only |= read_only;
            console(config).await
        }
    }
}

async fn run_worker(config: Config, args: RunArgs) -> anyhow::Result<ExitCode> {
    info!(
        queue = %config.queue,
        queue_type = config.queue_type.as_str(),
        amqp_url = %config.amqp_url,
        database_url = %config.database_url,
        concurrency = config.concurrency.get(),
        prefetch = config.prefetch().get(),
        job_timeout = %humantime::format_duration(config.job_timeout),
        max_attempts = config.retry.max_attempts,
        inbox = config.inbox.enabled,
        metrics_addr = %config.metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        "starting"
    );
    if let Some(management) = &config.management_url {
        let topology = txq::broker::Topology::from_config(&config);
        match txq::broker::check_policies(management, &config.vhost(), &topology).await {
            Ok(report) => {
                for warning in &report.warnings {
                    tracing::warn!("{warning}");
                }
            }
            // Reachable or not, a dangerous policy is known for sure: refuse.
            Err(e @ txq::broker::PolicyError::Dangerous(_)) => {
                return Err(anyhow::Error::new(e).context("a RabbitMQ policy would lose messages"));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not check the queues' policies; starting anyway")
            }
        }
    }
    let metrics_addr = config.metrics_addr;
    let recorder = match metrics_addr {
        Some(_) => Some(txq::http::install_recorder()?),
        None => None,
    };
    let backend = txq::Backend::from_url(config.database_url.expose())?;
    if let Some(path) = &args.init_sql {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let db = txq::Db::connect(config.database_url.expose(), &config.pool_options())
            .await
            .with_context(|| format!("connecting to {}", config.database_url))?;
        db.execute_sql_file(&text)
            .await
            .with_context(|| format!("running {}", path.display()))?;
        db.close().await;
        info!(file = %path.display(), "ran the init SQL");
    }
    // The worker connects itself, so that it can give jobs a pool of their own
    // where that spares a round trip (`Worker::database`).
    let mut builder = Worker::builder(config);
    match &args.ops {
        Some(path) => {
            let ops = txq::sqlops::load(path)?;
            for w in &ops.warnings {
                tracing::warn!("{w}");
            }
            builder = ops.register(builder, backend)?;
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
    let result = worker.run(shutdown.cancelled_owned()).await;
    server_stop.cancel();
    if let Some(task) = server {
        let _ = task.await;
    }
    result?;
    // One machine-readable line on stdout for scripts and the benchmark driver
    // (README, "Commands"); stdout carries nothing else.
    out(format_args!(
        "txq-stats {}",
        serde_json::json!({"settled": health.settled(), "retries": health.retries()})
    ))?;
    Ok(ExitCode::SUCCESS)
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
    /// Track the requests as one batch on the server (`txq batch status|wait ID`):
    /// each carries x-txq-batch-id and x-txq-batch-size [default ID: derived from
    /// the input, the same for the same input]
    #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "")]
    batch: Option<String>,
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
    /// Summary (or error) as the last line of stdout, {"summary":…} or
    /// {"error":…}; no periodic counts
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
        // A named batch names its message_ids too, unless --batch-id does.
        batch_id: args
            .batch_id
            .or_else(|| args.batch.clone().filter(|id| !id.is_empty())),
        batch: args.batch.map(|id| (!id.is_empty()).then_some(id)),
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
    // `--json`: stdout carries JSON lines only, the summary (or the error) last;
    // a closed stdout leaves the exit code to tell.
    let json_line = |value: serde_json::Value| {
        let _ = out(value);
    };
    match submit::submit(config, &options).await {
        Ok(summary) => {
            if args.json {
                json_line(serde_json::json!({ "summary": summary }));
            } else {
                eprintln!("txq submit: {summary}");
            }
            ExitCode::from(summary.exit_code())
        }
        Err(e) => {
            if args.json {
                json_line(serde_json::json!({ "error": e.to_string() }));
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

/// `txq console`: serves until SIGINT or SIGTERM. Its one stdout line says where.
async fn console(config: Config) -> anyhow::Result<ExitCode> {
    let options = txq::db::PoolOptions {
        max_connections: 4,
        ..config.pool_options()
    };
    let db = txq::Db::connect(config.database_url.expose(), &options)
        .await
        .with_context(|| format!("connecting to {}", config.database_url))?;
    // The pages read the workers' and the batches' tables: a console started
    // before any worker still finds them. A read-only console writes nothing,
    // schema included (a page shows a missing table as a problem).
    if !config.console.read_only {
        txq::db::migrate(&db).await.context("migrating")?;
    }
    let recorder = txq::http::install_recorder()?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let (bound, task) = txq::console::serve(config, db, Some(recorder), shutdown).await?;
    info!(addr = %bound, "serving the console");
    out(format_args!("txq console on http://{bound}/"))?;
    let _ = task.await;
    Ok(ExitCode::SUCCESS)
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
