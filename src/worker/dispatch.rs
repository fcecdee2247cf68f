//! The consume loop: sessions on a broker connection, rebuilt with backoff when the
//! connection is lost, and the drain at shutdown.
//!
//! Carries out ARCHITECTURE.md's "at most `concurrency` jobs in flight" (in
//! `consume`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::OptionFuture;
use futures_util::{Stream, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, info, info_span, warn};

use super::acks::Acks;
use super::{Context, Shared, WorkerError, finish, job};
use crate::broker::{self, BrokerError, Envelope, Publisher, Trace};

/// Why a session on one connection ended.
enum SessionEnd {
    /// Shutdown was requested; the connection and the consumer's channel stay open
    /// for the drain (dropping the channel would close it, and the acks of jobs in
    /// flight could no longer be sent).
    Shutdown(Open),
    /// The connection or consumer was lost: reconnect. `consumed`: the session got
    /// as far as consuming (so the backoff starts over).
    Lost { error: WorkerError, consumed: bool },
    /// Reconnecting cannot help (a queue declared with other arguments…).
    Fatal(WorkerError),
}

/// The jobs of all sessions: they outlive the connection they came on.
struct Jobs {
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    /// Fires when the grace period is over: jobs still running roll back and requeue.
    hard_stop: CancellationToken,
}

/// Consumes until `shutdown`, reconnecting as needed; then drains.
pub(crate) async fn run(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let jobs = Jobs {
        permits: Arc::new(Semaphore::new(shared.concurrency)),
        tracker: TaskTracker::new(),
        hard_stop: CancellationToken::new(),
    };
    crate::events::started(shared.concurrency, shared.specs.keys().map(String::as_str));
    let (connection, result) = sessions(&shared, &jobs, &shutdown).await;
    // The grace period runs from the stop, whatever the broker did since.
    let stopped_at = tokio::time::Instant::now();
    let teardown_by = drain(&jobs, stopped_at + shared.shutdown_grace).await;
    if let Some(Open {
        conn,
        channel,
        acks,
    }) = connection
    {
        // Bounded: a broker in a resource alarm stops reading from the socket, a
        // half-open socket never answers, and the process must still exit. What is
        // not acked by then goes back to the queue when the socket closes.
        acks.finish(teardown_by).await;
        let close = async {
            let _ = channel.close(200, "txq worker stopping".into()).await;
            let _ = conn.close(200, "txq worker stopping".into()).await;
        };
        if answers(&conn) && tokio::time::timeout_at(teardown_by, close).await.is_err() {
            warn!("rabbitmq did not answer the close; leaving the connection");
        }
    }
    result
}

