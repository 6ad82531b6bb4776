//! A progress line for long fan-outs: how many nodes answered of those
//! asked, and the slowest so far, on one line of stderr that updates in
//! place and is cleared when the query is done.
//!
//! Three parts, so that what a researcher sees can be tested without a
//! terminal:
//!
//! - [`Snapshot`]: the state of the current round of calls (one phase of a
//!   query: Describe, Query, Prepare or Commit), kept by
//!   [`crate::client::Federation`] as its calls start and end.
//! - [`Line`]: the renderer, a pure state machine from (time since the
//!   query started, snapshot) to the bytes to write: nothing during the
//!   first second ([`SHOW_AFTER`]), then at most one redraw per
//!   [`REDRAW_EVERY`], and only when the text changed; [`Line::finish`]
//!   clears what was drawn.
//! - [`Progress`]: the task that polls the federation and writes the line,
//!   on a terminal only unless forced ([`Mode`]: `FEDQ_PROGRESS` or
//!   `fedq query --progress`), so that JSON output, pipes and logs stay
//!   clean.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use crate::client::Federation;

/// No line is drawn for a query that finishes within this time.
pub const SHOW_AFTER: Duration = Duration::from_secs(1);

/// At most one redraw per this interval (a terminal written to on every
/// answer of 1,000 nodes would cost more than the answers).
pub const REDRAW_EVERY: Duration = Duration::from_millis(200);

/// How often [`Progress`] looks at the federation's calls.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// Longest node name shown; longer names are cut with an ellipsis, so the
/// line stays one line.
const NAME_CHARS: usize = 32;

/// The state of the current round of calls to nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Nodes this round called.
    pub asked: usize,
    /// Nodes that answered.
    pub answered: usize,
    /// Nodes whose call ended without an answer (unreachable, timed out,
    /// refused).
    pub failed: usize,
    /// The slowest node so far and its time: a finished call, or a call
    /// still running that has taken longer than any finished one.
    pub slowest: Option<(String, Duration)>,
    /// Whether [`Snapshot::slowest`] is still running.
    pub slowest_waiting: bool,
}

/// The text of the progress line for `s` (no control characters), e.g.
/// `812/1,000 nodes answered, 3 failed; slowest so far node-17 1,523 ms
/// (waiting)`.
pub fn render(s: &Snapshot) -> String {
    let mut text = format!(
        "{}/{} nodes answered",
        grouped(s.answered as u128),
        grouped(s.asked as u128)
    );
    if s.failed > 0 {
        text.push_str(&format!(", {} failed", grouped(s.failed as u128)));
    }
    if let Some((name, took)) = &s.slowest {
        let name: String = if name.chars().count() > NAME_CHARS {
            name.chars()
                .take(NAME_CHARS - 1)
                .chain(std::iter::once('…'))
                .collect()
        } else {
            name.clone()
        };
        text.push_str(&format!(
            "; slowest so far {name} {} ms",
            grouped(took.as_millis())
        ));
        if s.slowest_waiting {
            text.push_str(" (waiting)");
        }
    }
    text
}

/// `1234567` as `1,234,567`.
fn grouped(v: u128) -> String {
    let digits = v.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Erases the terminal's current line and returns the cursor to its start.
const CLEAR: &str = "\r\x1b[2K";

/// The renderer: decides what to write, given the time since the query
/// started and the calls' state. Pure (no clock, no terminal), so its text
/// and throttling are unit-tested.
#[derive(Debug, Default)]
pub struct Line {
    /// When the line was last drawn (time since the start), if ever.
    last_drawn: Option<Duration>,
    /// The text last drawn (a redraw with the same text is skipped).
    last_text: String,
}

impl Line {
    /// A line not drawn yet.
    pub fn new() -> Line {
        Line::default()
    }

    /// What to write to the terminal now (the line, drawn over the
    /// previous one), or nothing: before [`SHOW_AFTER`], within
    /// [`REDRAW_EVERY`] of the last redraw, when the text is unchanged, and
    /// when no call has been made yet.
    pub fn update(&mut self, elapsed: Duration, s: &Snapshot) -> Option<String> {
        if elapsed < SHOW_AFTER || s.asked == 0 {
            return None;
        }
        if self
            .last_drawn
            .is_some_and(|t| elapsed.saturating_sub(t) < REDRAW_EVERY)
        {
            return None;
        }
        let text = format!("fedq: {}", render(s));
        if text == self.last_text {
            return None;
        }
        self.last_drawn = Some(elapsed);
        self.last_text = text.clone();
        Some(format!("{CLEAR}{text}"))
    }

    /// What to write when the query is done: the sequence that clears the
    /// line if one was drawn, else nothing.
    pub fn finish(&mut self) -> Option<String> {
        self.last_drawn.take().map(|_| {
            self.last_text.clear();
            CLEAR.to_string()
        })
    }
}

/// When to show the progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// When stderr is a terminal (the default).
    Auto,
    /// Always, even into a pipe (for tests and screen recordings).
    Always,
    /// Never.
    Never,
}

