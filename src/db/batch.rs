//! Batches kept on the server: exact counts of a batch's members, and one
//! completion message per completion (ARCHITECTURE.md, "a batch completes exactly
//! once, with exact counts").
//!
//! The protocol, for a member (a request carrying `x-txq-batch-id`) with a final
//! answer:
//!
//! 1. `count` runs in the transaction that records the answer: the job's own for
//!    `ok` (so the count commits with the effects), one of its own for `rejected`
//!    and for a dead-lettered `failed`, before the reply or copy is published.
//! 2. It inserts the member's row in `txq_batch_members`; a row already there means
//!    the member was counted, and nothing changes — unless it was counted `failed`
//!    and now ends otherwise (a dead letter replayed after the cause was fixed),
//!    when the member moves.
//! 3. It then reads the batch's row in `txq_batches` (opening it with the size the
//!    member carries, if no member did) and adds to one of the batch's counter rows
//!    in `txq_batch_counts`, picked at random among 32, so that concurrent members
//!    seldom wait for each other's COMMIT. After COMMIT, `settle` compares the
//!    counters' sums with the size and with the counts the last completion
//!    recorded; when they complete the batch and differ, it locks the batch's row,
//!    checks again, and raises the `revision`, records the counts and writes the
//!    completion to `txq_batch_completions`, the outbox, in one COMMIT. Every
//!    member settles, so the last COMMIT's settle sees the last count; the lock
//!    makes one settle write each revision. A sweep settles the batches whose
//!    worker died before it could (`unsettled`).
//! 4. After COMMIT the worker publishes the completion, confirmed, and marks it
//!    published (`mark_published`). A completion left unpublished (the worker died
//!    between COMMIT and the confirm) is taken by any worker's sweep once it is due
//!    (`due_completions`), which first moves its due time on so that two sweeps do
//!    not race for it. Its `message_id` is stable, so a consumer drops the copy a
//!    crash between confirm and mark may repeat.

use serde::Serialize;

use super::dialect::sql;
use super::{Backend, Db, Tx};
use crate::with_conn;

/// A request's batch headers: its batch, and the size it says the batch has
/// (`None`: the batch must have been opened already).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTag {
    /// `x-txq-batch-id`.
    pub id: String,
    /// `x-txq-batch-size`.
    pub size: Option<i64>,
}

/// One member's final answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Final {
    Ok,
    Rejected,
    Failed,
}

impl Final {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(Self::Ok),
            "rejected" => Some(Self::Rejected),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// Where completions go when the batch itself does not say: a configured
/// `batch_completion_queue` wins over the members' `reply_to`, and the default
/// reply queue comes last.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Destinations<'a> {
    pub(crate) completion_queue: Option<&'a str>,
    pub(crate) reply_queue: Option<&'a str>,
}

/// A member's batch headers and identity, for [`count`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Member<'a> {
    pub(crate) tag: &'a BatchTag,
    pub(crate) message_id: &'a str,
    /// The member's `reply_to`, kept with the batch when this member opens it.
    pub(crate) reply_to: Option<&'a str>,
}

/// What [`count`] did.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub(crate) enum Count {
    /// The member had been counted with this answer already.
    Unchanged,
    /// Counted: [`count`]'s caller settles the batch after COMMIT;
    /// [`count_alone`] says this when the settle wrote no revision.
    Added,
    /// From [`count_alone`]: counted, and the settle after it wrote this revision
    /// (the batch completed, or its counts changed since): publish it.
    Completed(Completion),
}

/// Why a member cannot be counted; the job fails as `invalid_batch`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The batch callback's name: its section of an operations file, and the
/// `job_type` its handler is told.
pub const ON_BATCH_COMPLETE: &str = "on_batch_complete";

/// A completion revision to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The batch.
    pub batch_id: String,
    /// 1 for the first completion, then one more each time the counts of the
    /// completed batch change.
    pub revision: i64,
    /// The queue it goes to; `None`: nobody asked for it.
    pub destination: Option<String>,
    /// The JSON body.
    pub body: Vec<u8>,
    /// From the batch's opening to this completion, when this process wrote it.
    pub took: Option<std::time::Duration>,
}

impl Completion {
    /// The `message_id` of every copy of this revision: stable, so consumers can
    /// drop repeats.
    pub fn message_id(&self) -> String {
        completion_message_id(&self.batch_id, self.revision)
    }
}

/// `txq-batch:<revision>:<batch_id>`.
pub fn completion_message_id(batch_id: &str, revision: i64) -> String {
    format!("txq-batch:{revision}:{batch_id}")
}

/// How long the worker that completed a batch has to publish its completion
/// before a sweep may take it.
pub(crate) const PUBLISH_GRACE_MS: i64 = 10_000;

/// The longest batch id: its completion's message_id must fit an AMQP short string.
pub const MAX_BATCH_ID_BYTES: usize = 200;

