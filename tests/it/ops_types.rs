//! Operations files and data types: every column type's JSON form, values bound
//! again with their own type (`:step.column`), exact decimals, the SQL scanner per
//! backend, SQLite's timestamps, duplicate column names, and `txq ops schema`
//! agreeing with the worker. On each backend, for real.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::{Value, json};
use txq::sqlops::OpsHandler;
use txq::{Backend, Db, Handler as _, JobMeta};

use crate::support::{TestDb, exec};

/// The handlers of an operations file, compiled for `backend`.
fn handlers(ops: &str, backend: Backend) -> BTreeMap<String, OpsHandler> {
    let ops = txq::sqlops::parse(ops).expect("a valid operations file");
    ops.operations
        .iter()
        .map(|(name, op)| {
            (
                name.clone(),
                OpsHandler::new(name, op, backend).expect("compiles"),
            )
        })
        .collect()
}

/// Runs one job of `op` in its own transaction, as the worker does: the reply's
/// `result` as JSON text (committed), or the error (rolled back).
async fn call(
    db: &Db,
    ops: &BTreeMap<String, OpsHandler>,
    op: &str,
    payload: &str,
) -> Result<String, String> {
    let payload: Box<RawValue> = serde_json::from_str(payload).expect("payload JSON");
    let mut tx = db.begin(None).await.expect("begin");
    let meta = JobMeta {
        message_id: Some("m-1".into()),
        delivery_attempt: 1,
        ..JobMeta::default()
    };
    match ops[op].handle(&mut tx, payload, &meta).await {
        Ok(out) => {
            tx.commit().await.expect("commit");
            Ok(out.get().to_owned())
        }
        Err(e) => {
            tx.rollback().await.expect("rollback");
            Err(e.to_string())
        }
    }
}

async fn call_json(db: &Db, ops: &BTreeMap<String, OpsHandler>, op: &str, payload: &str) -> Value {
    let text = call(db, ops, op, payload)
        .await
        .unwrap_or_else(|e| panic!("{op}: {e}"));
    serde_json::from_str(&text).expect("JSON")
}

/// Compares an object column by column, naming every column that differs.
fn assert_columns(backend: Backend, got: &Value, want: &Value) {
    let (Some(got), Some(want)) = (got.as_object(), want.as_object()) else {
        panic!("{backend:?}: {got} vs {want}");
    };
    let mut wrong = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            Some(g) if g == w => {}
            g => wrong.push(format!(
                "  {k}: expected {w}, got {}",
                g.unwrap_or(&json!("—"))
            )),
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        wrong.push(format!("  {k}: not expected, got {}", got[k]));
    }
    assert!(wrong.is_empty(), "{backend:?}:\n{}", wrong.join("\n"));
}

/// An operations file that reads row `id` of `types_src`, copies it into
/// `types_dst` through `:src.<column>` references (each bound again with its own
/// type), and reads the copy back.
fn copy_ops(columns: &[&str], json_columns: &[&str]) -> String {
    let list = columns.join(", ");
    let refs: Vec<String> = columns.iter().map(|c| format!(":src.{c}")).collect();
    let json = serde_json::to_string(json_columns).expect("json");
    format!(
        r#"
[read]
params = {{ id = "integer" }}
[[read.steps]]
name = "src"
sql = "SELECT {list} FROM types_src WHERE id = :id"
expect_rows = 1
json_columns = {json}

[copy]
params = {{ id = "integer" }}
result = {{ src = "src", dst = "dst" }}
[[copy.steps]]
name = "src"
sql = "SELECT {list} FROM types_src WHERE id = :id"
expect_rows = 1
json_columns = {json}
[[copy.steps]]
name = "put"
sql = "INSERT INTO types_dst (id, {list}) VALUES (:id, {refs})"
expect_rows = 1
[[copy.steps]]
name = "dst"
sql = "SELECT {list} FROM types_dst WHERE id = :id"
expect_rows = 1
json_columns = {json}
"#,
        refs = refs.join(", ")
    )
}