impl Mode {
    /// The variable that sets the mode when no flag does.
    pub const ENV: &'static str = "FEDQ_PROGRESS";

    /// `auto`, `always` or `never`.
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Mode::Auto),
            "always" => Ok(Mode::Always),
            "never" => Ok(Mode::Never),
            other => Err(format!(
                "progress must be auto, always or never (got {other:?})"
            )),
        }
    }

    /// The mode `FEDQ_PROGRESS` asks for (`Auto` when unset); an invalid
    /// value is an error naming the variable.
    pub fn from_env() -> Result<Mode, String> {
        match std::env::var(Mode::ENV) {
            Ok(v) => Mode::parse(&v).map_err(|e| format!("{}: {e}", Mode::ENV)),
            Err(_) => Ok(Mode::Auto),
        }
    }

    /// Whether to draw, given whether stderr is a terminal.
    pub fn shows(self, terminal: bool) -> bool {
        match self {
            Mode::Auto => terminal,
            Mode::Always => true,
            Mode::Never => false,
        }
    }
}

/// The progress line of one query: a task that polls the federation's
/// calls and draws [`Line`] on stderr until [`Progress::stop`].
pub struct Progress {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts the line for a query on `fed` (nothing is started when `mode`
    /// does not show on this stderr).
    pub fn start(fed: &Federation, mode: Mode) -> Progress {
        if !mode.shows(std::io::stderr().is_terminal()) {
            return Progress {
                stop: None,
                task: None,
            };
        }
        let (stop, mut rx) = tokio::sync::oneshot::channel();
        let fed = fed.clone();
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut line = Line::new();
            let write = |s: String| {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(s.as_bytes());
                let _ = err.flush();
            };
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tokio::time::sleep(POLL_EVERY) => {}
                }
                if let Some(s) = line.update(start.elapsed(), &fed.progress()) {
                    write(s);
                }
            }
            if let Some(s) = line.finish() {
                write(s);
            }
        });
        Progress {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the line and clears it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(asked: usize, answered: usize, failed: usize) -> Snapshot {
        Snapshot {
            asked,
            answered,
            failed,
            slowest: Some(("node-17".into(), Duration::from_millis(1523))),
            slowest_waiting: false,
        }
    }

    #[test]
    fn text_says_answered_of_asked_and_the_slowest() {
        assert_eq!(
            render(&snap(1000, 812, 0)),
            "812/1,000 nodes answered; slowest so far node-17 1,523 ms"
        );
        let mut s = snap(3, 1, 1);
        s.slowest_waiting = true;
        assert_eq!(
            render(&s),
            "1/3 nodes answered, 1 failed; slowest so far node-17 1,523 ms (waiting)"
        );
        s.slowest = None;
        assert_eq!(render(&s), "1/3 nodes answered, 1 failed");
        s.slowest = Some(("n".repeat(100), Duration::from_millis(5)));
        let text = render(&s);
        assert!(
            text.contains(&format!("{}… 5 ms", "n".repeat(NAME_CHARS - 1))),
            "{text}"
        );
        assert!(!text.contains(&"n".repeat(NAME_CHARS)), "{text}");
    }

    #[test]
    fn nothing_before_a_second_then_throttled_and_cleared() {
        let ms = Duration::from_millis;
        let mut line = Line::new();
        // A quick query: never drawn, nothing to clear.
        assert_eq!(line.update(ms(999), &snap(10, 3, 0)), None);
        assert_eq!(line.finish(), None);
        // A slow one: drawn at 1 s, over the previous line.
        let first = line.update(ms(1000), &snap(10, 3, 0)).unwrap();
        assert_eq!(
            first,
            "\r\x1b[2Kfedq: 3/10 nodes answered; slowest so far node-17 1,523 ms"
        );
        // Changed within 200 ms: not redrawn; after: redrawn.
        assert_eq!(line.update(ms(1100), &snap(10, 4, 0)), None);
        assert_eq!(line.update(ms(1199), &snap(10, 4, 0)), None);
        assert!(line
            .update(ms(1200), &snap(10, 4, 0))
            .unwrap()
            .contains("4/10"));
        // Unchanged: not redrawn, however long.
        assert_eq!(line.update(ms(5000), &snap(10, 4, 0)), None);
        // Nothing asked yet (between phases): nothing drawn.
        assert_eq!(line.update(ms(6000), &Snapshot::default()), None);
        // Done: cleared once.
        assert_eq!(line.finish().as_deref(), Some("\r\x1b[2K"));
        assert_eq!(line.finish(), None);
    }

    #[test]
    fn modes_parse_and_decide() {
        assert_eq!(Mode::parse("always"), Ok(Mode::Always));
        assert_eq!(Mode::parse(" Never "), Ok(Mode::Never));
        assert_eq!(Mode::parse("auto"), Ok(Mode::Auto));
        let e = Mode::parse("yes").unwrap_err();
        assert!(e.contains("auto, always or never"), "{e}");
        assert!(Mode::Auto.shows(true) && !Mode::Auto.shows(false));
        assert!(Mode::Always.shows(false));
        assert!(!Mode::Never.shows(true));
    }
}
