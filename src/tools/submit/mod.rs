//! `txq submit`: publishes a file of JSON-lines requests and, with `--wait`,
//! collects their replies.
//!
//! Requests are published persistent, through the default exchange to the request
//! queue, on one confirm-mode channel with at most `window` unconfirmed at a time
//! (and at most `rate` a second). The input is read and checked whole before the
//! first publish, so a bad line costs nothing: no half-submitted batch. The
//! checked [`Batch`] holds the input once and 12 bytes a request; a request is
//! read again from its line when it is published and when its reply is written.
//!
//! **Re-running a file is safe.** A line without a `message_id` gets one derived
//! from the batch's identity, its line number, its type and its text
//! ([`derive_message_id`]), so a second run publishes the same ids and the worker's
//! inbox answers them from the first run's stored replies (`x-txq-duplicate`)
//! instead of running them again. `--resume` goes further and does not publish the
//! lines that already have a reply in the output file.
//!
//! Replies are matched by `correlation_id` (the line's own, or its message_id),
//! on an exclusive server-named queue or on RabbitMQ direct reply-to, whose
//! consumer is started on the publishing channel before the first publish.

mod input;
mod output;
mod pace;
mod progress;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::broker::{self, BrokerError, Topology};
use crate::config::Config;

pub use input::{
    Batch, Job, LineError, MESSAGE_ID_NAMESPACE, Request, Source, batch_identity,
    derive_message_id, load_batch, parse_batch,
};
pub use output::Status;
pub use pace::{Rate, RateError};

use output::{Answer, Answered, Sink, answered_lines, open_output};
use pace::Pacer;
use progress::{Counters, Progress};

/// RabbitMQ's direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Unconfirmed publishes at most, unless `--window` says otherwise.
pub const DEFAULT_WINDOW: u16 = 256;

/// How long `--wait` waits without a reply once everything is published, unless
/// `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Exit codes of `txq submit`.
pub mod exit {
    /// Every request was published; with `--wait`, every one ended `ok`
    /// (a duplicate whose stored reply is `ok` included).
    pub const OK: u8 = 0;
    /// Some request ended `rejected`, `failed` or timed out.
    pub const NOT_OK: u8 = 1;
    /// Bad flags, input or output file (or configuration): nothing was published.
    pub const INPUT: u8 = 2;
    /// The broker or the output failed mid-way; running the same file again is safe.
    pub const BROKER: u8 = 3;
}

/// Why `txq submit` stopped.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The input could not be read.
    #[error("reading {path}: {source}")]
    ReadInput {
        /// The file, or `standard input`.
        path: String,
        /// What the OS said.
        source: io::Error,
    },
    /// A flag's value that cannot work.
    #[error("{0}")]
    Usage(String),
    /// Lines that are not valid requests; nothing was published.
    #[error("{}", input::LineErrors(.0))]
    Input(Vec<LineError>),
    /// The output file of `--resume` could not be read or opened.
    #[error("{path}: {source}")]
    Output {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The output file records another message_id for a line than the input has
    /// now: it belongs to another input, or the input changed.
    #[error(
        "{path}: line {line} was answered for message_id `{recorded}`, but input line {line} \
         is now {}; the input changed since that run (write to another --output)",
        current.as_ref().map_or_else(|| "no request".to_owned(), |c| format!("`{c}`"))
    )]
    ResumeMismatch {
        /// The output file.
        path: PathBuf,
        /// The input line.
        line: usize,
        /// The message_id in the output file.
        recorded: String,
        /// The message_id of the input line now (none: blank or past the end).
        current: Option<String>,
    },
    /// The broker could not be reached.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The AMQP URL, password redacted.
        url: String,
        /// What failed.
        source: Box<BrokerError>,
    },
    /// The broker refused to declare a queue as the configuration says (a queue
    /// that exists with other arguments, no permission): nothing was published.
    #[error(
        "{0}; the broker refuses the queues as this configuration declares them: make \
         the queue settings match the existing queue, or delete it (nothing was published)"
    )]
    Topology(Box<BrokerError>),
    /// Declaring the queues failed.
    #[error(transparent)]
    Broker(Box<BrokerError>),
    /// A channel, publish or consume failed (often a lost connection).
    #[error("rabbitmq: {0}")]
    Amqp(Box<lapin::Error>),
    /// The broker refused responsibility for a request.
    #[error("line {line}: rabbitmq nacked the publish")]
    Nacked {
        /// The input line.
        line: usize,
    },
    /// The request queue vanished mid-run.
    #[error("line {line}: rabbitmq could not route the request to `{queue}`: {reason}")]
    Unroutable {
        /// The input line.
        line: usize,
        /// The request queue.
        queue: String,
        /// The broker's reply text.
        reason: String,
    },
    /// The reply consumer ended before every reply came.
    #[error("the reply consumer stopped: {0}")]
    ConsumerEnded(&'static str),
    /// Writing a reply failed (a full disk, a closed pipe).
    #[error("writing the replies: {0}")]
    WriteOutput(io::Error),
}