/// Each column's JSON form (row 1), NULL (row 2), and a copy of both rows through
/// `:src.<column>` that reads back the same.
async fn column_types(backend: Backend, ddl: &[&str], rows: &[&str], want: Value, json: &[&str]) {
    let test_db = TestDb::new(backend).await;
    for sql in ddl.iter().chain(rows) {
        exec(&test_db.db, sql).await;
    }
    let columns: Vec<&str> = want
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    let ops = handlers(&copy_ops(&columns, json), backend);
    let got = call_json(&test_db.db, &ops, "read", r#"{"id": 1}"#).await;
    assert_columns(backend, &got, &want);
    let nulls = call_json(&test_db.db, &ops, "read", r#"{"id": 2}"#).await;
    let all_null: serde_json::Map<String, Value> = columns
        .iter()
        .map(|c| ((*c).to_owned(), Value::Null))
        .collect();
    assert_columns(backend, &nulls, &Value::Object(all_null));
    for id in [1, 2] {
        let copy = call_json(&test_db.db, &ops, "copy", &format!(r#"{{"id": {id}}}"#)).await;
        assert_columns(backend, &copy["dst"], &copy["src"]);
    }
}

#[tokio::test]
async fn postgres_column_types_map_to_json_and_bind_again_as_themselves() {
    let cols = "b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, f8nan float8,
        n numeric(30,10), n_free numeric, n_big numeric, n_neg numeric, n_nan numeric,
        m money, m_neg money, t text, vc varchar(10), c char(3), nm name, ch \"char\",
        byt bytea, u uuid, j json, jb jsonb, jb_big jsonb,
        d date, d_inf date, tm time, tm_end time, tm_frac time, ttz timetz,
        ts timestamp, tstz timestamptz, tstz_inf timestamptz,
        iv interval, iv_neg interval, iv_zero interval,
        ip inet, ip_net inet, ip6 inet, net cidr, mac macaddr, mac8 macaddr8,
        bits bit(4), vbits varbit(8), e mood, dom posint,
        ai int[], at text[], a2 int[][], a_empty int[], a_enum mood[], a_num numeric[],
        a_uuid uuid[], r int4range, r_date daterange, r_empty int4range, x xml, o oid";
    let src = format!("CREATE TABLE types_src (id int PRIMARY KEY, {cols})");
    let dst = format!("CREATE TABLE types_dst (id int PRIMARY KEY, {cols})");
    let row = r#"INSERT INTO types_src VALUES (1, true, -32768, 2147483647, -9223372036854775808,
        1.1, 1.5e300, 'NaN', 12.5, 12.50, 123456789012345678901234567890.000000000000000000001,
        -0.0000001000, 'NaN', 12.34, -1.05, 'héllo', 'abc', 'ab', 'nm', 'x',
        '\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1, "a": [1.0]}',
        '{"a": "x"}', '{"n": 12345678901234567890123456789}',
        '2024-02-29', 'infinity', '07:08:09', '24:00:00', '07:08:09.5', '07:08:09+05:30',
        '2024-05-06 07:08:09.123456', '2024-05-06 09:08:09+02', '-infinity',
        '1 year 2 mons 3 days 04:05:06.5', '-1 year -2 mons +3 days -04:05:06.25', '0',
        '192.168.1.5', '192.168.1.5/24', '::ffff:1.2.3.4', '10.0.0.0/8', '08:00:2b:01:02:03',
        '08:00:2b:01:02:03:04:05', B'1010', B'101', 'happy', 5,
        '{1,2,3}', '{"a","b c",NULL}', '{{1,2},{3,4}}', '{}', '{sad,happy}', '{1.50,2}',
        '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', '[1,5)', '[2024-01-01,)', 'empty',
        '<a>1</a>', 12345)"#;
    let want = serde_json::from_str::<Value>(
        r#"{
        "b": true, "i2": -32768, "i4": 2147483647, "i8": -9223372036854775808,
        "f4": 1.1, "f8": 1.5e300, "f8nan": "NaN",
        "n": "12.5000000000", "n_free": "12.50",
        "n_big": "123456789012345678901234567890.000000000000000000001",
        "n_neg": "-0.0000001000", "n_nan": "NaN",
        "m": "12.34", "m_neg": "-1.05",
        "t": "héllo", "vc": "abc", "c": "ab ", "nm": "nm", "ch": "x",
        "byt": "AP8Q", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": {"b": 1, "a": [1.0]}, "jb": {"a": "x"},
        "jb_big": {"n": 12345678901234567890123456789},
        "d": "2024-02-29", "d_inf": "infinity",
        "tm": "07:08:09", "tm_end": "24:00:00", "tm_frac": "07:08:09.500",
        "ttz": "07:08:09+05:30",
        "ts": "2024-05-06T07:08:09.123456Z", "tstz": "2024-05-06T07:08:09Z",
        "tstz_inf": "-infinity",
        "iv": "P1Y2M3DT4H5M6.5S", "iv_neg": "P-1Y-2M3DT-4H-5M-6.25S", "iv_zero": "PT0S",
        "ip": "192.168.1.5", "ip_net": "192.168.1.5/24", "ip6": "::ffff:1.2.3.4",
        "net": "10.0.0.0/8", "mac": "08:00:2b:01:02:03", "mac8": "08:00:2b:01:02:03:04:05",
        "bits": "1010", "vbits": "101", "e": "happy", "dom": 5,
        "ai": [1, 2, 3], "at": ["a", "b c", null], "a2": [[1, 2], [3, 4]], "a_empty": [],
        "a_enum": ["sad", "happy"], "a_num": ["1.50", "2"],
        "a_uuid": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
        "r": {"lower": 1, "upper": 5, "bounds": "[)"},
        "r_date": {"lower": "2024-01-01", "upper": null, "bounds": "[)"},
        "r_empty": {"empty": true},
        "x": "<a>1</a>", "o": 12345
    }"#,
    )
    .expect("JSON");
    column_types(
        Backend::Postgres,
        &[
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
            "CREATE DOMAIN posint AS integer CHECK (VALUE > 0)",
            &src,
            &dst,
        ],
        &[row, "INSERT INTO types_src (id) VALUES (2)"],
        want,
        &[],
    )
    .await;
}

#[tokio::test]
async fn mariadb_column_types_map_to_json_and_bind_again_as_themselves() {
    let cols = "bo BOOLEAN, ti TINYINT, si SMALLINT, mi MEDIUMINT, i INT, bi BIGINT,
        tiu TINYINT UNSIGNED, iu INT UNSIGNED, bu BIGINT UNSIGNED, f FLOAT, d DOUBLE,
        de DECIMAL(30,10), de0 DECIMAL(5,0), de_big DECIMAL(65,30),
        ch CHAR(3), vc VARCHAR(20), tx TEXT, lt LONGTEXT, en ENUM('a','b'), st SET('x','y'),
        bin BINARY(3), vb VARBINARY(10), bl BLOB, j JSON, j_big JSON,
        dt DATE, tm TIME(6), tm_neg TIME, dtt DATETIME(6), tsp TIMESTAMP(6) NULL, yr YEAR,
        bt BIT(10), uu UUID, ip INET6, vbin VARCHAR(10) COLLATE utf8mb4_bin, g POINT";
    let src = format!("CREATE TABLE types_src (id INT PRIMARY KEY, {cols})");
    let dst = format!("CREATE TABLE types_dst (id INT PRIMARY KEY, {cols})");
    let row = r#"INSERT INTO types_src VALUES (1, 1, -128, -32768, -8388608, -2147483648,
        -9223372036854775808, 255, 4294967295, 18446744073709551615, 1.1, 1.5e300,
        0.0000001000, 12345, 12345678901234567890123456789012345.000000000000000000000000000001,
        'ab', 'héllo', 'text', 'long text', 'b', 'x,y',
        x'000102', x'00ff10', x'ff', '{"a": [1, 2.5]}', '{"n": 12345678901234567890123456789}',
        '2024-02-29', '07:08:09.5', '-838:59:59', '2024-05-06 07:08:09.123456',
        '2024-05-06 07:08:09.5', 2024, b'1000000001',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2001:db8::1', 'text_bin',
        ST_GeomFromText('POINT(1 2)'))"#;
    let want = serde_json::from_str::<Value>(
        r#"{
        "bo": true, "ti": -128, "si": -32768, "mi": -8388608, "i": -2147483648,
        "bi": -9223372036854775808, "tiu": 255, "iu": 4294967295, "bu": 18446744073709551615,
        "f": 1.1, "d": 1.5e300,
        "de": "0.0000001000", "de0": "12345",
        "de_big": "12345678901234567890123456789012345.000000000000000000000000000001",
        "ch": "ab", "vc": "héllo", "tx": "text", "lt": "long text", "en": "b", "st": "x,y",
        "bin": "AAEC", "vb": "AP8Q", "bl": "/w==",
        "j": {"a": [1, 2.5]}, "j_big": {"n": 12345678901234567890123456789},
        "dt": "2024-02-29", "tm": "07:08:09.500", "tm_neg": "-838:59:59",
        "dtt": "2024-05-06T07:08:09.123456Z", "tsp": "2024-05-06T07:08:09.500Z",
        "yr": 2024, "bt": 513,
        "uu": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "ip": "2001:db8::1", "vbin": "text_bin",
        "g": "AAAAAAEBAAAAAAAAAAAA8D8AAAAAAAAAQA=="
    }"#,
    )
    .expect("JSON");
    column_types(
        Backend::MySql,
        &[&src, &dst],
        &[row, "INSERT INTO types_src (id) VALUES (2)"],
        want,
        &["j", "j_big"],
    )
    .await;
}

