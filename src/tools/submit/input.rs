//! The input of `txq submit`: JSON lines checked into a [`Batch`], and the
//! message_ids of lines that have none.
//!
//! A batch keeps the input bytes once and, per request, 12 bytes: where its line
//! starts, and a fingerprint of its correlation_id with the request's index. The
//! type, payload and ids of a request are read again from its line when it is
//! published or its reply written ([`Batch::get`]), through the same code that
//! checked it. Duplicate ids are found by sorting fingerprints; a fingerprint
//! match is confirmed by comparing the ids themselves, so the check is exact.
//! (Owned strings per line and maps of cloned ids took 36× the input's size.)

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher as _, RandomState};
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

/// One request of the batch, owned: what [`parse_batch`] returns. `txq submit`
/// itself keeps a [`Batch`] and reads each request from it as a [`Request`].
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

impl From<Request<'_>> for Job {
    fn from(r: Request<'_>) -> Self {
        Self {
            line: r.line,
            job_type: r.job_type.into_owned(),
            body: r.body.to_vec(),
            message_id: r.message_id.into_owned(),
            correlation_id: r.correlation_id.into_owned(),
        }
    }
}

/// One request of a [`Batch`], read from its line: borrowed from the input where
/// it can be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// 1-based input line.
    pub line: usize,
    /// The AMQP `type`.
    pub job_type: Cow<'a, str>,
    /// The payload, exactly as written in the input.
    pub body: &'a [u8],
    /// The line's own, or [`derive_message_id`].
    pub message_id: Cow<'a, str>,
    /// The line's own, or the message_id.
    pub correlation_id: Cow<'a, str>,
}

const NOT_A_REQUEST: &str =
    "expected an object {\"type\":…,\"payload\":…} (or pass --type when lines are bare payloads)";

/// A line that is a whole request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRequest<'a> {
    #[serde(rename = "type", borrow)]
    job_type: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(borrow)]
    message_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    correlation_id: Option<Cow<'a, str>>,
}

/// What a valid line says, before the ids it lacks are filled in.
struct Parsed<'a> {
    job_type: Cow<'a, str>,
    body: &'a str,
    message_id: Option<Cow<'a, str>>,
    correlation_id: Option<Cow<'a, str>>,
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

/// Checks one non-blank line (without surrounding whitespace): a bare payload of
/// `job_type`, or a whole request.
fn parse_line<'a>(text: &'a str, job_type: Option<&'a str>) -> Result<Parsed<'a>, String> {
    let parsed = match job_type {
        Some(t) => serde_json::from_str::<&RawValue>(text)
            .map(|_| Parsed {
                job_type: Cow::Borrowed(t),
                body: text,
                message_id: None,
                correlation_id: None,
            })
            .map_err(|e| format!("not JSON: {}", json_error(&e))),
        // serde would take an array for the struct too, with a baffling message.
        None if !text.starts_with('{') => Err(match serde_json::from_str::<&RawValue>(text) {
            Ok(_) => NOT_A_REQUEST.to_owned(),
            Err(e) => format!("not JSON: {}", json_error(&e)),
        }),
        None => serde_json::from_str::<LineRequest<'_>>(text)
            .map(|r| Parsed {
                job_type: r.job_type,
                body: r.payload.get(),
                message_id: r.message_id,
                correlation_id: r.correlation_id,
            })
            .map_err(|e| match e.classify() {
                serde_json::error::Category::Data => json_error(&e),
                _ => format!("not JSON: {}", json_error(&e)),
            }),
    }?;
    let checks = [
        Some(("type", &*parsed.job_type)),
        parsed.message_id.as_deref().map(|m| ("message_id", m)),
        parsed
            .correlation_id
            .as_deref()
            .map(|c| ("correlation_id", c)),
    ];
    let problem = checks
        .into_iter()
        .flatten()
        .find_map(|(what, v)| short_text(what, v).err());
    match problem {
        Some(message) => Err(message),
        None => Ok(parsed),
    }
}

impl<'a> Parsed<'a> {
    /// The request, with the ids the line lacks filled in. The one place that
    /// makes ids: checking a batch and reading a request from it agree by
    /// construction.
    fn into_request(self, identity: &str, line: usize, text: &str) -> Request<'a> {
        let message_id = self
            .message_id
            .unwrap_or_else(|| Cow::Owned(derive_message_id(identity, line, &self.job_type, text)));
        let correlation_id = self.correlation_id.unwrap_or_else(|| message_id.clone());
        Request {
            line,
            job_type: self.job_type,
            body: self.body.as_bytes(),
            message_id,
            correlation_id,
        }
    }
}

