//! `txq dlq …`: its flags, its output (a table, or JSON lines with `--json`), and
//! its exit codes ([`exit`]).

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{
    DeadLetter, DlqError, Filter, Grouper, ReplayEvent, ReplayOptions, Target, purge, replay,
};
use crate::Config;
use crate::tools::submit::Rate;

/// Exit codes of `txq dlq`, in line with `txq submit`'s.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// `replay` left some selected messages in the dead-letter queue (no original
    /// queue recorded, the target queue does not exist, or a message txq's
    /// worker cannot read, without `--to`).
    pub const NOT_ALL: u8 = 1;
    /// Bad flags or configuration, a dead-letter queue that does not exist,
    /// `purge` without `--yes` when stdin is not a terminal, or a non-classic
    /// queue this user may not publish to (so it cannot be read without counting
    /// deliveries): nothing was changed.
    pub const USAGE: u8 = 2;
    /// The command stopped mid-way: the broker failed (unreachable, connection
    /// lost, a publish nacked) or stdout was closed (`| head`). Nothing is lost;
    /// run the command again.
    pub const BROKER: u8 = 3;
    /// Nothing matched: `show` found no such message_id, `replay` or `purge`
    /// selected nothing.
    pub const NO_MATCH: u8 = 4;
    /// `purge` was declined at the prompt.
    pub const DECLINED: u8 = 5;
}

impl DlqError {
    /// The exit code this error ends `txq dlq` with.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::QueueNotFound(_)
            | Self::InvalidName(_)
            | Self::ToIsDlq(_)
            | Self::NeedsConfirmation
            | Self::CannotRotate { .. } => exit::USAGE,
            Self::Connect { .. }
            | Self::Broker(_)
            | Self::ConnectionLost
            | Self::Nacked(_)
            | Self::Io(_)
            | Self::Output(_) => exit::BROKER,
        }
    }
}

