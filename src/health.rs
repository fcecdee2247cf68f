//! Liveness and readiness, shared by the worker and whatever reports them.
//!
//! Ready means "a consumer is registered on the request queue right now", not
//! "the process is up": a worker that silently stopped consuming is a known failure
//! of job processors, and must not look healthy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A cheap, cloneable view of the worker's state.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    consuming: AtomicBool,
    reconnects: AtomicU64,
    settled: AtomicU64,
    retries: AtomicU64,
    in_flight: AtomicU64,
    ok: AtomicU64,
    rejected: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
}

/// Deliveries settled so far, by outcome (duplicates and requeues are not
/// outcomes): what the heartbeat turns into per-minute throughput.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Answered `ok`.
    pub ok: u64,
    /// Answered `rejected`.
    pub rejected: u64,
    /// Dead-lettered (answered `failed`).
    pub dead_lettered: u64,
    /// Sent to a delayed-retry queue.
    pub retried: u64,
}

impl Outcomes {
    /// What `self` counts beyond `earlier`.
    pub fn since(&self, earlier: &Outcomes) -> Outcomes {
        Outcomes {
            ok: self.ok.saturating_sub(earlier.ok),
            rejected: self.rejected.saturating_sub(earlier.rejected),
            dead_lettered: self.dead_lettered.saturating_sub(earlier.dead_lettered),
            retried: self.retried.saturating_sub(earlier.retried),
        }
    }
}

/// One job in flight: counted from [`Health::job_started`] until dropped, so a
/// job that ends any way at all (settled, cancelled, its task dropped) is
/// uncounted.
#[derive(Debug)]
#[must_use = "the job counts as in flight only while this lives"]
pub(crate) struct InFlight(Health);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Health {
    /// Whether a consumer is registered on the request queue.
    pub fn is_consuming(&self) -> bool {
        self.inner.consuming.load(Ordering::SeqCst)
    }

    /// How many times the broker connection was rebuilt.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::SeqCst)
    }

    /// Deliveries acked so far (answered, retried later or dead-lettered).
    pub fn settled(&self) -> u64 {
        self.inner.settled.load(Ordering::Relaxed)
    }

    /// In-process retries of transient failures so far.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// Jobs running now: delivered to this worker and not yet settled.
    pub fn in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Deliveries settled so far, by outcome.
    pub fn outcomes(&self) -> Outcomes {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Outcomes {
            ok: load(&self.inner.ok),
            rejected: load(&self.inner.rejected),
            dead_lettered: load(&self.inner.dead_lettered),
            retried: load(&self.inner.retried),
        }
    }

    /// Counts a job in flight until the guard is dropped.
    pub(crate) fn job_started(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Counts how a delivery ended (once per delivery).
    pub(crate) fn count_outcome(&self, outcome: crate::events::JobOutcome) {
        use crate::events::JobOutcome;
        let counter = match outcome {
            JobOutcome::Ok => &self.inner.ok,
            JobOutcome::Rejected => &self.inner.rejected,
            JobOutcome::Failed => &self.inner.dead_lettered,
            JobOutcome::Retried => &self.inner.retried,
            JobOutcome::Duplicate | JobOutcome::Requeued => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_settled(&self, acked: u64) {
        self.inner.settled.fetch_add(acked, Ordering::Relaxed);
    }

    pub(crate) fn count_retry(&self) {
        self.inner.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_consuming(&self, consuming: bool) {
        self.inner.consuming.store(consuming, Ordering::SeqCst);
    }

    pub(crate) fn count_reconnect(&self) {
        self.inner.reconnects.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::JobOutcome;

    #[test]
    fn a_job_is_in_flight_while_its_guard_lives_and_counts_one_outcome() {
        let health = Health::default();
        let a = health.job_started();
        let b = health.job_started();
        assert_eq!(health.in_flight(), 2);
        drop(a);
        assert_eq!(health.in_flight(), 1);
        // Unwinding drops it too.
        let h = health.clone();
        let panicked = std::panic::catch_unwind(move || {
            let _c = h.job_started();
            panic!("a job task dies");
        });
        assert!(panicked.is_err());
        assert_eq!(health.in_flight(), 1);
        drop(b);
        assert_eq!(health.in_flight(), 0);

        for outcome in JobOutcome::ALL {
            health.count_outcome(outcome);
        }
        health.count_outcome(JobOutcome::Ok);
        let before = Outcomes {
            ok: 1,
            ..Outcomes::default()
        };
        assert_eq!(
            health.outcomes(),
            Outcomes {
                ok: 2,
                rejected: 1,
                dead_lettered: 1,
                retried: 1
            }
        );
        assert_eq!(
            health.outcomes().since(&before),
            Outcomes {
                ok: 1,
                rejected: 1,
                dead_lettered: 1,
                retried: 1
            }
        );
    }
}