/// Where each request's line starts, in 4 bytes a request, inputs past 4 GiB
/// included.
#[derive(Debug, Default)]
struct Offsets {
    /// The low 32 bits of each offset, in input order.
    low: Vec<u32>,
    /// For each 4 GiB boundary, the index of the first offset past it.
    boundaries: Vec<usize>,
}

impl Offsets {
    fn push(&mut self, offset: usize) {
        let offset = offset as u64;
        while (self.boundaries.len() as u64) < offset >> 32 {
            self.boundaries.push(self.low.len());
        }
        self.low.push(offset as u32);
    }

    fn get(&self, index: usize) -> usize {
        let high = self.boundaries.partition_point(|&first| first <= index) as u64;
        ((high << 32) | u64::from(self.low[index])) as usize
    }

    fn len(&self) -> usize {
        self.low.len()
    }
}

/// The input line of each request: its index, plus the lines before it that are
/// not requests (blank or invalid), counted in runs.
#[derive(Debug, Default)]
struct LineNumbers {
    /// Per run of lines that are not requests: how many requests come before it,
    /// and how many such lines there are up to its end.
    runs: Vec<(usize, usize)>,
}

impl LineNumbers {
    /// A line that is not a request, after `requests` requests.
    fn skip(&mut self, requests: usize) {
        match self.runs.last_mut() {
            Some((before, total)) if *before == requests => *total += 1,
            last => {
                let total = last.map_or(0, |(_, total)| *total) + 1;
                self.runs.push((requests, total));
            }
        }
    }

    fn line(&self, index: usize) -> usize {
        let runs = self.runs.partition_point(|&(before, _)| before <= index);
        let skipped = runs.checked_sub(1).map_or(0, |last| self.runs[last].1);
        index + 1 + skipped
    }

    /// The request on `line`, if it is one (of the first `len`).
    fn index(&self, line: usize, len: usize) -> Option<usize> {
        let (mut low, mut high) = (0, len);
        while low < high {
            let mid = low + (high - low) / 2;
            if self.line(mid) < line {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        (low < len && self.line(low) == line).then_some(low)
    }
}

/// A request's id, fingerprinted: 32 bits of a keyed hash of the id, and the
/// request's index. Sorted, equal ids sit next to each other; equal fingerprints
/// are only candidates, confirmed by comparing the ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Fingerprint {
    hash: u32,
    request: u32,
}

/// Makes fingerprints.
#[derive(Debug, Clone)]
struct Fingerprinter {
    /// Keyed per process, so no input collides on purpose. `None`: every id has
    /// the same fingerprint, for tests of the confirmation.
    keys: Option<RandomState>,
}

impl Fingerprinter {
    fn new() -> Self {
        Self {
            keys: Some(RandomState::new()),
        }
    }

    fn hash(&self, id: &str) -> u32 {
        // The low half of SipHash's 64 bits: as good as any other half.
        self.keys.as_ref().map_or(0, |k| k.hash_one(id) as u32)
    }
}

/// The requests of fingerprints that equal another's.
fn collisions(sorted: &[Fingerprint]) -> impl Iterator<Item = u32> + '_ {
    sorted
        .chunk_by(|a, b| a.hash == b.hash)
        .filter(|run| run.len() > 1)
        .flatten()
        .map(|f| f.request)
}

/// A checked batch: every line valid, every message_id and correlation_id unique.
/// Holds the input once; see the module docs for what else.
pub struct Batch {
    content: Vec<u8>,
    identity: String,
    job_type: Option<String>,
    offsets: Offsets,
    lines: LineNumbers,
    /// Fingerprints of the correlation_ids, sorted: replies are matched by them.
    by_correlation: Vec<Fingerprint>,
    fingerprints: Fingerprinter,
}

impl Batch {
    /// What derived message_ids are made from (`batch_identity`).
    pub fn identity(&self) -> &str {
        &self.identity
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("identity", &self.identity)
            .field("job_type", &self.job_type)
            .field("bytes", &self.content.len())
            .field("requests", &self.len())
            .finish_non_exhaustive()
    }
}

