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
//! 3. It then adds to the batch's row in `txq_batches`, opening it with the size
//!    the member carries. The row stays locked until COMMIT, so the members of one
//!    batch count one after another and exactly one of them sees the counts reach
//!    the size: that transaction raises the batch's `revision` and writes the
//!    completion to `txq_batch_completions`, the outbox.
//! 4. After COMMIT the worker publishes the completion, confirmed, and marks it
//!    published (`mark_published`). A completion left unpublished (the worker died
//!    between COMMIT and the confirm) is taken by any worker's sweep once it is due
//!    (`due_completions`), which first moves its due time on so that two sweeps do
//!    not race for it. Its `message_id` is stable, so a consumer drops the copy a
//!    crash between confirm and mark may repeat.

use serde::Serialize;

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
#[derive(Debug, Clone, Default)]
pub(crate) struct Destinations {
    pub(crate) completion_queue: Option<String>,
    pub(crate) reply_queue: Option<String>,
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
    /// Counted; the batch is not complete.
    Added,
    /// Counted, and this member completed the batch (or, the batch being complete,
    /// changed its counts): publish this after COMMIT.
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
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

fn sql(
    backend: Backend,
    mysql: &'static str,
    pg: &'static str,
    sqlite: &'static str,
) -> &'static str {
    match backend {
        Backend::MySql => mysql,
        Backend::Postgres => pg,
        Backend::Sqlite => sqlite,
    }
}

