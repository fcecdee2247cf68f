//! The bank: the `transfer` and `noop` workloads (docs/workloads.md) as a txq worker.
//!
//! ```text
//! cargo run --example bank -- --database-url mysql://root@127.0.0.1:3306/test --setup
//! cargo run --example bank -- --database-url mysql://root@127.0.0.1:3306/test --load 1000
//! ```
//! `--setup` (re)creates the tables with `--accounts` accounts; `--load N` publishes
//! N random transfers (confirmed, persistent) before the worker starts.

mod handlers;

use anyhow::Context as _;
use clap::Parser;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use rand::Rng as _;
use tokio_util::sync::CancellationToken;
use txq::config::Overrides;
use txq::config::flags::{BrokerArgs, DbArgs};
use txq::{Config, Worker};

/// The bank workloads as a txq worker.
#[derive(Parser)]
struct Args {
    /// Jobs in flight at most [config: concurrency]
    #[arg(long)]
    concurrency: Option<std::num::NonZeroU16>,
    /// (Re)create the tables before running
    #[arg(long)]
    setup: bool,
    /// Accounts created by --setup
    #[arg(long, default_value_t = 1000)]
    accounts: i64,
    /// Publish this many random transfers before starting the worker
    #[arg(long, default_value_t = 0)]
    load: u64,
    /// Exit after --setup/--load instead of running the worker
    #[arg(long)]
    no_run: bool,
    // Last: their heading, "Connection", holds for what follows.
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    db: DbArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut overrides = Overrides {
        broker: args.broker,
        db: args.db,
        ..Overrides::default()
    };
    // Not `WorkerArgs`: this worker serves no metrics port.
    overrides.worker.concurrency = args.concurrency;
    let config = Config::load(None, &overrides)?;
    let _telemetry = txq::telemetry::init(config.log_format);
    // The same metrics as `txq run` are recorded (and so costed in benchmarks);
    // tests run several of these at once, so none serves a port.
    let _metrics = txq::http::install_recorder().context("metrics recorder")?;
    // The worker connects itself (jobs on MySQL/MariaDB get a pool of their own,
    // `Worker::database`); setup and the totals use its pool.
    let load_config = config.clone();
    let worker = Worker::builder(config)
        .handler("transfer", handlers::Transfer)
        .handler("noop", handlers::Noop)
        .build()
        .await?;
    let db = worker.db().clone();
    if args.setup {
        handlers::setup(&db, args.accounts)
            .await
            .context("creating the bank tables")?;
        println!(
            "created {} accounts on {}",
            args.accounts,
            db.backend().name()
        );
    }
    if args.load > 0 {
        load(&load_config, args.load, args.accounts).await?;
        println!("published {} transfers to {}", args.load, load_config.queue);
    }
    if args.no_run {
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        txq::signals::shutdown_signal().await;
        stop.cancel();
        // A second signal: out at once; the broker redelivers what was unacked.
        txq::signals::shutdown_signal().await;
        std::process::exit(130);
    });
    let health = worker.health();
    worker.run(shutdown.cancelled_owned()).await?;
    // One machine-readable line for the benchmark driver.
    println!(
        "txq-stats {{\"settled\":{},\"retries\":{}}}",
        health.settled(),
        health.retries()
    );
    let totals = handlers::totals(&db).await?;
    println!(
        "balance sum {} ({} expected), {} transfers, {} noop jobs",
        totals.balance_sum,
        args.accounts * handlers::INITIAL_BALANCE,
        totals.transfers,
        totals.jobs_logged
    );
    Ok(())
}

async fn load(config: &Config, n: u64, accounts: i64) -> anyhow::Result<()> {
    let queue = config.queue.as_str();
    let conn = txq::broker::connect(config.amqp_url.expose(), "txq bank loader").await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    // The worker's own declarations, so the queues exist before it starts.
    txq::broker::declare(&channel, &txq::broker::Topology::from_config(config)).await?;
    let mut rng = rand::rng();
    let mut confirms = Vec::new();
    for i in 0..n {
        let from = rng.random_range(1..=accounts);
        let to = loop {
            let to = rng.random_range(1..=accounts);
            if to != from {
                break to;
            }
        };
        let body = serde_json::to_vec(&handlers::TransferRequest {
            from,
            to,
            amount: rng.random_range(1..=100),
        })?;
        let props = BasicProperties::default()
            .with_type("transfer".into())
            .with_message_id(format!("bank-{}-{i}", uuid::Uuid::new_v4()).into())
            .with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?;
        confirms.push(confirm);
        // A bounded window of unconfirmed publishes.
        if confirms.len() >= 1000 {
            for c in confirms.drain(..) {
                anyhow::ensure!(c.await?.is_ack(), "the broker nacked a request");
            }
        }
    }
    for c in confirms {
        anyhow::ensure!(c.await?.is_ack(), "the broker nacked a request");
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}
