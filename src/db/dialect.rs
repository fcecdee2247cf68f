//! What differs between the backends: how a transaction begins at an isolation level,
//! and which errors are worth another attempt.

use sqlx::error::DatabaseError;

use super::{Backend, Isolation};

/// What to do about a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Another attempt in a fresh transaction may succeed: deadlock, serialization
    /// failure, lock wait timeout, SQLite busy/locked, a lost or unavailable connection.
    Transient(TransientReason),
    /// Trying again will fail the same way (a syntax error, a constraint violation…).
    Permanent,
}

/// Why an error is transient; the `reason` label of retry metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransientReason {
    /// MySQL 1213, PostgreSQL 40P01.
    Deadlock,
    /// PostgreSQL 40001.
    SerializationFailure,
    /// MySQL 1205, PostgreSQL 55P03.
    LockTimeout,
    /// SQLite BUSY or LOCKED.
    Busy,
    /// The connection broke, or none could be had in time.
    Connection,
}

impl TransientReason {
    /// Metric/log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deadlock => "deadlock",
            Self::SerializationFailure => "serialization_failure",
            Self::LockTimeout => "lock_timeout",
            Self::Busy => "busy",
            Self::Connection => "connection",
        }
    }
}

/// The statement that opens a transaction at `isolation`; `None` means plain BEGIN.
pub(crate) fn begin_statement(
    backend: Backend,
    isolation: Option<Isolation>,
) -> Option<&'static str> {
    use Isolation::*;
    match backend {
        // MySQL takes the level for the next transaction only, in the same round trip.
        Backend::MySql => isolation.map(|level| match level {
            ReadUncommitted => "SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED; BEGIN",
            ReadCommitted => "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; BEGIN",
            RepeatableRead => "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; BEGIN",
            Serializable => "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; BEGIN",
        }),
        Backend::Postgres => isolation.map(|level| match level {
            ReadUncommitted => "BEGIN ISOLATION LEVEL READ UNCOMMITTED",
            ReadCommitted => "BEGIN ISOLATION LEVEL READ COMMITTED",
            RepeatableRead => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            Serializable => "BEGIN ISOLATION LEVEL SERIALIZABLE",
        }),
        // SQLite is always serializable. IMMEDIATE takes the write lock up front, so
        // concurrent jobs wait in the busy handler; a DEFERRED transaction that later
        // upgrades to a writer fails with BUSY at once instead of waiting.
        Backend::Sqlite => Some("BEGIN IMMEDIATE"),
    }
}

/// Sorts an error into transient (retry in a fresh transaction) or permanent.
pub(crate) fn classify(backend: Backend, error: &sqlx::Error) -> ErrorClass {
    use ErrorClass::*;
    use TransientReason::*;
    match error {
        sqlx::Error::Database(db) => classify_database(backend, db.as_ref()),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Transient(Connection),
        _ => Permanent,
    }
}

fn classify_database(backend: Backend, db: &dyn DatabaseError) -> ErrorClass {
    use ErrorClass::*;
    use TransientReason::*;
    match backend {
        Backend::MySql => {
            let number = db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|e| e.number());
            match number {
                Some(1213) => Transient(Deadlock),
                Some(1205) => Transient(LockTimeout),
                // Server shutting down / connection killed by KILL.
                Some(1053 | 1927 | 2006 | 2013) => Transient(Connection),
                _ => Permanent,
            }
        }
        Backend::Postgres => match db.code().as_deref() {
            Some("40001") => Transient(SerializationFailure),
            Some("40P01") => Transient(Deadlock),
            Some("55P03") => Transient(LockTimeout),
            // admin_shutdown, crash_shutdown, cannot_connect_now.
            Some("57P01" | "57P02" | "57P03") => Transient(Connection),
            _ => Permanent,
        },
        Backend::Sqlite => {
            let primary = db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
            match primary {
                // SQLITE_BUSY, SQLITE_LOCKED and their extended codes.
                Some(5 | 6) => Transient(Busy),
                _ => Permanent,
            }
        }
    }
}
