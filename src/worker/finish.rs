//! The end of a job: carry out the [`Disposition`] that `decide` made of its outcome
//! (reply, delayed retry, dead-letter copy), wait for the broker's confirms, and only
//! then settle the delivery.
//!
//! The invariants this enforces are stated in ARCHITECTURE.md: "No ack before
//! commit and confirmed publishes" and "No single message stops consumption".

use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use lapin::types::AMQPValue;
use tracing::{debug, error, warn};

use super::Context;
use super::decide::{Disposition, Policy, decide};
use super::outcome::{FailureKind, Outcome, Status, failed_body};
use crate::broker::{
    Envelope, Pipelined, PublishError, PublishOutcome, ReplyHeaders, bounded, headers, long_string,
    reply_properties, with_headers,
};
use crate::db::batch::{self, BatchError, Completion, Count, Final};
use crate::events::{self, JobOutcome};

/// Decides what `outcome` calls for and carries it out: publishes, then acks, or
/// requeues (after a pause) if a publish was not confirmed. Says how the delivery
/// ended, for the metrics.
pub(crate) async fn finish(
    ctx: &Context,
    env: &Envelope,
    job_type: &str,
    delivery: &Delivery,
    outcome: Outcome,
    mut completion: Option<Completion>,
) -> JobOutcome {
    let policy = Policy {
        max_attempts: ctx.retry.max_attempts,
        topology: &ctx.topology,
    };
    let mut disposition = decide(outcome, env.attempt, &policy);
    match count_final(ctx, env, &disposition).await {
        Ok(Some(c)) => completion = Some(c),
        Ok(None) => {}
        Err(e) => {
            // Answering before the count commits could lose it: hand the request
            // back, after a pause, as after a failed publish.
            let delay = ctx.requeue_pause.next();
            events::publish_unconfirmed(&format!("counting the batch member: {e}"), delay);
            tokio::select! {
                _ = ctx.connection_lost.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            settle(ctx, delivery, false).await;
            return JobOutcome::Requeued;
        }
    }
    let mut result = carry_out(ctx, env, job_type, delivery, &disposition).await;
    if let Err(PublishError::Refused(reason)) = &result {
        // The broker refuses this message's reply or copy, and would again: decide
        // once more, as an attempt. What that publishes is never the same message.
        events::publish_refused(job_type, reason);
        let retry_copy = matches!(disposition, Disposition::RetryLater { .. });
        let refused = Outcome::Refused {
            reason: reason.clone(),
            retry_copy,
        };
        disposition = decide(refused, env.attempt, &policy);
        result = carry_out(ctx, env, job_type, delivery, &disposition).await;
    }
    match result {
        Ok(()) if disposition == Disposition::Requeue => {
            settle(ctx, delivery, false).await;
            JobOutcome::Requeued
        }
        Ok(()) => {
            ctx.requeue_pause.reset();
            if let Some(c) = completion {
                super::batches::publish_completion(ctx, &c, "live").await;
            }
            settle(ctx, delivery, true).await;
            disposition.label()
        }
        Err(e) => {
            // The request comes back at once, most likely to this worker: pause
            // first, longer while publishes keep failing, so nothing spins.
            let delay = ctx.requeue_pause.next();
            events::publish_unconfirmed(&e, delay);
            tokio::select! {
                _ = ctx.connection_lost.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            settle(ctx, delivery, false).await;
            JobOutcome::Requeued
        }
    }
}

/// Counts a batch member whose answer is final and not `ok` (an `ok` is counted
/// in the job's own transaction), in a transaction of its own, before the answer
/// goes out; the completion it wrote, if any. A member the batch refuses is only
/// logged: its answer stands.
async fn count_final(
    ctx: &Context,
    env: &Envelope,
    disposition: &Disposition,
) -> Result<Option<Completion>, sqlx::Error> {
    let answer = match disposition {
        Disposition::Reply {
            status: Status::Rejected,
            ..
        } => Final::Rejected,
        Disposition::DeadLetter { kind, .. } if *kind != FailureKind::InvalidBatch.as_str() => {
            Final::Failed
        }
        _ => return Ok(None),
    };
    let Some(member) = super::job::batch_member(env) else {
        return Ok(None);
    };
    match batch::count_alone(&ctx.db, member, answer, ctx.batch_destinations()).await {
        Ok(Count::Completed(c)) => Ok(Some(c)),
        Ok(Count::Added | Count::Unchanged) => Ok(None),
        Err(BatchError::Invalid(reason)) => {
            events::batch_member_refused(&member.tag.id, &reason);
            Ok(None)
        }
        // Only what may pass is worth the request coming back for; another error
        // would come back every time.
        Err(BatchError::Db(e)) if ctx.db.transient_reason(&e).is_some() => Err(e),
        Err(BatchError::Db(e)) => {
            events::batch_member_refused(&member.tag.id, &format!("database: {e}"));
            Ok(None)
        }
    }
}

/// Publishes what `disposition` needs; `Ok` when the delivery may be settled as
/// decided.
async fn carry_out(
    ctx: &Context,
    env: &Envelope,
    job_type: &str,
    delivery: &Delivery,
    disposition: &Disposition,
) -> Result<(), PublishError> {
    match disposition {
        Disposition::Reply {
            status,
            body,
            duplicate,
        } => {
            if *duplicate {
                events::duplicate(status.as_str());
            } else {
                debug!(status = status.as_str(), "job done");
            }
            reply(ctx, env, *status, body, *duplicate).await
        }
        Disposition::RetryLater {
            queue,
            delay,
            attempt,
            reason,
            message,
        } => {
            let props = with_headers(
                &copy_properties(&delivery.properties, env),
                vec![(
                    headers::ATTEMPT,
                    AMQPValue::LongLongInt(i64::from(*attempt)),
                )],
            );
            publish_routed(ctx, queue, &delivery.data, props).await?;
            if reason == "commit_unknown" {
                events::commit_unknown(message);
            } else {
                events::delayed_retry(job_type, reason, env.attempt, *delay, message);
            }
            Ok(())
        }
        Disposition::DeadLetter {
            kind,
            message,
            exhausted,
        } => fail(ctx, env, job_type, delivery, kind, message, *exhausted).await,
        Disposition::Requeue => {
            debug!("requeueing the delivery");
            Ok(())
        }
    }
}

/// Dead-letters the request with headers saying why, then replies `failed`.
///
/// The dead-letter copy is what settles a failure: once it is confirmed the request
/// is acked, whether or not the `failed` reply is confirmed too. Requeueing on a
/// lost reply would run the job again and dead-letter a second copy.
async fn fail(
    ctx: &Context,
    env: &Envelope,
    job_type: &str,
    delivery: &Delivery,
    kind: &str,
    message: &str,
    exhausted: bool,
) -> Result<(), PublishError> {
    let failed_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let why = vec![
        (headers::ERROR, long_string(&bounded(message))),
        (headers::ERROR_KIND, long_string(&bounded(kind))),
        (
            headers::ATTEMPTS,
            AMQPValue::LongLongInt(i64::from(env.attempt)),
        ),
        (headers::FAILED_AT, long_string(&failed_at)),
        (
            headers::ORIGINAL_QUEUE,
            long_string(&ctx.topology.request_queue),
        ),
    ];
    let dlq = &ctx.topology.dead_letter_queue;
    let props = with_headers(&copy_properties(&delivery.properties, env), why.clone());
    match publish_routed(ctx, dlq, &delivery.data, props).await {
        Err(PublishError::Refused(reason)) => {
            // Keep what the contract needs and drop the rest of what the producer set.
            events::publish_refused("dead-letter copy", &reason);
            let props = with_headers(&minimal_properties(env), why);
            publish_routed(ctx, dlq, &delivery.data, props).await?;
        }
        other => other?,
    }
    events::dead_lettered(job_type, kind, message, env.attempt, exhausted);
    let body = failed_body(kind, message, env.attempt);
    if let Err(e) = reply(ctx, env, Status::Failed, &body, false).await {
        warn!(error = %e, "the `failed` reply was not confirmed; the dead-letter copy stands");
    }
    Ok(())
}

/// Publishes the reply to `reply_to`, or the default reply queue, if any;
/// `duplicate` marks a stored reply from the inbox (`x-txq-duplicate`).
async fn reply(
    ctx: &Context,
    env: &Envelope,
    status: Status,
    body: &[u8],
    duplicate: bool,
) -> Result<(), PublishError> {
    let Some(to) = env
        .reply_to
        .as_deref()
        .or(ctx.topology.reply_queue.as_deref())
    else {
        return Ok(());
    };
    let props = reply_properties(
        env,
        ReplyHeaders {
            status: status.as_str(),
            attempts: env.attempt,
            duplicate,
        },
    );
    publish(ctx, to, body, props).await
}

/// Headers of a copy above this (estimated) size are dropped: with txq's own
/// headers added, the content header could exceed the broker's frame size, and
/// RabbitMQ would close the whole connection, over and over for the same request.
const MAX_COPIED_HEADERS: usize = 64 * 1024;

/// The request's properties for a copy txq keeps (retry, dead-letter): persistent,
/// and without what the broker would judge against txq rather than the producer:
/// the per-message `expiration`, which would let the copy expire unseen, and the
/// `user_id`, which RabbitMQ checks against the publishing user and so refuses from
/// txq. Both are kept in `x-txq-original-*` headers.
fn copy_properties(props: &lapin::BasicProperties, env: &Envelope) -> lapin::BasicProperties {
    let mut copy = props.clone().with_delivery_mode(2);
    if props
        .headers()
        .as_ref()
        .is_some_and(|h| headers_size(h) > MAX_COPIED_HEADERS)
    {
        let mut note = lapin::types::FieldTable::default();
        note.insert(
            "x-txq-headers-dropped".into(),
            long_string("the request's headers were too large to copy"),
        );
        copy = copy.with_headers(note);
    }
    // The copy's next run is a child of this one.
    if let Some(tp) = env.outgoing_traceparent() {
        copy = with_headers(&copy, vec![(headers::TRACEPARENT, long_string(&tp))]);
    }
    let mut originals = Vec::new();
    if let Some(exp) = props.expiration() {
        originals.push((headers::ORIGINAL_EXPIRATION, long_string(exp.as_str())));
    }
    if let Some(user) = props.user_id() {
        originals.push((headers::ORIGINAL_USER_ID, long_string(user.as_str())));
    }
    if originals.is_empty() {
        return copy;
    }
    // `BasicProperties` has no way to unset one field; rebuild without them.
    without_identity(&with_headers(&copy, originals))
}

/// A copy's properties when the broker refused the full copy: only what the
/// message contract reads, from values already checked.
fn minimal_properties(env: &Envelope) -> lapin::BasicProperties {
    let short = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| lapin::types::ShortString::try_new(s).ok())
    };
    let mut props = lapin::BasicProperties::default().with_delivery_mode(2);
    if let Some(v) = short(&env.content_type) {
        props = props.with_content_type(v);
    }
    if let Some(v) = short(&env.message_id) {
        props = props.with_message_id(v);
    }
    if let Some(v) = short(&env.correlation_id) {
        props = props.with_correlation_id(v);
    }
    if let Some(v) = short(&env.reply_to) {
        props = props.with_reply_to(v);
    }
    if let Some(v) = short(&env.job_type) {
        props = props.with_type(v);
    }
    match env.outgoing_traceparent() {
        Some(tp) => with_headers(&props, vec![(headers::TRACEPARENT, long_string(&tp))]),
        None => props,
    }
}