/// A batch as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchStatus {
    /// The batch id.
    pub batch_id: String,
    /// How many members it has.
    pub size: i64,
    /// Members answered `ok`.
    pub ok: i64,
    /// Members answered `rejected`.
    pub rejected: i64,
    /// Members dead-lettered (`failed`), and not since replayed to success.
    pub failed: i64,
    /// 0 while open; then the completion revision last written.
    pub revision: i64,
    /// When its first member was counted, Unix milliseconds.
    #[serde(skip)]
    pub opened_at_ms: i64,
    /// When it last completed, Unix milliseconds.
    #[serde(skip)]
    pub completed_at_ms: Option<i64>,
    /// Where completions go, from the member that opened it.
    #[serde(skip)]
    pub reply_to: Option<String>,
}

impl BatchStatus {
    /// Every member has its final answer.
    pub fn complete(&self) -> bool {
        self.revision > 0
    }

    /// Members with a final answer.
    pub fn done(&self) -> i64 {
        self.ok + self.rejected + self.failed
    }

    /// The completion message's body, and `txq batch status --json`'s record.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "batch_id": self.batch_id,
            "revision": self.revision,
            "size": self.size,
            "ok": self.ok,
            "rejected": self.rejected,
            "failed": self.failed,
            "opened_at": rfc3339(self.opened_at_ms),
            "completed_at": self.completed_at_ms.map(rfc3339),
        })
    }
}

/// Unix milliseconds as RFC 3339.
pub fn rfc3339(ms: i64) -> String {
    // RFC 3339 ends at year 9999 (humantime's formatting fails past it); a value
    // read back from a table can be anything.
    const LAST: u64 = 253_402_300_799_999;
    let ms = u64::try_from(ms).unwrap_or(0).min(LAST);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Counts `member` with its final answer, in `tx` (steps 2 and 3 of the protocol).
/// `Count::Added`: after COMMIT, [`settle`] the batch.
pub(crate) async fn count(
    tx: &mut Tx,
    member: Member<'_>,
    answer: Final,
) -> Result<Count, BatchError> {
    let Some(delta) = move_member(tx, member, answer).await? else {
        return Ok(Count::Unchanged);
    };
    let id = member.tag.id.as_str();
    let (size, revision) = open(tx, member).await?;
    if let Some(said) = member.tag.size {
        if said != size {
            return Err(BatchError::Invalid(format!(
                "x-txq-batch-size is {said}, but batch `{id}` was opened with size {size}"
            )));
        }
    }
    // A new member (not a move) of a batch that completed: one too many. One
    // racing the last member is counted instead (the size is the producer's
    // promise, and the completion's counts then say so).
    let new = delta[2] >= 0;
    if new && revision > 0 {
        return Err(BatchError::Invalid(format!(
            "batch `{id}` has {size} members already: this one is one too many"
        )));
    }
    add(tx, id, delta).await?;
    Ok(Count::Added)
}

/// The counts to add: `(ok, rejected, failed)`; `None` when the member stands
/// counted with this answer (or an answer a later one cannot replace).
async fn move_member(
    tx: &mut Tx,
    member: Member<'_>,
    answer: Final,
) -> Result<Option<[i64; 3]>, sqlx::Error> {
    let (batch_id, message_id) = (member.tag.id.as_str(), member.message_id);
    let insert = sql(
        tx.backend(),
        "INSERT IGNORE INTO txq_batch_members (batch_id, message_id, status) VALUES (?, ?, ?)",
        "INSERT INTO txq_batch_members (batch_id, message_id, status) VALUES ($1, $2, $3)
         ON CONFLICT (batch_id, message_id) DO NOTHING",
        "INSERT INTO txq_batch_members (batch_id, message_id, status) VALUES (?, ?, ?)
         ON CONFLICT (batch_id, message_id) DO NOTHING",
    );
    let inserted = with_conn!(tx, c => {
        sqlx::query(insert).bind(batch_id).bind(message_id).bind(answer.as_str())
            .execute(c).await?.rows_affected()
    });
    let plus = |f: Final| match f {
        Final::Ok => [1, 0, 0],
        Final::Rejected => [0, 1, 0],
        Final::Failed => [0, 0, 1],
    };
    if inserted == 1 {
        return Ok(Some(plus(answer)));
    }
    let select = sql(
        tx.backend(),
        "SELECT status FROM txq_batch_members WHERE batch_id = ? AND message_id = ? FOR UPDATE",
        "SELECT status FROM txq_batch_members WHERE batch_id = $1 AND message_id = $2 FOR UPDATE",
        "SELECT status FROM txq_batch_members WHERE batch_id = ? AND message_id = ?",
    );
    let before: Option<String> = with_conn!(tx, c => {
        sqlx::query_scalar(select).bind(batch_id).bind(message_id).fetch_optional(c).await?
    });
    // Only a failure is ever replaced: a replayed dead letter that now succeeds or
    // is refused. Any other repeat (a redelivery the inbox did not answer) stands.
    if before.as_deref().and_then(Final::parse) != Some(Final::Failed) || answer == Final::Failed {
        return Ok(None);
    }
    let update = sql(
        tx.backend(),
        "UPDATE txq_batch_members SET status = ? WHERE batch_id = ? AND message_id = ?",
        "UPDATE txq_batch_members SET status = $1 WHERE batch_id = $2 AND message_id = $3",
        "UPDATE txq_batch_members SET status = ? WHERE batch_id = ? AND message_id = ?",
    );
    with_conn!(tx, c => {
        sqlx::query(update).bind(answer.as_str()).bind(batch_id).bind(message_id)
            .execute(c).await?;
    });
    let mut delta = plus(answer);
    delta[2] = -1;
    Ok(Some(delta))
}

/// A batch row as `live_select` reads it: the live counts in place, then the
/// counts its last completion recorded.
type Row = (
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    i64,
    i64,
    i64,
);

/// An outbox row: batch, revision, destination, body, due time.
type OutboxRow = (String, i64, Option<String>, Vec<u8>, i64);

fn from_row(r: Row) -> BatchStatus {
    BatchStatus {
        batch_id: r.0,
        size: r.1,
        ok: r.2,
        rejected: r.3,
        failed: r.4,
        revision: r.5,
        opened_at_ms: r.6,
        completed_at_ms: r.7,
        reply_to: r.8,
    }
}

/// Whether a settle would write a revision for `r`: every member answered, and
/// counts other than the last completion's (or none yet).
fn completes(r: &Row) -> bool {
    let (live, recorded) = ((r.2, r.3, r.4), (r.9, r.10, r.11));
    live.0 + live.1 + live.2 >= r.1 && (r.5 == 0 || live != recorded)
}

/// How many counter rows a batch has: members add to one picked at random, so
/// that concurrent members of one batch seldom wait for each other's COMMIT.
const SHARDS: u32 = 32;

/// The batch row, with the live counts (the sums of its counter rows) in place
/// of the counts its last completion recorded.
fn live_select(backend: Backend, filter: &str) -> String {
    let (id, sum) = match backend {
        Backend::MySql => (
            "CONVERT(b.batch_id USING utf8mb4)",
            "CAST(COALESCE(SUM(c.{0}), 0) AS SIGNED)",
        ),
        Backend::Postgres => ("b.batch_id", "CAST(COALESCE(SUM(c.{0}), 0) AS BIGINT)"),
        Backend::Sqlite => ("b.batch_id", "COALESCE(SUM(c.{0}), 0)"),
    };
    let sum = |col: &str| sum.replace("{0}", col);
    format!(
        "SELECT {id}, b.size, {}, {}, {}, b.revision, b.opened_at_ms, b.completed_at_ms, b.reply_to,
           b.ok, b.rejected, b.failed
         FROM txq_batches b LEFT JOIN txq_batch_counts c ON c.batch_id = b.batch_id
         {filter}
         GROUP BY b.batch_id, b.size, b.ok, b.rejected, b.failed, b.revision, b.opened_at_ms,
           b.completed_at_ms, b.reply_to",
        sum("ok"),
        sum("rejected"),
        sum("failed"),
    )
}

/// `live_select` of one batch, per backend: built once, read after every
/// member's COMMIT.
fn live_by_id(backend: Backend) -> &'static str {
    static QUERIES: std::sync::LazyLock<[String; 3]> = std::sync::LazyLock::new(|| {
        [Backend::MySql, Backend::Postgres, Backend::Sqlite]
            .map(|b| live_select(b, &format!("WHERE b.batch_id = {}", ph(b, 1))))
    });
    let i = match backend {
        Backend::MySql => 0,
        Backend::Postgres => 1,
        Backend::Sqlite => 2,
    };
    &QUERIES[i]
}

