//! Progress while a run's clients work: a bar (hidden automatically when stderr is not a terminal, with an optional plain status line instead), the deadline, and Ctrl-C.

use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A bar over `duration` (in milliseconds), or a spinner when the run has no fixed length.
pub fn bar(duration: Option<Duration>) -> ProgressBar {
    match duration {
        Some(d) => ProgressBar::new(d.as_millis() as u64).with_style(
            ProgressStyle::with_template("{bar:30.cyan/blue} {elapsed:>4} {msg}")
                .expect("valid template"),
        ),
        None => {
            let bar = ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        }
    }
}

/// Moves the bar to `elapsed` and shows `msg` next to it.
pub fn update(bar: &ProgressBar, elapsed: Duration, msg: String) {
    bar.set_position(elapsed.as_millis() as u64);
    bar.set_message(msg);
}

/// What Ctrl-C does while clients run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlC {
    /// The default: the process ends at once.
    EndsTheProcess,
    /// The clients are told to stop, and the run goes on to its summary.
    StopsTheClients,
}

/// How a run's progress is shown, and when its clients are told to stop.
#[derive(Debug, Clone)]
pub struct Watch {
    /// When the clients are told to stop; `None`: only when they finish or at Ctrl-C.
    pub duration: Option<Duration>,
    /// How often the status line is redrawn.
    pub every: Duration,
    pub ctrl_c: CtrlC,
    /// Without a terminal (the bar hidden), print the status line this often instead.
    pub plain_every: Option<Duration>,
}

impl Watch {
    /// Clients told to stop after `duration`, a status line four times a second, Ctrl-C as
    /// usual, nothing printed without a terminal.
    pub fn until(duration: Duration) -> Watch {
        Watch {
            duration: Some(duration),
            every: Duration::from_millis(250),
            ctrl_c: CtrlC::EndsTheProcess,
            plain_every: None,
        }
    }
}

/// What came of a watched task.
pub struct Watched<T> {
    pub output: T,
    /// Ctrl-C told the clients to stop.
    pub interrupted: bool,
    /// When the watch began.
    pub started: Instant,
}

/// Shows `status()` every `watch.every` while `task` runs, cancels `stop` at the deadline
/// (or Ctrl-C, if `watch` says so), and returns the task's output once it ends. An error
/// from `status` cancels `stop` and ends the watch with that error.
pub async fn watch<T>(
    task: JoinHandle<Result<T>>,
    stop: &CancellationToken,
    watch: &Watch,
    mut status: impl FnMut() -> Result<String>,
) -> Result<Watched<T>> {
    let bar = bar(watch.duration);
    let mut line = StatusLine::new(&bar, watch);
    let deadline = async {
        match watch.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline, task);
    let mut tick = tokio::time::interval(watch.every);
    let mut interrupted = false;
    let output = loop {
        tokio::select! {
            r = &mut task => break r?,
            _ = &mut deadline, if !stop.is_cancelled() => stop.cancel(),
            _ = tokio::signal::ctrl_c(), if watch.ctrl_c == CtrlC::StopsTheClients && !stop.is_cancelled() => {
                interrupted = true;
                stop.cancel();
            }
            _ = tick.tick() => match status() {
                Ok(text) => line.show(text),
                Err(e) => {
                    stop.cancel();
                    bar.finish_and_clear();
                    return Err(e);
                }
            },
        }
    };
    bar.finish_and_clear();
    Ok(Watched {
        output: output?,
        interrupted,
        started: line.started,
    })
}

/// The status line: on the bar, or without a terminal, printed now and then.
struct StatusLine<'a> {
    bar: &'a ProgressBar,
    duration: Option<Duration>,
    /// Print plain lines this often (only when the bar is hidden).
    plain_every: Option<Duration>,
    started: Instant,
    last_plain: Instant,
}

impl<'a> StatusLine<'a> {
    fn new(bar: &'a ProgressBar, watch: &Watch) -> Self {
        StatusLine {
            bar,
            duration: watch.duration,
            plain_every: watch.plain_every.filter(|_| bar.is_hidden()),
            started: Instant::now(),
            last_plain: Instant::now(),
        }
    }

    fn show(&mut self, text: String) {
        let elapsed = self.started.elapsed();
        match self.plain_every {
            Some(every) => {
                if self.last_plain.elapsed() >= every {
                    eprintln!("[{:>3.0} s] {text}", elapsed.as_secs_f64());
                    self.last_plain = Instant::now();
                }
            }
            None => update(
                self.bar,
                self.duration.map_or(elapsed, |d| elapsed.min(d)),
                text,
            ),
        }
    }
}