/// A generous estimate of a header table's encoded size.
fn headers_size(table: &lapin::types::FieldTable) -> usize {
    fn value_size(v: &AMQPValue) -> usize {
        match v {
            AMQPValue::LongString(s) => 5 + s.len(),
            AMQPValue::ShortString(s) => 2 + s.as_str().len(),
            AMQPValue::FieldTable(t) => 5 + headers_size(t),
            AMQPValue::FieldArray(a) => 5 + a.as_slice().iter().map(value_size).sum::<usize>(),
            AMQPValue::ByteArray(b) => 5 + b.len(),
            _ => 9,
        }
    }
    table
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_size(v))
        .sum()
}

/// `p` without `expiration` and `user_id`.
fn without_identity(p: &lapin::BasicProperties) -> lapin::BasicProperties {
    let mut out = lapin::BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

/// Publishes a copy txq is responsible for (retry, dead-letter): unroutable (its
/// queue was deleted) is a failure, so the request is requeued, not acked. In
/// the exact lane, so that the return is known to be this copy's.
async fn publish_routed(
    ctx: &Context,
    queue: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) -> Result<(), PublishError> {
    match ctx.publisher.publish(queue, body, props).await? {
        PublishOutcome::Confirmed => Ok(()),
        PublishOutcome::Returned(text) => Err(PublishError::Unroutable(format!("{queue}: {text}"))),
    }
}

/// Publishes a reply, pipelined with the other jobs' replies.
async fn publish(
    ctx: &Context,
    queue: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) -> Result<(), PublishError> {
    match ctx.publisher.publish_pipelined(queue, body, props).await? {
        Pipelined::Returned {
            routing_key,
            reason,
        } => {
            // A destination queue is gone (a requester that stopped waiting):
            // nobody can be told. The job's effects stand and its reply stays in
            // the inbox, so the request is still settled. Which reply it was is
            // the returned message's routing key: lapin may hand a return to any
            // publish in flight with it, all of them replies, all settled alike.
            events::reply_returned(&routing_key, &reason);
            Ok(())
        }
        Pipelined::Confirmed => Ok(()),
    }
}

/// Acks (through the session's coalescing window, `acks.rs`), or requeues. A
/// delivery whose channel died is left alone: the broker already requeued it, and
/// its tag means nothing on any other channel.
async fn settle(ctx: &Context, delivery: &Delivery, ack: bool) {
    let tag = delivery.delivery_tag;
    if !delivery.acker.usable() || ctx.connection_lost.is_cancelled() {
        warn!("the delivery's channel is gone; the broker redelivers it");
        ctx.acks.settled(tag);
        return;
    }
    if ack {
        ctx.acks.ack(tag, delivery.acker.clone());
        return;
    }
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    let result = tokio::select! {
        // A frame for a dead connection is never written: do not wait for it.
        _ = ctx.connection_lost.cancelled() => {
            warn!("the connection was lost before the delivery was settled; the broker redelivers it");
            return;
        }
        result = delivery.nack(requeue) => result,
    };
    match result {
        // Only once its nack frame is out may a multiple ack pass over this tag.
        Ok(_) => ctx.acks.settled(tag),
        // Left running in the window, so no multiple ack covers it: the channel
        // is failing, and the broker redelivers it.
        Err(e) => {
            error!(error = %e, "could not requeue the delivery; the broker will redeliver it")
        }
    }
}