impl Batch {
    /// Checks JSON-lines `content`. Blank lines are skipped (but counted). With
    /// `job_type`, each line is a bare payload of that type; otherwise each is
    /// `{"type":…,"payload":…,"message_id"?:…,"correlation_id"?:…}`. Every invalid
    /// line is reported, by number, and so is every line whose message_id or
    /// correlation_id an earlier line already uses.
    pub fn parse(
        content: Vec<u8>,
        identity: String,
        job_type: Option<&str>,
    ) -> Result<Self, SubmitError> {
        Self::parse_with(content, identity, job_type, Fingerprinter::new())
    }

    fn parse_with(
        content: Vec<u8>,
        identity: String,
        job_type: Option<&str>,
        fingerprints: Fingerprinter,
    ) -> Result<Self, SubmitError> {
        if let Some(t) = job_type {
            if let Err(message) = short_text("--type", t) {
                return Err(SubmitError::Usage(message));
            }
        }
        // Sized once: growing by doubling would hold up to twice as much.
        let most = content.iter().filter(|b| **b == b'\n').count() + 1;
        let mut offsets = Offsets {
            low: Vec::with_capacity(most),
            boundaries: Vec::new(),
        };
        let mut lines = LineNumbers::default();
        let mut by_correlation = Vec::with_capacity(most);
        // Message_ids, once a line has a correlation_id of its own: until then
        // they are the correlation_ids.
        let mut by_message: Option<Vec<Fingerprint>> = None;
        let mut errors = Vec::new();
        let mut start = 0;
        for (i, raw) in content.split(|b| *b == b'\n').enumerate() {
            let (line, offset) = (i + 1, start);
            start += raw.len() + 1;
            let requests = offsets.len();
            let text = match std::str::from_utf8(raw) {
                Ok(t) => t.trim(),
                Err(e) => {
                    errors.push(LineError {
                        line,
                        message: format!("not UTF-8 ({e})"),
                    });
                    lines.skip(requests);
                    continue;
                }
            };
            if text.is_empty() {
                lines.skip(requests);
                continue;
            }
            let parsed = match parse_line(text, job_type) {
                Ok(p) => p,
                Err(message) => {
                    errors.push(LineError { line, message });
                    lines.skip(requests);
                    continue;
                }
            };
            let Ok(index) = u32::try_from(requests) else {
                errors.push(LineError {
                    line,
                    message: format!("more than {} requests: split the input", u32::MAX),
                });
                break;
            };
            let own_correlation = parsed.correlation_id.is_some();
            let request = parsed.into_request(&identity, line, text);
            if own_correlation && by_message.is_none() {
                by_message = Some(by_correlation.clone());
            }
            if let Some(by_message) = &mut by_message {
                by_message.push(Fingerprint {
                    hash: fingerprints.hash(&request.message_id),
                    request: index,
                });
            }
            by_correlation.push(Fingerprint {
                hash: fingerprints.hash(&request.correlation_id),
                request: index,
            });
            offsets.push(offset);
        }
        offsets.low.shrink_to_fit();
        lines.runs.shrink_to_fit();
        by_correlation.shrink_to_fit();
        by_correlation.sort_unstable();
        let mut suspects: Vec<u32> = collisions(&by_correlation).collect();
        if let Some(mut by_message) = by_message {
            by_message.sort_unstable();
            suspects.extend(collisions(&by_message));
        }
        suspects.sort_unstable();
        suspects.dedup();
        let batch = Self {
            content,
            identity,
            job_type: job_type.map(str::to_owned),
            offsets,
            lines,
            by_correlation,
            fingerprints,
        };
        errors.extend(batch.duplicates(&suspects));
        if errors.is_empty() {
            Ok(batch)
        } else {
            // One error a line at most: parse errors and duplicates, in line order.
            errors.sort_by_key(|e| e.line);
            Err(SubmitError::Input(errors))
        }
    }

