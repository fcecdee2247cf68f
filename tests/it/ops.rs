//! Job types defined as SQL steps in a TOML file, on all three backends.

use serde_json::{Value, json};
use txq::{Backend, Worker};

use crate::bank;
use crate::support::{Client, Request, RunningWorker, TestDb, config, exec, unique};

const BANK_OPS: &str = include_str!("../../examples/bank/ops.toml");

async fn ops_worker(
    test_db: &TestDb,
    requests: &str,
    replies: &str,
    ops: &str,
    concurrency: u16,
) -> RunningWorker {
    let ops = txq::sqlops::parse(ops).expect("a valid operations file");
    let builder = Worker::builder(config(&test_db.url, requests, replies, concurrency))
        .database(test_db.db.clone());
    RunningWorker::start(
        ops.register(builder, test_db.db.backend())
            .expect("compiles"),
    )
    .await
}

/// Sends each request in turn and returns the replies' bodies.
async fn ask_all(client: &Client, requests: &str, replies: &str, list: Vec<Request>) -> Vec<Value> {
    ask_all_raw(client, requests, replies, list)
        .await
        .into_iter()
        .map(|(body, _)| body)
        .collect()
}

/// Sends each request in turn and returns the replies' bodies, as JSON and as
/// the bytes sent.
async fn ask_all_raw(
    client: &Client,
    requests: &str,
    replies: &str,
    list: Vec<Request>,
) -> Vec<(Value, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, r) in list.into_iter().enumerate() {
        let r = r.correlation(&format!("q-{i}")).reply_to(replies);
        client.publish(requests, &r).await;
        let reply = client.replies(replies, 1).await.remove(0);
        assert_eq!(reply.correlation_id(), Some(format!("q-{i}").as_str()));
        out.push((reply.body, reply.data));
    }
    out
}

const TYPES_OPS: &str = r#"
[rt]
params = { id = "integer", i = "integer", f = "float", d = "decimal", s = "string", b = "bool", j = "json", ts = "timestamp", dt = "date", by = "bytes", n = { type = "string", nullable = true } }
result = "back"

[[rt.steps]]
name = "put"
sql = "INSERT INTO types_t (id, i, f, d, s, b, j, ts, dt, by_, n) VALUES (:id, :i, :f, :d, :s, :b, :j, :ts, :dt, :by, :n)"
expect_rows = 1

[[rt.steps]]
name = "back"
sql = "SELECT i, f, d, s, b, j, ts, dt, by_, n FROM types_t WHERE id = :id"
expect_rows = 1
json_columns = ["j"]
"#;

async fn every_type_round_trips(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    let ddl = match backend {
        Backend::MySql => "CREATE TABLE types_t (id BIGINT PRIMARY KEY, i BIGINT, f DOUBLE, d DECIMAL(30,10),
            s VARCHAR(200), b BOOLEAN, j JSON, ts TIMESTAMP(6) NULL, dt DATE, by_ VARBINARY(100), n VARCHAR(10) NULL)",
        Backend::Postgres => "CREATE TABLE types_t (id BIGINT PRIMARY KEY, i BIGINT, f DOUBLE PRECISION,
            d NUMERIC(30,10), s TEXT, b BOOLEAN, j JSONB, ts TIMESTAMPTZ, dt DATE, by_ BYTEA, n TEXT)",
        Backend::Sqlite => "CREATE TABLE types_t (id INTEGER PRIMARY KEY, i INTEGER, f REAL, d TEXT, s TEXT,
            b BOOLEAN, j JSON, ts DATETIME, dt DATE, by_ BLOB, n TEXT)",
    };
    exec(&test_db.db, ddl).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let worker = ops_worker(&test_db, &requests, &replies, TYPES_OPS, 2).await;
    let payload = json!({
        "id": 1,
        "i": 9_007_199_254_740_993_i64,
        "f": 1.5,
        "d": "12345678901234567890.1234567890",
        "s": "héllo ✓",
        "b": true,
        "j": {"a": [1, 2, {"b": null}], "t": "x"},
        "ts": "2024-05-06T07:08:09.123456Z",
        "dt": "2024-05-06",
        "by": "AAEC/w==",
        "n": null,
    });
    let got = ask_all(
        &client,
        &requests,
        &replies,
        vec![Request::json("rt", payload)],
    )
    .await;
    worker.stop().await.expect("clean stop");
    assert_eq!(
        got[0],
        json!({"status": "ok", "result": {
            "i": 9_007_199_254_740_993_i64,
            "f": 1.5,
            "d": "12345678901234567890.1234567890",
            "s": "héllo ✓",
            "b": true,
            "j": {"a": [1, 2, {"b": null}], "t": "x"},
            "ts": "2024-05-06T07:08:09.123456Z",
            "dt": "2024-05-06",
            "by_": "AAEC/w==",
            "n": null,
        }}),
        "{backend:?}"
    );
}

