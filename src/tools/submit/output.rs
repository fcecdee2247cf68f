//! The output of `txq submit --wait`: one JSON line per request, and what
//! `--resume` reads back from it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, BufRead as _, Read as _, Seek as _, Write};
use std::path::Path;

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use serde::{Deserialize, Serialize};
use tracing::warn;

#[cfg(test)]
use super::Job;
use super::{Batch, Request, SubmitError, WaitOptions};
use crate::broker::{header_text, headers};

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Committed (or, duplicate, committed by an earlier delivery).
    Ok,
    /// Refused by the handler; nothing committed.
    Rejected,
    /// Dead-lettered.
    Failed,
    /// No reply within `--timeout`.
    TimedOut,
}

/// A reply, as `submit` reads it.
#[derive(Debug, Clone)]
pub(super) struct Answer {
    pub(super) status: Status,
    pub(super) duplicate: bool,
    pub(super) body: serde_json::Value,
}

impl Answer {
    pub(super) fn from_delivery(delivery: &Delivery) -> Self {
        let body = serde_json::from_slice(&delivery.data).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&delivery.data).into_owned())
        });
        let header = |name: &str| {
            delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name).cloned())
        };
        let status_text = header(headers::STATUS)
            .as_ref()
            .and_then(header_text)
            .or_else(|| body["status"].as_str().map(str::to_owned));
        let status = match status_text.as_deref() {
            Some("ok") => Status::Ok,
            Some("rejected") => Status::Rejected,
            _ => Status::Failed,
        };
        let duplicate = match header(headers::DUPLICATE) {
            Some(AMQPValue::Boolean(b)) => b,
            Some(other) => header_text(&other).is_some_and(|t| t == "true"),
            None => false,
        };
        Self {
            status,
            duplicate,
            body,
        }
    }
}

/// One line of output: how the request of one input line ended.
#[derive(Serialize)]
struct Record<'a> {
    line: usize,
    message_id: &'a str,
    correlation_id: &'a str,
    #[serde(rename = "type")]
    job_type: &'a str,
    status: Status,
    duplicate: bool,
    reply: Option<&'a serde_json::Value>,
}

/// What `--resume` reads back from an output line.
#[derive(Deserialize)]
struct Recorded {
    line: usize,
    message_id: String,
    status: Status,
}

/// The message_id each input line has now, for `--resume` to compare with what an
/// output file recorded.
pub(super) trait CurrentIds {
    /// The message_id of the request on input `line`; `None` if that line is
    /// blank or past the end.
    fn message_id_of(&self, line: usize) -> Option<Cow<'_, str>>;
}

impl CurrentIds for Batch {
    fn message_id_of(&self, line: usize) -> Option<Cow<'_, str>> {
        self.index_of_line(line).map(|i| self.get(i).message_id)
    }
}

#[cfg(test)]
impl<const N: usize> CurrentIds for [Job; N] {
    fn message_id_of(&self, line: usize) -> Option<Cow<'_, str>> {
        self.iter()
            .find(|j| j.line == line)
            .map(|j| Cow::Borrowed(j.message_id.as_str()))
    }
}

/// The lines an output file has a reply for, with how each ended, in line order.
#[derive(Debug, Default)]
pub(super) struct Answered(Vec<(usize, Status)>);

impl Answered {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The lines, ascending, with how each ended.
    pub(super) fn iter(&self) -> impl Iterator<Item = (usize, Status)> + '_ {
        self.0.iter().copied()
    }
}

impl PartialEq<HashMap<usize, Status>> for Answered {
    fn eq(&self, other: &HashMap<usize, Status>) -> bool {
        self.0.len() == other.len() && self.iter().all(|(l, s)| other.get(&l) == Some(&s))
    }
}

/// The input lines `path` already has a reply for (anything but `timed_out`), with
/// how each ended (the last record of a line counts). A missing file has none;
/// unreadable lines (a write cut short) are ignored, so their requests are sent
/// again, which the inbox makes safe. Read a line at a time: the file can be
/// many times the input's size.
pub(super) fn answered_lines<R: CurrentIds + ?Sized>(
    path: &Path,
    requests: &R,
) -> Result<Answered, SubmitError> {
    let failed = |source| SubmitError::Output {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Answered::default()),
        Err(source) => return Err(failed(source)),
    };
    let mut reader = io::BufReader::new(file);
    let mut answered = Vec::new();
    let mut unreadable = 0;
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if reader.read_until(b'\n', &mut raw).map_err(failed)? == 0 {
            break;
        }
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(entry) = serde_json::from_slice::<Recorded>(&raw) else {
            unreadable += 1;
            continue;
        };
        let current = requests.message_id_of(entry.line);
        if current.as_deref() != Some(entry.message_id.as_str()) {
            return Err(SubmitError::ResumeMismatch {
                path: path.to_owned(),
                line: entry.line,
                recorded: entry.message_id,
                current: current.map(Cow::into_owned),
            });
        }
        if entry.status != Status::TimedOut {
            answered.push((entry.line, entry.status));
        }
    }
    if unreadable > 0 {
        warn!(
            file = %path.display(),
            lines = unreadable,
            "ignoring unreadable lines of the output; their requests are sent again"
        );
    }
    // Stable: a line's records stay in file order, and the last one stands.
    answered.sort_by_key(|&(line, _)| line);
    answered.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            earlier.1 = later.1;
        }
        same
    });
    Ok(Answered(answered))
}