/// Runs sessions until shutdown or an end reconnecting cannot mend. Returns the
/// connection and channel to drain on and close, if the stop left them open.
async fn sessions(
    shared: &Arc<Shared>,
    jobs: &Jobs,
    shutdown: &CancellationToken,
) -> (Option<Open>, Result<(), WorkerError>) {
    let mut reconnects = Reconnects::default();
    loop {
        let prefetch = if reconnects.cautious {
            1
        } else {
            shared.prefetch
        };
        let end = session(shared, &mut reconnects.cursor, prefetch, jobs, shutdown).await;
        shared.health.set_consuming(false);
        let (error, consumed) = match end {
            SessionEnd::Shutdown(open) => return (Some(open), Ok(())),
            SessionEnd::Fatal(e) => return (None, Err(e)),
            SessionEnd::Lost { error, consumed } => (error, consumed),
        };
        if shutdown.is_cancelled() {
            return (None, Ok(()));
        }
        let delay = match reconnects.after_loss(shared, error, consumed) {
            Ok(delay) => delay,
            Err(e) => return (None, Err(e)),
        };
        tokio::select! {
            _ = shutdown.cancelled() => return (None, Ok(())),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// A connection, its consumer's channel and the channel's ack sender, left open
/// for the drain.
struct Open {
    conn: Arc<Connection>,
    channel: lapin::Channel,
    acks: AckTask,
}

/// The task that sends a session's coalesced acks.
struct AckTask {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AckTask {
    fn spawn(acks: &Arc<Acks>, health: &crate::health::Health) -> Self {
        let stop = CancellationToken::new();
        let health = health.clone();
        let task = tokio::spawn(
            acks.clone()
                .run(stop.clone(), move |acked| health.count_settled(acked)),
        );
        Self { stop, task }
    }

    /// Sends what is done, then ends; bounded, since a blocked broker does not read.
    async fn finish(self, by: tokio::time::Instant) {
        self.stop.cancel();
        if tokio::time::timeout_at(by, self.task).await.is_err() {
            warn!("the last acks were not sent in time; the broker redelivers those requests");
        }
    }
}

/// What the reconnects remember from one session to the next.
#[derive(Default)]
struct Reconnects {
    /// Which of the configured broker URLs to try first: the one that worked last,
    /// or after a loss the next one (fail-over in a cluster).
    cursor: usize,
    failures: u32,
    /// Whether a session ever consumed: until then, connecting is bounded.
    started: bool,
    startup_attempts: u32,
    /// The last session ended on a frame the client could not parse: the next one
    /// takes one delivery at a time until one arrives whole, so the message that
    /// broke it comes back alone. With the full prefetch, the messages sent behind
    /// it would be handed back with it each time, and a quorum queue would
    /// dead-letter them too once their delivery count reached the limit.
    cautious: bool,
}

impl Reconnects {
    /// After a lost session: how long to wait before the next, or the error that
    /// ends the worker.
    fn after_loss(
        &mut self,
        shared: &Shared,
        e: WorkerError,
        consumed: bool,
    ) -> Result<Duration, WorkerError> {
        self.started |= consumed;
        if !self.started {
            // Never connected yet: a refused login will not change, and a
            // broker that never answers is given a bounded time.
            if e.is_refused_login() {
                return Err(e);
            }
            self.startup_attempts += 1;
            if self.startup_attempts >= shared.connect_attempts {
                let last = e.to_string();
                return Err(BrokerError::Unreachable {
                    attempts: self.startup_attempts,
                    last,
                }
                .into());
            }
        }
        self.cursor = self.cursor.wrapping_add(1);
        // A frame the AMQP client cannot parse ends the connection, and the
        // same message comes back first: never reset the backoff for it.
        let unparsable = e.is_unparsable_frame();
        self.cautious = unparsable;
        if unparsable {
            crate::events::unparsable_frame(&e, shared.topology.queue_type);
        }
        self.failures = if consumed && !unparsable {
            1
        } else {
            self.failures.saturating_add(1)
        };
        let delay = reconnect_delay(self.failures);
        if self.started {
            crate::events::reconnecting(&e, delay);
            shared.health.count_reconnect();
        } else {
            crate::events::connecting(&e, self.startup_attempts, shared.connect_attempts, delay);
        }
        Ok(delay)
    }
}

/// Whether the broker can answer on `conn`: a connection RabbitMQ blocked (a
/// resource alarm) is not read from until the alarm clears.
fn answers(conn: &Connection) -> bool {
    !conn.status().blocked()
}

/// How long stopping may wait for the broker beyond `shutdown_grace`: the
/// consumer's cancel, then (shared) the settles of jobs rolled back after the grace
/// period and the close. A stop so ends within `shutdown_grace` plus twice this,
/// whatever the broker does.
const TEARDOWN_LIMIT: Duration = Duration::from_secs(3);

/// `step`, unless shutdown comes first: then `None`. Connecting, declaring and
/// consuming may each wait for a broker that does not answer, and a stop must not
/// wait for them.
async fn unless_stopped<T>(
    shutdown: &CancellationToken,
    step: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        out = step => Some(out),
    }
}

/// One connection's life: connect, declare, consume until shutdown or loss.
async fn session(
    shared: &Arc<Shared>,
    cursor: &mut usize,
    prefetch: u16,
    jobs: &Jobs,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let conn = match connect(shared, cursor, shutdown).await {
        Ok(conn) => conn,
        Err(end) => return end,
    };
    let setup = setup(&conn, shared, prefetch);
    let (channel, mut tag, mut consumer) = match unless_stopped(shutdown, setup).await {
        None => return stopped(),
        Some(Err(end)) => return end,
        Some(Ok(set)) => set,
    };
    let mut events = Box::pin(conn.events_listener());
    // Confirms are pipelined, so one channel carries all the replies (and the broker
    // batches its confirms; BENCHMARKS.md). Jobs of this
    // session publish on this connection only; after a loss, theirs fail and the
    // broker redelivers their requests.
    let connection_lost = CancellationToken::new();
    let acks = Acks::new();
    let ack_task = AckTask::spawn(&acks, &shared.health);
    let ctx = Arc::new(Context {
        shared: shared.clone(),
        publisher: Publisher::new(conn.clone(), 1, connection_lost.clone()),
        acks,
        connection_lost: connection_lost.clone(),
    });
    let sweeper = tokio::spawn(super::batches::sweep(ctx.clone()));
    shared.health.set_consuming(true);
    info!(
        queue = shared.topology.request_queue.as_str(),
        prefetch,
        concurrency = shared.concurrency,
        "consuming"
    );
    let mut consuming = Consuming {
        channel: &channel,
        tag: &mut tag,
        consumer: &mut consumer,
        full_prefetch: (prefetch != shared.prefetch).then_some(shared.prefetch),
    };
    let end = consume(&ctx, &mut consuming, &mut events, jobs, shutdown).await;
    shared.health.set_consuming(false);
    sweeper.abort();
    match end {
        None => {
            stop_consuming(&conn, &channel, &tag, jobs.tracker.len()).await;
            SessionEnd::Shutdown(Open {
                conn,
                channel,
                acks: ack_task,
            })
        }
        Some(error) => {
            // Jobs of this session still waiting for a confirm give up now; the
            // broker has requeued their requests already, acked-to-be or not.
            connection_lost.cancel();
            ack_task.task.abort();
            ctx.publisher.close().await;
            SessionEnd::Lost {
                error,
                consumed: true,
            }
        }
    }
}

/// A session that ends before consuming.
fn lost(e: WorkerError) -> SessionEnd {
    SessionEnd::Lost {
        error: e,
        consumed: false,
    }
}

/// Stopping before consuming: nothing is in flight, nothing to drain.
fn stopped() -> SessionEnd {
    lost(BrokerError::Stopped.into())
}

/// Connects to one of the broker URLs, trying the one at `cursor` first; `cursor`
/// becomes the one that answered.
async fn connect(
    shared: &Shared,
    cursor: &mut usize,
    shutdown: &CancellationToken,
) -> Result<Arc<Connection>, SessionEnd> {
    let connect = broker::connect_any(&shared.amqp_urls, *cursor, &shared.connection_name);
    match unless_stopped(shutdown, connect).await {
        None => Err(stopped()),
        Some(Ok((c, index))) => {
            *cursor = index;
            Ok(Arc::new(c))
        }
        Some(Err(e)) => Err(lost(e.into())),
    }
}

/// Opens the consumer's channel, declares the topology, sets the prefetch and
/// starts consuming; returns the channel, the consumer tag and the consumer.
async fn setup(
    conn: &Connection,
    shared: &Shared,
    prefetch: u16,
) -> Result<(lapin::Channel, String, Consumer), SessionEnd> {
    let channel = conn.create_channel().await.map_err(|e| lost(e.into()))?;
    if let Err(e) = broker::declare(&channel, &shared.topology).await {
        // The broker refusing a declaration is a configuration problem.
        return Err(match &e {
            BrokerError::Declare { source, .. } if source.is_amqp_soft_error() => {
                SessionEnd::Fatal(e.into())
            }
            BrokerError::InvalidName(_) => SessionEnd::Fatal(e.into()),
            _ => lost(e.into()),
        });
    }
    let (tag, consumer) = start_consumer(&channel, shared, prefetch)
        .await
        .map_err(|e| lost(e.into()))?;
    Ok((channel, tag, consumer))
}

/// Sets the prefetch and starts a consumer on the request queue.
async fn start_consumer(
    channel: &lapin::Channel,
    shared: &Shared,
    prefetch: u16,
) -> Result<(String, Consumer), lapin::Error> {
    // Per consumer (not global): it holds for the consumers started after it.
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("txq-{}", uuid::Uuid::new_v4());
    let consumer = channel
        .basic_consume(
            shared.topology.request_queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((tag, consumer))
}

/// The session's consumer, which a cautious session replaces once.
struct Consuming<'a> {
    channel: &'a lapin::Channel,
    tag: &'a mut String,
    consumer: &'a mut Consumer,
    /// Set while the session takes one delivery at a time: the prefetch to go
    /// back to once a delivery arrived whole.
    full_prefetch: Option<u16>,
}

impl Consuming<'_> {
    /// A delivery arrived whole, so the message that broke the last session is
    /// gone: go back to the full prefetch. A consumer keeps the prefetch it
    /// started with, so this one is cancelled and another started; the delivery
    /// in hand stays the channel's, and is acked there as usual.
    async fn arrived_whole(&mut self, ctx: &Context) -> Result<(), lapin::Error> {
        let Some(prefetch) = self.full_prefetch.take() else {
            return Ok(());
        };
        self.channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await?;
        let (tag, consumer) = start_consumer(self.channel, &ctx.shared, prefetch).await?;
        *self.tag = tag;
        *self.consumer = consumer;
        info!(
            prefetch,
            "a delivery arrived whole; back to the full prefetch"
        );
        Ok(())
    }
}

/// Takes a permit, then pulls the next delivery and spawns its job, until
/// shutdown (`None`) or the connection or consumer is lost.
async fn consume(
    ctx: &Arc<Context>,
    consuming: &mut Consuming<'_>,
    events: &mut (impl Stream<Item = lapin::Event> + Unpin),
    jobs: &Jobs,
    shutdown: &CancellationToken,
) -> Option<WorkerError> {
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            // While every permit is taken nobody reads the consumer, so a lost
            // connection would go unnoticed until a job ends: watch it here.
            Some(event) = events.next() => match event {
                lapin::Event::Error(e) => return Some(WorkerError::from(e)),
                _ => continue,
            },
            permit = jobs.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => return None,
            },
        };
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            next = consuming.consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                // Before its job runs: the ack window must know every tag in order.
                ctx.acks.issued(delivery.delivery_tag);
                let job = process(ctx.clone(), delivery, permit, jobs.hard_stop.clone());
                jobs.tracker.spawn(job);
                if let Err(e) = consuming.arrived_whole(ctx).await {
                    return Some(e.into());
                }
            }
            Some(Err(e)) => return Some(WorkerError::from(e)),
            None => {
                let queue = ctx.topology.request_queue.clone();
                return Some(BrokerError::ConsumerCancelled(queue).into());
            }
        }
    }
}

