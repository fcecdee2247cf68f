//! txq's own tables, created by versioned migrations recorded in `txq_migrations`
//! (not `_sqlx_migrations`, which the application's own migrations may own).
//! Every statement is idempotent, so two workers starting at once both succeed.

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

const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS txq_migrations (
    version BIGINT NOT NULL PRIMARY KEY, name VARCHAR(255) NOT NULL, applied_at_ms BIGINT NOT NULL)";

/// Applies the migrations this database lacks; returns the versions applied now.
pub async fn migrate(db: &Db) -> Result<Vec<i64>, sqlx::Error> {
    db.execute_script(&[CREATE_LEDGER]).await?;
    let applied: Vec<i64> = crate::on_pool!(db, p => {
        sqlx::query_scalar("SELECT version FROM txq_migrations").fetch_all(p).await?
    });
    let record = match db.backend() {
        Backend::MySql => {
            "INSERT IGNORE INTO txq_migrations (version, name, applied_at_ms) VALUES (?, ?, ?)"
        }
        Backend::Postgres => {
            "INSERT INTO txq_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (version) DO NOTHING"
        }
        Backend::Sqlite => {
            "INSERT INTO txq_migrations (version, name, applied_at_ms) VALUES (?, ?, ?)
             ON CONFLICT (version) DO NOTHING"
        }
    };
    let mut now_applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let statements = match db.backend() {
            Backend::MySql => m.mysql,
            Backend::Postgres => m.postgres,
            Backend::Sqlite => m.sqlite,
        };
        db.execute_script(statements).await?;
        crate::on_pool!(db, p => {
            sqlx::query(record).bind(m.version).bind(m.name).bind(super::now_ms()).execute(p).await?;
        });
        tracing::info!(version = m.version, name = m.name, "applied migration");
        now_applied.push(m.version);
    }
    Ok(now_applied)
}
