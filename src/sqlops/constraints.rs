//! Parameter constraints: JSON Schema's `minimum`, `maximum`, `exclusiveMinimum`,
//! `exclusiveMaximum`, `enum`, `pattern`, `minLength` and `maxLength`, and
//! `not_equal` (another parameter). Checked against the type when the file is
//! loaded; checked on the bound values before any SQL runs; printed by
//! `txq ops schema` as the same keywords (`not_equal` as `x-not-equal`).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use regex::Regex;
use serde_json::{Map, Value as Json, json};
use sqlx::types::BigDecimal;

use super::params::{ParamSpec, ParamType, Value, decimal_grammar, exact_decimal};

/// The code of a refusal when the parameter declares none: the one a wrongly
/// typed value gets.
pub(super) const DEFAULT_CODE: &str = "invalid_parameter";

/// A payload refused before any SQL runs: the `rejected` reply's code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    /// `invalid_parameter`, or the parameter's `error_code`.
    pub code: String,
    /// What was wrong, or the parameter's `error_message`.
    pub message: String,
}

/// A bound, of its parameter's type: exact for integers and decimals, a 64-bit
/// float (as a JSON Schema validator compares) for floats.
#[derive(Debug, Clone)]
enum Number {
    Int(i64),
    Float(f64),
    Decimal(BigDecimal),
}

impl Number {
    /// `value` compared with the bound; `None` for a value of another type (the
    /// load-time checks make that impossible).
    fn compare(&self, value: &Value) -> Option<Ordering> {
        match (value, self) {
            (Value::Integer(v), Self::Int(b)) => Some(v.cmp(b)),
            (Value::Float(v), Self::Float(b)) => v.partial_cmp(b),
            (Value::Decimal(v), Self::Decimal(b)) => Some(v.cmp(b)),
            _ => None,
        }
    }

