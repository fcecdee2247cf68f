//! Declared parameter types, and the checking of a payload against them.

use std::collections::BTreeMap;
use std::str::FromStr;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value as Json;
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

/// A parameter's declaration in full.
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
    /// JSON.
    Json(Json),
    /// UTC timestamp.
    Timestamp(DateTime<Utc>),
    /// Date.
    Date(NaiveDate),
    /// Bytes.
    Bytes(Vec<u8>),
}

impl ParamSpec {
    /// Converts one JSON value; the error says what was expected.
    pub fn value(&self, json: &Json) -> Result<Value, String> {
        if json.is_null() {
            return if self.nullable {
                Ok(Value::Null(Some(self.kind)))
            } else {
                Err(format!("must be {}, not null", self.kind.name()))
            };
        }
        let wrong = || format!("must be {}", self.kind.name());
        Ok(match self.kind {
            ParamType::Integer => Value::Integer(json.as_i64().ok_or_else(wrong)?),
            ParamType::Float => Value::Float(json.as_f64().ok_or_else(wrong)?),
            ParamType::Decimal => {
                let text = match json {
                    Json::String(s) => s.clone(),
                    Json::Number(n) => n.to_string(),
                    _ => return Err(wrong()),
                };
                Value::Decimal(BigDecimal::from_str(text.trim()).map_err(|_| wrong())?)
            }
            ParamType::String => Value::String(json.as_str().ok_or_else(wrong)?.to_owned()),
            ParamType::Bool => Value::Bool(json.as_bool().ok_or_else(wrong)?),
            ParamType::Json => Value::Json(json.clone()),
            ParamType::Timestamp => {
                let s = json.as_str().ok_or_else(wrong)?;
                let t = DateTime::parse_from_rfc3339(s)
                    .map_err(|_| "must be an RFC 3339 timestamp".to_owned())?;
                Value::Timestamp(t.with_timezone(&Utc))
            }
            ParamType::Date => {
                let s = json.as_str().ok_or_else(wrong)?;
                Value::Date(
                    NaiveDate::parse_from_str(s, "%Y-%m-%d")
                        .map_err(|_| "must be a YYYY-MM-DD date".to_owned())?,
                )
            }
            ParamType::Bytes => {
                let s = json.as_str().ok_or_else(wrong)?;
                Value::Bytes(
                    base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map_err(|_| "must be base64".to_owned())?,
                )
            }
        })
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
/// type. The error names the parameter.
pub(super) fn bind_payload(
    params: &BTreeMap<String, ParamSpec>,
    payload: &Json,
) -> Result<BTreeMap<String, Value>, String> {
    let Json::Object(obj) = payload else {
        return Err("the payload must be a JSON object of parameters".into());
    };
    if let Some(extra) = obj.keys().find(|k| !params.contains_key(*k)) {
        return Err(format!("unknown parameter `{extra}`"));
    }
    let mut out = BTreeMap::new();
    for (name, spec) in params {
        let value = match obj.get(name) {
            Some(v) => spec.value(v),
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

impl Value {
    /// A value read from an earlier step's row, typed as JSON shows it.
    pub fn from_json(json: &Json) -> Value {
        match json {
            Json::Null => Value::Null(None),
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => n.as_i64().map_or_else(
                || Value::Float(n.as_f64().unwrap_or(f64::NAN)),
                Value::Integer,
            ),
            Json::String(s) => Value::String(s.clone()),
            other => Value::Json(other.clone()),
        }
    }
}
