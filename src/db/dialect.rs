//! What differs between the backends: how a transaction begins at an isolation level,
//! and which errors are worth another attempt.

use std::time::Duration;

use sqlx::error::DatabaseError;

use super::{Backend, Isolation};

/// Why an error is transient: another attempt in a fresh transaction may succeed.
/// The `reason` label of retry metrics. A database error with no reason is
/// permanent: trying again would fail the same way (a syntax error, a constraint…).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
    /// The job ran past its timeout (in the worker, or in the database: PostgreSQL
    /// 57014, MySQL 3024, MariaDB 1969).
    Timeout,
    /// The handler said so ([`JobError::Transient`](crate::JobError::Transient)).
    Handler,
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
            Self::Timeout => "timeout",
            Self::Handler => "handler",
        }
    }
}

/// The statement that opens a transaction at `isolation`; `None` means plain BEGIN.
pub(crate) fn begin_statement(
    backend: Backend,
    isolation: Option<Isolation>,
) -> Option<&'static str> {
    match backend {
        Backend::MySql => isolation.map(|level| match level {
            Isolation::ReadUncommitted => "SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED; BEGIN",
            Isolation::ReadCommitted => "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; BEGIN",
            Isolation::RepeatableRead => "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; BEGIN",
            Isolation::Serializable => "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; BEGIN",
        }),
        Backend::Postgres => isolation.map(|level| match level {
            Isolation::ReadUncommitted => "BEGIN ISOLATION LEVEL READ UNCOMMITTED",
            Isolation::ReadCommitted => "BEGIN ISOLATION LEVEL READ COMMITTED",
            Isolation::RepeatableRead => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            Isolation::Serializable => "BEGIN ISOLATION LEVEL SERIALIZABLE",
        }),
        // SQLite is always serializable. IMMEDIATE takes the write lock up front, so
        // concurrent jobs wait in the busy handler; a DEFERRED transaction that later
        // upgrades to a writer fails with BUSY at once instead of waiting.
        Backend::Sqlite => Some("BEGIN IMMEDIATE"),
    }
}

fn level_sql(level: Isolation) -> &'static str {
    match level {
        Isolation::ReadUncommitted => "READ UNCOMMITTED",
        Isolation::ReadCommitted => "READ COMMITTED",
        Isolation::RepeatableRead => "REPEATABLE READ",
        Isolation::Serializable => "SERIALIZABLE",
    }
}

/// `SET SESSION` of the MySQL/MariaDB variables that bound statements and lock waits
/// to `timeout`. The numbers come from the validated config, never from a request.
pub(crate) fn mysql_session_timeouts(mariadb: bool, timeout: Duration) -> String {
    // innodb_lock_wait_timeout takes whole seconds, at least 1.
    let lock_secs = mysql_lock_wait_secs(timeout);
    if mariadb {
        format!(
            "SET SESSION innodb_lock_wait_timeout = {lock_secs}, SESSION max_statement_time = {:.3}",
            timeout.as_secs_f64()
        )
    } else {
        // MySQL's limit applies to SELECTs only.
        format!(
            "SET SESSION innodb_lock_wait_timeout = {lock_secs}, SESSION max_execution_time = {}",
            millis(timeout)
        )
    }
}

pub(crate) fn mysql_lock_wait_secs(timeout: Duration) -> u64 {
    timeout.as_secs().max(1) + u64::from(timeout.subsec_nanos() > 0)
}

pub(crate) fn millis(timeout: Duration) -> u128 {
    timeout.as_millis().max(1)
}

