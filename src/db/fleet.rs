//! The fleet: each running worker's row in `txq_workers`, and its outcomes by
//! minute in `txq_throughput`, for `txq workers` and the console.
//!
//! The protocol, for one worker (`worker::heartbeat` runs it):
//!
//! 1. At start it `register`s: its row, with a fresh uuid as its id. A worker
//!    that cannot reach the database still consumes; its next beat writes the row.
//! 2. Every [`HEARTBEAT`] (config `heartbeat`) it `heartbeat`s: it adds the
//!    outcomes settled since its last beat to the current minute's row of
//!    `txq_throughput`, then upserts its own row (`last_seen_ms`, jobs in flight,
//!    settled, reconnects). A beat that failed leaves its outcomes to the next one,
//!    which counts them in its own minute; an upsert also brings back a row that
//!    was pruned while the database was out of reach. About once a minute a beat
//!    also `prune`s.
//! 3. A clean stop `deregister`s: the last outcomes are added, and the row is
//!    deleted. A worker that died (kill -9, a lost host) leaves its row: it reads as
//!    gone ([`WorkerRow::is_gone`]) after [`GONE_AFTER`] heartbeats without one, and
//!    the next prune by any worker deletes it after [`PRUNE_AFTER`].
//!
//! Times are the workers' own clocks (Unix milliseconds), as in txq's other
//! tables: hosts whose clocks disagree by seconds make `last seen` as wrong.

use std::time::Duration;

use serde::Serialize;

use super::Db;
use super::dialect::sql;

/// How often a worker beats, unless configured (`heartbeat`, at most this).
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// A worker whose row was not written for this many default heartbeats is gone.
pub const GONE_AFTER: u32 = 3;

/// Rows of workers not seen for this long are deleted.
pub const PRUNE_AFTER: Duration = Duration::from_secs(10 * 60);

/// Throughput minutes older than this are deleted.
pub const THROUGHPUT_KEPT: Duration = Duration::from_secs(2 * 3600);

/// A worker as its last heartbeat left it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRow {
    /// A uuid, fresh at each start.
    pub id: String,
    /// The host name it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: i64,
    /// txq's version.
    pub version: String,
    /// The request queue it consumes.
    pub queue: String,
    /// Jobs in flight at most.
    pub concurrency: i64,
    /// When it started, Unix milliseconds.
    pub started_at_ms: i64,
    /// Its last heartbeat, Unix milliseconds.
    pub last_seen_ms: i64,
    /// Jobs running at its last heartbeat.
    pub in_flight: i64,
    /// Deliveries it acked.
    pub settled: i64,
    /// Times its broker connection was rebuilt.
    pub reconnects: i64,
}

impl WorkerRow {
    /// No heartbeat for [`GONE_AFTER`] × [`HEARTBEAT`] at `now_ms`: it died, or
    /// cannot reach the database.
    pub fn is_gone(&self, now_ms: i64) -> bool {
        now_ms.saturating_sub(self.last_seen_ms) > millis(HEARTBEAT * GONE_AFTER)
    }
}

/// Outcomes of one minute (summed over the workers by [`throughput`]; one
/// worker's since its last beat in `heartbeat`). Duplicates answered from the
/// inbox and requeues are not outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// The minute's start, Unix milliseconds.
    pub minute_ms: i64,
    /// Answered `ok`.
    pub ok: i64,
    /// Answered `rejected`.
    pub rejected: i64,
    /// Dead-lettered (answered `failed`).
    pub dead_lettered: i64,
    /// Sent to a delayed-retry queue.
    pub retried: i64,
}

impl Minute {
    /// The start of the minute `ms` falls in.
    pub fn start_of(ms: i64) -> i64 {
        ms - ms.rem_euclid(60_000)
    }

