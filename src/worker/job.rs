//! One delivery, start to end of its transaction: decode, begin, handle, commit,
//! with in-process retries of transient errors in fresh transactions.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt as _;
use serde_json::value::RawValue;
use tracing::debug;

use super::Context;
use super::outcome::{FailureKind, Outcome};
use crate::broker::Envelope;
use crate::db::{ErrorClass, Isolation};
use crate::handler::{DynHandler, JobError, JobMeta, Payload};

/// Why one attempt did not commit.
enum AttemptError {
    Job(JobError),
    Panicked(String),
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
    let Some(job_type) = env.job_type.as_deref() else {
        return failed(
            FailureKind::MissingType,
            "the request has no `type` property and the queue has no default type".into(),
        );
    };
    let Some(handler) = ctx.registry.get(job_type) else {
        let mut known: Vec<&str> = ctx.registry.job_types().collect();
        known.sort_unstable();
        return failed(
            FailureKind::UnknownType,
            format!(
                "unknown job type `{job_type}` (this worker handles: {})",
                known.join(", ")
            ),
        );
    };
    // Decoded before a connection is taken: bad input must not cost a transaction.
    let mut decoded = match handler.decode(body) {
        Ok(payload) => Some(payload),
        Err(e) => {
            return failed(
                json_failure_kind(&e),
                format!("payload for `{job_type}`: {e}"),
            );
        }
    };
    let isolation = ctx.isolation(job_type);
    let mut meta = JobMeta {
        job_type: job_type.to_owned(),
        message_id: env.message_id.clone(),
        correlation_id: env.correlation_id.clone(),
        attempt: 0,
        redelivered,
        traceparent: env.traceparent.clone(),
    };
    let max = ctx.retry.attempts;
    for attempt in 1..=max {
        meta.attempt = attempt;
        // A payload is consumed by its attempt; retries decode the body again
        // (it decoded once, and decoding is deterministic).
        let payload = match decoded.take() {
            Some(p) => p,
            None => match handler.decode(body) {
                Ok(p) => p,
                Err(e) => return failed(json_failure_kind(&e), e.to_string()),
            },
        };
        let error = match attempt_once(ctx, handler.as_ref(), isolation, payload, &meta).await {
            Ok(result) => {
                return Outcome::Ok {
                    result,
                    attempts: attempt,
                };
            }
            Err(AttemptError::Panicked(message)) => {
                return Outcome::Failed {
                    kind: FailureKind::Panic,
                    message: format!("handler panicked: {message}"),
                    attempts: attempt,
                };
            }
            Err(AttemptError::Job(e)) => e,
        };
        let (kind, reason) = match &error {
            JobError::Rejected { code, message } => {
                return Outcome::Rejected {
                    code: code.clone(),
                    message: message.clone(),
                    attempts: attempt,
                };
            }
            JobError::Database(e) => match ctx.db.classify(e) {
                ErrorClass::Transient(reason) => (None, reason.as_str()),
                ErrorClass::Permanent => (Some(FailureKind::DatabaseError), ""),
            },
            JobError::Transient(_) => (None, "handler"),
            JobError::Permanent(_) => (Some(FailureKind::HandlerError), ""),
        };
        if let Some(kind) = kind {
            return Outcome::Failed {
                kind,
                message: error.to_string(),
                attempts: attempt,
            };
        }
        if attempt == max {
            return Outcome::Requeue {
                reason: error.to_string(),
                attempts: attempt,
            };
        }
        debug!(%error, reason, attempt, "transient failure; retrying in a fresh transaction");
        tokio::time::sleep(backoff(ctx.retry.base_delay, ctx.retry.max_delay, attempt)).await;
    }
    // `attempts` is at least 1 (validated), so the loop always returns.
    Outcome::Requeue {
        reason: "no attempt was made".into(),
        attempts: 0,
    }
}

/// One attempt in a transaction of its own: commit on success, roll back otherwise
/// (a panic included).
async fn attempt_once(
    ctx: &Context,
    handler: &dyn DynHandler,
    isolation: Option<Isolation>,
    payload: Payload,
    meta: &JobMeta,
) -> Result<Box<RawValue>, AttemptError> {
    let mut tx = ctx.db.begin(isolation).await?;
    let result = AssertUnwindSafe(handler.call(&mut tx, payload, meta))
        .catch_unwind()
        .await;
    match result {
        Ok(Ok(output)) => {
            tx.commit().await?;
            Ok(output)
        }
        Ok(Err(e)) => {
            // A broken connection cannot roll back; the server drops the
            // transaction with the connection.
            let _ = tx.rollback().await;
            Err(AttemptError::Job(e))
        }
        Err(panic) => {
            let _ = tx.rollback().await;
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Err(AttemptError::Panicked(message))
        }
    }
}

fn failed(kind: FailureKind, message: String) -> Outcome {
    Outcome::Failed {
        kind,
        message,
        attempts: 0,
    }
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
