//! The operations file: its TOML shape, and the checks that run when it is loaded.
//!
//! ```toml
//! [transfer]                                  # the job type
//! isolation = "read_committed"                # optional
//! timeout = "5s"                              # optional
//! params = { from = "integer", to = "integer", amount = "integer" }
//! result = { from = "from_acct", to = "to_acct" }   # or result = "step"
//!
//! [[transfer.steps]]
//! name = "debit"
//! sql = "UPDATE accounts SET balance = balance - :amount WHERE id = :from AND balance >= :amount"
//! expect_rows = 1
//! error_code = "insufficient_funds"
//! ```

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Deserialize;

use super::constraints::Constraints;
use super::params::{ParamSpec, ParamType};
use super::sql::{Placeholder, parse_names};
use crate::db::{Backend, Isolation};

/// Parameter names every operation can use.
pub(super) const BUILTINS: [&str; 4] = ["$message_id", "$correlation_id", "$attempt", "$now"];

/// One operation: a job type defined by SQL steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// Isolation level of its transaction. Default: the database's own.
    #[serde(default)]
    pub isolation: Option<Isolation>,
    /// Timeout of one attempt. Default: the worker's `job_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Declared parameters: name → type (or a table with `type`, `nullable`,
    /// `default` and constraints), kept in the order the file declares them.
    #[serde(default)]
    pub params: Params,
    /// The steps, run in order in one transaction.
    pub steps: Vec<Step>,
    /// What the `ok` reply's `result` is: one step's rows (a string), or an object
    /// composed of several steps (a table of key → step). Default: the last step.
    #[serde(default)]
    pub result: Option<ResultSpec>,
}

/// The declared parameters, by name (what [`Params`] derefs to), and in the order
/// the file declares them: the order their constraints are checked in, so the
/// first one declared answers when several fail.
#[derive(Debug, Clone, Default)]
pub struct Params {
    by_name: BTreeMap<String, ParamDecl>,
    order: Vec<String>,
}

impl Params {
    /// The parameters in the order the file declares them.
    pub fn in_order(&self) -> impl Iterator<Item = (&String, &ParamDecl)> {
        self.order
            .iter()
            .filter_map(|name| self.by_name.get_key_value(name))
    }
}

impl std::ops::Deref for Params {
    type Target = BTreeMap<String, ParamDecl>;

    fn deref(&self) -> &Self::Target {
        &self.by_name
    }
}

impl FromIterator<(String, ParamDecl)> for Params {
    fn from_iter<I: IntoIterator<Item = (String, ParamDecl)>>(iter: I) -> Self {
        let mut params = Self::default();
        for (name, decl) in iter {
            if params.by_name.insert(name.clone(), decl).is_none() {
                params.order.push(name);
            }
        }
        params
    }
}

/// The TOML parser hands a table over sorted by key; each value's place in the
/// text gives the order back.
impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let table = BTreeMap::<String, toml::Spanned<ParamDecl>>::deserialize(d)?;
        let mut listed: Vec<(usize, String, ParamDecl)> = table
            .into_iter()
            .map(|(name, decl)| (decl.span().start, name, decl.into_inner()))
            .collect();
        listed.sort_by_key(|(at, _, _)| *at);
        Ok(listed.into_iter().map(|(_, n, d)| (n, d)).collect())
    }
}

/// A parameter declaration: `"integer"` or `{ type = "integer", nullable = true }`.
#[derive(Debug, Clone)]
pub enum ParamDecl {
    /// Just the type.
    Type(ParamType),
    /// Type and options.
    Full(Box<ParamSpec>),
}

/// By hand rather than `untagged`, whose error ("did not match any variant of
/// untagged enum") says neither what was wrong nor what would do.
impl<'de> Deserialize<'de> for ParamDecl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let types = || {
            ParamType::ALL
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match toml::Value::deserialize(d)? {
            toml::Value::String(name) => ParamType::ALL
                .iter()
                .find(|t| t.name() == name)
                .map(|t| Self::Type(*t))
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "unknown parameter type `{name}`; the types are: {}",
                        types()
                    ))
                }),
            table @ toml::Value::Table(_) => table
                .try_into::<ParamSpec>()
                .map(|spec| Self::Full(Box::new(spec)))
                .map_err(|e| D::Error::custom(e.message().trim().to_owned())),
            other => Err(D::Error::custom(format!(
                "a parameter is a type name ({}) or a table {{ type = …, nullable = …, default = … }}, not {}",
                types(),
                other.type_str()
            ))),
        }
    }
}

