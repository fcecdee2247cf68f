//! Every event an operator sees, with its log line and its metric defined together,
//! so the two cannot drift apart. The worker calls these; nothing else emits
//! `txq_*` metrics.
//!
//! Metrics go through the `metrics` facade: without an installed recorder (a
//! library user who wants none) they cost next to nothing. `txq run` installs the
//! Prometheus recorder (`txq::http`, feature `cli`).

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use tracing::{debug, error, warn};

use crate::db::TransientReason;

/// Buckets of `txq_job_duration_seconds`: a job is a transaction and two
/// broker round trips, from about a millisecond to the default 30 s timeout.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How a delivery ended: the `outcome` label of `txq_jobs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Committed and answered.
    Ok,
    /// Refused by the handler; answered `rejected`.
    Rejected,
    /// Dead-lettered; answered `failed`.
    Failed,
    /// Sent to a delayed-retry queue.
    Retried,
    /// Already processed: answered from the inbox.
    Duplicate,
    /// Requeued: a publish was not confirmed, or shutdown cut the job short.
    Requeued,
}

impl JobOutcome {
    /// Every outcome, for series that must exist before their first count.
    pub const ALL: [JobOutcome; 6] = [
        Self::Ok,
        Self::Rejected,
        Self::Failed,
        Self::Retried,
        Self::Duplicate,
        Self::Requeued,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::Duplicate => "duplicate",
            Self::Requeued => "requeued",
        }
    }
}

/// Registers the descriptions, so `/metrics` explains each series.
pub fn describe() {
    describe_counter!(
        "txq_jobs_total",
        "Deliveries settled, by job type and outcome"
    );
    describe_histogram!(
        "txq_job_duration_seconds",
        metrics::Unit::Seconds,
        "From delivery to settlement: checks, transaction(s), publishes"
    );
    describe_gauge!("txq_jobs_in_flight", "Jobs running now");
    describe_counter!(
        "txq_console_actions_total",
        "Actions taken in txq console, by action and by who took them"
    );
    describe_counter!(
        "txq_console_messages_moved_total",
        "Dead letters replayed or purged from txq console, by action"
    );
    describe_gauge!("txq_concurrency_limit", "Jobs allowed in flight at most");
    describe_counter!(
        "txq_retries_total",
        "Requests sent to a delayed-retry queue, by job type and transient reason"
    );
    describe_counter!(
        "txq_dead_lettered_total",
        "Requests dead-lettered, by job type and failure kind"
    );
    describe_counter!(
        "txq_duplicates_total",
        "Redeliveries answered from the inbox instead of running again"
    );
    describe_counter!(
        "txq_replies_returned_total",
        "Replies the broker could not route (the reply queue was gone)"
    );
    describe_counter!(
        "txq_broker_reconnects_total",
        "Times the broker connection was rebuilt"
    );
    describe_gauge!(
        "txq_db_pool_connections",
        "Database pool connections by state (idle, in_use, max)"
    );
    describe_counter!(
        "txq_db_transaction_retries_total",
        "In-process retries in a fresh transaction, by transient reason"
    );
    describe_counter!(
        "txq_unparsable_frames_total",
        "Broker connections lost to a frame the AMQP client could not parse"
    );
    describe_counter!(
        "txq_requeues_total",
        "Deliveries handed back to the queue after a failed publish, by reason"
    );
    describe_counter!(
        "txq_publishes_refused_total",
        "Publishes the broker refused because of the message itself"
    );
    describe_gauge!(
        "txq_batches_open",
        "Batches with members still to answer (read from the database by each worker)"
    );
    describe_counter!(
        "txq_batch_completions_total",
        "Batch completions written by this worker, by revision kind (first, revised)"
    );
    describe_counter!(
        "txq_batch_callbacks_total",
        "Runs of the batch callback (on_batch_complete), by result (ok, rejected, failed)"
    );
    describe_histogram!(
        "txq_batch_duration_seconds",
        metrics::Unit::Seconds,
        "From a batch's first counted member to its first completion"
    );
    describe_counter!(
        "txq_batch_completions_published_total",
        "Batch completion messages published, by route (live, sweep)"
    );
    describe_counter!(
        "txq_heartbeat_failures_total",
        "Heartbeats (the worker's row in txq_workers) not written; consuming goes on"
    );
}

/// Buckets of `txq_batch_duration_seconds`: a batch takes from a second to a day.
pub const BATCH_DURATION_BUCKETS: &[f64] = &[
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
];

/// A member's transaction completed its batch (or revised a complete one).
pub(crate) fn batch_completed(batch_id: &str, revision: i64, took: Duration) {
    tracing::info!(batch_id, revision, took = ?took, "batch complete");
    let kind = if revision == 1 { "first" } else { "revised" };
    counter!("txq_batch_completions_total", "kind" => kind).increment(1);
    if revision == 1 {
        histogram!("txq_batch_duration_seconds").record(took.as_secs_f64());
    }
}

