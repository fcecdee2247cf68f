//! JSON Schemas of each operation's payload and reply, for producers in other
//! languages to validate their messages against.

use serde_json::{Value as Json, json};

use super::constraints::Constraints;
use super::params::{BASE64_PATTERN, DATE_PATTERN, DECIMAL_PATTERN, ParamType, TIMESTAMP_PATTERN};
use super::spec::OpsFile;

/// Exactly what the worker accepts for each type: a payload valid against the
/// schema passes the worker's checks, and one invalid is rejected. (A validator
/// that reads numbers as 64-bit floats cannot see beyond them: `1e400` as a float,
/// `-9223372036854775809` as an integer, or a decimal number with an exponent of
/// more than 18 digits, are the worker's to refuse.)
fn type_schema(t: ParamType) -> Json {
    match t {
        ParamType::Integer => json!({
            "type": "integer",
            "minimum": i64::MIN,
            "maximum": i64::MAX,
        }),
        ParamType::Float => json!({"type": "number"}),
        ParamType::Decimal => json!({"type": ["string", "number"], "pattern": DECIMAL_PATTERN}),
        ParamType::String => json!({"type": "string"}),
        ParamType::Bool => json!({"type": "boolean"}),
        // Anything but null, which only a nullable parameter takes.
        ParamType::Json => json!({"not": {"type": "null"}}),
        ParamType::Timestamp => {
            json!({"type": "string", "format": "date-time", "pattern": TIMESTAMP_PATTERN})
        }
        ParamType::Date => json!({"type": "string", "format": "date", "pattern": DATE_PATTERN}),
        ParamType::Bytes => {
            json!({"type": "string", "contentEncoding": "base64", "pattern": BASE64_PATTERN})
        }
    }
}

/// `{ "<operation>": { "payload": <schema>, "reply": <schema> } }`
pub fn schemas(ops: &OpsFile) -> Json {
    let mut out = serde_json::Map::new();
    for (name, op) in ops {
        let mut props = serde_json::Map::new();
        let mut required = Vec::new();
        for (p, decl) in op.params.in_order() {
            let spec = decl.spec();
            let mut s = type_schema(spec.kind);
            // (A file is checked before its schema is printed.)
            if let (Ok(Some(c)), Some(keywords)) =
                (Constraints::compile(p, &spec), s.as_object_mut())
            {
                c.annotate(keywords);
            }
            if spec.nullable {
                s = json!({"anyOf": [s, {"type": "null"}]});
            }
            if let Some(d) = spec.default_json() {
                s["default"] = d;
            } else if !spec.nullable {
                required.push(p.clone());
            }
            props.insert(p.clone(), s);
        }
        let payload = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": format!("{name} payload"),
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": false,
        });
        let reply = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": format!("{name} reply"),
            "oneOf": [
                {"type": "object", "required": ["status", "result"],
                 "properties": {"status": {"const": "ok"}, "result": {}}},
                {"type": "object", "required": ["status", "error"],
                 "properties": {"status": {"const": "rejected"},
                    "error": {"type": "object", "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                {"type": "object", "required": ["status", "error"],
                 "properties": {"status": {"const": "failed"},
                    "error": {"type": "object", "required": ["kind", "message", "attempts"],
                        "properties": {"kind": {"type": "string"}, "message": {"type": "string"},
                            "attempts": {"type": "integer"}}}}}
            ]
        });
        out.insert(name.clone(), json!({"payload": payload, "reply": reply}));
    }
    Json::Object(out)
}
