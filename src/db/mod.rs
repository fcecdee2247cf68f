//! The database side: one sqlx pool per backend, chosen by the URL's scheme at run
//! time, and the per-job transaction handed to handlers.
//!
//! [`Tx`] carries out ARCHITECTURE.md's "one job = one connection = one
//! transaction".

/// Runs the same code on whichever pool a [`Db`] holds (each arm compiled per
/// backend, like [`with_conn!`](crate::with_conn)).
#[doc(hidden)]
#[macro_export]
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::Db::MySql($pool) => $body,
            $crate::Db::Postgres($pool) => $body,
            $crate::Db::Sqlite($pool) => $body,
        }
    };
}

pub mod batch;
mod dialect;
pub mod fleet;
pub mod inbox;
mod migrate;
mod tx;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::AssertSqlSafe;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use dialect::TransientReason;
pub use migrate::migrate;
pub use tx::{Conn, Tx};

/// Milliseconds since the Unix epoch, as stored in txq's tables.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Which database a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// MySQL or MariaDB (`mysql://`, `mariadb://`).
    MySql,
    /// PostgreSQL (`postgres://`, `postgresql://`).
    Postgres,
    /// SQLite, the embedded default (`sqlite:`).
    Sqlite,
}

impl Backend {
    /// The backend a URL's scheme names.
    pub fn from_url(url: &str) -> Result<Self, DbError> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
        match scheme {
            "mysql" | "mariadb" => Ok(Self::MySql),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "sqlite" => Ok(Self::Sqlite),
            _ => Err(DbError::UnknownScheme(scheme.to_owned())),
        }
    }

    /// A short name for logs: `mysql`, `postgres`, `sqlite`.
    pub fn name(self) -> &'static str {
        match self {
            Self::MySql => "mysql",
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// Transaction isolation level of a job type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// READ UNCOMMITTED
    ReadUncommitted,
    /// READ COMMITTED
    ReadCommitted,
    /// REPEATABLE READ
    RepeatableRead,
    /// SERIALIZABLE
    Serializable,
}

/// The dialect of a job's `BEGIN` on one database, known once the server was asked
/// ([`Db::job_begins`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct JobBegins {
    backend: Backend,
    mariadb: bool,
    /// The timeout every pooled session carries already, if any.
    session_timeout: Option<Duration>,
}

impl JobBegins {
    /// The statement that begins a job's transaction at `isolation`, with `timeout`
    /// pushed into the database unless the session carries it already.
    pub(crate) fn statement(&self, isolation: Option<Isolation>, timeout: Duration) -> Arc<str> {
        let on_session = self.session_timeout == Some(timeout);
        dialect::job_begin_statement(self.backend, self.mariadb, isolation, timeout, on_session)
            .into()
    }
}

/// Where a worker's job transactions come from.
#[derive(Debug, Clone)]
pub(crate) enum JobPool {
    /// The worker's pool: each transaction opens with its job type's statement
    /// ([`JobBegins::statement`]).
    Shared(Db),
    /// MySQL/MariaDB sessions with autocommit off, used for job transactions
    /// only: a transaction opens with its first statement, which spares the
    /// `BEGIN` round trip (BENCHMARKS.md, round 5). Every transaction ends in
    /// COMMIT or ROLLBACK before its connection goes back to the pool; one that
    /// did not end closes its connection, which rolls it back ([`Tx`]). Anything
    /// else run here would open a transaction nobody ends, hence a pool of its own.
    Implicit(MySqlPool),
    /// SQLite: a job's transaction holds the database's one write lock from its
    /// `BEGIN IMMEDIATE` to its end, so jobs take turns here, in arrival order,
    /// before they begin. Without this they would take turns in SQLite's busy
    /// handler, which retries with sleeps of 1 ms growing to 100 ms: the lock
    /// sits free while every waiter sleeps, and each wake-up costs a retry
    /// (BENCHMARKS.md, round 6). Only job transactions pass the gate; the busy
    /// timeout still orders them against txq's own short writes and other
    /// processes.
    Gated(Db, Arc<tokio::sync::Semaphore>),
}

