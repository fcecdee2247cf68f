//! `txq` commands besides `run`, as the binary: what `inbox prune` removes, and
//! the exit codes of `ops check`, `config` and `migrate`.

use std::time::Duration;

use txq::{Backend, Db};

use crate::support::{TempFile, TestDb, Txq, TxqOutput, eventually, exec};

/// Today's exit codes of these commands (src/main.rs, `mod exit`), in one place.
mod code {
    pub const OK: Option<i32> = Some(0);
    /// A bad configuration or operations file.
    pub const USAGE: Option<i32> = Some(2);
    /// A file or the database could not be used.
    pub const UNAVAILABLE: Option<i32> = Some(3);
}

const BANK_OPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bank/ops.toml");

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    i64::try_from(since.as_millis()).expect("ms")
}

async fn txq(args: &[&str], database_url: &str) -> TxqOutput {
    Txq::new(args)
        .env("TXQ_DATABASE_URL", database_url)
        .output()
        .await
}

/// The message_ids in the inbox.
async fn inbox_ids(db: &Db) -> Vec<String> {
    let sql = "SELECT CAST(message_id AS CHAR) FROM txq_inbox ORDER BY 1";
    match db {
        Db::MySql(p) => txq::sqlx::query_scalar(sql).fetch_all(p).await,
        _ => unreachable!("MariaDB"),
    }
    .expect("inbox")
}

/// `txq inbox prune --older-than 1h` removes the rows created more than an hour
/// ago, and only those; its batch session (which drops the job timeouts) is
/// closed, never returned to the pool.
#[tokio::test]
async fn inbox_prune_removes_rows_older_than_the_cutoff_and_closes_its_session() {
    let test_db = TestDb::new(Backend::MySql).await;
    let migrated = txq(&["migrate"], &test_db.url).await;
    assert_eq!(migrated.code, code::OK, "{migrated:?}");
    let now = now_ms();
    let hour = 3_600_000;
    for (id, created) in [
        ("two-hours", now - 2 * hour),
        ("a-minute-past-the-cutoff", now - hour - 60_000),
        ("a-minute-within", now - hour + 60_000),
        ("now", now),
    ] {
        exec(
            &test_db.db,
            &format!(
                "INSERT INTO txq_inbox (message_id, job_type, status, reply, attempts, created_at_ms)
                 VALUES ('{id}', 'noop', 'ok', NULL, 1, {created})"
            ),
        )
        .await;
    }
    let pruned = txq(&["inbox", "prune", "--older-than", "1h"], &test_db.url).await;
    assert_eq!(pruned.code, code::OK, "{pruned:?}");
    assert!(
        pruned.stdout.contains("removed 2 inbox row(s)"),
        "{pruned:?}"
    );
    assert_eq!(
        inbox_ids(&test_db.db).await,
        ["a-minute-within", "now"],
        "rows within the hour stay"
    );

    // The same through the library, on a pool of one session: that session is
    // closed after the prune, not handed to the next job.
    let pool = Db::connect(
        &test_db.url,
        &txq::db::PoolOptions {
            max_connections: 1,
            ..txq::db::PoolOptions::default()
        },
    )
    .await
    .expect("pool");
    let session = |pool: Db| async move {
        let Db::MySql(p) = &pool else { unreachable!() };
        let id: u64 = txq::sqlx::query_scalar("SELECT CONNECTION_ID()")
            .fetch_one(p)
            .await
            .expect("CONNECTION_ID()");
        id as i64
    };
    let before = session(pool.clone()).await;
    let removed = txq::db::inbox::prune(&pool, now_ms()).await.expect("prune");
    assert_eq!(removed, 2);
    let after = session(pool.clone()).await;
    assert_ne!(before, after, "the pruning session was not reused");
    eventually("the pruning session to be gone from the server", || async {
        (!test_db.sessions().await.contains(&before)).then_some(())
    })
    .await;
    pool.close().await;
}

#[tokio::test]
async fn ops_check_exit_codes() {
    let ok = Txq::new(["ops", "check", BANK_OPS]).output().await;
    assert_eq!(ok.code, code::OK, "{ok:?}");
    let bad = TempFile::with(
        "bad.toml",
        "[x]\nparams = { a = \"integer\" }\n[[x.steps]]\nname = \"s\"\nsql = \"SELECT :b\"\n",
    );
    let invalid = Txq::new(["ops", "check"]).arg(&bad.0).output().await;
    assert_eq!(invalid.code, code::USAGE, "{invalid:?}");
    let missing = Txq::new(["ops", "check", "/nonexistent/txq-ops.toml"])
        .output()
        .await;
    assert_eq!(missing.code, code::UNAVAILABLE, "{missing:?}");
}

#[tokio::test]
async fn config_exit_codes() {
    let ok = Txq::new(["config"]).output().await;
    assert_eq!(ok.code, code::OK, "{ok:?}");
    let invalid = Txq::new(["config"]).env("TXQ_PREFETCH", "0").output().await;
    assert_eq!(invalid.code, code::USAGE, "{invalid:?}");
    assert!(invalid.stderr.contains("prefetch"), "{invalid:?}");
}

#[tokio::test]
async fn migrate_exit_codes() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let first = txq(&["migrate"], &test_db.url).await;
    assert_eq!(first.code, code::OK, "{first:?}");
    let again = txq(&["migrate"], &test_db.url).await;
    assert_eq!(again.code, code::OK, "{again:?}");
    assert!(again.stdout.contains("applied 0 migration(s)"), "{again:?}");
    let started = tokio::time::Instant::now();
    let unreachable = txq(&["migrate"], "postgres://postgres@127.0.0.1:1/test").await;
    assert_eq!(unreachable.code, code::UNAVAILABLE, "{unreachable:?}");
    assert!(started.elapsed() < Duration::from_secs(25));
}

/// Workers starting at once on a fresh database each migrate: every one must
/// succeed and each migration be applied once. (sqlx's MySQL lock is a no-op on
/// MariaDB, where `GET_LOCK(name, -1)` answers NULL: three workers of the cluster
/// test failed with a duplicate key in the ledger before txq took its own lock.)
async fn concurrent_migrations(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    let runs = (0..4).map(|_| {
        let url = test_db.url.clone();
        tokio::spawn(async move {
            let db = txq::Db::connect(&url, &txq::db::PoolOptions::default())
                .await
                .expect("connect");
            let applied = txq::db::migrate(&db).await;
            db.close().await;
            applied
        })
    });
    let mut applied = Vec::new();
    for run in futures_util::future::join_all(runs).await {
        applied.extend(run.expect("task").expect("every start migrates"));
    }
    applied.sort_unstable();
    assert_eq!(applied, vec![1, 2, 3], "each version applied exactly once");
    let sql = "SELECT COUNT(*) FROM txq_schema_migrations";
    let rows: i64 = match &test_db.db {
        txq::Db::MySql(p) => txq::sqlx::query_scalar(sql).fetch_one(p).await,
        txq::Db::Postgres(p) => txq::sqlx::query_scalar(sql).fetch_one(p).await,
        txq::Db::Sqlite(p) => txq::sqlx::query_scalar(sql).fetch_one(p).await,
    }
    .expect("ledger");
    assert_eq!(rows, 3);
}

#[tokio::test]
async fn migrations_from_workers_starting_at_once_apply_once_on_mariadb() {
    concurrent_migrations(Backend::MySql).await;
}

#[tokio::test]
async fn migrations_from_workers_starting_at_once_apply_once_on_postgres() {
    concurrent_migrations(Backend::Postgres).await;
}