// Boxed: lapin's errors are large, and every result of this module carries one.
impl From<BrokerError> for SubmitError {
    fn from(e: BrokerError) -> Self {
        Self::Broker(Box::new(e))
    }
}

impl From<lapin::Error> for SubmitError {
    fn from(e: lapin::Error) -> Self {
        Self::Amqp(Box::new(e))
    }
}

impl SubmitError {
    /// The process exit code for this error ([`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::ReadInput { .. }
            | Self::Usage(_)
            | Self::Input(_)
            | Self::Output { .. }
            | Self::ResumeMismatch { .. }
            | Self::Topology(_) => exit::INPUT,
            Self::Connect { .. }
            | Self::Broker(_)
            | Self::Amqp(_)
            | Self::Nacked { .. }
            | Self::Unroutable { .. }
            | Self::ConsumerEnded(_)
            | Self::WriteOutput(_) => exit::BROKER,
        }
    }
}

/// How replies reach `--wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// An exclusive, server-named queue of this run's own.
    ExclusiveQueue,
    /// RabbitMQ direct reply-to: no queue at all, replies go straight to this
    /// connection (and are lost if it drops; a re-run gets them from the inbox).
    DirectReplyTo,
}

/// `--wait` and what goes with it.
#[derive(Debug, Clone)]
pub struct WaitOptions {
    /// Exclusive queue or direct reply-to.
    pub mode: ReplyMode,
    /// Once everything is published, give up on the missing replies after this
    /// long without one.
    pub timeout: Duration,
    /// Write replies in input order rather than as they arrive.
    pub ordered: bool,
    /// Write replies here instead of standard output.
    pub output: Option<PathBuf>,
    /// Skip the lines `output` already has a reply for, and append to it.
    pub resume: bool,
}

/// Progress on standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A progress bar when standard error is a terminal (and the replies do not go
    /// to the same terminal), a line of counts every few seconds otherwise.
    Auto,
    /// Nothing.
    Off,
}

/// What `txq submit` was asked to do.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    /// The JSON-lines input.
    pub source: Source,
    /// `--type`: every line is a bare payload of this job type.
    pub job_type: Option<String>,
    /// `--batch-id`: the batch identity derived message_ids are made from,
    /// instead of the file's absolute path (or, for standard input, its content).
    pub batch_id: Option<String>,
    /// `--batch [ID]`: tag every request as a member of one batch the workers
    /// track (`x-txq-batch-id`, `x-txq-batch-size`); `Some(None)` derives the id
    /// from the input's identity, so running the same input again names the same
    /// batch.
    pub batch: Option<Option<String>>,
    /// Unconfirmed publishes at most (at least 1).
    pub window: usize,
    /// Publish at most this fast.
    pub rate: Option<Rate>,
    /// Collect the replies.
    pub wait: Option<WaitOptions>,
    /// Progress on standard error.
    pub progress: ProgressMode,
}

/// What happened to the batch.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Requests in the input.
    pub total: usize,
    /// Not published: `--resume` found their reply in the output file.
    pub skipped: usize,
    /// Published and confirmed by the broker.
    pub published: usize,
    /// Whether replies were collected (`--wait`); the counts below are 0 if not.
    /// `ok`, `rejected` and `failed` count the skipped lines too, as the output
    /// file records them.
    pub waited: bool,
    /// Ended `ok`.
    pub ok: usize,
    /// Ended `rejected`.
    pub rejected: usize,
    /// Ended `failed` (dead-lettered).
    pub failed: usize,
    /// No reply within the timeout.
    pub timed_out: usize,
    /// Of the replies, those the worker answered from its inbox: an earlier run
    /// did the work, this one changed nothing.
    pub duplicate: usize,
    /// `--batch`: the batch the requests belong to (`txq batch status <id>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
}

