//! Reading a queue without losing or reordering what is not taken.
//!
//! RabbitMQ has no peek. A scan counts the queue's ready messages once (passive
//! declare) and takes at most that many with `basic.get` and manual ack, so
//! messages dead-lettered while it runs are left alone. Every message taken stays
//! *unacked* until the command decides: it acks what it replayed or purged, and
//! hands every other message back at the end, in queue order. A classic queue
//! puts each back at its original position; a quorum queue serves returned
//! messages first, in the order returned, so the order holds there too, but it
//! counts a delivery on each (`x-delivery-count`, which a delivery limit acts on).
//! If the tool dies or its connection drops, the broker requeues every unacked
//! message itself: a scan never loses one (a quorum queue may then reorder them).
//!
//! Memory stays flat: `basic.get` fetches one message at a time (no prefetch
//! buffer), and a message not taken is dropped from memory once looked at; only
//! the broker keeps it, unacked, until the end.

use std::sync::Arc;

use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Event};
use tokio_util::sync::CancellationToken;

use super::DlqError;
use super::message::DeadLetter;
use crate::broker::{self, Publisher};

/// A message taken from the queue and not yet settled.
#[derive(Debug)]
pub struct Taken {
    /// Its delivery tag on the scan's channel.
    pub tag: u64,
    /// What it says.
    pub message: DeadLetter,
}

/// One connection reading one queue.
pub struct Scan {
    connection: Arc<Connection>,
    channel: Channel,
    queue: String,
    /// Messages still to take, of those ready at the start.
    remaining: u32,
    /// The depth seen at the start.
    depth: u32,
    lost: CancellationToken,
    /// Delivery tags of messages to hand back: 8 bytes a message.
    kept: Vec<u64>,
    /// Messages acked (replayed or purged).
    acked: u32,
}

