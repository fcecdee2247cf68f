//! txq's own tables, created by versioned migrations (sqlx's `Migrator`) recorded
//! in [`LEDGER`]. Every statement is idempotent as well, so a migration that ran
//! before the ledger knew it does no harm.

use sqlx::migrate::{MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr as _};

use super::{Backend, Db};

struct Migration {
    version: i64,
    name: &'static str,
    mysql: &'static [&'static str],
    postgres: &'static [&'static str],
    sqlite: &'static [&'static str],
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "inbox",
        // VARBINARY: message ids compare byte for byte (no case folding, no PAD SPACE).
        mysql: &["CREATE TABLE IF NOT EXISTS txq_inbox (
            message_id VARBINARY(255) NOT NULL PRIMARY KEY,
            job_type VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            status VARCHAR(16) NOT NULL,
            reply LONGBLOB NULL,
            attempts BIGINT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            INDEX txq_inbox_created (created_at_ms)
        ) ENGINE=InnoDB"],
        postgres: &[
            "CREATE TABLE IF NOT EXISTS txq_inbox (
            message_id VARCHAR(255) NOT NULL PRIMARY KEY,
            job_type VARCHAR(255) NOT NULL,
            status VARCHAR(16) NOT NULL,
            reply BYTEA NULL,
            attempts BIGINT NOT NULL,
            created_at_ms BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS txq_inbox_created ON txq_inbox (created_at_ms)",
        ],
        sqlite: &[
            "CREATE TABLE IF NOT EXISTS txq_inbox (
            message_id TEXT NOT NULL PRIMARY KEY,
            job_type TEXT NOT NULL,
            status TEXT NOT NULL,
            reply BLOB NULL,
            attempts INTEGER NOT NULL,
            created_at_ms INTEGER NOT NULL)",
            "CREATE INDEX IF NOT EXISTS txq_inbox_created ON txq_inbox (created_at_ms)",
        ],
    },
    Migration {
        version: 2,
        name: "batches",
        // One row a batch (its size, and the counts its last completion recorded),
        // one a counted member (what makes a count idempotent, and lets a replayed
        // failure move to ok), up to 32 counter rows a batch (members add to one at
        // random, so they seldom wait for each other), one a completion revision
        // to publish (the outbox).
        mysql: &[
            "CREATE TABLE IF NOT EXISTS txq_batches (
            batch_id VARBINARY(255) NOT NULL PRIMARY KEY,
            size BIGINT NOT NULL,
            ok BIGINT NOT NULL,
            rejected BIGINT NOT NULL,
            failed BIGINT NOT NULL,
            revision BIGINT NOT NULL,
            reply_to VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
            opened_at_ms BIGINT NOT NULL,
            completed_at_ms BIGINT NULL,
            INDEX txq_batches_opened (opened_at_ms),
            INDEX txq_batches_revision (revision)
        ) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS txq_batch_members (
            batch_id VARBINARY(255) NOT NULL,
            message_id VARBINARY(255) NOT NULL,
            status VARCHAR(16) NOT NULL,
            PRIMARY KEY (batch_id, message_id)
        ) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS txq_batch_counts (
            batch_id VARBINARY(255) NOT NULL,
            shard INT NOT NULL,
            ok BIGINT NOT NULL,
            rejected BIGINT NOT NULL,
            failed BIGINT NOT NULL,
            updated_at_ms BIGINT NOT NULL,
            PRIMARY KEY (batch_id, shard),
            INDEX txq_batch_counts_updated (updated_at_ms)
        ) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS txq_batch_completions (
            batch_id VARBINARY(255) NOT NULL,
            revision BIGINT NOT NULL,
            destination VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
            body LONGBLOB NOT NULL,
            due_at_ms BIGINT NOT NULL,
            published_at_ms BIGINT NULL,
            callback_at_ms BIGINT NULL,
            PRIMARY KEY (batch_id, revision),
            INDEX txq_batch_completions_due (published_at_ms, due_at_ms)
        ) ENGINE=InnoDB",
        ],
        postgres: &[
            "CREATE TABLE IF NOT EXISTS txq_batches (
            batch_id VARCHAR(255) NOT NULL PRIMARY KEY,
            size BIGINT NOT NULL,
            ok BIGINT NOT NULL,
            rejected BIGINT NOT NULL,
            failed BIGINT NOT NULL,
            revision BIGINT NOT NULL,
            reply_to VARCHAR(255) NULL,
            opened_at_ms BIGINT NOT NULL,
            completed_at_ms BIGINT NULL)",
            "CREATE INDEX IF NOT EXISTS txq_batches_opened ON txq_batches (opened_at_ms)",
            "CREATE INDEX IF NOT EXISTS txq_batches_revision ON txq_batches (revision)",
            "CREATE TABLE IF NOT EXISTS txq_batch_members (
            batch_id VARCHAR(255) NOT NULL,
            message_id VARCHAR(255) NOT NULL,
            status VARCHAR(16) NOT NULL,
            PRIMARY KEY (batch_id, message_id))",
            "CREATE TABLE IF NOT EXISTS txq_batch_counts (
            batch_id VARCHAR(255) NOT NULL,
            shard INTEGER NOT NULL,
            ok BIGINT NOT NULL,
            rejected BIGINT NOT NULL,
            failed BIGINT NOT NULL,
            updated_at_ms BIGINT NOT NULL,
            PRIMARY KEY (batch_id, shard))",
            "CREATE INDEX IF NOT EXISTS txq_batch_counts_updated ON txq_batch_counts (updated_at_ms)",
            "CREATE TABLE IF NOT EXISTS txq_batch_completions (
            batch_id VARCHAR(255) NOT NULL,
            revision BIGINT NOT NULL,
            destination VARCHAR(255) NULL,
            body BYTEA NOT NULL,
            due_at_ms BIGINT NOT NULL,
            published_at_ms BIGINT NULL,
            callback_at_ms BIGINT NULL,
            PRIMARY KEY (batch_id, revision))",
            "CREATE INDEX IF NOT EXISTS txq_batch_completions_due
            ON txq_batch_completions (published_at_ms, due_at_ms)",
        ],
        sqlite: &[
            "CREATE TABLE IF NOT EXISTS txq_batches (
            batch_id TEXT NOT NULL PRIMARY KEY,
            size INTEGER NOT NULL,
            ok INTEGER NOT NULL,
            rejected INTEGER NOT NULL,
            failed INTEGER NOT NULL,
            revision INTEGER NOT NULL,
            reply_to TEXT NULL,
            opened_at_ms INTEGER NOT NULL,
            completed_at_ms INTEGER NULL)",
            "CREATE INDEX IF NOT EXISTS txq_batches_opened ON txq_batches (opened_at_ms)",
            "CREATE INDEX IF NOT EXISTS txq_batches_revision ON txq_batches (revision)",
            "CREATE TABLE IF NOT EXISTS txq_batch_members (
            batch_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            status TEXT NOT NULL,
            PRIMARY KEY (batch_id, message_id))",
            "CREATE TABLE IF NOT EXISTS txq_batch_counts (
            batch_id TEXT NOT NULL,
            shard INTEGER NOT NULL,
            ok INTEGER NOT NULL,
            rejected INTEGER NOT NULL,
            failed INTEGER NOT NULL,
            updated_at_ms INTEGER NOT NULL,
            PRIMARY KEY (batch_id, shard))",
            "CREATE INDEX IF NOT EXISTS txq_batch_counts_updated ON txq_batch_counts (updated_at_ms)",
            "CREATE TABLE IF NOT EXISTS txq_batch_completions (
            batch_id TEXT NOT NULL,
            revision INTEGER NOT NULL,
            destination TEXT NULL,
            body BLOB NOT NULL,
            due_at_ms INTEGER NOT NULL,
            published_at_ms INTEGER NULL,
            callback_at_ms INTEGER NULL,
            PRIMARY KEY (batch_id, revision))",
            "CREATE INDEX IF NOT EXISTS txq_batch_completions_due
            ON txq_batch_completions (published_at_ms, due_at_ms)",
        ],
    },
    Migration {
        version: 3,
        name: "fleet",
        // One row a running worker, upserted by its heartbeat and deleted at a
        // clean stop; one a worker and minute with outcomes (`db::fleet`).
        mysql: &[
            "CREATE TABLE IF NOT EXISTS txq_workers (
            id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
            host VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            pid BIGINT NOT NULL,
            version VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            queue VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            concurrency BIGINT NOT NULL,
            started_at_ms BIGINT NOT NULL,
            last_seen_ms BIGINT NOT NULL,
            in_flight BIGINT NOT NULL,
            settled BIGINT NOT NULL,
            reconnects BIGINT NOT NULL,
            INDEX txq_workers_last_seen (last_seen_ms)
        ) ENGINE=InnoDB",
            "CREATE TABLE IF NOT EXISTS txq_throughput (
            minute_ms BIGINT NOT NULL,
            worker_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            ok BIGINT NOT NULL,
            rejected BIGINT NOT NULL,
            dead_lettered BIGINT NOT NULL,
            retried BIGINT NOT NULL,
            PRIMARY KEY (minute_ms, worker_id)
        ) ENGINE=InnoDB",
        ],
        postgres: &[
            "CREATE TABLE IF NOT EXISTS txq_workers (
            id VARCHAR(64) NOT NULL PRIMARY KEY,
            host VARCHAR(255) NOT NULL,
            pid BIGINT NOT NULL,
            version VARCHAR(64) NOT NULL,
            queue VARCHAR(255) NOT NULL,
            concurrency BIGINT NOT NULL,
            started_at_ms BIGINT NOT NULL,
            last_seen_ms BIGINT NOT NULL,
            in_flight BIGINT NOT NULL,
            settled BIGINT NOT NULL,
            reconnects BIGINT NOT NULL)",
            "CREATE INDEX IF NOT EXISTS txq_workers_last_seen ON txq_workers (last_seen_ms)",
            "CREATE TABLE IF NOT EXISTS txq_throughput (
            minute_ms BIGINT NOT NULL,
            worker_id VARCHAR(64) NOT NULL,
            ok BIGINT NOT NULL,
            rejected BIGINT NOT NULL,
            dead_lettered BIGINT NOT NULL,
            retried BIGINT NOT NULL,
            PRIMARY KEY (minute_ms, worker_id))",
        ],
        sqlite: &[
            "CREATE TABLE IF NOT EXISTS txq_workers (
            id TEXT NOT NULL PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            version TEXT NOT NULL,
            queue TEXT NOT NULL,
            concurrency INTEGER NOT NULL,
            started_at_ms INTEGER NOT NULL,
            last_seen_ms INTEGER NOT NULL,
            in_flight INTEGER NOT NULL,
            settled INTEGER NOT NULL,
            reconnects INTEGER NOT NULL)",
            "CREATE INDEX IF NOT EXISTS txq_workers_last_seen ON txq_workers (last_seen_ms)",
            "CREATE TABLE IF NOT EXISTS txq_throughput (
            minute_ms INTEGER NOT NULL,
            worker_id TEXT NOT NULL,
            ok INTEGER NOT NULL,
            rejected INTEGER NOT NULL,
            dead_lettered INTEGER NOT NULL,
            retried INTEGER NOT NULL,
            PRIMARY KEY (minute_ms, worker_id))",
        ],
    },
];