/// A completion message went out (`live`: by the worker that completed the
/// batch; `sweep`: by a later sweep, that worker having failed to).
pub(crate) fn batch_completion_published(batch_id: &str, revision: i64, route: &'static str) {
    debug!(batch_id, revision, route, "batch completion published");
    counter!("txq_batch_completions_published_total", "route" => route).increment(1);
}

/// A completion was not published now; a sweep will.
pub(crate) fn batch_completion_deferred(batch_id: &str, error: &dyn std::fmt::Display) {
    warn!(batch_id, error = %error, "the batch completion was not published; a sweep publishes it");
}

/// The batch callback ran for a completion revision: `ok` (committed),
/// `rejected` (refused for good: the completion goes out without it) or `failed`
/// (rolled back: a sweep runs it again, and the completion waits for it).
pub(crate) fn batch_callback(
    batch_id: &str,
    revision: i64,
    result: &'static str,
    error: Option<&dyn std::fmt::Display>,
) {
    match (result, error) {
        ("ok", _) => debug!(batch_id, revision, "batch callback committed"),
        (_, Some(e)) if result == "rejected" => {
            warn!(batch_id, revision, error = %e, "the batch callback refused; the completion goes out without it")
        }
        (_, e) => {
            let e = e.map(ToString::to_string).unwrap_or_default();
            tracing::error!(batch_id, revision, error = %e, "the batch callback failed; the completion waits, and a sweep runs it again")
        }
    }
    counter!("txq_batch_callbacks_total", "result" => result).increment(1);
}

/// A member could not be counted in its batch (its headers disagree with the
/// batch); its answer stands.
pub(crate) fn batch_member_refused(batch_id: &str, reason: &str) {
    warn!(batch_id, reason, "a batch member was not counted");
}

/// How many batches are open.
pub(crate) fn batches_open(n: i64) {
    gauge!("txq_batches_open").set(n as f64);
}

/// The worker started: how many jobs it runs at once. The counters an alert
/// watches are set to 0 for every job type it handles, so that a series exists
/// (and `rate()` and `increase()` work) before its first event.
pub(crate) fn started<'a>(concurrency: usize, job_types: impl Iterator<Item = &'a str>) {
    gauge!("txq_concurrency_limit").set(concurrency as f64);
    gauge!("txq_jobs_in_flight").set(0.0);
    for job_type in job_types {
        for outcome in JobOutcome::ALL {
            counter!("txq_jobs_total", "type" => job_type.to_owned(), "outcome" => outcome.as_str())
                .absolute(0);
        }
    }
    for name in [
        "txq_duplicates_total",
        "txq_replies_returned_total",
        "txq_publishes_refused_total",
        "txq_unparsable_frames_total",
        "txq_broker_reconnects_total",
        "txq_heartbeat_failures_total",
    ] {
        counter!(name).absolute(0);
    }
    for kind in ["first", "revised"] {
        counter!("txq_batch_completions_total", "kind" => kind).absolute(0);
    }
}

/// A job task started.
pub(crate) fn job_started() {
    gauge!("txq_jobs_in_flight").increment(1.0);
}

/// A delivery was settled (or left to the broker); `elapsed` since it arrived.
pub(crate) fn job_settled(job_type: &str, outcome: JobOutcome, elapsed: Duration) {
    // A line per job, as Celery's "Task … succeeded in 0.002s"; its own target so
    // that it can be on (`txq run -v`) while the rest stays at its level. The job
    // span adds message_id and correlation_id.
    tracing::info!(
        target: "txq::job",
        job_type,
        outcome = outcome.as_str(),
        elapsed_ms = elapsed.as_secs_f64() * 1000.0,
        "job {} in {:.1} ms",
        outcome.as_str(),
        elapsed.as_secs_f64() * 1000.0
    );
    gauge!("txq_jobs_in_flight").decrement(1.0);
    let job_type = job_type.to_owned();
    counter!("txq_jobs_total", "type" => job_type.clone(), "outcome" => outcome.as_str())
        .increment(1);
    histogram!("txq_job_duration_seconds", "type" => job_type).record(elapsed.as_secs_f64());
}

/// A redelivery is answered from the inbox.
pub(crate) fn duplicate(status: &str) {
    debug!(status, "duplicate delivery: re-publishing the stored reply");
    counter!("txq_duplicates_total").increment(1);
}

/// A transient failure is retried at once, in a fresh transaction.
pub(crate) fn transaction_retry(reason: TransientReason, attempt: u32, error: &str) {
    debug!(
        error,
        reason = reason.as_str(),
        attempt,
        "transient failure; retrying in a fresh transaction"
    );
    counter!("txq_db_transaction_retries_total", "reason" => reason.as_str()).increment(1);
}

/// A transient failure goes to a delayed-retry queue.
pub(crate) fn delayed_retry(
    job_type: &str,
    reason: &str,
    attempt: u32,
    delay: Duration,
    error: &str,
) {
    warn!(
        reason = reason,
        error,
        attempt,
        ?delay,
        "transient failure; retrying later"
    );
    counter!("txq_retries_total", "type" => job_type.to_owned(), "kind" => reason.to_owned())
        .increment(1);
}

