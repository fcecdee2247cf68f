//! The RabbitMQ side: connecting, declaring the topology, publishing with confirms,
//! and mapping AMQP properties to and from txq's message contract.
//!
//! **Invariant:** only this module and `worker/` touch lapin types.

mod envelope;
mod publisher;
mod topology;
mod trace;

use lapin::{Connection, ConnectionProperties};

pub use envelope::{
    Envelope, MAX_HEADER_BYTES, ReplyHeaders, bounded, header_int, header_text, headers,
    long_string, reply_properties, with_headers,
};
pub use publisher::{PublishError, PublishOutcome, Publisher};
pub use topology::{Topology, declare, retry_queue_name};
pub use trace::Trace;

/// Errors talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Connecting, declaring or consuming failed.
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    /// Declaring a queue failed; often an existing queue with other arguments.
    #[error("rabbitmq: declaring queue `{queue}`: {source}")]
    Declare {
        /// The queue.
        queue: String,
        /// What the broker said.
        source: lapin::Error,
    },
    /// A queue or routing key longer than AMQP's 255 bytes.
    #[error("rabbitmq: `{0}` is longer than 255 bytes")]
    InvalidName(String),
    /// The consumer was cancelled by the broker (the queue was deleted, or a quorum
    /// queue lost its leader) or its channel closed.
    #[error("rabbitmq: the consumer on `{0}` was cancelled by the broker")]
    ConsumerCancelled(String),
}

/// Opens a connection named after this process, so operators can tell workers apart
/// in the management UI.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(Connection::connect(url, props).await?)
}