#[tokio::test]
async fn every_parameter_and_column_type_round_trips_on_sqlite() {
    every_type_round_trips(Backend::Sqlite).await;
}

#[tokio::test]
async fn every_parameter_and_column_type_round_trips_on_mariadb() {
    every_type_round_trips(Backend::MySql).await;
}

#[tokio::test]
async fn every_parameter_and_column_type_round_trips_on_postgres() {
    every_type_round_trips(Backend::Postgres).await;
}

const TEXT_OPS: &str = r#"
[put]
params = { id = "integer", s = "string" }
result = "back"

[[put.steps]]
name = "put"
sql = "INSERT INTO texts (id, s) VALUES (:id, :s)"
expect_rows = 1

[[put.steps]]
name = "back"
sql = "SELECT s FROM texts WHERE id = :id"
expect_rows = 1

[then_fail]
params = { id = "integer" }

[[then_fail.steps]]
name = "write"
sql = "INSERT INTO texts (id, s) VALUES (:id, 'written')"

[[then_fail.steps]]
name = "check"
sql = "SELECT s FROM texts WHERE id = -1"
expect_min_rows = 1
error_code = "nothing_there"
"#;

async fn injection_is_data_and_failed_expectations_roll_back(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    bank::setup(&test_db.db, 2).await.expect("bank schema");
    exec(
        &test_db.db,
        "CREATE TABLE texts (id BIGINT PRIMARY KEY, s TEXT)",
    )
    .await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let worker = ops_worker(&test_db, &requests, &replies, TEXT_OPS, 2).await;
    let mut nasty = vec![
        "1; DROP TABLE accounts",
        "'; DROP TABLE accounts; --",
        "a' OR '1'='1",
        "\" OR \"\"=\"",
        "/* c */ -- x",
        ":id :s ? $1",
        "ünïcødé 🚀 \\ \\' \\\"",
    ];
    if backend != Backend::Postgres {
        // PostgreSQL text cannot hold NUL at all (tested below).
        nasty.push("nul\u{0}byte");
    }
    let list = nasty
        .iter()
        .enumerate()
        .map(|(i, s)| Request::json("put", json!({"id": i, "s": s})))
        .collect();
    let got = ask_all(&client, &requests, &replies, list).await;
    for (reply, s) in got.iter().zip(&nasty) {
        assert_eq!(
            *reply,
            json!({"status": "ok", "result": {"s": s}}),
            "{backend:?}"
        );
    }
    if backend == Backend::Postgres {
        let nul = ask_all(
            &client,
            &requests,
            &replies,
            vec![Request::json("put", json!({"id": 99, "s": "a\u{0}b"}))],
        )
        .await;
        assert_eq!(
            nul[0]["status"], "failed",
            "a clear error, not a crash: {:?}",
            nul[0]
        );
    }
    // A failed expectation rejects with the step's code and undoes the earlier steps.
    let failed = ask_all(
        &client,
        &requests,
        &replies,
        vec![Request::json("then_fail", json!({"id": 500}))],
    )
    .await;
    assert_eq!(failed[0]["status"], "rejected");
    assert_eq!(failed[0]["error"]["code"], "nothing_there");
    // Missing, extra and wrongly-typed parameters are refused by name.
    let bad = ask_all(
        &client,
        &requests,
        &replies,
        vec![
            Request::json("put", json!({"id": 1})),
            Request::json("put", json!({"id": 1, "s": "x", "evil": 1})),
            Request::json("put", json!({"id": "1", "s": "x"})),
        ],
    )
    .await;
    let messages: Vec<&str> = bad
        .iter()
        .map(|b| b["error"]["message"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        messages,
        [
            "parameter `s` is missing",
            "unknown parameter `evil`",
            "parameter `id` must be integer"
        ]
    );
    assert!(
        bad.iter()
            .all(|b| b["status"] == "rejected" && b["error"]["code"] == "invalid_parameter")
    );
    worker.stop().await.expect("clean stop");

    let totals = bank::totals(&test_db.db)
        .await
        .expect("the accounts table is still there");
    assert_eq!(totals.balance_sum, 2 * bank::INITIAL_BALANCE);
    let written = {
        let mut tx = test_db.db.begin(None).await.expect("begin");
        let n: i64 = txq::with_conn!(tx, c => {
            txq::sqlx::query_scalar("SELECT COUNT(*) FROM texts").fetch_one(c).await.expect("count")
        });
        n
    };
    assert_eq!(
        written as usize,
        nasty.len(),
        "the failed operation's insert was rolled back"
    );
}

#[tokio::test]
async fn injection_attempts_are_plain_data_and_a_failed_expectation_rolls_back_on_sqlite() {
    injection_is_data_and_failed_expectations_roll_back(Backend::Sqlite).await;
}

#[tokio::test]
async fn injection_attempts_are_plain_data_and_a_failed_expectation_rolls_back_on_mariadb() {
    injection_is_data_and_failed_expectations_roll_back(Backend::MySql).await;
}

#[tokio::test]
async fn injection_attempts_are_plain_data_and_a_failed_expectation_rolls_back_on_postgres() {
    injection_is_data_and_failed_expectations_roll_back(Backend::Postgres).await;
}

/// Every account's balance, by id.
async fn balances(db: &txq::Db) -> Vec<(i64, i64)> {
    let mut tx = db.begin(None).await.expect("begin");
    let rows: Vec<(i64, i64)> = txq::with_conn!(tx, c => {
        txq::sqlx::query_as("SELECT id, balance FROM accounts ORDER BY id")
            .fetch_all(c)
            .await
            .expect("balances")
    });
    tx.commit().await.expect("commit");
    rows
}

/// The same transfers, one at a time, through the Rust handler and through the
/// operations file, on twin databases: the same replies and the same balances.
async fn ops_and_rust_transfers_agree(backend: Backend) {
    let inputs: Vec<Value> = vec![
        json!({"from": 1, "to": 2, "amount": 10}),
        json!({"from": 2, "to": 3, "amount": 99}),
        json!({"from": 3, "to": 3, "amount": 5}),
        json!({"from": 1, "to": 2, "amount": 0}),
        json!({"from": 1, "to": 77, "amount": 5}),
        json!({"from": 4, "to": 1, "amount": 2 * bank::INITIAL_BALANCE}),
        json!({"from": 5, "to": 4, "amount": 1}),
        json!({"from": 2, "to": 1, "amount": 7}),
        // Both refusals at once: the Rust handler's first answers.
        json!({"from": 2, "to": 2, "amount": -1}),
        json!({"from": 2, "to": 1, "amount": -3}),
        json!({"from": 5, "to": 1, "amount": bank::INITIAL_BALANCE - 1}),
    ];
    let mut results = Vec::new();
    for use_ops in [false, true] {
        let test_db = TestDb::new(backend).await;
        bank::setup(&test_db.db, 5).await.expect("bank schema");
        let mut client = Client::new().await;
        let requests = client.queue(&unique("requests")).await;
        let replies = client.queue(&unique("replies")).await;
        let worker = if use_ops {
            ops_worker(&test_db, &requests, &replies, BANK_OPS, 1).await
        } else {
            RunningWorker::start(
                Worker::builder(config(&test_db.url, &requests, &replies, 1))
                    .handler("transfer", bank::Transfer)
                    .database(test_db.db.clone()),
            )
            .await
        };
        let list = inputs
            .iter()
            .enumerate()
            .map(|(i, p)| Request::json("transfer", p.clone()).id(&format!("t-{i}")))
            .collect();
        let replies = ask_all_raw(&client, &requests, &replies, list).await;
        worker.stop().await.expect("clean stop");
        let totals = bank::totals(&test_db.db).await.expect("totals");
        results.push((replies, (totals, balances(&test_db.db).await)));
    }
    let (rust, ops) = (&results[0], &results[1]);
    for (i, ((r, r_bytes), (o, o_bytes))) in rust.0.iter().zip(&ops.0).enumerate() {
        assert_eq!(r["status"], o["status"], "transfer {i}: {r} vs {o}");
        if r["status"] == "ok" {
            // The same bytes: the same keys, in the same order.
            assert_eq!(
                String::from_utf8_lossy(r_bytes),
                String::from_utf8_lossy(o_bytes),
                "transfer {i}"
            );
        } else {
            assert_eq!(
                r["error"]["code"], o["error"]["code"],
                "transfer {i}: {r} vs {o}"
            );
        }
    }
    assert_eq!(rust.1, ops.1, "the same books");
    let codes: Vec<&Value> = rust.0.iter().map(|(r, _)| &r["error"]["code"]).collect();
    for code in [
        "insufficient_funds",
        "unknown_account",
        "same_account",
        "invalid_amount",
    ] {
        assert!(codes.contains(&&json!(code)), "{code}: {codes:?}");
    }
}

#[tokio::test]
async fn transfer_through_the_ops_file_matches_the_rust_handler_on_sqlite() {
    ops_and_rust_transfers_agree(Backend::Sqlite).await;
}

#[tokio::test]
async fn transfer_through_the_ops_file_matches_the_rust_handler_on_mariadb() {
    ops_and_rust_transfers_agree(Backend::MySql).await;
}

#[tokio::test]
async fn transfer_through_the_ops_file_matches_the_rust_handler_on_postgres() {
    ops_and_rust_transfers_agree(Backend::Postgres).await;
}

/// Whether a step returns rows or an affected count is what the database says of
/// the prepared statement, never a guess from its text.
const KIND_OPS: &str = r#"
[upd_column]
params = { g = "integer" }
[[upd_column.steps]]
name = "bump"
sql = "UPDATE cust SET returning_customer = returning_customer + 1 WHERE grp = :g"
expect_rows = 2

[upd_literal]
params = { g = "integer" }
[[upd_literal.steps]]
name = "note"
sql = "UPDATE cust SET note = 'returning soon', n = n + 1 WHERE grp = :g"
expect_rows = 2

[upd_comment]
params = { g = "integer" }
[[upd_comment.steps]]
name = "bump"
sql = "UPDATE cust /* nothing RETURNING here */ SET n = n + 1 -- returning\nWHERE grp = :g"
expect_rows = 2

[sel_line_comment]
params = { g = "integer" }
[[sel_line_comment.steps]]
name = "ids"
sql = "-- the ids of a group\nSELECT id FROM cust WHERE grp = :g ORDER BY id"
expect_rows = 2

[sel_block_comment]
params = { g = "integer" }
[[sel_block_comment.steps]]
name = "ids"
sql = "/* the ids of a group */ SELECT id FROM cust WHERE grp = :g ORDER BY id"
expect_rows = 2

[sel_first_empty]
params = { g = "integer" }
[[sel_first_empty.steps]]
name = "ids"
sql = "/* its first run finds no row */ SELECT id FROM cust WHERE grp = :g ORDER BY id"
expect_rows = 2

[cte_select]
params = { g = "integer" }
[[cte_select.steps]]
name = "ids"
sql = "WITH x AS (SELECT id FROM cust WHERE grp = :g) SELECT id FROM x ORDER BY id"
expect_rows = 2

[cte_select_after_comment]
params = { g = "integer" }
[[cte_select_after_comment.steps]]
name = "ids"
sql = "-- a CTE\nWITH x AS (SELECT id FROM cust WHERE grp = :g) SELECT id FROM x ORDER BY id"
expect_rows = 2

[cte_update]
params = { g = "integer" }
[[cte_update.steps]]
name = "bump"
sql = "WITH x AS (SELECT 1 AS one) UPDATE cust SET n = n + (SELECT one FROM x) WHERE grp = :g"
expect_rows = 2

[upd_returning]
params = { g = "integer" }
[[upd_returning.steps]]
name = "bump"
sql = "UPDATE cust SET n = n + 1 WHERE grp = :g RETURNING id, n"
expect_rows = 1

[per_backend]
params = { g = "integer" }
result = "ids"
[[per_backend.steps]]
name = "only_postgres"
backends = ["postgres"]
sql = "SELECT :g::int8 AS g"
expect_rows = 1
[[per_backend.steps]]
name = "only_others"
backends = ["mysql", "sqlite"]
sql = "SELECT id FROM cust WHERE grp = :g AND note <> 'postgres only'"
expect_rows = 2
[[per_backend.steps]]
name = "ids"
sql = "SELECT id FROM cust WHERE grp = :g ORDER BY id"
expect_rows = 2

[ins_returning]
params = { id = "integer" }
[[ins_returning.steps]]
name = "put"
sql = "INSERT INTO cust (id, grp, returning_customer, n, note) VALUES (:id, 3, 1, 0, 'new') RETURNING id, returning_customer"
expect_rows = 1
"#;

async fn statement_kinds(backend: Backend) {
    let test_db = TestDb::new(backend).await;
    let ddl = match backend {
        Backend::MySql => {
            "CREATE TABLE cust (id BIGINT PRIMARY KEY, grp BIGINT, returning_customer BIGINT,
            n BIGINT, note VARCHAR(100))"
        }
        Backend::Postgres => {
            "CREATE TABLE cust (id BIGINT PRIMARY KEY, grp BIGINT, returning_customer BIGINT,
            n BIGINT, note TEXT)"
        }
        Backend::Sqlite => {
            "CREATE TABLE cust (id INTEGER PRIMARY KEY, grp INTEGER, returning_customer INTEGER,
            n INTEGER, note TEXT)"
        }
    };
    exec(&test_db.db, ddl).await;
    exec(
        &test_db.db,
        "INSERT INTO cust (id, grp, returning_customer, n, note)
         VALUES (1, 1, 0, 0, ''), (2, 1, 0, 0, ''), (3, 2, 0, 0, '')",
    )
    .await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let worker = ops_worker(&test_db, &requests, &replies, KIND_OPS, 2).await;

    let count = json!({"status": "ok", "result": []});
    let ids = json!({"status": "ok", "result": [{"id": 1}, {"id": 2}]});
    let group = json!({"g": 1});
    let mut cases = vec![
        ("upd_column", group.clone(), count.clone()),
        ("upd_literal", group.clone(), count.clone()),
        ("upd_comment", group.clone(), count.clone()),
        ("sel_line_comment", group.clone(), ids.clone()),
        ("sel_block_comment", group.clone(), ids.clone()),
        // No row to tell from at the first run: the prepared statement says.
        (
            "sel_first_empty",
            json!({"g": 99}),
            json!({"status": "rejected", "error": {
                "code": "expectation_failed",
                "message": "step `ids` expected 2 row(s), got 0",
            }}),
        ),
        ("sel_first_empty", group.clone(), ids.clone()),
        ("cte_select", group.clone(), ids.clone()),
        ("cte_select_after_comment", group.clone(), ids.clone()),
        (
            "ins_returning",
            json!({"id": 10}),
            json!({"status": "ok", "result": {"id": 10, "returning_customer": 1}}),
        ),
    ];
    // MariaDB has no CTE before UPDATE, nor UPDATE … RETURNING.
    if backend != Backend::MySql {
        cases.push(("cte_update", group.clone(), count.clone()));
        cases.push((
            "upd_returning",
            json!({"g": 2}),
            json!({"status": "ok", "result": {"id": 3, "n": 1}}),
        ));
    }
    // A step runs only on the backends it lists: `::` is PostgreSQL's alone.
    cases.push(("per_backend", group.clone(), ids.clone()));
    let list = cases
        .iter()
        .map(|(op, payload, _)| Request::json(op, payload.clone()))
        .collect();
    let got = ask_all(&client, &requests, &replies, list).await;
    worker.stop().await.expect("clean stop");
    let wrong: Vec<String> = cases
        .iter()
        .zip(&got)
        .filter(|((_, _, want), got)| want != *got)
        .map(|((op, _, want), got)| format!("{op}: expected {want}, got {got}"))
        .collect();
    assert!(wrong.is_empty(), "{backend:?}:\n{}", wrong.join("\n"));
}

