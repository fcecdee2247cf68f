//! The operator's dead-letter tools: list, show, group, replay and purge what a
//! dead-letter queue holds, txq's own failures and RabbitMQ's (`x-death`) alike.
//!
//! **Invariant:** a `dlq` command never loses or duplicates a message it did not
//! act on. It takes messages unacked (`scan.rs`), acks one only after it was
//! replayed (publish confirmed) or purged, and requeues the rest. A replayed copy
//! keeps its message_id, so if the tool dies between the confirm and the ack, the
//! second copy that a re-run replays is answered from the worker's inbox instead of
//! running again.

pub mod cli;
mod filter;
mod message;
mod scan;

use std::time::{Duration, SystemTime};

pub use filter::{Filter, Group, Grouper, fingerprint};
pub use message::{DeadLetter, Origin, Summary, replay_headers, table_json};
pub use scan::{Scan, Taken};

use crate::broker::{BrokerError, PublishError, PublishOutcome};

/// Why a `dlq` command failed. Messages it had taken and not settled are back in
/// the queue (requeued by the command, or by the broker when the connection went).
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Connecting failed.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The AMQP URL, password redacted.
        url: String,
        /// What failed.
        source: BrokerError,
    },
    /// The broker refused an operation.
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    /// The dead-letter queue does not exist.
    #[error("queue `{0}` does not exist (is --dlq / the config's queue right?)")]
    QueueNotFound(String),
    /// A queue name that is empty or longer than AMQP's 255 bytes.
    #[error("`{0}` is not a queue name (1 to 255 bytes)")]
    InvalidName(String),
    /// The connection dropped mid-way. Nothing is lost: the broker requeued the
    /// unacked messages; a replayed message whose ack did not arrive is in both
    /// queues, and the inbox answers its second copy.
    #[error(
        "lost the connection to RabbitMQ; nothing is lost (unsettled messages are back in the queue), run the command again"
    )]
    ConnectionLost,
    /// A republish was not confirmed (nacked); it stays in the dead-letter queue.
    #[error("replaying: {0}")]
    Publish(#[from] PublishError),
    /// `--to` names the dead-letter queue itself.
    #[error("--to must differ from the dead-letter queue `{0}`")]
    ToIsDlq(String),
    /// Purging needs a confirmation that cannot be asked for.
    #[error(
        "purge asks for confirmation, but stdin is not a terminal: pass --yes to purge without asking"
    )]
    NeedsConfirmation,
    /// Reading the answer to the confirmation failed.
    #[error("reading the confirmation: {0}")]
    Io(#[from] std::io::Error),
    /// Writing what the command found failed (stdout closed, as by `| head`):
    /// it stops there, and what it had not settled goes back in its place.
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

/// Which queue, on which broker.
#[derive(Debug, Clone)]
pub struct Target {
    /// The AMQP URL (secret: never printed).
    pub amqp_url: crate::config::SecretUrl,
    /// The dead-letter queue.
    pub dlq: String,
}

/// How much a command looked at.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counts {
    /// Ready messages when it started.
    pub depth: u32,
    /// Messages taken and looked at.
    pub scanned: u64,
    /// Messages the filter selected (up to `--limit`).
    pub matched: u64,
}

/// Calls `each` for every message `filter` selects, at most `limit`; touches
/// nothing (every message goes back in its place). An error from `each`
/// (writing the output) ends the scan: [`DlqError::Output`].
pub async fn inspect(
    target: &Target,
    filter: &Filter,
    limit: Option<u64>,
    mut each: impl FnMut(&DeadLetter) -> std::io::Result<()>,
) -> Result<Counts, DlqError> {
    let mut scan = Scan::open(target.amqp_url.expose(), &target.dlq).await?;
    let mut counts = Counts {
        depth: scan.depth(),
        ..Counts::default()
    };
    let result = async {
        while limit.is_none_or(|l| counts.matched < l) {
            let Some(taken) = scan.next().await? else {
                break;
            };
            counts.scanned += 1;
            scan.keep(taken.tag);
            if filter.matches(&taken.message) {
                counts.matched += 1;
                each(&taken.message).map_err(DlqError::Output)?;
            }
        }
        Ok(())
    }
    .await;
    settle(scan, result).await?;
    Ok(counts)
}

