//! What becomes of a delivery, decided from how its job ended. Pure: no broker, no
//! database, no clock, so every branch is unit-tested below; `finish` only carries
//! the decision out.

use std::time::Duration;

use super::outcome::{Outcome, Status};
use crate::broker::Topology;
use crate::events::JobOutcome;

/// What the retry decision needs to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy<'a> {
    /// Deliveries at most, the first included (`retry.max_attempts`).
    pub(crate) max_attempts: u32,
    /// Where delayed retries go.
    pub(crate) topology: &'a Topology,
}

/// What to publish, then how to settle the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Publish the reply, then ack.
    Reply {
        status: Status,
        body: Vec<u8>,
        /// The stored answer of an earlier delivery (`x-txq-duplicate`).
        duplicate: bool,
    },
    /// Publish a copy to the retry queue with `x-txq-attempt = attempt`, then ack.
    RetryLater {
        queue: String,
        delay: Duration,
        attempt: u32,
        /// The transient reason, for logs and metrics.
        reason: String,
        message: String,
    },
    /// Publish the dead-letter copy, then ack, then reply `failed`.
    DeadLetter {
        kind: String,
        message: String,
        /// Transient failures used up the attempts.
        exhausted: bool,
    },
    /// Hand the delivery back to the queue without publishing anything.
    Requeue,
}

impl Disposition {
    /// The `outcome` label of the delivery's metrics, once carried out.
    pub(crate) fn label(&self) -> JobOutcome {
        match self {
            Self::Reply {
                duplicate: true, ..
            } => JobOutcome::Duplicate,
            Self::Reply {
                status: Status::Rejected,
                ..
            } => JobOutcome::Rejected,
            Self::Reply { .. } => JobOutcome::Ok,
            Self::RetryLater { .. } => JobOutcome::Retried,
            Self::DeadLetter { .. } => JobOutcome::Failed,
            Self::Requeue => JobOutcome::Requeued,
        }
    }
}

/// Decides what becomes of a delivery whose `attempt`-th delivery (from
/// `x-txq-attempt`) ended with `outcome`.
pub(crate) fn decide(outcome: Outcome, attempt: u32, policy: &Policy<'_>) -> Disposition {
    match outcome {
        Outcome::Finished {
            status,
            body,
            duplicate,
        } => Disposition::Reply {
            status,
            body,
            duplicate,
        },
        Outcome::Failed { kind, message } => Disposition::DeadLetter {
            kind: kind.as_str().to_owned(),
            message,
            exhausted: false,
        },
        Outcome::Transient { reason, message } => {
            counted_retry(reason.as_str(), message, attempt, policy)
        }
        // Not an attempt: the same attempt again after a delay, for the inbox to
        // say whether the commit landed. Never `failed`.
        Outcome::Unresolved { message } => match policy.topology.retry_queue(attempt) {
            Some((queue, delay)) => Disposition::RetryLater {
                queue,
                delay,
                attempt,
                reason: "commit_unknown".into(),
                message,
            },
            None => Disposition::Requeue,
        },
        // The broker refuses this message's reply or copy: an attempt like any
        // transient failure, but a refused retry copy would be refused again.
        Outcome::Refused {
            reason,
            retry_copy: false,
        } => counted_retry("publish_refused", reason, attempt, policy),
        Outcome::Refused {
            reason,
            retry_copy: true,
        } => Disposition::DeadLetter {
            kind: "publish_refused".into(),
            message: format!("its retry copy was refused: {reason}"),
            exhausted: true,
        },
        Outcome::Abandoned => Disposition::Requeue,
    }
}