impl JobPool {
    /// The pool for a worker that connected to `url` itself: on MySQL/MariaDB a
    /// second pool with autocommit off, made like `db`'s; elsewhere `db`'s.
    pub(crate) async fn for_worker(
        db: &Db,
        url: &str,
        options: &PoolOptions,
    ) -> Result<Self, DbError> {
        Ok(match db {
            Db::MySql(_) => Self::Implicit(mysql_pool(url, options, true).await?),
            _ => Self::shared(db.clone()),
        })
    }

    /// Jobs on `db` itself (a pool handed in, or a worker's own pool where no
    /// second one is made): each begins with its statement; on SQLite, after its
    /// turn at the gate.
    pub(crate) fn shared(db: Db) -> Self {
        match db {
            Db::Sqlite(_) => Self::Gated(db, Arc::new(tokio::sync::Semaphore::new(1))),
            _ => Self::Shared(db),
        }
    }

    /// Begins a job's transaction: `statement` ([`JobBegins::statement`]) on the
    /// shared pool; on the implicit pool nothing when it is a bare `BEGIN`, or
    /// else the statement (session limits of its own, an isolation level), whose
    /// `BEGIN` an autocommit-off session takes as well.
    pub(crate) async fn begin(&self, statement: &Arc<str>) -> Result<Tx, sqlx::Error> {
        match self {
            Self::Shared(db) => db.begin_job(statement).await,
            Self::Gated(db, gate) => {
                // The gate is never closed, so this cannot fail; if it did, the
                // busy handler would still order the job.
                let turn = gate.clone().acquire_owned().await.ok();
                Ok(db.begin_job(statement).await?.holding(turn))
            }
            Self::Implicit(pool) => {
                let mut conn = pool.acquire().await?;
                if &**statement != "BEGIN" {
                    use sqlx::Executor as _;
                    if let Err(e) = conn.execute(AssertSqlSafe(statement.clone())).await {
                        // How far it got is unknown: the connection goes, not back.
                        conn.close_on_drop();
                        return Err(e);
                    }
                }
                Ok(Tx::implicit(conn))
            }
        }
    }
}

/// Errors from setting up the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The URL names no backend txq knows.
    #[error("unknown database URL scheme `{0}` (use mysql:, mariadb:, postgres: or sqlite:)")]
    UnknownScheme(String),
    /// sqlx refused the URL or could not connect.
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// The server did not answer a connection in time.
    #[error("database: no answer within {0:?}")]
    ConnectTimeout(Duration),
}

/// Opens one connection at once and closes it: a server that refuses (connection
/// refused, authentication, an unknown database) says so now, instead of a pool
/// retrying in silence until its acquire timeout.
async fn probe<C>(options: &C, limit: Duration) -> Result<(), DbError>
where
    C: sqlx::ConnectOptions,
    C::Connection: Sized,
{
    use sqlx::Connection as _;
    match tokio::time::timeout(limit, options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(DbError::Sqlx(e)),
        Err(_) => Err(DbError::ConnectTimeout(limit)),
    }
}

