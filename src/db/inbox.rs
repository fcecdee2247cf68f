//! The inbox: one row per processed `message_id`, written in the job's own
//! transaction, so that a request's effects and its "done" mark commit together
//! (ARCHITECTURE.md, "effects happen once"). `Inbox` is the only code that decides
//! when a row is claimed, recorded or read.

use super::dialect::sql;
use super::{Backend, Db, Tx};
use crate::with_conn;

/// The `status` of a stored reply: the inbox keeps answers that another delivery
/// must repeat, and only those (a failure is not stored: another delivery may
/// succeed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoredStatus {
    Ok,
    Rejected,
}

impl StoredStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
        }
    }
}

/// A finished request's stored reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredReply {
    pub(crate) status: StoredStatus,
    /// The reply body as published.
    pub(crate) body: Vec<u8>,
    /// The delivery attempt that produced it.
    pub(crate) attempts: u32,
}

/// How an attempt's transaction stands with the inbox, from [`Inbox::enter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) enum Entry {
    /// No row yet: [`Inbox::seal`] inserts one before COMMIT (or the job has no
    /// key and the inbox plays no part).
    Open,
    /// This transaction holds a pending row: [`Inbox::seal`] completes it.
    Claimed,
    /// Another delivery committed first: roll back and answer with [`Inbox::answer`].
    Taken,
}

/// The protocol for one job. A job without a `message_id`, or a worker with the
/// inbox off, gets an inbox with no key, whose steps do nothing.
///
/// 1. [`enter`](Self::enter), first in the attempt's transaction: a delivery the
///    broker flags `redelivered` claims its id (a `pending` row) before running
///    anything, so it waits on a racing delivery and sees that one's commit. A
///    first delivery claims nothing: recording last saves a statement on every job
///    (BENCHMARKS.md).
/// 2. [`seal`](Self::seal), the last statement before COMMIT: completes the claimed
///    row, or inserts one, doing nothing on conflict. A row that was there, or that
///    a racing delivery committed while the insert waited on its key, means `Taken`.
/// 3. `Taken`, or an attempt that failed (not by rejection): the job rolls back and
///    asks [`answer`](Self::answer); a stored answer is the answer (the handler may
///    have tripped over what the earlier run left). When that lookup itself fails
///    the attempt is transient: without the inbox's word a duplicate cannot be told
///    from a failure.
/// 4. A rejection is recorded after the job's rollback, in a transaction of its own
///    ([`record_rejection`](Self::record_rejection)), so a redelivery gets the same
///    answer. Failures are not recorded.
pub(crate) struct Inbox<'a> {
    db: &'a Db,
    key: Option<(&'a str, &'a str)>,
}

impl<'a> Inbox<'a> {
    /// The inbox of a job of `job_type` keyed by `message_id` (`None`: no key).
    pub(crate) fn new(db: &'a Db, message_id: Option<&'a str>, job_type: &'a str) -> Self {
        Self {
            db,
            key: message_id.map(|id| (id, job_type)),
        }
    }

    /// Step 1.
    pub(crate) async fn enter(&self, tx: &mut Tx, redelivered: bool) -> Result<Entry, sqlx::Error> {
        match self.key {
            Some((id, job_type)) if redelivered => Ok(if claim(tx, id, job_type).await? {
                Entry::Claimed
            } else {
                Entry::Taken
            }),
            _ => Ok(Entry::Open),
        }
    }

    /// Step 2: `body` is the `ok` reply. Returns `Taken` when another delivery's
    /// row stands.
    pub(crate) async fn seal(
        &self,
        tx: &mut Tx,
        entry: Entry,
        body: &[u8],
        attempts: u32,
    ) -> Result<Entry, sqlx::Error> {
        let Some((id, job_type)) = self.key else {
            return Ok(entry);
        };
        let ok = StoredStatus::Ok;
        match entry {
            Entry::Claimed => complete(tx, id, body, attempts)
                .await
                .map(|()| Entry::Claimed),
            Entry::Open if insert(tx, (id, job_type), ok, body, attempts).await? => Ok(Entry::Open),
            Entry::Open | Entry::Taken => Ok(Entry::Taken),
        }
    }

    /// Step 3: the answer an earlier delivery stored, if any. `None` also when the
    /// job has no key, or when a claimed row was rolled back or pruned meanwhile.
    pub(crate) async fn answer(&self) -> Result<Option<StoredReply>, sqlx::Error> {
        match self.key {
            Some((id, _)) => lookup(self.db, id).await,
            None => Ok(None),
        }
    }