/// The batch's [`Row`], read on `$exec` (a connection or pool of any backend).
macro_rules! read_live {
    ($backend:expr, $exec:expr, $id:expr) => {{
        let row: Option<Row> = sqlx::query_as(live_by_id($backend))
            .bind($id)
            .fetch_optional($exec)
            .await?;
        row
    }};
}

/// `?` or `$n`.
fn ph(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Postgres => format!("${n}"),
        _ => "?".into(),
    }
}

/// The member's batch, opened with the size it carries if no member opened it
/// before: its size and revision.
async fn open(tx: &mut Tx, member: Member<'_>) -> Result<(i64, i64), BatchError> {
    let id = member.tag.id.as_str();
    let backend = tx.backend();
    let read = sql(
        backend,
        "SELECT size, revision FROM txq_batches WHERE batch_id = ?",
        "SELECT size, revision FROM txq_batches WHERE batch_id = $1",
        "SELECT size, revision FROM txq_batches WHERE batch_id = ?",
    );
    let found: Option<(i64, i64)> = with_conn!(tx, c => {
        sqlx::query_as(read).bind(id).fetch_optional(&mut *c).await?
    });
    if let Some(found) = found {
        return Ok(found);
    }
    let Some(size) = member.tag.size else {
        return Err(BatchError::Invalid(format!(
            "batch `{id}` is not open, and the request carries no x-txq-batch-size to open it"
        )));
    };
    // A direct reply-to pseudo-queue belongs to one connection: a completion
    // published later, maybe by another worker, could never reach it.
    let reply_to = member
        .reply_to
        .filter(|r| !r.starts_with("amq.rabbitmq.reply-to"));
    let insert = sql(
        backend,
        "INSERT IGNORE INTO txq_batches
           (batch_id, size, ok, rejected, failed, revision, reply_to, opened_at_ms)
         VALUES (?, ?, 0, 0, 0, 0, ?, ?)",
        "INSERT INTO txq_batches
           (batch_id, size, ok, rejected, failed, revision, reply_to, opened_at_ms)
         VALUES ($1, $2, 0, 0, 0, 0, $3, $4) ON CONFLICT (batch_id) DO NOTHING",
        "INSERT INTO txq_batches
           (batch_id, size, ok, rejected, failed, revision, reply_to, opened_at_ms)
         VALUES (?, ?, 0, 0, 0, 0, ?, ?) ON CONFLICT (batch_id) DO NOTHING",
    );
    let now = super::now_ms();
    let inserted = with_conn!(tx, c => {
        sqlx::query(insert).bind(id).bind(size).bind(reply_to).bind(now)
            .execute(&mut *c).await?.rows_affected()
    });
    if inserted == 1 {
        return Ok((size, 0));
    }
    // A member opened it at the same time and has committed. A locking read:
    // MySQL's plain reads would keep to this transaction's older snapshot.
    let q = sql(
        backend,
        "SELECT size, revision FROM txq_batches WHERE batch_id = ? LOCK IN SHARE MODE",
        "SELECT size, revision FROM txq_batches WHERE batch_id = $1 FOR SHARE",
        "SELECT size, revision FROM txq_batches WHERE batch_id = ?",
    );
    Ok(with_conn!(tx, c => {
        sqlx::query_as(q).bind(id).fetch_one(&mut *c).await?
    }))
}

