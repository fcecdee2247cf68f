//! Shutdown on SIGINT/SIGTERM: the first signal starts a graceful drain, a second
//! one exits at once (the broker redelivers whatever was unacked, and the inbox
//! keeps that safe).

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Spawns a task that cancels `token` on the first SIGINT or SIGTERM and exits the
/// process with status 130 on the second.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal: finishing jobs in flight (signal again to exit at once)");
        token.cancel();
        wait_for_signal().await;
        warn!("second signal: exiting now; unacked requests will be redelivered");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