impl Summary {
    /// The process exit code ([`exit`]).
    pub fn exit_code(&self) -> u8 {
        if self.waited && self.ok < self.published + self.skipped {
            exit::NOT_OK
        } else {
            exit::OK
        }
    }

    fn count(&mut self, status: Status) {
        match status {
            Status::Ok => self.ok += 1,
            Status::Rejected => self.rejected += 1,
            Status::Failed => self.failed += 1,
            Status::TimedOut => self.timed_out += 1,
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.waited {
            write!(
                f,
                "{} request(s): {} ok, {} rejected, {} failed, {} timed out",
                self.published + self.skipped,
                self.ok,
                self.rejected,
                self.failed,
                self.timed_out
            )?;
            if self.duplicate > 0 {
                write!(
                    f,
                    "; {} duplicate(s) answered from the inbox, not run again",
                    self.duplicate
                )?;
            }
        } else {
            write!(f, "{} request(s) published", self.published)?;
        }
        if self.skipped > 0 {
            write!(f, "; {} skipped, already answered", self.skipped)?;
        }
        if let Some(id) = &self.batch_id {
            write!(f, "; batch {id}")?;
        }
        Ok(())
    }
}

/// Publishes, and with `options.wait` collects the replies. Prints nothing but
/// progress and, with `--wait`, a warning on stderr when the request queue has
/// no consumer; the caller prints the returned summary.
pub async fn submit(config: &Config, options: &SubmitOptions) -> Result<Summary, SubmitError> {
    let batch = load_batch(options)?;
    let answered = match &options.wait {
        Some(WaitOptions {
            output: Some(path),
            resume: true,
            ..
        }) => answered_lines(path, &batch)?,
        _ => Answered::default(),
    };
    let mut todo = Todo::new(&batch, &answered);
    let membership = membership(options, &batch)?;
    let mut summary = Summary {
        total: batch.len(),
        skipped: batch.len() - todo.len,
        waited: options.wait.is_some(),
        batch_id: membership.as_ref().map(|(id, _)| id.clone()),
        ..Summary::default()
    };
    todo.headers = membership.map(|(_, headers)| headers);
    // A skipped line ended as the output file says: a rejected one is still not
    // ok, whichever run got its reply.
    for (_, status) in answered.iter() {
        summary.count(status);
    }
    drop(answered);
    // Opened before connecting: a bad path fails before anything is published.
    let out = options.wait.as_ref().map(open_output).transpose()?;
    if todo.len == 0 {
        return Ok(summary);
    }
    let connection = broker::connect(config.amqp_url.expose(), "txq submit")
        .await
        .map_err(|source| SubmitError::Connect {
            url: config.amqp_url.to_string(),
            source: Box::new(source),
        })?;
    let result = run(&connection, config, options, &todo, out, &mut summary).await;
    // Bounded: a broker that stopped answering must not keep the process alive.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        connection.close(200, "txq submit done".into()),
    )
    .await;
    result.map(|()| summary)
}

/// `--batch`: the batch id and the headers every request carries. The size is the
/// whole input's, skipped lines included: they are members answered earlier.
fn membership(
    options: &SubmitOptions,
    batch: &Batch,
) -> Result<Option<(String, FieldTable)>, SubmitError> {
    use crate::db::batch::MAX_BATCH_ID_BYTES;
    let Some(id) = &options.batch else {
        return Ok(None);
    };
    let id = id.clone().unwrap_or_else(|| {
        uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, batch.identity().as_bytes()).to_string()
    });
    if id.is_empty() || id.len() > MAX_BATCH_ID_BYTES {
        return Err(SubmitError::Usage(format!(
            "--batch: the id must be 1 to {MAX_BATCH_ID_BYTES} bytes"
        )));
    }
    let size = i64::try_from(batch.len()).unwrap_or(i64::MAX);
    let mut headers = FieldTable::default();
    headers.insert(
        crate::broker::headers::BATCH_ID.into(),
        crate::broker::long_string(&id),
    );
    headers.insert(
        crate::broker::headers::BATCH_SIZE.into(),
        lapin::types::AMQPValue::LongLongInt(size),
    );
    Ok(Some((id, headers)))
}