/// Adds `delta` to one of the batch's counter rows.
async fn add(tx: &mut Tx, id: &str, [ok, rejected, failed]: [i64; 3]) -> Result<(), sqlx::Error> {
    let shard = i64::from(rand::random::<u32>() % SHARDS);
    let q = sql(
        tx.backend(),
        "INSERT INTO txq_batch_counts (batch_id, shard, ok, rejected, failed, updated_at_ms)
         VALUES (?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE ok = ok + VALUES(ok), rejected = rejected + VALUES(rejected),
           failed = failed + VALUES(failed), updated_at_ms = VALUES(updated_at_ms)",
        "INSERT INTO txq_batch_counts (batch_id, shard, ok, rejected, failed, updated_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (batch_id, shard) DO UPDATE SET ok = txq_batch_counts.ok + EXCLUDED.ok,
           rejected = txq_batch_counts.rejected + EXCLUDED.rejected,
           failed = txq_batch_counts.failed + EXCLUDED.failed,
           updated_at_ms = EXCLUDED.updated_at_ms",
        "INSERT INTO txq_batch_counts (batch_id, shard, ok, rejected, failed, updated_at_ms)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (batch_id, shard) DO UPDATE SET ok = ok + excluded.ok,
           rejected = rejected + excluded.rejected, failed = failed + excluded.failed,
           updated_at_ms = excluded.updated_at_ms",
    );
    let now = super::now_ms();
    with_conn!(tx, c => {
        sqlx::query(q).bind(id).bind(shard).bind(ok).bind(rejected).bind(failed).bind(now)
            .execute(&mut *c).await?;
    });
    Ok(())
}

/// Step 3: after a member's COMMIT (and in every sweep), completes the batch if
/// its live counts reach the size and differ from what its last completion
/// said: raises the revision, records the counts and writes the completion to
/// the outbox, in a transaction that holds the batch's row, so that of two
/// settles that see the same counts one writes and the other finds it written.
pub(crate) async fn settle(
    db: &Db,
    batch_id: &str,
    to: Destinations<'_>,
) -> Result<Option<Completion>, sqlx::Error> {
    let backend = db.backend();
    // Most members are not the last: one read, and no lock.
    let row = crate::on_pool!(db, p => read_live!(backend, p, batch_id));
    if !row.as_ref().is_some_and(completes) {
        return Ok(None);
    }
    let mut tx = db.begin(None).await?;
    let lock = sql(
        backend,
        "SELECT revision FROM txq_batches WHERE batch_id = ? FOR UPDATE",
        "SELECT revision FROM txq_batches WHERE batch_id = $1 FOR UPDATE",
        // SQLite: txq's transactions hold the database's write lock from BEGIN.
        "SELECT revision FROM txq_batches WHERE batch_id = ?",
    );
    with_conn!(tx, c => {
        sqlx::query(lock).bind(batch_id).fetch_optional(&mut *c).await?;
    });
    // Read again under the lock (on MySQL, this read's snapshot starts after
    // it): a settle that got there first has recorded these counts.
    let row = with_conn!(tx, c => read_live!(backend, &mut *c, batch_id));
    let Some(row) = row.filter(completes) else {
        return Ok(None);
    };
    let completion = complete(&mut tx, from_row(row), to).await?;
    tx.commit().await?;
    Ok(Some(completion))
}

/// Batches that a settle would complete or revise, among those still open or
/// whose counters changed since `since` (Unix ms): what a sweep settles, in case
/// the worker that counted their last change died before it could. Usually
/// none, and found in one query, however many batches there are.
pub(crate) async fn unsettled(db: &Db, since: i64, limit: i64) -> Result<Vec<String>, sqlx::Error> {
    let body = "FROM txq_batches b JOIN txq_batch_counts c ON c.batch_id = b.batch_id
         WHERE b.revision = 0 OR b.batch_id IN
           (SELECT batch_id FROM txq_batch_counts WHERE updated_at_ms >= {since})
         GROUP BY b.batch_id, b.size, b.ok, b.rejected, b.failed, b.revision
         HAVING SUM(c.ok + c.rejected + c.failed) >= b.size AND (b.revision = 0
           OR SUM(c.ok) <> b.ok OR SUM(c.rejected) <> b.rejected OR SUM(c.failed) <> b.failed)
         LIMIT {limit}";
    let backend = db.backend();
    let id = match backend {
        Backend::MySql => "CONVERT(b.batch_id USING utf8mb4)",
        _ => "b.batch_id",
    };
    let q = format!(
        "SELECT {id} {}",
        body.replace("{since}", &ph(backend, 1))
            .replace("{limit}", &ph(backend, 2))
    );
    Ok(crate::on_pool!(db, p => {
        sqlx::query_scalar(sqlx::AssertSqlSafe(q)).bind(since).bind(limit).fetch_all(p).await?
    }))
}

/// Marks the batch complete with its next revision and writes the completion to
/// the outbox, due now (the worker publishes it after COMMIT).
async fn complete(
    tx: &mut Tx,
    mut batch: BatchStatus,
    to: Destinations<'_>,
) -> Result<Completion, sqlx::Error> {
    batch.revision += 1;
    batch.completed_at_ms = Some(super::now_ms());
    let destination = to
        .completion_queue
        .map(str::to_owned)
        .or_else(|| batch.reply_to.clone())
        .or_else(|| to.reply_queue.map(str::to_owned));
    let body = batch.to_json().to_string().into_bytes();
    let (mark, outbox) = match tx.backend() {
        Backend::Postgres => (
            "UPDATE txq_batches SET revision = $1, completed_at_ms = $2, ok = $3, rejected = $4,
               failed = $5 WHERE batch_id = $6",
            "INSERT INTO txq_batch_completions (batch_id, revision, destination, body, due_at_ms)
             VALUES ($1, $2, $3, $4, $5)",
        ),
        _ => (
            "UPDATE txq_batches SET revision = ?, completed_at_ms = ?, ok = ?, rejected = ?,
               failed = ? WHERE batch_id = ?",
            "INSERT INTO txq_batch_completions (batch_id, revision, destination, body, due_at_ms)
             VALUES (?, ?, ?, ?, ?)",
        ),
    };
    with_conn!(tx, c => {
        sqlx::query(mark).bind(batch.revision).bind(batch.completed_at_ms).bind(batch.ok)
            .bind(batch.rejected).bind(batch.failed).bind(&batch.batch_id)
            .execute(&mut *c).await?;
        sqlx::query(outbox).bind(&batch.batch_id).bind(batch.revision).bind(destination.as_deref())
            .bind(&body).bind(batch.completed_at_ms.map(|t| t + PUBLISH_GRACE_MS))
            .execute(&mut *c).await?;
    });
    let took = batch.completed_at_ms.map(|done| {
        std::time::Duration::from_millis(u64::try_from(done - batch.opened_at_ms).unwrap_or(0))
    });
    Ok(Completion {
        batch_id: batch.batch_id,
        revision: batch.revision,
        destination,
        body,
        took,
    })
}

/// Counts `member` in a transaction of its own (a rejection, a dead-lettered
/// failure), committed before the answer is published, then settles the batch.
pub(crate) async fn count_alone(
    db: &Db,
    member: Member<'_>,
    answer: Final,
    to: Destinations<'_>,
) -> Result<Count, BatchError> {
    let mut tx = db.begin(None).await?;
    let counted = count(&mut tx, member, answer).await?;
    tx.commit().await?;
    if counted == Count::Unchanged {
        return Ok(counted);
    }
    Ok(match settle(db, &member.tag.id, to).await? {
        Some(c) => Count::Completed(c),
        None => Count::Added,
    })
}

/// Takes the batch callback's turn for one completion revision, in the
/// callback's own transaction: `true` once, for the transaction that first marks
/// it (a concurrent one waits on the row lock, then finds it marked). Rolled
/// back with the callback, so a callback that fails is run again.
pub(crate) async fn claim_callback(
    tx: &mut Tx,
    batch_id: &str,
    revision: i64,
) -> Result<bool, sqlx::Error> {
    let q = sql(
        tx.backend(),
        "UPDATE txq_batch_completions SET callback_at_ms = ?
         WHERE batch_id = ? AND revision = ? AND callback_at_ms IS NULL",
        "UPDATE txq_batch_completions SET callback_at_ms = $1
         WHERE batch_id = $2 AND revision = $3 AND callback_at_ms IS NULL",
        "UPDATE txq_batch_completions SET callback_at_ms = ?
         WHERE batch_id = ? AND revision = ? AND callback_at_ms IS NULL",
    );
    // Older revisions whose callback has not run are superseded: run after this
    // one, they would leave the older counts behind.
    let older = sql(
        tx.backend(),
        "UPDATE txq_batch_completions SET callback_at_ms = ?
         WHERE batch_id = ? AND revision < ? AND callback_at_ms IS NULL",
        "UPDATE txq_batch_completions SET callback_at_ms = $1
         WHERE batch_id = $2 AND revision < $3 AND callback_at_ms IS NULL",
        "UPDATE txq_batch_completions SET callback_at_ms = ?
         WHERE batch_id = ? AND revision < ? AND callback_at_ms IS NULL",
    );
    let now = super::now_ms();
    let claimed = with_conn!(tx, c => {
        sqlx::query(q).bind(now).bind(batch_id).bind(revision).execute(&mut *c).await?
            .rows_affected()
    });
    if claimed == 1 {
        with_conn!(tx, c => {
            sqlx::query(older).bind(now).bind(batch_id).bind(revision).execute(&mut *c).await?;
        });
    }
    Ok(claimed == 1)
}

/// Step 4: the completion is out (or had nowhere to go).
pub(crate) async fn mark_published(
    db: &Db,
    batch_id: &str,
    revision: i64,
) -> Result<(), sqlx::Error> {
    let q = sql(
        db.backend(),
        "UPDATE txq_batch_completions SET published_at_ms = ? WHERE batch_id = ? AND revision = ?",
        "UPDATE txq_batch_completions SET published_at_ms = $1 WHERE batch_id = $2 AND revision = $3",
        "UPDATE txq_batch_completions SET published_at_ms = ? WHERE batch_id = ? AND revision = ?",
    );
    crate::on_pool!(db, p => {
        sqlx::query(q).bind(super::now_ms()).bind(batch_id).bind(revision).execute(p).await?;
    });
    Ok(())
}

/// Step 4's recovery: completions due and not yet published, each taken by moving
/// its due time `lease_ms` on (so that another sweep leaves it alone meanwhile).
pub(crate) async fn due_completions(
    db: &Db,
    now: i64,
    lease_ms: i64,
    limit: i64,
) -> Result<Vec<Completion>, sqlx::Error> {
    let select = sql(
        db.backend(),
        "SELECT CONVERT(batch_id USING utf8mb4), revision, destination, body, due_at_ms
         FROM txq_batch_completions WHERE published_at_ms IS NULL AND due_at_ms <= ?
         ORDER BY due_at_ms LIMIT ?",
        "SELECT batch_id, revision, destination, body, due_at_ms
         FROM txq_batch_completions WHERE published_at_ms IS NULL AND due_at_ms <= $1
         ORDER BY due_at_ms LIMIT $2",
        "SELECT batch_id, revision, destination, body, due_at_ms
         FROM txq_batch_completions WHERE published_at_ms IS NULL AND due_at_ms <= ?
         ORDER BY due_at_ms LIMIT ?",
    );
    let take = sql(
        db.backend(),
        "UPDATE txq_batch_completions SET due_at_ms = ?
         WHERE batch_id = ? AND revision = ? AND due_at_ms = ? AND published_at_ms IS NULL",
        "UPDATE txq_batch_completions SET due_at_ms = $1
         WHERE batch_id = $2 AND revision = $3 AND due_at_ms = $4 AND published_at_ms IS NULL",
        "UPDATE txq_batch_completions SET due_at_ms = ?
         WHERE batch_id = ? AND revision = ? AND due_at_ms = ? AND published_at_ms IS NULL",
    );
    let rows: Vec<OutboxRow> = crate::on_pool!(db, p => {
        sqlx::query_as(select).bind(now).bind(limit).fetch_all(p).await?
    });
    let mut taken = Vec::new();
    for (batch_id, revision, destination, body, due) in rows {
        let won = crate::on_pool!(db, p => {
            sqlx::query(take).bind(now + lease_ms).bind(&batch_id).bind(revision).bind(due)
                .execute(p).await?.rows_affected()
        });
        if won == 1 {
            taken.push(Completion {
                batch_id,
                revision,
                destination,
                body,
                took: None,
            });
        }
    }
    Ok(taken)
}

/// A batch as it stands, with its live counts; `None`: no member of it has been
/// counted.
pub async fn status(db: &Db, batch_id: &str) -> Result<Option<BatchStatus>, sqlx::Error> {
    let backend = db.backend();
    let row = crate::on_pool!(db, p => read_live!(backend, p, batch_id));
    Ok(row.map(from_row))
}

/// Batches, newest first: the open ones only with `open_only`; at most `limit`.
pub async fn list(db: &Db, open_only: bool, limit: i64) -> Result<Vec<BatchStatus>, sqlx::Error> {
    let backend = db.backend();
    let filter = if open_only {
        "WHERE b.revision = 0"
    } else {
        ""
    };
    let q = format!(
        "{} ORDER BY b.opened_at_ms DESC LIMIT {}",
        live_select(backend, filter),
        ph(backend, 1)
    );
    let rows: Vec<Row> = crate::on_pool!(db, p => {
        sqlx::query_as(sqlx::AssertSqlSafe(q)).bind(limit).fetch_all(p).await?
    });
    Ok(rows.into_iter().map(from_row).collect())
}

/// Batches not yet complete, for the `txq_batches_open` gauge.
pub(crate) async fn open_count(db: &Db) -> Result<i64, sqlx::Error> {
    let q = "SELECT COUNT(*) FROM txq_batches WHERE revision = 0";
    Ok(crate::on_pool!(db, p => sqlx::query_scalar(q).fetch_one(p).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::temp_db;

    #[test]
    fn any_stored_time_formats_without_a_panic() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    fn tag(id: &str, size: Option<i64>) -> BatchTag {
        BatchTag {
            id: id.into(),
            size,
        }
    }

    async fn count_one(
        db: &Db,
        tag: &BatchTag,
        message_id: &str,
        answer: Final,
    ) -> Result<Count, BatchError> {
        let member = Member {
            tag,
            message_id,
            reply_to: Some("replies"),
        };
        count_alone(db, member, answer, Destinations::default()).await
    }

    #[tokio::test]
    async fn the_last_member_completes_the_batch_once_with_exact_counts() {
        let t = temp_db().await;
        let b = tag("b1", Some(3));
        assert_eq!(
            count_one(&t.db, &b, "m1", Final::Ok).await.expect("m1"),
            Count::Added
        );
        // A repeat of a counted member changes nothing.
        assert_eq!(
            count_one(&t.db, &b, "m1", Final::Ok)
                .await
                .expect("m1 again"),
            Count::Unchanged
        );
        assert_eq!(
            count_one(&t.db, &b, "m2", Final::Rejected)
                .await
                .expect("m2"),
            Count::Added
        );
        let Count::Completed(c) = count_one(&t.db, &b, "m3", Final::Failed).await.expect("m3")
        else {
            panic!("the third member completes a batch of three");
        };
        assert_eq!((c.revision, c.destination.as_deref()), (1, Some("replies")));
        let body: serde_json::Value = serde_json::from_slice(&c.body).expect("JSON");
        assert_eq!(
            (
                body["ok"].as_i64(),
                body["rejected"].as_i64(),
                body["failed"].as_i64()
            ),
            (Some(1), Some(1), Some(1))
        );
        assert_eq!(
            count_one(&t.db, &b, "m3", Final::Failed)
                .await
                .expect("m3 again"),
            Count::Unchanged
        );
        let s = status(&t.db, "b1").await.expect("status").expect("a row");
        assert_eq!(
            (s.size, s.ok, s.rejected, s.failed, s.revision),
            (3, 1, 1, 1, 1)
        );
    }

    #[tokio::test]
    async fn a_replayed_failure_that_succeeds_moves_and_makes_a_new_revision() {
        let t = temp_db().await;
        let b = tag("b2", Some(2));
        assert_eq!(
            count_one(&t.db, &b, "m1", Final::Ok).await.expect("m1"),
            Count::Added
        );
        assert!(
            matches!(count_one(&t.db, &b, "m2", Final::Failed).await.expect("m2"), Count::Completed(c) if c.revision == 1)
        );
        let Count::Completed(c) = count_one(&t.db, &b, "m2", Final::Ok)
            .await
            .expect("replayed")
        else {
            panic!("the replay changes the counts of a complete batch");
        };
        assert_eq!(c.revision, 2);
        let s = status(&t.db, "b2").await.expect("status").expect("a row");
        assert_eq!((s.ok, s.rejected, s.failed, s.revision), (2, 0, 0, 2));
        // An ok member never moves back.
        assert_eq!(
            count_one(&t.db, &b, "m2", Final::Failed)
                .await
                .expect("again"),
            Count::Unchanged
        );
    }

    #[tokio::test]
    async fn wrong_sizes_unknown_batches_and_extra_members_are_refused_and_not_counted() {
        let t = temp_db().await;
        let b = tag("b3", Some(2));
        assert_eq!(
            count_one(&t.db, &b, "m1", Final::Ok).await.expect("m1"),
            Count::Added
        );
        let wrong = count_one(&t.db, &tag("b3", Some(5)), "m2", Final::Ok).await;
        assert!(
            matches!(&wrong, Err(BatchError::Invalid(m)) if m.contains("size 2")),
            "{wrong:?}"
        );
        let unknown = count_one(&t.db, &tag("nope", None), "m1", Final::Ok).await;
        assert!(
            matches!(&unknown, Err(BatchError::Invalid(m)) if m.contains("not open")),
            "{unknown:?}"
        );
        // Joining an open batch needs no size.
        assert!(matches!(
            count_one(&t.db, &tag("b3", None), "m2", Final::Ok)
                .await
                .expect("m2"),
            Count::Completed(_)
        ));
        let extra = count_one(&t.db, &b, "m3", Final::Ok).await;
        assert!(
            matches!(&extra, Err(BatchError::Invalid(m)) if m.contains("one too many")),
            "{extra:?}"
        );
        let s = status(&t.db, "b3").await.expect("status").expect("a row");
        assert_eq!((s.ok, s.revision), (2, 1));
        assert!(status(&t.db, "nope").await.expect("status").is_none());
    }

    #[tokio::test]
    async fn a_last_member_whose_worker_died_before_settling_is_settled_by_a_sweep() {
        let t = temp_db().await;
        let b = tag("b5", Some(1));
        let member = Member {
            tag: &b,
            message_id: "m1",
            reply_to: None,
        };
        let before = crate::db::now_ms();
        let mut tx = t.db.begin(None).await.expect("begin");
        assert_eq!(
            count(&mut tx, member, Final::Ok).await.expect("count"),
            Count::Added
        );
        tx.commit().await.expect("commit");
        // The worker died here. A sweep finds the batch, and settles it once.
        let found = unsettled(&t.db, before, 10).await.expect("unsettled");
        assert_eq!(found, ["b5"]);
        let to = Destinations::default();
        let c = settle(&t.db, "b5", to).await.expect("settle");
        assert_eq!(c.map(|c| c.revision), Some(1));
        assert!(settle(&t.db, "b5", to).await.expect("again").is_none());
        let s = status(&t.db, "b5").await.expect("status").expect("a row");
        assert_eq!((s.ok, s.revision), (1, 1));
        assert!(
            unsettled(&t.db, before, 10)
                .await
                .expect("unsettled")
                .is_empty(),
            "a settled batch is not found again"
        );
        // A batch complete with a failure, whose replayed member's worker died
        // before settling: found, and revised.
        let b = tag("b6", Some(1));
        let failed = Member {
            tag: &b,
            message_id: "m1",
            reply_to: None,
        };
        assert!(matches!(
            count_alone(&t.db, failed, Final::Failed, to)
                .await
                .expect("m1"),
            Count::Completed(_)
        ));
        let mut tx = t.db.begin(None).await.expect("begin");
        assert_eq!(
            count(&mut tx, failed, Final::Ok).await.expect("replayed"),
            Count::Added
        );
        tx.commit().await.expect("commit");
        assert_eq!(
            unsettled(&t.db, before, 10).await.expect("unsettled"),
            ["b6"]
        );
        let c = settle(&t.db, "b6", to).await.expect("settle");
        assert_eq!(c.map(|c| c.revision), Some(2));
    }

    #[tokio::test]
    async fn a_newer_revision_s_callback_supersedes_an_older_one_not_yet_run() {
        let t = temp_db().await;
        let b = tag("b7", Some(1));
        let to = Destinations::default();
        let member = Member {
            tag: &b,
            message_id: "m1",
            reply_to: None,
        };
        for answer in [Final::Failed, Final::Ok] {
            assert!(matches!(
                count_alone(&t.db, member, answer, to).await.expect("count"),
                Count::Completed(_)
            ));
        }
        // Revision 1's callback failed and waits for the sweep; revision 2's runs.
        let mut tx = t.db.begin(None).await.expect("begin");
        assert!(claim_callback(&mut tx, "b7", 2).await.expect("claim 2"));
        tx.commit().await.expect("commit");
        let mut tx = t.db.begin(None).await.expect("begin");
        assert!(
            !claim_callback(&mut tx, "b7", 1).await.expect("claim 1"),
            "superseded: it would leave the older counts behind"
        );
        assert!(!claim_callback(&mut tx, "b7", 2).await.expect("again"));
    }

    #[tokio::test]
    async fn a_due_completion_is_taken_by_one_sweep_until_its_lease_ends() {
        let t = temp_db().await;
        let b = tag("b4", Some(1));
        assert!(matches!(
            count_one(&t.db, &b, "m1", Final::Ok).await.expect("m1"),
            Count::Completed(_)
        ));
        let now = crate::db::now_ms();
        // The worker that completed it publishes it; a sweep waits out its grace.
        assert!(
            due_completions(&t.db, now, 60_000, 10)
                .await
                .expect("sweep")
                .is_empty()
        );
        let later = now + PUBLISH_GRACE_MS + 1;
        let first = due_completions(&t.db, later, 60_000, 10)
            .await
            .expect("sweep");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].message_id(), "txq-batch:1:b4");
        let again = due_completions(&t.db, later, 60_000, 10)
            .await
            .expect("sweep");
        assert!(again.is_empty(), "leased to the first sweep");
        mark_published(&t.db, "b4", 1).await.expect("mark");
        assert_eq!(open_count(&t.db).await.expect("open"), 0);
    }
}
