//! The inbox's SQL: one row per processed message_id, written in the job's own
//! transaction. The protocol — when a job claims, records or looks up its row — is
//! stated once, in ARCHITECTURE.md ("Effects happen once"), and carried out by
//! `worker/job.rs`.

use super::{Backend, Db, Tx};
use crate::with_conn;

/// A finished request's stored reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReply {
    /// `ok` or `rejected`.
    pub status: String,
    /// The reply body as published.
    pub body: Vec<u8>,
    /// Attempts the job took.
    pub attempts: u32,
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

/// Claims `message_id` for this transaction. `false`: another transaction already
/// committed it (after waiting for it, if it was in flight).
pub(crate) async fn claim(
    tx: &mut Tx,
    message_id: &str,
    job_type: &str,
) -> Result<bool, sqlx::Error> {
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

/// Completes a claimed row with the reply, inside the job's transaction.
pub(crate) async fn complete(
    tx: &mut Tx,
    message_id: &str,
    reply: &StoredReply,
) -> Result<(), sqlx::Error> {
    let q = sql(
        tx.backend(),
        "UPDATE txq_inbox SET status = ?, reply = ?, attempts = ? WHERE message_id = ?",
        "UPDATE txq_inbox SET status = $1, reply = $2, attempts = $3 WHERE message_id = $4",
        "UPDATE txq_inbox SET status = ?, reply = ?, attempts = ? WHERE message_id = ?",
    );
    with_conn!(tx, c => {
        sqlx::query(q)
            .bind(reply.status.as_str())
            .bind(reply.body.as_slice())
            .bind(i64::from(reply.attempts))
            .bind(message_id)
            .execute(c)
            .await?;
    });
    Ok(())
}

fn record_sql(backend: Backend) -> &'static str {
    sql(
        backend,
        "INSERT IGNORE INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
         VALUES (?, ?, ?, ?, ?, ?)",
        "INSERT INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (message_id) DO NOTHING",
        "INSERT INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING",
    )
}

/// Records a finished request inside the job's transaction, as its last statement
/// before COMMIT. `false`: a row was there already, or a racing transaction
/// committed one while this insert waited on the key: this transaction must roll
/// back and answer from the row.
pub(crate) async fn record_in(
    tx: &mut Tx,
    message_id: &str,
    job_type: &str,
    reply: &StoredReply,
) -> Result<bool, sqlx::Error> {
    let q = record_sql(tx.backend());
    let done = with_conn!(tx, c => {
        sqlx::query(q)
            .bind(message_id)
            .bind(job_type)
            .bind(reply.status.as_str())
            .bind(reply.body.as_slice())
            .bind(i64::from(reply.attempts))
            .bind(super::now_ms())
            .execute(c)
            .await?
            .rows_affected()
    });
    Ok(done == 1)
}

/// Records a finished request in a transaction of its own (a rejection, whose
/// job transaction was rolled back). `false`: a row was there already.
pub(crate) async fn record(
    db: &Db,
    message_id: &str,
    job_type: &str,
    reply: &StoredReply,
) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin(None).await?;
    let recorded = record_in(&mut tx, message_id, job_type, reply).await?;
    tx.commit().await?;
    Ok(recorded)
}

/// The stored reply of a finished request, if there is one.
pub async fn lookup(db: &Db, message_id: &str) -> Result<Option<StoredReply>, sqlx::Error> {
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
        status,
        body: body.unwrap_or_default(),
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
    }))
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