/// A MySQL/MariaDB pool. Every session gets `options.session_timeout`; with
/// `autocommit_off`, every session also runs with autocommit off, for
/// [`JobPool::Implicit`].
async fn mysql_pool(
    url: &str,
    options: &PoolOptions,
    autocommit_off: bool,
) -> Result<MySqlPool, DbError> {
    // sqlx only knows the `mysql` scheme.
    let url = url
        .strip_prefix("mariadb")
        .map_or_else(|| url.to_owned(), |rest| format!("mysql{rest}"));
    let connect = MySqlConnectOptions::from_str(&url)?;
    let session_timeout = options.session_timeout;
    let pool = MySqlPoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        // A ping per acquire is a round trip per job; a dead connection fails
        // the job's first statement instead, which is retried.
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                use sqlx::Executor as _;
                if let Some(timeout) = session_timeout {
                    // Each server knows one of the two statement limits.
                    let mariadb = dialect::mysql_session_timeouts(true, timeout);
                    if conn.execute(AssertSqlSafe(mariadb)).await.is_err() {
                        let mysql = dialect::mysql_session_timeouts(false, timeout);
                        conn.execute(AssertSqlSafe(mysql)).await?;
                    }
                }
                if autocommit_off {
                    conn.execute("SET SESSION autocommit = 0").await?;
                }
                Ok(())
            })
        });
    probe(&connect, options.acquire_timeout).await?;
    Ok(pool.connect_with(connect).await?)
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Maximum connections.
    pub max_connections: u32,
    /// How long `begin` waits for a free connection.
    pub acquire_timeout: Duration,
    /// SQLite only: how long a writer waits for the database lock.
    pub sqlite_busy_timeout: Duration,
    /// Statement and lock-wait limit set on every new MySQL/MariaDB/PostgreSQL
    /// session. Job types whose timeout equals it begin with no `SET` of their own;
    /// `None` leaves the server's defaults (and every job sets its own).
    pub session_timeout: Option<Duration>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(30),
            sqlite_busy_timeout: Duration::from_secs(30),
            session_timeout: None,
        }
    }
}

/// A pool of connections to one database. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Db {
    /// MySQL or MariaDB.
    MySql(MySqlPool),
    /// PostgreSQL.
    Postgres(PgPool),
    /// SQLite.
    Sqlite(SqlitePool),
}

impl Db {
    /// Connects to `url`; the scheme picks the backend. SQLite databases are created
    /// when missing and run in WAL mode with a busy timeout, so concurrent jobs queue
    /// for the write lock instead of failing.
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, DbError> {
        let backend = Backend::from_url(url)?;
        let db = match backend {
            Backend::MySql => Self::MySql(mysql_pool(url, options, false).await?),
            Backend::Postgres => {
                let mut connect = PgConnectOptions::from_str(url)?;
                if let Some(timeout) = options.session_timeout {
                    // Sent in the startup packet: no round trip at all.
                    let ms = dialect::millis(timeout).to_string();
                    connect = connect.options([
                        ("statement_timeout", ms.as_str()),
                        ("lock_timeout", ms.as_str()),
                    ]);
                }
                probe(&connect, options.acquire_timeout).await?;
                let pool = PgPoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(options.acquire_timeout)
                    .test_before_acquire(false)
                    .connect_with(connect)
                    .await?;
                Self::Postgres(pool)
            }
            Backend::Sqlite => {
                let connect = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // NORMAL is durable in WAL mode up to the last checkpoint-free
                    // commit on power loss, the usual trade-off for WAL.
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(options.sqlite_busy_timeout)
                    .foreign_keys(true);
                let pool = SqlitePoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect)
                    .await?;
                Self::Sqlite(pool)
            }
        };
        Ok(db)
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            Self::MySql(_) => Backend::MySql,
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Takes a connection of its own from the pool and begins a transaction on it.
    pub async fn begin(&self, isolation: Option<Isolation>) -> Result<Tx, sqlx::Error> {
        let statement = dialect::begin_statement(self.backend(), isolation);
        Ok(match self {
            Self::MySql(pool) => Tx::from(match statement {
                Some(s) => pool.begin_with(s).await?,
                None => pool.begin().await?,
            }),
            Self::Postgres(pool) => Tx::from(match statement {
                Some(s) => pool.begin_with(s).await?,
                None => pool.begin().await?,
            }),
            Self::Sqlite(pool) => Tx::from(match statement {
                Some(s) => pool.begin_with(s).await?,
                None => pool.begin().await?,
            }),
        })
    }