/// The requests of a batch this run publishes: all but those `--resume` skips.
struct Todo<'a> {
    batch: &'a Batch,
    /// By request index; empty when nothing is skipped.
    skip: Vec<bool>,
    len: usize,
    /// Headers every request carries (`--batch`).
    headers: Option<FieldTable>,
}

impl<'a> Todo<'a> {
    fn new(batch: &'a Batch, answered: &Answered) -> Self {
        let mut skip = Vec::new();
        if !answered.is_empty() {
            skip = vec![false; batch.len()];
            // Every answered line is a request: `answered_lines` checked its id.
            for i in answered.iter().filter_map(|(l, _)| batch.index_of_line(l)) {
                skip[i] = true;
            }
        }
        let skipped = skip.iter().filter(|s| **s).count();
        Self {
            batch,
            skip,
            len: batch.len() - skipped,
            headers: None,
        }
    }

    fn skipped(&self, index: usize) -> bool {
        self.skip.get(index).copied().unwrap_or(false)
    }

    /// The indices of the requests to publish, in input order.
    fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.batch.len()).filter(|&i| !self.skipped(i))
    }
}

async fn run(
    connection: &Connection,
    config: &Config,
    options: &SubmitOptions,
    todo: &Todo<'_>,
    out: Option<Box<dyn Write + Send>>,
    summary: &mut Summary,
) -> Result<(), SubmitError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // The worker's own declarations from the same config: a batch can be loaded
    // before any worker ran, and a queue declared with other arguments is an error
    // that names it rather than a silent mismatch.
    broker::declare(&channel, &Topology::from_config(config))
        .await
        .map_err(|e| match &e {
            // A soft error (PRECONDITION_FAILED, ACCESS_REFUSED) is the broker's
            // answer to this configuration; running again would get the same one.
            BrokerError::Declare { source, .. } if source.is_amqp_soft_error() => {
                SubmitError::Topology(Box::new(e))
            }
            BrokerError::InvalidName(_) => SubmitError::Topology(Box::new(e)),
            _ => e.into(),
        })?;
    if options.wait.is_some() {
        warn_if_no_consumer(&channel, &config.queue).await?;
    }
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    // The reply consumer exists before the first publish, so no reply can miss it.
    let (reply_to, consumer, reply_channel) = match &options.wait {
        None => (
            (!config.reply_queue.is_empty()).then(|| config.reply_queue.clone()),
            None,
            None,
        ),
        Some(w) if w.mode == ReplyMode::DirectReplyTo => {
            // Direct reply-to only delivers to a consumer on the publishing channel.
            let consumer = channel
                .basic_consume(
                    DIRECT_REPLY_TO.into(),
                    "".into(),
                    no_ack,
                    FieldTable::default(),
                )
                .await?;
            (Some(DIRECT_REPLY_TO.to_owned()), Some(consumer), None)
        }
        Some(_) => {
            let replies = connection.create_channel().await?;
            let queue = replies
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let consumer = replies
                .basic_consume(
                    queue.name().clone(),
                    "".into(),
                    no_ack,
                    FieldTable::default(),
                )
                .await?;
            (
                Some(queue.name().to_string()),
                Some(consumer),
                Some(replies),
            )
        }
    };
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(
        options.progress,
        todo.len,
        options.wait.is_some(),
        options.wait.as_ref().is_some_and(|w| w.output.is_none()),
        counters.clone(),
    );
    let (published_tx, published_rx) = watch::channel(None);
    let publishing = publish_all(
        &channel,
        &config.queue,
        todo,
        reply_to.as_deref(),
        options,
        &counters,
        published_tx,
    );
    let result = match (&options.wait, consumer, out) {
        (Some(wait), Some(consumer), Some(out)) => {
            let collecting = collect(consumer, todo, wait, out, &counters, published_rx);
            tokio::try_join!(publishing, collecting).map(|((), counts)| {
                summary.ok += counts.ok;
                summary.rejected += counts.rejected;
                summary.failed += counts.failed;
                summary.timed_out += counts.timed_out;
                summary.duplicate += counts.duplicate;
            })
        }
        _ => publishing.await,
    };
    summary.published = counters.published.load(Ordering::Relaxed);
    progress.finish().await;
    // Closed in order before the connection: a channel dropped while the connection
    // closes makes lapin log a spurious error.
    let limit = Duration::from_secs(5);
    if let Some(replies) = reply_channel {
        let _ = tokio::time::timeout(limit, replies.close(200, "done".into())).await;
    }
    let _ = tokio::time::timeout(limit, channel.close(200, "done".into())).await;
    result
}

