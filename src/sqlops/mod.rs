//! Job types defined in a TOML file as named, parameterized SQL steps: a
//! transactional database API over RabbitMQ without writing Rust.
//!
//! `txq run --ops FILE` registers one handler per operation; `txq ops check FILE`
//! checks a file; `txq ops schema FILE` prints JSON Schemas of the payloads.

mod constraints;
mod exec;
mod params;
mod pg;
mod schema;
mod spec;
mod sql;

use std::path::Path;

pub use constraints::Refusal;
pub use exec::OpsHandler;
pub use params::{JsonText, ParamSpec, ParamType, Value};
pub use schema::schemas;
pub use spec::{Operation, OpsFile, ParamDecl, ResultSpec, SpecError, Step, check};
pub use sql::{Compiled, Placeholder, compile, parse_names};

use crate::WorkerBuilder;
use crate::config::JobConfig;
use crate::db::Backend;

/// Why an operations file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML of the expected shape (the message has line and column).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// It parses, but some operations are wrong; each error names its place.
    #[error("{path}: {}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        /// The file.
        path: String,
        /// Every problem found.
        errors: Vec<SpecError>,
    },
}

/// A loaded and checked operations file.
#[derive(Debug, Clone)]
pub struct Ops {
    /// The operations by name.
    pub operations: OpsFile,
    /// `[on_batch_complete]`: steps run once per batch completion revision, in
    /// their own transaction, with the completion's fields as parameters.
    pub on_batch_complete: Option<Operation>,
    /// Unused parameters and the like.
    pub warnings: Vec<SpecError>,
}

/// Reads, parses and checks `path`.
pub fn load(path: &Path) -> Result<Ops, OpsError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| OpsError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text).map_err(|e| match e {
        OpsError::Parse { message, .. } => OpsError::Parse {
            path: shown.clone(),
            message,
        },
        OpsError::Invalid { errors, .. } => OpsError::Invalid {
            path: shown.clone(),
            errors,
        },
        other => other,
    })
}

/// Parses and checks the text of an operations file.
pub fn parse(text: &str) -> Result<Ops, OpsError> {
    let mut operations: OpsFile = toml::from_str(text).map_err(|e| OpsError::Parse {
        path: String::new(),
        message: one_line(text, &e),
    })?;
    // The callback's parameters are given; it is checked as an operation with them.
    let mut errors = Vec::new();
    if let Some(op) = operations.get_mut(spec::ON_BATCH_COMPLETE) {
        errors.extend(spec::batch_callback_params(op));
    }
    let (more, warnings) = check(&operations);
    errors.extend(more);
    let on_batch_complete = operations.remove(spec::ON_BATCH_COMPLETE);
    let callback = format!("`{}`", spec::ON_BATCH_COMPLETE);
    let warnings = warnings
        .into_iter()
        .filter(|w| !w.place.contains(&callback))
        .collect();
    if !errors.is_empty() {
        return Err(OpsError::Invalid {
            path: String::new(),
            errors,
        });
    }
    Ok(Ops {
        operations,
        on_batch_complete,
        warnings,
    })
}

/// toml's error as `line L, column C: message`, without its drawing of the line.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

impl Ops {
    /// Registers one handler per operation on `builder`, compiled for `backend`,
    /// with each operation's isolation and timeout as defaults: the config's
    /// `jobs.<type>` (file or `TXQ_JOBS__<TYPE>__…`) wins where it sets one.
    pub fn register(
        &self,
        mut builder: WorkerBuilder,
        backend: Backend,
    ) -> Result<WorkerBuilder, SpecError> {
        for (name, op) in &self.operations {
            let handler = OpsHandler::new(name, op, backend)?;
            builder = builder
                .job_defaults(
                    name,
                    JobConfig {
                        isolation: op.isolation,
                        timeout: op.timeout,
                    },
                )
                .handler(name.clone(), handler);
        }
        if let Some(op) = &self.on_batch_complete {
            let handler = OpsHandler::new(spec::ON_BATCH_COMPLETE, op, backend)?;
            let settings = JobConfig {
                isolation: op.isolation,
                timeout: op.timeout,
            };
            builder = builder.on_batch_complete(handler, settings);
        }
        Ok(builder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Err(OpsError::Invalid { errors, .. }) => {
                errors.iter().map(ToString::to_string).collect()
            }
            Err(e) => vec![e.to_string()],
            Ok(_) => vec![],
        }
    }

