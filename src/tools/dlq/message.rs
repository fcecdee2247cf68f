//! What a dead-lettered message says: txq's own `x-txq-*` failure headers, or
//! RabbitMQ's `x-death` record when the broker dead-lettered it (TTL, delivery
//! limit, reject, max length); and the properties of its replayed copy.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::Serialize;

use super::wire::Unreadable;
use crate::broker::{header_int, header_text, headers, long_string};

/// Headers the replayed copy carries: how often it was replayed, and when last.
pub mod replay_headers {
    /// How many times the message was replayed from a dead-letter queue.
    pub const REPLAYED: &str = "x-txq-replayed";
    /// When it was last replayed, RFC 3339.
    pub const REPLAYED_AT: &str = "x-txq-replayed-at";
}

/// Headers that describe one failed delivery; a replayed copy starts afresh
/// without them (so its attempts count from 1 again).
const FAILURE_HEADERS: &[&str] = &[
    headers::ATTEMPT,
    headers::ATTEMPTS,
    headers::ERROR,
    headers::ERROR_KIND,
    headers::FAILED_AT,
    headers::ORIGINAL_QUEUE,
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
    // A quorum queue's count of deliveries (of the queue that last delivered it).
    "x-delivery-count",
];

/// Who dead-lettered the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A txq worker: `x-txq-error-kind` and friends.
    Txq,
    /// RabbitMQ itself: `x-death`.
    Rabbitmq,
    /// Neither: published to the dead-letter queue by someone else.
    Unknown,
}

/// One message of a dead-letter queue, as the `dlq` commands see it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The idempotency key (kept on replay).
    pub message_id: Option<String>,
    /// The AMQP `type` property: the job type.
    pub job_type: Option<String>,
    /// txq's failure kind (`database_error`…), `rabbitmq:<reason>` (`rabbitmq:expired`,
    /// `rabbitmq:delivery_limit`…) for the broker's own, or `unknown`.
    pub error_kind: String,
    /// Why it failed, as recorded.
    pub error: String,
    /// Deliveries it took, as txq counted them (`x-txq-attempts`); for a message
    /// RabbitMQ dead-lettered, how many times it died there (the latest `x-death`
    /// entry's `count`). Never `x-delivery-count`: on a quorum dead-letter queue
    /// that counts the queue's own redeliveries, reads included.
    pub attempts: Option<i64>,
    /// When it was dead-lettered, RFC 3339.
    pub failed_at: Option<String>,
    /// The queue it was consumed from: where replay sends it by default.
    pub original_queue: Option<String>,
    /// Who dead-lettered it.
    pub origin: Origin,
    /// How many times it was replayed already (`x-txq-replayed`).
    pub replayed: i64,
    /// Properties whose bytes are not UTF-8 (shown with U+FFFD in their place).
    /// No AMQP client library reads such a message: lapin, which txq's worker
    /// uses, drops the connection it comes on.
    pub unreadable: Vec<Unreadable>,
    /// All its properties and headers.
    pub properties: BasicProperties,
    /// The body, unchanged.
    pub body: Vec<u8>,
}

/// The one-line view of `dlq list --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary<'a> {
    /// See [`DeadLetter`].
    pub message_id: Option<&'a str>,
    /// See [`DeadLetter`].
    #[serde(rename = "type")]
    pub job_type: Option<&'a str>,
    /// See [`DeadLetter`].
    pub error_kind: &'a str,
    /// See [`DeadLetter`].
    pub error: &'a str,
    /// See [`DeadLetter`].
    pub attempts: Option<i64>,
    /// See [`DeadLetter`].
    pub failed_at: Option<&'a str>,
    /// See [`DeadLetter`].
    pub original_queue: Option<&'a str>,
    /// See [`DeadLetter`].
    pub origin: Origin,
    /// See [`DeadLetter`].
    pub replayed: i64,
    /// The names of [`DeadLetter::unreadable`] properties (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<&'static str>,
}

