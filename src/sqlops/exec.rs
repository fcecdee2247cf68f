//! Running an operation: bind the payload, run each step in the job's
//! transaction, check its expectations, and compose the result. Column values map
//! to JSON faithfully: integers stay integers, decimals become strings in plain
//! notation with their scale, timestamps RFC 3339, NULL null, JSON columns JSON
//! (every digit of their numbers kept), bytes base64.
//!
//! A value a later step refers to (`:step.column`) is bound again as the database
//! gave it, with its own type, never from its JSON form.
//!
//! Whether a step yields rows or an affected count is what the database says of
//! its prepared statement (result columns or none), never a guess from the text:
//! see [`has_columns`].

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use futures_util::TryStreamExt as _;
use serde_json::value::RawValue;
use sqlx::mysql::types::MySqlTime;
use sqlx::types::BigDecimal;
use sqlx::types::chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use sqlx::{
    AssertSqlSafe, Column as _, Either, Executor as _, Row as _, SqlSafeStr as _, TypeInfo as _,
    ValueRef as _,
};

use super::constraints::{Constraints, DEFAULT_CODE, Refusal};
use super::params::{ParamSpec, ParamType, Value, bind_payload};
use super::pg::{self, PgRaw};
use super::spec::{Operation, ResultSpec, SpecError};
use super::sql::{Placeholder, compile};
use crate::db::{Backend, Tx};
use crate::{Handler, JobError, JobMeta};

/// One row: each column's name and JSON text, and for a step's first row (the one
/// `:step.column` reads) each column's value as the database gave it.
#[derive(Debug)]
struct Row {
    /// JSON texts made here or checked as JSON: the reply is checked once whole.
    cells: Vec<(String, String)>,
    typed: Vec<Typed>,
}

/// A column value as the database gave it, to bind again with its own type.
#[derive(Debug, Clone)]
enum Typed {
    Null,
    Int(i64),
    UInt(u64),
    F32(f32),
    F64(f64),
    /// MySQL DECIMAL, in plain notation.
    Decimal(String),
    Text(String),
    Bytes(Vec<u8>),
    Bool(bool),
    Date(NaiveDate),
    DateTime(NaiveDateTime),
    Timestamp(DateTime<Utc>),
    Time(MySqlTime),
    Pg(PgRaw),
}

/// What one placeholder binds.
enum Arg {
    Param(Value),
    Column(Typed),
}

/// A job type defined by an operation of the file.
#[derive(Debug)]
pub struct OpsHandler {
    params: BTreeMap<String, ParamSpec>,
    /// In the order the file declares the parameters.
    constraints: Vec<Constraints>,
    steps: Vec<CompiledStep>,
    result: ResultSpec,
}

impl OpsHandler {
    /// Checks a payload (a JSON text) against the operation's parameters and their
    /// constraints, as a job does before it runs any step: `Err` is the rejection.
    pub fn check_payload(&self, payload: &str) -> Result<(), Refusal> {
        let raw = serde_json::from_str::<&RawValue>(payload).map_err(|e| Refusal {
            code: DEFAULT_CODE.into(),
            message: e.to_string(),
        })?;
        self.bind(raw).map(drop)
    }

    /// The payload's values, bound to the declared types and checked against the
    /// constraints, which need no database: a payload that fails answers
    /// `rejected` (`invalid_parameter` for a missing, extra or wrongly typed
    /// parameter; a constraint's `error_code`) before any step runs.
    pub fn bind(&self, payload: &RawValue) -> Result<BTreeMap<String, Value>, Refusal> {
        let values = bind_payload(&self.params, payload).map_err(|message| Refusal {
            code: DEFAULT_CODE.into(),
            message,
        })?;
        for c in &self.constraints {
            c.check(&values)?;
        }
        Ok(values)
    }
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
    /// SQLite: the result columns declared `JSON` in their table, found before
    /// the first run (sqlx does not tell a column's declared type unless it is
    /// one of its own).
    sqlite_json: OnceLock<Vec<String>>,
}

