//! Acks, coalesced. A delivery tag is acked only once its job's commit and publishes
//! are confirmed (ARCHITECTURE.md, "no ack before commit and confirmed publishes");
//! when a contiguous run of the channel's tags is done, one `basic.ack` with
//! `multiple = true` settles the run, which is one frame for RabbitMQ instead of one
//! per job.
//!
//! A multiple ack settles *every* unsettled tag up to it, so it is only ever sent
//! for the highest acked tag of a prefix in which every tag is done: acked-pending,
//! or settled otherwise (requeued, whose `nack` frame went out first). A tag whose
//! job still runs stops the prefix; tags done behind it wait at most [`HOLD`], then
//! go out one by one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::Acker;
use lapin::options::BasicAckOptions;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::error;

/// How long a done tag may wait behind a running one before it is acked alone.
/// Short: with prefetch equal to concurrency, an unsent ack holds one of the
/// broker's slots.
pub(crate) const HOLD: Duration = Duration::from_millis(3);

/// One ack to send: with `multiple`, it settles every tag up to this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ack<A> {
    pub(crate) acker: A,
    pub(crate) multiple: bool,
    /// Deliveries it acks.
    pub(crate) count: u64,
}

#[derive(Debug)]
enum Slot<A> {
    Running,
    /// Commit and publishes confirmed; the ack not sent yet.
    Ack(A, Instant),
    /// Settled some other way (requeued, or its channel died).
    Settled,
}

/// The channel's outstanding delivery tags in the order the broker issued them
/// (consecutive from the first), with what became of each. Pure: unit-tested below.
#[derive(Debug)]
pub(crate) struct Window<A> {
    first: u64,
    slots: VecDeque<Slot<A>>,
}

impl<A: Clone> Window<A> {
    pub(crate) fn new() -> Self {
        Self {
            first: 0,
            slots: VecDeque::new(),
        }
    }

    /// A delivery arrived. Tags come in order, one channel each window.
    pub(crate) fn issued(&mut self, tag: u64) {
        if self.slots.is_empty() {
            self.first = tag;
        }
        // A gap cannot happen on one channel; if it did, the missing tags count as
        // running, which only ever holds acks back.
        while self.first + (self.slots.len() as u64) < tag {
            self.slots.push_back(Slot::Running);
        }
        if self.first + (self.slots.len() as u64) == tag {
            self.slots.push_back(Slot::Running);
        }
    }

    fn slot(&mut self, tag: u64) -> Option<&mut Slot<A>> {
        let index = usize::try_from(tag.checked_sub(self.first)?).ok()?;
        self.slots.get_mut(index)
    }

    /// The job of `tag` is done and may be acked.
    pub(crate) fn ack(&mut self, tag: u64, acker: A, now: Instant) {
        if let Some(slot) = self.slot(tag) {
            *slot = Slot::Ack(acker, now);
        }
    }

    /// `tag` was settled without an ack; its frame is already out.
    pub(crate) fn settled(&mut self, tag: u64) {
        if let Some(slot) = self.slot(tag) {
            *slot = Slot::Settled;
        }
    }

    /// What to send now: one multiple ack for the done prefix, then the done tags
    /// that waited `hold` behind a running one. Also when to look again.
    pub(crate) fn take(&mut self, now: Instant, hold: Duration) -> (Vec<Ack<A>>, Option<Instant>) {
        let mut sends = Vec::new();
        let mut last_ack = None;
        let mut count = 0;
        while let Some(front) = self.slots.front() {
            match front {
                Slot::Running => break,
                Slot::Ack(acker, _) => {
                    last_ack = Some(acker.clone());
                    count += 1;
                }
                Slot::Settled => {}
            }
            self.slots.pop_front();
            self.first += 1;
        }
        if let Some(acker) = last_ack {
            sends.push(Ack {
                acker,
                multiple: count > 1,
                count,
            });
        }
        let mut next = None;
        for slot in &mut self.slots {
            if let Slot::Ack(acker, since) = slot {
                if now.duration_since(*since) >= hold {
                    sends.push(Ack {
                        acker: acker.clone(),
                        multiple: false,
                        count: 1,
                    });
                    *slot = Slot::Settled;
                } else {
                    let due = *since + hold;
                    next = Some(next.map_or(due, |n: Instant| n.min(due)));
                }
            }
        }
        (sends, next)
    }
}

/// The window of one channel, shared by the consume loop, the jobs and the task
/// that sends the acks.
#[derive(Debug)]
pub(crate) struct Acks {
    window: Mutex<Window<Acker>>,
    wake: Notify,
}

