//! One delivery, start to end of its transaction: check, decode, begin, claim the
//! inbox row, handle, complete the row, commit; with in-process retries of transient
//! errors in fresh transactions.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt as _;
use tracing::debug;

use super::outcome::{FailureKind, Outcome, Status, ok_body, rejected_body};
use super::{Context, JobSpec};
use crate::broker::Envelope;
use crate::db::inbox::{self, StoredReply};
use crate::db::{ErrorClass, TransientReason};
use crate::handler::{DynHandler, JobError, JobMeta, Payload, error_chain};

/// The worker's own timeout runs a little past the database's, so that the
/// database normally ends a runaway statement first and releases its locks cleanly.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(500);

/// How one attempt ended, short of an error.
enum Done<'a> {
    /// Committed; the `ok` reply body.
    Committed(Vec<u8>),
    /// Another delivery of this message_id committed first.
    Duplicate(&'a str),
}

/// Why one attempt did not commit.
enum AttemptError {
    Job(JobError),
    Panicked(String),
    TimedOut(Duration),
    /// The `ok` reply would be this many bytes, over `max_reply_bytes`.
    ReplyTooLarge(usize),
    /// The COMMIT was sent and no answer came back (the connection dropped, or it
    /// timed out): it may have landed, or may still.
    CommitUnknown(String),
}

impl From<sqlx::Error> for AttemptError {
    fn from(e: sqlx::Error) -> Self {
        Self::Job(JobError::Database(e))
    }
}

/// Runs the job a delivery asks for and says how it ended. Never panics, whatever
/// the body or the handler does.
pub(crate) async fn execute(
    ctx: &Context,
    env: &Envelope,
    body: &[u8],
    redelivered: bool,
) -> Outcome {
    let job = match prepare(ctx, env, body) {
        Ok(job) => job,
        Err(outcome) => return outcome,
    };
    let inbox_id = env.message_id.as_deref().filter(|_| ctx.inbox);
    if env.message_id.is_none() {
        // No idempotency key: processed at least once, not exactly once.
        metrics::counter!("txq_requests_without_message_id_total", "type" => job.job_type.to_owned())
            .increment(1);
        debug!("request without message_id: no deduplication");
    }
    let mut meta = JobMeta {
        job_type: job.job_type.to_owned(),
        message_id: env.message_id.clone(),
        correlation_id: env.correlation_id.clone(),
        attempt: 0,
        delivery_attempt: env.attempt,
        redelivered,
        traceparent: env.outgoing_traceparent(),
    };
    let last = ctx.retry.in_process_attempts;
    let mut decoded = Some(job.payload);
    let mut attempt = 1;
    loop {
        meta.attempt = attempt;
        // A payload is consumed by its attempt; retries decode the body again
        // (it decoded once, and decoding is deterministic).
        let payload = match decoded.take().map_or_else(|| job.handler.decode(body), Ok) {
            Ok(p) => p,
            Err(e) => return failed(json_failure_kind(&e), e.to_string()),
        };
        let done = attempt_once(
            ctx,
            job.handler.as_ref(),
            job.spec,
            inbox_id,
            payload,
            &meta,
        );
        let error = match done.await {
            Ok(Done::Committed(body)) => {
                return Outcome::Finished {
                    status: Status::Ok,
                    body,
                    duplicate: false,
                };
            }
            Ok(Done::Duplicate(id)) => match stored_reply(ctx, id).await {
                Ok(outcome) => return outcome,
                Err(e) => AttemptError::from(e),
            },
            Err(e) => match answer_from_inbox(ctx, inbox_id, e).await {
                Ok(error) => error,
                Err(answer) => return answer,
            },
        };
        let verdict = judge(
            ctx,
            job.job_type,
            inbox_id,
            env.attempt,
            error,
            attempt == last,
        );
        let (reason, message) = match verdict.await {
            Ok(retry) => retry,
            Err(outcome) => return outcome,
        };
        crate::events::transaction_retry(reason, attempt, &message);
        ctx.health.count_retry();
        tokio::time::sleep(backoff(ctx.retry.base_delay, ctx.retry.max_delay, attempt)).await;
        attempt += 1;
    }
}