#[tokio::test]
async fn sqlite_column_types_map_to_json_and_bind_again_as_themselves() {
    let cols = "i INTEGER, big INTEGER, r REAL, r_inf REAL, tx TEXT, bl BLOB, bo BOOLEAN,
        bo0 BOOLEAN, j JSON, j_big JSON, j_text TEXT, dt DATE, dtt DATETIME, ts TIMESTAMP, dec TEXT,
        num NUMERIC, anything";
    let src = format!("CREATE TABLE types_src (id INTEGER PRIMARY KEY, {cols})");
    let dst = format!("CREATE TABLE types_dst (id INTEGER PRIMARY KEY, {cols})");
    let row = r#"INSERT INTO types_src VALUES (1, 42, 9223372036854775807, 1.5, 1e999,
        'héllo', x'00ff10', 1, 0, '{"a": [1, 2.5]}', '{"n": 12345678901234567890123456789}',
        '[true]', '2024-02-29', '2024-05-06 07:08:09.123', '2024-05-06T09:08:09+02:00',
        '0.0000001000', 12.5, 'any')"#;
    let want = json!({
        "i": 42, "big": i64::MAX, "r": 1.5, "r_inf": "Infinity", "tx": "héllo",
        "bl": "AP8Q", "bo": true, "bo0": false,
        "j": {"a": [1, 2.5]}, "j_big": {"n": 12345678901234567890123456789_f64},
        "j_text": [true], "dt": "2024-02-29", "dtt": "2024-05-06T07:08:09.123Z", "ts": "2024-05-06T07:08:09Z",
        "dec": "0.0000001000", "num": 12.5, "anything": "any",
    });
    column_types(
        Backend::Sqlite,
        &[&src, &dst],
        &[row, "INSERT INTO types_src (id) VALUES (2)"],
        want,
        // A column declared JSON needs nothing; a TEXT one is listed.
        &["j_text"],
    )
    .await;
}

/// JSON columns keep every digit of their numbers, which a float cannot.
#[tokio::test]
async fn json_columns_keep_every_digit_on_every_backend() {
    for backend in [Backend::Sqlite, Backend::MySql, Backend::Postgres] {
        let test_db = TestDb::new(backend).await;
        let ty = match backend {
            Backend::Postgres => "JSONB",
            _ => "JSON",
        };
        exec(
            &test_db.db,
            &format!("CREATE TABLE js (id INT PRIMARY KEY, j {ty})"),
        )
        .await;
        let ops = handlers(
            r#"
[put]
params = { j = "json" }
[[put.steps]]
name = "put"
sql = "INSERT INTO js (id, j) VALUES (1, :j)"
[[put.steps]]
name = "back"
sql = "SELECT j FROM js WHERE id = 1"
expect_rows = 1
json_columns = ["j"]
"#,
            backend,
        );
        let got = call(
            &test_db.db,
            &ops,
            "put",
            r#"{"j": {"n": 12345678901234567890123456789, "d": 0.1000000000000000000001}}"#,
        )
        .await
        .expect("ok");
        assert!(
            got.contains("12345678901234567890123456789")
                && got.contains("0.1000000000000000000001"),
            "{backend:?}: {got}"
        );
    }
}

