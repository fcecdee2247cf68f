//! `--rate`: parsing it, and pacing publishes to it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::time::Instant;

/// A publish rate: `100/s`, `600/m`, `1000/h` (a bare number is per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_second: f64,
}

/// A `--rate` that does not parse.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid rate `{0}`: expected N/s, N/m or N/h with N > 0")]
pub struct RateError(String);

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, RateError> {
        let bad = || RateError(s.to_owned());
        let (n, unit) = s.trim().split_once('/').unwrap_or((s.trim(), "s"));
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        let seconds = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(bad()),
        };
        let per_second = n / seconds;
        // The interval must be a representable, non-zero duration.
        if !(per_second.is_finite() && per_second > 0.0)
            || Duration::try_from_secs_f64(1.0 / per_second).map_or(true, |d| d.is_zero())
        {
            return Err(bad());
        }
        Ok(Self { per_second })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", self.per_second)
    }
}

impl Rate {
    /// Requests a second.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    fn interval(&self) -> Duration {
        // `from_str` checked it is representable.
        Duration::try_from_secs_f64(1.0 / self.per_second).unwrap_or(Duration::from_secs(1))
    }
}

/// Spaces publishes `1/rate` apart on average. Time left unused (a full window,
/// a slow broker) is not saved up, so no burst follows a stall. Up to `SLACK` early
/// is allowed, so that rates finer than the timer's millisecond still hold.
pub(super) struct Pacer {
    interval: Duration,
    next: Instant,
}

const PACER_SLACK: Duration = Duration::from_millis(5);

impl Pacer {
    pub(super) fn new(rate: Rate) -> Self {
        Self {
            interval: rate.interval(),
            next: Instant::now(),
        }
    }

    pub(super) async fn wait(&mut self) {
        if self.next > Instant::now() + PACER_SLACK {
            tokio::time::sleep_until(self.next - PACER_SLACK).await;
        }
        self.next = self.next.max(Instant::now()) + self.interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units() {
        let per_second = |s: &str| s.parse::<Rate>().map(|r| r.per_second());
        assert_eq!(per_second("100/s").ok(), Some(100.0));
        assert_eq!(per_second("250").ok(), Some(250.0));
        assert_eq!(per_second("120/m").ok(), Some(2.0));
        assert_eq!(per_second("36/h").ok(), Some(0.01));
        assert_eq!(per_second("0.5/s").ok(), Some(0.5));
        for bad in ["0/s", "-1/s", "x/s", "10/d", "inf", "NaN", "1e-300/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }
    #[tokio::test]
    async fn the_pacer_holds_the_rate_without_saving_up_idle_time() {
        let rate: Rate = "200/s".parse().expect("rate");
        let mut pacer = Pacer::new(rate);
        let start = Instant::now();
        for _ in 0..21 {
            pacer.wait().await;
        }
        let took = start.elapsed();
        // 20 intervals of 5 ms, less the slack.
        assert!(took >= Duration::from_millis(90), "{took:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");

        // An idle stretch is not a licence to burst.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let start = Instant::now();
        for _ in 0..6 {
            pacer.wait().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "{:?}",
            start.elapsed()
        );
    }
}
