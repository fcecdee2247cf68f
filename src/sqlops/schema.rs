//! JSON Schemas of each operation's payload and reply, for producers in other
//! languages to validate their messages against.

use serde_json::{Value as Json, json};

use super::params::ParamType;
use super::spec::OpsFile;

fn type_schema(t: ParamType) -> Json {
    match t {
        ParamType::Integer => json!({"type": "integer"}),
        ParamType::Float => json!({"type": "number"}),
        ParamType::Decimal => {
            json!({"type": ["string", "number"], "pattern": "^-?[0-9]+(\\.[0-9]+)?$"})
        }
        ParamType::String => json!({"type": "string"}),
        ParamType::Bool => json!({"type": "boolean"}),
        ParamType::Json => json!({}),
        ParamType::Timestamp => json!({"type": "string", "format": "date-time"}),
        ParamType::Date => json!({"type": "string", "format": "date"}),
        ParamType::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
    }
}

/// `{ "<operation>": { "payload": <schema>, "reply": <schema> } }`
pub fn schemas(ops: &OpsFile) -> Json {
    let mut out = serde_json::Map::new();
    for (name, op) in ops {
        let mut props = serde_json::Map::new();
        let mut required = Vec::new();
        for (p, decl) in &op.params {
            let spec = decl.spec();
            let mut s = type_schema(spec.kind);
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