    #[test]
    fn the_bank_file_checks_clean() {
        let ops = parse(include_str!("../../examples/bank/ops.toml")).expect("valid");
        assert_eq!(ops.operations.len(), 3);
        assert!(ops.warnings.is_empty(), "{:?}", ops.warnings);
    }

    #[test]
    fn the_batch_callback_has_its_parameters_given_and_is_no_job_type() {
        let step = "[[on_batch_complete.steps]]\nname = \"s\"\nsql = \"UPDATE t SET n = :failed WHERE id = :batch_id\"\n";
        let ops = parse(step).expect("valid");
        assert!(ops.operations.is_empty());
        assert!(ops.on_batch_complete.is_some());
        assert!(ops.warnings.is_empty(), "{:?}", ops.warnings);
        let e = errors(&format!(
            "[on_batch_complete]\nparams = {{ n = \"integer\" }}\n{step}"
        ));
        assert!(
            e.iter()
                .any(|e| e.contains("its parameters are given: :batch_id, :revision")),
            "{e:?}"
        );
        let e = errors(&step.replace(":failed", ":fialed"));
        assert_eq!(
            e,
            ["operation `on_batch_complete`, step 1 (`s`): unknown parameter `:fialed`"]
        );
        let e = errors(&format!("[on_batch_complete]\nresult = \"s\"\n{step}"));
        assert!(e.iter().any(|e| e.contains("no result")), "{e:?}");
    }

