//! The message contract (docs/contract.md) in AMQP terms: what a request's properties mean,
//! and the properties of a reply.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Header names. `x-txq-*` is reserved for txq.
pub mod headers {
    /// Reply: `ok`, `rejected` or `failed`.
    pub const STATUS: &str = "x-txq-status";
    /// Reply: the request's message_id.
    pub const REQUEST_ID: &str = "x-txq-request-id";
    /// Reply: attempts the job took.
    pub const ATTEMPTS: &str = "x-txq-attempts";
    /// Reply: `true` when an earlier delivery of the same message_id did the work
    /// and this is its stored reply from the inbox (absent otherwise).
    pub const DUPLICATE: &str = "x-txq-duplicate";
    /// W3C trace context, propagated from request to reply.
    pub const TRACEPARENT: &str = "traceparent";
    /// Request: which delivery attempt this is (1 when absent).
    pub const ATTEMPT: &str = "x-txq-attempt";
    /// Dead-letter: why it failed (at most 4 KiB).
    pub const ERROR: &str = "x-txq-error";
    /// Dead-letter: the failure kind (`invalid_payload`, `timeout`…).
    pub const ERROR_KIND: &str = "x-txq-error-kind";
    /// Dead-letter: when, RFC 3339.
    pub const FAILED_AT: &str = "x-txq-failed-at";
    /// Dead-letter: the queue it was consumed from.
    pub const ORIGINAL_QUEUE: &str = "x-txq-original-queue";
    /// Retry and dead-letter copies: the request's `expiration`, which the copy
    /// does not carry (it would expire unseen).
    pub const ORIGINAL_EXPIRATION: &str = "x-txq-original-expiration";
    /// Retry and dead-letter copies: the request's `user_id`, which the copy does
    /// not carry (RabbitMQ checks it against the publishing user, txq's).
    pub const ORIGINAL_USER_ID: &str = "x-txq-original-user-id";
    /// Request: the batch it belongs to (at most 200 bytes of UTF-8).
    pub const BATCH_ID: &str = "x-txq-batch-id";
    /// Request: how many members its batch has (opens the batch; optional once
    /// the batch is open).
    pub const BATCH_SIZE: &str = "x-txq-batch-size";
    /// Batch completion: its revision (1, then one more per change of counts).
    pub const BATCH_REVISION: &str = "x-txq-batch-revision";
}

/// Header values txq writes stay under this, so a header can never break the
/// connection (frame size) or bloat every copy of a message.
pub const MAX_HEADER_BYTES: usize = 4000;

/// `s` cut to at most [`MAX_HEADER_BYTES`] on a character boundary, marked when cut.
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_HEADER_BYTES {
        return s.to_owned();
    }
    let mut end = MAX_HEADER_BYTES - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// What a request's AMQP properties say, per the message contract.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// The `type` property, or the queue's default type.
    pub job_type: Option<String>,
    /// The idempotency key.
    pub message_id: Option<String>,
    /// The `correlation_id`, falling back to `message_id`; echoed in the reply.
    pub correlation_id: Option<String>,
    /// Where the reply goes (a queue name or `amq.rabbitmq.reply-to…`).
    pub reply_to: Option<String>,
    /// W3C `traceparent` header.
    pub traceparent: Option<String>,
    /// The `content_type` property.
    pub content_type: Option<String>,
    /// Which delivery attempt this is: `x-txq-attempt`, 1 when absent.
    pub attempt: u32,
    /// The job's trace, set by the worker once it takes the request on; what it
    /// publishes carries it. `None`: `traceparent` is passed on unchanged.
    pub trace: Option<super::Trace>,
    /// The batch headers: `None` without `x-txq-batch-id`; `Err` says what is wrong
    /// with them.
    pub batch: Option<Result<crate::db::batch::BatchTag, String>>,
}