/// Values a later step binds (`:step.column`) keep their type: bytes stay bytes,
/// unsigned 64-bit integers stay exact, decimals, timestamps and UUIDs are not
/// text to PostgreSQL.
#[tokio::test]
async fn step_references_bind_the_value_the_database_gave() {
    for backend in [Backend::Sqlite, Backend::MySql, Backend::Postgres] {
        let test_db = TestDb::new(backend).await;
        let (cols, row) = match backend {
            Backend::MySql => (
                "byt VARBINARY(8), big BIGINT UNSIGNED, amt DECIMAL(20,10), ts DATETIME(6)",
                "x'00ff10', 18446744073709551615, 0.0000001000, '2024-05-06 07:08:09.5'",
            ),
            Backend::Postgres => (
                "byt BYTEA, big BIGINT, amt NUMERIC(20,10), ts TIMESTAMPTZ",
                "'\\x00ff10', 9223372036854775807, 0.0000001000, '2024-05-06 07:08:09.5+00'",
            ),
            Backend::Sqlite => (
                "byt BLOB, big INTEGER, amt TEXT, ts DATETIME",
                "x'00ff10', 9223372036854775807, '0.0000001000', '2024-05-06 07:08:09.500'",
            ),
        };
        exec(
            &test_db.db,
            &format!("CREATE TABLE a (id INT PRIMARY KEY, {cols})"),
        )
        .await;
        exec(
            &test_db.db,
            &format!("CREATE TABLE b (id INT PRIMARY KEY, {cols})"),
        )
        .await;
        exec(&test_db.db, &format!("INSERT INTO a VALUES (1, {row})")).await;
        let ops = handlers(
            r#"
[copy]
[[copy.steps]]
name = "src"
sql = "SELECT byt, big, amt, ts FROM a WHERE id = 1"
expect_rows = 1
[[copy.steps]]
name = "put"
sql = "INSERT INTO b (id, byt, big, amt, ts) VALUES (1, :src.byt, :src.big, :src.amt, :src.ts)"
expect_rows = 1
[[copy.steps]]
name = "same"
sql = "SELECT a.id FROM a JOIN b ON a.byt = b.byt AND a.big = b.big AND a.amt = b.amt AND a.ts = b.ts"
expect_rows = 1
error_code = "copy_differs"
[[copy.steps]]
name = "where"
sql = "SELECT id FROM a WHERE byt = :src.byt AND big = :src.big AND amt = :src.amt AND ts = :src.ts"
expect_rows = 1
error_code = "lookup_differs"
"#,
            backend,
        );
        let got = call(&test_db.db, &ops, "copy", "{}").await;
        assert_eq!(got, Ok(r#"{"id":1}"#.to_owned()), "{backend:?}");
    }
}

const DECIMAL_OPS: &str = r#"
[put]
params = { id = "integer", d = "decimal" }
result = "back"
[[put.steps]]
name = "put"
sql = "INSERT INTO decs (id, d, free) VALUES (:id, :d, :d)"
expect_rows = 1
[[put.steps]]
name = "back"
sql = "SELECT d, free FROM decs WHERE id = :id"
expect_rows = 1
"#;

/// Decimals are exact whether they come as a JSON string or number, and come back
/// in plain notation with their scale.
#[tokio::test]
async fn decimals_are_exact_and_plain_from_strings_and_numbers() {
    for backend in [Backend::Sqlite, Backend::MySql, Backend::Postgres] {
        let test_db = TestDb::new(backend).await;
        let ddl = match backend {
            Backend::MySql => {
                "CREATE TABLE decs (id INT PRIMARY KEY, d DECIMAL(30,10), free DECIMAL(65,20))"
            }
            Backend::Postgres => {
                "CREATE TABLE decs (id INT PRIMARY KEY, d NUMERIC(30,10), free NUMERIC)"
            }
            Backend::Sqlite => "CREATE TABLE decs (id INTEGER PRIMARY KEY, d TEXT, free TEXT)",
        };
        exec(&test_db.db, ddl).await;
        let ops = handlers(DECIMAL_OPS, backend);
        // (payload d, column d, column free) per backend
        let cases: Vec<(&str, &str, &str)> = vec![
            (
                "1234567890.123456789",
                "1234567890.1234567890",
                "1234567890.123456789",
            ),
            (r#""0.0000001000""#, "0.0000001000", "0.0000001000"),
            ("0.0000001000", "0.0000001000", "0.0000001000"),
            ("1e5", "100000.0000000000", "100000"),
            (r#""-1.5E-3""#, "-0.0015000000", "-0.0015"),
            ("12.50", "12.5000000000", "12.50"),
        ];
        for (i, (d, col, free)) in cases.into_iter().enumerate() {
            let got = call_json(
                &test_db.db,
                &ops,
                "put",
                &format!(r#"{{"id": {i}, "d": {d}}}"#),
            )
            .await;
            // SQLite keeps the text as written in plain notation; MariaDB pads the
            // free column to its declared scale of 20.
            let want_col = if backend == Backend::Sqlite {
                free
            } else {
                col
            };
            let want_free = match backend {
                Backend::MySql => {
                    let (int, frac) = free.split_once('.').unwrap_or((free, ""));
                    format!("{int}.{frac:0<20}")
                }
                _ => free.to_owned(),
            };
            assert_eq!(
                got,
                json!({"d": want_col, "free": want_free}),
                "{backend:?}: {d}"
            );
        }
        // An expression with no column: MariaDB's and PostgreSQL's own scale.
        let ops = handlers(
            r#"
[calc]
[[calc.steps]]
name = "c"
sql = "SELECT CAST(0.0000001 AS DECIMAL(20,10)) AS tiny"
sql_sqlite = "SELECT '0.0000001000' AS tiny"
expect_rows = 1
"#,
            backend,
        );
        let got = call_json(&test_db.db, &ops, "calc", "{}").await;
        assert_eq!(got, json!({"tiny": "0.0000001000"}), "{backend:?}");
    }
}

/// Two result columns of one name are a permanent failure naming the step and
/// the column, not one silently lost.
#[tokio::test]
async fn duplicate_column_names_fail_naming_the_step_and_column() {
    for backend in [Backend::Sqlite, Backend::MySql, Backend::Postgres] {
        let test_db = TestDb::new(backend).await;
        exec(&test_db.db, "CREATE TABLE pa (id INT PRIMARY KEY)").await;
        exec(&test_db.db, "CREATE TABLE pb (id INT PRIMARY KEY)").await;
        exec(&test_db.db, "INSERT INTO pa VALUES (1)").await;
        exec(&test_db.db, "INSERT INTO pb VALUES (2)").await;
        let ops = handlers(
            r#"
[both]
[[both.steps]]
name = "pair"
sql = "SELECT pa.id AS id, pb.id AS id FROM pa, pb"
[distinct]
[[distinct.steps]]
name = "pair"
sql = "SELECT pa.id AS a, pb.id AS b FROM pa, pb"
"#,
            backend,
        );
        let e = call(&test_db.db, &ops, "both", "{}").await.unwrap_err();
        assert_eq!(
            e, "step `pair` returns two columns named `id`: give them distinct names (AS …)",
            "{backend:?}"
        );
        let ok = call(&test_db.db, &ops, "distinct", "{}").await;
        assert_eq!(ok, Ok(r#"[{"a":1,"b":2}]"#.to_owned()), "{backend:?}");
    }
}

/// Each backend's SQL is scanned as that backend reads it.
#[tokio::test]
async fn the_scanner_reads_sql_as_each_backend_does() {
    let pg = r#"
[t]
params = { x = "integer" }
[[t.steps]]
name = "s"
sql = "SELECT 1"
sql_postgres = "SELECT $$:not_a_param$$ AS d, $q$ it's :no $q$ AS q, (ARRAY[10,20,30,40])[lo:hi] AS s, 'back\\' AS b, E'it\\'s' AS e, :x AS x FROM (SELECT 2 AS lo, 3 AS hi) AS r"
expect_rows = 1
"#;
    let test_db = TestDb::new(Backend::Postgres).await;
    let got = call_json(
        &test_db.db,
        &handlers(pg, Backend::Postgres),
        "t",
        r#"{"x": 5}"#,
    )
    .await;
    assert_eq!(
        got,
        json!({"d": ":not_a_param", "q": " it's :no ", "s": [20, 30], "b": "back\\", "e": "it's", "x": 5})
    );

    let my = r#"
[t]
params = { x = "integer" }
[[t.steps]]
name = "s"
sql = "SELECT 1"
sql_mysql = "SELECT 'it\\'s :no' AS a, \"dq \\\" :no\" AS b, :x AS x # :no"
expect_rows = 1
"#;
    let test_db = TestDb::new(Backend::MySql).await;
    let got = call_json(
        &test_db.db,
        &handlers(my, Backend::MySql),
        "t",
        r#"{"x": 5}"#,
    )
    .await;
    assert_eq!(got, json!({"a": "it's :no", "b": "dq \" :no", "x": 5}));

    let lite = r#"
[t]
params = { x = "integer" }
[[t.steps]]
name = "s"
sql = "SELECT 1"
sql_sqlite = "SELECT 'back\\' AS b, :x AS [odd:name]"
expect_rows = 1
"#;
    let test_db = TestDb::new(Backend::Sqlite).await;
    let got = call_json(
        &test_db.db,
        &handlers(lite, Backend::Sqlite),
        "t",
        r#"{"x": 5}"#,
    )
    .await;
    assert_eq!(got, json!({"b": "back\\", "odd:name": 5}));
}

/// On SQLite `:$now` and timestamp parameters are SQLite's own text,
/// `YYYY-MM-DD HH:MM:SS[.SSS]` in UTC, so they compare with `CURRENT_TIMESTAMP`
/// and `datetime()`.
#[tokio::test]
async fn sqlite_timestamps_compare_with_sqlites_own() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    exec(
        &test_db.db,
        "CREATE TABLE ev (id INTEGER PRIMARY KEY, at DATETIME, created DATETIME DEFAULT CURRENT_TIMESTAMP)",
    )
    .await;
    let ops = handlers(
        r#"
[now]
result = "cmp"
[[now.steps]]
name = "put"
sql = "INSERT INTO ev (id, at) VALUES (1, :$now)"
[[now.steps]]
name = "cmp"
sql = """SELECT :$now >= datetime('now', '-1 minute') AS after,
    :$now <= datetime('now', '+1 minute') AS before,
    :$now >= created AS not_before_created,
    substr(:$now, 11, 1) = ' ' AS spaced,
    at = :$now AS stored_same
    FROM ev WHERE id = 1"""
expect_rows = 1

[at]
params = { ts = "timestamp" }
result = "cmp"
[[at.steps]]
name = "put"
sql = "INSERT INTO ev (id, at) VALUES (2, :ts)"
[[at.steps]]
name = "cmp"
sql = """SELECT at, at = '2024-05-06 07:08:09' AS same, at < '2024-05-06 07:08:10' AS earlier,
    at > datetime('2024-05-06 07:08:08') AS later FROM ev WHERE id = 2"""
expect_rows = 1
"#,
        Backend::Sqlite,
    );
    let got = call_json(&test_db.db, &ops, "now", "{}").await;
    assert_eq!(
        got,
        json!({"after": 1, "before": 1, "not_before_created": 1, "spaced": 1, "stored_same": 1})
    );
    let got = call_json(
        &test_db.db,
        &ops,
        "at",
        r#"{"ts": "2024-05-06T09:08:09+02:00"}"#,
    )
    .await;
    assert_eq!(
        got,
        json!({"at": "2024-05-06T07:08:09Z", "same": 1, "earlier": 1, "later": 1})
    );
}

/// A PostgreSQL type with no JSON form fails the job with a message that says
/// what to do, instead of garbage.
#[tokio::test]
async fn an_unmapped_postgres_type_fails_with_a_cast_hint() {
    let test_db = TestDb::new(Backend::Postgres).await;
    let ops = handlers(
        "[p]\n[[p.steps]]\nname = \"s\"\nsql = \"SELECT point(1, 2) AS p\"\n",
        Backend::Postgres,
    );
    let e = call(&test_db.db, &ops, "p", "{}").await.unwrap_err();
    assert_eq!(
        e,
        "step `s`, column `p`: PostgreSQL type `point` has no JSON form in txq; cast it in the SQL (`::text`)"
    );
}

const SCHEMA_OPS: &str = r#"
[all]
params = { i = "integer", f = "float", d = "decimal", s = "string", b = "bool", j = "json", ts = "timestamp", dt = "date", by = "bytes", n = { type = "integer", nullable = true }, nj = { type = "json", nullable = true }, def = { type = "decimal", default = "1.50" } }
[[all.steps]]
name = "s"
sql = "SELECT :i, :f, :d, :s, :b, :j, :ts, :dt, :by, :n, :nj, :def"
"#;

/// `txq ops schema` says exactly what the worker accepts: for every payload of a
/// corpus, a JSON Schema validator and the worker's own checks agree.
#[test]
fn the_payload_schema_agrees_with_the_worker() {
    let ops = txq::sqlops::parse(SCHEMA_OPS).expect("valid");
    let schema = txq::sqlops::schemas(&ops.operations)["all"]["payload"].clone();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("a valid schema");
    let handler =
        OpsHandler::new("all", &ops.operations["all"], Backend::Sqlite).expect("compiles");
    let base = json!({
        "i": 1, "f": 1.5, "d": "12.50", "s": "x", "b": true, "j": {"a": 1},
        "ts": "2024-05-06T07:08:09Z", "dt": "2024-05-06", "by": "AAEC",
    });
    // One key replaced (or removed, for None) per case, as JSON text.
    let variations: &[(&str, Option<&str>)] = &[
        ("i", Some("0")),
        ("i", Some("-0")),
        ("i", Some("1.0")),
        ("i", Some("1e2")),
        ("i", Some("1.5e1")),
        ("i", Some("1.5")),
        ("i", Some("1e-1")),
        ("i", Some("9223372036854775807")),
        ("i", Some("-9223372036854775808")),
        ("i", Some("9223372036854775808")),
        // (Not -9223372036854775809: a validator that reads it as a 64-bit float
        // sees -9223372036854775808, in range; the worker reads it exactly.)
        ("i", Some("1e19")),
        ("i", Some("\"1\"")),
        ("i", Some("true")),
        ("i", Some("null")),
        ("i", None),
        ("f", Some("0")),
        ("f", Some("-1e300")),
        ("f", Some("1e-320")),
        ("f", Some("\"1.5\"")),
        ("f", Some("null")),
        ("d", Some("1e5")),
        ("d", Some("\"1e5\"")),
        ("d", Some("\"1E+5\"")),
        ("d", Some("\"-0.0000001000\"")),
        ("d", Some("1234567890.123456789")),
        ("d", Some("\"007.50\"")),
        ("d", Some("\"1e\"")),
        ("d", Some("\"1e000000000000000000001\"")),
        ("d", Some("\"1e999999999999999999\"")),
        ("d", Some("\"1e9999999999999999999\"")),
        ("d", Some("\"0e9999999999999999999\"")),
        ("d", Some("\"-0\"")),
        ("d", Some("\".5\"")),
        ("d", Some("\"5.\"")),
        ("d", Some("\"+1\"")),
        ("d", Some("\" 1\"")),
        ("d", Some("\"1 \"")),
        ("d", Some("\"1,5\"")),
        ("d", Some("\"NaN\"")),
        ("d", Some("\"0x10\"")),
        ("d", Some("\"\"")),
        ("d", Some("true")),
        ("d", Some("[1]")),
        ("s", Some("\"\"")),
        ("s", Some("\"héllo\\u0000\"")),
        ("s", Some("1")),
        ("b", Some("false")),
        ("b", Some("0")),
        ("b", Some("\"true\"")),
        ("j", Some("null")),
        ("j", Some("0")),
        ("j", Some("\"x\"")),
        ("j", Some("[]")),
        ("ts", Some("\"2024-05-06T07:08:09.123456+02:00\"")),
        ("ts", Some("\"2024-05-06t07:08:09z\"")),
        ("ts", Some("\"2024-05-06 07:08:09Z\"")),
        ("ts", Some("\"2024-05-06T07:08:09\"")),
        ("ts", Some("\"2024-02-30T07:08:09Z\"")),
        ("ts", Some("\"2024-05-06T24:00:00Z\"")),
        ("ts", Some("\"2024-05-06T07:60:00Z\"")),
        ("ts", Some("\"2024-05-06T07:08:09+24:00\"")),
        ("ts", Some("\"2024-05-06T07:08:09.Z\"")),
        ("ts", Some("\"2024-5-06T07:08:09Z\"")),
        ("ts", Some("\"+2024-05-06T07:08:09Z\"")),
        ("ts", Some("1715000000")),
        ("ts", Some("\"2016-12-31T23:59:60Z\"")),
        ("dt", Some("\"2024-02-29\"")),
        ("dt", Some("\"2023-02-29\"")),
        ("dt", Some("\"2024-13-01\"")),
        ("dt", Some("\"2024-1-01\"")),
        ("dt", Some("\"20240101\"")),
        ("dt", Some("\"2024-05-06T00:00:00Z\"")),
        ("by", Some("\"\"")),
        ("by", Some("\"AA==\"")),
        ("by", Some("\"AAE=\"")),
        ("by", Some("\"AB==\"")),
        ("by", Some("\"AA\"")),
        ("by", Some("\"AA=\"")),
        ("by", Some("\"A===\"")),
        ("by", Some("\"AA-_\"")),
        ("by", Some("\"AAEC\\n\"")),
        ("by", Some("\"////\"")),
        ("n", Some("null")),
        ("n", Some("5")),
        ("n", Some("\"5\"")),
        ("nj", Some("null")),
        ("nj", Some("{}")),
        ("def", Some("1")),
        ("def", Some("null")),
        ("extra", Some("1")),
    ];
    let mut disagree = Vec::new();
    let mut cases: Vec<String> = vec![
        base.to_string(),
        "[]".into(),
        "\"x\"".into(),
        "null".into(),
        "{}".into(),
    ];
    for (key, text) in variations {
        let mut payload = base.as_object().expect("object").clone();
        match text {
            Some(t) => {
                payload.insert((*key).to_owned(), Value::Null);
                let raw = serde_json::to_string(&payload).expect("json");
                // Put the text in as written (no re-encoding of numbers).
                let needle = format!("\"{key}\":null");
                cases.push(raw.replacen(&needle, &format!("\"{key}\":{t}"), 1));
            }
            None => {
                payload.remove(*key);
                cases.push(serde_json::to_string(&payload).expect("json"));
            }
        }
    }
    let mut accepted = 0;
    for case in &cases {
        let value: Value = serde_json::from_str(case).expect("the corpus is JSON");
        let schema_says = validator.is_valid(&value);
        let worker_says = handler.check_payload(case);
        if worker_says.is_ok() {
            accepted += 1;
        }
        if schema_says != worker_says.is_ok() {
            disagree.push(format!(
                "{case}\n    schema: {}, worker: {worker_says:?}",
                if schema_says { "valid" } else { "invalid" }
            ));
        }
    }
    assert!(
        disagree.is_empty(),
        "they disagree on:\n{}",
        disagree.join("\n")
    );
    assert!(
        accepted > 20 && accepted < cases.len() - 20,
        "{accepted} of {}",
        cases.len()
    );
}

const CONSTRAINED_OPS: &str = r#"
[c]
[c.params]
lo = { type = "integer", minimum = -5, exclusiveMaximum = 10 }
f = { type = "float", exclusiveMinimum = 0, maximum = 2.5 }
d = { type = "decimal", minimum = "0.01", exclusive_maximum = 100 }
cur = { type = "string", enum = ["usd", "eur"], error_code = "bad_currency" }
ei = { type = "integer", enum = [1, 2, 3] }
code = { type = "string", minLength = 2, maxLength = 4 }
word = { type = "string", pattern = "^[a-z]+[0-9]?$" }
some = { type = "string", pattern = "x" }
n = { type = "integer", nullable = true, minimum = 1 }
dflt = { type = "integer", default = 5, maximum = 5 }
a = "integer"
b = { type = "integer", not_equal = "a", error_code = "same" }
[[c.steps]]
name = "s"
sql = "SELECT :lo, :f, :d, :cur, :ei, :code, :word, :some, :n, :dflt, :a, :b"
"#;

/// `x-not-equal`, as the README tells a producer to check it: when both values
/// are there and not null, they must differ (numbers by value).
fn not_equal_holds(schema: &Value, payload: &Value) -> bool {
    let Some(props) = schema["properties"].as_object() else {
        return true;
    };
    props.iter().all(|(name, p)| {
        let Some(other) = p["x-not-equal"].as_str() else {
            return true;
        };
        match (payload.get(name), payload.get(other)) {
            (Some(x), Some(y)) if !x.is_null() && !y.is_null() => match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x != y,
                _ => x != y,
            },
            _ => true,
        }
    })
}

/// With constraints, too, the schema (with its one extension keyword,
/// `x-not-equal`) accepts what the worker accepts; the one thing JSON Schema
/// cannot say, a bound on a decimal written as a string, is listed.
#[test]
fn constrained_parameters_agree_between_the_schema_and_the_worker() {
    let ops = txq::sqlops::parse(CONSTRAINED_OPS).expect("valid");
    let schema = txq::sqlops::schemas(&ops.operations)["c"]["payload"].clone();
    let props = &schema["properties"];
    assert_eq!(props["b"]["x-not-equal"], "a");
    assert_eq!(props["cur"]["x-error-code"], "bad_currency");
    assert_eq!(props["lo"]["minimum"], -5);
    assert_eq!(props["d"]["minimum"], 0.01);
    assert_eq!(props["word"]["pattern"], "^[a-z]+[0-9]?$");
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("a valid schema");
    let handler = OpsHandler::new("c", &ops.operations["c"], Backend::Sqlite).expect("compiles");
    let base = json!({
        "lo": 0, "f": 1.0, "d": "1.00", "cur": "usd", "ei": 2, "code": "abc",
        "word": "abc1", "some": "axb", "a": 1, "b": 2,
    });
    let variations: &[(&str, &str)] = &[
        ("lo", "-5"),
        ("lo", "-6"),
        ("lo", "9"),
        ("lo", "9.0"),
        ("lo", "10"),
        ("lo", "1e1"),
        ("f", "0"),
        ("f", "1e-320"),
        ("f", "2.5"),
        ("f", "2.5000000001"),
        ("f", "-1"),
        ("d", "0.01"),
        ("d", "0.00999"),
        ("d", "\"0.01\""),
        ("d", "99.999"),
        ("d", "100"),
        ("d", "1e2"),
        ("d", "\"99.99999999\""),
        ("cur", "\"eur\""),
        ("cur", "\"EUR\""),
        ("cur", "\"usd \""),
        ("ei", "1"),
        ("ei", "3.0"),
        ("ei", "4"),
        ("ei", "0"),
        ("code", "\"ab\""),
        ("code", "\"a\""),
        ("code", "\"abcd\""),
        ("code", "\"abcde\""),
        ("code", "\"éé\""),
        ("code", "\"🚀🚀🚀🚀\""),
        ("code", "\"🚀🚀🚀🚀🚀\""),
        ("code", "\"\""),
        ("word", "\"abc\""),
        ("word", "\"abc12\""),
        ("word", "\"Abc\""),
        ("word", "\"é\""),
        ("word", "\"abc\\n\""),
        ("word", "\"\""),
        ("some", "\"x\""),
        ("some", "\"yyy\""),
        ("some", "\"XxX\""),
        ("n", "null"),
        ("n", "1"),
        ("n", "0"),
        ("dflt", "5"),
        ("dflt", "6"),
        ("a", "2"),
        ("a", "2.0"),
        ("a", "3"),
        ("b", "1"),
        ("b", "1.0"),
        ("b", "1e0"),
    ];
    // The worker refuses what the schema cannot: a decimal's bound on a string.
    let known = ["{\"d\":\"0.001\"}", "{\"d\":\"100\"}"];
    let mut cases: Vec<String> = vec![base.to_string()];
    for (key, text) in variations {
        let mut payload = base.as_object().expect("object").clone();
        payload.insert((*key).to_owned(), Value::Null);
        let raw = serde_json::to_string(&payload).expect("json");
        let needle = format!("\"{key}\":null");
        cases.push(raw.replacen(&needle, &format!("\"{key}\":{text}"), 1));
    }
    let mut disagree = Vec::new();
    let mut accepted = 0;
    for case in &cases {
        let value: Value = serde_json::from_str(case).expect("the corpus is JSON");
        let schema_says = validator.is_valid(&value) && not_equal_holds(&schema, &value);
        let worker_says = handler.check_payload(case);
        accepted += usize::from(worker_says.is_ok());
        if schema_says != worker_says.is_ok() {
            disagree.push(format!(
                "{case}\n    schema: {}, worker: {worker_says:?}",
                if schema_says { "valid" } else { "invalid" }
            ));
        }
    }
    assert!(
        disagree.is_empty(),
        "they disagree on:\n{}",
        disagree.join("\n")
    );
    assert!(
        accepted > 15 && accepted < cases.len() - 15,
        "{accepted} of {}",
        cases.len()
    );

    let mut gap = Vec::new();
    for change in known {
        let mut payload = base.clone();
        let change: Value = serde_json::from_str(change).expect("json");
        if let (Some(p), Some(c)) = (payload.as_object_mut(), change.as_object()) {
            p.extend(c.clone());
        }
        let text = payload.to_string();
        gap.push((
            validator.is_valid(&payload),
            handler.check_payload(&text).map_err(|r| r.message),
        ));
    }
    assert_eq!(
        gap,
        [
            (true, Err("parameter `d` must be at least 0.01".to_owned())),
            (true, Err("parameter `d` must be less than 100".to_owned())),
        ]
    );
    // The declared code answers; undeclared ones are `invalid_parameter`.
    let refusal = |change: Value| {
        let mut payload = base.clone();
        if let (Some(p), Some(c)) = (payload.as_object_mut(), change.as_object()) {
            p.extend(c.clone());
        }
        handler
            .check_payload(&payload.to_string())
            .expect_err("refused")
    };
    let r = refusal(json!({"cur": "gbp"}));
    assert_eq!(
        (r.code.as_str(), r.message.as_str()),
        (
            "bad_currency",
            "parameter `cur` must be one of \"usd\", \"eur\""
        )
    );
    let r = refusal(json!({"b": 1}));
    assert_eq!(
        (r.code.as_str(), r.message.as_str()),
        ("same", "parameter `b` must differ from `a`")
    );
    let r = refusal(json!({"lo": 10}));
    assert_eq!(
        (r.code.as_str(), r.message.as_str()),
        ("invalid_parameter", "parameter `lo` must be less than 10")
    );
}
