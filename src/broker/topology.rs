//! Queue declarations. Declaring is idempotent, so every worker declares what it
//! uses at start-up; a queue that exists with other arguments is an error that names
//! it.
//!
//! Delayed retries live in the broker, never in worker memory: each delay of the
//! schedule is a queue `<queue>.retry.<delay>` whose messages expire (per-queue TTL)
//! and are dead-lettered back into the request queue through the default exchange.

use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::BrokerError;
use crate::config::{Config, QueueType};

/// The queues a worker uses.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Requests are consumed from here.
    pub request_queue: String,
    /// `classic` or `quorum`, for the request, retry and dead-letter queues.
    pub queue_type: QueueType,
    /// Replies to requests without `reply_to` go here; `None` for no reply.
    pub reply_queue: Option<String>,
    /// Batch completions go here when set (else to the batch's `reply_to`).
    pub batch_completion_queue: Option<String>,
    /// Requests that failed for good.
    pub dead_letter_queue: String,
    /// Delay before the 2nd, 3rd… delivery; the last one repeats.
    pub retry_delays: Vec<Duration>,
    /// Quorum queues: deliveries before the broker dead-letters a request itself.
    pub delivery_limit: u32,
}

impl Topology {
    /// The topology a config describes.
    pub fn from_config(config: &Config) -> Self {
        Self {
            request_queue: config.queue.clone(),
            queue_type: config.queue_type,
            reply_queue: (!config.reply_queue.is_empty()).then(|| config.reply_queue.clone()),
            batch_completion_queue: (!config.batch_completion_queue.is_empty())
                .then(|| config.batch_completion_queue.clone()),
            dead_letter_queue: config.dead_letter_queue(),
            retry_delays: config.retry.delays.clone(),
            delivery_limit: config.delivery_limit,
        }
    }

    /// The retry queue a request goes to after its `attempt`-th delivery failed
    /// transiently, and its delay.
    pub fn retry_queue(&self, attempt: u32) -> Option<(String, Duration)> {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        let delay = self
            .retry_delays
            .get(index)
            .or(self.retry_delays.last())
            .copied()?;
        Some((retry_queue_name(&self.request_queue, delay), delay))
    }
}

/// `txq.requests.retry.1m30s`
pub fn retry_queue_name(queue: &str, delay: Duration) -> String {
    let delay = humantime::format_duration(delay)
        .to_string()
        .replace(' ', "");
    format!("{queue}.retry.{delay}")
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The arguments of each queue txq declares, by name (ARCHITECTURE.md, "No single
/// message stops consumption"). On quorum queues:
/// - the request queue has an explicit `x-delivery-limit` and dead-letters into the
///   DLQ, so a request no worker can settle (one the AMQP client cannot even parse)
///   leaves it after that many deliveries instead of looping, or being dropped as
///   RabbitMQ 4.x does past its default limit when no target is set;
/// - dead-lettering is `at-least-once` (with `x-overflow = reject-publish`, which
///   that strategy requires), so neither that hop nor the hop back from a retry
///   queue can lose a message.
pub fn queue_arguments(topology: &Topology) -> Vec<(String, FieldTable)> {
    let quorum = topology.queue_type == QueueType::Quorum;
    let typed = || {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text(topology.queue_type.as_str()));
        args
    };
    let dead_letter_to = |args: &mut FieldTable, queue: &str| {
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text(queue));
        if quorum {
            args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
            args.insert("x-overflow".into(), text("reject-publish"));
        }
    };
    let mut request = typed();
    if quorum {
        let limit = i64::from(topology.delivery_limit);
        request.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        dead_letter_to(&mut request, &topology.dead_letter_queue);
    }
    // The DLQ has no `x-delivery-limit`, and needs none: `txq dlq` never
    // requeues on a quorum queue (it copies what it keeps back to the tail), so
    // no limit, RabbitMQ 4's default of 20 or a policy's, acts on its reads. An
    // argument added now would make every existing DLQ fail this declare
    // (inequivalent arg), and 3.10 takes -1 as "drop at the first requeue".
    let mut queues = vec![
        (topology.request_queue.clone(), request),
        (topology.dead_letter_queue.clone(), typed()),
    ];
    let mut delays = topology.retry_delays.clone();
    delays.sort_unstable();
    delays.dedup();
    for delay in delays {
        let mut args = typed();
        let ttl = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl));
        dead_letter_to(&mut args, &topology.request_queue);
        queues.push((retry_queue_name(&topology.request_queue, delay), args));
    }
    queues
}