    /// Begins a job's transaction with a statement from
    /// [`dialect::job_begin_statement`], made once per job type.
    pub(crate) async fn begin_job(&self, statement: &Arc<str>) -> Result<Tx, sqlx::Error> {
        let statement = AssertSqlSafe(statement.clone());
        Ok(match self {
            Self::MySql(pool) => Tx::from(pool.begin_with(statement).await?),
            Self::Postgres(pool) => Tx::from(pool.begin_with(statement).await?),
            Self::Sqlite(pool) => Tx::from(pool.begin_with(statement).await?),
        })
    }

    /// Whether a MySQL-protocol server is MariaDB (their statement timeouts differ).
    pub async fn is_mariadb(&self) -> Result<bool, sqlx::Error> {
        match self {
            Self::MySql(pool) => {
                let version: String = sqlx::query_scalar("SELECT VERSION()")
                    .fetch_one(pool)
                    .await?;
                Ok(version.contains("MariaDB"))
            }
            _ => Ok(false),
        }
    }

    /// How this database's job transactions begin, asked of the server once: which
    /// MySQL-protocol server it is, and whether its sessions already carry the one
    /// timeout every job type uses (`timeouts`), so that each `BEGIN` may skip its
    /// own `SET`.
    pub(crate) async fn job_begins(
        &self,
        timeouts: &std::collections::HashSet<Duration>,
    ) -> Result<JobBegins, sqlx::Error> {
        let mariadb = self.is_mariadb().await?;
        // Per-type SET SESSION on MySQL would outlive the job, so sessions carry a
        // timeout only when every job type shares it.
        let session_timeout = match timeouts.iter().next() {
            Some(&t) if timeouts.len() == 1 && self.session_timeout_is(mariadb, t).await? => {
                Some(t)
            }
            _ => None,
        };
        Ok(JobBegins {
            backend: self.backend(),
            mariadb,
            session_timeout,
        })
    }

    /// Whether this pool's sessions already bound statements and lock waits to
    /// `timeout` ([`PoolOptions::session_timeout`]), read back from the server so
    /// that a pool built some other way is never trusted blindly. Every connection
    /// of a pool is set up alike, so one answers for all. SQLite has nothing to set.
    pub async fn session_timeout_is(
        &self,
        mariadb: bool,
        timeout: Duration,
    ) -> Result<bool, sqlx::Error> {
        let ms = i64::try_from(dialect::millis(timeout)).unwrap_or(i64::MAX);
        match self {
            Self::MySql(pool) => {
                let q = if mariadb {
                    "SELECT CAST(@@SESSION.innodb_lock_wait_timeout AS SIGNED), \
                     CAST(ROUND(@@SESSION.max_statement_time * 1000) AS SIGNED)"
                } else {
                    "SELECT CAST(@@SESSION.innodb_lock_wait_timeout AS SIGNED), \
                     CAST(@@SESSION.max_execution_time AS SIGNED)"
                };
                let (lock, statement): (i64, i64) = sqlx::query_as(q).fetch_one(pool).await?;
                let lock_secs =
                    i64::try_from(dialect::mysql_lock_wait_secs(timeout)).unwrap_or(i64::MAX);
                Ok(lock == lock_secs && statement == ms)
            }
            Self::Postgres(pool) => {
                let (statement, lock): (bool, bool) = sqlx::query_as(
                    "SELECT current_setting('statement_timeout')::interval \
                       = make_interval(secs => $1::float8 / 1000), \
                     current_setting('lock_timeout')::interval \
                       = make_interval(secs => $1::float8 / 1000)",
                )
                .bind(ms)
                .fetch_one(pool)
                .await?;
                Ok(statement && lock)
            }
            Self::Sqlite(_) => Ok(true),
        }
    }

