//! A batch's completion after COMMIT: published by the worker whose transaction
//! completed it, or by a sweep when that worker failed to (`db::batch` has the
//! protocol).

use std::sync::Arc;
use std::time::Duration;

use lapin::types::AMQPValue;

use super::Context;
use crate::broker::{PublishOutcome, headers, long_string};
use crate::db::batch::{self, Completion};
use crate::events;
use crate::{JobError, JobMeta};

/// How often each session sweeps the outbox for completions left unpublished,
/// and reads how many batches are open.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// How far back a sweep looks for batch counters changed and maybe not settled.
const SETTLE_WINDOW_MS: i64 = 3_600_000;

/// How long a sweep holds a completion it took before another may take it.
const LEASE_MS: i64 = 60_000;

/// Runs the batch callback, if the worker has one, then publishes the completion,
/// confirmed, to its destination, and marks it published. On failure it stays in
/// the outbox, and a sweep takes it up again.
pub(crate) async fn publish_completion(ctx: &Context, c: &Completion, route: &'static str) {
    if let Some(took) = c.took {
        events::batch_completed(&c.batch_id, c.revision, took);
    }
    if let Err(e) = run_callback(ctx, c).await {
        return events::batch_callback(&c.batch_id, c.revision, "failed", Some(&e));
    }
    if let Some(to) = &c.destination {
        let mut table = lapin::types::FieldTable::default();
        table.insert(headers::BATCH_ID.into(), long_string(&c.batch_id));
        table.insert(
            headers::BATCH_REVISION.into(),
            AMQPValue::LongLongInt(c.revision),
        );
        let mut props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type("txq.batch.completed".into())
            .with_delivery_mode(2)
            .with_headers(table);
        // Both fit a short string: batch ids are at most 200 bytes.
        if let Ok(id) = lapin::types::ShortString::try_new(c.message_id()) {
            props = props.with_message_id(id);
        }
        if let Ok(id) = lapin::types::ShortString::try_new(c.batch_id.as_str()) {
            props = props.with_correlation_id(id);
        }
        match ctx.publisher.publish(to, &c.body, props).await {
            Ok(PublishOutcome::Confirmed) => {}
            Ok(PublishOutcome::Returned(text)) => events::reply_returned(to, &text),
            Err(e) => return events::batch_completion_deferred(&c.batch_id, &e),
        }
    }
    match batch::mark_published(&ctx.db, &c.batch_id, c.revision).await {
        Ok(()) => events::batch_completion_published(&c.batch_id, c.revision, route),
        Err(e) => events::batch_completion_deferred(&c.batch_id, &e),
    }
}

/// Why the batch callback must run again.
#[derive(Debug, thiserror::Error)]
enum CallbackError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Job(JobError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Runs the callback for one completion revision, once: its transaction also
/// marks the outbox row (`batch::claim_callback`), so a second run (the sweep
/// after a lost confirm, another worker) finds it done. `Ok`: committed, done
/// before, refused for good, or there is no callback.
async fn run_callback(ctx: &Context, c: &Completion) -> Result<(), CallbackError> {
    let Some(callback) = ctx.registry.batch_callback() else {
        return Ok(());
    };
    let meta = JobMeta {
        job_type: batch::ON_BATCH_COMPLETE.into(),
        message_id: Some(c.message_id()),
        correlation_id: Some(c.batch_id.clone()),
        attempt: 1,
        delivery_attempt: 1,
        redelivered: false,
        traceparent: None,
    };
    let refused = |e: &dyn std::fmt::Display| {
        events::batch_callback(&c.batch_id, c.revision, "rejected", Some(e));
    };
    let payload = match callback.handler.decode(&c.body) {
        Ok(p) => p,
        // The body is txq's own: a handler whose payload type cannot read it
        // will not read it later either.
        Err(e) => {
            refused(&e);
            return mark_refused(ctx, c, callback.isolation).await;
        }
    };
    if let Err(e) = callback.handler.check(&payload) {
        refused(&e);
        return mark_refused(ctx, c, callback.isolation).await;
    }
    let mut tx = ctx.db.begin(callback.isolation).await?;
    let run = async {
        if !batch::claim_callback(&mut tx, &c.batch_id, c.revision).await? {
            return Ok(false);
        }
        callback
            .handler
            .call(&mut tx, payload, &meta)
            .await
            .map(|_| true)
            .map_err(CallbackError::Job)
    };
    let limit = ctx.batch_callback_timeout;
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(true)) => {
            tx.commit().await?;
            events::batch_callback(&c.batch_id, c.revision, "ok", None);
            Ok(())
        }
        // Done before: nothing to commit.
        Ok(Ok(false)) => Ok(()),
        Ok(Err(CallbackError::Job(e @ JobError::Rejected { .. }))) => {
            // At once, not lazily: the mark below waits for this row's lock.
            tx.rollback().await?;
            refused(&e);
            mark_refused(ctx, c, callback.isolation).await
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(CallbackError::Timeout(limit)),
    }
}

/// A callback refused for good is not run again: its turn is marked taken on its own.
async fn mark_refused(
    ctx: &Context,
    c: &Completion,
    isolation: Option<crate::db::Isolation>,
) -> Result<(), CallbackError> {
    let mut tx = ctx.db.begin(isolation).await?;
    batch::claim_callback(&mut tx, &c.batch_id, c.revision).await?;
    tx.commit().await?;
    Ok(())
}

/// Publishes the completions due in the outbox, until the session ends.
pub(crate) async fn sweep(ctx: Arc<Context>) {
    loop {
        tokio::select! {
            _ = ctx.connection_lost.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        match batch::open_count(&ctx.db).await {
            Ok(n) => events::batches_open(n),
            Err(e) => tracing::debug!(error = %e, "could not count the open batches"),
        }
        // Batches whose last change was counted by a worker that died before it
        // could settle them.
        let since = crate::db::now_ms() - SETTLE_WINDOW_MS;
        match batch::unsettled(&ctx.db, since, 1000).await {
            Ok(ids) => {
                for id in ids {
                    match batch::settle(&ctx.db, &id, ctx.batch_destinations()).await {
                        Ok(Some(c)) => publish_completion(&ctx, &c, "sweep").await,
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(batch_id = id, error = %e, "could not settle the batch; next sweep");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the batch counters; next sweep"),
        }
        let due = batch::due_completions(&ctx.db, crate::db::now_ms(), LEASE_MS, 100).await;
        match due {
            Ok(due) => {
                for c in due {
                    publish_completion(&ctx, &c, "sweep").await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the batch outbox; next sweep"),
        }
    }
}
