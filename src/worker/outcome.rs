//! How a job ended, and the reply bodies of the message contract.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::db::TransientReason;

/// Why a job failed for good; the `kind` of a `failed` reply and of
/// `x-txq-error-kind` on its dead-letter copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// The body is larger than `max_body_bytes`.
    BodyTooLarge,
    /// No `type` property and no default type for the queue.
    MissingType,
    /// No handler is registered for the `type`.
    UnknownType,
    /// The body is not JSON (or not UTF-8).
    MalformedJson,
    /// The body is JSON of the wrong shape for the job type.
    InvalidPayload,
    /// The handler returned a permanent error.
    HandlerError,
    /// A database error that another attempt would not fix.
    DatabaseError,
    /// The handler panicked.
    Panic,
    /// The `ok` reply is larger than `max_reply_bytes`; nothing was committed.
    ReplyTooLarge,
    /// The batch headers are malformed, name a batch that is not open, disagree
    /// with its size, or the batch has all its members already; nothing was
    /// committed and the batch's counts are unchanged.
    InvalidBatch,
}

impl FailureKind {
    /// The `kind` string of replies, dead-letter headers and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BodyTooLarge => "body_too_large",
            Self::MissingType => "missing_type",
            Self::UnknownType => "unknown_type",
            Self::MalformedJson => "malformed_json",
            Self::InvalidPayload => "invalid_payload",
            Self::HandlerError => "handler_error",
            Self::DatabaseError => "database_error",
            Self::Panic => "panic",
            Self::ReplyTooLarge => "reply_too_large",
            Self::InvalidBatch => "invalid_batch",
        }
    }
}

/// The `status` of a reply (and of `x-txq-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    Rejected,
    Failed,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
        }
    }
}

/// How one delivery's job ended; [`super::decide`] turns it into what to publish.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Committed (`ok`) or refused by the handler (`rejected`), and recorded in the
    /// inbox: reply `body`, then ack. `duplicate`: an earlier delivery did the work
    /// and this is its stored reply.
    Finished {
        status: Status,
        body: Vec<u8>,
        duplicate: bool,
    },
    /// Will never succeed: dead-letter it, reply `failed`, then ack.
    Failed { kind: FailureKind, message: String },
    /// Still failing transiently after the in-process attempts: a delayed retry, or
    /// the dead-letter queue once `max_attempts` deliveries are used up.
    Transient {
        reason: TransientReason,
        message: String,
    },
    /// The COMMIT failed or timed out, so whether it landed is unknown, and the
    /// inbox had no answer yet: never `failed`; the same attempt again later, and
    /// the inbox settles it.
    Unresolved { message: String },
    /// The broker refused the reply or a copy of this very message (and would
    /// again); `retry_copy` when what it refused was the delayed-retry copy.
    Refused { reason: String, retry_copy: bool },
    /// Cut short by shutdown and rolled back: requeue it.
    Abandoned,
}

#[derive(Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
enum ReplyBody<'a> {
    Ok { result: &'a RawValue },
    Rejected { error: RejectedError<'a> },
    Failed { error: FailedError<'a> },
}

#[derive(Serialize)]
struct RejectedError<'a> {
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct FailedError<'a> {
    kind: &'a str,
    message: &'a str,
    attempts: u32,
}

// Serialising strings and an already-valid RawValue cannot fail.
fn encode(body: &ReplyBody<'_>) -> Vec<u8> {
    serde_json::to_vec(body).unwrap_or_default()
}

/// `{"status":"ok","result":…}`
pub(crate) fn ok_body(result: &RawValue) -> Vec<u8> {
    encode(&ReplyBody::Ok { result })
}

/// `{"status":"rejected","error":{"code":…,"message":…}}`
pub(crate) fn rejected_body(code: &str, message: &str) -> Vec<u8> {
    encode(&ReplyBody::Rejected {
        error: RejectedError { code, message },
    })
}

/// `{"status":"failed","error":{"kind":…,"message":…,"attempts":n}}`
pub(crate) fn failed_body(kind: &str, message: &str, attempts: u32) -> Vec<u8> {
    encode(&ReplyBody::Failed {
        error: FailedError {
            kind,
            message,
            attempts,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: Vec<u8>) -> serde_json::Value {
        serde_json::from_slice(&body).expect("JSON")
    }

    #[test]
    fn reply_bodies_follow_the_contract() {
        let result = serde_json::value::to_raw_value(&serde_json::json!({"n": 1})).expect("raw");
        assert_eq!(
            json(ok_body(&result)),
            serde_json::json!({"status": "ok", "result": {"n": 1}})
        );
        assert_eq!(
            json(rejected_body("insufficient_funds", "balance 5 < 10")),
            serde_json::json!({"status": "rejected",
                "error": {"code": "insufficient_funds", "message": "balance 5 < 10"}})
        );
        assert_eq!(
            json(failed_body("unknown_type", "no handler", 1)),
            serde_json::json!({"status": "failed",
                "error": {"kind": "unknown_type", "message": "no handler", "attempts": 1}})
        );
    }
}
