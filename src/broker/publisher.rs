//! Publishing with publisher confirms.
//!
//! A small pool (deadpool) of confirm-mode channels: a publish borrows a channel only
//! long enough to hand the frame over and waits for its confirm after returning it,
//! so confirms of concurrent jobs are pipelined instead of serialised. A channel the
//! broker closed is not recycled; the pool opens a fresh one.

use std::sync::Arc;

use deadpool::managed::{self, Metrics, Pool, RecycleError, RecycleResult};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;

/// How a confirmed publish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// The broker took responsibility for the message.
    Confirmed,
    /// The broker confirmed it but could not route it (mandatory flag): the
    /// destination queue does not exist. Carries the broker's reply text.
    Returned(String),
}

/// Why a publish was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker nacked the message: it did not take responsibility for it.
    #[error("rabbitmq nacked the publish")]
    Nacked,
    /// No channel could be had, or the channel/connection failed mid-publish.
    #[error("rabbitmq publish failed: {0}")]
    Amqp(#[from] lapin::Error),
    /// The routing key is longer than AMQP allows.
    #[error("routing key longer than 255 bytes")]
    RoutingKey,
    /// The channel pool failed.
    #[error("rabbitmq channel pool: {0}")]
    Pool(String),
    /// The broker could not route a message that must not be dropped.
    #[error("rabbitmq could not route the message: {0}")]
    Unroutable(String),
    /// The connection this publisher belongs to is gone; a confirm can no longer come.
    #[error("rabbitmq connection lost before the confirm")]
    ConnectionLost,
}

struct ChannelManager {
    connection: Arc<Connection>,
}

impl managed::Manager for ChannelManager {
    type Type = Channel;
    type Error = lapin::Error;

    async fn create(&self) -> Result<Channel, lapin::Error> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    async fn recycle(&self, channel: &mut Channel, _: &Metrics) -> RecycleResult<lapin::Error> {
        if channel.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("channel closed"))
        }
    }
}

/// Publishes messages and waits for the broker's confirm. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    pool: Pool<ChannelManager>,
    lost: CancellationToken,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("status", &self.pool.status())
            .finish()
    }
}

impl Publisher {
    /// A publisher with up to `channels` confirm-mode channels on `connection`.
    /// Cancelling `lost` (the connection is gone) fails every pending publish at
    /// once, instead of leaving it waiting for a confirm that cannot come.
    pub fn new(connection: Arc<Connection>, channels: usize, lost: CancellationToken) -> Self {
        let pool = Pool::builder(ChannelManager { connection })
            .max_size(channels.max(1))
            .build()
            // Only fails without a runtime for timeouts, and none are set.
            .expect("a pool without timeouts always builds");
        Self { pool, lost }
    }

    /// Publishes `body` through the default exchange to the queue `routing_key`
    /// (a queue name or a direct reply-to address), with the mandatory flag, and
    /// waits for the broker's confirm.
    pub async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublishOutcome, PublishError> {
        self.publish_to("", routing_key, body, properties).await
    }

    /// As [`publish`](Self::publish), to any exchange.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublishOutcome, PublishError> {
        tokio::select! {
            _ = self.lost.cancelled() => Err(PublishError::ConnectionLost),
            result = self.publish_confirmed(exchange, routing_key, body, properties) => result,
        }
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PublishOutcome, PublishError> {
        let exchange = ShortString::try_new(exchange).map_err(|_| PublishError::RoutingKey)?;
        let routing_key =
            ShortString::try_new(routing_key).map_err(|_| PublishError::RoutingKey)?;
        let confirm = {
            let channel = self
                .pool
                .get()
                .await
                .map_err(|e| PublishError::Pool(e.to_string()))?;
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            channel
                .basic_publish(exchange, routing_key, options, body, properties)
                .await?
            // The channel goes back to the pool here, before the confirm arrives.
        };
        let confirmation = confirm.await?;
        if confirmation.is_nack() {
            return Err(PublishError::Nacked);
        }
        match confirmation.take_message() {
            Some(returned) => Ok(PublishOutcome::Returned(returned.reply_text.to_string())),
            None => Ok(PublishOutcome::Confirmed),
        }
    }

    /// Closes the pool's channels.
    pub async fn close(&self) {
        self.pool.close();
    }
}
