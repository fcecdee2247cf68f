//! Running an operation: bind the payload, run each step in the job's
//! transaction, check its expectations, and compose the result. Column values map
//! to JSON faithfully: integers stay integers, decimals become strings, timestamps
//! RFC 3339, NULL null, JSON columns JSON, bytes base64.
//!
//! Whether a step yields rows or an affected count is what the database says of
//! its prepared statement (result columns or none), never a guess from the text:
//! see [`has_columns`].

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use futures_util::TryStreamExt as _;
use serde_json::{Map, Value as Json};
use sqlx::types::BigDecimal;
use sqlx::types::chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use sqlx::{
    AssertSqlSafe, Column as _, Either, Executor as _, Row as _, SqlSafeStr as _, TypeInfo as _,
    ValueRef as _,
};

use super::params::{ParamSpec, ParamType, Value, bind_payload};
use super::spec::{Operation, ResultSpec, SpecError};
use super::sql::{Placeholder, compile};
use crate::db::{Backend, Tx};
use crate::{Handler, JobError, JobMeta};

type Row = Map<String, Json>;

/// A job type defined by an operation of the file.
#[derive(Debug)]
pub struct OpsHandler {
    params: BTreeMap<String, ParamSpec>,
    steps: Vec<CompiledStep>,
    result: ResultSpec,
}

#[derive(Debug)]
struct CompiledStep {
    name: String,
    sql: Arc<str>,
    binds: Vec<Placeholder>,
    expect: (Option<u64>, Option<u64>),
    code: String,
    message: Option<String>,
    single_row: bool,
    json_columns: Vec<String>,
    /// Whether the statement has result columns, as its first run found out;
    /// the same for every connection to the database.
    returns_rows: OnceLock<bool>,
}

impl OpsHandler {
    /// Compiles `op` (checked already) for `backend`.
    pub fn new(name: &str, op: &Operation, backend: Backend) -> Result<Self, SpecError> {
        let mut steps = Vec::new();
        for (i, step) in op.steps.iter().enumerate() {
            let compiled =
                compile(step.sql_for(backend), backend).map_err(|problem| SpecError {
                    place: format!("operation `{name}`, step {} (`{}`)", i + 1, step.name),
                    problem,
                })?;
            let (min, max) = match step.expect_rows {
                Some(n) => (Some(n), Some(n)),
                None => (step.expect_min_rows, step.expect_max_rows),
            };
            steps.push(CompiledStep {
                name: step.name.clone(),
                sql: compiled.sql.into(),
                binds: compiled.binds,
                expect: (min, max),
                code: step
                    .error_code
                    .clone()
                    .unwrap_or_else(|| "expectation_failed".into()),
                message: step.error_message.clone(),
                single_row: step.single_row(),
                json_columns: step.json_columns.clone(),
                returns_rows: OnceLock::new(),
            });
        }
        let result = op.result.clone().unwrap_or_else(|| {
            ResultSpec::Step(op.steps.last().map(|s| s.name.clone()).unwrap_or_default())
        });
        Ok(Self {
            params: op
                .params
                .iter()
                .map(|(k, v)| (k.clone(), v.spec()))
                .collect(),
            steps,
            result,
        })
    }
}

impl Handler for OpsHandler {
    type Payload = Json;
    type Output = Json;