impl ParamDecl {
    /// The declaration as a full spec.
    pub fn spec(&self) -> ParamSpec {
        match self {
            Self::Type(t) => ParamSpec::of(*t),
            Self::Full(s) => (**s).clone(),
        }
    }
}

/// One SQL statement of an operation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Its name, for references (`:lock.balance`), results and error messages.
    pub name: String,
    /// The SQL, with named parameters (`:from`).
    pub sql: String,
    /// Overrides of `sql` per backend.
    #[serde(default)]
    pub sql_mysql: Option<String>,
    /// PostgreSQL's `sql`.
    #[serde(default)]
    pub sql_postgres: Option<String>,
    /// SQLite's `sql`.
    #[serde(default)]
    pub sql_sqlite: Option<String>,
    /// The backends the step runs on (`mysql`, which is MySQL and MariaDB,
    /// `postgres`, `sqlite`). Default: all; on the others it is left out.
    #[serde(default)]
    pub backends: Option<Vec<StepBackend>>,
    /// Rows returned (or affected) must be exactly this.
    #[serde(default)]
    pub expect_rows: Option<u64>,
    /// Rows returned (or affected) must be at least this.
    #[serde(default)]
    pub expect_min_rows: Option<u64>,
    /// Rows returned (or affected) must be at most this.
    #[serde(default)]
    pub expect_max_rows: Option<u64>,
    /// The rejection code when an expectation fails. Default `expectation_failed`.
    #[serde(default)]
    pub error_code: Option<String>,
    /// The rejection message when an expectation fails.
    #[serde(default)]
    pub error_message: Option<String>,
    /// Columns to read as JSON where the database cannot say (MariaDB's JSON is
    /// LONGTEXT; SQLite's is TEXT unless declared `JSON`).
    #[serde(default)]
    pub json_columns: Vec<String>,
}

/// A backend as a step's `backends` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepBackend {
    /// MySQL and MariaDB.
    Mysql,
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

impl From<Backend> for StepBackend {
    fn from(b: Backend) -> Self {
        match b {
            Backend::MySql => Self::Mysql,
            Backend::Postgres => Self::Postgres,
            Backend::Sqlite => Self::Sqlite,
        }
    }
}

impl Step {
    /// Whether the step runs on `backend`.
    pub fn runs_on(&self, backend: Backend) -> bool {
        self.backends
            .as_ref()
            .is_none_or(|on| on.contains(&StepBackend::from(backend)))
    }

    /// The SQL text for `backend`.
    pub fn sql_for(&self, backend: Backend) -> &str {
        let special = match backend {
            Backend::MySql => &self.sql_mysql,
            Backend::Postgres => &self.sql_postgres,
            Backend::Sqlite => &self.sql_sqlite,
        };
        special.as_deref().unwrap_or(&self.sql)
    }

    /// Whether the step yields one row at most, so its result is an object.
    pub fn single_row(&self) -> bool {
        self.expect_rows.is_some_and(|n| n <= 1) || self.expect_max_rows.is_some_and(|n| n <= 1)
    }
}

/// `result = "step"` or `result = { key = "step", … }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ResultSpec {
    /// One step's rows.
    Step(String),
    /// An object of several steps' rows.
    Object(BTreeMap<String, String>),
}

/// A problem in the operations file, with its place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{place}: {problem}")]
pub struct SpecError {
    /// `operation `transfer`, step 2 (`debit`)`
    pub place: String,
    /// What is wrong.
    pub problem: String,
}

pub(super) use crate::db::batch::ON_BATCH_COMPLETE;