/// sqlx's ledger, under a name of txq's own: the application's own migrations may
/// own `_sqlx_migrations`. (Releases before 0.2 kept a ledger of their own format in
/// `txq_migrations`; it is left alone. Every migration here is idempotent, so such
/// a database takes version 1 again as a no-op.)
pub(super) const LEDGER: &str = "txq_schema_migrations";

fn migrator(backend: Backend) -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|m| {
            let statements = match backend {
                Backend::MySql => m.mysql,
                Backend::Postgres => m.postgres,
                Backend::Sqlite => m.sqlite,
            };
            let sql = statements.join(";\n");
            sqlx::migrate::Migration::new(
                m.version,
                m.name.into(),
                MigrationType::Simple,
                AssertSqlSafe(sql).into_sql_str(),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(LEDGER);
    migrator
}

/// Applies the migrations this database lacks, with sqlx's `Migrator`, under a
/// lock so that workers starting at once apply each once; returns the versions
/// applied now.
pub async fn migrate(db: &Db) -> Result<Vec<i64>, sqlx::Error> {
    let mut migrator = migrator(db.backend());
    let applied = match db {
        Db::MySql(pool) => {
            // sqlx's own MySQL lock asks for GET_LOCK(name, -1), which MariaDB
            // answers with NULL and no lock: take one here, with a timeout.
            migrator.set_locking(false);
            let mut conn = pool.acquire().await?;
            let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
                .bind(LOCK)
                .bind(MYSQL_LOCK_WAIT_SECONDS)
                .fetch_one(&mut *conn)
                .await?;
            if got != Some(1) {
                return Err(sqlx::Error::Protocol(format!(
                    "another process held the migration lock `{LOCK}` for {MYSQL_LOCK_WAIT_SECONDS} s"
                )));
            }
            let applied = run(&migrator, &mut *conn).await;
            let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
                .bind(LOCK)
                .execute(&mut *conn)
                .await;
            applied?
        }
        Db::Postgres(pool) => {
            // Held across the ledger's creation too, which sqlx's own lock is not.
            migrator.set_locking(false);
            let mut conn = pool.acquire().await?;
            sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
                .bind(LOCK)
                .execute(&mut *conn)
                .await?;
            let applied = run(&migrator, &mut *conn).await;
            let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
                .bind(LOCK)
                .execute(&mut *conn)
                .await;
            applied?
        }
        // SQLite's write lock serialises the writers.
        Db::Sqlite(pool) => run(&migrator, &mut *pool.acquire().await?).await?,
    };
    for m in MIGRATIONS.iter().filter(|m| applied.contains(&m.version)) {
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    Ok(applied)
}

/// The lock held while migrating (MySQL/MariaDB named lock, PostgreSQL advisory
/// lock of its hash), and how long MySQL waits for it.
const LOCK: &str = "txq_schema_migrations";
const MYSQL_LOCK_WAIT_SECONDS: i64 = 60;

/// Runs the migrator on `conn`; the versions it applied.
async fn run<C>(migrator: &Migrator, conn: &mut C) -> Result<Vec<i64>, sqlx::Error>
where
    C: sqlx::migrate::Migrate,
{
    conn.ensure_migrations_table(&migrator.table_name).await?;
    let before = versions(conn, migrator).await?;
    migrator.run_direct(None, conn, false).await?;
    let after = versions(conn, migrator).await?;
    Ok(after.into_iter().filter(|v| !before.contains(v)).collect())
}

async fn versions<C>(conn: &mut C, migrator: &Migrator) -> Result<Vec<i64>, sqlx::Error>
where
    C: sqlx::migrate::Migrate,
{
    let applied = conn.list_applied_migrations(&migrator.table_name).await?;
    Ok(applied.into_iter().map(|m| m.version).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::empty_temp_db;

    #[tokio::test]
    async fn each_migration_is_applied_once_and_recorded_in_txq_s_ledger() {
        let t = empty_temp_db().await;
        assert_eq!(migrate(&t.db).await.expect("first"), vec![1, 2, 3]);
        assert_eq!(migrate(&t.db).await.expect("second"), Vec::<i64>::new());
        let recorded: Vec<i64> = crate::on_pool!(&t.db, p => {
            sqlx::query_scalar("SELECT version FROM txq_schema_migrations")
                .fetch_all(p).await.expect("ledger")
        });
        assert_eq!(recorded, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn tables_made_before_the_ledger_keep_their_rows() {
        let t = empty_temp_db().await;
        t.db.execute_script(MIGRATIONS[0].sqlite)
            .await
            .expect("old tables");
        crate::on_pool!(&t.db, p => {
            sqlx::query("INSERT INTO txq_inbox VALUES ('m', 't', 'ok', NULL, 1, 0)")
                .execute(p).await.expect("a row");
        });
        assert_eq!(migrate(&t.db).await.expect("migrate"), vec![1, 2, 3]);
        let rows: i64 = crate::on_pool!(&t.db, p => {
            sqlx::query_scalar("SELECT COUNT(*) FROM txq_inbox").fetch_one(p).await.expect("count")
        });
        assert_eq!(rows, 1);
    }
}