/// `replay`'s choices.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Which messages.
    pub filter: Filter,
    /// At most this many.
    pub limit: Option<u64>,
    /// Instead of each message's original queue.
    pub to: Option<String>,
    /// Republishes per second at most.
    pub rate: Option<f64>,
    /// Report what would be replayed; change nothing.
    pub dry_run: bool,
}

/// What became of one selected message.
#[derive(Debug)]
pub enum ReplayEvent<'a> {
    /// Republished (confirmed) to `to`, and removed from the dead-letter queue.
    Replayed {
        /// The message.
        message: &'a DeadLetter,
        /// The queue.
        to: &'a str,
    },
    /// `--dry-run`: would be republished to `to`.
    WouldReplay {
        /// The message.
        message: &'a DeadLetter,
        /// The queue.
        to: &'a str,
    },
    /// Left in the dead-letter queue.
    Skipped {
        /// The message.
        message: &'a DeadLetter,
        /// Why.
        reason: String,
    },
}

/// What `replay` did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ReplayReport {
    /// What it looked at.
    #[serde(flatten)]
    pub counts: Counts,
    /// Republished and removed (or, with `--dry-run`, would have been).
    pub replayed: u64,
    /// Selected but left in the dead-letter queue (no known original queue, one
    /// that is not a queue name, or the target queue does not exist).
    pub skipped: u64,
}