/// The batch callback's parameters: the completion's fields.
pub(super) const BATCH_CALLBACK_PARAMS: [(&str, ParamType); 8] = [
    ("batch_id", ParamType::String),
    ("revision", ParamType::Integer),
    ("size", ParamType::Integer),
    ("ok", ParamType::Integer),
    ("rejected", ParamType::Integer),
    ("failed", ParamType::Integer),
    ("opened_at", ParamType::Timestamp),
    ("completed_at", ParamType::Timestamp),
];

/// Gives the batch callback its parameters; a file that declares its own, or a
/// result nobody reads, is told so.
pub(super) fn batch_callback_params(op: &mut Operation) -> Vec<SpecError> {
    let place = format!("`{ON_BATCH_COMPLETE}`");
    let names: Vec<&str> = BATCH_CALLBACK_PARAMS.iter().map(|(n, _)| *n).collect();
    let mut errors = Vec::new();
    if !op.params.is_empty() {
        errors.push(SpecError {
            place: place.clone(),
            problem: format!(
                "declares params, but its parameters are given: :{}",
                names.join(", :")
            ),
        });
    }
    if op.result.is_some() {
        errors.push(SpecError {
            place,
            problem: "has no reply, so no result".into(),
        });
    }
    op.params = BATCH_CALLBACK_PARAMS
        .iter()
        .map(|(n, t)| ((*n).to_owned(), ParamDecl::Type(*t)))
        .collect();
    errors
}

/// The file: operation name → operation.
pub type OpsFile = BTreeMap<String, Operation>;