    fn is_empty(&self) -> bool {
        self.ok == 0 && self.rejected == 0 && self.dead_lettered == 0 && self.retried == 0
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Every worker with a row, live or gone (until pruned), oldest start first.
pub async fn workers(db: &Db) -> Result<Vec<WorkerRow>, sqlx::Error> {
    type Row = (
        String,
        String,
        i64,
        String,
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    );
    let q = "SELECT id, host, pid, version, queue, concurrency, started_at_ms, last_seen_ms,
           in_flight, settled, reconnects
         FROM txq_workers ORDER BY started_at_ms, id";
    let rows: Vec<Row> = crate::on_pool!(db, p => sqlx::query_as(q).fetch_all(p).await?);
    Ok(rows
        .into_iter()
        .map(
            |(
                id,
                host,
                pid,
                version,
                queue,
                concurrency,
                started_at_ms,
                last_seen_ms,
                in_flight,
                settled,
                reconnects,
            )| WorkerRow {
                id,
                host,
                pid,
                version,
                queue,
                concurrency,
                started_at_ms,
                last_seen_ms,
                in_flight,
                settled,
                reconnects,
            },
        )
        .collect())
}

/// The outcomes of every worker by minute, for the minutes that start at or after
/// `since_ms`, oldest first. A minute without outcomes has no row.
pub async fn throughput(db: &Db, since_ms: i64) -> Result<Vec<Minute>, sqlx::Error> {
    let q = sql(
        db.backend(),
        "SELECT minute_ms, CAST(SUM(ok) AS SIGNED), CAST(SUM(rejected) AS SIGNED),
           CAST(SUM(dead_lettered) AS SIGNED), CAST(SUM(retried) AS SIGNED)
         FROM txq_throughput WHERE minute_ms >= ? GROUP BY minute_ms ORDER BY minute_ms",
        "SELECT minute_ms, CAST(SUM(ok) AS BIGINT), CAST(SUM(rejected) AS BIGINT),
           CAST(SUM(dead_lettered) AS BIGINT), CAST(SUM(retried) AS BIGINT)
         FROM txq_throughput WHERE minute_ms >= $1 GROUP BY minute_ms ORDER BY minute_ms",
        "SELECT minute_ms, SUM(ok), SUM(rejected), SUM(dead_lettered), SUM(retried)
         FROM txq_throughput WHERE minute_ms >= ? GROUP BY minute_ms ORDER BY minute_ms",
    );
    let rows: Vec<(i64, i64, i64, i64, i64)> = crate::on_pool!(db, p => {
        sqlx::query_as(q).bind(since_ms).fetch_all(p).await?
    });
    Ok(rows
        .into_iter()
        .map(|(minute_ms, ok, rejected, dead_lettered, retried)| Minute {
            minute_ms,
            ok,
            rejected,
            dead_lettered,
            retried,
        })
        .collect())
}

/// Step 1: writes the worker's row (an upsert, so registering again is harmless).
pub(crate) async fn register(db: &Db, row: &WorkerRow) -> Result<(), sqlx::Error> {
    upsert(db, row).await
}

/// Step 2: adds `outcomes` (one worker's since its last beat, in the minute
/// `outcomes.minute_ms`) to `txq_throughput`, then upserts the worker's row. An
/// error before the first statement's end means the outcomes were not counted.
pub(crate) async fn heartbeat(
    db: &Db,
    row: &WorkerRow,
    outcomes: &Minute,
) -> Result<(), BeatError> {
    add_outcomes(db, &row.id, outcomes)
        .await
        .map_err(BeatError::Outcomes)?;
    upsert(db, row).await.map_err(BeatError::Row)
}

/// Why a heartbeat failed: before its outcomes were counted, or after.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BeatError {
    /// Nothing was written: the outcomes go with the next beat.
    #[error("counting the outcomes: {0}")]
    Outcomes(sqlx::Error),
    /// The outcomes were counted; the worker's row was not written.
    #[error("writing the worker's row: {0}")]
    Row(sqlx::Error),
}

/// Step 3: adds the last `outcomes`, then deletes the worker's row.
pub(crate) async fn deregister(db: &Db, id: &str, outcomes: &Minute) -> Result<(), sqlx::Error> {
    add_outcomes(db, id, outcomes).await?;
    let q = sql(
        db.backend(),
        "DELETE FROM txq_workers WHERE id = ?",
        "DELETE FROM txq_workers WHERE id = $1",
        "DELETE FROM txq_workers WHERE id = ?",
    );
    crate::on_pool!(db, p => { sqlx::query(q).bind(id).execute(p).await?; });
    Ok(())
}

/// Deletes the rows of workers not seen for [`PRUNE_AFTER`] and the throughput
/// minutes older than [`THROUGHPUT_KEPT`], at `now_ms`; how many rows went.
pub(crate) async fn prune(db: &Db, now_ms: i64) -> Result<u64, sqlx::Error> {
    let workers = sql(
        db.backend(),
        "DELETE FROM txq_workers WHERE last_seen_ms < ?",
        "DELETE FROM txq_workers WHERE last_seen_ms < $1",
        "DELETE FROM txq_workers WHERE last_seen_ms < ?",
    );
    let minutes = sql(
        db.backend(),
        "DELETE FROM txq_throughput WHERE minute_ms < ?",
        "DELETE FROM txq_throughput WHERE minute_ms < $1",
        "DELETE FROM txq_throughput WHERE minute_ms < ?",
    );
    let gone = now_ms - millis(PRUNE_AFTER);
    let old = now_ms - millis(THROUGHPUT_KEPT);
    Ok(crate::on_pool!(db, p => {
        let a = sqlx::query(workers).bind(gone).execute(p).await?.rows_affected();
        let b = sqlx::query(minutes).bind(old).execute(p).await?.rows_affected();
        a + b
    }))
}

async fn upsert(db: &Db, row: &WorkerRow) -> Result<(), sqlx::Error> {
    let q = sql(
        db.backend(),
        "INSERT INTO txq_workers (id, host, pid, version, queue, concurrency, started_at_ms,
           last_seen_ms, in_flight, settled, reconnects)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE last_seen_ms = VALUES(last_seen_ms),
           in_flight = VALUES(in_flight), settled = VALUES(settled),
           reconnects = VALUES(reconnects)",
        "INSERT INTO txq_workers (id, host, pid, version, queue, concurrency, started_at_ms,
           last_seen_ms, in_flight, settled, reconnects)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (id) DO UPDATE SET last_seen_ms = EXCLUDED.last_seen_ms,
           in_flight = EXCLUDED.in_flight, settled = EXCLUDED.settled,
           reconnects = EXCLUDED.reconnects",
        "INSERT INTO txq_workers (id, host, pid, version, queue, concurrency, started_at_ms,
           last_seen_ms, in_flight, settled, reconnects)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms,
           in_flight = excluded.in_flight, settled = excluded.settled,
           reconnects = excluded.reconnects",
    );
    crate::on_pool!(db, p => {
        sqlx::query(q)
            .bind(&row.id).bind(&row.host).bind(row.pid).bind(&row.version).bind(&row.queue)
            .bind(row.concurrency).bind(row.started_at_ms).bind(row.last_seen_ms)
            .bind(row.in_flight).bind(row.settled).bind(row.reconnects)
            .execute(p).await?;
    });
    Ok(())
}

