//! Shutdown signals. The worker stops when the future given to
//! [`Worker::run`](crate::Worker::run) completes; [`shutdown_signal`] is the usual
//! one. What a second signal does is the program's business (`txq` exits at once):
//! library code never ends the process.

/// Completes on the first SIGINT or SIGTERM (Ctrl-C only, off Unix).
pub async fn shutdown_signal() {
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
