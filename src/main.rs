//! The `txq` command: parses flags, loads the config, and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
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
}

#[derive(Args)]
struct RunArgs {
    /// Jobs in flight at most [config: concurrency]
    #[arg(long)]
    concurrency: Option<usize>,
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
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let concurrency = match &cli.command {
        Command::Run(args) => args.concurrency,
        Command::Config => None,
    };
    let overrides = Overrides {
        amqp_url: cli.common.amqp_url,
        database_url: cli.common.database_url,
        queue: cli.common.queue,
        concurrency,
        log_format: cli.common.log_format,
    };
    let config = Config::load(cli.common.config.as_deref(), &overrides)?;
    txq::telemetry::init(config.log_format);
    match cli.command {
        Command::Config => {
            println!("{config:#?}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(_) => {
            info!(?config, "starting");
            let worker = Worker::builder(config)
                .handler("echo", Echo)
                .build()
                .await
                .context("starting the worker")?;
            let shutdown = CancellationToken::new();
            tokio::spawn(signal_shutdown(shutdown.clone()));
            worker.run(shutdown).await.context("worker")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Built in until job types can be defined in a file: replies with its payload, and
/// proves the round trip through the database by asking it for the time.
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

/// Cancels `token` on the first SIGINT or SIGTERM; a second one exits at once (the
/// broker redelivers whatever was unacked).
async fn signal_shutdown(token: CancellationToken) {
    wait_for_signal().await;
    info!("shutdown signal: finishing jobs in flight (signal again to exit at once)");
    token.cancel();
    wait_for_signal().await;
    warn!("second signal: exiting now; unacked requests will be redelivered");
    std::process::exit(130);
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
