//! Which dead letters a command acts on, and the error fingerprint that groups
//! failures with the same cause.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

use super::message::DeadLetter;

/// Selects messages; every condition given must hold. The default selects all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The job type (`type` property), exactly.
    pub job_type: Option<String>,
    /// The error kind, exactly (`database_error`, `rabbitmq:expired`…).
    pub error_kind: Option<String>,
    /// A substring of the error, the message_id or the body (case-sensitive).
    pub grep: Option<String>,
    /// Any of these message_ids.
    pub ids: Vec<String>,
    /// Only messages with properties that are not UTF-8.
    pub unreadable: bool,
    /// The error's [`fingerprint`], exactly: one group of `list --group`.
    pub fingerprint: Option<String>,
    /// Only messages without a job type (`type` property), as a group of those
    /// is shown.
    pub untyped: bool,
}

impl Filter {
    /// Whether `m` is selected.
    pub fn matches(&self, m: &DeadLetter) -> bool {
        if self
            .job_type
            .as_ref()
            .is_some_and(|t| m.job_type.as_ref() != Some(t))
        {
            return false;
        }
        if self.error_kind.as_ref().is_some_and(|k| &m.error_kind != k) {
            return false;
        }
        if self.unreadable && !m.is_unreadable() {
            return false;
        }
        if self.untyped && m.job_type.is_some() {
            return false;
        }
        if self
            .fingerprint
            .as_ref()
            .is_some_and(|f| &fingerprint(&m.error) != f)
        {
            return false;
        }
        if !self.ids.is_empty()
            && !m
                .message_id
                .as_ref()
                .is_some_and(|id| self.ids.contains(id))
        {
            return false;
        }
        if let Some(text) = &self.grep {
            let in_body = String::from_utf8_lossy(&m.body).contains(text.as_str());
            let in_id = m.message_id.as_ref().is_some_and(|id| id.contains(text));
            if !(m.error.contains(text.as_str()) || in_id || in_body) {
                return false;
            }
        }
        true
    }

    /// Whether the filter selects everything.
    pub fn is_empty(&self) -> bool {
        self.job_type.is_none()
            && self.error_kind.is_none()
            && self.grep.is_none()
            && self.ids.is_empty()
            && !self.unreadable
            && self.fingerprint.is_none()
            && !self.untyped
    }
}

static UUID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\b")
        .expect("a valid regex")
});
static QUOTED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|`[^`]*`"#).expect("a valid regex")
});
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)0x[0-9a-f]+|[0-9a-f]{16,}|\d+(?:\.\d+)?").expect("a valid regex")
});
static SPACE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\s+").expect("a valid regex"));

/// Longest fingerprint kept; the rest of a long error rarely tells causes apart.
const MAX_FINGERPRINT: usize = 200;

/// `error` with what varies between occurrences of the same failure replaced:
/// UUIDs by `<uuid>`, quoted literals by `'?'`, numbers and long hex by `?`;
/// whitespace collapsed.
pub fn fingerprint(error: &str) -> String {
    let s = UUID.replace_all(error, "<uuid>");
    let s = QUOTED.replace_all(&s, "'?'");
    let s = NUMBER.replace_all(&s, "?");
    let s = SPACE.replace_all(s.trim(), " ");
    let mut out = s.into_owned();
    if out.len() > MAX_FINGERPRINT {
        let mut end = MAX_FINGERPRINT;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// Failures with the same job type, error kind and fingerprint.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// How many messages.
    pub count: u64,
    /// The job type.
    #[serde(rename = "type")]
    pub job_type: Option<String>,
    /// The error kind.
    pub error_kind: String,
    /// The normalised error.
    pub fingerprint: String,
    /// The message_id of one of them, for `dlq show`.
    pub example_message_id: Option<String>,
    /// The earliest and latest failed-at seen (RFC 3339 sorts as text).
    pub first_failed_at: Option<String>,
    /// See `first_failed_at`.
    pub last_failed_at: Option<String>,
}

/// Counts messages by job type + error kind + fingerprint. Memory grows with the
/// number of distinct groups, not of messages.
#[derive(Debug, Default)]
pub struct Grouper {
    groups: HashMap<(Option<String>, String, String), Group>,
}

impl Grouper {
    /// Counts one message.
    pub fn add(&mut self, m: &DeadLetter) {
        let fp = fingerprint(&m.error);
        let key = (m.job_type.clone(), m.error_kind.clone(), fp.clone());
        let g = self.groups.entry(key).or_insert_with(|| Group {
            count: 0,
            job_type: m.job_type.clone(),
            error_kind: m.error_kind.clone(),
            fingerprint: fp,
            example_message_id: m.message_id.clone(),
            first_failed_at: None,
            last_failed_at: None,
        });
        g.count += 1;
        if let Some(at) = &m.failed_at {
            if g.first_failed_at.as_ref().is_none_or(|f| at < f) {
                g.first_failed_at = Some(at.clone());
            }
            if g.last_failed_at.as_ref().is_none_or(|l| at > l) {
                g.last_failed_at = Some(at.clone());
            }
        }
    }

    /// The groups, largest first.
    pub fn into_groups(self) -> Vec<Group> {
        let mut v: Vec<Group> = self.groups.into_values().collect();
        v.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.error_kind.cmp(&b.error_kind))
                .then_with(|| a.fingerprint.cmp(&b.fingerprint))
                .then_with(|| a.job_type.cmp(&b.job_type))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_ignore_ids_numbers_and_literals() {
        let a = fingerprint(
            "Table 'db_1.transfers' doesn't exist (id 42, 3f2a9c1e-0b7d-4e55-9a1b-2c3d4e5f6a7b)",
        );
        let b = fingerprint(
            "Table 'db_2.transfers' doesn't exist (id 7, 00000000-0000-0000-0000-000000000000)",
        );
        assert_eq!(a, b);
        assert_eq!(a, "Table '?' doesn't exist (id ?, <uuid>)");
        assert_ne!(
            fingerprint("no such account 1"),
            fingerprint("insufficient funds 1")
        );
        assert_eq!(fingerprint("a\n\n  b"), "a b");
        assert!(fingerprint(&"x".repeat(1000)).len() <= MAX_FINGERPRINT);
    }

    #[test]
    fn a_fingerprint_filter_selects_one_group() {
        use lapin::BasicProperties;
        use lapin::types::{AMQPValue, FieldTable};
        let dead = |error: &str| {
            let mut h = FieldTable::default();
            h.insert(
                "x-txq-error".into(),
                AMQPValue::LongString(error.as_bytes().to_vec().into()),
            );
            DeadLetter::new(BasicProperties::default().with_headers(h), Vec::new())
        };
        let (a1, a2, b) = (
            dead("no such account 17"),
            dead("no such account 4"),
            dead("insufficient funds 4"),
        );
        let filter = Filter {
            fingerprint: Some(fingerprint(&a1.error)),
            ..Filter::default()
        };
        assert!(!filter.is_empty());
        assert!(filter.matches(&a1) && filter.matches(&a2));
        assert!(!filter.matches(&b));
    }
}