/// Declares the request queue, the dead-letter queue and the retry queues (durable,
/// of the configured type, with [`queue_arguments`]) and the default reply queue
/// (durable, classic).
pub async fn declare(channel: &Channel, topology: &Topology) -> Result<(), BrokerError> {
    for (queue, args) in queue_arguments(topology) {
        declare_one(channel, &queue, args).await?;
    }
    for queue in [&topology.reply_queue, &topology.batch_completion_queue]
        .into_iter()
        .flatten()
    {
        declare_one(channel, queue, FieldTable::default()).await?;
    }
    Ok(())
}

async fn declare_one(channel: &Channel, queue: &str, args: FieldTable) -> Result<(), BrokerError> {
    let name =
        ShortString::try_new(queue).map_err(|_| BrokerError::InvalidName(queue.to_owned()))?;
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name, options, args)
        .await
        .map_err(|source| BrokerError::Declare {
            queue: queue.to_owned(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_queues_follow_the_schedule_and_repeat_the_last_delay() {
        let t = Topology {
            request_queue: "q".into(),
            queue_type: QueueType::Classic,
            reply_queue: None,
            batch_completion_queue: None,
            dead_letter_queue: "q.dlq".into(),
            retry_delays: vec![Duration::from_secs(1), Duration::from_secs(90)],
            delivery_limit: 20,
        };
        assert_eq!(
            t.retry_queue(1),
            Some(("q.retry.1s".into(), Duration::from_secs(1)))
        );
        assert_eq!(
            t.retry_queue(2),
            Some(("q.retry.1m30s".into(), Duration::from_secs(90)))
        );
        assert_eq!(
            t.retry_queue(9),
            Some(("q.retry.1m30s".into(), Duration::from_secs(90)))
        );
        let none = Topology {
            retry_delays: vec![],
            ..t
        };
        assert_eq!(none.retry_queue(1), None);
    }

    #[test]
    fn quorum_queues_dead_letter_at_least_once_and_limit_deliveries() {
        let t = Topology {
            request_queue: "q".into(),
            queue_type: QueueType::Quorum,
            reply_queue: None,
            batch_completion_queue: None,
            dead_letter_queue: "q.dlq".into(),
            retry_delays: vec![Duration::from_secs(1)],
            delivery_limit: 7,
        };
        let queues = queue_arguments(&t);
        let arg = |q: usize, k: &str| queues[q].1.inner().get(k).cloned();
        assert_eq!(queues[0].0, "q");
        assert_eq!(arg(0, "x-delivery-limit"), Some(AMQPValue::LongLongInt(7)));
        assert_eq!(arg(0, "x-dead-letter-routing-key"), Some(text("q.dlq")));
        assert_eq!(
            arg(0, "x-dead-letter-strategy"),
            Some(text("at-least-once"))
        );
        assert_eq!(arg(0, "x-overflow"), Some(text("reject-publish")));
        assert_eq!(queues[2].0, "q.retry.1s");
        assert_eq!(arg(2, "x-dead-letter-routing-key"), Some(text("q")));
        assert_eq!(
            arg(2, "x-dead-letter-strategy"),
            Some(text("at-least-once"))
        );
        // See queue_arguments: txq dlq's reads count no delivery, and the
        // declare must match the DLQs that already exist.
        assert_eq!(queues[1].0, "q.dlq");
        assert_eq!(queues[1].1.inner().len(), 1, "x-queue-type only");
        assert_eq!(
            arg(1, "x-delivery-limit"),
            None,
            "the DLQ never drops what it holds"
        );
        let classic = Topology {
            queue_type: QueueType::Classic,
            ..t
        };
        let queues = queue_arguments(&classic);
        assert_eq!(queues[0].1.inner().get("x-delivery-limit"), None);
        assert_eq!(queues[2].1.inner().get("x-dead-letter-strategy"), None);
    }
}