impl DeadLetter {
    /// Reads a dead-lettered message's properties.
    pub fn new(properties: BasicProperties, body: Vec<u8>) -> Self {
        let empty = FieldTable::default();
        let table = properties.headers().as_ref().unwrap_or(&empty).inner();
        let text = |key: &str| table.get(key).and_then(header_text);
        let int = |key: &str| table.get(key).and_then(header_int);
        let prop = |v: &Option<ShortString>| {
            v.as_ref()
                .map(|s| s.as_str().to_owned())
                .filter(|s| !s.is_empty())
        };
        // Without `x-death` (stripped by a shovel or a client), the
        // `x-last-death-*` (RabbitMQ 3.13+) or `x-first-death-*` headers still
        // say it.
        let death = latest_death(table).or_else(|| {
            let (reason, queue) = match text("x-last-death-reason") {
                Some(r) => (r, text("x-last-death-queue")),
                None => (text("x-first-death-reason")?, text("x-first-death-queue")),
            };
            Some(Death {
                reason,
                queue: queue.unwrap_or_default(),
                count: None,
                time: None,
            })
        });
        let (origin, error_kind, error) = match (text(headers::ERROR_KIND), &death) {
            (Some(kind), _) => (Origin::Txq, kind, text(headers::ERROR).unwrap_or_default()),
            (None, Some(d)) => (
                Origin::Rabbitmq,
                format!("rabbitmq:{}", d.reason),
                match d.count {
                    Some(n) => format!(
                        "dead-lettered by RabbitMQ from `{}` ({}, {n} time(s))",
                        d.queue, d.reason
                    ),
                    None => format!(
                        "dead-lettered by RabbitMQ from `{}` ({})",
                        d.queue, d.reason
                    ),
                },
            ),
            (None, None) => (
                Origin::Unknown,
                "unknown".to_owned(),
                text(headers::ERROR).unwrap_or_default(),
            ),
        };
        // txq's copy names its queue; RabbitMQ's most recent death names the queue
        // that dead-lettered it here (the first death may be a txq retry queue).
        let original_queue = text(headers::ORIGINAL_QUEUE)
            .or_else(|| text("x-last-death-queue"))
            .or_else(|| death.as_ref().map(|d| d.queue.clone()))
            .or_else(|| text("x-first-death-queue"))
            .filter(|q| !q.is_empty());
        let failed_at = text(headers::FAILED_AT).or_else(|| {
            death
                .as_ref()
                .and_then(|d| d.time)
                .and_then(timestamp_rfc3339)
        });
        Self {
            message_id: prop(properties.message_id()),
            job_type: prop(properties.kind()),
            error_kind,
            error,
            attempts: match origin {
                Origin::Txq => int(headers::ATTEMPTS),
                Origin::Rabbitmq => death.as_ref().and_then(|d| d.count),
                Origin::Unknown => int(headers::ATTEMPTS),
            },
            failed_at,
            original_queue,
            origin,
            replayed: int(replay_headers::REPLAYED).unwrap_or(0).max(0),
            unreadable: Vec::new(),
            properties,
            body,
        }
    }

    /// The same message, with the properties its reader could not decode.
    pub fn with_unreadable(mut self, unreadable: Vec<Unreadable>) -> Self {
        self.unreadable = unreadable;
        self
    }

    /// Whether a property is not UTF-8 (or the header table cannot be decoded).
    pub fn is_unreadable(&self) -> bool {
        !self.unreadable.is_empty()
    }

    /// The names of the undecodable properties, comma-separated.
    pub fn unreadable_fields(&self) -> String {
        self.unreadable
            .iter()
            .map(|u| u.field)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The one-line view.
    pub fn summary(&self) -> Summary<'_> {
        Summary {
            message_id: self.message_id.as_deref(),
            job_type: self.job_type.as_deref(),
            error_kind: &self.error_kind,
            error: &self.error,
            attempts: self.attempts,
            failed_at: self.failed_at.as_deref(),
            original_queue: self.original_queue.as_deref(),
            origin: self.origin,
            replayed: self.replayed,
            unreadable: self.unreadable.iter().map(|u| u.field).collect(),
        }
    }