    /// Step 4: records the `rejected` reply `body`, in a transaction of its own.
    /// `Taken`: a racing delivery's row stood first, and its answer is the answer.
    pub(crate) async fn record_rejection(
        &self,
        body: &[u8],
        attempts: u32,
    ) -> Result<Entry, sqlx::Error> {
        let Some((id, job_type)) = self.key else {
            return Ok(Entry::Open);
        };
        let mut tx = self.db.begin(None).await?;
        let key = (id, job_type);
        let recorded = insert(&mut tx, key, StoredStatus::Rejected, body, attempts).await?;
        tx.commit().await?;
        Ok(if recorded { Entry::Open } else { Entry::Taken })
    }
}

/// Inserts a `pending` row for `message_id`. `false`: another transaction already
/// committed one (after waiting for it, if it was in flight).
async fn claim(tx: &mut Tx, message_id: &str, job_type: &str) -> Result<bool, sqlx::Error> {
    let q = sql(
        tx.backend(),
        "INSERT IGNORE INTO txq_inbox (message_id, job_type, status, attempts, created_at_ms)
         VALUES (?, ?, 'pending', 0, ?)",
        "INSERT INTO txq_inbox (message_id, job_type, status, attempts, created_at_ms)
         VALUES ($1, $2, 'pending', 0, $3) ON CONFLICT (message_id) DO NOTHING",
        "INSERT INTO txq_inbox (message_id, job_type, status, attempts, created_at_ms)
         VALUES (?, ?, 'pending', 0, ?) ON CONFLICT (message_id) DO NOTHING",
    );
    let done = with_conn!(tx, c => {
        sqlx::query(q).bind(message_id).bind(job_type).bind(super::now_ms()).execute(c).await?.rows_affected()
    });
    Ok(done == 1)
}

/// Completes a claimed row with the reply.
async fn complete(
    tx: &mut Tx,
    message_id: &str,
    body: &[u8],
    attempts: u32,
) -> Result<(), sqlx::Error> {
    let q = sql(
        tx.backend(),
        "UPDATE txq_inbox SET status = ?, reply = ?, attempts = ? WHERE message_id = ?",
        "UPDATE txq_inbox SET status = $1, reply = $2, attempts = $3 WHERE message_id = $4",
        "UPDATE txq_inbox SET status = ?, reply = ?, attempts = ? WHERE message_id = ?",
    );
    with_conn!(tx, c => {
        sqlx::query(q)
            .bind(StoredStatus::Ok.as_str())
            .bind(body)
            .bind(i64::from(attempts))
            .bind(message_id)
            .execute(c)
            .await?;
    });
    Ok(())
}

/// Inserts a finished request's row, doing nothing on conflict. `false`: a row was
/// there already, or a racing transaction committed one while this insert waited
/// on the key.
async fn insert(
    tx: &mut Tx,
    (message_id, job_type): (&str, &str),
    status: StoredStatus,
    body: &[u8],
    attempts: u32,
) -> Result<bool, sqlx::Error> {
    let q = sql(
        tx.backend(),
        "INSERT IGNORE INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
         VALUES (?, ?, ?, ?, ?, ?)",
        "INSERT INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (message_id) DO NOTHING",
        "INSERT INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING",
    );
    let done = with_conn!(tx, c => {
        sqlx::query(q)
            .bind(message_id)
            .bind(job_type)
            .bind(status.as_str())
            .bind(body)
            .bind(i64::from(attempts))
            .bind(super::now_ms())
            .execute(c)
            .await?
            .rows_affected()
    });
    Ok(done == 1)
}

/// The stored reply of a finished request, if there is one.
async fn lookup(db: &Db, message_id: &str) -> Result<Option<StoredReply>, sqlx::Error> {
    let q = sql(
        db.backend(),
        "SELECT status, reply, attempts FROM txq_inbox WHERE message_id = ? AND status <> 'pending'",
        "SELECT status, reply, attempts FROM txq_inbox WHERE message_id = $1 AND status <> 'pending'",
        "SELECT status, reply, attempts FROM txq_inbox WHERE message_id = ? AND status <> 'pending'",
    );
    let row: Option<(String, Option<Vec<u8>>, i64)> = crate::on_pool!(db, p => {
        sqlx::query_as(q).bind(message_id).fetch_optional(p).await?
    });
    Ok(row.map(|(status, body, attempts)| StoredReply {
        // txq writes `ok` and `rejected` only (and `pending`, filtered out above).
        status: if status == "rejected" {
            StoredStatus::Rejected
        } else {
            StoredStatus::Ok
        },
        body: body.unwrap_or_default(),
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
    }))
}

/// One inbox row, as an operator looks it up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    /// The job type it ran as.
    pub job_type: String,
    /// `pending` (claimed by a redelivery, not finished), `ok` or `rejected`.
    pub status: String,
    /// Deliveries it took.
    pub attempts: i64,
    /// When the row was written, Unix milliseconds.
    pub created_at_ms: i64,
    /// The stored reply body (absent while pending).
    pub reply: Option<Vec<u8>>,
}