/// Says at once on stderr when no worker consumes `queue`: `--wait` would
/// otherwise look stuck until its timeout. The requests are published all the
/// same (a worker started later answers them while this run still waits).
async fn warn_if_no_consumer(channel: &Channel, queue: &str) -> Result<(), SubmitError> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    if declared.consumer_count() == 0 {
        let _ = writeln!(
            io::stderr().lock(),
            "txq submit: warning: no consumer on `{queue}`: the replies will wait for a worker"
        );
    }
    Ok(())
}

/// Publishes every request with at most `window` unconfirmed, then reports when
/// the last confirm came through `published`.
async fn publish_all(
    channel: &Channel,
    queue: &str,
    todo: &Todo<'_>,
    reply_to: Option<&str>,
    options: &SubmitOptions,
    counters: &Counters,
    published: watch::Sender<Option<Instant>>,
) -> Result<(), SubmitError> {
    let routing_key =
        ShortString::try_new(queue).map_err(|_| BrokerError::InvalidName(queue.to_owned()))?;
    let reply_to = reply_to
        .map(|r| ShortString::try_new(r).map_err(|_| BrokerError::InvalidName(r.to_owned())))
        .transpose()?;
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let mut pacer = options.rate.map(Pacer::new);
    let mut pending = FuturesUnordered::new();
    let settle = |line: usize, confirmation: lapin::Result<lapin::Confirmation>| {
        let confirmation = confirmation?;
        if confirmation.is_nack() {
            return Err(SubmitError::Nacked { line });
        }
        if let Some(returned) = confirmation.take_message() {
            return Err(SubmitError::Unroutable {
                line,
                queue: queue.to_owned(),
                reason: returned.reply_text.to_string(),
            });
        }
        counters.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    for index in todo.indices() {
        if let Some(pacer) = &mut pacer {
            pacer.wait().await;
        }
        while pending.len() >= options.window.max(1) {
            if let Some((line, confirmation)) = pending.next().await {
                settle(line, confirmation)?;
            }
        }
        let request = todo.batch.get(index);
        let line = request.line;
        let mut props = properties(&request, reply_to.clone())?;
        if let Some(headers) = &todo.headers {
            props = props.with_headers(headers.clone());
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                routing_key.clone(),
                mandatory,
                request.body,
                props,
            )
            .await?;
        pending.push(async move { (line, confirm.await) });
    }
    while let Some((line, confirmation)) = pending.next().await {
        settle(line, confirmation)?;
    }
    published.send_replace(Some(Instant::now()));
    Ok(())
}

/// A request's properties per the message contract.
fn properties(
    request: &Request<'_>,
    reply_to: Option<ShortString>,
) -> Result<BasicProperties, SubmitError> {
    let short = |what: &str, v: &str| {
        ShortString::try_new(v).map_err(|_| {
            SubmitError::Input(vec![LineError {
                line: request.line,
                message: format!("`{what}` is longer than 255 bytes"),
            }])
        })
    };
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_app_id("txq-submit".into())
        .with_type(short("type", &request.job_type)?)
        .with_message_id(short("message_id", &request.message_id)?)
        .with_correlation_id(short("correlation_id", &request.correlation_id)?);
    if let Some(r) = reply_to {
        props = props.with_reply_to(r);
    }
    Ok(props)
}

/// Where each request's reply stands, a byte a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Not published: `--resume` skips it.
    Skipped,
    Waiting,
    /// Arrived, held back for `--ordered` until the lines before it are written.
    Held,
    Written,
}

