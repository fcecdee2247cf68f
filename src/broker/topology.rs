//! Queue declarations. Declaring is idempotent, so every worker declares what it
//! uses at start-up; a queue that exists with other arguments is an error that names it.

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::BrokerError;
use crate::config::{Config, QueueType};

/// The queues a worker uses.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Requests are consumed from here.
    pub request_queue: String,
    /// `classic` or `quorum`.
    pub queue_type: QueueType,
    /// Replies to requests without `reply_to` go here; `None` for no reply.
    pub reply_queue: Option<String>,
}

impl Topology {
    /// The topology a config describes.
    pub fn from_config(config: &Config) -> Self {
        Self {
            request_queue: config.queue.clone(),
            queue_type: config.queue_type,
            reply_queue: (!config.reply_queue.is_empty()).then(|| config.reply_queue.clone()),
        }
    }
}

/// Declares the request queue (durable, of the configured type) and the default
/// reply queue (durable, classic).
pub async fn declare(channel: &Channel, topology: &Topology) -> Result<(), BrokerError> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(topology.queue_type.as_str().into()),
    );
    declare_one(channel, &topology.request_queue, args).await?;
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
