#![allow(unreachable_pub, dead_code)]
//! The bank workloads (docs/workloads.md), `transfer` and `noop`, written against txq's public API
//! the way a user would write them. The bank example runs them; the integration
//! tests and benchmarks include this file too, so all three exercise the same code.

use serde::{Deserialize, Serialize};
use txq::sqlx::{self, QueryBuilder};
use txq::{Backend, Db, Handler, JobError, JobMeta, Tx, with_conn};

/// Balance every account starts with.
pub const INITIAL_BALANCE: i64 = 1_000_000;

/// `{"from":A,"to":B,"amount":N}`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub from: i64,
    pub to: i64,
    pub amount: i64,
}

/// An account after the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Account {
    pub id: i64,
    pub balance: i64,
}

/// The `result` of an accepted transfer: both new balances.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct TransferReply {
    pub from: Account,
    pub to: Account,
}

/// Moves `amount` from one account to another, locking both rows in id order so
/// that concurrent transfers queue instead of deadlocking (and when they deadlock
/// anyway, txq retries them).
#[derive(Debug, Clone, Copy)]
pub struct Transfer;

struct TransferSql {
    lock: &'static str,
    add: &'static str,
    insert: &'static str,
}

fn transfer_sql(backend: Backend) -> &'static TransferSql {
    match backend {
        Backend::MySql => &TransferSql {
            lock: "SELECT id, balance FROM accounts WHERE id IN (?, ?) ORDER BY id FOR UPDATE",
            add: "UPDATE accounts SET balance = balance + ? WHERE id = ?",
            insert: "INSERT INTO transfers (message_id, from_id, to_id, amount) VALUES (?, ?, ?, ?)",
        },
        Backend::Postgres => &TransferSql {
            lock: "SELECT id, balance FROM accounts WHERE id IN ($1, $2) ORDER BY id FOR UPDATE",
            add: "UPDATE accounts SET balance = balance + $1 WHERE id = $2",
            insert: "INSERT INTO transfers (message_id, from_id, to_id, amount) VALUES ($1, $2, $3, $4)",
        },
        // SQLite has no row locks: txq begins its transactions IMMEDIATE, which takes
        // the database's write lock up front.
        Backend::Sqlite => &TransferSql {
            lock: "SELECT id, balance FROM accounts WHERE id IN (?, ?) ORDER BY id",
            add: "UPDATE accounts SET balance = balance + ? WHERE id = ?",
            insert: "INSERT INTO transfers (message_id, from_id, to_id, amount) VALUES (?, ?, ?, ?)",
        },
    }
}

impl Handler for Transfer {
    type Payload = TransferRequest;
    type Output = TransferReply;

    async fn handle(
        &self,
        tx: &mut Tx,
        req: TransferRequest,
        meta: &JobMeta,
    ) -> Result<TransferReply, JobError> {
        if req.from == req.to {
            return Err(JobError::reject("same_account", "from and to must differ"));
        }
        if req.amount <= 0 {
            return Err(JobError::reject(
                "invalid_amount",
                "amount must be positive",
            ));
        }
        let sql = transfer_sql(tx.backend());
        let (lo, hi) = (req.from.min(req.to), req.from.max(req.to));
        let rows: Vec<(i64, i64)> = with_conn!(tx, c => {
            sqlx::query_as(sql.lock).bind(lo).bind(hi).fetch_all(c).await?
        });
        let balance = |id: i64| rows.iter().find(|(i, _)| *i == id).map(|(_, b)| *b);
        let (Some(from_balance), Some(to_balance)) = (balance(req.from), balance(req.to)) else {
            return Err(JobError::reject("unknown_account", "no such account"));
        };
        if from_balance < req.amount {
            return Err(JobError::reject(
                "insufficient_funds",
                format!(
                    "account {} has {from_balance}, needs {}",
                    req.from, req.amount
                ),
            ));
        }
        with_conn!(tx, c => {
            sqlx::query(sql.add).bind(-req.amount).bind(req.from).execute(&mut *c).await?;
            sqlx::query(sql.add).bind(req.amount).bind(req.to).execute(&mut *c).await?;
            sqlx::query(sql.insert)
                .bind(meta.message_id.as_deref())
                .bind(req.from)
                .bind(req.to)
                .bind(req.amount)
                .execute(&mut *c)
                .await?;
        });
        Ok(TransferReply {
            from: Account {
                id: req.from,
                balance: from_balance - req.amount,
            },
            to: Account {
                id: req.to,
                balance: to_balance + req.amount,
            },
        })
    }
}

/// The cheapest real job: one row into `jobs_log`.
#[derive(Debug, Clone, Copy)]
pub struct Noop;

impl Handler for Noop {
    type Payload = serde_json::Value;
    type Output = serde_json::Value;