/// Takes replies until every published request has one, or `wait.timeout` passed
/// without one after the last publish; writes a record for every request: timed-out
/// ones last, or with `--ordered` in their place in the input.
async fn collect(
    mut consumer: Consumer,
    todo: &Todo<'_>,
    wait: &WaitOptions,
    out: Box<dyn Write + Send>,
    counters: &Counters,
    mut published: watch::Receiver<Option<Instant>>,
) -> Result<Summary, SubmitError> {
    let batch = todo.batch;
    let mut slots: Vec<Slot> = (0..batch.len())
        .map(|i| {
            if todo.skipped(i) {
                Slot::Skipped
            } else {
                Slot::Waiting
            }
        })
        .collect();
    // The answers of `Slot::Held`.
    let mut held: HashMap<usize, Answer> = HashMap::new();
    let mut sink = Sink { out };
    let mut counts = Summary::default();
    // The first slot not yet written or skipped, for `--ordered`.
    let mut next = 0;
    let mut answered = 0;
    let mut last_reply: Option<Instant> = None;
    while answered < todo.len {
        // No deadline while publishing: a slow broker or a low --rate is not a
        // worker that does not answer.
        let deadline = published
            .borrow()
            .map(|at| last_reply.map_or(at, |r| r.max(at)) + wait.timeout);
        let delivery = tokio::select! {
            d = consumer.next() => d,
            _ = sleep_until_some(deadline) => break,
            changed = published.changed(), if deadline.is_none() => {
                if changed.is_err() {
                    // Publishing ended without finishing; its error is the story.
                    std::future::pending::<()>().await;
                }
                continue;
            }
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(SubmitError::ConsumerEnded("the broker cancelled it")),
        };
        let found = delivery
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|c| batch.find_correlation(c.as_str()))
            .filter(|(i, _)| slots[*i] != Slot::Skipped);
        let Some((i, request)) = found else {
            debug!(
                correlation_id = ?delivery.properties.correlation_id(),
                "a reply to no request of this batch; ignored"
            );
            continue;
        };
        if slots[i] != Slot::Waiting {
            // A redelivered request answered twice (the inbox sent its stored reply):
            // the first answer stands.
            debug!(line = request.line, "a second reply; ignored");
            continue;
        }
        let answer = Answer::from_delivery(&delivery);
        counts.count(answer.status);
        if answer.duplicate {
            counts.duplicate += 1;
        }
        if answer.status != Status::Ok {
            counters.not_ok.fetch_add(1, Ordering::Relaxed);
        }
        counters.answered.fetch_add(1, Ordering::Relaxed);
        answered += 1;
        last_reply = Some(Instant::now());
        if wait.ordered {
            slots[i] = Slot::Held;
            held.insert(i, answer);
            while let Some(slot) = slots.get(next).copied() {
                match slot {
                    Slot::Skipped => {}
                    Slot::Held => {
                        let answer = held.remove(&next);
                        sink.write(&batch.get(next), answer.as_ref())?;
                        slots[next] = Slot::Written;
                    }
                    Slot::Waiting | Slot::Written => break,
                }
                next += 1;
            }
        } else {
            sink.write(&request, Some(&answer))?;
            slots[i] = Slot::Written;
        }
    }
    for (i, slot) in slots.iter().enumerate().skip(next) {
        match slot {
            Slot::Waiting => {
                counts.count(Status::TimedOut);
                sink.write(&batch.get(i), None)?;
            }
            Slot::Held => sink.write(&batch.get(i), held.get(&i))?,
            Slot::Skipped | Slot::Written => {}
        }
    }
    sink.out.flush().map_err(SubmitError::WriteOutput)?;
    Ok(counts)
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_code_says_whether_every_request_ended_ok() {
        let all_ok = Summary {
            total: 3,
            published: 3,
            waited: true,
            ok: 3,
            duplicate: 3,
            ..Summary::default()
        };
        assert_eq!(all_ok.exit_code(), exit::OK, "duplicates of ok are ok");
        let one_late = Summary {
            ok: 2,
            timed_out: 1,
            ..all_ok.clone()
        };
        assert_eq!(one_late.exit_code(), exit::NOT_OK);
        let fire_and_forget = Summary {
            total: 3,
            published: 3,
            ..Summary::default()
        };
        assert_eq!(fire_and_forget.exit_code(), exit::OK);
        let resumed_after_a_rejection = Summary {
            total: 3,
            skipped: 3,
            waited: true,
            ok: 2,
            rejected: 1,
            ..Summary::default()
        };
        assert_eq!(
            resumed_after_a_rejection.exit_code(),
            exit::NOT_OK,
            "a skipped line still counts as it ended"
        );
        assert_eq!(
            resumed_after_a_rejection.to_string(),
            "3 request(s): 2 ok, 1 rejected, 0 failed, 0 timed out; 3 skipped, already answered"
        );
        assert_eq!(
            one_late.to_string(),
            "3 request(s): 2 ok, 0 rejected, 0 failed, 1 timed out; 3 duplicate(s) answered \
             from the inbox, not run again"
        );
    }
}
