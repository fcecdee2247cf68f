//! The operator's dead-letter tools: list, show, group, replay and purge what a
//! dead-letter queue holds, txq's own failures and RabbitMQ's (`x-death`) alike.
//!
//! **Invariant:** a `dlq` command never loses a message it did not act on, and
//! never brings one closer to a delivery limit. It takes messages unacked
//! (`scan.rs`), acks one only after it was replayed (publish confirmed) or
//! purged, and gives back the rest: requeued on a classic queue, copied back to
//! the tail of any other (a quorum queue counts every requeue as a delivery). A
//! replayed copy keeps its message_id, so if the tool dies between the confirm
//! and the ack, the second copy that a re-run replays is answered from the
//! worker's inbox instead of running again.
//!
//! Messages are read with an AMQP client of the tools' own (`wire.rs`), so that
//! one whose properties are not UTF-8 (which no AMQP library, lapin included,
//! will parse) is shown, purged, or moved with `replay --to` like any other.

pub mod cli;
mod filter;
mod message;
mod scan;
mod wire;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::tools::submit::DIRECT_REPLY_TO;

pub use filter::{Filter, Group, Grouper, fingerprint};
pub use message::{DeadLetter, Origin, Summary, replay_headers, table_json};
pub use scan::{HandBack, Held, PublishOutcome, Scan, Taken};
pub use wire::{RawProperties, Unreadable, WireError};

/// Why a `dlq` command failed. Messages it had taken and not settled are back in
/// the queue (requeued by the command, or by the broker when the connection went).
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Connecting failed.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The AMQP URL(s), passwords redacted.
        url: String,
        /// What failed.
        source: WireError,
    },
    /// The broker refused an operation.
    #[error("rabbitmq: {0}")]
    Broker(WireError),
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
    /// The broker refused (nacked) a publish to this queue; the message it was a
    /// copy of stays in the dead-letter queue.
    #[error(
        "rabbitmq refused a message published to `{0}` (basic.nack); it stays in the dead-letter queue"
    )]
    Nacked(String),
    /// The queue is not a classic one, so reading it without counting
    /// deliveries means copying each message back to its tail, which the broker
    /// does not allow this user: nothing was read.
    #[error(
        "`{queue}` is not a classic queue, or not one this user may declare ({not_classic}): reading it without counting a delivery on each message (which a quorum queue's delivery limit acts on) means putting each back at its tail, and publishing is refused ({reason}); nothing was read. Grant this user write permission on the default exchange (amq.default), or, for a classic queue, configure permission on it"
    )]
    CannotRotate {
        /// The queue.
        queue: String,
        /// Why it is not known to be classic: the broker's answer to a declare
        /// with `x-queue-type = classic`.
        not_classic: String,
        /// Why publishing is refused: what the broker said.
        reason: String,
    },
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

impl DlqError {
    /// A broker error; a lost connection is [`DlqError::ConnectionLost`].
    pub fn from_wire(e: WireError) -> Self {
        if e.is_connection_lost() {
            Self::ConnectionLost
        } else {
            Self::Broker(e)
        }
    }
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
    /// Of those, messages with properties that are not UTF-8.
    pub unreadable: u64,
    /// How the scan gave back what it kept.
    pub hand_back: Option<HandBack>,
}

/// Calls `each` for every message `filter` selects, at most `limit`; touches
/// nothing (every message goes back in its place). An error from `each`
/// (writing the output) ends the scan: [`DlqError::Output`].
pub async fn inspect(
    target: &Target,
    filter: &Filter,
    limit: Option<u64>,
    each: impl FnMut(&DeadLetter) -> std::io::Result<()>,
) -> Result<Counts, DlqError> {
    inspect_within(target, filter, limit, None, each).await
}

/// [`inspect`], looking at no more than `max_scanned` messages from the head of
/// the queue: a bounded sample of a long queue, for a page that must answer fast.
pub async fn inspect_within(
    target: &Target,
    filter: &Filter,
    limit: Option<u64>,
    max_scanned: Option<u64>,
    mut each: impl FnMut(&DeadLetter) -> std::io::Result<()>,
) -> Result<Counts, DlqError> {
    let mut scan = Scan::open(&target.amqp_url, &target.dlq).await?;
    let mut counts = Counts::new(&scan);
    let result = async {
        while limit.is_none_or(|l| counts.matched < l)
            && max_scanned.is_none_or(|m| counts.scanned < m)
        {
            let Some(taken) = scan.next().await? else {
                break;
            };
            counts.scanned += 1;
            let shown = if filter.matches(&taken.message) {
                counts.count(&taken.message);
                each(&taken.message).map_err(DlqError::Output)
            } else {
                Ok(())
            };
            scan.keep(taken).await?;
            shown?;
        }
        Ok(())
    }
    .await;
    settle(scan, result).await?;
    Ok(counts)
}

