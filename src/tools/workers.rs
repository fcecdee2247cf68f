//! `txq workers`: the workers that keep a row in `txq_workers` (`db::fleet`),
//! live or gone, read from the database.

use std::process::ExitCode;
use std::time::Duration;

use crate::Config;
use crate::config::flags::DbArgs;
use crate::db::fleet::{self, WorkerRow};

/// Exit codes beyond the shared ones (README, "Exit codes").
pub mod exit {
    /// Read (live, gone, or no workers at all).
    pub const OK: u8 = 0;
    /// The database could not be used.
    pub const UNAVAILABLE: u8 = 3;
}

/// `txq workers [--json]`.
#[derive(Debug, clap::Args)]
pub struct WorkersArgs {
    /// One JSON array of the workers (each with "state": "live" or "gone")
    /// instead of a table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

/// Runs `txq workers`; prints the table (or JSON), and says the exit code.
pub async fn run(config: &Config, args: WorkersArgs) -> ExitCode {
    match read(config).await {
        Ok(rows) => {
            let now = crate::db::now_ms();
            if args.json {
                let list: Vec<serde_json::Value> = rows.iter().map(|w| record(w, now)).collect();
                println!("{}", serde_json::Value::Array(list));
            } else if rows.is_empty() {
                eprintln!("txq: no workers have a row in txq_workers");
            } else {
                print!("{}", table(&rows, now));
            }
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            if args.json {
                println!("{}", serde_json::json!({ "error": e }));
            } else {
                eprintln!("txq: {e}");
            }
            ExitCode::from(exit::UNAVAILABLE)
        }
    }
}

async fn read(config: &Config) -> Result<Vec<WorkerRow>, String> {
    let db = super::connect_migrated(config).await?;
    let rows = fleet::workers(&db)
        .await
        .map_err(|e| format!("reading txq_workers: {e}"))?;
    db.close().await;
    Ok(rows)
}

fn state(w: &WorkerRow, now_ms: i64) -> &'static str {
    if w.is_gone(now_ms) { "gone" } else { "live" }
}

/// A worker as JSON: its row, and `state`.
fn record(w: &WorkerRow, now_ms: i64) -> serde_json::Value {
    let mut v = serde_json::to_value(w).unwrap_or_default();
    v["state"] = state(w, now_ms).into();
    v
}

/// The workers as a table, a line each, columns aligned.
fn table(rows: &[WorkerRow], now_ms: i64) -> String {
    let header = [
        "ID",
        "HOST",
        "PID",
        "VERSION",
        "QUEUE",
        "STARTED",
        "LAST SEEN",
        "IN FLIGHT",
        "SETTLED",
        "RECONNECTS",
        "STATE",
    ]
    .map(str::to_owned);
    let mut lines = vec![header];
    for w in rows {
        let started = std::time::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(w.started_at_ms).unwrap_or(0));
        lines.push([
            w.id.chars().take(8).collect(),
            w.host.clone(),
            w.pid.to_string(),
            w.version.clone(),
            w.queue.clone(),
            humantime::format_rfc3339_seconds(started).to_string(),
            ago(now_ms - w.last_seen_ms),
            format!("{}/{}", w.in_flight, w.concurrency),
            w.settled.to_string(),
            w.reconnects.to_string(),
            state(w, now_ms).to_owned(),
        ]);
    }
    let mut widths = [0usize; 11];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `3s ago`, `2m 5s ago`; a clock ahead of this one reads as `0s ago`.
fn ago(ms: i64) -> String {
    let secs = u64::try_from(ms.max(0) / 1000).unwrap_or(0);
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_aligns_its_columns_and_says_live_or_gone() {
        let now = 1_700_000_100_000;
        let row = |id: &str, host: &str, seen: i64| WorkerRow {
            id: id.into(),
            host: host.into(),
            pid: 42,
            version: "0.1.0".into(),
            queue: "txq.requests".into(),
            concurrency: 16,
            started_at_ms: 1_700_000_000_000,
            last_seen_ms: seen,
            in_flight: 3,
            settled: 1042,
            reconnects: 1,
        };
        let text = table(
            &[
                row("0123456789abcdef", "a-long-host-name", now - 2_000),
                row("fedcba9876543210", "b", now - 125_000),
            ],
            now,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("ID        HOST  "), "{text}");
        assert!(
            lines[1].starts_with("01234567  a-long-host-name  42   0.1.0    txq.requests  2023-11-14T22:13:20Z  2s ago"),
            "{text}"
        );
        assert!(
            lines[1].contains("3/16") && lines[1].ends_with("live"),
            "{text}"
        );
        assert!(
            lines[2].contains("2m 5s ago") && lines[2].ends_with("gone"),
            "{text}"
        );
        let json = record(&row("x", "h", now - 16_000), now);
        assert_eq!(json["state"], "gone");
        assert_eq!(json["settled"], 1042);
        assert_eq!(ago(-5_000), "0s ago");
    }
}
