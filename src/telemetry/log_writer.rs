//! The log sink: lines are appended to a buffer in memory and written to
//! stderr in batches, so a request never waits on a `write` syscall.
//!
//! A background thread flushes the buffer every `interval` (and the buffer
//! flushes itself when full); [`FlushGuard`] flushes once more at exit. A
//! writer thread fed by a channel (tracing-appender) was measured too: on a
//! single core its per-line wake-up cost more than the syscall it saved (see
//! bench/RESULTS.md).

use std::io::{self, BufWriter, Stderr, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

type Shared = Arc<Mutex<BufWriter<Stderr>>>;

/// A `tracing_subscriber` writer that batches lines for stderr.
#[derive(Clone)]
pub struct BatchedStderr {
    buffer: Shared,
}

/// Stops the flusher thread and writes out what is left when dropped.
pub struct FlushGuard {
    buffer: Shared,
    stop: Arc<AtomicBool>,
}

fn lock(buffer: &Shared) -> MutexGuard<'_, BufWriter<Stderr>> {
    // A panic while holding the lock cannot leave the buffer invalid: keep logging.
    buffer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BatchedStderr {
    /// A writer with a 64 KiB buffer, flushed every `interval`.
    pub fn new(interval: Duration) -> (Self, FlushGuard) {
        let buffer: Shared = Arc::new(Mutex::new(BufWriter::with_capacity(
            64 * 1024,
            io::stderr(),
        )));
        let stop = Arc::new(AtomicBool::new(false));
        let (flusher_buffer, flusher_stop) = (buffer.clone(), stop.clone());
        // If the thread cannot start, lines still go out whenever the buffer fills
        // and at exit; nothing is lost.
        let _ = std::thread::Builder::new()
            .name("llmproxy-log-flush".into())
            .spawn(move || {
                while !flusher_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    let _ = lock(&flusher_buffer).flush();
                }
            });
        (
            Self {
                buffer: buffer.clone(),
            },
            FlushGuard { buffer, stop },
        )
    }
}

impl BatchedStderr {
    /// Appends one whole line (the access log's fast path).
    pub fn write_line(&self, line: &[u8]) {
        let _ = lock(&self.buffer).write_all(line);
    }

    /// Writes out what is buffered now (before a forced exit, which runs no
    /// destructors).
    pub fn flush_now(&self) {
        let _ = lock(&self.buffer).flush();
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = lock(&self.buffer).flush();
    }
}

/// One event's writer: the formatter writes a whole line in one call.
pub struct Line<'a>(&'a Shared);

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        lock(self.0).write(bytes)
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        lock(self.0).write_all(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Batching is the point: the flusher thread and the guard flush.
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(&self.buffer)
    }
}