impl Counts {
    fn new(scan: &Scan) -> Self {
        Self {
            depth: scan.depth(),
            hand_back: Some(scan.mode()),
            ..Self::default()
        }
    }

    fn count(&mut self, m: &DeadLetter) {
        self.matched += 1;
        if m.is_unreadable() {
            self.unreadable += 1;
        }
    }
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
    /// Look at no more than this many messages from the head of the queue.
    pub max_scanned: Option<u64>,
    /// Stop once this many were replayed (or, with `dry_run`, would be):
    /// unlike `limit`, skipped messages do not count.
    pub max_replayed: Option<u64>,
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
        /// What the operator should know: its `reply_to` queue is gone, so its
        /// reply will be dropped.
        warning: Option<&'a str>,
    },
    /// `--dry-run`: would be republished to `to`.
    WouldReplay {
        /// The message.
        message: &'a DeadLetter,
        /// The queue.
        to: &'a str,
        /// As for `Replayed`.
        warning: Option<&'a str>,
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
    /// Whether this was a `--dry-run` (which changes nothing).
    pub dry_run: bool,
    /// Republished and removed (0 with `--dry-run`).
    pub replayed: u64,
    /// With `--dry-run`, what would have been republished and removed (0 without).
    pub would_replay: u64,
    /// Of the replayed (or would-be replayed), those whose `reply_to` queue no
    /// longer exists: their replies will be dropped.
    pub reply_to_gone: u64,
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
    let mut scan = Scan::open(&target.amqp_url, &target.dlq).await?;
    let mut report = ReplayReport {
        counts: Counts::new(&scan),
        dry_run: options.dry_run,
        ..ReplayReport::default()
    };
    // By reply_to queue: the warning for its messages, if it is gone.
    let mut reply_checks: HashMap<String, Option<String>> = HashMap::new();
    let mut pace = options.rate.map(|r| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let result = async {
        while options.limit.is_none_or(|l| report.counts.matched < l)
            && options
                .max_scanned
                .is_none_or(|m| report.counts.scanned < m)
            && options
                .max_replayed
                .is_none_or(|m| report.replayed + report.would_replay < m)
        {
            let Some(taken) = scan.next().await? else {
                break;
            };
            report.counts.scanned += 1;
            if !options.filter.matches(&taken.message) {
                scan.keep(taken).await?;
                continue;
            }
            report.counts.count(&taken.message);
            let m = &taken.message;
            let now = SystemTime::now();
            let planned = replay_target(options.to.as_deref(), m, &target.dlq)
                .and_then(|to| Ok((to.to_owned(), replay_copy(&taken, now)?)));
            let (to, copy) = match planned {
                Ok(plan) => plan,
                Err(reason) => {
                    report.skipped += 1;
                    let said = on_event(ReplayEvent::Skipped { message: m, reason });
                    scan.keep(taken).await?;
                    said.map_err(DlqError::Output)?;
                    continue;
                }
            };
            let warning = reply_to_warning(&mut scan, &mut reply_checks, m).await?;
            if warning.is_some() {
                report.reply_to_gone += 1;
            }
            if options.dry_run {
                report.would_replay += 1;
                let said = on_event(ReplayEvent::WouldReplay {
                    message: m,
                    to: &to,
                    warning: warning.as_deref(),
                });
                scan.keep(taken).await?;
                said.map_err(DlqError::Output)?;
                continue;
            }
            if let Some(pace) = &mut pace {
                pace.tick().await;
            }
            match scan.publish(&to, &copy, &m.body).await {
                Ok(PublishOutcome::Confirmed) => {}
                Ok(PublishOutcome::Returned(text)) => {
                    report.skipped += 1;
                    let said = on_event(ReplayEvent::Skipped {
                        message: m,
                        reason: format!("queue `{to}` does not exist ({text})"),
                    });
                    scan.keep(taken).await?;
                    said.map_err(DlqError::Output)?;
                    continue;
                }
                Err(e) => {
                    // Nacked, or the connection went: the broker did not take
                    // it; it stays in its place.
                    if !scan.connection_gone() {
                        scan.keep(taken).await?;
                    }
                    return Err(e);
                }
            }
            // Only now: a crash before this line leaves a copy in both queues, and
            // the kept message_id lets the inbox answer the second one.
            scan.ack(taken.tag)?;
            report.replayed += 1;
            on_event(ReplayEvent::Replayed {
                message: m,
                to: &to,
                warning: warning.as_deref(),
            })
            .map_err(DlqError::Output)?;
        }
        Ok(())
    }
    .await;
    settle(scan, result).await?;
    Ok(report)
}

/// Why `m`'s reply will be lost, if it will: its `reply_to` is a queue that no
/// longer exists (the exclusive queue of a finished `txq submit --wait`, say),
/// so the worker's reply goes nowhere. Direct reply-to cannot be checked (its
/// channel is gone or not, no declare says which). One check a queue name.
async fn reply_to_warning(
    scan: &mut Scan,
    checked: &mut HashMap<String, Option<String>>,
    m: &DeadLetter,
) -> Result<Option<String>, DlqError> {
    let Some(reply_to) = m.properties.reply_to().as_ref().map(|r| r.to_string()) else {
        return Ok(None);
    };
    if reply_to.is_empty() || reply_to.starts_with(DIRECT_REPLY_TO) {
        return Ok(None);
    }
    if let Some(known) = checked.get(&reply_to) {
        return Ok(known.clone());
    }
    let warning = (scan.queue_exists(&reply_to).await? == Some(false)).then(|| {
        format!(
            "its reply_to queue `{reply_to}` does not exist (any more): its reply will be dropped"
        )
    });
    checked.insert(reply_to, warning.clone());
    Ok(warning)
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
    each: impl FnMut(&DeadLetter) -> std::io::Result<()>,
    confirm: impl FnOnce(u64) -> F,
) -> Result<PurgeReport, DlqError> {
    purge_within(target, filter, limit, None, each, confirm).await
}

/// [`purge`], looking at no more than `max_scanned` messages from the head of
/// the queue.
pub async fn purge_within<F: std::future::Future<Output = Result<bool, DlqError>>>(
    target: &Target,
    filter: &Filter,
    limit: Option<u64>,
    max_scanned: Option<u64>,
    mut each: impl FnMut(&DeadLetter) -> std::io::Result<()>,
    confirm: impl FnOnce(u64) -> F,
) -> Result<PurgeReport, DlqError> {
    let mut scan = Scan::open(&target.amqp_url, &target.dlq).await?;
    let mut report = PurgeReport {
        counts: Counts::new(&scan),
        ..PurgeReport::default()
    };
    let result = async {
        // Requeue: delivery tags only, 8 bytes a message; Rotate: the messages,
        // to copy them back if the purge is declined.
        let mut held = Vec::new();
        let mut failed = None;
        while limit.is_none_or(|l| report.counts.matched < l)
            && max_scanned.is_none_or(|m| report.counts.scanned < m)
        {
            let Some(taken) = scan.next().await? else {
                break;
            };
            report.counts.scanned += 1;
            if filter.matches(&taken.message) {
                report.counts.count(&taken.message);
                let said = each(&taken.message).map_err(DlqError::Output);
                held.push(scan.hold(taken));
                if let Err(e) = said {
                    // Nothing is purged unless all of it was seen.
                    failed = Some(e);
                    break;
                }
            } else {
                scan.keep(taken).await?;
            }
        }
        if held.is_empty() {
            return failed.map_or(Ok(()), Err);
        }
        if failed.is_none() {
            match confirm(report.counts.matched).await {
                Ok(yes) => report.confirmed = yes,
                Err(e) => failed = Some(e),
            }
        }
        for h in held {
            if report.confirmed {
                scan.ack(h.tag())?;
                report.purged += 1;
            } else {
                scan.release(h).await?;
            }
        }
        failed.map_or(Ok(()), Err)
    }
    .await;
    settle(scan, result).await?;
    Ok(report)
}

/// Gives back what is unsettled and closes; the command's own error comes
/// first. A command that went well goes round the whole queue (Rotate), so a
/// quorum queue keeps its order; one that failed stops at once.
async fn settle(scan: Scan, result: Result<(), DlqError>) -> Result<(), DlqError> {
    match result {
        Ok(()) => scan.finish(true).await,
        Err(e) => {
            // Best effort: if the connection is gone the broker requeued them already.
            let _ = tokio::time::timeout(Duration::from_secs(5), scan.finish(false)).await;
            Err(e)
        }
    }
}

/// The properties of `taken`'s replayed copy (see [`DeadLetter::replayed_headers`]),
/// every other property byte for byte; or why there is none.
fn replay_copy(taken: &Taken, now: SystemTime) -> Result<RawProperties, String> {
    let headers = taken.message.replayed_headers(now).ok_or_else(|| {
        "its header table cannot be decoded (a key that is not UTF-8), so the failure headers cannot be taken off a copy: purge it (--unreadable selects it), or read it with a client that takes raw bytes".to_owned()
    })?;
    Ok(taken
        .raw
        .clone()
        .with_headers(&headers)
        .with_delivery_mode(2))
}

/// Where a replay sends `m`: `--to`, else its original queue; or why it cannot.
fn replay_target<'a>(to: Option<&'a str>, m: &'a DeadLetter, dlq: &str) -> Result<&'a str, String> {
    if to.is_none() && m.is_unreadable() {
        // The worker's client would drop its connection on it, again and again
        // (a quorum request queue dead-letters it back here after its delivery
        // limit; a classic one would hand it out for ever).
        return Err(format!(
            "it has properties that are not UTF-8 ({}), which txq's worker cannot read (its AMQP client drops the connection on it): pass --to QUEUE to move it, or purge it (--unreadable selects it)",
            m.unreadable_fields()
        ));
    }
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
