//! Declared parameter types, and the checking of a payload against them.

use std::collections::BTreeMap;
use std::str::FromStr;

use base64::Engine as _;
use serde::Deserialize;
use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value as Json;
use serde_json::value::RawValue;
use sqlx::types::BigDecimal;
use sqlx::types::chrono::{DateTime, NaiveDate, Utc};

/// A parameter's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// A JSON integer (64-bit).
    Integer,
    /// A JSON number.
    Float,
    /// An exact decimal, as a JSON string (`"12.50"`) or number.
    Decimal,
    /// A JSON string.
    String,
    /// A JSON boolean.
    Bool,
    /// Any JSON value, bound as JSON.
    Json,
    /// An RFC 3339 timestamp string.
    Timestamp,
    /// A `YYYY-MM-DD` date string.
    Date,
    /// Base64 in a JSON string.
    Bytes,
}

impl ParamType {
    /// Every type, in the order the docs list them.
    pub const ALL: [ParamType; 9] = [
        Self::Integer,
        Self::Float,
        Self::Decimal,
        Self::String,
        Self::Bool,
        Self::Json,
        Self::Timestamp,
        Self::Date,
        Self::Bytes,
    ];

    /// The name used in the file and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Integer => "integer",
            Self::Float => "float",
            Self::Decimal => "decimal",
            Self::String => "string",
            Self::Bool => "bool",
            Self::Json => "json",
            Self::Timestamp => "timestamp",
            Self::Date => "date",
            Self::Bytes => "bytes",
        }
    }
}

/// A parameter's declaration in full: its type and options, and the constraints
/// a value must meet (checked in the worker before any SQL; the keywords are JSON
/// Schema's, which `txq ops schema` prints them as).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// May be `null` (or missing, meaning `null`).
    #[serde(default)]
    pub nullable: bool,
    /// The value when the payload leaves it out (a TOML value of the right type).
    #[serde(default)]
    pub default: Option<toml::Value>,
    /// The least value (integer, float, decimal).
    #[serde(default)]
    pub minimum: Option<toml::Value>,
    /// The greatest value (integer, float, decimal).
    #[serde(default)]
    pub maximum: Option<toml::Value>,
    /// The value must be greater than this (integer, float, decimal).
    #[serde(default, rename = "exclusiveMinimum", alias = "exclusive_minimum")]
    pub exclusive_minimum: Option<toml::Value>,
    /// The value must be less than this (integer, float, decimal).
    #[serde(default, rename = "exclusiveMaximum", alias = "exclusive_maximum")]
    pub exclusive_maximum: Option<toml::Value>,
    /// The values allowed (integer, float, string).
    #[serde(default, rename = "enum")]
    pub one_of: Option<Vec<toml::Value>>,
    /// A regular expression the value must match somewhere (string); anchor it
    /// with `^…$` to match the whole value, as in JSON Schema.
    #[serde(default)]
    pub pattern: Option<String>,
    /// The most characters (Unicode scalar values) a string may have.
    #[serde(default, rename = "maxLength", alias = "max_length")]
    pub max_length: Option<u64>,
    /// The fewest characters a string may have.
    #[serde(default, rename = "minLength", alias = "min_length")]
    pub min_length: Option<u64>,
    /// Another parameter, of the same type, whose value this one must differ from.
    #[serde(default)]
    pub not_equal: Option<String>,
    /// The rejection code when a constraint fails. Default `invalid_parameter`.
    #[serde(default)]
    pub error_code: Option<String>,
    /// The rejection message when a constraint fails. Default: what failed.
    #[serde(default)]
    pub error_message: Option<String>,
}

/// A value ready to bind.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL, typed where the type is known (PostgreSQL needs it).
    Null(Option<ParamType>),
    /// 64-bit integer.
    Integer(i64),
    /// Double.
    Float(f64),
    /// Exact decimal.
    Decimal(BigDecimal),
    /// Text.
    String(String),
    /// Boolean.
    Bool(bool),
    /// JSON, as the payload wrote it (numbers keep every digit).
    Json(JsonText),
    /// UTC timestamp.
    Timestamp(DateTime<Utc>),
    /// Date.
    Date(NaiveDate),
    /// Bytes.
    Bytes(Vec<u8>),
}

/// A JSON text, checked.
#[derive(Debug, Clone)]
pub struct JsonText(Box<RawValue>);

