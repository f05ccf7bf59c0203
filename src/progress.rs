//! Progress on stderr. On a terminal: an indicatif bar. Anywhere else (a log file, a pipe,
//! CI), a bar's redraws would be lost or garble the log, so the same progress becomes plain
//! labelled lines: one every `LALORA_PROGRESS_SECS` seconds (default 10) while the work
//! runs and one when it ends, so a log never goes silent for long. `--quiet` shows nothing.
//!
//! A line reads `train: 12/40 steps, elapsed 31s, 0.39 steps/s, ETA 1m12s, loss 1.234`.

use std::io::IsTerminal;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

/// The environment variable that sets the interval of plain progress lines, in seconds.
pub const INTERVAL_VAR: &str = "LALORA_PROGRESS_SECS";
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// The interval of plain progress lines: `LALORA_PROGRESS_SECS` if set, else 10 s.
pub fn interval() -> Result<Duration> {
    match std::env::var(INTERVAL_VAR) {
        Err(_) => Ok(DEFAULT_INTERVAL),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                Error::usage(format!(
                    "{INTERVAL_VAR}={v}: not a number of seconds in (0, 86400]"
                ))
            }),
    }
}

/// The part of a larger run that the work now starting belongs to (a grid sweep's
/// combination), set by [`scope`]. A process-wide label because the bars are made deep
/// inside training and evaluation, whose signatures every command shares.
static SCOPE: Mutex<Option<String>> = Mutex::new(None);

/// While the guard lives, every new progress label names `part`: `train (r=4 all)`.
pub fn scope(part: String) -> Scope {
    let previous = lock_scope().replace(part);
    Scope { previous }
}

/// Restores the enclosing label when dropped.
pub struct Scope {
    previous: Option<String>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        *lock_scope() = self.previous.take();
    }
}

fn lock_scope() -> MutexGuard<'static, Option<String>> {
    // The label is a plain string: a panic elsewhere cannot leave it half-written.
    SCOPE.lock().unwrap_or_else(|p| p.into_inner())
}

/// `what`, followed by the scope's part when one is set.
fn scoped(what: &str) -> String {
    match &*lock_scope() {
        Some(part) => format!("{what} ({part})"),
        None => what.to_string(),
    }
}

/// Progress of `len` units of work labelled `what` (the stage).
pub fn bar(len: u64, what: &str, quiet: bool) -> Progress {
    let what = &scoped(what);
    let kind = if quiet {
        Kind::Hidden
    } else if std::io::stderr().is_terminal() {
        Kind::Bar(terminal_bar(len, what))
    } else {
        // The command line checked the variable before any work started.
        Kind::Lines(Lines::start(
            len,
            what,
            interval().unwrap_or(DEFAULT_INTERVAL),
        ))
    };
    Progress { kind }
}

fn terminal_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style =
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}

pub struct Progress {
    kind: Kind,
}

enum Kind {
    Hidden,
    Bar(ProgressBar),
    Lines(Lines),
}

impl Progress {
    /// Name the units counted ("steps", "batches") in plain lines.
    pub fn unit(mut self, unit: &str) -> Self {
        if let Kind::Lines(l) = &mut self.kind {
            l.state().unit = unit.to_string();
        }
        self
    }

    pub fn inc(&self, n: u64) {
        match &self.kind {
            Kind::Hidden => {}
            Kind::Bar(pb) => pb.inc(n),
            Kind::Lines(l) => l.state().pos += n,
        }
    }

    pub fn set_position(&self, pos: u64) {
        match &self.kind {
            Kind::Hidden => {}
            Kind::Bar(pb) => pb.set_position(pos),
            Kind::Lines(l) => l.state().pos = pos,
        }
    }

    /// A short note shown with the count (the bar shows it in place of the label).
    pub fn set_message(&self, msg: String) {
        match &self.kind {
            Kind::Hidden => {}
            Kind::Bar(pb) => pb.set_message(msg),
            Kind::Lines(l) => l.state().msg = msg,
        }
    }

    /// The work is done: clear the bar, or print the closing line.
    pub fn finish_and_clear(&self) {
        match &self.kind {
            Kind::Hidden => {}
            Kind::Bar(pb) => pb.finish_and_clear(),
            Kind::Lines(l) => {
                if l.stop() {
                    eprintln!("{}", l.state().line(true));
                }
            }
        }
    }
}

