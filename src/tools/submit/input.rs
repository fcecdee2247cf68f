//! The input of `txq submit`: JSON lines into [`Job`]s, and the message_ids of
//! lines that have none.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read as _};
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{SubmitError, SubmitOptions};

/// The UUID v5 namespace of derived message_ids; fixed forever, since changing it
/// would make a re-run of an old file run again.
pub const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x7d4f_05b1_63f8_4655_a706_d433_ce7b_c675);

/// What is wrong with one input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based, blank lines counted, as an editor shows it.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// At most this many line errors are shown; the rest are counted.
const SHOWN_ERRORS: usize = 10;

pub(super) struct LineErrors<'a>(pub(super) &'a [LineError]);

impl fmt::Display for LineErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the input has {} invalid line(s); nothing was published",
            self.0.len()
        )?;
        for e in self.0.iter().take(SHOWN_ERRORS) {
            write!(f, "\n  {e}")?;
        }
        if self.0.len() > SHOWN_ERRORS {
            write!(f, "\n  … and {} more", self.0.len() - SHOWN_ERRORS)?;
        }
        Ok(())
    }
}

/// Where the requests come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A JSON-lines file.
    File(PathBuf),
    /// Standard input.
    Stdin,
}

/// One request of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// 1-based input line.
    pub line: usize,
    /// The AMQP `type`.
    pub job_type: String,
    /// The payload, exactly as written in the input.
    pub body: Vec<u8>,
    /// The line's own, or [`derive_message_id`].
    pub message_id: String,
    /// The line's own, or the message_id.
    pub correlation_id: String,
}

const NOT_A_REQUEST: &str =
    "expected an object {\"type\":…,\"payload\":…} (or pass --type when lines are bare payloads)";

/// A line that is a whole request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRequest<'a> {
    #[serde(rename = "type")]
    job_type: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    message_id: Option<String>,
    correlation_id: Option<String>,
}

/// The message_id of a line without one: UUID v5 in [`MESSAGE_ID_NAMESPACE`] of
/// `"<identity>\n<line>\n<type>\n<text>"`, where `text` is the line without its
/// surrounding whitespace. Any change to the identity, line number, type or text
/// makes another id; the same line of the same batch always gets the same one.
pub fn derive_message_id(identity: &str, line: usize, job_type: &str, text: &str) -> String {
    let name = format!("{identity}\n{line}\n{job_type}\n{text}");
    Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes()).to_string()
}

/// The identity of a batch, the first part of its derived message_ids:
/// `batch:<id>` for `--batch-id`, `file:<absolute path>` for a regular file, and
/// `content:<UUID v5 of the content>` for standard input and other streams (a pipe
/// or process substitution has no lasting name).
pub fn batch_identity(
    source: &Source,
    content: &[u8],
    batch_id: Option<&str>,
) -> Result<String, SubmitError> {
    if let Some(id) = batch_id {
        return Ok(format!("batch:{id}"));
    }
    if let Source::File(path) = source {
        let failed = |source| SubmitError::ReadInput {
            path: path.display().to_string(),
            source,
        };
        if std::fs::metadata(path).map_err(failed)?.is_file() {
            let absolute = std::fs::canonicalize(path).map_err(failed)?;
            return Ok(format!("file:{}", absolute.display()));
        }
    }
    Ok(format!(
        "content:{}",
        Uuid::new_v5(&MESSAGE_ID_NAMESPACE, content)
    ))
}

/// AMQP short strings (type, ids) hold at most 255 bytes.
fn short_text(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        Err(format!("`{what}` is empty"))
    } else if value.len() > 255 {
        Err(format!("`{what}` is longer than 255 bytes"))
    } else {
        Ok(())
    }
}

/// serde_json's message without its " at line 1 column N" (always line 1 here).
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let message = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(m, _)| m);
    if e.column() > 0 {
        format!("column {}: {message}", e.column())
    } else {
        message.to_owned()
    }
}

