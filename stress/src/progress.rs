//! Progress bars for long runs (hidden automatically when stderr is not a terminal).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

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
