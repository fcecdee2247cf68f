//! `txq batch`: the batches the workers track (`db::batch`), read from the database.

use std::process::ExitCode;
use std::time::Duration;

use crate::Config;
use crate::config::flags::DbArgs;
use crate::db::batch::{self, BatchStatus};

/// Exit codes beyond the shared ones (README, "Exit codes").
pub mod exit {
    /// `wait`: every member ok; `status`/`list`: read.
    pub const OK: u8 = 0;
    /// `wait`: a member not ok, or the timeout passed; `status`: no such batch.
    pub const NOT_OK: u8 = 1;
    /// The database could not be used.
    pub const UNAVAILABLE: u8 = 3;
}

/// `txq batch …`.
#[derive(Debug, clap::Subcommand)]
pub enum BatchCommand {
    /// One batch's counts; exit 1 when no member of it has been counted yet.
    #[command(
        after_long_help = "EXAMPLES:\n  txq batch status nightly-2026-12-01\n  \
        txq batch status nightly-2026-12-01 --json"
    )]
    Status {
        /// The batch id (x-txq-batch-id).
        id: String,
        /// One line {"summary":{…}} instead of text
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Batches, newest first.
    #[command(after_long_help = "EXAMPLES:\n  txq batch list --open\n  txq batch list --json")]
    List {
        /// Only batches with members still to answer
        #[arg(long)]
        open: bool,
        /// At most this many
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON line a batch, then {"summary":{…}}
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Wait until a batch completes: exit 0 when every member is ok, otherwise 1 (as
    /// `submit --wait` does), also when the timeout passes first.
    #[command(after_long_help = "EXAMPLES:\n  txq batch wait nightly-2026-12-01 --timeout 1h")]
    Wait {
        /// The batch id (x-txq-batch-id).
        id: String,
        /// Give up after this long [default: wait for ever]
        #[arg(long)]
        timeout: Option<humantime::Duration>,
        /// One line {"summary":{…}} (or {"error":…}) instead of text
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}

impl BatchCommand {
    /// The database flags, for the config's overrides.
    pub fn db_args(&self) -> &DbArgs {
        match self {
            Self::Status { db, .. } | Self::List { db, .. } | Self::Wait { db, .. } => db,
        }
    }

    fn json(&self) -> bool {
        match self {
            Self::Status { json, .. } | Self::List { json, .. } | Self::Wait { json, .. } => *json,
        }
    }
}

/// How often `wait` reads the batch's row.
const POLL: Duration = Duration::from_millis(250);

/// Runs a `txq batch` command; prints its output, and says the exit code.
pub async fn run(config: &Config, command: BatchCommand) -> ExitCode {
    let json = command.json();
    match run_command(config, command).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "error": e }));
            } else {
                eprintln!("txq: {e}");
            }
            ExitCode::from(exit::UNAVAILABLE)
        }
    }
}

async fn run_command(config: &Config, command: BatchCommand) -> Result<u8, String> {
    let db = super::connect_migrated(config).await?;
    let read = |e: sqlx::Error| format!("reading txq_batches: {e}");
    match command {
        BatchCommand::Status { id, json, .. } => {
            let found = batch::status(&db, &id).await.map_err(read)?;
            match found {
                Some(b) => {
                    print_status(&b, json);
                    Ok(exit::OK)
                }
                None => {
                    let message = format!("no batch `{id}`: no member of it has been counted yet");
                    if json {
                        println!("{}", serde_json::json!({ "error": message }));
                    } else {
                        eprintln!("txq: {message}");
                    }
                    Ok(exit::NOT_OK)
                }
            }
        }
        BatchCommand::List {
            open, limit, json, ..
        } => {
            let batches = batch::list(&db, open, i64::from(limit))
                .await
                .map_err(read)?;
            for b in &batches {
                if json {
                    println!("{}", record(b));
                } else {
                    println!("{}", line(b));
                }
            }
            let open_now = batches.iter().filter(|b| !b.complete()).count();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"summary": {"batches": batches.len(), "open": open_now}})
                );
            } else if batches.is_empty() {
                eprintln!("txq: no batches");
            }
            Ok(exit::OK)
        }
        BatchCommand::Wait {
            id, timeout, json, ..
        } => {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + Duration::from(t));
            loop {
                let found = batch::status(&db, &id).await.map_err(read)?;
                if let Some(b) = found.as_ref().filter(|b| b.complete()) {
                    print_status(b, json);
                    return Ok(if b.ok == b.size {
                        exit::OK
                    } else {
                        exit::NOT_OK
                    });
                }
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    let message = match &found {
                        Some(b) => format!(
                            "batch `{id}` is not complete: {} of {} answered",
                            b.done(),
                            b.size
                        ),
                        None => format!("no member of batch `{id}` was counted"),
                    };
                    if json {
                        println!("{}", serde_json::json!({ "error": message }));
                    } else {
                        eprintln!("txq: timed out: {message}");
                    }
                    return Ok(exit::NOT_OK);
                }
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// A batch as a JSON record: the completion's fields, and whether it is complete.
fn record(b: &BatchStatus) -> serde_json::Value {
    let mut v = b.to_json();
    v["complete"] = serde_json::Value::Bool(b.complete());
    v
}

fn print_status(b: &BatchStatus, json: bool) {
    if json {
        println!("{}", serde_json::json!({ "summary": record(b) }));
    } else {
        println!("{}", line(b));
    }
}

/// `<id>: complete (revision 1), 10 of 10 answered: 8 ok, 1 rejected, 1 failed; …`
fn line(b: &BatchStatus) -> String {
    let state = if b.complete() {
        format!("complete (revision {})", b.revision)
    } else {
        "open".to_owned()
    };
    let mut text = format!(
        "{}: {state}, {} of {} answered: {} ok, {} rejected, {} failed; opened {}",
        b.batch_id,
        b.done(),
        b.size,
        b.ok,
        b.rejected,
        b.failed,
        batch::rfc3339(b.opened_at_ms)
    );
    if let Some(done) = b.completed_at_ms {
        text.push_str(&format!(", completed {}", batch::rfc3339(done)));
    }
    text
}
