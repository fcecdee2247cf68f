//! Reading a queue without losing, reordering or wearing out what is not taken.
//!
//! RabbitMQ has no peek. A scan counts the queue's ready messages once (passive
//! declare) and takes at most that many with `basic.get` and manual ack, so
//! messages dead-lettered while it runs are left alone. What it does not remove
//! goes back one of two ways ([`HandBack`]):
//!
//! - **Requeue**, on a queue proven classic: every message stays unacked until
//!   the end and goes back with one `basic.nack(multiple, requeue)`, each to its
//!   old position. A classic queue counts no deliveries and has no delivery limit.
//! - **Rotate**, on every other queue (quorum): a quorum queue counts each
//!   requeue as a delivery (`x-delivery-count`, also when a channel closes on
//!   them) and drops or dead-letters a message past its delivery limit (a policy
//!   can set one at any time; RabbitMQ 4 sets 20 by default). So nothing is ever
//!   requeued there: each message is republished, byte for byte, to the tail of
//!   the same queue, and acked once the broker confirmed the copy. The copy is a
//!   new message as far as the broker's delivery count goes. A command that
//!   went well then goes round the whole queue (up to the depth seen at the
//!   start), so that the messages end in their old order; one cut short (an
//!   error, a closed stdout) leaves those it looked at behind the rest. A crash
//!   between a copy's confirm and the original's ack leaves the message twice
//!   (same message_id: the inbox answers a second replay from its stored reply).
//!
//! The queue is proven classic when a `queue.declare` with
//! `x-queue-type = classic` is accepted (the broker refuses it for any other
//! type); a queue of another type, or a user who may not declare, gets Rotate.
//! Rotate needs to publish to the queue: a scan that finds it may not refuses to
//! read before taking anything.
//!
//! If the tool dies or its connection drops, the broker requeues every unacked
//! message itself: nothing is lost (a quorum queue counts that as a delivery of
//! the few messages it held). Messages are read with the dlq tools' own AMQP
//! client (`wire.rs`), which takes properties that are not UTF-8.
//!
//! Memory stays flat: `basic.get` fetches one message at a time (no prefetch
//! buffer), and a message is dropped from memory once looked at (rotated, or its
//! tag kept: 8 bytes). The exception: Rotate keeps the messages a purge selected
//! until it is confirmed, to copy them back if it is not.

use lapin::types::{AMQPValue, FieldTable, LongString};

use super::DlqError;
use super::message::DeadLetter;
use super::wire::{Chan, Published, RawProperties, Wire, WireError};
use crate::config::SecretUrl;

/// How a scan gives back what it does not remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandBack {
    /// `basic.nack(requeue)` at the end: a classic queue.
    Requeue,
    /// Republish to the tail, then ack: any other queue.
    Rotate,
}

/// Why a queue is not proven classic.
type NotClassic = String;

/// A message taken from the queue and not yet settled.
#[derive(Debug)]
pub struct Taken {
    /// Its delivery tag on the scan's channel.
    pub tag: u64,
    /// What it says.
    pub message: DeadLetter,
    /// Its properties as sent: what a copy is published with.
    pub raw: RawProperties,
}

/// A taken message held until a decision (purge's confirmation): in Requeue mode
/// only its tag, in Rotate mode all of it, to copy it back if it stays.
#[derive(Debug)]
pub enum Held {
    /// Requeue: the delivery tag.
    Tag(u64),
    /// Rotate: the message.
    Message(Box<Taken>),
}

impl Held {
    /// Its delivery tag.
    pub fn tag(&self) -> u64 {
        match self {
            Self::Tag(t) => *t,
            Self::Message(t) => t.tag,
        }
    }
}

