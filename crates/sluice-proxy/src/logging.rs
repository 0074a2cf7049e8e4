//! Log output in batches. `env_logger` writes (and flushes) every record on its own, which
//! costs a `write(2)` per access-log line, i.e. per request. Here records collect in a buffer
//! that a background thread writes to stderr every [`INTERVAL`] (or at once past [`HIGH_WATER`]),
//! so a busy gateway makes ten writes a second, not one per request. [`flush`] empties it
//! (Sluice calls it before exiting); what a crash leaves in the buffer, at most one interval's
//! worth, is lost.

use std::io::Write;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// How often buffered records reach stderr.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this large is written at once, by whoever filled it.
const HIGH_WATER: usize = 64 * 1024;

struct Sink {
    buf: Mutex<Vec<u8>>,
    /// Held while writing, so batches reach stderr in the order they were taken.
    out: Mutex<()>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sink() -> &'static Sink {
    SINK.get_or_init(|| Sink {
        buf: Mutex::new(Vec::with_capacity(HIGH_WATER)),
        out: Mutex::new(()),
    })
}

/// Writes whatever is buffered to stderr now.
pub fn flush() {
    let sink = sink();
    let _order = lock(&sink.out);
    let batch = std::mem::take(&mut *lock(&sink.buf));
    if !batch.is_empty() {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&batch);
        let _ = err.flush();
    }
}

/// The writer `env_logger` is given: appends to the shared buffer.
struct Batched;

impl Write for Batched {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut buf = lock(&sink().buf);
            buf.extend_from_slice(data);
            buf.len() >= HIGH_WATER
        };
        if full {
            flush();
        }
        Ok(data.len())
    }

    /// `env_logger` flushes after every record; the batch is written on the interval instead.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs `env_logger` (filter from `RUST_LOG`, else `default_filter`) writing in batches,
/// and starts the thread that writes them.
pub fn init(default_filter: &str) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .target(env_logger::Target::Pipe(Box::new(Batched)))
        .init();
    let started = std::thread::Builder::new()
        .name("sluice-log".to_owned())
        .spawn(|| loop {
            std::thread::sleep(INTERVAL);
            flush();
        });
    if let Err(e) = started {
        eprintln!("sluice: no log thread ({e}); logs are written when the buffer fills");
    }
}
