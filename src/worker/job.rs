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
use crate::db::TransientReason;
use crate::db::batch::{self, BatchError, Completion, Count, Final, Member};
use crate::db::inbox::{Entry, Inbox, StoredReply, StoredStatus};
use crate::handler::{DynHandler, JobError, JobMeta, Payload, error_chain};

/// The worker's own timeout runs a little past the database's, so that the
/// database normally ends a runaway statement first and releases its locks cleanly.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(500);

/// How one attempt ended, short of an error.
enum Done {
    /// Committed; the `ok` reply body, and the batch completion this commit wrote.
    Committed(Vec<u8>, Option<Completion>),
    /// Another delivery of this message_id committed first: its answer is the answer.
    Taken,
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
    /// The batch refused the member (its size disagrees, or it is one too many).
    InvalidBatch(String),
}

impl From<sqlx::Error> for AttemptError {
    fn from(e: sqlx::Error) -> Self {
        Self::Job(JobError::Database(e))
    }
}

/// The batch member a request is, if it is one (its headers checked in `prepare`).
pub(crate) fn batch_member(env: &Envelope) -> Option<Member<'_>> {
    match (&env.batch, &env.message_id) {
        (Some(Ok(tag)), Some(message_id)) => Some(Member {
            tag,
            message_id,
            reply_to: env.reply_to.as_deref(),
        }),
        _ => None,
    }
}

/// Runs the job a delivery asks for and says how it ended, with the batch
/// completion its commit wrote, if any. Never panics, whatever the body or the
/// handler does.
pub(crate) async fn execute(
    ctx: &Context,
    env: &Envelope,
    body: &[u8],
    redelivered: bool,
) -> (Outcome, Option<Completion>) {
    let mut completion = None;
    let outcome = run(ctx, env, body, redelivered, &mut completion).await;
    (outcome, completion)
}