/// One connection reading one queue.
pub struct Scan {
    wire: Wire,
    read: Chan,
    publish: Chan,
    queue: String,
    mode: HandBack,
    /// Messages still to take, of those ready at the start.
    remaining: u32,
    /// The depth seen at the start.
    depth: u32,
    /// Requeue: delivery tags of messages to hand back (8 bytes a message); Rotate:
    /// those whose copy failed, handed back as a last resort.
    kept: Vec<u64>,
    /// Messages acked (replayed, purged or rotated away).
    acked: u32,
    /// Messages copied back to the tail (Rotate).
    rotated: u64,
    /// The channel of [`queue_exists`](Self::queue_exists)'s passive declares,
    /// while the broker has not closed it.
    probe: Option<Chan>,
}

impl std::fmt::Debug for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("queue", &self.queue)
            .field("mode", &self.mode)
            .field("depth", &self.depth)
            .field("remaining", &self.remaining)
            .finish()
    }
}

/// What publishing a copy came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// In the queue.
    Confirmed,
    /// No such queue: the broker's reason.
    Returned(String),
}

impl Scan {
    /// Connects, counts `queue`'s ready messages and finds out how to hand them
    /// back; an absent queue is [`DlqError::QueueNotFound`].
    pub async fn open(amqp_url: &SecretUrl, queue: &str) -> Result<Self, DlqError> {
        if queue.is_empty() || queue.len() > 255 {
            return Err(DlqError::InvalidName(queue.to_owned()));
        }
        let urls: Vec<String> = amqp_url
            .split()
            .iter()
            .map(|u| u.expose().to_owned())
            .collect();
        let mut wire =
            Wire::connect(&urls, "txq dlq")
                .await
                .map_err(|source| DlqError::Connect {
                    url: amqp_url.to_string(),
                    source,
                })?;
        // A passive declare only checks that the queue exists. A missing queue
        // closes the channel, so it gets its own.
        let mut probe = wire.channel().await.map_err(DlqError::from_wire)?;
        let depth = match probe.declare(queue, true, FieldTable::default()).await {
            Ok(n) => n,
            Err(e) if e.channel_code() == Some(404) => {
                return Err(DlqError::QueueNotFound(queue.to_owned()));
            }
            Err(e) => return Err(DlqError::from_wire(e)),
        };
        let _ = probe.close().await;
        let (mode, not_classic) = match Self::hand_back(&mut wire, queue).await? {
            None => (HandBack::Requeue, String::new()),
            Some(why) => (HandBack::Rotate, why),
        };
        let read = wire.channel().await.map_err(DlqError::from_wire)?;
        let mut publish = wire.channel().await.map_err(DlqError::from_wire)?;
        publish
            .confirm_select()
            .await
            .map_err(DlqError::from_wire)?;
        if mode == HandBack::Rotate {
            // Nothing is taken until a copy could be put back: a publish that no
            // queue takes (the default exchange, an empty routing key) checks the
            // user's write permission and nothing else.
            match publish.publish("", &RawProperties::default(), b"").await {
                Ok(_) => {}
                Err(e) if e.channel_code().is_some() => {
                    return Err(DlqError::CannotRotate {
                        queue: queue.to_owned(),
                        not_classic,
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(DlqError::from_wire(e)),
            }
        }
        tracing::debug!(queue, depth, ?mode, server = %wire.server, "scan open");
        Ok(Self {
            wire,
            read,
            publish,
            queue: queue.to_owned(),
            mode,
            remaining: depth,
            depth,
            kept: Vec::new(),
            acked: 0,
            rotated: 0,
            probe: None,
        })
    }

    /// `None` (Requeue) if the broker accepts `x-queue-type = classic` for the
    /// queue; else why not (Rotate).
    async fn hand_back(wire: &mut Wire, queue: &str) -> Result<Option<NotClassic>, DlqError> {
        let mut probe = wire.channel().await.map_err(DlqError::from_wire)?;
        let mut classic = FieldTable::default();
        classic.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("classic")),
        );
        match probe.declare(queue, false, classic).await {
            Ok(_) => {
                let _ = probe.close().await;
                Ok(None)
            }
            // 406 (another type, or other properties), 403 (may not declare)…
            Err(e) if e.channel_code().is_some() => {
                tracing::debug!(queue, error = %e, "not proven classic: rotating");
                Ok(Some(e.to_string()))
            }
            Err(e) => Err(DlqError::from_wire(e)),
        }
    }

    /// Ready messages when the scan started.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// How the scan gives messages back.
    pub fn mode(&self) -> HandBack {
        self.mode
    }

    /// Whether the connection is lost.
    pub fn connection_gone(&self) -> bool {
        self.wire.is_lost()
    }

    fn fail(&self, e: WireError) -> DlqError {
        if e.is_connection_lost() || self.wire.is_lost() {
            DlqError::ConnectionLost
        } else {
            DlqError::from_wire(e)
        }
    }

    /// The next message, unacked; `None` once as many as were ready at the start
    /// were taken, or the queue is empty.
    pub async fn next(&mut self) -> Result<Option<Taken>, DlqError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let got = match self.read.get(&self.queue).await {
            Ok(got) => got,
            Err(e) => return Err(self.fail(e)),
        };
        let Some(got) = got else {
            self.remaining = 0;
            return Ok(None);
        };
        self.remaining -= 1;
        let (properties, unreadable) = got.properties.decode();
        Ok(Some(Taken {
            tag: got.delivery_tag,
            message: DeadLetter::new(properties, got.body).with_unreadable(unreadable),
            raw: got.properties,
        }))
    }