    fn cmp(&self, other: &Self) -> Option<Ordering> {
        match (self, other) {
            (Self::Int(a), Self::Int(b)) => Some(a.cmp(b)),
            (Self::Float(a), Self::Float(b)) => a.partial_cmp(b),
            (Self::Decimal(a), Self::Decimal(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }

    fn text(&self) -> String {
        match self {
            Self::Int(i) => i.to_string(),
            Self::Float(f) => f.to_string(),
            Self::Decimal(d) => d.to_plain_string(),
        }
    }

    /// As a JSON number. A decimal's is read as a validator reads numbers (a
    /// 64-bit float); `None` if it is beyond one.
    fn json(&self) -> Option<Json> {
        match self {
            Self::Int(i) => Some(json!(i)),
            Self::Float(f) => serde_json::Number::from_f64(*f).map(Json::Number),
            Self::Decimal(d) => serde_json::from_str::<serde_json::Number>(&d.to_plain_string())
                .ok()
                .filter(|n| n.as_f64().is_some_and(f64::is_finite))
                .map(Json::Number),
        }
    }
}

/// Which bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    Minimum,
    ExclusiveMinimum,
    Maximum,
    ExclusiveMaximum,
}

impl Bound {
    fn keyword(self) -> &'static str {
        match self {
            Self::Minimum => "minimum",
            Self::ExclusiveMinimum => "exclusiveMinimum",
            Self::Maximum => "maximum",
            Self::ExclusiveMaximum => "exclusiveMaximum",
        }
    }

    fn lower(self) -> bool {
        matches!(self, Self::Minimum | Self::ExclusiveMinimum)
    }

    fn exclusive(self) -> bool {
        matches!(self, Self::ExclusiveMinimum | Self::ExclusiveMaximum)
    }

    /// Whether a value that compares so with the bound meets it.
    fn met(self, o: Ordering) -> bool {
        match self {
            Self::Minimum => o != Ordering::Less,
            Self::ExclusiveMinimum => o == Ordering::Greater,
            Self::Maximum => o != Ordering::Greater,
            Self::ExclusiveMaximum => o == Ordering::Less,
        }
    }

    fn problem(self, n: &Number) -> String {
        let n = n.text();
        match self {
            Self::Minimum => format!("must be at least {n}"),
            Self::ExclusiveMinimum => format!("must be greater than {n}"),
            Self::Maximum => format!("must be at most {n}"),
            Self::ExclusiveMaximum => format!("must be less than {n}"),
        }
    }
}

/// One parameter's constraints, checked against its type.
#[derive(Debug, Clone)]
pub(super) struct Constraints {
    name: String,
    one_of: Option<Vec<(Value, Json)>>,
    bounds: Vec<(Bound, Number)>,
    min_length: Option<u64>,
    max_length: Option<u64>,
    pattern: Option<(Regex, String)>,
    not_equal: Option<String>,
    code: Option<String>,
    message: Option<String>,
}

/// The types each constraint fits.
const NUMERIC: [ParamType; 3] = [ParamType::Integer, ParamType::Float, ParamType::Decimal];
const ENUMERABLE: [ParamType; 3] = [ParamType::Integer, ParamType::Float, ParamType::String];
const COMPARABLE: [ParamType; 5] = [
    ParamType::Integer,
    ParamType::Float,
    ParamType::Decimal,
    ParamType::String,
    ParamType::Date,
];

fn names(types: &[ParamType]) -> String {
    let names: Vec<&str> = types.iter().map(|t| t.name()).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

impl Constraints {
    /// The constraints of parameter `name`, checked against its type: `Ok(None)`
    /// when it declares none, `Err` with every problem found. `not_equal` is
    /// checked against the other parameters by the caller.
    pub(super) fn compile(name: &str, spec: &ParamSpec) -> Result<Option<Self>, Vec<String>> {
        let mut problems = Vec::new();
        let kind = spec.kind;
        let fits = |keyword: &str, types: &[ParamType], problems: &mut Vec<String>| {
            let ok = types.contains(&kind);
            if !ok {
                problems.push(format!(
                    "{keyword} is for {} parameters, not {}",
                    names(types),
                    kind.name()
                ));
            }
            ok
        };

        let mut bounds = Vec::new();
        for (bound, declared) in [
            (Bound::Minimum, &spec.minimum),
            (Bound::ExclusiveMinimum, &spec.exclusive_minimum),
            (Bound::Maximum, &spec.maximum),
            (Bound::ExclusiveMaximum, &spec.exclusive_maximum),
        ] {
            let Some(v) = declared else { continue };
            if !fits(bound.keyword(), &NUMERIC, &mut problems) {
                continue;
            }
            match number(kind, v) {
                Ok(n) => bounds.push((bound, n)),
                Err(p) => problems.push(format!("{} {p}", bound.keyword())),
            }
        }
        // The tightest bound on each side; equal ones, the exclusive.
        let tightest = |lower: bool| {
            bounds.iter().filter(|(b, _)| b.lower() == lower).fold(
                None::<&(Bound, Number)>,
                |best, this| match best {
                    None => Some(this),
                    Some(best) => match (this.1.cmp(&best.1), lower) {
                        (Some(Ordering::Greater), true) | (Some(Ordering::Less), false) => {
                            Some(this)
                        }
                        (Some(Ordering::Equal), _) if this.0.exclusive() => Some(this),
                        _ => Some(best),
                    },
                },
            )
        };
        if let (Some((lb, low)), Some((hb, high))) = (tightest(true), tightest(false)) {
            let empty = match low.cmp(high) {
                Some(Ordering::Greater) => true,
                Some(Ordering::Equal) => lb.exclusive() || hb.exclusive(),
                _ => false,
            };
            if empty {
                problems.push(format!(
                    "{} {} and {} {} leave no value",
                    lb.keyword(),
                    low.text(),
                    hb.keyword(),
                    high.text()
                ));
            }
        }

        let mut one_of = None;
        if let Some(values) = &spec.one_of {
            if fits("enum", &ENUMERABLE, &mut problems) {
                if values.is_empty() {
                    problems.push("enum lists no value".into());
                }
                let mut list = Vec::new();
                for v in values {
                    let plain = ParamSpec::of(kind);
                    match serde_json::to_value(v)
                        .map_err(|e| e.to_string())
                        .and_then(|j| plain.value(&j).map(|value| (value, j)))
                    {
                        Ok(pair) => list.push(pair),
                        Err(e) => problems.push(format!("enum value {v} {e}")),
                    }
                }
                one_of = Some(list);
            }
        }

        for (keyword, declared) in [
            ("minLength", spec.min_length),
            ("maxLength", spec.max_length),
        ] {
            if declared.is_some() {
                fits(keyword, &[ParamType::String], &mut problems);
            }
        }
        if let (Some(lo), Some(hi)) = (spec.min_length, spec.max_length) {
            if lo > hi {
                problems.push(format!("minLength {lo} and maxLength {hi} leave no value"));
            }
        }

        let mut pattern = None;
        if let Some(p) = &spec.pattern {
            if fits("pattern", &[ParamType::String], &mut problems) {
                match Regex::new(p) {
                    Ok(re) => pattern = Some((re, p.clone())),
                    // The error's last line says what is wrong; the others
                    // draw the pattern.
                    Err(e) => {
                        let text = e.to_string();
                        let what = text
                            .lines()
                            .map(str::trim)
                            .rfind(|l| !l.is_empty())
                            .unwrap_or_default();
                        problems.push(format!(
                            "pattern `{p}` is not a regular expression: {}",
                            what.trim_start_matches("error: ")
                        ));
                    }
                }
            }
        }

        if spec.not_equal.is_some() {
            fits("not_equal", &COMPARABLE, &mut problems);
        }
        if spec.error_code.as_deref() == Some("") {
            problems.push("error_code must not be empty".into());
        }

        let constraints = Self {
            name: name.to_owned(),
            one_of,
            bounds,
            min_length: spec.min_length,
            max_length: spec.max_length,
            pattern,
            not_equal: spec.not_equal.clone(),
            code: spec.error_code.clone(),
            message: spec.error_message.clone(),
        };
        let any = constraints.one_of.is_some()
            || !constraints.bounds.is_empty()
            || spec.minimum.is_some()
            || spec.maximum.is_some()
            || spec.exclusive_minimum.is_some()
            || spec.exclusive_maximum.is_some()
            || constraints.min_length.is_some()
            || constraints.max_length.is_some()
            || spec.pattern.is_some()
            || constraints.not_equal.is_some();
        if !any && (spec.error_code.is_some() || spec.error_message.is_some()) {
            problems.push(
                "error_code and error_message are for constraints, and it declares none".into(),
            );
        }
        if problems.is_empty() {
            // A default must meet the constraints it stands in for.
            if let Some(d) = spec.default_json() {
                if let Ok(value) = spec.value(&d) {
                    if let Some(p) = constraints.problem(&value) {
                        problems.push(format!("default {d} {p}"));
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(any.then_some(constraints))
    }

    /// The parameter `not_equal` names, if any.
    pub(super) fn not_equal(&self) -> Option<&str> {
        self.not_equal.as_deref()
    }

    /// What is wrong with a non-null value, by itself (the first constraint it
    /// fails, in the order: enum, bounds, lengths, pattern).
    fn problem(&self, value: &Value) -> Option<String> {
        if let Some(list) = &self.one_of {
            if !list.iter().any(|(v, _)| v == value) {
                let shown: Vec<String> = list.iter().map(|(_, j)| j.to_string()).collect();
                return Some(format!("must be one of {}", shown.join(", ")));
            }
        }
        for (bound, n) in &self.bounds {
            if n.compare(value).is_some_and(|o| !bound.met(o)) {
                return Some(bound.problem(n));
            }
        }
        if let Value::String(s) = value {
            let length = s.chars().count() as u64;
            if let Some(lo) = self.min_length.filter(|lo| length < *lo) {
                return Some(format!("must be at least {lo} characters long"));
            }
            if let Some(hi) = self.max_length.filter(|hi| length > *hi) {
                return Some(format!("must be at most {hi} characters long"));
            }
            if let Some((re, p)) = &self.pattern {
                if !re.is_match(s) {
                    return Some(format!("must match the pattern `{p}`"));
                }
            }
        }
        None
    }

    /// Checks the parameter's bound value against its constraints; `values` are
    /// all the payload's bound values (for `not_equal`). A null meets every
    /// constraint, and so does a value whose `not_equal` partner is null.
    pub(super) fn check(&self, values: &BTreeMap<String, Value>) -> Result<(), Refusal> {
        let Some(value) = values.get(&self.name) else {
            return Ok(());
        };
        if matches!(value, Value::Null(_)) {
            return Ok(());
        }
        let problem = self.problem(value).or_else(|| {
            let other = self.not_equal.as_deref()?;
            (values.get(other) == Some(value)).then(|| format!("must differ from `{other}`"))
        });
        match problem {
            None => Ok(()),
            Some(problem) => Err(Refusal {
                code: self.code.clone().unwrap_or_else(|| DEFAULT_CODE.into()),
                message: self
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("parameter `{}` {problem}", self.name)),
            }),
        }
    }

    /// Adds the constraints to a parameter's JSON Schema, as JSON Schema's own
    /// keywords; `not_equal` as `x-not-equal`, a declared code as `x-error-code`.
    pub(super) fn annotate(&self, schema: &mut Map<String, Json>) {
        if let Some(list) = &self.one_of {
            schema.insert(
                "enum".into(),
                Json::Array(list.iter().map(|(_, j)| j.clone()).collect()),
            );
        }
        for (bound, n) in &self.bounds {
            if let Some(j) = n.json() {
                schema.insert(bound.keyword().into(), j);
            }
        }
        if let Some(n) = self.min_length {
            schema.insert("minLength".into(), json!(n));
        }
        if let Some(n) = self.max_length {
            schema.insert("maxLength".into(), json!(n));
        }
        if let Some((_, p)) = &self.pattern {
            schema.insert("pattern".into(), json!(p));
        }
        if let Some(other) = &self.not_equal {
            schema.insert("x-not-equal".into(), json!(other));
        }
        if let Some(code) = &self.code {
            schema.insert("x-error-code".into(), json!(code));
        }
    }
}

/// A bound as a number of the parameter's type: an integer's must be an
/// integer; a float's any number; a decimal's a number or a string of a
/// decimal (exact: a TOML float is read from its shortest text, `0.1` as 0.1).
fn number(kind: ParamType, v: &toml::Value) -> Result<Number, String> {
    match (kind, v) {
        (ParamType::Integer, toml::Value::Integer(i)) => Ok(Number::Int(*i)),
        (ParamType::Integer, other) => Err(format!(
            "of an integer parameter must be an integer, not {}",
            other.type_str()
        )),
        (ParamType::Float, toml::Value::Integer(i)) => Ok(Number::Float(*i as f64)),
        (ParamType::Float, toml::Value::Float(f)) if f.is_finite() => Ok(Number::Float(*f)),
        (ParamType::Decimal, toml::Value::Integer(i)) => Ok(Number::Decimal(BigDecimal::from(*i))),
        (ParamType::Decimal, toml::Value::Float(f)) if f.is_finite() => {
            exact_decimal(&f.to_string())
                .map(Number::Decimal)
                .map_err(|()| "is out of range".to_owned())
        }
        (ParamType::Decimal, toml::Value::String(s)) if decimal_grammar(s) => exact_decimal(s)
            .map(Number::Decimal)
            .map_err(|()| "is out of range".to_owned()),
        (ParamType::Decimal, _) => Err("must be a finite number or a decimal string".into()),
        _ => Err("must be a finite number".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> ParamSpec {
        toml::from_str(toml_text).expect("a parameter declaration")
    }

    fn compile(toml_text: &str) -> Result<Option<Constraints>, Vec<String>> {
        Constraints::compile("p", &spec(toml_text))
    }

    fn check(c: &Constraints, v: Value) -> Result<(), Refusal> {
        c.check(&[("p".to_owned(), v)].into())
    }

    #[test]
    fn bounds_compare_exactly_and_say_which_failed() {
        let c = compile("type = \"integer\"\nminimum = 1\nexclusiveMaximum = 10")
            .expect("valid")
            .expect("constraints");
        assert!(check(&c, Value::Integer(1)).is_ok());
        assert!(check(&c, Value::Integer(9)).is_ok());
        let e = check(&c, Value::Integer(0)).unwrap_err();
        assert_eq!(e.code, "invalid_parameter");
        assert_eq!(e.message, "parameter `p` must be at least 1");
        let e = check(&c, Value::Integer(10)).unwrap_err();
        assert_eq!(e.message, "parameter `p` must be less than 10");
        assert!(check(&c, Value::Null(Some(ParamType::Integer))).is_ok());

        // 0.1 is 0.1, not the float nearest it; strings keep every digit.
        let c = compile(
            "type = \"decimal\"\nexclusiveMinimum = 0.1\nmaximum = \"99999999999999999999.99\"",
        )
        .expect("valid")
        .expect("constraints");
        let d = |s: &str| Value::Decimal(s.parse().expect("decimal"));
        assert!(check(&c, d("0.1")).is_err());
        assert!(check(&c, d("0.10000000000000000000001")).is_ok());
        assert!(check(&c, d("99999999999999999999.99")).is_ok());
        assert!(check(&c, d("99999999999999999999.991")).is_err());
    }

    #[test]
    fn the_declared_code_and_message_answer() {
        let c = compile(
            "type = \"string\"\nenum = [\"usd\", \"eur\"]\nerror_code = \"bad_currency\"\nerror_message = \"usd or eur\"",
        )
        .expect("valid")
        .expect("constraints");
        assert!(check(&c, Value::String("eur".into())).is_ok());
        assert_eq!(
            check(&c, Value::String("EUR".into())),
            Err(Refusal {
                code: "bad_currency".into(),
                message: "usd or eur".into()
            })
        );
    }

    #[test]
    fn lengths_count_characters_and_patterns_search() {
        let c = compile("type = \"string\"\nminLength = 2\nmax_length = 3\npattern = \"[0-9]\"")
            .expect("valid")
            .expect("constraints");
        assert!(check(&c, Value::String("éé1".into())).is_ok());
        assert!(check(&c, Value::String("a1".into())).is_ok());
        let e = check(&c, Value::String("1".into())).unwrap_err();
        assert_eq!(
            e.message,
            "parameter `p` must be at least 2 characters long"
        );
        let e = check(&c, Value::String("ab12".into())).unwrap_err();
        assert_eq!(e.message, "parameter `p` must be at most 3 characters long");
        let e = check(&c, Value::String("abc".into())).unwrap_err();
        assert_eq!(e.message, "parameter `p` must match the pattern `[0-9]`");
    }

    #[test]
    fn not_equal_compares_values_not_texts() {
        let c = compile("type = \"decimal\"\nnot_equal = \"q\"")
            .expect("valid")
            .expect("constraints");
        let d = |s: &str| Value::Decimal(s.parse().expect("decimal"));
        let values = |p: Value, q: Value| -> BTreeMap<String, Value> {
            [("p".to_owned(), p), ("q".to_owned(), q)].into()
        };
        let e = c.check(&values(d("1.50"), d("1.5"))).unwrap_err();
        assert_eq!(e.message, "parameter `p` must differ from `q`");
        assert!(c.check(&values(d("1.50"), d("1.51"))).is_ok());
        assert!(
            c.check(&values(d("1"), Value::Null(Some(ParamType::Decimal))))
                .is_ok()
        );
    }

    #[test]
    fn constraints_that_do_not_fit_the_type_are_refused_at_load() {
        let cases = [
            (
                "type = \"integer\"\npattern = \"^1\"",
                "pattern is for string parameters, not integer",
            ),
            (
                "type = \"string\"\nminimum = 1",
                "minimum is for integer, float and decimal parameters, not string",
            ),
            (
                "type = \"integer\"\nminimum = 1.5",
                "minimum of an integer parameter must be an integer, not float",
            ),
            (
                "type = \"float\"\nmaximum = nan",
                "maximum must be a finite number",
            ),
            (
                "type = \"decimal\"\nminimum = \"1,5\"",
                "minimum must be a finite number or a decimal string",
            ),
            (
                "type = \"integer\"\nminimum = 5\nmaximum = 3",
                "minimum 5 and maximum 3 leave no value",
            ),
            (
                "type = \"integer\"\nminimum = 3\nexclusiveMaximum = 3",
                "minimum 3 and exclusiveMaximum 3 leave no value",
            ),
            (
                "type = \"string\"\nminLength = 4\nmaxLength = 3",
                "minLength 4 and maxLength 3 leave no value",
            ),
            (
                "type = \"bool\"\nenum = [true]",
                "enum is for integer, float and string parameters, not bool",
            ),
            ("type = \"string\"\nenum = []", "enum lists no value"),
            (
                "type = \"integer\"\nenum = [1, \"2\"]",
                "enum value \"2\" must be integer",
            ),
            (
                "type = \"json\"\nnot_equal = \"q\"",
                "not_equal is for integer, float, decimal, string and date parameters, not json",
            ),
            (
                "type = \"integer\"\nerror_code = \"x\"",
                "error_code and error_message are for constraints, and it declares none",
            ),
            (
                "type = \"integer\"\nminimum = 1\ndefault = 0",
                "default 0 must be at least 1",
            ),
        ];
        for (declaration, want) in cases {
            let got = compile(declaration).err().unwrap_or_default();
            assert_eq!(got, [want], "{declaration}");
        }
        let got = compile("type = \"string\"\npattern = \"(\"")
            .err()
            .unwrap_or_default();
        assert_eq!(
            got,
            ["pattern `(` is not a regular expression: unclosed group"]
        );
        assert!(compile("type = \"integer\"").expect("valid").is_none());
    }
}