    async fn handle(&self, tx: &mut Tx, payload: Json, meta: &JobMeta) -> Result<Json, JobError> {
        let mut values = bind_payload(&self.params, &payload)
            .map_err(|e| JobError::reject("invalid_parameter", e))?;
        let text = |s: &Option<String>| {
            s.clone()
                .map_or(Value::Null(Some(ParamType::String)), Value::String)
        };
        values.insert("$message_id".into(), text(&meta.message_id));
        values.insert("$correlation_id".into(), text(&meta.correlation_id));
        values.insert(
            "$attempt".into(),
            Value::Integer(i64::from(meta.delivery_attempt)),
        );
        values.insert("$now".into(), Value::Timestamp(Utc::now()));

        let mut done: Vec<(&str, Vec<Row>)> = Vec::new();
        for step in &self.steps {
            let mut args = Vec::with_capacity(step.binds.len());
            for b in &step.binds {
                args.push(match b {
                    Placeholder::Param(p) => values.get(p).cloned().unwrap_or(Value::Null(None)),
                    Placeholder::Column(s, c) => {
                        let rows = done.iter().find(|(n, _)| n == s).map(|(_, r)| r);
                        let Some(row) = rows.and_then(|r| r.first()) else {
                            return Err(JobError::reject(
                                "missing_row",
                                format!(
                                    "step `{}` needs `:{s}.{c}`, but `{s}` returned no row",
                                    step.name
                                ),
                            ));
                        };
                        let Some(v) = row.get(c) else {
                            return Err(JobError::permanent(format!(
                                "step `{}`: step `{s}` has no column `{c}`",
                                step.name
                            )));
                        };
                        Value::from_json(v)
                    }
                });
            }
            let (rows, count) = run(tx, step, args).await?;
            let (min, max) = step.expect;
            if min.is_some_and(|m| count < m) || max.is_some_and(|m| count > m) {
                let expected = match (min, max) {
                    (Some(a), Some(b)) if a == b => format!("{a}"),
                    (Some(a), Some(b)) => format!("{a} to {b}"),
                    (Some(a), None) => format!("at least {a}"),
                    (None, Some(b)) => format!("at most {b}"),
                    (None, None) => String::new(),
                };
                let message = step.message.clone().unwrap_or_else(|| {
                    format!(
                        "step `{}` expected {expected} row(s), got {count}",
                        step.name
                    )
                });
                return Err(JobError::reject(step.code.clone(), message));
            }
            done.push((&step.name, rows));
        }
        let shape = |name: &str| -> Json {
            let Some((_, rows)) = done.iter().find(|(n, _)| *n == name) else {
                return Json::Null;
            };
            let single = self.steps.iter().any(|s| s.name == name && s.single_row);
            if single {
                rows.first().cloned().map_or(Json::Null, Json::Object)
            } else {
                Json::Array(rows.iter().cloned().map(Json::Object).collect())
            }
        };
        Ok(match &self.result {
            ResultSpec::Step(s) => shape(s),
            ResultSpec::Object(m) => {
                Json::Object(m.iter().map(|(k, s)| (k.clone(), shape(s))).collect())
            }
        })
    }
}

/// Binds `args` and runs the step; returns its rows as JSON and its count: the
/// rows' number for a statement with result columns, else the affected rows.
async fn run(
    tx: &mut Tx,
    step: &CompiledStep,
    args: Vec<Value>,
) -> Result<(Vec<Row>, u64), sqlx::Error> {
    let (sql, json_columns) = (&step.sql, step.json_columns.as_slice());
    macro_rules! bind_and_run {
        ($c:expr, $decode:ident, $decimal:expr, $null:ident) => {{
            let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
            for v in args {
                q = match v {
                    Value::Null(t) => $null(q, t),
                    Value::Integer(i) => q.bind(i),
                    Value::Float(f) => q.bind(f),
                    Value::Decimal(d) => q.bind($decimal(d)),
                    Value::String(s) => q.bind(s),
                    Value::Bool(b) => q.bind(b),
                    Value::Json(j) => q.bind(sqlx::types::Json(j)),
                    Value::Timestamp(t) => q.bind(t),
                    Value::Date(d) => q.bind(d),
                    Value::Bytes(b) => q.bind(b),
                };
            }
            // One call for either kind of statement: its rows, if it has any,
            // and its affected count; which of the two counts is decided below.
            let mut rows = Vec::new();
            let mut affected = 0;
            let mut results = (&mut *$c).fetch_many(q);
            while let Some(result) = results.try_next().await? {
                match result {
                    Either::Left(done) => affected += done.rows_affected(),
                    Either::Right(row) => rows.push($decode(&row, json_columns)?),
                }
            }
            drop(results);
            let returns_rows = match step.returns_rows.get() {
                Some(&known) => known,
                None => {
                    // A row returned is proof enough of result columns.
                    let known = !rows.is_empty() || {
                        let sql = AssertSqlSafe(sql.clone()).into_sql_str();
                        has_columns((&mut *$c).prepare(sql).await?)
                    };
                    let _ = step.returns_rows.set(known);
                    known
                }
            };
            Ok(if returns_rows {
                let n = rows.len() as u64;
                (rows, n)
            } else {
                (rows, affected)
            })
        }};
    }
    let same = |d: BigDecimal| d;
    let text = |d: BigDecimal| d.to_string();
    match tx.conn() {
        crate::Conn::MySql(c) => bind_and_run!(c, decode_mysql, same, null_mysql),
        crate::Conn::Postgres(c) => bind_and_run!(c, decode_pg, same, null_pg),
        // SQLite has no decimal type: decimals are stored as text, exactly.
        crate::Conn::Sqlite(c) => bind_and_run!(c, decode_sqlite, text, null_sqlite),
    }
}