/// Cancels the consumer so no new deliveries come while the jobs in flight finish.
async fn stop_consuming(conn: &Connection, channel: &lapin::Channel, tag: &str, in_flight: usize) {
    info!(
        in_flight,
        "stopping: no new deliveries; finishing jobs in flight"
    );
    if answers(conn) {
        let cancel = channel.basic_cancel(tag.into(), BasicCancelOptions::default());
        if tokio::time::timeout(TEARDOWN_LIMIT, cancel).await.is_err() {
            warn!(limit = ?TEARDOWN_LIMIT, "rabbitmq did not confirm the consumer's cancel; draining anyway");
        }
    }
}

/// Waits for the jobs in flight until `grace_ends`; then makes the rest roll back
/// and requeue, and waits for that a little. Returns when the close must be done by.
async fn drain(jobs: &Jobs, grace_ends: tokio::time::Instant) -> tokio::time::Instant {
    let Jobs {
        tracker, hard_stop, ..
    } = jobs;
    tracker.close();
    if tokio::time::timeout_at(grace_ends, tracker.wait())
        .await
        .is_ok()
    {
        return tokio::time::Instant::now() + TEARDOWN_LIMIT;
    }
    warn!(
        in_flight = tracker.len(),
        "grace period over; rolling back and requeueing the rest"
    );
    hard_stop.cancel();
    // Each rolled-back job hands its delivery back; a broker that does not read
    // its socket (a resource alarm) must not hold the stop. Unsettled deliveries
    // return to the queue when the connection closes.
    let teardown_by = tokio::time::Instant::now() + TEARDOWN_LIMIT;
    if tokio::time::timeout_at(teardown_by, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            in_flight = tracker.len(),
            "jobs did not hand their deliveries back in time; closing"
        );
    }
    teardown_by
}