/// Plain lines from a ticker thread; the state it reads is shared with the worker.
struct Lines {
    shared: Arc<(Mutex<State>, Condvar)>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

struct State {
    what: String,
    unit: String,
    len: u64,
    pos: u64,
    msg: String,
    start: Instant,
    stopped: bool,
}

impl Lines {
    fn start(len: u64, what: &str, every: Duration) -> Self {
        let shared = Arc::new((
            Mutex::new(State {
                what: what.to_string(),
                unit: String::new(),
                len,
                pos: 0,
                msg: String::new(),
                start: Instant::now(),
                stopped: false,
            }),
            Condvar::new(),
        ));
        let s = Arc::clone(&shared);
        let ticker = std::thread::spawn(move || {
            let (lock, cv) = &*s;
            let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let (g, _) = cv
                    .wait_timeout_while(st, every, |st| !st.stopped)
                    .unwrap_or_else(|p| p.into_inner());
                st = g;
                if st.stopped {
                    return;
                }
                eprintln!("{}", st.line(false));
            }
        });
        Lines {
            shared,
            ticker: Mutex::new(Some(ticker)),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the counters inconsistent: use them as they are.
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// End the ticker; true the first time (the closing line is printed once).
    fn stop(&self) -> bool {
        self.state().stopped = true;
        self.shared.1.notify_all();
        let ticker = self.ticker.lock().unwrap_or_else(|p| p.into_inner()).take();
        match ticker {
            Some(t) => {
                // The ticker only prints; if it panicked there is nothing to recover.
                let _ = t.join();
                true
            }
            None => false,
        }
    }
}

impl Drop for Lines {
    /// Work abandoned by an error ends its ticker without a closing line.
    fn drop(&mut self) {
        self.stop();
    }
}

impl State {
    fn line(&self, done: bool) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let unit = if self.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", self.unit)
        };
        let rate = self.pos as f64 / secs.max(1e-9);
        let rate_text = if self.pos == 0 {
            "rate -".to_string()
        } else {
            format!("{}{unit}/s", sig(rate))
        };
        let mut s = if done {
            format!(
                "{}: {}/{}{unit} done, elapsed {}, {rate_text}",
                self.what,
                self.pos,
                self.len,
                duration(secs)
            )
        } else {
            let eta = if self.pos == 0 {
                "-".to_string()
            } else {
                duration(self.len.saturating_sub(self.pos) as f64 / rate)
            };
            format!(
                "{}: {}/{}{unit}, elapsed {}, {rate_text}, ETA {eta}",
                self.what,
                self.pos,
                self.len,
                duration(secs)
            )
        };
        if !self.msg.is_empty() {
            s += &format!(", {}", self.msg);
        }
        s
    }
}

/// Three significant digits, never in exponent form.
fn sig(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// `42s`, `3m05s`, `1h02m`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pos: u64, len: u64, secs: u64) -> State {
        State {
            what: "train".into(),
            unit: "steps".into(),
            len,
            pos,
            msg: "loss 1.234".into(),
            start: Instant::now() - Duration::from_secs(secs),
            stopped: false,
        }
    }

    #[test]
    fn lines_name_the_stage_count_elapsed_rate_and_eta() {
        // 10 of 40 steps in 20 s: 0.5 steps/s, 30 left take 60 s.
        let l = state(10, 40, 20).line(false);
        assert_eq!(
            l,
            "train: 10/40 steps, elapsed 20s, 0.500 steps/s, ETA 1m00s, loss 1.234"
        );
        let d = state(40, 40, 125).line(true);
        assert_eq!(
            d,
            "train: 40/40 steps done, elapsed 2m05s, 0.320 steps/s, loss 1.234"
        );
        // Nothing done yet: no rate, no ETA (not a division by zero).
        assert!(state(0, 40, 3).line(false).contains("rate -, ETA -"));
    }

    #[test]
    fn a_scope_names_its_part_in_new_labels_until_it_ends() {
        assert_eq!(scoped("train"), "train");
        {
            let _outer = scope("r=4 all".into());
            assert_eq!(scoped("train"), "train (r=4 all)");
            {
                let _inner = scope("r=8 q_proj".into());
                assert_eq!(scoped("eval x"), "eval x (r=8 q_proj)");
            }
            assert_eq!(scoped("train"), "train (r=4 all)");
        }
        assert_eq!(scoped("train"), "train");
    }

    #[test]
    fn durations_read_as_clock_times() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(59.6), "1m00s");
        assert_eq!(duration(3725.0), "1h02m");
    }
}