    /// The headers of the replayed copy: the message's own without the failure
    /// headers, so its attempts start over, with `x-txq-replayed` counted up and
    /// `x-txq-replayed-at` set. (The copy keeps every other property as sent:
    /// message_id, correlation_id, reply_to, type, body; and is persistent.)
    /// `None` when the message's header table cannot be decoded.
    pub fn replayed_headers(&self, now: SystemTime) -> Option<FieldTable> {
        if self.unreadable.iter().any(|u| u.field == "headers") {
            return None;
        }
        let mut table: BTreeMap<ShortString, AMQPValue> = self
            .properties
            .headers()
            .as_ref()
            .map(|h| h.inner().clone())
            .unwrap_or_default();
        for key in FAILURE_HEADERS {
            table.remove(*key);
        }
        table.insert(
            replay_headers::REPLAYED.into(),
            AMQPValue::LongLongInt(self.replayed.saturating_add(1)),
        );
        table.insert(
            replay_headers::REPLAYED_AT.into(),
            long_string(&rfc3339(now)),
        );
        Some(FieldTable::from(table))
    }

    /// Everything, for `dlq show --json`: properties, headers (AMQP values as
    /// JSON) and the body (as JSON when it is JSON, else as text or base64).
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine as _;
        let p = &self.properties;
        let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
        let headers = p
            .headers()
            .as_ref()
            .map(table_json)
            .unwrap_or(serde_json::Value::Null);
        let mut body = serde_json::Map::new();
        match (
            serde_json::from_slice::<serde_json::Value>(&self.body),
            std::str::from_utf8(&self.body),
        ) {
            (Ok(json), _) => body.insert("body".into(), json),
            (Err(_), Ok(text)) => body.insert("body_text".into(), text.into()),
            (Err(_), Err(_)) => body.insert(
                "body_base64".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(&self.body)
                    .into(),
            ),
        };
        let mut out = serde_json::json!({
            "summary": self.summary(),
            "properties": {
                "message_id": s(p.message_id()),
                "type": s(p.kind()),
                "correlation_id": s(p.correlation_id()),
                "reply_to": s(p.reply_to()),
                "content_type": s(p.content_type()),
                "content_encoding": s(p.content_encoding()),
                "delivery_mode": p.delivery_mode(),
                "priority": p.priority(),
                "timestamp": p.timestamp(),
                "expiration": s(p.expiration()),
                "app_id": s(p.app_id()),
                "user_id": s(p.user_id()),
            },
            "headers": headers,
            "body_bytes": self.body.len(),
        });
        if self.is_unreadable() {
            // The bytes as sent, for each property shown with U+FFFD.
            let raw: serde_json::Map<String, serde_json::Value> = self
                .unreadable
                .iter()
                .map(|u| {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(&u.raw);
                    (u.field.to_owned(), b64.into())
                })
                .collect();
            out["unreadable_base64"] = raw.into();
        }
        if let Some(map) = out.as_object_mut() {
            map.extend(body);
        }
        out
    }
}

/// The most recent entry of RabbitMQ's `x-death` (the array is kept most recent
/// first).
struct Death {
    queue: String,
    reason: String,
    /// How many times it died there, when `x-death` says.
    count: Option<i64>,
    time: Option<u64>,
}