/// Parses JSON-lines `content` into jobs. Blank lines are skipped (but counted).
/// With `job_type`, each line is a bare payload of that type; otherwise each is
/// `{"type":…,"payload":…,"message_id"?:…,"correlation_id"?:…}`. Every invalid
/// line is reported, by number.
pub fn parse_batch(
    content: &[u8],
    identity: &str,
    job_type: Option<&str>,
) -> Result<Vec<Job>, SubmitError> {
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    // correlation_id → the line that uses it: replies are matched by it.
    let mut correlations: HashMap<String, usize> = HashMap::new();
    // message_id → the line that uses it: the worker's inbox answers a repeated
    // one from the first's stored reply, so the second payload would never run.
    let mut message_ids: HashMap<String, usize> = HashMap::new();
    if let Some(t) = job_type {
        if let Err(message) = short_text("--type", t) {
            return Err(SubmitError::Usage(message));
        }
    }
    for (i, raw) in content.split(|b| *b == b'\n').enumerate() {
        let line = i + 1;
        let fail = |message: String| LineError { line, message };
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t.trim(),
            Err(e) => {
                errors.push(fail(format!("not UTF-8 ({e})")));
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        let parsed = match job_type {
            Some(t) => serde_json::from_str::<&RawValue>(text)
                .map(|_| (t.to_owned(), text.as_bytes().to_vec(), None, None))
                .map_err(|e| format!("not JSON: {}", json_error(&e))),
            // serde would take an array for the struct too, with a baffling message.
            None if !text.starts_with('{') => Err(match serde_json::from_str::<&RawValue>(text) {
                Ok(_) => NOT_A_REQUEST.to_owned(),
                Err(e) => format!("not JSON: {}", json_error(&e)),
            }),
            None => serde_json::from_str::<LineRequest<'_>>(text)
                .map(|r| {
                    (
                        r.job_type,
                        r.payload.get().as_bytes().to_vec(),
                        r.message_id,
                        r.correlation_id,
                    )
                })
                .map_err(|e| match e.classify() {
                    serde_json::error::Category::Data => json_error(&e),
                    _ => format!("not JSON: {}", json_error(&e)),
                }),
        };
        let (job_type, body, message_id, correlation_id) = match parsed {
            Ok(p) => p,
            Err(message) => {
                errors.push(fail(message));
                continue;
            }
        };
        let checks = [
            Some(("type", job_type.as_str())),
            message_id.as_deref().map(|m| ("message_id", m)),
            correlation_id.as_deref().map(|c| ("correlation_id", c)),
        ];
        if let Some(message) = checks
            .into_iter()
            .flatten()
            .find_map(|(what, v)| short_text(what, v).err())
        {
            errors.push(fail(message));
            continue;
        }
        let explicit = correlation_id.is_some();
        let message_id =
            message_id.unwrap_or_else(|| derive_message_id(identity, line, &job_type, text));
        let correlation_id = correlation_id.unwrap_or_else(|| message_id.clone());
        if let Some(first) = message_ids.get(&message_id) {
            errors.push(fail(format!(
                "message_id `{message_id}` is already used by line {first}; the worker would \
                 answer this line with that line's reply and never run it, so it must be \
                 unique in a batch"
            )));
            continue;
        }
        if let Some(first) = correlations.get(&correlation_id) {
            let what = if explicit {
                "correlation_id"
            } else {
                "message_id (the correlation_id when none is given)"
            };
            errors.push(fail(format!(
                "{what} `{correlation_id}` is already used by line {first}; replies are \
                 matched by correlation_id, so it must be unique in a batch"
            )));
            continue;
        }
        correlations.insert(correlation_id.clone(), line);
        message_ids.insert(message_id.clone(), line);
        jobs.push(Job {
            line,
            job_type,
            body,
            message_id,
            correlation_id,
        });
    }
    if errors.is_empty() {
        Ok(jobs)
    } else {
        Err(SubmitError::Input(errors))
    }
}

/// Reads and parses the whole input.
pub fn load_batch(options: &SubmitOptions) -> Result<Vec<Job>, SubmitError> {
    let content = match &options.source {
        Source::File(path) => std::fs::read(path).map_err(|source| SubmitError::ReadInput {
            path: path.display().to_string(),
            source,
        })?,
        Source::Stdin => {
            let mut buf = Vec::new();
            io::stdin()
                .lock()
                .read_to_end(&mut buf)
                .map_err(|source| SubmitError::ReadInput {
                    path: "standard input".into(),
                    source,
                })?;
            buf
        }
    };
    let identity = batch_identity(&options.source, &content, options.batch_id.as_deref())?;
    parse_batch(&content, &identity, options.job_type.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(jobs: &[Job]) -> Vec<usize> {
        jobs.iter().map(|j| j.line).collect()
    }
    fn input_errors(r: Result<Vec<Job>, SubmitError>) -> Vec<LineError> {
        match r {
            Err(SubmitError::Input(errors)) => errors,
            other => panic!("expected input errors, got {other:?}"),
        }
    }
    #[test]
    fn whole_requests_keep_their_ids_and_payload_bytes() {
        let input = br#"{"type":"transfer","payload":{"from":1, "to":2,"amount":12345678901234567890},"message_id":"m-1","correlation_id":"c-1"}

{"type":"noop","payload":{}}
"#;
        let jobs = parse_batch(input, "file:/x", None).expect("valid");
        assert_eq!(lines(&jobs), [1, 3]);
        assert_eq!(jobs[0].job_type, "transfer");
        assert_eq!(
            jobs[0].body, br#"{"from":1, "to":2,"amount":12345678901234567890}"#,
            "the payload is sent exactly as written"
        );
        assert_eq!(jobs[0].message_id, "m-1");
        assert_eq!(jobs[0].correlation_id, "c-1");
        assert_eq!(
            jobs[1].message_id,
            derive_message_id("file:/x", 3, "noop", r#"{"type":"noop","payload":{}}"#)
        );
        assert_eq!(jobs[1].correlation_id, jobs[1].message_id);
    }
    #[test]
    fn bare_payloads_take_the_type_flag() {
        let jobs = parse_batch(b"{\"id\":1}\r\n[1,2]\n\"text\"\n", "batch:b", Some("echo"))
            .expect("valid");
        assert_eq!(lines(&jobs), [1, 2, 3]);
        assert!(jobs.iter().all(|j| j.job_type == "echo"));
        assert_eq!(
            jobs[0].body, b"{\"id\":1}",
            "the CR is not part of the payload"
        );
        assert_eq!(jobs[2].body, b"\"text\"");
    }
    #[test]
    fn derived_ids_are_stable_and_change_with_every_part() {
        let id = derive_message_id("file:/a", 3, "t", "{}");
        assert_eq!(id, derive_message_id("file:/a", 3, "t", "{}"));
        for other in [
            derive_message_id("file:/b", 3, "t", "{}"),
            derive_message_id("file:/a", 4, "t", "{}"),
            derive_message_id("file:/a", 3, "u", "{}"),
            derive_message_id("file:/a", 3, "t", "{ }"),
        ] {
            assert_ne!(id, other);
        }
        // Pinned, as Python's uuid.uuid5 computes it: the README tells producers how
        // to, and a change would make old files run again.
        assert_eq!(
            derive_message_id("batch:b", 1, "echo", "{}"),
            "dedb0958-f6d6-57cb-a788-cdb38ecfc1a1"
        );
        let a = batch_identity(&Source::Stdin, b"x\n", None).expect("identity");
        assert_eq!(
            a,
            batch_identity(&Source::Stdin, b"x\n", None).expect("identity")
        );
        assert_ne!(
            a,
            batch_identity(&Source::Stdin, b"y\n", None).expect("identity")
        );
        assert_eq!(
            batch_identity(&Source::Stdin, b"x\n", Some("nightly-1")).expect("identity"),
            "batch:nightly-1"
        );
    }

    #[test]
    fn a_regular_file_is_known_by_its_path_and_a_stream_by_its_content() {
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let relative = manifest.join("src/../Cargo.toml");
        let id = batch_identity(&Source::File(relative), b"", None).expect("identity");
        let expected = manifest.canonicalize().expect("dir").join("Cargo.toml");
        assert_eq!(id, format!("file:{}", expected.display()));
        // A device, like a pipe, has no lasting name: the content stands for it.
        let stream = Source::File("/dev/null".into());
        assert_eq!(
            batch_identity(&stream, b"x\n", None).expect("identity"),
            batch_identity(&Source::Stdin, b"x\n", None).expect("identity")
        );
        assert!(batch_identity(&Source::File("no/such".into()), b"", None).is_err());
    }

    #[test]
    fn every_bad_line_is_named_and_nothing_is_accepted() {
        let input = concat!(
            "{\"type\":\"t\",\"payload\":1}\n",
            "{\"type\":\"t\",\"payload\":\n",
            "not json\n",
            "{\"payload\":{}}\n",
            "{\"type\":\"t\",\"payload\":{},\"messageid\":\"x\"}\n",
            "[1,2]\n",
            "{\"type\":\"\",\"payload\":{}}\n",
        );
        let errors = input_errors(parse_batch(input.as_bytes(), "i", None));
        let at: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(at, [2, 3, 4, 5, 6, 7], "{errors:?}");
        assert!(errors[1].message.starts_with("not JSON"), "{}", errors[1]);
        assert!(errors[2].message.contains("`type`"), "{}", errors[2]);
        assert!(errors[3].message.contains("messageid"), "{}", errors[3]);
        assert!(errors[4].message.contains("--type"), "{}", errors[4]);
        assert!(errors[5].message.contains("empty"), "{}", errors[5]);
        let shown = SubmitError::Input(errors).to_string();
        assert!(shown.contains("line 3: not JSON"), "{shown}");
        assert!(shown.contains("nothing was published"), "{shown}");

        assert!(matches!(
            parse_batch(b"{}\n", "i", Some("")),
            Err(SubmitError::Usage(m)) if m.contains("--type")
        ));
        let errors = input_errors(parse_batch(b"{}\n{oops\n\xff\n", "i", Some("t")));
        let at: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(at, [2, 3]);
        assert!(errors[1].message.contains("UTF-8"), "{}", errors[1]);
    }
    #[test]
    fn message_and_correlation_ids_must_be_unique_in_a_batch() {
        let input = concat!(
            "{\"type\":\"t\",\"payload\":1,\"correlation_id\":\"c\"}\n",
            "{\"type\":\"t\",\"payload\":2,\"correlation_id\":\"c\"}\n",
            "{\"type\":\"t\",\"payload\":3,\"message_id\":\"m\"}\n",
            "{\"type\":\"t\",\"payload\":4,\"message_id\":\"m\",\"correlation_id\":\"d\"}\n",
            "{\"type\":\"t\",\"payload\":5,\"message_id\":\"m\"}\n",
            "{\"type\":\"t\",\"payload\":6,\"message_id\":\"n\",\"correlation_id\":\"e\"}\n",
        );
        let errors = input_errors(parse_batch(input.as_bytes(), "i", None));
        let at: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(at, [2, 4, 5], "{errors:?}");
        assert!(
            errors[0].message.contains("correlation_id"),
            "{}",
            errors[0]
        );
        assert!(errors[0].message.contains("line 1"), "{}", errors[0]);
        // Another correlation_id does not help: the inbox knows requests by message_id.
        for e in &errors[1..] {
            assert!(e.message.starts_with("message_id `m`"), "{e}");
            assert!(e.message.contains("line 3"), "{e}");
        }
    }
    #[test]
    fn ids_longer_than_amqp_allows_are_refused() {
        let long = "x".repeat(256);
        let input = format!("{{\"type\":\"t\",\"payload\":1,\"message_id\":\"{long}\"}}\n");
        let errors = input_errors(parse_batch(input.as_bytes(), "i", None));
        assert!(errors[0].message.contains("255 bytes"), "{}", errors[0]);
    }
}