    async fn handle(
        &self,
        tx: &mut Tx,
        _payload: serde_json::Value,
        meta: &JobMeta,
    ) -> Result<serde_json::Value, JobError> {
        let sql = match tx.backend() {
            Backend::Postgres => "INSERT INTO jobs_log (message_id) VALUES ($1)",
            Backend::MySql | Backend::Sqlite => "INSERT INTO jobs_log (message_id) VALUES (?)",
        };
        with_conn!(tx, c => {
            sqlx::query(sql).bind(meta.message_id.as_deref()).execute(c).await?;
        });
        Ok(serde_json::Value::Null)
    }
}

/// (Re)creates `accounts` with `accounts` rows of [`INITIAL_BALANCE`], and empty
/// `transfers` and `jobs_log` tables.
pub async fn setup(db: &Db, accounts: i64) -> Result<(), sqlx::Error> {
    let drop = [
        "DROP TABLE IF EXISTS transfers",
        "DROP TABLE IF EXISTS jobs_log",
        "DROP TABLE IF EXISTS accounts",
    ];
    db.execute_script(&drop).await?;
    let create: &[&'static str] = match db.backend() {
        Backend::MySql => &[
            "CREATE TABLE accounts (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB",
            "CREATE TABLE transfers (id BIGINT AUTO_INCREMENT PRIMARY KEY,
                message_id VARCHAR(64) UNIQUE, from_id BIGINT NOT NULL, to_id BIGINT NOT NULL,
                amount BIGINT NOT NULL, created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))
                ENGINE=InnoDB",
            "CREATE TABLE jobs_log (id BIGINT AUTO_INCREMENT PRIMARY KEY, message_id VARCHAR(64),
                created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB",
        ],
        Backend::Postgres => &[
            "CREATE TABLE accounts (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL)",
            "CREATE TABLE transfers (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                message_id VARCHAR(64) UNIQUE, from_id BIGINT NOT NULL, to_id BIGINT NOT NULL,
                amount BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            "CREATE TABLE jobs_log (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                message_id VARCHAR(64), created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        ],
        Backend::Sqlite => &[
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)",
            "CREATE TABLE transfers (id INTEGER PRIMARY KEY AUTOINCREMENT,
                message_id TEXT UNIQUE, from_id INTEGER NOT NULL, to_id INTEGER NOT NULL,
                amount INTEGER NOT NULL, created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
            "CREATE TABLE jobs_log (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT,
                created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        ],
    };
    db.execute_script(create).await?;
    let mut tx = db.begin(None).await?;
    for chunk in (1..=accounts).collect::<Vec<_>>().chunks(500) {
        with_conn!(tx, c => {
            let mut insert = QueryBuilder::new("INSERT INTO accounts (id, balance) ");
            insert.push_values(chunk, |mut row, id| {
                row.push_bind(*id).push_bind(INITIAL_BALANCE);
            });
            insert.build().execute(c).await?;
        });
    }
    tx.commit().await
}

/// What the invariants are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// sum(balance) over all accounts.
    pub balance_sum: i64,
    /// Rows in `transfers`.
    pub transfers: i64,
    /// Distinct non-null message_ids in `transfers`.
    pub distinct_transfer_ids: i64,
    /// Rows in `jobs_log`.
    pub jobs_logged: i64,
}

/// Reads the invariant figures.
pub async fn totals(db: &Db) -> Result<Totals, sqlx::Error> {
    // SUM of BIGINT is DECIMAL on MySQL and NUMERIC on PostgreSQL: cast it back.
    let sql = match db.backend() {
        Backend::MySql => {
            "SELECT CAST(COALESCE(SUM(balance), 0) AS SIGNED), (SELECT COUNT(*) FROM transfers),
                    (SELECT COUNT(DISTINCT message_id) FROM transfers),
                    (SELECT COUNT(*) FROM jobs_log)
             FROM accounts"
        }
        Backend::Postgres => {
            "SELECT CAST(COALESCE(SUM(balance), 0) AS BIGINT), (SELECT COUNT(*) FROM transfers),
                    (SELECT COUNT(DISTINCT message_id) FROM transfers),
                    (SELECT COUNT(*) FROM jobs_log)
             FROM accounts"
        }
        Backend::Sqlite => {
            "SELECT COALESCE(SUM(balance), 0), (SELECT COUNT(*) FROM transfers),
                    (SELECT COUNT(DISTINCT message_id) FROM transfers),
                    (SELECT COUNT(*) FROM jobs_log)
             FROM accounts"
        }
    };
    let mut tx = db.begin(None).await?;
    let (balance_sum, transfers, distinct_transfer_ids, jobs_logged): (i64, i64, i64, i64) =
        with_conn!(tx, c => sqlx::query_as(sql).fetch_one(c).await?);
    tx.commit().await?;
    Ok(Totals {
        balance_sum,
        transfers,
        distinct_transfer_ids,
        jobs_logged,
    })
}