fn latest_death(table: &BTreeMap<ShortString, AMQPValue>) -> Option<Death> {
    let first = match table.get("x-death")? {
        AMQPValue::FieldArray(a) => a.as_slice().first()?.clone(),
        _ => return None,
    };
    let AMQPValue::FieldTable(entry) = first else {
        return None;
    };
    let e = entry.inner();
    Some(Death {
        queue: e.get("queue").and_then(header_text).unwrap_or_default(),
        reason: e
            .get("reason")
            .and_then(header_text)
            .unwrap_or_else(|| "unknown".into()),
        count: e.get("count").and_then(header_int),
        time: match e.get("time") {
            Some(AMQPValue::Timestamp(t)) => Some(*t),
            _ => None,
        },
    })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// An AMQP timestamp (seconds since the epoch, from whoever published the
/// message) as RFC 3339, or None when it cannot be one: humantime formats only
/// years up to 9999 (its `Display` fails beyond, and `to_string` would panic),
/// and `UNIX_EPOCH + Duration` panics past what `SystemTime` holds.
fn timestamp_rfc3339(secs: u64) -> Option<String> {
    // 10000-01-01T00:00:00Z.
    const YEAR_10000: u64 = 253_402_300_800;
    (secs < YEAR_10000)
        .then(|| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
        .flatten()
        .map(rfc3339)
}

/// An AMQP header table as JSON. Timestamps become RFC 3339 text, byte arrays
/// base64, decimals numbers.
pub fn table_json(table: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &AMQPValue) -> serde_json::Value {
    use base64::Engine as _;
    use serde_json::Value;
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::Float(f) => serde_json::json!(f),
        AMQPValue::Double(f) => serde_json::json!(f),
        AMQPValue::DecimalValue(d) => {
            serde_json::json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => match header_text(v) {
            Some(text) => Value::String(text),
            None => match v {
                AMQPValue::LongString(s) => {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(s.as_bytes()))
                }
                _ => Value::Null,
            },
        },
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        // Out of range for RFC 3339: the raw number, rather than nothing.
        AMQPValue::Timestamp(t) => timestamp_rfc3339(*t).map_or(Value::from(*t), Value::String),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::ByteArray(b) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::Void => Value::Null,
        other => header_int(other).map_or(Value::Null, Value::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn props(pairs: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(k.into(), v);
        }
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_type("transfer".into())
            .with_headers(t)
    }

    fn death(queue: &str, reason: &str) -> AMQPValue {
        let mut e = FieldTable::default();
        e.insert("queue".into(), long_string(queue));
        e.insert("reason".into(), long_string(reason));
        e.insert("count".into(), AMQPValue::LongLongInt(2));
        e.insert("time".into(), AMQPValue::Timestamp(0));
        AMQPValue::FieldTable(e)
    }

    #[test]
    fn txq_headers_win_over_an_x_death_left_by_a_retry_queue() {
        let mut arr = FieldArray::default();
        arr.push(death("q.retry.1s", "expired"));
        let d = DeadLetter::new(
            props(vec![
                (headers::ERROR_KIND, long_string("database_error")),
                (headers::ERROR, long_string("no such table")),
                (headers::ORIGINAL_QUEUE, long_string("q")),
                (headers::ATTEMPTS, AMQPValue::LongLongInt(3)),
                ("x-death", AMQPValue::FieldArray(arr)),
            ]),
            b"{}".to_vec(),
        );
        assert_eq!(d.origin, Origin::Txq);
        assert_eq!(d.error_kind, "database_error");
        assert_eq!(d.original_queue.as_deref(), Some("q"));
        assert_eq!(d.attempts, Some(3));
    }

    #[test]
    fn rabbitmq_dead_letters_name_the_queue_of_their_latest_death() {
        let mut arr = FieldArray::default();
        arr.push(death("q", "delivery_limit"));
        arr.push(death("q.retry.1s", "expired"));
        let d = DeadLetter::new(
            props(vec![
                ("x-death", AMQPValue::FieldArray(arr)),
                ("x-first-death-queue", long_string("q.retry.1s")),
            ]),
            vec![],
        );
        assert_eq!(d.origin, Origin::Rabbitmq);
        assert_eq!(d.error_kind, "rabbitmq:delivery_limit");
        assert_eq!(d.original_queue.as_deref(), Some("q"));
        assert_eq!(d.failed_at.as_deref(), Some("1970-01-01T00:00:00.000Z"));
    }

    #[test]
    fn first_death_headers_alone_are_understood() {
        let d = DeadLetter::new(
            props(vec![
                ("x-first-death-reason", long_string("rejected")),
                ("x-first-death-queue", long_string("q")),
            ]),
            vec![],
        );
        assert_eq!(d.origin, Origin::Rabbitmq);
        assert_eq!(d.error_kind, "rabbitmq:rejected");
        assert_eq!(d.original_queue.as_deref(), Some("q"));
    }

    #[test]
    fn the_replayed_copy_drops_failure_headers_and_counts_replays() {
        let mut arr = FieldArray::default();
        arr.push(death("q", "expired"));
        let d = DeadLetter::new(
            props(vec![
                (headers::ERROR_KIND, long_string("timeout")),
                (headers::ATTEMPT, AMQPValue::LongLongInt(5)),
                ("x-death", AMQPValue::FieldArray(arr)),
                ("traceparent", long_string("00-a-b-01")),
                (replay_headers::REPLAYED, AMQPValue::LongLongInt(1)),
                ("x-delivery-count", AMQPValue::LongLongInt(4)),
                ("x-last-death-reason", long_string("expired")),
            ]),
            vec![],
        );
        let t = d.replayed_headers(SystemTime::UNIX_EPOCH).expect("headers");
        let h = t.inner();
        for gone in FAILURE_HEADERS {
            assert!(!h.contains_key(*gone), "{gone}");
        }
        assert_eq!(h[replay_headers::REPLAYED], AMQPValue::LongLongInt(2));
        assert!(h.contains_key("traceparent"));

        let unreadable = d.with_unreadable(vec![Unreadable {
            field: "headers",
            raw: vec![0xFF],
        }]);
        assert_eq!(unreadable.replayed_headers(SystemTime::UNIX_EPOCH), None);
    }

    #[test]
    fn attempts_never_come_from_x_delivery_count() {
        // A quorum dead-letter queue counts its own redeliveries in it.
        let plain = DeadLetter::new(
            props(vec![("x-delivery-count", AMQPValue::LongLongInt(7))]),
            vec![],
        );
        assert_eq!(plain.attempts, None);
        assert_eq!(plain.origin, Origin::Unknown);
        let txq = DeadLetter::new(
            props(vec![
                (headers::ERROR_KIND, long_string("timeout")),
                (headers::ATTEMPTS, AMQPValue::LongLongInt(3)),
                ("x-delivery-count", AMQPValue::LongLongInt(7)),
            ]),
            vec![],
        );
        assert_eq!(txq.attempts, Some(3));
        let mut arr = FieldArray::default();
        arr.push(death("q", "delivery_limit"));
        let broker = DeadLetter::new(
            props(vec![
                ("x-death", AMQPValue::FieldArray(arr)),
                ("x-delivery-count", AMQPValue::LongLongInt(7)),
            ]),
            vec![],
        );
        assert_eq!(broker.attempts, Some(2), "the x-death count");
        assert!(
            broker.error.contains("delivery_limit, 2 time(s)"),
            "{}",
            broker.error
        );
    }

    #[test]
    fn last_death_headers_win_over_first_death_ones_without_x_death() {
        let d = DeadLetter::new(
            props(vec![
                ("x-first-death-reason", long_string("expired")),
                ("x-first-death-queue", long_string("q.retry.1s")),
                ("x-last-death-reason", long_string("maxlen")),
                ("x-last-death-queue", long_string("q")),
            ]),
            vec![],
        );
        assert_eq!(d.error_kind, "rabbitmq:maxlen");
        assert_eq!(d.original_queue.as_deref(), Some("q"));
        assert_eq!(d.attempts, None, "no count without x-death");
    }

    #[test]
    fn timestamps_beyond_year_9999_or_system_time_do_not_panic() {
        for t in [253_402_300_800, u64::MAX / 2, u64::MAX] {
            let mut e = FieldTable::default();
            e.insert("queue".into(), long_string("q"));
            e.insert("reason".into(), long_string("expired"));
            e.insert("time".into(), AMQPValue::Timestamp(t));
            let mut arr = FieldArray::default();
            arr.push(AMQPValue::FieldTable(e));
            let d = DeadLetter::new(
                props(vec![
                    ("x-death", AMQPValue::FieldArray(arr)),
                    ("x-sent", AMQPValue::Timestamp(t)),
                ]),
                vec![],
            );
            assert_eq!(d.failed_at, None, "{t}");
            assert_eq!(d.original_queue.as_deref(), Some("q"));
            let json = d.to_json();
            assert_eq!(json["headers"]["x-sent"], serde_json::json!(t), "{t}");
            assert_eq!(json["headers"]["x-death"][0]["time"], serde_json::json!(t));
        }
    }

    #[test]
    fn the_last_timestamp_of_year_9999_is_still_formatted() {
        assert_eq!(
            timestamp_rfc3339(253_402_300_799).as_deref(),
            Some("9999-12-31T23:59:59.000Z")
        );
    }
}
