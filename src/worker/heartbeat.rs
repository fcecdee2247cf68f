//! The worker's heartbeat: its row in `txq_workers` and its outcomes by minute
//! (`db::fleet` has the protocol), written by a task of its own on a connection
//! of its own, so it never waits for a job's connection nor a job for it. A beat
//! that fails is logged and counted; the worker consumes on, and the next beat
//! tries again.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::Shared;
use crate::db::fleet::{self, BeatError, Minute, WorkerRow};
use crate::db::{Db, now_ms};
use crate::health::{Health, Outcomes};

/// How long one beat may take (a connection, two statements) before it counts
/// as failed. A beat cut short may have counted its outcomes already, which the
/// next beat then counts again: only a database that stops answering mid-beat
/// does that.
const BEAT_LIMIT: Duration = Duration::from_secs(10);

/// How often a worker prunes the fleet's tables, at most.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How long stopping waits for the last beat: the outcomes since the last one,
/// and the row's deletion. Past it the row stays, and reads as gone soon after.
const FINISH_LIMIT: Duration = Duration::from_secs(3);

/// The running heartbeat task.
pub(crate) struct Heartbeat {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    /// Starts beating: the first beat registers the worker at once.
    pub(crate) fn spawn(shared: &Arc<Shared>) -> Self {
        let stop = CancellationToken::new();
        let beats = Beats::new(shared);
        let task = tokio::spawn(beats.run(shared.heartbeat, stop.clone()));
        Self { stop, task }
    }

    /// After the drain: counts the last outcomes and deletes the worker's row,
    /// within [`FINISH_LIMIT`].
    pub(crate) async fn finish(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(FINISH_LIMIT, &mut task).await.is_err() {
            task.abort();
            crate::events::heartbeat_failed(&format!(
                "the last beat did not end within {FINISH_LIMIT:?}; the worker's row stays \
                 until it is pruned"
            ));
        }
    }
}

/// One worker's beats.
struct Beats {
    /// A pool of one connection beside the jobs' pool.
    db: Db,
    health: Health,
    row: WorkerRow,
    /// The outcomes already counted in `txq_throughput`.
    sent: Outcomes,
    registered: bool,
    /// The last beat failed (so the next good one says so).
    failing: bool,
    next_prune: Instant,
}

impl Beats {
    fn new(shared: &Shared) -> Self {
        let now = now_ms();
        Self {
            db: shared.db.probe(),
            health: shared.health.clone(),
            row: WorkerRow {
                id: uuid::Uuid::new_v4().to_string(),
                host: host_name(),
                pid: i64::from(std::process::id()),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                queue: shared.topology.request_queue.clone(),
                concurrency: i64::try_from(shared.concurrency).unwrap_or(i64::MAX),
                started_at_ms: now,
                last_seen_ms: now,
                in_flight: 0,
                settled: 0,
                reconnects: 0,
            },
            sent: Outcomes::default(),
            registered: false,
            failing: false,
            next_prune: Instant::now(),
        }
    }

    async fn run(mut self, every: Duration, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            match tokio::time::timeout(BEAT_LIMIT, self.beat()).await {
                Ok(Ok(())) => {
                    if std::mem::take(&mut self.failing) {
                        info!(worker_id = %self.row.id, "the heartbeat is written again");
                    }
                    if tokio::time::timeout(BEAT_LIMIT, self.prune())
                        .await
                        .is_err()
                    {
                        self.failed(&format!("pruning: no answer within {BEAT_LIMIT:?}"));
                    }
                }
                Ok(Err(e)) => self.failed(&e),
                Err(_) => self.failed(&format!("no answer within {BEAT_LIMIT:?}")),
            }
        }
        let last = self.pending();
        match fleet::deregister(&self.db, &self.row.id, &last).await {
            Ok(()) => tracing::debug!(worker_id = %self.row.id, "deregistered from txq_workers"),
            Err(e) => crate::events::heartbeat_failed(&format!(
                "deregistering: {e}; the worker's row stays until it is pruned"
            )),
        }
        // Its one connection is idle by now; anything else is dropped with the pool.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.db.close()).await;
    }

    /// Registers, or writes the outcomes since the last beat and the row.
    async fn beat(&mut self) -> Result<(), BeatError> {
        let health = &self.health;
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.row.last_seen_ms = now_ms();
        self.row.in_flight = count(health.in_flight());
        self.row.settled = count(health.settled());
        self.row.reconnects = count(health.reconnects());
        if !self.registered {
            fleet::register(&self.db, &self.row)
                .await
                .map_err(BeatError::Row)?;
            self.registered = true;
            info!(worker_id = %self.row.id, host = %self.row.host, "registered in txq_workers");
            return Ok(());
        }
        let now = health.outcomes();
        let outcomes = delta(&now.since(&self.sent), self.row.last_seen_ms);
        let written = fleet::heartbeat(&self.db, &self.row, &outcomes).await;
        if !matches!(written, Err(BeatError::Outcomes(_))) {
            self.sent = now;
        }
        written
    }

    /// The outcomes not yet counted, in the current minute.
    fn pending(&self) -> Minute {
        delta(&self.health.outcomes().since(&self.sent), now_ms())
    }

    fn failed(&mut self, e: &dyn std::fmt::Display) {
        self.failing = true;
        crate::events::heartbeat_failed(e);
    }

    /// At most once a [`PRUNE_EVERY`]: deletes the fleet's old rows.
    async fn prune(&mut self) {
        if Instant::now() < self.next_prune {
            return;
        }
        self.next_prune = Instant::now() + PRUNE_EVERY;
        match fleet::prune(&self.db, now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "pruned the fleet's old rows"),
            Err(e) => crate::events::heartbeat_failed(&format!("pruning: {e}")),
        }
    }
}

/// `outcomes` as a throughput row of the minute `at_ms` falls in.
fn delta(outcomes: &Outcomes, at_ms: i64) -> Minute {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Minute {
        minute_ms: Minute::start_of(at_ms),
        ok: count(outcomes.ok),
        rejected: count(outcomes.rejected),
        dead_lettered: count(outcomes.dead_lettered),
        retried: count(outcomes.retried),
    }
}

/// This machine's name (in a container, the container's), at most 255 bytes.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    let mut end = name.len().min(255);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}
