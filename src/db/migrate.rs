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

const MIGRATIONS: &[Migration] = &[Migration {
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
}];

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

/// Applies the migrations this database lacks, with sqlx's `Migrator` (which takes
/// a lock on MySQL/MariaDB and PostgreSQL, so workers starting at once apply each
/// once); returns the versions applied now.
pub async fn migrate(db: &Db) -> Result<Vec<i64>, sqlx::Error> {
    let migrator = migrator(db.backend());
    let applied = crate::on_pool!(db, p => {
        let before = applied(p, &migrator).await?;
        migrator.run(p).await?;
        let after = applied(p, &migrator).await?;
        after.into_iter().filter(|v| !before.contains(v)).collect::<Vec<_>>()
    });
    for m in MIGRATIONS.iter().filter(|m| applied.contains(&m.version)) {
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    Ok(applied)
}

async fn applied<DB>(pool: &sqlx::Pool<DB>, migrator: &Migrator) -> Result<Vec<i64>, sqlx::Error>
where
    DB: sqlx::Database,
    DB::Connection: sqlx::migrate::Migrate,
{
    use sqlx::migrate::Migrate as _;
    let mut conn = pool.acquire().await?;
    conn.ensure_migrations_table(&migrator.table_name).await?;
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
        assert_eq!(migrate(&t.db).await.expect("first"), vec![1]);
        assert_eq!(migrate(&t.db).await.expect("second"), Vec::<i64>::new());
        let recorded: Vec<i64> = crate::on_pool!(&t.db, p => {
            sqlx::query_scalar("SELECT version FROM txq_schema_migrations")
                .fetch_all(p).await.expect("ledger")
        });
        assert_eq!(recorded, vec![1]);
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
        assert_eq!(migrate(&t.db).await.expect("migrate"), vec![1]);
        let rows: i64 = crate::on_pool!(&t.db, p => {
            sqlx::query_scalar("SELECT COUNT(*) FROM txq_inbox").fetch_one(p).await.expect("count")
        });
        assert_eq!(rows, 1);
    }
}
