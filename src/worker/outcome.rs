//! How a job ended, and the reply body each ending gets.

use serde::Serialize;
use serde_json::value::RawValue;

/// Why a job failed for good; the `kind` of a `failed` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
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
}

impl FailureKind {
    /// The `kind` string of replies and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingType => "missing_type",
            Self::UnknownType => "unknown_type",
            Self::MalformedJson => "malformed_json",
            Self::InvalidPayload => "invalid_payload",
            Self::HandlerError => "handler_error",
            Self::DatabaseError => "database_error",
            Self::Panic => "panic",
        }
    }
}

/// What became of one delivery.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Committed; reply `ok`, then ack.
    Ok {
        result: Box<RawValue>,
        attempts: u32,
    },
    /// The handler refused it; rolled back, reply `rejected`, then ack.
    Rejected {
        code: String,
        message: String,
        attempts: u32,
    },
    /// Will never succeed; reply `failed`, then reject without requeue (a
    /// dead-letter exchange on the queue, if any, receives it).
    Failed {
        kind: FailureKind,
        message: String,
        attempts: u32,
    },
    /// Still failing transiently after the in-process attempts: requeue it for a
    /// later attempt, no reply yet.
    Requeue { reason: String, attempts: u32 },
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

impl Outcome {
    /// The reply's `x-txq-status`, or `None` when no reply is due yet.
    pub(crate) fn status(&self) -> Option<&'static str> {
        match self {
            Self::Ok { .. } => Some("ok"),
            Self::Rejected { .. } => Some("rejected"),
            Self::Failed { .. } => Some("failed"),
            Self::Requeue { .. } => None,
        }
    }

    pub(crate) fn attempts(&self) -> u32 {
        match self {
            Self::Ok { attempts, .. }
            | Self::Rejected { attempts, .. }
            | Self::Failed { attempts, .. }
            | Self::Requeue { attempts, .. } => *attempts,
        }
    }

    /// The reply body, or `None` when no reply is due yet.
    pub(crate) fn reply_body(&self) -> Option<Vec<u8>> {
        let body = match self {
            Self::Ok { result, .. } => ReplyBody::Ok { result },
            Self::Rejected { code, message, .. } => ReplyBody::Rejected {
                error: RejectedError { code, message },
            },
            Self::Failed {
                kind,
                message,
                attempts,
            } => ReplyBody::Failed {
                error: FailedError {
                    kind: kind.as_str(),
                    message,
                    attempts: *attempts,
                },
            },
            Self::Requeue { .. } => return None,
        };
        // Serialising strings and an already-valid RawValue cannot fail.
        serde_json::to_vec(&body).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(outcome: &Outcome) -> serde_json::Value {
        serde_json::from_slice(&outcome.reply_body().expect("a reply")).expect("JSON")
    }

    #[test]
    fn reply_bodies_follow_the_contract() {
        let ok = Outcome::Ok {
            result: serde_json::value::to_raw_value(&serde_json::json!({"n": 1})).expect("raw"),
            attempts: 1,
        };
        assert_eq!(
            json(&ok),
            serde_json::json!({"status": "ok", "result": {"n": 1}})
        );

        let rejected = Outcome::Rejected {
            code: "insufficient_funds".into(),
            message: "balance 5 < 10".into(),
            attempts: 1,
        };
        assert_eq!(
            json(&rejected),
            serde_json::json!({"status": "rejected",
                "error": {"code": "insufficient_funds", "message": "balance 5 < 10"}})
        );

        let failed = Outcome::Failed {
            kind: FailureKind::UnknownType,
            message: "no handler".into(),
            attempts: 0,
        };
        assert_eq!(
            json(&failed),
            serde_json::json!({"status": "failed",
                "error": {"kind": "unknown_type", "message": "no handler", "attempts": 0}})
        );

        let requeue = Outcome::Requeue {
            reason: "deadlock".into(),
            attempts: 5,
        };
        assert!(requeue.reply_body().is_none());
        assert!(requeue.status().is_none());
    }
}