impl std::fmt::Debug for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("queue", &self.queue)
            .field("depth", &self.depth)
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl Scan {
    /// Connects and counts `queue`'s ready messages; an absent queue is
    /// [`DlqError::QueueNotFound`].
    pub async fn open(amqp_url: &str, queue: &str) -> Result<Self, DlqError> {
        let name = ShortString::try_new(queue)
            .ok()
            .filter(|_| !queue.is_empty())
            .ok_or_else(|| DlqError::InvalidName(queue.to_owned()))?;
        let connection = broker::connect(amqp_url, "txq dlq")
            .await
            .map_err(|source| DlqError::Connect {
                url: crate::config::redact_url(amqp_url),
                source,
            })?;
        let connection = Arc::new(connection);
        let lost = CancellationToken::new();
        let mut events = connection.events_listener();
        let watch = lost.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if matches!(event, Event::Error(_)) {
                    watch.cancel();
                    break;
                }
            }
        });
        // A passive declare only checks that the queue exists (its type and
        // arguments, as txq's topology set them, are not compared). A missing queue
        // closes the channel, so it gets its own.
        let probe = connection.create_channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let depth = match probe
            .queue_declare(name.clone(), options, FieldTable::default())
            .await
        {
            Ok(q) => q.message_count(),
            Err(e) if is_not_found(&e) => {
                return Err(DlqError::QueueNotFound(queue.to_owned()));
            }
            Err(e) => return Err(e.into()),
        };
        let _ = probe.close(200, "done".into()).await;
        let channel = connection.create_channel().await?;
        Ok(Self {
            connection,
            channel,
            queue: queue.to_owned(),
            remaining: depth,
            depth,
            lost,
            kept: Vec::new(),
            acked: 0,
        })
    }

    /// Ready messages when the scan started.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// A publisher in confirm mode on the scan's connection.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.connection.clone(), 1, self.lost.clone())
    }

    /// Fails fast with [`DlqError::ConnectionLost`] once the connection is gone.
    pub(crate) async fn guard<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, DlqError> {
        tokio::select! {
            _ = self.lost.cancelled() => Err(DlqError::ConnectionLost),
            r = fut => r.map_err(|e| if self.connection_gone() || e.is_io_error() {
                DlqError::ConnectionLost
            } else {
                e.into()
            }),
        }
    }

    /// Waits until the queue shows as many ready messages as it had, less those
    /// acked. The broker requeues asynchronously, and slowly (RabbitMQ 3.10 here:
    /// a few hundred a second into a classic queue); without this, a command run
    /// right after this one would count the queue before they are all back, and
    /// miss some. Gives up after 10s without progress (someone else consumes the
    /// queue): nothing of ours is lost either way.
    async fn wait_until_back(&self) -> Result<(), DlqError> {
        const STALL: std::time::Duration = std::time::Duration::from_secs(10);
        let expected = self.depth.saturating_sub(self.acked);
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let mut best = 0;
        let mut progress_at = tokio::time::Instant::now();
        loop {
            let name = ShortString::from(self.queue.as_str());
            let ready = self
                .guard(
                    self.channel
                        .queue_declare(name, options, FieldTable::default()),
                )
                .await?
                .message_count();
            if ready >= expected {
                return Ok(());
            }
            if ready > best {
                best = ready;
                progress_at = tokio::time::Instant::now();
            } else if progress_at.elapsed() >= STALL {
                tracing::warn!(
                    queue = %self.queue,
                    ready,
                    expected,
                    "the queue has fewer ready messages than this command left in it"
                );
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Whether the connection is lost (or closing).
    pub fn connection_gone(&self) -> bool {
        self.lost.is_cancelled() || !self.connection.status().connected()
    }

    /// The next message, unacked; `None` once as many as were ready at the start
    /// were taken, or the queue is empty.
    pub async fn next(&mut self) -> Result<Option<Taken>, DlqError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let name = ShortString::from(self.queue.as_str());
        let got = self
            .guard(
                self.channel
                    .basic_get(name, BasicGetOptions { no_ack: false }),
            )
            .await?;
        let Some(got) = got else {
            self.remaining = 0;
            return Ok(None);
        };
        self.remaining -= 1;
        let delivery = got.delivery;
        Ok(Some(Taken {
            tag: delivery.delivery_tag,
            message: DeadLetter::new(delivery.properties, delivery.data),
        }))
    }

    /// Removes one taken message from the queue.
    pub async fn ack(&mut self, tag: u64) -> Result<(), DlqError> {
        self.guard(self.channel.basic_ack(tag, BasicAckOptions::default()))
            .await?;
        self.acked = self.acked.saturating_add(1);
        Ok(())
    }

    /// Leaves a taken message in the queue: it goes back at [`finish`](Self::finish).
    pub fn keep(&mut self, tag: u64) {
        self.kept.push(tag);
    }

    /// Hands the kept messages back to the queue, each to its place, waits until
    /// they show, and closes.
    pub async fn finish(self) -> Result<(), DlqError> {
        // One `basic.nack(multiple, requeue)` naming the highest kept tag hands
        // back every unacked delivery up to it, in one batch: all the kept ones
        // (the others were acked; naming an acked tag would be a channel error).
        // A classic queue puts each back at its old position; a quorum queue
        // serves returned messages first, in tag order. One nack a message would
        // be requeued slowly, one at a time (RabbitMQ 3.10: ~500/s on 10,000).
        // (Closing the channel requeues too, as after a crash, but a quorum queue
        // then shuffles them.)
        if let Some(highest) = self.kept.iter().copied().max() {
            let requeue = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            self.guard(self.channel.basic_nack(highest, requeue))
                .await?;
        }
        self.wait_until_back().await?;
        // close-ok comes after the broker handled the nacks, and requeues
        // anything still unacked.
        self.guard(self.channel.close(200, "txq dlq done".into()))
            .await?;
        let _ = self.connection.close(200, "txq dlq done".into()).await;
        Ok(())
    }
}

/// The broker's 404 NOT_FOUND (other soft errors, such as ACCESS_REFUSED, are
/// reported as they are).
fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}