/// Where the replies go: standard output, or a file (appended to by `--resume`).
pub(super) fn open_output(wait: &WaitOptions) -> Result<Box<dyn Write + Send>, SubmitError> {
    let Some(path) = &wait.output else {
        return Ok(Box::new(io::stdout()));
    };
    let failed = |source| SubmitError::Output {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(!wait.resume)
        .open(path)
        .map_err(failed)?;
    if wait.resume {
        // A run killed mid-write can leave a last line without its newline; end it,
        // so the next record starts a line of its own.
        let len = file.seek(io::SeekFrom::End(0)).map_err(failed)?;
        if len > 0 {
            file.seek(io::SeekFrom::End(-1)).map_err(failed)?;
            let mut last = [0u8];
            file.read_exact(&mut last).map_err(failed)?;
            file.seek(io::SeekFrom::End(0)).map_err(failed)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(failed)?;
            }
        }
    }
    // Line by line, so a killed run leaves whole records for `--resume`.
    Ok(Box::new(io::LineWriter::new(file)))
}

/// Writes records as JSON lines.
pub(super) struct Sink {
    pub(super) out: Box<dyn Write + Send>,
}

impl Sink {
    pub(super) fn write(
        &mut self,
        request: &Request<'_>,
        answer: Option<&Answer>,
    ) -> Result<(), SubmitError> {
        let record = Record {
            line: request.line,
            message_id: &request.message_id,
            correlation_id: &request.correlation_id,
            job_type: &request.job_type,
            status: answer.map_or(Status::TimedOut, |a| a.status),
            duplicate: answer.is_some_and(|a| a.duplicate),
            reply: answer.map(|a| &a.body),
        };
        let mut line = serde_json::to_vec(&record)
            .map_err(io::Error::from)
            .map_err(SubmitError::WriteOutput)?;
        line.push(b'\n');
        self.out.write_all(&line).map_err(SubmitError::WriteOutput)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DEFAULT_TIMEOUT, ReplyMode};
    use super::*;
    use uuid::Uuid;

    fn job(line: usize, id: &str) -> Job {
        Job {
            line,
            job_type: "t".into(),
            body: b"{}".to_vec(),
            message_id: id.into(),
            correlation_id: id.into(),
        }
    }
    #[test]
    fn resume_reads_answered_lines_and_notices_another_input() {
        let dir = std::env::temp_dir().join(format!("txq-submit-unit-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("out.jsonl");
        let jobs = [job(1, "a"), job(2, "b"), job(4, "d")];
        assert!(
            answered_lines(&path, &jobs)
                .expect("missing is empty")
                .is_empty()
        );

        std::fs::write(
            &path,
            concat!(
                "{\"line\":1,\"message_id\":\"a\",\"status\":\"ok\"}\n",
                "{\"line\":2,\"message_id\":\"b\",\"status\":\"timed_out\"}\n",
                "{\"line\":4,\"message_id\":\"d\",\"status\":\"rejected\"}\n",
                "{\"line\":2,\"message_id\":\"b\",\"sta",
            ),
        )
        .expect("write");
        let answered = answered_lines(&path, &jobs).expect("readable");
        assert_eq!(
            answered,
            HashMap::from([(1, Status::Ok), (4, Status::Rejected)]),
            "timed out and torn lines are not answers"
        );

        let wait = WaitOptions {
            mode: ReplyMode::ExclusiveQueue,
            timeout: DEFAULT_TIMEOUT,
            ordered: false,
            output: Some(path.clone()),
            resume: true,
        };
        let mut out = open_output(&wait).expect("opens");
        out.write_all(b"{\"line\":2,\"message_id\":\"b\",\"status\":\"ok\"}\n")
            .expect("append");
        drop(out);
        let answered = answered_lines(&path, &jobs).expect("readable");
        assert_eq!(
            answered,
            HashMap::from([(1, Status::Ok), (2, Status::Ok), (4, Status::Rejected)]),
            "the torn line was ended first"
        );

        let changed = [job(1, "a"), job(2, "B"), job(4, "d")];
        match answered_lines(&path, &changed) {
            Err(SubmitError::ResumeMismatch { line: 2, .. }) => {}
            other => panic!("expected a mismatch at line 2, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
