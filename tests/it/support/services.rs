//! The services' URLs, a database of each test's own, and statements on it.

use std::time::Duration;

use txq::db::PoolOptions;
use txq::{Backend, Db};

use super::unique;

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

pub fn amqp_url() -> String {
    env_or("TXQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

pub fn mysql_url() -> String {
    env_or("TXQ_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
}

pub fn pg_url() -> String {
    env_or("TXQ_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/test")
}

pub(super) fn service_down(
    service: &str,
    var: &str,
    url: &str,
    error: impl std::fmt::Display,
) -> ! {
    panic!(
        "{service} is not reachable at {} ({error}). Start it with `bash ../shared/services.sh` \
         (or `docker compose up -d`), or point {var} at a running one.",
        txq::config::redact_url(url)
    )
}

/// A database of its own for one test: a fresh database on MariaDB/PostgreSQL, a
/// temporary file on SQLite. Dropped with the test, pass or fail.
pub struct TestDb {
    pub db: Db,
    pub url: String,
    cleanup: Option<Cleanup>,
}

enum Cleanup {
    Server { admin_url: String, name: String },
    File(std::path::PathBuf),
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        Self::with_pool(backend, 32).await
    }

    pub async fn with_pool(backend: Backend, max_connections: u32) -> TestDb {
        let name = unique("db").replace('-', "_");
        let (url, cleanup) = match backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir().join(format!("{name}.db"));
                (format!("sqlite://{}", path.display()), Cleanup::File(path))
            }
            Backend::MySql | Backend::Postgres => {
                let (admin_url, service, var) = match backend {
                    Backend::MySql => (mysql_url(), "MariaDB", "TXQ_TEST_MYSQL_URL"),
                    _ => (pg_url(), "PostgreSQL", "TXQ_TEST_PG_URL"),
                };
                let admin = Db::connect(&admin_url, &small_pool())
                    .await
                    .unwrap_or_else(|e| service_down(service, var, &admin_url, e));
                exec(&admin, &format!("CREATE DATABASE {name}")).await;
                admin.close().await;
                let mut url = url::Url::parse(&admin_url).expect("test database URL");
                url.set_path(&name);
                (url.to_string(), Cleanup::Server { admin_url, name })
            }
        };
        let options = PoolOptions {
            max_connections,
            ..PoolOptions::default()
        };
        let db = Db::connect(&url, &options)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test database {url}: {e}"));
        TestDb {
            db,
            url,
            cleanup: Some(cleanup),
        }
    }

    fn server(&self) -> (&str, &str) {
        let Some(Cleanup::Server { admin_url, name }) = &self.cleanup else {
            panic!("only server databases have sessions");
        };
        (admin_url, name)
    }

    /// A fresh pool for the test's own reads, after `kill_connections` also ended
    /// the idle connections of the one it had (pools do not test a connection
    /// before handing it out).
    pub async fn reconnect(&mut self) {
        let options = PoolOptions {
            max_connections: 4,
            ..small_pool()
        };
        self.db = Db::connect(&self.url, &options)
            .await
            .expect("reconnect to the test database");
    }

    /// Kills every server connection to this test's database (MariaDB `KILL`,
    /// PostgreSQL `pg_terminate_backend`); returns how many.
    pub async fn kill_connections(&self) -> usize {
        let (admin_url, name) = self.server();
        let admin = Db::connect(admin_url, &small_pool())
            .await
            .expect("admin connection");
        let killed = kill_sessions(&admin, name).await;
        admin.close().await;
        killed
    }

    /// The server sessions connected to this test's database now (the test's own
    /// pool included), seen from a connection of another database.
    pub async fn sessions(&self) -> Vec<i64> {
        let (admin_url, name) = self.server();
        let admin = Db::connect(admin_url, &small_pool())
            .await
            .expect("admin connection");
        let ids = session_ids(&admin, name).await.expect("session list");
        admin.close().await;
        ids
    }
}

/// The sessions on database `name`, but the asking one.
async fn session_ids(admin: &Db, name: &str) -> Result<Vec<i64>, txq::sqlx::Error> {
    match admin {
        Db::MySql(pool) => txq::sqlx::query_scalar(
            "SELECT id FROM information_schema.processlist WHERE db = ? AND id <> CONNECTION_ID()",
        )
        .bind(name)
        .fetch_all(pool)
        .await,
        Db::Postgres(pool) => {
            let pids: Vec<i32> = txq::sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(name)
            .fetch_all(pool)
            .await?;
            Ok(pids.into_iter().map(i64::from).collect())
        }
        Db::Sqlite(_) => Ok(Vec::new()),
    }
}

/// Ends every session on database `name` (but the asking one); returns how many
/// there were. Sessions may end by themselves meanwhile: not an error.
async fn kill_sessions(admin: &Db, name: &str) -> usize {
    let ids = session_ids(admin, name).await.unwrap_or_default();
    for id in &ids {
        let _ = match admin {
            Db::MySql(pool) => txq::sqlx::query(txq::sqlx::AssertSqlSafe(format!("KILL {id}")))
                .execute(pool)
                .await
                .map(drop),
            Db::Postgres(pool) => txq::sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(i32::try_from(*id).expect("a pid"))
                .execute(pool)
                .await
                .map(drop),
            Db::Sqlite(_) => Ok(()),
        };
    }
    ids.len()
}

fn small_pool() -> PoolOptions {
    PoolOptions {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(10),
        ..PoolOptions::default()
    }
}

/// Runs one statement with no parameters, outside any transaction (test set-up
/// only: CREATE DATABASE refuses to run in one).
pub async fn exec(db: &Db, sql: &str) {
    use txq::sqlx::{AssertSqlSafe, query};
    let sql = AssertSqlSafe(sql.to_owned());
    let result = match db {
        Db::MySql(pool) => query(sql).execute(pool).await.map(drop),
        Db::Postgres(pool) => query(sql).execute(pool).await.map(drop),
        Db::Sqlite(pool) => query(sql).execute(pool).await.map(drop),
    };
    result.expect("statement");
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(cleanup) = self.cleanup.take() else {
            return;
        };
        // The pool's sockets belong to the test's runtime, which is blocked here:
        // leave the pool alone (it closes when dropped) and drop the database from
        // a connection of the cleanup's own.
        on_fresh_runtime(async move {
            match cleanup {
                Cleanup::File(path) => {
                    for suffix in ["", "-wal", "-shm"] {
                        let mut p = path.clone().into_os_string();
                        p.push(suffix);
                        let _ = std::fs::remove_file(p);
                    }
                }
                Cleanup::Server { admin_url, name } => {
                    if let Ok(admin) = Db::connect(&admin_url, &small_pool()).await {
                        // A failed test may leave a worker holding transactions in
                        // this database; its runtime is blocked here, so end its
                        // sessions rather than wait for them.
                        kill_sessions(&admin, &name).await;
                        let drop = match &admin {
                            Db::Postgres(_) => {
                                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                            }
                            _ => format!("DROP DATABASE IF EXISTS {name}"),
                        };
                        exec(&admin, &drop).await;
                        admin.close().await;
                    }
                }
            }
        });
    }
}

/// Drop impls cannot await, and may run inside or outside a runtime.
pub(super) fn on_fresh_runtime(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(fut);
        }
    })
    .join();
}