/// Republishes the selected messages, each to its original queue (or `to`) with a
/// confirm, and only then acks its dead-letter copy; the others keep their place.
/// An error from `on_event` (writing the output) ends the replay:
/// [`DlqError::Output`].
pub async fn replay(
    target: &Target,
    options: &ReplayOptions,
    mut on_event: impl FnMut(ReplayEvent<'_>) -> std::io::Result<()>,
) -> Result<ReplayReport, DlqError> {
    if let Some(to) = &options.to {
        if to == &target.dlq {
            return Err(DlqError::ToIsDlq(target.dlq.clone()));
        }
        if to.is_empty() || to.len() > 255 {
            return Err(DlqError::InvalidName(to.clone()));
        }
    }
    let mut scan = Scan::open(target.amqp_url.expose(), &target.dlq).await?;
    let publisher = scan.publisher();
    let mut report = ReplayReport {
        counts: Counts {
            depth: scan.depth(),
            ..Counts::default()
        },
        ..ReplayReport::default()
    };
    let mut pace = options.rate.map(|r| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let result = async {
        while options.limit.is_none_or(|l| report.counts.matched < l) {
            let Some(taken) = scan.next().await? else {
                break;
            };
            report.counts.scanned += 1;
            let m = &taken.message;
            if !options.filter.matches(m) {
                scan.keep(taken.tag);
                continue;
            }
            report.counts.matched += 1;
            let to = match replay_target(options.to.as_deref(), m, &target.dlq) {
                Ok(to) => to,
                Err(reason) => {
                    scan.keep(taken.tag);
                    report.skipped += 1;
                    on_event(ReplayEvent::Skipped { message: m, reason })
                        .map_err(DlqError::Output)?;
                    continue;
                }
            };
            if options.dry_run {
                scan.keep(taken.tag);
                report.replayed += 1;
                on_event(ReplayEvent::WouldReplay { message: m, to }).map_err(DlqError::Output)?;
                continue;
            }
            if let Some(pace) = &mut pace {
                pace.tick().await;
            }
            let props = m.replay_properties(SystemTime::now());
            match publisher.publish(to, &m.body, props).await {
                Ok(PublishOutcome::Confirmed) => {}
                Ok(PublishOutcome::Returned(text)) => {
                    scan.keep(taken.tag);
                    report.skipped += 1;
                    on_event(ReplayEvent::Skipped {
                        message: m,
                        reason: format!("queue `{to}` does not exist ({text})"),
                    })
                    .map_err(DlqError::Output)?;
                    continue;
                }
                // Whatever the publisher saw (pool, channel, I/O), a dead
                // connection is the cause to report.
                Err(_) if scan.connection_gone() => return Err(DlqError::ConnectionLost),
                Err(PublishError::Amqp(e)) if e.is_io_error() => {
                    return Err(DlqError::ConnectionLost);
                }
                Err(e) => {
                    // Nacked: the broker did not take it; it stays in its place.
                    scan.keep(taken.tag);
                    return Err(e.into());
                }
            }
            // Only now: a crash before this line leaves a copy in both queues, and
            // the kept message_id lets the inbox answer the second one.
            scan.ack(taken.tag).await?;
            report.replayed += 1;
            on_event(ReplayEvent::Replayed { message: m, to }).map_err(DlqError::Output)?;
        }
        Ok(())
    }
    .await;
    publisher.close().await;
    settle(scan, result).await?;
    Ok(report)
}

/// What `purge` did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PurgeReport {
    /// What it looked at.
    #[serde(flatten)]
    pub counts: Counts,
    /// Removed for good.
    pub purged: u64,
    /// Whether the purge was confirmed.
    pub confirmed: bool,
}

/// Removes the selected messages for good, after `confirm(count)` says yes; until
/// then they are held unacked, so exactly the messages counted are purged.
pub async fn purge<F: std::future::Future<Output = Result<bool, DlqError>>>(
    target: &Target,
    filter: &Filter,
    limit: Option<u64>,
    mut each: impl FnMut(&DeadLetter) -> std::io::Result<()>,
    confirm: impl FnOnce(u64) -> F,
) -> Result<PurgeReport, DlqError> {
    let mut scan = Scan::open(target.amqp_url.expose(), &target.dlq).await?;
    let mut report = PurgeReport {
        counts: Counts {
            depth: scan.depth(),
            ..Counts::default()
        },
        ..PurgeReport::default()
    };
    let result = async {
        // Delivery tags only: 8 bytes a message.
        let mut tags = Vec::new();
        while limit.is_none_or(|l| report.counts.matched < l) {
            let Some(taken) = scan.next().await? else {
                break;
            };
            report.counts.scanned += 1;
            if filter.matches(&taken.message) {
                report.counts.matched += 1;
                tags.push(taken.tag);
                if let Err(e) = each(&taken.message).map_err(DlqError::Output) {
                    // Nothing is purged unless all of it was seen.
                    tags.into_iter().for_each(|t| scan.keep(t));
                    return Err(e);
                }
            } else {
                scan.keep(taken.tag);
            }
        }
        if tags.is_empty() {
            return Ok(());
        }
        report.confirmed = match confirm(report.counts.matched).await {
            Ok(yes) => yes,
            Err(e) => {
                tags.into_iter().for_each(|t| scan.keep(t));
                return Err(e);
            }
        };
        for tag in tags {
            if report.confirmed {
                scan.ack(tag).await?;
                report.purged += 1;
            } else {
                scan.keep(tag);
            }
        }
        Ok(())
    }
    .await;
    settle(scan, result).await?;
    Ok(report)
}

/// Requeues what is unsettled and closes; the command's own error comes first.
async fn settle(scan: Scan, result: Result<(), DlqError>) -> Result<(), DlqError> {
    match result {
        Ok(()) => scan.finish().await,
        Err(e) => {
            // Best effort: if the connection is gone the broker requeued them already.
            let _ = tokio::time::timeout(Duration::from_secs(5), scan.finish()).await;
            Err(e)
        }
    }
}

/// Where a replay sends `m`: `--to`, else its original queue; or why it cannot.
fn replay_target<'a>(to: Option<&'a str>, m: &'a DeadLetter, dlq: &str) -> Result<&'a str, String> {
    let Some(to) = to.or(m.original_queue.as_deref()) else {
        return Err("no original queue is recorded: pass --to".into());
    };
    if to == dlq {
        return Err("its original queue is the dead-letter queue itself: pass --to".into());
    }
    // A header anyone could have set: a name AMQP cannot carry would fail the
    // publish, and stop every re-run at this same message.
    if lapin::types::ShortString::try_new(to).is_err() {
        return Err(format!(
            "its original queue is not a queue name (longer than 255 bytes: {} bytes): pass --to",
            to.len()
        ));
    }
    Ok(to)
}