fn failed(kind: FailureKind, message: String) -> Outcome {
    Outcome::Failed { kind, message }
}

/// What the checks before any transaction found: the job to run.
struct Job<'a> {
    job_type: &'a str,
    handler: &'a std::sync::Arc<dyn DynHandler>,
    spec: &'a JobSpec,
    payload: Payload,
}

/// Size, type and payload are checked before a connection is taken: bad input
/// must not cost a transaction.
fn prepare<'a>(ctx: &'a Context, env: &'a Envelope, body: &[u8]) -> Result<Job<'a>, Outcome> {
    if body.len() > ctx.max_body_bytes {
        return Err(failed(
            FailureKind::BodyTooLarge,
            format!(
                "body of {} bytes exceeds max_body_bytes {}",
                body.len(),
                ctx.max_body_bytes
            ),
        ));
    }
    let Some(job_type) = env.job_type.as_deref() else {
        return Err(failed(
            FailureKind::MissingType,
            "the request has no `type` property and the queue has no default type".into(),
        ));
    };
    let (Some(handler), Some(spec)) = (ctx.registry.get(job_type), ctx.specs.get(job_type)) else {
        let mut known: Vec<&str> = ctx.registry.job_types().collect();
        known.sort_unstable();
        return Err(failed(
            FailureKind::UnknownType,
            format!(
                "unknown job type `{job_type}` (this worker handles: {})",
                known.join(", ")
            ),
        ));
    };
    match handler.decode(body) {
        Ok(payload) => Ok(Job {
            job_type,
            handler,
            spec,
            payload,
        }),
        Err(e) => Err(failed(
            json_failure_kind(&e),
            format!("payload for `{job_type}`: {e}"),
        )),
    }
}

/// The inbox protocol (ARCHITECTURE.md, "Effects happen once"): an error of a job
/// whose id has a row is answered from the row (`Err`); a failed lookup makes the
/// attempt transient, but an unknown commit stays unknown.
async fn answer_from_inbox(
    ctx: &Context,
    inbox_id: Option<&str>,
    error: AttemptError,
) -> Result<AttemptError, Outcome> {
    let Some(id) = inbox_id else {
        return Ok(error);
    };
    if matches!(error, AttemptError::Job(JobError::Rejected { .. })) {
        return Ok(error);
    }
    match inbox::lookup(&ctx.db, id).await {
        Ok(Some(stored)) => Err(answered(stored)),
        Ok(None) => Ok(error),
        Err(_) if matches!(error, AttemptError::CommitUnknown(_)) => Ok(error),
        Err(e) => Ok(AttemptError::from(e)),
    }
}