#[tokio::test]
async fn rows_or_a_count_is_what_the_prepared_statement_says_on_sqlite() {
    statement_kinds(Backend::Sqlite).await;
}

#[tokio::test]
async fn rows_or_a_count_is_what_the_prepared_statement_says_on_mariadb() {
    statement_kinds(Backend::MySql).await;
}

#[tokio::test]
async fn rows_or_a_count_is_what_the_prepared_statement_says_on_postgres() {
    statement_kinds(Backend::Postgres).await;
}

/// A payload that fails a parameter constraint is refused before a connection
/// is taken: no transaction, so no inbox record; a step's rejection has one.
#[tokio::test]
async fn constraints_refuse_before_a_transaction_is_taken() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    bank::setup(&test_db.db, 2).await.expect("bank schema");
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let worker = ops_worker(&test_db, &requests, &replies, BANK_OPS, 1).await;
    let got = ask_all(
        &client,
        &requests,
        &replies,
        vec![
            Request::json("transfer", json!({"from": 1, "to": 1, "amount": 5})).id("c-same"),
            Request::json("transfer", json!({"from": 1, "to": 2, "amount": 0})).id("c-zero"),
            Request::json("transfer", json!({"from": 1, "to": 77, "amount": 5})).id("c-step"),
        ],
    )
    .await;
    worker.stop().await.expect("clean stop");
    let codes: Vec<&Value> = got.iter().map(|r| &r["error"]["code"]).collect();
    assert_eq!(
        codes,
        [
            &json!("same_account"),
            &json!("invalid_amount"),
            &json!("unknown_account")
        ]
    );
    let mut tx = test_db.db.begin(None).await.expect("begin");
    let recorded: Vec<String> = txq::with_conn!(tx, c => {
        txq::sqlx::query_scalar("SELECT message_id FROM txq_inbox ORDER BY message_id")
            .fetch_all(c)
            .await
            .expect("inbox")
    });
    tx.commit().await.expect("commit");
    assert_eq!(recorded, ["c-step"]);
}