impl OpsHandler {
    /// Compiles `op` (checked already) for `backend`.
    pub fn new(name: &str, op: &Operation, backend: Backend) -> Result<Self, SpecError> {
        let mut constraints = Vec::new();
        for (p, decl) in op.params.in_order() {
            let compiled = Constraints::compile(p, &decl.spec()).map_err(|problems| SpecError {
                place: format!("operation `{name}`"),
                problem: format!("parameter `{p}`: {}", problems.join("; ")),
            })?;
            constraints.extend(compiled);
        }
        let mut steps = Vec::new();
        for (i, step) in op.steps.iter().enumerate() {
            if !step.runs_on(backend) {
                continue;
            }
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
                sqlite_json: OnceLock::new(),
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
            constraints,
            steps,
            result,
        })
    }
}

impl Handler for OpsHandler {
    type Payload = Box<RawValue>;
    type Output = Box<RawValue>;

    /// Types and constraints need no database: refused before a connection.
    fn check(&self, payload: &Box<RawValue>) -> Result<(), JobError> {
        self.bind(payload)
            .map(drop)
            .map_err(|r| JobError::reject(r.code, r.message))
    }

    async fn handle(
        &self,
        tx: &mut Tx,
        payload: Box<RawValue>,
        meta: &JobMeta,
    ) -> Result<Box<RawValue>, JobError> {
        let mut values = self
            .bind(&payload)
            .map_err(|r| JobError::reject(r.code, r.message))?;
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
        // To the microsecond, the finest any of the databases keeps.
        let now = Utc::now();
        let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        values.insert("$now".into(), Value::Timestamp(now));

        let mut done: Vec<(&str, Vec<Row>)> = Vec::new();
        for step in &self.steps {
            let mut args = Vec::with_capacity(step.binds.len());
            for b in &step.binds {
                args.push(match b {
                    Placeholder::Param(p) => {
                        Arg::Param(values.get(p).cloned().unwrap_or(Value::Null(None)))
                    }
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
                        let Some(at) = row.cells.iter().position(|(n, _)| n == c) else {
                            return Err(JobError::permanent(format!(
                                "step `{}`: step `{s}` has no column `{c}`",
                                step.name
                            )));
                        };
                        Arg::Column(row.typed[at].clone())
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
        let object = |row: &Row| {
            let cells: Vec<String> = row
                .cells
                .iter()
                .map(|(k, v)| format!("{}:{v}", pg::quote(k)))
                .collect();
            format!("{{{}}}", cells.join(","))
        };
        let shape = |name: &str| -> String {
            let Some((_, rows)) = done.iter().find(|(n, _)| *n == name) else {
                return "null".into();
            };
            let single = self.steps.iter().any(|s| s.name == name && s.single_row);
            if single {
                rows.first().map_or_else(|| "null".into(), object)
            } else {
                let all: Vec<String> = rows.iter().map(object).collect();
                format!("[{}]", all.join(","))
            }
        };
        let out = match &self.result {
            ResultSpec::Step(s) => shape(s),
            ResultSpec::Object(m) => {
                let parts: Vec<String> = m
                    .iter()
                    .map(|(k, s)| format!("{}:{}", pg::quote(k), shape(s)))
                    .collect();
                format!("{{{}}}", parts.join(","))
            }
        };
        RawValue::from_string(out)
            .map_err(|e| JobError::permanent(format!("internal: a result that is not JSON: {e}")))
    }
}

/// Binds `args` and runs the step; returns its rows and its count: the rows'
/// number for a statement with result columns, else the affected rows.
async fn run(
    tx: &mut Tx,
    step: &CompiledStep,
    args: Vec<Arg>,
) -> Result<(Vec<Row>, u64), JobError> {
    let sql = &step.sql;
    macro_rules! bind_and_run {
        ($c:expr, $decode:ident, $bind:ident) => {{
            let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
            for a in args {
                q = $bind(q, a)
                    .map_err(|e| JobError::permanent(format!("step `{}`: {e}", step.name)))?;
            }
            // One call for either kind of statement: its rows, if it has any,
            // and its affected count; which of the two counts is decided below.
            let mut rows: Vec<Row> = Vec::new();
            let mut affected = 0;
            let mut results = (&mut *$c).fetch_many(q);
            while let Some(result) = results.try_next().await? {
                match result {
                    Either::Left(done) => affected += done.rows_affected(),
                    Either::Right(row) => {
                        if rows.is_empty() {
                            unique_names(&row, step)?;
                        }
                        let decoded = $decode(&row, step, rows.is_empty())?;
                        rows.push(decoded);
                    }
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
    match tx.conn() {
        crate::Conn::MySql(c) => bind_and_run!(c, decode_mysql, bind_mysql),
        crate::Conn::Postgres(c) => bind_and_run!(c, decode_pg, bind_pg),
        crate::Conn::Sqlite(c) => {
            if step.sqlite_json.get().is_none() {
                let found = sqlite_json_columns(&mut *c, sql).await?;
                let _ = step.sqlite_json.set(found);
            }
            bind_and_run!(c, decode_sqlite, bind_sqlite)
        }
    }
}

/// The result columns of `sql` that come from a table column declared `JSON`.
async fn sqlite_json_columns(
    c: &mut sqlx::SqliteConnection,
    sql: &Arc<str>,
) -> Result<Vec<String>, sqlx::Error> {
    let statement = (&mut *c)
        .prepare(AssertSqlSafe(sql.clone()).into_sql_str())
        .await?;
    let mut found = Vec::new();
    for col in sqlx::Statement::columns(&statement) {
        let Some(origin) = col.origin().table_column().cloned() else {
            continue;
        };
        let (schema, table) = match origin.table.split_once('.') {
            Some((schema, table)) => (schema.to_owned(), table.to_owned()),
            None => ("main".to_owned(), origin.table.to_string()),
        };
        let declared: Option<String> =
            sqlx::query_scalar("SELECT upper(type) FROM pragma_table_info(?1, ?2) WHERE name = ?3")
                .bind(table)
                .bind(schema)
                .bind(origin.name.to_string())
                .fetch_optional(&mut *c)
                .await?;
        if declared.as_deref() == Some("JSON") {
            found.push(col.name().to_owned());
        }
    }
    Ok(found)
}

/// Two result columns of one name would collapse into one key of the reply.
fn unique_names(row: &impl sqlx::Row, step: &CompiledStep) -> Result<(), JobError> {
    let columns = row.columns();
    for (i, col) in columns.iter().enumerate() {
        if columns[..i].iter().any(|c| c.name() == col.name()) {
            return Err(JobError::permanent(format!(
                "step `{}` returns two columns named `{}`: give them distinct names (AS …)",
                step.name,
                col.name()
            )));
        }
    }
    Ok(())
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

/// More digits than this on either side of the point, and a decimal is out of
/// range of every database (PostgreSQL's NUMERIC holds 131072 before the point).
const MAX_PLAIN_DIGITS: i64 = 200_000;

/// A decimal in plain notation (`0.0000001000`, `100000`), scale kept; `None` when
/// that text would be absurdly long.
fn plain(d: &BigDecimal) -> Option<String> {
    let scale = d.fractional_digit_count();
    let digits = i64::try_from(d.digits()).unwrap_or(i64::MAX);
    (scale.abs() <= MAX_PLAIN_DIGITS && digits <= MAX_PLAIN_DIGITS).then(|| d.to_plain_string())
}

/// A decimal as MySQL reads it: DECIMAL in text, plain notation.
#[derive(Debug)]
struct MyDecimal(String);

impl sqlx::Type<sqlx::MySql> for MyDecimal {
    fn type_info() -> sqlx::mysql::MySqlTypeInfo {
        <BigDecimal as sqlx::Type<sqlx::MySql>>::type_info()
    }
}

impl sqlx::Encode<'_, sqlx::MySql> for MyDecimal {
    fn encode_by_ref(
        &self,
        buf: &mut Vec<u8>,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        // On the wire a DECIMAL is its text, as a string is.
        <&str as sqlx::Encode<sqlx::MySql>>::encode(self.0.as_str(), buf)
    }
}

fn bind_mysql(q: Q<'_, sqlx::MySql>, arg: Arg) -> Result<Q<'_, sqlx::MySql>, String> {
    Ok(match arg {
        Arg::Param(v) => match v {
            Value::Null(_) => q.bind(None::<String>),
            Value::Integer(i) => q.bind(i),
            Value::Float(f) => q.bind(f),
            // Scientific notation when the plain one would be absurd: MySQL says
            // it is out of range.
            Value::Decimal(d) => q.bind(MyDecimal(plain(&d).unwrap_or_else(|| d.to_string()))),
            Value::String(s) => q.bind(s),
            Value::Bool(b) => q.bind(b),
            Value::Json(j) => q.bind(j.get().to_owned()),
            Value::Timestamp(t) => q.bind(t),
            Value::Date(d) => q.bind(d),
            Value::Bytes(b) => q.bind(b),
        },
        Arg::Column(t) => match t {
            Typed::Null => q.bind(None::<String>),
            Typed::Int(i) => q.bind(i),
            Typed::UInt(u) => q.bind(u),
            Typed::F32(f) => q.bind(f),
            Typed::F64(f) => q.bind(f),
            Typed::Decimal(d) => q.bind(MyDecimal(d)),
            Typed::Text(s) => q.bind(s),
            Typed::Bytes(b) => q.bind(b),
            Typed::Bool(b) => q.bind(b),
            Typed::Date(d) => q.bind(d),
            Typed::DateTime(t) => q.bind(t),
            Typed::Timestamp(t) => q.bind(t),
            Typed::Time(t) => q.bind(t),
            Typed::Pg(_) => return Err("internal: a PostgreSQL value bound on MySQL".into()),
        },
    })
}

fn bind_pg(q: Q<'_, sqlx::Postgres>, arg: Arg) -> Result<Q<'_, sqlx::Postgres>, String> {
    Ok(match arg {
        Arg::Param(v) => match v {
            // PostgreSQL types every parameter, so a NULL carries its declared type.
            Value::Null(t) => match t {
                Some(ParamType::Integer) => q.bind(None::<i64>),
                Some(ParamType::Float) => q.bind(None::<f64>),
                Some(ParamType::Decimal) => q.bind(None::<BigDecimal>),
                Some(ParamType::Bool) => q.bind(None::<bool>),
                Some(ParamType::Json) => q.bind(None::<sqlx::types::Json<()>>),
                Some(ParamType::Timestamp) => q.bind(None::<DateTime<Utc>>),
                Some(ParamType::Date) => q.bind(None::<NaiveDate>),
                Some(ParamType::Bytes) => q.bind(None::<Vec<u8>>),
                Some(ParamType::String) | None => q.bind(None::<String>),
            },
            Value::Integer(i) => q.bind(i),
            Value::Float(f) => q.bind(f),
            // NUMERIC in binary: exact, scale kept.
            Value::Decimal(d) => q.bind(d),
            Value::String(s) => q.bind(s),
            Value::Bool(b) => q.bind(b),
            Value::Json(j) => q.bind(sqlx::types::Json(j.raw().to_owned())),
            Value::Timestamp(t) => q.bind(t),
            Value::Date(d) => q.bind(d),
            Value::Bytes(b) => q.bind(b),
        },
        Arg::Column(Typed::Pg(raw)) => q.bind(raw),
        Arg::Column(_) => {
            return Err("internal: a value of another database bound on PostgreSQL".into());
        }
    })
}

/// SQLite's own text form of a timestamp, UTC: `YYYY-MM-DD HH:MM:SS` and the
/// fraction when there is one (`.SSS` or `.SSSSSS`), as `CURRENT_TIMESTAMP`
/// and `datetime()` write it, so that text comparisons with them hold.
pub(super) fn sqlite_timestamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.f").to_string()
}

fn bind_sqlite(q: Q<'_, sqlx::Sqlite>, arg: Arg) -> Result<Q<'_, sqlx::Sqlite>, String> {
    Ok(match arg {
        Arg::Param(v) => match v {
            Value::Null(_) => q.bind(None::<String>),
            Value::Integer(i) => q.bind(i),
            Value::Float(f) => q.bind(f),
            // SQLite has no decimal type: decimals are stored as text, exactly.
            Value::Decimal(d) => q.bind(plain(&d).ok_or("decimal out of range")?),
            Value::String(s) => q.bind(s),
            Value::Bool(b) => q.bind(b),
            Value::Json(j) => q.bind(j.get().to_owned()),
            Value::Timestamp(t) => q.bind(sqlite_timestamp(t)),
            Value::Date(d) => q.bind(d.format("%Y-%m-%d").to_string()),
            Value::Bytes(b) => q.bind(b),
        },
        Arg::Column(t) => match t {
            Typed::Null => q.bind(None::<String>),
            Typed::Int(i) => q.bind(i),
            Typed::F64(f) => q.bind(f),
            Typed::Text(s) => q.bind(s),
            Typed::Bytes(b) => q.bind(b),
            _ => return Err("internal: a value of another database bound on SQLite".into()),
        },
    })
}

fn b64(bytes: &[u8]) -> String {
    pg::quote(&base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// RFC 3339 in UTC: `2024-05-06T07:08:09.123456Z`.
fn column_error(step: &CompiledStep, column: &str, problem: impl std::fmt::Display) -> JobError {
    JobError::permanent(format!(
        "step `{}`, column `{column}`: {problem}",
        step.name
    ))
}

/// A column the step declared JSON: its text, checked.
fn json_text(bytes: &[u8], step: &CompiledStep, column: &str) -> Result<String, JobError> {
    let text = std::str::from_utf8(bytes).map_err(|_| column_error(step, column, "not JSON"))?;
    serde_json::from_str::<&RawValue>(text)
        .map(|r| r.get().to_owned())
        .map_err(|e| column_error(step, column, format!("not JSON: {e}")))
}

fn decode_mysql(
    row: &sqlx::mysql::MySqlRow,
    step: &CompiledStep,
    keep: bool,
) -> Result<Row, JobError> {
    let mut cells = Vec::new();
    let mut typed = Vec::new();
    for (i, col) in row.columns().iter().enumerate() {
        let name = col.name();
        let ty = col.type_info().name();
        let is_json = step.json_columns.iter().any(|c| c == name);
        macro_rules! get {
            ($t:ty) => {
                row.try_get::<$t, _>(i)
                    .map_err(|e| column_error(step, name, e))?
            };
        }
        let (json, value) = if row.try_get_raw(i)?.is_null() {
            ("null".to_owned(), Typed::Null)
        } else {
            match ty {
                // MariaDB's JSON is LONGTEXT (or LONGBLOB under a binary collation).
                "JSON" => {
                    let s: String = get!(String);
                    (json_text(s.as_bytes(), step, name)?, Typed::Text(s))
                }
                _ if is_json => {
                    let b: Vec<u8> = get!(Vec<u8>);
                    let json = json_text(&b, step, name)?;
                    match String::from_utf8(b) {
                        Ok(s) => (json, Typed::Text(s)),
                        Err(e) => (json, Typed::Bytes(e.into_bytes())),
                    }
                }
                "NULL" => ("null".to_owned(), Typed::Null),
                "BOOLEAN" => {
                    let b: bool = get!(bool);
                    (b.to_string(), Typed::Bool(b))
                }
                "TINYINT" | "SMALLINT" | "INT" | "MEDIUMINT" | "BIGINT" => {
                    let n: i64 = get!(i64);
                    (n.to_string(), Typed::Int(n))
                }
                // Two bytes on the wire, which sqlx does not call an integer.
                "YEAR" => {
                    let n = row
                        .try_get_unchecked::<i64, _>(i)
                        .map_err(|e| column_error(step, name, e))?;
                    (n.to_string(), Typed::Int(n))
                }
                t if t.ends_with("UNSIGNED") => {
                    let n: u64 = get!(u64);
                    (n.to_string(), Typed::UInt(n))
                }
                "FLOAT" => {
                    let f: f32 = get!(f32);
                    (pg::float4(f), Typed::F32(f))
                }
                "DOUBLE" => {
                    let f: f64 = get!(f64);
                    (pg::float(f), Typed::F64(f))
                }
                "DECIMAL" => {
                    let d: BigDecimal = get!(BigDecimal);
                    let s = d.to_plain_string();
                    (pg::quote(&s), Typed::Decimal(s))
                }
                "DATE" => {
                    let d: NaiveDate = get!(NaiveDate);
                    (pg::quote(&d.format("%Y-%m-%d").to_string()), Typed::Date(d))
                }
                "TIME" => {
                    let t: MySqlTime = get!(MySqlTime);
                    let mut s = format!(
                        "{}{:02}:{:02}:{:02}",
                        // (not `t.is_negative()`, which sqlx 0.9 has backwards)
                        if t.sign().is_negative() { "-" } else { "" },
                        t.hours(),
                        t.minutes(),
                        t.seconds()
                    );
                    let us = t.microseconds();
                    if us % 1000 != 0 {
                        s.push_str(&format!(".{us:06}"));
                    } else if us != 0 {
                        s.push_str(&format!(".{:03}", us / 1000));
                    }
                    (pg::quote(&s), Typed::Time(t))
                }
                // A zone-less timestamp is taken as UTC.
                "DATETIME" => {
                    let t: NaiveDateTime = get!(NaiveDateTime);
                    (
                        pg::quote(&super::params::rfc3339(t.and_utc())),
                        Typed::DateTime(t),
                    )
                }
                "TIMESTAMP" => {
                    let t: DateTime<Utc> = get!(DateTime<Utc>);
                    (pg::quote(&super::params::rfc3339(t)), Typed::Timestamp(t))
                }
                // BIT(n): the number its bits make.
                "BIT" => {
                    let n: u64 = get!(u64);
                    (n.to_string(), Typed::UInt(n))
                }
                // Text is what has a character set: the BINARY flag (which sqlx
                // names BINARY, VARBINARY, BLOB…) is set for `_bin` collations,
                // MariaDB's UUID and INET6 too.
                _ if <str as sqlx::Type<sqlx::MySql>>::compatible(col.type_info()) => {
                    let s: String = get!(String);
                    (pg::quote(&s), Typed::Text(s))
                }
                _ => {
                    let b: Vec<u8> = row
                        .try_get_unchecked::<Vec<u8>, _>(i)
                        .map_err(|e| column_error(step, name, e))?;
                    (b64(&b), Typed::Bytes(b))
                }
            }
        };
        cells.push((name.to_owned(), json));
        if keep {
            typed.push(value);
        }
    }
    Ok(Row { cells, typed })
}

fn decode_pg(
    row: &sqlx::postgres::PgRow,
    step: &CompiledStep,
    keep: bool,
) -> Result<Row, JobError> {
    let mut cells = Vec::new();
    let mut typed = Vec::new();
    for (i, col) in row.columns().iter().enumerate() {
        let name = col.name();
        let ty = col.type_info();
        let raw = row.try_get_raw(i)?;
        let bytes = if raw.is_null() {
            None
        } else {
            Some(raw.as_bytes().map_err(|e| column_error(step, name, e))?)
        };
        let json = match bytes {
            None => "null".to_owned(),
            // Text columns the step declared JSON.
            Some(b)
                if step.json_columns.iter().any(|c| c == name)
                    && matches!(ty.name(), "TEXT" | "VARCHAR" | "BPCHAR") =>
            {
                json_text(b, step, name)?
            }
            Some(b) if raw.format() == sqlx::postgres::PgValueFormat::Text => {
                pg::quote(&String::from_utf8_lossy(b))
            }
            Some(b) => pg::to_json(ty, b).map_err(|e| column_error(step, name, e))?,
        };
        cells.push((name.to_owned(), json));
        if keep {
            typed.push(Typed::Pg(PgRaw {
                ty: ty.clone(),
                bytes: bytes.map(<[u8]>::to_vec),
            }));
        }
    }
    Ok(Row { cells, typed })
}

/// SQLite types values, not columns: decode by what the value is, refined by the
/// declared type (BOOLEAN, DATETIME, TIMESTAMP, DATE, JSON) and `json_columns`.
fn decode_sqlite(
    row: &sqlx::sqlite::SqliteRow,
    step: &CompiledStep,
    keep: bool,
) -> Result<Row, JobError> {
    let mut cells = Vec::new();
    let mut typed = Vec::new();
    for (i, col) in row.columns().iter().enumerate() {
        let name = col.name();
        let declared = col.type_info().name().to_ascii_uppercase();
        let raw = row.try_get_raw(i)?;
        let storage = if raw.is_null() {
            "NULL".to_owned()
        } else {
            raw.type_info().name().to_owned()
        };
        macro_rules! get {
            ($t:ty) => {
                row.try_get::<$t, _>(i)
                    .map_err(|e| column_error(step, name, e))?
            };
        }
        let (json, value) = match storage.as_str() {
            "NULL" => ("null".to_owned(), Typed::Null),
            "INTEGER" => {
                let n: i64 = get!(i64);
                let json = if declared == "BOOLEAN" {
                    (n != 0).to_string()
                } else {
                    n.to_string()
                };
                (json, Typed::Int(n))
            }
            "REAL" => {
                let f: f64 = get!(f64);
                (pg::float(f), Typed::F64(f))
            }
            "BLOB" => {
                let b: Vec<u8> = get!(Vec<u8>);
                (b64(&b), Typed::Bytes(b))
            }
            _ => {
                let s: String = get!(String);
                let declared_json = step
                    .sqlite_json
                    .get()
                    .is_some_and(|j| j.iter().any(|c| c == name));
                let json = if declared_json || step.json_columns.iter().any(|c| c == name) {
                    json_text(s.as_bytes(), step, name)?
                } else if matches!(declared.as_str(), "DATETIME" | "TIMESTAMP") {
                    let t: DateTime<Utc> = get!(DateTime<Utc>);
                    pg::quote(&super::params::rfc3339(t))
                } else if declared == "DATE" {
                    let d: NaiveDate = get!(NaiveDate);
                    pg::quote(&d.format("%Y-%m-%d").to_string())
                } else {
                    pg::quote(&s)
                };
                (json, Typed::Text(s))
            }
        };
        cells.push((name.to_owned(), json));
        if keep {
            typed.push(value);
        }
    }
    Ok(Row { cells, typed })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statements per transfer of `examples/bank/ops.toml`, per backend (it was 8
    /// on each; the Rust handler's is 4).
    #[test]
    fn the_bank_transfer_runs_four_statements_on_postgres_and_sqlite_five_on_mysql() {
        let ops = super::super::parse(include_str!("../../examples/bank/ops.toml")).expect("valid");
        let steps = |backend| -> Vec<String> {
            OpsHandler::new("transfer", &ops.operations["transfer"], backend)
                .expect("compiles")
                .steps
                .iter()
                .map(|s| s.name.clone())
                .collect()
        };
        let all = ["lock", "from_acct", "to_acct", "record"];
        assert_eq!(steps(Backend::Postgres), all);
        assert_eq!(steps(Backend::Sqlite), all);
        assert_eq!(
            steps(Backend::MySql),
            ["lock", "from_acct", "to_acct", "move", "record"]
        );
    }
}