/// What an attempt's error means: another attempt (`Ok`, its reason and message),
/// or how the job ends (`Err`). `last`: no in-process attempt is left.
async fn judge(
    ctx: &Context,
    job_type: &str,
    inbox_id: Option<&str>,
    delivery_attempt: u32,
    error: AttemptError,
    last: bool,
) -> Result<(TransientReason, String), Outcome> {
    let (reason, message) = match error {
        AttemptError::Panicked(message) => {
            return Err(failed(
                FailureKind::Panic,
                format!("handler panicked: {message}"),
            ));
        }
        AttemptError::TimedOut(limit) => (
            TransientReason::Timeout,
            format!("the job ran past its timeout of {limit:?}"),
        ),
        AttemptError::ReplyTooLarge(size) => {
            return Err(failed(
                FailureKind::ReplyTooLarge,
                format!(
                    "the reply of {size} bytes exceeds max_reply_bytes {}; nothing was committed",
                    ctx.max_reply_bytes
                ),
            ));
        }
        // It may have committed: never answer `failed` for it. Another attempt is
        // safe (the inbox key makes it wait for, then see, a late commit).
        AttemptError::CommitUnknown(message) if last => {
            return Err(Outcome::Unresolved { message });
        }
        AttemptError::CommitUnknown(message) => (TransientReason::Connection, message),
        AttemptError::Job(JobError::Rejected { code, message }) => {
            let answer = rejected(ctx, inbox_id, job_type, &code, &message, delivery_attempt);
            return Err(answer.await);
        }
        AttemptError::Job(JobError::Database(e)) => match ctx.db.classify(&e) {
            ErrorClass::Transient(reason) => (reason, format!("database: {e}")),
            ErrorClass::Permanent => {
                return Err(failed(FailureKind::DatabaseError, format!("database: {e}")));
            }
        },
        AttemptError::Job(JobError::Transient(e)) => {
            (TransientReason::Handler, error_chain(e.as_ref()))
        }
        AttemptError::Job(JobError::Permanent(e)) => {
            return Err(failed(FailureKind::HandlerError, error_chain(e.as_ref())));
        }
    };
    if last {
        Err(Outcome::Transient { reason, message })
    } else {
        Ok((reason, message))
    }
}

/// One attempt in a transaction of its own: commit on success, roll back otherwise
/// (a panic or a timeout included).
async fn attempt_once<'a>(
    ctx: &Context,
    handler: &dyn DynHandler,
    spec: &JobSpec,
    inbox_id: Option<&'a str>,
    payload: Payload,
    meta: &JobMeta,
) -> Result<Done<'a>, AttemptError> {
    let limit = spec.timeout + TIMEOUT_MARGIN;
    let work = async {
        let mut tx = ctx.db.begin_job(&spec.begin).await?;
        // Claim first on a redelivery, record last otherwise (ARCHITECTURE.md).
        let claimed = match inbox_id {
            Some(id) if meta.redelivered => {
                if !inbox::claim(&mut tx, id, &meta.job_type).await? {
                    let _ = tx.rollback().await;
                    return Ok((None, Done::Duplicate(id)));
                }
                true
            }
            _ => false,
        };
        let result = AssertUnwindSafe(handler.call(&mut tx, payload, meta))
            .catch_unwind()
            .await;
        let output = match result {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => {
                // A broken connection cannot roll back; the server drops the
                // transaction with the connection.
                let _ = tx.rollback().await;
                return Err(AttemptError::Job(e));
            }
            Err(panic) => {
                let _ = tx.rollback().await;
                return Err(AttemptError::Panicked(panic_message(panic.as_ref())));
            }
        };
        let body = ok_body(&output);
        // Before COMMIT: a reply the broker would refuse must not be committed
        // into the inbox, where every redelivery would find it again.
        if body.len() > ctx.max_reply_bytes {
            let _ = tx.rollback().await;
            return Err(AttemptError::ReplyTooLarge(body.len()));
        }
        if let Some(id) = inbox_id {
            let stored = StoredReply {
                status: Status::Ok.as_str().into(),
                body: body.clone(),
                attempts: meta.delivery_attempt,
            };
            if claimed {
                inbox::complete(&mut tx, id, &stored).await?;
            } else if !inbox::record_in(&mut tx, id, &meta.job_type, &stored).await? {
                // Done before (or just now, by a racing delivery): undo this
                // run's effects and answer from the row.
                let _ = tx.rollback().await;
                return Ok((None, Done::Duplicate(id)));
            }
        }
        Ok((Some(tx), Done::Committed(body)))
    };
    // Dropping the work on timeout drops its transaction, which rolls it back.
    let (tx, done) = match tokio::time::timeout(limit, work).await {
        Ok(result) => result?,
        Err(_) => return Err(AttemptError::TimedOut(spec.timeout)),
    };
    // The commit has a time limit of its own, so that one that never answers (a
    // silently dead socket) cannot hold the permit for good.
    if let Some(tx) = tx {
        match tokio::time::timeout(limit, tx.commit()).await {
            Ok(Ok(())) => {}
            // The server answered with an error: it did not commit.
            Ok(Err(e @ sqlx::Error::Database(_))) => return Err(e.into()),
            Ok(Err(e)) => return Err(AttemptError::CommitUnknown(format!("COMMIT: {e}"))),
            Err(_) => {
                return Err(AttemptError::CommitUnknown(format!(
                    "COMMIT did not answer within {limit:?}"
                )));
            }
        }
    }
    Ok(done)
}

