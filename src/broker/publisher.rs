//! Publishing with publisher confirms, in two lanes.
//!
//! - **Exact** ([`Publisher::publish`]): one publish in flight at a time on each
//!   of its 4 channels, so its outcome is its own. lapin hands a returned
//!   (unroutable, mandatory) message to whichever of the channel's confirms
//!   completes next (and a multiple ack completes several, in no set order), so
//!   with several publishes in flight on one channel a return can be reported to
//!   a neighbour, and the returned one reported confirmed. Where a return drives a
//!   decision (a retry or dead-letter copy whose queue is gone must requeue the
//!   request, never ack it), that would lose a message.
//! - **Pipelined** ([`Publisher::publish_pipelined`]): many in flight on one
//!   shared channel, for replies. A publish holds the channel only while lapin
//!   numbers it and queues its frames (one poll); the frames of concurrent jobs
//!   are then written together and their confirms pipelined (BENCHMARKS.md,
//!   round 5). A return is reported with the returned message's own routing key,
//!   to whichever publish lapin gives it to: for logs, not decisions.
//!
//! Each lane is a deadpool of confirm-mode channels; a channel the broker closed
//! is not recycled, the pool opens a fresh one.
//!
//! The broker closes a channel over *one* message it refuses (a `user_id` that is
//! not the publisher's, a message over `max_message_size`), and every publish still
//! waiting on that channel fails with it. So a publish that failed with its channel
//! while the connection lives is sent again, alone, on a channel of its own: the
//! innocent ones go through, and the one the broker refuses again is known to be
//! refused for what it is ([`PublishError::Refused`]), not for a neighbour.

use std::sync::Arc;

use deadpool::managed::{self, Metrics, Pool, RecycleError, RecycleResult};
use lapin::message::BasicReturnMessage;
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

/// How a pipelined publish ended ([`Publisher::publish_pipelined`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pipelined {
    /// The broker confirmed this publish and gave it no returned message.
    Confirmed,
    /// The broker returned *a* message published on the channel about then: this
    /// one, or another in flight with it, which may then have got `Confirmed`.
    Returned {
        /// The returned message's own routing key (its destination queue).
        routing_key: String,
        /// The broker's reason.
        reason: String,
    },
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
    /// Pipelined publishes share these channels.
    pool: Pool<ChannelManager>,
    /// An exact publish holds its channel until its confirm.
    exact: Pool<ChannelManager>,
    connection: Arc<Connection>,
    lost: CancellationToken,
}

/// Channels of the exact lane, each carrying one publish at a time: copies of
/// failing jobs (a flood of poison, a database outage) go out this many at once,
/// not one broker round trip after another.
const EXACT_CHANNELS: usize = 4;

