//! The RabbitMQ side: connecting, declaring the topology, publishing with confirms,
//! and mapping AMQP properties to and from txq's message contract.

mod envelope;
#[cfg(feature = "cli")]
mod management;
mod publisher;
mod topology;
mod trace;

use lapin::{Connection, ConnectionProperties};

use crate::config::SecretUrl;

pub use envelope::{
    Envelope, MAX_HEADER_BYTES, ReplyHeaders, bounded, header_int, header_text, headers,
    long_string, reply_properties, with_headers,
};
#[cfg(feature = "cli")]
pub use management::{PolicyError, PolicyReport, QueueRates, check_policies, queue_rates};
pub use publisher::{Pipelined, PublishError, PublishOutcome, Publisher};
pub use topology::{Topology, declare, queue_arguments, retry_queue_name};
pub use trace::Trace;

/// Errors talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// No broker answered at start-up, after this many attempts.
    #[error(
        "rabbitmq: no broker could be reached after {attempts} attempts; the last error: {last}"
    )]
    Unreachable {
        /// Attempts made.
        attempts: u32,
        /// What the last one said.
        last: String,
    },
    /// Shutdown came before the session was consuming.
    #[error("stopped before consuming")]
    Stopped,
    /// A node accepted no AMQP connection in time.
    #[error("rabbitmq: no answer from {0} in time")]
    ConnectTimeout(String),
    /// The consumer was cancelled by the broker (the queue was deleted, or a quorum
    /// queue lost its leader) or its channel closed.
    #[error("rabbitmq: the consumer on `{0}` was cancelled by the broker")]
    ConsumerCancelled(String),
}

/// How long one connection attempt to one broker node may take: a node that
/// accepts TCP but never answers must not hold up the fail-over to the next.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Opens a connection named after this process, so operators can tell workers apart
/// in the management UI. `url` may list several URLs separated by commas
/// ([`SecretUrl::split`]): the first that answers is used.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let urls = SecretUrl::new(url).split();
    Ok(connect_any(&urls, 0, name).await?.0)
}

/// Tries `urls` in turn, starting at `start` and wrapping around, and returns the
/// first connection that opens with the index of its URL; or the last error.
pub async fn connect_any(
    urls: &[SecretUrl],
    start: usize,
    name: &str,
) -> Result<(Connection, usize), BrokerError> {
    let mut last = None;
    for i in 0..urls.len().max(1) {
        let index = (start + i) % urls.len().max(1);
        let Some(url) = urls.get(index) else { break };
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url.expose(), props)).await
        {
            Ok(Ok(conn)) => return Ok((conn, index)),
            Ok(Err(e)) => {
                if urls.len() > 1 {
                    tracing::warn!(url = %url, error = %e, "rabbitmq node did not accept the connection; trying the next");
                }
                last = Some(BrokerError::Amqp(e));
            }
            Err(_) => {
                if urls.len() > 1 {
                    tracing::warn!(url = %url, ?CONNECT_TIMEOUT, "rabbitmq node did not answer; trying the next");
                }
                last = Some(BrokerError::ConnectTimeout(url.to_string()));
            }
        }
    }
    Err(last.unwrap_or_else(|| BrokerError::ConnectTimeout(String::new())))
}
