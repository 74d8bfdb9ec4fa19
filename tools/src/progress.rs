//! Progress on long work, and printing that does not tear it.
//!
//! One bar at a time ([`start`]), drawn on stderr only when stderr is a terminal (and
//! `TERM` is not `dumb`); otherwise nothing is drawn at all. Every line the tool prints
//! while a bar may be live goes through [`out`] (stdout) or [`err`] (stderr), and log
//! lines through [`LogWriter`]: each hides the bar, prints, and draws it again
//! (indicatif's `suspend`), so results never land in the middle of a bar.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;

static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Whether a bar would be drawn: stderr is a terminal that can redraw lines.
pub fn drawn() -> bool {
    std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// Start the bar (replacing any other): `len` steps, shown with `template` (indicatif
/// syntax; `{eta}` is the estimate).
pub fn start(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if drawn() {
        bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(10));
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    *BAR.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.clone());
    bar
}

/// Clear and forget the bar.
pub fn finish() {
    if let Some(b) = BAR.lock().unwrap_or_else(|p| p.into_inner()).take() {
        b.finish_and_clear();
    }
}

/// Advance the bar (if any) by `n` steps.
pub fn tick(n: u64) {
    if let Some(b) = current() {
        b.inc(n);
    }
}

fn current() -> Option<ProgressBar> {
    BAR.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Run `f` with the bar hidden.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    match current() {
        Some(b) => b.suspend(f),
        None => f(),
    }
}

/// A line on stdout.
pub fn out(line: &str) {
    suspend(|| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    });
}

/// A line on stderr.
pub fn err(line: &str) {
    suspend(|| eprintln!("{line}"));
}

/// The tracing subscriber's writer: stderr, with the bar hidden around each event.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        suspend(|| std::io::stderr().lock().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}