/// A delayed retry with the attempt counted, or the dead-letter queue once
/// `max_attempts` deliveries are used up (or there is no retry queue).
fn counted_retry(reason: &str, message: String, attempt: u32, policy: &Policy<'_>) -> Disposition {
    match policy.topology.retry_queue(attempt) {
        Some((queue, delay)) if attempt < policy.max_attempts => Disposition::RetryLater {
            queue,
            delay,
            attempt: attempt.saturating_add(1),
            reason: reason.to_owned(),
            message,
        },
        _ => Disposition::DeadLetter {
            kind: reason.to_owned(),
            message,
            exhausted: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueType;
    use crate::db::TransientReason;
    use crate::worker::FailureKind;

    fn topology(delays: &[u64]) -> Topology {
        Topology {
            request_queue: "q".into(),
            queue_type: QueueType::Classic,
            reply_queue: None,
            batch_completion_queue: None,
            dead_letter_queue: "q.dlq".into(),
            retry_delays: delays.iter().map(|s| Duration::from_secs(*s)).collect(),
            delivery_limit: 20,
        }
    }

    fn transient() -> Outcome {
        Outcome::Transient {
            reason: TransientReason::Deadlock,
            message: "m".into(),
        }
    }

    fn retry(queue: &str, secs: u64, attempt: u32, reason: &str) -> Disposition {
        Disposition::RetryLater {
            queue: queue.into(),
            delay: Duration::from_secs(secs),
            attempt,
            reason: reason.into(),
            message: "m".into(),
        }
    }

    fn dead(kind: &str, exhausted: bool) -> Disposition {
        Disposition::DeadLetter {
            kind: kind.into(),
            message: "m".into(),
            exhausted,
        }
    }

    #[test]
    fn answers_are_replied_whatever_the_attempt() {
        let t = topology(&[1]);
        let policy = Policy {
            max_attempts: 1,
            topology: &t,
        };
        for status in [Status::Ok, Status::Rejected] {
            for duplicate in [false, true] {
                let outcome = Outcome::Finished {
                    status,
                    body: b"{}".to_vec(),
                    duplicate,
                };
                let d = decide(outcome, 9, &policy);
                assert_eq!(
                    d,
                    Disposition::Reply {
                        status,
                        body: b"{}".to_vec(),
                        duplicate
                    }
                );
            }
        }
    }

    #[test]
    fn permanent_failures_are_dead_lettered_at_once() {
        let t = topology(&[1, 5]);
        let policy = Policy {
            max_attempts: 5,
            topology: &t,
        };
        let outcome = Outcome::Failed {
            kind: FailureKind::UnknownType,
            message: "m".into(),
        };
        assert_eq!(decide(outcome, 1, &policy), dead("unknown_type", false));
    }

    #[test]
    fn transient_failures_retry_on_the_schedule_then_dead_letter() {
        let t = topology(&[1, 5]);
        let policy = Policy {
            max_attempts: 3,
            topology: &t,
        };
        assert_eq!(
            decide(transient(), 1, &policy),
            retry("q.retry.1s", 1, 2, "deadlock")
        );
        assert_eq!(
            decide(transient(), 2, &policy),
            retry("q.retry.5s", 5, 3, "deadlock")
        );
        assert_eq!(decide(transient(), 3, &policy), dead("deadlock", true));
        assert_eq!(decide(transient(), 7, &policy), dead("deadlock", true));
    }

    #[test]
    fn without_retry_queues_a_transient_failure_is_final() {
        let t = topology(&[]);
        let policy = Policy {
            max_attempts: 5,
            topology: &t,
        };
        assert_eq!(decide(transient(), 1, &policy), dead("deadlock", true));
    }

    #[test]
    fn an_unknown_commit_comes_back_uncounted_and_is_never_failed() {
        let t = topology(&[1, 5]);
        for max_attempts in [1, 2, 5] {
            let policy = Policy {
                max_attempts,
                topology: &t,
            };
            for attempt in [1, 2, 5, 9] {
                let outcome = Outcome::Unresolved {
                    message: "m".into(),
                };
                let d = decide(outcome, attempt, &policy);
                let Disposition::RetryLater {
                    attempt: next,
                    reason,
                    ..
                } = &d
                else {
                    panic!("{d:?}");
                };
                assert_eq!(*next, attempt, "not counted");
                assert_eq!(reason, "commit_unknown");
            }
        }
        let none = topology(&[]);
        let policy = Policy {
            max_attempts: 1,
            topology: &none,
        };
        let outcome = Outcome::Unresolved {
            message: "m".into(),
        };
        assert_eq!(decide(outcome, 1, &policy), Disposition::Requeue);
    }

    #[test]
    fn a_refused_publish_counts_as_an_attempt() {
        let t = topology(&[1]);
        let policy = Policy {
            max_attempts: 2,
            topology: &t,
        };
        let refused = |retry_copy| Outcome::Refused {
            reason: "m".into(),
            retry_copy,
        };
        assert_eq!(
            decide(refused(false), 1, &policy),
            retry("q.retry.1s", 1, 2, "publish_refused")
        );
        assert_eq!(
            decide(refused(false), 2, &policy),
            dead("publish_refused", true)
        );
        let Disposition::DeadLetter { kind, .. } = decide(refused(true), 1, &policy) else {
            panic!("a refused retry copy is dead-lettered at once");
        };
        assert_eq!(kind, "publish_refused");
    }

    #[test]
    fn an_abandoned_job_is_requeued() {
        let t = topology(&[1]);
        let policy = Policy {
            max_attempts: 1,
            topology: &t,
        };
        assert_eq!(decide(Outcome::Abandoned, 1, &policy), Disposition::Requeue);
    }

    #[test]
    fn labels_follow_the_disposition() {
        let reply = |status, duplicate| Disposition::Reply {
            status,
            body: vec![],
            duplicate,
        };
        assert_eq!(reply(Status::Ok, false).label(), JobOutcome::Ok);
        assert_eq!(reply(Status::Rejected, false).label(), JobOutcome::Rejected);
        assert_eq!(reply(Status::Ok, true).label(), JobOutcome::Duplicate);
        assert_eq!(retry("q", 1, 2, "x").label(), JobOutcome::Retried);
        assert_eq!(dead("x", true).label(), JobOutcome::Failed);
        assert_eq!(Disposition::Requeue.label(), JobOutcome::Requeued);
    }
}