    /// The lines among `suspects` (request indices, ascending) whose message_id or
    /// correlation_id an earlier line uses, compared in full. A request that is no
    /// suspect shares no id with any other, so it decides nothing here.
    fn duplicates(&self, suspects: &[u32]) -> Vec<LineError> {
        let mut errors = Vec::new();
        // correlation_id → the line that uses it: replies are matched by it.
        let mut correlations: HashMap<Cow<'_, str>, usize> = HashMap::new();
        // message_id → the line that uses it: the worker's inbox answers a repeated
        // one from the first's stored reply, so the second payload would never run.
        let mut message_ids: HashMap<Cow<'_, str>, usize> = HashMap::new();
        for &index in suspects {
            let (request, own_correlation) = self.read(index as usize);
            let line = request.line;
            if let Some(first) = message_ids.get(&request.message_id) {
                errors.push(LineError {
                    line,
                    message: format!(
                        "message_id `{}` is already used by line {first}; the worker would \
                         answer this line with that line's reply and never run it, so it \
                         must be unique in a batch",
                        request.message_id
                    ),
                });
                continue;
            }
            if let Some(first) = correlations.get(&request.correlation_id) {
                let what = if own_correlation {
                    "correlation_id"
                } else {
                    "message_id (the correlation_id when none is given)"
                };
                errors.push(LineError {
                    line,
                    message: format!(
                        "{what} `{}` is already used by line {first}; replies are matched \
                         by correlation_id, so it must be unique in a batch",
                        request.correlation_id
                    ),
                });
                continue;
            }
            correlations.insert(request.correlation_id, line);
            message_ids.insert(request.message_id, line);
        }
        errors
    }

    /// Requests in the batch.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether the batch has no request (the input was empty or blank).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The input line of request `index` (0-based, in input order).
    pub fn line(&self, index: usize) -> usize {
        self.lines.line(index)
    }

    /// The request on input `line`, if that line is one.
    pub fn index_of_line(&self, line: usize) -> Option<usize> {
        self.lines.index(line, self.len())
    }

    /// Request `index` (0-based, in input order), read again from its line.
    ///
    /// # Panics
    /// If `index` is not below [`Batch::len`].
    pub fn get(&self, index: usize) -> Request<'_> {
        self.read(index).0
    }

    /// Every request, in input order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Request<'_>> {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The request whose correlation_id is `correlation_id`, with its index.
    pub fn find_correlation(&self, correlation_id: &str) -> Option<(usize, Request<'_>)> {
        let hash = self.fingerprints.hash(correlation_id);
        let first = self.by_correlation.partition_point(|f| f.hash < hash);
        self.by_correlation[first..]
            .iter()
            .take_while(|f| f.hash == hash)
            .map(|f| (f.request as usize, self.get(f.request as usize)))
            .find(|(_, request)| request.correlation_id == correlation_id)
    }

    /// Request `index`, and whether its line gives a correlation_id of its own.
    fn read(&self, index: usize) -> (Request<'_>, bool) {
        let rest = &self.content[self.offsets.get(index)..];
        let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        // Neither can fail: these bytes passed both when the batch was made.
        let text = std::str::from_utf8(&rest[..end])
            .expect("a batch holds UTF-8 lines")
            .trim();
        let parsed = parse_line(text, self.job_type.as_deref()).expect("a batch holds valid lines");
        let own_correlation = parsed.correlation_id.is_some();
        let line = self.line(index);
        (
            parsed.into_request(&self.identity, line, text),
            own_correlation,
        )
    }
}

/// Parses JSON-lines `content` into jobs, as [`Batch::parse`] checks it, each
/// request owned.
pub fn parse_batch(
    content: &[u8],
    identity: &str,
    job_type: Option<&str>,
) -> Result<Vec<Job>, SubmitError> {
    let batch = Batch::parse(content.to_vec(), identity.to_owned(), job_type)?;
    Ok(batch.iter().map(Job::from).collect())
}