    #[test]
    fn a_bad_parameter_declaration_says_what_would_do() {
        let steps = "[[t.steps]]\nname = \"s\"\nsql = \"SELECT :a\"\n";
        let e = errors(&format!("[t]\nparams = {{ a = \"integr\" }}\n{steps}"));
        assert_eq!(e.len(), 1);
        assert!(
            e[0].contains("unknown parameter type `integr`")
                && e[0].contains(
                    "integer, float, decimal, string, bool, json, timestamp, date, bytes"
                ),
            "{e:?}"
        );
        assert!(!e[0].contains("untagged"), "{e:?}");
        let e = errors(&format!(
            "[t]\nparams = {{ a = {{ typ = \"integer\" }} }}\n{steps}"
        ));
        assert!(e[0].contains("unknown field `typ`"), "{e:?}");
        let e = errors(&format!("[t]\nparams = {{ a = 3 }}\n{steps}"));
        assert!(
            e[0].contains("a type name (integer,") && e[0].contains("integer"),
            "{e:?}"
        );
        let ok = parse(
            "[t]\nparams = { a = \"date\", b = { type = \"integer\", nullable = true, default = 3 } }\n[[t.steps]]\nname = \"s\"\nsql = \"SELECT :a, :b\"\n",
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn constraints_are_checked_at_load_naming_the_parameter() {
        let file = |b: &str| {
            format!(
                "[t.params]\na = \"string\"\nb = {{ type = \"integer\", {b} }}\n[[t.steps]]\nname = \"s\"\nsql = \"SELECT :a, :b\"\n"
            )
        };
        let at = "operation `t`: parameter `b`: ";
        for (b, want) in [
            ("not_equal = \"c\"", "not_equal names no parameter `c`"),
            ("not_equal = \"b\"", "not_equal names the parameter itself"),
            (
                "not_equal = \"a\"",
                "not_equal names `a`, a string parameter, not integer",
            ),
            (
                "pattern = \"^1\"",
                "pattern is for string parameters, not integer",
            ),
            (
                "minimum = 5, maximum = 4",
                "minimum 5 and maximum 4 leave no value",
            ),
        ] {
            assert_eq!(errors(&file(b)), [format!("{at}{want}")], "{b}");
        }
        let e = errors(
            "[t]\nparams = { s = { type = \"string\", pattern = \"[a-\" } }\n[[t.steps]]\nname = \"s\"\nsql = \"SELECT :s\"\n",
        );
        assert!(
            e.len() == 1
                && e[0].starts_with(
                    "operation `t`: parameter `s`: pattern `[a-` is not a regular expression: "
                ),
            "{e:?}"
        );
        let e = errors(&file("maximum = 5, max = 4"));
        assert!(e[0].contains("unknown field `max`"), "{e:?}");
    }

    #[test]
    fn constraints_answer_in_the_order_the_parameters_are_declared() {
        let to = "to = { type = \"integer\", not_equal = \"from\", error_code = \"same_account\" }";
        let amount =
            "amount = { type = \"integer\", minimum = 1, error_code = \"invalid_amount\" }";
        let steps = "[[t.steps]]\nname = \"s\"\nsql = \"SELECT :from, :to, :amount\"\n";
        let cases = [
            (
                format!("[t.params]\nfrom = \"integer\"\n{to}\n{amount}\n"),
                "same_account",
            ),
            (
                format!("[t.params]\nfrom = \"integer\"\n{amount}\n{to}\n"),
                "invalid_amount",
            ),
            (
                format!("[t]\nparams = {{ {amount}, from = \"integer\", {to} }}\n"),
                "invalid_amount",
            ),
            (
                format!("[t]\nparams.{to}\nparams.from = \"integer\"\nparams.{amount}\n"),
                "same_account",
            ),
            (
                "[t.params.amount]\ntype = \"integer\"\nminimum = 1\nerror_code = \"invalid_amount\"\n[t.params.from]\ntype = \"integer\"\n[t.params.to]\ntype = \"integer\"\nnot_equal = \"from\"\nerror_code = \"same_account\"\n"
                    .to_owned(),
                "invalid_amount",
            ),
            (
                "[t.params.to]\ntype = \"integer\"\nnot_equal = \"from\"\nerror_code = \"same_account\"\n[t.params.amount]\ntype = \"integer\"\nminimum = 1\nerror_code = \"invalid_amount\"\n[t.params.from]\ntype = \"integer\"\n"
                    .to_owned(),
                "same_account",
            ),
        ];
        for (params, want) in cases {
            let ops = parse(&format!("{params}{steps}")).expect("valid");
            let handler =
                OpsHandler::new("t", &ops.operations["t"], Backend::Sqlite).expect("compiles");
            let e = handler
                .check_payload(r#"{"from": 3, "to": 3, "amount": 0}"#)
                .expect_err("refused");
            assert_eq!(e.code, want, "{params}");
            assert!(
                handler
                    .check_payload(r#"{"from": 3, "to": 4, "amount": 1}"#)
                    .is_ok()
            );
        }
    }

    #[test]
    fn steps_left_out_on_some_backend_are_checked() {
        let a = "[[t.steps]]\nname = \"a\"\nsql = \"SELECT 1 AS x\"\n";
        let m = "[[t.steps]]\nname = \"m\"\nbackends = [\"mysql\"]\nsql = \"SELECT 2 AS x\"\n";
        assert_eq!(
            errors(&format!("[t]\nresult = \"m\"\n{a}{m}")),
            ["operation `t`: result names step `m`, which does not run on PostgreSQL and SQLite"]
        );
        assert_eq!(
            errors(&format!("[t]\n{a}{m}")),
            [
                "operation `t`: the result is (by default) the last step `m`, which does not run on PostgreSQL and SQLite"
            ]
        );
        assert_eq!(
            errors(&format!(
                "[t]\n{m}[[t.steps]]\nname = \"b\"\nsql = \"SELECT :m.x AS y\"\n"
            )),
            [
                "operation `t`, step 2 (`b`): `:m.…` refers to a step that does not run on this backend (as PostgreSQL and SQLite read it)"
            ]
        );
        assert_eq!(
            errors("[t]\n[[t.steps]]\nname = \"n\"\nbackends = []\nsql = \"SELECT 1\"\n"),
            ["operation `t`, step 1 (`n`): backends lists no backend: it would run nowhere"]
        );
        let e =
            errors("[t]\n[[t.steps]]\nname = \"n\"\nbackends = [\"oracle\"]\nsql = \"SELECT 1\"\n");
        assert!(e[0].contains("oracle"), "{e:?}");
        assert!(parse(&format!("[t]\nresult = \"a\"\n{m}{a}")).is_ok());
    }

    #[test]
    fn errors_point_at_the_operation_and_step() {
        let e = errors(
            "[t]\nparams = { a = \"integer\" }\n[[t.steps]]\nname = \"one\"\nsql = \"SELECT :a, :b\"\n",
        );
        assert_eq!(e, ["operation `t`, step 1 (`one`): unknown parameter `:b`"]);

        let e = errors(
            "[t]\n[[t.steps]]\nname = \"one\"\nsql = \"SELECT :two.x\"\n[[t.steps]]\nname = \"two\"\nsql = \"SELECT 1 AS x\"\n",
        );
        assert_eq!(
            e,
            ["operation `t`, step 1 (`one`): `:two.…` refers to a step that has not run yet"]
        );

        let e = errors(
            "[t]\n[[t.steps]]\nname = \"a\"\nsql = \"SELECT 1\"\n[[t.steps]]\nname = \"a\"\nsql = \"SELECT 2\"\n",
        );
        assert_eq!(e, ["operation `t`, step 2 (`a`): duplicate step name `a`"]);

        let e = errors("[t]\nresult = \"nope\"\n[[t.steps]]\nname = \"a\"\nsql = \"SELECT 1\"\n");
        assert_eq!(e, ["operation `t`: result names no step `nope`"]);

        let e = errors(
            "[t]\nparams = { n = { type = \"integer\", default = \"x\" } }\n[[t.steps]]\nname = \"a\"\nsql = \"SELECT :n\"\n",
        );
        assert_eq!(e, ["operation `t`: parameter `n`: default must be integer"]);
    }

    #[test]
    fn bad_types_and_syntax_name_the_line() {
        let e = errors(
            "[t]\nparams = { a = \"integr\" }\n[[t.steps]]\nname = \"a\"\nsql = \"SELECT :a\"\n",
        );
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("line 2"), "{e:?}");
        let e = errors("[t\n");
        assert!(e[0].contains("line 1"), "{e:?}");
        let e = errors("[t]\nisolation = \"sometimes\"\nsteps = []\n");
        assert!(e[0].contains("sometimes"), "{e:?}");
    }

    #[test]
    fn unused_parameters_warn() {
        let ops = parse(
            "[t]\nparams = { a = \"integer\" }\n[[t.steps]]\nname = \"s\"\nsql = \"SELECT 1\"\n",
        )
        .expect("valid");
        assert_eq!(ops.warnings.len(), 1);
        assert_eq!(
            ops.warnings[0].to_string(),
            "operation `t`: parameter `a` is never used"
        );
    }

    #[test]
    fn payloads_are_checked_against_the_declarations() {
        use std::collections::BTreeMap;
        let spec = |kind, nullable| ParamSpec {
            nullable,
            ..ParamSpec::of(kind)
        };
        let params: BTreeMap<String, ParamSpec> = [
            ("n".to_owned(), spec(ParamType::Integer, false)),
            ("d".to_owned(), spec(ParamType::Decimal, false)),
            ("note".to_owned(), spec(ParamType::String, true)),
        ]
        .into();
        let check = |payload: serde_json::Value| {
            let raw = serde_json::value::to_raw_value(&payload).expect("json");
            params::bind_payload(&params, &raw)
        };
        let ok = check(serde_json::json!({"n": 1, "d": "12.50"})).expect("ok");
        assert_eq!(ok["n"], Value::Integer(1));
        assert_eq!(ok["note"], Value::Null(Some(ParamType::String)));
        let e = check(serde_json::json!({"d": "1"})).unwrap_err();
        assert_eq!(e, "parameter `n` is missing");
        let e = check(serde_json::json!({"n": "1", "d": "1"})).unwrap_err();
        assert_eq!(e, "parameter `n` must be integer");
        let e = check(serde_json::json!({"n": 1, "d": "1", "x": 2})).unwrap_err();
        assert_eq!(e, "unknown parameter `x`");
        let e = check(serde_json::json!({"n": 1, "d": "1e"})).unwrap_err();
        assert_eq!(e, "parameter `d` must be decimal");
    }
}