/// Which lane a publish takes.
#[derive(Clone, Copy)]
enum Lane {
    Exact,
    Pipelined,
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
        let pool = |size: usize| {
            Pool::builder(ChannelManager {
                connection: connection.clone(),
            })
            .max_size(size)
            .build()
            // Only fails without a runtime for timeouts, and none are set.
            .expect("a pool without timeouts always builds")
        };
        Self {
            pool: pool(channels.max(1)),
            exact: pool(EXACT_CHANNELS),
            connection,
            lost,
        }
    }

    /// Publishes `body` through the default exchange to the queue `routing_key`
    /// (a queue name or a direct reply-to address), with the mandatory flag, and
    /// waits for the broker's confirm. The outcome is this message's own (the
    /// exact lane: a channel carries one such publish at a time).
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
        let message = Message::new(exchange, routing_key, body, properties)?;
        Ok(match self.confirm(&message, Lane::Exact).await? {
            Some(returned) => PublishOutcome::Returned(returned.reply_text.to_string()),
            None => PublishOutcome::Confirmed,
        })
    }

    /// As [`publish`](Self::publish), alongside other publishes in flight on a
    /// shared channel: for many at once, when a return only needs reporting
    /// ([`Pipelined::Returned`] may be another's).
    pub async fn publish_pipelined(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Pipelined, PublishError> {
        let message = Message::new("", routing_key, body, properties)?;
        Ok(match self.confirm(&message, Lane::Pipelined).await? {
            Some(returned) => Pipelined::Returned {
                routing_key: returned.delivery.routing_key.to_string(),
                reason: returned.reply_text.to_string(),
            },
            None => Pipelined::Confirmed,
        })
    }

    /// Publishes `m` in `lane`, or alone after its channel failed, and waits for
    /// the broker's ack: the message it returned with it, if any. A nack is an
    /// error, and so is losing the connection, at once.
    async fn confirm(
        &self,
        m: &Message<'_>,
        lane: Lane,
    ) -> Result<Option<BasicReturnMessage>, PublishError> {
        let work = async {
            let sent = match lane {
                Lane::Exact => self.publish_exact(m).await,
                Lane::Pipelined => self.publish_pooled(m).await,
            };
            match sent {
                Err(PublishError::Amqp(e)) if self.connection.status().connected() => {
                    tracing::debug!(error = %e, "publish failed with its channel; sending it again alone");
                    self.publish_alone(m).await
                }
                other => other,
            }
        };
        let confirmation = tokio::select! {
            _ = self.lost.cancelled() => Err(PublishError::ConnectionLost),
            result = work => result,
        }?;
        if confirmation.is_nack() {
            return Err(PublishError::Nacked);
        }
        Ok(confirmation.take_message())
    }

    /// The exact lane: the channel stays this publish's until its confirm.
    async fn publish_exact(&self, m: &Message<'_>) -> Result<lapin::Confirmation, PublishError> {
        let channel = take(&self.exact).await?;
        Ok(m.send(Channel::clone(&channel)).await?.await?)
    }

    /// The pipelined lane.
    async fn publish_pooled(&self, m: &Message<'_>) -> Result<lapin::Confirmation, PublishError> {
        let pooled = take(&self.pool).await?;
        // A publish's confirm is matched to it by its number on the channel, which
        // lapin gives it in the same step as it queues its frames, under two
        // locks, not one: two publishes taking those steps at once on one channel
        // could swap numbers. Both steps happen in the send's first poll, with no
        // await between them, so that poll is made while the channel is this
        // publish's alone; the rest (the I/O thread writing the frames, then the
        // confirm) is waited for after the channel went back.
        let mut send = std::pin::pin!(m.send(Channel::clone(&pooled)));
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(send.as_mut().poll(cx))).await;
        drop(pooled);
        let confirm = match first {
            std::task::Poll::Ready(sent) => sent?,
            std::task::Poll::Pending => send.await?,
        };
        Ok(confirm.await?)
    }

    /// Sends `m` on a channel that carries nothing else, so a channel error is
    /// about `m`.
    async fn publish_alone(&self, m: &Message<'_>) -> Result<lapin::Confirmation, PublishError> {
        let channel = self.connection.create_channel().await?;
        let sent = async {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            m.send(channel.clone()).await?.await
        }
        .await;
        match sent {
            Ok(confirmation) => {
                let _ = channel.close(200, "done".into()).await;
                Ok(confirmation)
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

    /// Closes the pools' channels.
    pub async fn close(&self) {
        self.pool.close();
        self.exact.close();
    }
}

/// A channel of `pool`, this publish's until dropped.
async fn take(
    pool: &Pool<ChannelManager>,
) -> Result<managed::Object<ChannelManager>, PublishError> {
    pool.get()
        .await
        .map_err(|e| PublishError::Pool(e.to_string()))
}

/// One message to publish, through the default or a named exchange, mandatory.
struct Message<'a> {
    exchange: ShortString,
    routing_key: ShortString,
    body: &'a [u8],
    properties: BasicProperties,
}

impl<'a> Message<'a> {
    fn new(
        exchange: &str,
        routing_key: &str,
        body: &'a [u8],
        properties: BasicProperties,
    ) -> Result<Self, PublishError> {
        Ok(Self {
            exchange: ShortString::try_new(exchange).map_err(|_| PublishError::RoutingKey)?,
            routing_key: ShortString::try_new(routing_key).map_err(|_| PublishError::RoutingKey)?,
            body,
            properties,
        })
    }

    async fn send(&self, channel: Channel) -> lapin::Result<lapin::PublisherConfirm> {
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