/// Reads and checks the whole input.
pub fn load_batch(options: &SubmitOptions) -> Result<Batch, SubmitError> {
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
            // Grown by doubling: up to twice the input, held for the whole run.
            buf.shrink_to_fit();
            buf
        }
    };
    let identity = batch_identity(&options.source, &content, options.batch_id.as_deref())?;
    Batch::parse(content, identity, options.job_type.as_deref())
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

    /// The rule `Batch::parse` must match, the plain way: every line in turn, its
    /// ids in maps of owned strings.
    fn reference(content: &[u8], identity: &str) -> Result<Vec<Job>, Vec<LineError>> {
        let (mut jobs, mut errors) = (Vec::new(), Vec::new());
        let mut message_ids: HashMap<String, usize> = HashMap::new();
        let mut correlations: HashMap<String, usize> = HashMap::new();
        for (i, raw) in content.split(|b| *b == b'\n').enumerate() {
            let line = i + 1;
            let Ok(text) = std::str::from_utf8(raw).map(str::trim) else {
                errors.push(LineError {
                    line,
                    message: "not UTF-8".into(),
                });
                continue;
            };
            if text.is_empty() {
                continue;
            }
            let parsed = match parse_line(text, None) {
                Ok(p) => p,
                Err(message) => {
                    errors.push(LineError { line, message });
                    continue;
                }
            };
            let own = parsed.correlation_id.is_some();
            let job = Job::from(parsed.into_request(identity, line, text));
            if let Some(first) = message_ids.get(&job.message_id) {
                errors.push(LineError {
                    line,
                    message: format!(
                        "message_id `{}` is already used by line {first}",
                        job.message_id
                    ),
                });
                continue;
            }
            if let Some(first) = correlations.get(&job.correlation_id) {
                let what = if own {
                    "correlation_id"
                } else {
                    "message_id (the"
                };
                errors.push(LineError {
                    line,
                    message: format!("{what} … `{}` line {first}", job.correlation_id),
                });
                continue;
            }
            message_ids.insert(job.message_id.clone(), line);
            correlations.insert(job.correlation_id.clone(), line);
            jobs.push(job);
        }
        if errors.is_empty() {
            Ok(jobs)
        } else {
            Err(errors)
        }
    }

    /// `n` lines of everything at once: blank and bad lines, ids of their own
    /// drawn from small pools (so some repeat), an id another line derives, and
    /// lines with no ids at all.
    fn mixed_input(n: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = move |m: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % m
        };
        let derived_elsewhere = derive_message_id("i", 2, "t", r#"{"type":"t","payload":2}"#);
        let mut text = String::new();
        for i in 0..n {
            let line = match next(12) {
                0 => String::new(),
                1 => "{\"type\":\"t\",\"payload\":".into(),
                2 => format!(
                    r#"{{"type":"t","payload":{i},"message_id":"m{}"}}"#,
                    next(40)
                ),
                3 => format!(
                    r#"{{"type":"t","payload":{i},"correlation_id":"c{}"}}"#,
                    next(40)
                ),
                4 => format!(
                    r#"{{"type":"t","payload":{i},"message_id":"m{}","correlation_id":"c{}"}}"#,
                    next(40),
                    next(40)
                ),
                5 => format!(r#"{{"type":"t","payload":{i},"message_id":"{derived_elsewhere}"}}"#),
                6 => format!(
                    r#"{{"type":"t","payload":{i},"correlation_id":"m{}"}}"#,
                    next(40)
                ),
                _ => format!(r#"{{"type":"t","payload":{}}}"#, next(3)),
            };
            text.push_str(&line);
            text.push('\n');
        }
        text.into_bytes()
    }

    #[test]
    fn duplicates_are_found_exactly_even_when_every_fingerprint_collides() {
        for seed in 0..20 {
            let input = mixed_input(300, seed);
            let expected = reference(&input, "i");
            for fingerprints in [Fingerprinter::new(), Fingerprinter { keys: None }] {
                let colliding = fingerprints.keys.is_none();
                let got = Batch::parse_with(input.clone(), "i".into(), None, fingerprints);
                match (&expected, got) {
                    (Ok(jobs), Ok(batch)) => {
                        assert_eq!(&batch.iter().map(Job::from).collect::<Vec<_>>(), jobs);
                    }
                    (Err(want), Err(SubmitError::Input(got))) => {
                        let at = |e: &[LineError]| e.iter().map(|e| e.line).collect::<Vec<_>>();
                        assert_eq!(at(&got), at(want), "seed {seed}, colliding {colliding}");
                        for (g, w) in got.iter().zip(want) {
                            // The reference's messages are short; their start and
                            // the id and line they name must agree.
                            let head = |m: &str| m.split(['`', ' ']).next().map(str::to_owned);
                            assert_eq!(head(&g.message), head(&w.message), "{g} / {w}");
                            if let Some(id) = w.message.split('`').nth(1) {
                                assert!(g.message.contains(&format!("`{id}`")), "{g} / {w}");
                                let first = w.message.rsplit(' ').next().expect("line");
                                assert!(g.message.contains(&format!("line {first};")), "{g} / {w}");
                            }
                        }
                    }
                    (want, got) => panic!("seed {seed}: expected {want:?}, got {got:?}"),
                }
            }
        }
    }

    #[test]
    fn replies_find_their_request_by_correlation_id_even_when_fingerprints_collide() {
        let input = concat!(
            "{\"type\":\"t\",\"payload\":1,\"correlation_id\":\"c\"}\n",
            "\n",
            "{\"type\":\"t\",\"payload\":2,\"message_id\":\"m\"}\n",
            "{\"type\":\"t\",\"payload\":3}\n",
        );
        for fingerprints in [Fingerprinter::new(), Fingerprinter { keys: None }] {
            let batch =
                Batch::parse_with(input.as_bytes().to_vec(), "i".into(), None, fingerprints)
                    .expect("valid");
            let derived = derive_message_id("i", 4, "t", r#"{"type":"t","payload":3}"#);
            for (id, index, line) in [("c", 0, 1), ("m", 1, 3), (derived.as_str(), 2, 4)] {
                let (i, request) = batch.find_correlation(id).expect("found");
                assert_eq!((i, request.line), (index, line), "{id}");
                assert_eq!(batch.index_of_line(line), Some(index));
            }
            assert!(batch.find_correlation("m-other").is_none());
            assert!(batch.find_correlation(&batch.get(0).message_id).is_none());
            assert_eq!(batch.index_of_line(2), None, "blank");
            assert_eq!(batch.index_of_line(5), None, "past the end");
        }
    }

    #[test]
    fn escaped_strings_are_read_as_json_says() {
        let text = r#"{"type":"tr\u0061nsfer","payload":{"a":"\n"},"correlation_id":"c\u002d1"}"#;
        let batch =
            Batch::parse(format!("{text}\n").into_bytes(), "i".into(), None).expect("valid");
        let request = batch.get(0);
        assert_eq!(request.job_type, "transfer");
        assert_eq!(request.correlation_id, "c-1");
        assert_eq!(request.body, br#"{"a":"\n"}"#);
        assert_eq!(
            request.message_id,
            derive_message_id("i", 1, "transfer", text)
        );
        assert_eq!(batch.find_correlation("c-1").map(|(i, _)| i), Some(0));
    }

    #[test]
    fn line_numbers_and_offsets_survive_blank_runs_and_4_gib() {
        let mut lines = LineNumbers::default();
        // Lines: 1 blank, 2 request 0, 3-5 blank, 6 request 1, 7 request 2, 8 blank.
        lines.skip(0);
        for _ in 0..3 {
            lines.skip(1);
        }
        lines.skip(3);
        assert_eq!((0..3).map(|i| lines.line(i)).collect::<Vec<_>>(), [2, 6, 7]);
        let found: Vec<_> = (1..=9).map(|l| lines.index(l, 3)).collect();
        assert_eq!(
            found,
            [
                None,
                Some(0),
                None,
                None,
                None,
                Some(1),
                Some(2),
                None,
                None
            ]
        );

        let mut offsets = Offsets::default();
        let at = [0, 17, (1 << 32) - 1, 1 << 32, (1 << 32) + 5, (3 << 32) + 9];
        for o in at {
            offsets.push(o);
        }
        assert_eq!(
            (0..at.len()).map(|i| offsets.get(i)).collect::<Vec<_>>(),
            at
        );
    }

    #[test]
    fn a_request_costs_twelve_bytes_beside_its_line() {
        // Per request: where its line starts (4 bytes) and its correlation_id's
        // fingerprint with its index (8); the input itself, once. Owned strings per
        // line took 36 times the input (issue 12 §5).
        assert_eq!(std::mem::size_of::<Fingerprint>(), 8);
        const N: usize = 10_000;
        let mut input = String::new();
        for i in 0..N {
            input.push_str(&format!("{{\"id\":{i}}}\n"));
            if i % 100 == 0 {
                input.push('\n');
            }
        }
        let input = input.into_bytes();
        let (at, capacity) = (input.as_ptr(), input.capacity());
        let batch = Batch::parse(input, "i".into(), Some("t")).expect("valid");
        assert_eq!(batch.len(), N);
        assert_eq!(
            (batch.content.as_ptr(), batch.content.capacity()),
            (at, capacity),
            "the input itself, not a copy"
        );
        let held = batch.offsets.low.capacity() * 4
            + batch.offsets.boundaries.capacity() * 8
            + batch.lines.runs.capacity() * 16
            + batch.by_correlation.capacity() * 8;
        assert!(
            held <= 12 * N + 16 * (N / 100 + 1),
            "{held} bytes for {N} requests"
        );
    }
}