/// The inbox row of `message_id`, if any, whatever its status.
pub async fn find(db: &Db, message_id: &str) -> Result<Option<Record>, sqlx::Error> {
    let q = sql(
        db.backend(),
        "SELECT job_type, status, attempts, created_at_ms, reply FROM txq_inbox WHERE message_id = ?",
        "SELECT job_type, status, attempts, created_at_ms, reply FROM txq_inbox WHERE message_id = $1",
        "SELECT job_type, status, attempts, created_at_ms, reply FROM txq_inbox WHERE message_id = ?",
    );
    type Row = (String, String, i64, i64, Option<Vec<u8>>);
    let row: Option<Row> = crate::on_pool!(db, p => {
        sqlx::query_as(q).bind(message_id).fetch_optional(p).await?
    });
    Ok(row.map(
        |(job_type, status, attempts, created_at_ms, reply)| Record {
            job_type,
            status,
            attempts,
            created_at_ms,
            reply,
        },
    ))
}

/// Deletes rows created before `older_than_ms` (Unix milliseconds), in batches so no
/// single statement locks much; returns how many went.
pub async fn prune(db: &Db, older_than_ms: i64) -> Result<u64, sqlx::Error> {
    const BATCH: i64 = 5000;
    let q = sql(
        db.backend(),
        "DELETE FROM txq_inbox WHERE created_at_ms < ? LIMIT ?",
        "DELETE FROM txq_inbox WHERE message_id IN
           (SELECT message_id FROM txq_inbox WHERE created_at_ms < $1 LIMIT $2)",
        "DELETE FROM txq_inbox WHERE message_id IN
           (SELECT message_id FROM txq_inbox WHERE created_at_ms < ? LIMIT ?)",
    );
    let mut total = 0;
    loop {
        let n = crate::on_pool!(db, p => {
            let mut conn = p.acquire().await?;
            if db.backend() == Backend::MySql {
                // Pooled MySQL/MariaDB sessions carry a job's statement timeout;
                // a batch delete must not inherit it. The session then differs
                // from its pool-mates, so it is closed rather than returned.
                // Each server knows one of the two variables.
                conn.close_on_drop();
                for reset in [
                    "SET SESSION max_statement_time = DEFAULT",
                    "SET SESSION max_execution_time = DEFAULT",
                ] {
                    let _ = sqlx::query(reset).execute(&mut *conn).await;
                }
            }
            sqlx::query(q).bind(older_than_ms).bind(BATCH).execute(&mut *conn).await?.rows_affected()
        });
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Every branch of the protocol, on an embedded SQLite file: no services needed.
/// The racing-delivery branches (a key inserted while another transaction waits on
/// it) need a server's row locks; the integration tests cover those.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::temp_db;

    /// Runs one attempt's inbox steps and commits; what `seal` said.
    async fn commit_ok(inbox: &Inbox<'_>, db: &Db, redelivered: bool, body: &[u8]) -> Entry {
        let mut tx = db.begin(None).await.expect("begin");
        let entry = inbox.enter(&mut tx, redelivered).await.expect("enter");
        if entry == Entry::Taken {
            tx.rollback().await.expect("rollback");
            return entry;
        }
        let sealed = inbox.seal(&mut tx, entry, body, 1).await.expect("seal");
        if sealed == Entry::Taken {
            tx.rollback().await.expect("rollback");
        } else {
            tx.commit().await.expect("commit");
        }
        sealed
    }

    #[tokio::test]
    async fn a_first_delivery_records_last_and_its_answer_is_stored() {
        let t = temp_db().await;
        let inbox = Inbox::new(&t.db, Some("m1"), "noop");
        assert_eq!(inbox.answer().await.expect("lookup"), None);
        assert_eq!(
            commit_ok(&inbox, &t.db, false, b"{\"a\":1}").await,
            Entry::Open
        );
        let stored = inbox.answer().await.expect("lookup").expect("a row");
        assert_eq!(stored.status, StoredStatus::Ok);
        assert_eq!(stored.body, b"{\"a\":1}");
    }

    #[tokio::test]
    async fn a_second_first_delivery_is_taken_at_the_seal_and_keeps_the_first_answer() {
        let t = temp_db().await;
        let inbox = Inbox::new(&t.db, Some("m1"), "noop");
        assert_eq!(commit_ok(&inbox, &t.db, false, b"first").await, Entry::Open);
        assert_eq!(
            commit_ok(&inbox, &t.db, false, b"second").await,
            Entry::Taken
        );
        let stored = inbox.answer().await.expect("lookup").expect("a row");
        assert_eq!(stored.body, b"first");
    }

    #[tokio::test]
    async fn a_redelivery_claims_first_and_completes_its_row() {
        let t = temp_db().await;
        let inbox = Inbox::new(&t.db, Some("m1"), "noop");
        let mut tx = t.db.begin(None).await.expect("begin");
        assert_eq!(
            inbox.enter(&mut tx, true).await.expect("claim"),
            Entry::Claimed
        );
        let sealed = inbox.seal(&mut tx, Entry::Claimed, b"done", 2).await;
        assert_eq!(sealed.expect("complete"), Entry::Claimed);
        tx.commit().await.expect("commit");
        let stored = inbox.answer().await.expect("lookup").expect("a row");
        assert_eq!((stored.body.as_slice(), stored.attempts), (&b"done"[..], 2));
    }

    #[tokio::test]
    async fn a_redelivery_of_a_committed_id_is_taken_before_running_anything() {
        let t = temp_db().await;
        let inbox = Inbox::new(&t.db, Some("m1"), "noop");
        assert_eq!(commit_ok(&inbox, &t.db, false, b"first").await, Entry::Open);
        assert_eq!(commit_ok(&inbox, &t.db, true, b"again").await, Entry::Taken);
    }

    #[tokio::test]
    async fn a_claim_rolled_back_leaves_no_answer_and_no_row() {
        let t = temp_db().await;
        let inbox = Inbox::new(&t.db, Some("m1"), "noop");
        let mut tx = t.db.begin(None).await.expect("begin");
        assert_eq!(
            inbox.enter(&mut tx, true).await.expect("claim"),
            Entry::Claimed
        );
        tx.rollback().await.expect("rollback");
        assert_eq!(inbox.answer().await.expect("lookup"), None);
        assert_eq!(
            commit_ok(&inbox, &t.db, true, b"later").await,
            Entry::Claimed
        );
    }

    #[tokio::test]
    async fn a_pending_row_is_no_answer() {
        let t = temp_db().await;
        let inbox = Inbox::new(&t.db, Some("m1"), "noop");
        let mut tx = t.db.begin(None).await.expect("begin");
        assert_eq!(
            inbox.enter(&mut tx, true).await.expect("claim"),
            Entry::Claimed
        );
        tx.commit().await.expect("commit a bare claim");
        assert_eq!(inbox.answer().await.expect("lookup"), None);
    }

    #[tokio::test]
    async fn a_rejection_is_recorded_once_and_then_answers() {
        let t = temp_db().await;
        let inbox = Inbox::new(&t.db, Some("m1"), "noop");
        assert_eq!(
            inbox.record_rejection(b"no", 1).await.expect("record"),
            Entry::Open
        );
        assert_eq!(
            inbox
                .record_rejection(b"no again", 2)
                .await
                .expect("record"),
            Entry::Taken
        );
        let stored = inbox.answer().await.expect("lookup").expect("a row");
        assert_eq!(
            (stored.status, stored.body.as_slice()),
            (StoredStatus::Rejected, &b"no"[..])
        );
        // A later first delivery of the same id is answered by the rejection.
        assert_eq!(commit_ok(&inbox, &t.db, false, b"ok").await, Entry::Taken);
    }

    #[tokio::test]
    async fn without_a_key_the_inbox_writes_and_reads_nothing() {
        let t = temp_db().await;
        let inbox = Inbox::new(&t.db, None, "noop");
        assert_eq!(commit_ok(&inbox, &t.db, true, b"x").await, Entry::Open);
        assert_eq!(commit_ok(&inbox, &t.db, true, b"x").await, Entry::Open);
        assert_eq!(
            inbox.record_rejection(b"no", 1).await.expect("record"),
            Entry::Open
        );
        assert_eq!(inbox.answer().await.expect("lookup"), None);
        let rows: i64 = crate::on_pool!(&t.db, p => {
            sqlx::query_scalar("SELECT COUNT(*) FROM txq_inbox").fetch_one(p).await.expect("count")
        });
        assert_eq!(rows, 0);
    }

    #[tokio::test]
    async fn prune_removes_rows_before_the_cutoff_only() {
        let t = temp_db().await;
        let old = Inbox::new(&t.db, Some("old"), "noop");
        assert_eq!(commit_ok(&old, &t.db, false, b"x").await, Entry::Open);
        let cutoff = crate::db::now_ms() + 1;
        while crate::db::now_ms() <= cutoff {
            tokio::task::yield_now().await;
        }
        let new = Inbox::new(&t.db, Some("new"), "noop");
        assert_eq!(commit_ok(&new, &t.db, false, b"y").await, Entry::Open);
        assert_eq!(prune(&t.db, cutoff).await.expect("prune"), 1);
        assert_eq!(old.answer().await.expect("lookup"), None);
        assert!(new.answer().await.expect("lookup").is_some());
    }
}