/// A rejection is recorded in the inbox (in a transaction of its own, the job's
/// having been rolled back) so a redelivery gets the same answer.
async fn rejected(
    ctx: &Context,
    inbox_id: Option<&str>,
    job_type: &str,
    code: &str,
    message: &str,
    attempts: u32,
) -> Outcome {
    let body = rejected_body(code, message);
    if let Some(id) = inbox_id {
        let stored = StoredReply {
            status: Status::Rejected.as_str().into(),
            body: body.clone(),
            attempts,
        };
        match inbox::record(&ctx.db, id, job_type, &stored).await {
            Ok(true) => {}
            // A racing delivery finished first: its answer is the answer.
            Ok(false) => match stored_reply(ctx, id).await {
                Ok(outcome) => return outcome,
                Err(e) => return transient_db(ctx, &e),
            },
            Err(e) => return transient_db(ctx, &e),
        }
    }
    Outcome::Finished {
        status: Status::Rejected,
        body,
        duplicate: false,
    }
}

/// The stored answer of an earlier delivery.
fn answered(stored: StoredReply) -> Outcome {
    Outcome::Finished {
        // txq stores `ok` and `rejected` only.
        status: Status::parse(&stored.status).unwrap_or(Status::Ok),
        body: stored.body,
        duplicate: true,
    }
}

fn transient_db(ctx: &Context, e: &sqlx::Error) -> Outcome {
    let reason = match ctx.db.classify(e) {
        ErrorClass::Transient(reason) => reason,
        ErrorClass::Permanent => TransientReason::Connection,
    };
    Outcome::Transient {
        reason,
        message: format!("inbox: {e}"),
    }
}

async fn stored_reply(ctx: &Context, id: &str) -> Result<Outcome, sqlx::Error> {
    match inbox::lookup(&ctx.db, id).await? {
        Some(stored) => Ok(answered(stored)),
        // Claimed by a transaction that then rolled back, or pruned in between:
        // another attempt decides.
        None => Ok(Outcome::Transient {
            reason: TransientReason::Handler,
            message: format!("inbox row for `{id}` vanished"),
        }),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

fn json_failure_kind(e: &serde_json::Error) -> FailureKind {
    match e.classify() {
        serde_json::error::Category::Data => FailureKind::InvalidPayload,
        _ => FailureKind::MalformedJson,
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(max, base·2^(attempt-1))].
pub(crate) fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    ceiling.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(10);
        let max = Duration::from_millis(100);
        for _ in 0..100 {
            assert!(backoff(base, max, 1) <= base);
            assert!(backoff(base, max, 3) <= base * 4);
            assert!(backoff(base, max, 30) <= max);
        }
    }

    #[test]
    fn syntax_errors_and_shape_errors_are_told_apart() {
        let syntax = serde_json::from_slice::<serde_json::Value>(b"{not json").unwrap_err();
        assert_eq!(json_failure_kind(&syntax), FailureKind::MalformedJson);
        let utf8 = serde_json::from_slice::<serde_json::Value>(b"\"\xff\"").unwrap_err();
        assert_eq!(json_failure_kind(&utf8), FailureKind::MalformedJson);
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct P {
            n: i64,
        }
        let shape = serde_json::from_slice::<P>(br#"{"n":"x"}"#).unwrap_err();
        assert_eq!(json_failure_kind(&shape), FailureKind::InvalidPayload);
    }
}