/// Whether a statement yields rows (read them) or only a count (affected rows):
/// whether the database gave its prepared form result columns. A SELECT, a CTE
/// ending in one, or an INSERT … RETURNING has columns; an UPDATE has none, even
/// with `returning` in a column name, a literal or a comment.
///
/// Asked once per step (the answer is kept in the step), after the step's first
/// run and on the connection that ran it: the statement is then in that
/// connection's statement cache (sqlx caches prepared statements by their text),
/// so `prepare` only reads the cached metadata and sends nothing to the server.
/// Preparing *before* the first run would cost a round trip, and on PostgreSQL
/// would be wrong: prepared without the bound values' types, the statement gets
/// the types the server infers (`INT4` for an `INT` column), and the cached
/// statement then refuses an `INT8` value ("incorrect binary data format").
fn has_columns(statement: impl sqlx::Statement) -> bool {
    !statement.columns().is_empty()
}

type Q<'q, DB> = sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>;

fn null_mysql(q: Q<'_, sqlx::MySql>, _: Option<ParamType>) -> Q<'_, sqlx::MySql> {
    q.bind(None::<String>)
}

fn null_sqlite(q: Q<'_, sqlx::Sqlite>, _: Option<ParamType>) -> Q<'_, sqlx::Sqlite> {
    q.bind(None::<String>)
}

/// PostgreSQL types every parameter, so a NULL carries its declared type.
fn null_pg(q: Q<'_, sqlx::Postgres>, t: Option<ParamType>) -> Q<'_, sqlx::Postgres> {
    match t {
        Some(ParamType::Integer) => q.bind(None::<i64>),
        Some(ParamType::Float) => q.bind(None::<f64>),
        Some(ParamType::Decimal) => q.bind(None::<BigDecimal>),
        Some(ParamType::Bool) => q.bind(None::<bool>),
        Some(ParamType::Json) => q.bind(None::<sqlx::types::Json<Json>>),
        Some(ParamType::Timestamp) => q.bind(None::<DateTime<Utc>>),
        Some(ParamType::Date) => q.bind(None::<NaiveDate>),
        Some(ParamType::Bytes) => q.bind(None::<Vec<u8>>),
        Some(ParamType::String) | None => q.bind(None::<String>),
    }
}

fn b64(bytes: &[u8]) -> Json {
    Json::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn num(f: f64) -> Json {
    serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)
}

fn rfc3339(t: DateTime<Utc>) -> Json {
    Json::String(t.format("%Y-%m-%dT%H:%M:%S%.fZ").to_string())
}

/// A zone-less timestamp is taken as UTC.
fn naive(t: NaiveDateTime) -> Json {
    rfc3339(t.and_utc())
}

macro_rules! get {
    ($row:expr, $i:expr, $t:ty, $f:expr) => {
        $row.try_get::<Option<$t>, _>($i)?.map_or(Json::Null, $f)
    };
}

/// A column the step declared JSON: its text (or bytes, for binary collations)
/// parsed.
fn json_text(bytes: Option<Vec<u8>>, column: &str) -> Result<Json, sqlx::Error> {
    let Some(bytes) = bytes else {
        return Ok(Json::Null);
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| sqlx::Error::Decode(format!("column `{column}` is not JSON: {e}").into()))
}

fn decode_mysql(row: &sqlx::mysql::MySqlRow, json_columns: &[String]) -> Result<Row, sqlx::Error> {
    let mut out = Map::new();
    for (i, col) in row.columns().iter().enumerate() {
        let ty = col.type_info().name();
        let v = match ty {
            // MariaDB's JSON is LONGTEXT (or LONGBLOB under a binary collation).
            _ if json_columns.iter().any(|c| c == col.name()) && ty != "JSON" => {
                json_text(row.try_get::<Option<Vec<u8>>, _>(i)?, col.name())?
            }
            "NULL" => Json::Null,
            "BOOLEAN" => get!(row, i, bool, Json::Bool),
            "TINYINT" | "SMALLINT" | "INT" | "MEDIUMINT" | "BIGINT" | "YEAR" => {
                get!(row, i, i64, Json::from)
            }
            t if t.ends_with("UNSIGNED") => get!(row, i, u64, Json::from),
            "FLOAT" => get!(row, i, f32, |f| num(f64::from(f))),
            "DOUBLE" => get!(row, i, f64, num),
            "DECIMAL" => get!(row, i, BigDecimal, |d| Json::String(d.to_string())),
            "DATE" => get!(row, i, NaiveDate, |d| Json::String(d.to_string())),
            "TIME" => get!(row, i, NaiveTime, |t| Json::String(t.to_string())),
            "DATETIME" => get!(row, i, NaiveDateTime, naive),
            "TIMESTAMP" => get!(row, i, DateTime<Utc>, rfc3339),
            "JSON" => get!(row, i, sqlx::types::Json<Json>, |j| j.0),
            "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" | "BIT" => {
                get!(row, i, Vec<u8>, |b| b64(&b))
            }
            _ => get!(row, i, String, Json::String),
        };
        out.insert(col.name().to_owned(), v);
    }
    Ok(out)
}

fn decode_pg(row: &sqlx::postgres::PgRow, json_columns: &[String]) -> Result<Row, sqlx::Error> {
    let mut out = Map::new();
    for (i, col) in row.columns().iter().enumerate() {
        let v = match col.type_info().name() {
            "VOID" => Json::Null,
            "BOOL" => get!(row, i, bool, Json::Bool),
            "INT2" => get!(row, i, i16, Json::from),
            "INT4" => get!(row, i, i32, Json::from),
            "INT8" => get!(row, i, i64, Json::from),
            "OID" => get!(row, i, sqlx::postgres::types::Oid, |o| Json::from(o.0)),
            "FLOAT4" => get!(row, i, f32, |f| num(f64::from(f))),
            "FLOAT8" => get!(row, i, f64, num),
            "NUMERIC" => {
                let scale = pg_display_scale(row, i)?;
                get!(row, i, BigDecimal, |d| {
                    let d = match scale {
                        Some(s) => d.with_scale(s),
                        None => d,
                    };
                    Json::String(d.to_string())
                })
            }
            "DATE" => get!(row, i, NaiveDate, |d| Json::String(d.to_string())),
            "TIME" => get!(row, i, NaiveTime, |t| Json::String(t.to_string())),
            "TIMESTAMP" => get!(row, i, NaiveDateTime, naive),
            "TIMESTAMPTZ" => get!(row, i, DateTime<Utc>, rfc3339),
            "JSON" | "JSONB" => get!(row, i, sqlx::types::Json<Json>, |j| j.0),
            "BYTEA" => get!(row, i, Vec<u8>, |b| b64(&b)),
            "TEXT" | "VARCHAR" if json_columns.iter().any(|c| c == col.name()) => json_text(
                row.try_get::<Option<String>, _>(i)?.map(String::into_bytes),
                col.name(),
            )?,
            _ => get!(row, i, String, Json::String),
        };
        out.insert(col.name().to_owned(), v);
    }
    Ok(out)
}

/// The display scale of a PostgreSQL NUMERIC (its declared or written number of
/// decimals), which sqlx's BigDecimal drops: `12.50` must stay `12.50`. In the binary
/// format it is the fourth 16-bit field.
fn pg_display_scale(row: &sqlx::postgres::PgRow, i: usize) -> Result<Option<i64>, sqlx::Error> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() || raw.format() != sqlx::postgres::PgValueFormat::Binary {
        return Ok(None);
    }
    let bytes = raw.as_bytes().map_err(sqlx::Error::Decode)?;
    Ok(bytes
        .get(6..8)
        .map(|b| i64::from(u16::from_be_bytes([b[0], b[1]]))))
}

/// SQLite types values, not columns: decode by what the value is, refined by the
/// declared type (BOOLEAN, JSON).
fn decode_sqlite(
    row: &sqlx::sqlite::SqliteRow,
    json_columns: &[String],
) -> Result<Row, sqlx::Error> {
    let mut out = Map::new();
    for (i, col) in row.columns().iter().enumerate() {
        let declared = col.type_info().name().to_ascii_uppercase();
        let raw = row.try_get_raw(i)?;
        let storage = if raw.is_null() {
            "NULL".to_owned()
        } else {
            raw.type_info().name().to_owned()
        };
        let v = match storage.as_str() {
            "NULL" => Json::Null,
            "INTEGER" if declared == "BOOLEAN" => get!(row, i, bool, Json::Bool),
            "TEXT" if matches!(declared.as_str(), "DATETIME" | "TIMESTAMP") => {
                get!(row, i, DateTime<Utc>, rfc3339)
            }
            "TEXT" if declared == "DATE" => {
                get!(row, i, NaiveDate, |d| Json::String(d.to_string()))
            }
            "INTEGER" | "BOOLEAN" => get!(row, i, i64, Json::from),
            "REAL" => get!(row, i, f64, num),
            "BLOB" => get!(row, i, Vec<u8>, |b| b64(&b)),
            "TEXT" if declared == "JSON" || json_columns.iter().any(|c| c == col.name()) => {
                json_text(
                    row.try_get::<Option<String>, _>(i)?.map(String::into_bytes),
                    col.name(),
                )?
            }
            _ => get!(row, i, String, Json::String),
        };
        out.insert(col.name().to_owned(), v);
    }
    Ok(out)
}