    /// Runs statements outside any job, for schema set-up. Each string is one
    /// statement, run in order on one connection.
    pub async fn execute_script(&self, statements: &[&'static str]) -> Result<(), sqlx::Error> {
        use sqlx::Executor as _;
        match self {
            Self::MySql(pool) => {
                let mut conn = pool.acquire().await?;
                for s in statements {
                    conn.execute(*s).await?;
                }
            }
            Self::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                for s in statements {
                    conn.execute(*s).await?;
                }
            }
            Self::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                for s in statements {
                    conn.execute(*s).await?;
                }
            }
        }
        Ok(())
    }

    /// Runs a SQL script (several statements, comments allowed) on one connection,
    /// as the database's own client would: sqlx's `raw_sql`, unprepared.
    pub async fn execute_sql_file(&self, text: &str) -> Result<(), sqlx::Error> {
        let script = AssertSqlSafe(text.to_owned());
        on_pool!(self, pool => {
            let mut conn = pool.acquire().await?;
            sqlx::raw_sql(script).execute(&mut *conn).await?;
        });
        Ok(())
    }

    /// The pool's current size and idle connections, for start-up checks and metrics.
    pub fn pool_state(&self) -> (u32, usize) {
        match self {
            Self::MySql(p) => (p.size(), p.num_idle()),
            Self::Postgres(p) => (p.size(), p.num_idle()),
            Self::Sqlite(p) => (p.size(), p.num_idle()),
        }
    }

    /// A pool of one connection to the same database, for health checks: made on
    /// first use, so building it costs nothing, and never competing with jobs.
    pub fn probe(&self) -> Db {
        fn options<DB: sqlx::Database>(p: &sqlx::Pool<DB>) -> sqlx::pool::PoolOptions<DB> {
            sqlx::pool::PoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .acquire_timeout(p.options().get_acquire_timeout())
        }
        match self {
            Self::MySql(p) => {
                Self::MySql(options(p).connect_lazy_with((*p.connect_options()).clone()))
            }
            Self::Postgres(p) => {
                Self::Postgres(options(p).connect_lazy_with((*p.connect_options()).clone()))
            }
            Self::Sqlite(p) => {
                Self::Sqlite(options(p).connect_lazy_with((*p.connect_options()).clone()))
            }
        }
    }

    /// One round trip on a pooled connection: does the database answer?
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        crate::on_pool!(self, p => {
            sqlx::query("SELECT 1").execute(p).await?;
        });
        Ok(())
    }

    /// The configured maximum number of connections.
    pub fn max_connections(&self) -> u32 {
        match self {
            Self::MySql(p) => p.options().get_max_connections(),
            Self::Postgres(p) => p.options().get_max_connections(),
            Self::Sqlite(p) => p.options().get_max_connections(),
        }
    }

    /// Closes every connection, waiting for those in use to come back.
    pub async fn close(&self) {
        match self {
            Self::MySql(p) => p.close().await,
            Self::Postgres(p) => p.close().await,
            Self::Sqlite(p) => p.close().await,
        }
    }

    /// Why another attempt at what failed with `error` may succeed; `None`: it
    /// would fail the same way.
    pub fn transient_reason(&self, error: &sqlx::Error) -> Option<TransientReason> {
        dialect::classify(self.backend(), error)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{Db, PoolOptions};

    /// An embedded SQLite database in a file of its own, with txq's tables; the
    /// files go when it is dropped.
    pub(crate) struct TempDb {
        pub(crate) db: Db,
        path: std::path::PathBuf,
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = self.path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    pub(crate) async fn temp_db() -> TempDb {
        let t = empty_temp_db().await;
        super::migrate(&t.db).await.expect("migrate");
        t
    }

    pub(crate) async fn empty_temp_db() -> TempDb {
        let path = std::env::temp_dir().join(format!("txq-test-{}.db", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}", path.display());
        let db = Db::connect(&url, &PoolOptions::default())
            .await
            .expect("sqlite");
        TempDb { db, path }
    }
}
