//! Log output in batches. `env_logger` writes (and flushes) every record on its own, which
//! costs a `write(2)` per access-log line, i.e. per request. Here records collect in a buffer
//! that a background thread writes to stderr every [`INTERVAL`] (or at once past `HIGH_WATER`),
//! so a busy gateway makes ten writes a second, not one per request. [`flush`] empties it
//! (Sluice calls it before exiting); what a crash leaves in the buffer, at most one interval's
//! worth, is lost.
//!
//! Access-log lines (one per request) skip `env_logger`'s formatter: [`access_line`] writes the
//! same `[timestamp LEVEL target] message` line straight into the batch, with the timestamp
//! formatted once a second per thread and the message serialized in place (no `String` per
//! line). `env_logger`'s per-record formatting was ~4 % of a request's instructions.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::lock;

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

/// Set by [`init`]: records go to the batch (else, e.g. in tests, to whatever logger is set).
static BATCHED: AtomicBool = AtomicBool::new(false);

/// The access log's target (and its filter directive: `sluice::access=info`).
pub const ACCESS_TARGET: &str = "sluice::access";

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

/// Appends a finished line (or several) to the batch.
fn append(data: &[u8]) {
    let _ = Batched.write(data);
}

/// A thread's line under construction and the timestamp prefix of its current second.
struct Scratch {
    line: Vec<u8>,
    second: u64,
    prefix: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch { line: Vec::new(), second: u64::MAX, prefix: Vec::new() })
    };
}

/// The time a log line is stamped with. Log timestamps are the one use of the wall clock that
/// no decision depends on (`env_logger` reads it the same way), so no injected clock here.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> SystemTime {
    SystemTime::now()
}

/// Writes one access-log line at `info` whose message `message` writes (a JSON object, no
/// newline), if the filter lets `sluice::access` through. The line is what `env_logger` would
/// have written: `[2026-01-02T03:04:05Z INFO  sluice::access] {...}`.
pub fn access_line(message: impl FnOnce(&mut Vec<u8>)) {
    if !log::log_enabled!(target: ACCESS_TARGET, log::Level::Info) {
        return;
    }
    if !BATCHED.load(Ordering::Relaxed) {
        let mut line = Vec::new();
        message(&mut line);
        log::info!(target: ACCESS_TARGET, "{}", String::from_utf8_lossy(&line));
        return;
    }
    SCRATCH.with(|scratch| {
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            return; // only if `message` itself logged an access line: not done
        };
        let now = wall_clock();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != scratch.second {
            scratch.second = second;
            scratch.prefix.clear();
            let stamp = jiff::Timestamp::try_from(now).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
            let _ = write!(scratch.prefix, "[{stamp:.0} INFO  {ACCESS_TARGET}] ");
        }
        let Scratch { line, prefix, .. } = &mut *scratch;
        line.clear();
        line.extend_from_slice(prefix);
        message(line);
        line.push(b'\n');
        append(line);
        // A rare huge line (a long deployment list) does not stay allocated per thread.
        if line.capacity() > 16 * 1024 {
            *line = Vec::new();
        }
    });
}

/// Installs `env_logger` (filter from `RUST_LOG`, else `default_filter`) writing in batches,
/// and starts the thread that writes them.
pub fn init(default_filter: &str) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .target(env_logger::Target::Pipe(Box::new(Batched)))
        .init();
    BATCHED.store(true, Ordering::Relaxed);
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