/// Exponential backoff with jitter for reconnects: about 0.5s, 1s, 2s… up to 30s.
fn reconnect_delay(failures: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1 << failures.saturating_sub(1).min(6));
    let ceiling = base.min(Duration::from_secs(30));
    ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

async fn process(
    ctx: Arc<Context>,
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
    hard_stop: CancellationToken,
) {
    let started = std::time::Instant::now();
    crate::events::job_started();
    // Uncounted when this task ends, however it ends.
    let _in_flight = ctx.health.job_started();
    let mut env =
        Envelope::from_properties(&delivery.properties, ctx.shared.default_type.as_deref());
    #[cfg_attr(not(feature = "otlp"), allow(unused_mut))]
    let mut trace = Trace::continue_from(env.traceparent.as_deref());
    let span = info_span!(
        "job",
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_id = trace.parent_id.as_deref().unwrap_or(""),
        job_type = env.job_type.as_deref().unwrap_or(""),
        message_id = env.message_id.as_deref().unwrap_or(""),
        correlation_id = env.correlation_id.as_deref().unwrap_or(""),
        attempt = env.attempt,
    );
    #[cfg(feature = "otlp")]
    crate::telemetry::continue_trace(&span, &mut trace);
    span.record("trace_id", trace.trace_id.as_str());
    span.record("span_id", trace.span_id.as_str());
    env.trace = Some(trace);
    let label = super::type_label(&ctx.shared, &env);
    // Pinned where it is: a job's futures nest deep, and moved whole (into the
    // select, the span) its tens of KiB would be copied (BENCHMARKS.md, round 7).
    let mut work = std::pin::pin!(OptionFuture::from(Some(async {
        let (outcome, completion) =
            job::execute(&ctx, &env, &delivery.data, delivery.redelivered).await;
        // The connection went back to the pool before the publishes are awaited.
        finish::finish(&ctx, &env, label, &delivery, outcome, completion).await
    })));
    let settled = async {
        tokio::select! {
            _ = hard_stop.cancelled() => {
                // Dropping the job drops its transaction, which rolls it back,
                // before its delivery goes back; if its reply was already out,
                // the redelivery gets the inbox's copy.
                work.set(None.into());
                let abandoned = super::outcome::Outcome::Abandoned;
                finish::finish(&ctx, &env, label, &delivery, abandoned, None).await
            }
            Some(settled) = &mut work => settled,
        }
    }
    .instrument(span.clone())
    .await;
    span.in_scope(|| crate::events::job_settled(label, settled, started.elapsed()));
    ctx.health.count_outcome(settled);
    drop(permit);
}