/// Counts `member` with its final answer, in `tx` (steps 2 and 3 of the protocol).
pub(crate) async fn count(
    tx: &mut Tx,
    member: Member<'_>,
    answer: Final,
    to: &Destinations,
) -> Result<Count, BatchError> {
    let Some(delta) = move_member(tx, member, answer).await? else {
        return Ok(Count::Unchanged);
    };
    let batch = add(tx, member, delta).await?;
    if let Some(size) = member.tag.size {
        if size != batch.size {
            return Err(BatchError::Invalid(format!(
                "x-txq-batch-size is {size}, but batch `{}` was opened with size {}",
                batch.batch_id, batch.size
            )));
        }
    }
    if batch.done() > batch.size {
        return Err(BatchError::Invalid(format!(
            "batch `{}` has {} members already: this one is one too many",
            batch.batch_id, batch.size
        )));
    }
    if batch.done() < batch.size {
        return Ok(Count::Added);
    }
    let completion = complete(tx, batch, to).await?;
    Ok(Count::Completed(completion))
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

/// Adds `delta` to the batch's counts, opening it when the member carries a size;
/// the row as it now stands (locked until COMMIT).
async fn add(
    tx: &mut Tx,
    member: Member<'_>,
    [ok, rejected, failed]: [i64; 3],
) -> Result<BatchStatus, BatchError> {
    let id = member.tag.id.as_str();
    // A direct reply-to pseudo-queue belongs to one connection: a completion
    // published later, maybe by another worker, could never reach it.
    let reply_to = member
        .reply_to
        .filter(|r| !r.starts_with("amq.rabbitmq.reply-to"));
    let now = super::now_ms();
    let row: Option<Row> = match (tx.backend(), member.tag.size) {
        (Backend::MySql, size) => {
            let changed = with_conn!(tx, c => {
                match size {
                    Some(size) => sqlx::query(
                        "INSERT INTO txq_batches
                           (batch_id, size, ok, rejected, failed, revision, reply_to, opened_at_ms)
                         VALUES (?, ?, ?, ?, ?, 0, ?, ?)
                         ON DUPLICATE KEY UPDATE ok = ok + VALUES(ok),
                           rejected = rejected + VALUES(rejected), failed = failed + VALUES(failed)",
                    )
                    .bind(id).bind(size).bind(ok).bind(rejected).bind(failed).bind(reply_to).bind(now)
                    .execute(c).await?.rows_affected(),
                    None => sqlx::query(
                        "UPDATE txq_batches SET ok = ok + ?, rejected = rejected + ?,
                           failed = failed + ? WHERE batch_id = ?",
                    )
                    .bind(ok).bind(rejected).bind(failed).bind(id)
                    .execute(c).await?.rows_affected(),
                }
            });
            if changed == 0 {
                None
            } else {
                with_conn!(tx, c => {
                    sqlx::query_as(
                        "SELECT CONVERT(batch_id USING utf8mb4), size, ok, rejected, failed,
                           revision, opened_at_ms, completed_at_ms, reply_to
                         FROM txq_batches WHERE batch_id = ?",
                    )
                    .bind(id).fetch_optional(c).await?
                })
            }
        }
        (backend, Some(size)) => {
            let q = if backend == Backend::Postgres {
                "INSERT INTO txq_batches
                   (batch_id, size, ok, rejected, failed, revision, reply_to, opened_at_ms)
                 VALUES ($1, $2, $3, $4, $5, 0, $6, $7)
                 ON CONFLICT (batch_id) DO UPDATE SET ok = txq_batches.ok + EXCLUDED.ok,
                   rejected = txq_batches.rejected + EXCLUDED.rejected,
                   failed = txq_batches.failed + EXCLUDED.failed
                 RETURNING batch_id, size, ok, rejected, failed, revision, opened_at_ms,
                   completed_at_ms, reply_to"
            } else {
                "INSERT INTO txq_batches
                   (batch_id, size, ok, rejected, failed, revision, reply_to, opened_at_ms)
                 VALUES (?, ?, ?, ?, ?, 0, ?, ?)
                 ON CONFLICT (batch_id) DO UPDATE SET ok = txq_batches.ok + excluded.ok,
                   rejected = txq_batches.rejected + excluded.rejected,
                   failed = txq_batches.failed + excluded.failed
                 RETURNING batch_id, size, ok, rejected, failed, revision, opened_at_ms,
                   completed_at_ms, reply_to"
            };
            with_conn!(tx, c => {
                sqlx::query_as(q)
                    .bind(id).bind(size).bind(ok).bind(rejected).bind(failed).bind(reply_to).bind(now)
                    .fetch_optional(c).await?
            })
        }
        (backend, None) => {
            let q = if backend == Backend::Postgres {
                "UPDATE txq_batches SET ok = ok + $1, rejected = rejected + $2, failed = failed + $3
                 WHERE batch_id = $4
                 RETURNING batch_id, size, ok, rejected, failed, revision, opened_at_ms,
                   completed_at_ms, reply_to"
            } else {
                "UPDATE txq_batches SET ok = ok + ?, rejected = rejected + ?, failed = failed + ?
                 WHERE batch_id = ?
                 RETURNING batch_id, size, ok, rejected, failed, revision, opened_at_ms,
                   completed_at_ms, reply_to"
            };
            with_conn!(tx, c => {
                sqlx::query_as(q)
                    .bind(ok).bind(rejected).bind(failed).bind(id)
                    .fetch_optional(c).await?
            })
        }
    };
    row.map(from_row).ok_or_else(|| {
        BatchError::Invalid(format!(
            "batch `{id}` is not open, and the request carries no x-txq-batch-size to open it"
        ))
    })
}

/// Marks the batch complete with its next revision and writes the completion to
/// the outbox, due now (the worker publishes it after COMMIT).
async fn complete(
    tx: &mut Tx,
    mut batch: BatchStatus,
    to: &Destinations,
) -> Result<Completion, sqlx::Error> {
    batch.revision += 1;
    batch.completed_at_ms = Some(super::now_ms());
    let destination = to
        .completion_queue
        .clone()
        .or_else(|| batch.reply_to.clone())
        .or_else(|| to.reply_queue.clone());
    let body = batch.to_json().to_string().into_bytes();
    let (mark, outbox) = match tx.backend() {
        Backend::Postgres => (
            "UPDATE txq_batches SET revision = $1, completed_at_ms = $2 WHERE batch_id = $3",
            "INSERT INTO txq_batch_completions (batch_id, revision, destination, body, due_at_ms)
             VALUES ($1, $2, $3, $4, $5)",
        ),
        _ => (
            "UPDATE txq_batches SET revision = ?, completed_at_ms = ? WHERE batch_id = ?",
            "INSERT INTO txq_batch_completions (batch_id, revision, destination, body, due_at_ms)
             VALUES (?, ?, ?, ?, ?)",
        ),
    };
    with_conn!(tx, c => {
        sqlx::query(mark).bind(batch.revision).bind(batch.completed_at_ms).bind(&batch.batch_id)
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
/// failure), committed before the answer is published.
pub(crate) async fn count_alone(
    db: &Db,
    member: Member<'_>,
    answer: Final,
    to: &Destinations,
) -> Result<Count, BatchError> {
    let mut tx = db.begin(None).await?;
    let counted = count(&mut tx, member, answer, to).await?;
    tx.commit().await?;
    Ok(counted)
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
    let now = super::now_ms();
    let claimed = with_conn!(tx, c => {
        sqlx::query(q).bind(now).bind(batch_id).bind(revision).execute(&mut *c).await?
            .rows_affected()
    });
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

/// A batch as it stands; `None`: no member of it has been counted.
pub async fn status(db: &Db, batch_id: &str) -> Result<Option<BatchStatus>, sqlx::Error> {
    let q = sql(
        db.backend(),
        "SELECT CONVERT(batch_id USING utf8mb4), size, ok, rejected, failed, revision,
           opened_at_ms, completed_at_ms, reply_to FROM txq_batches WHERE batch_id = ?",
        "SELECT batch_id, size, ok, rejected, failed, revision,
           opened_at_ms, completed_at_ms, reply_to FROM txq_batches WHERE batch_id = $1",
        "SELECT batch_id, size, ok, rejected, failed, revision,
           opened_at_ms, completed_at_ms, reply_to FROM txq_batches WHERE batch_id = ?",
    );
    let row: Option<Row> = crate::on_pool!(db, p => {
        sqlx::query_as(q).bind(batch_id).fetch_optional(p).await?
    });
    Ok(row.map(from_row))
}

/// Batches, newest first: the open ones only with `open_only`; at most `limit`.
pub async fn list(db: &Db, open_only: bool, limit: i64) -> Result<Vec<BatchStatus>, sqlx::Error> {
    let q = match (db.backend(), open_only) {
        (Backend::MySql, true) => {
            "SELECT CONVERT(batch_id USING utf8mb4), size, ok, rejected, failed, revision,
               opened_at_ms, completed_at_ms, reply_to FROM txq_batches WHERE revision = 0
             ORDER BY opened_at_ms DESC LIMIT ?"
        }
        (Backend::MySql, false) => {
            "SELECT CONVERT(batch_id USING utf8mb4), size, ok, rejected, failed, revision,
               opened_at_ms, completed_at_ms, reply_to FROM txq_batches
             ORDER BY opened_at_ms DESC LIMIT ?"
        }
        (Backend::Postgres, true) => {
            "SELECT batch_id, size, ok, rejected, failed, revision, opened_at_ms,
               completed_at_ms, reply_to FROM txq_batches WHERE revision = 0
             ORDER BY opened_at_ms DESC LIMIT $1"
        }
        (Backend::Postgres, false) => {
            "SELECT batch_id, size, ok, rejected, failed, revision, opened_at_ms,
               completed_at_ms, reply_to FROM txq_batches ORDER BY opened_at_ms DESC LIMIT $1"
        }
        (Backend::Sqlite, true) => {
            "SELECT batch_id, size, ok, rejected, failed, revision, opened_at_ms,
               completed_at_ms, reply_to FROM txq_batches WHERE revision = 0
             ORDER BY opened_at_ms DESC LIMIT ?"
        }
        (Backend::Sqlite, false) => {
            "SELECT batch_id, size, ok, rejected, failed, revision, opened_at_ms,
               completed_at_ms, reply_to FROM txq_batches ORDER BY opened_at_ms DESC LIMIT ?"
        }
    };
    let rows: Vec<Row> = crate::on_pool!(db, p => {
        sqlx::query_as(q).bind(limit).fetch_all(p).await?
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
        count_alone(db, member, answer, &Destinations::default()).await
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
