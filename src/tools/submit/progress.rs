//! Progress on standard error: a bar on a terminal, a line of counts otherwise.

use std::io::{self, IsTerminal as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::ProgressMode;

/// Counts the progress display reads.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) published: AtomicUsize,
    pub(super) answered: AtomicUsize,
    pub(super) not_ok: AtomicUsize,
}

/// Plain progress lines this far apart when there is no bar.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub(super) struct Progress {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub(super) fn start(
        mode: ProgressMode,
        total: usize,
        waiting: bool,
        records_to_stdout: bool,
        counters: Arc<Counters>,
    ) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        // Records written to the same terminal would tear through a redrawn bar.
        let records_on_terminal = records_to_stdout && io::stdout().is_terminal();
        let use_bar =
            mode == ProgressMode::Auto && io::stderr().is_terminal() && !records_on_terminal;
        let bar = use_bar.then(|| {
            let bar = indicatif::ProgressBar::new(u64::try_from(total).unwrap_or(u64::MAX));
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} {msg} [{elapsed_precise}, eta {eta}]",
            ) {
                bar.set_style(style);
            }
            bar
        });
        let task = tokio::spawn(async move {
            if mode == ProgressMode::Off {
                return;
            }
            let every = if bar.is_some() {
                Duration::from_millis(200)
            } else {
                PLAIN_EVERY
            };
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let published = counters.published.load(Ordering::Relaxed);
                let answered = counters.answered.load(Ordering::Relaxed);
                let not_ok = counters.not_ok.load(Ordering::Relaxed);
                match &bar {
                    Some(bar) => {
                        let done = if waiting { answered } else { published };
                        bar.set_position(u64::try_from(done).unwrap_or(u64::MAX));
                        if waiting {
                            bar.set_message(format!(
                                "replies ({published} confirmed, {not_ok} not ok)"
                            ));
                        } else {
                            bar.set_message("published");
                        }
                    }
                    None if waiting => eprintln!(
                        "txq submit: {published}/{total} published, {answered} replies ({not_ok} not ok)"
                    ),
                    None => eprintln!("txq submit: {published}/{total} published"),
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Self { stop, task }
    }

    pub(super) async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