impl Envelope {
    /// Reads a request's properties. Empty strings count as absent: several clients
    /// send `""` for "not set".
    pub fn from_properties(props: &BasicProperties, default_type: Option<&str>) -> Self {
        let text = |v: &Option<ShortString>| {
            v.as_ref()
                .map(ShortString::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let message_id = text(props.message_id());
        let traceparent = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(headers::TRACEPARENT))
            .and_then(header_text);
        let attempt = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(headers::ATTEMPT))
            .and_then(header_int)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1)
            .unwrap_or(1);
        Self {
            attempt,
            job_type: text(props.kind()).or_else(|| default_type.map(str::to_owned)),
            correlation_id: text(props.correlation_id()).or_else(|| message_id.clone()),
            message_id,
            reply_to: text(props.reply_to()),
            traceparent,
            content_type: text(props.content_type()),
            trace: None,
            batch: props.headers().as_ref().and_then(batch_tag),
        }
    }
}

/// The batch headers of a request, checked.
fn batch_tag(table: &FieldTable) -> Option<Result<crate::db::batch::BatchTag, String>> {
    use crate::db::batch::{BatchTag, MAX_BATCH_ID_BYTES};
    let id = table.inner().get(headers::BATCH_ID);
    let size = table.inner().get(headers::BATCH_SIZE);
    if id.is_none() && size.is_none() {
        return None;
    }
    let check = || {
        let id =
            id.ok_or_else(|| format!("{} without {}", headers::BATCH_SIZE, headers::BATCH_ID))?;
        // No NUL: PostgreSQL's text types refuse it, and every attempt to count
        // the member would fail the same way.
        let id = header_text(id)
            .filter(|id| !id.is_empty() && id.len() <= MAX_BATCH_ID_BYTES && !id.contains('\0'))
            .ok_or_else(|| {
                format!(
                    "{} must be a text of 1 to {MAX_BATCH_ID_BYTES} bytes, without NUL",
                    headers::BATCH_ID
                )
            })?;
        let size = match size {
            None => None,
            Some(v) => Some(header_int(v).filter(|n| *n >= 1).ok_or_else(|| {
                format!(
                    "{} must be a whole number of at least 1",
                    headers::BATCH_SIZE
                )
            })?),
        };
        Ok(BatchTag { id, size })
    };
    Some(check())
}

impl Envelope {
    /// The `traceparent` of what the job publishes: the job's span as parent, or
    /// the request's header as it came.
    pub fn outgoing_traceparent(&self) -> Option<String> {
        match &self.trace {
            Some(trace) => Some(trace.traceparent()),
            None => self.traceparent.clone(),
        }
    }
}

/// A header's value as text, for the string-ish AMQP types.
pub fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A header's value as an integer, for the integer AMQP types and decimal text.
pub fn header_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        other => header_text(other)?.trim().parse().ok(),
    }
}

/// `props` with `extra` headers set (replacing same-named ones).
pub fn with_headers(props: &BasicProperties, extra: Vec<(&str, AMQPValue)>) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        table.insert(k.into(), v);
    }
    props.clone().with_headers(table)
}

/// A text header value.
pub fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The `x-txq-*` facts a reply carries.
#[derive(Debug, Clone, Copy)]
pub struct ReplyHeaders<'a> {
    /// `ok`, `rejected` or `failed`.
    pub status: &'a str,
    /// Attempts the job took.
    pub attempts: u32,
    /// Answered from the inbox: an earlier delivery did the work.
    pub duplicate: bool,
}

