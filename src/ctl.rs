//! Run control shared by every layer: the user's interrupt (Ctrl-C), which
//! long loops poll between steps, and progress bars on long work, shown only
//! when a front end (the REPL, `tarpo run`) turns them on and stderr is a
//! terminal, so library users and tests see nothing.
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static SHOW_PROGRESS: AtomicBool = AtomicBool::new(false);

/// The error a polled loop returns once the user has interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Asks running loops to stop at their next check (called from a signal handler).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn is_interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Forgets a handled interrupt (the front end does this before running more code).
pub fn clear() {
    INTERRUPTED.store(false, Ordering::SeqCst);
}

/// Err(Interrupted) once the user has interrupted.
pub fn check() -> anyhow::Result<()> {
    if is_interrupted() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Routes Ctrl-C (SIGINT) to `interrupt`; a second Ctrl-C while the first
/// is being handled exits (status 130). Front ends call this once, after
/// anything else that installs a SIGINT handler (rustyline does).
pub fn install_interrupt_handler() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        if is_interrupted() {
            std::process::exit(130);
        }
        interrupt();
    })?;
    Ok(())
}

/// Turns progress bars on or off for this process.
pub fn show_progress(on: bool) {
    SHOW_PROGRESS.store(on, Ordering::SeqCst);
}

/// A progress bar over `total` units of long work; hidden unless turned on.
/// It clears itself when dropped.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    pub fn new(what: &str, total: u64) -> Progress {
        // In a job, only rank 0 draws bars.
        if !SHOW_PROGRESS.load(Ordering::SeqCst) || !crate::dist::world().is_main() {
            return Progress(None);
        }
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        Progress(Some(bar))
    }

    pub fn set(&self, pos: u64) {
        if let Some(b) = &self.0 {
            b.set_position(pos);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