impl JsonText {
    /// The text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// As the raw value it is.
    pub fn raw(&self) -> &RawValue {
        &self.0
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// The grammar of a decimal in a string: what `txq ops schema` prints as its
/// pattern. A JSON number has the same grammar (less leading zeros); either is
/// refused as out of range when its exponent has more than 18 digits (beyond any
/// database), unless it is zero.
pub(super) const DECIMAL_PATTERN: &str = "^-?[0-9]+(\\.[0-9]+)?([eE][+-]?0*[0-9]{1,18})?$";
/// An RFC 3339 timestamp, as the worker reads it (the calendar is checked too);
/// no leap second (`:60`), which none of the databases keeps.
pub(super) const TIMESTAMP_PATTERN: &str = "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-5][0-9](\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$";
/// A date, `YYYY-MM-DD`.
pub(super) const DATE_PATTERN: &str = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$";
/// Canonical base64 with padding (the unused bits of the last character are zero).
pub(super) const BASE64_PATTERN: &str =
    "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";

/// Whether `s` is a decimal number: `-?D+(.D+)?([eE][+-]?D+)?` (D a digit).
pub(super) fn decimal_grammar(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

/// Whether the exponent of a decimal of [`decimal_grammar`] has at most 18 digits
/// (leading zeros aside).
fn exponent_fits(s: &str) -> bool {
    s.find(['e', 'E']).is_none_or(|at| {
        s[at + 1..]
            .trim_start_matches(['+', '-'])
            .trim_start_matches('0')
            .len()
            <= 18
    })
}

/// The exact value of a decimal of [`decimal_grammar`]: `Err` when its exponent
/// is beyond any database (more than 18 digits).
pub(super) fn exact_decimal(s: &str) -> Result<BigDecimal, ()> {
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(at) => (&s[..at], &s[at + 1..]),
        None => (s, "0"),
    };
    let zero = mantissa.bytes().all(|c| matches!(c, b'0' | b'.' | b'-'));
    let magnitude = exponent
        .trim_start_matches(['+', '-'])
        .trim_start_matches('0');
    if magnitude.len() > 18 {
        return if zero {
            Ok(BigDecimal::from(0))
        } else {
            Err(())
        };
    }
    BigDecimal::from_str(s).map_err(drop)
}

/// The exact value of a JSON number if it is an integer of 64 bits: `1`, `-0`,
/// `1.0` and `1e2` are; `1.5`, `1e-1` and `9223372036854775808` are not.
fn exact_i64(s: &str) -> Option<i64> {
    if !decimal_grammar(s) {
        return None;
    }
    let negative = s.starts_with('-');
    let s = s.trim_start_matches('-');
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(at) => (&s[..at], &s[at + 1..]),
        None => (s, "0"),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Some(0);
    }
    // value = digits × 10^(exponent − frac.len())
    let exp_sign: i64 = if exponent.starts_with('-') { -1 } else { 1 };
    let magnitude = exponent
        .trim_start_matches(['+', '-'])
        .trim_start_matches('0');
    if magnitude.len() > 6 {
        // 10^1000000 or 10^-1000000 times a nonzero integer of a payload's size.
        return None;
    }
    let mut shift = exp_sign * magnitude.parse::<i64>().unwrap_or(0) - frac.len() as i64;
    let mut digits = digits;
    while shift < 0 {
        digits = digits.strip_suffix('0')?;
        shift += 1;
    }
    if digits.len() as i64 + shift > 19 {
        return None;
    }
    let mut n: i128 = digits.parse().ok()?;
    for _ in 0..shift {
        n *= 10;
    }
    if negative {
        n = -n;
    }
    i64::try_from(n).ok()
}

/// Whether `s` is an RFC 3339 timestamp and its instant.
fn timestamp(s: &str) -> Option<DateTime<Utc>> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(TIMESTAMP_PATTERN).expect("valid pattern"));
    if !re.is_match(s) {
        return None;
    }
    let t = DateTime::parse_from_rfc3339(s).ok()?;
    // A leap second (`23:59:60`) has no place in the databases' timestamps.
    if t.timestamp_subsec_nanos() >= 1_000_000_000 {
        return None;
    }
    Some(t.with_timezone(&Utc))
}

fn date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    shape
        .then(|| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        .flatten()
}

impl ParamSpec {
    /// A parameter of type `kind`, not nullable, without default or constraints.
    pub fn of(kind: ParamType) -> Self {
        Self {
            kind,
            nullable: false,
            default: None,
            minimum: None,
            maximum: None,
            exclusive_minimum: None,
            exclusive_maximum: None,
            one_of: None,
            pattern: None,
            max_length: None,
            min_length: None,
            not_equal: None,
            error_code: None,
            error_message: None,
        }
    }

