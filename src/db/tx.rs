//! The transaction a job's handler works in.

use sqlx::pool::PoolConnection;
use sqlx::{
    Executor as _, MySql, MySqlConnection, PgConnection, Postgres, Sqlite, SqliteConnection,
    Transaction,
};

use super::Backend;

/// A job's own transaction on its own pooled connection.
///
/// Handlers get `&mut Tx` and reach the connection through [`Tx::conn`] (or the
/// [`with_conn!`](crate::with_conn) macro). Holding only a borrow, they cannot commit,
/// roll back or keep it: the worker commits when the handler succeeds and rolls back
/// otherwise. Dropping a `Tx` rolls it back.
#[derive(Debug)]
pub struct Tx {
    // Declared first, so dropped first: the transaction ends (or its rollback is
    // queued) before the turn passes on.
    inner: Inner,
    /// Its turn at the write lock ([`JobPool::Gated`](super::JobPool)), given back
    /// when the transaction ends.
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
}

#[derive(Debug)]
enum Inner {
    MySql(Transaction<'static, MySql>),
    /// On a session with autocommit off ([`JobPool::Implicit`](super::JobPool)).
    MySqlImplicit(Implicit),
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

/// The connection of a [`Tx`], by backend: run sqlx queries against it.
#[derive(Debug)]
pub enum Conn<'a> {
    /// MySQL or MariaDB.
    MySql(&'a mut MySqlConnection),
    /// PostgreSQL.
    Postgres(&'a mut PgConnection),
    /// SQLite.
    Sqlite(&'a mut SqliteConnection),
}

impl Tx {
    /// Which backend the transaction runs on.
    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::MySql(_) | Inner::MySqlImplicit(_) => Backend::MySql,
            Inner::Postgres(_) => Backend::Postgres,
            Inner::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The connection, to run queries inside this transaction.
    pub fn conn(&mut self) -> Conn<'_> {
        match &mut self.inner {
            Inner::MySql(tx) => Conn::MySql(tx),
            Inner::MySqlImplicit(tx) => Conn::MySql(&mut tx.conn),
            Inner::Postgres(tx) => Conn::Postgres(tx),
            Inner::Sqlite(tx) => Conn::Sqlite(tx),
        }
    }

    /// Commits. Handlers never need this: they only get `&mut Tx`, and the worker
    /// commits for them. It is for transactions begun with [`Db::begin`](crate::Db::begin)
    /// outside a job.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self.inner {
            Inner::MySql(tx) => tx.commit().await,
            Inner::MySqlImplicit(tx) => tx.end("COMMIT").await,
            Inner::Postgres(tx) => tx.commit().await,
            Inner::Sqlite(tx) => tx.commit().await,
        }
    }

    /// Rolls back (dropping a `Tx` does too, lazily).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self.inner {
            Inner::MySql(tx) => tx.rollback().await,
            Inner::MySqlImplicit(tx) => tx.end("ROLLBACK").await,
            Inner::Postgres(tx) => tx.rollback().await,
            Inner::Sqlite(tx) => tx.rollback().await,
        }
    }
}

impl Tx {
    /// The transaction an autocommit-off session opens with its next statement.
    pub(super) fn implicit(conn: PoolConnection<MySql>) -> Self {
        Self {
            inner: Inner::MySqlImplicit(Implicit { conn, ended: false }),
            turn: None,
        }
    }

    /// This transaction, holding `turn` until it ends.
    pub(super) fn holding(mut self, turn: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        self.turn = turn;
        self
    }
}

/// A transaction on a MySQL/MariaDB session with autocommit off: it began
/// with its first statement and ends with COMMIT or ROLLBACK. Until it has
/// ended, its connection must not go back to the pool, where the next user
/// would run inside it; so one dropped before (a timeout, a panic, a failed
/// COMMIT) closes its connection instead, and the server rolls it back.
#[derive(Debug)]
struct Implicit {
    conn: PoolConnection<MySql>,
    ended: bool,
}

impl Implicit {
    async fn end(mut self, statement: &'static str) -> Result<(), sqlx::Error> {
        self.conn.execute(statement).await?;
        self.ended = true;
        Ok(())
    }
}

impl Drop for Implicit {
    fn drop(&mut self) {
        if !self.ended {
            self.conn.close_on_drop();
        }
    }
}

impl From<Transaction<'static, MySql>> for Tx {
    fn from(tx: Transaction<'static, MySql>) -> Self {
        Self {
            inner: Inner::MySql(tx),
            turn: None,
        }
    }
}

impl From<Transaction<'static, Postgres>> for Tx {
    fn from(tx: Transaction<'static, Postgres>) -> Self {
        Self {
            inner: Inner::Postgres(tx),
            turn: None,
        }
    }
}

impl From<Transaction<'static, Sqlite>> for Tx {
    fn from(tx: Transaction<'static, Sqlite>) -> Self {
        Self {
            inner: Inner::Sqlite(tx),
            turn: None,
        }
    }
}

/// Runs the same code on whichever connection a [`Tx`] holds. The body is compiled
/// once per backend, so sqlx's generic query API type-checks against each:
///
/// ```ignore
/// let n: i64 = txq::with_conn!(tx, conn => {
///     sqlx::query_scalar("SELECT COUNT(*) FROM accounts").fetch_one(conn).await?
/// });
/// ```
#[macro_export]
macro_rules! with_conn {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx.conn() {
            $crate::Conn::MySql($conn) => $body,
            $crate::Conn::Postgres($conn) => $body,
            $crate::Conn::Sqlite($conn) => $body,
        }
    };
}