/// Checks every operation; returns the errors (fatal) and warnings (unused
/// parameters). Each names its operation and step.
pub fn check(ops: &OpsFile) -> (Vec<SpecError>, Vec<SpecError>) {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    for (name, op) in ops {
        let at_op = format!("operation `{name}`");
        let err = |place: &str, problem: String| SpecError {
            place: place.to_owned(),
            problem,
        };
        if name.is_empty() || name.len() > 255 {
            errors.push(err(&at_op, "the name must be 1 to 255 bytes long".into()));
        }
        if op.steps.is_empty() {
            errors.push(err(&at_op, "has no steps".into()));
        }
        for (p, decl) in op.params.in_order() {
            if !valid_ident(p) {
                errors.push(err(
                    &at_op,
                    format!("parameter name `{p}` must be letters, digits and _"),
                ));
            }
            let spec = decl.spec();
            if let Err(problem) = spec.check_default() {
                errors.push(err(&at_op, format!("parameter `{p}`: {problem}")));
                continue;
            }
            match Constraints::compile(p, &spec) {
                Err(problems) => errors.extend(
                    problems
                        .into_iter()
                        .map(|problem| err(&at_op, format!("parameter `{p}`: {problem}"))),
                ),
                Ok(Some(c)) => {
                    if let Some(other) = c.not_equal() {
                        let problem = match op.params.get(other).map(ParamDecl::spec) {
                            _ if other == p => Some("not_equal names the parameter itself".into()),
                            None => Some(format!("not_equal names no parameter `{other}`")),
                            Some(o) if o.kind != spec.kind => Some(format!(
                                "not_equal names `{other}`, a {} parameter, not {}",
                                o.kind.name(),
                                spec.kind.name()
                            )),
                            Some(_) => None,
                        };
                        if let Some(problem) = problem {
                            errors.push(err(&at_op, format!("parameter `{p}`: {problem}")));
                        }
                    }
                }
                Ok(None) => {}
            }
        }
        let mut used: HashSet<String> = HashSet::new();
        let mut seen_steps: Vec<&str> = Vec::new();
        for (i, step) in op.steps.iter().enumerate() {
            let at = format!("operation `{name}`, step {} (`{}`)", i + 1, step.name);
            if !valid_ident(&step.name) {
                errors.push(err(
                    &at,
                    "the step name must be letters, digits and _".into(),
                ));
            }
            if seen_steps.contains(&step.name.as_str()) {
                errors.push(err(&at, format!("duplicate step name `{}`", step.name)));
            }
            let later: Vec<&str> = op.steps[i + 1..].iter().map(|s| s.name.as_str()).collect();
            // Each text as each backend that runs it reads it.
            let backends: Vec<Backend> = ALL_BACKENDS
                .into_iter()
                .filter(|b| step.runs_on(*b))
                .collect();
            if backends.is_empty() {
                errors.push(err(
                    &at,
                    "backends lists no backend: it would run nowhere".into(),
                ));
            }
            let mut problems: Vec<(String, Vec<Backend>)> = Vec::new();
            for backend in backends.iter().copied() {
                let names = match parse_names(step.sql_for(backend), backend) {
                    Ok(n) => n,
                    Err(problem) => {
                        match problems.iter_mut().find(|(p, _)| *p == problem) {
                            Some((_, on)) => on.push(backend),
                            None => problems.push((problem, vec![backend])),
                        }
                        continue;
                    }
                };
                for ph in names {
                    let problem = match ph {
                        Placeholder::Param(p) => {
                            if op.params.contains_key(&p) {
                                used.insert(p);
                                continue;
                            } else if BUILTINS.contains(&p.as_str()) {
                                continue;
                            }
                            format!("unknown parameter `:{p}`")
                        }
                        Placeholder::Column(s, _) => {
                            if later.contains(&s.as_str()) || s == step.name {
                                format!("`:{s}.…` refers to a step that has not run yet")
                            } else if !seen_steps.contains(&s.as_str()) {
                                format!("`:{s}.…` refers to no step")
                            } else if op
                                .steps
                                .iter()
                                .any(|earlier| earlier.name == s && !earlier.runs_on(backend))
                            {
                                format!(
                                    "`:{s}.…` refers to a step that does not run on this backend"
                                )
                            } else {
                                continue;
                            }
                        }
                    };
                    match problems.iter_mut().find(|(p, _)| *p == problem) {
                        Some((_, on)) if !on.contains(&backend) => on.push(backend),
                        Some(_) => {}
                        None => problems.push((problem, vec![backend])),
                    }
                }
            }
            for (problem, on) in problems {
                if on.len() == backends.len() {
                    errors.push(err(&at, problem));
                } else {
                    let names: Vec<&str> = on.iter().map(|b| backend_name(*b)).collect();
                    errors.push(err(
                        &at,
                        format!("{problem} (as {} read it)", names.join(" and ")),
                    ));
                }
            }
            if step.expect_rows.is_some()
                && (step.expect_min_rows.is_some() || step.expect_max_rows.is_some())
            {
                errors.push(err(
                    &at,
                    "expect_rows excludes expect_min_rows and expect_max_rows".into(),
                ));
            }
            seen_steps.push(&step.name);
        }
        let result_steps: Vec<&String> = match &op.result {
            None => op.steps.last().map(|s| &s.name).into_iter().collect(),
            Some(ResultSpec::Step(s)) => vec![s],
            Some(ResultSpec::Object(m)) => m.values().collect(),
        };
        for s in result_steps {
            match op.steps.iter().find(|step| step.name == *s) {
                None => errors.push(err(&at_op, format!("result names no step `{s}`"))),
                Some(step) => {
                    let missing: Vec<&str> = ALL_BACKENDS
                        .into_iter()
                        .filter(|b| !step.runs_on(*b))
                        .map(backend_name)
                        .collect();
                    if !missing.is_empty() && missing.len() < ALL_BACKENDS.len() {
                        let what = if op.result.is_some() {
                            "result names"
                        } else {
                            "the result is (by default) the last"
                        };
                        errors.push(err(
                            &at_op,
                            format!(
                                "{what} step `{s}`, which does not run on {}",
                                missing.join(" and ")
                            ),
                        ));
                    }
                }
            }
        }
        for p in op.params.keys() {
            if !used.contains(p) {
                warnings.push(err(&at_op, format!("parameter `{p}` is never used")));
            }
        }
    }
    (errors, warnings)
}

const ALL_BACKENDS: [Backend; 3] = [Backend::MySql, Backend::Postgres, Backend::Sqlite];

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::MySql => "MySQL/MariaDB",
        Backend::Postgres => "PostgreSQL",
        Backend::Sqlite => "SQLite",
    }
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}
