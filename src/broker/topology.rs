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
    /// Requests that failed for good.
    pub dead_letter_queue: String,
    /// Delay before the 2nd, 3rd… delivery; the last one repeats.
    pub retry_delays: Vec<Duration>,
}

impl Topology {
    /// The topology a config describes.
    pub fn from_config(config: &Config) -> Self {
        Self {
            request_queue: config.queue.clone(),
            queue_type: config.queue_type,
            reply_queue: (!config.reply_queue.is_empty()).then(|| config.reply_queue.clone()),
            dead_letter_queue: config.dead_letter_queue(),
            retry_delays: config.retry.delays.clone(),
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

/// Declares the request queue, the dead-letter queue and the retry queues (durable,
/// of the configured type) and the default reply queue (durable, classic).
pub async fn declare(channel: &Channel, topology: &Topology) -> Result<(), BrokerError> {
    let typed = || {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text(topology.queue_type.as_str()));
        args
    };
    declare_one(channel, &topology.request_queue, typed()).await?;
    declare_one(channel, &topology.dead_letter_queue, typed()).await?;
    let mut delays = topology.retry_delays.clone();
    delays.sort_unstable();
    delays.dedup();
    for delay in delays {
        let mut args = typed();
        let ttl = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            text(&topology.request_queue),
        );
        declare_one(
            channel,
            &retry_queue_name(&topology.request_queue, delay),
            args,
        )
        .await?;
    }
    if let Some(reply) = &topology.reply_queue {
        declare_one(channel, reply, FieldTable::default()).await?;
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
            dead_letter_queue: "q.dlq".into(),
            retry_delays: vec![Duration::from_secs(1), Duration::from_secs(90)],
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
}