/// The statement (one round trip) that opens a job's transaction at `isolation`.
/// Unless the pool's sessions already carry `timeout` (`on_session`, see
/// [`Db::session_timeout_is`](super::Db::session_timeout_is)), it also pushes
/// `timeout` into the database, so that a statement or lock wait running past it
/// fails there and the transaction's locks are released.
pub(crate) fn job_begin_statement(
    backend: Backend,
    mariadb: bool,
    isolation: Option<Isolation>,
    timeout: Duration,
    on_session: bool,
) -> String {
    match backend {
        Backend::MySql => {
            let mut sql = String::new();
            if !on_session {
                sql.push_str(&mysql_session_timeouts(mariadb, timeout));
                sql.push_str("; ");
            }
            if let Some(level) = isolation {
                sql.push_str("SET TRANSACTION ISOLATION LEVEL ");
                sql.push_str(level_sql(level));
                sql.push_str("; ");
            }
            sql.push_str("BEGIN");
            sql
        }
        Backend::Postgres => {
            let mut sql = String::from("BEGIN");
            if let Some(level) = isolation {
                sql.push_str(" ISOLATION LEVEL ");
                sql.push_str(level_sql(level));
            }
            if !on_session {
                let ms = millis(timeout);
                sql.push_str(&format!(
                    "; SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"
                ));
            }
            sql
        }
        // SQLite has no statement timeout; the worker's own timeout drops the
        // transaction, which rolls it back.
        Backend::Sqlite => "BEGIN IMMEDIATE".to_owned(),
    }
}

/// Sorts an error into transient (retry in a fresh transaction) or permanent.
pub(crate) fn classify(backend: Backend, error: &sqlx::Error) -> Option<TransientReason> {
    use TransientReason::*;
    match error {
        sqlx::Error::Database(db) => classify_database(backend, db.as_ref()),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Some(Connection),
        _ => None,
    }
}

fn classify_database(backend: Backend, db: &dyn DatabaseError) -> Option<TransientReason> {
    use TransientReason::*;
    match backend {
        Backend::MySql => {
            let number = db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|e| e.number());
            match number {
                Some(1213) => Some(Deadlock),
                Some(1205) => Some(LockTimeout),
                Some(1969 | 3024) => Some(Timeout),
                // Server shutting down / connection killed by KILL.
                Some(1053 | 1927 | 2006 | 2013) => Some(Connection),
                _ => None,
            }
        }
        Backend::Postgres => match db.code().as_deref() {
            Some("40001") => Some(SerializationFailure),
            Some("40P01") => Some(Deadlock),
            Some("55P03") => Some(LockTimeout),
            Some("57014") => Some(Timeout),
            // admin_shutdown, crash_shutdown, cannot_connect_now.
            Some("57P01" | "57P02" | "57P03") => Some(Connection),
            _ => None,
        },
        Backend::Sqlite => {
            let primary = db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
            match primary {
                // SQLITE_BUSY, SQLITE_LOCKED and their extended codes.
                Some(5 | 6) => Some(Busy),
                _ => None,
            }
        }
    }
}

/// The statement for `backend`, of one written three ways.
pub(crate) fn sql(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_begin_statements_carry_isolation_and_timeouts() {
        let t = Duration::from_millis(2500);
        assert_eq!(
            job_begin_statement(
                Backend::Postgres,
                false,
                Some(Isolation::Serializable),
                t,
                false
            ),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 2500; \
             SET LOCAL lock_timeout = 2500"
        );
        assert_eq!(
            job_begin_statement(Backend::MySql, true, None, t, false),
            "SET SESSION innodb_lock_wait_timeout = 3, SESSION max_statement_time = 2.500; BEGIN"
        );
        assert_eq!(
            job_begin_statement(
                Backend::MySql,
                false,
                Some(Isolation::ReadCommitted),
                t,
                false
            ),
            "SET SESSION innodb_lock_wait_timeout = 3, SESSION max_execution_time = 2500; \
             SET TRANSACTION ISOLATION LEVEL READ COMMITTED; BEGIN"
        );
        assert_eq!(
            job_begin_statement(Backend::Sqlite, false, None, t, false),
            "BEGIN IMMEDIATE"
        );
        // Sessions that already carry the timeout begin with no SET at all.
        assert_eq!(
            job_begin_statement(
                Backend::MySql,
                true,
                Some(Isolation::ReadCommitted),
                t,
                true
            ),
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; BEGIN"
        );
        assert_eq!(
            job_begin_statement(Backend::Postgres, false, None, t, true),
            "BEGIN"
        );
    }
}
