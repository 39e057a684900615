//! Signals: SIGTERM/SIGINT begin a graceful shutdown (a second one exits at once),
//! SIGHUP asks for a configuration reload.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Exit code when a second stop signal cuts the graceful shutdown short.
pub const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// Watches the signals; cancels `shutdown` on the first SIGTERM/SIGINT and exits the
/// process on the second. Each SIGHUP sends a unit on the returned channel.
pub fn watch(shutdown: CancellationToken) -> std::io::Result<mpsc::UnboundedReceiver<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (reload_tx, reload_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    let _ = reload_tx.send(());
                    continue;
                }
            };
            stops += 1;
            if stops == 1 {
                tracing::info!(
                    signal = name,
                    "stop signal received; shutting down gracefully"
                );
                shutdown.cancel();
            } else {
                tracing::warn!(signal = name, "second stop signal; exiting now");
                std::process::exit(EXIT_ON_SECOND_SIGNAL);
            }
        }
    });
    Ok(reload_rx)
}
