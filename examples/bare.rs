//! The benchmark's "bare" limit: the straight-line lapin + sqlx loop a careful
//! developer would write by hand, with none of txq's machinery (no inbox, no retry
//! queues, no dead-lettering, no reconnects, no envelope checks). Consume with
//! prefetch, run the same transfer in a transaction, publish the reply with a
//! confirm, ack.
//!
//! `--mode broker` drops the database: consume, confirmed reply, ack (the
//! broker-only limit). `--mode inbox` adds the one statement txq's inbox costs a
//! first delivery (its row, written last before COMMIT): the hand-written loop
//! that pays for deduplication as txq does, so the two can be compared like for
//! like. `--reply txq` sends txq's reply instead of the bare one: its properties
//! (`x-txq-*` headers, a fresh message_id, the content type and job type) and the
//! mandatory flag, to measure what the reply contract costs.

#[path = "bank/handlers.rs"]
mod handlers;

use std::sync::Arc;

use clap::Parser;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::Semaphore;
use txq::{Db, Handler as _, JobMeta};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    amqp_url: String,
    #[arg(long, default_value = "sqlite://txq.db")]
    database_url: String,
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// `full` (database + broker), `inbox` (full plus an inbox row a job) or
    /// `broker` (no database)
    #[arg(long, default_value = "full", value_parser = ["full", "inbox", "broker"])]
    mode: String,
    /// `bare` (correlation_id only) or `txq` (txq's reply properties, mandatory)
    #[arg(long, default_value = "bare", value_parser = ["bare", "txq"])]
    reply: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = if args.mode != "broker" {
        let options = txq::db::PoolOptions {
            max_connections: args.concurrency as u32,
            ..Default::default()
        };
        let db = Db::connect(&args.database_url, &options).await?;
        if args.mode == "inbox" {
            txq::db::migrate(&db).await?;
        }
        Some(db)
    } else {
        None
    };
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let consume = conn.create_channel().await?;
    let publish = Arc::new(conn.create_channel().await?);
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    consume
        .basic_qos(args.concurrency as u16, BasicQosOptions::default())
        .await?;
    let mut deliveries = consume
        .basic_consume(
            args.queue.as_str().into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let permit = permits.clone().acquire_owned().await?;
        let delivery = tokio::select! {
            _ = term.recv() => break,
            d = deliveries.next() => match d {
                Some(Ok(d)) => d,
                _ => break,
            },
        };
        let db = db.clone();
        let publish = publish.clone();
        let inbox = args.mode == "inbox";
        let txq_reply = args.reply == "txq";
        tokio::spawn(async move {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str());
            let reply = match &db {
                Some(db) => transfer(db, &delivery.data, id.filter(|_| inbox)).await,
                None => Ok(br#"{"status":"ok","result":null}"#.to_vec()),
            };
            let Ok(reply) = reply else {
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                return;
            };
            if let Some(to) = delivery.properties.reply_to() {
                let (props, options) = if txq_reply {
                    let env = txq::broker::Envelope::from_properties(&delivery.properties, None);
                    let headers = txq::broker::ReplyHeaders {
                        status: "ok",
                        attempts: 1,
                        duplicate: false,
                    };
                    let mandatory = BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    };
                    (txq::broker::reply_properties(&env, headers), mandatory)
                } else {
                    let mut props = BasicProperties::default().with_delivery_mode(2);
                    if let Some(id) = delivery.properties.message_id() {
                        props = props.with_correlation_id(id.clone());
                    }
                    (props, BasicPublishOptions::default())
                };
                let confirmed = async {
                    publish
                        .basic_publish("".into(), to.clone(), options, &reply, props)
                        .await?
                        .await
                }
                .await;
                if !confirmed.is_ok_and(|c| c.is_ack()) {
                    let _ = delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await;
                    return;
                }
            }
            let _ = delivery.ack(BasicAckOptions::default()).await;
            drop(permit);
        });
    }
    let _ = conn.close(200, "bye".into()).await;
    println!("txq-stats {{\"settled\":0,\"retries\":0}}");
    Ok(())
}

async fn transfer(db: &Db, body: &[u8], inbox: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let meta = JobMeta::default();
    let mut tx = db.begin(None).await?;
    let reply = match serde_json::from_slice::<handlers::TransferRequest>(body) {
        Ok(req) => match handlers::Transfer.handle(&mut tx, req, &meta).await {
            Ok(result) => {
                serde_json::to_vec(&serde_json::json!({"status": "ok", "result": result}))?
            }
            Err(txq::JobError::Rejected { code, message }) => serde_json::to_vec(
                &serde_json::json!({"status": "rejected", "error": {"code": code, "message": message}}),
            )?,
            Err(e) => return Err(e.into()),
        },
        Err(_) => {
            // noop: one row into jobs_log.
            handlers::Noop
                .handle(&mut tx, serde_json::Value::Null, &meta)
                .await?;
            br#"{"status":"ok","result":null}"#.to_vec()
        }
    };
    if let Some(id) = inbox {
        record(&mut tx, id, &reply).await?;
    }
    tx.commit().await?;
    Ok(reply)
}

/// The inbox row, as txq writes it for a first delivery.
async fn record(tx: &mut txq::Tx, message_id: &str, reply: &[u8]) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let q = match tx.backend() {
        txq::Backend::Postgres => {
            "INSERT INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
             VALUES ($1, 'transfer', 'ok', $2, 1, $3) ON CONFLICT (message_id) DO NOTHING"
        }
        txq::Backend::MySql => {
            "INSERT IGNORE INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
             VALUES (?, 'transfer', 'ok', ?, 1, ?)"
        }
        txq::Backend::Sqlite => {
            "INSERT INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
             VALUES (?, 'transfer', 'ok', ?, 1, ?) ON CONFLICT (message_id) DO NOTHING"
        }
    };
    txq::with_conn!(tx, c => {
        txq::sqlx::query(q).bind(message_id).bind(reply).bind(now).execute(c).await?;
    });
    Ok(())
}