/// `txq dlq`: the dead-letter queue (default: the worker's, `<queue>.dlq`).
#[derive(Debug, Args)]
pub struct DlqArgs {
    /// The dead-letter queue (default: config `dead_letter_queue`, or `<queue>.dlq`)
    #[arg(long, global = true)]
    pub dlq: Option<String>,
    /// JSON lines on stdout instead of text
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// The `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// A table of the dead letters: message_id, type, error kind, attempts,
    /// failed-at, error. Every message keeps its place.
    List {
        /// Count by job type + error kind + normalised error instead
        #[arg(long)]
        group: bool,
        #[command(flatten)]
        select: Select,
    },
    /// Full properties, headers and body of the message(s) with this message_id.
    Show {
        /// The message_id.
        id: String,
    },
    /// Republish to the original queue (or --to) with confirms, then remove from
    /// the DLQ. Attempts start over; the message_id is kept, so the inbox still
    /// prevents a double effect.
    Replay {
        #[command(flatten)]
        select: Select,
        /// Republish here instead of each message's original queue
        #[arg(long)]
        to: Option<String>,
        /// At most this fast: 50/s, 600/m, 1000/h
        #[arg(long)]
        rate: Option<Rate>,
        /// Only say what would be replayed
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove dead letters for good (asks first, unless --yes).
    Purge {
        #[command(flatten)]
        select: Select,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// Which messages; all conditions must hold.
#[derive(Debug, Args)]
pub struct Select {
    /// Job type (the AMQP `type`)
    #[arg(long = "type")]
    pub job_type: Option<String>,
    /// Error kind, e.g. database_error, timeout, rabbitmq:expired
    #[arg(long)]
    pub error_kind: Option<String>,
    /// Substring of the error, the message_id or the body
    #[arg(long)]
    pub grep: Option<String>,
    /// These message_ids (repeat, or list several)
    #[arg(long = "id", num_args = 1..)]
    pub ids: Vec<String>,
    /// Only messages with properties that are not UTF-8 (which txq's worker
    /// cannot read)
    #[arg(long)]
    pub unreadable: bool,
    /// One group of `list --group`: the error's fingerprint, exactly
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// At most this many messages
    #[arg(long)]
    pub limit: Option<u64>,
}

impl Select {
    fn filter(&self) -> Filter {
        Filter {
            job_type: self.job_type.clone(),
            error_kind: self.error_kind.clone(),
            grep: self.grep.clone(),
            ids: self.ids.clone(),
            unreadable: self.unreadable,
            fingerprint: self.fingerprint.clone(),
            untyped: false,
        }
    }
}

/// Runs a `dlq` command, prints what it did (or its error) and returns its exit
/// code.
pub async fn run(config: &Config, args: DlqArgs) -> ExitCode {
    let json = args.json;
    match run_command(config, args).await {
        Ok(code) => ExitCode::from(code),
        // A closed stdout (`txq dlq list | head -1`) ends the command quietly, as
        // ripgrep and cargo do: what was not settled went back as for any stop.
        Err(DlqError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                print_error(&e.to_string());
            } else {
                note(format_args!("txq: {e}"));
            }
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run_command(config: &Config, args: DlqArgs) -> Result<u8, DlqError> {
    let target = Target {
        amqp_url: config.amqp_url.clone(),
        dlq: args
            .dlq
            .clone()
            .unwrap_or_else(|| config.dead_letter_queue()),
    };
    let json = args.json;
    match args.command {
        DlqCommand::List {
            group: false,
            select,
        } => {
            // The header comes with the first row (or at the end), so that an
            // error leaves no table behind.
            let mut header = !json;
            let counts = super::inspect(&target, &select.filter(), select.limit, |m| {
                if std::mem::take(&mut header) {
                    print_header()?;
                }
                if json {
                    print_json(&m.summary())
                } else {
                    print_row(m)
                }
            })
            .await?;
            if header {
                print_header().map_err(DlqError::Output)?;
            }
            if json {
                print_json(&list_summary(&target.dlq, &counts, None)).map_err(DlqError::Output)?;
            }
            note(format_args!(
                "{} of {} message(s) in `{}`",
                counts.matched, counts.depth, target.dlq
            ));
            note_counts(&counts);
            Ok(exit::OK)
        }
        DlqCommand::List {
            group: true,
            select,
        } => {
            let mut grouper = Grouper::default();
            let counts = super::inspect(&target, &select.filter(), select.limit, |m| {
                grouper.add(m);
                Ok(())
            })
            .await?;
            let groups = grouper.into_groups();
            if json {
                groups
                    .iter()
                    .try_for_each(print_json)
                    .map_err(DlqError::Output)?;
                print_json(&list_summary(&target.dlq, &counts, Some(groups.len())))
                    .map_err(DlqError::Output)?;
            } else {
                print_groups(&groups).map_err(DlqError::Output)?;
            }
            note(format_args!(
                "{} group(s), {} of {} message(s) in `{}`",
                groups.len(),
                counts.matched,
                counts.depth,
                target.dlq
            ));
            note_counts(&counts);
            Ok(exit::OK)
        }
        DlqCommand::Show { id } => {
            let filter = Filter {
                ids: vec![id.clone()],
                ..Filter::default()
            };
            let counts = super::inspect(&target, &filter, None, |m| {
                if json {
                    print_json(&m.to_json())
                } else {
                    print_full(m)
                }
            })
            .await?;
            if counts.matched == 0 {
                let error = format!("no message with message_id `{id}` in `{}`", target.dlq);
                if json {
                    print_error(&error);
                } else {
                    note(format_args!("txq: {error}"));
                }
                return Ok(exit::NO_MATCH);
            }
            Ok(exit::OK)
        }
        DlqCommand::Replay {
            select,
            to,
            rate,
            dry_run,
        } => {
            let options = ReplayOptions {
                filter: select.filter(),
                limit: select.limit,
                to,
                rate: rate.map(|r| r.per_second()),
                dry_run,
                max_scanned: None,
                max_replayed: None,
            };
            let report = replay(&target, &options, |event| print_event(json, &event)).await?;
            if json {
                print_json(&serde_json::json!({ "summary": report })).map_err(DlqError::Output)?;
            }
            let (verb, n) = if dry_run {
                (
                    "dry run, nothing replayed: would replay",
                    report.would_replay,
                )
            } else {
                ("replayed", report.replayed)
            };
            note(format_args!(
                "{verb} {n}, skipped {}, of {} selected ({} scanned, {} in `{}` at the start)",
                report.skipped,
                report.counts.matched,
                report.counts.scanned,
                report.counts.depth,
                target.dlq
            ));
            if report.reply_to_gone > 0 {
                note(format_args!(
                    "warning: {} of them have a reply_to queue that no longer exists: their replies will be dropped",
                    report.reply_to_gone
                ));
            }
            note_counts(&report.counts);
            Ok(if report.counts.matched == 0 {
                exit::NO_MATCH
            } else if report.skipped > 0 {
                exit::NOT_ALL
            } else {
                exit::OK
            })
        }
        DlqCommand::Purge { select, yes } => {
            if !yes && !std::io::stdin().is_terminal() {
                return Err(DlqError::NeedsConfirmation);
            }
            let queue = target.dlq.clone();
            let confirm = |n: u64| async move {
                if yes {
                    return Ok(true);
                }
                let answer = tokio::task::spawn_blocking(move || {
                    let _ = write!(
                        std::io::stderr(),
                        "purge {n} message(s) from `{queue}` for good? [y/N] "
                    );
                    let _ = std::io::stderr().flush();
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).map(|_| line)
                })
                .await
                .map_err(|e| DlqError::Io(std::io::Error::other(e)))??;
                Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
            };
            let report =
                purge(&target, &select.filter(), select.limit, |_| Ok(()), confirm).await?;
            if json {
                print_json(&serde_json::json!({ "summary": report })).map_err(DlqError::Output)?;
            }
            if report.counts.matched > 0 && !report.confirmed {
                note(format_args!(
                    "aborted, nothing purged ({} selected, {} in `{}` at the start)",
                    report.counts.matched, report.counts.depth, target.dlq
                ));
            } else {
                note(format_args!(
                    "purged {} of {} selected ({} in `{}` at the start)",
                    report.purged, report.counts.matched, report.counts.depth, target.dlq
                ));
            }
            note_counts(&report.counts);
            Ok(if report.counts.matched == 0 {
                exit::NO_MATCH
            } else if !report.confirmed {
                exit::DECLINED
            } else {
                exit::OK
            })
        }
    }
}

// Output goes through `writeln!`, never `println!`: Rust ignores SIGPIPE, so
// `println!` panics once stdout is closed (`txq dlq list | head`), skipping the
// ordered hand-back of the messages taken. A write error ends the scan instead.

/// What the operator should know beyond the counts: messages no AMQP client
/// library reads.
/// The `--json` convention's last line for `list`: `{"summary": …}`.
fn list_summary(queue: &str, counts: &super::Counts, groups: Option<usize>) -> serde_json::Value {
    let mut summary = serde_json::json!({
        "queue": queue,
        "depth": counts.depth,
        "scanned": counts.scanned,
        "matched": counts.matched,
        "unreadable": counts.unreadable,
    });
    if let Some(groups) = groups {
        summary["groups"] = groups.into();
    }
    serde_json::json!({ "summary": summary })
}

fn note_counts(counts: &super::Counts) {
    if counts.unreadable > 0 {
        note(format_args!(
            "{} of them have properties that are not UTF-8 (shown with U+FFFD; `show ID --json`, with the ID as shown, has their bytes): txq's worker and most AMQP clients cannot read them; `--unreadable` selects them",
            counts.unreadable
        ));
    }
}

/// A line on stdout.
fn out(line: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    writeln!(std::io::stdout().lock(), "{line}")
}

/// A line on stderr for the operator, written once the messages are settled:
/// if stderr is closed there is no one left to tell, and the exit code still
/// says how it went.
fn note(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `--json`'s error: one `{"error":…}` line on stdout (the exit code says what
/// kind). If stdout is closed there is no one left to tell.
fn print_error(error: &str) {
    let _ = print_json(&serde_json::json!({ "error": error }));
}

fn print_json(value: &impl serde::Serialize) -> std::io::Result<()> {
    match serde_json::to_string(value) {
        Ok(line) => out(format_args!("{line}")),
        // Only maps with non-string keys fail, and none are printed.
        Err(e) => {
            note(format_args!("txq: cannot print JSON: {e}"));
            Ok(())
        }
    }
}

/// `s` in at most `width` characters, cut with `…`.
fn cut(s: &str, width: usize) -> String {
    let one_line = s.replace(['\n', '\r', '\t'], " ");
    if one_line.chars().count() <= width {
        return one_line;
    }
    let mut out: String = one_line.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn print_header() -> std::io::Result<()> {
    out(format_args!(
        "{:<36}  {:<12}  {:<20}  {:>8}  {:<24}  ERROR",
        "MESSAGE_ID", "TYPE", "ERROR_KIND", "ATTEMPTS", "FAILED_AT"
    ))
}

fn print_groups(groups: &[super::Group]) -> std::io::Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(
        o,
        "{:>7}  {:<12}  {:<20}  {:<36}  FINGERPRINT",
        "COUNT", "TYPE", "ERROR_KIND", "EXAMPLE"
    )?;
    for g in groups {
        writeln!(
            o,
            "{:>7}  {:<12}  {:<20}  {:<36}  {}",
            g.count,
            cut(g.job_type.as_deref().unwrap_or("-"), 12),
            cut(&g.error_kind, 20),
            cut(g.example_message_id.as_deref().unwrap_or("-"), 36),
            g.fingerprint
        )?;
    }
    Ok(())
}

fn print_row(m: &DeadLetter) -> std::io::Result<()> {
    out(format_args!(
        "{:<36}  {:<12}  {:<20}  {:>8}  {:<24}  {}",
        cut(m.message_id.as_deref().unwrap_or("-"), 36),
        cut(m.job_type.as_deref().unwrap_or("-"), 12),
        cut(&m.error_kind, 20),
        m.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        m.failed_at.as_deref().unwrap_or("-"),
        cut(&m.error, 80)
    ))
}

fn print_full(m: &DeadLetter) -> std::io::Result<()> {
    let v = m.to_json();
    let mut o = std::io::stdout().lock();
    writeln!(
        o,
        "message_id:     {}",
        m.message_id.as_deref().unwrap_or("-")
    )?;
    writeln!(
        o,
        "type:           {}",
        m.job_type.as_deref().unwrap_or("-")
    )?;
    writeln!(o, "origin:         {}", serde_json::json!(m.origin))?;
    if m.is_unreadable() {
        writeln!(
            o,
            "unreadable:     {} (not UTF-8: txq's worker cannot read this message)",
            m.unreadable_fields()
        )?;
    }
    writeln!(o, "error_kind:     {}", m.error_kind)?;
    writeln!(o, "error:          {}", m.error)?;
    writeln!(
        o,
        "original_queue: {}",
        m.original_queue.as_deref().unwrap_or("-")
    )?;
    writeln!(o, "properties:")?;
    if let Some(props) = v["properties"].as_object() {
        for (k, val) in props.iter().filter(|(_, val)| !val.is_null()) {
            writeln!(o, "  {k}: {val}")?;
        }
    }
    writeln!(o, "headers:")?;
    if let Some(headers) = v["headers"].as_object() {
        for (k, val) in headers {
            writeln!(o, "  {k}: {val}")?;
        }
    }
    writeln!(o, "body ({} bytes):", m.body.len())?;
    writeln!(o, "{}", String::from_utf8_lossy(&m.body))?;
    writeln!(o)?;
    Ok(())
}

fn print_event(json: bool, event: &ReplayEvent<'_>) -> std::io::Result<()> {
    let (action, m, to, reason, warning) = match event {
        ReplayEvent::Replayed {
            message,
            to,
            warning,
        } => ("replayed", message, Some(*to), None, *warning),
        ReplayEvent::WouldReplay {
            message,
            to,
            warning,
        } => ("would_replay", message, Some(*to), None, *warning),
        ReplayEvent::Skipped { message, reason } => ("skipped", message, None, Some(reason), None),
    };
    let id = m.message_id.as_deref().unwrap_or("-");
    if json {
        let mut line = serde_json::json!({
            "action": action,
            "message_id": m.message_id,
            "type": m.job_type,
            "error_kind": m.error_kind,
            "to": to,
            "reason": reason,
        });
        if let Some(w) = warning {
            line["warning"] = w.into();
        }
        print_json(&line)
    } else {
        if let Some(w) = warning {
            note(format_args!("txq: warning: {id}: {w}"));
        }
        match (to, reason) {
            (Some(to), _) => out(format_args!("{action} {id} -> {to}")),
            (None, Some(reason)) => out(format_args!("{action} {id}: {reason}")),
            (None, None) => out(format_args!("{action} {id}")),
        }
    }
}