    /// Publishes `body` with `properties` to `queue`, waiting for the confirm. A
    /// nack is [`DlqError::Nacked`]: the broker did not take it.
    pub async fn publish(
        &mut self,
        queue: &str,
        properties: &RawProperties,
        body: &[u8],
    ) -> Result<PublishOutcome, DlqError> {
        match self.publish.publish(queue, properties, body).await {
            Ok(Published::Confirmed) => Ok(PublishOutcome::Confirmed),
            Ok(Published::Returned(text)) => Ok(PublishOutcome::Returned(text)),
            Ok(Published::Nacked) => Err(DlqError::Nacked(queue.to_owned())),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Whether `queue` exists (a passive declare); `None` if that cannot be told
    /// (no channel left, a name AMQP cannot carry, an answer other than
    /// not-found, such as another connection's exclusive queue: 405).
    pub async fn queue_exists(&mut self, queue: &str) -> Result<Option<bool>, DlqError> {
        if queue.is_empty() || lapin::types::ShortString::try_new(queue).is_err() {
            return Ok(None);
        }
        let mut probe = match self.probe.take() {
            Some(p) => p,
            None => match self.wire.channel().await {
                Ok(p) => p,
                Err(e) if e.is_connection_lost() || self.wire.is_lost() => {
                    return Err(self.fail(e));
                }
                // Out of channels: the question stays open.
                Err(_) => return Ok(None),
            },
        };
        match probe.declare(queue, true, FieldTable::default()).await {
            Ok(_) => {
                self.probe = Some(probe);
                Ok(Some(true))
            }
            // The broker closed the probe channel; the next check opens another.
            Err(e) if e.channel_code() == Some(404) => Ok(Some(false)),
            Err(e) if e.channel_code().is_some() => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Removes one taken message from the queue.
    pub fn ack(&mut self, tag: u64) -> Result<(), DlqError> {
        self.read.ack(tag).map_err(|e| self.fail(e))?;
        self.acked = self.acked.saturating_add(1);
        Ok(())
    }

    /// Leaves a taken message in the queue. Requeue: it goes back in its place at
    /// [`finish`](Self::finish). Rotate: its copy goes to the tail now, and the
    /// original is acked once the copy is confirmed.
    pub async fn keep(&mut self, taken: Taken) -> Result<(), DlqError> {
        match self.mode {
            HandBack::Requeue => {
                self.kept.push(taken.tag);
                Ok(())
            }
            HandBack::Rotate => {
                self.rotate(taken.tag, &taken.raw, &taken.message.body)
                    .await
            }
        }
    }

    /// Holds a taken message until [`release`](Self::release) or
    /// [`ack`](Self::ack).
    pub fn hold(&self, taken: Taken) -> Held {
        match self.mode {
            HandBack::Requeue => Held::Tag(taken.tag),
            HandBack::Rotate => Held::Message(Box::new(taken)),
        }
    }

    /// Leaves a held message in the queue, as [`keep`](Self::keep).
    pub async fn release(&mut self, held: Held) -> Result<(), DlqError> {
        match held {
            Held::Tag(tag) => {
                self.kept.push(tag);
                Ok(())
            }
            Held::Message(taken) => self.keep(*taken).await,
        }
    }

    async fn rotate(&mut self, tag: u64, raw: &RawProperties, body: &[u8]) -> Result<(), DlqError> {
        let queue = self.queue.clone();
        let outcome = self.publish(&queue, raw, body).await;
        match outcome {
            Ok(PublishOutcome::Confirmed) => {
                self.rotated += 1;
                self.ack(tag)
            }
            Ok(PublishOutcome::Returned(text)) => {
                // The queue itself is gone: the original stays where it is.
                self.kept.push(tag);
                Err(DlqError::QueueNotFound(format!("{queue} ({text})")))
            }
            Err(e) => {
                self.kept.push(tag);
                Err(e)
            }
        }
    }

    /// Waits until the queue shows as many ready messages as it had, less those
    /// acked. The broker requeues asynchronously, and slowly (RabbitMQ 3.10 here:
    /// a few hundred a second into a classic queue); without this, a command run
    /// right after this one would count the queue before they are all back, and
    /// miss some. Gives up after 10s without progress (someone else consumes the
    /// queue): nothing of ours is lost either way.
    async fn wait_until_back(&mut self) -> Result<(), DlqError> {
        const STALL: std::time::Duration = std::time::Duration::from_secs(10);
        let expected = self.depth.saturating_sub(self.acked);
        let mut best = 0;
        let mut progress_at = tokio::time::Instant::now();
        loop {
            let ready = match self
                .read
                .declare(&self.queue, true, FieldTable::default())
                .await
            {
                Ok(n) => n,
                Err(e) => return Err(self.fail(e)),
            };
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

    /// Hands the kept messages back, each to its place, and closes. Rotate: with
    /// `round`, first rotates the messages not taken yet, up to the depth seen at
    /// the start, so the queue ends in its old order.
    pub async fn finish(mut self, round: bool) -> Result<(), DlqError> {
        if self.mode == HandBack::Rotate && round {
            while self.remaining > 0 {
                let got = match self.read.get(&self.queue).await {
                    Ok(Some(got)) => got,
                    Ok(None) => break,
                    Err(e) => return Err(self.fail(e)),
                };
                self.remaining -= 1;
                self.rotate(got.delivery_tag, &got.properties, &got.body)
                    .await?;
            }
        }
        // One `basic.nack(multiple, requeue)` naming the highest kept tag hands
        // back every unacked delivery up to it, in one batch: all the kept ones
        // (the others were acked; naming an acked tag would be a channel error).
        // A classic queue puts each back at its old position. One nack a message
        // would be requeued slowly, one at a time (RabbitMQ 3.10: ~500/s on
        // 10,000). Rotate keeps none, but for a copy that failed.
        if let Some(highest) = self.kept.iter().copied().max() {
            if let Err(e) = self.read.nack(highest, true, true) {
                return Err(self.fail(e));
            }
            if self.mode == HandBack::Requeue {
                self.wait_until_back().await?;
            }
        }
        tracing::debug!(queue = %self.queue, depth = self.depth, acked = self.acked, rotated = self.rotated, requeued = self.kept.len(), "scan done");
        // close-ok comes after the broker handled the acks and nacks, and
        // requeues anything still unacked.
        let Self {
            wire,
            read,
            publish,
            ..
        } = self;
        let _ = publish.close().await;
        let closed = read.close().await;
        wire.close().await;
        closed.map_err(|e| {
            if e.is_connection_lost() {
                DlqError::ConnectionLost
            } else {
                DlqError::from_wire(e)
            }
        })
    }
}