/// A request is dead-lettered; `exhausted` when transient failures used up the
/// attempts.
pub(crate) fn dead_lettered(
    job_type: &str,
    kind: &str,
    error: &str,
    attempts: u32,
    exhausted: bool,
) {
    if exhausted {
        warn!(
            kind,
            error, attempts, "transient failures used up the attempts; dead-lettering it"
        );
    } else {
        warn!(kind, error, attempts, "job failed; dead-lettering it");
    }
    counter!("txq_dead_lettered_total", "type" => job_type.to_owned(), "kind" => kind.to_owned())
        .increment(1);
}

/// The broker returned a reply nobody can receive.
pub(crate) fn reply_returned(queue: &str, text: &str) {
    warn!(queue, reply = %text, "message could not be routed; dropping it");
    counter!("txq_replies_returned_total").increment(1);
}

/// A publish the outcome needed was not confirmed: the request goes back to the
/// queue after `delay`.
pub(crate) fn publish_unconfirmed(error: &dyn std::fmt::Display, delay: Duration) {
    error!(error = %error, ?delay, "a publish was not confirmed; requeueing the request after a pause");
    counter!("txq_requeues_total", "reason" => "publish_unconfirmed").increment(1);
}

/// The broker refused a publish because of the message itself (its properties,
/// its size), and would refuse it again.
pub(crate) fn publish_refused(what: &str, reason: &str) {
    warn!(
        what,
        reason, "rabbitmq refused a publish because of the message itself"
    );
    counter!("txq_publishes_refused_total").increment(1);
}

/// The commit's outcome is unknown: the request goes back for the inbox to settle.
pub(crate) fn commit_unknown(message: &str) {
    warn!(
        error = message,
        "the commit's outcome is unknown; retrying later, the inbox decides"
    );
    counter!("txq_requeues_total", "reason" => "commit_unknown").increment(1);
}

/// The connection was lost to a frame lapin cannot parse: a message whose
/// short-string properties are not UTF-8 (other clients can publish those).
pub(crate) fn unparsable_frame(
    error: &dyn std::fmt::Display,
    queue_type: crate::config::QueueType,
) {
    let remedy = match queue_type {
        crate::config::QueueType::Quorum => {
            "RabbitMQ dead-letters it after `delivery_limit` deliveries"
        }
        crate::config::QueueType::Classic => {
            "a classic queue has no delivery limit, so it stays at the head of the queue: \
             use queue_type = \"quorum\", or remove it (txq dlq purge cannot read it either)"
        }
    };
    error!(error = %error, remedy, "a message the AMQP client cannot parse broke the broker connection");
    counter!("txq_unparsable_frames_total").increment(1);
}

/// The first connection has not been made yet; another attempt after `delay`.
pub(crate) fn connecting(error: &dyn std::fmt::Display, attempt: u32, of: u32, delay: Duration) {
    warn!(error = %error, ?delay, "broker not reachable (attempt {attempt}/{of}); retrying");
}

/// The broker connection is being rebuilt.
pub(crate) fn reconnecting(error: &dyn std::fmt::Display, delay: Duration) {
    warn!(error = %error, ?delay, "broker connection lost; reconnecting");
    counter!("txq_broker_reconnects_total").increment(1);
}

/// The worker's heartbeat (or its prune, or its deregistration at stop) failed:
/// consuming goes on, and the next beat tries again.
pub(crate) fn heartbeat_failed(error: &dyn std::fmt::Display) {
    warn!(error = %error, "the heartbeat was not written (txq_workers); consuming goes on, the next beat tries again");
    counter!("txq_heartbeat_failures_total").increment(1);
}

/// Someone logged in to the console with the token named `actor`.
#[cfg(feature = "cli")]
pub(crate) fn console_login(actor: &str) {
    tracing::info!(target: "txq::console", actor = %actor, "console login");
}

/// An operator acted in the console (replay, purge): who (the token's name, or
/// `local`), on what selection, and how many messages it moved.
#[cfg(feature = "cli")]
pub(crate) fn console_action(
    actor: &str,
    action: &'static str,
    selection: &str,
    moved: u64,
    error: Option<&str>,
) {
    tracing::info!(
        target: "txq::console",
        actor = %actor,
        action,
        // Debug: an operator's filter text cannot start a log line of its own.
        selection = ?selection,
        moved,
        error,
        "console action"
    );
    counter!("txq_console_actions_total", "action" => action, "actor" => actor.to_owned())
        .increment(1);
    counter!("txq_console_messages_moved_total", "action" => action).increment(moved);
}

/// The pool's connections right now; called at each scrape.
pub fn pool_state(max: u32, size: u32, idle: usize) {
    let idle = idle as f64;
    gauge!("txq_db_pool_connections", "state" => "idle").set(idle);
    gauge!("txq_db_pool_connections", "state" => "in_use").set((f64::from(size) - idle).max(0.0));
    gauge!("txq_db_pool_connections", "state" => "max").set(f64::from(max));
}
