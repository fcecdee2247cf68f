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