    /// Converts one JSON value, as written (`raw` is valid JSON); the error says
    /// what was expected.
    pub fn value_raw(&self, raw: &RawValue) -> Result<Value, String> {
        let text = raw.get().trim();
        if text == "null" {
            return if self.nullable {
                Ok(Value::Null(Some(self.kind)))
            } else {
                Err(format!("must be {}, not null", self.kind.name()))
            };
        }
        let wrong = || format!("must be {}", self.kind.name());
        let is_number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
        let string = || -> Result<String, String> {
            if text.starts_with('"') {
                serde_json::from_str::<String>(text).map_err(|_| wrong())
            } else {
                Err(wrong())
            }
        };
        Ok(match self.kind {
            ParamType::Integer => Value::Integer(exact_i64(text).ok_or_else(wrong)?),
            ParamType::Float => {
                let f = if is_number {
                    text.parse::<f64>().map_err(|_| wrong())?
                } else {
                    return Err(wrong());
                };
                if !f.is_finite() {
                    return Err(wrong());
                }
                Value::Float(f)
            }
            ParamType::Decimal => {
                let s = if is_number {
                    text.to_owned()
                } else {
                    string()?
                };
                // A string's exponent has at most 18 digits (the schema's pattern
                // says so); a number's is checked by value below.
                if !decimal_grammar(&s) || (!is_number && !exponent_fits(&s)) {
                    return Err(wrong());
                }
                Value::Decimal(exact_decimal(&s).map_err(|()| "is out of range".to_owned())?)
            }
            ParamType::String => Value::String(string()?),
            ParamType::Bool => match text {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return Err(wrong()),
            },
            ParamType::Json => Value::Json(JsonText(
                RawValue::from_string(text.to_owned()).map_err(|_| wrong())?,
            )),
            ParamType::Timestamp => Value::Timestamp(
                timestamp(&string()?).ok_or_else(|| "must be an RFC 3339 timestamp".to_owned())?,
            ),
            ParamType::Date => {
                Value::Date(date(&string()?).ok_or_else(|| "must be a YYYY-MM-DD date".to_owned())?)
            }
            ParamType::Bytes => Value::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(string()?)
                    .map_err(|_| "must be base64".to_owned())?,
            ),
        })
    }

    /// Converts one JSON value; the error says what was expected.
    pub fn value(&self, json: &Json) -> Result<Value, String> {
        let raw = serde_json::value::to_raw_value(json).map_err(|e| e.to_string())?;
        self.value_raw(&raw)
    }

    /// The default as JSON, checked against the type.
    pub fn default_json(&self) -> Option<Json> {
        self.default
            .as_ref()
            .and_then(|d| serde_json::to_value(d).ok())
    }

    /// A default must have the declared type.
    pub fn check_default(&self) -> Result<(), String> {
        match self.default_json() {
            Some(d) => self.value(&d).map(drop).map_err(|e| format!("default {e}")),
            None => Ok(()),
        }
    }
}

/// Checks a payload against the declarations: it must be a JSON object with no
/// unknown keys, every parameter present (or defaulted, or nullable) and of its
/// type. The error names the parameter. Numbers are read from their text, so a
/// decimal keeps every digit.
pub(super) fn bind_payload(
    params: &BTreeMap<String, ParamSpec>,
    payload: &RawValue,
) -> Result<BTreeMap<String, Value>, String> {
    let not_object = || "the payload must be a JSON object of parameters".to_owned();
    if !payload.get().trim_start().starts_with('{') {
        return Err(not_object());
    }
    let obj: BTreeMap<String, &RawValue> =
        serde_json::from_str(payload.get()).map_err(|_| not_object())?;
    if let Some(extra) = obj.keys().find(|k| !params.contains_key(*k)) {
        return Err(format!("unknown parameter `{extra}`"));
    }
    let mut out = BTreeMap::new();
    for (name, spec) in params {
        let value = match obj.get(name) {
            Some(v) => spec.value_raw(v),
            None => match spec.default_json() {
                Some(d) => spec.value(&d),
                None if spec.nullable => Ok(Value::Null(Some(spec.kind))),
                None => Err("is missing".to_owned()),
            },
        };
        out.insert(
            name.clone(),
            value.map_err(|e| format!("parameter `{name}` {e}"))?,
        );
    }
    Ok(out)
}

/// A UTC time as RFC 3339 with `Z` and only the fraction it has: how replies
/// write timestamps, and how PostgreSQL values are bound again as text.
pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_exact_whatever_their_notation() {
        let cases = [
            ("1", Some(1)),
            ("-0", Some(0)),
            ("1.0", Some(1)),
            ("1e2", Some(100)),
            ("1.5e1", Some(15)),
            ("100e-2", Some(1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775807.0", Some(i64::MAX)),
            ("9223372036854775808", None),
            ("1.5", None),
            ("1e-1", None),
            ("1e19", None),
            ("1e999999999999", None),
            ("0e999999999999", Some(0)),
        ];
        for (text, want) in cases {
            assert_eq!(exact_i64(text), want, "{text}");
        }
    }

    #[test]
    fn decimals_are_exact() {
        let spec = ParamSpec::of(ParamType::Decimal);
        let raw = |s: &str| RawValue::from_string(s.to_owned()).expect("json");
        for (text, plain) in [
            ("1234567890.123456789", "1234567890.123456789"),
            ("\"0.0000001000\"", "0.0000001000"),
            ("1e5", "100000"),
            ("\"-1.5E-3\"", "-0.0015"),
        ] {
            let Ok(Value::Decimal(d)) = spec.value_raw(&raw(text)) else {
                panic!("{text}");
            };
            assert_eq!(d.to_plain_string(), plain);
        }
        for bad in [
            "\"1e\"", "\" 1\"", "\".5\"", "\"5.\"", "\"+1\"", "\"1,5\"", "true",
        ] {
            assert!(spec.value_raw(&raw(bad)).is_err(), "{bad}");
        }
    }
}