/// Properties of a reply to `request`: its correlation_id, JSON content type, a fresh
/// message_id, the `x-txq-*` headers and the trace context.
pub fn reply_properties(request: &Envelope, reply: ReplyHeaders<'_>) -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(headers::STATUS.into(), long_string(reply.status));
    if let Some(id) = &request.message_id {
        table.insert(headers::REQUEST_ID.into(), long_string(id));
    }
    table.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(reply.attempts)),
    );
    if reply.duplicate {
        table.insert(headers::DUPLICATE.into(), AMQPValue::Boolean(true));
    }
    if let Some(tp) = request.outgoing_traceparent() {
        table.insert(headers::TRACEPARENT.into(), long_string(&tp));
    }
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        // From the thread's RNG: `Uuid::new_v4` asks the kernel each time, a
        // system call per reply.
        .with_message_id(
            uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string()
                .into(),
        )
        // Persistent, so replies parked in a durable queue for a batch survive a
        // broker restart; direct reply-to ignores it.
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(cid) = &request.correlation_id {
        // Came from a ShortString, so it fits one.
        if let Ok(cid) = ShortString::try_new(cid.as_str()) {
            props = props.with_correlation_id(cid);
        }
    }
    if let Some(job_type) = &request.job_type {
        if let Ok(t) = ShortString::try_new(job_type.as_str()) {
            props = props.with_type(t);
        }
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_id_falls_back_to_message_id_and_empty_means_absent() {
        let props = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_correlation_id("".into())
            .with_reply_to("".into());
        let env = Envelope::from_properties(&props, Some("noop"));
        assert_eq!(env.correlation_id.as_deref(), Some("m-1"));
        assert_eq!(env.reply_to, None);
        assert_eq!(env.job_type.as_deref(), Some("noop"));

        let typed = BasicProperties::default().with_type("transfer".into());
        let env = Envelope::from_properties(&typed, Some("noop"));
        assert_eq!(env.job_type.as_deref(), Some("transfer"));
        assert_eq!(env.correlation_id, None);
    }

    #[test]
    fn attempt_header_is_read_from_any_integer_type() {
        let props = |v: AMQPValue| {
            let mut t = FieldTable::default();
            t.insert(headers::ATTEMPT.into(), v);
            BasicProperties::default().with_headers(t)
        };
        assert_eq!(
            Envelope::from_properties(&BasicProperties::default(), None).attempt,
            1
        );
        assert_eq!(
            Envelope::from_properties(&props(AMQPValue::LongLongInt(3)), None).attempt,
            3
        );
        assert_eq!(
            Envelope::from_properties(&props(AMQPValue::ShortShortUInt(2)), None).attempt,
            2
        );
        assert_eq!(
            Envelope::from_properties(&props(long_string("4")), None).attempt,
            4
        );
        assert_eq!(
            Envelope::from_properties(&props(AMQPValue::LongLongInt(-1)), None).attempt,
            1
        );
    }

    #[test]
    fn long_header_values_are_cut_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_HEADER_BYTES);
        assert!(cut.ends_with("..."));
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn reply_carries_the_contract_headers() {
        let request = Envelope {
            message_id: Some("m-1".into()),
            correlation_id: Some("c-1".into()),
            traceparent: Some("00-abc-def-01".into()),
            ..Envelope::default()
        };
        let props = reply_properties(
            &request,
            ReplyHeaders {
                status: "ok",
                attempts: 2,
                duplicate: false,
            },
        );
        assert_eq!(
            props.correlation_id().as_ref().map(|c| c.as_str()),
            Some("c-1")
        );
        let h = props.headers().as_ref().expect("headers");
        assert_eq!(
            header_text(&h.inner()[headers::STATUS]).as_deref(),
            Some("ok")
        );
        assert_eq!(
            header_text(&h.inner()[headers::REQUEST_ID]).as_deref(),
            Some("m-1")
        );
        assert_eq!(h.inner()[headers::ATTEMPTS], AMQPValue::LongLongInt(2));
        assert!(props.message_id().is_some());
        assert!(!h.inner().contains_key(headers::DUPLICATE));

        let dup = reply_properties(
            &request,
            ReplyHeaders {
                status: "ok",
                attempts: 1,
                duplicate: true,
            },
        );
        let h = dup.headers().as_ref().expect("headers");
        assert_eq!(h.inner()[headers::DUPLICATE], AMQPValue::Boolean(true));
    }
}