async fn run(
    ctx: &Context,
    env: &Envelope,
    body: &[u8],
    redelivered: bool,
    completion: &mut Option<Completion>,
) -> Outcome {
    let (job, payload) = match prepare(ctx, env, body) {
        Ok(prepared) => prepared,
        Err(outcome) => return outcome,
    };
    let member = batch_member(env);
    let inbox = Inbox::new(
        &ctx.db,
        env.message_id.as_deref().filter(|_| ctx.inbox),
        job.job_type,
    );
    let mut meta = job_meta(env, job.job_type, redelivered);
    let last = ctx.retry.in_process_attempts;
    let mut decoded = Some(payload);
    let mut attempt = 1;
    loop {
        meta.attempt = attempt;
        // A payload is consumed by its attempt; retries decode the body again
        // (it decoded once, and decoding is deterministic).
        let payload = match decoded.take().map_or_else(|| job.handler.decode(body), Ok) {
            Ok(p) => p,
            Err(e) => return failed(json_failure_kind(&e), e.to_string()),
        };
        let error = match attempt_once(ctx, &job, (&inbox, member), payload, &meta).await {
            Ok(Done::Committed(body, completed)) => {
                *completion = completed;
                return Outcome::Finished {
                    status: Status::Ok,
                    body,
                    duplicate: false,
                };
            }
            Ok(Done::Taken) => match inbox.answer().await {
                Ok(stored) => return answered(stored),
                Err(e) => AttemptError::from(e),
            },
            Err(e) => match answer_from_inbox(&inbox, e).await {
                Ok(error) => error,
                Err(answer) => return answer,
            },
        };
        let verdict = judge(ctx, &inbox, env.attempt, error, attempt == last);
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

fn job_meta(env: &Envelope, job_type: &str, redelivered: bool) -> JobMeta {
    if env.message_id.is_none() {
        // No idempotency key: processed at least once, not exactly once.
        metrics::counter!("txq_requests_without_message_id_total", "type" => job_type.to_owned())
            .increment(1);
        debug!("request without message_id: no deduplication");
    }
    JobMeta {
        job_type: job_type.to_owned(),
        message_id: env.message_id.clone(),
        correlation_id: env.correlation_id.clone(),
        attempt: 0,
        delivery_attempt: env.attempt,
        redelivered,
        traceparent: env.outgoing_traceparent(),
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
}

/// Size, type and payload are checked before a connection is taken: bad input
/// must not cost a transaction.
fn prepare<'a>(
    ctx: &'a Context,
    env: &'a Envelope,
    body: &[u8],
) -> Result<(Job<'a>, Payload), Outcome> {
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
    match (&env.batch, &env.message_id) {
        (Some(Err(problem)), _) => {
            return Err(failed(FailureKind::InvalidBatch, problem.clone()));
        }
        (Some(Ok(_)), None) => {
            return Err(failed(
                FailureKind::InvalidBatch,
                "a batch member needs a message_id: it is what counts it once".into(),
            ));
        }
        (Some(Ok(_)), Some(id)) if id.contains('\0') => {
            return Err(failed(
                FailureKind::InvalidBatch,
                "a batch member's message_id must not contain NUL: it is stored as text".into(),
            ));
        }
        _ => {}
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
        Ok(payload) => {
            if let Err(e) = handler.check(&payload) {
                return Err(match e {
                    JobError::Rejected { code, message } => Outcome::Finished {
                        status: Status::Rejected,
                        body: rejected_body(&code, &message),
                        duplicate: false,
                    },
                    other => failed(FailureKind::HandlerError, error_chain(&other)),
                });
            }
            Ok((
                Job {
                    job_type,
                    handler,
                    spec,
                },
                payload,
            ))
        }
        Err(e) => Err(failed(
            json_failure_kind(&e),
            format!("payload for `{job_type}`: {e}"),
        )),
    }
}

/// Step 3 of the [`Inbox`] protocol: a stored answer ends the job (`Err`). A
/// rejection is left to step 4, and an unknown commit stays unknown when the
/// lookup fails too.
async fn answer_from_inbox(
    inbox: &Inbox<'_>,
    error: AttemptError,
) -> Result<AttemptError, Outcome> {
    if matches!(error, AttemptError::Job(JobError::Rejected { .. })) {
        return Ok(error);
    }
    match inbox.answer().await {
        Ok(Some(stored)) => Err(finished(stored, true)),
        Ok(None) => Ok(error),
        Err(_) if matches!(error, AttemptError::CommitUnknown(_)) => Ok(error),
        Err(e) => Ok(AttemptError::from(e)),
    }
}

/// What an attempt's error means: another attempt (`Ok`, its reason and message),
/// or how the job ends (`Err`). `last`: no in-process attempt is left.
async fn judge(
    ctx: &Context,
    inbox: &Inbox<'_>,
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
        AttemptError::InvalidBatch(message) => {
            return Err(failed(FailureKind::InvalidBatch, message));
        }
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
            let answer = rejected(ctx, inbox, &code, &message, delivery_attempt);
            return Err(answer.await);
        }
        AttemptError::Job(JobError::Database(e)) => match ctx.db.transient_reason(&e) {
            Some(reason) => (reason, format!("database: {e}")),
            None => {
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
async fn attempt_once(
    ctx: &Context,
    job: &Job<'_>,
    (inbox, member): (&Inbox<'_>, Option<Member<'_>>),
    payload: Payload,
    meta: &JobMeta,
) -> Result<Done, AttemptError> {
    let limit = job.spec.timeout + TIMEOUT_MARGIN;
    let work = async {
        let mut tx = ctx.jobs.begin(&job.spec.begin).await?;
        let entry = inbox.enter(&mut tx, meta.redelivered).await?;
        if entry == Entry::Taken {
            let _ = tx.rollback().await;
            return Ok((None, Done::Taken, false));
        }
        let result = AssertUnwindSafe(job.handler.call(&mut tx, payload, meta))
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
        if inbox
            .seal(&mut tx, entry, &body, meta.delivery_attempt)
            .await?
            == Entry::Taken
        {
            // Undo this run's effects; the row's answer is the answer.
            let _ = tx.rollback().await;
            return Ok((None, Done::Taken, false));
        }
        // Last before COMMIT: its counter row stays locked until then.
        let counted = match member {
            None => false,
            Some(member) => match batch::count(&mut tx, member, Final::Ok).await {
                Ok(counted) => counted != Count::Unchanged,
                Err(e) => {
                    let _ = tx.rollback().await;
                    return Err(match e {
                        BatchError::Invalid(message) => AttemptError::InvalidBatch(message),
                        BatchError::Db(e) => AttemptError::from(e),
                    });
                }
            },
        };
        Ok((Some(tx), Done::Committed(body, None), counted))
    };
    // Pinned where it is: moved into the timeout, its 9 KiB would be copied
    // (BENCHMARKS.md, round 7). Dropping the work on timeout drops its
    // transaction, which rolls it back.
    let work = std::pin::pin!(work);
    let (tx, mut done, counted) = match tokio::time::timeout(limit, work).await {
        Ok(result) => result?,
        Err(_) => return Err(AttemptError::TimedOut(job.spec.timeout)),
    };
    if let Some(tx) = tx {
        commit(tx, limit).await?;
    }
    if let (true, Some(member), Done::Committed(_, completion)) = (counted, member, &mut done) {
        *completion = settle(ctx, &member.tag.id).await;
    }
    Ok(done)
}

/// Settles a batch after a member's COMMIT: the completion it wrote, if this
/// member made one. A failure here loses nothing: the sweep settles it.
async fn settle(ctx: &Context, batch_id: &str) -> Option<Completion> {
    match batch::settle(&ctx.db, batch_id, ctx.batch_destinations()).await {
        Ok(completion) => completion,
        Err(e) => {
            tracing::warn!(batch_id, error = %e, "could not settle the batch; a sweep will");
            None
        }
    }
}

/// The commit has a time limit of its own, so that one that never answers (a
/// silently dead socket) cannot hold the permit for good.
async fn commit(tx: crate::db::Tx, limit: Duration) -> Result<(), AttemptError> {
    match tokio::time::timeout(limit, tx.commit()).await {
        Ok(Ok(())) => Ok(()),
        // The server answered with an error: it did not commit.
        Ok(Err(e @ sqlx::Error::Database(_))) => Err(e.into()),
        Ok(Err(e)) => Err(AttemptError::CommitUnknown(format!("COMMIT: {e}"))),
        Err(_) => Err(AttemptError::CommitUnknown(format!(
            "COMMIT did not answer within {limit:?}"
        ))),
    }
}

/// Step 4 of the [`Inbox`] protocol, the job's transaction having been rolled back.
async fn rejected(
    ctx: &Context,
    inbox: &Inbox<'_>,
    code: &str,
    message: &str,
    attempts: u32,
) -> Outcome {
    let body = rejected_body(code, message);
    match inbox.record_rejection(&body, attempts).await {
        Ok(Entry::Open | Entry::Claimed) => Outcome::Finished {
            status: Status::Rejected,
            body,
            duplicate: false,
        },
        // A racing delivery finished first: its answer is the answer.
        Ok(Entry::Taken) => match inbox.answer().await {
            Ok(stored) => answered(stored),
            Err(e) => transient_db(ctx, &e),
        },
        Err(e) => transient_db(ctx, &e),
    }
}

/// The answer of an earlier delivery whose row stood in the way; `None`: it was
/// rolled back or pruned in between, and another attempt decides.
fn answered(stored: Option<StoredReply>) -> Outcome {
    match stored {
        Some(stored) => finished(stored, true),
        None => Outcome::Transient {
            reason: TransientReason::Handler,
            message: "the inbox row of an earlier delivery vanished (rolled back or pruned)".into(),
        },
    }
}

fn finished(stored: StoredReply, duplicate: bool) -> Outcome {
    Outcome::Finished {
        status: match stored.status {
            StoredStatus::Ok => Status::Ok,
            StoredStatus::Rejected => Status::Rejected,
        },
        body: stored.body,
        duplicate,
    }
}

fn transient_db(ctx: &Context, e: &sqlx::Error) -> Outcome {
    Outcome::Transient {
        reason: ctx
            .db
            .transient_reason(e)
            .unwrap_or(TransientReason::Connection),
        message: format!("inbox: {e}"),
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
        // Full jitter: uniform in [0, ceiling]. Over 2,000 draws the mean sits near
        // half the ceiling and the largest near the ceiling, so a backoff of zero,
        // one that does not grow, or one past the cap all fail.
        for (attempt, ceiling) in [(1, base), (3, base * 4), (30, max)] {
            let draws: Vec<Duration> = (0..2000).map(|_| backoff(base, max, attempt)).collect();
            let largest = draws.iter().max().copied().unwrap_or_default();
            let mean = draws.iter().sum::<Duration>() / 2000;
            assert!(
                largest <= ceiling,
                "attempt {attempt}: {largest:?} > {ceiling:?}"
            );
            assert!(
                largest >= ceiling.mul_f64(0.9),
                "attempt {attempt}: at most {largest:?}"
            );
            assert!(
                mean >= ceiling.mul_f64(0.4) && mean <= ceiling.mul_f64(0.6),
                "attempt {attempt}: mean {mean:?} of a ceiling {ceiling:?}"
            );
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