/// Adds one worker's `outcomes` to its row of their minute; nothing when there
/// are none.
async fn add_outcomes(db: &Db, worker_id: &str, outcomes: &Minute) -> Result<(), sqlx::Error> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let q = sql(
        db.backend(),
        "INSERT INTO txq_throughput (minute_ms, worker_id, ok, rejected, dead_lettered, retried)
         VALUES (?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE ok = ok + VALUES(ok), rejected = rejected + VALUES(rejected),
           dead_lettered = dead_lettered + VALUES(dead_lettered),
           retried = retried + VALUES(retried)",
        "INSERT INTO txq_throughput (minute_ms, worker_id, ok, rejected, dead_lettered, retried)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (minute_ms, worker_id) DO UPDATE SET ok = txq_throughput.ok + EXCLUDED.ok,
           rejected = txq_throughput.rejected + EXCLUDED.rejected,
           dead_lettered = txq_throughput.dead_lettered + EXCLUDED.dead_lettered,
           retried = txq_throughput.retried + EXCLUDED.retried",
        "INSERT INTO txq_throughput (minute_ms, worker_id, ok, rejected, dead_lettered, retried)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (minute_ms, worker_id) DO UPDATE SET ok = txq_throughput.ok + excluded.ok,
           rejected = txq_throughput.rejected + excluded.rejected,
           dead_lettered = txq_throughput.dead_lettered + excluded.dead_lettered,
           retried = txq_throughput.retried + excluded.retried",
    );
    crate::on_pool!(db, p => {
        sqlx::query(q)
            .bind(outcomes.minute_ms).bind(worker_id).bind(outcomes.ok).bind(outcomes.rejected)
            .bind(outcomes.dead_lettered).bind(outcomes.retried)
            .execute(p).await?;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::temp_db;

    fn row(id: &str, started: i64, seen: i64) -> WorkerRow {
        WorkerRow {
            id: id.into(),
            host: "h".into(),
            pid: 7,
            version: "0.0.0".into(),
            queue: "q".into(),
            concurrency: 4,
            started_at_ms: started,
            last_seen_ms: seen,
            in_flight: 0,
            settled: 0,
            reconnects: 0,
        }
    }

    fn counts(minute_ms: i64, ok: i64, rejected: i64, dead: i64, retried: i64) -> Minute {
        Minute {
            minute_ms,
            ok,
            rejected,
            dead_lettered: dead,
            retried,
        }
    }

    #[tokio::test]
    async fn a_heartbeat_updates_the_row_and_adds_outcomes_to_its_minute() {
        let t = temp_db().await;
        let minute = Minute::start_of(1_700_000_000_000);
        register(&t.db, &row("w1", minute, minute))
            .await
            .expect("register");
        register(&t.db, &row("w2", minute - 5, minute))
            .await
            .expect("register");
        let mut w1 = row("w1", minute, minute + 5_000);
        w1.in_flight = 3;
        w1.settled = 10;
        w1.reconnects = 1;
        // A later beat never moves the start, the host or the queue.
        w1.host = "other".into();
        heartbeat(&t.db, &w1, &counts(minute, 2, 1, 0, 0))
            .await
            .expect("beat");
        heartbeat(
            &t.db,
            &row("w2", minute, minute),
            &counts(minute, 1, 0, 1, 1),
        )
        .await
        .expect("beat");
        let mut w1b = w1.clone();
        w1b.last_seen_ms = minute + 65_000;
        heartbeat(&t.db, &w1b, &counts(minute + 60_000, 4, 0, 0, 0))
            .await
            .expect("beat");
        // Nothing to add: no row for the minute.
        heartbeat(&t.db, &w1b, &counts(minute + 120_000, 0, 0, 0, 0))
            .await
            .expect("beat");

        let all = workers(&t.db).await.expect("workers");
        let ids: Vec<&str> = all.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["w2", "w1"], "oldest start first");
        let w = &all[1];
        assert_eq!(
            (w.host.as_str(), w.started_at_ms, w.last_seen_ms),
            ("h", minute, minute + 65_000)
        );
        assert_eq!((w.in_flight, w.settled, w.reconnects), (3, 10, 1));

        assert_eq!(
            throughput(&t.db, 0).await.expect("throughput"),
            [
                counts(minute, 3, 1, 1, 1),
                counts(minute + 60_000, 4, 0, 0, 0)
            ]
        );
        assert_eq!(
            throughput(&t.db, minute + 1).await.expect("throughput"),
            [counts(minute + 60_000, 4, 0, 0, 0)]
        );

        deregister(&t.db, "w1", &counts(minute + 60_000, 1, 0, 0, 0))
            .await
            .expect("deregister");
        let ids: Vec<String> = workers(&t.db)
            .await
            .expect("workers")
            .into_iter()
            .map(|w| w.id)
            .collect();
        assert_eq!(ids, ["w2"]);
        let last = throughput(&t.db, minute + 60_000)
            .await
            .expect("throughput");
        assert_eq!(last, [counts(minute + 60_000, 5, 0, 0, 0)]);
    }

    #[tokio::test]
    async fn a_silent_worker_is_gone_after_three_heartbeats_and_pruned_after_ten_minutes() {
        let t = temp_db().await;
        let now = 1_700_000_000_000;
        let w = row("w", now - 20_000, now - 15_000);
        assert!(!w.is_gone(now), "exactly three heartbeats: not yet");
        assert!(w.is_gone(now + 1));
        for (id, seen) in [
            ("fresh", now),
            ("gone", now - 60_000),
            ("dead", now - millis(PRUNE_AFTER) - 1),
        ] {
            register(&t.db, &row(id, seen, seen))
                .await
                .expect("register");
        }
        let old = Minute::start_of(now - millis(THROUGHPUT_KEPT)) - 60_000;
        let recent = Minute::start_of(now);
        for m in [old, recent] {
            add_outcomes(&t.db, "fresh", &counts(m, 1, 0, 0, 0))
                .await
                .expect("add");
        }
        assert_eq!(prune(&t.db, now).await.expect("prune"), 2);
        let left: Vec<(String, bool)> = workers(&t.db)
            .await
            .expect("workers")
            .into_iter()
            .map(|w| {
                let gone = w.is_gone(now);
                (w.id, gone)
            })
            .collect();
        assert_eq!(
            left,
            [("gone".to_owned(), true), ("fresh".to_owned(), false)]
        );
        let minutes: Vec<i64> = throughput(&t.db, 0)
            .await
            .expect("throughput")
            .iter()
            .map(|m| m.minute_ms)
            .collect();
        assert_eq!(minutes, [recent]);
    }
}
