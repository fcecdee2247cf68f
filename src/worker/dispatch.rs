//! The consume loop and the end of each job: reply, then ack.
//!
//! **Invariant:** at most `concurrency` jobs run at once. A permit is taken *before*
//! the next delivery is pulled, and `basic.qos` bounds what the broker pushes, so the
//! backlog stays in RabbitMQ and memory stays flat however deep the queue is.
//!
//! **Invariant:** a request is acked only after its transaction committed (or its
//! failure was decided) and its reply was confirmed by the broker.

use std::sync::Arc;

use futures_util::StreamExt as _;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::outcome::Outcome;
use super::{Context, WorkerError, job};
use crate::broker::{BrokerError, Envelope, PublishOutcome, ReplyHeaders, reply_properties};

/// Consumes `queue` until `shutdown` fires or the consumer is lost, then waits for
/// the jobs in flight.
pub(crate) async fn consume(
    ctx: Arc<Context>,
    channel: &Channel,
    queue: &str,
    prefetch: u16,
    concurrency: usize,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("txq-{}", uuid::Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(queue, prefetch, concurrency, "consuming");

    let permits = Arc::new(Semaphore::new(concurrency));
    let tracker = TaskTracker::new();
    let result = loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => break Ok(()),
            },
        };
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                tracker.spawn(process(ctx.clone(), delivery, permit));
            }
            Some(Err(e)) => break Err(WorkerError::from(e)),
            None => break Err(BrokerError::ConsumerCancelled(queue.to_owned()).into()),
        }
    };
    info!(
        in_flight = tracker.len(),
        "stopping: no new deliveries; finishing jobs in flight"
    );
    if channel.status().connected() {
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    tracker.close();
    tracker.wait().await;
    result
}

async fn process(ctx: Arc<Context>, delivery: Delivery, permit: OwnedSemaphorePermit) {
    let env = Envelope::from_properties(&delivery.properties, ctx.default_type.as_deref());
    let span = info_span!(
        "job",
        job_type = env.job_type.as_deref().unwrap_or(""),
        message_id = env.message_id.as_deref().unwrap_or(""),
        correlation_id = env.correlation_id.as_deref().unwrap_or(""),
    );
    async {
        let outcome = job::execute(&ctx, &env, &delivery.data, delivery.redelivered).await;
        // The connection goes back to the pool before the reply is awaited.
        finish(&ctx, &env, &delivery, outcome).await;
    }
    .instrument(span)
    .await;
    drop(permit);
}

/// Publishes the reply (confirmed), then settles the delivery.
async fn finish(ctx: &Context, env: &Envelope, delivery: &Delivery, outcome: Outcome) {
    let (Some(status), Some(body)) = (outcome.status(), outcome.reply_body()) else {
        if let Outcome::Requeue { reason, attempts } = &outcome {
            warn!(error = %reason, attempts, "still failing after the in-process attempts; requeueing");
        }
        // No reply is due: hand the request back for a later attempt.
        settle(delivery, Settle::Requeue).await;
        return;
    };
    match &outcome {
        Outcome::Failed { kind, message, .. } => {
            warn!(kind = kind.as_str(), error = %message, "job failed");
        }
        Outcome::Rejected { code, .. } => debug!(code, "job rejected"),
        _ => debug!(attempts = outcome.attempts(), "job done"),
    }
    if let Some(to) = env.reply_to.as_deref().or(ctx.reply_queue.as_deref()) {
        let props = reply_properties(
            env,
            ReplyHeaders {
                status,
                attempts: outcome.attempts(),
            },
        );
        match ctx.publisher.publish(to, &body, props).await {
            Ok(PublishOutcome::Confirmed) => {}
            Ok(PublishOutcome::Returned(text)) => {
                // The requester's queue is gone: nobody is waiting. The job's
                // effects stand, so the request is still settled.
                warn!(reply_to = to, reply = %text, "reply could not be routed");
            }
            Err(e) => {
                // Not confirmed, so not settled: the broker redelivers the request.
                error!(error = %e, reply_to = to, "reply not confirmed; requeueing the request");
                settle(delivery, Settle::Requeue).await;
                return;
            }
        }
    }
    let how = match outcome {
        Outcome::Failed { .. } => Settle::Reject,
        _ => Settle::Ack,
    };
    settle(delivery, how).await;
}

enum Settle {
    Ack,
    /// Without requeue: a dead-letter exchange on the queue receives it.
    Reject,
    Requeue,
}

async fn settle(delivery: &Delivery, how: Settle) {
    let result = match how {
        Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
        Settle::Reject => delivery.reject(BasicRejectOptions { requeue: false }).await,
        Settle::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    if let Err(e) = result {
        // The channel is gone; the broker requeues everything unacked on it.
        error!(error = %e, "could not settle the delivery; the broker will redeliver it");
    }
}
