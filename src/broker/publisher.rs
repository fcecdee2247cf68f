//! Publishing with publisher confirms.
//!
//! A small pool (deadpool) of confirm-mode channels: a publish borrows a channel only
//! long enough to hand the frame over and waits for its confirm after returning it,
//! so confirms of concurrent jobs are pipelined instead of serialised. A channel the
//! broker closed is not recycled; the pool opens a fresh one.
//!
//! The broker closes a channel over *one* message it refuses (a `user_id` that is
//! not the publisher's, a message over `max_message_size`), and every publish still
//! waiting on that channel fails with it. So a publish that failed with its channel
//! while the connection lives is sent again, alone, on a channel of its own: the
//! innocent ones go through, and the one the broker refuses again is known to be
//! refused for what it is ([`PublishError::Refused`]), not for a neighbour.

use std::sync::Arc;

use deadpool::managed::{self, Metrics, Pool, RecycleError, RecycleResult};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;

/// How a confirmed publish ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishOutcome {
    /// The broker took responsibility for the message.
    Confirmed,
    /// The broker confirmed it but could not route it (mandatory flag): the
    /// destination queue does not exist. Carries the broker's reply text.
    Returned(String),
}

/// Why a publish was not confirmed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The broker refused this very message: it closed a channel that carried only
    /// it. Sending it again unchanged fails the same way. Carries the broker's reason.
    #[error("rabbitmq refused the message: {0}")]
    Refused(String),
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
    connection: Arc<Connection>,
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
        let pool = Pool::builder(ChannelManager {
            connection: connection.clone(),
        })
        .max_size(channels.max(1))
        .build()
        // Only fails without a runtime for timeouts, and none are set.
        .expect("a pool without timeouts always builds");
        Self {
            pool,
            connection,
            lost,
        }
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
        let exchange = ShortString::try_new(exchange).map_err(|_| PublishError::RoutingKey)?;
        let routing_key =
            ShortString::try_new(routing_key).map_err(|_| PublishError::RoutingKey)?;
        let message = Message {
            exchange,
            routing_key,
            body,
            properties,
        };
        let work = async {
            match self.publish_pooled(&message).await {
                Err(PublishError::Amqp(e)) if self.connection.status().connected() => {
                    tracing::debug!(error = %e, "publish failed with its channel; sending it again alone");
                    self.publish_alone(&message).await
                }
                other => other,
            }
        };
        tokio::select! {
            _ = self.lost.cancelled() => Err(PublishError::ConnectionLost),
            result = work => result,
        }
    }

    async fn publish_pooled(&self, m: &Message<'_>) -> Result<PublishOutcome, PublishError> {
        let confirm = {
            let channel = self
                .pool
                .get()
                .await
                .map_err(|e| PublishError::Pool(e.to_string()))?;
            m.send(&channel).await?
            // The channel goes back to the pool here, before the confirm arrives.
        };
        confirmed(confirm.await?)
    }

    /// Sends `m` on a channel that carries nothing else, so a channel error is
    /// about `m`.
    async fn publish_alone(&self, m: &Message<'_>) -> Result<PublishOutcome, PublishError> {
        let channel = self.connection.create_channel().await?;
        let sent = async {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            m.send(&channel).await?.await
        }
        .await;
        match sent {
            Ok(confirmation) => {
                let _ = channel.close(200, "done".into()).await;
                confirmed(confirmation)
            }
            Err(e) if self.connection.status().connected() && !channel.status().connected() => {
                Err(PublishError::Refused(e.to_string()))
            }
            Err(e) => Err(PublishError::Amqp(e)),
        }
    }

    /// Whether this publisher's connection is still open.
    pub fn connected(&self) -> bool {
        self.connection.status().connected() && !self.lost.is_cancelled()
    }

    /// Closes the pool's channels.
    pub async fn close(&self) {
        self.pool.close();
    }
}

/// One message to publish, through the default or a named exchange, mandatory.
struct Message<'a> {
    exchange: ShortString,
    routing_key: ShortString,
    body: &'a [u8],
    properties: BasicProperties,
}

impl Message<'_> {
    async fn send(&self, channel: &Channel) -> lapin::Result<lapin::PublisherConfirm> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        channel
            .basic_publish(
                self.exchange.clone(),
                self.routing_key.clone(),
                options,
                self.body,
                self.properties.clone(),
            )
            .await
    }
}

fn confirmed(confirmation: lapin::Confirmation) -> Result<PublishOutcome, PublishError> {
    if confirmation.is_nack() {
        return Err(PublishError::Nacked);
    }
    match confirmation.take_message() {
        Some(returned) => Ok(PublishOutcome::Returned(returned.reply_text.to_string())),
        None => Ok(PublishOutcome::Confirmed),
    }
}