impl Acks {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            window: Mutex::new(Window::new()),
            wake: Notify::new(),
        })
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window<Acker>> {
        // The window's state is valid after any panic inside it (none can happen).
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn issued(&self, tag: u64) {
        self.window().issued(tag);
    }

    pub(crate) fn ack(&self, tag: u64, acker: Acker) {
        self.window().ack(tag, acker, Instant::now());
        self.wake.notify_one();
    }

    pub(crate) fn settled(&self, tag: u64) {
        self.window().settled(tag);
        self.wake.notify_one();
    }

    /// Sends what is due; `hold` zero sends every done tag.
    async fn send_due(&self, hold: Duration) -> (u64, Option<Instant>) {
        let (sends, next) = self.window().take(Instant::now(), hold);
        let mut acked = 0;
        for send in sends {
            let options = BasicAckOptions {
                multiple: send.multiple,
            };
            match send.acker.ack(options).await {
                Ok(_) => acked += send.count,
                Err(e) => {
                    error!(error = %e, "could not ack; the broker will redeliver, and the inbox answers");
                }
            }
        }
        (acked, next)
    }

    /// Sends acks until `stop`, then what is done by then. Returns nothing: a lost
    /// ack is a redelivery, which the inbox answers.
    pub(crate) async fn run(
        self: Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
        mut on_acked: impl FnMut(u64) + Send,
    ) {
        loop {
            let (acked, next) = self.send_due(HOLD).await;
            on_acked(acked);
            let wait_more = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = wait_more => {}
            }
        }
        let (acked, _) = self.send_due(Duration::ZERO).await;
        on_acked(acked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        // A fixed origin keeps the arithmetic readable.
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now) + Duration::from_millis(ms)
    }

    fn window(tags: std::ops::RangeInclusive<u64>) -> Window<u64> {
        let mut w = Window::new();
        for t in tags {
            w.issued(t);
        }
        w
    }

    fn send(acker: u64, multiple: bool, count: u64) -> Ack<u64> {
        Ack {
            acker,
            multiple,
            count,
        }
    }

    #[test]
    fn a_done_prefix_is_one_multiple_ack_for_its_highest_tag() {
        let mut w = window(1..=4);
        w.ack(1, 1, at(0));
        w.ack(2, 2, at(0));
        w.ack(3, 3, at(0));
        let (sends, next) = w.take(at(0), HOLD);
        assert_eq!(sends, vec![send(3, true, 3)]);
        assert_eq!(next, None);
        // Tag 4 is still outstanding, and alone when it is done.
        w.ack(4, 4, at(1));
        assert_eq!(w.take(at(1), HOLD).0, vec![send(4, false, 1)]);
    }

    #[test]
    fn a_running_tag_is_never_covered() {
        let mut w = window(1..=3);
        w.ack(2, 2, at(0));
        w.ack(3, 3, at(0));
        let (sends, next) = w.take(at(0), HOLD);
        assert!(sends.is_empty(), "{sends:?}");
        assert_eq!(next, Some(at(0) + HOLD));
        // Past the hold, each goes alone, never as a multiple ack over tag 1.
        let (sends, _) = w.take(at(3), HOLD);
        assert_eq!(sends, vec![send(2, false, 1), send(3, false, 1)]);
        // Tag 1 finishing later acks only itself.
        w.ack(1, 1, at(4));
        assert_eq!(w.take(at(4), HOLD).0, vec![send(1, false, 1)]);
        assert!(w.slots.is_empty());
    }

    #[test]
    fn a_requeued_tag_in_the_prefix_is_passed_over_not_acked_as_itself() {
        let mut w = window(1..=4);
        w.ack(1, 1, at(0));
        w.settled(2);
        w.ack(3, 3, at(0));
        w.settled(4);
        // Tag 2's nack went out before; the multiple ack on 3 cannot touch it.
        assert_eq!(w.take(at(0), HOLD).0, vec![send(3, true, 2)]);
        assert!(w.slots.is_empty());
    }

    #[test]
    fn a_prefix_of_settled_tags_sends_nothing() {
        let mut w = window(5..=6);
        w.settled(5);
        w.settled(6);
        assert!(w.take(at(0), HOLD).0.is_empty());
        assert!(w.slots.is_empty());
        w.issued(7);
        w.ack(7, 7, at(0));
        assert_eq!(w.take(at(0), HOLD).0, vec![send(7, false, 1)]);
    }

    #[test]
    fn a_zero_hold_sends_every_done_tag_and_still_skips_running_ones() {
        let mut w = window(1..=4);
        w.ack(2, 2, at(0));
        w.ack(4, 4, at(0));
        let (sends, next) = w.take(at(0), Duration::ZERO);
        assert_eq!(sends, vec![send(2, false, 1), send(4, false, 1)]);
        assert_eq!(next, None);
    }

    #[test]
    fn tags_outside_the_window_are_ignored() {
        let mut w = window(10..=11);
        w.ack(3, 3, at(0));
        w.ack(12, 12, at(0));
        w.settled(99);
        assert!(w.take(at(0), HOLD).0.is_empty());
        w.ack(10, 10, at(0));
        w.ack(11, 11, at(0));
        assert_eq!(w.take(at(0), HOLD).0, vec![send(11, true, 2)]);
    }
}
