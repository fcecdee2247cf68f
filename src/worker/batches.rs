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

/// How often each session sweeps the outbox for completions left unpublished,
/// and reads how many batches are open.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// How long a sweep holds a completion it took before another may take it.
const LEASE_MS: i64 = 60_000;

/// Publishes a batch completion, confirmed, to its destination, and marks it
/// published. On failure it stays in the outbox, and a sweep publishes it.
pub(crate) async fn publish_completion(ctx: &Context, c: &Completion, route: &'static str) {
    if let Some(took) = c.took {
        events::batch_completed(&c.batch_id, c.revision, took);
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
